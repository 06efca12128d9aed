//! Debian's `xmlsec1` (libxmlsec1, the reference XML-DSig implementation) is the independent
//! judge of Ferry's SAML signatures: it must accept what `SamlSigner` signs and refuse a changed
//! copy, and Ferry's verifier must accept what xmlsec1 signs from a template formatted quite
//! differently (indentation, other prefixes, comments, extra namespaces), which exercises the
//! canonicaliser against another implementation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_auth::saml::{Assertion, Expectations, NAMEID_UNSPECIFIED, SamlSigner, TrustedCertificate, verify_assertion};

const TOKEN_URL: &str = "http://127.0.0.1:8080/oauth/token";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn xmlsec1() -> Command {
    let mut c = Command::new("xmlsec1");
    c.env("LC_ALL", "C");
    c
}

/// `xmlsec1 --verify` with the certificate as the only trusted key; `Ok` when it accepts.
fn xmlsec_verify(dir: &Path, cert_pem: &str, xml: &str) -> Result<(), String> {
    std::fs::write(dir.join("cert.pem"), cert_pem).unwrap();
    std::fs::write(dir.join("assertion.xml"), xml).unwrap();
    let out = xmlsec1()
        .args(["--verify", "--pubkey-cert-pem"])
        .arg(dir.join("cert.pem"))
        .args(["--id-attr:ID", "urn:oasis:names:tc:SAML:2.0:assertion:Assertion"])
        .arg(dir.join("assertion.xml"))
        .output()
        .expect("xmlsec1 must be installed (scripts/test.sh installs Debian's xmlsec1)");
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
}

fn signed(signer: &SamlSigner, include_certificate: bool) -> String {
    let attrs = vec![
        ("mail".to_owned(), vec!["ann@example.com".to_owned()]),
        ("Groups".to_owned(), vec!["admins".to_owned(), "x & <y> \"z\"\td".to_owned()]),
    ];
    signer
        .sign_assertion(&Assertion {
            issuer: "https://ferry.example/destination",
            name_id: "ann",
            name_id_format: NAMEID_UNSPECIFIED,
            name_qualifier: None,
            recipient: TOKEN_URL,
            audience: TOKEN_URL,
            authn_context_class_ref: "urn:oasis:names:tc:SAML:2.0:ac:classes:PreviousSession",
            attributes: &attrs,
            now: now(),
            validity_secs: 600,
            include_certificate,
        })
        .unwrap()
}

#[test]
fn xmlsec1_accepts_generated_assertions_and_refuses_changed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let signer = SamlSigner::generate("ferry saml test").unwrap();
    let cert = signer.certificate_pem();
    for include in [false, true] {
        let xml = signed(&signer, include);
        xmlsec_verify(dir.path(), &cert, &xml).unwrap();
        let tampered = xml.replace(">ann</saml:NameID>", ">admin</saml:NameID>");
        assert_ne!(tampered, xml);
        let e = xmlsec_verify(dir.path(), &cert, &tampered).unwrap_err();
        assert!(!e.is_empty());
        let tampered = xml.replace(">admins<", ">root<");
        xmlsec_verify(dir.path(), &cert, &tampered).unwrap_err();
    }
    // Another key's certificate: refused.
    let other = SamlSigner::generate("other").unwrap();
    xmlsec_verify(dir.path(), &other.certificate_pem(), &signed(&signer, false)).unwrap_err();
}

