//! Bundles: every refusal the client relies on, one test each.

use super::*;
use ed25519_dalek::{Signer as _, SigningKey};

fn keys() -> (SigningKey, SigningKey, BundleKeys) {
    let witness = SigningKey::from_bytes(&[7; 32]);
    let operator = SigningKey::from_bytes(&[9; 32]);
    let trusted = BundleKeys {
        witness: witness.verifying_key().to_bytes(),
        operator: operator.verifying_key().to_bytes(),
    };
    (witness, operator, trusted)
}

fn attestation() -> AttestationEvidence {
    AttestationEvidence {
        dc: "dc1".into(),
        node_id: 1,
        channel_key: "00".repeat(32),
        measurement: "11".repeat(32),
        root: "22".repeat(32),
        signature: "33".repeat(64),
    }
}

fn artifact(fleet_keys: &[(&str, Role)]) -> Artifact {
    Artifact {
        version: ARTIFACT_VERSION,
        namespace: "bkv-test/fleet-keys".into(),
        fleets: fleet_keys
            .iter()
            .map(|(key, role)| FleetEntry {
                id: "44".repeat(32),
                fleet_key: key.to_string(),
                role: *role,
                evidence: Evidence {
                    measurement: "11".repeat(32),
                    ceremony: Ceremony {
                        fleet_id: "44".repeat(32),
                        fleet_key: key.to_string(),
                        max_attempts: 10,
                        approved_measurements: vec!["11".repeat(32)],
                        founder: attestation(),
                        signature: "55".repeat(64),
                    },
                    members: vec![attestation()],
                },
            })
            .collect(),
    }
}

fn bundle(epoch: u64, artifact: &Artifact, witness: &SigningKey, operator: &SigningKey) -> Bundle {
    let text = artifact.to_json();
    let digest = artifact_digest(&text);
    let message = signature_message(&artifact.namespace, 1_700_000_000_000, epoch, &digest);
    let signature = witness.sign(&message).to_bytes().to_vec();
    let countersignature = operator.sign(&countersign_message(&signature));
    Bundle {
        artifact: text,
        witness: WitnessSignature {
            version: CIPHERSUITE_PROTOBUF_ED25519,
            ciphersuite: CIPHERSUITE_PROTOBUF_ED25519,
            namespace: artifact.namespace.clone(),
            timestamp: 1_700_000_000_000,
            epoch,
            digest: digest.to_vec(),
            signature,
            key_id: Some(plexi_key_id(&witness.verifying_key().to_bytes())),
            serialized_message: None,
        },
        operator_signature: Some(hex::encode(countersignature.to_bytes())),
    }
}

const FLEET_A: &str = "aa00000000000000000000000000000000000000000000000000000000000000";
const FLEET_B: &str = "bb00000000000000000000000000000000000000000000000000000000000000";

#[test]
fn a_good_bundle_verifies_and_admits_its_fleet() {
    let (w, o, trusted) = keys();
    let b = bundle(3, &artifact(&[(FLEET_A, Role::Active)]), &w, &o);
    let verified = Bundle::from_json(&b.to_json())
        .unwrap()
        .verify(&trusted)
        .unwrap();
    assert_eq!(verified.epoch, 3);
    let key = hex::decode(FLEET_A).unwrap();
    assert_eq!(verified.admit(&key, 3, &[Role::Active]), Ok(Role::Active));
}

#[test]
fn tampered_artifact_is_refused() {
    let (w, o, trusted) = keys();
    let mut b = bundle(1, &artifact(&[(FLEET_A, Role::Active)]), &w, &o);
    b.artifact = artifact(&[(FLEET_B, Role::Active)]).to_json();
    assert_eq!(b.verify(&trusted), Err(BundleError::Digest));
}

#[test]
fn swapped_witness_signature_is_refused() {
    let (w, o, trusted) = keys();
    let b1 = bundle(1, &artifact(&[(FLEET_A, Role::Active)]), &w, &o);
    let mut b2 = bundle(2, &artifact(&[(FLEET_B, Role::Active)]), &w, &o);
    b2.witness.signature = b1.witness.signature.clone();
    assert_eq!(b2.verify(&trusted), Err(BundleError::WitnessSignature));
    // And the operator's counter-signature from another epoch does not carry over.
    let mut b3 = bundle(2, &artifact(&[(FLEET_B, Role::Active)]), &w, &o);
    b3.operator_signature = b1.operator_signature.clone();
    assert_eq!(b3.verify(&trusted), Err(BundleError::OperatorSignature));
}

#[test]
fn missing_countersignature_is_refused() {
    let (w, o, trusted) = keys();
    let mut b = bundle(1, &artifact(&[(FLEET_A, Role::Active)]), &w, &o);
    b.operator_signature = None;
    assert_eq!(
        b.verify(&trusted),
        Err(BundleError::MissingCountersignature)
    );
}

#[test]
fn unknown_witness_key_is_refused() {
    let (_, o, trusted) = keys();
    let rogue = SigningKey::from_bytes(&[8; 32]);
    let b = bundle(1, &artifact(&[(FLEET_A, Role::Active)]), &rogue, &o);
    assert_eq!(b.verify(&trusted), Err(BundleError::WitnessSignature));
}

#[test]
fn operator_signing_the_witness_role_is_refused() {
    // Keys are not interchangeable: a bundle signed twice by the operator fails.
    let (_, o, trusted) = keys();
    let b = bundle(1, &artifact(&[(FLEET_A, Role::Active)]), &o, &o);
    assert_eq!(b.verify(&trusted), Err(BundleError::WitnessSignature));
}

