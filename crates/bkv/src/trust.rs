//! Fleet keys over the air: `bkv witness`, `bkv signer`, `bkv fleet publish|bundle|
//! verify-bundle`, and `bkv audit`.

use crate::serve::stop_signal;
use crate::Failure;
use anyhow::Context;
use bkv_client::{exit, ClientConfig, Trust};
use bkv_core::bundle::{
    Artifact, Bundle, BundleKeys, FleetEntry, Role, VerifiedBundle, ARTIFACT_VERSION,
};
use bkv_core::v1::{admin_client::AdminClient, EvidenceRequest};
use bkv_witness::publish::{publish, PublishError};
use bkv_witness::{
    config_dir, load_toml, open_witness, parse_key, Signer, SignerConfig, WitnessClient,
    WitnessConfig, WitnessError,
};
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `operator.toml`: what the operator publishes, where, and with which key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// The witness's URL.
    pub witness: String,
    /// The witness's Ed25519 key (hex): publishing stops if the witness has another.
    pub witness_key: String,
    /// The namespace the fleet-key log is published in.
    pub namespace: String,
    /// Where the counter-signed bundle is written for the frontend to serve (relative).
    pub bundle: PathBuf,
    /// The operator's signing key.
    pub signer: SignerConfig,
    /// Every fleet to list, with its role.
    pub fleets: Vec<FleetSource>,
}

/// One fleet of the artifact: nodes to take its evidence from, or (for a fleet no longer
/// running) its key, whose entry is carried over from the latest epoch.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSource {
    /// Its role in the new epoch.
    pub role: Role,
    /// Admin URLs of its nodes (any one that answers will do).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Its fleet key (hex), to check the nodes' answer or to carry a stopped fleet over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_key: Option<String>,
}

