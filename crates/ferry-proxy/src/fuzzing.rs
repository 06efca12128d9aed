//! Property checks shared by the fuzz targets (`fuzz/` at the repository root) and the corpus
//! replay tests. Each function panics when a property does not hold.

use http::{HeaderMap, HeaderName, HeaderValue, Uri};

use crate::http_proxy::{bearer, tunnel_target};

/// An HTTP/1.1 request head (`METHOD target VERSION`, then `Name: value` lines) through Ferry's
/// own checks on top of hyper's parser: the target the proxy asks the connector for must split
/// back (at the connector) to the URI's host and port, and the bearer tokens it reads are
/// trimmed and non-empty where the scheme is `Bearer`.
pub fn http_request_head(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let Some(request_line) = lines.next() else { return };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(line[colon + 1..].trim_ascii()))
        else {
            continue;
        };
        headers.append(name, value);
    }
    for name in [http::header::PROXY_AUTHORIZATION.as_str(), "sap-connectivity-authentication"] {
        if let Some(token) = bearer(&headers, name) {
            assert_eq!(token, token.trim(), "bearer token keeps surrounding blanks");
            let raw = headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
            assert!(raw.trim().get(..6).is_some_and(|s| s.eq_ignore_ascii_case("bearer")), "{raw:?} is not Bearer");
        }
    }
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(_method), Some(target)) = (parts.next(), parts.next()) else { return };
    let Ok(uri) = Uri::try_from(target) else { return };
    let Ok(tunnel) = tunnel_target(&uri) else { return };
    let host = uri.host().unwrap_or_default();
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port = uri.port_u16().unwrap_or(80);
    assert!(!host.is_empty(), "{uri} has no host but was routed to {tunnel:?}");
    assert_eq!(
        ferry_proto::tunnel::split_host_port(&tunnel),
        Some((host, port)),
        "the connector reads {tunnel:?} differently from the proxy's URI {uri}"
    );
}
