//! [`HttpClient`]: HTTP requests to the system behind a destination, built as the SAP Cloud SDK
//! builds them (CLIENT-CONTRACT §3.2, §4): the destination's URL, `URL.headers.*` and
//! `URL.queries.*`, `sap-client`, the header of its first usable auth token, and for `OnPremise`
//! the Connectivity Proxy with `Proxy-Authorization`, the location id and, for
//! PrincipalPropagation, `SAP-Connectivity-Authentication`. Modifying requests fetch a CSRF token
//! first; idempotent ones are retried with backoff.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use reqwest::{Method, StatusCode};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use ferry_core::keystore;

use crate::client::{Client, Destination, http_builder};
use crate::error::{ClientError, Hop};
use crate::target::{MailProtocol, tcp_target};

/// How [`HttpClient`] sends.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Extra attempts for idempotent requests after a connection failure or a 502/503/504.
    pub retries: u32,
    /// First backoff; it doubles with each retry.
    pub backoff: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(30), retries: 2, backoff: Duration::from_millis(200) }
    }
}

/// One request: method, path relative to the destination's URL (with an optional query), extra
/// headers and a body.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Bytes>,
    /// Fetch a CSRF token before a modifying request (the SDK's default; CAP turns it off).
    pub csrf: bool,
}

impl Request {
    pub fn new(method: Method, path: &str) -> Self {
        Self { method, path: path.to_owned(), headers: Vec::new(), body: None, csrf: true }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }
}

/// Sends requests through destinations. It holds connection pools: make one and share it (`Arc`).
pub struct HttpClient {
    client: Client,
    options: HttpOptions,
    direct: reqwest::Client,
    /// The proxied client, rebuilt when the connectivity token changes.
    proxied: Mutex<Option<(String, reqwest::Client)>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").field("options", &self.options).finish_non_exhaustive()
    }
}

/// A request ready to send: absolute URL, headers, and the hop a transport failure belongs to.
struct Prepared {
    http: reqwest::Client,
    url: reqwest::Url,
    headers: Vec<(String, String)>,
    first_hop: Hop,
}

impl HttpClient {
    /// ```no_run
    /// use ferry_client::{Client, HttpClient};
    /// # async fn run() -> Result<(), ferry_client::ClientError> {
    /// let client = Client::from_env()?;
    /// let http = HttpClient::new(client.clone(), Default::default())?;
    /// let erp = client.get_destination("erp", &Default::default()).await?;
    /// let resp = http.get(&erp, "/items?top=1").await?;
    /// println!("{}", resp.status());
    /// # Ok(()) }
    /// ```
    pub fn new(client: Client, options: HttpOptions) -> Result<Self, ClientError> {
        let direct = http_builder(client.ca_pem(), None, None, false)?
            .timeout(options.timeout)
            .build()
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(Self { client, options, direct, proxied: Mutex::new(None) })
    }

    /// `GET` of `path` relative to the destination's URL.
    ///
    /// ```no_run
    /// # async fn run(client: ferry_client::Client, http: ferry_client::HttpClient) -> Result<(), ferry_client::ClientError> {
    /// let erp = client.get_destination("erp", &Default::default()).await?;
    /// let items = http.get(&erp, "/items?$top=1").await?.text().await.unwrap_or_default();
    /// # let _ = items; Ok(()) }
    /// ```
    pub async fn get(&self, destination: &Destination, path: &str) -> Result<reqwest::Response, ClientError> {
        self.send(destination, Request::new(Method::GET, path)).await
    }

