//! Server-side OAuth token retrieval for find-by-name, with a cache.
//!
//! Clients such as the SAP Cloud SDK ask the Destination Service for a ready-to-use token
//! instead of talking to the destination's token service themselves; every app instance does
//! so on each cache miss of its own, so the service caches tokens per destination and tenant
//! until shortly before they expire, and lets concurrent misses share one remote call.
//!
//! A request is built from the destination in full before the cache is consulted, and the
//! cache key includes a hash of that request: any property change that would change the
//! request (a rotated secret, another scope, another tenant) misses the cache by construction.
//! A request with an input good for one token request only (an authorization code, the
//! caller's `X-client-assertion`) bypasses the cache: its token could never be asked for again
//! legitimately, and a cached one would answer a replayed code that the token service refuses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_core::Secret;
use ferry_model::Destination;
use reqwest::header::{ACCEPT, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use url::Url;

/// Tokens are renewed this long before they expire, so a client never receives a token that
/// dies in flight.
pub(crate) const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Token responses larger than this are refused; real ones are a few KiB.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Above this many cache slots, expired and idle ones are dropped on the next insert; if that is
/// not enough (many users with fresh tokens), idle fresh ones go too, down to half of it.
const CACHE_PRUNE_THRESHOLD: usize = 4096;
/// Upper bound for `tokenServiceURL.SocketReadTimeoutInSeconds` (SPEC §2.3).
const MAX_READ_TIMEOUT_SECS: u64 = 600;

/// Where "now" comes from, so tests can move time forward instead of sleeping.
pub(crate) trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// The grants the service performs itself; they share everything but the form fields.
///
/// User-bound inputs (`assertion`, refresh token, code) are borrowed from the request: they are
/// secrets and live no longer than it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Grant<'a> {
    ClientCredentials,
    Password,
    /// `OAuth2TechnicalUserPropagation`: client credentials, token service always over the Internet.
    TechnicalUser,
    /// `OAuth2UserTokenExchange` and `OAuth2JWTBearer`: RFC 7523 with the user's JWT.
    JwtBearer {
        auth: &'static str,
        assertion: &'a str,
    },
    RefreshToken(&'a str),
    AuthorizationCode {
        code: &'a str,
        redirect_uri: Option<&'a str>,
        code_verifier: Option<&'a str>,
    },
    /// `OAuth2TokenExchange` (RFC 8693): subject token and type, optional actor token and type.
    TokenExchange {
        subject: (&'a str, &'a str),
        actor: Option<(&'a str, &'a str)>,
    },
    /// `OAuth2SAMLBearerAssertion` (RFC 7522) with a base64url assertion. `for_user`: this
    /// service generated it for the flow's user, so the cache keys on that user rather than
    /// on the assertion (which is new on every call).
    SamlBearer {
        assertion: &'a str,
        for_user: bool,
    },
}

/// RFC 7522 grant type.
pub(crate) const GRANT_SAML2_BEARER: &str = "urn:ietf:params:oauth:grant-type:saml2-bearer";
/// RFC 7523 grant type, as XSUAA and Ferry's token service understand it.
pub(crate) const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 8693 grant type.
pub(crate) const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

impl Grant<'_> {
    fn auth_name(self) -> &'static str {
        match self {
            Grant::ClientCredentials => "OAuth2ClientCredentials",
            Grant::Password => "OAuth2Password",
            Grant::TechnicalUser => "OAuth2TechnicalUserPropagation",
            Grant::JwtBearer { auth, .. } => auth,
            Grant::RefreshToken(_) => "OAuth2RefreshToken",
            Grant::AuthorizationCode { .. } => "OAuth2AuthorizationCode",
            Grant::TokenExchange { .. } => "OAuth2TokenExchange",
            Grant::SamlBearer { .. } => "OAuth2SAMLBearerAssertion",
        }
    }

    /// SPEC §2.2: OAuth2TokenExchange takes `tokenServiceURL` as it is, never per tenant.
    pub(crate) fn uses_tenant(self) -> bool {
        !matches!(self, Grant::TokenExchange { .. })
    }
}

