//! Shared runtime for every Ferry component.
//!
//! Nothing here knows about destinations, tunnels or tokens: it is the plumbing that each
//! component would otherwise write again — masked secrets, TLS set-up with a local CA, the one
//! accept loop (connection cap, `TCP_NODELAY`, span per connection, drain on shutdown), and
//! serving an HTTP router over plain TCP or TLS.

pub mod aead;
pub mod body;
pub mod keystore;
pub mod metrics;
pub mod secret;
pub mod serve;
pub mod tls;

pub use secret::Secret;
pub use tokio_util::sync::CancellationToken as Shutdown;

/// Installs the process-wide rustls crypto provider (aws-lc-rs). Safe to call many times.
pub fn init_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
