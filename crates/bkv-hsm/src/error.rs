//! Every way an HSM call can fail, and the answers of the vault operations.

use crate::pending::LoginId;
use bkv_core::KsfParams;

/// Every way an HSM call can fail. None changes state, except where a variant says the
/// guess stays spent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HsmError {
    /// A message did not parse or had the wrong size.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The account has no record.
    #[error("not enrolled")]
    NotEnrolled,
    /// The record was destroyed after too many wrong PINs.
    #[error("the record was destroyed after too many wrong PINs")]
    Destroyed,
    /// No pending login with that id for this account: used, expired, never made, or
    /// made by a leader that has since lost its office.
    #[error("no such login (already used, expired, or started with another leader)")]
    LoginUnknown,
    /// KE3 did not verify; the guess stays spent.
    #[error("login failed; the guess stays spent")]
    LoginFailed {
        /// Guesses left on the record.
        attempts_left: u32,
    },
    /// Too many logins in flight; nothing was spent.
    #[error("too many logins in flight; retry later")]
    Busy,
    /// The record changed while the call was decided; nothing was spent. Retry.
    #[error("the record changed concurrently; retry")]
    Conflict,
    /// This member is not the leader; ask the one named, if any.
    #[error("not the leader{}", leader_dc.as_ref().map(|d| format!(" (try {d})")).unwrap_or_default())]
    NotLeader {
        /// The datacenter of the leader this member knows of.
        leader_dc: Option<String>,
    },
    /// No majority answers: nothing was committed.
    #[error("no majority of the fleet is reachable")]
    Unavailable,
    /// This member holds no fleet secrets yet (not founded or not admitted).
    #[error("this member is not part of a fleet yet")]
    NotReady,
    /// A join was refused.
    #[error("join refused: {0}")]
    JoinRefused(String),
    /// A peer message was refused.
    #[error("peer message refused: {0}")]
    PeerRefused(String),
}

/// Answer to the first enrollment step.
#[derive(Debug)]
pub struct EnrollStarted {
    /// OPAQUE RegistrationResponse bytes.
    pub registration_response: Vec<u8>,
    /// Names this registration in the second step.
    pub registration_id: crate::pending::RegistrationId,
    /// The fleet's OPAQUE public key.
    pub fleet_key: [u8; 32],
}

/// Answer to the first recovery step; its guess is already committed.
#[derive(Debug)]
pub struct RecoverStarted {
    /// OPAQUE KE2 bytes.
    pub ke2: Vec<u8>,
    /// Names this login for its KE3.
    pub login_id: LoginId,
    /// Guesses left after this one.
    pub attempts_left: u32,
    /// Argon2id cost the client used at enrollment.
    pub ksf: KsfParams,
    /// The fleet's OPAQUE public key.
    pub fleet_key: [u8; 32],
}

/// Answer to a correct KE3.
#[derive(Debug)]
pub struct KeyReleased {
    /// The client-wrapped backup key, sealed under a key from the OPAQUE session key.
    pub sealed_wrapped_key: Vec<u8>,
    /// The full budget again.
    pub attempts_left: u32,
    /// A ticket that lets the client retire this enrollment once it has moved to another
    /// fleet, sealed like the key.
    pub sealed_retire_ticket: Vec<u8>,
}

/// Public state of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordStatus {
    /// Never enrolled.
    NotEnrolled,
    /// Enrolled.
    Active {
        /// Guesses left.
        attempts_left: u32,
        /// The full budget.
        max_attempts: u32,
    },
    /// Destroyed after too many wrong PINs.
    Destroyed,
}
