//! `bkv key …`: what a device does with its backup key.

use crate::input::PinSource;
use crate::Failure;
use anyhow::Context;
use bkv_client::{exit, BackupKey, ClientConfig, Device, RecordState, TokenSource, VaultClient};
use clap::{Args, Subcommand};
use std::io::Read;
use std::path::PathBuf;
use zeroize::Zeroizing;

/// Key subcommands.
#[derive(Subcommand)]
pub enum KeyCommand {
    /// Escrow the device's backup key behind a PIN (making the key if the device has none).
    Enroll {
        #[command(flatten)]
        vault: VaultArgs,
        /// The device directory that holds backup.key.
        #[arg(long, value_name = "DIR")]
        device: PathBuf,
        #[command(flatten)]
        pin: PinSource,
    },
    /// Recover the backup key from the vault with the PIN into the device directory.
    Recover {
        #[command(flatten)]
        vault: VaultArgs,
        /// The device directory to write backup.key into.
        #[arg(long, value_name = "DIR")]
        device: PathBuf,
        #[command(flatten)]
        pin: PinSource,
        /// Replace a different key already on the device.
        #[arg(long)]
        force: bool,
    },
    /// Show whether the user is enrolled and how many guesses are left.
    Status {
        #[command(flatten)]
        vault: VaultArgs,
        /// Print JSON for machines.
        #[arg(long)]
        json: bool,
    },
    /// Print the device's backup key as a 64-digit (hexadecimal) recovery code.
    RecoveryCode {
        /// The device directory that holds backup.key.
        #[arg(long, value_name = "DIR")]
        device: PathBuf,
    },
    /// Print the age identity (AGE-SECRET-KEY-1…) that decrypts this device's backups with
    /// the standard `age -d -i` tool.
    AgeIdentity {
        /// The device directory that holds backup.key.
        #[arg(long, value_name = "DIR")]
        device: PathBuf,
    },
    /// Turn a recovery code back into the device's backup key (no vault involved).
    Import {
        /// The 64-digit code; prefer --recovery-code-stdin, as arguments show in `ps`.
        #[arg(
            long,
            value_name = "CODE",
            required_unless_present = "recovery_code_stdin"
        )]
        recovery_code: Option<String>,
        /// Read the recovery code from standard input.
        #[arg(long, conflicts_with = "recovery_code")]
        recovery_code_stdin: bool,
        /// The device directory to write backup.key into.
        #[arg(long, value_name = "DIR")]
        device: PathBuf,
        /// Replace a different key already on the device.
        #[arg(long)]
        force: bool,
    },
}

/// Which vault and which account.
#[derive(Args)]
pub struct VaultArgs {
    /// The client config written by `bkv up` (vault URL, pinned fleet key).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// The user (account) name.
    #[arg(long)]
    user: String,
    /// A file holding the account token (JWT) from the app's identity provider.
    /// Without it, the dev token key in the config is used; BKV_TOKEN also works.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl VaultArgs {
    fn client(&self) -> Result<VaultClient, Failure> {
        vault_client(&self.config, self.token_file.as_deref())
    }
}

/// A client for the vault `config` names, with a token from `token_file`, `BKV_TOKEN`,
/// or the config's dev key.
pub fn vault_client(
    config: &std::path::Path,
    token_file: Option<&std::path::Path>,
) -> Result<VaultClient, Failure> {
    let config = ClientConfig::load(config)?;
    let tokens = if let Some(path) = token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the account token from {}", path.display()))?;
        TokenSource::Given(Zeroizing::new(token.trim().to_string()))
    } else if let Ok(token) = std::env::var("BKV_TOKEN") {
        TokenSource::Given(Zeroizing::new(token))
    } else {
        TokenSource::from_config(&config)?.ok_or_else(|| {
            Failure::new(
                exit::USAGE,
                anyhow::anyhow!("no account token: pass --token-file or set BKV_TOKEN (the config has no dev token key)"),
            )
        })?
    };
    Ok(VaultClient::new(&config, tokens)?)
}

pub fn load_key(device: &Device) -> Result<Option<BackupKey>, Failure> {
    Ok(device.load()?)
}

/// The device's key, or an error saying it has none.
fn require_key(device: &Device) -> Result<BackupKey, Failure> {
    load_key(device)?.ok_or_else(|| {
        Failure::new(
            exit::OTHER,
            anyhow::anyhow!("{} holds no backup key", device.key_path().display()),
        )
    })
}

