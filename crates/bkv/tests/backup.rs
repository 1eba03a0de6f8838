//! Backups as a user makes them: `bkv backup`, `bkv restore`, the standard `age` tool,
//! an S3-compatible server, hostile archives, and a 1 GiB backup in bounded memory.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Everything `diff -r` and a careful user compare: kind, contents, mode, mtime, link target.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let mtime = filetime::FileTime::from_last_modification_time(&meta).unix_seconds();
            let desc = if meta.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                walk(root, &path, out);
                format!("dir {:o} {mtime}", meta.permissions().mode() & 0o7777)
            } else {
                let data = std::fs::read(&path).unwrap();
                format!(
                    "file {:o} {mtime} {}",
                    meta.permissions().mode() & 0o7777,
                    hex::encode(&data)
                )
            };
            out.insert(rel, desc);
        }
    }
    walk(root, root, &mut out);
    out
}

fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("2026/11")).unwrap();
    std::fs::write(root.join("2026/11/chat.txt"), b"hello from november").unwrap();
    std::fs::write(root.join("notes.md"), b"# notes\n").unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::set_permissions(
        root.join("notes.md"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    symlink("2026/11/chat.txt", root.join("latest")).unwrap();
    filetime::set_file_mtime(
        root.join("notes.md"),
        filetime::FileTime::from_unix_time(1_650_000_000, 0),
    )
    .unwrap();
    filetime::set_file_mtime(
        root.join("2026"),
        filetime::FileTime::from_unix_time(1_640_000_000, 0),
    )
    .unwrap();
}

/// `bkv <verb>` for alice on `device` against `store`, with `tail` and `extra` arguments
/// and, when given, the PIN on stdin.
fn for_alice(
    vault: &Vault,
    verb: &str,
    device: &Path,
    store: &str,
    tail: &[&str],
    extra: &[&str],
    pin: Option<&str>,
) -> std::process::Output {
    let config = vault.config();
    let mut args = vec![
        verb,
        "--config",
        config.to_str().unwrap(),
        "--user",
        "alice",
        "--device",
        device.to_str().unwrap(),
        "--store",
        store,
    ];
    args.extend_from_slice(tail);
    args.extend_from_slice(extra);
    if pin.is_some() {
        args.push("--pin-stdin");
    }
    run(&args, &pin.map(|p| format!("{p}\n")).unwrap_or_default())
}

fn backup(
    vault: &Vault,
    src: &Path,
    device: &Path,
    store: &str,
    extra: &[&str],
    pin: Option<&str>,
) -> std::process::Output {
    for_alice(
        vault,
        "backup",
        device,
        store,
        &[src.to_str().unwrap()],
        extra,
        pin,
    )
}

fn restore(
    vault: &Vault,
    device: &Path,
    store: &str,
    out: &Path,
    extra: &[&str],
    pin: Option<&str>,
) -> std::process::Output {
    for_alice(
        vault,
        "restore",
        device,
        store,
        &["--out", out.to_str().unwrap()],
        extra,
        pin,
    )
}

fn archives(store: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "age") {
                found.push(path);
            }
        }
    }
    walk(store, &mut found);
    found.sort();
    found
}

fn no_partial_output(parent: &Path) {
    for entry in std::fs::read_dir(parent).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains("bkv-partial"), "leftover {name}");
    }
}