/// Why no token could be provided. The text goes into `authTokens[].error`, so it says what
/// happened and what to change, and never contains a secret or a URL query string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("{auth} destinations need the property '{key}'")]
    MissingProperty { auth: &'static str, key: &'static str },
    #[error("tokenServiceURL is not a valid absolute http(s) URL: {0}")]
    InvalidUrl(String),
    #[error("{0}")]
    Tenant(String),
    #[error(
        "the token service of an OnPremise destination is reached through the Cloud Connector, which this \
         Destination Service does not support yet; set 'tokenServiceURL.ProxyType' to 'Internet' if the token \
         service is reachable directly"
    )]
    OnPremise,
    #[error("property '{0}' is not a valid HTTP header name and value")]
    InvalidHeader(String),
    #[error("token service at {url} did not answer within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("cannot reach token service at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error(
        "the certificate of the token service at {url} is not trusted ({problem}); upload its CA certificate \
         and name it in the destination's TrustStoreLocation, or set TrustAll to true (not for production)"
    )]
    UntrustedCertificate { url: String, problem: String },
    #[error("token service at {url} answered HTTP {status}{detail}")]
    Status { url: String, status: u16, detail: String },
    #[error("token service at {url} sent an unusable response: {reason}")]
    BadResponse { url: String, reason: String },
}

/// A token as handed to the client.
pub(crate) struct Token {
    pub access_token: Secret<String>,
    /// Seconds left; `None` when the token service did not say (then it is not cached either).
    pub expires_in: Option<u64>,
    pub scope: Option<String>,
    pub refresh_token: Option<Secret<String>>,
    /// RFC 8693 `issued_token_type`, for token exchange.
    pub issued_token_type: Option<String>,
}

/// A fully resolved token request. Not `Debug`: the form and credentials hold secrets.
pub(crate) struct TokenRequest {
    url: Url,
    form: Vec<(String, String)>,
    headers: Vec<(HeaderName, HeaderValue)>,
    basic: Option<(String, String)>,
    timeout: Duration,
    /// Form fields left out of the fingerprint (see `build`).
    per_user: Vec<&'static str>,
    /// `tokenService.KeyStoreLocation`: the certificate-store entry whose certificate and key
    /// authenticate the client by mTLS (SPEC §2.4); the caller loads it.
    pub(crate) keystore: Option<String>,
    /// `tokenService.KeyStorePassword`, for P12 and JKS keystores.
    pub(crate) keystore_password: Option<Secret<String>>,
    /// `TrustStoreLocation`: certificates trusted for the token service besides the usual
    /// roots (SPEC §2.3: its server trust follows the destination's); the caller loads them.
    pub(crate) truststore: Option<String>,
    pub(crate) truststore_password: Option<Secret<String>>,
    /// `TrustAll=true`: the token service's certificate is not checked.
    trust_all: bool,
    /// The request carries an input that is good for one token request only (an authorization
    /// code, the caller's client assertion): its token is never cached, so a replayed input
    /// reaches the token service, which refuses it, instead of finding the first token.
    pub(crate) single_use: bool,
}

