//! Validation bundles: the fleet-key artifact, the witness's signature over it in the
//! format of Cloudflare's Plexi auditor, and the operator's counter-signature.
//!
//! A client in over-the-air mode pins only the witness and operator keys. Every session
//! opens with a bundle; [`Bundle::verify`] decides whether the fleet that answered is
//! one the operator published and an independent witness logged.

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Plexi's `ProtobufEd25519` ciphersuite: Ed25519 over a protobuf `SignatureMessage`.
pub const CIPHERSUITE_PROTOBUF_ED25519: u32 = 0x0001;

/// Label of the operator's counter-signature over the witness signature bytes.
pub const LABEL_COUNTERSIGN: &[u8] = b"bkv/v1/operator-countersign\0";

/// Label of the operator's request that the witness sign an epoch.
pub const LABEL_SUBMIT: &[u8] = b"bkv/v1/witness-submit\0";

/// Largest bundle a client accepts (an artifact lists a few fleets and their evidence).
pub const MAX_BUNDLE_BYTES: usize = 256 * 1024;

/// Version of the artifact format.
pub const ARTIFACT_VERSION: u32 = 1;

/// Plexi's `Epoch` message (proto2, `plexi_core.types`).
#[derive(Clone, PartialEq, prost::Message)]
struct PlexiEpoch {
    #[prost(uint64, required, tag = "1")]
    inner: u64,
}

/// Plexi's `SignatureMessage` (proto2, `plexi_core.types`): what the witness signs.
#[derive(Clone, PartialEq, prost::Message)]
struct PlexiSignatureMessage {
    #[prost(uint32, required, tag = "1")]
    ciphersuite: u32,
    #[prost(string, required, tag = "2")]
    namespace: String,
    #[prost(uint64, required, tag = "3")]
    timestamp: u64,
    #[prost(message, required, tag = "4")]
    epoch: PlexiEpoch,
    #[prost(bytes = "vec", required, tag = "5")]
    digest: Vec<u8>,
}

/// The bytes a witness signs for one epoch: Plexi's protobuf `SignatureMessage`.
pub fn signature_message(namespace: &str, timestamp: u64, epoch: u64, digest: &[u8]) -> Vec<u8> {
    prost::Message::encode_to_vec(&PlexiSignatureMessage {
        ciphersuite: CIPHERSUITE_PROTOBUF_ED25519,
        namespace: namespace.to_string(),
        timestamp,
        epoch: PlexiEpoch { inner: epoch },
        digest: digest.to_vec(),
    })
}

/// The bytes the operator signs to counter-sign a witness signature.
pub fn countersign_message(witness_signature: &[u8]) -> Vec<u8> {
    [LABEL_COUNTERSIGN, witness_signature].concat()
}

/// The bytes the operator signs to ask the witness to sign `digest` as `epoch`.
pub fn submit_message(namespace: &str, epoch: u64, digest: &[u8]) -> Vec<u8> {
    let mut m = LABEL_SUBMIT.to_vec();
    m.extend_from_slice(&(namespace.len() as u32).to_be_bytes());
    m.extend_from_slice(namespace.as_bytes());
    m.extend_from_slice(&epoch.to_be_bytes());
    m.extend_from_slice(digest);
    m
}

/// SHA-256 of an artifact's exact bytes.
pub fn artifact_digest(artifact: &str) -> [u8; 32] {
    Sha256::digest(artifact.as_bytes()).into()
}

/// Plexi's `key_id` for an Ed25519 key: its last byte.
pub fn plexi_key_id(public_key: &[u8; 32]) -> u8 {
    public_key[31]
}

/// A witness's answer for one epoch, in the JSON form `plexi-core`'s `SignatureResponse`
/// reads and writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessSignature {
    /// The ciphersuite again (Plexi keeps both names while clients move to `ciphersuite`).
    pub version: u32,
    /// [`CIPHERSUITE_PROTOBUF_ED25519`].
    pub ciphersuite: u32,
    /// The log the epoch belongs to.
    pub namespace: String,
    /// Milliseconds since the Unix epoch, by the witness's clock.
    pub timestamp: u64,
    /// The epoch number, from 1.
    pub epoch: u64,
    /// SHA-256 of the artifact.
    #[serde(with = "hex::serde")]
    pub digest: Vec<u8>,
    /// Ed25519 signature over [`signature_message`].
    #[serde(with = "hex::serde")]
    pub signature: Vec<u8>,
    /// Last byte of the witness key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<u8>,
    /// Hex of the signed message, as Plexi may carry it (never trusted: recomputed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serialized_message: Option<String>,
}

impl WitnessSignature {
    /// The bytes the signature covers, recomputed from the fields.
    pub fn message(&self) -> Vec<u8> {
        signature_message(&self.namespace, self.timestamp, self.epoch, &self.digest)
    }
}

/// How clients may use a fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Takes new enrollments and recoveries.
    Active,
    /// Recoveries only; a client that recovers here moves to the active fleet.
    RecoverOnly,
    /// Kept for the record; clients refuse it.
    Retired,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Active => "active",
            Role::RecoverOnly => "recover-only",
            Role::Retired => "retired",
        })
    }
}

