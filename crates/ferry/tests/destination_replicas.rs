#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Two Destination Service replicas (`ferry up` processes) on one PostgreSQL database, as
//! issue 7 asks: one killed with SIGKILL while both are under load costs no request sent to
//! the other, and a credential changed through one is what the other serves right after, in the
//! destination and in the token the find API fetches with it (no stale token from a cache).

use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_testkit::postgres::Postgres;
use ferry_testkit::process::FerryProcess;
use serde_json::{Value, json};

const KEY_HEX: &str = "7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a7a";

fn start(dir: &Path, name: &str, database: &str) -> FerryProcess {
    let config = format!(
        "[subaccount]\nid = \"zone-ha\"\n\n[listen]\ntoken_port = 0\ntoken_https_port = 0\ndestination_port = 0\n\
         http_proxy_port = 0\nsocks5_port = 0\ntunnel_port = 0\n\n[destination_store]\ndatabase = {database:?}\n\
         key_env = \"FERRY_TEST_DESTINATION_KEY\"\n"
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let (data, env_file) = (dir.join(name), dir.join(format!("{name}-env.json")));
    let args = [
        OsStr::new("up"),
        OsStr::new("--config"),
        path.as_os_str(),
        OsStr::new("--data-dir"),
        data.as_os_str(),
        OsStr::new("--env-file"),
        env_file.as_os_str(),
    ];
    FerryProcess::start(
        env!("CARGO_BIN_EXE_ferry"),
        &args,
        &[("FERRY_LOG", "warn"), ("FERRY_TEST_DESTINATION_KEY", KEY_HEX)],
        false,
    )
}

/// A replica's destination binding: its API base URL, a token for it, and the binding.
async fn client(http: &reqwest::Client, p: &FerryProcess) -> (String, String, Value) {
    let c = p.vcap.as_ref().expect("VCAP_SERVICES line")["destination"][0]["credentials"].clone();
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", c["clientid"].as_str().unwrap()),
        ("client_secret", c["clientsecret"].as_str().unwrap()),
    ];
    let r: Value = http
        .post(format!("{}/oauth/token", c["url"].as_str().unwrap()))
        .form(&form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let base = format!("{}/destination-configuration/v1", c["uri"].as_str().unwrap());
    (base, r["access_token"].as_str().unwrap().to_owned(), c)
}

async fn find(http: &reqwest::Client, base: &str, token: &str, name: &str) -> Value {
    let r = http.get(format!("{base}/destinations/{name}")).bearer_auth(token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn put(http: &reqwest::Client, base: &str, token: &str, body: &Value) {
    let r = http.put(format!("{base}/subaccountDestinations")).bearer_auth(token).json(body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_of_one_replica_under_load_costs_no_request_to_the_other() {
    ferry_core::init_crypto();
    let pg = Postgres::shared();
    let url = pg.database();
    let dir = tempfile::tempdir().unwrap();
    let a = start(dir.path(), "a", &url);
    let b = start(dir.path(), "b", &url);
    let http = ferry_core::tls::http_client(None).unwrap();
    let (base_a, token_a, _) = client(&http, &a).await;
    let (base_b, token_b, _) = client(&http, &b).await;
    let r = http
        .post(format!("{base_a}/subaccountDestinations"))
        .bearer_auth(&token_a)
        .json(&json!({"Name": "erp", "Type": "HTTP", "URL": "http://erp.example/0", "Authentication": "NoAuthentication"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // Each replica gets reads (find) and writes (update of the same destination) in a loop;
    // every answer of the survivor B is logged.
    let b_log: Arc<Mutex<Vec<u16>>> = Arc::default();
    let stop = ferry_core::Shutdown::new();
    let mut load = tokio::task::JoinSet::new();
    for (base, token, log) in [(base_a, token_a, None), (base_b, token_b, Some(b_log.clone()))] {
        let (http, stop) = (http.clone(), stop.clone());
        load.spawn(async move {
            let mut n = 0u32;
            while !stop.is_cancelled() {
                let sent = if n.is_multiple_of(2) {
                    http.get(format!("{base}/destinations/erp")).bearer_auth(&token).send().await
                } else {
                    let body = json!({"Name": "erp", "Type": "HTTP", "URL": format!("http://erp.example/{n}"),
                                      "Authentication": "NoAuthentication"});
                    http.put(format!("{base}/subaccountDestinations")).bearer_auth(&token).json(&body).send().await
                };
                let status = match sent {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                match &log {
                    Some(log) => log.lock().unwrap().push(status),
                    // A is gone: no busy loop of refused connections.
                    None if status == 0 => tokio::time::sleep(Duration::from_millis(20)).await,
                    None => {}
                }
                n += 1;
            }
        });
    }
    let count = |log: &Arc<Mutex<Vec<u16>>>| log.lock().unwrap().len();
    while count(&b_log) < 40 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = a.kill_and_collect();
    let before = count(&b_log);
    while count(&b_log) < before + 100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    while load.join_next().await.is_some() {}
    let log = b_log.lock().unwrap();
    let bad: Vec<&u16> = log.iter().filter(|s| **s != 200).collect();
    assert!(bad.is_empty(), "{} of {} requests to the surviving replica failed: {bad:?}", bad.len(), log.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_changed_on_one_replica_is_what_the_other_serves_right_after() {
    ferry_core::init_crypto();
    let pg = Postgres::shared();
    let url = pg.database();
    let dir = tempfile::tempdir().unwrap();
    let a = start(dir.path(), "a", &url);
    let b = start(dir.path(), "b", &url);
    let http = ferry_core::tls::http_client(None).unwrap();
    let (base_a, token_a, binding_a) = client(&http, &a).await;
    let (base_b, token_b, _) = client(&http, &b).await;

    // BasicAuthentication: the new password, in the destination and in its ready-made header.
    let basic = |pw: &str| {
        json!({"Name": "basic", "Type": "HTTP", "URL": "http://erp.example", "Authentication": "BasicAuthentication",
               "User": "ALICE", "Password": pw})
    };
    let r = http.post(format!("{base_a}/subaccountDestinations")).bearer_auth(&token_a).json(&basic("one")).send();
    assert_eq!(r.await.unwrap().status(), 201);
    let found = find(&http, &base_b, &token_b, "basic").await;
    assert_eq!(found["destinationConfiguration"]["Password"], "one");
    put(&http, &base_a, &token_a, &basic("two")).await;
    let found = find(&http, &base_b, &token_b, "basic").await;
    assert_eq!(found["destinationConfiguration"]["Password"], "two", "{found}");
    assert_eq!(found["authTokens"][0]["value"], "QUxJQ0U6dHdv", "Basic of ALICE:two: {found}");

    // OAuth2ClientCredentials against replica A's token service: B fetches and caches a token
    // with the right secret; once A stores a wrong one, B's next find must try that (and fail),
    // not serve the token it cached under the old secret; the right secret again gives a token.
    let oauth = |secret: &Value| {
        json!({"Name": "oauth", "Type": "HTTP", "URL": "http://erp.example", "ProxyType": "Internet",
               "Authentication": "OAuth2ClientCredentials",
               "tokenServiceURL": format!("{}/oauth/token", binding_a["url"].as_str().unwrap()),
               "clientId": binding_a["clientid"], "clientSecret": secret})
    };
    let right = binding_a["clientsecret"].clone();
    let r = http.post(format!("{base_a}/subaccountDestinations")).bearer_auth(&token_a).json(&oauth(&right)).send();
    assert_eq!(r.await.unwrap().status(), 201);
    let first = find(&http, &base_b, &token_b, "oauth").await;
    let cached = first["authTokens"][0]["value"].as_str().unwrap_or_default().to_owned();
    assert!(!cached.is_empty(), "no token: {first}");
    let again = find(&http, &base_b, &token_b, "oauth").await;
    assert_eq!(again["authTokens"][0]["value"], cached.as_str(), "B caches the token: {again}");

    put(&http, &base_a, &token_a, &oauth(&json!("not-the-secret"))).await;
    let stale = find(&http, &base_b, &token_b, "oauth").await;
    assert_eq!(stale["destinationConfiguration"]["clientSecret"], "not-the-secret", "{stale}");
    assert_eq!(stale["authTokens"][0]["value"], "", "B served a token for the old secret: {stale}");
    assert!(stale["authTokens"][0]["error"].as_str().unwrap_or_default().contains("401"), "{stale}");

    put(&http, &base_a, &token_a, &oauth(&right)).await;
    let fresh = find(&http, &base_b, &token_b, "oauth").await;
    assert!(fresh["authTokens"][0]["value"].as_str().is_some_and(|v| !v.is_empty()), "{fresh}");
}
