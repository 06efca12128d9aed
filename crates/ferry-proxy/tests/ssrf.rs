#![allow(clippy::unwrap_used, clippy::expect_used)]
//! SSRF through the proxy and the real connector: the connector may only ever dial the
//! internal hosts of its mappings. A "secret" service listens on 127.0.0.1 (unmapped), and
//! every row names it some other way — IP spellings (decimal, octal, hex, short forms,
//! `0.0.0.0`, IPv6 loopback and IPv4-mapped forms), `localhost`, a mapped name on the secret's
//! port, trailing dots, userinfo tricks — over the HTTP proxy (absolute form and CONNECT) and
//! SOCKS5 (IPv4, IPv6 and domain address types). The secret must see no connection at all,
//! and the mapped backends only the controls.
//!
//! Name resolution: mappings are matched on the virtual host as written (IP literals by
//! address), and the connector dials only the mapping's configured `localHost`; a name the app
//! sends is never resolved, which the `localhost`/`127.0.0.1` rows check (both resolve to the
//! secret, neither may reach it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use ferry_connector::{AccessRules, Protocol};
use ferry_proto::socks5::{Address, CMD_CONNECT, ConnectRequest, Greeting, METHOD_SAP, SapAuth};
use ferry_testkit::{EchoBackend, TunnelPair, open_mapping};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A listener that counts the connections it accepts and closes them.
async fn counting_listener() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let count = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = s.write_all(b"hello from a backend\n").await;
            });
        }
    });
    (addr, hits)
}

/// Sends `raw` to the HTTP proxy and returns the status line of the answer.
async fn http_raw(addr: SocketAddr, raw: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).lines().next().unwrap_or("").to_owned()
}

/// SOCKS5 with SAP's method 0x80 and a CONNECT to `address:port`; returns the reply code
/// (0 = succeeded) or `None` when the proxy closed before replying.
async fn socks_raw(addr: SocketAddr, token: &str, address: Address, port: u16) -> Option<u8> {
    let mut connect = BytesMut::new();
    ConnectRequest { command: CMD_CONNECT, address, port }.encode(&mut connect).unwrap();
    socks_bytes(addr, token, &connect).await
}

/// [`socks_raw`] with the CONNECT request as raw bytes (for what the encoder refuses).
async fn socks_bytes(addr: SocketAddr, token: &str, connect: &[u8]) -> Option<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut out = BytesMut::new();
    Greeting { methods: vec![METHOD_SAP] }.encode(&mut out).unwrap();
    SapAuth { token: token.into(), location_id: None }.encode(&mut out).unwrap();
    out.extend_from_slice(connect);
    s.write_all(&out).await.unwrap();
    let mut head = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head)).await.ok()?.ok()?;
    assert_eq!(&head[..4], &[0x05, METHOD_SAP, 0x01, 0x00], "greeting and auth");
    Some(head[5])
}

