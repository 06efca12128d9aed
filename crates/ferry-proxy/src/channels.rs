//! Service channels, cloud side (SAP's on-premise → cloud "K8S cluster" channels): a Cloud
//! Connector carries what on-premise clients send to a local port through its tunnel to a
//! service registered here for its subaccount.
//!
//! The tunnel connection's HTTP/2 roles put the proxy on the client side, so a connector cannot
//! open a stream on it. For channels it dials a second connection to the same tunnel port with
//! the same client certificate but ALPN [`CHANNEL_ALPN`]; on that one the connector is the
//! HTTP/2 client and opens one stream per on-premise connection (`ferry-kind: channel`,
//! `ferry-target: <service id>`, request body = on-premise → cloud; the answer is `200` and the
//! byte stream back, or `403`/`502` with `ferry-error`). The subaccount comes from the
//! certificate, so a connector reaches only the services registered for its own subaccount.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::Shutdown;
use ferry_core::body::{self, BoxBody};
use ferry_proto::tunnel::*;
use http::{HeaderValue, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::tenant_limit::{Held, TenantStreams};

/// One cloud-side service that service channels of `subaccount` may reach as `id`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelTarget {
    /// Subaccount id (the `zid` of its tokens, the subaccount of its connector certificates).
    pub subaccount: String,
    /// Service id a channel names (SAP: the K8S channel's service); letters, digits, `.`, `-`,
    /// `_`, at most 64.
    pub id: String,
    /// `host:port` the proxy connects to (e.g. a Kubernetes service `echo.ns.svc:7000`).
    pub target: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChannelTargetError {
    #[error("service channel target {0:?}: subaccount must not be empty")]
    NoSubaccount(String),
    #[error("service channel target id {0:?}: use 1 to 64 letters, digits, '.', '-' or '_'")]
    BadId(String),
    #[error("service channel target {id:?} of subaccount {subaccount}: target {target:?} must be host:port")]
    BadTarget { subaccount: String, id: String, target: String },
    #[error("service channel target {id:?} is registered twice for subaccount {subaccount}")]
    Duplicate { subaccount: String, id: String },
}

/// The allow-list of channel targets, per subaccount.
#[derive(Clone, Debug, Default)]
pub struct ChannelTargets {
    by_subaccount: HashMap<String, HashMap<String, String>>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl ChannelTargets {
    /// Validates every entry: a known id, a `host:port` target, no id twice per subaccount.
    pub fn new(entries: impl IntoIterator<Item = ChannelTarget>) -> Result<Self, ChannelTargetError> {
        let mut by_subaccount: HashMap<String, HashMap<String, String>> = HashMap::new();
        for e in entries {
            if e.subaccount.is_empty() {
                return Err(ChannelTargetError::NoSubaccount(e.id));
            }
            if !valid_id(&e.id) {
                return Err(ChannelTargetError::BadId(e.id));
            }
            if split_host_port(&e.target).is_none() {
                return Err(ChannelTargetError::BadTarget { subaccount: e.subaccount, id: e.id, target: e.target });
            }
            let ids = by_subaccount.entry(e.subaccount.clone()).or_default();
            if ids.insert(e.id.clone(), e.target).is_some() {
                return Err(ChannelTargetError::Duplicate { subaccount: e.subaccount, id: e.id });
            }
        }
        Ok(Self { by_subaccount })
    }

    /// The target of `id` for `subaccount`; never one of another subaccount.
    pub fn target(&self, subaccount: &str, id: &str) -> Option<&str> {
        self.by_subaccount.get(subaccount)?.get(id).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.by_subaccount.is_empty()
    }
}

/// What the channel connections of all connectors share.
#[derive(Clone)]
pub(crate) struct Channels {
    pub(crate) targets: Arc<ChannelTargets>,
    /// The per-subaccount stream cap HTTP requests and SOCKS5 connections count in as well.
    pub(crate) streams: Arc<TenantStreams>,
}

/// Timing of a channel connection.
pub(crate) struct Limits {
    pub(crate) heartbeat: Duration,
    pub(crate) connect_timeout: Duration,
}

/// Serves a connector's channel connection (ALPN [`CHANNEL_ALPN`], identity checked by the
/// caller) until it ends or `shutdown`.
pub(crate) async fn serve<IO>(
    io: IO,
    subaccount: String,
    location: String,
    channels: Channels,
    limits: Limits,
    shutdown: Shutdown,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tracing::info!(%subaccount, location = %location, "service channel connection of a Cloud Connector");
    let sub = Arc::new(subaccount);
    let (Channels { targets, streams }, Limits { heartbeat, connect_timeout }) = (channels, limits);
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let (targets, sub, streams) = (targets.clone(), sub.clone(), streams.clone());
        async move { Ok::<_, std::convert::Infallible>(open(req, &sub, &targets, &streams, connect_timeout).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buf_size(SEND_BUFFER)
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(heartbeat)
        .keep_alive_timeout(heartbeat);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "service channel connection ended") },
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        }
    }
}

