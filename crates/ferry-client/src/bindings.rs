//! Service bindings of an app, read the way the SAP Cloud SDK (through `@sap/xsenv`) reads them
//! (CLIENT-CONTRACT §1.1):
//!
//! 1. `VCAP_SERVICES_FILE_PATH` (a JSON file) if set, else the `VCAP_SERVICES` variable, else the
//!    `VCAP_SERVICES` of `default-env.json` in the working directory (what `xsenv.loadEnv` does
//!    for local runs; `ferry up` writes that file);
//! 2. then Kubernetes-style mounted bindings under `SERVICE_BINDING_ROOT` (servicebinding.io: one
//!    folder per binding, one file per property), consulted only for a service that step 1 has no
//!    binding of.
//!
//! A binding is chosen by its `label` (what the SDK does), else by its `tags` (what the approuter
//! does); the first match wins. The `destinations` variable (env destinations, §1.5) comes from the
//! environment, else from `default-env.json`.
//!
//! Credentials are kept as [`Secret`]s: no `Debug` output of this module shows one.

use std::fmt;
use std::path::{Path, PathBuf};

use ferry_core::Secret;
use serde_json::{Map, Value};

/// Why bindings could not be read or a binding is unusable.
#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{what} is not valid JSON: {source}")]
    Json { what: String, source: serde_json::Error },
    #[error(
        "{what} is not a JSON object of binding arrays (`{{\"<service>\": [{{\"label\": …, \"credentials\": …}}]}}`)"
    )]
    Shape { what: String },
    #[error(
        "no {label} binding: set VCAP_SERVICES (or VCAP_SERVICES_FILE_PATH), put a default-env.json \
         (as `ferry up` writes it) in the working directory, or mount bindings under SERVICE_BINDING_ROOT"
    )]
    Missing { label: String },
    #[error("the {label} binding `{name}` (from {origin}) has no `{field}` in its credentials")]
    Field { label: String, name: String, origin: String, field: String },
}

/// One service binding: instance name, service label, tags and the raw credentials.
#[derive(Clone)]
pub struct ServiceBinding {
    /// The service instance name (`name` in VCAP_SERVICES, the folder name when mounted).
    pub name: String,
    /// The service (`destination`, `connectivity`, `xsuaa`, …).
    pub label: String,
    pub tags: Vec<String>,
    /// Where the binding came from (`$VCAP_SERVICES`, a file path), for error messages.
    pub source: String,
    credentials: Secret<Map<String, Value>>,
}

impl fmt::Debug for ServiceBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceBinding")
            .field("name", &self.name)
            .field("label", &self.label)
            .field("tags", &self.tags)
            .field("source", &self.source)
            .field("credentials", &"***")
            .finish()
    }
}

impl ServiceBinding {
    /// The credentials object; it holds secrets, so keep it out of logs.
    pub fn credentials(&self) -> &Map<String, Value> {
        self.credentials.expose()
    }

