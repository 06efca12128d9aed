//! A [`UserStore`] backed by an LDAP directory (OpenLDAP, 389-DS, Active Directory, ...).
//!
//! A login opens one connection (connect and every operation bounded by `timeout_secs`) and:
//! 1. binds as the service account (`bind_dn`/`bind_password`);
//! 2. searches `base_dn` (subtree) with `user_filter`, whose `{username}` is replaced by the
//!    username escaped as RFC 4515 demands (`*`, `(`, `)`, `\`, NUL), so a username cannot
//!    widen the filter; no entry, or more than one (the filter cannot tell who logs in): an
//!    unknown user;
//! 3. if groups are configured, collects the user's groups (see below) while still bound as
//!    the service account;
//! 4. binds as the user's DN with the given password: success verifies the password.
//!
//! An empty password is refused before any of this: LDAP treats a simple bind with a DN and
//! no password as an *unauthenticated* bind that succeeds (RFC 4513 §5.1.2).
//!
//! Groups become scopes: each group's name (its `cn`) grants `$XSAPPNAME.<cn>`, i.e. the scope
//! `<xsappname>.<cn>` of whichever client the user logs in through (as role collections do in
//! XSUAA), e.g. group `Read` grants `app!t1.Read` to client `sb-app!t1`. Group names come from
//! `group_attribute` on the user entry (e.g. `memberOf`: the first RDN value of each DN), from
//! a search under `group_base_dn` with `group_filter` (`{dn}` = the user's DN, `{username}` =
//! the username, both escaped), or both. With neither configured the user is granted every
//! scope of the client, like a local user without a scope list.
//!
//! The directory being unreachable, slow, or refusing the service account is
//! [`StoreUnavailable`] (the token endpoint answers 503), not a wrong password.
//!
//! TLS: `ldaps://` URLs and `starttls = true` use rustls with the system's root certificates,
//! plus the CA certificates of `ca_file` (PEM) if given; the server name is the URL's host.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapResult, Scope, SearchEntry, ldap_escape};
use serde::Deserialize;

use ferry_core::Secret;

use super::config::{ConfigError, User};
use super::users::{Login, StoreUnavailable, UserFuture, UserStore, Verdict};

/// The default `user_filter`.
pub const DEFAULT_USER_FILTER: &str = "(&(objectClass=inetOrgPerson)(uid={username}))";
/// The default `group_filter`.
pub const DEFAULT_GROUP_FILTER: &str = "(&(objectClass=groupOfNames)(member={dn}))";

/// Logins talking to the directory at once; more wait (within the timeout), so that a burst of
/// logins cannot open unbounded connections to the directory.
const MAX_CONCURRENT_LOGINS: usize = 16;

/// LDAP result codes that mean "these credentials do not log in" rather than "the directory
/// has a problem": invalidCredentials, inappropriateAuthentication, unwillingToPerform (e.g. a
/// locked account).
const REJECTING_RESULT_CODES: [u32; 3] = [49, 48, 53];

/// The configuration of an [`LdapUserStore`]; `ferry up`'s `[ldap]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LdapConfig {
    /// `ldap://host:389` or `ldaps://host:636`.
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS.
    pub starttls: bool,
    /// PEM file of CA certificates to trust for `ldaps://`/StartTLS besides the system's.
    pub ca_file: Option<PathBuf>,
    /// The service account that searches for users.
    pub bind_dn: String,
    pub bind_password: Secret<String>,
    /// Where users are searched (subtree).
    pub base_dn: String,
    /// Must contain `{username}`.
    pub user_filter: String,
    pub email_attribute: String,
    pub given_name_attribute: String,
    pub family_name_attribute: String,
    /// `user_id` of tokens; the DN when the entry has no such attribute.
    pub user_id_attribute: String,
    /// An attribute of the user entry listing group DNs (`memberOf`).
    pub group_attribute: Option<String>,
    /// Where groups are searched (subtree) with `group_filter`.
    pub group_base_dn: Option<String>,
    pub group_filter: String,
    /// The zone (subaccount) the directory's users belong to.
    pub tenant_id: String,
    /// Bound on connecting and on each LDAP operation.
    pub timeout_secs: u64,
}

