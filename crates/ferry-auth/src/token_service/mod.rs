//! An XSUAA-compatible token service: the `credentials.url`/`uaadomain` end of every service
//! binding Ferry hands to SAP applications.
//!
//! SAP's clients (xssec, the Cloud SDK, the approuter) never see a real XSUAA when they run
//! against Ferry, so this service reproduces what they depend on — the form-encoded
//! `/oauth/token` endpoint with its grants, tenant addressing by `x-zid` or subdomain, the XSUAA
//! claim shape and per-tenant `/token_keys` — and nothing of XSUAA's administration.
//! See `CLIENT-CONTRACT.md` §2 for the recorded wire traffic this follows.
//!
//! The service is one [`axum::Router`] served on two listeners: plain HTTP at `public_url` (where
//! provider tokens are fetched) and HTTPS at `uaadomain` (xssec hard-codes `https://` for tenant
//! tokens).

mod authorize;
mod claims;
mod client_assertion;
mod clock;
mod config;
mod http;
mod keys;
mod ldap;
mod mtls;
mod password;
mod refresh;
mod throttle;
mod users;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferry_core::Shutdown;
use ferry_core::serve::{AcceptOptions, serve_router};
use ferry_core::tls::{CertifiedKey, LocalCa};

pub use client_assertion::MAX_CLIENT_ASSERTION_LIFETIME_SECS;
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{
    CertificateBinding, ConfigError, DEFAULT_REFRESH_TOKEN_VALIDITY, DEFAULT_TOKEN_VALIDITY, FederatedAssertion,
    GRANT_AUTHORIZATION_CODE, GRANT_CLIENT_CREDENTIALS, GRANT_JWT_BEARER, GRANT_PASSWORD, GRANT_REFRESH_TOKEN,
    GRANT_SAML2_BEARER, GRANT_TOKEN_EXCHANGE, OAuthClient, SUPPORTED_GRANT_TYPES, TOKEN_TYPE_ACCESS, TOKEN_TYPE_ID,
    TOKEN_TYPE_JWT, TOKEN_TYPE_SAML2, Tenant, TokenServiceConfig, User, check_redirect_uri,
};
pub use ldap::{DEFAULT_GROUP_FILTER, DEFAULT_USER_FILTER, LdapConfig, LdapUserStore};
pub use mtls::{TlsInfo, certificate_fingerprint, certificate_names, https_server_config, serve_router_with_tls_info};
pub use password::{PasswordError, hash_password};
pub use users::{Login, StoreUnavailable, UserFuture, UserStore, Verdict};

use crate::jwt::{KeyError, TenantKeys, TrustedIssuer, Verifier};
use authorize::AuthStore;
use claims::{TokenFacts, UserIdentity};
use config::UaaDomain;
use keys::KeyHistory;
use password::PasswordVerifier;
use refresh::{RefreshGrant, RefreshStore};
use users::{LocalUserStore, StoredUser};

/// How long after its expiry a token may still be accepted somewhere: xssec allows 60 s of
/// clock skew (Ferry's own verifier 30 s), so a retired key must have been idle that much longer.
const RETIREMENT_GRACE_SECS: u64 = 60;

/// How often [`run`] retires expired signing keys when nothing else triggers it.
const RETIREMENT_INTERVAL: Duration = Duration::from_secs(60);

/// Why a [`TokenService`] operation outside a request failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("unknown client {0:?}")]
    UnknownClient(String),
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("unknown tenant {0:?}")]
    UnknownTenant(String),
    #[error("signing key: {0}")]
    Sign(#[from] KeyError),
    #[error("cannot issue a client certificate: {0}")]
    Certificate(String),
    #[error("{0:?} comes from the configuration and cannot be removed at run time")]
    Static(String),
    #[error("tenant {0:?} is still used by a configured client or user")]
    TenantInUse(String),
}

/// A tenant with what is derived from it once instead of per request.
struct TenantState {
    tenant: Tenant,
    /// Verifies only this tenant's keys, so that an assertion cannot cross zones by claiming a
    /// `zid` it was not signed for.
    verifier: Verifier,
    /// `iss` of its tokens; also `issuer` and `token_endpoint` of its OpenID configuration.
    issuer: String,
    /// `jku` of its tokens and `jwks_uri` of its OpenID configuration: a URL that yields *this*
    /// tenant's keys, since a key URL that served another tenant's keys would be useless to
    /// anyone following it.
    jwks_uri: String,
    /// When each superseded signing key stopped signing, for retiring it.
    history: KeyHistory,
}