    /// A credential as text (numbers are turned into text, since ports come either way).
    pub fn text(&self, key: &str) -> Option<String> {
        match self.credentials().get(key)? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    fn require(&self, key: &str) -> Result<String, BindingError> {
        self.text(key).ok_or_else(|| BindingError::Field {
            label: self.label.clone(),
            name: self.name.clone(),
            origin: self.source.clone(),
            field: key.to_owned(),
        })
    }

    fn matches(&self, label: &str) -> bool {
        self.label == label
    }

    fn tagged(&self, label: &str) -> bool {
        self.tags.iter().any(|t| t == label)
    }
}

/// Client credentials of a binding, for `POST {url}/oauth/token` (CLIENT-CONTRACT §2.1).
#[derive(Clone, Debug)]
pub struct OAuthCredentials {
    /// Token service base URL (`url`); provider tokens come from `{url}/oauth/token`.
    pub url: String,
    /// `uaadomain`: tenant tokens come from `https://{uaadomain}/oauth/token` with `x-zid`.
    pub uaadomain: Option<String>,
    pub client_id: String,
    /// `clientsecret`; `None` for x509 bindings (`certificate` + `key`).
    pub client_secret: Option<Secret<String>>,
    /// `certificate` + `key` (PEM) of an x509 binding, used as TLS client identity on token calls.
    pub certificate: Option<(String, Secret<String>)>,
    /// `certurl`: token service base for x509 bindings.
    pub cert_url: Option<String>,
}

impl OAuthCredentials {
    fn from_binding(b: &ServiceBinding) -> Result<Self, BindingError> {
        let client_secret = b.text("clientsecret").map(Secret::new);
        let certificate = match (b.text("certificate"), b.text("key")) {
            (Some(c), Some(k)) => Some((c, Secret::new(k))),
            _ => None,
        };
        if client_secret.is_none() && certificate.is_none() {
            b.require("clientsecret")?;
        }
        Ok(Self {
            url: b.require("url")?.trim_end_matches('/').to_owned(),
            uaadomain: b.text("uaadomain"),
            client_id: b.require("clientid")?,
            client_secret,
            certificate,
            cert_url: b.text("certurl").map(|u| u.trim_end_matches('/').to_owned()),
        })
    }
}

/// A service binding that the SAP Cloud SDK turns into a destination when a destination of the
/// binding's instance name is asked for (CLIENT-CONTRACT §1.1, lookup step 3).
pub(crate) enum BoundDestination {
    /// `OAuth2ClientCredentials` with a token of the binding's own client.
    ClientCredentials { url: String, credentials: OAuthCredentials },
    /// `s4-hana-cloud` bindings carry a user and password.
    Basic { url: String, user: String, password: Secret<String> },
}

/// The `destination` binding: where the Destination Service is and how to get a token for it.
#[derive(Clone, Debug)]
pub struct DestinationBinding {
    /// The service instance name.
    pub name: String,
    /// Destination Service base URL (`uri`, trailing slashes removed).
    pub uri: String,
    pub credentials: OAuthCredentials,
    /// Where the binding came from, for error messages.
    pub source: String,
}

/// The `connectivity` binding: the Connectivity Proxy's address and its token client.
#[derive(Clone, Debug)]
pub struct ConnectivityBinding {
    pub name: String,
    /// `onpremise_proxy_host`.
    pub proxy_host: String,
    /// `onpremise_proxy_http_port`, else `onpremise_proxy_port`.
    pub http_port: u16,
    /// `onpremise_socks5_proxy_port`, if the binding has one.
    pub socks5_port: Option<u16>,
    pub credentials: OAuthCredentials,
    pub source: String,
}

impl ConnectivityBinding {
    /// `host:port` of the HTTP proxy.
    pub fn http_proxy(&self) -> String {
        format!("{}:{}", self.proxy_host, self.http_port)
    }

    /// `host:port` of the SOCKS5 proxy, if the binding names one.
    pub fn socks5_proxy(&self) -> Option<String> {
        self.socks5_port.map(|p| format!("{}:{p}", self.proxy_host))
    }
}

/// The `xsuaa` binding (user logins of the app; `xsappname` identifies it).
#[derive(Clone, Debug)]
pub struct XsuaaBinding {
    pub name: String,
    pub xsappname: Option<String>,
    pub credentials: OAuthCredentials,
    pub source: String,
}

/// All bindings of an app, in precedence order, plus its env destinations.
#[derive(Clone, Debug, Default)]
pub struct Bindings {
    bindings: Vec<ServiceBinding>,
    /// The `destinations` variable's entries (they may hold passwords).
    env_destinations: Secret<Vec<Value>>,
}

impl Bindings {
    /// Reads the process environment and working directory as described in the [module docs](self).
    ///
    /// ```no_run
    /// let bindings = ferry_client::Bindings::from_env()?;
    /// let destination = bindings.destination()?;
    /// println!("Destination Service at {}", destination.uri);
    /// # Ok::<(), ferry_client::BindingError>(())
    /// ```
    pub fn from_env() -> Result<Self, BindingError> {
        Self::from_sources(|name| std::env::var_os(name), Path::new("default-env.json"))
    }

