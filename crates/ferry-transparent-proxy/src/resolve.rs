//! Destination lookups through the Destination Service's find API, cached for two minutes
//! (SPEC §5.2) under a key made of everything that changes the answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_client::{Client, ClientError, DestinationBinding, Hop, Tenant};
use ferry_core::Secret;
use http::StatusCode;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::error::{Origin, ProxyError};
use crate::resource::Level;

/// SAP's Transparent Proxy keeps destinations this long.
pub const CACHE_TTL: Duration = Duration::from_secs(120);
/// Entries at which expired ones are swept.
const SWEEP_AT: usize = 1024;
const FIND_TIMEOUT: Duration = Duration::from_secs(10);

/// One find call's inputs.
#[derive(Clone, Debug, Default)]
pub struct Lookup {
    pub name: String,
    pub level: Option<Level>,
    pub fragment: Option<String>,
    /// Sent as `X-fragment-name: <fragment>@<level>` on the v2 find API.
    pub fragment_level: Option<Level>,
    pub fragment_optional: Option<bool>,
    pub chain: Option<(String, Vec<(String, String)>)>,
    /// Tenant of the service token (shared tenant mode): `X-Tenant-Id`, `X-Tenant-Subdomain`
    /// or a per-tenant endpoint's subdomain.
    pub tenant: Option<Tenant>,
    /// Headers for the find call (`X-user-token`, `X-tenant`, `X-subject-token`, …); they may
    /// hold tokens, so only their hash goes into the cache key.
    pub headers: Vec<(&'static str, Secret<String>)>,
    /// `metadata.name` of the resource, for error messages.
    pub resource: String,
}

/// A find answer: the destination's properties, the header its first token gives, and the
/// client certificate of a ClientCertificateAuthentication destination.
#[derive(Clone)]
pub struct Resolved {
    pub config: Map<String, Value>,
    pub auth_header: Option<(String, Secret<String>)>,
    pub client_cert: Option<ClientCert>,
}

/// A PEM keystore (certificate chain and private key) from the find answer's `certificates`.
#[derive(Clone)]
pub struct ClientCert {
    pub pem: Secret<String>,
    /// SHA-256 of the PEM: connections made with this certificate are pooled under it.
    pub hash: [u8; 32],
}

/// The keystore `KeyStoreLocation` names, from the find answer's `certificates`: PEM, or P12/PFX
/// or JKS opened with `KeyStorePassword`; kept as PEM (chain, then key), the form TLS reads.
fn client_cert(name: &str, config: &Map<String, Value>, body: &Value) -> Result<Option<ClientCert>, String> {
    use base64::Engine;
    use ferry_core::keystore;
    if config.get("Authentication").and_then(Value::as_str) != Some("ClientCertificateAuthentication") {
        return Ok(None);
    }
    let location =
        config.get("KeyStoreLocation").and_then(Value::as_str).filter(|l| !l.is_empty()).ok_or_else(|| {
            format!("destination '{name}' uses ClientCertificateAuthentication but has no KeyStoreLocation")
        })?;
    let entry = body
        .get("certificates")
        .and_then(Value::as_array)
        .and_then(|all| all.iter().find(|c| c.get("Name").and_then(Value::as_str) == Some(location)))
        .ok_or_else(|| {
            format!("the keystore '{location}' of destination '{name}' is not in the answer's certificates")
        })?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(entry.get("Content").and_then(Value::as_str).unwrap_or_default().trim())
        .map_err(|_| format!("the keystore '{location}' of destination '{name}' is not base64"))?;
    let format = keystore::Format::from_type_or_name(entry.get("Type").and_then(Value::as_str), location);
    let password = config.get("KeyStorePassword").and_then(Value::as_str).filter(|p| !p.is_empty());
    let store = keystore::decode(&bytes, format, password)
        .map_err(|e| format!("the keystore '{location}' of destination '{name}' cannot be opened: {e}"))?;
    if store.key_entry().is_none() {
        return Err(format!("the keystore '{location}' of destination '{name}' holds no private key"));
    }
    let pem = store.to_pem();
    let hash = Sha256::digest(pem.expose().as_bytes()).into();
    Ok(Some(ClientCert { pem, hash }))
}

impl Resolved {
    pub fn prop(&self, key: &str) -> Option<&str> {
        self.config.get(key).and_then(Value::as_str)
    }
}

/// A cached answer and when it expires.
type Entry = (Arc<Resolved>, Instant);

pub struct Resolver {
    client: Client,
    binding: DestinationBinding,
    http: reqwest::Client,
    cache: Mutex<HashMap<[u8; 32], Entry>>,
}

impl Resolver {
    pub fn new(client: Client, ca_pem: Option<&str>) -> Result<Self, crate::TpError> {
        let binding = client.bindings().destination()?;
        Ok(Self { client, binding, http: ferry_core::tls::http_client(ca_pem)?, cache: Mutex::new(HashMap::new()) })
    }

