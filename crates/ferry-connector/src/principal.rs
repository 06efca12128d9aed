//! Principal propagation: the cloud user behind a request becomes a short-lived X.509
//! certificate that the backend maps to its own user (SAP's `SSL_CLIENT_CERT` header).
//!
//! The user JWT arrives with the tunnel stream (`ferry-principal`). The connector verifies it
//! itself — the proxy is not trusted to vouch for users — with a tolerance after `exp` as SAP
//! allows (`expirationToleranceInHr`), derives the subject from the claims with the configured
//! pattern (`CN=${name}` by default), and issues a certificate from its principal-propagation CA,
//! reused while valid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use ferry_auth::{Claims, Verifier, VerifyError};
use ferry_core::tls::LocalCa;
use serde::{Deserialize, Serialize};

/// `authenticationMode` of a system mapping (SAP's REST values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthenticationMode {
    /// No principal propagation.
    #[default]
    None,
    NoneRestricted,
    /// Principal propagation with an X.509 user certificate.
    X509General,
    X509Restricted,
}

impl AuthenticationMode {
    pub fn propagates(self) -> bool {
        matches!(self, Self::X509General | Self::X509Restricted)
    }

    /// `*_RESTRICTED` never present the system certificate to the backend (SPEC §4.3).
    pub fn sends_system_certificate(self) -> bool {
        matches!(self, Self::None | Self::X509General)
    }
}

/// A user certificate: for `SSL_CLIENT_CERT` (`header`, base64 DER) or as the TLS client
/// certificate towards the backend (`identity`).
#[derive(Clone, Debug)]
pub struct UserCertificate {
    pub header: String,
    pub identity: ferry_core::tls::CertifiedKey,
    /// The subject, e.g. `CN=alice,EMAIL=alice@example.org` (for the audit log).
    pub subject: String,
}

/// How the backend receives the user certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalDelivery {
    /// In the `SSL_CLIENT_CERT` header (SAP's way for HTTPS backends).
    #[default]
    Header,
    /// As the client certificate of the TLS connection to an `HTTPS` backend (a fresh
    /// connection per request, since the identity differs per user), plus the header.
    Tls,
}

pub struct PrincipalPropagation {
    pub verifier: Arc<Verifier>,
    pub ca: Arc<LocalCa>,
    /// `certificateValidityInMin`.
    pub certificate_validity: Duration,
    /// `expirationToleranceInHr`: how long after the JWT's `exp` the principal is still accepted.
    pub expiration_tolerance: Duration,
    /// Subject pattern, e.g. `CN=${name}` or `CN=${user_name},EMAIL=${email},O=ACME`.
    pub subject_pattern: String,
    cache: Mutex<HashMap<String, (UserCertificate, Instant)>>,
}

impl std::fmt::Debug for PrincipalPropagation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrincipalPropagation").field("subject_pattern", &self.subject_pattern).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrincipalError {
    #[error("the propagated user token is invalid: {0}")]
    Token(VerifyError),
    #[error("the propagated user token cannot fill the certificate subject: {0}")]
    Subject(String),
    #[error("issuing the user certificate failed")]
    Issue,
}

