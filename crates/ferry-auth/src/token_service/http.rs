//! The HTTP edge: request parsing, client authentication, tenant addressing, the grants, and
//! OAuth2 error responses.
//!
//! Every failure becomes an RFC 6749 §5.2 error object because SAP's clients surface
//! `error_description` to the developer; a bare status would leave them guessing which of
//! client, secret, zone or grant was wrong.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use base64::Engine;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HOST, PRAGMA, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use serde_json::{Value, json};

use super::claims::UserIdentity;
use super::config::{
    GRANT_AUTHORIZATION_CODE, GRANT_CLIENT_CREDENTIALS, GRANT_JWT_BEARER, GRANT_PASSWORD, GRANT_REFRESH_TOKEN,
    GRANT_SAML2_BEARER, GRANT_TOKEN_EXCHANGE, OAuthClient, SUPPORTED_GRANT_TYPES, TOKEN_TYPE_ACCESS, TOKEN_TYPE_ID,
    TOKEN_TYPE_JWT, TOKEN_TYPE_SAML2, User,
};
use super::mtls::{PeerIdentity, TlsInfo};
use super::refresh::RefreshGrant;
use super::users::Login;
use super::{Issued, TenantState, TokenService, authorize, user_scopes};

/// Far above any real token request (a jwt-bearer assertion is at most 16 KiB), far below
/// what would let a client make the service buffer a lot.
const MAX_BODY: usize = 64 * 1024;

/// An OAuth2 error response (RFC 6749 §5.2).
#[derive(Debug)]
pub(crate) struct OAuthError {
    status: StatusCode,
    pub error: &'static str,
    pub description: String,
    /// RFC 6749 requires a `WWW-Authenticate` challenge when HTTP Basic authentication failed.
    basic_challenge: bool,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Self { status, error, description: description.into(), basic_challenge: false }
    }
    pub(crate) fn invalid_request(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", d)
    }
    pub(crate) fn invalid_client(d: impl Into<String>, basic: bool) -> Self {
        Self { basic_challenge: basic, ..Self::new(StatusCode::UNAUTHORIZED, "invalid_client", d) }
    }
    pub(crate) fn invalid_grant(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", d)
    }
    /// A user store (LDAP) cannot be asked right now: the client may retry (RFC 6749 §4.1.2.1).
    pub(crate) fn temporarily_unavailable(d: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", d)
    }
    fn invalid_scope(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_scope", d)
    }
    /// A wrong client secret or user password (what guessing produces).
    fn is_bad_credentials(&self) -> bool {
        self.error == "invalid_client" || (self.error == "invalid_grant" && self.description == "Bad credentials")
    }
    fn missing(param: &str) -> Self {
        Self::invalid_request(format!("missing required parameter: {param}"))
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.error, "error_description": self.description});
        let mut resp = (self.status, axum::Json(body)).into_response();
        no_store(resp.headers_mut());
        if self.basic_challenge {
            resp.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"ferry\""));
        }
        resp
    }
}

/// Token responses and errors must not be cached by intermediaries (RFC 6749 §5.1).
fn no_store(h: &mut HeaderMap) {
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(PRAGMA, HeaderValue::from_static("no-cache"));
}