impl TokenRequest {
    /// Builds the request SPEC §2.3 describes from the destination's properties. `tenant` is
    /// the subdomain for `tokenServiceURLType: Common` (from `X-tenant` or the caller's token).
    pub(crate) fn build(
        dest: &Destination,
        grant: Grant<'_>,
        tenant: Option<&str>,
        default_timeout: Duration,
    ) -> Result<Self, TokenError> {
        let auth = grant.auth_name();
        let prop = |key: &'static str| dest.get(key).filter(|v| !v.is_empty());
        let required = |key: &'static str| prop(key).ok_or(TokenError::MissingProperty { auth, key });

        // SPEC §2.3: the technical-user flow always reaches its token service over the Internet.
        if grant != Grant::TechnicalUser
            && dest.get("ProxyType") == Some("OnPremise")
            && dest.get("tokenServiceURL.ProxyType") != Some("Internet")
        {
            return Err(TokenError::OnPremise);
        }
        let raw_url = required("tokenServiceURL")?;
        let resolved = if is_common(dest) && grant.uses_tenant() {
            let tenant = tenant.ok_or_else(|| {
                TokenError::Tenant(
                    "tokenServiceURLType is Common but the tenant is unknown: send the X-tenant header with the \
                     tenant subdomain"
                        .into(),
                )
            })?;
            apply_tenant(raw_url, tenant)?
        } else {
            raw_url.to_owned()
        };
        let mut url = Url::parse(&resolved).map_err(|e| TokenError::InvalidUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(TokenError::InvalidUrl(format!("scheme '{}' is not http or https", url.scheme())));
        }
        let queries: Vec<(&str, &str)> = with_prefix(dest, "tokenServiceURL.queries.").collect();
        if !queries.is_empty() {
            url.query_pairs_mut().extend_pairs(queries);
        }

        let mut headers = Vec::new();
        for (name, value) in with_prefix(dest, "tokenServiceURL.headers.") {
            let header = HeaderName::from_bytes(name.as_bytes()).ok().zip(HeaderValue::from_str(value).ok());
            headers.push(header.ok_or_else(|| TokenError::InvalidHeader(format!("tokenServiceURL.headers.{name}")))?);
        }

        let mut form: Vec<(String, String)> = Vec::new();
        // Fields that identify the user rather than the request: the cache keys on the user's
        // identity instead, so one user's next JWT still finds that user's token.
        let mut per_user = Vec::new();
        let mut push = |k: &str, v: &str| form.push((k.to_owned(), v.to_owned()));
        match grant {
            Grant::ClientCredentials | Grant::TechnicalUser => push("grant_type", "client_credentials"),
            Grant::Password => {
                push("grant_type", "password");
                push("username", required("User")?);
                push("password", dest.get("Password").unwrap_or_default());
            }
            Grant::JwtBearer { assertion, .. } => {
                push("grant_type", GRANT_JWT_BEARER);
                push("assertion", assertion);
                per_user.push("assertion");
            }
            Grant::RefreshToken(token) => {
                push("grant_type", "refresh_token");
                push("refresh_token", token);
            }
            Grant::TokenExchange { subject, actor } => {
                push("grant_type", GRANT_TOKEN_EXCHANGE);
                push("subject_token", subject.0);
                push("subject_token_type", subject.1);
                if let Some((token, kind)) = actor {
                    push("actor_token", token);
                    push("actor_token_type", kind);
                }
            }
            Grant::SamlBearer { assertion, for_user } => {
                push("grant_type", GRANT_SAML2_BEARER);
                push("assertion", assertion);
                if for_user {
                    per_user.push("assertion");
                }
                // RFC 7522 §2.1: the client is named even when it does not authenticate.
                push("client_id", required("clientKey")?);
                if let Some(company) = prop("companyId") {
                    push("company_id", company);
                }
            }
            Grant::AuthorizationCode { code, redirect_uri, code_verifier } => {
                push("grant_type", "authorization_code");
                push("code", code);
                if let Some(uri) = redirect_uri {
                    push("redirect_uri", uri);
                }
                if let Some(verifier) = code_verifier {
                    push("code_verifier", verifier);
                }
            }
        }
        // Client authentication: a token service user wins, then the body/Basic switch.
        let basic = if let Some(user) = prop("tokenServiceUser") {
            Some((user.to_owned(), dest.get("tokenServicePassword").unwrap_or_default().to_owned()))
        } else if matches!(grant, Grant::SamlBearer { .. }) {
            // The assertion is the credential; `clientKey` is already in the form.
            None
        } else {
            let client_id = required("clientId")?.to_owned();
            let secret = dest.get("clientSecret").unwrap_or_default().to_owned();
            if dest.get("tokenService.addClientCredentialsInBody").is_some_and(|v| v.eq_ignore_ascii_case("false")) {
                Some((client_id, secret))
            } else {
                form.push(("client_id".into(), client_id));
                if !secret.is_empty() {
                    form.push(("client_secret".into(), secret));
                }
                None
            }
        };
        if let Some(scope) = prop("scope") {
            form.push(("scope".into(), scope.to_owned()));
        }
        form.extend(with_prefix(dest, "tokenService.body.").map(|(k, v)| (k.to_owned(), v.to_owned())));

        let timeout = dest
            .get("tokenServiceURL.SocketReadTimeoutInSeconds")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|s| (1..=MAX_READ_TIMEOUT_SECS).contains(s))
            .map_or(default_timeout, Duration::from_secs);

        let keystore = prop("tokenService.KeyStoreLocation").map(str::to_owned);
        let keystore_password = prop("tokenService.KeyStorePassword").map(Secret::from);
        let truststore = prop("TrustStoreLocation").map(str::to_owned);
        let truststore_password = prop("TrustStorePassword").map(Secret::from);
        let trust_all = dest.get("TrustAll").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        Ok(Self {
            url,
            form,
            headers,
            basic,
            timeout,
            per_user,
            keystore,
            keystore_password,
            truststore,
            truststore_password,
            trust_all,
            single_use: matches!(grant, Grant::AuthorizationCode { .. }),
        })
    }

    /// Marks the request as one whose token must not be cached (see `single_use`).
    pub(crate) fn single_use(mut self) -> Self {
        self.single_use = true;
        self
    }

    /// SPEC §2.5: the caller's client assertion authenticates the client instead of a secret.
    pub(crate) fn with_client_assertion(mut self, assertion: &str, assertion_type: &str) -> Self {
        self.form.retain(|(k, _)| k != "client_secret");
        if let Some((client_id, _)) = self.basic.take()
            && !self.form.iter().any(|(k, _)| k == "client_id")
        {
            self.form.push(("client_id".into(), client_id));
        }
        self.form.push(("client_assertion".into(), assertion.to_owned()));
        self.form.push(("client_assertion_type".into(), assertion_type.to_owned()));
        self
    }

    /// A digest of everything that goes on the wire, used in the cache key.
    fn fingerprint(&self) -> [u8; 32] {
        let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut field = |b: &[u8]| {
            h.update(&(b.len() as u64).to_be_bytes());
            h.update(b);
        };
        field(self.url.as_str().as_bytes());
        for (k, v) in self.form.iter().filter(|(k, _)| !self.per_user.contains(&k.as_str())) {
            field(k.as_bytes());
            field(v.as_bytes());
        }
        for (k, v) in &self.headers {
            field(k.as_str().as_bytes());
            field(v.as_bytes());
        }
        if let Some((u, p)) = &self.basic {
            field(b"basic");
            field(u.as_bytes());
            field(p.as_bytes());
        }
        if let Some(k) = &self.keystore {
            field(b"keystore");
            field(k.as_bytes());
        }
        if let Some(t) = &self.truststore {
            field(b"truststore");
            field(t.as_bytes());
        }
        if self.trust_all {
            field(b"trust-all");
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(h.finish().as_ref());
        out
    }

    /// The URL as it may appear in messages: no query (it can carry secrets), no user info.
    fn display_url(&self) -> String {
        let u = &self.url;
        let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
        format!("{}://{}{}{}", u.scheme(), u.host_str().unwrap_or_default(), port, u.path())
    }
}

