#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The admin API as values (`router.oneshot`), persistence across a reopen, and secrets at rest.

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use ferry_auth::KeySet;
use ferry_auth::token_service::{OAuthClient, Tenant, TokenService, TokenServiceConfig, User};
use ferry_core::Secret;
use ferry_directory::{Directory, Endpoints, admin};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const ADMIN_ID: &str = "ferry-admin";
const ADMIN_SECRET: &str = "admin-secret";
const PLAIN_ID: &str = "not-admin";
const PLAIN_SECRET: &str = "plain-secret";
const SYSTEM_ZONE: &str = "system-zone";

fn endpoints() -> Endpoints {
    Endpoints {
        token_url: "http://127.0.0.1:18081".into(),
        uaadomain: "127.0.0.1:18443".into(),
        destination_url: "http://127.0.0.1:18082".into(),
        proxy_host: "127.0.0.1".into(),
        http_proxy_port: 20003,
        socks5_port: 20004,
        tunnel: "127.0.0.1:20005".into(),
    }
}

struct Stack {
    dir: Arc<Directory>,
    tokens: Arc<TokenService>,
    router: Router,
}

/// A token service with a static system tenant holding the admin client and a client without
/// the admin authority, plus everything in the directory at `path`.
fn stack(path: &Path) -> Stack {
    stack_with_ca(path, None)
}

fn stack_with_ca(path: &Path, ca: Option<Arc<ferry_core::tls::LocalCa>>) -> Stack {
    stack_with_users(path, ca, Vec::new())
}

