//! Accepts Cloud Connector tunnels: TLS with a required client certificate, whose URI SAN names
//! the subaccount and location id; then HTTP/2 with the proxy as the client.

use std::sync::Arc;
use std::time::Duration;

use ferry_core::Shutdown;
use ferry_core::body::BoxBody;
use ferry_proto::tunnel::*;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::registry::Registry;

pub(crate) async fn serve(
    stream: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    registry: Arc<Registry>,
    heartbeat: Duration,
    handshake_timeout: Duration,
    shutdown: Shutdown,
) {
    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "tunnel TLS handshake refused");
            return;
        }
        Err(_) => {
            tracing::info!("tunnel TLS handshake timed out");
            return;
        }
    };
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|c| ferry_core::tls::connector_identity(c));
    let Some((subaccount, location)) = identity else {
        tracing::warn!("tunnel refused: the client certificate does not identify a Cloud Connector");
        return;
    };
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buf_size(SEND_BUFFER)
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(heartbeat)
        .keep_alive_timeout(heartbeat)
        .keep_alive_while_idle(true);
    let (sender, conn) = match builder.handshake::<_, BoxBody>(TokioIo::new(tls)).await {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(%subaccount, location = %location, error = %e, "tunnel HTTP/2 handshake failed");
            return;
        }
    };
    let key = (subaccount.clone(), location.clone());
    let id = registry.add(key.clone(), sender);
    let _connected = ferry_core::metrics::GaugeGuard::new(ferry_core::metrics::global().gauge(
        "ferry_tunnels_connected",
        "Cloud Connector tunnel connections currently up at this proxy.",
        &[],
    ));
    tracing::info!(%subaccount, location = %location, "Cloud Connector connected");
    tokio::select! {
        r = conn => if let Err(e) = r { tracing::info!(error = %e, "tunnel connection ended") },
        _ = shutdown.cancelled() => {}
    }
    registry.remove(&key, id);
    tracing::info!(%subaccount, location = %location, "Cloud Connector disconnected");
}
