#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `ferry up` as a user runs it: the real binary, a config file, the printed VCAP_SERVICES, a
//! request the way the SAP Cloud SDK makes it (token → destination → connectivity proxy), and a
//! clean exit on SIGTERM.

use std::ffi::OsStr;

use ferry_testkit::EchoBackend;
use ferry_testkit::process::FerryProcess;
use serde_json::Value;

#[tokio::test]
async fn ferry_up_serves_an_app_end_to_end() {
    ferry_core::init_crypto();
    let echo = EchoBackend::start().await;
    let dir = std::env::temp_dir().join(format!("ferry-up-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        r#"
[tokens]
access_token_validity_secs = 900

[listen]
token_port = 0
token_https_port = 0
destination_port = 0
http_proxy_port = 0
socks5_port = 0
tunnel_port = 0
metrics_port = 0

[[destinations]]
properties = {{ Name = "erp", Type = "HTTP", URL = "http://erp.virtual:8000/sap", ProxyType = "OnPremise", Authentication = "BasicAuthentication", User = "ALICE", Password = "s3cret" }}

[[users]]
username = "alice"
password = "alice-password"

[[connectors]]
[[connectors.mappings]]
virtualHost = "erp.virtual"
virtualPort = 8000
localHost = "127.0.0.1"
localPort = {}
protocol = "HTTP"
authenticationMode = "X509_GENERAL"
resources = [{{ path = "/sap", exactMatchOnly = false }}]
"#,
        echo.addr.port()
    );
    std::fs::write(dir.join("ferry.toml"), config).unwrap();
    let (config, data, env_file) = (dir.join("ferry.toml"), dir.join("data"), dir.join("default-env.json"));
    let args = [
        OsStr::new("up"),
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("--data-dir"),
        data.as_os_str(),
        OsStr::new("--env-file"),
        env_file.as_os_str(),
    ];
    let mut child = FerryProcess::start(env!("CARGO_BIN_EXE_ferry"), &args, &[("FERRY_LOG", "warn")], false);
    let vcap = child.vcap.clone().expect("VCAP_SERVICES line");
    let banner = child.banner.clone();
    let file: Value = serde_json::from_slice(&std::fs::read(dir.join("default-env.json")).unwrap()).unwrap();
    assert_eq!(file["VCAP_SERVICES"], vcap, "default-env.json holds the printed VCAP_SERVICES");
    for (label, tag) in [("destination", "destination"), ("connectivity", "connectivity"), ("xsuaa", "xsuaa")] {
        let b = &vcap[label][0];
        assert_eq!(b["label"], label);
        assert!(b["tags"].as_array().unwrap().iter().any(|t| t == tag), "{label} tags");
    }
    let dest = &vcap["destination"][0]["credentials"];
    let conn = &vcap["connectivity"][0]["credentials"];
    assert!(conn["onpremise_proxy_port"].is_string() && conn["onpremise_socks5_proxy_port"].is_string());

    let http = ferry_core::tls::http_client(None).unwrap();
    let token = |c: &Value| {
        let http = http.clone();
        let url = format!("{}/oauth/token", c["url"].as_str().unwrap());
        let form = [
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", c["clientid"].as_str().unwrap().to_owned()),
            ("client_secret", c["clientsecret"].as_str().unwrap().to_owned()),
        ];
        async move {
            let r: Value = http.post(url).form(&form).send().await.unwrap().json().await.unwrap();
            r["access_token"].as_str().unwrap().to_owned()
        }
    };
    let dest_token = token(dest).await;
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            dest_token.split('.').nth(1).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 900, "[tokens] lifetime applies");
    let found: Value = http
        .get(format!("{}/destination-configuration/v1/destinations/erp", dest["uri"].as_str().unwrap()))
        .bearer_auth(&dest_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["destinationConfiguration"]["URL"], "http://erp.virtual:8000/sap");
    let auth = found["authTokens"][0]["http_header"]["value"].as_str().unwrap().to_owned();

    let conn_token = token(conn).await;
    let proxy_url = format!(
        "http://{}:{}",
        conn["onpremise_proxy_host"].as_str().unwrap(),
        conn["onpremise_proxy_http_port"].as_str().unwrap()
    );
    let via_proxy = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(proxy_url).unwrap().custom_http_auth(format!("Bearer {conn_token}").parse().unwrap()),
        )
        .build()
        .unwrap();
    let r =
        via_proxy.get("http://erp.virtual:8000/sap/items?top=1").header("authorization", &auth).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["url"], "/sap/items?top=1");
    assert_eq!(e["headers"]["authorization"], "Basic QUxJQ0U6czNjcmV0");
    assert_eq!(echo.hits(), 1);
    assert_eq!(e["headers"]["ssl_client_cert"], "", "no user: empty SSL_CLIENT_CERT");

    // Principal propagation: a user token from the password grant becomes a user certificate.
    let xsuaa = &vcap["xsuaa"][0]["credentials"];
    let form = [
        ("grant_type", "password".to_owned()),
        ("client_id", xsuaa["clientid"].as_str().unwrap().to_owned()),
        ("client_secret", xsuaa["clientsecret"].as_str().unwrap().to_owned()),
        ("username", "alice".to_owned()),
        ("password", "alice-password".to_owned()),
    ];
    let user: Value = http
        .post(format!("{}/oauth/token", xsuaa["url"].as_str().unwrap()))
        .form(&form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let user_jwt = user["access_token"].as_str().expect("user token").to_owned();
    let r = via_proxy
        .get("http://erp.virtual:8000/sap/me")
        .header("sap-connectivity-authentication", format!("Bearer {user_jwt}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let e: Value = r.json().await.unwrap();
    let cert = e["headers"]["ssl_client_cert"].as_str().unwrap();
    assert!(cert.len() > 100, "a user certificate reached the backend: {cert:?}");
    assert!(e["headers"].get("sap-connectivity-authentication").is_none());

    // Operations: Prometheus metrics count what just happened; /healthz sees the connector.
    let metrics_url = lines_metrics(&banner);
    let text = http.get(format!("{metrics_url}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("ferry_proxy_requests_total{protocol=\"http\",code=\"200\"} 2"), "{text}");
    assert!(text.contains("ferry_connector_requests_total{protocol=\"HTTP\",decision=\"allowed\"} 2"), "{text}");
    assert!(text.contains("ferry_tunnels_connected 1"), "{text}");
    assert!(text.contains("ferry_connector_backend_seconds_count"), "{text}");
    let health = http.get(format!("{metrics_url}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // OAuth2SAMLBearerAssertion against Ferry's own token service, which trusts the Destination
    // Service's subaccount key: the user's SAML-bearer token then carries principal propagation
    // through the proxy and connector (which verify it) to the backend.
    let dest_uri = dest["uri"].as_str().unwrap();
    let token_url = format!("{}/oauth/token", xsuaa["url"].as_str().unwrap());
    let saml = serde_json::json!({
        "Name": "erp-saml", "Type": "HTTP", "URL": "http://erp.virtual:8000/sap", "ProxyType": "Internet",
        "Authentication": "OAuth2SAMLBearerAssertion", "tokenServiceURL": token_url, "audience": token_url,
        "clientKey": xsuaa["clientid"], "tokenServiceUser": xsuaa["clientid"],
        "tokenServicePassword": xsuaa["clientsecret"],
        "authnContextClassRef": "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession"
    });
    let r = http
        .post(format!("{dest_uri}/destination-configuration/v1/subaccountDestinations"))
        .bearer_auth(&dest_token)
        .json(&saml)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let found: Value = http
        .get(format!("{dest_uri}/destination-configuration/v1/destinations/erp-saml"))
        .bearer_auth(&dest_token)
        .header("x-user-token", &user_jwt)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let saml_token = &found["authTokens"][0];
    assert!(saml_token.get("error").is_none(), "{found}");
    assert_eq!(saml_token["type"], "Bearer");
    let saml_jwt = saml_token["value"].as_str().unwrap();
    let r = via_proxy
        .get("http://erp.virtual:8000/sap/me")
        .header("sap-connectivity-authentication", format!("Bearer {saml_jwt}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let e: Value = r.json().await.unwrap();
    assert!(e["headers"]["ssl_client_cert"].as_str().unwrap().len() > 100, "the SAML-bearer user reached the backend");

    // SIGTERM: a clean, prompt exit.
    let status = child.terminate();
    assert!(status.success(), "ferry up exited with {status}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The metrics base URL from `ferry up`'s banner line `  metrics   http://127.0.0.1:PORT/metrics ...`.
fn lines_metrics(banner: &[String]) -> String {
    let line = banner.iter().find(|l| l.trim_start().starts_with("metrics")).expect("metrics line in the banner");
    let url = line.split_whitespace().nth(1).expect("metrics URL");
    url.trim_end_matches("/metrics").to_owned()
}

/// `[listen] connector_admin_port`: SAP's admin REST API for the first connector, which keeps
/// its configuration and password in the data folder across restarts (where the tunnel port,
/// here 0, changes).
#[tokio::test]
async fn ferry_up_serves_the_connector_admin_api_and_keeps_its_configuration() {
    ferry_core::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let config = "[listen]\ntoken_port = 0\ntoken_https_port = 0\ndestination_port = 0\nhttp_proxy_port = 0\n\
                  socks5_port = 0\ntunnel_port = 0\nconnector_admin_port = 0\n\n[[connectors]]\nlocation_id = \"lab\"\n\
                  [[connectors.mappings]]\nvirtualHost = \"erp.virtual\"\nvirtualPort = 8000\nlocalHost = \"127.0.0.1\"\n\
                  localPort = 9\nprotocol = \"HTTP\"\n";
    std::fs::write(dir.path().join("ferry.toml"), config).unwrap();
    let (config, data) = (dir.path().join("ferry.toml"), dir.path().join("data"));
    let args = [
        OsStr::new("up"),
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("--data-dir"),
        data.as_os_str(),
        OsStr::new("--no-env-file"),
    ];
    let start = || {
        let child = FerryProcess::start(env!("CARGO_BIN_EXE_ferry"), &args, &[("FERRY_LOG", "warn")], false);
        let line = child.banner.iter().find(|l| l.contains("connector admin API")).expect("admin API in the banner");
        let url = line.split_whitespace().nth(3).unwrap().trim_end_matches("/api/v1/configuration").to_owned();
        let ca = std::fs::read_to_string(data.join("connector").join("ui-ca.pem")).unwrap();
        (child, url, ferry_core::tls::http_client(Some(&ca)).unwrap())
    };
    let (mut child, url, http) = start();
    let get = |http: &reqwest::Client, url: &str, pw: &str| {
        http.get(format!("{url}/api/monitoring/subaccounts")).basic_auth("Administrator", Some(pw.to_owned())).send()
    };
    assert_eq!(get(&http, &url, "manage").await.unwrap().status(), 403);
    let r = http
        .put(format!("{url}/api/v1/configuration/connector/authentication/basic"))
        .basic_auth("Administrator", Some("manage"))
        .json(&serde_json::json!({"oldPassword": "manage", "newPassword": "a new password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let mon: Value = get(&http, &url, "a new password").await.unwrap().json().await.unwrap();
    assert_eq!(mon["subaccounts"].as_array().unwrap().len(), 1, "{mon}");
    assert_eq!(mon["subaccounts"][0]["locationID"], "lab");
    assert_eq!(child.terminate().code(), Some(0));

    let (mut child, url, http) = start();
    assert_eq!(get(&http, &url, "manage").await.unwrap().status(), 401, "the changed password persists");
    let mon: Value = get(&http, &url, "a new password").await.unwrap().json().await.unwrap();
    let subs = mon["subaccounts"].as_array().unwrap();
    assert_eq!(subs.len(), 1, "the restarted tunnel endpoint replaces the stored one: {mon}");
    ferry_testkit::eventually!("the tunnel is up again", {
        let mon: Value = get(&http, &url, "a new password").await.unwrap().json().await.unwrap();
        mon["subaccounts"][0]["tunnel"]["state"] == "Connected"
    });
    let maps: Value = http
        .get(format!(
            "{url}/api/v1/configuration/subaccounts/{}/{}/systemMappings",
            subs[0]["regionHost"].as_str().unwrap(),
            subs[0]["subaccount"].as_str().unwrap()
        ))
        .basic_auth("Administrator", Some("a new password"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(maps[0]["virtualHost"], "erp.virtual", "the config file's mappings seed the data folder: {maps}");
    assert_eq!(child.terminate().code(), Some(0));
}
