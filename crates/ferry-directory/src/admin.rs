//! The admin REST API, `/ferry/admin/v1/...`, served on the token service's listeners.
//!
//! Every request needs a bearer token of this token service whose scopes include
//! [`ADMIN_SCOPE`] (a client-credentials token of a client with that authority). Errors are
//! JSON: `{"error": "<kind>", "message": "...", "field"?: "..."}`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::{Directory, DirectoryError, NewKey};

/// The authority a client needs for the admin API.
pub const ADMIN_SCOPE: &str = "ferry.admin";

/// Where the API lives.
pub const BASE: &str = "/ferry/admin/v1";

const MAX_BODY: usize = 64 * 1024;

/// An admin API error as a response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    field: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into(), field: None }
    }
}

impl From<DirectoryError> for ApiError {
    fn from(e: DirectoryError) -> Self {
        match e {
            DirectoryError::BadInput { field, message } => Self {
                status: StatusCode::BAD_REQUEST,
                kind: "bad_request",
                message: format!("{field}: {message}"),
                field: Some(field),
            },
            DirectoryError::NotFound(what) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
            }
            DirectoryError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            DirectoryError::Internal(m) => {
                tracing::error!(error = %m, "admin API");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.kind, "message": self.message });
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"ferry-admin\""));
        }
        resp
    }
}

type ApiResult = Result<Response, ApiError>;

/// The admin routes; merge them into the token service's router
/// (`token_service::run_with_routes`).
pub fn router(directory: Arc<Directory>) -> Router {
    Router::new()
        .route(&format!("{BASE}/subaccounts"), get(list_subaccounts).post(create_subaccount))
        .route(&format!("{BASE}/subaccounts/{{id}}"), get(get_subaccount).delete(delete_subaccount))
        .route(&format!("{BASE}/subaccounts/{{id}}/service-instances"), get(list_instances).post(create_instance))
        .route(
            &format!("{BASE}/subaccounts/{{id}}/service-instances/{{iid}}"),
            get(get_instance).delete(delete_instance),
        )
        .route(
            &format!("{BASE}/subaccounts/{{id}}/service-instances/{{iid}}/service-keys"),
            get(list_keys).post(create_key),
        )
        .route(
            &format!("{BASE}/subaccounts/{{id}}/service-instances/{{iid}}/service-keys/{{kid}}"),
            get(get_key).delete(delete_key),
        )
        .route(&format!("{BASE}/subaccounts/{{id}}/connectors"), post(enroll_connector))
        .route(&format!("{BASE}/subaccounts/{{id}}/connectors/csr"), post(onboard_connector))
        .route(&format!("{BASE}/connectors/certificate"), post(renew_connector))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such admin resource") })
        .with_state(directory)
}

/// Checks the bearer token: 401 without a valid one, 403 without the admin scope.
async fn authorize(dir: &Directory, headers: &HeaderMap) -> Result<(), ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized("missing Authorization: Bearer <token of a client with authority ferry.admin>"));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthorized("the Authorization header is not a bearer token"))?;
    let Some(tokens) = dir.tokens.get() else {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the token service is not attached"));
    };
    let claims =
        tokens.verifier().verify(token).await.map_err(|e| unauthorized(&format!("invalid bearer token: {e}")))?;
    if !claims.scope.iter().any(|s| s == ADMIN_SCOPE) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the token lacks the scope {ADMIN_SCOPE}"),
        ));
    }
    Ok(())
}

/// Parses a JSON body; a bad one is a 400 naming what is wrong.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.len() > MAX_BODY {
        return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "bad_request", "body too large"));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        let mut err = ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("invalid JSON body: {e}"));
        // serde names the field in its message ("missing field `subdomain`", "unknown field `x`").
        let msg = e.to_string();
        err.field = ["subdomain", "id", "service", "name", "plan", "credential_type"]
            .into_iter()
            .find(|f| msg.contains(&format!("`{f}`")));
        err
    })
}

fn json_response(status: StatusCode, v: impl serde::Serialize) -> Response {
    (status, axum::Json(v)).into_response()
}