#[test]
fn assertions_signed_by_xmlsec1_verify_in_ferry() {
    let dir = tempfile::tempdir().unwrap();
    let signer = SamlSigner::generate("external idp").unwrap();
    std::fs::write(dir.path().join("key.pem"), signer.to_pem().expose()).unwrap();
    let fmt = |t: u64| {
        let s = time::OffsetDateTime::from_unix_timestamp(t as i64).unwrap();
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.250Z",
            s.year(),
            u8::from(s.month()),
            s.day(),
            s.hour(),
            s.minute(),
            s.second()
        )
    };
    let (issued, until) = (fmt(now()), fmt(now() + 300));
    // Indented, other prefixes, a default namespace, an unused declaration, comments, xsi:type
    // with InclusiveNamespaces, attributes out of order and self-closing tags.
    let template = format!(
        r##"<?xml version="1.0" encoding="UTF-8"?>
<!-- an IdP's assertion -->
<Assertion xmlns="urn:oasis:names:tc:SAML:2.0:assertion" xmlns:unused="urn:unused" Version="2.0" IssueInstant="{issued}" ID="a-1">
  <Issuer>https://idp.example</Issuer>
  <dsig:Signature xmlns:dsig="http://www.w3.org/2000/09/xmldsig#">
    <dsig:SignedInfo>
      <dsig:CanonicalizationMethod Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/>
      <dsig:SignatureMethod Algorithm="http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"/>
      <dsig:Reference URI="#a-1">
        <dsig:Transforms>
          <dsig:Transform Algorithm="http://www.w3.org/2000/09/xmldsig#enveloped-signature"/>
          <dsig:Transform Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#">
            <ec:InclusiveNamespaces xmlns:ec="http://www.w3.org/2001/10/xml-exc-c14n#" PrefixList="xs"/>
          </dsig:Transform>
        </dsig:Transforms>
        <dsig:DigestMethod Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"/>
        <dsig:DigestValue/>
      </dsig:Reference>
    </dsig:SignedInfo>
    <dsig:SignatureValue/>
  </dsig:Signature>
  <Subject>
    <NameID Format="urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified">bob</NameID>
    <SubjectConfirmation Method="urn:oasis:names:tc:SAML:2.0:cm:bearer">
      <SubjectConfirmationData Recipient="{TOKEN_URL}" NotOnOrAfter="{until}"/>
    </SubjectConfirmation>
  </Subject>
  <Conditions NotOnOrAfter="{until}" NotBefore="{issued}">
    <AudienceRestriction><Audience>{TOKEN_URL}</Audience></AudienceRestriction>
  </Conditions>
  <AttributeStatement xmlns:xs="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
    <Attribute Name="Groups"><!-- two -->
      <AttributeValue xsi:type="xs:string">a &amp; b</AttributeValue>
      <AttributeValue xsi:type="xs:string"><![CDATA[<c>]]></AttributeValue>
    </Attribute>
  </AttributeStatement>
</Assertion>
"##
    );
    let template_path = dir.path().join("template.xml");
    std::fs::write(&template_path, &template).unwrap();
    let out = xmlsec1()
        .args(["--sign", "--privkey-pem"])
        .arg(dir.path().join("key.pem"))
        .args(["--id-attr:ID", "urn:oasis:names:tc:SAML:2.0:assertion:Assertion", "--output"])
        .arg(dir.path().join("signed.xml"))
        .arg(&template_path)
        .output()
        .expect("xmlsec1 must be installed");
    assert!(out.status.success(), "xmlsec1 --sign: {}", String::from_utf8_lossy(&out.stderr));
    let xml = std::fs::read_to_string(dir.path().join("signed.xml")).unwrap();
    let urls = [TOKEN_URL.to_owned()];
    let trusted = [TrustedCertificate::from_pem(&signer.certificate_pem()).unwrap()];
    let expect = Expectations { audiences: &urls, recipients: &urls, now: now() };
    let v = verify_assertion(xml.as_bytes(), &trusted, &expect).unwrap();
    assert_eq!(v.issuer, "https://idp.example");
    assert_eq!(v.name_id, "bob");
    assert_eq!(v.attribute("Groups").unwrap(), ["a & b", "<c>"]);
    // And a change to it is caught by Ferry as by xmlsec1.
    let changed = xml.replace(">bob<", ">eve<");
    assert!(verify_assertion(changed.as_bytes(), &trusted, &expect).is_err());
    xmlsec_verify(dir.path(), &signer.certificate_pem(), &changed).unwrap_err();
}
