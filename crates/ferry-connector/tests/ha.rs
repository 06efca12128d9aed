#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Master/shadow high availability with two in-process instances over real HTTPS on 127.0.0.1,
//! a real proxy and an echo backend: sync, write blocking on the shadow, failover, the old
//! master coming back as shadow, and a manual switch-over.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use ferry_connector::admin::{Admin, AdminConfig};
use ferry_core::Shutdown;
use ferry_testkit::{CuttableRelay, EchoBackend, SUBACCOUNT, TunnelPair};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

const PW: &str = "correct horse battery";
const CONF: &str = "/api/v1/configuration";
const HA: &str = "/api/v1/configuration/connector/ha";

struct Node {
    dir: PathBuf,
    port: u16,
    base: String,
    client: reqwest::Client,
    ca: String,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

impl Node {
    async fn start(dir: &Path, port: u16) -> Self {
        Self::start_with(dir, port, |_| {}).await
    }

    async fn start_with(dir: &Path, port: u16, adjust: impl FnOnce(&mut AdminConfig)) -> Self {
        ferry_core::init_crypto();
        let mut cfg = AdminConfig::new(dir.to_owned());
        cfg.connection.backoff_initial = Duration::from_millis(20);
        cfg.connection.backoff_max = Duration::from_millis(200);
        adjust(&mut cfg);
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shutdown = Shutdown::new();
        let admin = Admin::start(cfg, shutdown.clone()).await.unwrap();
        let task = tokio::spawn(admin.clone().serve(listener, shutdown.clone()));
        let client = ferry_core::tls::http_client(Some(admin.ui_ca_pem())).unwrap();
        Self {
            dir: dir.to_owned(),
            port,
            base: format!("https://127.0.0.1:{port}"),
            client,
            ca: admin.ui_ca_pem().to_owned(),
            shutdown,
            task,
        }
    }

    async fn stop(self) -> (PathBuf, u16) {
        self.shutdown.cancel();
        self.task.await.unwrap();
        (self.dir, self.port)
    }

    async fn call_as(&self, method: Method, path: &str, pw: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut r = self.client.request(method, format!("{}{path}", self.base)).basic_auth("Administrator", Some(pw));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(method, path, PW, body).await
    }

    async fn init_password(&self) {
        let (s, b) = self
            .call_as(
                Method::PUT,
                &format!("{CONF}/connector/authentication/basic"),
                "manage",
                Some(json!({"oldPassword": "manage", "newPassword": PW})),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    }

    async fn exposed(&self, action: &str) -> (StatusCode, String) {
        let r = self.client.get(format!("{}/exposed?action={action}", self.base)).send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    }

    async fn shadow_state(&self) -> String {
        let (_, b) = self.call(Method::GET, &format!("{HA}/shadow/state"), None).await;
        b["state"].as_str().unwrap_or_default().to_owned()
    }

    async fn master_state(&self) -> String {
        let (_, b) = self.call(Method::GET, &format!("{HA}/master/state"), None).await;
        b["state"].as_str().unwrap_or_default().to_owned()
    }
}

fn sub_path(pair: &TunnelPair) -> String {
    format!("{CONF}/subaccounts/{}/{SUBACCOUNT}", pair.tunnel_addr)
}

async fn add_subaccount(node: &Node, pair: &TunnelPair) {
    let id = pair.ca.issue_connector_cert(SUBACCOUNT, "", time::Duration::days(1)).unwrap();
    let data = json!({"subaccount": SUBACCOUNT, "location_id": "", "certificate": id.cert_pem,
                      "key": id.key_pem.expose(), "ca": pair.ca.cert_pem(), "tunnel": pair.tunnel_addr.to_string()});
    let data = base64::engine::general_purpose::STANDARD.encode(data.to_string());
    let (s, b) =
        node.call(Method::POST, &format!("{CONF}/subaccounts"), Some(json!({"authenticationData": data}))).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
}

fn mapping(vhost: &str, backend: SocketAddr) -> Value {
    json!({"virtualHost": vhost, "virtualPort": 80, "localHost": "127.0.0.1", "localPort": backend.port(),
           "protocol": "HTTP", "authenticationMode": "NONE", "hostInHeader": "virtual"})
}

/// One GET through the proxy on a fresh connection; None if the proxy could not be reached.
async fn get_via_proxy(pair: &TunnelPair, uri: &str) -> Option<u16> {
    get_as_user(pair, uri, None).await.map(|(s, _)| s)
}

/// A GET through the proxy, propagating `user` (a JWT) if given; returns status and body.
async fn get_as_user(pair: &TunnelPair, uri: &str, user: Option<&str>) -> Option<(u16, Bytes)> {
    let s = TcpStream::connect(pair.http_addr).await.ok()?;
    s.set_nodelay(true).unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.ok()?;
    tokio::spawn(conn);
    let mut req = http::Request::get(uri)
        .header("host", uri.split('/').nth(2).unwrap())
        .header("proxy-authorization", format!("Bearer {}", pair.token()));
    if let Some(u) = user {
        req = req.header("sap-connectivity-authentication", format!("Bearer {u}"));
    }
    let resp = sender.send_request(req.body(Full::new(Bytes::new())).unwrap()).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, body))
}

