//! [`Client`]: service tokens and destination lookups the way the SAP Cloud SDK makes them
//! (CLIENT-CONTRACT §2–§3): client-credentials tokens cached until shortly before they expire,
//! find-by-name with `$skipTokenRetrieval=true` first and a second call only for authentication
//! types whose tokens the Destination Service must fetch, and a destination cache whose lifetime
//! is that of the first auth token (5 minutes without one).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ferry_core::Secret;
use serde_json::{Map, Value};
use tokio::sync::Mutex;

use crate::bindings::{Bindings, BoundDestination, ConnectivityBinding, DestinationBinding, OAuthCredentials};
use crate::breaker::{BreakerOptions, Breakers, Outcome};
use crate::error::{ClientError, Hop};

/// Tokens are renewed when less than this is left, so a request never carries one that expires
/// on the way.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// The SDK's destination cache lifetime when the destination carries no token.
const DEFAULT_DESTINATION_TTL: Duration = Duration::from_secs(300);
/// The SDK's timeout for token and Destination Service calls.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(10);
/// The exact text with which the Destination Service says "no such destination" (§3.2).
const NOT_FOUND_MESSAGE: &str = "Configuration with the specified name was not found";

/// Authentication types whose tokens the Destination Service fetches on a find-by-name without
/// `$skipTokenRetrieval` (§3.2 step 2).
const NEEDS_TOKEN_RETRIEVAL: &[&str] = &[
    "OAuth2ClientCredentials",
    "OAuth2Password",
    "ClientCertificateAuthentication",
    "OAuth2UserTokenExchange",
    "OAuth2JWTBearer",
    "SAMLAssertion",
    "OAuth2SAMLBearerAssertion",
    "OAuth2RefreshToken",
    "OAuth2TechnicalUserPropagation",
    "OAuth2TokenExchange",
    "OAuth2AuthorizationCode",
];

/// Authentication types that act for the user of `user_jwt` (sent as `X-user-token`).
const USER_FLOWS: &[&str] =
    &["OAuth2UserTokenExchange", "OAuth2JWTBearer", "SAMLAssertion", "OAuth2SAMLBearerAssertion"];

/// Where to look a destination up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Subaccount,
    Instance,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Subaccount => "subaccount",
            Level::Instance => "instance",
        }
    }
}

/// The subscriber tenant a service token is for, as the Transparent Proxy's `X-Tenant-Id` and
/// `X-Tenant-Subdomain` name it (SPEC §5.2).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Tenant {
    /// A zone id: the token comes from `https://{uaadomain}/oauth/token` with `x-zid`.
    Id(String),
    /// A subdomain: the token comes from `https://{subdomain}.{uaadomain}/oauth/token`, as XSUAA
    /// addresses subscribers. When `uaadomain` is an IP address (a Ferry on one machine), no name
    /// can be put in front of it, so the request goes to `uaadomain` with `Host:
    /// {subdomain}.{uaadomain}`, which Ferry's token service reads the same way.
    Subdomain(String),
}

impl std::fmt::Display for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tenant::Id(t) => write!(f, "tenant id '{t}'"),
            Tenant::Subdomain(t) => write!(f, "tenant subdomain '{t}'"),
        }
    }
}

/// Options of [`Client::get_destination`].
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Only this level; `None` lets the service choose (instance wins over subaccount).
    pub level: Option<Level>,
    /// The user's JWT: `X-user-token` for user flows, the principal for PrincipalPropagation, and
    /// (with a `zid`) the tenant whose destinations are read.
    pub user_jwt: Option<Secret<String>>,
    /// A tenant (zone) id: tokens come from `https://{uaadomain}/oauth/token` with `x-zid`.
    pub tenant: Option<String>,
    /// Merge these fragments (`X-fragment-name`, comma-separated).
    pub fragment: Option<String>,
    /// Only the configuration: no second call for tokens the Destination Service would fetch.
    pub skip_token_retrieval: bool,
    /// For `OAuth2RefreshToken` destinations: sent as `X-refresh-token`.
    pub refresh_token: Option<Secret<String>>,
    /// Further inputs of the token flows, sent as headers of the find call that fetches tokens:
    /// `X-subject-token` and `X-subject-token-type` (OAuth2TokenExchange), `X-code`,
    /// `X-redirect-uri`, `X-code-verifier` (OAuth2AuthorizationCode), `X-client-assertion`,
    /// `X-client-assertion-type` (client assertions). Like `refresh_token`, they make the
    /// result uncacheable: the token belongs to this input.
    pub token_headers: Vec<(String, Secret<String>)>,
    /// Bypass the destination cache.
    pub no_cache: bool,
}

