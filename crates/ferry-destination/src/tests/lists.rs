//! List query modes and bulk delete (SPEC §1.6).

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use super::{Env, V1};

fn names(v: &Value) -> Vec<&str> {
    v.as_array().unwrap().iter().map(|d| d["Name"].as_str().unwrap()).collect()
}

async fn seeded() -> (Env, String) {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    for name in ["alpha", "alps", "beta", "gamma-x", "delta-x"] {
        env.create(
            &t,
            "subaccount",
            json!({"Name": name, "Type": "HTTP", "URL": "https://x.example", "Password": "pw"}),
        )
        .await;
    }
    (env, t)
}

#[tokio::test]
async fn filter_select_and_paging() {
    let (env, t) = seeded().await;
    let get = |q: &str| {
        let (env, t) = (&env, &t);
        let uri = format!("{V1}/subaccountDestinations?{q}");
        async move { env.call(Method::GET, &uri, Some(t), None).await }
    };
    let r = get("$filter=Name%20in%20('alpha','beta','nope')").await;
    assert_eq!(names(&r.json), ["alpha", "beta"], "{}", r.text);
    let r = get("$filter=startswith(Name,'al')").await;
    assert_eq!(names(&r.json), ["alpha", "alps"]);
    let r = get("$filter=endswith(Name,%20'-x')").await;
    assert_eq!(names(&r.json), ["delta-x", "gamma-x"]);
    assert!(!r.text.contains("pw"));

    let r = get("$select=Name").await;
    assert_eq!(
        r.json,
        json!([{"Name": "alpha"}, {"Name": "alps"}, {"Name": "beta"}, {"Name": "delta-x"}, {"Name": "gamma-x"}])
    );

    let r = get("$page=2&$pageSize=2&$pageCount=true&$entityCount=true").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(names(&r.json), ["beta", "delta-x"]);
    assert_eq!(r.headers["page-count"], "3");
    assert_eq!(r.headers["entity-count"], "5");
    assert_eq!(
        r.headers["link"],
        "</subaccountDestinations?$page=1&$pageSize=2>; rel='previous', </subaccountDestinations?$page=3&$pageSize=2>; rel='next'"
    );
    let r = get("$page=3&$pageSize=2").await;
    assert_eq!(names(&r.json), ["gamma-x"]);
    assert!(r.headers.get("page-count").is_none());
    let r = get("$page=9").await;
    assert_eq!(r.json, json!([]));

    for (q, needle) in [
        ("$select=Name&$page=1", "cannot be combined"),
        ("$filter=Name%20eq%20'a'", "$filter"),
        ("$page=0", "$page"),
        ("$page=1&$pageSize=5000", "$pageSize"),
        ("$pageCount=true", "need $page"),
        ("$select=URL", "$select"),
    ] {
        let r = get(q).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}");
        assert!(r.error().contains(needle), "{q}: {}", r.text);
    }
}

