//! The SOCKS5 proxy (SAP's port 20004) with SAP's authentication method 0x80 (JWT + location
//! id). After CONNECT, bytes are relayed through a `tcp` tunnel stream.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use ferry_core::Shutdown;
use ferry_core::body;
use ferry_proto::socks5::{self, Address, ConnectRequest, Greeting, Parsed, Reply, SapAuth};
use ferry_proto::tunnel;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::Shared;
use crate::retry::OpenError;

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("client closed the connection during the handshake")]
    Closed,
    #[error("{0}")]
    Protocol(#[from] socks5::Socks5Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads until `parse` yields a message; leaves unconsumed bytes in `buf`.
async fn read_msg<T>(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    parse: fn(&[u8]) -> Parsed<T>,
) -> Result<T, HandshakeError> {
    loop {
        if let Some((msg, used)) = parse(buf)? {
            let _ = buf.split_to(used);
            return Ok(msg);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Closed);
        }
    }
}

/// How a client authenticated.
enum Auth {
    Sap(SapAuth),
    /// Method 0x00 on the benchmark-only no-auth listener.
    None,
}

async fn handshake(stream: &mut TcpStream, buf: &mut BytesMut, no_auth: bool) -> Result<Option<Auth>, HandshakeError> {
    let greeting = read_msg(stream, buf, Greeting::parse).await?;
    let Some(method) = socks5::choose_method(&greeting) else {
        if no_auth && greeting.offers(socks5::METHOD_NO_AUTH) {
            stream.write_all(&socks5::encode_method_selection(socks5::METHOD_NO_AUTH)).await?;
            return Ok(Some(Auth::None));
        }
        // 0xFF: no acceptable method. SAP's proxy only speaks 0x80; accepting 0x00 would mean
        // no authentication at all.
        stream.write_all(&socks5::encode_method_selection(socks5::METHOD_NO_ACCEPTABLE)).await?;
        return Ok(None);
    };
    stream.write_all(&socks5::encode_method_selection(method)).await?;
    match read_msg(stream, buf, SapAuth::parse).await {
        Ok(a) => Ok(Some(Auth::Sap(a))),
        Err(e) => {
            let _ = stream.write_all(&socks5::encode_auth_reply(false)).await;
            Err(e)
        }
    }
}

/// The proxy's shutdown as a SOCKS5 stream sees it.
pub(crate) struct Drain {
    pub shutdown: Shutdown,
    pub timeout: Duration,
}

/// While draining, a stream that moved no byte for this long is idle and closed.
pub const IDLE_TICK: Duration = Duration::from_millis(500);

/// The fixed identity of the no-auth listener: claims and location id.
pub(crate) type NoAuth = Arc<(Arc<ferry_auth::Claims>, String)>;

pub(crate) async fn serve(
    stream: TcpStream,
    shared: Arc<Shared>,
    handshake_timeout: Duration,
    no_auth: Option<NoAuth>,
    drain: Drain,
    over_cap: Option<usize>,
) {
    // Boxed: the handshake's state (a token check may fetch signing keys) is freed once it is
    // done, instead of sizing the task that then relays for as long as the connection lives.
    let opened = Box::pin(open(stream, &shared, handshake_timeout, no_auth, over_cap)).await;
    let Some(opened) = opened else { return };
    // Boxed too: the tunnel stream's opening (request, response, reply) is done before the
    // relay starts; inline, its locals stayed in the task for the connection's life (1.8 KiB).
    let Some(relaying) = Box::pin(connect(opened, shared)).await else { return };
    relay(relaying, drain).await;
}

