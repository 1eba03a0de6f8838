//! The wire contract against the real `bkv up`, as an insider or a careless client
//! would use it: bad tokens, malformed and oversized messages, replayed KE3s.

mod common;

use bkv_client::flow::{Ke2, Ke2Outcome, RecoveryStarted};
use bkv_client::{ClientConfig, Pin, TokenSource};
use bkv_core::v1::{self, vault_client::VaultClient, Reason};
use bkv_core::{AccountId, KsfParams};
use common::*;
use rand_core::OsRng;
use std::time::{SystemTime, UNIX_EPOCH};
use tonic::transport::Channel;
use tonic::{Code, Request};

struct Wire {
    grpc: VaultClient<Channel>,
    config: ClientConfig,
    tokens: TokenSource,
}

impl Wire {
    async fn connect(vault: &Vault) -> Wire {
        let config = ClientConfig::load(&vault.config()).unwrap();
        let tokens = TokenSource::from_config(&config).unwrap().unwrap();
        let grpc = VaultClient::connect(vault.url.clone())
            .await
            .unwrap()
            .max_decoding_message_size(1 << 22);
        Wire {
            grpc,
            config,
            tokens,
        }
    }

    fn with_token<T>(&self, token: &str, body: T) -> Request<T> {
        let mut request = Request::new(body);
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    }

    fn as_user<T>(&self, user: &str, body: T) -> Request<T> {
        let token = self.tokens.token_for(user).unwrap();
        self.with_token(&token, body)
    }

    async fn attempts_left(&mut self, user: &str) -> u32 {
        let request = self.as_user(user, v1::StatusRequest {});
        self.grpc
            .status(request)
            .await
            .unwrap()
            .into_inner()
            .attempts_left
    }

    fn pinned(&self) -> [u8; 32] {
        self.config.pinned_fleet_key().unwrap()
    }
}

fn reason(status: &tonic::Status) -> Reason {
    let detail = bkv_core::error_detail(status).expect("every vault error carries a detail");
    Reason::try_from(detail.reason).unwrap()
}

fn token(config: &ClientConfig, user: &str, aud: &str, exp_offset: i64, key: &[u8]) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = serde_json::json!({ "sub": user, "aud": aud, "exp": now + exp_offset, "tenant": config.tenant });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )
    .unwrap()
}

/// Runs recovery up to KE3 for `user`; returns (login id, KE3, proven state).
async fn login_to_ke3(
    wire: &mut Wire,
    user: &str,
    pin: &str,
) -> (Vec<u8>, bkv_client::flow::PinProven) {
    let account = AccountId::new(wire.config.tenant.clone(), user).unwrap();
    let (started, ke1) =
        RecoveryStarted::begin(&mut OsRng, account, Pin::new(pin.into()).unwrap()).unwrap();
    let request = wire.as_user(user, v1::RecoverStartRequest { ke1 });
    let answer = wire.grpc.recover_start(request).await.unwrap().into_inner();
    let ksf = answer.ksf.map(|k| KsfParams {
        memory_kib: k.memory_kib,
        iterations: k.iterations,
        parallelism: k.parallelism,
    });
    let outcome = started
        .on_ke2(
            &mut OsRng,
            Ke2 {
                ke2: &answer.ke2,
                fleet_key: &answer.fleet_key,
                ksf: ksf.unwrap(),
            },
            &wire.pinned(),
        )
        .unwrap();
    match outcome {
        Ke2Outcome::Proven(proven) => (answer.login_id, proven),
        Ke2Outcome::WrongPin => panic!("the right PIN opens KE2"),
    }
}

#[tokio::test]
async fn insider_replaying_ke3_gets_nothing() {
    let vault = Vault::start(&[]);
    vault.enroll("alice", &vault.device("phone"), "1234");
    let mut wire = Wire::connect(&vault).await;
    let (login_id, proven) = login_to_ke3(&mut wire, "alice", "1234").await;
    let finish = v1::RecoverFinishRequest {
        login_id: login_id.clone(),
        ke3: proven.ke3.clone(),
    };
    let first = wire
        .grpc
        .recover_finish(wire.as_user("alice", finish.clone()))
        .await
        .unwrap();
    assert!(!first.into_inner().sealed_wrapped_key.is_empty());
    let replay = wire
        .grpc
        .recover_finish(wire.as_user("alice", finish))
        .await
        .unwrap_err();
    assert_eq!(replay.code(), Code::FailedPrecondition);
    assert_eq!(reason(&replay), Reason::LoginUnknown);
}

