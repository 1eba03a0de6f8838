use super::*;
use crate::platform::SimulatedPlatform;
use std::sync::Arc;

const CODE: [u8; 32] = [1; 32];

fn member(seed: u64, dc: &str, measurement: [u8; 32]) -> (Arc<Identity>, PeerChannels) {
    let (platform, _) = SimulatedPlatform::new(seed, measurement);
    let identity = Arc::new(Identity::generate(&platform, dc));
    let channels = PeerChannels::new(identity.clone(), platform.attestation_root(), CODE);
    (identity, channels)
}

fn pair() -> ((Arc<Identity>, PeerChannels), (Arc<Identity>, PeerChannels)) {
    let a = member(1, "dc1", CODE);
    let b = member(2, "dc2", CODE);
    a.1.admit_peer(b.0.attestation()).unwrap();
    (a, b)
}

#[test]
fn sealed_message_round_trip_and_reply() {
    let ((a, ac), (b, bc)) = pair();
    let (request, counter) = ac.seal(b.node_id(), 0, b"append").unwrap();
    let (from, text) = bc.open(&request, 0).unwrap();
    assert_eq!((from, &text[..]), (a.node_id(), &b"append"[..]));
    let (reply, _) = bc.seal(a.node_id(), counter, b"ok").unwrap();
    assert_eq!(&ac.open(&reply, counter).unwrap().1[..], b"ok");
}

#[test]
fn replayed_message_is_refused() {
    let ((_, ac), (b, bc)) = pair();
    let (request, _) = ac.seal(b.node_id(), 0, b"vote").unwrap();
    bc.open(&request, 0).unwrap();
    assert_eq!(bc.open(&request, 0).unwrap_err(), ChannelError::Replay);
}

#[test]
fn reordered_messages_within_the_window_are_accepted_once() {
    let ((_, ac), (b, bc)) = pair();
    let messages: Vec<_> = (0..10)
        .map(|_| ac.seal(b.node_id(), 0, b"m").unwrap().0)
        .collect();
    for m in messages.iter().rev() {
        bc.open(m, 0).unwrap();
    }
    for m in &messages {
        assert_eq!(bc.open(m, 0).unwrap_err(), ChannelError::Replay);
    }
}

#[test]
fn message_older_than_the_window_is_refused() {
    let ((_, ac), (b, bc)) = pair();
    let old = ac.seal(b.node_id(), 0, b"old").unwrap().0;
    for _ in 0..REPLAY_WINDOW {
        let m = ac.seal(b.node_id(), 0, b"m").unwrap().0;
        bc.open(&m, 0).unwrap();
    }
    assert_eq!(bc.open(&old, 0).unwrap_err(), ChannelError::Replay);
}

#[test]
fn altered_message_is_refused() {
    let ((_, ac), (b, bc)) = pair();
    let (mut request, _) = ac.seal(b.node_id(), 0, b"append").unwrap();
    request.ciphertext[0] ^= 1;
    assert_eq!(
        bc.open(&request, 0).unwrap_err(),
        ChannelError::Authentication
    );
    let (mut bumped, _) = ac.seal(b.node_id(), 0, b"append").unwrap();
    bumped.counter += 1000;
    assert_eq!(
        bc.open(&bumped, 0).unwrap_err(),
        ChannelError::Authentication
    );
}

#[test]
fn reply_to_another_request_is_refused() {
    let ((a, ac), (b, bc)) = pair();
    let (request, counter) = ac.seal(b.node_id(), 0, b"append").unwrap();
    bc.open(&request, 0).unwrap();
    let (reply, _) = bc.seal(a.node_id(), counter, b"ok").unwrap();
    assert_eq!(
        ac.open(&reply, counter + 1).unwrap_err(),
        ChannelError::Authentication
    );
}

#[test]
fn message_for_another_fleet_is_refused() {
    let ((_, ac), (b, bc)) = pair();
    ac.join_fleet([7; 32], &[]);
    ac.admit_peer(b.attestation()).unwrap();
    bc.join_fleet([8; 32], &[]);
    let (request, _) = ac.seal(b.node_id(), 0, b"append").unwrap();
    assert_eq!(
        bc.open(&request, 0).unwrap_err(),
        ChannelError::Authentication
    );
}

#[test]
fn message_for_another_member_is_refused() {
    let ((_, ac), (b, _)) = pair();
    let (c, cc) = member(3, "dc3", CODE);
    ac.admit_peer(c.attestation()).unwrap();
    let (mut request, _) = ac.seal(b.node_id(), 0, b"append").unwrap();
    assert_eq!(
        cc.open(&request, 0).unwrap_err(),
        ChannelError::WrongRecipient
    );
    request.to = c.node_id();
    assert_eq!(
        cc.open(&request, 0).unwrap_err(),
        ChannelError::Authentication
    );
}

#[test]
fn member_running_unapproved_code_is_refused() {
    let (_, ac) = member(1, "dc1", CODE);
    let (rogue, _) = member(9, "dc2", [2; 32]);
    assert!(matches!(
        ac.admit_peer(rogue.attestation()),
        Err(ChannelError::Measurement(_))
    ));
}

#[test]
fn attestation_from_another_root_or_altered_is_refused() {
    let (a, ac) = member(1, "dc1", CODE);
    let mut forged = a.attestation().clone();
    forged.dc = "dc9".into();
    assert_eq!(ac.admit_peer(&forged), Err(ChannelError::Certification));
    let mut other_root = a.attestation().clone();
    other_root.root = [9; 32];
    assert_eq!(
        other_root.verify(&a.attestation().root),
        Err(ChannelError::Certification)
    );
}

#[test]
fn fleet_secret_opens_only_for_its_recipient() {
    let ((a, _), (b, _)) = pair();
    let (platform, _) = SimulatedPlatform::new(5, CODE);
    let sealed = seal_secret(&platform, &a, b.attestation(), &[3; 32], b"oprf seed");
    assert_eq!(
        &open_secret(&b, &[3; 32], &sealed).unwrap()[..],
        b"oprf seed"
    );
    assert_eq!(
        open_secret(&b, &[4; 32], &sealed).unwrap_err(),
        ChannelError::Authentication
    );
    let (c, _) = member(3, "dc3", CODE);
    assert_eq!(
        open_secret(&c, &[3; 32], &sealed).unwrap_err(),
        ChannelError::Authentication
    );
}

#[test]
fn identity_debug_is_redacted() {
    let (a, _) = member(1, "dc1", CODE);
    assert!(format!("{a:?}").contains("(redacted)"));
}

#[test]
fn a_known_peer_cannot_swap_fields_of_its_attestation() {
    let ((_, ac), (b, _)) = pair();
    let mut moved = b.attestation().clone();
    moved.dc = "dc9".into();
    assert_eq!(ac.admit_peer(&moved), Err(ChannelError::IdentityChanged));
    let mut other_code = b.attestation().clone();
    other_code.measurement = [9; 32];
    assert_eq!(
        ac.admit_peer(&other_code),
        Err(ChannelError::IdentityChanged)
    );
    assert_eq!(ac.admit_peer(b.attestation()), Ok(()));
}
