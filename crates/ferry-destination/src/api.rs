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
use axum::http::header::{
    AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_MATCH, IF_NONE_MATCH, WWW_AUTHENTICATE,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ferry_model::{AuthenticationType, Certificate, Destination, Fragment, RawDestination, raw_fragment_name};
use serde::de::{MapAccess, SeqAccess, Visitor, value::MapAccessDeserializer};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;

use crate::store::{Kind, Level, RowKey, Scope};
use crate::tokens::{self, CacheOwner, Grant, TlsSetup, Token, TokenRequest};
use crate::{DestinationService, Error};
use crate::{labels, query};

/// Request bodies above this are refused with 413; a destination is a few hundred bytes.
pub(crate) const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The SAP Cloud SDK matches this text exactly to tell "not found" from a failure.
pub(crate) const NOT_FOUND_MESSAGE: &str = "Configuration with the specified name was not found";
pub(crate) const DUPLICATE_MESSAGE: &str = "Configuration with the same name already exists";

type Svc = State<Arc<DestinationService>>;
type Body = Result<Bytes, BytesRejection>;

pub(crate) fn router(service: Arc<DestinationService>) -> Router {
    const V1: &str = "/destination-configuration/v1";
    type Routes = fn(Collection) -> MethodRouter<Arc<DestinationService>>;
    // Every object type on both levels: the collection, one object, and its labels.
    let objects: [(&str, Kind, Routes, Routes); 3] = [
        ("Destinations", Kind::Destination, collection, item),
        ("DestinationFragments", Kind::Fragment, fragment_collection, fragment_item),
        ("Certificates", Kind::Certificate, certificate_collection, certificate_item),
    ];
    let mut router = Router::new();
    for (level, coll) in [("subaccount", Collection::Subaccount), ("instance", Collection::Instance)] {
        for (noun, kind, collection_routes, item_routes) in objects {
            router = router
                .route(&format!("{V1}/{level}{noun}"), collection_routes(coll))
                .route(&format!("{V1}/{level}{noun}/{{name}}"), item_routes(coll))
                .route(&format!("{V1}/{level}{noun}/{{name}}/labels"), labels::route(coll, kind));
        }
    }
    for (level, coll) in [("subaccount", Collection::Subaccount), ("instance", Collection::Instance)] {
        router = router.route(
            &format!("{V1}/{level}Certificates/{{name}}/publicKeys"),
            get(move |s: Svc, c: Caller, p: Result<Path<String>, PathRejection>, h: HeaderMap| {
                public_keys(s, c, coll, p, h)
            }),
        );
    }
    router
        .route(&format!("{V1}/destinations/{{name}}"), get(find))
        .route("/destination-configuration/v2/destinations/{name}", get(consume))
        .route("/destination-configuration/openapi.yaml", get(openapi))
        .route(&format!("{V1}/saml2Metadata/certificate"), crate::saml::certificate_routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "No such endpoint in the Destination Service API") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "This endpoint does not support the request method")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(error_shape))
        .with_state(service)
}

/// Gives each error answer the shape SAP's OpenAPI document declares for that operation and
/// status: `{"ErrorMessage": ...}` (its `JsonErrorMessage`) where it says so, plain text (its
/// `Error`, a string) everywhere else. Clients depend on both: the Cloud SDK for JavaScript reads
/// `ErrorMessage` from a find 404, the Python SDK reads other errors as text.
async fn error_shape(
    method: axum::http::Method,
    route: Option<axum::extract::MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    let Some(ErrorText(message)) = response.extensions_mut().remove::<ErrorText>() else {
        return response;
    };
    let status = response.status();
    if json_error(&method, route.as_ref().map_or("", |r| r.as_str()), status) {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    parts.headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    parts.headers.remove(CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(message))
}

/// Where SAP's document declares `JsonErrorMessage` (`route` is the matched route template).
fn json_error(method: &axum::http::Method, route: &str, status: StatusCode) -> bool {
    use axum::http::Method;
    let Some(route) = route.strip_prefix("/destination-configuration") else { return false };
    let (collection, item) = match route.strip_suffix("/{name}") {
        Some(c) => (c, true),
        None => (route, false),
    };
    let noun = collection.strip_prefix("/v1/subaccount").or_else(|| collection.strip_prefix("/v1/instance"));
    let server = matches!(status.as_u16(), 500 | 503);
    match (noun, item) {
        // Find and consume: the 404 that the SDK matches on its exact text.
        _ if collection == "/v1/destinations" || collection == "/v2/destinations" => status == StatusCode::NOT_FOUND,
        (Some("Destinations"), false) => matches!(*method, Method::POST | Method::PUT),
        (Some("DestinationFragments"), false) => match *method {
            Method::POST | Method::PUT => true,
            Method::GET => server,
            _ => false,
        },
        (Some("DestinationFragments"), true) => match *method {
            Method::GET => status == StatusCode::NOT_FOUND || server,
            Method::DELETE => server,
            _ => false,
        },
        _ => false,
    }
}

/// SAP's OpenAPI document with the errata of `docs/destination-api.md` and Ferry's label
/// endpoints, generated by `scripts/schemathesis/errata.py --ferry`; `scripts/schemathesis.sh`
/// checks that it still matches SAP's document and runs against it.
static OPENAPI: &str = include_str!("../openapi/destination-api.yaml");

async fn openapi() -> Response {
    ([(CONTENT_TYPE, HeaderValue::from_static("application/yaml"))], OPENAPI).into_response()
}

/// A single create answers 201 with no content, as SAP's service does; the content type says so
/// explicitly, since SAP's document declares a body for this status (the bulk form's array).
fn created_empty() -> Response {
    (StatusCode::CREATED, [(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"))]).into_response()
}

/// The message of an [`ApiError`], handed to [`error_shape`] with the response.
#[derive(Clone)]
struct ErrorText(String);

#[derive(Clone, Copy, Debug)]
pub(crate) enum Collection {
    Subaccount,
    Instance,
}

fn collection(kind: Collection) -> MethodRouter<Arc<DestinationService>> {
    get(move |s: Svc, c: Caller, q: RawQuery| list(s, c, kind, q))
        .post(move |s: Svc, c: Caller, b: Body| create(s, c, kind, b))
        .put(move |s: Svc, c: Caller, h: HeaderMap, b: Body| update(s, c, kind, h, b))
        .delete(move |s: Svc, c: Caller, q: RawQuery| delete_many(s, c, kind, Kind::Destination, q))
}

fn item(kind: Collection) -> MethodRouter<Arc<DestinationService>> {
    object_item::<Destination>(kind, DESTINATION)
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
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), challenge: None }
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
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
        response.extensions_mut().insert(ErrorText(self.message));
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
            Error::Contended { .. } => Self::new(StatusCode::CONFLICT, e.to_string()),
            Error::Store(crate::StoreError::Unavailable { .. }) => {
                // The driver's words go to the log; the caller learns it may retry.
                tracing::warn!(error = %e, "destination database unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The destination database is unavailable (restarting or unreachable); retry in a few seconds",
                )
            }
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
    /// The bearer token itself when it is a user's token (user flows use it as the assertion
    /// unless `X-user-token` is sent).
    user: Option<UserToken>,
    /// The token's client, when one of Ferry's own tenants issued the token (only those vouch
    /// for which client a token was issued to): to find the provider of a subscriber's token.
    zone_client: Option<String>,
    /// Set for a subscriber's token, by [`Caller::resolve_provider`]: the subaccount the token's
    /// client lives in (the provider of the multi-tenant application), which the consume API's
    /// `provider_*` levels address.
    provider: Option<String>,
}

/// A verified user JWT and who it belongs to.
#[derive(Clone)]
pub(crate) struct UserToken {
    jwt: String,
    /// The verified claims, which SAML flows put into the assertion.
    claims: Arc<serde_json::Value>,
    /// `<zid>/<user id>`: the token cache never hands one user's token to another.
    key: String,
    /// For `tokenServiceURLType: Common` in user flows.
    subdomain: Option<String>,
    /// Issued by a trusted external OIDC issuer (IAS), not by one of Ferry's tenants.
    external: bool,
}

impl UserToken {
    /// `None` for a technical (client-credentials) token.
    fn from_claims(jwt: &str, claims: &ferry_auth::Claims) -> Option<Self> {
        // IAS user tokens name the user by `user_uuid` and `sub`, without XSUAA's user claims.
        let ias_user = claims.external_issuer && claims.raw.get("user_uuid").is_some();
        if !claims.is_user() && !ias_user {
            return None;
        }
        let sub = claims.raw.get("sub").and_then(serde_json::Value::as_str).map(str::to_owned);
        let id =
            [claims.user_id.clone(), sub, claims.user_name.clone()].into_iter().flatten().find(|s| !s.is_empty())?;
        Some(Self {
            jwt: jwt.to_owned(),
            claims: Arc::new(claims.raw.clone()),
            key: format!("{}/{id}", claims.zid),
            subdomain: claims_subdomain(claims),
            external: claims.external_issuer,
        })
    }
}

impl UserToken {
    pub(crate) fn saml(&self) -> crate::saml::SamlUser<'_> {
        crate::saml::SamlUser { claims: &self.claims, key: &self.key, subdomain: self.subdomain.as_deref() }
    }
}

fn claims_subdomain(claims: &ferry_auth::Claims) -> Option<String> {
    claims.ext_attr.zdn.clone().filter(|s| !s.is_empty()).or_else(|| claims.iss.as_deref().and_then(iss_subdomain))
}

impl Caller {
    pub(crate) fn subaccount(&self) -> &str {
        &self.subaccount
    }

    pub(crate) fn scope(&self, kind: Collection) -> Result<Scope, ApiError> {
        let level = match kind {
            Collection::Subaccount => Level::Subaccount,
            Collection::Instance => Level::Instance(self.instance.clone().ok_or_else(|| {
                ApiError::bad_request(
                    "The bearer token names no service instance (neither ext_attr.serviceinstanceid nor client_id), \
                     so it cannot address instance-level destinations",
                )
            })?),
        };
        Ok(Scope { subaccount: self.subaccount.clone(), level, kind: Kind::Destination })
    }

    /// Looks up the provider of a subscriber's token; only the consume API needs it.
    fn resolve_provider(&mut self, s: &DestinationService) {
        self.provider =
            self.zone_client.as_deref().and_then(|c| s.client_zone(c)).filter(|zone| *zone != self.subaccount);
    }

    fn subaccount_scope(&self) -> Scope {
        Scope { subaccount: self.subaccount.clone(), level: Level::Subaccount, kind: Kind::Destination }
    }

    /// The destinations a consume-API level names for this caller (SPEC §1.2).
    fn level_scope(&self, level: ConsumeLevel) -> Result<Scope, ApiError> {
        let provider = || {
            self.provider.clone().ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Level '{}' is for a subscriber's token (one a multi-tenant application got in a subscriber's \
                     subaccount); this token is the provider's own, so use 'subaccount' or 'instance'",
                    level.as_str()
                ))
            })
        };
        match level {
            ConsumeLevel::Subaccount => self.scope(Collection::Subaccount),
            ConsumeLevel::Instance => self.scope(Collection::Instance),
            ConsumeLevel::ProviderSubaccount => {
                Ok(Scope { subaccount: provider()?, level: Level::Subaccount, kind: Kind::Destination })
            }
            ConsumeLevel::ProviderInstance => {
                let instance = self.scope(Collection::Instance)?.level;
                Ok(Scope { subaccount: provider()?, level: instance, kind: Kind::Destination })
            }
        }
    }
}

