#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The Transparent Proxy in file-watching mode against a running `ferry up`: Destination
//! resources appear, change and disappear as YAML files; requests to their endpoints reach real
//! backends with the destination's credentials (Internet directly, OnPremise through the proxy
//! and connector, TCP through SOCKS5); each applicable error row of SPEC §5.3 is checked.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use base64::Engine;
use ferry_core::Shutdown;
use ferry_testkit::{EchoBackend, eventually};
use ferry_transparent_proxy::{Config, Endpoints};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// An in-process Transparent Proxy over `res_dir`.
struct Tp {
    rx: watch::Receiver<Endpoints>,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), ferry_transparent_proxy::TpError>>,
}

impl Tp {
    async fn start(dir: &Path, name: &str, res_dir: &Path, env_file: &Path, extra: &str) -> Tp {
        let toml = format!(
            "resources_dir = {res:?}\nenv_file = {env:?}\nca_file = {ca:?}\npoll_interval_ms = 50\n{extra}",
            res = res_dir.display().to_string(),
            env = env_file.display().to_string(),
            ca = dir.join("data").join("ca.pem").display().to_string(),
        );
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        let config = Config::from_file(&path).unwrap();
        let (tx, mut rx) = watch::channel(Endpoints::new());
        let shutdown = Shutdown::new();
        let task = tokio::spawn(ferry_transparent_proxy::run(config, tx, shutdown.clone()));
        rx.changed().await.unwrap();
        Tp { rx, shutdown, task }
    }

