//! JWTs: signing with per-tenant key sets (RS256), and the one [`Verifier`] every Ferry service
//! checks bearer tokens with.
//!
//! A verifier trusts a list of [`TrustedIssuer`]s: Ferry's own tenants (keys in this process,
//! each bound to its zone), a remote Ferry `/token_keys` endpoint, and external OpenID Connect
//! providers ([`crate::oidc`]). Checks, in order: size; three base64url parts with JSON objects;
//! no `crit` header; an allowed `alg` (never `none`, never `HS*`); a `kid`; the key of a trusted
//! issuer; the signature; `exp` (required) and `nbf` with [`LEEWAY_SECS`]; the issuer's tenant
//! and, where configured, audience. Every failure maps to a [`VerifyError`] whose text is short
//! and safe to return to a client: no key material, no parser internals.

use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{self as sig, KeyPair as _, RSA_PKCS1_SHA256};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ferry_core::Secret;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::oidc::{KeySource, OidcIssuer, RemoteKeys};

/// Tokens larger than this are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// Why a token was refused. The `Display` text is what clients see (401/407 bodies), so it
/// names the failed check and nothing else.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum VerifyError {
    #[error("token is missing")]
    Missing,
    #[error("token is too large")]
    TooLarge,
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("token algorithm is not allowed")]
    Algorithm,
    #[error("token header has a critical extension that is not supported")]
    CriticalHeader,
    #[error("token header has no key id (kid)")]
    MissingKeyId,
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
    #[error("token issuer is not trusted")]
    Issuer,
    #[error("token audience is not accepted here")]
    Audience,
    #[error("token zone (zid) does not match the subaccount of its issuer")]
    TenantMismatch,
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
    /// Tenant (identity zone) id; Ferry's subaccount id. For a token of an external issuer, the
    /// subaccount its trust entry names.
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
    /// Verified with the keys of an external OIDC issuer (`[[trust]]`), not those of one of
    /// Ferry's own tenants: its claims beyond the subaccount are the issuer's word only.
    pub external_issuer: bool,
    pub raw: Value,
}

impl Claims {
    /// Reads a verified payload; `zid` is the tenant the verifying issuer established.
    fn from_payload(payload: Map<String, Value>, zid: String, exp: u64) -> Self {
        let raw = Value::Object(payload);
        let s = |k: &str| raw.get(k).and_then(Value::as_str).map(str::to_owned);
        let ext_attr = raw.get("ext_attr").and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default();
        Self {
            zid,
            client_id: s("client_id").or_else(|| s("cid")).or_else(|| s("azp")),
            user_name: s("user_name"),
            user_id: s("user_id"),
            email: s("email"),
            scope: scope_list(raw.get("scope")).into_iter().map(str::to_owned).collect(),
            ext_attr,
            iss: s("iss"),
            exp,
            grant_type: s("grant_type"),
            external_issuer: false,
            raw,
        }
    }

    /// Whether this token represents a user (as opposed to a technical client).
    pub fn is_user(&self) -> bool {
        self.user_name.is_some() || self.user_id.is_some()
    }
}

/// `scope` as XSUAA writes it (an array) or as OAuth does (a space-separated string).
fn scope_list(scope: Option<&Value>) -> Vec<&str> {
    match scope {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(s)) => s.split_whitespace().collect(),
        _ => Vec::new(),
    }
}

/// The zone a token claims: `zid`, or the newer `app_tid` / `zone_uuid`. A token whose zone
/// claims disagree with each other claims a zone it is not bound to: `TenantMismatch`.
fn claimed_zid(payload: &Map<String, Value>) -> Result<Option<&str>, VerifyError> {
    let mut zone = None;
    for key in ["zid", "app_tid", "zone_uuid"] {
        match (payload.get(key), zone) {
            (None, _) => {}
            (Some(Value::String(z)), None) => zone = Some(z.as_str()),
            (Some(Value::String(z)), Some(first)) if z == first => {}
            _ => return Err(VerifyError::TenantMismatch),
        }
    }
    Ok(zone)
}

