//! Destination chaining (SPEC §1.11): the two predefined chains of `X-chain-name`, end to end
//! against Ferry's token service as the IAS-like issuer, and the 400s of a chain asked wrongly.

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use super::{Env, FerryTokens, V1};

const IAS_SAML: &str = "com.sap.iasGeneratedOAuth2SamlBearerAssertion";
const SEQUENTIAL: &str = "com.sap.sequentialUserPropagation";
const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

fn http(name: &str, auth: &str, token_url: &str) -> Value {
    json!({"Name": name, "Type": "HTTP", "URL": format!("https://{name}.example"), "ProxyType": "Internet",
        "Authentication": auth, "tokenServiceURL": token_url})
}

/// The SAML bearer target as SAP's chain expects it: an OAuth2SAMLBearerAssertion destination
/// whose token service trusts the IAS tenant.
fn saml_target(token_url: &str) -> Value {
    let mut d = http("target", "OAuth2SAMLBearerAssertion", token_url);
    for (k, v) in [
        ("audience", token_url),
        ("clientKey", "sb-app"),
        ("tokenServiceUser", "sb-app"),
        ("tokenServicePassword", "app-secret"),
        ("authnContextClassRef", "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession"),
    ] {
        d[k] = json!(v);
    }
    d
}

#[tokio::test]
async fn ias_generated_saml_bearer_assertion() {
    let FerryTokens { env, ts, verifier, token_url, service_token, shutdown } = FerryTokens::start().await;
    // The provider exchanges the subject token at the IAS-like token service for a SAML
    // assertion, configured as SAP documents it: in the token service URL's query.
    let mut ias = http("ias", "OAuth2TokenExchange", &token_url);
    ias["clientId"] = json!("sb-dest");
    ias["clientSecret"] = json!("dest-secret");
    ias["tokenServiceURL.queries.requested_token_type"] = json!("urn:ietf:params:oauth:token-type:saml2");
    ias["tokenServiceURL.queries.resource"] = json!(token_url);
    env.create(&service_token, "subaccount", ias).await;
    env.create(&service_token, "subaccount", saml_target(&token_url)).await;
    let alice = ts.issue_user_token("alice", "sb-app").unwrap();
    let vars = |subject: &str| {
        vec![
            ("X-chain-name", IAS_SAML.to_owned()),
            ("X-chain-var-samlProviderDestinationName", "ias".to_owned()),
            ("X-chain-var-subjectToken", subject.to_owned()),
            ("X-chain-var-subjectTokenType", ACCESS_TOKEN.to_owned()),
        ]
    };
    let find = |headers: Vec<(&'static str, String)>| {
        let (env, t) = (&env, &service_token);
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            env.find(t, "target", &h).await
        }
    };

    let r = find(vars(&alice)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let token = &r.json["authTokens"][0];
    assert!(token.get("error").is_none(), "{}", r.text);
    assert_eq!(r.json["destinationConfiguration"]["Name"], "target");
    // The token works where it is checked: it verifies as alice's token of the target's client.
    let claims = verifier.verify(token["value"].as_str().unwrap()).await.unwrap();
    assert_eq!((claims.user_name.as_deref(), claims.client_id.as_deref()), (Some("alice"), Some("sb-app")));
    assert_eq!(claims.grant_type.as_deref(), Some("urn:ietf:params:oauth:grant-type:saml2-bearer"));

    // A subject token the IAS-like service refuses fails the first step, and says so.
    let r = find(vars("not-a-token")).await;
    assert_eq!(r.status, StatusCode::OK);
    let error = r.json["authTokens"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("chain step 1, destination 'ias'") && error.contains("invalid_grant"), "{}", r.text);
    shutdown.cancel();
}

