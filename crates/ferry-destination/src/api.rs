//! The HTTP edge: routes, status codes and response shapes.
//!
//! Shapes here are load-bearing in ways that are easy to break by "tidying": the SDK treats a
//! 404 as "not found" only with the exact `ErrorMessage`, the approuter treats a token as
//! failed if it merely *has* an `error` key, and `owner.InstanceId` must be present (as
//! `null`) at subaccount level. `CLIENT-CONTRACT.md` §3 is the reference.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, RawQuery, State};
use axum::http::header::{AUTHORIZATION, ETAG, IF_NONE_MATCH, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ferry_model::{AuthenticationType, Destination, RawDestination};
use serde::de::{MapAccess, SeqAccess, Visitor, value::MapAccessDeserializer};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;

use crate::store::{Level, RowKey, Scope};
use crate::tokens::{self, CacheOwner, Grant, Token, TokenRequest};
use crate::{DestinationService, Error};

/// Request bodies above this are refused with 413; a destination is a few hundred bytes.
pub(crate) const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The SAP Cloud SDK matches this text exactly to tell "not found" from a failure.
pub(crate) const NOT_FOUND_MESSAGE: &str = "Configuration with the specified name was not found";
pub(crate) const DUPLICATE_MESSAGE: &str = "Configuration with the same name already exists";

type Svc = State<Arc<DestinationService>>;
type Body = Result<Bytes, BytesRejection>;

pub(crate) fn router(service: Arc<DestinationService>) -> Router {
    const V1: &str = "/destination-configuration/v1";
    Router::new()
        .route(&format!("{V1}/subaccountDestinations"), collection(Collection::Subaccount))
        .route(&format!("{V1}/subaccountDestinations/{{name}}"), item(Collection::Subaccount))
        .route(&format!("{V1}/instanceDestinations"), collection(Collection::Instance))
        .route(&format!("{V1}/instanceDestinations/{{name}}"), item(Collection::Instance))
        .route(&format!("{V1}/destinations/{{name}}"), get(find))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "No such endpoint in the Destination Service API") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "This endpoint does not support the request method")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(service)
}

#[derive(Clone, Copy, Debug)]
enum Collection {
    Subaccount,
    Instance,
}

fn collection(kind: Collection) -> MethodRouter<Arc<DestinationService>> {
    get(move |s: Svc, c: Caller| list(s, c, kind))
        .post(move |s: Svc, c: Caller, b: Body| create(s, c, kind, b))
        .put(move |s: Svc, c: Caller, b: Body| update(s, c, kind, b))
}

fn item(kind: Collection) -> MethodRouter<Arc<DestinationService>> {
    get(move |s: Svc, c: Caller, p: Result<Path<String>, PathRejection>, h: HeaderMap| get_one(s, c, kind, p, h))
        .delete(move |s: Svc, c: Caller, p: Result<Path<String>, PathRejection>| delete_one(s, c, kind, p))
}

/// An error answer: `{"ErrorMessage": "..."}`, the shape SAP clients read and append to
/// their own error text.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    /// `WWW-Authenticate` of a 401; plain `Bearer` unless a token was sent and refused.
    challenge: Option<HeaderValue>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), challenge: None }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
    /// A bearer token that was sent and refused: RFC 6750 `invalid_token` with the reason,
    /// which [`VerifyError`](ferry_auth::VerifyError) keeps free of key material and internals.
    fn invalid_token(e: &ferry_auth::VerifyError) -> Self {
        let reason = e.to_string();
        let description: String =
            reason.chars().map(|c| if c == '"' || c == '\\' || c.is_control() { '\'' } else { c }).collect();
        let challenge =
            HeaderValue::from_str(&format!("Bearer error=\"invalid_token\", error_description=\"{description}\""))
                .unwrap_or_else(|_| HeaderValue::from_static("Bearer error=\"invalid_token\""));
        Self { challenge: Some(challenge), ..Self::unauthorized(format!("Invalid bearer token: {reason}")) }
    }
    fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, NOT_FOUND_MESSAGE)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "ErrorMessage": self.message }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = self.challenge.unwrap_or_else(|| HeaderValue::from_static("Bearer"));
            response.headers_mut().insert(WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Undecryptable { .. } | Error::Corrupt { .. } => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{e}. Ask the operator of this Destination Service."),
            ),
            Error::Store(_) | Error::WrongMasterKey | Error::Encrypt => {
                tracing::error!(error = %e, "destination service request failed");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "The destination store failed; try again later")
            }
        }
    }
}

