//! A 5-datacenter fleet from the real binaries on loopback: killing, pausing and
//! restarting nodes, and an insider starting a second fleet from the same configs.

mod common;

use common::*;
use std::collections::HashMap;

fn pid_of(vault: &Vault, dc: &str) -> u32 {
    vault.nodes().into_iter().find(|n| n.dc == dc).unwrap().pid
}

fn fingerprints(status: &serde_json::Value) -> HashMap<String, String> {
    status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["dc"].as_str().unwrap().to_string(),
                m["fingerprint"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn attempts_left(vault: &Vault, user: &str) -> u64 {
    vault.status(user)["attempts_left"].as_u64().unwrap()
}

fn wrong_guess(vault: &Vault, user: &str, expect_left: u64) {
    let out = vault.recover(user, &vault.device("scratch"), "0000");
    assert_fails(&out, 3, &format!("wrong PIN: {expect_left} attempts left"));
}

#[test]
fn minority_loss_keeps_enrollments_restarted_nodes_rejoin_and_guesses_add_up() {
    let mut vault = Vault::start(&[]);
    let initial = vault.wait_for_fleet(5);
    let users = ["alice", "bob", "carol"];
    for user in users {
        vault.enroll(user, &vault.device(user), "1234");
    }
    // Two wrong guesses before the failover.
    wrong_guess(&vault, "alice", 9);
    wrong_guess(&vault, "alice", 8);

    // kill -9 the leader and one follower.
    let leader = vault.leader_dc();
    let follower = ["dc1", "dc2", "dc3", "dc4", "dc5"]
        .into_iter()
        .find(|dc| *dc != leader)
        .unwrap()
        .to_string();
    signal(pid_of(&vault, &leader), "KILL");
    signal(pid_of(&vault, &follower), "KILL");

    // Guesses during the failover (the frontend finds the new leader), then after.
    wrong_guess(&vault, "alice", 7);
    wrong_guess(&vault, "alice", 6);
    let status = vault.fleet_status();
    assert_eq!(status["majority"], true, "{status}");
    assert_ne!(status["leader"], leader.as_str());
    wrong_guess(&vault, "alice", 5);
    assert_eq!(
        attempts_left(&vault, "alice"),
        5,
        "every guess counted exactly once"
    );

    for user in users {
        let device = vault.device(&format!("{user}-new"));
        assert_success(&vault.recover(user, &device, "1234"));
        assert_eq!(
            std::fs::read(device.join("backup.key")).unwrap(),
            std::fs::read(vault.device(user).join("backup.key")).unwrap()
        );
    }
    assert_eq!(attempts_left(&vault, "alice"), 10);

    // The killed nodes come back as new members of their datacenter slots.
    vault.restart_node(&leader);
    vault.restart_node(&follower);
    let rejoined = vault.wait_for_fleet(5);
    let (before, after) = (fingerprints(&initial), fingerprints(&rejoined));
    for dc in [&leader, &follower] {
        assert_ne!(
            before[dc.as_str()],
            after[dc.as_str()],
            "{dc} came back with a fresh identity"
        );
    }
    assert_eq!(rejoined["fleet_key"], initial["fleet_key"]);

    // Now two *other* nodes fail: the restarted members carry the records.
    let others: Vec<String> = ["dc1", "dc2", "dc3", "dc4", "dc5"]
        .into_iter()
        .filter(|dc| *dc != leader && *dc != follower)
        .take(2)
        .map(String::from)
        .collect();
    for dc in &others {
        signal(pid_of(&vault, dc), "KILL");
    }
    for user in users {
        assert_success(&vault.recover(user, &vault.device(&format!("{user}-third")), "1234"));
    }
}

#[test]
fn without_a_majority_requests_are_unavailable_and_change_nothing() {
    let vault = Vault::start(&["--datacenters", "5"]);
    vault.wait_for_fleet(5);
    vault.enroll("alice", &vault.device("alice"), "1234");
    wrong_guess(&vault, "alice", 9);
    let leader = vault.leader_dc();
    let mut paused: Vec<u32> = vec![pid_of(&vault, &leader)];
    paused.extend(
        vault
            .nodes()
            .into_iter()
            .filter(|n| n.dc != leader)
            .take(2)
            .map(|n| n.pid),
    );
    for pid in &paused {
        signal(*pid, "STOP");
    }
    let out = vault.recover("alice", &vault.device("p"), "1234");
    assert_fails(&out, 5, "unavailable");
    assert!(!vault.device("p").join("backup.key").exists());
    let enroll = vault.key(
        "enroll",
        "bob",
        &[
            "--device",
            vault.device("bob").to_str().unwrap(),
            "--pin-stdin",
        ],
        "1234\n",
    );
    assert_fails(&enroll, 5, "unavailable");
    assert!(
        !vault.device("bob").join("backup.key").exists(),
        "nothing stored on the device"
    );
    for pid in &paused {
        signal(*pid, "CONT");
    }
    vault.wait_for_fleet(5);
    assert_eq!(
        attempts_left(&vault, "alice"),
        9,
        "the refused recovery spent nothing"
    );
    assert_eq!(
        vault.status("bob")["state"],
        "not-enrolled",
        "the refused enrollment stored nothing"
    );
    assert_success(&vault.recover("alice", &vault.device("p"), "1234"));
}

/// Copies the fleet directory with every port moved, as an insider would to run a copy.
fn copy_with_new_ports(vault: &Vault, into: &std::path::Path) {
    std::fs::create_dir_all(into).unwrap();
    let mut mapping: HashMap<String, String> = HashMap::new();
    for entry in std::fs::read_dir(vault.dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, into.join(path.file_name().unwrap())).unwrap();
        }
    }
    let port_pattern = "127.0.0.1:";
    for entry in std::fs::read_dir(into).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let mut text = std::fs::read_to_string(&path).unwrap();
            let mut out = String::new();
            while let Some(i) = text.find(port_pattern) {
                let (head, tail) = text.split_at(i + port_pattern.len());
                out.push_str(head);
                let digits: String = tail.chars().take_while(|c| c.is_ascii_digit()).collect();
                let fresh = mapping.entry(digits.clone()).or_insert_with(|| {
                    std::net::TcpListener::bind("127.0.0.1:0")
                        .unwrap()
                        .local_addr()
                        .unwrap()
                        .port()
                        .to_string()
                });
                out.push_str(fresh);
                text = tail[digits.len()..].to_string();
            }
            out.push_str(&text);
            std::fs::write(&path, out).unwrap();
        }
    }
}

