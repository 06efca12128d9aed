//! What the token service is told to serve, and the checks that run before it serves anything.
//!
//! Everything is validated up front in [`TokenService::new`](super::TokenService::new) so that
//! a typo in `ferry up`'s configuration fails at start-up with a message naming the culprit,
//! instead of as an `invalid_client` on the first request of some SAP client much later.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::Secret;

use super::users::UserStore;
use crate::jwt::KeySet;

/// The grant types the token service implements, in the spelling of the `grant_type` form field.
pub const GRANT_CLIENT_CREDENTIALS: &str = "client_credentials";
pub const GRANT_PASSWORD: &str = "password";
pub const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 7522: a signed SAML 2.0 assertion of a trusted identity provider (see
/// [`TokenService::trust_saml_idp`](super::TokenService::trust_saml_idp)).
pub const GRANT_SAML2_BEARER: &str = "urn:ietf:params:oauth:grant-type:saml2-bearer";
pub const GRANT_REFRESH_TOKEN: &str = "refresh_token";
pub const GRANT_AUTHORIZATION_CODE: &str = "authorization_code";
/// RFC 8693 token exchange of a user's token from one of the service's tenants, for an access
/// token or (`requested_token_type` [`TOKEN_TYPE_SAML2`], as SAP's IAS does for destination
/// chaining) a SAML 2.0 assertion the tenant signs.
pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const SUPPORTED_GRANT_TYPES: [&str; 7] = [
    GRANT_CLIENT_CREDENTIALS,
    GRANT_PASSWORD,
    GRANT_JWT_BEARER,
    GRANT_REFRESH_TOKEN,
    GRANT_AUTHORIZATION_CODE,
    GRANT_SAML2_BEARER,
    GRANT_TOKEN_EXCHANGE,
];

/// RFC 8693 token type identifiers.
pub const TOKEN_TYPE_ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TOKEN_TYPE_ID: &str = "urn:ietf:params:oauth:token-type:id_token";
pub const TOKEN_TYPE_SAML2: &str = "urn:ietf:params:oauth:token-type:saml2";

/// XSUAA's default access-token lifetime; SAP clients size their token caches by `expires_in`,
/// so a shorter default would only cause extra token calls.
pub const DEFAULT_TOKEN_VALIDITY: Duration = Duration::from_secs(12 * 60 * 60);

/// XSUAA's default refresh-token lifetime (30 days).
pub const DEFAULT_REFRESH_TOKEN_VALIDITY: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// An identity zone (XSUAA's word; a subaccount in BTP terms). Each tenant signs with its own
/// keys because xssec fetches verification keys per zone (`/token_keys?zid=`), so a token of
/// one tenant must not verify as another's.
///
/// Every tenant is treated as subscribed to every client's application for now: any client
/// may obtain tokens in any configured tenant. Subscriptions can narrow this later without
/// changing the wire behaviour for the subscribed case.
#[derive(Clone, Debug)]
pub struct Tenant {
    /// The zone id (`zid`), a GUID in BTP; it is also the subaccount id Ferry's services key on.
    pub id: String,
    /// The subdomain, which SAP clients put in front of `uaadomain` to address the tenant and
    /// read back from `ext_attr.zdn`.
    pub subdomain: String,
    pub keys: Arc<KeySet>,
}

/// A service binding's OAuth client (`clientid`/`clientsecret` of a `destination`,
/// `connectivity` or `xsuaa` binding).
///
/// Fields added after the first release have defaults; build one with
/// `OAuthClient { client_id, client_secret, …, ..Default::default() }`.
#[derive(Clone, Debug, Default)]
pub struct OAuthClient {
    pub client_id: String,
    /// May be empty for a client that authenticates only with an X.509 certificate (see
    /// `certificates`); a client needs one or the other. May also be an Argon2 PHC string
    /// ([`hash_password`](super::hash_password)), as the subaccount directory stores them; it is
    /// then verified with Argon2 (once per process and secret, then from a SHA-256 cache).
    pub client_secret: Secret<String>,
    /// The zone the client lives in (the provider tenant). Requests that name no zone get a
    /// token there.
    pub tenant_id: String,
    pub xsappname: String,
    /// Scopes of client-credentials tokens, e.g. `["uaa.resource"]`.
    pub authorities: Vec<String>,
    /// Scopes a user token may carry for this client, e.g. `["openid"]`; a user token gets
    /// those of them the user is granted (see [`User::scopes`]).
    pub scopes: Vec<String>,
    /// Written to `ext_attr.serviceinstanceid`, which the Destination Service uses to find
    /// instance-level destinations.
    pub service_instance_id: Option<String>,
    /// Allowed grants; empty allows every supported grant.
    pub grant_types: Vec<String>,
    /// Where the `authorization_code` grant may send the browser back to. An entry matches a
    /// requested `redirect_uri` that is equal to it (after URL normalisation), or — if the
    /// entry's path ends with `/` and it has no query — any URI with the same scheme, host and
    /// port whose path lies below the entry's path (`http://localhost:5000/` allows
    /// `http://localhost:5000/login/callback`; a bare origin normalises to path `/` and so
    /// allows the whole origin). Dot segments are resolved before comparing. XSUAA's `*`/`**`
    /// wildcards are not supported. Only `http`/`https` URIs without fragment or user info.
    /// Empty: the client cannot use the authorization-code grant.
    pub redirect_uris: Vec<String>,
    /// X.509 client certificates that authenticate this client on the HTTPS listener (mTLS, as
    /// xssec does for `credential-type: x509` bindings: the body carries only `client_id`).
    pub certificates: Vec<CertificateBinding>,
    /// Public keys that verify this client's signed client assertions (RFC 7523 §2.2, OIDC
    /// `private_key_jwt`: `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`),
    /// each a PEM certificate (an X.509 service key's `certificate`), a PEM `PUBLIC KEY`, a JWK
    /// or a JWKS. Certificates issued by
    /// [`issue_client_certificate`](super::TokenService::issue_client_certificate) verify
    /// assertions too.
    pub assertion_keys: Vec<String>,
    /// Issuers whose tokens this client may present as its client assertion (workload identity
    /// federation, as IAS and Entra ID offer it; SAP's assertion provider destinations hand
    /// over another token service's access token this way).
    pub federated_assertions: Vec<FederatedAssertion>,
    /// Lifetime of this client's access tokens; `None`: the service-wide `token_validity`.
    pub access_token_validity: Option<Duration>,
    /// Lifetime of this client's refresh tokens; `None`: the service-wide
    /// `refresh_token_validity`.
    pub refresh_token_validity: Option<Duration>,
    /// XSUAA's `tenantmode: dedicated`: tokens only in `tenant_id`. Without it the client is
    /// treated as subscribed everywhere (see [`Tenant`]), which would let a binding of one
    /// subaccount read another's destinations and tunnels with `x-zid`.
    pub dedicated: bool,
}

/// A token issuer an [`OAuthClient`] trusts for its client assertions: a token of `issuer` whose
/// `sub` is `subject` and whose `aud` names `audience`, signed by one of `keys`, authenticates
/// the client (sent with `client_id`, as the token's `iss` is not the client). Unlike a
/// self-signed assertion such a token may be presented again until it expires (its holder
/// caches it), but it must expire within `MAX_CLIENT_ASSERTION_LIFETIME_SECS`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FederatedAssertion {
    /// `iss` of the tokens, exactly.
    pub issuer: String,
    /// `sub` of the tokens, exactly: the client of the other token service, say.
    pub subject: String,
    /// What `aud` must name; `None`: this client's id.
    pub audience: Option<String>,
    /// The issuer's signature keys as for [`OAuthClient::assertion_keys`] (its JWKS, say).
    pub keys: String,
}

