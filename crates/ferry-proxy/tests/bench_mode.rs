#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The benchmark-only SOCKS5 listener without authentication: generic SOCKS5 clients reach the
//! one configured (subaccount, location) through the real tunnel, access control still applies,
//! the production SOCKS5 port keeps refusing method 0x00, and the listener is refused anywhere but
//! on loopback.

use std::net::SocketAddr;
use std::sync::Arc;

use ferry_auth::Verifier;
use ferry_connector::{AccessRules, HostInHeader, Protocol, SystemMapping};
use ferry_proxy::{Listeners, NoAuthRoute, Proxy, ProxyConfig, RunError, check_no_auth};
use ferry_testkit::{EchoBackend, SUBACCOUNT, TunnelPair, eventually, listener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn tcp_mapping(vhost: &str, vport: u16, backend: SocketAddr) -> SystemMapping {
    SystemMapping {
        virtual_host: vhost.into(),
        virtual_port: vport,
        local_host: backend.ip().to_string(),
        local_port: backend.port(),
        protocol: Protocol::Tcp,
        host_in_header: HostInHeader::Virtual,
        authentication_mode: Default::default(),
        principal_certificate_in: Default::default(),
        resources: vec![],
        description: None,
    }
}

/// SOCKS5 without authentication (method 0x00) and CONNECT to `host:port`; returns the stream
/// and the reply code, or `None` when the proxy refuses method 0x00.
async fn no_auth_connect(addr: SocketAddr, host: &str, port: u16) -> (TcpStream, Option<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel).await.unwrap();
    if sel != [5, 0] {
        assert_eq!(sel, [5, 0xFF]);
        return (s, None);
    }
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.unwrap();
    (s, Some(reply[1]))
}

#[tokio::test]
async fn no_auth_listener_reaches_the_configured_connector_only() {
    let echo = EchoBackend::start().await;
    let pair = TunnelPair::start().await;
    // A proxy with the bench listener, trusting the pair's CA; the connector for location
    // "bench" dials it.
    let server = pair.ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    let tls = ferry_core::tls::server_config(&server, Some(pair.ca.cert_pem()), &[ferry_proto::tunnel::ALPN]).unwrap();
    let mut cfg = ProxyConfig::new(Arc::new(Verifier::local(pair.keys.clone())), tls);
    cfg.socks5_no_auth = Some(NoAuthRoute { subaccount: SUBACCOUNT.into(), location: "bench".into() });
    let proxy = Proxy::new(cfg);
    let (socks, no_auth, tunnel) = (listener().await, listener().await, listener().await);
    let (socks_addr, no_auth_addr, tunnel_addr) =
        (socks.local_addr().unwrap(), no_auth.local_addr().unwrap(), tunnel.local_addr().unwrap());
    tokio::spawn(proxy.clone().run(
        Listeners { http: None, socks5: Some(socks), tunnel: Some(tunnel), socks5_no_auth: Some(no_auth) },
        pair.shutdown.clone(),
    ));
    pair.connector("bench", AccessRules::new(vec![tcp_mapping("tcp.virtual", 7000, echo.addr)]), tunnel_addr);
    let registry = proxy.registry();
    eventually!("connector registered", registry.is_connected(SUBACCOUNT, "bench"));

    let (mut s, reply) = no_auth_connect(no_auth_addr, "tcp.virtual", 7000).await;
    assert_eq!(reply, Some(0));
    s.write_all(b"GET /bench HTTP/1.1\r\nhost: tcp.virtual\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"url\":\"/bench\""), "{text}");
    assert_eq!(echo.hits(), 1);

    // The connector's access control still decides: an unmapped target is "not allowed" (2).
    assert_eq!(no_auth_connect(no_auth_addr, "other.virtual", 7000).await.1, Some(2));
    // The production SOCKS5 port of the same proxy still accepts only SAP's method 0x80.
    assert_eq!(no_auth_connect(socks_addr, "tcp.virtual", 7000).await.1, None);
    assert_eq!(echo.hits(), 1);
}

#[tokio::test]
async fn no_auth_listener_is_refused_off_loopback_and_without_a_route() {
    let route = NoAuthRoute { subaccount: SUBACCOUNT.into(), location: String::new() };
    let any = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let e = check_no_auth(&any, Some(&route)).unwrap_err();
    assert!(matches!(e, RunError::NoAuthNotLoopback(_)), "{e}");
    assert!(e.to_string().contains("loopback"), "{e}");
    let lo = listener().await;
    assert!(matches!(check_no_auth(&lo, None), Err(RunError::NoAuthWithoutRoute)));
    assert!(check_no_auth(&lo, Some(&route)).is_ok());

    // `run` does not serve a refused listener: nothing accepts on it.
    let pair = TunnelPair::start().await;
    let server = pair.ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    let tls = ferry_core::tls::server_config(&server, Some(pair.ca.cert_pem()), &[ferry_proto::tunnel::ALPN]).unwrap();
    let proxy = Proxy::new(ProxyConfig::new(Arc::new(Verifier::local(pair.keys.clone())), tls));
    let addr = lo.local_addr().unwrap();
    let task =
        tokio::spawn(proxy.run(Listeners { socks5_no_auth: Some(lo), ..Default::default() }, pair.shutdown.clone()));
    // With no listener left to serve, `run` returns at once and the socket is closed.
    task.await.unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
}