/// `bkv signer …`.
#[derive(Subcommand)]
pub enum SignerCommand {
    /// Make the key a config's `[signer]` table names (a new key file, or a new
    /// non-extractable key pair in a PKCS#11 token) and print its public key.
    Generate {
        /// A witness.toml or operator.toml.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the public key of a config's `[signer]`.
    PublicKey {
        /// A witness.toml or operator.toml.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

fn trust_failure(error: impl Into<anyhow::Error>) -> Failure {
    Failure::new(exit::TRUST, error)
}

fn witness_failure(error: WitnessError) -> Failure {
    match error {
        WitnessError::Unreachable { .. } => Failure::new(exit::UNAVAILABLE, error),
        other => Failure::new(exit::OTHER, other),
    }
}

fn signer_section(path: &Path) -> Result<SignerConfig, Failure> {
    #[derive(Deserialize)]
    struct Section {
        signer: SignerConfig,
    }
    let value: toml::Value = load_toml(path)?;
    let section: Section = value
        .try_into()
        .with_context(|| format!("{}: no valid [signer] table", path.display()))?;
    Ok(section.signer)
}

/// Runs `bkv signer …`.
pub fn signer(command: SignerCommand) -> Result<(), Failure> {
    let (config, generate) = match command {
        SignerCommand::Generate { config } => (config, true),
        SignerCommand::PublicKey { config } => (config, false),
    };
    let section = signer_section(&config)?;
    let base = config_dir(&config);
    let signer = if generate {
        Signer::generate(&section, &base)
    } else {
        Signer::open(&section, &base)
    }
    .map_err(anyhow::Error::new)?;
    println!("{}", hex::encode(signer.public_key()));
    Ok(())
}

/// Runs the witness until interrupted.
pub async fn witness(config_path: PathBuf, exit_with_parent: bool) -> Result<(), Failure> {
    let config: WitnessConfig = load_toml(&config_path)?;
    let witness = open_witness(&config, &config_path)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let latest = witness
        .log
        .latest()
        .map_err(anyhow::Error::new)?
        .map(|b| b.witness.epoch)
        .unwrap_or(0);
    tracing::info!(namespace = %config.namespace, key = %hex::encode(witness.signer.public_key()),
        latest_epoch = latest, "witness serving");
    println!(
        "ready http://{}",
        listener.local_addr().context("listening address")?
    );
    bkv_witness::serve(listener, witness, stop_signal(exit_with_parent)).await?;
    Ok(())
}

async fn fetch_evidence(nodes: &[String]) -> anyhow::Result<(String, bkv_core::bundle::Evidence)> {
    let mut errors = Vec::new();
    for url in nodes {
        let attempt = async {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5))
                .connect()
                .await?;
            let answer = AdminClient::new(channel)
                .evidence(EvidenceRequest {})
                .await?
                .into_inner();
            let evidence: bkv_core::bundle::Evidence = serde_json::from_str(&answer.evidence_json)?;
            anyhow::Ok((answer.fleet_key, evidence))
        };
        match attempt.await {
            Ok(found) => return Ok(found),
            Err(e) => errors.push(format!("{url}: {e}")),
        }
    }
    anyhow::bail!("no node gave the fleet's evidence ({})", errors.join("; "))
}

/// The latest bundle in the witness's log, checked; `None` when the log is empty.
async fn latest_verified(
    witness: &WitnessClient,
    keys: &BundleKeys,
) -> Result<Option<VerifiedBundle>, Failure> {
    let info = witness.info().await.map_err(witness_failure)?;
    if info.latest_epoch == 0 {
        return Ok(None);
    }
    let latest = witness
        .epoch(info.latest_epoch)
        .await
        .map_err(witness_failure)?;
    // Signed by the witness but not yet counter-signed is an interrupted publication,
    // which the next publish completes; the witness's own signature must hold either way.
    let checked = match latest.operator_signature {
        None => latest.verify_witnessed(&keys.witness),
        Some(_) => latest.verify(keys),
    };
    checked.map(Some).map_err(|e| {
        trust_failure(anyhow::anyhow!(
            "the witness's latest epoch does not verify: {e}"
        ))
    })
}

/// Builds the artifact an operator config describes.
async fn build_artifact(
    config: &OperatorConfig,
    previous: Option<&Artifact>,
) -> Result<Artifact, Failure> {
    let mut fleets = Vec::new();
    for source in &config.fleets {
        let entry = if source.nodes.is_empty() {
            let key = source
                .fleet_key
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("a fleet with no nodes must name its fleet_key"))?;
            let mut entry = previous
                .and_then(|a| {
                    a.fleets
                        .iter()
                        .find(|f| f.fleet_key.eq_ignore_ascii_case(key))
                })
                .cloned()
                .ok_or_else(|| {
                    anyhow::anyhow!("fleet {key} has no nodes and is not in the latest epoch")
                })?;
            entry.role = source.role;
            entry
        } else {
            let (fleet_key, evidence) = fetch_evidence(&source.nodes)
                .await
                .map_err(|e| Failure::new(exit::UNAVAILABLE, e))?;
            if let Some(expected) = &source.fleet_key {
                if !expected.eq_ignore_ascii_case(&fleet_key) {
                    return Err(trust_failure(anyhow::anyhow!(
                        "the nodes {:?} serve fleet {fleet_key}, not {expected}",
                        source.nodes
                    )));
                }
            }
            FleetEntry {
                id: evidence.ceremony.fleet_id.clone(),
                fleet_key,
                role: source.role,
                evidence,
            }
        };
        bkv_hsm::evidence::verify_evidence(&entry).map_err(|e| {
            trust_failure(anyhow::anyhow!(
                "fleet {}: bad evidence: {e}",
                entry.fleet_key
            ))
        })?;
        if fleets
            .iter()
            .any(|f: &FleetEntry| f.fleet_key == entry.fleet_key)
        {
            return Err(anyhow::anyhow!("fleet {} is listed twice", entry.fleet_key).into());
        }
        fleets.push(entry);
    }
    let active = fleets.iter().filter(|f| f.role == Role::Active).count();
    if active > 1 {
        return Err(anyhow::anyhow!(
            "{active} fleets are active; at most one takes new enrollments"
        )
        .into());
    }
    Ok(Artifact {
        version: ARTIFACT_VERSION,
        namespace: config.namespace.clone(),
        fleets,
    })
}

