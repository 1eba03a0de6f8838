//! The fleet simulation as CI runs it: a few hundred seeds under every kind of fault
//! with no invariant broken, and deliberately broken harnesses that the oracle catches.

use bkv_sim::{run, shrink, BrokenMode, FaultCounts, OpCounts, SimConfig};

const STEPS: usize = 20;

/// Runs `seeds` and fails with the seed, violations and trace of the first failing run.
fn all_hold(seeds: std::ops::Range<u64>, members: usize) -> (FaultCounts, OpCounts) {
    let (mut faults, mut ops) = (FaultCounts::default(), OpCounts::default());
    for seed in seeds {
        let report = run(&SimConfig {
            seed,
            steps: STEPS,
            members,
            ..SimConfig::default()
        });
        assert!(
            report.violations.is_empty(),
            "seed {seed}: {:#?}\ntrace:\n{}",
            report.violations,
            report.trace.join("\n")
        );
        faults += report.faults;
        ops += report.ops;
    }
    println!("faults: {faults}\noperations: {ops}");
    (faults, ops)
}

#[test]
fn three_member_fleets_hold_i1_to_i4_under_faults_seeds_0_to_75() {
    let (faults, ops) = all_hold(0..75, 3);
    // The runs did exercise what they claim to.
    assert!(faults.drops > 0 && faults.dups > 0 && faults.delays > 0 && faults.reorders > 0);
    assert!(
        faults.replays > 0 && faults.partitions > 0 && faults.crashes > 0 && faults.restarts > 0
    );
    assert!(ops.enrolls > 0 && ops.recoveries > 0 && ops.wrong_guesses > 0);
}

#[test]
fn three_member_fleets_hold_i1_to_i4_under_faults_seeds_75_to_150() {
    all_hold(75..150, 3);
}

#[test]
fn three_member_fleets_hold_i1_to_i4_under_faults_seeds_150_to_225() {
    all_hold(150..225, 3);
}

#[test]
fn five_member_fleets_hold_i1_to_i4_under_faults() {
    let (faults, _) = all_hold(1_000..1_040, 5);
    assert!(faults.crashes > 0 && faults.partitions > 0);
}

fn broken(mode: BrokenMode, seed: u64) -> SimConfig {
    SimConfig {
        seed,
        steps: 40,
        broken: Some(mode),
        ..SimConfig::default()
    }
}

#[test]
fn oracle_catches_a_guess_that_escapes_the_count() {
    for seed in 0..3 {
        let report = run(&broken(BrokenMode::UncountedGuess, seed));
        assert!(
            !report.violations.is_empty(),
            "seed {seed}: a KE2 without its committed guess went unnoticed\n{}",
            report.trace.join("\n")
        );
    }
}

#[test]
fn oracle_catches_budget_resets_nobody_earned() {
    for seed in 0..3 {
        let report = run(&broken(BrokenMode::HiddenReset, seed));
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.what.starts_with("I1") || v.what.starts_with("count")),
            "seed {seed}: hidden resets went unnoticed: {:?}",
            report.violations
        );
    }
}

#[test]
fn a_failing_run_shrinks_to_a_shorter_trace_that_still_fails() {
    let config = broken(BrokenMode::HiddenReset, 0);
    let (small, report) = shrink(&config);
    assert!(!report.violations.is_empty());
    assert!(small.steps <= config.steps);
    assert!(report.trace.len() <= config.steps + 2);
}
