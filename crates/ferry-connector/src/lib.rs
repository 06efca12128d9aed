//! Cloud Connector: the on-premise agent.
//!
//! It dials *out* to the Connectivity Proxy's tunnel port (TLS 1.3, client certificate naming
//! its subaccount and location id), serves HTTP/2 on that connection with the roles reversed
//! (see `ferry_proto::tunnel`), checks every stream against its access rules, and relays
//! allowed ones to the internal backend. It reconnects with exponential backoff and jitter.

pub mod access;
pub mod admin;
pub mod audit;
mod backend;
#[doc(hidden)]
pub mod fuzzing;
pub mod ha;
pub mod instance;
pub mod principal;
pub mod rewrite;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_core::Shutdown;
use ferry_core::tls::CertifiedKey;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

pub use access::{AccessRules, HostInHeader, LiveRules, Protocol, Resource, SystemMapping};
pub use principal::{AuthenticationMode, PrincipalDelivery, PrincipalPropagation};

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("TLS setup for the tunnel failed: {0}")]
    Tls(#[from] ferry_core::tls::TlsError),
    #[error("invalid proxy server name '{0}'")]
    ServerName(String),
    #[error("audit log: {0}")]
    Audit(#[from] audit::AuditError),
    #[error("the connector certificate does not name a subaccount and location")]
    Identity,
}

#[derive(Clone, Debug)]
pub struct ConnectorConfig {
    /// `host:port` of the proxy's tunnel listener.
    pub proxy_addr: String,
    /// Further proxy replicas. The connector keeps its tunnels to every replica, so any replica
    /// behind a load balancer can serve any app request with no state shared between them.
    pub more_proxy_addrs: Vec<String>,
    /// Name the proxy's server certificate must carry (a DNS name or IP address).
    pub server_name: String,
    /// Trust anchor for the proxy's server certificate.
    pub ca_pem: String,
    /// The connector's client certificate (issued for its subaccount and location id).
    pub identity: CertifiedKey,
    pub rules: AccessRules,
    /// Parallel tunnel connections; more spread streams over more cores.
    pub connections: usize,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub backend_connect_timeout: Duration,
    /// How long an HTTP backend may take to send its response headers; then the app gets 504
    /// instead of waiting as long as its own patience lasts.
    pub backend_response_timeout: Duration,
    /// HTTP/2 PING interval on the tunnel; a missed answer within the same time drops it.
    pub heartbeat: Duration,
    pub audit: audit::AuditConfig,
    /// Extra trust anchor (PEM) for TLS to backends (`HTTPS`, `TCPS`, `LDAPS` mappings), in
    /// addition to the system's roots.
    pub backend_ca_pem: Option<String>,
    /// Verifies propagated users and issues their certificates; without it, requests carrying
    /// a principal to an `X509_*` mapping are refused.
    pub principal_propagation: Option<Arc<principal::PrincipalPropagation>>,
    /// The connector's system certificate: its TLS client certificate towards `HTTPS`, `TCPS`
    /// and `LDAPS` backends, for mappings whose principal type allows it.
    pub system_certificate: Option<CertifiedKey>,
}

impl ConnectorConfig {
    pub fn new(
        proxy_addr: String,
        server_name: String,
        ca_pem: String,
        identity: CertifiedKey,
        rules: AccessRules,
    ) -> Self {
        Self {
            proxy_addr,
            more_proxy_addrs: Vec::new(),
            server_name,
            ca_pem,
            identity,
            rules,
            connections: 1,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            backend_connect_timeout: Duration::from_secs(10),
            backend_response_timeout: Duration::from_secs(300),
            heartbeat: Duration::from_secs(20),
            audit: audit::AuditConfig::default(),
            backend_ca_pem: None,
            principal_propagation: None,
            system_certificate: None,
        }
    }
}

/// Observable tunnel state, for `ferry up`'s banner, health checks and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelStatus {
    /// Tunnel connections currently up.
    pub connected: usize,
    /// Tunnel connections established since start (grows on every reconnect).
    pub established: u64,
}

pub struct Connector {
    config: Arc<ConnectorConfig>,
    tls: tokio_rustls::TlsConnector,
    server_name: rustls::pki_types::ServerName<'static>,
    status: watch::Sender<TunnelStatus>,
    backend: Arc<backend::Backend>,
    rules: Arc<LiveRules>,
    audit: audit::AuditLog,
}