/// One HSM's attestation: its identity key certified with its code measurement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationEvidence {
    /// Datacenter slot.
    pub dc: String,
    /// Raft node id.
    pub node_id: u64,
    /// X25519 identity key, hex.
    pub channel_key: String,
    /// SHA-256 of the code, hex.
    pub measurement: String,
    /// The certifying platform key, hex.
    pub root: String,
    /// Ed25519 signature by `root`, hex.
    pub signature: String,
}

/// The creation ceremony of a fleet, as the founding HSM signed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ceremony {
    /// The fleet's random id, hex.
    pub fleet_id: String,
    /// The fleet key made inside the founding HSM, hex.
    pub fleet_key: String,
    /// Guesses per record.
    pub max_attempts: u32,
    /// Code measurements allowed to join, hex.
    pub approved_measurements: Vec<String>,
    /// The founding HSM's attestation.
    pub founder: AttestationEvidence,
    /// The founding HSM's platform signature over the ceremony statement, hex.
    pub signature: String,
}

/// Evidence of a fleet's secure deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The code measurement the fleet runs, hex.
    pub measurement: String,
    /// The creation ceremony transcript, signed inside the founding HSM.
    pub ceremony: Ceremony,
    /// Attestations of the members admitted when the evidence was taken.
    pub members: Vec<AttestationEvidence>,
}

/// One fleet in an artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetEntry {
    /// The fleet's id (random, made at its creation ceremony), hex.
    pub id: String,
    /// The fleet's OPAQUE public key, hex.
    pub fleet_key: String,
    /// How clients may use it.
    pub role: Role,
    /// Its deployment evidence.
    pub evidence: Evidence,
}

/// The fleet-key artifact the operator publishes and the witness signs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// [`ARTIFACT_VERSION`].
    pub version: u32,
    /// The witness namespace this artifact is published in.
    pub namespace: String,
    /// Every fleet, active, recover-only or retired.
    pub fleets: Vec<FleetEntry>,
}

impl Artifact {
    /// The role of the fleet whose key is `fleet_key`, if listed.
    pub fn role_of(&self, fleet_key: &[u8]) -> Option<Role> {
        let key = hex::encode(fleet_key);
        self.fleets
            .iter()
            .find(|f| f.fleet_key.eq_ignore_ascii_case(&key))
            .map(|f| f.role)
    }

    /// The canonical bytes that are published and digested.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an artifact always serializes")
    }
}

/// What travels to clients: an artifact with the witness's and the operator's signatures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// The artifact's exact JSON text (its SHA-256 is the signed digest).
    pub artifact: String,
    /// The witness's Plexi signature.
    pub witness: WitnessSignature,
    /// The operator's Ed25519 counter-signature over the witness signature bytes, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_signature: Option<String>,
}

/// The keys a client or auditor trusts bundles by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleKeys {
    /// The witness's Ed25519 key.
    pub witness: [u8; 32],
    /// The operator's Ed25519 key.
    pub operator: [u8; 32],
}

/// A bundle whose signatures and digest checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedBundle {
    /// The epoch it was published as.
    pub epoch: u64,
    /// When the witness signed it (ms since the Unix epoch).
    pub timestamp: u64,
    /// The namespace.
    pub namespace: String,
    /// The fleets it lists.
    pub artifact: Artifact,
}

/// Why a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// Not a bundle at all.
    #[error("malformed bundle: {0}")]
    Malformed(String),
    /// No bundle came with the answer.
    #[error("the vault sent no validation bundle")]
    Missing,
    /// A ciphersuite other than Plexi's ProtobufEd25519.
    #[error("unsupported witness ciphersuite {0}")]
    Ciphersuite(u32),
    /// The artifact does not hash to the signed digest.
    #[error("the artifact does not match the signed digest")]
    Digest,
    /// The witness signature does not verify under the pinned witness key.
    #[error("the witness signature does not verify under the pinned witness key")]
    WitnessSignature,
    /// No operator counter-signature.
    #[error("the bundle has no operator counter-signature")]
    MissingCountersignature,
    /// The counter-signature does not verify under the pinned operator key.
    #[error("the operator counter-signature does not verify under the pinned operator key")]
    OperatorSignature,
    /// The artifact names another namespace than the witness signed, or than expected.
    #[error("namespace mismatch: {0}")]
    Namespace(String),
    /// An epoch older than one already seen.
    #[error("epoch {presented} is older than epoch {seen} already seen (a rollback)")]
    Rollback {
        /// The bundle's epoch.
        presented: u64,
        /// The highest epoch this client has seen.
        seen: u64,
    },
    /// The answering fleet is not in the bundle, or not in a role that allows this.
    #[error("fleet key {fleet_key} is {why}")]
    FleetNotAllowed {
        /// Hex of the answering fleet's key.
        fleet_key: String,
        /// What the bundle says of it.
        why: String,
    },
}

