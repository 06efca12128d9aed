//! A stored certificate or keystore (SPEC §1.8): `{Name, Type, Content}` with the file's bytes
//! in base64.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// Longest certificate name accepted, as for destinations (SPEC §1.12).
pub const MAX_CERTIFICATE_NAME_LEN: usize = 200;
/// Largest decoded content accepted; keystores with a full chain are a few KiB.
pub const MAX_CERTIFICATE_BYTES: usize = 512 * 1024;

/// File formats SAP accepts for upload (compared without regard to case).
pub const CERTIFICATE_TYPES: &[&str] = &["PEM", "CER", "CRT", "DER", "JKS", "P12", "PFX", "CERTIFICATE"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    #[error("property 'Name' is empty: give the certificate a file name such as 'truststore.pem'")]
    EmptyName,
    #[error("certificate name is {0} characters long; the limit is {MAX_CERTIFICATE_NAME_LEN}")]
    NameTooLong(usize),
    #[error("certificate name '{name}' contains {ch:?}; only letters, digits, '.', '_' and '-' are allowed")]
    InvalidNameCharacter { name: String, ch: char },
    #[error("'{0}' is not a valid certificate Type; use one of: PEM, CER, CRT, DER, JKS, P12, PFX")]
    InvalidType(String),
    #[error("property 'Content' is not valid base64: send the file's bytes base64-encoded")]
    InvalidContent,
    #[error("property 'Content' is empty: send the file's bytes base64-encoded")]
    EmptyContent,
    #[error("the certificate is {0} bytes; the limit is {MAX_CERTIFICATE_BYTES}")]
    TooLarge(usize),
}

/// A certificate as uploaded. `Content` may hold private keys, so `Debug` masks it and lists
/// leave it out ([`Certificate::without_content`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Type", default)]
    pub kind: Option<String>,
    #[serde(rename = "Content", default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

impl Certificate {
    /// Checks the name, type and content of an upload.
    pub fn validate(&self) -> Result<(), CertificateError> {
        let len = self.name.chars().count();
        if len == 0 {
            return Err(CertificateError::EmptyName);
        }
        if len > MAX_CERTIFICATE_NAME_LEN {
            return Err(CertificateError::NameTooLong(len));
        }
        if let Some(ch) = self.name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            return Err(CertificateError::InvalidNameCharacter { name: self.name.clone(), ch });
        }
        if let Some(kind) = self.kind.as_deref().filter(|k| !k.is_empty())
            && !CERTIFICATE_TYPES.iter().any(|t| t.eq_ignore_ascii_case(kind))
        {
            return Err(CertificateError::InvalidType(kind.to_owned()));
        }
        let content = self.content.as_deref().map(str::trim).filter(|c| !c.is_empty());
        let content = content.ok_or(CertificateError::EmptyContent)?;
        if content.len() > MAX_CERTIFICATE_BYTES / 3 * 4 + 4 {
            return Err(CertificateError::TooLarge(content.len() / 4 * 3));
        }
        let compact: String = content.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let bytes = STANDARD.decode(compact).map_err(|_| CertificateError::InvalidContent)?;
        if bytes.len() > MAX_CERTIFICATE_BYTES {
            return Err(CertificateError::TooLarge(bytes.len()));
        }
        Ok(())
    }

    /// Name and type only, for list responses.
    pub fn without_content(&self) -> Certificate {
        Certificate { content: None, ..self.clone() }
    }
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("content", &self.content.as_ref().map(|_| "***"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cert(v: serde_json::Value) -> Certificate {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn validation() {
        let ok = cert(json!({"Name": "trust.pem", "Type": "PEM", "Content": "LS0tLS1CRUdJTg=="}));
        assert_eq!(ok.validate(), Ok(()));
        assert!(!format!("{ok:?}").contains("LS0t"));
        assert_eq!(serde_json::to_value(ok.without_content()).unwrap(), json!({"Name": "trust.pem", "Type": "PEM"}));
        assert_eq!(cert(json!({"Name": "a", "Content": "x"})).validate(), Err(CertificateError::InvalidContent));
        assert_eq!(cert(json!({"Name": "a", "Content": ""})).validate(), Err(CertificateError::EmptyContent));
        assert_eq!(cert(json!({"Name": "a"})).validate(), Err(CertificateError::EmptyContent));
        assert_eq!(
            cert(json!({"Name": "a", "Type": "ZIP", "Content": "AA=="})).validate(),
            Err(CertificateError::InvalidType("ZIP".into()))
        );
        assert!(matches!(
            cert(json!({"Name": "a/b", "Content": "AA=="})).validate(),
            Err(CertificateError::InvalidNameCharacter { .. })
        ));
        assert!(serde_json::from_value::<Certificate>(json!({"Name": "a", "Content": "AA==", "Extra": 1})).is_err());
        assert_eq!(cert(json!({"Name": "k.p12", "Type": "p12", "Content": "AA==", })).validate(), Ok(()));
    }
}
