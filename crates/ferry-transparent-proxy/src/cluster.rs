//! Kubernetes serving mode: the resources come from a channel (fed by a watch of the API server,
//! see `ferry-k8s`), every HTTP resource is served on one shared listener that routes by the
//! request's `Host` (`<name>.<namespace>[.svc[.<cluster domain>]][:port]`, the names apps call), and
//! every TCP, LDAP or MAIL resource gets its own listener on [`tcp_port`], the port its backend
//! Service targets. A byte stream carries no host name, hence one port per resource.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use ferry_core::Shutdown;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::http::{Current, Shared, current_of};
use crate::{Config, Destination, Endpoints, Origin, ProxyError, TpError};

/// First port of the TCP range; [`tcp_port`] maps each resource into
/// `TCP_PORT_BASE..TCP_PORT_BASE + TCP_PORT_COUNT`.
pub const TCP_PORT_BASE: u16 = 21000;
pub const TCP_PORT_COUNT: u16 = 10000;

/// The container port serving the TCP resource `<namespace>/<name>`: derived from the name, so
/// the controller (which writes it as the backend Service's `targetPort`) and every proxy pod agree
/// without sharing state. Two resources landing on one port are reported by the proxy (the
/// second cannot listen) and need one of them renamed.
pub fn tcp_port(namespace: &str, name: &str) -> u16 {
    // FNV-1a: stable across releases and platforms, unlike std's hasher.
    let hash = format!("{namespace}/{name}")
        .bytes()
        .fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    // The remainder is below TCP_PORT_COUNT, so it fits a u16.
    TCP_PORT_BASE + u16::try_from(hash % u32::from(TCP_PORT_COUNT)).unwrap_or(0)
}

/// Serves the resources `source` delivers until `shutdown` fires; `endpoints` gets the endpoint
/// list after every change. HTTP resources share `http_listen`, which opens only once `source`
/// has delivered its first set, so a pod probing that port is ready when it knows its resources.
/// `config.resources_dir` and `config.poll_interval`'s folder role are unused; the interval still
/// paces re-checks of destinations that did not resolve.
pub async fn run_with_source(
    config: Config,
    http_listen: SocketAddr,
    mut source: watch::Receiver<Vec<Destination>>,
    endpoints: watch::Sender<Endpoints>,
    shutdown: Shutdown,
) -> Result<(), TpError> {
    tokio::select! {
        r = source.changed() => if r.is_err() {
            return Err(TpError::Config("the resource source ended before delivering any resources".into()));
        },
        _ = shutdown.cancelled() => return Ok(()),
    }
    let listener = TcpListener::bind(http_listen)
        .await
        .map_err(|e| TpError::Config(format!("cannot listen on {http_listen}: {e}")))?;
    let http_addr = listener.local_addr().map_err(|e| TpError::Config(format!("{http_listen}: {e}")))?;
    let cluster = Cluster { source, open: true, listener: Some(listener), http_addr, routes: Routes::default() };
    crate::serve(config, Some(cluster), endpoints, shutdown).await
}

/// `(namespace, name)` → the live resource of each HTTP endpoint.
type Routes = Arc<RwLock<BTreeMap<(String, String), Current>>>;

pub(crate) struct Cluster {
    source: watch::Receiver<Vec<Destination>>,
    /// False once the sender is gone: the last set stays served.
    open: bool,
    listener: Option<TcpListener>,
    pub(crate) http_addr: SocketAddr,
    routes: Routes,
}

impl Cluster {
    /// Starts the shared HTTP listener (once).
    pub(crate) fn start(&mut self, tasks: &TaskTracker, shared: Arc<Shared>, shutdown: Shutdown) {
        let Some(listener) = self.listener.take() else { return };
        let routes = self.routes.clone();
        let opts = ferry_core::serve::AcceptOptions::named("transparent-proxy");
        let sd = shutdown.clone();
        tracing::info!(address = %self.http_addr, "serving HTTP resources by Host");
        tasks.spawn(ferry_core::serve::accept_loop(listener, opts, shutdown, move |stream, _| {
            serve_connection(stream, shared.clone(), routes.clone(), sd.clone())
        }));
    }

    /// The current set of resources.
    pub(crate) fn desired(&self) -> Vec<Destination> {
        self.source.borrow().clone()
    }

    /// Waits for a new set; never returns once the source is gone.
    pub(crate) async fn changed(&mut self) {
        if self.open && self.source.changed().await.is_ok() {
            return;
        }
        if self.open {
            tracing::warn!("the resource source ended; serving the last resources");
            self.open = false;
        }
        std::future::pending::<()>().await;
    }

