//! Reconciling `Destination` resources into Services and NetworkPolicies. `reconcile` and `error_policy` are plain
//! functions over a [`Context`] holding a `kube::Client`, so tests drive them against kube's
//! mock API service; `run` wires them into kube's `Controller`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_transparent_proxy::TenantMode;
use ferry_transparent_proxy::resource::{Condition, Destination, Scope};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use k8s_openapi::api::core::v1::{Namespace, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};

/// Finalizer that keeps a resource until its backend Service is gone.
pub const FINALIZER: &str = "destination.connectivity.api.sap/ferry-transparent-proxy";
/// Field manager of server-side apply, and the `managed-by` label of the Services.
pub const MANAGER: &str = "ferry-transparent-proxy";
/// The label every namespace carries with its own name (Kubernetes 1.22+), which a
/// NetworkPolicy's `namespaceSelector` can pick one namespace by.
pub const LABEL_NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";
/// Labels on every Service and NetworkPolicy the controller creates, naming the resource it serves.
pub const LABEL_NAME: &str = "destination.connectivity.api.sap/name";
pub const LABEL_NAMESPACE: &str = "destination.connectivity.api.sap/namespace";
/// On the Services of one tenant of a per-tenant TCP resource (shared tenant mode).
pub const LABEL_TENANT: &str = "destination.connectivity.api.sap/tenant-subdomain";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// First delay after a failed reconcile; doubled per further failure up to `MAX_BACKOFF`.
pub const BASE_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What the proxy pods speak to the app for a destination: HTTP, or a byte stream (TCP, LDAP,
/// MAIL), which SAP serves from other pods and on port 20004.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Tcp,
}

impl Protocol {
    /// Service port when `spec.service.port` is absent (SPEC §5.1).
    pub fn default_port(self) -> u16 {
        match self {
            Protocol::Http => 80,
            Protocol::Tcp => 20004,
        }
    }

    /// The protocol of a destination `Type` (`HTTP`, `TCP`, `LDAP`, `MAIL`, ...).
    pub fn of_type(destination_type: &str) -> Self {
        if destination_type.eq_ignore_ascii_case("HTTP") { Protocol::Http } else { Protocol::Tcp }
    }
}

/// Tells a resource's protocol, i.e. looks its destination up in the Destination Service. A
/// failure is retried with back-off.
pub trait Resolver: Send + Sync + 'static {
    fn protocol<'a>(&'a self, destination: &'a Destination) -> BoxFuture<'a, Result<Protocol, String>>;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot look the destination up in the Destination Service: {0}")]
    Resolve(String),
    #[error("{0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    #[error("the resource has no {0}")]
    Missing(&'static str),
}

/// What `reconcile` needs: the client, the configuration, the resolver, and the failure count
/// of each resource for the back-off.
pub struct Context {
    pub client: Client,
    pub config: crate::Config,
    resolver: Arc<dyn Resolver>,
    recorder: Recorder,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, config: crate::Config, resolver: Arc<dyn Resolver>) -> Arc<Self> {
        let reporter = Reporter { controller: MANAGER.into(), instance: std::env::var("HOSTNAME").ok() };
        let recorder = Recorder::new(client.clone(), reporter);
        Arc::new(Self { client, config, resolver, recorder, failures: Mutex::new(HashMap::new()) })
    }

    /// Failed reconciles of a resource since its last success.
    pub fn failures(&self, namespace: &str, name: &str) -> u32 {
        self.failures.lock().map(|f| f.get(&key(namespace, name)).copied().unwrap_or(0)).unwrap_or(0)
    }

    async fn manages(&self, namespace: &str) -> Result<bool, Error> {
        let Some((k, v)) = self.config.namespace_selector.as_deref().and_then(|s| s.split_once('=')) else {
            return Ok(true);
        };
        let ns = Api::<Namespace>::all(self.client.clone()).get(namespace).await?;
        Ok(ns.labels().get(k).is_some_and(|l| l == v))
    }
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Name of the backend Service in the proxy namespace: readable, at most 63 characters, and
/// distinct for every (namespace, name) because of the hash.
pub fn backend_name(namespace: &str, name: &str) -> String {
    // FNV-1a: stable across releases and platforms, unlike std's hasher.
    let hash = key(namespace, name).bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    let mut prefix = format!("{name}-{namespace}");
    prefix.truncate(54);
    format!("{}-{hash:08x}", prefix.trim_end_matches('-'))
}