/// Whether the destination's token URL is tenant-specific (`tokenServiceURLType: Common`).
pub(crate) fn is_common(dest: &Destination) -> bool {
    dest.get("tokenServiceURLType").is_some_and(|t| t.eq_ignore_ascii_case("Common"))
}

/// Subdomains only: the tenant ends up in a host name, so anything else could redirect the
/// token request (and the client secret) to another host.
pub(crate) fn is_valid_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// SPEC §2.2: replace `{tenant}`, or prepend the tenant as the leftmost subdomain.
pub(crate) fn apply_tenant(url: &str, tenant: &str) -> Result<String, TokenError> {
    if !is_valid_subdomain(tenant) {
        return Err(TokenError::Tenant(format!("'{tenant}' is not a valid tenant subdomain")));
    }
    if url.contains("{tenant}") {
        return Ok(url.replace("{tenant}", tenant));
    }
    let mut parsed = Url::parse(url).map_err(|e| TokenError::InvalidUrl(e.to_string()))?;
    let host = match parsed.host() {
        Some(url::Host::Domain(d)) => d.to_owned(),
        Some(_) => {
            return Err(TokenError::Tenant(
                "tokenServiceURLType is Common but tokenServiceURL has an IP address as host, so no tenant \
                 subdomain can be added; use a host name or a {tenant} placeholder"
                    .into(),
            ));
        }
        None => return Err(TokenError::InvalidUrl("no host".into())),
    };
    parsed
        .set_host(Some(&format!("{tenant}.{host}")))
        .map_err(|e| TokenError::InvalidUrl(format!("cannot add the tenant subdomain: {e}")))?;
    Ok(parsed.into())
}

fn with_prefix<'a>(dest: &'a Destination, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
    dest.iter().filter_map(move |(k, v)| k.strip_prefix(prefix).filter(|k| !k.is_empty()).map(|k| (k, v)))
}

/// Who the token is for; together with the request fingerprint it keys the cache.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct CacheOwner {
    pub subaccount: String,
    pub instance: Option<String>,
    pub name: String,
    pub tenant: Option<String>,
    /// `<zid>/<user id>` for user flows: their tokens are never shared between users.
    pub user: Option<String>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    owner: CacheOwner,
    request: [u8; 32],
}

struct Cached {
    access_token: Secret<String>,
    expires_at: Instant,
    scope: Option<String>,
    refresh_token: Option<Secret<String>>,
    issued_token_type: Option<String>,
}

impl Cached {
    fn fresh(&self, now: Instant) -> bool {
        self.expires_at > now + REFRESH_MARGIN
    }

    fn token(&self, now: Instant) -> Token {
        Token {
            access_token: self.access_token.clone(),
            expires_in: Some(self.expires_at.saturating_duration_since(now).as_secs()),
            scope: self.scope.clone(),
            refresh_token: self.refresh_token.clone(),
            issued_token_type: self.issued_token_type.clone(),
        }
    }
}

/// What a token request presents and trusts besides the service's defaults, read from the
/// certificate store by the caller: `tokenService.KeyStoreLocation` and `TrustStoreLocation`.
#[derive(Clone, Copy, Default)]
pub(crate) struct TlsSetup<'a> {
    pub identity: Option<&'a ferry_core::tls::CertifiedKey>,
    pub trust_pem: Option<&'a str>,
}

