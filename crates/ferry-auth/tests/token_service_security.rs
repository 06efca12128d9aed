//! Client certificates (mTLS over the real HTTPS listener), password storage, signing-key
//! rotation and retirement, per-client token lifetimes and per-user scopes. Time moves by a
//! `ManualClock`, never by sleeping.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ferry_auth::KeySet;
use ferry_auth::token_service::{
    CertificateBinding, ConfigError, Listeners, ManualClock, OAuthClient, Tenant, TlsInfo, TokenService,
    TokenServiceConfig, User, certificate_fingerprint, hash_password, https_server_config, run,
};
use ferry_core::tls::{CertifiedKey, LocalCa};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const PROVIDER: &str = "6a8b7c4e-0000-4000-8000-000000000001";
const SUBSCRIBER: &str = "9d2f1e3a-0000-4000-8000-000000000002";
const APP: &str = "sb-app!t1";
const APP_SECRET: &str = "app-secret";
const X509: &str = "sb-x509-only!b7|destination-xsappname!b5";
const PINNED: &str = "sb-pinned!b8";
const SHORT: &str = "sb-short!b9";
const FORM: &str = "application/x-www-form-urlencoded";

fn keys() -> &'static (Arc<KeySet>, Arc<KeySet>) {
    static KEYS: OnceLock<(Arc<KeySet>, Arc<KeySet>)> = OnceLock::new();
    KEYS.get_or_init(|| (Arc::new(KeySet::generate().unwrap()), Arc::new(KeySet::generate().unwrap())))
}

fn ca() -> &'static LocalCa {
    static CA: OnceLock<LocalCa> = OnceLock::new();
    CA.get_or_init(|| LocalCa::generate("ferry test ca").unwrap())
}

fn client(id: &str, secret: &str) -> OAuthClient {
    OAuthClient {
        client_id: id.into(),
        client_secret: secret.into(),
        tenant_id: PROVIDER.into(),
        xsappname: "app!t1".into(),
        authorities: vec!["uaa.resource".into()],
        scopes: vec!["openid".into(), "app!t1.Read".into(), "app!t1.Write".into()],
        ..Default::default()
    }
}

fn user(name: &str, scopes: Option<&[&str]>) -> User {
    User {
        username: name.into(),
        password: format!("{name}-pw").into(),
        email: format!("{name}@example.com"),
        user_id: format!("u-{name}"),
        tenant_id: PROVIDER.into(),
        scopes: scopes.map(|s| s.iter().map(|x| x.to_string()).collect()),
        ..Default::default()
    }
}

fn config(uaadomain: &str, tenant_keys: (Arc<KeySet>, Arc<KeySet>)) -> TokenServiceConfig {
    TokenServiceConfig {
        tenants: vec![
            Tenant { id: PROVIDER.into(), subdomain: "provider".into(), keys: tenant_keys.0 },
            Tenant { id: SUBSCRIBER.into(), subdomain: "subscriber".into(), keys: tenant_keys.1 },
        ],
        clients: vec![client(APP, APP_SECRET)],
        users: vec![user("alice", None)],
        public_url: "http://127.0.0.1:18081".into(),
        uaadomain: uaadomain.into(),
        ..Default::default()
    }
}

fn shared_keys() -> (Arc<KeySet>, Arc<KeySet>) {
    let (p, s) = keys();
    (p.clone(), s.clone())
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

fn claims(jwt: &str) -> Value {
    let seg = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(seg).unwrap()).unwrap()
}

fn kid(jwt: &str) -> String {
    let seg = jwt.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(seg).unwrap()).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

