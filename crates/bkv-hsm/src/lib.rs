//! The trusted HSM program of bkv.
//!
//! Everything that must stay secret or correct even when the operator is hostile lives
//! here: the fleet's OPAQUE server keys, the record table and its guess accounting, and
//! the logins in flight. It reaches the world only through [`Platform`] (a clock and
//! random numbers): no sockets, no files, no host clock, so that it can move into a
//! real HSM or enclave unchanged.
//!
//! Not here: networking, account authentication (the frontend's job), persistence.
#![forbid(unsafe_code)]

mod hsm;
mod pending;
pub mod platform;
pub mod records;

pub use bkv_core::KsfParams;
pub use hsm::{
    EnrollStarted, Hsm, HsmConfig, HsmError, KeyReleased, RecordStatus, RecoverStarted,
    MAX_WRAPPED_KEY_LEN,
};
pub use pending::LoginId;
pub use platform::{Platform, SimulatedClock, SimulatedPlatform, SoftwarePlatform};
