#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Fault injection across processes, with the leak check on the server process: a standalone
//! connector (`ferry connector run`) killed with SIGKILL while an HTTP response and a SOCKS5
//! relay stream through it, and remote token endpoints that are down, reset the connection or
//! never answer, behind `ferry up`'s Destination Service. Each time the app gets a prompt answer
//! that says what happened, nothing hangs, and `ferry up`'s file descriptors (`/proc/<pid>/fd`,
//! without its connections to itself) return to their baseline while its memory (VmRSS) stays
//! within a margin of it. The settle
//! loops are bounded by a count of polls; nothing here asserts a duration.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use ferry_testkit::EchoBackend;
use ferry_testkit::process::FerryProcess;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a test must never wait longer for: far above any answer on loopback (and above the
/// token fetch timeout of 10 s), there only so that a hang fails the test instead of blocking it.
const HANG: Duration = Duration::from_secs(60);
/// How much VmRSS may grow over the baseline after the faults (allocator caches, lazily grown
/// pools); a leak per fault times the rounds below exceeds it.
const RSS_MARGIN_KIB: u64 = 32 * 1024;

/// `pid`'s open file descriptors, without its TCP connections to itself (`ferry up`'s own
/// connector holds a tunnel, and on first use a channel connection, to its own proxy; they come
/// and go with reconnects and heartbeats, not with the faults). A socket is such a connection
/// when its remote address is the local address of another socket the process holds. SQLite
/// database files are left out too (see below).
fn fd_count(pid: u32) -> usize {
    let held: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok().map(|l| l.display().to_string()))
        .collect();
    let mut sockets = std::collections::HashMap::new(); // inode → (local, remote)
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 {
                sockets.insert(format!("socket:[{}]", cols[9]), (cols[1].to_owned(), cols[2].to_owned()));
            }
        }
    }
    let locals: std::collections::HashSet<&str> =
        held.iter().filter_map(|h| sockets.get(h)).map(|(local, _)| local.as_str()).collect();
    held.iter()
        .filter(|h| !sockets.get(*h).is_some_and(|(_, remote)| locals.contains(remote.as_str())))
        // SQLite files: the connections of the stores' bounded pools, opened lazily as the
        // load first needs them (a connection opens its `-wal` file on first use).
        .filter(|h| !(h.ends_with(".db") || h.ends_with(".db-wal") || h.ends_with(".db-shm")))
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Waits (a bounded number of polls) for `pid`'s descriptors to be back at `fds`, then checks
/// its memory against `rss`.
async fn assert_no_leak(what: &str, pid: u32, (fds, rss): (usize, u64)) {
    let mut now = fd_count(pid);
    for _ in 0..600 {
        if now <= fds {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = fd_count(pid);
    }
    if now > fds {
        // What is open (sockets with their inodes, to look up in /proc/net/tcp), for the report.
        let open: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok().map(|l| l.display().to_string()))
            .collect();
        let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
        panic!("{what}: ferry up holds {now} file descriptors, {fds} before the faults: {open:?}\n{tcp}");
    }
    let mem = rss_kib(pid);
    eprintln!("{what}: fds {now} (baseline {fds}), VmRSS {mem} KiB (baseline {rss} KiB)");
    assert!(mem <= rss + RSS_MARGIN_KIB, "{what}: VmRSS {mem} KiB, {rss} KiB before the faults");
}

/// `pid`'s descriptor count once it stopped changing (the server closing the connections of
/// the calls just answered): the same count over 10 polls in a row, at most 200 polls.
async fn settled_fds(pid: u32) -> usize {
    let (mut last, mut same) = (fd_count(pid), 0);
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = fd_count(pid);
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if same == 10 {
            break;
        }
    }
    last
}

/// A backend that answers every request head with the start of a chunked body and then holds
/// the connection open until the peer closes it.
async fn streaming_backend() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n").await;
                while let Ok(n) = s.read(&mut b).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A TCP echo server.