/// A SOCKS5 connection whose tunnel stream is open and whose client got its reply: what the
/// relay keeps for the connection's life.
struct Relaying {
    /// The backend's bytes.
    downstream: hyper::body::Incoming,
    write: Active<tokio::net::tcp::OwnedWriteHalf>,
    active: Arc<AtomicBool>,
    client_spoke: Arc<AtomicBool>,
    /// Ends the upstream half (read by hyper's send task) when a drain closes the stream.
    stop: Shutdown,
    replied: tokio::time::Instant,
    request_id: String,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// A connection past its handshake and CONNECT request.
struct Opened {
    stream: TcpStream,
    /// Bytes the client sent after its CONNECT request.
    leftover: BytesMut,
    claims: Arc<ferry_auth::Claims>,
    target: String,
    location: String,
}

/// The SOCKS5 handshake, authentication and CONNECT request; `None` once the client has been
/// answered with a refusal.
async fn open(
    mut stream: TcpStream,
    shared: &Shared,
    handshake_timeout: Duration,
    no_auth: Option<NoAuth>,
    over_cap: Option<usize>,
) -> Option<Opened> {
    let mut buf = BytesMut::with_capacity(2048);
    let hs = handshake(&mut stream, &mut buf, no_auth.is_some());
    let auth = match tokio::time::timeout(handshake_timeout, hs).await {
        Ok(Ok(Some(a))) => a,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "SOCKS5 handshake refused");
            return None;
        }
        Err(_) => {
            tracing::info!("SOCKS5 handshake timed out");
            return None;
        }
    };
    let (claims, location) = match (auth, no_auth) {
        (Auth::Sap(auth), _) => {
            let claims = match shared.verifier.verify(&auth.token).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(error = %e, "SOCKS5 authentication failed");
                    let _ = stream.write_all(&socks5::encode_auth_reply(false)).await;
                    return None;
                }
            };
            if stream.write_all(&socks5::encode_auth_reply(true)).await.is_err() {
                return None;
            }
            (claims, auth.location_id.unwrap_or_default())
        }
        (Auth::None, Some(route)) => (route.0.clone(), route.1.clone()),
        // `handshake` chooses 0x00 only when a route exists.
        (Auth::None, None) => return None,
    };
    let read = tokio::time::timeout(handshake_timeout, read_msg(&mut stream, &mut buf, ConnectRequest::parse)).await;
    let request = match read {
        Ok(Ok(r)) => r,
        Ok(Err(HandshakeError::Protocol(e))) => {
            tracing::info!(error = %e, "SOCKS5 request refused");
            let _ = stream.write_all(&count_reply(e.reply_code())).await;
            return None;
        }
        Ok(Err(_)) | Err(_) => return None,
    };
    if !request.is_connect() {
        let _ = stream.write_all(&count_reply(Reply::CommandNotSupported)).await;
        return None;
    }
    if let Some(max) = over_cap {
        // The client's address holds `max` connections already: refused in SOCKS5's own terms,
        // after the handshake, so the client sees a reply rather than a bare close.
        tracing::info!(max, "SOCKS5 client over its connection cap; reply 02");
        let _ = stream.write_all(&count_reply(Reply::NotAllowed)).await;
        return None;
    }
    let target = match &request.address {
        Address::Ipv6(_) => format!("[{}]:{}", request.address, request.port),
        a => format!("{}:{}", a, request.port),
    };
    Some(Opened { stream, leftover: buf, claims, target, location })
}

/// Opens the tunnel stream for a CONNECT and answers the client; `None` once it has been
/// answered with a refusal.
async fn connect(opened: Opened, shared: Arc<Shared>) -> Option<Relaying> {
    let Opened { stream, leftover, claims, target, location } = opened;
    // Held while the connection is relayed.
    let Some(permit) = shared.tenant_streams.try_acquire(&claims.zid) else {
        tracing::info!(subaccount = %claims.zid, limit = shared.tenant_streams.limit(), "SOCKS5: subaccount at its stream limit");
        let mut stream = stream;
        let _ = stream.write_all(&count_reply(Reply::GeneralFailure)).await;
        return None;
    };
    let (read, write) = stream.into_split();
    let active = Arc::new(AtomicBool::new(false));
    let mut write = Active { inner: write, flag: active.clone() };
    // Closing a drained stream must also end its upstream half, which hyper's send task reads:
    // an aborted read resets the tunnel stream, so the connector lets go of it too.
    let stop = Shutdown::new();
    let client_spoke = Arc::new(AtomicBool::new(!leftover.is_empty()));
    let read = Stoppable {
        inner: Active { inner: NoticeData { inner: read, seen: client_spoke.clone() }, flag: active.clone() },
        stop: Box::pin(stop.clone().cancelled_owned()),
    };
    let upstream = std::io::Cursor::new(leftover.to_vec()).chain(read);
    // The handshake buffer would otherwise live as long as the connection.
    drop(leftover);
    let mut req = Request::new(body::from_reader(upstream));
    *req.method_mut() = http::Method::POST;
    *req.version_mut() = http::Version::HTTP_2;
    *req.uri_mut() = match format!("http://{target}/").parse() {
        Ok(u) => u,
        Err(_) => http::Uri::from_static("http://invalid/"),
    };
    let request_id = crate::stamp_tunnel_headers(req.headers_mut(), tunnel::KIND_TCP, &target, &claims, None);
    let resp = match shared.open_stream(&claims.zid, &location, req, &request_id).await {
        Ok(r) => r,
        Err(OpenError::NoTunnel) => {
            tracing::info!(subaccount = %claims.zid, %location, "SOCKS5: no Cloud Connector connected");
            let _ = write.write_all(&count_reply(Reply::NetworkUnreachable)).await;
            return None;
        }
        Err(OpenError::Failed(e)) => {
            tracing::warn!(%request_id, error = %e, "SOCKS5: tunnel request failed");
            let _ = write.write_all(&count_reply(Reply::GeneralFailure)).await;
            return None;
        }
    };
    let reply = match (resp.status(), resp.headers().get(&tunnel::names::ERROR).and_then(|v| v.to_str().ok())) {
        (StatusCode::OK, None) => Reply::Succeeded,
        (_, Some(tunnel::ERROR_DENIED)) => Reply::NotAllowed,
        (_, Some(tunnel::ERROR_UNREACHABLE)) | (_, Some(tunnel::ERROR_TIMEOUT)) => Reply::HostUnreachable,
        _ => Reply::GeneralFailure,
    };
    if reply != Reply::Succeeded {
        tracing::info!(%request_id, %target, reply = format_args!("{:#04x}", reply.code()), "SOCKS5 CONNECT refused");
    }
    if write.write_all(&count_reply(reply)).await.is_err() || reply != Reply::Succeeded {
        return None;
    }
    Some(Relaying {
        downstream: resp.into_body(),
        write,
        active,
        client_spoke,
        stop,
        replied: tokio::time::Instant::now(),
        request_id,
        _permit: permit,
    })
}