/// Which TLS client certificates authenticate an [`OAuthClient`].
///
/// The HTTPS listener verifies the certificate chain (see
/// [`https_server_config`](super::https_server_config)); a binding then says which verified
/// certificates belong to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertificateBinding {
    /// Exactly this certificate: the SHA-256 of its DER encoding, hex (case and `:` separators
    /// are ignored). Pinning survives any CA but not a renewal.
    Sha256Fingerprint(String),
    /// Any certificate with this subject issued by this issuer, both distinguished names as
    /// [`certificate_names`](super::certificate_names) prints them (e.g.
    /// `CN=sb-app!t1, OU=ferry-oauth-client, O=Ferry`). XSUAA validates X.509 credentials the
    /// same way, so renewed certificates keep working.
    SubjectAndIssuer { subject: String, issuer: String },
}
impl OAuthClient {
    pub(crate) fn allows_grant(&self, grant: &str) -> bool {
        self.grant_types.is_empty() || self.grant_types.iter().any(|g| g == grant)
    }
}

/// A user who can log in with the password or authorization-code grant, and whose identity
/// user tokens carry.
///
/// Fields added after the first release have defaults; build one with
/// `User { username, password, …, ..Default::default() }`.
#[derive(Clone, Debug, Default)]
pub struct User {
    pub username: String,
    /// The password, or its Argon2 hash as a PHC string (`$argon2id$v=19$m=…`, as
    /// [`hash_password`](super::hash_password) makes): a value starting with `$argon2` is taken
    /// as a hash and must parse as one. A plain password is hashed (Argon2id) when the service
    /// is built and not kept. Empty: the user cannot log in (tokens only through
    /// [`issue_user_token`](super::TokenService::issue_user_token)).
    pub password: Secret<String>,
    pub email: String,
    /// `user_id` in tokens; the SAP Cloud SDK isolates its destination cache per user by it.
    pub user_id: String,
    /// The zone the user belongs to; the password grant only finds users of the addressed zone.
    pub tenant_id: String,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    /// Scopes the user is granted. A user token carries the client's `scopes` that are in this
    /// list; `openid` is always granted (every XSUAA user has it). `None`: every scope of the
    /// client, as before this field existed.
    pub scopes: Option<Vec<String>>,
}

