//! The authorization-code grant with PKCE and the login page, as a browser and an OAuth client
//! see them: `GET /oauth/authorize` → form → `POST /login` → 302 with a code → `POST
//! /oauth/token`. Most tests drive the router as a value (time moved by a `ManualClock`); one
//! runs the flow over the real HTTPS listener.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use ferry_auth::KeySet;
use ferry_auth::token_service::{
    GRANT_CLIENT_CREDENTIALS, Listeners, ManualClock, OAuthClient, Tenant, TokenService, TokenServiceConfig, User,
    https_server_config, run,
};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const PROVIDER: &str = "6a8b7c4e-0000-4000-8000-000000000001";
const SUBSCRIBER: &str = "9d2f1e3a-0000-4000-8000-000000000002";
const APP: &str = "sb-app!t1";
const APP_SECRET: &str = "app-secret";
const OTHER: &str = "sb-other!t2";
const OTHER_SECRET: &str = "other-secret";
const CC_ONLY: &str = "sb-cc-only!b3";
const ODD: &str = "sb-<b>\"odd\"</b>&'x'";
const CALLBACK: &str = "https://app.example/callback";
const FORM: &str = "application/x-www-form-urlencoded";
/// RFC 7636 appendix B.
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

fn keys() -> &'static (Arc<KeySet>, Arc<KeySet>) {
    static KEYS: OnceLock<(Arc<KeySet>, Arc<KeySet>)> = OnceLock::new();
    KEYS.get_or_init(|| (Arc::new(KeySet::generate().unwrap()), Arc::new(KeySet::generate().unwrap())))
}

