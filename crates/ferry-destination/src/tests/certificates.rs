//! Certificates (SPEC §1.8): CRUD on both levels; lists omit the content.

use axum::http::{Method, StatusCode};
use base64::Engine;
use serde_json::json;

use super::{Env, V1};

const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB-not-really\n-----END CERTIFICATE-----\n";

fn content() -> String {
    base64::engine::general_purpose::STANDARD.encode(PEM)
}

#[tokio::test]
async fn crud_on_both_levels_and_lists_without_content() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let cert = json!({"Name": "trust.pem", "Type": "PEM", "Content": content()});
    for level in ["subaccountCertificates", "instanceCertificates"] {
        let url = format!("{V1}/{level}");
        let r = env.call(Method::POST, &url, Some(&t), Some(cert.clone())).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let r = env.call(Method::POST, &url, Some(&t), Some(cert.clone())).await;
        assert_eq!(r.status, StatusCode::CONFLICT);

        // The SDK fetches `.pem` truststores this way: content included.
        let r = env.call(Method::GET, &format!("{url}/trust.pem"), Some(&t), None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json, cert);
        let etag = r.headers["etag"].to_str().unwrap().to_owned();
        let one = format!("{url}/trust.pem");
        let r = env.call_raw(Method::GET, &one, Some(&t), None, &[("if-match", &etag)]).await;
        assert_eq!(r.status, StatusCode::OK);
        let r = env.call_raw(Method::GET, &one, Some(&t), None, &[("if-match", "\"other\"")]).await;
        assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
        assert!(r.error().contains("If-Match"));
        let r = env.call_raw(Method::GET, &one, Some(&t), None, &[("if-none-match", &etag)]).await;
        assert_eq!(r.status, StatusCode::NOT_MODIFIED);

        let r = env.call(Method::GET, &url, Some(&t), None).await;
        assert_eq!(r.json, json!([{"Name": "trust.pem", "Type": "PEM"}]));
        assert!(!r.text.contains(&content()));

        let other = json!({"Name": "trust.pem", "Type": "CRT", "Content": "AAEC"});
        let r = env.call(Method::PUT, &url, Some(&t), Some(other.clone())).await;
        assert_eq!(r.json, json!({"Count": 1}), "{}", r.text);
        let r = env.call(Method::GET, &format!("{url}/trust.pem"), Some(&t), None).await;
        assert_eq!(r.json, other);
        let r = env.call(Method::PUT, &url, Some(&t), Some(json!({"Name": "x.pem", "Content": "AAEC"}))).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);

        let r = env.call(Method::DELETE, &format!("{url}/trust.pem"), Some(&t), None).await;
        assert_eq!(r.json, json!({"Count": 1}));
        let r = env.call(Method::GET, &format!("{url}/trust.pem"), Some(&t), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn bad_certificates_are_400_and_unauthenticated_calls_401() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let url = format!("{V1}/subaccountCertificates");
    for (body, needle) in [
        (json!({"Name": "a.pem", "Content": "not base64!"}), "base64"),
        (json!({"Name": "a.pem"}), "Content"),
        (json!({"Name": "a b", "Content": "AAEC"}), "a b"),
        (json!({"Name": "a.zip", "Type": "ZIP", "Content": "AAEC"}), "ZIP"),
        (json!({"Content": "AAEC"}), "Name"),
        (json!({"Name": "a", "Content": "AAEC", "Attributes": {}}), "Attributes"),
        (json!("text"), "certificate"),
    ] {
        let r = env.call(Method::POST, &url, Some(&t), Some(body.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert!(r.error().contains(needle), "{}", r.text);
    }
    let r = env.call_raw(Method::POST, &url, Some(&t), Some("{"), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = env
        .call(Method::POST, &url, Some(&t), Some(json!([{"Name": "ok.pem", "Content": "AAEC"}, {"Name": "bad.pem"}])))
        .await;
    assert_eq!(r.status, StatusCode::MULTI_STATUS, "{}", r.text);
    assert_eq!(r.json[0]["status"], 201);
    assert!(r.json[0]["etag"].is_string());
    assert_eq!(r.json[1]["status"], 400);
    let r = env.call(Method::POST, &url, Some(&t), Some(json!([{"Name": "one.pem", "Content": "AAEC"}]))).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json[0]["name"], "one.pem", "an array of one gets an array answer");
    for method in [Method::GET, Method::POST, Method::PUT] {
        assert_eq!(env.call(method, &url, None, Some(json!({}))).await.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(env.call(Method::GET, &format!("{url}/ok.pem"), None, None).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(env.call(Method::DELETE, &format!("{url}/ok.pem"), None, None).await.status, StatusCode::UNAUTHORIZED);
}
