//! `ferry destinations|fragments|certificates ...`: a client of the Destination Service REST API
//! (SPEC §1.6–1.8), authenticated as an app would be: a client-credentials token from the
//! destination binding's `url`, then calls to its `uri`. So it works against any Ferry (or SAP's
//! own service) that the caller has a service key for, not only a local `ferry up`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ferry_client::Bindings;
use ferry_model::is_secret_property;
use reqwest::{Method, StatusCode, Url};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Value, json};

/// Which binding to use and how to print.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// A `default-env.json` holding VCAP_SERVICES with a destination binding (as `ferry up`
    /// writes it). Default: $VCAP_SERVICES, else ./default-env.json, else SERVICE_BINDING_ROOT.
    #[arg(long, global = true)]
    env_file: Option<PathBuf>,
    /// A service key of a destination instance (its credentials JSON); wins over --env-file.
    #[arg(long, global = true)]
    service_key: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust for HTTPS, such as the `ca.pem` of `ferry up`.
    #[arg(long, global = true, env = "FERRY_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Subaccount or service-instance level.
    #[arg(long, global = true, value_enum, default_value_t = Level::Subaccount)]
    level: Level,
    /// `table` for people, `json` for scripts.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Subaccount,
    Instance,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Subaccount => "subaccount",
            Level::Instance => "instance",
        }
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// The REST API's JSON object (an array for several destinations).
    Json,
    /// The cockpit's `.properties` export (`key=value` lines).
    Properties,
}

