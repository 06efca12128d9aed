//! `ferry connector run` and `ferry proxy`: the components as separate processes, as they run
//! in production (a connector on premises, proxy replicas in the cloud). Paths in their config
//! files are relative to the config file's folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_auth::{TrustedIssuer, Verifier};
use ferry_connector::{AccessRules, Connector, ConnectorConfig, SystemMapping};
use ferry_core::Shutdown;
use ferry_core::tls::{CertifiedKey, LocalCa};
use serde::Deserialize;

use crate::config::PrincipalPropagationEntry;

fn read(base: &Path, file: &Path) -> anyhow::Result<String> {
    let path = base.join(file);
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

fn load<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<(T, PathBuf)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let cfg = toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((cfg, base))
}

/// Trust in Ferry's token service from another process: its JWKS endpoint(s).
fn remote_verifier(urls: &[String], ca_file: Option<&Path>, base: &Path) -> anyhow::Result<Arc<Verifier>> {
    anyhow::ensure!(!urls.is_empty(), "token_keys_urls must name at least one JWKS endpoint of the token service");
    let ca = ca_file.map(|f| read(base, f)).transpose()?;
    let http = ferry_core::tls::http_client(ca.as_deref())?;
    Ok(Arc::new(Verifier::new(urls.iter().map(TrustedIssuer::jwks_url).collect(), http)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorFile {
    /// Tunnel endpoints of every proxy replica (`host:port`) for the connection configured in
    /// this file; empty when every subaccount is managed through the admin API.
    #[serde(default)]
    proxies: Vec<String>,
    /// Each entry of `proxies` stands for all the A/AAAA records of its host, one tunnel set per
    /// address, looked up again every `resolve_interval_seconds`.
    #[serde(default)]
    resolve_proxies: bool,
    /// Also for subaccounts of the admin API that set `resolveProxyReplicas`.
    #[serde(default = "resolve_interval_seconds")]
    resolve_interval_seconds: u64,
    /// Name on the proxies' server certificate.
    #[serde(default)]
    server_name: String,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    certificate_file: Option<PathBuf>,
    #[serde(default)]
    key_file: Option<PathBuf>,
    #[serde(default = "default_tunnel_connections")]
    connections: usize,
    /// At SIGTERM (and for a tunnel replaced after a renewal): how long open streams may take.
    #[serde(default = "drain_timeout_seconds")]
    drain_timeout_seconds: u64,
    #[serde(default)]
    audit_level: ferry_connector::audit::AuditLevel,
    #[serde(default)]
    audit_dir: Option<PathBuf>,
    /// Size at which an audit log file is rotated.
    #[serde(default = "audit_max_file_bytes")]
    audit_max_file_bytes: u64,
    /// Rotated audit log files kept per folder; 0 keeps all.
    #[serde(default = "audit_max_files")]
    audit_max_files: usize,
    /// Age (seconds) of its first record at which an audit log file is rotated; unset rotates by
    /// size only.
    #[serde(default)]
    audit_max_file_age_secs: Option<u64>,
    #[serde(default)]
    backend_ca_file: Option<PathBuf>,
    /// SAP's system certificate: PEM certificate and key presented to TLS backends.
    #[serde(default)]
    system_certificate_file: Option<PathBuf>,
    #[serde(default)]
    system_key_file: Option<PathBuf>,
    #[serde(default)]
    principal_propagation: Option<StandalonePp>,
    #[serde(default)]
    mappings: Vec<SystemMapping>,
    /// PING interval and answer timeout on each tunnel: a tunnel that loses packets silently is
    /// dropped and redialled after at most about twice this.
    #[serde(default = "heartbeat_seconds")]
    heartbeat_seconds: u64,
    /// Upper bound of the exponential backoff between redials of a lost tunnel.
    #[serde(default = "backoff_max_seconds")]
    backoff_max_seconds: u64,
    /// The administration REST API (SAP's Cloud Connector API) and the subaccounts it manages.
    #[serde(default)]
    admin: Option<AdminSection>,
}

/// One HTTP/2 connection is driven by one task, so all streams of a tunnel are framed and
/// encrypted on one core at a time in each process; a tunnel per core (2 to 4) lets both ends
/// use the cores they have, and a lost connection leaves the others serving.
fn default_tunnel_connections() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 4)
}

fn resolve_interval_seconds() -> u64 {
    30
}

fn drain_timeout_seconds() -> u64 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminSection {
    #[serde(default = "localhost")]
    host: String,
    #[serde(default = "admin_port")]
    port: u16,
    /// Configuration, keys, UI certificate and (unless `audit_dir` is set) audit logs.
    #[serde(default = "admin_data_dir")]
    data_dir: PathBuf,
    /// Names on the self-signed UI certificate, besides `localhost` and `127.0.0.1`.
    #[serde(default)]
    ui_names: Vec<String>,
    /// Extra trust for LDAPS logon hosts.
    #[serde(default)]
    ldap_ca_file: Option<PathBuf>,
    /// Fraction of a subaccount certificate's lifetime after which it is renewed.
    #[serde(default = "certificate_renew_at")]
    certificate_renew_at: f64,
    /// Address the service channels' local ports listen on.
    #[serde(default = "all_interfaces")]
    channel_host: String,
    /// Extra trust (PEM) for the region host (Ferry's token service HTTPS) when subaccounts are
    /// added with `cloudUser`/`cloudPassword`.
    #[serde(default)]
    region_ca_file: Option<PathBuf>,
    /// Connections one client address may hold open on the admin port (0 = no cap).
    #[serde(default = "admin_connections_per_client")]
    max_connections_per_client: usize,
}

fn all_interfaces() -> String {
    "0.0.0.0".into()
}

fn admin_connections_per_client() -> usize {
    64
}

fn certificate_renew_at() -> f64 {
    2.0 / 3.0
}

fn audit_max_file_bytes() -> u64 {
    ferry_connector::audit::AuditConfig::default().max_file_bytes
}

fn audit_max_files() -> usize {
    ferry_connector::audit::AuditConfig::default().max_files
}

fn admin_port() -> u16 {
    ferry_connector::admin::DEFAULT_PORT
}
fn admin_data_dir() -> PathBuf {
    "scc-data".into()
}

/// Principal propagation for a standalone connector: where to verify user tokens, and the CA
/// that issues user certificates.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StandalonePp {
    token_keys_urls: Vec<String>,
    #[serde(default)]
    token_ca_file: Option<PathBuf>,
    ca_certificate_file: PathBuf,
    ca_key_file: PathBuf,
    #[serde(flatten)]
    settings: PrincipalPropagationEntry,
}

