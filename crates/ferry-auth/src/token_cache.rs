//! Remembers recently verified tokens. A client sends the same bearer token with every request
//! until it expires (an app to the proxy, an app or SDK to the Destination Service); verifying an
//! RSA signature each time would be the single largest cost of a small request.
//!
//! Entries live at most [`TTL`] (so a key retired at the issuer stops being accepted soon after)
//! and never past the token's own `exp`, and end when the verifier's set of trusted tenants
//! changes (a deleted subaccount's tokens stop working at once); only successes are cached, so a
//! bad token is checked
//! every time and cannot evict good ones by failing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{Claims, Verifier, VerifyError};

const TTL: Duration = Duration::from_secs(60);
const MAX_ENTRIES: usize = 4096;

/// Verified claims, when they were verified and under which trust generation, by token. Looked
/// up on every request with the whole token (about 1 KiB): SipHash over it cost ~3,500
/// instructions, foldhash (seeded per map, so keys still cannot be aimed at one bucket) a tenth.
type Entries = HashMap<Box<str>, (Arc<Claims>, Instant, u64), foldhash::fast::RandomState>;

pub struct TokenCache {
    verifier: Arc<Verifier>,
    entries: Mutex<Entries>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl TokenCache {
    pub fn new(verifier: Arc<Verifier>) -> Self {
        Self { verifier, entries: Mutex::new(HashMap::default()) }
    }

    /// The verifier behind the cache, for checks that must not be cached.
    pub fn verifier(&self) -> &Arc<Verifier> {
        &self.verifier
    }

    /// Verifies `token`, or returns the claims of an earlier verification of the same token.
    pub async fn verify(&self, token: &str) -> Result<Arc<Claims>, VerifyError> {
        {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((claims, at, generation)) = entries.get(token)
                && at.elapsed() < TTL
                && claims.exp >= now_secs()
                && *generation == self.verifier.trust_generation()
            {
                return Ok(claims.clone());
            }
        }
        // Read before verifying: a change during verification makes the entry stale, not wrong.
        let generation = self.verifier.trust_generation();
        let claims = Arc::new(self.verifier.verify(token).await?);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_ENTRIES {
            // Cheaper than an LRU and good enough: the working set refills on its next requests.
            entries.clear();
        }
        entries.insert(token.into(), (claims.clone(), Instant::now(), generation));
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeySet;
    use serde_json::json;

    fn token(keys: &KeySet, exp: u64) -> String {
        keys.sign(&json!({"zid": "z", "client_id": "c", "exp": exp}), &[]).unwrap()
    }

    #[tokio::test]
    async fn a_removed_tenant_is_refused_at_once() {
        // reqwest needs the process's TLS provider; alone (a filtered run) no other test set it.
        ferry_core::init_crypto();
        let keys = Arc::new(KeySet::generate().unwrap());
        let tenants = crate::TenantKeys::default();
        tenants.insert("z", keys.clone());
        let verifier = Verifier::new(vec![crate::TrustedIssuer::Tenants(tenants.clone())], reqwest::Client::new());
        let cache = TokenCache::new(Arc::new(verifier));
        let good = token(&keys, now_secs() + 600);
        cache.verify(&good).await.unwrap();
        cache.verify(&good).await.unwrap();
        tenants.remove("z");
        assert!(cache.verify(&good).await.is_err(), "cached verification outlived the tenant");
    }

    #[tokio::test]
    async fn caches_successes_only_and_respects_expiry() {
        let keys = Arc::new(KeySet::generate().unwrap());
        let cache = TokenCache::new(Arc::new(Verifier::local(keys.clone())));
        let good = token(&keys, now_secs() + 600);
        assert_eq!(cache.verify(&good).await.unwrap().zid, "z");
        assert_eq!(cache.entries.lock().unwrap().len(), 1);
        assert_eq!(cache.verify(&good).await.unwrap().zid, "z");
        // Expired (beyond the verifier's leeway): refused, and not cached.
        let old = token(&keys, now_secs() - 3600);
        assert_eq!(cache.verify(&old).await.unwrap_err(), VerifyError::Expired);
        assert_eq!(cache.entries.lock().unwrap().len(), 1);
        // A cached entry whose token has expired since is checked again (and refused).
        let soon = token(&keys, now_secs() + 600);
        cache.verify(&soon).await.unwrap();
        {
            let mut e = cache.entries.lock().unwrap();
            let entry = e.get_mut(soon.as_str()).unwrap();
            let mut stale = (*entry.0).clone();
            stale.exp = now_secs() - 1;
            entry.0 = Arc::new(stale);
        }
        // The real token is still valid, so re-verification succeeds and refreshes the entry.
        assert!(cache.verify(&soon).await.is_ok());
        assert!(cache.entries.lock().unwrap().get(soon.as_str()).unwrap().0.exp > now_secs());
    }

    /// An app (or an attacker with valid tokens) sending ever new tokens cannot grow the cache
    /// past its bound; every token still verifies.
    #[tokio::test]
    async fn the_cache_stays_within_its_bound() {
        let keys = Arc::new(KeySet::generate().unwrap());
        let cache = TokenCache::new(Arc::new(Verifier::local(keys.clone())));
        let exp = now_secs() + 600;
        for i in 0..MAX_ENTRIES + 10 {
            let t = keys.sign(&json!({"zid": "z", "client_id": format!("c{i}"), "exp": exp}), &[]).unwrap();
            cache.verify(&t).await.unwrap();
            assert!(cache.entries.lock().unwrap().len() <= MAX_ENTRIES, "grew past {MAX_ENTRIES} at token {i}");
        }
    }
}
