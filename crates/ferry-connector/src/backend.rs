//! The connector's side of a tunnel stream: access check, audit line, and the relay to the
//! internal backend.

use futures_util::FutureExt as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_core::body::{self, BoxBody};
use ferry_proto::tunnel;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use std::sync::Arc;

use crate::access::{
    AccessRequest, AccessRules, Decision, DenyReason, HostInHeader, LiveRules, Protocol, SystemMapping,
};
use crate::audit::{AuditEvent, AuditLog, Outcome};
use crate::pin::{PinError, PinnedResolver, Pins};
use crate::principal::{PrincipalDelivery, PrincipalPropagation};
use ferry_core::Shutdown;

/// A [`PinError`] somewhere in an error's chain (the pooled client wraps its resolver's error).
fn pin_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a PinError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(p) = err.downcast_ref::<PinError>() {
            return Some(p);
        }
        cur = err.source();
    }
    None
}

pub(crate) struct Backend {
    rules: Arc<LiveRules>,
    audit: AuditLog,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// Pooled HTTP/1.1 client for `HTTP` and `HTTPS` mappings.
    http: Pooled,
    /// TLS for `TCPS`/`LDAPS` mappings.
    tls: tokio_rustls::TlsConnector,
    /// The same two, presenting the connector's system certificate as TLS client certificate,
    /// when one is configured (SPEC §4.3: sent to `HTTPS`/`TCPS`/`LDAPS` backends of mappings
    /// whose principal type is not `*_RESTRICTED`).
    system: Option<(Pooled, tokio_rustls::TlsConnector)>,
    /// Addresses of mapped host names, pinned (see `pin.rs`); the pooled clients resolve
    /// through them too.
    pins: Arc<Pins>,
    /// Trust anchors for backends, for connections that present a user certificate.
    roots: Arc<rustls::RootCertStore>,
    /// Swappable like the rules: the admin API changes its settings at run time.
    principal: std::sync::RwLock<Option<Arc<PrincipalPropagation>>>,
    /// Cancelled when the connector shuts down: idle TCP relays close then (see [`Stopping`]).
    pub(crate) stopping: Shutdown,
}

/// The pooled backend client; names resolve through the pins.
type Pooled = Client<hyper_rustls::HttpsConnector<HttpConnector<PinnedResolver>>, BoxBody>;

/// SAP's header for the propagated user's certificate.
const SSL_CLIENT_CERT: &str = "ssl_client_cert";

fn error_response(status: StatusCode, kind: &'static str, message: String) -> Response<BoxBody> {
    let mut r = Response::new(body::full(message));
    *r.status_mut() = status;
    r.headers_mut().insert(tunnel::names::ERROR, HeaderValue::from_static(kind));
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// The audit line of one access decision.
fn audit_event(
    decision: &Decision<'_>,
    request_id: String,
    client: String,
    target: &str,
    protocol: &'static str,
    method: String,
    path: &str,
) -> AuditEvent {
    let (outcome, reason) = match decision {
        Decision::Allow(_) => (Outcome::Allowed, String::new()),
        Decision::Deny(r) => (Outcome::Denied, format!("{r:?}")),
    };
    AuditEvent {
        outcome,
        request_id,
        client,
        system: target.to_owned(),
        protocol,
        method,
        path: path.to_owned(),
        reason,
        user: String::new(),
        bytes_in: 0,
        bytes_out: 0,
        duration: Duration::ZERO,
    }
}

/// The audit record of an allowed exchange, written when both directions have ended (every
/// holder — the two counted bodies and the forwarding code — has dropped it), so that it can
/// carry the bytes relayed and the duration.
struct Exchange {
    audit: AuditLog,
    event: std::sync::Mutex<Option<AuditEvent>>,
    started: Instant,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Exchange {
    fn new(audit: &AuditLog, event: AuditEvent, started: Instant) -> Arc<Self> {
        Arc::new(Self {
            audit: audit.clone(),
            event: std::sync::Mutex::new(Some(event)),
            started,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        })
    }

    fn update(&self, f: impl FnOnce(&mut AuditEvent)) {
        if let Some(e) = self.event.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_mut() {
            f(e);
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let Some(mut event) = self.event.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).take() else {
            return;
        };
        event.bytes_in = self.bytes_in.load(Ordering::Relaxed);
        event.bytes_out = self.bytes_out.load(Ordering::Relaxed);
        event.duration = self.started.elapsed();
        // Counted and traced here; a task only when the level wants a line in the file.
        let Some(event) = self.audit.note(event) else { return };
        let audit = self.audit.clone();
        // Bodies are dropped on runtime threads; without a runtime (shutdown) the line still
        // reaches tracing.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { audit.write(event).await });
            }
            Err(_) => tracing::warn!(target: "ferry::audit", request_id = %event.request_id, system = %event.system,
                "audit record of a finished exchange could not be written: the runtime has stopped"),
        }
    }
}

