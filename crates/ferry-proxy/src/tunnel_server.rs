//! Accepts Cloud Connector tunnels: TLS with a required client certificate, whose URI SAN names
//! the subaccount and location id; then HTTP/2 with the proxy as the client.

use std::sync::Arc;
use std::time::Duration;

use ferry_core::Shutdown;
use ferry_core::body::BoxBody;
use ferry_proto::tunnel::*;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::registry::{Fenced, Registry};
use hyper::client::conn::http2::SendRequest;

pub(crate) async fn serve(
    stream: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    registry: Arc<Registry>,
    channels: Arc<crate::channels::ChannelTargets>,
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
    if tls.get_ref().1.alpn_protocol() == Some(CHANNEL_ALPN) {
        let connect_timeout = handshake_timeout;
        crate::channels::serve(tls, subaccount, location, channels, heartbeat, connect_timeout, shutdown).await;
        return;
    }
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
    let (mut sender, conn) = match builder.handshake::<_, BoxBody>(TokioIo::new(tls)).await {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(%subaccount, location = %location, error = %e, "tunnel HTTP/2 handshake failed");
            return;
        }
    };
    let key = (subaccount.clone(), location.clone());
    tokio::pin!(conn);
    // The hello needs the connection driven while it waits for the answer.
    let fence = tokio::select! {
        r = &mut conn => {
            tracing::info!(%subaccount, location = %location, result = ?r.err(), "tunnel closed before its hello");
            return;
        }
        r = tokio::time::timeout(handshake_timeout, hello(&mut sender, registry.fence(&key))) => match r {
            Ok(Some(f)) => f,
            Ok(None) => {
                tracing::warn!(%subaccount, location = %location, "tunnel refused: no valid answer to the hello");
                return;
            }
            Err(_) => {
                tracing::warn!(%subaccount, location = %location, "tunnel refused: the hello timed out");
                return;
            }
        },
        _ = shutdown.cancelled() => return,
    };
    let (id, close) = match registry.add(key.clone(), fence.clone(), sender) {
        Ok(admitted) => admitted,
        Err(Fenced(newer)) => {
            tracing::warn!(
                %subaccount, location = %location, epoch = fence.epoch, serving_epoch = newer.epoch,
                "tunnel refused: another instance of this connector took over with a higher HA epoch"
            );
            return;
        }
    };
    let _connected = ferry_core::metrics::GaugeGuard::new(ferry_core::metrics::global().gauge(
        "ferry_tunnels_connected",
        "Cloud Connector tunnel connections currently up at this proxy.",
        &[],
    ));
    tracing::info!(%subaccount, location = %location, epoch = fence.epoch, "Cloud Connector connected");
    tokio::select! {
        r = conn => if let Err(e) = r { tracing::info!(error = %e, "tunnel connection ended") },
        _ = close.cancelled() => {
            tracing::warn!(%subaccount, location = %location, epoch = fence.epoch, "tunnel closed: a connector with a higher HA epoch took over");
        }
        _ = shutdown.cancelled() => {}
    }
    registry.remove(&key, id);
    tracing::info!(%subaccount, location = %location, "Cloud Connector disconnected");
}

/// Sends the `hello` stream with the highest fence known here; returns the connector's fence.
async fn hello(sender: &mut SendRequest<BoxBody>, known: Fence) -> Option<Fence> {
    let req = http::Request::builder()
        .method(http::Method::GET)
        .uri("/")
        .header(KIND, KIND_HELLO)
        .header(FENCE, known.to_header())
        .body(ferry_core::body::empty())
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    match resp.headers().get(FENCE) {
        None => Some(Fence::default()),
        Some(v) => Fence::parse(v.to_str().ok()?),
    }
}