/// Who is calling, from the verified bearer token.
pub(crate) struct Caller {
    subaccount: String,
    /// Service instance (`ext_attr.serviceinstanceid`, else the client id): the instance level.
    instance: Option<String>,
    /// Tenant subdomain, for `tokenServiceURLType: Common` when no `X-tenant` is sent.
    subdomain: Option<String>,
}

impl Caller {
    fn scope(&self, kind: Collection) -> Result<Scope, ApiError> {
        let level = match kind {
            Collection::Subaccount => Level::Subaccount,
            Collection::Instance => Level::Instance(self.instance.clone().ok_or_else(|| {
                ApiError::bad_request(
                    "The bearer token names no service instance (neither ext_attr.serviceinstanceid nor client_id), \
                     so it cannot address instance-level destinations",
                )
            })?),
        };
        Ok(Scope { subaccount: self.subaccount.clone(), level })
    }

    fn subaccount_scope(&self) -> Scope {
        Scope { subaccount: self.subaccount.clone(), level: Level::Subaccount }
    }
}

impl FromRequestParts<Arc<DestinationService>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, service: &Arc<DestinationService>) -> Result<Self, ApiError> {
        let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            ApiError::unauthorized(
                "Missing Authorization header: send 'Authorization: Bearer <token>' with a token issued to the \
                 destination service binding",
            )
        })?;
        let value =
            header.to_str().map_err(|_| ApiError::unauthorized("The Authorization header is not valid text"))?;
        let token = value
            .trim()
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
            .ok_or_else(|| ApiError::unauthorized("The Authorization header must use the Bearer scheme"))?;
        let claims = service.verifier.verify(token).await.map_err(|e| ApiError::invalid_token(&e))?;
        let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
        let subdomain =
            non_empty(claims.ext_attr.zdn.clone()).or_else(|| claims.iss.as_deref().and_then(iss_subdomain));
        Ok(Caller {
            instance: non_empty(claims.ext_attr.serviceinstanceid.clone())
                .or_else(|| non_empty(claims.client_id.clone())),
            subaccount: claims.zid,
            subdomain,
        })
    }
}

/// `https://<subdomain>.<domain>/oauth/token` → `<subdomain>`, as XSUAA issuers are built.
fn iss_subdomain(iss: &str) -> Option<String> {
    let host = url::Url::parse(iss).ok()?.host_str()?.to_owned();
    let (first, rest) = host.split_once('.')?;
    (tokens::is_valid_subdomain(first) && rest.contains('.')).then(|| first.to_owned())
}

/// A request body: SAP accepts one destination object or an array of them.
enum Payload {
    One(RawDestination),
    Many(Vec<RawDestination>),
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PayloadVisitor;
        impl<'de> Visitor<'de> for PayloadVisitor {
            type Value = Payload;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a destination object or an array of destination objects")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Payload, A::Error> {
                RawDestination::deserialize(MapAccessDeserializer::new(map)).map(Payload::One)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Payload, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Payload::Many(items))
            }
        }
        deserializer.deserialize_any(PayloadVisitor)
    }
}

fn parse_body(body: Body) -> Result<Payload, ApiError> {
    let bytes = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body is larger than the limit of {} KiB", MAX_BODY_BYTES / 1024),
        ),
        status => ApiError::new(status, rejection.body_text()),
    })?;
    let payload: Payload = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("Request body is not a valid destination: {e}")))?;
    if matches!(&payload, Payload::Many(items) if items.is_empty()) {
        return Err(ApiError::bad_request("Request body is an empty array: send at least one destination"));
    }
    Ok(payload)
}