async fn call(router: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn post(router: &Router, pairs: &[(&str, &str)]) -> (StatusCode, Value) {
    let req = Request::post("/oauth/token").header("content-type", FORM).body(Body::from(form(pairs))).unwrap();
    call(router, req).await
}

async fn kids_at(router: &Router, zid: &str) -> Vec<String> {
    let req = Request::get(format!("/token_keys?zid={zid}")).body(Body::empty()).unwrap();
    let (status, body) = call(router, req).await;
    assert_eq!(status, StatusCode::OK);
    body["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect()
}

fn cc(id: &str, secret: &str) -> Vec<(&'static str, String)> {
    vec![("grant_type", "client_credentials".into()), ("client_id", id.into()), ("client_secret", secret.into())]
}

fn pw(id: &str, secret: &str, user: &str, password: &str) -> String {
    form(&[
        ("grant_type", "password"),
        ("client_id", id),
        ("client_secret", secret),
        ("username", user),
        ("password", password),
    ])
}

async fn post_raw(router: &Router, body: String) -> (StatusCode, Value) {
    let req = Request::post("/oauth/token").header("content-type", FORM).body(Body::from(body)).unwrap();
    call(router, req).await
}

fn pairs<'a>(p: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    p.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A reqwest client that trusts the test CA and presents `identity` if given.
fn https_client(identity: Option<&CertifiedKey>) -> reqwest::Client {
    let tls = ferry_core::tls::client_config(ca().cert_pem(), identity, &[]).unwrap();
    reqwest::Client::builder().use_preconfigured_tls((*tls).clone()).build().unwrap()
}

async fn token_over(client: &reqwest::Client, url: &str, body: String) -> Result<(u16, Value), reqwest::Error> {
    let resp = client.post(url).header("content-type", FORM).body(body).send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// xssec's X.509 flow: the body carries only `client_id`, the TLS client certificate
/// authenticates, over the HTTPS listener that requests (not requires) certificates.
#[tokio::test]
async fn client_certificates_authenticate_over_mtls() {
    let ca = ca();
    let server_cert = ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    let tls = https_server_config(&server_cert, Some(ca.cert_pem())).unwrap();
    // A certificate of the trusted CA that belongs to no client, pinned by PINNED.
    let stray = ca.issue_connector_cert("sub", "loc", time::Duration::days(1)).unwrap();
    let mut cfg = config("127.0.0.1:1", shared_keys());
    cfg.clients
        .push(OAuthClient { certificates: vec![CertificateBinding::issued_by(ca, X509).unwrap()], ..client(X509, "") });
    cfg.clients.push(OAuthClient {
        certificates: vec![CertificateBinding::Sha256Fingerprint(certificate_fingerprint(&stray.cert_pem).unwrap())],
        ..client(PINNED, "")
    });
    let http_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (http_addr, https_addr) = (http_l.local_addr().unwrap(), https_l.local_addr().unwrap());
    cfg.uaadomain = https_addr.to_string();
    cfg.public_url = format!("http://{http_addr}");
    let svc = TokenService::new(cfg).unwrap();
    let x509_cert = svc.issue_client_certificate(ca, X509, Duration::from_secs(3600)).unwrap();
    // A client with a secret can get a certificate too (an X.509 service key beside the secret).
    let app_cert = svc.issue_client_certificate(ca, APP, Duration::from_secs(3600)).unwrap();
    assert!(svc.issue_client_certificate(ca, "sb-nobody", Duration::from_secs(60)).is_err());
    let shutdown = ferry_core::Shutdown::new();
    let server =
        tokio::spawn(run(svc.clone(), Listeners { http: Some(http_l), https: Some((https_l, tls)) }, shutdown.clone()));

    let url = format!("https://{https_addr}/oauth/token");
    let only_id = |id: &str| form(&[("grant_type", "client_credentials"), ("client_id", id)]);

    // Success: the client's own certificate, client_id alone in the body.
    let with_cert = https_client(Some(&x509_cert));
    let (status, body) = token_over(&with_cert, &url, only_id(X509)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(svc.verifier().verify(token).await.unwrap().client_id.as_deref(), Some(X509));
    // ... and for a subscriber tenant with x-zid, as xssec sends it.
    let resp = with_cert
        .post(&url)
        .header("content-type", FORM)
        .header("x-zid", SUBSCRIBER)
        .body(only_id(X509))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(claims(resp.json::<Value>().await.unwrap()["access_token"].as_str().unwrap())["zid"], SUBSCRIBER);

    // No certificate: refused, and the listener still accepts the connection.
    let (status, body) = token_over(&https_client(None), &url, only_id(X509)).await.unwrap();
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")));
    assert!(body["error_description"].as_str().unwrap().contains("no client certificate"));
    // A secret-based client still works over the same listener, with or without a certificate.
    let (status, _) = token_over(&https_client(None), &url, form(&pairs(&cc(APP, APP_SECRET)))).await.unwrap();
    assert_eq!(status, 200);
    let (status, _) = token_over(&with_cert, &url, form(&pairs(&cc(APP, APP_SECRET)))).await.unwrap();
    assert_eq!(status, 200);

    // The certificate of another client.
    let (status, body) = token_over(&https_client(Some(&app_cert)), &url, only_id(X509)).await.unwrap();
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")));
    let (status, body) = token_over(&with_cert, &url, only_id(APP)).await.unwrap();
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")));
    // The issued certificate authenticates APP without its secret.
    let (status, _) = token_over(&https_client(Some(&app_cert)), &url, only_id(APP)).await.unwrap();
    assert_eq!(status, 200);

    // A trusted CA's certificate bound to no client; the same certificate pinned by fingerprint.
    let stray_client = https_client(Some(&stray));
    let (status, _) = token_over(&stray_client, &url, only_id(X509)).await.unwrap();
    assert_eq!(status, 401);
    let (status, body) = token_over(&stray_client, &url, only_id(PINNED)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, _) = token_over(&stray_client, &url, only_id("sb-nobody")).await.unwrap();
    assert_eq!(status, 401);

    // A certificate-only client has no secret to guess: an empty or any secret fails.
    let (status, _) = token_over(&with_cert, &url, form(&pairs(&cc(X509, "x")))).await.unwrap();
    assert_eq!(status, 401);
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{}:", enc(X509))));
    let resp = with_cert
        .post(&url)
        .header("content-type", FORM)
        .header("authorization", basic)
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // A certificate of a CA the listener does not trust fails the handshake.
    let foreign_ca = LocalCa::generate("foreign").unwrap();
    let foreign = foreign_ca.issue_connector_cert("sub", "loc", time::Duration::days(1)).unwrap();
    assert!(token_over(&https_client(Some(&foreign)), &url, only_id(X509)).await.is_err());

    // Plain HTTP has no certificate to offer.
    let (status, _) =
        token_over(&reqwest::Client::new(), &format!("http://{http_addr}/oauth/token"), only_id(X509)).await.unwrap();
    assert_eq!(status, 401);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), server).await.unwrap().unwrap();
}

/// The router trusts the `TlsInfo` extension the listener adds; with a value-driven router a
/// test plays the listener.
#[tokio::test]
async fn certificate_bindings_through_the_router() {
    let ca = ca();
    let cert = ca.issue_connector_cert("sub", "loc", time::Duration::days(1)).unwrap();
    let fp = certificate_fingerprint(&cert.cert_pem).unwrap();
    let colons = fp.as_bytes().chunks(2).map(|c| std::str::from_utf8(c).unwrap().to_uppercase()).collect::<Vec<_>>();
    let mut cfg = config("127.0.0.1:18443", shared_keys());
    cfg.clients.push(OAuthClient {
        certificates: vec![CertificateBinding::Sha256Fingerprint(colons.join(":"))],
        ..client(PINNED, "")
    });
    let svc = TokenService::new(cfg).unwrap();
    let router = svc.router();
    let der = ferry_core::tls::parse_certs(&cert.cert_pem).unwrap().remove(0);
    let body = form(&[("grant_type", "client_credentials"), ("client_id", PINNED)]);
    let request = |info: Option<TlsInfo>| {
        let mut req =
            Request::post("/oauth/token").header("content-type", FORM).body(Body::from(body.clone())).unwrap();
        if let Some(i) = info {
            req.extensions_mut().insert(i);
        }
        req
    };
    let (status, _) = call(&router, request(Some(TlsInfo { peer_certificate: Some(der.clone()) }))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&router, request(Some(TlsInfo { peer_certificate: None }))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(&router, request(None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let garbage = rustls::pki_types::CertificateDer::from(vec![1, 2, 3]);
    let (status, _) = call(&router, request(Some(TlsInfo { peer_certificate: Some(garbage) }))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn passwords_are_stored_as_argon2_hashes() {
    let mut cfg = config("127.0.0.1:18443", shared_keys());
    let phc = hash_password("from-a-hash").unwrap();
    assert!(phc.starts_with("$argon2id$"));
    cfg.users.push(User { password: phc.clone().into(), ..user("hashed", None) });
    cfg.users.push(User { password: "".into(), ..user("nopass", None) });
    let svc = TokenService::new(cfg.clone()).unwrap();
    let router = svc.router();

    let (status, _) = post_raw(&router, pw(APP, APP_SECRET, "alice", "alice-pw")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = post_raw(&router, pw(APP, APP_SECRET, "alice", "Alice-pw")).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    // A configured hash is used as is.
    let (status, _) = post_raw(&router, pw(APP, APP_SECRET, "hashed", "from-a-hash")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = post_raw(&router, pw(APP, APP_SECRET, "hashed", &phc)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "the hash is not the password");
    // No password: no login, but ferry up can still issue the user a token.
    for guess in ["", " ", "nopass-pw"] {
        let (status, _) = post_raw(&router, pw(APP, APP_SECRET, "nopass", guess)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
    assert!(svc.issue_user_token("nopass", APP).is_ok());
    let (status, _) = post_raw(&router, pw(APP, APP_SECRET, "nobody", "alice-pw")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Neither passwords nor hashes in any Debug output.
    for text in [format!("{cfg:?}"), format!("{cfg:#?}"), format!("{svc:?}"), format!("{svc:#?}")] {
        for secret in ["alice-pw", "$argon2", &phc, APP_SECRET] {
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
    }

    // A value that looks like a hash must be one, with bounded cost.
    cfg.users[1].password = "$argon2id$v=19$broken".into();
    assert!(matches!(TokenService::new(cfg.clone()).unwrap_err(), ConfigError::InvalidPasswordHash { .. }));
    cfg.users[1].password = "$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into();
    let err = TokenService::new(cfg).unwrap_err();
    assert!(err.to_string().contains("limits"), "{err}");
}

#[tokio::test]
async fn key_rotation_keeps_old_keys_until_their_tokens_expire() {
    let clock = Arc::new(ManualClock::starting_now());
    let own = (Arc::new(KeySet::generate().unwrap()), Arc::new(KeySet::generate().unwrap()));
    let mut cfg = config("127.0.0.1:18443", own.clone());
    cfg.token_validity = Duration::from_secs(3600);
    // The longest-lived client token decides how long old keys stay.
    cfg.clients.push(OAuthClient { access_token_validity: Some(Duration::from_secs(7200)), ..client(SHORT, "s") });
    let svc = TokenService::with_clock(cfg, clock.clone()).unwrap();
    let router = svc.router();
    let first = own.0.current_kid().unwrap();

    let (_, body) = post(&router, &pairs(&cc(APP, APP_SECRET))).await;
    let old_token = body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(kid(&old_token), first);

    let second = svc.rotate_keys(PROVIDER).unwrap();
    assert_ne!(second, first);
    assert_eq!(kids_at(&router, PROVIDER).await, [first.clone(), second.clone()]);
    assert_eq!(kids_at(&router, SUBSCRIBER).await.len(), 1, "other tenants are untouched");
    let (_, body) = post(&router, &pairs(&cc(APP, APP_SECRET))).await;
    assert_eq!(kid(body["access_token"].as_str().unwrap()), second, "the new key signs");
    assert!(svc.verifier().verify(&old_token).await.is_ok(), "the old key still verifies");

    // 2 h (the longest validity) + 60 s grace after the rotation the old key is still needed...
    clock.advance(Duration::from_secs(7200 + 60));
    assert_eq!(kids_at(&router, PROVIDER).await.len(), 2);
    assert_eq!(svc.retire_expired_keys(), 0);
    // ...one second later it is retired, lazily by the key request.
    clock.advance(Duration::from_secs(1));
    assert_eq!(kids_at(&router, PROVIDER).await, std::slice::from_ref(&second));
    assert_eq!(own.0.current_kid().unwrap(), second);

    // Rotating twice in a row keeps both predecessors; retirement is also explicit.
    let third = svc.rotate_keys(PROVIDER).unwrap();
    clock.advance(Duration::from_secs(100));
    let fourth = svc.rotate_keys(PROVIDER).unwrap();
    assert_eq!(kids_at(&router, PROVIDER).await, [second.clone(), third.clone(), fourth.clone()]);
    clock.advance(Duration::from_secs(7200 + 60 - 100 + 1));
    assert_eq!(svc.retire_expired_keys(), 1, "second went at the first of the two rotations");
    assert_eq!(kids_at(&router, PROVIDER).await, [third, fourth.clone()]);
    clock.advance(Duration::from_secs(100));
    assert_eq!(kids_at(&router, PROVIDER).await, [fourth]);

    assert!(svc.rotate_keys("no-such-zone").is_err());
}

#[tokio::test]
async fn token_lifetimes_per_client() {
    let clock = Arc::new(ManualClock::starting_now());
    let mut cfg = config("127.0.0.1:18443", shared_keys());
    cfg.token_validity = Duration::from_secs(1800);
    cfg.refresh_token_validity = Duration::from_secs(3600);
    cfg.clients.push(OAuthClient {
        access_token_validity: Some(Duration::from_secs(300)),
        refresh_token_validity: Some(Duration::from_secs(600)),
        ..client(SHORT, "short-secret")
    });
    let svc = TokenService::with_clock(cfg, clock.clone()).unwrap();
    let router = svc.router();

    let lifetime = |body: &Value| {
        let c = claims(body["access_token"].as_str().unwrap());
        assert_eq!(body["expires_in"], json!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap()));
        body["expires_in"].as_u64().unwrap()
    };
    let (_, body) = post(&router, &pairs(&cc(SHORT, "short-secret"))).await;
    assert_eq!(lifetime(&body), 300);
    let (_, body) = post(&router, &pairs(&cc(APP, APP_SECRET))).await;
    assert_eq!(lifetime(&body), 1800, "the service-wide default");
    assert_eq!(
        claims(&svc.issue_user_token("alice", SHORT).unwrap())["exp"].as_u64().unwrap() - clock_now(&clock),
        300
    );

    // Refresh tokens: the client's 600 s, the default's 3600 s.
    let (_, short) = post_raw(&router, pw(SHORT, "short-secret", "alice", "alice-pw")).await;
    assert_eq!(lifetime(&short), 300);
    let (_, long) = post_raw(&router, pw(APP, APP_SECRET, "alice", "alice-pw")).await;
    let refresh = |id: &str, secret: &str, rt: &Value| {
        form(&[
            ("grant_type", "refresh_token"),
            ("client_id", id),
            ("client_secret", secret),
            ("refresh_token", rt.as_str().unwrap()),
        ])
    };
    clock.advance(Duration::from_secs(600));
    let (status, body) = post_raw(&router, refresh(SHORT, "short-secret", &short["refresh_token"])).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    let (status, body) = post_raw(&router, refresh(APP, APP_SECRET, &long["refresh_token"])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    clock.advance(Duration::from_secs(3600));
    let (status, _) = post_raw(&router, refresh(APP, APP_SECRET, &body["refresh_token"])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "the rotated refresh token expired with its own lifetime");

    // Validation.
    let mut bad = config("127.0.0.1:18443", shared_keys());
    bad.clients[0].access_token_validity = Some(Duration::ZERO);
    assert!(matches!(TokenService::new(bad).unwrap_err(), ConfigError::ZeroClientValidity { .. }));
    let mut bad = config("127.0.0.1:18443", shared_keys());
    bad.refresh_token_validity = Duration::ZERO;
    assert_eq!(TokenService::new(bad).unwrap_err(), ConfigError::ZeroValidity);
}

fn clock_now(clock: &ManualClock) -> u64 {
    use ferry_auth::token_service::Clock;
    clock.now_secs()
}

#[tokio::test]
async fn user_tokens_carry_the_scopes_the_user_is_granted() {
    let mut cfg = config("127.0.0.1:18443", shared_keys());
    cfg.users.push(user("carol", Some(&["app!t1.Read", "not-a-client-scope"])));
    cfg.users.push(user("dave", Some(&[])));
    let dest = OAuthClient { scopes: vec!["openid".into(), "app!t1.Read".into()], ..client("sb-dest!b1", "d") };
    cfg.clients.push(dest);
    let svc = TokenService::new(cfg).unwrap();
    let router = svc.router();
    let scopes = |body: &Value| claims(body["access_token"].as_str().unwrap())["scope"].clone();

    let (_, body) = post_raw(&router, pw(APP, APP_SECRET, "alice", "alice-pw")).await;
    assert_eq!(scopes(&body), json!(["openid", "app!t1.Read", "app!t1.Write"]), "no list: all the client's");
    let (_, carol) = post_raw(&router, pw(APP, APP_SECRET, "carol", "carol-pw")).await;
    assert_eq!(scopes(&carol), json!(["openid", "app!t1.Read"]));
    assert_eq!(carol["scope"], "openid app!t1.Read");
    let (_, body) = post_raw(&router, pw(APP, APP_SECRET, "dave", "dave-pw")).await;
    assert_eq!(scopes(&body), json!(["openid"]), "openid is every user's");

    // Asking for more than the user has is an invalid_scope, narrowing works.
    let (status, body) =
        post_raw(&router, format!("{}&scope=app%21t1.Write", pw(APP, APP_SECRET, "carol", "carol-pw"))).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_scope")));
    let (_, body) = post_raw(&router, format!("{}&scope=openid", pw(APP, APP_SECRET, "carol", "carol-pw"))).await;
    assert_eq!(scopes(&body), json!(["openid"]));

    // An exchanged token keeps the restriction; so does ferry up's token.
    let assertion = carol["access_token"].as_str().unwrap();
    let (status, body) = post(
        &router,
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("client_id", APP),
            ("client_secret", APP_SECRET),
            ("assertion", assertion),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(scopes(&body), json!(["openid", "app!t1.Read"]));
    assert_eq!(claims(&svc.issue_user_token("carol", APP).unwrap())["scope"], json!(["openid", "app!t1.Read"]));
    // Client credentials tokens carry the client's authorities, whoever its users are.
    let (_, body) = post(&router, &pairs(&cc(APP, APP_SECRET))).await;
    assert_eq!(scopes(&body), json!(["uaa.resource"]));
}

#[test]
fn client_config_is_validated() {
    let check = |f: &dyn Fn(&mut OAuthClient)| {
        let mut cfg = config("127.0.0.1:18443", shared_keys());
        f(&mut cfg.clients[0]);
        TokenService::new(cfg).map(|_| ())
    };
    assert!(matches!(check(&|c| c.client_secret = "".into()), Err(ConfigError::EmptyClientSecret(_))));
    // An empty secret is fine once a certificate binds the client.
    assert!(
        check(&|c| {
            c.client_secret = "".into();
            c.certificates = vec![CertificateBinding::Sha256Fingerprint("ab".repeat(32))];
        })
        .is_ok()
    );
    assert!(matches!(
        check(&|c| c.certificates = vec![CertificateBinding::Sha256Fingerprint("abc".into())]),
        Err(ConfigError::InvalidCertificateFingerprint { .. })
    ));
    assert!(matches!(
        check(&|c| c.certificates =
            vec![CertificateBinding::SubjectAndIssuer { subject: "CN=x".into(), issuer: " ".into() }]),
        Err(ConfigError::InvalidCertificateSubject { .. })
    ));
    for bad in ["/relative", "ftp://x/cb", "https://x/cb#f", "https://u:p@x/cb", "not a url"] {
        assert!(
            matches!(check(&|c| c.redirect_uris = vec![bad.into()]), Err(ConfigError::InvalidRedirectUri { .. })),
            "{bad}"
        );
    }
    assert!(check(&|c| c.redirect_uris = vec!["http://localhost:5000/".into(), "https://a.example/cb".into()]).is_ok());
}
