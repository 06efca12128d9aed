//! Connectivity Proxy: the HTTP proxy (SAP port 20003), the SOCKS5 proxy (20004) and the tunnel
//! endpoint Cloud Connectors dial into. Requests are routed by (subaccount of the caller's
//! token, location id) to the tunnel of the matching connector; no state is shared between
//! replicas — every connector connects to every replica.

pub mod channels;
#[doc(hidden)]
pub mod fuzzing;
mod http_proxy;
pub mod registry;
mod retry;
mod socks;
mod tenant_limit;
mod tunnel_server;

use std::sync::Arc;
use std::time::Duration;

use ferry_auth::Verifier;
use ferry_core::Shutdown;
use ferry_core::serve::{AcceptOptions, accept_loop, accept_loop_with_refusal};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

pub use channels::{ChannelTarget, ChannelTargets};
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
    /// Connections one client address may hold open on the HTTP and on the SOCKS5 port (each);
    /// one more gets 429 (HTTP) or reply 02 (SOCKS5) and is closed. 0 = no cap.
    pub max_connections_per_client: usize,
    /// On shutdown: how long in-flight HTTP requests and busy SOCKS5 streams may take before
    /// they are closed. Idle connections close at once (SOCKS5: after [`socks::IDLE_TICK`]
    /// without a byte), so the proxy exits as soon as its in-flight work is done.
    pub drain_timeout: Duration,
    /// HTTP requests in flight plus open SOCKS5 connections and service channel streams per
    /// subaccount; more get 429 (HTTP, channel streams) or reply 01 (SOCKS5).
    pub max_streams_per_subaccount: usize,
    /// Where connections of [`Listeners::socks5_no_auth`] go. Benchmarks only: see [`NoAuthRoute`].
    pub socks5_no_auth: Option<NoAuthRoute>,
    /// How long a request waits for a connector's next tunnel when the one it was put on is
    /// draining (HTTP/2 GOAWAY: a certificate renewal, a connector restart or switch-over), before
    /// it gets 503 / SOCKS5 reply 03. Without a recent drain, no tunnel means 503 at once.
    pub tunnel_swap_wait: Duration,
    /// Cloud-side services that Cloud Connectors' service channels may reach, per subaccount.
    pub channel_targets: ChannelTargets,
}

impl ProxyConfig {
    /// Default of [`ProxyConfig::max_streams_per_subaccount`].
    pub const DEFAULT_MAX_STREAMS_PER_SUBACCOUNT: usize = 2_000;

    pub fn new(verifier: Arc<Verifier>, tunnel_tls: Arc<rustls::ServerConfig>) -> Self {
        Self {
            verifier,
            tunnel_tls,
            heartbeat: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_client: 1_000,
            drain_timeout: Duration::from_secs(10),
            max_streams_per_subaccount: Self::DEFAULT_MAX_STREAMS_PER_SUBACCOUNT,
            socks5_no_auth: None,
            tunnel_swap_wait: Duration::from_secs(5),
            channel_targets: ChannelTargets::default(),
        }
    }
}

/// The sockets the proxy serves; any may be left out.
#[derive(Default)]
pub struct Listeners {
    pub http: Option<TcpListener>,
    pub socks5: Option<TcpListener>,
    pub tunnel: Option<TcpListener>,
    /// The benchmark-only SOCKS5 listener without authentication ([`NoAuthRoute`]); must be bound
    /// to a loopback address and needs [`ProxyConfig::socks5_no_auth`].
    pub socks5_no_auth: Option<TcpListener>,
}

/// Why [`Proxy::run`] refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "the SOCKS5 no-auth listener (benchmarks only) is bound to {0}: it must listen on a loopback address \
         (127.0.0.0/8 or ::1), because anyone who reaches it acts as the configured subaccount"
    )]
    NoAuthNotLoopback(std::net::SocketAddr),
    #[error("a SOCKS5 no-auth listener is given but ProxyConfig::socks5_no_auth names no subaccount for it")]
    NoAuthWithoutRoute,
    #[error("cannot read the address of the SOCKS5 no-auth listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Checks that a no-auth SOCKS5 listener may be served: bound to loopback, with a route.
pub fn check_no_auth(listener: &TcpListener, route: Option<&NoAuthRoute>) -> Result<(), RunError> {
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        return Err(RunError::NoAuthNotLoopback(addr));
    }
    route.map(|_| ()).ok_or(RunError::NoAuthWithoutRoute)
}

