//! The witness's append-only log of every epoch it signed, in `redb` (durable on commit).
//!
//! Entry `n` (epoch `n`, tlog index `n - 1`) is the bundle of that epoch. Its leaf for a
//! future C2SP transparency log is the Plexi message the witness signed
//! ([`WitnessSignature::message`]), so checkpoints can be added over the same entries
//! without changing them.

use bkv_core::bundle::{Bundle, WitnessSignature};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("bkv-witness-entries-v1");

/// Why the log refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Storage failure (nothing was appended).
    #[error("witness log storage: {0}")]
    Storage(String),
    /// The epoch does not extend the log.
    #[error("epoch {presented} does not extend the log (latest is {latest})")]
    NotNext {
        /// The epoch asked for.
        presented: u64,
        /// The log's latest epoch.
        latest: u64,
    },
    /// A different artifact was already signed for this epoch.
    #[error("epoch {0} is already signed for a different artifact")]
    Conflict(u64),
    /// No such epoch.
    #[error("epoch {0} is not in the log")]
    Unknown(u64),
}

fn storage(e: impl std::fmt::Display) -> LogError {
    LogError::Storage(e.to_string())
}

/// The log, open on one file.
pub struct WitnessLog {
    db: Database,
}

impl std::fmt::Debug for WitnessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessLog").finish_non_exhaustive()
    }
}

impl WitnessLog {
    /// Opens (or creates) the log at `path`.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let db = Database::create(path).map_err(storage)?;
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(ENTRIES).map_err(storage)?;
        txn.commit().map_err(storage)?;
        Ok(Self { db })
    }

    /// The latest entry, if any.
    pub fn latest(&self) -> Result<Option<Bundle>, LogError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(ENTRIES).map_err(storage)?;
        let last = table.last().map_err(storage)?;
        last.map(|(_, v)| decode(v.value())).transpose()
    }

    /// The entry of `epoch`.
    pub fn get(&self, epoch: u64) -> Result<Bundle, LogError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(ENTRIES).map_err(storage)?;
        let value = table.get(epoch).map_err(storage)?;
        match value {
            Some(v) => decode(v.value()),
            None => Err(LogError::Unknown(epoch)),
        }
    }

    /// Appends a new epoch: `sign` is called with the epoch's timestamp only when the epoch
    /// is the next one, and the entry is durable before this returns. Submitting the same
    /// artifact for an epoch already logged returns the logged signature (a retry).
    pub fn append(
        &self,
        epoch: u64,
        artifact: &str,
        now_ms: u64,
        sign: impl FnOnce(u64) -> Result<WitnessSignature, String>,
    ) -> Result<WitnessSignature, LogError> {
        let txn = self.db.begin_write().map_err(storage)?;
        let signature = {
            let mut table = txn.open_table(ENTRIES).map_err(storage)?;
            let last = table
                .last()
                .map_err(storage)?
                .map(|(_, v)| decode(v.value()))
                .transpose()?;
            let latest = last.as_ref().map(|b| b.witness.epoch).unwrap_or(0);
            if epoch <= latest {
                let existing = match table.get(epoch).map_err(storage)? {
                    Some(v) => decode(v.value())?,
                    None => return Err(LogError::Unknown(epoch)),
                };
                return if existing.artifact == artifact {
                    Ok(existing.witness)
                } else {
                    Err(LogError::Conflict(epoch))
                };
            }
            if epoch != latest + 1 {
                return Err(LogError::NotNext {
                    presented: epoch,
                    latest,
                });
            }
            // Timestamps never go back, whatever the host clock says.
            let timestamp = now_ms.max(last.map(|b| b.witness.timestamp).unwrap_or(0));
            let signature = sign(timestamp).map_err(LogError::Storage)?;
            let entry = Bundle {
                artifact: artifact.to_string(),
                witness: signature.clone(),
                operator_signature: None,
            };
            table
                .insert(epoch, entry.to_json().as_slice())
                .map_err(storage)?;
            signature
        };
        txn.commit().map_err(storage)?;
        Ok(signature)
    }

    /// Records the operator's counter-signature of `epoch` (already verified by the caller).
    /// Setting the same one again is a no-op; a different one is refused.
    pub fn countersign(&self, epoch: u64, signature_hex: &str) -> Result<Bundle, LogError> {
        let txn = self.db.begin_write().map_err(storage)?;
        let bundle = {
            let mut table = txn.open_table(ENTRIES).map_err(storage)?;
            let mut bundle = match table.get(epoch).map_err(storage)? {
                Some(v) => decode(v.value())?,
                None => return Err(LogError::Unknown(epoch)),
            };
            match &bundle.operator_signature {
                Some(existing) if existing.eq_ignore_ascii_case(signature_hex) => {
                    return Ok(bundle)
                }
                Some(_) => return Err(LogError::Conflict(epoch)),
                None => {}
            }
            bundle.operator_signature = Some(signature_hex.to_ascii_lowercase());
            table
                .insert(epoch, bundle.to_json().as_slice())
                .map_err(storage)?;
            bundle
        };
        txn.commit().map_err(storage)?;
        Ok(bundle)
    }
}

fn decode(bytes: &[u8]) -> Result<Bundle, LogError> {
    // No size limit here: the log holds only what this witness accepted.
    serde_json::from_slice(bytes).map_err(|e| LogError::Storage(format!("corrupt log entry: {e}")))
}
