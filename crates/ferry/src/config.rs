//! The `ferry up` configuration file (TOML). Raw, as written by a person, with
//! `deny_unknown_fields` so a typo is an error rather than a silently ignored setting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_connector::SystemMapping;
use ferry_core::Secret;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub subaccount: Subaccount,
    #[serde(default)]
    pub bindings: Bindings,
    #[serde(default)]
    pub users: Vec<UserEntry>,
    /// An LDAP directory whose users log in besides `[[users]]` (asked after them).
    pub ldap: Option<ferry_auth::token_service::LdapConfig>,
    #[serde(default)]
    pub destinations: Vec<DestinationEntry>,
    #[serde(default)]
    pub connectors: Vec<ConnectorEntry>,
    /// External OpenID Connect issuers whose tokens the Destination Service and the proxy accept.
    #[serde(default)]
    pub trust: Vec<TrustEntry>,
    /// SAML identity providers whose signed assertions the token service's saml2-bearer grant
    /// accepts (besides the Destination Service's own subaccount key, always trusted).
    #[serde(default)]
    pub saml_trust: Vec<SamlTrustEntry>,
    #[serde(default)]
    pub tokens: Tokens,
    #[serde(default)]
    pub destination_store: DestinationStore,
    /// Serve the Destination resources of a folder through the Transparent Proxy.
    pub transparent_proxy: Option<TransparentProxyEntry>,
    /// Cloud-side services that the connectors' service channels may reach.
    #[serde(default)]
    pub channel_targets: Vec<ChannelTargetEntry>,
}

impl FileConfig {
    /// The proxy's allow-list of service channel targets; entries without a subaccount belong to
    /// `subaccount`.
    pub fn channel_targets(&self, subaccount: &str) -> anyhow::Result<ferry_proxy::ChannelTargets> {
        let entries = self.channel_targets.iter().map(|t| ferry_proxy::ChannelTarget {
            subaccount: t.subaccount.clone().unwrap_or_else(|| subaccount.to_owned()),
            id: t.id.clone(),
            target: t.target.clone(),
        });
        ferry_proxy::ChannelTargets::new(entries).map_err(|e| anyhow::anyhow!("[[channel_targets]]: {e}"))
    }
}

/// `[[channel_targets]]`: a service a service channel of `subaccount` (default: this one) reaches
/// as `id`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelTargetEntry {
    #[serde(default)]
    pub subaccount: Option<String>,
    pub id: String,
    /// `host:port`.
    pub target: String,
}

/// `[transparent_proxy]`: the keys of `ferry transparent-proxy` that `ferry up` cannot fill in
/// itself (bindings and CA are its own).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransparentProxyEntry {
    pub resources_dir: std::path::PathBuf,
    #[serde(default = "default_tp_poll_ms")]
    pub poll_interval_ms: u64,
    #[serde(default)]
    pub tenant_mode: ferry_transparent_proxy::TenantMode,
    pub listen_host: Option<std::net::IpAddr>,
    pub endpoints_file: Option<std::path::PathBuf>,
}

fn default_tp_poll_ms() -> u64 {
    1000
}

type Key = Secret<[u8; 32]>;

/// `[destination_store]`: where the Destination Service keeps destinations, and the keys that
/// seal them at rest.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationStore {
    /// `sqlite` (default: `<data-dir>/destinations.db`), `memory`, or a PostgreSQL URL
    /// `postgres://user[:password]@host[:port]/db` that several replicas may share.
    pub database: Option<Secret<String>>,
    /// An environment variable holding `database` (keeps a database password out of the file).
    pub database_env: Option<String>,
    /// The key that seals new rows (64 hex digits) in a file, or in an environment variable;
    /// default: the data folder's `master.key`.
    pub key_file: Option<PathBuf>,
    pub key_env: Option<String>,
    /// Keys rows may still be sealed with after a rotation; rows under them are sealed again
    /// under the current key at start-up.
    #[serde(default)]
    pub previous_key_files: Vec<PathBuf>,
    #[serde(default)]
    pub previous_key_envs: Vec<String>,
}

