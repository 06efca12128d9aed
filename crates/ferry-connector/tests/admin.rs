#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The admin REST API over real HTTPS on 127.0.0.1, managing a connector whose tunnel goes to
//! a real proxy, with app requests through that proxy to an echo backend.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use ferry_connector::admin::{Admin, AdminConfig};
use ferry_core::Shutdown;
use ferry_testkit::{EchoBackend, SUBACCOUNT, TunnelPair, eventually};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpStream;

const NEW_PASSWORD: &str = "correct horse battery";
const CONF: &str = "/api/v1/configuration";

struct Running {
    base: String,
    client: reqwest::Client,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(dir: &Path) -> Self {
        Self::start_with(dir, |_| {}).await
    }

    async fn start_with(dir: &Path, adjust: impl FnOnce(&mut AdminConfig)) -> Self {
        ferry_core::init_crypto();
        let mut cfg = AdminConfig::new(dir.to_owned());
        cfg.connection.backoff_initial = Duration::from_millis(20);
        cfg.connection.backoff_max = Duration::from_millis(200);
        adjust(&mut cfg);
        let shutdown = Shutdown::new();
        let admin = Admin::start(cfg, shutdown.clone()).await.unwrap();
        let listener = ferry_testkit::listener().await;
        let base = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let task = tokio::spawn(admin.clone().serve(listener, shutdown.clone()));
        let client = ferry_core::tls::http_client(Some(admin.ui_ca_pem())).unwrap();
        Self { base, client, shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.base))
    }

    /// A call with Basic authentication as the administrator.
    async fn call(&self, method: Method, path: &str, password: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut r = self.req(method, path).basic_auth("Administrator", Some(password));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn admin_call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call(method, path, NEW_PASSWORD, body).await
    }

    async fn change_initial_password(&self) {
        let (s, _) = self
            .call(
                Method::PUT,
                &format!("{CONF}/connector/authentication/basic"),
                "manage",
                Some(json!({"oldPassword": "manage", "newPassword": NEW_PASSWORD})),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
    }
}

/// Ferry's authentication data for SUBACCOUNT at `location`, as `ferry connector enroll` prints it.
fn authentication_data(pair: &TunnelPair, location: &str) -> Value {
    let id = pair.ca.issue_connector_cert(SUBACCOUNT, location, time::Duration::days(1)).unwrap();
    json!({"subaccount": SUBACCOUNT, "location_id": location, "certificate": id.cert_pem,
           "key": id.key_pem.expose(), "ca": pair.ca.cert_pem(), "tunnel": pair.tunnel_addr.to_string()})
}

struct ProxyClient {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl ProxyClient {
    async fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
        tokio::spawn(conn);
        Self { sender }
    }

    async fn get(&mut self, pair: &TunnelPair, location: &str, uri: &str) -> u16 {
        self.get_as(pair, location, uri, None).await
    }

    /// With `user`, the request propagates that user token (`SAP-Connectivity-Authentication`).
    async fn get_as(&mut self, pair: &TunnelPair, location: &str, uri: &str, user: Option<&str>) -> u16 {
        self.get_body_as(pair, location, uri, user).await.0
    }

