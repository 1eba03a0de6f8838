//! HSM identities, attestations, and the sealed channels between the HSMs of a fleet.
//!
//! Each HSM makes a fresh X25519 identity key when it starts; its platform certifies that
//! key together with the HSM's code measurement (an [`Attestation`]). Two HSMs derive a
//! channel key per direction from their static keys, so only the two attested HSMs can
//! read or forge their messages. Every message names the fleet, sender, receiver and a
//! per-direction counter in its associated data: altered bytes, messages for another
//! fleet or member, and replays are refused.

use crate::platform::Platform;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use ed25519_dalek::{Signature, VerifyingKey};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

const ATTESTATION_LABEL: &[u8] = b"bkv/v1/attestation";
const CHANNEL_LABEL: &[u8] = b"bkv/v1/peer-channel";
const FLEET_SECRET_LABEL: &[u8] = b"bkv/v1/fleet-secret";
/// How far behind the newest counter a message may arrive and still be accepted once.
const REPLAY_WINDOW: u64 = 128;

/// A member's identity key and code measurement, certified by its platform.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attestation {
    /// The datacenter slot the member serves.
    pub dc: String,
    /// The member's Raft node id (fresh at every start).
    pub node_id: u64,
    /// The member's X25519 identity key.
    pub channel_key: [u8; 32],
    /// SHA-256 of the code the member runs.
    pub measurement: [u8; 32],
    /// The platform key that certified this attestation.
    pub root: [u8; 32],
    /// Ed25519 signature by `root` over the labelled statement.
    pub signature: Vec<u8>,
}

/// Why an attestation or a sealed message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The attestation is not signed by the trusted platform root.
    #[error("attestation not certified by the trusted platform root")]
    Certification,
    /// The member runs code the fleet does not approve.
    #[error("code measurement {0} is not approved by this fleet")]
    Measurement(String),
    /// A message for another member.
    #[error("message addressed to another member")]
    WrongRecipient,
    /// A message that does not authenticate (altered, another fleet, wrong key).
    #[error("message does not authenticate")]
    Authentication,
    /// A message seen before, or too old to tell.
    #[error("replayed or stale message")]
    Replay,
    /// A peer changed identity key under the same node id.
    #[error("peer presented a different identity key")]
    IdentityChanged,
    /// No key for the intended recipient.
    #[error("unknown recipient {0}")]
    UnknownPeer(u64),
}

pub(crate) fn statement(
    dc: &str,
    node_id: u64,
    channel_key: &[u8; 32],
    measurement: &[u8; 32],
) -> Vec<u8> {
    let mut s = Vec::with_capacity(ATTESTATION_LABEL.len() + dc.len() + 80);
    s.extend_from_slice(ATTESTATION_LABEL);
    s.extend_from_slice(&(dc.len() as u32).to_be_bytes());
    s.extend_from_slice(dc.as_bytes());
    s.extend_from_slice(&node_id.to_be_bytes());
    s.extend_from_slice(channel_key);
    s.extend_from_slice(measurement);
    s
}

impl Attestation {
    /// Checks the platform signature and that `root` is the trusted root.
    pub fn verify(&self, trusted_root: &[u8; 32]) -> Result<(), ChannelError> {
        if &self.root != trusted_root {
            return Err(ChannelError::Certification);
        }
        let key = VerifyingKey::from_bytes(&self.root).map_err(|_| ChannelError::Certification)?;
        let signature =
            Signature::from_slice(&self.signature).map_err(|_| ChannelError::Certification)?;
        key.verify_strict(
            &statement(&self.dc, self.node_id, &self.channel_key, &self.measurement),
            &signature,
        )
        .map_err(|_| ChannelError::Certification)
    }

    /// Short hex fingerprint of the identity key, for operators.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.channel_key);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// This HSM's identity: its secret key and its attestation.
pub struct Identity {
    secret: StaticSecret,
    attestation: Attestation,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("attestation", &self.attestation)
            .field("secret", &"(redacted)")
            .finish()
    }
}