/// The message SAP's proxy writes into the `Available` condition.
pub fn success_message(name: &str) -> String {
    format!("Transparent Proxy is configured and Kubernetes service with name \"{name}\" is created.")
}

/// The Service sets of a resource: one, named after it; or in shared tenant mode, for a TCP
/// resource with the `tenant-subdomains` annotation, one per tenant, `<name>-<subdomain>`
/// (SPEC §5.1), which the proxy serves on `tcp_port(namespace, "<name>-<subdomain>")`.
fn units(d: &Destination, protocol: Protocol, ctx: &Context) -> Vec<(String, Option<String>)> {
    let name = d.name_any();
    let tenants = match (ctx.config.tenant_mode, protocol) {
        (TenantMode::Shared, Protocol::Tcp) => d.tenant_subdomains().unwrap_or_default(),
        _ => Vec::new(),
    };
    if tenants.is_empty() {
        return vec![(name, None)];
    }
    tenants.into_iter().map(|t| (format!("{name}-{t}"), Some(t))).collect()
}

/// The resource whose backend Service already targets `port`, other than `own` (`namespace/name`
/// of the unit): a second listener cannot open there, and its traffic would reach the first.
fn port_taken_by(services: &[Service], port: i32, own: &BTreeMap<String, String>) -> Option<String> {
    services.iter().find_map(|s| {
        let labels = s.metadata.labels.as_ref()?;
        let same = [LABEL_NAMESPACE, LABEL_NAME, LABEL_TENANT].iter().all(|k| labels.get(*k) == own.get(*k));
        let targets = s.spec.as_ref()?.ports.as_ref()?.iter().any(|p| p.target_port == Some(IntOrString::Int(port)));
        (!same && targets).then(|| {
            let mut who = format!("{}/{}", labels.get(LABEL_NAMESPACE)?, labels.get(LABEL_NAME)?);
            if let Some(t) = labels.get(LABEL_TENANT) {
                who.push_str(&format!(" (tenant {t})"));
            }
            Some(who)
        })?
    })
}