    /// [`Bindings::from_env`] with `var` for the process environment and `default_env` for
    /// `./default-env.json`, so the precedence is testable without changing the environment.
    fn from_sources(
        var: impl Fn(&str) -> Option<std::ffi::OsString>,
        default_env: &Path,
    ) -> Result<Self, BindingError> {
        let default_env = if default_env.is_file() { Some(read_json(default_env)?) } else { None };
        let text_var = |name: &str| var(name).and_then(|v| v.into_string().ok());
        let mut out = Bindings::default();
        if let Some(path) = var("VCAP_SERVICES_FILE_PATH") {
            let path = PathBuf::from(path);
            out.bindings = parse_vcap(&read_json(&path)?, &path.display().to_string())?;
        } else if let Some(text) = text_var("VCAP_SERVICES") {
            out.bindings = Self::from_vcap_services(&text)?.bindings;
        } else if let Some(env) = &default_env
            && let Some(vcap) = env.get("VCAP_SERVICES")
        {
            out.bindings = parse_vcap(&unstring(vcap, "VCAP_SERVICES in default-env.json")?, "./default-env.json")?;
        }
        if let Some(root) = var("SERVICE_BINDING_ROOT") {
            out.bindings.extend(read_binding_root(Path::new(&root))?);
        }
        let destinations = match text_var("destinations") {
            Some(text) => Some(parse_json(&text, "the destinations variable")?),
            None => default_env.as_ref().and_then(|e| e.get("destinations")).cloned(),
        };
        if let Some(d) = destinations {
            out.env_destinations = Secret::new(env_destination_list(&d)?);
        }
        Ok(out)
    }

    /// Bindings from a `VCAP_SERVICES` JSON text.
    ///
    /// ```
    /// let vcap = r#"{"destination": [{"name": "dest", "label": "destination", "tags": ["destination"],
    ///   "credentials": {"uri": "https://dest.example", "url": "https://auth.example",
    ///                   "clientid": "c", "clientsecret": "s"}}]}"#;
    /// let b = ferry_client::Bindings::from_vcap_services(vcap)?.destination()?;
    /// assert_eq!(b.uri, "https://dest.example");
    /// assert!(!format!("{b:?}").contains("\"s\""));
    /// # Ok::<(), ferry_client::BindingError>(())
    /// ```
    pub fn from_vcap_services(text: &str) -> Result<Self, BindingError> {
        let vcap = parse_json(text, "VCAP_SERVICES")?;
        Ok(Bindings { bindings: parse_vcap(&vcap, "$VCAP_SERVICES")?, env_destinations: Secret::default() })
    }

    /// Bindings (and env destinations) from a `default-env.json` file.
    ///
    /// ```
    /// let file = std::env::temp_dir().join(format!("doc-default-env-{}.json", std::process::id()));
    /// std::fs::write(&file, r#"{"VCAP_SERVICES": {"destination": [{"label": "destination", "credentials":
    ///   {"uri": "https://dest.example", "url": "https://auth.example", "clientid": "c", "clientsecret": "s"}}]},
    ///   "destinations": [{"Name": "web", "URL": "https://web.example"}]}"#).unwrap();
    /// let bindings = ferry_client::Bindings::from_default_env_file(&file)?;
    /// assert_eq!(bindings.destination()?.uri, "https://dest.example");
    /// assert_eq!(bindings.env_destination("web").unwrap()["URL"], "https://web.example");
    /// # std::fs::remove_file(&file).unwrap();
    /// # Ok::<(), ferry_client::BindingError>(())
    /// ```
    pub fn from_default_env_file(path: &Path) -> Result<Self, BindingError> {
        let env = read_json(path)?;
        let shown = path.display().to_string();
        let vcap = env.get("VCAP_SERVICES").map(|v| unstring(v, &format!("VCAP_SERVICES in {shown}"))).transpose()?;
        let bindings = match vcap {
            Some(v) => parse_vcap(&v, &shown)?,
            None => Vec::new(),
        };
        let env_destinations = match env.get("destinations") {
            Some(d) => env_destination_list(d)?,
            None => Vec::new(),
        };
        Ok(Bindings { bindings, env_destinations: Secret::new(env_destinations) })
    }

    /// Mounted bindings under `root` (servicebinding.io layout).
    ///
    /// ```
    /// let root = std::env::temp_dir().join(format!("doc-bindings-{}", std::process::id()));
    /// let dir = root.join("my-connectivity");
    /// std::fs::create_dir_all(&dir).unwrap();
    /// for (file, value) in [("type", "connectivity"), ("onpremise_proxy_host", "proxy.local"),
    ///     ("onpremise_proxy_http_port", "20003"), ("onpremise_socks5_proxy_port", "20004"),
    ///     ("url", "https://auth.example"), ("clientid", "c"), ("clientsecret", "s")] {
    ///     std::fs::write(dir.join(file), value).unwrap();
    /// }
    /// let connectivity = ferry_client::Bindings::from_service_binding_root(&root)?.connectivity()?;
    /// assert_eq!(connectivity.http_proxy(), "proxy.local:20003");
    /// assert_eq!(connectivity.socks5_proxy().as_deref(), Some("proxy.local:20004"));
    /// # std::fs::remove_dir_all(&root).unwrap();
    /// # Ok::<(), ferry_client::BindingError>(())
    /// ```
    pub fn from_service_binding_root(root: &Path) -> Result<Self, BindingError> {
        Ok(Bindings { bindings: read_binding_root(root)?, env_destinations: Secret::default() })
    }

