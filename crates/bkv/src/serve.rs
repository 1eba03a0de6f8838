//! `bkv node` and `bkv frontend`: the two long-running processes of a fleet.

use crate::fleet::write_client_config;
use crate::Failure;
use anyhow::Context;
use bkv_client::ClientConfig;
use bkv_frontend::{FleetRouter, FrontendConfig};
use bkv_node::NodeConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Completes when standard input closes: the parent `bkv up` is gone.
async fn parent_gone() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Completes on Ctrl-C or SIGTERM, or also when the parent is gone if `exit_with_parent`.
pub async fn stop_signal(exit_with_parent: bool) {
    if exit_with_parent {
        tokio::select! {
            _ = shutdown_signal() => {},
            _ = parent_gone() => {},
        }
    } else {
        shutdown_signal().await
    }
}

/// Runs one fleet node until interrupted.
pub async fn node(config: PathBuf, exit_with_parent: bool) -> Result<(), Failure> {
    let config = NodeConfig::load(&config).map_err(anyhow::Error::new)?;
    eprintln!("bkv node {}: software HSM, for development only", config.dc);
    bkv_node::run(config, stop_signal(exit_with_parent)).await?;
    Ok(())
}

/// Pins the fleet key into a client config that has none, once the fleet reports one.
async fn pin_when_founded(router: Arc<FleetRouter>, client_path: PathBuf) {
    loop {
        let status = router.fleet_status().await;
        if !status.fleet_key.is_empty() {
            match pin_fleet_key(&client_path, &status.fleet_key) {
                Ok(true) => {
                    tracing::info!(fleet_key = %status.fleet_key, path = %client_path.display(), "pinned the fleet key")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot pin the fleet key"),
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Writes `fleet_key` into the client config at `path` if it pins none yet.
pub fn pin_fleet_key(path: &Path, fleet_key: &str) -> anyhow::Result<bool> {
    let mut config = ClientConfig::load(path)?;
    // Over-the-air clients trust the bundle, not a pinned key.
    if !config.fleet_key.trim().is_empty() || config.over_the_air.is_some() {
        return Ok(false);
    }
    config.fleet_key = fleet_key.to_string();
    write_client_config(path, &config)?;
    Ok(true)
}

/// Runs the frontend until interrupted.
pub async fn frontend(config: PathBuf) -> Result<(), Failure> {
    let config = FrontendConfig::load(&config).map_err(anyhow::Error::msg)?;
    let router = Arc::new(bkv_frontend::router_from_config(&config).map_err(anyhow::Error::msg)?);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    if let Some(client) = config.client_config.clone() {
        tokio::spawn(pin_when_founded(router.clone(), client));
    }
    println!(
        "ready http://{}",
        listener.local_addr().context("listening address")?
    );
    serve_router(listener, router, shutdown_signal()).await
}

/// Serves `router` on `listener` until `shutdown`.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Arc<FleetRouter>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Failure> {
    bkv_frontend::serve(listener, router, shutdown)
        .await
        .context("the frontend failed")?;
    Ok(())
}