/// The token service's state: configuration, signing keys and the grants it issued.
pub struct TokenService {
    /// Configured tenants first, then those added at run time ([`TokenService::add_tenant`]).
    tenants: RwLock<Vec<Arc<TenantState>>>,
    clients: RwLock<HashMap<String, Arc<OAuthClient>>>,
    /// Ids of the tenants and clients of the configuration, which cannot be removed.
    static_tenants: HashSet<String>,
    static_clients: HashSet<String>,
    /// Every tenant's keys, for in-process verifiers ([`TokenService::verifier`]).
    tenant_keys: TenantKeys,
    /// SHA-256 of secrets already checked against a client's Argon2 hash, so that a client
    /// with a hashed secret pays for Argon2 once per process, not per token request.
    verified_secrets: RwLock<HashMap<String, [u8; 32]>>,
    /// The configured users; asked first.
    users: LocalUserStore,
    /// Further user stores (LDAP), asked in order for users the local store does not know.
    user_stores: Vec<Arc<dyn UserStore>>,
    public_url: String,
    uaadomain: UaaDomain,
    token_validity_secs: u64,
    refresh_validity_secs: u64,
    /// How long a superseded key stays published: the longest access-token lifetime of any
    /// client plus [`RETIREMENT_GRACE_SECS`].
    key_lifetime_secs: u64,
    refresh: RefreshStore,
    auth: AuthStore,
    passwords: PasswordVerifier,
    /// Certificate bindings added by [`TokenService::issue_client_certificate`], by client id.
    issued_bindings: RwLock<HashMap<String, Vec<CertificateBinding>>>,
    /// Failed logons at the token endpoint per peer address (429 after too many).
    failed_logons: throttle::FailedLogons,
    /// The same certificates (PEM), whose keys also verify the client's client assertions.
    issued_certificates: RwLock<HashMap<String, Vec<String>>>,
    clock: Arc<dyn Clock>,
    http: reqwest::Client,
    /// Certificates of the SAML identity providers each tenant trusts for the saml2-bearer
    /// grant, by tenant id.
    saml_idps: RwLock<HashMap<String, Vec<crate::saml::TrustedCertificate>>>,
    /// Assertions already redeemed (zone, issuer, ID) until they expire: a bearer assertion
    /// is good for one token (RFC 7522 §3, replay).
    saml_used: std::sync::Mutex<HashMap<(String, String, String), u64>>,
    /// Each tenant's SAML signing key and certificate, made when first needed (token exchange
    /// for a SAML assertion); every tenant trusts its own for the saml2-bearer grant.
    saml_signers: RwLock<HashMap<String, Arc<crate::saml::SamlSigner>>>,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("tenants", &self.tenants_snapshot().iter().map(|t| t.tenant.clone()).collect::<Vec<_>>())
            .field(
                "clients",
                &self.clients.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect::<Vec<_>>(),
            )
            .field("users", &self.users)
            .field("user_stores", &self.user_stores)
            .field("public_url", &self.public_url)
            .field("uaadomain", &self.uaadomain.full)
            .field("refresh", &self.refresh)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// The sockets [`run`] serves. Either may be absent: tests often need only one, and a
/// deployment behind a TLS-terminating ingress needs no HTTPS listener of its own.
///
/// For client authentication by certificate, build the HTTPS config with
/// [`https_server_config`] (it requests client certificates); any other config works too, just
/// without certificate authentication.
#[derive(Debug, Default)]
pub struct Listeners {
    pub http: Option<tokio::net::TcpListener>,
    pub https: Option<(tokio::net::TcpListener, Arc<rustls::ServerConfig>)>,
}

/// Serves the token service on every given listener until `shutdown` fires, then lets open
/// connections finish their requests. Also retires expired signing keys periodically.
pub async fn run(service: Arc<TokenService>, listeners: Listeners, shutdown: Shutdown) {
    run_with_routes(service, axum::Router::new(), listeners, shutdown).await
}

/// [`run`], serving `extra` routes (e.g. the admin API of `ferry-directory`) on the same
/// listeners.
pub async fn run_with_routes(
    service: Arc<TokenService>,
    extra: axum::Router,
    listeners: Listeners,
    shutdown: Shutdown,
) {
    let router = service.router().merge(extra);
    let http = listeners
        .http
        .map(|l| serve_router(l, router.clone(), None, AcceptOptions::named("token-service"), shutdown.clone()));
    let https = listeners.https.map(|(l, tls)| {
        serve_router_with_tls_info(
            l,
            router.clone(),
            tls,
            AcceptOptions::named("token-service-https"),
            shutdown.clone(),
        )
    });
    let retire = async {
        let mut tick = tokio::time::interval(RETIREMENT_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => { service.retire_expired_keys(); }
            }
        }
    };
    tokio::join!(
        async {
            if let Some(f) = http {
                f.await
            }
        },
        async {
            if let Some(f) = https {
                f.await
            }
        },
        retire,
    );
}

