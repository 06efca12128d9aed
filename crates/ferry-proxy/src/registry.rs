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

/// Subaccount → location id → tunnels: nested so a request looks its tunnel up by `&str`
/// without allocating a key.
type Tunnels = HashMap<String, HashMap<String, Vec<Tunnel>>>;

#[derive(Default)]
pub struct Registry {
    tunnels: RwLock<Tunnels>,
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
        let (subaccount, location) = key;
        let mut map = self.tunnels.write().unwrap_or_else(|p| p.into_inner());
        map.entry(subaccount).or_default().entry(location).or_default().push(Tunnel { id, sender });
        id
    }

    pub(crate) fn remove(&self, key: &TunnelKey, id: u64) {
        let mut map = self.tunnels.write().unwrap_or_else(|p| p.into_inner());
        let Some(locations) = map.get_mut(&key.0) else { return };
        if let Some(list) = locations.get_mut(&key.1) {
            list.retain(|t| t.id != id);
            if list.is_empty() {
                locations.remove(&key.1);
            }
        }
        if locations.is_empty() {
            map.remove(&key.0);
        }
    }

    /// A live tunnel for `key`, spreading load round-robin over a connector's connections.
    pub(crate) fn pick(&self, subaccount: &str, location: &str) -> Option<SendRequest<BoxBody>> {
        // Called for every request: no allocation on this path.
        let map = self.tunnels.read().unwrap_or_else(|p| p.into_inner());
        let list = map.get(subaccount)?.get(location)?;
        let live = list.iter().filter(|t| !t.sender.is_closed()).count();
        if live == 0 {
            return None;
        }
        let i = self.round_robin.fetch_add(1, Ordering::Relaxed) % live;
        // A tunnel that closed since the count moves the pick on to any other live one.
        let mut live = list.iter().filter(|t| !t.sender.is_closed());
        live.clone().nth(i).or_else(|| live.next()).map(|t| t.sender.clone())
    }

    /// The connected (subaccount, location id) pairs with their number of tunnel connections.
    pub fn keys(&self) -> Vec<(TunnelKey, usize)> {
        let map = self.tunnels.read().unwrap_or_else(|p| p.into_inner());
        let mut keys: Vec<_> = map
            .iter()
            .flat_map(|(s, locations)| locations.iter().map(|(l, v)| ((s.clone(), l.clone()), v.len())))
            .collect();
        keys.sort();
        keys
    }

    pub fn is_connected(&self, subaccount: &str, location: &str) -> bool {
        self.pick(subaccount, location).is_some()
    }
}
