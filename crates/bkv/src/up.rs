//! `bkv up`: a development vault in one process, on embedded defaults.

use crate::Failure;
use anyhow::Context;
use bkv_client::{ClientConfig, DevTokens};
use bkv_core::KsfParams;
use bkv_frontend::{AuthConfig, TokenKey, TokenVerifier, VaultService};
use bkv_hsm::{Hsm, HsmConfig, SoftwarePlatform};
use clap::Args;
use rand::RngCore;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Loopback address `bkv up` listens on unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7450";

/// Arguments of `bkv up`.
#[derive(Args)]
pub struct UpArgs {
    /// Directory for the vault's files (client.toml). Created if missing.
    #[arg(long, value_name = "DIR", default_value = "./vault-dev")]
    dir: PathBuf,
    /// Address to listen on; port 0 picks a free port (the "ready" line says which).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Wrong PINs a record survives before it is destroyed.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_attempts: u32,
    /// Seconds a client has between KE2 and KE3.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    login_deadline: u64,
    /// Account-token verification keys (TOML: audience, [[keys]]) instead of a fresh dev key.
    /// With it, client.toml carries no token key and clients need real tokens.
    #[arg(long, value_name = "FILE")]
    auth: Option<PathBuf>,
}

const BANNER: &str = "\
================================================================
 bkv DEVELOPMENT VAULT
 software HSM: for development only. It is not tamper resistant,
 holds its secrets in ordinary memory, and forgets every
 enrollment when it stops. Never escrow a real key here.
================================================================";

/// Writes `text` to `path` atomically with mode 0600.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Runs the dev vault until interrupted.
pub async fn run(args: UpArgs) -> Result<(), Failure> {
    eprintln!("{BANNER}");
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;

    let hsm = Hsm::found(
        SoftwarePlatform::new(),
        HsmConfig {
            max_attempts: args.max_attempts,
            login_deadline_ms: args.login_deadline * 1000,
            ..HsmConfig::default()
        },
    );
    let fleet_key = hex::encode(hsm.fleet_key());

    let (auth, dev) = match &args.auth {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let auth: AuthConfig = toml::from_str(&text)
                .with_context(|| format!("invalid auth config {}", path.display()))?;
            (auth, None)
        }
        None => {
            let mut secret = zeroize::Zeroizing::new([0u8; 32]);
            rand::rngs::OsRng.fill_bytes(secret.as_mut());
            let secret_hex = hex::encode(secret.as_ref());
            let auth = AuthConfig {
                audience: format!("bkv-dev-{}", &fleet_key[..16]),
                keys: vec![TokenKey::Hs256 {
                    secret_hex: secret_hex.clone(),
                }],
            };
            (
                auth,
                Some(DevTokens {
                    token_key: secret_hex,
                }),
            )
        }
    };
    let verifier = TokenVerifier::new(&auth).context("invalid account-token configuration")?;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("cannot read the listening address")?;
    let url = format!("http://{addr}");

    let client = ClientConfig {
        url: url.clone(),
        fleet_key: fleet_key.clone(),
        audience: auth.audience.clone(),
        tenant: "default".into(),
        ksf: KsfParams::RECOMMENDED,
        dev,
    };
    let client_path = args.dir.join("client.toml");
    let header = "# Written by `bkv up`. Pins this dev vault's fleet key; [dev] lets the CLI act as any user.\n";
    write_private(&client_path, &format!("{header}{}", client.to_toml()))?;

    let service = VaultService::new(Arc::new(Mutex::new(hsm)), Arc::new(verifier));
    tracing::warn!(%fleet_key, "software HSM: for development only");
    eprintln!("fleet key  {fleet_key}");
    eprintln!("client     {}", client_path.display());
    println!("ready {url}");
    std::io::stdout().flush().ok();

    bkv_frontend::serve(listener, service, shutdown_signal())
        .await
        .context("the vault server failed")?;
    eprintln!("vault stopped; its enrollments are gone (the software HSM keeps nothing on disk)");
    Ok(())
}
