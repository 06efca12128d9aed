//! SPEC §2.6: an IAS user token with `forward_corp_idp_token` on an OnPremise
//! PrincipalPropagation destination is exchanged for the corporate identity provider's token.
//! IAS is an OIDC issuer on a socket (discovery, JWKS, token endpoint) that the service trusts
//! through `ferry_auth`'s real OIDC trust, as a `[[trust]]` entry does.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::routing::{get, post};
use axum::{Form, Json, Router};
use ferry_auth::{KeySet, OidcTrust, TrustedIssuer, Verifier};
use serde_json::json;

use super::{Env, ManualClock, config};
use crate::{DatabaseConfig, DestinationService};

type Calls = Arc<Mutex<Vec<Vec<(String, String)>>>>;

/// An IAS-like issuer on 127.0.0.1:0: its URL, signing keys and the token requests it got.
async fn ias() -> (String, Arc<KeySet>, Calls) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let keys = Arc::new(KeySet::generate().unwrap());
    let calls: Calls = Arc::default();
    let (doc_issuer, jwks, recorded) = (issuer.clone(), keys.jwks(), calls.clone());
    let app = Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(move || {
                let i = doc_issuer.clone();
                async move {
                    Json(json!({"issuer": i, "jwks_uri": format!("{i}/jwks"), "token_endpoint": format!("{i}/oauth2/token")}))
                }
            }),
        )
        .route("/jwks", get(move || async move { Json(serde_json::to_value(&jwks).unwrap()) }))
        .route(
            "/oauth2/token",
            post(move |Form(form): Form<Vec<(String, String)>>| {
                let recorded = recorded.clone();
                async move {
                    let requested = form.iter().find(|(k, _)| k == "requested_token_type").map(|(_, v)| v.clone());
                    recorded.lock().unwrap().push(form);
                    let n = recorded.lock().unwrap().len();
                    Json(json!({"access_token": format!("corporate-token-{n}"), "token_type": "Bearer",
                        "expires_in": 3600, "issued_token_type": requested}))
                }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (issuer, keys, calls)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn form_value<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn forward_corp_idp_token_is_exchanged() {
    let (issuer, ias_keys, calls) = ias().await;
    let own = Arc::new(KeySet::generate().unwrap());
    let http = ferry_core::tls::http_client(None).unwrap();
    let trust = OidcTrust { issuer: issuer.clone(), subaccount: "zone-1".into(), audiences: vec![] };
    let verifier = Arc::new(
        Verifier::new(vec![TrustedIssuer::Local(own.clone())], http.clone())
            .with_issuers([TrustedIssuer::oidc(trust).unwrap()]),
    );
    let service =
        DestinationService::open(config(DatabaseConfig::SqliteMemory, [3; 32]), verifier, http).await.unwrap();
    let env = Env { keys: own, router: service.router(), service, clock: ManualClock::new() };
    let t = env.token("zone-1", "client-1");
    env.create(
        &t,
        "subaccount",
        json!({"Name": "pp", "Type": "HTTP", "URL": "http://erp.onprem:8000", "ProxyType": "OnPremise",
            "Authentication": "PrincipalPropagation"}),
    )
    .await;
    let ias_user = |user: &str, forward: Option<&str>| {
        let mut claims = json!({"iss": issuer, "sub": user, "user_uuid": user, "email": format!("{user}@corp.example"),
            "azp": "ias-app", "aud": "ias-app", "exp": now() + 600, "iat": now()});
        if let Some(f) = forward {
            claims["forward_corp_idp_token"] = json!(f);
        }
        ias_keys.sign(&claims, &[]).unwrap()
    };

    let alice = ias_user("alice", Some("access_token"));
    let r = env.find(&t, "pp", &[("X-user-token", &alice)]).await;
    let token = &r.json["authTokens"][0];
    assert!(token.get("error").is_none(), "{}", r.text);
    assert_eq!((token["type"].as_str(), token["value"].as_str()), (Some("Bearer"), Some("corporate-token-1")));
    assert_eq!(token["http_header"]["value"], "Bearer corporate-token-1");
    let form = calls.lock().unwrap()[0].clone();
    assert_eq!(form_value(&form, "grant_type"), Some("urn:ietf:params:oauth:grant-type:token-exchange"));
    assert_eq!(form_value(&form, "subject_token"), Some(alice.as_str()));
    assert_eq!(form_value(&form, "requested_token_type"), Some("urn:ietf:params:oauth:token-type:access_token"));
    assert_eq!(form_value(&form, "resource"), Some("urn:sap:identity:corporateidp"));
    assert_eq!(form_value(&form, "client_id"), Some("ias-app"));

    // Cached for the user; the user's token in Authorization works the same.
    let again = env.find(&alice, "pp", &[]).await;
    assert_eq!(again.json["authTokens"][0]["value"], "corporate-token-1", "{}", again.text);
    assert_eq!(calls.lock().unwrap().len(), 1);

    // Another user, asking for the ID token.
    let bob = ias_user("bob", Some("id_token"));
    let r = env.find(&t, "pp", &[("X-user-token", &bob)]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "corporate-token-2", "{}", r.text);
    let form = calls.lock().unwrap()[1].clone();
    assert_eq!(form_value(&form, "requested_token_type"), Some("urn:ietf:params:oauth:token-type:id_token"));

    // Without the claim, or without a user: principal propagation as usual, no token.
    for headers in [vec![("X-user-token", ias_user("carol", None))], vec![]] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = env.find(&t, "pp", &h).await;
        assert!(r.json.get("authTokens").is_none(), "{}", r.text);
    }
    // A token of Ferry's own tenants cannot ask for a corporate token; the reason is given.
    let own_user = env.token_with(json!({"zid": "zone-1", "client_id": "c", "user_name": "dave", "user_id": "dave",
        "exp": now() + 600, "forward_corp_idp_token": "access_token"}));
    let r = env.find(&t, "pp", &[("X-user-token", &own_user)]).await;
    let error = r.json["authTokens"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("trusted identity provider"), "{}", r.text);
    assert_eq!(calls.lock().unwrap().len(), 2);
}
