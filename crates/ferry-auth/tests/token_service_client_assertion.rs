//! Client authentication by a signed client assertion (RFC 7523 §2.2, OIDC `private_key_jwt`)
//! against the token service on a real socket: ES256 with the certificate of an X.509 service
//! key, RS256 with a registered JWKS or PEM public key, and every refusal a `401
//! invalid_client` that says what is wrong. Time moves by a `ManualClock`, never by sleeping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ferry_auth::KeySet;
use ferry_auth::token_service::{
    CertificateBinding, ConfigError, FederatedAssertion, Listeners, MAX_CLIENT_ASSERTION_LIFETIME_SECS, ManualClock,
    OAuthClient, Tenant, TokenService, TokenServiceConfig, run,
};
use ferry_core::tls::LocalCa;
use serde_json::{Value, json};

const ZONE: &str = "6a8b7c4e-0000-4000-8000-000000000001";
const X509: &str = "sb-x509!b7";
const JWKS: &str = "sb-jwks!b8";
const PEM: &str = "sb-pem!b9";
const SECRET_ONLY: &str = "sb-secret!b1";
/// Trusts tokens of [`IDP`] about [`WORKLOAD`] as its client assertions.
const FEDERATED: &str = "sb-federated!b2";
const IDP: &str = "https://idp.example/oauth2/token";
const WORKLOAD: &str = "workload-1";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn client(id: &str) -> OAuthClient {
    OAuthClient {
        client_id: id.into(),
        tenant_id: ZONE.into(),
        xsappname: "app!t1".into(),
        authorities: vec!["uaa.resource".into()],
        ..Default::default()
    }
}

struct Env {
    svc: Arc<TokenService>,
    clock: Arc<ManualClock>,
    token_url: String,
    /// The ES256 key of the X.509 service key issued to [`X509`].
    x509_key: EcdsaKeyPair,
    /// The RS256 keys registered for [`JWKS`] (as a JWKS) and [`PEM`] (as a PEM public key).
    rsa: Arc<KeySet>,
    /// The keys of [`IDP`].
    idp: KeySet,
    http: reqwest::Client,
    shutdown: ferry_core::Shutdown,
}

