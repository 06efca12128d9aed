//! LDAP logon for the administration API and UI (SAP: "Use LDAP for User Administration"), on top
//! of the token service's [`LdapUserStore`] (search as the connection user, bind as the user,
//! groups collected by the store).
//!
//! As in SAP's product the settings are a Tomcat `JNDIRealm`-style `configuration` text
//! (`userBase`, `userSearch`, `roleBase`, `roleSearch`, `roleName`, `userRoleName`), a host and an
//! optional alternate host, the connection user and password, and custom names for the roles
//! `sccadmin`, `sccsubadmin`, `sccsupport`, `sccdisplay`, `sccmonitoring`. While LDAP is enabled,
//! the file-based `Administrator` cannot log on. The settings live in their own file in the data
//! folder (password sealed), so that, as in SAP's product, neither a backup/restore nor the
//! master → shadow sync carries who may log on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::Method;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ferry_auth::token_service::{LdapConfig, LdapUserStore, Login, UserStore, Verdict};
use ferry_core::Secret;
use serde::{Deserialize, Serialize};

use super::store::{self, Store, StoreError};

pub const LDAP_FILE: &str = "scc-ldap.json";
const TENANT: &str = "scc";
const SEAL_AAD: &[u8] = b"ldap-password";

/// SAP's administration roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// `sccadmin`: everything.
    Admin,
    /// `sccsubadmin`: subaccount settings; reads everything else.
    SubAdmin,
    /// `sccsupport`: read-only here (Ferry has no trace levels or thread dumps to set).
    Support,
    /// `sccdisplay`: read-only.
    Display,
    /// `sccmonitoring`: the monitoring APIs only.
    Monitoring,
}

/// The roles of a logged-on user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Roles(pub Vec<Role>);

impl Roles {
    pub fn admin() -> Self {
        Self(vec![Role::Admin])
    }

    fn has(&self, r: Role) -> bool {
        self.0.contains(&r)
    }

    /// Whether these roles may call `method path` of the API. A pure decision, so that the
    /// API's middleware and the UI's in-process calls ask the same question.
    pub fn allow(&self, method: &Method, path: &str) -> bool {
        if self.has(Role::Admin) {
            return true;
        }
        let read = matches!(*method, Method::GET | Method::HEAD);
        let monitoring = path.starts_with("/api/monitoring/") || path == "/api/v1/connector/version";
        if read && monitoring && !self.0.is_empty() {
            return true;
        }
        let viewer = self.has(Role::SubAdmin) || self.has(Role::Support) || self.has(Role::Display);
        if read && viewer {
            return true;
        }
        let subaccount_part = path.starts_with("/api/v1/configuration/subaccounts")
            || path.starts_with("/api/v1/configuration/connector/auditLog/subaccounts/");
        self.has(Role::SubAdmin) && subaccount_part
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.0
            .iter()
            .map(|r| match r {
                Role::Admin => "sccadmin",
                Role::SubAdmin => "sccsubadmin",
                Role::Support => "sccsupport",
                Role::Display => "sccdisplay",
                Role::Monitoring => "sccmonitoring",
            })
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LdapHost {
    pub host: String,
    /// Default 389, or 636 when secure.
    #[serde(default)]
    pub port: Option<u16>,
    /// LDAPS.
    #[serde(default)]
    pub is_secure: bool,
}

/// What `PUT .../connector/authentication/ldap` takes and `GET` shows (without the password).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LdapSettings {
    #[serde(default)]
    pub enable: bool,
    #[serde(default)]
    pub configuration: String,
    /// The host, then an optional alternate host asked when the first cannot answer.
    #[serde(default)]
    pub hosts: Vec<LdapHost>,
    /// The connection user (a DN) that searches for users.
    #[serde(default)]
    pub user: String,
    /// Write only: never shown, stored sealed.
    #[serde(default, skip_serializing)]
    pub password: Option<Secret<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_admin_role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_sub_admin_role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_support_role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_display_role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_monitoring_role: Option<String>,
}

/// The settings as stored: the password sealed under the data folder's key.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredLdap {
    settings: LdapSettings,
    password_sealed: String,
}

/// The parsed `configuration` text.
#[derive(Debug, PartialEq, Eq)]
struct RealmText {
    user_base: String,
    user_search: String,
    role_base: Option<String>,
    role_search: Option<String>,
    user_role_name: Option<String>,
}

