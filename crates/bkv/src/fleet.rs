//! `bkv fleet …`: lay out a fleet's configuration, and report its health.

use crate::Failure;
use anyhow::Context;
use bkv_client::{exit, ClientConfig, DevTokens};
use bkv_core::auth::{AuthConfig, TokenKey};
use bkv_core::KsfParams;
use bkv_frontend::{FrontendConfig, NodeAddress};
use bkv_node::{NodeConfig, PeerAddress};
use clap::{Args, Subcommand};
use rand::RngCore;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// Fleet subcommands.
#[derive(Subcommand)]
pub enum FleetCommand {
    /// Write the configuration of a new fleet: one node config per datacenter, the
    /// frontend's, the dev platform key, and a client config.
    Init(InitArgs),
    /// Show the fleet's members, leader, term, commit index and whether it has a majority
    /// (exit 5 without one).
    Status {
        /// The client config (only its URL is used).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Print JSON for machines.
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of `bkv fleet init`.
#[derive(Args)]
pub struct InitArgs {
    /// Number of datacenters (one node each).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=15))]
    datacenters: u16,
    /// Directory to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Host the frontend and nodes listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Frontend port; node N listens on port + N. 0 picks free ports.
    #[arg(long, default_value_t = 7450)]
    base_port: u16,
    /// Wrong PINs a record survives.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_attempts: u32,
    /// Simulate wide-area latency with this profile (three-continents).
    #[arg(long, value_name = "PROFILE")]
    wan: Option<String>,
}

/// What [`write_fleet`] produced.
pub struct FleetFiles {
    /// `client.toml`.
    pub client: PathBuf,
    /// `frontend.toml`.
    pub frontend: PathBuf,
    /// `dcN.toml`, in datacenter order.
    pub nodes: Vec<(String, PathBuf, SocketAddr)>,
}

/// Writes `text` to `path` atomically with mode 0600.
pub fn write_private(path: &Path, text: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(text)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Free ports on `host`, found by binding and releasing (fine for a dev machine).
pub fn free_ports(host: IpAddr, count: usize) -> anyhow::Result<Vec<u16>> {
    let listeners: Vec<_> = (0..count)
        .map(|_| std::net::TcpListener::bind((host, 0)))
        .collect::<Result<_, _>>()
        .context("cannot find free ports")?;
    Ok(listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0))
        .collect())
}

fn dev_auth(fleet_dir: &Path) -> (AuthConfig, DevTokens) {
    let mut secret = zeroize::Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(secret.as_mut());
    let secret_hex = hex::encode(&secret[..]);
    let mut tag = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut tag);
    let _ = fleet_dir;
    (
        AuthConfig {
            audience: format!("bkv-dev-{}", hex::encode(tag)),
            keys: vec![TokenKey::Hs256 {
                secret_hex: secret_hex.clone(),
            }],
        },
        DevTokens {
            token_key: secret_hex,
        },
    )
}

/// Policy written into a new fleet's configs.
pub struct FleetOptions {
    /// Wrong PINs a record survives.
    pub max_attempts: u32,
    /// Seconds between KE2 and KE3.
    pub login_deadline_secs: u64,
    /// Token keys; a fresh dev key when absent.
    pub auth: Option<AuthConfig>,
    /// Simulated wide-area latency profile.
    pub wan: Option<String>,
}

