use super::*;
use crate::platform::{SimulatedClock, SimulatedPlatform};
use bkv_core::seal::{release_context, LABEL_BACKUP_KEY_WRAP};
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
    argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(KSF.memory_kib, KSF.iterations, KSF.parallelism, None).unwrap(),
    )
}

fn hsm(max_attempts: u32) -> (Hsm<SimulatedPlatform>, SimulatedClock) {
    let (platform, clock) = SimulatedPlatform::new(7);
    let config = HsmConfig {
        max_attempts,
        login_deadline_ms: 1_000,
        max_pending_logins: 4,
    };
    (Hsm::found(platform, config), clock)
}

fn account(user: &str) -> AccountId {
    AccountId::new("test", user).unwrap()
}

const BACKUP_KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn enroll(hsm: &mut Hsm<SimulatedPlatform>, who: &AccountId, pin: &[u8]) {
    let start = ClientRegistration::<Suite>::start(&mut OsRng, pin).unwrap();
    let started = hsm.enroll_start(who, &start.message.serialize()).unwrap();
    let response = RegistrationResponse::deserialize(&started.registration_response).unwrap();
    let ksf = argon();
    let finish = start
        .state
        .finish(
            &mut OsRng,
            pin,
            response,
            ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&ksf)),
        )
        .unwrap();
    assert_eq!(finish.server_s_pk.serialize().as_slice(), &hsm.fleet_key());
    let wrapped = seal::seal(
        &mut OsRng,
        LABEL_BACKUP_KEY_WRAP,
        &finish.export_key,
        &who.credential_identifier(),
        BACKUP_KEY,
    );
    let budget = hsm
        .enroll_finish(who, &finish.message.serialize(), &wrapped, KSF)
        .unwrap();
    assert_eq!(budget, hsm.config().max_attempts);
}

/// A client that got KE2: either it has a KE3 (right PIN) or nothing (wrong PIN).
struct Ke2Answer {
    login_id: LoginId,
    attempts_left: u32,
    ke3: Option<(Vec<u8>, Vec<u8>, Vec<u8>)>, // (ke3, session key, export key)
}

