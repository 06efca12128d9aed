//! The administration web UI on `/` and `/ui/...`: server-rendered HTML pages on top of the
//! admin REST API, with one stylesheet and a little JavaScript (confirmations, file reading), all
//! embedded so the UI works without any network but the connector's own.
//!
//! It shares the API's sessions (the `JSESSIONID` cookie) and logon with its lockout; forms carry
//! the session's CSRF token in a hidden `_csrf` field. Changes go through the API's own handlers
//! (an in-process call of the API router), so the UI validates, audits and applies exactly as
//! the API does; the UI adds field-level messages in front of that.

mod charts;
mod ha_page;
mod pages;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use super::{Admin, Caller, LogonFailure, cookie};

/// Form fields as posted.
pub(super) type Form = HashMap<String, String>;

/// A message shown once on the next page of the session (after a redirect).
#[derive(Clone, Debug)]
struct Flash {
    ok: bool,
    text: String,
}

pub(super) struct Ui {
    admin: Arc<Admin>,
    flash: Mutex<HashMap<String, Flash>>,
    monitor: charts::Monitor,
}

/// The logged-on caller of a page.
pub(super) struct Ctx {
    sid: String,
    user: String,
    csrf: String,
    roles: super::ldap::Roles,
}

const SESSION: &str = "JSESSIONID";
/// A read every role but `sccmonitoring` may do: who may see the pages.
const VIEW_CHECK: &str = "/api/v1/configuration/connector";

