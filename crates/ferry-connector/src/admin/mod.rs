//! The Cloud Connector's administration REST API (SAP's paths and JSON shapes under
//! `/api/v1/configuration`, `/api/monitoring`, `/exposed`), served over HTTPS with a
//! self-signed UI certificate, on top of an [`Instance`] whose configuration is persisted in a
//! data folder ([`store`]) and applied live.
//!
//! Security as in SAP's product: one file-based user, `Administrator` / `manage` at first start,
//! and every API but the password change answers 403 until that password is changed. Basic
//! authentication or the `JSESSIONID` session it opens; calls that change something with a
//! session cookie must carry the session's `X-CSRF-Token` (fetched with `X-CSRF-Token: Fetch`).
//! Repeated wrong passwords lock the user name for a while; every change goes to the audit log.

mod api;
mod channels_api;
mod ha_api;
mod ldap;
mod pp_ca;
pub mod store;
mod ui;

pub use api::Enrollment;
pub use ldap::{LdapHost, LdapSettings};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use ferry_core::Shutdown;
use ferry_core::tls::{CertifiedKey, LocalCa};
use tokio::net::TcpListener;

use crate::audit::{AuditConfig, AuditLog, ChangeEvent};
use crate::ha::{Ha, Role};
use crate::instance::Instance;
use crate::{AccessRules, ConnectorConfig, PrincipalPropagation};
use store::{SccConfig, Store, StoredSubaccount};

pub const DEFAULT_PORT: u16 = 8443;
/// The one path reachable with the initial password.
const PASSWORD_PATH: &str = "/api/v1/configuration/connector/authentication/basic";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Store(#[from] store::StoreError),
    #[error("UI certificate: {0}")]
    Tls(#[from] ferry_core::tls::TlsError),
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("cannot connect the subaccount: {0}")]
    Connect(String),
}

/// Settings every subaccount connection of the instance shares.
#[derive(Clone, Debug)]
pub struct ConnectionDefaults {
    pub connections: usize,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub backend_connect_timeout: Duration,
    pub heartbeat: Duration,
    /// How often the proxy replicas of a subaccount with `resolveProxyReplicas` are looked up.
    pub resolve_interval: Duration,
    /// See [`ConnectorConfig::drain_timeout`].
    pub drain_timeout: Duration,
    pub backend_ca_pem: Option<String>,
    /// TLS client certificate towards backends (see [`ConnectorConfig::system_certificate`]).
    pub system_certificate: Option<ferry_core::tls::CertifiedKey>,
    /// Token verifier, CA and subject pattern for principal propagation; the PP settings of the
    /// API (`certificateValidityInMin`, `expirationToleranceInHr`) are applied on top.
    pub principal_propagation: Option<Arc<PrincipalPropagation>>,
    /// Address service channel ports listen on.
    pub channel_host: String,
}

impl Default for ConnectionDefaults {
    fn default() -> Self {
        Self {
            connections: 1,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            backend_connect_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(20),
            resolve_interval: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            backend_ca_pem: None,
            system_certificate: None,
            principal_propagation: None,
            channel_host: "0.0.0.0".into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// Configuration, key file and UI certificate live here.
    pub data_dir: PathBuf,
    /// Audit log folder; default `<data_dir>/audit`.
    pub audit_dir: Option<PathBuf>,
    /// Rotation of every audit log of the instance (its level and folder are set per log).
    pub audit: AuditConfig,
    /// Names on the self-signed UI certificate (generated on first start).
    pub ui_names: Vec<String>,
    /// Wrong passwords in a row before a user name is locked.
    pub max_failed_logons: u32,
    pub lockout: Duration,
    /// Idle time after which a session ends.
    pub session_timeout: Duration,
    /// Largest request body accepted.
    pub max_body: usize,
    /// Connections one client address may hold open on the admin port; one more gets 429 and
    /// is closed. 0 = no cap.
    pub max_connections_per_client: usize,
    pub connection: ConnectionDefaults,
    /// PEM file of CA certificates trusted for LDAPS logon hosts, besides the system's roots.
    pub ldap_ca_file: Option<PathBuf>,
    /// Fraction of a subaccount certificate's lifetime after which it is renewed at the
    /// directory (connections whose authentication data named a renewal endpoint).
    pub renew_at: f64,
    /// Extra trust anchor (PEM) for the region host's HTTPS when a subaccount is added with
    /// `cloudUser`/`cloudPassword`, besides the system's roots.
    pub region_ca_pem: Option<String>,
}

impl AdminConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            audit_dir: None,
            audit: AuditConfig::default(),
            ui_names: vec!["localhost".into(), "127.0.0.1".into()],
            max_failed_logons: 5,
            renew_at: 2.0 / 3.0,
            lockout: Duration::from_secs(300),
            session_timeout: Duration::from_secs(30 * 60),
            max_body: 1 << 20,
            // A browser opens about 6; scripts a few more.
            max_connections_per_client: 64,
            connection: ConnectionDefaults::default(),
            ldap_ca_file: None,
            region_ca_pem: None,
        }
    }
}

