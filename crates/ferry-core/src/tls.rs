//! TLS set-up: a local certificate authority for `ferry up` and tests, and rustls configs.
//!
//! One CA issues the HTTPS server certificates (token service, tunnel endpoint) and the
//! connector client certificates. Connector identity travels in a URI SAN
//! (`ferry:connector:<subaccount>:<location>`), so any proxy replica that trusts the CA can
//! authenticate a connector without shared state.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::sync::Arc;
use time::{Duration, OffsetDateTime};

use crate::Secret;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: Secret<String>,
}

/// A certificate authority held in memory (and persisted by `ferry up` in its data folder).
pub struct LocalCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").finish_non_exhaustive()
    }
}

const CONNECTOR_URI_PREFIX: &str = "ferry:connector:";

impl LocalCa {
    /// Generates a fresh CA (ECDSA P-256, ten years).
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.distinguished_name.push(DnType::OrganizationName, "Ferry");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(Self { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// Loads a CA from its PEM certificate and PKCS#8 PEM key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self { cert_pem: cert_pem.to_owned(), issuer })
    }

    /// Like [`LocalCa::from_pem`] for a CA an administrator uploads: the certificate must be a CA
    /// allowed to sign certificates (`keyCertSign`), and the key must be its key; the error says
    /// which of these fails.
    pub fn from_pem_checked(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let der = parse_certs(cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| TlsError::Pem("no certificate in the CA certificate PEM".into()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| TlsError::Pem(format!("the CA certificate does not parse: {e}")))?;
        if !cert.is_ca() {
            return Err(TlsError::Pem("the certificate is not a CA (basicConstraints CA:TRUE is missing)".into()));
        }
        if let Ok(Some(ku)) = cert.key_usage()
            && !ku.value.key_cert_sign()
        {
            return Err(TlsError::Pem("the CA certificate's key usage lacks keyCertSign".into()));
        }
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| TlsError::Pem(format!("the private key does not load (PKCS#8 PEM expected): {e}")))?;
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(TlsError::Pem("the private key does not belong to the CA certificate".into()));
        }
        Self::from_pem(cert_pem, key_pem)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> Secret<String> {
        Secret::new(self.issuer.key().serialize_pem())
    }

    fn issue(&self, mut params: CertificateParams, validity: Duration) -> Result<CertifiedKey, TlsError> {
        let key = KeyPair::generate()?;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + validity;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: Secret::new(key.serialize_pem()) })
    }

    /// A TLS server certificate for the given DNS names / IP addresses.
    pub fn issue_server_cert(&self, names: &[&str]) -> Result<CertifiedKey, TlsError> {
        let mut params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("ferry"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.issue(params, Duration::days(825))
    }

    /// A short-lived client certificate for a user (principal propagation): the subject is
    /// given as `(attribute, value)` pairs with attributes `CN`, `EMAIL`/`E`, `OU`, `O`, `L`,
    /// `ST`, `C`.
    pub fn issue_user_cert(&self, subject: &[(String, String)], validity: Duration) -> Result<CertifiedKey, TlsError> {
        let mut params = CertificateParams::default();
        for (attr, value) in subject {
            let ty = match attr.to_ascii_uppercase().as_str() {
                "CN" => DnType::CommonName,
                "OU" => DnType::OrganizationalUnitName,
                "O" => DnType::OrganizationName,
                "L" => DnType::LocalityName,
                "ST" => DnType::StateOrProvinceName,
                "C" => DnType::CountryName,
                "EMAIL" | "E" => DnType::CustomDnType(vec![1, 2, 840, 113549, 1, 9, 1]),
                other => return Err(TlsError::Pem(format!("unsupported subject attribute {other}"))),
            };
            params.distinguished_name.push(ty, value.as_str());
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Issued slightly in the past so clock skew between connector and backend does not
        // make a fresh certificate "not yet valid".
        self.issue(params, validity)
    }

    /// A client certificate that identifies a Cloud Connector for `(subaccount, location_id)`.
    pub fn issue_connector_cert(
        &self,
        subaccount: &str,
        location_id: &str,
        validity: Duration,
    ) -> Result<CertifiedKey, TlsError> {
        let key = KeyPair::generate()?;
        let cert = self.sign_connector(&key, subaccount, location_id, validity)?;
        Ok(CertifiedKey { cert_pem: cert, key_pem: Secret::new(key.serialize_pem()) })
    }

    /// Backdated by at most the validity itself (not the usual five minutes), so that a
    /// short-lived certificate's lifetime stays short and "renew at 2/3 of the lifetime" works;
    /// [`connector_validity`] reads the requested validity back.
    fn sign_connector(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        subaccount: &str,
        location_id: &str,
        validity: Duration,
    ) -> Result<String, TlsError> {
        let mut params = connector_params(subaccount, location_id)?;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - validity.min(CONNECTOR_BACKDATE);
        params.not_after = now + validity;
        params.use_authority_key_identifier_extension = true;
        Ok(params.signed_by(public_key, &self.issuer)?.pem())
    }

    /// Signs the public key of a PEM certificate signing request (whose signature is checked) as
    /// a connector certificate for `(subaccount, location_id)`. Everything else the CSR asks for
    /// (subject, extensions) is ignored: the identity comes from the caller, never from the CSR.
    pub fn sign_connector_csr(
        &self,
        csr_pem: &str,
        subaccount: &str,
        location_id: &str,
        validity: Duration,
    ) -> Result<String, TlsError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        self.sign_connector(&csr.public_key, subaccount, location_id, validity)
    }
}

