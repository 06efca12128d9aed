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
use axum::routing::get;
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
    let inst = dir.create_instance(&id, &req.service, &req.name, req.plan.as_deref(), None)?;
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