/// Benchmark/development mode, not for production: SOCKS5 clients that cannot speak SAP's method
/// 0x80 (generic load generators) may connect without a token on a loopback-only listener; all
/// their connections go to this one (subaccount, location id). Anyone who can reach the listener
/// acts as that subaccount, which is why [`Proxy::run`] refuses to serve it on any address but
/// loopback.
#[derive(Clone, Debug)]
pub struct NoAuthRoute {
    pub subaccount: String,
    pub location: String,
}

/// The client id the tunnel stream header carries for connections of the no-auth listener, so
/// the connector's audit log shows where they came from.
pub const NO_AUTH_CLIENT_ID: &str = "ferry-bench-socks5-no-auth";

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
    // A version-4 UUID from the thread's generator: `Uuid::new_v4` asks the kernel for every id,
    // a system call per proxied request.
    let request_id = uuid::Builder::from_random_bytes(rand::random()).into_uuid().to_string();
    h.insert(tunnel::names::KIND, HeaderValue::from_static(kind));
    let values = [
        (tunnel::names::TARGET, Some(target)),
        (tunnel::names::REQUEST_ID, Some(request_id.as_str())),
        (tunnel::names::CLIENT, claims.client_id.as_deref()),
        (tunnel::names::PRINCIPAL, principal),
    ];
    for (name, value) in values {
        if let Some(mut v) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
            // HPACK: a value that is new on every stream (the request id) is sent as a literal
            // that is never indexed; indexed, it would evict an entry from both ends' tables
            // on every request.
            if name == tunnel::names::REQUEST_ID {
                v.set_sensitive(true);
            }
            h.insert(name, v);
        }
    }
    request_id
}

pub(crate) struct Shared {
    pub(crate) verifier: ferry_auth::TokenCache,
    pub(crate) registry: Arc<Registry>,
    pub(crate) tenant_streams: Arc<tenant_limit::TenantStreams>,
    pub(crate) tunnel_swap_wait: Duration,
    /// The proxy's shutdown and how long open work may take after it (`drain_timeout`).
    pub(crate) shutdown: Shutdown,
    pub(crate) drain_timeout: Duration,
    /// Upgraded (WebSocket) connections: they outlive the HTTP connection they came on, so the
    /// proxy's shutdown waits for them here before it closes the tunnels.
    pub(crate) upgrades: tokio_util::task::TaskTracker,
}

