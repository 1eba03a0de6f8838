//! Fleet keys over the air, on the real binaries: `bkv up` runs a witness and publishes
//! epoch 1; over-the-air clients refuse every bad bundle with exit 6 and store nothing;
//! the auditor checks the whole log; rotation moves users to the new fleet.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn ota(vault: &Vault) -> PathBuf {
    vault.dir().join("client-ota.toml")
}

fn bundle_path(vault: &Vault) -> PathBuf {
    vault.dir().join("bundle.json")
}

/// Replaces the bundle the frontend serves (it looks at the file at most once a second).
fn serve_bundle(vault: &Vault, bundle: &serde_json::Value) {
    let path = bundle_path(vault);
    std::fs::write(&path, serde_json::to_vec_pretty(bundle).unwrap()).unwrap();
    std::thread::sleep(Duration::from_millis(1300));
}

fn read_bundle(vault: &Vault) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(bundle_path(vault)).unwrap()).unwrap()
}

fn config_value(path: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
        .map(|l| l.trim_end_matches('"').to_string())
        .unwrap_or_else(|| panic!("{key} not in {}", path.display()))
}

fn witness_url(vault: &Vault) -> String {
    config_value(&vault.dir().join("operator.toml"), "witness")
}

fn platform_root(vault: &Vault) -> String {
    std::fs::read_to_string(vault.dir().join("platform-root.hex"))
        .unwrap()
        .trim()
        .to_string()
}

fn audit_with(vault: &Vault, operator_key: &str, platform_root: &str) -> std::process::Output {
    let witness_key = config_value(&vault.config(), "witness_key");
    run(
        &[
            "audit",
            "--json",
            "--witness",
            &witness_url(vault),
            "--witness-key",
            &witness_key,
            "--operator-key",
            operator_key,
            "--platform-root",
            platform_root,
        ],
        "",
    )
}

fn audit(vault: &Vault, operator_key: &str) -> std::process::Output {
    audit_with(vault, operator_key, &platform_root(vault))
}

/// An enrollment the client must refuse: exit 6 with `needle`, and no key on the device.
fn refused_enrollment(config: &Path, vault: &Vault, device: &str, needle: &str) {
    let device = vault.device(device);
    let out = key_with_pin(config, "enroll", "mallory-target", &device, "1234");
    assert_fails(&out, 6, needle);
    assert!(
        !device.join("backup.key").exists(),
        "nothing stored on the device"
    );
}

