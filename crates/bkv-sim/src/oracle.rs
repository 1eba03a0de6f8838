//! The oracle: what the world could have done, counted on the client side, against what
//! the fleet committed, read from every live member's applied log.
//!
//! The client side counts, per account, every KE2 a client received (a tested guess,
//! whether or not the client went on), every recovery start that failed (it may still
//! have committed its guess), every correct KE3 sent, every key released and every
//! enrollment attempted and acknowledged. The fleet side is the committed ledger,
//! replayed through an independent model of the record table. The checks:
//!
//! - agreement: members never disagree on a committed entry, and the committed ledger
//!   never loses an entry (I3 for everything, while a majority lives);
//! - no free guess (I1, I2): KE2s received ≤ guesses committed;
//! - guesses count exactly: guesses committed ≤ KE2s received + failed starts (no
//!   duplicate or replay charges a guess twice, nothing charges one no client asked for);
//! - the budget (I1): no generation ever has more guesses committed since its last
//!   enrollment or correct PIN than `max_attempts`;
//! - refills are earned: budget resets committed ≤ correct KE3s sent; keys released for
//!   a generation ≤ resets committed for it (I2 for the key);
//! - acknowledged enrollments are in the ledger (I3); enrollments committed ≤ attempted;
//! - each member's applied records equal the model's (a destroyed record stays
//!   destroyed, I4; budgets are exactly what the ledger says).
//!
//! "≤ committed" checks may lag (an acknowledging leader may crash before a follower
//! applies), so they must hold within a grace of steps, and strictly once the fleet has settled.

use bkv_core::AccountId;
use bkv_hsm::fleet::audit::{AuditView, LedgerChange, LedgerEntry, RecordAudit};
use std::collections::BTreeMap;

/// Steps a lagging "≤ committed" check may stay unmet before it is a violation.
pub const GRACE_STEPS: usize = 25;

#[derive(Clone, Copy, Debug)]
struct ModelRecord {
    generation: u64,
    attempts_left: u32,
    max_attempts: u32,
    destroyed: bool,
    spent_since_refill: u32,
}

/// The model's record if it is live and of `generation`: the only one a command for that
/// enrollment may change, as in the real table.
fn live(record: &mut Option<ModelRecord>, generation: u64) -> Option<&mut ModelRecord> {
    record
        .as_mut()
        .filter(|r| !r.destroyed && r.generation == generation)
}

/// Everything known about one account.
#[derive(Debug, Default)]
struct Book {
    record: Option<ModelRecord>,
    // Client side.
    ke2: u64,
    failed_starts: u64,
    correct_ke3: u64,
    released: BTreeMap<u64, u64>,
    released_unknown: Vec<[u8; 32]>,
    enroll_calls: u64,
    acked: Vec<[u8; 32]>,
    // Fleet side.
    spends: u64,
    resets: u64,
    resets_by_generation: BTreeMap<u64, u64>,
    enrolls: u64,
    digests: BTreeMap<[u8; 32], u64>,
}

/// Which deliberate harness bug a run plays (to show the oracle is not vacuous).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokenMode {
    /// The oracle's view of the fleet misses one committed guess per account, as if the
    /// HSM had let a KE2 out without committing its guess.
    UncountedGuess,
    /// After a wrong guess, the harness secretly logs in with the right PIN (resetting the
    /// budget) without telling the oracle: guesses beyond the budget go uncounted.
    HiddenReset,
}

/// The oracle of one run.
#[derive(Default)]
pub struct Oracle {
    books: BTreeMap<AccountId, Book>,
    ledger: Vec<LedgerEntry>,
    cursors: BTreeMap<u64, u64>,
    lagging: BTreeMap<String, usize>,
    broken: Option<BrokenMode>,
    hidden: BTreeMap<AccountId, bool>,
}

impl Oracle {
    /// An oracle, optionally for a deliberately broken harness.
    pub fn new(broken: Option<BrokenMode>) -> Self {
        Self {
            broken,
            ..Self::default()
        }
    }

    fn book(&mut self, account: &AccountId) -> &mut Book {
        self.books.entry(account.clone()).or_default()
    }

    /// A client received a KE2: one guess can be tested.
    pub fn ke2(&mut self, account: &AccountId) {
        self.book(account).ke2 += 1;
    }

    /// A recovery start failed (its guess may still have been committed).
    pub fn start_failed(&mut self, account: &AccountId) {
        self.book(account).failed_starts += 1;
    }

