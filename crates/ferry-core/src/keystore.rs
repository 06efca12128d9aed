//! Keystores as SAP's certificate store holds them: PEM (certificates and an unencrypted key),
//! DER certificates, PKCS#12 (`.p12`/`.pfx`, with a password) and Java KeyStores (`.jks`).
//!
//! Every format decodes to the same [`KeyStore`] so callers keep one code path: TLS client
//! identities and SAML signing take its [`KeyStore::to_pem`]. PKCS#12 goes through the
//! `p12-keystore` crate (PBES2 with AES as OpenSSL 3 writes it, and the legacy PBES1/3DES and
//! RC2 of older tools). JKS is parsed here: the format is small and fixed (Sun's key protector
//! and a SHA-1 integrity digest), and no maintained crate reads it.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::Secret;

/// File formats of a certificate-store entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// PEM text: certificates, optionally a private key.
    Pem,
    /// One DER-encoded certificate (`.cer`/`.crt`/`.der` in binary form).
    Der,
    /// PKCS#12 (`.p12`/`.pfx`).
    Pkcs12,
    /// Java KeyStore (`.jks`).
    Jks,
}

impl Format {
    /// The format the entry's `Type` (or, when it has none, its file name) names; `None` when
    /// neither says, and [`decode`] then looks at the bytes.
    pub fn from_type_or_name(kind: Option<&str>, name: &str) -> Option<Format> {
        let by_type = |t: &str| match t.to_ascii_uppercase().as_str() {
            "PEM" | "CERTIFICATE" => Some(Format::Pem),
            "P12" | "PFX" => Some(Format::Pkcs12),
            "JKS" => Some(Format::Jks),
            // CER/CRT/DER files are PEM or DER in practice: decide by the bytes.
            _ => None,
        };
        if let Some(f) = kind.filter(|k| !k.is_empty()).and_then(by_type) {
            return Some(f);
        }
        let ext = name.rsplit_once('.').map(|(_, e)| e).unwrap_or_default();
        by_type(ext)
    }