#[test]
fn over_the_air_clients_refuse_bad_bundles_and_store_nothing() {
    let mut vault = Vault::start(&["--datacenters", "3"]);
    let good = read_bundle(&vault);
    assert_eq!(good["witness"]["epoch"], 1);
    let client = ota(&vault);

    // Tampered artifact: the digest no longer matches.
    let mut tampered = good.clone();
    let artifact = good["artifact"].as_str().unwrap();
    tampered["artifact"] = artifact
        .replace("\"max_attempts\":10", "\"max_attempts\":99")
        .into();
    assert_ne!(tampered["artifact"], good["artifact"]);
    serve_bundle(&vault, &tampered);
    refused_enrollment(
        &client,
        &vault,
        "d-tampered",
        "does not match the signed digest",
    );

    // Swapped signature: the operator's counter-signature where the witness's belongs.
    let mut swapped = good.clone();
    swapped["witness"]["signature"] = good["operator_signature"].clone();
    serve_bundle(&vault, &swapped);
    refused_enrollment(
        &client,
        &vault,
        "d-swapped",
        "witness signature does not verify",
    );

    // Missing counter-signature.
    let mut unsigned = good.clone();
    unsigned
        .as_object_mut()
        .unwrap()
        .remove("operator_signature");
    serve_bundle(&vault, &unsigned);
    refused_enrollment(
        &client,
        &vault,
        "d-unsigned",
        "no operator counter-signature",
    );

    // No bundle at all.
    std::fs::remove_file(bundle_path(&vault)).unwrap();
    std::thread::sleep(Duration::from_millis(1300));
    refused_enrollment(&client, &vault, "d-none", "sent no validation bundle");

    // The good bundle again, but a client that pins an unknown witness key.
    serve_bundle(&vault, &good);
    let text = std::fs::read_to_string(&client).unwrap();
    let witness_key = config_value(&client, "witness_key");
    let stranger = vault.device("stranger-witness.toml");
    std::fs::write(&stranger, text.replace(&witness_key, &"5a".repeat(32))).unwrap();
    refused_enrollment(
        &stranger,
        &vault,
        "d-stranger",
        "witness signature does not verify",
    );

    // None of that stored anything in the vault.
    assert_eq!(vault.status("mallory-target")["state"], "not-enrolled");

    // The good bundle works, over the air alone.
    let phone = vault.device("phone");
    assert_success(&key_with_pin(&client, "enroll", "alice", &phone, "1234"));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vault.dir().join("trust-state-ota.json")).unwrap())
            .unwrap();
    assert_eq!(state["highest_epoch"], 1);

    // Epoch 2: a member is replaced, and the operator publishes the new evidence.
    let dc3 = vault.nodes().into_iter().find(|n| n.dc == "dc3").unwrap();
    signal(dc3.pid, "KILL");
    vault.restart_node("dc3");
    vault.wait_for_fleet(3);
    let operator = vault.dir().join("operator.toml");
    let out = run(
        &["fleet", "publish", "--config", operator.to_str().unwrap()],
        "",
    );
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("published epoch 2"));
    std::thread::sleep(Duration::from_millis(1300));
    let out = key_with_pin(&client, "recover", "alice", &vault.device("phone2"), "1234");
    assert_success(&out);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vault.dir().join("trust-state-ota.json")).unwrap())
            .unwrap();
    assert_eq!(state["highest_epoch"], 2);

    // Replaying epoch 1 (validly signed, but old) is a rollback.
    serve_bundle(&vault, &good);
    let out = key_with_pin(&client, "recover", "alice", &vault.device("phone3"), "1234");
    assert_fails(&out, 6, "older than epoch 2");
    assert!(!vault.device("phone3").join("backup.key").exists());
    let fetched = vault.device("fetched.json");
    let out = run(
        &[
            "fleet",
            "bundle",
            "--config",
            client.to_str().unwrap(),
            "--out",
            fetched.to_str().unwrap(),
        ],
        "",
    );
    assert_fails(&out, 6, "older than epoch 2");

    // The auditor sees both epochs, each checked; a wrong operator key fails loudly.
    let operator_key = config_value(&client, "operator_key");
    let out = audit(&vault, &operator_key);
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["epochs"].as_array().unwrap().len(), 2);
    let fleet_key = config_value(&vault.config(), "fleet_key");
    assert_eq!(report["epochs"][0]["added"][0], fleet_key.as_str());
    assert_eq!(report["epochs"][1]["added"].as_array().unwrap().len(), 0);
    let out = audit(&vault, &"5a".repeat(32));
    assert_fails(&out, 6, "audit FAILED: epoch 1");
    // Evidence certified by a platform root the auditor does not pin fails too: a
    // publisher cannot vouch for HSMs with a key of its own making.
    let out = audit_with(&vault, &operator_key, &"5a".repeat(32));
    assert_fails(&out, 6, "not a pinned one");
    let out = run(
        &[
            "audit",
            "--witness",
            &witness_url(&vault),
            "--witness-key",
            &witness_key,
            "--operator-key",
            &operator_key,
        ],
        "",
    );
    assert_fails(&out, 2, "--platform-root is required");

    // Offline verification: the epoch-2 bundle from the witness passes; a tampered one exits 6.
    let latest = vault.device("latest.json");
    std::fs::write(
        &latest,
        serde_json::to_vec(&read_bundle_from_witness(&vault, 2)).unwrap(),
    )
    .unwrap();
    let verify = |path: &Path| {
        run(
            &[
                "fleet",
                "verify-bundle",
                "--bundle",
                path.to_str().unwrap(),
                "--witness-key",
                &witness_key,
                "--operator-key",
                &operator_key,
                "--fleet-key",
                &fleet_key,
                "--platform-root",
                &platform_root(&vault),
            ],
            "",
        )
    };
    assert_success(&verify(&latest));
    let bad = vault.device("bad.json");
    std::fs::write(&bad, serde_json::to_vec(&tampered).unwrap()).unwrap();
    assert_fails(&verify(&bad), 6, "does not match the signed digest");
}

fn read_bundle_from_witness(vault: &Vault, epoch: u64) -> serde_json::Value {
    // The witness's log over plain HTTP, as an outside auditor reads it.
    let url = witness_url(vault);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = bkv_witness::WitnessClient::new(&url).unwrap();
        serde_json::to_value(client.epoch(epoch).await.unwrap()).unwrap()
    })
}

