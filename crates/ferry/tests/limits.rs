#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Limits of a running `ferry up`, each with the error a client gets: header size (431) on the
//! proxy, the token service and the Destination Service; body size (413) on the token endpoint,
//! the Destination Service and the admin API; failed logons (429 with `Retry-After`) on the token
//! endpoint and the connector admin API; the TLS handshake timeout. Nothing here measures time:
//! the handshake row only waits for the server to give up.

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `raw` and returns the answer's status code (0 when the server closed without one).
async fn raw_status(addr: &str, raw: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer (and close) before it read everything.
    let _ = s.write_all(raw).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text)
}

fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").trim_start_matches("https://").split('/').next().unwrap().to_owned()
}

#[tokio::test]
async fn every_limit_answers_with_its_status() {
    ferry_core::init_crypto();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = common::LISTEN_ANY.replace("tunnel_port = 0\n", "tunnel_port = 0\nconnector_admin_port = 0\n");
    let (up, vcap) = common::ferry_up(dir, &config);
    let http = ferry_core::tls::http_client(None).unwrap();
    let xsuaa = vcap["xsuaa"][0]["credentials"].clone();
    let dest = &vcap["destination"][0]["credentials"];
    let conn = &vcap["connectivity"][0]["credentials"];
    let token_url = xsuaa["url"].as_str().unwrap().to_owned();
    let token = common::token(dest).await;
    let conn_token = common::token(conn).await;
    let token_addr = host_port(&token_url);
    let dest_addr = host_port(dest["uri"].as_str().unwrap());
    let proxy_addr = format!("127.0.0.1:{}", conn["onpremise_proxy_http_port"].as_str().unwrap());
    let big = "x".repeat(100 * 1024);
    let mut failures = Vec::new();

    // Header size: one 100 KiB header.
    for (what, addr, raw) in [
        (
            "proxy",
            &proxy_addr,
            format!(
                "GET http://erp.virtual:8000/ HTTP/1.1\r\nHost: erp.virtual:8000\r\nProxy-Authorization: Bearer {conn_token}\r\nX-Big: {big}\r\n\r\n"
            ),
        ),
        ("token service", &token_addr, format!("GET /token_keys HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n")),
        (
            "destination service",
            &dest_addr,
            format!(
                "GET /destination-configuration/v1/subaccountDestinations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nX-Big: {big}\r\n\r\n"
            ),
        ),
    ] {
        let (code, text) = raw_status(addr, raw.as_bytes()).await;
        if code != 431 {
            failures.push(format!("{what}, 100 KiB header: {code} {}", text.lines().next().unwrap_or("")));
        }
    }

    // Body size.
    let r = http
        .post(format!("{token_url}/oauth/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("grant_type=client_credentials&pad={}", "x".repeat(200 * 1024)))
        .send()
        .await
        .unwrap();
    if r.status() != 413 {
        failures.push(format!("token endpoint, 200 KiB body: {}", r.status()));
    }
    let api = format!("{}/destination-configuration/v1", dest["uri"].as_str().unwrap());
    let huge = json!({"Name": "big", "Type": "HTTP", "URL": "http://x", "Authentication": "NoAuthentication",
                      "ProxyType": "Internet", "Description": "x".repeat(8 * 1024 * 1024)});
    let r = http.post(format!("{api}/subaccountDestinations")).bearer_auth(&token).json(&huge).send().await;
    match r {
        Ok(r) if r.status() == 413 => {}
        Ok(r) => failures.push(format!("destination service, 8 MiB body: {}", r.status())),
        // The server may close once it answered 413, before reqwest finished sending.
        Err(e) if e.is_request() || e.is_body() => {}
        Err(e) => failures.push(format!("destination service, 8 MiB body: {e}")),
    }
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("data").join("state.json")).unwrap()).unwrap();
    let admin =
        json!({"url": token_url, "clientid": state["admin_client_id"], "clientsecret": state["admin_client_secret"]});
    let admin_token = common::token(&admin).await;
    let r = http
        .post(format!("{token_url}/ferry/admin/v1/subaccounts"))
        .bearer_auth(&admin_token)
        .header("content-type", "application/json")
        .body(format!("{{\"subdomain\": \"{}\"}}", "a".repeat(2 * 1024 * 1024)))
        .send()
        .await;
    match r {
        Ok(r) if r.status() == 413 => {}
        Ok(r) => failures.push(format!("admin API, 2 MiB body: {}", r.status())),
        Err(e) if e.is_request() || e.is_body() => {}
        Err(e) => failures.push(format!("admin API, 2 MiB body: {e}")),
    }

    // The TLS handshake timeout: a client that connects to the HTTPS listener and says nothing
    // is dropped (10 s), not kept forever.
    let uaa = xsuaa["uaadomain"].as_str().unwrap().to_owned();
    let mut silent = tokio::net::TcpStream::connect(&uaa).await.unwrap();
    let mut one = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(60), silent.read(&mut one)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(_)) => failures.push("silent TLS client got bytes".into()),
        Err(_) => failures.push("silent TLS client still connected after 60 s".into()),
    }

    // The connector admin API: five wrong passwords lock the user name (429).
    let admin_url = up
        .banner
        .iter()
        .find(|l| l.contains("connector admin API"))
        .map(|l| l.split_whitespace().nth(3).unwrap().trim_end_matches("/api/v1/configuration").to_owned())
        .unwrap();
    let ui_ca = std::fs::read_to_string(dir.join("data").join("connector").join("ui-ca.pem")).unwrap();
    let https = ferry_core::tls::http_client(Some(&ui_ca)).unwrap();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = https
            .get(format!("{admin_url}/api/monitoring/subaccounts"))
            .basic_auth("Administrator", Some("wrong password"))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    if statuses.last() != Some(&429) {
        failures.push(format!("connector admin logons: {statuses:?}"));
    }

    // The token endpoint: failed logons from one address are capped (429 with Retry-After),
    // for right and wrong secrets alike until the window ends; a tenant's apps elsewhere are
    // not affected (the limit is per address, checked in the unit tests).
    // Guesses at an unknown client id cost no Argon2 and count the same.
    let form = |id: &str, secret: &str| {
        [
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", id.to_owned()),
            ("client_secret", secret.to_owned()),
        ]
    };
    let mut last = 0;
    for _ in 0..40 {
        let r = http.post(format!("{token_url}/oauth/token")).form(&form("sb-guess!t1", "guess")).send().await.unwrap();
        last = r.status().as_u16();
        if last == 429 {
            let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let body: Value = r.json().await.unwrap();
            if retry.is_none() || !body["error_description"].as_str().unwrap_or("").contains("too many failed logons") {
                failures.push(format!("token 429 without Retry-After or reason: {retry:?} {body}"));
            }
            break;
        }
        assert_eq!(last, 401, "a wrong secret is 401 until the limit");
    }
    if last != 429 {
        failures.push(format!("token endpoint after 40 wrong secrets: {last}"));
    }
    let right = xsuaa["clientsecret"].as_str().unwrap();
    let r = http
        .post(format!("{token_url}/oauth/token"))
        .form(&form(xsuaa["clientid"].as_str().unwrap(), right))
        .send()
        .await
        .unwrap();
    if r.status() != 429 {
        failures.push(format!("right secret during the lockout: {}", r.status()));
    }
    assert!(failures.is_empty(), "{} limits wrong:\n{}", failures.len(), failures.join("\n"));
}