struct Session {
    user: String,
    roles: ldap::Roles,
    csrf: String,
    last: Instant,
}

#[derive(Default)]
struct Failures {
    count: u32,
    locked_until: Option<Instant>,
}

/// The running administration side of a connector instance.
pub struct Admin {
    pub(crate) config: AdminConfig,
    /// Wakes the renewal task when the configuration changes (a subaccount added).
    renewal_wake: tokio::sync::Notify,
    pub(crate) store: Store,
    /// The current configuration; held across save-and-apply so changes are serialised.
    pub(crate) state: tokio::sync::Mutex<SccConfig>,
    pub(crate) instance: Instance,
    /// Configuration changes (SAP's cross-subaccount audit log).
    pub(crate) audit: AuditLog,
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<String, Failures>>,
    ui_tls: Arc<rustls::ServerConfig>,
    pub(crate) ui_ca_pem: String,
    /// Master/shadow role and pairing (`crate::ha`).
    pub(crate) ha: Ha,
    pub(crate) shutdown: Shutdown,
    /// The port `serve` listens on, announced to an HA master.
    pub(crate) own_port: std::sync::OnceLock<u16>,
    /// LDAP logon when enabled; the file-based user otherwise.
    pub(crate) ldap: ldap::LiveLdap,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("data_dir", &self.config.data_dir).finish_non_exhaustive()
    }
}

