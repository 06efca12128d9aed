#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Secret scan of a full `ferry up` run: every secret the run configures or creates (client
//! secrets, user and admin passwords, destination passwords and client secrets, keystore
//! passwords, issued access and refresh tokens, private keys, service-key secrets) is searched
//! for in everything the run shows that is not meant to carry it: stdout and stderr with
//! `FERRY_LOG=debug`, the connector's audit log files, `/metrics` and `/healthz`, error bodies
//! (also of calls that put a secret where a token belongs), every list API, the connector admin
//! API's reads, and the Debug output of the parsed configuration (in `config.rs`'s unit tests).
//! Every private key in the data folder, the master key, the destination store's key and the
//! password in its PostgreSQL URL are among the secrets. The
//! `VCAP_SERVICES=` line is the one deliberate exception: it is the app's binding.

mod common;

use std::ffi::OsStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ferry_testkit::EchoBackend;
use ferry_testkit::process::FerryProcess;
use serde_json::{Value, json};

/// Every 24-character window of `secret` (or all of it if shorter): a secret leaked in part
/// (e.g. cut by a log formatter) is found too.
fn needles(secret: &str) -> Vec<String> {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() <= 24 {
        return vec![secret.to_owned()];
    }
    chars.windows(24).step_by(12).map(|w| w.iter().collect()).collect()
}

/// The base64 body lines of a PEM private key.
fn key_lines(pem: &str) -> Vec<String> {
    pem.lines().filter(|l| !l.starts_with("-----") && l.len() >= 24).map(str::to_owned).collect()
}

