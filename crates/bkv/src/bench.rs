//! `bkv bench`: benchmarks that print numbers.

use crate::Failure;
use anyhow::Context;
use bkv_client::backup::{archive, keys};
use bkv_client::BackupKey;
use clap::Subcommand;
use rand::{RngCore, SeedableRng};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Arguments of `bkv bench`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    #[command(flatten)]
    load: crate::load::LoadArgs,
}

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Backup encryption and decryption throughput, beside the `age` command on the same data.
    Backup {
        /// Data size, e.g. 1GiB, 256MiB, 100MB, or bytes.
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        size: u64,
        /// Scratch directory (needs about three times the size free).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Parses "1GiB", "512MiB", "100MB", "4096".
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("not a size: {text}"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => return Err(format!("unknown unit in {text}")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("too large: {text}"))
}

fn mbps(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / 1e6 / seconds.max(1e-9)
}

fn write_random(path: &Path, size: u64) -> anyhow::Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    Ok(())
}

fn time_command(cmd: &mut Command) -> anyhow::Result<f64> {
    let start = Instant::now();
    let status = cmd.status().context("cannot run age")?;
    anyhow::ensure!(status.success(), "age failed: {status}");
    Ok(start.elapsed().as_secs_f64())
}

/// Runs a benchmark.
pub async fn run(args: BenchArgs) -> Result<(), Failure> {
    match args.command {
        Some(command) => run_backup(command).await,
        None => crate::load::run(args.load).await,
    }
}

async fn run_backup(command: BenchCommand) -> Result<(), Failure> {
    let BenchCommand::Backup { size, dir, json } = command;
    let scratch = tempfile_dir(dir)?;
    let src = scratch.join("src");
    std::fs::create_dir_all(&src).context("scratch dir")?;
    let data = src.join("data.bin");
    eprintln!("writing {size} bytes of random data to {}", data.display());
    write_random(&data, size).context("cannot write the benchmark data")?;
    let key = BackupKey::generate(&mut rand::rngs::OsRng);
    let identity = keys::age_identity(&key);
    let recipient = identity.to_public();
    let archive_path = scratch.join("ours.age");

    let start = Instant::now();
    let file = std::fs::File::create(&archive_path).context("archive file")?;
    // Not synced: the age command does not sync its output either.
    archive::pack(&src, &recipient, file, &|_| {}).map_err(anyhow::Error::new)?;
    let ours_enc = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let stats = archive::verify(
        std::fs::File::open(&archive_path).context("archive")?,
        &identity,
    )
    .map_err(anyhow::Error::new)?;
    let ours_dec = start.elapsed().as_secs_f64();
    if stats.bytes != size {
        return Err(anyhow::anyhow!("decrypted {} bytes, expected {size}", stats.bytes).into());
    }

    let identity_file = scratch.join("identity.txt");
    std::fs::write(&identity_file, keys::age_identity_string(&key).as_bytes())
        .context("identity file")?;
    let age_out = scratch.join("theirs.age");
    let age = Command::new("age").arg("--version").output();
    let (age_enc, age_dec) = if age.is_ok_and(|o| o.status.success()) {
        let enc = time_command(
            Command::new("age")
                .args(["-r", &recipient.to_string(), "-o"])
                .arg(&age_out)
                .arg(&data),
        )?;
        let dec = time_command(
            Command::new("age")
                .args(["-d", "-i"])
                .arg(&identity_file)
                .args(["-o", "/dev/null"])
                .arg(&age_out),
        )?;
        (Some(enc), Some(dec))
    } else {
        eprintln!("the age command is not installed; only bkv is measured");
        (None, None)
    };
    let _ = std::fs::remove_dir_all(&scratch);

    let row = |name: &str, enc: f64, dec: f64| (name.to_string(), mbps(size, enc), mbps(size, dec));
    let mut rows = vec![row("bkv (tar+age, in process)", ours_enc, ours_dec)];
    if let (Some(e), Some(d)) = (age_enc, age_dec) {
        rows.push(row("age command", e, d));
    }
    if json {
        let value = serde_json::json!({
            "size_bytes": size,
            "bkv": { "encrypt_mb_s": rows[0].1, "decrypt_mb_s": rows[0].2 },
            "age": rows.get(1).map(|r| serde_json::json!({ "encrypt_mb_s": r.1, "decrypt_mb_s": r.2 })),
        });
        println!("{value}");
    } else {
        println!("backup throughput, {size} bytes of random data (MB/s = 10^6 bytes per second)");
        println!("{:<28} {:>12} {:>12}", "", "encrypt MB/s", "decrypt MB/s");
        for (name, enc, dec) in &rows {
            println!("{name:<28} {enc:>12.1} {dec:>12.1}");
        }
        if rows.len() == 2 {
            println!(
                "{:<28} {:>12.2} {:>12.2}",
                "ratio bkv / age",
                rows[0].1 / rows[1].1,
                rows[0].2 / rows[1].2
            );
        }
    }
    Ok(())
}

fn tempfile_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let base = dir.unwrap_or_else(std::env::temp_dir);
    let mut tag = [0u8; 6];
    rand::rngs::OsRng.fill_bytes(&mut tag);
    let path = base.join(format!("bkv-bench-{}", hex::encode(tag)));
    std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(path)
}