/// Where the properties of a create or update come from.
#[derive(clap::Args, Debug, Clone)]
pub struct Source {
    /// A JSON file (object or array) or a cockpit `.properties` export.
    #[arg(long, short)]
    file: Option<PathBuf>,
    /// Set a property (repeatable); applied after --file.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum DestinationCmd {
    /// List destinations (secrets are never listed).
    List,
    /// Show one destination; secret values are masked unless --show-secrets.
    Get {
        name: String,
        #[arg(long)]
        show_secrets: bool,
    },
    /// Create destinations from --file and/or --set KEY=VALUE.
    Create {
        #[command(flatten)]
        source: Source,
    },
    /// Replace a destination: NAME with --set/--unset edits the stored one; --file replaces it.
    Update {
        name: Option<String>,
        #[command(flatten)]
        source: Source,
        /// Remove a property (repeatable).
        #[arg(long, value_name = "KEY")]
        unset: Vec<String>,
    },
    /// Delete destinations.
    Delete {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Create destinations from export files (JSON or `.properties`) or folders of them.
    Import {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Update destinations that exist already instead of failing on them.
        #[arg(long)]
        overwrite: bool,
    },
    /// Export destinations (all if no NAME), secrets included, as JSON or `.properties`.
    Export {
        names: Vec<String>,
        #[arg(long, value_enum, default_value_t = ExportFormat::Json)]
        format: ExportFormat,
        /// A file; for several destinations as `.properties`, a folder (one file each).
        /// Default: standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum FragmentCmd {
    /// List fragments (secrets are never listed).
    List,
    /// Show one fragment; secret values are masked unless --show-secrets.
    Get {
        name: String,
        #[arg(long)]
        show_secrets: bool,
    },
    /// Create fragments from --file and/or --set KEY=VALUE.
    Create {
        #[command(flatten)]
        source: Source,
    },
    /// Replace a fragment: NAME with --set/--unset edits the stored one; --file replaces it.
    Update {
        name: Option<String>,
        #[command(flatten)]
        source: Source,
        #[arg(long, value_name = "KEY")]
        unset: Vec<String>,
    },
    /// Delete fragments.
    Delete {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum CertificateCmd {
    /// List certificates (names and types).
    List,
    /// Show one certificate; --out writes its file, --show-secrets prints its content.
    Get {
        name: String,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        show_secrets: bool,
    },
    /// Upload a certificate or keystore file (PEM, CER, CRT, DER, JKS, P12, PFX).
    Create {
        #[arg(long, short)]
        file: PathBuf,
        /// Default: the file's name.
        #[arg(long)]
        name: Option<String>,
        /// Default: from the file's extension.
        #[arg(long = "type")]
        kind: Option<String>,
    },
    /// Have the service generate a key and certificate (self-signed, or for --csr).
    Generate {
        /// Name of the entry, such as my-app.pem.
        #[arg(long)]
        name: String,
        /// Common name of the certificate.
        #[arg(long)]
        cn: String,
        /// Validity: a number with d (days), m (months) or y (years), such as 30d or 1y.
        #[arg(long, default_value = "1y")]
        validity: String,
        /// Renew it before it expires.
        #[arg(long)]
        auto_renew: bool,
        /// Encrypt the generated private key with the password in this environment variable.
        #[arg(long)]
        password_env: Option<String>,
        /// A certificate signing request (PEM file): the service signs it and keeps no key.
        #[arg(long)]
        csr: Option<PathBuf>,
    },
    /// Print the certificate chains of an entry (PEM), without keys.
    PublicKeys { name: String },
    /// Delete certificates.
    Delete {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// One of the three object collections of the API.
#[derive(Clone, Copy)]
struct Kind {
    collection: &'static str,
    name_key: &'static str,
    noun: &'static str,
    command: &'static str,
}

const DESTINATIONS: Kind =
    Kind { collection: "Destinations", name_key: "Name", noun: "destination", command: "destinations" };
const FRAGMENTS: Kind =
    Kind { collection: "DestinationFragments", name_key: "FragmentName", noun: "fragment", command: "fragments" };
const CERTIFICATES: Kind =
    Kind { collection: "Certificates", name_key: "Name", noun: "certificate", command: "certificates" };

type Props = Vec<(String, String)>;

/// A property list serialized as a JSON object in its order (serde_json's `Value` would sort).
struct Ordered<'a>(&'a [(String, String)]);

impl Serialize for Ordered<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

fn get<'a>(props: &'a [(String, String)], key: &str) -> Option<&'a str> {
    props.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn set(props: &mut Props, key: &str, value: &str) {
    match props.iter_mut().find(|(k, _)| k == key) {
        Some((_, v)) => *v = value.to_owned(),
        None => props.push((key.to_owned(), value.to_owned())),
    }
}

struct Client {
    http: reqwest::Client,
    /// `<uri>/destination-configuration/v1`.
    base: Url,
    token: String,
    level: Level,
    /// Where the binding came from, for error hints.
    source: String,
}

/// A non-2xx answer, with what the service said and what to do about it.
#[derive(Debug)]
struct ApiFailure {
    status: StatusCode,
    message: String,
}

impl Client {
    async fn connect(conn: &Connection) -> anyhow::Result<Self> {
        let (bindings, source) = bindings(conn)?;
        let binding = bindings.destination().with_context(|| {
            format!(
                "use a service key of a destination instance (--service-key), or --env-file (binding from {source})"
            )
        })?;
        if binding.credentials.client_secret.is_none() {
            bail!(
                "the destination binding in {source} has no 'clientsecret' (an x509 key?); this command needs a \
                 binding-secret service key"
            );
        }
        let ca = match &conn.ca_file {
            Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("--ca-file {}", p.display()))?),
            None => None,
        };
        let http = ferry_core::tls::http_client(ca.as_deref())?;
        let tokens = ferry_client::Client::new(bindings, ca.as_deref())?;
        let token = tokens.destination_service_token(None).await.with_context(|| {
            format!("cannot get a token for the destination binding in {source}; is the token service running?")
        })?;
        let token = token.expose().clone();
        let uri = binding.uri.as_str();
        let mut base = Url::parse(uri).with_context(|| format!("'uri' in {source} is not a URL: {uri}"))?;
        base.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("'uri' in {source} cannot be a base URL: {uri}"))?
            .pop_if_empty()
            .extend(["destination-configuration", "v1"]);
        Ok(Self { http, base, token, level: conn.level, source })
    }

    fn url(&self, kind: Kind, name: Option<&str>) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.push(&format!("{}{}", self.level.as_str(), kind.collection));
            if let Some(n) = name {
                segments.push(n);
            }
        }
        url
    }

    /// Sends a request; a non-2xx answer becomes an [`ApiFailure`].
    async fn send(&self, method: Method, url: Url, body: Option<String>) -> anyhow::Result<Result<String, ApiFailure>> {
        let mut req = self.http.request(method, url.clone()).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the Destination Service at {url} (from {})", self.source))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if status.is_success() {
            return Ok(Ok(text));
        }
        let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let message = ["ErrorMessage", "error_description", "message"]
            .iter()
            .find_map(|k| parsed.get(*k).and_then(Value::as_str))
            .map(str::to_owned)
            .unwrap_or_else(|| if text.is_empty() { "no details given".to_owned() } else { text });
        Ok(Err(ApiFailure { status, message }))
    }

    /// Like [`Client::send`], but a failure is an error that says what to do.
    async fn call(
        &self,
        method: Method,
        kind: Kind,
        name: Option<&str>,
        body: Option<String>,
    ) -> anyhow::Result<String> {
        match self.send(method, self.url(kind, name), body).await? {
            Ok(text) => Ok(text),
            Err(f) => Err(self.explain(kind, name, &f)),
        }
    }

    fn explain(&self, kind: Kind, name: Option<&str>, f: &ApiFailure) -> anyhow::Error {
        let level = self.level.as_str();
        let what = match name {
            Some(n) => format!("{} '{n}'", kind.noun),
            None => kind.noun.to_owned(),
        };
        let hint = match f.status {
            StatusCode::BAD_REQUEST => "fix what the message names and run the command again".to_owned(),
            StatusCode::UNAUTHORIZED => {
                format!("the service refused the token; check the binding in {}", self.source)
            }
            StatusCode::FORBIDDEN => format!("the binding in {} may not do this", self.source),
            StatusCode::NOT_FOUND => {
                format!("`ferry {} list --level {level}` shows what exists at {level} level", kind.command)
            }
            StatusCode::CONFLICT => format!(
                "it exists at {level} level; use `ferry {} update`{}",
                kind.command,
                if kind.command == "destinations" { " or `import --overwrite`" } else { "" }
            ),
            StatusCode::PAYLOAD_TOO_LARGE => "send a smaller file".to_owned(),
            _ => "the service failed; see its log".to_owned(),
        };
        anyhow::anyhow!("{what}: {} ({})\nhint: {hint}", f.message, f.status)
    }

    async fn list(&self, kind: Kind) -> anyhow::Result<Vec<Props>> {
        parse_objects(&self.call(Method::GET, kind, None, None).await?)
    }

    async fn get(&self, kind: Kind, name: &str) -> anyhow::Result<Props> {
        let text = self.call(Method::GET, kind, Some(name), None).await?;
        parse_objects(&text)?.into_iter().next().context("the service answered an empty object")
    }
}