#[derive(Clone, Debug)]
pub struct TokenServiceConfig {
    pub tenants: Vec<Tenant>,
    pub clients: Vec<OAuthClient>,
    pub users: Vec<User>,
    /// Further sources of users (e.g. [`LdapUserStore`](super::LdapUserStore)), asked in order
    /// for usernames that are not in `users`.
    pub user_stores: Vec<Arc<dyn UserStore>>,
    /// `credentials.url` of bindings, e.g. `http://127.0.0.1:18081`: where provider tokens are
    /// fetched, and the issuer base when `uaadomain` is not a dotted DNS name.
    pub public_url: String,
    /// `credentials.uaadomain`, e.g. `127.0.0.1:18443`: xssec sends tenant token requests to
    /// `https://{uaadomain}` (with `x-zid`) or `https://{subdomain}.{uaadomain}`.
    pub uaadomain: String,
    /// Lifetime of access tokens, unless a client sets its own.
    pub token_validity: Duration,
    /// Lifetime of refresh tokens, unless a client sets its own.
    pub refresh_token_validity: Duration,
}

/// Empty lists and URLs, so that `..Default::default()` keeps the XSUAA token lifetime; the
/// URLs must still be set or [`TokenService::new`](super::TokenService::new) refuses the config.
impl Default for TokenServiceConfig {
    fn default() -> Self {
        Self {
            tenants: Vec::new(),
            clients: Vec::new(),
            users: Vec::new(),
            user_stores: Vec::new(),
            public_url: String::new(),
            uaadomain: String::new(),
            token_validity: DEFAULT_TOKEN_VALIDITY,
            refresh_token_validity: DEFAULT_REFRESH_TOKEN_VALIDITY,
        }
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    #[error("the token service needs at least one tenant")]
    NoTenants,
    #[error("tenant id {0:?} is empty or contains characters not allowed in a header or URL")]
    InvalidTenantId(String),
    #[error("tenant id {0:?} is configured twice")]
    DuplicateTenant(String),
    #[error("subdomain {0:?} is not a DNS label (letters, digits and '-')")]
    InvalidSubdomain(String),
    #[error("subdomain {0:?} is used by two tenants")]
    DuplicateSubdomain(String),
    #[error("client id must not be empty")]
    EmptyClientId,
    #[error("client {0:?} is configured twice")]
    DuplicateClient(String),
    #[error("client {0:?} has neither a secret, a certificate binding nor an assertion key, so it cannot authenticate")]
    EmptyClientSecret(String),
    #[error("client {client:?} has an invalid certificate fingerprint {fingerprint:?} (want 64 hex digits of SHA-256)")]
    InvalidCertificateFingerprint { client: String, fingerprint: String },
    #[error("client {client:?} has an unusable assertion key: {reason}")]
    InvalidAssertionKey { client: String, reason: String },
    #[error("client {client:?} has an empty certificate subject or issuer")]
    InvalidCertificateSubject { client: String },
    #[error("client {client:?} has an invalid redirect URI {uri:?}: {reason}")]
    InvalidRedirectUri { client: String, uri: String, reason: &'static str },
    #[error("client {client:?}: token validities must be at least one second")]
    ZeroClientValidity { client: String },
    #[error("client {client:?} names unknown tenant {tenant:?}")]
    ClientTenantUnknown { client: String, tenant: String },
    #[error("client {client:?} allows unsupported grant type {grant:?}")]
    UnsupportedGrant { client: String, grant: String },
    #[error("username must not be empty")]
    EmptyUsername,
    #[error("user {user:?} names unknown tenant {tenant:?}")]
    UserTenantUnknown { user: String, tenant: String },
    #[error("user {user:?} is configured twice in tenant {tenant:?}")]
    DuplicateUser { user: String, tenant: String },
    #[error("user {user:?}: the password looks like an Argon2 hash but is not a usable one: {reason}")]
    InvalidPasswordHash { user: String, reason: String },
    #[error("cannot hash the password of user {user:?}: {reason}")]
    PasswordHashing { user: String, reason: String },
    #[error("user store {store}: {reason}")]
    UserStore { store: String, reason: String },
    #[error("public_url {0:?} is not an http(s) URL without query or fragment")]
    InvalidPublicUrl(String),
    #[error("uaadomain {0:?} must be host[:port], without scheme or path")]
    InvalidUaaDomain(String),
    #[error("token_validity and refresh_token_validity must be at least one second")]
    ZeroValidity,
    #[error("cannot build the HTTP client for the verifier: {0}")]
    Http(String),
}

/// `uaadomain` split into the parts the service needs.
#[derive(Clone, Debug)]
pub(crate) struct UaaDomain {
    /// As configured (`host[:port]`), for building `https://` URLs.
    pub full: String,
    /// Lower-cased host without port, for matching `Host` headers.
    pub host: String,
    /// A dotted DNS name: only then can `https://{subdomain}.{uaadomain}` be an issuer that SAP's
    /// clients parse a subdomain from (an IP address or `localhost` cannot take a subdomain).
    pub dotted_dns: bool,
    /// Whether `Host: {subdomain}.{host}` can address a tenant (not for IP addresses).
    pub is_name: bool,
}

pub(crate) fn parse_uaadomain(raw: &str) -> Result<UaaDomain, ConfigError> {
    let err = || ConfigError::InvalidUaaDomain(raw.to_owned());
    if raw.is_empty() || raw.contains("://") || raw.contains(['/', '?', '#', '@', ' ']) {
        return Err(err());
    }
    let url = url::Url::parse(&format!("https://{raw}")).map_err(|_| err())?;
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
        Some(url::Host::Ipv4(ip)) => return Ok(ip_domain(raw, IpAddr::V4(ip))),
        Some(url::Host::Ipv6(ip)) => return Ok(ip_domain(raw, IpAddr::V6(ip))),
        None => return Err(err()),
    };
    Ok(UaaDomain { full: raw.to_owned(), dotted_dns: host.contains('.'), is_name: true, host })
}

fn ip_domain(raw: &str, ip: IpAddr) -> UaaDomain {
    let host = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    UaaDomain { full: raw.to_owned(), host, dotted_dns: false, is_name: false }
}

/// Returns `public_url` without trailing slashes, after checking it is a usable base URL.
pub(crate) fn parse_public_url(raw: &str) -> Result<String, ConfigError> {
    let err = || ConfigError::InvalidPublicUrl(raw.to_owned());
    let url = url::Url::parse(raw).map_err(|_| err())?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() || url.query().is_some() {
        return Err(err());
    }
    if url.fragment().is_some() || !url.username().is_empty() || url.password().is_some() {
        return Err(err());
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

/// A SHA-256 fingerprint as lower-case hex without separators, or `None` if it is not one.
pub(crate) fn normalize_fingerprint(raw: &str) -> Option<String> {
    let hex: String = raw.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect::<String>().to_ascii_lowercase();
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// Parses a redirect URI as a client may register or request it (RFC 6749 §3.1.2: absolute,
/// no fragment); only `http(s)`, and no user info, which only serves to disguise a host.
pub(crate) fn parse_redirect_uri(raw: &str) -> Result<url::Url, &'static str> {
    let url = url::Url::parse(raw).map_err(|_| "not an absolute URL")?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("only http and https redirect URIs are supported");
    }
    if url.host().is_none() {
        return Err("no host");
    }
    if url.fragment().is_some() || raw.contains('#') {
        return Err("a redirect URI must not have a fragment");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("a redirect URI must not carry user info");
    }
    Ok(url)
}

/// Whether `raw` may be registered as a client's redirect URI; the reason if not.
pub fn check_redirect_uri(raw: &str) -> Result<(), &'static str> {
    parse_redirect_uri(raw).map(drop)
}

fn valid_zone_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic() && !b"/?#&%+=\"\\".contains(&b))
}