/// The backend could not be reached (502; the proxy tells the app it is the backend's fault).
fn unreachable(message: String) -> Response<BoxBody> {
    error_response(StatusCode::BAD_GATEWAY, tunnel::ERROR_UNREACHABLE, message)
}

/// Reaching the backend took too long (504).
fn timed_out(message: String) -> Response<BoxBody> {
    error_response(StatusCode::GATEWAY_TIMEOUT, tunnel::ERROR_TIMEOUT, message)
}

fn deny_message(reason: DenyReason, target: &str, path: Option<&str>) -> String {
    match (reason, path) {
        (DenyReason::Resource, Some(p)) => format!("Access denied to resource {p} on system {target}"),
        (DenyReason::AmbiguousPath, Some(p)) => {
            format!("Access denied: ambiguous request path {p:?} for system {target}")
        }
        (DenyReason::UpgradeNotAllowed, Some(p)) => format!(
            "Access denied: resource {p} on system {target} does not allow a protocol upgrade (WebSocket); \
             allow it on the resource in the Cloud Connector"
        ),
        (DenyReason::WrongProtocol, _) => {
            format!("Access denied to system {target}: the mapping is for another protocol")
        }
        _ => format!("Access denied to system {target}"),
    }
}

impl Backend {
    pub(crate) fn new(
        rules: Arc<LiveRules>,
        audit: AuditLog,
        roots: Arc<rustls::RootCertStore>,
        principal: Option<Arc<PrincipalPropagation>>,
        connect_timeout: Duration,
        response_timeout: Duration,
        system_certificate: Option<&ferry_core::tls::CertifiedKey>,
    ) -> Result<Self, ferry_core::tls::TlsError> {
        let builder = || rustls::ClientConfig::builder().with_root_certificates(roots.clone());
        let pins = Arc::new(Pins::default());
        let resolver = PinnedResolver { pins: pins.clone(), rules: rules.clone() };
        let clients = |tls: rustls::ClientConfig| {
            let mut connector = HttpConnector::new_with_resolver(resolver.clone());
            connector.set_nodelay(true);
            connector.set_connect_timeout(Some(connect_timeout));
            connector.enforce_http(false);
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http()
                .enable_http1()
                .wrap_connector(connector);
            let http = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(https);
            (http, tokio_rustls::TlsConnector::from(Arc::new(tls)))
        };
        let (http, tls) = clients(builder().with_no_client_auth());
        let system = match system_certificate {
            Some(identity) => {
                let certs = ferry_core::tls::parse_certs(&identity.cert_pem)?;
                let key = ferry_core::tls::parse_key(identity.key_pem.expose())?;
                let cfg = builder().with_client_auth_cert(certs, key)?;
                Some(clients(cfg))
            }
            None => None,
        };
        Ok(Self {
            rules,
            audit,
            connect_timeout,
            response_timeout,
            http,
            tls,
            system,
            pins,
            roots,
            principal: std::sync::RwLock::new(principal),
            stopping: Shutdown::new(),
        })
    }