impl DestinationStore {
    fn check(&self) -> anyhow::Result<()> {
        if self.database.is_some() && self.database_env.is_some() {
            anyhow::bail!("[destination_store] has both database and database_env; keep one");
        }
        if self.key_file.is_some() && self.key_env.is_some() {
            anyhow::bail!("[destination_store] has both key_file and key_env; keep one");
        }
        if let Some(db) = &self.database {
            Self::check_database(db.expose())?;
        }
        Ok(())
    }

    fn check_database(db: &str) -> anyhow::Result<()> {
        if db == "sqlite" || db == "memory" || db.starts_with("postgres://") || db.starts_with("postgresql://") {
            Ok(())
        } else {
            anyhow::bail!("[destination_store] database must be \"sqlite\", \"memory\" or a postgres:// URL")
        }
    }

    /// The database to use, with `data_dir` for the default SQLite file.
    pub fn database(&self, data_dir: &Path) -> anyhow::Result<ferry_destination::DatabaseConfig> {
        use ferry_destination::DatabaseConfig;
        let value = match (&self.database, &self.database_env) {
            (Some(db), _) => db.clone(),
            (None, Some(var)) => {
                let v = std::env::var(var).map_err(|_| {
                    anyhow::anyhow!("[destination_store] database_env: the environment variable {var} is not set")
                })?;
                Self::check_database(&v).map_err(|e| anyhow::anyhow!("{e} (in ${var})"))?;
                Secret::new(v)
            }
            (None, None) => Secret::new("sqlite".to_owned()),
        };
        Ok(match value.expose().as_str() {
            "sqlite" => DatabaseConfig::Sqlite { path: data_dir.join("destinations.db") },
            "memory" => DatabaseConfig::SqliteMemory,
            _ => DatabaseConfig::Postgres { url: value },
        })
    }

    /// The current key (`default` when none is configured) and the previous keys.
    pub fn keys(&self, default: &Secret<[u8; 32]>) -> anyhow::Result<(Key, Vec<Key>)> {
        use ferry_destination::KeySource;
        let current = match (&self.key_file, &self.key_env) {
            (Some(path), _) => KeySource::File(path.clone()).load()?,
            (None, Some(var)) => KeySource::Env(var.clone()).load()?,
            (None, None) => default.clone(),
        };
        let previous = self
            .previous_key_files
            .iter()
            .map(|p| KeySource::File(p.clone()))
            .chain(self.previous_key_envs.iter().map(|v| KeySource::Env(v.clone())))
            .map(|source| source.load())
            .collect::<Result<Vec<_>, _>>()?;
        Ok((current, previous))
    }
}

/// `[tokens]`: lifetimes of the tokens the token service issues.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tokens {
    /// Access tokens (XSUAA's default: 12 hours).
    pub access_token_validity_secs: u64,
    /// Refresh tokens (default: 30 days).
    pub refresh_token_validity_secs: u64,
}

impl Default for Tokens {
    fn default() -> Self {
        Self { access_token_validity_secs: 12 * 3600, refresh_token_validity_secs: 30 * 24 * 3600 }
    }
}