/// One entry of a destination's `authTokens`.
#[derive(Clone)]
pub struct AuthToken {
    /// `type` (`Bearer`, `Basic`, …).
    pub kind: String,
    pub value: Secret<String>,
    /// The header to send (`http_header.key`, `http_header.value`).
    pub http_header: Option<(String, Secret<String>)>,
    pub expires_in: Option<u64>,
    /// Why the service could not fetch this token.
    pub error: Option<String>,
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthToken")
            .field("kind", &self.kind)
            .field("header", &self.http_header.as_ref().map(|(k, _)| k))
            .field("expires_in", &self.expires_in)
            .field("error", &self.error)
            .finish()
    }
}

/// One entry of a destination's `certificates` (keystores and trust stores).
#[derive(Clone)]
pub struct Certificate {
    pub name: String,
    /// `Type`: `CERTIFICATE`, `PEM`, `P12`, …
    pub kind: String,
    /// `Content`, base64 as the service sends it.
    pub content: Secret<String>,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate").field("name", &self.name).field("kind", &self.kind).finish()
    }
}

/// A destination as the Destination Service (or the `destinations` variable) describes it.
#[derive(Clone)]
pub struct Destination {
    /// `destinationConfiguration`: `Name`, `Type`, `URL`, `Authentication`, `ProxyType`, … (it may
    /// hold passwords, so it is not in `Debug`).
    pub configuration: Map<String, Value>,
    pub auth_tokens: Vec<AuthToken>,
    pub certificates: Vec<Certificate>,
    /// The user JWT it was looked up for (PrincipalPropagation sends it to the proxy).
    pub(crate) user_jwt: Option<Secret<String>>,
    /// The tenant whose tokens fetched it (the connectivity token uses the same).
    pub(crate) tenant: Option<String>,
}

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Destination")
            .field("name", &self.name())
            .field("type", &self.property("Type"))
            .field("url", &self.property("URL"))
            .field("authentication", &self.authentication())
            .field("proxy_type", &self.proxy_type())
            .field("auth_tokens", &self.auth_tokens)
            .field("certificates", &self.certificates)
            .finish()
    }
}

impl Destination {
    /// A destination from a configuration object, without tokens (env destinations, tests).
    ///
    /// ```
    /// let config = serde_json::json!({"Name": "erp", "URL": "http://erp.virtual:8000", "ProxyType": "OnPremise",
    ///                                 "Authentication": "NoAuthentication", "sap-client": 100});
    /// let d = ferry_client::Destination::from_configuration(config.as_object().unwrap().clone());
    /// assert!(d.is_on_premise());
    /// assert_eq!(d.property("sap-client").as_deref(), Some("100"));
    /// ```
    pub fn from_configuration(configuration: Map<String, Value>) -> Self {
        Self { configuration, auth_tokens: Vec::new(), certificates: Vec::new(), user_jwt: None, tenant: None }
    }

    /// A property as text (numbers and booleans included).
    pub fn property(&self, key: &str) -> Option<String> {
        match self.configuration.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    pub fn name(&self) -> String {
        self.property("Name").unwrap_or_default()
    }

    /// `Authentication`; missing means Basic when `User` and `Password` are set, else
    /// NoAuthentication (as the SDK reads it).
    pub fn authentication(&self) -> String {
        self.property("Authentication").unwrap_or_else(|| {
            if self.property("User").is_some() && self.property("Password").is_some() {
                "BasicAuthentication".to_owned()
            } else {
                "NoAuthentication".to_owned()
            }
        })
    }

    /// `ProxyType`, `Internet` when missing.
    pub fn proxy_type(&self) -> String {
        self.property("ProxyType").unwrap_or_else(|| "Internet".to_owned())
    }

    pub fn is_on_premise(&self) -> bool {
        self.proxy_type().eq_ignore_ascii_case("OnPremise")
    }

    fn parse(name: &str, body: &Value, with_tokens: bool) -> Result<Self, ClientError> {
        let unusable = |message: &str| ClientError::Destination { name: name.to_owned(), message: message.to_owned() };
        let configuration = body
            .get("destinationConfiguration")
            .and_then(Value::as_object)
            .cloned()
            .ok_or_else(|| unusable("the Destination Service's answer has no destinationConfiguration"))?;
        let mut d = Self::from_configuration(configuration);
        if with_tokens {
            d.auth_tokens =
                body.get("authTokens").and_then(Value::as_array).into_iter().flatten().map(auth_token).collect();
            d.certificates = body
                .get("certificates")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|c| Certificate {
                    name: str_of(c, "Name"),
                    kind: str_of(c, "Type"),
                    content: Secret::new(str_of(c, "Content")),
                })
                .collect();
        }
        Ok(d)
    }

