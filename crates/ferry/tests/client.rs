#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `ferry-client` (the Rust SDK) against a running `ferry up`: bindings from its
//! `default-env.json`, destinations of each authentication type, Internet and OnPremise requests
//! through the real proxy and connector to a real backend, and a TCP destination over SOCKS5.

mod common;

/// The SDK's `examples/` program, run here against `ferry up` (its `main` is not called).
#[allow(dead_code)]
#[path = "../../ferry-client/examples/onpremise.rs"]
mod onpremise_example;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ferry_client::{Bindings, Client, ClientError, Hop, HttpClient, Level, Options, Request};
use ferry_testkit::EchoBackend;
use ferry_testkit::nginx::Nginx;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn the_sdk_reaches_internet_on_premise_and_tcp_destinations() {
    ferry_core::init_crypto();
    let echo = EchoBackend::start().await;
    // A TCP backend that answers each line with "echo: <line>".
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    let closed = Arc::new(AtomicUsize::new(0));
    let closes = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            let closes = closes.clone();
            tokio::spawn(async move {
                let _count = CountOnDrop(closes);
                let mut buf = [0u8; 256];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&[b"echo: ", &buf[..n]].concat()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let nginx = Nginx::start(
        r#"listen 127.0.0.1:{PORT};
  location /svc/ {
    if ($request_method = HEAD) { add_header x-csrf-token tok-1 always; add_header set-cookie "sid=abc; Path=/" always; return 200; }
    if ($http_x_csrf_token != "tok-1") { add_header x-csrf-token Required always; return 403; }
    if ($http_cookie != "sid=abc") { return 412; }
    return 201 "created $http_authorization";
  }"#,
        &[],
    );
    let nginx_port = nginx.addr.port();
    let test_ca = ferry_core::tls::LocalCa::generate("backend test CA").unwrap();
    let server_cert = test_ca.issue_server_cert(&["127.0.0.1"]).unwrap();
    let app_cert =
        test_ca.issue_user_cert(&[("CN".to_owned(), "app-client".to_owned())], time::Duration::days(1)).unwrap();
    let tls_nginx = Nginx::start(
        r#"listen 127.0.0.1:{PORT} ssl;
  ssl_certificate {DIR}/server.pem;
  ssl_certificate_key {DIR}/server-key.pem;
  ssl_client_certificate {DIR}/ca.pem;
  ssl_verify_client on;
  location / { return 200 "client $ssl_client_s_dn"; }"#,
        &[
            ("server.pem", &server_cert.cert_pem),
            ("server-key.pem", server_cert.key_pem.expose()),
            ("ca.pem", test_ca.cert_pem()),
        ],
    );
    let mtls_port = tls_nginx.addr.port();
    let dir = common::test_dir("sdk");
    let port = echo.addr.port();
    let config = format!(
        r#"{listen}
[[destinations]]
properties = {{ Name = "web", Type = "HTTP", URL = "http://127.0.0.1:{port}/base", ProxyType = "Internet", Authentication = "NoAuthentication", "URL.headers.X-Conf" = "h1", "URL.queries.conf-query" = "q1", "sap-client" = "100" }}
[[destinations]]
properties = {{ Name = "web-basic", Type = "HTTP", URL = "http://127.0.0.1:{port}", ProxyType = "Internet", Authentication = "BasicAuthentication", User = "ALICE", Password = "s3cret" }}
[[destinations]]
properties = {{ Name = "csrf", Type = "HTTP", URL = "http://127.0.0.1:{nginx_port}/svc", Authentication = "BasicAuthentication", User = "ALICE", Password = "s3cret" }}
[[destinations]]
properties = {{ Name = "mtls", Type = "HTTP", URL = "https://127.0.0.1:{mtls_port}", Authentication = "ClientCertificateAuthentication", KeyStoreLocation = "app-client.pem", TrustStoreLocation = "backend-ca.pem" }}
[[destinations]]
properties = {{ Name = "erp", Type = "HTTP", URL = "http://erp.virtual:8000/sap", ProxyType = "OnPremise", Authentication = "BasicAuthentication", User = "ALICE", Password = "s3cret" }}
[[destinations]]
properties = {{ Name = "erp-pp", Type = "HTTP", URL = "http://erp.virtual:8000/sap", ProxyType = "OnPremise", Authentication = "PrincipalPropagation" }}
[[destinations]]
properties = {{ Name = "raw", Type = "TCP", Address = "tcp.virtual:7000", ProxyType = "OnPremise" }}

[bindings.xsuaa]
redirect_uris = ["http://127.0.0.1:{port}/callback"]

[[users]]
username = "alice"
password = "alice-password"

[[connectors]]
[[connectors.mappings]]
virtualHost = "erp.virtual"
virtualPort = 8000
localHost = "127.0.0.1"
localPort = {port}
protocol = "HTTP"
authenticationMode = "X509_GENERAL"
resources = [{{ path = "/sap", exactMatchOnly = false }}]
[[connectors.mappings]]
virtualHost = "tcp.virtual"
virtualPort = 7000
localHost = "127.0.0.1"
localPort = {tcp_port}
protocol = "TCP"
"#,
        listen = common::LISTEN_ANY,
    );
    let (mut ferry, vcap) = common::ferry_up(&dir, &config);
    let ca = std::fs::read_to_string(dir.join("data").join("ca.pem")).unwrap();
    let bindings = Bindings::from_default_env_file(&dir.join("default-env.json")).unwrap();
    let client = Client::new(bindings, Some(&ca)).unwrap();
    let http = HttpClient::new(client.clone(), Default::default()).unwrap();
    let any = Options::default();

    // Internet, NoAuthentication: URL join, URL.headers.*, URL.queries.*, sap-client.
    let web = client.get_destination("web", &any).await.unwrap();
    assert!(!format!("{web:?}").contains("s3cret"));
    let e: Value = http.get(&web, "/hello?x=1").await.unwrap().json().await.unwrap();
    assert_eq!(e["url"], "/base/hello?x=1&conf-query=q1");
    assert_eq!(e["headers"]["x-conf"], "h1");
    assert_eq!(e["headers"]["sap-client"], "100");
    assert!(e["headers"].get("authorization").is_none());

    // Internet, Basic: the header of the first auth token; the level-qualified lookup (v2).
    let sub = Options { level: Some(Level::Subaccount), ..Default::default() };
    let basic = client.get_destination("web-basic", &sub).await.unwrap();
    let e: Value = http.get(&basic, "").await.unwrap().json().await.unwrap();
    assert_eq!(e["headers"]["authorization"], "Basic QUxJQ0U6czNjcmV0");
    let inst = Options { level: Some(Level::Instance), ..Default::default() };
    let err = client.get_destination("web-basic", &inst).await.unwrap_err();
    assert_eq!(err.hop(), Some(Hop::DestinationService), "{err}");

    // A modifying request fetches a CSRF token first (HEAD with x-csrf-token: Fetch) and sends it
    // with the session cookie; nginx refuses the POST without both.
    let csrf = client.get_destination("csrf", &any).await.unwrap();
    let req = Request::new(reqwest::Method::POST, "/items").header("content-type", "text/plain").body("payload");
    let r = http.send(&csrf, req.clone()).await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.text().await.unwrap(), "created Basic QUxJQ0U6czNjcmV0");
    let r = http.send(&csrf, Request { csrf: false, ..req }).await.unwrap();
    assert_eq!(r.status(), 403, "without the token the backend refuses");
    // A backend without CSRF protection: HEAD (with and without the slash) finds no token, the POST goes out.
    let before = echo.hits();
    let req = Request::new(reqwest::Method::POST, "/items").header("content-type", "text/plain").body("payload");
    let e: Value = http.send(&basic, req).await.unwrap().json().await.unwrap();
    assert_eq!((e["method"].as_str(), e["body"].as_str()), (Some("POST"), Some("payload")));
    assert_eq!(echo.hits() - before, 3, "HEAD …/items/, HEAD …/items, then the POST");

    // OAuth2ClientCredentials: the Destination Service fetches a token from Ferry's token service
    // on the second find-by-name, and the client sends it.
    let dest = &vcap["destination"][0]["credentials"];
    let xsuaa = &vcap["xsuaa"][0]["credentials"];
    let oauth = serde_json::json!({
        "Name": "web-oauth", "Type": "HTTP", "URL": format!("http://127.0.0.1:{port}/o"), "ProxyType": "Internet",
        "Authentication": "OAuth2ClientCredentials",
        "tokenServiceURL": format!("{}/oauth/token", xsuaa["url"].as_str().unwrap()),
        "clientId": xsuaa["clientid"], "clientSecret": xsuaa["clientsecret"]
    });
    let token = client.destination_service_token(None).await.unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/destination-configuration/v1/subaccountDestinations", dest["uri"].as_str().unwrap()))
        .bearer_auth(token.expose())
        .json(&oauth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let d = client.get_destination("web-oauth", &any).await.unwrap();
    assert_eq!(d.auth_tokens.len(), 1, "{d:?}");
    let e: Value = http.get(&d, "/x").await.unwrap().json().await.unwrap();
    let bearer = e["headers"]["authorization"].as_str().unwrap();
    assert_eq!(claims_of(bearer.strip_prefix("Bearer ").unwrap())["client_id"], xsuaa["clientid"]);
    // With skip_token_retrieval the configuration comes without tokens, and sending says why.
    let bare = Options { skip_token_retrieval: true, ..Default::default() };
    let d = client.get_destination("web-oauth", &bare).await.unwrap();
    let err = http.get(&d, "/x").await.unwrap_err();
    assert!(matches!(err, ClientError::Destination { .. }) && err.to_string().contains("no auth token"), "{err}");

    // The user and token flows: the Destination Service fetches the token from Ferry's token
    // service (for the user of the JWT where there is one) and the client sends its header.
    let user_jwt = password_token(&xsuaa["url"], xsuaa, "alice", "alice-password").await;
    let token_url = format!("{}/oauth/token", xsuaa["url"].as_str().unwrap());
    let oauth_base = serde_json::json!({
        "Type": "HTTP", "URL": format!("http://127.0.0.1:{port}/u"), "ProxyType": "Internet",
        "tokenServiceURL": token_url, "clientId": xsuaa["clientid"], "clientSecret": xsuaa["clientsecret"],
    });
    let saml_base = serde_json::json!({
        "Type": "HTTP", "URL": format!("http://127.0.0.1:{port}/u"), "ProxyType": "Internet",
        "tokenServiceURL": token_url, "audience": token_url, "clientKey": xsuaa["clientid"],
        "tokenServiceUser": xsuaa["clientid"], "tokenServicePassword": xsuaa["clientsecret"],
        "authnContextClassRef": "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession"
    });
    let flows: [(&str, &Value, Value, &str); 6] = [
        (
            "OAuth2Password",
            &oauth_base,
            serde_json::json!({"User": "alice", "Password": "alice-password"}),
            "authorization",
        ),
        ("OAuth2JWTBearer", &oauth_base, serde_json::json!({}), "authorization"),
        ("OAuth2UserTokenExchange", &oauth_base, serde_json::json!({}), "authorization"),
        // On-premise only; the proxy takes the technical user's token off the request.
        (
            "OAuth2TechnicalUserPropagation",
            &oauth_base,
            serde_json::json!({"ProxyType": "OnPremise", "URL": "http://erp.virtual:8000/sap"}),
            "",
        ),
        ("OAuth2SAMLBearerAssertion", &saml_base, serde_json::json!({}), "authorization"),
        ("SAMLAssertion", &saml_base, serde_json::json!({}), "authorization"),
    ];
    for (auth, base, extra, header) in flows {
        let mut body = base.clone();
        body["Name"] = format!("flow-{auth}").into();
        body["Authentication"] = auth.into();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = reqwest::Client::new()
            .post(format!("{}/destination-configuration/v1/subaccountDestinations", dest["uri"].as_str().unwrap()))
            .bearer_auth(token.expose())
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{auth}: {}", r.text().await.unwrap());
        let options = Options { user_jwt: Some(user_jwt.clone().into()), ..Default::default() };
        let d = client.get_destination(&format!("flow-{auth}"), &options).await.unwrap();
        assert!(d.auth_tokens.first().is_some_and(|t| t.error.is_none()), "{auth}: {d:?}");
        let e: Value = http.get(&d, "/x").await.unwrap().json().await.unwrap();
        if header.is_empty() {
            assert_eq!(e["url"], "/sap/x", "{auth}: {e}");
            assert!(e["headers"].get("sap-connectivity-technical-authentication").is_none(), "{auth}: {e}");
            continue;
        }
        let sent = e["headers"][header].as_str().unwrap_or_else(|| panic!("{auth}: no {header} in {e}"));
        if let Some(jwt) = sent.strip_prefix("Bearer ") {
            let claims = claims_of(jwt);
            assert_eq!(claims["user_name"], "alice", "{auth}: {claims}");
        } else {
            assert_eq!(auth, "SAMLAssertion", "{auth}: {sent}");
        }
    }

    // A bound service instance asked for by its name is a destination of its own (SDK lookup
    // step 3): the destination binding becomes one to the Destination Service with its token.
    let bound_name = vcap["destination"][0]["name"].as_str().unwrap();
    let bound = client.get_destination(bound_name, &any).await.unwrap();
    assert_eq!(bound.property("URL").as_deref(), dest["uri"].as_str());
    let listed: Value =
        http.get(&bound, "/destination-configuration/v1/subaccountDestinations").await.unwrap().json().await.unwrap();
    assert!(listed.as_array().unwrap().iter().any(|d| d["Name"] == "web-oauth"), "{listed}");

    // The flows whose input comes from the caller: a refresh token (Options::refresh_token) and
    // a subject token (Options::token_headers). Each fetches its own token: nothing is cached.
    let login = password_login(&xsuaa["url"], xsuaa, "alice", "alice-password").await;
    let caller_flows: [(&str, Options); 2] = [
        (
            "OAuth2RefreshToken",
            Options { refresh_token: Some(login["refresh_token"].as_str().unwrap().to_owned().into()), ..any.clone() },
        ),
        (
            "OAuth2TokenExchange",
            Options {
                token_headers: vec![
                    ("X-subject-token".into(), user_jwt.clone().into()),
                    ("X-subject-token-type".into(), "urn:ietf:params:oauth:token-type:access_token".to_owned().into()),
                ],
                ..any.clone()
            },
        ),
    ];
    for (auth, options) in caller_flows {
        let mut body = oauth_base.clone();
        body["Name"] = format!("flow-{auth}").into();
        body["Authentication"] = auth.into();
        let r = reqwest::Client::new()
            .post(format!("{}/destination-configuration/v1/subaccountDestinations", dest["uri"].as_str().unwrap()))
            .bearer_auth(token.expose())
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{auth}: {}", r.text().await.unwrap());
        let d = client.get_destination(&format!("flow-{auth}"), &options).await.unwrap();
        assert!(d.auth_tokens.first().is_some_and(|t| t.error.is_none()), "{auth}: {d:?}");
        let e: Value = http.get(&d, "/x").await.unwrap().json().await.unwrap();
        let sent = e["headers"]["authorization"].as_str().unwrap_or_else(|| panic!("{auth}: {e}"));
        assert_eq!(claims_of(sent.strip_prefix("Bearer ").unwrap())["user_name"], "alice", "{auth}");
        // Without its input the service cannot run the flow (a failed token or a 400).
        let without = client.get_destination(&format!("flow-{auth}"), &any).await;
        let unusable = without.as_ref().map_or(true, |d| d.auth_tokens.first().is_none_or(|t| t.error.is_some()));
        assert!(unusable, "{auth}: {without:?}");
    }
    let bad = Options { token_headers: vec![("X bad".into(), "v".to_owned().into())], ..any.clone() };
    let err = client.get_destination("flow-OAuth2TokenExchange", &bad).await.unwrap_err();
    assert!(matches!(err, ClientError::Destination { .. }) && err.to_string().contains("X bad"), "{err}");

    // OAuth2AuthorizationCode: alice logs on at the token service's login page as a browser
    // would (GET /oauth/authorize, POST /login with the page's cookie), is sent back to the
    // client's registered redirect URI (`[bindings.xsuaa] redirect_uris`: the echo backend) with
    // a code, and the Destination Service redeems it (X-code, X-redirect-uri, X-code-verifier).
    let dests_api = format!("{}/destination-configuration/v1/subaccountDestinations", dest["uri"].as_str().unwrap());
    let token_base = xsuaa["url"].as_str().unwrap();
    let app_id = xsuaa["clientid"].as_str().unwrap();
    let callback = format!("http://127.0.0.1:{port}/callback");
    let verifier = "sdk-test-pkce-verifier-0123456789-abcdefghijklmnop";
    let challenge = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes()),
    );
    let mut body = oauth_base.clone();
    body["Name"] = "flow-OAuth2AuthorizationCode".into();
    body["Authentication"] = "OAuth2AuthorizationCode".into();
    assert_eq!(admin_post(&dests_api, &token, body).await.status(), 201);
    let with_code = |code: &str, redirect_uri: &str, verifier: &str| Options {
        token_headers: vec![
            ("X-code".into(), code.to_owned().into()),
            ("X-redirect-uri".into(), redirect_uri.to_owned().into()),
            ("X-code-verifier".into(), verifier.to_owned().into()),
        ],
        ..Default::default()
    };
    let code = browser_logon(token_base, app_id, &callback, &challenge, ("alice", "alice-password")).await;
    let d = client.get_destination("flow-OAuth2AuthorizationCode", &with_code(&code, &callback, verifier)).await;
    let e: Value = http.get(&d.unwrap(), "/x").await.unwrap().json().await.unwrap();
    let claims = claims_of(e["headers"]["authorization"].as_str().unwrap().strip_prefix("Bearer ").unwrap());
    assert_eq!(
        (claims["user_name"].as_str(), claims["grant_type"].as_str()),
        (Some("alice"), Some("authorization_code"))
    );
    // Each refusal names the destination's token service as the hop, with its reason: the same
    // code again (a code is single-use, and no cache answers for it) ...
    let refused = |err: ClientError, why: &str| {
        assert_eq!(err.hop(), Some(Hop::TokenService), "{err}");
        assert!(matches!(&err, ClientError::Hop { url, .. } if *url == token_url), "{err}");
        assert!(err.to_string().contains(why), "{why}: {err}");
    };
    let d = client.get_destination("flow-OAuth2AuthorizationCode", &with_code(&code, &callback, verifier)).await;
    refused(http.get(&d.unwrap(), "/x").await.unwrap_err(), "already used");
    // ... a fresh code with another redirect URI than the logon's, or the wrong PKCE verifier ...
    let code = browser_logon(token_base, app_id, &callback, &challenge, ("alice", "alice-password")).await;
    let elsewhere = format!("http://127.0.0.1:{port}/callback/other");
    let d = client.get_destination("flow-OAuth2AuthorizationCode", &with_code(&code, &elsewhere, verifier)).await;
    refused(http.get(&d.unwrap(), "/x").await.unwrap_err(), "redirect_uri does not match");
    let code = browser_logon(token_base, app_id, &callback, &challenge, ("alice", "alice-password")).await;
    let wrong_verifier = "another-verifier-of-the-right-length-0123456789-xyz";
    let d = client.get_destination("flow-OAuth2AuthorizationCode", &with_code(&code, &callback, wrong_verifier)).await;
    refused(http.get(&d.unwrap(), "/x").await.unwrap_err(), "code_verifier does not match");
    // ... and a redirect URI the client did not register gets no login page, only an error page.
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{token_base}/oauth/authorize"))
        .query(&[("response_type", "code"), ("client_id", app_id), ("redirect_uri", "http://127.0.0.1:1/evil")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("is not registered"));

    // Client assertion: an X.509 service key (made through the admin API) signs an RFC 7523
    // assertion (ES256, iss = sub = its client id, aud = the token endpoint, single-use jti) that
    // the caller hands over (X-client-assertion) instead of a secret.
    let zid = xsuaa["tenantid"].as_str().unwrap();
    let app_x509 = create_key(&dir, token_base, zid, xsuaa["instanceid"].as_str().unwrap(), "sdk-assertion").await;
    let app_x509_id = app_x509["clientid"].as_str().unwrap();
    let asserted = serde_json::json!({
        "Name": "asserted", "Type": "HTTP", "URL": format!("http://127.0.0.1:{port}/a"), "ProxyType": "Internet",
        "Authentication": "OAuth2ClientCredentials", "tokenServiceURL": token_url, "clientId": app_x509_id,
    });
    assert_eq!(admin_post(&dests_api, &token, asserted).await.status(), 201);
    let app_key = es256_key(app_x509["key"].as_str().unwrap());
    let with_assertion = |assertion: &str| Options {
        token_headers: vec![
            ("X-client-assertion".into(), assertion.to_owned().into()),
            (
                "X-client-assertion-type".into(),
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned().into(),
            ),
        ],
        ..Default::default()
    };
    let assertion = sign_assertion(&app_key, app_x509_id, &token_url);
    let d = client.get_destination("asserted", &with_assertion(&assertion)).await.unwrap();
    let e: Value = http.get(&d, "/x").await.unwrap().json().await.unwrap();
    let claims = claims_of(e["headers"]["authorization"].as_str().unwrap().strip_prefix("Bearer ").unwrap());
    assert_eq!(
        (claims["client_id"].as_str(), claims["grant_type"].as_str()),
        (Some(app_x509_id), Some("client_credentials"))
    );
    // Refused: the same assertion again, one addressed to another token service, one signed by
    // a key the client never registered.
    let d = client.get_destination("asserted", &with_assertion(&assertion)).await.unwrap();
    refused(http.get(&d, "/x").await.unwrap_err(), "was used before");
    let other_audience = sign_assertion(&app_key, app_x509_id, "https://elsewhere.example/oauth/token");
    let d = client.get_destination("asserted", &with_assertion(&other_audience)).await.unwrap();
    refused(http.get(&d, "/x").await.unwrap_err(), "aud");
    let stranger =
        aws_lc_rs::signature::EcdsaKeyPair::generate(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let forged = sign_assertion(&stranger, app_x509_id, &token_url);
    let d = client.get_destination("asserted", &with_assertion(&forged)).await.unwrap();
    refused(http.get(&d, "/x").await.unwrap_err(), "signature does not verify");

    // mTLS to the token service: an X.509 key of the destination instance authenticates by its
    // certificate alone at the HTTPS port (`certurl`, ferry up's `token_https_port`), no secret.
    // First as the SDK's own binding: the destination binding's token comes over mTLS.
    let dest_x509 = create_key(&dir, token_base, zid, dest["instanceid"].as_str().unwrap(), "sdk-mtls").await;
    let dest_x509_id = dest_x509["clientid"].as_str().unwrap();
    let certurl = dest_x509["certurl"].as_str().unwrap();
    assert!(certurl.starts_with("https://") && dest_x509.get("clientsecret").is_none(), "{certurl}");
    let with_binding = |creds: &Value| {
        let mut v = vcap.clone();
        v["destination"][0]["credentials"] = creds.clone();
        Client::new(Bindings::from_vcap_services(&v.to_string()).unwrap(), Some(&ca)).unwrap()
    };
    let by_cert = with_binding(&dest_x509);
    let fresh = Options { no_cache: true, ..Default::default() };
    assert_eq!(by_cert.get_destination("web", &fresh).await.unwrap().name(), "web");
    let claims = claims_of(by_cert.destination_service_token(None).await.unwrap().expose());
    assert_eq!(claims["client_id"], dest_x509_id);
    // The certificate of another client (same CA) is refused with 401, one of a CA the token
    // service does not trust fails the TLS handshake: both at the token service hop.
    let mut other_cert = dest_x509.clone();
    other_cert["certificate"] = app_x509["certificate"].clone();
    other_cert["key"] = app_x509["key"].clone();
    let err = with_binding(&other_cert).get_destination("web", &fresh).await.unwrap_err();
    assert_eq!((err.hop(), err.status()), (Some(Hop::TokenService), Some(401)), "{err}");
    let mut foreign_ca = dest_x509.clone();
    foreign_ca["certificate"] = app_cert.cert_pem.clone().into();
    foreign_ca["key"] = app_cert.key_pem.expose().clone().into();
    let err = with_binding(&foreign_ca).get_destination("web", &fresh).await.unwrap_err();
    assert_eq!((err.hop(), err.status()), (Some(Hop::TokenService), None), "{err}");
    // Then for a destination: the Destination Service presents the keystore that
    // `tokenService.KeyStoreLocation` names at the HTTPS token endpoint.
    let cert_api = format!("{}/destination-configuration/v1/subaccountCertificates", dest["uri"].as_str().unwrap());
    let pem = format!("{}{}", dest_x509["certificate"].as_str().unwrap(), dest_x509["key"].as_str().unwrap());
    let content = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pem);
    let r = admin_post(
        &cert_api,
        &token,
        serde_json::json!({"Name": "token-client.pem", "Type": "PEM", "Content": content}),
    )
    .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let cert_token_url = format!("{certurl}/oauth/token");
    let mut token_mtls = serde_json::json!({
        "Name": "token-mtls", "Type": "HTTP", "URL": format!("http://127.0.0.1:{port}/m"), "ProxyType": "Internet",
        "Authentication": "OAuth2ClientCredentials", "tokenServiceURL": cert_token_url, "clientId": dest_x509_id,
        "tokenService.KeyStoreLocation": "token-client.pem",
    });
    assert_eq!(admin_post(&dests_api, &token, token_mtls.clone()).await.status(), 201);
    let d = client.get_destination("token-mtls", &any).await.unwrap();
    let e: Value = http.get(&d, "/x").await.unwrap().json().await.unwrap();
    let claims = claims_of(e["headers"]["authorization"].as_str().unwrap().strip_prefix("Bearer ").unwrap());
    assert_eq!(claims["client_id"], dest_x509_id);
    // Without the client certificate the same client has nothing to authenticate with.
    token_mtls["Name"] = "token-mtls-no-cert".into();
    token_mtls.as_object_mut().unwrap().remove("tokenService.KeyStoreLocation");
    assert_eq!(admin_post(&dests_api, &token, token_mtls).await.status(), 201);
    let d = client.get_destination("token-mtls-no-cert", &any).await.unwrap();
    let err = http.get(&d, "/x").await.unwrap_err();
    assert_eq!(err.hop(), Some(Hop::TokenService), "{err}");
    assert!(matches!(&err, ClientError::Hop { url, .. } if *url == cert_token_url), "{err}");
    assert!(err.to_string().contains("401"), "{err}");

    // Tenant, fragment and cache.
    let api = format!("{}/destination-configuration/v1", dest["uri"].as_str().unwrap());
    let admin = reqwest::Client::new();
    let zid = claims_of(&user_jwt)["zid"].as_str().unwrap().to_owned();
    let in_zone = Options { tenant: Some(zid), no_cache: true, ..Default::default() };
    assert_eq!(client.get_destination("web", &in_zone).await.unwrap().name(), "web");
    let elsewhere = Options { tenant: Some("no-such-zone".into()), no_cache: true, ..Default::default() };
    let err = client.get_destination("web", &elsewhere).await.unwrap_err();
    assert_eq!(err.hop(), Some(Hop::TokenService), "{err}");
    let fragment = serde_json::json!({"FragmentName": "extra", "URL.headers.X-Frag": "yes"});
    let r = admin.post(format!("{api}/subaccountDestinationFragments")).bearer_auth(token.expose()).json(&fragment);
    assert_eq!(r.send().await.unwrap().status(), 201);
    let with_fragment = Options { fragment: Some("extra".into()), ..Default::default() };
    let d = client.get_destination("web", &with_fragment).await.unwrap();
    let e: Value = http.get(&d, "").await.unwrap().json().await.unwrap();
    assert_eq!(e["headers"]["x-frag"], "yes");
    // Cached: a change in the service shows only when the cache is bypassed.
    let moved = format!("http://127.0.0.1:{port}/moved");
    let changed = serde_json::json!({"Name": "web", "Type": "HTTP", "URL": moved, "ProxyType": "Internet",
        "Authentication": "NoAuthentication"});
    let r = admin.put(format!("{api}/subaccountDestinations")).bearer_auth(token.expose()).json(&changed);
    assert_eq!(r.send().await.unwrap().status(), 200);
    assert_eq!(client.get_destination("web", &any).await.unwrap().property("URL"), web.property("URL"));
    let fresh = Options { no_cache: true, ..Default::default() };
    assert_eq!(client.get_destination("web", &fresh).await.unwrap().property("URL"), Some(moved));

    // Mounted bindings (SERVICE_BINDING_ROOT), read by the CLI through Bindings::from_env in a
    // folder without default-env.json.
    let mounted = dir.join("bindings").join("my-destination");
    std::fs::create_dir_all(&mounted).unwrap();
    std::fs::write(mounted.join("type"), "destination").unwrap();
    for (k, v) in dest.as_object().unwrap() {
        if let Some(v) = v.as_str() {
            std::fs::write(mounted.join(k), v).unwrap();
        }
    }
    let empty = dir.join("elsewhere");
    std::fs::create_dir_all(&empty).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["destinations", "list", "-o", "json"])
        .current_dir(&empty)
        .env_remove("VCAP_SERVICES")
        .env("SERVICE_BINDING_ROOT", dir.join("bindings"))
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listed.contains("\"web-basic\""),
        "{listed}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // OnPremise: through the Connectivity Proxy and the connector to the backend.
    let erp = client.get_destination("erp", &any).await.unwrap();
    let e: Value = http.get(&erp, "/items?top=1").await.unwrap().json().await.unwrap();
    assert_eq!(e["url"], "/sap/items?top=1");
    assert_eq!(e["headers"]["authorization"], "Basic QUxJQ0U6czNjcmV0");
    assert!(e["headers"].get("proxy-authorization").is_none(), "the proxy strips its credential");
    // The examples/ program does the same.
    let (status, body) = onpremise_example::fetch(&client, "erp", "/items?top=1").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["url"], "/sap/items?top=1");

    // PrincipalPropagation: the user's JWT becomes a user certificate at the backend.
    let err = client.get_destination("erp-pp", &any).await.unwrap_err();
    assert!(err.to_string().contains("JWT"), "{err}");
    let as_user = Options { user_jwt: Some(user_jwt.clone().into()), ..Default::default() };
    let pp = client.get_destination("erp-pp", &as_user).await.unwrap();
    let e: Value = http.get(&pp, "/me").await.unwrap().json().await.unwrap();
    assert!(e["headers"]["ssl_client_cert"].as_str().unwrap().len() > 100, "a user certificate reached the backend");
    assert!(e["headers"].get("sap-connectivity-authentication").is_none());

    // TCP through SOCKS5.
    let raw = client.get_destination("raw", &any).await.unwrap();
    let err = http.get(&raw, "").await.unwrap_err();
    assert!(err.to_string().contains("connect_tcp"), "{err}");
    let mut s = client.connect_tcp(&raw, None).await.unwrap();
    s.write_all(b"ping\n").await.unwrap();
    let mut buf = [0u8; 11];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"echo: ping\n");

    // ClientCertificateAuthentication with a trust store: nginx over TLS requires a client
    // certificate from the test CA, which the destination's keystore holds and whose CA its trust
    // store (not the client's roots) holds.
    let b64 = |t: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, t);
    let cert_api = format!("{}/destination-configuration/v1/subaccountCertificates", dest["uri"].as_str().unwrap());
    let keystore = format!("{}{}", app_cert.cert_pem, app_cert.key_pem.expose());
    for (name, content) in [("app-client.pem", keystore.as_str()), ("backend-ca.pem", test_ca.cert_pem())] {
        let r = reqwest::Client::new()
            .post(&cert_api)
            .bearer_auth(token.expose())
            .json(&serde_json::json!({"Name": name, "Type": "PEM", "Content": b64(content)}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    let mtls = client.get_destination("mtls", &any).await.unwrap();
    assert_eq!(mtls.certificates.len(), 2, "{mtls:?}");
    let r = http.get(&mtls, "/who").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("CN=app-client"));
    // Without the keystore, nginx refuses the connection's request.
    let mut no_key = mtls.clone();
    no_key.configuration.insert("Authentication".into(), "NoAuthentication".into());
    assert_eq!(http.get(&no_key, "/who").await.unwrap().status(), 400);
    // The same key pair as a P12 keystore with a password (as `openssl pkcs12 -export` writes it).
    let stores = dir.join("stores");
    std::fs::create_dir_all(&stores).unwrap();
    std::fs::write(stores.join("app.pem"), &keystore).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["pkcs12", "-export", "-in", "app.pem", "-passout", "pass:p12-pw", "-out", "app.p12"])
        .current_dir(&stores)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p12 = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        std::fs::read(stores.join("app.p12")).unwrap(),
    );
    let r = admin_post(&cert_api, &token, serde_json::json!({"Name": "app-client.p12", "Type": "P12", "Content": p12}))
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let mut p12_dest = serde_json::json!({
        "Name": "mtls-p12", "Type": "HTTP", "URL": format!("https://127.0.0.1:{mtls_port}"), "ProxyType": "Internet",
        "Authentication": "ClientCertificateAuthentication", "KeyStoreLocation": "app-client.p12",
        "KeyStorePassword": "p12-pw", "TrustStoreLocation": "backend-ca.pem",
    });
    let dest_api = format!("{}/destination-configuration/v1/subaccountDestinations", dest["uri"].as_str().unwrap());
    assert_eq!(admin_post(&dest_api, &token, p12_dest.clone()).await.status(), 201);
    let d = client.get_destination("mtls-p12", &any).await.unwrap();
    let r = http.get(&d, "/who").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("CN=app-client"));
    // A wrong keystore password is the destination's fault, and says so.
    p12_dest["Name"] = "mtls-p12-wrong".into();
    p12_dest["KeyStorePassword"] = "guess".into();
    assert_eq!(admin_post(&dest_api, &token, p12_dest).await.status(), 201);
    let d = client.get_destination("mtls-p12-wrong", &any).await.unwrap();
    let err = http.get(&d, "/who").await.unwrap_err();
    assert!(matches!(err, ClientError::Destination { .. }) && err.to_string().contains("password is wrong"), "{err}");
    // TrustAll=true: no trust store, and the server's certificate (from a CA nobody trusts) is
    // accepted; without it the TLS handshake fails at the backend hop.
    let mut untrusted = mtls.clone();
    untrusted.configuration.remove("TrustStoreLocation");
    let err = http.get(&untrusted, "/who").await.unwrap_err();
    assert_eq!(err.hop(), Some(Hop::Backend), "{err}");
    untrusted.configuration.insert("TrustAll".into(), "true".into());
    let r = http.get(&untrusted, "/who").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("CN=app-client"));

    // The SDK's circuit breaker around Destination Service calls: a service that answers 503
    // gets ten calls, then none while the breaker is open; 4xx answers never open it.
    let failing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let failing_port = failing.local_addr().unwrap().port();
    let failing_hits = Arc::new(AtomicUsize::new(0));
    let hits = failing_hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = failing.accept().await {
            let hits = hits.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        hits.fetch_add(1, Ordering::SeqCst);
                        let body = r#"{"ErrorMessage":"down for maintenance"}"#;
                        let resp = format!(
                            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let mut down = vcap.clone();
    down["destination"][0]["credentials"]["uri"] = format!("http://127.0.0.1:{failing_port}").into();
    let down = Client::new(Bindings::from_vcap_services(&down.to_string()).unwrap(), Some(&ca)).unwrap();
    let fresh = Options { no_cache: true, ..Default::default() };
    for i in 0..10 {
        let err = down.get_destination("web", &fresh).await.unwrap_err();
        assert_eq!((err.hop(), err.status()), (Some(Hop::DestinationService), Some(503)), "call {i}: {err}");
        assert!(err.to_string().contains("down for maintenance"), "{err}");
    }
    assert_eq!(failing_hits.load(Ordering::SeqCst), 10);
    let err = down.get_destination("web", &fresh).await.unwrap_err();
    assert!(matches!(err, ClientError::CircuitOpen { hop: Hop::DestinationService, .. }), "{err}");
    assert_eq!(failing_hits.load(Ordering::SeqCst), 10, "an open breaker does not call");
    // Breakers are per service: the real Destination Service still answers.
    assert!(client.get_destination("web", &fresh).await.is_ok());
    // After the open time one trial call goes out; it fails, so the breaker opens again.
    down.set_circuit_breaker(ferry_client::BreakerOptions {
        reset_timeout: std::time::Duration::ZERO,
        ..Default::default()
    });
    for _ in 0..10 {
        down.get_destination("web", &fresh).await.unwrap_err();
    }
    assert_eq!(failing_hits.load(Ordering::SeqCst), 20);
    let err = down.get_destination("web", &fresh).await.unwrap_err();
    assert_eq!(err.status(), Some(503), "the trial call reached the service: {err}");
    assert_eq!(failing_hits.load(Ordering::SeqCst), 21);
    // Not found (404) is the caller's business: any number of them leave the breaker closed.
    for _ in 0..15 {
        let err = client.get_destination("nope", &fresh).await.unwrap_err();
        assert!(matches!(err, ClientError::NotFound { .. }), "{err}");
    }

    // Errors name the hop: an unknown destination, a wrong client secret, a proxy that is gone.
    let err = client.get_destination("nope", &any).await.unwrap_err();
    assert!(matches!(err, ClientError::NotFound { .. }), "{err}");
    let mut wrong = vcap.clone();
    wrong["destination"][0]["credentials"]["clientsecret"] = "wrong".into();
    let bad = Client::new(Bindings::from_vcap_services(&wrong.to_string()).unwrap(), None).unwrap();
    let err = bad.get_destination("web", &any).await.unwrap_err();
    assert_eq!((err.hop(), err.status()), (Some(Hop::TokenService), Some(401)), "{err}");
    // A refused client (401) does not open the token service's breaker either.
    for _ in 0..12 {
        assert_eq!(bad.get_destination("web", &any).await.unwrap_err().status(), Some(401));
    }

    // Ferry gone: the first hop, the token service, is named. Our connections go first, and the TCP backend sees the tunnel close: a SIGTERM while a
    // SOCKS5 tunnel is still closing makes `ferry up` wait out its 10 s drain.
    drop((http, client, bad, s));
    for _ in 0..1000 {
        if closed.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(ferry.terminate().success());
    let client = Client::new(Bindings::from_vcap_services(&vcap.to_string()).unwrap(), None).unwrap();
    let err = client.get_destination("erp", &any).await.unwrap_err();
    assert_eq!(err.hop(), Some(Hop::TokenService), "{err}");
    assert!(err.to_string().contains("cannot connect"), "{err}");
    // An unreachable token service counts as failing: after ten calls its breaker opens.
    for _ in 0..9 {
        assert!(client.get_destination("erp", &any).await.unwrap_err().to_string().contains("cannot connect"));
    }
    let err = client.get_destination("erp", &any).await.unwrap_err();
    assert!(matches!(err, ClientError::CircuitOpen { hop: Hop::TokenService, .. }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

async fn admin_post(url: &str, token: &ferry_core::Secret<String>, body: Value) -> reqwest::Response {
    reqwest::Client::new().post(url).bearer_auth(token.expose()).json(&body).send().await.unwrap()
}

/// A user's token from the password grant of a binding's client.
async fn password_token(url: &Value, creds: &Value, user: &str, password: &str) -> String {
    password_login(url, creds, user, password).await["access_token"].as_str().unwrap().to_owned()
}

/// The token service's whole answer to a password grant (access and refresh token).
async fn password_login(url: &Value, creds: &Value, user: &str, password: &str) -> Value {
    let form = [
        ("grant_type", "password"),
        ("client_id", creds["clientid"].as_str().unwrap()),
        ("client_secret", creds["clientsecret"].as_str().unwrap()),
        ("username", user),
        ("password", password),
    ];
    let r: Value = reqwest::Client::new()
        .post(format!("{}/oauth/token", url.as_str().unwrap()))
        .form(&form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r
}

/// What a browser does to log `user` on for `client_id`: the login page of `/oauth/authorize`
/// (state and an S256 PKCE challenge), the form posted back with the page's cookie, and the
/// redirect followed to `redirect_uri` (the echo backend, which answers with the request line
/// that carries the code). Returns the code.
async fn browser_logon(
    token_base: &str,
    client_id: &str,
    redirect_uri: &str,
    challenge: &str,
    (user, password): (&str, &str),
) -> String {
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let query = [
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
        ("state", "state-1"),
        ("code_challenge", challenge),
        ("code_challenge_method", "S256"),
    ];
    let page = browser.get(format!("{token_base}/oauth/authorize")).query(&query).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let cookie = page.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let html = page.text().await.unwrap();
    let marker = "name=\"request\" value=\"";
    let id = html[html.find(marker).unwrap() + marker.len()..].split('"').next().unwrap().to_owned();
    let form = [("request", id.as_str()), ("username", user), ("password", password), ("action", "login")];
    let login = browser.post(format!("{token_base}/login")).header("cookie", cookie).form(&form).send().await.unwrap();
    assert_eq!(login.status(), 302);
    let location = login.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(redirect_uri), "{location}");
    let landed: Value = browser.get(&location).send().await.unwrap().json().await.unwrap();
    let url = reqwest::Url::parse(&format!("http://callback{}", landed["url"].as_str().unwrap())).unwrap();
    let param = |k: &str| url.query_pairs().find(|(n, _)| n == k).map(|(_, v)| v.into_owned());
    assert_eq!(param("state").as_deref(), Some("state-1"));
    param("code").unwrap()
}

/// A service key of `credential_type: x509` for instance `instance` of subaccount `zid`, made
/// through the admin API with ferry up's admin client (from its `state.json`).
async fn create_key(dir: &std::path::Path, token_base: &str, zid: &str, instance: &str, name: &str) -> Value {
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("data").join("state.json")).unwrap()).unwrap();
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", state["admin_client_id"].as_str().unwrap()),
        ("client_secret", state["admin_client_secret"].as_str().unwrap()),
    ];
    let http = reqwest::Client::new();
    let r: Value =
        http.post(format!("{token_base}/oauth/token")).form(&form).send().await.unwrap().json().await.unwrap();
    let admin = r["access_token"].as_str().unwrap_or_else(|| panic!("{r}"));
    let url = format!("{token_base}/ferry/admin/v1/subaccounts/{zid}/service-instances/{instance}/service-keys");
    let body = serde_json::json!({"name": name, "credential_type": "x509"});
    let r = http.post(url).bearer_auth(admin).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

/// The P-256 key of an X.509 service key (PKCS#8 PEM).
fn es256_key(pem: &str) -> aws_lc_rs::signature::EcdsaKeyPair {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap();
    aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING, &der)
        .unwrap()
}

/// An RFC 7523 client assertion of `client_id` for `aud`, valid a minute, with a fresh `jti`.
fn sign_assertion(key: &aws_lc_rs::signature::EcdsaKeyPair, client_id: &str, aud: &str) -> String {
    let b64 = |bytes: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut jti = [0u8; 16];
    aws_lc_rs::rand::fill(&mut jti).unwrap();
    let claims = serde_json::json!({"iss": client_id, "sub": client_id, "aud": aud, "iat": now, "exp": now + 60,
        "jti": b64(&jti)});
    let header = serde_json::json!({"alg": "ES256", "typ": "JWT"});
    let input =
        format!("{}.{}", b64(&serde_json::to_vec(&header).unwrap()), b64(&serde_json::to_vec(&claims).unwrap()));
    let sig = key.sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes()).unwrap();
    format!("{input}.{}", b64(sig.as_ref()))
}

/// A JWT's claims, unverified.
fn claims_of(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload).unwrap())
        .unwrap()
}

/// Counts the connections the TCP backend has finished.
struct CountOnDrop(Arc<AtomicUsize>);

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}
