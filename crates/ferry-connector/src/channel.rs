//! Service channels, connector side (SAP §4.8, on-premise → cloud): a local port where
//! on-premise clients connect; each connection becomes one stream to a service the proxy has
//! registered for this subaccount (`ferry_proxy::channels`), over a channel connection the
//! connector dials to the proxy's tunnel port with its connection certificate and ALPN
//! `ferry-channel/1` (there the connector is the HTTP/2 client; see `ferry_proto::tunnel`).
//!
//! A channel allows at most `connections` on-premise connections at once; one more is closed at
//! once (and audited as denied), so a client learns of the limit instead of hanging in a backlog.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use ferry_core::Shutdown;
use ferry_core::body::{self, BoxBody};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;
use tokio::net::{TcpListener, TcpStream};

use crate::audit::{AuditEvent, Outcome};

/// SAP's channel types. Ferry carries `K8S` (TCP to a cloud-side service); the others need
/// SAP's cloud systems (HANA, ABAP Cloud, Neo virtual machines).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChannelType {
    K8S,
}

impl ChannelType {
    pub fn parse(s: &str) -> Option<Self> {
        (s == "K8S").then_some(Self::K8S)
    }
    pub fn as_str(self) -> &'static str {
        "K8S"
    }
}

/// A service channel as the REST API shows and stores it (SAP's `{id, type, port, enabled,
/// connections, comment}`; `k8sService` names the service registered with the proxy).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceChannel {
    pub id: u32,
    #[serde(rename = "type")]
    pub kind: ChannelType,
    /// Service id the proxy knows for this subaccount (its `[[channel_targets]]` entry).
    pub k8s_service: String,
    /// The local port on-premise clients connect to.
    pub port: u16,
    pub enabled: bool,
    /// Concurrent on-premise connections allowed.
    pub connections: u32,
    #[serde(default)]
    pub comment: String,
}

/// Why a channel cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot listen on {0}:{1}: {2}")]
    Bind(String, u16, std::io::Error),
}

/// What the monitoring and REST state show of an open channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelState {
    /// Port actually listened on (the configured one, or the one the system chose for port 0).
    pub port: u16,
    /// On-premise connections open now.
    pub connections: usize,
}

struct Open {
    spec: ServiceChannel,
    port: u16,
    active: Arc<AtomicUsize>,
    stop: Shutdown,
    /// The accept loop; it drops the listener when it ends.
    task: tokio::task::JoinHandle<()>,
}

/// The open channels of one subaccount connection.
#[derive(Default)]
pub(crate) struct Channels {
    open: Mutex<HashMap<u32, Open>>,
}

impl Channels {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Open>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn state(&self, id: u32) -> Option<ChannelState> {
        self.lock().get(&id).map(|o| ChannelState { port: o.port, connections: o.active.load(Ordering::Relaxed) })
    }

    /// Closes a channel and waits until its port is free again.
    pub(crate) async fn close_and_wait(&self, id: u32) {
        let open = self.lock().remove(&id);
        if let Some(o) = open {
            o.stop.cancel();
            let _ = o.task.await;
        }
    }

    pub(crate) fn close_all(&self) {
        for (_, o) in self.lock().drain() {
            o.stop.cancel();
        }
    }

    /// Closes every channel and waits until their ports are free.
    pub(crate) async fn close_all_and_wait(&self) {
        let open: Vec<Open> = self.lock().drain().map(|(_, o)| o).collect();
        for o in open {
            o.stop.cancel();
            let _ = o.task.await;
        }
    }

    /// Whether `spec` is open as it is (a changed one is reopened).
    pub(crate) fn is_open_as(&self, spec: &ServiceChannel) -> bool {
        self.lock().get(&spec.id).is_some_and(|o| o.spec == *spec)
    }

    pub(crate) fn insert(
        &self,
        spec: ServiceChannel,
        port: u16,
        active: Arc<AtomicUsize>,
        stop: Shutdown,
        task: tokio::task::JoinHandle<()>,
    ) {
        if let Some(old) = self.lock().insert(spec.id, Open { spec, port, active, stop, task }) {
            old.stop.cancel();
        }
    }
}

/// Binds a channel's port; the caller then runs [`accept`] on it.
pub(crate) async fn bind(host: &str, port: u16) -> Result<TcpListener, ChannelError> {
    TcpListener::bind((host, port)).await.map_err(|e| ChannelError::Bind(host.to_owned(), port, e))
}

/// What a channel stream needs from its connector.
pub(crate) trait Link: Send + Sync + 'static {
    /// A ready channel connection to a proxy (dialled on first use and after it broke).
    fn link(
        self: Arc<Self>,
    ) -> impl std::future::Future<Output = std::io::Result<hyper::client::conn::http2::SendRequest<BoxBody>>> + Send;
    fn audit(&self) -> &crate::audit::AuditLog;
}

