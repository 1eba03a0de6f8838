//! Retirements the old fleet has not confirmed yet. A user moved to the active fleet is
//! found there first from then on, so a failed `Retire` would otherwise never be tried
//! again and the old record would keep its own guess budget. The release (ticket and
//! confirmation key) is kept beside the trust state, and the user's next recovery
//! retries it until the old fleet proves the record retired, or is no longer trusted.

use crate::error::ClientError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Largest file read: a few hundred bytes per pending retirement.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// One retirement waiting for the old fleet's proof.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PendingRetirement {
    /// Whose record.
    pub user: String,
    /// The fleet (hex key) that holds the record to retire.
    pub from: String,
    /// Hex of what the old fleet released: the ticket, then the confirmation key.
    pub release: Zeroizing<String>,
}

impl std::fmt::Debug for PendingRetirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingRetirement")
            .field("user", &self.user)
            .field("from", &self.from)
            .field("release", &"(redacted)")
            .finish()
    }
}

/// The file of pending retirements, beside the trust state (none in pinned mode, where
/// there is no other fleet to leave).
#[derive(Clone, Debug)]
pub(crate) struct Retirements {
    path: Option<PathBuf>,
}

impl Retirements {
    /// The pending retirements kept beside the trust state at `trust_state`.
    pub(crate) fn beside(trust_state: Option<PathBuf>) -> Self {
        Self {
            path: trust_state.map(|p| p.with_extension("retirements.json")),
        }
    }

    /// The retirement waiting for `user`, if any.
    pub(crate) fn pending(&self, user: &str) -> Result<Option<PendingRetirement>, ClientError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        Ok(load(path)?.into_iter().find(|p| p.user == user))
    }

    /// Remembers `retirement`, replacing an older one of the same user.
    pub(crate) fn remember(&self, retirement: PendingRetirement) -> Result<(), ClientError> {
        self.update(|all| {
            all.retain(|p| p.user != retirement.user);
            all.push(retirement);
        })
    }

    /// Forgets `retirement` (it is done, or its fleet is no longer trusted).
    pub(crate) fn forget(&self, retirement: &PendingRetirement) -> Result<(), ClientError> {
        self.update(|all| all.retain(|p| p != retirement))
    }

    fn update(&self, change: impl FnOnce(&mut Vec<PendingRetirement>)) -> Result<(), ClientError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        // Another client process may be changing the file at the same time.
        let _lock = crate::trust::lock_state(path)?;
        let mut all = load(path)?;
        change(&mut all);
        let bytes = Zeroizing::new(serde_json::to_vec_pretty(&all).expect("retirements serialize"));
        crate::device::write_atomically(path, &bytes[..], 0o600).map_err(|e| {
            crate::trust::state_error(path, format!("cannot record a pending retirement: {e}"))
        })
    }
}

fn load(path: &Path) -> Result<Vec<PendingRetirement>, ClientError> {
    // Damage is an error, not an empty list: that would forget a retirement.
    crate::trust::read_state_file(path, MAX_FILE_BYTES, "pending retirements")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(user: &str, release: &str) -> PendingRetirement {
        PendingRetirement {
            user: user.into(),
            from: "aa".repeat(32),
            release: Zeroizing::new(release.into()),
        }
    }

    #[test]
    fn pending_retirements_are_kept_per_user_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let kept = Retirements::beside(Some(dir.path().join("trust-state.json")));
        assert_eq!(kept.pending("alice").unwrap(), None);
        kept.remember(pending("alice", "01")).unwrap();
        kept.remember(pending("bob", "02")).unwrap();
        // A newer one replaces the user's older one.
        kept.remember(pending("alice", "03")).unwrap();
        assert_eq!(kept.pending("alice").unwrap(), Some(pending("alice", "03")));
        kept.forget(&pending("alice", "03")).unwrap();
        assert_eq!(kept.pending("alice").unwrap(), None);
        assert_eq!(kept.pending("bob").unwrap(), Some(pending("bob", "02")));
        let file = dir.path().join("trust-state.retirements.json");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Damage is an error, not an empty list: that would forget a retirement.
        std::fs::write(&file, b"[{").unwrap();
        assert!(kept.pending("bob").is_err());
    }

    #[test]
    fn debug_hides_the_release() {
        let shown = format!("{:?}", pending("alice", "5ec2e7"));
        assert!(shown.contains("alice") && !shown.contains("5ec2e7"));
    }

    #[test]
    fn pinned_clients_keep_nothing() {
        let kept = Retirements::beside(None);
        kept.remember(pending("alice", "01")).unwrap();
        assert_eq!(kept.pending("alice").unwrap(), None);
    }
}
