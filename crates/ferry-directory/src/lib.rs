//! The directory of subaccounts (tenants), their service instances (`destination`,
//! `connectivity`, `xsuaa`) and the service keys of those instances.
//!
//! Everything is kept in SQLite: client secrets only as Argon2 hashes (the plain secret exists
//! once, in the response that created the key), tenant signing keys sealed with AES-256-GCM
//! under the master key. The directory applies every change to the token service at once
//! ([`TokenService::add_tenant`], [`TokenService::add_client`], ...), so a key created through
//! the admin API ([`admin::router`]) gets tokens immediately and a deleted one no longer does.

pub mod admin;
pub mod credentials;

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ferry_auth::KeySet;
use ferry_auth::token_service::{CertificateBinding, OAuthClient, Tenant, TokenService, hash_password};
use ferry_core::Secret;
use ferry_core::aead::Sealer;
use ferry_core::tls::LocalCa;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use credentials::{Endpoints, KeyFacts, KeySecret, Service, credentials, vcap_entry};

/// How long the certificate of an X.509 service key is valid.
const X509_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Why a directory operation failed; each maps to one HTTP status in the admin API.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// 400: the named field is unusable.
    #[error("{field}: {message}")]
    BadInput { field: &'static str, message: String },
    /// 404
    #[error("{0} not found")]
    NotFound(String),
    /// 409
    #[error("{0}")]
    Conflict(String),
    /// 500: storage or crypto.
    #[error("{0}")]
    Internal(String),
}

impl From<rusqlite::Error> for DirectoryError {
    fn from(e: rusqlite::Error) -> Self {
        // A uniqueness race the checks before an insert could not see.
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) {
            return DirectoryError::Conflict(format!("conflicts with an existing entry: {e}"));
        }
        DirectoryError::Internal(format!("database: {e}"))
    }
}

fn bad(field: &'static str, message: impl Into<String>) -> DirectoryError {
    DirectoryError::BadInput { field, message: message.into() }
}

/// A subaccount (tenant, identity zone).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Subaccount {
    pub id: String,
    pub subdomain: String,
    pub created_at: i64,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ServiceInstance {
    pub id: String,
    pub subaccount_id: String,
    pub service: String,
    pub name: String,
    pub plan: String,
    pub created_at: i64,
    /// What the instance was created with (BTP's `parameters`), if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<InstanceParameters>,
}

/// The instance parameters Ferry takes, in the shape of an `xs-security.json` (BTP's
/// `parameters` of an xsuaa instance). Other keys are refused rather than ignored, so that a
/// setting that would not take effect is noticed.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InstanceParameters {
    #[serde(rename = "oauth2-configuration", default, skip_serializing_if = "Option::is_none")]
    pub oauth2_configuration: Option<OAuth2Configuration>,
}

/// `oauth2-configuration` of an `xs-security.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Configuration {
    /// Where the authorization code flow may send users back to (exact, or below a path
    /// ending in `/`): the App Router's `/login/callback`, for instance.
    #[serde(rename = "redirect-uris", default)]
    pub redirect_uris: Vec<String>,
}

impl InstanceParameters {
    fn redirect_uris(&self) -> &[String] {
        self.oauth2_configuration.as_ref().map_or(&[], |o| o.redirect_uris.as_slice())
    }
}

/// A service key as lists show it: never its secret.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ServiceKey {
    pub id: String,
    pub subaccount_id: String,
    pub instance_id: String,
    pub name: String,
    pub client_id: String,
    pub credential_type: String,
    pub created_at: i64,
}

/// What a new key is created with; `None` fields are generated.
#[derive(Clone, Debug, Default)]
pub struct NewKey {
    pub name: String,
    /// `binding-secret` (default) or `x509`.
    pub credential_type: Option<String>,
    pub client_id: Option<String>,
    pub xsappname: Option<String>,
    pub secret: Option<Secret<String>>,
}

