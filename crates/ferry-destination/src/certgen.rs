//! Certificates the service generates (SPEC §1.8, SAP's "External service" certificates):
//! `POST`/`PUT .../Certificates` with `Attributes` instead of `Content`, the public part of any
//! entry (`.../{name}/publicKeys`), and automatic renewal.
//!
//! Without a CSR the service makes an RSA key pair and a self-signed certificate for `CN`, and
//! the entry holds both as PEM (usable at once as a `KeyStoreLocation`; with `Password` the key
//! is encrypted and destinations give it as `KeyStorePassword`). With a CSR the
//! requester keeps its key: the subject is replaced by `CN` (as SAP does) and the certificate
//! is signed by the subaccount's certificate issuer, a CA generated on first use and kept
//! sealed in the store like the SAML signing key; the entry holds the certificate and the CA.
//!
//! `AutomaticRenew`: [`DestinationService::renew_certificates`] issues a new certificate (and,
//! without a CSR, a new key) for every such entry with less than a fifth of its validity (at
//! most 30 days) left; [`crate::run`] calls it every hour. A renewal replaces the row only if
//! it is unchanged since it was read, so a concurrent update or another replica wins.

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ferry_core::keystore::{self, Format, KeystoreError};
use ferry_model::{Certificate, CertificateAttributes};
use rcgen::{CertificateParams, CertificateSigningRequestParams, DnType, Issuer, KeyPair};
use serde::{Deserialize, Serialize};

use crate::store::{Kind, Level, RowKey, Scope};
use crate::{DestinationService, Error};

/// The row of the subaccount's certificate issuer (in the label table, under a name no label
/// has, as the SAML key).
const ISSUER_ROW: &str = "k/certificate-issuer";
/// Renewal starts when less than this share of the validity is left…
const RENEW_FRACTION: u32 = 5;
/// …or at the latest this long before expiry.
const RENEW_AT_MOST: Duration = Duration::from_secs(30 * 86_400);
/// How often `run` looks for certificates to renew.
pub(crate) const RENEW_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

#[derive(Serialize, Deserialize)]
struct StoredIssuer {
    cert_pem: String,
    key_pem: String,
}

/// Why a generation request cannot be served: the caller's fault (a 400).
#[derive(Debug)]
pub(crate) struct BadAttributes(pub String);

fn issuer_row(subaccount: &str) -> RowKey {
    Scope { subaccount: subaccount.to_owned(), level: Level::Subaccount, kind: Kind::Label }.row(ISSUER_ROW)
}

fn validity_window(attributes: &CertificateAttributes) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let days = attributes.validity.as_ref().map_or(1, ferry_model::Validity::days);
    // A few minutes in the past, so clock skew does not make a fresh certificate "not yet valid".
    let now = time::OffsetDateTime::now_utc();
    (now - time::Duration::minutes(5), now + time::Duration::days(i64::from(days)))
}

/// A self-signed certificate and its new key, as PEM; with `Password` the key is encrypted
/// with it (PKCS#8, PBES2), as SAP's service protects it.
fn self_signed(attributes: &CertificateAttributes) -> Result<String, String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).map_err(|e| e.to_string())?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, attributes.common_name.clone().unwrap_or_default());
    (params.not_before, params.not_after) = validity_window(attributes);
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let key_pem = match &attributes.password {
        Some(password) => {
            let encrypted = keystore::encrypt_private_key(&key.serialize_der(), password).map_err(|e| e.to_string())?;
            keystore::pem_block("ENCRYPTED PRIVATE KEY", &encrypted)
        }
        None => key.serialize_pem(),
    };
    Ok(format!("{}{}", cert.pem(), key_pem))
}

/// The requester's CSR signed by `issuer` with the subject replaced by `CN`, followed by the
/// issuer's certificate.
fn from_csr(
    attributes: &CertificateAttributes,
    issuer: &StoredIssuer,
) -> Result<Result<String, BadAttributes>, String> {
    let csr_b64: String = attributes.csr.as_deref().unwrap_or_default().split_whitespace().collect();
    let Some(csr_pem) = STANDARD.decode(csr_b64).ok().and_then(|b| String::from_utf8(b).ok()) else {
        return Ok(Err(BadAttributes("Attributes.CSR is not base64 of PEM text".into())));
    };
    let mut csr = match CertificateSigningRequestParams::from_pem(&csr_pem) {
        Ok(csr) => csr,
        Err(e) => return Ok(Err(BadAttributes(format!("Attributes.CSR cannot be used: {e}")))),
    };
    csr.params.distinguished_name = rcgen::DistinguishedName::new();
    csr.params.distinguished_name.push(DnType::CommonName, attributes.common_name.clone().unwrap_or_default());
    // The requester does not decide whether it is a CA.
    csr.params.is_ca = rcgen::IsCa::NoCa;
    (csr.params.not_before, csr.params.not_after) = validity_window(attributes);
    csr.params.use_authority_key_identifier_extension = true;
    let key = KeyPair::from_pem(&issuer.key_pem).map_err(|e| e.to_string())?;
    let issuer_cert = Issuer::from_ca_cert_pem(&issuer.cert_pem, key).map_err(|e| e.to_string())?;
    let cert = csr.signed_by(&issuer_cert).map_err(|e| e.to_string())?;
    Ok(Ok(format!("{}{}", cert.pem(), issuer.cert_pem)))
}