    /// The certificate `KeyStoreLocation` or `TrustStoreLocation` names.
    pub fn certificate(&self, location_key: &str) -> Option<&Certificate> {
        let name = self.property(location_key)?;
        self.certificates.iter().find(|c| c.name == name)
    }
}

fn str_of(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn auth_token(t: &Value) -> AuthToken {
    let header = t
        .get("http_header")
        .and_then(|h| Some((h.get("key")?.as_str()?.to_owned(), Secret::new(h.get("value")?.as_str()?.to_owned()))));
    AuthToken {
        kind: str_of(t, "type"),
        value: Secret::new(str_of(t, "value")),
        http_header: header,
        // A string or a number, read like `parseInt`.
        expires_in: str_of(t, "expires_in").trim().parse().ok(),
        error: t.get("error").and_then(Value::as_str).filter(|e| !e.is_empty()).map(str::to_owned),
    }
}

/// The claims of a JWT, decoded without verification (the SDK does the same: the app verified it).
pub(crate) fn jwt_claims(jwt: &str) -> Option<Value> {
    let payload = jwt.split('.').nth(1)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?).ok()
}

fn zone_of(claims: &Value) -> Option<String> {
    ["zid", "app_tid", "zone_uuid"].iter().find_map(|k| claims.get(*k).and_then(Value::as_str)).map(str::to_owned)
}

struct CachedToken {
    token: Secret<String>,
    valid_until: Instant,
}

struct Inner {
    bindings: Bindings,
    http: reqwest::Client,
    ca_pem: Option<String>,
    tokens: Mutex<HashMap<String, CachedToken>>,
    destinations: Mutex<HashMap<String, (Destination, Instant)>>,
    breakers: Breakers,
}

/// The entry point: bindings, tokens and destination lookups. Cheap to clone (shared caches).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("bindings", &self.inner.bindings).finish_non_exhaustive()
    }
}

impl Client {
    /// A client over `bindings`; `ca_pem` is a CA to trust besides the system's roots (the
    /// `ca.pem` of `ferry up` for its HTTPS token endpoint).
    ///
    /// ```
    /// let vcap = r#"{"destination": [{"label": "destination", "credentials": {
    ///   "uri": "http://127.0.0.1:1", "url": "http://127.0.0.1:2", "clientid": "c", "clientsecret": "s"}}]}"#;
    /// let client = ferry_client::Client::new(ferry_client::Bindings::from_vcap_services(vcap)?, None)?;
    /// # let _ = client;
    /// # Ok::<(), ferry_client::ClientError>(())
    /// ```
    pub fn new(bindings: Bindings, ca_pem: Option<&str>) -> Result<Self, ClientError> {
        let http = build_http(ca_pem, None, None)?;
        Ok(Self {
            inner: Arc::new(Inner {
                bindings,
                http,
                ca_pem: ca_pem.map(str::to_owned),
                tokens: Mutex::new(HashMap::new()),
                destinations: Mutex::new(HashMap::new()),
                breakers: Breakers::default(),
            }),
        })
    }

    /// [`Client::new`] over [`Bindings::from_env`]; `FERRY_CA_FILE` names an extra CA to trust.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), ferry_client::ClientError> {
    /// let client = ferry_client::Client::from_env()?;
    /// let erp = client.get_destination("erp", &Default::default()).await?;
    /// println!("{erp:?}");
    /// # Ok(()) }
    /// ```
    pub fn from_env() -> Result<Self, ClientError> {
        let ca = match std::env::var_os("FERRY_CA_FILE") {
            Some(p) => Some(std::fs::read_to_string(&p).map_err(|e| {
                ClientError::Tls(format!("cannot read FERRY_CA_FILE {}: {e}", std::path::Path::new(&p).display()))
            })?),
            None => None,
        };
        Self::new(Bindings::from_env()?, ca.as_deref())
    }

