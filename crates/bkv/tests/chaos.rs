//! Chaos on real processes: a 5-datacenter fleet under steady load while nodes are
//! killed, restarted and paused. Afterwards no acknowledged enrollment is lost, no record
//! has spent more guesses than were made, and every client saw success or a clear error.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};

fn pid_of(vault: &Vault, dc: &str) -> u32 {
    vault.nodes().into_iter().find(|n| n.dc == dc).unwrap().pid
}

/// `bkv bench` as background load, reporting JSON when it ends.
fn start_load(vault: &Vault, seconds: u64) -> Child {
    Command::new(bkv_bin())
        .args([
            "bench",
            "--config",
            vault.config().to_str().unwrap(),
            "--op",
            "mixed",
            "--users",
            "20",
            "--concurrency",
            "4",
            "--duration",
            &format!("{seconds}s"),
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn fleet_under_load_survives_kills_restarts_and_pauses() {
    let mut vault = Vault::start(&[]);
    vault.wait_for_fleet(5);
    let users: Vec<String> = (0..4).map(|i| format!("acked{i}")).collect();
    for user in &users {
        vault.enroll(user, &vault.device(user), "1234");
    }
    let load = start_load(&vault, 14);

    let (mut wrong, mut unknown) = (0u32, 0u32);
    let mut guess = |vault: &Vault| {
        let out = vault.recover("acked0", &vault.device("scratch"), "0000");
        match code(&out) {
            3 => wrong += 1,
            // Unavailable or interrupted: the guess may or may not have been committed.
            5 => unknown += 1,
            other => panic!("unexpected exit {other}: {}", stderr(&out)),
        }
    };

    // Kill the leader, guess, bring it back as a new member.
    guess(&vault);
    let leader = vault.leader_dc();
    signal(pid_of(&vault, &leader), "KILL");
    guess(&vault);
    vault.restart_node(&leader);
    // Pause a follower for a while, guess, resume it.
    vault.wait_for_fleet(5);
    let follower = ["dc1", "dc2", "dc3", "dc4", "dc5"]
        .into_iter()
        .find(|dc| *dc != vault.leader_dc() && *dc != leader)
        .unwrap()
        .to_string();
    let paused = pid_of(&vault, &follower);
    signal(paused, "STOP");
    guess(&vault);
    std::thread::sleep(std::time::Duration::from_secs(2));
    signal(paused, "CONT");
    // Kill another follower for good (a minority stays down).
    let victim = ["dc1", "dc2", "dc3", "dc4", "dc5"]
        .into_iter()
        .find(|dc| *dc != vault.leader_dc() && *dc != leader && *dc != follower)
        .unwrap()
        .to_string();
    signal(pid_of(&vault, &victim), "KILL");
    guess(&vault);

    let report = load.wait_with_output().unwrap();
    assert!(
        report.status.success(),
        "load generator failed: {}",
        String::from_utf8_lossy(&report.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert!(
        report["ok"].as_u64().unwrap() > 0,
        "the load made progress: {report}"
    );
    for (kind, _) in report["errors"].as_object().unwrap() {
        assert!(
            kind == "unavailable" || kind == "interrupted",
            "only clear, retryable errors under faults: {report}"
        );
    }

    // Guesses add up: each wrong PIN was counted once; an "unavailable" attempt may or may
    // not have been committed; nothing else was spent.
    let left = vault.status("acked0")["attempts_left"].as_u64().unwrap() as u32;
    assert!(wrong >= 1, "some guesses went through");
    assert!(
        left <= 10 - wrong,
        "every wrong PIN counted: left {left}, wrong {wrong}"
    );
    assert!(
        left + wrong + unknown >= 10,
        "no guess spent that was not made: left {left}, wrong {wrong}, unknown {unknown}"
    );

    // No acknowledged enrollment was lost.
    for user in &users {
        assert_success(&vault.recover(user, &vault.device(&format!("{user}-after")), "1234"));
    }
    assert_eq!(
        vault.status("acked0")["attempts_left"],
        10,
        "the right PIN restores the budget"
    );
}
