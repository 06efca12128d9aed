//! Generation, verification, tampering and signature wrapping. The generator's output is also
//! checked by xmlsec1 (`tests/saml_xmlsec.rs`), which is the independent judge of both the
//! generator and this verifier's canonicaliser.

use std::sync::OnceLock;

use super::*;

const NOW: u64 = 1_800_000_000;
const TOKEN_URL: &str = "http://127.0.0.1:8080/oauth/token";

fn signer() -> &'static SamlSigner {
    static S: OnceLock<SamlSigner> = OnceLock::new();
    S.get_or_init(|| SamlSigner::generate("test idp").unwrap())
}

fn attributes() -> Vec<(String, Vec<String>)> {
    vec![
        ("email".into(), vec!["ann@example.com".into()]),
        ("Groups".into(), vec!["admins".into(), "a<b & \"c\"\r\n\td".into()]),
    ]
}

fn assertion_with(include_certificate: bool) -> String {
    let attrs = attributes();
    let a = Assertion {
        issuer: "ferry-destination",
        name_id: "ann@example.com",
        name_id_format: NAMEID_EMAIL,
        name_qualifier: Some("q&1"),
        recipient: TOKEN_URL,
        audience: TOKEN_URL,
        authn_context_class_ref: "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession",
        attributes: &attrs,
        now: NOW,
        validity_secs: 600,
        include_certificate,
    };
    signer().sign_assertion(&a).unwrap()
}

fn assertion() -> String {
    assertion_with(true)
}

fn trusted() -> Vec<TrustedCertificate> {
    vec![TrustedCertificate::from_der(signer().certificate_der()).unwrap()]
}

fn verify_at(xml: &str, now: u64) -> Result<VerifiedAssertion, SamlError> {
    let urls = [TOKEN_URL.to_owned()];
    verify_assertion(xml.as_bytes(), &trusted(), &Expectations { audiences: &urls, recipients: &urls, now })
}

fn verify(xml: &str) -> Result<VerifiedAssertion, SamlError> {
    verify_at(xml, NOW + 1)
}

#[test]
fn generated_assertions_verify_and_say_what_was_put_in() {
    for include in [true, false] {
        let v = verify(&assertion_with(include)).unwrap();
        assert_eq!(v.issuer, "ferry-destination");
        assert_eq!(v.name_id, "ann@example.com");
        assert_eq!(v.name_id_format, NAMEID_EMAIL);
        assert_eq!(v.name_qualifier.as_deref(), Some("q&1"));
        assert_eq!(v.not_on_or_after, NOW + 600);
        // Attribute values survive escaping; a CR in a value is kept as a character reference.
        assert_eq!(v.attributes, attributes());
        assert_eq!(v.attribute("Groups").unwrap().len(), 2);
    }
}

#[test]
fn the_generated_document_is_its_own_canonical_form() {
    let xml = assertion();
    let root = parse(xml.as_bytes()).unwrap();
    assert_eq!(exc_c14n(&root, None, &[]), xml);
}

#[test]
fn time_windows_audience_and_recipient_are_enforced() {
    let xml = assertion();
    assert!(verify_at(&xml, NOW + 600 + CLOCK_SKEW_SECS).unwrap_err().to_string().contains("still valid"));
    assert!(verify_at(&xml, NOW - CLOCK_SKEW_SECS - 1).unwrap_err().to_string().contains("not valid yet"));
    let other = ["http://127.0.0.1:9/oauth/token".to_owned()];
    let urls = [TOKEN_URL.to_owned()];
    let e =
        verify_assertion(xml.as_bytes(), &trusted(), &Expectations { audiences: &other, recipients: &urls, now: NOW })
            .unwrap_err();
    assert!(e.to_string().contains("audience"), "{e}");
    let e =
        verify_assertion(xml.as_bytes(), &trusted(), &Expectations { audiences: &urls, recipients: &other, now: NOW })
            .unwrap_err();
    assert!(e.to_string().contains("recipient"), "{e}");
}

#[test]
fn another_key_is_refused() {
    let other = SamlSigner::generate("other").unwrap();
    let urls = [TOKEN_URL.to_owned()];
    let trusted = [TrustedCertificate::from_der(other.certificate_der()).unwrap()];
    let e = verify_assertion(
        assertion().as_bytes(),
        &trusted,
        &Expectations { audiences: &urls, recipients: &urls, now: NOW },
    )
    .unwrap_err();
    assert!(matches!(e, SamlError::Signature(_)), "{e}");
}