#[test]
fn insider_starting_a_second_fleet_from_the_same_configs_gets_nothing() {
    let mut vault = Vault::start(&["--datacenters", "3"]);
    let original = vault.wait_for_fleet(3);
    vault.enroll("alice", &vault.device("alice"), "1234");

    // A copy of dc2's node, on a new port but with the real peers: it asks to join the
    // running fleet and is refused, since dc2's slot is live.
    let copy_one = vault.root.path().join("copy-one");
    copy_with_new_ports(&vault, &copy_one);
    let dc2_copy = copy_one.join("dc2.toml");
    let text = std::fs::read_to_string(&dc2_copy).unwrap();
    // Keep the copied node's new listen port, but point its peers at the real fleet.
    let real: Vec<_> = vault.nodes();
    let mut patched = String::new();
    for line in text.lines() {
        if line.starts_with("url = ") {
            let dc_line = patched.lines().last().unwrap_or("").to_string();
            let dc = dc_line
                .trim_start_matches("dc = ")
                .trim_matches('"')
                .to_string();
            let url = &real.iter().find(|n| n.dc == dc).unwrap().url;
            patched.push_str(&format!("url = \"{url}\"\n"));
        } else {
            patched.push_str(line);
            patched.push('\n');
        }
    }
    std::fs::write(&dc2_copy, patched).unwrap();
    let rogue = std::process::Command::new(bkv_bin())
        .args(["node", "--config", dc2_copy.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(copy_one.join("rogue.log")).unwrap())
        .spawn()
        .unwrap();
    vault.extra.push(rogue);
    std::thread::sleep(std::time::Duration::from_secs(4));
    let status = vault.wait_for_fleet(3);
    assert_eq!(
        fingerprints(&status),
        fingerprints(&original),
        "membership unchanged"
    );
    let log = std::fs::read_to_string(copy_one.join("rogue.log")).unwrap();
    assert!(!log.contains("fleet secrets received"), "{log}");

    // A whole second fleet from a copy of the directory, with every port moved: it
    // founds its own fleet with new keys and serves nobody enrolled in the first.
    let copy = vault.root.path().join("copy-all");
    copy_with_new_ports(&vault, &copy);
    for dc in ["dc1", "dc2", "dc3"] {
        let child = std::process::Command::new(bkv_bin())
            .args([
                "node",
                "--config",
                copy.join(format!("{dc}.toml")).to_str().unwrap(),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(copy.join(format!("{dc}.log"))).unwrap())
            .spawn()
            .unwrap();
        vault.extra.push(child);
    }
    // The copied client.toml still pins the first fleet's key.
    let copied_client = copy.join("client.toml");
    let text = std::fs::read_to_string(&copied_client).unwrap();
    let frontend = std::process::Command::new(bkv_bin())
        .args([
            "frontend",
            "--config",
            copy.join("frontend.toml").to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(copy.join("frontend.log")).unwrap())
        .spawn()
        .unwrap();
    vault.extra.push(frontend);
    let mut second = serde_json::Value::Null;
    for _ in 0..150 {
        let out = run(
            &[
                "fleet",
                "status",
                "--json",
                "--config",
                copied_client.to_str().unwrap(),
            ],
            "",
        );
        second = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        if second["voters"] == 3 && second["majority"] == true {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(second["voters"], 3, "the second fleet formed: {second}");
    assert_ne!(
        second["fleet_key"], original["fleet_key"],
        "the second fleet cannot have the first's keys"
    );
    assert!(text.contains(original["fleet_key"].as_str().unwrap()));

    // A client pinned to the first fleet refuses the second.
    let out = key_with_pin(
        &copied_client,
        "recover",
        "alice",
        &vault.device("stolen"),
        "1234",
    );
    assert_fails(&out, 6, "not the pinned fleet key");
    // Pinned to the second fleet instead, alice is simply not there.
    let repinned = copy.join("repinned.toml");
    std::fs::write(
        &repinned,
        text.replace(
            original["fleet_key"].as_str().unwrap(),
            second["fleet_key"].as_str().unwrap(),
        ),
    )
    .unwrap();
    let out = key_with_pin(
        &repinned,
        "recover",
        "alice",
        &vault.device("stolen"),
        "1234",
    );
    assert_fails(&out, 4, "never enrolled");
    // The first fleet is untouched.
    assert_eq!(attempts_left(&vault, "alice"), 10);
}