impl Default for LdapConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            starttls: false,
            ca_file: None,
            bind_dn: String::new(),
            bind_password: Secret::default(),
            base_dn: String::new(),
            user_filter: DEFAULT_USER_FILTER.into(),
            email_attribute: "mail".into(),
            given_name_attribute: "givenName".into(),
            family_name_attribute: "sn".into(),
            user_id_attribute: "entryUUID".into(),
            group_attribute: None,
            group_base_dn: None,
            group_filter: DEFAULT_GROUP_FILTER.into(),
            tenant_id: String::new(),
            timeout_secs: 5,
        }
    }
}

/// Users of an LDAP directory; see the module documentation.
pub struct LdapUserStore {
    config: LdapConfig,
    timeout: Duration,
    /// For `ldaps://` and StartTLS.
    tls: Arc<rustls::ClientConfig>,
    permits: tokio::sync::Semaphore,
}

impl std::fmt::Debug for LdapUserStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapUserStore").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The system's root certificates plus those of `ca_file`.
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    ferry_core::init_crypto();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read_to_string(path).map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
        let certs = ferry_core::tls::parse_certs(&pem).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        for c in certs {
            roots.add(c).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        }
    }
    Ok(Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth()))
}

/// How a step of a login ended early.
enum Stop {
    Verdict(Verdict),
    Unavailable(String),
}

fn down(what: &str, e: impl std::fmt::Display) -> Stop {
    Stop::Unavailable(format!("{what}: {e}"))
}

fn describe(r: &LdapResult) -> String {
    if r.text.is_empty() { format!("result code {}", r.rc) } else { format!("result code {} ({})", r.rc, r.text) }
}

