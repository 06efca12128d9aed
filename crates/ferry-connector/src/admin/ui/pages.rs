//! The pages behind the navigation. GET renders; POST validates, calls the API and redirects
//! back with a message (or re-renders the form with messages next to its fields).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::{Value, json};

use super::super::api::encode_resource_id;
use super::{Ctx, Form, Ui, charts, csrf_field, enc, esc, field, redirect, text_input};
use crate::audit::AuditLevel;

type S = State<Arc<Ui>>;
type F = axum::Form<Form>;

const CONF: &str = "/api/v1/configuration";

pub(super) fn routes() -> Router<Arc<Ui>> {
    Router::new()
        .route("/ui/overview", get(overview))
        .route("/ui/subaccounts", get(subaccounts).post(add_subaccount))
        .route("/ui/subaccounts/state", post(subaccount_state))
        .route("/ui/subaccounts/audit", post(subaccount_audit))
        .route("/ui/subaccounts/delete", post(delete_subaccount))
        .route("/ui/subaccounts/edit", post(edit_subaccount))
        .route("/ui/access", get(access))
        .route("/ui/access/mapping", get(mapping_page).post(save_mapping))
        .route("/ui/access/mapping/delete", post(delete_mapping))
        .route("/ui/access/check", post(check_reachability))
        .route("/ui/access/resource", post(add_resource))
        .route("/ui/access/resource/enabled", post(resource_enabled))
        .route("/ui/access/resource/delete", post(delete_resource))
        .route("/ui/principal-propagation", get(pp_page).post(save_pp))
        .route("/ui/principal-propagation/pattern", post(save_pattern))
        .route("/ui/principal-propagation/ca", post(replace_ca))
        .route("/ui/audit", get(audit_page).post(audit_level))
        .route("/ui/audit.csv", get(audit_csv))
        .route("/ui/monitoring", get(monitoring))
        .route("/ui/backup", get(backup_page))
        .route("/ui/backup/download", post(backup_download))
        .route("/ui/backup/restore", post(restore))
}

/// Unwraps a session or returns the redirect/error response.
macro_rules! session {
    ($e:expr) => {
        match $e.await {
            Ok(c) => c,
            Err(r) => return r,
        }
    };
}

fn get_field<'a>(form: &'a Form, k: &str) -> &'a str {
    form.get(k).map(|s| s.trim()).unwrap_or_default()
}

fn sub_path(region: &str, sub: &str) -> String {
    format!("{CONF}/subaccounts/{}/{}", enc(region), enc(sub))
}

/// Hidden fields naming a subaccount.
fn sub_fields(region: &str, sub: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"r\" value=\"{}\"><input type=\"hidden\" name=\"s\" value=\"{}\">",
        esc(region),
        esc(sub)
    )
}

/// A one-button form; `confirm` makes the page script ask first.
fn button(ctx: &Ctx, action: &str, hidden: &str, label: &str, confirm: Option<&str>, class: &str) -> String {
    let confirm = confirm.map(|c| format!(" data-confirm=\"{}\"", esc(c))).unwrap_or_default();
    format!(
        "<form method=\"post\" action=\"{action}\" class=\"inline\"{confirm}>{}{hidden}<button type=\"submit\" class=\"{class}\">{}</button></form>",
        csrf_field(ctx),
        esc(label)
    )
}

fn done(ui: &Ui, ctx: &Ctx, to: &str, result: Result<String, String>) -> Response {
    match result {
        Ok(m) => ui.set_flash(ctx, true, m),
        Err(m) => ui.set_flash(ctx, false, m),
    }
    redirect(to)
}

