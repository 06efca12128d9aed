//! Service channel routes (SAP §4.8): `.../subaccounts/<region>/<subaccount>/channels[/<type>[/<id>[/state]]]`
//! and `/api/monitoring/connections/serviceChannels`.
//! Enabling a channel of a connected subaccount opens its local port (a port already taken is
//! 409 and nothing is stored); disabling or deleting it closes the port and its connections.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, put};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::store::{SccConfig, StoredSubaccount};
use super::{Admin, ApiError, Caller};
use crate::channel::{ChannelType, ServiceChannel};

type A = State<Arc<Admin>>;
type Result<T> = std::result::Result<T, ApiError>;

const SUB: &str = "/api/v1/configuration/subaccounts/{region}/{sub}";
/// Connections per channel at most; SAP's UI offers small numbers, this only bounds mistakes.
const MAX_CONNECTIONS: u32 = 10_000;

pub(super) fn routes() -> Router<Arc<Admin>> {
    Router::new()
        .route(&format!("{SUB}/channels"), get(list_all))
        .route(&format!("{SUB}/channels/{{kind}}"), get(list_kind).post(create))
        .route(&format!("{SUB}/channels/{{kind}}/{{id}}"), get(get_one).put(update).delete(remove))
        .route(&format!("{SUB}/channels/{{kind}}/{{id}}/state"), put(set_state))
        .route("/api/monitoring/connections/serviceChannels", get(monitoring))
}

/// SAP's monitoring of service channels: every channel of every subaccount with its state.
async fn monitoring(State(a): A) -> Json<Value> {
    let c = a.state.lock().await;
    let list: Vec<Value> = c
        .subaccounts
        .iter()
        .flat_map(|s| {
            let a = &a;
            s.service_channels.iter().map(move |ch| {
                let mut v = channel_json(a, s, ch);
                v["regionHost"] = json!(s.region_host);
                v["subaccount"] = json!(s.subaccount);
                v["locationID"] = json!(s.location_id);
                v
            })
        })
        .collect();
    Json(json!({ "serviceChannels": list }))
}

fn kind(s: &str) -> Result<ChannelType> {
    ChannelType::parse(s).ok_or_else(|| {
        ApiError::invalid(format!(
            "channel type {s:?} is not supported by Ferry; use K8S (HANA, VirtualMachine, ABAPCloud and ABAPCloudSNC \
             need SAP's cloud systems)"
        ))
    })
}

fn id_of(s: &str) -> Result<u32> {
    s.parse().map_err(|_| ApiError::not_found(format!("no service channel {s:?}")))
}

fn location(s: &StoredSubaccount, ch: &ServiceChannel) -> String {
    format!(
        "/api/v1/configuration/subaccounts/{}/{}/channels/{}/{}",
        s.region_host,
        s.subaccount,
        ch.kind.as_str(),
        ch.id
    )
}

fn channel_json(a: &Admin, s: &StoredSubaccount, ch: &ServiceChannel) -> Value {
    let state = a.instance.channel_state(&s.key(), ch.id);
    json!({
        "id": ch.id,
        "type": ch.kind.as_str(),
        "k8sService": ch.k8s_service,
        "port": ch.port,
        "enabled": ch.enabled,
        "connections": ch.connections,
        "comment": ch.comment,
        "state": {
            "opened": state.is_some(),
            "openedConnections": state.map(|s| s.connections).unwrap_or(0),
        },
        "_links": {"self": {"href": location(s, ch)}},
    })
}

fn sub_of<'a>(c: &'a SccConfig, region: &str, sub: &str) -> Result<&'a StoredSubaccount> {
    c.subaccount(region, sub).ok_or_else(|| ApiError::not_found(format!("no subaccount {sub} at region host {region}")))
}

async fn list_all(State(a): A, Path((region, sub)): Path<(String, String)>) -> Result<Json<Value>> {
    let c = a.state.lock().await;
    let s = sub_of(&c, &region, &sub)?;
    Ok(Json(Value::Array(s.service_channels.iter().map(|ch| channel_json(&a, s, ch)).collect())))
}