/// The bindings to use and a label of where they came from: --service-key, else --env-file, else
/// the environment (VCAP_SERVICES, ./default-env.json, SERVICE_BINDING_ROOT).
fn bindings(conn: &Connection) -> anyhow::Result<(Bindings, String)> {
    if let Some(p) = &conn.service_key {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        let key: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))?;
        let source = p.display().to_string();
        return Ok((Bindings::from_service_key("destination", &key, &source)?, source));
    }
    if let Some(p) = &conn.env_file {
        return Ok((Bindings::from_default_env_file(p)?, p.display().to_string()));
    }
    let source = if std::env::var_os("VCAP_SERVICES").is_some() { "$VCAP_SERVICES" } else { "./default-env.json" };
    Ok((Bindings::from_env()?, source.to_owned()))
}

/// A JSON object or array of flat objects, keys in their order.
fn parse_objects(text: &str) -> anyhow::Result<Vec<Props>> {
    if text.trim() == "[]" {
        return Ok(Vec::new());
    }
    ferry_model::parse_file(text).context("the service answered something that is not a list of properties")
}

/// `--set KEY=VALUE` pairs.
fn parse_sets(sets: &[String]) -> anyhow::Result<Props> {
    sets.iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("--set {s:?}: write KEY=VALUE, such as --set URL=https://example.org"),
        })
        .collect()
}

