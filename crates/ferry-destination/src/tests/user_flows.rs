//! Token flows on behalf of a user or with caller-supplied grants (SPEC §2.1): the exact form
//! the remote token endpoint receives, where the user and tenant come from, and that tokens
//! are cached per user.

use axum::http::{Method, StatusCode};
use ferry_auth::KeySet;
use serde_json::{Value, json};

use super::{Env, FerryTokens, TokenServer, V1, now_secs};
use crate::tokens::GRANT_JWT_BEARER;

fn dest(name: &str, auth: &str, token_url: &str) -> Value {
    json!({
        "Name": name, "Type": "HTTP", "URL": "https://backend.example", "ProxyType": "Internet",
        "Authentication": auth, "tokenServiceURL": token_url,
        "clientId": "remote-client", "clientSecret": "remote-secret"
    })
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// A user token as XSUAA issues it after a login in zone `zid`.
fn user_token(env: &Env, zid: &str, user: &str, exp_offset: u64) -> String {
    env.token_with(json!({
        "zid": zid, "client_id": "sb-app!t1", "cid": "sb-app!t1", "exp": now_secs() + 600 + exp_offset,
        "grant_type": "password", "user_name": user, "user_id": format!("id-{user}"), "sub": format!("id-{user}"),
        "iss": format!("http://{zid}-sub.localhost:8080/oauth/token"),
        "ext_attr": {"enhancer": "XSUAA", "zdn": format!("{zid}-user")}
    }))
}

#[tokio::test]
async fn jwt_bearer_sends_the_user_token_as_assertion() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    remote.answer(
        StatusCode::OK,
        json!({"access_token": "user-tok", "token_type": "bearer", "expires_in": 3600, "refresh_token": "rt-1"}),
    );
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", dest("jb", "OAuth2JWTBearer", &remote.url("/oauth/token"))).await;
    let alice = user_token(&env, "zone-1", "alice", 0);

    let r = env.find(&t, "jb", &[("X-user-token", &alice)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json["authTokens"],
        json!([{
            "type": "Bearer", "value": "user-tok",
            "http_header": {"key": "Authorization", "value": "Bearer user-tok"},
            "expires_in": "3600", "refresh_token": "rt-1"
        }])
    );
    let call = remote.calls().pop().unwrap();
    assert_eq!(
        call.form,
        pairs(&[
            ("grant_type", GRANT_JWT_BEARER),
            ("assertion", &alice),
            ("client_id", "remote-client"),
            ("client_secret", "remote-secret"),
        ])
    );
}

#[tokio::test]
async fn user_token_exchange_uses_the_bearer_user_and_its_tenant() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let t = env.token("zone-1", "client-1");
    let mut d = dest("ute", "OAuth2UserTokenExchange", &remote.url("/t/{tenant}/oauth/token"));
    d["tokenServiceURLType"] = json!("Common");
    env.create(&t, "subaccount", d).await;

    // The user's own token as Authorization (SDK case 1): it is the assertion, and its
    // subdomain is the tenant.
    let alice = user_token(&env, "zone-1", "alice", 0);
    let r = env.find(&alice, "ute", &[]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "remote-token-1", "{}", r.text);
    let call = remote.calls().pop().unwrap();
    assert_eq!(call.path, "/t/zone-1-user/oauth/token");
    assert_eq!(call.form("grant_type"), Some(GRANT_JWT_BEARER));
    assert_eq!(call.form("assertion"), Some(alice.as_str()));

    // X-user-token wins over a user token in Authorization, for the user and the tenant.
    let bob = user_token(&env, "zone-2", "bob", 0);
    let r = env.find(&alice, "ute", &[("X-user-token", &bob)]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "remote-token-1", "{}", r.text);
    let call = remote.calls().pop().unwrap();
    assert_eq!(call.path, "/t/zone-2-user/oauth/token");
    assert_eq!(call.form("assertion"), Some(bob.as_str()));
}