impl Identity {
    /// Makes a fresh identity for `dc` and has the platform certify it.
    pub fn generate(platform: &dyn Platform, dc: &str) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        platform.fill_random(seed.as_mut());
        let secret = StaticSecret::from(*seed);
        let mut id = [0u8; 8];
        platform.fill_random(&mut id);
        // Node id 0 is avoided so that "no node" is never a valid id.
        let node_id = u64::from_be_bytes(id).max(1);
        let channel_key = PublicKey::from(&secret).to_bytes();
        let measurement = platform.measurement();
        let signature = platform
            .certify(&statement(dc, node_id, &channel_key, &measurement))
            .to_vec();
        Self {
            secret,
            attestation: Attestation {
                dc: dc.to_string(),
                node_id,
                channel_key,
                measurement,
                root: platform.attestation_root(),
                signature,
            },
        }
    }

    /// This HSM's attestation.
    pub fn attestation(&self) -> &Attestation {
        &self.attestation
    }

    /// This HSM's node id.
    pub fn node_id(&self) -> u64 {
        self.attestation.node_id
    }

    fn shared_key(
        &self,
        label: &[u8],
        fleet: &[u8; 32],
        from: &[u8; 32],
        to: &[u8; 32],
        peer: &[u8; 32],
    ) -> Zeroizing<[u8; 32]> {
        let shared = Zeroizing::new(
            self.secret
                .diffie_hellman(&PublicKey::from(*peer))
                .to_bytes(),
        );
        let hkdf = Hkdf::<Sha512>::new(None, shared.as_ref());
        let mut key = Zeroizing::new([0u8; 32]);
        hkdf.expand_multi_info(&[label, &[0], fleet, from, to], key.as_mut())
            .expect("32 bytes is a valid HKDF length");
        key
    }
}

/// A fleet secret sealed by one member (`from`) to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    /// The sealing member's identity key.
    pub from: [u8; 32],
    /// Random nonce.
    pub nonce: [u8; 12],
    /// AEAD ciphertext.
    pub ciphertext: Vec<u8>,
}

/// Seals `secret` from `me` to the member attested by `to`, bound to `fleet`.
pub fn seal_secret(
    platform: &dyn Platform,
    me: &Identity,
    to: &Attestation,
    fleet: &[u8; 32],
    secret: &[u8],
) -> SealedSecret {
    let my_key = me.attestation.channel_key;
    let key = me.shared_key(
        FLEET_SECRET_LABEL,
        fleet,
        &my_key,
        &to.channel_key,
        &to.channel_key,
    );
    let mut nonce = [0u8; 12];
    platform.fill_random(&mut nonce);
    let cipher = ChaCha20Poly1305::new(key.as_ref().into());
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: secret,
                aad: fleet,
            },
        )
        .expect("sealing a short secret cannot fail");
    SealedSecret {
        from: my_key,
        nonce,
        ciphertext,
    }
}

/// Opens a secret sealed to `me`.
pub fn open_secret(
    me: &Identity,
    fleet: &[u8; 32],
    sealed: &SealedSecret,
) -> Result<Zeroizing<Vec<u8>>, ChannelError> {
    let my_key = me.attestation.channel_key;
    let key = me.shared_key(
        FLEET_SECRET_LABEL,
        fleet,
        &sealed.from,
        &my_key,
        &sealed.from,
    );
    let cipher = ChaCha20Poly1305::new(key.as_ref().into());
    cipher
        .decrypt(
            Nonce::from_slice(&sealed.nonce),
            Payload {
                msg: &sealed.ciphertext,
                aad: fleet,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| ChannelError::Authentication)
}

/// One sealed message between two members.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// The sender's attestation (lets a new member learn and check its peers).
    pub from: Attestation,
    /// The recipient's node id.
    pub to: u64,
    /// Sender-to-recipient message counter, strictly increasing.
    pub counter: u64,
    /// The counter of the request this answers (0 for a request).
    pub in_reply_to: u64,
    /// AEAD ciphertext.
    pub ciphertext: Vec<u8>,
}

/// Accepts each counter once, tolerating reordering within [`REPLAY_WINDOW`].
#[derive(Default)]
struct ReplayWindow {
    highest: u64,
    seen: u128,
}

impl ReplayWindow {
    fn check_and_mark(&mut self, counter: u64) -> bool {
        if counter == 0 {
            return false;
        }
        if counter > self.highest {
            let shift = counter - self.highest;
            self.seen = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.highest = counter;
            return true;
        }
        let age = self.highest - counter;
        if age >= REPLAY_WINDOW {
            return false;
        }
        let bit = 1u128 << age;
        if self.seen & bit != 0 {
            return false;
        }
        self.seen |= bit;
        true
    }
}

struct Peer {
    attestation: Attestation,
    send: Zeroizing<[u8; 32]>,
    recv: Zeroizing<[u8; 32]>,
    next_counter: u64,
    window: ReplayWindow,
}

/// The sealed channels from this HSM to every peer it has checked.
pub struct PeerChannels {
    me: std::sync::Arc<Identity>,
    root: [u8; 32],
    state: Mutex<ChannelState>,
}

struct ChannelState {
    fleet: [u8; 32],
    approved: BTreeSet<[u8; 32]>,
    peers: HashMap<u64, Peer>,
}

fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

fn aad(fleet: &[u8; 32], from: u64, to: u64, counter: u64, in_reply_to: u64) -> Vec<u8> {
    let mut a = Vec::with_capacity(CHANNEL_LABEL.len() + 64);
    a.extend_from_slice(CHANNEL_LABEL);
    a.extend_from_slice(fleet);
    for n in [from, to, counter, in_reply_to] {
        a.extend_from_slice(&n.to_be_bytes());
    }
    a
}

