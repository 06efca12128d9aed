#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Connections per client address on the HTTP and SOCKS5 ports: with a cap of 3, a client that
//! holds 3 open connections gets HTTP 429 (with the reason, then a close) or SOCKS5 reply 02 on
//! the next; another address is not affected; a closed connection frees its slot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ferry_auth::{KeySet, Verifier};
use ferry_core::Shutdown;
use ferry_proto::socks5::{Address, CMD_CONNECT, ConnectRequest, Greeting, METHOD_SAP, SapAuth};
use ferry_proxy::{Listeners, Proxy, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const CAP: usize = 3;

/// A TCP connection from `from` (any 127.0.0.0/8 address is this host's).
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((from, 0))).unwrap();
    let s = s.connect(to).await.unwrap();
    s.set_nodelay(true).unwrap();
    s
}

async fn read_to_end(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.expect("closed").unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// A request without a token: an admitted connection answers 407, a refused one 429.
async fn http_status(from: [u8; 4], proxy: SocketAddr) -> (u16, String) {
    let mut s = connect_from(from, proxy).await;
    s.write_all(b"GET http://erp.virtual/ HTTP/1.1\r\nHost: erp.virtual\r\nConnection: close\r\n\r\n").await.unwrap();
    let text = read_to_end(&mut s).await;
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

/// SOCKS5 with a valid token to an address no connector serves: an admitted connection gets
/// reply 03 (no connector), a refused one 02.
async fn socks_reply(from: [u8; 4], proxy: SocketAddr, token: &str) -> u8 {
    let mut s = connect_from(from, proxy).await;
    let mut out = BytesMut::new();
    Greeting { methods: vec![METHOD_SAP] }.encode(&mut out).unwrap();
    SapAuth { token: token.into(), location_id: None }.encode(&mut out).unwrap();
    ConnectRequest { command: CMD_CONNECT, address: Address::Domain("erp.virtual".into()), port: 80 }
        .encode(&mut out)
        .unwrap();
    s.write_all(&out).await.unwrap();
    let mut head = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head)).await.unwrap().unwrap();
    assert_eq!(&head[..4], &[0x05, METHOD_SAP, 0x01, 0x00], "greeting and authentication pass");
    head[5]
}

#[tokio::test]
async fn one_client_address_cannot_hold_more_than_its_cap() {
    ferry_core::init_crypto();
    let ca = ferry_core::tls::LocalCa::generate("caps CA").unwrap();
    let keys = Arc::new(KeySet::generate().unwrap());
    let server = ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    let tls = ferry_core::tls::server_config(&server, Some(ca.cert_pem()), &[ferry_proto::tunnel::ALPN]).unwrap();
    let mut cfg = ProxyConfig::new(Arc::new(Verifier::local(keys.clone())), tls);
    cfg.max_connections_per_client = CAP;
    // Held connections idle in the handshake; they must outlive the test's steps.
    cfg.handshake_timeout = Duration::from_secs(120);
    let (h, s) = (ferry_testkit::listener().await, ferry_testkit::listener().await);
    let (http, socks) = (h.local_addr().unwrap(), s.local_addr().unwrap());
    let shutdown = Shutdown::new();
    tokio::spawn(
        Proxy::new(cfg)
            .run(Listeners { http: Some(h), socks5: Some(s), tunnel: None, socks5_no_auth: None }, shutdown.clone()),
    );
    let token = ferry_testkit::token(&keys, "sub-caps", "client-caps", 600);

    for (name, port) in [("HTTP", http), ("SOCKS5", socks)] {
        // Below the cap: answered normally.
        match name {
            "HTTP" => assert_eq!(http_status([127, 0, 0, 1], port).await.0, 407),
            _ => assert_eq!(socks_reply([127, 0, 0, 1], port, &token).await, 0x03),
        }
        // 127.0.0.1 holds the cap in idle connections...
        let mut held = Vec::new();
        for _ in 0..CAP {
            held.push(connect_from([127, 0, 0, 1], port).await);
        }
        // ...so its next connection is refused in the port's protocol,
        match name {
            "HTTP" => {
                let (status, text) = http_status([127, 0, 0, 1], port).await;
                assert_eq!(status, 429, "{text}");
                assert!(text.contains(&format!("at most {CAP} may be open at once")), "{text}");
            }
            _ => assert_eq!(socks_reply([127, 0, 0, 1], port, &token).await, 0x02),
        }
        // ...while another client address is served,
        match name {
            "HTTP" => assert_eq!(http_status([127, 0, 0, 2], port).await.0, 407),
            _ => assert_eq!(socks_reply([127, 0, 0, 2], port, &token).await, 0x03),
        }
        // ...and a closed connection gives its slot back.
        drop(held.pop());
        let mut admitted = false;
        for _ in 0..200 {
            let ok = match name {
                "HTTP" => http_status([127, 0, 0, 1], port).await.0 == 407,
                _ => socks_reply([127, 0, 0, 1], port, &token).await == 0x03,
            };
            if ok {
                admitted = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(admitted, "{name}: a freed slot was not given back");
    }
    shutdown.cancel();
}