/// Where `ferry up` listens. Port 0 picks a free port; the printed bindings show the real one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    pub host: String,
    pub token_port: u16,
    pub token_https_port: u16,
    pub destination_port: u16,
    pub http_proxy_port: u16,
    pub socks5_port: u16,
    pub tunnel_port: u16,
    /// Prometheus `/metrics` and `/healthz`; off unless set (9494 is the customary port).
    pub metrics_port: Option<u16>,
    /// The Cloud Connector's admin REST API (HTTPS, SAP's paths); off unless set (SAP's port
    /// is 8443). It then manages the first `[[connectors]]` entry.
    pub connector_admin_port: Option<u16>,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            token_port: 18081,
            token_https_port: 18443,
            destination_port: 18082,
            http_proxy_port: 20003,
            socks5_port: 20004,
            tunnel_port: 20005,
            metrics_port: None,
            connector_admin_port: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subaccount {
    /// The subaccount (zone) id; generated once and kept in the data folder if not set.
    pub id: Option<String>,
    /// Subdomain of the subaccount (default `ferry`).
    pub subdomain: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bindings {
    #[serde(default)]
    pub destination: ClientEntry,
    #[serde(default)]
    pub connectivity: ClientEntry,
    #[serde(default)]
    pub xsuaa: ClientEntry,
}

/// Credentials of one binding's OAuth client; anything left out is generated once and kept in
/// the data folder.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    pub client_id: Option<String>,
    pub client_secret: Option<Secret<String>>,
    pub xsappname: Option<String>,
    /// Where the authorization-code grant may send the browser back to (XSUAA's
    /// `oauth2-configuration.redirect-uris`); empty: the client cannot log users in.
    #[serde(default)]
    pub redirect_uris: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub username: String,
    pub password: Secret<String>,
    pub email: Option<String>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    #[default]
    Subaccount,
    Instance,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationEntry {
    #[serde(default)]
    pub level: Level,
    /// The destination's properties exactly as the Destination Service stores them
    /// (`Name`, `Type`, `URL`, `Authentication`, `URL.headers.X`, ...).
    pub properties: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorEntry {
    /// Location id of this connector ("" = the default location).
    #[serde(default)]
    pub location_id: String,
    #[serde(default)]
    pub mappings: Vec<SystemMapping>,
    /// `OFF`, `SECURITY` (denied requests, the default) or `ALL`; files in `<data>/audit/`.
    #[serde(default)]
    pub audit_level: ferry_connector::audit::AuditLevel,
    /// PEM file of a CA that backends' TLS certificates chain to, besides the system's roots.
    #[serde(default)]
    pub backend_ca_file: Option<std::path::PathBuf>,
    /// PEM certificate and key the connector presents to `HTTPS`/`TCPS`/`LDAPS` backends (SAP's
    /// system certificate), for mappings whose principal type is not `*_RESTRICTED`.
    #[serde(default)]
    pub system_certificate_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub system_key_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub principal_propagation: PrincipalPropagationEntry,
}

/// `[connectors.principal_propagation]`: SAP's `ppSettings` and subject pattern.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrincipalPropagationEntry {
    /// Subject of user certificates, e.g. `CN=${name}` or `CN=${name},EMAIL=${mail},O=ACME`.
    pub subject_pattern: String,
    /// `certificateValidityInMin` (1 to 43200).
    pub certificate_validity_minutes: u32,
    /// `expirationToleranceInHr` (0 to 336): how long after the user token's expiry it is accepted.
    pub expiration_tolerance_hours: u32,
}

impl Default for PrincipalPropagationEntry {
    fn default() -> Self {
        Self { subject_pattern: "CN=${name}".into(), certificate_validity_minutes: 60, expiration_tolerance_hours: 1 }
    }
}

/// One `[[trust]]` entry: an external OIDC issuer, found by discovery from its URL.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustEntry {
    /// Issuer URL exactly as the provider writes it in `iss` (https; http only on loopback).
    pub issuer: String,
    /// Subaccount (zone id) the issuer's tokens act in; default: `ferry up`'s subaccount.
    pub subaccount: Option<String>,
    /// If set, a token must be meant for one of these (`aud`, or a scope `<audience>.*`).
    #[serde(default)]
    pub audiences: Vec<String>,
}

/// One `[[saml_trust]]` entry: a SAML identity provider's signing certificate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamlTrustEntry {
    /// PEM file with the provider's (RSA) signing certificate.
    pub certificate_file: std::path::PathBuf,
    /// Subaccount (zone id) whose token endpoint accepts its assertions; default: `ferry up`'s.
    pub subaccount: Option<String>,
}

