//! The high availability page: state of the pair, the master's settings and switch-over, the
//! shadow's settings (SAP's check interval, takeover delay and timeouts), connecting a shadow to
//! its master, and the role of an instance that is not paired. Every change goes through the HA
//! API's handlers, so it is validated and audited as there.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{Ctx, Form, Ui, csrf_field, esc, field, redirect, text_input};

type S = State<Arc<Ui>>;
type F = axum::Form<Form>;

const HA: &str = "/api/v1/configuration/connector/ha";
const ROLE: &str = "/api/v1/configuration/connector/haRole";
const PAGE: &str = "/ui/ha";

/// The shadow settings the page edits: (API field, label, what a valid value is).
const SHADOW_FIELDS: [(&str, &str, &str); 4] = [
    ("checkIntervalInSeconds", "Check interval (seconds)", "a number of seconds from 0.05 to 3600"),
    ("takeoverDelayInSeconds", "Takeover delay (seconds)", "a number of seconds from 0 to 86400"),
    ("connectTimeoutInMillis", "Connect timeout (milliseconds)", "a whole number of milliseconds, at least 1"),
    ("requestTimeoutInMillis", "Request timeout (milliseconds)", "a whole number of milliseconds, at least 1"),
];

pub(super) fn routes() -> Router<Arc<Ui>> {
    Router::new()
        .route(PAGE, get(page))
        .route("/ui/ha/master", post(save_master))
        .route("/ui/ha/shadow", post(save_shadow))
        .route("/ui/ha/switch", post(switch))
        .route("/ui/ha/connect", post(connect))
        .route("/ui/ha/disconnect", post(disconnect))
        .route("/ui/ha/role", post(set_role))
}

fn get_field<'a>(form: &'a Form, k: &str) -> &'a str {
    form.get(k).map(|s| s.trim()).unwrap_or_default()
}

fn done(ui: &Ui, ctx: &Ctx, result: Result<String, String>) -> Response {
    match result {
        Ok(m) => ui.set_flash(ctx, true, m),
        Err(m) => ui.set_flash(ctx, false, m),
    }
    redirect(PAGE)
}

fn button(ctx: &Ctx, action: &str, hidden: &str, label: &str, confirm: &str, class: &str) -> String {
    format!(
        "<form method=\"post\" action=\"{action}\" class=\"inline\" data-confirm=\"{}\">{}{hidden}\
         <button type=\"submit\" class=\"{class}\">{}</button></form>",
        esc(confirm),
        csrf_field(ctx),
        esc(label)
    )
}

async fn page(State(ui): S, headers: HeaderMap) -> Response {
    let ctx = match ui.ctx(&headers, false).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    render(&ui, &ctx, None, &HashMap::new(), StatusCode::OK).await
}