impl Connector {
    /// Must be called inside a Tokio runtime (the audit writer starts here).
    pub fn new(config: ConnectorConfig) -> Result<Self, ConnectorError> {
        let tls = ferry_core::tls::client_config(&config.ca_pem, Some(&config.identity), &[ferry_proto::tunnel::ALPN])?;
        let server_name = rustls::pki_types::ServerName::try_from(config.server_name.clone())
            .map_err(|_| ConnectorError::ServerName(config.server_name.clone()))?;
        let der = ferry_core::tls::parse_certs(&config.identity.cert_pem)?;
        let (subaccount, location) =
            der.first().and_then(|c| ferry_core::tls::connector_identity(c)).ok_or(ConnectorError::Identity)?;
        let audit = audit::AuditLog::start(&config.audit, &subaccount, &location)?;
        let backend_roots = Arc::new(ferry_core::tls::outbound_roots(config.backend_ca_pem.as_deref())?);
        let rules = Arc::new(LiveRules::new(config.rules.clone()));
        let backend = Arc::new(backend::Backend::new(
            rules.clone(),
            audit.clone(),
            backend_roots,
            config.principal_propagation.clone(),
            config.backend_connect_timeout,
            config.backend_response_timeout,
            config.system_certificate.as_ref(),
        )?);
        Ok(Self {
            config: Arc::new(config),
            tls: tokio_rustls::TlsConnector::from(tls),
            server_name,
            status: watch::channel(TunnelStatus::default()).0,
            backend,
            rules,
            audit,
        })
    }

    /// Replaces the access rules; the next request is checked against them, tunnels stay up.
    pub fn set_rules(&self, rules: AccessRules) {
        self.rules.set(rules);
    }

    pub fn rules(&self) -> Arc<AccessRules> {
        self.rules.get()
    }

    /// Replaces the principal propagation settings; the next request uses them.
    pub fn set_principal_propagation(&self, principal: Option<Arc<principal::PrincipalPropagation>>) {
        self.backend.set_principal(principal);
    }

    /// The connector's audit log (e.g. to change its level at run time).
    pub fn audit(&self) -> &audit::AuditLog {
        &self.audit
    }

    pub fn status(&self) -> watch::Receiver<TunnelStatus> {
        self.status.subscribe()
    }

    /// Keeps `config.connections` tunnel connections up to every proxy replica until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let mut tasks = tokio::task::JoinSet::new();
        let proxies = std::iter::once(&self.config.proxy_addr).chain(&self.config.more_proxy_addrs).cloned();
        for proxy in proxies.collect::<Vec<_>>() {
            for slot in 0..self.config.connections.max(1) {
                let me = self.clone();
                let sd = shutdown.clone();
                let proxy = proxy.clone();
                tasks.spawn(async move { me.keep_connected(proxy, slot, sd).await });
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn keep_connected(&self, proxy: String, slot: usize, shutdown: Shutdown) {
        let mut backoff = self.config.backoff_initial;
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            match self.connect(&proxy).await {
                Ok(io) => {
                    tracing::info!(slot, %proxy, "tunnel connected");
                    self.status.send_modify(|s| {
                        s.connected += 1;
                        s.established += 1;
                    });
                    self.serve(io, &shutdown).await;
                    self.status.send_modify(|s| s.connected -= 1);
                    tracing::warn!(slot, %proxy, "tunnel disconnected");
                }
                Err(e) => tracing::warn!(slot, %proxy, error = %e, "tunnel connect failed"),
            }
            // A connection that lived a while was healthy: start the next backoff afresh.
            if started.elapsed() > Duration::from_secs(10) {
                backoff = self.config.backoff_initial;
            }
            let jittered = backoff.mul_f64(rand::random_range(0.5..=1.0));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(jittered) => {}
            }
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
    }

    async fn connect(&self, proxy: &str) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(proxy))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        tcp.set_nodelay(true)?;
        tokio::time::timeout(Duration::from_secs(10), self.tls.connect(self.server_name.clone(), tcp))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
    }

    async fn serve(&self, io: tokio_rustls::client::TlsStream<TcpStream>, shutdown: &Shutdown) {
        use ferry_proto::tunnel::*;
        let backend = self.backend.clone();
        let service = hyper::service::service_fn(move |req| {
            let backend = backend.clone();
            async move { Ok::<_, std::convert::Infallible>(backend.handle(req).await) }
        });
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buf_size(SEND_BUFFER)
            .max_concurrent_streams(MAX_STREAMS)
            .keep_alive_interval(self.config.heartbeat)
            .keep_alive_timeout(self.config.heartbeat);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "tunnel connection error") },
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
            }
        }
    }
}

/// Builds and runs a connector until `shutdown`.
pub async fn run(config: ConnectorConfig, shutdown: Shutdown) -> Result<(), ConnectorError> {
    Arc::new(Connector::new(config)?).run(shutdown).await;
    Ok(())
}
