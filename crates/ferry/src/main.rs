//! The `ferry` binary: thin wiring of the component libraries.

mod admin_cli;
mod config;
mod connect;
mod destinations_cli;
mod k8s;
mod standalone;
mod transparent_proxy;
mod up;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferry", version, about = "Self-hostable SAP BTP Connectivity")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole stack in one process: token service, Destination Service, Connectivity
    /// Proxy and Cloud Connector(s); print the VCAP_SERVICES an app needs.
    Up(up::UpArgs),
    /// Open a local port that leads to the on-premise system of a TCP, LDAP or MAIL destination
    /// (through the Connectivity Proxy's SOCKS5 port, as an app on SAP BTP reaches it).
    Connect(connect::ConnectArgs),
    /// Run a Cloud Connector on its own (on premises), or enroll one with a running Ferry.
    Connector {
        #[command(subcommand)]
        cmd: ConnectorCmd,
    },
    /// Run a Connectivity Proxy replica on its own (HTTP, SOCKS5 and tunnel endpoint).
    Proxy {
        /// Proxy configuration file (TOML).
        #[arg(long, short)]
        config: std::path::PathBuf,
    },
    /// Run the Transparent Proxy: each Destination resource in a folder of YAML files becomes a
    /// local endpoint that adds the destination's credentials and route (SPEC §5).
    TransparentProxy {
        /// Transparent Proxy configuration file (TOML).
        #[arg(long, short)]
        config: std::path::PathBuf,
        /// Take the resources from the Kubernetes API (in-cluster service account or KUBECONFIG)
        /// instead of `resources_dir`, serve HTTP ones on `--http-listen` by Host and TCP ones on
        /// the port their backend Service targets.
        #[arg(long)]
        kubernetes: bool,
        /// With `--kubernetes`: the shared HTTP listener.
        #[arg(long, default_value = "0.0.0.0:8080", requires = "kubernetes")]
        http_listen: std::net::SocketAddr,
    },
    /// Check a configuration file without starting anything: it parses, every key is known and
    /// the values are valid (the files it names are not read, nothing is contacted). Exits
    /// non-zero with what to fix.
    CheckConfig {
        /// What the file configures: the command that would run it.
        #[arg(value_enum)]
        kind: ConfigKind,
        /// Configuration files (TOML).
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
    },
    /// Print the CustomResourceDefinition of the Transparent Proxy's `Destination` resource (YAML).
    Crdgen,
    /// Run the Kubernetes controller that turns `Destination` resources into Services leading to
    /// the Transparent Proxy pods (in a cluster, with the pod's service account).
    K8sController(k8s::ControllerArgs),
    /// Manage subaccounts (tenants) through the admin API of a running Ferry.
    Subaccount {
        #[command(flatten)]
        conn: admin_cli::Connection,
        #[command(subcommand)]
        cmd: admin_cli::SubaccountCmd,
    },
    /// Manage service instances (destination, connectivity, xsuaa) of a subaccount.
    ServiceInstance {
        #[command(flatten)]
        conn: admin_cli::Connection,
        #[command(subcommand)]
        cmd: admin_cli::InstanceCmd,
    },
    /// Manage service keys (bindings' credentials) of a service instance.
    ServiceKey {
        #[command(flatten)]
        conn: admin_cli::Connection,
        #[command(subcommand)]
        cmd: admin_cli::KeyCmd,
    },
    /// Manage destinations through the Destination Service REST API, with a destination
    /// binding (`--service-key`, `--env-file default-env.json` or VCAP_SERVICES).
    Destinations {
        #[command(flatten)]
        conn: destinations_cli::Connection,
        #[command(subcommand)]
        cmd: destinations_cli::DestinationCmd,
    },
    /// Manage destination fragments through the Destination Service REST API.
    Fragments {
        #[command(flatten)]
        conn: destinations_cli::Connection,
        #[command(subcommand)]
        cmd: destinations_cli::FragmentCmd,
    },
    /// Manage certificates and keystores of the Destination Service.
    Certificates {
        #[command(flatten)]
        conn: destinations_cli::Connection,
        #[command(subcommand)]
        cmd: destinations_cli::CertificateCmd,
    },
}

/// The commands that read a configuration file, for `check-config`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ConfigKind {
    /// `ferry up --config`
    Up,
    /// `ferry proxy --config`
    Proxy,
    /// `ferry connector run --config`
    Connector,
    /// `ferry transparent-proxy --config`
    TransparentProxy,
    /// `ferry k8s-controller --config`
    K8sController,
}

