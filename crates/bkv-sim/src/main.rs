//! `bkv-sim`: runs seeded simulations of whole fleets under faults and checks I1–I4.
//!
//! Exit codes: 0 when no invariant broke, 1 when one did (the seed and a reproducing
//! trace are printed), 2 on a usage error.

use anyhow::{bail, Context};
use bkv_sim::{run, shrink, BrokenMode, FaultCounts, OpCounts, SimConfig};
use clap::Parser;
use std::time::Instant;

/// Deterministic simulation of bkv fleets under faults (drops, duplicates, delays,
/// reordering, replays, partitions, crashes, restarts), checking the guess limit (I1),
/// commit-before-release (I2), durability (I3) and destruction (I4) after every step.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// One seed to run.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// A range of seeds, `A..B` (B excluded).
    #[arg(long)]
    seeds: Option<String>,
    /// Steps per run.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Members of the fleet.
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Accounts the clients use.
    #[arg(long, default_value_t = 4)]
    accounts: usize,
    /// Guess budget per record.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// On a violation, look for a shorter run (fewer steps, fewer fault kinds) that still fails.
    #[arg(long)]
    shrink: bool,
    /// Print every run's trace, not only failing ones.
    #[arg(long)]
    verbose: bool,
    /// Print one JSON report per run instead of text.
    #[arg(long)]
    json: bool,
    /// Play a deliberately broken harness, to see the oracle catch it: `uncounted-guess`
    /// (a committed guess goes missing from the oracle's view of the fleet) or
    /// `hidden-reset` (the harness secretly resets budgets with the right PIN).
    #[arg(long, value_parser = ["uncounted-guess", "hidden-reset"])]
    broken: Option<String>,
}

fn seeds(args: &Args) -> anyhow::Result<std::ops::Range<u64>> {
    if let Some(seed) = args.seed {
        return Ok(seed..seed + 1);
    }
    let Some(range) = &args.seeds else {
        return Ok(0..1);
    };
    let (a, b) = range
        .split_once("..")
        .context("--seeds takes a range A..B, e.g. 0..100")?;
    let (a, b): (u64, u64) = (a.parse()?, b.parse()?);
    if a >= b {
        bail!("--seeds {range}: the range is empty");
    }
    Ok(a..b)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let seeds = match seeds(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.members == 0 || args.accounts == 0 || args.max_attempts == 0 {
        eprintln!("error: --members, --accounts and --max-attempts must be at least 1");
        return std::process::ExitCode::from(2);
    }
    let started = Instant::now();
    let (mut faults, mut ops) = (FaultCounts::default(), OpCounts::default());
    let (mut runs, mut failed, mut entries) = (0u64, 0u64, 0u64);
    for seed in seeds {
        let config = SimConfig {
            seed,
            steps: args.steps,
            members: args.members,
            accounts: args.accounts,
            max_attempts: args.max_attempts,
            broken: match args.broken.as_deref() {
                Some("uncounted-guess") => Some(BrokenMode::UncountedGuess),
                Some("hidden-reset") => Some(BrokenMode::HiddenReset),
                _ => None,
            },
            ..SimConfig::default()
        };
        let report = run(&config);
        runs += 1;
        faults += report.faults;
        ops += report.ops;
        entries += report.committed_entries;
        if args.json {
            println!(
                "{}",
                serde_json::to_string(&report).expect("a report serializes")
            );
        } else if args.verbose {
            for line in &report.trace {
                println!("  {line}");
            }
        }
        if report.violations.is_empty() {
            continue;
        }
        failed += 1;
        let (config, report) = if args.shrink {
            shrink(&config)
        } else {
            (config, report)
        };
        eprintln!(
            "VIOLATION with seed {seed} ({} steps, faults {:?}):",
            config.steps, config.faults
        );
        for v in &report.violations {
            eprintln!("  after step {}: {}", v.step, v.what);
        }
        eprintln!("reproduce: bkv-sim --seed {seed} --steps {} --members {} --accounts {} --max-attempts {}",
            config.steps, config.members, config.accounts, config.max_attempts);
        eprintln!("trace:");
        for line in &report.trace {
            eprintln!("  {line}");
        }
    }
    if !args.json {
        println!(
            "runs: {runs} ({} steps each, {} members)",
            args.steps, args.members
        );
        println!("faults: {faults}");
        println!("operations: {ops}");
        println!("committed entries: {entries}");
        println!("violations: {failed}");
        println!("time: {:.1} s", started.elapsed().as_secs_f64());
    }
    if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}