/// The levels of the consume API (`/v2/destinations/{name}@{level}`, `X-fragment-name: f@level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConsumeLevel {
    Subaccount,
    Instance,
    ProviderSubaccount,
    ProviderInstance,
}

impl ConsumeLevel {
    fn as_str(self) -> &'static str {
        match self {
            ConsumeLevel::Subaccount => "subaccount",
            ConsumeLevel::Instance => "instance",
            ConsumeLevel::ProviderSubaccount => "provider_subaccount",
            ConsumeLevel::ProviderInstance => "provider_instance",
        }
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
        let subdomain = claims_subdomain(&claims);
        let user = UserToken::from_claims(token, &claims);
        // An external issuer's token stays within the subaccount its trust names.
        let zone_client = claims.client_id.clone().filter(|_| !claims.external_issuer);
        Ok(Caller {
            zone_client,
            provider: None,
            instance: non_empty(claims.ext_attr.serviceinstanceid.clone())
                .or_else(|| non_empty(claims.client_id.clone())),
            subaccount: claims.zid.clone(),
            subdomain,
            user,
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
    Destination::try_from(raw)
        .and_then(|d| d.check().map(|()| d))
        .map_err(|e| ApiError::bad_request(format!("Invalid destination: {e}")))
}

/// One entry of a bulk answer (`207 Multi-Status` when any entry failed).
#[derive(Serialize)]
struct ItemResult {
    name: String,
    status: u16,
    /// The stored object's ETag, on success (SPEC §1.6).
    #[serde(skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cause: Option<String>,
}

impl ItemResult {
    fn of(name: String, ok: StatusCode, outcome: Result<Option<String>, ApiError>) -> Self {
        match outcome {
            Ok(etag) => Self { name, status: ok.as_u16(), etag, cause: None },
            Err(e) => Self { name, status: e.status.as_u16(), etag: None, cause: Some(e.message) },
        }
    }
}

/// Runs `op` for every item and answers `ok` if all succeeded, 207 otherwise.
async fn bulk<F, Fut>(items: Vec<RawDestination>, ok: StatusCode, op: F) -> Response
where
    F: Fn(Destination) -> Fut,
    Fut: Future<Output = Result<(), ApiError>>,
{
    bulk_of(items, ok, |raw| raw.name(), validate, op).await
}

/// [`bulk`] for any kind of object: `name` labels an item, `check` validates it.
async fn bulk_of<T: Serialize, F, Fut>(
    items: Vec<RawDestination>,
    ok: StatusCode,
    name: fn(&RawDestination) -> Option<&str>,
    check: fn(RawDestination) -> Result<T, ApiError>,
    op: F,
) -> Response
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<(), ApiError>>,
{
    let mut results = Vec::with_capacity(items.len());
    for raw in items {
        let name = name(&raw).unwrap_or_default().to_owned();
        let outcome = match check(raw) {
            Ok(item) => {
                let etag = crate::etag_of(&item);
                op(item).await.map(|()| etag)
            }
            Err(e) => Err(e),
        };
        results.push(ItemResult::of(name, ok, outcome));
    }
    let status = if results.iter().all(|r| r.status == ok.as_u16()) { ok } else { StatusCode::MULTI_STATUS };
    (status, Json(results)).into_response()
}

async fn list(
    State(s): Svc,
    caller: Caller,
    kind: Collection,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mode = query::parse(query.as_deref()).map_err(ApiError::bad_request)?;
    let metadata = query::parse_metadata(query.as_deref(), &mode).map_err(ApiError::bad_request)?;
    let scope = caller.scope(kind)?;
    // Secrets never leave through a list, whatever SAP does: lists end up in UIs and logs.
    list_collection(
        &s,
        &scope,
        mode,
        metadata,
        Destination::name,
        Destination::without_secrets,
        kind.path("Destinations"),
    )
    .await
}

/// A list answer for one collection: the objects as `public` shows them, filtered, in the
/// query's mode, each with `$metadata` when `metadata` asks for it.
async fn list_collection<T: Serialize + serde::de::DeserializeOwned>(
    s: &DestinationService,
    scope: &Scope,
    mode: query::Mode,
    metadata: query::Metadata,
    name: fn(&T) -> &str,
    public: fn(&T) -> T,
    path: String,
) -> Result<Response, ApiError> {
    let mut rows = s.list_stored::<T>(scope).await?;
    if let query::Mode::Filter(filter) = &mode {
        let labels = if filter.needs_labels() { labels::of_collection(s, scope).await? } else { Default::default() };
        let (now, none) = (crate::store::now_secs(), Vec::new());
        rows.retain(|l| {
            let labels = labels.get(&l.name).unwrap_or(&none);
            filter.matches(&query::Item { name: &l.name, modified_at: l.modified_at, labels }, now)
        });
    }
    if metadata.any() {
        let mut items = Vec::with_capacity(rows.len());
        for l in &rows {
            let mut item = serde_json::to_value(public(&l.stored.destination))
                .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Cannot encode a listed object"))?;
            let mut meta = serde_json::Map::new();
            if metadata.modification_time {
                meta.insert("modification_time".into(), rfc3339(l.modified_at).into());
            }
            if metadata.etag {
                meta.insert("etag".into(), l.stored.etag.clone().into());
            }
            if let Some(map) = item.as_object_mut() {
                map.insert("$metadata".into(), meta.into());
            }
            items.push(item);
        }
        return Ok(Json(items).into_response());
    }
    let items: Vec<T> = rows.iter().map(|l| public(&l.stored.destination)).collect();
    Ok(list_response(items, name, mode, path))
}

/// Unix seconds as an RFC 3339 UTC time (`2026-11-23T05:40:34Z`).
fn rfc3339(secs: i64) -> String {
    // Days to civil date: H. Hinnant's algorithm, proleptic Gregorian calendar.
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

impl Collection {
    /// `subaccountDestinations`, `instanceCertificates`, ...
    fn path(self, what: &str) -> String {
        match self {
            Collection::Subaccount => format!("subaccount{what}"),
            Collection::Instance => format!("instance{what}"),
        }
    }
}

/// A list answer in the query's mode: all, filtered, names only, or one page with the
/// `Page-Count`/`Entity-Count`/`Link` headers asked for.
fn list_response<T: Serialize>(items: Vec<T>, name: fn(&T) -> &str, mode: query::Mode, path: String) -> Response {
    use query::Mode;
    match mode {
        // Filters are applied by the caller, which has the rows' names, times and labels.
        Mode::All | Mode::Filter(_) => Json(items).into_response(),
        Mode::SelectName => Json(items.iter().map(|i| json!({ "Name": name(i) })).collect::<Vec<_>>()).into_response(),
        Mode::Page(p) => {
            let total = items.len();
            let pages = total.div_ceil(p.size);
            let page: Vec<T> = items.into_iter().skip((p.page - 1).saturating_mul(p.size)).take(p.size).collect();
            let mut response = Json(page).into_response();
            let headers = response.headers_mut();
            if p.page_count {
                headers.insert("Page-Count", HeaderValue::from(pages));
            }
            if p.entity_count {
                headers.insert("Entity-Count", HeaderValue::from(total));
            }
            let link = |n: usize, rel: &str| format!("</{path}?$page={n}&$pageSize={}>; rel='{rel}'", p.size);
            let mut links = Vec::new();
            if p.page > 1 && p.page <= pages {
                links.push(link(p.page - 1, "previous"));
            }
            if p.page < pages {
                links.push(link(p.page + 1, "next"));
            }
            if !links.is_empty()
                && let Ok(v) = HeaderValue::from_str(&links.join(", "))
            {
                headers.insert("Link", v);
            }
            response
        }
    }
}

#[derive(Serialize)]
struct DeleteSummary {
    name: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

/// Bulk DELETE on a collection: `$filter=Name in (...)` is required (SPEC §1.6).
async fn delete_many(
    State(s): Svc,
    caller: Caller,
    collection: Collection,
    kind: Kind,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let names = match query::parse(query.as_deref()).map_err(ApiError::bad_request)? {
        query::Mode::Filter(query::Filter::In(names)) => names,
        _ => {
            return Err(ApiError::bad_request(
                "Deleting from a collection needs $filter=Name in ('a','b') naming what to delete",
            ));
        }
    };
    let scope = caller.scope(collection)?.of(kind);
    if kind == Kind::Destination {
        // Nothing is deleted while one of them is still another destination's assertion provider.
        for name in &names {
            refuse_if_assertion_provider(&s, &scope.row(name), &names).await?;
        }
    }
    let mut summary = Vec::with_capacity(names.len());
    let mut count = 0;
    for name in names {
        if s.remove(&scope.row(&name)).await? {
            count += 1;
            tracing::info!(subaccount = %scope.subaccount, level = ?scope.level, kind = ?scope.kind, %name, "deleted");
            summary.push(DeleteSummary { name, status: "DELETED", reason: None });
        } else {
            summary.push(DeleteSummary { name, status: "NOT_FOUND", reason: Some("Could not find configuration") });
        }
    }
    Ok(Json(json!({ "Count": count, "Summary": summary })).into_response())
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
            Ok(created_empty())
        }
        Payload::Many(items) => Ok(bulk(items, StatusCode::CREATED, create_one).await),
    }
}

async fn update(
    State(s): Svc,
    caller: Caller,
    kind: Collection,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let scope = caller.scope(kind)?;
    // If-Match makes the update conditional on the ETag a GET returned, so two clients that
    // each change one property of what they read cannot silently undo each other's change.
    if let Some(if_match) = headers.get(IF_MATCH) {
        let if_match = if_match.to_str().map_err(|_| ApiError::bad_request("If-Match is not valid text"))?;
        let Payload::One(raw) = parse_body(body)? else {
            return Err(ApiError::bad_request("If-Match applies to one destination; send it without an array"));
        };
        let dest = validate(raw)?;
        let key = scope.row(dest.name());
        return match s.replace_if_match(&key, &dest, if_match).await? {
            crate::Conditional::Done => {
                tracing::info!(subaccount = %scope.subaccount, level = ?scope.level, name = %key.name, "destination updated");
                Ok(Json(json!({ "Count": 1 })).into_response())
            }
            crate::Conditional::Missing => Err(ApiError::not_found()),
            crate::Conditional::Changed => Err(ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "If-Match does not match the current ETag: the destination has changed; read it again",
            )),
        };
    }
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

/// What an item route serves: the stored kind, the 404 message, and the noun for the log.
#[derive(Clone, Copy)]
struct Object {
    kind: Kind,
    not_found: &'static str,
    noun: &'static str,
}

const DESTINATION: Object = Object { kind: Kind::Destination, not_found: NOT_FOUND_MESSAGE, noun: "destination" };
const FRAGMENT: Object = Object { kind: Kind::Fragment, not_found: FRAGMENT_NOT_FOUND, noun: "fragment" };
const CERTIFICATE: Object = Object { kind: Kind::Certificate, not_found: CERTIFICATE_NOT_FOUND, noun: "certificate" };

/// `GET` (with ETag) and `DELETE` of one destination, fragment or certificate.
fn object_item<T>(kind: Collection, object: Object) -> MethodRouter<Arc<DestinationService>>
where
    T: serde::de::DeserializeOwned + Serialize + Send + Sync + 'static,
{
    get(move |s: Svc, c: Caller, p: Result<Path<String>, PathRejection>, h: HeaderMap| {
        get_stored::<T>(s, c, kind, object, p, h)
    })
    .delete(move |s: Svc, c: Caller, p: Result<Path<String>, PathRejection>| delete_stored(s, c, kind, object, p))
}

async fn get_stored<T: serde::de::DeserializeOwned + Serialize>(
    State(s): Svc,
    caller: Caller,
    kind: Collection,
    object: Object,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, object.not_found);
    let Ok(Path(name)) = path else { return Err(not_found()) };
    let key = caller.scope(kind)?.of(object.kind).row(&name);
    let stored = s.load::<T>(&key).await?.ok_or_else(not_found)?;
    Ok(with_etag(&headers, &stored.etag, Json(&stored.destination).into_response()))
}

async fn delete_stored(
    State(s): Svc,
    caller: Caller,
    kind: Collection,
    object: Object,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, object.not_found);
    let Ok(Path(name)) = path else { return Err(not_found()) };
    let scope = caller.scope(kind)?.of(object.kind);
    if object.kind == Kind::Destination {
        refuse_if_assertion_provider(&s, &scope.row(&name), &[]).await?;
    }
    if !s.remove(&scope.row(&name)).await? {
        return Err(not_found());
    }
    tracing::info!(subaccount = %scope.subaccount, level = ?scope.level, %name, "{} deleted", object.noun);
    Ok(Json(json!({ "Count": 1 })).into_response())
}

