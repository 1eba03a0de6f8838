//! `bkv backup` and `bkv restore`: end-to-end encrypted backups of a directory.

use crate::input::PinSource;
use crate::key::{load_key, store_key, vault_client};
use crate::Failure;
use anyhow::Context;
use bkv_client::backup::{self, BackupError, BackupStore, Progress};
use bkv_client::{exit, BackupKey, ClientConfig, Device};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Arguments of `bkv backup`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    command: Option<BackupCommand>,
    /// The directory to back up.
    #[arg(value_name = "DIR")]
    src: Option<PathBuf>,
    /// The client config (vault URL, pinned fleet key, tenant).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The user (account) name.
    #[arg(long)]
    user: Option<String>,
    /// The device directory that holds backup.key (made and escrowed on first use).
    #[arg(long, value_name = "DIR")]
    device: Option<PathBuf>,
    /// Where archives go: a directory, or s3://bucket/prefix.
    #[arg(long, value_name = "STORE")]
    store: Option<String>,
    /// How many backups of the user to keep.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    keep: u32,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// A file holding the account token (JWT); else BKV_TOKEN or the config's dev key.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    pin: PinSource,
}

/// Backup subcommands.
#[derive(Subcommand)]
pub enum BackupCommand {
    /// List a user's backups.
    List {
        /// Where archives are.
        #[arg(long, value_name = "STORE")]
        store: String,
        /// The user (account) name.
        #[arg(long)]
        user: String,
        /// The tenant.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Print JSON for machines.
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of `bkv restore`.
#[derive(Args)]
pub struct RestoreArgs {
    /// The client config (needed unless a recovery code is given).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The user (account) name (needed unless a recovery code is given).
    #[arg(long)]
    user: Option<String>,
    /// The device directory to keep the recovered key in.
    #[arg(long, value_name = "DIR")]
    device: Option<PathBuf>,
    /// Where archives are: a directory, or s3://bucket/prefix.
    #[arg(long, value_name = "STORE")]
    store: String,
    /// An empty or new directory to restore into.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Restore this backup instead of the newest.
    #[arg(long, value_name = "ID")]
    backup: Option<String>,
    /// Use this 64-digit recovery code as the key (no vault, no PIN).
    #[arg(long, value_name = "CODE", conflicts_with_all = ["recovery_code_stdin"])]
    recovery_code: Option<String>,
    /// Read the recovery code from standard input.
    #[arg(long)]
    recovery_code_stdin: bool,
    /// Replace a different key already on the device.
    #[arg(long)]
    force: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// A file holding the account token (JWT); else BKV_TOKEN or the config's dev key.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    pin: PinSource,
}

fn usage(message: &str) -> Failure {
    Failure::new(exit::USAGE, anyhow::anyhow!("{message}"))
}

impl From<BackupError> for Failure {
    fn from(error: BackupError) -> Self {
        let code = match &error {
            BackupError::Store(_) => exit::UNAVAILABLE,
            BackupError::NoBackup(_) => exit::NO_KEY,
            BackupError::OutputNotEmpty(_) => exit::USAGE,
            _ => exit::OTHER,
        };
        Failure::new(code, error)
    }
}

/// A progress bar on a terminal, nothing otherwise.
fn progress(total: u64, quiet: bool, verb: &str) -> (Progress, Option<ProgressBar>) {
    if quiet || !std::io::stderr().is_terminal() {
        return (Arc::new(|_| {}), None);
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(verb.to_string());
    let handle = bar.clone();
    (Arc::new(move |n| handle.inc(n)), Some(bar))
}

fn open_store(spec: &str) -> Result<BackupStore, Failure> {
    Ok(BackupStore::open(spec).map_err(BackupError::from)?)
}

fn when(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let (h, m, s) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// Runs `bkv backup`.
pub async fn run_backup(args: BackupArgs) -> Result<(), Failure> {
    if let Some(BackupCommand::List {
        store,
        user,
        tenant,
        json,
    }) = args.command
    {
        let store = open_store(&store)?;
        let archives = store
            .list(&tenant, &user)
            .await
            .map_err(BackupError::from)?;
        if json {
            let list: Vec<_> = archives
                .iter()
                .map(|a| {
                    serde_json::json!({
                        "id": a.id, "created": when(a.created_ms), "size": a.size, "key": a.locator,
                    })
                })
                .collect();
            println!("{}", serde_json::json!({ "user": user, "backups": list }));
        } else if archives.is_empty() {
            println!("no backups for {user}");
        } else {
            for a in &archives {
                println!(
                    "{}  {}  {:>12} bytes  key {}",
                    a.id,
                    when(a.created_ms),
                    a.size,
                    a.locator
                );
            }
        }
        return Ok(());
    }
    let src = args
        .src
        .ok_or_else(|| usage("name the directory to back up"))?;
    let store_spec = args.store.ok_or_else(|| usage("--store is required"))?;
    let config_path = args.config.ok_or_else(|| usage("--config is required"))?;
    let user = args.user.ok_or_else(|| usage("--user is required"))?;
    let device = Device::new(args.device.ok_or_else(|| usage("--device is required"))?);
    let config = ClientConfig::load(&config_path)?;
    let store = open_store(&store_spec)?;
    if !src.is_dir() {
        return Err(usage(&format!("{} is not a directory", src.display())));
    }
    let key = match load_key(&device)? {
        Some(key) => key,
        None => {
            // First use: make the key and escrow it behind the PIN before anything is encrypted to it.
            let pin = args.pin.read()?;
            let key = BackupKey::generate(&mut rand::rngs::OsRng);
            let mut client = vault_client(&config_path, args.token_file.as_deref())?;
            client.enroll(&user, pin, &key).await?;
            device.store(&key)?;
            eprintln!(
                "made a backup key in {} and escrowed it in the vault",
                device.key_path().display()
            );
            key
        }
    };
    let total = backup::archive::source_size(&src);
    let (report, bar) = progress(total, args.quiet, "backup");
    let done = backup::create(
        &store,
        &config.tenant,
        &user,
        &key,
        &src,
        args.keep as usize,
        report,
    )
    .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let done = done?;
    println!(
        "backed up {} as {} ({} bytes, {} entries verified){}",
        src.display(),
        done.archive.id,
        done.archive.size,
        done.verified.entries,
        if done.pruned.is_empty() {
            String::new()
        } else {
            format!("; pruned {}", done.pruned.join(", "))
        }
    );
    Ok(())
}

/// Runs `bkv restore`.
pub async fn run_restore(args: RestoreArgs) -> Result<(), Failure> {
    let store = open_store(&args.store)?;
    let code = match (&args.recovery_code, args.recovery_code_stdin) {
        (Some(code), _) => Some(Zeroizing::new(code.clone())),
        (None, true) => {
            let mut text = Zeroizing::new(String::new());
            std::io::stdin()
                .take(1024)
                .read_to_string(&mut text)
                .context("cannot read the recovery code from standard input")?;
            Some(text)
        }
        (None, false) => None,
    };
    let tenant = match &args.config {
        Some(path) => Some(ClientConfig::load(path)?.tenant),
        None => None,
    };
    let (key, account) = if let Some(code) = code {
        let key = BackupKey::from_recovery_code(&code).map_err(|e| Failure::new(exit::USAGE, e))?;
        let account = tenant.clone().zip(args.user.clone());
        (key, account)
    } else {
        let config = args
            .config
            .as_ref()
            .ok_or_else(|| usage("--config is required without a recovery code"))?;
        let user = args
            .user
            .clone()
            .ok_or_else(|| usage("--user is required without a recovery code"))?;
        let device = args.device.clone().map(Device::new);
        let existing = match &device {
            Some(d) => load_key(d)?,
            None => None,
        };
        let key = match existing {
            Some(key) if !args.pin.given() => key,
            _ => {
                let pin = args.pin.read()?;
                let mut client = vault_client(config, args.token_file.as_deref())?;
                let recovered = client.recover(&user, pin).await?;
                if let Some(device) = &device {
                    store_key(device, &recovered.key, args.force)?;
                }
                recovered.key.clone()
            }
        };
        (key, tenant.zip(Some(user)))
    };
    let archive = backup::choose(
        &store,
        account.as_ref().map(|(t, u)| (t.as_str(), u.as_str())),
        &key,
        args.backup.as_deref(),
    )
    .await?;
    let (report, bar) = progress(archive.size, args.quiet, "restore");
    let restored = backup::restore(&store, &key, &archive, &args.out, report).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let stats = restored?;
    println!(
        "restored backup {} into {} ({} entries, {} bytes)",
        archive.id,
        args.out.display(),
        stats.entries,
        stats.bytes
    );
    Ok(())
}
