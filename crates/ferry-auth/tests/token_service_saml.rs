//! The RFC 7522 saml2-bearer grant: an assertion signed by a tenant's trusted SAML identity
//! provider becomes a user token for its NameID; anything else is an `invalid_grant`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ferry_auth::KeySet;
use ferry_auth::saml::{Assertion, NAMEID_UNSPECIFIED, SamlSigner, TrustedCertificate};
use ferry_auth::token_service::{OAuthClient, Tenant, TokenError, TokenService, TokenServiceConfig, User};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

const ENDPOINT: &str = "http://127.0.0.1:1/oauth/token";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn service() -> Arc<TokenService> {
    let tenant = |id: &str| Tenant { id: id.into(), subdomain: id.into(), keys: Arc::new(KeySet::generate().unwrap()) };
    TokenService::new(TokenServiceConfig {
        tenants: vec![tenant("zone-a"), tenant("zone-b")],
        clients: vec![
            OAuthClient {
                client_id: "app".into(),
                client_secret: "s".into(),
                tenant_id: "zone-a".into(),
                xsappname: "app!t1".into(),
                scopes: vec!["openid".into(), "app!t1.Read".into(), "app!t1.Admin".into()],
                ..Default::default()
            },
            OAuthClient {
                client_id: "other-zone".into(),
                client_secret: "s".into(),
                tenant_id: "zone-b".into(),
                xsappname: "b!t2".into(),
                ..Default::default()
            },
        ],
        users: vec![User {
            username: "carol".into(),
            user_id: "carol-id".into(),
            email: "carol@example.com".into(),
            tenant_id: "zone-a".into(),
            scopes: Some(vec!["app!t1.Admin".into()]),
            ..Default::default()
        }],
        public_url: "http://127.0.0.1:1".into(),
        uaadomain: "127.0.0.1:2".into(),
        ..Default::default()
    })
    .unwrap()
}

fn assertion(signer: &SamlSigner, name: &str, audience: &str, groups: &[&str]) -> String {
    let attrs = vec![
        ("email".to_owned(), vec![format!("{name}@example.com")]),
        ("Groups".to_owned(), groups.iter().map(|g| (*g).to_owned()).collect()),
    ];
    signer
        .sign_assertion(&Assertion {
            issuer: "ferry-destination",
            name_id: name,
            name_id_format: NAMEID_UNSPECIFIED,
            name_qualifier: None,
            recipient: ENDPOINT,
            audience,
            authn_context_class_ref: "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession",
            attributes: &attrs,
            now: now(),
            validity_secs: 300,
            include_certificate: false,
        })
        .unwrap()
}

async fn grant(router: &Router, client: &str, assertion_param: &str) -> (StatusCode, Value) {
    let body = format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Asaml2-bearer&client_id={client}&client_secret=s&assertion={assertion_param}"
    );
    let req = Request::post("/oauth/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn b64url(xml: &str) -> String {
    URL_SAFE_NO_PAD.encode(xml)
}

#[tokio::test]
async fn trusted_assertions_become_user_tokens() {
    let svc = service();
    let router = svc.router();
    let idp = SamlSigner::generate("destination service").unwrap();
    let xml = assertion(&idp, "dave", ENDPOINT, &["$XSAPPNAME.Read"]);

    // Not trusted yet.
    let (st, v) = grant(&router, "app", &b64url(&xml)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(v["error_description"].as_str().unwrap().contains("trusts no SAML identity provider"), "{v}");

    assert!(matches!(
        svc.trust_saml_idp("nowhere", TrustedCertificate::from_der(idp.certificate_der()).unwrap()),
        Err(TokenError::UnknownTenant(_))
    ));
    svc.trust_saml_idp("zone-a", TrustedCertificate::from_pem(&idp.certificate_pem()).unwrap()).unwrap();
    let (st, v) = grant(&router, "app", &b64url(&xml)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let claims = svc.verifier().verify(v["access_token"].as_str().unwrap()).await.unwrap();
    assert_eq!(claims.zid, "zone-a");
    assert_eq!(claims.user_name.as_deref(), Some("dave"));
    assert_eq!(claims.email.as_deref(), Some("dave@example.com"));
    assert_eq!(claims.grant_type.as_deref(), Some("urn:ietf:params:oauth:grant-type:saml2-bearer"));
    // Groups grant scopes the way a configured user's scope list does.
    assert_eq!(claims.scope, ["openid", "app!t1.Read"]);
    let dave_id = claims.user_id.clone().unwrap();

    // Each assertion is good for one token.
    let (st, v) = grant(&router, "app", &b64url(&xml)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(v["error_description"].as_str().unwrap().contains("already used"), "{v}");

    // Padded standard base64 is accepted too; the same NameID is the same user.
    let xml = assertion(&idp, "dave", ENDPOINT, &["$XSAPPNAME.Read"]);
    let (st, v) = grant(&router, "app", &STANDARD.encode(&xml).replace('+', "%2B").replace('=', "%3D")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let again = svc.verifier().verify(v["access_token"].as_str().unwrap()).await.unwrap();
    assert_eq!(again.user_id.unwrap(), dave_id);

    // A configured user keeps its own id and scopes, whatever Groups the assertion names.
    let xml = assertion(&idp, "carol", ENDPOINT, &["$XSAPPNAME.Read"]);
    let (st, v) = grant(&router, "app", &b64url(&xml)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let claims = svc.verifier().verify(v["access_token"].as_str().unwrap()).await.unwrap();
    assert_eq!(claims.user_id.as_deref(), Some("carol-id"));
    assert_eq!(claims.scope, ["openid", "app!t1.Admin"]);
}

#[tokio::test]
async fn untrusted_changed_wrapped_or_misaddressed_assertions_are_refused() {
    let svc = service();
    let router = svc.router();
    let idp = SamlSigner::generate("destination service").unwrap();
    svc.trust_saml_idp("zone-a", TrustedCertificate::from_der(idp.certificate_der()).unwrap()).unwrap();
    let stranger = SamlSigner::generate("stranger").unwrap();
    let good = assertion(&idp, "dave", ENDPOINT, &[]);
    let ns = "xmlns:saml=\"urn:oasis:names:tc:SAML:2.0:assertion\"";
    let wrapped = format!(
        "<saml:Assertion {ns} ID=\"_w\" IssueInstant=\"2030-01-01T00:00:00Z\" Version=\"2.0\">\
         <saml:Issuer>ferry-destination</saml:Issuer><saml:Subject><saml:NameID>carol</saml:NameID></saml:Subject>{}\
         </saml:Assertion>",
        good.replace(&format!(" {ns}"), "")
    );
    let cases = [
        ("another key", assertion(&stranger, "dave", ENDPOINT, &[]), "trusted identity provider"),
        ("changed", good.replace(">dave<", ">carol<"), "digest"),
        ("wrapped", wrapped, "signature"),
        ("other audience", assertion(&idp, "dave", "https://elsewhere/oauth/token", &[]), "audience"),
        ("dtd", format!("<!DOCTYPE x>{good}"), "DTD"),
    ];
    for (what, xml, says) in cases {
        let (st, v) = grant(&router, "app", &b64url(&xml)).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{what}: {v}");
        assert_eq!(v["error"], "invalid_grant", "{what}");
        assert!(v["error_description"].as_str().unwrap().contains(says), "{what}: {v}");
    }
    let (st, v) = grant(&router, "app", "not base64!").await;
    assert_eq!((st, v["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    // Trust is per zone: a client of zone-b cannot use zone-a's identity provider.
    let (st, v) = grant(&router, "other-zone", &b64url(&good)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
}
