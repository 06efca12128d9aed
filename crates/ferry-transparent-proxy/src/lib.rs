//! Ferry's Transparent Proxy (SPEC §5): each `Destination` custom resource becomes a local endpoint
//! that looks the destination up in the Destination Service, adds its credentials and routes the
//! request directly (Internet) or through the Connectivity Proxy (OnPremise).
//!
//! Outside Kubernetes the resources come from a folder of YAML files, scanned every
//! `poll_interval`: a new resource gets a listener on `listen_host` (its `spec.service.port`, or
//! a free port), a changed one is swapped in place (or re-bound when its port or protocol
//! changes), a removed one is closed. [`run`] publishes the current endpoints on a watch channel
//! and, when configured, in a JSON file.
//!
//! On Kubernetes [`run_with_source`] takes the resources from a channel instead and serves them
//! the cluster's way (module [`cluster`]).

pub mod cluster;
pub mod config;
pub mod error;
mod http;
pub mod resolve;
pub mod resource;
mod tcp;
mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ferry_core::Shutdown;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

pub use cluster::run_with_source;
pub use config::{Config, FileConfig, TenantMode};
pub use error::{Origin, ProxyError, TpError};
pub use resource::{Destination, DestinationSpec, DestinationStatus, LoadError, ValidationError};

use crate::http::{Current, Shared};
use crate::resolve::{Lookup, Resolver};

/// One served resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// `<namespace>/<name>` of the resource.
    pub resource: String,
    /// `destinationRef.name` (`*` for a gateway).
    pub destination: String,
    /// `http`, or `tcp` for TCP, LDAP and MAIL destinations.
    pub protocol: &'static str,
    pub address: SocketAddr,
    /// The tenant subdomain of a per-tenant TCP endpoint (shared tenant mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Why the endpoint cannot serve, when that is known without a request (an unknown
    /// `destinationServiceInstanceName`); its requests are answered with the same message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every served resource by `<namespace>/<name>`.
pub type Endpoints = BTreeMap<String, Endpoint>;

/// Serves the resources of `config.resources_dir` until `shutdown` fires; `endpoints` gets the
/// endpoint list after the first scan and after every change.
pub async fn run(config: Config, endpoints: watch::Sender<Endpoints>, shutdown: Shutdown) -> Result<(), TpError> {
    serve(config, None, endpoints, shutdown).await
}

/// The folder mode (`cluster` absent) or the Kubernetes mode.
async fn serve(
    config: Config,
    cluster: Option<cluster::Cluster>,
    endpoints: watch::Sender<Endpoints>,
    shutdown: Shutdown,
) -> Result<(), TpError> {
    ferry_core::init_crypto();
    let client = ferry_client::Client::new(config.bindings.clone(), config.ca_pem.as_deref())?;
    let mut resolvers = BTreeMap::new();
    resolvers.insert(config.default_instance_name.clone(), Resolver::new(client.clone(), config.ca_pem.as_deref())?);
    for (name, bindings) in &config.instances {
        let c = ferry_client::Client::new(bindings.clone(), config.ca_pem.as_deref())?;
        resolvers.insert(name.clone(), Resolver::new(c, config.ca_pem.as_deref())?);
    }
    let mut tls = ferry_core::tls::outbound_client_config(config.ca_pem.as_deref())?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let shared = Arc::new(Shared {
        resolvers,
        default_instance: config.default_instance_name.clone(),
        client,
        tenant_mode: config.tenant_mode,
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        ca_pem: config.ca_pem.clone(),
        pools: upstream::Pools::new(http::BACKEND_CONNECT_TIMEOUT, config.proxy_connect_timeout),
    });
    let mut watcher = Watcher {
        config,
        shared,
        files: BTreeMap::new(),
        running: BTreeMap::new(),
        tasks: TaskTracker::new(),
        dir_error: None,
        bind_errors: BTreeMap::new(),
        shutdown: shutdown.clone(),
        cluster,
    };
    if let Some(c) = &mut watcher.cluster {
        c.start(&watcher.tasks, watcher.shared.clone(), shutdown.clone());
    }
    let mut first = true;
    loop {
        let changed = watcher.reconcile().await;
        if changed || first {
            let list = watcher.endpoints();
            watcher.write_endpoints_file(&list);
            endpoints.send_replace(list);
            first = false;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(watcher.config.poll_interval) => {}
            _ = async { if let Some(c) = &mut watcher.cluster { c.changed().await } else { std::future::pending().await } } => {}
        }
    }
    watcher.tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(15), watcher.tasks.wait()).await;
    Ok(())
}

