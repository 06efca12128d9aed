//! The LDAP user store against a real OpenLDAP (`slapd`, started per test by
//! `ferry_testkit::slapd`): the password grant and the login page with directory users,
//! wrong/unknown/empty credentials, filter injection, groups as scopes, the directory being
//! down, and the service account's password staying out of `Debug` output and logs.
//!
//! Needs Debian's `slapd` package (scripts/test.sh installs it); without it these tests fail
//! with a message saying so.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use base64::Engine;
use ferry_auth::KeySet;
use ferry_auth::token_service::{
    LdapConfig, LdapUserStore, Login, OAuthClient, Tenant, TokenService, TokenServiceConfig, User, UserStore, Verdict,
};
use ferry_testkit::slapd::{READER_DN, READER_PW, SUFFIX, Slapd};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

const PROVIDER: &str = "6a8b7c4e-0000-4000-8000-000000000001";
const SUBSCRIBER: &str = "9d2f1e3a-0000-4000-8000-000000000002";
const APP: &str = "sb-app!t1";
const APP_SECRET: &str = "app-secret";
const OTHER: &str = "sb-other!t2";
const OTHER_SECRET: &str = "other-secret";
const CALLBACK: &str = "https://app.example/callback";
const FORM: &str = "application/x-www-form-urlencoded";

/// carol: every attribute, group `Read` (by group search). dave: no mail or given name, group
/// `Write` by a DN-valued attribute on his entry (`seeAlso` stands in for `memberOf`, which
/// needs an overlay), group `Admin` by search. alice: also a local user, with another password.
fn people() -> String {
    format!(
        "dn: uid=carol,ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: carol\ncn: Carol Clark\n\
         givenName: Carol\nsn: Clark\nmail: carol@ferry.test\nuserPassword: carol-pw\n\n\
         dn: uid=dave,ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: dave\ncn: Dave Dent\nsn: Dent\n\
         seeAlso: cn=Write,ou=groups,{SUFFIX}\nuserPassword: dave-pw\n\n\
         dn: uid=alice,ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: alice\ncn: Alice LDAP\nsn: LDAP\n\
         userPassword: ldap-alice-pw\n\n\
         dn: cn=Read,ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: Read\nmember: uid=carol,ou=people,{SUFFIX}\n\n\
         dn: cn=Admin,ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: Admin\nmember: uid=dave,ou=people,{SUFFIX}\n"
    )
}

fn keys() -> &'static (Arc<KeySet>, Arc<KeySet>) {
    static KEYS: OnceLock<(Arc<KeySet>, Arc<KeySet>)> = OnceLock::new();
    KEYS.get_or_init(|| (Arc::new(KeySet::generate().unwrap()), Arc::new(KeySet::generate().unwrap())))
}

fn ldap_config(url: &str) -> LdapConfig {
    LdapConfig {
        url: url.into(),
        bind_dn: READER_DN.into(),
        bind_password: READER_PW.into(),
        base_dn: SUFFIX.into(),
        group_base_dn: Some(format!("ou=groups,{SUFFIX}")),
        group_attribute: Some("seeAlso".into()),
        tenant_id: PROVIDER.into(),
        ..Default::default()
    }
}

