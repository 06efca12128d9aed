//! The HTTP forward proxy (SAP's port 20003): absolute-form `http://virtual-host:port/...`
//! requests, authenticated per request by `Proxy-Authorization: Bearer <JWT>`, routed into the
//! tunnel of the Cloud Connector for (token's subaccount, `SAP-Connectivity-SCC-Location_ID`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::task::{Context, Poll};

use ferry_core::Shutdown;
use ferry_core::body::{self, BoxBody};
use ferry_proto::tunnel;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::oneshot;

use crate::Shared;
use crate::retry::OpenError;
use crate::socks::{Active, Stoppable};

/// SAP's documented limit for a request line or a header line.
pub const MAX_HEADER_LINE: usize = 8192;

const LOCATION_HEADER: http::HeaderName = http::HeaderName::from_static("sap-connectivity-scc-location_id");
const PRINCIPAL_HEADER: http::HeaderName = http::HeaderName::from_static("sap-connectivity-authentication");

/// Builds the error answer. `whose` tells the reader where to look (client, tunnel, backend).
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response<BoxBody> {
    let mut msg = message.into();
    msg.push('\n');
    let mut r = Response::new(body::full(msg));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        r.headers_mut().insert(
            http::header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"ferry connectivity proxy\""),
        );
    }
    r
}

/// 407 for a token that was sent and refused: the reason (which
/// [`VerifyError`](ferry_auth::VerifyError) keeps free of key material and internals) in the
/// body and, as RFC 6750 `invalid_token`, in `Proxy-Authenticate`.
fn invalid_token(e: &ferry_auth::VerifyError) -> Response<BoxBody> {
    let reason = e.to_string();
    let mut r = error(StatusCode::PROXY_AUTHENTICATION_REQUIRED, format!("Proxy authentication failed: {reason}"));
    let description: String =
        reason.chars().map(|c| if c == '"' || c == '\\' || c.is_control() { '\'' } else { c }).collect();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "Bearer realm=\"ferry connectivity proxy\", error=\"invalid_token\", error_description=\"{description}\""
    )) {
        r.headers_mut().insert(http::header::PROXY_AUTHENTICATE, v);
    }
    r
}

pub(crate) fn bearer(headers: &HeaderMap, name: impl http::header::AsHeaderName) -> Option<&str> {
    let v = headers.get(name)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub(crate) fn location_label(location: &str) -> String {
    if location.is_empty() {
        "no location ID (the default location)".into()
    } else {
        format!("location ID \"{location}\"")
    }
}

/// The `host:port` to ask the Cloud Connector for, from an absolute-form request URI; or the
/// status and message that tell the client what to send instead.
pub(crate) fn tunnel_target(uri: &http::Uri) -> Result<String, (StatusCode, &'static str)> {
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err((
                StatusCode::METHOD_NOT_ALLOWED,
                "https:// targets are not supported on the HTTP proxy port: use http://<virtual host>:<virtual port> \
                 and map the virtual host to an HTTPS backend in the Cloud Connector",
            ));
        }
        _ => {
            return Err((
                StatusCode::BAD_REQUEST,
                "The Connectivity Proxy expects absolute-form requests such as \
                 GET http://<virtual host>:<virtual port>/path HTTP/1.1",
            ));
        }
    }
    // `http://:8080/` and `http://[]/` parse with an empty host, which no connector can route.
    let Some(host) = uri.host().filter(|h| !matches!(*h, "" | "[]")) else {
        return Err((StatusCode::BAD_REQUEST, "The request URI has no host"));
    };
    // The URI parser accepts a port it cannot read (`http://h:8o8o/`) and reports none; that
    // must not become port 80. An empty port is the default (RFC 3986).
    let authority = uri.authority().map_or("", |a| a.as_str());
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let after_host = host_port.rsplit_once(']').map_or(host_port, |(_, rest)| rest);
    let port: u16 = match after_host.rsplit_once(':').map(|(_, p)| p) {
        None | Some("") => 80,
        Some(p) => p.parse().map_err(|_| (StatusCode::BAD_REQUEST, "The port of the request URI is not a number"))?,
    };
    Ok(format!("{host}:{port}"))
}

/// The `Upgrade` header of a request that asks to switch protocols (`Connection: upgrade`).
fn upgrade_of(h: &HeaderMap) -> Option<HeaderValue> {
    let asks = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    if asks { h.get(http::header::UPGRADE).cloned() } else { None }
}