/// Relays the backend's bytes to the client until either side ends or a drain closes it (the
/// client's bytes flow in hyper's send task).
async fn relay(relaying: Relaying, drain: Drain) {
    let Relaying { downstream, mut write, active, client_spoke, stop, replied, request_id, _permit } = relaying;
    let pump = async move {
        let mut downstream = downstream;
        // The `socks` npm package (used by SAP's mail-client through nodemailer) drops bytes that
        // arrive in the same read as the CONNECT reply: it re-emits them before nodemailer listens,
        // so an SMTP greeting sent at once by the backend would be lost ("Greeting never received").
        // A server-first protocol's first bytes therefore go out no sooner than a short gap after the
        // reply. Client-first protocols (the client sent bytes before the backend's first answer)
        // never wait: their client has read the reply already, and a wait would cap a
        // connection-per-request client at 40 connections per second.
        let first = downstream.frame().await;
        if first.is_some() && !client_spoke.load(Ordering::Acquire) {
            tokio::time::sleep_until(replied + FIRST_DATA_GAP).await;
        }
        if let Some(frame) = first
            && let Ok(data) = frame?.into_data()
        {
            write.write_all(&data).await?;
        }
        body::copy_to_writer(downstream, write).await
    };
    tokio::pin!(pump);
    let ended = tokio::select! {
        r = &mut pump => Some(r),
        // Boxed: only a shutdown gets here, and every idle connection's task would carry its size.
        _ = drain.shutdown.cancelled() => Box::pin(drain_stream(pump.as_mut(), &active, drain.timeout)).await,
    };
    match ended {
        Some(Err(e)) => tracing::debug!(%request_id, error = %e, "SOCKS5 relay ended"),
        Some(Ok(_)) => {}
        None => {
            stop.cancel();
            tracing::info!(%request_id, "SOCKS5 stream closed by the proxy's shutdown");
        }
    }
}

/// Lets a stream run on during shutdown while bytes flow, up to `timeout`; `None` when it is
/// to be closed (idle for a tick, or the deadline passed).
pub(crate) async fn drain_stream<F: std::future::Future>(
    mut pump: Pin<&mut F>,
    active: &AtomicBool,
    timeout: Duration,
) -> Option<F::Output> {
    let deadline = tokio::time::Instant::now() + timeout;
    active.store(false, Ordering::Relaxed);
    loop {
        let tick = (tokio::time::Instant::now() + IDLE_TICK).min(deadline);
        tokio::select! {
            r = pump.as_mut() => return Some(r),
            _ = tokio::time::sleep_until(tick) => {
                if tick >= deadline || !active.swap(false, Ordering::Relaxed) {
                    return None;
                }
            }
        }
    }
}

/// A reader that fails with `ConnectionAborted` once `stop` fires, even while a read is pending.
pub(crate) struct Stoppable<R> {
    pub(crate) inner: R,
    pub(crate) stop: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Stoppable<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "stream closed by the proxy's shutdown",
            )));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// Marks `flag` whenever bytes pass, so a drain tells an idle stream from a busy one.
pub(crate) struct Active<T> {
    pub(crate) inner: T,
    pub(crate) flag: Arc<AtomicBool>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.flag.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.flag.store(true, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Notes in `seen` that the client sent at least one byte.
struct NoticeData<R> {
    inner: R,
    seen: Arc<AtomicBool>,
}

impl<R: AsyncRead + Unpin> AsyncRead for NoticeData<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.seen.store(true, Ordering::Release);
        }
        r
    }
}

/// See the comment at its use in [`relay`].
const FIRST_DATA_GAP: Duration = Duration::from_millis(25);

/// Encodes a SOCKS5 reply and counts it.
fn count_reply(code: Reply) -> [u8; 10] {
    let label = format!("{:02x}", u8::from(code));
    ferry_core::metrics::global()
        .counter(
            "ferry_proxy_requests_total",
            "Requests answered by the Connectivity Proxy, by protocol and status or SOCKS5 reply.",
            &[("protocol", "socks5"), ("code", &label)],
        )
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    socks5::encode_reply(code)
}

#[cfg(test)]
mod tests {
    fn size_of_output<A, B, C, D, E, G, F>(_: fn(A, B, C, D, E, G) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A SOCKS5 connection's task keeps this future for the connection's life (1,000 idle
    /// connections: 1,000 of them). The handshake and the stream opening (`connect`) are boxed
    /// and freed once done; inline they made it 2.4 KiB, then 2.0 KiB with the handshake boxed
    /// (debug build; 1,288 bytes with both boxed).
    #[test]
    fn connection_task_stays_small() {
        let size = size_of_output(super::serve);
        eprintln!("socks::serve future: {size} bytes");
        assert!(size <= 1408, "the SOCKS5 connection future grew to {size} bytes");
    }
}
