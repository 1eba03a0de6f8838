//! Vault operations on a fleet of one, and fleets of several members in one process.

use super::*;
use crate::error::{HsmError, RecordStatus};
use crate::pending::LoginId;
use crate::platform::{SimulatedClock, SimulatedPlatform};
use bkv_core::seal::{self, release_context, LABEL_BACKUP_KEY_WRAP, LABEL_KEY_RELEASE};
use bkv_core::{AccountId, KsfParams, Suite};
use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialResponse, Identifiers, RegistrationResponse,
};
use rand_core::OsRng;

const KSF: KsfParams = KsfParams {
    memory_kib: 8,
    iterations: 1,
    parallelism: 1,
};

fn argon() -> argon2::Argon2<'static> {
    KSF.argon2().expect("a valid test cost")
}

const CODE: [u8; 32] = [0xC0; 32];

fn test_config() -> HsmConfig {
    HsmConfig {
        login_deadline_ms: 1_000,
        max_pending_logins: 4,
        heartbeat_ms: 50,
        ..HsmConfig::default()
    }
}

/// Connects the members of an in-process fleet by datacenter name, counting the calls
/// to each and delaying each by `delay_ms` when a test sets it.
#[derive(Default)]
struct LocalTransport {
    members: Mutex<HashMap<String, Arc<FleetHsm>>>,
    calls: Mutex<HashMap<String, usize>>,
    delay_ms: std::sync::atomic::AtomicU64,
}

impl LocalTransport {
    fn calls_to(&self, dc: &str) -> usize {
        self.calls.lock().unwrap().get(dc).copied().unwrap_or(0)
    }
}

impl PeerTransport for LocalTransport {
    fn call(&self, dc: &str, message: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, TransportError>> {
        let member = self.members.lock().unwrap().get(dc).cloned();
        *self
            .calls
            .lock()
            .unwrap()
            .entry(dc.to_string())
            .or_default() += 1;
        let delay = self.delay_ms.load(std::sync::atomic::Ordering::Relaxed);
        Box::pin(async move {
            if delay > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            }
            let member = member.ok_or_else(|| TransportError("down".into()))?;
            member
                .handle_peer(&message)
                .await
                .map_err(|e| TransportError(e.to_string()))
        })
    }
}

async fn member(
    transport: &Arc<LocalTransport>,
    seed: u64,
    dc: &str,
    code: [u8; 32],
) -> (Arc<FleetHsm>, SimulatedClock) {
    member_with(transport, seed, dc, code, test_config()).await
}

/// A member with `config`, reachable through `transport`.
async fn member_with(
    transport: &Arc<LocalTransport>,
    seed: u64,
    dc: &str,
    code: [u8; 32],
    config: HsmConfig,
) -> (Arc<FleetHsm>, SimulatedClock) {
    let (platform, clock) = SimulatedPlatform::new(seed, code);
    let hsm = FleetHsm::start(Arc::new(platform), dc, config, transport.clone())
        .await
        .unwrap();
    transport
        .members
        .lock()
        .unwrap()
        .insert(dc.to_string(), hsm.clone());
    (hsm, clock)
}

async fn hsm(max_attempts: u32) -> (Arc<FleetHsm>, SimulatedClock) {
    founded_with(7, test_config(), max_attempts).await
}

/// A fleet of one member with `config`, founded with `max_attempts`.
async fn founded_with(
    seed: u64,
    config: HsmConfig,
    max_attempts: u32,
) -> (Arc<FleetHsm>, SimulatedClock) {
    let transport = Arc::new(LocalTransport::default());
    let (hsm, clock) = member_with(&transport, seed, "dc1", CODE, config).await;
    hsm.found(max_attempts).await.unwrap();
    (hsm, clock)
}

fn account(user: &str) -> AccountId {
    AccountId::new("test", user).unwrap()
}

const BACKUP_KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

/// Runs the client side of a registration against `hsm` up to the upload.
async fn register(
    hsm: &FleetHsm,
    who: &AccountId,
    pin: &[u8],
) -> (
    crate::error::EnrollStarted,
    opaque_ke::ClientRegistrationFinishResult<Suite>,
) {
    let start = ClientRegistration::<Suite>::start(&mut OsRng, pin).unwrap();
    let started = hsm
        .enroll_start(who, &start.message.serialize())
        .await
        .unwrap();
    let ksf = argon();
    let finish = start
        .state
        .finish(
            &mut OsRng,
            pin,
            RegistrationResponse::deserialize(&started.registration_response).unwrap(),
            ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&ksf)),
        )
        .unwrap();
    (started, finish)
}

async fn enroll(hsm: &FleetHsm, who: &AccountId, pin: &[u8]) {
    let (started, finish) = register(hsm, who, pin).await;
    assert_eq!(
        finish.server_s_pk.serialize().as_slice(),
        &hsm.fleet_key().unwrap()
    );
    let wrapped = seal::seal(
        &mut OsRng,
        LABEL_BACKUP_KEY_WRAP,
        &finish.export_key,
        &who.credential_identifier(),
        BACKUP_KEY,
    );
    let budget = hsm
        .enroll_finish(
            who,
            &started.registration_id,
            &finish.message.serialize(),
            &wrapped,
            KSF,
        )
        .await
        .unwrap();
    assert_eq!(budget, hsm.record_status(who).await.unwrap().1);
}

/// A client that got KE2: either it has a KE3 (right PIN) or nothing (wrong PIN).
struct Ke2Answer {
    login_id: LoginId,
    attempts_left: u32,
    ke3: Option<(Vec<u8>, Vec<u8>, Vec<u8>)>, // (ke3, session key, export key)
}

async fn start_login(hsm: &FleetHsm, who: &AccountId, pin: &[u8]) -> Result<Ke2Answer, HsmError> {
    let start = ClientLogin::<Suite>::start(&mut OsRng, pin).unwrap();
    let started = hsm.recover_start(who, &start.message.serialize()).await?;
    let ke2 = CredentialResponse::deserialize(&started.ke2).unwrap();
    let ksf = argon();
    let finished = start.state.finish(
        &mut OsRng,
        pin,
        ke2,
        ClientLoginFinishParameters::new(None, Identifiers::default(), Some(&ksf)),
    );
    Ok(Ke2Answer {
        login_id: started.login_id,
        attempts_left: started.attempts_left,
        ke3: finished.ok().map(|f| {
            (
                f.message.serialize().to_vec(),
                f.session_key.to_vec(),
                f.export_key.to_vec(),
            )
        }),
    })
}

