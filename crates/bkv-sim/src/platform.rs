//! The simulated HSM platform: seeded randomness and a clock that is tokio's paused
//! virtual time, so that HSM deadlines, openraft's timers and the fault schedule all
//! move on the one simulated clock.

use bkv_hsm::Platform;
use ed25519_dalek::{Signer, SigningKey};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::sync::Mutex;
use tokio::time::Instant;

/// Code measurement every simulated member runs (so all may join one another).
pub const SIM_MEASUREMENT: [u8; 32] = [0x51; 32];

/// One simulated HSM's platform.
pub struct SimPlatform {
    rng: Mutex<StdRng>,
    epoch: Instant,
    root: SigningKey,
}

impl SimPlatform {
    /// A platform whose randomness comes from `seed` and whose clock starts at the
    /// simulation's `epoch`.
    pub fn new(seed: u64, epoch: Instant) -> Self {
        Self {
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            epoch,
            root: SigningKey::from_bytes(&[0x5e; 32]),
        }
    }
}

impl Platform for SimPlatform {
    fn now_millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
    fn fill_random(&self, out: &mut [u8]) {
        self.rng.lock().expect("rng lock").fill_bytes(out);
    }
    fn describe(&self) -> &'static str {
        "simulated HSM (bkv-sim)"
    }
    fn measurement(&self) -> [u8; 32] {
        SIM_MEASUREMENT
    }
    fn certify(&self, statement: &[u8]) -> [u8; 64] {
        self.root.sign(statement).to_bytes()
    }
    fn attestation_root(&self) -> [u8; 32] {
        self.root.verifying_key().to_bytes()
    }
}