impl ConnectorFile {
    /// What can be checked without reading the files it names or touching the network.
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.proxies.is_empty() || self.admin.is_some(),
            "proxies must name at least one proxy tunnel endpoint, or [admin] must enable the admin API"
        );
        anyhow::ensure!(
            self.system_certificate_file.is_some() == self.system_key_file.is_some(),
            "system_certificate_file and system_key_file go together"
        );
        anyhow::ensure!(self.audit_max_file_age_secs != Some(0), "audit_max_file_age_secs must be at least 1");
        anyhow::ensure!(self.resolve_interval_seconds > 0, "resolve_interval_seconds must be at least 1");
        Ok(())
    }
}

/// `ferry check-config connector`: parses and checks `config` as `ferry connector run` would.
pub fn check_connector(config: &Path) -> anyhow::Result<()> {
    let (cfg, _): (ConnectorFile, PathBuf) = load(config)?;
    cfg.check()
}

pub async fn connector(config: &Path) -> anyhow::Result<()> {
    ferry_core::init_crypto();
    let (cfg, base): (ConnectorFile, PathBuf) = load(config)?;
    cfg.check()?;
    let backend_ca_pem = cfg.backend_ca_file.as_ref().map(|f| read(&base, f)).transpose()?;
    let system_certificate = match (&cfg.system_certificate_file, &cfg.system_key_file) {
        (Some(cert), Some(key)) => {
            Some(CertifiedKey { cert_pem: read(&base, cert)?, key_pem: read(&base, key)?.into() })
        }
        _ => None,
    };
    let audit_dir = base.join(cfg.audit_dir.clone().unwrap_or_else(|| "audit".into()));
    let audit = ferry_connector::audit::AuditConfig {
        level: cfg.audit_level,
        dir: Some(audit_dir.clone()),
        max_file_bytes: cfg.audit_max_file_bytes,
        max_files: cfg.audit_max_files,
        max_file_age: cfg.audit_max_file_age_secs.map(Duration::from_secs),
    };
    let principal = match &cfg.principal_propagation {
        Some(pp) => {
            let verifier = remote_verifier(&pp.token_keys_urls, pp.token_ca_file.as_deref(), &base)?;
            let ca = LocalCa::from_pem(&read(&base, &pp.ca_certificate_file)?, &read(&base, &pp.ca_key_file)?)?;
            let mut p = ferry_connector::PrincipalPropagation::new(verifier, Arc::new(ca));
            p.subject_pattern = pp.settings.subject_pattern.clone();
            p.certificate_validity = Duration::from_secs(u64::from(pp.settings.certificate_validity_minutes) * 60);
            p.expiration_tolerance = Duration::from_secs(u64::from(pp.settings.expiration_tolerance_hours) * 3600);
            Some(Arc::new(p))
        }
        None => None,
    };
    let resolve_interval = Duration::from_secs(cfg.resolve_interval_seconds);
    let shutdown = Shutdown::new();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some((first, more)) = cfg.proxies.split_first() {
        let file = |f: &Option<PathBuf>, key: &str| {
            f.as_ref().with_context(|| format!("{key} is required with proxies")).and_then(|f| read(&base, f))
        };
        let identity = CertifiedKey {
            cert_pem: file(&cfg.certificate_file, "certificate_file")?,
            key_pem: file(&cfg.key_file, "key_file")?.into(),
        };
        let mut cc = ConnectorConfig::new(
            first.clone(),
            cfg.server_name.clone(),
            file(&cfg.ca_file, "ca_file")?,
            identity,
            AccessRules::new(cfg.mappings.clone()),
        );
        cc.more_proxy_addrs = more.to_vec();
        cc.resolve_replicas = cfg.resolve_proxies.then_some(resolve_interval);
        cc.connections = cfg.connections.max(1);
        cc.drain_timeout = Duration::from_secs(cfg.drain_timeout_seconds);
        cc.heartbeat = heartbeat(cfg.heartbeat_seconds)?;
        cc.backoff_max = Duration::from_secs(cfg.backoff_max_seconds.max(1));
        cc.audit = ferry_connector::audit::AuditConfig { level: cfg.audit_level, ..audit.clone() };
        cc.backend_ca_pem = backend_ca_pem.clone();
        cc.system_certificate = system_certificate.clone();
        cc.principal_propagation = principal.clone();
        let connector = Arc::new(Connector::new(cc)?);
        let mut status = connector.status();
        tasks.spawn(connector.run(shutdown.clone()));
        tokio::spawn(async move {
            while status.changed().await.is_ok() {
                let s = *status.borrow();
                eprintln!("tunnels connected: {}", s.connected);
            }
        });
    }
    if let Some(a) = &cfg.admin {
        let mut ac = ferry_connector::admin::AdminConfig::new(base.join(&a.data_dir));
        ac.audit_dir = Some(audit_dir);
        ac.audit = audit;
        ac.ui_names.extend(a.ui_names.iter().cloned());
        ac.ldap_ca_file = a.ldap_ca_file.as_ref().map(|f| base.join(f));
        if !(a.certificate_renew_at > 0.0 && a.certificate_renew_at < 1.0) {
            anyhow::bail!("[admin] certificate_renew_at must be a fraction between 0 and 1, e.g. 0.67");
        }
        ac.renew_at = a.certificate_renew_at;
        ac.max_connections_per_client = a.max_connections_per_client;
        ac.connection.connections = cfg.connections.max(1);
        ac.connection.resolve_interval = resolve_interval;
        ac.connection.drain_timeout = Duration::from_secs(cfg.drain_timeout_seconds);
        ac.connection.backend_ca_pem = backend_ca_pem;
        ac.connection.system_certificate = system_certificate;
        ac.connection.principal_propagation = principal;
        ac.connection.channel_host = a.channel_host.clone();
        ac.region_ca_pem = a.region_ca_file.as_ref().map(|f| read(&base, f)).transpose()?;
        let listener = ferry_core::serve::bind(&format!("{}:{}", a.host, a.port)).await?;
        let addr = listener.local_addr()?;
        let admin = ferry_connector::admin::Admin::start(ac, shutdown.clone()).await?;
        println!(
            "admin API: https://{addr}  (UI certificate CA: {})",
            base.join(&a.data_dir).join("ui-ca.pem").display()
        );
        tasks.spawn(admin.serve(listener, shutdown.clone()));
    }
    println!("ready");
    crate::up::wait_for_signal().await;
    shutdown.cancel();
    // The tunnels close themselves by the drain deadline; the margin is for the rest.
    let limit = Duration::from_secs(cfg.drain_timeout_seconds.saturating_add(5));
    let _ = tokio::time::timeout(limit, async { while tasks.join_next().await.is_some() {} }).await;
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyFile {
    #[serde(default = "localhost")]
    host: String,
    #[serde(default = "http_port")]
    http_port: u16,
    #[serde(default = "socks5_port")]
    socks5_port: u16,
    #[serde(default = "tunnel_port")]
    tunnel_port: u16,
    /// Server certificate and key of the tunnel endpoint.
    certificate_file: PathBuf,
    key_file: PathBuf,
    /// The CA that issues connector certificates (enrollment).
    connector_ca_file: PathBuf,
    /// JWKS endpoints of the token service(s) whose tokens apps present.
    token_keys_urls: Vec<String>,
    #[serde(default)]
    token_ca_file: Option<PathBuf>,
    /// Open connections allowed per listener.
    #[serde(default = "max_connections")]
    max_connections: usize,
    /// How long a request waits for a connector's next tunnel while its tunnel drains.
    #[serde(default = "tunnel_swap_wait_seconds")]
    tunnel_swap_wait_seconds: u64,
    /// Connections one client address may hold open on the HTTP and on the SOCKS5 port (0 = no
    /// cap).
    #[serde(default = "max_connections_per_client")]
    max_connections_per_client: usize,
    /// Tunnel streams (HTTP requests, SOCKS5 connections, service channel streams) one subaccount
    /// may have open at once across its connectors.
    #[serde(default = "max_streams_per_subaccount")]
    max_streams_per_subaccount: usize,
    /// PING interval and answer timeout on each tunnel: requests on a tunnel that loses packets
    /// silently fail, and the tunnel leaves the registry, after at most about twice this.
    #[serde(default = "heartbeat_seconds")]
    heartbeat_seconds: u64,
    /// Benchmark/development mode, not for production: SOCKS5 without authentication.
    #[serde(default)]
    bench_socks5_no_auth: Option<BenchNoAuth>,
    /// Cloud-side services Cloud Connectors' service channels may reach, per subaccount.
    #[serde(default)]
    channel_targets: Vec<ferry_proxy::ChannelTarget>,
}

/// A loopback-only SOCKS5 listener that accepts method 0x00 (no authentication) and sends every
/// connection to one (subaccount, location id), so generic SOCKS5 load generators, which cannot
/// speak SAP's method 0x80, can drive the tunnel. Whoever reaches it acts as that subaccount.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BenchNoAuth {
    /// `127.0.0.1:port` or `[::1]:port`; any other address is refused at start-up.
    listen: std::net::SocketAddr,
    subaccount: String,
    #[serde(default)]
    location: String,
}

