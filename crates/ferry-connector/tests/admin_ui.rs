#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The administration web UI over real HTTPS, as a browser without JavaScript uses it: form
//! posts with the session cookie and CSRF field, redirects, and an app request through a real
//! proxy and tunnel that then shows in the audit viewer and the monitoring charts. (The browser
//! test, scripts/ui-tests.sh, drives the same pages in headless Chromium.)

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use ferry_connector::admin::{Admin, AdminConfig};
use ferry_core::Shutdown;
use ferry_testkit::{EchoBackend, SUBACCOUNT, TunnelPair, eventually};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use reqwest::StatusCode;
use serde_json::json;
use tokio::net::TcpStream;

const NEW_PASSWORD: &str = "correct horse battery";

struct Browser {
    base: String,
    client: reqwest::Client,
    cookie: Option<String>,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

struct Page {
    status: StatusCode,
    location: Option<String>,
    headers: reqwest::header::HeaderMap,
    body: String,
    /// The body as received (downloads are binary).
    bytes: Bytes,
}

impl Browser {
    async fn start(dir: &Path, adjust: impl FnOnce(&mut AdminConfig)) -> Self {
        ferry_core::init_crypto();
        let mut cfg = AdminConfig::new(dir.to_owned());
        cfg.connection.backoff_initial = Duration::from_millis(20);
        cfg.connection.backoff_max = Duration::from_millis(200);
        adjust(&mut cfg);
        let shutdown = Shutdown::new();
        let admin = Admin::start(cfg, shutdown.clone()).await.unwrap();
        let listener = ferry_testkit::listener().await;
        let base = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let task = tokio::spawn(admin.clone().serve(listener, shutdown.clone()));
        let tls = ferry_core::tls::outbound_client_config(Some(admin.ui_ca_pem())).unwrap();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Self { base, client, cookie: None, shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }

    async fn send(&mut self, r: reqwest::RequestBuilder) -> Page {
        let r = match &self.cookie {
            Some(c) => r.header("cookie", format!("JSESSIONID={c}")),
            None => r,
        };
        let resp = r.send().await.unwrap();
        for v in resp.headers().get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let value = v.split(';').next().unwrap().trim_start_matches("JSESSIONID=");
            self.cookie = (!value.is_empty()).then(|| value.to_owned());
        }
        let status = resp.status();
        let location = resp.headers().get("location").map(|v| v.to_str().unwrap().to_owned());
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.unwrap();
        Page { status, location, headers, body: String::from_utf8_lossy(&bytes).into_owned(), bytes }
    }

    async fn get(&mut self, path: &str) -> Page {
        let r = self.client.get(format!("{}{path}", self.base));
        self.send(r).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let r = self.client.post(format!("{}{path}", self.base)).form(form);
        self.send(r).await
    }

    /// Posts a form of the page at `page` with that page's CSRF token.
    async fn submit(&mut self, page: &str, action: &str, fields: &[(&str, &str)]) -> Page {
        let p = self.get(page).await;
        assert_eq!(p.status, StatusCode::OK, "{page}: {}", p.body);
        let csrf = csrf_of(&p.body);
        let mut form = vec![("_csrf", csrf.as_str())];
        form.extend_from_slice(fields);
        self.post(action, &form).await
    }

