//! The keys stored rows are sealed with, and where they come from.
//!
//! Rotation: the current key seals every write; the previous keys only open. Each sealed row
//! names its key by an id derived from the key, so opening never has to guess and a row under
//! a key that is no longer configured fails clearly. Rows written before key ids existed
//! (format 1) are opened by trying each key.

use std::path::PathBuf;

use ferry_core::Secret;
use ferry_core::aead::{SealError, Sealer};
use sha2::{Digest, Sha256};

/// `2 || key id (8 bytes) || format-1 blob`.
const FORMAT_KEYED: u8 = 2;
const KEY_ID_LEN: usize = 8;

/// Where a key comes from: 64 hex digits (32 bytes) in a file or an environment variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    Env(String),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the key file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("the environment variable {0} is not set (it should hold the key as 64 hex digits)")]
    MissingEnv(String),
    #[error("the key in {0} is not 64 hex digits (32 bytes)")]
    Malformed(String),
}

impl KeySource {
    pub fn load(&self) -> Result<Secret<[u8; 32]>, KeyError> {
        let (text, origin) = match self {
            KeySource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| KeyError::Read { path: path.display().to_string(), reason: e.to_string() })?;
                (Secret::new(text), path.display().to_string())
            }
            KeySource::Env(name) => {
                let text = std::env::var(name).map_err(|_| KeyError::MissingEnv(name.clone()))?;
                (Secret::new(text), format!("${name}"))
            }
        };
        let bytes = hex::decode(text.expose().trim()).map_err(|_| KeyError::Malformed(origin.clone()))?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Malformed(origin))?;
        Ok(Secret::new(key))
    }
}

struct Key {
    id: [u8; KEY_ID_LEN],
    sealer: Sealer,
}

impl Key {
    fn new(key: &Secret<[u8; 32]>) -> Result<Self, SealError> {
        // A one-way function of the key: it names the key without revealing it.
        let digest = Sha256::new().chain_update(b"ferry-destination key id").chain_update(key.expose()).finalize();
        let mut id = [0; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        Ok(Self { id, sealer: Sealer::new(key)? })
    }
}

pub(crate) struct Keyring {
    current: Key,
    previous: Vec<Key>,
}

impl Keyring {
    pub(crate) fn new(current: &Secret<[u8; 32]>, previous: &[Secret<[u8; 32]>]) -> Result<Self, SealError> {
        Ok(Self { current: Key::new(current)?, previous: previous.iter().map(Key::new).collect::<Result<_, _>>()? })
    }

    pub(crate) fn has_previous(&self) -> bool {
        !self.previous.is_empty()
    }

    pub(crate) fn seal(&self, associated: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let inner = self.current.sealer.seal(associated, plaintext)?;
        let mut out = Vec::with_capacity(1 + KEY_ID_LEN + inner.len());
        out.push(FORMAT_KEYED);
        out.extend_from_slice(&self.current.id);
        out.extend_from_slice(&inner);
        Ok(out)
    }

    /// The plaintext, and whether the row should be sealed again (it is not under the current
    /// key, or predates key ids).
    pub(crate) fn open(&self, associated: &[u8], sealed: &[u8]) -> Result<(Vec<u8>, bool), SealError> {
        let mut keys = std::iter::once(&self.current).chain(&self.previous);
        match sealed.split_first() {
            Some((&FORMAT_KEYED, rest)) if rest.len() > KEY_ID_LEN => {
                let (id, inner) = rest.split_at(KEY_ID_LEN);
                let key = keys.find(|k| k.id == id).ok_or(SealError::Open)?;
                Ok((key.sealer.open(associated, inner)?, key.id != self.current.id))
            }
            Some((&FORMAT_KEYED, _)) | None => Err(SealError::Format),
            Some(_) => {
                let mut last = SealError::Open;
                for key in keys {
                    match key.sealer.open(associated, sealed) {
                        Ok(plain) => return Ok((plain, true)),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_opens_old_rows_and_flags_them() {
        let (k1, k2) = (Secret::new([1u8; 32]), Secret::new([2u8; 32]));
        let old = Keyring::new(&k1, &[]).unwrap();
        let row = old.seal(b"aad", b"plain").unwrap();
        let legacy = Sealer::new(&k1).unwrap().seal(b"aad", b"plain").unwrap();
        assert_eq!(old.open(b"aad", &row).unwrap(), (b"plain".to_vec(), false));
        assert_eq!(old.open(b"aad", &legacy).unwrap(), (b"plain".to_vec(), true), "format 1 is re-sealed");

        let rotated = Keyring::new(&k2, std::slice::from_ref(&k1)).unwrap();
        assert_eq!(rotated.open(b"aad", &row).unwrap(), (b"plain".to_vec(), true));
        assert_eq!(rotated.open(b"aad", &legacy).unwrap(), (b"plain".to_vec(), true));
        let new = rotated.seal(b"aad", b"plain").unwrap();
        assert_eq!(rotated.open(b"aad", &new).unwrap(), (b"plain".to_vec(), false));
        assert!(matches!(old.open(b"aad", &new), Err(SealError::Open)), "the old key alone cannot open new rows");
        assert!(matches!(rotated.open(b"other", &row), Err(SealError::Open)));
        assert!(matches!(rotated.open(b"aad", &[FORMAT_KEYED, 1]), Err(SealError::Format)));
    }

    #[test]
    fn keys_load_from_files_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(KeySource::File(path.clone()).load().unwrap().expose(), &[0xab; 32]);
        std::fs::write(&path, "abcd").unwrap();
        let e = KeySource::File(path).load().err().unwrap();
        assert!(e.to_string().contains("not 64 hex digits"), "{e}");
        let e = KeySource::File(dir.path().join("missing")).load().err().unwrap();
        assert!(e.to_string().contains("cannot read the key file"), "{e}");
        let e = KeySource::Env("FERRY_TEST_KEY_THAT_IS_NOT_SET".into()).load().err().unwrap();
        assert!(e.to_string().contains("FERRY_TEST_KEY_THAT_IS_NOT_SET is not set"), "{e}");
        // PATH is always set and never 64 hex digits.
        let e = KeySource::Env("PATH".into()).load().err().unwrap();
        assert!(e.to_string().contains("$PATH is not 64 hex digits"), "{e}");
    }
}
