//! `ferry crdgen` and `ferry k8s-controller`: the Transparent Proxy's Kubernetes side.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use ferry_core::Shutdown;
use ferry_k8s::{Protocol, Resolver};
use ferry_transparent_proxy::resource::{Destination, Level};
use futures_util::future::BoxFuture;

pub fn crdgen() -> anyhow::Result<()> {
    print!("{}", ferry_k8s::crd_yaml()?);
    Ok(())
}

#[derive(clap::Args)]
pub struct ControllerArgs {
    /// Controller configuration file (TOML; the transparent-proxy chart renders it).
    #[arg(long, short)]
    config: PathBuf,
    /// Where `/healthz` answers (the pod's probes).
    #[arg(long, default_value = "0.0.0.0:8081")]
    health_listen: String,
}

/// Looks destinations up in the Destination Service instance a resource names
/// (`spec.destinationServiceInstanceName`, else the default instance): one client per
/// `destination` binding the pod has (servicebinding.io folders under `SERVICE_BINDING_ROOT`,
/// named by instance, or `VCAP_SERVICES`). Only the `Type` matters here.
struct DestinationServices {
    /// By binding (instance) name, in the bindings' order.
    clients: Vec<(String, ferry_client::Client)>,
    default_instance: String,
}

impl DestinationServices {
    /// `ca_pem`: a CA to trust besides the system roots (`FERRY_CA_FILE`).
    fn new(bindings: &ferry_client::Bindings, default_instance: &str, ca_pem: Option<&str>) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        for b in bindings.all().iter().filter(|b| b.label == "destination" || b.tags.iter().any(|t| t == "destination"))
        {
            let one = ferry_client::Bindings::from_service_key(
                "destination",
                &serde_json::Value::Object(b.credentials().clone()),
                &b.source,
            )?;
            clients.push((b.name.clone(), ferry_client::Client::new(one, ca_pem)?));
        }
        // Without one every reconcile would fail and back off forever; say so at start instead.
        anyhow::ensure!(
            !clients.is_empty(),
            "the controller needs a destination binding (a folder per instance under SERVICE_BINDING_ROOT, or VCAP_SERVICES)"
        );
        Ok(Self { clients, default_instance: default_instance.to_owned() })
    }

    /// The client of `instance` (a resource's `spec.destinationServiceInstanceName`). A resource
    /// without one uses the default instance, or the only binding when that is named otherwise
    /// (a `VCAP_SERVICES` entry keeps its own name).
    fn pick(&self, instance: Option<&str>) -> Result<&ferry_client::Client, String> {
        let name = instance.unwrap_or(&self.default_instance);
        if let Some((_, c)) = self.clients.iter().find(|(n, _)| n == name) {
            return Ok(c);
        }
        match (instance, self.clients.as_slice()) {
            (None, [(_, only)]) => Ok(only),
            _ => Err(format!(
                "no binding for Destination Service instance {name:?}; the controller has {}",
                self.clients.iter().map(|(n, _)| format!("{n:?}")).collect::<Vec<_>>().join(", ")
            )),
        }
    }
}

impl Resolver for DestinationServices {
    fn protocol<'a>(&'a self, d: &'a Destination) -> BoxFuture<'a, Result<Protocol, String>> {
        Box::pin(async move {
            let client = self.pick(d.spec.destination_service_instance_name.as_deref())?;
            let level = d.spec.destination_ref.level.map(|l| match l {
                Level::Subaccount | Level::ProviderSubaccount => ferry_client::Level::Subaccount,
                Level::Instance | Level::ProviderInstance => ferry_client::Level::Instance,
            });
            let options = ferry_client::Options { level, skip_token_retrieval: true, ..Default::default() };
            let found =
                client.get_destination(&d.spec.destination_ref.name, &options).await.map_err(|e| e.to_string())?;
            Ok(Protocol::of_type(&found.property("Type").unwrap_or_default()))
        })
    }
}

pub async fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    ferry_core::init_crypto();
    let config = ferry_k8s::Config::load(&args.config)?;
    let bindings = ferry_client::Bindings::from_env().context("cannot read the destination bindings")?;
    let ca = std::env::var_os("FERRY_CA_FILE")
        .map(|p| {
            std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read FERRY_CA_FILE {}", PathBuf::from(&p).display()))
        })
        .transpose()?;
    let destinations = DestinationServices::new(&bindings, &config.default_instance_name, ca.as_deref())?;
    let client = kube::Client::try_default()
        .await
        .context("cannot configure the Kubernetes client (in-cluster service account or KUBECONFIG)")?;
    let shutdown = Shutdown::new();
    let listener = ferry_core::serve::bind(&args.health_listen).await?;
    let health = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
    let server = tokio::spawn(ferry_core::serve::serve_router(
        listener,
        health,
        None,
        ferry_core::serve::AcceptOptions::named("health"),
        shutdown.clone(),
    ));
    println!("ready");
    let stop = shutdown.clone();
    ferry_k8s::run(client, config, Arc::new(destinations), async move {
        crate::up::wait_for_signal().await;
        stop.cancel();
    })
    .await;
    shutdown.cancel();
    let _ = server.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn services(names: &[&str], default: &str) -> DestinationServices {
        let entries: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                serde_json::json!({"label": "destination", "name": n, "credentials": {
                    "uri": format!("http://127.0.0.1:{}", 1000 + i), "url": "http://127.0.0.1:2",
                    "clientid": "c", "clientsecret": "s"}})
            })
            .collect();
        let vcap = serde_json::json!({"destination": entries}).to_string();
        DestinationServices::new(&ferry_client::Bindings::from_vcap_services(&vcap).unwrap(), default, None).unwrap()
    }

    fn uri(c: &ferry_client::Client) -> String {
        c.bindings().destination().unwrap().uri
    }

    #[test]
    fn a_resource_is_looked_up_in_the_instance_it_names() {
        let s = services(&["default", "second"], "default");
        assert_eq!(uri(s.pick(None).unwrap()), "http://127.0.0.1:1000");
        assert_eq!(uri(s.pick(Some("second")).unwrap()), "http://127.0.0.1:1001");
        let e = s.pick(Some("third")).err().unwrap();
        assert!(e.contains("\"third\"") && e.contains("\"default\", \"second\""), "{e}");
        // The default instance by its configured name.
        let s = services(&["default", "second"], "second");
        assert_eq!(uri(s.pick(None).unwrap()), "http://127.0.0.1:1001");
    }

    #[test]
    fn a_single_binding_of_another_name_serves_resources_without_an_instance() {
        let s = services(&["my-destination"], "default");
        assert_eq!(uri(s.pick(None).unwrap()), "http://127.0.0.1:1000");
        assert!(s.pick(Some("default")).is_err(), "a named instance must exist");
    }

    #[test]
    fn no_destination_binding_is_an_error_at_start() {
        let e = DestinationServices::new(&ferry_client::Bindings::from_vcap_services("{}").unwrap(), "default", None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("needs a destination binding"), "{e}");
    }
}