fn client(id: &str, secret: &str, redirect_uris: &[&str]) -> OAuthClient {
    OAuthClient {
        client_id: id.into(),
        client_secret: secret.into(),
        tenant_id: PROVIDER.into(),
        xsappname: "app!t1".into(),
        authorities: vec!["uaa.resource".into()],
        scopes: vec!["openid".into(), "app!t1.Read".into(), "app!t1.Write".into()],
        redirect_uris: redirect_uris.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn config(uaadomain: &str) -> TokenServiceConfig {
    let (pk, sk) = keys();
    let user = |name: &str, tenant: &str, scopes: Option<&[&str]>| User {
        username: name.into(),
        password: format!("{name}-pw").into(),
        email: format!("{name}@example.com"),
        user_id: format!("u-{name}"),
        tenant_id: tenant.into(),
        scopes: scopes.map(|s| s.iter().map(|x| x.to_string()).collect()),
        ..Default::default()
    };
    TokenServiceConfig {
        tenants: vec![
            Tenant { id: PROVIDER.into(), subdomain: "provider".into(), keys: pk.clone() },
            Tenant { id: SUBSCRIBER.into(), subdomain: "subscriber".into(), keys: sk.clone() },
        ],
        clients: vec![
            client(APP, APP_SECRET, &[CALLBACK, "http://localhost:5000/"]),
            client(OTHER, OTHER_SECRET, &["https://other.example/cb"]),
            OAuthClient { grant_types: vec![GRANT_CLIENT_CREDENTIALS.into()], ..client(CC_ONLY, "cc", &[CALLBACK]) },
            client(ODD, "odd", &[CALLBACK]),
        ],
        users: vec![
            user("alice", PROVIDER, None),
            user("bob", SUBSCRIBER, None),
            user("carol", PROVIDER, Some(&["app!t1.Read"])),
        ],
        public_url: "http://127.0.0.1:18081".into(),
        uaadomain: uaadomain.into(),
        ..Default::default()
    }
}

fn service() -> (Arc<TokenService>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::starting_now());
    (TokenService::with_clock(config("127.0.0.1:18443"), clock.clone()).unwrap(), clock)
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
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    /// The `Location` of a redirect, split into the URL without query and its query pairs.
    fn location(&self) -> (String, Vec<(String, String)>) {
        assert_eq!(self.status, StatusCode::FOUND, "{}", self.text);
        let url = url::Url::parse(self.headers["location"].to_str().unwrap()).unwrap();
        let pairs = url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        let mut base = url.clone();
        base.set_query(None);
        (base.to_string(), pairs)
    }

    fn param(&self, name: &str) -> Option<String> {
        self.location().1.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// The hidden form id of a login page.
    fn form_id(&self) -> String {
        let marker = "name=\"request\" value=\"";
        let start = self.text.find(marker).unwrap_or_else(|| panic!("no form in {}", self.text)) + marker.len();
        self.text[start..].split('"').next().unwrap().to_owned()
    }

    /// `name=value` of the login cookie that was set.
    fn cookie(&self) -> String {
        let c = self.headers.get("set-cookie").unwrap().to_str().unwrap();
        c.split(';').next().unwrap().to_owned()
    }

    fn assert_html_error(&self, status: StatusCode, mentions: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        assert!(self.headers.get("location").is_none(), "an error page never redirects");
        assert!(self.headers["content-type"].to_str().unwrap().starts_with("text/html"));
        assert!(self.text.contains(mentions), "{:?} should mention {mentions:?}", self.text);
    }
}

async fn send(router: &Router, req: Request<Body>) -> Reply {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply { status, headers, text: String::from_utf8_lossy(&bytes).into_owned() }
}

async fn authorize(router: &Router, pairs: &[(&str, &str)]) -> Reply {
    let req = Request::get(format!("/oauth/authorize?{}", form(pairs))).body(Body::empty()).unwrap();
    send(router, req).await
}

/// A standard authorization request of `APP` with PKCE and a state.
fn pkce_request<'a>() -> Vec<(&'a str, &'a str)> {
    vec![
        ("response_type", "code"),
        ("client_id", APP),
        ("redirect_uri", CALLBACK),
        ("state", "st&te=1 ü"),
        ("code_challenge", CHALLENGE),
        ("code_challenge_method", "S256"),
    ]
}

async fn login(router: &Router, page: &Reply, cookie: Option<&str>, pairs: &[(&str, &str)]) -> Reply {
    let id = page.form_id();
    let mut all = vec![("request", id.as_str())];
    all.extend_from_slice(pairs);
    let mut req = Request::post("/login").header("content-type", FORM);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    send(router, req.body(Body::from(form(&all))).unwrap()).await
}

async fn sign_in(router: &Router, page: &Reply, user: &str, pw: &str) -> Reply {
    login(router, page, Some(&page.cookie()), &[("username", user), ("password", pw), ("action", "login")]).await
}

/// Authorize and sign in; returns the code.
async fn code_for(router: &Router, request: &[(&str, &str)], user: &str) -> String {
    let page = authorize(router, request).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    let r = sign_in(router, &page, user, &format!("{user}-pw")).await;
    r.param("code").unwrap_or_else(|| panic!("no code in {:?}", r.headers))
}

async fn token(router: &Router, pairs: &[(&str, &str)]) -> Reply {
    let req = Request::post("/oauth/token").header("content-type", FORM).body(Body::from(form(pairs))).unwrap();
    send(router, req).await
}

fn redeem<'a>(code: &'a str, id: &'a str, secret: &'a str, verifier: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    let mut p = vec![
        ("grant_type", "authorization_code"),
        ("client_id", id),
        ("client_secret", secret),
        ("code", code),
        ("redirect_uri", CALLBACK),
    ];
    if let Some(v) = verifier {
        p.push(("code_verifier", v));
    }
    p
}

fn claims(jwt: &str) -> Value {
    use base64::Engine;
    let seg = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(seg).unwrap()).unwrap()
}

fn assert_oauth_error(r: &Reply, status: StatusCode, error: &str, mentions: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    let j = r.json();
    assert_eq!(j["error"], error, "{j}");
    let d = j["error_description"].as_str().unwrap();
    assert!(d.contains(mentions), "{d:?} should mention {mentions:?}");
}

