//! High availability of a connector instance: a *master* that serves the tunnels and a *shadow*
//! that keeps a synchronised copy of the configuration and takes over when the master is gone
//! (SAP's master/shadow setup).
//!
//! Pairing: the shadow logs on to the master once with the master's administrator credentials
//! (`POST /ferry/ha/v1/register`); the master answers with a random HA secret and the CA of its
//! UI certificate. From then on the shadow authenticates with the secret (bearer) and verifies the
//! master's certificate against that CA; the master verifies the shadow the same way when it calls
//! it. The secret is sealed in both data folders (`scc-ha.json`); no administrator password is
//! kept.
//!
//! Sync: the shadow long-polls `GET /ferry/ha/v1/sync?have=<version>`; the master answers with the
//! full configuration (keys in clear, over the authenticated TLS channel) whenever its version
//! differs, else after at most one check period with 204 (the poll is also the heartbeat). The next
//! poll acknowledges what the shadow stored, so a write on the master returns only once a live
//! shadow has stored it; a shadow silent for 3 check periods is LOST and the master continues
//! alone.
//!
//! The pair's certificates travel with the configuration: the master's principal propagation CA
//! (with its subject pattern) and system certificate are in every sync payload; the shadow seals
//! them into `scc-ha-keys.json` and serves with them, rather than its own, from then on.
//!
//! Failover: after `takeoverDelayInSeconds` of failed polls the shadow raises its *epoch* above
//! the master's, becomes master and opens every connected subaccount's tunnels. A master that
//! meets a master with a higher (epoch, node id) — on start, or in its periodic peer check —
//! demotes itself; one that merely loses its shadow never does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ferry_core::{Secret, Shutdown};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::admin::Admin;
use crate::admin::store::{self, SccConfig, Store};

pub const HA_FILE: &str = "scc-ha.json";
/// The master's principal propagation CA and system certificate as last synced, sealed.
pub const KEYS_FILE: &str = "scc-ha-keys.json";
/// Ferry's peer-to-peer paths (not SAP's API): authenticated with the HA secret.
pub const PEER_PREFIX: &str = "/ferry/ha/v1";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Master,
    Shadow,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Shadow => "shadow",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MasterConfig {
    pub ha_enabled: bool,
    /// The port shadows use; Ferry serves HA on the admin (UI) port, so this is informational
    /// and defaults to it.
    #[serde(default)]
    pub ha_port: Option<u16>,
    /// If set, only a shadow that names this host as its `ownHost` may register.
    #[serde(default)]
    pub allowed_shadow_host: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShadowConfig {
    #[serde(default)]
    pub master_host: String,
    #[serde(default)]
    pub master_port: u16,
    /// How the master reaches this shadow (for the switch-over and split-brain checks).
    #[serde(default)]
    pub own_host: String,
    /// This shadow's admin port as the master should call it; default the port it serves on.
    #[serde(default)]
    pub ha_port: Option<u16>,
    /// Fractions are allowed (e.g. 0.2) for tests; SAP uses whole seconds.
    pub check_interval_in_seconds: f64,
    pub takeover_delay_in_seconds: f64,
    pub connect_timeout_in_millis: u64,
    pub request_timeout_in_millis: u64,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        Self {
            master_host: String::new(),
            master_port: 0,
            own_host: String::new(),
            ha_port: None,
            check_interval_in_seconds: 30.0,
            takeover_delay_in_seconds: 10.0,
            connect_timeout_in_millis: 5_000,
            request_timeout_in_millis: 10_000,
        }
    }
}

impl ShadowConfig {
    pub fn check_interval(&self) -> Duration {
        Duration::from_secs_f64(self.check_interval_in_seconds)
    }
    pub fn takeover_delay(&self) -> Duration {
        Duration::from_secs_f64(self.takeover_delay_in_seconds)
    }
    /// What one poll may take: the master holds it up to one check period.
    fn poll_timeout(&self) -> Duration {
        self.check_interval()
            + Duration::from_millis(self.connect_timeout_in_millis)
            + Duration::from_millis(self.request_timeout_in_millis)
    }
    pub fn validate(&self) -> Result<(), String> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if !ok(self.check_interval_in_seconds) || self.check_interval_in_seconds < 0.05 {
            return Err("checkIntervalInSeconds must be at least 0.05".into());
        }
        if !ok(self.takeover_delay_in_seconds) || self.takeover_delay_in_seconds > 86_400.0 {
            return Err("takeoverDelayInSeconds must be between 0 and 86400".into());
        }
        if self.check_interval_in_seconds > 3_600.0 {
            return Err("checkIntervalInSeconds must be at most 3600".into());
        }
        if self.connect_timeout_in_millis == 0 || self.request_timeout_in_millis == 0 {
            return Err("connectTimeoutInMillis and requestTimeoutInMillis must be positive".into());
        }
        Ok(())
    }
}

/// The other instance of the pair, as learned at registration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub host: String,
    pub port: u16,
    /// CA of the peer's UI certificate: the only CA its connections are verified against.
    pub ca_pem: String,
    /// The HA secret, sealed under the data folder's key (base64).
    pub secret_sealed: String,
    /// The shadow's check period, which the master uses for its own peer checks.
    pub check_interval_ms: u64,
}