fn valid_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Checks references and uniqueness across the whole config; see [`ConfigError`] for each rule.
pub(crate) fn validate(config: &TokenServiceConfig) -> Result<(), ConfigError> {
    if config.tenants.is_empty() {
        return Err(ConfigError::NoTenants);
    }
    if config.token_validity.as_secs() == 0 || config.refresh_token_validity.as_secs() == 0 {
        return Err(ConfigError::ZeroValidity);
    }
    let mut ids = HashSet::new();
    let mut subdomains = HashSet::new();
    for t in &config.tenants {
        if !valid_zone_id(&t.id) {
            return Err(ConfigError::InvalidTenantId(t.id.clone()));
        }
        if !ids.insert(t.id.as_str()) {
            return Err(ConfigError::DuplicateTenant(t.id.clone()));
        }
        if !valid_subdomain(&t.subdomain) {
            return Err(ConfigError::InvalidSubdomain(t.subdomain.clone()));
        }
        if !subdomains.insert(t.subdomain.to_ascii_lowercase()) {
            return Err(ConfigError::DuplicateSubdomain(t.subdomain.clone()));
        }
    }
    let mut clients = HashSet::new();
    for c in &config.clients {
        validate_client(c, |t| ids.contains(t))?;
        if !clients.insert(c.client_id.as_str()) {
            return Err(ConfigError::DuplicateClient(c.client_id.clone()));
        }
    }
    let mut users = HashSet::new();
    for u in &config.users {
        if u.username.is_empty() {
            return Err(ConfigError::EmptyUsername);
        }
        if !ids.contains(u.tenant_id.as_str()) {
            return Err(ConfigError::UserTenantUnknown { user: u.username.clone(), tenant: u.tenant_id.clone() });
        }
        if !users.insert((u.tenant_id.as_str(), u.username.as_str())) {
            return Err(ConfigError::DuplicateUser { user: u.username.clone(), tenant: u.tenant_id.clone() });
        }
    }
    for store in &config.user_stores {
        if let Some(t) = store.tenant_id().filter(|t| !ids.contains(t)) {
            return Err(ConfigError::UserStore { store: store.name(), reason: format!("unknown tenant {t:?}") });
        }
    }
    parse_public_url(&config.public_url)?;
    parse_uaadomain(&config.uaadomain)?;
    Ok(())
}

