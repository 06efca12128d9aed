//! `ferry up`: the whole stack in one process, for a laptop or CI.
//!
//! Everything it generates (CA, signing keys, master key, subaccount id, client secrets, the
//! SQLite database) lives in the data folder and is reused on the next start, so bindings an app
//! was given stay valid and a restart is fast.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_auth::token_service::{self, GRANT_CLIENT_CREDENTIALS, OAuthClient, TokenService, TokenServiceConfig, User};
use ferry_auth::{KeySet, TrustedIssuer, Verifier};
use ferry_connector::{AccessRules, Connector, ConnectorConfig};
use ferry_core::tls::LocalCa;
use ferry_core::{Secret, Shutdown};
use ferry_directory::{Directory, DirectoryError, Endpoints, NewKey, Service};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::config::{ClientEntry, FileConfig, Level};

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Configuration file (TOML): listeners, bindings, users, destinations, connector mappings.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Folder for generated keys, secrets and the database.
    #[arg(long, default_value = ".ferry", env = "FERRY_DATA_DIR")]
    data_dir: PathBuf,
    /// Where to write the `default-env.json` (VCAP_SERVICES) for the app.
    #[arg(long, default_value = "default-env.json")]
    env_file: PathBuf,
    /// Do not write `default-env.json`.
    #[arg(long)]
    no_env_file: bool,
}

/// Identifiers and secrets generated on the first start.
#[derive(Serialize, Deserialize)]
struct State {
    subaccount_id: String,
    destination_instance_id: String,
    connectivity_instance_id: String,
    xsuaa_instance_id: String,
    destination_secret: Secret<String>,
    connectivity_secret: Secret<String>,
    xsuaa_secret: Secret<String>,
    developer_password: Secret<String>,
    /// The client of the admin API (authority `ferry.admin`); added to older state files.
    #[serde(default)]
    pub admin_client_id: String,
    #[serde(default)]
    pub admin_client_secret: Secret<String>,
}

/// The admin client's id when `state.json` names none yet.
const ADMIN_CLIENT_ID: &str = "ferry-admin";
/// The bindings' client ids when the configuration names none.
const DESTINATION_CLIENT_ID: &str = "sb-ferry-destination!b1";
const CONNECTIVITY_CLIENT_ID: &str = "sb-ferry-connectivity!b2";
const XSUAA_CLIENT_ID: &str = "sb-ferry-app!t1";

fn random_secret() -> String {
    let bytes: [u8; 24] = rand::random();
    hex::encode(bytes)
}

pub(crate) fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

fn load_state(dir: &Path) -> anyhow::Result<State> {
    let path = dir.join("state.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let mut state: State = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged; delete it to start afresh", path.display()))?;
        if state.admin_client_id.is_empty() || state.admin_client_secret.expose().is_empty() {
            state.admin_client_id = ADMIN_CLIENT_ID.into();
            state.admin_client_secret = random_secret().into();
            write_private(&path, serde_json::to_string_pretty(&state)?.as_bytes())?;
        }
        return Ok(state);
    }
    let id = || uuid::Uuid::new_v4().to_string();
    let state = State {
        subaccount_id: id(),
        destination_instance_id: id(),
        connectivity_instance_id: id(),
        xsuaa_instance_id: id(),
        destination_secret: random_secret().into(),
        connectivity_secret: random_secret().into(),
        xsuaa_secret: random_secret().into(),
        developer_password: random_secret().into(),
        admin_client_id: ADMIN_CLIENT_ID.into(),
        admin_client_secret: random_secret().into(),
    };
    write_private(&path, serde_json::to_string_pretty(&state)?.as_bytes())?;
    Ok(state)
}

fn load_ca(dir: &Path) -> anyhow::Result<LocalCa> {
    load_named_ca(dir, "ca", "Ferry local CA")
}

/// A CA kept as `<stem>.pem` / `<stem>-key.pem` in the data folder, generated on first use.
fn load_named_ca(dir: &Path, stem: &str, common_name: &str) -> anyhow::Result<LocalCa> {
    let (cert, key) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}-key.pem")));
    if cert.exists() && key.exists() {
        return Ok(LocalCa::from_pem(&std::fs::read_to_string(&cert)?, &std::fs::read_to_string(&key)?)?);
    }
    let ca = LocalCa::generate(common_name)?;
    std::fs::write(&cert, ca.cert_pem())?;
    write_private(&key, ca.key_pem().expose().as_bytes())?;
    Ok(ca)
}