fn time_of(ms: u64) -> String {
    if ms == 0 {
        return "—".into();
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    let dt = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

fn state_badge(state: &str) -> String {
    let class = match state {
        "Connected" => "badge ok",
        "Disconnected" => "badge off",
        _ => "badge error",
    };
    format!("<span class=\"{class}\">{}</span>", esc(state))
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

// ---- overview

async fn overview(State(ui): S, headers: HeaderMap) -> Response {
    let ctx = session!(ui.ctx(&headers, false));
    let master = match ui.api(&ctx, Method::GET, "/exposed?action=hasMasterRole", None).await {
        Ok((_, b)) if b.as_ref() == b"false" => "shadow",
        _ => "master",
    };
    let mon = ui.api_json(&ctx, "/api/monitoring/subaccounts").await.unwrap_or_default();
    let mut rows = String::new();
    for sub in mon.get("subaccounts").and_then(Value::as_array).into_iter().flatten() {
        let t = sub.get("tunnel").cloned().unwrap_or_default();
        let since = t.get("connectedSinceTimeStamp").and_then(Value::as_u64).unwrap_or(0);
        let heard = t.get("lastHeartbeatTimeStamp").and_then(Value::as_u64).unwrap_or(0);
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"heartbeat\">{}</td></tr>",
            esc(&s(sub, "subaccount")),
            esc(&s(sub, "displayName")),
            esc(&s(sub, "locationID")),
            esc(&s(sub, "regionHost")),
            state_badge(&s(&t, "state")),
            esc(&s(&t, "connections")),
            esc(&time_of(since)),
            esc(&time_of(heard)),
        );
    }
    if rows.is_empty() {
        rows = "<tr><td colspan=\"8\">No subaccounts yet. <a href=\"/ui/subaccounts\">Add one</a>.</td></tr>".into();
    }
    let body = format!(
        "<dl class=\"facts\"><dt>Version</dt><dd id=\"version\">{}</dd><dt>High availability role</dt><dd id=\"ha-role\">{master}</dd></dl>\
         <h2>Subaccounts</h2><table><thead><tr><th>Subaccount</th><th>Display name</th><th>Location ID</th><th>Region host</th>\
         <th>Tunnel</th><th>Connections</th><th>Connected since</th><th>Last heartbeat</th></tr></thead><tbody>{rows}</tbody></table>",
        esc(env!("CARGO_PKG_VERSION"))
    );
    ui.render(&ctx, "Overview", &body)
}

// ---- subaccounts

async fn subaccounts(State(ui): S, headers: HeaderMap) -> Response {
    let ctx = session!(ui.ctx(&headers, false));
    subaccounts_page(&ui, &ctx, &Form::new(), &HashMap::new(), StatusCode::OK).await
}

async fn subaccounts_page(
    ui: &Ui,
    ctx: &Ctx,
    form: &Form,
    errors: &HashMap<&str, String>,
    status: StatusCode,
) -> Response {
    let list = ui.api_json(ctx, &format!("{CONF}/subaccounts")).await.unwrap_or_default();
    let cfg = ui.admin.config().await;
    let mut rows = String::new();
    for sub in list.as_array().into_iter().flatten() {
        let (region, id) = (s(sub, "regionHost"), s(sub, "subaccount"));
        let state = sub.get("tunnel").map(|t| s(t, "state")).unwrap_or_default();
        let hidden = sub_fields(&region, &id);
        let level = cfg.subaccount(&region, &id).map(|s| s.audit_level).unwrap_or_default();
        let connect = if state == "Disconnected" {
            button(
                ctx,
                "/ui/subaccounts/state",
                &format!("{hidden}<input type=\"hidden\" name=\"connected\" value=\"true\">"),
                "Connect",
                None,
                "",
            )
        } else {
            button(
                ctx,
                "/ui/subaccounts/state",
                &format!("{hidden}<input type=\"hidden\" name=\"connected\" value=\"false\">"),
                "Disconnect",
                Some(&format!("Disconnect subaccount {id}? Applications lose access to its systems.")),
                "",
            )
        };
        let delete = button(
            ctx,
            "/ui/subaccounts/delete",
            &hidden,
            "Delete",
            Some(&format!("Delete subaccount {id} with all its system mappings? This cannot be undone.")),
            "danger",
        );
        let edit = format!(
            "<details class=\"edit\"><summary>Edit</summary><form method=\"post\" action=\"/ui/subaccounts/edit\">{}{hidden}{}{}\
             <button type=\"submit\">Save</button></form></details>",
            csrf_field(ctx),
            field("Display name", &text_input("displayName", &s(sub, "displayName"), ""), None),
            field("Description", &text_input("description", &s(sub, "description"), ""), None),
        );
        let audit = format!(
            "<form method=\"post\" action=\"/ui/subaccounts/audit\" class=\"inline\">{}{hidden}{}<button type=\"submit\">Set</button></form>",
            csrf_field(ctx),
            level_select("level", level)
        );
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{audit}</td><td class=\"actions\">{connect}{delete}{edit}</td></tr>",
            esc(&id),
            esc(&s(sub, "displayName")),
            esc(&s(sub, "locationID")),
            esc(&region),
            state_badge(&state),
        );
    }
    if rows.is_empty() {
        rows = "<tr><td colspan=\"7\">No subaccounts yet.</td></tr>".into();
    }
    let v = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    let body = format!(
        "<table><thead><tr><th>Subaccount</th><th>Display name</th><th>Location ID</th><th>Region host (tunnel)</th><th>Tunnel</th>\
         <th>Audit level</th><th></th></tr></thead><tbody>{rows}</tbody></table>\
         <h2>Add subaccount</h2><form method=\"post\" action=\"/ui/subaccounts\" class=\"card\" id=\"add-subaccount\">{csrf}\
         {data}<p class=\"hint\">The location ID comes with the authentication data (<code>ferry connector enroll \
         --location</code>): it is part of the connection certificate.</p>{name}{desc}\
         <button type=\"submit\">Add and connect</button></form>",
        csrf = csrf_field(ctx),
        data = field(
            "Authentication data (authentication-data.json of `ferry connector enroll`, as JSON or base64)",
            // Never filled in again after an error: the data holds the connection's private key.
            "<textarea name=\"authenticationData\" rows=\"6\" required data-file-target></textarea>\
             <input type=\"file\" accept=\".json,application/json\" data-file-into=\"authenticationData\" class=\"js-only\">",
            errors.get("authenticationData")
        ),
        name = field("Display name", &text_input("displayName", v("displayName"), ""), None),
        desc = field("Description", &text_input("description", v("description"), ""), None),
    );
    let mut r = ui.render(ctx, "Subaccounts", &body);
    *r.status_mut() = status;
    r
}

fn level_select(name: &str, current: AuditLevel) -> String {
    let mut out = format!("<select name=\"{name}\">");
    for (l, label) in [(AuditLevel::Off, "OFF"), (AuditLevel::Security, "SECURITY"), (AuditLevel::All, "ALL")] {
        let sel = if l == current { " selected" } else { "" };
        let _ = write!(out, "<option value=\"{label}\"{sel}>{label}</option>");
    }
    out.push_str("</select>");
    out
}

async fn add_subaccount(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let data = get_field(&form, "authenticationData");
    let mut errors = HashMap::new();
    if data.is_empty() {
        errors.insert("authenticationData", "Paste the authentication data.".to_owned());
    }
    if errors.is_empty() {
        let body = json!({
            "authenticationData": data,
            "displayName": get_field(&form, "displayName"),
            "description": get_field(&form, "description"),
        });
        match ui.api(&ctx, Method::POST, &format!("{CONF}/subaccounts"), Some(body)).await {
            Ok(_) => return done(&ui, &ctx, "/ui/subaccounts", Ok("Subaccount added and connecting.".into())),
            Err(m) => {
                errors.insert("authenticationData", m);
            }
        }
    }
    subaccounts_page(&ui, &ctx, &form, &errors, StatusCode::BAD_REQUEST).await
}

async fn subaccount_state(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let (r, sub) = (get_field(&form, "r"), get_field(&form, "s"));
    let connected = get_field(&form, "connected") == "true";
    let res =
        ui.api(&ctx, Method::PUT, &format!("{}/state", sub_path(r, sub)), Some(json!({"connected": connected}))).await;
    let what = if connected { "connected" } else { "disconnected" };
    done(&ui, &ctx, "/ui/subaccounts", res.map(|_| format!("Subaccount {sub} {what}.")))
}

async fn subaccount_audit(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let (r, sub) = (get_field(&form, "r"), get_field(&form, "s"));
    let level = get_field(&form, "level");
    let path = format!("{CONF}/connector/auditLog/subaccounts/{}/{}", enc(r), enc(sub));
    let res = ui.api(&ctx, Method::PUT, &path, Some(json!({"level": level}))).await;
    done(&ui, &ctx, "/ui/subaccounts", res.map(|_| format!("Audit level of {sub} set to {level}.")))
}

async fn edit_subaccount(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let (r, sub) = (get_field(&form, "r"), get_field(&form, "s"));
    let body = json!({"displayName": get_field(&form, "displayName"), "description": get_field(&form, "description")});
    let res = ui.api(&ctx, Method::PUT, &sub_path(r, sub), Some(body)).await;
    done(&ui, &ctx, "/ui/subaccounts", res.map(|_| format!("Subaccount {sub} saved.")))
}

async fn delete_subaccount(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let (r, sub) = (get_field(&form, "r"), get_field(&form, "s"));
    let res = ui.api(&ctx, Method::DELETE, &sub_path(r, sub), None).await;
    done(&ui, &ctx, "/ui/subaccounts", res.map(|_| format!("Subaccount {sub} deleted.")))
}

// ---- access control

async fn access(State(ui): S, headers: HeaderMap) -> Response {
    let ctx = session!(ui.ctx(&headers, false));
    let cfg = ui.admin.config().await;
    let mut body = String::new();
    if cfg.subaccounts.is_empty() {
        body.push_str("<p>No subaccounts yet. <a href=\"/ui/subaccounts\">Add one</a> first.</p>");
    }
    for sub in &cfg.subaccounts {
        let (region, id) = (&sub.region_host, &sub.subaccount);
        let loc =
            if sub.location_id.is_empty() { String::new() } else { format!(" (location {})", esc(&sub.location_id)) };
        let _ = write!(
            body,
            "<section class=\"subaccount\"><h2>Subaccount {}{loc}</h2>\
             <p><a class=\"button\" href=\"/ui/access/mapping?r={}&amp;s={}\">Add system mapping</a></p>",
            esc(id),
            enc(region),
            enc(id)
        );
        if sub.system_mappings.is_empty() {
            body.push_str("<p>No system mappings: applications reach nothing through this subaccount.</p>");
        }
        for sm in &sub.system_mappings {
            let m = &sm.mapping;
            let mid = format!("{}:{}", m.virtual_host, m.virtual_port);
            let hidden =
                format!("{}<input type=\"hidden\" name=\"id\" value=\"{}\">", sub_fields(region, id), esc(&mid));
            let proto =
                serde_json::to_value(m.protocol).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            let _ = write!(
                body,
                "<div class=\"mapping card\" data-mapping=\"{mid_e}\"><h3>{mid_e} → {}:{} <span class=\"badge\">{}</span></h3>\
                 <p class=\"actions\"><a class=\"button\" href=\"/ui/access/mapping?r={}&amp;s={}&amp;id={}\">Edit</a>{}{}</p>",
                esc(&m.local_host),
                m.local_port,
                esc(&proto),
                enc(region),
                enc(id),
                enc(&mid),
                button(&ctx, "/ui/access/check", &hidden, "Check reachability", None, ""),
                button(
                    &ctx,
                    "/ui/access/mapping/delete",
                    &hidden,
                    "Delete mapping",
                    Some(&format!("Delete system mapping {mid} and its resources?")),
                    "danger"
                ),
                mid_e = esc(&mid),
            );
            if m.protocol.is_http() {
                body.push_str("<table class=\"resources\"><thead><tr><th>Resource (URL path)</th><th>Access policy</th><th>Status</th><th></th></tr></thead><tbody>");
                for r in &m.resources {
                    let rh = format!("{hidden}<input type=\"hidden\" name=\"path\" value=\"{}\">", esc(&r.path));
                    let toggle = format!("{rh}<input type=\"hidden\" name=\"enabled\" value=\"{}\">", !r.enabled);
                    let _ = write!(
                        body,
                        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td class=\"actions\">{}{}</td></tr>",
                        esc(&r.path),
                        if r.exact_match_only { "Path only" } else { "Path and all sub-paths" },
                        if r.enabled {
                            "<span class=\"badge ok\">enabled</span>"
                        } else {
                            "<span class=\"badge off\">disabled</span>"
                        },
                        button(
                            &ctx,
                            "/ui/access/resource/enabled",
                            &toggle,
                            if r.enabled { "Disable" } else { "Enable" },
                            None,
                            ""
                        ),
                        button(
                            &ctx,
                            "/ui/access/resource/delete",
                            &rh,
                            "Delete",
                            Some(&format!("Delete resource {}?", r.path)),
                            "danger"
                        ),
                    );
                }
                let _ = write!(
                    body,
                    "</tbody></table><form method=\"post\" action=\"/ui/access/resource\" class=\"row add-resource\">{}{hidden}\
                     <label>URL path <input name=\"path\" placeholder=\"/sap/opu/odata\" required pattern=\"/.*\" \
                     title=\"a URL path starting with /\"></label>\
                     <label>Access policy <select name=\"exact\"><option value=\"false\">Path and all sub-paths</option>\
                     <option value=\"true\">Path only</option></select></label>\
                     <label class=\"check\"><input type=\"checkbox\" name=\"enabled\" value=\"true\" checked> enabled</label>\
                     <button type=\"submit\">Add resource</button></form>",
                    csrf_field(&ctx)
                );
            } else {
                body.push_str("<p class=\"hint\">TCP and LDAP mappings have no resources: the whole port is open.</p>");
            }
            body.push_str("</div>");
        }
        body.push_str("</section>");
    }
    ui.render(&ctx, "Access control", &body)
}

/// Every field optional, so that a request without a session meets the logon redirect, not a
/// query rejection.
#[derive(serde::Deserialize)]
struct MappingQuery {
    #[serde(default)]
    r: String,
    #[serde(default)]
    s: String,
    id: Option<String>,
}

const PROTOCOLS: [&str; 7] = ["HTTP", "HTTPS", "TCP", "TCPS", "LDAP", "LDAPS", "RFC"];
const BACKENDS: [(&str, &str); 5] = [
    ("abapSys", "ABAP system"),
    ("netweaverCE", "SAP NetWeaver (Java)"),
    ("hana", "SAP HANA"),
    ("otherSAPsys", "Other SAP system"),
    ("nonSAPsys", "Non-SAP system"),
];
const AUTH_MODES: [(&str, &str); 4] = [
    ("NONE", "None"),
    ("NONE_RESTRICTED", "None (restricted)"),
    ("X509_GENERAL", "X.509 certificate (principal propagation)"),
    ("X509_RESTRICTED", "X.509 certificate (restricted)"),
];

fn select(name: &str, options: &[(&str, &str)], current: &str) -> String {
    let mut out = format!("<select name=\"{name}\">");
    for (v, label) in options {
        let sel = if *v == current { " selected" } else { "" };
        let _ = write!(out, "<option value=\"{}\"{sel}>{}</option>", esc(v), esc(label));
    }
    out.push_str("</select>");
    out
}

fn mapping_form(ui: &Ui, ctx: &Ctx, f: &Form, errors: &HashMap<&str, String>, status: StatusCode) -> Response {
    let v = |k: &str| f.get(k).map(String::as_str).unwrap_or_default();
    let orig = v("orig");
    let editing = !orig.is_empty();
    let readonly = if editing { "readonly" } else { "required" };
    let protos: Vec<(&str, &str)> = PROTOCOLS.iter().map(|p| (*p, *p)).collect();
    let body = format!(
        "<p>Subaccount <strong>{sub}</strong>. Applications call the <em>virtual</em> host and port; the connector forwards to the <em>internal</em> one.</p>\
         <form method=\"post\" action=\"/ui/access/mapping\" class=\"card\" id=\"mapping-form\">{csrf}{hidden}\
         <input type=\"hidden\" name=\"orig\" value=\"{orig}\">\
         <fieldset><legend>Backend</legend>{backend}{protocol}</fieldset>\
         <fieldset><legend>Virtual (what applications use)</legend>{vh}{vp}</fieldset>\
         <fieldset><legend>Internal (the real system)</legend>{lh}{lp}</fieldset>\
         <fieldset><legend>Options</legend>{hih}{auth}{desc}</fieldset>\
         <button type=\"submit\">{action}</button> <a href=\"/ui/access\">Cancel</a></form>",
        sub = esc(v("s")),
        csrf = csrf_field(ctx),
        hidden = sub_fields(v("r"), v("s")),
        orig = esc(orig),
        backend = field("Back-end type", &select("backendType", &BACKENDS, v("backendType")), None),
        protocol = field("Protocol", &select("protocol", &protos, v("protocol")), errors.get("protocol")),
        vh = field("Virtual host", &text_input("virtualHost", v("virtualHost"), readonly), errors.get("virtualHost")),
        vp = field(
            "Virtual port",
            &text_input("virtualPort", v("virtualPort"), &format!("{readonly} inputmode=\"numeric\"")),
            errors.get("virtualPort")
        ),
        lh = field("Internal host", &text_input("localHost", v("localHost"), "required"), errors.get("localHost")),
        lp = field(
            "Internal port",
            &text_input("localPort", v("localPort"), "required inputmode=\"numeric\""),
            errors.get("localPort")
        ),
        hih = field(
            "Host in request header",
            &select(
                "hostInHeader",
                &[("VIRTUAL", "Use virtual host"), ("INTERNAL", "Use internal host")],
                v("hostInHeader")
            ),
            None
        ),
        auth = field(
            "Principal type",
            &select("authenticationMode", &AUTH_MODES, v("authenticationMode")),
            errors.get("authenticationMode")
        ),
        desc = field("Description", &text_input("description", v("description"), ""), None),
        action = if editing { "Save" } else { "Add mapping" },
    );
    let mut r = ui.render(ctx, if editing { "Edit system mapping" } else { "Add system mapping" }, &body);
    *r.status_mut() = status;
    r
}

async fn mapping_page(State(ui): S, headers: HeaderMap, Query(q): Query<MappingQuery>) -> Response {
    let ctx = session!(ui.ctx(&headers, false));
    if q.r.is_empty() || q.s.is_empty() {
        return done(
            &ui,
            &ctx,
            "/ui/access",
            Err("Add system mappings from a subaccount's section of this page.".into()),
        );
    }
    let mut f = Form::new();
    f.insert("r".into(), q.r.clone());
    f.insert("s".into(), q.s.clone());
    if let Some(id) = q.id.filter(|i| !i.is_empty()) {
        let path = format!("{}/systemMappings/{}", sub_path(&q.r, &q.s), enc(&id));
        match ui.api_json(&ctx, &path).await {
            Ok(m) => {
                for k in [
                    "virtualHost",
                    "virtualPort",
                    "localHost",
                    "localPort",
                    "protocol",
                    "hostInHeader",
                    "authenticationMode",
                    "backendType",
                    "description",
                ] {
                    f.insert(k.into(), s(&m, k).to_uppercase_if(k));
                }
                f.insert("orig".into(), id);
            }
            Err(e) => return done(&ui, &ctx, "/ui/access", Err(e)),
        }
    } else {
        f.insert("protocol".into(), "HTTP".into());
        f.insert("backendType".into(), "abapSys".into());
    }
    mapping_form(&ui, &ctx, &f, &HashMap::new(), StatusCode::OK)
}

/// `hostInHeader` is camelCase in the API's JSON and upper case in SAP's UI.
trait UpperFor {
    fn to_uppercase_if(self, k: &str) -> String;
}

impl UpperFor for String {
    fn to_uppercase_if(self, k: &str) -> String {
        if k == "hostInHeader" { self.to_uppercase() } else { self }
    }
}

fn port_error(v: &str) -> Option<String> {
    match v.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => None,
        _ => Some("Enter a port number between 1 and 65535.".into()),
    }
}