    /// Sends `request` through `destination`. Any HTTP status of the backend is returned as a
    /// response; errors are failures of a hop (token, proxy, connection) or an unusable destination.
    ///
    /// ```no_run
    /// use ferry_client::{Client, HttpClient, Request};
    /// # async fn run(client: Client, http: HttpClient) -> Result<(), ferry_client::ClientError> {
    /// let erp = client.get_destination("erp", &Default::default()).await?;
    /// let req = Request::new(reqwest::Method::POST, "/items").header("content-type", "application/json").body("{}");
    /// let resp = http.send(&erp, req).await?;
    /// # let _ = resp; Ok(()) }
    /// ```
    pub async fn send(&self, destination: &Destination, request: Request) -> Result<reqwest::Response, ClientError> {
        let prepared = self.prepare(destination, &request).await?;
        let modifying = matches!(request.method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE);
        let mut csrf = if request.csrf && modifying { self.fetch_csrf(&prepared).await? } else { Vec::new() };
        let resp = self.send_with_retries(&prepared, &request, &csrf).await?;
        let required = resp
            .headers()
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("required"));
        if request.csrf && modifying && resp.status() == StatusCode::FORBIDDEN && required {
            // The token expired (or the session did): fetch a new one once.
            csrf = self.fetch_csrf(&prepared).await?;
            return self.send_with_retries(&prepared, &request, &csrf).await;
        }
        Ok(resp)
    }

    async fn send_with_retries(
        &self,
        p: &Prepared,
        request: &Request,
        extra: &[(String, String)],
    ) -> Result<reqwest::Response, ClientError> {
        let idempotent = matches!(
            request.method,
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
        );
        let mut attempt = 0;
        loop {
            let mut req = p.http.request(request.method.clone(), p.url.clone());
            for (k, v) in p.headers.iter().chain(extra).chain(&request.headers) {
                req = req.header(k, v);
            }
            if let Some(b) = &request.body {
                req = req.body(b.clone());
            }
            let result = req.send().await;
            let retry = idempotent
                && attempt < self.options.retries
                && match &result {
                    Ok(r) => {
                        matches!(r.status().as_u16(), 502..=504)
                    }
                    Err(e) => e.is_connect() || e.is_timeout(),
                };
            if !retry {
                return self.check(p, result);
            }
            tokio::time::sleep(self.options.backoff * 2u32.pow(attempt)).await;
            attempt += 1;
        }
    }

    fn check(
        &self,
        p: &Prepared,
        result: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<reqwest::Response, ClientError> {
        let shown = p.url.as_str();
        match result {
            Err(e) => Err(ClientError::transport(p.first_hop, shown, &e)),
            Ok(r) if r.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED => Err(ClientError::Hop {
                hop: Hop::ConnectivityProxy,
                url: shown.to_owned(),
                status: Some(407),
                message: "refused the connectivity token (check the connectivity binding)".to_owned(),
            }),
            Ok(r) => Ok(r),
        }
    }

    /// `HEAD <url>/` with `x-csrf-token: Fetch` (then without the slash if no token came back);
    /// returns the token and cookies to send.
    async fn fetch_csrf(&self, p: &Prepared) -> Result<Vec<(String, String)>, ClientError> {
        let mut with_slash = p.url.clone();
        if !with_slash.path().ends_with('/') {
            with_slash.set_path(&format!("{}/", with_slash.path()));
        }
        for url in [with_slash, p.url.clone()] {
            let mut req = p.http.head(url.clone()).header("x-csrf-token", "Fetch").header("content-length", "0");
            for (k, v) in &p.headers {
                req = req.header(k, v);
            }
            let resp = req.send().await.map_err(|e| ClientError::transport(p.first_hop, url.as_str(), &e))?;
            let token = resp.headers().get("x-csrf-token").and_then(|v| v.to_str().ok()).map(str::to_owned);
            if let Some(token) = token.filter(|t| !t.eq_ignore_ascii_case("required")) {
                let cookies: Vec<&str> = resp
                    .headers()
                    .get_all("set-cookie")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .filter_map(|c| c.split(';').next())
                    .collect();
                let mut out = vec![("x-csrf-token".to_owned(), token)];
                if !cookies.is_empty() {
                    out.push(("cookie".to_owned(), cookies.join("; ")));
                }
                return Ok(out);
            }
        }
        // No token offered: the backend does not use CSRF protection; send without one.
        Ok(Vec::new())
    }

    async fn prepare(&self, d: &Destination, request: &Request) -> Result<Prepared, ClientError> {
        let name = d.name();
        let unusable = |message: String| ClientError::Destination { name: name.clone(), message };
        if let Some(t) = d.property("Type").filter(|t| !t.eq_ignore_ascii_case("HTTP")) {
            return Err(unusable(format!("is of type {t}; use connect_tcp for non-HTTP destinations")));
        }
        let base = d.property("URL").ok_or_else(|| unusable("has no URL".to_owned()))?;
        let joined = if request.path.is_empty() {
            base.clone()
        } else {
            format!("{}/{}", base.trim_end_matches('/'), request.path.trim_start_matches('/'))
        };
        let mut url = reqwest::Url::parse(&joined).map_err(|e| unusable(format!("URL {joined:?}: {e}")))?;
        let queries: Vec<(String, String)> = d
            .configuration
            .keys()
            .filter_map(|k| Some((k.strip_prefix("URL.queries.")?.to_owned(), d.property(k)?)))
            .collect();
        if !queries.is_empty() {
            url.query_pairs_mut().extend_pairs(queries);
        }
        let mut headers: Vec<(String, String)> = d
            .configuration
            .keys()
            .filter_map(|k| Some((k.strip_prefix("URL.headers.")?.to_owned(), d.property(k)?)))
            .collect();
        if let Some(c) = d.property("sap-client") {
            headers.push(("sap-client".to_owned(), c));
        }
        let auth = d.authentication();
        let principal = auth == "PrincipalPropagation";
        match auth.as_str() {
            "NoAuthentication" | "PrincipalPropagation" | "ClientCertificateAuthentication" => {}
            _ => headers.push(auth_header(d).ok_or_else(|| self.no_token(d, &auth))?),
        }
        // Client certificate and trust store: a client of its own for this destination.
        let identity = if auth == "ClientCertificateAuthentication" {
            let cert = d.certificate("KeyStoreLocation").ok_or_else(|| {
                unusable("ClientCertificateAuthentication needs KeyStoreLocation naming one of its certificates".into())
            })?;
            let store = keystore_of(cert, d.property("KeyStorePassword"))
                .map_err(|m| unusable(format!("keystore {}: {m}", cert.name)))?;
            if store.key_entry().is_none() {
                return Err(unusable(format!("keystore {} holds no private key with its certificate", cert.name)));
            }
            Some(store.to_pem().into_inner())
        } else {
            None
        };
        let trust = match d.certificate("TrustStoreLocation") {
            Some(c) => {
                let store = keystore_of(c, d.property("TrustStorePassword"))
                    .map_err(|m| unusable(format!("trust store {}: {m}", c.name)))?;
                Some(
                    store
                        .entries
                        .iter()
                        .flat_map(|e| &e.chain)
                        .map(|c| keystore::pem_block("CERTIFICATE", c))
                        .collect::<String>(),
                )
            }
            None => None,
        };
        let trust_all = d.property("TrustAll").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        if trust_all {
            tracing::warn!(
                destination = %name,
                "TrustAll=true: the server's certificate is not verified; use a TrustStoreLocation instead"
            );
        }
        let custom_tls = identity.is_some() || trust.is_some() || trust_all;
        let builder = || {
            http_builder(self.client.ca_pem(), identity.as_deref().map(|p| (p, p)), trust.as_deref(), trust_all)
                .map(|b| b.timeout(self.options.timeout))
        };
        if !d.is_on_premise() {
            let http = if custom_tls {
                builder()?.build().map_err(|e| ClientError::Tls(e.to_string()))?
            } else {
                self.direct.clone()
            };
            return Ok(Prepared { http, url, headers, first_hop: Hop::Backend });
        }
        let conn = self.client.connectivity()?;
        let token = self.client.connectivity_token(d.tenant.as_deref()).await?;
        let bearer = format!("Bearer {}", token.expose());
        // The SDK sends Proxy-Authorization also as a normal header (§4.2).
        headers.push(("Proxy-Authorization".to_owned(), bearer.clone()));
        if let Some(loc) = d.property("CloudConnectorLocationId").filter(|l| !l.is_empty()) {
            headers.push(("SAP-Connectivity-SCC-Location_ID".to_owned(), loc));
        }
        if principal {
            let jwt = d
                .user_jwt
                .as_ref()
                .ok_or_else(|| unusable("PrincipalPropagation needs the user's JWT (Options::user_jwt)".to_owned()))?;
            headers.push(("SAP-Connectivity-Authentication".to_owned(), format!("Bearer {}", jwt.expose())));
        }
        let proxy_url = format!("http://{}", conn.http_proxy());
        let proxied = |b: reqwest::ClientBuilder| -> Result<reqwest::Client, ClientError> {
            let header = reqwest::header::HeaderValue::from_str(&bearer)
                .map_err(|_| ClientError::Tls("the connectivity token is not a valid header value".to_owned()))?;
            let proxy = reqwest::Proxy::all(&proxy_url)
                .map_err(|e| ClientError::Tls(format!("proxy {proxy_url}: {e}")))?
                .custom_http_auth(header);
            b.proxy(proxy).build().map_err(|e| ClientError::Tls(e.to_string()))
        };
        let http = if custom_tls {
            proxied(builder()?)?
        } else {
            let mut cached = self.proxied.lock().await;
            match cached.as_ref() {
                Some((t, c)) if *t == bearer => c.clone(),
                _ => {
                    let c = proxied(builder()?)?;
                    *cached = Some((bearer.clone(), c.clone()));
                    c
                }
            }
        };
        Ok(Prepared { http, url, headers, first_hop: Hop::ConnectivityProxy })
    }
}

