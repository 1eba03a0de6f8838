//! The record table: the replicated state machine of a fleet.
//!
//! A pure, deterministic `apply(command) -> outcome` over in-memory state, with no
//! cryptography, clock or I/O, so that every HSM of a fleet that applies the same
//! commands in the same order holds the same table. Guess accounting lives here:
//! a guess is spent by [`Command::SpendGuess`] before any KE2 leaves the HSM.

use bkv_core::{AccountId, KsfParams};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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

/// Every record of a fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordTable {
    slots: BTreeMap<AccountId, Slot>,
}

impl RecordTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of accounts with a live record.
    pub fn active_records(&self) -> usize {
        self.slots
            .values()
            .filter(|s| matches!(s, Slot::Active(_)))
            .count()
    }

    /// Every account the table holds a slot for (live or destroyed).
    pub fn accounts(&self) -> impl Iterator<Item = &AccountId> {
        self.slots.keys()
    }

    /// What the table holds for `account`.
    pub fn get(&self, account: &AccountId) -> RecordView<'_> {
        match self.slots.get(account) {
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
                let generation = match self.slots.get(account) {
                    None => 1,
                    Some(Slot::Active(r)) => r.generation + 1,
                    Some(Slot::Destroyed { generation }) => generation + 1,
                };
                self.slots.insert(
                    account.clone(),
                    Slot::Active(ActiveRecord {
                        generation,
                        enrollment: enrollment.clone(),
                        attempts_left: *max_attempts,
                        max_attempts: *max_attempts,
                    }),
                );
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
        match self.slots.get_mut(account) {
            None => Err(Outcome::NotEnrolled),
            Some(Slot::Destroyed { .. }) => Err(Outcome::AlreadyDestroyed),
            Some(Slot::Active(r)) if r.generation != generation => Err(Outcome::StaleGeneration),
            Some(Slot::Active(r)) => Ok(r),
        }
    }

    fn destroy(&mut self, account: &AccountId) -> Outcome {
        let generation = match self.slots.get(account) {
            Some(Slot::Active(r)) => r.generation,
            _ => return Outcome::AlreadyDestroyed,
        };
        // Dropping the record zeroizes its secrets (Zeroizing buffers).
        self.slots
            .insert(account.clone(), Slot::Destroyed { generation });
        Outcome::Destroyed
    }
}

#[cfg(test)]
mod tests;
