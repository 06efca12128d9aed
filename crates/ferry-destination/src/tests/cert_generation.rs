//! Certificates the service generates (SPEC §1.8: `Attributes` with `CN`, `Validity`,
//! `AutomaticRenew`, `Password`, `CSR`), `publicKeys`, and renewal; checked with openssl.

use std::path::Path;
use std::time::{Duration, SystemTime};

use axum::http::{Method, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::{Env, V1};

fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn pem_of(r: &Value) -> String {
    String::from_utf8(STANDARD.decode(r["Content"].as_str().unwrap()).unwrap()).unwrap()
}

fn generate(name: &str, attributes: Value) -> Value {
    json!({"Name": name, "Type": "PEM", "Attributes": attributes})
}

#[tokio::test]
async fn self_signed_generation_and_public_keys() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let url = format!("{V1}/subaccountCertificates");
    let attrs = json!({"CN": "my-app", "Validity": {"TimeUnit": "DAYS", "Value": 30}, "Password": "gen-pass"});
    let r = env.call(Method::POST, &url, Some(&t), Some(generate("gen.pem", attrs))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);

    let r = env.call(Method::GET, &format!("{url}/gen.pem"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["Type"], "PEM");
    assert_eq!(r.json["Attributes"]["CN"], "my-app");
    assert!(!r.text.contains("gen-pass"), "the password is never returned: {}", r.text);
    let pem = pem_of(&r.json);
    assert!(pem.contains("BEGIN CERTIFICATE") && pem.contains("BEGIN ENCRYPTED PRIVATE KEY"), "{pem}");
    // openssl: self-signed for CN=my-app, valid for 30 days (past 29, not past 31), key matches.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gen.pem"), &pem).unwrap();
    let (ok, out) = openssl(dir.path(), &["x509", "-in", "gen.pem", "-noout", "-subject"]);
    assert!(ok && out.contains("CN = my-app"), "{out}");
    assert!(openssl(dir.path(), &["verify", "-CAfile", "gen.pem", "gen.pem"]).0);
    assert!(openssl(dir.path(), &["x509", "-in", "gen.pem", "-noout", "-checkend", &(29 * 86400).to_string()]).0);
    assert!(!openssl(dir.path(), &["x509", "-in", "gen.pem", "-noout", "-checkend", &(31 * 86400).to_string()]).0);
    let (_, cert_key) = openssl(dir.path(), &["x509", "-in", "gen.pem", "-noout", "-pubkey"]);
    // The key is encrypted with the Password: openssl opens it with that, and not without.
    let (ok, key_key) = openssl(dir.path(), &["pkey", "-in", "gen.pem", "-passin", "pass:gen-pass", "-pubout"]);
    assert!(ok, "{key_key}");
    assert_eq!(cert_key, key_key);
    assert!(!openssl(dir.path(), &["pkey", "-in", "gen.pem", "-passin", "pass:other", "-pubout"]).0);

    // publicKeys: the chain without the key, no alias (not a keystore), with an ETag.
    let keys_url = format!("{url}/gen.pem/publicKeys");
    let r = env.call(Method::GET, &keys_url, Some(&t), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let items = r.json.as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["SubjectDN"], "CN=my-app");
    assert!(items[0].get("Alias").is_none());
    assert!(items[0]["Content"].as_str().unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(!r.text.contains("PRIVATE KEY"));
    let etag = r.headers["etag"].to_str().unwrap().to_owned();
    let r = env.call_raw(Method::GET, &keys_url, Some(&t), None, &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    let r = env.call(Method::GET, &format!("{url}/none.pem/publicKeys"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // The list shows names and types only.
    let r = env.call(Method::GET, &url, Some(&t), None).await;
    assert_eq!(r.json, json!([{"Name": "gen.pem", "Type": "PEM"}]));

    // PUT with attributes generates again: a new key.
    let attrs = json!({"CN": "my-app-2", "Validity": {"TimeUnit": "YEARS", "Value": 1}});
    let r = env.call(Method::PUT, &url, Some(&t), Some(generate("gen.pem", attrs))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = env.call(Method::GET, &format!("{url}/gen.pem"), Some(&t), None).await;
    assert_ne!(pem_of(&r.json), pem);
    assert!(pem_of(&r.json).contains("BEGIN PRIVATE KEY"), "no Password, no encryption");

    // What cannot be generated is a 400 that says why.
    let validity = json!({"TimeUnit": "DAYS", "Value": 1});
    let cases = [
        (json!({"Name": "a.p12", "Type": "P12", "Attributes": {"CN": "x", "Validity": validity}}), "only PEM"),
        (json!({"Name": "a.pem", "Content": "AA==", "Attributes": {"CN": "x", "Validity": validity}}), "not both"),
        (generate("a.pem", json!({"Validity": validity})), "CN is required"),
        (generate("a.pem", json!({"CN": "x", "Validity": {"TimeUnit": "DAYS", "Value": 0}})), "between 1"),
        (
            generate(
                "a.pem",
                json!({"CN": "x", "Validity": validity, "CSR": STANDARD.encode(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")}),
            ),
            "CSR cannot be used",
        ),
    ];
    for (body, says) in cases {
        let r = env.call(Method::POST, &url, Some(&t), Some(body)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{says}: {}", r.text);
        assert!(r.error().contains(says), "{says}: {}", r.text);
    }
}

#[tokio::test]
async fn csr_based_certificates_keep_the_requesters_key() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = openssl(
        dir.path(),
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "req.csr",
            "-subj",
            "/CN=from-the-csr/O=Requester",
        ],
    );
    assert!(ok, "{out}");
    let csr = STANDARD.encode(std::fs::read(dir.path().join("req.csr")).unwrap());
    let url = format!("{V1}/instanceCertificates");
    let attrs = json!({"CN": "csr-app", "Validity": {"TimeUnit": "MONTHS", "Value": 2}, "CSR": csr});
    let r = env.call(Method::POST, &url, Some(&t), Some(generate("csr.pem", attrs))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = env.call(Method::GET, &format!("{url}/csr.pem"), Some(&t), None).await;
    let pem = pem_of(&r.json);
    assert!(!pem.contains("PRIVATE KEY"), "the service never has the requester's key");
    let ends: Vec<usize> = pem.match_indices("-----END CERTIFICATE-----\n").map(|(i, m)| i + m.len()).collect();
    assert_eq!(ends.len(), 2, "leaf and issuer: {pem}");
    std::fs::write(dir.path().join("leaf.pem"), &pem[..ends[0]]).unwrap();
    std::fs::write(dir.path().join("issuer.pem"), &pem[ends[0]..]).unwrap();
    let (ok, out) = openssl(dir.path(), &["verify", "-CAfile", "issuer.pem", "leaf.pem"]);
    assert!(ok, "{out}");
    let (_, subject) = openssl(dir.path(), &["x509", "-in", "leaf.pem", "-noout", "-subject"]);
    assert_eq!(subject.trim(), "subject=CN = csr-app", "the subject is replaced by CN");
    let (_, cert_key) = openssl(dir.path(), &["x509", "-in", "leaf.pem", "-noout", "-pubkey"]);
    let (_, own_key) = openssl(dir.path(), &["pkey", "-in", "key.pem", "-pubout"]);
    assert_eq!(cert_key, own_key);

    // Both certificates are public keys; the subaccount's issuer is the same for the next CSR.
    let r = env.call(Method::GET, &format!("{url}/csr.pem/publicKeys"), Some(&t), None).await;
    let items = r.json.as_array().unwrap();
    assert_eq!(items.len(), 1, "one chain: {}", r.text);
    assert_eq!(items[0]["SubjectDN"], "CN=csr-app");
    assert_eq!(items[0]["Content"].as_str().unwrap(), pem);
    let again = json!({"CN": "second", "Validity": {"TimeUnit": "DAYS", "Value": 1}, "CSR": STANDARD.encode(
        std::fs::read(dir.path().join("req.csr")).unwrap())});
    env.call(Method::POST, &url, Some(&t), Some(generate("csr2.pem", again))).await;
    let r = env.call(Method::GET, &format!("{url}/csr2.pem"), Some(&t), None).await;
    assert!(pem_of(&r.json).ends_with(&pem[ends[0]..]));
}

#[tokio::test]
async fn public_keys_of_keystores() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = openssl(
        dir.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "k.pem",
            "-out",
            "c.pem",
            "-days",
            "1",
            "-subj",
            "/CN=keystore/OU=unit",
        ],
    );
    assert!(ok, "{out}");
    let url = format!("{V1}/subaccountCertificates");
    for (file, pass) in [("open.p12", ""), ("locked.p12", "secret")] {
        let (ok, out) = openssl(
            dir.path(),
            &[
                "pkcs12",
                "-export",
                "-in",
                "c.pem",
                "-inkey",
                "k.pem",
                "-name",
                "my-alias",
                "-passout",
                &format!("pass:{pass}"),
                "-out",
                file,
            ],
        );
        assert!(ok, "{out}");
        let content = STANDARD.encode(std::fs::read(dir.path().join(file)).unwrap());
        let r = env
            .call(Method::POST, &url, Some(&t), Some(json!({"Name": file, "Type": "P12", "Content": content})))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    let r = env.call(Method::GET, &format!("{url}/open.p12/publicKeys"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json[0]["Alias"], "my-alias");
    assert_eq!(r.json[0]["SubjectDN"], "CN=keystore,OU=unit");
    assert_eq!(r.json[0]["Content"].as_str().unwrap(), std::fs::read_to_string(dir.path().join("c.pem")).unwrap());
    let r = env.call(Method::GET, &format!("{url}/locked.p12/publicKeys"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("password-protected"), "{}", r.text);
}

#[tokio::test]
async fn automatic_renewal_replaces_certificates_close_to_expiry() {
    let env = Env::new().await;
    let t = env.token("zone-1", "client-1");
    let url = format!("{V1}/subaccountCertificates");
    let validity = json!({"TimeUnit": "DAYS", "Value": 30});
    for (name, renew) in [("auto.pem", true), ("manual.pem", false)] {
        // With a Password the key is encrypted; renewal needs only the certificate.
        let attrs = json!({"CN": name, "Validity": validity, "AutomaticRenew": renew, "Password": "pw"});
        let r = env.call(Method::POST, &url, Some(&t), Some(generate(name, attrs))).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    let content = |name: &'static str| {
        let env = &env;
        let t = &t;
        let url = &url;
        async move { pem_of(&env.call(Method::GET, &format!("{url}/{name}"), Some(t), None).await.json) }
    };
    let (auto, manual) = (content("auto.pem").await, content("manual.pem").await);
    // Fresh certificates are not due.
    assert_eq!(env.service.renew_certificates(SystemTime::now()).await.unwrap(), 0);
    assert_eq!(content("auto.pem").await, auto);
    // Five days before expiry (less than a fifth of 30 days left) the AutomaticRenew one is renewed.
    let late = SystemTime::now() + Duration::from_secs(25 * 86400);
    assert_eq!(env.service.renew_certificates(late).await.unwrap(), 1);
    let renewed = content("auto.pem").await;
    assert_ne!(renewed, auto);
    assert_eq!(content("manual.pem").await, manual);
    let r = env.call(Method::GET, &format!("{url}/auto.pem"), Some(&t), None).await;
    assert_eq!(r.json["Attributes"]["AutomaticRenew"], true);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("renewed.pem"), &renewed).unwrap();
    let (ok, out) = openssl(dir.path(), &["x509", "-in", "renewed.pem", "-noout", "-subject"]);
    assert!(ok && out.contains("CN = auto.pem"), "{out}");
}
