#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The Transparent Proxy's Kubernetes serving mode against a running `ferry up`: resources arrive
//! through a channel (as the API-server watch delivers them), HTTP ones share one listener that
//! routes by `Host`, and a new set swaps the routes in place.

mod common;

use std::net::SocketAddr;

use ferry_core::Shutdown;
use ferry_testkit::{EchoBackend, eventually};
use ferry_transparent_proxy::{Config, Destination, Endpoints};
use serde_json::{Value, json};
use tokio::sync::watch;

fn destination(namespace: &str, name: &str, destination: &str) -> Destination {
    serde_json::from_value(json!({
        "apiVersion": "destination.connectivity.api.sap/v1",
        "kind": "Destination",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "destinationRef": { "name": destination } }
    }))
    .unwrap()
}

/// Asserts an error answer of the proxy: status, SAP's headers, and a message containing `text`.
fn assert_error(r: &reqwest::Response, status: u16, text: &str) {
    let h = r.headers();
    let message = h.get("x-error-message").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    assert_eq!(r.status().as_u16(), status, "{message}");
    assert!(message.contains(text), "x-error-message {message:?} should contain {text:?}");
    assert_eq!(h["x-error-origin"], "Transparent Proxy");
    assert!(h.get("x-request-id").is_some_and(|v| !v.is_empty()));
}

async fn get(http: &reqwest::Client, addr: SocketAddr, host: &str) -> reqwest::Response {
    http.get(format!("http://{addr}/hello")).header("host", host).send().await.unwrap()
}

async fn url_at(http: &reqwest::Client, addr: SocketAddr, host: &str) -> Value {
    let r = get(http, addr, host).await;
    assert_eq!(r.status(), 200, "{host}: {:?}", r.headers().get("x-error-message"));
    r.json::<Value>().await.unwrap()["url"].clone()
}

