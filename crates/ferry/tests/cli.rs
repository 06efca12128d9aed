#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The admin CLI against a real `ferry up` (port 0, temp data folder): create a subaccount, a
//! destination instance and a key, get a token with the printed credentials, and call the
//! Destination Service with it.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use ferry_testkit::process::FerryProcess;
use serde_json::Value;

fn cli(data: &Path, url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .arg("--url")
        .arg(url)
        .arg("--data-dir")
        .arg(data)
        .env("FERRY_LOG", "warn")
        .env_remove("FERRY_ADMIN_CLIENT_ID")
        .env_remove("FERRY_ADMIN_CLIENT_SECRET")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli_json(data: &Path, url: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, out, err) = cli(data, url, &all);
    assert!(ok, "ferry {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ferry {args:?} printed no JSON ({e}): {out}"))
}

/// Starts `ferry up` on port 0; returns it and its VCAP_SERVICES once it is ready.
fn start(dir: &Path, data: &Path) -> (FerryProcess, Value) {
    let config = dir.join("ferry.toml");
    let args = [
        OsStr::new("up"),
        OsStr::new("--no-env-file"),
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("--data-dir"),
        data.as_os_str(),
    ];
    let p = FerryProcess::start(env!("CARGO_BIN_EXE_ferry"), &args, &[("FERRY_LOG", "warn")], false);
    let vcap = p.vcap.clone().expect("VCAP_SERVICES");
    (p, vcap)
}