impl TokenService {
    /// The token service's routes; the same router serves the HTTP and the HTTPS listener.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/oauth/token", post(token_endpoint))
            .route("/oauth/authorize", get(authorize::authorize))
            .route("/login", post(authorize::login))
            .route("/token_keys", get(token_keys))
            .route("/.well-known/openid-configuration", get(openid_configuration))
            .route("/healthz", get(|| async { "ok" }))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(self.clone())
    }

    /// The tenant a request addresses explicitly, if any: `x-zid` (how xssec addresses a zone
    /// at `https://{uaadomain}`), else a `Host` of the form `{subdomain}.{uaadomain host}`. A
    /// host that names no configured subdomain addresses nothing, because the provider URL
    /// itself may well have that shape. An IP `uaadomain` cannot take a subdomain in a URL, so
    /// there the `Host` header alone carries it (`ferry-client`'s `Tenant::Subdomain` sends it);
    /// no provider URL has that shape.
    pub(super) fn addressed_tenant(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
    ) -> Result<Option<Arc<TenantState>>, OAuthError> {
        if let Some(v) = headers.get("x-zid") {
            let zid = v.to_str().map_err(|_| OAuthError::invalid_request("x-zid header is not valid text"))?.trim();
            if !zid.is_empty() {
                return self
                    .tenant_by_id(zid)
                    .map(Some)
                    .ok_or_else(|| OAuthError::invalid_request(format!("unknown zone {zid:?} (x-zid)")));
            }
        }
        let host = if self.uaadomain.is_name {
            uri.host().or_else(|| headers.get(HOST).and_then(|h| h.to_str().ok()))
        } else {
            headers.get(HOST).and_then(|h| h.to_str().ok())
        };
        let Some(host) = host.map(strip_port) else { return Ok(None) };
        let host = host.to_ascii_lowercase();
        let sub = host.strip_suffix(self.uaadomain.host.as_str()).and_then(|s| s.strip_suffix('.'));
        match sub {
            // Only a client addressing a tenant sends such a host: an unknown one is an error,
            // not the client's own zone.
            Some(s) if !self.uaadomain.is_name => self
                .tenant_by_subdomain(s)
                .map(Some)
                .ok_or_else(|| OAuthError::invalid_request(format!("unknown subdomain {s:?} (Host)"))),
            _ => Ok(sub.and_then(|s| self.tenant_by_subdomain(s))),
        }
    }

    /// The tenant whose metadata (keys, OpenID configuration) a request asks for: `?zid=` as
    /// xssec sends it, else the addressed tenant, else the first one (the provider).
    fn metadata_tenant(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        query: Option<&str>,
    ) -> Result<Arc<TenantState>, OAuthError> {
        let zid = query.and_then(|q| {
            form_urlencoded::parse(q.as_bytes()).find(|(k, v)| k == "zid" && !v.is_empty()).map(|(_, v)| v)
        });
        if let Some(zid) = zid {
            // xssec reads a 400 here as "the token's zone is not ours" (wrong audience).
            return self.tenant_by_id(&zid).ok_or_else(|| OAuthError::invalid_request(format!("unknown zone {zid:?}")));
        }
        match self.addressed_tenant(headers, uri)? {
            Some(t) => Ok(t),
            None => self.first_tenant().ok_or_else(|| OAuthError::invalid_request("no zone configured")),
        }
    }

    /// Authenticates the client by HTTP Basic, by `client_id`/`client_secret` in the body
    /// (xssec always uses the body; curl users and other OAuth libraries tend to use Basic), or
    /// by `client_id` alone plus a TLS client certificate bound to that client (xssec's X.509
    /// credentials).
    async fn authenticate(
        &self,
        headers: &HeaderMap,
        params: &Params,
        tls: Option<&TlsInfo>,
    ) -> Result<Arc<OAuthClient>, OAuthError> {
        let assertion = (params.get("client_assertion_type"), params.get("client_assertion"));
        if assertion != (None, None) {
            let (Some(kind), Some(assertion)) = assertion else {
                return Err(OAuthError::invalid_request(
                    "client_assertion and client_assertion_type must be sent together",
                ));
            };
            if headers.contains_key(AUTHORIZATION) || params.get("client_secret").is_some() {
                return Err(OAuthError::invalid_request(
                    "a client_assertion authenticates the client alone: send no client_secret or Basic credentials \
                     with it",
                ));
            }
            return self.check_client_assertion(params.get("client_id"), kind, assertion);
        }
        if let Some(candidates) = basic_credentials(headers)? {
            if params.get("client_secret").is_some() {
                return Err(OAuthError::invalid_request(
                    "client credentials given both in the Authorization header and in the body",
                ));
            }
            let mut found = None;
            for (id, secret) in &candidates {
                if let Some(c) = self.check_client(id, secret).await {
                    found = Some(c);
                    break;
                }
            }
            let client = found.ok_or_else(|| OAuthError::invalid_client("Bad credentials", true))?;
            if params.get("client_id").is_some_and(|id| id != client.client_id) {
                return Err(OAuthError::invalid_request("client_id in the body differs from the Basic credentials"));
            }
            return Ok(client);
        }
        let Some(id) = params.get("client_id") else {
            return Err(OAuthError::invalid_client(
                "client authentication missing: send client_id and client_secret, or HTTP Basic",
                false,
            ));
        };
        let Some(secret) = params.get("client_secret") else {
            return self.check_client_certificate(id, tls);
        };
        self.check_client(id, secret).await.ok_or_else(|| OAuthError::invalid_client("Bad credentials", false))
    }

    /// The client if the connection's verified client certificate is bound to it.
    fn check_client_certificate(&self, id: &str, tls: Option<&TlsInfo>) -> Result<Arc<OAuthClient>, OAuthError> {
        let Some(cert) = tls.and_then(|t| t.peer_certificate.as_ref()) else {
            return Err(OAuthError::invalid_client(
                "missing client_secret, and no client certificate was presented \
                 (certificate authentication works on the HTTPS endpoint only)",
                false,
            ));
        };
        let peer = PeerIdentity::of(cert);
        match (self.client(id), peer) {
            (Some(client), Some(peer)) if self.accepts_certificate(&client, &peer) => Ok(client),
            _ => Err(OAuthError::invalid_client(
                "Bad credentials: the client certificate does not belong to this client",
                false,
            )),
        }
    }

    /// The client if `secret` is its secret. An unknown client still costs a comparison, so
    /// that response time does not tell which client ids exist.
    async fn check_client(&self, id: &str, secret: &str) -> Option<Arc<OAuthClient>> {
        match self.client(id) {
            Some(c) => self.secret_ok(&c, secret).await.then_some(c),
            None => {
                secret_matches("", secret);
                None
            }
        }
    }

    async fn token(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        body: &[u8],
        tls: Option<&TlsInfo>,
    ) -> Result<Issued, OAuthError> {
        require_form(headers)?;
        let params = Params::parse(body)?;
        let client = self.authenticate(headers, &params, tls).await?;
        let client = &*client;
        let addressed = self.addressed_tenant(headers, uri)?;
        let grant = params.get("grant_type").ok_or_else(|| OAuthError::missing("grant_type"))?;
        if !SUPPORTED_GRANT_TYPES.contains(&grant) {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                format!("grant type {grant:?} is not supported; supported: {}", SUPPORTED_GRANT_TYPES.join(", ")),
            ));
        }
        if !client.allows_grant(grant) {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                format!("client {:?} may not use grant type {grant:?}", client.client_id),
            ));
        }
        let issued = match grant {
            GRANT_CLIENT_CREDENTIALS => {
                let tenant = match addressed {
                    Some(t) => t,
                    None => self.own_tenant(client)?,
                };
                let scopes = narrow(&client.authorities, params.get("scope"))?;
                self.dedicated_zone(client, &tenant)?;
                self.issue(&tenant, client, GRANT_CLIENT_CREDENTIALS, scopes, None, false)
            }
            GRANT_PASSWORD => {
                let username = params.get("username").ok_or_else(|| OAuthError::missing("username"))?;
                let password = params.get("password").ok_or_else(|| OAuthError::missing("password"))?;
                let login = Login {
                    username,
                    password,
                    tenant: addressed.as_ref().map(|t| t.tenant.id.as_str()),
                    preferred_tenant: &client.tenant_id,
                };
                let user = self
                    .login_user(login)
                    .await
                    .map_err(|e| OAuthError::temporarily_unavailable(e.to_string()))?
                    .ok_or_else(|| OAuthError::invalid_grant("Bad credentials"))?;
                let tenant = self
                    .tenant_by_id(&user.tenant_id)
                    .ok_or_else(|| OAuthError::invalid_grant("the user's zone is not configured"))?;
                let scopes = narrow(&user_scopes(client, Some(&user)), params.get("scope"))?;
                let identity = UserIdentity::from_user(&user, self.now());
                self.dedicated_zone(client, &tenant)?;
                self.issue(&tenant, client, GRANT_PASSWORD, scopes, Some(&identity), true)
            }
            GRANT_JWT_BEARER => {
                let assertion = params.get("assertion").ok_or_else(|| OAuthError::missing("assertion"))?;
                let (tenant, identity) = self.check_assertion(assertion, addressed).await?;
                // A configured user's grants are looked up again. Anyone else (a user of a
                // user store such as LDAP) keeps what the assertion was granted, so that an
                // exchange never widens a user's scopes.
                let carried;
                let user = match self.user_by_id(&tenant.tenant.id, &identity.user_id) {
                    Some(u) => Some(u),
                    None => {
                        carried = self.grants_of_assertion(assertion);
                        Some(&carried)
                    }
                };
                let scopes = narrow(&user_scopes(client, user), params.get("scope"))?;
                self.dedicated_zone(client, &tenant)?;
                self.issue(&tenant, client, GRANT_JWT_BEARER, scopes, Some(&identity), true)
            }
            GRANT_SAML2_BEARER => {
                let assertion = params.get("assertion").ok_or_else(|| OAuthError::missing("assertion"))?;
                let tenant = match addressed {
                    Some(t) => t,
                    None => self.own_tenant(client)?,
                };
                let (identity, user) = self.check_saml_assertion(assertion, &tenant)?;
                let scopes = narrow(&user_scopes(client, Some(&user)), params.get("scope"))?;
                self.dedicated_zone(client, &tenant)?;
                self.issue(&tenant, client, GRANT_SAML2_BEARER, scopes, Some(&identity), true)
            }
            GRANT_REFRESH_TOKEN => {
                let token = params.get("refresh_token").ok_or_else(|| OAuthError::missing("refresh_token"))?;
                let grant = self.redeem_refresh_token(token, client, addressed.as_deref())?;
                let tenant = self
                    .tenant_by_id(&grant.tenant_id)
                    .ok_or_else(|| OAuthError::invalid_grant("the refresh token's zone is not configured"))?;
                let scopes = narrow(&grant.scopes, params.get("scope"))?;
                self.dedicated_zone(client, &tenant)?;
                self.issue(&tenant, client, GRANT_REFRESH_TOKEN, scopes, Some(&grant.user), true)
            }
            GRANT_AUTHORIZATION_CODE => {
                let code = params.get("code").ok_or_else(|| OAuthError::missing("code"))?;
                let grant = self.auth.redeem(
                    code,
                    client,
                    params.get("redirect_uri"),
                    params.get("code_verifier"),
                    self.now(),
                    &self.refresh,
                )?;
                if let Some(t) = addressed.as_ref().filter(|t| t.tenant.id != grant.tenant_id) {
                    return Err(OAuthError::invalid_grant(format!(
                        "authorization code belongs to zone {:?}, not the addressed zone {:?}",
                        grant.tenant_id, t.tenant.id
                    )));
                }
                let tenant = self
                    .tenant_by_id(&grant.tenant_id)
                    .ok_or_else(|| OAuthError::invalid_grant("the authorization code's zone is not configured"))?;
                let scopes = narrow(&grant.scopes, params.get("scope"))?;
                self.dedicated_zone(client, &tenant)?;
                let issued = self.issue(&tenant, client, GRANT_AUTHORIZATION_CODE, scopes, Some(&grant.user), true);
                if let Ok(i) = &issued {
                    self.auth.record_refresh_token(code, i.refresh_token.clone());
                }
                issued
            }
            GRANT_TOKEN_EXCHANGE => return self.exchange(client, &params, uri, addressed).await,
            _ => return Err(OAuthError::invalid_request("unsupported grant type")),
        };
        issued.map_err(|e| {
            tracing::error!(error = %e, "cannot sign token");
            OAuthError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "token signing failed")
        })
    }

    /// RFC 8693: a user's token of one of this service's tenants (`subject_token`) for an access
    /// token of `client` (like jwt-bearer) or, with `requested_token_type` saml2, a SAML 2.0
    /// assertion for the user signed by the tenant, addressed to the token endpoint named by
    /// `resource` (audience and recipient). Delegation (`actor_token`) is not supported.
    /// `requested_token_type`, `resource` and `audience` may also come in the query string, where
    /// SAP's destination chaining configures them for IAS (`tokenServiceURL.queries.*`).
    async fn exchange(
        &self,
        client: &OAuthClient,
        params: &Params,
        uri: &Uri,
        addressed: Option<Arc<TenantState>>,
    ) -> Result<Issued, OAuthError> {
        let query: Vec<(String, String)> =
            form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes()).into_owned().collect();
        let param =
            |name: &str| params.get(name).or_else(|| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()));
        let subject = params.get("subject_token").ok_or_else(|| OAuthError::missing("subject_token"))?;
        let subject_type = params.get("subject_token_type").ok_or_else(|| OAuthError::missing("subject_token_type"))?;
        if ![TOKEN_TYPE_ACCESS, TOKEN_TYPE_JWT, TOKEN_TYPE_ID].contains(&subject_type) {
            return Err(OAuthError::invalid_request(format!(
                "subject_token_type {subject_type:?} is not supported: the subject token must be a JWT of this \
                 service ({TOKEN_TYPE_ACCESS}, {TOKEN_TYPE_JWT} or {TOKEN_TYPE_ID})"
            )));
        }
        if params.get("actor_token").is_some() {
            return Err(OAuthError::invalid_request("actor_token (delegation) is not supported"));
        }
        let (tenant, identity) = self.check_assertion(subject, addressed).await?;
        self.dedicated_zone(client, &tenant)?;
        let signing_failed = |e: String| {
            tracing::error!(error = %e, "cannot sign an exchanged token");
            OAuthError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "token signing failed")
        };
        match param("requested_token_type").unwrap_or(TOKEN_TYPE_ACCESS) {
            TOKEN_TYPE_ACCESS | TOKEN_TYPE_JWT => {
                // As for jwt-bearer: a user who is not configured keeps what the subject token
                // was granted, so an exchange never widens scopes.
                let carried;
                let user = match self.user_by_id(&tenant.tenant.id, &identity.user_id) {
                    Some(u) => u,
                    None => {
                        carried = self.grants_of_assertion(subject);
                        &carried
                    }
                };
                let scopes = narrow(&user_scopes(client, Some(user)), params.get("scope"))?;
                let issued = self
                    .issue(&tenant, client, GRANT_TOKEN_EXCHANGE, scopes, Some(&identity), false)
                    .map_err(|e| signing_failed(e.to_string()))?;
                Ok(Issued { issued_token_type: Some(TOKEN_TYPE_ACCESS), ..issued })
            }
            TOKEN_TYPE_SAML2 => {
                let resource = param("resource").or_else(|| param("audience")).ok_or_else(|| {
                    OAuthError::invalid_request(
                        "a SAML assertion needs `resource`: the token endpoint that is to redeem it (its audience \
                         and recipient)",
                    )
                })?;
                let signer = self.saml_signer(&tenant.tenant.id).map_err(|e| signing_failed(e.to_string()))?;
                let mut attributes = Vec::new();
                for (name, value) in [
                    ("email", &identity.email),
                    ("given_name", &identity.given_name),
                    ("family_name", &identity.family_name),
                ] {
                    if let Some(v) = value {
                        attributes.push((name.to_owned(), vec![v.clone()]));
                    }
                }
                const VALIDITY_SECS: u64 = 600;
                let assertion = crate::saml::Assertion {
                    issuer: &tenant.issuer,
                    name_id: &identity.user_name,
                    name_id_format: crate::saml::NAMEID_UNSPECIFIED,
                    name_qualifier: None,
                    recipient: resource,
                    audience: resource,
                    authn_context_class_ref: "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession",
                    attributes: &attributes,
                    now: self.now(),
                    validity_secs: VALIDITY_SECS,
                    include_certificate: true,
                };
                let xml = signer.sign_assertion(&assertion).map_err(|e| signing_failed(e.to_string()))?;
                use base64::Engine;
                Ok(Issued {
                    access_token: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(xml),
                    jti: uuid::Uuid::new_v4().simple().to_string(),
                    expires_in: VALIDITY_SECS,
                    scopes: Vec::new(),
                    refresh_token: None,
                    token_type: "N_A",
                    issued_token_type: Some(TOKEN_TYPE_SAML2),
                })
            }
            other => Err(OAuthError::invalid_request(format!(
                "requested_token_type {other:?} is not supported; use {TOKEN_TYPE_ACCESS} or {TOKEN_TYPE_SAML2}"
            ))),
        }
    }

    /// What a verified assertion of a user who is not configured was granted, as a [`User`]
    /// scope list for [`user_scopes`]: its scopes, and `$XSAPPNAME.x` for each scope `x` of the
    /// issuing client's application (so that a group's scope carries over to other clients).
    fn grants_of_assertion(&self, assertion: &str) -> User {
        let claims = unverified_payload(assertion).unwrap_or(Value::Null);
        let scopes: Vec<String> = claims
            .get("scope")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default();
        let app =
            claims.get("cid").and_then(Value::as_str).and_then(|cid| self.client(cid)).map(|c| c.xsappname.clone());
        let mut granted = scopes.clone();
        if let Some(app) = app {
            let prefix = format!("{app}.");
            granted.extend(scopes.iter().filter_map(|s| s.strip_prefix(&prefix)).map(|x| format!("$XSAPPNAME.{x}")));
        }
        User { scopes: Some(granted), ..Default::default() }
    }

    /// Refuses a token for a dedicated client outside its own zone. The same answer as for an
    /// unknown client, since XSUAA has no such client in that zone.
    fn dedicated_zone(&self, client: &OAuthClient, tenant: &TenantState) -> Result<(), OAuthError> {
        if client.dedicated && tenant.tenant.id != client.tenant_id {
            return Err(OAuthError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                format!("client {:?} is dedicated to its own zone and gets no tokens in another", client.client_id),
            ));
        }
        Ok(())
    }

    fn own_tenant(&self, client: &OAuthClient) -> Result<Arc<TenantState>, OAuthError> {
        self.tenant_by_id(&client.tenant_id)
            .ok_or_else(|| OAuthError::invalid_request("the client's zone is not configured"))
    }

    /// Verifies a jwt-bearer assertion and returns the zone and user of the new token.
    ///
    /// A grant that carries a token belongs to that token's zone: a request that addresses no
    /// zone gets a token there, and one that addresses another zone is refused, as XSUAA does
    /// (tokens never cross zones by exchange).
    async fn check_assertion(
        &self,
        assertion: &str,
        addressed: Option<Arc<TenantState>>,
    ) -> Result<(Arc<TenantState>, UserIdentity), OAuthError> {
        let claimed = unverified_zid(assertion)
            .ok_or_else(|| OAuthError::invalid_grant("assertion is not a JWT carrying a zone id (zid)"))?;
        let tenant = match addressed {
            Some(t) if t.tenant.id != claimed => {
                return Err(OAuthError::invalid_grant(format!(
                    "assertion was issued for zone {claimed:?}, not the addressed zone {:?}",
                    t.tenant.id
                )));
            }
            Some(t) => t,
            None => self.tenant_by_id(&claimed).ok_or_else(|| {
                OAuthError::invalid_grant(format!("assertion was issued by unknown zone {claimed:?}"))
            })?,
        };
        let claims = tenant
            .verifier
            .verify(assertion)
            .await
            .map_err(|e| OAuthError::invalid_grant(format!("assertion rejected: {e}")))?;
        if claims.zid != tenant.tenant.id {
            return Err(OAuthError::invalid_grant("assertion zone does not match its signing key"));
        }
        let user = UserIdentity::from_claims(&claims.raw)
            .ok_or_else(|| OAuthError::invalid_grant("assertion is not a user token (no user_id)"))?;
        Ok((tenant, user))
    }

    /// Verifies an RFC 7522 assertion (base64url, padded or not) against the tenant's trusted
    /// SAML identity providers. Audience and recipient must be this tenant's token endpoint:
    /// its issuer URL or `{public_url}/oauth/token`.
    ///
    /// The user is the `NameID`: a configured user of that name keeps its own identity and
    /// scopes; anyone else gets a stable id derived from issuer and name, and the scopes its
    /// `Groups` attribute names (read like a configured user's `scopes`, `$XSAPPNAME.x` included).
    /// Each assertion is redeemed once.
    fn check_saml_assertion(&self, assertion: &str, tenant: &TenantState) -> Result<(UserIdentity, User), OAuthError> {
        use base64::Engine;
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        let compact: String = assertion.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let xml = URL_SAFE_NO_PAD
            .decode(compact.trim_end_matches('='))
            .or_else(|_| STANDARD.decode(&compact))
            .map_err(|_| OAuthError::invalid_grant("assertion is not base64url-encoded"))?;
        let trusted = self.saml_idps(&tenant.tenant.id);
        if trusted.is_empty() {
            return Err(OAuthError::invalid_grant(format!(
                "zone {:?} trusts no SAML identity provider; add its certificate to the token service's SAML trust",
                tenant.tenant.id
            )));
        }
        let mut endpoints = vec![tenant.issuer.clone(), format!("{}/oauth/token", self.public_url)];
        endpoints.dedup();
        let expect = crate::saml::Expectations { audiences: &endpoints, recipients: &endpoints, now: self.now() };
        let verified = crate::saml::verify_assertion(&xml, &trusted, &expect).map_err(|e| {
            tracing::info!(zone = %tenant.tenant.id, error = %e, "saml2-bearer assertion refused");
            OAuthError::invalid_grant(e.to_string())
        })?;
        if !self.first_use_of_assertion(&tenant.tenant.id, &verified.issuer, &verified.id, verified.not_on_or_after) {
            return Err(OAuthError::invalid_grant(
                "the assertion was already used; a bearer assertion is good for one token",
            ));
        }
        let first = |names: &[&str]| {
            names.iter().find_map(|n| verified.attribute(n).and_then(|v| v.first()).filter(|v| !v.is_empty())).cloned()
        };
        let user = match self.configured_user(&verified.name_id, &tenant.tenant.id) {
            Some(u) => u.clone(),
            None => User {
                username: verified.name_id.clone(),
                user_id: uuid::Uuid::new_v5(
                    &uuid::Uuid::NAMESPACE_URL,
                    format!("saml:{}:{}:{}", tenant.tenant.id, verified.issuer, verified.name_id).as_bytes(),
                )
                .to_string(),
                email: first(&["email", "mail"])
                    .or_else(|| {
                        (verified.name_id_format == crate::saml::NAMEID_EMAIL).then(|| verified.name_id.clone())
                    })
                    .unwrap_or_default(),
                tenant_id: tenant.tenant.id.clone(),
                given_name: first(&["given_name", "first_name"]),
                family_name: first(&["family_name", "last_name"]),
                scopes: Some(verified.attribute("Groups").map(<[String]>::to_vec).unwrap_or_default()),
                ..Default::default()
            },
        };
        let mut identity = UserIdentity::from_user(&user, self.now());
        identity.origin = "saml".into();
        Ok((identity, user))
    }

    /// Consumes a refresh token issued to `client`; like an assertion it keeps its zone.
    fn redeem_refresh_token(
        &self,
        token: &str,
        client: &OAuthClient,
        addressed: Option<&TenantState>,
    ) -> Result<RefreshGrant, OAuthError> {
        let taken = self.refresh.take(token, self.now(), |g| {
            if g.client_id != client.client_id {
                return Err(OAuthError::invalid_grant("refresh token was issued to another client"));
            }
            match addressed {
                Some(t) if t.tenant.id != g.tenant_id => Err(OAuthError::invalid_grant(format!(
                    "refresh token belongs to zone {:?}, not the addressed zone {:?}",
                    g.tenant_id, t.tenant.id
                ))),
                _ => Ok(()),
            }
        })?;
        taken.ok_or_else(|| OAuthError::invalid_grant("refresh token is invalid, expired or already used"))
    }
}

