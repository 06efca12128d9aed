#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The components as separate processes, as in production: `ferry up` provides identity and the
//! first proxy; a connector enrolled through the admin API runs on its own (`ferry connector
//! run`) and dials both that proxy and a standalone replica (`ferry proxy`); an app reaches the
//! backend through either proxy.

mod common;

use std::process::Command;
use std::time::Duration;

use ferry_testkit::EchoBackend;
use ferry_testkit::process::FerryProcess;
use serde_json::Value;

/// Starts `ferry <args>` and waits for its `ready` line.
fn start(args: &[&str]) -> FerryProcess {
    FerryProcess::start(env!("CARGO_BIN_EXE_ferry"), args, &[("FERRY_LOG", "warn")], false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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

async fn through(proxy: &str, token: &str, location: &str) -> (u16, Value) {
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(proxy).unwrap().custom_http_auth(format!("Bearer {token}").parse().unwrap()))
        .build()
        .unwrap();
    let r = client
        .get("http://plant.virtual:8000/api/x")
        .header("sap-connectivity-scc-location_id", location)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn connector_and_proxy_as_separate_processes() {
    ferry_core::init_crypto();
    let echo = EchoBackend::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_up, vcap) = common::ferry_up(dir, common::LISTEN_ANY);
    let data = dir.join("data");
    let conn = &vcap["connectivity"][0]["credentials"];
    let token_url = conn["url"].as_str().unwrap().to_owned();
    let subaccount = conn["tenantid"].as_str().unwrap().to_owned();
    let up_proxy = format!("http://127.0.0.1:{}", conn["onpremise_proxy_http_port"].as_str().unwrap());

    // Enroll a connector for location "plant" through the admin API.
    let out = dir.join("connector");
    common::enroll(&subaccount, Some("plant"), &token_url, &data, &out, &[]);

    // A standalone proxy replica: its tunnel certificate from the same CA, trust in the token
    // service through its JWKS.
    let ca = ferry_core::tls::LocalCa::from_pem(
        &std::fs::read_to_string(data.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(data.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let server = ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    std::fs::write(dir.join("proxy.pem"), &server.cert_pem).unwrap();
    std::fs::write(dir.join("proxy-key.pem"), server.key_pem.expose()).unwrap();
    let (http_b, tunnel_b) = (free_port(), free_port());
    std::fs::write(
        dir.join("proxy.toml"),
        format!(
            "http_port = {http_b}\nsocks5_port = {}\ntunnel_port = {tunnel_b}\ncertificate_file = \"proxy.pem\"\n\
             key_file = \"proxy-key.pem\"\nconnector_ca_file = \"data/ca.pem\"\n\
             token_keys_urls = [\"{token_url}/token_keys?zid={subaccount}\"]\n",
            free_port()
        ),
    )
    .unwrap();
    let _proxy = start(&["proxy", "--config", dir.join("proxy.toml").to_str().unwrap()]);

    // The connector dials both proxies and maps the echo backend.
    let mut toml = std::fs::read_to_string(out.join("connector.toml")).unwrap();
    toml = toml.replacen("proxies = [", &format!("proxies = [\"127.0.0.1:{tunnel_b}\", "), 1);
    toml.push_str(&format!(
        "\n[[mappings]]\nvirtualHost = \"plant.virtual\"\nvirtualPort = 8000\nlocalHost = \"127.0.0.1\"\nlocalPort = {}\n\
         protocol = \"HTTP\"\nresources = [{{ path = \"/api\", exactMatchOnly = false }}]\n",
        echo.addr.port()
    ));
    std::fs::write(out.join("connector.toml"), toml).unwrap();
    let _connector = start(&["connector", "run", "--config", out.join("connector.toml").to_str().unwrap()]);

    let http = ferry_core::tls::http_client(None).unwrap();
    let t = token(&http, conn).await;
    for proxy in [up_proxy.clone(), format!("http://127.0.0.1:{http_b}")] {
        let mut last = (0, Value::Null);
        for _ in 0..200 {
            last = through(&proxy, &t, "plant").await;
            if last.0 == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(last.0, 200, "through {proxy}: {}", last.1);
        assert_eq!(last.1["url"], "/api/x");
    }
    // The enrolled certificate is bound to its location: another location has no connector.
    assert_eq!(through(&up_proxy, &t, "elsewhere").await.0, 503);

    // A denied request lands in the standalone connector's audit log; `audit verify` checks the
    // chain and notices an edited line.
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(&up_proxy).unwrap().custom_http_auth(format!("Bearer {t}").parse().unwrap()))
        .build()
        .unwrap();
    let r = client
        .get("http://plant.virtual:8000/admin")
        .header("sap-connectivity-scc-location_id", "plant")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let folder = out.join("audit").join(&subaccount);
    let mut file = None;
    for _ in 0..200 {
        file = std::fs::read_dir(&folder).ok().and_then(|mut d| d.next()).and_then(|e| e.ok()).map(|e| e.path());
        if file.as_ref().is_some_and(|f| std::fs::read_to_string(f).unwrap_or_default().contains("/admin")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let file = file.unwrap_or_else(|| {
        let listing: Vec<String> = walk(&out);
        panic!("no audit file in {}; connector folder holds {listing:?}", folder.display())
    });
    let verify = |f: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_ferry")).args(["connector", "audit-verify"]).arg(f).output().unwrap()
    };
    let ok = verify(&file);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("/admin", "/public")).unwrap();
    let bad = verify(&file);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stdout).contains("line 2"), "{}", String::from_utf8_lossy(&bad.stdout));
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        out.push(p.display().to_string());
        if p.is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

/// A standalone connector with only the admin API: the subaccount is added with the
/// authentication data `ferry connector enroll` wrote, the mapping and resource through the API,
/// and an app then reaches the backend through `ferry up`'s proxy.
#[tokio::test]
async fn standalone_connector_managed_through_its_admin_api() {
    ferry_core::init_crypto();
    let echo = EchoBackend::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_up, vcap) = common::ferry_up(dir, common::LISTEN_ANY);
    let data = dir.join("data");
    let conn = &vcap["connectivity"][0]["credentials"];
    let token_url = conn["url"].as_str().unwrap().to_owned();
    let subaccount = conn["tenantid"].as_str().unwrap().to_owned();
    let up_proxy = format!("http://127.0.0.1:{}", conn["onpremise_proxy_http_port"].as_str().unwrap());
    let out = dir.join("scc");
    common::enroll(&subaccount, Some("depot"), &token_url, &data, &out, &[]);
    let auth_data: Value =
        serde_json::from_slice(&std::fs::read(out.join("authentication-data.json")).unwrap()).unwrap();

    std::fs::write(dir.join("scc.toml"), format!("[admin]\nport = {}\ndata_dir = \"scc-data\"\n", free_port()))
        .unwrap();
    let connector = start(&["connector", "run", "--config", dir.join("scc.toml").to_str().unwrap()]);
    let line = connector.banner.iter().find(|l| l.starts_with("admin API:")).expect("admin API line");
    let base = line.split_whitespace().nth(2).unwrap().to_owned();
    let ca = std::fs::read_to_string(dir.join("scc-data").join("ui-ca.pem")).unwrap();
    let api = ferry_core::tls::http_client(Some(&ca)).unwrap();
    let call = |method: reqwest::Method, path: &str, body: Value| {
        let pw = if path.ends_with("/basic") { "manage" } else { "new password 1" };
        api.request(method, format!("{base}/api/v1/configuration{path}"))
            .basic_auth("Administrator", Some(pw))
            .json(&body)
            .send()
    };
    let r = call(
        reqwest::Method::PUT,
        "/connector/authentication/basic",
        serde_json::json!({"oldPassword": "manage", "newPassword": "new password 1"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 204);
    let r = call(reqwest::Method::POST, "/subaccounts", serde_json::json!({"authenticationData": auth_data}))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let sub = r.headers()["location"].to_str().unwrap().trim_start_matches("/api/v1/configuration").to_owned();
    let r = call(
        reqwest::Method::POST,
        &format!("{sub}/systemMappings"),
        serde_json::json!({"virtualHost": "plant.virtual", "virtualPort": 8000, "localHost": "127.0.0.1",
                           "localPort": echo.addr.port(), "protocol": "HTTP", "backendType": "nonSAPsys"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r = call(
        reqwest::Method::POST,
        &format!("{sub}/systemMappings/plant.virtual:8000/resources"),
        serde_json::json!({"id": "/api", "enabled": true}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);

    let http = ferry_core::tls::http_client(None).unwrap();
    let t = token(&http, conn).await;
    let mut last = (0, Value::Null);
    for _ in 0..200 {
        last = through(&up_proxy, &t, "depot").await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(last.0, 200, "{}", last.1);
    assert_eq!(last.1["url"], "/api/x");
}

/// The benchmark-only SOCKS5 listener without authentication is refused at start-up unless it
/// listens on loopback, before anything else is read or bound.
#[test]
fn proxy_refuses_a_no_auth_socks5_listener_off_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("proxy.toml");
    for (listen, ok) in [("0.0.0.0:0", false), ("[::]:0", false), ("192.0.2.1:1080", false), ("127.0.0.1:0", true)] {
        std::fs::write(
            &config,
            format!(
                "certificate_file = \"missing.pem\"\nkey_file = \"missing-key.pem\"\nconnector_ca_file = \"missing-ca.pem\"\n\
                 token_keys_urls = [\"http://127.0.0.1:9/token_keys\"]\n\
                 [bench_socks5_no_auth]\nlisten = \"{listen}\"\nsubaccount = \"s1\"\n"
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ferry")).arg("proxy").arg("--config").arg(&config).output().unwrap();
        assert!(!out.status.success(), "{listen}: the files are missing, so the proxy never starts");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // A loopback address passes the check and fails later, on the missing certificate.
        assert_eq!(stderr.contains("may only listen on a loopback address"), !ok, "{listen}: {stderr}");
        assert_eq!(stderr.contains("missing.pem"), ok, "{listen}: {stderr}");
    }
}

/// A connector enrolled with a short-lived certificate (seconds) renews it at the directory with
/// the current one over mTLS, at `certificate_renew_at` of its lifetime, and keeps serving: not
/// one request of a steady stream fails across the tunnel swaps.
#[tokio::test]
async fn standalone_connector_renews_its_short_lived_certificate() {
    ferry_core::init_crypto();
    let echo = EchoBackend::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_up, vcap) = common::ferry_up(dir, common::LISTEN_ANY);
    let conn = &vcap["connectivity"][0]["credentials"];
    let token_url = conn["url"].as_str().unwrap().to_owned();
    let subaccount = conn["tenantid"].as_str().unwrap().to_owned();
    let up_proxy = format!("http://127.0.0.1:{}", conn["onpremise_proxy_http_port"].as_str().unwrap());
    let out = dir.join("scc");
    common::enroll(&subaccount, Some("plant"), &token_url, &dir.join("data"), &out, &["--validity-seconds", "8"]);
    let auth_data: Value =
        serde_json::from_slice(&std::fs::read(out.join("authentication-data.json")).unwrap()).unwrap();
    assert!(auth_data["renewal"].as_str().unwrap().starts_with("https://"), "{auth_data}");

    std::fs::write(
        dir.join("scc.toml"),
        format!("[admin]\nport = {}\ndata_dir = \"scc-data\"\ncertificate_renew_at = 0.5\n", free_port()),
    )
    .unwrap();
    let connector = start(&["connector", "run", "--config", dir.join("scc.toml").to_str().unwrap()]);
    let line = connector.banner.iter().find(|l| l.starts_with("admin API:")).expect("admin API line");
    let base = line.split_whitespace().nth(2).unwrap().to_owned();
    let ca = std::fs::read_to_string(dir.join("scc-data").join("ui-ca.pem")).unwrap();
    let api = ferry_core::tls::http_client(Some(&ca)).unwrap();
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let pw = if path.ends_with("/basic") { "manage" } else { "new password 1" };
        let mut r =
            api.request(method, format!("{base}/api/v1/configuration{path}")).basic_auth("Administrator", Some(pw));
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send()
    };
    let r = call(
        reqwest::Method::PUT,
        "/connector/authentication/basic",
        Some(serde_json::json!({"oldPassword": "manage", "newPassword": "new password 1"})),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 204);
    let r = call(reqwest::Method::POST, "/subaccounts", Some(serde_json::json!({"authenticationData": auth_data})))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let sub = r.headers()["location"].to_str().unwrap().trim_start_matches("/api/v1/configuration").to_owned();
    let first: Value = r.json().await.unwrap();
    assert_eq!(first["autoCertRenewal"], true, "{first}");
    let first_valid_to = first["subaccountCertificate"]["validTo"].as_i64().unwrap();
    let r = call(
        reqwest::Method::POST,
        &format!("{sub}/systemMappings"),
        Some(serde_json::json!({"virtualHost": "plant.virtual", "virtualPort": 8000, "localHost": "127.0.0.1",
                           "localPort": echo.addr.port(), "protocol": "HTTP", "backendType": "nonSAPsys"})),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r = call(
        reqwest::Method::POST,
        &format!("{sub}/systemMappings/plant.virtual:8000/resources"),
        Some(serde_json::json!({"id": "/api", "enabled": true})),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);

    let http = ferry_core::tls::http_client(None).unwrap();
    let t = token(&http, conn).await;
    // Set-up: the tunnel of the new subaccount comes up (slowly on a loaded machine).
    let mut last = (0, Value::Null);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        last = through(&up_proxy, &t, "plant").await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(last.0, 200, "{}", last.1);

    // From here on a steady stream of requests — one client on a keep-alive connection, three
    // concurrent ones on a new connection each time — must not see a single failure while the
    // connector renews its certificate (every half lifetime, 4 s) at least twice and serves past
    // the first certificate's end. No request is retried by the client: each renewal swaps the
    // tunnel, and what the draining one refused the proxy sends on the new one.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for client in 0..4 {
        let (stop, t, proxy) = (stop.clone(), t.clone(), up_proxy.clone());
        load.spawn(async move {
            // A request lost in a tunnel swap fails the test instead of hanging it; the bound is
            // far above any answer's time (the connector's own drain cut-off is 10 s).
            let mut b = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .proxy(reqwest::Proxy::http(&proxy).unwrap().custom_http_auth(format!("Bearer {t}").parse().unwrap()));
            if client > 0 {
                b = b.pool_max_idle_per_host(0);
            }
            let http = b.build().unwrap();
            let (mut ok, mut failures) = (0usize, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = http.get("http://plant.virtual:8000/api/x").header("sap-connectivity-scc-location_id", "plant");
                match r.send().await {
                    Ok(r) if r.status() == 200 => match r.json::<Value>().await {
                        Ok(v) if v["url"] == "/api/x" => ok += 1,
                        other => failures.push(format!("client {client}: {other:?}")),
                    },
                    Ok(r) => {
                        failures.push(format!("client {client}: {} {}", r.status(), r.text().await.unwrap_or_default()))
                    }
                    Err(e) => failures.push(format!("client {client}: {e:?}")),
                }
            }
            eprintln!("client {client}: {ok} requests answered, {} failed", failures.len());
            (ok, failures)
        });
    }
    let mut valid_to = vec![first_valid_to];
    let expired_at = std::time::UNIX_EPOCH + Duration::from_millis(first_valid_to as u64 + 1000);
    for _ in 0..1200 {
        let now: Value = call(reqwest::Method::GET, &sub, None).await.unwrap().json().await.unwrap();
        let v = now["subaccountCertificate"]["validTo"].as_i64().unwrap();
        if valid_to.last() != Some(&v) {
            valid_to.push(v);
        }
        if valid_to.len() >= 3 && std::time::SystemTime::now() > expired_at {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failures) = (0, Vec::new());
    while let Some(r) = load.join_next().await {
        let (o, f) = r.unwrap();
        ok += o;
        failures.extend(f);
    }
    assert!(valid_to.len() >= 3, "not renewed twice: validTo went {valid_to:?}");
    assert!(std::time::SystemTime::now() > expired_at);
    assert!(failures.is_empty(), "{} of {} requests failed across the renewals: {failures:#?}", failures.len(), ok);
    assert!(ok > 0);
    let audit =
        std::fs::read_to_string(dir.join("audit").join("_configuration").join("audit-log.jsonl")).unwrap_or_default();
    assert!(audit.contains("certificate renewed automatically"), "{audit}");
}