/// Persisted HA settings (`scc-ha.json`): not part of the synced configuration or backups.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HaFile {
    pub role: Role,
    /// Raised by every promotion; a master meeting a master with a higher epoch steps down.
    pub epoch: u64,
    /// Random, breaks epoch ties.
    pub node: String,
    pub master: MasterConfig,
    pub shadow: ShadowConfig,
    #[serde(default)]
    pub peer: Option<Peer>,
    /// This instance holds a configuration worth serving: it was master, or as shadow stored
    /// the master's configuration at least once since it connected. A shadow without one never
    /// takes over — its empty configuration would then overwrite the old master's.
    #[serde(default)]
    pub synced: bool,
}

impl HaFile {
    fn load(store: &Store) -> Result<Self, store::StoreError> {
        let path = store.dir().join(HA_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| store::StoreError::Parse(path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Stored at once: the proxy fences by (epoch, node), so a restart must present
                // the same pair, and a fresh install (epoch = now) outranks an older instance
                // of its subaccount and location id, as a promotion does.
                let f = Self {
                    role: Role::Master,
                    epoch: now_epoch(),
                    node: random_secret(),
                    master: MasterConfig::default(),
                    shadow: ShadowConfig::default(),
                    peer: None,
                    synced: true,
                };
                f.save(store)?;
                Ok(f)
            }
            Err(e) => Err(store::StoreError::Io(path, e)),
        }
    }

    fn save(&self, store: &Store) -> Result<(), store::StoreError> {
        let path = store.dir().join(HA_FILE);
        let b = serde_json::to_vec_pretty(self).map_err(|e| store::StoreError::Parse(path.clone(), e))?;
        store::write_atomic(&path, &b)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowState {
    Initial,
    Disconnected,
    Handshake,
    InitSync,
    Ready,
    Lost,
}

impl ShadowState {
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowState::Initial => "INITIAL",
            ShadowState::Disconnected => "DISCONNECTED",
            ShadowState::Handshake => "HANDSHAKE",
            ShadowState::InitSync => "INITSYNC",
            ShadowState::Ready => "READY",
            ShadowState::Lost => "LOST",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error("{0}")]
    Store(#[from] store::StoreError),
    #[error("the peer at {0} cannot be reached: {1}")]
    Unreachable(String, String),
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("the peer does not accept this instance's HA credential any more; connect the shadow again")]
    Unpaired,
    #[error("{0}")]
    State(String),
}

/// Milliseconds since the Unix epoch: the epoch of a new instance and the floor of a promotion.
fn now_epoch() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1)
}

pub(crate) fn random_secret() -> String {
    let mut b = [0u8; 32];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        tracing::error!("no randomness available for the HA secret");
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// What the master publishes to its shadow: the configuration (keys in clear, no administrator)
/// and its certificates under a version `<boot>:<n>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct SyncPayload {
    pub have: String,
    pub epoch: u64,
    pub node: String,
    pub config: SccConfig,
    #[serde(default)]
    pub keys: Option<PairKeys>,
}

/// Certificates the pair must share so the shadow serves as the master did (SAP syncs them
/// with the configuration): the principal propagation CA that issues user certificates, its
/// subject pattern, and the system certificate towards backends. Keys in PEM, in clear only in
/// memory and on the authenticated HA channel; sealed in [`KEYS_FILE`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairKeys {
    pub pp_ca_cert: Option<String>,
    pub pp_ca_key: Option<String>,
    #[serde(default)]
    pub pp_subject_pattern: Option<String>,
    pub system_cert: Option<String>,
    pub system_key: Option<String>,
}

impl std::fmt::Debug for PairKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairKeys")
            .field("pp_ca", &self.pp_ca_cert.is_some())
            .field("system_certificate", &self.system_cert.is_some())
            .finish_non_exhaustive()
    }
}

impl PairKeys {
    /// The principal propagation CA, if both halves are there and parse.
    pub fn pp_ca(&self) -> Option<ferry_core::tls::LocalCa> {
        let ca = ferry_core::tls::LocalCa::from_pem(self.pp_ca_cert.as_deref()?, self.pp_ca_key.as_deref()?);
        ca.map_err(|e| tracing::error!(error = %e, "HA: the synced principal propagation CA does not load")).ok()
    }

    pub fn system_certificate(&self) -> Option<ferry_core::tls::CertifiedKey> {
        Some(ferry_core::tls::CertifiedKey {
            cert_pem: self.system_cert.clone()?,
            key_pem: Secret::new(self.system_key.clone()?),
        })
    }

    pub(crate) fn load(store: &Store) -> Result<Option<Self>, store::StoreError> {
        let path = store.dir().join(KEYS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(store::StoreError::Io(path, e)),
        };
        let sealed =
            B64.decode(text.trim()).map_err(|_| store::StoreError::Seal(ferry_core::aead::SealError::Format))?;
        let json = store.open_blob(b"ha-keys", &sealed)?;
        serde_json::from_str(&json).map(Some).map_err(|e| store::StoreError::Parse(path, e))
    }

    pub(crate) fn save(&self, store: &Store) -> Result<(), store::StoreError> {
        let path = store.dir().join(KEYS_FILE);
        let json = serde_json::to_vec(self).map_err(|e| store::StoreError::Parse(path.clone(), e))?;
        let sealed = store.seal_blob(b"ha-keys", &json)?;
        store::write_atomic(&path, B64.encode(sealed).as_bytes())
    }
}