    /// Replaces the circuit breakers' settings (the SDK's by default) and closes them all.
    ///
    /// ```
    /// # let vcap = r#"{"destination": [{"label": "destination", "credentials": {
    /// #   "uri": "http://127.0.0.1:1", "url": "http://127.0.0.1:2", "clientid": "c", "clientsecret": "s"}}]}"#;
    /// let client = ferry_client::Client::new(ferry_client::Bindings::from_vcap_services(vcap)?, None)?;
    /// client.set_circuit_breaker(ferry_client::BreakerOptions { enabled: false, ..Default::default() });
    /// # Ok::<(), ferry_client::ClientError>(())
    /// ```
    pub fn set_circuit_breaker(&self, options: BreakerOptions) {
        self.inner.breakers.set_options(options);
    }

    pub fn bindings(&self) -> &Bindings {
        &self.inner.bindings
    }

    pub(crate) fn ca_pem(&self) -> Option<&str> {
        self.inner.ca_pem.as_deref()
    }

    /// A client-credentials token of the destination binding (provider, or `tenant`'s zone).
    ///
    /// ```no_run
    /// # async fn run(client: ferry_client::Client) -> Result<(), ferry_client::ClientError> {
    /// let token = client.destination_service_token(None).await?;
    /// # let _ = token; Ok(()) }
    /// ```
    pub async fn destination_service_token(&self, tenant: Option<&str>) -> Result<Secret<String>, ClientError> {
        self.destination_service_token_for(tenant.map(|t| Tenant::Id(t.to_owned())).as_ref()).await
    }

    /// [`Client::destination_service_token`] for a tenant named by id or by subdomain.
    pub async fn destination_service_token_for(&self, tenant: Option<&Tenant>) -> Result<Secret<String>, ClientError> {
        let b = self.inner.bindings.destination()?;
        self.service_token(&b.credentials, tenant).await
    }

    /// A client-credentials token of the connectivity binding: the Connectivity Proxy's credential.
    ///
    /// ```no_run
    /// # async fn run(client: ferry_client::Client) -> Result<(), ferry_client::ClientError> {
    /// let token = client.connectivity_token(None).await?;
    /// let header = format!("Bearer {}", token.expose()); // Proxy-Authorization at port 20003
    /// # let _ = header; Ok(()) }
    /// ```
    pub async fn connectivity_token(&self, tenant: Option<&str>) -> Result<Secret<String>, ClientError> {
        self.connectivity_token_for(tenant.map(|t| Tenant::Id(t.to_owned())).as_ref()).await
    }

    /// [`Client::connectivity_token`] for a tenant named by id or by subdomain.
    pub async fn connectivity_token_for(&self, tenant: Option<&Tenant>) -> Result<Secret<String>, ClientError> {
        let b = self.inner.bindings.connectivity()?;
        self.service_token(&b.credentials, tenant).await
    }

    pub(crate) fn connectivity(&self) -> Result<ConnectivityBinding, ClientError> {
        Ok(self.inner.bindings.connectivity()?)
    }

