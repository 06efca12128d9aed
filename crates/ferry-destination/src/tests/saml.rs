//! SAML flows (SPEC §2.1, §2.6): `SAMLAssertion` tokens and their content (checked by xmlsec1
//! as well), the subaccount's signing certificate, `KeyStoreLocation` signing, and
//! `OAuth2SAMLBearerAssertion` end to end against Ferry's token service over real HTTP.

use axum::http::{Method, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ferry_auth::saml::{Expectations, SamlSigner, TrustedCertificate, VerifiedAssertion, verify_assertion};
use serde_json::{Value, json};

use super::{Env, FerryTokens, TokenServer, V1, now_secs};
use crate::tokens::GRANT_SAML2_BEARER;

const AUDIENCE: &str = "https://backend.example/sap/bc/sec/oauth2/token";

fn saml_dest(name: &str, extra: Value) -> Value {
    let mut d = json!({
        "Name": name, "Type": "HTTP", "URL": "https://backend.example", "ProxyType": "Internet",
        "Authentication": "SAMLAssertion", "audience": AUDIENCE,
        "authnContextClassRef": "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession",
    });
    for (k, v) in extra.as_object().unwrap() {
        d[k] = v.clone();
    }
    d
}

fn user(env: &Env, name: &str) -> String {
    env.token_with(json!({
        "zid": "zone-1", "client_id": "sb-app!t1", "cid": "sb-app!t1", "exp": now_secs() + 600,
        "grant_type": "password", "user_name": name, "user_id": format!("id-{name}"), "email": format!("{name}@example.com"),
        "given_name": "Ann", "origin": "ldap",
        "xs.user.attributes": {"department": ["Sales"], "xs.saml.groups": ["approvers"]},
        "xs.system.attributes": {"xs.saml.groups": ["admins"]},
        "ext_attr": {"enhancer": "XSUAA", "zdn": "zone-1-sub"}
    }))
}

async fn certificate(env: &Env, token: &str) -> TrustedCertificate {
    let r = env.call(Method::GET, &format!("{V1}/saml2Metadata/certificate"), Some(token), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    TrustedCertificate::from_pem(r.json["certificate"].as_str().unwrap()).unwrap()
}

fn check(encoded: &str, trusted: &TrustedCertificate, recipient: &str) -> VerifiedAssertion {
    let xml = URL_SAFE_NO_PAD.decode(encoded).or_else(|_| STANDARD.decode(encoded)).unwrap();
    let audiences = [AUDIENCE.to_owned()];
    let recipients = [recipient.to_owned()];
    let expect = Expectations { audiences: &audiences, recipients: &recipients, now: now_secs() };
    verify_assertion(&xml, std::slice::from_ref(trusted), &expect).unwrap()
}

#[tokio::test]
async fn saml_assertion_tokens_carry_the_user_and_are_cached() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let r = env.call(Method::GET, &format!("{V1}/saml2Metadata/certificate"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "no key before first use: {}", r.text);
    env.create(&t, "subaccount", saml_dest("sa", json!({"assertionIssuer": "my-issuer", "nameQualifier": "corp"})))
        .await;

    let ann = user(&env, "ann");
    let r = env.find(&t, "sa", &[("X-user-token", &ann)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let token = &r.json["authTokens"][0];
    assert!(token.get("error").is_none(), "{}", r.text);
    assert_eq!(token["type"], "SAML2.0");
    assert_eq!(token["expires_in"], "600");
    let value = token["value"].as_str().unwrap();
    assert_eq!(token["http_header"], json!({"key": "Authorization", "value": format!("SAML2.0 {value}")}));

    let trusted = certificate(&env, &t).await;
    // No tokenServiceURL: the assertion is addressed to the audience.
    let v = check(value, &trusted, AUDIENCE);
    assert_eq!((v.issuer.as_str(), v.name_id.as_str()), ("my-issuer", "ann"));
    assert_eq!(v.name_qualifier.as_deref(), Some("corp"));
    assert_eq!(v.attribute("email").unwrap(), ["ann@example.com"]);
    assert_eq!(v.attribute("user_uuid").unwrap(), ["id-ann"]);
    assert_eq!(v.attribute("user_attributes.department").unwrap(), ["Sales"]);
    assert_eq!(v.attribute("Groups").unwrap(), ["approvers", "admins"]);

    // An independent relying party accepts it: xmlsec1 with the published certificate.
    let dir = tempfile::tempdir().unwrap();
    let r = env.call(Method::GET, &format!("{V1}/saml2Metadata/certificate"), Some(&t), None).await;
    std::fs::write(dir.path().join("cert.pem"), r.json["certificate"].as_str().unwrap()).unwrap();
    std::fs::write(dir.path().join("a.xml"), URL_SAFE_NO_PAD.decode(value).unwrap()).unwrap();
    let out = std::process::Command::new("xmlsec1")
        .args(["--verify", "--pubkey-cert-pem"])
        .arg(dir.path().join("cert.pem"))
        .args(["--id-attr:ID", "urn:oasis:names:tc:SAML:2.0:assertion:Assertion"])
        .arg(dir.path().join("a.xml"))
        .output()
        .expect("xmlsec1 must be installed (scripts/test.sh installs Debian's xmlsec1)");
    assert!(out.status.success(), "xmlsec1: {}", String::from_utf8_lossy(&out.stderr));

    // Cached per user: the same assertion again, another one for another user.
    let again = env.find(&t, "sa", &[("X-user-token", &ann)]).await;
    assert_eq!(again.json["authTokens"][0]["value"], value);
    let bob = env.find(&t, "sa", &[("X-user-token", &user(&env, "bob"))]).await;
    let bob_value = bob.json["authTokens"][0]["value"].as_str().unwrap();
    assert_ne!(bob_value, value);
    assert_eq!(check(bob_value, &trusted, AUDIENCE).name_id, "bob");

    // No user: the token fails, not the call.
    let r = env.find(&t, "sa", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json["authTokens"][0]["error"].as_str().unwrap().contains("X-user-token"), "{}", r.text);

    // POST renews the key; assertions are signed with the new one from then on.
    let r = env.call(Method::POST, &format!("{V1}/saml2Metadata/certificate"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let renewed = certificate(&env, &t).await;
    assert_ne!(renewed.der(), trusted.der());
    let r = env.find(&t, "sa", &[("X-user-token", &ann)]).await;
    check(r.json["authTokens"][0]["value"].as_str().unwrap(), &renewed, AUDIENCE);
}

#[tokio::test]
async fn name_id_sources_encodings_and_flags() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let email = "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress";
    let cases = [
        ("email", json!({"nameIdFormat": email, "samlAssertionEncoding": "base64"}), Ok("ann@example.com")),
        ("src", json!({"userIdSource": "$.['xs.user.attributes'].department"}), Err("")),
        ("src2", json!({"userIdSource": "user_id", "skipUserUuidInSAMLAttributes": "true"}), Ok("id-ann")),
        ("other", json!({"nameIdFormat": "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent"}), Err("userIdSource")),
        ("missing", json!({"userIdSource": "no_such_claim"}), Err("could not be determined")),
        ("noaud", json!({"audience": ""}), Err("'audience'")),
    ];
    for (name, extra, _) in &cases {
        let d = saml_dest(name, extra.clone());
        if *name == "noaud" {
            // The API refuses it; a row stored another way must still fail the token clearly.
            let props = d.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()));
            env.service
                .upsert("zone-1", None, ferry_model::Destination::from_properties(props).unwrap())
                .await
                .unwrap();
        } else {
            env.create(&t, "subaccount", d).await;
        }
    }
    let trusted = {
        let r = env.find(&t, "email", &[("X-user-token", &user(&env, "ann"))]).await;
        let value = r.json["authTokens"][0]["value"].as_str().unwrap().to_owned();
        assert!(STANDARD.decode(&value).is_ok(), "samlAssertionEncoding base64");
        certificate(&env, &t).await
    };
    for (name, _, want) in cases {
        let r = env.find(&t, name, &[("X-user-token", &user(&env, "ann"))]).await;
        let token = &r.json["authTokens"][0];
        match want {
            Ok(name_id) => {
                let v = check(token["value"].as_str().unwrap(), &trusted, AUDIENCE);
                assert_eq!(v.name_id, name_id, "{name}");
                if name == "src2" {
                    assert!(v.attribute("user_uuid").is_none());
                }
            }
            // A JSONPath to an array is not a user id.
            Err("") => assert!(token["error"].as_str().unwrap().contains("could not be determined"), "{name}"),
            Err(says) => assert!(token["error"].as_str().unwrap().contains(says), "{name}: {token}"),
        }
    }
}

#[tokio::test]
async fn key_store_location_signs_instead_of_the_subaccount_key() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let own = SamlSigner::generate("own key").unwrap();
    let cert = json!({"Name": "saml.pem", "Type": "PEM", "Content": STANDARD.encode(own.to_pem().expose())});
    let r = env.call(Method::POST, &format!("{V1}/subaccountCertificates"), Some(&t), Some(cert)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // The same key in a PKCS#12 file as `openssl pkcs12 -export` writes it, under a password.
    let p12_key = SamlSigner::generate("p12 key").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.pem"), p12_key.to_pem().expose()).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["pkcs12", "-export", "-in", "in.pem", "-passout", "pass:p12-pass", "-out", "saml.p12"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p12_b64 = STANDARD.encode(std::fs::read(dir.path().join("saml.p12")).unwrap());
    let p12 = json!({"Name": "saml.p12", "Type": "P12", "Content": p12_b64});
    let r = env.call(Method::POST, &format!("{V1}/subaccountCertificates"), Some(&t), Some(p12)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    env.create(&t, "subaccount", saml_dest("own", json!({"KeyStoreLocation": "saml.pem"}))).await;
    let p12_dest = |name: &str, password: Option<&str>| {
        let mut extra = json!({"KeyStoreLocation": "saml.p12"});
        if let Some(p) = password {
            extra["KeyStorePassword"] = json!(p);
        }
        saml_dest(name, extra)
    };
    env.create(&t, "subaccount", p12_dest("p12", Some("p12-pass"))).await;
    env.create(&t, "subaccount", p12_dest("p12-nopass", None)).await;
    env.create(&t, "subaccount", p12_dest("p12-wrong", Some("guess"))).await;
    env.create(&t, "subaccount", saml_dest("gone", json!({"KeyStoreLocation": "nothing.pem"}))).await;

    let ann = user(&env, "ann");
    let r = env.find(&t, "own", &[("X-user-token", &ann)]).await;
    let trusted = TrustedCertificate::from_der(own.certificate_der()).unwrap();
    check(r.json["authTokens"][0]["value"].as_str().unwrap(), &trusted, AUDIENCE);
    // The subaccount key was never needed.
    let r = env.call(Method::GET, &format!("{V1}/saml2Metadata/certificate"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let r = env.find(&t, "p12", &[("X-user-token", &ann)]).await;
    let p12_trusted = TrustedCertificate::from_der(p12_key.certificate_der()).unwrap();
    check(r.json["authTokens"][0]["value"].as_str().unwrap_or_else(|| panic!("{}", r.text)), &p12_trusted, AUDIENCE);
    let r = env.find(&t, "p12-nopass", &[("X-user-token", &ann)]).await;
    let error = r.json["authTokens"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("needs its password") && error.contains("check the destination's KeyStorePassword"),
        "{error}"
    );
    let r = env.find(&t, "p12-wrong", &[("X-user-token", &ann)]).await;
    assert!(r.json["authTokens"][0]["error"].as_str().unwrap().contains("password is wrong"), "{}", r.text);
    let r = env.find(&t, "gone", &[("X-user-token", &ann)]).await;
    assert!(r.json["authTokens"][0]["error"].as_str().unwrap().contains("not in the certificate store"), "{}", r.text);
}

#[tokio::test]
async fn saml_bearer_against_ferrys_token_service() {
    let FerryTokens { env, ts, verifier, token_url, service_token, shutdown } = FerryTokens::start().await;
    const ZONE: &str = FerryTokens::ZONE;
    env.create(
        &service_token,
        "subaccount",
        json!({
            "Name": "sb", "Type": "HTTP", "URL": "https://backend.example", "ProxyType": "Internet",
            "Authentication": "OAuth2SAMLBearerAssertion", "tokenServiceURL": token_url, "audience": token_url,
            "clientKey": "sb-app", "tokenServiceUser": "sb-app", "tokenServicePassword": "app-secret",
            "authnContextClassRef": "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession",
            "includeSigningCertificateInSAMLAssertion": "true"
        }),
    )
    .await;
    let alice = ts.issue_user_token("alice", "sb-app").unwrap();

    // The token service does not trust the subaccount's key yet: a failed token, with its reason.
    let r = env.find(&service_token, "sb", &[("X-user-token", &alice)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let error = r.json["authTokens"][0]["error"].as_str().unwrap();
    assert!(error.contains("invalid_grant") && error.contains("trusts no SAML identity provider"), "{error}");

    // An operator registers the subaccount's certificate with the token service.
    ts.trust_saml_idp(ZONE, certificate(&env, &service_token).await).unwrap();
    let r = env.find(&service_token, "sb", &[("X-user-token", &alice)]).await;
    let token = &r.json["authTokens"][0];
    assert!(token.get("error").is_none(), "{}", r.text);
    assert_eq!(token["type"], "Bearer");
    let access = token["value"].as_str().unwrap().to_owned();
    let claims = verifier.verify(&access).await.unwrap();
    assert_eq!((claims.user_name.as_deref(), claims.user_id.as_deref()), (Some("alice"), Some("u-alice")));
    assert_eq!(claims.zid, ZONE);
    assert_eq!(claims.client_id.as_deref(), Some("sb-app"));
    assert_eq!(claims.grant_type.as_deref(), Some(GRANT_SAML2_BEARER));

    // The token works at a service that checks it: the Destination Service itself, as the
    // bearer of a find call (user tokens may call find).
    let r = env.find(&access, "sb", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["destinationConfiguration"]["Name"], "sb");

    // Cached per user: the same token again without a new grant.
    let again = env.find(&service_token, "sb", &[("X-user-token", &alice)]).await;
    assert_eq!(again.json["authTokens"][0]["value"], access.as_str());
    shutdown.cancel();
}

#[tokio::test]
async fn saml_bearer_request_form_cache_and_client_provided_assertions() {
    let env = Env::new().await;
    let remote = TokenServer::start().await;
    let t = env.token("zone-1", "client-1");
    let token_url = remote.url("/oauth/token");
    let bearer = |name: &str, extra: Value| {
        let mut d = saml_dest(name, extra);
        d["Authentication"] = json!("OAuth2SAMLBearerAssertion");
        d["tokenServiceURL"] = json!(token_url);
        d["clientKey"] = json!("client-key");
        d["companyId"] = json!("ACME");
        d["scope"] = json!("read");
        d
    };
    env.create(&t, "subaccount", bearer("gen", json!({"tokenServiceUser": "tsu", "tokenServicePassword": "tsp"})))
        .await;
    env.create(&t, "subaccount", bearer("given", json!({"SAMLAssertionProvider": "ClientProvided"}))).await;

    let ann = user(&env, "ann");
    let r = env.find(&t, "gen", &[("X-user-token", &ann)]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "remote-token-1", "{}", r.text);
    let call = remote.calls().pop().unwrap();
    let form: Vec<&str> = call.form.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(form, ["grant_type", "assertion", "client_id", "company_id", "scope"]);
    assert_eq!(call.form("grant_type"), Some(GRANT_SAML2_BEARER));
    assert_eq!((call.form("client_id"), call.form("company_id")), (Some("client-key"), Some("ACME")));
    let basic = call.headers["authorization"].to_str().unwrap();
    assert_eq!(basic, format!("Basic {}", STANDARD.encode("tsu:tsp")));
    // RFC 7522: base64url without padding, addressed to the token service.
    let assertion = call.form("assertion").unwrap();
    assert!(!assertion.contains(['+', '/', '=']));
    let trusted = certificate(&env, &t).await;
    assert_eq!(check(assertion, &trusted, &token_url).name_id, "ann");

    // The token is cached for the user (a new assertion does not miss the cache); another
    // user gets its own.
    env.find(&t, "gen", &[("X-user-token", &ann)]).await;
    assert_eq!(remote.count(), 1);
    env.find(&t, "gen", &[("X-user-token", &user(&env, "bob"))]).await;
    assert_eq!(remote.count(), 2);

    // A cached token is found before any assertion is signed: with its signing key gone, the
    // destination still answers the cached token, and only a new user fails.
    let own = SamlSigner::generate("own key").unwrap();
    let cert = json!({"Name": "k.pem", "Type": "PEM", "Content": STANDARD.encode(own.to_pem().expose())});
    env.call(Method::POST, &format!("{V1}/subaccountCertificates"), Some(&t), Some(cert)).await;
    env.create(&t, "subaccount", bearer("keyed", json!({"KeyStoreLocation": "k.pem"}))).await;
    let r = env.find(&t, "keyed", &[("X-user-token", &ann)]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "remote-token-1", "{}", r.text);
    let r = env.call(Method::DELETE, &format!("{V1}/subaccountCertificates/k.pem"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let calls = remote.count();
    let r = env.find(&t, "keyed", &[("X-user-token", &ann)]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "remote-token-1", "{}", r.text);
    let r = env.find(&t, "keyed", &[("X-user-token", &user(&env, "carl"))]).await;
    assert!(r.json["authTokens"][0]["error"].as_str().unwrap().contains("not in the certificate store"));
    assert_eq!(remote.count(), calls);

    // ClientProvided: the caller's assertion goes out as it is; none sent fails the token.
    let r = env.find(&t, "given", &[("X-samlAssertion", "PHNhbWw-client")]).await;
    assert_eq!(r.json["authTokens"][0]["value"], "remote-token-1", "{}", r.text);
    assert_eq!(remote.calls().pop().unwrap().form("assertion"), Some("PHNhbWw-client"));
    let r = env.find(&t, "given", &[]).await;
    assert!(r.json["authTokens"][0]["error"].as_str().unwrap().contains("X-samlAssertion"), "{}", r.text);
}