struct FileState {
    stamp: (SystemTime, u64),
    resources: Vec<Destination>,
}

struct Running {
    resource: Destination,
    tenant: Option<String>,
    current: Current,
    wanted_port: u16,
    tcp: bool,
    /// False when `tcp` is a guess because the destination did not resolve.
    kind_known: bool,
    checked: Instant,
    address: SocketAddr,
    stop: Shutdown,
}

/// How many scans a guessed protocol stands before the destination is looked up again (30 s
/// at the default interval).
const RECHECK_SCANS: u32 = 30;

struct Watcher {
    config: Config,
    shared: Arc<Shared>,
    files: BTreeMap<PathBuf, FileState>,
    running: BTreeMap<String, Running>,
    tasks: TaskTracker,
    /// The last error reading the folder, so it is logged once, not every scan.
    dir_error: Option<String>,
    /// The last listen error per resource, so each is logged once.
    bind_errors: BTreeMap<String, String>,
    shutdown: Shutdown,
    /// Kubernetes mode: where resources come from and how HTTP ones are served.
    cluster: Option<cluster::Cluster>,
}

fn key_of(d: &Destination) -> String {
    format!("{}/{}", d.namespace_or_default(), d.name())
}

/// The port to listen on: `spec.service.port`, except for per-tenant endpoints, which cannot
/// all have it and take free ports.
fn wanted_port(d: &Destination, tenant: Option<&str>) -> u16 {
    if tenant.is_some() {
        return 0;
    }
    d.spec.service.as_ref().map(|s| s.port).unwrap_or(0)
}

impl Watcher {
    /// Re-reads changed files and brings the listeners in line; true when the endpoint list changed.
    async fn reconcile(&mut self) -> bool {
        let mut sources: Vec<(String, Destination)> = Vec::new();
        if let Some(c) = &self.cluster {
            sources.extend(c.desired().into_iter().map(|d| ("the Kubernetes API".to_owned(), d)));
        } else {
            self.scan();
            for (path, file) in &self.files {
                sources.extend(file.resources.iter().map(|d| (path.display().to_string(), d.clone())));
            }
        }
        let mut desired: BTreeMap<String, (Destination, Option<String>)> = BTreeMap::new();
        for (origin, d) in &sources {
            // Shared tenant mode: a raw TCP connection cannot name its tenant, so the
            // annotation's tenants get one endpoint each, `<name>-<tenant>` (SPEC §5.1).
            let tenants = match self.config.tenant_mode {
                TenantMode::Shared => d.tenant_subdomains().unwrap_or_default(),
                TenantMode::Dedicated => Vec::new(),
            };
            let entries: Vec<(String, Option<String>)> = if tenants.is_empty() {
                vec![(key_of(d), None)]
            } else {
                tenants.into_iter().map(|t| (format!("{}-{t}", key_of(d)), Some(t))).collect()
            };
            for (key, tenant) in entries {
                if desired.contains_key(&key) {
                    tracing::warn!(resource = %key, from = %origin, "resource defined twice; the first one wins");
                    continue;
                }
                desired.insert(key, (d.clone(), tenant));
            }
        }
        let mut changed = false;
        let gone: Vec<String> = self.running.keys().filter(|k| !desired.contains_key(*k)).cloned().collect();
        for key in gone {
            if let Some(r) = self.running.remove(&key) {
                r.stop.cancel();
                tracing::info!(resource = %key, "endpoint removed");
                changed = true;
            }
        }
        for (key, (d, tenant)) in desired {
            // An unchanged resource needs nothing, unless its protocol was a guess that is due
            // for another look (its destination did not resolve when the endpoint started).
            if self.running.get(&key).is_some_and(|r| {
                r.resource == d
                    && r.tenant == tenant
                    && (r.kind_known || r.checked.elapsed() < self.config.poll_interval * RECHECK_SCANS)
            }) {
                continue;
            }
            let (tcp, kind_known) = self.is_tcp(&d, tenant.as_deref()).await;
            let port = self.wanted_port(&d, tenant.as_deref());
            if let Some(r) = self.running.get_mut(&key) {
                if r.wanted_port == port && r.tcp == tcp && r.tenant == tenant {
                    r.kind_known = kind_known;
                    r.checked = Instant::now();
                    if r.resource != d {
                        // Same listener, new resource: requests from now on use it.
                        match r.current.write() {
                            Ok(mut c) => *c = Arc::new(d.clone()),
                            Err(p) => *p.into_inner() = Arc::new(d.clone()),
                        }
                        let old_dest = std::mem::replace(&mut r.resource, d);
                        changed |= old_dest.spec.destination_ref.name != r.resource.spec.destination_ref.name;
                        tracing::info!(resource = %key, "endpoint updated");
                    }
                    continue;
                }
                if let Some(old) = self.running.remove(&key) {
                    old.stop.cancel();
                }
                changed = true;
            }
            if let Some(r) = self.start(&key, d, tenant, tcp, kind_known).await {
                self.running.insert(key, r);
                changed = true;
            }
        }
        if let Some(c) = &self.cluster {
            c.set_routes(self.running.values().filter(|r| !r.tcp).map(|r| {
                (r.resource.namespace_or_default().to_owned(), r.resource.name().to_owned(), r.current.clone())
            }));
        }
        changed
    }

