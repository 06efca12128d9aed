//! The one accept loop, and HTTP serving on top of it.
//!
//! Every listener in Ferry goes through [`accept_loop`]: it caps concurrent connections (a
//! full server stops accepting instead of failing late), sets `TCP_NODELAY` (Nagle plus
//! delayed ACKs cost 40 ms per exchange), backs off on accept errors such as `EMFILE`, runs each
//! connection in its own tracing span, and on shutdown stops accepting and waits for the
//! running connections to finish (each handler sees the same shutdown token and drains).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::response::IntoResponse as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::Shutdown;

#[derive(Clone, Debug)]
pub struct AcceptOptions {
    /// Name used in log spans (`token-service`, `http-proxy`, …).
    pub name: &'static str,
    pub max_connections: usize,
    /// Connections one client address may hold open at once; 0 = no cap. One more is handed
    /// to the listener's refusal (see [`accept_loop_with_refusal`]) instead of its handler, so
    /// a single client cannot take every slot of `max_connections`.
    pub max_per_client: usize,
    /// Time allowed for a TLS handshake or protocol greeting.
    pub handshake_timeout: Duration,
    /// How long shutdown waits for open connections before giving up on them.
    pub drain_timeout: Duration,
}

impl AcceptOptions {
    pub fn named(name: &'static str) -> Self {
        Self {
            name,
            max_connections: 10_000,
            max_per_client: 0,
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Accepts connections until `shutdown` fires, then drains. A client over
/// [`AcceptOptions::max_per_client`] is closed at once.
pub async fn accept_loop<F, Fut>(listener: TcpListener, opts: AcceptOptions, shutdown: Shutdown, handler: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    accept_loop_with_refusal(listener, opts, shutdown, handler, |stream, _| async move { drop(stream) }).await
}

/// Open connections per client address, for [`AcceptOptions::max_per_client`].
#[derive(Default)]
struct PerClient(std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>);

/// One connection's place in [`PerClient`]; gives it back when dropped.
struct ClientSlot {
    table: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    /// Takes a slot for `ip`, or `None` when it already holds `max`.
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut t = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = t.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot { table: self.clone(), ip })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut t = self.table.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = t.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.ip);
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection's future and what it holds until it ends (open-connection gauge, per-client
    /// slot, listener permit; dropped after `fut`, in that order). A struct, not an `async move`
    /// block: a block that owns `fut` and awaits it keeps `fut` twice in the task's state
    /// (rust-lang/rust#62958), which doubled every idle SOCKS5 connection's task (4.3 KiB for a
    /// 2.1 KiB future).
    struct Holding<F> {
        #[pin]
        fut: F,
        _held: (crate::metrics::GaugeGuard, Option<ClientSlot>, tokio::sync::OwnedSemaphorePermit),
    }
}

impl<F: Future<Output = ()>> Future for Holding<F> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.project().fut.poll(cx)
    }
}

