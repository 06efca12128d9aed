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
pub mod channel;
#[doc(hidden)]
pub mod fuzzing;
pub mod ha;
pub mod instance;
mod pin;
pub mod principal;
pub mod rewrite;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_core::Shutdown;
use ferry_core::tls::CertifiedKey;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

pub use access::{AccessRules, HostInHeader, LiveRules, Protocol, Resource, SystemMapping};
pub use backend::IDLE_TICK;
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
    #[error("the new certificate is for subaccount {0} location {1:?}, not this connection's")]
    OtherIdentity(String, String),
}

/// The tunnel's TCP connection, read through a buffer of [`ferry_proto::tunnel::READ_BUFFER`].
type TunnelTcp = tokio::io::BufReader<TcpStream>;

#[derive(Clone, Debug)]
pub struct ConnectorConfig {
    /// `host:port` of the proxy's tunnel listener.
    pub proxy_addr: String,
    /// Further proxy replicas. The connector keeps its tunnels to every replica, so any replica
    /// behind a load balancer can serve any app request with no state shared between them.
    pub more_proxy_addrs: Vec<String>,
    /// `Some(interval)`: each proxy address's host stands for all its A/AAAA records (as a
    /// Kubernetes headless service lists its pods), one tunnel set per address, looked up again
    /// every `interval`; replicas that appear get tunnels, ones that vanish are drained. `None`:
    /// each address is one replica (a name is resolved at every dial, reaching one of them).
    pub resolve_replicas: Option<Duration>,
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
    /// How long a tunnel connection being closed (shutdown, or replaced after a certificate
    /// renewal) may take to finish its open streams; then they are cut. On shutdown a TCP relay
    /// that moves no byte for [`IDLE_TICK`] is closed at once instead of holding the exit.
    pub drain_timeout: Duration,
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
    /// This instance's HA epoch and node id, answered to the proxy's `hello` (see
    /// `ferry_proto::tunnel`); `None` for a connector without high availability (epoch 0).
    pub fence: Option<ferry_proto::tunnel::Fence>,
    /// Address service channel ports listen on (on-premise clients connect there).
    pub channel_host: String,
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
            resolve_replicas: None,
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
            drain_timeout: Duration::from_secs(10),
            audit: audit::AuditConfig::default(),
            backend_ca_pem: None,
            principal_propagation: None,
            system_certificate: None,
            fence: None,
            channel_host: "0.0.0.0".into(),
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
    /// A proxy knows a newer master of this (subaccount, location id): this connector closed
    /// its tunnels and stays passive.
    pub fenced: bool,
}

pub struct Connector {
    config: Arc<ConnectorConfig>,
    /// Swapped by [`Connector::set_identity`]; each new tunnel connection takes the current one.
    tls: std::sync::RwLock<tokio_rustls::TlsConnector>,
    /// The same identity with the service channel ALPN (see [`channel`]).
    channel_tls: std::sync::RwLock<tokio_rustls::TlsConnector>,
    /// The channel connection to a proxy, dialled on first use; `None` or closed: dial again.
    channel_link: tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<ferry_core::body::BoxBody>>>,
    channels: channel::Channels,
    /// (subaccount, location id) the certificate names; a renewed one must name the same.
    identity: (String, String),
    /// Bumped on every certificate change: tunnels then reconnect with it and drain the old ones.
    identity_generation: watch::Sender<u64>,
    server_name: rustls::pki_types::ServerName<'static>,
    status: watch::Sender<TunnelStatus>,
    backend: Arc<backend::Backend>,
    rules: Arc<LiveRules>,
    audit: audit::AuditLog,
    /// Epoch millis of the last bytes received from the proxy on any tunnel connection; 0 =
    /// never. See [`Connector::last_heartbeat`].
    last_heard: Arc<AtomicU64>,
    /// Cancelled once a proxy says a newer master serves this (subaccount, location id).
    fenced: Shutdown,
    /// Tunnel connections up per replica address being dialled (see [`Connector::replicas`]).
    /// A replica dropped from DNS and added back gets a fresh counter, so connections of its
    /// first incarnation that are still draining do not count against the new one.
    replicas: std::sync::Mutex<std::collections::BTreeMap<String, Arc<AtomicUsize>>>,
}