    /// The HTTP client and TLS connector for a mapping: with the system certificate unless
    /// the mapping's principal type forbids it.
    fn clients_for(&self, m: &SystemMapping) -> (&Pooled, &tokio_rustls::TlsConnector) {
        match &self.system {
            Some((http, tls)) if m.authentication_mode.sends_system_certificate() => (http, tls),
            _ => (&self.http, &self.tls),
        }
    }

    pub(crate) fn set_principal(&self, principal: Option<Arc<PrincipalPropagation>>) {
        *self.principal.write().unwrap_or_else(std::sync::PoisonError::into_inner) = principal;
    }

    pub(crate) async fn handle(&self, req: Request<Incoming>) -> Response<BoxBody> {
        let header = |name: &http::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let Some(target) = header(&tunnel::names::TARGET) else {
            return error_response(StatusCode::BAD_REQUEST, tunnel::ERROR_BAD_REQUEST, "missing ferry-target".into());
        };
        let Some((host, port)) = tunnel::split_host_port(&target) else {
            return error_response(
                StatusCode::BAD_REQUEST,
                tunnel::ERROR_BAD_REQUEST,
                format!("invalid target {target:?}; expected host:port"),
            );
        };
        let started = Instant::now();
        let request_id = header(&tunnel::names::REQUEST_ID).unwrap_or_default();
        let client = header(&tunnel::names::CLIENT).unwrap_or_default();
        match req.headers().get(&tunnel::names::KIND).and_then(|v| v.to_str().ok()) {
            Some(tunnel::KIND_HTTP) => {
                let path = req.uri().path().to_owned();
                let upgrade = req.headers().get(&tunnel::names::UPGRADE).cloned();
                let rules = self.rules.get();
                let decision = rules.check(AccessRequest::Http { host, port, path: &path, upgrade: upgrade.is_some() });
                let protocol = match &upgrade {
                    None => "HTTP",
                    Some(u) if u.as_bytes().eq_ignore_ascii_case(b"websocket") => "WebSocket",
                    Some(_) => "HTTP Upgrade",
                };
                let event =
                    audit_event(&decision, request_id, client, &target, protocol, req.method().to_string(), &path);
                match decision {
                    Decision::Allow(m) => {
                        let exchange = Exchange::new(&self.audit, event, started);
                        match upgrade {
                            Some(u) => self.forward_upgrade(req, u, m, &target, &rules, exchange).await,
                            None => self.forward_http(req, m, &target, &rules, exchange).await,
                        }
                    }
                    Decision::Deny(reason) => {
                        self.audit.record(AuditEvent { duration: started.elapsed(), ..event }).await;
                        error_response(
                            StatusCode::FORBIDDEN,
                            tunnel::ERROR_DENIED,
                            deny_message(reason, &target, Some(&path)),
                        )
                    }
                }
            }
            Some(tunnel::KIND_TCP) => {
                let rules = self.rules.get();
                let decision = rules.check(AccessRequest::Tcp { host, port });
                let event = audit_event(&decision, request_id, client, &target, "TCP", String::new(), "");
                match decision {
                    Decision::Allow(m) => {
                        let exchange = Exchange::new(&self.audit, event, started);
                        self.forward_tcp(req, m, &target, exchange).await
                    }
                    Decision::Deny(reason) => {
                        self.audit.record(AuditEvent { duration: started.elapsed(), ..event }).await;
                        error_response(StatusCode::FORBIDDEN, tunnel::ERROR_DENIED, deny_message(reason, &target, None))
                    }
                }
            }
            other => error_response(
                StatusCode::BAD_REQUEST,
                tunnel::ERROR_BAD_REQUEST,
                format!("unknown stream kind {other:?}"),
            ),
        }
    }