/// SPEC §1.6, §2.5: a destination that another one uses as its client assertion provider is
/// not deleted (400, in SAP's words). `deleted_too` are deleted in the same request.
async fn refuse_if_assertion_provider(
    s: &DestinationService,
    key: &RowKey,
    deleted_too: &[String],
) -> Result<(), ApiError> {
    let consumers = s.assertion_consumers(key, deleted_too).await?;
    if consumers.is_empty() {
        return Ok(());
    }
    Err(ApiError::bad_request(format!(
        "Cannot perform operation on the destination '{}' because it is used as an assertion provider for \
         destination '{}'",
        key.name,
        consumers.join("', '")
    )))
}

fn fragment_collection(kind: Collection) -> MethodRouter<Arc<DestinationService>> {
    get(move |s: Svc, c: Caller, q: RawQuery| list_fragments(s, c, kind, q))
        .post(move |s: Svc, c: Caller, b: Body| write_fragments(s, c, kind, b, true))
        .put(move |s: Svc, c: Caller, b: Body| write_fragments(s, c, kind, b, false))
}

fn fragment_item(kind: Collection) -> MethodRouter<Arc<DestinationService>> {
    object_item::<Fragment>(kind, FRAGMENT)
}

const FRAGMENT_NOT_FOUND: &str = "Fragment with the specified name was not found";

fn validate_fragment(raw: RawDestination) -> Result<Fragment, ApiError> {
    Fragment::try_from(raw)
        .and_then(|f| f.check().map(|()| f))
        .map_err(|e| ApiError::bad_request(format!("Invalid destination fragment: {e}")))
}

async fn list_fragments(
    State(s): Svc,
    caller: Caller,
    kind: Collection,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mode = query::parse(query.as_deref()).map_err(ApiError::bad_request)?;
    let scope = caller.scope(kind)?.of(Kind::Fragment);
    let path = kind.path("DestinationFragments");
    list_collection(&s, &scope, mode, Default::default(), Fragment::name, Fragment::without_secrets, path).await
}

/// POST (`create`) or PUT of one fragment or an array of them.
async fn write_fragments(
    State(s): Svc,
    caller: Caller,
    kind: Collection,
    body: Body,
    create: bool,
) -> Result<Response, ApiError> {
    let scope = caller.scope(kind)?.of(Kind::Fragment);
    let write_one = |fragment: Fragment| {
        let (s, scope) = (&s, &scope);
        async move {
            let key = scope.row(fragment.name());
            if create {
                if !s.create(&key, &fragment).await? {
                    return Err(ApiError::new(StatusCode::CONFLICT, "Fragment with the same name already exists"));
                }
            } else if !s.replace(&key, &fragment).await? {
                return Err(ApiError::new(StatusCode::NOT_FOUND, FRAGMENT_NOT_FOUND));
            }
            tracing::info!(subaccount = %scope.subaccount, level = ?scope.level, name = %key.name, create, "fragment written");
            Ok(())
        }
    };
    let ok = if create { StatusCode::CREATED } else { StatusCode::OK };
    match parse_body(body)? {
        Payload::One(raw) => {
            write_one(validate_fragment(raw)?).await?;
            Ok(if create { created_empty() } else { Json(json!({ "Count": 1 })).into_response() })
        }
        Payload::Many(items) => Ok(bulk_of(items, ok, raw_fragment_name, validate_fragment, write_one).await),
    }
}

