//! Which Cloud Connector tunnels are up, keyed by (subaccount, location id), and which connector
//! instance may serve each key: the one with the highest [`Fence`] seen (see `tunnel_server`).

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use ferry_core::Shutdown;
use ferry_core::body::BoxBody;
use ferry_proto::tunnel::Fence;
use hyper::client::conn::http2::SendRequest;

/// `(subaccount id, location id)`; the empty location id is the default location.
pub type TunnelKey = (String, String);

struct Tunnel {
    id: u64,
    fence: Fence,
    sender: SendRequest<BoxBody>,
    /// Cancelled when a connector with a higher fence takes the key over.
    close: Shutdown,
}

#[derive(Default)]
struct Slot {
    /// Highest fence admitted for this key since the proxy started; never lowered, and kept
    /// when the last tunnel goes, so a deposed master cannot return after a reconnect.
    fence: Fence,
    tunnels: Vec<Tunnel>,
}

/// Subaccount → location id → slot: nested so a request looks its tunnel up by `&str` without
/// allocating a key.
type Slots = HashMap<String, HashMap<String, Slot>>;

#[derive(Default)]
pub struct Registry {
    slots: RwLock<Slots>,
    ids: AtomicU64,
    round_robin: AtomicUsize,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("keys", &self.keys()).finish()
    }
}

/// A tunnel the registry refused: a connector with a higher fence serves its key.
#[derive(Debug)]
pub(crate) struct Fenced(pub Fence);

impl Registry {
    /// The highest fence admitted for `key` (the default for a key never seen).
    pub(crate) fn fence(&self, key: &TunnelKey) -> Fence {
        let map = self.slots.read().unwrap_or_else(|p| p.into_inner());
        map.get(&key.0).and_then(|l| l.get(&key.1)).map(|s| s.fence.clone()).unwrap_or_default()
    }

    /// Admits a tunnel with `fence`, or refuses it if a higher fence holds the key. A higher
    /// fence closes the key's other tunnels in the same step: `pick` never sees two instances.
    pub(crate) fn add(
        &self,
        key: TunnelKey,
        fence: Fence,
        sender: SendRequest<BoxBody>,
    ) -> Result<(u64, Shutdown), Fenced> {
        let mut map = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let (subaccount, location) = key;
        let slot = map.entry(subaccount).or_default().entry(location).or_default();
        if fence < slot.fence {
            return Err(Fenced(slot.fence.clone()));
        }
        if fence > slot.fence {
            for t in slot.tunnels.drain(..) {
                t.close.cancel();
            }
            slot.fence = fence.clone();
        }
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let close = Shutdown::new();
        slot.tunnels.push(Tunnel { id, fence, sender, close: close.clone() });
        Ok((id, close))
    }

    pub(crate) fn remove(&self, key: &TunnelKey, id: u64) {
        let mut map = self.slots.write().unwrap_or_else(|p| p.into_inner());
        // The slot itself stays: it remembers the highest fence (see `Slot::fence`).
        if let Some(slot) = map.get_mut(&key.0).and_then(|l| l.get_mut(&key.1)) {
            slot.tunnels.retain(|t| t.id != id);
        }
    }

    /// A live tunnel for `key`, spreading load round-robin over a connector's connections.
    pub(crate) fn pick(&self, subaccount: &str, location: &str) -> Option<SendRequest<BoxBody>> {
        // Called for every request: no allocation on this path.
        let map = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let slot = map.get(subaccount)?.get(location)?;
        let live = slot.tunnels.iter().filter(|t| !t.sender.is_closed()).count();
        if live == 0 {
            return None;
        }
        let i = self.round_robin.fetch_add(1, Ordering::Relaxed) % live;
        // A tunnel that closed since the count moves the pick on to any other live one.
        let mut live = slot.tunnels.iter().filter(|t| !t.sender.is_closed());
        live.clone().nth(i).or_else(|| live.next()).map(|t| t.sender.clone())
    }

    /// The connected (subaccount, location id) pairs with their number of tunnel connections.
    pub fn keys(&self) -> Vec<(TunnelKey, usize)> {
        let map = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let mut keys: Vec<_> = map
            .iter()
            .flat_map(|(sub, locations)| locations.iter().map(move |(loc, s)| (sub, loc, s)))
            .filter(|(_, _, s)| !s.tunnels.is_empty())
            .map(|(sub, loc, s)| ((sub.clone(), loc.clone()), s.tunnels.len()))
            .collect();
        keys.sort();
        keys
    }

    /// The distinct fences of the live tunnels of a key: at most one, by construction.
    pub fn serving(&self, subaccount: &str, location: &str) -> Vec<Fence> {
        let map = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let mut fences: Vec<Fence> = map
            .get(subaccount)
            .and_then(|l| l.get(location))
            .map(|s| s.tunnels.iter().filter(|t| !t.sender.is_closed()).map(|t| t.fence.clone()).collect())
            .unwrap_or_default();
        fences.sort();
        fences.dedup();
        fences
    }

    pub fn is_connected(&self, subaccount: &str, location: &str) -> bool {
        self.pick(subaccount, location).is_some()
    }
}