#[tokio::test]
async fn authorization_code_flow_with_pkce() {
    let (svc, _) = service();
    let router = svc.router();
    let page = authorize(&router, &pkce_request()).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    assert!(page.text.contains("<form method=\"post\" action=\"/login\">"));
    assert!(page.text.contains("name=\"password\" type=\"password\""));
    assert!(page.text.contains(APP));
    assert!(!page.text.contains("<script"), "the page runs no script");
    assert!(!page.text.contains(CHALLENGE) && !page.text.contains("st&te"), "the request stays server-side");
    let h = &page.headers;
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(h["content-security-policy"].to_str().unwrap().contains("default-src 'none'"));
    assert!(h["content-security-policy"].to_str().unwrap().contains("frame-ancestors 'none'"));
    let cookie = h["set-cookie"].to_str().unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/login", "Max-Age=600"] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP cannot keep a Secure cookie");

    let r = sign_in(&router, &page, "alice", "alice-pw").await;
    let (base, params) = r.location();
    assert_eq!(base, CALLBACK);
    assert_eq!(params.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["code", "state"]);
    assert_eq!(r.param("state").unwrap(), "st&te=1 ü", "state comes back unchanged");
    assert_eq!(r.headers["cache-control"], "no-store");
    assert!(r.headers["set-cookie"].to_str().unwrap().contains("Max-Age=0"), "the login cookie is cleared");
    let code = r.param("code").unwrap();
    assert!(code.len() >= 43);

    let r = token(&router, &redeem(&code, APP, APP_SECRET, Some(VERIFIER))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.headers["cache-control"], "no-store");
    let j = r.json();
    let access = j["access_token"].as_str().unwrap();
    let verified = svc.verifier().verify(access).await.unwrap();
    assert_eq!(verified.user_name.as_deref(), Some("alice"));
    let c = claims(access);
    assert_eq!(c["grant_type"], "authorization_code");
    assert_eq!(c["client_id"], APP);
    assert_eq!(c["zid"], PROVIDER);
    assert_eq!(c["user_id"], "u-alice");
    assert_eq!(c["origin"], "ldap");
    assert_eq!(c["scope"], json!(["openid", "app!t1.Read", "app!t1.Write"]));
    assert_eq!(j["scope"], "openid app!t1.Read app!t1.Write");
    assert_eq!(j["expires_in"], 12 * 3600);

    // The refresh token works like any other.
    let rt = j["refresh_token"].as_str().unwrap();
    let r = token(
        &router,
        &[("grant_type", "refresh_token"), ("client_id", APP), ("client_secret", APP_SECRET), ("refresh_token", rt)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(claims(r.json()["access_token"].as_str().unwrap())["user_name"], "alice");
}

#[tokio::test]
async fn scopes_are_narrowed_and_intersected_with_the_user() {
    let (svc, _) = service();
    let router = svc.router();
    let mut req = pkce_request();
    req.push(("scope", "openid app!t1.Write"));
    let code = code_for(&router, &req, "alice").await;
    let r = token(&router, &redeem(&code, APP, APP_SECRET, Some(VERIFIER))).await;
    assert_eq!(claims(r.json()["access_token"].as_str().unwrap())["scope"], json!(["openid", "app!t1.Write"]));

    // carol is granted only app!t1.Read (and openid, which every user has).
    let code = code_for(&router, &pkce_request(), "carol").await;
    let r = token(&router, &redeem(&code, APP, APP_SECRET, Some(VERIFIER))).await;
    assert_eq!(claims(r.json()["access_token"].as_str().unwrap())["scope"], json!(["openid", "app!t1.Read"]));

    // A subscriber user gets a token in their own zone.
    let code = code_for(&router, &pkce_request(), "bob").await;
    let r = token(&router, &redeem(&code, APP, APP_SECRET, Some(VERIFIER))).await;
    assert_eq!(claims(r.json()["access_token"].as_str().unwrap())["zid"], SUBSCRIBER);
}

#[tokio::test]
async fn without_pkce_or_state() {
    let (svc, _) = service();
    let router = svc.router();
    // No state: the redirect carries none. No challenge: no verifier is needed, and none may
    // be sent. No redirect_uri: a client with several must name one.
    let base =
        [("response_type", "code"), ("client_id", APP), ("redirect_uri", "http://localhost:5000/login/callback")];
    let page = authorize(&router, &base).await;
    let r = sign_in(&router, &page, "alice", "alice-pw").await;
    let (location, params) = r.location();
    assert_eq!(location, "http://localhost:5000/login/callback");
    assert_eq!(params.len(), 1, "only the code: {params:?}");
    let code = r.param("code").unwrap();
    let mut p = redeem(&code, APP, APP_SECRET, None);
    p[4].1 = "http://localhost:5000/login/callback";
    let r = token(&router, &p).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    let code = code_for(&router, &base, "alice").await;
    let mut p = redeem(&code, APP, APP_SECRET, Some(VERIFIER));
    p[4].1 = "http://localhost:5000/login/callback";
    assert_oauth_error(&token(&router, &p).await, StatusCode::BAD_REQUEST, "invalid_grant", "no code_challenge");

    // A client with exactly one redirect URI may leave it out, here and at the token endpoint.
    let page = authorize(&router, &[("response_type", "code"), ("client_id", OTHER)]).await;
    let r = sign_in(&router, &page, "alice", "alice-pw").await;
    assert_eq!(r.location().0, "https://other.example/cb");
    let code = r.param("code").unwrap();
    let r = token(
        &router,
        &[("grant_type", "authorization_code"), ("client_id", OTHER), ("client_secret", OTHER_SECRET), ("code", &code)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn authorize_errors_shown_as_a_page() {
    let (svc, _) = service();
    let router = svc.router();
    let r = authorize(&router, &[("response_type", "code")]).await;
    r.assert_html_error(StatusCode::BAD_REQUEST, "client_id");
    let r = authorize(&router, &[("response_type", "code"), ("client_id", "sb-nobody")]).await;
    r.assert_html_error(StatusCode::BAD_REQUEST, "Unknown client");
    // Not registered, or not parsable: never redirect there (no open redirector).
    for bad in ["https://evil.example/callback", "https://app.example/callback/x", "https://app.example.evil/callback"]
    {
        let r = authorize(&router, &[("response_type", "code"), ("client_id", APP), ("redirect_uri", bad)]).await;
        r.assert_html_error(StatusCode::BAD_REQUEST, "not registered");
    }
    for bad in ["/callback", "javascript:alert(1)", "https://app.example/callback#x"] {
        let r = authorize(&router, &[("response_type", "code"), ("client_id", APP), ("redirect_uri", bad)]).await;
        r.assert_html_error(StatusCode::BAD_REQUEST, "invalid");
    }
    let r = authorize(&router, &[("response_type", "code"), ("client_id", APP)]).await;
    r.assert_html_error(StatusCode::BAD_REQUEST, "several");
    // A repeated parameter makes the request ambiguous, redirect URI included.
    let req = Request::get(format!(
        "/oauth/authorize?response_type=code&client_id={}&redirect_uri={}&redirect_uri=https%3A%2F%2Fevil.example%2F",
        enc(APP),
        enc(CALLBACK)
    ))
    .body(Body::empty())
    .unwrap();
    send(&router, req).await.assert_html_error(StatusCode::BAD_REQUEST, "more than once");
    // Even an unknown response type is not redirected before the redirect URI is known good.
    let r = authorize(
        &router,
        &[("response_type", "token"), ("client_id", APP), ("redirect_uri", "https://evil.example/")],
    )
    .await;
    r.assert_html_error(StatusCode::BAD_REQUEST, "not registered");
}

#[tokio::test]
async fn authorize_errors_redirected_to_the_client() {
    let (svc, _) = service();
    let router = svc.router();
    let with = |changes: &[(&'static str, Option<&'static str>)]| {
        let mut p: Vec<(&str, &str)> = pkce_request();
        for (k, v) in changes {
            p.retain(|(name, _)| name != k);
            if let Some(v) = v {
                p.push((k, v));
            }
        }
        p
    };
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (with(&[("response_type", None)]), "invalid_request", "response_type"),
        (with(&[("response_type", Some("token"))]), "unsupported_response_type", "token"),
        (with(&[("code_challenge_method", Some("plain"))]), "invalid_request", "plain"),
        (with(&[("code_challenge_method", None)]), "invalid_request", "S256"),
        (with(&[("code_challenge_method", Some("S512"))]), "invalid_request", "S512"),
        (with(&[("code_challenge", Some("too-short"))]), "invalid_request", "43"),
        (with(&[("code_challenge", None)]), "invalid_request", "without code_challenge"),
        (with(&[("scope", Some("openid uaa.admin"))]), "invalid_scope", "uaa.admin"),
        (with(&[("client_id", Some(CC_ONLY))]), "unauthorized_client", "authorization_code"),
    ];
    for (request, error, mentions) in cases {
        let r = authorize(&router, &request).await;
        let (base, _) = r.location();
        assert_eq!(base, CALLBACK);
        assert_eq!(r.param("error").as_deref(), Some(error), "{request:?}");
        let d = r.param("error_description").unwrap();
        assert!(d.contains(mentions), "{d:?} should mention {mentions:?}");
        assert_eq!(r.param("state").as_deref(), Some("st&te=1 ü"));
        assert!(r.param("code").is_none());
    }
    // Without a state, the error redirect carries none.
    let r = authorize(&router, &with(&[("state", None), ("response_type", Some("token"))])).await;
    assert!(r.param("state").is_none());
    assert_eq!(r.param("error").as_deref(), Some("unsupported_response_type"));
}

#[tokio::test]
async fn code_redemption_errors() {
    let (svc, clock) = service();
    let router = svc.router();
    let used_up = "invalid, expired or already used";

    // Wrong verifier; the code is then used up.
    let code = code_for(&router, &pkce_request(), "alice").await;
    let wrong = "x".repeat(43);
    let r = token(&router, &redeem(&code, APP, APP_SECRET, Some(&wrong))).await;
    assert_oauth_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "code_verifier does not match");
    let r = token(&router, &redeem(&code, APP, APP_SECRET, Some(VERIFIER))).await;
    assert_oauth_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", used_up);

    // Missing and malformed verifiers.
    let code = code_for(&router, &pkce_request(), "alice").await;
    let r = token(&router, &redeem(&code, APP, APP_SECRET, None)).await;
    assert_oauth_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "code_verifier is required");
    let code = code_for(&router, &pkce_request(), "alice").await;
    let r = token(&router, &redeem(&code, APP, APP_SECRET, Some("short"))).await;
    assert_oauth_error(&r, StatusCode::BAD_REQUEST, "invalid_request", "43 to 128");

    // Another client cannot redeem it (and its credentials are checked first).
    let code = code_for(&router, &pkce_request(), "alice").await;
    let r = token(&router, &redeem(&code, OTHER, "wrong", Some(VERIFIER))).await;
    assert_oauth_error(&r, StatusCode::UNAUTHORIZED, "invalid_client", "Bad credentials");
    let r = token(&router, &redeem(&code, OTHER, OTHER_SECRET, Some(VERIFIER))).await;
    assert_oauth_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "another client");

    // The redirect URI must be the one of the request, and must be repeated.
    let code = code_for(&router, &pkce_request(), "alice").await;
    let mut p = redeem(&code, APP, APP_SECRET, Some(VERIFIER));
    p[4].1 = "http://localhost:5000/";
    assert_oauth_error(&token(&router, &p).await, StatusCode::BAD_REQUEST, "invalid_grant", "redirect_uri");
    let code = code_for(&router, &pkce_request(), "alice").await;
    let mut p = redeem(&code, APP, APP_SECRET, Some(VERIFIER));
    p.remove(4);
    assert_oauth_error(&token(&router, &p).await, StatusCode::BAD_REQUEST, "invalid_grant", "redirect_uri is required");

    // Codes live 60 seconds.
    let code = code_for(&router, &pkce_request(), "alice").await;
    clock.advance(Duration::from_secs(59));
    assert_eq!(token(&router, &redeem(&code, APP, APP_SECRET, Some(VERIFIER))).await.status, StatusCode::OK);
    let code = code_for(&router, &pkce_request(), "alice").await;
    clock.advance(Duration::from_secs(60));
    let r = token(&router, &redeem(&code, APP, APP_SECRET, Some(VERIFIER))).await;
    assert_oauth_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", used_up);

    // Unknown code, missing code.
    let r = token(&router, &redeem("made-up", APP, APP_SECRET, Some(VERIFIER))).await;
    assert_oauth_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", used_up);
    let mut p = redeem("x", APP, APP_SECRET, None);
    p.remove(3);
    assert_oauth_error(&token(&router, &p).await, StatusCode::BAD_REQUEST, "invalid_request", "code");

    // A code belongs to its user's zone.
    let code = code_for(&router, &pkce_request(), "alice").await;
    let req = Request::post("/oauth/token")
        .header("content-type", FORM)
        .header("x-zid", SUBSCRIBER)
        .body(Body::from(form(&redeem(&code, APP, APP_SECRET, Some(VERIFIER)))))
        .unwrap();
    assert_oauth_error(&send(&router, req).await, StatusCode::BAD_REQUEST, "invalid_grant", "zone");
}