fn certificate_collection(kind: Collection) -> MethodRouter<Arc<DestinationService>> {
    get(move |s: Svc, c: Caller, q: RawQuery| list_certificates(s, c, kind, q))
        .post(move |s: Svc, c: Caller, b: Body| write_certificates(s, c, kind, b, true))
        .put(move |s: Svc, c: Caller, b: Body| write_certificates(s, c, kind, b, false))
        .delete(move |s: Svc, c: Caller, q: RawQuery| delete_many(s, c, kind, Kind::Certificate, q))
}

fn certificate_item(kind: Collection) -> MethodRouter<Arc<DestinationService>> {
    get(move |s: Svc, c: Caller, p: Result<Path<String>, PathRejection>, h: HeaderMap| {
        get_certificate(s, c, kind, p, h)
    })
    .delete(move |s: Svc, c: Caller, p: Result<Path<String>, PathRejection>| delete_stored(s, c, kind, CERTIFICATE, p))
}

async fn load_certificate(
    s: &DestinationService,
    caller: &Caller,
    kind: Collection,
    path: Result<Path<String>, PathRejection>,
) -> Result<crate::Stored<Certificate>, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, CERTIFICATE_NOT_FOUND);
    let Ok(Path(name)) = path else { return Err(not_found()) };
    let key = caller.scope(kind)?.of(Kind::Certificate).row(&name);
    s.load::<Certificate>(&key).await?.ok_or_else(not_found)
}

/// One certificate with its content ("including any private data", as SAP's documentation
/// says) but never the password of a generated one.
async fn get_certificate(
    State(s): Svc,
    caller: Caller,
    kind: Collection,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let stored = load_certificate(&s, &caller, kind, path).await?;
    Ok(with_etag(&headers, &stored.etag, Json(stored.destination.without_secrets()).into_response()))
}

/// `GET .../{name}/publicKeys`: the certificate chains of an entry, without keys.
async fn public_keys(
    State(s): Svc,
    caller: Caller,
    kind: Collection,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let stored = load_certificate(&s, &caller, kind, path).await?;
    let keys = crate::certgen::public_keys(&stored.destination).map_err(ApiError::bad_request)?;
    let etag = crate::etag_of(&keys).unwrap_or_default();
    Ok(with_etag(&headers, &etag, Json(keys).into_response()))
}

const CERTIFICATE_NOT_FOUND: &str = "Certificate with the specified name was not found";

/// One uploaded item: its `Name` as sent (to label a per-item result) and the outcome of
/// parsing and validating it.
type CertificateItem = (Option<String>, Result<Certificate, ApiError>);

/// The items, and whether the body was one object rather than an array.
fn parse_certificates(body: Body) -> Result<(Vec<CertificateItem>, bool), ApiError> {
    let bytes = body.map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("Request body is not valid JSON: {e}")))?;
    let (items, single) = match value {
        serde_json::Value::Array(items) if items.is_empty() => {
            return Err(ApiError::bad_request("Request body is an empty array: send at least one certificate"));
        }
        serde_json::Value::Array(items) => (items, false),
        other => (vec![other], true),
    };
    let parsed: Vec<_> = items
        .into_iter()
        .map(|item| {
            let name = item.get("Name").and_then(serde_json::Value::as_str).map(str::to_owned);
            let cert = serde_json::from_value::<Certificate>(item)
                .map_err(|e| {
                    ApiError::bad_request(format!(
                        "Request body is not a valid certificate ({{\"Name\", \"Type\", \"Content\": base64}} or \
                         {{\"Name\", \"Attributes\": {{\"CN\", \"Validity\", ...}}}}): {e}"
                    ))
                })
                .and_then(|c| {
                    c.validate().map_err(|e| ApiError::bad_request(format!("Invalid certificate: {e}"))).map(|()| c)
                });
            (name, cert)
        })
        .collect();
    Ok((parsed, single))
}

async fn list_certificates(
    State(s): Svc,
    caller: Caller,
    kind: Collection,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mode = query::parse(query.as_deref()).map_err(ApiError::bad_request)?;
    if matches!(mode, query::Mode::Filter(ref f) if !matches!(f, query::Filter::In(_) | query::Filter::Labels(_))) {
        return Err(ApiError::bad_request(
            "Certificates can only be filtered with $filter=Name in ('a','b') or Label['key'] HAS ('value')",
        ));
    }
    let scope = caller.scope(kind)?.of(Kind::Certificate);
    // Content may hold private keys: lists give names and types only.
    let path = kind.path("Certificates");
    list_collection(&s, &scope, mode, Default::default(), |c: &Certificate| &c.name, Certificate::without_content, path)
        .await
}

async fn write_certificates(
    State(s): Svc,
    caller: Caller,
    kind: Collection,
    body: Body,
    create: bool,
) -> Result<Response, ApiError> {
    let scope = caller.scope(kind)?.of(Kind::Certificate);
    let ok = if create { StatusCode::CREATED } else { StatusCode::OK };
    let (items, single) = parse_certificates(body)?;
    let mut results = Vec::with_capacity(items.len());
    for (name, cert) in items {
        let cert = match cert {
            Ok(cert) if cert.attributes.is_some() => match s.generate_certificate(&scope.subaccount, cert).await? {
                Ok(generated) => Ok(generated),
                Err(crate::certgen::BadAttributes(why)) => {
                    Err(ApiError::bad_request(format!("Invalid certificate: {why}")))
                }
            },
            other => other,
        };
        let outcome = match cert {
            Ok(cert) => {
                let key = scope.row(&cert.name);
                let etag = crate::etag_of(&cert);
                if create {
                    if s.create(&key, &cert).await? {
                        Ok(etag)
                    } else {
                        Err(ApiError::new(StatusCode::CONFLICT, "Certificate with the same name already exists"))
                    }
                } else if s.replace(&key, &cert).await? {
                    Ok(etag)
                } else {
                    Err(ApiError::new(StatusCode::NOT_FOUND, CERTIFICATE_NOT_FOUND))
                }
            }
            Err(e) => Err(e),
        };
        if outcome.is_ok() {
            tracing::info!(subaccount = %scope.subaccount, level = ?scope.level, name = ?name, create, "certificate written");
        }
        if single {
            outcome?;
            return Ok(if create { created_empty() } else { Json(json!({ "Count": 1 })).into_response() });
        }
        results.push(ItemResult::of(name.unwrap_or_default(), ok, outcome));
    }
    let status = if results.iter().all(|r| r.status == ok.as_u16()) { ok } else { StatusCode::MULTI_STATUS };
    Ok((status, Json(results)).into_response())
}

fn respond_with_etag(headers: &HeaderMap, destination: &Destination, response: Response) -> Response {
    match crate::etag_of(destination) {
        Some(etag) => with_etag(headers, &etag, response),
        None => response,
    }
}

/// `response` with the `ETag`, or a 304 when `If-None-Match` names it.
fn with_etag(headers: &HeaderMap, etag: &str, response: Response) -> Response {
    let names = |h| {
        headers.get(h).map(|v: &HeaderValue| {
            v.to_str()
                .is_ok_and(|v| v.split(',').map(str::trim).any(|t| t == "*" || t.trim_start_matches("W/") == etag))
        })
    };
    let mut response = if names(IF_MATCH) == Some(false) {
        ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "If-Match does not match the current ETag: the object has changed; read it again",
        )
        .into_response()
    } else if names(IF_NONE_MATCH) == Some(true) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        response
    };
    if let Ok(value) = HeaderValue::from_str(etag) {
        response.headers_mut().insert(ETAG, value);
    }
    response
}

/// The consume API's levels of a call: the caller, and the level the destination was read from.
#[derive(Clone, Copy)]
struct Levels<'a> {
    caller: &'a Caller,
    destination: ConsumeLevel,
}

/// SPEC §1.7: merges the fragments named by `X-fragment-name` (comma-separated, in order) from
/// the destination's own level. A missing fragment is a 404 unless `X-fragment-optional: true`
/// (only honoured for a single fragment). Returns the merged destination and the rows of the
/// fragments applied.
async fn apply_fragments(
    s: &DestinationService,
    key: &RowKey,
    destination: Destination,
    headers: &HeaderMap,
    levels: Option<Levels<'_>>,
) -> Result<(Destination, Vec<RowKey>), ApiError> {
    if headers.get_all("x-fragment-name").iter().count() > 1 {
        return Err(ApiError::bad_request("Send the X-fragment-name header once (a comma-separated list for several)"));
    }
    let Some(list) = header(headers, "x-fragment-name")? else { return Ok((destination, Vec::new())) };
    // v2 (`levels` set): `name@<level>`; otherwise the destination's level.
    let mut names = Vec::new();
    for item in list.split(',').map(str::trim) {
        let (name, scope) = match (levels, item.rsplit_once('@')) {
            (Some(levels), Some((name, level))) => {
                let level = parse_level(level)?;
                // SPEC §1.2: in a multi-tenant call the subscriber's subaccount level is not
                // mixed with another level.
                let subaccount = [levels.destination, level].contains(&ConsumeLevel::Subaccount);
                if levels.caller.provider.is_some() && subaccount && level != levels.destination {
                    return Err(ApiError::bad_request(format!(
                        "Fragment '{name}@{}' cannot be merged into a destination of level '{}': with a subscriber's \
                         token the 'subaccount' level cannot be mixed with another level",
                        level.as_str(),
                        levels.destination.as_str()
                    )));
                }
                (name, levels.caller.level_scope(level)?)
            }
            _ => (item, key.scope.clone()),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(ApiError::bad_request(format!(
                "X-fragment-name '{item}' is not a fragment name (letters, digits, '_' and '-', comma-separated)"
            )));
        }
        names.push((name, scope.of(Kind::Fragment)));
    }
    let optional = match header(headers, "x-fragment-optional")? {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(_) => return Err(ApiError::bad_request("Header X-fragment-optional must be 'true' or 'false'")),
    };
    let optional = optional && names.len() == 1;
    let mut merged = destination;
    let mut applied = Vec::with_capacity(names.len());
    for (name, scope) in names {
        let row = scope.row(name);
        match s.load::<Fragment>(&row).await? {
            Some(stored) => {
                merged = merged.merged_with(&stored.destination);
                applied.push(row);
            }
            None if optional => return Ok((merged, applied)),
            None => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "Fragment '{name}' named in X-fragment-name was not found on the level it was looked up \
                         (that of destination '{}' unless '@level' is given); create it there or send \
                         X-fragment-optional: true",
                        key.name
                    ),
                ));
            }
        }
    }
    let names: Vec<&str> = applied.iter().map(|k| k.name.as_str()).collect();
    merged
        .set("FragmentName", names.join(","))
        .map_err(|e| ApiError::bad_request(format!("Merged destination is invalid: {e}")))?;
    Ok((merged, applied))
}