/// Polls `f` until it is true or `limit` passes; returns how long it took.
async fn wait_for<F, Fut>(what: &str, limit: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A master with a subaccount and a mapping, and a shadow paired with it and READY.
async fn pair_up(pair: &TunnelPair, backend: SocketAddr, mdir: &Path, sdir: &Path) -> (Node, Node) {
    let master = Node::start(mdir, 0).await;
    let shadow = Node::start(sdir, 0).await;
    pair_nodes(pair, backend, &master, &shadow, master.port, None).await;
    (master, shadow)
}

/// Pairs two started nodes; the shadow reaches the master on `master_port` and names
/// `shadow_port` (default: its own) as the port the master reaches it on.
async fn pair_nodes(
    pair: &TunnelPair,
    backend: SocketAddr,
    master: &Node,
    shadow: &Node,
    master_port: u16,
    shadow_port: Option<u16>,
) {
    master.init_password().await;
    shadow.init_password().await;
    add_subaccount(master, pair).await;
    let maps = format!("{}/systemMappings", sub_path(pair));
    let (s, b) = master.call(Method::POST, &maps, Some(mapping("erp.virtual", backend))).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let res = format!("{maps}/erp.virtual:80/resources");
    let (s, b) = master.call(Method::POST, &res, Some(json!({"id": "/", "enabled": true}))).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");

    // Registration needs HA enabled on the master.
    let (s, b) = master
        .call(
            Method::PUT,
            &format!("{HA}/master/config"),
            Some(json!({"haEnabled": true, "allowedShadowHost": "127.0.0.1"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["haEnabled"], true);
    let (s, _) = shadow.call(Method::PUT, &format!("{CONF}/connector/haRole"), Some(json!("shadow"))).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, role) = shadow.call(Method::GET, &format!("{CONF}/connector/haRole"), None).await;
    assert_eq!(role, json!("shadow"));
    let (s, b) = shadow
        .call(
            Method::PUT,
            &format!("{HA}/shadow/config"),
            Some(json!({"masterHost": "127.0.0.1", "masterPort": master_port, "ownHost": "127.0.0.1",
                        "haPort": shadow_port,
                        "checkIntervalInSeconds": 0.2, "takeoverDelayInSeconds": 0.6,
                        "connectTimeoutInMillis": 500, "requestTimeoutInMillis": 1000})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) =
        shadow.call(Method::PUT, &format!("{HA}/shadow/config"), Some(json!({"checkIntervalInSeconds": 0.0}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a zero check interval is refused: {b}");

    // The wrong password of the master's administrator is refused by the master.
    let connect =
        |pw: &str| json!({"op": "CONNECT", "user": "Administrator", "password": pw, "caCertificate": master.ca});
    let (s, b) = shadow.call(Method::POST, &format!("{HA}/shadow/state"), Some(connect("wrong"))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, b) = shadow.call(Method::POST, &format!("{HA}/shadow/state"), Some(connect(PW))).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    wait_for("shadow READY", Duration::from_secs(20), || async { shadow.shadow_state().await == "READY" }).await;
    wait_for("master CONNECTED", Duration::from_secs(20), || async { master.master_state().await == "CONNECTED" })
        .await;
}

#[tokio::test]
async fn acknowledged_writes_are_on_the_shadow_and_the_shadow_refuses_writes() {
    let pair = TunnelPair::start().await;
    let backend = EchoBackend::start().await;
    let (mdir, sdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (master, shadow) = pair_up(&pair, backend.addr, mdir.path(), sdir.path()).await;

    // The first sync carried the subaccount (with its key) and the mapping.
    let (s, b) = shadow.call(Method::GET, &format!("{}/systemMappings/erp.virtual:80", sub_path(&pair)), None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let text = std::fs::read_to_string(sdir.path().join("scc-config.json")).unwrap();
    assert!(!text.contains("PRIVATE KEY"), "the synced key is sealed on the shadow too");
    assert!(text.contains("keySealed"));

    // Acknowledged on the master ⇒ present on the shadow, with no waiting.
    let maps = format!("{}/systemMappings", sub_path(&pair));
    for i in 0..5 {
        let (s, b) = master.call(Method::POST, &maps, Some(mapping(&format!("host{i}.virtual"), backend.addr))).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        // Read the shadow's file at once: the write must be stored there before the master's answer.
        let stored = std::fs::read_to_string(sdir.path().join("scc-config.json")).unwrap();
        assert!(stored.contains(&format!("host{i}.virtual")), "mapping {i} acknowledged but not stored on the shadow");
        let (s, b) = shadow.call(Method::GET, &format!("{maps}/host{i}.virtual:80"), None).await;
        assert_eq!(s, StatusCode::OK, "mapping {i} acknowledged by the master is missing on the shadow: {b}");
    }
    let (s, b) = master.call(Method::DELETE, &format!("{maps}/host0.virtual:80"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    assert_eq!(shadow.call(Method::GET, &format!("{maps}/host0.virtual:80"), None).await.0, StatusCode::NOT_FOUND);

    // The shadow refuses configuration changes with SAP's error type, but keeps its own password.
    let (s, b) = shadow.call(Method::POST, &maps, Some(mapping("nope.virtual", backend.addr))).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(b["type"], "SHADOW_UPDATE", "{b}");
    // The web UI on the shadow is refused too, and the setting stays the master's.
    let browser = reqwest::Client::builder()
        .use_preconfigured_tls(ferry_core::tls::outbound_client_config(Some(&shadow.ca)).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let ui_post = |path: &str, cookie: Option<&str>, form: &[(&str, &str)]| {
        let mut r = browser.post(format!("{}{path}", shadow.base)).form(form);
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        r.send()
    };
    let r = ui_post("/ui/login", None, &[("user", "Administrator"), ("password", PW)]).await.unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let page = browser
        .get(format!("{}/ui/principal-propagation", shadow.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page.split_once("name=\"_csrf\" value=\"").unwrap().1.split('"').next().unwrap().to_owned();
    let form = [("_csrf", csrf.as_str()), ("certificateValidityInMin", "30"), ("expirationToleranceInHr", "2")];
    let r = ui_post("/ui/principal-propagation", Some(&cookie), &form).await.unwrap();
    let body = r.text().await.unwrap();
    assert!(body.contains("this instance is the shadow"), "{body}");
    let pp = format!("{CONF}/connector/onPremises/ppSettings");
    assert_eq!(shadow.call(Method::GET, &pp, None).await.1["certificateValidityInMin"], 60);

    // Not synced: the administrator's password.
    assert_eq!(shadow.call_as(Method::GET, &maps, PW, None).await.0, StatusCode::OK);

    // Probes: only the master claims the master role.
    assert_eq!(master.exposed("hasMasterRole").await, (StatusCode::OK, "true".into()));
    assert_eq!(shadow.exposed("hasMasterRole").await, (StatusCode::OK, "false".into()));
    assert_eq!(master.exposed("ensureMasterRole").await.0, StatusCode::OK);
    assert_eq!(shadow.exposed("ensureMasterRole").await.0, StatusCode::CONFLICT);
    assert_eq!(shadow.exposed("ping").await.0, StatusCode::OK);

    // Forged HA secrets are refused.
    let r = master.client.get(format!("{}/ferry/ha/v1/role", master.base)).bearer_auth("forged").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // A dead shadow does not block the master for longer than 3 check periods, and it is BROKEN.
    shadow.stop().await;
    let (s, b) = master.call(Method::POST, &maps, Some(mapping("alone.virtual", backend.addr))).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(master.master_state().await, "BROKEN");
    assert_eq!(master.exposed("hasMasterRole").await.1, "true", "a master that lost its shadow stays master");

    // A switch-over needs a shadow in sync; a forced one a shadow that answers. Refused, the
    // master stays master and its tunnels serve again.
    let (s, b) = master.call(Method::POST, &format!("{HA}/master/state"), Some(json!({"op": "SWITCH"}))).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    let (s, b) = master.call(Method::POST, &format!("{HA}/master/state"), Some(json!({"op": "FORCE_SWITCH"}))).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{b}");
    assert_eq!(master.exposed("hasMasterRole").await.1, "true");
    wait_for("requests through the master after the refused switch", Duration::from_secs(20), || async {
        get_via_proxy(&pair, "http://erp.virtual:80/z").await == Some(200)
    })
    .await;
    master.stop().await;
}

#[tokio::test]
async fn shadow_takes_over_the_old_master_returns_as_shadow_and_switch_over_moves_back() {
    let pair = TunnelPair::start().await;
    let backend = EchoBackend::start().await;
    let (mdir, sdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (master, shadow) = pair_up(&pair, backend.addr, mdir.path(), sdir.path()).await;
    let uri = "http://erp.virtual:80/x";
    wait_for("requests through the master", Duration::from_secs(20), || async {
        get_via_proxy(&pair, uri).await == Some(200)
    })
    .await;
    assert_eq!(shadow.exposed("hasMasterRole").await.1, "false");

    // The master goes away: the shadow takes over and serves the same mapping.
    let (mdir_path, mport) = master.stop().await;
    let took = wait_for("the shadow serves after the master stopped", Duration::from_secs(30), || async {
        get_via_proxy(&pair, uri).await == Some(200)
    })
    .await;
    println!("measured: requests flow again {took:?} after the master stopped (check 0.2 s, takeover delay 0.6 s)");
    assert_eq!(shadow.exposed("hasMasterRole").await.1, "true");

    // The old master restarts: it asks its peer, finds a newer master and becomes its shadow.
    let old = Node::start(&mdir_path, mport).await;
    assert_eq!(old.exposed("hasMasterRole").await.1, "false");
    wait_for("old master READY as shadow", Duration::from_secs(20), || async { old.shadow_state().await == "READY" })
        .await;
    wait_for("new master CONNECTED", Duration::from_secs(20), || async { shadow.master_state().await == "CONNECTED" })
        .await;
    // Changes on the new master reach the old one.
    let maps = format!("{}/systemMappings", sub_path(&pair));
    let (s, b) = shadow.call(Method::POST, &maps, Some(mapping("after.virtual", backend.addr))).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(old.call(Method::GET, &format!("{maps}/after.virtual:80"), None).await.0, StatusCode::OK);

    // Manual switch-over back: the old master is master again, the other one its shadow.
    let (s, b) = old.call(Method::POST, &format!("{HA}/master/state"), Some(json!({"op": "SWITCH"}))).await;
    assert_eq!(s, StatusCode::CONFLICT, "only a master switches: {b}");
    let (s, b) = shadow.call(Method::POST, &format!("{HA}/master/state"), Some(json!({"op": "SWITCH"}))).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    assert_eq!(old.exposed("hasMasterRole").await.1, "true");
    assert_eq!(shadow.exposed("hasMasterRole").await.1, "false");
    wait_for("requests through the switched master", Duration::from_secs(20), || async {
        get_via_proxy(&pair, "http://erp.virtual:80/y").await == Some(200)
    })
    .await;
    wait_for("shadow READY after the switch", Duration::from_secs(20), || async {
        shadow.shadow_state().await == "READY"
    })
    .await;

    // The master drops its shadow: the shadow is refused, stops, and does not take over from a
    // master that answers.
    let (s, b) = old.call(Method::DELETE, &format!("{HA}/master/state"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    assert_eq!(old.master_state().await, "ALONE");
    wait_for("unpaired shadow DISCONNECTED", Duration::from_secs(20), || async {
        shadow.shadow_state().await == "DISCONNECTED"
    })
    .await;
    assert_eq!(shadow.exposed("hasMasterRole").await.1, "false");
    assert_eq!(old.exposed("hasMasterRole").await.1, "true");
    shadow.stop().await;
    old.stop().await;
}

#[tokio::test]
async fn a_partition_between_master_and_shadow_leaves_exactly_one_serving_at_the_proxy() {
    let pair = TunnelPair::start().await;
    let backend = EchoBackend::start().await;
    let (mdir, sdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let master = Node::start(mdir.path(), 0).await;
    let shadow = Node::start(sdir.path(), 0).await;
    // The HA link in both directions runs through relays; the tunnels to the proxy do not.
    let to_master = CuttableRelay::start(([127, 0, 0, 1], master.port).into()).await;
    let to_shadow = CuttableRelay::start(([127, 0, 0, 1], shadow.port).into()).await;
    pair_nodes(&pair, backend.addr, &master, &shadow, to_master.addr.port(), Some(to_shadow.addr.port())).await;
    let uri = "http://erp.virtual:80/p";
    wait_for("requests through the master", Duration::from_secs(20), || async {
        get_via_proxy(&pair, uri).await == Some(200)
    })
    .await;

    // Samples the proxy's registry throughout: the live tunnels of the slot never belong to two
    // instances (two fences) at once.
    let registry = pair.proxy.registry();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (registry, stop) = (registry.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut samples, mut most, mut seen) = (0u64, 0usize, std::collections::BTreeSet::new());
            while !stop.load(Ordering::SeqCst) {
                let serving = registry.serving(SUBACCOUNT, "");
                most = most.max(serving.len());
                seen.extend(serving.into_iter().map(|f| f.epoch));
                samples += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (samples, most, seen)
        })
    };
    let before = registry.serving(SUBACCOUNT, "");
    assert_eq!(before.len(), 1, "{before:?}");

    // Partition: each side thinks the other is gone; the shadow takes over, the master (which
    // never steps down for silence) still calls itself master — and still reaches the proxy.
    to_master.partition();
    to_shadow.partition();
    wait_for("the shadow takes over", Duration::from_secs(30), || async {
        shadow.exposed("hasMasterRole").await.1 == "true"
    })
    .await;
    assert_eq!(master.exposed("hasMasterRole").await.1, "true", "the partition left two masters");
    wait_for("the new master serves the slot", Duration::from_secs(30), || async {
        registry.serving(SUBACCOUNT, "").first().is_some_and(|f| f.epoch > before[0].epoch)
    })
    .await;
    let after = registry.serving(SUBACCOUNT, "");
    for i in 0..20 {
        assert_eq!(get_via_proxy(&pair, &format!("{uri}{i}")).await, Some(200));
        assert_eq!(registry.serving(SUBACCOUNT, ""), after, "only the new master serves during the partition");
    }
    // The old master's tunnels stay closed: its reconnects are refused (it learns so in the
    // hello and stops dialling).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(registry.serving(SUBACCOUNT, ""), after);

    // Healed: the old master meets a master with a higher epoch and becomes its shadow.
    to_master.heal();
    to_shadow.heal();
    wait_for("the old master steps down", Duration::from_secs(30), || async {
        master.exposed("hasMasterRole").await.1 == "false"
    })
    .await;
    wait_for("the old master READY as shadow", Duration::from_secs(30), || async {
        master.shadow_state().await == "READY"
    })
    .await;
    assert_eq!(get_via_proxy(&pair, uri).await, Some(200));
    stop.store(true, Ordering::SeqCst);
    let (samples, most, seen) = watcher.await.unwrap();
    println!("registry sampled {samples} times during the partition test; epochs seen {seen:?}");
    assert_eq!(most, 1, "two instances served the same tunnel slot at once");
    assert_eq!(seen.len(), 2, "the samples covered both masters: {seen:?}");
    shadow.stop().await;
    master.stop().await;
}

#[tokio::test]
async fn the_ha_page_edits_the_settings_with_csrf_and_says_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), 0).await;
    node.init_password().await;
    let browser = reqwest::Client::builder()
        .use_preconfigured_tls(ferry_core::tls::outbound_client_config(Some(&node.ca)).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = browser
        .post(format!("{}/ui/login", node.base))
        .form(&[("user", "Administrator"), ("password", PW)])
        .send()
        .await
        .unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let get = |path: &str| browser.get(format!("{}{path}", node.base)).header("cookie", &cookie).send();
    let post = |path: &str, form: Vec<(&str, &str)>| {
        let form: Vec<(String, String)> = form.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        browser.post(format!("{}{path}", node.base)).header("cookie", &cookie).form(&form).send()
    };
    let page = get("/ui/ha").await.unwrap().text().await.unwrap();
    assert!(page.contains("id=\"ha-shadow\"") && page.contains("id=\"ha-master\""), "{page}");
    assert!(page.contains("Switch roles"));
    let csrf = page.split_once("name=\"_csrf\" value=\"").unwrap().1.split('"').next().unwrap().to_owned();
    let shadow_form = |check: &'static str, csrf: &str| {
        vec![
            ("_csrf", csrf.to_owned()),
            ("masterHost", "master.example".into()),
            ("masterPort", "8443".into()),
            ("ownHost", "shadow.example".into()),
            ("checkIntervalInSeconds", check.into()),
            ("takeoverDelayInSeconds", "5".into()),
            ("connectTimeoutInMillis", "1500".into()),
            ("requestTimeoutInMillis", "2500".into()),
        ]
    };
    let as_refs = |f: &Vec<(&'static str, String)>| f.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>();
    let send = |f: Vec<(&'static str, String)>| {
        let f: Vec<(String, String)> = f.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        browser.post(format!("{}/ui/ha/shadow", node.base)).header("cookie", &cookie).form(&f).send()
    };

    // Without the session's CSRF token nothing changes.
    let r = send(as_refs(&shadow_form("2", "forged"))).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Bad values: the form comes back with a message next to the field, the settings unchanged.
    for (bad, says) in [("abc", "Enter a number of seconds"), ("0", "checkIntervalInSeconds must be at least 0.05")] {
        let r = send(as_refs(&shadow_form(bad, &csrf))).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let body = r.text().await.unwrap();
        assert!(body.contains("field-error") && body.contains(says), "{bad}: {body}");
        assert!(body.contains(&format!("value=\"{bad}\"")), "the rejected value is shown again");
    }
    let (_, cfg) = node.call(Method::GET, &format!("{HA}/shadow/config"), None).await;
    assert_eq!(cfg["checkIntervalInSeconds"], 30.0, "{cfg}");
    // Good values are stored.
    let r = send(as_refs(&shadow_form("2.5", &csrf))).await.unwrap();
    assert!(r.status().is_redirection(), "{}", r.status());
    let (_, cfg) = node.call(Method::GET, &format!("{HA}/shadow/config"), None).await;
    assert_eq!(
        (&cfg["checkIntervalInSeconds"], &cfg["takeoverDelayInSeconds"], &cfg["masterHost"], &cfg["masterPort"]),
        (&json!(2.5), &json!(5.0), &json!("master.example"), &json!(8443)),
        "{cfg}"
    );
    let page = get("/ui/ha").await.unwrap().text().await.unwrap();
    assert!(page.contains("Shadow settings saved.") && page.contains("value=\"2.5\""), "{page}");

    // The master's settings.
    let r = post("/ui/ha/master", vec![("_csrf", &csrf), ("haEnabled", "true"), ("allowedShadowHost", "10.1.1.1")])
        .await
        .unwrap();
    assert!(r.status().is_redirection());
    let (_, m) = node.call(Method::GET, &format!("{HA}/master/config"), None).await;
    assert_eq!((&m["haEnabled"], &m["allowedShadowHost"]), (&json!(true), &json!("10.1.1.1")), "{m}");
    // A switch-over with no shadow says why it cannot happen.
    let r = post("/ui/ha/switch", vec![("_csrf", &csrf)]).await.unwrap();
    assert!(r.status().is_redirection());
    let page = get("/ui/ha").await.unwrap().text().await.unwrap();
    assert!(page.contains("no shadow is registered"), "{page}");
    assert_eq!(node.exposed("hasMasterRole").await.1, "true");
    node.stop().await;
}

#[tokio::test]
async fn the_shadow_takes_over_with_the_masters_principal_propagation_ca_and_system_certificate() {
    let pair = TunnelPair::start().await;
    let backend = EchoBackend::start().await;
    let verifier = Arc::new(ferry_auth::Verifier::local(pair.keys.clone()));
    let master_ca = Arc::new(ferry_core::tls::LocalCa::generate("PP CA of the master").unwrap());
    let shadow_ca = Arc::new(ferry_core::tls::LocalCa::generate("PP CA of the shadow").unwrap());
    let system = pair.ca.issue_server_cert(&["scc-system.example"]).unwrap();
    let (mdir, sdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pp = |ca: &Arc<ferry_core::tls::LocalCa>| {
        let mut p = ferry_connector::PrincipalPropagation::new(verifier.clone(), ca.clone());
        p.subject_pattern = "CN=${user_name},O=Master".into();
        Some(Arc::new(p))
    };
    let master = Node::start_with(mdir.path(), 0, |c| {
        c.connection.principal_propagation = pp(&master_ca);
        c.connection.system_certificate = Some(system.clone());
    })
    .await;
    // The shadow's own configuration trusts the same tokens but has another CA and no system
    // certificate: after the takeover it must serve with the master's.
    let shadow = Node::start_with(sdir.path(), 0, |c| {
        let mut p = ferry_connector::PrincipalPropagation::new(verifier.clone(), shadow_ca.clone());
        p.subject_pattern = "CN=${user_name},O=Shadow".into();
        c.connection.principal_propagation = Some(Arc::new(p));
    })
    .await;
    pair_nodes(&pair, backend.addr, &master, &shadow, master.port, None).await;
    let maps = format!("{}/systemMappings", sub_path(&pair));
    let mut m = mapping("pp.virtual", backend.addr);
    m["authenticationMode"] = json!("X509_GENERAL");
    let (s, b) = master.call(Method::POST, &maps, Some(m)).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, b) = master
        .call(Method::POST, &format!("{maps}/pp.virtual:80/resources"), Some(json!({"id": "/", "enabled": true})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");

    // Stored on the shadow with the configuration, sealed.
    let stored = std::fs::read_to_string(sdir.path().join(ferry_connector::ha::KEYS_FILE)).unwrap();
    assert!(!stored.contains("PRIVATE KEY") && !stored.contains("CERTIFICATE"), "sealed at rest: {stored}");

    let user = pair
        .keys
        .sign(&json!({"zid": SUBACCOUNT, "user_name": "alice", "client_id": "sb-app!t1", "exp": ferry_testkit::now() + 600}), &[])
        .unwrap();
    let issuer_of = |body: &Bytes| {
        let e: Value = serde_json::from_slice(body).unwrap();
        let der = base64::engine::general_purpose::STANDARD
            .decode(e["headers"]["ssl_client_cert"].as_str().unwrap())
            .unwrap();
        let text = String::from_utf8_lossy(&der).into_owned();
        (text.contains("PP CA of the master"), text.contains("PP CA of the shadow"))
    };
    let uri = "http://pp.virtual:80/me";
    wait_for("a propagated user through the master", Duration::from_secs(20), || async {
        get_as_user(&pair, uri, Some(&user)).await.is_some_and(|(s, _)| s == 200)
    })
    .await;
    let (_, body) = get_as_user(&pair, uri, Some(&user)).await.unwrap();
    assert_eq!(issuer_of(&body), (true, false), "the master issues with its own CA");

    // Replaced at run time on the master (the web UI's API): the shadow serves with these too.
    let uploaded = ferry_core::tls::LocalCa::generate("PP CA uploaded on the master").unwrap();
    let ca_body = json!({"certificate": uploaded.cert_pem(), "key": uploaded.key_pem().expose()});
    let (s, b) = master.call(Method::PUT, &format!("{CONF}/connector/onPremises/ppCaCertificate"), Some(ca_body)).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let rules = json!([{"subjectPattern": {"CN": "${user_name}", "O": "Uploaded"}}]);
    let (s, b) =
        master.call(Method::PUT, &format!("{CONF}/connector/onPremises/subjectPatternRules"), Some(rules)).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let text_of = |body: &Bytes| {
        let e: Value = serde_json::from_slice(body).unwrap();
        let der = base64::engine::general_purpose::STANDARD
            .decode(e["headers"]["ssl_client_cert"].as_str().unwrap())
            .unwrap();
        String::from_utf8_lossy(&der).into_owned()
    };
    let (_, body) = get_as_user(&pair, uri, Some(&user)).await.unwrap();
    let text = text_of(&body);
    assert!(text.contains("PP CA uploaded on the master") && text.contains("Uploaded"), "{text}");

    master.stop().await;
    wait_for("a propagated user through the new master", Duration::from_secs(30), || async {
        get_as_user(&pair, uri, Some(&user)).await.is_some_and(|(s, _)| s == 200)
    })
    .await;
    let (_, body) = get_as_user(&pair, uri, Some(&user)).await.unwrap();
    let text = text_of(&body);
    assert!(
        text.contains("PP CA uploaded on the master")
            && text.contains("Uploaded")
            && !text.contains("PP CA of the shadow"),
        "the new master issues user certificates with the master's uploaded CA and pattern: {text}"
    );
    shadow.stop().await;
    drop(mdir);
}
