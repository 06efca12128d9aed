//! `ferry connect <destination> --listen 127.0.0.1:PORT`: a local TCP port that leads to the
//! on-premise system behind a `TCP`, `LDAP` or `MAIL` destination, the way an app on SAP BTP
//! reaches it: destination-service token → `GET /destination-configuration/v1/destinations/{name}`
//! → connectivity token → SOCKS5 (method 0x80, JWT + location id) to the Connectivity Proxy →
//! tunnel → Cloud Connector → backend. Any client (`ldapsearch`, `curl smtp://…`, `psql`) then
//! talks to the local port; TLS between the client and the backend passes through untouched.
//!
//! Bindings, tokens and the SOCKS5 handshake come from `ferry_client`; the bindings from the
//! environment, else the `default-env.json` that `ferry up` writes. The destination is read once
//! at start; the connectivity token is fetched when needed and reused until shortly before it
//! expires.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_client::{Bindings, Client, Destination, MailProtocol, Options};
use ferry_core::Shutdown;
use serde_json::Value;
use tokio::net::TcpStream;

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
    /// File with the app environment (`{"VCAP_SERVICES": …}`), used when none of VCAP_SERVICES,
    /// VCAP_SERVICES_FILE_PATH and SERVICE_BINDING_ROOT is set.
    #[arg(long, default_value = "default-env.json")]
    env_file: PathBuf,
    /// PEM file of a CA to trust for the token and Destination Service URLs, besides the system's roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

/// The app's bindings: the environment when it has them (`VCAP_SERVICES`,
/// `VCAP_SERVICES_FILE_PATH`, `SERVICE_BINDING_ROOT`), else `env_file`.
pub(crate) fn load_bindings(env_file: &Path) -> anyhow::Result<Bindings> {
    let from_env = ["VCAP_SERVICES", "VCAP_SERVICES_FILE_PATH", "SERVICE_BINDING_ROOT"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if from_env {
        return Ok(Bindings::from_env()?);
    }
    Bindings::from_default_env_file(env_file)
        .with_context(|| format!("set VCAP_SERVICES or pass --env-file (now {})", env_file.display()))
}

pub async fn connect(args: ConnectArgs) -> anyhow::Result<()> {
    ferry_core::init_crypto();
    let bindings = load_bindings(&args.env_file)?;
    let extra_ca = match &args.ca_file {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?),
        None => None,
    };
    let client = Client::new(bindings, extra_ca.as_deref())?;
    let options = Options { no_cache: true, ..Default::default() };
    let destination = client.get_destination(&args.destination, &options).await?;
    let target = ferry_client::tcp_target(&Value::Object(destination.configuration.clone()), args.protocol)?;
    let proxy = client
        .bindings()
        .connectivity()?
        .socks5_proxy()
        .context("the connectivity binding has no onpremise_socks5_proxy_port")?;
    // Fail at start, not at the first connection, when the connectivity binding is unusable.
    client.connectivity_token(None).await?;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    let location = if target.location_id.is_empty() { "default".to_owned() } else { target.location_id.clone() };
    println!("destination {} → {target} (location {location}) via SOCKS5 proxy {proxy}", args.destination);
    println!("listening on {local}");
    println!("ready");

    let shutdown = Shutdown::new();
    let destination = Arc::new(destination);
    let protocol = args.protocol;
    let serving = tokio::spawn(ferry_core::serve::accept_loop(
        listener,
        ferry_core::serve::AcceptOptions::named("connect"),
        shutdown.clone(),
        move |stream, _peer| forward(stream, client.clone(), destination.clone(), protocol),
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
async fn forward(mut local: TcpStream, client: Client, destination: Arc<Destination>, protocol: Option<MailProtocol>) {
    let mut remote = match tokio::time::timeout(HANDSHAKE_TIMEOUT, client.connect_tcp(&destination, protocol)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // The local client only sees the connection close; the reason goes to the log.
            eprintln!("ferry connect: {e}");
            return;
        }
        Err(_) => {
            eprintln!("ferry connect: the SOCKS5 handshake did not finish within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut local, &mut remote).await {
        tracing::debug!(error = %e, "connection ended");
    }
}
