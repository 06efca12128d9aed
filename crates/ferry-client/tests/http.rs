#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `HttpClient` against a real HTTP/1.1 backend on 127.0.0.1 that misbehaves on purpose: retries
//! with backoff for idempotent requests only, and a CSRF token that goes stale once. The full
//! chain through `ferry up` is tested in `crates/ferry/tests/client.rs`.

use std::sync::{Arc, Mutex};

use ferry_client::{Bindings, Client, HttpClient, HttpOptions, Request};
use reqwest::Method;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// What the backend saw: `METHOD path x-csrf-token cookie authorization`, one line per request.
type Log = Arc<Mutex<Vec<String>>>;

/// A backend: `GET /flaky` answers 503 twice, then 200; `POST /flaky` always 503; HEAD hands out
/// CSRF tokens `t1`, `t2`, …; `POST /items` accepts only the newest token (and refuses `t1`
/// with `x-csrf-token: Required`, as an expired session would); anything else 200.
async fn backend() -> (u16, Log) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let log: Log = Arc::default();
    let seen = log.clone();
    tokio::spawn(async move {
        let counters = Arc::new(Mutex::new((0u32, 0u32)));
        while let Ok((stream, _)) = listener.accept().await {
            stream.set_nodelay(true).unwrap();
            let (log, counters) = (seen.clone(), counters.clone());
            tokio::spawn(async move {
                let mut r = BufReader::new(stream);
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap().to_owned(), parts.next().unwrap().to_owned());
                let mut headers = std::collections::HashMap::new();
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).await.unwrap();
                    let Some((k, v)) = h.trim_end().split_once(':') else { break };
                    headers.insert(k.to_ascii_lowercase(), v.trim().to_owned());
                }
                let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
                let mut body = vec![0; len];
                r.read_exact(&mut body).await.unwrap();
                let h = |k: &str| headers.get(k).cloned().unwrap_or_default();
                log.lock().unwrap().push(format!(
                    "{method} {path} {} {} {}",
                    h("x-csrf-token"),
                    h("cookie"),
                    h("authorization")
                ));
                let (status, extra) = {
                    let mut c = counters.lock().unwrap();
                    match (method.as_str(), path.as_str()) {
                        ("GET", "/flaky") => {
                            c.0 += 1;
                            if c.0 <= 2 { (503, String::new()) } else { (200, String::new()) }
                        }
                        ("POST", "/flaky") => (503, String::new()),
                        ("HEAD", _) => {
                            c.1 += 1;
                            (200, format!("x-csrf-token: t{}\r\nset-cookie: sid=s{}; Path=/\r\n", c.1, c.1))
                        }
                        ("POST", "/items") => {
                            let newest = format!("t{}", c.1);
                            if h("x-csrf-token") == newest && newest != "t1" && h("cookie") == format!("sid=s{}", c.1) {
                                (201, String::new())
                            } else {
                                (403, "x-csrf-token: Required\r\n".to_owned())
                            }
                        }
                        _ => (200, String::new()),
                    }
                };
                let resp = format!("HTTP/1.1 {status} X\r\n{extra}content-length: 0\r\nconnection: close\r\n\r\n");
                let _ = r.get_mut().write_all(resp.as_bytes()).await;
            });
        }
    });
    (port, log)
}

/// A client whose only destination is the env destination `app` (SDK-shaped, Basic).
fn client_for(port: u16) -> (Client, HttpClient) {
    let dir = std::env::temp_dir().join(format!("ferry-client-http-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("default-env.json");
    let env = serde_json::json!({"destinations": [
        {"name": "app", "url": format!("http://127.0.0.1:{port}"), "username": "u", "password": "p"}
    ]});
    std::fs::write(&file, env.to_string()).unwrap();
    let bindings = Bindings::from_default_env_file(&file).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let client = Client::new(bindings, None).unwrap();
    let options = HttpOptions { backoff: std::time::Duration::from_millis(1), ..Default::default() };
    let http = HttpClient::new(client.clone(), options).unwrap();
    (client, http)
}

#[tokio::test]
async fn idempotent_requests_are_retried_and_others_are_not() {
    ferry_core::init_crypto();
    let (port, log) = backend().await;
    let (client, http) = client_for(port);
    let app = client.get_destination("app", &Default::default()).await.unwrap();
    assert_eq!(http.get(&app, "/flaky").await.unwrap().status(), 200);
    assert_eq!(log.lock().unwrap().len(), 3, "two 503s, then the answer");
    assert!(log.lock().unwrap().iter().all(|l| l.ends_with("Basic dTpw")), "{:?}", log.lock().unwrap());

    log.lock().unwrap().clear();
    let post = Request { csrf: false, ..Request::new(Method::POST, "/flaky") };
    assert_eq!(http.send(&app, post).await.unwrap().status(), 503);
    assert_eq!(log.lock().unwrap().len(), 1, "a POST is not repeated");
}

#[tokio::test]
async fn a_stale_csrf_token_is_fetched_again_once() {
    ferry_core::init_crypto();
    let (port, log) = backend().await;
    let (client, http) = client_for(port);
    let app = client.get_destination("app", &Default::default()).await.unwrap();
    let r = http.send(&app, Request::new(Method::POST, "/items").body("x")).await.unwrap();
    assert_eq!(r.status(), 201);
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log.iter().map(|l| l.split(' ').take(4).collect::<Vec<_>>().join(" ")).collect::<Vec<_>>(),
        ["HEAD /items/ Fetch ", "POST /items t1 sid=s1", "HEAD /items/ Fetch ", "POST /items t2 sid=s2"],
        "{log:?}"
    );
}