fn host_error(v: &str) -> Option<String> {
    if v.is_empty() {
        return Some("Enter a host name or IP address.".into());
    }
    if v.len() > 255 || !v.chars().all(|c| c.is_ascii_alphanumeric() || ".-[]:".contains(c)) {
        return Some("Use only letters, digits, '.', '-' (and ':' or [] for IPv6 addresses).".into());
    }
    None
}

async fn save_mapping(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let v = |k: &str| get_field(&form, k);
    let mut errors = HashMap::new();
    for (k, e) in [
        ("virtualHost", host_error(v("virtualHost"))),
        ("virtualPort", port_error(v("virtualPort"))),
        ("localHost", host_error(v("localHost"))),
        ("localPort", port_error(v("localPort"))),
    ] {
        if let Some(e) = e {
            errors.insert(k, e);
        }
    }
    if !PROTOCOLS.contains(&v("protocol")) {
        errors.insert("protocol", "Choose a protocol.".into());
    }
    let x509 = v("authenticationMode").starts_with("X509");
    if x509 && !v("protocol").starts_with("HTTP") {
        errors.insert("authenticationMode", "Principal propagation works with HTTP and HTTPS mappings only.".into());
    }
    if errors.is_empty() {
        let (r, sub, orig) = (v("r"), v("s"), v("orig"));
        let host_in_header = if v("hostInHeader") == "INTERNAL" { "internal" } else { "virtual" };
        let mut m = json!({
            "virtualHost": v("virtualHost"),
            "virtualPort": v("virtualPort").parse::<u16>().unwrap_or(0),
            "localHost": v("localHost"),
            "localPort": v("localPort").parse::<u16>().unwrap_or(0),
            "protocol": v("protocol"),
            "hostInHeader": host_in_header,
            "authenticationMode": if v("authenticationMode").is_empty() { "NONE" } else { v("authenticationMode") },
            "backendType": v("backendType"),
        });
        if !v("description").is_empty() {
            m["description"] = json!(v("description"));
        }
        let base = format!("{}/systemMappings", sub_path(r, sub));
        let res = if orig.is_empty() {
            ui.api(&ctx, Method::POST, &base, Some(m)).await
        } else {
            ui.api(&ctx, Method::PUT, &format!("{base}/{}", enc(orig)), Some(m)).await
        };
        match res {
            Ok(_) => {
                let id = format!("{}:{}", v("virtualHost"), v("virtualPort"));
                return done(&ui, &ctx, "/ui/access", Ok(format!("System mapping {id} saved.")));
            }
            Err(e) => {
                let k = if e.contains("virtualHost") || e.contains("already") {
                    "virtualHost"
                } else if e.contains("localHost") {
                    "localHost"
                } else if e.contains("port") {
                    "virtualPort"
                } else {
                    "protocol"
                };
                errors.insert(k, e);
            }
        }
    }
    mapping_form(&ui, &ctx, &form, &errors, StatusCode::BAD_REQUEST)
}