impl Env {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ca = LocalCa::generate("assertion test ca").unwrap();
        let rsa = Arc::new(KeySet::generate().unwrap());
        let jwks = serde_json::to_string(&rsa.jwks()).unwrap();
        let pem = rsa.jwks().keys[0].public_key_pem().unwrap();
        let idp = KeySet::generate().unwrap();
        let federated = FederatedAssertion {
            issuer: IDP.into(),
            subject: WORKLOAD.into(),
            audience: None,
            keys: serde_json::to_string(&idp.jwks()).unwrap(),
        };
        let config = TokenServiceConfig {
            tenants: vec![Tenant {
                id: ZONE.into(),
                subdomain: "provider".into(),
                keys: Arc::new(KeySet::generate().unwrap()),
            }],
            clients: vec![
                OAuthClient { certificates: vec![CertificateBinding::issued_by(&ca, X509).unwrap()], ..client(X509) },
                OAuthClient { assertion_keys: vec![jwks], ..client(JWKS) },
                OAuthClient { assertion_keys: vec![pem], ..client(PEM) },
                OAuthClient { client_secret: "s3cret".into(), ..client(SECRET_ONLY) },
                OAuthClient { federated_assertions: vec![federated], ..client(FEDERATED) },
            ],
            public_url: format!("http://{addr}"),
            uaadomain: "127.0.0.1:1".into(),
            ..Default::default()
        };
        let clock = Arc::new(ManualClock::starting_now());
        let svc = TokenService::with_clock(config, clock.clone()).unwrap();
        let cert = svc.issue_client_certificate(&ca, X509, Duration::from_secs(3600)).unwrap();
        let der = rcgen::KeyPair::from_pem(cert.key_pem.expose()).unwrap().serialize_der();
        let x509_key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der).unwrap();
        let shutdown = ferry_core::Shutdown::new();
        tokio::spawn(run(svc.clone(), Listeners { http: Some(listener), https: None }, shutdown.clone()));
        Self {
            svc,
            clock,
            token_url: format!("http://{addr}/oauth/token"),
            x509_key,
            rsa,
            idp,
            http: reqwest::Client::new(),
            shutdown,
        }
    }

    fn now(&self) -> u64 {
        use ferry_auth::token_service::Clock;
        self.clock.now_secs()
    }

    /// Claims a well-behaved client signs: iss = sub = client_id, aud = the token endpoint,
    /// a minute of validity and a fresh jti.
    fn claims(&self, client_id: &str) -> Value {
        json!({
            "iss": client_id, "sub": client_id, "aud": self.token_url,
            "iat": self.now(), "exp": self.now() + 60, "jti": uuid::Uuid::new_v4().to_string(),
        })
    }

    fn es256(&self, claims: &Value) -> String {
        let input = signing_input(&json!({"alg": "ES256", "typ": "JWT"}), claims);
        let sig = self.x509_key.sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", B64URL.encode(sig.as_ref()))
    }

    fn rs256(&self, claims: &Value) -> String {
        self.rsa.sign(claims, &[]).unwrap()
    }

    async fn token(&self, extra: &[(&str, &str)]) -> (u16, Value) {
        let mut pairs = vec![("grant_type", "client_credentials")];
        pairs.extend_from_slice(extra);
        let body: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
        let resp = self
            .http
            .post(&self.token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }

    async fn assert_with(&self, assertion: &str) -> (u16, Value) {
        self.token(&[("client_assertion_type", JWT_BEARER), ("client_assertion", assertion)]).await
    }

    /// A refused assertion: 401 invalid_client whose description contains `why`.
    async fn refused(&self, assertion: &str, why: &str) {
        let (status, body) = self.assert_with(assertion).await;
        assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")), "{why}: {body}");
        let d = body["error_description"].as_str().unwrap();
        assert!(d.contains(why), "want {why:?} in {d:?}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn signing_input(header: &Value, claims: &Value) -> String {
    let enc = |v: &Value| B64URL.encode(serde_json::to_vec(v).unwrap());
    format!("{}.{}", enc(header), enc(claims))
}

fn payload(jwt: &str) -> Value {
    serde_json::from_slice(&B64URL.decode(jwt.split('.').nth(1).unwrap()).unwrap()).unwrap()
}

#[tokio::test]
async fn signed_assertions_authenticate_each_registered_key_kind() {
    let env = Env::start().await;
    // ES256 with the key of the X.509 service key, client_id in the body as well.
    let assertion = env.es256(&env.claims(X509));
    let (status, body) = env
        .token(&[("client_id", X509), ("client_assertion_type", JWT_BEARER), ("client_assertion", &assertion)])
        .await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap();
    let verified = env.svc.verifier().verify(token).await.unwrap();
    assert_eq!(verified.client_id.as_deref(), Some(X509));
    assert_eq!(payload(token)["grant_type"], "client_credentials");

    // RS256 with a registered JWKS and with a PEM public key; the issuer as audience works too.
    for id in [JWKS, PEM] {
        let (status, body) = env.assert_with(&env.rs256(&env.claims(id))).await;
        assert_eq!(status, 200, "{id}: {body}");
        assert_eq!(payload(body["access_token"].as_str().unwrap())["client_id"], id);
    }
    let mut to_issuer = env.claims(JWKS);
    to_issuer["aud"] = json!([env.token_url.trim_end_matches("/oauth/token")]);
    let (status, body) = env.assert_with(&env.rs256(&to_issuer)).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn bad_assertions_are_invalid_client_saying_why() {
    let env = Env::start().await;

    // Signed by a key the client never registered; by a key of the wrong type for the client.
    let stranger = KeySet::generate().unwrap();
    env.refused(&stranger.sign(&env.claims(JWKS), &[]).unwrap(), "signature does not verify").await;
    env.refused(&env.rs256(&env.claims(X509)), "RS256 or ES256").await;
    // A changed payload under a valid signature.
    let good = env.rs256(&env.claims(JWKS));
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let mut forged = env.claims(JWKS);
    forged["exp"] = json!(env.now() + 300);
    parts[1] = B64URL.encode(serde_json::to_vec(&forged).unwrap());
    env.refused(&parts.join("."), "signature does not verify").await;

    // Wrong audience.
    let mut c = env.claims(JWKS);
    c["aud"] = json!("https://elsewhere.example/oauth/token");
    env.refused(&env.rs256(&c), "aud").await;

    // Expired: signed for a minute, presented after the minute and the leeway.
    let late = env.rs256(&env.claims(JWKS));
    env.clock.advance(Duration::from_secs(60 + 31));
    env.refused(&late, "expired").await;
    // Too long-lived to be an assertion.
    let mut c = env.claims(JWKS);
    c["exp"] = json!(env.now() + MAX_CLIENT_ASSERTION_LIFETIME_SECS + 3600);
    env.refused(&env.rs256(&c), "expires too late").await;

    // Replay: the same jti is good once.
    let once = env.es256(&env.claims(X509));
    assert_eq!(env.assert_with(&once).await.0, 200);
    env.refused(&once, "used before").await;
    let mut no_jti = env.claims(X509);
    no_jti.as_object_mut().unwrap().remove("jti");
    env.refused(&env.es256(&no_jti), "jti").await;

    // iss and sub must both be the client.
    let mut c = env.claims(JWKS);
    c["sub"] = json!("someone-else");
    env.refused(&env.rs256(&c), "sub must be the client_id").await;
    let (status, body) = env
        .token(&[
            ("client_id", PEM),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", &env.rs256(&env.claims(JWKS))),
        ])
        .await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")), "{body}");

    // alg none and HS256 (keyed with the public key, the classic confusion) are never accepted.
    let claims = env.claims(JWKS);
    env.refused(&format!("{}.", signing_input(&json!({"alg": "none"}), &claims)), "RS256 or ES256").await;
    let input = signing_input(&json!({"alg": "HS256", "typ": "JWT"}), &claims);
    let pem = env.rsa.jwks().keys[0].public_key_pem().unwrap();
    let tag = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, pem.as_bytes()),
        input.as_bytes(),
    );
    env.refused(&format!("{input}.{}", B64URL.encode(tag.as_ref())), "RS256 or ES256").await;

    // A client without registered keys; an unknown client; not a JWT.
    env.refused(&env.rs256(&env.claims(SECRET_ONLY)), "no key registered").await;
    env.refused(&env.rs256(&env.claims("sb-nobody")), "Bad credentials").await;
    env.refused("not-a-jwt", "not a well-formed JWT").await;

    // SAML client assertions are not supported; a half request or a secret besides is a 400.
    let (status, body) = env
        .token(&[
            ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:saml2-bearer"),
            ("client_assertion", "x"),
        ])
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error_description"].as_str().unwrap().contains("not supported"), "{body}");
    let (status, body) = env.token(&[("client_assertion", &env.rs256(&env.claims(JWKS)))]).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_request")), "{body}");
    let (status, body) = env
        .token(&[
            ("client_id", SECRET_ONLY),
            ("client_secret", "s3cret"),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", &env.rs256(&env.claims(JWKS))),
        ])
        .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_request")), "{body}");
}

#[test]
fn unusable_assertion_keys_are_configuration_errors() {
    for (key, why) in [
        ("not a key", "no key found"),
        ("{\"kty\":\"oct\",\"k\":\"c2VjcmV0\"}", "no RSA or EC P-256"),
        ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "no public key"),
    ] {
        let config = TokenServiceConfig {
            tenants: vec![Tenant {
                id: ZONE.into(),
                subdomain: "p".into(),
                keys: Arc::new(KeySet::generate().unwrap()),
            }],
            clients: vec![OAuthClient { assertion_keys: vec![key.into()], ..client("c") }],
            public_url: "http://127.0.0.1:1".into(),
            uaadomain: "127.0.0.1:1".into(),
            ..Default::default()
        };
        match TokenService::new(config) {
            Err(ConfigError::InvalidAssertionKey { reason, .. }) => assert!(reason.contains(why), "{key}: {reason}"),
            other => panic!("{key}: {other:?}"),
        }
    }
}

