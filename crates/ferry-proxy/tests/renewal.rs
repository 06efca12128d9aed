#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Hitless tunnel swaps: while a connector renews its certificate again and again (a new tunnel,
//! then HTTP/2 GOAWAY on the old one), a steady stream of HTTP requests (sequential, concurrent,
//! with and without a body) and SOCKS5 connections gets through without one failure and without
//! any retry by the client: what a draining tunnel refused, the proxy puts on the new one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use ferry_connector::{AccessRules, Connector, Protocol};
use ferry_testkit::{EchoBackend, SUBACCOUNT, TunnelPair, eventually, open_mapping};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LOCATION: &str = "swap";

/// One HTTP request through the proxy on a fresh connection or `conn`; `Err` says what failed.
async fn http_once(
    conn: &mut Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    proxy: SocketAddr,
    token: &str,
    n: usize,
) -> Result<(), String> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        let s = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
        s.set_nodelay(true).unwrap();
        let (sender, c) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.map_err(|e| e.to_string())?;
        tokio::spawn(c);
        *conn = Some(sender);
    }
    let sender = conn.as_mut().unwrap();
    // Every other request carries a body, which must arrive whole exactly once.
    let (method, body) =
        if n.is_multiple_of(2) { ("GET", String::new()) } else { ("POST", format!("payload {n} ").repeat(50)) };
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://swap.virtual:8000/api/{n}"))
        .header("host", "swap.virtual:8000")
        .header("proxy-authorization", format!("Bearer {token}"))
        .header("sap-connectivity-scc-location_id", LOCATION)
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| format!("request {n}: {e}"))?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.map_err(|e| format!("body {n}: {e}"))?.to_bytes();
    if status != 200 {
        return Err(format!("request {n}: {status} {}", String::from_utf8_lossy(&bytes)));
    }
    let echo: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| format!("request {n}: {e}"))?;
    if echo["url"] != format!("/api/{n}") || echo["body"] != body.as_str() {
        return Err(format!("request {n}: wrong echo {echo}"));
    }
    Ok(())
}

