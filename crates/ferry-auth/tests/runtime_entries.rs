//! Tenants and clients added and removed while the token service runs (the subaccount
//! directory's path), next to the static ones of the configuration.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use ferry_auth::KeySet;
use ferry_auth::token_service::{
    ConfigError, OAuthClient, Tenant, TokenError, TokenService, TokenServiceConfig, User, hash_password,
};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

fn client(id: &str, secret: &str, tenant: &str) -> OAuthClient {
    OAuthClient {
        client_id: id.into(),
        client_secret: secret.into(),
        tenant_id: tenant.into(),
        xsappname: id.into(),
        authorities: vec!["uaa.resource".into()],
        ..Default::default()
    }
}

async fn token(router: &Router, id: &str, secret: &str) -> (StatusCode, Value) {
    let body = format!("grant_type=client_credentials&client_id={id}&client_secret={secret}");
    let req = Request::post("/oauth/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn tenants_and_clients_come_and_go() {
    let svc = TokenService::with_runtime_entries(
        TokenServiceConfig {
            tenants: vec![Tenant {
                id: "static".into(),
                subdomain: "static".into(),
                keys: Arc::new(KeySet::generate().unwrap()),
            }],
            clients: vec![client("fixed", "fixed-secret", "static")],
            users: vec![User { username: "u".into(), tenant_id: "static".into(), ..Default::default() }],
            public_url: "http://127.0.0.1:1".into(),
            uaadomain: "127.0.0.1:2".into(),
            ..Default::default()
        },
        vec![Tenant { id: "loaded".into(), subdomain: "loaded".into(), keys: Arc::new(KeySet::generate().unwrap()) }],
        vec![client("loaded-client", &hash_password("hashed-secret").unwrap(), "loaded")],
    )
    .unwrap();
    let router = svc.router();
    let verifier = svc.verifier();

    // A client loaded with a hashed secret authenticates with the plain one (twice: cached).
    for _ in 0..2 {
        let (st, v) = token(&router, "loaded-client", "hashed-secret").await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(verifier.verify(v["access_token"].as_str().unwrap()).await.unwrap().zid, "loaded");
    }
    assert_eq!(token(&router, "loaded-client", "wrong").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(token(&router, "loaded-client", "$argon2id$").await.0, StatusCode::UNAUTHORIZED);

    // Added at run time: tokens at once, verified by the verifier built before.
    let keys = Arc::new(KeySet::generate().unwrap());
    svc.add_tenant(Tenant { id: "new".into(), subdomain: "new".into(), keys }).unwrap();
    assert!(matches!(
        svc.add_tenant(Tenant {
            id: "new".into(),
            subdomain: "other".into(),
            keys: Arc::new(KeySet::generate().unwrap())
        }),
        Err(ConfigError::DuplicateTenant(_))
    ));
    assert!(matches!(
        svc.add_tenant(Tenant {
            id: "x".into(),
            subdomain: "STATIC".into(),
            keys: Arc::new(KeySet::generate().unwrap())
        }),
        Err(ConfigError::DuplicateSubdomain(_))
    ));
    assert!(matches!(svc.add_client(client("c", "s", "nowhere")), Err(ConfigError::ClientTenantUnknown { .. })));
    svc.add_client(client("c", "s", "new")).unwrap();
    assert!(matches!(svc.add_client(client("fixed", "s", "new")), Err(ConfigError::DuplicateClient(_))));
    let (st, v) = token(&router, "c", "s").await;
    assert_eq!(st, StatusCode::OK);
    let t = v["access_token"].as_str().unwrap().to_owned();
    assert_eq!(verifier.verify(&t).await.unwrap().zid, "new");

    // Removed: no more tokens, and the old ones stop verifying with the tenant.
    assert!(svc.remove_client("c").unwrap());
    assert!(!svc.remove_client("c").unwrap());
    assert_eq!(token(&router, "c", "s").await.0, StatusCode::UNAUTHORIZED);
    assert!(svc.remove_tenant("new").unwrap());
    assert!(verifier.verify(&t).await.is_err());

    // Static entries stay; a tenant used by a static client or user cannot go.
    assert!(matches!(svc.remove_client("fixed"), Err(TokenError::Static(_))));
    assert!(matches!(svc.remove_tenant("static"), Err(TokenError::Static(_))));
    svc.add_client(client("fixed-2", "s", "loaded")).unwrap();
    assert!(svc.remove_tenant("loaded").unwrap(), "only run-time clients in it");
    assert_eq!(token(&router, "loaded-client", "hashed-secret").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(token(&router, "fixed", "fixed-secret").await.0, StatusCode::OK);
}

#[test]
fn a_run_time_tenant_with_a_static_client_cannot_be_removed() {
    let svc = TokenService::with_runtime_entries(
        TokenServiceConfig {
            clients: vec![client("admin", "s", "dyn")],
            public_url: "http://127.0.0.1:1".into(),
            uaadomain: "127.0.0.1:2".into(),
            ..Default::default()
        },
        vec![Tenant { id: "dyn".into(), subdomain: "dyn".into(), keys: Arc::new(KeySet::generate().unwrap()) }],
        vec![],
    )
    .unwrap();
    assert!(matches!(svc.remove_tenant("dyn"), Err(TokenError::TenantInUse(_))));
}
