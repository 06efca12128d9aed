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
use ferry_auth::token_service::{self, OAuthClient, Tenant, TokenService, TokenServiceConfig, User};
use ferry_auth::{KeySet, TrustedIssuer, Verifier};
use ferry_connector::{AccessRules, Connector, ConnectorConfig};
use ferry_core::tls::LocalCa;
use ferry_core::{Secret, Shutdown};
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
}

fn random_secret() -> String {
    let bytes: [u8; 24] = rand::random();
    hex::encode(bytes)
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
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
        return serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged; delete it to start afresh", path.display()));
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
    };
    write_private(&path, serde_json::to_string_pretty(&state)?.as_bytes())?;
    Ok(state)
}

fn load_ca(dir: &Path) -> anyhow::Result<LocalCa> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if cert.exists() && key.exists() {
        return Ok(LocalCa::from_pem(&std::fs::read_to_string(&cert)?, &std::fs::read_to_string(&key)?)?);
    }
    let ca = LocalCa::generate("Ferry local CA")?;
    std::fs::write(&cert, ca.cert_pem())?;
    write_private(&key, ca.key_pem().expose().as_bytes())?;
    Ok(ca)
}

fn load_keys(dir: &Path) -> anyhow::Result<Arc<KeySet>> {
    let path = dir.join("token-keys.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let stored: Vec<(String, String)> = serde_json::from_str(&text)?;
        let keys = stored
            .into_iter()
            .map(|(kid, h)| Ok((kid, Secret::new(hex::decode(h)?))))
            .collect::<anyhow::Result<Vec<_>>>()?;
        return Ok(Arc::new(KeySet::from_pkcs8(&keys)?));
    }
    let keys = KeySet::generate()?;
    let stored: Vec<(String, String)> =
        keys.export_pkcs8().into_iter().map(|(kid, der)| (kid, hex::encode(der.expose()))).collect();
    write_private(&path, serde_json::to_string(&stored)?.as_bytes())?;
    Ok(Arc::new(keys))
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
    let ca = load_ca(dir)?;
    let keys = load_keys(dir)?;
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
    let host = l.host.clone();
    let server_names: Vec<&str> = vec![host.as_str(), "localhost", "127.0.0.1"];
    let server_cert = ca.issue_server_cert(&server_names)?;

    // Token service: one tenant (the subaccount), the three binding clients, the users.
    let dest = client(&cfg.bindings.destination, "sb-ferry-destination!b1", &state.destination_secret);
    let conn = client(&cfg.bindings.connectivity, "sb-ferry-connectivity!b2", &state.connectivity_secret);
    let xsuaa = client(&cfg.bindings.xsuaa, "sb-ferry-app!t1", &state.xsuaa_secret);
    let token_url = format!("http://{token_addr}");
    let uaadomain = token_tls_addr.to_string();
    let oauth = |c: &ClientIds, instance: &str, authorities: &[&str]| OAuthClient {
        client_id: c.id.clone(),
        client_secret: c.secret.clone(),
        tenant_id: subaccount.clone(),
        xsappname: c.xsappname.clone(),
        authorities: authorities.iter().map(|s| s.to_string()).collect(),
        scopes: vec!["openid".into(), format!("{}.Display", c.xsappname)],
        service_instance_id: Some(instance.to_owned()),
        grant_types: vec![],
        ..Default::default()
    };
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
    let token_service = TokenService::new(TokenServiceConfig {
        tenants: vec![Tenant { id: subaccount.clone(), subdomain: subdomain.clone(), keys: keys.clone() }],
        clients: vec![
            oauth(&dest, &state.destination_instance_id, &["uaa.resource"]),
            oauth(&conn, &state.connectivity_instance_id, &["uaa.resource"]),
            oauth(&xsuaa, &state.xsuaa_instance_id, &["uaa.resource"]),
        ],
        users: users.clone(),
        user_stores,
        public_url: token_url.clone(),
        uaadomain: uaadomain.clone(),
        ..Default::default()
    })?;
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
    let verifier =
        Arc::new(Verifier::for_tenants([(subaccount.clone(), keys.clone())], http.clone()).with_issuers(trusted));
    let shutdown = Shutdown::new();
    let mut tasks = tokio::task::JoinSet::new();
    let token_tls = ferry_core::tls::server_config(&server_cert, None, &[b"http/1.1"])?;
    tasks.spawn(token_service::run(
        token_service.clone(),
        token_service::Listeners { http: Some(token_l), https: Some((token_tls_l, token_tls)) },
        shutdown.clone(),
    ));

    // Destination Service, with the destinations of the config file.
    let dest_service = ferry_destination::DestinationService::open(
        ferry_destination::Config {
            database: ferry_destination::DatabaseConfig::Sqlite { path: dir.join("destinations.db") },
            master_key,
            token_fetch_timeout: Duration::from_secs(10),
        },
        verifier.clone(),
        http,
    )
    .await?;
    for d in &cfg.destinations {
        let props = d.properties.iter().map(|(k, v)| {
            let s = match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), s)
        });
        let destination = ferry_model::Destination::from_properties(props)
            .map_err(|e| anyhow::anyhow!("destination in the config file: {e}"))?;
        let instance = (d.level == Level::Instance).then_some(state.destination_instance_id.as_str());
        dest_service.upsert(&subaccount, instance, destination).await?;
    }
    tasks.spawn(ferry_destination::run(dest_service, dest_l, shutdown.clone()));

    // Connectivity Proxy.
    let tunnel_tls = ferry_core::tls::server_config(&server_cert, Some(ca.cert_pem()), &[ferry_proto::tunnel::ALPN])?;
    let proxy = ferry_proxy::Proxy::new(ferry_proxy::ProxyConfig::new(verifier.clone(), tunnel_tls));
    let registry = proxy.registry();
    tasks.spawn(proxy.run(
        ferry_proxy::Listeners { http: Some(http_l), socks5: Some(socks_l), tunnel: Some(tunnel_l) },
        shutdown.clone(),
    ));

    // Cloud Connector(s); without any in the config, one with no mappings at the default
    // location, so the tunnel is there to map systems into.
    let connectors: Vec<(String, Vec<ferry_connector::SystemMapping>)> = if cfg.connectors.is_empty() {
        vec![(String::new(), vec![])]
    } else {
        cfg.connectors.iter().map(|c| (c.location_id.clone(), c.mappings.clone())).collect()
    };
    for (location, mappings) in &connectors {
        let identity = ca.issue_connector_cert(&subaccount, location, time::Duration::days(30))?;
        let cc = ConnectorConfig::new(
            tunnel_addr.to_string(),
            "127.0.0.1".into(),
            ca.cert_pem().to_owned(),
            identity,
            AccessRules::new(mappings.clone()),
        );
        tasks.spawn(Arc::new(Connector::new(cc)?).run(shutdown.clone()));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while connectors.iter().any(|(loc, _)| !registry.is_connected(&subaccount, loc)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let vcap = vcap_services(&VcapInput {
        token_url: &token_url,
        uaadomain: &uaadomain,
        destination_url: &format!("http://{dest_addr}"),
        proxy_host: &http_addr.ip().to_string(),
        http_port: http_addr.port(),
        socks_port: socks_addr.port(),
        subaccount: &subaccount,
        subdomain: &subdomain,
        dest: &dest,
        conn: &conn,
        xsuaa: &xsuaa,
        state: &state,
    });
    let ca_path = std::fs::canonicalize(dir.join("ca.pem")).unwrap_or_else(|_| dir.join("ca.pem"));
    if !args.no_env_file {
        let env = json!({ "VCAP_SERVICES": vcap });
        write_private(&args.env_file, serde_json::to_string_pretty(&env)?.as_bytes())?;
    }
    println!("Ferry is up ({} ms).", started.elapsed().as_millis());
    println!("  token service        {token_url}  (HTTPS: https://{uaadomain})");
    println!("  destination service  http://{dest_addr}");
    println!("  connectivity proxy   http://{http_addr}  socks5://{socks_addr}");
    println!("  tunnel endpoint      {tunnel_addr}");
    println!("  subaccount           {subaccount} (subdomain {subdomain})");
    for (loc, m) in &connectors {
        let label = if loc.is_empty() { "(default location)".to_string() } else { format!("location {loc:?}") };
        let state = if registry.is_connected(&subaccount, loc) { "connected" } else { "NOT connected" };
        println!("  cloud connector      {label}: {state}, {} system mapping(s)", m.len());
    }
    for t in &cfg.trust {
        let t = t.to_trust(&subaccount);
        println!("  trusted issuer       {} (subaccount {})", t.issuer, t.subaccount);
    }
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

    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate() => {}
    }
    eprintln!("shutting down");
    shutdown.cancel();
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(15), drain).await.is_err() {
        eprintln!("some connections did not finish in time");
    }
    Ok(())
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