    /// A single binding given as a service key (its `credentials` object, or an object that has one).
    pub fn from_service_key(label: &str, key: &Value, source: &str) -> Result<Self, BindingError> {
        let creds = key.get("credentials").unwrap_or(key);
        let Some(creds) = creds.as_object() else { return Err(BindingError::Shape { what: source.to_owned() }) };
        let binding = ServiceBinding {
            name: label.to_owned(),
            label: label.to_owned(),
            tags: vec![label.to_owned()],
            source: source.to_owned(),
            credentials: Secret::new(creds.clone()),
        };
        Ok(Bindings { bindings: vec![binding], env_destinations: Secret::default() })
    }

    /// Every binding, in precedence order.
    pub fn all(&self) -> &[ServiceBinding] {
        &self.bindings
    }

    /// The first binding of service `label` (by label, else by tag).
    pub fn find(&self, label: &str) -> Option<&ServiceBinding> {
        self.bindings.iter().find(|b| b.matches(label)).or_else(|| self.bindings.iter().find(|b| b.tagged(label)))
    }

    fn require(&self, label: &str) -> Result<&ServiceBinding, BindingError> {
        self.find(label).ok_or_else(|| BindingError::Missing { label: label.to_owned() })
    }

    /// The binding whose instance name is `name`, as the destination the SDK's transformers
    /// make of it: the URL each service's credentials name, and its client. `None` when no
    /// binding has that name, its service has no transformer, or its credentials lack a field
    /// (the SDK then asks the Destination Service).
    pub(crate) fn bound_destination(&self, name: &str) -> Option<BoundDestination> {
        let b = self.bindings.iter().find(|b| b.name == name)?;
        let creds = b.credentials();
        let text = |v: Option<&Value>| v.and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
        // The services whose token client sits in a nested `uaa` object.
        let nested = |b: &ServiceBinding| {
            let uaa = creds.get("uaa")?.as_object()?.clone();
            OAuthCredentials::from_binding(&ServiceBinding { credentials: Secret::new(uaa), ..b.clone() }).ok()
        };
        let (url, credentials) = match b.label.as_str() {
            "destination" => (text(creds.get("uri")), OAuthCredentials::from_binding(b).ok()),
            "xsuaa" => (text(creds.get("apiurl")), OAuthCredentials::from_binding(b).ok()),
            "service-manager" => (text(creds.get("sm_url")), OAuthCredentials::from_binding(b).ok()),
            "saas-registry" => (text(creds.get("saas_registry_url")), OAuthCredentials::from_binding(b).ok()),
            "aicore" => (
                text(creds.get("serviceurls").and_then(|u| u.get("AI_API_URL"))),
                OAuthCredentials::from_binding(b).ok(),
            ),
            "business-logging" => (text(creds.get("writeUrl")), nested(b)),
            "workflow" => (text(creds.get("endpoints").and_then(|e| e.get("workflow_odata_url"))), nested(b)),
            "s4-hana-cloud" => {
                return Some(BoundDestination::Basic {
                    url: text(creds.get("URL"))?,
                    user: text(creds.get("User"))?,
                    password: Secret::new(text(creds.get("Password")).unwrap_or_default()),
                });
            }
            _ => return None,
        };
        Some(BoundDestination::ClientCredentials { url: url?, credentials: credentials? })
    }

    /// The `destination` binding.
    pub fn destination(&self) -> Result<DestinationBinding, BindingError> {
        let b = self.require("destination")?;
        Ok(DestinationBinding {
            name: b.name.clone(),
            uri: b.require("uri")?.trim_end_matches('/').to_owned(),
            credentials: OAuthCredentials::from_binding(b)?,
            source: b.source.clone(),
        })
    }