/// Writes a fleet's files into `dir`: platform key, node configs, frontend config,
/// and a client config with no fleet key pinned yet.
pub fn write_fleet(
    dir: &Path,
    datacenters: usize,
    frontend: SocketAddr,
    node_addrs: &[SocketAddr],
    options: FleetOptions,
) -> anyhow::Result<FleetFiles> {
    let FleetOptions {
        max_attempts,
        login_deadline_secs,
        auth,
        wan,
    } = options;
    if let Some(name) = &wan {
        anyhow::ensure!(
            bkv_core::wan::WanProfile::named(name).is_some(),
            "unknown wan profile {name:?} (known: {})",
            bkv_core::wan::THREE_CONTINENTS
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut platform_key = zeroize::Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(platform_key.as_mut());
    write_private(&dir.join("platform.key"), platform_key.as_ref())?;
    let (auth, dev) = match auth {
        Some(auth) => (auth, None),
        None => {
            let (auth, dev) = dev_auth(dir);
            (auth, Some(dev))
        }
    };
    let names: Vec<String> = (1..=datacenters).map(|i| format!("dc{i}")).collect();
    let urls: Vec<String> = node_addrs.iter().map(|a| format!("http://{a}")).collect();
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let config = NodeConfig {
            dc: name.clone(),
            listen: node_addrs[i],
            platform_key: "platform.key".into(),
            founder: i == 0,
            max_attempts,
            login_deadline_secs,
            peers: names
                .iter()
                .zip(&urls)
                .filter(|(n, _)| *n != name)
                .map(|(dc, url)| PeerAddress {
                    dc: dc.clone(),
                    url: url.clone(),
                })
                .collect(),
            auth: auth.clone(),
            wan: wan.clone(),
            // Across continents, heartbeats every 500 ms rarely stand in front of an append.
            heartbeat_ms: if wan.is_some() { 500 } else { 100 },
        };
        let path = dir.join(format!("{name}.toml"));
        let text = toml::to_string_pretty(&config).context("node config")?;
        write_private(
            &path,
            format!("# bkv node config for {name} (written by bkv fleet init)\n{text}").as_bytes(),
        )?;
        nodes.push((name.clone(), path, node_addrs[i]));
    }
    let frontend_config = FrontendConfig {
        listen: frontend,
        nodes: names
            .iter()
            .zip(&urls)
            .map(|(dc, url)| NodeAddress {
                dc: dc.clone(),
                url: url.clone(),
            })
            .collect(),
        auth: auth.clone(),
        client_config: Some("client.toml".into()),
        wan: wan.clone(),
    };
    let frontend_path = dir.join("frontend.toml");
    write_private(
        &frontend_path,
        toml::to_string_pretty(&frontend_config)?.as_bytes(),
    )?;
    let client = ClientConfig {
        url: format!("http://{frontend}"),
        fleet_key: String::new(),
        audience: auth.audience.clone(),
        tenant: "default".into(),
        ksf: KsfParams::RECOMMENDED,
        dev,
        wan,
    };
    let client_path = dir.join("client.toml");
    write_client_config(&client_path, &client)?;
    Ok(FleetFiles {
        client: client_path,
        frontend: frontend_path,
        nodes,
    })
}

/// Writes a client config (mode 0600: it may hold the dev token key).
pub fn write_client_config(path: &Path, config: &ClientConfig) -> anyhow::Result<()> {
    let header = "# bkv client config. fleet_key pins the fleet; [dev] (dev vaults only) lets the CLI act as any user.\n";
    write_private(path, format!("{header}{}", config.to_toml()).as_bytes())
}

/// Runs a fleet subcommand.
pub async fn run(command: FleetCommand) -> Result<(), Failure> {
    match command {
        FleetCommand::Init(args) => {
            let n = args.datacenters as usize;
            let ports = if args.base_port == 0 {
                free_ports(args.host, n + 1)?
            } else {
                (0..=n as u16)
                    .map(|i| args.base_port.checked_add(i))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        Failure::new(
                            exit::USAGE,
                            anyhow::anyhow!("--base-port too high for {n} nodes"),
                        )
                    })?
            };
            let frontend = SocketAddr::new(args.host, ports[0]);
            let nodes: Vec<SocketAddr> = ports[1..]
                .iter()
                .map(|p| SocketAddr::new(args.host, *p))
                .collect();
            let options = FleetOptions {
                max_attempts: args.max_attempts,
                login_deadline_secs: 60,
                auth: None,
                wan: args.wan,
            };
            let files = write_fleet(&args.dir, n, frontend, &nodes, options)?;
            println!("wrote {}", args.dir.join("platform.key").display());
            for (dc, path, addr) in &files.nodes {
                println!("wrote {} ({dc} on {addr})", path.display());
            }
            println!(
                "wrote {} (frontend on {frontend})",
                files.frontend.display()
            );
            println!(
                "wrote {} (pins the fleet key once the frontend sees the fleet founded)",
                files.client.display()
            );
            Ok(())
        }
        FleetCommand::Status { config, json } => {
            let config = ClientConfig::load(&config)?;
            let status = bkv_client::fleet_status(&config).await?;
            if json {
                println!("{}", status_json(&status));
            } else {
                print_status(&status);
            }
            if status.majority {
                Ok(())
            } else {
                Err(Failure::new(
                    exit::UNAVAILABLE,
                    anyhow::anyhow!("the fleet has no serving majority"),
                ))
            }
        }
    }
}

fn status_json(status: &bkv_core::v1::FleetStatusResponse) -> serde_json::Value {
    let voters: Vec<_> = status
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.node_id)
        .collect();
    let members: Vec<_> = status
        .nodes
        .iter()
        .map(|n| {
            let s = n.status.as_ref();
            let node_id = s.map(|s| s.node_id).unwrap_or(0);
            let in_membership = status.members.iter().any(|m| m.node_id == node_id);
            serde_json::json!({
                "dc": n.dc,
                "url": n.url,
                "node_id": node_id,
                "fingerprint": s.map(|s| s.fingerprint.clone()).unwrap_or_default(),
                "role": s.map(|s| s.role.clone()).unwrap_or_else(|| "unreachable".into()),
                "health": if !n.reachable { "unreachable" } else if in_membership { "healthy" } else { "not-a-member" },
                "voter": voters.contains(&node_id),
                "applied_index": s.map(|s| s.applied_index).unwrap_or(0),
                "records": s.map(|s| s.records).unwrap_or(0),
                "rss_bytes": s.map(|s| s.rss_bytes).unwrap_or(0),
                "bytes_per_record": s.filter(|s| s.records > 0).map(|s| s.rss_bytes.saturating_sub(s.baseline_rss_bytes) / s.records),
                "error": n.error,
            })
        })
        .collect();
    serde_json::json!({
        "leader": if status.leader_dc.is_empty() { serde_json::Value::Null } else { status.leader_dc.clone().into() },
        "term": status.term,
        "commit_index": status.commit_index,
        "majority": status.majority,
        "fleet_key": status.fleet_key,
        "voters": status.members.iter().filter(|m| m.voter).count(),
        "members": members,
    })
}

fn print_status(status: &bkv_core::v1::FleetStatusResponse) {
    let value = status_json(status);
    println!(
        "leader {}  term {}  commit {}  majority {}",
        value["leader"].as_str().unwrap_or("none"),
        status.term,
        status.commit_index,
        if status.majority { "yes" } else { "NO" }
    );
    for m in value["members"].as_array().into_iter().flatten() {
        let memory = match m["bytes_per_record"].as_u64() {
            Some(per) => format!("{} records, {} B/record", m["records"], per),
            None => format!("{} records", m["records"]),
        };
        println!(
            "  {:<5} {:<10} {:<12} {:<16} {:<24} {}",
            m["dc"].as_str().unwrap_or(""),
            m["role"].as_str().unwrap_or(""),
            m["health"].as_str().unwrap_or(""),
            m["fingerprint"].as_str().unwrap_or(""),
            m["url"].as_str().unwrap_or(""),
            memory
        );
    }
}
