//! TLS to PostgreSQL, configured the way libpq is: `sslmode`, `sslrootcert`, `sslcert` and
//! `sslkey` in the database URL (either form), so a URL copied from a managed database's console
//! or from a `psql` set-up works unchanged.
//!
//! | `sslmode` | TLS | server certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (the default, as in libpq) | when the server offers it | no; against `sslrootcert` if given |
//! | `require` | always | no; against `sslrootcert` if given (libpq does the same) |
//! | `verify-ca` | always | chain to `sslrootcert` |
//! | `verify-full` | always | chain to `sslrootcert`, and the host name (or IP address) |
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the system's roots (which,
//! as in libpq, implies `verify-full`). tokio-postgres knows only `disable`/`prefer`/`require`
//! and none of the file options, so this module takes them out of the URL and hands
//! tokio-postgres the rest. An unchecked certificate still has to sign the handshake with its key;
//! it only guards against eavesdropping, not against a server in the middle: `verify-full` does.
//!
//! SCRAM channel binding (`tls-server-end-point`, RFC 5929) is offered when the server's
//! certificate is signed with SHA-256/384/512, which makes `channel_binding=require` work.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::ClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// What is wrong with the TLS part of a database URL.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PgTlsError {
    #[error("sslmode={0} is not supported; use disable, prefer, require, verify-ca or verify-full")]
    Mode(String),
    #[error("sslmode={0} checks the server's certificate and needs sslrootcert=<CA file in PEM> or sslrootcert=system")]
    NoRoots(&'static str),
    #[error("cannot read {param} file {path}: {reason}")]
    File { param: &'static str, path: String, reason: String },
    #[error("{param} file {path} is not usable: {reason}")]
    Content { param: &'static str, path: String, reason: String },
    #[error("sslcert and sslkey go together: give both or neither")]
    HalfClientCert,
    #[error("the database URL is not valid: {0}")]
    Syntax(String),
    #[error("{0} is not supported; TLS options are sslmode, sslrootcert, sslcert and sslkey")]
    Unsupported(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The TLS options taken out of a database URL.
#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    mode: Option<String>,
    root_cert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl Options {
    /// Takes `key`/`value` if it is a TLS option; false if it is not one.
    fn take(&mut self, key: &str, value: &str) -> Result<bool, PgTlsError> {
        let slot = match key {
            "sslmode" => &mut self.mode,
            "sslrootcert" => &mut self.root_cert,
            "sslcert" => &mut self.cert,
            "sslkey" => &mut self.key,
            "sslcrl" | "sslcrldir" => return Err(PgTlsError::Unsupported("sslcrl")),
            "sslpassword" => return Err(PgTlsError::Unsupported("sslpassword (an encrypted sslkey)")),
            _ => return Ok(false),
        };
        *slot = Some(value.to_owned());
        Ok(true)
    }
}

/// The URL tokio-postgres is given, the SSL mode to set on its config, and the TLS connector.
pub(crate) struct Prepared {
    pub url: String,
    pub ssl_mode: SslMode,
    pub tls: PgTls,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("Prepared").field("ssl_mode", &self.ssl_mode).finish_non_exhaustive()
    }
}

/// Splits the TLS options off `url` and builds the rustls client for them.
pub(crate) fn prepare(url: &str) -> Result<Prepared, PgTlsError> {
    let (url, options) = split(url)?;
    let mode = match options.mode.as_deref() {
        None => {
            if options.root_cert.as_deref() == Some("system") {
                Mode::VerifyFull
            } else {
                Mode::Prefer
            }
        }
        Some("disable") => Mode::Disable,
        Some("prefer") => Mode::Prefer,
        Some("require") => Mode::Require,
        Some("verify-ca") => Mode::VerifyCa,
        Some("verify-full") => Mode::VerifyFull,
        Some(other) => return Err(PgTlsError::Mode(other.to_owned())),
    };
    // libpq: sslrootcert=system makes anything weaker than verify-full an error.
    if options.root_cert.as_deref() == Some("system") && mode != Mode::VerifyFull && mode != Mode::Disable {
        return Err(PgTlsError::Syntax(
            "sslrootcert=system needs sslmode=verify-full (libpq's rule: the system's roots say nothing without the name check)".into(),
        ));
    }
    let ssl_mode = match mode {
        Mode::Disable => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    };
    let config = client_config(mode, &options)?;
    Ok(Prepared { url, ssl_mode, tls: PgTls { config, verify_name: mode == Mode::VerifyFull } })
}

fn read(param: &'static str, path: &str) -> Result<String, PgTlsError> {
    std::fs::read_to_string(path).map_err(|e| PgTlsError::File { param, path: path.to_owned(), reason: e.to_string() })
}

fn client_config(mode: Mode, options: &Options) -> Result<Arc<ClientConfig>, PgTlsError> {
    ferry_core::init_crypto();
    let roots =
        match options.root_cert.as_deref() {
            None => None,
            Some("system") => Some(ferry_core::tls::outbound_roots(None).map_err(|e| PgTlsError::Content {
                param: "sslrootcert",
                path: "system".into(),
                reason: e.to_string(),
            })?),
            Some(path) => Some(ferry_core::tls::root_store(&read("sslrootcert", path)?).map_err(|e| {
                PgTlsError::Content { param: "sslrootcert", path: path.to_owned(), reason: e.to_string() }
            })?),
        };
    let builder = match (mode, roots) {
        (Mode::VerifyCa | Mode::VerifyFull, None) => {
            return Err(PgTlsError::NoRoots(if mode == Mode::VerifyCa { "verify-ca" } else { "verify-full" }));
        }
        (_, Some(roots)) => {
            let webpki = WebPkiServerVerifier::builder(Arc::new(roots)).build().map_err(|e| PgTlsError::Content {
                param: "sslrootcert",
                path: options.root_cert.clone().unwrap_or_default(),
                reason: e.to_string(),
            })?;
            let verifier = Arc::new(ChainCheck { webpki, check_name: mode == Mode::VerifyFull });
            ClientConfig::builder().dangerous().with_custom_certificate_verifier(verifier)
        }
        // `prefer`/`require` without `sslrootcert`: any certificate, but its key must sign the
        // handshake.
        (_, None) => ferry_core::tls::trust_all_builder(),
    };
    let mut config = match (&options.cert, &options.key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = ferry_core::tls::parse_certs(&read("sslcert", cert)?).map_err(|e| PgTlsError::Content {
                param: "sslcert",
                path: cert.clone(),
                reason: e.to_string(),
            })?;
            let key_der = ferry_core::tls::parse_key(&read("sslkey", key)?).map_err(|e| PgTlsError::Content {
                param: "sslkey",
                path: key.clone(),
                reason: e.to_string(),
            })?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| PgTlsError::Content {
                param: "sslkey",
                path: key.clone(),
                reason: format!("does not go with sslcert {cert}: {e}"),
            })?
        }
        _ => return Err(PgTlsError::HalfClientCert),
    };
    // PostgreSQL 17's direct TLS (`sslnegotiation=direct`) requires this ALPN; older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(config))
}

/// Checks the chain to the given roots, and the name only for `verify-full`.
#[derive(Debug)]
struct ChainCheck {
    webpki: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for ChainCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

// ---- the URL -------------------------------------------------------------------------------

/// `url` without its TLS options, and the options. Both of libpq's forms: a URI
/// (`postgres://…?sslmode=…`, options in the query) and key=value pairs.
fn split(url: &str) -> Result<(String, Options), PgTlsError> {
    let mut options = Options::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else { return Ok((url.to_owned(), options)) };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            // libpq percent-decodes URI parameters; a '+' stays a plus (form decoding would make it
            // a space), hence the escape before decoding.
            let decode = |s: &str| {
                let plus_kept = s.replace('+', "%2B");
                form_urlencoded::parse(format!("x={plus_kept}").as_bytes()).next().map(|(_, v)| v.into_owned())
            };
            let (key, value) = (decode(k).unwrap_or_default(), decode(v).unwrap_or_default());
            if !options.take(&key, &value)? {
                kept.push(pair);
            }
        }
        let url = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
        return Ok((url, options));
    }
    let mut kept = Vec::new();
    for (key, value) in key_values(url)? {
        if !options.take(&key, &value)? {
            kept.push(format!("{key}='{}'", value.replace('\\', "\\\\").replace('\'', "\\'")));
        }
    }
    Ok((kept.join(" "), options))
}

