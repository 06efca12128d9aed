//! External OpenID Connect issuers, and the cache of remote signing keys.
//!
//! A trust entry names an issuer URL. Its keys are found the OIDC way: the discovery document
//! `{issuer}/.well-known/openid-configuration` (whose `issuer` must equal the configured one)
//! names the `jwks_uri`, and the JWKS there holds RSA and EC (P-256, P-384) keys. Both are
//! cached. A token naming a `kid` the cache lacks triggers a refetch, but at most one per
//! [`MIN_REFETCH`] per issuer, so tokens with random `kid`s cannot turn the verifier into a
//! request amplifier; a failed fetch keeps the keys fetched before.
//!
//! Tokens of an external issuer rarely carry a `zid`: the trust entry names the subaccount they
//! belong to, and a token that does claim a different zone is refused.
//!
//! Issuer and key URLs must be `https`, except on the loopback interface (`localhost`,
//! `127.0.0.1`, `[::1]`), where `http` is allowed for development and tests.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::jwt::{VerifyError, VerifyKey};

/// Do not refetch keys (or the discovery document) of one issuer more often than this.
pub const MIN_REFETCH: Duration = Duration::from_secs(10);
/// Keys older than this are refetched before use (and still used if that fails).
pub const KEYS_MAX_AGE: Duration = Duration::from_secs(3600);
/// The discovery document is fetched again after this long.
pub const DISCOVERY_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Discovery documents and JWKS larger than this are refused.
const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// One `[[trust]]` entry: an external issuer whose tokens Ferry's services accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OidcTrust {
    /// The issuer URL, exactly as the provider writes it in `iss`.
    pub issuer: String,
    /// The subaccount (zone id) the issuer's tokens act in; becomes [`crate::Claims::zid`].
    pub subaccount: String,
    /// If not empty, a token must be meant for one of these (`aud`, or a scope `<aud>.*`).
    pub audiences: Vec<String>,
}

/// Why a trust entry cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustConfigError {
    #[error("trusted issuer {0:?} is not an absolute URL")]
    NotAUrl(String),
    #[error("trusted issuer {0:?} must use https (http only for localhost, 127.0.0.1 or [::1])")]
    Insecure(String),
    #[error("trusted issuer {0:?} must not have a query, fragment or user info")]
    Extra(String),
    #[error("trusted issuer {0:?} needs a subaccount")]
    NoSubaccount(String),
}

/// Whether `url` may serve keys: https, or http on the loopback interface.
pub(crate) fn check_url(url: &str) -> Result<url::Url, TrustConfigError> {
    let parsed = url::Url::parse(url).map_err(|_| TrustConfigError::NotAUrl(url.to_owned()))?;
    let loopback = match parsed.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err(TrustConfigError::NotAUrl(url.to_owned())),
    };
    match parsed.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => return Err(TrustConfigError::Insecure(url.to_owned())),
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(TrustConfigError::Extra(url.to_owned()));
    }
    Ok(parsed)
}

/// A trusted external OIDC issuer with its cached keys.
pub struct OidcIssuer {
    trust: OidcTrust,
    keys: RemoteKeys,
}

impl std::fmt::Debug for OidcIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcIssuer")
            .field("issuer", &self.trust.issuer)
            .field("subaccount", &self.trust.subaccount)
            .field("audiences", &self.trust.audiences)
            .finish()
    }
}

impl OidcIssuer {
    pub fn new(trust: OidcTrust) -> Result<Self, TrustConfigError> {
        let url = check_url(&trust.issuer)?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(TrustConfigError::Extra(trust.issuer));
        }
        if trust.subaccount.trim().is_empty() {
            return Err(TrustConfigError::NoSubaccount(trust.issuer));
        }
        let keys = RemoteKeys::new(KeySource::Discovery { issuer: trust.issuer.clone() });
        Ok(Self { trust, keys })
    }

    pub fn issuer(&self) -> &str {
        &self.trust.issuer
    }

    pub fn subaccount(&self) -> &str {
        &self.trust.subaccount
    }

    pub fn audiences(&self) -> &[String] {
        &self.trust.audiences
    }

    /// Changes the rate limit of refetches on an unknown `kid` (default [`MIN_REFETCH`]).
    pub fn with_min_refetch(mut self, interval: Duration) -> Self {
        self.keys.min_refetch = interval;
        self
    }

    pub(crate) fn keys(&self) -> &RemoteKeys {
        &self.keys
    }
}

/// Where remote keys come from.
#[derive(Debug)]
pub(crate) enum KeySource {
    /// A JWKS URL (Ferry's own `/token_keys`).
    Jwks(String),
    /// An OIDC issuer: its discovery document names the JWKS URL.
    Discovery { issuer: String },
}

#[derive(Default)]
struct KeyCache {
    keys: Vec<(String, VerifyKey)>,
    fetched_at: Option<Instant>,
    /// The last fetch attempt, successful or not: the rate limit.
    attempted_at: Option<Instant>,
    failed: bool,
    /// From the discovery document, with when it was read.
    jwks_uri: Option<(String, Instant)>,
}

/// Keys fetched from a remote JWKS, cached, refetched on an unknown `kid` at most every
/// [`MIN_REFETCH`].
pub struct RemoteKeys {
    source: KeySource,
    min_refetch: Duration,
    cache: RwLock<KeyCache>,
    /// Serialises fetches, so that a burst of tokens with a new `kid` causes one fetch.
    refresh: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for RemoteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKeys").field("source", &self.source).finish()
    }
}

