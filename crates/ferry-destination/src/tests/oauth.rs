//! Server-side token retrieval against a token endpoint on a real socket.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use base64::Engine;
use serde_json::{Value, json};

use super::{Env, TokenServer, V1, config};
use crate::DatabaseConfig;

fn oauth(name: &str, token_url: &str) -> Value {
    json!({
        "Name": name, "Type": "HTTP", "URL": "https://backend.example", "ProxyType": "Internet",
        "Authentication": "OAuth2ClientCredentials", "tokenServiceURL": token_url, "tokenServiceURLType": "Dedicated",
        "clientId": "remote-client", "clientSecret": "remote-secret"
    })
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn client_credentials_request_and_token_shape() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    remote.answer(
        StatusCode::OK,
        json!({"access_token": "tok-A", "token_type": "bearer", "expires_in": 3600, "scope": "read write"}),
    );
    let t = env.token("zone-1", "client-1");
    let mut dest = oauth("cc", &remote.url("/oauth/token"));
    dest["scope"] = json!("read");
    dest["tokenService.body.resource"] = json!("urn:sap:x");
    dest["tokenServiceURL.queries.tenantid"] = json!("t-1");
    dest["tokenServiceURL.headers.X-Custom"] = json!("custom-value");
    env.create(&t, "subaccount", dest.clone()).await;

    let r = env.find(&t, "cc", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json["authTokens"],
        json!([{
            "type": "Bearer", "value": "tok-A",
            "http_header": {"key": "Authorization", "value": "Bearer tok-A"},
            "expires_in": "3600", "scope": "read write"
        }])
    );
    assert_eq!(r.json["destinationConfiguration"], dest);

    let calls = remote.calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.path, "/oauth/token");
    assert_eq!(call.query.as_deref(), Some("tenantid=t-1"));
    assert_eq!(call.headers["x-custom"], "custom-value");
    assert_eq!(call.headers["content-type"], "application/x-www-form-urlencoded");
    assert!(call.headers.get("authorization").is_none());
    assert_eq!(
        call.form,
        [
            ("grant_type", "client_credentials"),
            ("client_id", "remote-client"),
            ("client_secret", "remote-secret"),
            ("scope", "read"),
            ("resource", "urn:sap:x"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
}

#[tokio::test]
async fn client_authentication_by_http_basic() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let t = env.token("zone-1", "client-1");

    let mut user = oauth("by-user", &remote.url("/oauth/token"));
    user["tokenServiceUser"] = json!("svc-user");
    user["tokenServicePassword"] = json!("svc:pass");
    env.create(&t, "subaccount", user).await;
    let mut not_in_body = oauth("not-in-body", &remote.url("/oauth/token"));
    not_in_body["tokenService.addClientCredentialsInBody"] = json!("false");
    env.create(&t, "subaccount", not_in_body).await;

    for (name, credentials) in [("by-user", "svc-user:svc:pass"), ("not-in-body", "remote-client:remote-secret")] {
        let r = env.find(&t, name, &[]).await;
        assert_eq!(r.json["authTokens"][0]["value"], "remote-token-1", "{}", r.text);
        let call = remote.calls().pop().unwrap();
        assert_eq!(call.headers["authorization"], format!("Basic {}", b64(credentials)), "{name}");
        assert_eq!(call.form("grant_type"), Some("client_credentials"));
        assert_eq!(call.form("client_id"), None, "{name}");
        assert_eq!(call.form("client_secret"), None, "{name}");
    }
}

#[tokio::test]
async fn password_grant() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let t = env.token("zone-1", "client-1");
    let mut dest = oauth("pw", &remote.url("/oauth/token"));
    dest["Authentication"] = json!("OAuth2Password");
    dest["User"] = json!("alice");
    dest["Password"] = json!("alice-pw");
    env.create(&t, "subaccount", dest).await;
    let r = env.find(&t, "pw", &[]).await;
    assert_eq!(r.json["authTokens"][0]["http_header"]["value"], "Bearer remote-token-1");
    let call = remote.calls().pop().unwrap();
    assert_eq!(call.form("grant_type"), Some("password"));
    assert_eq!(call.form("username"), Some("alice"));
    assert_eq!(call.form("password"), Some("alice-pw"));
    assert_eq!(call.form("client_id"), Some("remote-client"));
}