/// Runtime HA state of an instance.
pub struct Ha {
    pub(crate) file: Mutex<HaFile>,
    secret: Mutex<Option<Secret<String>>>,
    /// Random per start, so a restarted master never claims an old version number.
    boot: String,
    version: AtomicU64,
    /// Latest payload, read by the shadow's poll without the configuration lock.
    pub(crate) latest: watch::Sender<Arc<SyncPayload>>,
    /// Highest version the shadow acknowledged.
    acked: watch::Sender<u64>,
    /// Last poll of the shadow and whether it was declared lost.
    shadow_seen: Mutex<Option<Instant>>,
    shadow_lost: std::sync::atomic::AtomicBool,
    pub(crate) shadow_state: Mutex<ShadowState>,
    /// The master's epoch as last seen by this shadow.
    master_epoch: AtomicU64,
    /// The running role task (shadow sync loop or master peer check).
    task: Mutex<Option<Shutdown>>,
    /// The pair's certificates this instance serves with and, as master, publishes: the ones
    /// last synced from a master if any, else its own configuration's.
    pub(crate) keys: Mutex<Option<PairKeys>>,
    /// Serialises role changes.
    pub(crate) role_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Ha {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ha").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Ha {
    pub(crate) fn open(store: &Store) -> Result<Self, store::StoreError> {
        let file = HaFile::load(store)?;
        let secret = match &file.peer {
            Some(p) => {
                let sealed = B64
                    .decode(&p.secret_sealed)
                    .map_err(|_| store::StoreError::Seal(ferry_core::aead::SealError::Format))?;
                Some(Secret::new(store.open_blob(b"ha-secret", &sealed)?))
            }
            None => None,
        };
        let state = if file.role == Role::Shadow && file.peer.is_some() {
            ShadowState::Disconnected
        } else {
            ShadowState::Initial
        };
        let boot = random_secret()[..12].to_owned();
        let empty = Arc::new(SyncPayload {
            have: String::new(),
            epoch: file.epoch,
            node: file.node.clone(),
            config: SccConfig::empty(),
            keys: None,
        });
        Ok(Self {
            file: Mutex::new(file),
            secret: Mutex::new(secret),
            boot,
            version: AtomicU64::new(0),
            latest: watch::Sender::new(empty),
            acked: watch::Sender::new(0),
            shadow_seen: Mutex::new(None),
            shadow_lost: std::sync::atomic::AtomicBool::new(false),
            shadow_state: Mutex::new(state),
            master_epoch: AtomicU64::new(0),
            task: Mutex::new(None),
            keys: Mutex::new(PairKeys::load(store)?),
            role_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn role(&self) -> Role {
        lock(&self.file).role
    }

    pub fn file(&self) -> HaFile {
        lock(&self.file).clone()
    }

    pub(crate) fn update_file(&self, store: &Store, f: impl FnOnce(&mut HaFile)) -> Result<HaFile, store::StoreError> {
        let mut g = lock(&self.file);
        let mut next = g.clone();
        f(&mut next);
        next.save(store)?;
        *g = next.clone();
        Ok(next)
    }

    pub(crate) fn secret(&self) -> Option<Secret<String>> {
        lock(&self.secret).clone()
    }

    pub(crate) fn set_secret(&self, s: Option<Secret<String>>) {
        *lock(&self.secret) = s;
    }

    pub fn shadow_state(&self) -> ShadowState {
        *lock(&self.shadow_state)
    }

    fn set_shadow_state(&self, s: ShadowState) {
        let mut g = lock(&self.shadow_state);
        if *g != s {
            tracing::info!(from = g.as_str(), to = s.as_str(), "HA shadow state");
            *g = s;
        }
    }

    fn check_interval(&self) -> Duration {
        let f = lock(&self.file);
        match &f.peer {
            Some(p) => Duration::from_millis(p.check_interval_ms.max(50)),
            None => f.shadow.check_interval(),
        }
    }

    /// SAP's master states.
    pub fn master_state(&self) -> &'static str {
        let f = lock(&self.file);
        if !f.master.ha_enabled || f.peer.is_none() {
            return "ALONE";
        }
        drop(f);
        let seen = lock(&self.shadow_seen).is_some();
        let synced = *self.acked.borrow() >= self.version.load(Ordering::SeqCst);
        match (seen, self.shadow_live()) {
            (false, _) => "BINDING",
            (true, true) if synced => "CONNECTED",
            (true, true) => "BINDING",
            (true, false) => "BROKEN",
        }
    }

    /// The shadow polled within the last 3 check periods and was not declared lost since.
    fn shadow_live(&self) -> bool {
        let seen = *lock(&self.shadow_seen);
        !self.shadow_lost.load(Ordering::SeqCst) && seen.is_some_and(|t| t.elapsed() < 3 * self.check_interval())
    }

    /// Publishes a new configuration version for the shadow.
    pub(crate) fn publish(&self, mut config: SccConfig, store: &Store) -> u64 {
        for s in &mut config.subaccounts {
            match store.open_key(s) {
                Ok(k) => s.key_pem = Some(k),
                Err(e) => {
                    tracing::error!(subaccount = %s.subaccount, error = %e, "cannot open a connection key for HA sync")
                }
            }
            s.key_sealed = None;
        }
        config.admin = store::AdminUser { user: String::new(), password_hash: String::new(), initial_password: false };
        let v = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        let (epoch, node) = {
            let f = lock(&self.file);
            (f.epoch, f.node.clone())
        };
        let keys = lock(&self.keys).clone();
        self.latest.send_replace(Arc::new(SyncPayload {
            have: format!("{}:{v}", self.boot),
            epoch,
            node,
            config,
            keys,
        }));
        v
    }

    /// Waits until a live shadow acknowledged `version`; a shadow that does not within 3 check
    /// periods is declared lost and the master goes on alone.
    pub(crate) async fn await_ack(&self, version: u64) {
        if lock(&self.file).peer.is_none() || !self.shadow_live() {
            return;
        }
        let mut rx = self.acked.subscribe();
        let wait = 3 * self.check_interval();
        let r = tokio::time::timeout(wait, rx.wait_for(|a| *a >= version)).await;
        if r.is_err() {
            tracing::warn!(
                "the HA shadow did not acknowledge a configuration change in time: it is LOST, continuing alone"
            );
            self.shadow_lost.store(true, Ordering::SeqCst);
        }
    }

    /// Records a poll of the shadow with the version it holds.
    pub(crate) fn shadow_polled(&self, have: &str, interval_ms: Option<u64>) {
        *lock(&self.shadow_seen) = Some(Instant::now());
        self.shadow_lost.store(false, Ordering::SeqCst);
        if let Some((boot, v)) = have.split_once(':')
            && boot == self.boot
            && let Ok(v) = v.parse::<u64>()
        {
            self.acked.send_if_modified(|a| {
                let up = v > *a;
                if up {
                    *a = v;
                }
                up
            });
        }
        if let Some(ms) = interval_ms {
            let mut f = lock(&self.file);
            if let Some(p) = f.peer.as_mut() {
                p.check_interval_ms = ms.clamp(50, 3_600_000);
            }
        }
    }

    pub(crate) fn forget_shadow(&self) {
        *lock(&self.shadow_seen) = None;
        self.shadow_lost.store(false, Ordering::SeqCst);
    }

    fn replace_task(&self, t: Option<Shutdown>) {
        if let Some(old) = std::mem::replace(&mut *lock(&self.task), t) {
            old.cancel();
        }
    }
}

/// An HTTPS client for the peer: verifies the peer's UI certificate against its pinned CA.
fn peer_client(ca_pem: Option<&str>) -> Result<reqwest::Client, HaError> {
    match ca_pem {
        Some(ca) => ferry_core::tls::http_client(Some(ca)).map_err(|e| HaError::State(e.to_string())),
        // First contact without a CA given: trust on first use, pinned from then on.
        None => reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| HaError::State(e.to_string())),
    }
}

fn peer_url(host: &str, port: u16, path: &str) -> String {
    let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() };
    format!("https://{host}:{port}{PEER_PREFIX}{path}")
}

#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RegisterRequest {
    pub host: String,
    pub port: u16,
    pub ca_pem: String,
    pub check_interval_ms: u64,
}

