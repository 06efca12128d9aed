//! The instance's persistent configuration: one JSON file in the data folder, replaced
//! atomically (temp file, fsync, rename, fsync of the folder) so a crash leaves the old or the
//! new configuration, never half of one. Connection keys are sealed (AES-256-GCM) under a key
//! file next to it; the administrator's password is an Argon2id hash.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ferry_core::Secret;
use ferry_core::aead::Sealer;
use serde::{Deserialize, Serialize};

use crate::SystemMapping;
use crate::audit::AuditLevel;

pub const CONFIG_FILE: &str = "scc-config.json";
pub const KEY_FILE: &str = "scc-master.key";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data folder {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("configuration file {0} is not valid: {1}")]
    Parse(PathBuf, serde_json::Error),
    #[error("the key file {0} must hold exactly 32 bytes")]
    KeyFile(PathBuf),
    #[error("sealing: {0}")]
    Seal(#[from] ferry_core::aead::SealError),
    #[error("password hashing: {0}")]
    Hash(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminUser {
    pub user: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// True until the initial password `manage` is changed; every API but the password
    /// change answers 403 meanwhile.
    pub initial_password: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PpSettings {
    pub expiration_tolerance_in_hr: u32,
    pub certificate_validity_in_min: u32,
}

impl Default for PpSettings {
    fn default() -> Self {
        Self { expiration_tolerance_in_hr: 1, certificate_validity_in_min: 60 }
    }
}

/// A system mapping as stored: SAP's `backendType` (informational here) next to the rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredMapping {
    #[serde(default)]
    pub backend_type: Option<String>,
    pub mapping: SystemMapping,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredSubaccount {
    /// Ferry: the tunnel endpoint `host:port` (SAP: the region host).
    pub region_host: String,
    /// Ferry: the tunnel endpoint of every proxy replica (`host:port`), dialled instead of the
    /// region host alone; empty: the region host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxy_replicas: Vec<String>,
    /// Ferry: each endpoint's host stands for all its A/AAAA records, one tunnel set per
    /// address, looked up again periodically (see `ConnectorConfig::resolve_replicas`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resolve_proxy_replicas: bool,
    pub subaccount: String,
    #[serde(rename = "locationID", default)]
    pub location_id: String,
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub description: String,
    /// Whether the administrator wants the tunnel up (`PUT .../state`).
    pub connected: bool,
    #[serde(default)]
    pub audit_level: AuditLevel,
    /// Name on the tunnel endpoint's server certificate.
    pub server_name: String,
    /// Trust anchor for the tunnel endpoint.
    pub ca: String,
    /// The subaccount (connection) certificate.
    pub certificate: String,
    /// Its key, sealed under the data folder's key (base64); absent in a backup's plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sealed: Option<String>,
    /// The key in clear: only inside a backup, which is itself encrypted with its password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_pem: Option<Secret<String>>,
    #[serde(default)]
    pub system_mappings: Vec<StoredMapping>,
    /// Where the certificate is renewed before it expires (the directory's mTLS endpoint, from
    /// the authentication data); `None`: renewal is manual (`POST .../validity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_url: Option<String>,
    /// Service channels (on-premise → cloud) of this subaccount.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_channels: Vec<crate::channel::ServiceChannel>,
}

impl StoredSubaccount {
    pub fn key(&self) -> (String, String) {
        (self.region_host.clone(), self.subaccount.clone())
    }

    /// The tunnel endpoints to dial: the replicas, or else the region host.
    pub fn proxies(&self) -> Vec<String> {
        if self.proxy_replicas.is_empty() { vec![self.region_host.clone()] } else { self.proxy_replicas.clone() }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SccConfig {
    #[serde(default)]
    pub description: String,
    pub admin: AdminUser,
    /// Cross-subaccount audit level (configuration changes).
    #[serde(default)]
    pub audit_level: AuditLevel,
    #[serde(default)]
    pub pp_settings: PpSettings,
    #[serde(default)]
    pub subaccounts: Vec<StoredSubaccount>,
}

pub const DEFAULT_USER: &str = "Administrator";
pub const DEFAULT_PASSWORD: &str = "manage";

impl SccConfig {
    fn initial() -> Result<Self, StoreError> {
        Ok(Self {
            description: String::new(),
            admin: AdminUser {
                user: DEFAULT_USER.into(),
                password_hash: hash_password(DEFAULT_PASSWORD)?,
                initial_password: true,
            },
            audit_level: AuditLevel::default(),
            pp_settings: PpSettings::default(),
            subaccounts: Vec::new(),
        })
    }

    /// A configuration with nothing in it (placeholder before the first HA publication).
    pub fn empty() -> Self {
        Self {
            description: String::new(),
            admin: AdminUser { user: String::new(), password_hash: String::new(), initial_password: false },
            audit_level: AuditLevel::default(),
            pp_settings: PpSettings::default(),
            subaccounts: Vec::new(),
        }
    }

    pub fn subaccount(&self, region: &str, sub: &str) -> Option<&StoredSubaccount> {
        self.subaccounts.iter().find(|s| s.region_host == region && s.subaccount == sub)
    }

    pub fn subaccount_mut(&mut self, region: &str, sub: &str) -> Option<&mut StoredSubaccount> {
        self.subaccounts.iter_mut().find(|s| s.region_host == region && s.subaccount == sub)
    }
}

pub fn hash_password(password: &str) -> Result<String, StoreError> {
    ferry_auth::token_service::hash_password(password).map_err(|e| StoreError::Hash(e.to_string()))
}

/// Verifies on the calling thread: call it from the blocking pool.
pub fn verify_password(phc: &str, password: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier as _};
    let Ok(hash) = PasswordHash::new(phc) else { return false };
    argon2::Argon2::default().verify_password(password.as_bytes(), &hash).is_ok()
}

pub struct Store {
    dir: PathBuf,
    sealer: Sealer,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io(path.to_owned(), e)
}

/// Writes `bytes` to `path` atomically, with mode 0600 for a new file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn key_aad(region: &str, sub: &str) -> Vec<u8> {
    format!("scc-subaccount-key\0{region}\0{sub}").into_bytes()
}

impl Store {
    /// Opens the data folder, creating it, its key file and the initial configuration on
    /// first start.
    pub fn open(dir: &Path) -> Result<(Self, SccConfig), StoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let key_path = dir.join(KEY_FILE);
        let key = match std::fs::read(&key_path) {
            Ok(k) => <[u8; 32]>::try_from(k.as_slice()).map_err(|_| StoreError::KeyFile(key_path.clone()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut k = [0u8; 32];
                aws_lc_rs::rand::fill(&mut k).map_err(|_| StoreError::Seal(ferry_core::aead::SealError::Seal))?;
                write_atomic(&key_path, &k)?;
                k
            }
            Err(e) => return Err(StoreError::Io(key_path, e)),
        };
        let store = Self { dir: dir.to_owned(), sealer: Sealer::new(&Secret::new(key))? };
        let path = dir.join(CONFIG_FILE);
        let config = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Parse(path.clone(), e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let c = SccConfig::initial()?;
                store.save(&c)?;
                c
            }
            Err(e) => return Err(StoreError::Io(path, e)),
        };
        Ok((store, config))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn save(&self, config: &SccConfig) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(config).map_err(|e| StoreError::Parse(self.dir.join(CONFIG_FILE), e))?;
        write_atomic(&self.dir.join(CONFIG_FILE), &bytes)
    }

    pub fn seal_blob(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        Ok(self.sealer.seal(aad, plain)?)
    }

    pub fn open_blob(&self, aad: &[u8], sealed: &[u8]) -> Result<String, StoreError> {
        let plain = self.sealer.open(aad, sealed)?;
        String::from_utf8(plain).map_err(|_| StoreError::Seal(ferry_core::aead::SealError::Format))
    }

    pub fn seal_key(&self, region: &str, sub: &str, key_pem: &str) -> Result<String, StoreError> {
        Ok(B64.encode(self.sealer.seal(&key_aad(region, sub), key_pem.as_bytes())?))
    }

    pub fn open_key(&self, s: &StoredSubaccount) -> Result<Secret<String>, StoreError> {
        if let Some(k) = &s.key_pem {
            return Ok(k.clone());
        }
        let sealed = s.key_sealed.as_deref().unwrap_or_default();
        let bytes = B64.decode(sealed).map_err(|_| StoreError::Seal(ferry_core::aead::SealError::Format))?;
        let plain = self.sealer.open(&key_aad(&s.region_host, &s.subaccount), &bytes)?;
        String::from_utf8(plain).map(Secret::new).map_err(|_| StoreError::Seal(ferry_core::aead::SealError::Format))
    }
}

// ---- backups: the configuration with keys in clear, encrypted under a key derived from the
// backup password (Argon2id), so a backup restores on another data folder with another key.

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("the backup is not a Ferry Cloud Connector backup")]
    Format,
    #[error("the backup password is wrong, or the backup was altered")]
    Password,
    #[error("the backup password must not be empty")]
    EmptyPassword,
    #[error("{0}")]
    Internal(String),
}

