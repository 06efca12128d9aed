//! Pooled HTTP/1.1 connections to backends and to the Connectivity Proxy.
//!
//! hyper-util's legacy client pools by scheme and authority only, so there is one client per
//! [`PoolKey`]: everything that makes a connection unfit for another request (the route, the
//! client certificate presented in the TLS handshake, the tenant) is in the key, and a
//! connection is only ever reused for requests that would have opened the same one.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Idle connections are closed after this long (below the usual 60–120 s server keep-alive,
/// so the proxy seldom sends on a connection the server is closing).
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);
const MAX_IDLE_PER_HOST: usize = 32;

/// Where a pooled connection goes and what identifies the caller on it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum PoolKey {
    /// Straight to the URL's host; TLS with the client certificate whose hash is given, if any.
    Direct { client_cert: Option<[u8; 32]> },
    /// To the Connectivity Proxy's HTTP port, per tenant (the token on each request is the
    /// tenant's, but a connection is never shared across tenants all the same).
    Proxy { host: String, port: u16, tenant: Option<ferry_client::Tenant> },
}

pub(crate) type Pooled = Client<Connector, Incoming>;

/// The clients by key, created on first use.
pub(crate) struct Pools {
    clients: Mutex<HashMap<PoolKey, Pooled>>,
    connect_timeout: Duration,
    proxy_connect_timeout: Duration,
}

impl Pools {
    pub fn new(connect_timeout: Duration, proxy_connect_timeout: Duration) -> Self {
        Self { clients: Mutex::new(HashMap::new()), connect_timeout, proxy_connect_timeout }
    }

    /// The client for `key`; `tls` gives the TLS setup for `https` URLs of a direct route, and
    /// is called only when the key is new.
    pub fn client<E>(
        &self,
        key: PoolKey,
        tls: impl FnOnce() -> Result<tokio_rustls::TlsConnector, E>,
    ) -> Result<Pooled, E> {
        let mut clients = match self.clients.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let tls = tls()?;
        let connector = match &key {
            PoolKey::Direct { .. } => {
                Connector { tls: tls.clone(), proxy: None, connect_timeout: self.connect_timeout }
            }
            PoolKey::Proxy { host, port, .. } => Connector {
                tls: tls.clone(),
                proxy: Some((host.clone(), *port)),
                connect_timeout: self.proxy_connect_timeout,
            },
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
            // The proxy sets Host itself (the destination URL's authority).
            .set_host(false)
            .build(connector);
        clients.insert(key, client.clone());
        Ok(client)
    }
}

/// Opens a connection for the legacy client: TCP (`TCP_NODELAY`) to the URL's host, with TLS
/// for `https`, or to the Connectivity Proxy, marked as a proxy so requests keep absolute form.
#[derive(Clone)]
pub(crate) struct Connector {
    tls: tokio_rustls::TlsConnector,
    proxy: Option<(String, u16)>,
    connect_timeout: Duration,
}

/// Why a connection could not be opened; the text goes into the error answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the URL has no host")]
    NoHost,
    #[error("invalid host name for TLS: {0}")]
    Name(String),
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let https = uri.scheme_str() == Some("https");
            let (host, port) = match &this.proxy {
                Some((h, p)) => (h.clone(), *p),
                None => {
                    let host = uri.host().ok_or(ConnectError::NoHost)?;
                    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
                    (host, uri.port_u16().unwrap_or(if https { 443 } else { 80 }))
                }
            };
            let tcp = tokio::time::timeout(this.connect_timeout, TcpStream::connect((host.as_str(), port)))
                .await
                .map_err(|_| ConnectError::Timeout)??;
            tcp.set_nodelay(true)?;
            if this.proxy.is_some() {
                return Ok(TokioIo::new(Stream::Proxy(tcp)));
            }
            if !https {
                return Ok(TokioIo::new(Stream::Plain(tcp)));
            }
            let name =
                rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| ConnectError::Name(e.to_string()))?;
            let tls = this.tls.connect(name, tcp).await?;
            Ok(TokioIo::new(Stream::Tls(Box::new(tls))))
        })
    }
}

/// A connection the legacy client can pool.
pub(crate) enum Stream {
    Plain(TcpStream),
    Proxy(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new().proxy(matches!(self, Stream::Proxy(_)))
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) | Stream::Proxy(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) | Stream::Proxy(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) | Stream::Proxy(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) | Stream::Proxy(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) | Stream::Proxy(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) | Stream::Proxy(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}
