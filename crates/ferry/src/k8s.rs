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

/// Looks destinations up in the Destination Service of the binding the pod has (servicebinding.io
/// mount under `SERVICE_BINDING_ROOT`, or `VCAP_SERVICES`): only the `Type` matters here.
struct DestinationService(ferry_client::Client);

impl Resolver for DestinationService {
    fn protocol<'a>(&'a self, d: &'a Destination) -> BoxFuture<'a, Result<Protocol, String>> {
        Box::pin(async move {
            let level = d.spec.destination_ref.level.map(|l| match l {
                Level::Subaccount | Level::ProviderSubaccount => ferry_client::Level::Subaccount,
                Level::Instance | Level::ProviderInstance => ferry_client::Level::Instance,
            });
            let options = ferry_client::Options { level, skip_token_retrieval: true, ..Default::default() };
            let found =
                self.0.get_destination(&d.spec.destination_ref.name, &options).await.map_err(|e| e.to_string())?;
            Ok(Protocol::of_type(&found.property("Type").unwrap_or_default()))
        })
    }
}

pub async fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    ferry_core::init_crypto();
    let config = ferry_k8s::Config::load(&args.config)?;
    let destinations = ferry_client::Client::from_env().context("the controller needs a destination binding")?;
    // Without one every reconcile would fail and back off forever; say so at start instead.
    destinations.bindings().destination().context("the controller needs a destination binding")?;
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
    ferry_k8s::run(client, config, Arc::new(DestinationService(destinations)), async move {
        crate::up::wait_for_signal().await;
        stop.cancel();
    })
    .await;
    shutdown.cancel();
    let _ = server.await;
    Ok(())
}