const BACKUP_MAGIC: &[u8] = b"FERRY-SCC-BACKUP-1\n";

fn backup_key(password: &str, salt: &[u8]) -> Result<Sealer, BackupError> {
    let params = argon2::Params::new(19_456, 2, 1, Some(32)).map_err(|e| BackupError::Internal(e.to_string()))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = [0u8; 32];
    a.hash_password_into(password.as_bytes(), salt, &mut key).map_err(|e| BackupError::Internal(e.to_string()))?;
    Sealer::new(&Secret::new(key)).map_err(|e| BackupError::Internal(e.to_string()))
}

/// `magic || salt(16) || sealed(json)`. Blocking (Argon2): run on the blocking pool.
pub fn encrypt_backup(config: &SccConfig, password: &str) -> Result<Vec<u8>, BackupError> {
    if password.is_empty() {
        return Err(BackupError::EmptyPassword);
    }
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| BackupError::Internal("no randomness".into()))?;
    let json = serde_json::to_vec(config).map_err(|e| BackupError::Internal(e.to_string()))?;
    let sealed =
        backup_key(password, &salt)?.seal(BACKUP_MAGIC, &json).map_err(|e| BackupError::Internal(e.to_string()))?;
    let mut out = BACKUP_MAGIC.to_vec();
    out.extend_from_slice(&salt);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Blocking (Argon2): run on the blocking pool.