#[tokio::test]
async fn sequential_user_propagation() {
    let FerryTokens { env, ts, verifier, token_url, service_token, shutdown } = FerryTokens::start().await;
    let mut exchange = http("exchange", "OAuth2JWTBearer", &token_url);
    exchange["clientId"] = json!("sb-dest");
    exchange["clientSecret"] = json!("dest-secret");
    env.create(&service_token, "subaccount", exchange.clone()).await;
    // The fragment of the first step breaks it (wrong secret) when merged.
    let r = env
        .call(
            Method::POST,
            &format!("{V1}/subaccountDestinationFragments"),
            Some(&service_token),
            Some(json!({"FragmentName": "broken", "clientSecret": "wrong"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let mut target = http("target", "OAuth2JWTBearer", &token_url);
    target["clientId"] = json!("sb-app");
    target["clientSecret"] = json!("app-secret");
    env.create(&service_token, "subaccount", target).await;
    let alice = ts.issue_user_token("alice", "sb-dest").unwrap();
    let find = |extra: &[(&'static str, &'static str)]| {
        let mut h = vec![
            ("X-chain-name", SEQUENTIAL),
            ("X-chain-var-tokenTransformationDestinationName", "exchange"),
            ("X-chain-var-userToken", alice.as_str()),
        ];
        h.extend_from_slice(extra);
        let (env, t) = (&env, &service_token);
        async move { env.find(t, "target", &h).await }
    };

    let r = find(&[]).await;
    let token = &r.json["authTokens"][0];
    assert!(token.get("error").is_none(), "{}", r.text);
    let claims = verifier.verify(token["value"].as_str().unwrap()).await.unwrap();
    assert_eq!((claims.user_name.as_deref(), claims.client_id.as_deref()), (Some("alice"), Some("sb-app")));

    // The first step runs with its fragment: a wrong secret there fails the chain at step 1.
    let r = find(&[("X-chain-var-tokenTransformationFragmentName", "broken")]).await;
    let error = r.json["authTokens"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("chain step 1, destination 'exchange'"), "{}", r.text);
    // A missing optional fragment leaves the first destination as it is.
    let r = find(&[
        ("X-chain-var-tokenTransformationFragmentName", "absent"),
        ("X-chain-var-tokenTransformationFragmentOptional", "true"),
    ])
    .await;
    assert!(r.json["authTokens"][0].get("error").is_none(), "{}", r.text);
    let r = find(&[("X-chain-var-tokenTransformationFragmentName", "absent")]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    shutdown.cancel();
}

#[tokio::test]
async fn chains_asked_wrongly_are_400() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let url = "https://token.example/oauth/token";
    let mut first = http("first", "OAuth2JWTBearer", url);
    first["clientId"] = json!("c");
    env.create(&t, "subaccount", first.clone()).await;
    let mut basic = http("basic", "BasicAuthentication", url);
    basic["User"] = json!("u");
    basic["Password"] = json!("p");
    env.create(&t, "subaccount", basic).await;
    env.create(
        &t,
        "subaccount",
        json!({"Name": "target", "Type": "HTTP", "URL": "https://t.example",
        "Authentication": "OAuth2JWTBearer", "tokenServiceURL": url, "clientId": "c"}),
    )
    .await;
    let seq = [("X-chain-name", SEQUENTIAL), ("X-chain-var-userToken", "u")];
    let with = |extra: &[(&'static str, &'static str)]| [&seq[..], extra].concat();
    for (name, headers, needle) in [
        ("target", vec![("X-chain-name", "com.sap.other")], "Unknown X-chain-name"),
        ("target", seq.to_vec(), "X-chain-var-tokenTransformationDestinationName"),
        (
            "target",
            vec![("X-chain-name", IAS_SAML), ("X-chain-var-samlProviderDestinationName", "first")],
            "X-chain-var-subjectToken",
        ),
        ("target", with(&[("X-chain-var-tokenTransformationDestinationName", "nope")]), "'nope'"),
        ("basic", with(&[("X-chain-var-tokenTransformationDestinationName", "first")]), "cannot end this chain"),
        (
            "target",
            with(&[
                ("X-chain-var-tokenTransformationDestinationName", "first"),
                ("X-chain-var-tokenTransformationFragmentOptional", "maybe"),
            ]),
            "FragmentOptional",
        ),
    ] {
        let r = env.find(&t, name, &headers).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{headers:?}: {}", r.text);
        assert!(r.error().contains(needle), "{headers:?}: {}", r.text);
    }
    let r = env
        .call_raw(
            Method::GET,
            "/destination-configuration/v2/destinations/target@subaccount",
            Some(&t),
            None,
            &with(&[("X-chain-var-tokenTransformationDestinationName", "first")]),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("/v1/destinations"), "{}", r.text);
}