    async fn get_body_as(&mut self, pair: &TunnelPair, location: &str, uri: &str, user: Option<&str>) -> (u16, Bytes) {
        let mut req = http::Request::get(uri)
            .header("host", uri.split('/').nth(2).unwrap())
            .header("proxy-authorization", format!("Bearer {}", pair.token()))
            .header("sap-connectivity-scc-location_id", location);
        if let Some(u) = user {
            req = req.header("sap-connectivity-authentication", format!("Bearer {u}"));
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    }
}

fn sub_path(pair: &TunnelPair) -> String {
    format!("{CONF}/subaccounts/{}/{SUBACCOUNT}", pair.tunnel_addr)
}

async fn add_subaccount(api: &Running, pair: &TunnelPair, location: &str) {
    let data = base64::engine::general_purpose::STANDARD.encode(authentication_data(pair, location).to_string());
    let resp = api
        .req(Method::POST, &format!("{CONF}/subaccounts"))
        .basic_auth("Administrator", Some(NEW_PASSWORD))
        .json(&json!({"authenticationData": data, "displayName": "Test", "description": "made by a test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.headers()["location"].to_str().unwrap(), sub_path(pair));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["locationID"], location);
    assert_eq!(body["displayName"], "Test");
}

async fn add_mapping(api: &Running, pair: &TunnelPair, backend: SocketAddr) {
    let (s, m) = api
        .admin_call(
            Method::POST,
            &format!("{}/systemMappings", sub_path(pair)),
            Some(json!({"virtualHost": "erp.virtual", "virtualPort": 80, "localHost": "127.0.0.1",
                        "localPort": backend.port(), "protocol": "HTTP", "backendType": "abapSys",
                        "authenticationMode": "NONE", "hostInHeader": "virtual"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{m}");
    assert_eq!(m["backendType"], "abapSys");
}

fn heartbeat_of(mon: &Value) -> u64 {
    mon["subaccounts"][0]["tunnel"]["lastHeartbeatTimeStamp"].as_u64().unwrap()
}

#[tokio::test]
async fn the_last_heartbeat_advances_on_an_idle_tunnel_and_stops_when_the_proxy_is_gone() {
    let pair = TunnelPair::start().await;
    let dir = tempfile::tempdir().unwrap();
    let api = Running::start_with(dir.path(), |c| c.connection.heartbeat = Duration::from_millis(100)).await;
    api.change_initial_password().await;
    add_subaccount(&api, &pair, "beat-loc").await;
    pair.wait_connected("beat-loc").await;
    let mon = Method::GET;
    let path = "/api/monitoring/subaccounts";
    eventually!("a first heartbeat", heartbeat_of(&api.admin_call(mon.clone(), path, None).await.1) > 0);
    let first = heartbeat_of(&api.admin_call(mon.clone(), path, None).await.1);
    // No app traffic at all: only the keep-alive PINGs and their answers cross the tunnel.
    eventually!(
        "the heartbeat advances while idle",
        heartbeat_of(&api.admin_call(mon.clone(), path, None).await.1) > first
    );
    let (_, sub) = api.admin_call(Method::GET, &sub_path(&pair), None).await;
    assert!(sub["tunnel"]["lastHeartbeatTimeStamp"].as_u64().unwrap() >= first, "the subaccount API shows it too");

    pair.shutdown.cancel();
    eventually!(
        "the tunnel is seen down",
        api.admin_call(mon.clone(), path, None).await.1["subaccounts"][0]["tunnel"]["connections"] == 0
    );
    let last = heartbeat_of(&api.admin_call(mon.clone(), path, None).await.1);
    assert!(last >= first, "the last heartbeat stays visible after the tunnel broke");
    // Several heartbeat intervals pass (the connector keeps redialling the dead proxy).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(heartbeat_of(&api.admin_call(mon, path, None).await.1), last, "no heartbeat from a dead proxy");
    api.stop().await;
}

#[tokio::test]
async fn initial_password_must_be_changed_first() {
    let dir = tempfile::tempdir().unwrap();
    let api = Running::start(dir.path()).await;
    let (s, body) = api.call(Method::GET, &format!("{CONF}/connector"), "manage", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(body, json!({"type": "FORBIDDEN_REQUEST", "message": "initial password must be changed"}));
    // The probe needs no logon.
    let r = api.req(Method::GET, "/exposed?action=ping").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let pw = format!("{CONF}/connector/authentication/basic");
    let (s, body) =
        api.call(Method::PUT, &pw, "manage", Some(json!({"oldPassword": "wrong", "newPassword": NEW_PASSWORD}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    let (s, body) =
        api.call(Method::PUT, &pw, "manage", Some(json!({"oldPassword": "manage", "newPassword": "short"}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body["message"].as_str().unwrap().contains("at least 8"), "{body}");
    api.change_initial_password().await;

    let (s, _) = api.call(Method::GET, &format!("{CONF}/connector"), "manage", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "the old password is refused");
    let (s, body) = api.admin_call(Method::GET, "/api/v1/connector/version", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body["version"].is_string());
    let (s, body) =
        api.admin_call(Method::PUT, &format!("{CONF}/connector"), Some(json!({"description": "lab"}))).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    let (_, body) = api.admin_call(Method::GET, &format!("{CONF}/connector"), None).await;
    assert_eq!(body["description"], "lab");
    api.stop().await;
}

#[tokio::test]
async fn repeated_wrong_passwords_lock_the_user() {
    let dir = tempfile::tempdir().unwrap();
    let api = Running::start(dir.path()).await;
    api.change_initial_password().await;
    let path = format!("{CONF}/connector");
    let (s, wrong_pw) = api.call(Method::GET, &path, "nope", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // An unknown user gets the very same answer.
    let r = api.req(Method::GET, &path).basic_auth("Nobody", Some("nope")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.json::<Value>().await.unwrap(), wrong_pw);
    for _ in 0..4 {
        assert_eq!(api.call(Method::GET, &path, "nope", None).await.0, StatusCode::UNAUTHORIZED);
    }
    let (s, body) = api.admin_call(Method::GET, &path, None).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "locked even with the right password: {body}");
    assert_eq!(body["type"], "FORBIDDEN_REQUEST");
    api.stop().await;
}

#[tokio::test]
async fn sessions_need_the_csrf_token_basic_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let api = Running::start(dir.path()).await;
    api.change_initial_password().await;
    let path = format!("{CONF}/connector");
    let r = api
        .req(Method::GET, &path)
        .basic_auth("Administrator", Some(NEW_PASSWORD))
        .header("X-CSRF-Token", "Fetch")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let token = r.headers()["x-csrf-token"].to_str().unwrap().to_owned();
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attr in ["HttpOnly", "Secure", "SameSite=Strict"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let session = cookie.split(';').next().unwrap().to_owned();
    assert!(session.starts_with("JSESSIONID="));

    let put = |token: Option<&str>| {
        let mut r = api.req(Method::PUT, &path).header("cookie", &session).json(&json!({"description": "x"}));
        if let Some(t) = token {
            r = r.header("X-CSRF-Token", t);
        }
        r.send()
    };
    let r = put(None).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.unwrap().contains("CSRF"));
    assert_eq!(put(Some("forged")).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(put(Some(&token)).await.unwrap().status(), StatusCode::NO_CONTENT);
    // Reads with the session need no token.
    let r = api.req(Method::GET, &path).header("cookie", &session).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Basic authentication needs no token.
    let (s, _) = api.admin_call(Method::PUT, &path, Some(json!({"description": "y"}))).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // Oversized bodies are refused.
    let big = "x".repeat(2 << 20);
    let r = api
        .req(Method::PUT, &path)
        .basic_auth("Administrator", Some(NEW_PASSWORD))
        .header("content-type", "application/json")
        .body(format!("{{\"description\":\"{big}\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    api.stop().await;
}

#[tokio::test]
async fn mappings_and_resources_apply_to_the_next_request_on_a_kept_alive_connection() {
    let pair = TunnelPair::start().await;
    let echo = EchoBackend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let api = Running::start(dir.path()).await;
    api.change_initial_password().await;
    add_subaccount(&api, &pair, "admin-loc").await;
    pair.wait_connected("admin-loc").await;
    let (s, mon) = api.admin_call(Method::GET, "/api/monitoring/subaccounts", None).await;
    assert_eq!(s, StatusCode::OK);
    eventually!("monitoring shows the tunnel", {
        let (_, mon) = api.admin_call(Method::GET, "/api/monitoring/subaccounts", None).await;
        mon["subaccounts"][0]["tunnel"]["state"] == "Connected"
            && mon["subaccounts"][0]["tunnel"]["connectedSinceTimeStamp"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(mon["subaccounts"][0]["subaccount"], SUBACCOUNT);

    let mut app = ProxyClient::connect(pair.http_addr).await;
    let url = "http://erp.virtual:80/sap/opu/x";
    assert_eq!(app.get(&pair, "admin-loc", url).await, 403, "no mapping yet");
    add_mapping(&api, &pair, echo.addr).await;
    assert_eq!(app.get(&pair, "admin-loc", url).await, 403, "a mapping without resources grants nothing");

    let res = format!("{}/systemMappings/erp.virtual:80/resources", sub_path(&pair));
    let r = api
        .req(Method::POST, &res)
        .basic_auth("Administrator", Some(NEW_PASSWORD))
        .json(&json!({"id": "/sap/opu", "enabled": true, "exactMatchOnly": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(r.headers()["location"].to_str().unwrap().ends_with("/resources/-sap-opu"));
    // Level ALL for this subaccount: allowed requests are audited from now on.
    let level = format!("{CONF}/connector/auditLog/subaccounts/{}/{SUBACCOUNT}", pair.tunnel_addr);
    let (s, _) = api.admin_call(Method::PUT, &level, Some(json!({"level": "ALL"}))).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(api.admin_call(Method::GET, &level, None).await.1, json!({"level": "ALL"}));
    assert_eq!(app.get(&pair, "admin-loc", url).await, 200);
    assert_eq!(echo.hits(), 1);
    let requests = dir.path().join("audit").join(SUBACCOUNT);
    eventually!("the allowed request in the subaccount's audit log", {
        std::fs::read_dir(&requests)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .is_some_and(|e| std::fs::read_to_string(e.path()).unwrap_or_default().contains("Access Allowed"))
    });

    // Suspend it: the next request on the same connection is refused.
    let one = format!("{res}/-sap-opu");
    let (s, body) = api.admin_call(Method::PUT, &one, Some(json!({"enabled": false}))).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["enabled"], false);
    assert_eq!(app.get(&pair, "admin-loc", url).await, 403);
    api.admin_call(Method::PUT, &one, Some(json!({"enabled": true}))).await;
    assert_eq!(app.get(&pair, "admin-loc", url).await, 200);
    let (s, _) = api.admin_call(Method::DELETE, &one, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(app.get(&pair, "admin-loc", url).await, 403);
    assert_eq!(echo.hits(), 2, "denied requests never reached the backend");
    let (s, m) = api.admin_call(Method::GET, &format!("{}/systemMappings/erp.virtual:80", sub_path(&pair)), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(m["totalResourcesCount"], 0);

    // Disconnect and reconnect through the state API.
    let state = format!("{}/state", sub_path(&pair));
    let (s, _) = api.admin_call(Method::PUT, &state, Some(json!({"connected": false}))).await;
    assert_eq!(s, StatusCode::OK);
    let registry = pair.proxy.registry();
    eventually!("tunnel closed", !registry.is_connected(SUBACCOUNT, "admin-loc"));
    api.admin_call(Method::PUT, &state, Some(json!({"connected": true}))).await;
    pair.wait_connected("admin-loc").await;

    // Errors say what is wrong.
    let (s, body) =
        api.admin_call(Method::POST, &format!("{CONF}/subaccounts"), Some(json!({"cloudUser": "me"}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body["message"].as_str().unwrap().contains("authenticationData"));
    let (s, body) = api
        .admin_call(
            Method::POST,
            &format!("{CONF}/subaccounts"),
            Some(json!({"authenticationData": authentication_data(&pair, "admin-loc")})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");

    // Every change is in the audit log, and its chain verifies.
    api.stop().await;
    let folder = dir.path().join("audit").join("_configuration");
    let file = std::fs::read_dir(&folder).unwrap().next().unwrap().unwrap().path();
    let text = std::fs::read_to_string(&file).unwrap();
    for category in ["SCCPassword", "Account", "BackendMapping", "AllowedResource", "AuditLogLevel"] {
        assert!(text.contains(category), "{category} missing in {text}");
    }
    assert!(!text.contains(NEW_PASSWORD));
    assert!(ferry_connector::audit::verify_file(&file).unwrap() >= 7);
}

#[tokio::test]
async fn configuration_survives_restarts_and_backups_restore_it() {
    let pair = TunnelPair::start().await;
    let echo = EchoBackend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let api = Running::start(dir.path()).await;
    api.change_initial_password().await;
    add_subaccount(&api, &pair, "persist").await;
    add_mapping(&api, &pair, echo.addr).await;
    let maps = format!("{}/systemMappings", sub_path(&pair));
    let (_, original) = api.admin_call(Method::GET, &maps, None).await;
    let (s, _) =
        api.admin_call(Method::PATCH, &format!("{CONF}/connector/auditLog"), Some(json!({"level": "ALL"}))).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = api
        .admin_call(
            Method::PUT,
            &format!("{CONF}/connector/onPremises/ppSettings"),
            Some(json!({"expirationToleranceInHr": 2, "certificateValidityInMin": 30})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let config_file = std::fs::read_to_string(dir.path().join("scc-config.json")).unwrap();
    assert!(!config_file.contains("PRIVATE KEY"), "connection keys are sealed at rest");
    api.stop().await;
    let registry = pair.proxy.registry();
    eventually!("tunnel closed on shutdown", !registry.is_connected(SUBACCOUNT, "persist"));

    // Another name for the UI: a new certificate from the same CA, so clients keep trusting it.
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    let (ca_before, cert_before) = (read("ui-ca.pem"), read("ui-cert.pem"));
    let api = Running::start_with(dir.path(), |c| c.ui_names.push("scc.example".into())).await;
    assert_eq!(read("ui-ca.pem"), ca_before);
    assert_ne!(read("ui-cert.pem"), cert_before);
    assert_eq!(api.call(Method::GET, &maps, "manage", None).await.0, StatusCode::UNAUTHORIZED);
    let (s, now) = api.admin_call(Method::GET, &maps, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(now, original);
    pair.wait_connected("persist").await;
    let (_, audit) = api.admin_call(Method::GET, &format!("{CONF}/connector/auditLog"), None).await;
    assert_eq!(audit["level"], "ALL");
    let (_, pp) = api.admin_call(Method::GET, &format!("{CONF}/connector/onPremises/ppSettings"), None).await;
    assert_eq!(pp, json!({"expirationToleranceInHr": 2, "certificateValidityInMin": 30}));

    // Backup, change, restore.
    let r = api
        .req(Method::POST, &format!("{CONF}/backup"))
        .basic_auth("Administrator", Some(NEW_PASSWORD))
        .json(&json!({"password": "backup secret"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let backup = r.bytes().await.unwrap();
    assert!(!String::from_utf8_lossy(&backup).contains("erp.virtual"), "backups are encrypted");
    let (s, _) = api.admin_call(Method::DELETE, &format!("{maps}/erp.virtual:80"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, empty) = api.admin_call(Method::GET, &maps, None).await;
    assert_eq!(empty, json!([]));

    let b64 = base64::engine::general_purpose::STANDARD.encode(&backup);
    let (s, body) =
        api.admin_call(Method::PUT, &format!("{CONF}/backup"), Some(json!({"password": "wrong", "backup": b64}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["type"], "INVALID_REQUEST");
    assert!(body["message"].as_str().unwrap().contains("password"), "{body}");
    let (s, body) = api
        .admin_call(Method::PUT, &format!("{CONF}/backup"), Some(json!({"password": "backup secret", "backup": b64})))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    let (_, restored) = api.admin_call(Method::GET, &maps, None).await;
    assert_eq!(restored, original);
    pair.wait_connected("persist").await;
    // The restored rules are live.
    let res = format!("{maps}/erp.virtual:80/resources");
    let (s, _) = api.admin_call(Method::POST, &res, Some(json!({"id": "/", "enabled": true}))).await;
    assert_eq!(s, StatusCode::CREATED);
    // (A fresh connection per try: the tunnel from before the restore may still be closing.)
    eventually!("restored rules admit the request", {
        let mut app = ProxyClient::connect(pair.http_addr).await;
        app.get(&pair, "persist", "http://erp.virtual:80/any").await == 200
    });
    api.stop().await;
}

#[tokio::test]
async fn principal_propagation_settings_apply_to_the_next_request() {
    let pair = TunnelPair::start().await;
    let echo = EchoBackend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pp_ca = Arc::new(ferry_core::tls::LocalCa::generate("PP CA").unwrap());
    let verifier = Arc::new(ferry_auth::Verifier::local(pair.keys.clone()));
    let api = Running::start_with(dir.path(), |c| {
        c.connection.principal_propagation =
            Some(Arc::new(ferry_connector::PrincipalPropagation::new(verifier, pp_ca)));
    })
    .await;
    api.change_initial_password().await;
    add_subaccount(&api, &pair, "pp").await;
    let maps = format!("{}/systemMappings", sub_path(&pair));
    let (s, body) = api
        .admin_call(
            Method::POST,
            &maps,
            Some(json!({"virtualHost": "pp.virtual", "virtualPort": 80, "localHost": "127.0.0.1",
                        "localPort": echo.addr.port(), "protocol": "HTTP", "authenticationMode": "X509_GENERAL",
                        "resources": [{"id": "/", "enabled": true}]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    pair.wait_connected("pp").await;
    // A user token that expired two hours ago: beyond the default tolerance of one hour.
    let exp = ferry_testkit::now() - 7200;
    let user = pair
        .keys
        .sign(&json!({"zid": SUBACCOUNT, "user_name": "alice", "client_id": "sb-app!t1", "exp": exp}), &[])
        .unwrap();
    let mut app = ProxyClient::connect(pair.http_addr).await;
    assert_eq!(app.get_as(&pair, "pp", "http://pp.virtual:80/x", Some(&user)).await, 403);
    let (s, _) = api
        .admin_call(
            Method::PATCH,
            &format!("{CONF}/connector/onPremises/ppSettings"),
            Some(json!({"expirationToleranceInHr": 3})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(app.get_as(&pair, "pp", "http://pp.virtual:80/x", Some(&user)).await, 200);
    let (s, body) = api
        .admin_call(
            Method::PUT,
            &format!("{CONF}/connector/onPremises/ppSettings"),
            Some(json!({"expirationToleranceInHr": 0, "certificateValidityInMin": 60})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body["message"].as_str().unwrap().contains("expirationToleranceInHr"), "{body}");
    api.stop().await;
}

/// Subject and issuer of the user certificate the echo backend received.
fn user_certificate_of(body: &Bytes) -> (String, String) {
    let e: Value = serde_json::from_slice(body).unwrap();
    let der =
        base64::engine::general_purpose::STANDARD.decode(e["headers"]["ssl_client_cert"].as_str().unwrap()).unwrap();
    (ferry_core::keystore::subject_dn(&der).unwrap(), ferry_core::keystore::issuer_dn(&der).unwrap())
}

#[tokio::test]
async fn the_principal_propagation_ca_and_subject_pattern_are_replaced_at_run_time() {
    let pair = TunnelPair::start().await;
    let echo = EchoBackend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let verifier = Arc::new(ferry_auth::Verifier::local(pair.keys.clone()));
    let configured = Arc::new(ferry_core::tls::LocalCa::generate("PP CA").unwrap());
    let start = || {
        let pp = ferry_connector::PrincipalPropagation::new(verifier.clone(), configured.clone());
        Running::start_with(dir.path(), move |c| c.connection.principal_propagation = Some(Arc::new(pp)))
    };
    let api = start().await;
    api.change_initial_password().await;
    add_subaccount(&api, &pair, "pp").await;
    let (s, body) = api
        .admin_call(
            Method::POST,
            &format!("{}/systemMappings", sub_path(&pair)),
            Some(json!({"virtualHost": "pp.virtual", "virtualPort": 80, "localHost": "127.0.0.1",
                        "localPort": echo.addr.port(), "protocol": "HTTP", "authenticationMode": "X509_GENERAL",
                        "resources": [{"id": "/", "enabled": true}]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    pair.wait_connected("pp").await;
    let user = pair
        .keys
        .sign(
            &json!({"zid": SUBACCOUNT, "user_name": "alice", "email": "alice@example.org", "client_id": "sb-app!t1",
                    "exp": ferry_testkit::now() + 600}),
            &[],
        )
        .unwrap();
    let mut app = ProxyClient::connect(pair.http_addr).await;
    let mut next_certificate = async || {
        let (s, body) = app.get_body_as(&pair, "pp", "http://pp.virtual:80/x", Some(&user)).await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
        user_certificate_of(&body)
    };
    assert_eq!(next_certificate().await, ("CN=alice".to_owned(), "CN=PP CA,O=Ferry".to_owned()));

    // The subject pattern, as SAP's one default rule.
    let rules = format!("{CONF}/connector/onPremises/subjectPatternRules");
    let (s, body) = api
        .admin_call(Method::PUT, &rules, Some(json!([{"subjectPattern": {"CN": "${name}", "OU": "${department}"}}])))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body["message"].as_str().unwrap().contains("unknown placeholder ${department}"), "{body}");
    let (s, body) = api
        .admin_call(
            Method::PUT,
            &rules,
            Some(json!([{"subjectPattern": {"O": "ACME", "CN": "${name}", "EMAIL": "${mail}"}}])),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    let (_, body) = api.admin_call(Method::GET, &rules, None).await;
    assert_eq!(body[0]["subjectPattern"], json!({"CN": "${name}", "EMAIL": "${mail}", "O": "ACME"}));
    let (subject, issuer) = next_certificate().await;
    assert!(subject.starts_with("CN=alice,") && subject.ends_with(",O=ACME"), "{subject}");
    assert!(subject.contains("alice@example.org"), "{subject}");
    assert_eq!(issuer, "CN=PP CA,O=Ferry");

    // The CA: refused uploads say why and change nothing.
    let ca_path = format!("{CONF}/connector/onPremises/ppCaCertificate");
    let other = ferry_core::tls::LocalCa::generate("Other CA").unwrap();
    let leaf = other.issue_server_cert(&["leaf.example"]).unwrap();
    let uploaded = ferry_core::tls::LocalCa::generate("Uploaded CA").unwrap();
    let refusals = [
        (json!({"certificate": leaf.cert_pem, "key": leaf.key_pem.expose()}), "not a CA"),
        (json!({"certificate": uploaded.cert_pem(), "key": other.key_pem().expose()}), "does not belong"),
        (json!({"certificate": uploaded.cert_pem()}), "either pkcs12"),
    ];
    for (b, why) in refusals {
        let (s, body) = api.admin_call(Method::PUT, &ca_path, Some(b)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert!(body["message"].as_str().unwrap().contains(why), "{why}: {body}");
    }
    // A PKCS#12 file as `openssl pkcs12 -export` writes it.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("ca.pem"), format!("{}{}", uploaded.cert_pem(), uploaded.key_pem().expose()))
        .unwrap();
    let out = std::process::Command::new("openssl")
        .current_dir(tmp.path())
        .args(["pkcs12", "-export", "-in", "ca.pem", "-passout", "pass:p12-pass", "-out", "ca.p12"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p12 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(tmp.path().join("ca.p12")).unwrap());
    let (s, body) = api.admin_call(Method::PUT, &ca_path, Some(json!({"pkcs12": p12, "password": "guess"}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(next_certificate().await.1, "CN=PP CA,O=Ferry", "a refused upload changes nothing");
    let (s, body) = api.admin_call(Method::PUT, &ca_path, Some(json!({"pkcs12": p12, "password": "p12-pass"}))).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    let (_, body) = api.admin_call(Method::GET, &ca_path, None).await;
    assert_eq!(body["subjectDN"], "CN=Uploaded CA,O=Ferry", "{body}");
    assert!(!body.to_string().contains("PRIVATE KEY"), "the key is never given back: {body}");
    assert_eq!(next_certificate().await.1, "CN=Uploaded CA,O=Ferry");

    // Both survive a restart, sealed at rest.
    drop(app);
    api.stop().await;
    let stored = std::fs::read_to_string(dir.path().join(ferry_connector::ha::KEYS_FILE)).unwrap();
    assert!(!stored.contains("PRIVATE KEY"), "sealed: {stored}");
    let api = start().await;
    let (_, body) = api.admin_call(Method::GET, &ca_path, None).await;
    assert_eq!(body["subjectDN"], "CN=Uploaded CA,O=Ferry", "{body}");
    let (_, body) = api.admin_call(Method::GET, &rules, None).await;
    assert_eq!(body[0]["subjectPattern"]["O"], "ACME", "{body}");
    api.stop().await;
}

/// Calls the API with Basic authentication as `user`.
async fn call_as(
    api: &Running,
    user: &str,
    password: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> StatusCode {
    let mut r = api.req(method, path).basic_auth(user, Some(password));
    if let Some(b) = body {
        r = r.json(&b);
    }
    r.send().await.unwrap().status()
}

#[tokio::test]
async fn ldap_logon_maps_groups_to_roles() {
    use ferry_testkit::slapd::{READER_DN, READER_PW, SUFFIX, Slapd};
    let slapd = Slapd::start(&format!(
        "dn: uid=anna,ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: anna\ncn: Anna\nsn: A\nuserPassword: anna-pw\n\n\
         dn: uid=dora,ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: dora\ncn: Dora\nsn: D\nuserPassword: dora-pw\n\n\
         dn: uid=nick,ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: nick\ncn: Nick\nsn: N\nuserPassword: nick-pw\n\n\
         dn: uid=mona,ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: mona\ncn: Mona\nsn: M\nuserPassword: mona-pw\n\n\
         dn: cn=sccmonitoring,ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: sccmonitoring\nmember: uid=mona,ou=people,{SUFFIX}\n\n\
         dn: cn=connector-admins,ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: connector-admins\nmember: uid=anna,ou=people,{SUFFIX}\n\n\
         dn: cn=sccdisplay,ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: sccdisplay\nmember: uid=dora,ou=people,{SUFFIX}\n"
    ));
    let dir = tempfile::tempdir().unwrap();
    let api = Running::start(dir.path()).await;
    api.change_initial_password().await;
    let ldap_path = format!("{CONF}/connector/authentication/ldap");
    let settings = json!({
        "enable": true,
        "configuration": format!("userBase=\"ou=people,{SUFFIX}\" userSearch=\"(uid={{0}})\"\n\
                                  roleBase=\"ou=groups,{SUFFIX}\" roleName=\"cn\" roleSearch=\"(member={{0}})\""),
        "hosts": [{"host": "127.0.0.1", "port": slapd.addr.port()}],
        "user": READER_DN, "password": READER_PW,
        "customAdminRole": "connector-admins",
    });
    let mut bad = settings.clone();
    bad["configuration"] = json!("userBase=\"ou=people\"");
    let (s, e) = api.admin_call(Method::PUT, &ldap_path, Some(bad)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(e["message"].as_str().unwrap().contains("userSearch"), "{e}");
    let mut no_password = settings.clone();
    no_password.as_object_mut().unwrap().remove("password");
    assert_eq!(api.admin_call(Method::PUT, &ldap_path, Some(no_password)).await.0, StatusCode::BAD_REQUEST);

    let (s, _) = api.admin_call(Method::PUT, &ldap_path, Some(settings)).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let stored = std::fs::read_to_string(dir.path().join("scc-ldap.json")).unwrap();
    assert!(!stored.contains(READER_PW), "the bind password is sealed at rest");

    let conn = format!("{CONF}/connector");
    assert_eq!(call_as(&api, "anna", "anna-pw", Method::GET, &ldap_path, None).await, StatusCode::OK);
    let shown = api.req(Method::GET, &ldap_path).basic_auth("anna", Some("anna-pw")).send().await.unwrap();
    let shown = shown.text().await.unwrap();
    assert!(shown.contains("connector-admins") && !shown.contains(READER_PW), "{shown}");
    let change = Some(json!({"description": "changed by anna"}));
    assert_eq!(call_as(&api, "anna", "anna-pw", Method::PUT, &conn, change.clone()).await, StatusCode::NO_CONTENT);
    assert_eq!(call_as(&api, "anna", "wrong", Method::GET, &conn, None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(call_as(&api, "nobody", "x-pw", Method::GET, &conn, None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(call_as(&api, "dora", "dora-pw", Method::GET, &conn, None).await, StatusCode::OK, "display reads");
    assert_eq!(call_as(&api, "dora", "dora-pw", Method::PUT, &conn, change.clone()).await, StatusCode::FORBIDDEN);
    assert_eq!(call_as(&api, "nick", "nick-pw", Method::GET, &conn, None).await, StatusCode::FORBIDDEN, "no group");
    let mon = "/api/monitoring/subaccounts";
    assert_eq!(call_as(&api, "mona", "mona-pw", Method::GET, mon, None).await, StatusCode::OK, "monitoring role");
    assert_eq!(call_as(&api, "mona", "mona-pw", Method::GET, &conn, None).await, StatusCode::FORBIDDEN);
    assert_eq!(call_as(&api, "nick", "nick-pw", Method::GET, mon, None).await, StatusCode::FORBIDDEN);
    // Her API session does not open the web UI's pages either.
    let r = api.req(Method::GET, mon).basic_auth("mona", Some("mona-pw")).send().await.unwrap();
    let session = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let page = api.req(Method::GET, "/ui/overview").header("cookie", session).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        call_as(&api, "Administrator", NEW_PASSWORD, Method::GET, &conn, None).await,
        StatusCode::UNAUTHORIZED,
        "the file-based user is inactive while LDAP is on"
    );

    // The setting survives a restart.
    api.stop().await;
    let api = Running::start(dir.path()).await;
    assert_eq!(call_as(&api, "anna", "anna-pw", Method::GET, &conn, None).await, StatusCode::OK);

    // A directory that does not answer is the directory's fault, not a wrong password.
    drop(slapd);
    assert_eq!(call_as(&api, "anna", "anna-pw", Method::GET, &conn, None).await, StatusCode::SERVICE_UNAVAILABLE);
    api.stop().await;
}

/// A backend whose first response stops after "hello" until `release` fires; later ones answer
/// "helloworld" at once.
async fn slow_backend(release: Arc<tokio::sync::Notify>) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = ferry_testkit::listener().await;
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut s, _)) = l.accept().await {
            let (slow, release) = (std::mem::replace(&mut first, false), release.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n) = s.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello").await;
                if slow {
                    release.notified().await;
                }
                let _ = s.write_all(b"world").await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_renewed_certificate_replaces_a_short_lived_one_without_dropping_a_request() {
    let pair = TunnelPair::start().await;
    let relay = ferry_testkit::CuttableRelay::start(pair.tunnel_addr).await;
    let release = Arc::new(tokio::sync::Notify::new());
    let backend = slow_backend(release.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let api = Running::start(dir.path()).await;
    api.change_initial_password().await;

    // Enrolled with a certificate valid for a few seconds, through a relay the test can cut.
    let issued = std::time::Instant::now();
    let short = pair.ca.issue_connector_cert(SUBACCOUNT, "renew-loc", time::Duration::seconds(3)).unwrap();
    let data = |id: &ferry_core::tls::CertifiedKey| {
        json!({"subaccount": SUBACCOUNT, "location_id": "renew-loc", "certificate": id.cert_pem,
               "key": id.key_pem.expose(), "ca": pair.ca.cert_pem(), "tunnel": relay.addr.to_string()})
    };
    let (s, b) = api
        .admin_call(Method::POST, &format!("{CONF}/subaccounts"), Some(json!({"authenticationData": data(&short)})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let sub = format!("{CONF}/subaccounts/{}/{SUBACCOUNT}", relay.addr);
    let (s, b) = api
        .admin_call(
            Method::POST,
            &format!("{sub}/systemMappings"),
            Some(json!({"virtualHost": "slow.virtual", "virtualPort": 80, "localHost": "127.0.0.1",
                        "localPort": backend.port(), "protocol": "HTTP", "authenticationMode": "NONE"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let res = json!({"id": "/", "enabled": true, "exactMatchOnly": false});
    let (s, b) =
        api.admin_call(Method::POST, &format!("{sub}/systemMappings/slow.virtual:80/resources"), Some(res)).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    pair.wait_connected("renew-loc").await;

    // A request is in flight (half its body sent) when the certificate is renewed.
    let mut app = ProxyClient::connect(pair.http_addr).await;
    let req = http::Request::get("http://slow.virtual/x")
        .header("host", "slow.virtual")
        .header("proxy-authorization", format!("Bearer {}", pair.token()))
        .header("sap-connectivity-scc-location_id", "renew-loc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = app.sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);

    let other = pair.ca.issue_connector_cert(SUBACCOUNT, "other-loc", time::Duration::days(1)).unwrap();
    let (s, b) = api
        .admin_call(Method::POST, &format!("{sub}/validity"), Some(json!({"authenticationData": data(&other)})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a certificate of another location is refused: {b}");
    let renewed = pair.ca.issue_connector_cert(SUBACCOUNT, "renew-loc", time::Duration::days(1)).unwrap();
    let (s, b) = api
        .admin_call(Method::POST, &format!("{sub}/validity"), Some(json!({"authenticationData": data(&renewed)})))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let connections = |v: &Value| v["subaccounts"][0]["tunnel"]["connections"].as_u64().unwrap();
    eventually!(
        "the new tunnel is up next to the draining one",
        connections(&api.admin_call(Method::GET, "/api/monitoring/subaccounts", None).await.1) == 2
    );
    release.notify_one();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"helloworld", "the request in flight completes on the old tunnel");
    eventually!(
        "the old tunnel has drained",
        connections(&api.admin_call(Method::GET, "/api/monitoring/subaccounts", None).await.1) == 1
    );

    // Once the first certificate has expired, a reconnect works only with the renewed one.
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(issued.elapsed())).await;
    let tunnel = |v: Value| v["subaccounts"][0]["tunnel"].clone();
    let before = tunnel(api.admin_call(Method::GET, "/api/monitoring/subaccounts", None).await.1);
    relay.cut();
    // A new streak of connections starts only if the reconnect's TLS handshake succeeds.
    eventually!("reconnected after the cut", {
        let now = tunnel(api.admin_call(Method::GET, "/api/monitoring/subaccounts", None).await.1);
        now["connections"] == 1 && now["connectedSinceTimeStamp"].as_u64() > before["connectedSinceTimeStamp"].as_u64()
    });
    pair.wait_connected("renew-loc").await;
    let mut app = ProxyClient::connect(pair.http_addr).await;
    assert_eq!(app.get(&pair, "renew-loc", "http://slow.virtual/y").await, 200);

    // The renewed certificate is what a restart uses.
    api.stop().await;
    let stored = std::fs::read_to_string(dir.path().join("scc-config.json")).unwrap();
    assert!(stored.contains(renewed.cert_pem.trim().lines().nth(1).unwrap()), "the new certificate is stored");
}