    /// A client sends a KE3 that verifies (it knew the PIN).
    pub fn correct_ke3(&mut self, account: &AccountId) {
        self.book(account).correct_ke3 += 1;
    }

    /// A client got its wrapped key back; `digest` names the enrollment.
    pub fn released(&mut self, account: &AccountId, digest: [u8; 32]) {
        self.book(account).released_unknown.push(digest);
    }

    /// A client asks to finish an enrollment (it may commit, even if the call fails).
    pub fn enroll_called(&mut self, account: &AccountId) {
        self.book(account).enroll_calls += 1;
    }

    /// An enrollment was acknowledged.
    pub fn enroll_acked(&mut self, account: &AccountId, digest: [u8; 32]) {
        self.book(account).acked.push(digest);
    }

    /// Committed entries known.
    pub fn committed(&self) -> u64 {
        self.ledger.len() as u64
    }

    /// Reads one member's applied state: checks it against the ledger and the model, and
    /// extends the ledger with what is new.
    pub fn ingest(&mut self, dc: &str, node_id: u64, view: &AuditView) -> Vec<String> {
        let mut found = Vec::new();
        for entry in &view.entries {
            let i = entry.index as usize;
            if i == 0 {
                continue;
            }
            if i <= self.ledger.len() {
                if self.ledger[i - 1] != *entry {
                    found.push(format!(
                        "agreement: member {node_id} in {dc} applied {:?} at index {i}, the fleet committed {:?}",
                        entry, self.ledger[i - 1]
                    ));
                }
            } else if i == self.ledger.len() + 1 {
                self.ledger.push(entry.clone());
                found.extend(self.apply(entry));
            }
            self.cursors.insert(node_id, entry.index);
        }
        if view.applied_index as usize == self.ledger.len() {
            found.extend(self.compare_records(dc, node_id, view));
        }
        found
    }

    /// Where to read `node_id`'s log from next.
    pub fn cursor(&self, node_id: u64) -> u64 {
        self.cursors.get(&node_id).map(|c| c + 1).unwrap_or(1)
    }

    fn apply(&mut self, entry: &LedgerEntry) -> Vec<String> {
        entry
            .changes
            .iter()
            .flat_map(|change| self.apply_change(change))
            .collect()
    }

    fn apply_change(&mut self, change: &LedgerChange) -> Vec<String> {
        let mut found = Vec::new();
        let broken = self.broken;
        match change {
            LedgerChange::Enroll {
                account,
                wrapped_key_digest,
                max_attempts,
            } => {
                let book = self.book(account);
                let generation = book.record.map(|r| r.generation + 1).unwrap_or(1);
                book.record = Some(ModelRecord {
                    generation,
                    attempts_left: *max_attempts,
                    max_attempts: *max_attempts,
                    destroyed: false,
                    spent_since_refill: 0,
                });
                book.enrolls += 1;
                book.digests.insert(*wrapped_key_digest, generation);
            }
            LedgerChange::SpendGuess {
                account,
                generation,
            } => {
                let hide = broken == Some(BrokenMode::UncountedGuess)
                    && !self.hidden.get(account).copied().unwrap_or(false);
                let book = self.books.entry(account.clone()).or_default();
                if let Some(r) = live(&mut book.record, *generation) {
                    if r.attempts_left == 0 {
                        r.destroyed = true;
                    } else if hide {
                        self.hidden.insert(account.clone(), true);
                    } else {
                        r.attempts_left -= 1;
                        r.spent_since_refill += 1;
                        book.spends += 1;
                        if r.spent_since_refill > r.max_attempts {
                            found.push(format!(
                                "I1: {account} generation {generation} had {} guesses since its last refill, budget {}",
                                r.spent_since_refill, r.max_attempts
                            ));
                        }
                    }
                }
            }
            LedgerChange::ResetGuesses {
                account,
                generation,
            } => {
                let book = self.book(account);
                if let Some(r) = live(&mut book.record, *generation) {
                    r.attempts_left = r.max_attempts;
                    r.spent_since_refill = 0;
                    book.resets += 1;
                    *book.resets_by_generation.entry(*generation).or_default() += 1;
                }
            }
            LedgerChange::Destroy {
                account,
                generation,
            } => {
                let book = self.book(account);
                if let Some(r) = live(&mut book.record, *generation) {
                    if r.attempts_left == 0 {
                        r.destroyed = true;
                    }
                }
            }
            LedgerChange::Retire {
                account,
                generation,
            } => {
                let book = self.book(account);
                if let Some(r) = live(&mut book.record, *generation) {
                    r.destroyed = true;
                }
            }
        }
        found
    }

