#![allow(clippy::unwrap_used, clippy::expect_used)]
//! End to end over real sockets: app → proxy (HTTP/SOCKS5) → TLS tunnel → connector → backend.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use ferry_connector::{AccessRules, HostInHeader, Protocol, Resource, SystemMapping};
use ferry_testkit::{CuttableRelay, EchoBackend, SUBACCOUNT, TunnelPair, eventually};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn http_mapping(vhost: &str, vport: u16, backend: SocketAddr, resources: &[(&str, bool)]) -> SystemMapping {
    SystemMapping {
        virtual_host: vhost.into(),
        virtual_port: vport,
        local_host: backend.ip().to_string(),
        local_port: backend.port(),
        protocol: Protocol::Http,
        host_in_header: HostInHeader::Virtual,
        authentication_mode: Default::default(),
        principal_certificate_in: Default::default(),
        resources: resources
            .iter()
            .map(|(p, exact)| Resource {
                path: (*p).into(),
                exact_match_only: *exact,
                enabled: true,
                websocket_upgrade_allowed: false,
                description: None,
            })
            .collect(),
        description: None,
    }
}

fn tcp_mapping(vhost: &str, vport: u16, backend: SocketAddr) -> SystemMapping {
    SystemMapping { protocol: Protocol::Tcp, resources: vec![], ..http_mapping(vhost, vport, backend, &[]) }
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends requests over one keep-alive connection to the HTTP proxy.
struct ProxyClient {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl ProxyClient {
    async fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
        tokio::spawn(conn);
        Self { sender }
    }

    async fn send(&mut self, req: http::Request<Full<Bytes>>) -> Reply {
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply { status, headers, body }
    }
}

fn get(uri: &str, token: Option<&str>, location: Option<&str>) -> http::request::Builder {
    let mut b = http::Request::get(uri).header("host", uri.split('/').nth(2).unwrap_or(""));
    if let Some(t) = token {
        b = b.header("proxy-authorization", format!("Bearer {t}"));
    }
    if let Some(l) = location {
        b = b.header("sap-connectivity-scc-location_id", l);
    }
    b
}

async fn one(addr: SocketAddr, req: http::Request<Full<Bytes>>) -> Reply {
    ProxyClient::connect(addr).await.send(req).await
}

#[tokio::test]
async fn http_request_reaches_the_backend_through_the_tunnel() {
    let echo = EchoBackend::start().await;
    let pair = TunnelPair::start().await;
    let rules = AccessRules::new(vec![http_mapping("onprem.virtual", 8080, echo.addr, &[("/sap", false)])]);
    pair.connector("loc1", rules, pair.tunnel_addr);
    pair.wait_connected("loc1").await;
    let token = pair.token();
    let mut client = ProxyClient::connect(pair.http_addr).await;

    let req = get("http://onprem.virtual:8080/sap/items?top=1", Some(&token), Some("loc1"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .header("sap-client", "100")
        .header("sap-connectivity-authentication", "Bearer user-jwt")
        .body(Full::default())
        .unwrap();
    let r = client.send(req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers.get("x-echo").unwrap(), "1");
    let e = r.json();
    assert_eq!(e["method"], "GET");
    assert_eq!(e["url"], "/sap/items?top=1");
    let h = &e["headers"];
    assert_eq!(h["host"], "onprem.virtual:8080");
    assert_eq!(h["authorization"], "Basic dXNlcjpwYXNz");
    assert_eq!(h["sap-client"], "100");
    for gone in ["proxy-authorization", "sap-connectivity-scc-location_id", "sap-connectivity-authentication"] {
        assert!(h.get(gone).is_none(), "{gone} reached the backend: {h}");
    }
    assert!(h.as_object().unwrap().keys().all(|k| !k.starts_with("ferry-")), "tunnel headers leaked: {h}");

    // Same keep-alive connection: a POST with a body, checked again by the connector.
    let body = "x".repeat(300_000);
    let req = http::Request::post("http://onprem.virtual:8080/sap/items")
        .header("host", "onprem.virtual:8080")
        .header("proxy-authorization", format!("Bearer {token}"))
        .header("sap-connectivity-scc-location_id", "loc1")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let r = client.send(req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body"], body);
    let req = get("http://onprem.virtual:8080/other", Some(&token), Some("loc1")).body(Full::default()).unwrap();
    assert_eq!(client.send(req).await.status, 403, "the second request on a connection is checked too");
    assert_eq!(echo.hits(), 2);
}

#[tokio::test]
async fn denied_path_is_403_and_nothing_reaches_the_backend() {
    let echo = EchoBackend::start().await;
    let pair = TunnelPair::start().await;
    let rules = AccessRules::new(vec![http_mapping("erp.virtual", 80, echo.addr, &[("/public", true)])]);
    let audit_dir = tempfile::tempdir().unwrap();
    let mut cfg = pair.connector_config("", rules, pair.tunnel_addr);
    cfg.audit = ferry_connector::audit::AuditConfig {
        level: ferry_connector::audit::AuditLevel::Security,
        dir: Some(audit_dir.path().to_owned()),
        ..Default::default()
    };
    pair.spawn_connector(cfg);
    pair.wait_connected("").await;
    let token = pair.token();
    for uri in [
        "http://erp.virtual/secret",
        "http://erp.virtual/public/sub",
        "http://erp.virtual/public/../secret",
        "http://unmapped.virtual/public",
        "http://erp.virtual:81/public",
    ] {
        let r = one(pair.http_addr, get(uri, Some(&token), None).body(Full::default()).unwrap()).await;
        assert_eq!(r.status, 403, "{uri}: {}", r.text());
        assert!(r.text().contains("Access denied"), "{uri}: {}", r.text());
    }
    assert_eq!(echo.hits(), 0);
    let r =
        one(pair.http_addr, get("http://erp.virtual/public", Some(&token), None).body(Full::default()).unwrap()).await;
    assert_eq!(r.status, 200);
    assert_eq!(echo.hits(), 1);

    // Every denial is in the audit log (SECURITY level), chained; the allowed request is not.
    let folder = audit_dir.path().join(SUBACCOUNT);
    eventually!("five denials written to the audit log", {
        std::fs::read_dir(&folder)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .is_some_and(|e| ferry_connector::audit::verify_file(&e.path()) == Ok(5))
    });
    let file = std::fs::read_dir(&folder).unwrap().next().unwrap().unwrap().path();
    let text = std::fs::read_to_string(file).unwrap();
    assert!(
        text.contains("/secret") && text.contains("unmapped.virtual:80") && !text.contains("Access Allowed"),
        "{text}"
    );
}

#[tokio::test]
async fn bad_tokens_get_407() {
    let echo = EchoBackend::start().await;
    let pair = TunnelPair::start().await;
    pair.connector(
        "",
        AccessRules::new(vec![http_mapping("a.virtual", 80, echo.addr, &[("/", false)])]),
        pair.tunnel_addr,
    );
    pair.wait_connected("").await;
    let other_keys = ferry_auth::KeySet::generate().unwrap();
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let unsigned = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&format!(r#"{{"zid":"{SUBACCOUNT}","exp":9999999999}}"#))
    );
    let cases = [
        ("missing", None),
        ("expired", Some(ferry_testkit::token(&pair.keys, SUBACCOUNT, "c", -3600))),
        ("foreign key", Some(ferry_testkit::token(&other_keys, SUBACCOUNT, "c", 600))),
        ("unsigned", Some(unsigned)),
        ("garbage", Some("not-a-jwt".to_string())),
    ];
    for (what, tok) in cases {
        let r =
            one(pair.http_addr, get("http://a.virtual/x", tok.as_deref(), None).body(Full::default()).unwrap()).await;
        assert_eq!(r.status, 407, "{what}: {}", r.text());
        assert!(r.headers.contains_key("proxy-authenticate"), "{what}");
    }
    // Basic instead of Bearer
    let req = http::Request::get("http://a.virtual/x")
        .header("proxy-authorization", "Basic dXNlcjpwYXNz")
        .body(Full::default())
        .unwrap();
    assert_eq!(one(pair.http_addr, req).await.status, 407);
    assert_eq!(echo.hits(), 0);
}

#[tokio::test]
async fn no_connector_is_503_naming_subaccount_and_location() {
    let pair = TunnelPair::start().await;
    let token = pair.token();
    let r =
        one(pair.http_addr, get("http://a.virtual/x", Some(&token), Some("nowhere")).body(Full::default()).unwrap())
            .await;
    assert_eq!(r.status, 503);
    assert!(r.text().contains(SUBACCOUNT) && r.text().contains("nowhere"), "{}", r.text());
}

#[tokio::test]
async fn connect_and_https_are_refused_with_guidance() {
    let pair = TunnelPair::start().await;
    let token = pair.token();
    let connect = |auth: bool| {
        let mut b = http::Request::connect("backend.virtual:443").header("host", "backend.virtual:443");
        if auth {
            b = b.header("proxy-authorization", format!("Bearer {}", pair.token()));
        }
        b.body(Full::default()).unwrap()
    };
    assert_eq!(one(pair.http_addr, connect(false)).await.status, 407);
    let r = one(pair.http_addr, connect(true)).await;
    assert_eq!(r.status, 405);
    assert!(r.text().contains("http://"), "{}", r.text());
    let r = one(pair.http_addr, get("https://a.virtual/x", Some(&token), None).body(Full::default()).unwrap()).await;
    assert_eq!(r.status, 405);
    assert!(r.text().contains("http://"), "{}", r.text());
    let r = one(
        pair.http_addr,
        http::Request::get("/x")
            .header("proxy-authorization", format!("Bearer {token}"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn connector_reconnects_after_its_connection_is_cut() {
    let echo = EchoBackend::start().await;
    let pair = TunnelPair::start().await;
    let relay = CuttableRelay::start(pair.tunnel_addr).await;
    let rules = AccessRules::new(vec![http_mapping("a.virtual", 80, echo.addr, &[("/", false)])]);
    let mut status = pair.connector("", rules, relay.addr);
    pair.wait_connected("").await;
    let token = pair.token();
    let req = || get("http://a.virtual/x", Some(&token), None).body(Full::default()).unwrap();
    assert_eq!(one(pair.http_addr, req()).await.status, 200);

    relay.cut();
    eventually!("connector noticed the cut and reconnected", {
        let s = *status.borrow_and_update();
        s.established >= 2 && s.connected == 1
    });
    pair.wait_connected("").await;
    let mut ok = false;
    for _ in 0..100 {
        // The proxy may still hold the dead connection for a moment; a fresh one serves.
        if one(pair.http_addr, req()).await.status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "requests flow again after the reconnect");
}

async fn socks_connect(addr: SocketAddr, token: &str, location: &str, host: &str, port: u16) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[5, 2, 0, 0x80]).await.unwrap();
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel).await.unwrap();
    assert_eq!(sel, [5, 0x80], "proxy must choose SAP's method 0x80");
    let loc = base64::engine::general_purpose::STANDARD.encode(location);
    let mut auth = vec![1];
    auth.extend_from_slice(&(token.len() as u32).to_be_bytes());
    auth.extend_from_slice(token.as_bytes());
    auth.push(loc.len() as u8);
    auth.extend_from_slice(loc.as_bytes());
    s.write_all(&auth).await.unwrap();
    let mut ar = [0u8; 2];
    s.read_exact(&mut ar).await.unwrap();
    if ar != [1, 0] {
        return (s, 0xFF);
    }
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.unwrap();
    (s, reply[1])
}

#[tokio::test]
async fn socks5_relays_tcp_through_the_tunnel() {
    let echo = EchoBackend::start().await;
    let pair = TunnelPair::start().await;
    let rules = AccessRules::new(vec![tcp_mapping("tcp.virtual", 7000, echo.addr)]);
    pair.connector("conf-loc", rules, pair.tunnel_addr);
    pair.wait_connected("conf-loc").await;
    let token = pair.token();

    let (mut s, rep) = socks_connect(pair.socks_addr, &token, "conf-loc", "tcp.virtual", 7000).await;
    assert_eq!(rep, 0);
    s.write_all(b"GET /raw HTTP/1.1\r\nhost: tcp.virtual\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"url\":\"/raw\""), "{text}");

    assert_eq!(
        socks_connect(pair.socks_addr, &token, "conf-loc", "other.virtual", 7000).await.1,
        2,
        "unmapped: not allowed"
    );
    assert_eq!(socks_connect(pair.socks_addr, &token, "elsewhere", "tcp.virtual", 7000).await.1, 3, "no connector");
    assert_eq!(socks_connect(pair.socks_addr, "bad", "conf-loc", "tcp.virtual", 7000).await.1, 0xFF, "bad token");
}

#[tokio::test]
async fn bad_input_is_refused_while_others_are_served() {
    let echo = EchoBackend::start().await;
    let pair = TunnelPair::start().await;
    pair.connector(
        "",
        AccessRules::new(vec![http_mapping("a.virtual", 80, echo.addr, &[("/", false)])]),
        pair.tunnel_addr,
    );
    pair.wait_connected("").await;
    let token = pair.token();

    // A client that stalls mid-handshake on each port, held open during the rest of the test.
    let mut stalled = Vec::new();
    for (addr, bytes) in [
        (pair.socks_addr, &b"\x05\x01"[..]),
        (pair.http_addr, b"GET http://a.virtual/ HTTP/1.1\r\n"),
        (pair.tunnel_addr, b"\x16\x03"),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        stalled.push(s);
    }

    // Malformed SOCKS5 greetings and truncated frames: refused and closed.
    for bytes in [&b"\x04\x01\x00\x50"[..], b"\x05\x00", b"\x05\x01\x00", b"GET / HTTP/1.1\r\n\r\n"] {
        let mut s = TcpStream::connect(pair.socks_addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "{bytes:?}: the proxy must close, not hang");
        assert!(buf.is_empty() || buf == [5, 0xFF], "{bytes:?} -> {buf:?}");
    }
    // Oversized SAP auth length: refused at once, not buffered.
    let mut s = TcpStream::connect(pair.socks_addr).await.unwrap();
    s.write_all(&[5, 1, 0x80]).await.unwrap();
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel).await.unwrap();
    s.write_all(&[1, 0xFF, 0xFF, 0xFF, 0xFF]).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.expect("closed").unwrap();
    assert_eq!(buf, [1, 1]);

    // Oversized header line: 431.
    let big = "a".repeat(9 * 1024);
    let r = one(
        pair.http_addr,
        get("http://a.virtual/x", Some(&token), None).header("x-big", big).body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!(r.status, 431);
    // Oversized head (many headers): 431 from the parser, not a hang.
    let mut s = TcpStream::connect(pair.http_addr).await.unwrap();
    let mut head = String::from("GET http://a.virtual/x HTTP/1.1\r\nhost: a.virtual\r\n");
    for i in 0..100 {
        head.push_str(&format!("x-h{i}: {}\r\n", "b".repeat(1000)));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.expect("answered");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 431") || text.starts_with("HTTP/1.1 400"), "{text}");
    // Garbage on the HTTP port: 400.
    let mut s = TcpStream::connect(pair.http_addr).await.unwrap();
    s.write_all(b"\x00\x01\x02 garbage\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.expect("answered").unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 400"), "{buf:?}");
    // Garbage on the tunnel port: closed without registering anything.
    let mut s = TcpStream::connect(pair.tunnel_addr).await.unwrap();
    s.write_all(&[0x42; 4096]).await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.expect("closed");
    assert!(r.is_err() || buf.len() < 100);
    // A TLS client without a client certificate: refused.
    let tls = ferry_core::tls::client_config(pair.ca.cert_pem(), None, &[ferry_proto::tunnel::ALPN]).unwrap();
    let tcp = TcpStream::connect(pair.tunnel_addr).await.unwrap();
    let res = tokio_rustls::TlsConnector::from(tls).connect("127.0.0.1".try_into().unwrap(), tcp).await;
    if let Ok(mut t) = res {
        let mut b = [0u8; 1];
        assert!(
            matches!(t.read(&mut b).await, Ok(0) | Err(_)),
            "a tunnel without a client certificate must be refused"
        );
    }
    assert_eq!(pair.proxy.registry().keys().len(), 1);

    // Meanwhile, a well-behaved client is served.
    let r = one(pair.http_addr, get("http://a.virtual/ok", Some(&token), None).body(Full::default()).unwrap()).await;
    assert_eq!(r.status, 200);
    drop(stalled);
}

/// Server-first protocols (SMTP, POP3, IMAP): the backend's greeting must reach the app before
/// the app sends anything.
#[tokio::test]
async fn socks5_carries_server_first_protocols() {
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = backend.accept().await else { return };
            tokio::spawn(async move {
                s.write_all(b"220 smtp ready\r\n").await.unwrap();
                let mut buf = [0u8; 1024];
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let pair = TunnelPair::start().await;
    pair.connector("", AccessRules::new(vec![tcp_mapping("smtp.virtual", 25, backend_addr)]), pair.tunnel_addr);
    pair.wait_connected("").await;
    let (mut s, rep) = socks_connect(pair.socks_addr, &pair.token(), "", "smtp.virtual", 25).await;
    assert_eq!(rep, 0);
    let mut banner = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut banner)).await.expect("banner in time").unwrap();
    assert_eq!(&banner, b"220 smtp ready\r\n");
    s.write_all(b"EHLO x\r\n").await.unwrap();
    let mut echo = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo)).await.expect("echo in time").unwrap();
    assert_eq!(&echo, b"EHLO x\r\n");
}

/// `HTTPS` and `TCPS` mappings: the connector does TLS to the backend and checks its certificate.
#[tokio::test]
async fn connector_speaks_tls_to_backends_and_checks_their_certificates() {
    let pair = TunnelPair::start().await;
    let backend_cert = pair.ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    let echo = EchoBackend::start_tls(&backend_cert).await;
    let https =
        SystemMapping { protocol: Protocol::Https, ..http_mapping("secure.virtual", 80, echo.addr, &[("/", false)]) };
    let tcps = SystemMapping { protocol: Protocol::Tcps, ..tcp_mapping("secure-tcp.virtual", 7000, echo.addr) };
    let mut cfg = pair.connector_config("trusting", AccessRules::new(vec![https.clone(), tcps]), pair.tunnel_addr);
    cfg.backend_ca_pem = Some(pair.ca.cert_pem().to_owned());
    pair.spawn_connector(cfg);
    // A second connector that does not trust the backend's CA.
    pair.spawn_connector(pair.connector_config("distrusting", AccessRules::new(vec![https]), pair.tunnel_addr));
    pair.wait_connected("trusting").await;
    pair.wait_connected("distrusting").await;
    let token = pair.token();

    let r = one(
        pair.http_addr,
        get("http://secure.virtual/tls", Some(&token), Some("trusting")).body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["url"], "/tls");
    assert_eq!(r.json()["headers"]["host"], "secure.virtual:80");

    let (mut s, rep) = socks_connect(pair.socks_addr, &token, "trusting", "secure-tcp.virtual", 7000).await;
    assert_eq!(rep, 0);
    s.write_all(b"GET /over-tcps HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200") && text.contains("/over-tcps"), "{text}");

    let r = one(
        pair.http_addr,
        get("http://secure.virtual/tls", Some(&token), Some("distrusting")).body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!(r.status, 502, "an untrusted backend certificate is refused: {}", r.text());
    assert_eq!(echo.hits(), 2);
}

/// Principal propagation: the connector verifies the user token itself and hands the backend a
/// short-lived certificate for that user; apps can never inject one.
#[tokio::test]
async fn principal_propagation_issues_a_user_certificate() {
    use std::sync::Arc;
    let echo = EchoBackend::start().await;
    let pair = TunnelPair::start().await;
    let pp_ca = Arc::new(ferry_core::tls::LocalCa::generate("PP CA").unwrap());
    let pp_mapping = SystemMapping {
        authentication_mode: ferry_connector::AuthenticationMode::X509General,
        ..http_mapping("pp.virtual", 80, echo.addr, &[("/", false)])
    };
    let plain = http_mapping("plain.virtual", 80, echo.addr, &[("/", false)]);
    let mut cfg = pair.connector_config("", AccessRules::new(vec![pp_mapping, plain]), pair.tunnel_addr);
    let mut pp = ferry_connector::PrincipalPropagation::new(
        Arc::new(ferry_auth::Verifier::local(pair.keys.clone())),
        pp_ca.clone(),
    );
    pp.subject_pattern = "CN=${name},EMAIL=${mail}".into();
    pp.expiration_tolerance = Duration::from_secs(3600);
    cfg.principal_propagation = Some(Arc::new(pp));
    pair.spawn_connector(cfg);
    pair.wait_connected("").await;
    let token = pair.token();
    let user = |exp_in: i64, keys: &ferry_auth::KeySet| {
        let exp = (ferry_testkit::now() as i64 + exp_in) as u64;
        keys.sign(
            &serde_json::json!({"zid": SUBACCOUNT, "user_name": "alice", "email": "alice@example.org",
                                "user_id": "u-1", "client_id": "sb-app!t1", "exp": exp}),
            &[],
        )
        .unwrap()
    };
    let call = |host: &str, principal: Option<String>, injected: bool| {
        let mut b = get(&format!("http://{host}/whoami"), Some(&token), None);
        if let Some(p) = principal {
            b = b.header("sap-connectivity-authentication", format!("Bearer {p}"));
        }
        if injected {
            b = b.header("ssl_client_cert", "forged");
        }
        b.body(Full::default()).unwrap()
    };

    let r = one(pair.http_addr, call("pp.virtual", Some(user(600, &pair.keys)), true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let cert_b64 = r.json()["headers"]["ssl_client_cert"].as_str().unwrap().to_owned();
    let der = base64::engine::general_purpose::STANDARD.decode(&cert_b64).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let cn = cert.subject().iter_common_name().next().unwrap().as_str().unwrap().to_owned();
    assert_eq!(cn, "alice");
    assert!(cert.issuer().to_string().contains("PP CA"), "{}", cert.issuer());
    assert!(cert.validity().time_to_expiration().is_some());

    // The same user again: the certificate is reused while valid.
    let r = one(pair.http_addr, call("pp.virtual", Some(user(600, &pair.keys)), false)).await;
    assert_eq!(r.json()["headers"]["ssl_client_cert"].as_str().unwrap(), cert_b64);
    // Expired 10 minutes ago, within the one-hour tolerance: accepted.
    assert_eq!(one(pair.http_addr, call("pp.virtual", Some(user(-600, &pair.keys)), false)).await.status, 200);
    // Expired beyond the tolerance, or signed by an unknown key: refused, nothing reaches the backend.
    let hits = echo.hits();
    assert_eq!(one(pair.http_addr, call("pp.virtual", Some(user(-7200, &pair.keys)), false)).await.status, 403);
    let foreign = ferry_auth::KeySet::generate().unwrap();
    let r = one(pair.http_addr, call("pp.virtual", Some(user(600, &foreign)), false)).await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("Principal propagation"), "{}", r.text());
    assert_eq!(echo.hits(), hits);
    // No user: an empty header, so the backend does not fall back to the system certificate.
    let r = one(pair.http_addr, call("pp.virtual", None, true)).await;
    assert_eq!(r.json()["headers"]["ssl_client_cert"], "");
    // A mapping without principal propagation: the app's forged header is removed.
    let r = one(pair.http_addr, call("plain.virtual", Some(user(600, &pair.keys)), true)).await;
    assert_eq!(r.status, 200);
    assert!(r.json()["headers"].get("ssl_client_cert").is_none(), "{}", r.json()["headers"]);
}

/// SPEC §4.6: an allowed exchange's audit record names the propagated user and carries the
/// bytes each way and the duration, all covered by the hash chain.
#[tokio::test]
async fn audit_records_carry_the_user_bytes_and_duration_under_the_chain() {
    use std::sync::Arc;
    let echo = EchoBackend::start().await;
    let pair = TunnelPair::start().await;
    let pp_ca = Arc::new(ferry_core::tls::LocalCa::generate("PP CA").unwrap());
    let pp_mapping = SystemMapping {
        authentication_mode: ferry_connector::AuthenticationMode::X509General,
        ..http_mapping("pp.virtual", 80, echo.addr, &[("/", false)])
    };
    let rules = AccessRules::new(vec![pp_mapping, tcp_mapping("tcp.virtual", 7000, echo.addr)]);
    let mut cfg = pair.connector_config("", rules, pair.tunnel_addr);
    let audit_dir = tempfile::tempdir().unwrap();
    cfg.audit = ferry_connector::audit::AuditConfig {
        level: ferry_connector::audit::AuditLevel::All,
        dir: Some(audit_dir.path().to_owned()),
        ..Default::default()
    };
    let pp =
        ferry_connector::PrincipalPropagation::new(Arc::new(ferry_auth::Verifier::local(pair.keys.clone())), pp_ca);
    cfg.principal_propagation = Some(Arc::new(pp));
    pair.spawn_connector(cfg);
    pair.wait_connected("").await;
    let token = pair.token();
    let exp = ferry_testkit::now() + 600;
    let user = pair
        .keys
        .sign(&serde_json::json!({"zid": SUBACCOUNT, "user_name": "alice", "client_id": "sb-app!t1", "exp": exp}), &[])
        .unwrap();

    let sent = "y".repeat(12_345);
    let req = http::Request::post("http://pp.virtual/upload")
        .header("host", "pp.virtual")
        .header("proxy-authorization", format!("Bearer {token}"))
        .header("sap-connectivity-authentication", format!("Bearer {user}"))
        .body(Full::new(Bytes::from(sent.clone())))
        .unwrap();
    let r = one(pair.http_addr, req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let http_out = r.body.len();

    let (mut s, rep) = socks_connect(pair.socks_addr, &token, "", "tcp.virtual", 7000).await;
    assert_eq!(rep, 0);
    let raw = b"GET /raw HTTP/1.1\r\nhost: tcp.virtual\r\nconnection: close\r\n\r\n";
    s.write_all(raw).await.unwrap();
    let mut tcp_out = Vec::new();
    s.read_to_end(&mut tcp_out).await.unwrap();
    drop(s);

    // Records are written when both directions of an exchange have ended.
    let file = audit_dir.path().join(SUBACCOUNT).join(ferry_connector::audit::ACTIVE_FILE);
    eventually!("both exchanges in the audit log", ferry_connector::audit::verify_file(&file) == Ok(2));
    let text = std::fs::read_to_string(&file).unwrap();
    let records: Vec<Value> = text.lines().skip(1).map(|l| serde_json::from_str(l).unwrap()).collect();
    let http = records.iter().find(|r| r["protocol"] == "HTTP").unwrap();
    assert_eq!(http["event"], "Access Allowed", "{http}");
    assert_eq!(http["user"], "CN=alice", "{http}");
    assert_eq!(http["bytesIn"], sent.len().to_string(), "{http}");
    assert_eq!(http["bytesOut"], http_out.to_string(), "{http}");
    assert!(http["durationMs"].as_str().unwrap().parse::<u64>().is_ok(), "{http}");
    let tcp = records.iter().find(|r| r["protocol"] == "TCP").unwrap();
    assert_eq!(tcp["user"], "", "{tcp}");
    assert_eq!(tcp["bytesIn"], raw.len().to_string(), "{tcp}");
    assert_eq!(tcp["bytesOut"], tcp_out.len().to_string(), "{tcp}");

    // The chain covers the new fields: changing any of them is detected.
    for (old, new) in [
        ("\"user\":\"CN=alice\"".to_owned(), "\"user\":\"CN=bob\"".to_owned()),
        (format!("\"bytesOut\":\"{}\"", tcp_out.len()), "\"bytesOut\":\"1\"".to_owned()),
        (format!("\"bytesIn\":\"{}\"", sent.len()), "\"bytesIn\":\"0\"".to_owned()),
    ] {
        assert!(text.contains(&old), "{old} in {text}");
        let tampered = file.with_extension("tampered");
        std::fs::write(&tampered, text.replacen(&old, &new, 1)).unwrap();
        assert!(ferry_connector::audit::verify_file(&tampered).is_err(), "changing {old} went unnoticed");
    }
}

/// Scale-out: a connector keeps tunnels to every proxy replica, so a request through any replica
/// reaches the backend, and losing one replica's tunnel leaves the others serving.
#[tokio::test]
async fn connector_serves_every_proxy_replica() {
    let echo = EchoBackend::start().await;
    let pair = TunnelPair::start().await;
    let (http_b, _socks_b, tunnel_b, registry_b) = pair.replica().await;
    let relay_b = CuttableRelay::start(tunnel_b).await;
    let mut cfg = pair.connector_config(
        "",
        AccessRules::new(vec![http_mapping("a.virtual", 80, echo.addr, &[("/", false)])]),
        pair.tunnel_addr,
    );
    cfg.more_proxy_addrs = vec![relay_b.addr.to_string()];
    let status = pair.spawn_connector(cfg);
    pair.wait_connected("").await;
    eventually!("tunnel to replica B", registry_b.is_connected(SUBACCOUNT, ""));
    assert_eq!(status.borrow().connected, 2);
    let token = pair.token();
    for proxy in [pair.http_addr, http_b] {
        let r = one(proxy, get("http://a.virtual/x", Some(&token), None).body(Full::default()).unwrap()).await;
        assert_eq!(r.status, 200, "via {proxy}: {}", r.text());
    }
    relay_b.cut();
    let r = one(pair.http_addr, get("http://a.virtual/x", Some(&token), None).body(Full::default()).unwrap()).await;
    assert_eq!(r.status, 200, "replica A is unaffected by B's tunnel loss");
    eventually!(
        "tunnel to replica B is back",
        registry_b.is_connected(SUBACCOUNT, "") && status.borrow().established >= 3
    );
    assert_eq!(echo.hits(), 3);
}

/// Principal propagation over mTLS to a real nginx that verifies client certificates
/// (`ssl_verify_client on`) against the connector's principal-propagation CA.
#[tokio::test]
async fn nginx_sees_the_propagated_user_as_its_tls_client() {
    use std::sync::Arc;
    let pair = TunnelPair::start().await;
    let pp_ca = Arc::new(ferry_core::tls::LocalCa::generate("PP CA").unwrap());
    let server = pair.ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    let nginx = ferry_testkit::nginx::Nginx::start(
        "    listen 127.0.0.1:{PORT} ssl;\n\
         ssl_certificate {DIR}/server.pem;\n    ssl_certificate_key {DIR}/server-key.pem;\n\
         ssl_client_certificate {DIR}/pp-ca.pem;\n    ssl_verify_client on;\n\
         location / { return 200 \"subject=$ssl_client_s_dn verify=$ssl_client_verify\\n\"; }",
        &[
            ("server.pem", &server.cert_pem),
            ("server-key.pem", server.key_pem.expose()),
            ("pp-ca.pem", pp_ca.cert_pem()),
        ],
    );
    let mapping = SystemMapping {
        protocol: Protocol::Https,
        authentication_mode: ferry_connector::AuthenticationMode::X509General,
        principal_certificate_in: ferry_connector::PrincipalDelivery::Tls,
        ..http_mapping("erp.virtual", 443, nginx.addr, &[("/", false)])
    };
    let mut cfg = pair.connector_config("", AccessRules::new(vec![mapping]), pair.tunnel_addr);
    cfg.backend_ca_pem = Some(pair.ca.cert_pem().to_owned());
    cfg.principal_propagation = Some(Arc::new(ferry_connector::PrincipalPropagation::new(
        Arc::new(ferry_auth::Verifier::local(pair.keys.clone())),
        pp_ca,
    )));
    pair.spawn_connector(cfg);
    pair.wait_connected("").await;
    let exp = ferry_testkit::now() + 600;
    let user = pair
        .keys
        .sign(&serde_json::json!({"zid": SUBACCOUNT, "user_name": "alice", "user_id": "u1", "exp": exp}), &[])
        .unwrap();
    let req = get("http://erp.virtual:443/sap/me", Some(&pair.token()), None)
        .header("sap-connectivity-authentication", format!("Bearer {user}"))
        .body(Full::default())
        .unwrap();
    let r = one(pair.http_addr, req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("CN=alice") && r.text().contains("verify=SUCCESS"), "{}", r.text());
    // Without a user there is no client certificate, and nginx refuses.
    let r = one(
        pair.http_addr,
        get("http://erp.virtual:443/sap/me", Some(&pair.token()), None).body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
}

#[tokio::test]
async fn the_system_certificate_goes_to_tls_backends_unless_the_mapping_is_restricted() {
    let pair = TunnelPair::start().await;
    let system_ca = ferry_core::tls::LocalCa::generate("System CA").unwrap();
    let system = system_ca.issue_user_cert(&[("CN".into(), "scc-system".into())], time::Duration::days(1)).unwrap();
    let server = pair.ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    let nginx = ferry_testkit::nginx::Nginx::start(
        "    listen 127.0.0.1:{PORT} ssl;\n\
         ssl_certificate {DIR}/server.pem;\n    ssl_certificate_key {DIR}/server-key.pem;\n\
         ssl_client_certificate {DIR}/system-ca.pem;\n    ssl_verify_client optional;\n\
         location / { return 200 \"subject=$ssl_client_s_dn verify=$ssl_client_verify\\n\"; }",
        &[
            ("server.pem", &server.cert_pem),
            ("server-key.pem", server.key_pem.expose()),
            ("system-ca.pem", system_ca.cert_pem()),
        ],
    );
    let https = |vhost: &str, mode| SystemMapping {
        protocol: Protocol::Https,
        authentication_mode: mode,
        ..http_mapping(vhost, 443, nginx.addr, &[("/", false)])
    };
    use ferry_connector::AuthenticationMode::{None as Plain, NoneRestricted};
    let rules = AccessRules::new(vec![https("erp.virtual", Plain), https("restricted.virtual", NoneRestricted)]);
    let mut cfg = pair.connector_config("", rules, pair.tunnel_addr);
    cfg.backend_ca_pem = Some(pair.ca.cert_pem().to_owned());
    cfg.system_certificate = Some(system);
    pair.spawn_connector(cfg);
    pair.wait_connected("").await;
    let call =
        |host: &str| get(&format!("http://{host}:443/sap/x"), Some(&pair.token()), None).body(Full::default()).unwrap();
    let r = one(pair.http_addr, call("erp.virtual")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("CN=scc-system") && r.text().contains("verify=SUCCESS"), "{}", r.text());
    // `*_RESTRICTED`: never the system certificate.
    let r = one(pair.http_addr, call("restricted.virtual")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("verify=NONE"), "{}", r.text());
}
