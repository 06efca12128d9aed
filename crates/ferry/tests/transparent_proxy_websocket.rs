#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A WebSocket app calling an OnPremise destination through the Transparent Proxy: TP → the
//! Connectivity Proxy's HTTP port → tunnel → connector → a real WebSocket backend, allowed only
//! where the connector's resource allows upgrades (SPEC §4.4, §5.2).

mod common;

use ferry_core::Shutdown;
use ferry_testkit::{WebSocketEcho, eventually};
use ferry_transparent_proxy::{Config, Endpoints};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::{self, Message};

fn bound(name: &str, destination: &str) -> String {
    format!(
        "apiVersion: destination.connectivity.api.sap/v1\nkind: Destination\nmetadata:\n  name: {name}\nspec:\n  \
         destinationRef:\n    name: {destination}\n"
    )
}

#[tokio::test]
async fn websockets_reach_an_on_premise_backend_where_the_connector_allows_upgrades() {
    ferry_core::init_crypto();
    let ws = WebSocketEcho::start().await;
    let port = ws.addr.port();
    let dir = common::test_dir("tproxy-ws");
    let config = format!(
        r#"{listen}
[[destinations]]
properties = {{ Name = "chat", Type = "HTTP", URL = "http://ws.virtual:8000/ws", ProxyType = "OnPremise", Authentication = "BasicAuthentication", User = "ALICE", Password = "s3cret" }}
[[destinations]]
properties = {{ Name = "nochat", Type = "HTTP", URL = "http://ws.virtual:8000/plain", ProxyType = "OnPremise", Authentication = "NoAuthentication" }}

[[connectors]]
[[connectors.mappings]]
virtualHost = "ws.virtual"
virtualPort = 8000
localHost = "127.0.0.1"
localPort = {port}
protocol = "HTTP"
resources = [{{ path = "/ws", websocketUpgradeAllowed = true }}, {{ path = "/plain" }}]
"#,
        listen = common::LISTEN_ANY,
    );
    let (mut ferry, _vcap) = common::ferry_up(&dir, &config);
    let res = dir.join("resources");
    std::fs::create_dir_all(&res).unwrap();
    std::fs::write(res.join("chat.yaml"), bound("chat", "chat")).unwrap();
    std::fs::write(res.join("nochat.yaml"), bound("nochat", "nochat")).unwrap();
    std::fs::write(
        dir.join("tp.toml"),
        format!(
            "resources_dir = {:?}\nenv_file = \"default-env.json\"\nca_file = \"data/ca.pem\"\npoll_interval_ms = 50\n",
            res.display().to_string()
        ),
    )
    .unwrap();
    let (tx, rx) = watch::channel(Endpoints::new());
    let shutdown = Shutdown::new();
    let task = tokio::spawn(ferry_transparent_proxy::run(
        Config::from_file(&dir.join("tp.toml")).unwrap(),
        tx,
        shutdown.clone(),
    ));
    eventually!(
        "both endpoints",
        rx.borrow().contains_key("default/chat") && rx.borrow().contains_key("default/nochat")
    );
    let (chat, nochat) = (rx.borrow()["default/chat"].address, rx.borrow()["default/nochat"].address);

    // A plain WebSocket client against the endpoint: the handshake crosses TP, proxy, tunnel and
    // connector with the destination's credentials; then frames flow both ways.
    let tcp = tokio::net::TcpStream::connect(chat).await.unwrap();
    let (mut client, resp) = tokio_tungstenite::client_async(format!("ws://{chat}/room?id=7"), tcp).await.unwrap();
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().get("x-request-id").is_some());
    client.send(Message::text("over the tunnel")).await.unwrap();
    assert_eq!(client.next().await.unwrap().unwrap(), Message::text("over the tunnel"));
    let big = vec![7u8; 200_000];
    client.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(client.next().await.unwrap().unwrap(), Message::binary(big));
    client.close(None).await.unwrap();
    while client.next().await.is_some() {}
    let (path, headers) = ws.requests().pop().unwrap();
    assert_eq!(path, "/ws/room");
    assert_eq!(headers["authorization"], "Basic QUxJQ0U6czNjcmV0");
    assert_eq!(headers["host"], "ws.virtual:8000");
    assert!(headers.get("proxy-authorization").is_none());

    // The connector's resource does not allow upgrades there: 403, and the backend saw nothing.
    let before = ws.connections();
    let tcp = tokio::net::TcpStream::connect(nochat).await.unwrap();
    match tokio_tungstenite::client_async(format!("ws://{nochat}/room"), tcp).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403);
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned();
            assert!(body.contains("does not allow a protocol upgrade"), "{body}");
        }
        other => panic!("expected a refused handshake, got {other:?}"),
    }
    assert_eq!(ws.connections(), before, "a refused upgrade reached the backend");
    assert_eq!(ws.upgrades(), 1);

    shutdown.cancel();
    task.await.unwrap().unwrap();
    ferry.terminate();
}
