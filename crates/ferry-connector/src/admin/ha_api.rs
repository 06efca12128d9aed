//! High availability routes: SAP's `/connector/haRole` and `/connector/ha/{master,shadow}/...`,
//! and Ferry's peer-to-peer paths under `/ferry/ha/v1` (see `crate::ha`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Admin, ApiError, Caller, LogonFailure, basic};
use crate::ha::{HaError, MasterConfig, PEER_PREFIX, RegisterRequest, Role, RoleInfo, ShadowConfig, TakeoverRequest};

type A = State<Arc<Admin>>;
type Result<T> = std::result::Result<T, ApiError>;

const HA: &str = "/api/v1/configuration/connector/ha";
const ROLE: &str = "/api/v1/configuration/connector/haRole";

pub(super) fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route(ROLE, get(get_role).post(set_role).put(set_role))
        .route(&format!("{HA}/master/config"), get(get_master_config).put(put_master_config))
        .route(&format!("{HA}/master/state"), get(get_master_state).post(post_master_state).delete(delete_master_state))
        .route(&format!("{HA}/shadow/config"), get(get_shadow_config).put(put_shadow_config))
        .route(&format!("{HA}/shadow/state"), get(get_shadow_state).post(post_shadow_state).delete(delete_shadow_state))
        .route(&format!("{PEER_PREFIX}/register"), post(peer_register))
        .route(&format!("{PEER_PREFIX}/sync"), get(peer_sync))
        .route(&format!("{PEER_PREFIX}/role"), get(peer_role))
        .route(&format!("{PEER_PREFIX}/takeover"), post(peer_takeover))
        .with_state(admin)
}

/// What a shadow still accepts: its own HA settings and the administrator's password (neither
/// is synced from the master), and the backup download.
pub(super) fn writable_on_shadow(method: &Method, path: &str) -> bool {
    path == ROLE
        || path.starts_with(HA)
        || path == super::PASSWORD_PATH
        || (method == Method::POST && path == "/api/v1/configuration/backup")
}