/// One slot per key; its async lock makes concurrent misses wait for the first fetch.
type Slot = Arc<SlotInner>;

/// One cache entry. Callers that miss queue on `state` so that one of them fetches.
#[derive(Default)]
struct SlotInner {
    state: tokio::sync::Mutex<SlotState>,
    /// Fetches finished so far (numbered from 1), read without the lock: a caller notes it
    /// before queueing to tell a failure it waited for from one that was over before it came.
    finished: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct SlotState {
    cached: Option<Cached>,
    /// The last fetch's failure and its number.
    failure: Option<(u64, TokenError)>,
}

/// Keeps the cache bounded: first drops slots that are idle and hold no fresh token; if that
/// leaves it at the threshold or above, drops idle ones with fresh tokens too (they are fetched
/// again when asked for) until half the threshold is left. A slot a caller holds or fetches
/// into is never dropped.
fn prune<K: Eq + std::hash::Hash>(slots: &mut HashMap<K, Slot>, now: Instant) {
    let idle = |slot: &Slot| Arc::strong_count(slot) == 1 && slot.state.try_lock().is_ok();
    slots.retain(|_, slot| {
        !idle(slot) || slot.state.try_lock().map(|s| s.cached.as_ref().is_some_and(|c| c.fresh(now))).unwrap_or(true)
    });
    let mut excess = slots.len().saturating_sub(CACHE_PRUNE_THRESHOLD / 2);
    if slots.len() >= CACHE_PRUNE_THRESHOLD {
        slots.retain(|_, slot| {
            if excess > 0 && idle(slot) {
                excess -= 1;
                false
            } else {
                true
            }
        });
    }
}

pub(crate) struct TokenFetcher {
    http: reqwest::Client,
    /// Trust for token services besides the system's roots, for the clients built here.
    extra_ca_pem: Option<String>,
    /// One client per TLS set-up other than the default (by a digest of the identity's PEM,
    /// the trust store and `TrustAll`); few destinations have one.
    custom: Mutex<HashMap<[u8; 32], reqwest::Client>>,
    pub(crate) default_timeout: Duration,
    clock: Arc<dyn Clock>,
    slots: Mutex<HashMap<CacheKey, Slot>>,
}

impl TokenFetcher {
    /// The OAuth token endpoint an OIDC issuer's discovery document names (`issuer` must be
    /// one the verifier already trusts: its URL is not checked here).
    pub(crate) async fn discover_token_endpoint(&self, issuer: &str) -> Result<String, String> {
        let url = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
        let fail = |e: String| format!("the discovery document of issuer {issuer} cannot be read: {e}");
        let doc: serde_json::Value = self
            .http
            .get(&url)
            .timeout(self.default_timeout)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| fail(e.without_url().to_string()))?
            .json()
            .await
            .map_err(|e| fail(e.without_url().to_string()))?;
        if doc.get("issuer").and_then(serde_json::Value::as_str) != Some(issuer) {
            return Err(fail("its 'issuer' is not the token's issuer".into()));
        }
        doc.get("token_endpoint")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| fail("it names no token_endpoint".into()))
    }

    pub(crate) fn new(
        http: reqwest::Client,
        extra_ca_pem: Option<String>,
        default_timeout: Duration,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            http,
            extra_ca_pem,
            custom: Mutex::new(HashMap::new()),
            default_timeout,
            clock,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The HTTP client for `tls`, built once per set-up. `Err` says which part is unusable.
    fn custom_client(&self, tls: TlsSetup<'_>, trust_all: bool) -> Result<reqwest::Client, String> {
        let mut digest = Sha256::new();
        if let Some(identity) = tls.identity {
            digest.update(b"identity");
            digest.update((identity.cert_pem.len() as u64).to_be_bytes());
            digest.update(identity.cert_pem.as_bytes());
            digest.update(identity.key_pem.expose());
        }
        if let Some(trust) = tls.trust_pem {
            digest.update(b"trust");
            digest.update((trust.len() as u64).to_be_bytes());
            digest.update(trust.as_bytes());
        }
        digest.update([u8::from(trust_all)]);
        let digest: [u8; 32] = digest.finalize().into();
        let mut clients = self.custom.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&digest) {
            return Ok(c.clone());
        }
        let builder = if trust_all {
            ferry_core::tls::trust_all_builder()
        } else {
            // SPEC §1.4: the trust store adds to the default roots, as the JDK's does.
            let mut roots = ferry_core::tls::outbound_roots(self.extra_ca_pem.as_deref()).map_err(|e| e.to_string())?;
            if let Some(pem) = tls.trust_pem {
                for cert in ferry_core::tls::parse_certs(pem).map_err(|e| format!("trust store: {e}"))? {
                    roots.add(cert).map_err(|e| format!("trust store: {e}"))?;
                }
            }
            rustls::ClientConfig::builder().with_root_certificates(roots)
        };
        let tls = match tls.identity {
            Some(identity) => {
                let client_cert = |e: ferry_core::tls::TlsError| format!("client certificate: {e}");
                let certs = ferry_core::tls::parse_certs(&identity.cert_pem).map_err(client_cert)?;
                let key = ferry_core::tls::parse_key(identity.key_pem.expose()).map_err(client_cert)?;
                builder.with_client_auth_cert(certs, key).map_err(|e| format!("client certificate: {e}"))?
            }
            None => builder.with_no_client_auth(),
        };
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| e.to_string())?;
        if clients.len() >= CACHE_PRUNE_THRESHOLD {
            clients.clear();
        }
        clients.insert(digest, client.clone());
        Ok(client)
    }

    pub(crate) fn now(&self) -> Instant {
        self.clock.now()
    }

    /// A cached token if one is still fresh, otherwise one fetched now. Failures are not
    /// cached: the next call tries again.
    pub(crate) async fn token(
        &self,
        owner: CacheOwner,
        request: TokenRequest,
        tls: TlsSetup<'_>,
    ) -> Result<Token, TokenError> {
        if request.single_use {
            return self.fetch(&request, tls).await;
        }
        let key = CacheKey { owner, request: request.fingerprint() };
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            if slots.len() >= CACHE_PRUNE_THRESHOLD && !slots.contains_key(&key) {
                prune(&mut slots, self.clock.now());
            }
            slots.entry(key).or_default().clone()
        };
        let arrived = slot.finished.load(std::sync::atomic::Ordering::Acquire);
        let mut state = slot.state.lock().await;
        let now = self.clock.now();
        if let Some(c) = state.cached.as_ref().filter(|c| c.fresh(now)) {
            return Ok(c.token(now));
        }
        // A fetch that ended while this caller queued failed: its answer is this caller's too.
        // Fetching again would make every queued caller wait a full timeout of its own behind
        // the previous one (N callers of a silent token service: N × the timeout for the last).
        // Failures older than the caller are not reused: the next call tries again.
        if let Some((n, e)) = &state.failure
            && *n > arrived
        {
            return Err(e.clone());
        }
        state.cached = None;
        let result = self.fetch(&request, tls).await;
        let n = slot.finished.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        let fetched = match result {
            Ok(t) => {
                state.failure = None;
                t
            }
            Err(e) => {
                state.failure = Some((n, e.clone()));
                return Err(e);
            }
        };
        if let Some(secs) = fetched.expires_in {
            state.cached = Some(Cached {
                access_token: fetched.access_token.clone(),
                expires_at: self.clock.now() + Duration::from_secs(secs),
                scope: fetched.scope.clone(),
                refresh_token: fetched.refresh_token.clone(),
                issued_token_type: fetched.issued_token_type.clone(),
            });
        }
        Ok(fetched)
    }

    /// The cached token for `request` if it is still fresh; never calls the token service, and
    /// gives up (`None`) rather than wait for a fetch under way.
    pub(crate) fn cached(&self, owner: CacheOwner, request: &TokenRequest) -> Option<Token> {
        if request.single_use {
            return None;
        }
        let key = CacheKey { owner, request: request.fingerprint() };
        let slot = self.slots.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned()?;
        let state = slot.state.try_lock().ok()?;
        let now = self.clock.now();
        state.cached.as_ref().filter(|c| c.fresh(now)).map(|c| c.token(now))
    }

    async fn fetch(&self, req: &TokenRequest, tls: TlsSetup<'_>) -> Result<Token, TokenError> {
        let url = req.display_url();
        let client = if tls.identity.is_none() && tls.trust_pem.is_none() && !req.trust_all {
            self.http.clone()
        } else {
            self.custom_client(tls, req.trust_all).map_err(|reason| TokenError::Connect { url: url.clone(), reason })?
        };
        let mut builder =
            client.post(req.url.clone()).header(ACCEPT, "application/json").form(&req.form).timeout(req.timeout);
        for (k, v) in &req.headers {
            builder = builder.header(k, v);
        }
        if let Some((user, password)) = &req.basic {
            builder = builder.basic_auth(user, Some(password));
        }
        let timeout = |url: String| TokenError::Timeout { url, after: req.timeout };
        let mut response = match tokio::time::timeout(req.timeout, builder.send()).await {
            Err(_) => return Err(timeout(url)),
            Ok(Err(e)) if e.is_timeout() => return Err(timeout(url)),
            Ok(Err(e)) => match untrusted_certificate(&e) {
                Some(problem) => return Err(TokenError::UntrustedCertificate { url, problem }),
                None => return Err(TokenError::Connect { url, reason: root_cause(&e) }),
            },
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        return Err(TokenError::BadResponse {
                            url,
                            reason: format!("body is larger than {} KiB", MAX_RESPONSE_BYTES / 1024),
                        });
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err(timeout(url)),
                Err(e) => return Err(TokenError::BadResponse { url, reason: root_cause(&e) }),
            }
        }
        let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        if !status.is_success() {
            return Err(TokenError::Status { url, status: status.as_u16(), detail: error_detail(json.as_ref()) });
        }
        let json =
            json.ok_or_else(|| TokenError::BadResponse { url: url.clone(), reason: "body is not JSON".into() })?;
        let str_field = |k: &str| json.get(k).and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_owned);
        let access_token = str_field("access_token").ok_or_else(|| TokenError::BadResponse {
            url: url.clone(),
            reason: "no access_token in the response".into(),
        })?;
        let expires_in = match json.get("expires_in") {
            Some(serde_json::Value::Number(n)) => n.as_u64().or_else(|| n.as_f64().map(|f| f.max(0.0) as u64)),
            Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        Ok(Token {
            access_token: Secret::new(access_token),
            expires_in,
            scope: str_field("scope"),
            refresh_token: str_field("refresh_token").map(Secret::new),
            issued_token_type: str_field("issued_token_type"),
        })
    }
}

