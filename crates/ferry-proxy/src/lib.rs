//! Connectivity Proxy: the HTTP proxy (SAP port 20003), the SOCKS5 proxy (20004) and the tunnel
//! endpoint Cloud Connectors dial into. Requests are routed by (subaccount of the caller's
//! token, location id) to the tunnel of the matching connector; no state is shared between
//! replicas — every connector connects to every replica.

#[doc(hidden)]
pub mod fuzzing;
mod http_proxy;
pub mod registry;
mod socks;
mod tenant_limit;
mod tunnel_server;

use std::sync::Arc;
use std::time::Duration;

use ferry_auth::Verifier;
use ferry_core::Shutdown;
use ferry_core::serve::{AcceptOptions, accept_loop};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

pub use registry::Registry;

pub struct ProxyConfig {
    /// Verifies `Proxy-Authorization` and SOCKS5 tokens.
    pub verifier: Arc<Verifier>,
    /// Server TLS config of the tunnel endpoint; must require client certificates of the CA
    /// that issues connector certificates (`ferry_core::tls::server_config(.., Some(ca), ..)`).
    pub tunnel_tls: Arc<rustls::ServerConfig>,
    pub heartbeat: Duration,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    /// On shutdown: how long in-flight HTTP requests and busy SOCKS5 streams may take before
    /// they are closed. Idle connections close at once (SOCKS5: after [`socks::IDLE_TICK`]
    /// without a byte), so the proxy exits as soon as its in-flight work is done.
    pub drain_timeout: Duration,
    /// HTTP requests in flight plus open SOCKS5 connections per subaccount; more get 429
    /// (HTTP) or reply 01 (SOCKS5).
    pub max_streams_per_subaccount: usize,
}

impl ProxyConfig {
    pub fn new(verifier: Arc<Verifier>, tunnel_tls: Arc<rustls::ServerConfig>) -> Self {
        Self {
            verifier,
            tunnel_tls,
            heartbeat: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(10),
            max_streams_per_subaccount: 2_000,
        }
    }
}

/// The sockets the proxy serves; any may be left out.
#[derive(Default)]
pub struct Listeners {
    pub http: Option<TcpListener>,
    pub socks5: Option<TcpListener>,
    pub tunnel: Option<TcpListener>,
}

/// Writes the tunnel stream header (see `ferry_proto::tunnel`) and returns the request id.
pub(crate) fn stamp_tunnel_headers(
    h: &mut http::HeaderMap,
    kind: &'static str,
    target: &str,
    claims: &ferry_auth::Claims,
    principal: Option<&str>,
) -> String {
    use ferry_proto::tunnel;
    use http::HeaderValue;
    let request_id = uuid::Uuid::new_v4().to_string();
    h.insert(tunnel::KIND, HeaderValue::from_static(kind));
    let values = [
        (tunnel::TARGET, Some(target)),
        (tunnel::REQUEST_ID, Some(request_id.as_str())),
        (tunnel::CLIENT, claims.client_id.as_deref()),
        (tunnel::PRINCIPAL, principal),
    ];
    for (name, value) in values {
        if let Some(v) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
            h.insert(name, v);
        }
    }
    request_id
}

/// Opens a stream on the tunnel once it has capacity for one more.
pub(crate) async fn send_on_tunnel(
    mut sender: hyper::client::conn::http2::SendRequest<ferry_core::body::BoxBody>,
    req: http::Request<ferry_core::body::BoxBody>,
) -> hyper::Result<http::Response<hyper::body::Incoming>> {
    sender.ready().await?;
    sender.send_request(req).await
}

pub(crate) struct Shared {
    pub(crate) verifier: ferry_auth::TokenCache,
    pub(crate) registry: Arc<Registry>,
    pub(crate) tenant_streams: tenant_limit::TenantStreams,
}

pub struct Proxy {
    config: ProxyConfig,
    registry: Arc<Registry>,
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Arc<Self> {
        Arc::new(Self { config, registry: Arc::new(Registry::default()) })
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Serves the given listeners until `shutdown`, then drains: the HTTP and SOCKS5 listeners
    /// stop accepting and finish their in-flight work first, and only then do the tunnels close
    /// (closing them earlier would cut the very requests being drained).
    pub async fn run(self: Arc<Self>, listeners: Listeners, shutdown: Shutdown) {
        let shared = Arc::new(Shared {
            verifier: ferry_auth::TokenCache::new(self.config.verifier.clone()),
            registry: self.registry.clone(),
            tenant_streams: tenant_limit::TenantStreams::new(self.config.max_streams_per_subaccount),
        });
        let drain = self.config.drain_timeout;
        let opts = |name| AcceptOptions {
            max_connections: self.config.max_connections,
            handshake_timeout: self.config.handshake_timeout,
            // A little over the handlers' own deadline, so they close their streams themselves.
            drain_timeout: drain + Duration::from_secs(1),
            ..AcceptOptions::named(name)
        };
        let mut front = tokio::task::JoinSet::new();
        if let Some(l) = listeners.http {
            let shared = shared.clone();
            let sd = shutdown.clone();
            front.spawn(accept_loop(l, opts("http-proxy"), shutdown.clone(), move |stream, _| {
                serve_http(stream, shared.clone(), sd.clone(), drain)
            }));
        }
        if let Some(l) = listeners.socks5 {
            let shared = shared.clone();
            let hs = self.config.handshake_timeout;
            let sd = shutdown.clone();
            front.spawn(accept_loop(l, opts("socks5-proxy"), shutdown.clone(), move |stream, _| {
                socks::serve(stream, shared.clone(), hs, socks::Drain { shutdown: sd.clone(), timeout: drain })
            }));
        }
        let tunnels_sd = Shutdown::new();
        let tunnels = listeners.tunnel.map(|l| {
            let acceptor = tokio_rustls::TlsAcceptor::from(self.config.tunnel_tls.clone());
            let registry = self.registry.clone();
            let hb = self.config.heartbeat;
            let hs = self.config.handshake_timeout;
            let sd = tunnels_sd.clone();
            tokio::spawn(accept_loop(l, opts("tunnel"), tunnels_sd.clone(), move |stream, _| {
                tunnel_server::serve(stream, acceptor.clone(), registry.clone(), hb, hs, sd.clone())
            }))
        });
        shutdown.cancelled().await;
        while front.join_next().await.is_some() {}
        tunnels_sd.cancel();
        if let Some(t) = tunnels {
            let _ = t.await;
        }
    }
}

async fn serve_http(stream: tokio::net::TcpStream, shared: Arc<Shared>, shutdown: Shutdown, drain: Duration) {
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move {
            let resp = http_proxy::handle(shared, req).await;
            ferry_core::metrics::global()
                .counter(
                    "ferry_proxy_requests_total",
                    "Requests answered by the Connectivity Proxy, by protocol and status or SOCKS5 reply.",
                    &[("protocol", "http"), ("code", resp.status().as_str())],
                )
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        // hyper answers 431 when the request head exceeds this; single lines over 8 KiB are
        // refused by the handler, as SAP's proxy does.
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "HTTP proxy connection error") },
        _ = shutdown.cancelled() => {
            // Idle keep-alive connections close now; one with a request in flight after it.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(drain, conn).await;
        }
    }
}
