//! The destination model, shared by the Destination Service, clients and configuration files.
//!
//! SAP's Destination Service treats a destination as a flat JSON object of string properties,
//! most of which it never interprets (`URL.headers.*`, `HTML5.*`, `mail.*` are for clients). So
//! the model keeps every property as given, in the order given, and only validates and types the
//! few keys whose meaning the service itself depends on (`Name`, `Type`, `Authentication`).
//! What a destination of each type and authentication must contain is checked separately
//! (`Destination::check`, module `rules`) when it is written, so stored rows always load.
//! `export` reads and writes SAP's cockpit export files (`.properties` or JSON).

// Tests state their expectations with unwrap; a panic there is the failure report.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod certificate;
mod destination;
mod export;
mod fragment;
mod kinds;
mod rules;
mod secrets;

#[doc(hidden)]
pub mod fuzzing;

pub use certificate::{
    CERTIFICATE_TYPES, Certificate, CertificateAttributes, CertificateError, MAX_CERTIFICATE_BYTES,
    MAX_CERTIFICATE_NAME_LEN, Validity,
};
pub use destination::{Destination, MAX_NAME_LEN, RawDestination, RawValue, ValidationError};
pub use export::{FileFormat, FormatError, parse_file, parse_properties, to_properties};
pub use fragment::{Fragment, raw_fragment_name};
pub use kinds::{AuthenticationType, DestinationType, ProxyType, UnknownValue};
pub use rules::{MAX_PROPERTY_NAME_LEN, MAX_PROPERTY_VALUE_LEN};
pub use secrets::is_secret_property;
