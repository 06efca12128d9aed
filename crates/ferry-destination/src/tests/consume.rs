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

/// SPEC §1.2: a token the destination binding's client got in a subscriber's subaccount reads the
/// subscriber's levels as `subaccount`/`instance` and the provider's as `provider_subaccount`/
/// `provider_instance`, each without fallback; v1 find never reaches the provider.
#[tokio::test]
async fn provider_levels_with_a_subscriber_token() {
    let env = Env::new().await;
    env.service.set_client_zones(std::sync::Arc::new(|client: &str| (client == "client-1").then(|| "provider".into())));
    let provider = env.token("provider", "client-1");
    let subscriber = env.token("subscriber", "client-1");
    let dest = |name: &str| json!({"Name": name, "Type": "HTTP", "URL": format!("https://{name}.example")});
    let mut p_sub = dest("p-sub");
    p_sub["TrustStoreLocation"] = json!("trust.pem");
    env.create(&provider, "subaccount", p_sub).await;
    env.create(&provider, "instance", dest("p-inst")).await;
    env.create(&subscriber, "subaccount", dest("s-sub")).await;
    env.create(&subscriber, "instance", dest("s-inst")).await;
    for (token, level) in [(&provider, "instance"), (&subscriber, "subaccount")] {
        let r = env
            .call(
                Method::POST,
                &format!("{V1}/{level}DestinationFragments"),
                Some(token),
                Some(json!({"FragmentName": "f", "Description": format!("from {level}")})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    let r = env
        .call(
            Method::POST,
            &format!("{V1}/subaccountCertificates"),
            Some(&provider),
            Some(json!({"Name": "trust.pem", "Content": "AAEC"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);

    let get = |token: &str, path: &str, headers: Vec<(&'static str, &'static str)>| {
        let (env, token, path) = (&env, token.to_owned(), format!("{V2}/{path}"));
        async move { env.call_raw(Method::GET, &path, Some(&token), None, &headers).await }
    };
    for (path, url) in [
        ("p-sub@provider_subaccount", Some("https://p-sub.example")),
        ("p-inst@provider_instance", Some("https://p-inst.example")),
        ("p-inst@provider_subaccount", None),
        ("p-sub@provider_instance", None),
        ("p-sub@subaccount", None),
        ("s-sub@subaccount", Some("https://s-sub.example")),
        ("s-inst", Some("https://s-inst.example")),
        ("s-inst@provider_instance", None),
    ] {
        let r = get(&subscriber, path, vec![]).await;
        match url {
            Some(url) => {
                assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
                assert_eq!(r.json["destinationConfiguration"]["URL"], url, "{path}");
            }
            None => assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}: {}", r.text),
        }
    }
    let r = get(
        &subscriber,
        "p-sub@provider_subaccount?$includeMetadata=owner",
        vec![("X-fragment-name", "f@provider_instance")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["destinationConfiguration"]["Description"], "from instance");
    assert_eq!(
        r.json["destinationConfiguration"]["$metadata"]["owner"],
        json!({
            "destinations": [{"Name": "p-sub", "SubaccountId": "provider", "InstanceId": null}],
            "fragments": [{"FragmentName": "f", "SubaccountId": "provider", "InstanceId": "client-1"}],
            "certificates": [{"Name": "trust.pem", "SubaccountId": "provider", "InstanceId": null}],
        })
    );
    // The subscriber's subaccount level is not mixed with another level in a subscriber's call.
    for (path, fragment) in [("s-sub@subaccount", "f@provider_instance"), ("p-inst@provider_instance", "f@subaccount")]
    {
        let r = get(&subscriber, path, vec![("X-fragment-name", fragment)]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path} {fragment}: {}", r.text);
        assert!(r.error().contains("cannot be mixed"), "{}", r.text);
    }
    let r = get(&subscriber, "s-sub@subaccount", vec![("X-fragment-name", "f@subaccount")]).await;
    assert_eq!(r.json["destinationConfiguration"]["Description"], "from subaccount", "{}", r.text);

    // The provider's own token has no provider levels.
    let r = get(&provider, "p-sub@provider_subaccount", vec![]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("subscriber's token"), "{}", r.text);
    let r = get(&provider, "p-sub@subaccount", vec![]).await;
    assert_eq!(r.status, StatusCode::OK);

    // v1 find with the subscriber's token: subscription level, then the subscriber's subaccount.
    assert_eq!(env.find(&subscriber, "s-inst", &[]).await.status, StatusCode::OK);
    assert_eq!(env.find(&subscriber, "s-sub", &[]).await.json["owner"]["SubaccountId"], "subscriber");
    assert_eq!(env.find(&subscriber, "p-sub", &[]).await.status, StatusCode::NOT_FOUND);
}

/// The same against Ferry's token service: a subscriber token of the destination binding's
/// client (`x-zid`) reaches the provider's instance level as `provider_instance`.
#[tokio::test]
async fn provider_levels_with_ferrys_subscriber_token() {
    let super::FerryTokens { env, token_url, service_token, shutdown, .. } = super::FerryTokens::start().await;
    env.create(&service_token, "instance", json!({"Name": "shared", "Type": "HTTP", "URL": "https://p.example"})).await;
    let answer: serde_json::Value = reqwest::Client::new()
        .post(&token_url)
        .header("x-zid", super::FerryTokens::SUBSCRIBER)
        .form(&[("grant_type", "client_credentials"), ("client_id", "sb-dest"), ("client_secret", "dest-secret")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let subscriber = answer["access_token"].as_str().unwrap();
    let get = |path: &str| {
        let (env, path) = (&env, format!("{V2}/{path}"));
        async move { env.call_raw(Method::GET, &path, Some(subscriber), None, &[]).await }
    };
    let r = get("shared@provider_instance?$includeMetadata=owner").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let owner = &r.json["destinationConfiguration"]["$metadata"]["owner"]["destinations"][0];
    assert_eq!(
        (owner["SubaccountId"].as_str(), owner["InstanceId"].as_str()),
        (Some(super::FerryTokens::ZONE), Some("inst-1"))
    );
    assert_eq!(get("shared").await.status, StatusCode::NOT_FOUND);
    assert_eq!(get("shared@provider_subaccount").await.status, StatusCode::NOT_FOUND);
    // The provider's own token has no provider level.
    let r = env.call_raw(Method::GET, &format!("{V2}/shared@provider_instance"), Some(&service_token), None, &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    shutdown.cancel();
}
