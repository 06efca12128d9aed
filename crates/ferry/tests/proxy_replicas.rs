#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Proxy replicas as separate processes: three `ferry proxy` replicas, one connector managed
//! through its admin API whose subaccount lists all three (`proxyReplicas`), and an app that
//! reaches the backend through any of them. A replica killed with SIGKILL costs only the
//! connections it carried and gets its tunnel back once it restarts; a rolling restart (SIGTERM,
//! start again, one replica at a time) fails no request of a client that retries idempotent calls
//! on another replica.

mod common;

use std::path::{Path, PathBuf};
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

/// One `ferry proxy` replica with fixed ports, so that it restarts where it was.
struct Replica {
    config: PathBuf,
    http: u16,
    tunnel: u16,
    process: Option<FerryProcess>,
}

impl Replica {
    fn new(dir: &Path, name: &str, token_keys: &str) -> Self {
        let (http, socks, tunnel) = (free_port(), free_port(), free_port());
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "http_port = {http}\nsocks5_port = {socks}\ntunnel_port = {tunnel}\ncertificate_file = \"proxy.pem\"\n\
                 key_file = \"proxy-key.pem\"\nconnector_ca_file = \"data/ca.pem\"\ntoken_keys_urls = [\"{token_keys}\"]\n"
            ),
        )
        .unwrap();
        let mut r = Self { config, http, tunnel, process: None };
        r.start();
        r
    }

    fn start(&mut self) {
        self.process = Some(start(&["proxy", "--config", self.config.to_str().unwrap()]));
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    _up: FerryProcess,
    _echo: EchoBackend,
    _connector: FerryProcess,
    replicas: Vec<Replica>,
    /// An app client per replica (its HTTP proxy and the app's token).
    apps: Vec<reqwest::Client>,
    api: reqwest::Client,
    sub_url: String,
}

