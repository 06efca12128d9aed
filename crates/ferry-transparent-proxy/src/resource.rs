//! The `Destination` custom resource of SAP's Transparent Proxy (SPEC §5.1), its validation, and a
//! loader for YAML files holding such resources (the file-watching mode outside Kubernetes).

use std::collections::BTreeSet;
use std::path::Path;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `apiVersion` of every resource this module accepts.
pub const API_VERSION: &str = "destination.connectivity.api.sap/v1";
/// `kind` of every resource this module accepts.
pub const KIND: &str = "Destination";
/// The `destinationRef.name` that turns a resource into a destination gateway.
pub const GATEWAY: &str = "*";
/// Annotation listing the tenant subdomains of a non-HTTP resource in shared tenant mode.
pub const TENANT_SUBDOMAINS_ANNOTATION: &str = "transparent-proxy.connectivity.api.sap/tenant-subdomains";
/// Longest destination, fragment or chain name the Destination Service stores.
pub const MAX_DESTINATION_NAME_LEN: usize = 200;
/// Longest Kubernetes object name that can also be a Service name (DNS-1123 label).
pub const MAX_RESOURCE_NAME_LEN: usize = 63;

/// Spec of a `Destination` resource: which destination (or, with `"*"`, which destinations) a
/// local endpoint exposes and how it is looked up.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "destination.connectivity.api.sap",
    version = "v1",
    kind = "Destination",
    namespaced,
    status = "DestinationStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Destination","type":"string","jsonPath":".spec.destinationRef.name"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationSpec {
    pub destination_ref: DestinationRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fragment_ref: Option<FragmentRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_ref: Option<ChainRef>,
    /// One of the Destination Service instances the proxy is configured with; the default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_service_instance_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_control: Option<AccessControl>,
}

/// The destination behind the endpoint; `name: "*"` makes a gateway.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<Level>,
}

/// A fragment merged into the destination on every find.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FragmentRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<Level>,
    /// When true a missing fragment is not an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// A destination chain (e.g. `com.sap.iasGeneratedOAuth2SamlBearerAssertion`) and its variables.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChainRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variables: Vec<ChainVariable>,
}

/// One `X-Chain-Var-<name>` value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChainVariable {
    pub name: String,
    pub value: String,
}

/// The Service port the endpoint listens on (the local port in file mode).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    pub port: u16,
}

/// Who may call the endpoint (NetworkPolicy scope on Kubernetes).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessControl {
    pub scope: Scope,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Scope {
    Namespaced,
    ClusterWide,
}

/// Where the Destination Service looks a destination or fragment up.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    ProviderSubaccount,
    ProviderInstance,
    Subaccount,
    Instance,
}

impl Level {
    /// The wire spelling (`@level` / `X-Destination-Level`).
    pub fn as_str(self) -> &'static str {
        match self {
            Level::ProviderSubaccount => "provider_subaccount",
            Level::ProviderInstance => "provider_instance",
            Level::Subaccount => "subaccount",
            Level::Instance => "instance",
        }
    }
}

impl std::str::FromStr for Level {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "provider_subaccount" => Ok(Level::ProviderSubaccount),
            "provider_instance" => Ok(Level::ProviderInstance),
            "subaccount" => Ok(Level::Subaccount),
            "instance" => Ok(Level::Instance),
            _ => Err(()),
        }
    }
}

/// `status` subresource: Kubernetes-style conditions.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One condition, e.g. `Available` / `"True"` / `ConfigurationSuccessful`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `"True"`, `"False"` or `"Unknown"`, as strings like every Kubernetes condition.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// RFC 3339 timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<String>,
}

/// A resource that cannot be served, naming the field to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Destination resource '{resource}': {field}: {reason}")]
pub struct ValidationError {
    /// `metadata.name` (or `<unnamed>`).
    pub resource: String,
    /// Path of the offending field, e.g. `spec.fragmentRef`.
    pub field: &'static str,
    pub reason: String,
}

/// A YAML file that does not hold valid `Destination` resources.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: YAML document {index}: {message}")]
    Parse { path: String, index: usize, message: String },
    #[error("{path}: YAML document {index}: {source}")]
    Invalid { path: String, index: usize, source: ValidationError },
}

impl Destination {
    /// `metadata.namespace`, `default` when absent (files outside Kubernetes rarely set it).
    pub fn namespace_or_default(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// `metadata.name` (validated resources always have one).
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("")
    }

    /// True for a destination gateway (`destinationRef.name: "*"`).
    pub fn is_gateway(&self) -> bool {
        self.spec.destination_ref.name == GATEWAY
    }

