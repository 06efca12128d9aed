//! Fetches an on-premise resource through `ferry up`, the way an app on SAP BTP would:
//! token → Destination Service → Connectivity Proxy → Cloud Connector → backend.
//!
//! ```sh
//! ferry up --config examples/ferry.toml      # writes ./default-env.json
//! cargo run -p ferry-client --example onpremise -- erp /items?top=1
//! ```
//!
//! Arguments: destination name (default `erp`) and a path below its URL (default none). The
//! bindings come from `VCAP_SERVICES`, else `./default-env.json`, else `SERVICE_BINDING_ROOT`;
//! `FERRY_CA_FILE` names an extra CA to trust (the `ca.pem` in ferry up's data folder), needed
//! when a user JWT selects a tenant token from the HTTPS token endpoint.

use ferry_client::{Client, HttpClient, Options};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    ferry_core::init_crypto();
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "erp".to_owned());
    let path = args.next().unwrap_or_default();

    let client = Client::from_env()?;
    let (status, body) = fetch(&client, &name, &path).await?;
    eprintln!("{status}");
    println!("{body}");
    Ok(())
}

/// The destination's resource at `path`: its HTTP status and body. (`crates/ferry/tests/client.rs`
/// runs this function against `ferry up`.)
pub async fn fetch(client: &Client, name: &str, path: &str) -> Result<(u16, String), Box<dyn std::error::Error>> {
    let http = HttpClient::new(client.clone(), Default::default())?;
    let destination = client.get_destination(name, &Options::default()).await?;
    eprintln!("{destination:?}");
    let response = http.get(&destination, path).await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}
