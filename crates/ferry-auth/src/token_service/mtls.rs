//! Client authentication by X.509 certificate (mTLS), as xssec does for `credential-type:
//! x509` bindings: the token request body carries only `client_id` and the TLS client
//! certificate proves who the client is.
//!
//! The HTTPS listener *requests* a client certificate (never requires one: secret-based
//! clients and browsers must still connect) and verifies its chain against the configured CA
//! during the handshake. Each connection's verified leaf certificate is then handed to the
//! router as a [`TlsInfo`] request extension, where [`CertificateBinding`]s map it to a client.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use ferry_core::Shutdown;
use ferry_core::serve::{AcceptOptions, accept_loop};
use ferry_core::tls::{CertifiedKey, LocalCa, TlsError, parse_certs, parse_key, root_store};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use super::config::{CertificateBinding, normalize_fingerprint};

/// What the router learns about a request's TLS connection; present on every request that came
/// over TLS, absent on plain HTTP. Tests driving the router as a value insert it themselves.
#[derive(Clone, Debug, Default)]
pub struct TlsInfo {
    /// The client's leaf certificate, already verified by the TLS handshake.
    pub peer_certificate: Option<CertificateDer<'static>>,
}

/// The HTTPS listener's TLS configuration: `identity` as server certificate, HTTP/1.1, and —
/// with `client_ca_pem` — a request for a client certificate issued by that CA. A connection
/// without a certificate is still accepted; one with a certificate the CA did not issue is not.
pub fn https_server_config(
    identity: &CertifiedKey,
    client_ca_pem: Option<&str>,
) -> Result<Arc<ServerConfig>, TlsError> {
    ferry_core::init_crypto();
    let builder = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12]);
    let builder = match client_ca_pem {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(root_store(ca)?))
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(parse_certs(&identity.cert_pem)?, parse_key(identity.key_pem.expose())?)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    if client_ca_pem.is_some() {
        ferry_core::tls::without_resumption(&mut cfg);
    }
    Ok(Arc::new(cfg))
}

/// Serves `router` over TLS like [`ferry_core::serve::serve_router`], and adds a [`TlsInfo`]
/// extension with the connection's peer certificate to every request.
pub async fn serve_router_with_tls_info(
    listener: TcpListener,
    router: Router,
    tls: Arc<ServerConfig>,
    opts: AcceptOptions,
    shutdown: Shutdown,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshake_timeout = opts.handshake_timeout;
    let sd = shutdown.clone();
    let router = router.layer(axum::middleware::from_fn(ferry_core::serve::limit_header_bytes));
    accept_loop(listener, opts, shutdown, move |stream, peer| {
        let router = router.clone();
        let acceptor = acceptor.clone();
        let shutdown = sd.clone();
        async move {
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!("TLS handshake timed out"),
            };
            let peer_certificate =
                tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
            let info = TlsInfo { peer_certificate };
            let service = router.map_request(move |mut req: http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(info.clone());
                req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                req
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(service));
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, "connection ended with error") },
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
                }
            }
        }
    })
    .await
}

/// The SHA-256 fingerprint of a certificate (hex, lower case), as
/// [`CertificateBinding::Sha256Fingerprint`] takes it; `None` if `cert_pem` holds no certificate.
pub fn certificate_fingerprint(cert_pem: &str) -> Option<String> {
    let der = parse_certs(cert_pem).ok()?.into_iter().next()?;
    Some(sha256_hex(&der))
}

/// `(subject, issuer)` of a certificate as [`CertificateBinding::SubjectAndIssuer`] compares
/// them; `None` if `cert_pem` holds no parsable certificate.
pub fn certificate_names(cert_pem: &str) -> Option<(String, String)> {
    let der = parse_certs(cert_pem).ok()?.into_iter().next()?;
    let id = PeerIdentity::of(&der)?;
    Some((id.subject, id.issuer))
}