    /// Client credentials at `{url}/oauth/token` (provider) or, for a tenant, at `uaadomain` as
    /// [`Tenant`] says; client auth in the body (§2.1). Cached per tenant and client id until a
    /// minute before `expires_in` runs out.
    async fn service_token(
        &self,
        creds: &OAuthCredentials,
        tenant: Option<&Tenant>,
    ) -> Result<Secret<String>, ClientError> {
        let key = match tenant {
            None => format!("provider-tenant:{}", creds.client_id),
            Some(Tenant::Id(t)) => format!("{t}:{}", creds.client_id),
            Some(Tenant::Subdomain(t)) => format!("subdomain {t}:{}", creds.client_id),
        };
        let mut cache = self.inner.tokens.lock().await;
        if let Some(t) = cache.get(&key)
            && Instant::now() + TOKEN_MARGIN < t.valid_until
        {
            return Ok(t.token.clone());
        }
        let x509 = creds.client_secret.is_none();
        // The tenant's host (`Host` header) when it cannot be in the URL (an IP `uaadomain`).
        let mut host_header = None;
        let url = match (tenant, &creds.uaadomain) {
            (Some(t), Some(domain)) => {
                let domain =
                    if x509 { domain.replacen("authentication.", "authentication.cert.", 1) } else { domain.clone() };
                match t {
                    Tenant::Id(_) => format!("https://{domain}/oauth/token"),
                    Tenant::Subdomain(sub) if !valid_subdomain(sub) => {
                        return Err(ClientError::Hop {
                            hop: Hop::TokenService,
                            url: creds.url.clone(),
                            status: None,
                            message: format!("{t} is not a DNS label (letters, digits and '-')"),
                        });
                    }
                    Tenant::Subdomain(sub) if ip_domain(&domain) => {
                        host_header = Some(format!("{}.{domain}", sub.to_ascii_lowercase()));
                        format!("https://{domain}/oauth/token")
                    }
                    Tenant::Subdomain(sub) => format!("https://{}.{domain}/oauth/token", sub.to_ascii_lowercase()),
                }
            }
            (Some(t), None) => {
                return Err(ClientError::Hop {
                    hop: Hop::TokenService,
                    url: creds.url.clone(),
                    status: None,
                    message: format!("a token for {t} needs `uaadomain` in the binding"),
                });
            }
            (None, _) => format!("{}/oauth/token", creds.cert_url.as_deref().filter(|_| x509).unwrap_or(&creds.url)),
        };
        let mut form = vec![("grant_type", "client_credentials"), ("client_id", creds.client_id.as_str())];
        if let Some(s) = &creds.client_secret {
            form.push(("client_secret", s.expose().as_str()));
        }
        let http = match &creds.certificate {
            Some((cert, key)) if x509 => build_http(self.ca_pem(), Some((cert, key.expose())), None)?,
            _ => self.inner.http.clone(),
        };
        let mut req = http.post(&url).form(&form).header("accept", "application/json").timeout(SERVICE_TIMEOUT);
        match tenant {
            Some(Tenant::Id(t)) => req = req.header("x-zid", t),
            Some(Tenant::Subdomain(_)) => {
                if let Some(h) = &host_header {
                    req = req.header(reqwest::header::HOST, h);
                }
            }
            None => {}
        }
        let breaker_key = format!("token {url} {}", tenant.map(ToString::to_string).unwrap_or_default());
        let permit = self.inner.breakers.admit(&breaker_key, Hop::TokenService, &url)?;
        let result = async {
            let resp = req.send().await.map_err(|e| ClientError::transport(Hop::TokenService, &url, &e))?;
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            if body.get("access_token").and_then(Value::as_str).is_some() && status.is_success() {
                return Ok(body);
            }
            let why = body.get("error_description").or_else(|| body.get("error")).and_then(Value::as_str);
            Err(ClientError::Hop {
                hop: Hop::TokenService,
                url: url.clone(),
                status: Some(status.as_u16()),
                message: format!(
                    "refused client {:?} ({status}: {}); check `clientid` and the secret of the binding",
                    creds.client_id,
                    why.unwrap_or("no reason given")
                ),
            })
        }
        .await;
        permit.record(Outcome::of(&result));
        let body = result?;
        let token = body.get("access_token").and_then(Value::as_str).unwrap_or_default();
        // A token service that does not know the subdomain may answer for the client's own zone;
        // that token would read another tenant's destinations, so it is refused.
        if let Some(Tenant::Subdomain(sub)) = tenant {
            let zdn =
                jwt_claims(token).and_then(|c| c.pointer("/ext_attr/zdn").and_then(Value::as_str).map(str::to_owned));
            if zdn.as_deref().is_some_and(|z| !z.eq_ignore_ascii_case(sub)) {
                return Err(ClientError::Hop {
                    hop: Hop::TokenService,
                    url,
                    status: Some(401),
                    message: format!(
                        "asked for a token of tenant subdomain '{sub}', got one of subdomain '{}': the subdomain is not \
                         subscribed or not known to the token service",
                        zdn.unwrap_or_default()
                    ),
                });
            }
        }
        let lifetime = body.get("expires_in").and_then(Value::as_u64).unwrap_or(0);
        let token = Secret::new(token.to_owned());
        cache.insert(
            key,
            CachedToken { token: token.clone(), valid_until: Instant::now() + Duration::from_secs(lifetime) },
        );
        Ok(token)
    }