/// Secret properties (`Password`, `clientSecret`, ...) print as `***`, as `Secret<T>` does.
impl std::fmt::Debug for DestinationEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: BTreeMap<&str, &dyn std::fmt::Debug> = self
            .properties
            .iter()
            .map(|(k, v)| {
                (k.as_str(), if ferry_model::is_secret_property(k) { &"***" as &dyn std::fmt::Debug } else { v })
            })
            .collect();
        f.debug_struct("DestinationEntry").field("level", &self.level).field("properties", &shown).finish()
    }
}

impl TrustEntry {
    pub fn to_trust(&self, default_subaccount: &str) -> ferry_auth::OidcTrust {
        ferry_auth::OidcTrust {
            issuer: self.issuer.clone(),
            subaccount: self.subaccount.clone().unwrap_or_else(|| default_subaccount.to_owned()),
            audiences: self.audiences.clone(),
        }
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let cfg: FileConfig = toml::from_str(text)?;
        cfg.destination_store.check()?;
        // Checked here too, so a bad entry stops `ferry up` before anything starts.
        cfg.channel_targets("this subaccount")?;
        let mut locations = std::collections::HashSet::new();
        if cfg.tokens.access_token_validity_secs == 0 || cfg.tokens.refresh_token_validity_secs == 0 {
            anyhow::bail!("[tokens] validities must be at least one second");
        }
        for c in &cfg.connectors {
            let pp = &c.principal_propagation;
            if !(1..=43_200).contains(&pp.certificate_validity_minutes) {
                anyhow::bail!("principal_propagation.certificate_validity_minutes must be 1 to 43200");
            }
            if pp.expiration_tolerance_hours > 336 {
                anyhow::bail!("principal_propagation.expiration_tolerance_hours must be 0 to 336");
            }
            if !locations.insert(c.location_id.as_str()) {
                anyhow::bail!("two connectors use location id {:?}; each needs its own", c.location_id);
            }
        }
        if let Some(ldap) = &cfg.ldap {
            let mut checked = ldap.clone();
            if checked.tenant_id.is_empty() {
                checked.tenant_id = "subaccount".into();
            }
            ferry_auth::token_service::LdapUserStore::new(checked)?;
        }
        let mut issuers = std::collections::HashSet::new();
        for t in &cfg.trust {
            if !issuers.insert(t.issuer.as_str()) {
                anyhow::bail!("[[trust]] lists issuer {:?} twice", t.issuer);
            }
            ferry_auth::OidcIssuer::new(t.to_trust("default"))?;
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {

    /// This crate's folder, read when the test runs: a build cache shared between checkouts can
    /// hold a test binary compiled in another folder, so the compile-time path may be gone.
    fn manifest_dir() -> std::path::PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
    }

    use super::*;

    /// The Debug output of a parsed configuration (what a `?config` in a log line would print)
    /// holds none of its secrets.
    #[test]
    fn debug_output_hides_every_secret() {
        let text = r#"
[bindings.destination]
client_secret = "S1-binding-secret"
[[users]]
username = "alice"
password = "S2-user-password"
[ldap]
url = "ldap://127.0.0.1:389"
base_dn = "dc=example"
bind_dn = "cn=svc"
bind_password = "S3-bind-password"
[destination_store]
database = "postgres://u:S4-db-password@127.0.0.1/db"
[[destinations]]
properties = { Name = "d", Type = "HTTP", URL = "http://x", Authentication = "BasicAuthentication", User = "u", Password = "S5-dest-password", clientSecret = "S6-client-secret", tokenServicePassword = "S7-ts-password", KeyStorePassword = "S8-ks-password" }
"#;
        let cfg = FileConfig::parse(text).unwrap();
        let shown = format!("{cfg:?} {cfg:#?}");
        assert!(shown.contains("alice") && shown.contains("\"u\""), "the rest is shown: {shown}");
        for n in 1..=8 {
            assert!(!shown.contains(&format!("S{n}-")), "secret S{n} in {shown}");
        }
    }

    #[test]
    fn channel_targets_are_checked_when_parsed() {
        let ok = "[[channel_targets]]\nid = \"echo\"\ntarget = \"127.0.0.1:7000\"\n\n\
                  [[channel_targets]]\nsubaccount = \"other\"\nid = \"echo\"\ntarget = \"10.0.0.1:7000\"\n";
        let cfg = FileConfig::parse(ok).unwrap();
        let targets = cfg.channel_targets("mine").unwrap();
        assert_eq!(targets.target("mine", "echo"), Some("127.0.0.1:7000"));
        assert_eq!(targets.target("other", "echo"), Some("10.0.0.1:7000"));
        let bad = "[[channel_targets]]\nid = \"echo\"\ntarget = \"no-port\"\n";
        let e = FileConfig::parse(bad).unwrap_err().to_string();
        assert!(e.contains("[[channel_targets]]") && e.contains("host:port"), "{e}");
    }

    /// Every config file the repository ships must parse.
    #[test]
    fn shipped_configs_parse() {
        let root = manifest_dir().join("../..");
        let mut found = 0;
        for dir in ["scripts", "examples", "tests/node"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else { continue };
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "toml") {
                    FileConfig::load(&e.path()).unwrap_or_else(|err| panic!("{err:#}"));
                    found += 1;
                }
            }
        }
        assert!(found >= 1, "no shipped config found");
    }

