//! A read-only, secret-free view of what a member has applied, for auditors and for the
//! fleet simulation (`bkv-sim`): every applied Raft entry reduced to what it did to
//! guesses, and every record's generation and budget. Nothing here can change state,
//! and nothing here reveals more than the host already sees (which account did which
//! kind of operation); an enrollment shows only a digest of its client-wrapped key.

use super::state::FleetCommand;
use super::FleetHsm;
use crate::records::{Command, RecordView};
use bkv_core::AccountId;
use openraft::EntryPayload;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// What one command of an applied entry did to the record table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LedgerChange {
    /// An enrollment, named by the SHA-256 of its client-wrapped key.
    Enroll {
        /// Whose record.
        account: AccountId,
        /// SHA-256 of the wrapped backup key (ciphertext the HSM cannot open).
        wrapped_key_digest: [u8; 32],
        /// The budget it was given.
        max_attempts: u32,
    },
    /// One guess spent (or the record destroyed if none was left).
    SpendGuess {
        /// Whose record.
        account: AccountId,
        /// The enrollment it was against.
        generation: u64,
    },
    /// The budget restored after a correct PIN.
    ResetGuesses {
        /// Whose record.
        account: AccountId,
        /// The enrollment it was for.
        generation: u64,
    },
    /// The record destroyed if it had no guess left.
    Destroy {
        /// Whose record.
        account: AccountId,
        /// The enrollment to destroy.
        generation: u64,
    },
    /// The record retired by its owner (moved to another fleet).
    Retire {
        /// Whose record.
        account: AccountId,
        /// The enrollment retired.
        generation: u64,
    },
}

/// One applied Raft entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerEntry {
    /// Raft term of the entry.
    pub term: u64,
    /// Raft log index of the entry.
    pub index: u64,
    /// What it did, command by command (none for Raft's own entries, founding and
    /// admissions).
    pub changes: Vec<LedgerChange>,
}

/// One record as this member's applied state holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordAudit {
    /// Live.
    Active {
        /// Its generation.
        generation: u64,
        /// Guesses left.
        attempts_left: u32,
    },
    /// Destroyed for good.
    Destroyed,
}

/// A member's applied state, read at one instant.
#[derive(Clone, Debug, Default)]
pub struct AuditView {
    /// Index of the last entry applied.
    pub applied_index: u64,
    /// Applied entries still in this member's log, from the index asked for on.
    pub entries: Vec<LedgerEntry>,
    /// Every record with its generation and budget, as applied up to `applied_index`.
    pub records: BTreeMap<AccountId, RecordAudit>,
}

fn changes(payload: &EntryPayload<super::TypeConfig>) -> Vec<LedgerChange> {
    match payload {
        EntryPayload::Normal(FleetCommand::Records(commands)) => {
            commands.iter().map(change).collect()
        }
        _ => Vec::new(),
    }
}

fn change(command: &Command) -> LedgerChange {
    match command.clone() {
        Command::Enroll {
            account,
            enrollment,
            max_attempts,
        } => LedgerChange::Enroll {
            account,
            wrapped_key_digest: Sha256::digest(&enrollment.wrapped_key[..]).into(),
            max_attempts,
        },
        Command::SpendGuess {
            account,
            generation,
        } => LedgerChange::SpendGuess {
            account,
            generation,
        },
        Command::ResetGuesses {
            account,
            generation,
        } => LedgerChange::ResetGuesses {
            account,
            generation,
        },
        Command::Destroy {
            account,
            generation,
        } => LedgerChange::Destroy {
            account,
            generation,
        },
        Command::Retire {
            account,
            generation,
        } => LedgerChange::Retire {
            account,
            generation,
        },
    }
}

impl FleetHsm {
    /// This member's applied state: its applied entries from `from_index` on (those still
    /// in its log) and its records. Read-only and secret-free (see the module doc).
    pub fn audit_view(&self, from_index: u64) -> AuditView {
        let (applied_index, records) = {
            let machine = self.shared.machine();
            let applied = machine.last_applied.map(|l| l.index).unwrap_or(0);
            let records = machine
                .state
                .table
                .accounts()
                .map(|account| {
                    let audit = match machine.state.table.get(account) {
                        RecordView::Active(r) => RecordAudit::Active {
                            generation: r.generation,
                            attempts_left: r.attempts_left,
                        },
                        _ => RecordAudit::Destroyed,
                    };
                    (account.clone(), audit)
                })
                .collect();
            (applied, records)
        };
        // Entries up to the applied index are committed: they can no longer change.
        let entries = if from_index > applied_index {
            Vec::new()
        } else {
            self.log.entries(from_index..=applied_index)
        };
        let entries = entries
            .iter()
            .map(|e| LedgerEntry {
                term: e.log_id.leader_id.term,
                index: e.log_id.index,
                changes: changes(&e.payload),
            })
            .collect();
        AuditView {
            applied_index,
            entries,
            records,
        }
    }
}