async fn delete_mapping(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let (r, sub, id) = (get_field(&form, "r"), get_field(&form, "s"), get_field(&form, "id"));
    let res = ui.api(&ctx, Method::DELETE, &format!("{}/systemMappings/{}", sub_path(r, sub), enc(id)), None).await;
    done(&ui, &ctx, "/ui/access", res.map(|_| format!("System mapping {id} deleted.")))
}

/// Opens a TCP connection to the mapping's internal host and port (a few seconds at most) and
/// tells whether that worked: the connector's view of the backend, not the application's.
async fn check_reachability(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let (r, sub, id) = (get_field(&form, "r"), get_field(&form, "s"), get_field(&form, "id"));
    let cfg = ui.admin.config().await;
    let target = cfg.subaccount(r, sub).and_then(|s| {
        s.system_mappings
            .iter()
            .find(|m| format!("{}:{}", m.mapping.virtual_host, m.mapping.virtual_port).eq_ignore_ascii_case(id))
            .map(|m| (m.mapping.local_host.clone(), m.mapping.local_port))
    });
    let Some((host, port)) = target else {
        return done(&ui, &ctx, "/ui/access", Err(format!("No system mapping {id}.")));
    };
    let addr = format!("{}:{port}", host.trim_start_matches('[').trim_end_matches(']'));
    let res = match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect((host_for_connect(&host), port)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(format!("Internal host {addr} of {id} is reachable.")),
        Ok(Err(e)) => Err(format!("Internal host {addr} of {id} is not reachable: {e}.")),
        Err(_) => Err(format!("Internal host {addr} of {id} did not answer within 3 seconds.")),
    };
    done(&ui, &ctx, "/ui/access", res)
}