    /// The address of `default/<name>`, once it is served.
    async fn endpoint(&self, name: &str) -> SocketAddr {
        let key = format!("default/{name}");
        eventually!(format!("endpoint {key}"), self.rx.borrow().contains_key(&key));
        self.rx.borrow()[&key].address
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn resource(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: destination.connectivity.api.sap/v1\nkind: Destination\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

fn bound(name: &str, destination: &str) -> String {
    resource(name, &format!("  destinationRef:\n    name: {destination}\n"))
}

fn claims_of(jwt: &str) -> Value {
    let part = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// Asserts an error answer of the proxy: status, SAP's headers, and a message containing `text`.
fn assert_error(r: &reqwest::Response, status: u16, origin: &str, text: &str) {
    let h = r.headers();
    let message = h.get("x-error-message").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    assert_eq!(r.status().as_u16(), status, "{message}");
    assert!(message.contains(text), "x-error-message {message:?} should contain {text:?}");
    assert_eq!(h["x-error-origin"], origin, "{message}");
    assert_eq!(h["x-proxy-server"], "Transparent Proxy");
    assert!(h.get("x-request-id").is_some_and(|v| !v.is_empty()));
}

fn write_env(path: &Path, vcap: &Value, connectivity: Option<Value>) {
    let mut services = serde_json::json!({ "destination": vcap["destination"].clone() });
    if let Some(c) = connectivity {
        services["connectivity"] = c;
    }
    std::fs::write(path, serde_json::json!({ "VCAP_SERVICES": services }).to_string()).unwrap();
}

#[tokio::test]
async fn resources_in_a_folder_become_endpoints_with_credentials_and_sap_errors() {
    ferry_core::init_crypto();
    let echo = EchoBackend::start().await;
    let port = echo.addr.port();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&[b"echo: ", &buf[..n]].concat()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let dir = common::test_dir("tproxy");
    let config = format!(
        r#"{listen}
[[destinations]]
properties = {{ Name = "web", Type = "HTTP", URL = "http://127.0.0.1:{port}/base", ProxyType = "Internet", Authentication = "BasicAuthentication", User = "ALICE", Password = "s3cret", "URL.headers.X-Conf" = "h1", "URL.queries.conf-query" = "q1" }}
[[destinations]]
properties = {{ Name = "web-other", Type = "HTTP", URL = "http://127.0.0.1:{port}/other", ProxyType = "Internet", Authentication = "NoAuthentication" }}
[[destinations]]
properties = {{ Name = "erp", Type = "HTTP", URL = "http://erp.virtual:8000/sap", ProxyType = "OnPremise", Authentication = "BasicAuthentication", User = "ALICE", Password = "s3cret" }}
[[destinations]]
properties = {{ Name = "erp-pp", Type = "HTTP", URL = "http://erp.virtual:8000/sap", ProxyType = "OnPremise", Authentication = "PrincipalPropagation" }}
[[destinations]]
properties = {{ Name = "raw", Type = "TCP", Address = "tcp.virtual:7000", ProxyType = "OnPremise" }}
[[destinations]]
properties = {{ Name = "common", Type = "HTTP", URL = "http://127.0.0.1:{port}", ProxyType = "Internet", Authentication = "OAuth2ClientCredentials", tokenServiceURL = "https://{{tenant}}.auth.example/oauth/token", tokenServiceURLType = "Common", clientId = "c", clientSecret = "s" }}
[[destinations]]
properties = {{ Name = "exchange", Type = "HTTP", URL = "http://127.0.0.1:{port}", ProxyType = "Internet", Authentication = "OAuth2TokenExchange", tokenServiceURL = "https://auth.example/oauth/token", clientId = "c", clientSecret = "s" }}

[[users]]
username = "alice"
password = "alice-password"

[[connectors]]
[[connectors.mappings]]
virtualHost = "erp.virtual"
virtualPort = 8000
localHost = "127.0.0.1"
localPort = {port}
protocol = "HTTP"
authenticationMode = "X509_GENERAL"
resources = [{{ path = "/sap", exactMatchOnly = false }}]
[[connectors.mappings]]
virtualHost = "tcp.virtual"
virtualPort = 7000
localHost = "127.0.0.1"
localPort = {tcp_port}
protocol = "TCP"
"#,
        listen = common::LISTEN_ANY,
    );
    let (mut ferry, vcap) = common::ferry_up(&dir, &config);
    let env_file = dir.join("default-env.json");
    let res = dir.join("resources");
    std::fs::create_dir_all(&res).unwrap();
    std::fs::write(res.join("web.yaml"), bound("web", "web")).unwrap();
    let tp = Tp::start(&dir, "tp", &res, &env_file, "").await;
    let http = reqwest::Client::new();

    // A resource present at start: Internet, Basic credentials, URL.headers/queries, streamed body.
    let web = tp.endpoint("web").await;
    let r = http.post(format!("http://{web}/hello?x=1")).body("payload").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-request-id").is_some());
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["url"], "/base/hello?x=1&conf-query=q1");
    assert_eq!(e["headers"]["authorization"], "Basic QUxJQ0U6czNjcmV0");
    assert_eq!(e["headers"]["x-conf"], "h1");
    assert_eq!(e["headers"]["host"], format!("127.0.0.1:{port}"));
    assert_eq!((e["method"].as_str(), e["body"].as_str()), (Some("POST"), Some("payload")));

    // A resource that appears later, for an OAuth2ClientCredentials destination whose token
    // comes from Ferry's token service through the Destination Service.
    let dest = &vcap["destination"][0]["credentials"];
    let xsuaa = &vcap["xsuaa"][0]["credentials"];
    let oauth = serde_json::json!({
        "Name": "web-oauth", "Type": "HTTP", "URL": format!("http://127.0.0.1:{port}/o"), "ProxyType": "Internet",
        "Authentication": "OAuth2ClientCredentials",
        "tokenServiceURL": format!("{}/oauth/token", xsuaa["url"].as_str().unwrap()),
        "clientId": xsuaa["clientid"], "clientSecret": xsuaa["clientsecret"]
    });
    let token = common::token(dest).await;
    let r = http
        .post(format!("{}/destination-configuration/v1/subaccountDestinations", dest["uri"].as_str().unwrap()))
        .bearer_auth(&token)
        .json(&oauth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    std::fs::write(res.join("oauth.yml"), bound("oauth", "web-oauth")).unwrap();
    let o = tp.endpoint("oauth").await;
    let e: Value = http.get(format!("http://{o}/x")).send().await.unwrap().json().await.unwrap();
    assert_eq!(e["url"], "/o/x");
    let bearer = e["headers"]["authorization"].as_str().unwrap();
    assert_eq!(claims_of(bearer.strip_prefix("Bearer ").unwrap())["client_id"], xsuaa["clientid"]);

    // OnPremise through ferry up's Connectivity Proxy and connector; the app's own
    // Proxy-Authorization never reaches anything.
    std::fs::write(res.join("erp.yaml"), bound("erp", "erp")).unwrap();
    let erp = tp.endpoint("erp").await;
    let r =
        http.get(format!("http://{erp}/items")).header("proxy-authorization", "Bearer forged").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["url"], "/sap/items");
    assert_eq!(e["headers"]["authorization"], "Basic QUxJQ0U6czNjcmV0");
    assert!(e["headers"].get("proxy-authorization").is_none(), "{e}");

    // PrincipalPropagation: the caller's JWT goes to the proxy as SAP-Connectivity-Authentication
    // and the connector turns it into a user certificate; without a JWT the proxy says what is missing.
    std::fs::write(res.join("pp.yaml"), bound("pp", "erp-pp")).unwrap();
    let pp = tp.endpoint("pp").await;
    let form = [
        ("grant_type", "password"),
        ("client_id", xsuaa["clientid"].as_str().unwrap()),
        ("client_secret", xsuaa["clientsecret"].as_str().unwrap()),
        ("username", "alice"),
        ("password", "alice-password"),
    ];
    let t: Value = http
        .post(format!("{}/oauth/token", xsuaa["url"].as_str().unwrap()))
        .form(&form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let user_jwt = t["access_token"].as_str().unwrap();
    let r = http.get(format!("http://{pp}/me")).bearer_auth(user_jwt).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let e: Value = r.json().await.unwrap();
    assert!(e["headers"]["ssl_client_cert"].as_str().unwrap().len() > 100, "a user certificate reached the backend");
    assert!(
        e["headers"].get("authorization").is_none() && e["headers"].get("sap-connectivity-authentication").is_none(),
        "{e}"
    );
    let r = http.get(format!("http://{pp}/me")).send().await.unwrap();
    assert_error(&r, 400, "Transparent Proxy", "uses PrincipalPropagation");

    // A TCP destination: the endpoint speaks SOCKS5 (method 0x80) to the proxy itself.
    std::fs::write(res.join("raw.yaml"), bound("raw", "raw")).unwrap();
    let raw = tp.endpoint("raw").await;
    assert_eq!(tp.rx.borrow()["default/raw"].protocol, "tcp");
    let mut s = tokio::net::TcpStream::connect(raw).await.unwrap();
    s.write_all(b"hi\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"echo: hi\n");
    drop(s);

    // A resource whose destination does not exist yet serves HTTP; once the destination exists
    // and is TCP, the endpoint becomes a TCP endpoint on a later scan.
    std::fs::write(res.join("late.yaml"), bound("late", "late-tcp")).unwrap();
    tp.endpoint("late").await;
    assert_eq!(tp.rx.borrow()["default/late"].protocol, "http");
    let late =
        serde_json::json!({"Name": "late-tcp", "Type": "TCP", "Address": "tcp.virtual:7000", "ProxyType": "OnPremise"});
    let r = http
        .post(format!("{}/destination-configuration/v1/subaccountDestinations", dest["uri"].as_str().unwrap()))
        .bearer_auth(&token)
        .json(&late)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    eventually!("late becomes tcp", tp.rx.borrow()["default/late"].protocol == "tcp");
    let late_addr = tp.rx.borrow()["default/late"].address;
    let mut s = tokio::net::TcpStream::connect(late_addr).await.unwrap();
    s.write_all(b"late\n").await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"echo: late\n");
    drop(s);

    // Update: the same endpoint now serves another destination.
    std::fs::write(res.join("web.yaml"), bound("web", "web-other")).unwrap();
    eventually!("web points at web-other", tp.rx.borrow()["default/web"].destination == "web-other");
    assert_eq!(tp.rx.borrow()["default/web"].address, web, "same port after an in-place update");
    let e: Value = http.get(format!("http://{web}/y")).send().await.unwrap().json().await.unwrap();
    assert_eq!(e["url"], "/other/y");
    assert!(e["headers"].get("authorization").is_none(), "{e}");

    // Delete: the endpoint goes away and its port stops accepting.
    std::fs::remove_file(res.join("raw.yaml")).unwrap();
    eventually!("raw removed", !tp.rx.borrow().contains_key("default/raw"));
    let mut refused = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(raw).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(refused, "the removed endpoint still accepts connections");

    // A file that stops parsing keeps its resources; the error goes to the log.
    std::fs::write(res.join("oauth.yml"), "apiVersion: [").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(tp.rx.borrow().contains_key("default/oauth"));

    // Gateway: the destination comes from X-Destination-Name (and its level header).
    std::fs::write(res.join("gw.yaml"), resource("gw", "  destinationRef:\n    name: \"*\"\n")).unwrap();
    let gw = tp.endpoint("gw").await;
    let e: Value = http
        .get(format!("http://{gw}/g"))
        .header("x-destination-name", "web")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(e["url"], "/base/g?conf-query=q1");
    assert_eq!(e["headers"]["authorization"], "Basic QUxJQ0U6czNjcmV0");
    assert!(e["headers"].get("x-destination-name").is_none(), "{e}");
    let r = http
        .get(format!("http://{gw}/g"))
        .header("x-destination-name", "web")
        .header("x-destination-level", "subaccount")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // SPEC §5.3, one row at a time.
    let get = |addr: SocketAddr, headers: &[(&str, &str)]| {
        let mut req = http.get(format!("http://{addr}/p"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send()
    };
    // Duplicated headers.
    let r = get(web, &[("x-chain-name", "a"), ("x-chain-name", "b")]).await.unwrap();
    assert_error(&r, 400, "Transparent Proxy", "The following headers: [x-chain-name] should be passed only once.");
    // Gateway without x-destination-name.
    let r = get(gw, &[]).await.unwrap();
    assert_error(&r, 400, "Transparent Proxy", "'x-destination-name' header is missing but required");
    // x-destination-name too long, and with characters a name cannot have.
    let long = "d".repeat(201);
    let r = get(gw, &[("x-destination-name", &long)]).await.unwrap();
    assert_error(&r, 400, "Transparent Proxy", "exceeds the maximum allowed length of 200");
    let r = get(gw, &[("x-destination-name", "bad name!")]).await.unwrap();
    assert_error(&r, 400, "Transparent Proxy", "contains characters that are not allowed");
    // A level that does not exist.
    let r = get(gw, &[("x-destination-name", "web"), ("x-destination-level", "tenant")]).await.unwrap();
    assert_error(&r, 400, "Transparent Proxy", "Destination level is invalid in the request");
    // x-destination-name on an endpoint bound to one destination.
    let r = get(web, &[("x-destination-name", "web")]).await.unwrap();
    assert_error(&r, 400, "Transparent Proxy", "is bound to a concrete destination");
    // A destination the Destination Service does not have.
    std::fs::write(res.join("ghost.yaml"), bound("ghost", "no-such-destination")).unwrap();
    let ghost = tp.endpoint("ghost").await;
    let r = get(ghost, &[]).await.unwrap();
    assert_error(
        &r,
        502,
        "Destination Service",
        "Destination 'no-such-destination' referred in Destination CR 'ghost' is not found",
    );
    assert_eq!(r.headers()["x-internal-error-code"], "404");
    // OAuth2TokenExchange without the subject token type.
    let r = get(gw, &[("x-destination-name", "exchange")]).await.unwrap();
    assert_error(&r, 400, "Transparent Proxy", "\"x-subject-token-type\" request header is required");
    // tokenServiceURLType Common without x-token-service-tenant.
    let r = get(gw, &[("x-destination-name", "common")]).await.unwrap();
    assert_error(&r, 400, "Transparent Proxy", "'x-token-service-tenant' request header is missing");

    // The Destination Service refuses the request's headers (a tenant that is no subdomain).
    let r = get(gw, &[("x-destination-name", "common"), ("x-token-service-tenant", "bad_tenant!")]).await.unwrap();
    assert_error(&r, 400, "Destination Service", "Destination service returned unsuccessful status code.");
    assert_eq!(r.headers()["x-internal-error-code"], "400");

    // No connectivity binding: OnPremise is not configured.
    let no_conn = dir.join("no-connectivity-env.json");
    write_env(&no_conn, &vcap, None);
    let res2 = dir.join("resources-2");
    std::fs::create_dir_all(&res2).unwrap();
    std::fs::write(res2.join("erp.yaml"), bound("erp", "erp")).unwrap();
    let tp2 = Tp::start(&dir, "tp2", &res2, &no_conn, "").await;
    let r = get(tp2.endpoint("erp").await, &[]).await.unwrap();
    assert_error(&r, 502, "Transparent Proxy", "On-Premise technical connectivity is not configured");
    tp2.stop().await;

    // A connectivity binding whose proxy does not answer.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port().to_string();
    drop(closed);
    let mut conn = vcap["connectivity"].clone();
    conn[0]["credentials"]["onpremise_proxy_port"] = closed_port.clone().into();
    conn[0]["credentials"]["onpremise_proxy_http_port"] = closed_port.into();
    let down = dir.join("proxy-down-env.json");
    write_env(&down, &vcap, Some(conn));
    let tp3 = Tp::start(&dir, "tp3", &res2, &down, "").await;
    let r = get(tp3.endpoint("erp").await, &[]).await.unwrap();
    assert_error(&r, 502, "Connectivity Proxy", "Failed to establish connection to the Connectivity Proxy");
    tp3.stop().await;

    // Shared tenant mode: exactly one of the tenant headers.
    let tp4 = Tp::start(&dir, "tp4", &res2, &env_file, "tenant_mode = \"shared\"\n").await;
    let erp4 = tp4.endpoint("erp").await;
    let r = get(erp4, &[]).await.unwrap();
    assert_error(&r, 400, "Transparent Proxy", "either 'x-tenant-id' or 'x-tenant-subdomain' header is mandatory");
    let r = get(erp4, &[("x-tenant-id", "a"), ("x-tenant-subdomain", "b")]).await.unwrap();
    assert_error(&r, 400, "Transparent Proxy", "only one of the 'x-tenant-id' and 'x-tenant-subdomain'");
    // Each header names the tenant its own way (SPEC §5.2): X-Tenant-Id the zone id (`x-zid` to
    // the token service), X-Tenant-Subdomain the subdomain (its host); either reaches the
    // OnPremise backend with that tenant's tokens.
    let zid = claims_of(&token)["zid"].as_str().unwrap().to_owned();
    let zdn = claims_of(&token)["ext_attr"]["zdn"].as_str().unwrap().to_owned();
    assert_ne!(zid, zdn);
    for (header, value) in [("x-tenant-id", &zid), ("x-tenant-subdomain", &zdn)] {
        let r = get(erp4, &[(header, value)]).await.unwrap();
        assert_eq!(r.status(), 200, "{header}: {:?}", r.headers().get("x-error-message"));
        assert_eq!(r.json::<Value>().await.unwrap()["url"], "/sap/p", "{header}");
    }
    // A tenant the token service does not know, by id or by subdomain; a zone id is no subdomain.
    for (header, value) in
        [("x-tenant-id", "no-such-zone"), ("x-tenant-subdomain", "no-such-subdomain"), ("x-tenant-subdomain", &zid)]
    {
        let r = get(erp4, &[(header, value)]).await.unwrap();
        assert_error(&r, 500, "XSUAA", "Failed to get a token for the Destination Service");
        assert!(r.headers().get("x-internal-error-code").is_some(), "the token service's status is passed on");
    }
    tp4.stop().await;

    // Shared tenant mode, TCP: one endpoint per subdomain of the annotation, each using its
    // tenant's token; a tenant the token service does not know gets its connections closed.
    let res3 = dir.join("resources-3");
    std::fs::create_dir_all(&res3).unwrap();
    let annotated = bound("raw", "raw").replace(
        "metadata:\n  name: raw\n",
        &format!(
            "metadata:\n  name: raw\n  annotations:\n    transparent-proxy.connectivity.api.sap/tenant-subdomains: '[\"{zdn}\",\"no-such-zone\"]'\n"
        ),
    );
    assert!(annotated.contains("tenant-subdomains"));
    std::fs::write(res3.join("raw.yaml"), annotated).unwrap();
    let tp5 = Tp::start(&dir, "tp5", &res3, &env_file, "tenant_mode = \"shared\"\n").await;
    let mine = tp5.endpoint(&format!("raw-{zdn}")).await;
    let unknown = tp5.endpoint("raw-no-such-zone").await;
    eventually!("per-tenant endpoints are tcp", {
        let list = tp5.rx.borrow();
        list.values().filter(|e| e.resource.starts_with("default/raw-") && e.protocol == "tcp").count() == 2
    });
    assert!(!tp5.rx.borrow().contains_key("default/raw"), "no tenant-less endpoint besides the per-tenant ones");
    assert_eq!(tp5.rx.borrow()[&format!("default/raw-{zdn}")].tenant.as_deref(), Some(zdn.as_str()));
    let mut s = tokio::net::TcpStream::connect(mine).await.unwrap();
    s.write_all(b"tenant\n").await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"echo: tenant\n");
    drop(s);
    let mut s = tokio::net::TcpStream::connect(unknown).await.unwrap();
    let _ = s.write_all(b"nobody\n").await;
    assert_eq!(s.read(&mut buf).await.unwrap_or(0), 0, "an unknown tenant's connection is closed");
    tp5.stop().await;

    tp.stop().await;
    ferry.terminate();
}

/// `ferry transparent-proxy --config` prints its endpoints and serves them; so does `ferry up`
/// with a `[transparent_proxy]` section.
#[tokio::test]
async fn the_cli_and_ferry_up_serve_a_folder_and_print_the_endpoints() {
    ferry_core::init_crypto();
    let echo = EchoBackend::start().await;
    let port = echo.addr.port();
    let dir = common::test_dir("tproxy-cli");
    let up_res = dir.join("up-resources");
    std::fs::create_dir_all(&up_res).unwrap();
    std::fs::write(up_res.join("web.yaml"), bound("up-web", "web")).unwrap();
    let config = format!(
        "{}[[destinations]]\nproperties = {{ Name = \"web\", Type = \"HTTP\", URL = \"http://127.0.0.1:{port}/cli\", Authentication = \"NoAuthentication\" }}\n\
         [transparent_proxy]\nresources_dir = {:?}\n",
        common::LISTEN_ANY,
        up_res.display().to_string()
    );
    let (mut ferry, _vcap) = common::ferry_up(&dir, &config);
    let line = ferry
        .banner
        .iter()
        .find(|l| l.trim_start().starts_with("endpoint default/up-web http "))
        .expect("ferry up endpoint line");
    let addr: SocketAddr = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    let e: Value = reqwest::get(format!("http://{addr}/up")).await.unwrap().json().await.unwrap();
    assert_eq!(e["url"], "/cli/up");
    let res: PathBuf = dir.join("resources");
    std::fs::create_dir_all(&res).unwrap();
    std::fs::write(res.join("web.yaml"), bound("web", "web")).unwrap();
    let endpoints_file = dir.join("endpoints.json");
    std::fs::write(
        dir.join("tp.toml"),
        "resources_dir = \"resources\"\nenv_file = \"default-env.json\"\nca_file = \"data/ca.pem\"\n\
         endpoints_file = \"endpoints.json\"\n",
    )
    .unwrap();
    let tp_config = dir.join("tp.toml");
    let mut tp = ferry_testkit::process::FerryProcess::start(
        env!("CARGO_BIN_EXE_ferry"),
        &[std::ffi::OsStr::new("transparent-proxy"), std::ffi::OsStr::new("--config"), tp_config.as_os_str()],
        &[("FERRY_LOG", "info")],
        false,
    );
    let line = tp.banner.iter().find(|l| l.starts_with("endpoint default/web http ")).expect("endpoint line").clone();
    let addr: SocketAddr = line.split(' ').nth(3).unwrap().parse().unwrap();
    let listed: Value = serde_json::from_str(&std::fs::read_to_string(&endpoints_file).unwrap()).unwrap();
    assert_eq!(listed["default/web"]["address"], addr.to_string());
    let e: Value = reqwest::get(format!("http://{addr}/z")).await.unwrap().json().await.unwrap();
    assert_eq!(e["url"], "/cli/z");
    tp.terminate();
    ferry.terminate();
}

/// Counts the TCP connections it accepts and relays each to `target`.
async fn counting_relay(target: SocketAddr) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut t = tokio::net::TcpStream::connect(target).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut s, &mut t).await;
            });
        }
    });
    (addr, count)
}

