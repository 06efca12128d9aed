//! User passwords: stored only as Argon2id hashes (PHC strings), verified off the async
//! runtime, with bounded parallelism and the same cost for unknown users.
//!
//! The parameters are OWASP's minimum for Argon2id (19 MiB, two passes, one lane): enough to
//! make a leaked configuration or memory dump expensive to brute-force, cheap enough that a dev
//! server (and its test suite) hashes a handful of users at start-up without noticeable delay.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use ferry_core::Secret;
use tokio::sync::Semaphore;

/// Memory cost in KiB (OWASP minimum for Argon2id).
const M_COST_KIB: u32 = 19_456;
const T_COST: u32 = 2;
const P_COST: u32 = 1;

/// Upper bounds for hashes given in the configuration, so that a configured hash cannot make
/// every login attempt cost seconds or gigabytes.
const MAX_M_COST_KIB: u32 = 256 * 1024;
const MAX_T_COST: u32 = 16;
const MAX_P_COST: u32 = 8;

/// Why a password could not be hashed, or a configured hash is unusable.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct PasswordError(String);

fn argon2() -> Result<Argon2<'static>, PasswordError> {
    let params = Params::new(M_COST_KIB, T_COST, P_COST, None).map_err(|e| PasswordError(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes `password` with Argon2id and a random salt; the PHC string it returns can be put in
/// [`User::password`](super::User::password) instead of the password.
pub fn hash_password(password: &str) -> Result<String, PasswordError> {
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| PasswordError("no randomness available".into()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| PasswordError(e.to_string()))?;
    let hash = argon2()?.hash_password(password.as_bytes(), &salt).map_err(|e| PasswordError(e.to_string()))?;
    Ok(hash.to_string())
}

/// Whether a configured password is meant as a hash.
pub(crate) fn looks_hashed(value: &str) -> bool {
    value.starts_with("$argon2")
}

/// Checks that a configured PHC string is an Argon2 hash with bounded cost.
pub(crate) fn check_hash(phc: &str) -> Result<(), PasswordError> {
    let hash = PasswordHash::new(phc).map_err(|e| PasswordError(e.to_string()))?;
    if Algorithm::try_from(hash.algorithm).is_err() {
        return Err(PasswordError(format!("algorithm {} is not Argon2", hash.algorithm)));
    }
    let params = Params::try_from(&hash).map_err(|e| PasswordError(e.to_string()))?;
    if params.m_cost() > MAX_M_COST_KIB || params.t_cost() > MAX_T_COST || params.p_cost() > MAX_P_COST {
        return Err(PasswordError(format!(
            "cost parameters above the limits (m ≤ {MAX_M_COST_KIB}, t ≤ {MAX_T_COST}, p ≤ {MAX_P_COST})"
        )));
    }
    if hash.hash.is_none() {
        return Err(PasswordError("the PHC string has no hash".into()));
    }
    Ok(())
}

/// Verifies `password` against a PHC string; false for anything malformed.
fn verify_blocking(phc: &str, password: &str) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else { return false };
    // `Argon2::default()` takes algorithm, version and cost from the PHC string itself.
    Argon2::default().verify_password(password.as_bytes(), &hash).is_ok()
}

/// Verifies passwords on the blocking pool. Holds a hash of a random password so that a login
/// attempt for an unknown user costs the same as one for a known user.
pub(crate) struct PasswordVerifier {
    dummy: Secret<String>,
    /// Each verification holds 19 MiB and a core for tens of milliseconds: bound how many run
    /// at once, so that a burst of logins queues instead of exhausting memory.
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for PasswordVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordVerifier").finish_non_exhaustive()
    }
}

impl PasswordVerifier {
    pub fn new() -> Result<Self, PasswordError> {
        let mut random = [0u8; 24];
        aws_lc_rs::rand::fill(&mut random).map_err(|_| PasswordError("no randomness available".into()))?;
        let dummy = hash_password(&base64::Engine::encode(&base64::engine::general_purpose::STANDARD, random))?;
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8);
        Ok(Self { dummy: Secret::new(dummy), permits: Arc::new(Semaphore::new(parallel)) })
    }

    /// Whether `password` matches `hash`; with no hash (unknown user, or a user without a
    /// password) the dummy hash is verified instead and the answer is false.
    pub async fn verify(&self, hash: Option<&Secret<String>>, password: &str) -> bool {
        let known = hash.is_some();
        let phc = hash.unwrap_or(&self.dummy).expose().clone();
        let password = password.to_owned();
        let Ok(_permit) = self.permits.acquire().await else { return false };
        let ok = tokio::task::spawn_blocking(move || verify_blocking(&phc, &password)).await.unwrap_or(false);
        ok && known
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_are_argon2id() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(looks_hashed(&h));
        check_hash(&h).unwrap();
        assert!(verify_blocking(&h, "s3cret"));
        assert!(!verify_blocking(&h, "s3cret "));
        assert_ne!(h, hash_password("s3cret").unwrap(), "salted");
    }

    #[test]
    fn configured_hashes_are_checked() {
        assert!(check_hash("$argon2id$garbage").is_err());
        let costly = "$argon2id$v=19$m=4194304,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";
        assert!(check_hash(costly).unwrap_err().0.contains("limits"));
        assert!(!verify_blocking("not a hash", "x"));
    }

    #[tokio::test]
    async fn unknown_users_never_verify() {
        let v = PasswordVerifier::new().unwrap();
        let h = Secret::new(hash_password("pw").unwrap());
        assert!(v.verify(Some(&h), "pw").await);
        assert!(!v.verify(Some(&h), "nope").await);
        assert!(!v.verify(None, "pw").await);
        assert!(!format!("{v:?}").contains("argon2"));
    }
}
