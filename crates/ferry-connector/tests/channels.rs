#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Service channels (on-premise → cloud) through the admin REST API over real HTTPS: an
//! on-premise client on the channel's local port reaches a real TCP echo server registered with a
//! real proxy for the subaccount, through the connector's channel connection.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferry_connector::admin::{Admin, AdminConfig};
use ferry_core::Shutdown;
use ferry_proxy::ChannelTarget;
use ferry_testkit::{SUBACCOUNT, TunnelPair, eventually};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PASSWORD: &str = "correct horse battery";
const CONF: &str = "/api/v1/configuration";
const OTHER_SUBACCOUNT: &str = "0a0b0c0d-0000-4000-8000-000000000002";

/// A TCP echo that answers only after the client's end of stream: everything it read, then its
/// own end of stream. A client that gets its bytes back proved that its half-close crossed.
struct HalfCloseEcho {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl HalfCloseEcho {
    async fn start() -> Self {
        let l = ferry_testkit::listener().await;
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                s.set_nodelay(true).unwrap();
                n.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut all = Vec::new();
                    if s.read_to_end(&mut all).await.is_ok() {
                        let _ = s.write_all(&all).await;
                        let _ = s.shutdown().await;
                    }
                });
            }
        });
        Self { addr, accepted }
    }
}