fn refuse(status: StatusCode, error: &'static str, message: String) -> Response<BoxBody> {
    let mut r = Response::new(body::full(message));
    *r.status_mut() = status;
    r.headers_mut().insert(ERROR, HeaderValue::from_static(error));
    r
}

/// One channel stream: the registered target of the connector's own subaccount, connected and
/// relayed both ways; each direction half-closes on its own.
async fn open(
    req: hyper::Request<Incoming>,
    subaccount: &str,
    targets: &ChannelTargets,
    streams: &TenantStreams,
    connect_timeout: Duration,
) -> Response<BoxBody> {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    if header(KIND) != KIND_CHANNEL {
        return refuse(StatusCode::BAD_REQUEST, ERROR_BAD_REQUEST, "only channel streams here".into());
    }
    let id = header(TARGET).to_owned();
    let Some(target) = targets.target(subaccount, &id) else {
        tracing::warn!(%subaccount, service = %id, "service channel refused: no such target registered for the subaccount");
        return refuse(
            StatusCode::FORBIDDEN,
            ERROR_DENIED,
            format!("no service channel target {id:?} is registered for subaccount {subaccount}"),
        );
    };
    let Some(permit) = streams.try_acquire(subaccount) else {
        tracing::info!(%subaccount, service = %id, limit = streams.limit(), "service channel refused: subaccount at its stream limit");
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            ERROR_LIMIT,
            format!(
                "subaccount {subaccount} has {} requests, SOCKS5 connections and channel streams open through the \
                 proxy, its limit; retry when some have finished",
                streams.limit()
            ),
        );
    };
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(%subaccount, service = %id, %target, error = %e, "service channel target unreachable");
            return refuse(StatusCode::BAD_GATEWAY, ERROR_UNREACHABLE, format!("service {id:?} is unreachable"));
        }
        Err(_) => {
            return refuse(
                StatusCode::GATEWAY_TIMEOUT,
                ERROR_TIMEOUT,
                format!("connecting to service {id:?} timed out"),
            );
        }
    };
    let _ = stream.set_nodelay(true);
    tracing::debug!(%subaccount, service = %id, %target, "service channel stream opened");
    let (read, write) = stream.into_split();
    let upstream = req.into_body();
    // The slot is held until both directions have ended.
    let permit = Arc::new(permit);
    let held = permit.clone();
    tokio::spawn(async move {
        let _held = held;
        if let Err(e) = body::copy_to_writer(upstream, write).await {
            tracing::debug!(error = %e, "channel → target copy ended");
        }
    });
    Response::new(body::boxed(Held { inner: body::from_reader(read), _permit: permit }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(sub: &str, id: &str, target: &str) -> ChannelTarget {
        ChannelTarget { subaccount: sub.into(), id: id.into(), target: target.into() }
    }

    #[test]
    fn targets_are_validated_and_kept_per_subaccount() {
        let ok = ChannelTargets::new([t("a", "echo", "127.0.0.1:7"), t("b", "echo", "10.0.0.1:8")]).unwrap();
        assert_eq!(ok.target("a", "echo"), Some("127.0.0.1:7"));
        assert_eq!(ok.target("b", "echo"), Some("10.0.0.1:8"));
        assert_eq!(ok.target("c", "echo"), None);
        assert_eq!(ok.target("a", "other"), None);
        assert_eq!(ChannelTargets::new([t("", "x", "h:1")]).unwrap_err(), ChannelTargetError::NoSubaccount("x".into()));
        for bad in ["", "a b", "a/b", &"x".repeat(65)] {
            assert!(matches!(ChannelTargets::new([t("a", bad, "h:1")]), Err(ChannelTargetError::BadId(_))), "{bad}");
        }
        for bad in ["h", "h:", ":1", "h:70000"] {
            assert!(matches!(ChannelTargets::new([t("a", "x", bad)]), Err(ChannelTargetError::BadTarget { .. })));
        }
        assert!(matches!(
            ChannelTargets::new([t("a", "x", "h:1"), t("a", "x", "h:2")]),
            Err(ChannelTargetError::Duplicate { .. })
        ));
    }
}
