//! `ferry connect <destination> --listen 127.0.0.1:PORT`: a local TCP port that leads to the
//! on-premise system behind a `TCP`, `LDAP` or `MAIL` destination, the way an app on SAP BTP
//! reaches it: destination-service token → `GET /destination-configuration/v1/destinations/{name}`
//! → connectivity token → SOCKS5 (method 0x80, JWT + location id) to the Connectivity Proxy →
//! tunnel → Cloud Connector → backend. Any client (`ldapsearch`, `curl smtp://…`, `psql`) then
//! talks to the local port; TLS between the client and the backend passes through untouched.
//!
//! The bindings come from `VCAP_SERVICES` (the variable, else the `default-env.json` that
//! `ferry up` writes). The destination is read once at start; the connectivity token is fetched
//! when needed and reused until shortly before it expires.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_client::{MailProtocol, TcpTarget};
use ferry_core::Shutdown;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

#[derive(clap::Args, Debug)]
pub struct ConnectArgs {
    /// Name of a TCP, LDAP or MAIL destination with ProxyType OnPremise.
    destination: String,
    /// Local address to accept connections on (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// MAIL destinations: which service to reach (smtp, imap, pop3). Default: the destination's
    /// mail.transport.protocol, else the first of smtp, imap, pop3 it names a host for.
    #[arg(long)]
    protocol: Option<MailProtocol>,
    /// File with the app environment (`{"VCAP_SERVICES": …}`), used when the VCAP_SERVICES
    /// variable is not set.
    #[arg(long, default_value = "default-env.json")]
    env_file: PathBuf,
    /// PEM file of a CA to trust for the token and Destination Service URLs, besides the system's roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

/// The `credentials` of the first binding of service `label`.
fn credentials<'a>(vcap: &'a Value, label: &str) -> anyhow::Result<&'a Value> {
    vcap.get(label)
        .and_then(|b| b.get(0))
        .and_then(|b| b.get("credentials"))
        .with_context(|| format!("VCAP_SERVICES has no {label} binding with credentials"))
}

fn text(creds: &Value, label: &str, key: &str) -> anyhow::Result<String> {
    match creds.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => bail!("the {label} credentials have no {key}"),
    }
}

fn load_vcap(env_file: &std::path::Path) -> anyhow::Result<Value> {
    if let Ok(v) = std::env::var("VCAP_SERVICES") {
        return serde_json::from_str(&v).context("VCAP_SERVICES is not valid JSON");
    }
    let raw = std::fs::read(env_file)
        .with_context(|| format!("cannot read {} (set VCAP_SERVICES or pass --env-file)", env_file.display()))?;
    let env: Value =
        serde_json::from_slice(&raw).with_context(|| format!("{} is not valid JSON", env_file.display()))?;
    env.get("VCAP_SERVICES").cloned().with_context(|| format!("{} has no VCAP_SERVICES", env_file.display()))
}

/// Client-credentials tokens of one binding, reused while they have a minute or more left.
struct TokenSource {
    http: reqwest::Client,
    url: String,
    client_id: String,
    client_secret: ferry_core::Secret<String>,
    cached: Mutex<Option<(String, Instant)>>,
}

impl TokenSource {
    fn new(http: reqwest::Client, creds: &Value, label: &str) -> anyhow::Result<Self> {
        let base = text(creds, label, "url")?;
        Ok(Self {
            http,
            url: format!("{}/oauth/token", base.trim_end_matches('/')),
            client_id: text(creds, label, "clientid")?,
            client_secret: ferry_core::Secret::new(text(creds, label, "clientsecret")?),
            cached: Mutex::new(None),
        })
    }