#[test]
fn backup_then_restore_on_a_new_device_and_with_the_recovery_code() {
    let vault = Vault::start(&["--datacenters", "1"]);
    let src = vault.device("chat-history");
    make_tree(&src);
    let store = vault.device("cloud");
    let store_s = store.to_str().unwrap();
    // First use: makes and escrows the key (asks for the PIN).
    assert_success(&backup(
        &vault,
        &src,
        &vault.device("phone1"),
        store_s,
        &[],
        Some("1234"),
    ));
    assert_eq!(vault.status("alice")["enrolled"], true);
    // Afterwards the device key is reused: no PIN needed.
    assert_success(&backup(
        &vault,
        &src,
        &vault.device("phone1"),
        store_s,
        &["--quiet"],
        None,
    ));
    assert_eq!(archives(&store).len(), 2);

    let restored = vault.device("restored");
    assert_success(&restore(
        &vault,
        &vault.device("phone2"),
        store_s,
        &restored,
        &[],
        Some("1234"),
    ));
    assert_eq!(snapshot(&restored), snapshot(&src));
    assert_eq!(
        std::fs::read(vault.device("phone2").join("backup.key")).unwrap(),
        std::fs::read(vault.device("phone1").join("backup.key")).unwrap()
    );

    // No vault, no PIN: the recovery code alone.
    let code = run(
        &[
            "key",
            "recovery-code",
            "--device",
            vault.device("phone1").to_str().unwrap(),
        ],
        "",
    );
    let code = String::from_utf8(code.stdout).unwrap();
    let restored2 = vault.device("restored2");
    let out = run(
        &[
            "restore",
            "--recovery-code",
            code.trim(),
            "--store",
            store_s,
            "--out",
            restored2.to_str().unwrap(),
        ],
        "",
    );
    assert_success(&out);
    assert_eq!(snapshot(&restored2), snapshot(&src));

    let list = run(
        &[
            "backup", "list", "--store", store_s, "--user", "alice", "--json",
        ],
        "",
    );
    assert_success(&list);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list["backups"].as_array().unwrap().len(), 2);
}

#[test]
fn wrong_pin_restores_nothing_and_a_non_empty_output_is_refused() {
    let vault = Vault::start(&["--datacenters", "1"]);
    let src = vault.device("src");
    make_tree(&src);
    let store = vault.device("cloud");
    assert_success(&backup(
        &vault,
        &src,
        &vault.device("phone1"),
        store.to_str().unwrap(),
        &[],
        Some("1234"),
    ));
    let out = vault.device("out");
    assert_fails(
        &restore(
            &vault,
            &vault.device("phone2"),
            store.to_str().unwrap(),
            &out,
            &[],
            Some("9999"),
        ),
        3,
        "wrong PIN: 9 attempts left",
    );
    assert!(!out.exists());
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep-me"), b"x").unwrap();
    assert_fails(
        &restore(
            &vault,
            &vault.device("phone1"),
            store.to_str().unwrap(),
            &out,
            &[],
            None,
        ),
        2,
        "not empty",
    );
    assert_eq!(std::fs::read(out.join("keep-me")).unwrap(), b"x");
}

#[test]
fn retention_keeps_the_newest_and_restore_can_pick_an_older_backup() {
    let vault = Vault::start(&["--datacenters", "1"]);
    let src = vault.device("src");
    make_tree(&src);
    let store = vault.device("cloud");
    let store_s = store.to_str().unwrap();
    let device = vault.device("phone");
    assert_success(&backup(
        &vault,
        &src,
        &device,
        store_s,
        &["--keep", "2"],
        Some("1234"),
    ));
    let first = snapshot(&src);
    for round in 0..3 {
        std::fs::write(src.join("notes.md"), format!("round {round}")).unwrap();
        assert_success(&backup(
            &vault,
            &src,
            &device,
            store_s,
            &["--keep", "2"],
            None,
        ));
    }
    let list = run(
        &[
            "backup", "list", "--store", store_s, "--user", "alice", "--json",
        ],
        "",
    );
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let ids: Vec<String> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2, "only the newest two are kept");
    let newest = vault.device("newest");
    assert_success(&restore(&vault, &device, store_s, &newest, &[], None));
    assert_eq!(std::fs::read(newest.join("notes.md")).unwrap(), b"round 2");
    let older = vault.device("older");
    assert_success(&restore(
        &vault,
        &device,
        store_s,
        &older,
        &["--backup", &ids[0]],
        None,
    ));
    assert_eq!(std::fs::read(older.join("notes.md")).unwrap(), b"round 1");
    assert_ne!(snapshot(&older), first);
    let missing = vault.device("missing");
    assert_fails(
        &restore(
            &vault,
            &device,
            store_s,
            &missing,
            &["--backup", "nope"],
            None,
        ),
        4,
        "no backup",
    );
}

