//! `client.toml`: where the vault is, which fleet key to trust, how to get account tokens.

use crate::error::ClientError;
use bkv_core::KsfParams;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
    /// Over-the-air mode: trust fleets that a validation bundle signed by this witness and
    /// counter-signed by this operator lists. With `fleet_key` also set, both must agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_the_air: Option<OverTheAir>,
    /// The directory relative paths are taken from (the config file's).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// The keys an over-the-air client pins instead of fleet keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverTheAir {
    /// The witness's Ed25519 key (hex).
    pub witness_key: String,
    /// The operator's Ed25519 key (hex).
    pub operator_key: String,
    /// The witness namespace the vault's bundles are published in.
    pub namespace: String,
    /// Where the client remembers the highest epoch it has seen (relative to the config).
    #[serde(default = "default_trust_state")]
    pub state: PathBuf,
}

fn default_trust_state() -> PathBuf {
    PathBuf::from("trust-state.json")
}

fn parse_hex_key(text: &str, what: &str) -> Result<[u8; 32], ClientError> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key).map_err(|_| ClientError::Config {
        path: what.into(),
        reason: "must be 64 hex digits".into(),
    })?;
    Ok(key)
}

impl OverTheAir {
    /// The pinned witness and operator keys.
    pub fn keys(&self) -> Result<bkv_core::bundle::BundleKeys, ClientError> {
        Ok(bkv_core::bundle::BundleKeys {
            witness: parse_hex_key(&self.witness_key, "over_the_air.witness_key")?,
            operator: parse_hex_key(&self.operator_key, "over_the_air.operator_key")?,
        })
    }
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
            .field("over_the_air", &self.over_the_air)
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
        let mut config: Self = toml::from_str(&text).map_err(|e| bad(e.message().to_string()))?;
        if !config.fleet_key.trim().is_empty() {
            config.pinned_fleet_key().map_err(|e| bad(e.to_string()))?;
        }
        if let Some(ota) = &config.over_the_air {
            ota.keys().map_err(|e| bad(e.to_string()))?;
        }
        config.base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
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
        parse_hex_key(&self.fleet_key, "fleet_key")
    }

    /// Where the over-the-air trust state lives, if this config uses bundles.
    pub fn trust_state_path(&self) -> Option<PathBuf> {
        self.over_the_air
            .as_ref()
            .map(|ota| self.base_dir.join(&ota.state))
    }

    /// Serializes the config as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a client config always serializes")
    }
}
