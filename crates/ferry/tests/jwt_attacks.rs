#![allow(clippy::unwrap_used, clippy::expect_used)]
//! JWT attacks against every entry point of a running `ferry up` that takes a token: the
//! Destination Service (401), the HTTP proxy (407), the SOCKS5 port (auth status ≠ 0), the token
//! service's jwt-bearer grant, the directory admin API, and the connector's principal
//! propagation (a user token the connector verifies itself; 403). An external OpenID provider
//! served by the test (its keys the test holds) is trusted too, so that the time, issuer,
//! audience and tenant rows carry valid signatures and fail only for the claim they test. The
//! header-injection rows (jku, x5u, jwk) point at an attacker server that must see no request.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ferry_testkit::EchoBackend;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn now() -> u64 {
    ferry_testkit::now()
}

fn b64json(v: &Value) -> String {
    B64URL.encode(v.to_string())
}

/// An RSA key the test signs arbitrary JOSE headers with.
struct TestKey(KeyPair);

impl TestKey {
    fn new() -> Self {
        Self(KeyPair::generate(KeySize::Rsa2048).unwrap())
    }
    fn jwk(&self, kid: &str) -> Value {
        let c = PublicKeyComponents::<Vec<u8>>::from(self.0.public_key());
        json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": B64URL.encode(&c.n), "e": B64URL.encode(&c.e)})
    }
    fn sign(&self, header: &Value, payload: &Value) -> String {
        let input = format!("{}.{}", b64json(header), b64json(payload));
        let mut sig = vec![0; self.0.public_modulus_len()];
        self.0.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), input.as_bytes(), &mut sig).unwrap();
        format!("{input}.{}", B64URL.encode(sig))
    }
}

fn hs256(secret: &[u8], header: &Value, payload: &Value) -> String {
    let input = format!("{}.{}", b64json(header), b64json(payload));
    let tag = aws_lc_rs::hmac::sign(&aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret), input.as_bytes());
    format!("{input}.{}", B64URL.encode(tag.as_ref()))
}

fn part(jwt: &str, i: usize) -> Value {
    serde_json::from_slice(&B64URL.decode(jwt.split('.').nth(i).unwrap()).unwrap()).unwrap()
}

