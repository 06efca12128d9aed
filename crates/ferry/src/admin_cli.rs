//! `ferry subaccount|service-instance|service-key ...`: a client of the admin API
//! (`/ferry/admin/v1`, served by the token service of `ferry up`).

use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// How to reach and authenticate to the admin API.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// Token service URL of the Ferry to manage (the admin API is served there).
    #[arg(long, global = true, default_value = "http://127.0.0.1:18081", env = "FERRY_ADMIN_URL")]
    url: String,
    /// Admin client id (authority ferry.admin); default: from `<data-dir>/state.json`.
    #[arg(long, global = true, env = "FERRY_ADMIN_CLIENT_ID")]
    client_id: Option<String>,
    /// Admin client secret; default: from `<data-dir>/state.json`.
    #[arg(long, global = true, env = "FERRY_ADMIN_CLIENT_SECRET", hide_env_values = true)]
    client_secret: Option<String>,
    /// Data folder of a local `ferry up`, for its admin credentials and CA.
    #[arg(long, global = true, default_value = ".ferry", env = "FERRY_DATA_DIR")]
    data_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum SubaccountCmd {
    /// Create a subaccount (tenant) with its own signing keys.
    Create {
        #[arg(long)]
        subdomain: String,
        /// A GUID; generated if absent.
        #[arg(long)]
        id: Option<String>,
    },
    /// List subaccounts.
    List,
    /// Delete a subaccount with its service instances and keys.
    Delete { id: String },
}

#[derive(clap::Subcommand, Debug)]
pub enum InstanceCmd {
    /// Create a service instance (destination, connectivity or xsuaa).
    Create {
        #[arg(long)]
        subaccount: String,
        #[arg(long)]
        service: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        plan: Option<String>,
        /// xsuaa: where the authorization code flow may send users back to (its
        /// `oauth2-configuration.redirect-uris`); repeat for several.
        #[arg(long = "redirect-uri")]
        redirect_uris: Vec<String>,
    },
    /// List the service instances of a subaccount.
    List {
        #[arg(long)]
        subaccount: String,
    },
    /// Delete a service instance with its keys.
    Delete {
        #[arg(long)]
        subaccount: String,
        id: String,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum KeyCmd {
    /// Create a service key; prints its credentials (the only time the secret is shown).
    Create {
        #[arg(long)]
        subaccount: String,
        #[arg(long)]
        instance: String,
        #[arg(long)]
        name: String,
        /// binding-secret (default) or x509.
        #[arg(long)]
        credential_type: Option<String>,
    },
    /// List the keys of a service instance (without secrets).
    List {
        #[arg(long)]
        subaccount: String,
        #[arg(long)]
        instance: String,
    },
    /// Delete a service key; its client can no longer get tokens.
    Delete {
        #[arg(long)]
        subaccount: String,
        #[arg(long)]
        instance: String,
        id: String,
    },
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    async fn connect(c: &Connection) -> anyhow::Result<Self> {
        let (id, secret) = match (&c.client_id, &c.client_secret) {
            (Some(id), Some(secret)) => (id.clone(), secret.clone()),
            _ => {
                let path = c.data_dir.join("state.json");
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "no admin credentials: pass --client-id/--client-secret (or FERRY_ADMIN_CLIENT_ID/\
                         FERRY_ADMIN_CLIENT_SECRET), or --data-dir of a local `ferry up` ({} not readable)",
                        path.display()
                    )
                })?;
                let state: Value = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
                let get = |k: &str| state.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
                let (id, secret) = (get("admin_client_id"), get("admin_client_secret"));
                if id.is_empty() || secret.is_empty() {
                    bail!("{} has no admin client; start `ferry up` once to create it", path.display());
                }
                (c.client_id.clone().unwrap_or(id), c.client_secret.clone().unwrap_or(secret))
            }
        };
        let ca = std::fs::read_to_string(c.data_dir.join("ca.pem")).ok();
        let http = ferry_core::tls::http_client(ca.as_deref())?;
        let base = c.url.trim_end_matches('/').to_owned();
        let resp = http
            .post(format!("{base}/oauth/token"))
            .form(&[("grant_type", "client_credentials"), ("client_id", &id), ("client_secret", &secret)])
            .send()
            .await
            .with_context(|| format!("cannot reach {base}"))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let Some(token) = body.get("access_token").and_then(Value::as_str) else {
            bail!("cannot get an admin token from {base} ({status}): {body}");
        };
        Ok(Self { http, base, token: token.to_owned() })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{}{path}", self.base, ferry_directory::admin::BASE);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("cannot reach {url}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(json!(text)) };
        if !status.is_success() {
            let msg = value.get("message").and_then(Value::as_str).map(str::to_owned).unwrap_or(text);
            bail!("{status}: {msg}");
        }
        Ok(value)
    }
}