#[test]
fn any_change_to_signed_content_is_refused() {
    let xml = assertion();
    let tampered = [
        xml.replace(">ann@example.com</saml:NameID>", ">admin@example.com</saml:NameID>"),
        xml.replace(">admins<", ">superusers<"),
        xml.replace("NotOnOrAfter=\"2027", "NotOnOrAfter=\"2099"),
        // Adding an attribute (a new element) inside the signed assertion.
        xml.replace(
            "<saml:AttributeStatement>",
            "<saml:AttributeStatement><saml:Attribute Name=\"x\"><saml:AttributeValue>y</saml:AttributeValue></saml:Attribute>",
        ),
    ];
    for t in tampered {
        assert_ne!(t, xml);
        let e = verify(&t).unwrap_err();
        assert!(matches!(e, SamlError::Signature(_)), "{e}");
    }
    // The signature value itself.
    let sig_start = xml.find("<ds:SignatureValue>").unwrap() + "<ds:SignatureValue>".len();
    let mut bytes = xml.clone().into_bytes();
    bytes[sig_start + 5] = if bytes[sig_start + 5] == b'A' { b'B' } else { b'A' };
    assert!(matches!(verify(&String::from_utf8(bytes).unwrap()), Err(SamlError::Signature(_))));
}

#[test]
fn formatting_that_canonicalisation_removes_does_not_matter() {
    let xml = assertion();
    // Self-closing tags, single quotes, a comment and an XML declaration canonicalise away.
    let reformatted = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!-- hi -->\n{}\n",
        xml.replace("></ds:Transform>", "/>").replace("Version=\"2.0\"", "Version='2.0'")
    );
    verify(&reformatted).unwrap();
}

/// The signed assertion moved inside an attacker's assertion: the reported content would be
/// the attacker's, so the document is refused whatever the signature says.
#[test]
fn signature_wrapping_is_refused() {
    let xml = assertion();
    let id_start = xml.find("ID=\"").unwrap() + 4;
    let id = &xml[id_start..id_start + xml[id_start..].find('"').unwrap()];
    let evil_body = "<saml:Issuer>ferry-destination</saml:Issuer><saml:Subject><saml:NameID>admin</saml:NameID>\
        </saml:Subject>";
    let evil_tail = xml[xml.find("<saml:Subject>").unwrap()..].replace(">ann@example.com<", ">admin<");
    let signature = &xml[xml.find("<ds:Signature").unwrap()..xml.find("</ds:Signature>").unwrap() + 15];
    let ns = format!("xmlns:saml=\"{NS_SAML}\"");
    let cases = [
        // The original as a child of an unsigned root.
        format!(
            "<saml:Assertion {ns} ID=\"_evil\" IssueInstant=\"2027-01-15T08:00:00Z\" Version=\"2.0\">{evil_body}{}</saml:Assertion>",
            xml.replace(&format!(" {ns}"), "")
        ),
        // A root with the original's ID and signature, but other content.
        format!(
            "<saml:Assertion {ns} ID=\"{id}\" IssueInstant=\"2027-01-15T08:00:00Z\" Version=\"2.0\"><saml:Issuer>ferry-destination</saml:Issuer>{signature}{evil_tail}"
        ),
        // The same, with the original hidden in the signature (ds:Object).
        format!(
            "<saml:Assertion {ns} ID=\"{id}\" IssueInstant=\"2027-01-15T08:00:00Z\" Version=\"2.0\"><saml:Issuer>ferry-destination</saml:Issuer>{}{evil_tail}",
            signature.replace("</ds:Signature>", &format!("<ds:Object>{xml}</ds:Object></ds:Signature>"))
        ),
        // The original followed by a second Subject: one element of each kind is required.
        xml.replace("</saml:Subject>", "</saml:Subject><saml:Subject><saml:NameID>admin</saml:NameID></saml:Subject>"),
    ];
    for (i, case) in cases.iter().enumerate() {
        let e = verify(case).unwrap_err();
        assert!(matches!(e, SamlError::Invalid(_) | SamlError::Signature(_) | SamlError::Xml(_)), "case {i}: {e}");
        assert!(verify(case).is_err(), "case {i} was accepted");
    }
}