fn read_objects(path: &Path) -> anyhow::Result<Vec<Props>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    ferry_model::parse_file(&text).with_context(|| format!("{}", path.display()))
}

/// The objects a create or update sends: the file's, then `--set` applied to each.
fn objects_of(kind: Kind, source: &Source) -> anyhow::Result<Vec<Props>> {
    let sets = parse_sets(&source.set)?;
    let mut items = match &source.file {
        Some(p) => read_objects(p)?,
        None if sets.is_empty() => bail!("give the {} as --file FILE and/or --set KEY=VALUE", kind.noun),
        None => vec![Vec::new()],
    };
    for item in &mut items {
        for (k, v) in &sets {
            set(item, k, v);
        }
    }
    Ok(items)
}

fn name_of(kind: Kind, props: &[(String, String)]) -> String {
    get(props, kind.name_key).unwrap_or_default().to_owned()
}

fn json_body(props: &[(String, String)]) -> anyhow::Result<String> {
    Ok(serde_json::to_string(&Ordered(props))?)
}

fn masked(props: Props, show_secrets: bool) -> Props {
    if show_secrets {
        return props;
    }
    props.into_iter().map(|(k, v)| if is_secret_property(&k) { (k, "***".to_owned()) } else { (k, v) }).collect()
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(&headers.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for r in rows {
        line(r);
    }
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_props(props: &[(String, String)], output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(&Ordered(props)),
        Output::Table => {
            // Multi-line values (PEM, JWKS) would break the columns; show them escaped.
            let rows: Vec<Vec<String>> =
                props.iter().map(|(k, v)| vec![k.clone(), v.escape_debug().to_string()]).collect();
            print_table(&["PROPERTY", "VALUE"], &rows);
            Ok(())
        }
    }
}

/// A short "where does it point" column for the destination list.
fn target(props: &[(String, String)]) -> String {
    ["URL", "Address", "ldap.url", "jco.client.ashost", "jco.client.mshost", "jco.client.wshost", "mail.smtp.host"]
        .iter()
        .find_map(|k| get(props, k))
        .unwrap_or_default()
        .to_owned()
}

fn done(output: Output, action: &str, kind: Kind, name: &str) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::json!({ "action": action, "kind": kind.noun, "name": name })),
        Output::Table => println!("{action} {} {name}", kind.noun),
    }
    Ok(())
}

/// POSTs each object; a failure names the object it belongs to.
async fn create_objects(c: &Client, kind: Kind, items: Vec<Props>, output: Output) -> anyhow::Result<()> {
    for item in items {
        let name = name_of(kind, &item);
        c.write(Method::POST, kind, &name, &item).await?;
        done(output, "created", kind, &name)?;
    }
    Ok(())
}

/// PUTs each object: with NAME and no file, the stored object edited by --set/--unset.
async fn update_objects(
    c: &Client,
    kind: Kind,
    name: Option<String>,
    source: &Source,
    unset: &[String],
    output: Output,
) -> anyhow::Result<()> {
    let mut items = match (&name, &source.file) {
        (_, Some(_)) => objects_of(kind, source)?,
        (Some(n), None) => {
            let mut current = c.get(kind, n).await?;
            for (k, v) in parse_sets(&source.set)? {
                set(&mut current, &k, &v);
            }
            vec![current]
        }
        (None, None) => bail!("give the {} NAME to edit with --set/--unset, or --file FILE", kind.noun),
    };
    for item in &mut items {
        if let Some(n) = &name
            && name_of(kind, item) != *n
        {
            bail!("{} '{n}' was given, but the file describes '{}'", kind.noun, name_of(kind, item));
        }
        item.retain(|(k, _)| !unset.contains(k));
    }
    for item in items {
        let name = name_of(kind, &item);
        c.write(Method::PUT, kind, &name, &item).await?;
        done(output, "updated", kind, &name)?;
    }
    Ok(())
}