fn service_with(ldap: LdapConfig) -> Arc<TokenService> {
    let (pk, sk) = keys();
    let store: Arc<dyn UserStore> = Arc::new(LdapUserStore::new(ldap).unwrap());
    TokenService::new(TokenServiceConfig {
        tenants: vec![
            Tenant { id: PROVIDER.into(), subdomain: "provider".into(), keys: pk.clone() },
            Tenant { id: SUBSCRIBER.into(), subdomain: "subscriber".into(), keys: sk.clone() },
        ],
        clients: vec![
            OAuthClient {
                client_id: APP.into(),
                client_secret: APP_SECRET.into(),
                tenant_id: PROVIDER.into(),
                xsappname: "app!t1".into(),
                scopes: vec!["openid".into(), "app!t1.Read".into(), "app!t1.Write".into()],
                redirect_uris: vec![CALLBACK.into()],
                ..Default::default()
            },
            OAuthClient {
                client_id: OTHER.into(),
                client_secret: OTHER_SECRET.into(),
                tenant_id: PROVIDER.into(),
                xsappname: "other!t2".into(),
                scopes: vec!["openid".into(), "other!t2.Read".into(), "other!t2.Write".into()],
                ..Default::default()
            },
        ],
        users: vec![User {
            username: "alice".into(),
            password: "alice-pw".into(),
            email: "alice@example.com".into(),
            user_id: "u-alice".into(),
            tenant_id: PROVIDER.into(),
            ..Default::default()
        }],
        user_stores: vec![store],
        public_url: "http://127.0.0.1:18081".into(),
        uaadomain: "127.0.0.1:18443".into(),
        ..Default::default()
    })
    .unwrap()
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

    fn claims(&self) -> Value {
        assert_eq!(self.status, StatusCode::OK, "{}", self.text);
        let jwt = self.json()["access_token"].as_str().unwrap().to_owned();
        let seg = jwt.split('.').nth(1).unwrap();
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(seg).unwrap()).unwrap()
    }

    fn assert_error(&self, status: StatusCode, error: &str, mentions: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        let j = self.json();
        assert_eq!(j["error"], error, "{j}");
        let d = j["error_description"].as_str().unwrap();
        assert!(d.contains(mentions), "{d:?} should mention {mentions:?}");
    }
}

async fn send(router: &Router, req: Request<Body>) -> Reply {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply { status, headers, text: String::from_utf8_lossy(&bytes).into_owned() }
}

async fn token(router: &Router, pairs: &[(&str, &str)]) -> Reply {
    let req = Request::post("/oauth/token").header("content-type", FORM).body(Body::from(form(pairs))).unwrap();
    send(router, req).await
}

async fn password_grant(router: &Router, username: &str, password: &str) -> Reply {
    let p = [
        ("grant_type", "password"),
        ("client_id", APP),
        ("client_secret", APP_SECRET),
        ("username", username),
        ("password", password),
    ];
    token(router, &p).await
}

fn scopes(claims: &Value) -> Vec<String> {
    let mut s: Vec<String> = claims["scope"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().into()).collect();
    s.sort();
    s
}

/// A port nothing listens on.
fn closed_port_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("ldap://127.0.0.1:{port}")
}

