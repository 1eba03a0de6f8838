//! The record table: the replicated state machine of a fleet.
//!
//! A pure, deterministic `apply(command) -> outcome` over in-memory state, with no
//! cryptography, clock or I/O, so that every HSM of a fleet that applies the same
//! commands in the same order holds the same table. Guess accounting lives here:
//! a guess is spent by [`Command::SpendGuess`] before any KE2 leaves the HSM.

use bkv_core::{AccountId, KsfParams};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use zeroize::Zeroizing;

/// What an enrollment stores: the OPAQUE password file and the client-wrapped backup key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// Serialized OPAQUE `ServerRegistration` (client public key, masking key, envelope).
    pub registration: Zeroizing<Vec<u8>>,
    /// Backup key sealed by the client under a key only its PIN can rebuild.
    pub wrapped_key: Zeroizing<Vec<u8>>,
    /// Argon2id cost the client used.
    pub ksf: KsfParams,
    /// The HSM's random salt for this enrollment's OPRF key.
    pub oprf_salt: [u8; 16],
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("registration", &"(redacted)")
            .field("wrapped_key", &"(redacted)")
            .field("ksf", &self.ksf)
            .field("oprf_salt", &"(redacted)")
            .finish()
    }
}

/// A change to the table. Commands carry the generation they were decided against, so
/// that a command meant for an enrollment never touches the one that replaced it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Store a new enrollment with a full guess budget, replacing any earlier one.
    Enroll {
        /// Whose record.
        account: AccountId,
        /// What to store.
        enrollment: Enrollment,
        /// The guess budget.
        max_attempts: u32,
    },
    /// Spend one guess; with none left, destroy the record instead.
    SpendGuess {
        /// Whose record.
        account: AccountId,
        /// The enrollment the guess is against.
        generation: u64,
    },
    /// Restore the full budget after a correct PIN.
    ResetGuesses {
        /// Whose record.
        account: AccountId,
        /// The enrollment the PIN was proven for.
        generation: u64,
    },
    /// Destroy the record because its owner moved it to another fleet (proven by a correct
    /// PIN on this enrollment: see `FleetHsm::retire`).
    Retire {
        /// Whose record.
        account: AccountId,
        /// The enrollment the PIN was proven for.
        generation: u64,
    },
    /// Destroy the record for good, if it has no guess left (a command decided on a stale
    /// view never destroys a record whose budget was restored meanwhile).
    Destroy {
        /// Whose record.
        account: AccountId,
        /// The enrollment to destroy.
        generation: u64,
    },
}

/// The result of applying a [`Command`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The enrollment is stored under this generation.
    Enrolled {
        /// Generation of the new enrollment.
        generation: u64,
        /// The full budget.
        attempts_left: u32,
    },
    /// A guess was spent; this many remain.
    GuessSpent {
        /// Guesses left after this one.
        attempts_left: u32,
    },
    /// The budget is full again.
    GuessesReset {
        /// The full budget.
        attempts_left: u32,
    },
    /// The record was destroyed by this command.
    Destroyed,
    /// The record was retired (destroyed at its owner's request) by this command.
    Retired,
    /// There is no record for the account.
    NotEnrolled,
    /// The record had already been destroyed.
    AlreadyDestroyed,
    /// The record was replaced since the command was decided; nothing changed.
    StaleGeneration,
    /// `Destroy` was refused: the record still has guesses (a correct PIN restored them).
    GuessesLeft {
        /// Guesses left.
        attempts_left: u32,
    },
}

/// A live record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveRecord {
    /// Increases with every enrollment of the account.
    pub generation: u64,
    /// What the client stored.
    pub enrollment: Enrollment,
    /// Guesses that may still be spent.
    pub attempts_left: u32,
    /// The budget a correct PIN restores.
    pub max_attempts: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Slot {
    Active(ActiveRecord),
    // Only the generation survives destruction: the secrets are gone for good.
    Destroyed { generation: u64 },
}

/// What the table holds for one account.
#[derive(Debug, PartialEq, Eq)]
pub enum RecordView<'a> {
    /// Never enrolled.
    NotEnrolled,
    /// Enrolled and usable.
    Active(&'a ActiveRecord),
    /// Destroyed after its guesses ran out (or on request).
    Destroyed,
}

/// Shards of the table. Each is shared copy-on-write, so that a copy of the whole table
/// (for a snapshot) costs one reference count per shard, and a write made while a copy
/// is alive duplicates only the shard it touches.
const SHARDS: usize = 16_384;

type Shard = BTreeMap<AccountId, Slot>;

/// Every record of a fleet. Cloning it is cheap (see [`SHARDS`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordTable {
    shards: Vec<Arc<Shard>>,
    // Accounts with a slot, live or destroyed (a slot is never removed).
    accounts: usize,
}

impl Default for RecordTable {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Arc::default()).collect(),
            accounts: 0,
        }
    }
}

// The shard of an account only places it in this HSM's memory: SipHash with fixed keys
// is stable within the process, which is all that is needed (snapshots carry one map).
fn shard_of(account: &AccountId) -> usize {
    let mut hasher = std::hash::DefaultHasher::new();
    account.hash(&mut hasher);
    (hasher.finish() % SHARDS as u64) as usize
}