async fn delete_objects(c: &Client, kind: Kind, names: &[String], output: Output) -> anyhow::Result<()> {
    for name in names {
        c.call(Method::DELETE, kind, Some(name), None).await?;
        done(output, "deleted", kind, name)?;
    }
    Ok(())
}

impl Client {
    /// POST or PUT of one object to the collection (the API takes the name from the body).
    async fn write(&self, method: Method, kind: Kind, name: &str, item: &[(String, String)]) -> anyhow::Result<()> {
        let label = Some(name).filter(|n| !n.is_empty());
        match self.send(method, self.url(kind, None), Some(json_body(item)?)).await? {
            Ok(_) => Ok(()),
            Err(f) => Err(self.explain(kind, label, &f)),
        }
    }
}

pub async fn destinations(conn: Connection, cmd: DestinationCmd) -> anyhow::Result<()> {
    let c = Client::connect(&conn).await?;
    let kind = DESTINATIONS;
    match cmd {
        DestinationCmd::List => {
            let items = c.list(kind).await?;
            match conn.output {
                Output::Json => print_json(&items.iter().map(|p| Ordered(p)).collect::<Vec<_>>()),
                Output::Table => {
                    let rows: Vec<Vec<String>> = items
                        .iter()
                        .map(|p| {
                            let g = |k: &str| get(p, k).unwrap_or_default().to_owned();
                            vec![g("Name"), g("Type"), g("ProxyType"), g("Authentication"), target(p)]
                        })
                        .collect();
                    print_table(&["NAME", "TYPE", "PROXY TYPE", "AUTHENTICATION", "TARGET"], &rows);
                    Ok(())
                }
            }
        }
        DestinationCmd::Get { name, show_secrets } => {
            print_props(&masked(c.get(kind, &name).await?, show_secrets), conn.output)
        }
        DestinationCmd::Create { source } => create_objects(&c, kind, objects_of(kind, &source)?, conn.output).await,
        DestinationCmd::Update { name, source, unset } => {
            update_objects(&c, kind, name, &source, &unset, conn.output).await
        }
        DestinationCmd::Delete { names } => delete_objects(&c, kind, &names, conn.output).await,
        DestinationCmd::Import { files, overwrite } => import(&c, &files, overwrite, conn.output).await,
        DestinationCmd::Export { names, format, out } => export(&c, names, format, out).await,
    }
}