#[derive(Serialize)]
struct FindResponse<'a> {
    owner: Owner<'a>,
    #[serde(rename = "destinationConfiguration")]
    destination_configuration: &'a Destination,
    #[serde(rename = "authTokens", skip_serializing_if = "Option::is_none")]
    auth_tokens: Option<Vec<AuthToken>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    certificates: Option<Vec<serde_json::Value>>,
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
    issued_token_type: Option<String>,
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
            issued_token_type: None,
            error: None,
        }
    }

    fn bearer(token: Token) -> Self {
        Self {
            expires_in: token.expires_in.map(|s| s.to_string()),
            scope: token.scope,
            refresh_token: token.refresh_token.map(|t| t.into_inner()),
            issued_token_type: token.issued_token_type,
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
            issued_token_type: None,
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
    check_tenant_headers(&headers)?;
    let chain = Chain::of(&headers)?;
    let (key, stored) =
        s.load_first::<Destination>(find_keys(&caller, &name)).await?.ok_or_else(ApiError::not_found)?;
    // Without fragments or `$skipCredentials` the answer is the stored destination, whose ETag
    // came with it; otherwise the merged one gets its own.
    let as_stored = header(&headers, "x-fragment-name")?.is_none() && !query_flag(query.as_deref(), "$skipCredentials");
    let (destination, _) = apply_fragments(&s, &key, stored.destination, &headers, None).await?;
    let (destination, auth_tokens) =
        finish(&s, &caller, &key, destination, query.as_deref(), &headers, chain.as_ref()).await?;
    let certificates = found_certificates(&s, &key, &destination, query.as_deref()).await?;
    let etag = if as_stored { Some(stored.etag) } else { crate::etag_of(&destination) };
    let body = FindResponse {
        owner: Owner { subaccount_id: &key.scope.subaccount, instance_id: key.scope.instance_id() },
        destination_configuration: &destination,
        auth_tokens,
        certificates,
    };
    let response = Json(body).into_response();
    Ok(match etag {
        Some(etag) => with_etag(&headers, &etag, response),
        None => response,
    })
}

/// Where find looks for `name`: the caller's instance level (if the token names one), then its
/// subaccount level.
fn find_keys(caller: &Caller, name: &str) -> Vec<RowKey> {
    let mut keys = Vec::with_capacity(2);
    if let Ok(instance) = caller.scope(Collection::Instance) {
        keys.push(instance.row(name));
    }
    keys.push(caller.subaccount_scope().row(name));
    keys
}

/// SPEC §1.11: a predefined destination chain, from `X-chain-name` and its `X-chain-var-*`.
struct Chain {
    kind: ChainKind,
    /// The destination of the first step, found like a find.
    first: String,
    fragment: Option<String>,
    fragment_optional: bool,
    /// The token the first step exchanges, and its RFC 8693 type.
    token: String,
    token_type: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChainKind {
    /// An IAS-signed SAML assertion from an OAuth2TokenExchange destination, used as the
    /// client-provided assertion of the OAuth2SAMLBearerAssertion destination asked for.
    IasSamlBearer,
    /// A user token exchanged by the first destination, then used as the user token of the
    /// destination asked for.
    SequentialUser,
}

const CHAIN_IAS_SAML: &str = "com.sap.iasGeneratedOAuth2SamlBearerAssertion";
const CHAIN_SEQUENTIAL_USER: &str = "com.sap.sequentialUserPropagation";

impl Chain {
    fn of(headers: &HeaderMap) -> Result<Option<Self>, ApiError> {
        let Some(name) = header(headers, "x-chain-name")? else { return Ok(None) };
        let (kind, first, fragment, token, token_type) = match name {
            CHAIN_IAS_SAML => (
                ChainKind::IasSamlBearer,
                "samlProviderDestinationName",
                "samlProviderFragment",
                "subjectToken",
                Some("subjectTokenType"),
            ),
            CHAIN_SEQUENTIAL_USER => (
                ChainKind::SequentialUser,
                "tokenTransformationDestinationName",
                "tokenTransformationFragment",
                "userToken",
                None,
            ),
            other => {
                return Err(ApiError::bad_request(format!(
                    "Unknown X-chain-name '{other}': the predefined chains are {CHAIN_IAS_SAML} and \
                     {CHAIN_SEQUENTIAL_USER}"
                )));
            }
        };
        let var = |v: &str| header(headers, &format!("x-chain-var-{v}"));
        let required = |v: &str| {
            var(v)?
                .map(str::to_owned)
                .ok_or_else(|| ApiError::bad_request(format!("Chain '{name}' needs the header X-chain-var-{v}")))
        };
        let fragment_optional = match var(&format!("{fragment}Optional"))? {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(_) => {
                return Err(ApiError::bad_request(format!(
                    "Header X-chain-var-{fragment}Optional must be 'true' or 'false'"
                )));
            }
        };
        Ok(Some(Self {
            kind,
            first: required(first)?,
            fragment: var(&format!("{fragment}Name"))?.map(str::to_owned),
            fragment_optional,
            token: required(token)?,
            token_type: match token_type {
                Some(t) => required(t)?,
                None => TOKEN_TYPE_JWT.to_owned(),
            },
        }))
    }

    /// The chain's token for `dest` (`key`): the first step's token, fed into `dest`'s flow.
    async fn tokens(
        &self,
        s: &DestinationService,
        caller: &Caller,
        key: &RowKey,
        dest: &Destination,
        headers: &HeaderMap,
    ) -> Result<Vec<AuthToken>, ApiError> {
        use AuthenticationType::*;
        let wants = match self.kind {
            ChainKind::IasSamlBearer => matches!(dest.authentication(), Some(OAuth2SAMLBearerAssertion)),
            ChainKind::SequentialUser => matches!(
                dest.authentication(),
                Some(OAuth2UserTokenExchange | OAuth2JWTBearer | OAuth2SAMLBearerAssertion | SAMLAssertion)
            ),
        };
        if !wants {
            let what = match self.kind {
                ChainKind::IasSamlBearer => "OAuth2SAMLBearerAssertion",
                ChainKind::SequentialUser => {
                    "a user flow (OAuth2UserTokenExchange, OAuth2JWTBearer, OAuth2SAMLBearerAssertion or SAMLAssertion)"
                }
            };
            return Err(ApiError::bad_request(format!(
                "Destination '{}' cannot end this chain: its Authentication must be {what}",
                key.name
            )));
        }
        // Step 1: the first destination, looked up and merged like a find, with the chain's token.
        let (first_key, stored) =
            s.load_first::<Destination>(find_keys(caller, &self.first)).await?.ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Destination '{}' named by the chain variables was not found",
                    self.first
                ))
            })?;
        let mut step = HeaderMap::new();
        if let Some(fragment) = &self.fragment {
            step.insert("x-fragment-name", header_value(fragment)?);
            if self.fragment_optional {
                step.insert("x-fragment-optional", HeaderValue::from_static("true"));
            }
        }
        let (first, _) = apply_fragments(s, &first_key, stored.destination, &step, None).await?;
        step.insert("x-subject-token", header_value(&self.token)?);
        step.insert("x-subject-token-type", header_value(&self.token_type)?);
        if self.kind == ChainKind::SequentialUser {
            step.insert("x-user-token", header_value(&self.token)?);
        }
        let failed =
            |why: String| Ok(vec![AuthToken::failed(format!("chain step 1, destination '{}': {why}", self.first))]);
        let token = match auth_tokens(s, caller, &first_key, &first, &step).await?.and_then(|t| t.into_iter().next()) {
            None => return failed("its Authentication yields no token".into()),
            Some(AuthToken { error: Some(e), .. }) => return failed(e),
            Some(t) => t.value,
        };
        // Step 2: the destination asked for, with the first step's token where its flow takes one.
        let mut step = headers.clone();
        step.remove("x-tenant");
        let mut dest = dest.clone();
        match self.kind {
            ChainKind::IasSamlBearer => {
                step.insert("x-samlassertion", header_value(&token)?);
                dest.set("SAMLAssertionProvider", "ClientProvided".to_owned())
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
            }
            ChainKind::SequentialUser => {
                step.insert("x-user-token", header_value(&token)?);
            }
        }
        Ok(auth_tokens(s, caller, key, &dest, &step).await?.unwrap_or_default())
    }
}