/// What `publish_from_config` did.
pub struct PublishReport {
    /// The bundle written.
    pub bundle: Bundle,
    /// False when the artifact was already the latest epoch.
    pub new_epoch: bool,
    /// Where it was written.
    pub path: PathBuf,
}

/// `bkv fleet publish`: evidence from the fleets, the witness's signature, the
/// operator's counter-signature, and the bundle file the frontend serves.
pub async fn publish_from_config(config_path: &Path) -> Result<PublishReport, Failure> {
    let config: OperatorConfig = load_toml(config_path)?;
    let base = config_dir(config_path);
    let operator = Signer::open(&config.signer, &base).map_err(anyhow::Error::new)?;
    let witness_key = parse_key(&config.witness_key, "witness_key")?;
    let keys = BundleKeys {
        witness: witness_key,
        operator: operator.public_key(),
    };
    let witness = WitnessClient::new(&config.witness).map_err(witness_failure)?;
    let info = witness.info().await.map_err(witness_failure)?;
    if !info.witness_key.eq_ignore_ascii_case(&config.witness_key) {
        return Err(trust_failure(anyhow::anyhow!(
            "the witness at {} signs with {}, but operator.toml pins {}",
            config.witness,
            info.witness_key,
            config.witness_key
        )));
    }
    let previous = latest_verified(&witness, &keys).await?;
    let artifact = build_artifact(&config, previous.as_ref().map(|v| &v.artifact)).await?;
    let published = publish(&witness, &witness_key, &operator, &artifact)
        .await
        .map_err(|e| match e {
            PublishError::Witness(w) => witness_failure(w),
            PublishError::BadWitness(_) => trust_failure(e),
            PublishError::Signer(_) => Failure::new(exit::OTHER, e),
        })?;
    let path = base.join(&config.bundle);
    crate::fleet::write_public(&path, &published.bundle.to_json())?;
    Ok(PublishReport {
        bundle: published.bundle,
        new_epoch: published.new_epoch,
        path,
    })
}

