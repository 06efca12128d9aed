//! Client authentication by a signed JWT (RFC 7523 §2.2, OIDC `private_key_jwt`): instead of a
//! secret the client sends `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`
//! and a `client_assertion` it signed with a key it registered ([`OAuthClient::assertion_keys`],
//! or the certificate of its X.509 service key), or a token of an issuer the client trusts
//! ([`OAuthClient::federated_assertions`]). SAP's Destination Service sends one for
//! OAuth2ClientCredentials destinations with `X-client-assertion` or an assertion provider
//! destination (SPEC §2.5).

use std::sync::Arc;

use serde_json::{Map, Value};

use super::config::OAuthClient;
use super::http::OAuthError;
use super::{TenantState, TokenService};
use crate::jwt::{LEEWAY_SECS, VerifyError, VerifyKey, verify_client_assertion};

/// The one assertion type accepted; SAML 2.0 bearer client assertions are not.
pub(crate) const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The longest `exp - now` an assertion may have. An assertion proves possession of the key at
/// one moment; a long-lived one is a bearer secret that leaks like a password.
pub const MAX_CLIENT_ASSERTION_LIFETIME_SECS: u64 = 600;

/// The zone under which client assertions are remembered in the replay cache shared with
/// SAML bearer assertions; no tenant id can be empty, so the two never collide.
const REPLAY_ZONE: &str = "";

impl TokenService {
    /// The client a `client_assertion` authenticates. Every failure is `401 invalid_client`
    /// with a reason the client's developer can act on (RFC 7523 §3.2).
    pub(super) fn check_client_assertion(
        &self,
        claimed_id: Option<&str>,
        assertion_type: &str,
        assertion: &str,
    ) -> Result<Arc<OAuthClient>, OAuthError> {
        let fail = |d: String| OAuthError::invalid_client(d, false);
        if assertion_type != JWT_BEARER_ASSERTION {
            return Err(fail(format!(
                "client_assertion_type {assertion_type:?} is not supported; use {JWT_BEARER_ASSERTION}"
            )));
        }
        let unverified =
            unverified_claims(assertion).ok_or_else(|| fail("client_assertion is not a well-formed JWT".into()))?;
        let claim = |name: &str| unverified.get(name).and_then(Value::as_str);
        let Some(iss) = claim("iss").filter(|i| !i.is_empty()) else {
            return Err(fail("client_assertion lacks the iss claim (it must be the client_id)".into()));
        };
        let id = claimed_id.unwrap_or(iss);
        let client = self.client(id).ok_or_else(|| fail("Bad credentials".into()))?;
        // Signed by the client itself (iss = client_id), or a token of an issuer it trusts.
        let (keys, audiences, single_use) = if iss == id {
            let keys = self.assertion_keys(&client);
            if keys.is_empty() {
                return Err(fail(format!(
                    "client {id:?} has no key registered for client assertions; authenticate with its secret or \
                     certificate"
                )));
            }
            if claim("sub") != Some(id) {
                return Err(fail(format!("client_assertion sub must be the client_id {id:?}")));
            }
            (keys, self.assertion_audiences(), true)
        } else {
            let from_issuer: Vec<_> = client.federated_assertions.iter().filter(|f| f.issuer == iss).collect();
            if from_issuer.is_empty() {
                return Err(fail(format!(
                    "client_assertion iss {iss:?} is neither the client_id {id:?} nor an issuer the client trusts"
                )));
            }
            let sub = claim("sub").unwrap_or_default();
            let trusted: Vec<_> = from_issuer.into_iter().filter(|f| f.subject == sub).collect();
            if trusted.is_empty() {
                return Err(fail(format!(
                    "client_assertion sub {sub:?} is not a subject client {id:?} trusts from issuer {iss:?}"
                )));
            }
            let keys = trusted.iter().filter_map(|f| VerifyKey::from_registered(&f.keys).ok()).flatten().collect();
            let audiences = trusted.iter().map(|f| f.audience.clone().unwrap_or_else(|| id.to_owned())).collect();
            // Not single-use: this is another service's access token, which its holder (the
            // Destination Service, for an assertion provider destination) caches and presents
            // again until it expires, as IAS and Entra ID accept federated tokens. Its
            // lifetime is bounded below instead.
            (keys, audiences, false)
        };
        let claims = verify_client_assertion(assertion, &keys).map_err(|e| {
            fail(match e {
                VerifyError::Algorithm => {
                    "client_assertion must be signed with RS256 or ES256 by a key registered for the client".into()
                }
                VerifyError::Signature | VerifyError::UnknownKey => {
                    format!("client_assertion signature does not verify with the keys registered for client {id:?}")
                }
                other => format!("client_assertion: {other}"),
            })
        })?;
        self.check_assertion_claims(iss, &audiences, single_use, &claims).map_err(fail)?;
        Ok(client)
    }