/// Renders the page; `shadow_form` re-shows rejected shadow settings with their `errors`.
async fn render(
    ui: &Ui,
    ctx: &Ctx,
    shadow_form: Option<&Form>,
    errors: &HashMap<&str, String>,
    status: StatusCode,
) -> Response {
    let master_cfg = ui.api_json(ctx, &format!("{HA}/master/config")).await.unwrap_or_default();
    let master_state = ui.api_json(ctx, &format!("{HA}/master/state")).await.unwrap_or_default();
    let shadow_cfg = ui.api_json(ctx, &format!("{HA}/shadow/config")).await.unwrap_or_default();
    let shadow_state = ui.api_json(ctx, &format!("{HA}/shadow/state")).await.unwrap_or_default();
    let s = |v: &Value, k: &str| match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let role = s(&master_state, "role");
    let is_master = role != "shadow";
    let ha_on = master_cfg["haEnabled"].as_bool().unwrap_or(false);
    let state = if is_master { s(&master_state, "state") } else { s(&shadow_state, "state") };
    let peer = if is_master { s(&master_state, "shadowHost") } else { s(&shadow_state, "masterHost") };
    let mut body = format!(
        "<dl class=\"facts\"><dt>High availability</dt><dd id=\"ha-enabled\">{}</dd>\
         <dt>Role of this instance</dt><dd id=\"ha-role\">{}</dd><dt>State</dt><dd id=\"ha-state\">{}</dd>\
         <dt>Epoch</dt><dd>{}</dd><dt>{}</dt><dd>{}</dd></dl>",
        if ha_on { "enabled" } else { "not enabled" },
        esc(&role),
        esc(&state),
        esc(&s(&master_state, "epoch")),
        if is_master { "Shadow" } else { "Master" },
        if peer.is_empty() { "—".to_owned() } else { esc(&peer) },
    );

    if is_master {
        let checked = if ha_on { " checked" } else { "" };
        body.push_str(&format!(
            "<h2>Master</h2><form method=\"post\" action=\"/ui/ha/master\" class=\"card narrow\" id=\"ha-master\">{csrf}\
             <label class=\"field\"><span>High availability enabled (a shadow may connect)</span>\
             <input type=\"checkbox\" name=\"haEnabled\" value=\"true\"{checked}></label>{host}\
             <button type=\"submit\">Save</button></form>",
            csrf = csrf_field(ctx),
            host = field(
                "Allowed shadow host (empty: any)",
                &text_input("allowedShadowHost", &s(&master_cfg, "allowedShadowHost"), "autocomplete=\"off\""),
                None
            ),
        ));
        body.push_str(&format!(
            "<h2>Switch roles</h2><p class=\"hint\">The shadow becomes master and this instance its shadow; its tunnels \
             close first. A forced switch does not wait for the shadow to be in sync.</p><p>{}{}{}</p>",
            button(ctx, "/ui/ha/switch", "", "Switch roles", "Make the shadow the master?", ""),
            button(
                ctx,
                "/ui/ha/switch",
                "<input type=\"hidden\" name=\"force\" value=\"true\">",
                "Force switch",
                "Switch even though the shadow may miss recent changes?",
                "danger"
            ),
            if peer.is_empty() || state == "ALONE" {
                button(
                    ctx,
                    "/ui/ha/role",
                    "<input type=\"hidden\" name=\"role\" value=\"shadow\">",
                    "Make this instance a shadow",
                    "Make this instance a shadow? It stops serving its subaccounts.",
                    "danger",
                )
            } else {
                String::new()
            },
        ));
    } else {
        body.push_str(&format!(
            "<h2>Connect to the master</h2><form method=\"post\" action=\"/ui/ha/connect\" class=\"card narrow\" id=\"ha-connect\">{}{}{}{}\
             <button type=\"submit\">Connect</button></form><p>{}{}</p>",
            csrf_field(ctx),
            field(
                "Master's administrator",
                &text_input("user", "Administrator", "required autocomplete=\"off\""),
                None
            ),
            field(
                "Master's administrator password",
                "<input type=\"password\" name=\"password\" required autocomplete=\"off\">",
                None
            ),
            field(
                "CA certificate of the master's UI (PEM; empty: trust on first use)",
                "<textarea name=\"caCertificate\" rows=\"3\"></textarea>",
                None
            ),
            button(ctx, "/ui/ha/disconnect", "", "Disconnect", "Stop syncing and forget the master?", "danger"),
            button(
                ctx,
                "/ui/ha/role",
                "<input type=\"hidden\" name=\"role\" value=\"master\">",
                "Make this instance a master",
                "Make this instance a master? Only do so when it is not paired.",
                "danger",
            ),
        ));
    }

    // The shadow's settings live on each instance (they are not synced): editable on both
    // roles, so an instance is ready before it becomes a shadow.
    let value = |k: &str| match shadow_form {
        Some(f) => get_field(f, k).to_owned(),
        // A port of 0 means "not set yet".
        None => Some(s(&shadow_cfg, k)).filter(|v| v != "0").unwrap_or_default(),
    };
    let mut fields = String::new();
    for (k, label, _) in [
        ("masterHost", "Master host", ""),
        ("masterPort", "Master port", ""),
        ("ownHost", "Host the master reaches this instance on", ""),
    ] {
        fields.push_str(&field(label, &text_input(k, &value(k), "autocomplete=\"off\""), errors.get(k)));
    }
    for (k, label, _) in SHADOW_FIELDS {
        fields.push_str(&field(label, &text_input(k, &value(k), "inputmode=\"decimal\" required"), errors.get(k)));
    }
    body.push_str(&format!(
        "<h2>Shadow settings</h2><p class=\"hint\">Used while this instance is the shadow: it checks the master every \
         check interval and takes over after the takeover delay without an answer.</p>\
         <form method=\"post\" action=\"/ui/ha/shadow\" class=\"card narrow\" id=\"ha-shadow\">{}{fields}\
         <button type=\"submit\">Save</button></form>",
        csrf_field(ctx)
    ));
    let mut r = ui.render(ctx, "High availability", &body);
    *r.status_mut() = status;
    r
}