/// Checks one client on its own; `tenant_exists` says whether its zone is known.
pub(crate) fn validate_client(c: &OAuthClient, tenant_exists: impl Fn(&str) -> bool) -> Result<(), ConfigError> {
    if c.client_id.is_empty() {
        return Err(ConfigError::EmptyClientId);
    }
    if c.client_secret.expose().is_empty()
        && c.certificates.is_empty()
        && c.assertion_keys.is_empty()
        && c.federated_assertions.is_empty()
    {
        return Err(ConfigError::EmptyClientSecret(c.client_id.clone()));
    }
    for b in &c.certificates {
        match b {
            CertificateBinding::Sha256Fingerprint(f) if normalize_fingerprint(f).is_none() => {
                return Err(ConfigError::InvalidCertificateFingerprint {
                    client: c.client_id.clone(),
                    fingerprint: f.clone(),
                });
            }
            CertificateBinding::SubjectAndIssuer { subject, issuer }
                if subject.trim().is_empty() || issuer.trim().is_empty() =>
            {
                return Err(ConfigError::InvalidCertificateSubject { client: c.client_id.clone() });
            }
            _ => {}
        }
    }
    for key in c.assertion_keys.iter().chain(c.federated_assertions.iter().map(|f| &f.keys)) {
        crate::jwt::VerifyKey::from_registered(key)
            .map_err(|reason| ConfigError::InvalidAssertionKey { client: c.client_id.clone(), reason })?;
    }
    if c.federated_assertions.iter().any(|f| f.issuer.is_empty() || f.subject.is_empty()) {
        return Err(ConfigError::InvalidAssertionKey {
            client: c.client_id.clone(),
            reason: "a federated assertion issuer needs a non-empty issuer and subject".into(),
        });
    }
    for uri in &c.redirect_uris {
        if let Err(reason) = parse_redirect_uri(uri) {
            return Err(ConfigError::InvalidRedirectUri { client: c.client_id.clone(), uri: uri.clone(), reason });
        }
    }
    let zero = |d: Option<Duration>| d.is_some_and(|d| d.as_secs() == 0);
    if zero(c.access_token_validity) || zero(c.refresh_token_validity) {
        return Err(ConfigError::ZeroClientValidity { client: c.client_id.clone() });
    }
    if !tenant_exists(c.tenant_id.as_str()) {
        return Err(ConfigError::ClientTenantUnknown { client: c.client_id.clone(), tenant: c.tenant_id.clone() });
    }
    if let Some(g) = c.grant_types.iter().find(|g| !SUPPORTED_GRANT_TYPES.contains(&g.as_str())) {
        return Err(ConfigError::UnsupportedGrant { client: c.client_id.clone(), grant: g.clone() });
    }
    Ok(())
}