/// A freshly signed access token and what the token response reports about it.
pub(crate) struct Issued {
    pub access_token: String,
    pub jti: String,
    pub expires_in: u64,
    pub scopes: Vec<String>,
    pub refresh_token: Option<String>,
    /// `token_type` of the response: `bearer`, or RFC 8693's `N_A` for a SAML assertion.
    pub token_type: &'static str,
    /// RFC 8693 `issued_token_type`, for token exchange.
    pub issued_token_type: Option<&'static str>,
}

/// The scopes a user token for `client` may carry: the client's `scopes` the user is granted
/// (all of them for a user without a scope list), in the client's order. A granted scope
/// `$XSAPPNAME.x` stands for `<xsappname>.x` of the client at hand (how LDAP groups grant).
fn user_scopes(client: &OAuthClient, user: Option<&User>) -> Vec<String> {
    let grants = |granted: &[String], scope: &str| {
        granted.iter().any(|g| match g.strip_prefix("$XSAPPNAME.") {
            Some(local) => {
                scope.strip_prefix(client.xsappname.as_str()).and_then(|r| r.strip_prefix('.')) == Some(local)
            }
            None => g == scope,
        })
    };
    match user.and_then(|u| u.scopes.as_ref()) {
        None => client.scopes.clone(),
        Some(granted) => client.scopes.iter().filter(|s| *s == "openid" || grants(granted, s)).cloned().collect(),
    }
}

impl TokenService {
    /// Validates `config` and builds the service. Plain passwords are hashed here (Argon2id,
    /// some tens of milliseconds per user).
    pub fn new(config: TokenServiceConfig) -> Result<Arc<Self>, ConfigError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// [`TokenService::new`] with another clock, for tests of expiry (see [`ManualClock`]).
    pub fn with_clock(config: TokenServiceConfig, clock: Arc<dyn Clock>) -> Result<Arc<Self>, ConfigError> {
        let statics = (
            config.tenants.iter().map(|t| t.id.clone()).collect(),
            config.clients.iter().map(|c| c.client_id.clone()).collect(),
        );
        Self::build(config, clock, statics)
    }

    /// [`TokenService::new`] plus tenants and clients kept outside the configuration (a
    /// subaccount directory): validated together with it, but removable at run time like those
    /// added by [`TokenService::add_tenant`] and [`TokenService::add_client`].
    pub fn with_runtime_entries(
        mut config: TokenServiceConfig,
        tenants: Vec<Tenant>,
        clients: Vec<OAuthClient>,
    ) -> Result<Arc<Self>, ConfigError> {
        let statics = (
            config.tenants.iter().map(|t| t.id.clone()).collect(),
            config.clients.iter().map(|c| c.client_id.clone()).collect(),
        );
        config.tenants.extend(tenants);
        config.clients.extend(clients);
        Self::build(config, Arc::new(SystemClock), statics)
    }

