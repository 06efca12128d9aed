//! SAML flows (SPEC §2.1, §2.6): signed assertions for the user of a find call, returned as they
//! are (`SAMLAssertion`) or exchanged for an OAuth token (`OAuth2SAMLBearerAssertion`, RFC 7522),
//! and the subaccount's signing certificate (`/v1/saml2Metadata/certificate`).
//!
//! The subaccount's key is generated on first use and kept sealed in the store like every
//! other row (in the label table under a name no label can have, so the store needs no new
//! table); a destination's `KeyStoreLocation` names a certificate-store entry (PEM, P12, JKS)
//! to sign with instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ferry_auth::saml::{Assertion, NAMEID_EMAIL, NAMEID_UNSPECIFIED, SamlSigner};
use ferry_core::keystore;
use ferry_model::{Certificate, Destination};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::api::{ApiError, Caller};
use crate::store::{Kind, Level, RowKey, Scope};
use crate::tokens::{self, CacheOwner, REFRESH_MARGIN};
use crate::{DestinationService, Error};

/// How long a generated assertion is valid; it is reused until shortly before that.
pub(crate) const ASSERTION_VALIDITY: Duration = Duration::from_secs(600);
/// The row of the subaccount's signing key: a label-table name that no object's labels use
/// (theirs start with `d/`, `f/` or `c/`).
const SIGNING_KEY_ROW: &str = "k/saml2-signing-key";
/// Above this many cached assertions, expired ones are dropped on the next insert.
const CACHE_PRUNE_THRESHOLD: usize = 4096;

#[derive(Serialize, Deserialize)]
struct StoredKey {
    pem: String,
}

/// Generated assertions by user and a digest of everything that shaped them, with their expiry.
type AssertionCache = HashMap<(CacheOwner, [u8; 32]), (String, Instant)>;

/// Signing keys by subaccount and generated assertions, both in memory.
#[derive(Default)]
pub(crate) struct SamlState {
    signers: tokio::sync::Mutex<HashMap<String, Arc<SamlSigner>>>,
    assertions: Mutex<AssertionCache>,
}

/// The user a SAML flow speaks for: the verified claims of the user's JWT.
pub(crate) struct SamlUser<'a> {
    pub claims: &'a Value,
    /// `<zid>/<user id>`, the cache's notion of the user.
    pub key: &'a str,
    pub subdomain: Option<&'a str>,
}

/// A signed assertion, encoded as the destination asks.
pub(crate) struct SignedAssertion {
    pub encoded: String,
    pub expires_in: u64,
}

fn key_row(subaccount: &str) -> RowKey {
    Scope { subaccount: subaccount.to_owned(), level: Level::Subaccount, kind: Kind::Label }.row(SIGNING_KEY_ROW)
}

async fn generate() -> Result<SamlSigner, Error> {
    tokio::task::spawn_blocking(|| SamlSigner::generate("Ferry Destination Service SAML signing"))
        .await
        .map_err(|_| Error::Encrypt)?
        .map_err(|e| {
            tracing::error!(error = %e, "cannot generate a SAML signing key");
            Error::Encrypt
        })
}

impl DestinationService {
    /// The subaccount's signing key; with `create`, one is generated (and stored) if there is
    /// none yet.
    pub(crate) async fn subaccount_signer(
        &self,
        subaccount: &str,
        create: bool,
    ) -> Result<Option<Arc<SamlSigner>>, Error> {
        let mut signers = self.saml.signers.lock().await;
        if let Some(s) = signers.get(subaccount) {
            return Ok(Some(s.clone()));
        }
        let row = key_row(subaccount);
        let stored = match self.load::<StoredKey>(&row).await? {
            Some(stored) => stored.destination,
            None if create => {
                let signer = generate().await?;
                let stored = StoredKey { pem: signer.to_pem().expose().clone() };
                // Another replica may have stored one meanwhile: the stored key wins.
                if !self.create(&row, &stored).await? {
                    self.load::<StoredKey>(&row).await?.map(|s| s.destination).ok_or(Error::Encrypt)?
                } else {
                    stored
                }
            }
            None => return Ok(None),
        };
        let signer = SamlSigner::from_pem(&stored.pem)
            .map_err(|e| Error::Corrupt { name: SIGNING_KEY_ROW.into(), reason: e.to_string() })?;
        let signer = Arc::new(signer);
        signers.insert(subaccount.to_owned(), signer.clone());
        Ok(Some(signer))
    }

