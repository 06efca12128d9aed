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

mod claims;
mod config;
mod http;
mod refresh;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_core::Shutdown;
use ferry_core::serve::{AcceptOptions, serve_router};

pub use config::{
    ConfigError, DEFAULT_TOKEN_VALIDITY, GRANT_CLIENT_CREDENTIALS, GRANT_JWT_BEARER, GRANT_PASSWORD,
    GRANT_REFRESH_TOKEN, OAuthClient, SUPPORTED_GRANT_TYPES, Tenant, TokenServiceConfig, User,
};

use crate::jwt::{KeyError, TrustedIssuer, Verifier};
use claims::{TokenFacts, UserIdentity};
use config::UaaDomain;
use refresh::{REFRESH_VALIDITY_SECS, RefreshGrant, RefreshStore};

/// Why [`TokenService::issue_user_token`] could not issue a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("unknown client {0:?}")]
    UnknownClient(String),
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("signing failed: {0}")]
    Sign(#[from] KeyError),
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
}

/// The token service's state: configuration, signing keys and the refresh tokens it issued.
pub struct TokenService {
    tenants: Vec<TenantState>,
    clients: HashMap<String, OAuthClient>,
    users: Vec<User>,
    public_url: String,
    uaadomain: UaaDomain,
    token_validity_secs: u64,
    refresh: RefreshStore,
    http: reqwest::Client,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("tenants", &self.tenants.iter().map(|t| &t.tenant).collect::<Vec<_>>())
            .field("clients", &self.clients.values().collect::<Vec<_>>())
            .field("users", &self.users)
            .field("public_url", &self.public_url)
            .field("uaadomain", &self.uaadomain.full)
            .field("refresh", &self.refresh)
            .finish()
    }
}

/// The sockets [`run`] serves. Either may be absent: tests often need only one, and a
/// deployment behind a TLS-terminating ingress needs no HTTPS listener of its own.
#[derive(Debug, Default)]
pub struct Listeners {
    pub http: Option<tokio::net::TcpListener>,
    pub https: Option<(tokio::net::TcpListener, Arc<rustls::ServerConfig>)>,
}

/// Serves the token service on every given listener until `shutdown` fires, then lets open
/// connections finish their requests.
pub async fn run(service: Arc<TokenService>, listeners: Listeners, shutdown: Shutdown) {
    let router = service.router();
    let http = listeners
        .http
        .map(|l| serve_router(l, router.clone(), None, AcceptOptions::named("token-service"), shutdown.clone()));
    let https = listeners.https.map(|(l, tls)| {
        serve_router(l, router.clone(), Some(tls), AcceptOptions::named("token-service-https"), shutdown.clone())
    });
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
        }
    );
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A freshly signed access token and what the token response reports about it.
pub(crate) struct Issued {
    pub access_token: String,
    pub jti: String,
    pub expires_in: u64,
    pub scopes: Vec<String>,
    pub refresh_token: Option<String>,
}

impl TokenService {
    /// Validates `config` and builds the service.
    pub fn new(config: TokenServiceConfig) -> Result<Arc<Self>, ConfigError> {
        config::validate(&config)?;
        let public_url = config::parse_public_url(&config.public_url)?;
        let uaadomain = config::parse_uaadomain(&config.uaadomain)?;
        // Only local issuers are ever verified here, so this client never connects anywhere;
        // `Verifier` merely requires one. Built once, as building one loads TLS state.
        ferry_core::init_crypto();
        let http = reqwest::Client::builder().build().map_err(|e| ConfigError::Http(e.to_string()))?;
        let tenants = config
            .tenants
            .into_iter()
            .map(|tenant| {
                let (issuer, jwks_uri) = endpoints(&tenant, &public_url, &uaadomain);
                let verifier = Verifier::new(vec![TrustedIssuer::Local(tenant.keys.clone())], http.clone());
                TenantState { tenant, verifier, issuer, jwks_uri }
            })
            .collect();
        Ok(Arc::new(Self {
            tenants,
            clients: config.clients.into_iter().map(|c| (c.client_id.clone(), c)).collect(),
            users: config.users,
            public_url,
            uaadomain,
            token_validity_secs: config.token_validity.as_secs(),
            refresh: RefreshStore::default(),
            http,
        }))
    }

    /// A verifier that trusts every tenant's keys, for services that accept this service's
    /// tokens in-process (`ferry up`) instead of fetching `/token_keys`.
    pub fn verifier(&self) -> Verifier {
        let issuers = self.tenants.iter().map(|t| TrustedIssuer::Local(t.tenant.keys.clone())).collect();
        Verifier::new(issuers, self.http.clone())
    }

    /// Issues a user token as if `username` had logged in through `client_id` with the
    /// password grant, without the password: `ferry up` prints one so that a developer can call
    /// a principal-propagation destination straight away. The token is issued in the user's
    /// own zone; a username configured in several zones resolves to the client's zone first.
    pub fn issue_user_token(&self, username: &str, client_id: &str) -> Result<String, TokenError> {
        let client = self.clients.get(client_id).ok_or_else(|| TokenError::UnknownClient(client_id.to_owned()))?;
        let user = self
            .find_user(username, None, &client.tenant_id)
            .ok_or_else(|| TokenError::UnknownUser(username.to_owned()))?;
        let tenant = self.tenant_by_id(&user.tenant_id).ok_or_else(|| TokenError::UnknownUser(username.to_owned()))?;
        let identity = UserIdentity::from_user(user, now_secs());
        let issued = self.issue(tenant, client, GRANT_PASSWORD, client.scopes.clone(), Some(&identity), false)?;
        Ok(issued.access_token)
    }

    fn tenant_by_id(&self, id: &str) -> Option<&TenantState> {
        self.tenants.iter().find(|t| t.tenant.id == id)
    }

    fn tenant_by_subdomain(&self, subdomain: &str) -> Option<&TenantState> {
        self.tenants.iter().find(|t| t.tenant.subdomain.eq_ignore_ascii_case(subdomain))
    }

    /// Finds a user by name: in `tenant` if one was addressed; otherwise in `preferred` (the
    /// client's zone) first and then in any zone, in configuration order.
    fn find_user(&self, username: &str, tenant: Option<&str>, preferred: &str) -> Option<&User> {
        let named = || self.users.iter().filter(move |u| u.username == username);
        match tenant {
            Some(t) => named().find(|u| u.tenant_id == t),
            None => named().find(|u| u.tenant_id == preferred).or_else(|| named().next()),
        }
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
        let now = now_secs();
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
            exp: now + self.token_validity_secs,
        };
        let claims = claims::build(client, &facts);
        let access_token = tenant.tenant.keys.sign(&claims, &[("jku", &tenant.jwks_uri)])?;
        let refresh_token = match (with_refresh, user) {
            (true, Some(u)) => {
                let grant = RefreshGrant {
                    client_id: client.client_id.clone(),
                    tenant_id: tenant.tenant.id.clone(),
                    user: u.clone(),
                    scopes: scopes.clone(),
                    expires_at: now + REFRESH_VALIDITY_SECS,
                };
                Some(self.refresh.insert(grant, now).ok_or(KeyError::Sign)?)
            }
            _ => None,
        };
        Ok(Issued { access_token, jti, expires_in: self.token_validity_secs, scopes, refresh_token })
    }
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