    async fn login(&mut self, password: &str) -> Page {
        self.post("/ui/login", &[("user", "Administrator"), ("password", password)]).await
    }
}

fn csrf_of(html: &str) -> String {
    let (_, rest) = html.split_once("name=\"_csrf\" value=\"").expect("a CSRF field");
    rest.split('"').next().unwrap().to_owned()
}

async fn first_login(b: &mut Browser) {
    let p = b.login("manage").await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(p.location.as_deref(), Some("/ui/password"), "the initial password must be changed first");
    let p = b.get("/ui/overview").await;
    assert_eq!(p.location.as_deref(), Some("/ui/password"), "no page before the password change");
    let p = b
        .submit("/ui/password", "/ui/password", &[("old", "manage"), ("new", NEW_PASSWORD), ("repeat", NEW_PASSWORD)])
        .await;
    assert_eq!(p.location.as_deref(), Some("/ui/login?changed=1"), "{}", p.body);
    let p = b.login(NEW_PASSWORD).await;
    assert_eq!(p.location.as_deref(), Some("/ui/overview"));
}

#[tokio::test]
async fn logon_forced_password_change_logout_and_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Browser::start(dir.path(), |_| {}).await;
    assert_eq!(b.get("/").await.location.as_deref(), Some("/ui/overview"));
    assert_eq!(b.get("/ui/overview").await.location.as_deref(), Some("/ui/login"));
    let p = b.get("/ui/login").await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(p.headers["content-security-policy"], "default-src 'self'; frame-ancestors 'none'");
    assert!(p.body.contains("name=\"password\""));
    let missing = b.get("/ui/no-such-page").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.headers.get("www-authenticate").is_none() && missing.body.contains("no such page"));
    let css = b.get("/ui/static/style.css").await;
    assert_eq!(css.status, StatusCode::OK);

    let p = b.login("wrong").await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    assert!(p.body.contains("Wrong user name or password"));

    // Field messages: a too short new password and a mismatch, and the initial one stays.
    b.login("manage").await;
    let p = b.submit("/ui/password", "/ui/password", &[("old", "manage"), ("new", "short"), ("repeat", "other")]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("at least 8 characters") && p.body.contains("The two new passwords differ"), "{}", p.body);
    // A post without the session's CSRF token is refused.
    let p = b.post("/ui/password", &[("_csrf", "forged"), ("old", "manage"), ("new", NEW_PASSWORD)]).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN);
    b.cookie = None;

    first_login(&mut b).await;
    let p = b.get("/ui/overview").await;
    assert_eq!(p.status, StatusCode::OK);
    assert!(p.body.contains(env!("CARGO_PKG_VERSION")) && p.body.contains(">master<"), "{}", p.body);
    // The old password is refused after the change.
    let session = b.cookie.take();
    assert_eq!(b.login("manage").await.status, StatusCode::UNAUTHORIZED);
    b.cookie = session;

    let p = b.submit("/ui/overview", "/ui/logout", &[]).await;
    assert_eq!(p.location.as_deref(), Some("/ui/login"));
    assert!(b.cookie.is_none(), "logout clears the cookie");
    b.stop().await;

    // A session that idled out sends the browser to the logon page with a message.
    let dir = tempfile::tempdir().unwrap();
    let mut b = Browser::start(dir.path(), |c| c.session_timeout = Duration::from_millis(1)).await;
    b.login("manage").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let p = b.get("/ui/password").await;
    assert_eq!(p.location.as_deref(), Some("/ui/login?expired=1"));
    let p = b.get("/ui/login?expired=1").await;
    assert!(p.body.contains("Your session has expired"));
    b.stop().await;
}

/// Every page of the UI, and every form action.
const PAGES: &[&str] = &[
    "/ui/overview",
    "/ui/subaccounts",
    "/ui/access",
    "/ui/access/mapping",
    "/ui/principal-propagation",
    "/ui/audit",
    "/ui/audit.csv",
    "/ui/monitoring",
    "/ui/ha",
    "/ui/backup",
];
const FORMS: &[&str] = &[
    "/ui/password",
    "/ui/logout",
    "/ui/subaccounts",
    "/ui/subaccounts/state",
    "/ui/subaccounts/audit",
    "/ui/subaccounts/delete",
    "/ui/subaccounts/edit",
    "/ui/access/mapping",
    "/ui/access/mapping/delete",
    "/ui/access/check",
    "/ui/access/resource",
    "/ui/access/resource/enabled",
    "/ui/access/resource/delete",
    "/ui/principal-propagation",
    "/ui/audit",
    "/ui/backup/download",
    "/ui/backup/restore",
    "/ui/ha/master",
    "/ui/ha/shadow",
    "/ui/ha/switch",
    "/ui/ha/connect",
    "/ui/ha/disconnect",
    "/ui/ha/role",
];