fn host_for_connect(h: &str) -> &str {
    h.trim_start_matches('[').trim_end_matches(']')
}

async fn add_resource(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let (r, sub, id, path) =
        (get_field(&form, "r"), get_field(&form, "s"), get_field(&form, "id"), get_field(&form, "path"));
    if !path.starts_with('/') {
        return done(
            &ui,
            &ctx,
            "/ui/access",
            Err("A resource is a URL path starting with '/', e.g. /sap/opu/odata.".into()),
        );
    }
    let body = json!({
        "id": path,
        "exactMatchOnly": get_field(&form, "exact") == "true",
        "enabled": get_field(&form, "enabled") == "true",
    });
    let res = ui
        .api(&ctx, Method::POST, &format!("{}/systemMappings/{}/resources", sub_path(r, sub), enc(id)), Some(body))
        .await;
    done(&ui, &ctx, "/ui/access", res.map(|_| format!("Resource {path} added to {id}.")))
}

fn resource_url(form: &Form) -> String {
    format!(
        "{}/systemMappings/{}/resources/{}",
        sub_path(get_field(form, "r"), get_field(form, "s")),
        enc(get_field(form, "id")),
        enc(&encode_resource_id(get_field(form, "path")))
    )
}

async fn resource_enabled(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let enabled = get_field(&form, "enabled") == "true";
    let res = ui.api(&ctx, Method::PUT, &resource_url(&form), Some(json!({"enabled": enabled}))).await;
    let what = if enabled { "enabled" } else { "disabled" };
    done(&ui, &ctx, "/ui/access", res.map(|_| format!("Resource {} {what}.", get_field(&form, "path"))))
}

async fn delete_resource(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let res = ui.api(&ctx, Method::DELETE, &resource_url(&form), None).await;
    done(&ui, &ctx, "/ui/access", res.map(|_| format!("Resource {} deleted.", get_field(&form, "path"))))
}

// ---- principal propagation

async fn pp_page(State(ui): S, headers: HeaderMap) -> Response {
    let ctx = session!(ui.ctx(&headers, false));
    let p = ui.admin.config().await.pp_settings;
    let mut f = Form::new();
    f.insert("certificateValidityInMin".into(), p.certificate_validity_in_min.to_string());
    f.insert("expirationToleranceInHr".into(), p.expiration_tolerance_in_hr.to_string());
    pp_form(&ui, &ctx, &f, &HashMap::new(), StatusCode::OK)
}

