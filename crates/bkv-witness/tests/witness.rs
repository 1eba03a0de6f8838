//! The witness end to end over HTTP: signatures `plexi-core` accepts, an append-only log
//! that survives restarts, refusals, and keys held in a PKCS#11 token (SoftHSMv2).

use bkv_core::bundle::{
    artifact_digest, submit_message, Artifact, BundleKeys, Ceremony, Evidence, FleetEntry, Role,
    ARTIFACT_VERSION,
};
use bkv_witness::publish::publish;
use bkv_witness::server::Submission;
use bkv_witness::{open_witness, Signer, SignerConfig, WitnessClient, WitnessConfig, WitnessError};
use std::path::Path;
use std::process::Command;

const NAMESPACE: &str = "bkv-test/fleet-keys";

fn artifact(keys: &[(&str, Role)]) -> Artifact {
    let attestation = bkv_core::bundle::AttestationEvidence {
        dc: "dc1".into(),
        node_id: 1,
        channel_key: "01".repeat(32),
        measurement: "02".repeat(32),
        root: "03".repeat(32),
        signature: "04".repeat(64),
    };
    Artifact {
        version: ARTIFACT_VERSION,
        namespace: NAMESPACE.into(),
        fleets: keys
            .iter()
            .map(|(key, role)| FleetEntry {
                id: "05".repeat(32),
                fleet_key: key.to_string(),
                role: *role,
                evidence: Evidence {
                    measurement: "02".repeat(32),
                    ceremony: Ceremony {
                        fleet_id: "05".repeat(32),
                        fleet_key: key.to_string(),
                        max_attempts: 10,
                        approved_measurements: vec!["02".repeat(32)],
                        founder: attestation.clone(),
                        signature: "06".repeat(64),
                    },
                    members: vec![attestation.clone()],
                },
            })
            .collect(),
    }
}

struct Running {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn start(dir: &Path, signer: SignerConfig, operator_key: [u8; 32]) -> Running {
    let config = WitnessConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        namespace: NAMESPACE.into(),
        log: "witness.redb".into(),
        operator_key: hex::encode(operator_key),
        signer,
    };
    let path = dir.join("witness.toml");
    let witness = open_witness(&config, &path).unwrap();
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(bkv_witness::serve(listener, witness, async move {
        let _ = rx.await;
    }));
    Running {
        url,
        stop: Some(tx),
        task,
    }
}

fn file_signer(dir: &Path, name: &str) -> (SignerConfig, Signer) {
    let config = SignerConfig::File { path: name.into() };
    let signer = Signer::generate(&config, dir).unwrap();
    (config, signer)
}

const FLEET_A: &str = "aa00000000000000000000000000000000000000000000000000000000000001";
const FLEET_B: &str = "bb00000000000000000000000000000000000000000000000000000000000002";

#[tokio::test]
async fn plexi_core_verifies_our_witness_signatures() {
    let dir = tempfile::tempdir().unwrap();
    let (witness_config, witness_signer) = file_signer(dir.path(), "witness.key");
    let (_, operator) = file_signer(dir.path(), "operator.key");
    let witness_key = witness_signer.public_key();
    drop(witness_signer);
    let running = start(dir.path(), witness_config, operator.public_key()).await;
    let client = WitnessClient::new(&running.url).unwrap();
    for (epoch, fleets) in [
        (1, vec![(FLEET_A, Role::Active)]),
        (
            2,
            vec![(FLEET_A, Role::RecoverOnly), (FLEET_B, Role::Active)],
        ),
    ] {
        let published = publish(&client, &witness_key, &operator, &artifact(&fleets))
            .await
            .unwrap();
        assert!(published.new_epoch);
        assert_eq!(published.bundle.witness.epoch, epoch);
        // Cloudflare's own type reads our JSON and verifies our signature.
        let json = serde_json::to_string(&published.bundle.witness).unwrap();
        let response: plexi_core::SignatureResponse = serde_json::from_str(&json).unwrap();
        response
            .verify(&witness_key)
            .expect("plexi-core verifies the witness signature");
        assert_eq!(u64::from(response.epoch()), epoch);
        assert_eq!(response.namespace(), NAMESPACE);
        assert_eq!(
            response.digest(),
            artifact_digest(&published.bundle.artifact).to_vec()
        );
        assert_eq!(response.key_id(), Some(witness_key[31]));
        // And its message encoding is byte for byte ours.
        let message: plexi_core::SignatureMessage = response.clone().into();
        assert_eq!(
            message.to_vec().unwrap(),
            published.bundle.witness.message()
        );
        // A tampered digest fails under plexi-core too.
        let mut tampered: serde_json::Value = serde_json::from_str(&json).unwrap();
        tampered["digest"] = hex::encode([0u8; 32]).into();
        let tampered: plexi_core::SignatureResponse = serde_json::from_value(tampered).unwrap();
        assert!(tampered.verify(&witness_key).is_err());
    }
    // Publishing the same artifact again signs nothing new.
    let again = publish(
        &client,
        &witness_key,
        &operator,
        &artifact(&[(FLEET_A, Role::RecoverOnly), (FLEET_B, Role::Active)]),
    )
    .await
    .unwrap();
    assert!(!again.new_epoch);
    assert_eq!(again.bundle.witness.epoch, 2);
    running.stop().await;
}