#[tokio::test]
async fn password_grant_with_an_ldap_user() {
    let slapd = Slapd::start(&people());
    let router = service_with(ldap_config(&slapd.url)).router();
    let c = password_grant(&router, "carol", "carol-pw").await.claims();
    assert_eq!(c["user_name"], "carol");
    assert_eq!(c["email"], "carol@ferry.test");
    assert_eq!(c["given_name"], "Carol");
    assert_eq!(c["family_name"], "Clark");
    assert_eq!(c["origin"], "ldap");
    assert_eq!(c["zid"], PROVIDER);
    let uid = c["user_id"].as_str().unwrap();
    assert!(uid.len() == 36 && uid.matches('-').count() == 4, "user_id is the entryUUID: {uid}");
    assert_eq!(c["sub"], uid);
    // Group Read (found by search) grants app!t1.Read, and nothing else but openid.
    assert_eq!(scopes(&c), ["app!t1.Read", "openid"]);

    // dave has no mail or given name; group Write via his entry's attribute; group Admin is no
    // scope of this client.
    let c = password_grant(&router, "dave", "dave-pw").await.claims();
    assert_eq!(c["family_name"], "Dent");
    assert!(c.get("given_name").is_none_or(Value::is_null), "{c}");
    assert_eq!(scopes(&c), ["app!t1.Write", "openid"]);

    // Exchanged (jwt-bearer) at another client, carol keeps her group: other!t2.Read only.
    let carol = password_grant(&router, "carol", "carol-pw").await.json()["access_token"].as_str().unwrap().to_owned();
    let p = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("client_id", OTHER),
        ("client_secret", OTHER_SECRET),
        ("assertion", &carol),
    ];
    let c = token(&router, &p).await.claims();
    assert_eq!(c["user_name"], "carol");
    assert_eq!(scopes(&c), ["openid", "other!t2.Read"]);
    let p = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("client_id", APP),
        ("client_secret", APP_SECRET),
        ("assertion", &carol),
    ];
    assert_eq!(scopes(&token(&router, &p).await.claims()), ["app!t1.Read", "openid"]);

    // Without group mapping an LDAP user, like a local user without a scope list, gets every
    // scope of the client.
    let no_groups = LdapConfig { group_base_dn: None, group_attribute: None, ..ldap_config(&slapd.url) };
    let c = password_grant(&service_with(no_groups).router(), "carol", "carol-pw").await.claims();
    assert_eq!(scopes(&c), ["app!t1.Read", "app!t1.Write", "openid"]);

    // Many logins at once: each gets its own connection, a bounded number at a time.
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..40 {
        let router = router.clone();
        let pw = if i % 4 == 0 { "wrong" } else { "carol-pw" };
        burst.spawn(async move { (pw, password_grant(&router, "carol", pw).await.status) });
    }
    while let Some(r) = burst.join_next().await {
        let (pw, status) = r.unwrap();
        let expected = if pw == "wrong" { StatusCode::BAD_REQUEST } else { StatusCode::OK };
        assert_eq!(status, expected);
    }

    // The user id falls back to the DN when the entry lacks the configured attribute.
    let by_dn = LdapConfig { user_id_attribute: "employeeNumber".into(), ..ldap_config(&slapd.url) };
    let c = password_grant(&service_with(by_dn).router(), "carol", "carol-pw").await.claims();
    assert_eq!(c["user_id"], format!("uid=carol,ou=people,{SUFFIX}"));
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_the_same_invalid_grant() {
    let slapd = Slapd::start(&people());
    let router = service_with(ldap_config(&slapd.url)).router();
    let wrong = password_grant(&router, "carol", "not-carol-pw").await;
    wrong.assert_error(StatusCode::BAD_REQUEST, "invalid_grant", "Bad credentials");
    let unknown = password_grant(&router, "nobody", "whatever").await;
    unknown.assert_error(StatusCode::BAD_REQUEST, "invalid_grant", "Bad credentials");
    assert_eq!(wrong.json(), unknown.json(), "the answers must not tell which usernames exist");
    // Local users come first: alice's directory password does not log in the local alice.
    password_grant(&router, "alice", "ldap-alice-pw").await.assert_error(
        StatusCode::BAD_REQUEST,
        "invalid_grant",
        "Bad credentials",
    );
    assert_eq!(password_grant(&router, "alice", "alice-pw").await.claims()["user_id"], "u-alice");
    // A request addressing another zone does not find the directory's users.
    let p = [
        ("grant_type", "password"),
        ("client_id", APP),
        ("client_secret", APP_SECRET),
        ("username", "carol"),
        ("password", "carol-pw"),
    ];
    let req = Request::post("/oauth/token")
        .header("content-type", FORM)
        .header("x-zid", SUBSCRIBER)
        .body(Body::from(form(&p)))
        .unwrap();
    send(&router, req).await.assert_error(StatusCode::BAD_REQUEST, "invalid_grant", "Bad credentials");
}

#[tokio::test]
async fn empty_passwords_never_verify() {
    let slapd = Slapd::start(&people());
    // The token endpoint treats an empty parameter as missing.
    let router = service_with(ldap_config(&slapd.url)).router();
    password_grant(&router, "carol", "").await.assert_error(StatusCode::BAD_REQUEST, "invalid_request", "password");
    // The store itself refuses it too: LDAP would take it as an unauthenticated bind.
    let store = LdapUserStore::new(ldap_config(&slapd.url)).unwrap();
    let login = Login { username: "carol", password: "", tenant: None, preferred_tenant: PROVIDER };
    assert!(matches!(store.verify(login).await, Ok(Verdict::WrongPassword)));
    let login = Login { password: "carol-pw", ..login };
    assert!(matches!(store.verify(login).await, Ok(Verdict::Verified(_))));
}