/// Files named on the command line, and the files directly inside named folders (sorted).
fn expand(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot read the folder {}", p.display()))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect();
            inside.sort();
            out.extend(inside);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

async fn import(c: &Client, files: &[PathBuf], overwrite: bool, output: Output) -> anyhow::Result<()> {
    let kind = DESTINATIONS;
    let mut failed = 0;
    for path in expand(files)? {
        let items = match read_objects(&path) {
            Ok(items) => items,
            Err(e) => {
                eprintln!("{e:#}");
                failed += 1;
                continue;
            }
        };
        for item in items {
            let name = name_of(kind, &item);
            let body = json_body(&item)?;
            let mut outcome = c.send(Method::POST, c.url(kind, None), Some(body.clone())).await?.map(|_| "created");
            if overwrite && matches!(&outcome, Err(f) if f.status == StatusCode::CONFLICT) {
                outcome = c.send(Method::PUT, c.url(kind, None), Some(body)).await?.map(|_| "updated");
            }
            match outcome {
                Ok(action) => done(output, action, kind, &name)?,
                Err(f) => {
                    let label = Some(name.as_str()).filter(|n| !n.is_empty());
                    eprintln!("{}: {:#}", path.display(), c.explain(kind, label, &f));
                    failed += 1;
                }
            }
        }
    }
    if failed > 0 {
        bail!("{failed} destination(s) or file(s) could not be imported (see above)");
    }
    Ok(())
}

async fn export(c: &Client, names: Vec<String>, format: ExportFormat, out: Option<PathBuf>) -> anyhow::Result<()> {
    let kind = DESTINATIONS;
    let single = names.len() == 1;
    let names = if names.is_empty() { c.list(kind).await?.iter().map(|p| name_of(kind, p)).collect() } else { names };
    // Lists leave secrets out, so each destination is read on its own.
    let mut items = Vec::with_capacity(names.len());
    for name in &names {
        items.push(c.get(kind, name).await?);
    }
    let write = |path: &Path, text: &str| -> anyhow::Result<()> {
        // Exports hold passwords: readable by the owner only.
        crate::up::write_private(path, text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
    };
    match format {
        ExportFormat::Json => {
            let text = if single {
                serde_json::to_string_pretty(&Ordered(&items[0]))?
            } else {
                serde_json::to_string_pretty(&items.iter().map(|p| Ordered(p)).collect::<Vec<_>>())?
            };
            match out {
                Some(p) => write(&p, &format!("{text}\n"))?,
                None => println!("{text}"),
            }
        }
        ExportFormat::Properties => match (out, items.as_slice()) {
            (None, [one]) => {
                print!("{}", ferry_model::to_properties(one.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
            }
            (None, _) => bail!("{} destinations as .properties need --out FOLDER (one file each)", items.len()),
            (Some(p), [one]) if !p.is_dir() => {
                write(&p, &ferry_model::to_properties(one.iter().map(|(k, v)| (k.as_str(), v.as_str()))))?
            }
            (Some(dir), all) => {
                std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
                for item in all {
                    let text = ferry_model::to_properties(item.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                    write(&dir.join(format!("{}.properties", name_of(kind, item))), &text)?;
                }
            }
        },
    }
    eprintln!("exported {} destination(s), secrets included", items.len());
    Ok(())
}

pub async fn fragments(conn: Connection, cmd: FragmentCmd) -> anyhow::Result<()> {
    let c = Client::connect(&conn).await?;
    let kind = FRAGMENTS;
    match cmd {
        FragmentCmd::List => {
            let items = c.list(kind).await?;
            match conn.output {
                Output::Json => print_json(&items.iter().map(|p| Ordered(p)).collect::<Vec<_>>()),
                Output::Table => {
                    let rows: Vec<Vec<String>> = items
                        .iter()
                        .map(|p| {
                            let keys: Vec<&str> =
                                p.iter().map(|(k, _)| k.as_str()).filter(|k| *k != "FragmentName").collect();
                            vec![name_of(kind, p), keys.join(", ")]
                        })
                        .collect();
                    print_table(&["NAME", "PROPERTIES"], &rows);
                    Ok(())
                }
            }
        }
        FragmentCmd::Get { name, show_secrets } => {
            print_props(&masked(c.get(kind, &name).await?, show_secrets), conn.output)
        }
        FragmentCmd::Create { source } => create_objects(&c, kind, objects_of(kind, &source)?, conn.output).await,
        FragmentCmd::Update { name, source, unset } => {
            update_objects(&c, kind, name, &source, &unset, conn.output).await
        }
        FragmentCmd::Delete { names } => delete_objects(&c, kind, &names, conn.output).await,
    }
}

pub async fn certificates(conn: Connection, cmd: CertificateCmd) -> anyhow::Result<()> {
    let c = Client::connect(&conn).await?;
    let kind = CERTIFICATES;
    match cmd {
        CertificateCmd::List => {
            let items = c.list(kind).await?;
            match conn.output {
                Output::Json => print_json(&items.iter().map(|p| Ordered(p)).collect::<Vec<_>>()),
                Output::Table => {
                    let rows: Vec<Vec<String>> = items
                        .iter()
                        .map(|p| vec![name_of(kind, p), get(p, "Type").unwrap_or_default().to_owned()])
                        .collect();
                    print_table(&["NAME", "TYPE"], &rows);
                    Ok(())
                }
            }
        }
        CertificateCmd::Get { name, out, show_secrets } => {
            let text = c.call(Method::GET, kind, Some(&name), None).await?;
            let mut props = flat_certificate(&text)?;
            let content = get(&props, "Content").unwrap_or_default();
            let compact: String = content.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            let bytes = B64.decode(compact).context("the service answered a Content that is not base64")?;
            if let Some(p) = &out {
                crate::up::write_private(p, &bytes).with_context(|| format!("cannot write {}", p.display()))?;
                eprintln!("wrote {} bytes to {}", bytes.len(), p.display());
            }
            if !show_secrets {
                // Content may hold a private key: only its size is shown.
                props.retain(|(k, _)| k != "Content");
                props.push(("Bytes".to_owned(), bytes.len().to_string()));
            }
            print_props(&props, conn.output)
        }
        CertificateCmd::Create { file, name, kind: cert_type } => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let name = match name {
                Some(n) => n,
                None => file.file_name().and_then(|n| n.to_str()).context("give the certificate a --name")?.to_owned(),
            };
            let cert_type = cert_type.or_else(|| {
                let ext = file.extension()?.to_str()?.to_ascii_uppercase();
                ferry_model::CERTIFICATE_TYPES.contains(&ext.as_str()).then_some(ext)
            });
            let mut item = vec![("Name".to_owned(), name.clone())];
            if let Some(t) = cert_type {
                item.push(("Type".to_owned(), t));
            }
            item.push(("Content".to_owned(), B64.encode(bytes)));
            c.write(Method::POST, kind, &name, &item).await?;
            done(conn.output, "created", kind, &name)
        }
        CertificateCmd::Generate { name, cn, validity, auto_renew, password_env, csr } => {
            let (value, unit) = parse_validity(&validity)?;
            let mut attributes = json!({"CN": cn, "Validity": {"TimeUnit": unit, "Value": value}});
            if auto_renew {
                attributes["AutomaticRenew"] = true.into();
            }
            if let Some(var) = password_env {
                let password = std::env::var(&var).with_context(|| format!("--password-env: ${var} is not set"))?;
                attributes["Password"] = password.into();
            }
            if let Some(p) = csr {
                let bytes = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
                attributes["CSR"] = B64.encode(bytes).into();
            }
            let body = json!({"Name": name, "Type": "PEM", "Attributes": attributes}).to_string();
            c.call(Method::POST, kind, None, Some(body)).await?;
            done(conn.output, "generated", kind, &name)
        }
        CertificateCmd::PublicKeys { name } => {
            let mut url = c.url(kind, Some(&name));
            if let Ok(mut segments) = url.path_segments_mut() {
                segments.push("publicKeys");
            }
            let text = match c.send(Method::GET, url, None).await? {
                Ok(text) => text,
                Err(f) => return Err(c.explain(kind, Some(&name), &f)),
            };
            let keys: Vec<Value> =
                serde_json::from_str(&text).context("the service answered something that is not a list")?;
            match conn.output {
                Output::Json => print_json(&keys),
                Output::Table => {
                    for k in &keys {
                        let alias = k.get("Alias").and_then(Value::as_str).map(|a| format!(" (alias {a})"));
                        let dn = k.get("SubjectDN").and_then(Value::as_str).unwrap_or_default();
                        println!("# {dn}{}", alias.unwrap_or_default());
                        print!("{}", k.get("Content").and_then(Value::as_str).unwrap_or_default());
                    }
                    Ok(())
                }
            }
        }
        CertificateCmd::Delete { names } => delete_objects(&c, kind, &names, conn.output).await,
    }
}

/// A certificate answer as properties, `Attributes` flattened to `Attributes.CN` and so on.
fn flat_certificate(text: &str) -> anyhow::Result<Props> {
    let value: Value = serde_json::from_str(text).context("the service answered something that is not JSON")?;
    let object = value.as_object().context("the service answered something that is not an object")?;
    let scalar = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut props = Vec::new();
    for (k, v) in object {
        match v.as_object() {
            Some(inner) => props.extend(inner.iter().map(|(ik, iv)| (format!("{k}.{ik}"), scalar(iv)))),
            None => props.push((k.clone(), scalar(v))),
        }
    }
    Ok(props)
}

/// `30d`, `6m`, `1y` as SAP's `Validity` value and unit.
fn parse_validity(text: &str) -> anyhow::Result<(u32, &'static str)> {
    let bad = || anyhow::anyhow!("--validity {text:?}: write a number and d, m or y, such as 30d, 6m or 1y");
    let (number, unit) = text.trim().split_at(text.trim().len().saturating_sub(1));
    let unit = match unit.to_ascii_lowercase().as_str() {
        "d" => "DAYS",
        "m" => "MONTHS",
        "y" => "YEARS",
        _ => return Err(bad()),
    };
    Ok((number.parse().map_err(|_| bad())?, unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_and_masks() {
        assert_eq!(
            parse_sets(&["URL=https://a?b=c".into(), "Empty=".into()]).unwrap(),
            vec![("URL".to_owned(), "https://a?b=c".to_owned()), ("Empty".to_owned(), String::new())]
        );
        let err = parse_sets(&["novalue".into()]).unwrap_err().to_string();
        assert!(err.contains("write KEY=VALUE"), "{err}");
        assert!(parse_sets(&["=v".into()]).is_err());
        let props = vec![("User".to_owned(), "u".to_owned()), ("Password".to_owned(), "p".to_owned())];
        assert_eq!(get(&masked(props.clone(), false), "Password"), Some("***"));
        assert_eq!(get(&masked(props, true), "Password"), Some("p"));
    }

    #[test]
    fn ordered_json_keeps_the_order() {
        let props = vec![("Z".to_owned(), "1".to_owned()), ("A".to_owned(), "2".to_owned())];
        assert_eq!(json_body(&props).unwrap(), r#"{"Z":"1","A":"2"}"#);
    }

    #[test]
    fn binding_from_a_default_env_file() {
        let dir = std::env::temp_dir().join(format!("ferry-dest-cli-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vcap = serde_json::json!({
            "xsuaa": [{"label": "xsuaa", "credentials": {"clientid": "x"}}],
            "destination": [{"label": "destination", "tags": ["destination"], "credentials": {"uri": "http://d", "clientid": "c"}}]
        });
        let file = dir.join("default-env.json");
        // As a nested object and as a JSON string, both of which tools write.
        for v in [vcap.clone(), Value::String(vcap.to_string())] {
            std::fs::write(&file, serde_json::json!({ "VCAP_SERVICES": v }).to_string()).unwrap();
            let conn = Connection {
                env_file: Some(file.clone()),
                service_key: None,
                ca_file: None,
                level: Level::Subaccount,
                output: Output::Table,
            };
            let (bindings, _) = bindings(&conn).unwrap();
            assert_eq!(bindings.find("destination").unwrap().text("clientid").as_deref(), Some("c"));
        }
        std::fs::write(&file, r#"{"VCAP_SERVICES": {"xsuaa": []}}"#).unwrap();
        let conn = Connection {
            env_file: Some(file.clone()),
            service_key: None,
            ca_file: None,
            level: Level::Instance,
            output: Output::Json,
        };
        let err = bindings(&conn).unwrap().0.destination().unwrap_err().to_string();
        assert!(err.contains("no destination binding"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