fn print_table(items: &Value, columns: &[(&str, &str)]) {
    let rows: Vec<Vec<String>> = items
        .get("items")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|item| {
                    columns
                        .iter()
                        .map(|(_, k)| match item.get(*k) {
                            Some(Value::String(s)) => s.clone(),
                            Some(Value::Null) | None => String::new(),
                            Some(v) => v.to_string(),
                        })
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.len()).collect();
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(columns.iter().map(|(h, _)| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn print_one(v: &Value, json_out: bool, columns: &[(&str, &str)]) -> anyhow::Result<()> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        print_table(&json!({ "items": [v] }), columns);
    }
    Ok(())
}

fn print_list(v: &Value, json_out: bool, columns: &[(&str, &str)]) -> anyhow::Result<()> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        print_table(v, columns);
    }
    Ok(())
}

const SUBACCOUNT_COLS: &[(&str, &str)] = &[("ID", "id"), ("SUBDOMAIN", "subdomain")];
const INSTANCE_COLS: &[(&str, &str)] = &[("ID", "id"), ("SERVICE", "service"), ("NAME", "name"), ("PLAN", "plan")];
const KEY_COLS: &[(&str, &str)] =
    &[("ID", "id"), ("NAME", "name"), ("CLIENT ID", "client_id"), ("CREDENTIAL TYPE", "credential_type")];

pub async fn subaccount(conn: Connection, cmd: SubaccountCmd) -> anyhow::Result<()> {
    let c = Client::connect(&conn).await?;
    match cmd {
        SubaccountCmd::Create { subdomain, id } => {
            let mut body = json!({ "subdomain": subdomain });
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            let v = c.call(reqwest::Method::POST, "/subaccounts", Some(body)).await?;
            print_one(&v, conn.json, SUBACCOUNT_COLS)
        }
        SubaccountCmd::List => {
            let v = c.call(reqwest::Method::GET, "/subaccounts", None).await?;
            print_list(&v, conn.json, SUBACCOUNT_COLS)
        }
        SubaccountCmd::Delete { id } => {
            c.call(reqwest::Method::DELETE, &format!("/subaccounts/{id}"), None).await?;
            deleted(conn.json, "subaccount", &id)
        }
    }
}

pub async fn instance(conn: Connection, cmd: InstanceCmd) -> anyhow::Result<()> {
    let c = Client::connect(&conn).await?;
    match cmd {
        InstanceCmd::Create { subaccount, service, name, plan, redirect_uris } => {
            let mut body = json!({ "service": service, "name": name });
            if let Some(p) = plan {
                body["plan"] = json!(p);
            }
            if !redirect_uris.is_empty() {
                body["parameters"] = json!({ "oauth2-configuration": { "redirect-uris": redirect_uris } });
            }
            let path = format!("/subaccounts/{subaccount}/service-instances");
            let v = c.call(reqwest::Method::POST, &path, Some(body)).await?;
            print_one(&v, conn.json, INSTANCE_COLS)
        }
        InstanceCmd::List { subaccount } => {
            let v = c.call(reqwest::Method::GET, &format!("/subaccounts/{subaccount}/service-instances"), None).await?;
            print_list(&v, conn.json, INSTANCE_COLS)
        }
        InstanceCmd::Delete { subaccount, id } => {
            let path = format!("/subaccounts/{subaccount}/service-instances/{id}");
            c.call(reqwest::Method::DELETE, &path, None).await?;
            deleted(conn.json, "service instance", &id)
        }
    }
}

