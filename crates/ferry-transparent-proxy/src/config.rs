//! The proxy's configuration file (TOML) and what it resolves to.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_client::Bindings;
use serde::Deserialize;

use crate::TpError;

/// `dedicated`: one tenant (the binding's); `shared`: every request names its tenant with
/// `X-Tenant-Id` or `X-Tenant-Subdomain` (SPEC §5.2).
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TenantMode {
    #[default]
    Dedicated,
    Shared,
}

/// The TOML file as written (keys documented in docs/configuration.md).
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Folder whose `*.yaml`/`*.yml` files hold `Destination` resources.
    pub resources_dir: PathBuf,
    /// How often the folder is scanned for changes.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    #[serde(default)]
    pub tenant_mode: TenantMode,
    /// Address every endpoint listens on.
    #[serde(default = "default_listen_host")]
    pub listen_host: IpAddr,
    /// A `default-env.json`-style file (`{"VCAP_SERVICES": …}`) with the `destination` and,
    /// for OnPremise destinations, `connectivity` bindings.
    pub env_file: Option<PathBuf>,
    /// Instead of `env_file`: a service key (JSON) of the Destination Service instance.
    pub destination_service_key: Option<PathBuf>,
    /// With `destination_service_key`: a service key of the connectivity instance.
    pub connectivity_service_key: Option<PathBuf>,
    /// PEM file of a CA to trust besides the system roots (token service, Destination Service, backends).
    pub ca_file: Option<PathBuf>,
    /// Where the current endpoint list (resource → address) is written as JSON on every change.
    pub endpoints_file: Option<PathBuf>,
    /// Connect timeout towards the Connectivity Proxy (SAP's `connectionTimeoutSeconds`, default 1 s).
    #[serde(default = "default_proxy_connect_ms")]
    pub connectivity_proxy_connect_timeout_ms: u64,
    /// Name of the instance the `destination` binding above is (SAP's
    /// `config.integration.destinationService.defaultInstanceName`); resources without
    /// `spec.destinationServiceInstanceName` use it.
    #[serde(default = "default_instance_name")]
    pub default_instance_name: String,
    /// Further Destination Service instances (SAP's `config.integration.destinationService.instances[]`).
    #[serde(default)]
    pub instances: Vec<InstanceConfig>,
}

/// One more Destination Service instance, referred to by `spec.destinationServiceInstanceName`.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    pub name: String,
    /// Its service key (JSON, `credentials` or bare).
    pub destination_service_key: PathBuf,
}

impl FileConfig {
    /// Reads and parses a TOML file and [checks](FileConfig::check) it.
    pub fn load(path: &Path) -> Result<FileConfig, TpError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TpError::Config(format!("cannot read {}: {e}", path.display())))?;
        let file: FileConfig =
            toml::from_str(&text).map_err(|e| TpError::Config(format!("{}: {e}", path.display())))?;
        file.check()?;
        Ok(file)
    }

    /// What can be checked without reading the files it names.
    pub fn check(&self) -> Result<(), TpError> {
        if self.env_file.is_some() && self.destination_service_key.is_some() {
            return Err(TpError::Config("set either env_file or destination_service_key, not both".into()));
        }
        if self.connectivity_service_key.is_some() && self.destination_service_key.is_none() {
            return Err(TpError::Config("connectivity_service_key needs destination_service_key".into()));
        }
        let mut names = std::collections::HashSet::new();
        for i in &self.instances {
            if i.name.is_empty() || i.name == self.default_instance_name || !names.insert(i.name.as_str()) {
                return Err(TpError::Config(format!(
                    "instances: the name '{}' is empty, the default_instance_name, or used twice",
                    i.name
                )));
            }
        }
        if self.poll_interval_ms == 0 {
            return Err(TpError::Config("poll_interval_ms must be at least 1".into()));
        }
        Ok(())
    }
}

fn default_poll_ms() -> u64 {
    1000
}
fn default_listen_host() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}
fn default_proxy_connect_ms() -> u64 {
    1000
}
fn default_instance_name() -> String {
    "default".to_owned()
}

/// The resolved configuration [`crate::run`] takes.
#[derive(Clone, Debug)]
pub struct Config {
    pub resources_dir: PathBuf,
    pub poll_interval: Duration,
    pub tenant_mode: TenantMode,
    pub listen_host: IpAddr,
    pub bindings: Bindings,
    pub ca_pem: Option<String>,
    pub endpoints_file: Option<PathBuf>,
    pub proxy_connect_timeout: Duration,
    /// Name of the instance of `bindings`' destination binding.
    pub default_instance_name: String,
    /// Further Destination Service instances by name, each as bindings with a `destination` binding.
    pub instances: Vec<(String, Bindings)>,
}

impl Config {
    /// Reads a TOML file; relative paths in it are relative to the file's folder.
    pub fn from_file(path: &Path) -> Result<Config, TpError> {
        let file = FileConfig::load(path)?;
        Config::resolve(file, path.parent().unwrap_or(Path::new(".")))
    }

