#![allow(clippy::unwrap_used, clippy::expect_used)]
//! WebSocket through the HTTP proxy port (SPEC §4.4): an app's upgrade request crosses the tunnel,
//! the connector lets it through only where a resource allows upgrades ("Upgrade Allowed"), and
//! after the backend's 101 the raw frames flow both ways; everything lands in the audit log.

use std::net::SocketAddr;

use ferry_connector::{AccessRules, HostInHeader, Protocol, Resource, SystemMapping};
use ferry_testkit::{SUBACCOUNT, TunnelPair, WebSocketEcho, eventually};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
use tokio_tungstenite::tungstenite::protocol::Role;

fn mapping(backend: SocketAddr) -> SystemMapping {
    let resource = |path: &str, upgrade: bool| Resource {
        path: path.into(),
        exact_match_only: false,
        enabled: true,
        websocket_upgrade_allowed: upgrade,
        description: None,
    };
    SystemMapping {
        virtual_host: "ws.virtual".into(),
        virtual_port: 8080,
        local_host: backend.ip().to_string(),
        local_port: backend.port(),
        protocol: Protocol::Http,
        host_in_header: HostInHeader::Virtual,
        authentication_mode: Default::default(),
        principal_certificate_in: Default::default(),
        resources: vec![resource("/ws", true), resource("/refuse", true), resource("/plain", false)],
        description: None,
    }
}

/// Reads one response head, byte by byte so that no frame after it is consumed.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = s.read_u8().await.unwrap();
        head.push(b);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

/// Sends a WebSocket handshake in absolute form to the HTTP proxy, as a client configured with
/// the proxy does; returns the connection and the response head (lower-cased).
async fn upgrade(proxy: SocketAddr, token: &str, path: &str, key: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.set_nodelay(true).unwrap();
    let req = format!(
        "GET http://ws.virtual:8080{path} HTTP/1.1\r\nHost: ws.virtual:8080\r\nProxy-Authorization: Bearer {token}\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    (s, head)
}

/// The body of a refused upgrade (the proxy's answers carry `Content-Length`).
async fn body(s: &mut TcpStream, head: &str) -> String {
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    let mut buf = vec![0; len];
    s.read_exact(&mut buf).await.unwrap();
    String::from_utf8(buf).unwrap()
}

#[tokio::test]
async fn upgrades_cross_the_tunnel_only_where_a_resource_allows_them() {
    let ws = WebSocketEcho::start().await;
    let pair = TunnelPair::start().await;
    let mut cfg = pair.connector_config("", AccessRules::new(vec![mapping(ws.addr)]), pair.tunnel_addr);
    let audit_dir = tempfile::tempdir().unwrap();
    cfg.audit = ferry_connector::audit::AuditConfig {
        level: ferry_connector::audit::AuditLevel::All,
        dir: Some(audit_dir.path().to_owned()),
        ..Default::default()
    };
    pair.spawn_connector(cfg);
    pair.wait_connected("").await;
    let token = pair.token();

    // Allowed: 101 with the backend's accept key, then messages both ways, large ones too.
    let key = generate_key();
    let (s, head) = upgrade(pair.http_addr, &token, "/ws/chat?room=1", &key).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(head.contains(
        &format!("\r\nsec-websocket-accept: {}\r\n", derive_accept_key(key.as_bytes())).to_ascii_lowercase()
    ));
    let mut client = WebSocketStream::from_raw_socket(s, Role::Client, None).await;
    client.send(Message::text("hello")).await.unwrap();
    assert_eq!(client.next().await.unwrap().unwrap(), Message::text("hello"));
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    client.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(client.next().await.unwrap().unwrap(), Message::binary(big.clone()));
    client.close(None).await.unwrap();
    while client.next().await.is_some() {}
    drop(client);
    assert_eq!(ws.upgrades(), 1);
    let (path, headers) = ws.requests().pop().unwrap();
    assert_eq!(path, "/ws/chat");
    assert_eq!(headers["host"], "ws.virtual:8080");
    for h in headers.keys() {
        let h = h.as_str();
        assert!(
            !h.starts_with("proxy-") && !h.starts_with("sap-connectivity-") && !h.starts_with("ferry-"),
            "{h} reached the backend"
        );
    }

    // Denied: a resource grants the path but not the upgrade, or no resource grants it; the
    // backend never sees a connection.
    let before = ws.connections();
    let (mut s, head) = upgrade(pair.http_addr, &token, "/plain/socket", &generate_key()).await;
    assert!(head.starts_with("http/1.1 403"), "{head}");
    let text = body(&mut s, &head).await;
    assert!(text.contains("does not allow a protocol upgrade"), "{text}");
    let (mut s, head) = upgrade(pair.http_addr, &token, "/other", &generate_key()).await;
    assert!(head.starts_with("http/1.1 403"), "{head}");
    assert!(body(&mut s, &head).await.contains("Access denied to resource /other"));
    assert_eq!(ws.connections(), before, "a refused upgrade reached the backend");

    // A backend that declines the switch answers as for any request.
    let (mut s, head) = upgrade(pair.http_addr, &token, "/refuse/it", &generate_key()).await;
    assert!(head.starts_with("http/1.1 404"), "{head}");
    drop(s.shutdown().await);
    assert_eq!(ws.upgrades(), 1);

    // Audit: the allowed exchange with the bytes of both directions (written when both ended),
    // the denials with their reasons; the chain holds.
    let file = audit_dir.path().join(SUBACCOUNT).join(ferry_connector::audit::ACTIVE_FILE);
    eventually!("four records in the audit log", ferry_connector::audit::verify_file(&file) == Ok(4));
    let records: Vec<Value> =
        std::fs::read_to_string(&file).unwrap().lines().skip(1).map(|l| serde_json::from_str(l).unwrap()).collect();
    let find = |path: &str| records.iter().find(|r| r["path"] == path).unwrap_or_else(|| panic!("{path}: {records:?}"));
    let allowed = find("/ws/chat");
    assert_eq!((allowed["event"].as_str(), allowed["protocol"].as_str()), (Some("Access Allowed"), Some("WebSocket")));
    for dir in ["bytesIn", "bytesOut"] {
        let n: usize = allowed[dir].as_str().unwrap().parse().unwrap();
        assert!(n > big.len(), "{dir} {n}: {allowed}");
    }
    let denied = find("/plain/socket");
    assert_eq!(denied["event"], "Access Denied");
    assert_eq!(denied["reason"], "UpgradeNotAllowed");
    assert_eq!(find("/other")["reason"], "Resource");
    assert_eq!(find("/refuse/it")["reason"], "UpgradeDeclined 404");
}

/// Opens a WebSocket to the echo backend through the proxy and checks one round trip.
async fn open_socket(proxy: SocketAddr, token: &str) -> WebSocketStream<TcpStream> {
    let (s, head) = upgrade(proxy, token, "/ws/drain", &generate_key()).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let mut ws = WebSocketStream::from_raw_socket(s, Role::Client, None).await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
    ws
}

/// Whether the proxy ended `ws` (closed, reset or EOF) within a bound far above the drain's
/// idle tick and far below its deadline.
async fn ended(ws: &mut WebSocketStream<TcpStream>) -> bool {
    let end = async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), end).await.is_ok()
}