impl RecordTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of accounts with a live record.
    pub fn active_records(&self) -> usize {
        self.slots()
            .filter(|(_, s)| matches!(s, Slot::Active(_)))
            .count()
    }

    /// How many accounts the table holds a slot for (live or destroyed).
    pub fn len(&self) -> usize {
        self.accounts
    }

    /// Whether the table holds no account at all.
    pub fn is_empty(&self) -> bool {
        self.accounts == 0
    }

    /// Every account the table holds a slot for (live or destroyed).
    pub fn accounts(&self) -> impl Iterator<Item = &AccountId> {
        self.slots().map(|(account, _)| account)
    }

    fn slots(&self) -> impl Iterator<Item = (&AccountId, &Slot)> {
        self.shards.iter().flat_map(|shard| shard.iter())
    }

    fn shard(&self, account: &AccountId) -> &Shard {
        &self.shards[shard_of(account)]
    }

    fn shard_mut(&mut self, account: &AccountId) -> &mut Shard {
        Arc::make_mut(&mut self.shards[shard_of(account)])
    }

    /// What the table holds for `account`.
    pub fn get(&self, account: &AccountId) -> RecordView<'_> {
        match self.shard(account).get(account) {
            None => RecordView::NotEnrolled,
            Some(Slot::Active(record)) => RecordView::Active(record),
            Some(Slot::Destroyed { .. }) => RecordView::Destroyed,
        }
    }

    /// Applies one command. Deterministic: the same commands in the same order give the same table.
    pub fn apply(&mut self, command: &Command) -> Outcome {
        match command {
            Command::Enroll {
                account,
                enrollment,
                max_attempts,
            } => {
                let slots = self.shard_mut(account);
                let generation = match slots.get(account) {
                    None => 1,
                    Some(Slot::Active(r)) => r.generation + 1,
                    Some(Slot::Destroyed { generation }) => generation + 1,
                };
                let replaced = slots.insert(
                    account.clone(),
                    Slot::Active(ActiveRecord {
                        generation,
                        enrollment: enrollment.clone(),
                        attempts_left: *max_attempts,
                        max_attempts: *max_attempts,
                    }),
                );
                if replaced.is_none() {
                    self.accounts += 1;
                }
                Outcome::Enrolled {
                    generation,
                    attempts_left: *max_attempts,
                }
            }
            Command::SpendGuess {
                account,
                generation,
            } => match self.live(account, *generation) {
                Err(outcome) => outcome,
                Ok(record) if record.attempts_left == 0 => self.destroy(account),
                Ok(record) => {
                    record.attempts_left -= 1;
                    Outcome::GuessSpent {
                        attempts_left: record.attempts_left,
                    }
                }
            },
            Command::ResetGuesses {
                account,
                generation,
            } => match self.live(account, *generation) {
                Err(outcome) => outcome,
                Ok(record) => {
                    record.attempts_left = record.max_attempts;
                    Outcome::GuessesReset {
                        attempts_left: record.attempts_left,
                    }
                }
            },
            Command::Retire {
                account,
                generation,
            } => match self.live(account, *generation) {
                Err(outcome) => outcome,
                Ok(_) => {
                    self.destroy(account);
                    Outcome::Retired
                }
            },
            Command::Destroy {
                account,
                generation,
            } => match self.live(account, *generation) {
                Err(outcome) => outcome,
                Ok(record) if record.attempts_left > 0 => Outcome::GuessesLeft {
                    attempts_left: record.attempts_left,
                },
                Ok(_) => self.destroy(account),
            },
        }
    }

    fn live(&mut self, account: &AccountId, generation: u64) -> Result<&mut ActiveRecord, Outcome> {
        match self.shard_mut(account).get_mut(account) {
            None => Err(Outcome::NotEnrolled),
            Some(Slot::Destroyed { .. }) => Err(Outcome::AlreadyDestroyed),
            Some(Slot::Active(r)) if r.generation != generation => Err(Outcome::StaleGeneration),
            Some(Slot::Active(r)) => Ok(r),
        }
    }

    fn destroy(&mut self, account: &AccountId) -> Outcome {
        let Some(slot) = self.shard_mut(account).get_mut(account) else {
            return Outcome::AlreadyDestroyed;
        };
        let Slot::Active(record) = slot else {
            return Outcome::AlreadyDestroyed;
        };
        let generation = record.generation;
        // Dropping the record zeroizes its secrets (Zeroizing buffers).
        *slot = Slot::Destroyed { generation };
        Outcome::Destroyed
    }
}

// On the wire (snapshots) the table is one map, whatever the shards.
impl Serialize for RecordTable {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.accounts))?;
        for (account, slot) in self.slots() {
            map.serialize_entry(account, slot)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for RecordTable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TableVisitor;
        impl<'de> serde::de::Visitor<'de> for TableVisitor {
            type Value = RecordTable;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of accounts to records")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RecordTable, A::Error> {
                let mut table = RecordTable::default();
                while let Some((account, slot)) = map.next_entry::<AccountId, Slot>()? {
                    if table.shard_mut(&account).insert(account, slot).is_some() {
                        return Err(serde::de::Error::custom("an account appears twice"));
                    }
                    table.accounts += 1;
                }
                Ok(table)
            }
        }
        deserializer.deserialize_map(TableVisitor)
    }
}

#[cfg(test)]
mod tests;