#[tokio::test]
async fn usernames_cannot_inject_filters() {
    let slapd = Slapd::start(&people());
    let router = service_with(ldap_config(&slapd.url)).router();
    // Unescaped, `car*` would match carol and log in with her password.
    for name in ["car*", "*", "*)(uid=*", "carol)(|(uid=*", "carol\\", "carol\0"] {
        let r = password_grant(&router, name, "carol-pw").await;
        r.assert_error(StatusCode::BAD_REQUEST, "invalid_grant", "Bad credentials");
    }
    assert_eq!(password_grant(&router, "carol", "carol-pw").await.status, StatusCode::OK);
}

#[tokio::test]
async fn directory_down_is_503_not_invalid_grant() {
    // Nothing listening.
    let router = service_with(ldap_config(&closed_port_url())).router();
    let r = password_grant(&router, "carol", "carol-pw").await;
    r.assert_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "user directory");
    assert!(r.json()["error_description"].as_str().unwrap().contains("unavailable"), "{}", r.text);
    // Local users still log in without asking the directory.
    assert_eq!(password_grant(&router, "alice", "alice-pw").await.status, StatusCode::OK);

    // A server that accepts but never answers: the timeout applies.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ldap://{}", silent.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let router = service_with(LdapConfig { timeout_secs: 1, ..ldap_config(&url) }).router();
    let started = Instant::now();
    let r = password_grant(&router, "carol", "carol-pw").await;
    r.assert_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "user directory");
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    hold.abort();

    // The directory refusing the service account is the directory's problem, not the user's.
    let slapd = Slapd::start(&people());
    let router = service_with(LdapConfig { bind_password: "wrong".into(), ..ldap_config(&slapd.url) }).router();
    let r = password_grant(&router, "carol", "carol-pw").await;
    r.assert_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "service account");

    // And slapd stopping under a running service.
    let router = service_with(ldap_config(&slapd.url)).router();
    assert_eq!(password_grant(&router, "carol", "carol-pw").await.status, StatusCode::OK);
    drop(slapd);
    let r = password_grant(&router, "carol", "carol-pw").await;
    r.assert_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "user directory");
}

