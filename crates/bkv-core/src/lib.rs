//! What every bkv party agrees on: the gRPC `Vault` service and its messages (generated
//! from `proto/bkv/v1/vault.proto`), the error detail every failed call carries, the
//! OPAQUE cipher suite, account ids, account-token checks, and the labelled KDF/AEAD helpers.
//!
//! This crate holds no secrets of its own and no protocol state: secrets live in
//! `bkv-hsm` and `bkv-client`, which call these helpers.
#![forbid(unsafe_code)]

pub mod account;
pub mod auth;
pub mod bundle;
pub mod seal;
pub mod suite;
pub mod wan;

pub use account::AccountId;
pub use suite::{KsfParams, Suite};

/// Generated types of package `bkv.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("bkv.v1");
}

use prost::Message;

/// Largest message the vault accepts or sends; OPAQUE messages are a few hundred bytes.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// Largest message between fleet members (Raft batches and snapshots).
pub const MAX_PEER_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Builds a gRPC status whose details carry a [`v1::ErrorDetail`].
pub fn error_status(
    code: tonic::Code,
    reason: v1::Reason,
    attempts_left: u32,
    message: impl Into<String>,
) -> tonic::Status {
    let detail = v1::ErrorDetail {
        reason: reason as i32,
        attempts_left,
        leader_dc: String::new(),
        fleet_key: Vec::new(),
    };
    tonic::Status::with_details(code, message, detail.encode_to_vec().into())
}

/// A "not the leader" status naming the leader's datacenter when known.
pub fn not_leader_status(leader_dc: Option<String>) -> tonic::Status {
    let detail = v1::ErrorDetail {
        reason: v1::Reason::NotLeader as i32,
        attempts_left: 0,
        leader_dc: leader_dc.clone().unwrap_or_default(),
        fleet_key: Vec::new(),
    };
    let message = match leader_dc {
        Some(dc) => format!("not the leader; the leader is in {dc}"),
        None => "not the leader; no leader known".to_string(),
    };
    tonic::Status::with_details(
        tonic::Code::Unavailable,
        message,
        detail.encode_to_vec().into(),
    )
}

/// Adds the answering fleet's key to a status's error detail.
pub fn with_fleet_key(status: tonic::Status, fleet_key: &[u8]) -> tonic::Status {
    let Some(mut detail) = error_detail(&status) else {
        return status;
    };
    detail.fleet_key = fleet_key.to_vec();
    tonic::Status::with_details(
        status.code(),
        status.message(),
        detail.encode_to_vec().into(),
    )
}

/// Reads the [`v1::ErrorDetail`] from a status, if the vault put one there.
pub fn error_detail(status: &tonic::Status) -> Option<v1::ErrorDetail> {
    if status.details().is_empty() {
        return None;
    }
    v1::ErrorDetail::decode(status.details()).ok()
}