const CONNECTOR_BACKDATE: Duration = Duration::minutes(5);

/// `(not_before, not_after)` of a certificate (DER), as Unix seconds.
pub fn validity_of(cert_der: &[u8]) -> Option<(i64, i64)> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some((x509.validity().not_before.timestamp(), x509.validity().not_after.timestamp()))
}

/// The validity a connector certificate was requested with (its lifetime without the backdating
/// of [`LocalCa::issue_connector_cert`]), so a renewal can ask for the same.
pub fn connector_validity(cert_der: &[u8]) -> Option<Duration> {
    let (from, to) = validity_of(cert_der)?;
    let lifetime = Duration::seconds(to - from);
    if lifetime <= Duration::ZERO {
        return None;
    }
    Some(if lifetime >= CONNECTOR_BACKDATE * 2 { lifetime - CONNECTOR_BACKDATE } else { lifetime / 2 })
}

fn connector_params(subaccount: &str, location_id: &str) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, format!("connector {subaccount}"));
    params.distinguished_name.push(DnType::OrganizationalUnitName, location_id);
    params.subject_alt_names = vec![SanType::URI(connector_uri(subaccount, location_id).try_into()?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// A fresh key and a PEM certificate signing request for it (the connector's side of a
/// certificate renewal; the key never leaves the connector).
pub fn connector_csr(subaccount: &str, location_id: &str) -> Result<(String, Secret<String>), TlsError> {
    let key = KeyPair::generate()?;
    let csr = connector_params(subaccount, location_id)?.serialize_request(&key)?.pem()?;
    Ok((csr, Secret::new(key.serialize_pem())))
}

/// The URI SAN carrying a connector's identity. The location id is percent-encoded so that any
/// URI-safe or unsafe id survives; an empty location id is the default location.
pub fn connector_uri(subaccount: &str, location_id: &str) -> String {
    let enc = |s: &str| percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string();
    format!("{CONNECTOR_URI_PREFIX}{}:{}", enc(subaccount), enc(location_id))
}

/// Reads `(subaccount, location_id)` from a connector client certificate (DER).
pub fn connector_identity(cert_der: &[u8]) -> Option<(String, String)> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = x509.subject_alternative_name().ok()??;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name
            && let Some(rest) = uri.strip_prefix(CONNECTOR_URI_PREFIX)
        {
            let (sub, loc) = rest.split_once(':')?;
            let dec = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8().ok().map(|c| c.into_owned());
            return Some((dec(sub)?, dec(loc)?));
        }
    }
    None
}

pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("no certificate found".into()));
    }
    Ok(certs)
}

pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem(e.to_string()))
}

pub fn root_store(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in parse_certs(ca_pem)? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// Server config; with `client_ca` set, a client certificate issued by it is required.
pub fn server_config(
    identity: &CertifiedKey,
    client_ca: Option<&str>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    crate::init_crypto();
    let builder = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12]);
    let builder = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(root_store(ca)?))
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(parse_certs(&identity.cert_pem)?, parse_key(identity.key_pem.expose())?)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    if client_ca.is_some() {
        without_resumption(&mut cfg);
    }
    Ok(Arc::new(cfg))
}