impl LdapUserStore {
    /// Checks the configuration; does not connect (the directory may come up later).
    pub fn new(config: LdapConfig) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError::UserStore { store: config.url.clone(), reason };
        let url = url::Url::parse(&config.url)
            .map_err(|e| err(format!("url must be ldap://host[:port] or ldaps://host[:port]: {e}")))?;
        if !matches!(url.scheme(), "ldap" | "ldaps") || url.host().is_none() {
            return Err(err("url must be ldap://host[:port] or ldaps://host[:port]".into()));
        }
        if config.starttls && url.scheme() == "ldaps" {
            return Err(err("starttls is for ldap:// URLs; ldaps:// is TLS already".into()));
        }
        for (name, value) in
            [("bind_dn", &config.bind_dn), ("base_dn", &config.base_dn), ("tenant_id", &config.tenant_id)]
        {
            if value.trim().is_empty() {
                return Err(err(format!("{name} must not be empty")));
            }
        }
        if config.bind_password.expose().is_empty() {
            return Err(err("bind_password must not be empty (an empty password is an anonymous bind)".into()));
        }
        if !config.user_filter.contains("{username}") {
            return Err(err("user_filter must contain {username}".into()));
        }
        if ldap3::parse_filter(config.user_filter.replace("{username}", "x")).is_err() {
            return Err(err(format!("user_filter {:?} is not an LDAP filter (RFC 4515)", config.user_filter)));
        }
        if config.group_base_dn.is_some() && ldap3::parse_filter(group_filter(&config.group_filter, "x", "x")).is_err()
        {
            return Err(err(format!("group_filter {:?} is not an LDAP filter (RFC 4515)", config.group_filter)));
        }
        for (name, value) in [
            ("email_attribute", &config.email_attribute),
            ("given_name_attribute", &config.given_name_attribute),
            ("family_name_attribute", &config.family_name_attribute),
            ("user_id_attribute", &config.user_id_attribute),
        ] {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b';') {
                return Err(err(format!("{name} {value:?} is not an attribute name")));
            }
        }
        if config.timeout_secs == 0 {
            return Err(err("timeout_secs must be at least 1".into()));
        }
        let timeout = Duration::from_secs(config.timeout_secs);
        let tls = tls_config(config.ca_file.as_deref()).map_err(err)?;
        Ok(Self { config, timeout, tls, permits: tokio::sync::Semaphore::new(MAX_CONCURRENT_LOGINS) })
    }

    pub fn config(&self) -> &LdapConfig {
        &self.config
    }

    /// Connects and binds as the service account.
    async fn connect(&self) -> Result<Ldap, Stop> {
        let settings = LdapConnSettings::new()
            .set_conn_timeout(self.timeout)
            .set_starttls(self.config.starttls)
            .set_config(self.tls.clone());
        let connect = LdapConnAsync::with_settings(settings, &self.config.url);
        let (conn, mut ldap) = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| Stop::Unavailable(format!("no connection within {} s", self.config.timeout_secs)))?
            .map_err(|e| down("cannot connect", e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.drive().await {
                tracing::debug!(error = %e, "LDAP connection ended");
            }
        });
        self.bind_service(&mut ldap).await?;
        Ok(ldap)
    }

    async fn bind_service(&self, ldap: &mut Ldap) -> Result<(), Stop> {
        let r = ldap
            .with_timeout(self.timeout)
            .simple_bind(&self.config.bind_dn, self.config.bind_password.expose())
            .await
            .map_err(|e| down("service account bind failed", e))?;
        if r.rc != 0 {
            return Err(Stop::Unavailable(format!(
                "the directory refused the service account {:?}: {}",
                self.config.bind_dn,
                describe(&r)
            )));
        }
        Ok(())
    }

    async fn login(&self, ldap: &mut Ldap, login: Login<'_>) -> Result<Verdict, Stop> {
        let c = &self.config;
        let filter = c.user_filter.replace("{username}", &ldap_escape(login.username));
        let mut attrs = vec![
            c.email_attribute.as_str(),
            c.given_name_attribute.as_str(),
            c.family_name_attribute.as_str(),
            c.user_id_attribute.as_str(),
        ];
        if let Some(a) = &c.group_attribute {
            attrs.push(a.as_str());
        }
        let (entries, _) = ldap
            .with_timeout(self.timeout)
            .search(&c.base_dn, Scope::Subtree, &filter, attrs)
            .await
            .map_err(|e| down("user search failed", e))?
            .success()
            .map_err(|e| down("user search failed", e))?;
        let mut entries = entries.into_iter();
        let (Some(entry), None) = (entries.next(), entries.next()) else {
            // None, or several: a filter that matches several entries cannot tell who logs in.
            return Err(Stop::Verdict(Verdict::UnknownUser));
        };
        let entry = SearchEntry::construct(entry);
        let first = |name: &str| {
            entry
                .attrs
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| v.first().cloned())
                .filter(|v| !v.is_empty())
        };
        let mut groups: Option<Vec<String>> = None;
        if let Some(a) = &c.group_attribute {
            let dns = entry.attrs.iter().filter(|(k, _)| k.eq_ignore_ascii_case(a)).flat_map(|(_, v)| v);
            groups.get_or_insert_default().extend(dns.filter_map(|dn| first_rdn_value(dn)));
        }
        if let Some(base) = &c.group_base_dn {
            let filter = group_filter(&c.group_filter, &entry.dn, login.username);
            let (found, _) = ldap
                .with_timeout(self.timeout)
                .search(base, Scope::Subtree, &filter, vec!["cn"])
                .await
                .map_err(|e| down("group search failed", e))?
                .success()
                .map_err(|e| down("group search failed", e))?;
            let names = found
                .into_iter()
                .map(SearchEntry::construct)
                .flat_map(|g| g.attrs.into_iter().filter(|(k, _)| k.eq_ignore_ascii_case("cn")).flat_map(|(_, v)| v));
            groups.get_or_insert_default().extend(names);
        }
        let r = ldap
            .with_timeout(self.timeout)
            .simple_bind(&entry.dn, login.password)
            .await
            .map_err(|e| down("user bind failed", e))?;
        if REJECTING_RESULT_CODES.contains(&r.rc) {
            return Ok(Verdict::WrongPassword);
        }
        if r.rc != 0 {
            return Err(Stop::Unavailable(format!("user bind failed: {}", describe(&r))));
        }
        let scopes = groups.map(|mut g| {
            g.sort();
            g.dedup();
            g.into_iter().map(|cn| format!("$XSAPPNAME.{cn}")).collect()
        });
        Ok(Verdict::Verified(Box::new(User {
            username: login.username.to_owned(),
            email: first(&c.email_attribute).unwrap_or_default(),
            user_id: first(&c.user_id_attribute).unwrap_or_else(|| entry.dn.clone()),
            tenant_id: c.tenant_id.clone(),
            given_name: first(&c.given_name_attribute),
            family_name: first(&c.family_name_attribute),
            scopes,
            ..Default::default()
        })))
    }
}