impl PrincipalPropagation {
    pub fn new(verifier: Arc<Verifier>, ca: Arc<LocalCa>) -> Self {
        Self {
            verifier,
            ca,
            certificate_validity: Duration::from_secs(60 * 60),
            expiration_tolerance: Duration::from_secs(60 * 60),
            subject_pattern: "CN=${name}".into(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The value of `SSL_CLIENT_CERT` for `token`: the certificate's DER, base64, one line.
    pub async fn certificate_for(&self, token: &str) -> Result<String, PrincipalError> {
        Ok(self.user_certificate(token).await?.header)
    }

    /// The user certificate (with its key) for `token`.
    pub async fn user_certificate(&self, token: &str) -> Result<UserCertificate, PrincipalError> {
        let claims = self
            .verifier
            .verify_with_expiry_tolerance(token, self.expiration_tolerance)
            .await
            .map_err(PrincipalError::Token)?;
        let subject = subject(&self.subject_pattern, &claims)?;
        let key = subject.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            // Reuse while more than a minute of validity is left, as SAP's connector does.
            if let Some((cert, until)) = cache.get(&key)
                && Instant::now() + Duration::from_secs(60) < *until
            {
                return Ok(cert.clone());
            }
        }
        let issued = self.ca.issue_user_cert(&subject, time_duration(self.certificate_validity)).map_err(|e| {
            tracing::warn!(error = %e, "cannot issue a user certificate");
            PrincipalError::Issue
        })?;
        let der = ferry_core::tls::parse_certs(&issued.cert_pem).map_err(|_| PrincipalError::Issue)?;
        let value = base64::engine::general_purpose::STANDARD.encode(der[0].as_ref());
        let cert = UserCertificate { header: value, identity: issued, subject: key.clone() };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(key, (cert.clone(), Instant::now() + self.certificate_validity));
        Ok(cert)
    }
}

fn time_duration(d: Duration) -> time::Duration {
    time::Duration::seconds(d.as_secs().min(i64::MAX as u64) as i64)
}

/// `${name}`: for business users the first of `user_name`, `email`, `mail`, `user_uuid`,
/// `sub`; for technical users (no user claims) the first of `client_id`, `cid`, `sub`, `azp`.
fn variable(claims: &Claims, name: &str) -> Option<String> {
    let raw = |k: &str| claims.raw.get(k).and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_owned);
    match name {
        "name" => {
            let keys: &[&str] = if claims.is_user() {
                &["user_name", "email", "mail", "user_uuid", "sub"]
            } else {
                &["client_id", "cid", "sub", "azp"]
            };
            keys.iter().find_map(|k| raw(k))
        }
        "mail" | "email" => raw("email").or_else(|| raw("mail")),
        "user_type" => Some(if claims.is_user() { "Business" } else { "Technical" }.into()),
        "login_name" => raw("user_name"),
        other => raw(other),
    }
}

/// Placeholders a subject pattern may use: the ones SAP documents that an XSUAA or IAS token
/// carries. Anything else is refused when the pattern is set, rather than failing every request.
pub const PATTERN_VARIABLES: &[&str] = &[
    "name",
    "mail",
    "email",
    "user_type",
    "login_name",
    "user_name",
    "user_uuid",
    "user_id",
    "given_name",
    "family_name",
    "sub",
    "client_id",
    "cid",
    "azp",
    "origin",
    "zid",
];

/// Subject attributes a pattern may set (SAP's `subjectPattern` fields).
pub const PATTERN_ATTRIBUTES: &[&str] = &["CN", "EMAIL", "L", "OU", "O", "ST", "C"];

/// Checks a subject pattern before it is stored: `ATTR=value` parts of [`PATTERN_ATTRIBUTES`],
/// placeholders of [`PATTERN_VARIABLES`]; the message names what is wrong.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let mut unknown = Vec::new();
    if pattern.trim().is_empty() {
        return Err("the subject pattern is empty; e.g. CN=${name}".into());
    }
    for part in pattern.split(',') {
        let Some((attr, template)) = part.split_once('=') else {
            return Err(format!("{:?} is not ATTRIBUTE=value (e.g. CN=${{name}})", part.trim()));
        };
        let attr = attr.trim();
        if !PATTERN_ATTRIBUTES.contains(&attr.to_ascii_uppercase().as_str()) {
            return Err(format!("unknown subject attribute {attr:?}; use one of {}", PATTERN_ATTRIBUTES.join(", ")));
        }
        let mut rest = template;
        let mut literal = String::new();
        while let Some(start) = rest.find("${") {
            literal.push_str(&rest[..start]);
            let Some(end) = rest[start..].find('}') else {
                return Err(format!("unclosed ${{ in {:?}", part.trim()));
            };
            let var = &rest[start + 2..start + end];
            if !PATTERN_VARIABLES.contains(&var) {
                unknown.push(format!("${{{var}}}"));
            }
            rest = &rest[start + end + 1..];
        }
        literal.push_str(rest);
        if template.trim().is_empty() || literal.chars().any(|c| c.is_control() || "+=\"\\<>;".contains(c)) {
            return Err(format!("{attr} has an empty value or DN special characters"));
        }
    }
    if !unknown.is_empty() {
        return Err(format!(
            "unknown placeholder {}; known are {}",
            unknown.join(", "),
            PATTERN_VARIABLES.iter().map(|v| format!("${{{v}}}")).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(())
}

/// Expands a pattern like `CN=${name},EMAIL=${mail}` into subject attributes. A variable the
/// token lacks is an error (a certificate for the wrong or an empty subject must never be
/// issued); characters that would change the DN structure are refused in values.
pub fn subject(pattern: &str, claims: &Claims) -> Result<Vec<(String, String)>, PrincipalError> {
    let mut out = Vec::new();
    for part in pattern.split(',') {
        let (attr, template) =
            part.split_once('=').ok_or_else(|| PrincipalError::Subject(format!("bad pattern part {part:?}")))?;
        let mut value = String::new();
        let mut rest = template;
        while let Some(start) = rest.find("${") {
            value.push_str(&rest[..start]);
            let end = rest[start..].find('}').ok_or_else(|| PrincipalError::Subject("unclosed ${".into()))?;
            let var = &rest[start + 2..start + end];
            let v = variable(claims, var).ok_or_else(|| PrincipalError::Subject(format!("no value for ${{{var}}}")))?;
            value.push_str(&v);
            rest = &rest[start + end + 1..];
        }
        value.push_str(rest);
        if value.is_empty()
            || value.chars().any(|c| c.is_control() || matches!(c, ',' | '+' | '=' | '"' | '\\' | '<' | '>' | ';'))
        {
            return Err(PrincipalError::Subject(format!(
                "{} value {value:?} is empty or has DN special characters",
                attr.trim()
            )));
        }
        out.push((attr.trim().to_owned(), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: serde_json::Value) -> Claims {
        let keys = ferry_auth::KeySet::generate().unwrap();
        let mut v = v;
        v["zid"] = json!("z");
        v["exp"] = json!(9_999_999_999u64);
        let token = keys.sign(&v, &[]).unwrap();
        let verifier = Verifier::local(Arc::new(keys));
        futures_util::FutureExt::now_or_never(verifier.verify(&token)).unwrap().unwrap()
    }

    #[test]
    fn subject_table() {
        let user = claims(json!({"user_name": "alice", "email": "alice@example.org", "user_id": "u1"}));
        let tech = claims(json!({"client_id": "sb-app!b1"}));
        assert_eq!(subject("CN=${name}", &user).unwrap(), vec![("CN".into(), "alice".into())]);
        assert_eq!(
            subject("CN=${name}, EMAIL=${mail},O=ACME", &user).unwrap(),
            vec![
                ("CN".into(), "alice".into()),
                ("EMAIL".into(), "alice@example.org".into()),
                ("O".into(), "ACME".into())
            ]
        );
        assert_eq!(subject("CN=${name}", &tech).unwrap(), vec![("CN".into(), "sb-app!b1".into())]);
        assert_eq!(subject("CN=${user_type}", &tech).unwrap()[0].1, "Technical");
        assert!(subject("CN=${missing}", &user).is_err());
        assert!(check_pattern("CN=${name},EMAIL=${mail},O=ACME").is_ok());
        let e = check_pattern("CN=${name},OU=${department}").unwrap_err();
        assert!(e.contains("${department}"), "{e}");
        assert!(check_pattern("X=${name}").unwrap_err().contains("\"X\""));
        assert!(check_pattern("CN=a+b").is_err());
        assert!(check_pattern("CN=${name").is_err());
        let evil = claims(json!({"user_name": "bob,O=Admins"}));
        assert!(subject("CN=${name}", &evil).is_err(), "DN injection through a claim is refused");
    }
}