/// The signing keys an older `ferry up` kept in `token-keys.json`, adopted by the default
/// subaccount when the directory creates it, so tokens issued before stay valid.
fn legacy_keys(dir: &Path) -> anyhow::Result<Option<Arc<KeySet>>> {
    let Ok(text) = std::fs::read_to_string(dir.join("token-keys.json")) else { return Ok(None) };
    let stored: Vec<(String, String)> = serde_json::from_str(&text)?;
    let keys = stored
        .into_iter()
        .map(|(kid, h)| Ok((kid, Secret::new(hex::decode(h)?))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Some(Arc::new(KeySet::from_pkcs8(&keys)?)))
}

fn load_master_key(dir: &Path) -> anyhow::Result<Secret<[u8; 32]>> {
    let path = dir.join("master.key");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let bytes = hex::decode(text.trim()).context("master.key is not hex")?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| anyhow::anyhow!("master.key must hold 32 bytes"))?;
        return Ok(Secret::new(key));
    }
    let key: [u8; 32] = rand::random();
    write_private(&path, hex::encode(key).as_bytes())?;
    Ok(Secret::new(key))
}

async fn bind(host: &str, port: u16) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let l = ferry_core::serve::bind(&format!("{host}:{port}")).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

struct ClientIds {
    id: String,
    secret: Secret<String>,
    xsappname: String,
}

