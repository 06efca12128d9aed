//! Route handlers: SAP's Cloud Connector REST paths and JSON shapes.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::store::{self, PpSettings, SccConfig, StoredMapping, StoredSubaccount};
use super::{Admin, ApiError, Caller, rules_of};
use crate::audit::AuditLevel;
use crate::{Resource, SystemMapping};

type A = State<Arc<Admin>>;
type Result<T> = std::result::Result<T, ApiError>;

const CONF: &str = "/api/v1/configuration";

pub(super) fn router(admin: Arc<Admin>) -> Router {
    let sub = "/api/v1/configuration/subaccounts/{region}/{sub}";
    let maps = format!("{sub}/systemMappings");
    Router::new()
        .route("/api/v1/connector/version", get(version))
        .route("/exposed", get(exposed))
        .route(&format!("{CONF}/connector"), get(get_connector).put(put_connector))
        .route(&format!("{CONF}/connector/authentication/basic"), put(change_password))
        .route(&format!("{CONF}/connector/auditLog"), get(get_audit).patch(patch_audit))
        .route(
            &format!("{CONF}/connector/auditLog/subaccounts/{{region}}/{{sub}}"),
            get(get_sub_audit).put(put_sub_audit).patch(put_sub_audit),
        )
        .route(&format!("{CONF}/connector/onPremises/ppSettings"), get(get_pp).put(put_pp).patch(patch_pp))
        .route(
            &format!("{CONF}/connector/onPremises/ppCaCertificate"),
            get(super::pp_ca::get_ca).put(super::pp_ca::put_ca),
        )
        .route(
            &format!("{CONF}/connector/onPremises/subjectPatternRules"),
            get(super::pp_ca::get_rules).put(super::pp_ca::put_rules),
        )
        .route(&format!("{CONF}/backup"), axum::routing::post(backup).put(restore))
        .route(&format!("{CONF}/subaccounts"), get(list_subaccounts).post(add_subaccount))
        .route(sub, get(get_subaccount).put(put_subaccount).delete(delete_subaccount))
        .route(&format!("{sub}/state"), put(put_state))
        .route(&format!("{sub}/validity"), axum::routing::post(renew_certificate))
        .route(&maps, get(list_mappings).post(add_mapping).delete(delete_mappings))
        .route(&format!("{maps}/{{mapping}}"), get(get_mapping).put(put_mapping).delete(delete_mapping))
        .route(
            &format!("{maps}/{{mapping}}/resources"),
            get(list_resources).post(add_resource).delete(delete_resources),
        )
        .route(
            &format!("{maps}/{{mapping}}/resources/{{resource}}"),
            get(get_resource).put(put_resource).delete(delete_resource),
        )
        .route("/api/monitoring/subaccounts", get(monitoring))
        .route(&format!("{CONF}/connector/authentication/ldap"), get(get_ldap).put(put_ldap))
        .merge(super::channels_api::routes())
        .fallback(|| async { ApiError::not_found("no such API") })
        .layer(axum::middleware::from_fn_with_state(admin.clone(), super::shadow_guard))
        .layer(axum::middleware::from_fn(super::authorize))
        .with_state(admin)
}

pub(super) fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

