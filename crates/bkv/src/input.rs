//! Secrets from the user: PINs from stdin or a file, never from an argument.

use crate::Failure;
use anyhow::Context;
use bkv_client::{exit, Pin};
use clap::Args;
use std::io::Read;
use std::path::PathBuf;
use zeroize::Zeroizing;

/// More than any PIN can be; reading stops here.
const MAX_PIN_INPUT: u64 = 1024;

/// Where the PIN comes from.
#[derive(Args, Debug)]
#[group(required = false, multiple = false)]
pub struct PinSource {
    /// Read the PIN from standard input (one line).
    #[arg(long)]
    pin_stdin: bool,
    /// Read the PIN from a file (one line).
    #[arg(long, value_name = "FILE")]
    pin_file: Option<PathBuf>,
}

impl PinSource {
    /// Whether a PIN source was given.
    pub fn given(&self) -> bool {
        self.pin_stdin || self.pin_file.is_some()
    }

    /// Reads and checks the PIN; a missing source is a usage error.
    pub fn read(&self) -> Result<Pin, Failure> {
        if !self.given() {
            return Err(Failure::new(
                exit::USAGE,
                anyhow::anyhow!("a PIN is needed: pass --pin-stdin or --pin-file FILE"),
            ));
        }
        let mut text = Zeroizing::new(String::new());
        if self.pin_stdin {
            std::io::stdin()
                .take(MAX_PIN_INPUT)
                .read_to_string(&mut text)
                .context("cannot read the PIN from standard input")?;
        } else if let Some(path) = &self.pin_file {
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_PIN_INPUT).read_to_string(&mut text))
                .with_context(|| format!("cannot read the PIN from {}", path.display()))?;
        }
        Pin::new(std::mem::take(&mut *text)).map_err(|e| Failure::new(exit::USAGE, e))
    }
}