type AppRead = tokio::io::ReadHalf<TokioIo<hyper::upgrade::Upgraded>>;

/// What the proxy's shutdown needs of an upgraded connection (see its use in [`handle`]).
struct Watch {
    active: Arc<AtomicBool>,
    stop: Shutdown,
}

/// The app→backend bytes of an upgraded request: the tunnel stream opens before the app's
/// connection is switched (that waits for the backend's answer), so the body reads nothing
/// until the upgraded connection arrives, and ends at once if it never does. The mutex only
/// makes the reader `Sync`, as bodies must be; it is used through `&mut` alone.
struct AfterUpgrade {
    pending: Option<oneshot::Receiver<AppRead>>,
    read: Option<std::sync::Mutex<AppRead>>,
}

impl AsyncRead for AfterUpgrade {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(rx) = this.pending.as_mut() {
            match Pin::new(rx).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => {
                    this.pending = None;
                    this.read = r.ok().map(std::sync::Mutex::new);
                }
            }
        }
        match this.read.as_mut() {
            Some(r) => Pin::new(r.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner)).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

pub(crate) async fn handle(shared: Arc<Shared>, mut req: Request<Incoming>) -> Response<BoxBody> {
    if let Some((name, _)) = req.headers().iter().find(|(n, v)| n.as_str().len() + v.len() + 2 > MAX_HEADER_LINE) {
        return error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("Header {name} is longer than {MAX_HEADER_LINE} bytes"),
        );
    }
    let claims = match bearer(req.headers(), http::header::PROXY_AUTHORIZATION) {
        None => {
            return error(
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                "Proxy authentication required: send Proxy-Authorization: Bearer <token of the connectivity service>",
            );
        }
        Some(token) => match shared.verifier.verify(token).await {
            Ok(c) => c,
            Err(e) => return invalid_token(&e),
        },
    };
    if req.method() == Method::CONNECT {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported on the HTTP proxy port: send the request in absolute form to \
             http://<virtual host>:<virtual port>/... (the Cloud Connector does TLS to the backend), \
             or use the SOCKS5 port for end-to-end TLS",
        );
    }
    let target = match tunnel_target(req.uri()) {
        Ok(t) => t,
        Err((status, message)) => return error(status, message),
    };
    let upgrade = upgrade_of(req.headers());
    if upgrade.is_some() && !req.body().is_end_stream() {
        return error(StatusCode::BAD_REQUEST, "A request that asks for a protocol upgrade must not have a body");
    }
    let location = req.headers().get(&LOCATION_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("").trim().to_owned();
    let principal = bearer(req.headers(), PRINCIPAL_HEADER).map(str::to_owned);

    let Some(permit) = shared.tenant_streams.try_acquire(&claims.zid) else {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "Subaccount {} has {} requests, SOCKS5 connections and service channel streams open through the \
                 proxy, its limit; retry when some have finished",
                claims.zid,
                shared.tenant_streams.limit()
            ),
        );
    };
    let app_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, incoming) = req.into_parts();
    body::strip_hop_by_hop(&mut parts.headers);
    let sap = |k: &http::HeaderName| k.as_str().starts_with("sap-connectivity-");
    if parts.headers.keys().any(sap) {
        let names: Vec<_> = parts.headers.keys().filter(|k| sap(k)).cloned().collect();
        for k in names {
            parts.headers.remove(k);
        }
    }
    let request_id =
        crate::stamp_tunnel_headers(&mut parts.headers, tunnel::KIND_HTTP, &target, &claims, principal.as_deref());
    parts.version = http::Version::HTTP_2;
    let (upstream, app_read) = match &upgrade {
        Some(u) => {
            parts.headers.insert(tunnel::names::UPGRADE, u.clone());
            let (tx, rx) = oneshot::channel();
            // Its bytes mark the connection active, so the proxy's shutdown can tell an idle one
            // (closed at once) from a busy one (given the drain time); `stop` ends this
            // app→backend half, which hyper's send task reads.
            let watch = Watch { active: Arc::new(AtomicBool::new(false)), stop: Shutdown::new() };
            let read = Stoppable {
                inner: Active { inner: AfterUpgrade { pending: Some(rx), read: None }, flag: watch.active.clone() },
                stop: Box::pin(watch.stop.clone().cancelled_owned()),
            };
            (body::from_reader(read), Some((tx, watch)))
        }
        None => (body::boxed(incoming), None),
    };
    let tunnel_req = Request::from_parts(parts, upstream);
    tracing::debug!(%request_id, subaccount = %claims.zid, %location, %target, "proxying HTTP request");
    match shared.open_stream(&claims.zid, &location, tunnel_req, &request_id).await {
        Ok(resp) => {
            let (mut parts, incoming) = resp.into_parts();
            let fault = parts.headers.remove(tunnel::names::ERROR);
            let status = match fault.as_ref().and_then(|v| v.to_str().ok()) {
                Some(tunnel::ERROR_DENIED) => StatusCode::FORBIDDEN,
                Some(tunnel::ERROR_UNREACHABLE) => StatusCode::BAD_GATEWAY,
                Some(tunnel::ERROR_TIMEOUT) => StatusCode::GATEWAY_TIMEOUT,
                Some(_) => StatusCode::BAD_REQUEST,
                None => parts.status,
            };
            parts.status = status;
            parts.version = http::Version::HTTP_11;
            body::strip_hop_by_hop(&mut parts.headers);
            let switched =
                parts.headers.remove(tunnel::names::UPGRADE).filter(|_| fault.is_none() && status == StatusCode::OK);
            if let (Some(protocol), Some(app_upgrade), Some((app_read, Watch { active, stop }))) =
                (switched, app_upgrade, app_read)
            {
                // The backend switched: the app gets its 101, then both byte streams are joined.
                parts.status = StatusCode::SWITCHING_PROTOCOLS;
                parts.headers.insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(http::header::UPGRADE, protocol);
                let (shutdown, drain) = (shared.shutdown.clone(), shared.drain_timeout);
                shared.upgrades.spawn(async move {
                    // Held for as long as the connection is relayed, as for a SOCKS5 stream.
                    let _permit = permit;
                    let upgraded = match app_upgrade.await {
                        Ok(u) => u,
                        Err(e) => {
                            tracing::debug!(%request_id, error = %e, "the app's connection was not upgraded");
                            return;
                        }
                    };
                    let (read, write) = tokio::io::split(TokioIo::new(upgraded));
                    let _ = app_read.send(read);
                    let pump = body::copy_to_writer(incoming, Active { inner: write, flag: active.clone() });
                    tokio::pin!(pump);
                    let ended = tokio::select! {
                        r = &mut pump => Some(r),
                        _ = shutdown.cancelled() => crate::socks::drain_stream(pump.as_mut(), &active, drain).await,
                    };
                    match ended {
                        Some(Err(e)) => tracing::debug!(%request_id, error = %e, "upgraded connection ended"),
                        Some(Ok(_)) => {}
                        None => {
                            stop.cancel();
                            tracing::info!(%request_id, "upgraded connection closed by the proxy's shutdown");
                        }
                    }
                });
                return Response::from_parts(parts, body::empty());
            }
            let held = crate::tenant_limit::Held { inner: incoming, _permit: permit };
            Response::from_parts(parts, body::boxed(held))
        }
        Err(OpenError::NoTunnel) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("No Cloud Connector is connected for subaccount {} with {}", claims.zid, location_label(&location)),
        ),
        Err(OpenError::Failed(e)) => {
            tracing::warn!(%request_id, error = %e, "tunnel request failed");
            error(
                StatusCode::BAD_GATEWAY,
                format!("The tunnel to the Cloud Connector failed while forwarding the request to {target}"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(uri: &str) -> Result<String, StatusCode> {
        tunnel_target(&uri.parse().unwrap()).map_err(|(status, _)| status)
    }

    #[test]
    fn tunnel_targets() {
        assert_eq!(target("http://erp.virtual:8080/x").unwrap(), "erp.virtual:8080");
        assert_eq!(target("http://user:pw@erp.virtual/x").unwrap(), "erp.virtual:80");
        assert_eq!(target("http://[::1]:8080/").unwrap(), "[::1]:8080");
        assert_eq!(target("http://erp.virtual:/").unwrap(), "erp.virtual:80");
        assert_eq!(target("https://erp.virtual/"), Err(StatusCode::METHOD_NOT_ALLOWED));
        assert_eq!(target("/origin-form"), Err(StatusCode::BAD_REQUEST));
        // Found by fuzzing: each used to be routed (to ":80", "[]:80", "erp.virtual:80").
        for bad in ["http://:/", "http://[]:80/", "http://erp.virtual:8o8o/", "http://[::1]:x/", "http://h:65536/"] {
            assert_eq!(target(bad), Err(StatusCode::BAD_REQUEST), "{bad}");
        }
    }
}