async fn token(http: &reqwest::Client, url: &str, id: &str, secret: &str) -> Option<String> {
    let form = [("grant_type", "client_credentials"), ("client_id", id), ("client_secret", secret)];
    let r = http.post(format!("{url}/oauth/token")).form(&form).send().await.unwrap();
    if !r.status().is_success() {
        return None;
    }
    let v: Value = r.json().await.unwrap();
    v["access_token"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn cli_provisions_a_tenant_that_can_use_the_destination_service() {
    ferry_core::init_crypto();
    let dir = std::env::temp_dir().join(format!("ferry-cli-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = "[listen]\ntoken_port = 0\ntoken_https_port = 0\ndestination_port = 0\nhttp_proxy_port = 0\nsocks5_port = 0\ntunnel_port = 0\n";
    std::fs::write(dir.join("ferry.toml"), config).unwrap();
    let data = dir.join("data");
    let (child, vcap) = start(&dir, &data);
    let url = vcap["xsuaa"][0]["credentials"]["url"].as_str().unwrap().to_owned();

    // Without credentials: a clear error, not a crash.
    let (ok, _, err) = cli(&dir.join("nowhere"), &url, &["subaccount", "list"]);
    assert!(!ok);
    assert!(err.contains("admin credentials"), "{err}");
    // A binding's client is no admin: 403, named.
    let d = &vcap["destination"][0]["credentials"];
    let (ok, _, err) = cli(
        &data,
        &url,
        &[
            "subaccount",
            "list",
            "--client-id",
            d["clientid"].as_str().unwrap(),
            "--client-secret",
            d["clientsecret"].as_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(err.contains("403") && err.contains("ferry.admin"), "{err}");

    let sub = cli_json(&data, &url, &["subaccount", "create", "--subdomain", "cli-tenant"]);
    let sid = sub["id"].as_str().unwrap().to_owned();
    let (ok, table, _) = cli(&data, &url, &["subaccount", "list"]);
    assert!(ok && table.contains("cli-tenant") && table.contains("SUBDOMAIN"), "{table}");
    let inst = cli_json(
        &data,
        &url,
        &["service-instance", "create", "--subaccount", &sid, "--service", "destination", "--name", "dest"],
    );
    let iid = inst["id"].as_str().unwrap().to_owned();
    let (ok, out, err) =
        cli(&data, &url, &["service-key", "create", "--subaccount", &sid, "--instance", &iid, "--name", "k1"]);
    assert!(ok, "{err}");
    let creds: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(creds["tenantid"], sid.as_str());
    let keys = cli_json(&data, &url, &["service-key", "list", "--subaccount", &sid, "--instance", &iid]);
    assert!(!keys.to_string().contains(creds["clientsecret"].as_str().unwrap()));

    // The printed credentials work as an app would use them.
    let http = ferry_core::tls::http_client(None).unwrap();
    let (id, secret) = (creds["clientid"].as_str().unwrap(), creds["clientsecret"].as_str().unwrap());
    let token1 = token(&http, creds["url"].as_str().unwrap(), id, secret).await.expect("a token");
    let dests = |uri: String, t: String| {
        let http = http.clone();
        async move {
            let url = format!("{uri}/destination-configuration/v1/subaccountDestinations");
            http.get(url).bearer_auth(t).send().await.unwrap().status()
        }
    };
    assert_eq!(dests(creds["uri"].as_str().unwrap().to_owned(), token1.clone()).await, 200);

    // A second key, deleted again: it gets no tokens.
    let (ok, out, err) =
        cli(&data, &url, &["service-key", "create", "--subaccount", &sid, "--instance", &iid, "--name", "k2"]);
    assert!(ok, "{err}");
    let gone: Value = serde_json::from_str(&out).unwrap();
    let keys = cli_json(&data, &url, &["service-key", "list", "--subaccount", &sid, "--instance", &iid]);
    let gone_id = keys["items"].as_array().unwrap().iter().find(|k| k["name"] == "k2").unwrap()["id"].clone();
    let (ok, _, err) = cli(
        &data,
        &url,
        &["service-key", "delete", "--subaccount", &sid, "--instance", &iid, gone_id.as_str().unwrap()],
    );
    assert!(ok, "{err}");
    let (gid, gsecret) = (gone["clientid"].as_str().unwrap(), gone["clientsecret"].as_str().unwrap());
    assert!(token(&http, &url, gid, gsecret).await.is_none());

    // The subaccount of ferry up's admin client cannot be deleted.
    let default_sub = vcap["xsuaa"][0]["credentials"]["tenantid"].as_str().unwrap().to_owned();
    let (ok, _, err) = cli(&data, &url, &["subaccount", "delete", &default_sub]);
    assert!(!ok);
    assert!(err.contains("409"), "{err}");

    // An X.509 key: certificate and key instead of a secret.
    let (ok, out, err) = cli(
        &data,
        &url,
        &[
            "service-key",
            "create",
            "--subaccount",
            &sid,
            "--instance",
            &iid,
            "--name",
            "cert",
            "--credential-type",
            "x509",
        ],
    );
    assert!(ok, "{err}");
    let x509: Value = serde_json::from_str(&out).unwrap();
    assert!(x509.get("clientsecret").is_none());

    // A restart (new ports): the kept key still works, the deleted one still does not.
    drop(child);
    let (_child, vcap) = start(&dir, &data);
    let url = vcap["xsuaa"][0]["credentials"]["url"].as_str().unwrap().to_owned();
    let uri = vcap["destination"][0]["credentials"]["uri"].as_str().unwrap().to_owned();
    let token2 = token(&http, &url, id, secret).await.expect("the key survives a restart");
    assert_eq!(dests(uri.clone(), token2.clone()).await, 200);
    assert!(token(&http, &url, gid, gsecret).await.is_none());
    // The X.509 key authenticates by its certificate (mTLS at certurl), after the restart too.
    let ca_pem = std::fs::read_to_string(data.join("ca.pem")).unwrap();
    let identity = ferry_core::tls::CertifiedKey {
        cert_pem: x509["certificate"].as_str().unwrap().to_owned(),
        key_pem: x509["key"].as_str().unwrap().into(),
    };
    let tls = ferry_core::tls::client_config(&ca_pem, Some(&identity), &[]).unwrap();
    let mtls = reqwest::Client::builder().use_preconfigured_tls((*tls).clone()).build().unwrap();
    let certurl = format!("https://{}", vcap["xsuaa"][0]["credentials"]["uaadomain"].as_str().unwrap());
    let form = [("grant_type", "client_credentials"), ("client_id", x509["clientid"].as_str().unwrap())];
    let r = mtls.post(format!("{certurl}/oauth/token")).form(&form).send().await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    // The Destination Service does the same for a destination whose tokenService.KeyStoreLocation
    // names the key pair in its certificate store (SPEC §2.4), and the token it gets works.
    let api = format!("{uri}/destination-configuration/v1");
    let pem = format!("{}{}", identity.cert_pem, identity.key_pem.expose());
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &pem);
    let cert = serde_json::json!({"Name": "client.pem", "Type": "PEM", "Content": b64});
    let r = http.post(format!("{api}/subaccountCertificates")).bearer_auth(&token2).json(&cert).send().await.unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let dest = serde_json::json!({
        "Name": "mtls", "Type": "HTTP", "URL": "https://backend.example", "ProxyType": "Internet",
        "Authentication": "OAuth2ClientCredentials", "clientId": x509["clientid"],
        "tokenServiceURL": format!("{certurl}/oauth/token"), "tokenService.KeyStoreLocation": "client.pem",
    });
    let r = http.post(format!("{api}/subaccountDestinations")).bearer_auth(&token2).json(&dest).send().await.unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let found: Value =
        http.get(format!("{api}/destinations/mtls")).bearer_auth(&token2).send().await.unwrap().json().await.unwrap();
    let by_mtls = found["authTokens"][0]["value"].as_str().unwrap_or_else(|| panic!("{found}")).to_owned();
    assert_eq!(dests(uri.clone(), by_mtls).await, 200, "the mTLS client's token is accepted");
    // The same key pair as a P12 (openssl) and a JKS (keytool) keystore with a password.
    let stores = dir.join("stores");
    std::fs::create_dir_all(&stores).unwrap();
    std::fs::write(stores.join("client.pem"), &pem).unwrap();
    let tool = |program: &str, args: &[&str]| {
        let out = std::process::Command::new(program).args(args).current_dir(&stores).output().unwrap();
        assert!(out.status.success(), "{program}: {}", String::from_utf8_lossy(&out.stderr));
    };
    tool(
        "openssl",
        &[
            "pkcs12",
            "-export",
            "-in",
            "client.pem",
            "-name",
            "client",
            "-passout",
            "pass:store-pw",
            "-out",
            "client.p12",
        ],
    );
    tool(
        "keytool",
        &[
            "-importkeystore",
            "-noprompt",
            "-srckeystore",
            "client.p12",
            "-srcstoretype",
            "PKCS12",
            "-srcstorepass",
            "store-pw",
            "-destkeystore",
            "client.jks",
            "-deststoretype",
            "JKS",
            "-deststorepass",
            "store-pw",
        ],
    );
    for (file, kind) in [("client.p12", "P12"), ("client.jks", "JKS")] {
        let b64 = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            std::fs::read(stores.join(file)).unwrap(),
        );
        let cert = serde_json::json!({"Name": file, "Type": kind, "Content": b64});
        let r =
            http.post(format!("{api}/subaccountCertificates")).bearer_auth(&token2).json(&cert).send().await.unwrap();
        assert_eq!(r.status(), 201, "{:?}", r.text().await);
        let name = format!("mtls-{kind}");
        let mut dest = dest.clone();
        dest["Name"] = name.clone().into();
        dest["tokenService.KeyStoreLocation"] = file.into();
        dest["tokenService.KeyStorePassword"] = "store-pw".into();
        let r =
            http.post(format!("{api}/subaccountDestinations")).bearer_auth(&token2).json(&dest).send().await.unwrap();
        assert_eq!(r.status(), 201, "{:?}", r.text().await);
        let found: Value = http
            .get(format!("{api}/destinations/{name}"))
            .bearer_auth(&token2)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let by_store = found["authTokens"][0]["value"].as_str().unwrap_or_else(|| panic!("{kind}: {found}")).to_owned();
        assert_eq!(dests(uri.clone(), by_store).await, 200, "the {kind} keystore's token is accepted");
    }
    let (ok, table, _) = cli(&data, &url, &["service-instance", "list", "--subaccount", &sid]);
    assert!(ok && table.contains("destination") && table.contains("dest"), "{table}");

    // Deleting the subaccount locks its key out, and its tokens.
    let (ok, out, err) = cli(&data, &url, &["subaccount", "delete", &sid]);
    assert!(ok, "{err}");
    assert!(out.contains("deleted"));
    assert_eq!(dests(uri, token2).await, 401);
    assert!(token(&http, &url, id, secret).await.is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A data folder of an older `ferry up` (signing keys in `token-keys.json`): the default
/// subaccount adopts them, sealed in the directory, and the plain file goes.
#[tokio::test]
async fn ferry_up_adopts_legacy_signing_keys() {
    ferry_core::init_crypto();
    let dir = std::env::temp_dir().join(format!("ferry-legacy-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = "[listen]\ntoken_port = 0\ntoken_https_port = 0\ndestination_port = 0\nhttp_proxy_port = 0\nsocks5_port = 0\ntunnel_port = 0\n";
    std::fs::write(dir.join("ferry.toml"), config).unwrap();
    let keys = ferry_auth::KeySet::generate().unwrap();
    let stored: Vec<(String, String)> =
        keys.export_pkcs8().into_iter().map(|(kid, der)| (kid, hex::encode(der.expose()))).collect();
    std::fs::write(data.join("token-keys.json"), serde_json::to_string(&stored).unwrap()).unwrap();
    let kid = keys.current_kid().unwrap();

    let (_child, vcap) = start(&dir, &data);
    assert!(!data.join("token-keys.json").exists());
    let url = vcap["xsuaa"][0]["credentials"]["url"].as_str().unwrap();
    let http = ferry_core::tls::http_client(None).unwrap();
    let jwks: Value = http.get(format!("{url}/token_keys")).send().await.unwrap().json().await.unwrap();
    assert_eq!(jwks["keys"][0]["kid"], kid.as_str());
    let db = std::fs::read(data.join("directory.db")).unwrap();
    let der = hex::decode(&stored[0].1).unwrap();
    assert!(!String::from_utf8_lossy(&db).contains(&stored[0].1[200..264]), "no key in hex");
    assert!(!db.windows(32).any(|w| w == &der[200..232]), "no key in DER");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bad `TOKIO_WORKER_THREADS` stops every command with an error that names it (tokio itself
/// would panic on it); a good one is taken.
#[test]
fn worker_threads_from_the_environment_are_checked() {
    let run = |value: &str| {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["connector", "audit-verify", "/nonexistent-audit-log"])
            .env("TOKIO_WORKER_THREADS", value)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    for bad in ["abc", "0", "-1", ""] {
        let out = run(bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "TOKIO_WORKER_THREADS={bad:?} was taken");
        assert!(err.contains("TOKIO_WORKER_THREADS must be a whole number of at least 1"), "{bad:?}: {err}");
        assert!(!err.contains("panicked"), "{bad:?}: {err}");
    }
    // A good value runs the command, which then fails on its own account (no such log).
    let out = run("1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the audit log failed verification"), "{err}");
    assert!(!err.contains("TOKIO_WORKER_THREADS"), "{err}");
}

/// `ferry check-config`: each kind's file checked by the parser of the command that reads it,
/// without the files it names; a typo, a wrong value and the wrong kind are reported by name.
#[test]
fn check_config_reports_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let check = |kind: &str, text: &str| {
        let file = dir.path().join(format!("{kind}.toml"));
        std::fs::write(&file, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ferry")).args(["check-config", kind]).arg(&file).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let proxy = "certificate_file = \"/nonexistent/cert\"\nkey_file = \"/nonexistent/key\"\n\
                 connector_ca_file = \"/nonexistent/ca\"\ntoken_keys_urls = [\"http://ts:18081/token_keys\"]\n";
    let controller = "proxy_namespace = \"ferry\"\n[http]\ntarget_port = \"http\"\n[http.selector]\napp = \"tp\"\n\
                      [tcp]\n[tcp.selector]\napp = \"tp-tcp\"\n";
    let valid = [
        ("up", "[tokens]\naccess_token_validity_secs = 600\n"),
        ("proxy", proxy),
        ("connector", "proxies = [\"proxy:8042\"]\ncertificate_file = \"/nonexistent/cert\"\n"),
        ("transparent-proxy", "resources_dir = \"/nonexistent/resources\"\n"),
        ("k8s-controller", controller),
    ];
    for (kind, text) in valid {
        let (ok, out) = check(kind, text);
        assert!(ok && out.ends_with(": valid\n"), "{kind}: {out}");
    }
    let invalid = [
        ("up", "[tokens]\naccess_token_validity_secs = 0\n", "validities must be at least one second"),
        ("proxy", &format!("{proxy}max_conections = 5\n"), "unknown field `max_conections`"),
        ("connector", "proxies = []\n", "proxies must name at least one proxy tunnel endpoint"),
        ("connector", "proxies = [\"p:1\"]\nsystem_key_file = \"k\"\n", "go together"),
        ("transparent-proxy", "resources_dir = \"r\"\npoll_interval_ms = 0\n", "poll_interval_ms must be at least 1"),
        ("k8s-controller", &controller.replace("ferry", ""), "proxy_namespace: must name"),
        // A connector's file is not a proxy's.
        ("proxy", "proxies = [\"proxy:8042\"]\n", "unknown field `proxies`"),
    ];
    for (kind, text, want) in invalid {
        let (ok, out) = check(kind, text);
        assert!(!ok && out.contains(want), "{kind} {text:?}: want {want:?}, got {out}");
    }
}