/// RFC 8693's type of a JWT, which the user token of a sequential chain is.
const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";

fn header_value(value: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(value).map_err(|_| ApiError::bad_request("A chain variable is not a valid header value"))
}

fn check_tenant_headers(headers: &HeaderMap) -> Result<(), ApiError> {
    let tenant = header(headers, "x-tenant")?;
    if tenant.is_some() && header(headers, "x-user-token")?.is_some() {
        return Err(ApiError::bad_request("The headers X-user-token and X-tenant cannot be used together"));
    }
    if tenant.is_some_and(|t| !tokens::is_valid_subdomain(t)) {
        return Err(ApiError::bad_request("Header X-tenant must be a tenant subdomain (letters, digits and '-')"));
    }
    Ok(())
}

/// Token retrieval (through `chain`, if any) and `$skipCredentials`, shared by find and consume.
async fn finish(
    s: &DestinationService,
    caller: &Caller,
    key: &RowKey,
    destination: Destination,
    query: Option<&str>,
    headers: &HeaderMap,
    chain: Option<&Chain>,
) -> Result<(Destination, Option<Vec<AuthToken>>), ApiError> {
    let auth_tokens = if query_flag(query, "$skipTokenRetrieval") {
        None
    } else if let Some(chain) = chain {
        Some(chain.tokens(s, caller, key, &destination, headers).await?)
    } else {
        auth_tokens(s, caller, key, &destination, headers).await?
    };
    let destination = if query_flag(query, "$skipCredentials") { destination.without_secrets() } else { destination };
    Ok((destination, auth_tokens))
}

/// The `@level` of the consume API (SPEC §1.2, §1.5).
fn parse_level(level: &str) -> Result<ConsumeLevel, ApiError> {
    match level {
        "subaccount" => Ok(ConsumeLevel::Subaccount),
        "instance" => Ok(ConsumeLevel::Instance),
        "provider_subaccount" => Ok(ConsumeLevel::ProviderSubaccount),
        "provider_instance" => Ok(ConsumeLevel::ProviderInstance),
        other => Err(ApiError::bad_request(format!(
            "Unknown level '{other}': use 'subaccount', 'instance', 'provider_subaccount' or 'provider_instance'"
        ))),
    }
}

/// `GET /v2/destinations/{name}[@{level}]`: one level only (default `instance`), no fallback.
async fn consume(
    State(s): Svc,
    mut caller: Caller,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Ok(Path(target)) = path else { return Err(ApiError::not_found()) };
    let (name, level) = match target.rsplit_once('@') {
        Some((name, level)) => (name, parse_level(level)?),
        None => (target.as_str(), ConsumeLevel::Instance),
    };
    check_tenant_headers(&headers)?;
    caller.resolve_provider(&s);
    if header(&headers, "x-chain-name")?.is_some() {
        return Err(ApiError::bad_request(
            "Destination chaining (X-chain-name) is served by GET /v1/destinations/{name} only",
        ));
    }
    let include_owner = match form_urlencoded::parse(query.as_deref().unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "$includeMetadata" || k == "includeMetadata")
    {
        None => false,
        Some((_, v)) if v == "owner" => true,
        Some((_, v)) => {
            return Err(ApiError::bad_request(format!("$includeMetadata='{v}' is not supported; only 'owner' is")));
        }
    };
    let key = caller.level_scope(level)?.row(name);
    let destination = s.load::<Destination>(&key).await?.ok_or_else(ApiError::not_found)?.destination;
    let levels = Levels { caller: &caller, destination: level };
    let (destination, fragments) = apply_fragments(&s, &key, destination, &headers, Some(levels)).await?;
    let (destination, auth_tokens) = finish(&s, &caller, &key, destination, query.as_deref(), &headers, None).await?;
    let mut configuration = serde_json::to_value(&destination)
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Cannot encode the destination"))?;
    if include_owner && let Some(map) = configuration.as_object_mut() {
        let owner = |name_key: &str, row: &RowKey| json!({name_key: row.name, "SubaccountId": row.scope.subaccount, "InstanceId": row.scope.instance_id()});
        let fragments: Vec<_> = fragments.iter().map(|row| owner("FragmentName", row)).collect();
        let certificates: Vec<_> =
            referenced_certificates(&s, &key, &destination).await?.iter().map(|row| owner("Name", row)).collect();
        map.insert(
            "$metadata".into(),
            json!({"owner": {"destinations": [owner("Name", &key)], "fragments": fragments, "certificates": certificates}}),
        );
    }
    let mut body = json!({ "destinationConfiguration": configuration });
    if let Some(tokens) = auth_tokens {
        body["authTokens"] = serde_json::to_value(tokens).unwrap_or_default();
    }
    if let Some(certificates) = found_certificates(&s, &key, &destination, query.as_deref()).await? {
        body["certificates"] = certificates.into();
    }
    Ok(respond_with_etag(&headers, &destination, Json(body).into_response()))
}

/// The certificate-store properties a destination may name.
const CERTIFICATE_PROPERTIES: [&str; 3] = ["KeyStoreLocation", "TrustStoreLocation", "tokenService.KeyStoreLocation"];

/// SPEC §1.4: the keystore and trust store a found destination names, with their content, as
/// SAP's service sends them (`certificates`): SAP's SDKs present a ClientCertificateAuthentication
/// keystore from this answer without another call. The token service's keystore goes out only
/// when the caller runs the token flow itself (`$skipTokenRetrieval`); none with
/// `$skipCredentials`, since a keystore is a credential. Each is read where a token flow would
/// read it: the destination's level, else its subaccount's.
async fn found_certificates(
    s: &DestinationService,
    key: &RowKey,
    destination: &Destination,
    query: Option<&str>,
) -> Result<Option<Vec<serde_json::Value>>, ApiError> {
    if query_flag(query, "$skipCredentials") {
        return Ok(None);
    }
    let token_keystore = query_flag(query, "$skipTokenRetrieval").then_some("tokenService.KeyStoreLocation");
    let mut names: Vec<&str> = Vec::new();
    for name in
        ["KeyStoreLocation", "TrustStoreLocation"].into_iter().chain(token_keystore).filter_map(|p| destination.get(p))
    {
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    }
    let mut found = Vec::new();
    for name in names {
        for level in [key.scope.level.clone(), Level::Subaccount] {
            let row = Scope { subaccount: key.scope.subaccount.clone(), level, kind: Kind::Certificate }.row(name);
            if let Some(stored) = s.load::<Certificate>(&row).await? {
                // A generated entry without stored content has nothing to hand out.
                let cert = stored.destination;
                let Some(content) = cert.content else { break };
                // SAP's schema types `Type` as a string: an upload without one goes out without it.
                let mut entry = json!({"Name": cert.name, "Content": content});
                if let Some(kind) = cert.kind {
                    entry["Type"] = kind.into();
                }
                found.push(entry);
                break;
            }
        }
    }
    Ok((!found.is_empty()).then_some(found))
}

/// The stored certificates the destination names, each where a token flow would read it: on the
/// destination's level, else on its subaccount's level.
async fn referenced_certificates(
    s: &DestinationService,
    key: &RowKey,
    destination: &Destination,
) -> Result<Vec<RowKey>, ApiError> {
    let mut found: Vec<RowKey> = Vec::new();
    for location in CERTIFICATE_PROPERTIES.iter().filter_map(|p| destination.get(p)).filter(|l| !l.is_empty()) {
        if found.iter().any(|row| row.name == location) {
            continue;
        }
        for level in [key.scope.level.clone(), Level::Subaccount] {
            let row = Scope { subaccount: key.scope.subaccount.clone(), level, kind: Kind::Certificate }.row(location);
            if s.exists(&row).await? {
                found.push(row);
                break;
            }
        }
    }
    Ok(found)
}