fn client(entry: &ClientEntry, default_id: &str, generated: &Secret<String>) -> ClientIds {
    let id = entry.client_id.clone().unwrap_or_else(|| default_id.to_owned());
    let xsappname = entry.xsappname.clone().unwrap_or_else(|| id.trim_start_matches("sb-").to_owned());
    ClientIds { secret: entry.client_secret.clone().unwrap_or_else(|| generated.clone()), id, xsappname }
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    ferry_core::init_crypto();
    let cfg = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data folder {}", args.data_dir.display()))?;
    let dir = args.data_dir.as_path();
    let state = load_state(dir)?;
    let ca = Arc::new(load_ca(dir)?);
    let master_key = load_master_key(dir)?;
    let subaccount = cfg.subaccount.id.clone().unwrap_or_else(|| state.subaccount_id.clone());
    let subdomain = cfg.subaccount.subdomain.clone().unwrap_or_else(|| "ferry".into());

    let l = &cfg.listen;
    let (token_l, token_addr) = bind(&l.host, l.token_port).await?;
    let (token_tls_l, token_tls_addr) = bind(&l.host, l.token_https_port).await?;
    let (dest_l, dest_addr) = bind(&l.host, l.destination_port).await?;
    let (http_l, http_addr) = bind(&l.host, l.http_proxy_port).await?;
    let (socks_l, socks_addr) = bind(&l.host, l.socks5_port).await?;
    let (tunnel_l, tunnel_addr) = bind(&l.host, l.tunnel_port).await?;
    let metrics_l = match l.metrics_port {
        Some(port) => Some(bind(&l.host, port).await?),
        None => None,
    };
    let mut scc_admin_l = match l.connector_admin_port {
        Some(port) => Some(bind(&l.host, port).await?),
        None => None,
    };
    let host = l.host.clone();
    let server_names: Vec<&str> = vec![host.as_str(), "localhost", "127.0.0.1"];
    let server_cert = ca.issue_server_cert(&server_names)?;

    // The directory of subaccounts, service instances and keys. On the first start it gets the
    // default subaccount with one instance of each service and one key each (the ids and
    // secrets of the config file, else generated ones kept in state.json); the VCAP_SERVICES
    // for the app are those keys' credentials.
    let token_url = format!("http://{token_addr}");
    let uaadomain = token_tls_addr.to_string();
    let endpoints = Endpoints {
        token_url: token_url.clone(),
        uaadomain: uaadomain.clone(),
        destination_url: format!("http://{dest_addr}"),
        proxy_host: http_addr.ip().to_string(),
        http_proxy_port: http_addr.port(),
        socks5_port: socks_addr.port(),
        tunnel: tunnel_addr.to_string(),
    };
    let directory = Directory::open(&dir.join("directory.db"), &master_key, endpoints, Some(ca.clone()))?;
    let (subdomain, vcap) = provision_defaults(&directory, &cfg, &state, &subaccount, &subdomain, dir)?;
    let mut users: Vec<User> = cfg
        .users
        .iter()
        .map(|u| User {
            username: u.username.clone(),
            password: u.password.clone(),
            email: u.email.clone().unwrap_or_else(|| format!("{}@example.org", u.username)),
            user_id: uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, u.username.as_bytes()).to_string(),
            tenant_id: subaccount.clone(),
            given_name: u.given_name.clone(),
            family_name: u.family_name.clone(),
            ..Default::default()
        })
        .collect();
    if users.is_empty() {
        users.push(User {
            username: "developer".into(),
            password: state.developer_password.clone(),
            email: "developer@example.org".into(),
            user_id: uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, b"developer").to_string(),
            tenant_id: subaccount.clone(),
            given_name: Some("Dev".into()),
            family_name: Some("Eloper".into()),
            ..Default::default()
        });
    }
    // The admin client is the one client of the configuration proper: it cannot be deleted
    // through the API it authenticates, and neither can the subaccount it lives in.
    let admin = OAuthClient {
        client_id: state.admin_client_id.clone(),
        client_secret: state.admin_client_secret.clone(),
        tenant_id: subaccount.clone(),
        xsappname: "ferry-admin".into(),
        authorities: vec![ferry_directory::admin::ADMIN_SCOPE.into()],
        grant_types: vec![GRANT_CLIENT_CREDENTIALS.into()],
        ..Default::default()
    };
    let ldap = cfg
        .ldap
        .clone()
        .map(|mut l| {
            if l.tenant_id.is_empty() {
                l.tenant_id = subaccount.clone();
            }
            token_service::LdapUserStore::new(l)
        })
        .transpose()?;
    let ldap_label = ldap.as_ref().map(|l| format!("{} (base {})", l.config().url, l.config().base_dn));
    let user_stores: Vec<Arc<dyn token_service::UserStore>> =
        ldap.into_iter().map(|l| Arc::new(l) as Arc<dyn token_service::UserStore>).collect();
    let (tenants, mut clients) = directory.token_entries()?;
    // Redirect URIs are configuration, not directory rows: they apply to the bindings' clients.
    let bindings = &cfg.bindings;
    for (entry, default_id) in [
        (&bindings.destination, DESTINATION_CLIENT_ID),
        (&bindings.connectivity, CONNECTIVITY_CLIENT_ID),
        (&bindings.xsuaa, XSUAA_CLIENT_ID),
    ] {
        let id = entry.client_id.as_deref().unwrap_or(default_id);
        if let Some(c) = clients.iter_mut().find(|c| c.client_id == id) {
            c.redirect_uris.clone_from(&entry.redirect_uris);
        }
    }
    let token_service = TokenService::with_runtime_entries(
        TokenServiceConfig {
            tenants: vec![],
            clients: vec![admin],
            users: users.clone(),
            user_stores,
            public_url: token_url.clone(),
            uaadomain: uaadomain.clone(),
            token_validity: Duration::from_secs(cfg.tokens.access_token_validity_secs),
            refresh_token_validity: Duration::from_secs(cfg.tokens.refresh_token_validity_secs),
        },
        tenants,
        clients,
    )?;
    directory.attach(token_service.clone());
    // The one verifier the Destination Service and the proxy share: every tenant of the token
    // service, each bound to its zone (as `token_service.verifier()` trusts them), plus the
    // external OIDC issuers of `[[trust]]`. Its client fetches their discovery and JWKS
    // documents, trusting the local CA besides the system roots.
    let http = ferry_core::tls::http_client(Some(ca.cert_pem()))?;
    let trusted = cfg
        .trust
        .iter()
        .map(|t| TrustedIssuer::oidc(t.to_trust(&subaccount)))
        .collect::<Result<Vec<_>, _>>()
        .context("[[trust]]")?;
    let verifier = Arc::new(Verifier::new(vec![token_service.trusted_tenants()], http.clone()).with_issuers(trusted));
    let shutdown = Shutdown::new();
    let mut tasks = tokio::task::JoinSet::new();
    // Client certificates signed by the local CA authenticate X.509 service keys.
    let token_tls = token_service::https_server_config(&server_cert, Some(ca.cert_pem()))?;
    tasks.spawn(token_service::run_with_routes(
        token_service.clone(),
        ferry_directory::admin::router(directory.clone()),
        token_service::Listeners { http: Some(token_l), https: Some((token_tls_l, token_tls)) },
        shutdown.clone(),
    ));

    // Destination Service, with the destinations of the config file.
    let (dest_key, previous_keys) = cfg.destination_store.keys(&master_key)?;
    let dest_service = ferry_destination::DestinationService::open_rotating(
        ferry_destination::Config {
            database: cfg.destination_store.database(dir)?,
            master_key: dest_key,
            token_fetch_timeout: Duration::from_secs(10),
            // The token service's HTTPS (mTLS) endpoint has a certificate of the local CA.
            token_service_ca_pem: Some(ca.cert_pem().to_owned()),
        },
        previous_keys,
        verifier.clone(),
        http,
    )
    .await?;
    // A client's tokens in a subscriber's subaccount reach its provider's destinations through
    // the consume API's provider levels; the token service knows where each client lives.
    let zones = token_service.clone();
    dest_service.set_client_zones(Arc::new(move |client: &str| zones.client_tenant(client)));
    for d in &cfg.destinations {
        let props = d.properties.iter().map(|(k, v)| {
            let s = match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), s)
        });
        let destination = ferry_model::Destination::from_properties(props)
            .and_then(|d| d.check().map(|()| d))
            .map_err(|e| anyhow::anyhow!("destination in the config file: {e}"))?;
        let instance = (d.level == Level::Instance).then_some(state.destination_instance_id.as_str());
        dest_service.upsert(&subaccount, instance, destination).await?;
    }
    // The token service accepts SAML assertions signed with this Destination Service's
    // subaccount key, so OAuth2SAMLBearerAssertion destinations can point at it, and those of
    // the `[[saml_trust]]` identity providers. (A key renewed over the API is trusted after a
    // restart.)
    let own = dest_service.saml_certificate_pem(&subaccount).await?;
    let own = ferry_auth::saml::TrustedCertificate::from_pem(&own).context("the subaccount's SAML certificate")?;
    token_service.trust_saml_idp(&subaccount, own)?;
    for t in &cfg.saml_trust {
        let pem = std::fs::read_to_string(&t.certificate_file)
            .with_context(|| format!("[[saml_trust]] cannot read {}", t.certificate_file.display()))?;
        let cert = ferry_auth::saml::TrustedCertificate::from_pem(&pem)
            .with_context(|| format!("[[saml_trust]] {}", t.certificate_file.display()))?;
        token_service.trust_saml_idp(t.subaccount.as_deref().unwrap_or(&subaccount), cert).context("[[saml_trust]]")?;
    }
    tasks.spawn(ferry_destination::run(dest_service, dest_l, shutdown.clone()));

    // Connectivity Proxy.
    let tunnel_tls = ferry_core::tls::server_config(&server_cert, Some(ca.cert_pem()), &[ferry_proto::tunnel::ALPN])?;
    let mut proxy_config = ferry_proxy::ProxyConfig::new(verifier.clone(), tunnel_tls);
    proxy_config.channel_targets = cfg.channel_targets(&subaccount)?;
    let proxy = ferry_proxy::Proxy::new(proxy_config);
    let registry = proxy.registry();
    let metrics_addr = metrics_l.as_ref().map(|(_, a)| *a);
    if let Some((listener, _)) = metrics_l {
        let router = ops_router(registry.clone());
        tasks.spawn(ferry_core::serve::serve_router(
            listener,
            router,
            None,
            ferry_core::serve::AcceptOptions::named("metrics"),
            shutdown.clone(),
        ));
    }
    tasks.spawn(proxy.run(
        ferry_proxy::Listeners {
            http: Some(http_l),
            socks5: Some(socks_l),
            tunnel: Some(tunnel_l),
            socks5_no_auth: None,
        },
        shutdown.clone(),
    ));

    // Cloud Connector(s); without any in the config, one with no mappings at the default
    // location, so the tunnel is there to map systems into. Principal propagation uses its own
    // CA, which backends trust for user certificates (and nothing else).
    let pp_ca = Arc::new(load_named_ca(dir, "pp-ca", "Ferry principal propagation CA")?);
    let default_connector = crate::config::ConnectorEntry::default();
    let entries: Vec<&crate::config::ConnectorEntry> =
        if cfg.connectors.is_empty() { vec![&default_connector] } else { cfg.connectors.iter().collect() };
    let connectors: Vec<(String, usize)> = entries.iter().map(|c| (c.location_id.clone(), c.mappings.len())).collect();
    let mut scc_admin_addr = None;
    for (i, c) in entries.iter().enumerate() {
        let identity = ca.issue_connector_cert(&subaccount, &c.location_id, time::Duration::days(30))?;
        let backend_ca_pem = match &c.backend_ca_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("connector backend_ca_file {}", path.display()))?,
            ),
            None => None,
        };
        let system_certificate = match (&c.system_certificate_file, &c.system_key_file) {
            (Some(cert), Some(key)) => Some(ferry_core::tls::CertifiedKey {
                cert_pem: std::fs::read_to_string(cert)
                    .with_context(|| format!("connector system_certificate_file {}", cert.display()))?,
                key_pem: std::fs::read_to_string(key)
                    .with_context(|| format!("connector system_key_file {}", key.display()))?
                    .into(),
            }),
            (None, None) => None,
            _ => anyhow::bail!("a connector needs both system_certificate_file and system_key_file, or neither"),
        };
        let pp_cfg = &c.principal_propagation;
        let mut pp = ferry_connector::PrincipalPropagation::new(verifier.clone(), pp_ca.clone());
        pp.subject_pattern = pp_cfg.subject_pattern.clone();
        pp.certificate_validity = Duration::from_secs(u64::from(pp_cfg.certificate_validity_minutes) * 60);
        pp.expiration_tolerance = Duration::from_secs(u64::from(pp_cfg.expiration_tolerance_hours) * 3600);
        // With the admin API on, the first connector is one of its subaccounts: its mappings
        // seed the data folder on the first start and are the API's to change afterwards.
        if i == 0
            && let Some((listener, addr)) = scc_admin_l.take()
        {
            let mut ac = ferry_connector::admin::AdminConfig::new(dir.join("connector"));
            ac.audit_dir = Some(dir.join("audit"));
            ac.ui_names.push(host.clone());
            ac.connection.channel_host = host.clone();
            // Subaccounts added with cloudUser/cloudPassword are signed by this Ferry's directory.
            ac.region_ca_pem = Some(ca.cert_pem().to_owned());
            ac.connection.backend_ca_pem = backend_ca_pem;
            ac.connection.system_certificate = system_certificate;
            ac.connection.principal_propagation = Some(Arc::new(pp));
            let admin = ferry_connector::admin::Admin::start(ac, shutdown.clone()).await?;
            admin
                .ensure_subaccount(
                    ferry_connector::admin::Enrollment {
                        subaccount: subaccount.clone(),
                        location_id: c.location_id.clone(),
                        tunnel: tunnel_addr.to_string(),
                        server_name: "127.0.0.1".into(),
                        ca: ca.cert_pem().to_owned(),
                        identity,
                    },
                    c.mappings.clone(),
                    c.audit_level,
                )
                .await?;
            tasks.spawn(admin.serve(listener, shutdown.clone()));
            scc_admin_addr = Some(addr);
            continue;
        }
        let mut cc = ConnectorConfig::new(
            tunnel_addr.to_string(),
            "127.0.0.1".into(),
            ca.cert_pem().to_owned(),
            identity,
            AccessRules::new(c.mappings.clone()),
        );
        cc.audit = ferry_connector::audit::AuditConfig {
            level: c.audit_level,
            dir: Some(dir.join("audit")),
            ..Default::default()
        };
        cc.backend_ca_pem = backend_ca_pem;
        cc.system_certificate = system_certificate;
        cc.principal_propagation = Some(Arc::new(pp));
        tasks.spawn(Arc::new(Connector::new(cc)?).run(shutdown.clone()));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while connectors.iter().any(|(loc, _)| !registry.is_connected(&subaccount, loc)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let ca_path = std::fs::canonicalize(dir.join("ca.pem")).unwrap_or_else(|_| dir.join("ca.pem"));
    if !args.no_env_file {
        let env = json!({ "VCAP_SERVICES": vcap });
        write_private(&args.env_file, serde_json::to_string_pretty(&env)?.as_bytes())?;
    }
    let tp_endpoints = match &cfg.transparent_proxy {
        Some(tp) => Some(start_transparent_proxy(tp, &vcap, ca.cert_pem(), &mut tasks, &shutdown).await?),
        None => None,
    };
    println!("Ferry is up ({} ms).", started.elapsed().as_millis());
    println!("  token service        {token_url}  (HTTPS: https://{uaadomain})");
    println!("  destination service  http://{dest_addr}");
    println!("  connectivity proxy   http://{http_addr}  socks5://{socks_addr}");
    println!("  tunnel endpoint      {tunnel_addr}");
    if let Some(addr) = metrics_addr {
        println!("  metrics              http://{addr}/metrics  (health: /healthz)");
    }
    println!("  subaccount           {subaccount} (subdomain {subdomain})");
    for (loc, m) in &connectors {
        let label = if loc.is_empty() { "(default location)".to_string() } else { format!("location {loc:?}") };
        let state = if registry.is_connected(&subaccount, loc) { "connected" } else { "NOT connected" };
        println!("  cloud connector      {label}: {state}, {m} system mapping(s)");
    }
    if let (Some(tp), Some(list)) = (&cfg.transparent_proxy, &tp_endpoints) {
        println!("  transparent proxy    {} ({} endpoint(s))", tp.resources_dir.display(), list.len());
        for e in list.values() {
            println!("    endpoint {} {} {} {}", e.resource, e.protocol, e.address, e.destination);
        }
    }
    if let Some(addr) = scc_admin_addr {
        println!(
            "  connector admin API  https://{addr}/api/v1/configuration  (Administrator; UI CA {})",
            dir.join("connector").join("ui-ca.pem").display()
        );
    }
    for t in &cfg.trust {
        let t = t.to_trust(&subaccount);
        println!("  trusted issuer       {} (subaccount {})", t.issuer, t.subaccount);
    }
    println!(
        "  admin API            {token_url}{}  (client {}, secret in {}; try `ferry subaccount list`)",
        ferry_directory::admin::BASE,
        state.admin_client_id,
        dir.join("state.json").display()
    );
    println!("  users                {}", users.iter().map(|u| u.username.as_str()).collect::<Vec<_>>().join(", "));
    if let Some(l) = &ldap_label {
        println!("  LDAP users           {l}");
    }
    println!("  trust the local CA:  export NODE_EXTRA_CA_CERTS={}", ca_path.display());
    if !args.no_env_file {
        println!("  VCAP_SERVICES written to {}", args.env_file.display());
    }
    println!("VCAP_SERVICES={}", serde_json::to_string(&vcap)?);
    println!("ready");

    wait_for_signal().await;
    eprintln!("shutting down");
    shutdown.cancel();
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(15), drain).await.is_err() {
        eprintln!("some connections did not finish in time");
    }
    Ok(())
}

