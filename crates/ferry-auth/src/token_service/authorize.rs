//! The `authorization_code` grant (RFC 6749 §4.1) with PKCE (RFC 7636) and a minimal login
//! page, for apps that log users in through a browser (the approuter, generic OAuth clients).
//!
//! 1. `GET /oauth/authorize?response_type=code&client_id=…&redirect_uri=…&state=…
//!    &code_challenge=…&code_challenge_method=S256` checks the request and answers a login form.
//!    The request is kept server-side under a random id that the form carries, and is bound to
//!    this browser by a random cookie (`SameSite=Strict`, `HttpOnly`): a form posted from another
//!    site, or with a made-up or stale id, is refused.
//! 2. `POST /login` with the id, username and password: on success the browser is redirected to
//!    `redirect_uri?code=…&state=…`. A code is single-use, valid 60 s, and bound to the client,
//!    the redirect URI, the PKCE challenge and the user.
//! 3. `POST /oauth/token grant_type=authorization_code&code=…&redirect_uri=…&code_verifier=…`
//!    (client authenticated as for every grant) gives a user token and a refresh token.
//!
//! Errors follow RFC 6749 §4.1.2.1: once client and redirect URI are known to be valid, the
//! browser is sent back with `error=…`; before that an HTML error page is shown, since
//! redirecting to an unverified URI would make the service an open redirector.
//! PKCE is optional (all clients here are confidential), but a challenge must use `S256`:
//! `plain` would protect nothing against an attacker who can read the authorization request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, PRAGMA, SET_COOKIE};
use http::{HeaderMap, HeaderValue, StatusCode, Uri};

use super::claims::UserIdentity;
use super::config::{GRANT_AUTHORIZATION_CODE, OAuthClient, parse_redirect_uri};
use super::http::{OAuthError, Params, narrow, require_form};
use super::mtls::TlsInfo;
use super::refresh::RefreshStore;
use super::users::Login;
use super::{TokenService, user_scopes};

/// Lifetime of an authorization code (RFC 6749 §4.1.2 recommends at most ten minutes; the
/// client redeems it right after the redirect).
pub(crate) const CODE_VALIDITY_SECS: u64 = 60;
/// How long a login form stays usable.
const LOGIN_VALIDITY_SECS: u64 = 10 * 60;
/// Wrong passwords allowed per login form before the request is refused as `access_denied`.
const MAX_LOGIN_ATTEMPTS: u32 = 5;
/// Bounds on what unauthenticated browsers can make the service remember.
const MAX_PENDING: usize = 10_000;
const MAX_CODES: usize = 10_000;
/// A replayed code is recognised (and the refresh token it yielded revoked) this long after
/// it was issued.
const USED_CODE_MEMORY_SECS: u64 = 10 * 60;
const COOKIE_PREFIX: &str = "ferry-login-";

/// A checked authorization request.
#[derive(Clone, Debug)]
struct AuthRequest {
    client_id: String,
    /// Where the browser goes back to: the requested URI, or the client's only one.
    redirect_uri: String,
    /// Whether the request named `redirect_uri`; the token request must then repeat it.
    redirect_uri_given: bool,
    state: Option<String>,
    /// The PKCE `S256` challenge.
    challenge: Option<String>,
    scopes: Vec<String>,
    /// The zone the request addressed (by host), where the user is looked up.
    tenant_id: Option<String>,
}

struct PendingLogin {
    request: AuthRequest,
    /// The value of this login's cookie.
    csrf: String,
    expires_at: u64,
    failures: u32,
}

/// What an authorization code stands for.
#[derive(Clone, Debug)]
pub(crate) struct CodeGrant {
    pub client_id: String,
    redirect_uri: String,
    redirect_uri_given: bool,
    challenge: Option<String>,
    pub tenant_id: String,
    pub user: UserIdentity,
    pub scopes: Vec<String>,
    expires_at: u64,
}