fn sha256_hex(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The subject of certificates that [`TokenService::issue_client_certificate`](super::TokenService::issue_client_certificate)
/// issues for `client_id`.
fn client_dn(client_id: &str) -> rcgen::DistinguishedName {
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, client_id);
    dn.push(rcgen::DnType::OrganizationalUnitName, "ferry-oauth-client");
    dn.push(rcgen::DnType::OrganizationName, "Ferry");
    dn
}

impl CertificateBinding {
    /// The binding that accepts every certificate `ca` issues for `client_id` through
    /// [`TokenService::issue_client_certificate`](super::TokenService::issue_client_certificate),
    /// for configuring a client that authenticates only by certificate.
    pub fn issued_by(ca: &LocalCa, client_id: &str) -> Option<Self> {
        let ca_der = parse_certs(ca.cert_pem()).ok()?.into_iter().next()?;
        let issuer = PeerIdentity::of(&ca_der)?.subject;
        // Render the subject the way a parsed certificate prints it, by issuing nothing: a
        // self-signed throw-away certificate with the same DN.
        let key = rcgen::KeyPair::generate().ok()?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = client_dn(client_id);
        let cert = params.self_signed(&key).ok()?;
        let subject = PeerIdentity::of(cert.der())?.subject;
        Some(Self::SubjectAndIssuer { subject, issuer })
    }

    pub(crate) fn matches(&self, peer: &PeerIdentity) -> bool {
        match self {
            Self::Sha256Fingerprint(f) => normalize_fingerprint(f).is_some_and(|f| f == peer.sha256),
            Self::SubjectAndIssuer { subject, issuer } => {
                subject.trim() == peer.subject && issuer.trim() == peer.issuer
            }
        }
    }
}

/// What client authentication compares of a peer certificate.
#[derive(Debug)]
pub(crate) struct PeerIdentity {
    pub sha256: String,
    pub subject: String,
    pub issuer: String,
}

impl PeerIdentity {
    pub fn of(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(Self { sha256: sha256_hex(der), subject: cert.subject().to_string(), issuer: cert.issuer().to_string() })
    }
}

/// Issues a client certificate for `client_id` signed by `ca`.
pub(crate) fn issue(ca: &LocalCa, client_id: &str, validity: Duration) -> Result<CertifiedKey, rcgen::Error> {
    let ca_key = rcgen::KeyPair::from_pem(ca.key_pem().expose())?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(ca.cert_pem(), ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = client_dn(client_id);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + validity;
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: ferry_core::Secret::new(key.serialize_pem()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_match_issued_certificates() {
        let ca = LocalCa::generate("test ca").unwrap();
        let cert = issue(&ca, "sb-app!t1|x", Duration::from_secs(3600)).unwrap();
        let der = parse_certs(&cert.cert_pem).unwrap().remove(0);
        let peer = PeerIdentity::of(&der).unwrap();
        let binding = CertificateBinding::issued_by(&ca, "sb-app!t1|x").unwrap();
        assert!(binding.matches(&peer), "{binding:?} vs {peer:?}");
        let (subject, issuer) = certificate_names(&cert.cert_pem).unwrap();
        assert_eq!(binding, CertificateBinding::SubjectAndIssuer { subject: subject.clone(), issuer });
        assert!(subject.contains("CN=sb-app!t1|x"), "{subject}");
        assert!(!CertificateBinding::issued_by(&ca, "other").unwrap().matches(&peer));
        let other_ca = LocalCa::generate("other ca").unwrap();
        assert!(!CertificateBinding::issued_by(&other_ca, "sb-app!t1|x").unwrap().matches(&peer));

        let fp = certificate_fingerprint(&cert.cert_pem).unwrap();
        assert_eq!(fp, peer.sha256);
        let colons: Vec<String> = fp.as_bytes().chunks(2).map(|c| String::from_utf8_lossy(c).to_uppercase()).collect();
        assert!(CertificateBinding::Sha256Fingerprint(colons.join(":")).matches(&peer));
        assert!(!CertificateBinding::Sha256Fingerprint("00".repeat(32)).matches(&peer));
        assert!(certificate_fingerprint("no pem").is_none());
    }
}
