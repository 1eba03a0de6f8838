//! The untrusted client-facing frontend of bkv.
//!
//! It authenticates accounts (JWT account tokens), relays OPAQUE messages to the HSM,
//! and maps outcomes to gRPC statuses. It is trusted for liveness and for account
//! authentication only: it holds no vault secret and can read none of the bytes it
//! relays. Not here: anything that decides a guess or releases a key (that is `bkv-hsm`).
#![forbid(unsafe_code)]

pub mod auth;
pub mod service;

pub use auth::{AuthConfig, TokenKey, TokenVerifier};
pub use service::VaultService;

use bkv_core::v1::vault_server::VaultServer;
use bkv_core::MAX_MESSAGE_BYTES;
use bkv_hsm::Platform;
use std::future::Future;
use tokio::net::TcpListener;

/// Serves the vault on `listener` until `shutdown` completes.
pub async fn serve<P: Platform>(
    listener: TcpListener,
    service: VaultService<P>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let server = VaultServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(64)
        .add_service(server)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}