/// A redeemed code: the refresh token it yielded, revoked if the code is replayed.
struct UsedCode {
    refresh_token: Option<String>,
    forget_at: u64,
}

/// Login forms waiting for a password, and issued codes. In memory: losing them on restart
/// costs a user one more login.
#[derive(Default)]
pub(crate) struct AuthStore {
    pending: Mutex<HashMap<String, PendingLogin>>,
    codes: Mutex<HashMap<String, CodeGrant>>,
    used: Mutex<HashMap<String, UsedCode>>,
}

impl std::fmt::Debug for AuthStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Ids and codes are credentials: print only counts.
        f.debug_struct("AuthStore")
            .field("pending", &lock(&self.pending).len())
            .field("codes", &lock(&self.codes).len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// 256 random bits, base64url; `None` if the system has no randomness to give.
fn random_token() -> Option<String> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).ok()?;
    Some(B64URL.encode(bytes))
}

/// Drops expired entries once a map is full, then the entry expiring first if still full.
fn make_room<V>(map: &mut HashMap<String, V>, max: usize, now: u64, expires: impl Fn(&V) -> u64) {
    if map.len() >= max {
        map.retain(|_, v| expires(v) > now);
    }
    if map.len() >= max
        && let Some(k) = map.iter().min_by_key(|(_, v)| expires(v)).map(|(k, _)| k.clone())
    {
        map.remove(&k);
    }
}

/// Why a login form cannot be used.
enum LoginRefused {
    /// Unknown, expired or used id.
    Gone,
    /// The cookie is missing or does not match: the form was not posted by the browser it was
    /// shown to.
    Csrf,
}

impl AuthStore {
    /// Remembers a request; returns the form id and the cookie value.
    fn start(&self, request: AuthRequest, now: u64) -> Option<(String, String)> {
        let (id, csrf) = (random_token()?, random_token()?);
        let mut pending = lock(&self.pending);
        make_room(&mut pending, MAX_PENDING, now, |p| p.expires_at);
        let login = PendingLogin { request, csrf: csrf.clone(), expires_at: now + LOGIN_VALIDITY_SECS, failures: 0 };
        pending.insert(id.clone(), login);
        Some((id, csrf))
    }

    /// The request behind a form id, if the form is live and `cookie` is its cookie.
    fn check(&self, id: &str, cookie: Option<&str>, now: u64) -> Result<AuthRequest, LoginRefused> {
        let mut pending = lock(&self.pending);
        let login = pending.get(id).ok_or(LoginRefused::Gone)?;
        if login.expires_at <= now {
            pending.remove(id);
            return Err(LoginRefused::Gone);
        }
        let given = cookie.unwrap_or("");
        if !ferry_core::secret::constant_time_eq(given.as_bytes(), login.csrf.as_bytes()) {
            return Err(LoginRefused::Csrf);
        }
        Ok(login.request.clone())
    }

    /// Counts a wrong password; returns the request if that was the last allowed attempt (the
    /// form is then gone).
    fn fail(&self, id: &str) -> Option<AuthRequest> {
        let mut pending = lock(&self.pending);
        let login = pending.get_mut(id)?;
        login.failures += 1;
        if login.failures >= MAX_LOGIN_ATTEMPTS { pending.remove(id).map(|l| l.request) } else { None }
    }

    fn finish(&self, id: &str) -> Option<AuthRequest> {
        lock(&self.pending).remove(id).map(|l| l.request)
    }

    fn issue_code(&self, grant: CodeGrant, now: u64) -> Option<String> {
        let code = random_token()?;
        let mut codes = lock(&self.codes);
        make_room(&mut codes, MAX_CODES, now, |c| c.expires_at);
        codes.insert(code.clone(), grant);
        Some(code)
    }

