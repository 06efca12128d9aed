//! The HTTP data path of one endpoint (SPEC §5.2): check the request headers, look the
//! destination up, add its headers, queries and credentials, and stream the request to the URL
//! (Internet) or through the Connectivity Proxy (OnPremise).

use std::sync::Arc;
use std::time::Duration;

use ferry_client::{Client, Tenant};
use ferry_core::Secret;
use ferry_core::body::{self, BoxBody};
use http::header::{AUTHORIZATION, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::net::TcpStream;

use crate::config::TenantMode;
use crate::error::{Origin, ProxyError, header_text};
use crate::resolve::{Lookup, Resolved, Resolver};
use crate::resource::{Destination, Level, MAX_DESTINATION_NAME_LEN, check_destination_name};
use crate::upstream::{PoolKey, Pools};

/// What every endpoint shares.
pub(crate) struct Shared {
    /// One resolver per configured Destination Service instance, by name.
    pub resolvers: std::collections::BTreeMap<String, Resolver>,
    pub default_instance: String,
    pub client: Client,
    pub tenant_mode: TenantMode,
    pub tls: tokio_rustls::TlsConnector,
    pub ca_pem: Option<String>,
    pub pools: Pools,
}

impl Shared {
    /// The resolver of the Destination Service instance `resource` names (or the default one).
    pub fn resolver(&self, resource: &Destination) -> Result<&Resolver, ProxyError> {
        let name = resource.spec.destination_service_instance_name.as_deref().unwrap_or(&self.default_instance);
        self.resolvers.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.resolvers.keys().map(String::as_str).collect();
            ProxyError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                Origin::TransparentProxy,
                format!(
                    "Destination Service instance '{name}' referred in Destination CR '{}' is not configured; \
                     configured instances: {}.",
                    resource.name(),
                    known.join(", ")
                ),
            )
        })
    }
}

/// The resource an endpoint serves; swapped in place when its file changes.
pub(crate) type Current = Arc<std::sync::RwLock<Arc<Destination>>>;

pub(crate) fn current_of(current: &Current) -> Arc<Destination> {
    current.read().map(|d| d.clone()).unwrap_or_else(|p| p.into_inner().clone())
}

/// Headers the proxy reads; each may appear once (SPEC §5.2), and none reaches the backend.
const PROXY_HEADERS: &[&str] = &[
    "x-destination-name",
    "x-destination-level",
    "x-fragment-name",
    "x-fragment-optional",
    "x-fragment-level",
    "x-tenant-subdomain",
    "x-tenant-id",
    "authorization",
    "x-token-service-tenant",
    "x-subject-token",
    "x-subject-token-type",
    "x-actor-token",
    "x-actor-token-type",
    "x-refresh-token",
    "x-code",
    "x-redirect-uri",
    "x-code-verifier",
    "x-client-assertion",
    "x-client-assertion-type",
    "x-client-assertion-destination-name",
    "x-chain-name",
    "sap-connectivity-region-configuration-id",
];
const CHAIN_VAR_PREFIX: &str = "x-chain-var-";

/// Request headers passed on to the find call under the Destination Service's names.
const FORWARDED: &[(&str, &str)] = &[
    ("x-subject-token", "X-subject-token"),
    ("x-subject-token-type", "X-subject-token-type"),
    ("x-actor-token", "X-actor-token"),
    ("x-actor-token-type", "X-actor-token-type"),
    ("x-refresh-token", "X-refresh-token"),
    ("x-code", "X-code"),
    ("x-redirect-uri", "X-redirect-uri"),
    ("x-code-verifier", "X-code-verifier"),
    ("x-client-assertion", "X-client-assertion"),
    ("x-client-assertion-type", "X-client-assertion-type"),
    ("x-client-assertion-destination-name", "X-client-assertion-destination-name"),
];