/// The header of the first auth token without an error; for Basic without tokens (env
/// destinations), built from `User`/`Password`.
fn auth_header(d: &Destination) -> Option<(String, String)> {
    if let Some((k, v)) = d.auth_tokens.iter().filter(|t| t.error.is_none()).find_map(|t| t.http_header.as_ref()) {
        return Some((k.clone(), v.expose().clone()));
    }
    if d.auth_tokens.is_empty() && d.authentication() == "BasicAuthentication" {
        let (user, password) = (d.property("User")?, d.property("Password")?);
        return Some(("Authorization".to_owned(), format!("Basic {}", B64.encode(format!("{user}:{password}")))));
    }
    None
}

impl HttpClient {
    /// Why a destination that needs a token has none. When the Destination Service reported
    /// errors, the hop that failed is the destination's token service (`tokenServiceURL`: it
    /// refused the code, assertion or certificate, or could not be reached), or for flows without
    /// one the Destination Service itself; the service's reason is kept.
    fn no_token(&self, d: &Destination, auth: &str) -> ClientError {
        let name = d.name();
        let errors: Vec<&str> = d.auth_tokens.iter().filter_map(|t| t.error.as_deref()).collect();
        if errors.is_empty() {
            let message = format!(
                "{auth} but the Destination Service returned no auth token (was it looked up with skip_token_retrieval?)"
            );
            return ClientError::Destination { name, message };
        }
        let message = format!("the Destination Service could not fetch a token for {name:?}: {}", errors.join("; "));
        let token_service = d.property("tokenServiceURL").filter(|u| !u.is_empty()).map(|u| {
            // Only scheme, host and path: a query may carry what the destination keeps secret.
            reqwest::Url::parse(&u).map_or(u, |mut url| {
                url.set_query(None);
                url.to_string()
            })
        });
        match token_service {
            Some(url) => ClientError::Hop { hop: Hop::TokenService, url, status: None, message },
            None => {
                let url = self.client.bindings().destination().map(|b| b.uri).unwrap_or_default();
                ClientError::Hop { hop: Hop::DestinationService, url, status: None, message }
            }
        }
    }
}

