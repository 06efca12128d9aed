//! The token service as SAP's clients see it: form posts to `/oauth/token`, tenant addressing,
//! the XSUAA claim shape, and `/token_keys`. Most tests drive the router as a value; one runs
//! the real listeners (HTTP and HTTPS) the way `ferry up` does.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ferry_auth::KeySet;
use ferry_auth::token_service::{
    ConfigError, GRANT_CLIENT_CREDENTIALS, Listeners, OAuthClient, Tenant, TokenService, TokenServiceConfig, User, run,
};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const PROVIDER: &str = "6a8b7c4e-0000-4000-8000-000000000001";
const SUBSCRIBER: &str = "9d2f1e3a-0000-4000-8000-000000000002";
const DEST: &str = "sb-clone-dest!b21283|destination-xsappname!b5";
const DEST_SECRET: &str = "dest$ecret+with/odd=chars";
const APP: &str = "sb-app!t1";
const APP_SECRET: &str = "app-secret";
const CC_ONLY: &str = "sb-cc-only!b3";
const FORM: &str = "application/x-www-form-urlencoded;charset=UTF-8";

/// Key generation is the slow part (RSA-2048), so every test shares one pair of key sets.
fn keys() -> &'static (Arc<KeySet>, Arc<KeySet>) {
    static KEYS: OnceLock<(Arc<KeySet>, Arc<KeySet>)> = OnceLock::new();
    KEYS.get_or_init(|| (Arc::new(KeySet::generate().unwrap()), Arc::new(KeySet::generate().unwrap())))
}

fn config(uaadomain: &str) -> TokenServiceConfig {
    let (pk, sk) = keys();
    TokenServiceConfig {
        tenants: vec![
            Tenant { id: PROVIDER.into(), subdomain: "provider".into(), keys: pk.clone() },
            Tenant { id: SUBSCRIBER.into(), subdomain: "subscriber".into(), keys: sk.clone() },
        ],
        clients: vec![
            OAuthClient {
                client_id: DEST.into(),
                client_secret: DEST_SECRET.into(),
                tenant_id: PROVIDER.into(),
                xsappname: "clone-dest!b21283|destination-xsappname!b5".into(),
                authorities: vec!["uaa.resource".into()],
                scopes: vec!["openid".into()],
                service_instance_id: Some("inst-1".into()),
                grant_types: vec![],
                ..Default::default()
            },
            OAuthClient {
                client_id: APP.into(),
                client_secret: APP_SECRET.into(),
                tenant_id: PROVIDER.into(),
                xsappname: "app!t1".into(),
                authorities: vec!["uaa.resource".into()],
                scopes: vec!["openid".into(), "app!t1.Read".into()],
                service_instance_id: None,
                grant_types: vec![],
                ..Default::default()
            },
            OAuthClient {
                client_id: CC_ONLY.into(),
                client_secret: "cc-secret".into(),
                tenant_id: SUBSCRIBER.into(),
                xsappname: "cc-only!b3".into(),
                authorities: vec![],
                scopes: vec![],
                service_instance_id: None,
                grant_types: vec![GRANT_CLIENT_CREDENTIALS.into()],
                ..Default::default()
            },
        ],
        users: vec![
            User {
                username: "alice".into(),
                password: "alice-pw".into(),
                email: "alice@example.com".into(),
                user_id: "u-alice".into(),
                tenant_id: PROVIDER.into(),
                given_name: Some("Alice".into()),
                family_name: Some("Anders".into()),
                ..Default::default()
            },
            User {
                username: "bob".into(),
                password: "bob-pw".into(),
                email: "bob@example.com".into(),
                user_id: "u-bob".into(),
                tenant_id: SUBSCRIBER.into(),
                given_name: None,
                family_name: None,
                ..Default::default()
            },
        ],
        public_url: "http://127.0.0.1:18081/".into(),
        uaadomain: uaadomain.into(),
        ..Default::default()
    }
}

fn service() -> Arc<TokenService> {
    TokenService::new(config("127.0.0.1:18443")).unwrap()
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    json: Value,
}

async fn send(router: &Router, req: Request<Body>) -> Reply {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply { status, headers, json }
}

async fn post(router: &Router, body: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::post("/oauth/token").header("content-type", FORM).header("accept", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(router, req.body(Body::from(body.to_owned())).unwrap()).await
}

async fn get(router: &Router, uri: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::get(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(router, req.body(Body::empty()).unwrap()).await
}

fn client_credentials(id: &str, secret: &str) -> String {
    form(&[("grant_type", "client_credentials"), ("client_id", id), ("client_secret", secret)])
}

fn password(id: &str, secret: &str, user: &str, pw: &str) -> String {
    form(&[
        ("grant_type", "password"),
        ("client_id", id),
        ("client_secret", secret),
        ("username", user),
        ("password", pw),
    ])
}

fn jwt_bearer(id: &str, secret: &str, assertion: &str) -> String {
    form(&[
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("client_id", id),
        ("client_secret", secret),
        ("assertion", assertion),
    ])
}

fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{}:{}", enc(id), enc(secret))))
}

fn part(jwt: &str, i: usize) -> Value {
    let seg = jwt.split('.').nth(i).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(seg).unwrap()).unwrap()
}