#[tokio::test]
async fn bulk_delete_needs_a_name_filter() {
    let (env, t) = seeded().await;
    let url = format!("{V1}/subaccountDestinations");
    let r = env.call(Method::DELETE, &url, Some(&t), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("$filter=Name in"), "{}", r.text);
    let r = env.call(Method::DELETE, &format!("{url}?$filter=startswith(Name,'a')"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = env.call(Method::DELETE, &format!("{url}?$filter=Name%20in%20('alpha','nope')"), None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    let r =
        env.call(Method::DELETE, &format!("{url}?$filter=Name%20in%20('alpha','nope','beta')"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json,
        json!({"Count": 2, "Summary": [
            {"name": "alpha", "status": "DELETED"},
            {"name": "nope", "status": "NOT_FOUND", "reason": "Could not find configuration"},
            {"name": "beta", "status": "DELETED"}
        ]})
    );
    let r = env.call(Method::GET, &url, Some(&t), None).await;
    assert_eq!(names(&r.json), ["alps", "delta-x", "gamma-x"]);

    // Certificates: the same bulk delete; lists filter by `in` only.
    let certs = format!("{V1}/instanceCertificates");
    let r = env.call(Method::POST, &certs, Some(&t), Some(json!({"Name": "a.pem", "Content": "AAEC"}))).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = env.call(Method::GET, &format!("{certs}?$filter=startswith(Name,'a')"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = env.call(Method::GET, &format!("{certs}?$filter=Name%20in%20('a.pem')"), Some(&t), None).await;
    assert_eq!(r.json, json!([{"Name": "a.pem", "Type": null}]));
    let r = env.call(Method::DELETE, &format!("{certs}?$filter=Name%20in%20('a.pem')"), Some(&t), None).await;
    assert_eq!(r.json["Count"], 1, "{}", r.text);
}

#[tokio::test]
async fn metadata_time_window_and_label_filters() {
    let (env, t) = seeded().await;
    let get = |q: String| {
        let (env, t) = (&env, &t);
        let uri = format!("{V1}/subaccountDestinations?{q}");
        async move { env.call(Method::GET, &uri, Some(t), None).await }
    };

    // `$metadata` per item: the ETag a GET of the item reports, and when it was written.
    let r = get("$includeMetadata=modification_time;etag".into()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(names(&r.json).len(), 5);
    let alpha = &r.json[0];
    let one = env.call(Method::GET, &format!("{V1}/subaccountDestinations/alpha"), Some(&t), None).await;
    assert_eq!(alpha["$metadata"]["etag"], one.headers["etag"].to_str().unwrap());
    let time = alpha["$metadata"]["modification_time"].as_str().unwrap();
    let year = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 31_556_952;
    assert!(time.starts_with(&format!("{}-", 1970 + year)) && time.ends_with('Z') && time.len() == 20, "{time}");
    assert!(alpha.get("Password").is_none());
    let r = get("$includeMetadata=etag&$filter=startswith(Name,'al')".into()).await;
    assert_eq!(names(&r.json), ["alpha", "alps"]);
    assert!(r.json[0]["$metadata"].get("modification_time").is_none());
    assert!(r.json[0]["$metadata"]["etag"].is_string());
    let r = get(String::new()).await;
    assert!(r.json[0].get("$metadata").is_none());

    let r = get("$filter=modifiedwithin('1',%20'minutes')".into()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(names(&r.json), ["alpha", "alps", "beta", "delta-x", "gamma-x"]);

    for (key, body) in [
        ("alpha", json!([{"key": "env", "values": ["prod"]}])),
        ("beta", json!([{"key": "env", "values": ["dev"]}, {"key": "team", "values": ["a b"]}])),
        ("alps", json!([{"key": "team", "values": ["a b"]}])),
    ] {
        let r = env.call(Method::PUT, &format!("{V1}/subaccountDestinations/{key}/labels"), Some(&t), Some(body)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    let r = get("$filter=Label['env']%20HAS%20('prod','dev')".into()).await;
    assert_eq!(names(&r.json), ["alpha", "beta"], "{}", r.text);
    // As the Python SDK encodes it: values percent-encoded inside the quotes.
    let filter = "Label['env'] HAS ('dev') AND Label['team'] HAS ('a%20b')";
    let r = get(format!("$filter={}", form_urlencoded::byte_serialize(filter.as_bytes()).collect::<String>())).await;
    assert_eq!(names(&r.json), ["beta"], "{}", r.text);

    for (q, needle) in [
        ("$filter=modifiedwithin('0','minutes')", "1 to 1440"),
        ("$filter=modifiedwithin('1441','minutes')", "1 to 1440"),
        ("$filter=modifiedwithin('5','hours')", "'minutes'"),
        ("$filter=Label['env']%20HAS%20()", "Label['key'] HAS"),
        ("$includeMetadata=owner", "modification_time"),
        ("$includeMetadata=etag&$select=Name", "cannot be combined"),
        ("$includeMetadata=etag&$page=1", "cannot be combined"),
    ] {
        let r = get(q.into()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}");
        assert!(r.error().contains(needle), "{q}: {}", r.text);
    }

    // Certificates filter by labels too (the Python SDK's list options apply to both).
    let certs = format!("{V1}/subaccountCertificates");
    for name in ["a.pem", "b.pem"] {
        let r = env.call(Method::POST, &certs, Some(&t), Some(json!({"Name": name, "Content": "AAEC"}))).await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let r = env
        .call(Method::PUT, &format!("{certs}/b.pem/labels"), Some(&t), Some(json!([{"key": "k", "values": ["v"]}])))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = env.call(Method::GET, &format!("{certs}?$filter=Label['k']%20HAS%20('v')"), Some(&t), None).await;
    assert_eq!(r.json, json!([{"Name": "b.pem", "Type": null}]), "{}", r.text);
}
