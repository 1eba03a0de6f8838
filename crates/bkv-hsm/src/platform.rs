//! The one seam between the trusted code and the world: a clock, random numbers, and
//! the platform's attestation of which code runs.
//!
//! The HSM program reaches nothing else: no sockets, no files, no host clock. A real
//! HSM or enclave implements [`Platform`] with its own hardware; [`SoftwarePlatform`]
//! is the development stand-in and [`SimulatedPlatform`] serves deterministic tests.

use ed25519_dalek::{Signer, SigningKey};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_core::{CryptoRng, OsRng, RngCore};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the trusted code needs from the machine it runs on.
pub trait Platform: Send + Sync + 'static {
    /// Milliseconds on the HSM's own monotonic clock (never the host's claim of the time).
    fn now_millis(&self) -> u64;
    /// Fills `out` with cryptographically secure random bytes.
    fn fill_random(&self, out: &mut [u8]);
    /// A name for logs and banners, saying what kind of HSM this is.
    fn describe(&self) -> &'static str;
    /// SHA-256 measurement of the code this HSM runs.
    fn measurement(&self) -> [u8; 32];
    /// The platform's signature over `statement` (an attestation the code cannot forge).
    fn certify(&self, statement: &[u8]) -> [u8; 64];
    /// The public key that verifies [`Platform::certify`]; the root HSMs trust each other by.
    fn attestation_root(&self) -> [u8; 32];
}

/// Adapts a [`Platform`] to the `rand_core` traits the cryptography crates take.
pub(crate) struct PlatformRng<'a, P: Platform + ?Sized>(pub(crate) &'a P);

impl<P: Platform + ?Sized> RngCore for PlatformRng<'_, P> {
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

impl<P: Platform + ?Sized> CryptoRng for PlatformRng<'_, P> {}

/// Environment variable that changes the software HSM's measurement, standing in for a
/// different build of the HSM program (tests use it to play a tampered binary).
pub const BUILD_TAG_ENV: &str = "BKV_SOFTWARE_HSM_BUILD_TAG";

/// The development HSM: the operating system's RNG, a process-local monotonic clock, and a
/// dev platform key (made by `bkv fleet init`) that certifies the SHA-256 of this binary.
/// It is not tamper resistant and says so.
pub struct SoftwarePlatform {
    started: Instant,
    root: SigningKey,
    measurement: [u8; 32],
}

impl SoftwarePlatform {
    /// Makes the development platform around the dev platform key, and logs that it is
    /// for development only. The measurement is the SHA-256 of the running executable.
    pub fn new(platform_key: &[u8; 32]) -> std::io::Result<Self> {
        tracing::warn!("software HSM: for development only; it is not tamper resistant and holds its secrets in ordinary memory");
        let exe = std::fs::read(std::env::current_exe()?)?;
        let mut hash = Sha256::new();
        hash.update(b"bkv/v1/software-hsm-measurement\0");
        hash.update(&exe);
        if let Ok(tag) = std::env::var(BUILD_TAG_ENV) {
            hash.update(tag.as_bytes());
        }
        Ok(Self {
            started: Instant::now(),
            root: SigningKey::from_bytes(platform_key),
            measurement: hash.finalize().into(),
        })
    }
}

/// The public platform root of the development platform key: what auditors pin.
pub fn software_platform_root(platform_key: &[u8; 32]) -> [u8; 32] {
    SigningKey::from_bytes(platform_key)
        .verifying_key()
        .to_bytes()
}

impl Platform for SoftwarePlatform {
    fn now_millis(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
    fn fill_random(&self, out: &mut [u8]) {
        OsRng.fill_bytes(out);
    }
    fn describe(&self) -> &'static str {
        "software HSM (development only)"
    }
    fn measurement(&self) -> [u8; 32] {
        self.measurement
    }
    fn certify(&self, statement: &[u8]) -> [u8; 64] {
        self.root.sign(statement).to_bytes()
    }
    fn attestation_root(&self) -> [u8; 32] {
        self.root.verifying_key().to_bytes()
    }
}

/// A seeded platform whose clock moves only when a test says so.
pub struct SimulatedPlatform {
    rng: Mutex<StdRng>,
    clock: Arc<AtomicU64>,
    root: SigningKey,
    measurement: [u8; 32],
}

impl SimulatedPlatform {
    /// A platform with a deterministic RNG, a clock at zero, the shared test root and the
    /// given code measurement; the returned handle moves the clock.
    pub fn new(seed: u64, measurement: [u8; 32]) -> (Self, SimulatedClock) {
        let clock = Arc::new(AtomicU64::new(0));
        let platform = Self {
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            clock: clock.clone(),
            root: SigningKey::from_bytes(&[0x5e; 32]),
            measurement,
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
    fn fill_random(&self, out: &mut [u8]) {
        self.rng.lock().expect("rng lock").fill_bytes(out);
    }
    fn describe(&self) -> &'static str {
        "simulated HSM (tests only)"
    }
    fn measurement(&self) -> [u8; 32] {
        self.measurement
    }
    fn certify(&self, statement: &[u8]) -> [u8; 64] {
        self.root.sign(statement).to_bytes()
    }
    fn attestation_root(&self) -> [u8; 32] {
        self.root.verifying_key().to_bytes()
    }
}