fn max_connections() -> usize {
    10_000
}

fn tunnel_swap_wait_seconds() -> u64 {
    5
}

fn max_connections_per_client() -> usize {
    1_000
}

fn max_streams_per_subaccount() -> usize {
    ferry_proxy::ProxyConfig::DEFAULT_MAX_STREAMS_PER_SUBACCOUNT
}

fn heartbeat_seconds() -> u64 {
    20
}

fn backoff_max_seconds() -> u64 {
    30
}

fn heartbeat(seconds: u64) -> anyhow::Result<Duration> {
    anyhow::ensure!(seconds > 0, "heartbeat_seconds must be at least 1");
    Ok(Duration::from_secs(seconds))
}

fn localhost() -> String {
    "127.0.0.1".into()
}
fn http_port() -> u16 {
    20003
}
fn socks5_port() -> u16 {
    20004
}
fn tunnel_port() -> u16 {
    20005
}

impl ProxyFile {
    /// What can be checked without reading the files it names or touching the network.
    fn check(&self) -> anyhow::Result<()> {
        if let Some(b) = &self.bench_socks5_no_auth {
            anyhow::ensure!(
                b.listen.ip().is_loopback(),
                "bench_socks5_no_auth.listen = {}: the SOCKS5 listener without authentication may only listen on a \
                 loopback address (127.0.0.1 or [::1]); it is a benchmark mode, not for production",
                b.listen
            );
            anyhow::ensure!(!b.subaccount.is_empty(), "bench_socks5_no_auth.subaccount must name the subaccount id");
        }
        anyhow::ensure!(
            !self.token_keys_urls.is_empty(),
            "token_keys_urls must name at least one JWKS endpoint of the token service"
        );
        Ok(())
    }
}