    /// Consumes `code` for `client`. Any presentation by an authenticated client uses the code
    /// up, so that a guessed verifier gets one try; a replay of a redeemed code revokes the
    /// refresh token it yielded (RFC 6749 §4.1.2).
    pub fn redeem(
        &self,
        code: &str,
        client: &OAuthClient,
        redirect_uri: Option<&str>,
        verifier: Option<&str>,
        now: u64,
        refresh: &RefreshStore,
    ) -> Result<CodeGrant, OAuthError> {
        let gone = || OAuthError::invalid_grant("authorization code is invalid, expired or already used");
        {
            let mut used = lock(&self.used);
            used.retain(|_, u| u.forget_at > now);
            if let Some(u) = used.get_mut(code) {
                if let Some(rt) = u.refresh_token.take() {
                    tracing::warn!(client = %client.client_id, "authorization code replayed; revoking its refresh token");
                    refresh.revoke(&rt);
                }
                return Err(gone());
            }
        }
        let grant = lock(&self.codes).remove(code).ok_or_else(gone)?;
        let mut used = lock(&self.used);
        make_room(&mut used, MAX_CODES, now, |u| u.forget_at);
        used.insert(code.to_owned(), UsedCode { refresh_token: None, forget_at: now + USED_CODE_MEMORY_SECS });
        drop(used);
        if grant.expires_at <= now {
            return Err(gone());
        }
        if grant.client_id != client.client_id {
            return Err(OAuthError::invalid_grant("authorization code was issued to another client"));
        }
        match redirect_uri {
            Some(r) if r != grant.redirect_uri => {
                return Err(OAuthError::invalid_grant("redirect_uri does not match the authorization request"));
            }
            None if grant.redirect_uri_given => {
                return Err(OAuthError::invalid_grant(
                    "redirect_uri is required: the authorization request included one",
                ));
            }
            _ => {}
        }
        match (&grant.challenge, verifier) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(OAuthError::invalid_grant(
                    "code_verifier given, but the authorization request had no code_challenge",
                ));
            }
            (Some(_), None) => return Err(OAuthError::invalid_grant("code_verifier is required (PKCE)")),
            (Some(challenge), Some(v)) => {
                if !valid_verifier(v) {
                    return Err(OAuthError::invalid_request(
                        "code_verifier must be 43 to 128 characters of A-Z a-z 0-9 - . _ ~ (RFC 7636 §4.1)",
                    ));
                }
                let expected = s256(v);
                if !ferry_core::secret::constant_time_eq(expected.as_bytes(), challenge.as_bytes()) {
                    return Err(OAuthError::invalid_grant("code_verifier does not match the code_challenge"));
                }
            }
        }
        Ok(grant)
    }

    /// Remembers which refresh token a redeemed code yielded, for revoking it on replay.
    pub fn record_refresh_token(&self, code: &str, refresh_token: Option<String>) {
        if let Some(u) = lock(&self.used).get_mut(code) {
            u.refresh_token = refresh_token;
        }
    }
}

/// `BASE64URL(SHA256(verifier))`, the S256 transformation (RFC 7636 §4.2).
pub(crate) fn s256(verifier: &str) -> String {
    B64URL.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes()))
}

