#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The shared token verifier: a table of JWT attacks against Ferry's own (tenant-bound) keys and
//! an external OIDC issuer served by a small discovery + JWKS server on a real socket, plus the
//! key cache's fetch behaviour (caching, rate-limited refetch, rotation, unavailability).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{self as sig, KeyPair as _};
use axum::Json;
use axum::extract::State;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64URL};
use ferry_auth::{KeySet, OidcIssuer, OidcTrust, TrustedIssuer, Verifier, VerifyError};
use serde_json::{Value, json};

const ZONE_A: &str = "zone-a";
const ZONE_B: &str = "zone-b";
const EXT_SUBACCOUNT: &str = "zone-ext";
const EXT_AUDIENCE: &str = "ferry-api";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn b64json(v: &Value) -> String {
    B64URL.encode(serde_json::to_vec(v).unwrap())
}

/// A key the test signs arbitrary JOSE headers with (Ferry's `KeySet` only signs its own).
enum TestKey {
    Rsa(KeyPair),
    Ec(sig::EcdsaKeyPair, &'static str, usize),
}

impl TestKey {
    fn rsa() -> Self {
        Self::Rsa(KeyPair::generate(KeySize::Rsa2048).unwrap())
    }
    fn p256() -> Self {
        Self::Ec(sig::EcdsaKeyPair::generate(&sig::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap(), "P-256", 32)
    }
    fn p384() -> Self {
        Self::Ec(sig::EcdsaKeyPair::generate(&sig::ECDSA_P384_SHA384_FIXED_SIGNING).unwrap(), "P-384", 48)
    }

    fn jwk(&self, kid: &str, alg: Option<&str>) -> Value {
        let mut jwk = match self {
            Self::Rsa(pair) => {
                let c = PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
                json!({"kty": "RSA", "kid": kid, "use": "sig", "n": B64URL.encode(&c.n), "e": B64URL.encode(&c.e)})
            }
            Self::Ec(pair, crv, len) => {
                let point = pair.public_key().as_ref();
                json!({"kty": "EC", "kid": kid, "crv": crv,
                       "x": B64URL.encode(&point[1..1 + len]), "y": B64URL.encode(&point[1 + len..])})
            }
        };
        if let Some(a) = alg {
            jwk["alg"] = json!(a);
        }
        jwk
    }

    /// Signs with the algorithm the header names (RS*/PS256 for RSA, ES* for EC).
    fn sign(&self, header: &Value, payload: &Value) -> String {
        let input = format!("{}.{}", b64json(header), b64json(payload));
        let rng = SystemRandom::new();
        let signature = match self {
            Self::Rsa(pair) => {
                let enc: &dyn sig::RsaEncoding = match header["alg"].as_str().unwrap_or("RS256") {
                    "RS384" => &sig::RSA_PKCS1_SHA384,
                    "RS512" => &sig::RSA_PKCS1_SHA512,
                    "PS256" => &sig::RSA_PSS_SHA256,
                    _ => &sig::RSA_PKCS1_SHA256,
                };
                let mut out = vec![0; pair.public_modulus_len()];
                pair.sign(enc, &rng, input.as_bytes(), &mut out).unwrap();
                out
            }
            Self::Ec(pair, ..) => pair.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
        };
        format!("{input}.{}", B64URL.encode(signature))
    }
}

/// A minimal OpenID provider: discovery and JWKS, counting requests.
struct Idp {
    issuer: String,
    jwks: Arc<RwLock<Value>>,
    discovery_hits: Arc<AtomicUsize>,
    jwks_hits: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct IdpState {
    discovery: Value,
    jwks: Arc<RwLock<Value>>,
    discovery_hits: Arc<AtomicUsize>,
    jwks_hits: Arc<AtomicUsize>,
}

impl Idp {
    /// Serves `keys`; the discovery document names `claimed_issuer` (default: its own URL).
    async fn start(keys: Vec<Value>, claimed_issuer: Option<&str>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let issuer = format!("http://{addr}");
        let jwks = Arc::new(RwLock::new(json!({ "keys": keys })));
        let state = IdpState {
            discovery: json!({
                "issuer": claimed_issuer.unwrap_or(&issuer),
                "jwks_uri": format!("{issuer}/jwks"),
                "token_endpoint": format!("{issuer}/token"),
            }),
            jwks: jwks.clone(),
            discovery_hits: Arc::default(),
            jwks_hits: Arc::default(),
        };
        let (discovery_hits, jwks_hits) = (state.discovery_hits.clone(), state.jwks_hits.clone());
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(|State(s): State<IdpState>| async move {
                    s.discovery_hits.fetch_add(1, Ordering::SeqCst);
                    Json(s.discovery)
                }),
            )
            .route(
                "/jwks",
                axum::routing::get(|State(s): State<IdpState>| async move {
                    s.jwks_hits.fetch_add(1, Ordering::SeqCst);
                    Json(s.jwks.read().unwrap().clone())
                }),
            )
            .with_state(state);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { issuer, jwks, discovery_hits, jwks_hits }
    }