/// The Transparent Proxy over this Ferry's own bindings and CA; returns the endpoints of its
/// first scan, so `ready` means the resources present at start are served.
async fn start_transparent_proxy(
    tp: &crate::config::TransparentProxyEntry,
    vcap: &impl serde::Serialize,
    ca_pem: &str,
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: &Shutdown,
) -> anyhow::Result<ferry_transparent_proxy::Endpoints> {
    anyhow::ensure!(tp.poll_interval_ms > 0, "[transparent_proxy] poll_interval_ms must be at least 1");
    let config = ferry_transparent_proxy::Config {
        resources_dir: tp.resources_dir.clone(),
        poll_interval: Duration::from_millis(tp.poll_interval_ms),
        tenant_mode: tp.tenant_mode,
        listen_host: tp.listen_host.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1])),
        bindings: ferry_client::Bindings::from_vcap_services(&serde_json::to_string(vcap)?)?,
        ca_pem: Some(ca_pem.to_owned()),
        endpoints_file: tp.endpoints_file.clone(),
        proxy_connect_timeout: Duration::from_secs(1),
        default_instance_name: "default".to_owned(),
        instances: Vec::new(),
    };
    let (tx, mut rx) = tokio::sync::watch::channel(ferry_transparent_proxy::Endpoints::new());
    let sd = shutdown.clone();
    tasks.spawn(async move {
        if let Err(e) = ferry_transparent_proxy::run(config, tx, sd).await {
            tracing::error!(error = %e, "transparent proxy stopped");
        }
    });
    rx.changed().await.context("the transparent proxy did not start")?;
    Ok(rx.borrow().clone())
}

