#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The proxy pods' watch of `Destination` resources against kube's mock API service: the test
//! plays the API server (list, then a watch stream) and checks the lists handed to the proxy.

use std::time::Duration;

use ferry_transparent_proxy::resource::Destination;
use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::watch;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn resource(ns: &str, name: &str, dest: &str, version: &str) -> Value {
    json!({
        "apiVersion": "destination.connectivity.api.sap/v1",
        "kind": "Destination",
        "metadata": { "name": name, "namespace": ns, "resourceVersion": version, "uid": format!("uid-{ns}-{name}") },
        "spec": { "destinationRef": { "name": dest } }
    })
}

/// Takes the next request, checks it is a list or watch of every namespace's resources, and
/// answers with `body`; returns the query.
async fn answer(handle: &mut Handle, body: Vec<u8>) -> String {
    let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("the watcher sends a request")
        .expect("the service is alive");
    assert_eq!(req.method(), "GET");
    assert_eq!(req.uri().path(), "/apis/destination.connectivity.api.sap/v1/destinations");
    let query = req.uri().query().unwrap_or_default().to_owned();
    send.send_response(Response::builder().status(StatusCode::OK).body(Body::from(body)).unwrap());
    query
}

async fn next(rx: &mut watch::Receiver<Vec<Destination>>) -> Vec<(String, String, String)> {
    tokio::time::timeout(Duration::from_secs(10), rx.changed()).await.expect("a new list").unwrap();
    rx.borrow_and_update()
        .iter()
        .map(|d| {
            (
                d.metadata.namespace.clone().unwrap(),
                d.metadata.name.clone().unwrap(),
                d.spec.destination_ref.name.clone(),
            )
        })
        .collect()
}

fn lines(events: &[Value]) -> Vec<u8> {
    events.iter().flat_map(|e| [serde_json::to_vec(e).unwrap(), b"\n".to_vec()].concat()).collect()
}

fn triple(ns: &str, name: &str, dest: &str) -> (String, String, String) {
    (ns.into(), name.into(), dest.into())
}

#[tokio::test]
async fn the_proxy_gets_the_listed_resources_then_every_change() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (tx, mut rx) = watch::channel(Vec::new());
    let task = tokio::spawn(ferry_k8s::watch_destinations(Api::all(client), tx));

    let list = json!({
        "apiVersion": "destination.connectivity.api.sap/v1", "kind": "DestinationList",
        "metadata": { "resourceVersion": "10" },
        "items": [resource("apps", "erp", "erp-system", "5"), resource("team", "ldap", "ldap-dest", "6")]
    });
    let query = answer(&mut handle, serde_json::to_vec(&list).unwrap()).await;
    assert!(!query.contains("watch=true"), "first a list: {query}");
    assert_eq!(next(&mut rx).await, vec![triple("apps", "erp", "erp-system"), triple("team", "ldap", "ldap-dest")]);
    // Status and bookkeeping are not handed on: the proxy compares resources to see changes.
    assert!(rx.borrow().iter().all(|d| d.status.is_none() && d.metadata.resource_version.is_none()));

    // The watch: an edit, an addition and a deletion.
    let events = [
        json!({ "type": "MODIFIED", "object": resource("apps", "erp", "erp-v2", "12") }),
        json!({ "type": "ADDED", "object": resource("apps", "crm", "crm-system", "13") }),
        json!({ "type": "DELETED", "object": resource("team", "ldap", "ldap-dest", "14") }),
    ];
    let query = answer(&mut handle, lines(&events)).await;
    assert!(query.contains("watch=true") && query.contains("resourceVersion=10"), "{query}");
    let want = vec![triple("apps", "crm", "crm-system"), triple("apps", "erp", "erp-v2")];
    let mut seen = next(&mut rx).await;
    while seen != want {
        seen = next(&mut rx).await;
    }

    // A status write by the controller changes nothing the proxy serves: no new list. The
    // watcher asks again only after handing on that event, so the next request proves it was seen.
    let mut status_only = resource("apps", "erp", "erp-v2", "15");
    status_only["status"] = json!({ "conditions": [{ "type": "Available", "status": "True" }] });
    answer(&mut handle, lines(&[json!({ "type": "MODIFIED", "object": status_only })])).await;
    answer(&mut handle, Vec::new()).await;
    assert!(!rx.has_changed().unwrap(), "a status write must not produce a list");
    task.abort();
}
