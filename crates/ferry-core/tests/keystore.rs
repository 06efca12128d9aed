#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Keystores written by the real tools — `openssl pkcs12 -export` (OpenSSL 3's AES-256/PBKDF2 and
//! the legacy 3DES/SHA-1 form) and Java's `keytool` (JKS) — decode to the key and chain they hold.

use std::path::Path;
use std::process::Command;

use ferry_core::keystore::{Format, KeystoreError, decode, subject_dn};
use rustls::pki_types::PrivateKeyDer;

fn run(dir: &Path, program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).current_dir(dir).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A key and self-signed certificate from openssl, and the key as PKCS#8 DER to compare with.
fn key_and_cert(dir: &Path) -> Vec<u8> {
    run(
        dir,
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=keystore test/OU=ferry",
        ],
    );
    run(dir, "openssl", &["pkcs8", "-topk8", "-nocrypt", "-in", "key.pem", "-outform", "DER", "-out", "key.der"]);
    std::fs::read(dir.join("key.der")).unwrap()
}

fn key_der(store: &ferry_core::keystore::KeyStore) -> Vec<u8> {
    let entry = store.key_entry().expect("a key entry");
    match entry.key.as_ref().unwrap().expose() {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        other => panic!("not PKCS#8: {other:?}"),
    }
}

#[test]
fn openssl_pkcs12_modern_and_legacy() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_and_cert(dir.path());
    run(
        dir.path(),
        "openssl",
        &[
            "pkcs12",
            "-export",
            "-in",
            "cert.pem",
            "-inkey",
            "key.pem",
            "-name",
            "signing",
            "-passout",
            "pass:s3cret",
            "-out",
            "modern.p12",
        ],
    );
    run(
        dir.path(),
        "openssl",
        &[
            "pkcs12",
            "-export",
            "-in",
            "cert.pem",
            "-inkey",
            "key.pem",
            "-name",
            "old",
            "-passout",
            "pass:s3cret",
            "-certpbe",
            "PBE-SHA1-3DES",
            "-keypbe",
            "PBE-SHA1-3DES",
            "-macalg",
            "sha1",
            "-out",
            "legacy.p12",
        ],
    );
    let cert_pem = std::fs::read_to_string(dir.path().join("cert.pem")).unwrap();
    for (file, alias) in [("modern.p12", "signing"), ("legacy.p12", "old")] {
        let bytes = std::fs::read(dir.path().join(file)).unwrap();
        let store = decode(&bytes, Some(Format::Pkcs12), Some("s3cret")).unwrap();
        assert_eq!(key_der(&store), key, "{file}");
        let entry = store.key_entry().unwrap();
        assert_eq!(entry.alias.as_deref(), Some(alias));
        assert_eq!(subject_dn(&entry.chain[0]).unwrap(), "CN=keystore test,OU=ferry");
        // The PEM form is what the TLS code reads: the same certificate and a usable identity.
        let pem = store.to_pem();
        assert!(pem.expose().starts_with(&cert_pem), "{file}: {}", &pem.expose()[..80]);
        let certs = ferry_core::tls::parse_certs(pem.expose()).unwrap();
        let key = ferry_core::tls::parse_key(pem.expose()).unwrap();
        ferry_core::init_crypto();
        rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_client_auth_cert(certs, key)
            .unwrap();
        // Sniffed without a Type, too.
        assert!(decode(&bytes, None, Some("s3cret")).unwrap().key_entry().is_some());
        assert!(matches!(decode(&bytes, None, Some("wrong")), Err(KeystoreError::WrongPassword(_))), "{file}");
        assert!(matches!(decode(&bytes, None, None), Err(KeystoreError::PasswordRequired(_))), "{file}");
    }
}

