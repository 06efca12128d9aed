//! Failed client and user logons at the token endpoint, counted per peer address: after
//! [`MAX_FAILURES`] in one [`WINDOW`] the address gets 429 until the window ends. Keyed by
//! address, not by client id, so that nobody can lock a binding out by guessing at its
//! (public) client id from elsewhere; Argon2 already makes each guess slow, this caps their
//! number.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) const MAX_FAILURES: u32 = 30;
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most; beyond it stale windows are dropped, then all (an attacker with
/// that many addresses is not slowed by a per-address limit anyway).
const MAX_TRACKED: usize = 100_000;

#[derive(Default)]
pub(crate) struct FailedLogons {
    windows: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl FailedLogons {
    /// How long `peer` must wait, if it used up its failures.
    pub(crate) fn retry_after(&self, peer: IpAddr) -> Option<Duration> {
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let (count, start) = windows.get(&peer)?;
        let left = WINDOW.checked_sub(start.elapsed())?;
        (*count >= MAX_FAILURES).then_some(left)
    }

    pub(crate) fn failed(&self, peer: IpAddr) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= MAX_TRACKED && !windows.contains_key(&peer) {
            windows.retain(|_, (_, start)| start.elapsed() < WINDOW);
            if windows.len() >= MAX_TRACKED {
                windows.clear();
            }
        }
        let entry = windows.entry(peer).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 = entry.0.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_address_is_stopped_after_its_failures_and_others_are_not() {
        let f = FailedLogons::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..MAX_FAILURES - 1 {
            f.failed(a);
        }
        assert!(f.retry_after(a).is_none());
        f.failed(a);
        let wait = f.retry_after(a).unwrap();
        assert!(wait <= WINDOW && wait > Duration::ZERO);
        assert!(f.retry_after(b).is_none());
    }
}
