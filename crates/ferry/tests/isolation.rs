#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Tenant isolation against a running `ferry up`: subaccount A (the configured one, with its
//! connector) and subaccount B (created through the admin API, with its own connector process
//! mapping the same virtual hosts to other backends). Every row is a call with one tenant's
//! credentials aimed at the other tenant's tunnel (HTTP proxy and SOCKS5), destinations,
//! fragments, certificates or service keys; the backends count what reached them, so a request
//! that got through is caught whatever status came back. Instance-level objects are checked the
//! same way between two destination instances of one subaccount.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ferry_testkit::EchoBackend;
use ferry_testkit::process::FerryProcess;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const V1: &str = "destination-configuration/v1";

/// A TCP backend that greets every connection with its tag and counts connections.
async fn tagged_tcp(tag: &'static str) -> (u16, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let count = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = s.write_all(tag.as_bytes()).await;
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
            });
        }
    });
    (port, hits)
}

async fn client_token(http: &reqwest::Client, c: &Value) -> String {
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", c["clientid"].as_str().unwrap()),
        ("client_secret", c["clientsecret"].as_str().unwrap()),
    ];
    let r = http.post(format!("{}/oauth/token", c["url"].as_str().unwrap())).form(&form).send().await.unwrap();
    assert_eq!(r.status(), 200, "token for {}", c["clientid"]);
    r.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned()
}

/// The admin API of `ferry up` with the admin client from `state.json`.
struct Admin {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Admin {
    async fn new(data: &std::path::Path, token_url: &str) -> Self {
        let state: Value = serde_json::from_str(&std::fs::read_to_string(data.join("state.json")).unwrap()).unwrap();
        let http = ferry_core::tls::http_client(None).unwrap();
        let creds = json!({"url": token_url, "clientid": state["admin_client_id"], "clientsecret": state["admin_client_secret"]});
        let token = client_token(&http, &creds).await;
        Self { http, base: format!("{token_url}/ferry/admin/v1"), token }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let r = self.http.post(format!("{}{path}", self.base)).bearer_auth(&self.token).json(&body).send().await;
        let r = r.unwrap();
        assert_eq!(r.status(), 201, "POST {path}");
        r.json().await.unwrap()
    }

    /// A new service instance of `service` in `sub` with one key; returns the key's credentials.
    async fn instance_key(&self, sub: &str, service: &str, name: &str) -> Value {
        let inst = self
            .post(&format!("/subaccounts/{sub}/service-instances"), json!({"service": service, "name": name}))
            .await;
        let iid = inst["id"].as_str().unwrap();
        self.post(&format!("/subaccounts/{sub}/service-instances/{iid}/service-keys"), json!({"name": "k"})).await
    }
}

/// A JWT with its payload replaced (the signature no longer matches).
fn tampered(jwt: &str, f: impl FnOnce(&mut Value)) -> String {
    let parts: Vec<&str> = jwt.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    f(&mut claims);
    format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(claims.to_string()), parts[2])
}

fn proxy_client(proxy: &str, token: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(proxy).unwrap().custom_http_auth(format!("Bearer {token}").parse().unwrap()))
        .build()
        .unwrap()
}

/// A GET through the HTTP proxy with `token`, extra headers; returns the status.
async fn via_proxy(proxy: &str, token: &str, url: &str, headers: &[(&str, &str)]) -> u16 {
    let mut req = proxy_client(proxy, token).get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap().status().as_u16()
}

