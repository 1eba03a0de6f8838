//! `bkv bench` (no subcommand): a closed-loop load generator with real clients against a
//! fleet, and the server-side crypto floor measured on this machine.

use crate::Failure;
use anyhow::Context;
use bkv_client::{BackupKey, ClientConfig, ClientError, Pin, TokenSource, VaultClient};
use bkv_core::wan::{WanProfile, FRONTEND_DC};
use bkv_core::{AccountId, KsfParams, Suite};
use clap::{Args, ValueEnum};
use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialFinalization, CredentialRequest,
    CredentialResponse, Identifiers, RegistrationResponse, RegistrationUpload, ServerLogin,
    ServerLoginParameters, ServerRegistration, ServerSetup,
};
use rand::rngs::OsRng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What each request of the load does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Op {
    /// Re-enroll users (OPAQUE registration, one commit).
    Enroll,
    /// Recover users' keys with the right PIN (two round trips, two commits).
    Recover,
    /// 20% enroll, 80% recover.
    Mixed,
}

/// Arguments of the load generator.
#[derive(Args)]
pub struct LoadArgs {
    /// The client config of the fleet to load (its directory's nodes.json and frontend.pid
    /// give the processes whose CPU time is reported).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Operation.
    #[arg(long, value_enum, default_value_t = Op::Recover)]
    op: Op,
    /// Distinct users (enrolled before the timed run).
    #[arg(long, default_value_t = 100)]
    users: u32,
    /// Requests in flight (closed loop: each worker waits for its answer).
    #[arg(long, default_value_t = 8)]
    concurrency: u32,
    /// How long to run, e.g. 10s, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Client Argon2id memory (KiB) for the load test; lower than the default on purpose,
    /// so that the load generator does not starve the fleet of CPU on one machine.
    #[arg(long, default_value_t = 256)]
    argon2_memory_kib: u32,
    /// Client Argon2id passes for the load test.
    #[arg(long, default_value_t = 1)]
    argon2_iterations: u32,
    /// Use the config's Argon2id cost instead of the lowered one.
    #[arg(long)]
    config_argon2: bool,
    /// Also measure the server-side cryptography alone on this machine (the crypto floor).
    #[arg(long)]
    floor: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (n, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = n.parse().map_err(|_| format!("not a duration: {text}"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("unknown unit in {text} (use ms, s or m)")),
    }
}

/// Server-side cost of the cryptography of one enrollment and one recovery.
#[derive(Debug, Clone, Copy)]
pub struct CryptoFloor {
    /// Microseconds of server work per recovery (login start + finish).
    pub recover_us: f64,
    /// Microseconds of server work per enrollment (registration start + finish).
    pub enroll_us: f64,
    /// Cores on this machine.
    pub cores: usize,
}

impl CryptoFloor {
    /// Recoveries per second if every core did nothing but the server's cryptography.
    pub fn recover_limit(&self) -> f64 {
        self.cores as f64 * 1e6 / self.recover_us
    }
    /// Enrollments per second likewise.
    pub fn enroll_limit(&self) -> f64 {
        self.cores as f64 * 1e6 / self.enroll_us
    }
    /// Microseconds of server work per operation of `op` (mixed is judged as recovery).
    pub fn op_us(&self, op: Op) -> f64 {
        match op {
            Op::Enroll => self.enroll_us,
            Op::Recover | Op::Mixed => self.recover_us,
        }
    }
    /// Operations of `op` per second if every core did nothing but their cryptography.
    pub fn op_limit(&self, op: Op) -> f64 {
        self.cores as f64 * 1e6 / self.op_us(op)
    }
}

/// Times the server's OPAQUE work in process (the client's work is done but not timed).
pub fn measure_crypto_floor() -> CryptoFloor {
    let setup = ServerSetup::<Suite>::new(&mut OsRng);
    let ksf = KsfParams {
        memory_kib: 8,
        iterations: 1,
        parallelism: 1,
    }
    .argon2()
    .expect("valid parameters");
    let id = b"bench-credential";
    let pin = b"1234";
    let mut enroll = Duration::ZERO;
    let mut recover = Duration::ZERO;
    let rounds = 400u32;
    let mut file = None;
    for _ in 0..rounds {
        let start = ClientRegistration::<Suite>::start(&mut OsRng, pin).expect("blind");
        let request = start.message.serialize();
        let t = Instant::now();
        let request =
            opaque_ke::RegistrationRequest::<Suite>::deserialize(&request).expect("request");
        let response = ServerRegistration::<Suite>::start(&setup, request, id).expect("evaluate");
        let response_bytes = response.message.serialize();
        enroll += t.elapsed();
        let finish = start
            .state
            .finish(
                &mut OsRng,
                pin,
                RegistrationResponse::deserialize(&response_bytes).expect("response"),
                ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&ksf)),
            )
            .expect("finish");
        let upload = finish.message.serialize();
        let t = Instant::now();
        let record = ServerRegistration::<Suite>::finish(
            RegistrationUpload::deserialize(&upload).expect("upload"),
        );
        let stored = record.serialize();
        enroll += t.elapsed();
        file = Some(stored);
    }
    let stored = file.expect("one enrollment");
    for _ in 0..rounds {
        let login = ClientLogin::<Suite>::start(&mut OsRng, pin).expect("blind");
        let ke1 = login.message.serialize();
        let t = Instant::now();
        let password_file = ServerRegistration::<Suite>::deserialize(&stored).expect("record");
        let started = ServerLogin::start(
            &mut OsRng,
            &setup,
            Some(password_file),
            CredentialRequest::deserialize(&ke1).expect("ke1"),
            id,
            ServerLoginParameters::default(),
        )
        .expect("ke2");
        let ke2 = started.message.serialize();
        recover += t.elapsed();
        let finished = login
            .state
            .finish(
                &mut OsRng,
                pin,
                CredentialResponse::deserialize(&ke2).expect("ke2"),
                ClientLoginFinishParameters::new(None, Identifiers::default(), Some(&ksf)),
            )
            .expect("right PIN");
        let ke3 = finished.message.serialize();
        let t = Instant::now();
        started
            .state
            .finish(
                CredentialFinalization::deserialize(&ke3).expect("ke3"),
                ServerLoginParameters::default(),
            )
            .expect("ke3 verifies");
        recover += t.elapsed();
    }
    CryptoFloor {
        recover_us: recover.as_secs_f64() * 1e6 / rounds as f64,
        enroll_us: enroll.as_secs_f64() * 1e6 / rounds as f64,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some((utime + stime) / 100.0)
}

