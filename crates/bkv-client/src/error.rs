//! Every way a client operation fails, each with one CLI exit code.

use bkv_core::v1::Reason;

/// Why a pinned fleet key check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// The vault presented a fleet key other than the pinned one.
    #[error("the vault's fleet key {presented} is not the pinned fleet key {pinned}")]
    FleetKeyMismatch {
        /// Hex of the key the vault presented.
        presented: String,
        /// Hex of the pinned key.
        pinned: String,
    },
    /// The validation bundle was refused.
    #[error("validation bundle refused: {0}")]
    Bundle(#[from] bkv_core::bundle::BundleError),
}

/// A client operation's failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The PIN did not open the record; the guess is spent.
    #[error("wrong PIN: {attempts_left} attempts left")]
    WrongPin {
        /// Guesses left on the record.
        attempts_left: u32,
    },
    /// The account never enrolled.
    #[error("no key to recover: this account never enrolled")]
    NotEnrolled,
    /// The record was destroyed after too many wrong PINs.
    #[error("no key to recover: the key was destroyed after too many wrong PINs")]
    Destroyed,
    /// The vault could not be reached or could not serve; nothing changed.
    #[error("vault unavailable: {0}")]
    Unavailable(String),
    /// Too many calls for this account at the frontend; nothing was done. Retry later.
    #[error("rate limited: {0}")]
    RateLimited(String),
    /// The fleet's leader changed in the middle of a two-step exchange (its pending state
    /// is gone); a recovery's guess stays spent. Retrying is safe.
    #[error("interrupted by a change of the vault's leader ({0}); try again")]
    Interrupted(String),
    /// The vault is not the one this client trusts.
    #[error("trust failure: {0}")]
    Trust(#[from] TrustError),
    /// The account token was refused.
    #[error("account token refused: {0}")]
    Unauthenticated(String),
    /// A config file is missing or wrong.
    #[error("config {path}: {reason}")]
    Config {
        /// Which file or field.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The vault answered something the protocol does not allow.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// CLI exit codes, documented in `bkv --help` and the README.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Anything not listed below.
    pub const OTHER: i32 = 1;
    /// Bad command line or input (PIN rules, recovery code format).
    pub const USAGE: i32 = 2;
    /// Wrong PIN.
    pub const WRONG_PIN: i32 = 3;
    /// No key to recover: never enrolled, or destroyed.
    pub const NO_KEY: i32 = 4;
    /// Vault unreachable or unavailable.
    pub const UNAVAILABLE: i32 = 5;
    /// The vault's key is not the trusted fleet key.
    pub const TRUST: i32 = 6;
}

impl ClientError {
    /// The CLI exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::WrongPin { .. } => exit::WRONG_PIN,
            ClientError::NotEnrolled | ClientError::Destroyed => exit::NO_KEY,
            ClientError::Unavailable(_)
            | ClientError::Interrupted(_)
            | ClientError::RateLimited(_) => exit::UNAVAILABLE,
            ClientError::Trust(_) => exit::TRUST,
            ClientError::Unauthenticated(_)
            | ClientError::Config { .. }
            | ClientError::Protocol(_) => exit::OTHER,
        }
    }

    /// Interprets a status from the vault.
    pub fn from_status(status: tonic::Status) -> Self {
        use tonic::Code;
        let detail = bkv_core::error_detail(&status);
        let reason = detail
            .as_ref()
            .and_then(|d| Reason::try_from(d.reason).ok())
            .unwrap_or(Reason::Unspecified);
        match (reason, status.code()) {
            (Reason::NotEnrolled, _) => ClientError::NotEnrolled,
            (Reason::Destroyed, _) => ClientError::Destroyed,
            (Reason::LoginUnknown, _) => ClientError::Interrupted(status.message().to_string()),
            (Reason::LoginFailed, _) => ClientError::WrongPin {
                attempts_left: detail.map(|d| d.attempts_left).unwrap_or(0),
            },
            (Reason::Unauthenticated, _) | (_, Code::Unauthenticated) => {
                ClientError::Unauthenticated(status.message().to_string())
            }
            (Reason::RateLimited, _) => ClientError::RateLimited(status.message().to_string()),
            (Reason::Unavailable | Reason::Busy | Reason::NotLeader, _)
            | (
                _,
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Aborted,
            ) => ClientError::Unavailable(status.message().to_string()),
            _ => ClientError::Protocol(format!("{:?}: {}", status.code(), status.message())),
        }
    }
}