#[tokio::test]
async fn tokens_are_cached_until_a_minute_before_expiry() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", oauth("cc", &remote.url("/oauth/token"))).await;
    let expires_in = |r: &super::Resp| r.json["authTokens"][0]["expires_in"].as_str().unwrap().to_owned();

    let r = env.find(&t, "cc", &[]).await;
    assert_eq!((remote.count(), expires_in(&r)), (1, "3600".to_owned()));
    let r = env.find(&t, "cc", &[]).await;
    assert_eq!((remote.count(), expires_in(&r)), (1, "3600".to_owned()), "second find is served from the cache");
    // Skipping token retrieval never touches the token service.
    env.call(Method::GET, &format!("{V1}/destinations/cc?$skipTokenRetrieval=true"), Some(&t), None).await;
    assert_eq!(remote.count(), 1);

    env.clock.advance(Duration::from_secs(1000));
    let r = env.find(&t, "cc", &[]).await;
    assert_eq!((remote.count(), expires_in(&r)), (1, "2600".to_owned()), "expires_in counts down");

    env.clock.advance(Duration::from_secs(2540)); // 60 s left: due for renewal
    remote.answer(StatusCode::OK, json!({"access_token": "tok-B", "expires_in": "3600"}));
    let r = env.find(&t, "cc", &[]).await;
    assert_eq!((remote.count(), expires_in(&r)), (2, "3600".to_owned()));
    assert_eq!(r.json["authTokens"][0]["value"], "tok-B");

    // A change that alters the token request misses the cache; one that does not, hits it.
    let mut described = oauth("cc", &remote.url("/oauth/token"));
    described["Description"] = json!("only a description");
    env.call(Method::PUT, &format!("{V1}/subaccountDestinations"), Some(&t), Some(described.clone())).await;
    env.find(&t, "cc", &[]).await;
    assert_eq!(remote.count(), 2);
    described["clientSecret"] = json!("rotated-secret");
    env.call(Method::PUT, &format!("{V1}/subaccountDestinations"), Some(&t), Some(described)).await;
    env.find(&t, "cc", &[]).await;
    assert_eq!(remote.count(), 3);
    assert_eq!(remote.calls()[2].form("client_secret"), Some("rotated-secret"));
}

#[tokio::test]
async fn short_lived_tokens() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", oauth("cc", &remote.url("/oauth/token"))).await;

    remote.answer(StatusCode::OK, json!({"access_token": "t61", "expires_in": 61}));
    let r = env.find(&t, "cc", &[]).await;
    assert_eq!(r.json["authTokens"][0]["expires_in"], "61");
    env.find(&t, "cc", &[]).await;
    assert_eq!(remote.count(), 1, "61 s is one second more than the renewal margin");
    env.clock.advance(Duration::from_secs(1));
    env.find(&t, "cc", &[]).await;
    assert_eq!(remote.count(), 2);

    // Tokens living less than the margin, or without expires_in, are never cached.
    env.clock.advance(Duration::from_secs(2));
    for answer in [json!({"access_token": "t30", "expires_in": 30}), json!({"access_token": "forever"})] {
        remote.answer(StatusCode::OK, answer);
        let before = remote.count();
        let r = env.find(&t, "cc", &[]).await;
        env.find(&t, "cc", &[]).await;
        assert_eq!(remote.count(), before + 2);
        assert!(r.json["authTokens"][0].get("error").is_none());
    }
    let r = env.find(&t, "cc", &[]).await;
    assert!(r.json["authTokens"][0].get("expires_in").is_none(), "{}", r.text);
}

#[tokio::test]
async fn concurrent_misses_make_one_remote_call() {
    let env = Arc::new(Env::new().await);
    let remote = TokenServer::start().await;
    remote.delay(Duration::from_millis(200));
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", oauth("cc", &remote.url("/oauth/token"))).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (env, t) = (env.clone(), t.clone());
        tasks.spawn(async move { env.find(&t, "cc", &[]).await.json["authTokens"][0]["value"].clone() });
    }
    while let Some(value) = tasks.join_next().await {
        assert_eq!(value.unwrap(), "remote-token-1");
    }
    assert_eq!(remote.count(), 1);
}

#[tokio::test]
async fn remote_failures_become_error_entries_and_are_not_cached() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    remote.answer(StatusCode::UNAUTHORIZED, json!({"error": "invalid_client", "error_description": "Bad credentials"}));
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", oauth("cc", &remote.url("/oauth/token?secret-query=1"))).await;

    let r = env.find(&t, "cc", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let error =
        format!("token service at {} answered HTTP 401: invalid_client (Bad credentials)", remote.url("/oauth/token"));
    assert_eq!(r.json["authTokens"], json!([{"type": "", "value": "", "error": error}]));
    assert_eq!(r.json["destinationConfiguration"]["Name"], "cc");
    env.find(&t, "cc", &[]).await;
    assert_eq!(remote.count(), 2, "errors are not cached");

    remote.answer(StatusCode::OK, json!({"no_token": true}));
    let r = env.find(&t, "cc", &[]).await;
    assert!(r.json["authTokens"][0]["error"].as_str().unwrap().ends_with("no access_token in the response"));

    remote.answer(StatusCode::OK, json!({"access_token": "ok"}));
    let r = env.find(&t, "cc", &[]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "ok");
}