#[tokio::test]
async fn the_witness_signs_only_what_extends_its_log_for_its_operator() {
    let dir = tempfile::tempdir().unwrap();
    let (witness_config, witness_signer) = file_signer(dir.path(), "witness.key");
    let (_, operator) = file_signer(dir.path(), "operator.key");
    let (_, stranger) = file_signer(dir.path(), "stranger.key");
    let witness_key = witness_signer.public_key();
    let running = start(dir.path(), witness_config, operator.public_key()).await;
    let client = WitnessClient::new(&running.url).unwrap();
    publish(
        &client,
        &witness_key,
        &operator,
        &artifact(&[(FLEET_A, Role::Active)]),
    )
    .await
    .unwrap();

    let submission = |signer: &Signer, epoch: u64, a: &Artifact| {
        let text = a.to_json();
        let digest = artifact_digest(&text);
        Submission {
            epoch,
            operator_request_signature: hex::encode(
                signer
                    .sign(&submit_message(&a.namespace, epoch, &digest))
                    .unwrap(),
            ),
            artifact: text,
        }
    };
    let next = artifact(&[(FLEET_B, Role::Active)]);
    fn refused<T: std::fmt::Debug>(r: Result<T, WitnessError>) -> u16 {
        match r {
            Err(WitnessError::Refused { status, .. }) => status,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    // Not signed by the operator.
    assert_eq!(
        refused(client.submit(&submission(&stranger, 2, &next)).await),
        401
    );
    // Skipping an epoch, or rewriting epoch 1.
    assert_eq!(
        refused(client.submit(&submission(&operator, 3, &next)).await),
        409
    );
    assert_eq!(
        refused(client.submit(&submission(&operator, 1, &next)).await),
        409
    );
    // Another namespace.
    let mut foreign = next.clone();
    foreign.namespace = "other".into();
    assert_eq!(
        refused(client.submit(&submission(&operator, 2, &foreign)).await),
        400
    );
    // A counter-signature by someone else.
    let bogus = bkv_witness::server::Countersignature {
        operator_signature: hex::encode([7u8; 64]),
    };
    assert_eq!(refused(client.countersign(1, &bogus).await), 401);
    // Nothing of that changed the log.
    assert_eq!(client.info().await.unwrap().latest_epoch, 1);
    let one = client.epoch(1).await.unwrap();
    one.verify(&BundleKeys {
        witness: witness_key,
        operator: operator.public_key(),
    })
    .unwrap();
    running.stop().await;
}

#[tokio::test]
async fn witness_restart_mid_stream_forgets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (witness_config, witness_signer) = file_signer(dir.path(), "witness.key");
    let (_, operator) = file_signer(dir.path(), "operator.key");
    let witness_key = witness_signer.public_key();
    let keys = BundleKeys {
        witness: witness_key,
        operator: operator.public_key(),
    };
    let running = start(dir.path(), witness_config.clone(), operator.public_key()).await;
    let client = WitnessClient::new(&running.url).unwrap();
    let first = publish(
        &client,
        &witness_key,
        &operator,
        &artifact(&[(FLEET_A, Role::Active)]),
    )
    .await
    .unwrap();
    // The operator has the witness sign epoch 2, then the witness stops before the
    // counter-signature reaches it.
    let second = artifact(&[(FLEET_A, Role::RecoverOnly), (FLEET_B, Role::Active)]);
    let text = second.to_json();
    let digest = artifact_digest(&text);
    let signed = client
        .submit(&Submission {
            epoch: 2,
            operator_request_signature: hex::encode(
                operator
                    .sign(&submit_message(NAMESPACE, 2, &digest))
                    .unwrap(),
            ),
            artifact: text,
        })
        .await
        .unwrap();
    running.stop().await;

    let running = start(dir.path(), witness_config, operator.public_key()).await;
    let client = WitnessClient::new(&running.url).unwrap();
    assert_eq!(client.info().await.unwrap().latest_epoch, 2);
    assert_eq!(client.epoch(1).await.unwrap(), first.bundle);
    // The retry gets the very signature logged before the restart, and completes it.
    let retried = publish(&client, &witness_key, &operator, &second)
        .await
        .unwrap();
    assert!(!retried.new_epoch);
    assert_eq!(retried.bundle.witness, signed);
    retried.bundle.verify(&keys).unwrap();
    assert_eq!(client.epoch(2).await.unwrap(), retried.bundle);
    // And the log goes on from there.
    let third = publish(
        &client,
        &witness_key,
        &operator,
        &artifact(&[(FLEET_B, Role::Active)]),
    )
    .await
    .unwrap();
    assert_eq!(third.bundle.witness.epoch, 3);
    assert!(third.bundle.witness.timestamp >= retried.bundle.witness.timestamp);
    running.stop().await;
}

/// A fresh SoftHSMv2 token in `dir` (installed by scripts/install-test-deps).
fn softhsm_token(dir: &Path) -> (String, std::path::PathBuf) {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\n",
            tokens.display()
        ),
    )
    .unwrap();
    let status = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args([
            "--init-token",
            "--free",
            "--label",
            "bkv-test",
            "--so-pin",
            "5678",
            "--pin",
            "1234",
        ])
        .output()
        .expect("softhsm2-util is missing: run scripts/install-test-deps");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let module = [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    ]
    .iter()
    .find(|p| Path::new(p).exists())
    .expect("libsofthsm2.so not found")
    .to_string();
    (module, conf)
}

