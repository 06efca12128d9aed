//! Errors of [`Client`](crate::Client) and [`HttpClient`](crate::HttpClient), each naming the hop
//! that failed, so "the token service refused the client" and "the backend answered 500" never
//! look alike.

use std::fmt;

use crate::bindings::BindingError;

/// The hop of a request chain: app → token service → Destination Service → Connectivity Proxy →
/// backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// The binding's token service (the app's own tokens), or the token service of a destination
    /// (`tokenServiceURL`) when the Destination Service could not get the destination's token
    /// there; [`ClientError::Hop`]'s `url` says which.
    TokenService,
    DestinationService,
    ConnectivityProxy,
    Backend,
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hop::TokenService => "token service",
            Hop::DestinationService => "Destination Service",
            Hop::ConnectivityProxy => "Connectivity Proxy",
            Hop::Backend => "backend",
        })
    }
}

/// What went wrong, and where.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Binding(#[from] BindingError),
    /// A hop could not be reached or answered an error.
    #[error("{hop} at {url}: {message}")]
    Hop { hop: Hop, url: String, status: Option<u16>, message: String },
    /// The Destination Service has no destination of that name (at the level asked for).
    #[error("destination {name:?} was not found by the Destination Service (404)")]
    NotFound { name: String },
    /// The destination was found but cannot be used as asked.
    #[error("destination {name:?}: {message}")]
    Destination { name: String, message: String },
    /// TLS material (a CA, a client certificate) is unusable.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The hop failed so often lately that its circuit breaker refuses calls for a while.
    #[error("{hop} at {url}: {message}")]
    CircuitOpen { hop: Hop, url: String, message: String },
    /// The SOCKS5 handshake with the Connectivity Proxy failed.
    #[error("Connectivity Proxy (SOCKS5): {0}")]
    Socks(#[from] crate::socks5::ConnectError),
}

impl ClientError {
    /// The hop that failed, where one did.
    pub fn hop(&self) -> Option<Hop> {
        match self {
            ClientError::Hop { hop, .. } | ClientError::CircuitOpen { hop, .. } => Some(*hop),
            ClientError::NotFound { .. } => Some(Hop::DestinationService),
            ClientError::Socks(_) => Some(Hop::ConnectivityProxy),
            _ => None,
        }
    }

    /// The HTTP status of a hop's answer, where there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Hop { status, .. } => *status,
            _ => None,
        }
    }

    pub(crate) fn transport(hop: Hop, url: &str, e: &reqwest::Error) -> Self {
        let message = if e.is_timeout() {
            "no answer in time".to_owned()
        } else if e.is_connect() {
            format!("cannot connect ({})", source_chain(e))
        } else {
            source_chain(e)
        };
        ClientError::Hop { hop, url: url.to_owned(), status: None, message }
    }
}

/// `e` and its causes, since reqwest's own message ("error sending request") says little.
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}
