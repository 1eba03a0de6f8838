//! The untrusted client-facing frontend of bkv.
//!
//! It authenticates accounts (JWT account tokens), finds the fleet's leader and relays
//! OPAQUE messages to it, retrying across members until a deadline. It is trusted for
//! liveness and account authentication only: it holds no vault secret and can read none
//! of the bytes it relays. Not here: anything that decides a guess or releases a key.
#![forbid(unsafe_code)]

pub mod config;
pub mod ratelimit;
pub mod router;

pub use bkv_core::auth::{AuthConfig, TokenKey, TokenVerifier};
pub use config::{FrontendConfig, NodeAddress, PreviousFleet};
pub use ratelimit::RateLimit;
pub use router::{FleetRouter, RouterConfig};

use bkv_core::v1::vault_server::VaultServer;
use bkv_core::MAX_MESSAGE_BYTES;
use std::future::Future;
use tokio::net::TcpListener;

/// Builds the router `config` describes: token checks, the fleet, older fleets, bundle.
pub fn router_from_config(config: &FrontendConfig) -> Result<FleetRouter, String> {
    let verifier = std::sync::Arc::new(
        TokenVerifier::new(&config.auth)
            .map_err(|e| format!("invalid account-token configuration: {e}"))?,
    );
    let routing = RouterConfig {
        wan: config.wan_profile()?,
        ..RouterConfig::default()
    };
    let previous = config
        .previous_fleets
        .iter()
        .map(|fleet| {
            let pairs: Vec<_> = fleet
                .nodes
                .iter()
                .map(|n| (n.dc.clone(), n.url.clone()))
                .collect();
            FleetRouter::new(&pairs, verifier.clone(), routing).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut router = FleetRouter::new(&config.node_pairs(), verifier, routing)
        .map_err(|e| e.to_string())?
        .with_previous(previous)
        .with_rate_limit(config.rate_limit);
    if let Some(bundle) = &config.bundle {
        router = router.with_bundle(bundle.clone());
    }
    Ok(router)
}

/// Serves the client-facing vault on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    router: std::sync::Arc<FleetRouter>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let server = VaultServer::from_arc(router)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES + bkv_core::bundle::MAX_BUNDLE_BYTES);
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(64)
        .add_service(server)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}
