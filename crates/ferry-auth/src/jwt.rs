//! RS256 JWTs: signing with per-tenant key sets and verification against trusted issuers.
//!
//! Verification is deliberately narrow: only `RS256`, a `kid` is required and must name a key
//! of a trusted issuer, `exp` is required, `nbf` is honoured, and every failure maps to a short
//! reason that is safe to return to a client (no key material, no parser internals).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ferry_core::Secret;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Tokens larger than this are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum VerifyError {
    #[error("token is missing")]
    Missing,
    #[error("token is too large")]
    TooLarge,
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("token algorithm is not allowed (only RS256 is accepted)")]
    Algorithm,
    #[error("token is signed with an unknown key")]
    UnknownKey,
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token lacks the required claim '{0}'")]
    MissingClaim(&'static str),
    #[error("token issuer keys are unavailable")]
    KeysUnavailable,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("RSA key generation failed")]
    Generate,
    #[error("RSA key rejected: {0}")]
    Rejected(String),
    #[error("signing failed")]
    Sign,
}

/// One JSON Web Key as served at `/token_keys` (XSUAA also sends the PEM in `value`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Jwk {
    pub kty: String,
    pub kid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    #[serde(default)]
    pub n: String,
    #[serde(default)]
    pub e: String,
}

impl Jwk {
    /// The RSA public key as a PEM `PUBLIC KEY` (SubjectPublicKeyInfo), which XSUAA publishes
    /// in `value` beside the JWK fields; `None` for a key that is not a well-formed RSA JWK.
    pub fn public_key_pem(&self) -> Option<String> {
        use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
        if self.kty != "RSA" {
            return None;
        }
        let n = B64URL.decode(&self.n).ok()?;
        let e = B64URL.decode(&self.e).ok()?;
        let der: PublicKeyX509Der<'static> = PublicKeyComponents { n: &n[..], e: &e[..] }.as_der().ok()?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).ok()?);
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----");
        Some(pem)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

struct SigningKey {
    kid: String,
    pair: KeyPair,
    jwk: Jwk,
}

/// The signing keys of one issuer (tenant). The last key signs; older keys stay published so
/// tokens signed before a rotation still verify until they expire.
pub struct KeySet {
    keys: RwLock<Vec<Arc<SigningKey>>>,
    rng: SystemRandom,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<String> = self.read().iter().map(|k| k.kid.clone()).collect();
        f.debug_struct("KeySet").field("kids", &kids).finish()
    }
}

fn jwk_for(kid: &str, pair: &KeyPair) -> Jwk {
    let comps = PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    Jwk {
        kty: "RSA".into(),
        kid: kid.into(),
        alg: Some("RS256".into()),
        use_: Some("sig".into()),
        n: B64URL.encode(&comps.n),
        e: B64URL.encode(&comps.e),
    }
}

impl KeySet {
    /// Generates a key set with one fresh RSA-2048 key.
    pub fn generate() -> Result<Self, KeyError> {
        let set = Self { keys: RwLock::new(Vec::new()), rng: SystemRandom::new() };
        set.rotate()?;
        Ok(set)
    }

    /// Builds a key set from PKCS#8 DER keys, oldest first, each with its `kid`.
    pub fn from_pkcs8(keys: &[(String, Secret<Vec<u8>>)]) -> Result<Self, KeyError> {
        let mut out = Vec::new();
        for (kid, der) in keys {
            let pair = KeyPair::from_pkcs8(der.expose()).map_err(|e| KeyError::Rejected(e.to_string()))?;
            out.push(Arc::new(SigningKey { jwk: jwk_for(kid, &pair), kid: kid.clone(), pair }));
        }
        if out.is_empty() {
            return Err(KeyError::Rejected("no keys given".into()));
        }
        Ok(Self { keys: RwLock::new(out), rng: SystemRandom::new() })
    }

    /// Adds a new signing key; returns its `kid`.
    pub fn rotate(&self) -> Result<String, KeyError> {
        let pair = KeyPair::generate(KeySize::Rsa2048).map_err(|_| KeyError::Generate)?;
        let kid = format!("key-{}", uuid::Uuid::new_v4().simple());
        let key = SigningKey { jwk: jwk_for(&kid, &pair), kid: kid.clone(), pair };
        self.write().push(Arc::new(key));
        Ok(kid)
    }