#[test]
fn corrupted_truncated_and_foreign_archives_fail_and_leave_nothing_behind() {
    let vault = Vault::start(&["--datacenters", "1"]);
    let src = vault.device("src");
    make_tree(&src);
    std::fs::write(src.join("big.bin"), vec![5u8; 400_000]).unwrap();
    let store = vault.device("cloud");
    let store_s = store.to_str().unwrap();
    let device = vault.device("phone");
    assert_success(&backup(&vault, &src, &device, store_s, &[], Some("1234")));
    let archive = archives(&store).pop().unwrap();
    let good = std::fs::read(&archive).unwrap();

    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    std::fs::write(&archive, &flipped).unwrap();
    let out = vault.device("out1");
    assert_fails(
        &restore(&vault, &device, store_s, &out, &[], None),
        1,
        "corrupted",
    );
    assert!(!out.exists(), "no partial output");

    std::fs::write(&archive, &good[..good.len() - 1000]).unwrap();
    assert_fails(
        &restore(&vault, &device, store_s, &out, &[], None),
        1,
        "corrupted",
    );
    assert!(!out.exists());

    // An archive made with another key, placed where this key's archives live.
    let other = vault.device("other-src");
    std::fs::create_dir(&other).unwrap();
    let other_store = vault.device("other-cloud");
    let other_device = vault.device("other-phone");
    run(
        &[
            "key",
            "import",
            "--recovery-code",
            &"ab".repeat(32),
            "--device",
            other_device.to_str().unwrap(),
        ],
        "",
    );
    assert_success(&backup(
        &vault,
        &other,
        &other_device,
        other_store.to_str().unwrap(),
        &[],
        None,
    ));
    std::fs::copy(archives(&other_store).pop().unwrap(), &archive).unwrap();
    assert_fails(
        &restore(&vault, &device, store_s, &out, &[], None),
        1,
        "cannot decrypt",
    );
    assert!(!out.exists());
    no_partial_output(vault.root.path());
}