#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RegisterResponse {
    pub secret: String,
    pub ca_pem: String,
    pub epoch: u64,
}

#[derive(Deserialize, Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RoleInfo {
    pub role: Role,
    pub epoch: u64,
    pub node: String,
}

#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TakeoverRequest {
    pub force: bool,
    /// The master's current version: a non-forced switch needs the shadow to hold it.
    pub have: String,
}

enum Poll {
    Changed(Box<SyncPayload>),
    Unchanged,
}

impl Admin {
    fn peer_target(&self) -> Option<(String, u16, String, Secret<String>)> {
        let f = self.ha.file();
        let p = f.peer?;
        let secret = self.ha.secret()?;
        Some((p.host, p.port, p.ca_pem, secret))
    }

    /// Asks the peer for its role.
    pub(crate) async fn peer_role(&self, timeout: Duration) -> Result<RoleInfo, HaError> {
        let (host, port, ca, secret) = self.peer_target().ok_or_else(|| HaError::State("no HA peer".into()))?;
        let url = peer_url(&host, port, "/role");
        let r = peer_client(Some(&ca))?
            .get(&url)
            .bearer_auth(secret.expose())
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| HaError::Unreachable(format!("{host}:{port}"), e.to_string()))?;
        if r.status() == reqwest::StatusCode::UNAUTHORIZED {
            return Err(HaError::Unpaired);
        }
        if !r.status().is_success() {
            return Err(HaError::Refused(format!("{} {}", r.status(), r.text().await.unwrap_or_default())));
        }
        r.json().await.map_err(|e| HaError::Refused(e.to_string()))
    }

    /// `CONNECT` of SAP's shadow API: registers with the master using its administrator
    /// credentials and starts syncing.
    pub(crate) async fn shadow_connect(
        self: &Arc<Self>,
        user: &str,
        password: &str,
        master_ca: Option<&str>,
    ) -> Result<(), HaError> {
        let _g = self.ha.role_lock.lock().await;
        let f = self.ha.file();
        if f.role != Role::Shadow {
            return Err(HaError::State("this instance is not a shadow: set haRole to shadow first".into()));
        }
        if f.shadow.master_host.is_empty() || f.shadow.master_port == 0 {
            return Err(HaError::State("configure masterHost and masterPort in the shadow configuration first".into()));
        }
        let own_port = f.shadow.ha_port.or_else(|| self.own_port.get().copied()).unwrap_or(0);
        let own_host = if f.shadow.own_host.is_empty() { "127.0.0.1".to_owned() } else { f.shadow.own_host.clone() };
        let body = RegisterRequest {
            host: own_host,
            port: own_port,
            ca_pem: self.ui_ca_pem.clone(),
            check_interval_ms: (f.shadow.check_interval().as_millis() as u64).max(50),
        };
        let (mh, mp) = (f.shadow.master_host.clone(), f.shadow.master_port);
        self.ha.set_shadow_state(ShadowState::Handshake);
        let r = peer_client(master_ca)?
            .post(peer_url(&mh, mp, "/register"))
            .basic_auth(user, Some(password))
            .json(&body)
            .timeout(Duration::from_millis(f.shadow.connect_timeout_in_millis + f.shadow.request_timeout_in_millis))
            .send()
            .await
            .map_err(|e| {
                self.ha.set_shadow_state(ShadowState::Disconnected);
                HaError::Unreachable(format!("{mh}:{mp}"), e.to_string())
            })?;
        if !r.status().is_success() {
            self.ha.set_shadow_state(ShadowState::Disconnected);
            let status = r.status();
            return Err(HaError::Refused(format!("{status}: {}", r.text().await.unwrap_or_default())));
        }
        let reg: RegisterResponse = r.json().await.map_err(|e| HaError::Refused(e.to_string()))?;
        let sealed = B64.encode(self.store.seal_blob(b"ha-secret", reg.secret.as_bytes())?);
        self.ha.update_file(&self.store, |f| {
            f.peer = Some(Peer {
                host: mh.clone(),
                port: mp,
                ca_pem: reg.ca_pem.clone(),
                secret_sealed: sealed,
                check_interval_ms: body.check_interval_ms,
            });
            f.synced = false;
        })?;
        self.ha.set_secret(Some(Secret::new(reg.secret)));
        self.ha.master_epoch.store(reg.epoch, Ordering::SeqCst);
        self.start_role_task();
        Ok(())
    }

    /// `DISCONNECT`: stops syncing and forgets the pairing.
    pub(crate) async fn shadow_disconnect(&self) -> Result<(), HaError> {
        let _g = self.ha.role_lock.lock().await;
        self.ha.replace_task(None);
        self.ha.update_file(&self.store, |f| f.peer = None)?;
        self.ha.set_secret(None);
        self.ha.set_shadow_state(ShadowState::Disconnected);
        Ok(())
    }

    /// Master side of registration: the caller proved the administrator's password.
    pub(crate) fn register_shadow(self: &Arc<Self>, req: RegisterRequest) -> Result<RegisterResponse, HaError> {
        let f = self.ha.file();
        if f.role != Role::Master {
            return Err(HaError::State("this instance is not the master".into()));
        }
        if !f.master.ha_enabled {
            return Err(HaError::State("high availability is not enabled on the master (haEnabled)".into()));
        }
        if !f.master.allowed_shadow_host.is_empty() && !f.master.allowed_shadow_host.eq_ignore_ascii_case(&req.host) {
            return Err(HaError::Refused(format!("shadow host {} is not the allowed shadow host", req.host)));
        }
        if let Some(p) = &f.peer
            && (p.host != req.host || p.port != req.port)
            && self.ha.shadow_live()
        {
            return Err(HaError::State(format!(
                "the shadow {}:{} is connected; only one shadow is supported (remove it with DELETE ha/master/state)",
                p.host, p.port
            )));
        }
        if req.port == 0 || req.host.is_empty() {
            return Err(HaError::Refused("the shadow must name its host and port".into()));
        }
        ferry_core::tls::parse_certs(&req.ca_pem).map_err(|e| HaError::Refused(format!("caPem: {e}")))?;
        let secret = random_secret();
        let sealed = B64.encode(self.store.seal_blob(b"ha-secret", secret.as_bytes())?);
        let f = self.ha.update_file(&self.store, |f| {
            f.peer = Some(Peer {
                host: req.host,
                port: req.port,
                ca_pem: req.ca_pem,
                secret_sealed: sealed,
                check_interval_ms: req.check_interval_ms.clamp(50, 3_600_000),
            });
        })?;
        self.ha.set_secret(Some(Secret::new(secret.clone())));
        self.ha.forget_shadow();
        self.start_role_task();
        Ok(RegisterResponse { secret, ca_pem: self.ui_ca_pem.clone(), epoch: f.epoch })
    }

    /// Checks a bearer HA secret in constant time.
    pub(crate) fn peer_authorized(&self, bearer: &str) -> bool {
        self.ha.secret().is_some_and(|s| ferry_core::secret::constant_time_eq(s.expose().as_bytes(), bearer.as_bytes()))
    }

    /// Starts the task of the current role: the shadow's sync loop, or the master's peer check.
    pub(crate) fn start_role_task(self: &Arc<Self>) {
        let f = self.ha.file();
        if f.peer.is_none() {
            self.ha.replace_task(None);
            return;
        }
        let sd = self.shutdown.child_token();
        self.ha.replace_task(Some(sd.clone()));
        let me = self.clone();
        match f.role {
            Role::Shadow => {
                tokio::spawn(async move { me.shadow_loop(sd).await });
            }
            Role::Master => {
                tokio::spawn(async move { me.master_peer_check(sd).await });
            }
        }
    }

    async fn poll_master(
        &self,
        client: &reqwest::Client,
        have: &str,
        cfg: &crate::ha::ShadowConfig,
    ) -> Result<Poll, HaError> {
        let secret = self.ha.secret().ok_or_else(|| HaError::State("no HA secret".into()))?;
        let wait = cfg.check_interval().as_millis() as u64;
        let r = client
            .get(peer_url(&cfg.master_host, cfg.master_port, "/sync"))
            .query(&[("have", have.to_owned()), ("waitMs", wait.to_string()), ("intervalMs", wait.to_string())])
            .bearer_auth(secret.expose())
            .timeout(cfg.poll_timeout())
            .send()
            .await
            .map_err(|e| HaError::Unreachable(format!("{}:{}", cfg.master_host, cfg.master_port), e.to_string()))?;
        match r.status().as_u16() {
            204 => Ok(Poll::Unchanged),
            401 => Err(HaError::Unpaired),
            200 => {
                let p: SyncPayload = r.json().await.map_err(|e| HaError::Refused(e.to_string()))?;
                Ok(Poll::Changed(Box::new(p)))
            }
            s => Err(HaError::Refused(format!("{s} {}", r.text().await.unwrap_or_default()))),
        }
    }

    async fn shadow_loop(self: Arc<Self>, sd: Shutdown) {
        let f = self.ha.file();
        let Some(peer) = f.peer.clone() else { return };
        let cfg = f.shadow.clone();
        let client = match peer_client(Some(&peer.ca_pem)) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "HA: no client for the master");
                return;
            }
        };
        let mut have = String::new();
        let mut first_failure: Option<Instant> = None;
        self.ha.set_shadow_state(ShadowState::Handshake);
        loop {
            if sd.is_cancelled() {
                return;
            }
            let r = tokio::select! {
                r = self.poll_master(&client, &have, &cfg) => r,
                _ = sd.cancelled() => return,
            };
            match r {
                Ok(Poll::Changed(p)) => {
                    if have.is_empty() {
                        self.ha.set_shadow_state(ShadowState::InitSync);
                    }
                    self.ha.master_epoch.store(p.epoch, Ordering::SeqCst);
                    let new_have = p.have.clone();
                    if let Some(keys) = p.keys
                        && let Err(e) = self.apply_keys(keys).await
                    {
                        tracing::error!(error = %e, "HA: cannot store the master's certificates");
                        tokio::time::sleep(cfg.check_interval()).await;
                        continue;
                    }
                    match self.apply_sync(p.config).await {
                        Ok(()) => {
                            if !self.ha.file().synced
                                && let Err(e) = self.ha.update_file(&self.store, |f| f.synced = true)
                            {
                                tracing::error!(error = %e, "HA: cannot store the sync state");
                            }
                            have = new_have;
                            first_failure = None;
                            self.ha.set_shadow_state(ShadowState::Ready);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "HA: cannot store the master's configuration");
                            tokio::time::sleep(cfg.check_interval()).await;
                        }
                    }
                }
                Ok(Poll::Unchanged) => {
                    first_failure = None;
                    if !have.is_empty() {
                        self.ha.set_shadow_state(ShadowState::Ready);
                    }
                }
                // The master is alive but dropped the pairing: never a reason to take over.
                Err(HaError::Unpaired) => {
                    tracing::error!("HA: the master refused the HA credential; CONNECT the shadow again");
                    self.ha.set_shadow_state(ShadowState::Disconnected);
                    return;
                }
                Err(e) => {
                    let since = *first_failure.get_or_insert_with(Instant::now);
                    tracing::warn!(error = %e, "HA: master check failed");
                    if self.ha.shadow_state() == ShadowState::Ready {
                        self.ha.set_shadow_state(ShadowState::Lost);
                    }
                    if since.elapsed() >= cfg.takeover_delay() && !self.ha.file().synced {
                        tracing::error!(
                            "HA: the master is gone but this shadow never received its configuration; not taking over"
                        );
                    } else if since.elapsed() >= cfg.takeover_delay() {
                        // Last word before taking over: only a peer that cannot be reached, or says it
                        // is a shadow itself, is replaced.
                        match self.peer_role(Duration::from_millis(cfg.connect_timeout_in_millis)).await {
                            Ok(info) if info.role == Role::Shadow => {}
                            Err(HaError::Unreachable(..)) => {}
                            other => {
                                tracing::warn!(answer = ?other.map(|i| i.role), "HA: the master answers; not taking over");
                                first_failure = None;
                                tokio::time::sleep(cfg.check_interval()).await;
                                continue;
                            }
                        }
                        let me = self.clone();
                        // The promotion replaces this task; run it detached so it is not cancelled with it.
                        tokio::spawn(async move {
                            if let Err(e) = me.promote(false).await {
                                tracing::error!(error = %e, "HA: takeover failed");
                            }
                        });
                        return;
                    }
                    let left = cfg.takeover_delay().saturating_sub(since.elapsed());
                    let pause = if left.is_zero() { cfg.check_interval() } else { cfg.check_interval().min(left) };
                    tokio::select! {
                        _ = tokio::time::sleep(pause.max(Duration::from_millis(20))) => {}
                        _ = sd.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Stores the master's certificates (sealed) and serves with them from now on.
    async fn apply_keys(&self, keys: PairKeys) -> Result<(), HaError> {
        if lock(&self.ha.keys).as_ref() == Some(&keys) {
            return Ok(());
        }
        keys.save(&self.store)?;
        if keys.pp_ca_cert.is_some() && self.config.connection.principal_propagation.is_none() {
            tracing::warn!(
                "HA: the master's principal propagation CA is stored, but this instance has no token verifier \
                 for principal propagation configured; it cannot propagate users when it takes over"
            );
        }
        *lock(&self.ha.keys) = Some(keys);
        Ok(())
    }

    /// Stores the master's configuration on this shadow, keeping its own administrator.
    async fn apply_sync(&self, mut cfg: SccConfig) -> Result<(), HaError> {
        let mut guard = self.state.lock().await;
        cfg.admin = guard.admin.clone();
        for s in &mut cfg.subaccounts {
            if let Some(k) = s.key_pem.take() {
                s.key_sealed = Some(self.store.seal_key(&s.region_host, &s.subaccount, k.expose())?);
            }
        }
        self.store.save(&cfg)?;
        self.audit.set_level(cfg.audit_level);
        *guard = cfg;
        Ok(())
    }

    /// Becomes master: raises the epoch above the last master's, opens the tunnels.
    pub(crate) async fn promote(self: &Arc<Self>, manual: bool) -> Result<(), HaError> {
        let _g = self.ha.role_lock.lock().await;
        if self.ha.role() == Role::Master {
            return Ok(());
        }
        let seen = self.ha.master_epoch.load(Ordering::SeqCst);
        let f = self.ha.update_file(&self.store, |f| {
            f.role = Role::Master;
            // Above the replaced master's epoch whatever the clocks say; the time keeps epochs
            // of instances that never met (reinstalls) in the order they became master.
            f.epoch = (f.epoch.max(seen) + 1).max(now_epoch());
            // The old master becomes the peer to watch; it comes back as shadow.
            if let Some(p) = f.peer.as_mut() {
                p.host = f.shadow.master_host.clone();
                p.port = f.shadow.master_port;
            }
            f.master.ha_enabled = true;
        })?;
        tracing::warn!(epoch = f.epoch, manual, "HA: this instance is now the master");
        self.ha.set_shadow_state(ShadowState::Initial);
        self.ha.forget_shadow();
        let cfg = self.state.lock().await.clone();
        self.ha.publish(cfg.clone(), &self.store);
        for sub in cfg.subaccounts.iter().filter(|s| s.connected) {
            if let Err(e) = self.connect(&cfg, sub).await {
                tracing::error!(subaccount = %sub.subaccount, error = %e.message, "HA: cannot open the tunnel");
            }
        }
        drop(_g);
        self.start_role_task();
        Ok(())
    }

    /// Becomes shadow of the peer: closes the tunnels first.
    pub(crate) async fn demote(self: &Arc<Self>, reason: &str) -> Result<(), HaError> {
        let _g = self.ha.role_lock.lock().await;
        if self.ha.role() == Role::Shadow {
            return Ok(());
        }
        self.instance.disconnect_all().await;
        let f = self.ha.update_file(&self.store, |f| {
            f.role = Role::Shadow;
            f.synced = true;
            if let Some(p) = &f.peer {
                f.shadow.master_host = p.host.clone();
                f.shadow.master_port = p.port;
                f.shadow.check_interval_in_seconds = (p.check_interval_ms as f64 / 1000.0).max(0.05);
            }
        })?;
        tracing::warn!(reason, master = %format!("{}:{}", f.shadow.master_host, f.shadow.master_port), "HA: this instance is now a shadow");
        self.ha.set_shadow_state(ShadowState::Disconnected);
        self.ha.forget_shadow();
        drop(_g);
        self.start_role_task();
        Ok(())
    }

    /// On start of a master with a known peer: if the peer is master with a higher epoch (it
    /// took over while this one was down), become its shadow instead of opening tunnels.
    pub(crate) async fn resolve_role_on_start(self: &Arc<Self>) -> Role {
        let f = self.ha.file();
        if f.role == Role::Master
            && let Some(p) = &f.peer
        {
            let timeout = Duration::from_millis(p.check_interval_ms.max(1000)).min(Duration::from_secs(10));
            match self.peer_role(timeout).await {
                Ok(info) if info.role == Role::Master && (info.epoch, &info.node) > (f.epoch, &f.node) => {
                    tracing::warn!(peer_epoch = info.epoch, "HA: the peer took over; starting as shadow");
                    if let Err(e) = self.ha.update_file(&self.store, |f| {
                        f.role = Role::Shadow;
                        f.shadow.master_host = p.host.clone();
                        f.shadow.master_port = p.port;
                        f.shadow.check_interval_in_seconds = (p.check_interval_ms as f64 / 1000.0).max(0.05);
                    }) {
                        tracing::error!(error = %e, "HA: cannot store the role");
                    }
                    self.ha.set_shadow_state(ShadowState::Disconnected);
                }
                Ok(_) => {}
                Err(e) => tracing::info!(error = %e, "HA: peer not reachable on start; staying master"),
            }
        }
        self.ha.role()
    }

    /// The master checks its peer every check period; it steps down only when the peer says it
    /// is master with a higher epoch, never because the peer is silent.
    async fn master_peer_check(self: Arc<Self>, sd: Shutdown) {
        loop {
            let period = self.ha.check_interval();
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = sd.cancelled() => return,
            }
            let f = self.ha.file();
            if f.role != Role::Master {
                return;
            }
            if let Ok(info) = self.peer_role(period.max(Duration::from_millis(500))).await
                && info.role == Role::Master
                && (info.epoch, &info.node) > (f.epoch, &f.node)
            {
                let me = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = me.demote("another master with a higher epoch").await {
                        tracing::error!(error = %e, "HA: cannot step down");
                    }
                });
                return;
            }
        }
    }

    /// SAP's `SWITCH` / `FORCE_SWITCH`: the shadow takes over, this master becomes its shadow.
    /// The tunnels close here first, so the two never serve at once; if the shadow refuses, they
    /// reopen and the master stays.
    pub(crate) async fn switch(self: &Arc<Self>, force: bool) -> Result<(), HaError> {
        if self.ha.role() != Role::Master {
            return Err(HaError::State("only the master can switch roles".into()));
        }
        let Some((host, port, ca, secret)) = self.peer_target() else {
            return Err(HaError::State("no shadow is registered".into()));
        };
        if !force && self.ha.master_state() != "CONNECTED" {
            return Err(HaError::State(format!(
                "the shadow is not in sync (state {}); use FORCE_SWITCH to switch anyway",
                self.ha.master_state()
            )));
        }
        let cfg = self.state.lock().await;
        let have = self.ha.latest.borrow().have.clone();
        self.instance.disconnect_all().await;
        let body = TakeoverRequest { force, have };
        let r = async {
            let r = peer_client(Some(&ca))?
                .post(peer_url(&host, port, "/takeover"))
                .bearer_auth(secret.expose())
                .json(&body)
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .map_err(|e| HaError::Unreachable(format!("{host}:{port}"), e.to_string()))?;
            if r.status().is_success() {
                Ok(())
            } else {
                Err(HaError::Refused(format!("{} {}", r.status(), r.text().await.unwrap_or_default())))
            }
        }
        .await;
        if let Err(e) = r {
            for sub in cfg.subaccounts.iter().filter(|s| s.connected) {
                if let Err(e) = self.connect(&cfg, sub).await {
                    tracing::error!(subaccount = %sub.subaccount, error = %e.message, "cannot reopen the tunnel");
                }
            }
            return Err(e);
        }
        drop(cfg);
        self.demote("switch-over").await
    }

    /// Shadow side of a switch-over.
    pub(crate) async fn takeover_requested(self: &Arc<Self>, req: TakeoverRequest) -> Result<(), HaError> {
        if self.ha.role() != Role::Shadow {
            return Err(HaError::State("this instance is not a shadow".into()));
        }
        if !self.ha.file().synced {
            return Err(HaError::State("the shadow has not received the configuration yet".into()));
        }
        if !req.force && self.ha.shadow_state() != ShadowState::Ready {
            return Err(HaError::State(format!("the shadow is {}, not READY", self.ha.shadow_state().as_str())));
        }
        self.ha.replace_task(None);
        self.promote(true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_settings_are_validated_and_accept_fractions() {
        let mut c = ShadowConfig::default();
        assert!(c.validate().is_ok());
        assert_eq!((c.check_interval(), c.takeover_delay()), (Duration::from_secs(30), Duration::from_secs(10)));
        c.check_interval_in_seconds = 0.2;
        assert!(c.validate().is_ok());
        assert_eq!(c.check_interval(), Duration::from_millis(200));
        for bad in [0.0, 0.01, -1.0, f64::NAN, f64::INFINITY, 4000.0] {
            c.check_interval_in_seconds = bad;
            assert!(c.validate().is_err(), "{bad}");
        }
        c.check_interval_in_seconds = 1.0;
        c.takeover_delay_in_seconds = -1.0;
        assert!(c.validate().is_err());
        c.takeover_delay_in_seconds = 0.0;
        c.request_timeout_in_millis = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn ha_settings_persist_with_the_secret_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let ha = Ha::open(&store).unwrap();
        assert_eq!(ha.role(), Role::Master);
        assert_eq!(ha.master_state(), "ALONE");
        let sealed = B64.encode(store.seal_blob(b"ha-secret", b"the-secret").unwrap());
        ha.update_file(&store, |f| {
            f.role = Role::Shadow;
            f.peer = Some(Peer {
                host: "h".into(),
                port: 1,
                ca_pem: String::new(),
                secret_sealed: sealed,
                check_interval_ms: 100,
            });
        })
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join(HA_FILE)).unwrap();
        assert!(!text.contains("the-secret"));
        let again = Ha::open(&store).unwrap();
        assert_eq!(again.role(), Role::Shadow);
        assert_eq!(again.shadow_state(), ShadowState::Disconnected);
        assert_eq!(again.secret().unwrap().expose(), "the-secret");
    }
}
