#![allow(clippy::unwrap_used, clippy::expect_used)]
//! SIGTERM of a standalone connector (`ferry connector run`), as a process behind `ferry up`'s
//! proxy: a rolling restart (SIGTERM, then a new process) fails no request of a steady stream;
//! the drain lets an open request finish while an idle TCP relay closes at once; and
//! `drain_timeout_seconds` bounds the drain.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use ferry_testkit::EchoBackend;
use ferry_testkit::process::FerryProcess;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a test must never wait longer for: far above any answer on loopback, there only so that
/// a hang fails the test instead of blocking it.
const HANG: Duration = Duration::from_secs(30);

struct Setup {
    _tmp: tempfile::TempDir,
    _up: FerryProcess,
    vcap: Value,
    /// The connector's config file.
    config: PathBuf,
    http_proxy: String,
}

/// `ferry up`, and a connector enrolled for location "plant" with `mappings` (TOML) and `extra`
/// top-level keys in its config file (not started).
fn setup(mappings: &str, extra: &str) -> Setup {
    let (tmp, up, vcap, config) = common::up_and_enrolled_connector(mappings, extra);
    let conn = &vcap["connectivity"][0]["credentials"];
    let http_proxy = format!("http://127.0.0.1:{}", conn["onpremise_proxy_http_port"].as_str().unwrap());
    Setup { _tmp: tmp, _up: up, vcap, config, http_proxy }
}

fn connector(config: &Path) -> FerryProcess {
    FerryProcess::start(
        env!("CARGO_BIN_EXE_ferry"),
        &["connector", "run", "--config", config.to_str().unwrap()],
        &[("FERRY_LOG", "warn")],
        false,
    )
}

fn http_mapping(vhost: &str, port: u16) -> String {
    format!(
        "[[mappings]]\nvirtualHost = \"{vhost}\"\nvirtualPort = 8000\nlocalHost = \"127.0.0.1\"\nlocalPort = {port}\n\
         protocol = \"HTTP\"\nresources = [{{ path = \"/\", exactMatchOnly = false }}]\n"
    )
}

fn proxied(proxy: &str, token: &str, keep_alive: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(proxy).unwrap().custom_http_auth(format!("Bearer {token}").parse().unwrap()));
    if !keep_alive {
        b = b.pool_max_idle_per_host(0);
    }
    b.build().unwrap()
}

async fn get(client: &reqwest::Client, url: &str) -> Result<String, String> {
    let r =
        client.get(url).header("sap-connectivity-scc-location_id", "plant").send().await.map_err(|e| e.to_string())?;
    let status = r.status();
    let text = r.text().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status} {text}"));
    }
    Ok(text)
}

/// Sends SIGTERM to `p` and waits (off the async threads) for it to exit.
async fn terminate(mut p: FerryProcess) {
    let status = tokio::task::spawn_blocking(move || p.terminate()).await.unwrap();
    assert!(status.success(), "{status}");
}