/// Returns on Ctrl-C or SIGTERM.
pub(crate) async fn wait_for_signal() {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate() => {}
    }
}

#[cfg(unix)]
async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn terminate() {
    std::future::pending().await
}

/// Creates (first start) or finds the default subaccount, its three service instances and a
/// key for each, and returns the subdomain and the VCAP_SERVICES built from those keys.
fn provision_defaults(
    directory: &Directory,
    cfg: &FileConfig,
    state: &State,
    subaccount: &str,
    subdomain: &str,
    dir: &Path,
) -> anyhow::Result<(String, Value)> {
    let sub = match directory.subaccount(subaccount) {
        Ok(s) => s,
        Err(DirectoryError::NotFound(_)) => {
            let sub = directory.create_subaccount(subdomain, Some(subaccount), legacy_keys(dir)?)?;
            // Adopted: the keys are now sealed in the directory, so the plain copy goes.
            let _ = std::fs::remove_file(dir.join("token-keys.json"));
            sub
        }
        Err(e) => return Err(e.into()),
    };
    if !sub.subdomain.eq_ignore_ascii_case(subdomain) && cfg.subaccount.subdomain.is_some() {
        tracing::warn!(
            configured = subdomain,
            kept = %sub.subdomain,
            "the subaccount exists with another subdomain; the stored one stays (delete directory.db to start afresh)"
        );
    }
    let defaults = [
        (
            Service::Destination,
            &cfg.bindings.destination,
            DESTINATION_CLIENT_ID,
            &state.destination_secret,
            &state.destination_instance_id,
            "ferry-destination",
        ),
        (
            Service::Connectivity,
            &cfg.bindings.connectivity,
            CONNECTIVITY_CLIENT_ID,
            &state.connectivity_secret,
            &state.connectivity_instance_id,
            "ferry-connectivity",
        ),
        (
            Service::Xsuaa,
            &cfg.bindings.xsuaa,
            XSUAA_CLIENT_ID,
            &state.xsuaa_secret,
            &state.xsuaa_instance_id,
            "ferry-xsuaa",
        ),
    ];
    let mut vcap = serde_json::Map::new();
    for (service, entry, default_id, generated, instance_id, name) in defaults {
        let inst = match directory.instance(&sub.id, instance_id) {
            Ok(i) => i,
            Err(DirectoryError::NotFound(_)) => {
                directory.create_instance(&sub.id, service.as_str(), name, None, Some(instance_id), None)?
            }
            Err(e) => return Err(e.into()),
        };
        let c = client(entry, default_id, generated);
        let new = NewKey {
            name: "default".into(),
            client_id: Some(c.id),
            xsappname: Some(c.xsappname),
            secret: Some(c.secret),
            ..Default::default()
        };
        let (_, creds) = directory.ensure_key(&sub.id, &inst.id, new)?;
        let entry = ferry_directory::vcap_entry(service, &inst.name, &inst.id, &inst.plan, creds);
        vcap.insert(service.as_str().into(), json!([entry]));
    }
    Ok((sub.subdomain, Value::Object(vcap)))
}

/// `/metrics` (Prometheus text) and `/healthz` (200 while at least one connector is connected,
/// 503 otherwise, with the connected subaccount/location pairs as JSON).
fn ops_router(registry: Arc<ferry_proxy::Registry>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/metrics",
            get(|| async {
                ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], ferry_core::metrics::global().render())
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let registry = registry.clone();
                async move {
                    let tunnels: Vec<Value> = registry
                        .keys()
                        .into_iter()
                        .map(|((sub, loc), n)| json!({"subaccount": sub, "location_id": loc, "connections": n}))
                        .collect();
                    let status =
                        if tunnels.is_empty() { http::StatusCode::SERVICE_UNAVAILABLE } else { http::StatusCode::OK };
                    (status, axum::Json(json!({"tunnels": tunnels})))
                }
            }),
        )
}