/// `ferry up` (token service, CA, enrollment), three proxy replicas, and a standalone connector
/// whose subaccount, added through the admin API, names the three tunnel endpoints.
async fn setup() -> Setup {
    ferry_core::init_crypto();
    let echo = EchoBackend::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let (up, vcap) = common::ferry_up(&dir, common::LISTEN_ANY);
    let data = dir.join("data");
    let conn = vcap["connectivity"][0]["credentials"].clone();
    let token_url = conn["url"].as_str().unwrap().to_owned();
    let subaccount = conn["tenantid"].as_str().unwrap().to_owned();
    let out = dir.join("enroll");
    common::enroll(&subaccount, Some("rep"), &token_url, &data, &out, &[]);
    let auth: Value = serde_json::from_slice(&std::fs::read(out.join("authentication-data.json")).unwrap()).unwrap();

    let ca = ferry_core::tls::LocalCa::from_pem(
        &std::fs::read_to_string(data.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(data.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let server = ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    std::fs::write(dir.join("proxy.pem"), &server.cert_pem).unwrap();
    std::fs::write(dir.join("proxy-key.pem"), server.key_pem.expose()).unwrap();
    let token_keys = format!("{token_url}/token_keys?zid={subaccount}");
    let replicas: Vec<Replica> = (0..3).map(|i| Replica::new(&dir, &format!("proxy-{i}"), &token_keys)).collect();

    let port = free_port();
    std::fs::write(dir.join("scc.toml"), format!("connections = 1\n[admin]\nport = {port}\ndata_dir = \"scc-data\"\n"))
        .unwrap();
    let connector = start(&["connector", "run", "--config", dir.join("scc.toml").to_str().unwrap()]);
    let ui_ca = std::fs::read_to_string(dir.join("scc-data").join("ui-ca.pem")).unwrap();
    let api = ferry_core::tls::http_client(Some(&ui_ca)).unwrap();
    let base = format!("https://127.0.0.1:{port}/api/v1/configuration");
    let call = |method: Method, path: String, body: Value| {
        let pw = if path.ends_with("/basic") { "manage" } else { PW };
        api.request(method, format!("{base}{path}")).basic_auth("Administrator", Some(pw)).json(&body).send()
    };
    let r = call(
        Method::PUT,
        "/connector/authentication/basic".into(),
        json!({"oldPassword": "manage", "newPassword": PW}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 204);
    // A bad replica address is refused with what to fix.
    let r = call(Method::POST, "/subaccounts".into(), json!({"authenticationData": auth, "proxyReplicas": ["nope"]}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let why = r.text().await.unwrap();
    assert!(why.contains("proxyReplicas entry") && why.contains("must be a proxy tunnel endpoint host:port"), "{why}");
    let endpoints: Vec<String> = replicas.iter().map(|r| format!("127.0.0.1:{}", r.tunnel)).collect();
    // Added with two replicas; the third comes with a later change of the list.
    let r =
        call(Method::POST, "/subaccounts".into(), json!({"authenticationData": auth, "proxyReplicas": endpoints[..2]}))
            .await
            .unwrap();
    assert_eq!(r.status(), 201);
    let sub = r.headers()["location"].to_str().unwrap().trim_start_matches("/api/v1/configuration").to_owned();
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["proxyReplicas"], json!(endpoints[..2]));
    let r = call(
        Method::POST,
        format!("{sub}/systemMappings"),
        json!({"virtualHost": "plant.virtual", "virtualPort": 8000, "localHost": "127.0.0.1",
               "localPort": echo.addr.port(), "protocol": "HTTP", "backendType": "nonSAPsys"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r = call(
        Method::POST,
        format!("{sub}/systemMappings/plant.virtual:8000/resources"),
        json!({"id": "/api", "enabled": true}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r = call(Method::PUT, sub.clone(), json!({"proxyReplicas": endpoints})).await.unwrap();
    assert_eq!(r.status(), 200);
    let changed: Value = r.json().await.unwrap();
    assert_eq!(changed["proxyReplicas"], json!(endpoints));

    let http = ferry_core::tls::http_client(None).unwrap();
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", conn["clientid"].as_str().unwrap()),
        ("client_secret", conn["clientsecret"].as_str().unwrap()),
    ];
    let t: Value =
        http.post(format!("{token_url}/oauth/token")).form(&form).send().await.unwrap().json().await.unwrap();
    let t = t["access_token"].as_str().unwrap().to_owned();
    let apps = replicas
        .iter()
        .map(|r| {
            reqwest::Client::builder()
                .proxy(reqwest::Proxy::http(r.url()).unwrap().custom_http_auth(format!("Bearer {t}").parse().unwrap()))
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap()
        })
        .collect();
    let s = Setup {
        _tmp: tmp,
        _up: up,
        _echo: echo,
        _connector: connector,
        replicas,
        apps,
        api,
        sub_url: format!("{base}{sub}"),
    };
    for i in 0..3 {
        s.wait_serving(i).await;
    }
    // The connection shows one tunnel to each replica.
    let v: Value =
        s.api.get(&s.sub_url).basic_auth("Administrator", Some(PW)).send().await.unwrap().json().await.unwrap();
    let listed = v["tunnel"]["proxyReplicas"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{v}");
    assert!(listed.iter().all(|r| r["connections"] == 1), "{v}");
    s
}

/// One app request through replica `i`: the status, or 0 when the proxy could not be reached.
async fn request(app: &reqwest::Client) -> u16 {
    match app.get("http://plant.virtual:8000/api/x").header("sap-connectivity-scc-location_id", "rep").send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            match r.bytes().await {
                Ok(_) => s,
                Err(_) => 0,
            }
        }
        Err(_) => 0,
    }
}

impl Setup {
    /// Until requests through replica `i` reach the backend (its tunnel is up).
    async fn wait_serving(&self, i: usize) -> Duration {
        let start = Instant::now();
        loop {
            let s = request(&self.apps[i]).await;
            if s == 200 {
                return start.elapsed();
            }
            assert!(start.elapsed() < Duration::from_secs(60), "replica {i} does not serve: last status {s}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

type Log = Arc<Mutex<Vec<(usize, u16)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_of_three_proxy_replicas_fails_nothing_through_the_others_and_it_comes_back() {
    let mut s = setup().await;
    // Requests round-robin through replicas 1 and 2 during the kill and the restart of replica 0.
    let log: Log = Arc::default();
    let stop = ferry_core::Shutdown::new();
    let load = {
        let (apps, log, stop) = (s.apps.clone(), log.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.is_cancelled() {
                let i = 1 + n % 2;
                let status = request(&apps[i]).await;
                log.lock().unwrap().push((i, status));
                n += 1;
            }
        })
    };
    let count = |log: &Log| log.lock().unwrap().len();
    while count(&log) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed = s.replicas[0].process.take().unwrap();
    let _ = killed.kill_and_collect();
    assert_eq!(request(&s.apps[0]).await, 0, "the killed replica still answers");
    let before = count(&log);
    while count(&log) < before + 40 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The same replica restarts on the same ports: the connector dials it again.
    s.replicas[0].start();
    let back = s.wait_serving(0).await;
    println!("measured: the restarted replica served {back:?} after its start");
    let before = count(&log);
    while count(&log) < before + 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    load.await.unwrap();
    let log = std::mem::take(&mut *log.lock().unwrap());
    let failed: Vec<&(usize, u16)> = log.iter().filter(|(_, st)| *st != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests through the surviving replicas failed: {failed:?}",
        failed.len(),
        log.len()
    );
    let v: Value =
        s.api.get(&s.sub_url).basic_auth("Administrator", Some(PW)).send().await.unwrap().json().await.unwrap();
    let listed = v["tunnel"]["proxyReplicas"].as_array().unwrap();
    assert!(listed.iter().all(|r| r["connections"] == 1), "{v}");
}

/// One idempotent call as a client that retries does: through replica `first`, and on a failure
/// (proxy unreachable, or 502/503/504: no tunnel there right now) once more through each other
/// replica. Returns the attempts it took, or `None` when every attempt failed.
async fn retried(apps: &[reqwest::Client], first: usize) -> Option<usize> {
    for attempt in 0..apps.len() {
        let status = request(&apps[(first + attempt) % apps.len()]).await;
        if status == 200 {
            return Some(attempt + 1);
        }
        assert!(matches!(status, 0 | 502 | 503 | 504), "a request failed with {status}, which a retry cannot fix");
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_the_proxy_replicas_fails_no_request_of_a_retrying_client() {
    let mut s = setup().await;
    let outcomes: Arc<Mutex<Vec<Option<usize>>>> = Arc::default();
    let stop = ferry_core::Shutdown::new();
    let load = {
        let (apps, outcomes, stop) = (s.apps.clone(), outcomes.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.is_cancelled() {
                let r = retried(&apps, n % apps.len()).await;
                outcomes.lock().unwrap().push(r);
                n += 1;
            }
        })
    };
    let count = |o: &Arc<Mutex<Vec<Option<usize>>>>| o.lock().unwrap().len();
    for i in 0..s.replicas.len() {
        let before = count(&outcomes);
        while count(&outcomes) < before + 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut p = s.replicas[i].process.take().unwrap();
        assert!(p.terminate().success(), "replica {i} did not drain and exit cleanly on SIGTERM");
        s.replicas[i].start();
        // As a rolling restart waits for readiness: the next replica goes once this one serves.
        s.wait_serving(i).await;
    }
    let before = count(&outcomes);
    while count(&outcomes) < before + 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    load.await.unwrap();
    let outcomes = outcomes.lock().unwrap();
    let failed = outcomes.iter().filter(|o| o.is_none()).count();
    let retried = outcomes.iter().filter(|o| o.is_some_and(|a| a > 1)).count();
    println!("measured: {} calls during the rolling restart, {retried} needed a retry", outcomes.len());
    assert_eq!(failed, 0, "{failed} of {} calls failed on every replica", outcomes.len());
}