/// One SOCKS5 connection carrying one HTTP exchange to the echo backend.
async fn socks_once(proxy: SocketAddr, token: &str, n: usize) -> Result<(), String> {
    let mut s = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
    s.set_nodelay(true).unwrap();
    let io = |e: std::io::Error| format!("socks {n}: {e}");
    s.write_all(&[5, 1, 0x80]).await.map_err(io)?;
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel).await.map_err(io)?;
    let loc = base64::engine::general_purpose::STANDARD.encode(LOCATION);
    let mut auth = vec![1];
    auth.extend_from_slice(&(token.len() as u32).to_be_bytes());
    auth.extend_from_slice(token.as_bytes());
    auth.push(loc.len() as u8);
    auth.extend_from_slice(loc.as_bytes());
    let host = b"tcp.virtual";
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host);
    req.extend_from_slice(&7000u16.to_be_bytes());
    auth.extend_from_slice(&req);
    let head = format!("GET /raw/{n} HTTP/1.1\r\nhost: tcp.virtual\r\nconnection: close\r\n\r\n");
    // Every other time the first request bytes go in the same write as the CONNECT, as
    // pipelining clients send them: they cross on whichever tunnel accepts the stream.
    let pipelined = n.is_multiple_of(2);
    if pipelined {
        auth.extend_from_slice(head.as_bytes());
    }
    s.write_all(&auth).await.map_err(io)?;
    let mut ar = [0u8; 2];
    s.read_exact(&mut ar).await.map_err(io)?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.map_err(io)?;
    if reply[1] != 0 {
        return Err(format!("socks {n}: reply {:#04x}", reply[1]));
    }
    if !pipelined {
        s.write_all(head.as_bytes()).await.map_err(io)?;
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.map_err(io)?;
    let text = String::from_utf8_lossy(&out);
    if !text.starts_with("HTTP/1.1 200") || !text.contains(&format!("\"url\":\"/raw/{n}\"")) {
        return Err(format!("socks {n}: {text}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_flow_without_a_failure_across_repeated_certificate_renewals() {
    for connections in [1, 2] {
        swap_under_load(connections).await;
    }
}

async fn swap_under_load(connections: usize) {
    let echo = EchoBackend::start().await;
    let pair = TunnelPair::start().await;
    let rules = AccessRules::new(vec![
        open_mapping("swap.virtual", 8000, echo.addr, Protocol::Http),
        open_mapping("tcp.virtual", 7000, echo.addr, Protocol::Tcp),
    ]);
    let mut cfg = pair.connector_config(LOCATION, rules, pair.tunnel_addr);
    cfg.connections = connections;
    let connector = Arc::new(Connector::new(cfg).unwrap());
    let status = connector.status();
    tokio::spawn(connector.clone().run(pair.shutdown.clone()));
    pair.wait_connected(LOCATION).await;

    let token = Arc::new(pair.token());
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = tokio::task::JoinSet::new();
    // One sequential client on a keep-alive connection, three on a new connection each time,
    // and two SOCKS5 clients.
    for client in 0..6usize {
        let (stop, done, token) = (stop.clone(), done.clone(), token.clone());
        let (http, socks) = (pair.http_addr, pair.socks_addr);
        load.spawn(async move {
            let mut failures = Vec::new();
            let mut conn = None;
            let mut n = client * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let r = match client {
                    0 => http_once(&mut conn, http, &token, n).await,
                    1..=3 => http_once(&mut None, http, &token, n).await,
                    _ => socks_once(socks, &token, n).await,
                };
                match r {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(e),
                }
            }
            failures
        });
    }

    let renewals = 4u64;
    for i in 1..=renewals {
        // Some traffic on the current tunnel before each swap.
        let before = done.load(Ordering::Relaxed);
        eventually!("requests flow before the swap", done.load(Ordering::Relaxed) >= before + 20);
        let id = pair.ca.issue_connector_cert(SUBACCOUNT, LOCATION, time::Duration::days(1)).unwrap();
        connector.set_identity(&id).unwrap();
        let want = (i + 1) * connections as u64;
        eventually!("the renewed tunnels are up", status.borrow().established >= want);
    }
    let before = done.load(Ordering::Relaxed);
    eventually!("requests flow after the last swap", done.load(Ordering::Relaxed) >= before + 20);
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    while let Some(r) = load.join_next().await {
        failures.extend(r.unwrap());
    }
    assert!(failures.is_empty(), "{} of {} failed: {failures:#?}", failures.len(), done.load(Ordering::Relaxed));
    eventually!(
        "only the renewed tunnels remain",
        pair.proxy.registry().keys() == vec![((SUBACCOUNT.to_owned(), LOCATION.to_owned()), connections)]
    );
    drop(pair);
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// The other half of the rule: a stream the connector may have processed is never sent again,
/// even with a fresh tunnel to send it on. A request held by its backend when the tunnel is cut
/// gets 502, and the backend saw it exactly once.
#[tokio::test]
async fn a_stream_that_reached_the_connector_is_not_retried() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                // Never answers; holds the connection until the peer goes.
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let pair = TunnelPair::start().await;
    let relay = ferry_testkit::CuttableRelay::start(pair.tunnel_addr).await;
    let rules = AccessRules::new(vec![open_mapping("held.virtual", 8000, backend, Protocol::Http)]);
    let status = pair.connector(LOCATION, rules, relay.addr);
    pair.wait_connected(LOCATION).await;

    let token = pair.token();
    let req = tokio::spawn(async move {
        let s = TcpStream::connect(pair.http_addr).await.unwrap();
        let (mut sender, c) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
        tokio::spawn(c);
        let req = http::Request::post("http://held.virtual:8000/order")
            .header("host", "held.virtual:8000")
            .header("proxy-authorization", format!("Bearer {token}"))
            .header("sap-connectivity-scc-location_id", LOCATION)
            .body(Full::new(Bytes::from_static(b"debit 100")))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        (resp.status(), pair)
    });
    eventually!("the backend has the request", hits.load(Ordering::SeqCst) == 1);
    relay.cut();
    let (code, pair) = tokio::time::timeout(Duration::from_secs(30), req).await.unwrap().unwrap();
    assert_eq!(code, 502);
    // The connector is back on a new tunnel, and still the backend saw the request only once.
    eventually!(
        "reconnected",
        status.borrow().established >= 2 && pair.proxy.registry().is_connected(SUBACCOUNT, LOCATION)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}