    /// Turns the tunnel request's head into the backend's: internal URI, the propagated user's
    /// certificate (returned when it goes into the TLS handshake), no tunnel or hop-by-hop
    /// headers, `Host` per the mapping. `Err` is the refusal to answer.
    async fn backend_head(
        &self,
        parts: &mut http::request::Parts,
        m: &SystemMapping,
        target: &str,
        exchange: &Exchange,
    ) -> Result<Option<ferry_core::tls::CertifiedKey>, Response<BoxBody>> {
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let scheme = if m.protocol == Protocol::Https { "https" } else { "http" };
        let uri: Uri = match format!("{scheme}://{}:{}{}", m.local_host, m.local_port, pq).parse() {
            Ok(u) => u,
            Err(_) => {
                return Err(error_response(
                    StatusCode::BAD_REQUEST,
                    tunnel::ERROR_BAD_REQUEST,
                    "invalid request target".into(),
                ));
            }
        };
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        let principal = parts.headers.get(&tunnel::names::PRINCIPAL).and_then(|v| v.to_str().ok()).map(str::to_owned);
        // The app must never choose the identity the backend logs on with.
        parts.headers.remove(SSL_CLIENT_CERT);
        let mut user_tls = None;
        if m.authentication_mode.propagates() {
            let pp = self.principal.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            let value = match (principal, &pp) {
                (Some(token), Some(pp)) => match pp.user_certificate(&token).await {
                    Ok(cert) => {
                        exchange.update(|e| e.user = cert.subject.clone());
                        if m.principal_certificate_in == PrincipalDelivery::Tls && m.protocol == Protocol::Https {
                            user_tls = Some(cert.identity);
                        }
                        cert.header
                    }
                    Err(e) => {
                        tracing::warn!(target: "ferry::audit", system = %target, error = %e, "principal propagation refused");
                        exchange.update(|ev| {
                            ev.outcome = Outcome::Denied;
                            ev.reason = format!("PrincipalPropagation: {e}");
                        });
                        return Err(error_response(
                            StatusCode::FORBIDDEN,
                            tunnel::ERROR_DENIED,
                            format!("Principal propagation to system {target} failed: {e}"),
                        ));
                    }
                },
                (Some(_), None) => {
                    exchange.update(|ev| {
                        ev.outcome = Outcome::Denied;
                        ev.reason = "PrincipalPropagationNotConfigured".into();
                    });
                    return Err(error_response(
                        StatusCode::FORBIDDEN,
                        tunnel::ERROR_DENIED,
                        format!(
                            "System {target} expects principal propagation, which is not configured on this Cloud Connector"
                        ),
                    ));
                }
                // No user: an empty header tells the backend not to log on with the system
                // certificate (SAP's behaviour).
                (None, _) => String::new(),
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                parts.headers.insert(SSL_CLIENT_CERT, v);
            }
        }
        let h = &mut parts.headers;
        for name in [
            &tunnel::names::KIND,
            &tunnel::names::TARGET,
            &tunnel::names::REQUEST_ID,
            &tunnel::names::PRINCIPAL,
            &tunnel::names::CLIENT,
            &tunnel::names::UPGRADE,
        ] {
            h.remove(name);
        }
        body::strip_hop_by_hop(h);
        let host_value = match m.host_in_header {
            HostInHeader::Virtual => target.to_owned(),
            HostInHeader::Internal => {
                if let Ok(v) = HeaderValue::from_str(target) {
                    h.insert("x-forwarded-host", v);
                }
                format!("{}:{}", m.local_host, m.local_port)
            }
        };
        if let Ok(v) = HeaderValue::from_str(&host_value) {
            h.insert(http::header::HOST, v);
        }
        Ok(user_tls)
    }