/// Checks a tenant's id and subdomain on their own (uniqueness is the caller's).
pub(crate) fn validate_tenant(t: &Tenant) -> Result<(), ConfigError> {
    if !valid_zone_id(&t.id) {
        return Err(ConfigError::InvalidTenantId(t.id.clone()));
    }
    if !valid_subdomain(&t.subdomain) {
        return Err(ConfigError::InvalidSubdomain(t.subdomain.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uaadomain_kinds() {
        let d = parse_uaadomain("127.0.0.1:18443").unwrap();
        assert!(!d.dotted_dns && !d.is_name);
        assert_eq!(d.host, "127.0.0.1");
        let d = parse_uaadomain("Auth.Example.com").unwrap();
        assert!(d.dotted_dns && d.is_name);
        assert_eq!(d.host, "auth.example.com");
        let d = parse_uaadomain("localhost:8443").unwrap();
        assert!(!d.dotted_dns && d.is_name);
        assert!(parse_uaadomain("[::1]:8443").is_ok());
        for bad in ["", "https://x.y", "x.y/path", "x y", "a@b"] {
            assert!(parse_uaadomain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn public_url_is_trimmed_and_checked() {
        assert_eq!(parse_public_url("http://127.0.0.1:18081/").unwrap(), "http://127.0.0.1:18081");
        for bad in ["", "127.0.0.1:18081", "ftp://x", "http://x/?a=b", "http://u:p@x"] {
            assert!(parse_public_url(bad).is_err(), "{bad}");
        }
    }
}