/// A source of keys the verifier trusts.
pub enum TrustedIssuer {
    /// Keys held in this process, accepting any `zid` they signed. For tests and single-key
    /// set-ups; a service trusting several tenants uses [`TrustedIssuer::Tenant`].
    Local(Arc<KeySet>),
    /// One Ferry tenant's keys, held in this process: a token they verify must claim exactly
    /// this `zid`, so that tenant A's key cannot vouch for tenant B.
    Tenant { zid: String, keys: Arc<KeySet> },
    /// A remote Ferry JWKS endpoint (`{uaadomain}/token_keys?zid=`), cached and refetched (at
    /// most every few seconds) when a token names an unknown `kid`. RS256 only.
    Jwks(RemoteKeys),
    /// An external OpenID Connect provider, found by its issuer URL (see [`crate::oidc`]).
    Oidc(OidcIssuer),
    /// A changing set of Ferry tenants held in this process (the token service's tenants,
    /// which the admin API adds and removes at run time); each bound to its zone like
    /// [`TrustedIssuer::Tenant`].
    Tenants(TenantKeys),
}

/// The current tenants' keys, shared between the token service (which updates it) and the
/// verifiers of the services in the same process (which read it per token).
#[derive(Clone, Default)]
pub struct TenantKeys(Arc<TenantKeysInner>);

#[derive(Default)]
struct TenantKeysInner {
    list: std::sync::RwLock<Vec<ZoneKeys>>,
    /// Bumped on every change, so caches of verified tokens can tell that trust has changed
    /// (a removed tenant's tokens must stop working at once, not when a cache entry ages out).
    generation: std::sync::atomic::AtomicU64,
}

/// A zone id and its keys.
type ZoneKeys = (String, Arc<KeySet>);

impl TenantKeys {
    /// Adds or replaces a tenant's keys.
    pub fn insert(&self, zid: &str, keys: Arc<KeySet>) {
        let mut list = self.0.list.write().unwrap_or_else(|p| p.into_inner());
        list.retain(|(z, _)| z != zid);
        list.push((zid.to_owned(), keys));
        self.0.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    pub fn remove(&self, zid: &str) {
        self.0.list.write().unwrap_or_else(|p| p.into_inner()).retain(|(z, _)| z != zid);
        self.0.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    fn generation(&self) -> u64 {
        self.0.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The zone whose keys hold `kid`, and that key.
    fn find(&self, kid: &str) -> Option<(String, VerifyKey)> {
        let list = self.0.list.read().unwrap_or_else(|p| p.into_inner());
        list.iter().find_map(|(z, k)| k.verify_key(kid).map(|key| (z.clone(), key)))
    }

    pub fn zones(&self) -> Vec<String> {
        self.0.list.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(z, _)| z.clone()).collect()
    }
}

impl std::fmt::Debug for TenantKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TenantKeys").field(&self.zones()).finish()
    }
}

impl TrustedIssuer {
    pub fn jwks_url(url: impl Into<String>) -> Self {
        Self::Jwks(RemoteKeys::new(KeySource::Jwks(url.into())))
    }

    /// One tenant's in-process keys, bound to its zone id.
    pub fn tenant(zid: impl Into<String>, keys: Arc<KeySet>) -> Self {
        Self::Tenant { zid: zid.into(), keys }
    }

    /// An external OpenID Connect issuer; fails on an issuer URL that cannot be trusted.
    pub fn oidc(trust: crate::oidc::OidcTrust) -> Result<Self, crate::oidc::TrustConfigError> {
        OidcIssuer::new(trust).map(Self::Oidc)
    }
}

impl std::fmt::Debug for TrustedIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(_) => f.write_str("Local"),
            Self::Tenant { zid, .. } => f.debug_struct("Tenant").field("zid", zid).finish(),
            Self::Jwks(k) => f.debug_tuple("Jwks").field(k).finish(),
            Self::Oidc(o) => f.debug_tuple("Oidc").field(o).finish(),
            Self::Tenants(t) => t.fmt(f),
        }
    }
}

/// Signature algorithms a token may name. Ferry signs RS256 only; the others are accepted from
/// external OIDC issuers. `none` and the HMAC family are absent on purpose: a verifier that
/// holds only public keys must never treat one as a shared secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Es256,
    Es384,
}

impl Alg {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "PS256" => Self::Ps256,
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
            Self::Ps256 => "PS256",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Curve {
    P256,
    P384,
}

/// A public verification key taken from a JWK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum VerifyKey {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
        alg: Option<String>,
    },
    /// `point` is the uncompressed SEC1 encoding `04 || x || y`.
    Ec {
        curve: Curve,
        point: Vec<u8>,
        alg: Option<String>,
    },
}