#[tokio::test]
async fn frontend_swapping_users_cannot_finish_anothers_login() {
    let vault = Vault::start(&[]);
    vault.enroll("alice", &vault.device("a"), "1234");
    vault.enroll("bob", &vault.device("b"), "1234");
    let mut wire = Wire::connect(&vault).await;
    let (login_id, proven) = login_to_ke3(&mut wire, "alice", "1234").await;
    let finish = v1::RecoverFinishRequest {
        login_id: login_id.clone(),
        ke3: proven.ke3.clone(),
    };
    let swapped = wire
        .grpc
        .recover_finish(wire.as_user("bob", finish.clone()))
        .await
        .unwrap_err();
    assert_eq!(reason(&swapped), Reason::LoginUnknown);
    // Alice's own KE3 still works, and opens to her key.
    let released = wire
        .grpc
        .recover_finish(wire.as_user("alice", finish))
        .await
        .unwrap()
        .into_inner();
    let key = proven
        .open(&login_id, &released.sealed_wrapped_key)
        .unwrap();
    assert_eq!(
        key.as_bytes().as_slice(),
        std::fs::read(vault.device("a").join("backup.key")).unwrap()
    );
    assert_eq!(wire.attempts_left("bob").await, 10);
}

#[tokio::test]
async fn token_for_bob_never_touches_alices_record() {
    let vault = Vault::start(&[]);
    vault.enroll("alice", &vault.device("a"), "1234");
    let mut wire = Wire::connect(&vault).await;
    // Bob's token with a KE1 made from alice's PIN: his (empty) account answers.
    let account = AccountId::new(wire.config.tenant.clone(), "alice").unwrap();
    let (_, ke1) =
        RecoveryStarted::begin(&mut OsRng, account, Pin::new("1234".into()).unwrap()).unwrap();
    let err = wire
        .grpc
        .recover_start(wire.as_user("bob", v1::RecoverStartRequest { ke1 }))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), Reason::NotEnrolled);
    assert_eq!(wire.attempts_left("alice").await, 10);
}