async fn attempts(hsm: &FleetHsm, who: &AccountId) -> RecordStatus {
    hsm.record_status(who).await.unwrap().0
}

#[tokio::test]
async fn enroll_then_recover_releases_the_wrapped_key() {
    let (hsm, _) = hsm(10).await;
    let alice = account("alice");
    enroll(&hsm, &alice, b"1234").await;
    let answer = start_login(&hsm, &alice, b"1234").await.unwrap();
    assert_eq!(answer.attempts_left, 9);
    let (ke3, session, export) = answer.ke3.expect("right PIN opens KE2");
    let released = hsm
        .recover_finish(&alice, &answer.login_id, &ke3)
        .await
        .unwrap();
    assert_eq!(released.attempts_left, 10);
    let wrapped = seal::open(
        LABEL_KEY_RELEASE,
        &session,
        &release_context(&answer.login_id, &alice),
        &released.sealed_wrapped_key,
    )
    .unwrap();
    let key = seal::open(
        LABEL_BACKUP_KEY_WRAP,
        &export,
        &alice.credential_identifier(),
        &wrapped,
    )
    .unwrap();
    assert_eq!(&key[..], BACKUP_KEY);
}

#[tokio::test]
async fn guess_is_committed_before_ke2_leaves() {
    let (hsm, _) = hsm(10).await;
    let alice = account("alice");
    enroll(&hsm, &alice, b"1234").await;
    // The client walks away after KE2: the guess is spent all the same.
    let answer = start_login(&hsm, &alice, b"1234").await.unwrap();
    assert!(answer.ke3.is_some());
    assert_eq!(
        attempts(&hsm, &alice).await,
        RecordStatus::Active {
            attempts_left: 9,
            max_attempts: 10
        }
    );
}

#[tokio::test]
async fn wrong_pins_count_down_to_destruction() {
    let (hsm, _) = hsm(3).await;
    let alice = account("alice");
    enroll(&hsm, &alice, b"1234").await;
    for expected in [2, 1, 0] {
        let answer = start_login(&hsm, &alice, b"0000").await.unwrap();
        assert!(answer.ke3.is_none(), "a wrong PIN cannot open KE2");
        assert_eq!(answer.attempts_left, expected);
        let destroyed = hsm.recover_abort(&alice, &answer.login_id).await.unwrap();
        assert_eq!(destroyed, expected == 0);
    }
    assert_eq!(attempts(&hsm, &alice).await, RecordStatus::Destroyed);
    // Even the right PIN gets nothing now.
    assert_eq!(
        start_login(&hsm, &alice, b"1234").await.err(),
        Some(HsmError::Destroyed)
    );
}

#[tokio::test]
async fn exhausted_record_is_destroyed_by_the_next_attempt_even_without_abort() {
    let (hsm, clock) = hsm(1).await;
    let alice = account("alice");
    enroll(&hsm, &alice, b"1234").await;
    let answer = start_login(&hsm, &alice, b"0000").await.unwrap();
    assert_eq!(answer.attempts_left, 0);
    // Another attempt while the last login is in flight destroys the record.
    assert_eq!(
        start_login(&hsm, &alice, b"1234").await.err(),
        Some(HsmError::Destroyed)
    );
    clock.advance(2_000);
    assert_eq!(attempts(&hsm, &alice).await, RecordStatus::Destroyed);
}

#[tokio::test]
async fn exhausted_record_with_no_login_in_flight_is_destroyed_on_status() {
    let (hsm, clock) = hsm(1).await;
    let alice = account("alice");
    enroll(&hsm, &alice, b"1234").await;
    start_login(&hsm, &alice, b"0000").await.unwrap();
    // While the login may still finish, the record stays.
    assert_eq!(
        attempts(&hsm, &alice).await,
        RecordStatus::Active {
            attempts_left: 0,
            max_attempts: 1
        }
    );
    clock.advance(1_001);
    assert_eq!(attempts(&hsm, &alice).await, RecordStatus::Destroyed);
}

#[tokio::test]
async fn right_pin_on_the_last_guess_restores_the_budget() {
    let (hsm, _) = hsm(2).await;
    let alice = account("alice");
    enroll(&hsm, &alice, b"1234").await;
    let wrong = start_login(&hsm, &alice, b"9999").await.unwrap();
    hsm.recover_abort(&alice, &wrong.login_id).await.unwrap();
    let answer = start_login(&hsm, &alice, b"1234").await.unwrap();
    assert_eq!(answer.attempts_left, 0);
    let (ke3, ..) = answer.ke3.unwrap();
    assert_eq!(
        hsm.recover_finish(&alice, &answer.login_id, &ke3)
            .await
            .unwrap()
            .attempts_left,
        2
    );
}

#[tokio::test]
async fn insider_replaying_ke3_gets_nothing() {
    let (hsm, _) = hsm(10).await;
    let alice = account("alice");
    enroll(&hsm, &alice, b"1234").await;
    let answer = start_login(&hsm, &alice, b"1234").await.unwrap();
    let (ke3, ..) = answer.ke3.unwrap();
    hsm.recover_finish(&alice, &answer.login_id, &ke3)
        .await
        .unwrap();
    assert_eq!(
        hsm.recover_finish(&alice, &answer.login_id, &ke3)
            .await
            .err(),
        Some(HsmError::LoginUnknown)
    );
}

#[tokio::test]
async fn ke3_for_another_login_fails_and_the_guess_stays_spent() {
    let (hsm, _) = hsm(10).await;
    let alice = account("alice");
    enroll(&hsm, &alice, b"1234").await;
    let first = start_login(&hsm, &alice, b"1234").await.unwrap();
    let second = start_login(&hsm, &alice, b"1234").await.unwrap();
    let (ke3_first, ..) = first.ke3.unwrap();
    assert_eq!(
        hsm.recover_finish(&alice, &second.login_id, &ke3_first)
            .await
            .err(),
        Some(HsmError::LoginFailed { attempts_left: 8 })
    );
    assert_eq!(
        attempts(&hsm, &alice).await,
        RecordStatus::Active {
            attempts_left: 8,
            max_attempts: 10
        }
    );
}