/// [`accept_loop`], with `refuse` serving the connections of a client over
/// [`AcceptOptions::max_per_client`]: it should answer in the listener's protocol (HTTP 429,
/// a SOCKS5 reply) and close. Refused connections still count against `max_connections` while
/// `refuse` runs (it must be short: bound it by the handshake timeout).
pub async fn accept_loop_with_refusal<F, Fut, R, RFut>(
    listener: TcpListener,
    opts: AcceptOptions,
    shutdown: Shutdown,
    handler: F,
    refuse: R,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
    R: Fn(TcpStream, SocketAddr) -> RFut + Send + Sync + 'static,
    RFut: Future<Output = ()> + Send + 'static,
{
    let per_client = Arc::new(PerClient::default());
    let permits = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let reg = crate::metrics::global();
    let open =
        reg.gauge("ferry_open_connections", "Connections currently open, by listener.", &[("listener", opts.name)]);
    let accepted_total = reg.counter(
        "ferry_accepted_connections_total",
        "Connections accepted, by listener.",
        &[("listener", opts.name)],
    );
    let refused_total = reg.counter(
        "ferry_refused_connections_total",
        "Connections refused because their client address had max_per_client open, by listener.",
        &[("listener", opts.name)],
    );
    let tracker = TaskTracker::new();
    let mut backoff = Duration::from_millis(5);
    let local = listener.local_addr().ok();
    tracing::debug!(listener = opts.name, addr = ?local, "accepting");
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let _ = stream.set_nodelay(true);
                let span = tracing::info_span!("conn", listener = opts.name, %peer);
                let slot = match opts.max_per_client {
                    0 => None,
                    max => match per_client.take(peer.ip(), max) {
                        Some(slot) => Some(slot),
                        None => {
                            refused_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            span.in_scope(|| tracing::info!(max, "client over its connection cap; refused"));
                            let fut = refuse(stream, peer);
                            let limit = opts.handshake_timeout;
                            tracker.spawn(
                                async move {
                                    let _ = tokio::time::timeout(limit, fut).await;
                                    drop(permit);
                                }
                                .instrument(span),
                            );
                            continue;
                        }
                    },
                };
                let fut = handler(stream, peer);
                accepted_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let guard = crate::metrics::GaugeGuard::new(open.clone());
                tracker.spawn(Holding { fut, _held: (guard, slot, permit) }.instrument(span));
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: wait instead of spinning; connections in flight
                // will free descriptors.
                tracing::warn!(listener = opts.name, error = %e, "accept failed; backing off {:?}", backoff);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(opts.drain_timeout, tracker.wait()).await.is_err() {
        tracing::warn!(listener = opts.name, open = tracker.len(), "drain timed out; dropping open connections");
    }
}

/// Serves an axum router over HTTP/1.1, on plain TCP or, with `tls`, over rustls.
/// Connections finish their in-flight request on shutdown.
pub async fn serve_router(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    opts: AcceptOptions,
    shutdown: Shutdown,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let handshake_timeout = opts.handshake_timeout;
    let sd = shutdown.clone();
    let router = router.layer(axum::middleware::from_fn(limit_header_bytes));
    let max = opts.max_per_client;
    let too_many = axum::Router::new().fallback(move || async move { too_many_connections(max) });
    let serve = move |router: axum::Router| {
        let acceptor = acceptor.clone();
        let shutdown = sd.clone();
        move |stream: TcpStream, peer: SocketAddr| {
            let router = router.clone();
            let acceptor = acceptor.clone();
            let shutdown = shutdown.clone();
            async move {
                match acceptor {
                    Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_http1(tls, peer, router, shutdown).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    },
                    None => serve_http1(stream, peer, router, shutdown).await,
                }
            }
        }
    };
    let (handler, refuse) = (serve(router), serve(too_many));
    accept_loop_with_refusal(listener, opts, shutdown, handler, refuse).await
}

/// The answer to a request on a connection over [`AcceptOptions::max_per_client`]: 429, and the
/// connection closes after it.
pub fn too_many_connections(max: usize) -> axum::response::Response {
    let msg = format!(
        "Too many connections from your address: at most {max} may be open at once. Close idle connections or \
         reuse them (keep-alive), then retry.\n"
    );
    (http::StatusCode::TOO_MANY_REQUESTS, [(http::header::CONNECTION, "close"), (http::header::RETRY_AFTER, "1")], msg)
        .into_response()
}

/// Total size of a request's header names and values an HTTP service accepts. hyper's read
/// buffer cap only bites while a head is still incomplete, so a large head that arrives in one
/// read would pass; this is the cap that holds.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Answers 431 to a request whose headers exceed [`MAX_HEADER_BYTES`]; a middleware
/// (`axum::middleware::from_fn`) for routers served outside [`serve_router`].
pub async fn limit_header_bytes(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let size: usize = req.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    if size > MAX_HEADER_BYTES {
        let msg = format!("request headers are {size} bytes; the limit is {MAX_HEADER_BYTES}\n");
        return (http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, msg).into_response();
    }
    next.run(req).await
}

/// Serves one connection; handlers can read the peer as `Extension<ConnectInfo<SocketAddr>>`
/// (e.g. to limit failed logons per address).
async fn serve_http1<S>(io: S, peer: SocketAddr, router: axum::Router, shutdown: Shutdown)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let router = tower::ServiceExt::map_request(router, move |mut req: http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        req
    });
    let service = TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "connection ended with error") },
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        }
    }
}

/// Binds `addr`, turning the OS error into one that names the address.
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size_of_holding<F>(_: &F) -> usize {
        std::mem::size_of::<Holding<F>>()
    }

    /// Every open connection's task is a [`Holding`] of its handler's future: it adds the
    /// guards (a few words), not a second copy of the future.
    #[test]
    fn a_connection_task_holds_its_future_once() {
        let fut = async {
            let state = [7u8; 2048];
            tokio::task::yield_now().await;
            std::hint::black_box(&state);
        };
        let alone = std::mem::size_of_val(&fut);
        assert!(alone >= 2048, "the test future keeps its state across the await ({alone} bytes)");
        let held = size_of_holding(&fut);
        assert!(held <= alone + 64, "Holding made a {alone}-byte future {held} bytes");
    }
}
