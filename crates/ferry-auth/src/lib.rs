//! Identity for Ferry: JWT signing keys and verification (`jwt`, with external OpenID Connect
//! issuers in `oidc`), the XSUAA-compatible token service, and the OAuth client flows the
//! Destination Service runs.

// Tests may unwrap: a panic there is the failure report.
#![cfg_attr(test, allow(clippy::unwrap_used))]

#[doc(hidden)]
pub mod fuzzing;
pub mod jwt;
pub mod oidc;
pub mod saml;
pub mod token_cache;
pub mod token_service;

pub use jwt::{Claims, ExtAttr, Jwk, Jwks, KeySet, TenantKeys, TrustedIssuer, Verifier, VerifyError};
pub use oidc::{OidcIssuer, OidcTrust, TrustConfigError};
pub use token_cache::TokenCache;