    /// Loads the bindings and CA a [`FileConfig`] names. Without `env_file` and service keys the
    /// bindings come from the environment (`VCAP_SERVICES`, `SERVICE_BINDING_ROOT`, …).
    pub fn resolve(file: FileConfig, base: &Path) -> Result<Config, TpError> {
        let abs = |p: &Path| if p.is_absolute() { p.to_owned() } else { base.join(p) };
        let read = |p: &Path| {
            std::fs::read_to_string(abs(p))
                .map_err(|e| TpError::Config(format!("cannot read {}: {e}", abs(p).display())))
        };
        let parse = |p: &Path| -> Result<serde_json::Value, TpError> {
            serde_json::from_str(&read(p)?)
                .map_err(|e| TpError::Config(format!("{} is not JSON: {e}", abs(p).display())))
        };
        let credentials = |v: serde_json::Value| v.get("credentials").cloned().unwrap_or(v);
        file.check()?;
        let bindings = match (&file.env_file, &file.destination_service_key) {
            // Both at once: refused by `check` above.
            (Some(env), _) => Bindings::from_default_env_file(&abs(env))?,
            (None, Some(key)) => {
                let mut vcap = serde_json::json!({
                    "destination": [{"label": "destination", "credentials": credentials(parse(key)?)}]
                });
                if let Some(c) = &file.connectivity_service_key {
                    vcap["connectivity"] =
                        serde_json::json!([{"label": "connectivity", "credentials": credentials(parse(c)?)}]);
                }
                Bindings::from_vcap_services(&vcap.to_string())?
            }
            (None, None) => Bindings::from_env()?,
        };
        // Fail at start, not at the first request, when the destination binding is unusable.
        bindings.destination()?;
        let mut instances: Vec<(String, Bindings)> = Vec::new();
        for i in &file.instances {
            let vcap = serde_json::json!({
                "destination": [{"label": "destination", "name": i.name, "credentials": credentials(parse(&i.destination_service_key)?)}]
            });
            let b = Bindings::from_vcap_services(&vcap.to_string())?;
            b.destination()?;
            instances.push((i.name.clone(), b));
        }
        Ok(Config {
            resources_dir: abs(&file.resources_dir),
            poll_interval: Duration::from_millis(file.poll_interval_ms),
            tenant_mode: file.tenant_mode,
            listen_host: file.listen_host,
            bindings,
            ca_pem: file.ca_file.as_deref().map(read).transpose()?,
            endpoints_file: file.endpoints_file.as_deref().map(abs),
            proxy_connect_timeout: Duration::from_millis(file.connectivity_proxy_connect_timeout_ms.max(1)),
            default_instance_name: file.default_instance_name,
            instances,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_keys_become_bindings_and_paths_are_relative_to_the_file() {
        let dir = std::env::temp_dir().join(format!("ferry-tp-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = r#"{"uri": "http://127.0.0.1:1", "url": "http://127.0.0.1:2", "clientid": "c", "clientsecret": "s"}"#;
        std::fs::write(dir.join("dest.json"), key).unwrap();
        std::fs::write(
            dir.join("tp.toml"),
            "resources_dir = \"res\"\ndestination_service_key = \"dest.json\"\ntenant_mode = \"shared\"\n",
        )
        .unwrap();
        let c = Config::from_file(&dir.join("tp.toml")).unwrap();
        assert_eq!(c.resources_dir, dir.join("res"));
        assert_eq!(c.tenant_mode, TenantMode::Shared);
        assert_eq!(c.bindings.destination().unwrap().uri, "http://127.0.0.1:1");
        assert!(c.bindings.connectivity().is_err());
        assert_eq!(c.proxy_connect_timeout, Duration::from_secs(1));

        assert_eq!(c.default_instance_name, "default");
        std::fs::write(
            dir.join("multi.toml"),
            "resources_dir = \"res\"\ndestination_service_key = \"dest.json\"\ndefault_instance_name = \"a\"\n\
             [[instances]]\nname = \"b\"\ndestination_service_key = \"dest.json\"\n",
        )
        .unwrap();
        let c = Config::from_file(&dir.join("multi.toml")).unwrap();
        assert_eq!(c.default_instance_name, "a");
        assert_eq!(c.instances[0].0, "b");
        assert_eq!(c.instances[0].1.destination().unwrap().uri, "http://127.0.0.1:1");
        std::fs::write(
            dir.join("twice.toml"),
            "resources_dir = \"res\"\ndestination_service_key = \"dest.json\"\n\
             [[instances]]\nname = \"default\"\ndestination_service_key = \"dest.json\"\n",
        )
        .unwrap();
        let err = Config::from_file(&dir.join("twice.toml")).unwrap_err().to_string();
        assert!(err.contains("'default'"), "{err}");

        std::fs::write(dir.join("bad.toml"), "resources_dir = \"res\"\ntenant_mode = \"both\"\n").unwrap();
        let err = Config::from_file(&dir.join("bad.toml")).unwrap_err().to_string();
        assert!(err.contains("tenant_mode") || err.contains("both"), "{err}");
        std::fs::write(dir.join("none.toml"), "resources_dir = \"res\"\nenv_file = \"missing.json\"\n").unwrap();
        assert!(Config::from_file(&dir.join("none.toml")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
