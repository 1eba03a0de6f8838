//! A node's configuration file (`dcN.toml`, written by `bkv fleet init`).

use bkv_core::auth::AuthConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where to reach the node serving one datacenter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAddress {
    /// Datacenter name.
    pub dc: String,
    /// gRPC URL of its node, e.g. `http://127.0.0.1:7451`.
    pub url: String,
}

/// One node's configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The datacenter slot this node serves.
    pub dc: String,
    /// Address the node listens on (peers, frontend and admin on one port).
    pub listen: SocketAddr,
    /// The dev platform key (software HSM only), relative to this file.
    pub platform_key: PathBuf,
    /// Whether this node may found the fleet when no peer has one.
    #[serde(default)]
    pub founder: bool,
    /// Wrong PINs a record survives (set at founding).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Seconds between KE2 and KE3.
    #[serde(default = "default_login_deadline")]
    pub login_deadline_secs: u64,
    /// The other datacenters' nodes.
    pub peers: Vec<PeerAddress>,
    /// Account-token keys; the node checks every vault call's token itself.
    pub auth: AuthConfig,
    /// Simulated wide-area latency profile (see `bkv_core::wan`); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wan: Option<String>,
    /// Raft heartbeat interval in milliseconds (elections time out after 4 to 8 of them).
    /// openraft 0.9 also gives up on an AppendEntries after one interval, so it must be
    /// longer than the round trip to the farthest peer.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// Threads that run the node's async work; one per core when absent. `bkv up`, which
    /// runs every node on one machine, gives each node its share of the cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
}

fn default_heartbeat() -> u64 {
    100
}

fn default_max_attempts() -> u32 {
    10
}

fn default_login_deadline() -> u64 {
    60
}

/// Why a node config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NodeConfigError {
    /// Unreadable file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
    /// Not valid TOML for a node config.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl NodeConfig {
    /// Reads a node config; relative paths in it are resolved against its directory.
    pub fn load(path: &Path) -> Result<Self, NodeConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| NodeConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut config: NodeConfig =
            toml::from_str(&text).map_err(|e| NodeConfigError::Invalid {
                path: path.display().to_string(),
                reason: e.message().to_string(),
            })?;
        if config.platform_key.is_relative() {
            if let Some(dir) = path.parent() {
                config.platform_key = dir.join(&config.platform_key);
            }
        }
        if let Some(name) = &config.wan {
            if bkv_core::wan::WanProfile::named(name).is_none() {
                return Err(NodeConfigError::Invalid {
                    path: path.display().to_string(),
                    reason: format!("unknown wan profile {name:?}"),
                });
            }
        }
        if !(20..=10_000).contains(&config.heartbeat_ms) {
            return Err(NodeConfigError::Invalid {
                path: path.display().to_string(),
                reason: "heartbeat_ms must be 20 to 10000".into(),
            });
        }
        if config
            .worker_threads
            .is_some_and(|n| !(1..=1024).contains(&n))
        {
            return Err(NodeConfigError::Invalid {
                path: path.display().to_string(),
                reason: "worker_threads must be 1 to 1024".into(),
            });
        }
        if !(1..=1000).contains(&config.max_attempts) {
            return Err(NodeConfigError::Invalid {
                path: path.display().to_string(),
                reason: "max_attempts must be 1 to 1000".into(),
            });
        }
        Ok(config)
    }

    /// Reads the dev platform key (32 raw bytes).
    pub fn read_platform_key(&self) -> Result<[u8; 32], NodeConfigError> {
        let bytes = std::fs::read(&self.platform_key).map_err(|source| NodeConfigError::Io {
            path: self.platform_key.display().to_string(),
            source,
        })?;
        bytes
            .as_slice()
            .try_into()
            .map_err(|_| NodeConfigError::Invalid {
                path: self.platform_key.display().to_string(),
                reason: "a platform key is 32 bytes".into(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(extra: &str) -> Result<NodeConfig, NodeConfigError> {
        let dir = std::env::temp_dir().join(format!("bkv-node-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dc1.toml");
        let text = format!(
            "dc = \"dc1\"\nlisten = \"127.0.0.1:7451\"\nplatform_key = \"platform.key\"\n{extra}\
             peers = []\n[auth]\naudience = \"bkv\"\nkeys = []\n"
        );
        std::fs::write(&path, text).unwrap();
        let loaded = NodeConfig::load(&path);
        std::fs::remove_dir_all(&dir).unwrap();
        loaded
    }

    #[test]
    fn worker_threads_default_to_one_per_core_and_zero_is_refused() {
        assert_eq!(load_with("").unwrap().worker_threads, None);
        assert_eq!(
            load_with("worker_threads = 2\n").unwrap().worker_threads,
            Some(2)
        );
        let refused = load_with("worker_threads = 0\n").unwrap_err();
        assert!(refused
            .to_string()
            .contains("worker_threads must be 1 to 1024"));
    }
}