    /// The port a resource asks for: on Kubernetes the one its backend Service targets (the
    /// controller derives it the same way, per tenant for a per-tenant endpoint).
    fn wanted_port(&self, d: &Destination, tenant: Option<&str>) -> u16 {
        match (&self.cluster, tenant) {
            (Some(_), None) => cluster::tcp_port(d.namespace_or_default(), d.name()),
            (Some(_), Some(t)) => cluster::tcp_port(d.namespace_or_default(), &format!("{}-{t}", d.name())),
            (None, _) => wanted_port(d, tenant),
        }
    }

    fn scan(&mut self) {
        let dir = self.config.resources_dir.clone();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => {
                self.dir_error = None;
                e
            }
            Err(e) => {
                let msg = e.to_string();
                if self.dir_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(dir = %dir.display(), error = %msg, "cannot read the resources folder");
                    self.dir_error = Some(msg);
                }
                // Keep serving what was loaded: a folder briefly gone (remounted) is no reason to drop traffic.
                return;
            }
        };
        let mut seen = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if !is_yaml(&path) {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            if !meta.is_file() {
                continue;
            }
            seen.push(path.clone());
            let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            match resource::load_file(&path) {
                Ok(resources) => {
                    tracing::info!(file = %path.display(), resources = resources.len(), "resources loaded");
                    self.files.insert(path, FileState { stamp, resources });
                }
                Err(e) => {
                    // The file's previous resources stay until it is fixed.
                    tracing::error!(error = %e, "resource file ignored");
                    let resources = self.files.remove(&path).map(|f| f.resources).unwrap_or_default();
                    self.files.insert(path, FileState { stamp, resources });
                }
            }
        }
        self.files.retain(|p, _| seen.contains(p));
    }

    /// Whether a bound resource's destination is TCP, LDAP or MAIL (a gateway is HTTP), and
    /// whether that is known. When the destination cannot be looked up yet the endpoint serves
    /// HTTP (a per-tenant endpoint TCP), which reports why per request, and the question is asked
    /// again after [`RECHECK_SCANS`] scans.
    async fn is_tcp(&self, d: &Destination, tenant: Option<&str>) -> (bool, bool) {
        if d.is_gateway() {
            return (false, true);
        }
        let lookup = Lookup {
            name: d.spec.destination_ref.name.clone(),
            level: d.spec.destination_ref.level,
            fragment: d.spec.fragment_ref.as_ref().map(|f| f.name.clone()),
            fragment_level: d.spec.fragment_ref.as_ref().and_then(|f| f.level),
            fragment_optional: d.spec.fragment_ref.as_ref().and_then(|f| f.optional),
            resource: d.name().to_owned(),
            tenant: tenant.map(|t| ferry_client::Tenant::Subdomain(t.to_owned())),
            ..Default::default()
        };
        let resolver = match self.shared.resolver(d) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(resource = d.name(), error = %e.message, "endpoint cannot serve");
                return (false, true);
            }
        };
        match resolver.resolve(&lookup, false).await {
            Ok(r) => (matches!(http::destination_type(&r.config).as_str(), "TCP" | "LDAP" | "MAIL"), true),
            // A per-tenant endpoint exists for non-HTTP destinations only, so it stays raw TCP.
            Err(e) => {
                let protocol = if tenant.is_some() { "TCP" } else { "HTTP" };
                tracing::info!(resource = d.name(), tenant, error = %e.message, "destination not resolvable yet; serving {protocol}");
                (tenant.is_some(), false)
            }
        }
    }

    async fn start(
        &mut self,
        key: &str,
        d: Destination,
        tenant: Option<String>,
        tcp: bool,
        kind_known: bool,
    ) -> Option<Running> {
        let port = self.wanted_port(&d, tenant.as_deref());
        if let (Some(c), false) = (&self.cluster, tcp) {
            // Served by the shared listener once the routes are rebuilt.
            tracing::info!(resource = %key, address = %c.http_addr, destination = %d.spec.destination_ref.name, "endpoint routed");
            return Some(Running {
                current: Arc::new(std::sync::RwLock::new(Arc::new(d.clone()))),
                resource: d,
                wanted_port: port,
                tcp,
                kind_known,
                checked: Instant::now(),
                address: c.http_addr,
                stop: self.shutdown.child_token(),
                tenant,
            });
        }
        let addr = SocketAddr::new(self.config.listen_host, port);
        // A listener just closed for the same port may take a moment to go away.
        let mut attempt = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if attempt < 40 && port != 0 && e.kind() == std::io::ErrorKind::AddrInUse => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(e) => {
                    // Logged once per distinct error, not at every scan.
                    let msg = format!("{addr}: {e}");
                    if self.bind_errors.get(key) != Some(&msg) {
                        tracing::error!(resource = %key, %addr, error = %e, "cannot listen; retrying at every scan");
                        self.bind_errors.insert(key.to_owned(), msg);
                    }
                    return None;
                }
            }
        };
        self.bind_errors.remove(key);
        let address = listener.local_addr().ok()?;
        let current: Current = Arc::new(std::sync::RwLock::new(Arc::new(d.clone())));
        let stop = self.shutdown.child_token();
        let shared = self.shared.clone();
        let cur = current.clone();
        let sd = stop.clone();
        let opts = ferry_core::serve::AcceptOptions::named("transparent-proxy");
        if tcp {
            let t = tenant.clone();
            self.tasks.spawn(ferry_core::serve::accept_loop(listener, opts, stop.clone(), move |stream, _| {
                tcp::serve_connection(stream, shared.clone(), cur.clone(), t.clone())
            }));
        } else {
            self.tasks.spawn(ferry_core::serve::accept_loop(listener, opts, stop.clone(), move |stream, _| {
                http::serve_connection(stream, shared.clone(), cur.clone(), sd.clone())
            }));
        }
        let protocol = if tcp { "tcp" } else { "http" };
        tracing::info!(resource = %key, %address, protocol, destination = %d.spec.destination_ref.name, "endpoint listening");
        Some(Running {
            resource: d,
            tenant,
            current,
            wanted_port: port,
            tcp,
            kind_known,
            checked: Instant::now(),
            address,
            stop,
        })
    }

    fn endpoints(&self) -> Endpoints {
        self.running
            .iter()
            .map(|(k, r)| {
                let e = Endpoint {
                    resource: k.clone(),
                    destination: r.resource.spec.destination_ref.name.clone(),
                    protocol: if r.tcp { "tcp" } else { "http" },
                    address: r.address,
                    tenant: r.tenant.clone(),
                    error: self.shared.resolver(&r.resource).err().map(|e| e.message),
                };
                (k.clone(), e)
            })
            .collect()
    }

    fn write_endpoints_file(&self, list: &Endpoints) {
        let Some(path) = &self.config.endpoints_file else { return };
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string_pretty(list).unwrap_or_default();
        // Rename makes the new list appear whole; a reader never sees half a file.
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
            tracing::warn!(file = %path.display(), error = %e, "cannot write the endpoints file");
        }
    }
}

fn is_yaml(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}