/// Parses `key="value"` pairs (whitespace or newlines between them).
fn parse_realm(text: &str) -> Result<RealmText, String> {
    let mut pairs = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=').ok_or_else(|| format!("expected key=\"value\" at {rest:?}"))?;
        let key = key.trim();
        let after = after.trim_start();
        let quoted = after.strip_prefix('"').ok_or_else(|| format!("the value of {key} must be in double quotes"))?;
        let (value, tail) =
            quoted.split_once('"').ok_or_else(|| format!("the value of {key} lacks its closing quote"))?;
        pairs.push((key.to_owned(), value.to_owned()));
        rest = tail.trim_start();
    }
    let mut get = |k: &str| pairs.iter().position(|(key, _)| key == k).map(|i| pairs.remove(i).1);
    let realm = RealmText {
        user_base: get("userBase").ok_or("configuration needs userBase=\"...\" (where users are searched)")?,
        user_search: get("userSearch").ok_or("configuration needs userSearch=\"...\" with {0} for the user name")?,
        role_base: get("roleBase"),
        role_search: get("roleSearch"),
        user_role_name: get("userRoleName"),
    };
    if let Some(n) = get("roleName")
        && !n.eq_ignore_ascii_case("cn")
    {
        return Err(format!("roleName {n:?} is not supported: group names are read from cn"));
    }
    if let Some((k, _)) = pairs.first() {
        return Err(format!(
            "configuration key {k:?} is not supported (userBase, userSearch, roleBase, roleSearch, roleName, userRoleName)"
        ));
    }
    if !realm.user_search.contains("{0}") {
        return Err("userSearch must contain {0} (the user name)".into());
    }
    if realm.role_base.is_some() != realm.role_search.is_some() {
        return Err("roleBase and roleSearch go together".into());
    }
    Ok(realm)
}

/// A directory users log on with, and how its groups map to roles.
#[derive(Debug)]
pub(crate) struct LdapLogon {
    stores: Vec<LdapUserStore>,
    role_names: [(String, Role); 5],
}

/// A logon that could not be decided: the directory did not answer.
#[derive(Debug)]
pub(crate) struct DirectoryDown(pub String);

impl LdapLogon {
    pub fn new(s: &LdapSettings, password: &Secret<String>, ca_file: Option<&Path>) -> Result<Self, String> {
        let realm = parse_realm(&s.configuration)?;
        if s.hosts.is_empty() || s.hosts.len() > 2 {
            return Err("hosts must list the LDAP host and at most one alternate host".into());
        }
        if s.user.trim().is_empty() || password.expose().is_empty() {
            return Err("the connection user and its password are required".into());
        }
        let mut stores = Vec::new();
        for h in &s.hosts {
            if h.host.is_empty() || !h.host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)) {
                return Err(format!("{:?} is not a host name", h.host));
            }
            let (scheme, default) = if h.is_secure { ("ldaps", 636) } else { ("ldap", 389) };
            let cfg = LdapConfig {
                url: format!("{scheme}://{}:{}", h.host, h.port.unwrap_or(default)),
                ca_file: ca_file.map(Path::to_path_buf),
                bind_dn: s.user.clone(),
                bind_password: password.clone(),
                base_dn: realm.user_base.clone(),
                user_filter: realm.user_search.replace("{0}", "{username}"),
                user_id_attribute: "uid".into(),
                group_attribute: realm.user_role_name.clone(),
                group_base_dn: realm.role_base.clone(),
                group_filter: realm
                    .role_search
                    .as_deref()
                    .map(|f| f.replace("{0}", "{dn}").replace("{1}", "{username}"))
                    .unwrap_or_default(),
                tenant_id: TENANT.into(),
                ..LdapConfig::default()
            };
            stores.push(LdapUserStore::new(cfg).map_err(|e| e.to_string())?);
        }
        let name = |custom: &Option<String>, default: &str| {
            custom.as_deref().map(str::trim).filter(|c| !c.is_empty()).unwrap_or(default).to_owned()
        };
        let role_names = [
            (name(&s.custom_admin_role, "sccadmin"), Role::Admin),
            (name(&s.custom_sub_admin_role, "sccsubadmin"), Role::SubAdmin),
            (name(&s.custom_support_role, "sccsupport"), Role::Support),
            (name(&s.custom_display_role, "sccdisplay"), Role::Display),
            (name(&s.custom_monitoring_role, "sccmonitoring"), Role::Monitoring),
        ];
        Ok(Self { stores, role_names })
    }

    /// `Ok(None)`: unknown user or wrong password (the same to the caller). The alternate host
    /// is asked only when the first cannot answer.
    pub async fn verify(&self, user: &str, password: &str) -> Result<Option<Roles>, DirectoryDown> {
        let login = Login { username: user, password, tenant: None, preferred_tenant: TENANT };
        let mut down = String::new();
        for store in &self.stores {
            match store.verify(login).await {
                Ok(Verdict::Verified(u)) => {
                    // The store grants each group `cn` as the scope `$XSAPPNAME.<cn>`.
                    let groups: Vec<String> = u
                        .scopes
                        .unwrap_or_default()
                        .iter()
                        .map(|s| s.strip_prefix("$XSAPPNAME.").unwrap_or(s).to_owned())
                        .collect();
                    let roles = self
                        .role_names
                        .iter()
                        .filter(|(name, _)| groups.iter().any(|g| g == name))
                        .map(|(_, r)| *r)
                        .collect();
                    return Ok(Some(Roles(roles)));
                }
                Ok(_) => return Ok(None),
                Err(e) => down = e.0,
            }
        }
        Err(DirectoryDown(down))
    }
}

