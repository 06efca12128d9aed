#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Two `ferry up` replicas on one PostgreSQL database (`[destination_store]`): what one stores,
//! the other serves at once, sealed under a key one reads from a file and the other from an
//! environment variable.

use std::ffi::OsStr;
use std::path::Path;

use ferry_testkit::postgres::Postgres;
use ferry_testkit::process::FerryProcess;
use serde_json::{Value, json};

const KEY_HEX: &str = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e";

fn start(dir: &Path, name: &str, store: &str, destinations: &str, env: &[(&str, &str)]) -> FerryProcess {
    let config = format!(
        r#"
[subaccount]
id = "zone-replicated"

[listen]
token_port = 0
token_https_port = 0
destination_port = 0
http_proxy_port = 0
socks5_port = 0
tunnel_port = 0

[destination_store]
{store}

{destinations}
"#
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
    let mut all_env = vec![("FERRY_LOG", "warn")];
    all_env.extend_from_slice(env);
    FerryProcess::start(env!("CARGO_BIN_EXE_ferry"), &args, &all_env, false)
}

/// A destination-binding client of one replica: its API base URL and a token for it.
async fn client(http: &reqwest::Client, p: &FerryProcess) -> (String, String) {
    let c = &p.vcap.as_ref().expect("VCAP_SERVICES line")["destination"][0]["credentials"];
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
    (base, r["access_token"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn replicas_share_destinations_through_postgres() {
    ferry_core::init_crypto();
    let pg = Postgres::shared();
    let url = pg.database();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("destinations.key");
    std::fs::write(&key_file, KEY_HEX).unwrap();

    let a = start(
        dir.path(),
        "a",
        &format!("database = {url:?}\nkey_file = {key_file:?}"),
        r#"[[destinations]]
properties = { Name = "erp", Type = "HTTP", URL = "http://erp.example", Authentication = "BasicAuthentication", User = "ALICE", Password = "pw-in-postgres" }"#,
        &[],
    );
    let b = start(
        dir.path(),
        "b",
        "database_env = \"FERRY_TEST_DESTINATION_DB\"\nkey_env = \"FERRY_TEST_DESTINATION_KEY\"",
        "",
        &[("FERRY_TEST_DESTINATION_DB", &url), ("FERRY_TEST_DESTINATION_KEY", KEY_HEX)],
    );

    let http = ferry_core::tls::http_client(None).unwrap();
    let (base_a, token_a) = client(&http, &a).await;
    let (base_b, token_b) = client(&http, &b).await;

    // A loaded `erp` from its config file; B serves it, password and all.
    let r = http.get(format!("{base_b}/destinations/erp")).bearer_auth(&token_b).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let found: Value = r.json().await.unwrap();
    assert_eq!(found["destinationConfiguration"]["Password"], "pw-in-postgres", "{found}");

    // B creates one; A sees it on the next request.
    let r = http
        .post(format!("{base_b}/subaccountDestinations"))
        .bearer_auth(&token_b)
        .json(&json!({"Name": "from-b", "Type": "HTTP", "URL": "http://b.example"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http.get(format!("{base_a}/subaccountDestinations/from-b")).bearer_auth(&token_a).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let dest: Value = r.json().await.unwrap();
    assert_eq!(dest["URL"], "http://b.example");

    // Nothing of it is on disk: both data folders hold no destination database.
    for replica in ["a", "b"] {
        assert!(!dir.path().join(replica).join("destinations.db").exists(), "{replica} wrote a SQLite file");
    }
}
