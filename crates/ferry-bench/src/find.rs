//! The Destination Service's find API under load (on SQLite and on PostgreSQL), next to nginx serving the same bytes as a
//! static file in the same run (the anchor: what a good HTTP server does with no work at all).
//!
//! The destination is `OAuth2ClientCredentials` against Ferry's token service on a real socket;
//! the first find fetches the token and every later one is served from the token cache, so
//! the figure is the cost of authenticating the caller, reading and decrypting the stored
//! destination and answering with its cached token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_auth::KeySet;
use ferry_auth::token_service::{OAuthClient, Tenant, TokenService, TokenServiceConfig};
use ferry_core::Shutdown;
use ferry_core::serve::{AcceptOptions, serve_router};
use ferry_destination::{Config, DatabaseConfig, DestinationService};
use ferry_testkit::nginx::Nginx;
use serde_json::json;
use tokio::net::TcpListener;

use crate::{HttpResult, http_load, median};

const ZID: &str = "0a0b0c0d-0000-4000-8000-000000000002";
const PATH: &str = "/destination-configuration/v1/destinations/bench";

pub async fn run(secs: u64, conns: usize, reps: usize) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    let keys = Arc::new(KeySet::generate()?);
    let tokens = TokenService::new(TokenServiceConfig {
        tenants: vec![Tenant { id: ZID.into(), subdomain: "bench".into(), keys: keys.clone() }],
        clients: vec![
            client("sb-dest!b1", "dest-secret"),
            // The destination's own OAuth client at the token service.
            client("sb-backend!b2", "backend-secret"),
        ],
        public_url: "http://127.0.0.1:18081".into(),
        uaadomain: "127.0.0.1:18443".into(),
        ..Default::default()
    })?;
    let token_listener = TcpListener::bind("127.0.0.1:0").await?;
    let token_addr = token_listener.local_addr()?;
    tokio::spawn(serve_router(
        token_listener,
        tokens.router(),
        None,
        AcceptOptions::named("token-service"),
        shutdown.clone(),
    ));

    // A real PostgreSQL in a temp folder, as in the tests (stopped when dropped).
    let postgres = tokio::task::spawn_blocking(ferry_testkit::postgres::Postgres::start).await?;
    let pg_url = postgres.database();
    let dir = std::env::temp_dir().join(format!("ferry-bench-find-{}", std::process::id()));
    let verifier = Arc::new(tokens.verifier());
    let sqlite = serve(DatabaseConfig::Sqlite { path: dir.join("destinations.db") }, &verifier, token_addr, &shutdown);
    let sqlite = sqlite.await?;
    let pg = serve(DatabaseConfig::Postgres { url: ferry_core::Secret::new(pg_url) }, &verifier, token_addr, &shutdown);
    let pg = pg.await?;

    let caller = caller_token(token_addr).await?;
    let auth = vec![("authorization".to_owned(), format!("Bearer {caller}"))];
    // The exact answer, token included, becomes nginx's static file.
    let answer = reqwest_get(sqlite, &caller).await?;
    anyhow::ensure!(answer.contains("\"authTokens\"") && !answer.contains("\"error\""), "find failed: {answer}");
    reqwest_get(pg, &caller).await?;
    let nginx = Nginx::start(
        "listen 127.0.0.1:{PORT};\nkeepalive_requests 1000000;\nlocation = /find.json { root {DIR}; default_type application/json; }",
        &[("find.json", &answer)],
    );

    let (mut anchor, mut on_sqlite, mut on_pg) = (Vec::<HttpResult>::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        eprintln!("rep {}/{}", rep + 1, reps);
        anchor.push(http_load(nginx.addr, "/find.json".into(), Vec::new(), conns, secs).await);
        on_sqlite.push(http_load(sqlite, PATH.into(), auth.clone(), conns, secs).await);
        on_pg.push(http_load(pg, PATH.into(), auth.clone(), conns, secs).await);
    }
    let rps = |v: &[HttpResult]| median(v.iter().map(|r| r.rps).collect());
    let p99 = |v: &[HttpResult]| median(v.iter().map(|r| r.p99_ms).collect());
    println!("| find, OAuth2ClientCredentials, cached token, {conns} conns | requests/s | ratio to nginx | p99 |");
    println!("|---|---|---|---|");
    println!(
        "| nginx, the same answer as a static file (anchor) | {:.0} | 1.00 | {:.2} ms |",
        rps(&anchor),
        p99(&anchor)
    );
    for (name, v) in [("Ferry, SQLite", &on_sqlite), ("Ferry, PostgreSQL", &on_pg)] {
        println!("| {name} | {:.0} | {:.2} | {:.2} ms |", rps(v), rps(v) / rps(&anchor), p99(v));
    }
    println!("({secs} s per measurement, median of {reps} reps, load generator and servers on the same cores)");
    shutdown.cancel();
    drop(nginx);
    drop(postgres);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A Destination Service on `database` holding the benchmark's destination, on a free port.
async fn serve(
    database: DatabaseConfig,
    verifier: &Arc<ferry_auth::Verifier>,
    token_addr: SocketAddr,
    shutdown: &Shutdown,
) -> anyhow::Result<SocketAddr> {
    let config = Config {
        database,
        master_key: ferry_core::Secret::new([7; 32]),
        token_fetch_timeout: Duration::from_secs(5),
        token_service_ca_pem: None,
    };
    let service = DestinationService::open(config, verifier.clone(), ferry_core::tls::http_client(None)?).await?;
    let destination = serde_json::from_value(json!({
        "Name": "bench", "Type": "HTTP", "URL": "https://backend.example/api", "ProxyType": "Internet",
        "Authentication": "OAuth2ClientCredentials",
        "tokenServiceURL": format!("http://{token_addr}/oauth/token"),
        "clientId": "sb-backend!b2", "clientSecret": "backend-secret",
    }))?;
    service.upsert(ZID, None, destination).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(ferry_destination::run(service, listener, shutdown.clone()));
    Ok(addr)
}

fn client(id: &str, secret: &str) -> OAuthClient {
    OAuthClient {
        client_id: id.into(),
        client_secret: secret.into(),
        tenant_id: ZID.into(),
        xsappname: id.replace("sb-", ""),
        authorities: vec!["uaa.resource".into()],
        ..Default::default()
    }
}

async fn caller_token(token_addr: SocketAddr) -> anyhow::Result<String> {
    let resp = ferry_core::tls::http_client(None)?
        .post(format!("http://{token_addr}/oauth/token"))
        .basic_auth("sb-dest!b1", Some("dest-secret"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await?
        .error_for_status()?;
    let v: serde_json::Value = resp.json().await?;
    v["access_token"].as_str().map(str::to_owned).ok_or_else(|| anyhow::anyhow!("no access_token in {v}"))
}

async fn reqwest_get(addr: SocketAddr, token: &str) -> anyhow::Result<String> {
    Ok(ferry_core::tls::http_client(None)?
        .get(format!("http://{addr}{PATH}"))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}