fn valid_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// An S256 challenge is the base64url encoding of 32 bytes: 43 characters.
fn valid_challenge(c: &str) -> bool {
    c.len() == 43 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether a requested redirect URI is allowed by a registered one: equal after normalisation,
/// or below a registered URI whose path ends with `/` (same scheme, host and port).
fn redirect_matches(registered: &str, requested: &url::Url) -> bool {
    let Ok(reg) = parse_redirect_uri(registered) else { return false };
    if reg.as_str() == requested.as_str() {
        return true;
    }
    reg.path().ends_with('/')
        && reg.query().is_none()
        && reg.scheme() == requested.scheme()
        && reg.host_str() == requested.host_str()
        && reg.port_or_known_default() == requested.port_or_known_default()
        && requested.path().starts_with(reg.path())
}

/// The redirect URI of a request, or why there is none the browser may be sent to.
fn resolve_redirect(client: &OAuthClient, requested: Option<&str>) -> Result<(String, bool), String> {
    if client.redirect_uris.is_empty() {
        return Err(format!(
            "Client {:?} has no registered redirect URIs, so it cannot sign users in.",
            client.client_id
        ));
    }
    match requested {
        Some(r) => {
            let url =
                parse_redirect_uri(r).map_err(|reason| format!("The redirect_uri {r:?} is invalid: {reason}."))?;
            if client.redirect_uris.iter().any(|reg| redirect_matches(reg, &url)) {
                Ok((r.to_owned(), true))
            } else {
                Err(format!("The redirect_uri {r:?} is not registered for client {:?}.", client.client_id))
            }
        }
        None => match client.redirect_uris.as_slice() {
            [only] => Ok((only.clone(), false)),
            _ => Err("The request has no redirect_uri, and the client has several registered.".to_owned()),
        },
    }
}

/// Escapes text for HTML element content and quoted attribute values.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#x27;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;background:#f4f5f7;margin:0}\
main{max-width:22rem;margin:4rem auto;background:#fff;padding:2rem;border-radius:8px;box-shadow:0 1px 4px #0002}\
h1{font-size:1.4rem;margin-top:0}label{display:block;margin:1rem 0 .3rem}\
input{width:100%;box-sizing:border-box;padding:.5rem;font-size:1rem}\
.actions{margin-top:1.5rem;display:flex;gap:.5rem}button{padding:.5rem 1rem;font-size:1rem}\
.error{color:#a00;background:#fee;padding:.5rem;border-radius:4px}.muted{color:#555}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title} – Ferry</title><style>{STYLE}</style></head>\n<body><main>\n{body}\n</main></body></html>\n",
        title = escape(title)
    )
}

/// An HTML response that no cache keeps, no frame embeds and no script runs in.
fn html(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    resp
}

/// The page for errors that must not redirect (unknown client, bad redirect URI, stale form).
pub(crate) fn error_page(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "<h1>Sign-in failed</h1>\n<p class=\"error\">{}</p>\n<p class=\"muted\">Go back to the application and try again.</p>",
        escape(message)
    );
    html(status, page("Sign-in failed", &body))
}

fn login_form(status: StatusCode, client_id: &str, form_id: &str, username: &str, error: Option<&str>) -> Response {
    let error = error.map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>\n", escape(e))).unwrap_or_default();
    let body = format!(
        "<h1>Sign in</h1>\n<p class=\"muted\">to continue to <b>{client}</b></p>\n{error}\
<form method=\"post\" action=\"/login\">\n\
<input type=\"hidden\" name=\"request\" value=\"{form_id}\">\n\
<label for=\"username\">Username</label>\
<input id=\"username\" name=\"username\" autocomplete=\"username\" value=\"{username}\" required autofocus>\n\
<label for=\"password\">Password</label>\
<input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required>\n\
<div class=\"actions\"><button type=\"submit\" name=\"action\" value=\"login\">Sign in</button>\
<button type=\"submit\" name=\"action\" value=\"cancel\" formnovalidate>Cancel</button></div>\n</form>",
        client = escape(client_id),
        form_id = escape(form_id),
        username = escape(username),
    );
    html(status, page("Sign in", &body))
}

fn cookie_name(form_id: &str) -> String {
    // Per form, so that two sign-ins in two tabs do not overwrite each other's cookie.
    format!("{COOKIE_PREFIX}{}", form_id.get(..16).unwrap_or(form_id))
}

fn set_cookie(resp: &mut Response, form_id: &str, value: &str, max_age: u64, secure: bool) {
    let secure = if secure { "; Secure" } else { "" };
    let cookie =
        format!("{}={value}; Path=/login; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}", cookie_name(form_id));
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().append(SET_COOKIE, v);
    }
}