    /// The `connectivity` binding.
    pub fn connectivity(&self) -> Result<ConnectivityBinding, BindingError> {
        let b = self.require("connectivity")?;
        let port = |key: &str| -> Result<Option<u16>, BindingError> {
            match b.text(key) {
                None => Ok(None),
                Some(p) => p.parse().map(Some).map_err(|_| BindingError::Field {
                    label: b.label.clone(),
                    name: b.name.clone(),
                    origin: b.source.clone(),
                    field: format!("{key} as a port number (it is {p:?})"),
                }),
            }
        };
        let http_port = match port("onpremise_proxy_http_port")? {
            Some(p) => p,
            None => port("onpremise_proxy_port")?.ok_or_else(|| BindingError::Field {
                label: b.label.clone(),
                name: b.name.clone(),
                origin: b.source.clone(),
                field: "onpremise_proxy_http_port".to_owned(),
            })?,
        };
        Ok(ConnectivityBinding {
            name: b.name.clone(),
            proxy_host: b.require("onpremise_proxy_host")?,
            http_port,
            socks5_port: port("onpremise_socks5_proxy_port")?,
            credentials: OAuthCredentials::from_binding(b)?,
            source: b.source.clone(),
        })
    }

    /// The `xsuaa` binding.
    pub fn xsuaa(&self) -> Result<XsuaaBinding, BindingError> {
        let b = self.require("xsuaa")?;
        Ok(XsuaaBinding {
            name: b.name.clone(),
            xsappname: b.text("xsappname"),
            credentials: OAuthCredentials::from_binding(b)?,
            source: b.source.clone(),
        })
    }