    /// Drops all keys but the newest `keep`.
    pub fn retire_old(&self, keep: usize) {
        let mut keys = self.write();
        let n = keys.len();
        if n > keep.max(1) {
            keys.drain(..n - keep.max(1));
        }
    }

    /// PKCS#8 DER of every key, oldest first, for persistence.
    pub fn export_pkcs8(&self) -> Vec<(String, Secret<Vec<u8>>)> {
        use aws_lc_rs::encoding::AsDer;
        self.read()
            .iter()
            .filter_map(|k| {
                let der: aws_lc_rs::encoding::Pkcs8V1Der = k.pair.as_der().ok()?;
                Some((k.kid.clone(), Secret::new(der.as_ref().to_vec())))
            })
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<SigningKey>>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<SigningKey>>> {
        self.keys.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn current_kid(&self) -> Option<String> {
        self.read().last().map(|k| k.kid.clone())
    }

    pub fn jwks(&self) -> Jwks {
        Jwks { keys: self.read().iter().map(|k| k.jwk.clone()).collect() }
    }

    fn jwk(&self, kid: &str) -> Option<Jwk> {
        self.read().iter().find(|k| k.kid == kid).map(|k| k.jwk.clone())
    }

    /// Signs `claims` with the current key. `extra_header` entries (e.g. `jku`) are added to the
    /// JOSE header.
    pub fn sign(&self, claims: &Value, extra_header: &[(&str, &str)]) -> Result<String, KeyError> {
        let key = self.read().last().cloned().ok_or(KeyError::Sign)?;
        let mut header = serde_json::Map::new();
        header.insert("alg".into(), "RS256".into());
        for (k, v) in extra_header {
            header.insert((*k).into(), (*v).into());
        }
        header.insert("kid".into(), key.kid.clone().into());
        header.insert("typ".into(), "JWT".into());
        let h = B64URL.encode(serde_json::to_vec(&header).map_err(|_| KeyError::Sign)?);
        let p = B64URL.encode(serde_json::to_vec(claims).map_err(|_| KeyError::Sign)?);
        let signing_input = format!("{h}.{p}");
        let mut sig = vec![0u8; key.pair.public_modulus_len()];
        key.pair.sign(&RSA_PKCS1_SHA256, &self.rng, signing_input.as_bytes(), &mut sig).map_err(|_| KeyError::Sign)?;
        Ok(format!("{signing_input}.{}", B64URL.encode(sig)))
    }
}

/// `ext_attr` as XSUAA writes it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExtAttr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enhancer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subaccountid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zdn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serviceinstanceid: Option<String>,
}

/// The verified claims Ferry's services act on; everything else stays in `raw`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Claims {
    /// Tenant (identity zone) id; Ferry's subaccount id.
    pub zid: String,
    pub client_id: Option<String>,
    pub user_name: Option<String>,
    pub user_id: Option<String>,
    pub email: Option<String>,
    pub scope: Vec<String>,
    pub ext_attr: ExtAttr,
    pub iss: Option<String>,
    pub exp: u64,
    pub grant_type: Option<String>,
    pub raw: Value,
}

impl Claims {
    fn from_value(raw: Value) -> Result<Self, VerifyError> {
        let s = |k: &str| raw.get(k).and_then(Value::as_str).map(str::to_owned);
        let zid =
            s("zid").or_else(|| s("app_tid")).or_else(|| s("zone_uuid")).ok_or(VerifyError::MissingClaim("zid"))?;
        let exp = raw.get("exp").and_then(Value::as_u64).ok_or(VerifyError::MissingClaim("exp"))?;
        let scope = match raw.get("scope") {
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            _ => Vec::new(),
        };
        let ext_attr = raw.get("ext_attr").and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default();
        Ok(Self {
            zid,
            client_id: s("client_id").or_else(|| s("cid")),
            user_name: s("user_name"),
            user_id: s("user_id"),
            email: s("email"),
            scope,
            ext_attr,
            iss: s("iss"),
            exp,
            grant_type: s("grant_type"),
            raw,
        })
    }

