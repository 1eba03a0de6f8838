//! The insider who controls every host: replays what it captured and rolls back what
//! the hosts could store, and still gets no guess the fleet did not count.

use super::*;

fn client_finish(
    state: ClientLogin<Suite>,
    pin: &[u8],
    ke2: &[u8],
) -> Result<opaque_ke::ClientLoginFinishResult<Suite>, opaque_ke::errors::ProtocolError> {
    let ksf = argon();
    state.finish(
        &mut OsRng,
        pin,
        CredentialResponse::deserialize(ke2).unwrap(),
        ClientLoginFinishParameters::new(None, Identifiers::default(), Some(&ksf)),
    )
}

fn copy(state: &ClientLogin<Suite>) -> ClientLogin<Suite> {
    ClientLogin::deserialize(&state.serialize()).unwrap()
}

#[tokio::test]
async fn replaying_ke1_ke2_pair_gives_no_free_guess() {
    let (hsm, _) = hsm(10).await;
    let alice = account("alice");
    enroll(&hsm, &alice, b"1234").await;
    // The insider captures a KE1 on its way to the HSM and the KE2 on its way back.
    let client = ClientLogin::<Suite>::start(&mut OsRng, b"1234").unwrap();
    let ke1 = client.message.serialize();
    let first = hsm.recover_start(&alice, &ke1).await.unwrap();
    assert_eq!(first.attempts_left, 9);

    // Replaying the KE1 gets an answer only by spending another guess: no cached KE2.
    let replayed = hsm.recover_start(&alice, &ke1).await.unwrap();
    assert_eq!(
        replayed.attempts_left, 8,
        "a replayed KE1 must cost a guess"
    );
    assert_ne!(first.ke2, replayed.ke2, "each KE2 is fresh");
    assert_eq!(
        attempts(&hsm, &alice).await,
        RecordStatus::Active {
            attempts_left: 8,
            max_attempts: 10
        }
    );

    // The captured KE2 tests no other guess: it is bound to the blinded PIN of its own
    // KE1, so a client with a new KE1 cannot open it, not even with the right PIN.
    for pin in [&b"0000"[..], &b"1234"[..]] {
        let other = ClientLogin::<Suite>::start(&mut OsRng, pin).unwrap();
        assert!(
            client_finish(other.state, pin, &first.ke2).is_err(),
            "a captured KE2 must not test PIN {pin:?} for free"
        );
    }

    // The pair cannot be mixed: the KE3 for the first KE2 does not finish the replay's
    // login (the guess stays spent), and the replayed KE2 answers the same blinded PIN,
    // so it tests nothing the first did not.
    let ke3_first = client_finish(copy(&client.state), b"1234", &first.ke2)
        .unwrap()
        .message
        .serialize();
    assert_eq!(
        hsm.recover_finish(&alice, &replayed.login_id, &ke3_first)
            .await
            .unwrap_err(),
        HsmError::LoginFailed { attempts_left: 8 }
    );
    assert!(client_finish(copy(&client.state), b"0000", &replayed.ke2).is_err());
    assert_eq!(
        attempts(&hsm, &alice).await,
        RecordStatus::Active {
            attempts_left: 8,
            max_attempts: 10
        }
    );

    // A captured KE2 replayed later, after the budget ran out, opens nothing new either:
    // the record is gone and the HSM gives no more KE2.
    for _ in 0..8 {
        let wrong = start_login(&hsm, &alice, b"0000").await.unwrap();
        hsm.recover_abort(&alice, &wrong.login_id).await.unwrap();
    }
    assert_eq!(attempts(&hsm, &alice).await, RecordStatus::Destroyed);
    assert_eq!(
        hsm.recover_start(&alice, &ke1).await.unwrap_err(),
        HsmError::Destroyed
    );
}

/// The hosts of a fleet: they carry every peer message, and the insider keeps a copy of
/// each (what a host could store on its disk).
#[derive(Default)]
struct RecordingHosts {
    network: LocalTransport,
    tape: Mutex<Vec<(String, Vec<u8>)>>,
}

