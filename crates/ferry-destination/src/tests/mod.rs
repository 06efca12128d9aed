//! Tests of the service as a whole: the API as values (`router.oneshot`), token retrieval
//! against a token endpoint on a real socket, and the database file on disk.
//!
//! Every test module runs twice: as declared here on SQLite, and in [`on_postgres`] on a fresh
//! database of a real PostgreSQL (`ferry_testkit::postgres`), where `Env` and `config` give
//! PostgreSQL instead of in-memory SQLite. `storage` is SQLite's own (it reads the file);
//! `postgres_storage` is PostgreSQL's.

mod api;
mod backend;
mod cert_generation;
mod certificates;
mod chain;
mod concurrency;
mod consume;
mod corporate_idp;
// PostgreSQL only: it restarts the server.
mod db_restart;
mod fragments;
mod labels;
mod lists;
mod oauth;
// PostgreSQL only: a server of its own with TLS.
mod postgres_tls;
mod saml;
mod storage;
mod user_flows;

// The same test files again, on PostgreSQL: loading them twice is the point.
#[allow(clippy::duplicate_mod)]
mod on_postgres;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use ferry_auth::{KeySet, Verifier};
use ferry_core::Secret;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::tokens::Clock;
use crate::{Config, DatabaseConfig, DestinationService};

pub(crate) const V1: &str = "/destination-configuration/v1";

/// A clock that only moves when told to.
pub(crate) struct ManualClock {
    start: Instant,
    offset: Mutex<Duration>,
}

impl ManualClock {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self { start: Instant::now(), offset: Mutex::new(Duration::ZERO) })
    }
    pub(crate) fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + *self.offset.lock().unwrap()
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

pub(crate) fn config(database: DatabaseConfig, key: [u8; 32]) -> Config {
    Config {
        database,
        master_key: Secret::new(key),
        token_fetch_timeout: Duration::from_secs(5),
        token_service_ca_pem: None,
    }
}

/// A database that outlives one service and can be shared by several: a SQLite file in `dir`.
pub(crate) fn persistent_database(dir: &std::path::Path) -> DatabaseConfig {
    DatabaseConfig::Sqlite { path: dir.join("destinations.db") }
}

/// A fresh database on the PostgreSQL server this test binary shares.
pub(crate) fn postgres_database() -> DatabaseConfig {
    DatabaseConfig::Postgres { url: Secret::new(ferry_testkit::postgres::Postgres::shared().database()) }
}

/// The test environment on SQLite.
pub(crate) type Env = EnvOn<false>;

/// A service with its router; `PG` picks the database `new` opens: in-memory SQLite or a fresh
/// PostgreSQL database.
pub(crate) struct EnvOn<const PG: bool> {
    pub keys: Arc<KeySet>,
    pub service: Arc<DestinationService>,
    pub router: Router,
    pub clock: Arc<ManualClock>,
}

pub(crate) struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
    pub json: Value,
}

/// A real Ferry token service on a socket (tenant `ZONE`, clients `sb-dest` with an instance and
/// `sb-app`, user `alice`) and a Destination Service that trusts it, with a client-credentials
/// token of `sb-dest`: for flows checked end to end against Ferry's own token service.
pub(crate) struct FerryTokens {
    pub env: Env,
    pub ts: Arc<ferry_auth::token_service::TokenService>,
    pub verifier: Arc<Verifier>,
    pub token_url: String,
    pub service_token: String,
    pub shutdown: ferry_core::Shutdown,
}

impl FerryTokens {
    pub(crate) const ZONE: &'static str = "6a8b7c4e-0000-4000-8000-000000000001";
    /// A second tenant, where the clients get subscriber tokens (`x-zid`).
    pub(crate) const SUBSCRIBER: &'static str = "9d2f1e3a-0000-4000-8000-000000000002";