/// `authTokens` for a found destination, or `None` where SAP sends none. A failed token
/// retrieval is an entry with `error`, not an HTTP error: the client decides what to do. A
/// request that cannot be served as sent (a missing `X-refresh-token`) is a 400.
async fn auth_tokens(
    s: &DestinationService,
    caller: &Caller,
    key: &RowKey,
    dest: &Destination,
    headers: &HeaderMap,
) -> Result<Option<Vec<AuthToken>>, ApiError> {
    use AuthenticationType::*;
    let tenant = header(headers, "x-tenant")?;
    let explicit = client_assertion(headers)?;
    // SPEC §2.5: without explicit headers, a provider destination may supply the assertion.
    let provided = match explicit {
        Some(_) => None,
        None => match provided_client_assertion(s, caller, key, dest, headers).await? {
            Some(Ok(pair)) => Some(pair),
            Some(Err(reason)) => return Ok(Some(vec![AuthToken::failed(reason)])),
            None => None,
        },
    };
    let assertion = explicit.or(provided.as_ref().map(|(a, k)| (a.as_str(), k.as_str())));
    let caller_assertion = explicit.is_some();
    let flow = |grant| TokenFlow { s, caller, key, dest, grant, tenant, user: None, assertion, caller_assertion };
    let token = match dest.authentication() {
        None | Some(NoAuthentication | ClientCertificateAuthentication) => return Ok(None),
        Some(PrincipalPropagation) => return corporate_idp_token(s, caller, key, dest, headers).await,
        Some(BasicAuthentication) => match (dest.get("User"), dest.get("Password")) {
            (Some(user), Some(password)) => AuthToken::authorization("Basic", B64.encode(format!("{user}:{password}"))),
            _ => AuthToken::failed("BasicAuthentication destinations need the properties 'User' and 'Password'"),
        },
        Some(OAuth2ClientCredentials) => flow(Grant::ClientCredentials).run().await?,
        Some(OAuth2Password) => flow(Grant::Password).run().await?,
        Some(OAuth2TechnicalUserPropagation) => {
            let mut token = flow(Grant::TechnicalUser).run().await?;
            if let Some(h) = token.http_header.as_mut() {
                h.key = TECHNICAL_AUTH_HEADER;
            }
            token
        }
        Some(auth @ (OAuth2UserTokenExchange | OAuth2JWTBearer)) => match user_token(s, caller, headers).await? {
            Ok(user) => {
                let grant = Grant::JwtBearer { auth: auth.as_str(), assertion: &user.jwt };
                TokenFlow { user: Some(&user), ..flow(grant) }.run().await?
            }
            Err(reason) => AuthToken::failed(reason),
        },
        Some(OAuth2RefreshToken) => {
            let refresh = header(headers, "x-refresh-token")?.ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Destination '{}' uses OAuth2RefreshToken: send the refresh token in the X-refresh-token header",
                    key.name
                ))
            })?;
            flow(Grant::RefreshToken(refresh)).run().await?
        }
        Some(OAuth2AuthorizationCode) => {
            let code = header(headers, "x-code")?.ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Destination '{}' uses OAuth2AuthorizationCode: send the authorization code in the X-code header",
                    key.name
                ))
            })?;
            let grant = Grant::AuthorizationCode {
                code,
                redirect_uri: header(headers, "x-redirect-uri")?,
                code_verifier: header(headers, "x-code-verifier")?,
            };
            flow(grant).run().await?
        }
        Some(OAuth2TokenExchange) => {
            let subject = header(headers, "x-subject-token")?.zip(header(headers, "x-subject-token-type")?);
            let subject = subject.ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Destination '{}' uses OAuth2TokenExchange: send the X-subject-token and X-subject-token-type \
                     headers",
                    key.name
                ))
            })?;
            let actor = match (header(headers, "x-actor-token")?, header(headers, "x-actor-token-type")?) {
                (None, None) => None,
                (Some(t), Some(k)) => Some((t, k)),
                _ => {
                    return Err(ApiError::bad_request(
                        "Headers X-actor-token and X-actor-token-type must be sent together",
                    ));
                }
            };
            flow(Grant::TokenExchange { subject, actor }).run().await?
        }
        Some(SAMLAssertion) => match user_token(s, caller, headers).await? {
            Ok(user) => match s.saml_assertion(key, dest, &user.saml(), None, true).await {
                Ok(a) => AuthToken {
                    expires_in: Some(a.expires_in.to_string()),
                    ..AuthToken::authorization("SAML2.0", a.encoded)
                },
                Err(reason) => AuthToken::failed(reason),
            },
            Err(reason) => AuthToken::failed(reason),
        },
        Some(OAuth2SAMLBearerAssertion) => {
            if dest.get("SAMLAssertionProvider").is_some_and(|p| p.eq_ignore_ascii_case("ClientProvided")) {
                match header(headers, "x-samlassertion")? {
                    Some(assertion) => flow(Grant::SamlBearer { assertion, for_user: false }).run().await?,
                    None => AuthToken::failed(
                        "this destination's SAMLAssertionProvider is ClientProvided: send the assertion in the \
                         X-samlAssertion header",
                    ),
                }
            } else {
                match user_token(s, caller, headers).await? {
                    Ok(user) => {
                        // The token cache keys on the user, not the assertion, so a cached
                        // token is found before an assertion is signed.
                        let probe = Grant::SamlBearer { assertion: "", for_user: true };
                        if let Some(token) = (TokenFlow { user: Some(&user), ..flow(probe) }).cached()? {
                            token
                        } else {
                            let saml_user = user.saml();
                            let recipient = crate::saml::token_service_recipient(dest, &saml_user);
                            // A fresh assertion for every token request: a token service may
                            // refuse a replayed one.
                            match s.saml_assertion(key, dest, &saml_user, recipient, false).await {
                                Ok(a) => {
                                    let grant = Grant::SamlBearer { assertion: &a.encoded, for_user: true };
                                    TokenFlow { user: Some(&user), ..flow(grant) }.run().await?
                                }
                                Err(reason) => AuthToken::failed(reason),
                            }
                        }
                    }
                    Err(reason) => AuthToken::failed(reason),
                }
            }
        }
        Some(SAPAssertionSSO) => AuthToken::failed(
            "Authentication 'SAPAssertionSSO' is deprecated by SAP and not supported by this Destination Service; use \
             SAMLAssertion or PrincipalPropagation instead",
        ),
    };
    if let Some(reason) = &token.error {
        tracing::warn!(subaccount = %key.scope.subaccount, name = %key.name, %reason, "no auth token for destination");
    }
    Ok(Some(vec![token]))
}

/// The IAS claim asking for the user's corporate identity provider token, and IAS's resource
/// name for that provider in the token exchange.
const FORWARD_CORP_IDP_TOKEN: &str = "forward_corp_idp_token";
const CORPORATE_IDP_RESOURCE: &str = "urn:sap:identity:corporateidp";

/// SPEC §2.6: a PrincipalPropagation destination normally has no token (the Connectivity Proxy
/// propagates the user), but an IAS user token carrying `forward_corp_idp_token`
/// (`access_token` or `id_token`) on an OnPremise one is exchanged, at the token endpoint of the
/// issuer that signed it, for the user's token of the corporate identity provider (RFC 8693,
/// `resource=urn:sap:identity:corporateidp`; client `clientId`/`clientSecret` of the destination
/// if set, else the token's own `azp`). Cached per user like the other user flows.
async fn corporate_idp_token(
    s: &DestinationService,
    caller: &Caller,
    key: &RowKey,
    dest: &Destination,
    headers: &HeaderMap,
) -> Result<Option<Vec<AuthToken>>, ApiError> {
    if dest.get("ProxyType") != Some("OnPremise") {
        return Ok(None);
    }
    let Ok(user) = user_token(s, caller, headers).await? else { return Ok(None) };
    let Some(kind) = user.claims.get(FORWARD_CORP_IDP_TOKEN) else { return Ok(None) };
    let failed = |reason: String| Ok(Some(vec![AuthToken::failed(reason)]));
    let requested = match kind.as_str() {
        Some("access_token") => "urn:ietf:params:oauth:token-type:access_token",
        Some("id_token") => "urn:ietf:params:oauth:token-type:id_token",
        _ => return failed(format!("the user token's {FORWARD_CORP_IDP_TOKEN} must be 'access_token' or 'id_token'")),
    };
    let issuer = user.claims.get("iss").and_then(serde_json::Value::as_str).filter(|_| user.external);
    let Some(issuer) = issuer else {
        return failed(format!(
            "the user token carries {FORWARD_CORP_IDP_TOKEN} but was not issued by a trusted identity provider \
             (IAS, a [[trust]] issuer) that could hand out the corporate token"
        ));
    };
    let endpoint = match s.tokens.discover_token_endpoint(issuer).await {
        Ok(endpoint) => endpoint,
        Err(reason) => return failed(reason),
    };
    // The exchange as an OAuth2TokenExchange flow of the destination (its client credentials
    // and tokenService.* settings apply), at the issuer's endpoint, over the Internet.
    let mut exchange = dest.clone();
    let client = ["azp", "client_id", "cid"]
        .iter()
        .find_map(|c| user.claims.get(*c).and_then(serde_json::Value::as_str))
        .unwrap_or_default()
        .to_owned();
    let mut props = vec![
        ("Authentication", "OAuth2TokenExchange".to_owned()),
        ("tokenServiceURL", endpoint),
        ("tokenServiceURL.ProxyType", "Internet".to_owned()),
        ("tokenService.body.requested_token_type", requested.to_owned()),
        ("tokenService.body.resource", CORPORATE_IDP_RESOURCE.to_owned()),
    ];
    if dest.get("clientId").is_none_or(str::is_empty) {
        props.push(("clientId", client));
    }
    for (k, v) in props {
        if let Err(e) = exchange.set(k, v) {
            return failed(format!("cannot build the corporate token exchange: {e}"));
        }
    }
    let subject = (user.jwt.as_str(), "urn:ietf:params:oauth:token-type:access_token");
    let flow = TokenFlow {
        s,
        caller,
        key,
        dest: &exchange,
        grant: Grant::TokenExchange { subject, actor: None },
        tenant: None,
        user: Some(&user),
        assertion: None,
        caller_assertion: false,
    };
    Ok(Some(vec![flow.run().await?]))
}