    fn sniff(bytes: &[u8]) -> Format {
        if bytes.starts_with(&JKS_MAGIC) {
            Format::Jks
        } else if bytes.windows(10).any(|w| w == b"-----BEGIN") {
            Format::Pem
        } else if x509_parser::parse_x509_certificate(bytes).is_ok() {
            Format::Der
        } else {
            Format::Pkcs12
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    #[error("the {0} keystore needs its password")]
    PasswordRequired(&'static str),
    #[error("the keystore password is wrong, or the file is damaged ({0})")]
    WrongPassword(&'static str),
    #[error("the PKCS#12 file cannot be read: {0}")]
    Pkcs12(String),
    #[error("the JKS file cannot be read: {0}")]
    Jks(&'static str),
    #[error("the PEM text cannot be read: {0}")]
    Pem(String),
    #[error("the file is neither PEM, a DER certificate, PKCS#12 nor JKS")]
    UnknownFormat,
    #[error("the keystore holds no certificate")]
    NoCertificate,
}

/// One entry: a private key with its certificate chain, or a trusted certificate.
pub struct Entry {
    /// The entry's name inside a P12/JKS file; PEM and DER files have none.
    pub alias: Option<String>,
    /// Certificates, the entry's own first, then its issuers.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Option<Secret<PrivateKeyDer<'static>>>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("alias", &self.alias)
            .field("chain", &self.chain.len())
            .field("key", &self.key.as_ref().map(|_| "***"))
            .finish()
    }
}

/// A decoded keystore: its entries, key entries first.
#[derive(Debug)]
pub struct KeyStore {
    pub entries: Vec<Entry>,
}

/// Decodes `bytes` as `format` (or, when `None`, as what the bytes look like). `password` is
/// needed for PKCS#12, JKS and encrypted PEM keys; a JKS file without one is read, unverified,
/// for its certificates only.
pub fn decode(bytes: &[u8], format: Option<Format>, password: Option<&str>) -> Result<KeyStore, KeystoreError> {
    let sniffed = format.is_none();
    let format = format.unwrap_or_else(|| Format::sniff(bytes));
    let store = match format {
        Format::Pem => decode_pem(bytes, password)?,
        Format::Der if x509_parser::parse_x509_certificate(bytes).is_ok() => KeyStore {
            entries: vec![Entry { alias: None, chain: vec![CertificateDer::from(bytes.to_vec())], key: None }],
        },
        // A "DER" that is no certificate: PEM text or a keystore under a generic Type.
        Format::Der => return decode(bytes, None, password),
        // Bytes that are nothing else and not PKCS#12 either: say so rather than blame PKCS#12.
        Format::Pkcs12 if sniffed => decode_p12(bytes, password).map_err(|e| match e {
            KeystoreError::Pkcs12(_) => KeystoreError::UnknownFormat,
            other => other,
        })?,
        Format::Pkcs12 => decode_p12(bytes, password)?,
        Format::Jks => decode_jks(bytes, password)?,
    };
    if store.entries.iter().all(|e| e.chain.is_empty()) {
        return Err(KeystoreError::NoCertificate);
    }
    Ok(store)
}

impl KeyStore {
    /// The first entry with a private key, and its certificates.
    pub fn key_entry(&self) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key.is_some() && !e.chain.is_empty())
    }

    /// The key entry as PEM (certificate chain, then the key), the form the TLS and SAML code
    /// reads; without a key entry, every certificate.
    pub fn to_pem(&self) -> Secret<String> {
        let mut out = String::new();
        match self.key_entry() {
            Some(entry) => {
                for c in &entry.chain {
                    out.push_str(&pem_block("CERTIFICATE", c));
                }
                if let Some(key) = &entry.key {
                    let (label, der) = match key.expose() {
                        PrivateKeyDer::Pkcs1(k) => ("RSA PRIVATE KEY", k.secret_pkcs1_der()),
                        PrivateKeyDer::Sec1(k) => ("EC PRIVATE KEY", k.secret_sec1_der()),
                        PrivateKeyDer::Pkcs8(k) => ("PRIVATE KEY", k.secret_pkcs8_der()),
                        _ => ("PRIVATE KEY", key.expose().secret_der()),
                    };
                    out.push_str(&pem_block(label, der));
                }
            }
            None => {
                for c in self.entries.iter().flat_map(|e| &e.chain) {
                    out.push_str(&pem_block("CERTIFICATE", c));
                }
            }
        }
        Secret::new(out)
    }
}

/// `der` as a PEM block with 64-column lines.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn decode_pem(bytes: &[u8], password: Option<&str>) -> Result<KeyStore, KeystoreError> {
    let chain = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| KeystoreError::Pem(e.to_string()))?;
    let key = match PrivateKeyDer::from_pem_slice(bytes) {
        Ok(k) => Some(Secret::new(k)),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => None,
        Err(e) => return Err(KeystoreError::Pem(e.to_string())),
    };
    let encrypted = x509_parser::pem::Pem::iter_from_buffer(bytes)
        .filter_map(Result::ok)
        .find(|block| block.label == "ENCRYPTED PRIVATE KEY");
    let key = match (key, encrypted) {
        (Some(key), _) => Some(key),
        (None, None) => None,
        (None, Some(block)) => {
            let password = password.ok_or(KeystoreError::PasswordRequired("PEM private key"))?;
            Some(Secret::new(PrivateKeyDer::Pkcs8(decrypt_private_key(&block.contents, password)?.into())))
        }
    };
    Ok(KeyStore { entries: vec![Entry { alias: None, chain, key }] })
}

/// PBKDF2 rounds for keys this service encrypts; the rows holding them are sealed as well, so
/// this guards the file a user downloads, and must not make every token fetch slow.
const PBKDF2_ROUNDS: u32 = 100_000;