/// Checks a successful token response and that its token verifies; returns the claims.
async fn issued(svc: &TokenService, r: &Reply) -> Value {
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(r.json["token_type"], "bearer");
    assert!(r.json["expires_in"].as_u64().unwrap() > 0);
    let token = r.json["access_token"].as_str().unwrap();
    let verified = svc.verifier().verify(token).await.unwrap();
    let claims = part(token, 1);
    assert_eq!(r.json["jti"], claims["jti"]);
    assert_eq!(r.json["expires_in"], json!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap()));
    let scope: Vec<&str> = claims["scope"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert_eq!(r.json["scope"], scope.join(" "));
    assert_eq!(verified.zid, claims["zid"].as_str().unwrap());
    for k in ["jti", "sub", "client_id", "cid", "azp", "zid", "iss", "grant_type", "rev_sig"] {
        assert!(claims[k].is_string(), "claim {k} in {claims}");
    }
    for k in ["iat", "exp"] {
        assert!(claims[k].is_u64(), "claim {k}");
    }
    assert_eq!(claims["client_id"], claims["cid"]);
    assert_eq!(claims["client_id"], claims["azp"]);
    assert_eq!(claims["ext_attr"]["enhancer"], "XSUAA");
    assert_eq!(claims["ext_attr"]["subaccountid"], claims["zid"]);
    assert!(claims["aud"].as_array().unwrap().contains(&claims["client_id"]));
    let header = part(token, 0);
    assert_eq!(header["alg"], "RS256");
    assert!(header["kid"].is_string());
    assert!(header["jku"].as_str().unwrap().starts_with("https://"));
    claims
}

fn assert_error(r: &Reply, status: StatusCode, error: &str, mentions: &str) {
    assert_eq!(r.status, status, "{}", r.json);
    assert_eq!(r.json["error"], error, "{}", r.json);
    let d = r.json["error_description"].as_str().unwrap();
    assert!(d.contains(mentions), "{d:?} should mention {mentions:?}");
}

#[tokio::test]
async fn client_credentials_in_body() {
    let svc = service();
    let r = post(&svc.router(), &client_credentials(DEST, DEST_SECRET), &[]).await;
    let c = issued(&svc, &r).await;
    assert_eq!(c["sub"], DEST);
    assert_eq!(c["client_id"], DEST);
    assert_eq!(c["zid"], PROVIDER);
    assert_eq!(c["grant_type"], "client_credentials");
    assert_eq!(c["scope"], json!(["uaa.resource"]));
    assert_eq!(c["aud"], json!([DEST, "uaa"]));
    assert_eq!(
        c["ext_attr"],
        json!({"enhancer": "XSUAA", "subaccountid": PROVIDER, "zdn": "provider", "serviceinstanceid": "inst-1"})
    );
    // An IP uaadomain cannot take a subdomain: the issuer is the provider URL.
    assert_eq!(c["iss"], "http://127.0.0.1:18081/oauth/token");
    assert_eq!(
        part(r.json["access_token"].as_str().unwrap(), 0)["jku"],
        format!("https://127.0.0.1:18443/token_keys?zid={PROVIDER}")
    );
    assert!(c.get("user_name").is_none() && c.get("origin").is_none());
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 12 * 3600);
    assert!(r.json.get("refresh_token").is_none());
}

#[tokio::test]
async fn client_credentials_with_basic_and_plain_content_type() {
    let svc = service();
    let router = svc.router();
    let body = "grant_type=client_credentials";
    let auth = basic(DEST, DEST_SECRET);
    let r = post(&router, body, &[("authorization", &auth)]).await;
    assert_eq!(issued(&svc, &r).await["client_id"], DEST);
    // Clients that skip the form-encoding inside Basic are accepted as well.
    let raw = format!("Basic {}", STANDARD.encode(format!("{DEST}:{DEST_SECRET}")));
    let r = post(&router, body, &[("authorization", &raw)]).await;
    issued(&svc, &r).await;
    let req = Request::post("/oauth/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", &auth)
        .body(Body::from(body))
        .unwrap();
    issued(&svc, &send(&router, req).await).await;
    // client_id may repeat the Basic id in the body.
    let r =
        post(&router, &form(&[("grant_type", "client_credentials"), ("client_id", DEST)]), &[("authorization", &auth)])
            .await;
    issued(&svc, &r).await;
}