/// SPEC §2.5: `X-client-assertion` with `X-client-assertion-type`, both or neither.
fn client_assertion(headers: &HeaderMap) -> Result<Option<(&str, &str)>, ApiError> {
    let assertion = header(headers, "x-client-assertion")?;
    let kind = header(headers, "x-client-assertion-type")?;
    if header(headers, "x-client-assertion-destination-name")?.is_some() && (assertion.is_some() || kind.is_some()) {
        return Err(ApiError::bad_request(
            "Cannot mix header 'x-client-assertion-destination-name' with headers 'x-client-assertion' and \
             'x-client-assertion-type'",
        ));
    }
    match (assertion, kind) {
        (None, None) => Ok(None),
        (Some(a), Some(k)) => Ok(Some((a, k))),
        _ => Err(ApiError::bad_request("Headers X-client-assertion and X-client-assertion-type must be sent together")),
    }
}

/// The client assertion types a provider destination may declare (SPEC §2.5).
const ASSERTION_TYPES: [&str; 2] = [
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
    "urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
];

/// SPEC §2.5, service-fetched: the destination named by `X-client-assertion-destination-name`
/// (or the consumer's `clientAssertion.destinationName`) is an OAuth2ClientCredentials
/// destination with a `clientAssertion.type`; its access token is the consumer's client
/// assertion. `None`: no provider named; inner `Err`: the reason for the consumer's failed token.
async fn provided_client_assertion(
    s: &DestinationService,
    caller: &Caller,
    key: &RowKey,
    dest: &Destination,
    headers: &HeaderMap,
) -> Result<Option<Result<(String, String), String>>, ApiError> {
    use AuthenticationType::*;
    let named = header(headers, "x-client-assertion-destination-name")?
        .or_else(|| dest.get("clientAssertion.destinationName").filter(|n| !n.is_empty()));
    let Some(name) = named else { return Ok(None) };
    if !matches!(
        dest.authentication(),
        Some(
            OAuth2Password
                | OAuth2ClientCredentials
                | OAuth2AuthorizationCode
                | OAuth2TechnicalUserPropagation
                | OAuth2TokenExchange
        )
    ) {
        return Ok(Some(Err(format!(
            "a client assertion from destination '{name}' can be used by OAuth2Password, OAuth2ClientCredentials, \
             OAuth2AuthorizationCode, OAuth2TechnicalUserPropagation and OAuth2TokenExchange destinations only"
        ))));
    }
    // The provider is looked up like a find: the consumer's level first, then the subaccount.
    let mut keys = vec![key.scope.row(name)];
    if key.scope.level != Level::Subaccount {
        keys.push(Scope { level: Level::Subaccount, ..key.scope.clone() }.row(name));
    }
    let Some((provider_key, stored)) = s.load_first::<Destination>(keys).await? else {
        return Ok(Some(Err(format!("the client assertion provider destination '{name}' does not exist"))));
    };
    let provider = stored.destination;
    let kind = provider.get("clientAssertion.type").unwrap_or_default().to_owned();
    if provider.authentication() != Some(OAuth2ClientCredentials) || !ASSERTION_TYPES.contains(&kind.as_str()) {
        return Ok(Some(Err(format!(
            "the client assertion provider destination '{name}' must use OAuth2ClientCredentials and set \
             clientAssertion.type to {} or {}",
            ASSERTION_TYPES[0], ASSERTION_TYPES[1]
        ))));
    }
    let flow = TokenFlow {
        s,
        caller,
        key: &provider_key,
        dest: &provider,
        grant: Grant::ClientCredentials,
        tenant: header(headers, "x-tenant")?,
        user: None,
        assertion: None,
        caller_assertion: false,
    };
    let token = flow.run().await?;
    Ok(Some(match token.error {
        None => Ok((token.value, kind)),
        Some(e) => Err(format!("the client assertion provider destination '{name}' got no token: {e}")),
    }))
}

/// SPEC §2.1: where OAuth2TechnicalUserPropagation puts its token, for the Connectivity Proxy.
const TECHNICAL_AUTH_HEADER: &str = "SAP-Connectivity-Technical-Authentication";

/// The user of a user flow: `X-user-token` if sent, else the bearer token if it is a user's.
/// `Ok(Err(reason))` when there is none or it is refused: that fails the token, not the call.
async fn user_token(
    s: &DestinationService,
    caller: &Caller,
    headers: &HeaderMap,
) -> Result<Result<UserToken, String>, ApiError> {
    let Some(jwt) = header(headers, "x-user-token")? else {
        return Ok(caller.user.clone().ok_or_else(|| {
            "this destination exchanges a user's token, but none was sent: send the user's JWT in the \
             X-user-token header (or call with the user's token in Authorization)"
                .to_owned()
        }));
    };
    // Verified, not just decoded: the user it names keys the token cache.
    let claims = match s.verifier.verify(jwt).await {
        Ok(claims) => claims,
        Err(e) => return Ok(Err(format!("the X-user-token was refused: {e}"))),
    };
    Ok(UserToken::from_claims(jwt, &claims).ok_or_else(|| {
        "the X-user-token is not a user's token (it has no user_name or user_id); send the JWT of the logged-in user"
            .to_owned()
    }))
}

/// One OAuth token retrieval for a found destination.
#[derive(Clone, Copy)]
struct TokenFlow<'a> {
    s: &'a DestinationService,
    caller: &'a Caller,
    key: &'a RowKey,
    dest: &'a Destination,
    grant: Grant<'a>,
    /// The `X-tenant` header.
    tenant: Option<&'a str>,
    /// Set for user flows: the tenant comes from this user's token and the cache is per user.
    user: Option<&'a UserToken>,
    /// The client assertion and its type (SPEC §2.5).
    assertion: Option<(&'a str, &'a str)>,
    /// The assertion is the caller's (`X-client-assertion`), signed for one token request; a
    /// provider destination's token may be presented again and is cached like any other.
    caller_assertion: bool,
}

impl TokenFlow<'_> {
    async fn run(self) -> Result<AuthToken, ApiError> {
        let (owner, request) = match self.prepare()? {
            Ok(prepared) => prepared,
            Err(failed) => return Ok(failed),
        };
        // SPEC §2.3/§2.4: the client's certificate and the trusted ones come from the
        // certificate store, read only when a token must be fetched.
        if (request.keystore.is_some() || request.truststore.is_some())
            && let Some(token) = self.s.tokens.cached(owner.clone(), &request)
        {
            return Ok(AuthToken::bearer(token));
        }
        let identity = match &request.keystore {
            Some(location) => match self
                .s
                .keystore_pem(
                    self.key,
                    "tokenService.KeyStoreLocation",
                    location,
                    request.keystore_password.as_ref().map(|p| p.expose().as_str()),
                )
                .await
            {
                Ok(pem) => Some(ferry_core::tls::CertifiedKey { cert_pem: pem.expose().clone(), key_pem: pem }),
                Err(reason) => return Ok(AuthToken::failed(reason)),
            },
            None => None,
        };
        let trust_pem = match &request.truststore {
            Some(location) => match self
                .s
                .trust_store_pem(
                    self.key,
                    "TrustStoreLocation",
                    location,
                    request.truststore_password.as_ref().map(|p| p.expose().as_str()),
                )
                .await
            {
                Ok(pem) => Some(pem),
                Err(reason) => return Ok(AuthToken::failed(reason)),
            },
            None => None,
        };
        let tls = TlsSetup { identity: identity.as_ref(), trust_pem: trust_pem.as_deref() };
        Ok(match self.s.tokens.token(owner, request, tls).await {
            Ok(token) => AuthToken::bearer(token),
            Err(e) => AuthToken::failed(e.to_string()),
        })
    }

    /// The flow's token if the cache has a fresh one; the token service is not called.
    fn cached(self) -> Result<Option<AuthToken>, ApiError> {
        Ok(self
            .prepare()?
            .ok()
            .and_then(|(owner, request)| self.s.tokens.cached(owner, &request))
            .map(AuthToken::bearer))
    }

    /// The cache owner and request, or (inner `Err`) the failed token when the destination
    /// cannot make a request.
    fn prepare(self) -> Result<Result<(CacheOwner, TokenRequest), AuthToken>, ApiError> {
        let Self { s, caller, key, dest, grant, tenant: tenant_header, user, assertion, caller_assertion } = self;
        let common = tokens::is_common(dest) && grant.uses_tenant();
        if tenant_header.is_some() && !common {
            return Err(ApiError::bad_request(format!(
                "Header X-tenant is only allowed for destinations with tokenServiceURLType 'Common'; destination '{}' \
                 uses a dedicated token service URL",
                key.name
            )));
        }
        let tenant = match (common, user) {
            (false, _) => None,
            // SPEC §2.2: user flows take the tenant from the user's token.
            (true, Some(user)) => user.subdomain.clone(),
            (true, None) => tenant_header.map(str::to_owned).or_else(|| caller.subdomain.clone()),
        };
        let request = match TokenRequest::build(dest, grant, tenant.as_deref(), s.tokens.default_timeout) {
            Ok(request) => match assertion {
                Some((a, kind)) if caller_assertion => request.with_client_assertion(a, kind).single_use(),
                Some((a, kind)) => request.with_client_assertion(a, kind),
                None => request,
            },
            Err(e) => return Ok(Err(AuthToken::failed(e.to_string()))),
        };
        let owner = CacheOwner {
            subaccount: key.scope.subaccount.clone(),
            instance: key.scope.instance_id().map(str::to_owned),
            name: key.name.clone(),
            tenant,
            user: user.map(|u| u.key.clone()),
        };
        Ok(Ok((owner, request)))
    }
}