fn start_login(
    hsm: &mut Hsm<SimulatedPlatform>,
    who: &AccountId,
    pin: &[u8],
) -> Result<Ke2Answer, HsmError> {
    let start = ClientLogin::<Suite>::start(&mut OsRng, pin).unwrap();
    let started = hsm.recover_start(who, &start.message.serialize())?;
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

fn attempts(hsm: &mut Hsm<SimulatedPlatform>, who: &AccountId) -> RecordStatus {
    hsm.status(who)
}

#[test]
fn enroll_then_recover_releases_the_wrapped_key() {
    let (mut hsm, _) = hsm(10);
    let alice = account("alice");
    enroll(&mut hsm, &alice, b"1234");
    let answer = start_login(&mut hsm, &alice, b"1234").unwrap();
    assert_eq!(answer.attempts_left, 9);
    let (ke3, session, export) = answer.ke3.expect("right PIN opens KE2");
    let released = hsm.recover_finish(&alice, &answer.login_id, &ke3).unwrap();
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

#[test]
fn guess_is_committed_before_ke2_leaves() {
    let (mut hsm, _) = hsm(10);
    let alice = account("alice");
    enroll(&mut hsm, &alice, b"1234");
    // The client walks away after KE2: the guess is spent all the same.
    let answer = start_login(&mut hsm, &alice, b"1234").unwrap();
    assert!(answer.ke3.is_some());
    assert_eq!(
        attempts(&mut hsm, &alice),
        RecordStatus::Active {
            attempts_left: 9,
            max_attempts: 10
        }
    );
}

#[test]
fn wrong_pins_count_down_to_destruction() {
    let (mut hsm, _) = hsm(3);
    let alice = account("alice");
    enroll(&mut hsm, &alice, b"1234");
    for expected in [2, 1, 0] {
        let answer = start_login(&mut hsm, &alice, b"0000").unwrap();
        assert!(answer.ke3.is_none(), "a wrong PIN cannot open KE2");
        assert_eq!(answer.attempts_left, expected);
        let destroyed = hsm.recover_abort(&alice, &answer.login_id).unwrap();
        assert_eq!(destroyed, expected == 0);
    }
    assert_eq!(attempts(&mut hsm, &alice), RecordStatus::Destroyed);
    // Even the right PIN gets nothing now.
    assert_eq!(
        start_login(&mut hsm, &alice, b"1234").err(),
        Some(HsmError::Destroyed)
    );
}

#[test]
fn exhausted_record_is_destroyed_by_the_next_attempt_even_without_abort() {
    let (mut hsm, clock) = hsm(1);
    let alice = account("alice");
    enroll(&mut hsm, &alice, b"1234");
    let answer = start_login(&mut hsm, &alice, b"0000").unwrap();
    assert_eq!(answer.attempts_left, 0);
    // Another attempt while the last login is in flight destroys the record.
    assert_eq!(
        start_login(&mut hsm, &alice, b"1234").err(),
        Some(HsmError::Destroyed)
    );
    clock.advance(2_000);
    assert_eq!(attempts(&mut hsm, &alice), RecordStatus::Destroyed);
}

#[test]
fn exhausted_record_with_no_login_in_flight_is_destroyed_on_status() {
    let (mut hsm, clock) = hsm(1);
    let alice = account("alice");
    enroll(&mut hsm, &alice, b"1234");
    start_login(&mut hsm, &alice, b"0000").unwrap();
    // While the login may still finish, the record stays.
    assert_eq!(
        attempts(&mut hsm, &alice),
        RecordStatus::Active {
            attempts_left: 0,
            max_attempts: 1
        }
    );
    clock.advance(1_001);
    assert_eq!(attempts(&mut hsm, &alice), RecordStatus::Destroyed);
}

#[test]
fn right_pin_on_the_last_guess_restores_the_budget() {
    let (mut hsm, _) = hsm(2);
    let alice = account("alice");
    enroll(&mut hsm, &alice, b"1234");
    let wrong = start_login(&mut hsm, &alice, b"9999").unwrap();
    hsm.recover_abort(&alice, &wrong.login_id).unwrap();
    let answer = start_login(&mut hsm, &alice, b"1234").unwrap();
    assert_eq!(answer.attempts_left, 0);
    let (ke3, ..) = answer.ke3.unwrap();
    assert_eq!(
        hsm.recover_finish(&alice, &answer.login_id, &ke3)
            .unwrap()
            .attempts_left,
        2
    );
}

#[test]
fn insider_replaying_ke3_gets_nothing() {
    let (mut hsm, _) = hsm(10);
    let alice = account("alice");
    enroll(&mut hsm, &alice, b"1234");
    let answer = start_login(&mut hsm, &alice, b"1234").unwrap();
    let (ke3, ..) = answer.ke3.unwrap();
    hsm.recover_finish(&alice, &answer.login_id, &ke3).unwrap();
    assert_eq!(
        hsm.recover_finish(&alice, &answer.login_id, &ke3).err(),
        Some(HsmError::LoginUnknown)
    );
}

#[test]
fn ke3_for_another_login_fails_and_the_guess_stays_spent() {
    let (mut hsm, _) = hsm(10);
    let alice = account("alice");
    enroll(&mut hsm, &alice, b"1234");
    let first = start_login(&mut hsm, &alice, b"1234").unwrap();
    let second = start_login(&mut hsm, &alice, b"1234").unwrap();
    let (ke3_first, ..) = first.ke3.unwrap();
    assert_eq!(
        hsm.recover_finish(&alice, &second.login_id, &ke3_first)
            .err(),
        Some(HsmError::LoginFailed { attempts_left: 8 })
    );
    assert_eq!(
        attempts(&mut hsm, &alice),
        RecordStatus::Active {
            attempts_left: 8,
            max_attempts: 10
        }
    );
}

#[test]
fn late_ke3_is_refused() {
    let (mut hsm, clock) = hsm(10);
    let alice = account("alice");
    enroll(&mut hsm, &alice, b"1234");
    let answer = start_login(&mut hsm, &alice, b"1234").unwrap();
    clock.advance(1_001);
    let (ke3, ..) = answer.ke3.unwrap();
    assert_eq!(
        hsm.recover_finish(&alice, &answer.login_id, &ke3).err(),
        Some(HsmError::LoginUnknown)
    );
    assert_eq!(
        attempts(&mut hsm, &alice),
        RecordStatus::Active {
            attempts_left: 9,
            max_attempts: 10
        }
    );
}

#[test]
fn a_swapped_account_cannot_finish_or_abort_anothers_login() {
    let (mut hsm, _) = hsm(10);
    let (alice, bob) = (account("alice"), account("bob"));
    enroll(&mut hsm, &alice, b"1234");
    enroll(&mut hsm, &bob, b"1234");
    let answer = start_login(&mut hsm, &alice, b"1234").unwrap();
    let (ke3, ..) = answer.ke3.unwrap();
    assert_eq!(
        hsm.recover_finish(&bob, &answer.login_id, &ke3).err(),
        Some(HsmError::LoginUnknown)
    );
    assert_eq!(
        hsm.recover_abort(&bob, &answer.login_id).err(),
        Some(HsmError::LoginUnknown)
    );
    // Alice's login is untouched by the attempt.
    assert!(hsm.recover_finish(&alice, &answer.login_id, &ke3).is_ok());
}

#[test]
fn same_pin_for_two_accounts_gives_unrelated_records() {
    let (mut hsm, _) = hsm(10);
    let (alice, bob) = (account("alice"), account("bob"));
    enroll(&mut hsm, &alice, b"1234");
    // Bob never enrolled: alice's PIN does not reach her record through his account.
    assert_eq!(
        start_login(&mut hsm, &bob, b"1234").err(),
        Some(HsmError::NotEnrolled)
    );
    assert_eq!(
        attempts(&mut hsm, &alice),
        RecordStatus::Active {
            attempts_left: 10,
            max_attempts: 10
        }
    );
}

#[test]
fn malformed_messages_change_nothing() {
    let (mut hsm, _) = hsm(10);
    let alice = account("alice");
    enroll(&mut hsm, &alice, b"1234");
    for bad in [&[][..], &[0u8; 95][..], &[0xFF; 96][..], &[0u8; 4096][..]] {
        assert!(matches!(
            hsm.recover_start(&alice, bad),
            Err(HsmError::Malformed(_))
        ));
        assert!(matches!(
            hsm.enroll_start(&alice, bad),
            Err(HsmError::Malformed(_))
        ));
        assert!(matches!(
            hsm.enroll_finish(&alice, bad, b"k", KSF),
            Err(HsmError::Malformed(_))
        ));
    }
    let answer = start_login(&mut hsm, &alice, b"1234").unwrap();
    assert!(matches!(
        hsm.recover_finish(&alice, &[1, 2, 3], &[0; 64]),
        Err(HsmError::Malformed(_))
    ));
    assert!(matches!(
        hsm.recover_finish(&alice, &answer.login_id, &[0; 10]),
        Err(HsmError::Malformed(_))
    ));
    // The login survived the malformed finish and still works.
    let (ke3, ..) = answer.ke3.unwrap();
    assert!(hsm.recover_finish(&alice, &answer.login_id, &ke3).is_ok());
    assert_eq!(
        attempts(&mut hsm, &alice),
        RecordStatus::Active {
            attempts_left: 10,
            max_attempts: 10
        }
    );
}

#[test]
fn oversized_wrapped_key_is_refused() {
    let (mut hsm, _) = hsm(10);
    let alice = account("alice");
    let start = ClientRegistration::<Suite>::start(&mut OsRng, b"1234").unwrap();
    let started = hsm
        .enroll_start(&alice, &start.message.serialize())
        .unwrap();
    let ksf = argon();
    let finish = start
        .state
        .finish(
            &mut OsRng,
            b"1234",
            RegistrationResponse::deserialize(&started.registration_response).unwrap(),
            ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&ksf)),
        )
        .unwrap();
    let upload = finish.message.serialize();
    assert!(matches!(
        hsm.enroll_finish(&alice, &upload, &vec![0; MAX_WRAPPED_KEY_LEN + 1], KSF),
        Err(HsmError::Malformed(_))
    ));
    assert_eq!(attempts(&mut hsm, &alice), RecordStatus::NotEnrolled);
}

