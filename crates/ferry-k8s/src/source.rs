//! The proxy pods' view of the cluster: every `Destination` resource, watched through the API
//! server and handed to `ferry_transparent_proxy::run_with_source` as one list per change.

use std::collections::BTreeMap;

use ferry_transparent_proxy::resource::Destination;
use futures_util::StreamExt;
use kube::api::{Api, ObjectMeta};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tokio::sync::watch;

/// Keeps `tx` holding every resource `api` lists, until the watch ends (it retries with back-off,
/// so in practice until the task is dropped). The first list is sent once the initial listing is
/// complete; afterwards a list is sent only when a resource's name, namespace or spec changed, so
/// status writes by the controller do not make the proxy look destinations up again.
pub async fn watch_destinations(api: Api<Destination>, tx: watch::Sender<Vec<Destination>>) {
    let mut known: BTreeMap<(String, String), Destination> = BTreeMap::new();
    let mut relisting: Option<BTreeMap<(String, String), Destination>> = None;
    let mut synced = false;
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures_util::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("watching Destination resources: {e}; retrying");
                continue;
            }
        };
        match event {
            watcher::Event::Init => relisting = Some(BTreeMap::new()),
            watcher::Event::InitApply(d) => {
                if let Some(list) = &mut relisting {
                    list.insert(key(&d), served(&d));
                }
            }
            watcher::Event::InitDone => {
                if let Some(list) = relisting.take() {
                    known = list;
                }
            }
            watcher::Event::Apply(d) => {
                known.insert(key(&d), served(&d));
            }
            watcher::Event::Delete(d) => {
                known.remove(&key(&d));
            }
        }
        if relisting.is_some() {
            continue;
        }
        let list: Vec<Destination> = known.values().cloned().collect();
        if !synced {
            synced = true;
            tracing::info!(resources = list.len(), "Destination resources listed");
            tx.send_replace(list);
        } else {
            tx.send_if_modified(|current| {
                if *current == list {
                    return false;
                }
                *current = list;
                true
            });
        }
    }
}

fn key(d: &Destination) -> (String, String) {
    (d.namespace().unwrap_or_default(), d.name_any())
}

/// What the proxy serves from: name, namespace and spec; status and bookkeeping metadata dropped.
fn served(d: &Destination) -> Destination {
    let mut out = Destination::new(&d.name_any(), d.spec.clone());
    *out.meta_mut() = ObjectMeta { name: Some(d.name_any()), namespace: d.namespace(), ..Default::default() };
    out
}
