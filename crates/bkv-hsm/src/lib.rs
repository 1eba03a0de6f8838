//! The trusted HSM program of bkv.
//!
//! Everything that must stay secret or correct even when the operator is hostile lives
//! here: the fleet's OPAQUE server keys, the record table and its guess accounting, the
//! logins in flight, the member's identity and attestation, the sealed channels between
//! members, and Raft itself, which replicates the record table among the HSMs of a fleet
//! with its log and state in HSM memory only. It reaches the world only through
//! [`Platform`] (clock, random numbers, attestation) and [`fleet::PeerTransport`]
//! (sealed bytes to peers), so that it can move into a real HSM or enclave unchanged.
//!
//! Not here: sockets, files, account authentication (the frontend's job), persistence.
#![forbid(unsafe_code)]

pub mod channel;
mod error;
pub mod evidence;
pub mod fleet;
mod pending;
pub mod platform;
pub mod records;

pub use bkv_core::KsfParams;
pub use error::{EnrollStarted, HsmError, KeyReleased, RecordStatus, RecoverStarted};
pub use fleet::{FleetHsm, HsmConfig, MemberNode, NodeStatus, PeerTransport, TransportError};
pub use pending::{LoginId, RegistrationId};
pub use platform::{Platform, SimulatedClock, SimulatedPlatform, SoftwarePlatform};
