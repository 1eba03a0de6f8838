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
    /// Publish the current fleet-key artifact: evidence from the fleets, the witness's
    /// signature, the operator's counter-signature, and the bundle file the vault serves.
    Publish {
        /// The operator config (operator.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Fetch the validation bundle as a client sees it (checked if the client config
    /// trusts over the air) and write it to a file.
    Bundle {
        /// The client config.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Where to write the bundle.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Check a bundle file offline: exit 0, or 6 with the reason.
    VerifyBundle(crate::trust::VerifyBundleArgs),
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
    /// Frontend port; node N listens on port + N, the witness on port + N + 1. 0 picks
    /// free ports.
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
    /// `client.toml`: over the air, and pinned to the fleet key once it is known.
    pub client: PathBuf,
    /// `client-ota.toml`: over the air only (trusts whatever fleets the bundles list).
    pub client_ota: PathBuf,
    /// `witness.toml`.
    pub witness: PathBuf,
    /// `operator.toml`.
    pub operator: PathBuf,
    /// `frontend.toml`.
    pub frontend: PathBuf,
    /// `dcN.toml`, in datacenter order.
    pub nodes: Vec<(String, PathBuf, SocketAddr)>,
}

/// Writes `text` to `path` atomically with mode 0600.
pub fn write_private(path: &Path, text: &[u8]) -> anyhow::Result<()> {
    bkv_client::device::write_atomically(path, text, 0o600)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `config` as TOML under a `# header` line to `path`, atomically with mode 0600.
fn write_private_toml(
    path: &Path,
    header: &str,
    config: &impl serde::Serialize,
) -> anyhow::Result<()> {
    let text = toml::to_string_pretty(config)
        .with_context(|| format!("cannot encode {}", path.display()))?;
    write_private(path, format!("# {header}\n{text}").as_bytes())
}

/// Writes public `bytes` to `path` atomically (mode 0644).
pub fn write_public(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    bkv_client::device::write_atomically(path, bytes, 0o644)
        .with_context(|| format!("cannot write {}", path.display()))
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
    /// Where the witness listens.
    pub witness: SocketAddr,
    /// Per-account rate limits at the frontend.
    pub rate_limit: bkv_frontend::RateLimit,
    /// Each node's worker threads; one per core when absent.
    pub node_threads: Option<usize>,
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
        witness,
        rate_limit,
        node_threads,
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
    // Public: the root auditors pin (`bkv audit --platform-root`), as they would pin an
    // HSM vendor's.
    crate::fleet::write_public(
        &dir.join("platform-root.hex"),
        format!(
            "{}\n",
            hex::encode(bkv_hsm::platform::software_platform_root(&platform_key))
        )
        .as_bytes(),
    )?;
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
            // openraft 0.9 gives up on an AppendEntries after one heartbeat interval: across
            // continents it must outlast the longest round trip (150 ms to dc5).
            heartbeat_ms: if wan.is_some() { 500 } else { 100 },
            worker_threads: node_threads,
        };
        let path = dir.join(format!("{name}.toml"));
        write_private_toml(
            &path,
            &format!("bkv node config for {name} (written by bkv fleet init)"),
            &config,
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
        bundle: Some("bundle.json".into()),
        rate_limit,
        previous_fleets: Vec::new(),
    };
    let frontend_path = dir.join("frontend.toml");
    write_private_toml(
        &frontend_path,
        "bkv frontend config (written by bkv fleet init)",
        &frontend_config,
    )?;
    let trust = write_trust(dir, &auth.audience, witness, &urls)?;
    let mut client = ClientConfig {
        url: format!("http://{frontend}"),
        fleet_key: String::new(),
        audience: auth.audience.clone(),
        tenant: "default".into(),
        ksf: KsfParams::RECOMMENDED,
        dev,
        wan,
        over_the_air: Some(trust.over_the_air),
        base_dir: dir.to_path_buf(),
    };
    let client_path = dir.join("client.toml");
    write_client_config(&client_path, &client)?;
    let client_ota = dir.join("client-ota.toml");
    client.over_the_air.as_mut().expect("set above").state = "trust-state-ota.json".into();
    write_client_config(&client_ota, &client)?;
    Ok(FleetFiles {
        client: client_path,
        client_ota,
        witness: trust.witness,
        operator: trust.operator,
        frontend: frontend_path,
        nodes,
    })
}

struct TrustFiles {
    witness: PathBuf,
    operator: PathBuf,
    over_the_air: bkv_client::OverTheAir,
}

/// Writes the dev witness's and operator's keys and configs. Development keys are files;
/// production holds them in a PKCS#11 token (see docs/audit.md).
fn write_trust(
    dir: &Path,
    audience: &str,
    witness: SocketAddr,
    node_urls: &[String],
) -> anyhow::Result<TrustFiles> {
    use bkv_witness::{Signer, SignerConfig};
    // A new fleet directory is a new vault: the previous one's log and keys go.
    for stale in [
        "witness.redb",
        "witness.key",
        "operator.key",
        "bundle.json",
        "trust-state.json",
        "trust-state-ota.json",
    ] {
        match std::fs::remove_file(dir.join(stale)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {stale}"))
            }
            _ => {}
        }
    }
    let witness_signer = SignerConfig::File {
        path: "witness.key".into(),
    };
    let operator_signer = SignerConfig::File {
        path: "operator.key".into(),
    };
    let witness_key = hex::encode(Signer::generate(&witness_signer, dir)?.public_key());
    let operator_key = hex::encode(Signer::generate(&operator_signer, dir)?.public_key());
    let namespace = format!("{audience}/fleet-keys");
    let witness_config = bkv_witness::WitnessConfig {
        listen: witness,
        namespace: namespace.clone(),
        log: "witness.redb".into(),
        operator_key: operator_key.clone(),
        signer: witness_signer,
    };
    let witness_path = dir.join("witness.toml");
    write_private_toml(
        &witness_path,
        "bkv witness (development: run by a third party in production)",
        &witness_config,
    )?;
    let operator = crate::trust::OperatorConfig {
        witness: format!("http://{witness}"),
        witness_key: witness_key.clone(),
        namespace: namespace.clone(),
        bundle: "bundle.json".into(),
        signer: operator_signer,
        fleets: vec![crate::trust::FleetSource {
            role: bkv_core::bundle::Role::Active,
            nodes: node_urls.to_vec(),
            fleet_key: None,
        }],
    };
    let operator_path = dir.join("operator.toml");
    write_private_toml(
        &operator_path,
        "bkv operator: what `bkv fleet publish` lists, and with which key",
        &operator,
    )?;
    Ok(TrustFiles {
        witness: witness_path,
        operator: operator_path,
        over_the_air: bkv_client::OverTheAir {
            witness_key,
            operator_key,
            namespace,
            state: "trust-state.json".into(),
        },
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
                free_ports(args.host, n + 2)?
            } else {
                (0..=n as u16 + 1)
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
            let nodes: Vec<SocketAddr> = ports[1..=n]
                .iter()
                .map(|p| SocketAddr::new(args.host, *p))
                .collect();
            let witness = SocketAddr::new(args.host, ports[n + 1]);
            let options = FleetOptions {
                max_attempts: args.max_attempts,
                login_deadline_secs: 60,
                auth: None,
                wan: args.wan,
                witness,
                rate_limit: bkv_frontend::RateLimit::default(),
                // Each node on a machine of its own, by default.
                node_threads: None,
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
                "wrote {} (witness on {witness}; start it with `bkv witness --config`)",
                files.witness.display()
            );
            println!(
                "wrote {} (`bkv fleet publish --config` it once the fleet runs)",
                files.operator.display()
            );
            println!(
                "wrote {} and {} (over the air: they trust the bundles the witness and operator sign)",
                files.client.display(),
                files.client_ota.display()
            );
            Ok(())
        }
        FleetCommand::Publish { config } => crate::trust::publish_command(&config).await,
        FleetCommand::Bundle { config, out } => crate::trust::bundle_command(&config, &out).await,
        FleetCommand::VerifyBundle(args) => crate::trust::verify_bundle_command(args),
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