    fn build(
        config: TokenServiceConfig,
        clock: Arc<dyn Clock>,
        (static_tenants, static_clients): (HashSet<String>, HashSet<String>),
    ) -> Result<Arc<Self>, ConfigError> {
        config::validate(&config)?;
        let public_url = config::parse_public_url(&config.public_url)?;
        let uaadomain = config::parse_uaadomain(&config.uaadomain)?;
        // Only local issuers are ever verified here, so this client never connects anywhere;
        // `Verifier` merely requires one. Built once, as building one loads TLS state.
        ferry_core::init_crypto();
        let http = reqwest::Client::builder().build().map_err(|e| ConfigError::Http(e.to_string()))?;
        let users = LocalUserStore::new(config.users)?;
        let passwords = PasswordVerifier::new()
            .map_err(|e| ConfigError::PasswordHashing { user: String::new(), reason: e.to_string() })?;
        let token_validity_secs = config.token_validity.as_secs();
        let longest = config
            .clients
            .iter()
            .filter_map(|c| c.access_token_validity)
            .map(|d| d.as_secs())
            .fold(token_validity_secs, u64::max);
        let key_lifetime_secs = longest.saturating_add(RETIREMENT_GRACE_SECS);
        let now = clock.now_secs();
        let tenant_keys = TenantKeys::default();
        let tenants = config
            .tenants
            .into_iter()
            .map(|tenant| {
                tenant_keys.insert(&tenant.id, tenant.keys.clone());
                Arc::new(tenant_state(tenant, &public_url, &uaadomain, &http, now, key_lifetime_secs))
            })
            .collect();
        Ok(Arc::new(Self {
            tenants: RwLock::new(tenants),
            clients: RwLock::new(config.clients.into_iter().map(|c| (c.client_id.clone(), Arc::new(c))).collect()),
            static_tenants,
            static_clients,
            tenant_keys,
            verified_secrets: RwLock::new(HashMap::new()),
            users,
            user_stores: config.user_stores,
            public_url,
            uaadomain,
            token_validity_secs,
            refresh_validity_secs: config.refresh_token_validity.as_secs(),
            key_lifetime_secs,
            refresh: RefreshStore::default(),
            auth: AuthStore::default(),
            passwords,
            issued_bindings: RwLock::new(HashMap::new()),
            failed_logons: throttle::FailedLogons::default(),
            issued_certificates: RwLock::new(HashMap::new()),
            clock,
            http,
            saml_idps: RwLock::new(HashMap::new()),
            saml_used: std::sync::Mutex::new(HashMap::new()),
            saml_signers: RwLock::new(HashMap::new()),
        }))
    }

    pub(crate) fn now(&self) -> u64 {
        self.clock.now_secs()
    }

    /// A verifier that trusts every tenant's keys, for services that accept this service's
    /// tokens in-process (`ferry up`) instead of fetching `/token_keys`. It follows tenants
    /// added and removed later.
    pub fn verifier(&self) -> Verifier {
        Verifier::new(vec![self.trusted_tenants()], self.http.clone())
    }

    /// The [`TrustedIssuer`] behind [`TokenService::verifier`], to combine with other issuers.
    pub fn trusted_tenants(&self) -> TrustedIssuer {
        TrustedIssuer::Tenants(self.tenant_keys.clone())
    }

    /// Adds a tenant at run time; tokens can be issued in it at once.
    pub fn add_tenant(&self, tenant: Tenant) -> Result<(), ConfigError> {
        config::validate_tenant(&tenant)?;
        let mut tenants = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        if tenants.iter().any(|t| t.tenant.id == tenant.id) {
            return Err(ConfigError::DuplicateTenant(tenant.id));
        }
        if tenants.iter().any(|t| t.tenant.subdomain.eq_ignore_ascii_case(&tenant.subdomain)) {
            return Err(ConfigError::DuplicateSubdomain(tenant.subdomain));
        }
        self.tenant_keys.insert(&tenant.id, tenant.keys.clone());
        let state =
            tenant_state(tenant, &self.public_url, &self.uaadomain, &self.http, self.now(), self.key_lifetime_secs);
        tenants.push(Arc::new(state));
        Ok(())
    }

    /// Removes a tenant added at run time, with every client added at run time in it. Its
    /// tokens stop verifying at once. Returns whether it existed.
    pub fn remove_tenant(&self, id: &str) -> Result<bool, TokenError> {
        if self.static_tenants.contains(id) {
            return Err(TokenError::Static(id.to_owned()));
        }
        let in_use = self.static_clients.iter().any(|c| self.client(c).is_some_and(|c| c.tenant_id == id))
            || self.users.any_in_tenant(id)
            || self.user_stores.iter().any(|s| s.tenant_id() == Some(id));
        if in_use {
            return Err(TokenError::TenantInUse(id.to_owned()));
        }
        let mut tenants = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        let before = tenants.len();
        tenants.retain(|t| t.tenant.id != id);
        let existed = tenants.len() != before;
        drop(tenants);
        self.tenant_keys.remove(id);
        let gone: Vec<String> = {
            let mut clients = self.clients.write().unwrap_or_else(|p| p.into_inner());
            let gone = clients.values().filter(|c| c.tenant_id == id).map(|c| c.client_id.clone()).collect();
            clients.retain(|_, c| c.tenant_id != id);
            gone
        };
        for c in gone {
            self.forget_client(&c);
        }
        Ok(existed)
    }

