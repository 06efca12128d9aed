//! Loopback benchmarks of the data path (app → proxy → TLS/HTTP2 tunnel → connector → backend),
//! each next to the same measurement without Ferry in between (direct TCP), taken in the same
//! run so the ratio is meaningful on whatever machine runs it.
//!
//! `cargo run --release -p ferry-bench -- --secs 5`

use std::net::SocketAddr;

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use ferry_connector::{AccessRules, Protocol};
use ferry_testkit::{TunnelPair, open_mapping};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod find;
mod tokens;

#[derive(Parser)]
struct Args {
    /// What to measure: `data-path` (proxy, tunnel, connector), `tokens` (issue, verify) or
    /// `find` (the Destination Service's find API next to nginx).
    #[arg(default_value = "data-path")]
    what: String,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Concurrent keep-alive connections for the HTTP measurement.
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Skip the bulk measurements (e.g. to profile the HTTP path alone).
    #[arg(long)]
    http_only: bool,
    /// Tunnel connections between connector and proxy.
    #[arg(long, default_value_t = 1)]
    tunnels: usize,
    /// Workers for the connection-setup measurements (a new TCP connection per request).
    #[arg(long, default_value_t = 16)]
    setup_conns: usize,
}

/// A TCP sink that discards everything.
async fn sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    a
}

/// An HTTP/1.1 server answering every request with 1 KiB.
async fn origin() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    let body = Bytes::from(vec![b'x'; 1024]);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    a
}

async fn blast(mut s: TcpStream, secs: u64) -> f64 {
    let buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut n: u64 = 0;
    while Instant::now() < deadline {
        if s.write_all(&buf).await.is_err() {
            break;
        }
        n += buf.len() as u64;
    }
    let _ = s.shutdown().await;
    n as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

async fn socks_connect(proxy: SocketAddr, token: &str, host: &str, port: u16) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.expect("connect proxy");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(&[5, 1, 0x80]).await.expect("greeting");
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel).await.expect("method");
    let mut auth = vec![1];
    auth.extend_from_slice(&(token.len() as u32).to_be_bytes());
    auth.extend_from_slice(token.as_bytes());
    auth.push(0);
    s.write_all(&auth).await.expect("auth");
    let mut ar = [0u8; 2];
    s.read_exact(&mut ar).await.expect("auth reply");
    assert_eq!(ar, [1, 0], "SOCKS5 authentication failed");
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.expect("connect");
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await.expect("reply");
    assert_eq!(rep[1], 0, "SOCKS5 CONNECT refused");
    s
}

