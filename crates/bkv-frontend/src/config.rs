//! The frontend's configuration file (`frontend.toml`, written by `bkv fleet init`).

use bkv_core::auth::AuthConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// One datacenter's node, as the frontend reaches it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAddress {
    /// Datacenter name.
    pub dc: String,
    /// gRPC URL of its node.
    pub url: String,
}

/// The frontend's configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontendConfig {
    /// Client-facing address.
    pub listen: SocketAddr,
    /// The fleet's nodes.
    pub nodes: Vec<NodeAddress>,
    /// Account-token keys.
    pub auth: AuthConfig,
    /// A client config to pin the fleet key into once the fleet is founded (dev setups),
    /// relative to this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_config: Option<PathBuf>,
    /// Simulated wide-area latency profile (see `bkv_core::wan`); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wan: Option<String>,
    /// The validation bundle to serve (written by `bkv fleet publish`), relative to this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<PathBuf>,
    /// Per-account rate limits (on by default; `per_second = 0` turns them off).
    #[serde(default)]
    pub rate_limit: crate::ratelimit::RateLimit,
    /// Older fleets still holding users (recover-only), newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_fleets: Vec<PreviousFleet>,
}

/// An older fleet the frontend still routes recoveries to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousFleet {
    /// Its nodes.
    pub nodes: Vec<NodeAddress>,
}

impl FrontendConfig {
    /// Reads a frontend config; relative paths are resolved against its directory.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut config: FrontendConfig =
            toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
        if config.nodes.is_empty() {
            return Err(format!("{}: lists no nodes", path.display()));
        }
        if let Some(dir) = path.parent() {
            for file in [&mut config.client_config, &mut config.bundle]
                .into_iter()
                .flatten()
            {
                if file.is_relative() {
                    *file = dir.join(&*file);
                }
            }
        }
        if config.previous_fleets.iter().any(|f| f.nodes.is_empty()) {
            return Err(format!(
                "{}: a previous fleet lists no nodes",
                path.display()
            ));
        }
        Ok(config)
    }

    /// The latency profile, if one is named.
    pub fn wan_profile(&self) -> Result<Option<bkv_core::wan::WanProfile>, String> {
        match &self.wan {
            None => Ok(None),
            Some(name) => bkv_core::wan::WanProfile::named(name)
                .map(Some)
                .ok_or_else(|| format!("unknown wan profile {name:?}")),
        }
    }

    /// The nodes as (datacenter, URL) pairs.
    pub fn node_pairs(&self) -> Vec<(String, String)> {
        self.nodes
            .iter()
            .map(|n| (n.dc.clone(), n.url.clone()))
            .collect()
    }
}