fn validate(raw: RawDestination) -> Result<Destination, ApiError> {
    Destination::try_from(raw).map_err(|e| ApiError::bad_request(format!("Invalid destination: {e}")))
}

/// One entry of a bulk answer (`207 Multi-Status` when any entry failed).
#[derive(Serialize)]
struct ItemResult {
    name: String,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    cause: Option<String>,
}

/// Runs `op` for every item and answers `ok` if all succeeded, 207 otherwise.
async fn bulk<F, Fut>(items: Vec<RawDestination>, ok: StatusCode, op: F) -> Response
where
    F: Fn(Destination) -> Fut,
    Fut: Future<Output = Result<(), ApiError>>,
{
    let mut results = Vec::with_capacity(items.len());
    for raw in items {
        let name = raw.name().unwrap_or_default().to_owned();
        let outcome = match validate(raw) {
            Ok(dest) => op(dest).await,
            Err(e) => Err(e),
        };
        results.push(match outcome {
            Ok(()) => ItemResult { name, status: ok.as_u16(), cause: None },
            Err(e) => ItemResult { name, status: e.status.as_u16(), cause: Some(e.message) },
        });
    }
    let status = if results.iter().all(|r| r.status == ok.as_u16()) { ok } else { StatusCode::MULTI_STATUS };
    (status, Json(results)).into_response()
}

async fn list(State(s): Svc, caller: Caller, kind: Collection) -> Result<Response, ApiError> {
    let scope = caller.scope(kind)?;
    // Secrets never leave through a list, whatever SAP does: lists end up in UIs and logs.
    let items: Vec<Destination> = s.list(&scope).await?.iter().map(Destination::without_secrets).collect();
    Ok(Json(items).into_response())
}

async fn create(State(s): Svc, caller: Caller, kind: Collection, body: Body) -> Result<Response, ApiError> {
    let scope = caller.scope(kind)?;
    let create_one = |dest: Destination| {
        let (s, scope) = (&s, &scope);
        async move {
            let key = scope.row(dest.name());
            if s.create(&key, &dest).await? {
                tracing::info!(subaccount = %scope.subaccount, level = ?scope.level, name = %key.name, "destination created");
                Ok(())
            } else {
                Err(ApiError::new(StatusCode::CONFLICT, DUPLICATE_MESSAGE))
            }
        }
    };
    match parse_body(body)? {
        Payload::One(raw) => {
            create_one(validate(raw)?).await?;
            Ok(StatusCode::CREATED.into_response())
        }
        Payload::Many(items) => Ok(bulk(items, StatusCode::CREATED, create_one).await),
    }
}

async fn update(State(s): Svc, caller: Caller, kind: Collection, body: Body) -> Result<Response, ApiError> {
    let scope = caller.scope(kind)?;
    let update_one = |dest: Destination| {
        let (s, scope) = (&s, &scope);
        async move {
            let key = scope.row(dest.name());
            if s.replace(&key, &dest).await? {
                tracing::info!(subaccount = %scope.subaccount, level = ?scope.level, name = %key.name, "destination updated");
                Ok(())
            } else {
                Err(ApiError::not_found())
            }
        }
    };
    match parse_body(body)? {
        Payload::One(raw) => {
            update_one(validate(raw)?).await?;
            Ok(Json(json!({ "Count": 1 })).into_response())
        }
        Payload::Many(items) => Ok(bulk(items, StatusCode::OK, update_one).await),
    }
}

