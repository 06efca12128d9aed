//! The principal propagation CA and subject pattern, editable at run time: SAP's
//! `/connector/onPremises/ppCaCertificate` and `/connector/onPremises/subjectPatternRules`.
//!
//! Both live with the pair's certificates ([`crate::ha::PairKeys`], sealed in the data folder),
//! which already win over the instance's own configuration and travel to the HA shadow with every
//! sync; a change here is saved there, published to the shadow, and applied to the next request.

use std::sync::{Arc, PoisonError};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use ferry_core::keystore::{self, Format};
use ferry_core::tls::LocalCa;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Admin, ApiError, Caller};
use crate::ha::PairKeys;
use crate::principal::{PATTERN_ATTRIBUTES, check_pattern};

type A = State<Arc<Admin>>;
type Result<T> = std::result::Result<T, ApiError>;

impl Admin {
    /// The CA certificate (PEM) and subject pattern the next user certificate comes from.
    pub(crate) fn pp_effective(&self) -> (Option<String>, String) {
        let keys = self.pair_keys();
        let own = self.config.connection.principal_propagation.as_ref();
        let ca = keys
            .as_ref()
            .and_then(|k| k.pp_ca_cert.clone().filter(|_| k.pp_ca_key.is_some()))
            .or_else(|| own.map(|p| p.ca.cert_pem().to_owned()));
        let pattern = keys
            .as_ref()
            .and_then(|k| k.pp_subject_pattern.clone())
            .or_else(|| own.map(|p| p.subject_pattern.clone()))
            .unwrap_or_else(|| "CN=${name}".into());
        (ca, pattern)
    }