/// `group_filter` with `{dn}` and `{username}` replaced, escaped (RFC 4515).
fn group_filter(template: &str, dn: &str, username: &str) -> String {
    template.replace("{dn}", &ldap_escape(dn)).replace("{username}", &ldap_escape(username))
}

/// `cn=Read,ou=groups,dc=x` → `Read`.
fn first_rdn_value(dn: &str) -> Option<String> {
    let rdn = dn.split(',').next()?;
    let (_, value) = rdn.split_once('=')?;
    Some(value.trim().to_owned()).filter(|v| !v.is_empty())
}

impl UserStore for LdapUserStore {
    fn name(&self) -> String {
        format!("LDAP {}", self.config.url)
    }

    fn tenant_id(&self) -> Option<&str> {
        Some(&self.config.tenant_id)
    }

    fn verify<'a>(&'a self, login: Login<'a>) -> UserFuture<'a> {
        Box::pin(async move {
            if login.tenant.is_some_and(|t| t != self.config.tenant_id) || login.username.is_empty() {
                return Ok(Verdict::UnknownUser);
            }
            // An empty password would be an unauthenticated bind, which "succeeds".
            if login.password.is_empty() {
                return Ok(Verdict::WrongPassword);
            }
            let busy = || StoreUnavailable(format!("the user directory {} is busy: too many logins", self.config.url));
            let _permit = match tokio::time::timeout(self.timeout, self.permits.acquire()).await {
                Ok(Ok(p)) => p,
                _ => return Err(busy()),
            };
            let outcome = match self.connect().await {
                Ok(mut ldap) => {
                    let outcome = self.login(&mut ldap, login).await;
                    let _ = tokio::time::timeout(self.timeout, ldap.unbind()).await;
                    outcome
                }
                Err(stop) => Err(stop),
            };
            match outcome {
                Ok(v) | Err(Stop::Verdict(v)) => Ok(v),
                Err(Stop::Unavailable(why)) => {
                    Err(StoreUnavailable(format!("the user directory {} is unavailable: {why}", self.config.url)))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LdapConfig {
        LdapConfig {
            url: "ldap://127.0.0.1:389".into(),
            bind_dn: "cn=reader,dc=ferry,dc=test".into(),
            bind_password: "reader-secret".into(),
            base_dn: "dc=ferry,dc=test".into(),
            tenant_id: "zone".into(),
            ..Default::default()
        }
    }

    #[test]
    fn config_is_checked() {
        LdapUserStore::new(config()).unwrap();
        let bad = [
            LdapConfig { url: "http://x".into(), ..config() },
            LdapConfig { url: "ldaps://x".into(), starttls: true, ..config() },
            LdapConfig { bind_password: "".into(), ..config() },
            LdapConfig { base_dn: " ".into(), ..config() },
            LdapConfig { tenant_id: "".into(), ..config() },
            LdapConfig { user_filter: "(uid=x)".into(), ..config() },
            LdapConfig { user_filter: "(uid={username}".into(), ..config() },
            LdapConfig { email_attribute: "mail)(x".into(), ..config() },
            LdapConfig { timeout_secs: 0, ..config() },
        ];
        for c in bad {
            let shown = format!("{c:?}");
            assert!(LdapUserStore::new(c).is_err(), "{shown}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let s = LdapUserStore::new(config()).unwrap();
        assert!(!format!("{s:?}").contains("reader-secret"));
    }

    #[test]
    fn group_names_and_filters() {
        assert_eq!(first_rdn_value("cn=Read,ou=groups,dc=x").as_deref(), Some("Read"));
        assert_eq!(first_rdn_value("garbage"), None);
        assert_eq!(
            group_filter(DEFAULT_GROUP_FILTER, "uid=a*(,dc=x", "a*"),
            "(&(objectClass=groupOfNames)(member=uid=a\\2a\\28,dc=x))"
        );
    }
}