fn stack_with_users(path: &Path, ca: Option<Arc<ferry_core::tls::LocalCa>>, users: Vec<User>) -> Stack {
    let dir = Directory::open(path, &Secret::new([9u8; 32]), endpoints(), ca).unwrap();
    let (tenants, clients) = dir.token_entries().unwrap();
    let client = |id: &str, secret: &str, authorities: &[&str]| OAuthClient {
        client_id: id.into(),
        client_secret: secret.into(),
        tenant_id: SYSTEM_ZONE.into(),
        xsappname: id.into(),
        authorities: authorities.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let tokens = TokenService::with_runtime_entries(
        TokenServiceConfig {
            tenants: vec![Tenant {
                id: SYSTEM_ZONE.into(),
                subdomain: "system".into(),
                keys: Arc::new(KeySet::generate().unwrap()),
            }],
            clients: vec![
                client(ADMIN_ID, ADMIN_SECRET, &[admin::ADMIN_SCOPE]),
                client(PLAIN_ID, PLAIN_SECRET, &["uaa.resource"]),
            ],
            users,
            public_url: "http://127.0.0.1:18081".into(),
            uaadomain: "127.0.0.1:18443".into(),
            ..Default::default()
        },
        tenants,
        clients,
    )
    .unwrap();
    dir.attach(tokens.clone());
    let router = tokens.router().merge(admin::router(dir.clone()));
    Stack { dir, tokens, router }
}

async fn send(router: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
    (status, v)
}

async fn token(router: &Router, id: &str, secret: &str) -> Option<String> {
    let body = format!("grant_type=client_credentials&client_id={}&client_secret={secret}", urlencode(id));
    let req = Request::post("/oauth/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap();
    let (status, v) = send(router, req).await;
    (status == StatusCode::OK).then(|| v["access_token"].as_str().unwrap().to_owned())
}

fn urlencode(s: &str) -> String {
    s.replace('!', "%21").replace('|', "%7C")
}

async fn api(
    router: &Router,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(format!("{}{path}", admin::BASE));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = match body {
        Some(b) => req.header("content-type", "application/json").body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    send(router, req).await
}

#[tokio::test]
async fn every_status_of_the_admin_api() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(&tmp.path().join("directory.db"));
    let r = &s.router;
    let admin = token(r, ADMIN_ID, ADMIN_SECRET).await.unwrap();
    let admin = Some(admin.as_str());

    // 401 without or with a bad token, 403 without the scope.
    let (st, v) = api(r, None, "GET", "/subaccounts", None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"], "unauthorized");
    assert_eq!(api(r, Some("garbage"), "GET", "/subaccounts", None).await.0, StatusCode::UNAUTHORIZED);
    let plain = token(r, PLAIN_ID, PLAIN_SECRET).await.unwrap();
    let (st, v) = api(r, Some(&plain), "GET", "/subaccounts", None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(v["message"].as_str().unwrap().contains("ferry.admin"));

    // Subaccounts: 400 naming the field, 201, 409, 200, 404.
    let (st, v) = api(r, admin, "POST", "/subaccounts", Some(json!({}))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["field"], "subdomain");
    let (st, v) = api(r, admin, "POST", "/subaccounts", Some(json!({"subdomain": "no spaces"}))).await;
    assert_eq!((st, v["field"].as_str()), (StatusCode::BAD_REQUEST, Some("subdomain")));
    let (st, v) = api(r, admin, "POST", "/subaccounts", Some(json!({"subdomain": "ok", "id": "not-a-guid"}))).await;
    assert_eq!((st, v["field"].as_str()), (StatusCode::BAD_REQUEST, Some("id")));
    let (st, _) = api(r, admin, "POST", "/subaccounts", None).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, sub) = api(r, admin, "POST", "/subaccounts", Some(json!({"subdomain": "tenant-a"}))).await;
    assert_eq!(st, StatusCode::CREATED, "{sub}");
    let sid = sub["id"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&sid).is_ok());
    let (st, _) = api(r, admin, "POST", "/subaccounts", Some(json!({"subdomain": "TENANT-A"}))).await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, _) = api(r, admin, "POST", "/subaccounts", Some(json!({"subdomain": "other", "id": sid}))).await;
    assert_eq!(st, StatusCode::CONFLICT);
    // The static system tenant's subdomain is taken too.
    let (st, _) = api(r, admin, "POST", "/subaccounts", Some(json!({"subdomain": "system"}))).await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, v) = api(r, admin, "GET", "/subaccounts", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert_eq!(api(r, admin, "GET", &format!("/subaccounts/{sid}"), None).await.0, StatusCode::OK);
    let missing = uuid::Uuid::new_v4();
    assert_eq!(api(r, admin, "GET", &format!("/subaccounts/{missing}"), None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(api(r, admin, "DELETE", &format!("/subaccounts/{missing}"), None).await.0, StatusCode::NOT_FOUND);

    // Service instances.
    let ipath = format!("/subaccounts/{sid}/service-instances");
    let (st, v) = api(r, admin, "POST", &ipath, Some(json!({"service": "mail", "name": "x"}))).await;
    assert_eq!((st, v["field"].as_str()), (StatusCode::BAD_REQUEST, Some("service")));
    let (st, v) = api(r, admin, "POST", &ipath, Some(json!({"service": "destination"}))).await;
    assert_eq!((st, v["field"].as_str()), (StatusCode::BAD_REQUEST, Some("name")));
    let (st, v) = api(r, admin, "POST", &ipath, Some(json!({"service": "destination", "name": "d", "x": 1}))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let (st, inst) = api(r, admin, "POST", &ipath, Some(json!({"service": "destination", "name": "dest"}))).await;
    assert_eq!(st, StatusCode::CREATED, "{inst}");
    assert_eq!(inst["plan"], "lite");
    let iid = inst["id"].as_str().unwrap().to_owned();
    let (st, _) = api(r, admin, "POST", &ipath, Some(json!({"service": "xsuaa", "name": "dest"}))).await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, v) = api(r, admin, "GET", &ipath, None).await;
    assert_eq!((st, v["items"].as_array().unwrap().len()), (StatusCode::OK, 1));
    let (st, _) = api(r, admin, "GET", &format!("/subaccounts/{missing}/service-instances"), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = api(r, admin, "POST", &format!("/subaccounts/{missing}/service-instances"), Some(json!({}))).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Service keys: the credentials once, never again in lists.
    let kpath = format!("{ipath}/{iid}/service-keys");
    let (st, v) = api(r, admin, "POST", &kpath, Some(json!({"name": "k", "credential_type": "pgp"}))).await;
    assert_eq!((st, v["field"].as_str()), (StatusCode::BAD_REQUEST, Some("credential_type")));
    let (st, creds) = api(r, admin, "POST", &kpath, Some(json!({"name": "k1"}))).await;
    assert_eq!(st, StatusCode::CREATED, "{creds}");
    for field in
        ["clientid", "clientsecret", "url", "uaadomain", "identityzone", "tenantid", "xsappname", "instanceid", "uri"]
    {
        assert!(creds[field].is_string(), "{field} in {creds}");
    }
    assert_eq!(creds["tenantid"], sid.as_str());
    assert_eq!(creds["identityzone"], "tenant-a");
    assert_eq!(creds["instanceid"], iid.as_str());
    assert_eq!(creds["credential-type"], "binding-secret");
    let (st, _) = api(r, admin, "POST", &kpath, Some(json!({"name": "k1"}))).await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, list) = api(r, admin, "GET", &kpath, None).await;
    assert_eq!(st, StatusCode::OK);
    let secret = creds["clientsecret"].as_str().unwrap();
    assert!(!list.to_string().contains(secret), "lists never carry secrets");
    let kid = list["items"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(api(r, admin, "GET", &format!("{kpath}/{kid}"), None).await.0, StatusCode::OK);
    assert_eq!(api(r, admin, "GET", &format!("{kpath}/{missing}"), None).await.0, StatusCode::NOT_FOUND);

    // The key gets tokens in its subaccount at once.
    let client_id = creds["clientid"].as_str().unwrap();
    let t = token(r, client_id, secret).await.expect("token for the new key");
    let claims = s.tokens.verifier().verify(&t).await.unwrap();
    assert_eq!(claims.zid, sid);
    assert_eq!(claims.ext_attr.serviceinstanceid.as_deref(), Some(iid.as_str()));
    assert!(token(r, client_id, "wrong").await.is_none());

    // A connectivity key carries the proxy, ports as strings.
    let (_, conn) = api(r, admin, "POST", &ipath, Some(json!({"service": "connectivity", "name": "conn"}))).await;
    let cpath = format!("{ipath}/{}/service-keys", conn["id"].as_str().unwrap());
    let (st, c) = api(r, admin, "POST", &cpath, Some(json!({"name": "k"}))).await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(c["onpremise_proxy_port"], "20003");
    assert_eq!(c["onpremise_socks5_proxy_port"], "20004");
    // BTP also hands out the RFC/LDAP port 20001, whose protocol is undocumented and not served:
    // a client must not be sent to a port where nothing answers.
    assert!(c.get("onpremise_proxy_rfc_port").is_none() && c.get("onpremise_proxy_ldap_port").is_none(), "{c}");

    // Deleting the key stops its tokens; deleting it again is a 404.
    assert_eq!(api(r, admin, "DELETE", &format!("{kpath}/{kid}"), None).await.0, StatusCode::NO_CONTENT);
    assert!(token(r, client_id, secret).await.is_none());
    assert_eq!(api(r, admin, "DELETE", &format!("{kpath}/{kid}"), None).await.0, StatusCode::NOT_FOUND);

    // Deleting the instance, then the subaccount: its tokens no longer verify.
    assert_eq!(api(r, admin, "DELETE", &format!("{ipath}/{iid}"), None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(api(r, admin, "DELETE", &format!("{ipath}/{iid}"), None).await.0, StatusCode::NOT_FOUND);
    let (_, c2) = api(r, admin, "POST", &cpath, Some(json!({"name": "k2"}))).await;
    let t2 = token(r, c2["clientid"].as_str().unwrap(), c2["clientsecret"].as_str().unwrap()).await.unwrap();
    assert_eq!(api(r, admin, "DELETE", &format!("/subaccounts/{sid}"), None).await.0, StatusCode::NO_CONTENT);
    assert!(s.tokens.verifier().verify(&t2).await.is_err());
    assert!(token(r, c2["clientid"].as_str().unwrap(), c2["clientsecret"].as_str().unwrap()).await.is_none());

    // The static tenant of the admin client cannot be deleted (it is not in the directory).
    assert_eq!(api(r, admin, "DELETE", &format!("/subaccounts/{SYSTEM_ZONE}"), None).await.0, StatusCode::NOT_FOUND);
    // Unknown admin paths are JSON 404s.
    assert_eq!(api(r, admin, "GET", "/nothing", None).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn survives_a_restart_and_keeps_secrets_hashed() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("directory.db");
    let (sid, kept, gone) = {
        let s = stack(&path);
        let r = &s.router;
        let admin = token(r, ADMIN_ID, ADMIN_SECRET).await.unwrap();
        let admin = Some(admin.as_str());
        let (_, sub) = api(r, admin, "POST", "/subaccounts", Some(json!({"subdomain": "persisted"}))).await;
        let sid = sub["id"].as_str().unwrap().to_owned();
        let ipath = format!("/subaccounts/{sid}/service-instances");
        let (_, inst) = api(r, admin, "POST", &ipath, Some(json!({"service": "xsuaa", "name": "app"}))).await;
        let kpath = format!("{ipath}/{}/service-keys", inst["id"].as_str().unwrap());
        let (_, kept) = api(r, admin, "POST", &kpath, Some(json!({"name": "kept"}))).await;
        let (_, gone) = api(r, admin, "POST", &kpath, Some(json!({"name": "gone"}))).await;
        let (_, list) = api(r, admin, "GET", &kpath, None).await;
        let gone_id = list["items"].as_array().unwrap().iter().find(|k| k["name"] == "gone").unwrap()["id"].clone();
        let del = format!("{kpath}/{}", gone_id.as_str().unwrap());
        assert_eq!(api(r, admin, "DELETE", &del, None).await.0, StatusCode::NO_CONTENT);
        drop(s.dir);
        (sid, kept, gone)
    };
    // Secrets are not in the file, only their hashes.
    let bytes = std::fs::read(&path).unwrap();
    let hay = String::from_utf8_lossy(&bytes);
    for c in [&kept, &gone] {
        assert!(!hay.contains(c["clientsecret"].as_str().unwrap()), "secret stored in the clear");
    }
    assert!(hay.contains("$argon2id$"));

    let s = stack(&path);
    let r = &s.router;
    assert_eq!(s.dir.subaccount(&sid).unwrap().subdomain, "persisted");
    let t = token(r, kept["clientid"].as_str().unwrap(), kept["clientsecret"].as_str().unwrap())
        .await
        .expect("the kept key works after a restart");
    assert_eq!(s.tokens.verifier().verify(&t).await.unwrap().zid, sid);
    assert!(token(r, gone["clientid"].as_str().unwrap(), gone["clientsecret"].as_str().unwrap()).await.is_none());

    // A wrong master key cannot open the signing keys.
    let wrong = Directory::open(&path, &Secret::new([1u8; 32]), endpoints(), None).unwrap();
    assert!(wrong.token_entries().is_err());
}

#[tokio::test]
async fn x509_keys_carry_a_certificate_and_no_secret() {
    ferry_core::init_crypto();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Arc::new(ferry_core::tls::LocalCa::generate("test CA").unwrap());
    let s = stack_with_ca(&tmp.path().join("directory.db"), Some(ca));
    let r = &s.router;
    let admin = token(r, ADMIN_ID, ADMIN_SECRET).await.unwrap();
    let admin = Some(admin.as_str());
    let (_, sub) = api(r, admin, "POST", "/subaccounts", Some(json!({"subdomain": "certs"}))).await;
    let ipath = format!("/subaccounts/{}/service-instances", sub["id"].as_str().unwrap());
    let (_, inst) =
        api(r, admin, "POST", &ipath, Some(json!({"service": "xsuaa", "name": "app", "plan": "broker"}))).await;
    assert_eq!(inst["plan"], "broker");
    let kpath = format!("{ipath}/{}/service-keys", inst["id"].as_str().unwrap());
    let (st, c) = api(r, admin, "POST", &kpath, Some(json!({"name": "cert", "credential_type": "x509"}))).await;
    assert_eq!(st, StatusCode::CREATED, "{c}");
    assert_eq!(c["credential-type"], "x509");
    assert!(c["certificate"].as_str().unwrap().contains("BEGIN CERTIFICATE"));
    assert!(c["key"].as_str().unwrap().contains("PRIVATE KEY"));
    assert_eq!(c["certurl"], "https://127.0.0.1:18443");
    assert!(c.get("clientsecret").is_none());
    let (_, list) = api(r, admin, "GET", &kpath, None).await;
    assert_eq!(list["items"][0]["credential_type"], "x509");
    assert!(!list.to_string().contains("PRIVATE KEY"));
}

#[tokio::test]
async fn an_x509_key_signs_client_assertions_after_a_restart() {
    ferry_core::init_crypto();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("directory.db");
    let ca = Arc::new(ferry_core::tls::LocalCa::generate("test CA").unwrap());
    let key = {
        let s = stack_with_ca(&path, Some(ca.clone()));
        let r = &s.router;
        let admin = token(r, ADMIN_ID, ADMIN_SECRET).await.unwrap();
        let admin = Some(admin.as_str());
        let (_, sub) = api(r, admin, "POST", "/subaccounts", Some(json!({"subdomain": "asserts"}))).await;
        let ipath = format!("/subaccounts/{}/service-instances", sub["id"].as_str().unwrap());
        let (_, inst) = api(r, admin, "POST", &ipath, Some(json!({"service": "xsuaa", "name": "app"}))).await;
        let kpath = format!("{ipath}/{}/service-keys", inst["id"].as_str().unwrap());
        let (st, key) = api(r, admin, "POST", &kpath, Some(json!({"name": "cert", "credential_type": "x509"}))).await;
        assert_eq!(st, StatusCode::CREATED, "{key}");
        assert_eq!(assertion_grant(r, &key).await.0, StatusCode::OK, "before the restart");
        key
    };
    // A new process: the token service is built from the database alone.
    let s = stack_with_ca(&path, Some(ca));
    let (st, body) = assertion_grant(&s.router, &key).await;
    assert_eq!(st, StatusCode::OK, "the key's assertion after a restart: {body}");
    // Another key's private key is not this client's.
    let mut wrong = key.clone();
    let fresh = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &aws_lc_rs::rand::SystemRandom::new(),
    )
    .unwrap();
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, fresh.as_ref())
    );
    wrong["key"] = json!(pem);
    assert_eq!(assertion_grant(&s.router, &wrong).await.0, StatusCode::UNAUTHORIZED, "a key the client never had");
}

/// `client_credentials` with an RFC 7523 assertion signed by the X.509 key's private key.
async fn assertion_grant(router: &Router, key: &Value) -> (StatusCode, Value) {
    let id = key["clientid"].as_str().unwrap();
    let pem = key["key"].as_str().unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap();
    let pair =
        aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING, &der)
            .unwrap();
    let enc = |bytes: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut jti = [0u8; 16];
    aws_lc_rs::rand::fill(&mut jti).unwrap();
    let claims = json!({"iss": id, "sub": id, "aud": "http://127.0.0.1:18081/oauth/token", "iat": now,
        "exp": now + 60, "jti": enc(&jti)});
    let header = json!({"alg": "ES256", "typ": "JWT"});
    let input =
        format!("{}.{}", enc(&serde_json::to_vec(&header).unwrap()), enc(&serde_json::to_vec(&claims).unwrap()));
    let sig = pair.sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes()).unwrap();
    let body = format!(
        "grant_type=client_credentials&client_id={}&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={input}.{}",
        urlencode(id),
        enc(sig.as_ref())
    );
    let req = Request::post("/oauth/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap();
    send(router, req).await
}

#[tokio::test]
async fn ensure_key_keeps_configured_bindings() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Directory::open(&tmp.path().join("d.db"), &Secret::new([3u8; 32]), endpoints(), None).unwrap();
    let sub = dir.create_subaccount("cfg", Some("conf-zone"), None).unwrap();
    let inst = dir.create_instance(&sub.id, "destination", "ferry-destination", None, None, None).unwrap();
    let key = |id: &str, secret: &str| ferry_directory::NewKey {
        name: "default".into(),
        client_id: Some(id.into()),
        secret: Some(secret.into()),
        ..Default::default()
    };
    let (k1, c1) = dir.ensure_key(&sub.id, &inst.id, key("sb-a!b1", "one")).unwrap();
    assert_eq!(c1["clientsecret"], "one");
    assert_eq!(c1["xsappname"], "a!b1");
    // Same client, new secret: the same key, the new secret.
    let (k2, c2) = dir.ensure_key(&sub.id, &inst.id, key("sb-a!b1", "two")).unwrap();
    assert_eq!((k1.id.as_str(), c2["clientsecret"].as_str()), (k2.id.as_str(), Some("two")));
    // Another client id for the same binding: the key is replaced.
    let (k3, _) = dir.ensure_key(&sub.id, &inst.id, key("sb-b!b1", "three")).unwrap();
    assert_ne!(k3.id, k1.id);
    assert_eq!(dir.list_keys(&sub.id, &inst.id).unwrap().len(), 1);
    let (_, clients) = dir.token_entries().unwrap();
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0].client_id, "sb-b!b1");
    assert!(clients[0].client_secret.expose().starts_with("$argon2id$"));
}