impl DestinationService {
    async fn certificate_issuer(&self, subaccount: &str) -> Result<StoredIssuer, Error> {
        let row = issuer_row(subaccount);
        if let Some(stored) = self.load::<StoredIssuer>(&row).await? {
            return Ok(stored.destination);
        }
        let name = format!("Ferry Destination Service certificates {subaccount}");
        let ca = tokio::task::spawn_blocking(move || ferry_core::tls::LocalCa::generate(&name))
            .await
            .map_err(|_| Error::Encrypt)?
            .map_err(|e| {
                tracing::error!(error = %e, "cannot generate the certificate issuer");
                Error::Encrypt
            })?;
        let fresh = StoredIssuer { cert_pem: ca.cert_pem().to_owned(), key_pem: ca.key_pem().expose().clone() };
        // Another replica may have stored one meanwhile: the stored issuer wins.
        if self.create(&row, &fresh).await? {
            Ok(fresh)
        } else {
            self.load::<StoredIssuer>(&row).await?.map(|s| s.destination).ok_or(Error::Encrypt)
        }
    }

    /// `cert` with `Content` generated from its `Attributes` (which must be set and valid).
    pub(crate) async fn generate_certificate(
        &self,
        subaccount: &str,
        mut cert: Certificate,
    ) -> Result<Result<Certificate, BadAttributes>, Error> {
        let Some(attributes) = cert.attributes.clone() else { return Ok(Ok(cert)) };
        let issuer = match attributes.csr {
            Some(_) => Some(self.certificate_issuer(subaccount).await?),
            None => None,
        };
        let pem = tokio::task::spawn_blocking(move || match &issuer {
            Some(issuer) => from_csr(&attributes, issuer),
            None => self_signed(&attributes).map(Ok),
        })
        .await
        .map_err(|_| Error::Encrypt)?
        .map_err(|e| {
            tracing::error!(error = %e, "certificate generation failed");
            Error::Encrypt
        })?;
        let pem = match pem {
            Ok(pem) => pem,
            Err(bad) => return Ok(Err(bad)),
        };
        cert.kind = Some("PEM".into());
        cert.content = Some(STANDARD.encode(pem));
        Ok(Ok(cert))
    }

    /// Renews every `AutomaticRenew` certificate that is due at `now`; returns how many.
    pub async fn renew_certificates(&self, now: SystemTime) -> Result<usize, Error> {
        let mut renewed = 0;
        for (key, sealed) in self.store.scan(Kind::Certificate, None).await? {
            let Ok(stored) = self.unseal::<Certificate>(&key, &sealed) else { continue };
            let cert = stored.destination;
            if !cert.attributes.as_ref().is_some_and(|a| a.automatic_renew) || !renewal_due(&cert, now) {
                continue;
            }
            let name = cert.name.clone();
            let fresh = match self.generate_certificate(&key.scope.subaccount, cert).await? {
                Ok(fresh) => fresh,
                Err(BadAttributes(why)) => {
                    tracing::warn!(subaccount = %key.scope.subaccount, %name, why, "certificate cannot be renewed");
                    continue;
                }
            };
            let again = self.seal(&key, &fresh)?;
            if self.store.update_if(key.clone(), sealed, again).await? {
                tracing::info!(subaccount = %key.scope.subaccount, level = ?key.scope.level, %name, "certificate renewed");
                renewed += 1;
            }
        }
        Ok(renewed)
    }
}

/// Whether less than a fifth of the leaf certificate's validity (and at most 30 days) is left.
fn renewal_due(cert: &Certificate, now: SystemTime) -> bool {
    let Some(bytes) = cert.content.as_deref().and_then(|c| STANDARD.decode(c.trim()).ok()) else { return true };
    // The certificate only: the key may be encrypted, and is not needed here.
    use rustls::pki_types::pem::PemObject;
    let Some(Ok(leaf)) = rustls::pki_types::CertificateDer::pem_slice_iter(&bytes).next() else { return true };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(&leaf) else { return true };
    let validity = parsed.validity();
    let (from, to) = (validity.not_before.timestamp(), validity.not_after.timestamp());
    let now = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let lead = ((to - from) / i64::from(RENEW_FRACTION)).min(RENEW_AT_MOST.as_secs() as i64);
    now >= to - lead
}

/// `[{Alias, Content, SubjectDN}]` for a stored entry: the chain of each key entry and each
/// trusted certificate, PEM. `Alias` only for keystores. `Err` is the 400 for keystores whose
/// password the service does not know.
pub(crate) fn public_keys(cert: &Certificate) -> Result<Vec<serde_json::Value>, String> {
    const PROTECTED: &str = "The keystore is password-protected and public keys cannot be retrieved";
    let bytes = STANDARD
        .decode(cert.content.as_deref().unwrap_or_default().split_whitespace().collect::<String>())
        .map_err(|_| "The certificate content is not base64".to_owned())?;
    let format = Format::from_type_or_name(cert.kind.as_deref(), &cert.name);
    let password = cert.attributes.as_ref().and_then(|a| a.password.as_deref());
    let store = keystore::decode(&bytes, format, password).map_err(|e| match e {
        KeystoreError::PasswordRequired(_) | KeystoreError::WrongPassword(_) => PROTECTED.to_owned(),
        other => format!("The certificate cannot be read: {other}"),
    })?;
    let is_keystore = matches!(format, Some(Format::Pkcs12 | Format::Jks));
    Ok(store
        .entries
        .iter()
        .filter(|e| !e.chain.is_empty())
        .map(|e| {
            let content: String = e.chain.iter().map(|c| keystore::pem_block("CERTIFICATE", c)).collect();
            let mut item = serde_json::json!({ "Content": content });
            if is_keystore && let Some(alias) = &e.alias {
                item["Alias"] = alias.clone().into();
            }
            if let Some(dn) = keystore::subject_dn(&e.chain[0]) {
                item["SubjectDN"] = dn.into();
            }
            item
        })
        .collect())
}