/// The directory; see the crate documentation.
pub struct Directory {
    conn: Mutex<Connection>,
    sealer: Sealer,
    endpoints: Endpoints,
    /// Issues the certificates of X.509 keys; without it only `binding-secret` keys exist.
    ca: Option<Arc<LocalCa>>,
    tokens: OnceLock<Arc<TokenService>>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory").field("endpoints", &self.endpoints).finish_non_exhaustive()
    }
}

const SCHEMA: &str = "
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS subaccounts (
    id TEXT PRIMARY KEY,
    subdomain TEXT NOT NULL UNIQUE COLLATE NOCASE,
    signing_keys BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS service_instances (
    id TEXT PRIMARY KEY,
    subaccount_id TEXT NOT NULL REFERENCES subaccounts(id) ON DELETE CASCADE,
    service TEXT NOT NULL,
    name TEXT NOT NULL,
    plan TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (subaccount_id, name)
);
CREATE TABLE IF NOT EXISTS service_keys (
    id TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL REFERENCES service_instances(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    client_id TEXT NOT NULL UNIQUE,
    xsappname TEXT NOT NULL,
    credential_type TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (instance_id, name)
);
";

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn random_secret() -> String {
    let bytes: [u8; 24] = rand::random();
    hex::encode(bytes)
}

/// A GUID as BTP writes them (lower case, hyphenated).
fn parse_guid(field: &'static str, raw: &str) -> Result<String, DirectoryError> {
    uuid::Uuid::parse_str(raw)
        .ok()
        .filter(|_| raw.len() == 36)
        .map(|u| u.hyphenated().to_string())
        .ok_or_else(|| bad(field, format!("{raw:?} is not a GUID (8-4-4-4-12 hex digits)")))
}

fn check_subdomain(s: &str) -> Result<(), DirectoryError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok { Ok(()) } else { Err(bad("subdomain", format!("{s:?} is not a DNS label (letters, digits, '-')"))) }
}

fn check_name(field: &'static str, s: &str) -> Result<(), DirectoryError> {
    let ok = !s.is_empty()
        && s.len() <= 100
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !s.starts_with(['-', '.']);
    if ok { Ok(()) } else { Err(bad(field, format!("{s:?} must be 1-100 of letters, digits, '-', '_', '.'"))) }
}

fn verify_hash(phc: &str, secret: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier as _};
    let Ok(hash) = PasswordHash::new(phc) else { return false };
    argon2::Argon2::default().verify_password(secret.as_bytes(), &hash).is_ok()
}

struct KeyRow {
    key: ServiceKey,
    xsappname: String,
    secret_hash: String,
    /// The PEM certificate issued for an X.509 key (public), so that client assertions it signs
    /// keep verifying after a restart.
    certificate: Option<String>,
    /// The instance's `oauth2-configuration.redirect-uris`.
    redirect_uris: Vec<String>,
}

/// Databases made before instances kept their parameters lack the column.
fn add_parameters_column(conn: &Connection) -> rusqlite::Result<()> {
    let has =
        conn.prepare("SELECT 1 FROM pragma_table_info('service_instances') WHERE name = 'parameters'")?.exists([])?;
    if !has {
        conn.execute_batch("ALTER TABLE service_instances ADD COLUMN parameters TEXT")?;
    }
    Ok(())
}

/// Databases made before X.509 keys kept their certificate lack the column.
fn add_certificate_column(conn: &Connection) -> rusqlite::Result<()> {
    let has = conn.prepare("SELECT 1 FROM pragma_table_info('service_keys') WHERE name = 'certificate'")?.exists([])?;
    if !has {
        conn.execute_batch("ALTER TABLE service_keys ADD COLUMN certificate TEXT")?;
    }
    Ok(())
}

