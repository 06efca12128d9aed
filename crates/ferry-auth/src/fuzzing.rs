//! Property checks shared by the fuzz targets (`fuzz/` at the repository root) and the corpus
//! replay tests. Each function panics when a property does not hold.
//!
//! Both verifiers are fuzzed around a genuine signed input (key generated once per process): the
//! first input byte picks between "the input is the token/document" and "the input is a list of
//! edits to the signed original". Either way nothing but the original may verify, except that an
//! XML edit the canonical form ignores (quotes, blanks inside tags) may verify to the same content.
#![allow(clippy::expect_used)]

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use serde_json::json;

use crate::jwt::{KeySet, Verifier};
use crate::saml::{self, Assertion, Expectations, SamlSigner, TrustedCertificate, VerifiedAssertion};

/// Applies `(position, operation)` byte pairs to `original`: flip bits, insert or delete a byte.
fn edit(original: &[u8], edits: &[u8]) -> Vec<u8> {
    let mut out = original.to_vec();
    for e in edits.chunks_exact(3) {
        let pos = (usize::from(e[0]) << 8 | usize::from(e[1])) % (out.len() + 1);
        match e[2] & 3 {
            0 if pos < out.len() => out[pos] ^= e[2] | 1,
            1 => out.insert(pos, e[2] >> 2 | 0x20),
            2 if pos < out.len() => {
                out.remove(pos);
            }
            _ => {}
        }
    }
    out
}

/// Runs a future that never waits (a verifier trusting only local keys), without a runtime.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("a local verifier does not wait"),
    }
}

struct Jwt {
    verifier: Verifier,
    token: String,
}

fn jwt_fixture() -> &'static Jwt {
    static FIXTURE: OnceLock<Jwt> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let keys = Arc::new(KeySet::generate().expect("key generation"));
        let claims = json!({"zid": "z1", "client_id": "c1", "exp": 4_000_000_000u64, "scope": ["a"], "iss": "x"});
        let token = keys.sign(&claims, &[]).expect("signing");
        Jwt { verifier: Verifier::local(keys), token }
    })
}

/// JWT parsing and verification: no panic, and only the signed token itself verifies.
pub fn jwt(data: &[u8]) {
    let fx = jwt_fixture();
    let Some((&mode, rest)) = data.split_first() else { return };
    let candidate = if mode & 1 == 0 { rest.to_vec() } else { edit(fx.token.as_bytes(), rest) };
    let Ok(token) = std::str::from_utf8(&candidate) else { return };
    if let Ok(claims) = ready(fx.verifier.verify(token)) {
        assert_eq!(token.trim(), fx.token, "a changed token verified: {token:?}");
        assert_eq!(claims.zid, "z1");
    }
}

const NOW: u64 = 1_800_000_000;
const TOKEN_URL: &str = "https://auth.example/oauth/token";

struct Saml {
    trusted: Vec<TrustedCertificate>,
    document: String,
    content: VerifiedAssertion,
}

fn saml_fixture() -> &'static Saml {
    static FIXTURE: OnceLock<Saml> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let signer = SamlSigner::generate("fuzz idp").expect("key generation");
        let attributes = vec![("Groups".to_owned(), vec!["a&b".to_owned(), "<c>".to_owned()])];
        let document = signer
            .sign_assertion(&Assertion {
                issuer: "idp",
                name_id: "ann@example.com",
                name_id_format: saml::NAMEID_EMAIL,
                name_qualifier: Some("q\"1"),
                recipient: TOKEN_URL,
                audience: TOKEN_URL,
                authn_context_class_ref: "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession",
                attributes: &attributes,
                now: NOW,
                validity_secs: 600,
                include_certificate: true,
            })
            .expect("signing");
        let trusted = vec![TrustedCertificate::from_der(signer.certificate_der()).expect("certificate")];
        let content = saml::verify_assertion(document.as_bytes(), &trusted, &expectations()).expect("verifies");
        Saml { trusted, document, content }
    })
}

fn expectations() -> Expectations<'static> {
    static URLS: OnceLock<Vec<String>> = OnceLock::new();
    let urls = URLS.get_or_init(|| vec![TOKEN_URL.to_owned()]);
    Expectations { audiences: urls, recipients: urls, now: NOW + 1 }
}

/// SAML assertion parsing, canonicalisation and signature check: no panic, and whatever verifies
/// says exactly what the signed original says.
pub fn saml(data: &[u8]) {
    let fx = saml_fixture();
    let Some((&mode, rest)) = data.split_first() else { return };
    let candidate = if mode & 1 == 0 { rest.to_vec() } else { edit(fx.document.as_bytes(), rest) };
    if let Ok(content) = saml::verify_assertion(&candidate, &fx.trusted, &expectations()) {
        assert_eq!(
            content,
            fx.content,
            "a changed assertion verified with other content: {}",
            String::from_utf8_lossy(&candidate)
        );
    }
}
