#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The per-subaccount stream cap of the proxy: with a limit of 2, a subaccount holding two
//! streaming responses gets 429 (HTTP) and reply 01 (SOCKS5) for a third, another subaccount
//! is not affected, and a finished stream frees its slot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_auth::{KeySet, Verifier};
use ferry_connector::{AccessRules, Connector, ConnectorConfig, Protocol};
use ferry_core::Shutdown;
use ferry_core::tls::LocalCa;
use ferry_proxy::{Listeners, Proxy, ProxyConfig};
use ferry_testkit::{SUBACCOUNT, eventually, open_mapping};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that sends response headers and a first chunk, then holds the response open until
/// the client goes away.
async fn streaming_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n").await;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Sends a GET through the proxy and returns the open connection once the first bytes of the
/// answer arrived, with the status code.
async fn open_request(proxy: SocketAddr, token: &str, host: &str) -> (TcpStream, u16) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let req = format!("GET http://{host}/x HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: Bearer {token}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (s, code)
}

async fn socks_reply(proxy: SocketAddr, token: &str) -> u8 {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let mut msg = vec![5, 1, 0x80, 1];
    msg.extend_from_slice(&(token.len() as u32).to_be_bytes());
    msg.extend_from_slice(token.as_bytes());
    msg.push(0);
    msg.extend_from_slice(&[5, 1, 0, 3, 11]);
    msg.extend_from_slice(b"tcp.virtual");
    msg.extend_from_slice(&80u16.to_be_bytes());
    s.write_all(&msg).await.unwrap();
    let mut head = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut head)).await.unwrap().unwrap();
    head[5]
}

#[tokio::test]
async fn one_subaccount_cannot_take_every_stream() {
    ferry_core::init_crypto();
    let ca = LocalCa::generate("limit test CA").unwrap();
    let keys = Arc::new(KeySet::generate().unwrap());
    let server = ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    let tls = ferry_core::tls::server_config(&server, Some(ca.cert_pem()), &[ferry_proto::tunnel::ALPN]).unwrap();
    let mut cfg = ProxyConfig::new(Arc::new(Verifier::local(keys.clone())), tls);
    cfg.max_streams_per_subaccount = 2;
    let proxy = Proxy::new(cfg);
    let (h, so, t) = (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    let (http_addr, socks_addr, tunnel_addr) =
        (h.local_addr().unwrap(), so.local_addr().unwrap(), t.local_addr().unwrap());
    let shutdown = Shutdown::new();
    tokio::spawn(
        proxy.clone().run(
            Listeners { http: Some(h), socks5: Some(so), tunnel: Some(t), socks5_no_auth: None },
            shutdown.clone(),
        ),
    );

    let backend = streaming_backend().await;

    let rules = AccessRules::new(vec![
        open_mapping("erp.virtual", 80, backend, Protocol::Http),
        open_mapping("tcp.virtual", 80, backend, Protocol::Tcp),
    ]);
    let id = ca.issue_connector_cert(SUBACCOUNT, "", time::Duration::days(1)).unwrap();
    let connector = Arc::new(
        Connector::new(ConnectorConfig::new(
            tunnel_addr.to_string(),
            "127.0.0.1".into(),
            ca.cert_pem().into(),
            id,
            rules,
        ))
        .unwrap(),
    );
    tokio::spawn(connector.run(shutdown.clone()));
    let registry = proxy.registry();
    eventually!("connector registered", registry.is_connected(SUBACCOUNT, ""));

    let a = ferry_testkit::token(&keys, SUBACCOUNT, "sb-a", 600);
    let b = ferry_testkit::token(&keys, "0a0b0c0d-0000-4000-8000-00000000000b", "sb-b", 600);
    let (first, s1) = open_request(http_addr, &a, "erp.virtual").await;
    let (_second, s2) = open_request(http_addr, &a, "erp.virtual").await;
    assert_eq!((s1, s2), (200, 200));
    let (_, s3) = open_request(http_addr, &a, "erp.virtual").await;
    assert_eq!(s3, 429, "a third stream of the same subaccount");
    assert_eq!(socks_reply(socks_addr, &a).await, 0x01, "SOCKS5 counts against the same limit");
    // Another subaccount still gets through to the proxy's own answer (it has no connector).
    let (_, sb) = open_request(http_addr, &b, "erp.virtual").await;
    assert_eq!(sb, 503, "subaccount B is not limited by A's streams");
    // A finished stream frees its slot.
    drop(first);
    let mut reopened = 0;
    for _ in 0..200 {
        let (_s, code) = open_request(http_addr, &a, "erp.virtual").await;
        reopened = code;
        if code == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(reopened, 200, "the slot of the closed stream is free again");
    shutdown.cancel();
}