    async fn forward_http(
        &self,
        req: Request<Incoming>,
        m: &SystemMapping,
        target: &str,
        rules: &AccessRules,
        exchange: Arc<Exchange>,
    ) -> Response<BoxBody> {
        let (mut parts, incoming) = req.into_parts();
        let user_tls = match self.backend_head(&mut parts, m, target, &exchange).await {
            Ok(u) => u,
            Err(refused) => return refused,
        };
        let counted = Counted::new(incoming, Some(http_bytes().0.clone()), &exchange, true);
        let req = Request::from_parts(parts, body::boxed(counted));
        let started = std::time::Instant::now();
        let send = async {
            match user_tls {
                Some(identity) => self.send_as_user(req, m, &identity).await,
                None => self.clients_for(m).0.request(req).await.map_err(Into::into),
            }
        };
        let Ok(sent) = tokio::time::timeout(self.response_timeout, send).await else {
            tracing::warn!(system = %target, "backend did not answer in time");
            return timed_out(format!(
                "The backend of system {target} did not answer within {:?}",
                self.response_timeout
            ));
        };
        ferry_core::metrics::global()
            .histogram(
                "ferry_connector_backend_seconds",
                "Time from forwarding an HTTP request to the backend's response headers, by system.",
                &[("system", target)],
            )
            .observe(started.elapsed());
        match sent {
            Ok(resp) => {
                let (mut parts, incoming) = resp.into_parts();
                body::strip_hop_by_hop(&mut parts.headers);
                self.rewrite_response_headers(&mut parts.headers, rules);
                let counted = Counted::new(incoming, Some(http_bytes().1.clone()), &exchange, false);
                Response::from_parts(parts, body::boxed(counted))
            }
            Err(e) => {
                tracing::warn!(system = %target, error = %e, "backend request failed");
                if let Some(pin) = pin_error(&*e) {
                    exchange.update(|ev| ev.reason = "BackendRebound".into());
                    return unreachable(format!("The backend of system {target} was not dialled: {pin}"));
                }
                exchange.update(|ev| ev.reason = "BackendUnreachable".into());
                unreachable(format!("The Cloud Connector could not reach the backend of system {target}"))
            }
        }
    }