    fn compare_records(&self, dc: &str, node_id: u64, view: &AuditView) -> Vec<String> {
        let mut found = Vec::new();
        let model: BTreeMap<&AccountId, RecordAudit> = self
            .books
            .iter()
            .filter_map(|(a, b)| {
                b.record.map(|r| {
                    let audit = if r.destroyed {
                        RecordAudit::Destroyed
                    } else {
                        RecordAudit::Active {
                            generation: r.generation,
                            attempts_left: r.attempts_left,
                        }
                    };
                    (a, audit)
                })
            })
            .collect();
        let actual: BTreeMap<&AccountId, RecordAudit> =
            view.records.iter().map(|(a, r)| (a, *r)).collect();
        if model != actual {
            for (account, want) in &model {
                let got = actual.get(account);
                if got != Some(want) {
                    let rule = if *want == RecordAudit::Destroyed {
                        "I4"
                    } else {
                        "state"
                    };
                    found.push(format!(
                        "{rule}: member {node_id} in {dc} holds {got:?} for {account}, the committed ledger says {want:?}"
                    ));
                }
            }
            for account in actual.keys().filter(|a| !model.contains_key(*a)) {
                found.push(format!(
                    "state: member {node_id} in {dc} holds a record for {account} the ledger never enrolled"
                ));
            }
        }
        found
    }

    /// Checks the counting invariants after a step; `settled` makes lagging checks strict.
    pub fn check(&mut self, step: usize, settled: bool) -> Vec<String> {
        let mut now = Vec::new();
        let mut lagging = Vec::new();
        for (account, book) in &mut self.books {
            // Released keys whose enrollment is now known are attributed to it.
            let unknown = std::mem::take(&mut book.released_unknown);
            for digest in unknown {
                match book.digests.get(&digest) {
                    Some(g) => *book.released.entry(*g).or_default() += 1,
                    None => book.released_unknown.push(digest),
                }
            }
            if book.spends > book.ke2 + book.failed_starts {
                now.push(format!(
                    "count: {account} has {} guesses committed but clients asked for at most {} ({} KE2, {} failed starts)",
                    book.spends, book.ke2 + book.failed_starts, book.ke2, book.failed_starts
                ));
            }
            if book.resets > book.correct_ke3 {
                now.push(format!(
                    "I1: {account} had its budget reset {} times but only {} correct KE3s were sent",
                    book.resets, book.correct_ke3
                ));
            }
            if book.enrolls > book.enroll_calls {
                now.push(format!(
                    "state: {account} has {} enrollments committed but only {} were attempted",
                    book.enrolls, book.enroll_calls
                ));
            }
            if book.ke2 > book.spends {
                lagging.push((
                    format!("I1/I2 {account} ke2"),
                    format!(
                        "I1/I2: {account} got {} KE2s (tested guesses) but only {} guesses are committed",
                        book.ke2, book.spends
                    ),
                ));
            }
            for (generation, n) in &book.released {
                let resets = book
                    .resets_by_generation
                    .get(generation)
                    .copied()
                    .unwrap_or(0);
                if *n > resets {
                    lagging.push((
                        format!("I2 {account} {generation}"),
                        format!("I2: {account} generation {generation} released its key {n} times after {resets} committed resets"),
                    ));
                }
            }
            if !book.released_unknown.is_empty() {
                lagging.push((
                    format!("I2 {account} unknown"),
                    format!(
                        "I2: {account} released a key of an enrollment the ledger does not hold"
                    ),
                ));
            }
            for digest in &book.acked {
                if !book.digests.contains_key(digest) {
                    lagging.push((
                        format!("I3 {account} {}", hex8(digest)),
                        format!("I3: {account}'s acknowledged enrollment {} is not in the committed ledger", hex8(digest)),
                    ));
                }
            }
        }
        let still: Vec<String> = lagging.iter().map(|(k, _)| k.clone()).collect();
        self.lagging.retain(|k, _| still.contains(k));
        for (key, what) in lagging {
            let since = *self.lagging.entry(key).or_insert(step);
            if settled || step.saturating_sub(since) >= GRACE_STEPS {
                now.push(what);
            }
        }
        now
    }
}

fn hex8(d: &[u8; 32]) -> String {
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}