/// Whether `s` is exactly 64 lower-case hex digits (the one spelling of a 32-byte key).
pub fn canonical_hex32(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks an Ed25519 signature strictly (no malleable or small-order forms), as Plexi does.
pub fn ed25519_verify(key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    let (Ok(key), Ok(signature)) = (
        VerifyingKey::from_bytes(key),
        Signature::from_slice(signature),
    ) else {
        return false;
    };
    key.verify_strict(message, &signature).is_ok()
}

impl Bundle {
    /// Parses a bundle from JSON bytes, bounded in size.
    pub fn from_json(bytes: &[u8]) -> Result<Self, BundleError> {
        if bytes.is_empty() {
            return Err(BundleError::Missing);
        }
        if bytes.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::Malformed(format!(
                "larger than {MAX_BUNDLE_BYTES} bytes"
            )));
        }
        serde_json::from_slice(bytes).map_err(|e| BundleError::Malformed(e.to_string()))
    }

    /// JSON bytes of the bundle.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a bundle always serializes")
    }

    /// Checks the witness signature, the digest, the counter-signature and the artifact.
    /// It does not judge the epoch or the fleet: see [`VerifiedBundle::admit`].
    pub fn verify(&self, keys: &BundleKeys) -> Result<VerifiedBundle, BundleError> {
        self.check_witness(&keys.witness)?;
        let w = &self.witness;
        let countersignature = self
            .operator_signature
            .as_deref()
            .ok_or(BundleError::MissingCountersignature)?;
        let countersignature =
            hex::decode(countersignature).map_err(|_| BundleError::OperatorSignature)?;
        if !ed25519_verify(
            &keys.operator,
            &countersign_message(&w.signature),
            &countersignature,
        ) {
            return Err(BundleError::OperatorSignature);
        }
        self.parse_artifact()
    }

    /// Checks the witness signature and the digest, and the artifact, but not the
    /// operator's counter-signature: what the witness logged before it was counter-signed
    /// (an interrupted publication). Clients use [`Bundle::verify`].
    pub fn verify_witnessed(&self, witness: &[u8; 32]) -> Result<VerifiedBundle, BundleError> {
        self.check_witness(witness)?;
        self.parse_artifact()
    }

    fn check_witness(&self, witness: &[u8; 32]) -> Result<(), BundleError> {
        let w = &self.witness;
        if w.ciphersuite != CIPHERSUITE_PROTOBUF_ED25519 || w.version != w.ciphersuite {
            return Err(BundleError::Ciphersuite(w.ciphersuite));
        }
        if artifact_digest(&self.artifact)[..] != w.digest[..] {
            return Err(BundleError::Digest);
        }
        if !ed25519_verify(witness, &w.message(), &w.signature) {
            return Err(BundleError::WitnessSignature);
        }
        Ok(())
    }

    fn parse_artifact(&self) -> Result<VerifiedBundle, BundleError> {
        let w = &self.witness;
        let artifact: Artifact = serde_json::from_str(&self.artifact)
            .map_err(|e| BundleError::Malformed(format!("artifact: {e}")))?;
        if artifact.version != ARTIFACT_VERSION {
            return Err(BundleError::Malformed(format!(
                "artifact version {} (expected {ARTIFACT_VERSION})",
                artifact.version
            )));
        }
        // One spelling per key: an auditor comparing epochs must never see one fleet twice.
        let mut keys = std::collections::BTreeSet::new();
        for fleet in &artifact.fleets {
            if !canonical_hex32(&fleet.fleet_key) || !canonical_hex32(&fleet.id) {
                return Err(BundleError::Malformed(
                    "a fleet key or id is not 64 lower-case hex digits".into(),
                ));
            }
            if !keys.insert(fleet.fleet_key.as_str()) {
                return Err(BundleError::Malformed(format!(
                    "fleet {} is listed twice",
                    fleet.fleet_key
                )));
            }
        }
        if artifact.namespace != w.namespace {
            return Err(BundleError::Namespace(format!(
                "the artifact says {:?}, the witness signed {:?}",
                artifact.namespace, w.namespace
            )));
        }
        Ok(VerifiedBundle {
            epoch: w.epoch,
            timestamp: w.timestamp,
            namespace: w.namespace.clone(),
            artifact,
        })
    }
}

impl VerifiedBundle {
    /// Decides whether a session with the fleet `fleet_key` may go on: the epoch must not
    /// be older than `highest_seen`, and the fleet must be listed in a role in `allowed`.
    pub fn admit(
        &self,
        fleet_key: &[u8],
        highest_seen: u64,
        allowed: &[Role],
    ) -> Result<Role, BundleError> {
        if self.epoch < highest_seen {
            return Err(BundleError::Rollback {
                presented: self.epoch,
                seen: highest_seen,
            });
        }
        let fleet = hex::encode(fleet_key);
        match self.artifact.role_of(fleet_key) {
            None => Err(BundleError::FleetNotAllowed {
                fleet_key: fleet,
                why: format!("not in the bundle of epoch {}", self.epoch),
            }),
            Some(role) if !allowed.contains(&role) => Err(BundleError::FleetNotAllowed {
                fleet_key: fleet,
                why: format!("{role} in epoch {}", self.epoch),
            }),
            Some(role) => Ok(role),
        }
    }
}

#[cfg(test)]
mod tests;