    /// The claims of RFC 7523 §3 that a signature cannot vouch for.
    fn check_assertion_claims(
        &self,
        iss: &str,
        accepted: &[String],
        single_use: bool,
        claims: &Map<String, Value>,
    ) -> Result<(), String> {
        let claim = |name: &str| claims.get(name).and_then(Value::as_str);
        let auds: Vec<&str> = match claims.get("aud") {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !auds.iter().any(|a| accepted.iter().any(|x| x == a.trim_end_matches('/'))) {
            return Err(format!("client_assertion aud {auds:?} names none of {accepted:?}"));
        }
        let now = self.now();
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| "client_assertion lacks the exp claim".to_owned())?;
        if now >= exp.saturating_add(LEEWAY_SECS) {
            return Err("client_assertion has expired".into());
        }
        if exp > now.saturating_add(MAX_CLIENT_ASSERTION_LIFETIME_SECS + LEEWAY_SECS) {
            return Err(format!(
                "client_assertion expires too late: exp may be at most {MAX_CLIENT_ASSERTION_LIFETIME_SECS} s ahead"
            ));
        }
        if claims.get("nbf").and_then(Value::as_u64).is_some_and(|nbf| nbf > now.saturating_add(LEEWAY_SECS)) {
            return Err("client_assertion is not valid yet (nbf)".into());
        }
        if !single_use {
            return Ok(());
        }
        let Some(jti) = claim("jti").filter(|j| !j.is_empty()) else {
            return Err("client_assertion lacks the jti claim (a unique id, as it is single-use)".into());
        };
        if !self.first_use_of_assertion(REPLAY_ZONE, iss, jti, exp.saturating_add(LEEWAY_SECS)) {
            return Err(format!("client_assertion jti {jti:?} was used before; sign a new assertion per request"));
        }
        Ok(())
    }

    /// Where an assertion may be addressed: the token endpoint on either listener, or the issuer
    /// of any zone (OIDC allows the issuer; RFC 7523 the token endpoint). Without a trailing `/`.
    fn assertion_audiences(&self) -> Vec<String> {
        let mut out = vec![
            self.public_url.clone(),
            format!("{}/oauth/token", self.public_url),
            format!("https://{}", self.uaadomain.full),
            format!("https://{}/oauth/token", self.uaadomain.full),
        ];
        for t in self.tenants_snapshot() {
            let t: &TenantState = &t;
            out.push(t.issuer.clone());
            if let Some(base) = t.issuer.strip_suffix("/oauth/token") {
                out.push(base.to_owned());
            }
        }
        out.dedup();
        out
    }

    /// The client's registered keys plus those of the certificates issued to it.
    fn assertion_keys(&self, client: &OAuthClient) -> Vec<VerifyKey> {
        let mut keys: Vec<VerifyKey> =
            client.assertion_keys.iter().filter_map(|k| VerifyKey::from_registered(k).ok()).flatten().collect();
        let issued = self.issued_certificates.read().unwrap_or_else(|p| p.into_inner());
        if let Some(pems) = issued.get(&client.client_id) {
            keys.extend(pems.iter().filter_map(|k| VerifyKey::from_registered(k).ok()).flatten());
        }
        keys
    }
}

/// The payload of a compact JWS, before any check: only to find the client whose keys verify it.
fn unverified_claims(token: &str) -> Option<Map<String, Value>> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}