    /// The destination, from the cache or the find API; `with_tokens: false` asks the service
    /// not to fetch tokens (`$skipTokenRetrieval`), which is enough to learn type and routing.
    pub async fn resolve(&self, lookup: &Lookup, with_tokens: bool) -> Result<Arc<Resolved>, ProxyError> {
        let key = cache_key(lookup, with_tokens);
        if let Some((hit, until)) = self.cache.lock().await.get(&key)
            && Instant::now() < *until
        {
            return Ok(hit.clone());
        }
        let (resolved, ttl) = self.find(lookup, with_tokens).await?;
        let resolved = Arc::new(resolved);
        let mut cache = self.cache.lock().await;
        if cache.len() >= SWEEP_AT {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
        }
        cache.insert(key, (resolved.clone(), Instant::now() + ttl));
        Ok(resolved)
    }

    async fn find(&self, lookup: &Lookup, with_tokens: bool) -> Result<(Resolved, Duration), ProxyError> {
        // A fragment's own level exists only in the v2 API, which never falls back between
        // levels; without a destination level, look where v1 would: instance, then subaccount.
        if lookup.level.is_none() && lookup.fragment_level.is_some() {
            let at_instance = Lookup { level: Some(Level::Instance), ..lookup.clone() };
            match self.find_at(&at_instance, with_tokens).await {
                Err(e) if e.internal == Some(404) => {}
                other => return other,
            }
            let at_subaccount = Lookup { level: Some(Level::Subaccount), ..lookup.clone() };
            return self.find_at(&at_subaccount, with_tokens).await;
        }
        self.find_at(lookup, with_tokens).await
    }

    async fn find_at(&self, lookup: &Lookup, with_tokens: bool) -> Result<(Resolved, Duration), ProxyError> {
        let token = self.client.destination_service_token_for(lookup.tenant.as_ref()).await.map_err(token_error)?;
        let name = &lookup.name;
        let mut url = match lookup.level {
            None => format!("{}/destination-configuration/v1/destinations/{name}", self.binding.uri),
            Some(l) => format!("{}/destination-configuration/v2/destinations/{name}@{}", self.binding.uri, l.as_str()),
        };
        if !with_tokens {
            url.push_str("?$skipTokenRetrieval=true");
        }
        let mut req =
            self.http.get(&url).bearer_auth(token.expose()).header("accept", "application/json").timeout(FIND_TIMEOUT);
        if let Some(f) = &lookup.fragment {
            req = match lookup.fragment_level {
                Some(l) => req.header("X-fragment-name", format!("{f}@{}", l.as_str())),
                None => req.header("X-fragment-name", f),
            };
            if let Some(o) = lookup.fragment_optional {
                req = req.header("X-fragment-optional", if o { "true" } else { "false" });
            }
        }
        if let Some((chain, vars)) = &lookup.chain {
            req = req.header("X-chain-name", chain);
            for (k, v) in vars {
                req = req.header(format!("X-chain-var-{k}"), v);
            }
        }
        if with_tokens {
            for (k, v) in &lookup.headers {
                req = req.header(*k, v.expose());
            }
        }
        let resp = req.send().await.map_err(|e| {
            ProxyError::new(
                StatusCode::BAD_GATEWAY,
                Origin::DestinationService,
                format!("Failed to reach the Destination Service: {}", without_url(&e)),
            )
        })?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status == reqwest::StatusCode::NOT_FOUND {
            let tenant = lookup.tenant.as_ref().map_or("provider", tenant_name);
            let message = if lookup.resource.is_empty() {
                format!("Destination '{name}' is not found in tenant '{tenant}'.")
            } else {
                format!(
                    "Destination '{name}' referred in Destination CR '{}' is not found in tenant '{tenant}'.",
                    lookup.resource
                )
            };
            return Err(ProxyError::new(StatusCode::BAD_GATEWAY, Origin::DestinationService, message).internal(404));
        }
        if status == reqwest::StatusCode::BAD_REQUEST {
            return Err(ProxyError::new(
                StatusCode::BAD_REQUEST,
                Origin::DestinationService,
                "Destination service returned unsuccessful status code. Check your related request headers.",
            )
            .internal(400));
        }
        if !status.is_success() {
            return Err(ProxyError::new(
                StatusCode::BAD_GATEWAY,
                Origin::DestinationService,
                format!("Destination service returned unsuccessful status code {}.", status.as_u16()),
            )
            .internal(status.as_u16()));
        }
        let invalid = |why: &str| {
            ProxyError::new(
                StatusCode::BAD_GATEWAY,
                Origin::DestinationService,
                format!("Received invalid configuration from Destination Service for destination '{name}': {why}"),
            )
        };
        let config = body
            .get("destinationConfiguration")
            .and_then(Value::as_object)
            .cloned()
            .ok_or_else(|| invalid("no destinationConfiguration"))?;
        let mut ttl = CACHE_TTL;
        let mut auth_header = None;
        if let Some(first) = body.get("authTokens").and_then(Value::as_array).and_then(|t| t.first()) {
            if let Some(err) = first.get("error").and_then(Value::as_str).filter(|e| !e.is_empty()) {
                return Err(ProxyError::new(
                    StatusCode::BAD_GATEWAY,
                    Origin::DestinationService,
                    format!("Invalid OAuth configuration in destination '{name}': {err}"),
                ));
            }
            let header = first.get("http_header");
            let key = header.and_then(|h| h.get("key")).and_then(Value::as_str);
            let value = header.and_then(|h| h.get("value")).and_then(Value::as_str);
            match (key, value) {
                (Some(k), Some(v)) => auth_header = Some((k.to_owned(), Secret::new(v.to_owned()))),
                _ => return Err(invalid("authTokens[0] has no http_header")),
            }
            // A token that expires sooner than the cache entry must not outlive it.
            let expires_in = match first.get("expires_in") {
                Some(Value::String(s)) => s.parse::<u64>().ok(),
                Some(Value::Number(n)) => n.as_u64(),
                _ => None,
            };
            if let Some(secs) = expires_in {
                ttl = ttl.min(Duration::from_secs(secs.saturating_sub(30)));
            }
        }
        let client_cert = client_cert(name, &config, &body).map_err(|why| invalid(&why))?;
        Ok((Resolved { config, auth_header, client_cert }, ttl))
    }
}

fn token_error(e: ClientError) -> ProxyError {
    match &e {
        ClientError::Hop { hop: Hop::TokenService, status: Some(s), .. } => ProxyError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Origin::Xsuaa,
            format!("Failed to get a token for the Destination Service: {e}"),
        )
        .internal(*s),
        _ => ProxyError::new(
            StatusCode::BAD_GATEWAY,
            Origin::Xsuaa,
            format!("Failed to get a token for the Destination Service: {e}"),
        ),
    }
}