/// One proxy replica the connector dials, for monitoring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaState {
    /// `host:port` as dialled: an address from DNS when replicas are resolved.
    pub address: String,
    /// Tunnel connections to it that are up.
    pub connected: usize,
}

impl Connector {
    /// Must be called inside a Tokio runtime (the audit writer starts here).
    pub fn new(config: ConnectorConfig) -> Result<Self, ConnectorError> {
        let tls = tunnel_tls(&config.ca_pem, &config.identity)?;
        let channel_tls = channel_tls(&config.ca_pem, &config.identity)?;
        let server_name = rustls::pki_types::ServerName::try_from(config.server_name.clone())
            .map_err(|_| ConnectorError::ServerName(config.server_name.clone()))?;
        let der = ferry_core::tls::parse_certs(&config.identity.cert_pem)?;
        let (subaccount, location) =
            der.first().and_then(|c| ferry_core::tls::connector_identity(c)).ok_or(ConnectorError::Identity)?;
        let audit = audit::AuditLog::start(&config.audit, &subaccount, &location)?;
        let (subaccount, location) = (subaccount.clone(), location.clone());
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
            tls: std::sync::RwLock::new(tokio_rustls::TlsConnector::from(tls)),
            channel_tls: std::sync::RwLock::new(tokio_rustls::TlsConnector::from(channel_tls)),
            channel_link: tokio::sync::Mutex::new(None),
            channels: channel::Channels::default(),
            identity: (subaccount, location),
            identity_generation: watch::channel(0).0,
            server_name,
            status: watch::channel(TunnelStatus::default()).0,
            backend,
            rules,
            audit,
            last_heard: Arc::new(AtomicU64::new(0)),
            fenced: Shutdown::new(),
            replicas: std::sync::Mutex::default(),
        })
    }

    /// When the proxy last proved it is alive on a tunnel of this connection: the last bytes it
    /// sent. hyper has no hook for PING acknowledgements, but its keep-alive PINGs the proxy
    /// whenever a tunnel was silent for `heartbeat`, so on a healthy tunnel this is never older
    /// than about one heartbeat interval, idle or busy; on a dead one it stops advancing.
    pub fn last_heartbeat(&self) -> Option<SystemTime> {
        match self.last_heard.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// Renews the connection certificate without dropping traffic: every tunnel connection
    /// dials anew with `identity`, and only once that one is up does the old connection drain
    /// (HTTP/2 GOAWAY: the proxy opens no new streams on it, open ones finish).
    pub fn set_identity(&self, identity: &CertifiedKey) -> Result<(), ConnectorError> {
        let der = ferry_core::tls::parse_certs(&identity.cert_pem)?;
        let named = der.first().and_then(|c| ferry_core::tls::connector_identity(c)).ok_or(ConnectorError::Identity)?;
        if named != self.identity {
            return Err(ConnectorError::OtherIdentity(named.0, named.1));
        }
        let tls = tunnel_tls(&self.config.ca_pem, identity)?;
        let ch = channel_tls(&self.config.ca_pem, identity)?;
        *self.tls.write().unwrap_or_else(std::sync::PoisonError::into_inner) = tokio_rustls::TlsConnector::from(tls);
        *self.channel_tls.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
            tokio_rustls::TlsConnector::from(ch);
        // The next channel stream dials with the new certificate; open ones finish on the old
        // connection, which closes once its last stream has.
        if let Ok(mut link) = self.channel_link.try_lock() {
            *link = None;
        }
        self.identity_generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Opens (or reopens after a change) a service channel's local listener; `Ok` with the port
    /// listened on. Must be called inside a Tokio runtime.
    pub async fn open_channel(self: &Arc<Self>, spec: &channel::ServiceChannel) -> Result<u16, channel::ChannelError> {
        if let Some(state) = self.channels.state(spec.id).filter(|_| self.channels.is_open_as(spec)) {
            return Ok(state.port);
        }
        // A changed channel may keep its port: the old listener must let go of it first.
        self.channels.close_and_wait(spec.id).await;
        let listener = channel::bind(&self.config.channel_host, spec.port).await?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(spec.port);
        let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Shutdown::new();
        let task = tokio::spawn(channel::accept(listener, spec.clone(), active.clone(), self.clone(), stop.clone()));
        self.channels.insert(spec.clone(), port, active, stop, task);
        tracing::info!(channel = spec.id, port, service = %spec.k8s_service, "service channel open");
        Ok(port)
    }

    /// Closes a channel's listener and its connections, and waits until its port is free.
    pub async fn close_channel(&self, id: u32) {
        self.channels.close_and_wait(id).await;
    }

    /// Closes every channel (the connection is going away) and waits until their ports are free.
    pub async fn close_channels(&self) {
        self.channels.close_all_and_wait().await;
    }

    pub fn channel_state(&self, id: u32) -> Option<channel::ChannelState> {
        self.channels.state(id)
    }

    /// Dials a channel connection to the first proxy replica that answers; the receiver
    /// completes when the connection has ended.
    async fn dial_channel(
        &self,
    ) -> std::io::Result<(
        hyper::client::conn::http2::SendRequest<ferry_core::body::BoxBody>,
        tokio::sync::oneshot::Receiver<()>,
    )> {
        use ferry_proto::tunnel::*;
        let mut last = std::io::Error::new(std::io::ErrorKind::NotConnected, "no proxy configured");
        let proxies = std::iter::once(&self.config.proxy_addr).chain(&self.config.more_proxy_addrs);
        for proxy in proxies {
            let tls = self.channel_tls.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            let io = match self.connect_with(proxy, tls).await {
                Ok(io) => io,
                Err(e) => {
                    tracing::warn!(%proxy, error = %e, "service channel connection failed");
                    last = e;
                    continue;
                }
            };
            let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .max_send_buf_size(SEND_BUFFER)
                .max_concurrent_streams(MAX_STREAMS)
                .keep_alive_interval(self.config.heartbeat)
                .keep_alive_timeout(self.config.heartbeat)
                .keep_alive_while_idle(true);
            match builder.handshake::<_, ferry_core::body::BoxBody>(TokioIo::new(io)).await {
                Ok((sender, conn)) => {
                    let (ended, on_end) = tokio::sync::oneshot::channel();
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "service channel connection ended");
                        }
                        let _ = ended.send(());
                    });
                    return Ok((sender, on_end));
                }
                Err(e) => last = std::io::Error::other(e),
            }
        }
        Err(last)
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

    /// Every proxy replica currently dialled and its tunnel connections up, sorted by address.
    pub fn replicas(&self) -> Vec<ReplicaState> {
        let map = self.replicas.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.iter()
            .map(|(address, n)| ReplicaState { address: address.clone(), connected: n.load(Ordering::Relaxed) })
            .collect()
    }

    /// Keeps `config.connections` tunnel connections up to every proxy replica until `shutdown`.
    /// Each replica has its own tasks and backoff: a dead replica delays nothing else.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let mut configured: Vec<String> = Vec::new();
        for a in std::iter::once(&self.config.proxy_addr).chain(&self.config.more_proxy_addrs) {
            if !configured.contains(a) {
                configured.push(a.clone());
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        let (sd, fenced, backend) = (shutdown.clone(), self.fenced.clone(), self.backend.clone());
        tasks.spawn(async move {
            // A fenced connector stops as well: waiting only for shutdown would keep `run` alive.
            tokio::select! {
                _ = sd.cancelled() => {}
                _ = fenced.cancelled() => {}
            }
            backend.stopping.cancel();
        });
        // Dial address → the token that stops its tunnel tasks.
        let mut running: std::collections::BTreeMap<String, Shutdown> = std::collections::BTreeMap::new();
        // Per configured entry, what it resolved to last: kept while a lookup fails.
        let mut known: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
        loop {
            let wanted = match self.config.resolve_replicas {
                None => configured.iter().cloned().collect(),
                Some(_) => {
                    for entry in &configured {
                        // A resolver that does not answer must not hold up shutdown.
                        let looked_up = tokio::select! {
                            r = tokio::time::timeout(Duration::from_secs(10), resolve(entry)) => r,
                            _ = shutdown.cancelled() => break,
                        };
                        let looked_up = looked_up.unwrap_or_else(|_| {
                            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 10 s"))
                        });
                        match looked_up {
                            Ok(addrs) if !addrs.is_empty() => {
                                known.insert(entry.clone(), addrs);
                            }
                            Ok(_) => tracing::warn!(%entry, "proxy replica lookup returned no address"),
                            Err(e) => tracing::warn!(%entry, error = %e, "proxy replica lookup failed"),
                        }
                    }
                    replica_set(&configured, &known)
                }
            };
            let (start, stop) = replica_changes(&running, &wanted);
            for proxy in stop {
                tracing::info!(%proxy, "proxy replica gone from DNS: draining its tunnels");
                if let Some(token) = running.remove(&proxy) {
                    token.cancel();
                }
                self.replicas.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&proxy);
            }
            for proxy in start {
                let token = shutdown.child_token();
                let up = Arc::new(AtomicUsize::new(0));
                self.replicas
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(proxy.clone(), up.clone());
                for slot in 0..self.config.connections.max(1) {
                    tasks.spawn(self.clone().keep_connected(proxy.clone(), slot, token.clone(), up.clone()));
                }
                running.insert(proxy, token);
            }
            let Some(interval) = self.config.resolve_replicas else { break };
            // Tasks of drained replicas are done: reaped so the set does not grow.
            while tasks.try_join_next().is_some() {}
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.fenced.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
            }
        }
        while tasks.join_next().await.is_some() {}
        // Stopped or fenced: a passive instance must not carry channel traffic either.
        self.channels.close_all();
    }

    /// `up` counts this replica's connections that are up.
    async fn keep_connected(self: Arc<Self>, proxy: String, slot: usize, shutdown: Shutdown, up: Arc<AtomicUsize>) {
        let mut backoff = self.config.backoff_initial;
        let mut generation = self.identity_generation.subscribe();
        // After a certificate renewal: the connection being replaced, drained once its successor
        // is up. Until then it keeps serving, so a failing dial with the new certificate drops
        // nothing.
        let mut retiring: Option<Shutdown> = None;
        // Connections replaced after a renewal, awaited before returning so that `run` ends only
        // once every tunnel has closed.
        let mut draining: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        while !shutdown.is_cancelled() && !self.fenced.is_cancelled() {
            let started = Instant::now();
            generation.mark_unchanged();
            match self.connect(&proxy).await {
                Ok(io) => {
                    tracing::info!(slot, %proxy, "tunnel connected");
                    self.status.send_modify(|s| {
                        s.connected += 1;
                        s.established += 1;
                    });
                    up.fetch_add(1, Ordering::Relaxed);
                    let drain = shutdown.child_token();
                    let greeted = Shutdown::new();
                    let (me, d, g, up) = (self.clone(), drain.clone(), greeted.clone(), up.clone());
                    let mut conn = tokio::spawn(async move {
                        me.serve(io, &d, &g).await;
                        me.status.send_modify(|s| s.connected -= 1);
                        up.fetch_sub(1, Ordering::Relaxed);
                    });
                    // The replaced connection drains only once the proxy has greeted its successor
                    // (and so admits it next): in between, a request finds no tunnel to go to.
                    let ended = match retiring.is_some() {
                        false => false,
                        true => tokio::select! {
                            _ = greeted.cancelled() => false,
                            _ = &mut conn => true,
                        },
                    };
                    if !ended && let Some(old) = retiring.take() {
                        old.cancel();
                    }
                    let renewed = !ended
                        && tokio::select! {
                            _ = &mut conn => false,
                            r = generation.changed() => r.is_ok(),
                        };
                    if renewed {
                        tracing::info!(slot, %proxy, "connection certificate renewed: a new tunnel replaces this one");
                        retiring = Some(drain);
                        draining.retain(|h| !h.is_finished());
                        draining.push(conn);
                        continue;
                    }
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
                _ = self.fenced.cancelled() => break,
                _ = tokio::time::sleep(jittered) => {}
            }
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
        for h in draining {
            let _ = h.await;
        }
    }

    async fn connect(&self, proxy: &str) -> std::io::Result<tokio_rustls::client::TlsStream<TunnelTcp>> {
        let tls = self.tls.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        self.connect_with(proxy, tls).await
    }

    async fn connect_with(
        &self,
        proxy: &str,
        tls: tokio_rustls::TlsConnector,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TunnelTcp>> {
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(proxy))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        tcp.set_nodelay(true)?;
        let tcp = tokio::io::BufReader::with_capacity(ferry_proto::tunnel::READ_BUFFER, tcp);
        tokio::time::timeout(Duration::from_secs(10), tls.connect(self.server_name.clone(), tcp))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
    }

    /// Serves one tunnel connection until it ends or `drain` (a child of the connector's
    /// shutdown) asks it to finish its open streams; cancels `greeted` once the proxy's hello
    /// is answered.
    async fn serve(&self, io: tokio_rustls::client::TlsStream<TunnelTcp>, drain: &Shutdown, greeted: &Shutdown) {
        use ferry_proto::tunnel::*;
        let backend = self.backend.clone();
        let own = self.config.fence.clone().unwrap_or_default();
        let fenced = self.fenced.clone();
        let status = self.status.clone();
        let greeted = greeted.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let backend = backend.clone();
            let hello = req.headers().get(KIND).is_some_and(|k| k == KIND_HELLO);
            let answer = hello.then(|| {
                greeted.cancel();
                hello_answer(&req, &own, &fenced, &status)
            });
            answer_stream(backend, answer, req)
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
        let io = Heard { io, last: self.last_heard.clone() };
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "tunnel connection error") },
            _ = self.fenced.cancelled() => {}
            _ = drain.cancelled() => {
                conn.as_mut().graceful_shutdown();
                if tokio::time::timeout(self.config.drain_timeout, conn).await.is_err() {
                    tracing::info!("tunnel drain deadline passed: closing the streams still open");
                }
            }
        }
    }
}