#[tokio::test]
async fn resources_from_a_channel_are_served_by_host_and_swapped_in_place() {
    ferry_core::init_crypto();
    let echo = EchoBackend::start().await;
    let port = echo.addr.port();
    let dir = common::test_dir("tproxy-k8s");
    let config = format!(
        r#"{listen}
[[destinations]]
properties = {{ Name = "web", Type = "HTTP", URL = "http://127.0.0.1:{port}/base", Authentication = "BasicAuthentication", User = "ALICE", Password = "s3cret" }}
[[destinations]]
properties = {{ Name = "web-other", Type = "HTTP", URL = "http://127.0.0.1:{port}/other", Authentication = "NoAuthentication" }}
[[destinations]]
properties = {{ Name = "raw", Type = "TCP", Address = "tcp.virtual:7000", ProxyType = "OnPremise" }}
"#,
        listen = common::LISTEN_ANY,
    );
    let (mut ferry, _vcap) = common::ferry_up(&dir, &config);
    std::fs::write(
        dir.join("tp.toml"),
        "resources_dir = \"unused\"\nenv_file = \"default-env.json\"\nca_file = \"data/ca.pem\"\npoll_interval_ms = 50\n",
    )
    .unwrap();
    let config = Config::from_file(&dir.join("tp.toml")).unwrap();
    let (source, rx) = watch::channel(Vec::new());
    let (ep_tx, mut endpoints) = watch::channel(Endpoints::new());
    let shutdown = Shutdown::new();
    let task = tokio::spawn(ferry_transparent_proxy::run_with_source(
        config,
        "127.0.0.1:0".parse().unwrap(),
        rx,
        ep_tx,
        shutdown.clone(),
    ));

    source.send_replace(vec![destination("apps", "web", "web")]);
    endpoints.changed().await.unwrap();
    eventually!("apps/web routed", endpoints.borrow().contains_key("apps/web"));
    let addr = endpoints.borrow()["apps/web"].address;
    assert_eq!(endpoints.borrow()["apps/web"].protocol, "http");
    let http = reqwest::Client::new();

    // Every spelling of the Service name reaches the resource, with its destination's credentials.
    let r = get(&http, addr, "web.apps.svc.cluster.local:8080").await;
    assert_eq!(r.status(), 200);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["url"], "/base/hello");
    assert_eq!(e["headers"]["authorization"], "Basic QUxJQ0U6czNjcmV0");
    for host in ["web.apps", "web.apps.svc", "web.apps:80", "WEB.apps.svc.cluster.local.", "web"] {
        assert_eq!(url_at(&http, addr, host).await, "/base/hello", "{host}");
    }
    let r = get(&http, addr, "nope.apps").await;
    assert_error(&r, 404, "No Destination resource serves the host 'nope.apps'");
    let r = get(&http, addr, "127.0.0.1").await;
    assert_error(&r, 404, "not a Destination resource's Service name");

    // A new set: the resource now names another destination, and a namesake appears elsewhere.
    source.send_replace(vec![destination("apps", "web", "web-other"), destination("team", "web", "web")]);
    eventually!("team/web routed", endpoints.borrow().contains_key("team/web"));
    eventually!("apps/web re-pointed", url_at(&http, addr, "web.apps").await == "/other/hello");
    assert_eq!(url_at(&http, addr, "web.team.svc").await, "/base/hello");
    let r = get(&http, addr, "web").await;
    assert_error(&r, 404, "several namespaces");

    // A TCP resource listens on the port its backend Service targets and is no HTTP route.
    source.send_replace(vec![
        destination("apps", "web", "web-other"),
        destination("team", "web", "web"),
        destination("apps", "raw", "raw"),
    ]);
    eventually!("apps/raw served", endpoints.borrow().contains_key("apps/raw"));
    let raw = endpoints.borrow()["apps/raw"].clone();
    assert_eq!(raw.protocol, "tcp");
    assert_eq!(raw.address.port(), ferry_transparent_proxy::cluster::tcp_port("apps", "raw"));
    assert_error(&get(&http, addr, "raw.apps").await, 404, "No Destination resource");

    // Removed from the set: no longer served, the other one still is.
    source.send_replace(vec![destination("team", "web", "web")]);
    eventually!("apps/web gone", !endpoints.borrow().contains_key("apps/web"));
    assert_error(&get(&http, addr, "web.apps").await, 404, "No Destination resource");
    assert_eq!(url_at(&http, addr, "web").await, "/base/hello");

    shutdown.cancel();
    task.await.unwrap().unwrap();
    ferry.terminate();
}

