//! `bkv up`: a whole development fleet on one machine, on embedded defaults: one node
//! process per datacenter, the frontend in this process.

use crate::fleet::{free_ports, write_client_config, write_fleet};
use crate::serve::{serve_router, shutdown_signal};
use crate::Failure;
use anyhow::Context;
use bkv_client::ClientConfig;
use bkv_core::auth::AuthConfig;
use clap::Args;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// On or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Toggle {
    /// On.
    On,
    /// Off.
    Off,
}

/// Loopback address `bkv up` listens on unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7450";

/// Arguments of `bkv up`.
#[derive(Args)]
pub struct UpArgs {
    /// Directory for the fleet's files (configs, nodes.json, logs). Created if missing.
    #[arg(long, value_name = "DIR", default_value = "./vault-dev")]
    dir: PathBuf,
    /// Frontend address; port 0 picks free ports for the frontend and every node
    /// (the "ready" line says which). Otherwise node N listens on port + N.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Number of datacenters, one node process each.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=15))]
    datacenters: u16,
    /// Wrong PINs a record survives before it is destroyed.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_attempts: u32,
    /// Seconds a client has between KE2 and KE3.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    login_deadline: u64,
    /// Account-token verification keys (TOML: audience, [[keys]]) instead of a fresh dev key.
    /// With it, client.toml carries no token key and clients need real tokens.
    #[arg(long, value_name = "FILE")]
    auth: Option<PathBuf>,
    /// Per-account rate limits at the frontend (10 calls/s, 6 guesses/min, with bursts).
    /// Benchmarks that drive few accounts hard turn them off.
    #[arg(long, value_enum, default_value_t = Toggle::On)]
    rate_limit: Toggle,
    /// Simulate wide-area latency between datacenters and to the client with this
    /// profile (three-continents: see docs/performance.md). Off by default.
    #[arg(long, value_name = "PROFILE")]
    wan: Option<String>,
}

const BANNER: &str = "\
================================================================
 bkv DEVELOPMENT VAULT
 software HSM: for development only. It is not tamper resistant,
 holds its secrets in ordinary memory, and forgets every
 enrollment when the fleet stops. Never escrow a real key here.
================================================================";

/// The node processes; killed when `bkv up` ends (they also exit when its pipe closes).
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Each node's share of the machine's cores, at least one: every node of `bkv up` runs
/// here, and more threads than cores only add cross-thread wake-ups.
fn node_threads(cores: usize, datacenters: usize) -> usize {
    (cores / datacenters.max(1)).max(1)
}