impl From<HaError> for ApiError {
    fn from(e: HaError) -> Self {
        match e {
            HaError::State(m) => ApiError::conflict(m),
            HaError::Refused(m) => ApiError::invalid(format!("the peer refused: {m}")),
            e @ (HaError::Unreachable(..) | HaError::Unpaired) => ApiError::internal(e.to_string()),
            HaError::Store(e) => ApiError::internal(e.to_string()),
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

// ---- SAP's API

async fn get_role(State(a): A) -> Json<Value> {
    Json(Value::String(a.ha.role().as_str().into()))
}

/// Body `"shadow"`, `{"haRole": "shadow"}` or plain text `shadow`.
async fn set_role(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Response> {
    let text = String::from_utf8_lossy(&body).trim().to_owned();
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    let wanted = match &v {
        Value::String(s) => s.clone(),
        Value::Object(o) => o.get("haRole").or_else(|| o.get("role")).and_then(Value::as_str).unwrap_or("").to_owned(),
        _ => String::new(),
    };
    let role = match wanted.to_ascii_lowercase().as_str() {
        "master" => Role::Master,
        "shadow" => Role::Shadow,
        _ => return Err(ApiError::invalid("the role must be \"master\" or \"shadow\"")),
    };
    if role == a.ha.role() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    match role {
        Role::Shadow => {
            let _g = a.ha.role_lock.lock().await;
            if a.ha.file().peer.is_some() {
                return Err(ApiError::conflict(
                    "a shadow is registered with this master: use a switch-over (ha/master/state SWITCH) or remove \
                     the shadow (DELETE ha/master/state) first",
                ));
            }
            a.instance.disconnect_all().await;
            a.ha.update_file(&a.store, |f| f.role = Role::Shadow).map_err(HaError::from)?;
        }
        Role::Master => {
            if a.ha.file().peer.is_some() {
                return Err(ApiError::conflict(
                    "this shadow is connected to a master: disconnect it first (DELETE ha/shadow/state)",
                ));
            }
            a.promote(true).await?;
        }
    }
    a.record(&u.0, "Configuration", "changed", "", &format!("haRole {}", role.as_str())).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_master_config(State(a): A) -> Json<MasterConfig> {
    Json(a.ha.file().master)
}

async fn put_master_config(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Json<MasterConfig>> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Body {
        ha_enabled: Option<bool>,
        ha_port: Option<u16>,
        allowed_shadow_host: Option<String>,
    }
    let b: Body = parse(&body)?;
    let f =
        a.ha.update_file(&a.store, |f| {
            if let Some(v) = b.ha_enabled {
                f.master.ha_enabled = v;
            }
            if b.ha_port.is_some() {
                f.master.ha_port = b.ha_port.filter(|p| *p != 0);
            }
            if let Some(v) = b.allowed_shadow_host {
                f.master.allowed_shadow_host = v.trim().to_owned();
            }
        })
        .map_err(HaError::from)?;
    a.record(&u.0, "Configuration", "changed", "", "HA master configuration").await;
    Ok(Json(f.master))
}

async fn get_master_state(State(a): A) -> Json<Value> {
    let f = a.ha.file();
    Json(json!({
        "state": if f.role == Role::Master { a.ha.master_state() } else { "ALONE" },
        "role": f.role.as_str(),
        "epoch": f.epoch,
        "shadowHost": f.peer.as_ref().filter(|_| f.role == Role::Master).map(|p| format!("{}:{}", p.host, p.port)),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpBody {
    op: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    password: Option<ferry_core::Secret<String>>,
    /// Ferry: the master's `ui-ca.pem`, to verify it on first contact (else trust on first use).
    #[serde(default, rename = "caCertificate")]
    ca_certificate: Option<String>,
}

async fn post_master_state(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Response> {
    let b: OpBody = parse(&body)?;
    let force = match b.op.as_str() {
        "SWITCH" => false,
        "FORCE_SWITCH" => true,
        _ => return Err(ApiError::invalid("op must be SWITCH or FORCE_SWITCH")),
    };
    a.switch(force).await?;
    a.record(&u.0, "Configuration", "changed", "", &format!("HA {}", b.op)).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Forgets the registered shadow; it has to connect again with the administrator's password.
async fn delete_master_state(State(a): A, Extension(u): Extension<Caller>) -> Result<Response> {
    if a.ha.role() != Role::Master {
        return Err(ApiError::conflict("this instance is not the master"));
    }
    a.ha.update_file(&a.store, |f| f.peer = None).map_err(HaError::from)?;
    a.ha.set_secret(None);
    a.ha.forget_shadow();
    a.start_role_task();
    a.record(&u.0, "Configuration", "changed", "", "HA shadow removed").await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_shadow_config(State(a): A) -> Json<ShadowConfig> {
    Json(a.ha.file().shadow)
}

async fn put_shadow_config(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Json<ShadowConfig>> {
    // A partial body changes only the fields it names.
    let patch: serde_json::Map<String, Value> = parse(&body)?;
    let mut merged = serde_json::to_value(a.ha.file().shadow).map_err(|e| ApiError::internal(e.to_string()))?;
    for (k, v) in patch {
        let Some(slot) = merged.get_mut(&k) else {
            return Err(ApiError::invalid(format!("unknown field {k}")));
        };
        *slot = v;
    }
    let next: ShadowConfig =
        serde_json::from_value(merged).map_err(|e| ApiError::invalid(format!("invalid shadow configuration: {e}")))?;
    next.validate().map_err(ApiError::invalid)?;
    let f = a.ha.update_file(&a.store, |f| f.shadow = next).map_err(HaError::from)?;
    a.record(&u.0, "Configuration", "changed", "", "HA shadow configuration").await;
    Ok(Json(f.shadow))
}

async fn get_shadow_state(State(a): A) -> Json<Value> {
    let f = a.ha.file();
    let state = if f.role == Role::Shadow { a.ha.shadow_state().as_str() } else { "INITIAL" };
    Json(json!({
        "state": state,
        "role": f.role.as_str(),
        "masterHost": f.shadow.master_host,
        "masterPort": f.shadow.master_port,
    }))
}

async fn post_shadow_state(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Response> {
    let b: OpBody = parse(&body)?;
    match b.op.as_str() {
        "CONNECT" => {
            let (Some(user), Some(password)) = (b.user, b.password) else {
                return Err(ApiError::invalid("CONNECT needs the master's administrator user and password"));
            };
            a.shadow_connect(&user, password.expose(), b.ca_certificate.as_deref()).await?;
            a.record(&u.0, "Configuration", "changed", "", "HA shadow connected").await;
        }
        "DISCONNECT" => {
            a.shadow_disconnect().await?;
            a.record(&u.0, "Configuration", "changed", "", "HA shadow disconnected").await;
        }
        _ => return Err(ApiError::invalid("op must be CONNECT or DISCONNECT")),
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_shadow_state(State(a): A, Extension(u): Extension<Caller>) -> Result<Response> {
    a.shadow_disconnect().await?;
    a.record(&u.0, "Configuration", "changed", "", "HA shadow disconnected").await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- peer paths (outside the administrator's authentication)

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

fn check_peer(a: &Admin, headers: &HeaderMap) -> Result<()> {
    match bearer(headers) {
        Some(t) if a.peer_authorized(t) => Ok(()),
        _ => Err(ApiError::new(StatusCode::UNAUTHORIZED, "FORBIDDEN_REQUEST", "HA peer authentication failed")),
    }
}

/// First contact of a shadow: the master's administrator logs it on.
async fn peer_register(State(a): A, headers: HeaderMap, body: Bytes) -> Result<Response> {
    let Some((user, password)) = basic(&headers) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "FORBIDDEN_REQUEST",
            "the master's administrator must log on",
        ));
    };
    match a.logon_roles(&user, &password).await {
        // Pairing changes the configuration: only an administrator may do it.
        Ok(roles) if roles.allow(&axum::http::Method::PUT, "/") => {}
        Ok(_) => return Err(ApiError::forbidden("only an administrator may pair a shadow")),
        Err(LogonFailure::Wrong) => {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "FORBIDDEN_REQUEST", "wrong user name or password"));
        }
        Err(LogonFailure::Locked) => {
            return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "FORBIDDEN_REQUEST", "too many failed logons"));
        }
        Err(LogonFailure::Unavailable(why)) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "RUNTIME_FAILURE",
                format!("cannot check the logon: {why}"),
            ));
        }
    }
    if a.state.lock().await.admin.initial_password {
        return Err(ApiError::forbidden("initial password must be changed"));
    }
    let req: RegisterRequest = parse(&body)?;
    let host = req.host.clone();
    let resp = a.register_shadow(req)?;
    a.record(&user, "Configuration", "changed", "", &format!("HA shadow {host} registered")).await;
    Ok(Json(resp).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SyncQuery {
    #[serde(default)]
    have: String,
    wait_ms: Option<u64>,
    interval_ms: Option<u64>,
}

/// The shadow's long poll: the configuration when its version differs from `have`, else 204
/// after at most `waitMs`. Each poll acknowledges `have` and counts as the shadow's heartbeat.
async fn peer_sync(State(a): A, headers: HeaderMap, Query(q): Query<SyncQuery>) -> Result<Response> {
    check_peer(&a, &headers)?;
    if a.ha.role() != Role::Master {
        return Err(ApiError::conflict("this instance is not the master"));
    }
    a.ha.shadow_polled(&q.have, q.interval_ms);
    let mut rx = a.ha.latest.subscribe();
    let current = rx.borrow_and_update().clone();
    if current.have != q.have {
        return Ok(Json(&*current).into_response());
    }
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(1000).min(60_000));
    let changed = tokio::time::timeout(wait, rx.changed()).await;
    if matches!(changed, Ok(Ok(()))) && a.ha.role() == Role::Master {
        let latest = rx.borrow().clone();
        return Ok(Json(&*latest).into_response());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn peer_role(State(a): A, headers: HeaderMap) -> Result<Json<RoleInfo>> {
    check_peer(&a, &headers)?;
    let f = a.ha.file();
    Ok(Json(RoleInfo { role: f.role, epoch: f.epoch, node: f.node }))
}

async fn peer_takeover(State(a): A, headers: HeaderMap, body: Bytes) -> Result<Response> {
    check_peer(&a, &headers)?;
    let req: TakeoverRequest = parse(&body)?;
    a.takeover_requested(req).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