#[test]
fn replayed_old_epoch_is_refused() {
    let (w, o, trusted) = keys();
    let b = bundle(4, &artifact(&[(FLEET_A, Role::Active)]), &w, &o);
    let verified = b.verify(&trusted).unwrap();
    let key = hex::decode(FLEET_A).unwrap();
    assert_eq!(
        verified.admit(&key, 5, &[Role::Active]),
        Err(BundleError::Rollback {
            presented: 4,
            seen: 5
        })
    );
}

#[test]
fn fleets_outside_the_bundle_or_their_role_are_refused() {
    let (w, o, trusted) = keys();
    let a = artifact(&[(FLEET_A, Role::RecoverOnly), (FLEET_B, Role::Retired)]);
    let verified = bundle(1, &a, &w, &o).verify(&trusted).unwrap();
    let fleet_a = hex::decode(FLEET_A).unwrap();
    let fleet_b = hex::decode(FLEET_B).unwrap();
    let other = [0xcc; 32];
    assert!(verified.admit(&other, 0, &[Role::Active]).is_err());
    assert!(verified.admit(&fleet_a, 0, &[Role::Active]).is_err());
    assert_eq!(
        verified.admit(&fleet_a, 0, &[Role::Active, Role::RecoverOnly]),
        Ok(Role::RecoverOnly)
    );
    assert!(verified
        .admit(&fleet_b, 0, &[Role::Active, Role::RecoverOnly])
        .is_err());
}

#[test]
fn a_namespace_the_witness_did_not_sign_is_refused() {
    let (w, o, trusted) = keys();
    let a = artifact(&[(FLEET_A, Role::Active)]);
    let mut b = bundle(1, &a, &w, &o);
    // Re-sign a message for another namespace over the same artifact.
    b.witness.namespace = "someone-else".into();
    let message = b.witness.message();
    b.witness.signature = w.sign(&message).to_bytes().to_vec();
    b.operator_signature = Some(hex::encode(
        o.sign(&countersign_message(&b.witness.signature))
            .to_bytes(),
    ));
    assert!(matches!(b.verify(&trusted), Err(BundleError::Namespace(_))));
}

#[test]
fn malformed_and_oversized_bundles_are_refused() {
    assert_eq!(Bundle::from_json(b""), Err(BundleError::Missing));
    assert!(matches!(
        Bundle::from_json(b"{\"artifact\":1}"),
        Err(BundleError::Malformed(_))
    ));
    let huge = vec![b' '; MAX_BUNDLE_BYTES + 1];
    assert!(matches!(
        Bundle::from_json(&huge),
        Err(BundleError::Malformed(_))
    ));
}

#[test]
fn the_signature_message_is_plexis_protobuf() {
    // Field 1 ciphersuite, 2 namespace, 3 timestamp, 4 Epoch{1: inner}, 5 digest.
    let m = signature_message("ns", 2, 3, &[4]);
    assert_eq!(
        m,
        [
            0x08, 0x01, 0x12, 0x02, b'n', b's', 0x18, 0x02, 0x22, 0x02, 0x08, 0x03, 0x2a, 0x01,
            0x04
        ]
    );
}

mod malformed_input {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let (_, _, trusted) = keys();
            if let Ok(b) = Bundle::from_json(&bytes) {
                let _ = b.verify(&trusted);
            }
        }

        #[test]
        fn any_flipped_byte_of_a_good_bundle_is_refused(index in 0usize..4096, bit in 0u8..8) {
            let (w, o, trusted) = keys();
            let good = bundle(1, &artifact(&[(FLEET_A, Role::Active)]), &w, &o).to_json();
            let mut bad = good.clone();
            let i = index % bad.len();
            bad[i] ^= 1 << bit;
            if let Ok(b) = Bundle::from_json(&bad) {
                if let Ok(v) = b.verify(&trusted) {
                    // Only changes JSON does not see (whitespace, escapes, key case of hex) survive.
                    prop_assert_eq!(v, Bundle::from_json(&good).unwrap().verify(&trusted).unwrap());
                }
            }
        }
    }
}

#[test]
fn a_fleet_spelled_twice_or_in_upper_case_is_refused() {
    let (w, o, trusted) = keys();
    let upper = FLEET_A.to_ascii_uppercase();
    let b = bundle(1, &artifact(&[(&upper, Role::Active)]), &w, &o);
    assert!(matches!(b.verify(&trusted), Err(BundleError::Malformed(_))));
    let b = bundle(
        1,
        &artifact(&[(FLEET_A, Role::Active), (FLEET_A, Role::RecoverOnly)]),
        &w,
        &o,
    );
    assert!(matches!(b.verify(&trusted), Err(BundleError::Malformed(_))));
}

#[test]
fn an_uncountersigned_entry_verifies_as_witnessed_only() {
    let (w, o, trusted) = keys();
    let mut b = bundle(1, &artifact(&[(FLEET_A, Role::Active)]), &w, &o);
    b.operator_signature = None;
    assert_eq!(b.verify_witnessed(&trusted.witness).unwrap().epoch, 1);
    assert_eq!(
        b.verify(&trusted),
        Err(BundleError::MissingCountersignature)
    );
    assert_eq!(
        b.verify_witnessed(&trusted.operator),
        Err(BundleError::WitnessSignature)
    );
}