/// Reads an HTTP/1.1 head (up to the blank line) byte by byte, so nothing after it is consumed.
async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut b).await.unwrap(),
            1,
            "connection closed in the head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

/// A WebSocket-style backend: answers an upgrade request on `/ws/...` with 101 and then echoes
/// bytes; anything else gets 400.
async fn upgrade_echo() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let head = read_head(&mut s).await.to_ascii_lowercase();
                let ok = head.starts_with("get /ws/chat ")
                    && head.contains("\r\nupgrade: websocket\r\n")
                    && head.contains("\r\nconnection: upgrade\r\n")
                    && head.contains("\r\nsec-websocket-key: dghlihnhbxbszsbub25jzq==\r\n")
                    && head.contains("\r\nx-ws-conf: w1\r\n");
                if !ok {
                    let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
                    return;
                }
                s.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
                      sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                )
                .await
                .unwrap();
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Connections to backends are pooled; a WebSocket upgrade passes through; `X-Fragment-Level`
/// and `fragmentRef.level` reach the find call; resources name one of several Destination
/// Service instances.
#[tokio::test]
async fn pooled_connections_upgrades_fragment_levels_and_instances() {
    ferry_core::init_crypto();
    let echo = EchoBackend::start().await;
    let (relay, accepted) = counting_relay(echo.addr).await;
    let ws = upgrade_echo().await;
    let dir = common::test_dir("tproxy-pool");
    let config = format!(
        r#"{listen}
[[destinations]]
properties = {{ Name = "pooled", Type = "HTTP", URL = "http://127.0.0.1:{relay_port}/p", ProxyType = "Internet", Authentication = "NoAuthentication" }}
[[destinations]]
properties = {{ Name = "ws", Type = "HTTP", URL = "http://127.0.0.1:{ws_port}/ws", ProxyType = "Internet", Authentication = "NoAuthentication", "URL.headers.X-WS-Conf" = "w1" }}
"#,
        listen = common::LISTEN_ANY,
        relay_port = relay.port(),
        ws_port = ws.port(),
    );
    let (mut ferry, vcap) = common::ferry_up(&dir, &config);
    let dest = &vcap["destination"][0]["credentials"];
    let token = common::token(dest).await;
    let http = reqwest::Client::new();
    let fragment = serde_json::json!({"FragmentName": "frag", "URL.headers.X-Frag": "f1"});
    let r = http
        .post(format!("{}/destination-configuration/v1/subaccountDestinationFragments", dest["uri"].as_str().unwrap()))
        .bearer_auth(&token)
        .json(&fragment)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    // A second instance whose key the token service refuses, and one that is not configured.
    let mut bad_key = dest.clone();
    bad_key["clientsecret"] = "wrong".into();
    std::fs::write(dir.join("second-key.json"), bad_key.to_string()).unwrap();
    let env_file = dir.join("default-env.json");
    let res = dir.join("resources");
    std::fs::create_dir_all(&res).unwrap();
    std::fs::write(res.join("pooled.yaml"), bound("pooled", "pooled")).unwrap();
    std::fs::write(res.join("ws.yaml"), bound("ws", "ws")).unwrap();
    std::fs::write(res.join("gw.yaml"), resource("gw", "  destinationRef:\n    name: \"*\"\n")).unwrap();
    let frag_spec = |level: &str| {
        format!("  destinationRef:\n    name: pooled\n  fragmentRef:\n    name: frag\n    level: {level}\n")
    };
    std::fs::write(res.join("frag-sub.yaml"), resource("frag-sub", &frag_spec("subaccount"))).unwrap();
    std::fs::write(res.join("frag-inst.yaml"), resource("frag-inst", &frag_spec("instance"))).unwrap();
    let on =
        |instance: &str| format!("  destinationRef:\n    name: pooled\n  destinationServiceInstanceName: {instance}\n");
    std::fs::write(res.join("main.yaml"), resource("on-main", &on("main"))).unwrap();
    std::fs::write(res.join("second.yaml"), resource("on-second", &on("second"))).unwrap();
    std::fs::write(res.join("nowhere.yaml"), resource("on-nowhere", &on("nowhere"))).unwrap();
    let extra = format!(
        "default_instance_name = \"main\"\n[[instances]]\nname = \"second\"\ndestination_service_key = {:?}\n",
        dir.join("second-key.json").display().to_string()
    );
    let tp = Tp::start(&dir, "tp", &res, &env_file, &extra).await;

    // Pooling: sequential requests, streamed bodies and all, share one backend connection.
    let pooled = tp.endpoint("pooled").await;
    for i in 0..5 {
        let e: Value = http
            .post(format!("http://{pooled}/n{i}"))
            .body(vec![b'x'; 100_000])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(e["url"], format!("/p/n{i}"));
        assert_eq!(e["body"].as_str().unwrap().len(), 100_000);
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1, "one pooled connection to the backend");

    // WebSocket: the upgrade reaches the backend with the destination's headers, then bytes flow both ways.
    let ws_ep = tp.endpoint("ws").await;
    let mut s = tokio::net::TcpStream::connect(ws_ep).await.unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("\r\nupgrade: websocket\r\n") && head.contains("sec-websocket-accept:"), "{head}");
    for msg in [&b"ping"[..], &[0x81, 0x85, 1, 2, 3, 4, 5, 6, 7, 8, 9][..]] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    drop(s);

    // X-Fragment-Level: the fragment is looked up on the level asked for.
    let gw = tp.endpoint("gw").await;
    let frag = |level: &'static str| {
        http.get(format!("http://{gw}/f"))
            .header("x-destination-name", "pooled")
            .header("x-fragment-name", "frag")
            .header("x-fragment-level", level)
            .send()
    };
    let e: Value = frag("subaccount").await.unwrap().json().await.unwrap();
    assert_eq!(e["headers"]["x-frag"], "f1", "{e}");
    let r = frag("instance").await.unwrap();
    assert_error(&r, 502, "Destination Service", "is not found");
    let e: Value =
        http.get(format!("http://{}/f", tp.endpoint("frag-sub").await)).send().await.unwrap().json().await.unwrap();
    assert_eq!(e["headers"]["x-frag"], "f1", "{e}");
    let r = http.get(format!("http://{}/f", tp.endpoint("frag-inst").await)).send().await.unwrap();
    assert_error(&r, 502, "Destination Service", "is not found");

    // Instances: the default by its name, the second with its own (refused) key, an unknown one.
    let e: Value =
        http.get(format!("http://{}/i", tp.endpoint("on-main").await)).send().await.unwrap().json().await.unwrap();
    assert_eq!(e["url"], "/p/i");
    let r = http.get(format!("http://{}/i", tp.endpoint("on-second").await)).send().await.unwrap();
    assert_eq!(r.headers()["x-error-origin"], "XSUAA");
    let nowhere = tp.endpoint("on-nowhere").await;
    let listed = tp.rx.borrow()["default/on-nowhere"].error.clone().unwrap();
    assert!(listed.contains("Destination Service instance 'nowhere'") && listed.contains("main, second"), "{listed}");
    assert!(tp.rx.borrow()["default/on-main"].error.is_none());
    let r = http.get(format!("http://{nowhere}/i")).send().await.unwrap();
    assert_error(
        &r,
        500,
        "Transparent Proxy",
        "Destination Service instance 'nowhere' referred in Destination CR 'on-nowhere' is not configured",
    );

    // ClientCertificateAuthentication: the keystore from the find answer's `certificates` (PEM,
    // or a P12 opened with KeyStorePassword) is presented to an nginx that requires a client
    // certificate; connections made with one certificate are never used for another
    // destination (or for none).
    let data = dir.join("data");
    let ferry_ca = ferry_core::tls::LocalCa::from_pem(
        &std::fs::read_to_string(data.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(data.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let server = ferry_ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    let client_ca = ferry_core::tls::LocalCa::generate("tproxy client CA").unwrap();
    let nginx = ferry_testkit::nginx::Nginx::start(
        "    listen 127.0.0.1:{PORT} ssl;\n\
         ssl_certificate {DIR}/server.pem;\n    ssl_certificate_key {DIR}/server-key.pem;\n\
         ssl_client_certificate {DIR}/client-ca.pem;\n    ssl_verify_client on;\n\
         location / { return 200 \"subject=$ssl_client_s_dn verify=$ssl_client_verify uri=$request_uri\\n\"; }",
        &[
            ("server.pem", &server.cert_pem),
            ("server-key.pem", server.key_pem.expose()),
            ("client-ca.pem", client_ca.cert_pem()),
        ],
    );
    let nginx_url = format!("https://127.0.0.1:{}/m", nginx.addr.port());
    for (who, store) in [("app-a", "a.pem"), ("app-b", "b.p12")] {
        let id = client_ca.issue_user_cert(&[("CN".to_owned(), who.to_owned())], time::Duration::days(1)).unwrap();
        let (bytes, kind) = if store.ends_with(".p12") {
            (p12(&dir, &id, "p12-s3cret"), "P12")
        } else {
            (format!("{}{}", id.cert_pem, id.key_pem.expose()).into_bytes(), "CERTIFICATE")
        };
        let content = base64::engine::general_purpose::STANDARD.encode(bytes);
        let cert = serde_json::json!({"Name": store, "Type": kind, "Content": content});
        let r = http
            .post(format!("{}/destination-configuration/v1/subaccountCertificates", dest["uri"].as_str().unwrap()))
            .bearer_auth(&token)
            .json(&cert)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let d = serde_json::json!({"Name": format!("mtls-{who}"), "Type": "HTTP", "URL": nginx_url, "ProxyType": "Internet",
            "Authentication": "ClientCertificateAuthentication", "KeyStoreLocation": store, "KeyStorePassword": "p12-s3cret"});
        let r = http
            .post(format!("{}/destination-configuration/v1/subaccountDestinations", dest["uri"].as_str().unwrap()))
            .bearer_auth(&token)
            .json(&d)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    let plain = serde_json::json!({"Name": "mtls-none", "Type": "HTTP", "URL": nginx_url, "ProxyType": "Internet",
        "Authentication": "NoAuthentication"});
    let r = http
        .post(format!("{}/destination-configuration/v1/subaccountDestinations", dest["uri"].as_str().unwrap()))
        .bearer_auth(&token)
        .json(&plain)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let via = |d: &'static str| http.get(format!("http://{gw}/x")).header("x-destination-name", d).send();
    for _ in 0..2 {
        for (d, cn) in [("mtls-app-a", "CN=app-a"), ("mtls-none", ""), ("mtls-app-b", "CN=app-b")] {
            let r = via(d).await.unwrap();
            if cn.is_empty() {
                assert_eq!(r.status(), 400, "nginx refuses a request without a client certificate");
                continue;
            }
            let text = r.text().await.unwrap();
            assert!(text.contains(cn) && text.contains("verify=SUCCESS") && text.contains("uri=/m/x"), "{d}: {text}");
        }
    }

    // A P12 whose password is wrong: a 502 that says why, and nothing reaches nginx.
    let d = serde_json::json!({"Name": "mtls-badpass", "Type": "HTTP", "URL": nginx_url, "ProxyType": "Internet",
        "Authentication": "ClientCertificateAuthentication", "KeyStoreLocation": "b.p12", "KeyStorePassword": "wrong"});
    let r = http
        .post(format!("{}/destination-configuration/v1/subaccountDestinations", dest["uri"].as_str().unwrap()))
        .bearer_auth(&token)
        .json(&d)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = via("mtls-badpass").await.unwrap();
    assert_error(&r, 502, "Destination Service", "the keystore 'b.p12' of destination 'mtls-badpass' cannot be opened");
    drop(nginx);

    tp.stop().await;
    ferry.terminate();
}

/// A password-protected PKCS#12 keystore of `id`, written by `openssl pkcs12 -export`.
fn p12(dir: &Path, id: &ferry_core::tls::CertifiedKey, password: &str) -> Vec<u8> {
    std::fs::write(dir.join("p12-cert.pem"), &id.cert_pem).unwrap();
    std::fs::write(dir.join("p12-key.pem"), id.key_pem.expose()).unwrap();
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(["pkcs12", "-export", "-in", "p12-cert.pem", "-inkey", "p12-key.pem", "-name", "client"])
        .args(["-passout", &format!("pass:{password}"), "-out", "client.p12"])
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(dir.join("client.p12")).unwrap()
}