    /// Looks a destination up: the `destinations` variable first, then the cache, then the
    /// Destination Service (find-by-name, with a second call for tokens when the authentication
    /// type needs the service to fetch them).
    ///
    /// ```no_run
    /// use ferry_client::{Client, Level, Options};
    /// # async fn run(client: Client, user_jwt: String) -> Result<(), ferry_client::ClientError> {
    /// let options = Options { level: Some(Level::Subaccount), user_jwt: Some(user_jwt.into()), ..Default::default() };
    /// let d = client.get_destination("erp", &options).await?;
    /// assert_eq!(d.name(), "erp");
    /// # Ok(()) }
    /// ```
    ///
    /// A destination of the `destinations` variable (here from a `default-env.json`) is found
    /// without any service call:
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let file = std::env::temp_dir().join(format!("doc-env-destinations-{}.json", std::process::id()));
    /// std::fs::write(&file, r#"{"destinations": [{"name": "web", "url": "https://web.example"}]}"#)?;
    /// let client = ferry_client::Client::new(ferry_client::Bindings::from_default_env_file(&file)?, None)?;
    /// let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    /// let web = runtime.block_on(client.get_destination("web", &Default::default()))?;
    /// assert_eq!(web.property("URL").as_deref(), Some("https://web.example"));
    /// # std::fs::remove_file(&file)?;
    /// # Ok(()) }
    /// ```
    pub async fn get_destination(&self, name: &str, options: &Options) -> Result<Destination, ClientError> {
        if let Some(config) = self.inner.bindings.env_destination(name) {
            let mut d = Destination::from_configuration(config);
            d.user_jwt = options.user_jwt.clone();
            return Ok(d);
        }
        if let Some(d) = self.bound_destination(name, options).await {
            return Ok(d);
        }
        let claims = options.user_jwt.as_ref().and_then(|j| jwt_claims(j.expose()));
        let tenant = options.tenant.clone().or_else(|| claims.as_ref().and_then(zone_of));
        let user = claims
            .as_ref()
            .and_then(|c| ["user_id", "user_uuid"].iter().find_map(|k| c.get(*k).and_then(Value::as_str)))
            .map(str::to_owned);
        let key = format!(
            "{}|{}|{}|{}|{}|{}",
            options.level.map(Level::as_str).unwrap_or("any"),
            options.fragment.as_deref().unwrap_or(""),
            tenant.as_deref().unwrap_or(""),
            user.as_deref().unwrap_or(""),
            options.skip_token_retrieval,
            name
        );
        let cacheable = !options.no_cache && options.refresh_token.is_none() && options.token_headers.is_empty();
        if cacheable
            && let Some((d, until)) = self.inner.destinations.lock().await.get(&key)
            && Instant::now() < *until
        {
            let mut d = d.clone();
            d.user_jwt = options.user_jwt.clone();
            return Ok(d);
        }
        let binding = self.inner.bindings.destination()?;
        // A tenant named explicitly must work; one taken from the user JWT falls back to the
        // provider, as the SDK's subscriber-first selection does.
        let (token, tenant) = match &tenant {
            Some(t) => match self.service_token(&binding.credentials, Some(&Tenant::Id(t.clone()))).await {
                Ok(tok) => (tok, tenant.clone()),
                Err(e) if options.tenant.is_some() => return Err(e),
                Err(_) => (self.service_token(&binding.credentials, None).await?, None),
            },
            None => (self.service_token(&binding.credentials, None).await?, None),
        };
        let first = self.find(&binding, name, options, &token, true, None).await?;
        let mut d = Destination::parse(name, &first, false)?;
        if d.property("Name").as_deref() != Some(name) {
            return Err(ClientError::Destination {
                name: name.to_owned(),
                message: format!("the Destination Service answered for {:?}", d.property("Name").unwrap_or_default()),
            });
        }
        let auth = d.authentication();
        if !options.skip_token_retrieval && NEEDS_TOKEN_RETRIEVAL.contains(&auth.as_str()) {
            let user_token = options.user_jwt.as_ref().filter(|_| USER_FLOWS.contains(&auth.as_str()));
            let full = self.find(&binding, name, options, &token, false, user_token).await?;
            d = Destination::parse(name, &full, true)?;
        } else if let Some(tokens) = first.get("authTokens").and_then(Value::as_array) {
            // Basic and the like: the service's own header (what the approuter uses).
            d.auth_tokens = tokens.iter().map(auth_token).collect();
        }
        if auth == "PrincipalPropagation" && options.user_jwt.is_none() {
            return Err(ClientError::Destination {
                name: name.to_owned(),
                message: "PrincipalPropagation needs the user's JWT (Options::user_jwt)".to_owned(),
            });
        }
        // Keystores and trust stores the answer does not carry: the SDK reads a `.pem` trust
        // store from the certificate API (subaccount, then instance level; §3.2 step 3); so do
        // we, for keystores too. A failure leaves the destination without it.
        if !options.skip_token_retrieval {
            for key in ["KeyStoreLocation", "TrustStoreLocation"] {
                if let Some(cert_name) = d.property(key).filter(|n| !n.is_empty())
                    && d.certificate(key).is_none()
                    && let Some(c) = self.certificate(&binding, &cert_name, &token).await
                {
                    d.certificates.push(c);
                }
            }
        }
        d.tenant = tenant;
        if cacheable && auth != "SAMLAssertion" {
            let ttl = d
                .auth_tokens
                .first()
                .and_then(|t| t.expires_in)
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_DESTINATION_TTL);
            self.inner.destinations.lock().await.insert(key, (d.clone(), Instant::now() + ttl));
        }
        d.user_jwt = options.user_jwt.clone();
        Ok(d)
    }

    /// Lookup step 3 (CLIENT-CONTRACT §1.1): the bound service instance called `name`, made a
    /// destination as the SDK's transformers do (its URL, a client-credentials token of its
    /// client for the caller's tenant). `None` lets the lookup go on to the Destination
    /// Service, also when no token can be had, as in the SDK.
    async fn bound_destination(&self, name: &str, options: &Options) -> Option<Destination> {
        let bound = self.inner.bindings.bound_destination(name)?;
        let mut config = Map::new();
        config.insert("Name".into(), name.into());
        let mut d = match bound {
            BoundDestination::Basic { url, user, password } => {
                config.insert("URL".into(), url.into());
                config.insert("Authentication".into(), "BasicAuthentication".into());
                config.insert("User".into(), user.into());
                config.insert("Password".into(), password.expose().clone().into());
                Destination::from_configuration(config)
            }
            BoundDestination::ClientCredentials { url, credentials } => {
                let claims = options.user_jwt.as_ref().and_then(|j| jwt_claims(j.expose()));
                let tenant = options.tenant.clone().or_else(|| claims.as_ref().and_then(zone_of));
                let tenant = tenant.map(Tenant::Id);
                let token = match self.service_token(&credentials, tenant.as_ref()).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(destination = name, error = %e, "no destination from the service binding");
                        return None;
                    }
                };
                config.insert("URL".into(), url.into());
                config.insert("Authentication".into(), "OAuth2ClientCredentials".into());
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                let expires_in = jwt_claims(token.expose())
                    .and_then(|c| c.get("exp").and_then(Value::as_u64))
                    .map(|exp| exp.saturating_sub(now.as_secs()));
                let header = Secret::new(format!("Bearer {}", token.expose()));
                let mut d = Destination::from_configuration(config);
                d.auth_tokens.push(AuthToken {
                    kind: "bearer".into(),
                    value: token,
                    http_header: Some(("Authorization".into(), header)),
                    expires_in,
                    error: None,
                });
                d
            }
        };
        d.user_jwt = options.user_jwt.clone();
        Some(d)
    }

    /// A certificate from the subaccount level, else the instance level.
    async fn certificate(
        &self,
        binding: &DestinationBinding,
        name: &str,
        token: &Secret<String>,
    ) -> Option<Certificate> {
        for level in ["subaccount", "instance"] {
            let url = format!("{}/destination-configuration/v1/{level}Certificates/{name}", binding.uri);
            let resp = self.inner.http.get(&url).bearer_auth(token.expose()).timeout(SERVICE_TIMEOUT).send().await;
            let Ok(resp) = resp else { continue };
            if !resp.status().is_success() {
                continue;
            }
            let Ok(body) = resp.json::<Value>().await else { continue };
            if body.get("Content").is_some() {
                return Some(Certificate {
                    name: str_of(&body, "Name"),
                    kind: str_of(&body, "Type"),
                    content: Secret::new(str_of(&body, "Content")),
                });
            }
        }
        None
    }

    /// One find-by-name call (v1, or v2 `name@level` when a level is asked for).
    async fn find(
        &self,
        binding: &DestinationBinding,
        name: &str,
        options: &Options,
        token: &Secret<String>,
        skip: bool,
        user_token: Option<&Secret<String>>,
    ) -> Result<Value, ClientError> {
        let mut url = match options.level {
            None => format!("{}/destination-configuration/v1/destinations/{name}", binding.uri),
            Some(l) => format!("{}/destination-configuration/v2/destinations/{name}@{}", binding.uri, l.as_str()),
        };
        if skip {
            url.push_str("?$skipTokenRetrieval=true");
        }
        let mut req = self
            .inner
            .http
            .get(&url)
            .bearer_auth(token.expose())
            .header("accept", "application/json")
            .timeout(SERVICE_TIMEOUT);
        if let Some(f) = &options.fragment {
            req = req.header("X-fragment-name", f);
        }
        if let Some(jwt) = user_token {
            req = req.header("X-user-token", jwt.expose());
        }
        if !skip {
            if let Some(t) = &options.refresh_token {
                req = req.header("X-refresh-token", t.expose());
            }
            for (header, value) in &options.token_headers {
                let parsed = reqwest::header::HeaderName::from_bytes(header.as_bytes())
                    .ok()
                    .zip(reqwest::header::HeaderValue::from_str(value.expose()).ok());
                let Some((header, value)) = parsed else {
                    return Err(ClientError::Destination {
                        name: name.to_owned(),
                        message: format!("Options::token_headers: {header:?} is not a valid HTTP header and value"),
                    });
                };
                req = req.header(header, value);
            }
        }
        let tenant_key = options.tenant.as_deref().unwrap_or("");
        let permit = self.inner.breakers.admit(
            &format!("destination {} {tenant_key}", binding.uri),
            Hop::DestinationService,
            &url,
        )?;
        let result = self.read_find(req, url, name, options).await;
        permit.record(Outcome::of(&result));
        result
    }

    async fn read_find(
        &self,
        req: reqwest::RequestBuilder,
        url: String,
        name: &str,
        options: &Options,
    ) -> Result<Value, ClientError> {
        let resp = req.send().await.map_err(|e| ClientError::transport(Hop::DestinationService, &url, &e))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let message = body.get("ErrorMessage").and_then(Value::as_str);
        if status == reqwest::StatusCode::NOT_FOUND && message == Some(NOT_FOUND_MESSAGE) {
            return Err(ClientError::NotFound { name: name.to_owned() });
        }
        if !status.is_success() {
            let message =
                message.map(str::to_owned).unwrap_or_else(|| if text.is_empty() { status.to_string() } else { text });
            return Err(ClientError::Hop {
                hop: Hop::DestinationService,
                url,
                status: Some(status.as_u16()),
                message: format!("failed to fetch destination {name:?} ({status}): {message}"),
            });
        }
        // v1: a destination without an owner counts as not found (§3.2).
        if options.level.is_none() {
            let owner = body.get("owner");
            let has = |k: &str| owner.and_then(|o| o.get(k)).is_some_and(|v| v.as_str().is_some_and(|s| !s.is_empty()));
            if !has("InstanceId") && !has("SubaccountId") {
                return Err(ClientError::NotFound { name: name.to_owned() });
            }
        }
        Ok(body)
    }
}