/// `pkcs8` as an `EncryptedPrivateKeyInfo` (PBES2: PBKDF2-SHA256, AES-256-CBC), as
/// `openssl pkcs8 -topk8` writes it; PEM label `ENCRYPTED PRIVATE KEY`.
pub fn encrypt_private_key(pkcs8: &[u8], password: &str) -> Result<Vec<u8>, KeystoreError> {
    use der::Encode;
    let failed = |what: &str| KeystoreError::Pem(format!("cannot encrypt the private key: {what}"));
    let mut salt = [0u8; 16];
    let mut iv = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| failed("no random numbers"))?;
    aws_lc_rs::rand::fill(&mut iv).map_err(|_| failed("no random numbers"))?;
    let params = pkcs5::pbes2::Parameters::generate_pbkdf2_sha256_aes256cbc(PBKDF2_ROUNDS, &salt, iv)
        .map_err(|e| failed(&e.to_string()))?;
    let scheme = pkcs5::EncryptionScheme::from(params);
    let ciphertext = scheme.encrypt(password, pkcs8).map_err(|e| failed(&e.to_string()))?;
    let algorithm = scheme.to_der().map_err(|e| failed(&e.to_string()))?;
    let octets =
        der::asn1::OctetString::new(ciphertext).and_then(|o| o.to_der()).map_err(|e| failed(&e.to_string()))?;
    let mut body = algorithm;
    body.extend(octets);
    let mut out = vec![0x30];
    der_length(body.len(), &mut out);
    out.extend(body);
    Ok(out)
}

fn der_length(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

/// Opens an `EncryptedPrivateKeyInfo` (PBES2) with `password`; the PKCS#8 key inside.
fn decrypt_private_key(der_bytes: &[u8], password: &str) -> Result<Vec<u8>, KeystoreError> {
    use der::Decode;
    let bad = |what: &str| KeystoreError::Pem(format!("the encrypted private key cannot be read: {what}"));
    let (_, info) = der_tlv(der_bytes, 0x30).ok_or_else(|| bad("not an EncryptedPrivateKeyInfo"))?;
    let (rest, _) = der_tlv(info, 0x30).ok_or_else(|| bad("no algorithm"))?;
    let algorithm = &info[..info.len() - rest.len()];
    let (_, ciphertext) = der_tlv(rest, 0x04).ok_or_else(|| bad("no encrypted data"))?;
    let scheme = pkcs5::EncryptionScheme::from_der(algorithm).map_err(|e| bad(&e.to_string()))?;
    if scheme.pbes2().is_none() {
        return Err(bad("only PBES2 encryption is supported (openssl pkcs8 -topk8 -v2 aes-256-cbc)"));
    }
    let plain = scheme.decrypt(password, ciphertext).map_err(|_| KeystoreError::WrongPassword("PEM private key"))?;
    // A wrong password can still unpad by chance; the result must then be one DER SEQUENCE.
    match der_tlv(&plain, 0x30) {
        Some(([], _)) => Ok(plain),
        _ => Err(KeystoreError::WrongPassword("PEM private key")),
    }
}

fn decode_p12(bytes: &[u8], password: Option<&str>) -> Result<KeyStore, KeystoreError> {
    use p12_keystore::{KeyStoreEntry, Pkcs12ImportPolicy};
    // PKCS#12 files without a password exist (`-passout pass:`); they use the empty one.
    let store = p12_keystore::KeyStore::from_pkcs12(bytes, password.unwrap_or(""), Pkcs12ImportPolicy::Relaxed)
        .map_err(|e| match e {
            p12_keystore::error::Error::MacError(_) if password.is_none() => KeystoreError::PasswordRequired("PKCS#12"),
            p12_keystore::error::Error::MacError(_) => KeystoreError::WrongPassword("PKCS#12"),
            other => KeystoreError::Pkcs12(other.to_string()),
        })?;
    let mut keys = Vec::new();
    let mut certs = Vec::new();
    for (alias, entry) in store.entries() {
        match entry {
            KeyStoreEntry::PrivateKeyChain(chain) => keys.push(Entry {
                alias: Some(alias.clone()),
                chain: chain.certs().iter().map(|c| CertificateDer::from(c.as_der().to_vec())).collect(),
                key: Some(Secret::new(PrivateKeyDer::Pkcs8(chain.key().as_der().to_vec().into()))),
            }),
            KeyStoreEntry::Certificate(c) => certs.push(Entry {
                alias: Some(alias.clone()),
                chain: vec![CertificateDer::from(c.as_der().to_vec())],
                key: None,
            }),
            KeyStoreEntry::Secret(_) => {}
        }
    }
    keys.extend(certs);
    Ok(KeyStore { entries: keys })
}

const JKS_MAGIC: [u8; 4] = [0xFE, 0xED, 0xFE, 0xED];
/// OID 1.3.6.1.4.1.42.2.17.1.1, Sun's proprietary key protection, DER-encoded.
const SUN_KEY_PROTECTOR: &[u8] = &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x2a, 0x02, 0x11, 0x01, 0x01];