fn pp_form(ui: &Ui, ctx: &Ctx, f: &Form, errors: &HashMap<&str, String>, status: StatusCode) -> Response {
    let v = |k: &str| f.get(k).map(String::as_str).unwrap_or_default();
    let (ca, pattern) = ui.admin.pp_effective();
    let note = if ui.admin.config.connection.principal_propagation.is_none() {
        "<p class=\"hint\">Principal propagation is not configured on this connector (no token keys; see \
         <code>[principal_propagation]</code> in docs/configuration.md). The settings below apply once it is.</p>"
    } else {
        ""
    };
    let ca = match ca {
        Some(pem) => format!(
            "<dl class=\"facts\"><dt>CA certificate (issues the short-lived user certificates)</dt><dd><pre id=\"pp-ca\">{}</pre></dd></dl>",
            esc(&pem)
        ),
        None => "<p class=\"hint\">No CA yet: upload one below.</p>".into(),
    };
    // The pattern form keeps what was typed when it is refused; the CA form never shows the key.
    let typed = f.get("subjectPattern").cloned().unwrap_or(pattern);
    let body = format!(
        "{note}{ca}<form method=\"post\" action=\"/ui/principal-propagation\" class=\"card narrow\">{csrf}{}{}<button type=\"submit\">Save</button></form>\
         <h2>Subject pattern</h2><form method=\"post\" action=\"/ui/principal-propagation/pattern\" class=\"card narrow\">{csrf}{}\
         <button type=\"submit\">Save pattern</button></form>\
         <h2>Replace the CA</h2><form method=\"post\" action=\"/ui/principal-propagation/ca\" class=\"card narrow\" \
         data-confirm=\"Replace the principal propagation CA? Backends must trust the new CA for the next user certificates.\">{csrf}{}{}{}{}\
         <button type=\"submit\" class=\"danger\">Replace CA</button></form>",
        field(
            "Certificate validity (minutes, 1–43200)",
            &text_input("certificateValidityInMin", v("certificateValidityInMin"), "required inputmode=\"numeric\""),
            errors.get("certificateValidityInMin")
        ),
        field(
            "Token expiration tolerance (hours, 1–336)",
            &text_input("expirationToleranceInHr", v("expirationToleranceInHr"), "required inputmode=\"numeric\""),
            errors.get("expirationToleranceInHr")
        ),
        field(
            "Pattern, e.g. CN=${name},EMAIL=${mail},O=ACME (attributes CN, EMAIL, L, OU, O, ST, C)",
            &text_input("subjectPattern", &typed, "required"),
            errors.get("subjectPattern")
        ),
        field(
            "PKCS#12 file (or its content in base64)",
            "<input type=\"file\" data-file-into=\"pkcs12\" data-base64 class=\"js-only\"><textarea name=\"pkcs12\" rows=\"2\"></textarea>",
            errors.get("pkcs12")
        ),
        field(
            "Or the CA certificate (PEM)",
            "<input type=\"file\" data-file-into=\"certificate\" class=\"js-only\"><textarea name=\"certificate\" rows=\"3\"></textarea>",
            errors.get("certificate")
        ),
        field(
            "and its private key (PEM)",
            "<input type=\"file\" data-file-into=\"key\" class=\"js-only\"><textarea name=\"key\" rows=\"3\" autocomplete=\"off\"></textarea>",
            None
        ),
        field(
            "Password (of the PKCS#12 file or an encrypted key)",
            "<input type=\"password\" name=\"password\" autocomplete=\"off\">",
            None
        ),
        csrf = csrf_field(ctx),
    );
    let mut r = ui.render(ctx, "Principal propagation", &body);
    *r.status_mut() = status;
    r
}

/// Fills the validity fields of a re-rendered form with the stored values.
async fn with_settings(ui: &Ui, mut form: Form) -> Form {
    let p = ui.admin.config().await.pp_settings;
    form.insert("certificateValidityInMin".into(), p.certificate_validity_in_min.to_string());
    form.insert("expirationToleranceInHr".into(), p.expiration_tolerance_in_hr.to_string());
    form
}

async fn save_pattern(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let pattern = get_field(&form, "subjectPattern");
    let mut fields = serde_json::Map::new();
    let mut error = crate::principal::check_pattern(pattern).err();
    for part in pattern.split(',') {
        if let Some((k, v)) = part.split_once('=') {
            let k = k.trim().to_ascii_uppercase();
            if fields.insert(k.clone(), Value::String(v.trim().into())).is_some() {
                error.get_or_insert(format!("{k} appears twice"));
            }
        }
    }
    if error.is_none() {
        let body = json!([{"subjectPattern": fields}]);
        match ui.api(&ctx, Method::PUT, &format!("{CONF}/connector/onPremises/subjectPatternRules"), Some(body)).await {
            Ok(_) => return done(&ui, &ctx, "/ui/principal-propagation", Ok("Subject pattern saved.".into())),
            Err(e) => error = Some(e),
        }
    }
    let mut errors = HashMap::new();
    errors.insert("subjectPattern", error.unwrap_or_default());
    let f = with_settings(&ui, form).await;
    pp_form(&ui, &ctx, &f, &errors, StatusCode::BAD_REQUEST)
}

async fn replace_ca(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let p12 = get_field(&form, "pkcs12");
    let password = form.get("password").cloned().unwrap_or_default();
    let (body, at) = if !p12.is_empty() {
        (json!({"pkcs12": p12, "password": password}), "pkcs12")
    } else {
        let (c, k) = (get_field(&form, "certificate"), get_field(&form, "key"));
        if c.is_empty() || k.is_empty() {
            let mut errors = HashMap::new();
            errors.insert("pkcs12", "Choose a PKCS#12 file, or give the CA certificate and its key in PEM.".to_owned());
            let f = with_settings(&ui, Form::new()).await;
            return pp_form(&ui, &ctx, &f, &errors, StatusCode::BAD_REQUEST);
        }
        (json!({"certificate": c, "key": k, "password": password}), "certificate")
    };
    match ui.api(&ctx, Method::PUT, &format!("{CONF}/connector/onPremises/ppCaCertificate"), Some(body)).await {
        Ok(_) => done(&ui, &ctx, "/ui/principal-propagation", Ok("Principal propagation CA replaced.".into())),
        Err(e) => {
            let mut errors = HashMap::new();
            errors.insert(at, e);
            // Nothing of the upload is shown again: it holds the CA's key.
            let f = with_settings(&ui, Form::new()).await;
            pp_form(&ui, &ctx, &f, &errors, StatusCode::BAD_REQUEST)
        }
    }
}

