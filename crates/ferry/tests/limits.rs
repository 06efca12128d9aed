#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Limits of a running `ferry up`, each with the error a client gets: header size (431) on the
//! proxy, the token service and the Destination Service; body size (413) on the token endpoint,
//! the Destination Service and the admin API; failed logons (429 with `Retry-After`) on the token
//! endpoint, the connector admin API and connector onboarding (HTTP Basic); the handshake
//! timeouts (TLS on the token service, tunnel and connector admin ports; SOCKS5) and the HTTP
//! header-read timeout (proxy, token service, Destination Service). Nothing here measures time:
//! the timeout rows only wait for the server to give up.

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

    // Handshake and header-read timeouts: a client that connects and says nothing, or stops in
    // the middle of its greeting or request head, is dropped (TLS and SOCKS5 handshakes: 10 s;
    // HTTP request heads: 30 s), not kept forever holding one of its address's connection
    // slots. All rows wait at once; each only for the server to give up.
    let admin_url = up
        .banner
        .iter()
        .find(|l| l.contains("connector admin API"))
        .map(|l| l.split_whitespace().nth(3).unwrap().trim_end_matches("/api/v1/configuration").to_owned())
        .unwrap();
    let tunnel_addr = up
        .banner
        .iter()
        .find_map(|l| l.trim().strip_prefix("tunnel endpoint"))
        .map(|a| a.trim().to_owned())
        .expect("tunnel endpoint in the banner");
    let uaa = xsuaa["uaadomain"].as_str().unwrap().to_owned();
    let socks_addr = common::socks_addr(&vcap);
    let admin_addr = host_port(&admin_url);
    let partial_head = b"GET http://erp.virtual:8000/ HTTP/1.1\r\nHost: erp.virtual:8000\r\nX-Slow: ".to_vec();
    let rows: Vec<(&str, String, Vec<u8>)> = vec![
        ("token service HTTPS, silent TLS client", uaa.clone(), vec![]),
        ("token service HTTPS, half a ClientHello", uaa.clone(), vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01]),
        ("tunnel port, silent TLS client", tunnel_addr.clone(), vec![]),
        ("connector admin HTTPS, silent TLS client", admin_addr.clone(), vec![]),
        ("SOCKS5, silent client", socks_addr.clone(), vec![]),
        ("SOCKS5, greeting without its methods", socks_addr.clone(), vec![0x05, 0x02]),
        ("SOCKS5, authentication cut short", socks_addr.clone(), vec![0x05, 0x01, 0x80, 0x01, 0, 0, 0x10, 0]),
        ("HTTP proxy, silent client", proxy_addr.clone(), vec![]),
        (
            "HTTP proxy, idle keep-alive connection after an answered request",
            proxy_addr.clone(),
            b"GET http://erp.virtual:8000/ HTTP/1.1\r\nHost: erp.virtual:8000\r\n\r\n".to_vec(),
        ),
        ("HTTP proxy, request head cut short", proxy_addr.clone(), partial_head.clone()),
        ("destination service, silent client", dest_addr.clone(), vec![]),
        ("destination service, request head cut short", dest_addr.clone(), partial_head.clone()),
        ("token service, request head cut short", token_addr.clone(), partial_head),
    ];
    let waits = rows.into_iter().map(|(what, addr, sent)| async move {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(&sent).await.unwrap();
        let mut buf = [0u8; 1024];
        let mut got = Vec::new();
        // Only a close ends the row: a server that answers and keeps the connection open holds
        // the slot just the same.
        let closed = tokio::time::timeout(Duration::from_secs(90), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
        .is_ok();
        (!closed).then(|| format!("{what}: still connected after 90 s (got {} bytes)", got.len()))
    });
    failures.extend(futures_util::future::join_all(waits).await.into_iter().flatten());

    // Connector onboarding (HTTP Basic with the subaccount user's password) shares the token
    // endpoint's budget of failed logons per address: guesses from 127.0.0.2 are capped (429
    // with Retry-After), after which that address's token requests are refused too, while
    // 127.0.0.1 (the token endpoint rows below) is not affected.
    let sub = xsuaa["tenantid"].as_str().unwrap();
    let guesser = reqwest::Client::builder().local_address(std::net::IpAddr::from([127, 0, 0, 2])).build().unwrap();
    let onboarding = format!("{token_url}/ferry/admin/v1/subaccounts/{sub}/connectors/csr");
    let mut onboard_statuses = Vec::new();
    for _ in 0..40 {
        let r = guesser
            .post(&onboarding)
            .basic_auth("nobody", Some("guess"))
            .json(&json!({"csr": "x"}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        onboard_statuses.push(status);
        if status == 429 {
            let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let body: Value = r.json().await.unwrap();
            if retry.is_none() || !body["message"].as_str().unwrap_or("").contains("too many failed logons") {
                failures.push(format!("onboarding 429 without Retry-After or reason: {retry:?} {body}"));
            }
            break;
        }
    }
    match onboard_statuses.split_last() {
        Some((429, before)) if !before.is_empty() && before.iter().all(|s| *s == 401) => {}
        _ => failures.push(format!("onboarding password guesses: {onboard_statuses:?}")),
    }
    let r = guesser
        .post(format!("{token_url}/oauth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", xsuaa["clientid"].as_str().unwrap()),
            ("client_secret", xsuaa["clientsecret"].as_str().unwrap()),
        ])
        .send()
        .await
        .unwrap();
    if r.status() != 429 {
        failures.push(format!("token endpoint from the address locked by onboarding guesses: {}", r.status()));
    }

    // The connector admin API: five wrong passwords lock the user name (429).
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
