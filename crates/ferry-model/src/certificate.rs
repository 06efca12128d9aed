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
    #[error("send either 'Content' (an upload) or 'Attributes' (a certificate the service generates), not both")]
    ContentAndAttributes,
    #[error("only PEM certificates can be generated: leave 'Type' out or set it to PEM, not '{0}'")]
    GeneratedType(String),
    #[error("Attributes.{0}")]
    Attribute(String),
}

/// Validity units of a generated certificate, with the most of each accepted (ten years).
const VALIDITY_UNITS: &[(&str, u32)] = &[("DAYS", 3650), ("MONTHS", 120), ("YEARS", 10)];
/// X.509's upper bound for a common name.
pub const MAX_COMMON_NAME_LEN: usize = 64;

/// `Attributes` of a certificate the service generates instead of receiving (SPEC §1.8):
/// a key pair and self-signed certificate, or with `CSR` a certificate for the requester's key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateAttributes {
    #[serde(rename = "CN", default, skip_serializing_if = "Option::is_none")]
    pub common_name: Option<String>,
    #[serde(rename = "Validity", default, skip_serializing_if = "Option::is_none")]
    pub validity: Option<Validity>,
    #[serde(rename = "AutomaticRenew", default)]
    pub automatic_renew: bool,
    /// Protects the generated private key; a secret, never returned.
    #[serde(rename = "Password", default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A certificate signing request, base64 of its PEM text.
    #[serde(rename = "CSR", default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Validity {
    #[serde(rename = "TimeUnit")]
    pub time_unit: String,
    #[serde(rename = "Value")]
    pub value: u32,
}

impl Validity {
    /// The validity in days (a month counts 30 days and a year 365).
    pub fn days(&self) -> u32 {
        match self.time_unit.as_str() {
            "MONTHS" => self.value.saturating_mul(30),
            "YEARS" => self.value.saturating_mul(365),
            _ => self.value,
        }
    }
}

impl CertificateAttributes {
    pub fn validate(&self) -> Result<(), CertificateError> {
        let bad = |m: &str| Err(CertificateError::Attribute(m.to_owned()));
        match self.common_name.as_deref().map(str::trim) {
            None | Some("") => return bad("CN is required: the common name of the certificate to generate"),
            Some(cn) if cn.chars().count() > MAX_COMMON_NAME_LEN => {
                return bad(&format!("CN is longer than {MAX_COMMON_NAME_LEN} characters"));
            }
            Some(_) => {}
        }
        let Some(v) = &self.validity else {
            return bad("Validity is required: {\"TimeUnit\": \"DAYS\"|\"MONTHS\"|\"YEARS\", \"Value\": n}");
        };
        let Some((_, max)) = VALIDITY_UNITS.iter().find(|(u, _)| *u == v.time_unit) else {
            return bad(&format!("Validity.TimeUnit '{}' is not one of DAYS, MONTHS, YEARS", v.time_unit));
        };
        if v.value == 0 || v.value > *max {
            return bad(&format!("Validity.Value must be between 1 and {max} {}", v.time_unit));
        }
        if self.password.as_deref().is_some_and(str::is_empty) {
            return bad("Password is empty: leave it out or give one");
        }
        if let Some(csr) = &self.csr {
            let compact: String = csr.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            let pem = STANDARD.decode(compact).ok().and_then(|b| String::from_utf8(b).ok());
            if !pem.is_some_and(|p| p.contains("-----BEGIN CERTIFICATE REQUEST-----")) {
                return bad("CSR must be the base64 of a PEM certificate signing request (BEGIN CERTIFICATE REQUEST)");
            }
        }
        Ok(())
    }

    /// Without the password, for answers.
    pub fn without_secrets(&self) -> CertificateAttributes {
        CertificateAttributes { password: None, ..self.clone() }
    }
}

impl fmt::Debug for CertificateAttributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAttributes")
            .field("common_name", &self.common_name)
            .field("validity", &self.validity)
            .field("automatic_renew", &self.automatic_renew)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("csr", &self.csr.is_some())
            .finish()
    }
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
    /// Set when the service generated the certificate (and renews it with `AutomaticRenew`).
    #[serde(rename = "Attributes", default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<CertificateAttributes>,
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
        if let Some(attributes) = &self.attributes {
            if self.content.as_deref().is_some_and(|c| !c.trim().is_empty()) {
                return Err(CertificateError::ContentAndAttributes);
            }
            if let Some(kind) = self.kind.as_deref().filter(|k| !k.is_empty() && !k.eq_ignore_ascii_case("PEM")) {
                return Err(CertificateError::GeneratedType(kind.to_owned()));
            }
            return attributes.validate();
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
        Certificate { content: None, attributes: None, ..self.clone() }
    }

    /// Without the generation password, for a `GET` of the certificate.
    pub fn without_secrets(&self) -> Certificate {
        Certificate { attributes: self.attributes.as_ref().map(CertificateAttributes::without_secrets), ..self.clone() }
    }
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("content", &self.content.as_ref().map(|_| "***"))
            .field("attributes", &self.attributes)
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

    #[test]
    fn generation_attributes() {
        let validity = json!({"TimeUnit": "DAYS", "Value": 30});
        let ok = cert(json!({"Name": "g.pem", "Attributes": {"CN": "me", "Validity": validity, "Password": "pw"}}));
        assert_eq!(ok.validate(), Ok(()));
        assert!(!format!("{ok:?}").contains("pw\""));
        assert!(serde_json::to_value(ok.without_secrets()).unwrap()["Attributes"].get("Password").is_none());
        let both = json!({"Name": "g.pem", "Content": "AA==", "Attributes": {"CN": "me", "Validity": validity}});
        assert_eq!(cert(both).validate(), Err(CertificateError::ContentAndAttributes));
        let p12 = json!({"Name": "g.p12", "Type": "P12", "Attributes": {"CN": "me", "Validity": validity}});
        assert_eq!(cert(p12).validate(), Err(CertificateError::GeneratedType("P12".into())));
        for (attributes, says) in [
            (json!({"Validity": validity}), "CN is required"),
            (json!({"CN": "me"}), "Validity is required"),
            (json!({"CN": "me", "Validity": {"TimeUnit": "WEEKS", "Value": 1}}), "not one of"),
            (json!({"CN": "me", "Validity": {"TimeUnit": "YEARS", "Value": 11}}), "between 1 and 10"),
            (json!({"CN": "me", "Validity": validity, "CSR": "AA=="}), "CSR must be"),
        ] {
            let e = cert(json!({"Name": "g.pem", "Attributes": attributes})).validate().unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
        assert!(serde_json::from_value::<Certificate>(json!({"Name": "g", "Attributes": {"X": 1}})).is_err());
    }
}
