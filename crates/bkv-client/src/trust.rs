//! Which fleets a client trusts: a pinned fleet key (pinned mode), fleets listed by a
//! validation bundle signed by the pinned witness and operator keys (over-the-air mode),
//! or both at once. Over the air, the client remembers the highest epoch it has seen and
//! refuses any older bundle.

use crate::config::ClientConfig;
use crate::error::{ClientError, TrustError};
use bkv_core::bundle::{Bundle, BundleError, BundleKeys, Role, VerifiedBundle};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Largest trust-state file read.
const MAX_STATE_BYTES: u64 = 64 * 1024;

/// What an over-the-air client remembers between runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustState {
    /// The namespace these epochs belong to (another log starts from nothing).
    #[serde(default)]
    pub namespace: String,
    /// The highest epoch of a bundle that verified.
    pub highest_epoch: u64,
    /// The fleet keys (hex) that bundle listed, to recognise a foreign fleet's refusals.
    #[serde(default)]
    pub fleets: Vec<String>,
}

#[derive(Debug)]
struct OverTheAir {
    keys: BundleKeys,
    namespace: String,
    path: Option<PathBuf>,
    state: Mutex<TrustState>,
}

/// A client's trust decisions. Clones share the remembered state.
#[derive(Debug, Clone)]
pub struct Trust {
    pinned: Option<[u8; 32]>,
    ota: Option<Arc<OverTheAir>>,
}