async fn get_one(
    State(s): Svc,
    caller: Caller,
    kind: Collection,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Ok(Path(name)) = path else { return Err(ApiError::not_found()) };
    let stored = s.load(&caller.scope(kind)?.row(&name)).await?.ok_or_else(ApiError::not_found)?;
    let etag = HeaderValue::from_str(&stored.etag).ok();
    let matches = headers
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').map(str::trim).any(|t| t == "*" || t.trim_start_matches("W/") == stored.etag));
    let mut response =
        if matches { StatusCode::NOT_MODIFIED.into_response() } else { Json(&stored.destination).into_response() };
    if let Some(etag) = etag {
        response.headers_mut().insert(ETAG, etag);
    }
    Ok(response)
}

async fn delete_one(
    State(s): Svc,
    caller: Caller,
    kind: Collection,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Ok(Path(name)) = path else { return Err(ApiError::not_found()) };
    let scope = caller.scope(kind)?;
    if !s.remove(&scope.row(&name)).await? {
        return Err(ApiError::not_found());
    }
    tracing::info!(subaccount = %scope.subaccount, level = ?scope.level, %name, "destination deleted");
    Ok(Json(json!({ "Count": 1 })).into_response())
}

#[derive(Serialize)]
struct FindResponse<'a> {
    owner: Owner<'a>,
    #[serde(rename = "destinationConfiguration")]
    destination_configuration: &'a Destination,
    #[serde(rename = "authTokens", skip_serializing_if = "Option::is_none")]
    auth_tokens: Option<Vec<AuthToken>>,
}

#[derive(Serialize)]
struct Owner<'a> {
    #[serde(rename = "SubaccountId")]
    subaccount_id: &'a str,
    /// Serialised as `null` at subaccount level: the SDK classifies by its truthiness.
    #[serde(rename = "InstanceId")]
    instance_id: Option<&'a str>,
}

/// `authTokens[]` entry. A successful entry has no `error` key at all (approuter checks for
/// the key, not its value); a failed one has empty `type`/`value` and the reason.
#[derive(Serialize)]
struct AuthToken {
    #[serde(rename = "type")]
    kind: &'static str,
    value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_header: Option<HttpHeader>,
    /// A string, as in every SAP example; clients `parseInt` it.
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct HttpHeader {
    key: &'static str,
    value: String,
}

impl AuthToken {
    fn authorization(kind: &'static str, value: String) -> Self {
        Self {
            kind,
            http_header: Some(HttpHeader { key: "Authorization", value: format!("{kind} {value}") }),
            value,
            expires_in: None,
            scope: None,
            refresh_token: None,
            error: None,
        }
    }

    fn bearer(token: Token) -> Self {
        Self {
            expires_in: token.expires_in.map(|s| s.to_string()),
            scope: token.scope,
            refresh_token: token.refresh_token.map(|t| t.into_inner()),
            ..Self::authorization("Bearer", token.access_token.into_inner())
        }
    }

    fn failed(reason: impl Into<String>) -> Self {
        Self {
            kind: "",
            value: String::new(),
            http_header: None,
            expires_in: None,
            scope: None,
            refresh_token: None,
            error: Some(reason.into()),
        }
    }
}

/// `$skipTokenRetrieval=true`: the SDK sends the `$` literally; `%24` is decoded the same way.
fn query_flag(query: Option<&str>, name: &str) -> bool {
    query
        .is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == name && v.eq_ignore_ascii_case("true")))
}

/// A header's value, with an empty value meaning "not sent" (SPEC §1.4).
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()).filter(|s| !s.is_empty()))
            .map_err(|_| ApiError::bad_request(format!("Header {name} is not valid text"))),
    }
}