    /// Replaces the subaccount's signing key with a new one (SAP's "generate or renew").
    async fn renew_subaccount_signer(&self, subaccount: &str) -> Result<Arc<SamlSigner>, Error> {
        let mut signers = self.saml.signers.lock().await;
        let signer = Arc::new(generate().await?);
        self.put(&key_row(subaccount), &StoredKey { pem: signer.to_pem().expose().clone() }).await?;
        signers.insert(subaccount.to_owned(), signer.clone());
        Ok(signer)
    }

    /// The key a destination signs with: its `KeyStoreLocation` (a PEM entry of the certificate
    /// store, on the destination's level or else the subaccount's), else the subaccount's key.
    /// `Err` is the reason for the token's `error`.
    async fn destination_signer(&self, key: &RowKey, dest: &Destination) -> Result<Arc<SamlSigner>, String> {
        let internal = |e: Error| {
            tracing::error!(subaccount = %key.scope.subaccount, error = %e, "SAML signing key unavailable");
            "the SAML signing key cannot be read; see the Destination Service log".to_owned()
        };
        let Some(location) = dest.get("KeyStoreLocation").filter(|l| !l.is_empty()) else {
            return self
                .subaccount_signer(&key.scope.subaccount, true)
                .await
                .map_err(internal)?
                .ok_or_else(|| "the subaccount has no SAML signing key".to_owned());
        };
        let password = dest.get("KeyStorePassword").filter(|p| !p.is_empty());
        let pem = self.keystore_pem(key, "KeyStoreLocation", location, password).await?;
        SamlSigner::from_pem(pem.expose()).map(Arc::new).map_err(|e| format!("KeyStoreLocation '{location}': {e}"))
    }

    /// The certificate chain and private key of the certificate-store entry `location` names,
    /// on the destination's level or else the subaccount's, as PEM whatever the entry's format
    /// (PEM, P12/PFX or JKS, the latter two opened with `password`). `property` is the
    /// destination property that named it, for messages. `Err` is the reason for a failed token.
    pub(crate) async fn keystore_pem(
        &self,
        key: &RowKey,
        property: &str,
        location: &str,
        password: Option<&str>,
    ) -> Result<ferry_core::Secret<String>, String> {
        let store = self.load_keystore(key, property, location, password).await?;
        if store.key_entry().is_none() {
            return Err(format!("{property} '{location}' holds no private key with its certificate"));
        }
        Ok(store.to_pem())
    }

    /// Every certificate of the certificate-store entry `location` names, as PEM: a trust store
    /// (`TrustStoreLocation`), found and decoded as [`Self::keystore_pem`] does.
    pub(crate) async fn trust_store_pem(
        &self,
        key: &RowKey,
        property: &str,
        location: &str,
        password: Option<&str>,
    ) -> Result<String, String> {
        let store = self.load_keystore(key, property, location, password).await?;
        Ok(store.entries.iter().flat_map(|e| &e.chain).map(|c| keystore::pem_block("CERTIFICATE", c)).collect())
    }

    async fn load_keystore(
        &self,
        key: &RowKey,
        property: &str,
        location: &str,
        password: Option<&str>,
    ) -> Result<keystore::KeyStore, String> {
        let internal = |e: Error| {
            tracing::error!(subaccount = %key.scope.subaccount, error = %e, "certificate store unavailable");
            "the certificate store cannot be read; see the Destination Service log".to_owned()
        };
        let mut found = None;
        for level in [key.scope.level.clone(), Level::Subaccount] {
            let row = Scope { subaccount: key.scope.subaccount.clone(), level, kind: Kind::Certificate }.row(location);
            if let Some(c) = self.load::<Certificate>(&row).await.map_err(internal)? {
                found = Some(c.destination);
                break;
            }
        }
        let cert = found.ok_or_else(|| format!("{property} '{location}' is not in the certificate store"))?;
        let bytes = STANDARD
            .decode(cert.content.as_deref().unwrap_or_default().trim())
            .map_err(|_| format!("{property} '{location}' has content that is not base64"))?;
        let format = keystore::Format::from_type_or_name(cert.kind.as_deref(), &cert.name);
        keystore::decode(&bytes, format, password).map_err(|e| {
            let hint = match e {
                keystore::KeystoreError::PasswordRequired(_) | keystore::KeystoreError::WrongPassword(_) => {
                    format!("; check the destination's {}", property.replace("Location", "Password"))
                }
                _ => String::new(),
            };
            format!("{property} '{location}': {e}{hint}")
        })
    }