/// A tiny HTTP server answering GETs from a path → JSON table, counting every request.
async fn json_server(routes: Arc<std::sync::Mutex<Vec<(String, Value)>>>) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let count = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let routes = routes.clone();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let found = routes.lock().unwrap().iter().find(|(p, _)| *p == path).map(|(_, v)| v.to_string());
                let (status, body) = match found {
                    Some(b) => ("200 OK", b),
                    None => ("404 Not Found", "{}".to_owned()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (addr, hits)
}

/// What each entry point answered to one token.
#[derive(Debug, PartialEq)]
struct Answers {
    destination: u16,
    proxy: u16,
    socks5: bool,
    jwt_bearer: u16,
    admin: u16,
    principal: u16,
    backend_hits: usize,
}

struct World {
    http: reqwest::Client,
    dest_api: String,
    proxy: String,
    socks: String,
    token_url: String,
    xsuaa: Value,
    connectivity_token: String,
    echo: EchoBackend,
}

impl World {
    async fn answers(&self, token: &str) -> Answers {
        let hits = self.echo.hits();
        let destination = self
            .http
            .get(format!("{}/subaccountDestinations", self.dest_api))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        let via = |proxy_token: &str| {
            reqwest::Client::builder()
                .proxy(
                    reqwest::Proxy::http(&self.proxy)
                        .unwrap()
                        .custom_http_auth(format!("Bearer {proxy_token}").parse().unwrap()),
                )
                .build()
                .unwrap()
        };
        let proxy = match via(token).get("http://erp.virtual:8000/x").send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        let socks5 =
            ferry_client::socks5::connect_tcp(self.socks.as_str(), token, "", "tcp.virtual", 7000).await.is_ok();
        let form = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", token),
            ("client_id", self.xsuaa["clientid"].as_str().unwrap()),
            ("client_secret", self.xsuaa["clientsecret"].as_str().unwrap()),
        ];
        let jwt_bearer = self
            .http
            .post(format!("{}/oauth/token", self.token_url))
            .form(&form)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        let admin = self
            .http
            .get(format!("{}/ferry/admin/v1/subaccounts", self.token_url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        let principal = match via(&self.connectivity_token)
            .get("http://pp.virtual:8000/x")
            .header("sap-connectivity-authentication", format!("Bearer {token}"))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        // SOCKS5 success opened a connection to the echo backend too, which counts no request.
        Answers { destination, proxy, socks5, jwt_bearer, admin, principal, backend_hits: self.echo.hits() - hits }
    }
}

#[tokio::test]
async fn every_entry_point_refuses_every_forged_token() {
    ferry_core::init_crypto();
    let echo = EchoBackend::start().await;
    // The trusted external provider and the attacker's key server.
    let idp_key = TestKey::new();
    let idp_routes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (idp_addr, _) = json_server(idp_routes.clone()).await;
    let issuer = format!("http://{idp_addr}");
    idp_routes.lock().unwrap().extend([
        (
            "/.well-known/openid-configuration".to_owned(),
            json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks")}),
        ),
        ("/jwks".to_owned(), json!({"keys": [idp_key.jwk("idp-1")]})),
    ]);
    let evil = TestKey::new();
    let evil_routes =
        Arc::new(std::sync::Mutex::new(vec![("/jwks".to_owned(), json!({"keys": [evil.jwk("evil-1")]}))]));
    let (evil_addr, evil_hits) = json_server(evil_routes).await;
    let evil_jwks = format!("http://{evil_addr}/jwks");

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let port = echo.addr.port();
    let config = format!(
        r#"{listen}
[[users]]
username = "alice"
password = "alice-password"

[[trust]]
issuer = "{issuer}"
audiences = ["ferry-api"]

[[connectors]]
[[connectors.mappings]]
virtualHost = "erp.virtual"
virtualPort = 8000
localHost = "127.0.0.1"
localPort = {port}
protocol = "HTTP"
resources = [{{ path = "/", exactMatchOnly = false }}]
[[connectors.mappings]]
virtualHost = "tcp.virtual"
virtualPort = 7000
localHost = "127.0.0.1"
localPort = {port}
protocol = "TCP"
[[connectors.mappings]]
virtualHost = "pp.virtual"
virtualPort = 8000
localHost = "127.0.0.1"
localPort = {port}
protocol = "HTTP"
authenticationMode = "X509_GENERAL"
resources = [{{ path = "/", exactMatchOnly = false }}]
"#,
        listen = common::LISTEN_ANY,
    );
    let (_up, vcap) = common::ferry_up(dir, &config);
    let http = ferry_core::tls::http_client(None).unwrap();
    let xsuaa = vcap["xsuaa"][0]["credentials"].clone();
    let conn = &vcap["connectivity"][0]["credentials"];
    let token_url = xsuaa["url"].as_str().unwrap().to_owned();
    let zone = xsuaa["tenantid"].as_str().unwrap().to_owned();
    let connectivity_token = common::token(conn).await;
    let form = [
        ("grant_type", "password"),
        ("username", "alice"),
        ("password", "alice-password"),
        ("client_id", xsuaa["clientid"].as_str().unwrap()),
        ("client_secret", xsuaa["clientsecret"].as_str().unwrap()),
    ];
    let r: Value =
        http.post(format!("{token_url}/oauth/token")).form(&form).send().await.unwrap().json().await.unwrap();
    let user = r["access_token"].as_str().unwrap().to_owned();
    let w = World {
        http: http.clone(),
        dest_api: format!(
            "{}/destination-configuration/v1",
            vcap["destination"][0]["credentials"]["uri"].as_str().unwrap()
        ),
        proxy: format!("http://127.0.0.1:{}", conn["onpremise_proxy_http_port"].as_str().unwrap()),
        socks: common::socks_addr(&vcap),
        token_url: token_url.clone(),
        xsuaa: xsuaa.clone(),
        connectivity_token,
        echo,
    };

    // The baselines: Ferry's own user token and the external provider's token are accepted
    // everywhere a token of theirs belongs, so each refusal below is the row's doing.
    let user_ok = w.answers(&user).await;
    assert_eq!(
        (user_ok.destination, user_ok.proxy, user_ok.socks5, user_ok.jwt_bearer, user_ok.admin, user_ok.principal),
        (200, 200, true, 200, 403, 200),
        "{user_ok:?}"
    );
    let ext_claims = json!({"iss": issuer, "aud": "ferry-api", "sub": "ext-user", "user_name": "ext-user",
                            "exp": now() + 600, "iat": now()});
    let ext_ok = w.answers(&idp_key.sign(&json!({"alg": "RS256", "kid": "idp-1"}), &ext_claims)).await;
    assert_eq!((ext_ok.destination, ext_ok.proxy, ext_ok.socks5), (200, 200, true), "{ext_ok:?}");

    // Material for the forgeries: the zone's public key as the token service publishes it.
    let keys: Value =
        http.get(format!("{token_url}/token_keys?zid={zone}")).send().await.unwrap().json().await.unwrap();
    let jwk = &keys["keys"][0];
    let (kid, pem, n) = (jwk["kid"].as_str().unwrap(), jwk["value"].as_str().unwrap(), jwk["n"].as_str().unwrap());
    let own = part(&user, 1);
    let own_header = part(&user, 0);
    let with = |mut v: Value, k: &str, x: Value| {
        v[k] = x;
        v
    };
    let sig = user.rsplit('.').next().unwrap();
    let rows: Vec<(&str, String)> = vec![
        ("alg none", format!("{}.{}.", b64json(&json!({"alg": "none", "kid": kid})), b64json(&own))),
        (
            "alg none with the original signature",
            format!("{}.{}.{sig}", b64json(&json!({"alg": "none", "kid": kid})), b64json(&own)),
        ),
        ("HS256 keyed with the public key PEM", hs256(pem.as_bytes(), &json!({"alg": "HS256", "kid": kid}), &own)),
        ("HS256 keyed with the modulus", hs256(n.as_bytes(), &json!({"alg": "HS256", "kid": kid}), &own)),
        ("unknown kid", evil.sign(&json!({"alg": "RS256", "kid": "nobody"}), &own)),
        ("another key under the zone's kid", evil.sign(&json!({"alg": "RS256", "kid": kid}), &own)),
        ("the provider's key under the zone's kid", idp_key.sign(&json!({"alg": "RS256", "kid": kid}), &own)),
        (
            "the zone's issuer on the provider's kid",
            idp_key.sign(&json!({"alg": "RS256", "kid": "idp-1"}), &with(own.clone(), "iss", own["iss"].clone())),
        ),
        ("jku to the attacker's keys", evil.sign(&json!({"alg": "RS256", "kid": "evil-1", "jku": evil_jwks}), &own)),
        (
            "jku to the attacker's keys under the zone's kid",
            evil.sign(&json!({"alg": "RS256", "kid": kid, "jku": evil_jwks}), &own),
        ),
        ("x5u to the attacker", evil.sign(&json!({"alg": "RS256", "kid": "evil-1", "x5u": evil_jwks}), &own)),
        ("embedded jwk", evil.sign(&json!({"alg": "RS256", "kid": "evil-1", "jwk": evil.jwk("evil-1")}), &own)),
        (
            "embedded jwk under the zone's kid",
            evil.sign(&json!({"alg": "RS256", "kid": kid, "jwk": evil.jwk(kid)}), &own),
        ),
        (
            "payload edited (user)",
            format!("{}.{}.{sig}", b64json(&own_header), b64json(&with(own.clone(), "user_name", json!("admin")))),
        ),
        (
            "payload edited (expiry)",
            format!("{}.{}.{sig}", b64json(&own_header), b64json(&with(own.clone(), "exp", json!(now() + 999_999)))),
        ),
        ("signature stripped", format!("{}.{}.", b64json(&own_header), b64json(&own))),
        // Past the connector's `expiration_tolerance_hours` (1 h, as SAP's), which the
        // principal row would otherwise accept by design.
        (
            "expired",
            idp_key
                .sign(&json!({"alg": "RS256", "kid": "idp-1"}), &with(ext_claims.clone(), "exp", json!(now() - 7300))),
        ),
        (
            "not yet valid",
            idp_key
                .sign(&json!({"alg": "RS256", "kid": "idp-1"}), &with(ext_claims.clone(), "nbf", json!(now() + 3600))),
        ),
        (
            "wrong issuer",
            idp_key.sign(
                &json!({"alg": "RS256", "kid": "idp-1"}),
                &with(ext_claims.clone(), "iss", json!(format!("http://{evil_addr}"))),
            ),
        ),
        (
            "wrong audience",
            idp_key
                .sign(&json!({"alg": "RS256", "kid": "idp-1"}), &with(ext_claims.clone(), "aud", json!("other-api"))),
        ),
        (
            "another tenant's zone",
            idp_key.sign(
                &json!({"alg": "RS256", "kid": "idp-1"}),
                &with(ext_claims.clone(), "zid", json!("0a0b0c0d-0000-4000-8000-00000000000b")),
            ),
        ),
        (
            "huge",
            idp_key.sign(
                &json!({"alg": "RS256", "kid": "idp-1"}),
                &with(ext_claims.clone(), "pad", json!("x".repeat(40_000))),
            ),
        ),
        ("garbage", "a.b.c".into()),
    ];
    let mut failures = Vec::new();
    for (name, token) in &rows {
        let a = w.answers(token).await;
        // A huge token may be stopped by the header size cap before the verifier sees it.
        let proxy_ok = a.proxy == 407 || (*name == "huge" && a.proxy == 431);
        let principal_ok = a.principal == 403 || (*name == "huge" && a.principal == 431);
        let dest_ok = a.destination == 401 || (*name == "huge" && a.destination == 431);
        let bearer_ok = [400, 401].contains(&a.jwt_bearer) || (*name == "huge" && a.jwt_bearer == 413);
        let admin_ok = a.admin == 401 || (*name == "huge" && a.admin == 431);
        if !(dest_ok && proxy_ok && !a.socks5 && bearer_ok && admin_ok && principal_ok && a.backend_hits == 0) {
            failures.push(format!("{name}: {a:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows not refused everywhere:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
    assert_eq!(evil_hits.load(Ordering::SeqCst), 0, "a token header made Ferry fetch from the attacker");
}
