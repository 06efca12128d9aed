//! The `ferry` binary: thin wiring of the component libraries.

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
    }
}