impl VerifyKey {
    /// Reads one JWK of a JWKS; `None` (the key is skipped) for anything that is not a
    /// well-formed RSA or P-256/P-384 signature key with a `kid`.
    pub(crate) fn from_jwk(jwk: &Value) -> Option<(String, Self)> {
        let s = |k: &str| jwk.get(k).and_then(Value::as_str);
        let b = |k: &str| s(k).and_then(|v| B64URL.decode(v).ok()).filter(|v| !v.is_empty());
        let kid = s("kid").filter(|k| !k.is_empty())?.to_owned();
        if s("use").is_some_and(|u| u != "sig") {
            return None;
        }
        let alg = s("alg").map(str::to_owned);
        let key = match s("kty")? {
            "RSA" => Self::Rsa { n: b("n")?, e: b("e")?, alg },
            "EC" => {
                let (curve, len) = match s("crv")? {
                    "P-256" => (Curve::P256, 32),
                    "P-384" => (Curve::P384, 48),
                    _ => return None,
                };
                let (x, y) = (b("x")?, b("y")?);
                if x.len() != len || y.len() != len {
                    return None;
                }
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(4);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                Self::Ec { curve, point, alg }
            }
            _ => return None,
        };
        Some((kid, key))
    }

    fn from_local(jwk: &Jwk) -> Option<Self> {
        let n = B64URL.decode(&jwk.n).ok()?;
        let e = B64URL.decode(&jwk.e).ok()?;
        Some(Self::Rsa { n, e, alg: Some("RS256".into()) })
    }

    /// Checks `signature` over `message` with this key under `alg`. A key that declares its
    /// `alg`, or whose type does not fit `alg`, refuses any other algorithm.
    fn verify(&self, alg: Alg, message: &[u8], signature: &[u8]) -> Result<(), VerifyError> {
        let declared = match self {
            Self::Rsa { alg, .. } | Self::Ec { alg, .. } => alg.as_deref(),
        };
        if declared.is_some_and(|d| d != alg.name()) {
            return Err(VerifyError::Algorithm);
        }
        let ok = match (self, alg) {
            (Self::Rsa { n, e, .. }, Alg::Rs256 | Alg::Rs384 | Alg::Rs512 | Alg::Ps256) => {
                let params = match alg {
                    Alg::Rs256 => &sig::RSA_PKCS1_2048_8192_SHA256,
                    Alg::Rs384 => &sig::RSA_PKCS1_2048_8192_SHA384,
                    Alg::Rs512 => &sig::RSA_PKCS1_2048_8192_SHA512,
                    _ => &sig::RSA_PSS_2048_8192_SHA256,
                };
                PublicKeyComponents { n: &n[..], e: &e[..] }.verify(params, message, signature).is_ok()
            }
            (Self::Ec { curve: Curve::P256, point, .. }, Alg::Es256) => {
                sig::UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, point).verify(message, signature).is_ok()
            }
            (Self::Ec { curve: Curve::P384, point, .. }, Alg::Es384) => {
                sig::UnparsedPublicKey::new(&sig::ECDSA_P384_SHA384_FIXED, point).verify(message, signature).is_ok()
            }
            _ => return Err(VerifyError::Algorithm),
        };
        if ok { Ok(()) } else { Err(VerifyError::Signature) }
    }
}

