//! Process plumbing shared by the binaries: shutdown on SIGTERM/SIGINT and a small HTTP
//! server for health and metrics endpoints.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A listen address that could not be bound, with the settings that chose it.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} (change {settings})")]
pub struct BindError {
    pub addr: SocketAddr,
    pub settings: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr`, chosen by the environment variables `settings` (named in the error).
pub async fn bind(addr: SocketAddr, settings: &'static str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError { addr, settings, source })
}

/// Cancels `cancel` on SIGTERM or SIGINT.
pub fn cancel_on_signal(cancel: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        tracing::info!("shutdown signal received");
        cancel.cancel();
    });
}

/// Serves `router` on a bound listener until `cancel` fires, with client addresses.
pub async fn serve_on(listener: TcpListener, router: axum::Router, cancel: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}