#[tokio::test]
async fn late_ke3_is_refused() {
    let (hsm, clock) = hsm(10).await;
    let alice = account("alice");
    enroll(&hsm, &alice, b"1234").await;
    let answer = start_login(&hsm, &alice, b"1234").await.unwrap();
    clock.advance(1_001);
    let (ke3, ..) = answer.ke3.unwrap();
    assert_eq!(
        hsm.recover_finish(&alice, &answer.login_id, &ke3)
            .await
            .err(),
        Some(HsmError::LoginUnknown)
    );
    assert_eq!(
        attempts(&hsm, &alice).await,
        RecordStatus::Active {
            attempts_left: 9,
            max_attempts: 10
        }
    );
}

#[tokio::test]
async fn a_swapped_account_cannot_finish_or_abort_anothers_login() {
    let (hsm, _) = hsm(10).await;
    let (alice, bob) = (account("alice"), account("bob"));
    enroll(&hsm, &alice, b"1234").await;
    enroll(&hsm, &bob, b"1234").await;
    let answer = start_login(&hsm, &alice, b"1234").await.unwrap();
    let (ke3, ..) = answer.ke3.unwrap();
    assert_eq!(
        hsm.recover_finish(&bob, &answer.login_id, &ke3).await.err(),
        Some(HsmError::LoginUnknown)
    );
    assert_eq!(
        hsm.recover_abort(&bob, &answer.login_id).await.err(),
        Some(HsmError::LoginUnknown)
    );
    // Alice's login is untouched by the attempt.
    assert!(hsm
        .recover_finish(&alice, &answer.login_id, &ke3)
        .await
        .is_ok());
}

#[tokio::test]
async fn same_pin_for_two_accounts_gives_unrelated_records() {
    let (hsm, _) = hsm(10).await;
    let (alice, bob) = (account("alice"), account("bob"));
    enroll(&hsm, &alice, b"1234").await;
    // Bob never enrolled: alice's PIN does not reach her record through his account.
    assert_eq!(
        start_login(&hsm, &bob, b"1234").await.err(),
        Some(HsmError::NotEnrolled)
    );
    assert_eq!(
        attempts(&hsm, &alice).await,
        RecordStatus::Active {
            attempts_left: 10,
            max_attempts: 10
        }
    );
}

#[tokio::test]
async fn malformed_messages_change_nothing() {
    let (hsm, _) = hsm(10).await;
    let alice = account("alice");
    enroll(&hsm, &alice, b"1234").await;
    for bad in [&[][..], &[0u8; 95][..], &[0xFF; 96][..], &[0u8; 4096][..]] {
        assert!(matches!(
            hsm.recover_start(&alice, bad).await,
            Err(HsmError::Malformed(_))
        ));
        assert!(matches!(
            hsm.enroll_start(&alice, bad).await,
            Err(HsmError::Malformed(_))
        ));
        assert!(matches!(
            hsm.enroll_finish(&alice, &[0; 16], bad, b"k", KSF).await,
            Err(HsmError::Malformed(_))
        ));
    }
    let answer = start_login(&hsm, &alice, b"1234").await.unwrap();
    assert!(matches!(
        hsm.recover_finish(&alice, &[1, 2, 3], &[0; 64]).await,
        Err(HsmError::Malformed(_))
    ));
    assert!(matches!(
        hsm.recover_finish(&alice, &answer.login_id, &[0; 10]).await,
        Err(HsmError::Malformed(_))
    ));
    // The login survived the malformed finish and still works.
    let (ke3, ..) = answer.ke3.unwrap();
    assert!(hsm
        .recover_finish(&alice, &answer.login_id, &ke3)
        .await
        .is_ok());
    assert_eq!(
        attempts(&hsm, &alice).await,
        RecordStatus::Active {
            attempts_left: 10,
            max_attempts: 10
        }
    );
}

#[tokio::test]
async fn oversized_wrapped_key_is_refused() {
    let (hsm, _) = hsm(10).await;
    let alice = account("alice");
    let (started, finish) = register(&hsm, &alice, b"1234").await;
    let upload = finish.message.serialize();
    assert!(matches!(
        hsm.enroll_finish(
            &alice,
            &started.registration_id,
            &upload,
            &vec![0; vault::MAX_WRAPPED_KEY_LEN + 1],
            KSF
        )
        .await,
        Err(HsmError::Malformed(_))
    ));
    assert_eq!(attempts(&hsm, &alice).await, RecordStatus::NotEnrolled);
}

#[tokio::test]
async fn re_enrollment_restores_budget_and_cancels_old_logins() {
    let (hsm, _) = hsm(10).await;
    let alice = account("alice");
    enroll(&hsm, &alice, b"1234").await;
    let old = start_login(&hsm, &alice, b"1234").await.unwrap();
    start_login(&hsm, &alice, b"0000").await.unwrap();
    enroll(&hsm, &alice, b"5678").await;
    assert_eq!(
        attempts(&hsm, &alice).await,
        RecordStatus::Active {
            attempts_left: 10,
            max_attempts: 10
        }
    );
    let (ke3, ..) = old.ke3.unwrap();
    assert_eq!(
        hsm.recover_finish(&alice, &old.login_id, &ke3).await.err(),
        Some(HsmError::LoginUnknown)
    );
    assert!(start_login(&hsm, &alice, b"5678")
        .await
        .unwrap()
        .ke3
        .is_some());
}

#[tokio::test]
async fn full_login_table_spends_no_guess() {
    let (hsm, clock) = hsm(10).await;
    let alice = account("alice");
    enroll(&hsm, &alice, b"1234").await;
    for _ in 0..4 {
        start_login(&hsm, &alice, b"1234").await.unwrap();
    }
    assert_eq!(
        start_login(&hsm, &alice, b"1234").await.err(),
        Some(HsmError::Busy)
    );
    assert_eq!(
        attempts(&hsm, &alice).await,
        RecordStatus::Active {
            attempts_left: 6,
            max_attempts: 10
        }
    );
    // Expired logins make room again.
    clock.advance(1_001);
    assert!(start_login(&hsm, &alice, b"1234").await.is_ok());
}