/// At the proxy's shutdown an upgraded connection is drained like a SOCKS5 stream: one that
/// moves bytes keeps working while the tunnels stay up, and one that is idle (or goes idle) is
/// closed at once rather than holding the shutdown until the drain deadline (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_busy_upgraded_connections_and_closes_idle_ones() {
    let ws = WebSocketEcho::start().await;
    let pair = TunnelPair::start_with(|c| c.drain_timeout = std::time::Duration::from_secs(60)).await;
    // The connector runs on: only the proxy shuts down.
    let cfg = pair.connector_config("", AccessRules::new(vec![mapping(ws.addr)]), pair.tunnel_addr);
    let connector = std::sync::Arc::new(ferry_connector::Connector::new(cfg).unwrap());
    let connector_shutdown = ferry_core::Shutdown::new();
    tokio::spawn(connector.run(connector_shutdown.clone()));
    pair.wait_connected("").await;
    let token = pair.token();
    let mut busy = open_socket(pair.http_addr, &token).await;
    let mut idle = open_socket(pair.http_addr, &token).await;

    pair.shutdown.cancel();
    // Several idle ticks' worth of traffic after the shutdown began: the busy one still echoes.
    for i in 0..15 {
        busy.send(Message::text(format!("m{i}"))).await.unwrap();
        assert_eq!(busy.next().await.unwrap().unwrap(), Message::text(format!("m{i}")), "message {i}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ended(&mut idle).await, "the idle upgraded connection was not closed at the shutdown");
    // Once it stops sending, the busy one is idle too.
    assert!(ended(&mut busy).await, "the drained upgraded connection was not closed once idle");
    connector_shutdown.cancel();
}