async fn tcp_echo() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// Sends a GET through the HTTP proxy on a raw connection and returns it once the response
/// head and the first chunk arrived, with what was read so far.
async fn open_stream(proxy: &str, token: &str) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let req = format!(
        "GET http://stream.virtual:8000/x HTTP/1.1\r\nHost: stream.virtual:8000\r\nProxy-Authorization: Bearer {token}\r\n\
         SAP-Connectivity-SCC-Location_ID: plant\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("first") {
        let n = tokio::time::timeout(HANG, s.read(&mut buf)).await.expect("no first chunk").unwrap();
        assert!(n > 0, "stream ended early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    (s, got)
}

/// Reads until the peer closes (or resets); panics on a hang.
async fn read_until_closed(what: &str, s: &mut TcpStream, got: &mut Vec<u8>) {
    let mut buf = [0u8; 1024];
    let ended = tokio::time::timeout(HANG, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "{what}: the app's connection hangs");
}

/// `ferry up` and a connector enrolled for location "plant" (config written, not started).
fn setup(mappings: &str) -> (tempfile::TempDir, FerryProcess, Value, PathBuf) {
    common::up_and_enrolled_connector(mappings, "")
}

fn connector(config: &std::path::Path) -> FerryProcess {
    FerryProcess::start(
        env!("CARGO_BIN_EXE_ferry"),
        &["connector", "run", "--config", config.to_str().unwrap()],
        &[("FERRY_LOG", "warn")],
        false,
    )
}

/// A connector killed with SIGKILL (no drain, no GOAWAY: the kernel closes its sockets) while a
/// streaming HTTP response and a SOCKS5 relay run through it: both app connections end at once
/// and the HTTP one cannot pass for a complete response; the next request is the proxy's 503
/// naming the missing connector; a new connector process serves again. Five rounds, then
/// `ferry up` (the proxy) is back at its descriptors and near its memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_killed_mid_stream_ends_its_streams_at_once_and_the_proxy_leaks_nothing() {
    let (stream_port, echo_port) = (streaming_backend().await, tcp_echo().await);
    let echo = EchoBackend::start().await;
    let mappings = format!(
        "[[mappings]]\nvirtualHost = \"stream.virtual\"\nvirtualPort = 8000\nlocalHost = \"127.0.0.1\"\n\
         localPort = {stream_port}\nprotocol = \"HTTP\"\nresources = [{{ path = \"/\", exactMatchOnly = false }}]\n\
         [[mappings]]\nvirtualHost = \"echo.virtual\"\nvirtualPort = 8000\nlocalHost = \"127.0.0.1\"\n\
         localPort = {}\nprotocol = \"HTTP\"\nresources = [{{ path = \"/\", exactMatchOnly = false }}]\n\
         [[mappings]]\nvirtualHost = \"tcp.virtual\"\nvirtualPort = 7000\nlocalHost = \"127.0.0.1\"\n\
         localPort = {echo_port}\nprotocol = \"TCP\"\n",
        echo.addr.port()
    );
    let (_tmp, up, vcap, config) = setup(&mappings);
    let conn = &vcap["connectivity"][0]["credentials"];
    let proxy = format!("127.0.0.1:{}", conn["onpremise_proxy_http_port"].as_str().unwrap());
    let socks = common::socks_addr(&vcap);
    let token = common::token(conn).await;
    let http = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(format!("http://{proxy}"))
                .unwrap()
                .custom_http_auth(format!("Bearer {token}").parse().unwrap()),
        )
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let get = |http: reqwest::Client| async move {
        let r = http
            .get("http://echo.virtual:8000/probe")
            .header("sap-connectivity-scc-location_id", "plant")
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let mut baseline = None;
    for round in 0..5 {
        let c = connector(&config);
        let mut served = false;
        for _ in 0..400 {
            if get(http.clone()).await.0 == 200 {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(served, "round {round}: the connector never served");
        // Round 0 warms up pools and caches; the baseline is taken in round 1 with the tunnel
        // up and no app connection open, so the end state (no tunnel) must be below it.
        if round == 1 {
            baseline = Some((settled_fds(up.id()).await, rss_kib(up.id())));
        }
        let (mut stream, mut got) = open_stream(&proxy, &token).await;
        let mut relay = ferry_client::socks5::connect_tcp(&socks, &token, "plant", "tcp.virtual", 7000).await.unwrap();
        relay.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        tokio::time::timeout(HANG, relay.read_exact(&mut pong)).await.unwrap().unwrap();
        assert_eq!(&pong, b"ping");

        let _ = c.kill_and_collect(); // SIGKILL
        read_until_closed("HTTP stream", &mut stream, &mut got).await;
        let text = String::from_utf8_lossy(&got);
        assert!(!text.contains("0\r\n\r\n"), "round {round}: a cut stream must not look complete: {text}");
        let mut rest = Vec::new();
        read_until_closed("SOCKS5 relay", &mut relay, &mut rest).await;
        drop((stream, relay));

        // The proxy notices the dead tunnel: the next request is its 503, not a hang.
        let (status, body) = tokio::time::timeout(HANG, get(http.clone())).await.expect("request after the kill hangs");
        assert_eq!(status, 503, "round {round}: {body}");
        assert!(body.contains("No Cloud Connector is connected"), "round {round}: {body}");
    }
    assert_no_leak("connector killed mid-stream", up.id(), baseline.unwrap()).await;
}

/// A listener that does `act` with every accepted connection.
async fn token_endpoint<F, Fut>(act: F) -> String
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(act(s));
        }
    });
    format!("http://{addr}/oauth/token")
}