/// The rustls certificate problem behind a failed request, if that is why it failed.
fn untrusted_certificate(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(mut err) = cur {
        // Connectors wrap rustls errors in `io::Error`s (even nested ones), whose `source`
        // skips the error they wrap.
        while let Some(inner) = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            err = inner;
        }
        if let Some(rustls::Error::InvalidCertificate(problem)) = err.downcast_ref::<rustls::Error>() {
            return Some(format!("{problem:?}"));
        }
        cur = err.source();
    }
    None
}

/// The innermost error text ("Connection refused (os error 111)"), which is what tells an
/// operator what went wrong; reqwest's outer layers only repeat the URL.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// `": invalid_client (Bad credentials)"` from an OAuth error body, bounded in length.
fn error_detail(json: Option<&serde_json::Value>) -> String {
    let Some(json) = json else { return String::new() };
    let field = |k: &str| json.get(k).and_then(|v| v.as_str()).filter(|s| !s.is_empty());
    let text = match (field("error"), field("error_description")) {
        (Some(e), Some(d)) => format!("{e} ({d})"),
        (Some(e), None) => e.to_owned(),
        (None, Some(d)) => d.to_owned(),
        (None, None) => return String::new(),
    };
    format!(": {}", text.chars().take(200).collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_cache_stays_bounded_with_fresh_tokens() {
        let now = Instant::now();
        let fresh = || {
            let slot = Slot::default();
            slot.state.try_lock().unwrap().cached = Some(Cached {
                access_token: Secret::new("t".into()),
                expires_at: now + Duration::from_secs(3600),
                scope: None,
                refresh_token: None,
                issued_token_type: None,
            });
            slot
        };
        let mut slots: HashMap<usize, Slot> = (0..CACHE_PRUNE_THRESHOLD + 10).map(|i| (i, fresh())).collect();
        slots.insert(usize::MAX, Slot::default()); // idle, nothing cached
        let held = (slots[&7].clone(), slots[&8].clone()); // callers hold these
        prune(&mut slots, now);
        assert!(slots.len() <= CACHE_PRUNE_THRESHOLD / 2 + 2, "{} slots left", slots.len());
        assert!(slots.contains_key(&7) && slots.contains_key(&8), "a slot in use was dropped");
        assert!(!slots.contains_key(&usize::MAX), "an empty idle slot was kept");
        drop(held);
        // Below the threshold, fresh idle tokens stay.
        let mut few: HashMap<usize, Slot> = (0..10).map(|i| (i, fresh())).collect();
        prune(&mut few, now);
        assert_eq!(few.len(), 10);
    }

    fn dest(props: &[(&str, &str)]) -> Destination {
        let mut all = vec![("Name", "d"), ("Type", "HTTP")];
        all.extend_from_slice(props);
        Destination::from_properties(all.iter().copied()).unwrap()
    }

    #[test]
    fn tenant_substitution() {
        let cases = [
            (
                "https://authentication.us10.hana.ondemand.com/oauth/token",
                "https://mytenant.authentication.us10.hana.ondemand.com/oauth/token",
            ),
            (
                "https://{tenant}.authentication.us10.hana.ondemand.com/oauth/token",
                "https://mytenant.authentication.us10.hana.ondemand.com/oauth/token",
            ),
            (
                "https://authentication.myauthserver.com/tenant/{tenant}/oauth/token",
                "https://authentication.myauthserver.com/tenant/mytenant/oauth/token",
            ),
            ("https://oauth.{tenant}.myauthserver.com/token", "https://oauth.mytenant.myauthserver.com/token"),
        ];
        for (input, want) in cases {
            assert_eq!(apply_tenant(input, "mytenant").unwrap(), want);
        }
        assert!(matches!(apply_tenant("http://127.0.0.1:1/t", "x"), Err(TokenError::Tenant(_))));
        assert!(matches!(apply_tenant("https://a.b/t", "evil.com/"), Err(TokenError::Tenant(_))));
        assert!(matches!(apply_tenant("https://a.b/t", ""), Err(TokenError::Tenant(_))));
    }

    #[test]
    fn build_reports_missing_and_invalid_properties() {
        let d = dest(&[("Authentication", "OAuth2ClientCredentials"), ("clientId", "c")]);
        let e = TokenRequest::build(&d, Grant::ClientCredentials, None, Duration::from_secs(10)).err();
        assert_eq!(e, Some(TokenError::MissingProperty { auth: "OAuth2ClientCredentials", key: "tokenServiceURL" }));
        let d = dest(&[("tokenServiceURL", "https://a.example/t")]);
        let e = TokenRequest::build(&d, Grant::ClientCredentials, None, Duration::from_secs(10)).err();
        assert_eq!(e, Some(TokenError::MissingProperty { auth: "OAuth2ClientCredentials", key: "clientId" }));
        let d = dest(&[("tokenServiceURL", "https://a.example/t"), ("clientId", "c")]);
        let e = TokenRequest::build(&d, Grant::Password, None, Duration::from_secs(10)).err();
        assert_eq!(e, Some(TokenError::MissingProperty { auth: "OAuth2Password", key: "User" }));
        let d = dest(&[("tokenServiceURL", "ftp://a.example/t"), ("clientId", "c")]);
        assert!(matches!(
            TokenRequest::build(&d, Grant::ClientCredentials, None, Duration::from_secs(10)),
            Err(TokenError::InvalidUrl(_))
        ));
        let d = dest(&[("tokenServiceURL", "https://a.example/t"), ("clientId", "c"), ("ProxyType", "OnPremise")]);
        assert!(matches!(
            TokenRequest::build(&d, Grant::ClientCredentials, None, Duration::from_secs(10)),
            Err(TokenError::OnPremise)
        ));
        let d = dest(&[
            ("tokenServiceURL", "https://a.example/t"),
            ("clientId", "c"),
            ("tokenServiceURL.headers.bad header", "v"),
        ]);
        assert_eq!(
            TokenRequest::build(&d, Grant::ClientCredentials, None, Duration::from_secs(10)).err(),
            Some(TokenError::InvalidHeader("tokenServiceURL.headers.bad header".into()))
        );
        let d =
            dest(&[("tokenServiceURL", "https://a.example/t"), ("clientId", "c"), ("tokenServiceURLType", "Common")]);
        assert!(matches!(
            TokenRequest::build(&d, Grant::ClientCredentials, None, Duration::from_secs(10)),
            Err(TokenError::Tenant(_))
        ));
    }

    #[test]
    fn fingerprint_follows_the_request_and_display_url_hides_the_query() {
        let base = [("tokenServiceURL", "https://a.example/t?k=v"), ("clientId", "c"), ("clientSecret", "s1")];
        let build = |d: &Destination| TokenRequest::build(d, Grant::ClientCredentials, None, Duration::from_secs(10));
        let a = build(&dest(&base)).ok().unwrap();
        let mut rotated = base;
        rotated[2] = ("clientSecret", "s2");
        let b = build(&dest(&rotated)).ok().unwrap();
        let described = build(&dest(&[base[0], base[1], base[2], ("Description", "x")])).ok().unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), described.fingerprint());
        assert_eq!(a.display_url(), "https://a.example/t");
    }

    #[test]
    fn read_timeout_property_is_bounded() {
        let build = |v: &str| {
            let d = dest(&[
                ("tokenServiceURL", "https://a.example/t"),
                ("clientId", "c"),
                ("tokenServiceURL.SocketReadTimeoutInSeconds", v),
            ]);
            TokenRequest::build(&d, Grant::ClientCredentials, None, Duration::from_secs(10)).ok().unwrap().timeout
        };
        assert_eq!(build("3"), Duration::from_secs(3));
        assert_eq!(build("0"), Duration::from_secs(10));
        assert_eq!(build("601"), Duration::from_secs(10));
        assert_eq!(build("x"), Duration::from_secs(10));
    }
}