/// Authentication types whose find answer carries a token to fetch (SPEC §1.4).
const WITH_TOKENS: &[&str] = &[
    "BasicAuthentication",
    "OAuth2SAMLBearerAssertion",
    "OAuth2ClientCredentials",
    "OAuth2UserTokenExchange",
    "OAuth2JWTBearer",
    "OAuth2Password",
    "SAMLAssertion",
    "OAuth2RefreshToken",
    "OAuth2AuthorizationCode",
    "OAuth2TechnicalUserPropagation",
    "OAuth2TokenExchange",
];
/// Authentication types that act for the calling user (the find call gets `X-user-token`).
const USER_FLOWS: &[&str] = &[
    "OAuth2UserTokenExchange",
    "OAuth2JWTBearer",
    "OAuth2SAMLBearerAssertion",
    "SAMLAssertion",
    "SAPAssertionSSO",
    "OAuth2TokenExchange",
];

pub(crate) const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP/1.1 on one accepted connection until it closes or `shutdown` fires.
pub(crate) async fn serve_connection(
    stream: TcpStream,
    shared: Arc<Shared>,
    current: Current,
    shutdown: ferry_core::Shutdown,
) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        let resource = current_of(&current);
        async move { Ok::<_, std::convert::Infallible>(handle(&shared, &resource, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "connection ended with error") },
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        }
    }
}

/// The caller's `x-request-id` when it is usable, else a new one: SAP's error headers carry it.
pub(crate) fn request_id<B>(req: &Request<B>) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

pub(crate) async fn handle(shared: &Shared, resource: &Destination, req: Request<Incoming>) -> Response<BoxBody> {
    let request_id = request_id(&req);
    let mut resp = match proxy(shared, resource, req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(resource = resource.name(), status = e.status.as_u16(), origin = e.origin.as_str(), message = %e.message, "request refused");
            return e.into_response(&request_id);
        }
    };
    resp.headers_mut().insert("x-request-id", header_text(&request_id));
    resp
}

/// A header's value as text, `None` when absent or empty.
fn text(h: &HeaderMap, name: &str) -> Result<Option<String>, ProxyError> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok("") => Ok(None),
            Ok(s) => Ok(Some(s.to_owned())),
            Err(_) => Err(ProxyError::bad_request(format!("The value of the header '{name}' is not valid text."))),
        },
    }
}

fn level_header(h: &HeaderMap, name: &str) -> Result<Option<Level>, ProxyError> {
    text(h, name)?
        .map(|v| {
            v.parse::<Level>().map_err(|()| {
                ProxyError::bad_request(
                    "Destination level is invalid in the request. It should be one of the following: \
                     provider_subaccount, provider_instance, subaccount, instance.",
                )
            })
        })
        .transpose()
}

fn check_duplicates(h: &HeaderMap) -> Result<(), ProxyError> {
    let mut twice: Vec<&str> =
        PROXY_HEADERS.iter().copied().filter(|n| h.get_all(*n).iter().nth(1).is_some()).collect();
    twice.extend(
        h.keys()
            .map(HeaderName::as_str)
            .filter(|n| n.starts_with(CHAIN_VAR_PREFIX) && h.get_all(*n).iter().nth(1).is_some()),
    );
    twice.dedup();
    if twice.is_empty() {
        return Ok(());
    }
    Err(ProxyError::bad_request(format!("The following headers: [{}] should be passed only once.", twice.join(", "))))
}

/// The tenant a request is for: none in dedicated mode, exactly one header in shared mode.
fn tenant(mode: TenantMode, h: &HeaderMap) -> Result<Option<Tenant>, ProxyError> {
    if mode == TenantMode::Dedicated {
        return Ok(None);
    }
    match (text(h, "x-tenant-id")?, text(h, "x-tenant-subdomain")?) {
        (Some(_), Some(_)) => Err(ProxyError::bad_request(
            "In multi-tenant operational mode, only one of the 'x-tenant-id' and 'x-tenant-subdomain' headers may be provided.",
        )),
        (None, None) => Err(ProxyError::bad_request(
            "In multi-tenant operational mode, either 'x-tenant-id' or 'x-tenant-subdomain' header is mandatory to be provided.",
        )),
        (Some(t), None) => Ok(Some(Tenant::Id(t))),
        (None, Some(t)) => Ok(Some(Tenant::Subdomain(t))),
    }
}

