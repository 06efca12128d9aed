#![allow(clippy::unwrap_used, clippy::expect_used)]
//! SIGTERM drain of `ferry up` as a process: the listeners stop accepting at once, an HTTP
//! request in flight through the proxy and tunnel still gets its whole answer, an idle SOCKS5
//! stream is closed instead of holding the exit, and the process exits as soon as that work is
//! done (the measured time is printed, not asserted).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_closes_idle_streams_and_exits() {
    ferry_core::init_crypto();
    let (held_port, mut held) = common::held_backend().await;
    let echo_port = common::tcp_echo().await;
    let tmp = tempfile::tempdir().unwrap();
    let config = format!(
        r#"{listen}
[[connectors]]
[[connectors.mappings]]
virtualHost = "held.virtual"
virtualPort = 8000
localHost = "127.0.0.1"
localPort = {held_port}
protocol = "HTTP"
resources = [{{ path = "/", exactMatchOnly = false }}]
[[connectors.mappings]]
virtualHost = "echo.virtual"
virtualPort = 7000
localHost = "127.0.0.1"
localPort = {echo_port}
protocol = "TCP"
"#,
        listen = common::LISTEN_ANY,
    );
    let (mut up, vcap) = common::ferry_up(tmp.path(), &config);
    let conn = &vcap["connectivity"][0]["credentials"];
    let token = common::token(conn).await;
    let http_proxy = format!("127.0.0.1:{}", conn["onpremise_proxy_http_port"].as_str().unwrap());

    // An idle SOCKS5 stream (it worked once, then nothing moves).
    let mut socks =
        ferry_client::socks5::connect_tcp(common::socks_addr(&vcap), &token, "", "echo.virtual", 7000).await.unwrap();
    socks.write_all(b"ping").await.unwrap();
    let mut four = [0u8; 4];
    socks.read_exact(&mut four).await.unwrap();
    assert_eq!(&four, b"ping");

    // An HTTP request in flight: the backend holds its answer.
    let client = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(format!("http://{http_proxy}"))
                .unwrap()
                .custom_http_auth(format!("Bearer {token}").parse().unwrap()),
        )
        .build()
        .unwrap();
    let in_flight = tokio::spawn(async move {
        let r = client.get("http://held.virtual:8000/slow").send().await?;
        let status = r.status().as_u16();
        Ok::<_, reqwest::Error>((status, r.text().await?))
    });
    let release = held.recv().await.expect("the request reached the backend");

    let signalled = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &up.id().to_string()]).status().unwrap().success());
    // Draining: the proxy accepts no new connection (the listener is closed)...
    let mut refused = false;
    while signalled.elapsed() < Duration::from_secs(10) {
        if TcpStream::connect(&http_proxy).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the HTTP proxy still accepts connections after SIGTERM");
    // ...the idle SOCKS5 stream is closed rather than held open...
    let mut rest = Vec::new();
    let n = socks.read_to_end(&mut rest).await.unwrap_or(0);
    assert_eq!(n, 0, "no stray bytes on the closed stream");
    // ...and the request in flight still gets its whole answer.
    release.send(()).unwrap();
    let (status, body) = in_flight.await.unwrap().expect("the in-flight request was answered");
    assert_eq!((status, body.as_str()), (200, "done"));
    let status = up.wait_exit(Duration::from_secs(20));
    let took = signalled.elapsed();
    assert!(status.success(), "ferry up exited with {status}");
    println!(
        "measured: ferry up exited {took:?} after SIGTERM (in-flight request released at once, drain deadline 10 s)"
    );
}