/// Find by name: instance level first (if the token has an instance), then subaccount level.
async fn find(
    State(s): Svc,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Ok(Path(name)) = path else { return Err(ApiError::not_found()) };
    let tenant = header(&headers, "x-tenant")?;
    if tenant.is_some() && header(&headers, "x-user-token")?.is_some() {
        return Err(ApiError::bad_request("The headers X-user-token and X-tenant cannot be used together"));
    }
    if tenant.is_some_and(|t| !tokens::is_valid_subdomain(t)) {
        return Err(ApiError::bad_request("Header X-tenant must be a tenant subdomain (letters, digits and '-')"));
    }
    let mut scopes = Vec::with_capacity(2);
    if let Ok(instance) = caller.scope(Collection::Instance) {
        scopes.push(instance);
    }
    scopes.push(caller.subaccount_scope());
    let mut found = None;
    for scope in scopes {
        let key = scope.row(&name);
        if let Some(stored) = s.load(&key).await? {
            found = Some((key, stored.destination));
            break;
        }
    }
    let (key, destination) = found.ok_or_else(ApiError::not_found)?;

    let auth_tokens = if query_flag(query.as_deref(), "$skipTokenRetrieval") {
        None
    } else {
        auth_tokens(&s, &caller, &key, &destination, tenant).await?
    };
    let destination =
        if query_flag(query.as_deref(), "$skipCredentials") { destination.without_secrets() } else { destination };
    let body = FindResponse {
        owner: Owner { subaccount_id: &key.scope.subaccount, instance_id: key.scope.instance_id() },
        destination_configuration: &destination,
        auth_tokens,
    };
    Ok(Json(body).into_response())
}

/// `authTokens` for a found destination, or `None` where SAP sends none. A failed token
/// retrieval is an entry with `error`, not an HTTP error: the client decides what to do.
async fn auth_tokens(
    s: &DestinationService,
    caller: &Caller,
    key: &RowKey,
    dest: &Destination,
    tenant: Option<&str>,
) -> Result<Option<Vec<AuthToken>>, ApiError> {
    use AuthenticationType::*;
    let token = match dest.authentication() {
        None | Some(NoAuthentication | PrincipalPropagation | ClientCertificateAuthentication) => return Ok(None),
        Some(BasicAuthentication) => match (dest.get("User"), dest.get("Password")) {
            (Some(user), Some(password)) => AuthToken::authorization("Basic", B64.encode(format!("{user}:{password}"))),
            _ => AuthToken::failed("BasicAuthentication destinations need the properties 'User' and 'Password'"),
        },
        Some(OAuth2ClientCredentials) => oauth_token(s, caller, key, dest, Grant::ClientCredentials, tenant).await?,
        Some(OAuth2Password) => oauth_token(s, caller, key, dest, Grant::Password, tenant).await?,
        Some(other) => AuthToken::failed(format!(
            "Authentication '{other}' is not supported by this Destination Service yet; no token was retrieved"
        )),
    };
    if let Some(reason) = &token.error {
        tracing::warn!(subaccount = %key.scope.subaccount, name = %key.name, %reason, "no auth token for destination");
    }
    Ok(Some(vec![token]))
}

async fn oauth_token(
    s: &DestinationService,
    caller: &Caller,
    key: &RowKey,
    dest: &Destination,
    grant: Grant,
    tenant_header: Option<&str>,
) -> Result<AuthToken, ApiError> {
    let common = tokens::is_common(dest);
    if tenant_header.is_some() && !common {
        return Err(ApiError::bad_request(format!(
            "Header X-tenant is only allowed for destinations with tokenServiceURLType 'Common'; destination '{}' \
             uses a dedicated token service URL",
            key.name
        )));
    }
    let tenant = if common { tenant_header.map(str::to_owned).or_else(|| caller.subdomain.clone()) } else { None };
    let request = match TokenRequest::build(dest, grant, tenant.as_deref(), s.tokens.default_timeout) {
        Ok(request) => request,
        Err(e) => return Ok(AuthToken::failed(e.to_string())),
    };
    let owner = CacheOwner {
        subaccount: key.scope.subaccount.clone(),
        instance: key.scope.instance_id().map(str::to_owned),
        name: key.name.clone(),
        tenant,
    };
    Ok(match s.tokens.token(owner, request).await {
        Ok(token) => AuthToken::bearer(token),
        Err(e) => AuthToken::failed(e.to_string()),
    })
}
