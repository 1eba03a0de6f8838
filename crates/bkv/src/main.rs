//! `bkv`: run a development vault and use it as a device would.
#![forbid(unsafe_code)]

mod backup;
mod bench;
mod fleet;
mod input;
mod key;
mod load;
mod serve;
mod trust;
mod up;

use bkv_client::exit;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  any other failure (bad config, refused account token, protocol error)
  2  usage error (bad arguments, PIN of the wrong length, malformed recovery code)
  3  wrong PIN (stderr: \"wrong PIN: N attempts left\")
  4  no key to recover (never enrolled, or destroyed after too many wrong PINs),
     or no backup to restore
  5  vault (or backup store) unreachable or unavailable, or rate limited (retry)
  6  trust failure (the vault's key is not the pinned fleet key, or its validation
     bundle is missing, badly signed, tampered, older than one already seen, or does
     not list the vault's fleet); for `bkv audit`, any gap or inconsistency";

/// Backup Key Vault: escrow a backup key behind a PIN in a fleet of HSMs.
#[derive(Parser)]
#[command(name = "bkv", version, about, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a development fleet (software HSMs, one node process per datacenter, and
    /// the frontend) in the foreground.
    Up(up::UpArgs),
    /// Run one fleet node (one datacenter's HSM and its host).
    Node {
        /// The node config written by `bkv fleet init`.
        #[arg(long, value_name = "FILE")]
        config: std::path::PathBuf,
        /// Exit when standard input closes (used by `bkv up` for its children).
        #[arg(long)]
        exit_with_parent: bool,
    },
    /// Run the client-facing frontend of a fleet.
    Frontend {
        /// The frontend config written by `bkv fleet init`.
        #[arg(long, value_name = "FILE")]
        config: std::path::PathBuf,
    },
    /// Back up a directory, end-to-end encrypted, to a directory or S3 bucket
    /// (or `backup list` the backups of a user).
    Backup(backup::BackupArgs),
    /// Restore the newest (or a chosen) backup into an empty or new directory.
    Restore(backup::RestoreArgs),
    /// Measure performance (prints numbers): a closed-loop load generator against a
    /// fleet, the server-side crypto floor, or `bench backup`.
    Bench(bench::BenchArgs),
    /// Lay out a fleet's configuration, or report its health.
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
    /// Manage a device's backup key: enroll, recover, status, recovery codes.
    #[command(subcommand, after_help = EXIT_CODES)]
    Key(key::KeyCommand),
    /// Run the independent witness that signs each epoch of the fleet-key log.
    Witness {
        /// The witness config (witness.toml).
        #[arg(long, value_name = "FILE")]
        config: std::path::PathBuf,
        /// Exit when standard input closes (used by `bkv up` for its children).
        #[arg(long)]
        exit_with_parent: bool,
    },
    /// Make or show the witness's or the operator's signing key (a file or a PKCS#11 token).
    #[command(subcommand)]
    Signer(trust::SignerCommand),
    /// Audit the whole fleet-key log: every epoch, signature, digest and evidence item,
    /// with the keys added and removed (exit 6 on any gap or inconsistency).
    #[command(after_help = EXIT_CODES)]
    Audit(trust::AuditArgs),
}

/// A failed command: what to print and which exit code to return.
pub struct Failure {
    code: i32,
    error: anyhow::Error,
}

impl Failure {
    /// A failure with an explicit exit code.
    pub fn new(code: i32, error: impl Into<anyhow::Error>) -> Self {
        Self {
            code,
            error: error.into(),
        }
    }
}

impl From<bkv_client::ClientError> for Failure {
    fn from(error: bkv_client::ClientError) -> Self {
        Self::new(error.exit_code(), error)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self::new(exit::OTHER, error)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let default = if matches!(cli.command, Command::Up(_) | Command::Witness { .. }) {
            "info"
        } else {
            "warn"
        };
        tracing_subscriber::EnvFilter::new(default)
    });
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Node { config, .. } = &cli.command {
        // An unreadable config is reported by `serve::node`, which reads it again.
        if let Some(threads) = bkv_node::NodeConfig::load(config)
            .ok()
            .and_then(|c| c.worker_threads)
        {
            builder.worker_threads(threads);
        }
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::OTHER as u8);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Key(command) => key::run(command).await,
            Command::Node {
                config,
                exit_with_parent,
            } => serve::node(config, exit_with_parent).await,
            Command::Frontend { config } => serve::frontend(config).await,
            Command::Fleet(command) => fleet::run(command).await,
            Command::Backup(args) => backup::run_backup(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Restore(args) => backup::run_restore(args).await,
            Command::Witness {
                config,
                exit_with_parent,
            } => trust::witness(config, exit_with_parent).await,
            Command::Signer(command) => trust::signer(command),
            Command::Audit(args) => trust::audit(args).await,
        }
    });
    if std::env::var_os("BKV_REPORT_PEAK_RSS").is_some() {
        // Used by the memory tests and benchmarks: the process's own high-water mark.
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            if let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:")) {
                let kib: String = line.chars().filter(|c| c.is_ascii_digit()).collect();
                eprintln!("peak_rss_kib {kib}");
            }
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            ExitCode::from(failure.code as u8)
        }
    }
}