pub(super) fn created(location: String, body: Value) -> Response {
    let mut r = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn millis(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Admin {
    /// Applies `f` to a copy of the configuration, saves it, makes it current, and then lets
    /// `after` apply it to the running instance while changes stay serialised.
    async fn change<R>(&self, f: impl FnOnce(&mut SccConfig) -> Result<R>) -> Result<(R, SccConfig)> {
        let mut guard = self.state.lock().await;
        let mut next = guard.clone();
        let r = f(&mut next)?;
        self.persist(&next).await?;
        *guard = next.clone();
        Ok((r, next))
    }

    /// Pushes a subaccount's rules to its running connection.
    fn apply_rules(&self, cfg: &SccConfig, key: &(String, String)) {
        if let Some(s) = cfg.subaccount(&key.0, &key.1) {
            self.instance.set_rules(key, rules_of(s));
        }
    }
}

/// A subaccount connection made outside the API (e.g. by `ferry up`, which issues its own
/// connector certificate on every start).
#[derive(Debug)]
pub struct Enrollment {
    pub subaccount: String,
    pub location_id: String,
    /// Tunnel endpoint `host:port`: the region host.
    pub tunnel: String,
    pub server_name: String,
    pub ca: String,
    pub identity: ferry_core::tls::CertifiedKey,
}

impl Admin {
    /// Adds the connection for (subaccount, location), or refreshes the address and
    /// certificate of the one stored, keeping its mappings and settings; `seed` becomes the
    /// mappings of a new one. Connects it unless the administrator disconnected it.
    pub async fn ensure_subaccount(
        &self,
        e: Enrollment,
        seed: Vec<SystemMapping>,
        audit_level: AuditLevel,
    ) -> std::result::Result<(), super::AdminError> {
        let key_sealed = self.store.seal_key(&e.tunnel, &e.subaccount, e.identity.key_pem.expose())?;
        let mut guard = self.state.lock().await;
        let mut next = guard.clone();
        let existing =
            next.subaccounts.iter().position(|s| s.subaccount == e.subaccount && s.location_id == e.location_id);
        let entry = match existing {
            Some(i) => {
                let old = next.subaccounts[i].key();
                self.instance.disconnect(&old).await;
                &mut next.subaccounts[i]
            }
            None => {
                next.subaccounts.push(StoredSubaccount {
                    region_host: String::new(),
                    proxy_replicas: Vec::new(),
                    resolve_proxy_replicas: false,
                    subaccount: e.subaccount.clone(),
                    location_id: e.location_id.clone(),
                    display_name: String::new(),
                    description: String::new(),
                    connected: true,
                    audit_level,
                    server_name: String::new(),
                    ca: String::new(),
                    certificate: String::new(),
                    key_sealed: None,
                    key_pem: None,
                    system_mappings: seed
                        .into_iter()
                        .map(|mapping| StoredMapping { backend_type: None, mapping })
                        .collect(),
                    renewal_url: None,
                    service_channels: Vec::new(),
                });
                let last = next.subaccounts.len() - 1;
                &mut next.subaccounts[last]
            }
        };
        entry.region_host = e.tunnel;
        entry.server_name = e.server_name;
        entry.ca = e.ca;
        entry.certificate = e.identity.cert_pem;
        entry.key_sealed = Some(key_sealed);
        let entry = entry.clone();
        self.store.save(&next)?;
        self.replicate(&next).await;
        *guard = next.clone();
        if entry.connected {
            self.connect(&next, &entry).await.map_err(|e| super::AdminError::Connect(e.message))?;
        }
        Ok(())
    }
}

// ---- common

async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

#[derive(Deserialize)]
struct ExposedQuery {
    action: Option<String>,
}

/// Load balancer probes: a TCP balancer in front of master and shadow sends traffic to the
/// instance whose `ensureMasterRole` answers 200.
async fn exposed(State(a): A, Query(q): Query<ExposedQuery>) -> Response {
    let master = a.ha.role() == crate::ha::Role::Master;
    match q.action.as_deref() {
        Some("ping") => (StatusCode::OK, "pong").into_response(),
        Some("hasMasterRole") => (StatusCode::OK, if master { "true" } else { "false" }).into_response(),
        Some("ensureMasterRole") if master => StatusCode::OK.into_response(),
        Some("ensureMasterRole") => {
            ApiError::new(StatusCode::CONFLICT, "ILLEGAL_STATE", "this instance is not the master").into_response()
        }
        _ => ApiError::invalid("action must be ping, hasMasterRole or ensureMasterRole").into_response(),
    }
}

async fn get_connector(State(a): A) -> Json<Value> {
    let c = a.state.lock().await;
    Json(json!({"ha": a.ha.file().peer.is_some(), "description": c.description}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectorBody {
    description: Option<String>,
    ha: Option<bool>,
}

async fn put_connector(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Response> {
    let b: ConnectorBody = parse(&body)?;
    if b.ha == Some(true) {
        return Err(ApiError::invalid("high availability is not supported by Ferry's connector"));
    }
    a.change(|c| {
        if let Some(d) = b.description {
            c.description = d;
        }
        Ok(())
    })
    .await?;
    a.record(&u.0, "Configuration", "changed", "", "description").await;
    Ok(no_content())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PasswordBody {
    old_password: String,
    new_password: String,
}

async fn change_password(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Response> {
    let b: PasswordBody = parse(&body)?;
    if b.new_password.chars().count() < 8 {
        return Err(ApiError::invalid("the new password must have at least 8 characters"));
    }
    if b.new_password == b.old_password {
        return Err(ApiError::invalid("the new password must differ from the old one"));
    }
    let hash = a.state.lock().await.admin.password_hash.clone();
    let old = b.old_password;
    let ok = tokio::task::spawn_blocking(move || store::verify_password(&hash, &old)).await.unwrap_or(false);
    if !ok {
        return Err(ApiError::invalid("the old password is wrong"));
    }
    let new = b.new_password;
    let new_hash = tokio::task::spawn_blocking(move || store::hash_password(&new))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    a.change(|c| {
        c.admin.password_hash = new_hash;
        c.admin.initial_password = false;
        Ok(())
    })
    .await?;
    // Sessions opened with the old password end with it.
    a.end_sessions();
    a.record(&u.0, "SCCPassword", "changed", "", &u.0).await;
    Ok(no_content())
}

// ---- LDAP logon

async fn get_ldap(State(a): A) -> Result<Json<Value>> {
    let stored = super::ldap::load(&a.store).map_err(|e| ApiError::internal(e.to_string()))?;
    let settings = stored.map(|(s, _)| s).unwrap_or_default();
    Ok(Json(serde_json::to_value(settings).map_err(|e| ApiError::internal(e.to_string()))?))
}

/// Validates, stores and applies the LDAP settings; every session ends, as SAP's product
/// restarts here. Without `password`, the stored one is kept.
async fn put_ldap(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Response> {
    let mut b: super::LdapSettings = parse(&body)?;
    let stored = super::ldap::load(&a.store).map_err(|e| ApiError::internal(e.to_string()))?;
    let password = match (b.password.take(), stored) {
        (Some(p), _) => p,
        (None, Some((_, p))) => p,
        (None, None) => return Err(ApiError::invalid("password (of the connection user) is required")),
    };
    let logon = super::ldap::LdapLogon::new(&b, &password, a.config.ldap_ca_file.as_deref())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "INVALID_CONFIGURATION", e))?;
    super::ldap::save(&a.store, &b, &password).map_err(|e| ApiError::internal(e.to_string()))?;
    *a.ldap.write().unwrap_or_else(std::sync::PoisonError::into_inner) = b.enable.then(|| Arc::new(logon));
    a.end_sessions();
    a.record(&u.0, "LDAPConfiguration", if b.enable { "enabled" } else { "disabled" }, "", "LDAP logon").await;
    Ok(no_content())
}

// ---- audit

async fn get_audit(State(a): A) -> Json<Value> {
    let c = a.state.lock().await;
    Json(json!({"level": c.audit_level, "cleanup": 0}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LevelBody {
    level: AuditLevel,
    /// Accepted for SAP clients; Ferry keeps audit files until removed.
    #[serde(default, rename = "cleanup")]
    _cleanup: Option<u32>,
}

async fn patch_audit(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Response> {
    let b: LevelBody = parse(&body)?;
    // Recorded before the change, so that switching the log off is itself logged.
    a.record(&u.0, "CrossAuditLogLevel", "changed", "", &format!("{:?}", b.level).to_uppercase()).await;
    a.change(|c| {
        c.audit_level = b.level;
        Ok(())
    })
    .await?;
    a.audit.set_level(b.level);
    Ok(no_content())
}

async fn get_sub_audit(State(a): A, Path((region, sub)): Path<(String, String)>) -> Result<Json<Value>> {
    let c = a.state.lock().await;
    let s = c.subaccount(&region, &sub).ok_or_else(|| no_subaccount(&region, &sub))?;
    Ok(Json(json!({"level": s.audit_level})))
}

async fn put_sub_audit(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response> {
    let b: LevelBody = parse(&body)?;
    a.change(|c| {
        c.subaccount_mut(&region, &sub).ok_or_else(|| no_subaccount(&region, &sub))?.audit_level = b.level;
        Ok(())
    })
    .await?;
    a.instance.set_audit_level(&(region, sub.clone()), b.level);
    a.record(&u.0, "AuditLogLevel", "changed", &sub, &format!("{:?}", b.level).to_uppercase()).await;
    Ok(no_content())
}

// ---- principal propagation settings

async fn get_pp(State(a): A) -> Json<PpSettings> {
    Json(a.state.lock().await.pp_settings)
}

fn check_pp(p: &PpSettings) -> Result<()> {
    if !(1..=336).contains(&p.expiration_tolerance_in_hr) {
        return Err(ApiError::invalid("expirationToleranceInHr must be between 1 and 336"));
    }
    if !(1..=43200).contains(&p.certificate_validity_in_min) {
        return Err(ApiError::invalid("certificateValidityInMin must be between 1 and 43200"));
    }
    Ok(())
}

async fn set_pp(a: &Admin, user: &str, p: PpSettings) -> Result<Response> {
    check_pp(&p)?;
    let (_, cfg) = a
        .change(|c| {
            c.pp_settings = p;
            Ok(())
        })
        .await?;
    for s in &cfg.subaccounts {
        a.instance.set_principal_propagation(&s.key(), a.principal(&cfg));
    }
    a.record(user, "PrincipalPropagationConfiguration", "changed", "", "ppSettings").await;
    Ok(no_content())
}

async fn put_pp(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Response> {
    set_pp(&a, &u.0, parse(&body)?).await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PpPatch {
    expiration_tolerance_in_hr: Option<u32>,
    certificate_validity_in_min: Option<u32>,
}

async fn patch_pp(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Response> {
    let b: PpPatch = parse(&body)?;
    let mut p = a.state.lock().await.pp_settings;
    if let Some(v) = b.expiration_tolerance_in_hr {
        p.expiration_tolerance_in_hr = v;
    }
    if let Some(v) = b.certificate_validity_in_min {
        p.certificate_validity_in_min = v;
    }
    set_pp(&a, &u.0, p).await
}

// ---- backup / restore

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupBody {
    password: String,
}

async fn backup(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Response> {
    let b: BackupBody = parse(&body)?;
    let mut cfg = a.state.lock().await.clone();
    // Keys travel in clear inside the encrypted backup: the data folder's key stays home.
    for s in &mut cfg.subaccounts {
        s.key_pem = Some(a.store.open_key(s).map_err(|e| ApiError::internal(e.to_string()))?);
        s.key_sealed = None;
    }
    let bytes = tokio::task::spawn_blocking(move || store::encrypt_backup(&cfg, &b.password))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    a.record(&u.0, "Configuration", "backup", "", "backup").await;
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"scc-backup.bin\""),
        ],
        bytes,
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreBody {
    password: String,
    /// The backup file, base64.
    backup: String,
}

async fn restore(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Response> {
    let b: RestoreBody = parse(&body)?;
    let bytes =
        B64.decode(b.backup.trim()).map_err(|_| ApiError::invalid("backup must be the backup file in base64"))?;
    let mut restored = tokio::task::spawn_blocking(move || store::decrypt_backup(&bytes, &b.password))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    for s in &mut restored.subaccounts {
        let key = s.key_pem.take().ok_or_else(|| ApiError::invalid("the backup lacks a connection key"))?;
        s.key_sealed = Some(
            a.store
                .seal_key(&s.region_host, &s.subaccount, key.expose())
                .map_err(|e| ApiError::internal(e.to_string()))?,
        );
    }
    a.record(&u.0, "Configuration", "restored", "", "backup").await;
    let mut guard = a.state.lock().await;
    // Who may log on is not part of a restore: the current administrator keeps access.
    restored.admin = guard.admin.clone();
    a.persist(&restored).await?;
    *guard = restored.clone();
    a.instance.disconnect_all().await;
    a.audit.set_level(restored.audit_level);
    let mut failed = Vec::new();
    for s in restored.subaccounts.iter().filter(|s| s.connected) {
        if let Err(e) = a.connect(&restored, s).await {
            failed.push(format!("{}: {}", s.subaccount, e.message));
        }
    }
    drop(guard);
    if !failed.is_empty() {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "RUNTIME_FAILURE",
            format!("configuration restored, but some subaccounts did not connect: {}", failed.join("; ")),
        ));
    }
    Ok(no_content())
}

// ---- subaccounts

fn no_subaccount(region: &str, sub: &str) -> ApiError {
    ApiError::not_found(format!("no subaccount {sub} at region host {region}"))
}

fn sub_location(s: &StoredSubaccount) -> String {
    format!("{CONF}/subaccounts/{}/{}", s.region_host, s.subaccount)
}

fn tunnel_json(a: &Admin, s: &StoredSubaccount) -> Value {
    match a.instance.state(&s.key()) {
        Some(st) => json!({
            "state": if st.status.connected > 0 { "Connected" } else { "ConnectFailure" },
            "connectedSinceTimeStamp": st.connected_since.map(millis).unwrap_or(0),
            "lastHeartbeatTimeStamp": st.last_heartbeat.map(millis).unwrap_or(0),
            "connections": st.status.connected,
            "proxyReplicas": a.instance.replicas(&s.key()).iter()
                .map(|r| json!({"address": r.address, "connections": r.connected}))
                .collect::<Vec<_>>(),
        }),
        None => json!({
            "state": "Disconnected",
            "connectedSinceTimeStamp": 0,
            "lastHeartbeatTimeStamp": 0,
            "connections": 0,
        }),
    }
}

fn sub_json(a: &Admin, s: &StoredSubaccount) -> Value {
    let validity = ferry_core::tls::parse_certs(&s.certificate)
        .ok()
        .and_then(|c| c.first().and_then(|c| ferry_core::tls::validity_of(c)))
        .unwrap_or_default();
    json!({
        "regionHost": s.region_host,
        "subaccount": s.subaccount,
        "locationID": s.location_id,
        "proxyReplicas": s.proxy_replicas,
        "resolveProxyReplicas": s.resolve_proxy_replicas,
        "displayName": s.display_name,
        "description": s.description,
        "autoCertRenewal": s.renewal_url.is_some(),
        "subaccountCertificate": {"validFrom": validity.0 * 1000, "validTo": validity.1 * 1000},
        "tunnel": tunnel_json(a, s),
        "_links": {"self": {"href": sub_location(s)}},
    })
}

async fn list_subaccounts(State(a): A) -> Json<Value> {
    let c = a.state.lock().await;
    Json(Value::Array(c.subaccounts.iter().map(|s| sub_json(&a, s)).collect()))
}

async fn get_subaccount(State(a): A, Path((region, sub)): Path<(String, String)>) -> Result<Json<Value>> {
    let c = a.state.lock().await;
    let s = c.subaccount(&region, &sub).ok_or_else(|| no_subaccount(&region, &sub))?;
    Ok(Json(sub_json(&a, s)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NewSubaccount {
    region_host: Option<String>,
    subaccount: Option<String>,
    #[serde(rename = "locationID")]
    location_id: Option<String>,
    /// Ferry: see [`StoredSubaccount::proxy_replicas`].
    proxy_replicas: Option<Vec<String>>,
    resolve_proxy_replicas: Option<bool>,
    display_name: Option<String>,
    description: Option<String>,
    authentication_data: Option<Value>,
    cloud_user: Option<String>,
    cloud_password: Option<ferry_core::Secret<String>>,
    /// Accepted for SAP clients; Ferry's certificates come from enrollment.
    #[serde(rename = "autoCertRenewal")]
    _auto_cert_renewal: Option<bool>,
    #[serde(rename = "isManaged")]
    _is_managed: Option<bool>,
}

/// Ferry's "authentication data": what `POST /ferry/admin/v1/subaccounts/{id}/connectors`
/// (and `ferry connector enroll`) returns.
#[derive(Deserialize)]
struct AuthenticationData {
    subaccount: String,
    #[serde(default)]
    location_id: String,
    certificate: String,
    key: ferry_core::Secret<String>,
    ca: String,
    tunnel: String,
    /// The directory's renewal endpoint (absent in authentication data of older enrollments).
    #[serde(default)]
    renewal: Option<String>,
}

fn authentication_data(v: Value) -> Result<AuthenticationData> {
    let bad = |why: &str| {
        ApiError::invalid(format!(
            "authenticationData {why}; pass the JSON from `ferry connector enroll` (as an object, a string or base64)"
        ))
    };
    let v = match v {
        Value::String(s) => {
            let s = s.trim();
            let text = if s.starts_with('{') {
                s.to_owned()
            } else {
                let bytes = B64.decode(s).map_err(|_| bad("is neither JSON nor base64"))?;
                String::from_utf8(bytes).map_err(|_| bad("is not UTF-8"))?
            };
            serde_json::from_str(&text).map_err(|_| bad("is not JSON"))?
        }
        v => v,
    };
    serde_json::from_value(v).map_err(|e| bad(&format!("is incomplete ({e})")))
}

/// `proxyReplicas` as given, each checked to be a `host:port`.
fn proxy_replicas(list: Vec<String>) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for r in list {
        let r = r.trim().to_owned();
        if host_of(&r).is_none() {
            return Err(ApiError::invalid(format!(
                "proxyReplicas entry {r:?} must be a proxy tunnel endpoint host:port, e.g. \"10.0.0.7:20005\""
            )));
        }
        if !out.contains(&r) {
            out.push(r);
        }
    }
    Ok(out)
}

/// `host` of `host:port` (IPv6 in brackets allowed).
fn host_of(addr: &str) -> Option<&str> {
    let (host, port) = addr.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

impl Admin {
    /// SAP's onboarding with the subaccount user: a new key and CSR, sent with the user's
    /// credentials to the directory at `region` (the Ferry token service's HTTPS `host:port`),
    /// which signs it for the subaccount and location. The credentials are used for this one
    /// call and never stored; the key never leaves the connector.
    async fn onboard(
        &self,
        region: &str,
        subaccount: &str,
        location: &str,
        user: &str,
        password: &ferry_core::Secret<String>,
    ) -> Result<AuthenticationData> {
        let http = ferry_core::tls::http_client(self.config.region_ca_pem.as_deref())
            .map_err(|e| ApiError::internal(format!("TLS towards the region host: {e}")))?;
        let (csr, key) = ferry_core::tls::connector_csr(subaccount, location)
            .map_err(|e| ApiError::internal(format!("cannot make a key and CSR: {e}")))?;
        let sub_path: String =
            percent_encoding::utf8_percent_encode(subaccount, percent_encoding::NON_ALPHANUMERIC).collect();
        let url = format!("https://{region}/ferry/admin/v1/subaccounts/{sub_path}/connectors/csr");
        let r = http
            .post(&url)
            .basic_auth(user, Some(password.expose()))
            .timeout(std::time::Duration::from_secs(30))
            .json(&json!({ "csr": csr, "location_id": location }))
            .send()
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "RUNTIME_FAILURE",
                    format!("cannot reach the region host {region} to sign the connection certificate: {e}"),
                )
            })?;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        let why = v["message"].as_str().unwrap_or("no reason given").to_owned();
        match status.as_u16() {
            200 | 201 => {}
            401 => return Err(ApiError::invalid(format!("the region host refused the subaccount user: {why}"))),
            403 => return Err(ApiError::forbidden(format!("the subaccount user may not connect connectors: {why}"))),
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "RUNTIME_FAILURE",
                    format!("the region host answered {status}: {why}"),
                ));
            }
        }
        let field = |k: &str| {
            v[k].as_str().map(str::to_owned).ok_or_else(|| {
                ApiError::new(StatusCode::BAD_GATEWAY, "RUNTIME_FAILURE", format!("the region host's answer lacks {k}"))
            })
        };
        Ok(AuthenticationData {
            subaccount: subaccount.to_owned(),
            location_id: location.to_owned(),
            certificate: field("certificate")?,
            key,
            ca: field("ca")?,
            tunnel: field("tunnel")?,
            renewal: v["renewal"].as_str().map(str::to_owned),
        })
    }
}

async fn add_subaccount(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Response> {
    let b: NewSubaccount = parse(&body)?;
    let (d, region) = match (b.authentication_data, b.cloud_user, b.cloud_password) {
        (Some(data), None, None) => {
            let d = authentication_data(data)?;
            let region = b.region_host.clone().unwrap_or_else(|| d.tunnel.clone());
            (d, region)
        }
        (None, Some(user), Some(password)) => {
            let why = "with cloudUser and cloudPassword, regionHost (the Ferry token service's HTTPS host:port) and \
                       subaccount are required";
            let region =
                b.region_host.clone().filter(|r| host_of(r).is_some()).ok_or_else(|| ApiError::invalid(why))?;
            let sub = b.subaccount.clone().filter(|s| !s.is_empty()).ok_or_else(|| ApiError::invalid(why))?;
            let location = b.location_id.clone().unwrap_or_default();
            let d = a.onboard(&region, &sub, &location, &user, &password).await?;
            // The connection is keyed and dialled by the tunnel endpoint the region named.
            let tunnel = d.tunnel.clone();
            (d, tunnel)
        }
        (None, None, None) => {
            return Err(ApiError::invalid(
                "authenticationData (from ferry connector enroll), or cloudUser and cloudPassword, is required",
            ));
        }
        _ => {
            return Err(ApiError::invalid(
                "pass either authenticationData or cloudUser with cloudPassword (both of them), not a mix",
            ));
        }
    };
    if b.subaccount.as_deref().is_some_and(|s| s != d.subaccount) {
        return Err(ApiError::invalid("subaccount differs from the one in the authentication data"));
    }
    if b.location_id.as_deref().is_some_and(|l| l != d.location_id) {
        return Err(ApiError::invalid("locationID differs from the one in the authentication data"));
    }
    let certs = ferry_core::tls::parse_certs(&d.certificate)
        .map_err(|e| ApiError::invalid(format!("authenticationData certificate: {e}")))?;
    let identity = certs.first().and_then(|c| ferry_core::tls::connector_identity(c));
    if identity.as_ref() != Some(&(d.subaccount.clone(), d.location_id.clone())) {
        return Err(ApiError::invalid(
            "the certificate in the authentication data is not for this subaccount and location",
        ));
    }
    ferry_core::tls::parse_key(d.key.expose())
        .map_err(|e| ApiError::invalid(format!("authenticationData key: {e}")))?;
    let replicas = proxy_replicas(b.proxy_replicas.unwrap_or_default())?;
    let server_name = host_of(&region)
        .ok_or_else(|| ApiError::invalid(format!("regionHost {region:?} must be the tunnel endpoint host:port")))?
        .to_owned();
    let key_sealed =
        a.store.seal_key(&region, &d.subaccount, d.key.expose()).map_err(|e| ApiError::internal(e.to_string()))?;
    let new = StoredSubaccount {
        region_host: region,
        proxy_replicas: replicas,
        resolve_proxy_replicas: b.resolve_proxy_replicas.unwrap_or(false),
        subaccount: d.subaccount,
        location_id: d.location_id,
        display_name: b.display_name.unwrap_or_default(),
        description: b.description.unwrap_or_default(),
        connected: true,
        audit_level: AuditLevel::default(),
        server_name,
        ca: d.ca,
        certificate: d.certificate,
        key_sealed: Some(key_sealed),
        key_pem: None,
        system_mappings: Vec::new(),
        renewal_url: d.renewal,
        service_channels: Vec::new(),
    };
    let mut guard = a.state.lock().await;
    if guard.subaccount(&new.region_host, &new.subaccount).is_some() {
        return Err(ApiError::conflict(format!("subaccount {} at {} exists already", new.subaccount, new.region_host)));
    }
    let mut next = guard.clone();
    next.subaccounts.push(new.clone());
    // Connect before saving: a connection that cannot even be set up is not stored.
    a.connect(&next, &new).await?;
    a.persist(&next).await?;
    *guard = next;
    drop(guard);
    a.record(&u.0, "Account", "created", &new.subaccount, &new.region_host).await;
    Ok(created(sub_location(&new), sub_json(&a, &new)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SubaccountUpdate {
    display_name: Option<String>,
    description: Option<String>,
    #[serde(rename = "locationID")]
    location_id: Option<String>,
    proxy_replicas: Option<Vec<String>>,
    resolve_proxy_replicas: Option<bool>,
}

async fn put_subaccount(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>> {
    let b: SubaccountUpdate = parse(&body)?;
    let replicas = b.proxy_replicas.map(proxy_replicas).transpose()?;
    let (s, cfg) = a
        .change(|c| {
            let s = c.subaccount_mut(&region, &sub).ok_or_else(|| no_subaccount(&region, &sub))?;
            if b.location_id.as_ref().is_some_and(|l| *l != s.location_id) {
                return Err(ApiError::invalid(
                    "the location ID is part of the connection certificate; add the subaccount again with new authentication data",
                ));
            }
            if let Some(v) = b.display_name {
                s.display_name = v;
            }
            if let Some(v) = b.description {
                s.description = v;
            }
            let dialled = (s.proxy_replicas.clone(), s.resolve_proxy_replicas);
            if let Some(v) = replicas {
                s.proxy_replicas = v;
            }
            if let Some(v) = b.resolve_proxy_replicas {
                s.resolve_proxy_replicas = v;
            }
            Ok((s.clone(), dialled != (s.proxy_replicas.clone(), s.resolve_proxy_replicas)))
        })
        .await?;
    let (s, redial) = s;
    // Other replicas to dial: the connection restarts with them (its tunnels drain first).
    if redial && a.instance.is_running(&s.key()) {
        a.connect(&cfg, &s).await?;
    }
    a.record(&u.0, "Account", "changed", &sub, &region).await;
    Ok(Json(sub_json(&a, &s)))
}

async fn delete_subaccount(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub)): Path<(String, String)>,
) -> Result<Response> {
    a.change(|c| {
        let before = c.subaccounts.len();
        c.subaccounts.retain(|s| !(s.region_host == region && s.subaccount == sub));
        if c.subaccounts.len() == before { Err(no_subaccount(&region, &sub)) } else { Ok(()) }
    })
    .await?;
    a.instance.disconnect(&(region.clone(), sub.clone())).await;
    a.record(&u.0, "Account", "deleted", &sub, &region).await;
    Ok(no_content())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateBody {
    connected: bool,
}

async fn put_state(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>> {
    let b: StateBody = parse(&body)?;
    let mut guard = a.state.lock().await;
    let mut next = guard.clone();
    let s = next.subaccount_mut(&region, &sub).ok_or_else(|| no_subaccount(&region, &sub))?;
    s.connected = b.connected;
    let s = s.clone();
    if b.connected {
        if !a.instance.is_running(&s.key()) {
            a.connect(&next, &s).await?;
        }
    } else {
        a.instance.disconnect(&s.key()).await;
    }
    a.persist(&next).await?;
    *guard = next;
    drop(guard);
    a.record(&u.0, "Account", if b.connected { "connected" } else { "disconnected" }, &sub, &region).await;
    Ok(Json(sub_json(&a, &s)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ValidityBody {
    authentication_data: Option<Value>,
    user: Option<String>,
    password: Option<ferry_core::Secret<String>>,
}

/// SAP's renewal of the subaccount certificate: with fresh authentication data (`ferry
/// connector enroll` for the same subaccount and location), the connection switches to the new
/// certificate without dropping traffic — new tunnels first, then the old ones drain.
async fn renew_certificate(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>> {
    let b: ValidityBody = parse(&body)?;
    let Some(data) = b.authentication_data else {
        return Err(ApiError::invalid(if b.user.is_some() || b.password.is_some() {
            "renewal with user/password is not supported by Ferry; pass fresh authenticationData (ferry connector enroll)"
        } else {
            "authenticationData is required"
        }));
    };
    let d = authentication_data(data)?;
    let s = a.swap_certificate(&region, &sub, d).await?;
    a.record(&u.0, "Account", "certificate renewed", &sub, &region).await;
    Ok(Json(sub_json(&a, &s)))
}

impl Admin {
    /// Replaces a connection's certificate and key (checked usable first, by the running
    /// connection without dropping it), and stores them sealed.
    async fn swap_certificate(&self, region: &str, sub: &str, d: AuthenticationData) -> Result<StoredSubaccount> {
        let a = self;
        let mut guard = a.state.lock().await;
        let mut next = guard.clone();
        let s = next.subaccount_mut(region, sub).ok_or_else(|| no_subaccount(region, sub))?;
        if d.subaccount != s.subaccount || d.location_id != s.location_id {
            return Err(ApiError::invalid(format!(
                "the authentication data is for subaccount {} location {:?}; this connection is subaccount {} location {:?}",
                d.subaccount, d.location_id, s.subaccount, s.location_id
            )));
        }
        let identity = ferry_core::tls::CertifiedKey { cert_pem: d.certificate.clone(), key_pem: d.key.clone() };
        // The certificate must be usable before it is stored: checked by the running connection,
        // or by building a client configuration when it does not run.
        let running = a
            .instance
            .set_identity(&s.key(), &identity)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "INVALID_CONFIGURATION", e.to_string()))?;
        if !running {
            ferry_core::tls::client_config(&s.ca, Some(&identity), &[ferry_proto::tunnel::ALPN])
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "INVALID_CONFIGURATION", e.to_string()))?;
        }
        s.key_sealed = Some(
            a.store
                .seal_key(&s.region_host, &s.subaccount, d.key.expose())
                .map_err(|e| ApiError::internal(e.to_string()))?,
        );
        s.certificate = d.certificate;
        if d.renewal.is_some() {
            s.renewal_url = d.renewal;
        }
        let s = s.clone();
        a.persist(&next).await?;
        *guard = next;
        Ok(s)
    }

    /// Renews a connection's certificate at the directory's renewal endpoint: a new key and CSR,
    /// sent over mTLS with the current certificate, and the answer swapped in as by
    /// `POST .../validity`.
    pub(crate) async fn renew_with_directory(
        &self,
        s: &StoredSubaccount,
        url: &str,
    ) -> std::result::Result<(), String> {
        let key = self.store.open_key(s).map_err(|e| e.to_string())?;
        let current = ferry_core::tls::CertifiedKey { cert_pem: s.certificate.clone(), key_pem: key };
        let tls = ferry_core::tls::client_config(&s.ca, Some(&current), &[b"http/1.1"]).map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .tcp_nodelay(true)
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?;
        let (csr, new_key) =
            ferry_core::tls::connector_csr(&s.subaccount, &s.location_id).map_err(|e| e.to_string())?;
        let r = client.post(url).json(&json!({ "csr": csr })).send().await.map_err(|e| e.to_string())?;
        let status = r.status();
        let v: Value = r.json().await.map_err(|e| format!("{status}: {e}"))?;
        let Some(cert) = v["certificate"].as_str().filter(|_| status.is_success()) else {
            return Err(format!("{status}: {}", v["message"].as_str().unwrap_or("no certificate in the answer")));
        };
        let d = AuthenticationData {
            subaccount: s.subaccount.clone(),
            location_id: s.location_id.clone(),
            certificate: cert.to_owned(),
            key: new_key,
            ca: s.ca.clone(),
            tunnel: s.region_host.clone(),
            renewal: None,
        };
        self.swap_certificate(&s.region_host, &s.subaccount, d).await.map_err(|e| e.message)?;
        self.record("Cloud Connector", "Account", "certificate renewed automatically", &s.subaccount, &s.region_host)
            .await;
        Ok(())
    }
}

async fn monitoring(State(a): A) -> Json<Value> {
    let c = a.state.lock().await;
    let subs: Vec<Value> = c
        .subaccounts
        .iter()
        .map(|s| {
            json!({
                "regionHost": s.region_host,
                "subaccount": s.subaccount,
                "displayName": s.display_name,
                "description": s.description,
                "locationID": s.location_id,
                "tunnel": tunnel_json(&a, s),
            })
        })
        .collect();
    Json(json!({"subaccounts": subs, "version": env!("CARGO_PKG_VERSION")}))
}

// ---- system mappings

/// `<virtualHost>:<virtualPort>` from the URL.
fn mapping_id(id: &str) -> Result<(String, u16)> {
    let (h, p) = id
        .rsplit_once(':')
        .ok_or_else(|| ApiError::invalid("a system mapping is addressed as <virtualHost>:<virtualPort>"))?;
    let p = p.parse().map_err(|_| ApiError::invalid(format!("invalid virtual port {p:?}")))?;
    Ok((h.to_owned(), p))
}

fn mapping_json(m: &StoredMapping) -> Value {
    let mut v = serde_json::to_value(&m.mapping).unwrap_or_default();
    if let Value::Object(o) = &mut v {
        o.remove("resources");
        if let Some(t) = &m.backend_type {
            o.insert("backendType".into(), json!(t));
        }
        o.insert("totalResourcesCount".into(), json!(m.mapping.resources.len()));
        o.insert("enabledResourcesCount".into(), json!(m.mapping.resources.iter().filter(|r| r.enabled).count()));
    }
    v
}

/// A mapping from SAP's JSON: `backendType` kept aside, read-only counters ignored.
fn mapping_from(mut v: Value) -> Result<StoredMapping> {
    let Value::Object(o) = &mut v else { return Err(ApiError::invalid("a system mapping must be a JSON object")) };
    let backend_type = match o.remove("backendType") {
        Some(Value::String(s)) => Some(s),
        None | Some(Value::Null) => None,
        Some(_) => return Err(ApiError::invalid("backendType must be a string")),
    };
    for k in ["totalResourcesCount", "enabledResourcesCount", "_links"] {
        o.remove(k);
    }
    // As for resources posted on their own: a missing `enabled` means false in SAP's API.
    if let Some(Value::Array(rs)) = o.get_mut("resources") {
        for r in rs.iter_mut() {
            if let Value::Object(r) = r {
                r.entry("enabled").or_insert(json!(false));
            }
        }
    }
    let mapping: SystemMapping =
        serde_json::from_value(v).map_err(|e| ApiError::invalid(format!("invalid system mapping: {e}")))?;
    check_mapping(&mapping)?;
    Ok(StoredMapping { backend_type, mapping })
}

fn check_mapping(m: &SystemMapping) -> Result<()> {
    let host_ok = |h: &str| {
        !h.is_empty() && h.len() <= 255 && h.chars().all(|c| c.is_ascii_alphanumeric() || ".-[]:".contains(c))
    };
    if !host_ok(&m.virtual_host) {
        return Err(ApiError::invalid("virtualHost must be a host name (letters, digits, '.', '-')"));
    }
    if !host_ok(&m.local_host) {
        return Err(ApiError::invalid("localHost must be a host name or IP address"));
    }
    if m.virtual_port == 0 || m.local_port == 0 {
        return Err(ApiError::invalid("virtualPort and localPort must be between 1 and 65535"));
    }
    if !m.protocol.is_http() && !m.resources.is_empty() {
        return Err(ApiError::invalid("only HTTP and HTTPS mappings have resources"));
    }
    for r in &m.resources {
        check_resource(r)?;
    }
    Ok(())
}

fn find_mapping<'a>(c: &'a mut SccConfig, region: &str, sub: &str, id: &str) -> Result<&'a mut StoredMapping> {
    let (h, p) = mapping_id(id)?;
    let s = c.subaccount_mut(region, sub).ok_or_else(|| no_subaccount(region, sub))?;
    s.system_mappings
        .iter_mut()
        .find(|m| m.mapping.virtual_port == p && m.mapping.virtual_host.eq_ignore_ascii_case(&h))
        .ok_or_else(|| ApiError::not_found(format!("no system mapping {id}")))
}

async fn list_mappings(State(a): A, Path((region, sub)): Path<(String, String)>) -> Result<Json<Value>> {
    let c = a.state.lock().await;
    let s = c.subaccount(&region, &sub).ok_or_else(|| no_subaccount(&region, &sub))?;
    Ok(Json(Value::Array(s.system_mappings.iter().map(mapping_json).collect())))
}

async fn get_mapping(State(a): A, Path((region, sub, id)): Path<(String, String, String)>) -> Result<Json<Value>> {
    let mut c = a.state.lock().await.clone();
    Ok(Json(mapping_json(find_mapping(&mut c, &region, &sub, &id)?)))
}

async fn add_mapping(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response> {
    let m = mapping_from(parse(&body)?)?;
    let id = format!("{}:{}", m.mapping.virtual_host, m.mapping.virtual_port);
    let (_, cfg) = a
        .change(|c| {
            let s = c.subaccount_mut(&region, &sub).ok_or_else(|| no_subaccount(&region, &sub))?;
            if s.system_mappings.iter().any(|x| {
                x.mapping.virtual_port == m.mapping.virtual_port
                    && x.mapping.virtual_host.eq_ignore_ascii_case(&m.mapping.virtual_host)
            }) {
                return Err(ApiError::conflict(format!("a system mapping for {id} exists already")));
            }
            s.system_mappings.push(m.clone());
            Ok(())
        })
        .await?;
    a.apply_rules(&cfg, &(region.clone(), sub.clone()));
    a.record(&u.0, "BackendMapping", "created", &sub, &id).await;
    Ok(created(format!("{CONF}/subaccounts/{region}/{sub}/systemMappings/{id}"), mapping_json(&m)))
}

async fn put_mapping(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub, id)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Json<Value>> {
    let Value::Object(patch) = parse::<Value>(&body)? else {
        return Err(ApiError::invalid("a system mapping must be a JSON object"));
    };
    let (m, cfg) = a
        .change(|c| {
            let current = find_mapping(c, &region, &sub, &id)?;
            let mut merged = serde_json::to_value(&current.mapping).unwrap_or_default();
            if let (Value::Object(o), Some(t)) = (&mut merged, &current.backend_type) {
                o.insert("backendType".into(), json!(t));
            }
            if let Value::Object(o) = &mut merged {
                for (k, v) in patch {
                    if (k == "virtualHost" || k == "virtualPort") && o.get(&k) != Some(&v) {
                        // SAP's rule: the virtual address is the mapping's identity.
                        if k == "virtualPort"
                            || !v.as_str().is_some_and(|h| h.eq_ignore_ascii_case(o[&k].as_str().unwrap_or("")))
                        {
                            return Err(ApiError::invalid(
                                "virtualHost and virtualPort cannot be changed; delete the mapping and add a new one",
                            ));
                        }
                        continue;
                    }
                    o.insert(k, v);
                }
            }
            let next = mapping_from(merged)?;
            *current = next.clone();
            Ok(next)
        })
        .await?;
    a.apply_rules(&cfg, &(region.clone(), sub.clone()));
    a.record(&u.0, "BackendMapping", "changed", &sub, &id).await;
    Ok(Json(mapping_json(&m)))
}

async fn delete_mapping(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub, id)): Path<(String, String, String)>,
) -> Result<Response> {
    let (h, p) = mapping_id(&id)?;
    let (_, cfg) = a
        .change(|c| {
            let s = c.subaccount_mut(&region, &sub).ok_or_else(|| no_subaccount(&region, &sub))?;
            let before = s.system_mappings.len();
            s.system_mappings
                .retain(|m| !(m.mapping.virtual_port == p && m.mapping.virtual_host.eq_ignore_ascii_case(&h)));
            if s.system_mappings.len() == before {
                Err(ApiError::not_found(format!("no system mapping {id}")))
            } else {
                Ok(())
            }
        })
        .await?;
    a.apply_rules(&cfg, &(region.clone(), sub.clone()));
    a.record(&u.0, "BackendMapping", "deleted", &sub, &id).await;
    Ok(no_content())
}

async fn delete_mappings(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub)): Path<(String, String)>,
) -> Result<Response> {
    let (_, cfg) = a
        .change(|c| {
            c.subaccount_mut(&region, &sub).ok_or_else(|| no_subaccount(&region, &sub))?.system_mappings.clear();
            Ok(())
        })
        .await?;
    a.apply_rules(&cfg, &(region.clone(), sub.clone()));
    a.record(&u.0, "BackendMapping", "deleted", &sub, "all").await;
    Ok(no_content())
}

// ---- resources

/// SAP's resource id in URLs: `+` as `+2B`, `-` as `+2D`, `/` as `-`.
pub(crate) fn decode_resource_id(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '-' => out.push('/'),
            '+' => match (chars.next(), chars.next()) {
                (Some('2'), Some('B' | 'b')) => out.push('+'),
                (Some('2'), Some('D' | 'd')) => out.push('-'),
                _ => return None,
            },
            c => out.push(c),
        }
    }
    Some(out)
}

pub(crate) fn encode_resource_id(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '+' => out.push_str("+2B"),
            '-' => out.push_str("+2D"),
            '/' => out.push('-'),
            c => out.push(c),
        }
    }
    out
}

fn check_resource(r: &Resource) -> Result<()> {
    if !r.path.starts_with('/') || r.path.chars().any(char::is_control) {
        return Err(ApiError::invalid("a resource id is a URL path starting with '/'"));
    }
    Ok(())
}

/// A resource from SAP's JSON, where a missing flag means `false` (also `enabled`).
fn resource_from(mut v: Value) -> Result<Resource> {
    let Value::Object(o) = &mut v else { return Err(ApiError::invalid("a resource must be a JSON object")) };
    o.entry("enabled").or_insert(json!(false));
    o.remove("_links");
    let r: Resource = serde_json::from_value(v).map_err(|e| ApiError::invalid(format!("invalid resource: {e}")))?;
    check_resource(&r)?;
    Ok(r)
}

async fn list_resources(State(a): A, Path((region, sub, id)): Path<(String, String, String)>) -> Result<Json<Value>> {
    let mut c = a.state.lock().await.clone();
    let m = find_mapping(&mut c, &region, &sub, &id)?;
    Ok(Json(serde_json::to_value(&m.mapping.resources).unwrap_or_default()))
}

fn resource_path(encoded: &str) -> Result<String> {
    decode_resource_id(encoded)
        .ok_or_else(|| ApiError::invalid("invalid resource id encoding (+2B for '+', +2D for '-', '-' for '/')"))
}

async fn get_resource(
    State(a): A,
    Path((region, sub, id, res)): Path<(String, String, String, String)>,
) -> Result<Json<Value>> {
    let path = resource_path(&res)?;
    let mut c = a.state.lock().await.clone();
    let m = find_mapping(&mut c, &region, &sub, &id)?;
    let r = m
        .mapping
        .resources
        .iter()
        .find(|r| r.path == path)
        .ok_or_else(|| ApiError::not_found(format!("no resource {path}")))?;
    Ok(Json(serde_json::to_value(r).unwrap_or_default()))
}

async fn add_resource(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub, id)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Response> {
    let r = resource_from(parse(&body)?)?;
    let (_, cfg) = a
        .change(|c| {
            let m = find_mapping(c, &region, &sub, &id)?;
            if !m.mapping.protocol.is_http() {
                return Err(ApiError::invalid("only HTTP and HTTPS mappings have resources"));
            }
            if m.mapping.resources.iter().any(|x| x.path == r.path) {
                return Err(ApiError::conflict(format!("resource {} exists already", r.path)));
            }
            m.mapping.resources.push(r.clone());
            Ok(())
        })
        .await?;
    a.apply_rules(&cfg, &(region.clone(), sub.clone()));
    a.record(&u.0, "AllowedResource", "created", &sub, &format!("{id}{}", r.path)).await;
    let loc =
        format!("{CONF}/subaccounts/{region}/{sub}/systemMappings/{id}/resources/{}", encode_resource_id(&r.path));
    Ok(created(loc, serde_json::to_value(&r).unwrap_or_default()))
}

async fn put_resource(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub, id, res)): Path<(String, String, String, String)>,
    body: Bytes,
) -> Result<Json<Value>> {
    let path = resource_path(&res)?;
    let Value::Object(patch) = parse::<Value>(&body)? else {
        return Err(ApiError::invalid("a resource must be a JSON object"));
    };
    let (r, cfg) = a
        .change(|c| {
            let m = find_mapping(c, &region, &sub, &id)?;
            let cur = m
                .mapping
                .resources
                .iter_mut()
                .find(|r| r.path == path)
                .ok_or_else(|| ApiError::not_found(format!("no resource {path}")))?;
            let mut merged = serde_json::to_value(&*cur).unwrap_or_default();
            if let Value::Object(o) = &mut merged {
                for (k, v) in patch {
                    if k == "id" && v.as_str() != Some(path.as_str()) {
                        return Err(ApiError::invalid(
                            "a resource's id cannot be changed; delete it and add a new one",
                        ));
                    }
                    o.insert(k, v);
                }
            }
            let next = resource_from(merged)?;
            *cur = next.clone();
            Ok(next)
        })
        .await?;
    a.apply_rules(&cfg, &(region.clone(), sub.clone()));
    a.record(&u.0, "AllowedResource", "changed", &sub, &format!("{id}{path}")).await;
    Ok(Json(serde_json::to_value(&r).unwrap_or_default()))
}

async fn delete_resource(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub, id, res)): Path<(String, String, String, String)>,
) -> Result<Response> {
    let path = resource_path(&res)?;
    let (_, cfg) = a
        .change(|c| {
            let m = find_mapping(c, &region, &sub, &id)?;
            let before = m.mapping.resources.len();
            m.mapping.resources.retain(|r| r.path != path);
            if m.mapping.resources.len() == before {
                Err(ApiError::not_found(format!("no resource {path}")))
            } else {
                Ok(())
            }
        })
        .await?;
    a.apply_rules(&cfg, &(region.clone(), sub.clone()));
    a.record(&u.0, "AllowedResource", "deleted", &sub, &format!("{id}{path}")).await;
    Ok(no_content())
}

async fn delete_resources(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub, id)): Path<(String, String, String)>,
) -> Result<Response> {
    let (_, cfg) = a
        .change(|c| {
            find_mapping(c, &region, &sub, &id)?.mapping.resources.clear();
            Ok(())
        })
        .await?;
    a.apply_rules(&cfg, &(region.clone(), sub.clone()));
    a.record(&u.0, "AllowedResource", "deleted", &sub, &format!("{id} (all)")).await;
    Ok(no_content())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_ids_encode_as_sap_does() {
        for (plain, enc) in [("/sap/opu", "-sap-opu"), ("/a-b+c", "-a+2Db+2Bc"), ("/+2D", "-+2B2D"), ("/", "-")] {
            assert_eq!(encode_resource_id(plain), enc);
            assert_eq!(decode_resource_id(enc).as_deref(), Some(plain));
        }
        assert_eq!(decode_resource_id("-a+zz"), None);
        assert_eq!(decode_resource_id("-a+2"), None);
    }

    #[test]
    fn authentication_data_in_three_forms() {
        let obj = json!({"subaccount":"s","location_id":"","certificate":"C","key":"K","ca":"A","tunnel":"h:1"});
        assert_eq!(authentication_data(obj.clone()).map(|d| d.tunnel).ok(), Some("h:1".into()));
        assert!(authentication_data(Value::String(obj.to_string())).is_ok());
        assert!(authentication_data(Value::String(B64.encode(obj.to_string()))).is_ok());
        assert!(authentication_data(Value::String("%%%".into())).is_err());
        assert!(authentication_data(json!({"subaccount":"s"})).is_err());
    }

    #[test]
    fn mapping_json_roundtrips_with_sap_fields() {
        let m =
            mapping_from(json!({"virtualHost":"erp.virtual","virtualPort":443,"localHost":"10.0.0.1","localPort":8443,
            "protocol":"HTTPS","backendType":"abapSys","totalResourcesCount":3}))
            .unwrap();
        let v = mapping_json(&m);
        assert_eq!(v["backendType"], "abapSys");
        assert_eq!(v["totalResourcesCount"], 0);
        assert!(
            mapping_from(
                json!({"virtualHost":"bad host","virtualPort":1,"localHost":"x","localPort":1,"protocol":"HTTP"})
            )
            .is_err()
        );
        assert!(
            mapping_from(json!({"virtualHost":"a","virtualPort":1,"localHost":"x","localPort":1,"protocol":"TCP",
            "resources":[{"id":"/"}]}))
            .is_err()
        );
    }
}
