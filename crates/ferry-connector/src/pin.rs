//! DNS pinning for mapped internal hosts. A mapping names its internal host; if that is a name,
//! the connector resolves it once per dial and connects to exactly the addresses that lookup
//! returned (no second resolution between check and connect). The first lookup of a name pins
//! its addresses; later lookups are dialled only at addresses among the pinned ones, so a name
//! rebound to another address (DNS rebinding: to the connector's own admin port, a metadata
//! service, any other internal host) is refused with a clear error instead of followed. The pins
//! start afresh whenever the access rules change (an administrator saving a mapping accepts
//! where its host now resolves).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use crate::access::{AccessRules, LiveRules};

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("cannot resolve internal host {host}: {source}")]
    Resolve { host: String, source: std::io::Error },
    #[error("internal host {host} resolves to no address")]
    NoAddress { host: String },
    #[error(
        "internal host {host} now resolves to {now}, none of which it resolved to before ({pinned}); the Cloud \
         Connector does not follow a changed name (DNS rebinding). If the host really moved, save its system \
         mapping again"
    )]
    Rebound { host: String, now: String, pinned: String },
}

/// The pinned addresses per host name, valid for one snapshot of the rules.
#[derive(Default)]
pub(crate) struct Pins {
    inner: Mutex<Table>,
}

/// The rules the pins belong to (a new snapshot starts them afresh) and the pins.
#[derive(Default)]
struct Table {
    rules: Option<Arc<AccessRules>>,
    hosts: HashMap<String, Vec<IpAddr>>,
}

fn list(ips: &[IpAddr]) -> String {
    ips.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ")
}

impl Pins {
    /// The addresses to dial for `host:port` under `rules`: resolved once, pinned on first use.
    pub(crate) async fn resolve(
        &self,
        rules: &Arc<AccessRules>,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, PinError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|source| PinError::Resolve { host: host.to_owned(), source })?
            .collect();
        if resolved.is_empty() {
            return Err(PinError::NoAddress { host: host.to_owned() });
        }
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Table { rules: pinned_under, hosts } = &mut *inner;
        if !pinned_under.as_ref().is_some_and(|g| Arc::ptr_eq(g, rules)) {
            *pinned_under = Some(rules.clone());
            hosts.clear();
        }
        match hosts.get(host) {
            None => {
                hosts.insert(host.to_owned(), resolved.iter().map(SocketAddr::ip).collect());
                Ok(resolved)
            }
            Some(pinned) => {
                let allowed: Vec<SocketAddr> = resolved.iter().copied().filter(|a| pinned.contains(&a.ip())).collect();
                if allowed.is_empty() {
                    let now: Vec<IpAddr> = resolved.iter().map(SocketAddr::ip).collect();
                    tracing::warn!(target: "ferry::audit", host, now = %list(&now), pinned = %list(pinned),
                        "internal host rebound to another address; not dialled");
                    return Err(PinError::Rebound { host: host.to_owned(), now: list(&now), pinned: list(pinned) });
                }
                Ok(allowed)
            }
        }
    }
}

/// Connects to the first of `addrs` that accepts, within `timeout` each.
pub(crate) async fn connect(
    addrs: &[SocketAddr],
    timeout: std::time::Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address to connect to");
    for a in addrs {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connecting to {a} timed out")),
        }
    }
    Err(last)
}

/// The pooled HTTP client's resolver: the same pins, under the rules in force.
#[derive(Clone)]
pub(crate) struct PinnedResolver {
    pub(crate) pins: Arc<Pins>,
    pub(crate) rules: Arc<LiveRules>,
}

type Addrs = std::vec::IntoIter<SocketAddr>;

impl tower::Service<hyper_util::client::legacy::connect::dns::Name> for PinnedResolver {
    type Response = Addrs;
    type Error = PinError;
    type Future = Pin<Box<dyn Future<Output = Result<Addrs, PinError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), PinError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let (pins, rules) = (self.pins.clone(), self.rules.get());
        // hyper's connector sets the port on the addresses it gets.
        Box::pin(async move { pins.resolve(&rules, name.as_str(), 0).await.map(Vec::into_iter) })
    }
}