fn random_token() -> String {
    let mut b = [0u8; 24];
    // Without randomness nothing here is safe; aws-lc-rs only fails on a broken system.
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        tracing::error!("no randomness available for session tokens");
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// The UI certificate: issued by a local CA (whose certificate, `ui-ca.pem`, clients may
/// trust) and kept in the data folder with the keys sealed like the connection keys. A change of
/// the configured names reissues it from the same CA, so clients keep trusting it.
fn ui_certificate(store: &Store, names: &[String]) -> Result<(CertifiedKey, String), AdminError> {
    let dir = store.dir();
    let path = |f: &str| dir.join(f);
    let ca = match (std::fs::read_to_string(path("ui-ca.pem")), std::fs::read(path("ui-ca-key.sealed"))) {
        (Ok(cert), Ok(key)) => LocalCa::from_pem(&cert, &store.open_blob(b"ui-ca-key", &key)?)?,
        _ => {
            let ca = LocalCa::generate("Ferry Cloud Connector UI")?;
            store::write_atomic(
                &path("ui-ca-key.sealed"),
                &store.seal_blob(b"ui-ca-key", ca.key_pem().expose().as_bytes())?,
            )?;
            store::write_atomic(&path("ui-ca.pem"), ca.cert_pem().as_bytes())?;
            let _ = std::fs::remove_file(path("ui-cert.pem"));
            ca
        }
    };
    let wanted = names.join("\n");
    let stored = (
        std::fs::read_to_string(path("ui-names.txt")),
        std::fs::read_to_string(path("ui-cert.pem")),
        std::fs::read(path("ui-key.sealed")),
    );
    if let (Ok(n), Ok(cert), Ok(key)) = stored
        && n == wanted
    {
        let key_pem = store.open_blob(b"ui-key", &key)?;
        return Ok((CertifiedKey { cert_pem: cert, key_pem: key_pem.into() }, ca.cert_pem().to_owned()));
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let issued = ca.issue_server_cert(&refs)?;
    store::write_atomic(&path("ui-key.sealed"), &store.seal_blob(b"ui-key", issued.key_pem.expose().as_bytes())?)?;
    store::write_atomic(&path("ui-cert.pem"), issued.cert_pem.as_bytes())?;
    store::write_atomic(&path("ui-names.txt"), wanted.as_bytes())?;
    Ok((issued, ca.cert_pem().to_owned()))
}

impl Admin {
    /// Opens (or initialises) the data folder and connects every subaccount marked connected.
    /// Must be called inside a Tokio runtime.
    pub async fn start(config: AdminConfig, shutdown: Shutdown) -> Result<Arc<Self>, AdminError> {
        let (store, scc) = Store::open(&config.data_dir)?;
        let (ui, ui_ca_pem) = ui_certificate(&store, &config.ui_names)?;
        let ui_tls = ferry_core::tls::server_config(&ui, None, &[b"http/1.1"])?;
        let audit_dir = config.audit_dir.clone().unwrap_or_else(|| config.data_dir.join("audit"));
        let audit = AuditLog::start(
            &AuditConfig { level: scc.audit_level, dir: Some(audit_dir), ..config.audit.clone() },
            "_configuration",
            "",
        )?;
        let ha = Ha::open(&store)?;
        let ldap = match ldap::load(&store)? {
            Some((settings, password)) if settings.enable => {
                match ldap::LdapLogon::new(&settings, &password, config.ldap_ca_file.as_deref()) {
                    Ok(l) => Some(Arc::new(l)),
                    // Refusing to start would lock every administrator out for good.
                    Err(e) => {
                        tracing::error!(error = %e, "stored LDAP logon settings are invalid: the file-based user logs on");
                        None
                    }
                }
            }
            _ => None,
        };
        {
            // The certificates a master synced win over this instance's own (see `crate::ha`).
            let mut keys = ha.keys.lock().unwrap_or_else(PoisonError::into_inner);
            if keys.is_none() {
                *keys = own_keys(&config.connection);
            }
        }
        let admin = Arc::new(Self {
            ldap: std::sync::RwLock::new(ldap),
            ha,
            shutdown: shutdown.clone(),
            own_port: std::sync::OnceLock::new(),
            store,
            state: tokio::sync::Mutex::new(scc.clone()),
            instance: Instance::new(shutdown),
            audit,
            sessions: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            ui_tls,
            ui_ca_pem,
            config,
            renewal_wake: tokio::sync::Notify::new(),
        });
        // A master that was down while its shadow took over comes back as shadow: no tunnels.
        if admin.resolve_role_on_start().await == Role::Master {
            admin.ha.publish(scc.clone(), &admin.store);
            for sub in scc.subaccounts.iter().filter(|s| s.connected) {
                if let Err(e) = admin.connect(&scc, sub).await {
                    tracing::error!(subaccount = %sub.subaccount, error = %e.message, "cannot connect subaccount");
                }
            }
        }
        admin.start_role_task();
        admin.start_renewal_task();
        Ok(admin)
    }

    /// PEM of the CA that issued the UI certificate, for clients that want to verify it.
    pub fn ui_ca_pem(&self) -> &str {
        &self.ui_ca_pem
    }

    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// A snapshot of the configuration.
    pub async fn config(&self) -> SccConfig {
        self.state.lock().await.clone()
    }

    pub fn router(self: &Arc<Self>) -> axum::Router {
        api::router(self.clone())
            .merge(ha_api::router(self.clone()).layer(axum::middleware::from_fn(authorize)))
            .layer(axum::middleware::from_fn_with_state(self.clone(), authenticate))
            // The web UI checks sessions itself: its logon page needs none.
            .merge(ui::router(self.clone()))
            .layer(axum::extract::DefaultBodyLimit::max(self.config.max_body))
    }

    /// Serves the API over HTTPS on `listener` until `shutdown`, then disconnects every
    /// subaccount.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: Shutdown) {
        if let Ok(a) = listener.local_addr() {
            let _ = self.own_port.set(a.port());
        }
        let router = self.router();
        ferry_core::serve::serve_router(
            listener,
            router,
            Some(self.ui_tls.clone()),
            ferry_core::serve::AcceptOptions {
                max_per_client: self.config.max_connections_per_client,
                ..ferry_core::serve::AcceptOptions::named("connector-admin")
            },
            shutdown,
        )
        .await;
        self.instance.disconnect_all().await;
    }

    fn connection_config(&self, scc: &SccConfig, sub: &StoredSubaccount) -> Result<ConnectorConfig, ApiError> {
        let key = self.store.open_key(sub).map_err(|e| ApiError::internal(format!("connection key: {e}")))?;
        let d = &self.config.connection;
        let mut proxies = sub.proxies();
        let first = proxies.remove(0);
        let mut cc = ConnectorConfig::new(
            first,
            sub.server_name.clone(),
            sub.ca.clone(),
            CertifiedKey { cert_pem: sub.certificate.clone(), key_pem: key },
            rules_of(sub),
        );
        cc.more_proxy_addrs = proxies;
        cc.resolve_replicas = sub.resolve_proxy_replicas.then_some(d.resolve_interval);
        cc.connections = d.connections.max(1);
        cc.backoff_initial = d.backoff_initial;
        cc.backoff_max = d.backoff_max;
        cc.backend_connect_timeout = d.backend_connect_timeout;
        cc.drain_timeout = d.drain_timeout;
        cc.heartbeat = d.heartbeat;
        cc.backend_ca_pem = d.backend_ca_pem.clone();
        cc.system_certificate = self.pair_keys().and_then(|k| k.system_certificate());
        cc.audit = AuditConfig {
            level: sub.audit_level,
            dir: Some(self.config.audit_dir.clone().unwrap_or_else(|| self.config.data_dir.join("audit"))),
            ..self.config.audit.clone()
        };
        cc.principal_propagation = self.principal(scc);
        // Read at every (re)connect: a promotion stores the raised epoch before it connects.
        let ha = self.ha.file();
        cc.fence = Some(ferry_proto::tunnel::Fence { epoch: ha.epoch, node: ha.node });
        cc.channel_host = d.channel_host.clone();
        Ok(cc)
    }

    fn pair_keys(&self) -> Option<crate::ha::PairKeys> {
        self.ha.keys.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Principal propagation from the instance's verifier and the pair's CA (see `crate::ha`)
    /// with the API's settings.
    fn principal(&self, scc: &SccConfig) -> Option<Arc<PrincipalPropagation>> {
        let keys = self.pair_keys();
        self.config.connection.principal_propagation.as_ref().map(|t| {
            let ca = keys.as_ref().and_then(|k| k.pp_ca()).map(Arc::new).unwrap_or_else(|| t.ca.clone());
            let mut p = PrincipalPropagation::new(t.verifier.clone(), ca);
            p.subject_pattern =
                keys.as_ref().and_then(|k| k.pp_subject_pattern.clone()).unwrap_or_else(|| t.subject_pattern.clone());
            p.certificate_validity = Duration::from_secs(u64::from(scc.pp_settings.certificate_validity_in_min) * 60);
            p.expiration_tolerance = Duration::from_secs(u64::from(scc.pp_settings.expiration_tolerance_in_hr) * 3600);
            Arc::new(p)
        })
    }

    /// Saves a changed configuration and, on a master with a live shadow, returns only once the
    /// shadow has stored it too.
    pub(crate) async fn persist(&self, cfg: &SccConfig) -> Result<(), ApiError> {
        self.renewal_wake.notify_one();
        self.store.save(cfg).map_err(|e| ApiError::internal(format!("cannot save the configuration: {e}")))?;
        self.replicate(cfg).await;
        Ok(())
    }

    pub(crate) async fn replicate(&self, cfg: &SccConfig) {
        if self.ha.role() == Role::Master {
            let v = self.ha.publish(cfg.clone(), &self.store);
            self.ha.await_ack(v).await;
        }
    }

    pub(crate) async fn connect(&self, scc: &SccConfig, sub: &StoredSubaccount) -> Result<(), ApiError> {
        let cc = self.connection_config(scc, sub)?;
        self.instance
            .connect(sub.key(), cc)
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "INVALID_CONFIGURATION", e.to_string()))?;
        // A channel whose port is taken stays closed (its state says so); the connection is up.
        for ch in sub.service_channels.iter().filter(|c| c.enabled) {
            if let Err(e) = self.instance.open_channel(&sub.key(), ch).await {
                tracing::error!(subaccount = %sub.subaccount, channel = ch.id, error = %e, "cannot open service channel");
            }
        }
        Ok(())
    }

    async fn record(&self, user: &str, category: &'static str, action: &'static str, sub: &str, object: &str) {
        self.audit
            .record_change(ChangeEvent {
                category,
                user: user.to_owned(),
                action,
                subaccount: sub.to_owned(),
                object: object.to_owned(),
                detail: String::new(),
            })
            .await;
    }

    // ---- authentication

    fn session(&self, sid: &str) -> Option<(String, String, ldap::Roles)> {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let s = sessions.get_mut(sid)?;
        if s.last.elapsed() > self.config.session_timeout {
            sessions.remove(sid);
            return None;
        }
        s.last = Instant::now();
        Some((s.user.clone(), s.csrf.clone(), s.roles.clone()))
    }

    fn new_session(&self, user: &str, roles: ldap::Roles) -> (String, String) {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let timeout = self.config.session_timeout;
        sessions.retain(|_, s| s.last.elapsed() <= timeout);
        // Scripts that log on with Basic for every call open a session each time; bound them.
        if sessions.len() >= 1000
            && let Some(oldest) = sessions.iter().min_by_key(|(_, s)| s.last).map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        let (sid, csrf) = (random_token(), random_token());
        sessions
            .insert(sid.clone(), Session { user: user.to_owned(), roles, csrf: csrf.clone(), last: Instant::now() });
        (sid, csrf)
    }

    fn end_session(&self, sid: &str) {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner).remove(sid);
    }

    fn end_sessions(&self) {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// Logs on as an administrator (`sccadmin`): what pairing a shadow needs. A directory
    /// that does not answer counts as a failed logon here.
    /// Checks a user name and password against LDAP when enabled, else the file-based user,
    /// with lockout after repeated failures, and returns the user's roles. Unknown user and
    /// wrong password cost the same and look the same.
    pub(super) async fn logon_roles(&self, user: &str, password: &str) -> Result<ldap::Roles, LogonFailure> {
        let name = user.to_lowercase();
        {
            let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = f.get_mut(&name)
                && let Some(until) = entry.locked_until
            {
                if Instant::now() < until {
                    return Err(LogonFailure::Locked);
                }
                *entry = Failures::default();
            }
        }
        let directory = self.ldap.read().unwrap_or_else(PoisonError::into_inner).clone();
        let roles = match directory {
            Some(d) => d.verify(user, password).await.map_err(|e| LogonFailure::Unavailable(e.0))?,
            None => {
                let (known, hash) = {
                    let s = self.state.lock().await;
                    (s.admin.user == user, s.admin.password_hash.clone())
                };
                let password = password.to_owned();
                let ok = tokio::task::spawn_blocking(move || store::verify_password(&hash, &password))
                    .await
                    .unwrap_or(false)
                    && known;
                ok.then(ldap::Roles::admin)
            }
        };
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(roles) = roles {
            f.remove(&name);
            return Ok(roles);
        }
        // Bound the table: names that never succeed must not grow it without limit.
        if f.len() > 10_000 {
            f.retain(|_, e| e.locked_until.is_some());
        }
        let entry = f.entry(name).or_default();
        entry.count += 1;
        if entry.count >= self.config.max_failed_logons.max(1) {
            entry.locked_until = Some(Instant::now() + self.config.lockout);
            tracing::warn!(target: "ferry::audit", "administration logon locked after repeated wrong passwords");
        }
        Err(LogonFailure::Wrong)
    }
}

