//! The REST API as values: status codes, bodies and headers, via `router.oneshot`.

use axum::http::{Method, StatusCode};
use base64::Engine;
use serde_json::{Value, json};

use super::{Env, V1, now_secs};

fn basic(name: &str) -> Value {
    json!({
        "Name": name, "Type": "HTTP", "URL": "https://backend.example/api", "ProxyType": "Internet",
        "Authentication": "BasicAuthentication", "User": "alice", "Password": "s3cret:pw"
    })
}

#[tokio::test]
async fn requests_without_a_valid_bearer_token_get_401() {
    let env = Env::new().await;
    let url = format!("{V1}/destinations/x");
    let r = env.call(Method::GET, &url, None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    assert!(r.error().starts_with("Missing Authorization header"), "{}", r.text);

    let r = env.call_raw(Method::GET, &url, None, None, &[("authorization", "Basic YTpi")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.error(), "The Authorization header must use the Bearer scheme");

    let other = ferry_auth::KeySet::generate().unwrap();
    let foreign = other.sign(&json!({"zid": "z", "exp": now_secs() + 60}), &[]).unwrap();
    let expired = env.token_with(json!({"zid": "z", "client_id": "c", "exp": now_secs() - 3600}));
    for (token, why) in [
        ("not-a-jwt", "Invalid bearer token: token is not a well-formed JWT"),
        (foreign.as_str(), "Invalid bearer token: token is signed with an unknown key"),
        (expired.as_str(), "Invalid bearer token: token has expired"),
    ] {
        let r = env.call(Method::GET, &format!("{V1}/subaccountDestinations"), Some(token), None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.error(), why);
    }
}

#[tokio::test]
async fn crud_status_codes() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let coll = format!("{V1}/subaccountDestinations");

    let r = env.call(Method::POST, &coll, Some(&t), Some(basic("d1"))).await;
    assert_eq!((r.status, r.text.as_str()), (StatusCode::CREATED, ""));
    let r = env.call(Method::POST, &coll, Some(&t), Some(basic("d1"))).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    // SAP's document gives POST and PUT on the collection JSON errors, one object plain text.
    assert_eq!(r.json, json!({"ErrorMessage": "Configuration with the same name already exists"}));

    // The management API returns the bare configuration, secrets included, in stored order.
    let r = env.call(Method::GET, &format!("{coll}/d1"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json, basic("d1"));
    assert_eq!(r.text, basic("d1").to_string(), "stored byte for byte, in the order sent");
    let etag = r.headers["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.len() == 66, "{etag}");
    let r = env.call_raw(Method::GET, &format!("{coll}/d1"), Some(&t), None, &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);

    let mut changed = basic("d1");
    changed["URL"] = json!("https://other.example");
    let r = env.call(Method::PUT, &coll, Some(&t), Some(changed.clone())).await;
    assert_eq!((r.status, r.json.clone()), (StatusCode::OK, json!({"Count": 1})));
    let r = env.call(Method::GET, &format!("{coll}/d1"), Some(&t), None).await;
    assert_eq!(r.json, changed);
    assert_ne!(r.headers["etag"].to_str().unwrap(), etag);

    let r = env.call(Method::PUT, &coll, Some(&t), Some(basic("nope"))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json, json!({"ErrorMessage": "Configuration with the specified name was not found"}));

    let r = env.call(Method::DELETE, &format!("{coll}/d1"), Some(&t), None).await;
    assert_eq!((r.status, r.json.clone()), (StatusCode::OK, json!({"Count": 1})));
    for method in [Method::DELETE, Method::GET] {
        let r = env.call(method, &format!("{coll}/d1"), Some(&t), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.headers["content-type"], "text/plain; charset=utf-8");
        assert_eq!(r.text, "Configuration with the specified name was not found");
    }
}

#[tokio::test]
async fn bulk_post_and_put_report_per_item() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let coll = format!("{V1}/instanceDestinations");

    let r = env.call(Method::POST, &coll, Some(&t), Some(json!([basic("a"), basic("b")]))).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let etag_a = r.json[0]["etag"].as_str().unwrap().to_owned();
    let got = env.call(Method::GET, &format!("{coll}/a"), Some(&t), None).await;
    assert_eq!(got.headers["etag"], etag_a.as_str(), "the item's ETag is the stored object's");
    assert_eq!(without_etags(r.json), json!([{"name": "a", "status": 201}, {"name": "b", "status": 201}]));

    let bad = json!({"Name": "bad", "Type": "SOAP"});
    let r = env.call(Method::POST, &coll, Some(&t), Some(json!([basic("a"), bad, basic("c")]))).await;
    assert_eq!(r.status, StatusCode::MULTI_STATUS);
    assert_eq!(
        without_etags(r.json),
        json!([
            {"name": "a", "status": 409, "cause": "Configuration with the same name already exists"},
            {"name": "bad", "status": 400,
             "cause": "Invalid destination: 'SOAP' is not a valid Type; use one of: HTTP, RFC, MAIL, LDAP, TCP"},
            {"name": "c", "status": 201}
        ])
    );

    let r = env.call(Method::PUT, &coll, Some(&t), Some(json!([basic("a"), basic("c")]))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(without_etags(r.json), json!([{"name": "a", "status": 200}, {"name": "c", "status": 200}]));
    let r = env.call(Method::PUT, &coll, Some(&t), Some(json!([basic("a"), basic("zz")]))).await;
    assert_eq!(r.status, StatusCode::MULTI_STATUS);
    assert_eq!(
        r.json[1],
        json!({"name": "zz", "status": 404, "cause": "Configuration with the specified name was not found"})
    );

    let r = env.call(Method::GET, &coll, Some(&t), None).await;
    let names: Vec<&str> = r.json.as_array().unwrap().iter().map(|d| d["Name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b", "c"]);
}

#[tokio::test]
async fn invalid_bodies_get_400_naming_the_problem() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let coll = format!("{V1}/subaccountDestinations");
    let cases: [(&str, &str); 12] = [
        ("{not json", "Request body is not a valid destination: key must be a string"),
        ("\"x\"", "expected a destination object or an array of destination objects"),
        ("[]", "Request body is an empty array"),
        (r#"{"Type":"HTTP"}"#, "Invalid destination: property 'Name' is missing"),
        (r#"{"Name":"x"}"#, "Invalid destination: property 'Type' is missing"),
        (r#"{"Name":"a b","Type":"HTTP"}"#, "destination name 'a b' contains ' '"),
        (r#"{"Name":"x","Type":"HTTP","Authentication":"Basic"}"#, "'Basic' is not a valid Authentication"),
        (r#"{"Name":"x","Type":"HTTP","Extra":{"a":1}}"#, "property 'Extra' has an object value"),
        (r#"{"Name":"x","Type":"HTTP","User":"a","User":"b"}"#, "property 'User' is given more than once"),
        (r#"{"Name":"x","Type":"HTTP"}"#, "Invalid destination: property 'URL' is required for Type 'HTTP'"),
        (
            r#"{"Name":"x","Type":"HTTP","URL":"https://h","Authentication":"OAuth2ClientCredentials","clientId":"c"}"#,
            "property 'tokenServiceURL' is required for Authentication 'OAuth2ClientCredentials'",
        ),
        (r#"[{"Name":"x","Type":"TCP","Address":"h:1","TrustAll":"yes"}]"#, "'TrustAll' has the value 'yes'"),
    ];
    for (body, want) in cases {
        for method in [Method::POST, Method::PUT] {
            let r = env.call_raw(method, &coll, Some(&t), Some(body), &[]).await;
            // A bulk body answers per item: 207 with the cause.
            let (want_status, msg) = if body.starts_with("[{") {
                (StatusCode::MULTI_STATUS, r.json[0]["cause"].as_str().unwrap())
            } else {
                (StatusCode::BAD_REQUEST, r.error())
            };
            assert_eq!(r.status, want_status, "{body}");
            assert!(msg.contains(want), "{body}: {msg}");
        }
    }
    let r = env.call(Method::GET, &coll, Some(&t), None).await;
    assert_eq!(r.json, json!([]), "nothing was stored");

    // Scalars become strings; `$metadata` is not a property.
    let body =
        r#"{"Name":"n","Type":"MAIL","mail.smtp.port":25,"TrustAll":true,"$metadata":{"shared_with_subscriber":true}}"#;
    let r = env.call_raw(Method::POST, &coll, Some(&t), Some(body), &[]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = env.call(Method::GET, &format!("{coll}/n"), Some(&t), None).await;
    assert_eq!(r.text, r#"{"Name":"n","Type":"MAIL","mail.smtp.port":"25","TrustAll":"true"}"#);
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let big = format!(r#"{{"Name":"x","Type":"HTTP","Description":"{}"}}"#, "a".repeat(1024 * 1024));
    let r = env.call_raw(Method::POST, &format!("{V1}/subaccountDestinations"), Some(&t), Some(&big), &[]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.error(), "Request body is larger than the limit of 1024 KiB");
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let r = env.call(Method::GET, "/destination-configuration/v1/nothing", Some(&t), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(!r.error().is_empty());
    let r = env.call(Method::PATCH, &format!("{V1}/subaccountDestinations"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(!r.error().is_empty());
}

#[tokio::test]
async fn lists_never_contain_secrets() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let dest = json!({
        "Name": "s", "Type": "HTTP", "URL": "https://x.example", "User": "u", "Password": "pw-1",
        "clientId": "cid", "clientSecret": "cs-1", "tokenServiceUser": "tu", "tokenServicePassword": "tp-1",
        "mail.password": "mp-1", "custom.apiSecret": "as-1", "jco.client.passwd": "jp-1"
    });
    for level in ["subaccount", "instance"] {
        env.create(&t, level, dest.clone()).await;
        let r = env.call(Method::GET, &format!("{V1}/{level}Destinations"), Some(&t), None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.json,
            json!([{"Name": "s", "Type": "HTTP", "URL": "https://x.example", "User": "u", "clientId": "cid", "tokenServiceUser": "tu"}])
        );
        let r = env.call(Method::GET, &format!("{V1}/{level}Destinations/s"), Some(&t), None).await;
        assert_eq!(r.json, dest, "the single-item management API keeps secrets");
    }
}

#[tokio::test]
async fn find_answers_404_with_the_exact_sdk_message() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let r = env.find(&t, "conf-does-not-exist", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.text, r#"{"ErrorMessage":"Configuration with the specified name was not found"}"#);
}

#[tokio::test]
async fn find_prefers_the_instance_level_and_reports_the_owner() {
    let env = Env::new().await;
    let c1 = env.token("zone-1", "client-1");
    let c2 = env.token("zone-1", "client-2");
    let mut sub = basic("shared");
    sub["URL"] = json!("https://subaccount.example");
    let mut inst = basic("shared");
    inst["URL"] = json!("https://instance.example");
    env.create(&c1, "subaccount", sub).await;
    env.create(&c1, "instance", inst).await;

    let r = env.find(&c1, "shared", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["owner"], json!({"SubaccountId": "zone-1", "InstanceId": "client-1"}));
    assert_eq!(r.json["destinationConfiguration"]["URL"], "https://instance.example");
    assert_eq!(r.json["destinationConfiguration"]["Name"], "shared");

    // Another instance of the same subaccount only sees the subaccount level.
    let r = env.find(&c2, "shared", &[]).await;
    assert_eq!(r.json["owner"], json!({"SubaccountId": "zone-1", "InstanceId": null}));
    assert_eq!(r.json["destinationConfiguration"]["URL"], "https://subaccount.example");

    // Another subaccount sees nothing.
    let r = env.find(&env.token("zone-2", "client-1"), "shared", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // `ext_attr.serviceinstanceid` names the instance when present, before the client id.
    let with_instance = env.token_with(json!({
        "zid": "zone-1", "client_id": "client-1", "exp": now_secs() + 600,
        "ext_attr": {"serviceinstanceid": "instance-9"}
    }));
    let r = env.find(&with_instance, "shared", &[]).await;
    assert_eq!(r.json["owner"]["InstanceId"], Value::Null);
    env.create(&with_instance, "instance", basic("only-9")).await;
    let r = env.find(&with_instance, "only-9", &[]).await;
    assert_eq!(r.json["owner"], json!({"SubaccountId": "zone-1", "InstanceId": "instance-9"}));
    assert_eq!(env.find(&c1, "only-9", &[]).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn basic_authentication_tokens_and_the_skip_flag() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", basic("b")).await;

    let r = env.find(&t, "b", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let value = base64::engine::general_purpose::STANDARD.encode("alice:s3cret:pw");
    // Exact equality: a successful token has no `error` key at all (approuter checks the key).
    assert_eq!(
        r.json["authTokens"],
        json!([{"type": "Basic", "value": value, "http_header": {"key": "Authorization", "value": format!("Basic {value}")}}])
    );
    assert_eq!(r.json["destinationConfiguration"], basic("b"));

    for query in ["$skipTokenRetrieval=true", "%24skipTokenRetrieval=true", "$skipTokenRetrieval=TRUE"] {
        let r = env.call(Method::GET, &format!("{V1}/destinations/b?{query}"), Some(&t), None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.json.get("authTokens").is_none(), "{query}: {}", r.text);
        assert_eq!(r.json["destinationConfiguration"]["Password"], "s3cret:pw");
    }
    let r = env.call(Method::GET, &format!("{V1}/destinations/b?$skipCredentials=true"), Some(&t), None).await;
    assert!(r.json["destinationConfiguration"].get("Password").is_none(), "{}", r.text);
    assert_eq!(r.json["authTokens"][0]["type"], "Basic");
}

#[tokio::test]
async fn token_entries_for_other_authentication_types() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let dest = |name: &str, auth: &str| json!({"Name": name, "Type": "HTTP", "URL": "https://x.example", "Authentication": auth});
    env.create(&t, "subaccount", dest("none", "NoAuthentication")).await;
    env.create(&t, "subaccount", {
        let mut pp = dest("pp", "PrincipalPropagation");
        pp["ProxyType"] = json!("OnPremise");
        pp
    })
    .await;
    env.create(&t, "subaccount", json!({"Name": "unset", "Type": "HTTP", "URL": "https://x.example"})).await;
    // Incomplete destinations cannot be written through the API any more, but rows stored
    // before its rules (or loaded another way) must still be answered on find.
    for (name, auth) in [("sso", "SAPAssertionSSO"), ("nopw", "BasicAuthentication")] {
        let props = [("Name", name), ("Type", "HTTP"), ("URL", "https://x.example"), ("Authentication", auth)];
        let incomplete = ferry_model::Destination::from_properties(props).unwrap();
        env.service.upsert("zone-1", None, incomplete).await.unwrap();
    }

    for name in ["none", "pp", "unset"] {
        let r = env.find(&t, name, &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.json.get("authTokens").is_none(), "{name}: {}", r.text);
    }
    let r = env.find(&t, "sso", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json["authTokens"],
        json!([{"type": "", "value": "",
                "error": "Authentication 'SAPAssertionSSO' is deprecated by SAP and not supported by this Destination \
                          Service; use SAMLAssertion or PrincipalPropagation instead"}])
    );
    let r = env.find(&t, "nopw", &[]).await;
    assert_eq!(
        r.json["authTokens"][0]["error"],
        "BasicAuthentication destinations need the properties 'User' and 'Password'"
    );
}

#[tokio::test]
async fn conflicting_tenant_headers_get_400() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", basic("b")).await;
    let r = env.find(&t, "b", &[("x-tenant", "acme"), ("x-user-token", "eyJ")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error(), "The headers X-user-token and X-tenant cannot be used together");
    let r = env.find(&t, "b", &[("x-tenant", "evil.example/")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn upsert_loads_destinations_for_the_config_file_path() {
    let env = Env::new().await;
    let dest =
        ferry_model::Destination::from_properties([("Name", "cfg"), ("Type", "HTTP"), ("URL", "https://a")]).unwrap();
    env.service.upsert("zone-1", None, dest.clone()).await.unwrap();
    env.service.upsert("zone-1", None, dest).await.unwrap();
    let inst =
        ferry_model::Destination::from_properties([("Name", "cfg"), ("Type", "HTTP"), ("URL", "https://b")]).unwrap();
    env.service.upsert("zone-1", Some("client-1"), inst).await.unwrap();
    let r = env.find(&env.token("zone-1", "client-1"), "cfg", &[]).await;
    assert_eq!(r.json["destinationConfiguration"]["URL"], "https://b");
    let r = env.find(&env.token("zone-1", "client-2"), "cfg", &[]).await;
    assert_eq!(r.json["destinationConfiguration"]["URL"], "https://a");
}

/// Bulk results without their `etag`s, which are checked separately.
fn without_etags(mut v: serde_json::Value) -> serde_json::Value {
    for item in v.as_array_mut().unwrap() {
        item.as_object_mut().unwrap().remove("etag");
    }
    v
}
