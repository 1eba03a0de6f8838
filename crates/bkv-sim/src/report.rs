//! What a run did and found: faults injected by kind, client operations by outcome,
//! violations, and the step trace that reproduces them.

use serde::Serialize;
use std::ops::AddAssign;

/// Faults injected, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FaultCounts {
    /// Requests or answers lost.
    pub drops: u64,
    /// Requests delivered twice.
    pub dups: u64,
    /// Messages held 20–300 ms.
    pub delays: u64,
    /// Messages delivered after a later one on the same link.
    pub reorders: u64,
    /// Old peer messages, answers or join answers delivered again.
    pub replays: u64,
    /// Partitions made.
    pub partitions: u64,
    /// Partitions healed.
    pub heals: u64,
    /// Members crashed (their HSM memory gone).
    pub crashes: u64,
    /// Fresh members started in a crashed member's datacenter.
    pub restarts: u64,
}

/// Client operations, by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OpCounts {
    /// Enrollments acknowledged.
    pub enrolls: u64,
    /// Recoveries that released the backup key.
    pub recoveries: u64,
    /// Wrong PINs that got a KE2 (a tested guess).
    pub wrong_guesses: u64,
    /// Operations that failed (no leader, no majority, destroyed record, …).
    pub errors: u64,
}

impl AddAssign for FaultCounts {
    fn add_assign(&mut self, o: Self) {
        self.drops += o.drops;
        self.dups += o.dups;
        self.delays += o.delays;
        self.reorders += o.reorders;
        self.replays += o.replays;
        self.partitions += o.partitions;
        self.heals += o.heals;
        self.crashes += o.crashes;
        self.restarts += o.restarts;
    }
}

impl AddAssign for OpCounts {
    fn add_assign(&mut self, o: Self) {
        self.enrolls += o.enrolls;
        self.recoveries += o.recoveries;
        self.wrong_guesses += o.wrong_guesses;
        self.errors += o.errors;
    }
}

/// One broken invariant.
#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    /// The step after which it was seen.
    pub step: usize,
    /// Which invariant and how.
    pub what: String,
}

/// The result of one seeded run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Steps run.
    pub steps: usize,
    /// Faults injected.
    pub faults: FaultCounts,
    /// Client operations.
    pub ops: OpCounts,
    /// Broken invariants (empty when all held).
    pub violations: Vec<Violation>,
    /// What each step did, in order: the reproducing trace.
    pub trace: Vec<String>,
    /// Committed log entries at the end.
    pub committed_entries: u64,
}

impl std::fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "drops {} dups {} delays {} reorders {} replays {} partitions {} heals {} crashes {} restarts {}",
            self.drops, self.dups, self.delays, self.reorders, self.replays,
            self.partitions, self.heals, self.crashes, self.restarts
        )
    }
}

impl std::fmt::Display for OpCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "enrolls {} recoveries {} wrong guesses {} errors {}",
            self.enrolls, self.recoveries, self.wrong_guesses, self.errors
        )
    }
}