pub(super) enum LogonFailure {
    Wrong,
    Locked,
    /// The LDAP directory did not answer: 503, not a wrong password.
    Unavailable(String),
}

fn rules_of(sub: &StoredSubaccount) -> AccessRules {
    AccessRules::new(sub.system_mappings.iter().map(|m| m.mapping.clone()).collect())
}

/// SAP's error body `{type, message}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into() }
    }
    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }
    fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "ILLEGAL_STATE", message)
    }
    fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "FORBIDDEN_REQUEST", message)
    }
    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "RUNTIME_FAILURE", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"type": self.kind, "message": self.message});
        (self.status, axum::Json(body)).into_response()
    }
}

/// Who is calling, for handlers (audit entries), and with which roles.
#[derive(Clone, Debug)]
pub(crate) struct Caller(pub String, pub(crate) ldap::Roles);

const CSRF: &str = "x-csrf-token";

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

fn basic(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
    let (u, p) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

fn unauthorized() -> Response {
    let mut r =
        ApiError::new(StatusCode::UNAUTHORIZED, "FORBIDDEN_REQUEST", "logon failed: wrong user name or password")
            .into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"Cloud Connector\""));
    r
}

async fn authenticate(State(admin): State<Arc<Admin>>, mut req: Request, next: Next) -> Response {
    // Load balancer probe, as in SAP's product: no logon.
    if req.uri().path() == "/exposed" || req.uri().path().starts_with(crate::ha::PEER_PREFIX) {
        return next.run(req).await;
    }
    let fetch = req.headers().get(CSRF).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("fetch"));
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let session = cookie(req.headers(), "JSESSIONID").and_then(|sid| admin.session(&sid));
    let (user, roles, csrf, new_cookie) = match session {
        Some((user, csrf, roles)) => {
            let sent = req.headers().get(CSRF).map(|v| v.as_bytes().to_vec()).unwrap_or_default();
            if !safe && !ferry_core::secret::constant_time_eq(&sent, csrf.as_bytes()) {
                return ApiError::forbidden(
                    "CSRF token validation failed: send the session's token in X-CSRF-Token (get it with X-CSRF-Token: Fetch)",
                )
                .into_response();
            }
            (user, roles, csrf, None)
        }
        None => {
            let Some((user, password)) = basic(req.headers()) else { return unauthorized() };
            let roles = match admin.logon_roles(&user, &password).await {
                Ok(roles) => roles,
                Err(LogonFailure::Wrong) => return unauthorized(),
                Err(LogonFailure::Unavailable(why)) => {
                    return ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "RUNTIME_FAILURE",
                        format!("cannot check the logon: {why}"),
                    )
                    .into_response();
                }
                Err(LogonFailure::Locked) => {
                    return ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "FORBIDDEN_REQUEST",
                        "too many failed logon attempts for this user; try again later",
                    )
                    .into_response();
                }
            };
            let (sid, csrf) = admin.new_session(&user, roles.clone());
            (user, roles, csrf, Some(sid))
        }
    };
    let initial = admin.state.lock().await.admin.initial_password;
    if initial && !(req.method() == Method::PUT && req.uri().path() == PASSWORD_PATH) {
        return ApiError::forbidden("initial password must be changed").into_response();
    }
    req.extensions_mut().insert(Caller(user, roles));
    let mut resp = next.run(req).await;
    if let Some(sid) = new_cookie
        && let Ok(v) = HeaderValue::from_str(&format!("JSESSIONID={sid}; Path=/; Secure; HttpOnly; SameSite=Strict"))
    {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    if fetch && let Ok(v) = HeaderValue::from_str(&csrf) {
        resp.headers_mut().insert(CSRF, v);
    }
    resp
}