/// The login form: read the hidden form id and the cookie of a login page.
fn form_id_and_cookie(page: &Reply) -> (String, String) {
    let marker = "name=\"request\" value=\"";
    let start = page.text.find(marker).unwrap_or_else(|| panic!("no form in {}", page.text)) + marker.len();
    let id = page.text[start..].split('"').next().unwrap().to_owned();
    let cookie = page.headers["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    (id, cookie)
}

async fn sign_in(router: &Router, page: &Reply, username: &str, password: &str) -> Reply {
    let (id, cookie) = form_id_and_cookie(page);
    let body = form(&[("request", &id), ("username", username), ("password", password), ("action", "login")]);
    let req = Request::post("/login").header("content-type", FORM).header("cookie", cookie).body(Body::from(body));
    send(router, req.unwrap()).await
}

async fn login_page(router: &Router) -> Reply {
    let q = form(&[("response_type", "code"), ("client_id", APP), ("redirect_uri", CALLBACK), ("state", "s1")]);
    let page = send(router, Request::get(format!("/oauth/authorize?{q}")).body(Body::empty()).unwrap()).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    page
}

#[tokio::test]
async fn login_page_with_an_ldap_user() {
    let slapd = Slapd::start(&people());
    let router = service_with(ldap_config(&slapd.url)).router();
    let page = login_page(&router).await;
    let wrong = sign_in(&router, &page, "carol", "nope").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{}", wrong.text);
    assert!(wrong.text.contains("Invalid username or password."));
    let ok = sign_in(&router, &page, "carol", "carol-pw").await;
    assert_eq!(ok.status, StatusCode::FOUND, "{}", ok.text);
    let location = url::Url::parse(ok.headers["location"].to_str().unwrap()).unwrap();
    let code = location.query_pairs().find(|(k, _)| k == "code").unwrap().1.into_owned();
    let p = [
        ("grant_type", "authorization_code"),
        ("client_id", APP),
        ("client_secret", APP_SECRET),
        ("code", &code),
        ("redirect_uri", CALLBACK),
    ];
    let c = token(&router, &p).await.claims();
    assert_eq!((c["user_name"].as_str(), c["email"].as_str()), (Some("carol"), Some("carol@ferry.test")));
    assert_eq!(c["grant_type"], "authorization_code");
    assert_eq!(scopes(&c), ["app!t1.Read", "openid"]);

    // The directory down: the page says so, and the form stays usable afterwards.
    let router = service_with(ldap_config(&closed_port_url())).router();
    let page = login_page(&router).await;
    let r = sign_in(&router, &page, "carol", "carol-pw").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    assert!(r.text.contains("temporarily unavailable"), "{}", r.text);
    let r = sign_in(&router, &page, "alice", "alice-pw").await;
    assert_eq!(r.status, StatusCode::FOUND, "{}", r.text);
}

/// Collects everything logged (tracing, and the `log` records of the LDAP client) in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_service_password_stays_out_of_debug_output_and_logs() {
    use tracing_subscriber::util::SubscriberInitExt as _;
    let captured = Captured::default();
    let writer = captured.clone();
    // Global (and with the `log` bridge), so that every thread's output is caught.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish()
        .try_init();
    let slapd = Slapd::start(&people());
    let svc = service_with(ldap_config(&slapd.url));
    let router = svc.router();
    assert_eq!(password_grant(&router, "carol", "carol-pw").await.status, StatusCode::OK);
    assert_eq!(password_grant(&router, "carol", "wrong").await.status, StatusCode::BAD_REQUEST);
    let refused = service_with(LdapConfig { bind_dn: format!("cn=nobody,{SUFFIX}"), ..ldap_config(&slapd.url) });
    assert_eq!(password_grant(&refused.router(), "carol", "carol-pw").await.status, StatusCode::SERVICE_UNAVAILABLE);
    drop(slapd);
    assert_eq!(password_grant(&router, "carol", "carol-pw").await.status, StatusCode::SERVICE_UNAVAILABLE);

    let debug = format!("{svc:?} {:?}", ldap_config("ldap://x"));
    assert!(debug.contains(READER_DN), "the DN is not secret: {debug}");
    assert!(!debug.contains(READER_PW), "{debug}");
    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(logs.contains("user store unavailable"), "the logs were captured: {logs}");
    assert!(!logs.contains(READER_PW), "{logs}");
    assert!(!logs.contains("carol-pw"), "{logs}");
}

#[tokio::test]
async fn ldaps_and_starttls_with_a_private_ca() {
    let ca = ferry_core::tls::LocalCa::generate("ldap test ca").unwrap();
    let cert = ca.issue_server_cert(&["127.0.0.1", "localhost"]).unwrap();
    let slapd = Slapd::start_tls(&people(), &cert.cert_pem, cert.key_pem.expose());
    let ca_file = std::env::temp_dir().join(format!("ferry-ldap-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let ldaps = slapd.ldaps_url.clone().unwrap();

    let over_ldaps = LdapConfig { ca_file: Some(ca_file.clone()), ..ldap_config(&ldaps) };
    let c = password_grant(&service_with(over_ldaps).router(), "carol", "carol-pw").await.claims();
    assert_eq!(c["email"], "carol@ferry.test");
    let starttls = LdapConfig { starttls: true, ca_file: Some(ca_file.clone()), ..ldap_config(&slapd.url) };
    let router = service_with(starttls).router();
    assert_eq!(password_grant(&router, "carol", "carol-pw").await.claims()["user_name"], "carol");
    password_grant(&router, "carol", "nope").await.assert_error(StatusCode::BAD_REQUEST, "invalid_grant", "Bad");

    // A certificate nobody vouches for is the directory's problem: 503, not a login failure.
    let untrusted = service_with(ldap_config(&ldaps)).router();
    let r = password_grant(&untrusted, "carol", "carol-pw").await;
    r.assert_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "cannot connect");
    let untrusted = service_with(LdapConfig { starttls: true, ..ldap_config(&slapd.url) }).router();
    let r = password_grant(&untrusted, "carol", "carol-pw").await;
    r.assert_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "cannot connect");
    let _ = std::fs::remove_file(&ca_file);
}