    /// A signed assertion for `user` as the destination describes it, from the cache while it
    /// is fresh. `recipient_default` is where the assertion goes when `assertionRecipient` is
    /// not set. `Err` is the reason for the token's `error`.
    pub(crate) async fn saml_assertion(
        &self,
        key: &RowKey,
        dest: &Destination,
        user: &SamlUser<'_>,
        recipient_default: Option<String>,
        use_cache: bool,
    ) -> Result<SignedAssertion, String> {
        let auth = dest.get("Authentication").unwrap_or_default();
        let required = |k: &str| {
            dest.get(k).filter(|v| !v.is_empty()).ok_or_else(|| format!("{auth} destinations need the property '{k}'"))
        };
        let audience = required("audience")?;
        let authn_context = required("authnContextClassRef")?;
        let (name_id, format) = name_id(dest, user.claims)?;
        let attributes = attributes(dest, user.claims);
        let recipient = dest
            .get("assertionRecipient")
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .or(recipient_default)
            .unwrap_or_else(|| audience.to_owned());
        let issuer = dest
            .get("assertionIssuer")
            .filter(|v| !v.is_empty())
            .map_or_else(|| format!("ferry-destination-{}", key.scope.subaccount), str::to_owned);
        let signer = self.destination_signer(key, dest).await?;

        let owner = CacheOwner {
            subaccount: key.scope.subaccount.clone(),
            instance: key.scope.instance_id().map(str::to_owned),
            name: key.name.clone(),
            tenant: None,
            user: Some(user.key.to_owned()),
        };
        // Everything that shapes the assertion: a changed property or key misses the cache.
        let mut h = Sha256::new();
        for part in [name_id.as_str(), &format, &recipient, &issuer, audience, authn_context] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        h.update(serde_json::to_vec(&attributes).unwrap_or_default());
        h.update(serde_json::to_vec(dest).unwrap_or_default());
        h.update(signer.certificate_der());
        let cache_key = (owner, <[u8; 32]>::from(h.finalize()));
        let now = self.tokens.now();
        if use_cache {
            let cache = self.saml.assertions.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((encoded, until)) = cache.get(&cache_key).filter(|(_, until)| *until > now + REFRESH_MARGIN) {
                return Ok(SignedAssertion {
                    encoded: encoded.clone(),
                    expires_in: until.saturating_duration_since(now).as_secs(),
                });
            }
        }
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let include_certificate =
            dest.get("includeSigningCertificateInSAMLAssertion").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let xml = signer
            .sign_assertion(&Assertion {
                issuer: &issuer,
                name_id: &name_id,
                name_id_format: &format,
                name_qualifier: dest.get("nameQualifier").filter(|v| !v.is_empty()),
                recipient: &recipient,
                audience,
                authn_context_class_ref: authn_context,
                attributes: &attributes,
                now: unix,
                validity_secs: ASSERTION_VALIDITY.as_secs(),
                include_certificate,
            })
            .map_err(|e| e.to_string())?;
        let encoded = match dest.get("samlAssertionEncoding") {
            Some(e) if e.eq_ignore_ascii_case("base64") => STANDARD.encode(xml),
            _ => URL_SAFE_NO_PAD.encode(xml),
        };
        if use_cache {
            let mut cache = self.saml.assertions.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= CACHE_PRUNE_THRESHOLD {
                cache.retain(|_, (_, until)| *until > now);
            }
            cache.insert(cache_key, (encoded.clone(), now + ASSERTION_VALIDITY));
        }
        Ok(SignedAssertion { encoded, expires_in: ASSERTION_VALIDITY.as_secs() })
    }
}

/// Where an `OAuth2SAMLBearerAssertion` goes by default: its token service URL, for the
/// user's tenant when the URL is `Common`.
pub(crate) fn token_service_recipient(dest: &Destination, user: &SamlUser<'_>) -> Option<String> {
    let url = dest.get("tokenServiceURL").filter(|u| !u.is_empty())?;
    match (tokens::is_common(dest), user.subdomain) {
        (true, Some(t)) => tokens::apply_tenant(url, t).ok(),
        _ => Some(url.to_owned()),
    }
}