/// The fleet's processes, named, from the files `bkv up` writes beside client.toml.
fn fleet_processes(dir: &Path) -> Vec<(String, u32)> {
    let mut found = Vec::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("nodes.json")) {
        if let Ok(serde_json::Value::Array(nodes)) =
            serde_json::from_str::<serde_json::Value>(&text)
        {
            for n in nodes {
                if let (Some(dc), Some(pid)) = (n["dc"].as_str(), n["pid"].as_u64()) {
                    found.push((dc.to_string(), pid as u32));
                }
            }
        }
    }
    if let Some(pid) = std::fs::read_to_string(dir.join("frontend.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
    {
        found.push(("frontend".into(), pid));
    }
    found
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    errors: BTreeMap<String, u64>,
}

fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::WrongPin { .. } => "wrong-pin",
        ClientError::NotEnrolled => "not-enrolled",
        ClientError::Destroyed => "destroyed",
        ClientError::Unavailable(_) => "unavailable",
        ClientError::Interrupted(_) => "interrupted",
        ClientError::RateLimited(_) => "rate-limited",
        ClientError::Trust(_) => "trust",
        ClientError::Unauthenticated(_) => "unauthenticated",
        ClientError::Config { .. } => "config",
        ClientError::Protocol(_) => "protocol",
    }
    .to_string()
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64 / 1000.0
}

fn pin() -> Pin {
    Pin::new("1234".into()).expect("valid bench PIN")
}