#[tokio::test]
async fn bad_tokens_are_refused_and_spend_nothing() {
    let vault = Vault::start(&[]);
    vault.enroll("alice", &vault.device("a"), "1234");
    let mut wire = Wire::connect(&vault).await;
    let key = hex::decode(&wire.config.dev.as_ref().unwrap().token_key).unwrap();
    let aud = wire.config.audience.clone();
    let cases = [
        ("expired", token(&wire.config, "alice", &aud, -120, &key)),
        (
            "wrong audience",
            token(&wire.config, "alice", "another-vault", 300, &key),
        ),
        (
            "not signed by a trusted key",
            token(&wire.config, "alice", &aud, 300, &[9u8; 32]),
        ),
        ("not signed by a trusted key", "garbage".to_string()),
    ];
    let account = AccountId::new(wire.config.tenant.clone(), "alice").unwrap();
    for (needle, bad) in cases {
        let (_, ke1) = RecoveryStarted::begin(
            &mut OsRng,
            account.clone(),
            Pin::new("1234".into()).unwrap(),
        )
        .unwrap();
        let err = wire
            .grpc
            .recover_start(wire.with_token(&bad, v1::RecoverStartRequest { ke1 }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert_eq!(reason(&err), Reason::Unauthenticated);
        assert!(
            err.message().contains(needle),
            "{} lacks {needle}",
            err.message()
        );
    }
    let missing = wire
        .grpc
        .status(Request::new(v1::StatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert_eq!(wire.attempts_left("alice").await, 10);

    // The CLI reports a refused token as exit 1 with the reason.
    let token_file = vault.device("token.jwt");
    std::fs::write(&token_file, token(&wire.config, "alice", &aud, -120, &key)).unwrap();
    let out = vault.key(
        "status",
        "alice",
        &["--token-file", token_file.to_str().unwrap()],
        "",
    );
    assert_fails(&out, 1, "expired");
}

#[tokio::test]
async fn malformed_and_oversized_messages_change_nothing() {
    let vault = Vault::start(&[]);
    vault.enroll("alice", &vault.device("a"), "1234");
    let mut wire = Wire::connect(&vault).await;
    for ke1 in [vec![], vec![0u8; 95], vec![0xFF; 96], vec![1u8; 4000]] {
        let err = wire
            .grpc
            .recover_start(wire.as_user("alice", v1::RecoverStartRequest { ke1 }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(reason(&err), Reason::Malformed);
    }
    let err = wire
        .grpc
        .recover_finish(wire.as_user(
            "alice",
            v1::RecoverFinishRequest {
                login_id: vec![1; 3],
                ke3: vec![0; 64],
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), Reason::Malformed);
    let bad_ksf = v1::EnrollFinishRequest {
        registration_id: vec![0; 16],
        registration_upload: vec![0; 192],
        wrapped_key: vec![0; 72],
        ksf: Some(v1::KsfParams {
            memory_kib: 1 << 30,
            iterations: 1,
            parallelism: 1,
        }),
    };
    let err = wire
        .grpc
        .enroll_finish(wire.as_user("alice", bad_ksf))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), Reason::Malformed);
    // A message far beyond the limit is refused before it reaches the HSM.
    let huge = v1::RecoverStartRequest {
        ke1: vec![0; 1 << 20],
    };
    let err = wire
        .grpc
        .recover_start(wire.as_user("alice", huge))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::Internal
        ),
        "{err:?}"
    );
    assert_eq!(wire.attempts_left("alice").await, 10);
    // The vault still serves.
    assert_success(&vault.recover("alice", &vault.device("b"), "1234"));
}

#[tokio::test]
async fn insider_flooding_one_user_is_rate_limited_and_other_users_are_served() {
    let vault = Vault::start(&["--rate-limit", "on", "--datacenters", "3"]);
    vault.enroll("alice", &vault.device("alice"), "1234");
    vault.enroll("bob", &vault.device("bob"), "5678");
    let wire = Wire::connect(&vault).await;
    // Someone holding alice's token floods the vault with guesses and status calls.
    let account = AccountId::new(wire.config.tenant.clone(), "alice").unwrap();
    let mut calls = Vec::new();
    for i in 0..120 {
        let mut grpc = wire.grpc.clone();
        if i % 2 == 0 {
            let (_, ke1) = RecoveryStarted::begin(
                &mut OsRng,
                account.clone(),
                Pin::new("0000".into()).unwrap(),
            )
            .unwrap();
            let request = wire.as_user("alice", v1::RecoverStartRequest { ke1 });
            calls.push(tokio::spawn(async move {
                grpc.recover_start(request).await.map(|_| true)
            }));
        } else {
            let request = wire.as_user("alice", v1::StatusRequest {});
            calls.push(tokio::spawn(async move {
                grpc.status(request).await.map(|_| false)
            }));
        }
    }
    let (mut guesses, mut statuses, mut limited) = (0, 0, 0);
    let mut refusal = None;
    for call in calls {
        match call.await.unwrap() {
            Ok(true) => guesses += 1,
            Ok(false) => statuses += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(reason(&status), Reason::RateLimited);
                limited += 1;
                refusal = Some(status);
            }
        }
    }
    // Three guesses in a burst, thirty calls in all; the rest never reached the fleet.
    assert!(guesses <= 3, "{guesses} guesses got through");
    assert!(
        guesses + statuses <= 30,
        "{guesses} + {statuses} calls got through"
    );
    assert_eq!(guesses + statuses + limited, 120);
    // Meanwhile bob is served as usual.
    let out = vault.recover("bob", &vault.device("bob2"), "5678");
    assert_success(&out);
    // Only the guesses that got through were spent; the flood spent nothing else.
    std::thread::sleep(std::time::Duration::from_millis(3500));
    assert_eq!(vault.status("alice")["attempts_left"], 10 - guesses);
    // And the refusal is a clear, retryable error for the CLI (exit 5).
    let refusal = refusal.expect("the flood was refused");
    let error = bkv_client::ClientError::from_status(refusal);
    assert_eq!(error.exit_code(), 5);
    assert!(
        matches!(error, bkv_client::ClientError::RateLimited(_)),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("too many calls for this account"),
        "{error}"
    );
}