/// Runs the dev fleet until interrupted.
pub async fn run(args: UpArgs) -> Result<(), Failure> {
    eprintln!("{BANNER}");
    let n = args.datacenters as usize;
    let auth: Option<AuthConfig> = match &args.auth {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Some(
                toml::from_str(&text)
                    .with_context(|| format!("invalid auth config {}", path.display()))?,
            )
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let frontend = listener
        .local_addr()
        .context("cannot read the listening address")?;
    let node_addrs: Vec<SocketAddr> = if args.listen.port() == 0 {
        free_ports(frontend.ip(), n)?
            .into_iter()
            .map(|p| SocketAddr::new(frontend.ip(), p))
            .collect()
    } else {
        (1..=n as u16)
            .map(|i| SocketAddr::new(frontend.ip(), frontend.port().saturating_add(i)))
            .collect()
    };
    let witness_addr = if args.listen.port() == 0 {
        SocketAddr::new(frontend.ip(), free_ports(frontend.ip(), 1)?[0])
    } else {
        SocketAddr::new(frontend.ip(), frontend.port().saturating_add(n as u16 + 1))
    };
    let options = crate::fleet::FleetOptions {
        max_attempts: args.max_attempts,
        login_deadline_secs: args.login_deadline,
        auth,
        wan: args.wan.clone(),
        witness: witness_addr,
        rate_limit: match args.rate_limit {
            Toggle::On => bkv_frontend::RateLimit::default(),
            Toggle::Off => bkv_frontend::RateLimit::OFF,
        },
        node_threads: Some(node_threads(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            n,
        )),
    };
    let files = write_fleet(&args.dir, n, frontend, &node_addrs, options)?;

    let logs = args.dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let exe = std::env::current_exe().context("cannot find the bkv binary")?;
    let mut nodes = Nodes(Vec::new());
    let mut listing = Vec::new();
    for (dc, config, addr) in &files.nodes {
        let log_path = logs.join(format!("{dc}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let child = Command::new(&exe)
            .args(["node", "--exit-with-parent", "--config"])
            .arg(config)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().context("log file")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start the node for {dc}"))?;
        listing.push(serde_json::json!({
            "dc": dc,
            "pid": child.id(),
            "url": format!("http://{addr}"),
            "config": config,
            "log": log_path,
        }));
        nodes.0.push(child);
    }
    // The witness is its own process, as a third party's would be.
    let witness_log = logs.join("witness.log");
    let log = std::fs::File::create(&witness_log)
        .with_context(|| format!("cannot create {}", witness_log.display()))?;
    let witness = Command::new(&exe)
        .args(["witness", "--exit-with-parent", "--config"])
        .arg(&files.witness)
        .stdin(Stdio::piped())
        .stdout(log.try_clone().context("log file")?)
        .stderr(log)
        .spawn()
        .context("cannot start the witness")?;
    listing.push(serde_json::json!({
        "dc": "witness",
        "pid": witness.id(),
        "url": format!("http://{witness_addr}"),
        "config": files.witness,
        "log": witness_log,
    }));
    nodes.0.push(witness);
    std::fs::write(
        args.dir.join("frontend.pid"),
        std::process::id().to_string(),
    )
    .context("frontend.pid")?;
    let nodes_json = args.dir.join("nodes.json");
    std::fs::write(
        &nodes_json,
        serde_json::to_vec_pretty(&listing).context("nodes.json")?,
    )
    .with_context(|| format!("cannot write {}", nodes_json.display()))?;

    let frontend_config =
        bkv_frontend::FrontendConfig::load(&files.frontend).map_err(anyhow::Error::msg)?;
    let router =
        Arc::new(bkv_frontend::router_from_config(&frontend_config).map_err(anyhow::Error::msg)?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_router(listener, router.clone(), async move {
        let _ = stop_rx.await;
    }));

    // Ready once a leader serves with every datacenter voting.
    let started = Instant::now();
    let fleet_key = loop {
        let status = router.fleet_status().await;
        let voters = status.members.iter().filter(|m| m.voter).count();
        if status.majority && voters == n && !status.fleet_key.is_empty() {
            break status.fleet_key;
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err(anyhow::anyhow!(
                "the fleet did not form within 120 s ({voters} of {n} voting); see {}",
                logs.display()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Epoch 1: the founded fleet's key and evidence, signed by the witness and
    // counter-signed by the operator, in the bundle the frontend serves from now on.
    let published = loop {
        match crate::trust::publish_from_config(&files.operator).await {
            Ok(report) => break report,
            // The witness process may still be starting.
            Err(_) if started.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => return Err(e),
        }
    };
    let mut client = ClientConfig::load(&files.client)?;
    client.fleet_key = fleet_key.clone();
    write_client_config(&files.client, &client)?;

    tracing::warn!(%fleet_key, "software HSM: for development only");
    eprintln!("fleet key  {fleet_key}");
    eprintln!(
        "fleet      {n} datacenters, one node process each (see {})",
        nodes_json.display()
    );
    eprintln!(
        "witness    epoch {} published (see {}; audit with `bkv audit`)",
        published.bundle.witness.epoch,
        files.operator.display()
    );
    eprintln!("client     {}", files.client.display());
    println!("ready http://{frontend}");
    std::io::stdout().flush().ok();

    shutdown_signal().await;
    let _ = stop_tx.send(());
    let _ = server.await;
    drop(nodes);
    eprintln!("fleet stopped; its enrollments are gone (HSMs keep nothing on disk)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::node_threads;

    #[test]
    fn nodes_share_the_cores_and_each_gets_at_least_one_thread() {
        assert_eq!(node_threads(2, 5), 1);
        assert_eq!(node_threads(16, 5), 3);
        assert_eq!(node_threads(8, 1), 8);
    }
}