/// The find call's inputs from the resource (bound endpoint) or the request (gateway).
fn lookup_of(resource: &Destination, h: &HeaderMap, tenant: Option<Tenant>) -> Result<Lookup, ProxyError> {
    let mut lookup = Lookup { resource: resource.name().to_owned(), tenant, ..Default::default() };
    let spec = &resource.spec;
    if resource.is_gateway() {
        let name = text(h, "x-destination-name")?.ok_or_else(|| {
            ProxyError::bad_request(
                "'x-destination-name' header is missing but required for an endpoint exposing multiple destinations \
                 via the same Destination CR.",
            )
        })?;
        if name.chars().count() > MAX_DESTINATION_NAME_LEN {
            return Err(ProxyError::bad_request(format!(
                "The value of the header 'x-destination-name' exceeds the maximum allowed length of {MAX_DESTINATION_NAME_LEN}"
            )));
        }
        if check_destination_name(&name).is_err() {
            return Err(ProxyError::bad_request(
                "The value of the header 'x-destination-name' contains characters that are not allowed.",
            ));
        }
        lookup.name = name;
        lookup.level = level_header(h, "x-destination-level")?;
        lookup.fragment = text(h, "x-fragment-name")?;
        lookup.fragment_level = level_header(h, "x-fragment-level")?;
        if lookup.fragment_level.is_some() && lookup.fragment.is_none() {
            return Err(ProxyError::bad_request(
                "The header 'x-fragment-level' requires the header 'x-fragment-name'.",
            ));
        }
        lookup.fragment_optional = match text(h, "x-fragment-optional")?.as_deref() {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(_) => {
                return Err(ProxyError::bad_request("The header 'x-fragment-optional' must be 'true' or 'false'."));
            }
        };
    } else {
        if h.contains_key("x-destination-name") {
            return Err(ProxyError::bad_request(
                "The requested endpoint is bound to a concrete destination, statically declared in the respective \
                 Destination CR. 'x-destination-name' header is not supported for this endpoint.",
            ));
        }
        lookup.name = spec.destination_ref.name.clone();
        lookup.level = spec.destination_ref.level;
        if let Some(f) = &spec.fragment_ref {
            lookup.fragment = Some(f.name.clone());
            lookup.fragment_level = f.level;
            lookup.fragment_optional = f.optional;
        }
    }
    let header_vars: Vec<(String, String)> = h
        .iter()
        .filter_map(|(k, v)| {
            let var = k.as_str().strip_prefix(CHAIN_VAR_PREFIX)?;
            Some((var.to_owned(), v.to_str().ok()?.to_owned()))
        })
        .collect();
    lookup.chain = match (text(h, "x-chain-name")?, &spec.chain_ref) {
        (Some(name), _) => Some((name, header_vars)),
        (None, Some(c)) => {
            let mut vars: Vec<(String, String)> = c
                .variables
                .iter()
                .filter(|v| !header_vars.iter().any(|(k, _)| k.eq_ignore_ascii_case(&v.name)))
                .map(|v| (v.name.clone(), v.value.clone()))
                .collect();
            vars.extend(header_vars);
            Some((c.name.clone(), vars))
        }
        (None, None) => None,
    };
    Ok(lookup)
}

/// The caller's user JWT (`Authorization: Bearer …`), which the proxy consumes.
fn user_jwt(h: &HeaderMap) -> Option<String> {
    let v = h.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned()).filter(|t| !t.is_empty())
}