fn read_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Sends the browser to `redirect_uri` with `params` added to its query.
fn redirect(redirect_uri: &str, params: &[(&str, &str)]) -> Response {
    let Ok(mut url) = url::Url::parse(redirect_uri) else {
        return error_page(StatusCode::BAD_REQUEST, "The redirect URI is invalid.");
    };
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in params {
            q.append_pair(k, v);
        }
    }
    let mut resp = StatusCode::FOUND.into_response();
    match HeaderValue::from_str(url.as_str()) {
        Ok(v) => resp.headers_mut().insert(LOCATION, v),
        Err(_) => return error_page(StatusCode::BAD_REQUEST, "The redirect URI is invalid."),
    };
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The RFC 6749 §4.1.2.1 error redirect.
fn redirect_error(req_redirect: &str, state: Option<&str>, error: &str, description: &str) -> Response {
    let mut params = vec![("error", error), ("error_description", description)];
    if let Some(s) = state {
        params.push(("state", s));
    }
    redirect(req_redirect, &params)
}

/// `GET /oauth/authorize`.
pub(crate) async fn authorize(
    State(svc): State<Arc<TokenService>>,
    headers: HeaderMap,
    uri: Uri,
    RawQuery(query): RawQuery,
    tls: Option<Extension<TlsInfo>>,
) -> Response {
    let params = match Params::parse(query.as_deref().unwrap_or("").as_bytes()) {
        Ok(p) => p,
        Err(e) => {
            return error_page(StatusCode::BAD_REQUEST, &format!("Invalid authorization request: {}", e.description));
        }
    };
    let Some(client_id) = params.get("client_id") else {
        return error_page(StatusCode::BAD_REQUEST, "Invalid authorization request: client_id is missing.");
    };
    let Some(client) = svc.client(client_id) else {
        return error_page(StatusCode::BAD_REQUEST, &format!("Unknown client {client_id:?}."));
    };
    let (redirect_uri, redirect_uri_given) = match resolve_redirect(&client, params.get("redirect_uri")) {
        Ok(r) => r,
        Err(message) => return error_page(StatusCode::BAD_REQUEST, &message),
    };
    // From here on the browser can be sent back to the client with the error.
    let state = params.get("state");
    let fail = |error: &str, description: &str| redirect_error(&redirect_uri, state, error, description);
    match params.get("response_type") {
        None => return fail("invalid_request", "missing required parameter: response_type"),
        Some("code") => {}
        Some(other) => {
            return fail("unsupported_response_type", &format!("response_type {other:?} is not supported; use code"));
        }
    }
    if !client.allows_grant(GRANT_AUTHORIZATION_CODE) {
        return fail("unauthorized_client", "the client may not use the authorization_code grant");
    }
    let challenge = match (params.get("code_challenge"), params.get("code_challenge_method")) {
        (None, None) => None,
        (None, Some(_)) => return fail("invalid_request", "code_challenge_method given without code_challenge"),
        (Some(_), None | Some("plain")) => {
            return fail("invalid_request", "PKCE method plain is not supported: send code_challenge_method=S256");
        }
        (Some(c), Some("S256")) if valid_challenge(c) => Some(c.to_owned()),
        (Some(_), Some("S256")) => {
            return fail(
                "invalid_request",
                "code_challenge must be the base64url SHA-256 of the verifier (43 characters)",
            );
        }
        (Some(_), Some(m)) => return fail("invalid_request", &format!("unsupported code_challenge_method {m:?}")),
    };
    let scopes = match narrow(&client.scopes, params.get("scope")) {
        Ok(s) => s,
        Err(e) => return fail("invalid_scope", &e.description),
    };
    let tenant_id = match svc.addressed_tenant(&headers, &uri) {
        Ok(t) => t.map(|t| t.tenant.id.clone()),
        Err(e) => return fail("invalid_request", &e.description),
    };
    let request = AuthRequest {
        client_id: client.client_id.clone(),
        redirect_uri: redirect_uri.clone(),
        redirect_uri_given,
        state: state.map(str::to_owned),
        challenge,
        scopes,
        tenant_id,
    };
    let Some((form_id, csrf)) = svc.auth.start(request, svc.now()) else {
        return fail("server_error", "no randomness available");
    };
    let mut resp = login_form(StatusCode::OK, &client.client_id, &form_id, "", None);
    set_cookie(&mut resp, &form_id, &csrf, LOGIN_VALIDITY_SECS, tls.is_some());
    resp
}