pub(crate) fn state_error(path: &std::path::Path, reason: impl ToString) -> ClientError {
    ClientError::Config {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

impl Trust {
    /// The trust `config` describes; its trust state is read now.
    pub fn from_config(config: &ClientConfig) -> Result<Self, ClientError> {
        let pinned = if config.fleet_key.trim().is_empty() {
            None
        } else {
            Some(config.pinned_fleet_key()?)
        };
        let ota = match &config.over_the_air {
            None => None,
            Some(ota) => {
                let path = config.trust_state_path();
                let mut state = match &path {
                    Some(path) => load_state(path)?,
                    None => TrustState::default(),
                };
                if state.namespace != ota.namespace {
                    state = TrustState {
                        namespace: ota.namespace.clone(),
                        ..TrustState::default()
                    };
                }
                Some(Arc::new(OverTheAir {
                    keys: ota.keys()?,
                    namespace: ota.namespace.clone(),
                    path,
                    state: Mutex::new(state),
                }))
            }
        };
        if pinned.is_none() && ota.is_none() {
            // Names the usual cause.
            config.pinned_fleet_key()?;
        }
        Ok(Self { pinned, ota })
    }

    /// The highest epoch seen so far (0 in pinned mode).
    pub fn highest_epoch(&self) -> u64 {
        self.ota
            .as_ref()
            .map(|o| {
                o.state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .highest_epoch
            })
            .unwrap_or(0)
    }

    /// Checks a bundle's signatures, digest and namespace (not its epoch or fleets).
    pub fn verify_bundle(&self, bundle: &[u8]) -> Result<VerifiedBundle, ClientError> {
        let ota = self.ota.as_ref().ok_or_else(|| ClientError::Config {
            path: "over_the_air".into(),
            reason: "this client pins a fleet key and has no witness or operator key".into(),
        })?;
        let verified = Bundle::from_json(bundle)
            .and_then(|b| b.verify(&ota.keys))
            .map_err(TrustError::Bundle)?;
        if verified.namespace != ota.namespace {
            return Err(TrustError::Bundle(BundleError::Namespace(format!(
                "the bundle is for {:?}, this client trusts {:?}",
                verified.namespace, ota.namespace
            )))
            .into());
        }
        Ok(verified)
    }

    /// Decides whether a session with the fleet `fleet_key`, which sent `bundle`, may go
    /// on for a purpose `allowed` roles serve. Returns the key to hold the fleet to and
    /// its role. Remembers a newer epoch.
    pub fn admit(
        &self,
        fleet_key: &[u8],
        bundle: &[u8],
        allowed: &[Role],
    ) -> Result<([u8; 32], Role), ClientError> {
        let key: [u8; 32] = fleet_key
            .try_into()
            .map_err(|_| ClientError::Protocol("the vault sent a malformed fleet key".into()))?;
        if let Some(pinned) = self.pinned {
            if key != pinned {
                return Err(TrustError::FleetKeyMismatch {
                    presented: hex::encode(key),
                    pinned: hex::encode(pinned),
                }
                .into());
            }
        }
        let Some(ota) = &self.ota else {
            return Ok((key, Role::Active));
        };
        let verified = self.verify_bundle(bundle)?;
        let mut state = ota.state.lock().unwrap_or_else(|e| e.into_inner());
        // Another client process may have seen a newer epoch since this one started. An
        // exclusive lock spans the read, the check and the write, so two processes never
        // roll each other's memory back.
        let _file_lock = match &ota.path {
            Some(path) => Some(lock_state(path)?),
            None => None,
        };
        if let Some(path) = &ota.path {
            let disk = load_state(path)?;
            if disk.namespace == ota.namespace && disk.highest_epoch > state.highest_epoch {
                *state = disk;
            }
        }
        let role = verified
            .admit(&key, state.highest_epoch, allowed)
            .map_err(TrustError::Bundle)?;
        if verified.epoch > state.highest_epoch {
            let next = TrustState {
                namespace: ota.namespace.clone(),
                highest_epoch: verified.epoch,
                fleets: verified
                    .artifact
                    .fleets
                    .iter()
                    .map(|f| f.fleet_key.to_ascii_lowercase())
                    .collect(),
            };
            if let Some(path) = &ota.path {
                save_state(path, &next)?;
            }
            *state = next;
        }
        Ok((key, role))
    }

    /// A refusal naming a fleet this client does not trust, if `fleet_key` is one.
    pub fn foreign(&self, fleet_key: &[u8]) -> Option<TrustError> {
        if fleet_key.is_empty() {
            return None;
        }
        if let Some(pinned) = self.pinned {
            return (fleet_key != pinned).then(|| TrustError::FleetKeyMismatch {
                presented: hex::encode(fleet_key),
                pinned: hex::encode(pinned),
            });
        }
        let ota = self.ota.as_ref()?;
        let state = ota.state.lock().unwrap_or_else(|e| e.into_inner());
        let key = hex::encode(fleet_key);
        (state.highest_epoch > 0 && !state.fleets.contains(&key)).then(|| {
            TrustError::Bundle(BundleError::FleetNotAllowed {
                fleet_key: key,
                why: format!("not in the bundle of epoch {}", state.highest_epoch),
            })
        })
    }
}

/// Takes the lock file beside `path` (`.lock`); released when the returned file is dropped.
pub(crate) fn lock_state(path: &std::path::Path) -> Result<std::fs::File, ClientError> {
    let lock_path = path.with_extension("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| state_error(&lock_path, e))?;
    file.lock().map_err(|e| state_error(&lock_path, e))?;
    Ok(file)
}

fn load_state(path: &std::path::Path) -> Result<TrustState, ClientError> {
    // A damaged state is an error, never a reset: a reset would accept old epochs again.
    read_state_file(path, MAX_STATE_BYTES, "trust state")
}

/// Reads a JSON state file of at most `max_bytes`: the default when there is none, an
/// error when it is too large or damaged. The bytes read are wiped afterwards.
pub(crate) fn read_state_file<T: serde::de::DeserializeOwned + Default>(
    path: &std::path::Path,
    max_bytes: u64,
    what: &str,
) -> Result<T, ClientError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(T::default()),
        Err(e) => return Err(state_error(path, e)),
        Ok(meta) if meta.len() > max_bytes => {
            return Err(state_error(path, format!("{what} too large")))
        }
        Ok(_) => {}
    }
    let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| state_error(path, e))?);
    serde_json::from_slice(&bytes).map_err(|e| state_error(path, format!("damaged {what}: {e}")))
}

fn save_state(path: &std::path::Path, state: &TrustState) -> Result<(), ClientError> {
    let bytes = serde_json::to_vec_pretty(state).expect("trust state serializes");
    crate::device::write_atomically(path, &bytes, 0o600)
        .map_err(|e| state_error(path, format!("cannot record the epoch seen: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_state_round_trips_and_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust-state.json");
        let seen = |epoch| TrustState {
            namespace: "ns".into(),
            highest_epoch: epoch,
            fleets: vec![],
        };
        save_state(&path, &seen(3)).unwrap();
        assert_eq!(load_state(&path).unwrap(), seen(3));
        save_state(&path, &seen(4)).unwrap();
        assert_eq!(load_state(&path).unwrap().highest_epoch, 4);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // A damaged state is an error, not a fresh start.
        std::fs::write(&path, b"{not json").unwrap();
        assert!(load_state(&path).is_err());
    }
}