/// Brings the Services of one resource in line with it (or removes them when it is deleted).
pub async fn reconcile(destination: Arc<Destination>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = destination.namespace().ok_or(Error::Missing("metadata.namespace"))?;
    let name = destination.name_any();
    if !ctx.manages(&namespace).await? {
        // The namespace may be labelled later; check again at the next resync.
        return Ok(Action::requeue(Duration::from_secs(ctx.config.resync_secs)));
    }
    let api: Api<Destination> = Api::namespaced(ctx.client.clone(), &namespace);
    let context: &Context = &ctx;
    let result = finalizer(&api, FINALIZER, destination, |event| async move {
        match event {
            finalizer::Event::Apply(d) => apply(&d, context).await,
            finalizer::Event::Cleanup(d) => cleanup(&d, context).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok() {
        if let Ok(mut f) = ctx.failures.lock() {
            f.remove(&key(&namespace, &name));
        }
    }
    result
}

/// Requeues a failed resource after an exponential delay (1 s, 2 s, 4 s, ... at most 5 min),
/// so an unreachable API server or Destination Service is not hammered.
pub fn error_policy(destination: Arc<Destination>, error: &Error, ctx: Arc<Context>) -> Action {
    let namespace = destination.namespace().unwrap_or_default();
    let name = destination.name_any();
    let failures = match ctx.failures.lock() {
        Ok(mut f) => {
            let n = f.entry(key(&namespace, &name)).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        Err(_) => 1,
    };
    let delay = backoff(failures);
    tracing::warn!(%namespace, %name, failures, retry_in = ?delay, "Destination resource not reconciled: {error}");
    Action::requeue(delay)
}

/// Delay after the `failures`-th failure in a row.
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BASE_BACKOFF.saturating_mul(1 << doublings).min(MAX_BACKOFF)
}

async fn apply(d: &Destination, ctx: &Context) -> Result<Action, Error> {
    let namespace = d.namespace().ok_or(Error::Missing("metadata.namespace"))?;
    let name = d.name_any();
    if let Err(e) = d.validate() {
        // The user's to fix: say so on the resource and wait for a change instead of retrying.
        let message = e.to_string();
        if set_available(d, ctx, false, "InvalidConfiguration", &message).await? {
            publish(ctx, d, EventType::Warning, "InvalidConfiguration", message).await;
        }
        return Ok(Action::await_change());
    }
    let protocol =
        if d.is_gateway() { Protocol::Http } else { ctx.resolver.protocol(d).await.map_err(Error::Resolve)? };
    let port = d.spec.service.as_ref().map(|s| s.port).unwrap_or(protocol.default_port());
    let apply = PatchParams::apply(MANAGER).force();
    let target = ctx.config.target(protocol);
    let units = units(d, protocol, ctx);
    // Without a fixed port (HTTP always has one) the proxy listens for each TCP resource on a port
    // of its own: a byte stream names no host to route by. That port comes from a hash of the
    // name, so two resources can land on one; the one already there keeps it.
    if target.target_port.is_none() {
        let services = Api::<Service>::namespaced(ctx.client.clone(), &ctx.config.proxy_namespace)
            .list(&ListParams::default().labels(&format!("{MANAGED_BY}={MANAGER}")))
            .await?
            .items;
        for (unit, tenant) in &units {
            let tcp_port = ferry_transparent_proxy::cluster::tcp_port(&namespace, unit);
            let own = labels(&namespace, &name, tenant.as_deref());
            if let Some(other) = port_taken_by(&services, i32::from(tcp_port), &own) {
                let message = format!(
                    "The TCP port {tcp_port} the Transparent Proxy derives for \"{unit}\" is already used by Destination \
                     {other}; rename one of the two resources."
                );
                if set_available(d, ctx, false, "PortConflict", &message).await? {
                    publish(ctx, d, EventType::Warning, "PortConflict", message).await;
                }
                return Ok(Action::requeue(Duration::from_secs(ctx.config.resync_secs)));
            }
        }
    }
    let mut policy_ports = Vec::new();
    for (unit, tenant) in &units {
        let target_port = match &target.target_port {
            Some(p) => p.clone(),
            None => ferry_transparent_proxy::cluster::tcp_port(&namespace, unit).to_string(),
        };
        apply_services(d, ctx, &apply, &namespace, unit, tenant.as_deref(), port, &target.selector, &target_port)
            .await?;
        if !policy_ports.contains(&target_port) {
            policy_ports.push(target_port);
        }
    }
    let scope = d.spec.access_control.as_ref().map_or(ctx.config.default_scope, |a| a.scope);
    apply_policy(d, ctx, &apply, &namespace, scope, &target.selector, &policy_ports).await?;
    if ctx.config.tenant_mode == TenantMode::Shared {
        remove_stale_services(d, ctx, &namespace, &units).await?;
    }
    let message = success_message(&units.iter().map(|(u, _)| u.as_str()).collect::<Vec<_>>().join("\", \""));
    if set_available(d, ctx, true, "ConfigurationSuccessful", &message).await? {
        publish(ctx, d, EventType::Normal, "ConfigurationSuccessful", message).await;
    }
    Ok(Action::requeue(Duration::from_secs(ctx.config.resync_secs)))
}

/// The backend Service of one unit in the proxy namespace, and the app's alias of it.
#[allow(clippy::too_many_arguments)]
async fn apply_services(
    d: &Destination,
    ctx: &Context,
    apply: &PatchParams,
    namespace: &str,
    unit: &str,
    tenant: Option<&str>,
    port: u16,
    selector: &BTreeMap<String, String>,
    target_port: &str,
) -> Result<(), Error> {
    let name = d.name_any();
    let backend = backend_name(namespace, unit);
    let backend_svc = Service {
        metadata: ObjectMeta {
            name: Some(backend.clone()),
            namespace: Some(ctx.config.proxy_namespace.clone()),
            labels: Some(labels(namespace, &name, tenant)),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector.clone()),
            ports: Some(vec![service_port(port, Some(target_port))]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Service>::namespaced(ctx.client.clone(), &ctx.config.proxy_namespace)
        .patch(&backend, apply, &Patch::Apply(&backend_svc))
        .await?;
    let app_svc = Service {
        metadata: ObjectMeta {
            name: Some(unit.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels(namespace, &name, tenant)),
            owner_references: d.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: Some(format!("{backend}.{}.svc.{}", ctx.config.proxy_namespace, ctx.config.cluster_domain)),
            ports: Some(vec![service_port(port, None)]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Api::<Service>::namespaced(ctx.client.clone(), namespace).patch(unit, apply, &Patch::Apply(&app_svc)).await?;
    Ok(())
}

/// The NetworkPolicy admitting the resource's callers to the proxy pods that serve it, on the
/// container ports its backend Services target. It must live in the proxy namespace (a policy
/// selects pods of its own namespace), so like the backend Services it has no owner reference
/// and goes in `cleanup`. Policies add up per pod: a pod selected by any policy admits only what
/// some policy allows, so each resource can only open its own ports, which are its alone for TCP
/// but shared by every HTTP resource (routed by `Host`).
async fn apply_policy(
    d: &Destination,
    ctx: &Context,
    apply: &PatchParams,
    namespace: &str,
    scope: Scope,
    selector: &BTreeMap<String, String>,
    ports: &[String],
) -> Result<(), Error> {
    let name = d.name_any();
    let policy_name = backend_name(namespace, &name);
    let from = match scope {
        Scope::Namespaced => LabelSelector {
            match_labels: Some(BTreeMap::from([(LABEL_NAMESPACE_NAME.to_owned(), namespace.to_owned())])),
            ..Default::default()
        },
        // Every pod of every namespace; not an absent `from`, which would admit any address
        // (nodes, load balancers, outside the cluster) as well.
        Scope::ClusterWide => LabelSelector::default(),
    };
    let policy = NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(policy_name.clone()),
            namespace: Some(ctx.config.proxy_namespace.clone()),
            labels: Some(labels(namespace, &name, None)),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector { match_labels: Some(selector.clone()), ..Default::default() }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer { namespace_selector: Some(from), ..Default::default() }]),
                ports: Some(
                    ports
                        .iter()
                        .map(|p| NetworkPolicyPort {
                            port: Some(int_or_string(p)),
                            protocol: Some("TCP".into()),
                            ..Default::default()
                        })
                        .collect(),
                ),
            }]),
            ..Default::default()
        }),
    };
    Api::<NetworkPolicy>::namespaced(ctx.client.clone(), &ctx.config.proxy_namespace)
        .patch(&policy_name, apply, &Patch::Apply(&policy))
        .await?;
    Ok(())
}