impl VerifyKey {
    /// The keys of a client's registered assertion key: a PEM certificate (an X.509 service
    /// key's `certificate`) or public key (`PUBLIC KEY`, SPKI), a JWK, or a JWKS. RSA and P-256
    /// keys only, which is all the client-assertion allow-list (RS256, ES256) can use.
    pub(crate) fn from_registered(text: &str) -> Result<Vec<Self>, String> {
        let text = text.trim();
        if text.starts_with('{') {
            let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
            let jwks: Vec<&Value> = match v.get("keys").and_then(Value::as_array) {
                Some(keys) => keys.iter().collect(),
                None => vec![&v],
            };
            let keys: Vec<Self> = jwks
                .into_iter()
                .filter_map(|k| {
                    // A single JWK needs no kid here: the client, not the kid, selects the keys.
                    let mut k = k.clone();
                    if let Some(o) = k.as_object_mut() {
                        o.entry("kid").or_insert_with(|| "registered".into());
                    }
                    Self::from_jwk(&k).map(|(_, key)| key)
                })
                .collect();
            if keys.is_empty() {
                return Err("the JWK(S) holds no RSA or EC P-256 signature key".into());
            }
            return Ok(keys);
        }
        let mut keys = Vec::new();
        for block in x509_parser::pem::Pem::iter_from_buffer(text.as_bytes()) {
            let block = block.map_err(|e| format!("the PEM text does not parse: {e}"))?;
            let key = match block.label.as_str() {
                "CERTIFICATE" => {
                    let (_, cert) = x509_parser::parse_x509_certificate(&block.contents)
                        .map_err(|e| format!("the certificate does not parse: {e}"))?;
                    Self::from_spki(cert.public_key())?
                }
                "PUBLIC KEY" => {
                    use x509_parser::prelude::FromDer;
                    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&block.contents)
                        .map_err(|e| format!("the public key does not parse: {e}"))?;
                    Self::from_spki(&spki)?
                }
                other => return Err(format!("a PEM block {other:?} is no public key; use CERTIFICATE or PUBLIC KEY")),
            };
            keys.push(key);
        }
        if keys.is_empty() {
            return Err("no key found: expected a PEM certificate or public key, a JWK or a JWKS".into());
        }
        Ok(keys)
    }

    fn from_spki(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<Self, String> {
        use x509_parser::public_key::PublicKey;
        let strip = |b: &[u8]| b.iter().skip_while(|x| **x == 0).copied().collect::<Vec<u8>>();
        match spki.parsed().map_err(|e| format!("the public key does not parse: {e}"))? {
            PublicKey::RSA(rsa) => Ok(Self::Rsa { n: strip(rsa.modulus), e: strip(rsa.exponent), alg: None }),
            PublicKey::EC(point) => {
                let p256 = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .is_some_and(|oid| oid == x509_parser::oid_registry::OID_EC_P256);
                if !p256 || point.data().len() != 65 {
                    return Err("only EC keys on P-256 are supported".into());
                }
                Ok(Self::Ec { curve: Curve::P256, point: point.data().to_vec(), alg: None })
            }
            _ => Err("only RSA and EC P-256 keys are supported".into()),
        }
    }
}

/// Checks the signature of a client assertion (RFC 7523 §2.2) against a client's registered
/// keys and returns its claims, unchecked. Only RS256 and ES256 are allowed: what OIDC's
/// `private_key_jwt` clients (xssec, the Cloud SDK, IAS) sign with; never `none` or HMAC.
pub(crate) fn verify_client_assertion(token: &str, keys: &[VerifyKey]) -> Result<Map<String, Value>, VerifyError> {
    let jws = Jws::parse(token)?;
    if jws.header.contains_key("crit") {
        return Err(VerifyError::CriticalHeader);
    }
    let alg = match jws.header.get("alg").and_then(Value::as_str).and_then(Alg::parse) {
        Some(a @ (Alg::Rs256 | Alg::Es256)) => a,
        _ => return Err(VerifyError::Algorithm),
    };
    let mut verdict = Err(VerifyError::UnknownKey);
    for key in keys {
        match jws.verify_with(key, alg) {
            Ok(()) => return Ok(jws.payload),
            // A key of the wrong type says less than a key that did not verify.
            Err(VerifyError::Algorithm) if matches!(verdict, Err(VerifyError::UnknownKey)) => {
                verdict = Err(VerifyError::Algorithm)
            }
            Err(VerifyError::Algorithm) => {}
            Err(e) => verdict = Err(e),
        }
    }
    verdict.map(|()| Map::new())
}

impl KeySet {
    fn verify_key(&self, kid: &str) -> Option<VerifyKey> {
        self.jwk(kid).as_ref().and_then(VerifyKey::from_local)
    }
}

/// A compact JWS split and decoded, not yet verified.
struct Jws<'a> {
    header: Map<String, Value>,
    payload: Map<String, Value>,
    signing_input: &'a str,
    signature: Vec<u8>,
}

