//! The `ferry` binary: thin wiring of the component libraries.

mod admin_cli;
mod config;
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
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Up(args) => rt.block_on(up::up(args)),
        Command::Subaccount { conn, cmd } => rt.block_on(admin_cli::subaccount(conn, cmd)),
        Command::ServiceInstance { conn, cmd } => rt.block_on(admin_cli::instance(conn, cmd)),
        Command::ServiceKey { conn, cmd } => rt.block_on(admin_cli::key(conn, cmd)),
    }
}
