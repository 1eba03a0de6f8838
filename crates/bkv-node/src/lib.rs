//! The untrusted host around one bkv HSM.
//!
//! It runs the gRPC server (the frontend's `Vault` calls, sealed `Peer` traffic, `Admin`
//! status), carries the HSM's sealed bytes to its peers, and keeps asking to join the
//! fleet until the HSM votes. It is trusted for liveness only: it holds no secret and
//! cannot read or forge what the HSMs exchange. Not here: any decision about records.
#![forbid(unsafe_code)]

pub mod config;
pub mod service;
pub mod transport;

pub use config::{NodeConfig, PeerAddress};

use anyhow::Context;
use bkv_core::auth::TokenVerifier;
use bkv_core::v1::{
    admin_client::AdminClient, admin_server::AdminServer, peer_server::PeerServer,
    vault_server::VaultServer, NodeStatusRequest, PeerMessage, Reason,
};
use bkv_core::{MAX_MESSAGE_BYTES, MAX_PEER_MESSAGE_BYTES};
use bkv_hsm::{FleetHsm, HsmConfig, SoftwarePlatform};
use service::{NodeAdmin, NodePeer, NodeVault};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use transport::GrpcTransport;

/// Runs the node until `shutdown` completes.
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let key = config.read_platform_key()?;
    let platform = Arc::new(SoftwarePlatform::new(&key).context("cannot measure this binary")?);
    let peers: Vec<(String, String)> = config
        .peers
        .iter()
        .map(|p| (p.dc.clone(), p.url.clone()))
        .collect();
    let wan = config
        .wan
        .as_deref()
        .and_then(bkv_core::wan::WanProfile::named);
    if let Some(name) = &config.wan {
        tracing::warn!(profile = %name, "simulating wide-area latency between datacenters");
    }
    let transport =
        Arc::new(GrpcTransport::new(&peers, &config.dc, wan).context("invalid peer address")?);
    let defaults = HsmConfig::default();
    let hsm_config = HsmConfig {
        login_deadline_ms: config.login_deadline_secs * 1000,
        heartbeat_ms: config.heartbeat_ms,
        quorum_freshness_ms: defaults.quorum_freshness_ms.max(3 * config.heartbeat_ms),
        member_silence_ms: defaults.member_silence_ms.max(4 * config.heartbeat_ms),
        ..defaults
    };
    let hsm = FleetHsm::start(platform, &config.dc, hsm_config, transport.clone())
        .await
        .context("cannot start the HSM")?;
    let verifier =
        Arc::new(TokenVerifier::new(&config.auth).context("invalid account-token configuration")?);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(dc = %config.dc, listen = %config.listen, "node serving");

    let server = tonic::transport::Server::builder()
        .add_service(
            VaultServer::new(NodeVault::new(hsm.clone(), verifier))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            PeerServer::new(NodePeer::new(hsm.clone()))
                .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES),
        )
        .add_service(AdminServer::new(NodeAdmin::new(hsm.clone())))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        );

    let keeper = tokio::spawn(keep_membership(hsm.clone(), config, transport));
    let served = server.await;
    keeper.abort();
    hsm.shutdown().await;
    served.context("the node server failed")
}

/// Whether any reachable peer already belongs to a fleet.
async fn any_peer_has_fleet(config: &NodeConfig) -> bool {
    for peer in &config.peers {
        let Ok(channel) = transport::channel(&peer.url) else {
            continue;
        };
        let mut admin = AdminClient::new(channel);
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            admin.node_status(NodeStatusRequest {}),
        )
        .await;
        if let Ok(Ok(status)) = answer {
            if !status.into_inner().fleet_key.is_empty() {
                return true;
            }
        }
    }
    false
}

/// Founds the fleet (founder, when no peer has one) or asks to join it, until this HSM votes.
async fn keep_membership(hsm: Arc<FleetHsm>, config: NodeConfig, transport: Arc<GrpcTransport>) {
    let mut leader_hint: Option<String> = None;
    loop {
        if hsm.is_voter() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if hsm.fleet_key().is_none() && config.founder && !any_peer_has_fleet(&config).await {
            match hsm.found(config.max_attempts).await {
                Ok(key) => tracing::info!(fleet_key = %hex::encode(key), "founded a new fleet"),
                Err(e) => tracing::warn!(error = %e, "cannot found the fleet"),
            }
            continue;
        }
        let mut order: Vec<String> = leader_hint.iter().cloned().collect();
        order.extend(
            config
                .peers
                .iter()
                .map(|p| p.dc.clone())
                .filter(|dc| Some(dc) != leader_hint.as_ref()),
        );
        let mut joined = false;
        for dc in order {
            let Some(mut client) = transport.client(&dc) else {
                continue;
            };
            let request = PeerMessage {
                sealed: hsm.join_request(),
            };
            match client.join(request).await {
                Ok(answer) => match hsm.accept_join_answer(&answer.into_inner().sealed) {
                    Ok(()) => {
                        tracing::info!(leader = %dc, "admitted to the fleet; catching up");
                        leader_hint = Some(dc);
                        joined = true;
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, leader = %dc, "join answer refused"),
                },
                Err(status) => {
                    let detail = bkv_core::error_detail(&status);
                    match detail {
                        Some(d)
                            if d.reason == Reason::NotLeader as i32 && !d.leader_dc.is_empty() =>
                        {
                            leader_hint = Some(d.leader_dc);
                        }
                        _ => {
                            tracing::debug!(peer = %dc, error = %status.message(), "join not possible here")
                        }
                    }
                }
            }
        }
        // Give the leader time to add us before asking again.
        let pause = if joined { 3000 } else { 500 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}
