//! `ferry transparent-proxy --config <toml>`: the Transparent Proxy outside Kubernetes, serving
//! the `Destination` resources of a folder of YAML files (watched for changes). Prints one
//! `endpoint <namespace>/<name> <protocol> <address> <destination>` line per endpoint at start and
//! again whenever the list changes.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use ferry_core::Shutdown;
use ferry_transparent_proxy::{Config, Endpoints};
use tokio::sync::watch;

/// `kubernetes`: the shared HTTP listener of the Kubernetes mode (`--kubernetes`).
pub async fn run(config: &Path, kubernetes: Option<SocketAddr>) -> anyhow::Result<()> {
    let config = Config::from_file(config).with_context(|| format!("transparent proxy config {}", config.display()))?;
    let (tx, mut rx) = watch::channel(Endpoints::new());
    let shutdown = Shutdown::new();
    let mut task = match kubernetes {
        None => {
            println!("resources: {}", config.resources_dir.display());
            tokio::spawn(ferry_transparent_proxy::run(config, tx, shutdown.clone()))
        }
        Some(http_listen) => {
            let client = kube::Client::try_default()
                .await
                .context("cannot configure the Kubernetes client (in-cluster service account or KUBECONFIG)")?;
            println!("resources: Destination resources of the cluster");
            let (source, resources) = watch::channel(Vec::new());
            // Ends with the process; the proxy keeps its last set if the watch ever stops.
            tokio::spawn(ferry_k8s::watch_destinations(kube::Api::all(client), source));
            tokio::spawn(ferry_transparent_proxy::run_with_source(config, http_listen, resources, tx, shutdown.clone()))
        }
    };
    // The first list arrives after the first scan; `ready` means every resource present at start is served.
    tokio::select! {
        r = rx.changed() => if r.is_err() { return finish(task.await) },
        r = &mut task => return finish(r),
    }
    print_endpoints(&rx.borrow_and_update());
    println!("ready");
    let signal = crate::up::wait_for_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() { break }
                print_endpoints(&rx.borrow_and_update());
            }
            _ = &mut signal => break,
        }
    }
    shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(20), task).await {
        Ok(r) => finish(r),
        Err(_) => Ok(()),
    }
}

fn finish(r: Result<Result<(), ferry_transparent_proxy::TpError>, tokio::task::JoinError>) -> anyhow::Result<()> {
    Ok(r.context("transparent proxy task")??)
}

fn print_endpoints(list: &Endpoints) {
    println!("endpoints: {}", list.len());
    for e in list.values() {
        match &e.error {
            None => println!("endpoint {} {} {} {}", e.resource, e.protocol, e.address, e.destination),
            Some(err) => {
                println!("endpoint {} {} {} {} error: {err}", e.resource, e.protocol, e.address, e.destination)
            }
        }
    }
}

/// `ferry check-config transparent-proxy`: parses and checks `config` as `ferry transparent-proxy`
/// would, without reading the bindings it names.
pub fn check(config: &Path) -> anyhow::Result<()> {
    ferry_transparent_proxy::config::FileConfig::load(config)?;
    Ok(())
}
