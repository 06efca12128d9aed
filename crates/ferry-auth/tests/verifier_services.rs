#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The shared verifier as clients meet it: the Destination Service answers a refused token with
//! 401, the reason as text and an RFC 6750 `WWW-Authenticate`; the HTTP proxy answers
//! 407 with the reason; the SOCKS5 port answers the SAP authentication with `01 01`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_auth::{KeySet, Verifier};
use ferry_core::Secret;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

const ZONE_A: &str = "zone-a";
const ZONE_B: &str = "zone-b";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

struct Tenants {
    a: Arc<KeySet>,
    b: Arc<KeySet>,
    verifier: Arc<Verifier>,
}

fn tenants() -> Tenants {
    ferry_core::init_crypto();
    let a = Arc::new(KeySet::generate().unwrap());
    let b = Arc::new(KeySet::generate().unwrap());
    let http = ferry_core::tls::http_client(None).unwrap();
    let verifier = Arc::new(Verifier::for_tenants([(ZONE_A.into(), a.clone()), (ZONE_B.into(), b.clone())], http));
    Tenants { a, b, verifier }
}

fn claims(zid: &str, exp: u64) -> Value {
    json!({"zid": zid, "client_id": "sb-dest!b1", "exp": exp, "ext_attr": {"zdn": "sub"}})
}

/// Every refused token and the reason a client reads.
fn refused(t: &Tenants) -> Vec<(String, &'static str)> {
    let other = KeySet::generate().unwrap();
    vec![
        (t.a.sign(&claims(ZONE_A, now() - 600), &[]).unwrap(), "token has expired"),
        (
            t.a.sign(&claims(ZONE_B, now() + 600), &[]).unwrap(),
            "token zone (zid) does not match the subaccount of its issuer",
        ),
        (other.sign(&claims(ZONE_A, now() + 600), &[]).unwrap(), "token is signed with an unknown key"),
        ("e30.e30".into(), "token is not a well-formed JWT"),
        (
            format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&claims(ZONE_A, now() + 600))),
            "token algorithm is not allowed",
        ),
    ]
}

fn b64(v: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn destination_service_answers_401_with_the_reason() {
    let t = tenants();
    let service = ferry_destination::DestinationService::open(
        ferry_destination::Config {
            database: ferry_destination::DatabaseConfig::SqliteMemory,
            master_key: Secret::new([7; 32]),
            token_fetch_timeout: Duration::from_secs(5),
            token_service_ca_pem: None,
        },
        t.verifier.clone(),
        ferry_core::tls::http_client(None).unwrap(),
    )
    .await
    .unwrap();
    let router = service.router();
    let call = |token: String| {
        let router = router.clone();
        async move {
            let req = http::Request::get("/destination-configuration/v1/subaccountDestinations")
                .header("authorization", format!("Bearer {token}"))
                .body(axum::body::Body::empty())
                .unwrap();
            let res = router.oneshot(req).await.unwrap();
            let (parts, body) = res.into_parts();
            let body = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
            (parts.status, parts.headers, body)
        }
    };

    for (token, reason) in refused(&t) {
        let (status, headers, body) = call(token).await;
        assert_eq!(status, 401, "{reason}");
        // SAP's document gives the list's errors as plain text.
        assert_eq!(body, format!("Invalid bearer token: {reason}"));
        assert_eq!(
            headers["www-authenticate"],
            format!("Bearer error=\"invalid_token\", error_description=\"{reason}\"").as_str()
        );
    }
    // Both tenants' own tokens pass, each into its own subaccount.
    for (keys, zid) in [(&t.a, ZONE_A), (&t.b, ZONE_B)] {
        let (status, _, body) = call(keys.sign(&claims(zid, now() + 600), &[]).unwrap()).await;
        assert_eq!((status, body.as_str()), (http::StatusCode::OK, "[]"));
    }
}

/// A proxy on port-0 listeners with the tenant-bound verifier, and no connector.
async fn proxy(t: &Tenants) -> (std::net::SocketAddr, std::net::SocketAddr, ferry_core::Shutdown) {
    let ca = ferry_core::tls::LocalCa::generate("verifier test CA").unwrap();
    let cert = ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    let tls = ferry_core::tls::server_config(&cert, Some(ca.cert_pem()), &[b"h2"]).unwrap();
    let proxy = ferry_proxy::Proxy::new(ferry_proxy::ProxyConfig::new(t.verifier.clone(), tls));
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let (h, s, tun) = (bind().await.unwrap(), bind().await.unwrap(), bind().await.unwrap());
    let (http_addr, socks_addr) = (h.local_addr().unwrap(), s.local_addr().unwrap());
    let shutdown = ferry_core::Shutdown::new();
    tokio::spawn(proxy.run(
        ferry_proxy::Listeners { http: Some(h), socks5: Some(s), tunnel: Some(tun), socks5_no_auth: None },
        shutdown.clone(),
    ));
    (http_addr, socks_addr, shutdown)
}

/// One absolute-form request through the HTTP proxy; returns (status, head, body).
async fn through_proxy(addr: std::net::SocketAddr, token: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET http://backend.virtual:8080/x HTTP/1.1\r\nHost: backend.virtual:8080\r\n\
         Proxy-Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// The SAP SOCKS5 handshake up to the authentication status.
async fn socks_auth(addr: std::net::SocketAddr, token: &str) -> [u8; 2] {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0x05, 0x01, 0x80]).await.unwrap();
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel).await.unwrap();
    assert_eq!(sel, [0x05, 0x80]);
    let mut auth = vec![0x01];
    auth.extend_from_slice(&(token.len() as u32).to_be_bytes());
    auth.extend_from_slice(token.as_bytes());
    auth.push(0);
    s.write_all(&auth).await.unwrap();
    let mut status = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut status)).await.unwrap().unwrap();
    status
}

#[tokio::test]
async fn proxy_answers_407_and_socks5_01_01() {
    let t = tenants();
    let (http_addr, socks_addr, shutdown) = proxy(&t).await;
    for (token, reason) in refused(&t) {
        let (status, head, body) = through_proxy(http_addr, &token).await;
        assert_eq!(status, 407, "{reason}: {body}");
        assert_eq!(body.trim_end(), format!("Proxy authentication failed: {reason}"));
        assert!(
            head.contains(&format!("error=\"invalid_token\", error_description=\"{reason}\"").to_ascii_lowercase()),
            "{head}"
        );
        assert_eq!(socks_auth(socks_addr, &token).await, [0x01, 0x01], "{reason}");
    }
    // A good token passes authentication: the proxy then looks for a connector of its zone.
    let good = t.b.sign(&claims(ZONE_B, now() + 600), &[]).unwrap();
    let (status, _, body) = through_proxy(http_addr, &good).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(ZONE_B), "{body}");
    assert_eq!(socks_auth(socks_addr, &good).await, [0x01, 0x00]);
    shutdown.cancel();
}