#[test]
fn dtds_processing_instructions_and_broken_xml_are_refused() {
    let xml = assertion();
    let dtd = format!("<!DOCTYPE saml:Assertion [<!ENTITY x \"ann\">]>{xml}");
    assert!(verify(&dtd).unwrap_err().to_string().contains("DTD"));
    let pi = xml.replace("<saml:Subject>", "<?evil?><saml:Subject>");
    assert!(verify(&pi).unwrap_err().to_string().contains("processing instructions"));
    for broken in [&xml[..xml.len() - 3], "<a>", "", "text", "<a></b>"] {
        assert!(verify(broken).is_err(), "{broken}");
    }
    let entity = xml.replace(">ann@example.com<", ">&ann;<");
    assert!(matches!(verify(&entity), Err(SamlError::Xml(_))));
    let deep = format!("{}{}", "<a>".repeat(100), "</a>".repeat(100));
    assert!(verify(&deep).unwrap_err().to_string().contains("deeper"));
    let wide: String = (0..40).map(|i| format!(" a{i}=\"x\"")).collect();
    assert!(verify(&format!("<a{wide}/>")).unwrap_err().to_string().contains("attributes"));
    let namespaces: String = (0..20).map(|i| format!(" xmlns:n{i}=\"urn:{i}\"")).collect();
    assert!(verify(&format!("<a{namespaces}/>")).unwrap_err().to_string().contains("namespaces"));
}

#[test]
fn other_algorithms_are_refused() {
    let xml = assertion();
    for (from, to) in [
        (ALG_RSA_SHA256, "http://www.w3.org/2000/09/xmldsig#rsa-sha1"),
        (ALG_SHA256, "http://www.w3.org/2000/09/xmldsig#sha1"),
        (ALG_EXC_C14N, "http://www.w3.org/TR/2001/REC-xml-c14n-20010315"),
        (ALG_ENVELOPED, "http://www.w3.org/TR/1999/REC-xpath-19991116"),
    ] {
        let e = verify(&xml.replace(from, to)).unwrap_err();
        assert!(matches!(e, SamlError::Invalid(_)), "{to}: {e}");
    }
}

#[test]
fn exclusive_c14n_follows_the_rules_for_namespaces() {
    // Declarations not used are dropped, used ones move to the first element that uses them,
    // attributes sort by namespace URI then name, and the default namespace can be undeclared.
    let doc = "<r xmlns=\"urn:d\" xmlns:a=\"urn:a\" xmlns:b=\"urn:b\" z=\"1\" b:y=\"2\" a:x=\"3\">\
               <a:c><e xmlns=\"\"/></a:c>text &amp; &#xD;</r>";
    let root = parse(doc.as_bytes()).unwrap();
    assert_eq!(
        exc_c14n(&root, None, &[]),
        "<r xmlns=\"urn:d\" xmlns:a=\"urn:a\" xmlns:b=\"urn:b\" z=\"1\" a:x=\"3\" b:y=\"2\">\
         <a:c><e xmlns=\"\"></e></a:c>text &amp; &#xD;</r>"
    );
    let Node::Element(c) = &root.children[0] else { panic!() };
    assert_eq!(exc_c14n(c, None, &[]), "<a:c xmlns:a=\"urn:a\"><e></e></a:c>");
    assert_eq!(exc_c14n(c, None, &["b".into()]), "<a:c xmlns:a=\"urn:a\" xmlns:b=\"urn:b\"><e></e></a:c>");
}

#[test]
fn datetimes_round_trip() {
    assert_eq!(xs_datetime(NOW).unwrap(), "2027-01-15T08:00:00Z");
    assert_eq!(parse_xs_datetime("2027-01-15T08:00:00Z"), Some(NOW));
    assert_eq!(parse_xs_datetime("2027-01-15T08:00:00.123Z"), Some(NOW));
    assert_eq!(parse_xs_datetime("2027-01-15T09:30:00+01:30"), Some(NOW));
    for bad in ["2027-01-15T08:00:00", "2027-13-15T08:00:00Z", "2027-01-15 08:00:00Z", "x"] {
        assert_eq!(parse_xs_datetime(bad), None, "{bad}");
    }
}

#[test]
fn keys_from_pem() {
    let pem = signer().to_pem().expose().clone();
    let again = SamlSigner::from_pem(&pem).unwrap();
    assert_eq!(again.certificate_der(), signer().certificate_der());
    let other = SamlSigner::generate("other").unwrap();
    let mixed = format!("{}{}", signer().certificate_pem(), other.to_pem().expose());
    // The first certificate is the signer's, the key is the other's.
    assert!(SamlSigner::from_pem(&mixed).unwrap_err().to_string().contains("does not belong"));
    assert!(SamlSigner::from_pem(&signer().certificate_pem()).unwrap_err().to_string().contains("PRIVATE KEY"));
    let ec = rcgen::KeyPair::generate().unwrap();
    let ec_cert = rcgen::CertificateParams::default().self_signed(&ec).unwrap();
    assert!(TrustedCertificate::from_pem(&ec_cert.pem()).unwrap_err().to_string().contains("RSA"));
}