fn list(items: impl serde::Serialize) -> Response {
    json_response(StatusCode::OK, json!({ "items": items }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSubaccount {
    subdomain: String,
    id: Option<String>,
}

async fn create_subaccount(State(dir): State<Arc<Directory>>, headers: HeaderMap, bytes: Bytes) -> ApiResult {
    authorize(&dir, &headers).await?;
    let req: CreateSubaccount = body(&bytes)?;
    if let Some(id) = &req.id {
        crate::parse_guid("id", id)?;
    }
    let d = dir.clone();
    let sub = blocking(move || d.create_subaccount(&req.subdomain, req.id.as_deref(), None)).await?;
    Ok(json_response(StatusCode::CREATED, sub))
}

async fn list_subaccounts(State(dir): State<Arc<Directory>>, headers: HeaderMap) -> ApiResult {
    authorize(&dir, &headers).await?;
    Ok(list(dir.list_subaccounts()?))
}

async fn get_subaccount(State(dir): State<Arc<Directory>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    authorize(&dir, &headers).await?;
    Ok(json_response(StatusCode::OK, dir.subaccount(&id)?))
}

async fn delete_subaccount(State(dir): State<Arc<Directory>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    authorize(&dir, &headers).await?;
    dir.delete_subaccount(&id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateInstance {
    service: String,
    name: String,
    plan: Option<String>,
    /// BTP's instance parameters (an `xs-security.json` for xsuaa); see [`InstanceParameters`].
    parameters: Option<crate::InstanceParameters>,
}

async fn create_instance(
    State(dir): State<Arc<Directory>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult {
    authorize(&dir, &headers).await?;
    dir.subaccount(&id)?;
    let req: CreateInstance = body(&bytes)?;
    let inst = dir.create_instance(&id, &req.service, &req.name, req.plan.as_deref(), None, req.parameters)?;
    Ok(json_response(StatusCode::CREATED, inst))
}

async fn list_instances(State(dir): State<Arc<Directory>>, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    authorize(&dir, &headers).await?;
    Ok(list(dir.list_instances(&id)?))
}

async fn get_instance(
    State(dir): State<Arc<Directory>>,
    headers: HeaderMap,
    Path((id, iid)): Path<(String, String)>,
) -> ApiResult {
    authorize(&dir, &headers).await?;
    Ok(json_response(StatusCode::OK, dir.instance(&id, &iid)?))
}

async fn delete_instance(
    State(dir): State<Arc<Directory>>,
    headers: HeaderMap,
    Path((id, iid)): Path<(String, String)>,
) -> ApiResult {
    authorize(&dir, &headers).await?;
    dir.delete_instance(&id, &iid)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    credential_type: Option<String>,
}

async fn create_key(
    State(dir): State<Arc<Directory>>,
    headers: HeaderMap,
    Path((id, iid)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult {
    authorize(&dir, &headers).await?;
    dir.instance(&id, &iid)?;
    let req: CreateKey = body(&bytes)?;
    let d = dir.clone();
    let creds = blocking(move || {
        d.create_key(&id, &iid, NewKey { name: req.name, credential_type: req.credential_type, ..Default::default() })
    })
    .await?;
    let mut resp = json_response(StatusCode::CREATED, creds);
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

async fn list_keys(
    State(dir): State<Arc<Directory>>,
    headers: HeaderMap,
    Path((id, iid)): Path<(String, String)>,
) -> ApiResult {
    authorize(&dir, &headers).await?;
    Ok(list(dir.list_keys(&id, &iid)?))
}

async fn get_key(
    State(dir): State<Arc<Directory>>,
    headers: HeaderMap,
    Path((id, iid, kid)): Path<(String, String, String)>,
) -> ApiResult {
    authorize(&dir, &headers).await?;
    Ok(json_response(StatusCode::OK, dir.key(&id, &iid, &kid)?))
}

async fn delete_key(
    State(dir): State<Arc<Directory>>,
    headers: HeaderMap,
    Path((id, iid, kid)): Path<(String, String, String)>,
) -> ApiResult {
    authorize(&dir, &headers).await?;
    dir.delete_key(&id, &iid, &kid)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Runs key generation and Argon2 hashing off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DirectoryError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::from(DirectoryError::Internal(e.to_string())))?
        .map_err(ApiError::from)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollConnector {
    #[serde(default)]
    location_id: String,
    /// Lifetime of the certificate; a year by default.
    #[serde(default)]
    validity_seconds: Option<u64>,
}

const MAX_CONNECTOR_VALIDITY: u64 = 365 * 24 * 3600;

fn connector_validity(seconds: Option<u64>) -> Result<time::Duration, ApiError> {
    match seconds {
        None => Ok(time::Duration::seconds(MAX_CONNECTOR_VALIDITY as i64)),
        Some(s) if (1..=MAX_CONNECTOR_VALIDITY).contains(&s) => Ok(time::Duration::seconds(s as i64)),
        Some(_) => {
            let mut e = ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("validity_seconds must be between 1 and {MAX_CONNECTOR_VALIDITY} (a year)"),
            );
            e.field = Some("validity_seconds");
            Err(e)
        }
    }
}

/// Issues a Cloud Connector's tunnel certificate for a subaccount and location id — Ferry's
/// "download authentication data": the answer holds everything `ferry connector` needs to dial
/// in (certificate, key, the CA that signs the tunnel endpoint, and its address).
async fn enroll_connector(
    State(dir): State<Arc<Directory>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    bytes: Bytes,
) -> ApiResult {
    authorize(&dir, &headers).await?;
    dir.subaccount(&id)?;
    let req: EnrollConnector = body(&bytes)?;
    if req.location_id.len() > 128 || req.location_id.chars().any(|c| c.is_control()) {
        let mut e = ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "location_id must be at most 128 characters without control characters",
        );
        e.field = Some("location_id");
        return Err(e);
    }
    let Some(ca) = dir.ca.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "this Ferry has no CA to issue connector certificates",
        ));
    };
    let validity = connector_validity(req.validity_seconds)?;
    let issued = ca
        .issue_connector_cert(&id, &req.location_id, validity)
        .map_err(|e| ApiError::from(DirectoryError::Internal(e.to_string())))?;
    let mut resp = json_response(
        StatusCode::CREATED,
        json!({
            "subaccount": id,
            "location_id": req.location_id,
            "certificate": issued.cert_pem,
            "key": issued.key_pem.expose(),
            "ca": ca.cert_pem(),
            "tunnel": dir.endpoints().tunnel,
            // Where the connector renews this certificate with itself over mTLS (the token
            // service's HTTPS listener, which asks for client certificates from the same CA).
            "renewal": format!("https://{}{BASE}/connectors/certificate", dir.endpoints().uaadomain),
        }),
    );
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// The user scope that lets a subaccount user onboard Cloud Connectors (SAP's role "Cloud
/// Connector Administrator"); a user configured without a scope list has every scope.
pub const CONNECTOR_ADMIN_SCOPE: &str = "CloudConnectorAdministrator";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OnboardConnector {
    /// PEM certificate signing request for the connector's key, which never leaves it.
    csr: String,
    #[serde(default)]
    location_id: String,
    #[serde(default)]
    validity_seconds: Option<u64>,
}

/// `user:password` of HTTP Basic authentication.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, ferry_core::Secret<String>)> {
    use base64::Engine;
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let b64 = v.strip_prefix("Basic ").or_else(|| v.strip_prefix("basic "))?;
    let text = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), ferry_core::Secret::new(password.to_owned())))
}

/// Onboards a Cloud Connector with the subaccount user's credentials, as SAP's connector does
/// with the subaccount user and password: HTTP Basic with a user of the subaccount's zone who has
/// [`CONNECTOR_ADMIN_SCOPE`], and the connector's CSR signed for the subaccount and location id
/// (the identity comes from the path and body, never from the CSR). The credentials are checked
/// and forgotten; the answer is the authentication data without a key.
async fn onboard_connector(
    State(dir): State<Arc<Directory>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    bytes: Bytes,
) -> ApiResult {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let Some((user, password)) = basic_credentials(&headers) else {
        return Err(unauthorized("log on with the subaccount user: Authorization: Basic <user:password>"));
    };
    let Some(tokens) = dir.tokens.get() else {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the token service is not attached"));
    };
    // The token endpoint's failed-logon limit per client address applies here too (the same
    // counter): guessing the user's password here is no cheaper than at `/oauth/token`.
    let peer = peer.map(|axum::Extension(axum::extract::ConnectInfo(a))| a.ip());
    if let Some(wait) = peer.and_then(|p| tokens.logon_retry_after(p)) {
        let secs = wait.as_secs().max(1);
        let mut resp = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            format!("too many failed logons from this address; retry in {secs} s"),
        )
        .into_response();
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return Ok(resp);
    }
    let failed = || {
        if let Some(p) = peer {
            tokens.logon_failed(p);
        }
        unauthorized("wrong user or password for this subaccount")
    };
    // The subaccount must exist; an unknown one answers like a wrong password, so the endpoint
    // does not tell which subaccount ids exist.
    if dir.subaccount(&id).is_err() {
        tokens.check_user_password(&id, "", password.expose()).await.ok();
        return Err(failed());
    }
    let found = match tokens.check_user_password(&id, &user, password.expose()).await {
        Ok(found) => found,
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                format!("the user directory cannot be asked now: {e}"),
            ));
        }
    };
    let Some(u) = found else {
        tracing::warn!(subaccount = %id, "connector onboarding refused: wrong user or password");
        return Err(failed());
    };
    if !u.scopes.as_ref().is_none_or(|s| s.iter().any(|x| x == CONNECTOR_ADMIN_SCOPE)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "user {} lacks the scope {CONNECTOR_ADMIN_SCOPE} (SAP's role Cloud Connector Administrator)",
                u.username
            ),
        ));
    }
    let req: OnboardConnector = body(&bytes)?;
    if req.location_id.len() > 128 || req.location_id.chars().any(|c| c.is_control()) {
        let mut e = ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "location_id must be at most 128 characters without control characters",
        );
        e.field = Some("location_id");
        return Err(e);
    }
    let validity = connector_validity(req.validity_seconds)?;
    let (cert, ca) = sign_connector_csr(&dir, &req.csr, &id, &req.location_id, validity)?;
    tracing::info!(subaccount = %id, location_id = %req.location_id, user = %u.username, "connector onboarded with subaccount credentials");
    let mut resp = json_response(
        StatusCode::CREATED,
        json!({
            "subaccount": id,
            "location_id": req.location_id,
            "certificate": cert,
            "ca": ca.cert_pem(),
            "tunnel": dir.endpoints().tunnel,
            "renewal": format!("https://{}{BASE}/connectors/certificate", dir.endpoints().uaadomain),
        }),
    );
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Signs a connector's CSR with Ferry's CA for `subaccount` and `location` (onboarding and
/// renewal alike: the identity is the caller's, never the CSR's); returns the certificate and
/// the CA that signed it.
fn sign_connector_csr(
    dir: &Directory,
    csr: &str,
    subaccount: &str,
    location: &str,
    validity: time::Duration,
) -> Result<(String, Arc<ferry_core::tls::LocalCa>), ApiError> {
    let Some(ca) = dir.ca.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "this Ferry has no CA to issue connector certificates",
        ));
    };
    let cert = ca.sign_connector_csr(csr, subaccount, location, validity).map_err(|e| {
        let mut err = ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("csr: not a valid PEM CSR: {e}"));
        err.field = Some("csr");
        err
    })?;
    Ok((cert, ca))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewConnector {
    /// PEM certificate signing request for the connector's new key.
    csr: String,
    #[serde(default)]
    validity_seconds: Option<u64>,
}