async fn save_pp(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let mut errors = HashMap::new();
    let num = |k: &str, max: u32| get_field(&form, k).parse::<u32>().ok().filter(|n| (1..=max).contains(n));
    let validity = num("certificateValidityInMin", 43200);
    let tolerance = num("expirationToleranceInHr", 336);
    if validity.is_none() {
        errors.insert("certificateValidityInMin", "Enter a whole number of minutes between 1 and 43200.".into());
    }
    if tolerance.is_none() {
        errors.insert("expirationToleranceInHr", "Enter a whole number of hours between 1 and 336.".into());
    }
    if let (Some(v), Some(t)) = (validity, tolerance) {
        let body = json!({"certificateValidityInMin": v, "expirationToleranceInHr": t});
        match ui.api(&ctx, Method::PUT, &format!("{CONF}/connector/onPremises/ppSettings"), Some(body)).await {
            Ok(_) => {
                return done(
                    &ui,
                    &ctx,
                    "/ui/principal-propagation",
                    Ok("Principal propagation settings saved.".into()),
                );
            }
            Err(e) => {
                errors.insert("certificateValidityInMin", e);
            }
        }
    }
    pp_form(&ui, &ctx, &form, &errors, StatusCode::BAD_REQUEST)
}

// ---- audit log

#[derive(serde::Deserialize, Default)]
struct AuditQuery {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    q: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
}

/// Splits one CSV line of the audit log (RFC 4180 quoting, no line breaks inside fields: the
/// writer quotes them, and the viewer shows such lines cut, which is fine for reading).
fn csv_split(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if cur.is_empty() => quoted = true,
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Audit records (as CSV lines) matching the filter, newest first.
fn audit_lines(dir: &std::path::Path, q: &AuditQuery) -> Vec<String> {
    let mut files = Vec::new();
    for sub in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        files.extend(crate::audit::log_files(&sub.path()));
    }
    let text = q.q.to_lowercase();
    // `datetime-local` values (`2026-11-23T04:10`) compare as text with the timestamps.
    let (from, to) = (q.from.trim(), q.to.trim());
    let mut lines = Vec::new();
    for f in files {
        let Ok(content) = std::fs::read_to_string(&f) else { continue };
        for line in content.lines().filter_map(crate::audit::csv_line) {
            let cols = csv_split(&line);
            let (ts, event) =
                (cols.first().map(String::as_str).unwrap_or(""), cols.get(1).map(String::as_str).unwrap_or(""));
            let kind_ok = match q.kind.as_str() {
                "allowed" => event == "Access Allowed",
                "denied" => event == "Access Denied",
                "change" => !event.starts_with("Access "),
                _ => true,
            };
            let from_ok = from.is_empty() || ts >= from;
            let to_ok = to.is_empty() || ts.get(..to.len()).is_some_and(|t| t <= to);
            if kind_ok && from_ok && to_ok && (text.is_empty() || line.to_lowercase().contains(&text)) {
                lines.push(line);
            }
        }
    }
    lines.sort_unstable_by(|a, b| b.cmp(a));
    lines
}

fn audit_dir(ui: &Ui) -> std::path::PathBuf {
    ui.admin.config.audit_dir.clone().unwrap_or_else(|| ui.admin.config.data_dir.join("audit"))
}

const SHOWN: usize = 500;

async fn audit_page(State(ui): S, headers: HeaderMap, Query(q): Query<AuditQuery>) -> Response {
    let ctx = session!(ui.ctx(&headers, false));
    let level = ui.admin.config().await.audit_level;
    let dir = audit_dir(&ui);
    let q2 = AuditQuery { kind: q.kind.clone(), q: q.q.clone(), from: q.from.clone(), to: q.to.clone() };
    let lines = tokio::task::spawn_blocking(move || audit_lines(&dir, &q2)).await.unwrap_or_default();
    let mut rows = String::new();
    for line in lines.iter().take(SHOWN) {
        let c = csv_split(line);
        let g = |i: usize| esc(c.get(i).map(String::as_str).unwrap_or(""));
        let class = match c.get(1).map(String::as_str) {
            Some("Access Denied") => " class=\"denied\"",
            Some("Access Allowed") => " class=\"allowed\"",
            _ => "",
        };
        // The propagated user next to the app; an exchange's bytes and duration after the reason.
        let who = if g(11).is_empty() { g(5) } else { format!("{} / {}", g(5), g(11)) };
        let what = if g(14).is_empty() {
            g(10)
        } else {
            format!("{} {} B in, {} B out, {} ms", g(10), g(12), g(13), g(14)).trim_start().to_owned()
        };
        let _ = write!(
            rows,
            "<tr{class}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} {}</td><td>{}</td></tr>",
            g(0),
            g(1),
            g(2),
            g(3),
            who,
            g(6),
            g(8),
            g(9),
            what
        );
    }
    if rows.is_empty() {
        rows = "<tr><td colspan=\"8\">No audit entries match.</td></tr>".into();
    }
    let kinds =
        [("", "All"), ("allowed", "Access allowed"), ("denied", "Access denied"), ("change", "Configuration changes")];
    let query = format!("kind={}&q={}&from={}&to={}", enc(&q.kind), enc(&q.q), enc(&q.from), enc(&q.to));
    let more = if lines.len() > SHOWN {
        format!("<p class=\"hint\">Showing the newest {SHOWN} of {} entries; download for all.</p>", lines.len())
    } else {
        String::new()
    };
    let body = format!(
        "<form method=\"get\" action=\"/ui/audit\" class=\"row filters\">\
         <label>Type {kind}</label><label>Text <input name=\"q\" value=\"{qv}\" type=\"search\"></label>\
         <label>From (UTC) <input type=\"datetime-local\" name=\"from\" value=\"{from}\"></label>\
         <label>To (UTC) <input type=\"datetime-local\" name=\"to\" value=\"{to}\"></label>\
         <button type=\"submit\">Filter</button> <a class=\"button\" id=\"audit-download\" href=\"/ui/audit.csv?{query_e}\" download>Download CSV</a></form>\
         {more}<table class=\"audit\"><thead><tr><th>Time (UTC)</th><th>Event</th><th>Subaccount</th><th>Location</th><th>Client / user</th>\
         <th>System / object</th><th>Request / action</th><th>Reason / detail</th></tr></thead><tbody>{rows}</tbody></table>\
         <h2>Audit level of configuration changes</h2><form method=\"post\" action=\"/ui/audit\" class=\"row\">{csrf}{lvl}\
         <button type=\"submit\">Set</button></form><p class=\"hint\">Request audit levels are set per subaccount on the \
         <a href=\"/ui/subaccounts\">Subaccounts</a> page.</p>",
        kind = select("kind", &kinds, &q.kind),
        qv = esc(&q.q),
        from = esc(&q.from),
        to = esc(&q.to),
        query_e = esc(&query),
        csrf = csrf_field(&ctx),
        lvl = level_select("level", level),
    );
    ui.render(&ctx, "Audit log", &body)
}