    /// Sends one request on a fresh TLS connection that presents the user's certificate: the
    /// identity differs per user, so such connections are not pooled.
    async fn send_as_user(
        &self,
        req: Request<BoxBody>,
        m: &SystemMapping,
        identity: &ferry_core::tls::CertifiedKey,
    ) -> Result<Response<Incoming>, ferry_core::body::BoxError> {
        let io = self.dial(m, Some(identity)).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
        // `map`, not an `async move` block awaiting `conn`: the block would hold the connection
        // twice in the task (rust-lang/rust#62958).
        tokio::spawn(conn.map(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "user-certificate backend connection ended");
            }
        }));
        // The pooled client sends origin-form; this connection must too.
        let (mut parts, body) = req.into_parts();
        parts.uri = parts.uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/").parse()?;
        Ok(sender.send_request(Request::from_parts(parts, body)).await?)
    }

    /// A fresh connection to the mapping's backend, with TLS for `HTTPS` presenting the user's
    /// certificate when given (else the system certificate where the mapping allows it).
    async fn dial(
        &self,
        m: &SystemMapping,
        user: Option<&ferry_core::tls::CertifiedKey>,
    ) -> Result<Box<dyn BackendIo>, ferry_core::body::BoxError> {
        // Only the addresses the mapped name was pinned to (see `pin.rs`): no second lookup.
        let addrs = self.pins.resolve(&self.rules.get(), &m.local_host, m.local_port).await?;
        let tcp = crate::pin::connect(&addrs, self.connect_timeout).await?;
        let _ = tcp.set_nodelay(true);
        if m.protocol != Protocol::Https {
            return Ok(Box::new(tcp));
        }
        let tls = match user {
            Some(identity) => {
                let certs = ferry_core::tls::parse_certs(&identity.cert_pem)?;
                let key = ferry_core::tls::parse_key(identity.key_pem.expose())?;
                let cfg = rustls::ClientConfig::builder()
                    .with_root_certificates(self.roots.clone())
                    .with_client_auth_cert(certs, key)?;
                tokio_rustls::TlsConnector::from(Arc::new(cfg))
            }
            None => self.clients_for(m).1.clone(),
        };
        let name = rustls::pki_types::ServerName::try_from(m.local_host.clone())?;
        Ok(Box::new(tokio::time::timeout(self.connect_timeout, tls.connect(name, tcp)).await??))
    }

    /// An upgrade request (WebSocket): sent on a connection of its own, since it will not come
    /// back to a pool; once the backend switches protocols, the tunnel stream carries the raw
    /// bytes both ways (see `ferry_proto::tunnel`). A backend that declines answers normally.
    async fn forward_upgrade(
        &self,
        req: Request<Incoming>,
        upgrade: HeaderValue,
        m: &SystemMapping,
        target: &str,
        rules: &AccessRules,
        exchange: Arc<Exchange>,
    ) -> Response<BoxBody> {
        let (mut parts, upstream) = req.into_parts();
        let user_tls = match self.backend_head(&mut parts, m, target, &exchange).await {
            Ok(u) => u,
            Err(refused) => return refused,
        };
        parts.headers.insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(http::header::UPGRADE, upgrade);
        parts.uri = match parts.uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/").parse() {
            Ok(u) => u,
            Err(_) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    tunnel::ERROR_BAD_REQUEST,
                    "invalid request target".into(),
                );
            }
        };
        let send = async {
            let io = self.dial(m, user_tls.as_ref()).await?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
            tokio::spawn(conn.with_upgrades().map(|r| {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upgrade backend connection ended");
                }
            }));
            let resp = sender.send_request(Request::from_parts(parts, body::empty())).await?;
            Ok::<_, ferry_core::body::BoxError>(resp)
        };
        let mut resp = match tokio::time::timeout(self.response_timeout, send).await {
            Err(_) => {
                return timed_out(format!(
                    "The backend of system {target} did not answer within {:?}",
                    self.response_timeout
                ));
            }
            Ok(Err(e)) => {
                tracing::warn!(system = %target, error = %e, "backend upgrade request failed");
                exchange.update(|ev| ev.reason = "BackendUnreachable".into());
                return unreachable(format!("The Cloud Connector could not reach the backend of system {target}"));
            }
            Ok(Ok(r)) => r,
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            exchange.update(|ev| ev.reason = format!("UpgradeDeclined {}", resp.status().as_u16()));
            let (mut parts, incoming) = resp.into_parts();
            body::strip_hop_by_hop(&mut parts.headers);
            self.rewrite_response_headers(&mut parts.headers, rules);
            let counted = Counted::new(incoming, Some(http_bytes().1.clone()), &exchange, false);
            return Response::from_parts(parts, body::boxed(counted));
        }
        let on_upgrade = hyper::upgrade::on(&mut resp);
        let (mut head, _) = resp.into_parts();
        let switched_to =
            head.headers.get(http::header::UPGRADE).cloned().unwrap_or(HeaderValue::from_static("websocket"));
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(system = %target, error = %e, "backend upgrade failed");
                exchange.update(|ev| ev.reason = "BackendUpgradeFailed".into());
                return unreachable(format!("The backend of system {target} did not complete the protocol switch"));
            }
        };
        body::strip_hop_by_hop(&mut head.headers);
        self.rewrite_response_headers(&mut head.headers, rules);
        let (read, write) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
        let read = Exclusive(std::sync::Mutex::new(read));
        relay_up(Counted::new(upstream, None, &exchange, true), write);
        head.status = StatusCode::OK;
        head.headers.insert(tunnel::names::UPGRADE, switched_to);
        Response::from_parts(head, body::boxed(Counted::new(body::from_reader(read), None, &exchange, false)))
    }

    /// Maps internal names in `Location` and cookie domains back to virtual ones.
    fn rewrite_response_headers(&self, headers: &mut http::HeaderMap, rules: &AccessRules) {
        if let Some(v) = headers.get(http::header::LOCATION).and_then(|v| v.to_str().ok())
            && let Some(new) = crate::rewrite::location(rules, v)
            && let Ok(v) = HeaderValue::from_str(&new)
        {
            headers.insert(http::header::LOCATION, v);
        }
        let cookies: Vec<HeaderValue> = headers
            .get_all(http::header::SET_COOKIE)
            .iter()
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|s| crate::rewrite::set_cookie(rules, s))
                    .and_then(|s| HeaderValue::from_str(&s).ok())
                    .unwrap_or_else(|| v.clone())
            })
            .collect();
        if !cookies.is_empty() {
            headers.remove(http::header::SET_COOKIE);
            for c in cookies {
                headers.append(http::header::SET_COOKIE, c);
            }
        }
    }

    async fn forward_tcp(
        &self,
        req: Request<Incoming>,
        m: &SystemMapping,
        target: &str,
        exchange: Arc<Exchange>,
    ) -> Response<BoxBody> {
        let addrs = match self.pins.resolve(&self.rules.get(), &m.local_host, m.local_port).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(system = %target, error = %e, "backend not dialled");
                let rebound = matches!(e, PinError::Rebound { .. });
                exchange.update(|ev| ev.reason = if rebound { "BackendRebound" } else { "BackendUnreachable" }.into());
                return unreachable(format!("The backend of system {target} was not dialled: {e}"));
            }
        };
        // Each address gets the connect timeout; with one address (the usual case) that is the
        // whole budget.
        let stream =
            match tokio::time::timeout(self.connect_timeout, crate::pin::connect(&addrs, self.connect_timeout)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                    exchange.update(|ev| ev.reason = "BackendTimeout".into());
                    return timed_out(format!("Connecting to the backend of system {target} timed out"));
                }
                Ok(Err(e)) => {
                    tracing::warn!(system = %target, error = %e, "backend connect failed");
                    exchange.update(|ev| ev.reason = "BackendUnreachable".into());
                    return unreachable(format!("The Cloud Connector could not reach the backend of system {target}"));
                }
                Err(_) => {
                    exchange.update(|ev| ev.reason = "BackendTimeout".into());
                    return timed_out(format!("Connecting to the backend of system {target} timed out"));
                }
            };
        let _ = stream.set_nodelay(true);
        let downstream = if matches!(m.protocol, Protocol::Tcps | Protocol::Ldaps) {
            let name = match rustls::pki_types::ServerName::try_from(m.local_host.clone()) {
                Ok(n) => n,
                Err(_) => {
                    return unreachable(format!("The backend of system {target} has no valid TLS server name"));
                }
            };
            match tokio::time::timeout(self.connect_timeout, self.clients_for(m).1.connect(name, stream)).await {
                Ok(Ok(tls)) => {
                    let (read, write) = tokio::io::split(tls);
                    relay_up(Counted::new(req.into_body(), None, &exchange, true), write);
                    body::boxed(Counted::new(body::from_reader(read), None, &exchange, false))
                }
                Ok(Err(e)) => {
                    tracing::warn!(system = %target, error = %e, "backend TLS handshake failed");
                    exchange.update(|ev| ev.reason = "BackendTlsHandshake".into());
                    return unreachable(format!("The TLS handshake with the backend of system {target} failed"));
                }
                Err(_) => {
                    exchange.update(|ev| ev.reason = "BackendTimeout".into());
                    return timed_out(format!("The TLS handshake with the backend of system {target} timed out"));
                }
            }
        } else {
            let (read, write) = stream.into_split();
            relay_up(Counted::new(req.into_body(), None, &exchange, true), write);
            body::boxed(Counted::new(body::from_reader(read), None, &exchange, false))
        };
        let downstream = body::boxed(Stopping::new(downstream, &self.stopping, exchange));
        let mut resp = Response::new(downstream);
        resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        resp
    }
}

