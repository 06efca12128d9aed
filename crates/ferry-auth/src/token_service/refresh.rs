//! Refresh tokens: opaque random strings kept in memory.
//!
//! They are opaque rather than JWTs so that nothing outside this process can read or forge a
//! grant, and so that using one can consume it (single-use rotation: a stolen, already used
//! refresh token is worthless). Losing them on restart only costs clients a new login.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;

use super::claims::UserIdentity;

/// Bounds the memory an authenticated but misbehaving client can pin by requesting refresh
/// tokens in a loop.
const MAX_REFRESH_TOKENS: usize = 100_000;

/// What a refresh token stands for: one user's login at one client in one zone.
#[derive(Clone, Debug)]
pub(crate) struct RefreshGrant {
    pub client_id: String,
    pub tenant_id: String,
    pub user: UserIdentity,
    pub scopes: Vec<String>,
    pub expires_at: u64,
}

#[derive(Default)]
pub(crate) struct RefreshStore {
    grants: Mutex<HashMap<String, RefreshGrant>>,
}

impl std::fmt::Debug for RefreshStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys are bearer credentials: print only how many there are.
        f.debug_struct("RefreshStore").field("len", &self.lock().len()).finish()
    }
}

impl RefreshStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RefreshGrant>> {
        self.grants.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `grant` and returns the new token, or `None` if no randomness was available.
    pub fn insert(&self, grant: RefreshGrant, now: u64) -> Option<String> {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).ok()?;
        // XSUAA's refresh tokens end in "-r"; some tools recognise them by it.
        let token = format!("{}-r", B64URL.encode(bytes));
        let mut grants = self.lock();
        if grants.len() >= MAX_REFRESH_TOKENS {
            grants.retain(|_, g| g.expires_at > now);
        }
        if grants.len() >= MAX_REFRESH_TOKENS
            && let Some(oldest) = grants.iter().min_by_key(|(_, g)| g.expires_at).map(|(k, _)| k.clone())
        {
            grants.remove(&oldest);
        }
        grants.insert(token.clone(), grant);
        Some(token)
    }

    /// Consumes `token` if it is known, unexpired and passes `check`. A token that fails
    /// `check` (another client's, another zone's) stays usable, so that presenting someone
    /// else's token cannot burn it. `Ok(None)`: unknown, expired or already used.
    pub fn take<E>(
        &self,
        token: &str,
        now: u64,
        check: impl FnOnce(&RefreshGrant) -> Result<(), E>,
    ) -> Result<Option<RefreshGrant>, E> {
        let mut grants = self.lock();
        match grants.get(token) {
            None => Ok(None),
            Some(g) if g.expires_at <= now => {
                grants.remove(token);
                Ok(None)
            }
            Some(g) => {
                check(g)?;
                Ok(grants.remove(token))
            }
        }
    }

    /// Forgets `token`, e.g. because the authorization code it was issued for was replayed.
    pub fn revoke(&self, token: &str) {
        self.lock().remove(token);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(client: &str, expires_at: u64) -> RefreshGrant {
        RefreshGrant {
            client_id: client.into(),
            tenant_id: "z".into(),
            user: UserIdentity {
                user_name: "u".into(),
                user_id: "u".into(),
                email: None,
                given_name: None,
                family_name: None,
                origin: "ldap".into(),
                auth_time: 0,
            },
            scopes: vec![],
            expires_at,
        }
    }

    #[test]
    fn single_use_and_bound_to_client() {
        let store = RefreshStore::default();
        let t = store.insert(grant("a", 100), 0).unwrap();
        assert!(t.ends_with("-r"));
        let client = |want: &'static str| move |g: &RefreshGrant| if g.client_id == want { Ok(()) } else { Err(()) };
        assert!(store.take(&t, 0, client("b")).is_err());
        assert!(store.take(&t, 0, client("a")).unwrap().is_some());
        assert!(store.take(&t, 0, client("a")).unwrap().is_none());
        let t = store.insert(grant("a", 100), 0).unwrap();
        assert!(store.take(&t, 100, client("a")).unwrap().is_none());
        assert_eq!(store.len(), 0);
        assert!(!format!("{store:?}").contains(&t));
    }
}