    async fn token(&self) -> anyhow::Result<String> {
        let mut cached = self.cached.lock().await;
        if let Some((token, valid_until)) = cached.as_ref()
            && Instant::now() + Duration::from_secs(60) < *valid_until
        {
            return Ok(token.clone());
        }
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose().as_str()),
        ];
        let resp = self.http.post(&self.url).form(&form).send().await.with_context(|| format!("POST {}", self.url))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let Some(token) = body.get("access_token").and_then(Value::as_str) else {
            bail!("the token service at {} answered {status}: {body}", self.url);
        };
        let lifetime = body.get("expires_in").and_then(Value::as_u64).unwrap_or(0);
        *cached = Some((token.to_owned(), Instant::now() + Duration::from_secs(lifetime)));
        Ok(token.to_owned())
    }
}

async fn find_destination(http: &reqwest::Client, creds: &Value, token: &str, name: &str) -> anyhow::Result<Value> {
    let base = text(creds, "destination", "uri")?;
    let url = format!("{}/destination-configuration/v1/destinations/{name}", base.trim_end_matches('/'));
    let resp = http.get(&url).bearer_auth(token).send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("the Destination Service answered {status} for destination {name:?}: {body}");
    }
    body.get("destinationConfiguration")
        .cloned()
        .with_context(|| format!("the Destination Service's answer for {name:?} has no destinationConfiguration"))
}

pub async fn connect(args: ConnectArgs) -> anyhow::Result<()> {
    ferry_core::init_crypto();
    let vcap = load_vcap(&args.env_file)?;
    let extra_ca = match &args.ca_file {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?),
        None => None,
    };
    let http = ferry_core::tls::http_client(extra_ca.as_deref())?;
    let dest_creds = credentials(&vcap, "destination")?;
    let conn_creds = credentials(&vcap, "connectivity")?;
    let dest_tokens = TokenSource::new(http.clone(), dest_creds, "destination")?;
    let config = find_destination(&http, dest_creds, &dest_tokens.token().await?, &args.destination).await?;
    let target = ferry_client::tcp_target(&config, args.protocol)?;
    let proxy = format!(
        "{}:{}",
        text(conn_creds, "connectivity", "onpremise_proxy_host")?,
        text(conn_creds, "connectivity", "onpremise_socks5_proxy_port")?
    );
    let conn_tokens = Arc::new(TokenSource::new(http, conn_creds, "connectivity")?);
    // Fail at start, not at the first connection, when the connectivity binding is unusable.
    conn_tokens.token().await?;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    let location = if target.location_id.is_empty() { "default".to_owned() } else { target.location_id.clone() };
    println!("destination {} → {target} (location {location}) via SOCKS5 proxy {proxy}", args.destination);
    println!("listening on {local}");
    println!("ready");

    let shutdown = Shutdown::new();
    let target = Arc::new(target);
    let proxy = Arc::new(proxy);
    let serving = tokio::spawn(ferry_core::serve::accept_loop(
        listener,
        ferry_core::serve::AcceptOptions::named("connect"),
        shutdown.clone(),
        move |stream, _peer| forward(stream, proxy.clone(), conn_tokens.clone(), target.clone()),
    ));
    crate::up::wait_for_signal().await;
    shutdown.cancel();
    let _ = serving.await;
    Ok(())
}

/// Upper bound for the proxy's answer (it includes the connector's connect to the backend).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// One local connection: SOCKS5 through the proxy, then bytes both ways; each direction is
/// half-closed when its source ends, so request/response protocols that signal the end of a
/// request by shutting down their write side work.
async fn forward(mut local: TcpStream, proxy: Arc<String>, tokens: Arc<TokenSource>, target: Arc<TcpTarget>) {
    let token = match tokens.token().await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot get a connectivity token");
            return;
        }
    };
    let connecting = ferry_client::connect_tcp(proxy.as_str(), &token, &target.location_id, &target.host, target.port);
    let mut remote = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // The local client only sees the connection close; the reason goes to the log.
            eprintln!("ferry connect: {e}");
            return;
        }
        Err(_) => {
            eprintln!("ferry connect: the SOCKS5 handshake with {proxy} did not finish within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut local, &mut remote).await {
        tracing::debug!(error = %e, "connection ended");
    }
}