pub async fn key(conn: Connection, cmd: KeyCmd) -> anyhow::Result<()> {
    let c = Client::connect(&conn).await?;
    match cmd {
        KeyCmd::Create { subaccount, instance, name, credential_type } => {
            let mut body = json!({ "name": name });
            if let Some(t) = credential_type {
                body["credential_type"] = json!(t);
            }
            let path = format!("/subaccounts/{subaccount}/service-instances/{instance}/service-keys");
            let v = c.call(reqwest::Method::POST, &path, Some(body)).await?;
            // The credentials, as an app finds them in VCAP_SERVICES, table or not.
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        KeyCmd::List { subaccount, instance } => {
            let path = format!("/subaccounts/{subaccount}/service-instances/{instance}/service-keys");
            let v = c.call(reqwest::Method::GET, &path, None).await?;
            print_list(&v, conn.json, KEY_COLS)
        }
        KeyCmd::Delete { subaccount, instance, id } => {
            let path = format!("/subaccounts/{subaccount}/service-instances/{instance}/service-keys/{id}");
            c.call(reqwest::Method::DELETE, &path, None).await?;
            deleted(conn.json, "service key", &id)
        }
    }
}

fn deleted(json_out: bool, what: &str, id: &str) -> anyhow::Result<()> {
    if json_out {
        println!("{}", json!({ "deleted": id }));
    } else {
        println!("deleted {what} {id}");
    }
    Ok(())
}

/// `ferry connector enroll`: asks the admin API for a connector certificate and writes what a
/// standalone `ferry connector run` needs into `out`.
pub async fn enroll(
    conn: Connection,
    subaccount: String,
    location: String,
    out: PathBuf,
    validity_seconds: Option<u64>,
) -> anyhow::Result<()> {
    let c = Client::connect(&conn).await?;
    let mut body = json!({ "location_id": location });
    if let Some(v) = validity_seconds {
        body["validity_seconds"] = json!(v);
    }
    let v = c.call(reqwest::Method::POST, &format!("/subaccounts/{subaccount}/connectors"), Some(body)).await?;
    let get = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned).context("incomplete enrollment answer");
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join("ca.pem"), get("ca")?)?;
    std::fs::write(out.join("connector.pem"), get("certificate")?)?;
    crate::up::write_private(&out.join("connector-key.pem"), get("key")?.as_bytes())?;
    // The same answer as SAP's "authentication data", for the connector admin API
    // (`POST /api/v1/configuration/subaccounts {"authenticationData": ...}`).
    crate::up::write_private(&out.join("authentication-data.json"), &serde_json::to_vec_pretty(&v)?)?;
    let config = out.join("connector.toml");
    if !config.exists() {
        let tunnel = get("tunnel")?;
        let server_name = tunnel.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or("localhost");
        std::fs::write(
            &config,
            format!(
                "# Written by `ferry connector enroll`; see docs/configuration.md (standalone connector).\n\
                 proxies = [\"{tunnel}\"]\nserver_name = \"{server_name}\"\nca_file = \"ca.pem\"\n\
                 certificate_file = \"connector.pem\"\nkey_file = \"connector-key.pem\"\n\n\
                 # [[mappings]]\n# virtualHost = \"erp.virtual\"\n# virtualPort = 8000\n# localHost = \"10.0.0.5\"\n\
                 # localPort = 8000\n# protocol = \"HTTP\"\n# resources = [{{ path = \"/\", exactMatchOnly = false }}]\n"
            ),
        )?;
    }
    println!(
        "enrolled: subaccount {subaccount}, location {:?}; files in {} (run: ferry connector run --config {})",
        location,
        out.display(),
        config.display()
    );
    Ok(())
}