/// Makes a reader that is not `Sync` (hyper's upgraded connection) fit a body, which must be:
/// a reader is only ever used through `&mut`, so the lock is never taken.
struct Exclusive<R>(std::sync::Mutex<R>);

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Exclusive<R> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let inner = self.get_mut().0.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::pin::Pin::new(inner).poll_read(cx, buf)
    }
}

/// A connection to a backend, plain or TLS.
pub(crate) trait BackendIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> BackendIo for T {}

/// Copies the app's bytes (the tunnel request body) to the backend, half-closing at the end.
fn relay_up<W: tokio::io::AsyncWrite + Unpin + Send + 'static>(upstream: Counted<Incoming>, write: W) {
    // `map`, not an `async move` block: a block owning the copy's inputs and awaiting the copy
    // keeps them twice in the task (rust-lang/rust#62958), for as long as the stream is open.
    tokio::spawn(body::copy_to_writer(upstream, write).map(|r| {
        if let Err(e) = r {
            tracing::debug!(error = %e, "tunnel→backend copy ended");
        }
    }));
}

/// Counters of HTTP body bytes relayed to backends and back (the monitoring page's bytes
/// series), looked up once.
fn http_bytes() -> &'static (Arc<std::sync::atomic::AtomicU64>, Arc<std::sync::atomic::AtomicU64>) {
    static C: std::sync::OnceLock<(Arc<std::sync::atomic::AtomicU64>, Arc<std::sync::atomic::AtomicU64>)> =
        std::sync::OnceLock::new();
    C.get_or_init(|| {
        let m = ferry_core::metrics::global();
        let help = "HTTP body bytes the Cloud Connector relayed, by direction.";
        (
            m.counter("ferry_connector_http_bytes_total", help, &[("direction", "request")]),
            m.counter("ferry_connector_http_bytes_total", help, &[("direction", "response")]),
        )
    })
}