async fn token_endpoint(
    State(svc): State<Arc<TokenService>>,
    headers: HeaderMap,
    uri: Uri,
    tls: Option<Extension<TlsInfo>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Bytes,
) -> Response {
    let peer = peer.map(|Extension(ConnectInfo(a))| a.ip());
    if let Some(wait) = peer.and_then(|p| svc.failed_logons.retry_after(p)) {
        let mut resp = OAuthError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            format!("too many failed logons from this address; retry in {} s", wait.as_secs().max(1)),
        )
        .into_response();
        if let Ok(v) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
            resp.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        return resp;
    }
    let result = svc.token(&headers, &uri, &body, tls.as_ref().map(|Extension(t)| t)).await;
    if let (Err(e), Some(p)) = (&result, peer)
        && e.is_bad_credentials()
    {
        svc.failed_logons.failed(p);
    }
    match result {
        Ok(issued) => {
            let mut body = json!({
                "access_token": issued.access_token,
                "token_type": issued.token_type,
                "expires_in": issued.expires_in,
                "scope": issued.scopes.join(" "),
                "jti": issued.jti,
            });
            if let (Some(rt), Some(obj)) = (issued.refresh_token, body.as_object_mut()) {
                obj.insert("refresh_token".into(), rt.into());
            }
            if let (Some(t), Some(obj)) = (issued.issued_token_type, body.as_object_mut()) {
                obj.insert("issued_token_type".into(), t.into());
            }
            let mut resp = axum::Json(body).into_response();
            no_store(resp.headers_mut());
            resp
        }
        Err(e) => {
            tracing::debug!(error = e.error, description = %e.description, "token request refused");
            e.into_response()
        }
    }
}