    /// The tenant subdomains annotation (shared tenant mode, non-HTTP destinations).
    pub fn tenant_subdomains(&self) -> Result<Vec<String>, ValidationError> {
        let Some(raw) = self.metadata.annotations.as_ref().and_then(|a| a.get(TENANT_SUBDOMAINS_ANNOTATION)) else {
            return Ok(Vec::new());
        };
        serde_json::from_str::<Vec<String>>(raw).map_err(|e| ValidationError {
            resource: self.name().to_owned(),
            field: "metadata.annotations[transparent-proxy.connectivity.api.sap/tenant-subdomains]",
            reason: format!("must be a JSON array of strings like '[\"t1\",\"t2\"]': {e}"),
        })
    }

    /// Checks what the schema cannot: names, the gateway rules, ports.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let resource = self.metadata.name.clone().unwrap_or_else(|| "<unnamed>".to_owned());
        let fail =
            |field: &'static str, reason: String| Err(ValidationError { resource: resource.clone(), field, reason });
        match self.metadata.name.as_deref() {
            None => return fail("metadata.name", "is required".to_owned()),
            Some(name) => {
                if let Err(reason) = check_dns1123_label(name) {
                    return fail("metadata.name", reason);
                }
            }
        }
        if let Some(ns) = self.metadata.namespace.as_deref() {
            if let Err(reason) = check_dns1123_label(ns) {
                return fail("metadata.namespace", reason);
            }
        }
        let spec = &self.spec;
        if !self.is_gateway() {
            if let Err(reason) = check_destination_name(&spec.destination_ref.name) {
                return fail("spec.destinationRef.name", format!("{reason} (or \"*\" for a gateway)"));
            }
        }
        if let Some(fragment) = &spec.fragment_ref {
            if self.is_gateway() {
                return fail(
                    "spec.fragmentRef",
                    "is not allowed when spec.destinationRef.name is \"*\"; gateway callers send X-Fragment-Name"
                        .to_owned(),
                );
            }
            if let Err(reason) = check_destination_name(&fragment.name) {
                return fail("spec.fragmentRef.name", reason);
            }
        }
        if let Some(chain) = &spec.chain_ref {
            if chain.name.is_empty() {
                return fail("spec.chainRef.name", "must not be empty".to_owned());
            }
            let mut seen = BTreeSet::new();
            for var in &chain.variables {
                if var.name.is_empty() || !var.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                    return fail(
                        "spec.chainRef.variables[].name",
                        format!("'{}' must be non-empty letters, digits, '_' or '-'", var.name),
                    );
                }
                if !seen.insert(var.name.as_str()) {
                    return fail("spec.chainRef.variables[].name", format!("'{}' appears twice", var.name));
                }
            }
        }
        if let Some(instance) = &spec.destination_service_instance_name {
            if instance.is_empty() {
                return fail("spec.destinationServiceInstanceName", "must not be empty when set".to_owned());
            }
        }
        if let Some(service) = &spec.service {
            if service.port == 0 {
                return fail("spec.service.port", "must be between 1 and 65535".to_owned());
            }
        }
        self.tenant_subdomains()?;
        Ok(())
    }
}