struct VcapInput<'a> {
    token_url: &'a str,
    uaadomain: &'a str,
    destination_url: &'a str,
    proxy_host: &'a str,
    http_port: u16,
    socks_port: u16,
    subaccount: &'a str,
    subdomain: &'a str,
    dest: &'a ClientIds,
    conn: &'a ClientIds,
    xsuaa: &'a ClientIds,
    state: &'a State,
}

/// VCAP_SERVICES as Cloud Foundry hands it to an app: `label` for the SAP Cloud SDK, `tags` for
/// the approuter, every port a string (CLIENT-CONTRACT §1).
fn vcap_services(v: &VcapInput<'_>) -> Value {
    let common = |c: &ClientIds, instance: &str| {
        json!({
            "clientid": c.id, "clientsecret": c.secret.expose(), "xsappname": c.xsappname,
            "url": v.token_url, "uaadomain": v.uaadomain, "identityzone": v.subdomain,
            "tenantid": v.subaccount, "tenantmode": "dedicated", "instanceid": instance,
            "credential-type": "binding-secret",
        })
    };
    let mut dest = common(v.dest, &v.state.destination_instance_id);
    dest["uri"] = json!(v.destination_url);
    let mut conn = common(v.conn, &v.state.connectivity_instance_id);
    let c = conn.as_object_mut().expect("object");
    c.insert("token_service_url".into(), json!(v.token_url));
    c.insert("token_service_domain".into(), json!(v.uaadomain));
    c.insert("onpremise_proxy_host".into(), json!(v.proxy_host));
    c.insert("onpremise_proxy_port".into(), json!(v.http_port.to_string()));
    c.insert("onpremise_proxy_http_port".into(), json!(v.http_port.to_string()));
    c.insert("onpremise_socks5_proxy_port".into(), json!(v.socks_port.to_string()));
    let xsuaa = common(v.xsuaa, &v.state.xsuaa_instance_id);
    let binding = |label: &str, name: &str, plan: &str, tags: &[&str], creds: Value, instance: &str| {
        json!({ "label": label, "name": name, "instance_name": name, "instance_guid": instance,
                "plan": plan, "tags": tags, "credentials": creds })
    };
    json!({
        "destination": [binding("destination", "ferry-destination", "lite", &["destination", "conn", "connsvc"], dest, &v.state.destination_instance_id)],
        "connectivity": [binding("connectivity", "ferry-connectivity", "lite", &["connectivity", "conn", "connsvc"], conn, &v.state.connectivity_instance_id)],
        "xsuaa": [binding("xsuaa", "ferry-xsuaa", "application", &["xsuaa"], xsuaa, &v.state.xsuaa_instance_id)],
    })
}