/// The caller's roles must allow the call (see [`ldap::Roles::allow`]). Layered on the API
/// router itself, so the web UI's in-process calls meet it too. Only the unauthenticated probe
/// and HA peer paths come without a caller.
pub(crate) async fn authorize(req: Request, next: Next) -> Response {
    let allowed = match req.extensions().get::<Caller>() {
        Some(c) => c.1.allow(req.method(), req.uri().path()),
        None => req.uri().path() == "/exposed" || req.uri().path().starts_with(crate::ha::PEER_PREFIX),
    };
    if !allowed {
        return ApiError::forbidden("your user lacks the role for this call (see the connector's LDAP role mapping)")
            .into_response();
    }
    next.run(req).await
}

/// The certificates of this instance's own configuration, to serve with and sync to a shadow.
fn own_keys(d: &ConnectionDefaults) -> Option<crate::ha::PairKeys> {
    let pp = d.principal_propagation.as_ref();
    let sys = d.system_certificate.as_ref();
    if pp.is_none() && sys.is_none() {
        return None;
    }
    Some(crate::ha::PairKeys {
        pp_ca_cert: pp.map(|p| p.ca.cert_pem().to_owned()),
        pp_ca_key: pp.map(|p| p.ca.key_pem().expose().clone()),
        pp_subject_pattern: pp.map(|p| p.subject_pattern.clone()),
        system_cert: sys.map(|c| c.cert_pem.clone()),
        system_key: sys.map(|c| c.key_pem.expose().clone()),
    })
}

