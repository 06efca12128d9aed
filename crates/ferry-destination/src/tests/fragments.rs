//! Fragments (SPEC §1.7): CRUD on both levels, and merging on find with `X-fragment-name`.

use axum::http::{Method, StatusCode};
use serde_json::json;

use super::{Env, TokenServer, V1};

const SUB: &str = "subaccountDestinationFragments";
const INST: &str = "instanceDestinationFragments";

#[tokio::test]
async fn crud_on_both_levels() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let f = json!({"FragmentName": "f1", "URL": "https://frag.example", "clientSecret": "frag-secret"});
    for level in [SUB, INST] {
        let url = format!("{V1}/{level}");
        let r = env.call(Method::POST, &url, Some(&t), Some(f.clone())).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let r = env.call(Method::POST, &url, Some(&t), Some(f.clone())).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);

        let r = env.call(Method::GET, &format!("{url}/f1"), Some(&t), None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json, f);
        let etag = r.headers["etag"].to_str().unwrap().to_owned();
        let r = env.call_raw(Method::GET, &format!("{url}/f1"), Some(&t), None, &[("if-none-match", &etag)]).await;
        assert_eq!(r.status, StatusCode::NOT_MODIFIED);

        // Lists never carry secrets.
        let r = env.call(Method::GET, &url, Some(&t), None).await;
        assert_eq!(r.json, json!([{"FragmentName": "f1", "URL": "https://frag.example"}]));

        let updated = json!({"FragmentName": "f1", "URL": "https://new.example"});
        let r = env.call(Method::PUT, &url, Some(&t), Some(updated.clone())).await;
        assert_eq!(r.json, json!({"Count": 1}), "{}", r.text);
        let r = env.call(Method::GET, &format!("{url}/f1"), Some(&t), None).await;
        assert_eq!(r.json, updated);
        let r = env.call(Method::PUT, &url, Some(&t), Some(json!({"FragmentName": "nope"}))).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);

        let r = env.call(Method::DELETE, &format!("{url}/f1"), Some(&t), None).await;
        assert_eq!(r.json, json!({"Count": 1}));
        let r = env.call(Method::DELETE, &format!("{url}/f1"), Some(&t), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
    // Fragments and destinations are separate name spaces.
    let r = env.call(Method::GET, &format!("{V1}/subaccountDestinations"), Some(&t), None).await;
    assert_eq!(r.json, json!([]));
}

#[tokio::test]
async fn bad_fragments_are_400_and_unauthenticated_calls_401() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let url = format!("{V1}/{SUB}");
    for (body, needle) in [
        (json!({"URL": "x"}), "FragmentName"),
        (json!({"FragmentName": "f", "Name": "x"}), "'Name'"),
        (json!({"FragmentName": "f", "Type": "HTTP"}), "'Type'"),
        (json!({"FragmentName": "bad name"}), "bad name"),
        (json!({"FragmentName": "f", "Nested": {"a": 1}}), "Nested"),
        (json!({"FragmentName": "f", "tokenServiceURLType": "common"}), "'tokenServiceURLType' has the value 'common'"),
        (json!({"FragmentName": "f", "URL": "/relative"}), "property 'URL' is '/relative'"),
    ] {
        let r = env.call(Method::POST, &url, Some(&t), Some(body.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(r.error().contains(needle), "{}", r.text);
    }
    let r = env.call_raw(Method::POST, &url, Some(&t), Some("{"), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    for method in [Method::GET, Method::POST, Method::PUT] {
        let r = env.call(method, &url, None, Some(json!({"FragmentName": "f"}))).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let r = env.call(Method::GET, &format!("{url}/f"), None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Bulk: per-item results.
    let r = env
        .call(Method::POST, &url, Some(&t), Some(json!([{"FragmentName": "a"}, {"FragmentName": "b", "Type": "HTTP"}])))
        .await;
    assert_eq!(r.status, StatusCode::MULTI_STATUS, "{}", r.text);
    assert_eq!(r.json[0]["status"], 201);
    assert!(r.json[0]["etag"].is_string());
    assert_eq!(r.json[1]["status"], 400);
}

#[tokio::test]
async fn find_merges_fragments_and_uses_them_for_tokens() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let t = env.token("zone-1", "client-1");
    env.create(
        &t,
        "subaccount",
        json!({"Name": "d", "Type": "HTTP", "URL": "https://dest.example", "Authentication": "OAuth2ClientCredentials",
               "tokenServiceURL": "http://127.0.0.1:1/never", "clientId": "dest-client"}),
    )
    .await;
    let frag =
        json!({"FragmentName": "f1", "tokenServiceURL": remote.url("/oauth/token"), "clientSecret": "frag-secret"});
    let r = env.call(Method::POST, &format!("{V1}/{SUB}"), Some(&t), Some(frag)).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = env
        .call(
            Method::POST,
            &format!("{V1}/{SUB}"),
            Some(&t),
            Some(json!({"FragmentName": "f2", "URL": "https://f2.example"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);

    let r = env.find(&t, "d", &[("X-fragment-name", "f1")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let c = &r.json["destinationConfiguration"];
    assert_eq!(c["tokenServiceURL"], remote.url("/oauth/token"));
    assert_eq!(c["FragmentName"], "f1");
    assert_eq!(c["URL"], "https://dest.example");
    assert_eq!(r.json["authTokens"][0]["value"], "remote-token-1", "{}", r.text);
    let call = remote.calls().pop().unwrap();
    assert_eq!(call.form("client_id"), Some("dest-client"));
    assert_eq!(call.form("client_secret"), Some("frag-secret"));

    let r = env.find(&t, "d", &[("X-fragment-name", "f1, f2")]).await;
    assert_eq!(r.json["destinationConfiguration"]["FragmentName"], "f1,f2");
    assert_eq!(r.json["destinationConfiguration"]["URL"], "https://f2.example");

    // The stored destination is unchanged.
    let r = env.call(Method::GET, &format!("{V1}/subaccountDestinations/d"), Some(&t), None).await;
    assert_eq!(r.json["URL"], "https://dest.example");
    assert!(r.json.get("FragmentName").is_none());

    let r = env.find(&t, "d", &[("X-fragment-name", "missing")]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.error().contains("Fragment 'missing'"), "{}", r.text);
    let r = env
        .call_raw(
            Method::GET,
            &format!("{V1}/destinations/d?$skipTokenRetrieval=true"),
            Some(&t),
            None,
            &[("X-fragment-name", "missing"), ("X-fragment-optional", "true")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json["destinationConfiguration"].get("FragmentName").is_none());
    let r = env.find(&t, "d", &[("X-fragment-name", "a b")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = env.find(&t, "d", &[("X-fragment-name", "f1"), ("X-fragment-optional", "maybe")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Fragments of another level are not merged.
    let r = env.call(Method::POST, &format!("{V1}/{INST}"), Some(&t), Some(json!({"FragmentName": "fi"}))).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = env.find(&t, "d", &[("X-fragment-name", "fi")]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}
