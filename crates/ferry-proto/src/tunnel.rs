//! The tunnel between the Connectivity Proxy and a Cloud Connector.
//!
//! ```text
//!  connector ──TCP+TLS 1.3 (client cert = subaccount + location id)──► proxy :tunnel port
//!            ◄──────────── HTTP/2, roles reversed ─────────────────────
//!            proxy = h2 client (opens one stream per app request/connection)
//!            connector = h2 server (answers, dials the backend)
//! ```
//!
//! A stream is an HTTP/2 request from the proxy whose headers describe the app's intent:
//!
//! | header | meaning |
//! |---|---|
//! | `ferry-kind` | `http` (one HTTP request; method, URI, headers and body are the app's) or `tcp` (a raw byte stream: request body = app→backend, response body = backend→app) |
//! | `ferry-target` | virtual `host:port` the app asked for |
//! | `ferry-request-id` | id for correlating proxy and connector audit lines |
//! | `ferry-principal` | the user JWT to propagate (principal propagation), if any |
//! | `ferry-client` | the OAuth client id of the app, for the audit log |
//! | `ferry-upgrade` | (`http` only) the app's `Upgrade` header: it asks for a protocol switch (WebSocket) |
//!
//! The connector answers with the backend's response (`http`), or `200` then the byte stream
//! (`tcp`). HTTP/2 has no `101` and forbids `Upgrade`, so an upgraded `http` stream is answered
//! `200` with `ferry-upgrade` naming the backend's protocol and the backend's `101` headers;
//! then, as for `tcp`, the request body carries app→backend bytes and the response body
//! backend→app. A backend that refuses the switch is answered as any HTTP response. When the connector itself refuses, the response carries `ferry-error` so the proxy
//! can tell the app whose fault it was.
//!
//! Service channels (on-premise → cloud) use a second connection to the same port with ALPN
//! [`CHANNEL_ALPN`], where the connector is the h2 client: each stream is `ferry-kind: channel`
//! with `ferry-target: <service id>`, request body = on-premise → cloud, answered `200` and the
//! byte stream back, or `403`/`502`/`504` with `ferry-error` (see `ferry_proxy::channels`).
//!
//! Fencing: right after the HTTP/2 handshake the proxy opens one stream of kind `hello` carrying
//! the highest [`Fence`] it knows for the connector's (subaccount, location id) in `ferry-fence`;
//! the connector answers `200` with its own fence (none: `0`). The proxy admits only the highest
//! fence per (subaccount, location id) and closes the tunnels of a lower one, so two instances of
//! a master/shadow pair never serve one tunnel slot at once (ARCHITECTURE.md "Fencing").

pub const KIND: &str = "ferry-kind";
pub const TARGET: &str = "ferry-target";
pub const REQUEST_ID: &str = "ferry-request-id";
pub const PRINCIPAL: &str = "ferry-principal";
pub const CLIENT: &str = "ferry-client";
pub const ERROR: &str = "ferry-error";
pub const FENCE: &str = "ferry-fence";
pub const UPGRADE: &str = "ferry-upgrade";

/// The stream header names, parsed once: a lookup, insertion or removal by `&str` parses and
/// hashes the name every time, which on the per-request path of both ends added up.
pub mod names {
    use http::HeaderName;
    pub const KIND: HeaderName = HeaderName::from_static(super::KIND);
    pub const TARGET: HeaderName = HeaderName::from_static(super::TARGET);
    pub const REQUEST_ID: HeaderName = HeaderName::from_static(super::REQUEST_ID);
    pub const PRINCIPAL: HeaderName = HeaderName::from_static(super::PRINCIPAL);
    pub const CLIENT: HeaderName = HeaderName::from_static(super::CLIENT);
    pub const ERROR: HeaderName = HeaderName::from_static(super::ERROR);
    pub const UPGRADE: HeaderName = HeaderName::from_static(super::UPGRADE);
}