    /// Whether this token represents a user (as opposed to a technical client).
    pub fn is_user(&self) -> bool {
        self.user_name.is_some() || self.user_id.is_some()
    }
}

/// A source of keys the verifier trusts.
pub enum TrustedIssuer {
    /// Keys held in this process (`ferry up`, tests).
    Local(Arc<KeySet>),
    /// A remote JWKS endpoint (`{token service}/token_keys`, or an OIDC provider's `jwks_uri`),
    /// cached and refreshed when a token names an unknown `kid`.
    Jwks { url: String, cache: RwLock<Option<(Jwks, Instant)>> },
}

impl TrustedIssuer {
    pub fn jwks_url(url: impl Into<String>) -> Self {
        Self::Jwks { url: url.into(), cache: RwLock::new(None) }
    }
}

/// Verifies bearer tokens against a list of trusted issuers.
pub struct Verifier {
    issuers: Vec<TrustedIssuer>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("issuers", &self.issuers.len()).finish()
    }
}

/// Do not refetch a JWKS more often than this, so that tokens with random `kid`s cannot turn
/// the verifier into a request amplifier.
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(10);

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Verifier {
    pub fn new(issuers: Vec<TrustedIssuer>, http: reqwest::Client) -> Self {
        Self { issuers, http }
    }

    pub fn local(keys: Arc<KeySet>) -> Self {
        Self::new(vec![TrustedIssuer::Local(keys)], ferry_core::tls::http_client(None).unwrap_or_default())
    }

    /// Verifies a compact JWT and returns its claims.
    pub async fn verify(&self, token: &str) -> Result<Claims, VerifyError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(VerifyError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(VerifyError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(VerifyError::Malformed);
        };
        let header: Value =
            B64URL.decode(h).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(VerifyError::Malformed)?;
        if header.get("alg").and_then(Value::as_str) != Some("RS256") {
            return Err(VerifyError::Algorithm);
        }
        let kid = header.get("kid").and_then(Value::as_str).ok_or(VerifyError::UnknownKey)?;
        let sig = B64URL.decode(sig).map_err(|_| VerifyError::Malformed)?;
        let jwk = self.find_key(kid).await?;
        let n = B64URL.decode(&jwk.n).map_err(|_| VerifyError::KeysUnavailable)?;
        let e = B64URL.decode(&jwk.e).map_err(|_| VerifyError::KeysUnavailable)?;
        let signing_input = &token[..h.len() + 1 + p.len()];
        PublicKeyComponents { n: &n[..], e: &e[..] }
            .verify(&RSA_PKCS1_2048_8192_SHA256, signing_input.as_bytes(), &sig)
            .map_err(|_| VerifyError::Signature)?;
        let payload: Value = B64URL
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(Value::is_object)
            .ok_or(VerifyError::Malformed)?;
        let claims = Claims::from_value(payload)?;
        let now = now_secs();
        if claims.exp + LEEWAY_SECS < now {
            return Err(VerifyError::Expired);
        }
        if let Some(nbf) = claims.raw.get("nbf").and_then(Value::as_u64)
            && nbf > now + LEEWAY_SECS
        {
            return Err(VerifyError::NotYetValid);
        }
        Ok(claims)
    }

    async fn find_key(&self, kid: &str) -> Result<Jwk, VerifyError> {
        let mut unavailable = false;
        for issuer in &self.issuers {
            match issuer {
                TrustedIssuer::Local(keys) => {
                    if let Some(j) = keys.jwk(kid) {
                        return Ok(j);
                    }
                }
                TrustedIssuer::Jwks { url, cache } => {
                    let (hit, stale) = {
                        let c = cache.read().unwrap_or_else(|p| p.into_inner());
                        match &*c {
                            Some((jwks, at)) => {
                                (jwks.keys.iter().find(|k| k.kid == kid).cloned(), at.elapsed() >= JWKS_MIN_REFRESH)
                            }
                            None => (None, true),
                        }
                    };
                    if let Some(j) = hit {
                        return Ok(j);
                    }
                    if !stale {
                        continue;
                    }
                    match self.fetch_jwks(url).await {
                        Ok(jwks) => {
                            let found = jwks.keys.iter().find(|k| k.kid == kid).cloned();
                            *cache.write().unwrap_or_else(|p| p.into_inner()) = Some((jwks, Instant::now()));
                            if let Some(j) = found {
                                return Ok(j);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%url, error = %e, "cannot fetch JWKS");
                            unavailable = true;
                        }
                    }
                }
            }
        }
        Err(if unavailable { VerifyError::KeysUnavailable } else { VerifyError::UnknownKey })
    }

    async fn fetch_jwks(&self, url: &str) -> Result<Jwks, reqwest::Error> {
        self.http.get(url).timeout(Duration::from_secs(5)).send().await?.error_for_status()?.json().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(exp_delta: i64) -> Value {
        let exp = (now_secs() as i64 + exp_delta) as u64;
        json!({"zid": "z1", "client_id": "c1", "exp": exp, "scope": ["a", "b"], "ext_attr": {"zdn": "sub"}})
    }

    #[tokio::test]
    async fn sign_and_verify() {
        let keys = Arc::new(KeySet::generate().unwrap());
        let v = Verifier::local(keys.clone());
        let t = keys.sign(&claims(600), &[]).unwrap();
        let c = v.verify(&t).await.unwrap();
        assert_eq!(c.zid, "z1");
        assert_eq!(c.client_id.as_deref(), Some("c1"));
        assert_eq!(c.scope, vec!["a", "b"]);
        assert_eq!(c.ext_attr.zdn.as_deref(), Some("sub"));
    }

    #[tokio::test]
    async fn rejects_bad_tokens() {
        let keys = Arc::new(KeySet::generate().unwrap());
        let other = KeySet::generate().unwrap();
        let v = Verifier::local(keys.clone());
        assert_eq!(v.verify(&keys.sign(&claims(-600), &[]).unwrap()).await, Err(VerifyError::Expired));
        assert_eq!(v.verify(&other.sign(&claims(600), &[]).unwrap()).await, Err(VerifyError::UnknownKey));
        let good = keys.sign(&claims(600), &[]).unwrap();
        let mut tampered: Vec<&str> = good.split('.').collect();
        let evil = B64URL.encode(br#"{"zid":"z2","exp":9999999999}"#);
        tampered[1] = &evil;
        assert_eq!(v.verify(&tampered.join(".")).await, Err(VerifyError::Signature));
        let none = format!("{}.{}.", B64URL.encode(br#"{"alg":"none"}"#), B64URL.encode(br#"{"zid":"z"}"#));
        assert_eq!(v.verify(&none).await, Err(VerifyError::Algorithm));
        assert_eq!(v.verify("a.b").await, Err(VerifyError::Malformed));
        assert_eq!(v.verify("").await, Err(VerifyError::Missing));
        assert_eq!(v.verify(&"a".repeat(MAX_TOKEN_LEN + 1)).await, Err(VerifyError::TooLarge));
        let no_zid = keys.sign(&json!({"exp": now_secs() + 60}), &[]).unwrap();
        assert_eq!(v.verify(&no_zid).await, Err(VerifyError::MissingClaim("zid")));
    }

    #[test]
    fn jwk_pem_round_trips() {
        let keys = KeySet::generate().unwrap();
        let jwk = keys.jwks().keys.remove(0);
        let pem = jwk.public_key_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\nMIIBIjAN"));
        assert!(pem.ends_with("-----END PUBLIC KEY-----"));
        assert!(Jwk { kty: "EC".into(), ..jwk }.public_key_pem().is_none());
    }

    #[tokio::test]
    async fn rotation_keeps_old_keys_verifiable() {
        let keys = Arc::new(KeySet::generate().unwrap());
        let v = Verifier::local(keys.clone());
        let old = keys.sign(&claims(600), &[]).unwrap();
        keys.rotate().unwrap();
        let new = keys.sign(&claims(600), &[]).unwrap();
        assert!(v.verify(&old).await.is_ok());
        assert!(v.verify(&new).await.is_ok());
        keys.retire_old(1);
        assert_eq!(v.verify(&old).await, Err(VerifyError::UnknownKey));
        let exported = KeySet::from_pkcs8(&keys.export_pkcs8()).unwrap();
        assert_eq!(exported.jwks().keys, keys.jwks().keys);
    }
}
