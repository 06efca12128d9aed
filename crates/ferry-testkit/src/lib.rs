//! Test support (dev-dependency only): real servers on 127.0.0.1 port 0, a test CA, a tunnel
//! pair (proxy + connector) wired together, an echo backend, and a TCP relay that can be cut.

pub mod mail;
pub mod nginx;
pub mod postgres;
pub mod process;
pub mod slapd;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ferry_auth::{KeySet, Verifier};
use ferry_connector::{AccessRules, Connector, ConnectorConfig, TunnelStatus};
use ferry_core::Shutdown;
use ferry_core::tls::LocalCa;
use ferry_proxy::{Listeners, Proxy, ProxyConfig};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Waits until `cond` holds, polling every 10 ms, for at most 10 s; panics with `what` after.
#[macro_export]
macro_rules! eventually {
    ($what:expr, $cond:expr) => {{
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if $cond {
                break;
            }
            if std::time::Instant::now() > deadline {
                panic!("timed out waiting for: {}", $what);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }};
}

pub async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0")
}

/// A system mapping `vhost:vport` → `backend` that grants every path (resource `/` with
/// sub-paths): for tests and benchmarks about the data path rather than access control.
pub fn open_mapping(
    vhost: &str,
    vport: u16,
    backend: SocketAddr,
    protocol: ferry_connector::access::Protocol,
) -> ferry_connector::access::SystemMapping {
    use ferry_connector::access::{HostInHeader, Resource, SystemMapping};
    SystemMapping {
        virtual_host: vhost.into(),
        virtual_port: vport,
        local_host: backend.ip().to_string(),
        local_port: backend.port(),
        protocol,
        host_in_header: HostInHeader::Virtual,
        authentication_mode: Default::default(),
        principal_certificate_in: Default::default(),
        resources: vec![Resource {
            path: "/".into(),
            exact_match_only: false,
            enabled: true,
            websocket_upgrade_allowed: false,
            description: None,
        }],
        description: None,
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// An XSUAA-shaped client-credentials token for tenant `zid`.
pub fn token(keys: &KeySet, zid: &str, client_id: &str, exp_in: i64) -> String {
    let exp = (now() as i64 + exp_in) as u64;
    keys.sign(
        &json!({"zid": zid, "client_id": client_id, "cid": client_id, "exp": exp, "iat": now(),
                "ext_attr": {"enhancer": "XSUAA", "zdn": "test", "subaccountid": zid}}),
        &[],
    )
    .expect("sign")
}

/// An HTTP/1.1 echo server: answers every request with JSON {method, url, headers, body}.
pub struct EchoBackend {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl EchoBackend {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// The same echo server behind TLS with `identity` as its certificate.
    pub async fn start_tls(identity: &ferry_core::tls::CertifiedKey) -> Self {
        let cfg = ferry_core::tls::server_config(identity, None, &[b"http/1.1"]).expect("tls config");
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(cfg))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let l = listener().await;
        let addr = l.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let _ = s.set_nodelay(true);
                let h = h.clone();
                let tls = tls.clone();
                let tls_on = tls.is_some();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let h = h.clone();
                        async move {
                            h.fetch_add(1, Ordering::SeqCst);
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let headers: serde_json::Map<String, Value> = parts
                                .headers
                                .iter()
                                .map(|(k, v)| (k.to_string(), Value::String(v.to_str().unwrap_or("").to_owned())))
                                .collect();
                            let out = json!({"method": parts.method.as_str(), "url": parts.uri.to_string(),
                                             "headers": headers, "body": String::from_utf8_lossy(&body)});
                            let mut resp = http::Response::builder()
                                .header("content-type", "application/json")
                                .header("x-echo", "1");
                            // `/redirect`: a backend that names itself, as SAP systems do.
                            if parts.uri.path() == "/redirect" {
                                let scheme = if tls_on { "https" } else { "http" };
                                resp = resp
                                    .status(302)
                                    .header("location", format!("{scheme}://{addr}/landing?x=1"))
                                    .header("set-cookie", format!("sid=1; Domain={}; Path=/", addr.ip()));
                            }
                            let resp = resp.body(Full::new(Bytes::from(out.to_string()))).expect("response");
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(t) = acceptor.accept(s).await {
                                let _ = builder.serve_connection(TokioIo::new(t), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                });
            }
        });
        Self { addr, hits }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A WebSocket echo server (tokio-tungstenite): echoes every text and binary message. Requests
/// for a path under `/refuse` are declined with 404; every request head is kept for the test.
pub struct WebSocketEcho {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    upgrades: Arc<AtomicUsize>,
    seen: Arc<std::sync::Mutex<Vec<(String, http::HeaderMap)>>>,
}

impl WebSocketEcho {
    pub async fn start() -> Self {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
        let l = listener().await;
        let addr = l.local_addr().expect("addr");
        let (connections, upgrades) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, u, heads) = (connections.clone(), upgrades.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let _ = s.set_nodelay(true);
                c.fetch_add(1, Ordering::SeqCst);
                let (u, heads) = (u.clone(), heads.clone());
                tokio::spawn(async move {
                    // tungstenite's callback signature, not ours to box.
                    #[allow(clippy::result_large_err)]
                    let record = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                        let path = req.uri().path().to_owned();
                        heads.lock().expect("lock").push((path.clone(), req.headers().clone()));
                        if path.starts_with("/refuse") {
                            let mut no = ErrorResponse::new(Some("no WebSocket here".into()));
                            *no.status_mut() = http::StatusCode::NOT_FOUND;
                            return Err(no);
                        }
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, record).await else { return };
                    u.fetch_add(1, Ordering::SeqCst);
                    while let Some(Ok(msg)) = ws.next().await {
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { addr, connections, upgrades, seen }
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Completed WebSocket handshakes.
    pub fn upgrades(&self) -> usize {
        self.upgrades.load(Ordering::SeqCst)
    }

    /// Path and headers of every handshake request received.
    pub fn requests(&self) -> Vec<(String, http::HeaderMap)> {
        self.seen.lock().expect("lock").clone()
    }
}

/// A TCP relay in front of `target` whose connections the test can cut at will, or partition:
/// cut, and every new connection closed at once until healed.
pub struct CuttableRelay {
    pub addr: SocketAddr,
    cut: watch::Sender<u64>,
    partitioned: Arc<std::sync::atomic::AtomicBool>,
}

impl CuttableRelay {
    pub async fn start(target: SocketAddr) -> Self {
        let l = listener().await;
        let addr = l.local_addr().expect("addr");
        let (cut, rx) = watch::channel(0u64);
        let partitioned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let blocked = partitioned.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = l.accept().await else { return };
                if blocked.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut rx = rx.clone();
                rx.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = rx.changed() => {
                            let _ = inbound.shutdown().await;
                        }
                    }
                });
            }
        });
        Self { addr, cut, partitioned }
    }

    /// Drops every connection currently relayed.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Cuts every connection and refuses new ones until [`CuttableRelay::heal`].
    pub fn partition(&self) {
        self.partitioned.store(true, Ordering::SeqCst);
        self.cut();
    }

    pub fn heal(&self) {
        self.partitioned.store(false, Ordering::SeqCst);
    }
}