/// No page without a logon and no form without the session's CSRF token, for every route (a
/// route added without the guard fails here); a refused form changes nothing.
#[tokio::test]
async fn every_page_needs_a_session_and_every_form_its_csrf_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Browser::start(dir.path(), |_| {}).await;
    for path in PAGES {
        let p = b.get(path).await;
        assert_eq!((p.status, p.location.as_deref()), (StatusCode::SEE_OTHER, Some("/ui/login")), "GET {path}");
    }
    for path in FORMS {
        let p = b.post(path, &[("_csrf", "x"), ("connected", "false"), ("haEnabled", "on")]).await;
        assert_eq!((p.status, p.location.as_deref()), (StatusCode::SEE_OTHER, Some("/ui/login")), "POST {path}");
    }
    first_login(&mut b).await;
    for path in PAGES {
        let p = b.get(path).await;
        // The mapping form needs a subaccount; without one it sends the browser back to the list.
        let ok = p.status == StatusCode::OK
            || (*path == "/ui/access/mapping" && p.location.as_deref() == Some("/ui/access"));
        assert!(ok, "GET {path}: {} {:?}", p.status, p.location);
        assert!(!p.body.contains("manage\"") && !p.body.contains(NEW_PASSWORD), "GET {path} shows a password");
    }
    for path in FORMS {
        for csrf in [None, Some("forged")] {
            let mut form = vec![("old", NEW_PASSWORD), ("new", "another password"), ("repeat", "another password")];
            form.extend(csrf.map(|c| ("_csrf", c)));
            let p = b.post(path, &form).await;
            assert_eq!(p.status, StatusCode::FORBIDDEN, "POST {path} with CSRF token {csrf:?}");
        }
    }
    // The password did not change and the session is still there.
    assert_eq!(b.get("/ui/overview").await.status, StatusCode::OK);
    b.cookie = None;
    assert_eq!(b.login(NEW_PASSWORD).await.location.as_deref(), Some("/ui/overview"));
    b.stop().await;
}