/// A reqwest client with the system roots plus `ca_pem` (and `extra_roots`), optionally a TLS
/// client identity (PEM certificate chain and key).
/// A subdomain fit to put in front of a domain: one DNS label.
fn valid_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Whether `uaadomain` (`host[:port]`) is an IP address, which cannot take a subdomain.
fn ip_domain(domain: &str) -> bool {
    let host = match domain.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => domain.rsplit_once(':').map_or(domain, |(h, _)| h),
    };
    host.parse::<std::net::IpAddr>().is_ok()
}

pub(crate) fn build_http(
    ca_pem: Option<&str>,
    identity: Option<(&str, &str)>,
    extra_roots: Option<&str>,
) -> Result<reqwest::Client, ClientError> {
    http_builder(ca_pem, identity, extra_roots, false)?.build().map_err(|e| ClientError::Tls(e.to_string()))
}

/// `trust_all` (a destination's `TrustAll=true`) accepts any server certificate, as the SDK
/// does; the handshake signature is still checked, so the server must hold the key it shows.
pub(crate) fn http_builder(
    ca_pem: Option<&str>,
    identity: Option<(&str, &str)>,
    extra_roots: Option<&str>,
    trust_all: bool,
) -> Result<reqwest::ClientBuilder, ClientError> {
    let tls = |e: ferry_core::tls::TlsError| ClientError::Tls(e.to_string());
    let builder = if trust_all {
        ferry_core::tls::trust_all_builder()
    } else {
        let mut roots = ferry_core::tls::outbound_roots(ca_pem).map_err(tls)?;
        if let Some(pem) = extra_roots {
            for c in ferry_core::tls::parse_certs(pem).map_err(tls)? {
                roots.add(c).map_err(|e| ClientError::Tls(e.to_string()))?;
            }
        }
        rustls::ClientConfig::builder().with_root_certificates(roots)
    };
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                ferry_core::tls::parse_certs(cert).map_err(tls)?,
                ferry_core::tls::parse_key(key).map_err(tls)?,
            )
            .map_err(|e| ClientError::Tls(format!("client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    Ok(reqwest::Client::builder().use_preconfigured_tls(config).tcp_nodelay(true).connect_timeout(SERVICE_TIMEOUT))
}