#[tokio::test]
async fn no_secret_shows_up_in_logs_metrics_errors_or_lists() {
    ferry_core::init_crypto();
    let echo = EchoBackend::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let secret = |name: &str| format!("Sx{name}-{}-q7Zt", uuid_like());
    let (dest_secret, conn_secret, app_secret) = (secret("destclient"), secret("connclient"), secret("appclient"));
    let (user_pw, dest_pw, oauth_secret) = (secret("userpw"), secret("destpw"), secret("oauthsecret"));
    let (ts_pw, ks_pw, admin_pw, frag_pw) = (secret("tspw"), secret("kspw"), secret("adminpw"), secret("fragpw"));
    let port = echo.addr.port();
    // The destinations live in PostgreSQL, reached with a password in the URL (the test server
    // trusts local connections, so any password works) and sealed with a key from a file.
    let db_pw = secret("dbpw");
    let db_url = ferry_testkit::postgres::Postgres::shared().database().replacen(
        "postgres://ferry@",
        &format!("postgres://ferry:{db_pw}@"),
        1,
    );
    assert!(db_url.contains(&db_pw), "{db_url}");
    let mut store_key = String::new();
    while store_key.len() < 64 {
        store_key.push_str(&uuid_like());
    }
    store_key.truncate(64);
    std::fs::write(dir.join("destinations.key"), &store_key).unwrap();
    let key_file = dir.join("destinations.key");
    let config = format!(
        r#"[listen]
token_port = 0
token_https_port = 0
destination_port = 0
http_proxy_port = 0
socks5_port = 0
tunnel_port = 0
metrics_port = 0
connector_admin_port = 0

[destination_store]
database = "{db_url}"
key_file = {key_file:?}

[bindings.destination]
client_secret = "{dest_secret}"
[bindings.connectivity]
client_secret = "{conn_secret}"
[bindings.xsuaa]
client_secret = "{app_secret}"

[[users]]
username = "alice"
password = "{user_pw}"

[[destinations]]
properties = {{ Name = "basic", Type = "HTTP", URL = "http://erp.virtual:8000/sap", ProxyType = "OnPremise", Authentication = "BasicAuthentication", User = "ALICE", Password = "{dest_pw}" }}
[[destinations]]
properties = {{ Name = "saml", Type = "HTTP", URL = "http://x.example", ProxyType = "Internet", Authentication = "OAuth2SAMLBearerAssertion", audience = "a", clientKey = "k", tokenServiceURL = "http://127.0.0.1:9/oauth/token", tokenServiceUser = "u", tokenServicePassword = "{ts_pw}", authnContextClassRef = "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession" }}

[[connectors]]
[[connectors.mappings]]
virtualHost = "erp.virtual"
virtualPort = 8000
localHost = "127.0.0.1"
localPort = {port}
protocol = "HTTP"
resources = [{{ path = "/sap", exactMatchOnly = false }}]
"#
    );
    std::fs::write(dir.join("ferry.toml"), &config).unwrap();
    let (cfg, data, env_file) = (dir.join("ferry.toml"), dir.join("data"), dir.join("default-env.json"));
    let args = [
        OsStr::new("up"),
        OsStr::new("--config"),
        cfg.as_os_str(),
        OsStr::new("--data-dir"),
        data.as_os_str(),
        OsStr::new("--env-file"),
        env_file.as_os_str(),
    ];
    let mut up = FerryProcess::start(env!("CARGO_BIN_EXE_ferry"), &args, &[("FERRY_LOG", "debug")], true);
    let vcap = up.vcap.clone().unwrap();
    let metrics_url = up
        .banner
        .iter()
        .find_map(|l| l.split_whitespace().find(|w| w.ends_with("/metrics")).map(str::to_owned))
        .expect("metrics URL in the banner");
    let admin_url = up
        .banner
        .iter()
        .find(|l| l.contains("connector admin API"))
        .map(|l| l.split_whitespace().nth(3).unwrap().trim_end_matches("/api/v1/configuration").to_owned())
        .expect("connector admin API in the banner");

    let http = ferry_core::tls::http_client(None).unwrap();
    let xsuaa = vcap["xsuaa"][0]["credentials"].clone();
    let dest = vcap["destination"][0]["credentials"].clone();
    let conn = vcap["connectivity"][0]["credentials"].clone();
    let token_url = xsuaa["url"].as_str().unwrap().to_owned();
    let api = format!("{}/destination-configuration/v1", dest["uri"].as_str().unwrap());
    // What the scan reads besides the process output.
    let mut shown: Vec<(String, String)> = Vec::new();
    let mut secrets: Vec<(String, String)> = vec![
        ("destination client secret".into(), dest_secret.clone()),
        ("connectivity client secret".into(), conn_secret.clone()),
        ("xsuaa client secret".into(), app_secret.clone()),
        ("user password".into(), user_pw.clone()),
        ("destination password".into(), dest_pw.clone()),
        ("basic header of the destination".into(), STANDARD.encode(format!("ALICE:{dest_pw}"))),
        ("tokenServicePassword".into(), ts_pw.clone()),
        ("OAuth clientSecret".into(), oauth_secret.clone()),
        ("KeyStorePassword".into(), ks_pw.clone()),
        ("fragment password".into(), frag_pw.clone()),
        ("connector admin password".into(), admin_pw.clone()),
        ("database password".into(), db_pw.clone()),
        ("destination store key".into(), store_key.clone()),
    ];

    // --- Token service: every grant, and its errors.
    let tok = |form: Vec<(&'static str, String)>| {
        let (http, token_url) = (http.clone(), token_url.clone());
        async move {
            let r = http.post(format!("{token_url}/oauth/token")).form(&form).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or_default())
        }
    };
    let cid = |c: &Value| c["clientid"].as_str().unwrap().to_owned();
    let cs = |c: &Value| c["clientsecret"].as_str().unwrap().to_owned();
    let (_, cc) =
        tok(vec![("grant_type", "client_credentials".into()), ("client_id", cid(&dest)), ("client_secret", cs(&dest))])
            .await;
    let dest_token = cc["access_token"].as_str().unwrap().to_owned();
    let (_, pw) = tok(vec![
        ("grant_type", "password".into()),
        ("username", "alice".into()),
        ("password", user_pw.clone()),
        ("client_id", cid(&xsuaa)),
        ("client_secret", cs(&xsuaa)),
    ])
    .await;
    let user_token = pw["access_token"].as_str().unwrap().to_owned();
    let refresh = pw["refresh_token"].as_str().unwrap().to_owned();
    let (_, refreshed) = tok(vec![
        ("grant_type", "refresh_token".into()),
        ("refresh_token", refresh.clone()),
        ("client_id", cid(&xsuaa)),
        ("client_secret", cs(&xsuaa)),
    ])
    .await;
    let (_, exchanged) = tok(vec![
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer".into()),
        ("assertion", user_token.clone()),
        ("client_id", cid(&dest)),
        ("client_secret", cs(&dest)),
    ])
    .await;
    let (_, conn_tok) =
        tok(vec![("grant_type", "client_credentials".into()), ("client_id", cid(&conn)), ("client_secret", cs(&conn))])
            .await;
    let conn_token = conn_tok["access_token"].as_str().unwrap().to_owned();
    for (name, v) in [
        ("dest token", &cc["access_token"]),
        ("user token", &pw["access_token"]),
        ("refresh token", &pw["refresh_token"]),
        ("refreshed token", &refreshed["access_token"]),
        ("exchanged token", &exchanged["access_token"]),
        ("connectivity token", &conn_tok["access_token"]),
    ] {
        let t = v.as_str().unwrap_or_else(|| panic!("{name} missing"));
        // The signature part is what makes a token usable; the header repeats across tokens.
        secrets.push((name.into(), t.rsplit('.').next().unwrap().to_owned()));
    }
    for (what, form) in [
        (
            "wrong client secret",
            vec![
                ("grant_type", "client_credentials".to_owned()),
                ("client_id", cid(&dest)),
                ("client_secret", format!("{}x", cs(&dest))),
            ],
        ),
        (
            "wrong user password",
            vec![
                ("grant_type", "password".into()),
                ("username", "alice".into()),
                ("password", format!("{user_pw}x")),
                ("client_id", cid(&xsuaa)),
                ("client_secret", cs(&xsuaa)),
            ],
        ),
        (
            "secret as the client id",
            vec![("grant_type", "client_credentials".into()), ("client_id", cs(&xsuaa)), ("client_secret", "x".into())],
        ),
        (
            "refresh token of another client",
            vec![
                ("grant_type", "refresh_token".into()),
                ("refresh_token", refresh.clone()),
                ("client_id", cid(&dest)),
                ("client_secret", cs(&dest)),
            ],
        ),
    ] {
        let (status, body) = tok(form).await;
        assert!(status >= 400, "{what}: {status}");
        shown.push((format!("token error: {what}"), body.to_string()));
    }

    // --- Destination Service: objects with secrets, lists, finds, errors.
    let post = |path: &str, body: Value| {
        let (http, url, t) = (http.clone(), format!("{api}/{path}"), dest_token.clone());
        async move {
            let r = http.post(url).bearer_auth(t).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let oauth = json!({"Name": "oauth", "Type": "HTTP", "URL": format!("http://127.0.0.1:{port}/o"),
        "ProxyType": "Internet", "Authentication": "OAuth2ClientCredentials",
        "tokenServiceURL": format!("{token_url}/oauth/token"), "clientId": cid(&xsuaa), "clientSecret": cs(&xsuaa)});
    let oauth_bad = json!({"Name": "oauth-bad", "Type": "HTTP", "URL": "http://127.0.0.1:9/o", "ProxyType": "Internet",
        "Authentication": "OAuth2ClientCredentials", "tokenServiceURL": format!("{token_url}/oauth/token"),
        "clientId": "nobody", "clientSecret": oauth_secret});
    let ca = ferry_core::tls::LocalCa::generate("scan CA").unwrap();
    let leaf = ca.issue_server_cert(&["scan.example"]).unwrap();
    let key_pem = leaf.key_pem.expose().to_owned();
    for l in key_lines(&key_pem) {
        secrets.push(("uploaded private key".into(), l));
    }
    let cert = json!({"Name": "client.pem", "Type": "PEM",
        "Content": STANDARD.encode(format!("{}{}", leaf.cert_pem, key_pem))});
    let mtls = json!({"Name": "mtls", "Type": "HTTP", "URL": "https://127.0.0.1:9", "ProxyType": "Internet",
        "Authentication": "ClientCertificateAuthentication", "KeyStoreLocation": "client.pem", "KeyStorePassword": ks_pw});
    let fragment = json!({"FragmentName": "f", "User": "frag", "Password": frag_pw});
    for (path, body) in [
        ("subaccountDestinations", oauth),
        ("subaccountDestinations", oauth_bad),
        ("subaccountCertificates", cert),
        ("subaccountDestinations", mtls),
        ("subaccountDestinationFragments", fragment),
    ] {
        let (s, text) = post(path, body).await;
        assert_eq!(s, 201, "{path}: {text}");
    }
    for (what, path, body) in [
        (
            "invalid destination with a password",
            "subaccountDestinations",
            json!({"Name": "bad name!", "Type": "HTTP", "URL": "x", "Authentication": "BasicAuthentication", "User": "u", "Password": dest_pw}),
        ),
        (
            "duplicate with a password",
            "subaccountDestinations",
            json!({"Name": "basic", "Type": "HTTP", "URL": "http://x", "ProxyType": "Internet", "Authentication": "BasicAuthentication", "User": "u", "Password": dest_pw}),
        ),
        (
            "invalid fragment with a password",
            "subaccountDestinationFragments",
            json!({"FragmentName": "", "Password": frag_pw}),
        ),
    ] {
        let (s, text) = post(path, body).await;
        assert!(s >= 400, "{what}: {s}");
        shown.push((format!("destination error: {what}"), text));
    }
    // Finds run the token flows (their answers carry credentials by design and are not scanned).
    for name in ["basic", "oauth", "oauth-bad", "mtls", "saml"] {
        let r = http.get(format!("{api}/destinations/{name}")).bearer_auth(&dest_token).send().await.unwrap();
        assert!(r.status().is_success(), "find {name}: {}", r.status());
        let _ = r.text().await;
    }
    let r = http
        .get(format!("{api}/destinations/basic"))
        .bearer_auth(&dest_token)
        .header("X-fragment-name", "f")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    for path in [
        "subaccountDestinations",
        "instanceDestinations",
        "subaccountCertificates",
        "subaccountDestinationFragments",
        "subaccountDestinations?$select=Name,Password",
        "destinations/nope",
        "subaccountDestinations/nope",
    ] {
        let r = http.get(format!("{api}/{path}")).bearer_auth(&dest_token).send().await.unwrap();
        shown.push((format!("destination GET {path}"), r.text().await.unwrap()));
    }

    // --- Through the proxy and connector with the Basic destination's header.
    let basic = STANDARD.encode(format!("ALICE:{dest_pw}"));
    let proxied = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(format!("http://127.0.0.1:{}", conn["onpremise_proxy_http_port"].as_str().unwrap()))
                .unwrap()
                .custom_http_auth(format!("Bearer {conn_token}").parse().unwrap()),
        )
        .build()
        .unwrap();
    for path in ["/sap/ok", "/denied"] {
        let r = proxied
            .get(format!("http://erp.virtual:8000{path}"))
            .header("authorization", format!("Basic {basic}"))
            .header("sap-connectivity-authentication", format!("Bearer {user_token}"))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        if path == "/denied" {
            assert_eq!(status, 403);
            shown.push(("proxy error".into(), body));
        }
    }

    // --- Directory admin API: a service key (its secret shown once, never listed).
    let state: Value = serde_json::from_str(&std::fs::read_to_string(data.join("state.json")).unwrap()).unwrap();
    let admin_secret = state["admin_client_secret"].as_str().unwrap().to_owned();
    secrets.push(("admin client secret".into(), admin_secret.clone()));
    let (_, at) = tok(vec![
        ("grant_type", "client_credentials".into()),
        ("client_id", state["admin_client_id"].as_str().unwrap().to_owned()),
        ("client_secret", admin_secret),
    ])
    .await;
    let admin_token = at["access_token"].as_str().unwrap().to_owned();
    secrets.push(("admin token".into(), admin_token.rsplit('.').next().unwrap().to_owned()));
    let adm = format!("{token_url}/ferry/admin/v1");
    let sub = xsuaa["tenantid"].as_str().unwrap();
    let inst: Value = http
        .post(format!("{adm}/subaccounts/{sub}/service-instances"))
        .bearer_auth(&admin_token)
        .json(&json!({"service": "destination", "name": "scan"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let iid = inst["id"].as_str().unwrap();
    let key: Value = http
        .post(format!("{adm}/subaccounts/{sub}/service-instances/{iid}/service-keys"))
        .bearer_auth(&admin_token)
        .json(&json!({"name": "k"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    secrets.push(("service key secret".into(), key["clientsecret"].as_str().unwrap().to_owned()));
    for path in [
        "/subaccounts".to_owned(),
        format!("/subaccounts/{sub}"),
        format!("/subaccounts/{sub}/service-instances"),
        format!("/subaccounts/{sub}/service-instances/{iid}/service-keys"),
        format!("/subaccounts/{sub}/service-instances/{iid}/service-keys/{}", key["id"].as_str().unwrap_or("x")),
    ] {
        let r = http.get(format!("{adm}{path}")).bearer_auth(&admin_token).send().await.unwrap();
        shown.push((format!("admin GET {path}"), r.text().await.unwrap()));
    }

    // --- Connector admin API: the password change, reads, a wrong logon.
    let ui_ca = std::fs::read_to_string(data.join("connector").join("ui-ca.pem")).unwrap();
    let https = ferry_core::tls::http_client(Some(&ui_ca)).unwrap();
    let r = https
        .put(format!("{admin_url}/api/v1/configuration/connector/authentication/basic"))
        .basic_auth("Administrator", Some("manage"))
        .json(&json!({"oldPassword": "manage", "newPassword": admin_pw}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = https
        .get(format!("{admin_url}/api/monitoring/subaccounts"))
        .basic_auth("Administrator", Some(format!("{admin_pw}x")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    shown.push(("connector admin wrong logon".into(), r.text().await.unwrap()));
    let mon: Value = https
        .get(format!("{admin_url}/api/monitoring/subaccounts"))
        .basic_auth("Administrator", Some(admin_pw.clone()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    shown.push(("connector monitoring".into(), mon.to_string()));
    let s = &mon["subaccounts"][0];
    let base = format!(
        "{admin_url}/api/v1/configuration/subaccounts/{}/{}",
        s["regionHost"].as_str().unwrap(),
        s["subaccount"].as_str().unwrap()
    );
    for url in [
        format!("{admin_url}/api/v1/configuration/subaccounts"),
        base.clone(),
        format!("{base}/systemMappings"),
        format!("{admin_url}/api/v1/configuration/connector"),
    ] {
        let r = https.get(&url).basic_auth("Administrator", Some(admin_pw.clone())).send().await.unwrap();
        shown.push((format!("connector GET {url}"), r.text().await.unwrap()));
    }

    // --- Error bodies of calls that carry a secret where a token belongs: an error must not
    // quote what it refused.
    let bogus = format!("Bearer {dest_pw}");
    let r = http.get(format!("{api}/subaccountDestinations")).header("authorization", &bogus).send().await.unwrap();
    assert_eq!(r.status(), 401);
    shown.push(("destination error: a secret as the bearer token".into(), r.text().await.unwrap()));
    let r = http.get(format!("{adm}/subaccounts")).header("authorization", &bogus).send().await.unwrap();
    assert_eq!(r.status(), 401);
    shown.push(("admin error: a secret as the bearer token".into(), r.text().await.unwrap()));
    let bogus_proxy = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(format!("http://127.0.0.1:{}", conn["onpremise_proxy_http_port"].as_str().unwrap()))
                .unwrap()
                .custom_http_auth(bogus.parse().unwrap()),
        )
        .build()
        .unwrap();
    let r = bogus_proxy.get("http://erp.virtual:8000/sap/ok").send().await.unwrap();
    assert_eq!(r.status(), 407);
    shown.push(("proxy error: a secret as the proxy token".into(), r.text().await.unwrap()));
    let r = http
        .post(format!("{adm}/subaccounts/{sub}/connectors/csr"))
        .basic_auth("alice", Some(format!("{user_pw}x")))
        .json(&json!({"csr": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    shown.push(("onboarding error: a wrong password".into(), r.text().await.unwrap()));

    // --- Metrics and health, then the process output and the audit log after a clean stop.
    shown.push(("metrics".into(), http.get(&metrics_url).send().await.unwrap().text().await.unwrap()));
    let health_url = metrics_url.replace("/metrics", "/healthz");
    shown.push(("healthz".into(), http.get(&health_url).send().await.unwrap().text().await.unwrap()));
    // Every private key Ferry keeps (CAs, the connector's tunnel and UI keys, ...) and the
    // master key that seals the stores.
    for path in files_under(&data) {
        let name = path.strip_prefix(&data).unwrap().display().to_string();
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        if text.contains("PRIVATE KEY-----") {
            for l in key_lines(&text) {
                secrets.push((name.clone(), l));
            }
        }
    }
    assert!(secrets.iter().any(|(n, _)| n == "ca-key.pem"), "the CA key is part of the scan");
    assert!(secrets.iter().any(|(n, _)| n.starts_with("connector")), "the connector's keys are part of the scan");
    let master = std::fs::read_to_string(data.join("master.key")).unwrap();
    secrets.push(("master key".into(), master.trim().to_owned()));
    up.terminate();
    let mut audit_files = 0;
    for path in files_under(&data.join("audit")) {
        audit_files += 1;
        shown.push((format!("audit log {}", path.display()), std::fs::read_to_string(&path).unwrap()));
    }
    assert!(audit_files > 0, "the run wrote an audit log");
    let (stdout, stderr) = up.kill_and_collect();
    assert!(stderr.contains("DEBUG"), "the run logs at debug level");
    let stdout: String =
        stdout.lines().filter(|l| !l.starts_with("VCAP_SERVICES=")).map(|l| format!("{l}\n")).collect();
    shown.push(("stdout".into(), stdout));
    shown.push(("stderr (debug log)".into(), stderr));

    let mut found = Vec::new();
    for (what, value) in &secrets {
        for needle in needles(value) {
            for (place, text) in &shown {
                if text.contains(&needle) {
                    found.push(format!("{what} in {place}"));
                }
            }
        }
    }
    found.sort();
    found.dedup();
    assert!(found.is_empty(), "secrets shown:\n{}", found.join("\n"));
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() { todo.push(p) } else { out.push(p) }
        }
    }
    out
}

/// A fresh random-looking string, so every run's secrets are its own.
fn uuid_like() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{:x}{:x}", t, std::process::id())
}
