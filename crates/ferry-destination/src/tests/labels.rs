//! Labels (SPEC §1.9) on destinations, fragments and certificates.

use axum::http::{Method, StatusCode};
use serde_json::json;

use super::{Env, V1};

#[tokio::test]
async fn get_put_patch_and_cleanup() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", json!({"Name": "d", "Type": "HTTP", "URL": "https://d.example"})).await;
    let url = format!("{V1}/subaccountDestinations/d/labels");

    let r = env.call(Method::GET, &url, Some(&t), None).await;
    assert_eq!((r.status, r.json.clone()), (StatusCode::OK, json!([])));
    let r = env.call(Method::PUT, &url, Some(&t), Some(json!([{"key": "env", "values": ["prod"]}]))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = env
        .call(
            Method::PATCH,
            &url,
            Some(&t),
            Some(json!({"action": "ADD", "labels": [
            {"key": "env", "values": ["prod", "eu"]}, {"key": "team", "values": ["a"]}]})),
        )
        .await;
    assert_eq!(
        r.json,
        json!([{"key": "env", "values": ["prod", "eu"]}, {"key": "team", "values": ["a"]}]),
        "{}",
        r.text
    );
    let r = env
        .call(
            Method::PATCH,
            &url,
            Some(&t),
            Some(json!({"action": "DELETE", "labels": [
            {"key": "env", "values": ["prod"]}, {"key": "team", "values": []}]})),
        )
        .await;
    assert_eq!(r.json, json!([{"key": "env", "values": ["eu"]}]));
    let r = env.call(Method::GET, &url, Some(&t), None).await;
    assert_eq!(r.json, json!([{"key": "env", "values": ["eu"]}]));

    for body in [
        json!([{"key": "", "values": ["x"]}]),
        json!([{"key": "k", "values": []}]),
        json!([{"key": "k", "values": ["1"]}, {"key": "k", "values": ["2"]}]),
        json!((0..11).map(|i| json!({"key": format!("k{i}"), "values": ["v"]})).collect::<Vec<_>>()),
        json!({"key": "k"}),
    ] {
        let r = env.call(Method::PUT, &url, Some(&t), Some(body.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
    }
    let r = env.call(Method::PATCH, &url, Some(&t), Some(json!({"action": "MOVE", "labels": []}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(env.call(Method::GET, &url, None, None).await.status, StatusCode::UNAUTHORIZED);
    let r = env.call(Method::GET, &format!("{V1}/subaccountDestinations/nope/labels"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Deleting the object drops its labels; a new one of the same name starts without.
    env.call(Method::DELETE, &format!("{V1}/subaccountDestinations/d"), Some(&t), None).await;
    env.create(&t, "subaccount", json!({"Name": "d", "Type": "HTTP", "URL": "https://d.example"})).await;
    assert_eq!(env.call(Method::GET, &url, Some(&t), None).await.json, json!([]));

    // Fragments and certificates have their own.
    let r = env
        .call(Method::POST, &format!("{V1}/instanceDestinationFragments"), Some(&t), Some(json!({"FragmentName": "d"})))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let furl = format!("{V1}/instanceDestinationFragments/d/labels");
    let r = env.call(Method::PUT, &furl, Some(&t), Some(json!([{"key": "f", "values": ["1"]}]))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(env.call(Method::GET, &url, Some(&t), None).await.json, json!([]));
    let r = env
        .call(
            Method::POST,
            &format!("{V1}/subaccountCertificates"),
            Some(&t),
            Some(json!({"Name": "c.pem", "Content": "AAEC"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = env
        .call(
            Method::PUT,
            &format!("{V1}/subaccountCertificates/c.pem/labels"),
            Some(&t),
            Some(json!([{"key": "c", "values": ["1"]}])),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}
