//! Accepts Cloud Connector tunnels: TLS with a required client certificate, whose URI SAN names
//! the subaccount and location id; then HTTP/2 with the proxy as the client.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use ferry_core::Shutdown;
use ferry_core::body::BoxBody;
use ferry_proto::tunnel::*;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::registry::{Fenced, Registry};
use hyper::client::conn::http2::SendRequest;

pub(crate) async fn serve(
    stream: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    registry: Arc<Registry>,
    channels: crate::channels::Channels,
    heartbeat: Duration,
    handshake_timeout: Duration,
    shutdown: Shutdown,
) {
    let stream = tokio::io::BufReader::with_capacity(ferry_proto::tunnel::READ_BUFFER, stream);
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
        let limits = crate::channels::Limits { heartbeat, connect_timeout };
        crate::channels::serve(tls, subaccount, location, channels, limits, shutdown).await;
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
    let goaway = Arc::new(Goaway::default());
    // Boxed: hyper spawns every request body's pipe as the same future type as the connection
    // task, so each is sized like the connection, TLS state included (2.8 KiB per open
    // SOCKS5 stream with the TLS stream inline).
    let io = Box::new(GoawayWatch { io: tls, scan: FrameScan::default(), seen: goaway.clone() });
    let (mut sender, conn) = match builder.handshake::<_, BoxBody>(TokioIo::new(io)).await {
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
    let mut draining = false;
    loop {
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r { tracing::info!(error = %e, "tunnel connection ended") }
                // A GOAWAY and the end it announced can be noticed in the same turn: the key
                // must still learn that a successor is likely (see `Registry::drained_lately`).
                if !draining && goaway.seen.load(Ordering::Acquire) {
                    registry.mark_draining(&subaccount, &location, id);
                }
                break;
            }
            _ = close.cancelled() => {
                tracing::warn!(%subaccount, location = %location, epoch = fence.epoch, "tunnel closed: a connector with a higher HA epoch took over");
                break;
            }
            _ = shutdown.cancelled() => break,
            _ = goaway.notify.notified(), if !draining => {
                // New streams go to the connector's next tunnel from now on; open ones finish here.
                draining = true;
                registry.mark_draining(&subaccount, &location, id);
                tracing::info!(%subaccount, location = %location, "tunnel draining: the Cloud Connector sent GOAWAY");
            }
        }
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

/// The tunnel connection as the proxy reads it, watched for the connector's GOAWAY: hyper does
/// not report one until a request fails on it, and by then that request has lost its turn. Only
/// frame headers are looked at; payloads are skipped by length.
struct GoawayWatch<T> {
    io: T,
    scan: FrameScan,
    seen: Arc<Goaway>,
}

#[derive(Default)]
struct Goaway {
    seen: AtomicBool,
    notify: Notify,
}

/// Where the reader is in the connector's HTTP/2 frame sequence (a server sends no preface).
#[derive(Default)]
struct FrameScan {
    header: [u8; 9],
    have: usize,
    skip: usize,
}

const FRAME_GOAWAY: u8 = 0x7;

impl FrameScan {
    /// Consumes the next bytes of the stream; true if they complete a GOAWAY frame header.
    fn feed(&mut self, mut data: &[u8]) -> bool {
        let mut goaway = false;
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (9 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 9 {
                let h = self.header;
                self.skip = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                goaway |= h[3] == FRAME_GOAWAY;
                self.have = 0;
            }
        }
        goaway
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GoawayWatch<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && self.scan.feed(&buf.filled()[before..]) {
            self.seen.seen.store(true, Ordering::Release);
            self.seen.notify.notify_one();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GoawayWatch<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: usize) -> Vec<u8> {
        let len = (payload as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, 0, 0, 0, 0, 1];
        f.resize(9 + payload, kind);
        f
    }

    #[test]
    fn a_goaway_is_found_between_frames_split_anywhere() {
        // SETTINGS, DATA whose payload holds GOAWAY-like bytes, PING, then GOAWAY.
        let mut data = frame(0x0, 40);
        data[9..].fill(FRAME_GOAWAY);
        let mut stream = frame(0x4, 12);
        stream.extend(data);
        stream.extend(frame(0x6, 8));
        let before_goaway = stream.len();
        stream.extend(frame(FRAME_GOAWAY, 8));
        for chunk in [1, 2, 5, 9, 10, 64, stream.len()] {
            let mut scan = FrameScan::default();
            let mut found_at = None;
            for (i, c) in stream.chunks(chunk).enumerate() {
                if scan.feed(c) {
                    found_at.get_or_insert(i * chunk + c.len());
                }
            }
            let at = found_at.unwrap_or_else(|| panic!("no GOAWAY found with chunks of {chunk}"));
            assert!(at >= before_goaway + 9, "found before the GOAWAY header was complete (chunks of {chunk})");
        }
    }
}
