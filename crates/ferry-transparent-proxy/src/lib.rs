//! Ferry's Transparent Proxy (SPEC §5): each `Destination` custom resource becomes a local endpoint
//! that looks the destination up in the Destination Service, adds its credentials and routes the
//! request directly (Internet) or through the Connectivity Proxy (OnPremise).

pub mod resource;

pub use resource::{Destination, DestinationSpec, DestinationStatus, LoadError, ValidationError};
