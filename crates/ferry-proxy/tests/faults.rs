#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Fault injection on the data path (proxy → tunnel → connector → backend), with real sockets:
//! a backend that resets mid-response, closes without answering, refuses connections or never
//! answers; the tunnel cut under a streaming HTTP response and under a SOCKS5 stream. Each time
//! the app gets a prompt answer that says what happened (a 5xx naming the backend, or a
//! truncated stream it can detect), nothing hangs, and the process's file descriptors return to
//! where they were.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_connector::{AccessRules, Protocol};
use ferry_testkit::{CuttableRelay, TunnelPair, eventually, open_mapping};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a test must never wait longer for: far above any answer on loopback, there only so that
/// a hang fails the test instead of blocking it.
const HANG: Duration = Duration::from_secs(30);

/// A backend that reads a request head and then does `act` with the socket.
async fn backend<F, Fut>(act: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    listen(true, act).await
}

/// A backend that does `act` with each connection; with `read_head`, after reading a request head.
async fn listen<F, Fut>(read_head: bool, act: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            while read_head && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
            }
            tokio::spawn(act(s));
        }
    });
    addr
}

/// Sends a GET for `url` through the proxy and reads until the proxy closes or `HANG`
/// passes; returns everything received and whether the connection ended (not hung).
async fn fetch(proxy: SocketAddr, token: &str, url: &str) -> (String, bool) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let host = url.split('/').nth(2).unwrap();
    let req = format!(
        "GET {url} HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let ended = tokio::time::timeout(HANG, s.read_to_end(&mut out)).await.is_ok();
    (String::from_utf8_lossy(&out).into_owned(), ended)
}

/// Holds the connection until the peer closes it (never answering anything).
async fn wait_for_close(s: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// This process's resident memory (the proxy and the connector run in it; the file holds one
/// test, so nothing else allocates meanwhile).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn faults_give_prompt_truthful_errors_and_leak_nothing() {
    let pair = TunnelPair::start().await;
    let relay = CuttableRelay::start(pair.tunnel_addr).await;

    // Backends, one per fault.
    let reset = backend(|mut s| async move {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n").await;
        let _ = s.write_all(&[b'x'; 1000]).await;
        // SO_LINGER 0 makes the close a reset, which is the fault under test.
        #[allow(deprecated)]
        let _ = s.set_linger(Some(Duration::ZERO));
        drop(s); // RST, 999000 bytes short
    })
    .await;
    let close = backend(|s| async move { drop(s) }).await;
    let silent = backend(|mut s| async move {
        wait_for_close(&mut s).await;
    })
    .await;
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap() // dropped: nothing listens there
    };
    let streaming = backend(|mut s| async move {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n").await;
        wait_for_close(&mut s).await;
    })
    .await;
    let tcp_open = listen(false, |mut s| async move {
        let _ = s.write_all(b"hello\n").await;
        wait_for_close(&mut s).await;
    })
    .await;
    let rules = AccessRules::new(vec![
        open_mapping("reset.virtual", 80, reset, Protocol::Http),
        open_mapping("close.virtual", 80, close, Protocol::Http),
        open_mapping("silent.virtual", 80, silent, Protocol::Http),
        open_mapping("refused.virtual", 80, refused, Protocol::Http),
        open_mapping("stream.virtual", 80, streaming, Protocol::Http),
        open_mapping("tcp.virtual", 80, tcp_open, Protocol::Tcp),
    ]);
    let mut cfg = pair.connector_config("", rules, relay.addr);
    cfg.backend_response_timeout = Duration::from_secs(2);
    pair.spawn_connector(cfg);
    pair.wait_connected("").await;
    let token = pair.token();
    let baseline = open_fds();
    let rss = rss_kib();

    // Reset mid-response: the app's connection is closed, and what it got cannot pass for a
    // whole answer — nothing at all (the body failed before the head went out), a 502, or a
    // 200 whose body stops short of its Content-Length.
    let (out, ended) = fetch(pair.http_addr, &token, "http://reset.virtual/x").await;
    assert!(ended, "reset: the app's connection hangs");
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    assert!(
        out.is_empty()
            || out.starts_with("HTTP/1.1 502")
            || (out.starts_with("HTTP/1.1 200") && body.len() < 1_000_000),
        "reset: {}",
        out.lines().next().unwrap_or("")
    );
    // Closed without an answer, refused, never answering: 5xx naming the system.
    for (host, want) in [("close.virtual", "502"), ("refused.virtual", "502"), ("silent.virtual", "504")] {
        let (out, ended) = fetch(pair.http_addr, &token, &format!("http://{host}/x")).await;
        assert!(ended, "{host}: the app's connection hangs");
        assert!(out.starts_with(&format!("HTTP/1.1 {want}")), "{host}: {out}");
        assert!(out.contains(host), "{host}: the error names the system: {out}");
    }

    // The tunnel cut under a streaming response: the app's connection ends instead of waiting
    // for the rest of a body that cannot come.
    let mut s = TcpStream::connect(pair.http_addr).await.unwrap();
    s.write_all(
        format!(
            "GET http://stream.virtual/x HTTP/1.1\r\nHost: stream.virtual\r\nProxy-Authorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("first") {
        let n = tokio::time::timeout(HANG, s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "stream ended early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    // The same for a SOCKS5 stream.
    let mut tcp = ferry_client_socks(pair.socks_addr, &token).await;
    relay.cut();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(HANG, s.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "HTTP stream hangs after the tunnel was cut");
    let all = format!("{}{}", String::from_utf8_lossy(&got), String::from_utf8_lossy(&rest));
    assert!(!all.contains("0\r\n\r\n"), "a cut stream must not look complete (final chunk): {all}");
    let ended = tokio::time::timeout(HANG, tcp.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "SOCKS5 stream hangs after the tunnel was cut");
    drop((s, tcp));

    // Everything opened for the faults is closed again (the connector reconnects meanwhile).
    pair.wait_connected("").await;
    eventually!(format!("file descriptors back to {baseline} (now {})", open_fds()), open_fds() <= baseline);
    // Memory near where it was: a margin for allocator caches, far below what a fault that
    // kept its buffers (the 1 MB response, a stream's window) would hold.
    let now = rss_kib();
    assert!(now <= rss + 32 * 1024, "VmRSS {now} KiB, {rss} KiB before the faults");
}

/// A SOCKS5 stream to `tcp.virtual:80` that has read the backend's greeting.
async fn ferry_client_socks(proxy: SocketAddr, token: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let mut msg = vec![5, 1, 0x80, 1];
    msg.extend_from_slice(&(token.len() as u32).to_be_bytes());
    msg.extend_from_slice(token.as_bytes());
    msg.push(0);
    msg.extend_from_slice(&[5, 1, 0, 3, 11]);
    msg.extend_from_slice(b"tcp.virtual");
    msg.extend_from_slice(&80u16.to_be_bytes());
    s.write_all(&msg).await.unwrap();
    let mut head = [0u8; 14];
    tokio::time::timeout(HANG, s.read_exact(&mut head)).await.unwrap().unwrap();
    assert_eq!(&head[..4], &[5, 0x80, 1, 0], "method and auth");
    assert_eq!(head[5], 0, "SOCKS5 connect: {head:?}");
    let mut hello = [0u8; 6];
    tokio::time::timeout(HANG, s.read_exact(&mut hello)).await.unwrap().unwrap();
    assert_eq!(&hello, b"hello\n");
    s
}