#[test]
fn re_enrollment_restores_budget_and_cancels_old_logins() {
    let (mut hsm, _) = hsm(10);
    let alice = account("alice");
    enroll(&mut hsm, &alice, b"1234");
    let old = start_login(&mut hsm, &alice, b"1234").unwrap();
    start_login(&mut hsm, &alice, b"0000").unwrap();
    enroll(&mut hsm, &alice, b"5678");
    assert_eq!(
        attempts(&mut hsm, &alice),
        RecordStatus::Active {
            attempts_left: 10,
            max_attempts: 10
        }
    );
    let (ke3, ..) = old.ke3.unwrap();
    assert_eq!(
        hsm.recover_finish(&alice, &old.login_id, &ke3).err(),
        Some(HsmError::LoginUnknown)
    );
    assert!(start_login(&mut hsm, &alice, b"5678")
        .unwrap()
        .ke3
        .is_some());
}

#[test]
fn full_login_table_spends_no_guess() {
    let (mut hsm, clock) = hsm(10);
    let alice = account("alice");
    enroll(&mut hsm, &alice, b"1234");
    for _ in 0..4 {
        start_login(&mut hsm, &alice, b"1234").unwrap();
    }
    assert_eq!(
        start_login(&mut hsm, &alice, b"1234").err(),
        Some(HsmError::Busy)
    );
    assert_eq!(
        attempts(&mut hsm, &alice),
        RecordStatus::Active {
            attempts_left: 6,
            max_attempts: 10
        }
    );
    // Expired logins make room again.
    clock.advance(1_001);
    assert!(start_login(&mut hsm, &alice, b"1234").is_ok());
}

#[test]
fn debug_output_reveals_no_secret() {
    let (hsm, _) = hsm(10);
    let text = format!("{hsm:?}");
    assert!(text.contains("(redacted)"));
}
