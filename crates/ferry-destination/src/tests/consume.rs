//! The v2 consume API (SPEC §1.5): one level per call, no fallback, default `instance`.

use axum::http::{Method, StatusCode};
use serde_json::json;

use super::{Env, V1};

const V2: &str = "/destination-configuration/v2/destinations";

#[tokio::test]
async fn levels_without_fallback() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    env.create(
        &t,
        "subaccount",
        json!({"Name": "sub", "Type": "HTTP", "URL": "https://s.example", "Authentication": "BasicAuthentication",
        "User": "u", "Password": "p"}),
    )
    .await;
    env.create(&t, "instance", json!({"Name": "inst", "Type": "HTTP", "URL": "https://i.example"})).await;
    let get = |path: String, headers: Vec<(&'static str, &'static str)>| {
        let (env, t) = (&env, &t);
        async move { env.call_raw(Method::GET, &path, Some(t), None, &headers).await }
    };

    // Default level is instance; a subaccount destination is not found there.
    let r = get(format!("{V2}/sub"), vec![]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error(), "Configuration with the specified name was not found");
    let r = get(format!("{V2}/inst"), vec![]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.json.get("owner").is_none());
    assert_eq!(r.json["destinationConfiguration"]["URL"], "https://i.example");

    let r = get(format!("{V2}/sub@subaccount"), vec![]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["authTokens"][0]["type"], "Basic");
    let r = get(format!("{V2}/inst@subaccount"), vec![]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let r = get(format!("{V2}/sub@subaccount?$includeMetadata=owner&$skipCredentials=true"), vec![]).await;
    assert_eq!(
        r.json["destinationConfiguration"]["$metadata"]["owner"]["destinations"],
        json!([{"Name": "sub", "SubaccountId": "zone-1", "InstanceId": null}])
    );
    assert!(r.json["destinationConfiguration"].get("Password").is_none());

    for path in [
        format!("{V2}/sub@nowhere"),
        format!("{V2}/sub@provider_instance"),
        format!("{V2}/sub@subaccount?$includeMetadata=x"),
    ] {
        let r = get(path.clone(), vec![]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
        assert!(!r.error().is_empty());
    }
    assert_eq!(env.call(Method::GET, &format!("{V2}/sub"), None, None).await.status, StatusCode::UNAUTHORIZED);

    // Fragments with an explicit level.
    let r = env
        .call(
            Method::POST,
            &format!("{V1}/instanceDestinationFragments"),
            Some(&t),
            Some(json!({"FragmentName": "f", "URL": "https://f.example"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = get(format!("{V2}/sub@subaccount"), vec![("X-fragment-name", "f@instance")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["destinationConfiguration"]["URL"], "https://f.example");
    assert_eq!(r.json["destinationConfiguration"]["FragmentName"], "f");
    let r = get(format!("{V2}/sub@subaccount"), vec![("X-fragment-name", "f")]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn find_has_an_etag_of_the_configuration() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", json!({"Name": "d", "Type": "HTTP", "URL": "https://a.example"})).await;
    let r = env.find(&t, "d", &[]).await;
    let etag = r.headers["etag"].to_str().unwrap().to_owned();
    let stored = env.call(Method::GET, &format!("{V1}/subaccountDestinations/d"), Some(&t), None).await;
    assert_eq!(stored.headers["etag"], etag.as_str());
    let r = env.find(&t, "d", &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    let r = env.find(&t, "d", &[("if-match", "\"other\"")]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let r = env.call_raw(Method::GET, &format!("{V2}/d@subaccount"), Some(&t), None, &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    env.call(
        Method::PUT,
        &format!("{V1}/subaccountDestinations"),
        Some(&t),
        Some(json!({"Name": "d", "Type": "HTTP", "URL": "https://b.example"})),
    )
    .await;
    let r = env.find(&t, "d", &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::OK);
}