impl<'a> Jws<'a> {
    fn parse(token: &'a str) -> Result<Self, VerifyError> {
        if token.is_empty() {
            return Err(VerifyError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(VerifyError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(VerifyError::Malformed);
        };
        let object = |part: &str| match B64URL.decode(part).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
            Some(Value::Object(m)) => Ok(m),
            _ => Err(VerifyError::Malformed),
        };
        let header = object(h)?;
        let payload = object(p)?;
        let signature = B64URL.decode(s).map_err(|_| VerifyError::Malformed)?;
        Ok(Self { header, payload, signing_input: &token[..h.len() + 1 + p.len()], signature })
    }

    fn verify_with(&self, key: &VerifyKey, alg: Alg) -> Result<(), VerifyError> {
        key.verify(alg, self.signing_input.as_bytes(), &self.signature)
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A NumericDate: integral or not, never negative.
fn numeric_date(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f as u64))
}

/// `exp` (required) and `nbf` (if present), with [`LEEWAY_SECS`] each way; returns `exp`.
fn check_times(payload: &Map<String, Value>, now: u64, exp_tolerance: u64) -> Result<u64, VerifyError> {
    let exp = payload.get("exp").and_then(numeric_date).ok_or(VerifyError::MissingClaim("exp"))?;
    if now >= exp.saturating_add(LEEWAY_SECS).saturating_add(exp_tolerance) {
        return Err(VerifyError::Expired);
    }
    if let Some(nbf) = payload.get("nbf") {
        let nbf = numeric_date(nbf).ok_or(VerifyError::Malformed)?;
        if nbf > now.saturating_add(LEEWAY_SECS) {
            return Err(VerifyError::NotYetValid);
        }
    }
    Ok(exp)
}

/// Whether a token is meant for one of `expected` (empty: no audience check): `aud` (a string
/// or an array) names one, or — as XSUAA grants it — a scope is `<audience>.<something>`.
pub(crate) fn check_audience(payload: &Map<String, Value>, expected: &[String]) -> Result<(), VerifyError> {
    if expected.is_empty() {
        return Ok(());
    }
    let aud: Vec<&str> = match payload.get("aud") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let scope = scope_list(payload.get("scope"));
    let matches = |e: &String| {
        aud.contains(&e.as_str())
            || scope.iter().any(|s| s.len() > e.len() + 1 && s.starts_with(e.as_str()) && s.as_bytes()[e.len()] == b'.')
    };
    if expected.iter().any(matches) { Ok(()) } else { Err(VerifyError::Audience) }
}

/// Verifies bearer tokens against a list of trusted issuers. One is built per process and
/// shared by every service in it (`ferry up`: the Destination Service and the proxy).
pub struct Verifier {
    issuers: Vec<TrustedIssuer>,
    /// Audiences required of Ferry's own tokens; empty: not checked.
    audiences: Vec<String>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("issuers", &self.issuers).field("audiences", &self.audiences).finish()
    }
}

impl Verifier {
    /// A verifier trusting `issuers`; `http` fetches remote keys (OIDC discovery, JWKS), so it
    /// must trust the CAs those are served with.
    pub fn new(issuers: Vec<TrustedIssuer>, http: reqwest::Client) -> Self {
        Self { issuers, audiences: Vec::new(), http }
    }

    /// Trusts `keys` for tokens of any zone. For tests; see [`TrustedIssuer::Local`].
    pub fn local(keys: Arc<KeySet>) -> Self {
        Self::new(vec![TrustedIssuer::Local(keys)], ferry_core::tls::http_client(None).unwrap_or_default())
    }

    /// Trusts each tenant's keys for that tenant's zone only ([`TrustedIssuer::Tenant`]).
    pub fn for_tenants(tenants: impl IntoIterator<Item = (String, Arc<KeySet>)>, http: reqwest::Client) -> Self {
        Self::new(tenants.into_iter().map(|(zid, keys)| TrustedIssuer::tenant(zid, keys)).collect(), http)
    }

    /// Also trusts `more` (e.g. the external issuers of the configuration).
    pub fn with_issuers(mut self, more: impl IntoIterator<Item = TrustedIssuer>) -> Self {
        self.issuers.extend(more);
        self
    }

    /// Requires Ferry's own tokens to be meant for one of `audiences` (`aud`, or a scope
    /// `<audience>.*`). Off by default; external issuers have their own list.
    pub fn with_audiences(mut self, audiences: Vec<String>) -> Self {
        self.audiences = audiences;
        self
    }