pub fn decrypt_backup(bytes: &[u8], password: &str) -> Result<SccConfig, BackupError> {
    let rest = bytes.strip_prefix(BACKUP_MAGIC).ok_or(BackupError::Format)?;
    if rest.len() < 16 {
        return Err(BackupError::Format);
    }
    let (salt, sealed) = rest.split_at(16);
    let json = backup_key(password, salt)?.open(BACKUP_MAGIC, sealed).map_err(|_| BackupError::Password)?;
    serde_json::from_slice(&json).map_err(|_| BackupError::Format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_start_writes_initial_config_and_keys_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut cfg) = Store::open(dir.path()).unwrap();
        assert!(cfg.admin.initial_password);
        assert!(verify_password(&cfg.admin.password_hash, DEFAULT_PASSWORD));
        let sealed = store.seal_key("h:1", "sub", "PEM KEY").unwrap();
        cfg.subaccounts.push(StoredSubaccount {
            region_host: "h:1".into(),
            proxy_replicas: Vec::new(),
            resolve_proxy_replicas: false,
            subaccount: "sub".into(),
            location_id: String::new(),
            display_name: String::new(),
            description: String::new(),
            connected: true,
            audit_level: AuditLevel::All,
            server_name: "h".into(),
            ca: "CA".into(),
            certificate: "CERT".into(),
            key_sealed: Some(sealed),
            key_pem: None,
            system_mappings: vec![],
            renewal_url: None,
            service_channels: vec![],
        });
        store.save(&cfg).unwrap();
        let text = std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap();
        assert!(!text.contains("PEM KEY"), "keys are sealed at rest");
        let (store2, cfg2) = Store::open(dir.path()).unwrap();
        assert_eq!(store2.open_key(&cfg2.subaccounts[0]).unwrap().expose(), "PEM KEY");
        // A sealed key moved to another subaccount does not open.
        let mut moved = cfg2.subaccounts[0].clone();
        moved.subaccount = "other".into();
        assert!(store2.open_key(&moved).is_err());
    }

    #[test]
    fn backup_needs_its_password() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, cfg) = Store::open(dir.path()).unwrap();
        let b = encrypt_backup(&cfg, "pw").unwrap();
        assert!(decrypt_backup(&b, "pw").is_ok());
        assert!(matches!(decrypt_backup(&b, "wrong"), Err(BackupError::Password)));
        assert!(matches!(decrypt_backup(b"junk", "pw"), Err(BackupError::Format)));
    }
}