/// `ferry check-config`: every file checked, each one's verdict printed; an error if any fails.
fn check_config(kind: ConfigKind, files: &[std::path::PathBuf]) -> anyhow::Result<()> {
    let mut failed = 0;
    for file in files {
        let result = match kind {
            ConfigKind::Up => config::FileConfig::load(file).map(drop),
            ConfigKind::Proxy => standalone::check_proxy(file),
            ConfigKind::Connector => standalone::check_connector(file),
            ConfigKind::TransparentProxy => transparent_proxy::check(file),
            ConfigKind::K8sController => ferry_k8s::Config::load(file).map(drop).map_err(anyhow::Error::from),
        };
        match result {
            Ok(()) => println!("{}: valid", file.display()),
            Err(e) => {
                failed += 1;
                let (name, e) = (file.display().to_string(), format!("{e:#}"));
                // Most errors name the file already.
                if e.contains(&name) { println!("{e}") } else { println!("{name}: {e}") }
            }
        }
    }
    anyhow::ensure!(failed == 0, "{failed} of {} configuration files are not valid", files.len());
    Ok(())
}

#[derive(Subcommand)]
enum ConnectorCmd {
    /// Obtain a tunnel certificate for a subaccount and location id from a running Ferry's admin
    /// API, and write it with a starter `connector.toml` into `--out`.
    Enroll {
        #[command(flatten)]
        conn: admin_cli::Connection,
        #[arg(long)]
        subaccount: String,
        /// Location id ("" = the default location).
        #[arg(long, default_value = "")]
        location: String,
        #[arg(long, default_value = "connector")]
        out: std::path::PathBuf,
        /// Lifetime of the certificate in seconds (default: a year). A connector run with the
        /// admin API renews it at `certificate_renew_at` of its lifetime.
        #[arg(long)]
        validity_seconds: Option<u64>,
    },
    /// Check the hash chain of audit log files; exits non-zero naming the first changed line.
    AuditVerify {
        /// Audit log files (`audit-log.jsonl`, rotated `audit-log_<time>.jsonl`) of one
        /// folder, or the folder: checked as one chain across the rotated files.
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
    },
    /// Run the connector described by a configuration file.
    Run {
        #[arg(long, short)]
        config: std::path::PathBuf,
    },
}

/// `TOKIO_WORKER_THREADS`, checked here: tokio reads it too, but panics on a bad value.
fn worker_threads() -> anyhow::Result<Option<usize>> {
    let Some(v) = std::env::var_os("TOKIO_WORKER_THREADS") else { return Ok(None) };
    match v.to_str().and_then(|s| s.trim().parse::<usize>().ok()) {
        Some(n) if n > 0 => Ok(Some(n)),
        _ => anyhow::bail!("TOKIO_WORKER_THREADS must be a whole number of at least 1, not {v:?}"),
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,ferry=info,ferry::audit=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads()? {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build()?;
    match cli.command {
        Command::Up(args) => rt.block_on(up::up(args)),
        Command::Connect(args) => rt.block_on(connect::connect(args)),
        Command::Connector { cmd: ConnectorCmd::Enroll { conn, subaccount, location, out, validity_seconds } } => {
            rt.block_on(admin_cli::enroll(conn, subaccount, location, out, validity_seconds))
        }
        Command::Connector { cmd: ConnectorCmd::Run { config } } => rt.block_on(standalone::connector(&config)),
        Command::Connector { cmd: ConnectorCmd::AuditVerify { files } } => {
            let mut set = Vec::new();
            for f in files {
                if f.is_dir() {
                    set.extend(ferry_connector::audit::log_files(&f));
                } else {
                    set.push(f);
                }
            }
            match ferry_connector::audit::verify_set(&set) {
                Ok(counts) => {
                    for (f, n) in counts {
                        println!("{}: ok, {n} entries", f.display());
                    }
                    Ok(())
                }
                Err((f, e)) => {
                    println!("{}: {e}", f.display());
                    anyhow::bail!("the audit log failed verification")
                }
            }
        }
        Command::Proxy { config } => rt.block_on(standalone::proxy(&config)),
        Command::TransparentProxy { config, kubernetes, http_listen } => {
            user_error(rt.block_on(transparent_proxy::run(&config, kubernetes.then_some(http_listen))))
        }
        Command::CheckConfig { kind, files } => check_config(kind, &files),
        Command::Crdgen => k8s::crdgen(),
        Command::K8sController(args) => rt.block_on(k8s::controller(args)),
        Command::Subaccount { conn, cmd } => rt.block_on(admin_cli::subaccount(conn, cmd)),
        Command::ServiceInstance { conn, cmd } => rt.block_on(admin_cli::instance(conn, cmd)),
        Command::ServiceKey { conn, cmd } => rt.block_on(admin_cli::key(conn, cmd)),
        Command::Destinations { conn, cmd } => user_error(rt.block_on(destinations_cli::destinations(conn, cmd))),
        Command::Fragments { conn, cmd } => user_error(rt.block_on(destinations_cli::fragments(conn, cmd))),
        Command::Certificates { conn, cmd } => user_error(rt.block_on(destinations_cli::certificates(conn, cmd))),
    }
}

/// A failed command prints what to fix and exits 1, without the backtrace that returning the
/// error from `main` adds when RUST_BACKTRACE is set: these errors are the user's to act on.
fn user_error(result: anyhow::Result<()>) -> anyhow::Result<()> {
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}