    /// Replaces the routing table with the HTTP endpoints.
    pub(crate) fn set_routes(&self, http: impl Iterator<Item = (String, String, Current)>) {
        let table: BTreeMap<_, _> = http.map(|(ns, name, c)| ((ns, name), c)).collect();
        match self.routes.write() {
            Ok(mut r) => *r = table,
            Err(p) => *p.into_inner() = table,
        }
    }
}

/// `(name, namespace)` a `Host` names; `None` when it is no Service name (an IP, too many labels).
fn parse_host(host: &str) -> Option<(String, Option<String>)> {
    if host.starts_with('[') {
        return None;
    }
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    if labels.iter().any(|l| l.is_empty()) {
        return None;
    }
    match labels.as_slice() {
        [name] => Some(((*name).to_owned(), None)),
        [name, ns] => Some(((*name).to_owned(), Some((*ns).to_owned()))),
        [name, ns, "svc", ..] => Some(((*name).to_owned(), Some((*ns).to_owned()))),
        _ => None,
    }
}

/// The resource a request is for. A bare `<name>` (an app calling a Service of its own namespace)
/// is accepted when only one namespace has a resource of that name.
fn route(routes: &Routes, host: Option<&str>) -> Result<Arc<Destination>, ProxyError> {
    let not_found = |m: String| ProxyError::new(StatusCode::NOT_FOUND, Origin::TransparentProxy, m);
    let Some(host) = host else {
        return Err(not_found("The request has no Host header, so it names no Destination resource.".into()));
    };
    let Some((name, ns)) = parse_host(host) else {
        return Err(not_found(format!(
            "The host '{host}' is not a Destination resource's Service name (<name>.<namespace>)."
        )));
    };
    let table = routes.read().unwrap_or_else(|p| p.into_inner());
    let found = match &ns {
        Some(ns) => table.get(&(ns.clone(), name.clone())).into_iter().collect::<Vec<_>>(),
        None => table.iter().filter(|((_, n), _)| *n == name).map(|(_, c)| c).collect(),
    };
    match found.as_slice() {
        [one] => Ok(current_of(one)),
        [] => Err(not_found(format!("No Destination resource serves the host '{host}'."))),
        _ => Err(not_found(format!(
            "Destination resources named '{name}' exist in several namespaces; call '{name}.<namespace>'."
        ))),
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, shared: Arc<Shared>, routes: Routes, shutdown: Shutdown) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        let host = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned);
        let host = host.or_else(|| req.uri().authority().map(|a| a.to_string()));
        let picked = route(&routes, host.as_deref());
        async move {
            Ok::<_, std::convert::Infallible>(match picked {
                Ok(resource) => crate::http::handle(&shared, &resource, req).await,
                Err(e) => {
                    let id = crate::http::request_id(&req);
                    tracing::info!(host = host.as_deref().unwrap_or(""), "request for no resource");
                    e.into_response(&id)
                }
            })
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(30))
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(stream), service)
        // WebSocket and other upgrades pass through as on the per-resource listeners.
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "connection ended with error") },
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_a_resource_with_or_without_namespace_suffix_and_port() {
        let full = |n: &str, ns: &str| Some((n.to_owned(), Some(ns.to_owned())));
        assert_eq!(parse_host("erp.apps"), full("erp", "apps"));
        assert_eq!(parse_host("erp.apps:8080"), full("erp", "apps"));
        assert_eq!(parse_host("ERP.Apps.svc"), full("erp", "apps"));
        assert_eq!(parse_host("erp.apps.svc.cluster.local:80"), full("erp", "apps"));
        assert_eq!(parse_host("erp.apps.svc.cluster.local."), full("erp", "apps"));
        assert_eq!(parse_host("erp"), Some(("erp".to_owned(), None)));
        assert_eq!(parse_host("a.b.c"), None);
        assert_eq!(parse_host("[::1]:80"), None);
        assert_eq!(parse_host("erp..apps"), None);
    }

    #[test]
    fn tcp_ports_stay_in_range_and_differ_per_resource() {
        let a = tcp_port("apps", "ldap");
        assert!((TCP_PORT_BASE..TCP_PORT_BASE + TCP_PORT_COUNT).contains(&a));
        assert_eq!(a, tcp_port("apps", "ldap"));
        assert_ne!(a, tcp_port("other", "ldap"));
    }
}