    /// The env destination named `name` (the `destinations` variable), as a Destination Service
    /// `destinationConfiguration` object. SDK-shaped entries (lowercase keys) are mapped to it.
    pub fn env_destination(&self, name: &str) -> Option<Map<String, Value>> {
        self.env_destinations.expose().iter().find_map(|d| {
            let obj = d.as_object()?;
            if obj.contains_key("URL") {
                (obj.get("Name").and_then(Value::as_str) == Some(name)).then(|| obj.clone())
            } else if obj.get("name").and_then(Value::as_str) == Some(name) {
                Some(sdk_shaped(obj))
            } else {
                None
            }
        })
    }
}

/// Maps an SDK-shaped env destination (`name`, `url`, `authentication`, …) to Destination Service keys.
fn sdk_shaped(obj: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in obj {
        let key = match k.as_str() {
            "name" => "Name",
            "url" => "URL",
            "authentication" => "Authentication",
            "username" => "User",
            "password" => "Password",
            "proxyType" => "ProxyType",
            "type" => "Type",
            "sapClient" => "sap-client",
            "cloudConnectorLocationId" => "CloudConnectorLocationId",
            other => other,
        };
        out.insert(key.to_owned(), v.clone());
    }
    out
}

fn parse_json(text: &str, what: &str) -> Result<Value, BindingError> {
    serde_json::from_str(text).map_err(|source| BindingError::Json { what: what.to_owned(), source })
}

fn read_json(path: &Path) -> Result<Value, BindingError> {
    let text = std::fs::read_to_string(path).map_err(|source| BindingError::Read { path: path.to_owned(), source })?;
    parse_json(&text, &path.display().to_string())
}

/// `VCAP_SERVICES` inside a `default-env.json` may be an object or a JSON string.
fn unstring(v: &Value, what: &str) -> Result<Value, BindingError> {
    match v {
        Value::String(s) => parse_json(s, what),
        v => Ok(v.clone()),
    }
}

fn env_destination_list(v: &Value) -> Result<Vec<Value>, BindingError> {
    match unstring(v, "destinations")? {
        Value::Array(a) => Ok(a),
        _ => Err(BindingError::Shape { what: "the destinations variable (a JSON array)".to_owned() }),
    }
}

/// xsenv flattens `{"<any key>": [binding, …]}`; the top-level key is only a fallback label.
fn parse_vcap(vcap: &Value, source: &str) -> Result<Vec<ServiceBinding>, BindingError> {
    let shape = || BindingError::Shape { what: source.to_owned() };
    let mut out = Vec::new();
    for (service, list) in vcap.as_object().ok_or_else(shape)? {
        for b in list.as_array().ok_or_else(shape)? {
            let text = |k: &str| b.get(k).and_then(Value::as_str).map(str::to_owned);
            let Some(creds) = b.get("credentials").and_then(Value::as_object) else { continue };
            out.push(ServiceBinding {
                name: text("name").unwrap_or_else(|| service.clone()),
                label: text("label").unwrap_or_else(|| service.clone()),
                tags: b
                    .get("tags")
                    .and_then(Value::as_array)
                    .map(|t| t.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                    .unwrap_or_default(),
                source: source.to_owned(),
                credentials: Secret::new(creds.clone()),
            });
        }
    }
    Ok(out)
}

/// Files of a mounted binding that describe it rather than carry credentials.
const META_FILES: &[&str] = &["type", "provider", "label", "tags", "name", "instance_name", "plan"];

/// servicebinding.io: `<root>/<binding>/<property>` files. A binding without `type` (and without
/// `label`) is dropped, as xsenv does. `.metadata` names the properties whose content is JSON.
fn read_binding_root(root: &Path) -> Result<Vec<ServiceBinding>, BindingError> {
    let read_err = |path: &Path, source| BindingError::Read { path: path.to_owned(), source };
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_err(root, e)),
    };
    let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    let mut out = Vec::new();
    for dir in dirs {
        let Some(dir_name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
        if dir_name.starts_with('.') {
            continue;
        }
        let read = |name: &str| -> Result<Option<String>, BindingError> {
            match std::fs::read_to_string(dir.join(name)) {
                Ok(s) => Ok(Some(s.trim_end_matches(['\n', '\r']).to_owned())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(read_err(&dir.join(name), e)),
            }
        };
        let metadata = match read(".metadata")? {
            Some(m) => Some(parse_json(&m, &dir.join(".metadata").display().to_string())?),
            None => None,
        };
        let json_props: Vec<String> = metadata
            .iter()
            .flat_map(|m| ["metaDataProperties", "credentialProperties"].map(|k| m.get(k)))
            .flatten()
            .filter_map(Value::as_array)
            .flatten()
            .filter(|p| p.get("format").and_then(Value::as_str) == Some("json"))
            .filter_map(|p| p.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect();
        let label = match read("label")? {
            Some(l) => l,
            None => match read("type")? {
                Some(t) => t,
                None => continue,
            },
        };
        let mut tags: Vec<String> = match read("tags")? {
            Some(t) => serde_json::from_str(&t).unwrap_or_else(|_| t.split(',').map(|s| s.trim().to_owned()).collect()),
            None => Vec::new(),
        };
        if !tags.contains(&label) {
            tags.push(label.clone());
        }
        let mut creds = Map::new();
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&dir).map_err(|e| read_err(&dir, e))?.flatten().map(|e| e.path()).collect();
        files.sort();
        for file in files.iter().filter(|p| p.is_file()) {
            let Some(key) = file.file_name().and_then(|n| n.to_str()) else { continue };
            if key.starts_with('.') || META_FILES.contains(&key) {
                continue;
            }
            let Some(text) = read(key)? else { continue };
            let value = if json_props.iter().any(|p| p == key) {
                parse_json(&text, &file.display().to_string())?
            } else {
                Value::String(text)
            };
            creds.insert(key.to_owned(), value);
        }
        out.push(ServiceBinding {
            name: read("name")?.or(read("instance_name")?).unwrap_or(dir_name),
            label,
            tags,
            source: dir.display().to_string(),
            credentials: Secret::new(creds),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VCAP: &str = r#"{
      "whatever": [{"name": "my-dest", "label": "destination", "tags": ["destination"],
        "credentials": {"uri": "http://127.0.0.1:1/", "url": "http://127.0.0.1:2", "clientid": "dc", "clientsecret": "top-secret"}}],
      "user-provided": [{"name": "conn", "tags": ["connectivity"],
        "credentials": {"onpremise_proxy_host": "127.0.0.1", "onpremise_proxy_port": "20003",
          "onpremise_proxy_http_port": 20004, "onpremise_socks5_proxy_port": "20005",
          "url": "http://127.0.0.1:2", "clientid": "cc", "clientsecret": "conn-secret"}}]
    }"#;

    #[test]
    fn vcap_bindings_by_label_then_tag() {
        let b = Bindings::from_vcap_services(VCAP).unwrap();
        let d = b.destination().unwrap();
        assert_eq!((d.name.as_str(), d.uri.as_str()), ("my-dest", "http://127.0.0.1:1"));
        assert_eq!(d.credentials.client_secret.as_ref().unwrap().expose(), "top-secret");
        let c = b.connectivity().unwrap();
        assert_eq!(c.http_proxy(), "127.0.0.1:20004", "the http port wins over onpremise_proxy_port");
        assert_eq!(c.socks5_proxy().unwrap(), "127.0.0.1:20005");
        let shown = format!("{b:?} {d:?} {c:?}");
        assert!(!shown.contains("top-secret") && !shown.contains("conn-secret"), "{shown}");
        assert!(matches!(b.xsuaa(), Err(BindingError::Missing { .. })));
    }

    #[test]
    fn missing_field_names_it() {
        let b = Bindings::from_vcap_services(r#"{"destination":[{"label":"destination","credentials":{"uri":"x"}}]}"#)
            .unwrap();
        let e = b.destination().unwrap_err().to_string();
        assert!(e.contains("`url`") || e.contains("`clientsecret`"), "{e}");
        assert!(Bindings::from_vcap_services("[1]").is_err());
        assert!(Bindings::from_vcap_services("{").is_err());
    }

    #[test]
    fn mounted_bindings() {
        let root = std::env::temp_dir().join(format!("ferry-client-sbr-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let d = root.join("dest");
        std::fs::create_dir_all(&d).unwrap();
        for (k, v) in [
            ("type", "destination"),
            ("uri", "http://127.0.0.1:1\n"),
            ("url", "http://127.0.0.1:2"),
            ("clientid", "dc"),
            ("clientsecret", "s"),
            ("extra", "{\"a\":1}"),
            (".metadata", r#"{"credentialProperties":[{"name":"extra","format":"json"}]}"#),
        ] {
            std::fs::write(d.join(k), v).unwrap();
        }
        // No type and no label: dropped.
        std::fs::create_dir_all(root.join("untyped")).unwrap();
        std::fs::write(root.join("untyped").join("uri"), "x").unwrap();
        let b = Bindings::from_service_binding_root(&root).unwrap();
        assert_eq!(b.all().len(), 1);
        let dest = b.destination().unwrap();
        assert_eq!((dest.name.as_str(), dest.uri.as_str()), ("dest", "http://127.0.0.1:1"));
        assert_eq!(b.find("destination").unwrap().credentials()["extra"]["a"], 1);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// The SDK's service-binding transformers: each service's URL field, a nested `uaa` client
    /// where the service has one, Basic for `s4-hana-cloud`; anything else is no destination.
    #[test]
    fn bound_service_instances_as_destinations() {
        let client = r#""url": "https://auth", "clientid": "c", "clientsecret": "s""#;
        let vcap = format!(
            r#"{{"destination": [{{"name": "d", "label": "destination", "credentials": {{"uri": "https://dest", {client}}}}}],
              "aicore": [{{"name": "ai", "label": "aicore", "credentials": {{"serviceurls": {{"AI_API_URL": "https://ai"}}, {client}}}}}],
              "workflow": [{{"name": "wf", "label": "workflow", "credentials": {{"endpoints": {{"workflow_odata_url": "https://wf"}},
                "uaa": {{{client}}}}}}}],
              "s4-hana-cloud": [{{"name": "s4", "label": "s4-hana-cloud", "credentials": {{"URL": "https://s4", "User": "U", "Password": "P"}}}}],
              "broken": [{{"name": "no-url", "label": "xsuaa", "credentials": {{{client}}}}}],
              "other": [{{"name": "hana", "label": "hana", "credentials": {{"url": "jdbc:x"}}}}]}}"#
        );
        let b = Bindings::from_vcap_services(&vcap).unwrap();
        let oauth = |name: &str| match b.bound_destination(name) {
            Some(BoundDestination::ClientCredentials { url, credentials }) => Some((url, credentials.client_id)),
            _ => None,
        };
        assert_eq!(oauth("d"), Some(("https://dest".into(), "c".into())));
        assert_eq!(oauth("ai"), Some(("https://ai".into(), "c".into())));
        assert_eq!(oauth("wf"), Some(("https://wf".into(), "c".into())));
        match b.bound_destination("s4") {
            Some(BoundDestination::Basic { url, user, password }) => {
                assert_eq!((url.as_str(), user.as_str(), password.expose().as_str()), ("https://s4", "U", "P"))
            }
            _ => panic!("s4-hana-cloud is Basic"),
        }
        for none in ["no-url", "hana", "not-bound"] {
            assert!(b.bound_destination(none).is_none(), "{none}");
        }
    }

    /// CLIENT-CONTRACT §1.1/§1.5: `VCAP_SERVICES_FILE_PATH` before `VCAP_SERVICES` before
    /// `default-env.json`; mounted bindings only for services those lack; the `destinations`
    /// variable before the file's.
    #[test]
    fn environment_precedence() {
        let dir = std::env::temp_dir().join(format!("ferry-client-precedence-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mounted = dir.join("bindings").join("mounted-dest");
        std::fs::create_dir_all(&mounted).unwrap();
        for (k, v) in [
            ("type", "destination"),
            ("uri", "http://mounted"),
            ("url", "http://t"),
            ("clientid", "m"),
            ("clientsecret", "s"),
        ] {
            std::fs::write(mounted.join(k), v).unwrap();
        }
        let vcap = |name: &str, uri: &str| {
            serde_json::json!({"destination": [{"name": name, "label": "destination",
                "credentials": {"uri": uri, "url": "http://t", "clientid": "c", "clientsecret": "s"}}]})
        };
        let default_env = dir.join("default-env.json");
        let file_env = serde_json::json!({
            "VCAP_SERVICES": vcap("from-file", "http://file"),
            "destinations": [{"Name": "d", "URL": "http://file-destination"}]
        });
        std::fs::write(&default_env, file_env.to_string()).unwrap();
        let vcap_file = dir.join("vcap.json");
        std::fs::write(&vcap_file, vcap("from-path", "http://path").to_string()).unwrap();
        let vars = |pairs: Vec<(&'static str, String)>| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.into())
        };
        let chosen = |b: &Bindings| b.destination().unwrap().name;
        let env_url = |b: &Bindings| b.env_destination("d").map(|d| d["URL"].as_str().unwrap().to_owned());
        let vcap_var = ("VCAP_SERVICES", vcap("from-var", "http://var").to_string());
        let path_var = ("VCAP_SERVICES_FILE_PATH", vcap_file.display().to_string());
        let root_var = ("SERVICE_BINDING_ROOT", dir.join("bindings").display().to_string());
        let destinations_var = ("destinations", r#"[{"Name": "d", "URL": "http://variable"}]"#.to_owned());

        let b = Bindings::from_sources(vars(vec![path_var.clone(), vcap_var.clone()]), &default_env).unwrap();
        assert_eq!(chosen(&b), "from-path");
        let b = Bindings::from_sources(vars(vec![vcap_var.clone()]), &default_env).unwrap();
        assert_eq!(chosen(&b), "from-var");
        let b = Bindings::from_sources(vars(vec![root_var.clone()]), &default_env).unwrap();
        assert_eq!(chosen(&b), "from-file", "a VCAP binding of the service wins over a mounted one");
        assert_eq!(env_url(&b).as_deref(), Some("http://file-destination"));
        let b = Bindings::from_sources(vars(vec![root_var, destinations_var]), &dir.join("absent.json")).unwrap();
        assert_eq!(chosen(&b), "mounted-dest", "mounted bindings serve a service VCAP_SERVICES lacks");
        assert_eq!(env_url(&b).as_deref(), Some("http://variable"));
        let b = Bindings::from_sources(vars(vec![("destinations", "[]".into())]), &default_env).unwrap();
        assert_eq!(env_url(&b), None, "the variable replaces the file's destinations, even when empty");
        let broken = Bindings::from_sources(vars(vec![("destinations", "{".into())]), &default_env).unwrap_err();
        assert!(broken.to_string().contains("the destinations variable"), "{broken}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn default_env_file_with_string_vcap_and_env_destinations() {
        let dir = std::env::temp_dir().join(format!("ferry-client-denv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("default-env.json");
        let env = serde_json::json!({
            "VCAP_SERVICES": VCAP,
            "destinations": [{"name": "sdk", "url": "http://127.0.0.1:9", "username": "u", "password": "p"},
                             {"Name": "svc", "URL": "http://127.0.0.1:8", "Authentication": "NoAuthentication"}]
        });
        std::fs::write(&file, env.to_string()).unwrap();
        let b = Bindings::from_default_env_file(&file).unwrap();
        assert_eq!(b.destination().unwrap().name, "my-dest");
        let sdk = b.env_destination("sdk").unwrap();
        assert_eq!((sdk["URL"].as_str(), sdk["User"].as_str()), (Some("http://127.0.0.1:9"), Some("u")));
        assert_eq!(b.env_destination("svc").unwrap()["URL"], "http://127.0.0.1:8");
        assert!(b.env_destination("nope").is_none());
        assert!(!format!("{b:?}").contains("\"p\""));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