/// Every address `entry` (`host:port`) resolves to, as `ip:port` (IPv6 in brackets), sorted.
async fn resolve(entry: &str) -> std::io::Result<Vec<String>> {
    let mut addrs: Vec<String> = tokio::net::lookup_host(entry).await?.map(|a| a.to_string()).collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// The dial addresses for `configured` entries given their last lookups; an entry never
/// resolved is dialled by name, so a connector whose DNS is down at start still tries.
fn replica_set(
    configured: &[String],
    known: &std::collections::HashMap<String, Vec<String>>,
) -> std::collections::BTreeSet<String> {
    configured.iter().flat_map(|e| known.get(e).cloned().unwrap_or_else(|| vec![e.clone()])).collect()
}

/// (replicas to start, replicas to drain) to get from `running` to `wanted`.
fn replica_changes<V>(
    running: &std::collections::BTreeMap<String, V>,
    wanted: &std::collections::BTreeSet<String>,
) -> (Vec<String>, Vec<String>) {
    let start = wanted.iter().filter(|a| !running.contains_key(*a)).cloned().collect();
    let stop = running.keys().filter(|a| !wanted.contains(*a)).cloned().collect();
    (start, stop)
}

/// The future of one tunnel stream, which hyper keeps in the stream's task for as long as the
/// stream lives: the access check, audit and backend connection are boxed and freed once the
/// response head is out, so an idle relayed connection does not carry their state (a few KiB;
/// `stream_task_stays_small` bounds it).
async fn answer_stream(
    backend: Arc<backend::Backend>,
    hello: Option<hyper::Response<ferry_core::body::BoxBody>>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<ferry_core::body::BoxBody>, std::convert::Infallible> {
    match hello {
        Some(r) => Ok(r),
        None => Ok(Box::pin(backend.handle(req)).await),
    }
}

/// TLS towards the proxy, without session resumption: a resumed TLS 1.3 session skips the client
/// certificate, so an expired or replaced certificate would go on reconnecting on the strength of
/// an old session. Tunnels reconnect rarely; a full handshake each time costs nothing that matters.
fn tunnel_tls(ca_pem: &str, identity: &CertifiedKey) -> Result<Arc<rustls::ClientConfig>, ConnectorError> {
    let base = ferry_core::tls::client_config(ca_pem, Some(identity), &[ferry_proto::tunnel::ALPN])?;
    let mut cfg = (*base).clone();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// TLS for the service channel connection: the tunnel's identity, its own ALPN.
fn channel_tls(ca_pem: &str, identity: &CertifiedKey) -> Result<Arc<rustls::ClientConfig>, ConnectorError> {
    let mut cfg = (*tunnel_tls(ca_pem, identity)?).clone();
    cfg.alpn_protocols = vec![ferry_proto::tunnel::CHANNEL_ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

impl channel::Link for Connector {
    async fn link(
        self: Arc<Self>,
    ) -> std::io::Result<hyper::client::conn::http2::SendRequest<ferry_core::body::BoxBody>> {
        let mut link = self.channel_link.lock().await;
        if let Some(s) = link.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let (s, ended) = self.dial_channel().await?;
        *link = Some(s.clone());
        // The cached handle goes with its connection: a stream queued in the instant the
        // connection's dispatcher stopped is stranded in its channel until every handle is gone
        // (tokio-rs/tokio#7714), and only then fails instead of waiting forever.
        let me = Arc::downgrade(&self);
        tokio::spawn(async move {
            let _ = ended.await;
            if let Some(me) = me.upgrade() {
                let mut link = me.channel_link.lock().await;
                if link.as_ref().is_some_and(|s| s.is_closed()) {
                    *link = None;
                }
            }
        });
        Ok(s)
    }

    fn audit(&self) -> &audit::AuditLog {
        &self.audit
    }
}

/// A tunnel connection that notes when the proxy last sent something (data or a PING ack).
struct Heard<T> {
    io: T,
    last: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Heard<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
            self.last.fetch_max(u64::try_from(now).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Heard<T> {
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

/// Answers the proxy's `hello` with this instance's fence. A proxy that knows a higher one is
/// about to refuse this tunnel: a newer master serves the slot, so this connector stops all its
/// tunnels (to every replica, including ones that restarted and forgot) instead of retrying.
fn hello_answer(
    req: &hyper::Request<hyper::body::Incoming>,
    own: &ferry_proto::tunnel::Fence,
    fenced: &Shutdown,
    status: &watch::Sender<TunnelStatus>,
) -> hyper::Response<ferry_core::body::BoxBody> {
    use ferry_proto::tunnel::{FENCE, Fence};
    let known = req.headers().get(FENCE).and_then(|v| v.to_str().ok()).and_then(Fence::parse);
    if let Some(known) = known
        && known > *own
        && !fenced.is_cancelled()
    {
        tracing::error!(
            epoch = own.epoch,
            serving_epoch = known.epoch,
            "a newer master serves this subaccount and location at the proxy: closing this connector's tunnels"
        );
        status.send_modify(|s| s.fenced = true);
        fenced.cancel();
    }
    let mut r = hyper::Response::new(ferry_core::body::empty());
    if let Ok(v) = hyper::header::HeaderValue::from_str(&own.to_header()) {
        r.headers_mut().insert(FENCE, v);
    }
    r
}

/// Builds and runs a connector until `shutdown`.
pub async fn run(config: ConnectorConfig, shutdown: Shutdown) -> Result<(), ConnectorError> {
    Arc::new(Connector::new(config)?).run(shutdown).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ip_literal_resolves_to_itself_and_a_name_to_its_addresses() {
        assert_eq!(resolve("127.0.0.1:20005").await.unwrap(), vec!["127.0.0.1:20005"]);
        assert_eq!(resolve("[::1]:7").await.unwrap(), vec!["[::1]:7"]);
        let local = resolve("localhost:20005").await.unwrap();
        assert!(local.contains(&"127.0.0.1:20005".to_owned()), "{local:?}");
    }

    #[test]
    fn replicas_follow_the_lookups_and_an_unresolved_name_is_dialled_as_is() {
        let configured = vec!["proxy.ns:20005".to_owned(), "10.0.0.9:20005".to_owned()];
        let mut known = std::collections::HashMap::new();
        let set = replica_set(&configured, &known);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), ["10.0.0.9:20005", "proxy.ns:20005"]);
        known.insert(configured[0].clone(), vec!["10.0.0.1:20005".to_owned(), "10.0.0.2:20005".to_owned()]);
        known.insert(configured[1].clone(), vec!["10.0.0.9:20005".to_owned()]);
        let wanted = replica_set(&configured, &known);
        let mut running = std::collections::BTreeMap::new();
        running.insert("proxy.ns:20005".to_owned(), ());
        running.insert("10.0.0.2:20005".to_owned(), ());
        let (start, stop) = replica_changes(&running, &wanted);
        assert_eq!(start, ["10.0.0.1:20005", "10.0.0.9:20005"]);
        assert_eq!(stop, ["proxy.ns:20005"]);
    }

    fn size_of_output<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every open tunnel stream (1,000 idle SOCKS5 connections are 1,000 streams) keeps its
    /// task's future; the relay's states must stay out of it (boxed, freed after the response
    /// head). Unboxed, it was 2.7 KiB in a debug build.
    #[test]
    fn stream_task_stays_small() {
        let size = size_of_output(super::answer_stream);
        eprintln!("answer_stream future: {size} bytes");
        assert!(size <= 768, "the tunnel stream future grew to {size} bytes");
    }
}
