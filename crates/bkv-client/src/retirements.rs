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
    /// The tenant of the account.
    pub tenant: String,
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
            .field("tenant", &self.tenant)
            .field("user", &self.user)
            .field("from", &self.from)
            .field("release", &"(redacted)")
            .finish()
    }
}

impl PendingRetirement {
    /// Whether to send this retirement after a recovery from the active fleet `current`
    /// (`false`: drop it unsent). Never to `current` itself, whose record the user lives
    /// on (the operator made it active again), nor to a fleet no longer trusted (`trusted`
    /// is false), which is being shut down and whose proof would not count.
    pub(crate) fn worth_sending(&self, current: &[u8; 32], trusted: bool) -> bool {
        trusted && !self.from.eq_ignore_ascii_case(&hex::encode(current))
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

    /// The retirements waiting for `user` of `tenant`, one per fleet left.
    pub(crate) fn pending(
        &self,
        tenant: &str,
        user: &str,
    ) -> Result<Vec<PendingRetirement>, ClientError> {
        let Some(path) = &self.path else {
            return Ok(Vec::new());
        };
        let mut all = load(path)?;
        all.retain(|p| p.tenant == tenant && p.user == user);
        Ok(all)
    }

    /// Remembers `retirement`, replacing an older one of the same account and fleet.
    pub(crate) fn remember(&self, retirement: PendingRetirement) -> Result<(), ClientError> {
        self.update(|all| {
            all.retain(|p| {
                (&p.tenant, &p.user, &p.from)
                    != (&retirement.tenant, &retirement.user, &retirement.from)
            });
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
        // Sized up front, so that no growing buffer frees an unwiped copy of a release.
        let mut bytes = Zeroizing::new(Vec::with_capacity(256 + 1024 * all.len()));
        serde_json::to_writer_pretty(&mut *bytes, &all).expect("retirements serialize");
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

    fn pending(user: &str, from: &str, release: &str) -> PendingRetirement {
        PendingRetirement {
            tenant: "t".into(),
            user: user.into(),
            from: from.repeat(32),
            release: Zeroizing::new(release.into()),
        }
    }

    #[test]
    fn pending_retirements_are_kept_per_account_and_fleet_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let kept = Retirements::beside(Some(dir.path().join("trust-state.json")));
        assert!(kept.pending("t", "alice").unwrap().is_empty());
        kept.remember(pending("alice", "aa", "01")).unwrap();
        kept.remember(pending("bob", "aa", "02")).unwrap();
        // A newer one for the same fleet replaces the older; another fleet's is kept too.
        kept.remember(pending("alice", "aa", "03")).unwrap();
        kept.remember(pending("alice", "bb", "04")).unwrap();
        assert_eq!(
            kept.pending("t", "alice").unwrap(),
            vec![pending("alice", "aa", "03"), pending("alice", "bb", "04")]
        );
        // Another tenant's alice is someone else.
        assert!(kept.pending("u", "alice").unwrap().is_empty());
        kept.forget(&pending("alice", "aa", "03")).unwrap();
        assert_eq!(
            kept.pending("t", "alice").unwrap(),
            vec![pending("alice", "bb", "04")]
        );
        assert_eq!(
            kept.pending("t", "bob").unwrap(),
            vec![pending("bob", "aa", "02")]
        );
        let file = dir.path().join("trust-state.retirements.json");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Damage is an error, not an empty list: that would forget a retirement.
        std::fs::write(&file, b"[{").unwrap();
        assert!(kept.pending("t", "bob").is_err());
    }

    #[test]
    fn a_kept_retirement_never_goes_to_the_fleet_the_key_just_came_from() {
        let kept = pending("alice", "aa", "01");
        // Recovered from the new fleet: the old one's record can go.
        assert!(kept.worth_sending(&[0xbb; 32], true));
        // Recovered from the old fleet, active again: its record is the user's only one.
        assert!(!kept.worth_sending(&[0xaa; 32], true));
        // The old fleet left the bundle: nothing to send, nothing to trust.
        assert!(!kept.worth_sending(&[0xbb; 32], false));
    }

    #[test]
    fn debug_hides_the_release() {
        let shown = format!("{:?}", pending("alice", "aa", "5ec2e7"));
        assert!(shown.contains("alice") && !shown.contains("5ec2e7"));
    }

    #[test]
    fn pinned_clients_keep_nothing() {
        let kept = Retirements::beside(None);
        kept.remember(pending("alice", "aa", "01")).unwrap();
        assert!(kept.pending("t", "alice").unwrap().is_empty());
    }
}