/// Workload identity federation: a token another issuer made about a trusted subject, meant for
/// the client, authenticates it when sent with its client_id.
#[tokio::test]
async fn tokens_of_a_trusted_issuer_authenticate_as_federated_assertions() {
    let env = Env::start().await;
    let idp_token = |sub: &str, aud: &str| {
        let claims = json!({
            "iss": IDP, "sub": sub, "aud": [aud], "exp": env.now() + 300,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        env.idp.sign(&claims, &[]).unwrap()
    };
    let with_id = |assertion: String| {
        let env = &env;
        async move {
            env.token(&[
                ("client_id", FEDERATED),
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", &assertion),
            ])
            .await
        }
    };
    let federated = idp_token(WORKLOAD, FEDERATED);
    let (status, body) = with_id(federated.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(payload(body["access_token"].as_str().unwrap())["client_id"], FEDERATED);
    // An access token of another service is reused by its holder until it expires.
    assert_eq!(with_id(federated.clone()).await.0, 200);
    env.clock.advance(Duration::from_secs(300 + 31));
    let (status, body) = with_id(federated).await;
    assert!(body["error_description"].as_str().unwrap().contains("expired"), "{status} {body}");

    let stranger = KeySet::generate().unwrap();
    let strange = json!({"iss": IDP, "sub": WORKLOAD, "aud": FEDERATED, "exp": env.now() + 60, "jti": "j"});
    for (assertion, why) in [
        (idp_token("workload-2", FEDERATED), "is not a subject"),
        (idp_token(WORKLOAD, "someone-else"), "aud"),
        (stranger.sign(&strange, &[]).unwrap(), "signature does not verify"),
    ] {
        let (status, body) = with_id(assertion).await;
        assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")), "{why}: {body}");
        assert!(body["error_description"].as_str().unwrap().contains(why), "{why}: {body}");
    }
    // Without client_id the issuer is taken for the client, which does not exist.
    env.refused(&idp_token(WORKLOAD, FEDERATED), "Bad credentials").await;
    // Another client does not trust the issuer.
    let assertion = idp_token(WORKLOAD, JWKS);
    let (status, body) = env
        .token(&[("client_id", JWKS), ("client_assertion_type", JWT_BEARER), ("client_assertion", &assertion)])
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error_description"].as_str().unwrap().contains("nor an issuer the client trusts"), "{body}");
}