/// Renews a Cloud Connector's tunnel certificate: the caller authenticates with its current,
/// still valid certificate as TLS client certificate (the HTTPS listener verifies it against
/// Ferry's CA during the handshake), and gets its CSR's key signed for the same subaccount and
/// location id — the identity comes from the presented certificate, never from the CSR. The
/// new private key never leaves the connector.
async fn renew_connector(
    State(dir): State<Arc<Directory>>,
    tls: Option<axum::Extension<ferry_auth::token_service::TlsInfo>>,
    bytes: Bytes,
) -> ApiResult {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let Some(peer) = tls.and_then(|axum::Extension(t)| t.peer_certificate) else {
        return Err(unauthorized(
            "present the connector's current certificate as TLS client certificate (HTTPS with mTLS)",
        ));
    };
    let Some((sub, location)) = ferry_core::tls::connector_identity(&peer) else {
        return Err(unauthorized("the client certificate is not a Cloud Connector certificate"));
    };
    // A connector of a deleted subaccount cannot renew.
    dir.subaccount(&sub)?;
    let req: RenewConnector = body(&bytes)?;
    // By default the same validity as the certificate being renewed.
    let validity = match req.validity_seconds {
        None => match ferry_core::tls::connector_validity(&peer) {
            Some(v) => v.min(time::Duration::seconds(MAX_CONNECTOR_VALIDITY as i64)),
            None => connector_validity(None)?,
        },
        some => connector_validity(some)?,
    };
    let (cert, ca) = sign_connector_csr(&dir, &req.csr, &sub, &location, validity)?;
    tracing::info!(subaccount = %sub, location_id = %location, "connector certificate renewed");
    Ok(json_response(
        StatusCode::OK,
        json!({ "subaccount": sub, "location_id": location, "certificate": cert, "ca": ca.cert_pem() }),
    ))
}