async fn proxy(
    shared: &Shared,
    resource: &Destination,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, ProxyError> {
    let h = req.headers();
    check_duplicates(h)?;
    let tenant = tenant(shared.tenant_mode, h)?;
    let mut lookup = lookup_of(resource, h, tenant)?;
    let resolver = shared.resolver(resource)?;
    let meta = resolver.resolve(&lookup, false).await?;
    let auth = meta.prop("Authentication").unwrap_or("NoAuthentication").to_owned();
    let ty = meta.prop("Type").unwrap_or("HTTP");
    if !ty.eq_ignore_ascii_case("HTTP") {
        return Err(ProxyError::bad_request(format!(
            "Destination '{}' is of type {ty}; only HTTP destinations can be called over HTTP.",
            lookup.name
        )));
    }
    let common = meta.prop("tokenServiceURLType").is_some_and(|t| t.eq_ignore_ascii_case("Common"));
    let token_service_tenant = text(h, "x-token-service-tenant")?;
    if common && auth.starts_with("OAuth2") && token_service_tenant.is_none() {
        return Err(ProxyError::bad_request(
            "'x-token-service-tenant' request header is missing. It is required when 'tokenServiceURLType' property \
             in the destination is of type Common.",
        ));
    }
    for (token, ty) in [("x-subject-token", "x-subject-token-type"), ("x-actor-token", "x-actor-token-type")] {
        let needed = h.contains_key(token) || (auth == "OAuth2TokenExchange" && token == "x-subject-token");
        if needed && text(h, ty)?.is_none() {
            return Err(ProxyError::bad_request(format!(
                "\"{ty}\" request header is required for destination with Authentication: {auth}"
            )));
        }
    }
    let jwt = user_jwt(h);
    let resolved = if WITH_TOKENS.contains(&auth.as_str()) {
        if USER_FLOWS.contains(&auth.as_str())
            && let Some(j) = &jwt
        {
            lookup.headers.push(("X-user-token", Secret::new(j.clone())));
        }
        if common && let Some(t) = token_service_tenant {
            lookup.headers.push(("X-tenant", Secret::new(t)));
        }
        for (from, to) in FORWARDED {
            if let Some(v) = text(h, from)? {
                lookup.headers.push((to, Secret::new(v)));
            }
        }
        resolver.resolve(&lookup, true).await?
    } else {
        meta
    };
    forward(shared, &lookup, &resolved, &auth, jwt, req).await
}

fn bad_config(name: &str, why: &str) -> ProxyError {
    ProxyError::new(
        StatusCode::BAD_GATEWAY,
        Origin::DestinationService,
        format!("Received invalid configuration from Destination Service for destination '{name}': {why}"),
    )
}

async fn forward(
    shared: &Shared,
    lookup: &Lookup,
    d: &Resolved,
    auth: &str,
    jwt: Option<String>,
    mut req: Request<Incoming>,
) -> Result<Response<BoxBody>, ProxyError> {
    let name = lookup.name.as_str();
    // A WebSocket (or other) upgrade passes through: its headers are kept and, once the backend
    // answers 101, both upgraded connections are joined.
    let upgrade = upgrade_of(req.headers());
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let url = d.prop("URL").ok_or_else(|| bad_config(name, "it has no URL"))?;
    let base: Uri = url.parse().map_err(|_| bad_config(name, "its URL is not a URL"))?;
    let https = match base.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(bad_config(name, "its URL must start with http:// or https://")),
    };
    let authority = base.authority().ok_or_else(|| bad_config(name, "its URL has no host"))?.clone();
    let on_premise = d.prop("ProxyType").is_some_and(|p| p.eq_ignore_ascii_case("OnPremise"));

    let (mut parts, body) = req.into_parts();
    let mut path = base.path().trim_end_matches('/').to_owned();
    path.push_str(parts.uri.path());
    let mut query: Vec<String> =
        [base.query(), parts.uri.query()].into_iter().flatten().filter(|q| !q.is_empty()).map(str::to_owned).collect();
    // The serializer is not Send, so it must not live across an await.
    let extra = {
        let mut extra = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &d.config {
            if let (Some(q), Some(v)) = (k.strip_prefix("URL.queries."), v.as_str()) {
                extra.append_pair(q, v);
            }
        }
        extra.finish()
    };
    if !extra.is_empty() {
        query.push(extra);
    }
    let path_and_query = if query.is_empty() { path } else { format!("{path}?{}", query.join("&")) };

    let region = parts.headers.get("sap-connectivity-region-configuration-id").cloned();
    let headers = &mut parts.headers;
    body::strip_hop_by_hop(headers);
    if let Some(u) = &upgrade {
        headers.insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(http::header::UPGRADE, u.clone());
    }
    headers.remove(HOST);
    for n in PROXY_HEADERS.iter().filter(|n| **n != "authorization") {
        headers.remove(*n);
    }
    let chain_vars: Vec<HeaderName> =
        headers.keys().filter(|k| k.as_str().starts_with(CHAIN_VAR_PREFIX)).cloned().collect();
    for k in chain_vars {
        headers.remove(k);
    }
    // Only the proxy speaks to the Connectivity Proxy; an app cannot pose as it.
    let reserved: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("sap-connectivity-") || k.as_str() == "proxy-authorization")
        .cloned()
        .collect();
    for k in reserved {
        headers.remove(k);
    }
    if jwt.is_some() {
        headers.remove(AUTHORIZATION);
    }
    for (k, v) in &d.config {
        if let (Some(hk), Some(v)) = (k.strip_prefix("URL.headers."), v.as_str()) {
            let (Ok(hk), Ok(v)) = (HeaderName::from_bytes(hk.as_bytes()), HeaderValue::from_str(v)) else {
                return Err(bad_config(name, &format!("property {k} is not a valid header")));
            };
            headers.insert(hk, v);
        }
    }
    if let Some((k, v)) = &d.auth_header {
        let (Ok(hk), Ok(mut hv)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v.expose())) else {
            return Err(bad_config(name, "its token's http_header is not a valid header"));
        };
        hv.set_sensitive(true);
        headers.insert(hk, hv);
    }
    headers.insert(HOST, HeaderValue::from_str(authority.as_str()).map_err(|_| bad_config(name, "bad host"))?);

    let scheme = if https { "https" } else { "http" };
    parts.uri = format!("{scheme}://{authority}{path_and_query}")
        .parse()
        .map_err(|_| ProxyError::bad_request("The request path is not valid."))?;
    let client = if on_premise {
        let conn = shared.client.bindings().connectivity().map_err(|_| {
            ProxyError::new(
                StatusCode::BAD_GATEWAY,
                Origin::TransparentProxy,
                "On-Premise technical connectivity is not configured. There is no value provided for Connectivity \
                 Proxy service name.",
            )
        })?;
        let token = shared.client.connectivity_token_for(lookup.tenant.as_ref()).await.map_err(|e| {
            ProxyError::new(
                StatusCode::BAD_GATEWAY,
                Origin::Xsuaa,
                format!("Failed to get a token for the Connectivity Proxy: {e}"),
            )
        })?;
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
            ProxyError::new(StatusCode::BAD_GATEWAY, Origin::Xsuaa, "The connectivity token is not a valid header")
        })?;
        bearer.set_sensitive(true);
        parts.headers.insert("proxy-authorization", bearer);
        if let Some(loc) = d.prop("CloudConnectorLocationId").filter(|l| !l.is_empty()) {
            parts.headers.insert("sap-connectivity-scc-location_id", header_text(loc));
        }
        if let Some(r) = region {
            parts.headers.insert("sap-connectivity-region-configuration-id", r);
        }
        if auth == "PrincipalPropagation" {
            let jwt = jwt.ok_or_else(|| {
                ProxyError::bad_request(format!(
                    "Destination '{name}' uses PrincipalPropagation: send the user's JWT in the Authorization header."
                ))
            })?;
            let mut v = HeaderValue::from_str(&format!("Bearer {jwt}"))
                .map_err(|_| ProxyError::bad_request("The Authorization header is not valid."))?;
            v.set_sensitive(true);
            parts.headers.insert("sap-connectivity-authentication", v);
        }
        let key = PoolKey::Proxy { host: conn.proxy_host.clone(), port: conn.http_port, tenant: lookup.tenant.clone() };
        shared.pools.client(key, || Ok::<_, ProxyError>(shared.tls.clone()))?
    } else if let Some(cert) = &d.client_cert {
        let key = PoolKey::Direct { client_cert: Some(cert.hash) };
        shared.pools.client(key, || client_cert_tls(shared, name, cert))?
    } else {
        shared.pools.client(PoolKey::Direct { client_cert: None }, || Ok::<_, ProxyError>(shared.tls.clone()))?
    };
    let mut resp = client.request(Request::from_parts(parts, body)).await.map_err(|e| {
        use std::error::Error as _;
        let connect = e.is_connect();
        let why = e.source().map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
        match (on_premise, connect) {
            (true, true) => ProxyError::new(
                StatusCode::BAD_GATEWAY,
                Origin::ConnectivityProxy,
                "Failed to establish connection to the Connectivity Proxy. Check the configuration and the \
                 Connectivity Proxy status.",
            ),
            (false, true) => ProxyError::new(
                StatusCode::BAD_GATEWAY,
                Origin::TransparentProxy,
                format!("Failed to connect to the URL of destination '{name}': {why}"),
            ),
            (true, false) => ProxyError::new(
                StatusCode::BAD_GATEWAY,
                Origin::ConnectivityProxy,
                format!("The request to destination '{name}' failed: {why}"),
            ),
            (false, false) => ProxyError::new(
                StatusCode::BAD_GATEWAY,
                Origin::TransparentProxy,
                format!("The request to destination '{name}' failed: {why}"),
            ),
        }
    })?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_side) = client_upgrade
    {
        let backend_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_side, backend_side) {
                Ok((a, b)) => {
                    let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
                        tracing::debug!(error = %e, "upgraded connection ended");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
        let (mut parts, _) = resp.into_parts();
        let upgrade_to = parts.headers.get(http::header::UPGRADE).cloned();
        body::strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(u) = upgrade_to {
            parts.headers.insert(http::header::UPGRADE, u);
        }
        return Ok(Response::from_parts(parts, body::empty()));
    }
    let (mut parts, body) = resp.into_parts();
    body::strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body::boxed(body)))
}