#[tokio::test]
async fn witness_and_operator_keys_in_a_pkcs11_token() {
    let dir = tempfile::tempdir().unwrap();
    let (module, conf) = softhsm_token(dir.path());
    // SAFETY of the environment: this test binary's other tests do not read these.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let token = |label: &str| SignerConfig::Pkcs11 {
        module: module.clone().into(),
        token: "bkv-test".into(),
        pin_env: "BKV_TEST_TOKEN_PIN".into(),
        key_label: label.into(),
    };
    // A wrong PIN is a clear error, and makes no key.
    std::env::set_var("BKV_TEST_TOKEN_PIN", "0000");
    let err = Signer::generate(&token("witness"), dir.path()).unwrap_err();
    assert!(err.to_string().contains("log in"), "{err}");
    std::env::set_var("BKV_TEST_TOKEN_PIN", "1234");
    let witness_signer = Signer::generate(&token("witness"), dir.path()).unwrap();
    let witness_key = witness_signer.public_key();
    drop(witness_signer);
    // A second key with the same label is refused rather than shadowing the first.
    assert!(Signer::generate(&token("witness"), dir.path()).is_err());
    let operator = Signer::generate(&token("operator"), dir.path()).unwrap();
    assert!(!format!("{operator:?}").contains("1234"));
    let running = start(dir.path(), token("witness"), operator.public_key()).await;
    let client = WitnessClient::new(&running.url).unwrap();
    let published = publish(
        &client,
        &witness_key,
        &operator,
        &artifact(&[(FLEET_A, Role::Active)]),
    )
    .await
    .unwrap();
    published
        .bundle
        .verify(&BundleKeys {
            witness: witness_key,
            operator: operator.public_key(),
        })
        .unwrap();
    let response: plexi_core::SignatureResponse =
        serde_json::from_str(&serde_json::to_string(&published.bundle.witness).unwrap()).unwrap();
    response.verify(&witness_key).unwrap();
    running.stop().await;
}