    /// Lets tenant `tenant_id` accept SAML assertions signed with `certificate`'s key in the
    /// saml2-bearer grant (RFC 7522), e.g. a Destination Service's subaccount certificate
    /// (`/destination-configuration/v1/saml2Metadata/certificate`). The same certificate is
    /// added once only.
    pub fn trust_saml_idp(
        &self,
        tenant_id: &str,
        certificate: crate::saml::TrustedCertificate,
    ) -> Result<(), TokenError> {
        if self.tenant_by_id(tenant_id).is_none() {
            return Err(TokenError::UnknownTenant(tenant_id.to_owned()));
        }
        let mut idps = self.saml_idps.write().unwrap_or_else(|p| p.into_inner());
        let list = idps.entry(tenant_id.to_owned()).or_default();
        if !list.iter().any(|c| c.der() == certificate.der()) {
            list.push(certificate);
        }
        Ok(())
    }

    /// The identity providers tenant `tenant_id` trusts, its own SAML signer (if made) included.
    pub(crate) fn saml_idps(&self, tenant_id: &str) -> Vec<crate::saml::TrustedCertificate> {
        let mut trusted =
            self.saml_idps.read().unwrap_or_else(|p| p.into_inner()).get(tenant_id).cloned().unwrap_or_default();
        let own = self.saml_signers.read().unwrap_or_else(|p| p.into_inner()).get(tenant_id).cloned();
        if let Some(own) = own.and_then(|s| crate::saml::TrustedCertificate::from_der(s.certificate_der()).ok()) {
            trusted.push(own);
        }
        trusted
    }

    /// The key tenant `tenant_id` signs SAML assertions with (token exchange for
    /// [`TOKEN_TYPE_SAML2`]), made on first use. Not persisted: after a restart a new one
    /// signs, so a token service outside that trusts it needs [`Self::saml_certificate_pem`]
    /// again.
    pub(crate) fn saml_signer(&self, tenant_id: &str) -> Result<Arc<crate::saml::SamlSigner>, TokenError> {
        if let Some(s) = self.saml_signers.read().unwrap_or_else(|p| p.into_inner()).get(tenant_id) {
            return Ok(s.clone());
        }
        let tenant = self.tenant_by_id(tenant_id).ok_or_else(|| TokenError::UnknownTenant(tenant_id.to_owned()))?;
        let made = crate::saml::SamlSigner::generate(&format!("{} SAML", tenant.tenant.subdomain))
            .map_err(|e| TokenError::Certificate(e.to_string()))?;
        let mut signers = self.saml_signers.write().unwrap_or_else(|p| p.into_inner());
        Ok(signers.entry(tenant_id.to_owned()).or_insert_with(|| Arc::new(made)).clone())
    }

    /// The certificate (PEM) of tenant `tenant_id`'s SAML signing key: what another token
    /// service must trust to redeem the assertions this one issues by token exchange.
    pub fn saml_certificate_pem(&self, tenant_id: &str) -> Result<String, TokenError> {
        Ok(self.saml_signer(tenant_id)?.certificate_pem())
    }

    /// Records a redeemed assertion; `false` if it was redeemed before and has not expired.
    pub(crate) fn first_use_of_assertion(&self, zone: &str, issuer: &str, id: &str, expires_at: u64) -> bool {
        /// Bounds the memory an authenticated client can make this take.
        const MAX_REMEMBERED: usize = 100_000;
        let now = self.now();
        let mut used = self.saml_used.lock().unwrap_or_else(|p| p.into_inner());
        if used.len() >= MAX_REMEMBERED {
            used.retain(|_, until| *until > now);
        }
        let key = (zone.to_owned(), issuer.to_owned(), id.to_owned());
        if used.get(&key).is_some_and(|until| *until > now) {
            return false;
        }
        if used.len() < MAX_REMEMBERED {
            used.insert(key, expires_at.saturating_add(crate::saml::CLOCK_SKEW_SECS));
        }
        true
    }

    /// The user behind a configured username in a tenant.
    pub(crate) fn configured_user(&self, username: &str, tenant_id: &str) -> Option<&User> {
        self.find_user(username, Some(tenant_id), tenant_id).map(|u| &u.user)
    }

    /// Adds a client at run time (its tenant must exist); it can get tokens at once.
    /// `client_secret` may be an Argon2 PHC string ([`hash_password`]).
    pub fn add_client(&self, client: OAuthClient) -> Result<(), ConfigError> {
        config::validate_client(&client, |t| self.tenant_by_id(t).is_some())?;
        let mut clients = self.clients.write().unwrap_or_else(|p| p.into_inner());
        if clients.contains_key(&client.client_id) {
            return Err(ConfigError::DuplicateClient(client.client_id));
        }
        clients.insert(client.client_id.clone(), Arc::new(client));
        Ok(())
    }