#[tokio::test]
async fn client_authentication_errors() {
    let svc = service();
    let router = svc.router();
    let r = post(&router, &client_credentials(DEST, "wrong"), &[]).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "invalid_client", "Bad credentials");
    assert!(r.headers.get("www-authenticate").is_none());
    assert_eq!(r.headers["cache-control"], "no-store");

    let r = post(&router, "grant_type=client_credentials", &[("authorization", &basic(DEST, "wrong"))]).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "invalid_client", "Bad credentials");
    assert_eq!(r.headers["www-authenticate"], "Basic realm=\"ferry\"");

    let r = post(&router, "grant_type=client_credentials", &[("authorization", "Basic %%%")]).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "invalid_client", "Basic");
    assert_eq!(r.headers["www-authenticate"], "Basic realm=\"ferry\"");

    let r = post(&router, &client_credentials("sb-nobody!b9", DEST_SECRET), &[]).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "invalid_client", "Bad credentials");

    let r = post(&router, "grant_type=client_credentials", &[]).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "invalid_client", "client_id");

    let r = post(&router, &form(&[("grant_type", "client_credentials"), ("client_id", DEST)]), &[]).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "invalid_client", "client_secret");

    // Two authentication methods at once are refused (RFC 6749 §2.3).
    let r =
        post(&router, &client_credentials(DEST, DEST_SECRET), &[("authorization", &basic(DEST, DEST_SECRET))]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "both");
    let r = post(
        &router,
        &form(&[("grant_type", "client_credentials"), ("client_id", APP)]),
        &[("authorization", &basic(DEST, DEST_SECRET))],
    )
    .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "client_id");
}