pub const SUBACCOUNT: &str = "0a0b0c0d-0000-4000-8000-000000000001";

/// A proxy (HTTP, SOCKS5, tunnel listeners on port 0) and optionally a connector dialing it.
pub struct TunnelPair {
    pub ca: LocalCa,
    pub keys: Arc<KeySet>,
    pub proxy: Arc<Proxy>,
    pub http_addr: SocketAddr,
    pub socks_addr: SocketAddr,
    pub tunnel_addr: SocketAddr,
    pub shutdown: Shutdown,
}

impl TunnelPair {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Like [`TunnelPair::start`], with the proxy's configuration adjusted first (e.g. service
    /// channel targets).
    pub async fn start_with(adjust: impl FnOnce(&mut ProxyConfig)) -> Self {
        ferry_core::init_crypto();
        let ca = LocalCa::generate("ferry test CA").expect("CA");
        let keys = Arc::new(KeySet::generate().expect("keys"));
        let server = ca.issue_server_cert(&["127.0.0.1", "localhost"]).expect("server cert");
        let tls =
            ferry_core::tls::server_config(&server, Some(ca.cert_pem()), &[ferry_proto::tunnel::ALPN]).expect("tls");
        let mut cfg = ProxyConfig::new(Arc::new(Verifier::local(keys.clone())), tls);
        cfg.handshake_timeout = Duration::from_secs(2);
        adjust(&mut cfg);
        let proxy = Proxy::new(cfg);
        let (h, s, t) = (listener().await, listener().await, listener().await);
        let (http_addr, socks_addr, tunnel_addr) =
            (h.local_addr().expect("a"), s.local_addr().expect("a"), t.local_addr().expect("a"));
        let shutdown = Shutdown::new();
        tokio::spawn(proxy.clone().run(
            Listeners { http: Some(h), socks5: Some(s), tunnel: Some(t), socks5_no_auth: None },
            shutdown.clone(),
        ));
        Self { ca, keys, proxy, http_addr, socks_addr, tunnel_addr, shutdown }
    }

