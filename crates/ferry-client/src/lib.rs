//! The client side of Ferry (and SAP BTP Connectivity), what the SAP Cloud SDK does for
//! JavaScript apps, for Rust apps:
//!
//! - [`bindings`]: service bindings from `VCAP_SERVICES`, `default-env.json` and mounted
//!   bindings (`SERVICE_BINDING_ROOT`), with the SDK's precedence, plus env destinations;
//! - [`Client`]: service tokens and [`Client::get_destination`], cached with the SDK's rules;
//! - [`HttpClient`]: requests through a destination (auth headers, Connectivity Proxy for
//!   `OnPremise`, CSRF tokens, retries), and [`Client::connect_tcp`] for `TCP`/`LDAP`/`MAIL`
//!   destinations through the proxy's SOCKS5 port;
//! - [`socks5`] and [`target`]: the protocol plumbing under `connect_tcp`.
//!
//! Every error says which hop failed ([`Hop`]). Token and Destination Service calls go through
//! the SDK's circuit breaker ([`BreakerOptions`], [`Client::set_circuit_breaker`]).
//!
//! ```no_run
//! use ferry_client::{Client, HttpClient};
//! # async fn run() -> Result<(), ferry_client::ClientError> {
//! let client = Client::from_env()?; // VCAP_SERVICES, ./default-env.json, SERVICE_BINDING_ROOT
//! let http = HttpClient::new(client.clone(), Default::default())?;
//! let erp = client.get_destination("erp", &Default::default()).await?;
//! let body = http.get(&erp, "/items").await?.text().await.unwrap_or_default();
//! # let _ = body; Ok(()) }
//! ```

pub mod bindings;
mod breaker;
pub mod client;
pub mod error;
pub mod http;
pub mod socks5;
pub mod target;

pub use bindings::{BindingError, Bindings, ConnectivityBinding, DestinationBinding, OAuthCredentials, XsuaaBinding};
pub use breaker::BreakerOptions;
pub use client::{AuthToken, Certificate, Client, Destination, Level, Options, Tenant};
pub use error::{ClientError, Hop};
pub use http::{HttpClient, HttpOptions, Request};
pub use socks5::{ConnectError, connect_tcp, handshake};
pub use target::{MailProtocol, TargetError, TcpTarget, tcp_target};
