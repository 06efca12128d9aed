//! Encryption at rest (AES-256-GCM under the master key), for the destination store and the
//! subaccount directory.
//!
//! Stored rows carry passwords, client secrets and signing keys, and database files end up in
//! backups and on shared volumes, so each is sealed under the master key. The row key (e.g.
//! subaccount, level, name) is the associated data: a ciphertext copied into another row —
//! say, from a tenant the attacker controls into a victim's — fails to open instead of
//! silently serving someone else's credentials.

use crate::Secret;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};

/// First byte of every sealed blob, so the format (cipher, nonce size) can change later while
/// old rows stay readable.
const FORMAT_V1: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("encryption failed")]
    Seal,
    /// Wrong key, tampered data, or data moved to another row: GCM cannot tell them apart.
    #[error("decryption failed (wrong master key, or the stored data was altered)")]
    Open,
    #[error("stored data has an unknown format")]
    Format,
}

pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(***)")
    }
}

impl Sealer {
    pub fn new(master_key: &Secret<[u8; 32]>) -> Result<Self, SealError> {
        let key = UnboundKey::new(&AES_256_GCM, master_key.expose()).map_err(|_| SealError::Seal)?;
        Ok(Self { key: LessSafeKey::new(key), rng: SystemRandom::new() })
    }

    /// `version || nonce || ciphertext || tag`, with a fresh random nonce per call. Random
    /// 96-bit nonces are safe far beyond the number of writes a destination store sees.
    pub fn seal(&self, associated: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Seal)?;
        let mut body = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(associated), &mut body)
            .map_err(|_| SealError::Seal)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + body.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        Ok(out)
    }

    pub fn open(&self, associated: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let (&version, rest) = sealed.split_first().ok_or(SealError::Format)?;
        if version != FORMAT_V1 || rest.len() < NONCE_LEN {
            return Err(SealError::Format);
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Format)?;
        let mut body = body.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::from(associated), &mut body).map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let s = Sealer::new(&Secret::new([7u8; 32])).unwrap();
        let a = s.seal(b"row-a", b"hello").unwrap();
        let b = s.seal(b"row-a", b"hello").unwrap();
        assert_ne!(a, b, "nonces must differ");
        assert_eq!(s.open(b"row-a", &a).unwrap(), b"hello");
        assert!(matches!(s.open(b"row-b", &a), Err(SealError::Open)));
        let other = Sealer::new(&Secret::new([8u8; 32])).unwrap();
        assert!(matches!(other.open(b"row-a", &a), Err(SealError::Open)));
        let mut tampered = a.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(matches!(s.open(b"row-a", &tampered), Err(SealError::Open)));
        assert!(matches!(s.open(b"row-a", &[]), Err(SealError::Format)));
        assert!(matches!(s.open(b"row-a", &[2, 0, 0]), Err(SealError::Format)));
    }
}
