//! Identity for Ferry: JWT signing keys and verification (this module), the XSUAA-compatible
//! token service, and the OAuth client flows the Destination Service runs.

pub mod jwt;

pub use jwt::{Claims, ExtAttr, Jwk, Jwks, KeySet, TrustedIssuer, Verifier, VerifyError};