async fn audit_level(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let level = get_field(&form, "level");
    let res = ui.api(&ctx, Method::PATCH, &format!("{CONF}/connector/auditLog"), Some(json!({"level": level}))).await;
    done(&ui, &ctx, "/ui/audit", res.map(|_| format!("Audit level of configuration changes set to {level}.")))
}

async fn audit_csv(State(ui): S, headers: HeaderMap, Query(q): Query<AuditQuery>) -> Response {
    let _ctx = session!(ui.ctx(&headers, false));
    let dir = audit_dir(&ui);
    let lines = tokio::task::spawn_blocking(move || audit_lines(&dir, &q)).await.unwrap_or_default();
    let mut out = format!("{}\n", crate::audit::CSV_HEADER);
    for l in lines.iter().rev() {
        out.push_str(l);
        out.push('\n');
    }
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"audit-log.csv\""),
            (header::CACHE_CONTROL, "no-store"),
        ],
        out,
    )
        .into_response()
}

// ---- monitoring

async fn monitoring(State(ui): S, headers: HeaderMap) -> Response {
    let ctx = session!(ui.ctx(&headers, false));
    let samples = ui.monitor.samples();
    let body = format!(
        "<p class=\"hint\">Per {} seconds over the last hour, newest on the right (the last point is the interval in progress). \
         Reload to update.</p><div class=\"charts\">{}{}{}{}</div>",
        charts::STEP.as_secs(),
        charts::svg("chart-requests", "Requests", "requests", &samples, |s| s.requests as f64),
        charts::svg("chart-bytes", "HTTP body bytes", "bytes", &samples, |s| s.bytes as f64),
        charts::svg("chart-denied", "Denied requests", "denials", &samples, |s| s.denied as f64),
        charts::svg("chart-latency", "Backend latency (mean per interval)", "ms", &samples, |s| s.latency_ms),
    );
    ui.render(&ctx, "Monitoring", &body)
}

// ---- backup / restore

async fn backup_page(State(ui): S, headers: HeaderMap) -> Response {
    let ctx = session!(ui.ctx(&headers, false));
    let body = format!(
        "<h2>Back up</h2><form method=\"post\" action=\"/ui/backup/download\" class=\"card narrow\">{csrf}{pw}\
         <button type=\"submit\">Download backup</button></form>\
         <p class=\"hint\">The backup holds the whole configuration with the connection keys, encrypted under this password.</p>\
         <h2>Restore</h2><form method=\"post\" action=\"/ui/backup/restore\" class=\"card narrow\" \
         data-confirm=\"Replace the whole configuration with the backup? Subaccounts reconnect.\">{csrf}\
         {data}{pw2}<button type=\"submit\" class=\"danger\">Restore</button></form>",
        csrf = csrf_field(&ctx),
        pw = field(
            "Password for the backup (at least 8 characters)",
            "<input type=\"password\" name=\"password\" minlength=\"8\" required autocomplete=\"new-password\">",
            None
        ),
        data = field(
            "Backup file (or its content in base64)",
            "<input type=\"file\" data-file-into=\"backup\" data-base64 class=\"js-only\">\
             <textarea name=\"backup\" rows=\"3\" required></textarea>",
            None
        ),
        pw2 = field(
            "Password of the backup",
            "<input type=\"password\" name=\"password\" required autocomplete=\"off\">",
            None
        ),
    );
    ui.render(&ctx, "Backup", &body)
}

async fn backup_download(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let password = form.get("password").cloned().unwrap_or_default();
    if password.chars().count() < 8 {
        return done(&ui, &ctx, "/ui/backup", Err("The backup password must have at least 8 characters.".into()));
    }
    match ui.api(&ctx, Method::POST, &format!("{CONF}/backup"), Some(json!({"password": password}))).await {
        Ok((h, bytes)) => {
            let mut r = (StatusCode::OK, bytes).into_response();
            for k in [header::CONTENT_TYPE, header::CONTENT_DISPOSITION] {
                if let Some(v) = h.get(&k) {
                    r.headers_mut().insert(k, v.clone());
                }
            }
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => done(&ui, &ctx, "/ui/backup", Err(e)),
    }
}

async fn restore(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = session!(ui.post_ctx(&headers, &form, false));
    let data: String = get_field(&form, "backup").chars().filter(|c| !c.is_whitespace()).collect();
    if data.is_empty() || base64::engine::general_purpose::STANDARD.decode(&data).is_err() {
        return done(&ui, &ctx, "/ui/backup", Err("Choose the backup file (or paste it in base64).".into()));
    }
    let password = form.get("password").cloned().unwrap_or_default();
    let res =
        ui.api(&ctx, Method::PUT, &format!("{CONF}/backup"), Some(json!({"password": password, "backup": data}))).await;
    done(&ui, &ctx, "/ui/backup", res.map(|_| "Configuration restored; subaccounts reconnect.".to_owned()))
}
