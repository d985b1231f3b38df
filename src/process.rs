//! Process plumbing shared by the binaries: shutdown on SIGTERM/SIGINT and a small HTTP
//! server for health and metrics endpoints.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

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

/// Serves `router` on `addr` until `cancel` fires.
pub async fn serve(addr: SocketAddr, router: axum::Router, cancel: CancellationToken) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(listener, router, cancel).await
}

/// Serves `router` on a bound listener until `cancel` fires, with client addresses.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}