/// SPEC §2.6: the NameID and its format.
fn name_id(dest: &Destination, claims: &Value) -> Result<(String, String), String> {
    let format = dest.get("nameIdFormat").filter(|v| !v.is_empty()).unwrap_or(NAMEID_UNSPECIFIED).to_owned();
    let as_text = |v: &Value| match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    if let Some(source) = dest.get("userIdSource").filter(|v| !v.is_empty()) {
        let value = claim_path(claims, source).and_then(as_text).ok_or_else(|| {
            format!("the user ID could not be determined: the user's token has no value at '{source}' (userIdSource)")
        })?;
        return Ok((value, format));
    }
    let claim = match format.as_str() {
        NAMEID_EMAIL => "email",
        NAMEID_UNSPECIFIED => "user_name",
        other => {
            return Err(format!(
                "nameIdFormat '{other}' needs the property userIdSource to say which claim of the user's token is the \
                 NameID"
            ));
        }
    };
    let value = claims.get(claim).and_then(as_text).ok_or_else(|| {
        format!("the user ID could not be determined: the user's token has no '{claim}' claim (nameIdFormat {format})")
    })?;
    Ok((value, format))
}

/// A root-level claim name, or a JSONPath of member names: `$.a.b`, `$['a']['b']`, `$.['a']`.
fn claim_path<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    let Some(mut rest) = path.strip_prefix('$') else { return claims.get(path) };
    let mut cur = claims;
    while !rest.is_empty() {
        rest = rest.strip_prefix('.').unwrap_or(rest);
        let (name, after) = if let Some(r) = rest.strip_prefix("['") {
            let end = r.find("']")?;
            (&r[..end], &r[end + 2..])
        } else {
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        if name.is_empty() {
            return None;
        }
        cur = cur.get(name)?;
        rest = after;
    }
    Some(cur)
}

/// SPEC §2.6: the user's attributes, `user_attributes.*` (prefixed unless
/// `skipUserAttributesPrefixInSAMLAttributes`), `Groups` and `user_uuid`.
fn attributes(dest: &Destination, claims: &Value) -> Vec<(String, Vec<String>)> {
    let flag = |k: &str| dest.get(k).is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let values = |v: &Value| -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect(),
            Value::Number(n) => vec![n.to_string()],
            Value::Bool(b) => vec![b.to_string()],
            _ => Vec::new(),
        }
    };
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for k in ["user_name", "given_name", "family_name", "email", "origin", "zid"] {
        if let Some(v) = claims.get(k).map(values).filter(|v| !v.is_empty()) {
            out.push((k.to_owned(), v));
        }
    }
    if !flag("skipUserUuidInSAMLAttributes")
        && let Some(id) = claims.get("user_uuid").or_else(|| claims.get("user_id")).and_then(Value::as_str)
    {
        out.push(("user_uuid".into(), vec![id.to_owned()]));
    }
    let mut groups = Vec::new();
    let prefix = if flag("skipUserAttributesPrefixInSAMLAttributes") { "" } else { "user_attributes." };
    if let Some(Value::Object(attrs)) = claims.get("xs.user.attributes") {
        for (k, v) in attrs {
            if k == "xs.saml.groups" {
                groups.extend(values(v));
            } else {
                out.push((format!("{prefix}{k}"), values(v)));
            }
        }
    }
    if let Some(v) = claims.get("xs.system.attributes").and_then(|s| s.get("xs.saml.groups")) {
        groups.extend(values(v));
    }
    if !groups.is_empty() {
        let mut seen = std::collections::HashSet::new();
        groups.retain(|g| seen.insert(g.clone()));
        out.push(("Groups".into(), groups));
    }
    out
}

/// `GET`/`POST /v1/saml2Metadata/certificate`: the subaccount's signing certificate (404 while
/// there is none), and generating or renewing it.
pub(crate) fn certificate_routes() -> MethodRouter<Arc<DestinationService>> {
    get(|State(s): State<Arc<DestinationService>>, caller: Caller| async move {
        match s.subaccount_signer(caller.subaccount(), false).await? {
            Some(signer) => {
                Ok::<Response, ApiError>(Json(json!({"certificate": signer.certificate_pem()})).into_response())
            }
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "This subaccount has no SAML signing certificate yet; POST to this URL to generate one",
            )),
        }
    })
    .post(|State(s): State<Arc<DestinationService>>, caller: Caller| async move {
        let signer = s.renew_subaccount_signer(caller.subaccount()).await?;
        Ok::<Response, ApiError>(Json(json!({"certificate": signer.certificate_pem()})).into_response())
    })
}
