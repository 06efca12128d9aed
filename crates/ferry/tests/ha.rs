#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Acceptance of connector high availability with real processes: `ferry up` (proxy and
//! enrollment), a master and a shadow `ferry connector run`. A write acknowledged by the master
//! is on the shadow; the master is killed with SIGKILL during a stream of requests and the shadow
//! serves them again; the restarted old master becomes shadow.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_testkit::EchoBackend;
use ferry_testkit::process::FerryProcess;
use reqwest::Method;
use serde_json::{Value, json};

const PW: &str = "new password 1";

fn start(args: &[&str]) -> FerryProcess {
    FerryProcess::start(env!("CARGO_BIN_EXE_ferry"), args, &[("FERRY_LOG", "warn")], false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn signal(p: &FerryProcess, sig: &str) {
    assert!(Command::new("kill").args([sig, &p.id().to_string()]).status().unwrap().success());
}

async fn token(http: &reqwest::Client, c: &Value) -> String {
    let form = [
        ("grant_type", "client_credentials".to_owned()),
        ("client_id", c["clientid"].as_str().unwrap().to_owned()),
        ("client_secret", c["clientsecret"].as_str().unwrap().to_owned()),
    ];
    let v: Value = http
        .post(format!("{}/oauth/token", c["url"].as_str().unwrap()))
        .form(&form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

/// One connector process with its admin API.
struct Scc {
    process: FerryProcess,
    config: std::path::PathBuf,
    base: String,
    api: reqwest::Client,
    ca: String,
}

impl Scc {
    fn start(dir: &Path, port: u16) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("scc.toml");
        std::fs::write(&config, format!("[admin]\nport = {port}\ndata_dir = \"data\"\n")).unwrap();
        Self::run(config, port)
    }

    fn run(config: std::path::PathBuf, port: u16) -> Self {
        let process = start(&["connector", "run", "--config", config.to_str().unwrap()]);
        let ca = std::fs::read_to_string(config.parent().unwrap().join("data").join("ui-ca.pem")).unwrap();
        let api = ferry_core::tls::http_client(Some(&ca)).unwrap();
        Self { process, config, base: format!("https://127.0.0.1:{port}"), api, ca }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let pw = if path.ends_with("/basic") { "manage" } else { PW };
        let mut r = self.api.request(method, format!("{}{path}", self.base)).basic_auth("Administrator", Some(pw));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        let s = r.status().as_u16();
        let t = r.text().await.unwrap();
        (s, serde_json::from_str(&t).unwrap_or(Value::String(t)))
    }

    async fn conf(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(method, &format!("/api/v1/configuration{path}"), body).await
    }

    async fn master_role(&self) -> Option<bool> {
        let r = self.api.get(format!("{}/exposed?action=hasMasterRole", self.base)).send().await.ok()?;
        Some(r.text().await.ok()? == "true")
    }

    async fn shadow_state(&self) -> String {
        let (_, b) = self.conf(Method::GET, "/connector/ha/shadow/state", None).await;
        b["state"].as_str().unwrap_or_default().to_owned()
    }
}

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

fn mapping(vhost: &str, port: u16) -> Value {
    json!({"virtualHost": vhost, "virtualPort": 8000, "localHost": "127.0.0.1", "localPort": port,
           "protocol": "HTTP", "backendType": "nonSAPsys"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_master_the_shadow_serves_and_the_old_master_returns_as_shadow() {
    ferry_core::init_crypto();
    let echo = EchoBackend::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (up, vcap) = common::ferry_up(dir, common::LISTEN_ANY);
    let data = dir.join("data");
    let conn = vcap["connectivity"][0]["credentials"].clone();
    let token_url = conn["url"].as_str().unwrap().to_owned();
    let subaccount = conn["tenantid"].as_str().unwrap().to_owned();
    let proxy = format!("http://127.0.0.1:{}", conn["onpremise_proxy_http_port"].as_str().unwrap());
    let out = dir.join("enroll");
    common::enroll(&subaccount, Some("ha"), &token_url, &data, &out, &[]);
    let auth: Value = serde_json::from_slice(&std::fs::read(out.join("authentication-data.json")).unwrap()).unwrap();

    let (pa, pb) = (free_port(), free_port());
    let a = Scc::start(&dir.join("a"), pa);
    let b = Scc::start(&dir.join("b"), pb);
    for n in [&a, &b] {
        let (s, body) = n
            .conf(
                Method::PUT,
                "/connector/authentication/basic",
                Some(json!({"oldPassword": "manage", "newPassword": PW})),
            )
            .await;
        assert_eq!(s, 204, "{body}");
    }
    let (s, body) = a.conf(Method::POST, "/subaccounts", Some(json!({"authenticationData": auth}))).await;
    assert_eq!(s, 201, "{body}");
    let sub = format!("/subaccounts/{}/{}", body["regionHost"].as_str().unwrap(), subaccount);
    let (s, body) =
        a.conf(Method::POST, &format!("{sub}/systemMappings"), Some(mapping("plant.virtual", echo.addr.port()))).await;
    assert_eq!(s, 201, "{body}");
    let (s, body) = a
        .conf(
            Method::POST,
            &format!("{sub}/systemMappings/plant.virtual:8000/resources"),
            Some(json!({"id": "/api", "enabled": true})),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let (s, body) = a.conf(Method::PUT, "/connector/ha/master/config", Some(json!({"haEnabled": true}))).await;
    assert_eq!(s, 200, "{body}");
    let (s, _) = b.conf(Method::PUT, "/connector/haRole", Some(json!("shadow"))).await;
    assert_eq!(s, 204);
    let (s, body) = b
        .conf(
            Method::PUT,
            "/connector/ha/shadow/config",
            Some(json!({"masterHost": "127.0.0.1", "masterPort": pa, "ownHost": "127.0.0.1",
                        "checkIntervalInSeconds": 1, "takeoverDelayInSeconds": 2,
                        "connectTimeoutInMillis": 1000, "requestTimeoutInMillis": 2000})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = b
        .conf(
            Method::POST,
            "/connector/ha/shadow/state",
            Some(json!({"op": "CONNECT", "user": "Administrator", "password": PW, "caCertificate": a.ca})),
        )
        .await;
    assert_eq!(s, 204, "{body}");
    wait_for("shadow READY", Duration::from_secs(30), || async { b.shadow_state().await == "READY" }).await;

    // Synchronous replication: while the shadow is frozen the master does not acknowledge a
    // write; once it runs again the write is acknowledged, and by then it is in the shadow's file.
    signal(&b.process, "-STOP");
    let write = {
        let (api, base) = (a.api.clone(), a.base.clone());
        let path = format!("{base}/api/v1/configuration{sub}/systemMappings");
        tokio::spawn(async move {
            api.post(path)
                .basic_auth("Administrator", Some(PW))
                .json(&mapping("sync.virtual", 9))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let early = write.is_finished();
    signal(&b.process, "-CONT");
    assert!(!early, "the master acknowledged a write while its READY shadow could not store it");
    assert_eq!(write.await.unwrap(), 201);
    let stored = std::fs::read_to_string(dir.join("b").join("data").join("scc-config.json")).unwrap();
    assert!(stored.contains("sync.virtual"), "an acknowledged write is missing on the shadow");

    // A stream of requests through the proxy, reaching the backend through the master.
    let http = ferry_core::tls::http_client(None).unwrap();
    let t = token(&http, &conn).await;
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(&proxy).unwrap().custom_http_auth(format!("Bearer {t}").parse().unwrap()))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let log: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
    let stream = {
        let log = log.clone();
        tokio::spawn(async move {
            loop {
                let s = match client
                    .get("http://plant.virtual:8000/api/x")
                    .header("sap-connectivity-scc-location_id", "ha")
                    .send()
                    .await
                {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                log.lock().unwrap().push((Instant::now(), s));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let ok_count = |log: &Arc<Mutex<Vec<(Instant, u16)>>>, after: Instant| {
        log.lock().unwrap().iter().filter(|(t, s)| *t > after && *s == 200).count()
    };
    let t0 = Instant::now();
    wait_for("requests through the master", Duration::from_secs(30), || async { ok_count(&log, t0) >= 3 }).await;

    // kill -9 of the master during the stream.
    let killed = Instant::now();
    let (_, _) = a.process.kill_and_collect();
    wait_for("requests served again after kill -9 of the master", Duration::from_secs(60), || async {
        ok_count(&log, killed) >= 3
    })
    .await;
    let first_ok = log.lock().unwrap().iter().find(|(t, s)| *t > killed && *s == 200).map(|(t, _)| *t).unwrap();
    println!(
        "measured: first request served by the shadow {:?} after kill -9 of the master \
         (checkIntervalInSeconds 1, takeoverDelayInSeconds 2)",
        first_ok - killed
    );
    assert_eq!(b.master_role().await, Some(true));
    // Everything the master acknowledged is on the new master.
    let (s, maps) = b.conf(Method::GET, &format!("{sub}/systemMappings"), None).await;
    assert_eq!(s, 200);
    let names: Vec<&str> = maps.as_array().unwrap().iter().map(|m| m["virtualHost"].as_str().unwrap()).collect();
    assert!(names.contains(&"plant.virtual") && names.contains(&"sync.virtual"), "{names:?}");

    // The old master restarts: its peer is master with a newer epoch, so it becomes the shadow
    // and never opens a tunnel.
    let a2 = Scc::run(a.config.clone(), pa);
    assert_eq!(a2.master_role().await, Some(false));
    wait_for("old master READY as shadow", Duration::from_secs(30), || async { a2.shadow_state().await == "READY" })
        .await;
    let (s, body) = a2.conf(Method::POST, &format!("{sub}/systemMappings"), Some(mapping("x.virtual", 9))).await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["type"], "SHADOW_UPDATE");
    let t1 = Instant::now();
    wait_for("requests keep flowing", Duration::from_secs(30), || async { ok_count(&log, t1) >= 3 }).await;
    stream.abort();
    drop(up);
}