#[tokio::test]
async fn request_errors() {
    let svc = service();
    let router = svc.router();
    let cred = [("client_id", APP), ("client_secret", APP_SECRET)];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut p = cred.to_vec();
        p.extend_from_slice(extra);
        form(&p)
    };

    let r = post(&router, &with(&[("grant_type", "implicit")]), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "unsupported_grant_type", "implicit");
    let r = post(&router, &with(&[("grant_type", "authorization_code")]), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "code");
    let r = post(&router, &with(&[]), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "grant_type");
    let r = post(&router, &with(&[("grant_type", "password"), ("username", "alice")]), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "password");
    let r = post(&router, &with(&[("grant_type", "password"), ("password", "x")]), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "username");
    let r = post(&router, &with(&[("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer")]), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "assertion");
    let r = post(&router, &with(&[("grant_type", "refresh_token")]), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "refresh_token");
    // An empty value counts as missing.
    let r = post(&router, &with(&[("grant_type", "password"), ("username", ""), ("password", "x")]), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "username");
    let r = post(&router, &with(&[("grant_type", "client_credentials"), ("scope", "uaa.admin")]), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_scope", "uaa.admin");
    let r = post(&router, &format!("{}&grant_type=password", with(&[("grant_type", "client_credentials")])), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "more than once");

    // A client limited to some grants.
    let r = post(&router, &password(CC_ONLY, "cc-secret", "bob", "bob-pw"), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "unauthorized_client", "password");
    issued(&svc, &post(&router, &client_credentials(CC_ONLY, "cc-secret"), &[]).await).await;

    // Malformed bodies.
    let json_body = Request::post("/oauth/token")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"grant_type":"client_credentials"}"#))
        .unwrap();
    assert_error(&send(&router, json_body).await, StatusCode::BAD_REQUEST, "invalid_request", "x-www-form-urlencoded");
    let no_type = Request::post("/oauth/token").body(Body::from(client_credentials(APP, APP_SECRET))).unwrap();
    assert_error(&send(&router, no_type).await, StatusCode::BAD_REQUEST, "invalid_request", "Content-Type");
    let binary =
        Request::post("/oauth/token").header("content-type", FORM).body(Body::from(vec![0xff, 0x00, 0xfe])).unwrap();
    assert_error(&send(&router, binary).await, StatusCode::BAD_REQUEST, "invalid_request", "UTF-8");
    let r = post(&router, &format!("{}&username=%FF%FE", with(&[("grant_type", "password")])), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "malformed");
    let huge =
        Request::post("/oauth/token").header("content-type", FORM).body(Body::from(vec![b'a'; 200_000])).unwrap();
    let r = send(&router, huge).await;
    assert!(r.status.is_client_error(), "{}", r.status);

    // Wrong method and unknown path: client errors, never 500.
    assert_eq!(get(&router, "/oauth/token", &[]).await.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get(&router, "/nope", &[]).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn x_zid_selects_the_tenant() {
    let svc = service();
    let router = svc.router();
    let r = post(&router, &client_credentials(DEST, DEST_SECRET), &[("x-zid", SUBSCRIBER)]).await;
    let c = issued(&svc, &r).await;
    assert_eq!(c["zid"], SUBSCRIBER);
    assert_eq!(c["ext_attr"]["zdn"], "subscriber");
    assert_eq!(c["ext_attr"]["subaccountid"], SUBSCRIBER);
    assert_eq!(c["client_id"], DEST);
    // Signed with the subscriber's keys, so that `/token_keys?zid=` of that zone verifies it.
    let kid = part(r.json["access_token"].as_str().unwrap(), 0)["kid"].clone();
    assert_eq!(json!(keys().1.current_kid().unwrap()), kid);

    let r = post(&router, &client_credentials(DEST, DEST_SECRET), &[("x-zid", "no-such-zone")]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "unknown zone");

    // An IP uaadomain cannot take a subdomain in a URL: `Host: {subdomain}.{ip:port}` names it
    // (what ferry-client sends for a tenant subdomain there); the bare address is the provider.
    let r = post(&router, &client_credentials(DEST, DEST_SECRET), &[("host", "subscriber.127.0.0.1:18443")]).await;
    assert_eq!(issued(&svc, &r).await["zid"], SUBSCRIBER);
    for host in ["127.0.0.1:18443", "subscriber.127.0.0.2:18443"] {
        let r = post(&router, &client_credentials(DEST, DEST_SECRET), &[("host", host)]).await;
        assert_eq!(issued(&svc, &r).await["zid"], PROVIDER, "{host}");
    }
    let r = post(&router, &client_credentials(DEST, DEST_SECRET), &[("host", "nobody.127.0.0.1:18443")]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "unknown subdomain");

    // A client in the subscriber zone gets tokens there by default.
    let r = post(&router, &client_credentials(CC_ONLY, "cc-secret"), &[]).await;
    assert_eq!(issued(&svc, &r).await["zid"], SUBSCRIBER);
}

#[tokio::test]
async fn host_subdomain_selects_the_tenant() {
    let svc = TokenService::new(config("authentication.ferry.example:8443")).unwrap();
    let router = svc.router();
    let r = post(
        &router,
        &client_credentials(DEST, DEST_SECRET),
        &[("host", "subscriber.authentication.ferry.example:8443")],
    )
    .await;
    let c = issued(&svc, &r).await;
    assert_eq!(c["zid"], SUBSCRIBER);
    assert_eq!(c["iss"], "https://subscriber.authentication.ferry.example:8443/oauth/token");
    let header = part(r.json["access_token"].as_str().unwrap(), 0);
    assert_eq!(header["jku"], "https://subscriber.authentication.ferry.example:8443/token_keys");

    // Host matching ignores case; x-zid wins over the host.
    let r =
        post(&router, &client_credentials(DEST, DEST_SECRET), &[("host", "SUBSCRIBER.Authentication.ferry.example")])
            .await;
    assert_eq!(issued(&svc, &r).await["zid"], SUBSCRIBER);
    let r = post(
        &router,
        &client_credentials(DEST, DEST_SECRET),
        &[("host", "subscriber.authentication.ferry.example"), ("x-zid", PROVIDER)],
    )
    .await;
    assert_eq!(issued(&svc, &r).await["zid"], PROVIDER);

    // Any other host falls back to the client's own zone.
    for host in ["unknown.authentication.ferry.example", "127.0.0.1:18081", "authentication.ferry.example"] {
        let r = post(&router, &client_credentials(DEST, DEST_SECRET), &[("host", host)]).await;
        let c = issued(&svc, &r).await;
        assert_eq!(c["zid"], PROVIDER, "{host}");
        assert_eq!(c["iss"], "https://provider.authentication.ferry.example:8443/oauth/token");
    }

    // Key and metadata endpoints follow the host too.
    let r = get(&router, "/token_keys", &[("host", "subscriber.authentication.ferry.example:8443")]).await;
    assert_eq!(r.json["keys"][0]["kid"], json!(keys().1.current_kid().unwrap()));
    let r =
        get(&router, "/.well-known/openid-configuration", &[("host", "subscriber.authentication.ferry.example")]).await;
    assert_eq!(r.json["issuer"], "https://subscriber.authentication.ferry.example:8443/oauth/token");
    assert_eq!(r.json["jwks_uri"], "https://subscriber.authentication.ferry.example:8443/token_keys");
}

#[tokio::test]
async fn password_grant() {
    let svc = service();
    let router = svc.router();
    let r = post(&router, &password(APP, APP_SECRET, "alice", "alice-pw"), &[]).await;
    let c = issued(&svc, &r).await;
    assert_eq!(c["grant_type"], "password");
    assert_eq!(c["sub"], "u-alice");
    assert_eq!(c["client_id"], APP);
    assert_eq!(c["zid"], PROVIDER);
    assert_eq!(c["user_name"], "alice");
    assert_eq!(c["user_id"], "u-alice");
    assert_eq!(c["user_uuid"], "u-alice");
    assert_eq!(c["email"], "alice@example.com");
    assert_eq!(c["given_name"], "Alice");
    assert_eq!(c["family_name"], "Anders");
    assert_eq!(c["origin"], "ldap");
    assert!(c["auth_time"].is_u64());
    assert_eq!(c["scope"], json!(["openid", "app!t1.Read"]));
    assert_eq!(c["aud"], json!([APP, "app!t1"]));
    assert!(r.json["refresh_token"].as_str().unwrap().ends_with("-r"));
    let verified = svc.verifier().verify(r.json["access_token"].as_str().unwrap()).await.unwrap();
    assert!(verified.is_user());

    let r = post(&router, &password(APP, APP_SECRET, "alice", "wrong"), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "Bad credentials");
    let r = post(&router, &password(APP, APP_SECRET, "mallory", "alice-pw"), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "Bad credentials");

    // Users belong to zones: bob is found in his zone, and only there once a zone is addressed.
    let r = post(&router, &password(APP, APP_SECRET, "bob", "bob-pw"), &[("x-zid", SUBSCRIBER)]).await;
    let c = issued(&svc, &r).await;
    assert_eq!(c["zid"], SUBSCRIBER);
    assert!(c.get("given_name").is_none());
    let r = post(&router, &password(APP, APP_SECRET, "bob", "bob-pw"), &[]).await;
    assert_eq!(issued(&svc, &r).await["zid"], SUBSCRIBER);
    let r = post(&router, &password(APP, APP_SECRET, "alice", "alice-pw"), &[("x-zid", SUBSCRIBER)]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "Bad credentials");

    // The scope parameter narrows.
    let body = format!("{}&scope=openid", password(APP, APP_SECRET, "alice", "alice-pw"));
    assert_eq!(issued(&svc, &post(&router, &body, &[]).await).await["scope"], json!(["openid"]));
}

#[tokio::test]
async fn jwt_bearer_exchange() {
    let svc = service();
    let router = svc.router();
    let login = post(&router, &password(APP, APP_SECRET, "alice", "alice-pw"), &[]).await;
    let user_jwt = login.json["access_token"].as_str().unwrap().to_owned();
    let original = part(&user_jwt, 1);

    let r = post(&router, &jwt_bearer(DEST, DEST_SECRET, &user_jwt), &[]).await;
    let c = issued(&svc, &r).await;
    assert_eq!(c["grant_type"], "urn:ietf:params:oauth:grant-type:jwt-bearer");
    assert_eq!(c["client_id"], DEST);
    assert_eq!(c["cid"], DEST);
    assert_eq!(c["zid"], PROVIDER);
    assert_eq!(c["scope"], json!(["openid"]));
    assert_eq!(c["ext_attr"]["serviceinstanceid"], "inst-1");
    for k in ["sub", "user_name", "user_id", "user_uuid", "email", "given_name", "family_name", "origin", "auth_time"] {
        assert_eq!(c[k], original[k], "claim {k}");
    }
    assert_ne!(c["jti"], original["jti"]);
    assert!(r.json["refresh_token"].is_string());

    // As xssec sends it for a subscriber user: x-zid of the assertion's zone.
    let bob = post(&router, &password(APP, APP_SECRET, "bob", "bob-pw"), &[("x-zid", SUBSCRIBER)]).await;
    let bob_jwt = bob.json["access_token"].as_str().unwrap();
    let r = post(&router, &jwt_bearer(DEST, DEST_SECRET, bob_jwt), &[("x-zid", SUBSCRIBER)]).await;
    let c = issued(&svc, &r).await;
    assert_eq!((c["zid"].as_str(), c["user_name"].as_str()), (Some(SUBSCRIBER), Some("bob")));

    // Tokens never cross zones by exchange.
    let r = post(&router, &jwt_bearer(DEST, DEST_SECRET, bob_jwt), &[("x-zid", PROVIDER)]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "zone");

    // Not a user token, not ours, tampered, garbage.
    let cc = post(&router, &client_credentials(APP, APP_SECRET), &[]).await;
    let r = post(&router, &jwt_bearer(DEST, DEST_SECRET, cc.json["access_token"].as_str().unwrap()), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "user");

    let stranger = KeySet::generate().unwrap();
    let forged = stranger.sign(&original, &[]).unwrap();
    let r = post(&router, &jwt_bearer(DEST, DEST_SECRET, &forged), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "assertion rejected");

    let mut claims = original.clone();
    claims["zid"] = json!(SUBSCRIBER);
    let cross = keys().0.sign(&claims, &[]).unwrap(); // provider key claiming the subscriber zone
    let r = post(&router, &jwt_bearer(DEST, DEST_SECRET, &cross), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "assertion rejected");

    let mut segs: Vec<String> = user_jwt.split('.').map(str::to_owned).collect();
    claims = original.clone();
    claims["user_name"] = json!("mallory");
    segs[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let r = post(&router, &jwt_bearer(DEST, DEST_SECRET, &segs.join(".")), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "assertion rejected");

    let r = post(&router, &jwt_bearer(DEST, DEST_SECRET, "not-a-jwt"), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "zid");
}

#[tokio::test]
async fn refresh_token_rotation() {
    let svc = service();
    let router = svc.router();
    let login = post(&router, &password(APP, APP_SECRET, "alice", "alice-pw"), &[]).await;
    let first = login.json["refresh_token"].as_str().unwrap().to_owned();
    let refresh = |id: &str, secret: &str, rt: &str| {
        form(&[("grant_type", "refresh_token"), ("client_id", id), ("client_secret", secret), ("refresh_token", rt)])
    };

    // Another client cannot use it, and trying does not burn it.
    let r = post(&router, &refresh(DEST, DEST_SECRET, &first), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "another client");
    let r = post(&router, &refresh(APP, APP_SECRET, &first), &[("x-zid", SUBSCRIBER)]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "zone");

    let r = post(&router, &refresh(APP, APP_SECRET, &first), &[]).await;
    let c = issued(&svc, &r).await;
    assert_eq!(c["user_name"], "alice");
    assert_eq!(c["client_id"], APP);
    assert_eq!(c["grant_type"], "refresh_token");
    assert_eq!(c["auth_time"], part(login.json["access_token"].as_str().unwrap(), 1)["auth_time"]);
    let second = r.json["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(first, second);

    // Single use.
    let r = post(&router, &refresh(APP, APP_SECRET, &first), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "already used");
    let r = post(&router, &refresh(APP, APP_SECRET, "made-up-r"), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "invalid");

    // Narrowing on refresh, through Basic authentication.
    let body = form(&[("grant_type", "refresh_token"), ("refresh_token", &second), ("scope", "openid")]);
    let r = post(&router, &body, &[("authorization", &basic(APP, APP_SECRET))]).await;
    assert_eq!(issued(&svc, &r).await["scope"], json!(["openid"]));
}

#[tokio::test]
async fn token_keys_per_tenant() {
    let svc = service();
    let router = svc.router();
    let (pk, sk) = keys();

    let r = get(&router, "/token_keys", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let key = &r.json["keys"][0];
    assert_eq!(key["kid"], json!(pk.current_kid().unwrap()));
    assert_eq!(
        (key["kty"].as_str(), key["alg"].as_str(), key["use"].as_str()),
        (Some("RSA"), Some("RS256"), Some("sig"))
    );
    assert!(key["n"].is_string() && key["e"].is_string());
    assert!(key["value"].as_str().unwrap().starts_with("-----BEGIN PUBLIC KEY-----\n"));

    let r = get(&router, &format!("/token_keys?zid={SUBSCRIBER}"), &[]).await;
    let kids: Vec<&Value> = r.json["keys"].as_array().unwrap().iter().map(|k| &k["kid"]).collect();
    assert_eq!(kids, [&json!(sk.current_kid().unwrap())]);
    let r = get(&router, "/token_keys", &[("x-zid", SUBSCRIBER)]).await;
    assert_eq!(r.json["keys"][0]["kid"], json!(sk.current_kid().unwrap()));

    let r = get(&router, "/token_keys?zid=unknown", &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "unknown zone");

    // A token's kid is in the JWKS its jku names.
    let t = post(&router, &client_credentials(DEST, DEST_SECRET), &[("x-zid", SUBSCRIBER)]).await;
    let header = part(t.json["access_token"].as_str().unwrap(), 0);
    let jku = header["jku"].as_str().unwrap();
    let path = &jku[jku.find("/token_keys").unwrap()..];
    let r = get(&router, path, &[]).await;
    assert!(r.json["keys"].as_array().unwrap().iter().any(|k| k["kid"] == header["kid"]));
}

#[tokio::test]
async fn openid_configuration_and_health() {
    let svc = service();
    let router = svc.router();
    let r = get(&router, "/.well-known/openid-configuration", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["issuer"], "http://127.0.0.1:18081/oauth/token");
    assert_eq!(r.json["token_endpoint"], "http://127.0.0.1:18081/oauth/token");
    assert_eq!(r.json["jwks_uri"], format!("https://127.0.0.1:18443/token_keys?zid={PROVIDER}"));
    let grants = r.json["grant_types_supported"].as_array().unwrap();
    for g in [
        "client_credentials",
        "password",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "refresh_token",
        "authorization_code",
    ] {
        assert!(grants.contains(&json!(g)), "{g}");
    }
    assert_eq!(
        r.json["token_endpoint_auth_methods_supported"],
        json!(["client_secret_basic", "client_secret_post", "tls_client_auth"])
    );
    assert_eq!(r.json["authorization_endpoint"], "http://127.0.0.1:18081/oauth/authorize");
    assert_eq!(r.json["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(r.json["response_types_supported"], json!(["code"]));
    let r = get(&router, &format!("/.well-known/openid-configuration?zid={SUBSCRIBER}"), &[]).await;
    assert_eq!(r.json["jwks_uri"], format!("https://127.0.0.1:18443/token_keys?zid={SUBSCRIBER}"));
    assert_eq!(get(&router, "/healthz", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn issue_user_token_for_ferry_up() {
    let svc = service();
    let t = svc.issue_user_token("bob", APP).unwrap();
    let c = svc.verifier().verify(&t).await.unwrap();
    assert_eq!(c.zid, SUBSCRIBER);
    assert_eq!(c.user_name.as_deref(), Some("bob"));
    assert_eq!(c.client_id.as_deref(), Some(APP));
    assert!(svc.issue_user_token("nobody", APP).is_err());
    assert!(svc.issue_user_token("bob", "sb-none").is_err());
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let cfg = config("127.0.0.1:18443");
    let svc = TokenService::new(cfg.clone()).unwrap();
    for text in [format!("{cfg:?}"), format!("{cfg:#?}"), format!("{svc:?}")] {
        for secret in [DEST_SECRET, APP_SECRET, "cc-secret", "alice-pw", "bob-pw"] {
            assert!(!text.contains(secret), "{secret} leaked");
        }
        assert!(text.contains(DEST), "the client id itself is useful in logs");
        assert!(!text.contains("$argon2"), "password hashes are secrets too");
    }
}

#[test]
fn config_is_validated() {
    let check = |f: &dyn Fn(&mut TokenServiceConfig)| {
        let mut c = config("127.0.0.1:18443");
        f(&mut c);
        TokenService::new(c).unwrap_err()
    };
    assert_eq!(check(&|c| c.tenants.clear()), ConfigError::NoTenants);
    assert!(matches!(check(&|c| c.tenants[1].id = PROVIDER.into()), ConfigError::DuplicateTenant(_)));
    assert!(matches!(check(&|c| c.tenants[1].subdomain = "Provider".into()), ConfigError::DuplicateSubdomain(_)));
    assert!(matches!(check(&|c| c.tenants[1].subdomain = "a.b".into()), ConfigError::InvalidSubdomain(_)));
    assert!(matches!(check(&|c| c.tenants[1].id = "a b".into()), ConfigError::InvalidTenantId(_)));
    assert!(matches!(check(&|c| c.clients[1].client_id = DEST.into()), ConfigError::DuplicateClient(_)));
    assert!(matches!(check(&|c| c.clients[0].client_secret = "".into()), ConfigError::EmptyClientSecret(_)));
    assert!(matches!(check(&|c| c.clients[0].tenant_id = "x".into()), ConfigError::ClientTenantUnknown { .. }));
    assert!(matches!(
        check(&|c| c.clients[0].grant_types = vec!["implicit".into()]),
        ConfigError::UnsupportedGrant { .. }
    ));
    assert!(matches!(check(&|c| c.users[0].tenant_id = "x".into()), ConfigError::UserTenantUnknown { .. }));
    assert!(matches!(check(&|c| c.users[1] = c.users[0].clone()), ConfigError::DuplicateUser { .. }));
    assert!(matches!(check(&|c| c.public_url = "127.0.0.1:18081".into()), ConfigError::InvalidPublicUrl(_)));
    assert!(matches!(check(&|c| c.uaadomain = "https://x.y".into()), ConfigError::InvalidUaaDomain(_)));
    assert_eq!(check(&|c| c.token_validity = Duration::ZERO), ConfigError::ZeroValidity);
    // The same username in two zones is fine.
    let mut c = config("127.0.0.1:18443");
    c.users[1].username = "alice".into();
    assert!(TokenService::new(c).is_ok());
}

/// The set-up of `ferry up`: provider tokens over plain HTTP at `credentials.url`, tenant tokens
/// over HTTPS at `uaadomain` with `x-zid`, as xssec sends them.
#[tokio::test]
async fn serves_http_and_https_listeners() {
    let ca = ferry_core::tls::LocalCa::generate("ferry test ca").unwrap();
    let cert = ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    let tls = ferry_core::tls::server_config(&cert, None, &[b"http/1.1"]).unwrap();
    let http_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (http_addr, https_addr) = (http_l.local_addr().unwrap(), https_l.local_addr().unwrap());
    let mut cfg = config(&https_addr.to_string());
    cfg.public_url = format!("http://{http_addr}");
    let svc = TokenService::new(cfg).unwrap();
    let shutdown = ferry_core::Shutdown::new();
    let server =
        tokio::spawn(run(svc.clone(), Listeners { http: Some(http_l), https: Some((https_l, tls)) }, shutdown.clone()));

    let client = ferry_core::tls::http_client(Some(ca.cert_pem())).unwrap();
    let resp = client
        .post(format!("https://{https_addr}/oauth/token"))
        .header("content-type", FORM)
        .header("accept", "application/json")
        .header("user-agent", "nodejs-xssec-4")
        .header("x-zid", SUBSCRIBER)
        .body(client_credentials(DEST, DEST_SECRET))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body: Value = resp.json().await.unwrap();
    let token = body["access_token"].as_str().unwrap();
    let claims = svc.verifier().verify(token).await.unwrap();
    assert_eq!(claims.zid, SUBSCRIBER);
    assert_eq!(claims.ext_attr.zdn.as_deref(), Some("subscriber"));
    assert_eq!(claims.iss.as_deref(), Some(format!("http://{http_addr}/oauth/token").as_str()));

    // The jku is fetchable over HTTPS and a remote-JWKS verifier accepts the token with it.
    let jku = part(token, 0)["jku"].as_str().unwrap().to_owned();
    assert_eq!(jku, format!("https://{https_addr}/token_keys?zid={SUBSCRIBER}"));
    let remote = ferry_auth::Verifier::new(vec![ferry_auth::TrustedIssuer::jwks_url(jku)], client.clone());
    assert_eq!(remote.verify(token).await.unwrap().zid, SUBSCRIBER);

    let resp = client
        .post(format!("http://{http_addr}/oauth/token"))
        .header("content-type", FORM)
        .body(client_credentials(DEST, DEST_SECRET))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(part(body["access_token"].as_str().unwrap(), 1)["zid"], PROVIDER);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), server).await.unwrap().unwrap();
}

fn token_exchange(id: &str, secret: &str, subject: &str, extra: &[(&str, &str)]) -> String {
    let mut pairs = vec![
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("client_id", id),
        ("client_secret", secret),
        ("subject_token", subject),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:access_token"),
    ];
    pairs.extend_from_slice(extra);
    form(&pairs)
}

/// RFC 8693: a user's token for an access token of another client, or for a SAML assertion the
/// tenant signs (as SAP's IAS does for destination chaining), which the saml2-bearer grant
/// then redeems once.
#[tokio::test]
async fn token_exchange_for_access_token_and_saml_assertion() {
    let svc = service();
    let router = svc.router();
    let login = post(&router, &password(APP, APP_SECRET, "alice", "alice-pw"), &[]).await;
    let user_jwt = login.json["access_token"].as_str().unwrap().to_owned();

    let r = post(&router, &token_exchange(DEST, DEST_SECRET, &user_jwt, &[]), &[]).await;
    let c = issued(&svc, &r).await;
    assert_eq!(r.json["issued_token_type"], "urn:ietf:params:oauth:token-type:access_token");
    assert_eq!(c["grant_type"], "urn:ietf:params:oauth:grant-type:token-exchange");
    assert_eq!((c["client_id"].as_str(), c["user_name"].as_str()), (Some(DEST), Some("alice")));
    assert!(r.json.get("refresh_token").is_none());

    let endpoint = "http://127.0.0.1:18081/oauth/token";
    let saml = [("requested_token_type", "urn:ietf:params:oauth:token-type:saml2"), ("resource", endpoint)];
    let r = post(&router, &token_exchange(DEST, DEST_SECRET, &user_jwt, &saml), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(r.json["token_type"], "N_A");
    assert_eq!(r.json["issued_token_type"], "urn:ietf:params:oauth:token-type:saml2");
    let assertion = r.json["access_token"].as_str().unwrap().to_owned();
    let xml = String::from_utf8(URL_SAFE_NO_PAD.decode(&assertion).unwrap()).unwrap();
    assert!(xml.contains(">alice</saml2:NameID>") || xml.contains(">alice<"), "{xml}");
    assert!(xml.contains(endpoint) && xml.contains("Signature"), "{xml}");

    // The tenant trusts its own assertions for the saml2-bearer grant, once each.
    let redeem = form(&[
        ("grant_type", "urn:ietf:params:oauth:grant-type:saml2-bearer"),
        ("client_id", APP),
        ("client_secret", APP_SECRET),
        ("assertion", &assertion),
    ]);
    let r = post(&router, &redeem, &[]).await;
    let c = issued(&svc, &r).await;
    assert_eq!((c["zid"].as_str(), c["user_name"].as_str()), (Some(PROVIDER), Some("alice")));
    let r = post(&router, &redeem, &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "already used");
    // Another token service trusts them with this certificate.
    let pem = svc.saml_certificate_pem(PROVIDER).unwrap();
    ferry_auth::saml::TrustedCertificate::from_pem(&pem).unwrap();
    assert!(xml.contains(pem.lines().nth(1).unwrap()), "the assertion embeds the signing certificate");

    for (extra, error, mentions) in [
        (vec![("requested_token_type", "urn:ietf:params:oauth:token-type:saml2")], "invalid_request", "resource"),
        (vec![("requested_token_type", "urn:x")], "invalid_request", "requested_token_type"),
        (vec![("actor_token", "x"), ("actor_token_type", "urn:x")], "invalid_request", "actor_token"),
    ] {
        let r = post(&router, &token_exchange(DEST, DEST_SECRET, &user_jwt, &extra), &[]).await;
        assert_error(&r, StatusCode::BAD_REQUEST, error, mentions);
    }
    let body = token_exchange(DEST, DEST_SECRET, &user_jwt, &[]).replace("access_token", "saml2");
    let r = post(&router, &body, &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "subject_token_type");
    let cc = post(&router, &client_credentials(APP, APP_SECRET), &[]).await;
    let r =
        post(&router, &token_exchange(DEST, DEST_SECRET, cc.json["access_token"].as_str().unwrap(), &[]), &[]).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "user");
}
