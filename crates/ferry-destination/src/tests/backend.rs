//! Each authentication type end to end, as an application uses a destination: the Destination
//! Service runs the flow against Ferry's real token service on a socket, and the header it hands
//! out is then sent to a backend on a socket that checks it — a JWT against the keys the token
//! service publishes at `/token_keys` (fetched over HTTP, as any resource server does), Basic
//! credentials against the backend's own user. A token that merely came back proves nothing;
//! one the backend accepts does.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, Method, StatusCode};
use base64::Engine;
use ferry_auth::token_service::{
    self, FederatedAssertion, Listeners, OAuthClient, Tenant, TokenService, TokenServiceConfig, User,
};
use ferry_auth::{KeySet, TrustedIssuer, Verifier};
use ferry_core::tls::{CertifiedKey, LocalCa};
use serde_json::{Value, json};

use super::{Env, V1, config};
use crate::{DatabaseConfig, DestinationService};

const ZONE: &str = "6a8b7c4e-0000-4000-8000-000000000001";
const CALLBACK: &str = "https://app.example/callback";
/// RFC 7636 appendix B.
const PKCE_VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const PKCE_CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
const BACKEND_USER: &str = "backend-user";
const BACKEND_PASSWORD: &str = "backend:pw";
/// The header a Connectivity Proxy turns into the backend's `Authorization` (SPEC §2.1).
const TECHNICAL_HEADER: &str = "SAP-Connectivity-Technical-Authentication";
const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// A client whose access tokens serve as client assertions of [`ASSERTION_CONSUMER`] (SPEC §2.5,
/// an assertion provider destination): short-lived, and meant for the consumer by its scope.
const ASSERTION_PROVIDER: &str = "sb-assertion-provider";
/// A client without a secret that trusts [`ASSERTION_PROVIDER`]'s tokens as its client assertions.
const ASSERTION_CONSUMER: &str = "sb-assertion-consumer";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Ferry's token service (HTTP, and HTTPS that asks for client certificates of `ca`), a
/// Destination Service that trusts it, and a backend that checks what the destinations yield.
struct Stack {
    env: Env,
    ts: Arc<TokenService>,
    base: String,
    https_base: String,
    app_cert: CertifiedKey,
    ca_pem: String,
    service_token: String,
    backend: String,
    http: reqwest::Client,
    shutdown: ferry_core::Shutdown,
}

impl Stack {
    async fn start() -> Self {
        let ca = LocalCa::generate("backend test ca").unwrap();
        let http_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let https_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, https_addr) = (http_l.local_addr().unwrap(), https_l.local_addr().unwrap());
        let client = |id: &str, secret: &str| OAuthClient {
            client_id: id.into(),
            client_secret: secret.into(),
            tenant_id: ZONE.into(),
            xsappname: format!("{id}-app"),
            authorities: vec!["uaa.resource".into()],
            scopes: vec!["openid".into()],
            redirect_uris: vec![CALLBACK.into()],
            ..Default::default()
        };
        let zone_keys = Arc::new(KeySet::generate().unwrap());
        // The consumer trusts the zone's own tokens about the provider client, addressed to it.
        let federated = FederatedAssertion {
            issuer: format!("http://{addr}/oauth/token"),
            subject: ASSERTION_PROVIDER.into(),
            audience: None,
            keys: serde_json::to_string(&zone_keys.jwks()).unwrap(),
        };
        let ts = TokenService::new(TokenServiceConfig {
            tenants: vec![Tenant { id: ZONE.into(), subdomain: "provider".into(), keys: zone_keys }],
            clients: vec![
                OAuthClient { service_instance_id: Some("inst-1".into()), ..client("sb-dest", "dest-secret") },
                client("sb-app", "app-secret"),
                OAuthClient {
                    authorities: vec![format!("{ASSERTION_CONSUMER}.assertion")],
                    access_token_validity: Some(Duration::from_secs(300)),
                    ..client(ASSERTION_PROVIDER, "provider-secret")
                },
                OAuthClient { federated_assertions: vec![federated], ..client(ASSERTION_CONSUMER, "") },
            ],
            users: vec![User {
                username: "alice".into(),
                password: "alice-pw".to_owned().into(),
                email: "alice@example.com".into(),
                user_id: "u-alice".into(),
                tenant_id: ZONE.into(),
                ..Default::default()
            }],
            public_url: format!("http://{addr}"),
            uaadomain: format!("{addr}"),
            ..Default::default()
        })
        .unwrap();
        let app_cert = ts.issue_client_certificate(&ca, "sb-app", Duration::from_secs(3600)).unwrap();
        let server_cert = ca.issue_server_cert(&["127.0.0.1"]).unwrap();
        let tls = token_service::https_server_config(&server_cert, Some(ca.cert_pem())).unwrap();
        let shutdown = ferry_core::Shutdown::new();
        let listeners = Listeners { http: Some(http_l), https: Some((https_l, tls)) };
        tokio::spawn(token_service::run(ts.clone(), listeners, shutdown.clone()));