/// Shared tenant mode: deletes the resource's Services (backend and app-facing) whose tenant is
/// none of `units`', i.e. of tenants that left the `tenant-subdomains` annotation, or the plain
/// ones once it has tenants (and the tenants' once it has none).
async fn remove_stale_services(
    d: &Destination,
    ctx: &Context,
    namespace: &str,
    units: &[(String, Option<String>)],
) -> Result<(), Error> {
    let selector = format!("{MANAGED_BY}={MANAGER},{LABEL_NAMESPACE}={namespace},{LABEL_NAME}={}", d.name_any());
    let mut namespaces = vec![ctx.config.proxy_namespace.as_str()];
    if namespace != ctx.config.proxy_namespace {
        namespaces.push(namespace);
    }
    for ns in namespaces {
        let api = Api::<Service>::namespaced(ctx.client.clone(), ns);
        for svc in api.list(&ListParams::default().labels(&selector)).await?.items {
            let tenant = svc.labels().get(LABEL_TENANT);
            if units.iter().any(|(_, t)| t.as_ref() == tenant) {
                continue;
            }
            tracing::info!(namespace = ns, service = %svc.name_any(), "deleting the Service of a tenant no longer served");
            delete_if_present(&api, &svc.name_any()).await?;
        }
    }
    Ok(())
}