pub const KIND_HTTP: &str = "http";
pub const KIND_TCP: &str = "tcp";
pub const KIND_HELLO: &str = "hello";
/// A service channel stream (on-premise → cloud), opened by the connector on its channel
/// connection (ALPN [`CHANNEL_ALPN`]); `ferry-target` names the registered service.
pub const KIND_CHANNEL: &str = "channel";

/// A connector's claim to be the current master of its (subaccount, location id): the HA epoch
/// (raised by every promotion, persisted before any tunnel opens) and the node id that breaks
/// ties. Ordered by epoch, then node. A connector without high availability has epoch 0.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fence {
    pub epoch: u64,
    pub node: String,
}

impl Fence {
    /// Header value: `<epoch> <node>`.
    pub fn to_header(&self) -> String {
        format!("{} {}", self.epoch, self.node)
    }

    /// Parses a header value; `None` if it is not `<epoch> <node>` with a node of at most 64
    /// visible ASCII characters.
    pub fn parse(value: &str) -> Option<Self> {
        let (epoch, node) = value.split_once(' ').unwrap_or((value, ""));
        if node.len() > 64 || !node.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        Some(Self { epoch: epoch.parse().ok()?, node: node.to_owned() })
    }
}

/// Values of [`ERROR`].
pub const ERROR_DENIED: &str = "denied";
pub const ERROR_UNREACHABLE: &str = "unreachable";
pub const ERROR_BAD_REQUEST: &str = "bad-request";
pub const ERROR_TIMEOUT: &str = "timeout";
/// The subaccount has as many streams open through the proxy as it may (429).
pub const ERROR_LIMIT: &str = "limit";

/// ALPN protocol id of the tunnel, so that a connector never talks to something else by mistake.
pub const ALPN: &[u8] = b"ferry-tunnel/1";
/// ALPN protocol id of a service channel connection: the same tunnel port and client
/// certificate, with the HTTP/2 roles the other way round (the connector is the client and opens
/// a stream per on-premise connection).
pub const CHANNEL_ALPN: &[u8] = b"ferry-channel/1";

/// HTTP/2 tuning measured on 2 cores (see DESIGN.md "The tunnel"): the 64 KiB defaults cap a
/// stream at a third of the link; these reach the TLS limit.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 64 * 1024;
pub const SEND_BUFFER: usize = 1024 * 1024;
pub const MAX_STREAMS: u32 = 16 * 1024;
/// Both ends read the tunnel's TCP connection through a buffer of this size under rustls
/// (one per tunnel connection): rustls asks for one TLS record (16 KiB) per read, which cost a
/// `recvfrom` per record on a busy tunnel (91 per MiB at the connector); one read now takes
/// whatever the socket holds.
pub const READ_BUFFER: usize = 256 * 1024;

/// Splits `host:port` (IPv6 literals in brackets). Returns `None` if the port is missing or not
/// a number, or the host is empty.
pub fn split_host_port(target: &str) -> Option<(&str, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("a.virtual:8080"), Some(("a.virtual", 8080)));
        assert_eq!(split_host_port("[::1]:25"), Some(("::1", 25)));
        assert_eq!(split_host_port("a.virtual"), None);
        assert_eq!(split_host_port(":80"), None);
        assert_eq!(split_host_port("a:99999"), None);
    }

    #[test]
    fn fences_round_trip_and_order_by_epoch_then_node() {
        let f = Fence { epoch: 7, node: "n-1_A".into() };
        assert_eq!(Fence::parse(&f.to_header()), Some(f.clone()));
        assert_eq!(Fence::parse("0"), Some(Fence::default()));
        for bad in ["", "x y", "-1 a", "1 a b", "1 \u{7f}"] {
            assert_eq!(Fence::parse(bad), None, "{bad}");
        }
        assert_eq!(Fence::parse(&format!("1 {}", "a".repeat(65))), None);
        assert!(Fence { epoch: 2, node: "a".into() } > Fence { epoch: 1, node: "z".into() });
        assert!(Fence { epoch: 2, node: "b".into() } > Fence { epoch: 2, node: "a".into() });
    }
}