#[tokio::test]
async fn unreachable_token_service() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    env.create(&t, "subaccount", oauth("cc", &format!("http://{closed}/oauth/token"))).await;
    let r = env.find(&t, "cc", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let entry = &r.json["authTokens"][0];
    assert_eq!((entry["type"].as_str(), entry["value"].as_str()), (Some(""), Some("")));
    let error = entry["error"].as_str().unwrap();
    assert!(error.starts_with(&format!("cannot reach token service at http://{closed}/oauth/token: ")), "{error}");
}

#[tokio::test]
async fn slow_token_service_times_out() {
    let mut cfg = config(DatabaseConfig::SqliteMemory, [1; 32]);
    cfg.token_fetch_timeout = Duration::from_millis(300);
    let env = Env::with_config(cfg).await;
    let remote = TokenServer::start().await;
    remote.delay(Duration::from_secs(5));
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", oauth("cc", &remote.url("/oauth/token"))).await;
    // The token service would answer after 5 s: the timeout's error, not a token, shows the
    // fetch gave up (no wall-clock assertion, which a loaded machine could fail).
    let r = env.find(&t, "cc", &[]).await;
    let error = r.json["authTokens"][0]["error"].as_str().unwrap();
    assert_eq!(error, format!("token service at {} did not answer within 300ms", remote.url("/oauth/token")));
}

/// Callers that queue behind a fetch that fails get its error instead of each fetching (and,
/// for a silent token service, waiting a full timeout) in turn; a later call tries again.
#[tokio::test]
async fn concurrent_callers_share_a_failed_fetch_and_later_calls_try_again() {
    let mut cfg = config(DatabaseConfig::SqliteMemory, [1; 32]);
    cfg.token_fetch_timeout = Duration::from_millis(300);
    let env = Arc::new(Env::with_config(cfg).await);
    let remote = TokenServer::start().await;
    remote.delay(Duration::from_secs(5));
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", oauth("cc", &remote.url("/oauth/token"))).await;
    let want = format!("token service at {} did not answer within 300ms", remote.url("/oauth/token"));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (env, t) = (env.clone(), t.clone());
        tasks.spawn(async move { env.find(&t, "cc", &[]).await.json["authTokens"][0]["error"].clone() });
    }
    while let Some(error) = tasks.join_next().await {
        assert_eq!(error.unwrap(), json!(want));
    }
    assert_eq!(remote.count(), 1, "the queued callers shared the one failed fetch");
    let r = env.find(&t, "cc", &[]).await;
    assert_eq!(r.json["authTokens"][0]["error"], json!(want));
    assert_eq!(remote.count(), 2, "a failure is not cached for later calls");
}