fn describe_fleets(artifact: &Artifact) -> String {
    artifact
        .fleets
        .iter()
        .map(|f| format!("{}… {}", &f.fleet_key[..16.min(f.fleet_key.len())], f.role))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `bkv fleet publish`.
pub async fn publish_command(config: &Path) -> Result<(), Failure> {
    let report = publish_from_config(config).await?;
    let artifact: Artifact = serde_json::from_str(&report.bundle.artifact)
        .context("the published artifact does not parse")?;
    println!(
        "{} epoch {} (digest {}): {}",
        if report.new_epoch {
            "published"
        } else {
            "unchanged, still"
        },
        report.bundle.witness.epoch,
        hex::encode(&report.bundle.witness.digest),
        describe_fleets(&artifact)
    );
    println!("wrote {}", report.path.display());
    Ok(())
}

/// Runs `bkv fleet bundle`: the bundle as the client sees it, checked if the client
/// config trusts over the air.
pub async fn bundle_command(config: &Path, out: &Path) -> Result<(), Failure> {
    let config = ClientConfig::load(config)?;
    let bytes = bkv_client::fetch_bundle(&config).await?;
    if bytes.is_empty() {
        return Err(trust_failure(anyhow::anyhow!(
            "the vault serves no validation bundle"
        )));
    }
    if config.over_the_air.is_some() {
        let trust = Trust::from_config(&config)?;
        let verified = trust.verify_bundle(&bytes)?;
        if verified.epoch < trust.highest_epoch() {
            return Err(trust_failure(anyhow::anyhow!(
                "the vault serves epoch {}, older than epoch {} already seen",
                verified.epoch,
                trust.highest_epoch()
            )));
        }
        eprintln!(
            "bundle of epoch {} verified: {}",
            verified.epoch,
            describe_fleets(&verified.artifact)
        );
    }
    crate::fleet::write_public(out, &bytes)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// What an auditor pins beyond the witness and operator keys: the HSM platform roots
/// (the vendor's attestation keys) and, optionally, the code measurements it accepts.
/// Without them, evidence could be signed by a root the publisher made up.
#[derive(clap::Args, Clone, Debug)]
pub struct EvidencePins {
    /// A platform root (Ed25519, hex) that may certify HSMs; repeat for several.
    #[arg(long = "platform-root", value_name = "HEX")]
    platform_roots: Vec<String>,
    /// A code measurement (SHA-256, hex) fleets may run; repeat for several. Any, if absent.
    #[arg(long = "measurement", value_name = "HEX")]
    measurements: Vec<String>,
}

struct Pins {
    roots: Vec<[u8; 32]>,
    measurements: Vec<[u8; 32]>,
}

impl EvidencePins {
    fn parse(&self) -> Result<Pins, Failure> {
        let parse = |v: &Vec<String>, what: &str| {
            v.iter()
                .map(|h| parse_key(h, what).map_err(|e| Failure::new(exit::USAGE, e)))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Pins {
            roots: parse(&self.platform_roots, "--platform-root")?,
            measurements: parse(&self.measurements, "--measurement")?,
        })
    }
}

/// Checks one fleet's evidence, and (when pinned) that its platform root and code are
/// pinned ones. Returns the platform root.
fn check_evidence(entry: &FleetEntry, pins: &Pins) -> anyhow::Result<[u8; 32]> {
    let root = bkv_hsm::evidence::verify_evidence(entry)
        .map_err(|e| anyhow::anyhow!("fleet {}: bad evidence: {e}", entry.fleet_key))?;
    if !pins.roots.is_empty() && !pins.roots.contains(&root) {
        anyhow::bail!(
            "fleet {}: certified by platform root {}, which is not a pinned one",
            entry.fleet_key,
            hex::encode(root)
        );
    }
    if !pins.measurements.is_empty() {
        let mut code = entry.evidence.ceremony.approved_measurements.clone();
        code.push(entry.evidence.measurement.clone());
        for m in code {
            let m = parse_key(&m, "measurement")?;
            if !pins.measurements.contains(&m) {
                anyhow::bail!(
                    "fleet {}: approves code {}, which is not a pinned measurement",
                    entry.fleet_key,
                    hex::encode(m)
                );
            }
        }
    }
    Ok(root)
}

/// Arguments of `bkv fleet verify-bundle`.
#[derive(clap::Args)]
pub struct VerifyBundleArgs {
    /// The bundle file.
    #[arg(long, value_name = "FILE")]
    bundle: PathBuf,
    /// The witness's Ed25519 key, hex.
    #[arg(long, value_name = "HEX")]
    witness_key: String,
    /// The operator's Ed25519 key, hex.
    #[arg(long, value_name = "HEX")]
    operator_key: String,
    /// Also require this fleet key to be listed (and active).
    #[arg(long, value_name = "HEX")]
    fleet_key: Option<String>,
    /// Refuse epochs older than this one (the highest seen).
    #[arg(long, default_value_t = 0)]
    min_epoch: u64,
    /// Also check every fleet against these pins.
    #[command(flatten)]
    pins: EvidencePins,
}

/// Runs `bkv fleet verify-bundle`: exit 0, or 6 with the reason.
pub fn verify_bundle_command(args: VerifyBundleArgs) -> Result<(), Failure> {
    let keys = BundleKeys {
        witness: parse_key(&args.witness_key, "--witness-key")
            .map_err(|e| Failure::new(exit::USAGE, e))?,
        operator: parse_key(&args.operator_key, "--operator-key")
            .map_err(|e| Failure::new(exit::USAGE, e))?,
    };
    let bytes = std::fs::read(&args.bundle)
        .with_context(|| format!("cannot read {}", args.bundle.display()))?;
    let verified = Bundle::from_json(&bytes)
        .and_then(|b| b.verify(&keys))
        .map_err(trust_failure)?;
    if verified.epoch < args.min_epoch {
        return Err(trust_failure(bkv_core::bundle::BundleError::Rollback {
            presented: verified.epoch,
            seen: args.min_epoch,
        }));
    }
    if let Some(fleet) = &args.fleet_key {
        let key = parse_key(fleet, "--fleet-key").map_err(|e| Failure::new(exit::USAGE, e))?;
        verified
            .admit(&key, args.min_epoch, &[Role::Active])
            .map_err(trust_failure)?;
    }
    let pins = args.pins.parse()?;
    for entry in &verified.artifact.fleets {
        check_evidence(entry, &pins).map_err(trust_failure)?;
    }
    println!(
        "ok: epoch {} of {} signed by the witness and counter-signed by the operator; {}",
        verified.epoch,
        verified.namespace,
        describe_fleets(&verified.artifact)
    );
    Ok(())
}

/// Arguments of `bkv audit`.
#[derive(clap::Args)]
pub struct AuditArgs {
    /// The witness's URL.
    #[arg(long, value_name = "URL")]
    witness: String,
    /// The operator's Ed25519 key, hex.
    #[arg(long, value_name = "HEX")]
    operator_key: String,
    /// The witness's Ed25519 key, hex.
    #[arg(long, value_name = "HEX")]
    witness_key: String,
    /// Print JSON for machines.
    #[arg(long)]
    json: bool,
    /// The HSM platform roots (at least one) and code measurements fleets must use.
    #[command(flatten)]
    pins: EvidencePins,
}

/// One epoch as the auditor reports it.
#[derive(Serialize)]
struct EpochReport {
    epoch: u64,
    timestamp: u64,
    digest: String,
    added: Vec<String>,
    removed: Vec<String>,
    role_changes: Vec<String>,
    fleets: BTreeMap<String, String>,
}

/// Runs `bkv audit`: every epoch fetched and checked; exit 6 on any gap or inconsistency.
pub async fn audit(args: AuditArgs) -> Result<(), Failure> {
    let keys = BundleKeys {
        witness: parse_key(&args.witness_key, "--witness-key")
            .map_err(|e| Failure::new(exit::USAGE, e))?,
        operator: parse_key(&args.operator_key, "--operator-key")
            .map_err(|e| Failure::new(exit::USAGE, e))?,
    };
    let pins = args.pins.parse()?;
    if pins.roots.is_empty() {
        return Err(Failure::new(
            exit::USAGE,
            anyhow::anyhow!("--platform-root is required: without it, evidence could be certified by a key the publisher made up"),
        ));
    }
    let witness = WitnessClient::new(&args.witness).map_err(witness_failure)?;
    let info = witness.info().await.map_err(witness_failure)?;
    let mut reports = Vec::new();
    let outcome = audit_epochs(&witness, &keys, &pins, info.latest_epoch, &mut reports).await;
    if args.json {
        let value = serde_json::json!({
            "witness": args.witness,
            "namespace": info.namespace,
            "latest_epoch": info.latest_epoch,
            "ok": outcome.is_ok(),
            "error": outcome.as_ref().err().map(|e| e.to_string()),
            "epochs": reports,
        });
        println!("{}", serde_json::to_string_pretty(&value).expect("json"));
    } else {
        println!(
            "namespace {}  witness {}  epochs {}",
            info.namespace, args.witness, info.latest_epoch
        );
        for r in &reports {
            println!(
                "epoch {:>4}  t={}  digest {}…",
                r.epoch,
                r.timestamp,
                &r.digest[..16]
            );
            for k in &r.added {
                println!("  + {k} ({})", r.fleets[k]);
            }
            for k in &r.removed {
                println!("  - {k}");
            }
            for c in &r.role_changes {
                println!("  ~ {c}");
            }
        }
    }
    match outcome {
        Ok(()) => {
            if !args.json {
                println!(
                    "audit ok: {} epochs, every signature, digest and evidence item checked",
                    reports.len()
                );
            }
            Ok(())
        }
        Err(e) => Err(trust_failure(anyhow::anyhow!("audit FAILED: {e}"))),
    }
}

async fn audit_epochs(
    witness: &WitnessClient,
    keys: &BundleKeys,
    pins: &Pins,
    latest: u64,
    reports: &mut Vec<EpochReport>,
) -> anyhow::Result<()> {
    let mut previous: Option<VerifiedBundle> = None;
    let mut ceremonies: BTreeMap<String, bkv_core::bundle::Ceremony> = BTreeMap::new();
    for epoch in 1..=latest {
        let bundle = witness
            .epoch(epoch)
            .await
            .map_err(|e| anyhow::anyhow!("epoch {epoch}: missing from the log ({e})"))?;
        if bundle.witness.epoch != epoch {
            anyhow::bail!(
                "epoch {epoch}: the log serves epoch {} in its place",
                bundle.witness.epoch
            );
        }
        let verified = bundle
            .verify(keys)
            .map_err(|e| anyhow::anyhow!("epoch {epoch}: {e}"))?;
        if let Some(prev) = &previous {
            if verified.namespace != prev.namespace {
                anyhow::bail!(
                    "epoch {epoch}: namespace changed from {:?} to {:?}",
                    prev.namespace,
                    verified.namespace
                );
            }
            if verified.timestamp < prev.timestamp {
                anyhow::bail!("epoch {epoch}: timestamp goes back in time");
            }
        }
        let mut fleets = BTreeMap::new();
        let mut active = 0;
        for entry in &verified.artifact.fleets {
            let root =
                check_evidence(entry, pins).map_err(|e| anyhow::anyhow!("epoch {epoch}: {e}"))?;
            if let Some(seen) = ceremonies.get(&entry.fleet_key) {
                if seen != &entry.evidence.ceremony {
                    anyhow::bail!("epoch {epoch}: fleet {} presents a different creation ceremony than before", entry.fleet_key);
                }
            }
            ceremonies.insert(entry.fleet_key.clone(), entry.evidence.ceremony.clone());
            if fleets
                .insert(
                    entry.fleet_key.clone(),
                    format!(
                        "{}, measurement {}…, {} members, platform {}…",
                        entry.role,
                        &entry.evidence.measurement[..16],
                        entry.evidence.members.len(),
                        &hex::encode(root)[..16]
                    ),
                )
                .is_some()
            {
                anyhow::bail!("epoch {epoch}: fleet {} listed twice", entry.fleet_key);
            }
            active += usize::from(entry.role == Role::Active);
        }
        if active > 1 {
            anyhow::bail!("epoch {epoch}: {active} active fleets");
        }
        let before: BTreeMap<String, Role> = previous
            .as_ref()
            .map(|p| {
                p.artifact
                    .fleets
                    .iter()
                    .map(|f| (f.fleet_key.clone(), f.role))
                    .collect()
            })
            .unwrap_or_default();
        let now: BTreeMap<String, Role> = verified
            .artifact
            .fleets
            .iter()
            .map(|f| (f.fleet_key.clone(), f.role))
            .collect();
        reports.push(EpochReport {
            epoch,
            timestamp: verified.timestamp,
            digest: hex::encode(&bundle.witness.digest),
            added: now
                .keys()
                .filter(|k| !before.contains_key(*k))
                .cloned()
                .collect(),
            removed: before
                .keys()
                .filter(|k| !now.contains_key(*k))
                .cloned()
                .collect(),
            role_changes: now
                .iter()
                .filter_map(|(k, r)| {
                    before
                        .get(k)
                        .filter(|b| *b != r)
                        .map(|b| format!("{k}: {b} -> {r}"))
                })
                .collect(),
            fleets,
        });
        previous = Some(verified);
    }
    Ok(())
}