/// Remote token endpoints of OAuth2ClientCredentials destinations that are down (nothing
/// listens), reset the connection after the request, or never answer: the find call answers
/// 200 with an error entry that names the token service and what went wrong (the SDK's shape),
/// the silent one after the token fetch timeout (10 s) instead of hanging. Several rounds, at
/// once; then `ferry up`'s descriptors are back at the baseline and its memory near it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoints_down_reset_or_silent_give_error_entries_and_leak_nothing() {
    ferry_core::init_crypto();
    let tmp = tempfile::tempdir().unwrap();
    let (up, vcap) = common::ferry_up(tmp.path(), common::LISTEN_ANY);
    let dest = &vcap["destination"][0]["credentials"];
    let api = format!("{}/destination-configuration/v1", dest["uri"].as_str().unwrap());
    let t = common::token(dest).await;
    // No idle connections kept: the baseline must not depend on how many the pool holds.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();

    let down = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}/oauth/token", l.local_addr().unwrap()) // dropped: nothing listens
    };
    let reset = token_endpoint(|mut s| async move {
        let mut b = [0u8; 4096];
        let _ = s.read(&mut b).await;
        // SO_LINGER 0 makes the close a reset, which is the fault under test.
        #[allow(deprecated)]
        let _ = s.set_linger(Some(Duration::ZERO));
    })
    .await;
    let silent = token_endpoint(|mut s| async move {
        let mut b = [0u8; 4096];
        while let Ok(n) = s.read(&mut b).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let cases = [
        ("down", down, "cannot reach token service"),
        ("reset", reset, ""),
        ("silent", silent, "did not answer within"),
    ];
    for (name, url, _) in &cases {
        let d = json!({"Name": name, "Type": "HTTP", "URL": "https://backend.example", "ProxyType": "Internet",
            "Authentication": "OAuth2ClientCredentials", "tokenServiceURL": url, "clientId": "c", "clientSecret": "s"});
        let r = http.post(format!("{api}/subaccountDestinations")).bearer_auth(&t).json(&d).send().await.unwrap();
        assert_eq!(r.status(), 201, "{name}: {}", r.text().await.unwrap());
    }
    let find = |name: &'static str| {
        let (http, url, t) = (http.clone(), format!("{api}/destinations/{name}"), t.clone());
        async move {
            let r = tokio::time::timeout(HANG, http.get(url).bearer_auth(t).send())
                .await
                .unwrap_or_else(|_| panic!("find {name} hangs"))
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let mut baseline = None;
    for round in 0..4 {
        let mut calls = Vec::new();
        for _ in 0..4 {
            for name in ["down", "reset", "silent"] {
                calls.push(tokio::spawn(find(name)));
            }
        }
        for (i, call) in calls.into_iter().enumerate() {
            let (name, url, want) = &cases[i % 3];
            let (status, body) = call.await.unwrap();
            assert_eq!(status, 200, "round {round}, {name}: {body}");
            let entry = &body["authTokens"][0];
            assert_eq!((entry["type"].as_str(), entry["value"].as_str()), (Some(""), Some("")), "{name}: {body}");
            let error = entry["error"].as_str().unwrap_or_else(|| panic!("{name}: no error entry: {body}"));
            assert!(error.contains(url.as_str()) && error.contains(want), "round {round}, {name}: {error}");
        }
        if round == 0 {
            baseline = Some((settled_fds(up.id()).await, rss_kib(up.id())));
        }
    }
    assert_no_leak("token endpoints down, reset, silent", up.id(), baseline.unwrap()).await;
}