/// The `--kubernetes` wiring end to end: `ferry_k8s::watch_destinations` against kube's mock API
/// service (the test plays the API server: a list, then a watch) feeds `run_with_source`, and a
/// resource that appears is served on the shared listener, to a real backend with its
/// destination's credentials; one that is deleted is not.
#[tokio::test]
async fn a_resource_the_api_server_lists_or_adds_is_served_until_deleted() {
    use http::{Request, Response};
    use kube::client::Body;
    ferry_core::init_crypto();
    let echo = EchoBackend::start().await;
    let port = echo.addr.port();
    let dir = common::test_dir("tproxy-k8s-api");
    let config = format!(
        r#"{listen}
[[destinations]]
properties = {{ Name = "web", Type = "HTTP", URL = "http://127.0.0.1:{port}/base", Authentication = "BasicAuthentication", User = "ALICE", Password = "s3cret" }}
[[destinations]]
properties = {{ Name = "web-other", Type = "HTTP", URL = "http://127.0.0.1:{port}/other", Authentication = "NoAuthentication" }}
"#,
        listen = common::LISTEN_ANY,
    );
    let (mut ferry, _vcap) = common::ferry_up(&dir, &config);
    std::fs::write(
        dir.join("tp.toml"),
        "resources_dir = \"unused\"\nenv_file = \"default-env.json\"\nca_file = \"data/ca.pem\"\npoll_interval_ms = 50\n",
    )
    .unwrap();
    let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (source, rx) = watch::channel(Vec::new());
    let watch_task =
        tokio::spawn(ferry_k8s::watch_destinations(kube::Api::all(kube::Client::new(service, "default")), source));
    let (ep_tx, endpoints) = watch::channel(Endpoints::new());
    let shutdown = Shutdown::new();
    let task = tokio::spawn(ferry_transparent_proxy::run_with_source(
        Config::from_file(&dir.join("tp.toml")).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        rx,
        ep_tx,
        shutdown.clone(),
    ));
    let object = |name: &str, dest: &str, version: &str| {
        json!({"apiVersion": "destination.connectivity.api.sap/v1", "kind": "Destination",
               "metadata": {"name": name, "namespace": "apps", "resourceVersion": version, "uid": format!("uid-{name}")},
               "spec": {"destinationRef": {"name": dest}}})
    };
    let mut answer = async |body: Vec<u8>| {
        let (req, send) = tokio::time::timeout(std::time::Duration::from_secs(10), api.next_request())
            .await
            .expect("the watch asks the API server")
            .expect("the client is alive");
        assert_eq!(req.uri().path(), "/apis/destination.connectivity.api.sap/v1/destinations");
        send.send_response(Response::builder().status(200).body(Body::from(body)).unwrap());
    };

    // The first list: the resource is served by its Service name, with the destination's credentials.
    let list = json!({"apiVersion": "destination.connectivity.api.sap/v1", "kind": "DestinationList",
                      "metadata": {"resourceVersion": "10"}, "items": [object("web", "web", "5")]});
    answer(serde_json::to_vec(&list).unwrap()).await;
    eventually!("apps/web served", endpoints.borrow().contains_key("apps/web"));
    let addr = endpoints.borrow()["apps/web"].address;
    let http = reqwest::Client::new();
    let r = get(&http, addr, "web.apps.svc.cluster.local").await;
    assert_eq!(r.status(), 200, "{:?}", r.headers().get("x-error-message"));
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        (e["url"].as_str(), e["headers"]["authorization"].as_str()),
        (Some("/base/hello"), Some("Basic QUxJQ0U6czNjcmV0"))
    );
    assert_error(&get(&http, addr, "other.apps").await, 404, "No Destination resource serves the host");

    // The watch: one added, then the first deleted.
    let events = [
        json!({"type": "ADDED", "object": object("other", "web-other", "11")}),
        json!({"type": "DELETED", "object": object("web", "web", "12")}),
    ];
    let lines: Vec<u8> =
        events.iter().flat_map(|e| [serde_json::to_vec(e).unwrap(), b"\n".to_vec()].concat()).collect();
    answer(lines).await;
    eventually!("apps/web gone", !endpoints.borrow().contains_key("apps/web"));
    assert!(endpoints.borrow().contains_key("apps/other"));
    assert_eq!(url_at(&http, addr, "other.apps").await, "/other/hello");
    assert_error(&get(&http, addr, "web.apps").await, 404, "No Destination resource serves the host");

    watch_task.abort();
    shutdown.cancel();
    task.await.unwrap().unwrap();
    ferry.terminate();
}

/// Outside a cluster `--kubernetes` says what it needs instead of serving nothing; `--http-listen`
/// alone is refused, as it means nothing in the folder mode.
#[test]
fn the_kubernetes_mode_needs_a_cluster_and_http_listen_needs_it() {
    let dir = common::test_dir("tproxy-k8s-cli");
    let key = r#"{"uri": "http://127.0.0.1:1", "url": "http://127.0.0.1:2", "clientid": "c", "clientsecret": "s"}"#;
    std::fs::write(dir.join("dest.json"), key).unwrap();
    std::fs::write(dir.join("tp.toml"), "resources_dir = \"res\"\ndestination_service_key = \"dest.json\"\n").unwrap();
    let ferry = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["transparent-proxy", "--config"])
            .arg(dir.join("tp.toml"))
            .args(args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env("KUBECONFIG", dir.join("no-kubeconfig"))
            .env("HOME", &dir)
            .output()
            .unwrap()
    };
    let out = ferry(&["--kubernetes", "--http-listen", "127.0.0.1:0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Kubernetes client"), "{err}");
    let out = ferry(&["--http-listen", "127.0.0.1:0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kubernetes"), "{err}");
}