impl PeerChannels {
    /// Channels for `me`, trusting attestations certified by `root` for code `approved`.
    /// Until the fleet is known, channels are bound to the all-zero fleet id.
    pub fn new(me: std::sync::Arc<Identity>, root: [u8; 32], approved: [u8; 32]) -> Self {
        Self {
            me,
            root,
            state: Mutex::new(ChannelState {
                fleet: [0; 32],
                approved: BTreeSet::from([approved]),
                peers: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChannelState> {
        self.state.lock().expect("channel state lock")
    }

    /// Binds every later message to `fleet` and approves its code measurements.
    /// Existing channels are rekeyed, since their keys name the fleet.
    pub fn join_fleet(&self, fleet: [u8; 32], approved: &[[u8; 32]]) {
        let mut state = self.lock();
        if state.fleet != fleet {
            state.fleet = fleet;
            state.peers.clear();
        }
        state.approved.extend(approved.iter().copied());
    }

    /// The fleet id messages are bound to.
    pub fn fleet(&self) -> [u8; 32] {
        self.lock().fleet
    }

    /// Checks `attestation` and remembers it, so that messages can be sealed to its key.
    /// The signature is checked once per peer: later, only an attestation identical to the
    /// one checked is accepted for that node id, so no field can be swapped unverified.
    pub fn admit_peer(&self, attestation: &Attestation) -> Result<(), ChannelError> {
        if let Some(peer) = self.lock().peers.get(&attestation.node_id) {
            return if peer.attestation == *attestation {
                Ok(())
            } else {
                Err(ChannelError::IdentityChanged)
            };
        }
        attestation.verify(&self.root)?;
        let mut state = self.lock();
        if !state.approved.contains(&attestation.measurement) {
            let m: String = attestation
                .measurement
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            return Err(ChannelError::Measurement(m));
        }
        let fleet = state.fleet;
        let mine = self.me.attestation.channel_key;
        let theirs = attestation.channel_key;
        let peer = Peer {
            attestation: attestation.clone(),
            send: self
                .me
                .shared_key(CHANNEL_LABEL, &fleet, &mine, &theirs, &theirs),
            recv: self
                .me
                .shared_key(CHANNEL_LABEL, &fleet, &theirs, &mine, &theirs),
            next_counter: 1,
            window: ReplayWindow::default(),
        };
        state.peers.entry(attestation.node_id).or_insert(peer);
        Ok(())
    }

    /// Seals `plaintext` to peer `to`. Returns the envelope and its counter.
    pub fn seal(
        &self,
        to: u64,
        in_reply_to: u64,
        plaintext: &[u8],
    ) -> Result<(Envelope, u64), ChannelError> {
        let mut state = self.lock();
        let fleet = state.fleet;
        let peer = state
            .peers
            .get_mut(&to)
            .ok_or(ChannelError::UnknownPeer(to))?;
        let counter = peer.next_counter;
        peer.next_counter += 1;
        let cipher = ChaCha20Poly1305::new(peer.send.as_ref().into());
        let aad = aad(&fleet, self.me.node_id(), to, counter, in_reply_to);
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce(counter)),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("sealing cannot fail");
        Ok((
            Envelope {
                from: self.me.attestation.clone(),
                to,
                counter,
                in_reply_to,
                ciphertext,
            },
            counter,
        ))
    }

    /// Opens an envelope for this HSM. `in_reply_to` must match what the caller awaits
    /// (0 for a request). Returns the sender's node id and the plaintext.
    pub fn open(
        &self,
        envelope: &Envelope,
        in_reply_to: u64,
    ) -> Result<(u64, Zeroizing<Vec<u8>>), ChannelError> {
        if envelope.to != self.me.node_id() {
            return Err(ChannelError::WrongRecipient);
        }
        if envelope.in_reply_to != in_reply_to {
            return Err(ChannelError::Authentication);
        }
        self.admit_peer(&envelope.from)?;
        let mut state = self.lock();
        let fleet = state.fleet;
        let from = envelope.from.node_id;
        let peer = state
            .peers
            .get_mut(&from)
            .ok_or(ChannelError::UnknownPeer(from))?;
        let cipher = ChaCha20Poly1305::new(peer.recv.as_ref().into());
        let aad = aad(
            &fleet,
            from,
            envelope.to,
            envelope.counter,
            envelope.in_reply_to,
        );
        let plaintext = cipher
            .decrypt(
                Nonce::from_slice(&nonce(envelope.counter)),
                Payload {
                    msg: &envelope.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| ChannelError::Authentication)?;
        // Marked only once authentic, so forged counters cannot close the window.
        if !peer.window.check_and_mark(envelope.counter) {
            return Err(ChannelError::Replay);
        }
        Ok((from, Zeroizing::new(plaintext)))
    }
}

#[cfg(test)]
mod tests;