#[tokio::test]
async fn user_tokens_are_cached_per_user_never_across_users() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", dest("jb", "OAuth2JWTBearer", &remote.url("/oauth/token"))).await;

    remote.answer(StatusCode::OK, json!({"access_token": "for-alice", "expires_in": 3600}));
    let alice = user_token(&env, "zone-1", "alice", 0);
    let r = env.find(&t, "jb", &[("X-user-token", &alice)]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "for-alice");

    // Another user never gets alice's token.
    remote.answer(StatusCode::OK, json!({"access_token": "for-bob", "expires_in": 3600}));
    let bob = user_token(&env, "zone-1", "bob", 0);
    let r = env.find(&t, "jb", &[("X-user-token", &bob)]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "for-bob");
    assert_eq!(remote.count(), 2);

    // Alice with a new JWT of hers: her cached token, no remote call.
    let alice_again = user_token(&env, "zone-1", "alice", 5);
    assert_ne!(alice, alice_again);
    let r = env.find(&t, "jb", &[("X-user-token", &alice_again)]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "for-alice");
    assert_eq!(remote.count(), 2);

    // The same user id in another zone is another user.
    remote.answer(StatusCode::OK, json!({"access_token": "for-alice-zone-2", "expires_in": 3600}));
    let other_zone = user_token(&env, "zone-2", "alice", 0);
    let r = env.find(&t, "jb", &[("X-user-token", &other_zone)]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "for-alice-zone-2");
    assert_eq!(remote.count(), 3);
}

#[tokio::test]
async fn user_flows_without_a_usable_user_token_fail_the_token_not_the_call() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", dest("jb", "OAuth2JWTBearer", &remote.url("/oauth/token"))).await;

    let r = env.find(&t, "jb", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["authTokens"][0]["type"], "");
    assert!(r.json["authTokens"][0]["error"].as_str().unwrap().contains("X-user-token"), "{}", r.text);

    // Signed by a key the service does not trust.
    let stranger = KeySet::generate().unwrap();
    let forged = stranger
        .sign(&json!({"zid": "zone-1", "user_name": "alice", "user_id": "id-alice", "exp": now_secs() + 600}), &[])
        .unwrap();
    let r = env.find(&t, "jb", &[("X-user-token", &forged)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json["authTokens"][0]["error"].as_str().unwrap().contains("X-user-token was refused"), "{}", r.text);

    // A technical token is not a user's.
    let r = env.find(&t, "jb", &[("X-user-token", &t)]).await;
    assert!(r.json["authTokens"][0]["error"].as_str().unwrap().contains("not a user's token"), "{}", r.text);

    // X-user-token with X-tenant is a 400 (SPEC §1.4).
    let alice = user_token(&env, "zone-1", "alice", 0);
    let r = env.find(&t, "jb", &[("X-user-token", &alice), ("X-tenant", "x")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(remote.count(), 0);
}

#[tokio::test]
async fn refresh_token_grant() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    remote.answer(StatusCode::OK, json!({"access_token": "fresh", "expires_in": 600, "refresh_token": "rt-2"}));
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", dest("rt", "OAuth2RefreshToken", &remote.url("/oauth/token"))).await;

    let r = env.find(&t, "rt", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("X-refresh-token"), "{}", r.text);
    // The SDK's first call skips token retrieval, so it needs no header.
    let r =
        env.call_raw(Method::GET, &format!("{V1}/destinations/rt?$skipTokenRetrieval=true"), Some(&t), None, &[]).await;
    assert_eq!(r.status, StatusCode::OK);

    let r = env.find(&t, "rt", &[("X-refresh-token", "rt-1")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["authTokens"][0]["value"], "fresh");
    assert_eq!(r.json["authTokens"][0]["refresh_token"], "rt-2");
    let call = remote.calls().pop().unwrap();
    assert_eq!(
        call.form,
        pairs(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", "rt-1"),
            ("client_id", "remote-client"),
            ("client_secret", "remote-secret"),
        ])
    );
}

#[tokio::test]
async fn authorization_code_grant() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", dest("ac", "OAuth2AuthorizationCode", &remote.url("/oauth/token"))).await;

    let r = env.find(&t, "ac", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("X-code"), "{}", r.text);

    let r = env
        .find(&t, "ac", &[("X-code", "c-1"), ("X-redirect-uri", "https://app/cb"), ("X-code-verifier", "v-1")])
        .await;
    assert_eq!(r.json["authTokens"][0]["value"], "remote-token-1", "{}", r.text);
    let call = remote.calls().pop().unwrap();
    assert_eq!(
        call.form,
        pairs(&[
            ("grant_type", "authorization_code"),
            ("code", "c-1"),
            ("redirect_uri", "https://app/cb"),
            ("code_verifier", "v-1"),
            ("client_id", "remote-client"),
            ("client_secret", "remote-secret"),
        ])
    );
    let r = env.find(&t, "ac", &[("X-code", "c-2")]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "remote-token-1", "{}", r.text);
    let call = remote.calls().pop().unwrap();
    assert_eq!(call.form("code"), Some("c-2"));
    assert_eq!(call.form("redirect_uri"), None);
    assert_eq!(call.form("code_verifier"), None);
}

