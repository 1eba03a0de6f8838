//! Deterministic simulation of whole bkv fleets under faults.
//!
//! A run starts a fleet of real [`bkv_hsm::FleetHsm`] members in one process, on a tokio
//! current-thread runtime whose clock is paused (simulated time), connected by a
//! simulated network that drops, duplicates, delays, reorders and replays their sealed
//! messages and cuts them into partitions; members crash (their memory is gone) and
//! restart as new members that join through attestation, as real nodes do. Real OPAQUE
//! clients enroll, recover, guess wrong and re-enroll meanwhile. After every step an
//! [`oracle::Oracle`] checks the fleet's committed state against what the clients could
//! do (DESIGN.md §7, I1–I4). Everything is drawn from one seed.
//!
//! Not here: real sockets or processes (see `crates/bkv/tests/chaos.rs`), or Byzantine
//! HSMs (the HSM code is trusted; the host around it is not).
#![forbid(unsafe_code)]

pub mod client;
pub mod network;
mod ops;
pub mod oracle;
pub mod platform;
pub mod report;
mod world;

pub use oracle::BrokenMode;
pub use report::{FaultCounts, OpCounts, Report, Violation};

/// Which kinds of fault a run may inject (all by default; fewer when shrinking a trace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultKinds {
    /// Lost requests and answers.
    pub drops: bool,
    /// Duplicated requests.
    pub dups: bool,
    /// Delayed messages.
    pub delays: bool,
    /// Held messages that later ones overtake.
    pub reorders: bool,
    /// Old messages, answers and join answers delivered again.
    pub replays: bool,
    /// Partitions and heals.
    pub partitions: bool,
    /// Crashes and restarts.
    pub crashes: bool,
}

impl FaultKinds {
    /// Every kind of fault.
    pub const ALL: FaultKinds = FaultKinds {
        drops: true,
        dups: true,
        delays: true,
        reorders: true,
        replays: true,
        partitions: true,
        crashes: true,
    };
    /// No fault at all.
    pub const NONE: FaultKinds = FaultKinds {
        drops: false,
        dups: false,
        delays: false,
        reorders: false,
        replays: false,
        partitions: false,
        crashes: false,
    };
}

/// What one run simulates.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seed every decision is drawn from.
    pub seed: u64,
    /// Steps (each: faults, one to three concurrent client operations, a check).
    pub steps: usize,
    /// Members of the fleet (one per datacenter).
    pub members: usize,
    /// Accounts the clients use.
    pub accounts: usize,
    /// Guess budget per record.
    pub max_attempts: u32,
    /// Kinds of fault injected.
    pub faults: FaultKinds,
    /// A deliberately broken harness, to show the oracle catches what it should.
    pub broken: Option<BrokenMode>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            steps: 50,
            members: 3,
            accounts: 4,
            max_attempts: 3,
            faults: FaultKinds::ALL,
            broken: None,
        }
    }
}

/// Runs one seeded simulation to its end (or its first violation).
pub fn run(config: &SimConfig) -> Report {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(world::World::new(config.clone()).run())
}

/// Finds a shorter run that still breaks an invariant: fewer steps first, then fewer
/// kinds of fault. Returns the smallest failing configuration found.
pub fn shrink(config: &SimConfig) -> (SimConfig, Report) {
    let mut best = config.clone();
    let mut report = run(&best);
    if report.violations.is_empty() {
        return (best, report);
    }
    // The schedule of step k does not depend on later steps: the first failing step bounds it.
    let first = report.violations[0].step + 1;
    let (mut lo, mut hi) = (1, first.min(best.steps));
    while lo < hi {
        let mid = (lo + hi) / 2;
        let candidate = SimConfig {
            steps: mid,
            ..best.clone()
        };
        let r = run(&candidate);
        if r.violations.is_empty() {
            lo = mid + 1;
        } else {
            hi = mid;
            report = r;
        }
    }
    best.steps = hi;
    type Toggle = fn(&mut FaultKinds);
    let toggles: [Toggle; 7] = [
        |k| k.drops = false,
        |k| k.dups = false,
        |k| k.delays = false,
        |k| k.reorders = false,
        |k| k.replays = false,
        |k| k.partitions = false,
        |k| k.crashes = false,
    ];
    for toggle in toggles {
        let mut candidate = best.clone();
        toggle(&mut candidate.faults);
        if candidate.faults == best.faults {
            continue;
        }
        let r = run(&candidate);
        if !r.violations.is_empty() {
            best = candidate;
            report = r;
        }
    }
    if report.steps != best.steps || report.violations.is_empty() {
        report = run(&best);
    }
    (best, report)
}