/// libpq's key=value syntax: `key = value` pairs split by white space; a value in single
/// quotes may hold spaces; a backslash escapes the next character.
fn key_values(s: &str) -> Result<Vec<(String, String)>, PgTlsError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // Not echoed: a word without "=" may well be a misplaced password.
            return Err(PgTlsError::Syntax(format!(
                "word {} has no \"=\" after it; use key=value pairs",
                out.len() + 1
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(PgTlsError::Syntax(format!("the value of \"{key}\" has no closing quote"))),
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

// ---- tokio-postgres' TLS traits ------------------------------------------------------------

/// The connector handed to tokio-postgres (one per pool; cloned per connection).
#[derive(Clone)]
pub(crate) struct PgTls {
    config: Arc<ClientConfig>,
    verify_name: bool,
}

impl MakeTlsConnect<tokio_postgres::Socket> for PgTls {
    type Stream = PgTlsStream;
    type TlsConnect = PgTlsConnect;
    type Error = rustls::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<PgTlsConnect, rustls::Error> {
        let name = match ServerName::try_from(host.to_owned()) {
            Ok(name) => name,
            // A unix socket has no name; PostgreSQL does not offer TLS there, so this
            // name is only ever sent when the name is not checked.
            Err(_) if !self.verify_name => ServerName::try_from("localhost").expect("a valid name"),
            Err(_) => {
                return Err(rustls::Error::General(format!(
                    "sslmode=verify-full needs a host name or IP address to check, not \"{host}\""
                )));
            }
        };
        Ok(PgTlsConnect { config: self.config.clone(), name })
    }
}

pub(crate) struct PgTlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<tokio_postgres::Socket> for PgTlsConnect {
    type Stream = PgTlsStream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<PgTlsStream>> + Send>>;

    fn connect(self, socket: tokio_postgres::Socket) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move { Ok(PgTlsStream(connector.connect(self.name, socket).await?)) })
    }
}

pub(crate) struct PgTlsStream(tokio_rustls::client::TlsStream<tokio_postgres::Socket>);

impl tokio_postgres::tls::TlsStream for PgTlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        match session.peer_certificates().and_then(|c| c.first()).and_then(|c| end_point_hash(c)) {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

/// RFC 5929's `tls-server-end-point`: the certificate hashed with the hash of its signature
/// algorithm, SHA-256 for MD5 and SHA-1; none for algorithms without one (Ed25519).
fn end_point_hash(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    use sha2::Digest;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let oid = parsed.signature_algorithm.algorithm.to_id_string();
    let hash = match oid.as_str() {
        // sha256WithRSAEncryption, ecdsa-with-SHA256, and MD5/SHA-1 ones (RFC 5929 4.1)
        "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.3.2"
        | "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.10045.4.1" => sha2::Sha256::digest(cert.as_ref()).to_vec(),
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => sha2::Sha384::digest(cert.as_ref()).to_vec(),
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => sha2::Sha512::digest(cert.as_ref()).to_vec(),
        _ => return None,
    };
    Some(hash)
}

impl AsyncRead for PgTlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PgTlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_options_are_taken_out_and_the_rest_kept() {
        let (url, o) = split(
            "postgres://u:p%40ss@db:5432/ferry?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(url, "postgres://u:p%40ss@db:5432/ferry?application_name=x&connect_timeout=3");
        assert_eq!(o.mode.as_deref(), Some("verify-full"));
        assert_eq!(o.root_cert.as_deref(), Some("/etc/ca.pem"));
        let (url, o) = split("postgresql://db/ferry?sslmode=require").unwrap();
        assert_eq!((url.as_str(), o.mode.as_deref()), ("postgresql://db/ferry", Some("require")));
        let (url, o) = split("postgres://db/ferry").unwrap();
        assert_eq!((url.as_str(), o), ("postgres://db/ferry", Options::default()));
    }

    #[test]
    fn key_value_options_are_taken_out_and_quoting_survives() {
        let (url, o) = split(
            r"host=db  dbname = ferry password='a b \'q\' \\ c' sslmode=verify-ca sslrootcert='/my certs/ca.pem'",
        )
        .unwrap();
        assert_eq!(o.mode.as_deref(), Some("verify-ca"));
        assert_eq!(o.root_cert.as_deref(), Some("/my certs/ca.pem"));
        // What is kept still parses, to the same values.
        let config: tokio_postgres::Config = url.parse().unwrap();
        assert_eq!(config.get_dbname(), Some("ferry"));
        assert_eq!(config.get_password(), Some(&br"a b 'q' \ c"[..]));
        let e = split("host=db s3cret dbname=x").unwrap_err().to_string();
        assert!(e.contains("word 2 has no \"=\"") && !e.contains("s3cret"), "{e}");
        assert!(matches!(split("host='db"), Err(PgTlsError::Syntax(_))));
    }

    #[test]
    fn bad_tls_options_say_what_to_change() {
        let msg = |url: &str| prepare(url).map(|_| ()).unwrap_err().to_string();
        assert!(msg("postgres://db/x?sslmode=allow").contains("sslmode=allow is not supported"));
        assert!(msg("postgres://db/x?sslmode=verify-full").contains("needs sslrootcert="));
        assert!(msg("postgres://db/x?sslmode=verify-ca").contains("sslmode=verify-ca checks"));
        assert!(msg("postgres://db/x?sslmode=require&sslrootcert=/nonexistent/ca.pem").contains("/nonexistent/ca.pem"));
        assert!(msg("postgres://db/x?sslmode=require&sslrootcert=system").contains("verify-full"));
        assert!(msg("postgres://db/x?sslcert=/a.pem").contains("give both"));
        assert!(msg("postgres://db/x?sslcrl=/a.pem").contains("not supported"));
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let m = msg(&format!("postgres://db/x?sslmode=verify-ca&sslrootcert={}", not_pem.display()));
        assert!(m.contains("sslrootcert file") && m.contains("not usable"), "{m}");
    }

    #[test]
    fn modes_map_to_tokio_postgres() {
        let mode = |url: &str| prepare(url).unwrap().ssl_mode;
        assert_eq!(mode("postgres://db/x"), SslMode::Prefer);
        assert_eq!(mode("postgres://db/x?sslmode=disable"), SslMode::Disable);
        assert_eq!(mode("postgres://db/x?sslmode=require"), SslMode::Require);
        assert_eq!(mode("host=db sslmode=verify-full sslrootcert=system"), SslMode::Require);
        assert_eq!(mode("postgres://db/x?sslrootcert=system"), SslMode::Require);
    }

    #[test]
    fn channel_binding_hash_follows_the_signature_algorithm() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".into()]).unwrap().self_signed(&key).unwrap();
        let der = cert.der();
        use sha2::Digest;
        assert_eq!(end_point_hash(der), Some(sha2::Sha256::digest(der.as_ref()).to_vec()));
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".into()]).unwrap().self_signed(&ed).unwrap();
        assert_eq!(end_point_hash(cert.der()), None);
    }
}