    /// Another proxy (HTTP, SOCKS5, tunnel on port 0) trusting the same CA and token keys: a
    /// replica. Returns (http, socks5, tunnel) addresses and the replica's registry.
    pub async fn replica(&self) -> (SocketAddr, SocketAddr, SocketAddr, Arc<ferry_proxy::Registry>) {
        let server = self.ca.issue_server_cert(&["127.0.0.1", "localhost"]).expect("server cert");
        let tls = ferry_core::tls::server_config(&server, Some(self.ca.cert_pem()), &[ferry_proto::tunnel::ALPN])
            .expect("tls");
        let proxy = Proxy::new(ProxyConfig::new(Arc::new(Verifier::local(self.keys.clone())), tls));
        let (h, s, t) = (listener().await, listener().await, listener().await);
        let addrs = (h.local_addr().expect("a"), s.local_addr().expect("a"), t.local_addr().expect("a"));
        let registry = proxy.registry();
        tokio::spawn(proxy.run(
            Listeners { http: Some(h), socks5: Some(s), tunnel: Some(t), socks5_no_auth: None },
            self.shutdown.clone(),
        ));
        (addrs.0, addrs.1, addrs.2, registry)
    }

    pub fn token(&self) -> String {
        token(&self.keys, SUBACCOUNT, "sb-test-connectivity!b1", 600)
    }

    /// Starts a connector for (SUBACCOUNT, `location`) dialing `dial` (the tunnel port, or a
    /// relay in front of it). Returns its status; the connector stops with the pair.
    pub fn connector(&self, location: &str, rules: AccessRules, dial: SocketAddr) -> watch::Receiver<TunnelStatus> {
        self.connector_with(location, rules, dial, 1)
    }

    /// Like [`TunnelPair::connector`], with `connections` parallel tunnel connections.
    pub fn connector_with(
        &self,
        location: &str,
        rules: AccessRules,
        dial: SocketAddr,
        connections: usize,
    ) -> watch::Receiver<TunnelStatus> {
        let mut cfg = self.connector_config(location, rules, dial);
        cfg.connections = connections;
        self.spawn_connector(cfg)
    }

    /// A connector configuration for (SUBACCOUNT, `location`) with a fresh certificate and fast
    /// reconnects, for tests that adjust it before [`TunnelPair::spawn_connector`].
    pub fn connector_config(&self, location: &str, rules: AccessRules, dial: SocketAddr) -> ConnectorConfig {
        let id = self.ca.issue_connector_cert(SUBACCOUNT, location, time::Duration::days(1)).expect("connector cert");
        let mut cfg =
            ConnectorConfig::new(dial.to_string(), "127.0.0.1".into(), self.ca.cert_pem().to_owned(), id, rules);
        cfg.backoff_initial = Duration::from_millis(20);
        cfg.backoff_max = Duration::from_millis(200);
        cfg
    }

    /// Runs a connector until the pair is dropped.
    pub fn spawn_connector(&self, cfg: ConnectorConfig) -> watch::Receiver<TunnelStatus> {
        let c = Arc::new(Connector::new(cfg).expect("connector"));
        let status = c.status();
        tokio::spawn(c.run(self.shutdown.clone()));
        status
    }

    pub async fn wait_connected(&self, location: &str) {
        let reg = self.proxy.registry();
        eventually!("connector registered at the proxy", reg.is_connected(SUBACCOUNT, location));
    }
}

impl Drop for TunnelPair {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
