#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `serve_router` with a per-client cap (the connector admin port's path): over HTTPS, a client
//! address that holds the cap gets a 429 naming the limit on its next connection, after a full
//! TLS handshake; another address is served; a closed connection frees its slot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::Shutdown;
use ferry_core::serve::{AcceptOptions, serve_router};
use ferry_core::tls::{self, LocalCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const CAP: usize = 2;

async fn tcp_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((from, 0))).unwrap();
    s.connect(to).await.unwrap()
}

/// One HTTPS request from `from`; returns the status and the whole answer.
async fn get(from: [u8; 4], to: SocketAddr, client: Arc<rustls::ClientConfig>) -> (u16, String) {
    let tcp = tcp_from(from, to).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(client).connect(name, tcp).await.unwrap();
    s.write_all(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    // The refused connection closes after its answer; an admitted one stays open (keep-alive),
    // so read until the body is in.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&out);
            if text.ends_with("hello") || text.ends_with("retry.\n") {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&out).into_owned();
    (text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), text)
}

#[tokio::test]
async fn a_client_over_its_cap_gets_429_over_tls() {
    ferry_core::init_crypto();
    let ca = LocalCa::generate("cap CA").unwrap();
    let server = tls::server_config(&ca.issue_server_cert(&["localhost"]).unwrap(), None, &[b"http/1.1"]).unwrap();
    let client = tls::client_config(ca.cert_pem(), None, &[b"http/1.1"]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().route("/hello", axum::routing::get(|| async { "hello" }));
    let opts = AcceptOptions { max_per_client: CAP, ..AcceptOptions::named("cap-test") };
    let shutdown = Shutdown::new();
    tokio::spawn(serve_router(listener, router, Some(server), opts, shutdown.clone()));

    assert_eq!(get([127, 0, 0, 1], addr, client.clone()).await.0, 200);
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(tcp_from([127, 0, 0, 1], addr).await);
    }
    let (status, text) = get([127, 0, 0, 1], addr, client.clone()).await;
    assert_eq!(status, 429, "{text}");
    assert!(text.contains(&format!("at most {CAP} may be open at once")), "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
    assert_eq!(get([127, 0, 0, 2], addr, client.clone()).await.0, 200, "another address is not capped");

    drop(held.pop());
    let mut status = 0;
    for _ in 0..200 {
        status = get([127, 0, 0, 1], addr, client.clone()).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status, 200, "a freed slot was not given back");
    shutdown.cancel();
}