#[tokio::test]
async fn the_connector_dials_only_mapped_internal_hosts() {
    let (secret, secret_hits) = counting_listener().await;
    let (tcp_backend, tcp_hits) = counting_listener().await;
    let echo = EchoBackend::start().await;
    let pair = TunnelPair::start().await;
    let rules = AccessRules::new(vec![
        open_mapping("erp.virtual", 8080, echo.addr, Protocol::Http),
        open_mapping("tcp.virtual", 7000, tcp_backend, Protocol::Tcp),
        // A mapped name that also resolves (to the secret's address): only its own port counts.
        open_mapping("localhost", 7001, tcp_backend, Protocol::Tcp),
    ]);
    pair.connector("", rules, pair.tunnel_addr);
    pair.wait_connected("").await;
    let token = pair.token();
    let auth = format!("Proxy-Authorization: Bearer {token}\r\n");
    let s = secret.port();

    let hosts = [
        "127.0.0.1".to_owned(),
        "localhost".into(),
        "LOCALHOST".into(),
        "2130706433".into(),
        "0177.0.0.1".into(),
        "0x7f.0.0.1".into(),
        "0x7f000001".into(),
        "127.1".into(),
        "127.0.1".into(),
        "0.0.0.0".into(),
        "0".into(),
        "[::1]".into(),
        "[::]".into(),
        "[::ffff:127.0.0.1]".into(),
        "[::ffff:7f00:1]".into(),
        "[0:0:0:0:0:0:0:1]".into(),
        "[::1%25lo]".into(),
        "erp.virtual".into(),
        "erp.virtual.".into(),
        "tcp.virtual".into(),
        "127.0.0.1.nip.io".into(),
    ];
    let mut http_rows: Vec<(String, String)> = Vec::new();
    for h in &hosts {
        http_rows
            .push((format!("GET {h}:{s}"), format!("GET http://{h}:{s}/ HTTP/1.1\r\nHost: {h}:{s}\r\n{auth}\r\n")));
        http_rows
            .push((format!("CONNECT {h}:{s}"), format!("CONNECT {h}:{s} HTTP/1.1\r\nHost: {h}:{s}\r\n{auth}\r\n")));
    }
    for (what, target, host) in [
        ("userinfo", format!("http://erp.virtual:8080@127.0.0.1:{s}/"), format!("127.0.0.1:{s}")),
        ("encoded userinfo", format!("http://erp.virtual%3a8080%40127.0.0.1:{s}/"), format!("127.0.0.1:{s}")),
        ("mapped Host header, secret in the URL", format!("http://127.0.0.1:{s}/"), "erp.virtual:8080".into()),
        ("origin form with the secret as Host", "/".into(), format!("127.0.0.1:{s}")),
        ("trailing dot on the mapped name", "http://erp.virtual.:8080/".into(), "erp.virtual.:8080".into()),
        ("IPv4-mapped form of a mapped name's address", "http://[::ffff:127.0.0.1]:7001/".into(), "x".into()),
        ("mapped name, port of the secret", format!("http://localhost:{s}/"), format!("localhost:{s}")),
        ("space in the host", format!("http://erp.virtual :{s}/"), "erp.virtual".into()),
    ] {
        http_rows.push((what.to_owned(), format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n")));
    }
    let mut failures = Vec::new();
    for (what, raw) in &http_rows {
        let status = http_raw(pair.http_addr, raw).await;
        let code: u16 = status.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        if !(400..600).contains(&code) {
            failures.push(format!("HTTP {what}: {status:?}"));
        }
    }

    let ip4 = |a: [u8; 4]| Address::Ipv4(a);
    let ip6 = |s: &str| Address::Ipv6(s.parse::<std::net::Ipv6Addr>().unwrap().octets());
    let dom = |s: &str| Address::Domain(s.into());
    let socks_rows: Vec<(&str, Address, u16)> = vec![
        ("IPv4 127.0.0.1", ip4([127, 0, 0, 1]), s),
        ("IPv4 0.0.0.0", ip4([0, 0, 0, 0]), s),
        ("IPv4 127.1.2.3", ip4([127, 1, 2, 3]), s),
        ("IPv6 ::1", ip6("::1"), s),
        ("IPv6 ::", ip6("::"), s),
        ("IPv6 ::ffff:127.0.0.1", ip6("::ffff:127.0.0.1"), s),
        ("domain 127.0.0.1", dom("127.0.0.1"), s),
        ("domain localhost", dom("localhost"), s),
        ("domain 2130706433", dom("2130706433"), s),
        ("domain 0177.0.0.1", dom("0177.0.0.1"), s),
        ("domain 0x7f000001", dom("0x7f000001"), s),
        ("domain 0.0.0.0", dom("0.0.0.0"), s),
        ("domain [::1]", dom("[::1]"), s),
        ("mapped name, port of the secret", dom("tcp.virtual"), s),
        ("mapped name with a trailing dot", dom("tcp.virtual."), 7000),
        ("HTTP mapping over SOCKS5", dom("erp.virtual"), 8080),
        ("IPv4 of a mapped name (names are not resolved)", ip4([127, 0, 0, 1]), 7001),
        ("IPv6 of a mapped name (names are not resolved)", ip6("::1"), 7001),
    ];
    for (what, address, port) in socks_rows {
        let reply = socks_raw(pair.socks_addr, &token, address, port).await;
        if reply == Some(0) {
            failures.push(format!("SOCKS5 {what}: connected"));
        }
    }
    // A NUL inside a mapped name, which the client-side encoder refuses to write.
    let mut nul = vec![0x05, CMD_CONNECT, 0x00, 0x03, 17];
    nul.extend_from_slice(b"tcp.virtual\0.evil");
    nul.extend_from_slice(&7000u16.to_be_bytes());
    if socks_bytes(pair.socks_addr, &token, &nul).await == Some(0) {
        failures.push("SOCKS5 mapped name with a NUL: connected".into());
    }
    assert!(failures.is_empty(), "{} rows got through:\n{}", failures.len(), failures.join("\n"));

    // Controls: the mappings work, with the name in any case.
    let ok =
        http_raw(pair.http_addr, &format!("GET http://ERP.virtual:8080/ok HTTP/1.1\r\nHost: x\r\n{auth}\r\n")).await;
    assert!(ok.contains(" 200 "), "{ok}");
    assert_eq!(socks_raw(pair.socks_addr, &token, dom("tcp.virtual"), 7000).await, Some(0));
    assert_eq!(socks_raw(pair.socks_addr, &token, dom("LocalHost"), 7001).await, Some(0));
    // Give any stray dial time to land before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(secret_hits.load(Ordering::SeqCst), 0, "the secret service was dialled");
    assert_eq!(echo.hits(), 1, "only the HTTP control reached the HTTP backend");
    ferry_testkit::eventually!("the two SOCKS5 controls reach the TCP backend", tcp_hits.load(Ordering::SeqCst) == 2);
}