/// Starts a process of the `bkv` binary with its output in `log`.
fn spawn(args: &[&str], log: &Path) -> std::process::Child {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(bkv_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    child
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn rotation_moves_users_of_the_old_fleet_and_sends_new_ones_to_the_new_fleet() {
    let mut vault = Vault::start(&["--datacenters", "1"]);
    let dir = vault.dir();
    // alice and bob live on the first fleet (A).
    vault.enroll("alice", &vault.device("alice"), "1111");
    vault.enroll("bob", &vault.device("bob"), "2222");
    vault.enroll("erin", &vault.device("erin"), "5555");
    let fleet_a = config_value(&vault.config(), "fleet_key");

    // A second fleet (B) of one datacenter, same platform and code.
    let node_a = vault.nodes().into_iter().find(|n| n.dc == "dc1").unwrap();
    let b_port = free_port();
    let b_config = dir.join("fleet-b-dc1.toml");
    let text = std::fs::read_to_string(&node_a.config).unwrap();
    let a_listen = config_value(&node_a.config, "listen");
    std::fs::write(
        &b_config,
        text.replace(&a_listen, &format!("127.0.0.1:{b_port}")),
    )
    .unwrap();
    let b_url = format!("http://127.0.0.1:{b_port}");
    vault.extra.push(spawn(
        &["node", "--config", b_config.to_str().unwrap()],
        &dir.join("logs/fleet-b.log"),
    ));

    // A frontend for the rotation: B takes new users, A is looked in for old ones.
    let f_port = free_port();
    let frontend = std::fs::read_to_string(dir.join("frontend.toml")).unwrap();
    let frontend = frontend
        .replace(
            &config_value(&dir.join("frontend.toml"), "listen"),
            &format!("127.0.0.1:{f_port}"),
        )
        .replace(&node_a.url, &b_url)
        .replace("client_config = \"client.toml\"\n", "")
        + &format!(
            "\n[[previous_fleets]]\nnodes = [{{ dc = \"dc1\", url = \"{}\" }}]\n",
            node_a.url
        );
    let f_config = dir.join("frontend-rotation.toml");
    std::fs::write(&f_config, frontend).unwrap();
    vault.extra.push(spawn(
        &["frontend", "--config", f_config.to_str().unwrap()],
        &dir.join("logs/frontend-rotation.log"),
    ));

    // The operator publishes epoch 2: B active, A recover-only.
    let operator = dir.join("operator.toml");
    let op = std::fs::read_to_string(&operator).unwrap();
    let (head, _) = op.split_once("[[fleets]]").unwrap();
    let rotated = format!(
        "{head}[[fleets]]\nrole = \"active\"\nnodes = [\"{b_url}\"]\n\n[[fleets]]\nrole = \"recover-only\"\nnodes = [\"{}\"]\nfleet_key = \"{fleet_a}\"\n",
        node_a.url
    );
    std::fs::write(&operator, rotated).unwrap();
    let mut published = None;
    for _ in 0..100 {
        let out = run(
            &["fleet", "publish", "--config", operator.to_str().unwrap()],
            "",
        );
        if code(&out) == 0 {
            published = Some(out);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let published = published.expect("fleet B forms and epoch 2 is published");
    assert!(String::from_utf8_lossy(&published.stdout).contains("published epoch 2"));
    let bundle = read_bundle(&vault);
    let artifact: serde_json::Value =
        serde_json::from_str(bundle["artifact"].as_str().unwrap()).unwrap();
    let fleet_b = artifact["fleets"][0]["fleet_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(fleet_b, fleet_a);
    assert_eq!(artifact["fleets"][1]["role"], "recover-only");

    // An over-the-air client of the rotation frontend.
    let client = dir.join("client-rotation.toml");
    let url = config_value(&ota(&vault), "url");
    std::fs::write(
        &client,
        std::fs::read_to_string(ota(&vault))
            .unwrap()
            .replace(&url, &format!("http://127.0.0.1:{f_port}")),
    )
    .unwrap();
    let status = |user: &str| {
        let out = run(
            &[
                "key",
                "status",
                "--json",
                "--config",
                client.to_str().unwrap(),
                "--user",
                user,
            ],
            "",
        );
        assert_success(&out);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // Recovers `user` through the rotation frontend; says whether the record moved (or
    // a kept retirement finished).
    let recover_moves = |user: &str, device: &Path, pin: &str| {
        let out = key_with_pin(&client, "recover", user, device, pin);
        assert_success(&out);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let moved = stdout.contains(&format!("moved {user}"));
        assert!(moved || !stdout.contains("moved"), "{stdout}");
        moved
    };
    std::thread::sleep(Duration::from_millis(1300));

    // A new user goes to B.
    assert_success(&key_with_pin(
        &client,
        "enroll",
        "carol",
        &vault.device("carol"),
        "3333",
    ));
    // bob guesses wrong on A: the guess counts there, and he stays on A.
    let out = key_with_pin(&client, "recover", "bob", &vault.device("bob2"), "0000");
    assert_fails(&out, 3, "attempts left");
    assert_eq!(vault.status("bob")["attempts_left"], 9);
    // alice recovers: found on A, moved to B with her key and a full budget, A's record retired.
    assert!(recover_moves("alice", &vault.device("alice2"), "1111"));
    assert_eq!(
        std::fs::read(vault.device("alice").join("backup.key")).unwrap(),
        std::fs::read(vault.device("alice2").join("backup.key")).unwrap()
    );
    // Fleet A's own frontend (vault.config pins A) sees alice's record gone, bob's kept.
    let a_alice = run(
        &[
            "key",
            "status",
            "--json",
            "--config",
            vault.config().to_str().unwrap(),
            "--user",
            "alice",
        ],
        "",
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&a_alice.stdout).unwrap()["state"],
        "destroyed"
    );
    assert_eq!(vault.status("bob")["state"], "active");
    // Through the rotation frontend alice is on B now, with a full budget, and recovers there.
    assert_eq!(status("alice")["attempts_left"], 10);
    assert!(!recover_moves("alice", &vault.device("alice3"), "1111"));
    // bob with the right PIN moves too; carol stays where she is.
    assert!(recover_moves("bob", &vault.device("bob3"), "2222"));
    assert_eq!(status("bob")["attempts_left"], 10);
    assert_success(&key_with_pin(
        &client,
        "recover",
        "carol",
        &vault.device("carol2"),
        "3333",
    ));

    // erin moves through a frontend that refuses her fifth call: her key is enrolled on B,
    // but the Retire for A is refused. The client keeps the ticket, and her next recovery
    // (through the first rotation frontend, which shares the client's state) retires A's
    // record.
    let strict_port = free_port();
    let mut strict: toml::Table =
        toml::from_str(&std::fs::read_to_string(&f_config).unwrap()).unwrap();
    strict.insert(
        "listen".into(),
        toml::Value::String(format!("127.0.0.1:{strict_port}")),
    );
    strict.insert(
        "rate_limit".into(),
        toml::from_str::<toml::Value>(
            "per_second = 0.01\nburst = 4\nguesses_per_minute = 60.0\nguess_burst = 10\n",
        )
        .unwrap(),
    );
    let strict_config = dir.join("frontend-strict.toml");
    std::fs::write(&strict_config, toml::to_string(&strict).unwrap()).unwrap();
    vault.extra.push(spawn(
        &["frontend", "--config", strict_config.to_str().unwrap()],
        &dir.join("logs/frontend-strict.log"),
    ));
    let strict_client = dir.join("client-strict.toml");
    std::fs::write(
        &strict_client,
        std::fs::read_to_string(&client).unwrap().replace(
            &format!("127.0.0.1:{f_port}"),
            &format!("127.0.0.1:{strict_port}"),
        ),
    )
    .unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", strict_port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = key_with_pin(
        &strict_client,
        "recover",
        "erin",
        &vault.device("erin2"),
        "5555",
    );
    assert_success(&out);
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        warning.contains("was not retired") && warning.contains("next recovery tries again"),
        "{warning}"
    );
    assert_eq!(
        vault.status("erin")["state"],
        "active",
        "A still holds erin"
    );
    assert_eq!(
        status("erin")["attempts_left"],
        10,
        "B holds erin with a full budget"
    );
    assert!(recover_moves("erin", &vault.device("erin3"), "5555"));
    assert_eq!(
        vault.status("erin")["state"],
        "destroyed",
        "A's record is retired now"
    );
    // Done: the next recovery has nothing left to retry.
    assert!(!recover_moves("erin", &vault.device("erin4"), "5555"));

    // New enrollments are refused by a recover-only fleet: A's own frontend now serves
    // epoch 2, where A is recover-only.
    let a_only = ota(&vault);
    let out = key_with_pin(&a_only, "enroll", "dave", &vault.device("dave"), "4444");
    assert_fails(&out, 6, "recover-only");
    assert!(!vault.device("dave").join("backup.key").exists());

    // The auditor sees B added in epoch 2 and A become recover-only.
    let out = audit(&vault, &config_value(&ota(&vault), "operator_key"));
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["epochs"][1]["added"][0], fleet_b.as_str());
    let change = report["epochs"][1]["role_changes"][0].as_str().unwrap();
    assert!(change.contains("active -> recover-only"), "{change}");
}
