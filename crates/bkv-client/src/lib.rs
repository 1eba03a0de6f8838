//! The bkv client SDK: makes a backup key on the device, escrows it in a vault behind a
//! PIN with OPAQUE, and recovers it on a new device.
//!
//! The client trusts only the fleet key it pinned: it checks the vault's key before it
//! finishes enrollment or recovery. Its secrets (backup key, PIN, OPAQUE outputs) are
//! zeroized on drop and never logged. It also makes and restores the end-to-end encrypted
//! backup archives (`backup`). Not here: bundles (a later issue).
#![forbid(unsafe_code)]

pub mod backup;
pub mod client;
pub mod config;
pub mod device;
pub mod error;
pub mod flow;
mod retirements;
pub mod secrets;
pub mod token;
pub mod trust;

pub use client::{
    fetch_bundle, fleet_status, AccountStatus, Moved, RecordState, Recovered, VaultClient,
};
pub use config::{ClientConfig, DevTokens, OverTheAir};
pub use device::Device;
pub use error::{exit, ClientError, TrustError};
pub use secrets::{BackupKey, Pin};
pub use token::TokenSource;
pub use trust::Trust;