/// The greeting of the TCP backend reached through SOCKS5, or the refusal.
async fn via_socks(socks: &str, token: &str, location: &str, host: &str, port: u16) -> Result<String, String> {
    match ferry_client::socks5::connect_tcp(socks, token, location, host, port).await {
        Ok(mut s) => {
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.unwrap().unwrap();
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        }
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn a_tenant_never_reaches_another_tenants_tunnels_destinations_or_keys() {
    ferry_core::init_crypto();
    let (echo_a, echo_b) = (EchoBackend::start().await, EchoBackend::start().await);
    let ((tcp_a, tcp_a_hits), (tcp_b, tcp_b_hits)) = (tagged_tcp("A").await, tagged_tcp("B").await);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = format!(
        r#"{listen}
[[connectors]]
[[connectors.mappings]]
virtualHost = "erp.virtual"
virtualPort = 8000
localHost = "127.0.0.1"
localPort = {http_a}
protocol = "HTTP"
resources = [{{ path = "/", exactMatchOnly = false }}]
[[connectors.mappings]]
virtualHost = "tcp.virtual"
virtualPort = 7000
localHost = "127.0.0.1"
localPort = {tcp_a}
protocol = "TCP"
"#,
        listen = common::LISTEN_ANY,
        http_a = echo_a.addr.port(),
    );
    let (_up, vcap) = common::ferry_up(dir, &config);
    let data = dir.join("data");
    let http = ferry_core::tls::http_client(None).unwrap();
    let conn_a = &vcap["connectivity"][0]["credentials"];
    let dest_a = &vcap["destination"][0]["credentials"];
    let token_url = conn_a["url"].as_str().unwrap().to_owned();
    let sub_a = conn_a["tenantid"].as_str().unwrap().to_owned();
    let proxy = format!("http://127.0.0.1:{}", conn_a["onpremise_proxy_http_port"].as_str().unwrap());
    let socks = common::socks_addr(&vcap);

    // Subaccount B with its own bindings, and a second destination instance in A.
    let admin = Admin::new(&data, &token_url).await;
    let sub_b = admin.post("/subaccounts", json!({"subdomain": "tenant-b"})).await["id"].as_str().unwrap().to_owned();
    let dest_b = admin.instance_key(&sub_b, "destination", "dest-b").await;
    let conn_b = admin.instance_key(&sub_b, "connectivity", "conn-b").await;
    let dest_a2 = admin.instance_key(&sub_a, "destination", "dest-a2").await;
    assert_eq!(conn_b["tenantid"], sub_b.as_str());

    // B's connector: the same virtual hosts as A's, to B's backends, plus hosts only B maps.
    let out = dir.join("connector-b");
    common::enroll(&sub_b, None, &token_url, &data, &out, &[]);
    let mut toml = std::fs::read_to_string(out.join("connector.toml")).unwrap();
    for (vhost, vport, port, protocol) in [
        ("erp.virtual", 8000, echo_b.addr.port(), "HTTP"),
        ("b-only.virtual", 9000, echo_b.addr.port(), "HTTP"),
        ("tcp.virtual", 7000, tcp_b, "TCP"),
        ("tcp-b.virtual", 7001, tcp_b, "TCP"),
    ] {
        toml.push_str(&format!(
            "\n[[mappings]]\nvirtualHost = \"{vhost}\"\nvirtualPort = {vport}\nlocalHost = \"127.0.0.1\"\n\
             localPort = {port}\nprotocol = \"{protocol}\"\n"
        ));
        if protocol == "HTTP" {
            toml.push_str("resources = [{ path = \"/\", exactMatchOnly = false }]\n");
        }
    }
    std::fs::write(out.join("connector.toml"), toml).unwrap();
    let _connector_b = FerryProcess::start(
        env!("CARGO_BIN_EXE_ferry"),
        &["connector", "run", "--config", out.join("connector.toml").to_str().unwrap()],
        &[("FERRY_LOG", "warn")],
        false,
    );

    let (ta, tb) = (client_token(&http, conn_a).await, client_token(&http, &conn_b).await);
    let mut b_up = false;
    for _ in 0..400 {
        if via_proxy(&proxy, &tb, "http://erp.virtual:8000/b-ready", &[]).await == 200 {
            b_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(b_up, "B's connector never became reachable");

    // --- Tunnels over the HTTP proxy: (name, token, url, headers, status, A's hits, B's hits).
    let forged_a = tampered(&tb, |c| {
        c["zid"] = json!(sub_a);
        c["ext_attr"]["subaccountid"] = json!(sub_a);
    });
    let forged_b = tampered(&ta, |c| c["zid"] = json!(sub_b));
    let erp = "http://erp.virtual:8000/x";
    let b_only = "http://b-only.virtual:9000/x";
    type Row<'a> = (&'a str, &'a str, &'a str, Vec<(&'a str, &'a str)>, u16, usize, usize);
    let rows: Vec<Row> = vec![
        ("A's token reaches A's backend", &ta, erp, vec![], 200, 1, 0),
        ("B's token reaches B's backend", &tb, erp, vec![], 200, 0, 1),
        ("A's token, a host only B maps", &ta, b_only, vec![], 403, 0, 0),
        (
            "A's token, headers naming B",
            &ta,
            b_only,
            vec![
                ("x-zid", &sub_b),
                ("sap-connectivity-subaccount", &sub_b),
                ("sap-connectivity-tenantid", &sub_b),
                ("sap-connectivity-scc-subaccount", &sub_b),
            ],
            403,
            0,
            0,
        ),
        ("B's token, payload edited to zid A", &forged_a, erp, vec![], 407, 0, 0),
        ("A's token, payload edited to zid B", &forged_b, b_only, vec![], 407, 0, 0),
        (
            "A's token, a location A has no connector at",
            &ta,
            erp,
            vec![("sap-connectivity-scc-location_id", "b")],
            503,
            0,
            0,
        ),
        ("B's token in Authorization, none in Proxy-Authorization", "", b_only, vec![("authorization", "")], 407, 0, 0),
    ];
    let mut failures = Vec::new();
    for (name, token, url, headers, want, want_a, want_b) in rows {
        let (a0, b0) = (echo_a.hits(), echo_b.hits());
        let auth_b = format!("Bearer {tb}");
        let headers: Vec<(&str, &str)> = headers
            .into_iter()
            .map(|(k, v)| if k == "authorization" { (k, auth_b.as_str()) } else { (k, v) })
            .collect();
        let got = if token.is_empty() {
            let mut req =
                reqwest::Client::builder().proxy(reqwest::Proxy::http(&proxy).unwrap()).build().unwrap().get(url);
            for (k, v) in &headers {
                req = req.header(*k, *v);
            }
            req.send().await.unwrap().status().as_u16()
        } else {
            via_proxy(&proxy, token, url, &headers).await
        };
        let (da, db) = (echo_a.hits() - a0, echo_b.hits() - b0);
        if (got, da, db) != (want, want_a, want_b) {
            failures.push(format!("{name}: status {got} (want {want}), hits A {da} B {db} (want {want_a} {want_b})"));
        }
    }

    // --- Tunnels over SOCKS5: the greeting names the backend that answered.
    type SocksRow<'a> = (&'a str, &'a str, &'a str, &'a str, u16, Option<&'a str>);
    let socks_rows: Vec<SocksRow> = vec![
        ("A's token reaches A's TCP backend", &ta, "", "tcp.virtual", 7000, Some("A")),
        ("B's token reaches B's TCP backend", &tb, "", "tcp.virtual", 7000, Some("B")),
        ("A's token, a TCP host only B maps", &ta, "", "tcp-b.virtual", 7001, None),
        ("B's token edited to zid A", &forged_a, "", "tcp.virtual", 7000, None),
        ("A's token, a location A has no connector at", &ta, "b", "tcp.virtual", 7000, None),
    ];
    for (name, token, location, host, port, want) in socks_rows {
        let (a0, b0) = (tcp_a_hits.load(Ordering::SeqCst), tcp_b_hits.load(Ordering::SeqCst));
        let got = via_socks(&socks, token, location, host, port).await;
        let (da, db) = (tcp_a_hits.load(Ordering::SeqCst) - a0, tcp_b_hits.load(Ordering::SeqCst) - b0);
        let ok = match (&got, want) {
            (Ok(tag), Some(w)) => tag == w && (da, db) == if w == "A" { (1, 0) } else { (0, 1) },
            (Err(_), None) => (da, db) == (0, 0),
            _ => false,
        };
        if !ok {
            failures.push(format!("SOCKS5 {name}: {got:?} (want {want:?}), connections A {da} B {db}"));
        }
    }

    // --- Destination Service: A's objects at both levels, then every way B could reach them.
    let (dta, dtb, dta2) =
        (client_token(&http, dest_a).await, client_token(&http, &dest_b).await, client_token(&http, &dest_a2).await);
    let api = format!("{}/{V1}", dest_a["uri"].as_str().unwrap());
    let call = |method: reqwest::Method, path: String, token: String, body: Option<Value>| {
        let (http, api) = (http.clone(), api.clone());
        async move {
            let mut req = http.request(method, format!("{api}/{path}")).bearer_auth(token);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let ca = ferry_core::tls::LocalCa::generate("isolation test CA").unwrap();
    let pem = base64::engine::general_purpose::STANDARD.encode(ca.cert_pem());
    let seeds: Vec<(&str, Value, &String)> = vec![
        (
            "subaccountDestinations",
            json!({"Name": "a-secret", "Type": "HTTP", "URL": "http://a.example", "ProxyType": "Internet",
                   "Authentication": "BasicAuthentication", "User": "a", "Password": "a-password-1"}),
            &dta,
        ),
        (
            "instanceDestinations",
            json!({"Name": "a-inst", "Type": "HTTP", "URL": "http://a-inst.example", "ProxyType": "Internet",
                   "Authentication": "NoAuthentication"}),
            &dta,
        ),
        ("subaccountDestinationFragments", json!({"FragmentName": "a-frag", "URL": "http://evil.example"}), &dta),
        ("instanceDestinationFragments", json!({"FragmentName": "a-inst-frag", "User": "x"}), &dta),
        ("subaccountCertificates", json!({"Name": "a-cert.pem", "Type": "PEM", "Content": pem}), &dta),
        ("instanceCertificates", json!({"Name": "a-inst-cert.pem", "Type": "PEM", "Content": pem}), &dta),
    ];
    for (coll, body, token) in &seeds {
        let (s, text) = call(reqwest::Method::POST, (*coll).to_owned(), (*token).clone(), Some(body.clone())).await;
        assert_eq!(s, 201, "seeding {coll}: {text}");
    }
    // What must stay invisible: (who, token, path) → the status and the names never in the body.
    let secret_names = ["a-secret", "a-inst", "a-frag", "a-inst-frag", "a-cert.pem", "a-inst-cert.pem", "a-password-1"];
    let reads: Vec<(&str, &String, String, u16)> = vec![
        ("B lists subaccount destinations", &dtb, "subaccountDestinations".into(), 200),
        ("B lists instance destinations", &dtb, "instanceDestinations".into(), 200),
        ("B reads A's destination", &dtb, "subaccountDestinations/a-secret".into(), 404),
        ("B finds A's destination", &dtb, "destinations/a-secret".into(), 404),
        ("B finds A's instance destination", &dtb, "destinations/a-inst".into(), 404),
        ("B lists fragments", &dtb, "subaccountDestinationFragments".into(), 200),
        ("B reads A's fragment", &dtb, "subaccountDestinationFragments/a-frag".into(), 404),
        ("B lists certificates", &dtb, "subaccountCertificates".into(), 200),
        ("B reads A's certificate", &dtb, "subaccountCertificates/a-cert.pem".into(), 404),
        ("B reads A's instance certificate", &dtb, "instanceCertificates/a-inst-cert.pem".into(), 404),
        ("B reads A's labels", &dtb, "subaccountDestinations/a-secret/labels".into(), 404),
        ("A's 2nd instance lists instance destinations", &dta2, "instanceDestinations".into(), 200),
        ("A's 2nd instance reads the 1st's", &dta2, "instanceDestinations/a-inst".into(), 404),
        ("A's 2nd instance lists instance fragments", &dta2, "instanceDestinationFragments".into(), 200),
        ("A's 2nd instance reads the 1st's fragment", &dta2, "instanceDestinationFragments/a-inst-frag".into(), 404),
        ("A's 2nd instance lists instance certificates", &dta2, "instanceCertificates".into(), 200),
        ("A's 2nd instance reads the 1st's certificate", &dta2, "instanceCertificates/a-inst-cert.pem".into(), 404),
        ("A's 2nd instance finds the 1st's", &dta2, "destinations/a-inst".into(), 404),
    ];
    for (name, token, path, want) in reads {
        let (s, body) = call(reqwest::Method::GET, path, token.clone(), None).await;
        let leaked: Vec<&&str> = secret_names.iter().filter(|n| body.contains(**n)).collect();
        if s != want || !leaked.is_empty() {
            failures.push(format!("{name}: status {s} (want {want}), leaked {leaked:?}: {body}"));
        }
    }
    // B's own destination with a fragment name of A's: the fragment is not found in B.
    let (s, _) = call(
        reqwest::Method::POST,
        "subaccountDestinations".into(),
        dtb.clone(),
        Some(json!({"Name": "b-dest", "Type": "HTTP", "URL": "http://b.example", "ProxyType": "Internet",
                    "Authentication": "NoAuthentication"})),
    )
    .await;
    assert_eq!(s, 201);
    let r = http
        .get(format!("{api}/destinations/b-dest"))
        .bearer_auth(&dtb)
        .header("X-fragment-name", "a-frag")
        .send()
        .await
        .unwrap();
    let (s, body) = (r.status().as_u16(), r.text().await.unwrap());
    if s == 200 || body.contains("evil.example") {
        failures.push(format!("B merged A's fragment into its destination: {s} {body}"));
    }
    // Writes by B under A's names change nothing of A's.
    for (method, path) in [
        (reqwest::Method::DELETE, "subaccountDestinations/a-secret"),
        (reqwest::Method::DELETE, "subaccountDestinationFragments/a-frag"),
        (reqwest::Method::DELETE, "subaccountCertificates/a-cert.pem"),
    ] {
        let (s, _) = call(method.clone(), path.into(), dtb.clone(), None).await;
        if s != 404 {
            failures.push(format!("B {method} {path}: {s} (want 404)"));
        }
    }
    let (s, body) = call(reqwest::Method::GET, "destinations/a-secret".into(), dta.clone(), None).await;
    assert_eq!(s, 200, "A's destination is still A's: {body}");
    assert!(body.contains("a-password-1") || body.contains("Basic "), "{body}");

    // --- Service keys and the admin API: B's tokens are no admin, B's id with A's secret no client.
    for (name, token) in [("B's destination token", &dtb), ("B's connectivity token", &tb)] {
        for path in
            [format!("/subaccounts/{sub_a}/service-instances"), "/subaccounts".into(), format!("/subaccounts/{sub_a}")]
        {
            let r = http.get(format!("{}{path}", admin.base)).bearer_auth(token).send().await.unwrap();
            if r.status() != 403 {
                failures.push(format!("{name} on admin {path}: {} (want 403)", r.status()));
            }
        }
    }
    let mixed = json!({"url": token_url, "clientid": dest_b["clientid"], "clientsecret": dest_a["clientsecret"]});
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", mixed["clientid"].as_str().unwrap()),
        ("client_secret", mixed["clientsecret"].as_str().unwrap()),
    ];
    let r = http.post(format!("{token_url}/oauth/token")).form(&form).send().await.unwrap();
    if r.status() != 401 {
        failures.push(format!("B's client id with A's secret: {} (want 401)", r.status()));
    }
    // A's bindings are dedicated (`tenantmode`): no token in B's zone by addressing it, on the
    // HTTP or the HTTPS (`uaadomain`) listener, and so no way to B's destinations or tunnels.
    let ca_pem = std::fs::read_to_string(data.join("ca.pem")).unwrap();
    let https = ferry_core::tls::http_client(Some(&ca_pem)).unwrap();
    let uaa = format!("https://{}", dest_a["uaadomain"].as_str().unwrap());
    for (creds, what) in [(dest_a, "A's destination binding"), (conn_a, "A's connectivity binding")] {
        for (client, base) in [(&http, token_url.as_str()), (&https, uaa.as_str())] {
            let form = [
                ("grant_type", "client_credentials"),
                ("client_id", creds["clientid"].as_str().unwrap()),
                ("client_secret", creds["clientsecret"].as_str().unwrap()),
            ];
            let r = client.post(format!("{base}/oauth/token")).header("x-zid", &sub_b).form(&form).send().await;
            let r = r.unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or_default();
            if status != 401 || body.get("access_token").is_some() {
                failures.push(format!("{what} with x-zid B at {base}: {status} {body}"));
            }
        }
    }
    // Its own zone named explicitly still works, as xssec sends it.
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", dest_a["clientid"].as_str().unwrap()),
        ("client_secret", dest_a["clientsecret"].as_str().unwrap()),
    ];
    let r = https.post(format!("{uaa}/oauth/token")).header("x-zid", &sub_a).form(&form).send().await.unwrap();
    assert_eq!(r.status(), 200, "own zone by x-zid");
    assert!(failures.is_empty(), "{} isolation rows failed:\n{}", failures.len(), failures.join("\n"));
}
