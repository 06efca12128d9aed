#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A server that authenticates clients by certificate never resumes a session: a resumed
//! handshake takes the client certificate from the session instead of verifying it again. The
//! control (the same server without client authentication) does resume, so the checks below
//! would see a resumption if one happened.

use std::sync::Arc;
use std::time::Duration;

use ferry_core::tls::{self, LocalCa};
use rustls::HandshakeKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves TLS on a port-0 listener: each connection gets one byte after the handshake (so the
/// client reads the session tickets sent before it) and is closed.
async fn server(cfg: Arc<rustls::ServerConfig>) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let _ = tls.write_all(b"x").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Connects with `cfg` (which keeps its session cache across calls) and returns the kind of
/// handshake that ran.
async fn handshake(addr: std::net::SocketAddr, cfg: Arc<rustls::ClientConfig>) -> HandshakeKind {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("proxy.test").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap();
    let mut buf = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut buf)).await.unwrap().unwrap();
    tls.get_ref().1.handshake_kind().unwrap()
}

fn client(ca: &LocalCa, id: Option<&tls::CertifiedKey>, tls12: bool) -> Arc<rustls::ClientConfig> {
    if !tls12 {
        return tls::client_config(ca.cert_pem(), id, &[]).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
        .with_root_certificates(tls::root_store(ca.cert_pem()).unwrap());
    let cfg = match id {
        Some(id) => builder
            .with_client_auth_cert(
                tls::parse_certs(&id.cert_pem).unwrap(),
                tls::parse_key(id.key_pem.expose()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(cfg)
}

#[tokio::test]
async fn mtls_servers_run_the_full_handshake_every_time() {
    ferry_core::init_crypto();
    let ca = LocalCa::generate("resumption test CA").unwrap();
    let server_id = ca.issue_server_cert(&["proxy.test"]).unwrap();
    let connector = ca.issue_connector_cert("sub", "", time::Duration::hours(1)).unwrap();

    let mtls = server(tls::server_config(&server_id, Some(ca.cert_pem()), &[]).unwrap()).await;
    let plain = server(tls::server_config(&server_id, None, &[]).unwrap()).await;

    for tls12 in [false, true] {
        let version = if tls12 { "TLS 1.2" } else { "TLS 1.3" };
        // Control: without client authentication the session is resumed.
        let cfg = client(&ca, None, tls12);
        assert_eq!(handshake(plain, cfg.clone()).await, HandshakeKind::Full, "{version}");
        assert_eq!(handshake(plain, cfg).await, HandshakeKind::Resumed, "{version}: control must resume");

        let cfg = client(&ca, Some(&connector), tls12);
        for attempt in 0..3 {
            assert_eq!(handshake(mtls, cfg.clone()).await, HandshakeKind::Full, "{version}, connection {attempt}");
        }
    }
}
