//! Labels (SPEC §1.9): non-sensitive key → values metadata on destinations, fragments and
//! certificates; `GET`/`PUT`/`PATCH .../{name}/labels`. At most 10 labels per object and 10
//! values per label.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use serde::{Deserialize, Serialize};

use crate::DestinationService;
use crate::api::{ApiError, Caller, Collection};
use crate::store::{Kind, RowKey, Scope};

const MAX_LABELS: usize = 10;
const MAX_VALUES: usize = 10;
const MAX_TEXT: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Label {
    key: String,
    #[serde(default)]
    values: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    action: String,
    labels: Vec<Label>,
}

type Svc = State<Arc<DestinationService>>;
type Name = Result<Path<String>, PathRejection>;
type Body = Result<Bytes, BytesRejection>;

pub(crate) fn route(collection: Collection, kind: Kind) -> MethodRouter<Arc<DestinationService>> {
    get(move |s: Svc, c: Caller, n: Name| read(s, c, collection, kind, n))
        .put(move |s: Svc, c: Caller, n: Name, b: Body| write(s, c, collection, kind, n, b, false))
        .patch(move |s: Svc, c: Caller, n: Name, b: Body| write(s, c, collection, kind, n, b, true))
}

/// The object's row (which must exist) and its label row.
async fn rows(
    s: &DestinationService,
    caller: &Caller,
    collection: Collection,
    kind: Kind,
    name: Name,
) -> Result<RowKey, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "Object with the specified name was not found");
    let Ok(Path(name)) = name else { return Err(not_found()) };
    let key = caller.scope(collection)?.of(kind).row(&name);
    if !s.exists(&key).await? {
        return Err(not_found());
    }
    Scope::labels_of(&key).ok_or_else(not_found)
}

/// The labels of every object in `scope` (a collection of destinations, fragments or
/// certificates), by object name, as `(key, values)`: for `$filter=Label[...] HAS (...)`.
pub(crate) async fn of_collection(
    s: &DestinationService,
    scope: &Scope,
) -> Result<HashMap<String, Vec<(String, Vec<String>)>>, crate::Error> {
    let Some(probe) = Scope::labels_of(&scope.row("")) else { return Ok(HashMap::new()) };
    // Label rows are named `<tag>/<object name>`; the probe's name is the tag and its slash.
    let prefix = probe.name;
    let rows = s.list_stored::<Vec<Label>>(&probe.scope).await?;
    Ok(rows
        .into_iter()
        .filter_map(|l| {
            let name = l.name.strip_prefix(prefix.as_str())?.to_owned();
            Some((name, l.stored.destination.into_iter().map(|label| (label.key, label.values)).collect()))
        })
        .collect())
}

async fn read(
    State(s): Svc,
    caller: Caller,
    collection: Collection,
    kind: Kind,
    name: Name,
) -> Result<Response, ApiError> {
    let labels_key = rows(&s, &caller, collection, kind, name).await?;
    let labels: Vec<Label> = s.load(&labels_key).await?.map(|st| st.destination).unwrap_or_default();
    Ok(Json(labels).into_response())
}

async fn write(
    State(s): Svc,
    caller: Caller,
    collection: Collection,
    kind: Kind,
    name: Name,
    body: Body,
    patch: bool,
) -> Result<Response, ApiError> {
    let labels_key = rows(&s, &caller, collection, kind, name).await?;
    let bytes = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    if patch {
        let p: Patch = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request(format!(
                "Request body must be {{\"action\": \"ADD\"|\"DELETE\", \"labels\": [{{\"key\", \"values\"}}]}}: {e}"
            ))
        })?;
        if p.action != "ADD" && p.action != "DELETE" {
            return Err(ApiError::bad_request(format!("action '{}' is not known; use ADD or DELETE", p.action)));
        }
        // A compare-and-swap loop: concurrent PATCHes of one object's labels all take effect.
        // The result may be an empty list, which reads the same as no row.
        return s
            .modify(&labels_key, |current: Option<Vec<Label>>| {
                let labels = apply(current.unwrap_or_default(), &p);
                validate(&labels)?;
                Ok::<_, ApiError>(labels)
            })
            .await
            .map(|labels| Json(labels).into_response());
    }
    let labels: Vec<Label> = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(format!("Request body must be an array of {{\"key\", \"values\": [...]}}: {e}"))
    })?;
    validate(&labels)?;
    if labels.is_empty() {
        s.remove(&labels_key).await?;
    } else {
        s.put(&labels_key, &labels).await?;
    }
    Ok(Json(labels).into_response())
}

/// `current` with an ADD or DELETE patch applied.
fn apply(mut current: Vec<Label>, p: &Patch) -> Vec<Label> {
    if p.action == "ADD" {
        for label in &p.labels {
            match current.iter_mut().find(|l| l.key == label.key) {
                Some(l) => {
                    let new: Vec<String> = label.values.iter().filter(|v| !l.values.contains(v)).cloned().collect();
                    l.values.extend(new);
                }
                None => current.push(label.clone()),
            }
        }
    } else {
        for label in &p.labels {
            if label.values.is_empty() {
                current.retain(|l| l.key != label.key);
            } else if let Some(l) = current.iter_mut().find(|l| l.key == label.key) {
                l.values.retain(|v| !label.values.contains(v));
            }
        }
        current.retain(|l| !l.values.is_empty());
    }
    current
}

fn validate(labels: &[Label]) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(ApiError::bad_request(format!(
            "{} labels given; an object can have at most {MAX_LABELS}",
            labels.len()
        )));
    }
    for (i, l) in labels.iter().enumerate() {
        if l.key.trim().is_empty() || l.key.len() > MAX_TEXT {
            return Err(ApiError::bad_request(format!("label keys must be 1 to {MAX_TEXT} characters")));
        }
        if labels[..i].iter().any(|o| o.key == l.key) {
            return Err(ApiError::bad_request(format!("label '{}' is given more than once", l.key)));
        }
        if l.values.is_empty() || l.values.len() > MAX_VALUES {
            return Err(ApiError::bad_request(format!(
                "label '{}' has {} values; give 1 to {MAX_VALUES}",
                l.key,
                l.values.len()
            )));
        }
        if l.values.iter().any(|v| v.len() > MAX_TEXT) {
            return Err(ApiError::bad_request(format!(
                "values of label '{}' are limited to {MAX_TEXT} characters",
                l.key
            )));
        }
    }
    Ok(())
}
