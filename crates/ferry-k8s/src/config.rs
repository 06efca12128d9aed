//! `ferry k8s-controller` configuration file (TOML; the transparent-proxy chart renders it).

use std::collections::BTreeMap;
use std::path::Path;

use ferry_transparent_proxy::resource::Scope;
use serde::Deserialize;

/// Where the Services of Destination resources lead.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Namespace of the proxy pods; backend Services are created there.
    pub proxy_namespace: String,
    /// `key=value`: serve only resources in namespaces with this label (SAP's
    /// `managedNamespacesMode: labelSelector`); absent = every namespace.
    #[serde(default)]
    pub namespace_selector: Option<String>,
    /// Full re-check period of every resource, besides reacting to changes.
    #[serde(default = "resync_secs")]
    pub resync_secs: u64,
    /// `shared` (SAP's `config.tenantMode`): a TCP resource with the `tenant-subdomains`
    /// annotation gets a Service per tenant, `<name>-<subdomain>`, as the proxy serves one
    /// endpoint per tenant.
    #[serde(default)]
    pub tenant_mode: ferry_transparent_proxy::TenantMode,
    /// Who may call a resource without `spec.accessControl` (SAP's
    /// `config.security.accessControl.destinations.defaultScope`): `namespaced` (pods of its own
    /// namespace) or `clusterWide`; enforced by a NetworkPolicy per resource.
    #[serde(default = "default_scope")]
    pub default_scope: Scope,
    /// The Destination Service instance of resources without `spec.destinationServiceInstanceName`
    /// (SAP's `config.integration.destinationService.defaultInstanceName`): the name of its
    /// binding.
    #[serde(default = "default_instance_name")]
    pub default_instance_name: String,
    /// Cluster DNS domain the app-facing Services' aliases name.
    #[serde(default = "cluster_domain")]
    pub cluster_domain: String,
    /// Pods and port serving HTTP destinations.
    pub http: Target,
    /// Pods serving TCP, LDAP and MAIL destinations; without `target_port`, each resource's own
    /// port (`ferry_transparent_proxy::cluster::tcp_port`), which `ferry transparent-proxy
    /// --kubernetes` listens on.
    pub tcp: Target,
}

/// A set of proxy pods and the container port (number or name) a Service leads to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub target_port: Option<String>,
}

fn resync_secs() -> u64 {
    180
}
fn default_scope() -> Scope {
    Scope::Namespaced
}
fn default_instance_name() -> String {
    "default".into()
}
fn cluster_domain() -> String {
    "cluster.local".into()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("{path}: {field}: {reason}")]
    Invalid { path: String, field: &'static str, reason: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        Self::parse(&p, &text)
    }

    pub fn parse(origin: &str, text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|source| ConfigError::Parse { path: origin.into(), source })?;
        let invalid = |field, reason: &str| ConfigError::Invalid { path: origin.into(), field, reason: reason.into() };
        if cfg.proxy_namespace.is_empty() {
            return Err(invalid("proxy_namespace", "must name the proxy pods' namespace"));
        }
        for (field, t) in [("http.selector", &cfg.http), ("tcp.selector", &cfg.tcp)] {
            if t.selector.is_empty() {
                return Err(invalid(field, "must not be empty: the Services would select every pod"));
            }
        }
        if cfg.http.target_port.is_none() {
            return Err(invalid("http.target_port", "must name the HTTP container port (number or name)"));
        }
        if let Some(sel) = &cfg.namespace_selector {
            if sel.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
                return Err(invalid("namespace_selector", "must be key=value"));
            }
        }
        if cfg.default_instance_name.is_empty() {
            return Err(invalid("default_instance_name", "must name a Destination Service instance"));
        }
        if cfg.resync_secs == 0 {
            return Err(invalid("resync_secs", "must be at least 1"));
        }
        Ok(cfg)
    }

    pub(crate) fn target(&self, protocol: crate::Protocol) -> &Target {
        match protocol {
            crate::Protocol::Http => &self.http,
            crate::Protocol::Tcp => &self.tcp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
proxy_namespace = "ferry"
[http]
target_port = "http"
selector = { app = "tp", kind = "http" }
[tcp]
target_port = "20004"
selector = { app = "tp", kind = "tcp" }
"#;

    #[test]
    fn parses_the_chart_shape() {
        let c = Config::parse("c.toml", OK).unwrap();
        assert_eq!(c.proxy_namespace, "ferry");
        assert_eq!(c.resync_secs, 180);
        assert_eq!(c.cluster_domain, "cluster.local");
        assert_eq!(c.default_scope, Scope::Namespaced);
        let wide = Config::parse("c.toml", &format!("default_scope = \"clusterWide\"\n{OK}")).unwrap();
        assert_eq!(wide.default_scope, Scope::ClusterWide);
        assert_eq!(c.default_instance_name, "default");
        let named = Config::parse("c.toml", &format!("default_instance_name = \"second\"\n{OK}")).unwrap();
        assert_eq!(named.default_instance_name, "second");
        assert_eq!(c.http.selector["kind"], "http");
        assert_eq!(c.tcp.target_port.as_deref(), Some("20004"));
    }

    #[test]
    fn refuses_what_would_misroute() {
        let empty = OK.replace(r#"selector = { app = "tp", kind = "tcp" }"#, "selector = {}");
        let e = Config::parse("c.toml", &empty).unwrap_err().to_string();
        assert!(e.contains("tcp.selector"), "{e}");
        let e = Config::parse("c.toml", &OK.replace("proxy_namespace", "proxy_namspace")).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
        let sel = format!("namespace_selector = \"nolabel\"\n{OK}");
        let e = Config::parse("c.toml", &sel).unwrap_err().to_string();
        assert!(e.contains("key=value"), "{e}");
        let e = Config::parse("c.toml", &format!("default_scope = \"cluster\"\n{OK}")).unwrap_err().to_string();
        assert!(e.contains("namespaced") && e.contains("clusterWide"), "{e}");
    }
}