    /// Removes a client added at run time; returns whether it existed.
    pub fn remove_client(&self, id: &str) -> Result<bool, TokenError> {
        if self.static_clients.contains(id) {
            return Err(TokenError::Static(id.to_owned()));
        }
        let existed = self.clients.write().unwrap_or_else(|p| p.into_inner()).remove(id).is_some();
        self.forget_client(id);
        Ok(existed)
    }

    fn forget_client(&self, id: &str) {
        self.verified_secrets.write().unwrap_or_else(|p| p.into_inner()).remove(id);
        self.issued_bindings.write().unwrap_or_else(|p| p.into_inner()).remove(id);
        self.issued_certificates.write().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// The zone (tenant id) client `id` lives in: its provider subaccount, which differs from
    /// the `zid` of the tokens it gets in a subscriber's zone.
    pub fn client_tenant(&self, id: &str) -> Option<String> {
        self.client(id).map(|c| c.tenant_id.clone())
    }

    pub(crate) fn client(&self, id: &str) -> Option<Arc<OAuthClient>> {
        self.clients.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    fn tenants_snapshot(&self) -> Vec<Arc<TenantState>> {
        self.tenants.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether a client's stored secret (plain or an Argon2 hash) is `given`.
    pub(crate) async fn secret_ok(&self, client: &OAuthClient, given: &str) -> bool {
        let stored = client.client_secret.expose();
        if !password::looks_hashed(stored) {
            return http::secret_matches(stored, given);
        }
        let digest: [u8; 32] = {
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, given.as_bytes());
            let mut out = [0u8; 32];
            out.copy_from_slice(d.as_ref());
            out
        };
        let cached = self.verified_secrets.read().unwrap_or_else(|p| p.into_inner()).get(&client.client_id).copied();
        if let Some(c) = cached {
            return ferry_core::secret::constant_time_eq(&c, &digest);
        }
        let ok = self.passwords.verify(Some(&client.client_secret), given).await;
        if ok {
            self.verified_secrets.write().unwrap_or_else(|p| p.into_inner()).insert(client.client_id.clone(), digest);
        }
        ok
    }

    /// Issues a user token as if `username` had logged in through `client_id` with the
    /// password grant, without the password: `ferry up` prints one so that a developer can call
    /// a principal-propagation destination straight away. The token is issued in the user's
    /// own zone; a username configured in several zones resolves to the client's zone first.
    pub fn issue_user_token(&self, username: &str, client_id: &str) -> Result<String, TokenError> {
        let client = self.client(client_id).ok_or_else(|| TokenError::UnknownClient(client_id.to_owned()))?;
        let client = &*client;
        let user = self
            .find_user(username, None, &client.tenant_id)
            .ok_or_else(|| TokenError::UnknownUser(username.to_owned()))?;
        let tenant =
            self.tenant_by_id(&user.user.tenant_id).ok_or_else(|| TokenError::UnknownUser(username.to_owned()))?;
        let identity = UserIdentity::from_user(&user.user, self.now());
        let scopes = user_scopes(client, Some(&user.user));
        let issued = self.issue(&tenant, client, GRANT_PASSWORD, scopes, Some(&identity), false)?;
        Ok(issued.access_token)
    }

    /// Adds a signing key to a tenant; it signs every token from now on. The previous keys stay
    /// in `/token_keys` until the tokens they signed have expired. Returns the new key's `kid`.
    ///
    /// The tenant's [`KeySet`](crate::KeySet) is changed in place, so a caller that persists
    /// keys (`ferry up`) should export it afterwards.
    pub fn rotate_keys(&self, tenant_id: &str) -> Result<String, TokenError> {
        let t = self.tenant_by_id(tenant_id).ok_or_else(|| TokenError::UnknownTenant(tenant_id.to_owned()))?;
        Ok(t.history.rotate(&t.tenant.keys, self.now(), self.key_lifetime_secs)?)
    }

    /// Removes superseded signing keys whose tokens have all expired, in every tenant; returns
    /// how many went. Runs by itself on rotation, on `/token_keys` requests and periodically in
    /// [`run`].
    pub fn retire_expired_keys(&self) -> usize {
        let now = self.now();
        self.tenants_snapshot().iter().map(|t| t.history.retire(&t.tenant.keys, now, self.key_lifetime_secs)).sum()
    }

    /// Issues an X.509 client certificate for `client_id`, signed by `ca`, and lets it
    /// authenticate that client from now on (a [`CertificateBinding::SubjectAndIssuer`] of the
    /// certificate is added to the client). The certificate and key are what an X.509 service
    /// key carries as `certificate` and `key`; requests must reach the HTTPS listener
    /// (`certurl`), whose TLS config must trust `ca` for client certificates
    /// ([`https_server_config`]).
    ///
    /// A client meant to authenticate *only* this way is configured with an empty secret and
    /// `certificates: vec![CertificateBinding::issued_by(&ca, client_id)]`, which also makes
    /// certificates issued for it before a restart keep working.
    pub fn issue_client_certificate(
        &self,
        ca: &LocalCa,
        client_id: &str,
        validity: Duration,
    ) -> Result<CertifiedKey, TokenError> {
        let client = self.client(client_id).ok_or_else(|| TokenError::UnknownClient(client_id.to_owned()))?;
        let cert = mtls::issue(ca, client_id, validity).map_err(|e| TokenError::Certificate(e.to_string()))?;
        let (subject, issuer) = certificate_names(&cert.cert_pem)
            .ok_or_else(|| TokenError::Certificate("the issued certificate does not parse".into()))?;
        let binding = CertificateBinding::SubjectAndIssuer { subject, issuer };
        self.issued_certificates
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(client_id.to_owned())
            .or_default()
            .push(cert.cert_pem.clone());
        if !client.certificates.contains(&binding) {
            let mut issued = self.issued_bindings.write().unwrap_or_else(|p| p.into_inner());
            let list = issued.entry(client_id.to_owned()).or_default();
            if !list.contains(&binding) {
                list.push(binding);
            }
        }
        Ok(cert)
    }

    /// Whether `client` accepts the peer certificate `peer`, by configuration or because
    /// [`TokenService::issue_client_certificate`] issued it.
    fn accepts_certificate(&self, client: &OAuthClient, peer: &mtls::PeerIdentity) -> bool {
        client.certificates.iter().any(|b| b.matches(peer))
            || self
                .issued_bindings
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&client.client_id)
                .is_some_and(|list| list.iter().any(|b| b.matches(peer)))
    }

    fn tenant_by_id(&self, id: &str) -> Option<Arc<TenantState>> {
        self.tenants.read().unwrap_or_else(|p| p.into_inner()).iter().find(|t| t.tenant.id == id).cloned()
    }

    fn tenant_by_subdomain(&self, subdomain: &str) -> Option<Arc<TenantState>> {
        let tenants = self.tenants.read().unwrap_or_else(|p| p.into_inner());
        tenants.iter().find(|t| t.tenant.subdomain.eq_ignore_ascii_case(subdomain)).cloned()
    }

    fn first_tenant(&self) -> Option<Arc<TenantState>> {
        self.tenants.read().unwrap_or_else(|p| p.into_inner()).first().cloned()
    }

    /// Finds a configured (local) user by name; see [`LocalUserStore::find`].
    fn find_user(&self, username: &str, tenant: Option<&str>, preferred: &str) -> Option<&StoredUser> {
        self.users.find(username, tenant, preferred)
    }

    /// The configured user behind a user identity of a token, if it is one of ours.
    fn user_by_id(&self, tenant_id: &str, user_id: &str) -> Option<&User> {
        self.users.by_id(tenant_id, user_id)
    }

    /// How long logons from `peer` are refused after too many failures (the token endpoint's
    /// per-address limit, shared by every logon that checks a password: `None` if not locked).
    pub fn logon_retry_after(&self, peer: std::net::IpAddr) -> Option<std::time::Duration> {
        self.failed_logons.retry_after(peer)
    }

    /// Counts a failed logon from `peer` against the same limit as the token endpoint's.
    pub fn logon_failed(&self, peer: std::net::IpAddr) {
        self.failed_logons.failed(peer);
    }

    /// Checks a user's password in the zone `tenant_id` (the stores the password grant asks, in
    /// the same order), for logons outside OAuth such as a Cloud Connector's onboarding with the
    /// subaccount user. `Ok(None)`: wrong password or unknown user, indistinguishable by design.
    pub async fn check_user_password(
        &self,
        tenant_id: &str,
        username: &str,
        password: &str,
    ) -> Result<Option<User>, StoreUnavailable> {
        if username.is_empty() || password.is_empty() {
            self.users.burn(password).await;
            return Ok(None);
        }
        self.login_user(Login { username, password, tenant: Some(tenant_id), preferred_tenant: tenant_id }).await
    }

    /// Logs a user in with a password: the local users first, then each further store in
    /// order; the first store that knows the username decides. `Ok(None)`: wrong password or
    /// unknown user (one Argon2 verification either way, so timing does not tell them apart
    /// locally). `Err`: a store that had to be asked cannot answer now.
    async fn login_user(&self, login: Login<'_>) -> Result<Option<User>, StoreUnavailable> {
        match self.users.check(login).await {
            Verdict::Verified(user) => return Ok(Some(*user)),
            Verdict::WrongPassword => return Ok(None),
            Verdict::UnknownUser => {}
        }
        for store in &self.user_stores {
            match store.verify(login).await {
                Ok(Verdict::Verified(user)) => return Ok(Some(*user)),
                Ok(Verdict::WrongPassword) => return Ok(None),
                Ok(Verdict::UnknownUser) => {}
                Err(e) => {
                    tracing::warn!(store = %store.name(), error = %e, "user store unavailable");
                    return Err(e);
                }
            }
        }
        self.users.burn(login.password).await;
        Ok(None)
    }

    fn access_validity(&self, client: &OAuthClient) -> u64 {
        client.access_token_validity.map_or(self.token_validity_secs, |d| d.as_secs())
    }

    /// Signs an access token (and, with `with_refresh`, stores a refresh token for the user).
    fn issue(
        &self,
        tenant: &TenantState,
        client: &OAuthClient,
        grant_type: &str,
        scopes: Vec<String>,
        user: Option<&UserIdentity>,
        with_refresh: bool,
    ) -> Result<Issued, KeyError> {
        let now = self.now();
        let validity = self.access_validity(client);
        let jti = uuid::Uuid::new_v4().simple().to_string();
        let facts = TokenFacts {
            jti: &jti,
            zid: &tenant.tenant.id,
            subdomain: &tenant.tenant.subdomain,
            issuer: &tenant.issuer,
            grant_type,
            scopes: &scopes,
            user,
            iat: now,
            exp: now + validity,
        };
        let claims = claims::build(client, &facts);
        let access_token = tenant.tenant.keys.sign(&claims, &[("jku", &tenant.jwks_uri)])?;
        let refresh_token = match (with_refresh, user) {
            (true, Some(u)) => {
                let refresh_validity =
                    client.refresh_token_validity.map_or(self.refresh_validity_secs, |d| d.as_secs());
                let grant = RefreshGrant {
                    client_id: client.client_id.clone(),
                    tenant_id: tenant.tenant.id.clone(),
                    user: u.clone(),
                    scopes: scopes.clone(),
                    expires_at: now + refresh_validity,
                };
                Some(self.refresh.insert(grant, now).ok_or(KeyError::Sign)?)
            }
            _ => None,
        };
        Ok(Issued {
            access_token,
            jti,
            expires_in: validity,
            scopes,
            refresh_token,
            token_type: "bearer",
            issued_token_type: None,
        })
    }
}

fn tenant_state(
    tenant: Tenant,
    public_url: &str,
    uaadomain: &UaaDomain,
    http: &reqwest::Client,
    now: u64,
    key_lifetime_secs: u64,
) -> TenantState {
    let (issuer, jwks_uri) = endpoints(&tenant, public_url, uaadomain);
    let verifier = Verifier::new(vec![TrustedIssuer::tenant(tenant.id.clone(), tenant.keys.clone())], http.clone());
    let history = KeyHistory::default();
    // Keys older than the signing one (loaded from disk) are dated now.
    history.retire(&tenant.keys, now, key_lifetime_secs);
    TenantState { tenant, verifier, issuer, jwks_uri, history }
}

/// `(iss, jwks_uri)` of a tenant. With a dotted DNS `uaadomain` both live under
/// `https://{subdomain}.{uaadomain}` like XSUAA's. Otherwise (an IP address, `localhost`) no
/// subdomain can be put in front, so the issuer is the provider URL — the SDK then reads the
/// subdomain from `ext_attr.zdn` — and the key URL names the zone in its query.
fn endpoints(tenant: &Tenant, public_url: &str, uaa: &UaaDomain) -> (String, String) {
    if uaa.dotted_dns {
        let base = format!("https://{}.{}", tenant.subdomain.to_ascii_lowercase(), uaa.full);
        (format!("{base}/oauth/token"), format!("{base}/token_keys"))
    } else {
        let zid: String = form_urlencoded::byte_serialize(tenant.id.as_bytes()).collect();
        (format!("{public_url}/oauth/token"), format!("https://{}/token_keys?zid={zid}", uaa.full))
    }
}