impl Directory {
    /// Opens (or creates) the database at `path`. Call [`Directory::attach`] once the token
    /// service is built from [`Directory::token_entries`].
    pub fn open(
        path: &Path,
        master_key: &Secret<[u8; 32]>,
        endpoints: Endpoints,
        ca: Option<Arc<LocalCa>>,
    ) -> Result<Arc<Self>, DirectoryError> {
        let conn = Connection::open(path)?;
        Self::with_connection(conn, master_key, endpoints, ca)
    }

    /// An in-memory directory, for tests.
    pub fn in_memory(
        master_key: &Secret<[u8; 32]>,
        endpoints: Endpoints,
        ca: Option<Arc<LocalCa>>,
    ) -> Result<Arc<Self>, DirectoryError> {
        Self::with_connection(Connection::open_in_memory()?, master_key, endpoints, ca)
    }

    fn with_connection(
        conn: Connection,
        master_key: &Secret<[u8; 32]>,
        endpoints: Endpoints,
        ca: Option<Arc<LocalCa>>,
    ) -> Result<Arc<Self>, DirectoryError> {
        conn.execute_batch(SCHEMA)?;
        add_certificate_column(&conn)?;
        add_parameters_column(&conn)?;
        let sealer = Sealer::new(master_key).map_err(|e| DirectoryError::Internal(e.to_string()))?;
        Ok(Arc::new(Self { conn: Mutex::new(conn), sealer, endpoints, ca, tokens: OnceLock::new() }))
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on every change is applied to `tokens` too. `tokens` must already hold
    /// [`Directory::token_entries`] (see [`TokenService::with_runtime_entries`]).
    pub fn attach(&self, tokens: Arc<TokenService>) {
        let _ = self.tokens.set(tokens);
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Every tenant and client the directory holds, for building the token service.
    pub fn token_entries(&self) -> Result<(Vec<Tenant>, Vec<OAuthClient>), DirectoryError> {
        let subs: Vec<(String, String, Vec<u8>)> = {
            let db = self.db();
            let mut st = db.prepare("SELECT id, subdomain, signing_keys FROM subaccounts ORDER BY created_at, id")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?
        };
        let mut tenants = Vec::new();
        for (id, subdomain, sealed) in subs {
            let keys = self.open_keys(&id, &sealed)?;
            tenants.push(Tenant { id, subdomain, keys });
        }
        let rows = self.key_rows("1 = 1", &[])?;
        let mut clients = Vec::new();
        for row in rows {
            clients.push(self.oauth_client(&row)?);
        }
        Ok((tenants, clients))
    }

    fn seal_keys(&self, id: &str, keys: &KeySet) -> Result<Vec<u8>, DirectoryError> {
        let stored: Vec<(String, String)> =
            keys.export_pkcs8().into_iter().map(|(kid, der)| (kid, hex::encode(der.expose()))).collect();
        let plain = Secret::new(serde_json::to_vec(&stored).map_err(|e| DirectoryError::Internal(e.to_string()))?);
        self.sealer
            .seal(format!("subaccount-keys:{id}").as_bytes(), plain.expose())
            .map_err(|e| DirectoryError::Internal(e.to_string()))
    }

    fn open_keys(&self, id: &str, sealed: &[u8]) -> Result<Arc<KeySet>, DirectoryError> {
        let plain = self
            .sealer
            .open(format!("subaccount-keys:{id}").as_bytes(), sealed)
            .map_err(|e| DirectoryError::Internal(format!("signing keys of subaccount {id}: {e}")))?;
        let stored: Vec<(String, String)> =
            serde_json::from_slice(&plain).map_err(|e| DirectoryError::Internal(e.to_string()))?;
        let keys = stored
            .into_iter()
            .map(|(kid, h)| {
                Ok((kid, Secret::new(hex::decode(h).map_err(|e| DirectoryError::Internal(e.to_string()))?)))
            })
            .collect::<Result<Vec<_>, DirectoryError>>()?;
        Ok(Arc::new(KeySet::from_pkcs8(&keys).map_err(|e| DirectoryError::Internal(e.to_string()))?))
    }

    // ---- subaccounts ----

    /// Creates a subaccount with new signing keys (or `keys`, to adopt existing ones).
    pub fn create_subaccount(
        &self,
        subdomain: &str,
        id: Option<&str>,
        keys: Option<Arc<KeySet>>,
    ) -> Result<Subaccount, DirectoryError> {
        check_subdomain(subdomain)?;
        let id = match id {
            Some(raw) => parse_guid("id", raw).or_else(|e| {
                // Ids from an existing configuration need not be GUIDs; the token service's
                // own rules still apply.
                if raw.len() <= 128 && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                    Ok(raw.to_owned())
                } else {
                    Err(e)
                }
            })?,
            None => uuid::Uuid::new_v4().to_string(),
        };
        let keys = match keys {
            Some(k) => k,
            None => Arc::new(KeySet::generate().map_err(|e| DirectoryError::Internal(e.to_string()))?),
        };
        let sealed = self.seal_keys(&id, &keys)?;
        let sub = Subaccount { id: id.clone(), subdomain: subdomain.to_owned(), created_at: now() };
        {
            let db = self.db();
            if db.query_row("SELECT 1 FROM subaccounts WHERE id = ?1", [&id], |_| Ok(())).optional()?.is_some() {
                return Err(DirectoryError::Conflict(format!("subaccount {id} exists already")));
            }
            if db
                .query_row("SELECT 1 FROM subaccounts WHERE subdomain = ?1", [subdomain], |_| Ok(()))
                .optional()?
                .is_some()
            {
                return Err(DirectoryError::Conflict(format!("subdomain {subdomain:?} is taken")));
            }
            db.execute(
                "INSERT INTO subaccounts (id, subdomain, signing_keys, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![id, subdomain, sealed, sub.created_at],
            )?;
        }
        if let Some(tokens) = self.tokens.get()
            && let Err(e) = tokens.add_tenant(Tenant { id: id.clone(), subdomain: subdomain.to_owned(), keys })
        {
            self.db().execute("DELETE FROM subaccounts WHERE id = ?1", [&id])?;
            return Err(DirectoryError::Conflict(e.to_string()));
        }
        Ok(sub)
    }

    pub fn list_subaccounts(&self) -> Result<Vec<Subaccount>, DirectoryError> {
        let db = self.db();
        let mut st = db.prepare("SELECT id, subdomain, created_at FROM subaccounts ORDER BY created_at, id")?;
        let rows =
            st.query_map([], |r| Ok(Subaccount { id: r.get(0)?, subdomain: r.get(1)?, created_at: r.get(2)? }))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn subaccount(&self, id: &str) -> Result<Subaccount, DirectoryError> {
        self.db()
            .query_row("SELECT id, subdomain, created_at FROM subaccounts WHERE id = ?1", [id], |r| {
                Ok(Subaccount { id: r.get(0)?, subdomain: r.get(1)?, created_at: r.get(2)? })
            })
            .optional()?
            .ok_or_else(|| DirectoryError::NotFound(format!("subaccount {id}")))
    }

    /// Deletes a subaccount with its instances and keys; its tokens stop working at once.
    pub fn delete_subaccount(&self, id: &str) -> Result<(), DirectoryError> {
        self.subaccount(id)?;
        if let Some(tokens) = self.tokens.get() {
            tokens.remove_tenant(id).map_err(|e| DirectoryError::Conflict(e.to_string()))?;
        }
        self.db().execute("DELETE FROM subaccounts WHERE id = ?1", [id])?;
        Ok(())
    }

    // ---- service instances ----

    pub fn create_instance(
        &self,
        subaccount_id: &str,
        service: &str,
        name: &str,
        plan: Option<&str>,
        id: Option<&str>,
        parameters: Option<InstanceParameters>,
    ) -> Result<ServiceInstance, DirectoryError> {
        self.subaccount(subaccount_id)?;
        let svc = Service::parse(service)
            .ok_or_else(|| bad("service", format!("{service:?} is not one of destination, connectivity, xsuaa")))?;
        check_name("name", name)?;
        if let Some(p) = &parameters {
            if !p.redirect_uris().is_empty() && svc != Service::Xsuaa {
                return Err(bad(
                    "parameters",
                    "oauth2-configuration.redirect-uris is for xsuaa instances: users sign in to an app through its xsuaa binding",
                ));
            }
            for uri in p.redirect_uris() {
                ferry_auth::token_service::check_redirect_uri(uri)
                    .map_err(|reason| bad("parameters", format!("redirect URI {uri:?}: {reason}")))?;
            }
        }
        let parameters = parameters.filter(|p| *p != InstanceParameters::default());
        let plan = plan.unwrap_or(svc.default_plan());
        check_name("plan", plan)?;
        let id = match id {
            Some(raw) => parse_guid("id", raw)?,
            None => uuid::Uuid::new_v4().to_string(),
        };
        let inst = ServiceInstance {
            id,
            subaccount_id: subaccount_id.to_owned(),
            service: svc.as_str().to_owned(),
            name: name.to_owned(),
            plan: plan.to_owned(),
            created_at: now(),
            parameters,
        };
        let db = self.db();
        if db.query_row("SELECT 1 FROM service_instances WHERE id = ?1", [&inst.id], |_| Ok(())).optional()?.is_some() {
            return Err(DirectoryError::Conflict(format!("service instance {} exists already", inst.id)));
        }
        let taken = db
            .query_row(
                "SELECT 1 FROM service_instances WHERE subaccount_id = ?1 AND name = ?2",
                [subaccount_id, name],
                |_| Ok(()),
            )
            .optional()?;
        if taken.is_some() {
            return Err(DirectoryError::Conflict(format!("a service instance named {name:?} exists already")));
        }
        db.execute(
            "INSERT INTO service_instances (id, subaccount_id, service, name, plan, created_at, parameters)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                inst.id,
                inst.subaccount_id,
                inst.service,
                inst.name,
                inst.plan,
                inst.created_at,
                inst.parameters.as_ref().map(|p| serde_json::to_string(p).unwrap_or_default())
            ],
        )?;
        Ok(inst)
    }

    pub fn list_instances(&self, subaccount_id: &str) -> Result<Vec<ServiceInstance>, DirectoryError> {
        self.subaccount(subaccount_id)?;
        let db = self.db();
        let mut st = db.prepare(
            "SELECT id, subaccount_id, service, name, plan, created_at, parameters FROM service_instances
             WHERE subaccount_id = ?1 ORDER BY created_at, name",
        )?;
        let rows = st.query_map([subaccount_id], instance_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn instance(&self, subaccount_id: &str, id: &str) -> Result<ServiceInstance, DirectoryError> {
        self.subaccount(subaccount_id)?;
        self.db()
            .query_row(
                "SELECT id, subaccount_id, service, name, plan, created_at, parameters FROM service_instances
                 WHERE subaccount_id = ?1 AND id = ?2",
                [subaccount_id, id],
                instance_row,
            )
            .optional()?
            .ok_or_else(|| DirectoryError::NotFound(format!("service instance {id}")))
    }

    /// Deletes an instance with its keys.
    pub fn delete_instance(&self, subaccount_id: &str, id: &str) -> Result<(), DirectoryError> {
        self.instance(subaccount_id, id)?;
        for row in self.key_rows("k.instance_id = ?1", &[id])? {
            self.remove_client(&row.key.client_id)?;
        }
        self.db().execute("DELETE FROM service_instances WHERE id = ?1", [id])?;
        Ok(())
    }

    // ---- service keys ----

    /// Creates a key and returns its `credentials`, the only place its secret appears.
    pub fn create_key(&self, subaccount_id: &str, instance_id: &str, new: NewKey) -> Result<Value, DirectoryError> {
        let sub = self.subaccount(subaccount_id)?;
        let inst = self.instance(subaccount_id, instance_id)?;
        check_name("name", &new.name)?;
        let x509 = match new.credential_type.as_deref() {
            None | Some("binding-secret") => false,
            Some("x509") => true,
            Some(other) => {
                return Err(bad("credential_type", format!("{other:?} is not binding-secret or x509")));
            }
        };
        if x509 && self.ca.is_none() {
            return Err(bad("credential_type", "x509 keys need a CA, and this directory has none"));
        }
        let svc = Service::parse(&inst.service).ok_or_else(|| DirectoryError::Internal("unknown service".into()))?;
        let id = uuid::Uuid::new_v4().to_string();
        let client_id = new.client_id.clone().unwrap_or_else(|| format!("sb-{id}!{}", svc.client_suffix()));
        if client_id.is_empty() || client_id.len() > 200 || client_id.chars().any(|c| c.is_control() || c == ':') {
            return Err(bad("client_id", "must be 1-200 characters without ':' or control characters"));
        }
        let xsappname =
            new.xsappname.clone().unwrap_or_else(|| client_id.strip_prefix("sb-").unwrap_or(&client_id).to_owned());
        let secret = if x509 { None } else { Some(new.secret.clone().unwrap_or_else(|| random_secret().into())) };
        let secret_hash = match &secret {
            Some(s) => hash_password(s.expose()).map_err(|e| DirectoryError::Internal(e.to_string()))?,
            None => String::new(),
        };
        let row = KeyRow {
            key: ServiceKey {
                id: id.clone(),
                subaccount_id: subaccount_id.to_owned(),
                instance_id: instance_id.to_owned(),
                name: new.name.clone(),
                client_id: client_id.clone(),
                credential_type: if x509 { "x509" } else { "binding-secret" }.to_owned(),
                created_at: now(),
            },
            xsappname: xsappname.clone(),
            // Issued below, once the token service knows the client.
            certificate: None,
            secret_hash,
            redirect_uris: inst.parameters.as_ref().map(|p| p.redirect_uris().to_vec()).unwrap_or_default(),
        };
        {
            let db = self.db();
            let taken = db
                .query_row(
                    "SELECT 1 FROM service_keys WHERE instance_id = ?1 AND name = ?2",
                    [instance_id, &new.name],
                    |_| Ok(()),
                )
                .optional()?;
            if taken.is_some() {
                return Err(DirectoryError::Conflict(format!("a service key named {:?} exists already", new.name)));
            }
            if db
                .query_row("SELECT 1 FROM service_keys WHERE client_id = ?1", [&client_id], |_| Ok(()))
                .optional()?
                .is_some()
            {
                return Err(DirectoryError::Conflict(format!("client id {client_id:?} is taken")));
            }
            db.execute(
                "INSERT INTO service_keys (id, instance_id, name, client_id, xsappname, credential_type, secret_hash, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    row.key.id,
                    instance_id,
                    row.key.name,
                    client_id,
                    xsappname,
                    row.key.credential_type,
                    row.secret_hash,
                    row.key.created_at
                ],
            )?;
        }
        if let Some(tokens) = self.tokens.get() {
            let added = self
                .oauth_client(&row)
                .and_then(|c| tokens.add_client(c).map_err(|e| DirectoryError::Conflict(e.to_string())));
            if let Err(e) = added {
                self.db().execute("DELETE FROM service_keys WHERE id = ?1", [&id])?;
                return Err(e);
            }
        }
        let cert = match (x509, &self.ca, self.tokens.get()) {
            (true, Some(ca), Some(tokens)) => {
                let cert = tokens
                    .issue_client_certificate(ca, &client_id, X509_VALIDITY)
                    .map_err(|e| DirectoryError::Internal(e.to_string()))?;
                self.db().execute("UPDATE service_keys SET certificate = ?1 WHERE id = ?2", [&cert.cert_pem, &id])?;
                Some(cert)
            }
            (true, _, _) => return Err(bad("credential_type", "x509 keys need a running token service")),
            _ => None,
        };
        let key_secret = match (&secret, &cert) {
            (Some(s), _) => KeySecret::Secret(s.expose()),
            (None, Some(c)) => KeySecret::X509 { certificate: &c.cert_pem, key: c.key_pem.expose() },
            (None, None) => return Err(DirectoryError::Internal("a key without secret".into())),
        };
        Ok(credentials(
            &self.endpoints,
            &KeyFacts {
                service: svc,
                client_id: &client_id,
                xsappname: &xsappname,
                instance_id,
                subaccount_id,
                subdomain: &sub.subdomain,
                secret: key_secret,
            },
        ))
    }

    /// The key with `client_id`, made to accept `secret` (creating it if needed, and replacing
    /// a key of the same name with another client id), and its credentials: how `ferry up`
    /// keeps the bindings of its configuration file. Call it before [`Directory::attach`].
    pub fn ensure_key(
        &self,
        subaccount_id: &str,
        instance_id: &str,
        new: NewKey,
    ) -> Result<(ServiceKey, Value), DirectoryError> {
        let client_id = new.client_id.clone().ok_or_else(|| bad("client_id", "required"))?;
        let secret = new.secret.clone().ok_or_else(|| bad("secret", "required"))?;
        let existing = self.key_rows("k.client_id = ?1", &[&client_id])?.into_iter().next();
        let Some(row) = existing else {
            // The configuration names another client for this key now: replace the old one.
            if let Some(old) = self.key_rows("k.instance_id = ?1 AND k.name = ?2", &[instance_id, &new.name])?.pop() {
                self.remove_client(&old.key.client_id)?;
                self.db().execute("DELETE FROM service_keys WHERE id = ?1", [&old.key.id])?;
            }
            let creds = self.create_key(subaccount_id, instance_id, new)?;
            let key = self
                .key_rows("k.client_id = ?1", &[&client_id])?
                .into_iter()
                .next()
                .ok_or_else(|| DirectoryError::Internal("key vanished".into()))?;
            return Ok((key.key, creds));
        };
        if !verify_hash(&row.secret_hash, secret.expose()) {
            let hash = hash_password(secret.expose()).map_err(|e| DirectoryError::Internal(e.to_string()))?;
            self.db().execute("UPDATE service_keys SET secret_hash = ?1 WHERE id = ?2", [&hash, &row.key.id])?;
        }
        let sub = self.subaccount(&row.key.subaccount_id)?;
        let inst = self.instance(&row.key.subaccount_id, &row.key.instance_id)?;
        let svc = Service::parse(&inst.service).ok_or_else(|| DirectoryError::Internal("unknown service".into()))?;
        let creds = credentials(
            &self.endpoints,
            &KeyFacts {
                service: svc,
                client_id: &client_id,
                xsappname: &row.xsappname,
                instance_id: &inst.id,
                subaccount_id: &sub.id,
                subdomain: &sub.subdomain,
                secret: KeySecret::Secret(secret.expose()),
            },
        );
        Ok((row.key, creds))
    }

    pub fn list_keys(&self, subaccount_id: &str, instance_id: &str) -> Result<Vec<ServiceKey>, DirectoryError> {
        self.instance(subaccount_id, instance_id)?;
        Ok(self.key_rows("k.instance_id = ?1", &[instance_id])?.into_iter().map(|r| r.key).collect())
    }

    pub fn key(&self, subaccount_id: &str, instance_id: &str, id: &str) -> Result<ServiceKey, DirectoryError> {
        self.instance(subaccount_id, instance_id)?;
        self.key_rows("k.instance_id = ?1 AND k.id = ?2", &[instance_id, id])?
            .into_iter()
            .next()
            .map(|r| r.key)
            .ok_or_else(|| DirectoryError::NotFound(format!("service key {id}")))
    }

    pub fn delete_key(&self, subaccount_id: &str, instance_id: &str, id: &str) -> Result<(), DirectoryError> {
        let key = self.key(subaccount_id, instance_id, id)?;
        self.remove_client(&key.client_id)?;
        self.db().execute("DELETE FROM service_keys WHERE id = ?1", [id])?;
        Ok(())
    }

    fn remove_client(&self, client_id: &str) -> Result<(), DirectoryError> {
        if let Some(tokens) = self.tokens.get() {
            tokens.remove_client(client_id).map_err(|e| DirectoryError::Conflict(e.to_string()))?;
        }
        Ok(())
    }

    fn key_rows(&self, filter: &str, args: &[&str]) -> Result<Vec<KeyRow>, DirectoryError> {
        let db = self.db();
        let sql = format!(
            "SELECT k.id, i.subaccount_id, k.instance_id, k.name, k.client_id, k.credential_type, k.created_at,
                    k.xsappname, k.secret_hash, k.certificate, i.parameters
             FROM service_keys k JOIN service_instances i ON i.id = k.instance_id
             WHERE {filter} ORDER BY k.created_at, k.name"
        );
        let mut st = db.prepare(&sql)?;
        let rows = st.query_map(rusqlite::params_from_iter(args.iter()), |r| {
            Ok(KeyRow {
                key: ServiceKey {
                    id: r.get(0)?,
                    subaccount_id: r.get(1)?,
                    instance_id: r.get(2)?,
                    name: r.get(3)?,
                    client_id: r.get(4)?,
                    credential_type: r.get(5)?,
                    created_at: r.get(6)?,
                },
                xsappname: r.get(7)?,
                secret_hash: r.get(8)?,
                certificate: r.get(9)?,
                redirect_uris: parameters_of(r.get(10)?).map(|p| p.redirect_uris().to_vec()).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The token service's client for a key.
    fn oauth_client(&self, row: &KeyRow) -> Result<OAuthClient, DirectoryError> {
        let certificates = if row.key.credential_type == "x509" {
            let ca = self.ca.as_ref().ok_or_else(|| DirectoryError::Internal("x509 key without a CA".into()))?;
            vec![
                CertificateBinding::issued_by(ca, &row.key.client_id)
                    .ok_or_else(|| DirectoryError::Internal("cannot describe the CA".into()))?,
            ]
        } else {
            vec![]
        };
        Ok(OAuthClient {
            client_id: row.key.client_id.clone(),
            client_secret: Secret::new(row.secret_hash.clone()),
            tenant_id: row.key.subaccount_id.clone(),
            xsappname: row.xsappname.clone(),
            authorities: vec!["uaa.resource".into()],
            scopes: vec!["openid".into(), format!("{}.Display", row.xsappname)],
            service_instance_id: Some(row.key.instance_id.clone()),
            certificates,
            assertion_keys: row.certificate.iter().cloned().collect(),
            redirect_uris: row.redirect_uris.clone(),
            // The credentials say `tenantmode: dedicated`, and subaccounts here subscribe to
            // nothing: another zone's tokens would cross the tenant boundary.
            dedicated: true,
            ..Default::default()
        })
    }
}

fn instance_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ServiceInstance> {
    Ok(ServiceInstance {
        id: r.get(0)?,
        subaccount_id: r.get(1)?,
        service: r.get(2)?,
        name: r.get(3)?,
        plan: r.get(4)?,
        created_at: r.get(5)?,
        parameters: parameters_of(r.get(6)?),
    })
}

/// The stored `parameters` column (JSON written by `create_instance`).
fn parameters_of(stored: Option<String>) -> Option<InstanceParameters> {
    stored.and_then(|s| serde_json::from_str(&s).ok())
}
