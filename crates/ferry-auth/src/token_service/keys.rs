//! Signing-key rotation and retirement.
//!
//! A rotation adds a key that signs from then on; the previous key stays in `/token_keys` while
//! a token it signed may still be accepted, i.e. until the longest access-token lifetime of any
//! client (plus the verifiers' clock leeway) has passed since it stopped signing. Then it is
//! retired — lazily, whenever keys are rotated or published, and periodically in
//! [`run`](super::run).
//!
//! The key set itself ([`KeySet`](crate::jwt::KeySet)) only orders keys, oldest first; when a
//! key stopped signing is recorded here, by `kid`. A key found superseded without a record
//! (loaded from disk with older keys, or rotated by someone else) is dated when first seen,
//! which can only keep it longer than needed, never shorter.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::jwt::KeySet;

/// How many of the oldest superseded keys may go: those whose tokens have all expired, as a
/// prefix (keys are ordered oldest first, and only a prefix can be dropped from a key set).
/// `superseded_at[i]` is when the i-th oldest key stopped signing; `lifetime` is the longest a
/// token stays acceptable after it was signed (token validity plus verifier leeway).
pub(crate) fn retirable(superseded_at: &[u64], now: u64, lifetime: u64) -> usize {
    superseded_at.iter().take_while(|&&t| t.saturating_add(lifetime) < now).count()
}

/// Per tenant: when each superseded key stopped signing. The mutex also serialises this
/// service's rotations and retirements of the tenant's keys.
#[derive(Debug, Default)]
pub(crate) struct KeyHistory {
    superseded_at: Mutex<HashMap<String, u64>>,
}

impl KeyHistory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.superseded_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a signing key to `keys`; returns its `kid`.
    pub fn rotate(&self, keys: &KeySet, now: u64, lifetime: u64) -> Result<String, crate::jwt::KeyError> {
        let mut history = self.lock();
        let kid = keys.rotate()?;
        retire_locked(&mut history, keys, now, lifetime);
        Ok(kid)
    }

    /// Dates newly superseded keys and drops the expired ones; returns how many were dropped.
    pub fn retire(&self, keys: &KeySet, now: u64, lifetime: u64) -> usize {
        retire_locked(&mut self.lock(), keys, now, lifetime)
    }
}

fn retire_locked(history: &mut HashMap<String, u64>, keys: &KeySet, now: u64, lifetime: u64) -> usize {
    let kids: Vec<String> = keys.jwks().keys.into_iter().map(|k| k.kid).collect();
    let Some((_current, superseded)) = kids.split_last() else { return 0 };
    let times: Vec<u64> = superseded.iter().map(|kid| *history.entry(kid.clone()).or_insert(now)).collect();
    let drop = retirable(&times, now, lifetime);
    if drop > 0 {
        keys.retire_old(kids.len() - drop);
        for kid in &superseded[..drop] {
            history.remove(kid);
        }
    }
    history.retain(|kid, _| kids.contains(kid));
    drop
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retirement_rule() {
        // Lifetime 100: a key superseded at t may go once no token of it verifies, after t+100.
        assert_eq!(retirable(&[], 1000, 100), 0);
        assert_eq!(retirable(&[10], 110, 100), 0, "a token signed at 10 still verifies at 110");
        assert_eq!(retirable(&[10], 111, 100), 1);
        assert_eq!(retirable(&[10, 50, 90], 160, 100), 2);
        assert_eq!(retirable(&[10, 50, 90], 1000, 100), 3);
        // Only a prefix can go, even if a later key is (oddly) dated earlier.
        assert_eq!(retirable(&[200, 10], 250, 100), 0);
        assert_eq!(retirable(&[u64::MAX], u64::MAX, 1), 0, "no overflow");
    }

    #[test]
    fn rotate_and_retire_a_key_set() {
        let keys = KeySet::generate().unwrap();
        let first = keys.current_kid().unwrap();
        let history = KeyHistory::default();
        let second = history.rotate(&keys, 1000, 100).unwrap();
        assert_eq!(keys.current_kid().unwrap(), second);
        assert_eq!(keys.jwks().keys.len(), 2);
        assert_eq!(history.retire(&keys, 1100, 100), 0);
        let third = history.rotate(&keys, 1050, 100).unwrap();
        assert_eq!(keys.jwks().keys.len(), 3);
        assert_eq!(history.retire(&keys, 1101, 100), 1, "the first key went at 1000, so it may go after 1100");
        let kids: Vec<String> = keys.jwks().keys.into_iter().map(|k| k.kid).collect();
        assert_eq!(kids, [second.clone(), third.clone()]);
        assert!(!kids.contains(&first));
        assert_eq!(history.retire(&keys, 1151, 100), 1);
        assert_eq!(keys.current_kid().unwrap(), third);
        // The signing key is never retired.
        assert_eq!(history.retire(&keys, u64::MAX / 2, 100), 0);
        assert_eq!(keys.jwks().keys.len(), 1);
    }

    #[test]
    fn keys_rotated_elsewhere_are_dated_when_first_seen() {
        let keys = KeySet::generate().unwrap();
        keys.rotate().unwrap();
        let history = KeyHistory::default();
        assert_eq!(history.retire(&keys, 5000, 100), 0, "first seen superseded at 5000");
        assert_eq!(history.retire(&keys, 5100, 100), 0);
        assert_eq!(history.retire(&keys, 5101, 100), 1);
    }
}