/// Deletes an object; one already gone is no error.
async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn cleanup(d: &Destination, ctx: &Context) -> Result<Action, Error> {
    let namespace = d.namespace().ok_or(Error::Missing("metadata.namespace"))?;
    // The app-facing Services go with the resource (owner reference); the backends and the
    // NetworkPolicy live in another namespace and must be deleted here: the resource's own
    // backend and, in shared tenant mode, those of its annotation's tenants (whatever the
    // protocol, which is not looked up here).
    let mut units = vec![d.name_any()];
    if ctx.config.tenant_mode == TenantMode::Shared {
        units.extend(d.tenant_subdomains().unwrap_or_default().iter().map(|t| format!("{}-{t}", d.name_any())));
    }
    let services = Api::<Service>::namespaced(ctx.client.clone(), &ctx.config.proxy_namespace);
    for unit in units {
        delete_if_present(&services, &backend_name(&namespace, &unit)).await?;
    }
    let policies = Api::<NetworkPolicy>::namespaced(ctx.client.clone(), &ctx.config.proxy_namespace);
    delete_if_present(&policies, &backend_name(&namespace, &d.name_any())).await?;
    Ok(Action::await_change())
}

fn labels(namespace: &str, name: &str, tenant: Option<&str>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (MANAGED_BY.to_owned(), MANAGER.to_owned()),
        (LABEL_NAMESPACE.to_owned(), namespace.to_owned()),
        (LABEL_NAME.to_owned(), name.to_owned()),
    ]);
    if let Some(t) = tenant {
        labels.insert(LABEL_TENANT.to_owned(), t.to_owned());
    }
    labels
}

fn service_port(port: u16, target: Option<&str>) -> ServicePort {
    ServicePort {
        name: Some("destination".into()),
        port: i32::from(port),
        protocol: Some("TCP".into()),
        target_port: target.map(int_or_string),
        ..Default::default()
    }
}

/// A port number, or a container port's name.
fn int_or_string(port: &str) -> IntOrString {
    match port.parse::<i32>() {
        Ok(n) => IntOrString::Int(n),
        Err(_) => IntOrString::String(port.to_owned()),
    }
}

/// Writes the `Available` condition unless it already says the same; true if it changed.
async fn set_available(d: &Destination, ctx: &Context, ok: bool, reason: &str, message: &str) -> Result<bool, Error> {
    let status = if ok { "True" } else { "False" };
    let current = d.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Available"));
    if current.is_some_and(|c| {
        c.status == status && c.reason.as_deref() == Some(reason) && c.message.as_deref() == Some(message)
    }) {
        return Ok(false);
    }
    let condition = Condition {
        type_: "Available".into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_update_time: Some(
            k8s_openapi::chrono::Utc::now().to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true),
        ),
    };
    let namespace = d.namespace().ok_or(Error::Missing("metadata.namespace"))?;
    let patch = serde_json::json!({ "status": { "conditions": [condition] } });
    Api::<Destination>::namespaced(ctx.client.clone(), &namespace)
        .patch_status(&d.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(true)
}

/// Events are for people reading `kubectl describe`; failing to record one must not fail the
/// reconcile, so it is only logged.
async fn publish(ctx: &Context, d: &Destination, type_: EventType, reason: &str, note: String) {
    let event = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&event, &d.object_ref(&())).await {
        tracing::warn!(name = %d.name_any(), "cannot record event: {e}");
    }
}

/// Runs the controller until `shutdown` completes: every `Destination` in the cluster (those in
/// unmanaged namespaces are skipped), re-checked on changes to it or its Services.
pub async fn run(
    client: Client,
    config: crate::Config,
    resolver: Arc<dyn Resolver>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let ctx = Context::new(client.clone(), config, resolver);
    let services = Api::<Service>::all(client.clone());
    Controller::new(Api::<Destination>::all(client), watcher::Config::default())
        .owns(services, watcher::Config::default().labels(&format!("{MANAGED_BY}={MANAGER}")))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!("reconcile: {e}");
            }
        })
        .await;
}