/// DNS-1123 label: what a Service name must be, since each resource becomes one.
fn check_dns1123_label(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.len() > MAX_RESOURCE_NAME_LEN {
        return Err(format!("'{name}' is {} characters long; the limit is {MAX_RESOURCE_NAME_LEN}", name.len()));
    }
    let ok_chars = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = !name.starts_with('-') && !name.ends_with('-');
    if !ok_chars || !ok_ends {
        return Err(format!(
            "'{name}' is not a DNS-1123 label: use lowercase letters, digits and '-', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// The Destination Service's name rule: letters, digits, `_`, `-`, at most 200 characters.
pub fn check_destination_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    let len = name.chars().count();
    if len > MAX_DESTINATION_NAME_LEN {
        return Err(format!("is {len} characters long; the limit is {MAX_DESTINATION_NAME_LEN}"));
    }
    if let Some(ch) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(format!("'{name}' contains {ch:?}; use letters, digits, '_' or '-'"));
    }
    Ok(())
}

/// Parses every `---`-separated YAML document of `text` into a validated `Destination`; empty
/// documents are skipped. `origin` names the source in errors.
pub fn parse_documents(origin: &str, text: &str) -> Result<Vec<Destination>, LoadError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let parse = |message: String| LoadError::Parse { path: origin.to_owned(), index, message };
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| parse(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let api_version = value.get("apiVersion").and_then(|k| k.as_str()).unwrap_or("");
        if kind != KIND || api_version != API_VERSION {
            return Err(parse(format!(
                "expected apiVersion '{API_VERSION}' and kind '{KIND}', found apiVersion '{api_version}' and kind '{kind}'"
            )));
        }
        let resource: Destination = serde_path_to_error(value).map_err(parse)?;
        resource.validate().map_err(|source| LoadError::Invalid { path: origin.to_owned(), index, source })?;
        out.push(resource);
    }
    Ok(out)
}

/// `serde_yaml::from_value` with the failing field's path in the message.
fn serde_path_to_error(value: serde_yaml::Value) -> Result<Destination, String> {
    // serde_yaml reports the path only when it deserializes from text, so go through text once.
    let text = serde_yaml::to_string(&value).map_err(|e| e.to_string())?;
    serde_yaml::from_str::<Destination>(&text).map_err(|e| e.to_string())
}

/// Reads and parses one file (see [`parse_documents`]).
pub fn load_file(path: &Path) -> Result<Vec<Destination>, LoadError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: origin.clone(), source })?;
    parse_documents(&origin, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
apiVersion: destination.connectivity.api.sap/v1
kind: Destination
metadata:
  name: example-dest
  namespace: apps
  annotations:
    transparent-proxy.connectivity.api.sap/tenant-subdomains: '["t1","t2"]'
spec:
  destinationRef: { name: my-destination, level: subaccount }
  fragmentRef: { name: frag_1, level: instance, optional: true }
  chainRef:
    name: com.sap.iasGeneratedOAuth2SamlBearerAssertion
    variables:
      - { name: samlProviderDestinationName, value: saml-dest }
  destinationServiceInstanceName: dest-1
  service: { port: 8081 }
  accessControl: { scope: clusterWide }
status:
  conditions:
  - type: Available
    status: "True"
    reason: ConfigurationSuccessful
    message: Transparent Proxy is configured.
    lastUpdateTime: "2022-09-28T07:26:46Z"
"#;

    fn one(text: &str) -> Result<Destination, LoadError> {
        let mut all = parse_documents("test.yaml", text)?;
        assert_eq!(all.len(), 1);
        Ok(all.remove(0))
    }

    fn invalid_field(text: &str) -> &'static str {
        match parse_documents("t.yaml", text) {
            Err(LoadError::Invalid { source, .. }) => source.field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn parses_every_field_of_the_spec_example() {
        let d = one(FULL).unwrap();
        assert_eq!(d.name(), "example-dest");
        assert_eq!(d.namespace_or_default(), "apps");
        assert_eq!(
            d.spec.destination_ref,
            DestinationRef { name: "my-destination".into(), level: Some(Level::Subaccount) }
        );
        let frag = d.spec.fragment_ref.as_ref().unwrap();
        assert_eq!((frag.name.as_str(), frag.level, frag.optional), ("frag_1", Some(Level::Instance), Some(true)));
        let chain = d.spec.chain_ref.as_ref().unwrap();
        assert_eq!(chain.variables[0].value, "saml-dest");
        assert_eq!(d.spec.destination_service_instance_name.as_deref(), Some("dest-1"));
        assert_eq!(d.spec.service.as_ref().unwrap().port, 8081);
        assert_eq!(d.spec.access_control.as_ref().unwrap().scope, Scope::ClusterWide);
        assert_eq!(d.tenant_subdomains().unwrap(), vec!["t1", "t2"]);
        let cond = &d.status.as_ref().unwrap().conditions[0];
        assert_eq!((cond.type_.as_str(), cond.status.as_str()), ("Available", "True"));
        assert_eq!(cond.last_update_time.as_deref(), Some("2022-09-28T07:26:46Z"));
        assert!(!d.is_gateway());
    }

    #[test]
    fn round_trips_through_yaml_with_sap_field_names() {
        let d = one(FULL).unwrap();
        let text = serde_yaml::to_string(&d).unwrap();
        for key in ["destinationRef:", "fragmentRef:", "chainRef:", "destinationServiceInstanceName:", "accessControl:"]
        {
            assert!(text.contains(key), "{key} missing in {text}");
        }
        assert!(text.contains("lastUpdateTime:") && text.contains("type: Available"), "{text}");
        assert_eq!(one(&text).unwrap(), d);
    }

    #[test]
    fn crd_has_group_version_kind_scope_and_status() {
        use kube::CustomResourceExt;
        let crd = Destination::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("destinations.destination.connectivity.api.sap"));
        assert_eq!(crd.spec.group, "destination.connectivity.api.sap");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, "Destination");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let schema = serde_json::to_string(&v.schema).unwrap();
        for key in ["destinationRef", "provider_subaccount", "clusterWide", "lastUpdateTime", "chainRef"] {
            assert!(schema.contains(key), "{key} missing in schema");
        }
    }

    #[test]
    fn several_documents_and_empty_ones() {
        let text = format!("---\n{FULL}\n---\n---\n{}", FULL.replace("example-dest", "second"));
        let all = parse_documents("x.yaml", &text).unwrap();
        let names: Vec<_> = all.iter().map(|d| d.name().to_owned()).collect();
        assert_eq!(names, ["example-dest", "second"]);
        assert!(parse_documents("x.yaml", "").unwrap().is_empty());
    }

    #[test]
    fn minimal_gateway_defaults() {
        let d = one(
            "apiVersion: destination.connectivity.api.sap/v1\nkind: Destination\nmetadata: {name: gw}\nspec:\n  destinationRef: {name: \"*\"}\n",
        )
        .unwrap();
        assert!(d.is_gateway());
        assert_eq!(d.namespace_or_default(), "default");
        assert!(d.tenant_subdomains().unwrap().is_empty());
    }

    #[test]
    fn gateway_forbids_static_fragment() {
        let text = "apiVersion: destination.connectivity.api.sap/v1\nkind: Destination\nmetadata: {name: gw}\nspec:\n  destinationRef: {name: \"*\"}\n  fragmentRef: {name: f}\n";
        assert_eq!(invalid_field(text), "spec.fragmentRef");
    }

    fn with(field_yaml: &str, name: &str) -> String {
        format!(
            "apiVersion: destination.connectivity.api.sap/v1\nkind: Destination\nmetadata: {{name: {name}}}\nspec:\n  destinationRef: {{name: d}}\n{field_yaml}"
        )
    }

    #[test]
    fn names_and_fields_are_checked() {
        assert_eq!(invalid_field(&with("", "Upper")), "metadata.name");
        assert_eq!(invalid_field(&with("", "-lead")), "metadata.name");
        assert_eq!(invalid_field(&with("", &"a".repeat(64))), "metadata.name");
        assert_eq!(invalid_field(&with("", "under_score")), "metadata.name");
        assert_eq!(invalid_field(&with("  fragmentRef: {name: 'a b'}\n", "ok")), "spec.fragmentRef.name");
        assert_eq!(invalid_field(&with("  service: {port: 0}\n", "ok")), "spec.service.port");
        assert_eq!(invalid_field(&with("  chainRef: {name: ''}\n", "ok")), "spec.chainRef.name");
        assert_eq!(
            invalid_field(&with(
                "  chainRef: {name: c, variables: [{name: a, value: x}, {name: a, value: y}]}\n",
                "ok"
            )),
            "spec.chainRef.variables[].name"
        );
        assert_eq!(
            invalid_field(&with("  destinationServiceInstanceName: ''\n", "ok")),
            "spec.destinationServiceInstanceName"
        );
        let bad_dest = with("", "ok").replace("name: d}", &format!("name: {}}}", "x".repeat(201)));
        assert_eq!(invalid_field(&bad_dest), "spec.destinationRef.name");
        let bad_annotation = with("", "ok").replace(
            "metadata: {name: ok}",
            "metadata: {name: ok, annotations: {transparent-proxy.connectivity.api.sap/tenant-subdomains: 't1'}}",
        );
        assert!(invalid_field(&bad_annotation).starts_with("metadata.annotations"));
        assert!(parse_documents("t", &with("", "fine-1")).is_ok());
    }

    #[test]
    fn bad_level_and_unknown_fields_name_the_path() {
        let err = parse_documents("t.yaml", &with("  fragmentRef: {name: f, level: tenant}\n", "ok")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("spec.fragmentRef.level") && msg.contains("provider_subaccount"), "{msg}");
        let err = parse_documents("t.yaml", &with("  servcie: {port: 1}\n", "ok")).unwrap_err();
        assert!(err.to_string().contains("servcie"), "{err}");
        let err = parse_documents("t.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n").unwrap_err();
        assert!(err.to_string().contains("found apiVersion 'v1' and kind 'Service'"), "{err}");
        let err = parse_documents("t.yaml", "a: [").unwrap_err();
        assert!(matches!(err, LoadError::Parse { index: 1, .. }), "{err}");
    }

    #[test]
    fn load_file_reports_missing_file() {
        let err = load_file(Path::new("/nonexistent/ferry-tp.yaml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ferry-tp.yaml"), "{err}");
    }
}