fn sha1(parts: &[&[u8]]) -> [u8; 20] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 20];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], KeystoreError> {
        if self.data.len() < n {
            return Err(KeystoreError::Jks("the file ends early"));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<usize, KeystoreError> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u32(&mut self) -> Result<u32, KeystoreError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn len(&mut self) -> Result<usize, KeystoreError> {
        usize::try_from(self.u32()?).map_err(|_| KeystoreError::Jks("a length does not fit"))
    }
    /// Java's modified UTF-8; aliases are plain text in practice, so a lossy read is enough.
    fn utf(&mut self) -> Result<String, KeystoreError> {
        let n = self.u16()?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn cert(&mut self, version: u32) -> Result<CertificateDer<'static>, KeystoreError> {
        if version == 2 && self.utf()? != "X.509" {
            return Err(KeystoreError::Jks("a certificate is not X.509"));
        }
        let n = self.len()?;
        Ok(CertificateDer::from(self.take(n)?.to_vec()))
    }
}

fn decode_jks(bytes: &[u8], password: Option<&str>) -> Result<KeyStore, KeystoreError> {
    if bytes.len() < 32 || !bytes.starts_with(&JKS_MAGIC) {
        return Err(KeystoreError::Jks("it does not start with the JKS magic number FEEDFEED"));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 20);
    let utf16: Option<Vec<u8>> = password.map(|p| p.encode_utf16().flat_map(u16::to_be_bytes).collect());
    if let Some(pw) = &utf16
        && sha1(&[pw, b"Mighty Aphrodite", body]) != digest
    {
        return Err(KeystoreError::WrongPassword("JKS"));
    }
    let mut r = Reader { data: &body[4..] };
    let version = r.u32()?;
    if version != 1 && version != 2 {
        return Err(KeystoreError::Jks("unknown version (only JKS versions 1 and 2 exist)"));
    }
    let count = r.u32()?;
    let mut keys = Vec::new();
    let mut certs = Vec::new();
    for _ in 0..count {
        let tag = r.u32()?;
        let alias = r.utf()?;
        r.take(8)?; // creation time
        match tag {
            1 => {
                let n = r.len()?;
                let protected = r.take(n)?;
                let chain_len = r.u32()?;
                let chain = (0..chain_len).map(|_| r.cert(version)).collect::<Result<Vec<_>, _>>()?;
                let key = match &utf16 {
                    Some(pw) => Some(Secret::new(PrivateKeyDer::Pkcs8(unprotect_key(protected, pw)?.into()))),
                    None => None,
                };
                keys.push(Entry { alias: Some(alias), chain, key });
            }
            2 => certs.push(Entry { alias: Some(alias), chain: vec![r.cert(version)?], key: None }),
            _ => return Err(KeystoreError::Jks("an entry has an unknown tag (secret-key entries are JCEKS, not JKS)")),
        }
    }
    if utf16.is_none() && !keys.is_empty() {
        return Err(KeystoreError::PasswordRequired("JKS"));
    }
    keys.extend(certs);
    Ok(KeyStore { entries: keys })
}

/// Reads `EncryptedPrivateKeyInfo { AlgorithmIdentifier { OID, NULL }, OCTET STRING }` with
/// Sun's key protector and undoes it: a SHA-1 keystream XORed over the PKCS#8 key, checked by a
/// SHA-1 of password and key. Keys protected with a password other than the store's fail.
fn unprotect_key(der: &[u8], password_utf16: &[u8]) -> Result<Vec<u8>, KeystoreError> {
    let bad = KeystoreError::Jks("a private key entry is not an EncryptedPrivateKeyInfo");
    let (_, outer) = der_tlv(der, 0x30).ok_or(bad)?;
    let (rest, alg) = der_tlv(outer, 0x30).ok_or(KeystoreError::Jks("a private key entry has no algorithm"))?;
    let (_, oid) = der_tlv(alg, 0x06).ok_or(KeystoreError::Jks("a private key entry has no algorithm"))?;
    if oid != SUN_KEY_PROTECTOR {
        return Err(KeystoreError::Jks(
            "a private key is protected by an algorithm other than Sun's JKS key protector",
        ));
    }
    let (_, data) = der_tlv(rest, 0x04).ok_or(KeystoreError::Jks("a private key entry has no encrypted data"))?;
    if data.len() < 41 {
        return Err(KeystoreError::Jks("a protected private key is too short"));
    }
    let (salt, rest) = data.split_at(20);
    let (encrypted, check) = rest.split_at(rest.len() - 20);
    let mut key = Vec::with_capacity(encrypted.len());
    let mut block = <[u8; 20]>::try_from(salt).map_err(|_| KeystoreError::Jks("salt"))?;
    for chunk in encrypted.chunks(20) {
        block = sha1(&[password_utf16, &block]);
        key.extend(chunk.iter().zip(block.iter()).map(|(c, k)| c ^ k));
    }
    if sha1(&[password_utf16, &key]) != check {
        return Err(KeystoreError::WrongPassword("JKS private key"));
    }
    Ok(key)
}

/// The value of the DER element at the start of `data` if its tag is `tag`, and what follows it.
fn der_tlv(data: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = data.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (&rest[len..], &rest[..len]))
}

