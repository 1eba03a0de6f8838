//! The user's flows through the real binaries: `bkv up`, then `bkv key …`.

mod common;

use common::*;

#[test]
fn enroll_then_recover_on_a_new_device_gives_the_same_key() {
    let vault = Vault::start(&[]);
    let (phone1, phone2) = (vault.device("phone1"), vault.device("phone2"));
    vault.enroll("alice", &phone1, "1234");
    let key1 = std::fs::read(phone1.join("backup.key")).unwrap();
    assert_eq!(key1.len(), 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(phone1.join("backup.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "backup.key is private");
    }
    assert_success(&vault.recover("alice", &phone2, "1234"));
    assert_eq!(std::fs::read(phone2.join("backup.key")).unwrap(), key1);
    let status = vault.status("alice");
    assert_eq!(status["enrolled"], true);
    assert_eq!(status["attempts_left"], 10);
    assert_eq!(status["max_attempts"], 10);
}

#[test]
fn enrolling_again_keeps_the_device_key_and_restores_the_budget() {
    let vault = Vault::start(&[]);
    let phone = vault.device("phone");
    vault.enroll("alice", &phone, "1234");
    let key = std::fs::read(phone.join("backup.key")).unwrap();
    assert_fails(
        &vault.recover("alice", &vault.device("x"), "0000"),
        3,
        "wrong PIN: 9 attempts left",
    );
    vault.enroll("alice", &phone, "5678");
    assert_eq!(
        std::fs::read(phone.join("backup.key")).unwrap(),
        key,
        "the device key is reused"
    );
    assert_eq!(vault.status("alice")["attempts_left"], 10);
    // The old PIN no longer opens the record; the new one does.
    assert_fails(
        &vault.recover("alice", &vault.device("y"), "1234"),
        3,
        "wrong PIN: 9 attempts left",
    );
    assert_success(&vault.recover("alice", &vault.device("z"), "5678"));
    assert_eq!(
        std::fs::read(vault.device("z").join("backup.key")).unwrap(),
        key
    );
}

#[test]
fn wrong_pins_count_down_to_destruction() {
    let vault = Vault::start(&[]);
    vault.enroll("alice", &vault.device("phone1"), "1234");
    let other = vault.device("phone2");
    for left in (0..10).rev() {
        let out = vault.recover("alice", &other, "9999");
        assert_fails(&out, 3, &format!("wrong PIN: {left} attempts left"));
    }
    assert!(
        !other.join("backup.key").exists(),
        "nothing written on a wrong PIN"
    );
    let status = vault.status("alice");
    assert_eq!(status["state"], "destroyed");
    assert_eq!(status["enrolled"], false);
    // Even the right PIN finds nothing now.
    assert_fails(&vault.recover("alice", &other, "1234"), 4, "destroyed");
}

#[test]
fn right_pin_restores_the_full_budget() {
    let vault = Vault::start(&["--max-attempts", "5"]);
    vault.enroll("alice", &vault.device("phone1"), "1234");
    for left in [4, 3, 2] {
        assert_fails(
            &vault.recover("alice", &vault.device("p"), "0000"),
            3,
            &format!("{left} attempts left"),
        );
    }
    assert_eq!(vault.status("alice")["attempts_left"], 2);
    assert_success(&vault.recover("alice", &vault.device("p"), "1234"));
    let status = vault.status("alice");
    assert_eq!(status["attempts_left"], 5);
    assert_eq!(status["max_attempts"], 5);
}

#[test]
fn never_enrolled_user_has_no_key_to_recover() {
    let vault = Vault::start(&[]);
    assert_fails(
        &vault.recover("nobody", &vault.device("p"), "1234"),
        4,
        "never enrolled",
    );
    assert_eq!(vault.status("nobody")["state"], "not-enrolled");
}

#[test]
fn recover_refuses_to_overwrite_a_different_key_unless_forced() {
    let vault = Vault::start(&[]);
    let phone = vault.device("phone");
    vault.enroll("alice", &phone, "1234");
    let other = vault.device("other");
    vault.enroll("bob", &other, "1234");
    let bobs_key = std::fs::read(other.join("backup.key")).unwrap();
    assert_fails(&vault.recover("alice", &other, "1234"), 1, "--force");
    assert_eq!(std::fs::read(other.join("backup.key")).unwrap(), bobs_key);
    let forced = vault.key(
        "recover",
        "alice",
        &[
            "--device",
            other.to_str().unwrap(),
            "--pin-stdin",
            "--force",
        ],
        "1234\n",
    );
    assert_success(&forced);
    assert_eq!(
        std::fs::read(other.join("backup.key")).unwrap(),
        std::fs::read(phone.join("backup.key")).unwrap()
    );
    // Recovering the same key again over itself is fine without --force.
    assert_success(&vault.recover("alice", &other, "1234"));
}

#[test]
fn pin_rules_are_usage_errors_that_spend_nothing() {
    let vault = Vault::start(&[]);
    vault.enroll("alice", &vault.device("phone"), "1234");
    let dev = vault.device("p");
    let dev = dev.to_str().unwrap();
    assert_fails(
        &vault.recover("alice", &vault.device("p"), "123"),
        2,
        "4 to 128",
    );
    assert_fails(
        &vault.recover("alice", &vault.device("p"), &"9".repeat(129)),
        2,
        "4 to 128",
    );
    // No PIN source, or both: clap refuses.
    assert_eq!(
        code(&vault.key("recover", "alice", &["--device", dev], "")),
        2
    );
    let pin_file = vault.device("pin.txt");
    std::fs::write(&pin_file, "1234\n").unwrap();
    let both = [
        "--device",
        dev,
        "--pin-stdin",
        "--pin-file",
        pin_file.to_str().unwrap(),
    ];
    assert_eq!(code(&vault.key("recover", "alice", &both, "1234\n")), 2);
    // A PIN file works.
    assert_success(&vault.key(
        "recover",
        "alice",
        &["--device", dev, "--pin-file", pin_file.to_str().unwrap()],
        "",
    ));
    assert_eq!(vault.status("alice")["attempts_left"], 10);
}

#[test]
fn recovery_code_round_trips_without_the_vault() {
    let vault = Vault::start(&[]);
    let phone = vault.device("phone");
    vault.enroll("alice", &phone, "1234");
    let out = run(
        &["key", "recovery-code", "--device", phone.to_str().unwrap()],
        "",
    );
    assert_success(&out);
    let code_text = String::from_utf8(out.stdout).unwrap();
    let digits: String = code_text.chars().filter(|c| !c.is_whitespace()).collect();
    assert_eq!(digits.len(), 64);
    let restored = vault.device("restored");
    let import = run(
        &[
            "key",
            "import",
            "--recovery-code",
            code_text.trim(),
            "--device",
            restored.to_str().unwrap(),
        ],
        "",
    );
    assert_success(&import);
    assert_eq!(
        std::fs::read(restored.join("backup.key")).unwrap(),
        std::fs::read(phone.join("backup.key")).unwrap()
    );
    let via_stdin = vault.device("restored2");
    assert_success(&run(
        &[
            "key",
            "import",
            "--recovery-code-stdin",
            "--device",
            via_stdin.to_str().unwrap(),
        ],
        &code_text,
    ));
    let bad = run(
        &[
            "key",
            "import",
            "--recovery-code",
            "1234",
            "--device",
            vault.device("bad").to_str().unwrap(),
        ],
        "",
    );
    assert_fails(&bad, 2, "64 hexadecimal digits");
    assert!(!vault.device("bad").join("backup.key").exists());
}

#[test]
fn unreachable_vault_is_exit_5() {
    let vault = Vault::start(&[]);
    let config = std::fs::read_to_string(vault.config()).unwrap();
    // A port nothing listens on: bind one, learn it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let moved = config.replace(&vault.url, &format!("http://127.0.0.1:{port}"));
    let path = vault.device("offline.toml");
    std::fs::write(&path, moved).unwrap();
    let out = key_with_pin(&path, "enroll", "alice", &vault.device("p"), "1234");
    assert_fails(&out, 5, "unavailable");
    assert!(!vault.device("p").join("backup.key").exists());
}

#[test]
fn vault_with_another_fleet_key_is_a_trust_failure_and_nothing_is_stored() {
    let vault = Vault::start(&[]);
    let config = std::fs::read_to_string(vault.config()).unwrap();
    let pinned = config
        .lines()
        .find_map(|l| l.strip_prefix("fleet_key = \""))
        .map(|l| l.trim_end_matches('"').to_string())
        .unwrap();
    let impostor = vault.device("impostor.toml");
    std::fs::write(&impostor, config.replace(&pinned, &"ab".repeat(32))).unwrap();
    let device = vault.device("phone");
    let enroll = key_with_pin(&impostor, "enroll", "alice", &device, "1234");
    assert_fails(&enroll, 6, "not the pinned fleet key");
    assert!(
        !device.join("backup.key").exists(),
        "no key stored on the device"
    );
    assert_eq!(
        vault.status("alice")["state"],
        "not-enrolled",
        "nothing stored in the vault"
    );

    vault.enroll("alice", &device, "1234");
    let recover = key_with_pin(&impostor, "recover", "alice", &vault.device("p2"), "1234");
    assert_fails(&recover, 6, "not the pinned fleet key");
    assert!(!vault.device("p2").join("backup.key").exists());
    let status = run(
        &[
            "key",
            "status",
            "--config",
            impostor.to_str().unwrap(),
            "--user",
            "alice",
        ],
        "",
    );
    assert_fails(&status, 6, "trust failure");
}

#[test]
fn up_writes_a_private_client_config_and_says_it_is_for_development() {
    let vault = Vault::start(&[]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(vault.config())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let banner = std::fs::read_to_string(&vault.stderr).unwrap();
    assert!(banner.contains("DEVELOPMENT VAULT"), "{banner}");
    assert!(banner.contains("for development only"), "{banner}");
    assert!(vault.url.starts_with("http://127.0.0.1:"));
}

#[test]
fn help_documents_the_exit_codes() {
    for args in [&["--help"][..], &["key", "--help"][..]] {
        let out = run(args, "");
        assert_success(&out);
        let text = String::from_utf8(out.stdout).unwrap();
        for line in [
            "3  wrong PIN",
            "4  no key to recover",
            "5  vault (or backup store) unreachable",
            "6  trust failure",
        ] {
            assert!(text.contains(line), "{args:?} help lacks {line:?}");
        }
    }
}