#[tokio::test]
async fn debug_output_reveals_no_secret() {
    let (hsm, _) = hsm(10).await;
    let text = format!("{hsm:?}");
    assert!(text.contains("(redacted)"));
}

// ---- fleets of several members ----

async fn join(leader: &Arc<FleetHsm>, joiner: &Arc<FleetHsm>) -> Result<(), HsmError> {
    let answer = leader.handle_join(&joiner.join_request()).await?;
    joiner.accept_join_answer(&answer)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

struct TestFleet {
    transport: Arc<LocalTransport>,
    members: Vec<(Arc<FleetHsm>, SimulatedClock)>,
}

impl TestFleet {
    async fn new(size: usize) -> TestFleet {
        let transport = Arc::new(LocalTransport::default());
        let mut members = vec![member(&transport, 100, "dc1", CODE).await];
        members[0].0.found(10).await.unwrap();
        for i in 2..=size {
            let joiner = member(&transport, 100 + i as u64, &format!("dc{i}"), CODE).await;
            join(&members[0].0, &joiner.0).await.unwrap();
            let j = joiner.0.clone();
            eventually("voter", || j.is_voter()).await;
            members.push(joiner);
        }
        TestFleet { transport, members }
    }

    fn hsm(&self, dc: &str) -> Arc<FleetHsm> {
        self.transport
            .members
            .lock()
            .unwrap()
            .get(dc)
            .cloned()
            .unwrap()
    }

    /// Cuts `dc` off the network and stops its Raft (a crash).
    async fn crash(&self, dc: &str) {
        let hsm = self.transport.members.lock().unwrap().remove(dc).unwrap();
        hsm.shutdown().await;
    }

    async fn leader(&self) -> Arc<FleetHsm> {
        find_leader(&self.transport).await
    }
}

/// The member that leads with a fresh majority, once there is one.
async fn find_leader(transport: &LocalTransport) -> Arc<FleetHsm> {
    for _ in 0..200 {
        let members: Vec<_> = transport
            .members
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        if let Some(leader) = members
            .into_iter()
            .find(|m| m.status().role == "leader" && m.check_leader().is_ok())
        {
            return leader;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no leader was elected");
}

#[tokio::test]
async fn members_share_the_fleet_key_and_replicate_records() {
    let fleet = TestFleet::new(3).await;
    let key = fleet.hsm("dc1").fleet_key().unwrap();
    for dc in ["dc2", "dc3"] {
        assert_eq!(fleet.hsm(dc).fleet_key(), Some(key));
    }
    let alice = account("alice");
    let leader = fleet.leader().await;
    enroll(&leader, &alice, b"1234").await;
    let followers = ["dc2", "dc3"];
    for dc in followers {
        let hsm = fleet.hsm(dc);
        eventually("replicated record", || hsm.status().records == 1).await;
    }
    let status = fleet.hsm("dc2").status();
    assert_eq!(status.members.iter().filter(|m| m.voter).count(), 3);
}

#[tokio::test]
async fn followers_refuse_vault_calls_and_name_the_leader() {
    let fleet = TestFleet::new(3).await;
    let alice = account("alice");
    let err = fleet.hsm("dc2").record_status(&alice).await.unwrap_err();
    assert_eq!(
        err,
        HsmError::NotLeader {
            leader_dc: Some("dc1".into())
        }
    );
}

#[tokio::test]
async fn losing_the_leader_keeps_enrollments_and_spent_guesses() {
    let fleet = TestFleet::new(3).await;
    let alice = account("alice");
    let leader = fleet.leader().await;
    enroll(&leader, &alice, b"1234").await;
    let wrong = start_login(&leader, &alice, b"0000").await.unwrap();
    assert_eq!(wrong.attempts_left, 9);
    fleet.crash(&leader.attestation().dc).await;
    let new_leader = fleet.leader().await;
    assert_ne!(
        new_leader.attestation().node_id,
        leader.attestation().node_id
    );
    assert_eq!(
        attempts(&new_leader, &alice).await,
        RecordStatus::Active {
            attempts_left: 9,
            max_attempts: 10
        }
    );
    let answer = start_login(&new_leader, &alice, b"1234").await.unwrap();
    assert_eq!(answer.attempts_left, 8);
    let (ke3, ..) = answer.ke3.unwrap();
    let released = new_leader
        .recover_finish(&alice, &answer.login_id, &ke3)
        .await
        .unwrap();
    assert_eq!(released.attempts_left, 10);
}

#[tokio::test]
async fn leader_change_between_ke2_and_ke3_fails_cleanly_and_the_guess_stays_spent() {
    let fleet = TestFleet::new(3).await;
    let alice = account("alice");
    let leader = fleet.leader().await;
    enroll(&leader, &alice, b"1234").await;
    let answer = start_login(&leader, &alice, b"1234").await.unwrap();
    fleet.crash(&leader.attestation().dc).await;
    let new_leader = fleet.leader().await;
    let (ke3, ..) = answer.ke3.unwrap();
    assert_eq!(
        new_leader
            .recover_finish(&alice, &answer.login_id, &ke3)
            .await
            .unwrap_err(),
        HsmError::LoginUnknown
    );
    assert_eq!(
        attempts(&new_leader, &alice).await,
        RecordStatus::Active {
            attempts_left: 9,
            max_attempts: 10
        }
    );
}

#[tokio::test]
async fn without_a_majority_nothing_is_committed_and_service_resumes_after() {
    let fleet = TestFleet::new(3).await;
    let alice = account("alice");
    let leader = fleet.hsm("dc1");
    enroll(&leader, &alice, b"1234").await;
    // Cut both followers off the network (they keep running).
    let cut: Vec<_> = ["dc2", "dc3"]
        .iter()
        .map(|dc| {
            (
                dc.to_string(),
                fleet.transport.members.lock().unwrap().remove(*dc).unwrap(),
            )
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(
        test_config().quorum_freshness_ms + 300,
    ))
    .await;
    assert!(matches!(
        start_login(&leader, &alice, b"1234").await.err(),
        Some(HsmError::Unavailable | HsmError::NotLeader { .. })
    ));
    for (dc, hsm) in cut {
        fleet.transport.members.lock().unwrap().insert(dc, hsm);
    }
    let leader = fleet.leader().await;
    assert_eq!(
        attempts(&leader, &alice).await,
        RecordStatus::Active {
            attempts_left: 10,
            max_attempts: 10
        },
        "the refused attempt spent nothing"
    );
    assert!(start_login(&leader, &alice, b"1234")
        .await
        .unwrap()
        .ke3
        .is_some());
}

#[tokio::test]
async fn an_enrollment_refused_for_want_of_a_majority_can_be_finished_later() {
    let fleet = TestFleet::new(3).await;
    let leader = fleet.hsm("dc1");
    let alice = account("alice");
    let (started, finish) = register(&leader, &alice, b"1234").await;
    let upload = finish.message.serialize();
    let cut: Vec<_> = ["dc2", "dc3"]
        .iter()
        .map(|dc| {
            (
                dc.to_string(),
                fleet.transport.members.lock().unwrap().remove(*dc).unwrap(),
            )
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(
        test_config().quorum_freshness_ms + 300,
    ))
    .await;
    let refused = leader
        .enroll_finish(&alice, &started.registration_id, &upload, b"wrapped", KSF)
        .await;
    assert!(
        matches!(
            refused,
            Err(HsmError::Unavailable | HsmError::NotLeader { .. })
        ),
        "{refused:?}"
    );
    for (dc, hsm) in cut {
        fleet.transport.members.lock().unwrap().insert(dc, hsm);
    }
    let leader = fleet.leader().await;
    let finished = leader
        .enroll_finish(&alice, &started.registration_id, &upload, b"wrapped", KSF)
        .await;
    if leader.attestation().dc == "dc1" {
        // Same leader: the registration survived the refused commit.
        finished.unwrap();
        assert_eq!(
            attempts(&leader, &alice).await,
            RecordStatus::Active {
                attempts_left: 10,
                max_attempts: 10
            }
        );
    } else {
        // A new leader never saw it: the client starts over (and the SDK does so itself).
        assert_eq!(finished.unwrap_err(), HsmError::LoginUnknown);
    }
}

#[tokio::test]
async fn restarted_member_replaces_the_silent_one_in_its_slot() {
    let fleet = TestFleet::new(3).await;
    let alice = account("alice");
    let leader = fleet.hsm("dc1");
    enroll(&leader, &alice, b"1234").await;
    let old = fleet.hsm("dc3").attestation().node_id;
    fleet.crash("dc3").await;
    // Too early: the leader heard from dc3 a moment ago.
    let (early, _) = member(&fleet.transport, 999, "dc3", CODE).await;
    assert!(matches!(
        join(&leader, &early).await,
        Err(HsmError::JoinRefused(_))
    ));
    fleet.members[0]
        .1
        .advance(test_config().member_silence_ms + 1);
    join(&leader, &early).await.unwrap();
    eventually("new member votes", || early.is_voter()).await;
    eventually("old member removed", || {
        leader.status().members.iter().all(|m| m.node_id != old)
    })
    .await;
    assert_eq!(early.fleet_key(), leader.fleet_key());
    eventually("caught up", || early.status().records == 1).await;
}

#[tokio::test]
async fn a_new_member_catches_up_from_a_snapshot_when_the_log_was_purged() {
    let transport = Arc::new(LocalTransport::default());
    let config = HsmConfig {
        snapshot_every: 10,
        ..test_config()
    };
    let start = |seed: u64, dc: &'static str| member_with(&transport, seed, dc, CODE, config);
    let (leader, clock) = start(300, "dc1").await;
    leader.found(10).await.unwrap();
    let (second, _) = start(301, "dc2").await;
    join(&leader, &second).await.unwrap();
    eventually("voter", || second.is_voter()).await;
    let users: Vec<AccountId> = (0..30).map(|i| account(&format!("user{i}"))).collect();
    for user in &users {
        enroll(&leader, user, b"1234").await;
    }
    // The log has been snapshotted and purged: a newcomer cannot replay it from the start.
    eventually("snapshot taken", || {
        leader.raft.metrics().borrow().snapshot.is_some()
    })
    .await;
    let purged = leader.raft.metrics().borrow().purged;
    assert!(purged.is_some(), "log purged after the snapshot");
    let (third, _) = start(302, "dc3").await;
    clock.advance(0);
    join(&leader, &third).await.unwrap();
    eventually("caught up", || third.status().records == 30).await;
    eventually("third votes", || third.is_voter()).await;
    assert_eq!(third.fleet_key(), leader.fleet_key());
    // The snapshot carried everything, including the records' secrets.
    let answer = start_login(&leader, &users[7], b"1234").await.unwrap();
    assert!(answer.ke3.is_some());
    fleet_crash_and_recover_from_third(&transport, &users[3]).await;
}

/// Crashes dc1 and dc2's peer link so that dc3 (snapshot-fed) must serve with dc2.
async fn fleet_crash_and_recover_from_third(transport: &Arc<LocalTransport>, user: &AccountId) {
    let dc1 = transport.members.lock().unwrap().remove("dc1").unwrap();
    dc1.shutdown().await;
    let leader = find_leader(transport).await;
    let answer = start_login(&leader, user, b"1234").await.unwrap();
    let (ke3, ..) = answer.ke3.unwrap();
    leader
        .recover_finish(user, &answer.login_id, &ke3)
        .await
        .unwrap();
}

#[tokio::test]
async fn enroll_start_is_no_pin_oracle_for_the_live_record() {
    // Each registration gets its own OPRF key: the same blinded PIN evaluates differently
    // every time, so a token holder cannot use enroll_start to test PINs against a KE2.
    let (hsm, _) = hsm(10).await;
    let alice = account("alice");
    enroll(&hsm, &alice, b"1234").await;
    let blinded = ClientRegistration::<Suite>::start(&mut OsRng, b"1234")
        .unwrap()
        .message
        .serialize();
    let first = hsm.enroll_start(&alice, &blinded).await.unwrap();
    let second = hsm.enroll_start(&alice, &blinded).await.unwrap();
    assert_ne!(first.registration_response, second.registration_response);
    assert_eq!(
        attempts(&hsm, &alice).await,
        RecordStatus::Active {
            attempts_left: 10,
            max_attempts: 10
        }
    );
}

#[tokio::test]
async fn enroll_finish_needs_its_own_registration() {
    let (hsm, _) = hsm(10).await;
    let (alice, bob) = (account("alice"), account("bob"));
    let (started, finish) = register(&hsm, &alice, b"1234").await;
    let upload = finish.message.serialize();
    // Another account cannot finish it, nor can an unknown id.
    assert_eq!(
        hsm.enroll_finish(&bob, &started.registration_id, &upload, b"wrapped", KSF)
            .await,
        Err(HsmError::LoginUnknown)
    );
    assert_eq!(
        hsm.enroll_finish(&alice, &[7; 16], &upload, b"wrapped", KSF)
            .await,
        Err(HsmError::LoginUnknown)
    );
    hsm.enroll_finish(&alice, &started.registration_id, &upload, b"wrapped", KSF)
        .await
        .unwrap();
    // Once only.
    assert_eq!(
        hsm.enroll_finish(&alice, &started.registration_id, &upload, b"wrapped", KSF)
            .await,
        Err(HsmError::LoginUnknown)
    );
}

#[tokio::test]
async fn a_live_slot_is_never_taken_over() {
    let fleet = TestFleet::new(2).await;
    let (impostor, _) = member(&Arc::new(LocalTransport::default()), 77, "dc2", CODE).await;
    let err = join(&fleet.hsm("dc1"), &impostor).await.unwrap_err();
    assert!(matches!(err, HsmError::JoinRefused(_)), "{err:?}");
    assert!(impostor.fleet_key().is_none(), "no fleet secret reached it");
}

#[tokio::test]
async fn member_running_other_code_is_refused() {
    let fleet = TestFleet::new(1).await;
    let (rogue, _) = member(&fleet.transport, 66, "dc2", [0xBA; 32]).await;
    let err = join(&fleet.hsm("dc1"), &rogue).await.unwrap_err();
    assert!(matches!(err, HsmError::JoinRefused(_)), "{err:?}");
    assert!(rogue.fleet_key().is_none());
    assert_eq!(fleet.hsm("dc1").status().members.len(), 1);
}

#[tokio::test]
async fn a_second_fleet_founded_alongside_has_its_own_keys_and_no_records() {
    let fleet = TestFleet::new(1).await;
    let alice = account("alice");
    enroll(&fleet.hsm("dc1"), &alice, b"1234").await;
    let (fork, _) = member(&Arc::new(LocalTransport::default()), 500, "dc1", CODE).await;
    fork.found(10).await.unwrap();
    assert_ne!(fork.fleet_key(), fleet.hsm("dc1").fleet_key());
    assert_eq!(
        start_login(&fork, &alice, b"1234").await.err(),
        Some(HsmError::NotEnrolled)
    );
}

// ---- every decoder refuses what it cannot parse, without panicking or changing state ----

mod malformed_input {
    use super::*;
    use proptest::prelude::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_bytes_never_panic_or_spend_a_guess(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            login_id in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let rt = runtime();
            rt.block_on(async {
                let (hsm, _) = hsm(10).await;
                let alice = account("alice");
                enroll(&hsm, &alice, b"1234").await;
                let _ = hsm.recover_start(&alice, &bytes).await;
                let _ = hsm.enroll_start(&alice, &bytes).await;
                let _ = hsm.enroll_finish(&alice, &login_id, &bytes, &bytes, KSF).await;
                let _ = hsm.recover_finish(&alice, &login_id, &bytes).await;
                let _ = hsm.recover_abort(&alice, &login_id).await;
                assert!(hsm.handle_peer(&bytes).await.is_err());
                assert!(hsm.handle_join(&bytes).await.is_err());
                assert!(hsm.accept_join_answer(&bytes).is_err());
                // Random bytes are (overwhelmingly) not a KE1: nothing was spent.
                let left = match attempts(&hsm, &alice).await {
                    RecordStatus::Active { attempts_left, .. } => attempts_left,
                    other => panic!("{other:?}"),
                };
                assert!(left >= 9, "random input spent guesses: {left}");
                hsm.shutdown().await;
            });
        }
    }
}

/// Recovers with the right PIN and opens the retire ticket the HSM released (without the
/// confirmation key that follows it).
async fn recover_ticket(hsm: &FleetHsm, who: &AccountId, pin: &[u8]) -> Vec<u8> {
    recover_release(hsm, who, pin).await[..vault::RETIRE_TICKET_LEN].to_vec()
}

/// The whole retire release: ticket, then confirmation key.
async fn recover_release(hsm: &FleetHsm, who: &AccountId, pin: &[u8]) -> Vec<u8> {
    let answer = start_login(hsm, who, pin).await.unwrap();
    let (ke3, session, _) = answer.ke3.expect("right PIN");
    let released = hsm
        .recover_finish(who, &answer.login_id, &ke3)
        .await
        .unwrap();
    seal::open(
        bkv_core::seal::LABEL_RETIRE_TICKET_RELEASE,
        &session,
        &release_context(&answer.login_id, who),
        &released.sealed_retire_ticket,
    )
    .unwrap()
    .to_vec()
}

#[tokio::test]
async fn a_retire_ticket_from_a_correct_pin_retires_that_enrollment_only() {
    let (hsm, _) = hsm(10).await;
    let alice = account("alice");
    let bob = account("bob");
    enroll(&hsm, &alice, b"1234").await;
    enroll(&hsm, &bob, b"1234").await;
    let ticket = recover_ticket(&hsm, &alice, b"1234").await;
    assert_eq!(ticket.len(), vault::RETIRE_TICKET_LEN);
    // Not for bob, not forged, not truncated.
    assert_eq!(hsm.retire(&bob, &ticket).await, Err(HsmError::LoginUnknown));
    let mut forged = ticket.clone();
    forged[20] ^= 1;
    assert_eq!(
        hsm.retire(&alice, &forged).await,
        Err(HsmError::LoginUnknown)
    );
    let mut other_generation = ticket.clone();
    other_generation[7] ^= 1;
    assert_eq!(
        hsm.retire(&alice, &other_generation).await,
        Err(HsmError::LoginUnknown)
    );
    assert!(matches!(
        hsm.retire(&alice, &ticket[..10]).await,
        Err(HsmError::Malformed(_))
    ));
    assert!(matches!(
        attempts(&hsm, &alice).await,
        RecordStatus::Active { .. }
    ));
    assert!(matches!(
        attempts(&hsm, &bob).await,
        RecordStatus::Active { .. }
    ));
    // The real one retires alice's record, and only hers, with a proof only the client
    // holding the confirmation key can check.
    let release = recover_release(&hsm, &bob, b"1234").await;
    let (bob_ticket, bob_confirm) = release.split_at(vault::RETIRE_TICKET_LEN);
    let proof = hsm.retire(&bob, bob_ticket).await.unwrap();
    let mut confirm_key = [0u8; 32];
    confirm_key.copy_from_slice(bob_confirm);
    let generation = u64::from_be_bytes(bob_ticket[..8].try_into().unwrap());
    assert_eq!(
        proof,
        bkv_core::seal::retire_confirmation(&confirm_key, &bob, generation)
    );
    assert_ne!(
        proof,
        bkv_core::seal::retire_confirmation(&[0u8; 32], &bob, generation)
    );
    enroll(&hsm, &bob, b"1234").await;
    hsm.retire(&alice, &ticket).await.unwrap();
    assert_eq!(attempts(&hsm, &alice).await, RecordStatus::Destroyed);
    assert!(matches!(
        attempts(&hsm, &bob).await,
        RecordStatus::Active { .. }
    ));
    // After a re-enrollment the old ticket is worthless.
    enroll(&hsm, &alice, b"9999").await;
    assert_eq!(
        hsm.retire(&alice, &ticket).await,
        Err(HsmError::LoginUnknown)
    );
    assert!(matches!(
        attempts(&hsm, &alice).await,
        RecordStatus::Active { .. }
    ));
}

#[tokio::test]
async fn a_ticket_from_another_fleet_retires_nothing() {
    let (one, _) = hsm(10).await;
    // Another seed: another fleet with its own secrets.
    let transport = Arc::new(LocalTransport::default());
    let (two, _) = member(&transport, 8, "dc1", CODE).await;
    two.found(10).await.unwrap();
    assert_ne!(one.fleet_key(), two.fleet_key());
    let alice = account("alice");
    enroll(&one, &alice, b"1234").await;
    enroll(&two, &alice, b"1234").await;
    let ticket = recover_ticket(&one, &alice, b"1234").await;
    assert_eq!(
        two.retire(&alice, &ticket).await,
        Err(HsmError::LoginUnknown)
    );
    assert!(matches!(
        attempts(&two, &alice).await,
        RecordStatus::Active { .. }
    ));
}

#[tokio::test]
async fn deployment_evidence_verifies_and_tampering_is_caught() {
    use bkv_core::bundle::{FleetEntry, Role};
    let fleet = TestFleet::new(3).await;
    let leader = fleet.leader().await;
    let evidence = leader.evidence().unwrap();
    assert_eq!(evidence.members.len(), 3);
    let entry = FleetEntry {
        id: evidence.ceremony.fleet_id.clone(),
        fleet_key: hex::encode(leader.fleet_key().unwrap()),
        role: Role::Active,
        evidence,
    };
    let root = crate::evidence::verify_evidence(&entry).unwrap();
    assert_eq!(hex::encode(root), entry.evidence.ceremony.founder.root);
    let mut other_id = entry.clone();
    other_id.id = "00".repeat(32);
    assert!(crate::evidence::verify_evidence(&other_id).is_err());
    let mut other_key = entry.clone();
    other_key.fleet_key = "00".repeat(32);
    assert!(crate::evidence::verify_evidence(&other_key).is_err());
    let mut more_guesses = entry.clone();
    more_guesses.evidence.ceremony.max_attempts += 1;
    assert!(crate::evidence::verify_evidence(&more_guesses).is_err());
    let mut rogue_member = entry.clone();
    rogue_member.evidence.members[1].measurement = "ee".repeat(32);
    assert!(crate::evidence::verify_evidence(&rogue_member).is_err());
    let mut swapped_ceremony_key = entry.clone();
    swapped_ceremony_key.evidence.ceremony.fleet_key = "00".repeat(32);
    swapped_ceremony_key.fleet_key = "00".repeat(32);
    assert!(crate::evidence::verify_evidence(&swapped_ceremony_key).is_err());
}

mod insider;

/// Found by bkv-sim (seeds 73 and 134 of five-member runs): a swap cut short in its joint
/// phase left the union of both halves as the base of the next swap, so a dead member
/// stayed a voter for good and two more losses stopped the fleet.
#[test]
fn a_swap_after_an_unfinished_one_builds_on_its_goal_not_the_union() {
    use std::collections::{BTreeMap, BTreeSet};
    let nodes: BTreeMap<u64, MemberNode> = [1, 2, 3, 4, 5, 6]
        .into_iter()
        .map(|id| {
            (
                id,
                MemberNode {
                    dc: format!("dc{id}"),
                },
            )
        })
        .collect();
    // dc2's old member (2) was being replaced by 6 when the leader lost office.
    let joint = openraft::Membership::new(
        vec![
            BTreeSet::from([1, 2, 3, 4, 5]),
            BTreeSet::from([1, 6, 3, 4, 5]),
        ],
        nodes.clone(),
    );
    // Now dc4's member (4) is replaced by 7: 2 must not come back.
    let voters = super::swapped_voters(&joint, &[4], 7);
    assert_eq!(voters, BTreeSet::from([1, 3, 5, 6, 7]));
    // A settled membership swaps as before.
    let settled = openraft::Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes);
    assert_eq!(
        super::swapped_voters(&settled, &[2], 8),
        BTreeSet::from([1, 3, 8])
    );
}

#[tokio::test]
async fn guesses_that_arrive_together_share_an_entry_and_each_gets_its_own_outcome() {
    let (hsm, _clock) = hsm(5).await;
    let users: Vec<AccountId> = (0..12).map(|n| account(&format!("u{n}"))).collect();
    for user in &users {
        enroll(&hsm, user, b"1234").await;
    }
    // alice starts with one guess already spent, so her outcome differs from the others'.
    start_login(&hsm, &users[0], b"0000").await.unwrap();
    let before = hsm.audit_view(0).applied_index;

    let mut logins = tokio::task::JoinSet::new();
    for (n, user) in users.iter().enumerate() {
        let (hsm, user) = (hsm.clone(), user.clone());
        logins.spawn(async move { (n, start_login(&hsm, &user, b"1234").await) });
    }
    while let Some(joined) = logins.join_next().await {
        let (n, login) = joined.unwrap();
        let login = login.unwrap();
        assert!(login.ke3.is_some());
        assert_eq!(login.attempts_left, if n == 0 { 3 } else { 4 }, "user {n}");
    }

    let view = hsm.audit_view(before + 1);
    let spends: Vec<usize> = view
        .entries
        .iter()
        .map(|e| e.changes.len())
        .filter(|&n| n > 0)
        .collect();
    assert_eq!(spends.iter().sum::<usize>(), users.len());
    assert!(
        spends.len() < users.len(),
        "every guess had an entry of its own: {spends:?}"
    );
}

#[tokio::test]
async fn snapshots_count_record_commands_not_raft_entries() {
    let config = HsmConfig {
        snapshot_every: 20,
        ..test_config()
    };
    let (hsm, _clock) = founded_with(400, config, 5).await;
    let users: Vec<AccountId> = (0..12).map(|n| account(&format!("s{n}"))).collect();
    for user in &users {
        enroll(&hsm, user, b"1234").await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        hsm.raft.metrics().borrow().snapshot.is_none(),
        "12 commands are fewer than 20"
    );
    // Twelve guesses at once: one batch, so few entries but 24 commands in all.
    let mut logins = tokio::task::JoinSet::new();
    for user in &users {
        let (hsm, user) = (hsm.clone(), user.clone());
        logins.spawn(async move { start_login(&hsm, &user, b"1234").await.unwrap() });
    }
    while logins.join_next().await.is_some() {}
    let entries = hsm.raft.metrics().borrow().last_log_index.unwrap_or(0);
    assert!(
        entries < 20,
        "the guesses shared entries: {entries} in the log"
    );
    eventually("snapshot taken", || {
        hsm.raft.metrics().borrow().snapshot.is_some()
    })
    .await;
}

#[tokio::test]
async fn catching_a_member_up_does_not_postpone_the_next_snapshot() {
    use openraft::storage::RaftStateMachine;
    let config = HsmConfig {
        snapshot_every: 20,
        ..test_config()
    };
    let (hsm, _clock) = founded_with(401, config, 5).await;
    let snapshot_index = || {
        hsm.raft
            .metrics()
            .borrow()
            .snapshot
            .map(|s| s.index)
            .unwrap_or(0)
    };
    let users: Vec<AccountId> = (0..40).map(|n| account(&format!("c{n}"))).collect();
    for user in &users[..20] {
        enroll(&hsm, user, b"1234").await;
    }
    eventually("first snapshot", || snapshot_index() > 0).await;
    let first = snapshot_index();
    for user in &users[20..32] {
        enroll(&hsm, user, b"1234").await;
    }
    // A copy for a member being caught up, made between two routine snapshots.
    let mut store = store::StateMachineStore::new(hsm.shared.clone(), 20);
    assert!(store.get_current_snapshot().await.unwrap().is_some());
    // 12 + 8 commands since the first snapshot: the second is due all the same.
    for user in &users[32..] {
        enroll(&hsm, user, b"1234").await;
    }
    eventually("second snapshot", || snapshot_index() > first).await;
}

#[test]
fn the_empty_bytes_of_a_built_snapshot_never_install_as_a_state() {
    // `build_snapshot` hands openraft metadata and no bytes (see store.rs): were they ever
    // installed, decoding must fail rather than give an empty table.
    assert!(postcard::from_bytes::<state::FleetState>(&[]).is_err());
}

#[tokio::test]
async fn a_leader_sends_no_heartbeat_while_entries_flow() {
    let fleet = TestFleet::new(3).await;
    let leader = fleet.leader().await;
    let followers: Vec<String> = ["dc1", "dc2", "dc3"]
        .into_iter()
        .filter(|dc| *dc != leader.attestation().dc)
        .map(String::from)
        .collect();
    fleet
        .transport
        .delay_ms
        .store(5, std::sync::atomic::Ordering::Relaxed);
    let before: Vec<usize> = followers
        .iter()
        .map(|dc| fleet.transport.calls_to(dc))
        .collect();
    let started = std::time::Instant::now();
    let commits = 100;
    for _ in 0..commits {
        leader
            .committer
            .commit(FleetCommand::Records(Vec::new()))
            .await
            .unwrap();
        // A client's round trip between its two steps: openraft's own heartbeat, sent
        // every 50 ms to a follower with nothing in flight, lands in most of these.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let periodic = (started.elapsed().as_millis() / 50) as usize;
    assert!(periodic >= 20, "the commits took too little time to tell");
    for (dc, before) in followers.iter().zip(before) {
        // Never fewer calls than entries: an entry goes to each follower.
        let extra = (fleet.transport.calls_to(dc) - before).saturating_sub(commits);
        assert!(
            extra * 3 < periodic,
            "{extra} calls to {dc} beside {commits} entries, in {periodic} heartbeat intervals"
        );
    }
}

#[tokio::test]
async fn an_idle_fleet_keeps_its_leader() {
    let fleet = TestFleet::new(3).await;
    let leader = fleet.leader().await;
    let term = leader.raft.metrics().borrow().current_term;
    // A follower that knows its leader waits its lease and an election timeout (600 to
    // 800 ms here) before it stands: an idle fleet without heartbeats would elect.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    for dc in ["dc1", "dc2", "dc3"] {
        let metrics = fleet.hsm(dc).raft.metrics().borrow().clone();
        assert_eq!(metrics.current_term, term, "{dc} saw an election");
    }
    leader.check_leader().unwrap();
}