/// Subject DN of a DER certificate in RFC 4514 order (`CN=…,OU=…`), as SAP's `publicKeys` shows it.
pub fn subject_dn(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.subject().to_string().replace(", ", ","))
}

/// The issuer DN of a DER certificate, in the form of [`subject_dn`].
pub fn issuer_dn(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.issuer().to_string().replace(", ", ","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_come_from_type_then_name() {
        assert_eq!(Format::from_type_or_name(Some("p12"), "x.pem"), Some(Format::Pkcs12));
        assert_eq!(Format::from_type_or_name(None, "x.JKS"), Some(Format::Jks));
        assert_eq!(Format::from_type_or_name(Some("CER"), "x.cer"), None);
        assert_eq!(Format::sniff(b"\xfe\xed\xfe\xed...."), Format::Jks);
    }

    #[test]
    fn truncated_and_foreign_bytes_are_errors() {
        assert!(matches!(decode(b"\xfe\xed\xfe\xed", Some(Format::Jks), Some("x")), Err(KeystoreError::Jks(_))));
        let mut jks = JKS_MAGIC.to_vec();
        jks.extend([0, 0, 0, 2, 0, 0, 0, 9]);
        jks.extend([0u8; 20]);
        assert!(matches!(decode(&jks, None, None), Err(KeystoreError::Jks(_))));
        assert!(decode(b"\x30\x03\x02\x01\x00", Some(Format::Pkcs12), Some("x")).is_err());
        assert!(matches!(decode(b"hello", Some(Format::Der), None), Err(KeystoreError::UnknownFormat)));
    }

    #[test]
    fn der_lengths_are_bounded() {
        assert_eq!(der_tlv(&[0x04, 0x02, 1, 2, 3], 0x04), Some((&[3u8][..], &[1u8, 2][..])));
        assert_eq!(der_tlv(&[0x04, 0x82, 0xff, 0xff, 1], 0x04), None);
        assert_eq!(der_tlv(&[0x04, 0x85, 1, 1, 1, 1, 1], 0x04), None);
    }
}