async fn token_keys(
    State(svc): State<Arc<TokenService>>,
    headers: HeaderMap,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Response {
    let tenant = match svc.metadata_tenant(&headers, &uri, query.as_deref()) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    // Retirement is lazy: whoever fetches keys gets only those a token may still need.
    tenant.history.retire(&tenant.tenant.keys, svc.now(), svc.key_lifetime_secs);
    let keys: Vec<Value> = tenant
        .tenant
        .keys
        .jwks()
        .keys
        .into_iter()
        .map(|jwk| {
            let pem = jwk.public_key_pem();
            let mut v = serde_json::to_value(jwk).unwrap_or(Value::Null);
            // XSUAA publishes the PEM too, and older SAP libraries read only `value`.
            if let (Some(pem), Some(obj)) = (pem, v.as_object_mut()) {
                obj.insert("value".into(), pem.into());
            }
            v
        })
        .collect();
    axum::Json(json!({ "keys": keys })).into_response()
}

/// OpenID discovery, for generic OAuth tooling. With an IP `uaadomain` the token endpoint is
/// the provider URL for every tenant, so a subscriber's tokens still need `x-zid` there.
async fn openid_configuration(
    State(svc): State<Arc<TokenService>>,
    headers: HeaderMap,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Response {
    let tenant = match svc.metadata_tenant(&headers, &uri, query.as_deref()) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let base = tenant.issuer.strip_suffix("/oauth/token").unwrap_or(&tenant.issuer);
    axum::Json(json!({
        "issuer": tenant.issuer,
        "token_endpoint": tenant.issuer,
        "authorization_endpoint": format!("{base}/oauth/authorize"),
        "jwks_uri": tenant.jwks_uri,
        "grant_types_supported": SUPPORTED_GRANT_TYPES,
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "tls_client_auth"],
        "code_challenge_methods_supported": ["S256"],
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
    .into_response()
}

/// Requires a form body; xssec sends `application/x-www-form-urlencoded;charset=UTF-8`.
pub(crate) fn require_form(headers: &HeaderMap) -> Result<(), OAuthError> {
    let ct = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Ok(())
    } else {
        Err(OAuthError::invalid_request(format!(
            "expected Content-Type application/x-www-form-urlencoded, got {:?}",
            if ct.is_empty() { "nothing" } else { ct }
        )))
    }
}

/// The parameters of a form body. Empty values count as absent and repeated names are refused,
/// both as RFC 6749 §3.2 demands.
#[derive(Debug, Default)]
pub(crate) struct Params(HashMap<String, String>);

impl Params {
    pub(crate) fn parse(body: &[u8]) -> Result<Self, OAuthError> {
        let text = std::str::from_utf8(body).map_err(|_| OAuthError::invalid_request("request body is not UTF-8"))?;
        let mut out = HashMap::new();
        for pair in text.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (Some(k), Some(v)) = (form_decode(k), form_decode(v)) else {
                return Err(OAuthError::invalid_request("malformed form body: a parameter is not UTF-8 once decoded"));
            };
            if v.is_empty() {
                continue;
            }
            match out.entry(k) {
                Entry::Occupied(e) => {
                    return Err(OAuthError::invalid_request(format!("parameter {} is given more than once", e.key())));
                }
                Entry::Vacant(e) => {
                    e.insert(v);
                }
            }
        }
        Ok(Self(out))
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// Decodes one `application/x-www-form-urlencoded` component; `None` if it is not UTF-8.
fn form_decode(s: &str) -> Option<String> {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus).decode_utf8().ok().map(|c| c.into_owned())
}

/// Reads `Authorization: Basic`. RFC 6749 §2.3.1 form-encodes id and secret before base64,
/// but many clients do not, so both readings are returned as candidates (decoded first).
/// `Ok(None)` when there is no Basic header.
fn basic_credentials(headers: &HeaderMap) -> Result<Option<Vec<(String, String)>>, OAuthError> {
    let Some(value) = headers.get(AUTHORIZATION) else { return Ok(None) };
    let malformed = || OAuthError::invalid_client("malformed HTTP Basic credentials", true);
    let value = value.to_str().map_err(|_| malformed())?.trim();
    let Some((scheme, encoded)) = value.split_once(' ') else { return Ok(None) };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let encoded = encoded.trim();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded))
        .map_err(|_| malformed())?;
    let raw = String::from_utf8(raw).map_err(|_| malformed())?;
    let (id, secret) = raw.split_once(':').ok_or_else(malformed)?;
    let mut candidates = Vec::with_capacity(2);
    if let (Some(id), Some(secret)) = (form_decode(id), form_decode(secret)) {
        candidates.push((id, secret));
    }
    if !candidates.iter().any(|(i, s)| i == id && s == secret) {
        candidates.push((id.to_owned(), secret.to_owned()));
    }
    Ok(Some(candidates))
}

/// Compares secrets in constant time. Hashing first also hides the stored secret's length,
/// which a plain constant-time comparison of unequal lengths would reveal.
pub(crate) fn secret_matches(stored: &str, given: &str) -> bool {
    use aws_lc_rs::digest::{SHA256, digest};
    let a = digest(&SHA256, stored.as_bytes());
    let b = digest(&SHA256, given.as_bytes());
    ferry_core::secret::constant_time_eq(a.as_ref(), b.as_ref()) && !stored.is_empty()
}

/// Restricts `allowed` to the requested `scope` parameter (space separated), if one was sent.
pub(crate) fn narrow(allowed: &[String], requested: Option<&str>) -> Result<Vec<String>, OAuthError> {
    let Some(requested) = requested else { return Ok(allowed.to_vec()) };
    let mut out: Vec<String> = Vec::new();
    for s in requested.split_whitespace() {
        if !allowed.iter().any(|a| a == s) {
            return Err(OAuthError::invalid_scope(format!("scope {s:?} is not granted to this client")));
        }
        if !out.iter().any(|o| o == s) {
            out.push(s.to_owned());
        }
    }
    Ok(out)
}

/// A JWT's payload, not verified.
fn unverified_payload(jwt: &str) -> Option<Value> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The `zid` an assertion claims, read without verification only to pick the verifying keys.
fn unverified_zid(jwt: &str) -> Option<String> {
    let v = unverified_payload(jwt)?;
    ["zid", "app_tid", "zone_uuid"].iter().find_map(|k| v.get(k).and_then(Value::as_str)).map(str::to_owned)
}

/// `host[:port]` → `host`; IPv6 literals keep their brackets.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &host[..=h.len()]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_follow_rfc6749() {
        let p = Params::parse(b"grant_type=client_credentials&client_id=sb-a%21t1%7Cx&scope=a+b&empty=&&flag").unwrap();
        assert_eq!(p.get("client_id"), Some("sb-a!t1|x"));
        assert_eq!(p.get("scope"), Some("a b"));
        assert_eq!(p.get("empty"), None);
        assert_eq!(p.get("flag"), None);
        assert!(Params::parse(b"a=1&a=2").is_err());
        assert!(Params::parse(b"a=%FF").is_err());
        assert!(Params::parse(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn basic_credentials_both_readings() {
        let mut h = HeaderMap::new();
        let enc = base64::engine::general_purpose::STANDARD.encode("sb-a%21t1:p%2Bw+x");
        h.insert(AUTHORIZATION, HeaderValue::from_str(&format!("Basic {enc}")).unwrap());
        let c = basic_credentials(&h).unwrap().unwrap();
        assert_eq!(c[0], ("sb-a!t1".to_owned(), "p+w x".to_owned()));
        assert_eq!(c[1], ("sb-a%21t1".to_owned(), "p%2Bw+x".to_owned()));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert!(basic_credentials(&h).unwrap().is_none());
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert!(basic_credentials(&h).is_err());
    }

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("a.b:8443"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn secrets_compare() {
        assert!(secret_matches("abc", "abc"));
        assert!(!secret_matches("abc", "abd"));
        assert!(!secret_matches("", ""));
    }

    #[test]
    fn scopes_narrow() {
        let allowed = vec!["a".to_owned(), "b".to_owned()];
        assert_eq!(narrow(&allowed, None).unwrap(), allowed);
        assert_eq!(narrow(&allowed, Some("b b")).unwrap(), vec!["b"]);
        assert!(narrow(&allowed, Some("c")).is_err());
    }
}