pub(super) fn router(admin: Arc<Admin>) -> Router {
    let ui = Arc::new(Ui { admin, flash: Mutex::new(HashMap::new()), monitor: charts::Monitor::default() });
    charts::spawn_sampler(Arc::downgrade(&ui));
    Router::new()
        .route("/", get(|| async { redirect("/ui/overview") }))
        .route("/ui", get(|| async { redirect("/ui/overview") }))
        .route("/ui/", get(|| async { redirect("/ui/overview") }))
        .route("/ui/static/style.css", get(|| async { asset("text/css; charset=utf-8", include_str!("style.css")) }))
        .route("/ui/static/app.js", get(|| async { asset("text/javascript; charset=utf-8", include_str!("app.js")) }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/password", get(password_page).post(change_password))
        .merge(pages::routes())
        .merge(ha_page::routes())
        // Unknown UI paths get a page, not the API's Basic challenge (a browser would prompt).
        .route("/ui/{*rest}", get(not_found))
        .with_state(ui)
}

async fn not_found() -> Response {
    let body = "<p>There is no such page. <a href=\"/ui/overview\">Go to the overview</a>.</p>";
    page(StatusCode::NOT_FOUND, "Not found", None, None, body)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

pub(super) fn redirect(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// HTML-escapes text for element content and quoted attribute values.
pub(super) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes one URL path segment or query value.
pub(super) fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl Ui {
    /// The session of a page request; otherwise a redirect to the logon page (saying the
    /// session expired when the browser still sent one), or to the password change while the
    /// initial password is in force.
    pub(super) async fn ctx(&self, headers: &HeaderMap, allow_initial: bool) -> Result<Ctx, Response> {
        let Some(sid) = cookie(headers, SESSION) else { return Err(redirect("/ui/login")) };
        let Some((user, csrf, roles)) = self.admin.session(&sid) else {
            return Err(redirect("/ui/login?expired=1"));
        };
        if !allow_initial && self.admin.state.lock().await.admin.initial_password {
            return Err(redirect("/ui/password"));
        }
        // The pages show configuration: monitoring-only users (sccmonitoring) have the API.
        if !roles.allow(&Method::GET, VIEW_CHECK) {
            let body = "<p class=\"error\">Your user may use the monitoring API only, not these pages.</p>";
            return Err(page(StatusCode::FORBIDDEN, "Not permitted", None, None, body));
        }
        Ok(Ctx { sid, user, csrf, roles })
    }

    /// As [`Ui::ctx`], for a form post: the form must carry the session's CSRF token.
    pub(super) async fn post_ctx(
        &self,
        headers: &HeaderMap,
        form: &Form,
        allow_initial: bool,
    ) -> Result<Ctx, Response> {
        let ctx = self.ctx(headers, allow_initial).await?;
        let sent = form.get("_csrf").map(String::as_bytes).unwrap_or_default();
        if !ferry_core::secret::constant_time_eq(sent, ctx.csrf.as_bytes()) {
            let body = "<p class=\"error\">This form is out of date (its security token does not match your session). \
                Go back, reload the page and submit it again.</p>";
            return Err(page(StatusCode::FORBIDDEN, "Form out of date", Some(&ctx), None, body));
        }
        Ok(ctx)
    }

    pub(super) fn set_flash(&self, ctx: &Ctx, ok: bool, text: impl Into<String>) {
        let mut f = self.flash.lock().unwrap_or_else(PoisonError::into_inner);
        // Sessions that never come back leave their message; bound the table.
        if f.len() > 1000 {
            f.clear();
        }
        f.insert(ctx.sid.clone(), Flash { ok, text: text.into() });
    }

    fn take_flash(&self, ctx: &Ctx) -> Option<Flash> {
        self.flash.lock().unwrap_or_else(PoisonError::into_inner).remove(&ctx.sid)
    }

    /// Renders a page of a logged-on user, with the pending message if any.
    pub(super) fn render(&self, ctx: &Ctx, title: &str, body: &str) -> Response {
        let flash = self.take_flash(ctx);
        page(StatusCode::OK, title, Some(ctx), flash.as_ref(), body)
    }

    /// Calls the admin REST API in process as the logged-on user. `Ok` carries the body of a
    /// 2xx answer, `Err` the API's error message.
    pub(super) async fn api(
        &self,
        ctx: &Ctx,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(HeaderMap, Bytes), String> {
        let body = match body {
            Some(v) => Body::from(serde_json::to_vec(&v).map_err(|e| e.to_string())?),
            None => Body::empty(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(|e| format!("invalid request: {e}"))?;
        req.extensions_mut().insert(Caller(ctx.user.clone(), ctx.roles.clone()));
        let router = super::api::router(self.admin.clone())
            .merge(super::ha_api::router(self.admin.clone()).layer(axum::middleware::from_fn(super::authorize)));
        let resp = router.oneshot(req).await.unwrap_or_else(|e| match e {});
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.map(|b| b.to_bytes()).map_err(|e| format!("cannot read the answer: {e}"))?;
        if parts.status.is_success() {
            return Ok((parts.headers, bytes));
        }
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| format!("the request failed ({})", parts.status));
        Err(message)
    }

    pub(super) async fn api_json(&self, ctx: &Ctx, path: &str) -> Result<Value, String> {
        let (_, b) = self.api(ctx, Method::GET, path, None).await?;
        serde_json::from_slice(&b).map_err(|e| format!("unexpected answer: {e}"))
    }
}

const NAV: [(&str, &str); 8] = [
    ("/ui/overview", "Overview"),
    ("/ui/subaccounts", "Subaccounts"),
    ("/ui/access", "Access control"),
    ("/ui/principal-propagation", "Principal propagation"),
    ("/ui/audit", "Audit log"),
    ("/ui/monitoring", "Monitoring"),
    ("/ui/ha", "High availability"),
    ("/ui/backup", "Backup"),
];

/// The page frame: header with navigation and logout, the message, the body.
fn page(status: StatusCode, title: &str, ctx: Option<&Ctx>, flash: Option<&Flash>, body: &str) -> Response {
    let mut nav = String::new();
    if let Some(ctx) = ctx {
        nav.push_str("<nav>");
        for (href, label) in NAV {
            let current = if label == title { " aria-current=\"page\"" } else { "" };
            nav.push_str(&format!("<a href=\"{href}\"{current}>{label}</a>"));
        }
        nav.push_str(&format!(
            "<form method=\"post\" action=\"/ui/logout\" class=\"logout\">{}<span class=\"user\">{}</span> \
             <button type=\"submit\">Log out</button></form></nav>",
            csrf_field(ctx),
            esc(&format!("{} ({})", ctx.user, ctx.roles.names().join(", ")))
        ));
    }
    let flash = flash
        .map(|f| {
            let class = if f.ok { "flash ok" } else { "flash error" };
            format!("<p class=\"{class}\" role=\"status\">{}</p>", esc(&f.text))
        })
        .unwrap_or_default();
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} · Ferry Cloud Connector</title><link rel=\"stylesheet\" href=\"/ui/static/style.css\">\
         <script src=\"/ui/static/app.js\" defer></script></head><body>\
         <header><span class=\"brand\">Ferry Cloud Connector</span>{nav}</header>\
         <main><h1>{t}</h1>{flash}{body}</main></body></html>",
        t = esc(title)
    );
    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    r
}

pub(super) fn csrf_field(ctx: &Ctx) -> String {
    format!("<input type=\"hidden\" name=\"_csrf\" value=\"{}\">", esc(&ctx.csrf))
}

/// One labelled input with its error message, if any.
pub(super) fn field(label: &str, input: &str, error: Option<&String>) -> String {
    let err = error.map(|e| format!("<span class=\"field-error\">{}</span>", esc(e))).unwrap_or_default();
    let class = if error.is_some() { "field invalid" } else { "field" };
    format!("<label class=\"{class}\"><span>{}</span>{input}{err}</label>", esc(label))
}

pub(super) fn text_input(name: &str, value: &str, extra: &str) -> String {
    format!("<input name=\"{}\" value=\"{}\" {extra}>", esc(name), esc(value))
}

// ---- logon, password change, logout

fn session_cookie(sid: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("{SESSION}={sid}; Path=/; Secure; HttpOnly; SameSite=Strict")).ok()
}

fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("JSESSIONID=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0")
}

fn login_form(user: &str, message: Option<(bool, &str)>, status: StatusCode) -> Response {
    let flash = message.map(|(ok, text)| Flash { ok, text: text.to_owned() });
    let body = format!(
        "<form method=\"post\" action=\"/ui/login\" class=\"card narrow\">{}{}<button type=\"submit\">Log on</button></form>\
         <p class=\"hint\">On first start the user is <code>Administrator</code> with password <code>manage</code>; \
         you must change it after the first logon.</p>",
        field("User", &text_input("user", user, "autocomplete=\"username\" required autofocus"), None),
        field(
            "Password",
            "<input type=\"password\" name=\"password\" autocomplete=\"current-password\" required>",
            None
        ),
    );
    page(status, "Log on", None, flash.as_ref(), &body)
}

#[derive(serde::Deserialize)]
struct LoginQuery {
    expired: Option<String>,
    changed: Option<String>,
}

async fn login_page(
    axum::extract::State(ui): axum::extract::State<Arc<Ui>>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<LoginQuery>,
) -> Response {
    if q.expired.is_none() && q.changed.is_none() && ui.ctx(&headers, true).await.is_ok() {
        return redirect("/ui/overview");
    }
    let message = if q.changed.is_some() {
        Some((true, "Password changed. Log on with the new password."))
    } else if q.expired.is_some() {
        Some((false, "Your session has expired. Please log on again."))
    } else {
        None
    };
    let mut r = login_form("", message, StatusCode::OK);
    if q.expired.is_some() {
        r.headers_mut().insert(header::SET_COOKIE, clear_cookie());
    }
    r
}

async fn login(
    axum::extract::State(ui): axum::extract::State<Arc<Ui>>,
    axum::Form(form): axum::Form<Form>,
) -> Response {
    let user = form.get("user").map(|s| s.trim()).unwrap_or_default();
    let password = form.get("password").map(String::as_str).unwrap_or_default();
    if user.is_empty() || password.is_empty() {
        return login_form(user, Some((false, "Enter the user name and the password.")), StatusCode::BAD_REQUEST);
    }
    let roles = match ui.admin.logon_roles(user, password).await {
        Ok(roles) => roles,
        Err(LogonFailure::Unavailable(_)) => {
            return login_form(
                user,
                Some((false, "The user directory (LDAP) does not answer; try again later.")),
                StatusCode::SERVICE_UNAVAILABLE,
            );
        }
        Err(LogonFailure::Wrong) => {
            return login_form(user, Some((false, "Wrong user name or password.")), StatusCode::UNAUTHORIZED);
        }
        Err(LogonFailure::Locked) => {
            return login_form(
                user,
                Some((false, "Too many failed logon attempts for this user; try again later.")),
                StatusCode::TOO_MANY_REQUESTS,
            );
        }
    };
    if !roles.allow(&Method::GET, VIEW_CHECK) {
        return login_form(
            user,
            Some((
                false,
                "Your user has none of the connector's roles for these pages (sccadmin, sccsubadmin, sccsupport, \
                 sccdisplay): ask your administrator for one.",
            )),
            StatusCode::FORBIDDEN,
        );
    }
    let (sid, _) = ui.admin.new_session(user, roles);
    let initial = ui.admin.state.lock().await.admin.initial_password;
    let mut r = redirect(if initial { "/ui/password" } else { "/ui/overview" });
    if let Some(c) = session_cookie(&sid) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

async fn logout(
    axum::extract::State(ui): axum::extract::State<Arc<Ui>>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<Form>,
) -> Response {
    let ctx = match ui.post_ctx(&headers, &form, true).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    ui.admin.end_session(&ctx.sid);
    let mut r = redirect("/ui/login");
    r.headers_mut().insert(header::SET_COOKIE, clear_cookie());
    r
}

fn password_form(ui: &Ui, ctx: &Ctx, initial: bool, errors: &HashMap<&str, String>, status: StatusCode) -> Response {
    let intro = if initial {
        "<p class=\"flash error\">You are using the initial password. Choose a new one before you continue.</p>"
    } else {
        ""
    };
    let pw =
        |name: &str, auto: &str| format!("<input type=\"password\" name=\"{name}\" autocomplete=\"{auto}\" required>");
    let body = format!(
        "{intro}<form method=\"post\" action=\"/ui/password\" class=\"card narrow\">{}{}{}{}\
         <button type=\"submit\">Change password</button></form>",
        csrf_field(ctx),
        field("Current password", &pw("old", "current-password"), errors.get("old")),
        field("New password (at least 8 characters)", &pw("new", "new-password"), errors.get("new")),
        field("Repeat the new password", &pw("repeat", "new-password"), errors.get("repeat")),
    );
    let flash = ui.take_flash(ctx);
    page(status, "Change password", Some(ctx), flash.as_ref(), &body)
}

async fn password_page(axum::extract::State(ui): axum::extract::State<Arc<Ui>>, headers: HeaderMap) -> Response {
    let ctx = match ui.ctx(&headers, true).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let initial = ui.admin.state.lock().await.admin.initial_password;
    password_form(&ui, &ctx, initial, &HashMap::new(), StatusCode::OK)
}

async fn change_password(
    axum::extract::State(ui): axum::extract::State<Arc<Ui>>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<Form>,
) -> Response {
    let ctx = match ui.post_ctx(&headers, &form, true).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let initial = ui.admin.state.lock().await.admin.initial_password;
    let get = |k: &str| form.get(k).cloned().unwrap_or_default();
    let (old, new, repeat) = (get("old"), get("new"), get("repeat"));
    let mut errors = HashMap::new();
    if old.is_empty() {
        errors.insert("old", "Enter your current password.".to_owned());
    }
    if new.chars().count() < 8 {
        errors.insert("new", "The new password must have at least 8 characters.".to_owned());
    } else if new == old {
        errors.insert("new", "The new password must differ from the current one.".to_owned());
    }
    if repeat != new {
        errors.insert("repeat", "The two new passwords differ.".to_owned());
    }
    if errors.is_empty() {
        let body = serde_json::json!({"oldPassword": old, "newPassword": new});
        match ui.api(&ctx, Method::PUT, super::PASSWORD_PATH, Some(body)).await {
            Ok(_) => {
                // The API ends every session with the old password, this one included.
                let mut r = redirect("/ui/login?changed=1");
                r.headers_mut().insert(header::SET_COOKIE, clear_cookie());
                return r;
            }
            Err(m) if m.contains("old password") => {
                errors.insert("old", "The current password is wrong.".to_owned());
            }
            Err(m) => {
                errors.insert("new", m);
            }
        }
    }
    password_form(&ui, &ctx, initial, &errors, StatusCode::BAD_REQUEST)
}

/// The UI's state for the sampler without keeping it alive.
type UiRef = Weak<Ui>;
