//! Wire protocols shared by Ferry components.
//!
//! Everything in this crate is *sans-I/O*: parsers work on byte slices and report how many bytes they
//! consumed (or that more bytes are needed); encoders write into buffers. No sockets, no async runtime.
//!
//! - [`socks5`]: the SOCKS5 dialect of SAP's Connectivity Proxy, including SAP's custom authentication
//!   method `0x80` (JWT + base64 Cloud Connector location id).
//! - [`tunnel`]: the stream header between the Connectivity Proxy and a Cloud Connector.

pub mod socks5;
pub mod tunnel;

#[doc(hidden)]
pub mod fuzzing;