async fn save_master(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = match ui.post_ctx(&headers, &form, false).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let body = json!({
        "haEnabled": get_field(&form, "haEnabled") == "true",
        "allowedShadowHost": get_field(&form, "allowedShadowHost"),
    });
    let res = ui.api(&ctx, Method::PUT, &format!("{HA}/master/config"), Some(body)).await;
    done(&ui, &ctx, res.map(|_| "Master settings saved.".to_owned()))
}

async fn save_shadow(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = match ui.post_ctx(&headers, &form, false).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut errors = HashMap::new();
    let mut body = serde_json::Map::new();
    for (k, _, valid) in SHADOW_FIELDS {
        let v = get_field(&form, k);
        let parsed = if k.ends_with("Millis") {
            v.parse::<u64>().ok().filter(|n| *n >= 1).map(Value::from)
        } else {
            v.parse::<f64>().ok().filter(|n| n.is_finite()).map(Value::from)
        };
        match parsed {
            Some(n) => {
                body.insert(k.into(), n);
            }
            None => {
                errors.insert(k, format!("Enter {valid}."));
            }
        }
    }
    let port = get_field(&form, "masterPort");
    match port.parse::<u16>() {
        Ok(p) => {
            body.insert("masterPort".into(), p.into());
        }
        Err(_) if port.is_empty() => {}
        Err(_) => {
            errors.insert("masterPort", "Enter a port number from 1 to 65535.".into());
        }
    }
    for k in ["masterHost", "ownHost"] {
        body.insert(k.into(), get_field(&form, k).into());
    }
    if errors.is_empty() {
        match ui.api(&ctx, Method::PUT, &format!("{HA}/shadow/config"), Some(Value::Object(body))).await {
            Ok(_) => return done(&ui, &ctx, Ok("Shadow settings saved.".into())),
            // The API names the field in its message; show it next to the first one.
            Err(e) => {
                let k = SHADOW_FIELDS.iter().map(|f| f.0).find(|k| e.contains(k)).unwrap_or(SHADOW_FIELDS[0].0);
                errors.insert(k, e);
            }
        }
    }
    render(&ui, &ctx, Some(&form), &errors, StatusCode::BAD_REQUEST).await
}

async fn switch(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = match ui.post_ctx(&headers, &form, false).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let op = if get_field(&form, "force") == "true" { "FORCE_SWITCH" } else { "SWITCH" };
    let res = ui.api(&ctx, Method::POST, &format!("{HA}/master/state"), Some(json!({"op": op}))).await;
    done(&ui, &ctx, res.map(|_| "Roles switched: this instance is now the shadow.".to_owned()))
}

async fn connect(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = match ui.post_ctx(&headers, &form, false).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let (user, password) = (get_field(&form, "user"), form.get("password").map(String::as_str).unwrap_or_default());
    if user.is_empty() || password.is_empty() {
        return done(&ui, &ctx, Err("Enter the master's administrator and password.".into()));
    }
    let mut body = json!({"op": "CONNECT", "user": user, "password": password});
    let ca = get_field(&form, "caCertificate");
    if !ca.is_empty() {
        body["caCertificate"] = ca.into();
    }
    let res = ui.api(&ctx, Method::POST, &format!("{HA}/shadow/state"), Some(body)).await;
    done(&ui, &ctx, res.map(|_| "Connected to the master; the configuration syncs now.".to_owned()))
}

async fn disconnect(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = match ui.post_ctx(&headers, &form, false).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let res = ui.api(&ctx, Method::POST, &format!("{HA}/shadow/state"), Some(json!({"op": "DISCONNECT"}))).await;
    done(&ui, &ctx, res.map(|_| "Disconnected from the master.".to_owned()))
}

async fn set_role(State(ui): S, headers: HeaderMap, axum::Form(form): F) -> Response {
    let ctx = match ui.post_ctx(&headers, &form, false).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let role = get_field(&form, "role");
    if role != "master" && role != "shadow" {
        return done(&ui, &ctx, Err("Choose master or shadow.".into()));
    }
    let res = ui.api(&ctx, Method::PUT, ROLE, Some(json!(role))).await;
    done(&ui, &ctx, res.map(|_| format!("This instance is now a {role}.")))
}