/// Writes `key` unless the device holds a different one and `force` is off.
pub fn store_key(device: &Device, key: &BackupKey, force: bool) -> Result<(), Failure> {
    if let Some(existing) = load_key(device)? {
        if existing == *key {
            return Ok(());
        }
        if !force {
            return Err(Failure::new(
                exit::OTHER,
                anyhow::anyhow!(
                    "{} holds a different key; refusing to overwrite it (use --force to replace it)",
                    device.key_path().display()
                ),
            ));
        }
    }
    Ok(device.store(key)?)
}

/// Runs a key subcommand.
pub async fn run(command: KeyCommand) -> Result<(), Failure> {
    match command {
        KeyCommand::Enroll { vault, device, pin } => {
            let pin = pin.read()?;
            let device = Device::new(device);
            let (key, fresh) = match load_key(&device)? {
                Some(key) => (key, false),
                None => (BackupKey::generate(&mut rand::rngs::OsRng), true),
            };
            let mut client = vault.client()?;
            let attempts = client.enroll(&vault.user, pin, &key).await?;
            // The key reaches the disk only once the vault holds it, so a refused
            // enrollment leaves nothing behind.
            if fresh {
                device.store(&key)?;
            }
            println!(
                "enrolled {}: backup key {} ({} attempts)",
                vault.user,
                device.key_path().display(),
                attempts
            );
            Ok(())
        }
        KeyCommand::Recover {
            vault,
            device,
            pin,
            force,
        } => {
            let pin = pin.read()?;
            let device = Device::new(device);
            let mut client = vault.client()?;
            let recovered = client.recover(&vault.user, pin).await?;
            store_key(&device, &recovered.key, force)?;
            println!(
                "recovered {}: backup key {} ({} attempts)",
                vault.user,
                device.key_path().display(),
                recovered.attempts_left
            );
            match &recovered.moved {
                None => {}
                Some(bkv_client::Moved::Done { from }) => println!(
                    "moved {} from recover-only fleet {from} to the active fleet (full budget); the old record is retired",
                    vault.user
                ),
                Some(bkv_client::Moved::Failed(why)) => eprintln!("warning: {why}"),
            }
            Ok(())
        }
        KeyCommand::Status { vault, json } => {
            let mut client = vault.client()?;
            let status = client.status(&vault.user).await?;
            let state = match status.state {
                RecordState::NotEnrolled => "not-enrolled",
                RecordState::Active => "active",
                RecordState::Destroyed => "destroyed",
            };
            if json {
                let value = serde_json::json!({
                    "user": vault.user,
                    "enrolled": status.state == RecordState::Active,
                    "state": state,
                    "attempts_left": status.attempts_left,
                    "max_attempts": status.max_attempts,
                });
                println!("{value}");
            } else {
                println!(
                    "{}: {state}, {} of {} attempts left",
                    vault.user, status.attempts_left, status.max_attempts
                );
            }
            Ok(())
        }
        KeyCommand::RecoveryCode { device } => {
            let key = require_key(&Device::new(device))?;
            println!("{}", key.recovery_code().as_str());
            Ok(())
        }
        KeyCommand::AgeIdentity { device } => {
            let key = require_key(&Device::new(device))?;
            let identity = bkv_client::backup::keys::age_identity_string(&key);
            eprintln!(
                "# recipient: {}",
                bkv_client::backup::keys::age_identity(&key).to_public()
            );
            println!("{}", identity.as_str());
            Ok(())
        }
        KeyCommand::Import {
            recovery_code,
            recovery_code_stdin,
            device,
            force,
        } => {
            let code = match recovery_code {
                Some(code) => Zeroizing::new(code),
                None => {
                    debug_assert!(recovery_code_stdin);
                    let mut text = Zeroizing::new(String::new());
                    std::io::stdin()
                        .take(1024)
                        .read_to_string(&mut text)
                        .context("cannot read the recovery code from standard input")?;
                    text
                }
            };
            let key =
                BackupKey::from_recovery_code(&code).map_err(|e| Failure::new(exit::USAGE, e))?;
            let device = Device::new(device);
            store_key(&device, &key, force)?;
            println!("imported backup key into {}", device.key_path().display());
            Ok(())
        }
    }
}

impl From<bkv_client::device::DeviceError> for Failure {
    fn from(error: bkv_client::device::DeviceError) -> Self {
        Failure::new(exit::OTHER, error)
    }
}