impl Shared {
    /// Opens a stream on a tunnel of (subaccount, location), retrying what a draining tunnel
    /// refused unprocessed (see `retry`).
    pub(crate) async fn open_stream(
        &self,
        subaccount: &str,
        location: &str,
        req: http::Request<ferry_core::body::BoxBody>,
        request_id: &str,
    ) -> Result<http::Response<hyper::body::Incoming>, retry::OpenError> {
        retry::send(&self.registry, subaccount, location, req, self.tunnel_swap_wait, request_id).await
    }
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
            tenant_streams: Arc::new(tenant_limit::TenantStreams::new(self.config.max_streams_per_subaccount)),
            tunnel_swap_wait: self.config.tunnel_swap_wait,
            shutdown: shutdown.clone(),
            drain_timeout: self.config.drain_timeout,
            upgrades: tokio_util::task::TaskTracker::new(),
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
        let per_client = self.config.max_connections_per_client;
        let capped = |name| AcceptOptions { max_per_client: per_client, ..opts(name) };
        if let Some(l) = listeners.http {
            let shared = shared.clone();
            let sd = shutdown.clone();
            front.spawn(accept_loop_with_refusal(
                l,
                capped("http-proxy"),
                shutdown.clone(),
                move |stream, _| serve_http(stream, shared.clone(), sd.clone(), drain),
                move |stream, _| refuse_http(stream, per_client),
            ));
        }
        if let Some(l) = listeners.socks5 {
            let shared = shared.clone();
            let hs = self.config.handshake_timeout;
            let sd = shutdown.clone();
            let serve = move |stream, over_cap| {
                let drain = socks::Drain { shutdown: sd.clone(), timeout: drain };
                socks::serve(stream, shared.clone(), hs, None, drain, over_cap)
            };
            let refuse = serve.clone();
            front.spawn(accept_loop_with_refusal(
                l,
                capped("socks5-proxy"),
                shutdown.clone(),
                move |stream, _| serve(stream, None),
                move |stream, _| refuse(stream, Some(per_client)),
            ));
        }
        if let Some(l) = listeners.socks5_no_auth {
            match check_no_auth(&l, self.config.socks5_no_auth.as_ref()) {
                Err(e) => tracing::error!(error = %e, "SOCKS5 no-auth listener not served"),
                Ok(()) => {
                    let shared = shared.clone();
                    let hs = self.config.handshake_timeout;
                    let sd = shutdown.clone();
                    let route = self.config.socks5_no_auth.clone().map(|r| {
                        let claims = Arc::new(ferry_auth::Claims {
                            zid: r.subaccount,
                            client_id: Some(NO_AUTH_CLIENT_ID.into()),
                            ..Default::default()
                        });
                        Arc::new((claims, r.location))
                    });
                    tracing::warn!(
                        addr = ?l.local_addr().ok(),
                        "SOCKS5 without authentication is enabled (benchmark mode, not for production)"
                    );
                    front.spawn(accept_loop(l, opts("socks5-no-auth"), shutdown.clone(), move |stream, _| {
                        let drain = socks::Drain { shutdown: sd.clone(), timeout: drain };
                        socks::serve(stream, shared.clone(), hs, route.clone(), drain, None)
                    }));
                }
            }
        }
        let tunnels_sd = Shutdown::new();
        let tunnels = listeners.tunnel.map(|l| {
            // Service channel connections come to the same port under their own ALPN.
            let mut tls = (*self.config.tunnel_tls).clone();
            // A list with only the channel protocol would refuse connectors offering the tunnel's.
            if tls.alpn_protocols.is_empty() {
                tls.alpn_protocols.push(ferry_proto::tunnel::ALPN.to_vec());
            }
            if !tls.alpn_protocols.iter().any(|p| p == ferry_proto::tunnel::CHANNEL_ALPN) {
                tls.alpn_protocols.push(ferry_proto::tunnel::CHANNEL_ALPN.to_vec());
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
            // Channel streams count in the same per-subaccount cap as HTTP and SOCKS5 streams.
            let channels = channels::Channels {
                targets: Arc::new(self.config.channel_targets.clone()),
                streams: shared.tenant_streams.clone(),
            };
            let registry = self.registry.clone();
            let hb = self.config.heartbeat;
            let hs = self.config.handshake_timeout;
            let sd = tunnels_sd.clone();
            tokio::spawn(accept_loop(l, opts("tunnel"), tunnels_sd.clone(), move |stream, _| {
                let channels = channels.clone();
                tunnel_server::serve(stream, acceptor.clone(), registry.clone(), channels, hb, hs, sd.clone())
            }))
        });
        if front.is_empty() && tunnels.is_none() {
            // Nothing to serve (e.g. a refused no-auth listener was the only one).
            return;
        }
        shutdown.cancelled().await;
        while front.join_next().await.is_some() {}
        // Each closes itself once idle or at the drain deadline; the timeout is only a backstop.
        shared.upgrades.close();
        let _ = tokio::time::timeout(drain + Duration::from_secs(1), shared.upgrades.wait()).await;
        tunnels_sd.cancel();
        if let Some(t) = tunnels {
            let _ = t.await;
        }
    }
}

/// Answers every request on a connection over the per-client cap with 429 and closes it.
async fn refuse_http(stream: tokio::net::TcpStream, max: usize) {
    let service = hyper::service::service_fn(move |_req| async move {
        Ok::<_, std::convert::Infallible>(ferry_core::serve::too_many_connections(max))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "refused HTTP proxy connection ended with an error");
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
        .serve_connection(TokioIo::new(stream), service)
        // WebSocket: an upgraded connection leaves hyper and is relayed through the tunnel.
        .with_upgrades();
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use ferry_proto::tunnel::names;

    /// The request id is new on every stream: sent as never-indexed HPACK literal, it evicts
    /// nothing from either end's header table; the other stream headers repeat and are indexed.
    #[test]
    fn only_the_request_id_bypasses_the_header_table() {
        let claims = ferry_auth::Claims { zid: "z".into(), client_id: Some("c".into()), ..Default::default() };
        let mut h = http::HeaderMap::new();
        let id = super::stamp_tunnel_headers(&mut h, ferry_proto::tunnel::KIND_HTTP, "erp:80", &claims, Some("p"));
        assert_eq!(h.get(&names::REQUEST_ID).unwrap(), id.as_str());
        assert!(h.get(&names::REQUEST_ID).unwrap().is_sensitive());
        for n in [names::KIND, names::TARGET, names::CLIENT, names::PRINCIPAL] {
            assert!(!h.get(&n).unwrap().is_sensitive(), "{n}");
        }
    }
}
