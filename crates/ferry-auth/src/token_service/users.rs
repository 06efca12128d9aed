//! Where users are found and their passwords verified: the [`UserStore`] abstraction, the
//! local store of configured users (Argon2 hashes, verified on the blocking pool) and, in
//! [`super::ldap`], a directory over LDAP.
//!
//! The password and authorization-code grants ask the local store first and then every
//! external store in order; the first store that knows the username decides. A user unknown
//! everywhere costs one Argon2 verification against a dummy hash, as a known local user does,
//! so that response time does not tell which usernames exist locally.

use std::future::Future;
use std::pin::Pin;

use ferry_core::Secret;

use super::config::{ConfigError, User};
use super::hash_password;
use super::password::{self, PasswordVerifier};

/// The future a [`UserStore`] answers with.
pub type UserFuture<'a> = Pin<Box<dyn Future<Output = Result<Verdict, StoreUnavailable>> + Send + 'a>>;

/// What a login asks a store.
#[derive(Clone, Copy)]
pub struct Login<'a> {
    pub username: &'a str,
    pub password: &'a str,
    /// The zone the request addressed; a store must then only answer with users of that zone.
    pub tenant: Option<&'a str>,
    /// The zone to prefer when none was addressed (the client's own zone).
    pub preferred_tenant: &'a str,
}

impl std::fmt::Debug for Login<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .field("password", &"***")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

/// A store's answer to a login.
#[derive(Debug)]
pub enum Verdict {
    /// The password is right; the user as tokens should show them (`password` empty).
    Verified(Box<User>),
    /// The store knows the user, but the password is wrong (or empty).
    WrongPassword,
    /// The store does not know the username (in the asked zone): the next store is asked.
    UnknownUser,
}

/// A store that cannot answer right now (directory down, timeout, service account refused):
/// the token endpoint answers `503 temporarily_unavailable` with this description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreUnavailable(pub String);

/// A source of users who log in with a password. Implementations do network I/O or CPU-heavy
/// hashing, so they are async and must keep blocking work off the runtime's threads.
pub trait UserStore: Send + Sync + std::fmt::Debug {
    /// A short name for messages and logs (never a credential), e.g. `ldap://host:389`.
    fn name(&self) -> String;
    /// The zone whose users this store holds, if it is one zone (checked at start-up).
    fn tenant_id(&self) -> Option<&str>;
    /// Checks `login.password` for `login.username`. An empty password must never verify.
    fn verify<'a>(&'a self, login: Login<'a>) -> UserFuture<'a>;
}

/// A configured user as the service keeps it: the password only as an Argon2 hash.
pub(crate) struct StoredUser {
    /// The configuration, with `password` emptied.
    pub user: User,
    /// `None` for a user configured without a password, who cannot log in.
    pub hash: Option<Secret<String>>,
}

/// The users of [`TokenServiceConfig::users`](super::TokenServiceConfig::users).
pub(crate) struct LocalUserStore {
    users: Vec<StoredUser>,
    passwords: PasswordVerifier,
}

impl std::fmt::Debug for LocalUserStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.users.iter().map(|u| &u.user)).finish()
    }
}

impl LocalUserStore {
    pub fn new(users: Vec<User>) -> Result<Self, ConfigError> {
        let users = users.into_iter().map(store_user).collect::<Result<Vec<_>, _>>()?;
        let passwords = PasswordVerifier::new()
            .map_err(|e| ConfigError::PasswordHashing { user: String::new(), reason: e.to_string() })?;
        Ok(Self { users, passwords })
    }

    /// Finds a user by name: in `tenant` if one was addressed; otherwise in `preferred` (the
    /// client's zone) first and then in any zone, in configuration order.
    pub fn find(&self, username: &str, tenant: Option<&str>, preferred: &str) -> Option<&StoredUser> {
        let named = || self.users.iter().filter(move |u| u.user.username == username);
        match tenant {
            Some(t) => named().find(|u| u.user.tenant_id == t),
            None => named().find(|u| u.user.tenant_id == preferred).or_else(|| named().next()),
        }
    }

    /// Whether a configured user belongs to zone `tenant_id`.
    pub fn any_in_tenant(&self, tenant_id: &str) -> bool {
        self.users.iter().any(|u| u.user.tenant_id == tenant_id)
    }

    /// The configured user behind a user identity of a token, if it is one of ours.
    pub fn by_id(&self, tenant_id: &str, user_id: &str) -> Option<&User> {
        self.users.iter().map(|u| &u.user).find(|u| u.tenant_id == tenant_id && u.user_id == user_id)
    }

    /// Verifies against the dummy hash: what an unknown user costs.
    pub async fn burn(&self, password: &str) {
        self.passwords.verify(None, password).await;
    }

    /// [`UserStore::verify`] without the dummy verification for unknown users, which the
    /// caller does once no store knows the user.
    pub async fn check(&self, login: Login<'_>) -> Verdict {
        let Some(user) = self.find(login.username, login.tenant, login.preferred_tenant) else {
            return Verdict::UnknownUser;
        };
        if self.passwords.verify(user.hash.as_ref(), login.password).await {
            Verdict::Verified(Box::new(user.user.clone()))
        } else {
            Verdict::WrongPassword
        }
    }
}

impl UserStore for LocalUserStore {
    fn name(&self) -> String {
        "local users".into()
    }

    fn tenant_id(&self) -> Option<&str> {
        None
    }

    fn verify<'a>(&'a self, login: Login<'a>) -> UserFuture<'a> {
        Box::pin(async move {
            let verdict = self.check(login).await;
            if matches!(verdict, Verdict::UnknownUser) {
                self.burn(login.password).await;
            }
            Ok(verdict)
        })
    }
}

/// Hashes a configured user's password (unless it is a hash already) and forgets the plain one.
fn store_user(mut user: User) -> Result<StoredUser, ConfigError> {
    let given = std::mem::take(&mut user.password);
    let given = given.expose();
    let hash = if given.is_empty() {
        None
    } else if password::looks_hashed(given) {
        password::check_hash(given)
            .map_err(|e| ConfigError::InvalidPasswordHash { user: user.username.clone(), reason: e.to_string() })?;
        Some(Secret::new(given.clone()))
    } else {
        let h = hash_password(given)
            .map_err(|e| ConfigError::PasswordHashing { user: user.username.clone(), reason: e.to_string() })?;
        Some(Secret::new(h))
    };
    Ok(StoredUser { user, hash })
}