#[test]
fn keytool_jks() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_and_cert(dir.path());
    run(
        dir.path(),
        "openssl",
        &[
            "pkcs12",
            "-export",
            "-in",
            "cert.pem",
            "-inkey",
            "key.pem",
            "-name",
            "client",
            "-passout",
            "pass:changeit",
            "-out",
            "src.p12",
        ],
    );
    run(
        dir.path(),
        "keytool",
        &[
            "-importkeystore",
            "-noprompt",
            "-srckeystore",
            "src.p12",
            "-srcstoretype",
            "PKCS12",
            "-srcstorepass",
            "changeit",
            "-destkeystore",
            "store.jks",
            "-deststoretype",
            "JKS",
            "-deststorepass",
            "changeit",
        ],
    );
    // A trusted-certificate entry next to the key entry.
    run(
        dir.path(),
        "keytool",
        &[
            "-importcert",
            "-noprompt",
            "-alias",
            "ca",
            "-file",
            "cert.pem",
            "-keystore",
            "store.jks",
            "-storetype",
            "JKS",
            "-storepass",
            "changeit",
        ],
    );
    let bytes = std::fs::read(dir.path().join("store.jks")).unwrap();
    let store = decode(&bytes, Some(Format::Jks), Some("changeit")).unwrap();
    assert_eq!(key_der(&store), key);
    assert_eq!(store.entries.len(), 2);
    assert_eq!(store.key_entry().unwrap().alias.as_deref(), Some("client"));
    assert_eq!(store.entries[1].alias.as_deref(), Some("ca"));
    assert!(store.entries[1].key.is_none());
    assert!(matches!(decode(&bytes, None, Some("nope")), Err(KeystoreError::WrongPassword(_))));
    assert!(matches!(decode(&bytes, None, None), Err(KeystoreError::PasswordRequired(_))));
    // A truststore without keys reads without a password.
    run(
        dir.path(),
        "keytool",
        &[
            "-importcert",
            "-noprompt",
            "-alias",
            "ca",
            "-file",
            "cert.pem",
            "-keystore",
            "trust.jks",
            "-storetype",
            "JKS",
            "-storepass",
            "changeit",
        ],
    );
    let trust = decode(&std::fs::read(dir.path().join("trust.jks")).unwrap(), None, None).unwrap();
    assert_eq!(subject_dn(&trust.entries[0].chain[0]).unwrap(), "CN=keystore test,OU=ferry");
    // Every truncation is an error, never a panic.
    for n in 0..bytes.len() {
        assert!(decode(&bytes[..n], Some(Format::Jks), Some("changeit")).is_err());
    }
}

#[test]
fn pem_and_der() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_and_cert(dir.path());
    let mut pem = std::fs::read(dir.path().join("cert.pem")).unwrap();
    pem.extend(std::fs::read(dir.path().join("key.pem")).unwrap());
    let store = decode(&pem, Some(Format::Pem), None).unwrap();
    assert_eq!(key_der(&store), key);
    run(dir.path(), "openssl", &["x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der"]);
    let der = std::fs::read(dir.path().join("cert.der")).unwrap();
    let store = decode(&der, None, None).unwrap();
    assert!(store.key_entry().is_none());
    assert!(store.to_pem().expose().starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(matches!(decode(b"just text", None, None), Err(KeystoreError::UnknownFormat)));
    assert!(matches!(decode(b"just text", Some(Format::Pkcs12), None), Err(KeystoreError::Pkcs12(_))));
}

#[test]
fn encrypted_pem_keys_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_and_cert(dir.path());
    let cert = std::fs::read(dir.path().join("cert.pem")).unwrap();
    // openssl encrypts (PBES2, AES-256-CBC), we decrypt.
    run(
        dir.path(),
        "openssl",
        &["pkcs8", "-topk8", "-in", "key.pem", "-v2", "aes-256-cbc", "-passout", "pass:pem-pw", "-out", "enc.pem"],
    );
    let mut pem = cert.clone();
    pem.extend(std::fs::read(dir.path().join("enc.pem")).unwrap());
    let store = decode(&pem, None, Some("pem-pw")).unwrap();
    assert_eq!(key_der(&store), key);
    assert!(matches!(decode(&pem, None, None), Err(KeystoreError::PasswordRequired(_))));
    assert!(matches!(decode(&pem, None, Some("nope")), Err(KeystoreError::WrongPassword(_))));
    // Certificates alone need no password.
    assert!(decode(&cert, None, None).is_ok());
    // We encrypt, openssl decrypts.
    let encrypted = ferry_core::keystore::encrypt_private_key(&key, "our-pw").unwrap();
    std::fs::write(dir.path().join("ours.pem"), ferry_core::keystore::pem_block("ENCRYPTED PRIVATE KEY", &encrypted))
        .unwrap();
    run(dir.path(), "openssl", &["pkcs8", "-in", "ours.pem", "-passin", "pass:our-pw", "-out", "plain.pem"]);
    run(
        dir.path(),
        "openssl",
        &["pkcs8", "-topk8", "-nocrypt", "-in", "plain.pem", "-outform", "DER", "-out", "back.der"],
    );
    assert_eq!(std::fs::read(dir.path().join("back.der")).unwrap(), key);
}
