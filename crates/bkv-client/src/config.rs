//! `client.toml`: where the vault is, which fleet key to trust, how to get account tokens.

use crate::error::ClientError;
use bkv_core::KsfParams;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Largest client config accepted.
const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// What a client needs to reach and trust a vault.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The vault frontend, e.g. `http://127.0.0.1:7450`.
    pub url: String,
    /// The fleet's OPAQUE public key (hex), pinned: the client refuses any other.
    pub fleet_key: String,
    /// The `aud` of account tokens for this vault.
    pub audience: String,
    /// The tenant the users belong to.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Argon2id cost used at enrollment.
    #[serde(default)]
    pub ksf: KsfParams,
    /// Development only: lets the CLI mint account tokens for any user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<DevTokens>,
    /// The simulated latency profile the dev fleet runs with, if any (for benchmarks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wan: Option<String>,
}

/// The development token key written by `bkv up`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevTokens {
    /// HS256 secret, hex. Whoever holds it can act as any user of the dev vault.
    pub token_key: String,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("url", &self.url)
            .field("fleet_key", &self.fleet_key)
            .field("audience", &self.audience)
            .field("tenant", &self.tenant)
            .field("ksf", &self.ksf)
            .field("dev", &self.dev.as_ref().map(|_| "(redacted)"))
            .finish()
    }
}

fn default_tenant() -> String {
    "default".into()
}

impl ClientConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::Config {
            path: path.display().to_string(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(bad(format!("larger than {MAX_CONFIG_BYTES} bytes")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let config: Self = toml::from_str(&text).map_err(|e| bad(e.message().to_string()))?;
        if !config.fleet_key.trim().is_empty() {
            config.pinned_fleet_key().map_err(|e| bad(e.to_string()))?;
        }
        config.ksf.check().map_err(|e| bad(e.to_string()))?;
        Ok(config)
    }

    /// The pinned fleet key as bytes.
    pub fn pinned_fleet_key(&self) -> Result<[u8; 32], ClientError> {
        if self.fleet_key.trim().is_empty() {
            return Err(ClientError::Config {
                path: "fleet_key".into(),
                reason: "no fleet key is pinned yet (the fleet has not been founded, or the frontend has not pinned it)".into(),
            });
        }
        let mut key = [0u8; 32];
        hex::decode_to_slice(self.fleet_key.trim(), &mut key).map_err(|_| ClientError::Config {
            path: "fleet_key".into(),
            reason: "must be 64 hex digits".into(),
        })?;
        Ok(key)
    }

    /// Serializes the config as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a client config always serializes")
    }
}
