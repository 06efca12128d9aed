//! Which destination properties hold secrets.
//!
//! The list matters in two places: list APIs must never return secrets (a project rule, stricter
//! than SAP's), and `Debug` output must mask them so a stray log line cannot leak a password.
//! Masking too much is harmless; masking too little is not, so besides the well-known keys every
//! key that merely *looks* like a secret (by suffix, in any letter case) counts as one.

/// Secret keys whose names the suffix rule below would not catch on its own, kept explicit so
/// a change to the rule cannot silently unmask them.
const KNOWN_SECRETS: &[&str] = &[
    "Password",
    "clientSecret",
    "tokenServicePassword",
    "mail.password",
    "jco.client.passwd",
    "KeyStorePassword",
    "TrustStorePassword",
    "tokenService.KeyStorePassword",
];

/// Suffixes compared case-insensitively; `passwd` covers the JCo keys
/// (`jco.destination.repository.passwd`).
const SECRET_SUFFIXES: &[&str] = &["password", "secret", "passwd"];

/// Whether the property `key` holds a secret and must be masked in logs and left out of lists.
pub fn is_secret_property(key: &str) -> bool {
    KNOWN_SECRETS.contains(&key) || SECRET_SUFFIXES.iter().any(|suffix| ends_with_ignore_case(key, suffix))
}

fn ends_with_ignore_case(key: &str, suffix: &str) -> bool {
    key.len() >= suffix.len()
        && key.is_char_boundary(key.len() - suffix.len())
        && key[key.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_keys() {
        for k in KNOWN_SECRETS {
            assert!(is_secret_property(k), "{k}");
        }
        for k in ["jco.client.tech_user_secret", "jco.destination.repository.passwd", "someApiSecret", "X.PASSWORD"] {
            assert!(is_secret_property(k), "{k}");
        }
        for k in ["Name", "User", "clientId", "tokenServiceUser", "URL", "Passwordless", "sécret", "é"] {
            assert!(!is_secret_property(k), "{k}");
        }
    }
}