/// `ferry check-config proxy`: parses and checks `config` as `ferry proxy` would.
pub fn check_proxy(config: &Path) -> anyhow::Result<()> {
    let (cfg, _): (ProxyFile, PathBuf) = load(config)?;
    cfg.check()
}

pub async fn proxy(config: &Path) -> anyhow::Result<()> {
    ferry_core::init_crypto();
    let (cfg, base): (ProxyFile, PathBuf) = load(config)?;
    cfg.check()?;
    let verifier = remote_verifier(&cfg.token_keys_urls, cfg.token_ca_file.as_deref(), &base)?;
    let identity =
        CertifiedKey { cert_pem: read(&base, &cfg.certificate_file)?, key_pem: read(&base, &cfg.key_file)?.into() };
    let tls = ferry_core::tls::server_config(
        &identity,
        Some(&read(&base, &cfg.connector_ca_file)?),
        &[ferry_proto::tunnel::ALPN],
    )?;
    let bind = |port: u16| format!("{}:{port}", cfg.host);
    let (http, socks, tunnel) = (
        ferry_core::serve::bind(&bind(cfg.http_port)).await?,
        ferry_core::serve::bind(&bind(cfg.socks5_port)).await?,
        ferry_core::serve::bind(&bind(cfg.tunnel_port)).await?,
    );
    println!("proxy: http {} socks5 {} tunnel {}", http.local_addr()?, socks.local_addr()?, tunnel.local_addr()?);
    let mut pc = ferry_proxy::ProxyConfig::new(verifier, tls);
    pc.max_connections = cfg.max_connections;
    pc.tunnel_swap_wait = Duration::from_secs(cfg.tunnel_swap_wait_seconds);
    pc.channel_targets =
        ferry_proxy::ChannelTargets::new(cfg.channel_targets.iter().cloned()).context("[[channel_targets]]")?;
    pc.max_connections_per_client = cfg.max_connections_per_client;
    anyhow::ensure!(cfg.max_streams_per_subaccount > 0, "max_streams_per_subaccount must be at least 1");
    pc.max_streams_per_subaccount = cfg.max_streams_per_subaccount;
    pc.heartbeat = heartbeat(cfg.heartbeat_seconds)?;
    let mut no_auth = None;
    if let Some(b) = &cfg.bench_socks5_no_auth {
        let l = ferry_core::serve::bind(&b.listen.to_string()).await?;
        pc.socks5_no_auth =
            Some(ferry_proxy::NoAuthRoute { subaccount: b.subaccount.clone(), location: b.location.clone() });
        ferry_proxy::check_no_auth(&l, pc.socks5_no_auth.as_ref())?;
        println!(
            "proxy: socks5 WITHOUT authentication {} for subaccount {} (benchmark mode, not for production)",
            l.local_addr()?,
            b.subaccount
        );
        no_auth = Some(l);
    }
    println!("ready");
    let proxy = ferry_proxy::Proxy::new(pc);
    let shutdown = Shutdown::new();
    let task = tokio::spawn(proxy.run(
        ferry_proxy::Listeners { http: Some(http), socks5: Some(socks), tunnel: Some(tunnel), socks5_no_auth: no_auth },
        shutdown.clone(),
    ));
    crate::up::wait_for_signal().await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
    Ok(())
}