/// reqwest's error text without the URL (which may carry a query the caller sent).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "<url>");
    }
    if let Some(src) = std::error::Error::source(e) {
        s.push_str(&format!(": {src}"));
    }
    s
}

/// The tenant as the request named it.
pub(crate) fn tenant_name(t: &Tenant) -> &str {
    match t {
        Tenant::Id(t) | Tenant::Subdomain(t) => t,
    }
}

fn cache_key(l: &Lookup, with_tokens: bool) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |s: &str| {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    };
    field(&l.name);
    field(l.level.map(Level::as_str).unwrap_or("-"));
    field(l.fragment.as_deref().unwrap_or("-"));
    field(l.fragment_level.map(Level::as_str).unwrap_or("-"));
    field(match l.fragment_optional {
        None => "-",
        Some(true) => "t",
        Some(false) => "f",
    });
    field(match &l.tenant {
        None => "-",
        Some(Tenant::Id(_)) => "id",
        Some(Tenant::Subdomain(_)) => "subdomain",
    });
    field(l.tenant.as_ref().map_or("-", tenant_name));
    field(if with_tokens { "tokens" } else { "skip" });
    if let Some((chain, vars)) = &l.chain {
        field(chain);
        for (k, v) in vars {
            field(k);
            field(v);
        }
    }
    if with_tokens {
        for (k, v) in &l.headers {
            field(k);
            field(v.expose());
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_changes_with_every_input() {
        let base = Lookup { name: "d".into(), ..Default::default() };
        let k = cache_key(&base, true);
        let variants = [
            Lookup { name: "e".into(), ..base.clone() },
            Lookup { level: Some(Level::Instance), ..base.clone() },
            Lookup { fragment: Some("f".into()), ..base.clone() },
            Lookup { fragment_optional: Some(true), ..base.clone() },
            Lookup { fragment_level: Some(Level::Subaccount), ..base.clone() },
            Lookup { tenant: Some(Tenant::Id("t".into())), ..base.clone() },
            Lookup { tenant: Some(Tenant::Subdomain("t".into())), ..base.clone() },
            Lookup { chain: Some(("c".into(), vec![])), ..base.clone() },
            Lookup { headers: vec![("X-user-token", Secret::new("jwt".into()))], ..base.clone() },
        ];
        for v in &variants {
            assert_ne!(cache_key(v, true), k, "{v:?}");
        }
        assert_ne!(cache_key(&base, false), k);
        // Token headers do not matter when tokens are not fetched.
        assert_eq!(cache_key(&variants[8], false), cache_key(&base, false));
    }
}