#[tokio::test]
async fn a_replayed_code_revokes_its_refresh_token() {
    let (svc, _) = service();
    let router = svc.router();
    let code = code_for(&router, &pkce_request(), "alice").await;
    let first = token(&router, &redeem(&code, APP, APP_SECRET, Some(VERIFIER))).await;
    assert_eq!(first.status, StatusCode::OK);
    let rt = first.json()["refresh_token"].as_str().unwrap().to_owned();
    let again = token(&router, &redeem(&code, APP, APP_SECRET, Some(VERIFIER))).await;
    assert_oauth_error(&again, StatusCode::BAD_REQUEST, "invalid_grant", "already used");
    let refresh =
        [("grant_type", "refresh_token"), ("client_id", APP), ("client_secret", APP_SECRET), ("refresh_token", &rt)];
    let r = token(&router, &refresh).await;
    assert_oauth_error(&r, StatusCode::BAD_REQUEST, "invalid_grant", "invalid");
}

#[tokio::test]
async fn login_form_errors() {
    let (svc, clock) = service();
    let router = svc.router();

    // A wrong password shows the form again, with the username kept and escaped.
    let page = authorize(&router, &pkce_request()).await;
    let cookie = page.cookie();
    let name = "<img src=x onerror=alert(1)>\"";
    let r = login(&router, &page, Some(&cookie), &[("username", name), ("password", "nope")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.text.contains("Invalid username or password."));
    assert!(r.text.contains("value=\"&lt;img src=x onerror=alert(1)&gt;&quot;\""), "{}", r.text);
    assert!(!r.text.contains("<img"));
    assert_eq!(r.form_id(), page.form_id(), "the same form can be retried");
    let r = login(&router, &page, Some(&cookie), &[("username", "alice"), ("password", "bob-pw")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "another user's password");
    let r = login(&router, &page, Some(&cookie), &[("username", "alice")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("Enter your username and password."));
    let r = login(&router, &page, Some(&cookie), &[("username", "alice"), ("password", "alice-pw")]).await;
    assert!(r.param("code").is_some());
    // The form is used up: a second submit is refused.
    let r = login(&router, &page, Some(&cookie), &[("username", "alice"), ("password", "alice-pw")]).await;
    r.assert_html_error(StatusCode::BAD_REQUEST, "expired or was already used");

    // CSRF: the cookie set with the form must come back with it.
    let page = authorize(&router, &pkce_request()).await;
    let creds = [("username", "alice"), ("password", "alice-pw")];
    login(&router, &page, None, &creds).await.assert_html_error(StatusCode::FORBIDDEN, "cookie");
    let forged = format!("{}=forged", page.cookie().split('=').next().unwrap());
    login(&router, &page, Some(&forged), &creds).await.assert_html_error(StatusCode::FORBIDDEN, "cookie");
    let other = authorize(&router, &pkce_request()).await;
    login(&router, &page, Some(&other.cookie()), &creds).await.assert_html_error(StatusCode::FORBIDDEN, "cookie");
    // Refused posts do not use the form up.
    assert!(login(&router, &page, Some(&page.cookie()), &creds).await.param("code").is_some());

    // Unknown or missing form id; not a form post.
    let req = Request::post("/login")
        .header("content-type", FORM)
        .body(Body::from(form(&[("request", "made-up"), ("username", "alice"), ("password", "alice-pw")])))
        .unwrap();
    send(&router, req).await.assert_html_error(StatusCode::BAD_REQUEST, "expired");
    let req = Request::post("/login").header("content-type", FORM).body(Body::from("username=alice")).unwrap();
    send(&router, req).await.assert_html_error(StatusCode::BAD_REQUEST, "incomplete");
    let req = Request::post("/login").header("content-type", "application/json").body(Body::from("{}")).unwrap();
    send(&router, req).await.assert_html_error(StatusCode::BAD_REQUEST, "x-www-form-urlencoded");

    // Forms expire after ten minutes.
    let page = authorize(&router, &pkce_request()).await;
    clock.advance(Duration::from_secs(600));
    login(&router, &page, Some(&page.cookie()), &creds).await.assert_html_error(StatusCode::BAD_REQUEST, "expired");

    // Cancel sends the user back with access_denied.
    let page = authorize(&router, &pkce_request()).await;
    let r = login(&router, &page, Some(&page.cookie()), &[("action", "cancel")]).await;
    assert_eq!(r.param("error").as_deref(), Some("access_denied"));
    assert_eq!(r.param("state").as_deref(), Some("st&te=1 ü"));

    // Five wrong passwords end the attempt.
    let page = authorize(&router, &pkce_request()).await;
    let cookie = page.cookie();
    for _ in 0..4 {
        let r = login(&router, &page, Some(&cookie), &[("username", "alice"), ("password", "guess")]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let r = login(&router, &page, Some(&cookie), &[("username", "alice"), ("password", "guess")]).await;
    assert_eq!(r.param("error").as_deref(), Some("access_denied"));
    assert!(r.param("error_description").unwrap().contains("too many"));
    login(&router, &page, Some(&cookie), &creds).await.assert_html_error(StatusCode::BAD_REQUEST, "expired");
}

#[tokio::test]
async fn reflected_values_are_escaped() {
    let (svc, _) = service();
    let router = svc.router();
    let evil = "<script>alert('x')</script>\"&";
    let r = authorize(&router, &[("response_type", "code"), ("client_id", evil)]).await;
    r.assert_html_error(StatusCode::BAD_REQUEST, "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;");
    assert!(!r.text.contains("<script"));
    let r =
        authorize(&router, &[("response_type", "code"), ("client_id", APP), ("redirect_uri", "https://x/\"><script>")])
            .await;
    r.assert_html_error(StatusCode::BAD_REQUEST, "&lt;script&gt;");
    assert!(!r.text.contains("<script"));

    // A configured client id with markup characters is shown as text.
    let r = authorize(&router, &[("response_type", "code"), ("client_id", ODD)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.text.contains("sb-&lt;b&gt;&quot;odd&quot;&lt;/b&gt;&amp;&#x27;x&#x27;"), "{}", r.text);
    assert!(!r.text.contains("<b>\"odd"));
}

/// The browser side over the real HTTPS listener: form, cookie (now `Secure`), redirect, and
/// the client's token request, with reqwest and rustls.
#[tokio::test]
async fn login_page_over_https() {
    let ca = ferry_core::tls::LocalCa::generate("ferry test ca").unwrap();
    let cert = ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    let tls = https_server_config(&cert, Some(ca.cert_pem())).unwrap();
    let https_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = https_l.local_addr().unwrap();
    let svc = TokenService::new(config(&addr.to_string())).unwrap();
    let shutdown = ferry_core::Shutdown::new();
    let server =
        tokio::spawn(run(svc.clone(), Listeners { http: None, https: Some((https_l, tls)) }, shutdown.clone()));

    let tls_client = ferry_core::tls::client_config(ca.cert_pem(), None, &[]).unwrap();
    let browser = reqwest::Client::builder()
        .use_preconfigured_tls((*tls_client).clone())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("https://{addr}");
    let resp = browser.get(format!("{base}/oauth/authorize?{}", form(&pkce_request()))).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let set_cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set_cookie.contains("; Secure"), "{set_cookie}");
    let page = Reply { status: StatusCode::OK, headers: HeaderMap::new(), text: resp.text().await.unwrap() };
    let cookie = set_cookie.split(';').next().unwrap();
    let resp = browser
        .post(format!("{base}/login"))
        .header("content-type", FORM)
        .header("cookie", cookie)
        .body(form(&[("request", &page.form_id()), ("username", "alice"), ("password", "alice-pw")]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    let location = url::Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with(CALLBACK));
    let code = location.query_pairs().find(|(k, _)| k == "code").unwrap().1.into_owned();

    let resp = browser
        .post(format!("{base}/oauth/token"))
        .header("content-type", FORM)
        .body(form(&redeem(&code, APP, APP_SECRET, Some(VERIFIER))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let c = svc.verifier().verify(body["access_token"].as_str().unwrap()).await.unwrap();
    assert_eq!(c.user_name.as_deref(), Some("alice"));
    assert_eq!(c.grant_type.as_deref(), Some("authorization_code"));

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), server).await.unwrap().unwrap();
}

/// Password guesses on the sign-in page count per address with the token endpoint's failed
/// logons: opening form after form (each allows a few tries) does not get around the cap. Over
/// the real HTTPS listener, which knows the peer address.
#[tokio::test]
async fn sign_in_guesses_over_many_forms_are_capped_per_address() {
    let ca = ferry_core::tls::LocalCa::generate("ferry test ca").unwrap();
    let cert = ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    let tls = https_server_config(&cert, Some(ca.cert_pem())).unwrap();
    let https_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = https_l.local_addr().unwrap();
    let svc = TokenService::new(config(&addr.to_string())).unwrap();
    let shutdown = ferry_core::Shutdown::new();
    let server =
        tokio::spawn(run(svc.clone(), Listeners { http: None, https: Some((https_l, tls)) }, shutdown.clone()));
    let tls_client = ferry_core::tls::client_config(ca.cert_pem(), None, &[]).unwrap();
    let browser = reqwest::Client::builder()
        .use_preconfigured_tls((*tls_client).clone())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("https://{addr}");
    let sign_in = |password: &'static str| {
        let (browser, base) = (browser.clone(), base.clone());
        async move {
            let resp = browser.get(format!("{base}/oauth/authorize?{}", form(&pkce_request()))).send().await.unwrap();
            let cookie = resp.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
            let page = Reply { status: StatusCode::OK, headers: HeaderMap::new(), text: resp.text().await.unwrap() };
            let resp = browser
                .post(format!("{base}/login"))
                .header("content-type", FORM)
                .header("cookie", cookie)
                .body(form(&[("request", &page.form_id()), ("username", "alice"), ("password", password)]))
                .send()
                .await
                .unwrap();
            let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            (resp.status(), retry, resp.text().await.unwrap())
        }
    };
    let mut wrong = 0;
    loop {
        let (status, retry, text) = sign_in("guess").await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert!(retry.is_some(), "429 without Retry-After");
            assert!(text.contains("Too many failed sign-ins from this address"), "{text}");
            break;
        }
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
        wrong += 1;
        assert!(wrong <= 40, "40 wrong passwords on fresh forms and still no 429");
    }
    assert!(wrong >= 5, "capped after {wrong} guesses: the per-address budget is larger than a form's");
    // The right password from that address waits too, and the token endpoint shares the budget.
    let (status, _, _) = sign_in("alice-pw").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let resp = browser
        .post(format!("{base}/oauth/token"))
        .header("content-type", FORM)
        .body(form(&[("grant_type", "client_credentials"), ("client_id", APP), ("client_secret", APP_SECRET)]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), server).await.unwrap().unwrap();
}
