//! The client side of Ferry (and SAP BTP Connectivity) for apps that are not HTTP clients:
//!
//! - [`socks5`]: open a TCP connection through the Connectivity Proxy's SOCKS5 port with SAP's
//!   authentication method 0x80 (JWT + Cloud Connector location id), with one clear error per
//!   SOCKS5 reply code;
//! - [`target`]: where a `TCP`, `LDAP` or `MAIL` destination points (virtual host, port, location
//!   id), read from the destination's properties as the Destination Service returns them.
//!
//! Both are protocol plumbing only: fetching tokens and destinations is the caller's business
//! (the `ferry connect` command does it from an app's `VCAP_SERVICES`).

pub mod socks5;
pub mod target;

pub use socks5::{ConnectError, connect_tcp, handshake};
pub use target::{MailProtocol, TargetError, TcpTarget, tcp_target};