impl PeerTransport for RecordingHosts {
    fn call(&self, dc: &str, message: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, TransportError>> {
        self.tape
            .lock()
            .unwrap()
            .push((dc.to_string(), message.clone()));
        self.network.call(dc, message)
    }
}

async fn recorded_member(
    hosts: &Arc<RecordingHosts>,
    seed: u64,
    dc: &str,
) -> (Arc<FleetHsm>, SimulatedClock) {
    let (platform, clock) = SimulatedPlatform::new(seed, CODE);
    let hsm = FleetHsm::start(Arc::new(platform), dc, test_config(), hosts.clone())
        .await
        .unwrap();
    hosts
        .network
        .members
        .lock()
        .unwrap()
        .insert(dc.to_string(), hsm.clone());
    (hsm, clock)
}

/// Whether a KE2 any member would give now leaves more than `most` guesses.
async fn no_member_grants_more_than(hosts: &RecordingHosts, who: &AccountId, most: u32) {
    let members: Vec<_> = hosts
        .network
        .members
        .lock()
        .unwrap()
        .values()
        .cloned()
        .collect();
    for member in members {
        let dc = member.attestation().dc.clone();
        if let Ok(answer) = start_login(&member, who, b"0000").await {
            assert!(
                answer.attempts_left < most,
                "{dc} gave a KE2 leaving {} guesses after the rollback; at most {} were left",
                answer.attempts_left,
                most
            );
            member.recover_abort(who, &answer.login_id).await.unwrap();
        }
    }
}

#[tokio::test]
async fn host_state_rollback_is_refused() {
    let hosts = Arc::new(RecordingHosts::default());
    let (dc1, dc1_clock) = recorded_member(&hosts, 700, "dc1").await;
    dc1.found(10).await.unwrap();
    let mut join_answers = Vec::new();
    for (seed, dc) in [(701, "dc2"), (702, "dc3")] {
        let (joiner, _) = recorded_member(&hosts, seed, dc).await;
        let answer = dc1.handle_join(&joiner.join_request()).await.unwrap();
        joiner.accept_join_answer(&answer).unwrap();
        join_answers.push((joiner.join_request(), answer));
        eventually("voter", || joiner.is_voter()).await;
    }
    let alice = account("alice");
    enroll(&dc1, &alice, b"1234").await;
    // Everything so far (the record with a full budget) is on the insider's tape.
    let full_budget_tape: Vec<_> = hosts.tape.lock().unwrap().clone();
    for _ in 0..3 {
        let wrong = start_login(&dc1, &alice, b"0000").await.unwrap();
        dc1.recover_abort(&alice, &wrong.login_id).await.unwrap();
    }
    let spent = RecordStatus::Active {
        attempts_left: 7,
        max_attempts: 10,
    };
    assert_eq!(attempts(&dc1, &alice).await, spent);
    let old_dc3 = hosts.network.members.lock().unwrap()["dc3"]
        .attestation()
        .clone();

    // 1. Re-feed every recorded peer message to every live member: all refused.
    let whole_tape: Vec<_> = hosts.tape.lock().unwrap().clone();
    let members: Vec<_> = hosts
        .network
        .members
        .lock()
        .unwrap()
        .values()
        .cloned()
        .collect();
    for member in &members {
        for (_, message) in &whole_tape {
            assert!(
                member.handle_peer(message).await.is_err(),
                "{} accepted a replayed peer message",
                member.attestation().dc
            );
        }
    }
    assert_eq!(attempts(&dc1, &alice).await, spent);

    // 2. Crash dc3 (its HSM memory is gone) and start a fresh HSM there; the insider
    // tries to restore it from what its host stored: the old join answer and the peer
    // messages that carried the full-budget record.
    let dead = hosts.network.members.lock().unwrap().remove("dc3").unwrap();
    dead.shutdown().await;
    let (fresh, _) = recorded_member(&hosts, 703, "dc3").await;
    for (_, answer) in &join_answers {
        assert!(
            fresh.accept_join_answer(answer).is_err(),
            "a join answer sealed to another HSM opened"
        );
    }
    for (_, message) in &full_budget_tape {
        assert!(fresh.handle_peer(message).await.is_err());
    }
    assert!(
        fresh.fleet_key().is_none(),
        "no fleet secret from old bytes"
    );
    assert_eq!(fresh.status().records, 0, "no records from old bytes");
    assert!(matches!(
        fresh.recover_start(&alice, &[0; 96]).await,
        Err(HsmError::Malformed(_) | HsmError::NotReady | HsmError::NotLeader { .. })
    ));
    // The dead member's own join request, replayed to the leader, admits nothing the
    // insider can open: the answer is sealed to the dead HSM's key.
    let replayed_request = postcard::to_allocvec(&JoinRequest {
        attestation: old_dc3,
    })
    .unwrap();
    if let Ok(answer) = dc1.handle_join(&replayed_request).await {
        assert!(fresh.accept_join_answer(&answer).is_err());
    }

    // 3. The fresh member joins for real and is caught up with the spent guesses.
    dc1_clock.advance(test_config().member_silence_ms + 1);
    let answer = loop {
        match dc1.handle_join(&fresh.join_request()).await {
            Ok(answer) => break answer,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    };
    fresh.accept_join_answer(&answer).unwrap();
    eventually("fresh member votes", || fresh.is_voter()).await;
    eventually("caught up", || fresh.status().records == 1).await;

    // 4. Nothing the insider replayed restored a guess: whoever leads, and whoever
    // answers, the next KE2 leaves fewer than 7 guesses.
    let old_leader = hosts.network.members.lock().unwrap().remove("dc1").unwrap();
    old_leader.shutdown().await;
    let leader = find_leader(&hosts.network).await;
    assert_eq!(attempts(&leader, &alice).await, spent);
    no_member_grants_more_than(&hosts, &alice, 7).await;
}