/// TLS that presents a ClientCertificateAuthentication destination's certificate.
fn client_cert_tls(
    shared: &Shared,
    name: &str,
    cert: &crate::resolve::ClientCert,
) -> Result<tokio_rustls::TlsConnector, ProxyError> {
    let bad = |e: ferry_core::tls::TlsError| {
        bad_config(name, &format!("its keystore is not a PEM certificate chain with a private key: {e}"))
    };
    let chain = ferry_core::tls::parse_certs(cert.pem.expose()).map_err(bad)?;
    let key = ferry_core::tls::parse_key(cert.pem.expose()).map_err(bad)?;
    let roots = ferry_core::tls::outbound_roots(shared.ca_pem.as_deref()).map_err(bad)?;
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad_config(name, &format!("its keystore's key does not fit its certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// The `Upgrade` header of a request that asks for one (`Connection: upgrade`).
fn upgrade_of(h: &HeaderMap) -> Option<HeaderValue> {
    let asks = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    if asks { h.get(http::header::UPGRADE).cloned() } else { None }
}

/// A destination's `Type`, upper-cased; `HTTP` when absent, as the Destination Service defaults it.
pub(crate) fn destination_type(config: &serde_json::Map<String, Value>) -> String {
    config.get("Type").and_then(Value::as_str).unwrap_or("HTTP").to_ascii_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn duplicates_are_listed_once_each() {
        let h = headers(&[
            ("x-tenant-id", "a"),
            ("x-tenant-id", "b"),
            ("x-chain-var-k", "1"),
            ("x-chain-var-k", "2"),
            ("x-code", "c"),
        ]);
        let e = check_duplicates(&h).unwrap_err();
        assert_eq!(e.message, "The following headers: [x-tenant-id, x-chain-var-k] should be passed only once.");
        assert!(check_duplicates(&headers(&[("accept", "a"), ("accept", "b")])).is_ok());
    }

    #[test]
    fn tenant_headers_in_shared_mode() {
        assert_eq!(tenant(TenantMode::Dedicated, &headers(&[("x-tenant-id", "t")])).unwrap(), None);
        assert_eq!(
            tenant(TenantMode::Shared, &headers(&[("x-tenant-id", "t")])).unwrap(),
            Some(Tenant::Id("t".into()))
        );
        assert_eq!(
            tenant(TenantMode::Shared, &headers(&[("x-tenant-subdomain", "s")])).unwrap(),
            Some(Tenant::Subdomain("s".into()))
        );
        assert!(tenant(TenantMode::Shared, &headers(&[])).unwrap_err().message.contains("either 'x-tenant-id'"));
        let both = headers(&[("x-tenant-id", "t"), ("x-tenant-subdomain", "s")]);
        assert_eq!(tenant(TenantMode::Shared, &both).unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn bearer_is_the_user_jwt() {
        assert_eq!(user_jwt(&headers(&[("authorization", "Bearer abc")])).as_deref(), Some("abc"));
        assert_eq!(user_jwt(&headers(&[("authorization", "Basic abc")])), None);
    }
}
