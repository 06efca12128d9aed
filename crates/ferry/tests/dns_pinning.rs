#![allow(clippy::unwrap_used, clippy::expect_used)]
//! DNS rebinding of a mapped internal host. The connector runs in a mount namespace of its own
//! whose `/etc/hosts` is a file of this test, so the test controls what the mapped name resolves
//! to through the connector's real resolver (glibc reads the file on every lookup). The name first
//! resolves to 127.0.0.1 (the backend), then is rebound to 127.0.0.2, where a "secret" service
//! listens on the same port: over the HTTP proxy and over SOCKS5 the connector must refuse to
//! follow (a 502 / SOCKS5 failure that says why) and the secret must see no connection. Rebound
//! back, the name works again.
//!
//! Needs root (a mount namespace): without it the test says so on stderr and returns.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferry_testkit::process::FerryProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NAME: &str = "backend.pin.test";

/// Answers one HTTP response on every connection and closes it (so no pooled connection hides
/// a new lookup); counts connections.
async fn counting_backend(listener: TcpListener) -> Arc<AtomicUsize> {
    let hits = Arc::new(AtomicUsize::new(0));
    let count = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
            });
        }
    });
    hits
}

async fn through_http(proxy: &str, token: &str) -> (u16, String) {
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(proxy).unwrap().custom_http_auth(format!("Bearer {token}").parse().unwrap()))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let r =
        client.get("http://web.virtual:80/x").header("sap-connectivity-scc-location_id", "pin").send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// SOCKS5 (method 0x80) CONNECT to the TCP mapping; the reply code (0 = connected).
async fn through_socks(proxy: SocketAddr, token: &str) -> u8 {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    // Greeting with SAP's method 0x80; its authentication (JWT, base64 location id "pin"); CONNECT
    // to a domain name.
    let mut out = vec![0x05, 0x01, 0x80, 0x01];
    out.extend_from_slice(&(token.len() as u32).to_be_bytes());
    out.extend_from_slice(token.as_bytes());
    out.push(4);
    out.extend_from_slice(b"cGlu");
    out.extend_from_slice(&[0x05, 0x01, 0x00, 0x03, 11]);
    out.extend_from_slice(b"tcp.virtual");
    out.extend_from_slice(&80u16.to_be_bytes());
    s.write_all(&out).await.unwrap();
    let mut head = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut head)).await.unwrap().unwrap();
    assert_eq!(&head[..4], &[0x05, 0x80, 0x01, 0x00], "greeting and authentication");
    head[5]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapped_name_rebound_to_another_address_is_not_followed() {
    let probe = Command::new("unshare").args(["--mount", "true"]).output().unwrap();
    if !probe.status.success() {
        eprintln!(
            "SKIPPED a_mapped_name_rebound_to_another_address_is_not_followed: a mount namespace needs root \
             (unshare --mount: {}); run the test as root to check DNS pinning",
            String::from_utf8_lossy(&probe.stderr).trim()
        );
        return;
    }
    ferry_core::init_crypto();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = backend.local_addr().unwrap().port();
    let secret = TcpListener::bind(("127.0.0.2", port)).await.unwrap();
    let (backend_hits, secret_hits) = (counting_backend(backend).await, counting_backend(secret).await);

    let (_up, vcap) = common::ferry_up(dir, common::LISTEN_ANY);
    let conn = &vcap["connectivity"][0]["credentials"];
    let token_url = conn["url"].as_str().unwrap().to_owned();
    let subaccount = conn["tenantid"].as_str().unwrap().to_owned();
    let http_proxy = format!("http://127.0.0.1:{}", conn["onpremise_proxy_http_port"].as_str().unwrap());
    let socks_proxy: SocketAddr =
        format!("127.0.0.1:{}", conn["onpremise_socks5_proxy_port"].as_str().unwrap()).parse().unwrap();
    let scc = dir.join("scc");
    common::enroll(&subaccount, Some("pin"), &token_url, &dir.join("data"), &scc, &[]);
    let mut toml = std::fs::read_to_string(scc.join("connector.toml")).unwrap();
    toml.push_str(&format!(
        "\n[[mappings]]\nvirtualHost = \"web.virtual\"\nvirtualPort = 80\nlocalHost = \"{NAME}\"\nlocalPort = {port}\n\
         protocol = \"HTTP\"\nresources = [{{ path = \"/\", exactMatchOnly = false }}]\n\n\
         [[mappings]]\nvirtualHost = \"tcp.virtual\"\nvirtualPort = 80\nlocalHost = \"{NAME}\"\nlocalPort = {port}\n\
         protocol = \"TCP\"\n"
    ));
    std::fs::write(scc.join("connector.toml"), toml).unwrap();

    // The connector's /etc/hosts is this file (bind-mounted in its own mount namespace); written
    // in place, so the mount keeps showing the new content.
    let hosts = dir.join("hosts");
    let point_to = |ip: &str| std::fs::write(&hosts, format!("127.0.0.1 localhost\n{ip} {NAME}\n")).unwrap();
    point_to("127.0.0.1");
    let ferry = env!("CARGO_BIN_EXE_ferry");
    let config = scc.join("connector.toml");
    let _connector = FerryProcess::start(
        "unshare",
        &[
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
            hosts.to_str().unwrap(),
            ferry,
            "connector",
            "run",
            "--config",
            config.to_str().unwrap(),
        ],
        &[("FERRY_LOG", "warn")],
        false,
    );
    let token = common::token(conn).await;

    // Resolved to the backend: both kinds reach it.
    let mut first = (0, String::new());
    for _ in 0..200 {
        first = through_http(&http_proxy, &token).await;
        if first.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(first, (200, "ok".to_owned()));
    assert_eq!(through_socks(socks_proxy, &token).await, 0x00);
    let reached = backend_hits.load(Ordering::SeqCst);
    assert!(reached >= 2, "the backend saw {reached} connections");

    // Rebound: the connector resolves again (the message names the new address) but dials
    // nothing.
    point_to("127.0.0.2");
    let (status, text) = through_http(&http_proxy, &token).await;
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("DNS rebinding") && text.contains("127.0.0.2"), "{text}");
    let reply = through_socks(socks_proxy, &token).await;
    assert_ne!(reply, 0x00, "SOCKS5 to the rebound name must fail");
    assert_eq!(secret_hits.load(Ordering::SeqCst), 0, "the rebound address must never be dialled");
    assert_eq!(backend_hits.load(Ordering::SeqCst), reached);

    // Back at the pinned address: served again.
    point_to("127.0.0.1");
    assert_eq!(through_http(&http_proxy, &token).await, (200, "ok".to_owned()));
    assert_eq!(through_socks(socks_proxy, &token).await, 0x00);
    assert_eq!(secret_hits.load(Ordering::SeqCst), 0);
}
