//! Errors: [`TpError`] for starting the proxy, [`ProxyError`] for answering a request the way
//! SAP's Transparent Proxy does (SPEC §5.3 headers).

use ferry_core::body::{self, BoxBody};
use http::{HeaderValue, Response, StatusCode};

/// Why the proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum TpError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Binding(#[from] ferry_client::BindingError),
    #[error(transparent)]
    Client(#[from] ferry_client::ClientError),
    #[error("TLS: {0}")]
    Tls(#[from] ferry_core::tls::TlsError),
}

/// Whose fault an error is (`x-error-origin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    TransparentProxy,
    Xsuaa,
    DestinationService,
    ConnectivityProxy,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::TransparentProxy => "Transparent Proxy",
            Origin::Xsuaa => "XSUAA",
            Origin::DestinationService => "Destination Service",
            Origin::ConnectivityProxy => "Connectivity Proxy",
        }
    }
}

/// A request the proxy answers itself, with SAP's error headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyError {
    pub status: StatusCode,
    pub message: String,
    pub origin: Origin,
    /// Status of the internal call that failed (`x-internal-error-code`).
    pub internal: Option<u16>,
}

impl ProxyError {
    pub fn new(status: StatusCode, origin: Origin, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), origin, internal: None }
    }

    /// A 400 caused by the caller's request headers.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Origin::TransparentProxy, message)
    }

    pub fn internal(mut self, code: u16) -> Self {
        self.internal = Some(code);
        self
    }

    pub fn into_response(self, request_id: &str) -> Response<BoxBody> {
        let mut resp = Response::new(body::full(format!("{}\n", self.message)));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        h.insert("x-error-message", header_text(&self.message));
        h.insert("x-error-origin", HeaderValue::from_static(self.origin.as_str()));
        if let Some(code) = self.internal {
            h.insert("x-internal-error-code", HeaderValue::from(code));
        }
        h.insert("x-request-id", header_text(request_id));
        h.insert("x-proxy-server", HeaderValue::from_static("Transparent Proxy"));
        resp
    }
}

/// A header value from any text: characters a header cannot carry become `?`.
pub(crate) fn header_text(text: &str) -> HeaderValue {
    let clean: String = text.chars().map(|c| if (' '..='~').contains(&c) { c } else { '?' }).collect();
    HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("?"))
}
