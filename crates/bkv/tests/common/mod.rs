//! Test harness: starts the real `bkv up` binary and drives the real CLI.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Path of the `bkv` binary under test.
pub fn bkv_bin() -> &'static str {
    env!("CARGO_BIN_EXE_bkv")
}

/// A running dev vault in its own temporary directory.
pub struct Vault {
    child: Child,
    /// Processes the test started itself (restarted nodes, second fleets).
    pub extra: Vec<Child>,
    pub root: tempfile::TempDir,
    pub url: String,
    pub stderr: PathBuf,
}

impl Vault {
    /// Starts `bkv up` on a free loopback port and waits for its "ready" line.
    pub fn start(extra: &[&str]) -> Vault {
        let root = tempfile::tempdir().unwrap();
        let stderr_path = root.path().join("up.stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new(bkv_bin())
            .args(["up", "--dir"])
            .arg(root.path().join("vault-dev"))
            .args(["--listen", "127.0.0.1:0"])
            // Tests drive single accounts hard; the rate-limit test turns limits on.
            .args(if extra.contains(&"--rate-limit") {
                &[][..]
            } else {
                &["--rate-limit", "off"][..]
            })
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("bkv up starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("ready ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "bkv up did not print a ready line; stderr:\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
        };
        Vault {
            child,
            extra: Vec::new(),
            root,
            url,
            stderr: stderr_path,
        }
    }

    /// The client config `bkv up` wrote.
    pub fn config(&self) -> PathBuf {
        self.root.path().join("vault-dev").join("client.toml")
    }

    /// A device directory inside the vault's temporary root.
    pub fn device(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// `bkv key <verb> --config … --user <user> …` with `stdin` as input.
    pub fn key(&self, verb: &str, user: &str, args: &[&str], stdin: &str) -> Output {
        let config = self.config();
        let mut all = vec![
            "key",
            verb,
            "--config",
            config.to_str().unwrap(),
            "--user",
            user,
        ];
        all.extend_from_slice(args);
        run(&all, stdin)
    }

    /// Enrolls `user` on `device` with `pin`; asserts success.
    pub fn enroll(&self, user: &str, device: &Path, pin: &str) {
        assert_success(&key_with_pin(&self.config(), "enroll", user, device, pin));
    }

    /// Recovers `user` onto `device` with `pin`.
    pub fn recover(&self, user: &str, device: &Path, pin: &str) -> Output {
        key_with_pin(&self.config(), "recover", user, device, pin)
    }

    /// `bkv key status --json` for `user`, parsed.
    pub fn status(&self, user: &str) -> serde_json::Value {
        let out = self.key("status", user, &["--json"], "");
        assert_success(&out);
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    /// Whether the vault process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Vault {
    fn drop(&mut self) {
        for child in self
            .extra
            .iter_mut()
            .chain(std::iter::once(&mut self.child))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One node as `bkv up` lists it in nodes.json.
#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub dc: String,
    pub pid: u32,
    pub url: String,
    pub config: PathBuf,
}

impl Vault {
    /// The fleet directory.
    pub fn dir(&self) -> PathBuf {
        self.root.path().join("vault-dev")
    }

    /// The nodes `bkv up` started.
    pub fn nodes(&self) -> Vec<NodeEntry> {
        let text = std::fs::read_to_string(self.dir().join("nodes.json")).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|n| NodeEntry {
                dc: n["dc"].as_str().unwrap().to_string(),
                pid: n["pid"].as_u64().unwrap() as u32,
                url: n["url"].as_str().unwrap().to_string(),
                config: PathBuf::from(n["config"].as_str().unwrap()),
            })
            .collect()
    }

    /// `bkv fleet status --json`, parsed (whatever the exit code).
    pub fn fleet_status(&self) -> serde_json::Value {
        let config = self.config();
        let out = run(
            &[
                "fleet",
                "status",
                "--json",
                "--config",
                config.to_str().unwrap(),
            ],
            "",
        );
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// Waits until the fleet reports a leader, a majority and `voters` healthy voters.
    pub fn wait_for_fleet(&self, voters: usize) -> serde_json::Value {
        for _ in 0..300 {
            let status = self.fleet_status();
            let healthy_voters = status["members"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .filter(|m| m["voter"] == true && m["health"] == "healthy")
                        .count()
                })
                .unwrap_or(0);
            if status["majority"] == true
                && healthy_voters == voters
                && status["voters"] == voters as u64
            {
                return status;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "fleet did not reach {voters} healthy voters: {}",
            self.fleet_status()
        );
    }

    /// Datacenter of the current leader.
    pub fn leader_dc(&self) -> String {
        self.wait_for_fleet_leader()
    }

    fn wait_for_fleet_leader(&self) -> String {
        for _ in 0..100 {
            if let Some(dc) = self.fleet_status()["leader"].as_str() {
                return dc.to_string();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no leader");
    }

    /// Starts `bkv node` again for `dc` (a restart: a new member with a fresh identity).
    pub fn restart_node(&mut self, dc: &str) {
        let node = self.nodes().into_iter().find(|n| n.dc == dc).unwrap();
        let log =
            std::fs::File::create(self.dir().join("logs").join(format!("{dc}-restarted.log")))
                .unwrap();
        let child = Command::new(bkv_bin())
            .args(["node", "--config"])
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.extra.push(child);
    }
}

/// Sends `signal` (e.g. "KILL", "STOP", "CONT") to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// `bkv key <verb> --config <config> --user <user> --device <device> --pin-stdin` with `pin`.
pub fn key_with_pin(config: &Path, verb: &str, user: &str, device: &Path, pin: &str) -> Output {
    run(
        &[
            "key",
            verb,
            "--config",
            config.to_str().unwrap(),
            "--user",
            user,
            "--device",
            device.to_str().unwrap(),
            "--pin-stdin",
        ],
        &format!("{pin}\n"),
    )
}

/// Runs `bkv` with `args`, feeding `stdin`.
pub fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(bkv_bin())
        .args(args)
        .env_remove("BKV_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that refuses its arguments exits before reading stdin.
    if let Err(e) = child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    child.wait_with_output().unwrap()
}

/// Exit code of a finished command.
pub fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally")
}

/// Standard error as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts exit 0, showing stderr otherwise.
pub fn assert_success(out: &Output) {
    assert_eq!(code(out), 0, "stderr: {}", stderr(out));
}

/// Asserts the exit code and that stderr contains `needle`.
pub fn assert_fails(out: &Output, expected: i32, needle: &str) {
    let err = stderr(out);
    assert_eq!(code(out), expected, "stderr: {err}");
    assert!(err.contains(needle), "stderr {err:?} lacks {needle:?}");
}
