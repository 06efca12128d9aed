//! Which Cloud Connector tunnels are up, keyed by (subaccount, location id).

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use ferry_core::body::BoxBody;
use hyper::client::conn::http2::SendRequest;

/// `(subaccount id, location id)`; the empty location id is the default location.
pub type TunnelKey = (String, String);

struct Tunnel {
    id: u64,
    sender: SendRequest<BoxBody>,
}

#[derive(Default)]
pub struct Registry {
    tunnels: RwLock<HashMap<TunnelKey, Vec<Tunnel>>>,
    ids: AtomicU64,
    round_robin: AtomicUsize,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("keys", &self.keys()).finish()
    }
}

impl Registry {
    pub(crate) fn add(&self, key: TunnelKey, sender: SendRequest<BoxBody>) -> u64 {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        self.tunnels.write().unwrap_or_else(|p| p.into_inner()).entry(key).or_default().push(Tunnel { id, sender });
        id
    }

    pub(crate) fn remove(&self, key: &TunnelKey, id: u64) {
        let mut map = self.tunnels.write().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = map.get_mut(key) {
            list.retain(|t| t.id != id);
            if list.is_empty() {
                map.remove(key);
            }
        }
    }

    /// A live tunnel for `key`, spreading load round-robin over a connector's connections.
    pub(crate) fn pick(&self, subaccount: &str, location: &str) -> Option<SendRequest<BoxBody>> {
        let map = self.tunnels.read().unwrap_or_else(|p| p.into_inner());
        let list = map.get(&(subaccount.to_owned(), location.to_owned()))?;
        let live: Vec<&Tunnel> = list.iter().filter(|t| !t.sender.is_closed()).collect();
        if live.is_empty() {
            return None;
        }
        let i = self.round_robin.fetch_add(1, Ordering::Relaxed) % live.len();
        Some(live[i].sender.clone())
    }

    /// The connected (subaccount, location id) pairs with their number of tunnel connections.
    pub fn keys(&self) -> Vec<(TunnelKey, usize)> {
        let map = self.tunnels.read().unwrap_or_else(|p| p.into_inner());
        let mut keys: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.len())).collect();
        keys.sort();
        keys
    }

    pub fn is_connected(&self, subaccount: &str, location: &str) -> bool {
        self.pick(subaccount, location).is_some()
    }
}