/// Runs the load generator (and the floor when asked).
pub async fn run(args: LoadArgs) -> Result<(), Failure> {
    let floor = if args.floor || args.config.is_none() {
        eprintln!("measuring the server-side crypto floor ...");
        Some(
            tokio::task::spawn_blocking(measure_crypto_floor)
                .await
                .context("floor")?,
        )
    } else {
        None
    };
    let Some(config_path) = args.config.clone() else {
        let floor = floor.expect("measured");
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "floor": {
                    "server_recover_us": floor.recover_us, "server_enroll_us": floor.enroll_us,
                    "cores": floor.cores, "recoveries_per_s": floor.recover_limit(), "enrollments_per_s": floor.enroll_limit(),
                }})
            );
        } else {
            print_floor(&floor);
        }
        return Ok(());
    };
    let mut config = ClientConfig::load(&config_path)?;
    if !args.config_argon2 {
        config.ksf = KsfParams {
            memory_kib: args.argon2_memory_kib,
            iterations: args.argon2_iterations,
            parallelism: 1,
        };
    }
    config
        .ksf
        .check()
        .map_err(|e| Failure::new(bkv_client::exit::USAGE, e))?;
    let tokens = TokenSource::from_config(&config)?
        .ok_or_else(|| anyhow::anyhow!("the load generator needs a dev config with a token key"))?;
    let client = VaultClient::new(&config, tokens)?;
    let dir = config_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let users = args.users.max(1) as usize;
    let concurrency = args.concurrency.max(1) as usize;
    let mut tag = [0u8; 4];
    rand::RngCore::fill_bytes(&mut OsRng, &mut tag);
    let names: Arc<Vec<String>> = Arc::new(
        (0..users)
            .map(|i| format!("bench-{}-{i}", hex::encode(tag)))
            .collect(),
    );
    let keys: Arc<Vec<BackupKey>> = Arc::new(
        (0..users)
            .map(|_| BackupKey::generate(&mut OsRng))
            .collect(),
    );
    AccountId::new(config.tenant.clone(), names[0].clone()).map_err(anyhow::Error::new)?;

    eprintln!(
        "argon2id m={} KiB t={} p={} ({}); enrolling {users} users ...",
        config.ksf.memory_kib,
        config.ksf.iterations,
        config.ksf.parallelism,
        if args.config_argon2 {
            "from the config"
        } else {
            "lowered for the load test"
        }
    );
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut setup = Vec::new();
    for _ in 0..concurrency {
        let (mut client, names, keys, next) =
            (client.clone(), names.clone(), keys.clone(), next.clone());
        setup.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= names.len() {
                    return Ok::<(), ClientError>(());
                }
                // Setup rides out a leader change: retry while the fleet says "unavailable".
                let mut tries = 0;
                loop {
                    match client.enroll(&names[i], pin(), &keys[i]).await {
                        Ok(_) => break,
                        Err(ClientError::Unavailable(_) | ClientError::Interrupted(_))
                            if tries < 10 =>
                        {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }));
    }
    for task in setup {
        task.await.context("enrollment task")??;
    }

    let processes = fleet_processes(&dir);
    let cpu_before: Vec<Option<f64>> = processes.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
    // The load generator's own CPU: the client side of every operation (OPAQUE, Argon2id).
    let client_cpu_before = cpu_seconds(std::process::id());
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (mut client, names, keys, tally, stop) = (
            client.clone(),
            names.clone(),
            keys.clone(),
            tally.clone(),
            stop.clone(),
        );
        let op = args.op;
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let user = i % names.len();
                let enroll = match op {
                    Op::Enroll => true,
                    Op::Recover => false,
                    Op::Mixed => i % 5 == 0,
                };
                let t = Instant::now();
                let result = if enroll {
                    client
                        .enroll(&names[user], pin(), &keys[user])
                        .await
                        .map(|_| ())
                } else {
                    client.recover(&names[user], pin()).await.and_then(|r| {
                        if r.key == keys[user] {
                            Ok(())
                        } else {
                            Err(ClientError::Protocol("recovered a different key".into()))
                        }
                    })
                };
                let elapsed = t.elapsed().as_micros() as u64;
                let mut tally = tally.lock().expect("tally");
                match result {
                    Ok(()) => tally.latencies_us.push(elapsed),
                    Err(e) => *tally.errors.entry(error_kind(&e)).or_default() += 1,
                }
                i += concurrency;
            }
        }));
    }
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu: Vec<(String, f64)> = processes
        .iter()
        .zip(cpu_before)
        .filter_map(|((name, pid), before)| Some((name.clone(), cpu_seconds(*pid)? - before?)))
        .collect();
    let fleet_cpu: f64 = cpu.iter().map(|(_, s)| s).sum();
    let client_cpu = cpu_seconds(std::process::id())
        .zip(client_cpu_before)
        .map(|(after, before)| after - before)
        .unwrap_or(0.0);

    let mut tally = Arc::try_unwrap(tally)
        .map_err(|_| anyhow::anyhow!("workers still running"))?
        .into_inner()
        .expect("tally");
    tally.latencies_us.sort_unstable();
    let ok = tally.latencies_us.len() as u64;
    let throughput = ok as f64 / wall;
    let (p50, p90, p99) = (
        percentile(&tally.latencies_us, 50.0),
        percentile(&tally.latencies_us, 90.0),
        percentile(&tally.latencies_us, 99.0),
    );
    let max = tally.latencies_us.last().copied().unwrap_or(0) as f64 / 1000.0;
    let ms_per_op = |cpu_s: f64| {
        if ok > 0 {
            cpu_s * 1000.0 / ok as f64
        } else {
            0.0
        }
    };

    // The leader does every operation's OPAQUE work and drives replication: it is the
    // busiest node, and the one whose cores bound a fleet whose nodes have machines of
    // their own (the load generator elsewhere).
    let busiest = cpu
        .iter()
        .filter(|(name, _)| name.starts_with("dc"))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .filter(|_| ok > 0)
        .map(|(name, s)| (name.clone(), ms_per_op(*s)));
    let floor_fraction = floor.map(|f| throughput / f.op_limit(args.op));
    let leader_bound = match (floor, busiest.as_ref()) {
        (Some(f), Some((_, ms))) if *ms > 0.0 => Some(f.op_us(args.op) / (ms * 1000.0)),
        _ => None,
    };

    let wan = config.wan.as_deref().and_then(WanProfile::named);
    let latency_floor_ms = match (wan, args.op) {
        (Some(w), Op::Recover) => {
            let status = bkv_client::fleet_status(&config).await.ok();
            let leader = status
                .as_ref()
                .map(|s| s.leader_dc.clone())
                .filter(|l| !l.is_empty())
                .unwrap_or_else(|| FRONTEND_DC.into());
            let dcs: Vec<String> = status
                .map(|s| s.nodes.iter().map(|n| n.dc.clone()).collect())
                .unwrap_or_default();
            let dcs: Vec<&str> = dcs.iter().map(String::as_str).collect();
            Some(
                w.recovery_floor_ms(&leader, &dcs) as f64
                    + floor.map(|f| f.recover_us / 1000.0).unwrap_or(0.0),
            )
        }
        _ => None,
    };

    let report = serde_json::json!({
        "op": format!("{:?}", args.op).to_lowercase(),
        "users": users,
        "concurrency": concurrency,
        "duration_s": wall,
        "argon2": { "memory_kib": config.ksf.memory_kib, "iterations": config.ksf.iterations, "parallelism": config.ksf.parallelism },
        "wan": config.wan,
        "ok": ok,
        "throughput_per_s": throughput,
        "latency_ms": { "p50": p50, "p90": p90, "p99": p99, "max": max },
        "errors": tally.errors,
        "fleet_cpu_s": fleet_cpu,
        "fleet_cpu_ms_per_op": ms_per_op(fleet_cpu),
        "cpu_by_process_s": cpu.iter().map(|(n, s)| (n.clone(), *s)).collect::<BTreeMap<_, _>>(),
        "client_cpu_s": client_cpu,
        "client_cpu_ms_per_op": ms_per_op(client_cpu),
        "floor": floor.map(|f| serde_json::json!({
            "server_recover_us": f.recover_us, "server_enroll_us": f.enroll_us, "cores": f.cores,
            "recoveries_per_s": f.recover_limit(), "enrollments_per_s": f.enroll_limit(),
            "fraction_of_floor": floor_fraction,
            "leader_bound_fraction": leader_bound,
        })),
        "busiest_node": busiest.as_ref().map(|(name, ms)| serde_json::json!({ "name": name, "cpu_ms_per_op": ms })),
        "latency_floor_ms": latency_floor_ms,
        "p50_over_floor": latency_floor_ms.map(|f| p50 / f),
        "p99_over_floor": latency_floor_ms.map(|f| p99 / f),
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "{:?}: {ok} ok in {wall:.1} s = {throughput:.1}/s with {concurrency} in flight, {users} users",
        args.op
    );
    println!(
        "argon2id (client): m={} KiB t={} p={}",
        config.ksf.memory_kib, config.ksf.iterations, config.ksf.parallelism
    );
    println!("latency ms: p50 {p50:.2}  p90 {p90:.2}  p99 {p99:.2}  max {max:.2}");
    if tally.errors.is_empty() {
        println!("errors: none");
    } else {
        println!("errors: {:?}", tally.errors);
    }
    println!(
        "fleet CPU: {fleet_cpu:.2} s ({:.3} ms per op) {:?}",
        ms_per_op(fleet_cpu),
        cpu.iter()
            .map(|(n, s)| format!("{n}={s:.2}"))
            .collect::<Vec<_>>()
    );
    println!(
        "client CPU (this load generator): {client_cpu:.2} s ({:.3} ms per op)",
        ms_per_op(client_cpu)
    );
    if let (Some(f), Some(fraction)) = (floor, floor_fraction) {
        print_floor(&f);
        println!("throughput = {fraction:.3} of the crypto floor");
        if let (Some((name, ms)), Some(fraction)) = (&busiest, leader_bound) {
            println!(
                "busiest node {name}: {ms:.3} ms CPU per op; on cores of its own it would reach {fraction:.3} of the crypto floor"
            );
        }
    }
    if let Some(floor_ms) = latency_floor_ms {
        println!(
            "latency floor for {} (2 client round trips + 2 majority commits + server crypto): {floor_ms:.1} ms; p50 = {:.2}x, p99 = {:.2}x",
            config.wan.as_deref().unwrap_or(""),
            p50 / floor_ms,
            p99 / floor_ms
        );
    }
    Ok(())
}

fn print_floor(f: &CryptoFloor) {
    println!(
        "crypto floor: server work {:.1} us per recovery, {:.1} us per enrollment; {} cores => {:.0} recoveries/s, {:.0} enrollments/s",
        f.recover_us,
        f.enroll_us,
        f.cores,
        f.recover_limit(),
        f.enroll_limit()
    );
}