    /// Replays the committed fuzz corpus of the `config` target (fuzz/fuzz_targets/config.rs):
    /// whatever the text, parsing returns instead of panicking.
    #[test]
    fn fuzz_corpus_parses_without_panic() {
        let dir = manifest_dir().join("../../fuzz/corpus/config");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            if let Ok(text) = std::str::from_utf8(&data) {
                let _ = FileConfig::parse(text);
            }
            n += 1;
        }
        assert!(n > 0, "no corpus in {}", dir.display());
    }

    #[test]
    fn typos_are_errors() {
        assert!(FileConfig::parse("[listen]\nhots = \"x\"").is_err());
        assert!(FileConfig::parse("[[connectors]]\n[[connectors]]").is_err());
        assert!(FileConfig::parse("").is_ok());
    }

    #[test]
    fn ldap_section() {
        let cfg = FileConfig::parse(
            "[ldap]\nurl = \"ldap://127.0.0.1:389\"\nbind_dn = \"cn=reader,dc=x\"\nbind_password = \"pw\"\n\
             base_dn = \"dc=x\"\ngroup_base_dn = \"ou=groups,dc=x\"\ntimeout_secs = 2",
        )
        .unwrap();
        let ldap = cfg.ldap.unwrap();
        assert_eq!((ldap.user_filter.as_str(), ldap.timeout_secs), (ferry_auth::token_service::DEFAULT_USER_FILTER, 2));
        assert!(!format!("{ldap:?}").contains("\"pw\""));
        for bad in [
            "[ldap]\nurl = \"ldap://h\"\nbind_dn = \"cn=r\"\nbind_password = \"pw\"\nbase_dn = \"dc=x\"\nbse = 1",
            "[ldap]\nurl = \"http://h\"\nbind_dn = \"cn=r\"\nbind_password = \"pw\"\nbase_dn = \"dc=x\"",
            "[ldap]\nurl = \"ldap://h\"\nbind_dn = \"cn=r\"\nbase_dn = \"dc=x\"",
        ] {
            assert!(FileConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn destination_store_section() {
        let dir = Path::new("/data");
        let cfg = FileConfig::parse("").unwrap();
        assert!(matches!(
            cfg.destination_store.database(dir).unwrap(),
            ferry_destination::DatabaseConfig::Sqlite { path } if path == dir.join("destinations.db")
        ));
        let cfg =
            FileConfig::parse("[destination_store]\ndatabase = \"postgres://ferry:pw@127.0.0.1:5432/ferry\"").unwrap();
        let db = cfg.destination_store.database(dir).unwrap();
        assert!(matches!(&db, ferry_destination::DatabaseConfig::Postgres { url } if url.expose().ends_with("/ferry")));
        assert!(!format!("{db:?}{cfg:?}").contains("pw@"), "the URL may hold a password");
        let cfg = FileConfig::parse("[destination_store]\ndatabase = \"memory\"").unwrap();
        assert!(matches!(
            cfg.destination_store.database(dir).unwrap(),
            ferry_destination::DatabaseConfig::SqliteMemory
        ));

        let keys = tempfile::tempdir().unwrap();
        let (new, old) = (keys.path().join("new.key"), keys.path().join("old.key"));
        std::fs::write(&new, "11".repeat(32)).unwrap();
        std::fs::write(&old, "22".repeat(32)).unwrap();
        let cfg =
            FileConfig::parse(&format!("[destination_store]\nkey_file = {new:?}\nprevious_key_files = [{old:?}]"))
                .unwrap();
        let default = Secret::new([0u8; 32]);
        let (current, previous) = cfg.destination_store.keys(&default).unwrap();
        assert_eq!((current.expose(), previous[0].expose()), (&[0x11; 32], &[0x22; 32]));
        let (current, previous) = FileConfig::parse("").unwrap().destination_store.keys(&default).unwrap();
        assert_eq!((current.expose(), previous.len()), (&[0; 32], 0));
        let cfg = FileConfig::parse("[destination_store]\nkey_env = \"FERRY_TEST_UNSET_KEY_VAR\"").unwrap();
        let err = cfg.destination_store.keys(&default).err().unwrap().to_string();
        assert!(err.contains("FERRY_TEST_UNSET_KEY_VAR is not set"), "{err}");

        for bad in [
            "[destination_store]\ndatabase = \"mysql://x\"",
            "[destination_store]\ndatabase = \"sqlite\"\ndatabase_env = \"X\"",
            "[destination_store]\nkey_file = \"a\"\nkey_env = \"X\"",
            "[destination_store]\nkeyfile = \"a\"",
        ] {
            assert!(FileConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trust_entries() {
        let cfg = FileConfig::parse(
            "[[trust]]\nissuer = \"https://idp.example\"\naudiences = [\"api\"]\n\
             [[trust]]\nissuer = \"http://127.0.0.1:4000\"\nsubaccount = \"zone-2\"",
        )
        .unwrap();
        let t: Vec<_> = cfg.trust.iter().map(|t| t.to_trust("zone-1")).collect();
        assert_eq!((t[0].subaccount.as_str(), t[0].audiences.as_slice()), ("zone-1", ["api".to_owned()].as_slice()));
        assert_eq!(t[1].subaccount, "zone-2");
        for bad in [
            "[[trust]]\nissuer = \"http://idp.example\"",
            "[[trust]]\nissuer = \"idp\"",
            "[[trust]]\nissuer = \"https://a\"\n[[trust]]\nissuer = \"https://a\"",
            "[[trust]]\nissuer = \"https://a\"\nsubaccount = \"\"",
            "[[trust]]\nissuer = \"https://a\"\naudience = \"x\"",
        ] {
            assert!(FileConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn saml_trust_entries() {
        let cfg = FileConfig::parse(
            "[[saml_trust]]\ncertificate_file = \"/etc/idp.pem\"\n\
             [[saml_trust]]\ncertificate_file = \"b.pem\"\nsubaccount = \"zone-2\"",
        )
        .unwrap();
        assert_eq!(cfg.saml_trust[0].certificate_file, std::path::Path::new("/etc/idp.pem"));
        assert_eq!(cfg.saml_trust[1].subaccount.as_deref(), Some("zone-2"));
        assert!(FileConfig::parse("[[saml_trust]]\nsubaccount = \"z\"").is_err());
        assert!(FileConfig::parse("[[saml_trust]]\ncertificate_file = \"a\"\nissuer = \"x\"").is_err());
    }
}