/// A body that adds the size of every data frame to a metrics counter and to its exchange's
/// audit record as it streams through.
struct Counted<B> {
    inner: B,
    bytes: Option<Arc<AtomicU64>>,
    exchange: Arc<Exchange>,
    /// App → backend.
    upstream: bool,
}

impl<B> Counted<B> {
    fn new(inner: B, bytes: Option<Arc<AtomicU64>>, exchange: &Arc<Exchange>, upstream: bool) -> Self {
        Self { inner, bytes, exchange: exchange.clone(), upstream }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let n = bytes::Buf::remaining(data) as u64;
            if let Some(c) = &self.bytes {
                c.fetch_add(n, Ordering::Relaxed);
            }
            let mine = if self.upstream { &self.exchange.bytes_in } else { &self.exchange.bytes_out };
            mine.fetch_add(n, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// While the connector shuts down, a TCP relay that moved no byte (either way) for this long is
/// idle and closed, so a pooled connection nobody uses does not hold the exit until the drain
/// deadline; busy ones run on until it.
pub const IDLE_TICK: Duration = Duration::from_millis(500);

/// The backend → app half of a TCP relay, ended with an error (the tunnel stream is reset, and
/// with it the app's connection and the app → backend half) once the connector is stopping and
/// the relay has been idle for an [`IDLE_TICK`].
struct Stopping<B> {
    inner: B,
    stopping: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    /// The next look at the byte counters, once stopping.
    tick: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    exchange: Arc<Exchange>,
    seen: u64,
}

impl<B> Stopping<B> {
    fn new(inner: B, stopping: &Shutdown, exchange: Arc<Exchange>) -> Self {
        Self { inner, stopping: Box::pin(stopping.clone().cancelled_owned()), tick: None, exchange, seen: 0 }
    }

    fn moved(&self) -> u64 {
        self.exchange.bytes_in.load(Ordering::Relaxed) + self.exchange.bytes_out.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("idle TCP relay closed by the connector's shutdown")]
struct ClosedIdle;

impl<B> http_body::Body for Stopping<B>
where
    B: http_body::Body<Data = bytes::Bytes, Error = body::BoxError> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, body::BoxError>>> {
        use std::task::Poll;
        if let r @ Poll::Ready(_) = std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            return r;
        }
        if self.tick.is_none() {
            if self.stopping.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.seen = self.moved();
            self.tick = Some(Box::pin(tokio::time::sleep(IDLE_TICK)));
        }
        loop {
            let Some(tick) = self.tick.as_mut() else { return Poll::Pending };
            if tick.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = self.moved();
            if now == self.seen {
                return Poll::Ready(Some(Err(Box::new(ClosedIdle))));
            }
            self.seen = now;
            self.tick = Some(Box::pin(tokio::time::sleep(IDLE_TICK)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