impl RemoteKeys {
    pub(crate) fn new(source: KeySource) -> Self {
        Self {
            source,
            min_refetch: MIN_REFETCH,
            cache: RwLock::new(KeyCache::default()),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self, kid: &str, fresh_only: bool) -> Option<VerifyKey> {
        let c = self.cache.read().unwrap_or_else(|p| p.into_inner());
        if fresh_only && c.fetched_at.is_none_or(|at| at.elapsed() >= KEYS_MAX_AGE) {
            return None;
        }
        c.keys.iter().find(|(k, _)| k == kid).map(|(_, key)| key.clone())
    }

    /// The key named `kid`: `Ok(None)` if the issuer does not have it, `Err(KeysUnavailable)`
    /// if its keys could not be fetched.
    pub(crate) async fn key(&self, kid: &str, http: &reqwest::Client) -> Result<Option<VerifyKey>, VerifyError> {
        if let Some(k) = self.cached(kid, true) {
            return Ok(Some(k));
        }
        let _one_fetch = self.refresh.lock().await;
        if let Some(k) = self.cached(kid, true) {
            return Ok(Some(k));
        }
        let may_fetch = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .attempted_at
            .is_none_or(|t| t.elapsed() >= self.min_refetch);
        if may_fetch {
            let result = self.fetch(http).await;
            let mut c = self.cache.write().unwrap_or_else(|p| p.into_inner());
            c.attempted_at = Some(Instant::now());
            match result {
                Ok(keys) => {
                    c.keys = keys;
                    c.fetched_at = Some(Instant::now());
                    c.failed = false;
                }
                Err(e) => {
                    tracing::warn!(source = ?self.source, error = %e, "cannot fetch the keys of a trusted issuer");
                    c.failed = true;
                    // Read the discovery document again next time: the JWKS may have moved.
                    c.jwks_uri = None;
                }
            }
        }
        if let Some(k) = self.cached(kid, false) {
            return Ok(Some(k));
        }
        let c = self.cache.read().unwrap_or_else(|p| p.into_inner());
        if c.failed && c.fetched_at.is_none() { Err(VerifyError::KeysUnavailable) } else { Ok(None) }
    }

    async fn fetch(&self, http: &reqwest::Client) -> Result<Vec<(String, VerifyKey)>, String> {
        let url = match &self.source {
            KeySource::Jwks(url) => url.clone(),
            KeySource::Discovery { issuer } => self.jwks_uri(issuer, http).await?,
        };
        let jwks = get_json(http, &url).await?;
        let keys = jwks.get("keys").and_then(Value::as_array).ok_or("the JWKS has no \"keys\" array")?;
        Ok(keys.iter().filter_map(VerifyKey::from_jwk).collect())
    }

    async fn jwks_uri(&self, issuer: &str, http: &reqwest::Client) -> Result<String, String> {
        if let Some((uri, at)) = &self.cache.read().unwrap_or_else(|p| p.into_inner()).jwks_uri
            && at.elapsed() < DISCOVERY_MAX_AGE
        {
            return Ok(uri.clone());
        }
        let url = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
        let doc = get_json(http, &url).await?;
        if doc.get("issuer").and_then(Value::as_str) != Some(issuer) {
            return Err(format!("the discovery document at {url} names another issuer"));
        }
        let uri = doc.get("jwks_uri").and_then(Value::as_str).ok_or("the discovery document has no jwks_uri")?;
        check_url(uri).map_err(|e| format!("jwks_uri: {e}"))?;
        self.cache.write().unwrap_or_else(|p| p.into_inner()).jwks_uri = Some((uri.to_owned(), Instant::now()));
        Ok(uri.to_owned())
    }
}

/// GETs a JSON document of bounded size.
async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, String> {
    let mut resp = http
        .get(url)
        .header(http::header::ACCEPT, "application/json")
        .timeout(FETCH_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {url}: HTTP {}", resp.status()));
    }
    if resp.content_length().is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64) {
        return Err(format!("GET {url}: document too large"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("GET {url}: {e}"))? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(format!("GET {url}: document too large"));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|_| format!("GET {url}: not JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust(issuer: &str) -> OidcTrust {
        OidcTrust { issuer: issuer.into(), subaccount: "sub".into(), audiences: vec![] }
    }

    #[test]
    fn issuer_urls_must_be_https_except_on_loopback() {
        for ok in
            ["https://idp.example", "https://idp.example/realms/x", "http://127.0.0.1:4000", "http://localhost:1/a"]
        {
            assert!(OidcIssuer::new(trust(ok)).is_ok(), "{ok}");
        }
        for (bad, err) in [
            ("http://idp.example", TrustConfigError::Insecure("http://idp.example".into())),
            ("http://10.0.0.1", TrustConfigError::Insecure("http://10.0.0.1".into())),
            ("ftp://localhost", TrustConfigError::Insecure("ftp://localhost".into())),
            ("idp.example", TrustConfigError::NotAUrl("idp.example".into())),
            ("https://idp.example/?a=b", TrustConfigError::Extra("https://idp.example/?a=b".into())),
            ("https://u:p@idp.example", TrustConfigError::Extra("https://u:p@idp.example".into())),
        ] {
            assert_eq!(OidcIssuer::new(trust(bad)).unwrap_err(), err, "{bad}");
        }
        let no_sub = OidcTrust { subaccount: " ".into(), ..trust("https://idp.example") };
        assert!(matches!(OidcIssuer::new(no_sub), Err(TrustConfigError::NoSubaccount(_))));
    }
}