/// A rolling restart of the only connector of a location: SIGTERM (its tunnel drains, the
/// proxy marks it draining and holds new requests), then a new process with the same
/// configuration. Requests sent all the while — sequential on a keep-alive connection and
/// concurrent on new ones — all succeed, without any retry by the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_restarted_with_sigterm_fails_no_request() {
    let echo = EchoBackend::start().await;
    let s = setup(&http_mapping("plant.virtual", echo.addr.port()), "");
    let first = connector(&s.config);
    let token = common::token(&s.vcap["connectivity"][0]["credentials"]).await;
    let probe = proxied(&s.http_proxy, &token, false);
    let mut up = false;
    for _ in 0..400 {
        if get(&probe, "http://plant.virtual:8000/up").await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up, "the connector never served");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = tokio::task::JoinSet::new();
    for client in 0..4 {
        let (stop, done) = (stop.clone(), done.clone());
        let http = proxied(&s.http_proxy, &token, client == 0);
        load.spawn(async move {
            let mut failures = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                match get(&http, &format!("http://plant.virtual:8000/{client}/{n}")).await {
                    Ok(body) if body.contains(&format!("/{client}/{n}")) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(body) => failures.push(format!("wrong answer: {body}")),
                    Err(e) => failures.push(e),
                }
            }
            failures
        });
    }
    let flowing = |at_least: usize| {
        let done = done.clone();
        async move {
            let deadline = std::time::Instant::now() + HANG;
            while done.load(Ordering::Relaxed) < at_least {
                assert!(std::time::Instant::now() < deadline, "requests stopped flowing");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    flowing(done.load(Ordering::Relaxed) + 50).await;
    let t0 = std::time::Instant::now();
    terminate(first).await;
    let exited = t0.elapsed();
    let at_exit = done.load(Ordering::Relaxed);
    let config = s.config.clone();
    let _second = tokio::task::spawn_blocking(move || connector(&config)).await.unwrap();
    let ready = t0.elapsed();
    flowing(at_exit + 50).await;
    eprintln!(
        "measured: old connector exited {exited:?} after SIGTERM, new one ready at {ready:?}, serving by {:?}",
        t0.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    while let Some(r) = load.join_next().await {
        failures.extend(r.unwrap());
    }
    assert!(failures.is_empty(), "{} of {} failed: {failures:#?}", failures.len(), done.load(Ordering::Relaxed));
}

/// SIGTERM with a long drain deadline: an idle TCP relay is closed at once while an HTTP request
/// in flight is still being waited for, and that request then gets its whole answer. (Before,
/// the relay held the drain until a fixed 10 s deadline cut both.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_relays_at_once_and_lets_open_requests_finish() {
    let (held_port, mut held) = common::held_backend().await;
    let echo_port = common::tcp_echo().await;
    let mappings = format!(
        "{}[[mappings]]\nvirtualHost = \"echo.virtual\"\nvirtualPort = 7000\nlocalHost = \"127.0.0.1\"\n\
         localPort = {echo_port}\nprotocol = \"TCP\"\n",
        http_mapping("held.virtual", held_port)
    );
    let s = setup(&mappings, "drain_timeout_seconds = 3600");
    let c = connector(&s.config);
    let token = common::token(&s.vcap["connectivity"][0]["credentials"]).await;
    let socks = common::socks_addr(&s.vcap);
    let mut relay = None;
    for _ in 0..400 {
        if let Ok(r) = ferry_client::socks5::connect_tcp(&socks, &token, "plant", "echo.virtual", 7000).await {
            relay = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut relay = relay.expect("the connector never served");
    relay.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    relay.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");

    let http = proxied(&s.http_proxy, &token, false);
    let request = tokio::spawn(async move { get(&http, "http://held.virtual:8000/slow").await });
    let release = tokio::time::timeout(HANG, held.recv()).await.unwrap().unwrap();

    let pid = c.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // The idle relay ends (EOF or reset) while the request is still held.
    let ended = tokio::time::timeout(HANG, relay.read(&mut b)).await.expect("the idle relay was not closed");
    assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
    assert!(!request.is_finished());
    release.send(()).unwrap();
    let answer = tokio::time::timeout(HANG, request).await.unwrap().unwrap();
    assert_eq!(answer.unwrap(), "done");
    let mut c = c;
    let status = tokio::task::spawn_blocking(move || c.wait_exit(HANG)).await.unwrap();
    assert!(status.success(), "{status}");
}

/// `drain_timeout_seconds` bounds the drain: a request its backend never answers is cut at the
/// deadline (the app gets an error answer, not a hang) and the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_cuts_what_is_still_open() {
    let (held_port, mut held) = common::held_backend().await;
    let s = setup(&http_mapping("held.virtual", held_port), "drain_timeout_seconds = 1");
    let mut c = connector(&s.config);
    let token = common::token(&s.vcap["connectivity"][0]["credentials"]).await;
    let http = proxied(&s.http_proxy, &token, false);
    let request = tokio::spawn(async move {
        loop {
            match get(&http, "http://held.virtual:8000/never").await {
                Err(e) if e.starts_with("503") => tokio::time::sleep(Duration::from_millis(25)).await,
                other => return other,
            }
        }
    });
    let _never = tokio::time::timeout(HANG, held.recv()).await.unwrap().unwrap();
    let status = tokio::task::spawn_blocking(move || c.terminate()).await.unwrap();
    assert!(status.success(), "{status}");
    let answer = tokio::time::timeout(HANG, request).await.unwrap().unwrap();
    let e = answer.expect_err("the held request cannot have succeeded");
    assert!(e.starts_with("502"), "{e}");
}