        let http = ferry_core::tls::http_client(None).unwrap();
        let mut cfg = config(DatabaseConfig::SqliteMemory, [9; 32]);
        cfg.token_service_ca_pem = Some(ca.cert_pem().to_owned());
        let service = DestinationService::open(cfg, Arc::new(ts.verifier()), http.clone()).await.unwrap();
        let zones = ts.clone();
        service.set_client_zones(Arc::new(move |client: &str| zones.client_tenant(client)));
        let env = Env {
            keys: Arc::new(KeySet::generate().unwrap()),
            router: service.router(),
            service,
            clock: super::ManualClock::new(),
        };

        let base = format!("http://{addr}");
        let backend =
            backend(Verifier::new(vec![TrustedIssuer::jwks_url(format!("{base}/token_keys"))], http.clone())).await;
        let mut stack = Self {
            env,
            ts,
            base,
            https_base: format!("https://{https_addr}"),
            app_cert,
            ca_pem: ca.cert_pem().to_owned(),
            service_token: String::new(),
            backend,
            http,
            shutdown,
        };
        let answer =
            stack.token(&[("grant_type", "client_credentials"), ("client_id", "sb-dest")], "dest-secret").await;
        stack.service_token = answer["access_token"].as_str().unwrap().to_owned();
        stack
    }

    fn token_url(&self) -> String {
        format!("{}/oauth/token", self.base)
    }

    /// A grant straight at the token service, as the application does before it has a
    /// destination to ask (a refresh token of its own login, say).
    async fn token(&self, form: &[(&str, &str)], secret: &str) -> Value {
        let client = form.iter().find(|(k, _)| *k == "client_id").unwrap().1;
        let r = self.http.post(self.token_url()).basic_auth(client, Some(secret)).form(form).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    /// What sb-app signs as its client assertion: for the token endpoint, a minute, once.
    fn assertion_claims(&self, client: &str) -> Value {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let mut jti = [0u8; 16];
        aws_lc_rs::rand::fill(&mut jti).unwrap();
        json!({"iss": client, "sub": client, "aud": self.token_url(), "iat": now, "exp": now + 60,
               "jti": hex::encode(jti)})
    }

    /// A client assertion of sb-app, signed (ES256) with the key of its X.509 service key.
    fn app_assertion(&self) -> String {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let pem = self.app_cert.key_pem.expose();
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der).unwrap();
        let enc = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
        let input =
            format!("{}.{}", enc(&json!({"alg": "ES256", "typ": "JWT"})), enc(&self.assertion_claims("sb-app")));
        let sig = key.sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    /// A call to the Destination Service with the service's own token.
    async fn call(&self, method: Method, uri: String, body: Option<Value>) -> super::Resp {
        self.env.call(method, &uri, Some(&self.service_token), body).await
    }

    /// Stores sb-app's certificate and key as the PEM keystore `app.pem`.
    async fn upload_app_keystore(&self) {
        let pem = format!("{}{}", self.app_cert.cert_pem, self.app_cert.key_pem.expose());
        let cert = json!({"Name": "app.pem", "Type": "PEM", "Content": b64(&pem)});
        let url = format!("{V1}/subaccountCertificates");
        let r = self.env.call(Method::POST, &url, Some(&self.service_token), Some(cert)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }

    /// A destination of `auth` with the token service and client `sb-app`, plus `extra`.
    async fn create(&self, name: &str, auth: &str, extra: Value) {
        let mut d = json!({
            "Name": name, "Type": "HTTP", "URL": self.backend, "ProxyType": "Internet",
            "Authentication": auth, "tokenServiceURL": self.token_url(), "tokenServiceURLType": "Dedicated",
            "clientId": "sb-app", "clientSecret": "app-secret"
        });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                d.as_object_mut().unwrap().remove(k);
            } else {
                d[k] = v.clone();
            }
        }
        self.env.create(&self.service_token, "subaccount", d).await;
    }

    /// Finds `name`, sends the header of its token to the destination's URL and returns what
    /// the backend says about the caller; panics on a failed token or a refusal.
    async fn use_at_backend(&self, name: &str, headers: &[(&str, &str)]) -> Value {
        let (status, body) = self.try_at_backend(name, headers).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn try_at_backend(&self, name: &str, headers: &[(&str, &str)]) -> (StatusCode, Value) {
        let r = self.env.find(&self.service_token, name, headers).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let token = &r.json["authTokens"][0];
        assert!(token.get("error").is_none(), "{}", r.text);
        let url = r.json["destinationConfiguration"]["URL"].as_str().unwrap();
        let header = &token["http_header"];
        let res = self
            .http
            .get(url)
            .header(header["key"].as_str().unwrap(), header["value"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        let status = res.status();
        (status, res.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A resource server on 127.0.0.1:0 that accepts a JWT the verifier accepts (in `Authorization`
/// or, behind a Connectivity Proxy, the technical-user header) or its own Basic credentials,
/// and answers who the caller is; 401 for anything else.
async fn backend(verifier: Verifier) -> String {
    let verifier = Arc::new(verifier);
    let app = Router::new().fallback(move |headers: HeaderMap| {
        let verifier = verifier.clone();
        async move {
            let refuse = |why: String| (StatusCode::UNAUTHORIZED, axum::Json(json!({ "error": why })));
            let value = headers
                .get("authorization")
                .or_else(|| headers.get(TECHNICAL_HEADER))
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if let Some(jwt) = value.strip_prefix("Bearer ") {
                return match verifier.verify(jwt).await {
                    Ok(c) => (
                        StatusCode::OK,
                        axum::Json(json!({
                            "user_name": c.user_name, "client_id": c.client_id, "grant_type": c.grant_type, "zid": c.zid
                        })),
                    ),
                    Err(e) => refuse(e.to_string()),
                };
            }
            if let Some(basic) = value.strip_prefix("Basic ")
                && basic == b64(&format!("{BACKEND_USER}:{BACKEND_PASSWORD}"))
            {
                return (StatusCode::OK, axum::Json(json!({ "user_name": BACKEND_USER })));
            }
            refuse(format!("no acceptable credentials in {value:?}"))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/api")
}

#[tokio::test]
async fn basic_authentication() {
    let s = Stack::start().await;
    let basic = |user: &str, password: &str| {
        json!({"Authentication": "BasicAuthentication", "User": user, "Password": password,
               "tokenServiceURL": null, "tokenServiceURLType": null, "clientId": null, "clientSecret": null})
    };
    s.create("basic", "BasicAuthentication", basic(BACKEND_USER, BACKEND_PASSWORD)).await;
    s.create("wrong", "BasicAuthentication", basic(BACKEND_USER, "not-it")).await;
    assert_eq!(s.use_at_backend("basic", &[]).await["user_name"], BACKEND_USER);
    // The backend checks: another password is refused.
    assert_eq!(s.try_at_backend("wrong", &[]).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn client_credentials() {
    let s = Stack::start().await;
    s.create("cc", "OAuth2ClientCredentials", json!({})).await;
    let who = s.use_at_backend("cc", &[]).await;
    assert_eq!(who, json!({"user_name": null, "client_id": "sb-app", "grant_type": "client_credentials", "zid": ZONE}));
    // The backend checks: a token of keys the token service never published is refused.
    let forged = KeySet::generate().unwrap().sign(&json!({"zid": ZONE, "client_id": "sb-app"}), &[]).unwrap();
    let r = s.http.get(&s.backend).bearer_auth(forged).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

/// mTLS (SPEC §2.5): the client authenticates with the certificate of
/// `tokenService.KeyStoreLocation` at the token service's HTTPS listener, no secret sent.
#[tokio::test]
async fn client_credentials_over_mtls() {
    let s = Stack::start().await;
    s.upload_app_keystore().await;
    let url = format!("{}/oauth/token", s.https_base);
    s.create(
        "mtls",
        "OAuth2ClientCredentials",
        json!({"tokenServiceURL": url, "clientSecret": null, "tokenService.KeyStoreLocation": "app.pem"}),
    )
    .await;
    let who = s.use_at_backend("mtls", &[]).await;
    // The token service's keystore stays with the service, unless the caller runs the flow.
    let find = |query: &'static str| s.call(Method::GET, format!("{V1}/destinations/mtls{query}"), None);
    assert!(find("").await.json.get("certificates").is_none());
    assert_eq!(find("?$skipTokenRetrieval=true").await.json["certificates"][0]["Name"], "app.pem");
    assert_eq!((who["client_id"].as_str(), who["grant_type"].as_str()), (Some("sb-app"), Some("client_credentials")));
    // Without the certificate the same client has nothing to authenticate with.
    s.create("no-cert", "OAuth2ClientCredentials", json!({"tokenServiceURL": url, "clientSecret": null})).await;
    let r = s.env.find(&s.service_token, "no-cert", &[]).await;
    assert!(r.json["authTokens"][0]["error"].as_str().is_some(), "{}", r.text);
}

/// SPEC §2.5: a client assertion instead of a secret, both ways SAP describes. The caller's own
/// (`X-client-assertion`): the application signs it (ES256) with the key of its X.509 service key,
/// whose certificate the token service knows. Service-fetched (`clientAssertion.destinationName`
/// or `X-client-assertion-destination-name`): the provider destination's access token is the
/// assertion, which the consumer client trusts by federation.
#[tokio::test]
async fn client_credentials_with_client_assertion() {
    let s = Stack::start().await;
    s.create("asserted", "OAuth2ClientCredentials", json!({"clientSecret": null})).await;
    let assertion = s.app_assertion();
    let headers = [("X-client-assertion", assertion.as_str()), ("X-client-assertion-type", JWT_BEARER_ASSERTION)];
    let who = s.use_at_backend("asserted", &headers).await;
    assert_eq!((who["client_id"].as_str(), who["grant_type"].as_str()), (Some("sb-app"), Some("client_credentials")));
    // The assertion was good for one token request: its token is not cached, so the replay
    // reaches the token service, which refuses the used jti.
    let r = s.env.find(&s.service_token, "asserted", &headers).await;
    let error = r.json["authTokens"][0]["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("invalid_client") && error.contains("used before"), "{}", r.text);
    // The token service checks: an assertion the application did not sign gets no token.
    let forged = KeySet::generate().unwrap().sign(&s.assertion_claims("sb-app"), &[]).unwrap();
    let headers = [("X-client-assertion", forged.as_str()), ("X-client-assertion-type", JWT_BEARER_ASSERTION)];
    let r = s.env.find(&s.service_token, "asserted", &headers).await;
    let error = r.json["authTokens"][0]["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("invalid_client"), "{}", r.text);

    s.create(
        "assertion-provider",
        "OAuth2ClientCredentials",
        json!({"clientId": ASSERTION_PROVIDER, "clientSecret": "provider-secret",
               "clientAssertion.type": JWT_BEARER_ASSERTION}),
    )
    .await;
    let consumer = json!({"clientId": ASSERTION_CONSUMER, "clientSecret": null});
    let mut by_property = consumer.clone();
    by_property["clientAssertion.destinationName"] = json!("assertion-provider");
    s.create("consumer", "OAuth2ClientCredentials", by_property).await;
    let who = s.use_at_backend("consumer", &[]).await;
    assert_eq!(
        (who["client_id"].as_str(), who["grant_type"].as_str()),
        (Some(ASSERTION_CONSUMER), Some("client_credentials"))
    );
    // The header names the provider for a consumer without the property. Its `scope` makes a
    // new token request, which presents the provider's cached token a second time.
    s.create(
        "consumer-by-header",
        "OAuth2ClientCredentials",
        json!({"clientId": ASSERTION_CONSUMER, "clientSecret": null, "scope": "uaa.resource"}),
    )
    .await;
    let who =
        s.use_at_backend("consumer-by-header", &[("X-client-assertion-destination-name", "assertion-provider")]).await;
    assert_eq!(who["client_id"], ASSERTION_CONSUMER);
    // Without an assertion the consumer has nothing to authenticate with.
    let r = s.env.find(&s.service_token, "consumer-by-header", &[]).await;
    assert!(r.json["authTokens"][0]["error"].as_str().is_some(), "{}", r.text);
}

#[tokio::test]
async fn password() {
    let s = Stack::start().await;
    s.create("pw", "OAuth2Password", json!({"User": "alice", "Password": "alice-pw"})).await;
    let who = s.use_at_backend("pw", &[]).await;
    assert_eq!((who["user_name"].as_str(), who["grant_type"].as_str()), (Some("alice"), Some("password")));
}

#[tokio::test]
async fn jwt_bearer_and_user_token_exchange() {
    let s = Stack::start().await;
    s.create("jb", "OAuth2JWTBearer", json!({})).await;
    s.create("ute", "OAuth2UserTokenExchange", json!({})).await;
    let alice = s.ts.issue_user_token("alice", "sb-app").unwrap();
    for name in ["jb", "ute"] {
        let who = s.use_at_backend(name, &[("X-user-token", &alice)]).await;
        assert_eq!(who["user_name"], "alice", "{name}");
        assert_eq!(who["grant_type"], crate::tokens::GRANT_JWT_BEARER, "{name}");
    }
}

#[tokio::test]
async fn token_exchange() {
    let s = Stack::start().await;
    s.create("te", "OAuth2TokenExchange", json!({})).await;
    let alice = s.ts.issue_user_token("alice", "sb-app").unwrap();
    let access = "urn:ietf:params:oauth:token-type:access_token";
    let who = s.use_at_backend("te", &[("X-subject-token", &alice), ("X-subject-token-type", access)]).await;
    assert_eq!(who["user_name"], "alice");
    assert_eq!(who["grant_type"], crate::tokens::GRANT_TOKEN_EXCHANGE);
}

#[tokio::test]
async fn refresh_token() {
    let s = Stack::start().await;
    let login = s
        .token(
            &[("grant_type", "password"), ("client_id", "sb-app"), ("username", "alice"), ("password", "alice-pw")],
            "app-secret",
        )
        .await;
    let refresh = login["refresh_token"].as_str().unwrap();
    s.create("rt", "OAuth2RefreshToken", json!({})).await;
    let who = s.use_at_backend("rt", &[("X-refresh-token", refresh)]).await;
    assert_eq!(who["user_name"], "alice");
}

/// The browser part as a user does it (authorize, log in, follow to the callback with a code),
/// then the destination redeems the code with PKCE.
#[tokio::test]
async fn authorization_code() {
    let s = Stack::start().await;
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let page = browser
        .get(format!("{}/oauth/authorize", s.base))
        .query(&[
            ("response_type", "code"),
            ("client_id", "sb-app"),
            ("redirect_uri", CALLBACK),
            ("code_challenge", PKCE_CHALLENGE),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let cookie = page.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let html = page.text().await.unwrap();
    let marker = "name=\"request\" value=\"";
    let id = html[html.find(marker).unwrap() + marker.len()..].split('"').next().unwrap().to_owned();
    let login = browser
        .post(format!("{}/login", s.base))
        .header("cookie", cookie)
        .form(&[("request", id.as_str()), ("username", "alice"), ("password", "alice-pw"), ("action", "login")])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::FOUND);
    let location = url::Url::parse(login.headers()["location"].to_str().unwrap()).unwrap();
    let code = location.query_pairs().find(|(k, _)| k == "code").unwrap().1.into_owned();

    s.create("ac", "OAuth2AuthorizationCode", json!({})).await;
    let headers = [("X-code", code.as_str()), ("X-redirect-uri", CALLBACK), ("X-code-verifier", PKCE_VERIFIER)];
    let who = s.use_at_backend("ac", &headers).await;
    assert_eq!((who["user_name"].as_str(), who["grant_type"].as_str()), (Some("alice"), Some("authorization_code")));
    // A code is single-use: its token is not cached, so the replay reaches the token service,
    // which refuses it.
    let r = s.env.find(&s.service_token, "ac", &headers).await;
    let error = r.json["authTokens"][0]["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("invalid_grant") && error.contains("already used"), "{}", r.text);
}

/// The token travels in the Connectivity Proxy's technical-user header, which the proxy hands
/// on to the on-premise backend; the backend here reads it directly.
#[tokio::test]
async fn technical_user_propagation() {
    let s = Stack::start().await;
    s.create("tu", "OAuth2TechnicalUserPropagation", json!({"ProxyType": "OnPremise"})).await;
    let r = s.env.find(&s.service_token, "tu", &[]).await;
    assert_eq!(r.json["authTokens"][0]["http_header"]["key"], TECHNICAL_HEADER, "{}", r.text);
    let who = s.use_at_backend("tu", &[]).await;
    assert_eq!((who["client_id"].as_str(), who["grant_type"].as_str()), (Some("sb-app"), Some("client_credentials")));
}

/// ClientCertificateAuthentication has no token: find hands out the keystore of
/// `KeyStoreLocation`, and the application presents it in the TLS handshake. The backend is the
/// token service's HTTPS listener, which gives sb-app a token for `client_id` alone, no secret,
/// only when the handshake proved sb-app's certificate.
#[tokio::test]
async fn client_certificate_authentication() {
    let s = Stack::start().await;
    s.upload_app_keystore().await;
    // The trust store, uploaded without a Type.
    let ca = json!({"Name": "ca.pem", "Content": b64(&s.ca_pem)});
    let r = s.call(Method::POST, format!("{V1}/subaccountCertificates"), Some(ca)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let url = format!("{}/oauth/token", s.https_base);
    s.create(
        "cert",
        "ClientCertificateAuthentication",
        json!({"URL": url, "KeyStoreLocation": "app.pem", "TrustStoreLocation": "ca.pem", "tokenServiceURL": null, "tokenServiceURLType": null,
               "clientId": null, "clientSecret": null}),
    )
    .await;
    let r = s.env.find(&s.service_token, "cert", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.json.get("authTokens").is_none_or(|t| t.as_array().is_some_and(Vec::is_empty)), "{}", r.text);
    let keystore = &r.json["certificates"][0];
    assert_eq!((keystore["Name"].as_str(), keystore["Type"].as_str()), (Some("app.pem"), Some("PEM")), "{}", r.text);
    let truststore = r.json["certificates"][1].as_object().unwrap();
    assert_eq!(truststore["Name"], "ca.pem");
    assert!(!truststore.contains_key("Type"), "SAP's schema has no null Type: {}", r.text);
    let content = base64::engine::general_purpose::STANDARD.decode(keystore["Content"].as_str().unwrap()).unwrap();
    let pem = String::from_utf8(content).unwrap();
    assert!(pem.contains("PRIVATE KEY"), "the keystore, key included");
    let url_of = |query: &str| format!("{V1}/destinations/cert{query}");
    let skipped = s.call(Method::GET, url_of("?$skipCredentials=true"), None).await;
    assert!(skipped.json.get("certificates").is_none(), "{}", skipped.text);

    let presenting = |with_certificate: bool| {
        let roots = ferry_core::tls::outbound_roots(Some(&s.ca_pem)).unwrap();
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let tls = if with_certificate {
            let certs = ferry_core::tls::parse_certs(&pem).unwrap();
            let key = ferry_core::tls::parse_key(&pem).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        } else {
            builder.with_no_client_auth()
        };
        reqwest::Client::builder().use_preconfigured_tls(tls).build().unwrap()
    };
    let target = r.json["destinationConfiguration"]["URL"].as_str().unwrap();
    let form = [("grant_type", "client_credentials"), ("client_id", "sb-app")];
    let answer = presenting(true).post(target).form(&form).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let answer: Value = answer.json().await.unwrap();
    let who = s.http.get(&s.backend).bearer_auth(answer["access_token"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(who.status(), StatusCode::OK);
    // The server checks: the same request without the certificate is refused.
    let refused = presenting(false).post(target).form(&form).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
}