/// Turns off session resumption (TLS 1.2 session ids, TLS 1.3 tickets) on a server that
/// authenticates clients by certificate. A resumed handshake restores the client certificate
/// from the session instead of verifying it again, so a certificate that has expired since, or
/// was issued by a CA no longer trusted, would keep working; every connection must run the full
/// handshake and the verifier.
pub fn without_resumption(cfg: &mut ServerConfig) {
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.ticketer = Arc::new(NoTickets);
}

/// A ticketer that never issues stateless tickets (rustls' default, spelled out so the
/// choice does not depend on it).
#[derive(Debug)]
struct NoTickets;

impl rustls::server::ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }
    fn lifetime(&self) -> u32 {
        0
    }
    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn decrypt(&self, _cipher: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// Client config trusting `ca_pem` only, optionally presenting a client certificate.
pub fn client_config(
    ca_pem: &str,
    identity: Option<&CertifiedKey>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    crate::init_crypto();
    let builder = ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(root_store(ca_pem)?);
    let mut cfg = match identity {
        Some(id) => builder.with_client_auth_cert(parse_certs(&id.cert_pem)?, parse_key(id.key_pem.expose())?)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A client config trusting the system roots plus `extra_ca_pem`, TLS 1.2+, no client
/// certificate: for outbound TLS to servers outside Ferry (backends, token endpoints).
pub fn outbound_client_config(extra_ca_pem: Option<&str>) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder().with_root_certificates(outbound_roots(extra_ca_pem)?).with_no_client_auth())
}

/// A client config builder that accepts any server certificate for any name: a destination's
/// `TrustAll=true`, which SAP documents as "the server certificate is not checked". The
/// handshake signature is still verified, so the server must hold the key of the certificate
/// it shows.
pub fn trust_all_builder() -> rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert> {
    crate::init_crypto();
    let algorithms = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    ClientConfig::builder().dangerous().with_custom_certificate_verifier(Arc::new(TrustAll(algorithms)))
}

/// The verifier behind [`trust_all_builder`].
#[derive(Debug)]
struct TrustAll(rustls::crypto::WebPkiSupportedAlgorithms);

impl rustls::client::danger::ServerCertVerifier for TrustAll {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// The system's roots plus `extra_ca_pem`.
pub fn outbound_roots(extra_ca_pem: Option<&str>) -> Result<RootCertStore, TlsError> {
    crate::init_crypto();
    let mut roots = RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(pem) = extra_ca_pem {
        for c in parse_certs(pem)? {
            roots.add(c)?;
        }
    }
    Ok(roots)
}

/// An HTTP client for outbound calls (token endpoints, JWKS): the system roots plus
/// `extra_ca_pem` (the local CA under `ferry up`), TLS 1.2+ through rustls, `TCP_NODELAY`.
pub fn http_client(extra_ca_pem: Option<&str>) -> Result<reqwest::Client, TlsError> {
    let cfg = outbound_client_config(extra_ca_pem)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(cfg)
        .tcp_nodelay(true)
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connector_identity_round_trips() {
        let ca = LocalCa::generate("test ca").unwrap();
        let c = ca.issue_connector_cert("9acf-sub", "loc:1 ä", Duration::days(1)).unwrap();
        let der = parse_certs(&c.cert_pem).unwrap().remove(0);
        assert_eq!(connector_identity(&der), Some(("9acf-sub".into(), "loc:1 ä".into())));
        let server = ca.issue_server_cert(&["localhost"]).unwrap();
        let der = parse_certs(&server.cert_pem).unwrap().remove(0);
        assert_eq!(connector_identity(&der), None);
    }

    #[test]
    fn ca_round_trips_through_pem() {
        let ca = LocalCa::generate("test ca").unwrap();
        let again = LocalCa::from_pem(ca.cert_pem(), ca.key_pem().expose()).unwrap();
        let cert = again.issue_server_cert(&["127.0.0.1"]).unwrap();
        server_config(&cert, Some(ca.cert_pem()), &[]).unwrap();
        client_config(ca.cert_pem(), None, &[]).unwrap();
    }
}
