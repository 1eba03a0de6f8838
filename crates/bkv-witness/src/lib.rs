//! The independent witness that signs each epoch of a vault's fleet-key artifact, in the
//! signature format of Cloudflare's Plexi auditor, and keeps an append-only log of it;
//! the operator's side of publishing (submit, counter-sign, serve the bundle); and the
//! Ed25519 signers both use (a key file, or a key in a PKCS#11 token).
#![forbid(unsafe_code)]

pub mod client;
pub mod log;
pub mod publish;
pub mod server;
pub mod signer;

pub use client::{WitnessClient, WitnessError};
pub use signer::{Signer, SignerConfig, SignerError};

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest witness or operator config accepted.
const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// `witness.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    /// Where the HTTP API listens.
    pub listen: SocketAddr,
    /// The namespace it signs for (one log per namespace).
    pub namespace: String,
    /// The log file (redb), relative to the config's directory.
    pub log: PathBuf,
    /// The operator key submissions must be signed by, hex.
    pub operator_key: String,
    /// The witness's own signing key.
    pub signer: SignerConfig,
}

/// Reads a small TOML config.
pub fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    use anyhow::Context;
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(
        meta.len() <= MAX_CONFIG_BYTES,
        "{}: larger than {MAX_CONFIG_BYTES} bytes",
        path.display()
    );
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
}

/// Parses 64 hex digits into a key.
pub fn parse_key(hex_text: &str, what: &str) -> anyhow::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_text.trim(), &mut key)
        .map_err(|_| anyhow::anyhow!("{what} must be 64 hex digits"))?;
    Ok(key)
}

/// The directory a config's relative paths are taken from.
pub fn config_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Opens the witness `config` (read from `path`) describes: its key and its log.
pub fn open_witness(config: &WitnessConfig, path: &Path) -> anyhow::Result<Arc<server::Witness>> {
    let base = config_dir(path);
    let signer = Signer::open(&config.signer, &base)?;
    let log = log::WitnessLog::open(&base.join(&config.log))?;
    Ok(Arc::new(server::Witness {
        namespace: config.namespace.clone(),
        signer,
        operator_key: parse_key(&config.operator_key, "operator_key")?,
        log,
        lock: tokio::sync::Mutex::new(()),
    }))
}

/// Serves `witness` on `listener` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    witness: Arc<server::Witness>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, server::router(witness))
        .with_graceful_shutdown(stop)
        .await?;
    Ok(())
}