/// A shadow's configuration comes from its master: changes answer SAP's `SHADOW_UPDATE`. Layered
/// on the API router itself, so the web UI's in-process calls meet it too.
pub(crate) async fn shadow_guard(State(admin): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe && admin.ha.role() == Role::Shadow && !ha_api::writable_on_shadow(req.method(), req.uri().path()) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "SHADOW_UPDATE",
            "this instance is the shadow: change the configuration on the master",
        )
        .into_response();
    }
    next.run(req).await
}

/// Opens the data folder, serves the API on `listener` until `shutdown`.
impl Admin {
    /// Renews subaccount certificates once `renew_at` of their lifetime has passed, on the
    /// master only (a shadow receives the new certificate with the configuration). A failed
    /// renewal is retried: the current certificate keeps working until it expires.
    fn start_renewal_task(self: &Arc<Self>) {
        let admin = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let Some(a) = admin.upgrade() else { return };
                let wait = a.renew_due().await;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = a.renewal_wake.notified() => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }

    /// Renews what is due; returns how long to wait before looking again.
    async fn renew_due(&self) -> Duration {
        // Configuration changes (a new subaccount) are picked up within this.
        const MAX_WAIT: Duration = Duration::from_secs(60);
        const RETRY: Duration = Duration::from_secs(5);
        if self.ha.role() != Role::Master {
            return MAX_WAIT;
        }
        let fraction = self.config.renew_at.clamp(0.05, 0.95);
        let subs = self.state.lock().await.subaccounts.clone();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let mut wait = MAX_WAIT;
        for s in subs {
            let Some(url) = s.renewal_url.as_deref() else { continue };
            let Some((from, to)) = ferry_core::tls::parse_certs(&s.certificate)
                .ok()
                .and_then(|c| c.first().and_then(|c| ferry_core::tls::validity_of(c)))
            else {
                continue;
            };
            let due = from as f64 + (to - from) as f64 * fraction;
            if now < due {
                wait = wait.min(Duration::from_secs_f64((due - now).max(0.1)));
                continue;
            }
            match self.renew_with_directory(&s, url).await {
                Ok(()) => {
                    tracing::info!(subaccount = %s.subaccount, location_id = %s.location_id, "subaccount certificate renewed");
                    wait = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::warn!(subaccount = %s.subaccount, location_id = %s.location_id, error = %e,
                        "cannot renew the subaccount certificate; retrying");
                    wait = wait.min(RETRY);
                }
            }
        }
        wait
    }
}

pub async fn run(config: AdminConfig, listener: TcpListener, shutdown: Shutdown) -> Result<(), AdminError> {
    let admin = Admin::start(config, shutdown.clone()).await?;
    admin.serve(listener, shutdown).await;
    Ok(())
}