fn path(dir: &Path) -> PathBuf {
    dir.join(LDAP_FILE)
}

/// The stored settings and password, if any.
pub(crate) fn load(store: &Store) -> Result<Option<(LdapSettings, Secret<String>)>, StoreError> {
    let p = path(store.dir());
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::Io(p, e)),
    };
    let stored: StoredLdap = serde_json::from_slice(&bytes).map_err(|e| StoreError::Parse(p.clone(), e))?;
    let sealed = B64.decode(&stored.password_sealed).map_err(|_| StoreError::KeyFile(p))?;
    let password = store.open_blob(SEAL_AAD, &sealed)?;
    Ok(Some((stored.settings, password.into())))
}

pub(crate) fn save(store: &Store, settings: &LdapSettings, password: &Secret<String>) -> Result<(), StoreError> {
    let mut settings = settings.clone();
    settings.password = None;
    let sealed = B64.encode(store.seal_blob(SEAL_AAD, password.expose().as_bytes())?);
    let json = serde_json::to_vec_pretty(&StoredLdap { settings, password_sealed: sealed })
        .map_err(|e| StoreError::Parse(path(store.dir()), e))?;
    store::write_atomic(&path(store.dir()), &json)
}

/// A shared, swappable LDAP logon (`None` = file-based user).
pub(crate) type LiveLdap = std::sync::RwLock<Option<Arc<LdapLogon>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realm_text_as_sap_documents_it() {
        let r = parse_realm(
            "roleBase=\"ou=groups,dc=scc\" \n roleName=\"cn\"\nroleSearch=\"(uniqueMember={0})\" userBase=\"ou=users,dc=scc\" userSearch=\"(uid={0})\"",
        )
        .unwrap();
        assert_eq!(r.user_base, "ou=users,dc=scc");
        assert_eq!(r.user_search, "(uid={0})");
        assert_eq!(r.role_base.as_deref(), Some("ou=groups,dc=scc"));
        assert_eq!(r.role_search.as_deref(), Some("(uniqueMember={0})"));
        for bad in [
            "",
            "userBase=\"x\"",
            "userBase=\"x\" userSearch=\"(uid=x)\"",
            "userBase=x userSearch=\"(uid={0})\"",
            "userBase=\"x\" userSearch=\"(uid={0})",
            "userBase=\"x\" userSearch=\"(uid={0})\" roleName=\"ou\"",
            "userBase=\"x\" userSearch=\"(uid={0})\" roleBase=\"y\"",
            "userBase=\"x\" userSearch=\"(uid={0})\" connectionURL=\"ldap://evil\"",
        ] {
            assert!(parse_realm(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn roles_decide_per_method_and_path() {
        let get = Method::GET;
        let put = Method::PUT;
        let sub = "/api/v1/configuration/subaccounts/r/s/systemMappings";
        let cases: [(Vec<Role>, &Method, &str, bool); 14] = [
            (vec![Role::Admin], &put, "/api/v1/configuration/connector", true),
            (vec![Role::Admin], &Method::POST, "/api/v1/configuration/backup", true),
            (vec![Role::Display], &get, "/api/v1/configuration/connector", true),
            (vec![Role::Display], &put, "/api/v1/configuration/connector", false),
            (vec![Role::Display], &Method::POST, sub, false),
            (vec![Role::Support], &get, sub, true),
            (vec![Role::Support], &Method::DELETE, sub, false),
            (vec![Role::SubAdmin], &Method::POST, sub, true),
            (vec![Role::SubAdmin], &put, "/api/v1/configuration/connector/authentication/ldap", false),
            (vec![Role::SubAdmin], &Method::POST, "/api/v1/configuration/backup", false),
            (vec![Role::Monitoring], &get, "/api/monitoring/subaccounts", true),
            (vec![Role::Monitoring], &get, "/api/v1/configuration/subaccounts", false),
            (vec![], &get, "/api/monitoring/subaccounts", false),
            (vec![], &get, "/api/v1/configuration/connector", false),
        ];
        for (roles, m, p, want) in cases {
            assert_eq!(Roles(roles.clone()).allow(m, p), want, "{roles:?} {m} {p}");
        }
    }

    #[test]
    fn the_password_stays_out_of_json_and_debug() {
        let s = LdapSettings { password: Some("bind-secret".to_owned().into()), ..Default::default() };
        assert!(!serde_json::to_string(&s).unwrap().contains("bind-secret"));
        assert!(!format!("{s:?}").contains("bind-secret"));
    }
}