    fn hits(&self) -> (usize, usize) {
        (self.discovery_hits.load(Ordering::SeqCst), self.jwks_hits.load(Ordering::SeqCst))
    }

    fn trust(&self) -> OidcTrust {
        OidcTrust {
            issuer: self.issuer.clone(),
            subaccount: EXT_SUBACCOUNT.into(),
            audiences: vec![EXT_AUDIENCE.into()],
        }
    }
}

fn http() -> reqwest::Client {
    ferry_core::tls::http_client(None).unwrap()
}

struct World {
    a: Arc<KeySet>,
    b: Arc<KeySet>,
    ext_rsa: TestKey,
    ext_ec: TestKey,
    ext_ec384: TestKey,
    idp: Idp,
    verifier: Verifier,
}

impl World {
    async fn new() -> Self {
        let (ext_rsa, ext_ec, ext_ec384) = (TestKey::rsa(), TestKey::p256(), TestKey::p384());
        let idp = Idp::start(
            vec![
                ext_rsa.jwk("ext-rsa", None),
                ext_ec.jwk("ext-ec", Some("ES256")),
                ext_ec384.jwk("ext-ec384", None),
                // Unusable entries are skipped, not fatal.
                json!({"kty": "oct", "kid": "sym", "k": "c2VjcmV0"}),
                json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"}),
                json!({"kty": "EC", "kid": "bad-ec", "crv": "P-521", "x": "AA", "y": "AA"}),
            ],
            None,
        )
        .await;
        let a = Arc::new(KeySet::generate().unwrap());
        let b = Arc::new(KeySet::generate().unwrap());
        let verifier = Verifier::for_tenants([(ZONE_A.to_owned(), a.clone()), (ZONE_B.to_owned(), b.clone())], http())
            .with_issuers([TrustedIssuer::oidc(idp.trust()).unwrap()]);
        Self { a, b, ext_rsa, ext_ec, ext_ec384, idp, verifier }
    }

    fn own(&self, zid: &str) -> Value {
        json!({"zid": zid, "client_id": "sb-app!t1", "exp": now() + 600, "scope": ["app!t1.Read"],
               "iss": "http://127.0.0.1:18081/oauth/token", "ext_attr": {"zdn": "sub"}})
    }

    fn ext(&self) -> Value {
        json!({"iss": self.idp.issuer, "sub": "client-1", "client_id": "client-1", "aud": EXT_AUDIENCE,
               "exp": now() + 600, "iat": now(), "scope": "openid"})
    }