    /// Changes whenever the set of trusted tenants changes; a verification result remembered
    /// under an older value must be checked again.
    pub fn trust_generation(&self) -> u64 {
        self.issuers
            .iter()
            .map(|i| match i {
                TrustedIssuer::Tenants(t) => t.generation(),
                _ => 0,
            })
            .fold(0, u64::wrapping_add)
    }

    /// Verifies a compact JWT and returns its claims.
    pub async fn verify(&self, token: &str) -> Result<Claims, VerifyError> {
        self.verify_inner(token, 0).await
    }

    /// Like [`Verifier::verify`], but accepts a token up to `tolerance` after its `exp`: SAP's
    /// Cloud Connector accepts a propagated principal for a configurable time after its token
    /// expired (`expirationToleranceInHr`). Everything else is checked as usual.
    pub async fn verify_with_expiry_tolerance(
        &self,
        token: &str,
        tolerance: std::time::Duration,
    ) -> Result<Claims, VerifyError> {
        self.verify_inner(token, tolerance.as_secs()).await
    }

    async fn verify_inner(&self, token: &str, exp_tolerance: u64) -> Result<Claims, VerifyError> {
        let jws = Jws::parse(token.trim())?;
        if jws.header.contains_key("crit") {
            return Err(VerifyError::CriticalHeader);
        }
        let alg = jws.header.get("alg").and_then(Value::as_str).and_then(Alg::parse).ok_or(VerifyError::Algorithm)?;
        let kid =
            jws.header.get("kid").and_then(Value::as_str).filter(|k| !k.is_empty()).ok_or(VerifyError::MissingKeyId)?;
        let now = now_secs();

        // A token naming a trusted external issuer is checked against that issuer alone.
        let iss = jws.payload.get("iss").and_then(Value::as_str);
        if let Some(oidc) = iss.and_then(|iss| self.oidc().find(|o| o.issuer() == iss)) {
            let key = oidc.keys().key(kid, &self.http).await?.ok_or(VerifyError::UnknownKey)?;
            jws.verify_with(&key, alg)?;
            let exp = check_times(&jws.payload, now, exp_tolerance)?;
            if claimed_zid(&jws.payload)?.is_some_and(|z| z != oidc.subaccount()) {
                return Err(VerifyError::TenantMismatch);
            }
            check_audience(&jws.payload, oidc.audiences())?;
            return Ok(Claims {
                external_issuer: true,
                ..Claims::from_payload(jws.payload, oidc.subaccount().to_owned(), exp)
            });
        }

        let mut unavailable = false;
        for issuer in &self.issuers {
            let mut bound: Option<String> = None;
            let key = match issuer {
                TrustedIssuer::Local(keys) | TrustedIssuer::Tenant { keys, .. } => keys.verify_key(kid),
                TrustedIssuer::Tenants(tenants) => tenants.find(kid).map(|(zid, key)| {
                    bound = Some(zid);
                    key
                }),
                TrustedIssuer::Jwks(remote) => remote.key(kid, &self.http).await.unwrap_or_else(|_| {
                    unavailable = true;
                    None
                }),
                TrustedIssuer::Oidc(_) => None,
            };
            let Some(key) = key else { continue };
            if alg != Alg::Rs256 {
                return Err(VerifyError::Algorithm);
            }
            jws.verify_with(&key, alg)?;
            let exp = check_times(&jws.payload, now, exp_tolerance)?;
            let zid = claimed_zid(&jws.payload)?.ok_or(VerifyError::MissingClaim("zid"))?.to_owned();
            if let TrustedIssuer::Tenant { zid: own, .. } = issuer
                && *own != zid
            {
                return Err(VerifyError::TenantMismatch);
            }
            if bound.is_some_and(|own| own != zid) {
                return Err(VerifyError::TenantMismatch);
            }
            check_audience(&jws.payload, &self.audiences)?;
            return Ok(Claims::from_payload(jws.payload, zid, exp));
        }

        // Signed with a trusted external issuer's key while naming another issuer.
        for oidc in self.oidc() {
            if let Ok(Some(_)) = oidc.keys().key(kid, &self.http).await {
                return Err(VerifyError::Issuer);
            }
        }
        Err(if unavailable { VerifyError::KeysUnavailable } else { VerifyError::UnknownKey })
    }

    fn oidc(&self) -> impl Iterator<Item = &OidcIssuer> {
        self.issuers.iter().filter_map(|i| match i {
            TrustedIssuer::Oidc(o) => Some(o),
            _ => None,
        })
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