struct HttpResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `conns` keep-alive connections, each sending GETs back to back for `secs`.
async fn http_load(
    addr: SocketAddr,
    uri: String,
    headers: Vec<(String, String)>,
    conns: usize,
    secs: u64,
) -> HttpResult {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let uri = uri.clone();
        let headers = headers.clone();
        tasks.push(tokio::spawn(async move {
            let s = TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).expect("nodelay");
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.expect("handshake");
            tokio::spawn(conn);
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let mut b = http::Request::get(uri.as_str()).header("host", "origin.virtual:80");
                for (k, v) in &headers {
                    b = b.header(k.as_str(), v.as_str());
                }
                let t = Instant::now();
                let resp = tx.send_request(b.body(Empty::<Bytes>::new()).expect("request")).await.expect("response");
                assert_eq!(resp.status(), 200);
                let _ = resp.into_body().collect().await.expect("body");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    HttpResult { rps: all.len() as f64 / elapsed, p50_ms: pct(0.50), p99_ms: pct(0.99) }
}

/// Connection setup: `conns` workers, each opening a new TCP connection for every request
/// (HTTP/1.1 with `connection: close`, through the HTTP proxy when `proxied`), for `secs`.
/// Returns connections (= requests) per second.
async fn setup_http(addr: SocketAddr, uri: String, headers: Vec<(String, String)>, conns: usize, secs: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (uri, headers) = (uri.clone(), headers.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let s = TcpStream::connect(addr).await.expect("connect");
                s.set_nodelay(true).expect("nodelay");
                let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.expect("handshake");
                tokio::spawn(conn);
                let mut b =
                    http::Request::get(uri.as_str()).header("host", "origin.virtual:80").header("connection", "close");
                for (k, v) in &headers {
                    b = b.header(k.as_str(), v.as_str());
                }
                let resp = tx.send_request(b.body(Empty::<Bytes>::new()).expect("request")).await.expect("response");
                assert_eq!(resp.status(), 200);
                let _ = resp.into_body().collect().await.expect("body");
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// Connection setup through SOCKS5: a new SOCKS5 connection (method 0x80, token) and tunnel
/// stream per request, one HTTP/1.1 GET with `connection: close` to the origin over it, read to
/// EOF; `via` None = the same without the proxy (direct TCP to the origin).
async fn setup_socks(via: Option<(SocketAddr, String)>, origin: SocketAddr, conns: usize, secs: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let via = via.clone();
        tasks.push(tokio::spawn(async move {
            let (mut n, mut buf) = (0u64, Vec::with_capacity(4096));
            while Instant::now() < deadline {
                let mut s = match &via {
                    Some((proxy, token)) => socks_connect(*proxy, token, "origin-tcp.virtual", 81).await,
                    None => {
                        let s = TcpStream::connect(origin).await.expect("connect");
                        s.set_nodelay(true).expect("nodelay");
                        s
                    }
                };
                s.write_all(b"GET /1k HTTP/1.1\r\nhost: origin\r\nconnection: close\r\n\r\n").await.expect("write");
                buf.clear();
                s.read_to_end(&mut buf).await.expect("read");
                assert!(buf.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf));
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.what.as_str() {
        "tokens" => return tokens::run(args.secs).await,
        "find" => return find::run(args.secs, args.conns, args.reps).await,
        "data-path" => {}
        other => anyhow::bail!("unknown benchmark {other:?}: use data-path, tokens or find"),
    }
    let sink = sink().await;
    let origin = origin().await;
    let pair = TunnelPair::start().await;

    let rules = AccessRules::new(vec![
        open_mapping("sink.virtual", 9, sink, Protocol::Tcp),
        open_mapping("origin.virtual", 80, origin, Protocol::Http),
        open_mapping("origin-tcp.virtual", 81, origin, Protocol::Tcp),
    ]);
    pair.connector_with("", rules, pair.tunnel_addr, args.tunnels);
    pair.wait_connected("").await;
    let token = pair.token();

    let (mut bulk_direct, mut bulk_ferry) = (Vec::new(), Vec::new());
    let (mut http_direct, mut http_ferry) = (Vec::new(), Vec::new());
    let (mut setup_direct, mut setup_ferry_http, mut setup_ferry_socks) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..args.reps {
        eprintln!("rep {}/{}", rep + 1, args.reps);
        if args.http_only {
            bulk_direct.push(f64::NAN);
            bulk_ferry.push(f64::NAN);
        } else {
            let s = TcpStream::connect(sink).await?;
            s.set_nodelay(true)?;
            bulk_direct.push(blast(s, args.secs).await);
            let s = socks_connect(pair.socks_addr, &token, "sink.virtual", 9).await;
            bulk_ferry.push(blast(s, args.secs).await);
        }
        http_direct.push(http_load(origin, "/1k".into(), Vec::new(), args.conns, args.secs).await);
        http_ferry.push(
            http_load(
                pair.http_addr,
                "http://origin.virtual:80/1k".into(),
                vec![("proxy-authorization".into(), format!("Bearer {token}"))],
                args.conns,
                args.secs,
            )
            .await,
        );
        setup_direct.push(setup_socks(None, origin, args.setup_conns, args.secs).await);
        setup_ferry_http.push(
            setup_http(
                pair.http_addr,
                "http://origin.virtual:80/1k".into(),
                vec![("proxy-authorization".into(), format!("Bearer {token}"))],
                args.setup_conns,
                args.secs,
            )
            .await,
        );
        setup_ferry_socks
            .push(setup_socks(Some((pair.socks_addr, token.clone())), origin, args.setup_conns, args.secs).await);
    }
    let bd = median(bulk_direct);
    let bf = median(bulk_ferry);
    let rd = median(http_direct.iter().map(|r| r.rps).collect());
    let rf = median(http_ferry.iter().map(|r| r.rps).collect());
    let p99d = median(http_direct.iter().map(|r| r.p99_ms).collect());
    let p99f = median(http_ferry.iter().map(|r| r.p99_ms).collect());
    let p50f = median(http_ferry.iter().map(|r| r.p50_ms).collect());
    println!("| scenario | direct (anchor) | through Ferry | ratio |");
    println!("|---|---|---|---|");
    println!("| bulk, 1 stream (SOCKS5 → tunnel → sink) | {bd:.2} Gbit/s | {bf:.2} Gbit/s | {:.2} |", bf / bd);
    println!(
        "| HTTP 1 KiB, {} conns (HTTP proxy → tunnel → origin) | {rd:.0} req/s | {rf:.0} req/s | {:.2} |",
        args.conns,
        rf / rd
    );
    println!("| HTTP p99 latency | {p99d:.2} ms | {p99f:.2} ms (p50 {p50f:.2} ms) | {:.2} |", p99f / p99d.max(1e-9));
    let sd = median(setup_direct);
    let (sh, ss) = (median(setup_ferry_http), median(setup_ferry_socks));
    println!(
        "| new connection per request, {} workers: HTTP proxy → tunnel → origin | {sd:.0} conn/s | {sh:.0} conn/s | {:.2} |",
        args.setup_conns,
        sh / sd
    );
    println!(
        "| new connection per request, {} workers: SOCKS5 (0x80) → tunnel stream → new backend connection | {sd:.0} conn/s | {ss:.0} conn/s | {:.2} |",
        args.setup_conns,
        ss / sd
    );
    println!(
        "({} s per measurement, median of {} reps, load generator and servers on the same cores)",
        args.secs, args.reps
    );
    drop(pair);
    Ok(())
}