async fn proxied_get(pair: &TunnelPair, location: &str, uri: &str) -> u16 {
    let s = TcpStream::connect(pair.http_addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(uri)
        .header("host", uri.split('/').nth(2).unwrap())
        .header("proxy-authorization", format!("Bearer {}", pair.token()))
        .header("sap-connectivity-scc-location_id", location)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    status
}

fn authentication_data(pair: &TunnelPair, location: &str) -> String {
    let id = pair.ca.issue_connector_cert(SUBACCOUNT, location, time::Duration::days(1)).unwrap();
    json!({"subaccount": SUBACCOUNT, "location_id": location, "certificate": id.cert_pem,
           "key": id.key_pem.expose(), "ca": pair.ca.cert_pem(), "tunnel": pair.tunnel_addr.to_string()})
    .to_string()
}

#[tokio::test]
async fn subaccount_mapping_resource_then_a_request_shows_in_audit_and_monitoring() {
    let pair = TunnelPair::start().await;
    let echo = EchoBackend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut b = Browser::start(dir.path(), |_| {}).await;
    first_login(&mut b).await;

    let p = b.submit("/ui/subaccounts", "/ui/subaccounts", &[("authenticationData", "")]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("Paste the authentication data."));
    let p = b.submit("/ui/subaccounts", "/ui/subaccounts", &[("authenticationData", "{\"x\": 1}")]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("is incomplete"), "the API's message is shown: {}", p.body);
    // Data that is refused is not shown again: it may hold the connection's private key.
    let keyed = json!({"key": "-----BEGIN PRIVATE KEY-----\nsecret-key-material\n"}).to_string();
    let p = b.submit("/ui/subaccounts", "/ui/subaccounts", &[("authenticationData", &keyed)]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(!p.body.contains("secret-key-material"), "{}", p.body);
    let data = authentication_data(&pair, "ui-loc");
    let p = b
        .submit(
            "/ui/subaccounts",
            "/ui/subaccounts",
            &[("authenticationData", &data), ("displayName", "<b>Lab</b> & co"), ("description", "")],
        )
        .await;
    assert_eq!(p.location.as_deref(), Some("/ui/subaccounts"), "{}", p.body);
    let p = b.get("/ui/subaccounts").await;
    assert!(p.body.contains("Subaccount added"));
    assert!(p.body.contains("&lt;b&gt;Lab&lt;/b&gt; &amp; co") && !p.body.contains("<b>Lab"), "values are escaped");
    pair.wait_connected("ui-loc").await;
    eventually!("the overview shows the tunnel connected with a heartbeat", {
        let body = b.get("/ui/overview").await.body;
        body.contains("badge ok\">Connected") && body.contains("<td class=\"heartbeat\">20")
    });

    let region = pair.tunnel_addr.to_string();
    let mapping_page = format!("/ui/access/mapping?r={region}&s={SUBACCOUNT}");
    let bad = [
        ("r", region.as_str()),
        ("s", SUBACCOUNT),
        ("orig", ""),
        ("backendType", "abapSys"),
        ("protocol", "HTTP"),
        ("virtualHost", "erp virtual"),
        ("virtualPort", "99999"),
        ("localHost", "127.0.0.1"),
        ("localPort", "80"),
        ("hostInHeader", "VIRTUAL"),
        ("authenticationMode", "NONE"),
    ];
    let p = b.submit(&mapping_page, "/ui/access/mapping", &bad).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("Use only letters, digits") && p.body.contains("between 1 and 65535"), "{}", p.body);
    let port = echo.addr.port().to_string();
    let mut good = bad;
    good[5] = ("virtualHost", "erp.virtual");
    good[6] = ("virtualPort", "80");
    good[8] = ("localPort", &port);
    let p = b.submit(&mapping_page, "/ui/access/mapping", &good).await;
    assert_eq!(p.location.as_deref(), Some("/ui/access"), "{}", p.body);
    // The edit form shows the stored values; the virtual address stays, the rest changes.
    let edit = b.get(&format!("{mapping_page}&id=erp.virtual:80")).await;
    assert!(edit.body.contains("value=\"erp.virtual\" readonly") && edit.body.contains(&format!("value=\"{port}\"")));
    let mut changed = good;
    changed[2] = ("orig", "erp.virtual:80");
    changed[9] = ("hostInHeader", "INTERNAL");
    let p = b.submit(&mapping_page, "/ui/access/mapping", &changed).await;
    assert_eq!(p.location.as_deref(), Some("/ui/access"), "{}", p.body);
    let edit = b.get(&format!("{mapping_page}&id=erp.virtual:80")).await;
    assert!(edit.body.contains("<option value=\"INTERNAL\" selected>"), "{}", edit.body);
    let id = [("r", region.as_str()), ("s", SUBACCOUNT), ("id", "erp.virtual:80")];
    let p = b.submit("/ui/access", "/ui/access/check", &id).await;
    assert_eq!(p.location.as_deref(), Some("/ui/access"));
    assert!(b.get("/ui/access").await.body.contains("is reachable"));
    let mut res = id.to_vec();
    res.extend([("path", "/sap"), ("exact", "false"), ("enabled", "true")]);
    b.submit("/ui/access", "/ui/access/resource", &res).await;
    let p = b.get("/ui/access").await;
    assert!(p.body.contains("Resource /sap added") && p.body.contains("<code>/sap</code>"), "{}", p.body);

    let audit = [("r", region.as_str()), ("s", SUBACCOUNT), ("level", "ALL")];
    b.submit("/ui/subaccounts", "/ui/subaccounts/audit", &audit).await;
    assert_eq!(proxied_get(&pair, "ui-loc", "http://erp.virtual:80/sap/ui-probe").await, 200);
    assert_eq!(proxied_get(&pair, "ui-loc", "http://erp.virtual:80/denied-probe").await, 403);
    eventually!("the audit viewer shows the allowed request", {
        let p = b.get("/ui/audit?kind=allowed&q=ui-probe").await;
        p.body.contains("/sap/ui-probe") && !p.body.contains("/denied-probe")
    });
    eventually!("the audit viewer shows the denied request", {
        let p = b.get("/ui/audit?kind=denied").await;
        p.body.contains("/denied-probe") && !p.body.contains("/sap/ui-probe")
    });
    let csv = b.get("/ui/audit.csv?q=probe").await;
    assert_eq!(csv.headers["content-type"], "text/csv; charset=utf-8");
    assert!(csv.body.starts_with("timestamp,event,") && csv.body.contains("/sap/ui-probe"), "{}", csv.body);

    let p = b.get("/ui/monitoring").await;
    for chart in ["chart-requests", "chart-bytes", "chart-denied", "chart-latency"] {
        let (_, rest) = p.body.split_once(&format!("id=\"{chart}\"")).expect(chart);
        let total: f64 = rest.split_once("data-total=\"").unwrap().1.split('"').next().unwrap().parse().unwrap();
        assert!(total > 0.0, "{chart} shows the requests");
    }

    // Disable the resource: the next request is denied.
    let mut toggle = id.to_vec();
    toggle.extend([("path", "/sap"), ("enabled", "false")]);
    b.submit("/ui/access", "/ui/access/resource/enabled", &toggle).await;
    assert_eq!(proxied_get(&pair, "ui-loc", "http://erp.virtual:80/sap/ui-probe").await, 403);
    let p = b.submit("/ui/access", "/ui/access/mapping/delete", &id).await;
    assert_eq!(p.location.as_deref(), Some("/ui/access"));
    assert!(b.get("/ui/access").await.body.contains("System mapping erp.virtual:80 deleted"));

    for page in ["/ui/principal-propagation", "/ui/ha", "/ui/backup"] {
        assert_eq!(b.get(page).await.status, StatusCode::OK, "{page}");
    }
    let p = b
        .submit(
            "/ui/principal-propagation",
            "/ui/principal-propagation",
            &[("certificateValidityInMin", "0"), ("expirationToleranceInHr", "2")],
        )
        .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("between 1 and 43200"));
    let p = b.submit("/ui/backup", "/ui/backup/download", &[("password", "backup-password")]).await;
    assert_eq!(p.status, StatusCode::OK);
    assert!(p.headers["content-disposition"].to_str().unwrap().contains("attachment"));

    let sub = [("r", region.as_str()), ("s", SUBACCOUNT)];
    // Disconnect (the page offers Connect then), connect again.
    let mut state = sub.to_vec();
    state.push(("connected", "false"));
    b.submit("/ui/subaccounts", "/ui/subaccounts/state", &state).await;
    let p = b.get("/ui/subaccounts").await;
    assert!(p.body.contains(&format!("Subaccount {SUBACCOUNT} disconnected.")), "{}", p.body);
    assert!(p.body.contains("name=\"connected\" value=\"true\""), "a Connect button: {}", p.body);
    state[2] = ("connected", "true");
    b.submit("/ui/subaccounts", "/ui/subaccounts/state", &state).await;
    assert!(b.get("/ui/subaccounts").await.body.contains(&format!("Subaccount {SUBACCOUNT} connected.")));
    pair.wait_connected("ui-loc").await;

    // Restore: a wrong password is refused and changes nothing; the right one brings back the
    // configuration of the backup (the subaccount deleted after it was taken).
    let p = b.submit("/ui/backup", "/ui/backup/download", &[("password", "backup-password")]).await;
    let backup = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &p.bytes);
    let p = b.submit("/ui/backup", "/ui/backup/restore", &[("backup", &backup), ("password", "wrong-password")]).await;
    assert_eq!(p.location.as_deref(), Some("/ui/backup"));
    let p = b.get("/ui/backup").await;
    assert!(p.body.contains("class=\"flash error\""), "{}", p.body);

    let mut renamed = sub.to_vec();
    renamed.extend([("displayName", "Renamed lab"), ("description", "")]);
    b.submit("/ui/subaccounts", "/ui/subaccounts/edit", &renamed).await;
    let p = b.get("/ui/subaccounts").await;
    assert!(p.body.contains("saved.") && p.body.contains("Renamed lab"), "{}", p.body);
    let p = b.submit("/ui/subaccounts", "/ui/subaccounts/delete", &sub).await;
    assert_eq!(p.location.as_deref(), Some("/ui/subaccounts"));
    assert!(b.get("/ui/subaccounts").await.body.contains("No subaccounts yet"));
    let p = b.submit("/ui/backup", "/ui/backup/restore", &[("backup", &backup), ("password", "backup-password")]).await;
    assert_eq!(p.location.as_deref(), Some("/ui/backup"));
    assert!(b.get("/ui/backup").await.body.contains("Configuration restored"));
    let p = b.get("/ui/subaccounts").await;
    assert!(p.body.contains("&lt;b&gt;Lab&lt;/b&gt; &amp; co"), "the backup's subaccount is back: {}", p.body);
    b.stop().await;
}
