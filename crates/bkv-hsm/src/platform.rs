//! The one seam between the trusted code and the world: a clock and random numbers.
//!
//! The HSM program reaches nothing else: no sockets, no files, no host clock. A real
//! HSM or enclave implements [`Platform`] with its own hardware; [`SoftwarePlatform`]
//! is the development stand-in and [`SimulatedPlatform`] serves deterministic tests.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_core::{CryptoRng, OsRng, RngCore};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What the trusted code needs from the machine it runs on.
pub trait Platform: Send + 'static {
    /// Milliseconds on the HSM's own monotonic clock (never the host's claim of the time).
    fn now_millis(&self) -> u64;
    /// Fills `out` with cryptographically secure random bytes.
    fn fill_random(&mut self, out: &mut [u8]);
    /// A name for logs and banners, saying what kind of HSM this is.
    fn describe(&self) -> &'static str;
}

/// Adapts a [`Platform`] to the `rand_core` traits the cryptography crates take.
pub(crate) struct PlatformRng<'a, P: Platform>(pub(crate) &'a mut P);

impl<P: Platform> RngCore for PlatformRng<'_, P> {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.0.fill_random(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.0.fill_random(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_random(dest);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.0.fill_random(dest);
        Ok(())
    }
}

impl<P: Platform> CryptoRng for PlatformRng<'_, P> {}

/// The development HSM: the operating system's RNG and a process-local monotonic clock.
/// It is not tamper resistant and says so.
pub struct SoftwarePlatform {
    started: Instant,
}

impl SoftwarePlatform {
    /// Makes the development platform and logs that it is for development only.
    pub fn new() -> Self {
        tracing::warn!("software HSM: for development only; it is not tamper resistant and holds its secrets in ordinary memory");
        Self {
            started: Instant::now(),
        }
    }
}

impl Default for SoftwarePlatform {
    fn default() -> Self {
        Self::new()
    }
}

impl Platform for SoftwarePlatform {
    fn now_millis(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
    fn fill_random(&mut self, out: &mut [u8]) {
        OsRng.fill_bytes(out);
    }
    fn describe(&self) -> &'static str {
        "software HSM (development only)"
    }
}

/// A seeded platform whose clock moves only when a test says so.
pub struct SimulatedPlatform {
    rng: StdRng,
    clock: Arc<AtomicU64>,
}

impl SimulatedPlatform {
    /// A platform with a deterministic RNG and a clock at zero; the returned handle moves the clock.
    pub fn new(seed: u64) -> (Self, SimulatedClock) {
        let clock = Arc::new(AtomicU64::new(0));
        let platform = Self {
            rng: StdRng::seed_from_u64(seed),
            clock: clock.clone(),
        };
        (platform, SimulatedClock(clock))
    }
}

/// Moves a [`SimulatedPlatform`]'s clock forward.
#[derive(Clone)]
pub struct SimulatedClock(Arc<AtomicU64>);

impl SimulatedClock {
    /// Advances the clock by `millis`.
    pub fn advance(&self, millis: u64) {
        self.0.fetch_add(millis, Ordering::SeqCst);
    }
}

impl Platform for SimulatedPlatform {
    fn now_millis(&self) -> u64 {
        self.clock.load(Ordering::SeqCst)
    }
    fn fill_random(&mut self, out: &mut [u8]) {
        self.rng.fill_bytes(out);
    }
    fn describe(&self) -> &'static str {
        "simulated HSM (tests only)"
    }
}