/// Accepts on-premise connections of one channel until `stop`.
pub(crate) async fn accept<L: Link>(
    listener: TcpListener,
    spec: ServiceChannel,
    active: Arc<AtomicUsize>,
    link: Arc<L>,
    stop: Shutdown,
) {
    let spec = Arc::new(spec);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(channel = spec.id, error = %e, "service channel accept failed");
                    // Out of file descriptors and the like: give the system a moment.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let request_id = uuid::Uuid::new_v4().to_string();
        // Counted before the check so that two connections racing for the last slot cannot both
        // get it.
        if active.fetch_add(1, Ordering::AcqRel) >= spec.connections as usize {
            active.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(channel = spec.id, %peer, max = spec.connections, "service channel connection refused: all connections in use");
            let audit = link.audit().clone();
            let ev = event(&spec, request_id, Outcome::Denied, "MaxConnections", &peer.to_string());
            tokio::spawn(async move { audit.record(ev).await });
            drop(stream);
            continue;
        }
        let (spec, active, link, stop) = (spec.clone(), active.clone(), link.clone(), stop.clone());
        tokio::spawn(async move {
            let peer = peer.to_string();
            tokio::select! {
                _ = relay(stream, &spec, request_id, &peer, link) => {}
                // A closed channel ends its connections too, as disabling it in SAP's UI does.
                _ = stop.cancelled() => {}
            }
            active.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

fn event(spec: &ServiceChannel, request_id: String, outcome: Outcome, reason: &str, peer: &str) -> AuditEvent {
    AuditEvent {
        outcome,
        request_id,
        client: peer.to_owned(),
        system: spec.k8s_service.clone(),
        protocol: "CHANNEL",
        method: spec.kind.as_str().to_owned(),
        path: format!("port {}", spec.port),
        reason: reason.to_owned(),
        user: String::new(),
        bytes_in: 0,
        bytes_out: 0,
        duration: std::time::Duration::ZERO,
    }
}

/// One on-premise connection: a stream to the proxy, bytes both ways, each direction
/// half-closed on its own; audited when both ended.
async fn relay<L: Link>(stream: TcpStream, spec: &ServiceChannel, request_id: String, peer: &str, link: Arc<L>) {
    use ferry_proto::tunnel::*;
    let started = Instant::now();
    let audit = link.audit().clone();
    let mut ev = event(spec, request_id.clone(), Outcome::Denied, "", peer);
    let mut sender = match link.link().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(channel = spec.id, error = %e, "service channel: no connection to the proxy");
            ev.reason = "ProxyUnreachable".into();
            audit.record(ev).await;
            return;
        }
    };
    let (read, write) = stream.into_split();
    let up = Arc::new(AtomicU64::new(0));
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri("/")
        .header(KIND, KIND_CHANNEL)
        .header(TARGET, spec.k8s_service.as_str())
        .header(REQUEST_ID, request_id.as_str())
        .body(body::from_reader(CountRead { inner: read, n: up.clone() }));
    let Ok(req) = req else {
        ev.reason = "BadServiceId".into();
        audit.record(ev).await;
        return;
    };
    let resp = match sender.ready().await {
        Ok(()) => {
            let answer = sender.send_request(req);
            // Not held while waiting: a stream queued as the connection's dispatcher stops is
            // handed back (failed) only once every handle is gone (see `Connector::link`).
            drop(sender);
            answer.await
        }
        Err(e) => Err(e),
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(channel = spec.id, error = %e, "service channel stream failed");
            ev.reason = "ProxyStreamFailed".into();
            audit.record(ev).await;
            return;
        }
    };
    if !resp.status().is_success() {
        let why = resp.headers().get(ERROR).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        tracing::warn!(channel = spec.id, service = %spec.k8s_service, status = %resp.status(), error = %why, "service channel refused by the proxy");
        ev.reason = format!("Proxy {} {why}", resp.status().as_u16());
        audit.record(ev).await;
        return;
    }
    let down = body::copy_to_writer(resp.into_body(), write).await;
    if let Err(e) = &down {
        tracing::debug!(channel = spec.id, error = %e, "proxy → on-premise copy ended");
    }
    ev.outcome = Outcome::Allowed;
    ev.bytes_in = up.load(Ordering::Relaxed);
    ev.bytes_out = down.unwrap_or(0);
    ev.duration = started.elapsed();
    audit.record(ev).await;
}

/// Counts the bytes read from the on-premise client, for the audit record.
struct CountRead<R> {
    inner: R,
    n: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for CountRead<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.n.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        r
    }
}