#[tokio::test]
async fn technical_user_propagation_uses_its_own_header_and_the_internet() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let t = env.token("zone-1", "client-1");
    let mut d = dest("tu", "OAuth2TechnicalUserPropagation", &remote.url("/oauth/token"));
    d["ProxyType"] = json!("OnPremise");
    env.create(&t, "subaccount", d).await;

    let r = env.find(&t, "tu", &[]).await;
    assert_eq!(
        r.json["authTokens"][0]["http_header"],
        json!({"key": "SAP-Connectivity-Technical-Authentication", "value": "Bearer remote-token-1"}),
        "{}",
        r.text
    );
    let call = remote.calls().pop().unwrap();
    assert_eq!(
        call.form,
        pairs(&[
            ("grant_type", "client_credentials"),
            ("client_id", "remote-client"),
            ("client_secret", "remote-secret")
        ])
    );
}

/// OAuth2JWTBearer against Ferry's own token service: the user token it issued is exchanged,
/// and the token that comes back verifies as that user's.
#[tokio::test]
async fn jwt_bearer_against_ferrys_token_service() {
    let FerryTokens { env, ts, verifier, token_url, service_token, shutdown } = FerryTokens::start().await;
    const ZONE: &str = FerryTokens::ZONE;
    let mut d = dest("jb", "OAuth2JWTBearer", &token_url);
    d["clientId"] = json!("sb-app");
    d["clientSecret"] = json!("app-secret");
    env.create(&service_token, "subaccount", d).await;

    let alice = ts.issue_user_token("alice", "sb-app").unwrap();
    let r = env.find(&service_token, "jb", &[("X-user-token", &alice)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.json["authTokens"][0].get("error").is_none(), "{}", r.text);
    let exchanged = r.json["authTokens"][0]["value"].as_str().unwrap();
    assert_ne!(exchanged, alice);
    let claims = verifier.verify(exchanged).await.unwrap();
    assert_eq!(claims.user_name.as_deref(), Some("alice"));
    assert_eq!(claims.zid, ZONE);
    assert_eq!(claims.client_id.as_deref(), Some("sb-app"));
    assert_eq!(claims.grant_type.as_deref(), Some(GRANT_JWT_BEARER));
    shutdown.cancel();
}

#[tokio::test]
async fn caller_client_assertion_replaces_the_secret() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let t = env.token("zone-1", "client-1");
    env.create(&t, "subaccount", dest("ca", "OAuth2ClientCredentials", &remote.url("/oauth/token"))).await;
    let kind = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
    let r = env.find(&t, "ca", &[("X-client-assertion", "signed-jwt"), ("X-client-assertion-type", kind)]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "remote-token-1", "{}", r.text);
    let call = remote.calls().pop().unwrap();
    assert_eq!(
        call.form,
        pairs(&[
            ("grant_type", "client_credentials"),
            ("client_id", "remote-client"),
            ("client_assertion", "signed-jwt"),
            ("client_assertion_type", kind),
        ])
    );

    let r = env.find(&t, "ca", &[("X-client-assertion", "signed-jwt")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = env
        .find(
            &t,
            "ca",
            &[
                ("X-client-assertion", "a"),
                ("X-client-assertion-type", kind),
                ("X-client-assertion-destination-name", "p"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.error(),
        "Cannot mix header 'x-client-assertion-destination-name' with headers 'x-client-assertion' and 'x-client-assertion-type'"
    );
}

#[tokio::test]
async fn token_exchange_grant() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let at = "urn:ietf:params:oauth:token-type:access_token";
    remote.answer(StatusCode::OK, json!({"access_token": "exchanged", "expires_in": 600, "issued_token_type": at}));
    let t = env.token("zone-1", "client-1");
    // Common is ignored: the URL is taken as it is (SPEC §2.2).
    let mut d = dest("te", "OAuth2TokenExchange", &remote.url("/oauth/token"));
    d["tokenServiceURLType"] = json!("Common");
    env.create(&t, "subaccount", d).await;

    let r = env.find(&t, "te", &[("X-subject-token", "subj")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r =
        env.find(&t, "te", &[("X-subject-token", "subj"), ("X-subject-token-type", at), ("X-actor-token", "a")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let r = env
        .find(
            &t,
            "te",
            &[
                ("X-subject-token", "subj"),
                ("X-subject-token-type", at),
                ("X-actor-token", "act"),
                ("X-actor-token-type", at),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["authTokens"][0]["value"], "exchanged");
    assert_eq!(r.json["authTokens"][0]["issued_token_type"], at);
    let call = remote.calls().pop().unwrap();
    assert_eq!(call.path, "/oauth/token");
    assert_eq!(
        call.form,
        pairs(&[
            ("grant_type", crate::tokens::GRANT_TOKEN_EXCHANGE),
            ("subject_token", "subj"),
            ("subject_token_type", at),
            ("actor_token", "act"),
            ("actor_token_type", at),
            ("client_id", "remote-client"),
            ("client_secret", "remote-secret"),
        ])
    );
}

#[tokio::test]
async fn a_provider_destination_supplies_the_client_assertion() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let t = env.token("zone-1", "client-1");
    let kind = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
    let mut provider = dest("provider", "OAuth2ClientCredentials", &remote.url("/provider/token"));
    provider["clientAssertion.type"] = json!(kind);
    env.create(&t, "subaccount", provider).await;
    let mut consumer = dest("consumer", "OAuth2ClientCredentials", &remote.url("/oauth/token"));
    consumer["clientAssertion.destinationName"] = json!("provider");
    consumer.as_object_mut().unwrap().remove("clientSecret");
    env.create(&t, "subaccount", consumer).await;

    let r = env.find(&t, "consumer", &[]).await;
    assert!(r.json["authTokens"][0]["error"].is_null(), "{}", r.text);
    assert_eq!(r.json["authTokens"][0]["type"], "Bearer", "{}", r.text);
    let calls = remote.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].path, "/provider/token");
    assert_eq!(calls[1].path, "/oauth/token");
    assert_eq!(
        calls[1].form,
        pairs(&[
            ("grant_type", "client_credentials"),
            ("client_id", "remote-client"),
            ("client_assertion", "remote-token-1"),
            ("client_assertion_type", kind),
        ])
    );

    // The header names the provider for a consumer without the property.
    env.create(&t, "subaccount", dest("plain", "OAuth2ClientCredentials", &remote.url("/oauth/token"))).await;
    let r = env.find(&t, "plain", &[("X-client-assertion-destination-name", "provider")]).await;
    assert!(r.json["authTokens"][0]["error"].is_null(), "{}", r.text);
    let last = remote.calls().pop().unwrap();
    assert!(last.form.iter().any(|(k, v)| k == "client_assertion_type" && v == kind), "{:?}", last.form);

    // A provider without clientAssertion.type, or a missing one: the consumer's token fails and says why.
    env.create(&t, "subaccount", dest("not-a-provider", "OAuth2ClientCredentials", &remote.url("/x"))).await;
    for (name, why) in [("not-a-provider", "clientAssertion.type"), ("missing", "does not exist")] {
        let r = env.find(&t, "plain", &[("X-client-assertion-destination-name", name)]).await;
        assert_eq!(r.status, StatusCode::OK);
        let error = r.json["authTokens"][0]["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains(why), "{name}: {}", r.text);
    }
}

/// SPEC §1.6, §2.5: a destination in use as a client assertion provider is not deleted; the 400
/// names the destination that uses it.
#[tokio::test]
async fn an_assertion_provider_in_use_is_not_deleted() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let url = "https://token.example/oauth/token";
    let mut provider = dest("provider", "OAuth2ClientCredentials", url);
    provider["clientAssertion.type"] = json!("urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
    env.create(&t, "subaccount", provider.clone()).await;
    let mut consumer = dest("consumer", "OAuth2ClientCredentials", url);
    consumer["clientAssertion.destinationName"] = json!("provider");
    // An instance-level consumer reaches the subaccount's provider too.
    env.create(&t, "instance", consumer.clone()).await;
    let one = format!("{V1}/subaccountDestinations/provider");

    let r = env.call(Method::DELETE, &one, Some(&t), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(
        r.error(),
        "Cannot perform operation on the destination 'provider' because it is used as an assertion provider for \
         destination 'consumer'"
    );
    let bulk = format!("{V1}/subaccountDestinations?$filter=Name%20in%20('provider')");
    let r = env.call(Method::DELETE, &bulk, Some(&t), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.error().contains("'consumer'"), "{}", r.text);

    // With a provider of its own on the instance level, the consumer no longer uses the
    // subaccount's; that one goes, the instance's stays while in use.
    env.create(&t, "instance", provider).await;
    let r = env.call(Method::DELETE, &format!("{V1}/instanceDestinations/provider"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let r = env.call(Method::DELETE, &one, Some(&t), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // Deleted together with its consumer, a provider may go.
    let both = format!("{V1}/instanceDestinations?$filter=Name%20in%20('provider','consumer')");
    let r = env.call(Method::DELETE, &both, Some(&t), None).await;
    assert_eq!(r.json["Count"], 2, "{}", r.text);
}