    pub(crate) async fn start() -> Self {
        use ferry_auth::token_service::{self, Listeners, OAuthClient, Tenant, TokenService, TokenServiceConfig, User};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = |id: &str, secret: &str, instance: Option<&str>| OAuthClient {
            client_id: id.into(),
            client_secret: secret.into(),
            tenant_id: Self::ZONE.into(),
            xsappname: format!("{id}-app"),
            authorities: vec!["uaa.resource".into()],
            scopes: vec!["openid".into()],
            service_instance_id: instance.map(str::to_owned),
            ..Default::default()
        };
        let ts = TokenService::new(TokenServiceConfig {
            tenants: vec![
                Tenant {
                    id: Self::ZONE.into(),
                    subdomain: "provider".into(),
                    keys: Arc::new(KeySet::generate().unwrap()),
                },
                Tenant {
                    id: Self::SUBSCRIBER.into(),
                    subdomain: "subscriber".into(),
                    keys: Arc::new(KeySet::generate().unwrap()),
                },
            ],
            clients: vec![client("sb-dest", "dest-secret", Some("inst-1")), client("sb-app", "app-secret", None)],
            users: vec![User {
                username: "alice".into(),
                email: "alice@example.com".into(),
                user_id: "u-alice".into(),
                tenant_id: Self::ZONE.into(),
                ..Default::default()
            }],
            public_url: format!("http://{addr}"),
            uaadomain: format!("{addr}"),
            ..Default::default()
        })
        .unwrap();
        let shutdown = ferry_core::Shutdown::new();
        tokio::spawn(token_service::run(ts.clone(), Listeners { http: Some(listener), https: None }, shutdown.clone()));
        let verifier = Arc::new(ts.verifier());
        let http = ferry_core::tls::http_client(None).unwrap();
        let service =
            DestinationService::open(config(DatabaseConfig::SqliteMemory, [7; 32]), verifier.clone(), http.clone())
                .await
                .unwrap();
        // As `ferry up` does: the token service tells where each client lives.
        let zones = ts.clone();
        service.set_client_zones(Arc::new(move |client: &str| zones.client_tenant(client)));
        let env = Env {
            keys: Arc::new(KeySet::generate().unwrap()),
            router: service.router(),
            service,
            clock: ManualClock::new(),
        };
        let token_url = format!("http://{addr}/oauth/token");
        let answer: Value = http
            .post(&token_url)
            .form(&[("grant_type", "client_credentials"), ("client_id", "sb-dest"), ("client_secret", "dest-secret")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let service_token = answer["access_token"].as_str().unwrap().to_owned();
        Self { env, ts, verifier, token_url, service_token, shutdown }
    }
}

impl Resp {
    /// The message of an error answer, whichever shape SAP's document gives it for the route:
    /// `{"ErrorMessage": ...}` JSON or plain text.
    pub fn error(&self) -> &str {
        let json = self.headers.get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        if json {
            self.json["ErrorMessage"].as_str().unwrap_or_else(|| panic!("no ErrorMessage: {}", self.text))
        } else {
            &self.text
        }
    }
}

impl<const PG: bool> EnvOn<PG> {
    pub(crate) async fn new() -> Self {
        let database = if PG { postgres_database() } else { DatabaseConfig::SqliteMemory };
        Self::with_config(config(database, [42; 32])).await
    }

    pub(crate) async fn with_config(config: Config) -> Self {
        Self::try_with_config(config).await.unwrap()
    }

    pub(crate) async fn try_with_config(config: Config) -> Result<Self, crate::Error> {
        Self::try_with_keys(config, &[]).await
    }

    /// A service during a key rotation: `previous` open rows, `config.master_key` seals.
    pub(crate) async fn try_with_keys(config: Config, previous: &[Secret<[u8; 32]>]) -> Result<Self, crate::Error> {
        let keys = Arc::new(KeySet::generate().unwrap());
        let clock = ManualClock::new();
        let verifier = Arc::new(Verifier::local(keys.clone()));
        let http = ferry_core::tls::http_client(None).unwrap();
        let service = DestinationService::open_with_clock(config, previous, verifier, http, clock.clone()).await?;
        let router = service.router();
        Ok(Self { keys, service, router, clock })
    }

    /// A client-credentials token as XSUAA issues it for a destination binding.
    pub(crate) fn token(&self, zid: &str, client_id: &str) -> String {
        self.token_with(json!({
            "zid": zid, "client_id": client_id, "cid": client_id, "exp": now_secs() + 600,
            "grant_type": "client_credentials",
            "iss": format!("http://{zid}-sub.localhost:8080/oauth/token"),
            "ext_attr": {"enhancer": "XSUAA", "zdn": format!("{zid}-sub")}
        }))
    }

    pub(crate) fn token_with(&self, claims: Value) -> String {
        self.keys.sign(&claims, &[]).unwrap()
    }

    pub(crate) async fn call(&self, method: Method, uri: &str, token: Option<&str>, body: Option<Value>) -> Resp {
        let body = body.map(|b| b.to_string());
        self.call_raw(method, uri, token, body.as_deref(), &[]).await
    }

    pub(crate) async fn call_raw(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Body::from(body.unwrap_or_default().to_owned())).unwrap();
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp { status, headers, text, json }
    }

    /// Stores a destination through the API; panics unless it was created.
    pub(crate) async fn create(&self, token: &str, level: &str, dest: Value) {
        let r = self.call(Method::POST, &format!("{V1}/{level}Destinations"), Some(token), Some(dest)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }

    pub(crate) async fn find(&self, token: &str, name: &str, headers: &[(&str, &str)]) -> Resp {
        self.call_raw(Method::GET, &format!("{V1}/destinations/{name}"), Some(token), None, headers).await
    }
}

/// What the test token endpoint saw in one request.
#[derive(Clone, Debug)]
pub(crate) struct Recorded {
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub form: Vec<(String, String)>,
}

impl Recorded {
    pub(crate) fn form(&self, key: &str) -> Option<&str> {
        self.form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// How the test token endpoint answers.
#[derive(Clone)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub body: Value,
    pub delay: Duration,
}

/// A remote OAuth token endpoint on 127.0.0.1:0 that records and counts its calls.
pub(crate) struct TokenServer {
    pub addr: SocketAddr,
    scheme: &'static str,
    calls: Arc<Mutex<Vec<Recorded>>>,
    answer: Arc<Mutex<Answer>>,
}

impl TokenServer {
    pub(crate) async fn start() -> Self {
        Self::serve(None).await
    }

    /// The same endpoint over HTTPS with `identity` as its server certificate.
    pub(crate) async fn start_tls(identity: &ferry_core::tls::CertifiedKey) -> Self {
        Self::serve(Some(ferry_core::tls::server_config(identity, None, &[b"http/1.1"]).unwrap())).await
    }

    async fn serve(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let calls: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let answer = Arc::new(Mutex::new(Answer {
            status: StatusCode::OK,
            body: json!({"access_token": "remote-token-1", "token_type": "bearer", "expires_in": 3600}),
            delay: Duration::ZERO,
        }));
        let (c, a) = (calls.clone(), answer.clone());
        let app = Router::new().fallback(move |req: Request<Body>| {
            let (c, a) = (c.clone(), a.clone());
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body.collect().await.unwrap().to_bytes();
                let form = form_urlencoded::parse(&bytes).into_owned().collect();
                c.lock().unwrap().push(Recorded {
                    path: parts.uri.path().to_owned(),
                    query: parts.uri.query().map(str::to_owned),
                    headers: parts.headers,
                    form,
                });
                let answer = a.lock().unwrap().clone();
                tokio::time::sleep(answer.delay).await;
                (answer.status, axum::Json(answer.body))
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let options = ferry_core::serve::AcceptOptions::named("test-token-endpoint");
        tokio::spawn(ferry_core::serve::serve_router(listener, app, tls, options, ferry_core::Shutdown::new()));
        Self { addr, scheme, calls, answer }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    pub(crate) fn calls(&self) -> Vec<Recorded> {
        self.calls.lock().unwrap().clone()
    }

    pub(crate) fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    pub(crate) fn answer(&self, status: StatusCode, body: Value) {
        let mut a = self.answer.lock().unwrap();
        a.status = status;
        a.body = body;
    }

    pub(crate) fn delay(&self, delay: Duration) {
        self.answer.lock().unwrap().delay = delay;
    }
}