    /// Changes the pair's certificates, seals them, publishes them to a live shadow and applies
    /// them to every connection.
    async fn change_keys(&self, f: impl FnOnce(&mut PairKeys)) -> Result<()> {
        // The configuration lock orders this against other changes and their publication.
        let guard = self.state.lock().await;
        let mut keys = self.pair_keys().unwrap_or(PairKeys {
            pp_ca_cert: None,
            pp_ca_key: None,
            pp_subject_pattern: None,
            system_cert: None,
            system_key: None,
        });
        f(&mut keys);
        keys.save(&self.store).map_err(|e| ApiError::internal(format!("cannot save the CA: {e}")))?;
        *self.ha.keys.lock().unwrap_or_else(PoisonError::into_inner) = Some(keys);
        let cfg = guard.clone();
        self.persist(&cfg).await?;
        drop(guard);
        for s in &cfg.subaccounts {
            self.instance.set_principal_propagation(&s.key(), self.principal(&cfg));
        }
        Ok(())
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

fn describe(pem: &str) -> Option<Value> {
    let der = ferry_core::tls::parse_certs(pem).ok()?.into_iter().next()?;
    let (from, to) = ferry_core::tls::validity_of(&der)?;
    Some(json!({
        "subjectDN": keystore::subject_dn(&der)?,
        "issuer": keystore::issuer_dn(&der)?,
        "notBeforeTimeStamp": from * 1000,
        "notAfterTimeStamp": to * 1000,
        "certificate": pem,
    }))
}

pub(super) async fn get_ca(State(a): A) -> Result<Json<Value>> {
    let (ca, _) = a.pp_effective();
    let ca = ca.ok_or_else(|| ApiError::not_found("no principal propagation CA is configured"))?;
    describe(&ca).map(Json).ok_or_else(|| ApiError::internal("the stored CA certificate does not parse"))
}

/// A PKCS#12 file (SAP's `pkcs12` and `password`, base64 in JSON as in Ferry's backup API) or,
/// as Ferry's extension, the PEM certificate and key (`certificate`, `key`, an encrypted key's
/// `password`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CaBody {
    pkcs12: Option<String>,
    certificate: Option<String>,
    key: Option<String>,
    password: Option<String>,
    key_password: Option<String>,
}

pub(super) async fn put_ca(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Response> {
    let b: CaBody = parse(&body)?;
    let password = b.key_password.as_deref().or(b.password.as_deref()).filter(|p| !p.is_empty());
    let store = match (&b.pkcs12, &b.certificate, &b.key) {
        (Some(p12), None, None) => {
            let bytes: Vec<u8> = p12.chars().filter(|c| !c.is_whitespace()).collect::<String>().into_bytes();
            let der = B64.decode(&bytes).map_err(|_| ApiError::invalid("pkcs12 must be the PKCS#12 file in base64"))?;
            keystore::decode(&der, Some(Format::Pkcs12), password)
        }
        (None, Some(cert), Some(key)) => {
            keystore::decode(format!("{cert}\n{key}").as_bytes(), Some(Format::Pem), password)
        }
        _ => {
            return Err(ApiError::invalid(
                "send either pkcs12 (base64) with its password, or certificate and key (PEM)",
            ));
        }
    }
    .map_err(|e| ApiError::invalid(format!("the CA does not load: {e}")))?;
    let entry =
        store.key_entry().ok_or_else(|| ApiError::invalid("the upload holds no private key with its certificate"))?;
    let cert_pem = keystore::pem_block("CERTIFICATE", &entry.chain[0]);
    let key = entry.key.as_ref().ok_or_else(|| ApiError::invalid("the upload holds no private key"))?;
    let key_pem = keystore::pem_block("PRIVATE KEY", key.expose().secret_der());
    let (cert_c, key_c) = (cert_pem.clone(), key_pem.clone());
    tokio::task::spawn_blocking(move || LocalCa::from_pem_checked(&cert_c, &key_c))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::invalid(format!("the CA cannot issue user certificates: {e}")))?;
    let subject = keystore::subject_dn(&entry.chain[0]).unwrap_or_default();
    a.change_keys(|k| {
        k.pp_ca_cert = Some(cert_pem);
        k.pp_ca_key = Some(key_pem);
    })
    .await?;
    a.record(&u.0, "PpcaCertificate", "replaced", "", &subject).await;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}

/// The pattern as SAP's rule list: one unconditional default rule.
pub(super) async fn get_rules(State(a): A) -> Json<Value> {
    let (_, pattern) = a.pp_effective();
    let mut fields = serde_json::Map::new();
    for part in pattern.split(',') {
        if let Some((k, v)) = part.split_once('=') {
            fields.insert(k.trim().to_ascii_uppercase(), Value::String(v.trim().to_owned()));
        }
    }
    Json(json!([{"description": "default", "subjectPattern": fields}]))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    #[serde(default)]
    condition: Option<Value>,
    subject_pattern: serde_json::Map<String, Value>,
}

/// Only SAP's last, unconditional rule is supported: a pattern for every user.
pub(super) async fn put_rules(State(a): A, Extension(u): Extension<Caller>, body: Bytes) -> Result<Response> {
    let rules: Vec<Rule> = parse(&body)?;
    let [rule] = rules.as_slice() else {
        return Err(ApiError::invalid("send exactly one rule: conditional subject pattern rules are not supported"));
    };
    if rule.condition.as_ref().is_some_and(|c| !c.is_null()) {
        return Err(ApiError::invalid("conditional subject pattern rules are not supported: leave out condition"));
    }
    let mut parts = Vec::new();
    for k in rule.subject_pattern.keys() {
        if !PATTERN_ATTRIBUTES.contains(&k.as_str()) {
            return Err(ApiError::invalid(format!(
                "unknown subjectPattern field {k:?}; use {}",
                PATTERN_ATTRIBUTES.join(", ")
            )));
        }
    }
    // SAP's attribute order, whatever the JSON's.
    for attr in PATTERN_ATTRIBUTES {
        match rule.subject_pattern.get(*attr) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.trim().is_empty() => {}
            Some(Value::String(s)) if s.contains(',') => {
                return Err(ApiError::invalid(format!("subjectPattern.{attr} must not contain a comma")));
            }
            Some(Value::String(s)) => parts.push(format!("{attr}={}", s.trim())),
            Some(_) => return Err(ApiError::invalid(format!("subjectPattern.{attr} must be a string"))),
        }
    }
    let pattern = parts.join(",");
    check_pattern(&pattern).map_err(ApiError::invalid)?;
    a.change_keys(|k| k.pp_subject_pattern = Some(pattern.clone())).await?;
    a.record(&u.0, "PrincipalPropagationConfiguration", "changed", "", &format!("subjectPattern {pattern}")).await;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}