#[tokio::test]
async fn connector_enrollment_issues_a_tunnel_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Arc::new(ferry_core::tls::LocalCa::generate("enroll CA").unwrap());
    let s = stack_with_ca(&tmp.path().join("directory.db"), Some(ca));
    let r = &s.router;
    let admin = token(r, ADMIN_ID, ADMIN_SECRET).await.unwrap();
    let admin = Some(admin.as_str());
    let (st, v) = api(r, admin, "POST", "/subaccounts", Some(json!({"subdomain": "enroll"}))).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let sub = v["id"].as_str().unwrap().to_owned();
    let path = format!("/subaccounts/{sub}/connectors");
    let (st, v) = api(r, admin, "POST", &path, Some(json!({"location_id": "plant-7"}))).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["subaccount"], sub.as_str());
    assert_eq!(v["location_id"], "plant-7");
    assert_eq!(v["tunnel"], "127.0.0.1:20005");
    let der = ferry_core::tls::parse_certs(v["certificate"].as_str().unwrap()).unwrap();
    assert_eq!(ferry_core::tls::connector_identity(&der[0]), Some((sub.clone(), "plant-7".to_owned())));
    assert!(v["key"].as_str().unwrap().contains("PRIVATE KEY"));
    assert!(v["ca"].as_str().unwrap().contains("BEGIN CERTIFICATE"));
    let (st, v) = api(r, admin, "POST", &path, Some(json!({}))).await;
    assert_eq!(st, StatusCode::CREATED, "no location id: the default location ({v})");
    assert_eq!(v["location_id"], "");
    // Unknown subaccount, bad location id, unknown field, no admin token.
    assert_eq!(api(r, admin, "POST", "/subaccounts/nope/connectors", Some(json!({}))).await.0, StatusCode::NOT_FOUND);
    let (st, v) = api(r, admin, "POST", &path, Some(json!({"location_id": "bad\nid"}))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(api(r, admin, "POST", &path, Some(json!({"bogus": 1}))).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(api(r, None, "POST", &path, Some(json!({}))).await.0, StatusCode::UNAUTHORIZED);
    // Without a CA there is nothing to enroll with.
    let tmp2 = tempfile::tempdir().unwrap();
    let s2 = stack(&tmp2.path().join("directory.db"));
    let admin2 = token(&s2.router, ADMIN_ID, ADMIN_SECRET).await.unwrap();
    let (_, v) = api(&s2.router, Some(&admin2), "POST", "/subaccounts", Some(json!({"subdomain": "x"}))).await;
    let (st, _) = api(
        &s2.router,
        Some(&admin2),
        "POST",
        &format!("/subaccounts/{}/connectors", v["id"].as_str().unwrap()),
        Some(json!({})),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT);
}

/// Certificate renewal over real mTLS: the connector's current certificate authenticates, its CSR's
/// key is signed for the same identity; no certificate, a non-connector certificate, an expired one
/// or a bad CSR are refused.
#[tokio::test]
async fn a_connector_renews_its_certificate_with_the_current_one_over_mtls() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Arc::new(ferry_core::tls::LocalCa::generate("renew CA").unwrap());
    let s = stack_with_ca(&tmp.path().join("directory.db"), Some(ca.clone()));
    let admin = token(&s.router, ADMIN_ID, ADMIN_SECRET).await.unwrap();
    let (_, v) = api(&s.router, Some(&admin), "POST", "/subaccounts", Some(json!({"subdomain": "renew"}))).await;
    let sub = v["id"].as_str().unwrap().to_owned();
    let enroll = |validity: u64| {
        let (r, admin, sub) = (s.router.clone(), admin.clone(), sub.clone());
        async move {
            let body = json!({"location_id": "plant-9", "validity_seconds": validity});
            let (st, v) = api(&r, Some(&admin), "POST", &format!("/subaccounts/{sub}/connectors"), Some(body)).await;
            assert_eq!(st, StatusCode::CREATED, "{v}");
            ferry_core::tls::CertifiedKey {
                cert_pem: v["certificate"].as_str().unwrap().into(),
                key_pem: Secret::new(v["key"].as_str().unwrap().into()),
            }
        }
    };
    let (st, v) = api(
        &s.router,
        Some(&admin),
        "POST",
        &format!("/subaccounts/{sub}/connectors"),
        Some(json!({"validity_seconds": 0})),
    )
    .await;
    assert_eq!((st, v["field"].as_str()), (StatusCode::BAD_REQUEST, Some("validity_seconds")), "{v}");

    // The admin router on a real HTTPS listener that requests client certificates from the CA.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url =
        format!("https://localhost:{}{}/connectors/certificate", listener.local_addr().unwrap().port(), admin::BASE);
    let server_tls = ferry_auth::token_service::https_server_config(
        &ca.issue_server_cert(&["localhost"]).unwrap(),
        Some(ca.cert_pem()),
    )
    .unwrap();
    let shutdown = ferry_core::Shutdown::new();
    tokio::spawn(ferry_auth::token_service::serve_router_with_tls_info(
        listener,
        s.router.clone(),
        server_tls,
        ferry_core::serve::AcceptOptions::named("renew-test"),
        shutdown.clone(),
    ));
    let renew = |identity: Option<ferry_core::tls::CertifiedKey>, csr: String| {
        let (url, ca_pem) = (url.clone(), ca.cert_pem().to_owned());
        async move {
            let tls = ferry_core::tls::client_config(&ca_pem, identity.as_ref(), &[b"http/1.1"]).unwrap();
            let client = reqwest::Client::builder().use_preconfigured_tls((*tls).clone()).build().unwrap();
            let r = client.post(&url).json(&json!({"csr": csr, "validity_seconds": 3600})).send().await?;
            let status = r.status();
            Ok::<_, reqwest::Error>((status, r.json::<Value>().await.unwrap_or(Value::Null)))
        }
    };

    let current = enroll(3600).await;
    let (csr, new_key) = ferry_core::tls::connector_csr("ignored", "ignored").unwrap();
    let (st, v) = renew(Some(current.clone()), csr).await.unwrap();
    assert_eq!(st, StatusCode::OK, "{v}");
    let renewed =
        ferry_core::tls::CertifiedKey { cert_pem: v["certificate"].as_str().unwrap().into(), key_pem: new_key };
    let der = ferry_core::tls::parse_certs(&renewed.cert_pem).unwrap();
    assert_eq!(
        ferry_core::tls::connector_identity(&der[0]),
        Some((sub.clone(), "plant-9".to_owned())),
        "the identity comes from the presented certificate, not from the CSR"
    );
    // The renewed certificate works with the connector's new key: it renews in turn.
    let (csr, _) = ferry_core::tls::connector_csr(&sub, "plant-9").unwrap();
    assert_eq!(renew(Some(renewed), csr.clone()).await.unwrap().0, StatusCode::OK);

    // Refused: no client certificate, a certificate of the CA that is not a connector's, a bad CSR.
    let (st, v) = renew(None, csr.clone()).await.unwrap();
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    let user = ca.issue_user_cert(&[("CN".into(), "alice".into())], time::Duration::hours(1)).unwrap();
    assert_eq!(renew(Some(user), csr.clone()).await.unwrap().0, StatusCode::UNAUTHORIZED);
    let (st, v) = renew(
        Some(current.clone()),
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
    )
    .await
    .unwrap();
    assert_eq!((st, v["field"].as_str()), (StatusCode::BAD_REQUEST, Some("csr")), "{v}");

    // A short-lived certificate renews while valid; once expired the handshake refuses it.
    let short = enroll(2).await;
    assert_eq!(renew(Some(short.clone()), csr.clone()).await.unwrap().0, StatusCode::OK);
    let der = ferry_core::tls::parse_certs(&short.cert_pem).unwrap();
    let (_, x509) = x509_parser::parse_x509_certificate(&der[0]).unwrap();
    let not_after = x509.validity().not_after.timestamp();
    while (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64) <= not_after {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let expired = renew(Some(short), csr).await;
    assert!(!matches!(expired, Ok((StatusCode::OK, _))), "an expired certificate renewed: {expired:?}");
    shutdown.cancel();
}

/// Onboarding with the subaccount user's password counts failed logons per client address with
/// the token endpoint's limit: an address that used up its failures gets 429 (even with the
/// right password, until the window ends), while a user logging on from elsewhere is not held up.
#[tokio::test]
async fn onboarding_logons_are_capped_per_address_like_the_token_endpoint() {
    const SUB: &str = "5a5b5c5d-0000-4000-8000-0000000000aa";
    let tmp = tempfile::tempdir().unwrap();
    let ca = Arc::new(ferry_core::tls::LocalCa::generate("onboarding test CA").unwrap());
    let user = |name: &str, password: &str| User {
        username: name.into(),
        password: Secret::new(password.into()),
        tenant_id: SUB.into(),
        ..Default::default()
    };
    // The users' zone exists before the token service that knows them is built.
    let path = tmp.path().join("directory.db");
    Directory::open(&path, &Secret::new([9u8; 32]), endpoints(), None)
        .unwrap()
        .create_subaccount("lab", Some(SUB), None)
        .unwrap();
    let s = stack_with_users(&path, Some(ca), vec![user("alice", "alice-pw"), user("bob", "bob-pw")]);
    let (csr, _key) = ferry_core::tls::connector_csr(SUB, "plant").unwrap();
    let onboard = |from: &str, user: &str, password: &str| {
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let mut req = Request::post(format!("{}/subaccounts/{SUB}/connectors/csr", admin::BASE))
            .header("authorization", format!("Basic {basic}"))
            .header("content-type", "application/json")
            .body(Body::from(json!({"csr": csr, "location_id": "plant"}).to_string()))
            .unwrap();
        let peer: std::net::SocketAddr = format!("{from}:40000").parse().unwrap();
        req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        let router = s.router.clone();
        async move {
            let resp = router.oneshot(req).await.unwrap();
            let status = resp.status();
            let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            let v: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
            (status, v, retry_after)
        }
    };
    assert_eq!(onboard("10.0.0.1", "alice", "alice-pw").await.0, StatusCode::CREATED);
    let mut failures = 0;
    let (status, v, retry_after) = loop {
        let r = onboard("10.0.0.1", "alice", "guess").await;
        if r.0 != StatusCode::UNAUTHORIZED {
            break r;
        }
        failures += 1;
        assert!(failures <= 1000, "never locked out");
    };
    assert!(failures >= 5, "locked out after only {failures} failures");
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!(v["message"].as_str().unwrap().contains("too many failed logons"), "{v}");
    assert!(retry_after.unwrap().parse::<u64>().unwrap() >= 1);
    // The right password does not get through from that address either, for now ...
    assert_eq!(onboard("10.0.0.1", "alice", "alice-pw").await.0, StatusCode::TOO_MANY_REQUESTS);
    // ... and the token endpoint shares the count.
    let req = Request::post("/oauth/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .extension(axum::extract::ConnectInfo("10.0.0.1:40001".parse::<std::net::SocketAddr>().unwrap()))
        .body(Body::from(format!("grant_type=client_credentials&client_id={ADMIN_ID}&client_secret={ADMIN_SECRET}")))
        .unwrap();
    assert_eq!(send(&s.router, req).await.0, StatusCode::TOO_MANY_REQUESTS);
    // Another user, from another address, onboards as usual.
    let (status, v, _) = onboard("10.0.0.2", "bob", "bob-pw").await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert!(v["certificate"].as_str().unwrap().contains("BEGIN CERTIFICATE"), "{v}");
}

/// `GET /oauth/authorize` for `client_id` and `redirect_uri`: its status and page.
async fn authorize(router: &Router, client_id: &str, redirect_uri: &str) -> (StatusCode, String) {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    let q = format!("response_type=code&client_id={}&redirect_uri={}", enc(client_id), enc(redirect_uri));
    let resp = router.clone().oneshot(Request::get(format!("/oauth/authorize?{q}")).body(Body::empty()).unwrap()).await;
    let resp = resp.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// An xsuaa instance created with `oauth2-configuration.redirect-uris` (BTP's instance
/// parameters) lets its keys' clients send users back there after signing in, also after a
/// restart; parameters that would not take effect are refused.
#[tokio::test]
async fn xsuaa_instances_register_redirect_uris_for_the_login_flow() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("directory.db");
    let s = stack(&path);
    let r = &s.router;
    let admin = token(r, ADMIN_ID, ADMIN_SECRET).await.unwrap();
    let admin = Some(admin.as_str());
    let (_, sub) = api(r, admin, "POST", "/subaccounts", Some(json!({"subdomain": "apps"}))).await;
    let sid = sub["id"].as_str().unwrap();
    let instances = format!("/subaccounts/{sid}/service-instances");
    let callback = "https://approuter.example/login/callback";
    let params = json!({"oauth2-configuration": {"redirect-uris": [callback, "http://localhost:5000/"]}});
    let (st, inst) =
        api(r, admin, "POST", &instances, Some(json!({"service": "xsuaa", "name": "app-uaa", "parameters": params})))
            .await;
    assert_eq!(st, StatusCode::CREATED, "{inst}");
    assert_eq!(inst["parameters"], params, "the instance shows what it was created with");
    let iid = inst["id"].as_str().unwrap();
    let (st, key) = api(r, admin, "POST", &format!("{instances}/{iid}/service-keys"), Some(json!({"name": "k"}))).await;
    assert_eq!(st, StatusCode::CREATED, "{key}");
    let client_id = key["clientid"].as_str().unwrap().to_owned();

    let (st, page) = authorize(r, &client_id, callback).await;
    assert_eq!(st, StatusCode::OK, "{page}");
    assert_eq!(authorize(r, &client_id, "http://localhost:5000/login/callback").await.0, StatusCode::OK);
    let (st, page) = authorize(r, &client_id, "https://evil.example/login/callback").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(page.contains("is not registered"), "{page}");
    // An instance without them cannot sign users in, as before.
    let (_, plain) = api(r, admin, "POST", &instances, Some(json!({"service": "xsuaa", "name": "no-login"}))).await;
    assert!(plain.get("parameters").is_none(), "{plain}");
    let plain_iid = plain["id"].as_str().unwrap();
    let (_, plain_key) =
        api(r, admin, "POST", &format!("{instances}/{plain_iid}/service-keys"), Some(json!({"name": "k"}))).await;
    let (st, page) = authorize(r, plain_key["clientid"].as_str().unwrap(), callback).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(page.contains("no registered redirect URIs"), "{page}");

    // Refused: on a service users do not sign in through, a bad URI, an unsupported parameter.
    let (st, v) =
        api(r, admin, "POST", &instances, Some(json!({"service": "destination", "name": "d", "parameters": params})))
            .await;
    assert_eq!((st, v["field"].as_str()), (StatusCode::BAD_REQUEST, Some("parameters")), "{v}");
    let bad = json!({"oauth2-configuration": {"redirect-uris": ["https://app.example/cb#frag"]}});
    let (st, v) =
        api(r, admin, "POST", &instances, Some(json!({"service": "xsuaa", "name": "b", "parameters": bad}))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(v["message"].as_str().unwrap().contains("fragment"), "{v}");
    let other = json!({"xsappname": "x", "oauth2-configuration": {"redirect-uris": [callback]}});
    let (st, v) =
        api(r, admin, "POST", &instances, Some(json!({"service": "xsuaa", "name": "c", "parameters": other}))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(v["message"].as_str().unwrap().contains("xsappname"), "{v}");

    // After a restart the token service learns them from the database.
    drop(s);
    let s = stack(&path);
    assert_eq!(authorize(&s.router, &client_id, callback).await.0, StatusCode::OK);
    let admin = token(&s.router, ADMIN_ID, ADMIN_SECRET).await.unwrap();
    let (_, listed) = api(&s.router, Some(&admin), "GET", &instances, None).await;
    let listed = listed["items"].as_array().unwrap().iter().find(|i| i["name"] == "app-uaa").unwrap().clone();
    assert_eq!(listed["parameters"], params);
}