/// `POST /login`: the login form's submission.
pub(crate) async fn login(
    State(svc): State<Arc<TokenService>>,
    headers: HeaderMap,
    tls: Option<Extension<TlsInfo>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Bytes,
) -> Response {
    let peer = peer.map(|Extension(ConnectInfo(a))| a.ip());
    if let Err(e) = require_form(&headers) {
        return error_page(StatusCode::BAD_REQUEST, &e.description);
    }
    let params = match Params::parse(&body) {
        Ok(p) => p,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e.description),
    };
    let Some(form_id) = params.get("request") else {
        return error_page(StatusCode::BAD_REQUEST, "The sign-in form is incomplete.");
    };
    let now = svc.now();
    let cookie = read_cookie(&headers, &cookie_name(form_id));
    let request = match svc.auth.check(form_id, cookie, now) {
        Ok(r) => r,
        Err(LoginRefused::Gone) => {
            return error_page(StatusCode::BAD_REQUEST, "This sign-in request has expired or was already used.");
        }
        Err(LoginRefused::Csrf) => {
            return error_page(
                StatusCode::FORBIDDEN,
                "The sign-in form was not submitted from the browser it was shown in (missing or wrong cookie).",
            );
        }
    };
    let state = request.state.as_deref();
    let secure = tls.is_some();
    let clear = |mut resp: Response| {
        set_cookie(&mut resp, form_id, "", 0, secure);
        resp
    };
    let Some(client) = svc.client(&request.client_id) else {
        return error_page(StatusCode::BAD_REQUEST, "The client of this sign-in request is no longer configured.");
    };
    if params.get("action") == Some("cancel") {
        svc.auth.finish(form_id);
        return clear(redirect_error(&request.redirect_uri, state, "access_denied", "the user cancelled the sign-in"));
    }
    let username = params.get("username").unwrap_or("");
    let Some(password) = params.get("password").filter(|_| !username.is_empty()) else {
        let msg = "Enter your username and password.";
        return login_form(StatusCode::BAD_REQUEST, &client.client_id, form_id, username, Some(msg));
    };
    // The per-form cap alone would let a guesser open form after form: the address's failed
    // logons share the token endpoint's budget.
    if let Some(wait) = peer.and_then(|p| svc.failed_logons.retry_after(p)) {
        let msg = format!("Too many failed sign-ins from this address; try again in {} s.", wait.as_secs().max(1));
        let mut resp = login_form(StatusCode::TOO_MANY_REQUESTS, &client.client_id, form_id, username, Some(&msg));
        if let Ok(v) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
            resp.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        return resp;
    }
    let login = Login { username, password, tenant: request.tenant_id.as_deref(), preferred_tenant: &client.tenant_id };
    let user = match svc.login_user(login).await {
        Ok(Some(user)) => user,
        Ok(None) => {
            if let Some(p) = peer {
                svc.failed_logons.failed(p);
            }
            if let Some(request) = svc.auth.fail(form_id) {
                let resp =
                    redirect_error(&request.redirect_uri, state, "access_denied", "too many failed sign-in attempts");
                return clear(resp);
            }
            let msg = "Invalid username or password.";
            return login_form(StatusCode::UNAUTHORIZED, &client.client_id, form_id, username, Some(msg));
        }
        Err(_) => {
            // Not the user's fault: the form stays usable and the attempt is not counted.
            let msg = "The user directory is temporarily unavailable. Try again in a moment.";
            return login_form(StatusCode::SERVICE_UNAVAILABLE, &client.client_id, form_id, username, Some(msg));
        }
    };
    // The form may have been used up in the meantime (a double submit); only one wins.
    let Some(request) = svc.auth.finish(form_id) else {
        return error_page(StatusCode::BAD_REQUEST, "This sign-in request has expired or was already used.");
    };
    let allowed = user_scopes(&client, Some(&user));
    let scopes: Vec<String> = request.scopes.iter().filter(|s| allowed.contains(s)).cloned().collect();
    let grant = CodeGrant {
        client_id: request.client_id.clone(),
        redirect_uri: request.redirect_uri.clone(),
        redirect_uri_given: request.redirect_uri_given,
        challenge: request.challenge.clone(),
        tenant_id: user.tenant_id.clone(),
        user: UserIdentity::from_user(&user, now),
        scopes,
        expires_at: now + CODE_VALIDITY_SECS,
    };
    let Some(code) = svc.auth.issue_code(grant, now) else {
        return clear(redirect_error(&request.redirect_uri, state, "server_error", "no randomness available"));
    };
    tracing::debug!(client = %request.client_id, user = %username, "authorization code issued");
    let mut params = vec![("code", code.as_str())];
    if let Some(s) = state {
        params.push(("state", s));
    }
    clear(redirect(&request.redirect_uri, &params))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(uris: &[&str]) -> OAuthClient {
        OAuthClient {
            client_id: "c".into(),
            redirect_uris: uris.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn redirect_uris_match_exactly_or_below_a_slash() {
        let c = client(&["https://app.example/cb", "http://localhost:5000/", "https://other.example/base/"]);
        let ok = |r: &str| resolve_redirect(&c, Some(r)).is_ok();
        assert!(ok("https://app.example/cb"));
        assert!(ok("https://APP.example:443/cb"), "normalised before comparing");
        assert!(!ok("https://app.example/cb/x"), "no prefix match without a trailing slash");
        assert!(!ok("https://app.example/cb?x=1"));
        assert!(!ok("https://app.example.evil/cb"));
        assert!(ok("http://localhost:5000/login/callback"));
        assert!(ok("http://localhost:5000/"));
        assert!(!ok("http://localhost:5001/login/callback"));
        assert!(!ok("https://localhost:5000/login/callback"));
        assert!(ok("https://other.example/base/x?y=1"));
        assert!(!ok("https://other.example/base"));
        assert!(!ok("https://other.example/base/../evil"), "dot segments are resolved first");
        assert!(!ok("https://other.example/base/%2e%2e/evil"));
        assert!(!ok("https://other.example/basement"));
        assert!(!ok("https://user@app.example/cb"));
        assert!(!ok("https://app.example/cb#frag"));
        assert!(!ok("javascript:alert(1)"));
        assert!(!ok("/cb"));
        // Without redirect_uri: only a client with exactly one.
        assert!(resolve_redirect(&c, None).is_err());
        assert_eq!(resolve_redirect(&client(&["https://a/cb"]), None).unwrap(), ("https://a/cb".into(), false));
        assert!(resolve_redirect(&client(&[]), Some("https://a/cb")).is_err());
    }

    #[test]
    fn pkce_s256_matches_rfc7636_appendix_b() {
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        assert_eq!(s256(verifier), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        assert!(valid_challenge("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"));
        assert!(valid_verifier(verifier));
        assert!(!valid_verifier("short"));
        assert!(!valid_verifier(&"a".repeat(129)));
        assert!(!valid_verifier(&format!("{}+", "a".repeat(43))));
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(escape(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#x27;&amp;&#x27;&lt;/a&gt;");
    }

    #[test]
    fn cookies_are_read_by_name() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1; ferry-login-abc=xyz"));
        h.append(COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(read_cookie(&h, "ferry-login-abc"), Some("xyz"));
        assert_eq!(read_cookie(&h, "b"), Some("2"));
        assert_eq!(read_cookie(&h, "c"), None);
    }
}