/// A certificate entry decoded whatever its format (PEM, DER, P12/PFX, JKS); `password` opens
/// P12 and JKS files.
fn keystore_of(c: &crate::client::Certificate, password: Option<String>) -> Result<keystore::KeyStore, String> {
    let bytes = B64.decode(c.content.expose().trim()).map_err(|e| format!("content is not base64: {e}"))?;
    let format = keystore::Format::from_type_or_name(Some(&c.kind), &c.name);
    keystore::decode(&bytes, format, password.as_deref().filter(|p| !p.is_empty())).map_err(|e| e.to_string())
}

impl Client {
    /// A TCP connection to the on-premise system behind a `TCP`, `LDAP` or `MAIL` destination:
    /// a connectivity token, then SOCKS5 with SAP's method 0x80 to the Connectivity Proxy.
    ///
    /// ```no_run
    /// # async fn run(client: ferry_client::Client) -> Result<(), ferry_client::ClientError> {
    /// use tokio::io::AsyncWriteExt;
    /// let ldap = client.get_destination("ldap", &Default::default()).await?;
    /// let mut stream = client.connect_tcp(&ldap, None).await?;
    /// stream.write_all(b"...").await.ok();
    /// # Ok(()) }
    /// ```
    pub async fn connect_tcp(
        &self,
        destination: &Destination,
        mail: Option<MailProtocol>,
    ) -> Result<TcpStream, ClientError> {
        let target = tcp_target(&serde_json::Value::Object(destination.configuration.clone()), mail)
            .map_err(|e| ClientError::Destination { name: destination.name(), message: e.to_string() })?;
        let conn = self.connectivity()?;
        let proxy = conn.socks5_proxy().ok_or_else(|| ClientError::Hop {
            hop: Hop::ConnectivityProxy,
            url: conn.proxy_host.clone(),
            status: None,
            message: format!("the connectivity binding (from {}) has no onpremise_socks5_proxy_port", conn.source),
        })?;
        let token = self.connectivity_token(destination.tenant.as_deref()).await?;
        Ok(crate::socks5::connect_tcp(&proxy, token.expose(), &target.location_id, &target.host, target.port).await?)
    }
}