    fn ext_token(&self, payload: &Value) -> String {
        self.ext_rsa.sign(&json!({"alg": "RS256", "kid": "ext-rsa", "typ": "at+jwt"}), payload)
    }
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    if value.is_null() {
        v.as_object_mut().unwrap().remove(key);
    } else {
        v[key] = value;
    }
    v
}

/// Replaces part `i` of a compact JWT.
fn replace_part(token: &str, i: usize, part: &str) -> String {
    let mut parts: Vec<&str> = token.split('.').collect();
    parts[i] = part;
    parts.join(".")
}

fn hs(alg: &str, secret: &[u8], header_kid: &str, payload: &Value) -> String {
    let h = json!({"alg": alg, "kid": header_kid, "typ": "JWT"});
    let input = format!("{}.{}", b64json(&h), b64json(payload));
    let algo = match alg {
        "HS384" => aws_lc_rs::hmac::HMAC_SHA384,
        "HS512" => aws_lc_rs::hmac::HMAC_SHA512,
        _ => aws_lc_rs::hmac::HMAC_SHA256,
    };
    let tag = aws_lc_rs::hmac::sign(&aws_lc_rs::hmac::Key::new(algo, secret), input.as_bytes());
    format!("{input}.{}", B64URL.encode(tag.as_ref()))
}

/// What no client-facing reason may contain: key material, PEM, parser or library text.
fn assert_safe(reason: &str, material: &[String]) {
    assert!(reason.len() < 90 && reason.is_ascii(), "reason too long or not ASCII: {reason}");
    for m in material {
        assert!(!reason.contains(m.as_str()), "reason leaks key material: {reason}");
    }
    for word in ["BEGIN", "line", "column", "serde", "base64", "aws", "Unspecified", "invalid type", "{", "\n"] {
        assert!(!reason.contains(word), "reason leaks internals ({word}): {reason}");
    }
}

#[tokio::test]
async fn attack_table_every_row_is_rejected_with_its_reason() {
    let w = World::new().await;
    let kid_a = w.a.current_kid().unwrap();
    let jwk_a = w.a.jwks().keys.remove(0);
    let pem = jwk_a.public_key_pem().unwrap();
    let der = STANDARD.decode(pem.lines().filter(|l| !l.starts_with("-----")).collect::<String>()).unwrap();
    let material = vec![jwk_a.n.clone(), jwk_a.n[..40].to_owned(), pem.lines().nth(1).unwrap().to_owned()];

    let good_a = w.a.sign(&w.own(ZONE_A), &[]).unwrap();
    let other = KeySet::generate().unwrap();
    let huge = w.a.sign(&with(w.own(ZONE_A), "pad", json!("x".repeat(20_000))), &[]).unwrap();
    // Signed by a key that is not A's, under A's kid.
    let forged_kid = {
        let impostor = TestKey::rsa();
        impostor.sign(&json!({"alg": "RS256", "kid": kid_a}), &w.own(ZONE_A))
    };
    let ext = w.ext();

    use VerifyError as E;
    let rows: Vec<(&str, String, VerifyError)> = vec![
        ("empty", String::new(), E::Missing),
        ("blank", "   ".into(), E::Missing),
        // Algorithm confusion.
        (
            "alg none, no signature",
            format!("{}.{}.", b64json(&json!({"alg": "none"})), b64json(&w.own(ZONE_A))),
            E::Algorithm,
        ),
        (
            "alg none, with kid and a signature",
            replace_part(&good_a, 0, &b64json(&json!({"alg": "none", "kid": kid_a}))),
            E::Algorithm,
        ),
        ("alg None", replace_part(&good_a, 0, &b64json(&json!({"alg": "None", "kid": kid_a}))), E::Algorithm),
        ("HS256, secret = public key PEM", hs("HS256", pem.as_bytes(), &kid_a, &w.own(ZONE_A)), E::Algorithm),
        (
            "HS256, secret = PEM + newline",
            hs("HS256", format!("{pem}\n").as_bytes(), &kid_a, &w.own(ZONE_A)),
            E::Algorithm,
        ),
        ("HS256, secret = public key DER", hs("HS256", &der, &kid_a, &w.own(ZONE_A)), E::Algorithm),
        ("HS512, secret = public key DER", hs("HS512", &der, &kid_a, &w.own(ZONE_A)), E::Algorithm),
        (
            "HS256 against the external issuer's key",
            hs("HS256", w.ext_rsa.jwk("ext-rsa", None)["n"].as_str().unwrap().as_bytes(), "ext-rsa", &ext),
            E::Algorithm,
        ),
        ("alg missing", replace_part(&good_a, 0, &b64json(&json!({"kid": kid_a}))), E::Algorithm),
        ("alg lowercase", replace_part(&good_a, 0, &b64json(&json!({"alg": "rs256", "kid": kid_a}))), E::Algorithm),
        (
            "alg not a string",
            replace_part(&good_a, 0, &b64json(&json!({"alg": ["RS256"], "kid": kid_a}))),
            E::Algorithm,
        ),
        (
            "RS384 on Ferry's own RS256 key",
            replace_part(&good_a, 0, &b64json(&json!({"alg": "RS384", "kid": kid_a}))),
            E::Algorithm,
        ),
        (
            "ES256 header on an external RSA key",
            w.ext_ec.sign(&json!({"alg": "ES256", "kid": "ext-rsa"}), &ext),
            E::Algorithm,
        ),
        (
            "RS256 header on a key that declares ES256",
            w.ext_rsa.sign(&json!({"alg": "RS256", "kid": "ext-ec"}), &ext),
            E::Algorithm,
        ),
        (
            "ES384 header on a P-256 key",
            w.ext_ec384.sign(&json!({"alg": "ES384", "kid": "ext-ec"}), &ext),
            E::Algorithm,
        ),
        // Time.
        ("expired", w.a.sign(&with(w.own(ZONE_A), "exp", json!(now() - 120)), &[]).unwrap(), E::Expired),
        ("exp far in the past", w.a.sign(&with(w.own(ZONE_A), "exp", json!(1)), &[]).unwrap(), E::Expired),
        ("no exp", w.a.sign(&with(w.own(ZONE_A), "exp", Value::Null), &[]).unwrap(), E::MissingClaim("exp")),
        (
            "exp not a number",
            w.a.sign(&with(w.own(ZONE_A), "exp", json!("later")), &[]).unwrap(),
            E::MissingClaim("exp"),
        ),
        ("exp negative", w.a.sign(&with(w.own(ZONE_A), "exp", json!(-5)), &[]).unwrap(), E::MissingClaim("exp")),
        ("not yet valid", w.a.sign(&with(w.own(ZONE_A), "nbf", json!(now() + 3600)), &[]).unwrap(), E::NotYetValid),
        ("nbf not a number", w.a.sign(&with(w.own(ZONE_A), "nbf", json!("soon")), &[]).unwrap(), E::Malformed),
        ("external expired", w.ext_token(&with(ext.clone(), "exp", json!(now() - 120))), E::Expired),
        ("external not yet valid", w.ext_token(&with(ext.clone(), "nbf", json!(now() + 3600))), E::NotYetValid),
        // Issuer, audience, tenant.
        (
            "external key, wrong issuer",
            w.ext_token(&with(ext.clone(), "iss", json!("https://evil.example"))),
            E::Issuer,
        ),
        ("external key, no issuer", w.ext_token(&with(ext.clone(), "iss", Value::Null)), E::Issuer),
        (
            "external issuer, trailing slash is another issuer",
            w.ext_token(&with(ext.clone(), "iss", json!(format!("{}/", w.idp.issuer)))),
            E::Issuer,
        ),
        ("external, wrong audience", w.ext_token(&with(ext.clone(), "aud", json!("other-api"))), E::Audience),
        ("external, no audience", w.ext_token(&with(ext.clone(), "aud", Value::Null)), E::Audience),
        (
            "external, audience only as a scope without a dot",
            w.ext_token(&with(with(ext.clone(), "aud", Value::Null), "scope", json!(["ferry-apiRead"]))),
            E::Audience,
        ),
        (
            "external, zid of another subaccount",
            w.ext_token(&with(ext.clone(), "zid", json!(ZONE_A))),
            E::TenantMismatch,
        ),
        (
            "external, app_tid of another subaccount",
            w.ext_token(&with(ext.clone(), "app_tid", json!(ZONE_B))),
            E::TenantMismatch,
        ),
        ("tenant A's key claiming tenant B", w.a.sign(&w.own(ZONE_B), &[]).unwrap(), E::TenantMismatch),
        ("tenant B's key claiming tenant A", w.b.sign(&w.own(ZONE_A), &[]).unwrap(), E::TenantMismatch),
        (
            "tenant A's key claiming B via zone_uuid",
            w.a.sign(&with(with(w.own(ZONE_A), "zid", Value::Null), "zone_uuid", json!(ZONE_B)), &[]).unwrap(),
            E::TenantMismatch,
        ),
        (
            "external, zid right but app_tid of another subaccount",
            w.ext_token(&with(with(ext.clone(), "zid", json!(EXT_SUBACCOUNT)), "app_tid", json!(ZONE_A))),
            E::TenantMismatch,
        ),
        ("external, zid not a string", w.ext_token(&with(ext.clone(), "zid", json!(7))), E::TenantMismatch),
        (
            "tenant A's key, zid A but app_tid B",
            w.a.sign(&with(w.own(ZONE_A), "app_tid", json!(ZONE_B)), &[]).unwrap(),
            E::TenantMismatch,
        ),
        (
            "own token without zid",
            w.a.sign(&with(w.own(ZONE_A), "zid", Value::Null), &[]).unwrap(),
            E::MissingClaim("zid"),
        ),
        // Keys.
        ("unknown kid", other.sign(&w.own(ZONE_A), &[]).unwrap(), E::UnknownKey),
        ("no kid", TestKey::rsa().sign(&json!({"alg": "RS256"}), &w.own(ZONE_A)), E::MissingKeyId),
        ("empty kid", replace_part(&good_a, 0, &b64json(&json!({"alg": "RS256", "kid": ""}))), E::MissingKeyId),
        ("kid not a string", replace_part(&good_a, 0, &b64json(&json!({"alg": "RS256", "kid": 7}))), E::MissingKeyId),
        ("signature from another key under A's kid", forged_kid, E::Signature),
        ("payload swapped after signing", replace_part(&good_a, 1, &b64json(&w.own(ZONE_B))), E::Signature),
        (
            "signature of another token",
            replace_part(&good_a, 2, good_a.split('.').nth(2).unwrap().get(..12).unwrap()),
            E::Signature,
        ),
        ("empty signature", replace_part(&good_a, 2, ""), E::Signature),
        (
            "external signature swapped",
            replace_part(&w.ext_token(&ext), 2, good_a.split('.').nth(2).unwrap()),
            E::Signature,
        ),
        // Headers.
        ("crit header", w.a.sign(&w.own(ZONE_A), &[("crit", "exp")]).unwrap(), E::CriticalHeader),
        (
            "crit array (b64 unencoded payload)",
            w.ext_rsa.sign(&json!({"alg": "RS256", "kid": "ext-rsa", "b64": false, "crit": ["b64"]}), &ext),
            E::CriticalHeader,
        ),
        // Shape.
        ("two parts", good_a.rsplit_once('.').unwrap().0.to_owned(), E::Malformed),
        ("four parts", format!("{good_a}.x"), E::Malformed),
        ("one part", "eyJhbGciOiJSUzI1NiJ9".into(), E::Malformed),
        ("not a JWT", "not-a-jwt".into(), E::Malformed),
        ("bad base64 in header", replace_part(&good_a, 0, "eyJ!bGci"), E::Malformed),
        ("bad base64 in payload", replace_part(&good_a, 1, "e30*"), E::Malformed),
        ("bad base64 in signature", replace_part(&good_a, 2, "a+b/c"), E::Malformed),
        ("padded base64", replace_part(&good_a, 1, &format!("{}=", B64URL.encode("{}{"))), E::Malformed),
        ("header JSON is an array", replace_part(&good_a, 0, &b64json(&json!(["RS256"]))), E::Malformed),
        ("header JSON is a string", replace_part(&good_a, 0, &b64json(&json!("RS256"))), E::Malformed),
        ("payload JSON is a number", replace_part(&good_a, 1, &b64json(&json!(42))), E::Malformed),
        ("payload JSON is null", replace_part(&good_a, 1, &b64json(&Value::Null)), E::Malformed),
        ("payload not JSON", replace_part(&good_a, 1, &B64URL.encode("{\"zid\":")), E::Malformed),
        ("header not UTF-8", replace_part(&good_a, 0, &B64URL.encode([0xff, 0xfe, 0x7b])), E::Malformed),
        ("truncated in the payload", good_a[..good_a.find('.').unwrap() + 20].to_owned(), E::Malformed),
        ("oversized", huge, E::TooLarge),
        ("oversized garbage", "a.".repeat(10_000), E::TooLarge),
    ];

    let mut failures = Vec::new();
    for (name, token, want) in &rows {
        match w.verifier.verify(token).await {
            Ok(c) => failures.push(format!("{name}: accepted (zid {})", c.zid)),
            Err(got) if got != *want => failures.push(format!("{name}: got {got:?}, want {want:?}")),
            Err(got) => assert_safe(&got.to_string(), &material),
        }
    }
    assert!(failures.is_empty(), "{} of {} rows wrong:\n{}", failures.len(), rows.len(), failures.join("\n"));

    // The good tokens of the same world pass, so the rows failed for the reason they test.
    assert_eq!(w.verifier.verify(&good_a).await.unwrap().zid, ZONE_A);
    assert_eq!(w.verifier.verify(&w.b.sign(&w.own(ZONE_B), &[]).unwrap()).await.unwrap().zid, ZONE_B);
    assert_eq!(w.verifier.verify(&format!("  {good_a}\n")).await.unwrap().zid, ZONE_A);
}

#[tokio::test]
async fn external_tokens_are_accepted_with_every_allowed_algorithm() {
    let w = World::new().await;
    let ext = w.ext();
    for (alg, key, kid) in [
        ("RS256", &w.ext_rsa, "ext-rsa"),
        ("RS384", &w.ext_rsa, "ext-rsa"),
        ("RS512", &w.ext_rsa, "ext-rsa"),
        ("PS256", &w.ext_rsa, "ext-rsa"),
        ("ES256", &w.ext_ec, "ext-ec"),
        ("ES384", &w.ext_ec384, "ext-ec384"),
    ] {
        let token = key.sign(&json!({"alg": alg, "kid": kid, "typ": "at+jwt"}), &ext);
        let c = w.verifier.verify(&token).await.unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(c.zid, EXT_SUBACCOUNT, "{alg}: the trust entry's subaccount");
        assert_eq!(c.client_id.as_deref(), Some("client-1"));
        assert_eq!(c.iss.as_deref(), Some(w.idp.issuer.as_str()));
        assert_eq!(c.scope, ["openid"]);
    }
    // The audience may be one of several, or (XSUAA style) the prefix of a scope; a zid equal
    // to the subaccount is fine.
    let variants = [
        with(ext.clone(), "aud", json!(["x", EXT_AUDIENCE])),
        with(with(ext.clone(), "aud", Value::Null), "scope", json!(["ferry-api.Read"])),
        with(with(ext.clone(), "aud", Value::Null), "scope", json!("openid ferry-api.Write")),
        with(ext.clone(), "zid", json!(EXT_SUBACCOUNT)),
        with(ext.clone(), "exp", json!(now() as f64 + 60.5)),
    ];
    for payload in &variants {
        assert!(w.verifier.verify(&w.ext_token(payload)).await.is_ok(), "{payload}");
    }
    // One discovery and one JWKS fetch served all of it.
    assert_eq!(w.idp.hits(), (1, 1));
}

#[tokio::test]
async fn own_tokens_check_the_audience_only_when_configured() {
    let a = Arc::new(KeySet::generate().unwrap());
    let token = |claims: Value| a.sign(&claims, &[]).unwrap();
    let base = json!({"zid": ZONE_A, "exp": now() + 60, "aud": ["sb-dest!b1"], "scope": ["dest!b1.Read"]});
    let open = Verifier::for_tenants([(ZONE_A.to_owned(), a.clone())], http());
    assert!(open.verify(&token(with(base.clone(), "aud", Value::Null))).await.is_ok());
    let strict = Verifier::for_tenants([(ZONE_A.to_owned(), a.clone())], http()).with_audiences(vec!["dest!b1".into()]);
    assert!(strict.verify(&token(base.clone())).await.is_ok(), "scope prefix matches");
    assert!(strict.verify(&token(with(base.clone(), "aud", json!("dest!b1")))).await.is_ok());
    let wrong = with(with(base, "scope", json!(["other!b2.Read", "dest!b1"])), "aud", json!(["dest!b1x"]));
    assert_eq!(strict.verify(&token(wrong)).await, Err(VerifyError::Audience));
    // The local (unbound) issuer accepts any zone it signed; tenant-bound ones do not.
    let local = Verifier::local(a.clone());
    assert_eq!(local.verify(&token(json!({"zid": ZONE_B, "exp": now() + 60}))).await.unwrap().zid, ZONE_B);
}

#[tokio::test]
async fn unknown_kids_refetch_at_most_once_per_interval() {
    let first = TestKey::rsa();
    let idp = Idp::start(vec![first.jwk("k1", None)], None).await;
    let v = Arc::new(Verifier::new(vec![TrustedIssuer::Oidc(OidcIssuer::new(idp.trust()).unwrap())], http()));
    let claims = json!({"iss": idp.issuer, "aud": EXT_AUDIENCE, "exp": now() + 60});
    let t1 = first.sign(&json!({"alg": "RS256", "kid": "k1"}), &claims);
    assert!(v.verify(&t1).await.is_ok());
    assert_eq!(idp.hits(), (1, 1));

    // A burst of random kids, concurrently and in sequence: no refetch inside the interval.
    let random = |i: usize| first.sign(&json!({"alg": "RS256", "kid": format!("random-{i}")}), &claims);
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..50 {
        let (v, t) = (v.clone(), random(i));
        burst.spawn(async move { v.verify(&t).await });
    }
    while let Some(r) = burst.join_next().await {
        assert_eq!(r.unwrap(), Err(VerifyError::UnknownKey));
    }
    assert_eq!(idp.hits(), (1, 1), "random kids must not cause fetches");
    assert!(v.verify(&t1).await.is_ok());
    assert_eq!(idp.hits(), (1, 1));

    // The provider rotates; with a short interval the new kid is picked up by one refetch,
    // the discovery document staying cached.
    let second = TestKey::p256();
    // Generated before the clock starts: RSA key generation in a debug build on a busy
    // machine can take longer than the refetch interval.
    let third = TestKey::rsa();
    idp.jwks.write().unwrap()["keys"] = json!([first.jwk("k1", None), second.jwk("k2", None)]);
    let v = Verifier::new(
        vec![TrustedIssuer::Oidc(OidcIssuer::new(idp.trust()).unwrap().with_min_refetch(Duration::from_millis(1000)))],
        http(),
    );
    assert!(v.verify(&t1).await.is_ok());
    let (d0, j0) = idp.hits();
    let t2 = second.sign(&json!({"alg": "ES256", "kid": "k2"}), &claims);
    assert!(v.verify(&t2).await.is_ok(), "k2 is in the first fetch");
    idp.jwks.write().unwrap()["keys"] = json!([second.jwk("k2", None), third.jwk("k3", None)]);
    let t3 = third.sign(&json!({"alg": "RS256", "kid": "k3"}), &claims);
    assert_eq!(v.verify(&t3).await, Err(VerifyError::UnknownKey), "inside the interval");
    assert_eq!(idp.hits(), (d0, j0));
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert!(v.verify(&t3).await.is_ok(), "refetched on the unknown kid");
    assert_eq!(idp.hits(), (d0, j0 + 1));
    // k1 was dropped by the provider: gone after the refetch too.
    assert_eq!(v.verify(&t1).await, Err(VerifyError::UnknownKey));
}

#[tokio::test]
async fn unreachable_or_lying_providers_make_keys_unavailable() {
    // Nothing listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let key = TestKey::rsa();
    let issuer = format!("http://{closed}");
    let v = Verifier::new(
        vec![
            TrustedIssuer::oidc(OidcTrust { issuer: issuer.clone(), subaccount: "s".into(), audiences: vec![] })
                .unwrap(),
        ],
        http(),
    );
    let t = key.sign(&json!({"alg": "RS256", "kid": "k"}), &json!({"iss": issuer, "exp": now() + 60}));
    assert_eq!(v.verify(&t).await, Err(VerifyError::KeysUnavailable));

    // A discovery document that names another issuer is not followed.
    let idp = Idp::start(vec![key.jwk("k", None)], Some("https://someone.else")).await;
    let v = Verifier::new(vec![TrustedIssuer::oidc(idp.trust()).unwrap()], http());
    let t = key.sign(
        &json!({"alg": "RS256", "kid": "k"}),
        &json!({"iss": idp.issuer, "aud": EXT_AUDIENCE, "exp": now() + 60}),
    );
    assert_eq!(v.verify(&t).await, Err(VerifyError::KeysUnavailable));
    assert_eq!(idp.hits(), (1, 0));
    // The failure is rate limited as well.
    assert_eq!(v.verify(&t).await, Err(VerifyError::KeysUnavailable));
    assert_eq!(idp.hits(), (1, 0));
}

#[tokio::test]
async fn remote_ferry_jwks_is_rs256_and_any_zone() {
    let a = Arc::new(KeySet::generate().unwrap());
    let jwks: Vec<Value> = a.jwks().keys.iter().map(|k| serde_json::to_value(k).unwrap()).collect();
    let idp = Idp::start(jwks, None).await;
    let v = Verifier::new(vec![TrustedIssuer::jwks_url(format!("{}/jwks", idp.issuer))], http());
    let t = a.sign(&json!({"zid": ZONE_B, "exp": now() + 60}), &[]).unwrap();
    assert_eq!(v.verify(&t).await.unwrap().zid, ZONE_B);
    assert_eq!(idp.hits(), (0, 1));
    let t = replace_part(&t, 0, &b64json(&json!({"alg": "PS256", "kid": a.current_kid().unwrap()})));
    assert_eq!(v.verify(&t).await, Err(VerifyError::Algorithm));
}