#[tokio::test]
async fn common_token_urls_use_the_tenant() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let t = env.token("zone-1", "client-1");
    let mut common = oauth("common", &remote.url("/{tenant}/oauth/token"));
    common["tokenServiceURLType"] = json!("Common");
    env.create(&t, "subaccount", common).await;
    env.create(&t, "subaccount", oauth("dedicated", &remote.url("/oauth/token"))).await;

    let r = env.find(&t, "common", &[("x-tenant", "acme")]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "remote-token-1", "{}", r.text);
    assert_eq!(remote.calls()[0].path, "/acme/oauth/token");
    // Without X-tenant, the caller's own subdomain (ext_attr.zdn) is the tenant.
    env.find(&t, "common", &[]).await;
    assert_eq!(remote.calls()[1].path, "/zone-1-sub/oauth/token");
    // Tenants are cached apart.
    env.find(&t, "common", &[("x-tenant", "acme")]).await;
    env.find(&t, "common", &[]).await;
    assert_eq!(remote.count(), 2);

    let r = env.find(&t, "dedicated", &[("x-tenant", "acme")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("only allowed for destinations with tokenServiceURLType 'Common'"));
    // With token retrieval skipped, X-tenant does not matter.
    let r = env
        .call_raw(
            Method::GET,
            &format!("{V1}/destinations/dedicated?$skipTokenRetrieval=true"),
            Some(&t),
            None,
            &[("x-tenant", "acme")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn onpremise_token_services_are_reported_not_called() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let t = env.token("zone-1", "client-1");
    let mut dest = oauth("onprem", &remote.url("/oauth/token"));
    dest["ProxyType"] = json!("OnPremise");
    env.create(&t, "subaccount", dest.clone()).await;
    let r = env.find(&t, "onprem", &[]).await;
    assert!(r.json["authTokens"][0]["error"].as_str().unwrap().contains("Cloud Connector"));
    assert_eq!(remote.count(), 0);

    dest["tokenServiceURL.ProxyType"] = json!("Internet");
    env.call(Method::PUT, &format!("{V1}/subaccountDestinations"), Some(&t), Some(dest)).await;
    let r = env.find(&t, "onprem", &[]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "remote-token-1");
}

/// SPEC §2.3: the token service's certificate is trusted as the destination says. One that no
/// trusted CA issued fails with an error naming both fixes and no token request is sent;
/// `TrustAll=true` accepts it, and so does a `TrustStoreLocation` holding its CA.
#[tokio::test]
async fn token_service_trust_follows_the_destination() {
    let env = Env::new().await;
    let ca = ferry_core::tls::LocalCa::generate("untrusted token service ca").unwrap();
    let remote = TokenServer::start_tls(&ca.issue_server_cert(&["127.0.0.1"]).unwrap()).await;
    let t = env.token("zone-1", "client-1");
    let url = remote.url("/oauth/token");
    let refused = |r: &super::Resp| {
        let error = r.json["authTokens"][0]["error"].as_str().unwrap_or_default().to_owned();
        let expected = format!("the certificate of the token service at {url} is not trusted (UnknownIssuer)");
        assert!(error.starts_with(&expected), "{}", r.text);
        assert!(error.contains("TrustStoreLocation") && error.contains("TrustAll"), "{error}");
    };
    env.create(&t, "subaccount", oauth("strict", &url)).await;
    refused(&env.find(&t, "strict", &[]).await);
    let mut not_trusting = oauth("trust-all-false", &url);
    not_trusting["TrustAll"] = json!("false");
    env.create(&t, "subaccount", not_trusting).await;
    refused(&env.find(&t, "trust-all-false", &[]).await);
    assert_eq!(remote.count(), 0);

    let mut trusting = oauth("trust-all", &url);
    trusting["TrustAll"] = json!("true");
    env.create(&t, "subaccount", trusting).await;
    let r = env.find(&t, "trust-all", &[]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "remote-token-1", "{}", r.text);
    assert_eq!(remote.count(), 1);

    let mut with_store = oauth("trust-store", &url);
    with_store["TrustStoreLocation"] = json!("token-ca.pem");
    env.create(&t, "subaccount", with_store).await;
    let r = env.find(&t, "trust-store", &[]).await;
    let error = r.json["authTokens"][0]["error"].as_str().unwrap_or_default().to_owned();
    assert_eq!(error, "TrustStoreLocation 'token-ca.pem' is not in the certificate store", "{}", r.text);
    let cert = json!({"Name": "token-ca.pem", "Type": "PEM", "Content": b64(ca.cert_pem())});
    let r = env.call(Method::POST, &format!("{V1}/subaccountCertificates"), Some(&t), Some(cert)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = env.find(&t, "trust-store", &[]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "remote-token-1", "{}", r.text);
    assert_eq!(remote.count(), 2);
}

/// The whole path over TCP, as the SDK drives it: seed, find with the literal `$` flag, then
/// find with token retrieval.
#[tokio::test]
async fn served_over_a_real_socket() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/destination-configuration/v1", listener.local_addr().unwrap());
    let shutdown = ferry_core::Shutdown::new();
    let server = tokio::spawn(crate::run(env.service.clone(), listener, shutdown.clone()));

    let http = ferry_core::tls::http_client(None).unwrap();
    let t = env.token("zone-1", "client-1");
    let r = http
        .post(format!("{base}/subaccountDestinations"))
        .bearer_auth(&t)
        .json(&oauth("conf-oauth2cc", &remote.url("/oauth/token")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let r = http
        .get(format!("{base}/destinations/conf-oauth2cc?$skipTokenRetrieval=true"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert!(body.get("authTokens").is_none());
    assert_eq!(remote.count(), 0);

    let r = http.get(format!("{base}/destinations/conf-oauth2cc")).bearer_auth(&t).send().await.unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["authTokens"][0]["http_header"]["value"], "Bearer remote-token-1");
    assert_eq!(body["owner"], json!({"SubaccountId": "zone-1", "InstanceId": null}));
    assert_eq!(remote.count(), 1);

    let r = http.get(format!("{base}/destinations/conf-oauth2cc")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    shutdown.cancel();
    server.await.unwrap();
}