#[test]
fn the_standard_age_tool_decrypts_a_backup() {
    let age = Command::new("age").arg("--version").output();
    assert!(
        age.is_ok_and(|o| o.status.success()),
        "the age command is missing: scripts/install-test-deps installs it"
    );
    let vault = Vault::start(&["--datacenters", "1"]);
    let src = vault.device("src");
    make_tree(&src);
    let store = vault.device("cloud");
    let device = vault.device("phone");
    assert_success(&backup(
        &vault,
        &src,
        &device,
        store.to_str().unwrap(),
        &[],
        Some("1234"),
    ));
    let identity = run(
        &["key", "age-identity", "--device", device.to_str().unwrap()],
        "",
    );
    assert_success(&identity);
    let identity_file = vault.device("identity.txt");
    std::fs::write(&identity_file, &identity.stdout).unwrap();
    let tar_file = vault.device("backup.tar");
    let status = Command::new("age")
        .args(["-d", "-i"])
        .arg(&identity_file)
        .arg("-o")
        .arg(&tar_file)
        .arg(archives(&store).pop().unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let unpacked = vault.device("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    let status = Command::new("tar")
        .arg("-xpf")
        .arg(&tar_file)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(snapshot(&unpacked), snapshot(&src));
}

/// A local S3-compatible server, stopped when dropped.
struct Moto(std::process::Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto_port() -> (Moto, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("moto_server is missing: scripts/install-test-deps installs it (pip moto[server])");
    let moto = Moto(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (moto, port);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("moto_server did not start");
}

fn create_bucket(port: u16, bucket: &str) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn backups_round_trip_through_an_s3_compatible_server() {
    let (_moto, port) = moto_port();
    create_bucket(port, "bkv-test");
    let vault = Vault::start(&["--datacenters", "1"]);
    let src = vault.device("src");
    make_tree(&src);
    let device = vault.device("phone");
    let config = vault.config();
    let s3 = |args: &[&str], stdin: &str| {
        let mut child = Command::new(bkv_bin())
            .args(args)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"))
            .env("AWS_ALLOW_HTTP", "true")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let store = "s3://bkv-test/phones";
    let out = s3(
        &[
            "backup",
            "--config",
            config.to_str().unwrap(),
            "--user",
            "alice",
            "--device",
            device.to_str().unwrap(),
            "--store",
            store,
            src.to_str().unwrap(),
            "--pin-stdin",
        ],
        "1234\n",
    );
    assert_success(&out);
    let list = s3(
        &[
            "backup", "list", "--store", store, "--user", "alice", "--json",
        ],
        "",
    );
    assert_success(&list);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list["backups"].as_array().unwrap().len(), 1);
    let restored = vault.device("restored");
    let out = s3(
        &[
            "restore",
            "--config",
            config.to_str().unwrap(),
            "--user",
            "alice",
            "--device",
            vault.device("phone2").to_str().unwrap(),
            "--store",
            store,
            "--out",
            restored.to_str().unwrap(),
            "--pin-stdin",
        ],
        "1234\n",
    );
    assert_success(&out);
    assert_eq!(snapshot(&restored), snapshot(&src));
}

fn peak_rss_kib(out: &std::process::Output) -> u64 {
    stderr(out)
        .lines()
        .find_map(|l| l.strip_prefix("peak_rss_kib "))
        .and_then(|n| n.trim().parse().ok())
        .expect("bkv reports its peak RSS")
}

#[test]
fn a_1_gib_backup_streams_in_bounded_memory() {
    let vault = Vault::start(&["--datacenters", "1"]);
    let src = vault.device("big");
    std::fs::create_dir(&src).unwrap();
    // 1 GiB written for real (a sparse file would be archived as a few holes).
    {
        use std::io::Write;
        let mut file =
            std::io::BufWriter::new(std::fs::File::create(src.join("one-gib.bin")).unwrap());
        let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..1024 {
            file.write_all(&block).unwrap();
        }
        file.flush().unwrap();
    }
    // And a sparse file, which tar stores as holes: it must restore too.
    let sparse = std::fs::File::create(src.join("sparse.bin")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    drop(sparse);
    let store = vault.device("cloud");
    let device = vault.device("phone");
    run(
        &[
            "key",
            "import",
            "--recovery-code",
            &"cd".repeat(32),
            "--device",
            device.to_str().unwrap(),
        ],
        "",
    );
    let config = vault.config();
    let rss_run = |args: &[&str]| {
        Command::new(bkv_bin())
            .args(args)
            .env("BKV_REPORT_PEAK_RSS", "1")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let out = rss_run(&[
        "backup",
        "--config",
        config.to_str().unwrap(),
        "--user",
        "alice",
        "--device",
        device.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        src.to_str().unwrap(),
        "--quiet",
    ]);
    assert_success(&out);
    let backup_rss = peak_rss_kib(&out);
    let restored = vault.device("restored");
    let out = rss_run(&[
        "restore",
        "--recovery-code",
        &"cd".repeat(32),
        "--store",
        store.to_str().unwrap(),
        "--out",
        restored.to_str().unwrap(),
        "--quiet",
    ]);
    assert_success(&out);
    let restore_rss = peak_rss_kib(&out);
    assert_eq!(
        std::fs::metadata(restored.join("one-gib.bin"))
            .unwrap()
            .len(),
        1 << 30
    );
    assert_eq!(
        std::fs::metadata(restored.join("sparse.bin"))
            .unwrap()
            .len(),
        64 << 20
    );
    eprintln!("peak RSS: backup {backup_rss} KiB, restore {restore_rss} KiB");
    // 1 GiB passed through each; memory stayed a small constant.
    assert!(backup_rss < 128 * 1024, "backup peak RSS {backup_rss} KiB");
    assert!(
        restore_rss < 128 * 1024,
        "restore peak RSS {restore_rss} KiB"
    );
    std::fs::remove_dir_all(&restored).unwrap();
    std::fs::remove_dir_all(&store).unwrap();
}
