//! Which Cloud Connector tunnels are up, keyed by (subaccount, location id), and which connector
//! instance may serve each key: the one with the highest [`Fence`] seen (see `tunnel_server`).

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
    /// The connector sent GOAWAY on it (seen when a stream was refused): new streams go elsewhere.
    draining: AtomicBool,
}

impl Tunnel {
    fn usable(&self) -> bool {
        !self.sender.is_closed() && !self.draining.load(Ordering::Relaxed)
    }
}

/// A tunnel `pick_tunnel` chose: its id (to report it draining) and a handle to open streams.
pub(crate) struct Picked {
    pub(crate) id: u64,
    pub(crate) sender: SendRequest<BoxBody>,
}

#[derive(Default)]
struct Slot {
    /// Highest fence admitted for this key since the proxy started; never lowered, and kept
    /// when the last tunnel goes, so a deposed master cannot return after a reconnect.
    fence: Fence,
    tunnels: Vec<Tunnel>,
    /// When a tunnel of this key last drained (GOAWAY): a successor is probably on its way, so a
    /// request finding no tunnel for a short while waits for it instead of failing.
    drained_at: Option<Instant>,
}

/// Subaccount → location id → slot: nested so a request looks its tunnel up by `&str` without
/// allocating a key.
type Slots = HashMap<String, HashMap<String, Slot>>;

pub struct Registry {
    slots: RwLock<Slots>,
    ids: AtomicU64,
    round_robin: AtomicUsize,
    /// Bumped on every admitted tunnel, for requests waiting for a successor.
    added: tokio::sync::watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            slots: RwLock::default(),
            ids: AtomicU64::default(),
            round_robin: AtomicUsize::default(),
            added: tokio::sync::watch::channel(0).0,
        }
    }
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
        slot.tunnels.push(Tunnel { id, fence, sender, close: close.clone(), draining: AtomicBool::new(false) });
        drop(map);
        self.added.send_modify(|n| *n += 1);
        Ok((id, close))
    }

    pub(crate) fn remove(&self, key: &TunnelKey, id: u64) {
        let mut map = self.slots.write().unwrap_or_else(|p| p.into_inner());
        // The slot itself stays: it remembers the highest fence (see `Slot::fence`).
        if let Some(slot) = map.get_mut(&key.0).and_then(|l| l.get_mut(&key.1)) {
            if slot.tunnels.iter().any(|t| t.id == id && t.draining.load(Ordering::Relaxed)) {
                slot.drained_at = Some(Instant::now());
            }
            slot.tunnels.retain(|t| t.id != id);
        }
    }

    /// Notes that tunnel `id` is draining (its connector sent GOAWAY): `pick` skips it from now on.
    pub(crate) fn mark_draining(&self, subaccount: &str, location: &str, id: u64) {
        let mut map = self.slots.write().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = map.get_mut(subaccount).and_then(|l| l.get_mut(location)) {
            slot.drained_at = Some(Instant::now());
            if let Some(t) = slot.tunnels.iter().find(|t| t.id == id) {
                t.draining.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Whether a tunnel of the key drained less than `within` ago, so a successor is likely to
    /// register soon (a certificate renewal, a connector restarted or switched over).
    pub(crate) fn drained_lately(&self, subaccount: &str, location: &str, within: Duration) -> bool {
        let map = self.slots.read().unwrap_or_else(|p| p.into_inner());
        map.get(subaccount)
            .and_then(|l| l.get(location))
            .and_then(|s| s.drained_at)
            .is_some_and(|at| at.elapsed() < within)
    }

    /// A usable tunnel for the key other than those in `tried`, round-robin over the rest.
    pub(crate) fn pick_tunnel(&self, subaccount: &str, location: &str, tried: &[u64]) -> Option<Picked> {
        // Called for every request: no allocation on this path.
        let map = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let slot = map.get(subaccount)?.get(location)?;
        let ok = |t: &&Tunnel| t.usable() && !tried.contains(&t.id);
        let live = slot.tunnels.iter().filter(ok).count();
        if live == 0 {
            return None;
        }
        let i = self.round_robin.fetch_add(1, Ordering::Relaxed) % live;
        // A tunnel that closed since the count moves the pick on to any other live one.
        let mut live = slot.tunnels.iter().filter(ok);
        live.clone().nth(i).or_else(|| live.next()).map(|t| Picked { id: t.id, sender: t.sender.clone() })
    }

    /// Like [`Registry::pick_tunnel`], waiting until `deadline` for a tunnel to register if
    /// there is none.
    pub(crate) async fn wait_for_tunnel(
        &self,
        subaccount: &str,
        location: &str,
        tried: &[u64],
        deadline: tokio::time::Instant,
    ) -> Option<Picked> {
        let mut added = self.added.subscribe();
        loop {
            // Subscribed before looking, so a tunnel admitted in between wakes the wait.
            added.mark_unchanged();
            if let Some(p) = self.pick_tunnel(subaccount, location, tried) {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, added.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return None,
            }
        }
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

    /// Whether a tunnel of the key can take new streams (up, and not draining).
    pub fn is_connected(&self, subaccount: &str, location: &str) -> bool {
        self.pick_tunnel(subaccount, location, &[]).is_some()
    }
}
