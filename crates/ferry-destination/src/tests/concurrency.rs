//! Concurrent writers lose no write: conditional updates (`If-Match`) are compare-and-swaps,
//! and label PATCHes retry on the newer value. Several service replicas on one database see
//! each other's writes at once.

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use ferry_core::Secret;
use serde_json::{Value, json};
use tokio::sync::Barrier;

use super::{Env, V1, config, persistent_database};
use crate::Error;

const WRITERS: usize = 8;

fn item(name: &str) -> String {
    format!("{V1}/subaccountDestinations/{name}")
}

/// Each writer reads the destination, adds its own property and PUTs it back with the ETag it
/// read, retrying on 412 with a fresh read.
async fn add_property(env: &Env, t: &str, i: usize) -> usize {
    for attempt in 0..1000 {
        let r = env.call(Method::GET, &item("race"), Some(t), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let etag = r.headers["etag"].to_str().unwrap().to_owned();
        let mut dest = r.json;
        dest[format!("prop{i}")] = json!(format!("value-{i}"));
        let body = dest.to_string();
        let r = env
            .call_raw(
                Method::PUT,
                &format!("{V1}/subaccountDestinations"),
                Some(t),
                Some(&body),
                &[("if-match", &etag)],
            )
            .await;
        match r.status {
            StatusCode::OK => return attempt,
            StatusCode::PRECONDITION_FAILED => continue,
            other => panic!("writer {i}: unexpected {other}: {}", r.text),
        }
    }
    panic!("writer {i} never got its update in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_updates_of_different_properties_all_land() {
    let env = Arc::new(Env::new().await);
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", json!({"Name": "race", "Type": "HTTP", "URL": "https://race.example"})).await;

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..WRITERS {
        let (env, t) = (env.clone(), t.clone());
        tasks.spawn(async move { add_property(&env, &t, i).await });
    }
    let mut retries = 0;
    while let Some(r) = tasks.join_next().await {
        retries += r.unwrap();
    }
    let r = env.call(Method::GET, &item("race"), Some(&t), None).await;
    for i in 0..WRITERS {
        assert_eq!(r.json[format!("prop{i}")], json!(format!("value-{i}")), "write {i} lost: {}", r.json);
    }
    // Not a check of the race's outcome, only that the log shows whether one happened.
    eprintln!("{retries} If-Match conflicts were retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_writers_that_read_the_same_version_exactly_one_wins() {
    let env = Arc::new(Env::new().await);
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", json!({"Name": "race", "Type": "HTTP", "URL": "https://race.example"})).await;
    let r = env.call(Method::GET, &item("race"), Some(&t), None).await;
    let (etag, read) = (r.headers["etag"].to_str().unwrap().to_owned(), r.json);

    // All writers hold the same ETag, then write at once; only a compare-and-swap in the store
    // lets exactly one through.
    let barrier = Arc::new(Barrier::new(WRITERS));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..WRITERS {
        let (env, t, etag, barrier) = (env.clone(), t.clone(), etag.clone(), barrier.clone());
        let mut dest = read.clone();
        dest[format!("prop{i}")] = json!(format!("value-{i}"));
        tasks.spawn(async move {
            barrier.wait().await;
            let body = dest.to_string();
            let r = env
                .call_raw(
                    Method::PUT,
                    &format!("{V1}/subaccountDestinations"),
                    Some(&t),
                    Some(&body),
                    &[("if-match", &etag)],
                )
                .await;
            (i, r.status, r.text)
        });
    }
    let mut winners = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (i, status, text) = r.unwrap();
        match status {
            StatusCode::OK => winners.push(i),
            StatusCode::PRECONDITION_FAILED => assert!(text.contains("read it again"), "{text}"),
            other => panic!("writer {i}: unexpected {other}: {text}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let r = env.call(Method::GET, &item("race"), Some(&t), None).await;
    for i in 0..WRITERS {
        let expected = if winners.contains(&i) { json!(format!("value-{i}")) } else { Value::Null };
        assert_eq!(r.json[format!("prop{i}")], expected, "{}", r.json);
    }
}

#[tokio::test]
async fn if_match_on_put_is_checked() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", json!({"Name": "c", "Type": "HTTP", "URL": "https://x.example"})).await;
    let put = |etag: &'static str, body: Value| {
        let (env, t) = (&env, &t);
        async move {
            let body = body.to_string();
            env.call_raw(
                Method::PUT,
                &format!("{V1}/subaccountDestinations"),
                Some(t),
                Some(&body),
                &[("if-match", etag)],
            )
            .await
        }
    };
    let r = put("\"nope\"", json!({"Name": "c", "Type": "HTTP", "URL": "https://x.example", "x": "1"})).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{}", r.text);
    let r = put("*", json!({"Name": "c", "Type": "HTTP", "URL": "https://x.example", "x": "2"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = put("*", json!({"Name": "missing", "Type": "HTTP", "URL": "https://x.example"})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    let r = put("*", json!([{"Name": "c", "Type": "HTTP"}])).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(env.call(Method::GET, &item("c"), Some(&t), None).await.json["x"], "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_label_patches_all_land() {
    let env = Arc::new(Env::new().await);
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", json!({"Name": "l", "Type": "HTTP", "URL": "https://x.example"})).await;
    let url = format!("{V1}/subaccountDestinations/l/labels");
    let barrier = Arc::new(Barrier::new(WRITERS));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..WRITERS {
        let (env, t, url, barrier) = (env.clone(), t.clone(), url.clone(), barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            let patch = json!({"action": "ADD", "labels": [{"key": format!("k{i}"), "values": [format!("v{i}")]}]});
            let r = env.call(Method::PATCH, &url, Some(&t), Some(patch)).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let r = env.call(Method::GET, &url, Some(&t), None).await;
    let labels = r.json.as_array().unwrap();
    assert_eq!(labels.len(), WRITERS, "{}", r.json);
    for i in 0..WRITERS {
        assert!(labels.contains(&json!({"key": format!("k{i}"), "values": [format!("v{i}")]})), "k{i}: {}", r.json);
    }
}

#[tokio::test]
async fn replicas_on_one_database_see_each_others_writes_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let database = persistent_database(dir.path());
    let a = Env::with_config(config(database.clone(), [9; 32])).await;
    let b = Env::with_config(config(database, [9; 32])).await;
    let t = a.token("zone-1", "client-1");
    let tb = b.token("zone-1", "client-1");

    a.create(&t, "subaccount", json!({"Name": "shared", "Type": "HTTP", "URL": "https://one.example"})).await;
    let r = b.call(Method::GET, &item("shared"), Some(&tb), None).await;
    assert_eq!((r.status, &r.json["URL"]), (StatusCode::OK, &json!("https://one.example")), "{}", r.text);
    let etag_read_on_a = a.call(Method::GET, &item("shared"), Some(&t), None).await.headers["etag"].clone();

    let body = json!({"Name": "shared", "Type": "HTTP", "URL": "https://two.example"}).to_string();
    let r = b
        .call_raw(
            Method::PUT,
            &format!("{V1}/subaccountDestinations"),
            Some(&tb),
            Some(&body),
            &[("if-match", etag_read_on_a.to_str().unwrap())],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = a.call(Method::GET, &item("shared"), Some(&t), None).await;
    assert_eq!(r.json["URL"], "https://two.example");
    assert_ne!(r.headers["etag"], etag_read_on_a);

    // A's old ETag is stale on either replica.
    let body = json!({"Name": "shared", "Type": "HTTP", "URL": "https://three.example"}).to_string();
    let r = a
        .call_raw(
            Method::PUT,
            &format!("{V1}/subaccountDestinations"),
            Some(&t),
            Some(&body),
            &[("if-match", etag_read_on_a.to_str().unwrap())],
        )
        .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{}", r.text);
    let r = b.call(Method::DELETE, &item("shared"), Some(&tb), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(a.call(Method::GET, &item("shared"), Some(&t), None).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_rotated_key_opens_old_rows_and_seals_them_again() {
    const OLD: [u8; 32] = [11; 32];
    const NEW: [u8; 32] = [12; 32];
    let dir = tempfile::tempdir().unwrap();
    let database = persistent_database(dir.path());
    let env = Env::with_config(config(database.clone(), OLD)).await;
    let t = env.token("zone-1", "client-1");
    let dest = json!({"Name": "r", "Type": "HTTP", "URL": "https://x.example", "Authentication": "BasicAuthentication", "User": "u",
        "Password": "rotate-me"});
    env.create(&t, "subaccount", dest.clone()).await;
    let r = env
        .call(
            Method::PUT,
            &format!("{item}/labels", item = item("r")),
            Some(&t),
            Some(json!([
                {"key": "env", "values": ["prod"]}
            ])),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = env
        .call(
            Method::POST,
            &format!("{V1}/subaccountDestinationFragments"),
            Some(&t),
            Some(json!({
                "FragmentName": "f", "clientSecret": "frag-secret"
            })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    drop(env);

    // The new key alone cannot read what the old one wrote, and says so at start-up.
    let err = Env::try_with_config(config(database.clone(), NEW)).await.err().unwrap();
    assert!(matches!(err, Error::WrongMasterKey), "{err:?}");

    // New key with the old one as previous: everything reads, and is sealed again.
    let env = Env::try_with_keys(config(database.clone(), NEW), &[Secret::new(OLD)]).await.unwrap();
    let t = env.token("zone-1", "client-1");
    assert_eq!(env.call(Method::GET, &item("r"), Some(&t), None).await.json, dest);
    let again = env.service.reseal().await.unwrap();
    assert_eq!((again.resealed, again.left), (0, 0), "start-up already re-sealed every row");
    drop(env);

    // So the old key can go.
    let env = Env::with_config(config(database.clone(), NEW)).await;
    let t = env.token("zone-1", "client-1");
    assert_eq!(env.call(Method::GET, &item("r"), Some(&t), None).await.json, dest);
    let r = env.call(Method::GET, &format!("{item}/labels", item = item("r")), Some(&t), None).await;
    assert_eq!(r.json, json!([{"key": "env", "values": ["prod"]}]));
    let r = env.call(Method::GET, &format!("{V1}/subaccountDestinationFragments/f"), Some(&t), None).await;
    assert_eq!(r.json["clientSecret"], "frag-secret", "{}", r.text);
    drop(env);
    let err = Env::try_with_config(config(database, OLD)).await.err().unwrap();
    assert!(matches!(err, Error::WrongMasterKey), "the old key no longer opens the database: {err:?}");
}
