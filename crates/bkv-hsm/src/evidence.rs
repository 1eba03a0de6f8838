//! Evidence of a fleet's deployment: the creation ceremony the founding HSM signed, and
//! its members' attestations. Made here from the replicated state; checked here too, so
//! that the auditor verifies with the very code that made it.

use crate::channel::{statement, Attestation};
use crate::fleet::state::{Admission, Genesis};
use bkv_core::bundle::{AttestationEvidence, Ceremony, Evidence, FleetEntry};
use ed25519_dalek::{Signature, VerifyingKey};
use std::collections::BTreeMap;

/// Label of the founding HSM's signature over its creation ceremony.
const CEREMONY_LABEL: &[u8] = b"bkv/v1/ceremony\0";

/// The bytes the founding HSM's platform signs at the creation ceremony.
pub fn ceremony_statement(
    fleet_id: &[u8; 32],
    fleet_key: &[u8; 32],
    max_attempts: u32,
    approved_measurements: &[[u8; 32]],
    founder: &Attestation,
) -> Vec<u8> {
    let mut s = CEREMONY_LABEL.to_vec();
    s.extend_from_slice(fleet_id);
    s.extend_from_slice(fleet_key);
    s.extend_from_slice(&max_attempts.to_be_bytes());
    s.extend_from_slice(&(approved_measurements.len() as u32).to_be_bytes());
    for m in approved_measurements {
        s.extend_from_slice(m);
    }
    s.extend_from_slice(&statement(
        &founder.dc,
        founder.node_id,
        &founder.channel_key,
        &founder.measurement,
    ));
    s
}

fn to_evidence(a: &Attestation) -> AttestationEvidence {
    AttestationEvidence {
        dc: a.dc.clone(),
        node_id: a.node_id,
        channel_key: hex::encode(a.channel_key),
        measurement: hex::encode(a.measurement),
        root: hex::encode(a.root),
        signature: hex::encode(&a.signature),
    }
}

fn key32(text: &str, what: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).map_err(|_| format!("{what} is not 64 hex digits"))?;
    Ok(out)
}

fn from_evidence(e: &AttestationEvidence) -> Result<Attestation, String> {
    Ok(Attestation {
        dc: e.dc.clone(),
        node_id: e.node_id,
        channel_key: key32(&e.channel_key, "channel_key")?,
        measurement: key32(&e.measurement, "measurement")?,
        root: key32(&e.root, "root")?,
        signature: hex::decode(&e.signature).map_err(|_| "signature is not hex".to_string())?,
    })
}

/// The evidence of the fleet whose replicated genesis and admissions these are.
pub fn evidence(genesis: &Genesis, admissions: &BTreeMap<u64, Admission>) -> Evidence {
    Evidence {
        measurement: hex::encode(genesis.founder.measurement),
        ceremony: Ceremony {
            fleet_id: hex::encode(genesis.fleet_id),
            fleet_key: hex::encode(genesis.fleet_key),
            max_attempts: genesis.max_attempts,
            approved_measurements: genesis
                .approved_measurements
                .iter()
                .map(hex::encode)
                .collect(),
            founder: to_evidence(&genesis.founder),
            signature: hex::encode(&genesis.ceremony_signature),
        },
        members: admissions
            .values()
            .map(|a| to_evidence(&a.attestation))
            .collect(),
    }
}

/// Checks one fleet's evidence: the ceremony names this fleet key and is signed by the
/// founder's platform; every attestation is certified by that platform root for approved
/// code. Returns the platform root, for the auditor to report.
pub fn verify_evidence(entry: &FleetEntry) -> Result<[u8; 32], String> {
    let e = &entry.evidence;
    let c = &e.ceremony;
    if !c.fleet_key.eq_ignore_ascii_case(&entry.fleet_key) {
        return Err("the ceremony made another fleet key".into());
    }
    if !c.fleet_id.eq_ignore_ascii_case(&entry.id) {
        return Err("the ceremony made another fleet id".into());
    }
    let founder = from_evidence(&c.founder)?;
    let root = founder.root;
    founder
        .verify(&root)
        .map_err(|e| format!("founder attestation: {e}"))?;
    let approved: Vec<[u8; 32]> = c
        .approved_measurements
        .iter()
        .map(|m| key32(m, "approved measurement"))
        .collect::<Result<_, _>>()?;
    let statement = ceremony_statement(
        &key32(&c.fleet_id, "fleet_id")?,
        &key32(&c.fleet_key, "fleet_key")?,
        c.max_attempts,
        &approved,
        &founder,
    );
    let signature = hex::decode(&c.signature)
        .ok()
        .and_then(|s| Signature::from_slice(&s).ok())
        .ok_or("the ceremony signature is not an Ed25519 signature")?;
    VerifyingKey::from_bytes(&root)
        .map_err(|_| "the platform root is not an Ed25519 key".to_string())?
        .verify_strict(&statement, &signature)
        .map_err(|_| "the ceremony signature does not verify under the founder's platform root")?;
    let measurement = key32(&e.measurement, "measurement")?;
    if !approved.contains(&measurement) || founder.measurement != measurement {
        return Err("the stated measurement is not the founder's approved code".into());
    }
    if !e.members.iter().any(|m| m == &c.founder) {
        return Err("the founder is not among the members".into());
    }
    for member in &e.members {
        let a = from_evidence(member)?;
        a.verify(&root)
            .map_err(|err| format!("member {} ({}): {err}", a.node_id, a.dc))?;
        if !approved.contains(&a.measurement) {
            return Err(format!("member {} runs unapproved code", a.node_id));
        }
    }
    Ok(root)
}