struct Api {
    base: String,
    client: reqwest::Client,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

impl Api {
    async fn start(dir: &Path) -> Self {
        let mut cfg = AdminConfig::new(dir.to_owned());
        cfg.connection.backoff_initial = Duration::from_millis(20);
        cfg.connection.backoff_max = Duration::from_millis(200);
        cfg.connection.channel_host = "127.0.0.1".into();
        let shutdown = Shutdown::new();
        let admin = Admin::start(cfg, shutdown.clone()).await.unwrap();
        let listener = ferry_testkit::listener().await;
        let base = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let task = tokio::spawn(admin.clone().serve(listener, shutdown.clone()));
        let client = ferry_core::tls::http_client(Some(admin.ui_ca_pem())).unwrap();
        Self { base, client, shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut r =
            self.client.request(method, format!("{}{path}", self.base)).basic_auth("Administrator", Some(PASSWORD));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

/// A port nothing listens on right now (the system's pick, released).
async fn free_port() -> u16 {
    ferry_testkit::listener().await.local_addr().unwrap().port()
}

/// Sends `data`, half-closes, and returns everything that comes back until end of stream.
async fn round_trip(port: u16, data: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (mut r, mut w) = s.split();
    let (sent, got) = tokio::join!(
        async {
            // A refused connection may be gone before all is written.
            let _ = w.write_all(data).await;
            let _ = w.shutdown().await;
        },
        async {
            let mut back = Vec::new();
            // A refused channel closes the connection; a reset counts as nothing back.
            let _ = r.read_to_end(&mut back).await;
            back
        }
    );
    let () = sent;
    got
}

#[tokio::test]
async fn channels_carry_bytes_to_their_subaccounts_services_only_and_follow_the_api() {
    ferry_core::init_crypto();
    let echo = HalfCloseEcho::start().await;
    let foreign = HalfCloseEcho::start().await;
    let targets = ferry_proxy::ChannelTargets::new([
        ChannelTarget { subaccount: SUBACCOUNT.into(), id: "echo".into(), target: echo.addr.to_string() },
        ChannelTarget {
            subaccount: OTHER_SUBACCOUNT.into(),
            id: "other-echo".into(),
            target: foreign.addr.to_string(),
        },
    ])
    .unwrap();
    let pair = TunnelPair::start_with(|c| c.channel_targets = targets).await;
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(dir.path()).await;
    let resp = api
        .client
        .put(format!("{}{CONF}/connector/authentication/basic", api.base))
        .basic_auth("Administrator", Some("manage"))
        .json(&json!({"oldPassword": "manage", "newPassword": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let id = pair.ca.issue_connector_cert(SUBACCOUNT, "", time::Duration::days(1)).unwrap();
    let data = json!({"subaccount": SUBACCOUNT, "location_id": "", "certificate": id.cert_pem,
                      "key": id.key_pem.expose(), "ca": pair.ca.cert_pem(), "tunnel": pair.tunnel_addr.to_string()});
    let (s, b) =
        api.call(Method::POST, &format!("{CONF}/subaccounts"), Some(json!({"authenticationData": data}))).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    pair.wait_connected("").await;
    let sub = format!("{CONF}/subaccounts/{}/{SUBACCOUNT}", pair.tunnel_addr);
    let k8s = format!("{sub}/channels/K8S");

    // Bad input is a 400 that says what to fix; unknown types are named as such.
    let (s, b) = api.call(Method::POST, &k8s, Some(json!({"k8sService": "a b", "port": 1}))).await;
    assert_eq!((s, b["type"].as_str()), (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST")), "{b}");
    let (s, b) = api.call(Method::POST, &format!("{sub}/channels/HANA"), Some(json!({"k8sService": "x"}))).await;
    assert!(s == StatusCode::BAD_REQUEST && b["message"].as_str().unwrap().contains("K8S"), "{b}");

    // A channel to the subaccount's own service: bytes there and back, half-close included.
    let port = free_port().await;
    let (s, ch) = api
        .call(Method::POST, &k8s, Some(json!({"k8sService": "echo", "port": port, "connections": 1, "comment": "c"})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{ch}");
    assert_eq!((ch["id"].as_u64(), ch["type"].as_str(), ch["enabled"].as_bool()), (Some(1), Some("K8S"), Some(true)));
    assert_eq!(ch["state"]["opened"], true, "{ch}");
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(round_trip(port, &payload).await, payload);
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);

    // `connections` is enforced: with the one connection busy, another is closed at once.
    let mut busy = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    busy.write_all(b"held").await.unwrap();
    let one = format!("{k8s}/1");
    eventually!(
        "the busy connection is counted",
        api.call(Method::GET, &one, None).await.1["state"]["openedConnections"] == 1
    );
    assert_eq!(round_trip(port, b"refused").await, b"");
    busy.shutdown().await.unwrap();
    let mut back = Vec::new();
    busy.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"held");

    // A service registered for another subaccount is refused by the proxy: nothing reaches it.
    let port2 = free_port().await;
    let (s, b) = api.call(Method::POST, &k8s, Some(json!({"k8sService": "other-echo", "port": port2}))).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(round_trip(port2, b"let me in").await, b"");
    assert_eq!(foreign.accepted.load(Ordering::SeqCst), 0, "another subaccount's service was reached");
    // Two channels cannot share a port.
    let (s, b) = api.call(Method::POST, &k8s, Some(json!({"k8sService": "echo", "port": port}))).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");

    // Disabling closes the port; enabling opens it again.
    let (s, b) = api.call(Method::PUT, &format!("{one}/state"), Some(json!({"enabled": false}))).await;
    assert_eq!((s, &b["state"]["opened"]), (StatusCode::OK, &json!(false)), "{b}");
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err(), "a disabled channel still listens");
    let (s, _) = api.call(Method::PUT, &format!("{one}/state"), Some(json!({"enabled": true}))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(round_trip(port, b"again").await, b"again");
    // A port taken by someone else is a 409 and nothing is stored.
    let taken = ferry_testkit::listener().await;
    let taken_port = taken.local_addr().unwrap().port();
    let (s, b) = api.call(Method::PUT, &one, Some(json!({"port": taken_port}))).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert_eq!(api.call(Method::GET, &one, None).await.1["port"], port);
    drop(taken);

    // The configuration persists: after a restart the channel is open again.
    api.stop().await;
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err(), "the stopped connector still listens");
    let api = Api::start(dir.path()).await;
    let (_, list) = api.call(Method::GET, &format!("{sub}/channels"), None).await;
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    eventually!("the channel reopens with the connection", {
        api.call(Method::GET, &one, None).await.1["state"]["opened"] == true
    });
    assert_eq!(round_trip(port, b"after restart").await, b"after restart");
    let (_, mon) = api.call(Method::GET, "/api/monitoring/connections/serviceChannels", None).await;
    let mon = mon["serviceChannels"].as_array().unwrap().clone();
    assert_eq!(mon.len(), 2, "{mon:?}");
    assert!(mon.iter().all(|c| c["subaccount"] == SUBACCOUNT && c["state"]["opened"] == true), "{mon:?}");

    // Deleting closes it for good; every change is in the chained configuration audit log.
    let (s, _) = api.call(Method::DELETE, &one, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
    assert_eq!(api.call(Method::GET, &one, None).await.0, StatusCode::NOT_FOUND);
    api.stop().await;
    let folder = dir.path().join("audit").join("_configuration");
    let files = ferry_connector::audit::log_files(&folder);
    ferry_connector::audit::verify_set(&files).unwrap();
    let text: String = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
    for action in ["created", "disabled", "enabled", "deleted"] {
        assert!(
            text.lines().any(|l| l.contains("ServiceChannelConfiguration") && l.contains(&format!("\"{action}\""))),
            "no {action} line: {text}"
        );
    }
}