async fn list_kind(State(a): A, Path((region, sub, k)): Path<(String, String, String)>) -> Result<Json<Value>> {
    let k = kind(&k)?;
    let c = a.state.lock().await;
    let s = sub_of(&c, &region, &sub)?;
    let list = s.service_channels.iter().filter(|ch| ch.kind == k).map(|ch| channel_json(&a, s, ch)).collect();
    Ok(Json(Value::Array(list)))
}

async fn get_one(
    State(a): A,
    Path((region, sub, k, id)): Path<(String, String, String, String)>,
) -> Result<Json<Value>> {
    let (k, id) = (kind(&k)?, id_of(&id)?);
    let c = a.state.lock().await;
    let s = sub_of(&c, &region, &sub)?;
    let ch = s.service_channels.iter().find(|ch| ch.id == id && ch.kind == k).ok_or_else(|| not_found(id))?;
    Ok(Json(channel_json(&a, s, ch)))
}

fn not_found(id: u32) -> ApiError {
    ApiError::not_found(format!("no service channel {id}"))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ChannelBody {
    k8s_service: Option<String>,
    port: Option<u16>,
    enabled: Option<bool>,
    connections: Option<u32>,
    comment: Option<String>,
    /// Read-only fields a client may send back from a GET.
    #[serde(rename = "id")]
    _id: Option<Value>,
    #[serde(rename = "type")]
    _type: Option<Value>,
    #[serde(rename = "state")]
    _state: Option<Value>,
    #[serde(rename = "_links")]
    _links: Option<Value>,
}

fn check(c: &SccConfig, ch: &ServiceChannel) -> Result<()> {
    let id_ok = !ch.k8s_service.is_empty()
        && ch.k8s_service.len() <= 64
        && ch.k8s_service.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !id_ok {
        return Err(ApiError::invalid(
            "k8sService must be the service id registered with the proxy: 1 to 64 letters, digits, '.', '-' or '_'",
        ));
    }
    if ch.port == 0 {
        return Err(ApiError::invalid("port must be between 1 and 65535"));
    }
    if ch.connections == 0 || ch.connections > MAX_CONNECTIONS {
        return Err(ApiError::invalid(format!("connections must be between 1 and {MAX_CONNECTIONS}")));
    }
    if ch.comment.len() > 1024 {
        return Err(ApiError::invalid("comment is longer than 1024 characters"));
    }
    // One port serves one channel of the whole instance, whichever subaccount it belongs to.
    let clash = c
        .subaccounts
        .iter()
        .flat_map(|s| s.service_channels.iter().map(move |x| (s, x)))
        .find(|(_, x)| x.port == ch.port && x.id != ch.id);
    if let Some((s, x)) = clash {
        return Err(ApiError::conflict(format!(
            "port {} is used by service channel {} of subaccount {}",
            ch.port, x.id, s.subaccount
        )));
    }
    Ok(())
}

impl Admin {
    /// Stores `ch` (new or changed) for the subaccount, opening or closing its port on a running
    /// connection first: a port that cannot be opened is 409 and nothing changes.
    async fn store_channel(&self, region: &str, sub: &str, ch: ServiceChannel) -> Result<(StoredSubaccount, bool)> {
        let mut guard = self.state.lock().await;
        let mut next = guard.clone();
        check(&next, &ch)?;
        let s = next.subaccount_mut(region, sub).ok_or_else(|| sub_missing(region, sub))?;
        let key = s.key();
        let created = match s.service_channels.iter_mut().find(|x| x.id == ch.id) {
            Some(x) => {
                *x = ch.clone();
                false
            }
            None => {
                s.service_channels.push(ch.clone());
                true
            }
        };
        let s = s.clone();
        if ch.enabled {
            self.instance
                .open_channel(&key, &ch)
                .await
                .map_err(|e| ApiError::conflict(format!("service channel {} cannot open its port: {e}", ch.id)))?;
        } else {
            self.instance.close_channel(&key, ch.id).await;
        }
        self.persist(&next).await?;
        *guard = next;
        Ok((s, created))
    }
}

fn sub_missing(region: &str, sub: &str) -> ApiError {
    ApiError::not_found(format!("no subaccount {sub} at region host {region}"))
}

async fn create(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub, k)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Response> {
    let k = kind(&k)?;
    let b: ChannelBody = super::api::parse(&body)?;
    let id = {
        let c = a.state.lock().await;
        let s = sub_of(&c, &region, &sub)?;
        s.service_channels.iter().map(|ch| ch.id).max().unwrap_or(0) + 1
    };
    let ch = ServiceChannel {
        id,
        kind: k,
        k8s_service: b.k8s_service.ok_or_else(|| ApiError::invalid("k8sService is required"))?,
        port: b.port.ok_or_else(|| ApiError::invalid("port is required"))?,
        enabled: b.enabled.unwrap_or(true),
        connections: b.connections.unwrap_or(1),
        comment: b.comment.unwrap_or_default(),
    };
    let (s, _) = a.store_channel(&region, &sub, ch.clone()).await?;
    let object = format!("{}/{} port {} → {}", k.as_str(), ch.id, ch.port, ch.k8s_service);
    a.record(&u.0, "ServiceChannelConfiguration", "created", &sub, &object).await;
    Ok(super::api::created(location(&s, &ch), channel_json(&a, &s, &ch)))
}

async fn existing(a: &Admin, region: &str, sub: &str, k: &str, id: &str) -> Result<ServiceChannel> {
    let (k, id) = (kind(k)?, id_of(id)?);
    let c = a.state.lock().await;
    let s = sub_of(&c, region, sub)?;
    s.service_channels.iter().find(|ch| ch.id == id && ch.kind == k).cloned().ok_or_else(|| not_found(id))
}

async fn update(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub, k, id)): Path<(String, String, String, String)>,
    body: Bytes,
) -> Result<Json<Value>> {
    let b: ChannelBody = super::api::parse(&body)?;
    let mut ch = existing(&a, &region, &sub, &k, &id).await?;
    if let Some(v) = b.k8s_service {
        ch.k8s_service = v;
    }
    if let Some(v) = b.port {
        ch.port = v;
    }
    if let Some(v) = b.enabled {
        ch.enabled = v;
    }
    if let Some(v) = b.connections {
        ch.connections = v;
    }
    if let Some(v) = b.comment {
        ch.comment = v;
    }
    let (s, _) = a.store_channel(&region, &sub, ch.clone()).await?;
    let object = format!("{}/{} port {} → {}", ch.kind.as_str(), ch.id, ch.port, ch.k8s_service);
    a.record(&u.0, "ServiceChannelConfiguration", "changed", &sub, &object).await;
    Ok(Json(channel_json(&a, &s, &ch)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateBody {
    enabled: bool,
}

async fn set_state(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub, k, id)): Path<(String, String, String, String)>,
    body: Bytes,
) -> Result<Json<Value>> {
    let b: StateBody = super::api::parse(&body)?;
    let mut ch = existing(&a, &region, &sub, &k, &id).await?;
    ch.enabled = b.enabled;
    let (s, _) = a.store_channel(&region, &sub, ch.clone()).await?;
    let action = if b.enabled { "enabled" } else { "disabled" };
    a.record(&u.0, "ServiceChannelConfiguration", action, &sub, &format!("{}/{}", ch.kind.as_str(), ch.id)).await;
    Ok(Json(channel_json(&a, &s, &ch)))
}

async fn remove(
    State(a): A,
    Extension(u): Extension<Caller>,
    Path((region, sub, k, id)): Path<(String, String, String, String)>,
) -> Result<Response> {
    let ch = existing(&a, &region, &sub, &k, &id).await?;
    {
        let mut guard = a.state.lock().await;
        let mut next = guard.clone();
        let s = next.subaccount_mut(&region, &sub).ok_or_else(|| sub_missing(&region, &sub))?;
        s.service_channels.retain(|x| x.id != ch.id);
        let key = s.key();
        a.instance.close_channel(&key, ch.id).await;
        a.persist(&next).await?;
        *guard = next;
    }
    a.record(&u.0, "ServiceChannelConfiguration", "deleted", &sub, &format!("{}/{}", ch.kind.as_str(), ch.id)).await;
    Ok(axum::response::IntoResponse::into_response(StatusCode::NO_CONTENT))
}
