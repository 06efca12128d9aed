//! SOCKS5 as spoken by SAP's Connectivity Proxy (port 20004), with SAP's custom authentication method `0x80`.
//!
//! A sans-I/O codec: every `parse` function looks at the bytes received so far and returns
//!
//! - `Ok(Some((value, consumed)))` when a complete message is at the start of the buffer; `consumed` is its
//!   exact length, so bytes that follow (the next message, or already-tunnelled payload) are left alone;
//! - `Ok(None)` when the buffer holds a strict prefix of a message that may still turn out valid: read more
//!   bytes and call again with the whole buffer;
//! - `Err(_)` as soon as the bytes seen so far can no longer form a valid message. Fields are checked as they
//!   arrive, so a peer cannot make us wait for (or buffer) bytes of a message that is already known to be bad.
//!   An error depends only on the bytes up to the offending field: appending more bytes never changes it.
//!
//! Encoders write into [`bytes::BytesMut`] or return fixed-size arrays.
//!
//! # The exchange
//!
//! ```text
//! C→S  05 02 00 80                  greeting: VER=5, NMETHODS=2, METHODS {00 no-auth, 80 SAP}
//! S→C  05 80                        method selection: the proxy MUST pick 80 when offered
//! C→S  01 00 00 04 bd <JWT> 0c "Y29uZi1sb2M="
//!                                   SAP auth: version 1, u32 BE JWT length, JWT, u8 length of
//!                                   base64(location id), base64(location id) ("conf-loc" here)
//! S→C  01 00                        auth status: 01 00 success, 01 01 failure
//! C→S  05 01 00 03 13 "onprem-smtp.virtual" 00 19
//!                                   CONNECT onprem-smtp.virtual:25
//! S→C  05 00 00 01 00 00 00 00 00 00
//!                                   reply: REP=00 succeeded; then raw bytes are relayed
//! ```
//!
//! Server side: [`Greeting::parse`] → [`choose_method`] → [`encode_method_selection`] → [`SapAuth::parse`] →
//! [`encode_auth_reply`] → [`ConnectRequest::parse`] → [`encode_reply`]. What to answer when parsing fails is
//! described on [`Socks5Error`].
//!
//! Client side (tests, test kit): [`Greeting::encode`], [`parse_method_selection`], [`SapAuth::encode`],
//! [`parse_auth_reply`], [`ConnectRequest::encode`], [`ConnectReply::parse`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::{BufMut, BytesMut};

/// `VER` of every SOCKS5 message except the SAP authentication sub-negotiation.
pub const SOCKS_VERSION: u8 = 0x05;
/// Authentication method "no authentication required" (RFC 1928). Never chosen by the SAP proxy.
pub const METHOD_NO_AUTH: u8 = 0x00;
/// SAP's custom authentication method: JWT + Cloud Connector location id (see [`SapAuth`]).
pub const METHOD_SAP: u8 = 0x80;
/// Method selection value meaning "no acceptable methods"; the client must close the connection.
pub const METHOD_NO_ACCEPTABLE: u8 = 0xFF;
/// Version byte of the SAP authentication sub-negotiation and of its status reply.
pub const SAP_AUTH_VERSION: u8 = 0x01;
/// Largest JWT accepted in the SAP authentication sub-negotiation: 64 KiB.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;
/// `CMD` CONNECT: the only command the Connectivity Proxy supports.
pub const CMD_CONNECT: u8 = 0x01;
/// `CMD` BIND (RFC 1928); answered with [`Reply::CommandNotSupported`].
pub const CMD_BIND: u8 = 0x02;
/// `CMD` UDP ASSOCIATE (RFC 1928); answered with [`Reply::CommandNotSupported`].
pub const CMD_UDP_ASSOCIATE: u8 = 0x03;
/// `ATYP` IPv4 address, 4 bytes.
pub const ATYP_IPV4: u8 = 0x01;
/// `ATYP` domain name: 1 length byte followed by that many bytes.
pub const ATYP_DOMAIN: u8 = 0x03;
/// `ATYP` IPv6 address, 16 bytes.
pub const ATYP_IPV6: u8 = 0x04;

/// Result of a sans-I/O parse: `Ok(Some((value, consumed_len)))`, `Ok(None)` when more bytes are needed,
/// or an error.
pub type Parsed<T> = Result<Option<(T, usize)>, Socks5Error>;

/// Everything that can be wrong with a SOCKS5 message, on parsing or on encoding.
///
/// What the proxy should answer:
/// - errors from [`Greeting::parse`]: nothing, close the connection (there is no method to select);
/// - errors from [`SapAuth::parse`]: [`encode_auth_reply(false)`](encode_auth_reply), then close;
/// - errors from [`ConnectRequest::parse`]: [`encode_reply`]`(err.reply_code())`, then close. An unknown
///   `ATYP` gives [`Reply::AddressTypeNotSupported`], anything else [`Reply::GeneralFailure`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Socks5Error {
    /// The `VER` byte of a greeting, request or reply is not 5.
    #[error("SOCKS version {found} is not supported; expected 5")]
    UnsupportedVersion {
        /// The version byte received.
        found: u8,
    },
    /// The greeting's `NMETHODS` is 0 (or, when encoding, the method list is empty).
    #[error("the greeting offers no authentication methods (NMETHODS is 0)")]
    NoMethods,
    /// Encoding only: more methods than the `NMETHODS` byte can count.
    #[error("the greeting offers {count} authentication methods; at most 255 fit in NMETHODS")]
    TooManyMethods {
        /// Number of methods in the greeting.
        count: usize,
    },
    /// The first byte of the SAP authentication sub-negotiation is not 1.
    #[error("SAP authentication sub-negotiation version {found} is not supported; expected 1")]
    UnsupportedAuthVersion {
        /// The version byte received.
        found: u8,
    },
    /// The JWT length field is 0 (or, when encoding, the token is empty).
    #[error("the JWT length in the SAP authentication is 0; a token is required")]
    EmptyToken,
    /// The JWT length field is larger than [`MAX_TOKEN_LEN`]; reported before any token byte is awaited.
    #[error("the JWT length in the SAP authentication is {len} bytes, more than the limit of {max} bytes", max = MAX_TOKEN_LEN)]
    TokenTooLong {
        /// The announced (or, when encoding, actual) token length.
        len: u64,
    },
    /// The JWT bytes are not valid UTF-8.
    #[error("the JWT in the SAP authentication is not valid UTF-8 (invalid byte at offset {valid_up_to})")]
    TokenNotUtf8 {
        /// Length of the valid UTF-8 prefix of the token.
        valid_up_to: usize,
    },
    /// The location id field is not valid base64 (standard alphabet, padded or unpadded).
    #[error("the location id in the SAP authentication is not valid base64: {reason}")]
    InvalidLocationIdBase64 {
        /// What exactly is wrong.
        reason: String,
    },
    /// The base64-decoded location id is not valid UTF-8.
    #[error(
        "the location id in the SAP authentication is not valid UTF-8 after base64 decoding (invalid byte at offset {valid_up_to})"
    )]
    LocationIdNotUtf8 {
        /// Length of the valid UTF-8 prefix of the decoded location id.
        valid_up_to: usize,
    },
    /// Encoding only: base64 of the location id does not fit the 1-byte length field.
    #[error("the base64 of the location id is {len} bytes long; at most 255 fit in its length byte")]
    LocationIdTooLong {
        /// Length of the base64 text.
        len: usize,
    },
    /// `ATYP` is none of 01 (IPv4), 03 (domain name), 04 (IPv6). Answer [`Reply::AddressTypeNotSupported`].
    #[error("address type {atyp:#04x} is not supported; expected 0x01 (IPv4), 0x03 (domain name) or 0x04 (IPv6)")]
    UnsupportedAddressType {
        /// The `ATYP` byte received.
        atyp: u8,
    },
    /// A domain-name address with length 0.
    #[error("the domain name in the request is empty (its length byte is 0)")]
    EmptyDomain,
    /// A domain-name address that is not valid UTF-8.
    #[error("the domain name in the request is not valid UTF-8 (invalid byte at offset {valid_up_to})")]
    DomainNotUtf8 {
        /// Length of the valid UTF-8 prefix of the name.
        valid_up_to: usize,
    },
    /// A domain-name address containing a control character (C0, DEL or C1).
    #[error("the domain name in the request contains the control character {ch:?} at byte offset {offset}")]
    DomainControlCharacter {
        /// Byte offset of the character within the name.
        offset: usize,
        /// The offending character.
        ch: char,
    },
    /// Encoding only: a domain name longer than its 1-byte length field allows.
    #[error("the domain name is {len} bytes long; at most 255 fit in its length byte")]
    DomainTooLong {
        /// Length of the name in bytes.
        len: usize,
    },
}

impl Socks5Error {
    /// The reply code to send when this error came from [`ConnectRequest::parse`]:
    /// [`Reply::AddressTypeNotSupported`] for an unknown `ATYP`, [`Reply::GeneralFailure`] otherwise.
    pub fn reply_code(&self) -> Reply {
        match self {
            Socks5Error::UnsupportedAddressType { .. } => Reply::AddressTypeNotSupported,
            _ => Reply::GeneralFailure,
        }
    }
}

fn check_version(found: u8) -> Result<(), Socks5Error> {
    if found == SOCKS_VERSION { Ok(()) } else { Err(Socks5Error::UnsupportedVersion { found }) }
}

// ---------------------------------------------------------------------------------------------------------
// Greeting and method selection
// ---------------------------------------------------------------------------------------------------------

/// The client's greeting: the authentication methods it offers.
///
/// ```text
/// +-----+----------+----------------------+
/// | VER | NMETHODS | METHODS              |
/// +-----+----------+----------------------+
/// | 05  | 1 byte   | NMETHODS bytes       |
/// +-----+----------+----------------------+
/// recorded (SAP mail client): 05 02 00 80
/// ```
///
/// `NMETHODS` must be at least 1. Method values are not checked; duplicates are kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Greeting {
    /// The offered methods, in the order received.
    pub methods: Vec<u8>,
}

impl Greeting {
    /// Parses a greeting at the start of `buf`.
    ///
    /// Errors: [`Socks5Error::UnsupportedVersion`] (checked on the first byte), [`Socks5Error::NoMethods`].
    pub fn parse(buf: &[u8]) -> Parsed<Greeting> {
        let Some(&version) = buf.first() else { return Ok(None) };
        check_version(version)?;
        let Some(&count) = buf.get(1) else { return Ok(None) };
        if count == 0 {
            return Err(Socks5Error::NoMethods);
        }
        let end = 2 + usize::from(count);
        let Some(methods) = buf.get(2..end) else { return Ok(None) };
        Ok(Some((Greeting { methods: methods.to_vec() }, end)))
    }

    /// Appends the wire form of this greeting to `dst`.
    ///
    /// Errors: [`Socks5Error::NoMethods`], [`Socks5Error::TooManyMethods`] (more than 255); nothing is written
    /// then.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), Socks5Error> {
        if self.methods.is_empty() {
            return Err(Socks5Error::NoMethods);
        }
        let count =
            u8::try_from(self.methods.len()).map_err(|_| Socks5Error::TooManyMethods { count: self.methods.len() })?;
        dst.reserve(2 + self.methods.len());
        dst.put_u8(SOCKS_VERSION);
        dst.put_u8(count);
        dst.put_slice(&self.methods);
        Ok(())
    }

    /// Whether the client offers `method`.
    pub fn offers(&self, method: u8) -> bool {
        self.methods.contains(&method)
    }
}

/// The method the proxy selects: [`METHOD_SAP`] (`0x80`) if the client offers it, otherwise `None`, in which
/// case the proxy answers [`encode_method_selection`]`(`[`METHOD_NO_ACCEPTABLE`]`)` (`05 FF`) and closes.
///
/// Never returns [`METHOD_NO_AUTH`], even when offered: a client that is given `00` proceeds without sending
/// its JWT, so the proxy would have no tenant and no authorization.
pub fn choose_method(greeting: &Greeting) -> Option<u8> {
    greeting.offers(METHOD_SAP).then_some(METHOD_SAP)
}

/// The server's method selection.
///
/// ```text
/// +-----+--------+
/// | VER | METHOD |
/// +-----+--------+
/// | 05  | 1 byte |      05 80 = SAP method chosen, 05 FF = no acceptable method
/// +-----+--------+
/// ```
pub fn encode_method_selection(method: u8) -> [u8; 2] {
    [SOCKS_VERSION, method]
}

/// Client side: parses the server's method selection (see [`encode_method_selection`]) and returns the chosen
/// method, which may be [`METHOD_NO_ACCEPTABLE`].
///
/// Errors: [`Socks5Error::UnsupportedVersion`].
pub fn parse_method_selection(buf: &[u8]) -> Parsed<u8> {
    let Some(&version) = buf.first() else { return Ok(None) };
    check_version(version)?;
    let Some(&method) = buf.get(1) else { return Ok(None) };
    Ok(Some((method, 2)))
}

// ---------------------------------------------------------------------------------------------------------
// SAP authentication (method 0x80)
// ---------------------------------------------------------------------------------------------------------

/// SAP's authentication sub-negotiation (method `0x80`): the connectivity JWT and the Cloud Connector
/// location id.
///
/// ```text
/// +-----+-------------+-------------+-----+----------------------+
/// | VER | JWT length  | JWT         |  L  | base64(location id)  |
/// +-----+-------------+-------------+-----+----------------------+
/// | 01  | 4 bytes, BE | that many   | 1 B | L bytes, ASCII       |
/// |     | 1..=64 KiB  | UTF-8 bytes |     | (L = 0: no location) |
/// +-----+-------------+-------------+-----+----------------------+
/// recorded: 01 00 00 04 bd <1213-byte JWT> 0c "Y29uZi1sb2M="   (location id "conf-loc")
/// ```
///
/// The JWT is raw (no `Bearer ` prefix). The location id is base64 with the standard alphabet; padded and
/// unpadded forms are both accepted, non-zero trailing bits are ignored.
///
/// `Debug` does not print the token.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SapAuth {
    /// The JWT, exactly as sent (no `Bearer ` prefix).
    pub token: String,
    /// The decoded Cloud Connector location id; `None` when the length byte is 0.
    pub location_id: Option<String>,
}

impl fmt::Debug for SapAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SapAuth")
            .field("token", &format_args!("<redacted, {} bytes>", self.token.len()))
            .field("location_id", &self.location_id)
            .finish()
    }
}

impl SapAuth {
    /// Parses the SAP authentication sub-negotiation at the start of `buf`.
    ///
    /// Errors: [`Socks5Error::UnsupportedAuthVersion`] (first byte), [`Socks5Error::EmptyToken`] and
    /// [`Socks5Error::TokenTooLong`] (as soon as the 4 length bytes are there, without waiting for the token),
    /// [`Socks5Error::TokenNotUtf8`], [`Socks5Error::InvalidLocationIdBase64`],
    /// [`Socks5Error::LocationIdNotUtf8`].
    pub fn parse(buf: &[u8]) -> Parsed<SapAuth> {
        let Some(&version) = buf.first() else { return Ok(None) };
        if version != SAP_AUTH_VERSION {
            return Err(Socks5Error::UnsupportedAuthVersion { found: version });
        }
        let Some(&[l0, l1, l2, l3]) = buf.get(1..5) else { return Ok(None) };
        let announced = u32::from_be_bytes([l0, l1, l2, l3]);
        if announced == 0 {
            return Err(Socks5Error::EmptyToken);
        }
        let token_len = usize::try_from(announced).unwrap_or(usize::MAX);
        if token_len > MAX_TOKEN_LEN {
            return Err(Socks5Error::TokenTooLong { len: u64::from(announced) });
        }
        let token_end = 5 + token_len;
        let Some(token) = buf.get(5..token_end) else { return Ok(None) };
        let token = std::str::from_utf8(token)
            .map_err(|e| Socks5Error::TokenNotUtf8 { valid_up_to: e.valid_up_to() })?
            .to_owned();
        let Some(&location_len) = buf.get(token_end) else { return Ok(None) };
        let location_start = token_end + 1;
        let end = location_start + usize::from(location_len);
        let Some(encoded) = buf.get(location_start..end) else { return Ok(None) };
        let location_id = if encoded.is_empty() {
            None
        } else {
            let decoded = base64_decode(encoded).map_err(|reason| Socks5Error::InvalidLocationIdBase64 { reason })?;
            let location = String::from_utf8(decoded)
                .map_err(|e| Socks5Error::LocationIdNotUtf8 { valid_up_to: e.utf8_error().valid_up_to() })?;
            Some(location)
        };
        Ok(Some((SapAuth { token, location_id }, end)))
    }

    /// Client side: appends the wire form to `dst`, base64-encoding the location id (standard alphabet, padded).
    /// `Some("")` is sent like `None` (length byte 0).
    ///
    /// Errors: [`Socks5Error::EmptyToken`], [`Socks5Error::TokenTooLong`], [`Socks5Error::LocationIdTooLong`]
    /// (base64 longer than 255 bytes, i.e. a location id over 189 bytes); nothing is written then.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), Socks5Error> {
        if self.token.is_empty() {
            return Err(Socks5Error::EmptyToken);
        }
        if self.token.len() > MAX_TOKEN_LEN {
            return Err(Socks5Error::TokenTooLong { len: self.token.len() as u64 });
        }
        let token_len = u32::try_from(self.token.len()).map_err(|_| Socks5Error::TokenTooLong { len: u64::MAX })?;
        let encoded = base64_encode(self.location_id.as_deref().unwrap_or_default().as_bytes());
        let location_len =
            u8::try_from(encoded.len()).map_err(|_| Socks5Error::LocationIdTooLong { len: encoded.len() })?;
        dst.reserve(6 + self.token.len() + encoded.len());
        dst.put_u8(SAP_AUTH_VERSION);
        dst.put_u32(token_len);
        dst.put_slice(self.token.as_bytes());
        dst.put_u8(location_len);
        dst.put_slice(encoded.as_bytes());
        Ok(())
    }
}

/// The server's answer to the SAP authentication.
///
/// ```text
/// +-----+--------+
/// | VER | STATUS |
/// +-----+--------+
/// | 01  | 00/01  |      01 00 = success, 01 01 = failure (the proxy then closes)
/// +-----+--------+
/// ```
pub fn encode_auth_reply(success: bool) -> [u8; 2] {
    [SAP_AUTH_VERSION, if success { 0x00 } else { 0x01 }]
}

/// Client side: parses the 2-byte authentication status. Like SAP's client, success is exactly `01 00`; any
/// other pair of bytes is a failure (`false`), not an error.
pub fn parse_auth_reply(buf: &[u8]) -> Parsed<bool> {
    match buf.get(..2) {
        Some(&[version, status]) => Ok(Some((version == SAP_AUTH_VERSION && status == 0x00, 2))),
        _ => Ok(None),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Request and reply
// ---------------------------------------------------------------------------------------------------------

/// A destination address (`ATYP` + `ADDR`).
///
/// ```text
/// ATYP 01: 4 bytes IPv4              01 0a 00 00 01
/// ATYP 03: 1 length byte + name      03 13 "onprem-smtp.virtual"   (length 1..=255, UTF-8, no control chars)
/// ATYP 04: 16 bytes IPv6             04 00 00 ... 00 01
/// ```
///
/// SAP documents only IPv4 and domain names for its proxy; IPv6 is parsed anyway and it is up to the proxy
/// to answer [`Reply::AddressTypeNotSupported`] for it if it wants to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// `ATYP 01`.
    Ipv4([u8; 4]),
    /// `ATYP 03`: a host name (for the Connectivity Proxy: a virtual host of a Cloud Connector mapping).
    Domain(String),
    /// `ATYP 04`.
    Ipv6([u8; 16]),
}

impl Address {
    /// The `ATYP` byte for this address.
    pub fn atyp(&self) -> u8 {
        match self {
            Address::Ipv4(_) => ATYP_IPV4,
            Address::Domain(_) => ATYP_DOMAIN,
            Address::Ipv6(_) => ATYP_IPV6,
        }
    }

    /// Parses `ATYP ADDR` starting at `buf[start]`; returns the address and the offset just past it.
    fn parse_at(buf: &[u8], start: usize) -> Result<Option<(Address, usize)>, Socks5Error> {
        let Some(&atyp) = buf.get(start) else { return Ok(None) };
        let start = start + 1;
        match atyp {
            ATYP_IPV4 => {
                let Some(&[a, b, c, d]) = buf.get(start..start + 4) else { return Ok(None) };
                Ok(Some((Address::Ipv4([a, b, c, d]), start + 4)))
            }
            ATYP_IPV6 => {
                let Some(bytes) = buf.get(start..start + 16) else { return Ok(None) };
                let mut octets = [0u8; 16];
                octets.copy_from_slice(bytes);
                Ok(Some((Address::Ipv6(octets), start + 16)))
            }
            ATYP_DOMAIN => {
                let Some(&len) = buf.get(start) else { return Ok(None) };
                if len == 0 {
                    return Err(Socks5Error::EmptyDomain);
                }
                let end = start + 1 + usize::from(len);
                let Some(name) = buf.get(start + 1..end) else { return Ok(None) };
                let name = std::str::from_utf8(name)
                    .map_err(|e| Socks5Error::DomainNotUtf8 { valid_up_to: e.valid_up_to() })?;
                check_domain_chars(name)?;
                Ok(Some((Address::Domain(name.to_owned()), end)))
            }
            atyp => Err(Socks5Error::UnsupportedAddressType { atyp }),
        }
    }

    fn encode(&self, dst: &mut BytesMut) -> Result<(), Socks5Error> {
        match self {
            Address::Ipv4(octets) => {
                dst.put_u8(ATYP_IPV4);
                dst.put_slice(octets);
            }
            Address::Ipv6(octets) => {
                dst.put_u8(ATYP_IPV6);
                dst.put_slice(octets);
            }
            Address::Domain(name) => {
                if name.is_empty() {
                    return Err(Socks5Error::EmptyDomain);
                }
                let len = u8::try_from(name.len()).map_err(|_| Socks5Error::DomainTooLong { len: name.len() })?;
                check_domain_chars(name)?;
                dst.put_u8(ATYP_DOMAIN);
                dst.put_u8(len);
                dst.put_slice(name.as_bytes());
            }
        }
        Ok(())
    }
}

fn check_domain_chars(name: &str) -> Result<(), Socks5Error> {
    match name.char_indices().find(|(_, ch)| ch.is_control()) {
        Some((offset, ch)) => Err(Socks5Error::DomainControlCharacter { offset, ch }),
        None => Ok(()),
    }
}

/// IPv4 as `10.0.0.1`, IPv6 as `::1` (no brackets), domain names as they are.
impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ipv4(octets) => Ipv4Addr::from(*octets).fmt(f),
            Address::Ipv6(octets) => Ipv6Addr::from(*octets).fmt(f),
            Address::Domain(name) => f.write_str(name),
        }
    }
}

impl From<IpAddr> for Address {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Address::Ipv4(v4.octets()),
            IpAddr::V6(v6) => Address::Ipv6(v6.octets()),
        }
    }
}

/// The client's request.
///
/// ```text
/// +-----+-----+-----+------+----------+----------+
/// | VER | CMD | RSV | ATYP | DST.ADDR | DST.PORT |
/// +-----+-----+-----+------+----------+----------+
/// | 05  | 1 B | 1 B | 1 B  | variable | 2 B, BE  |
/// +-----+-----+-----+------+----------+----------+
/// recorded: 05 01 00 03 13 "onprem-smtp.virtual" 00 19    CONNECT onprem-smtp.virtual:25
/// ```
///
/// `CMD` is not checked while parsing: the proxy answers [`Reply::CommandNotSupported`] for anything but
/// [`CMD_CONNECT`] (see [`ConnectRequest::is_connect`]). `RSV` should be 00 (SAP's clients send 00) but any
/// value is accepted and ignored, like most SOCKS servers do; it is always encoded as 00.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectRequest {
    /// `CMD`: [`CMD_CONNECT`], [`CMD_BIND`], [`CMD_UDP_ASSOCIATE`] or anything else the client sent.
    pub command: u8,
    /// `ATYP` + `DST.ADDR`.
    pub address: Address,
    /// `DST.PORT`.
    pub port: u16,
}

impl ConnectRequest {
    /// Parses a request at the start of `buf`.
    ///
    /// Errors: [`Socks5Error::UnsupportedVersion`], [`Socks5Error::UnsupportedAddressType`] (answer
    /// [`Reply::AddressTypeNotSupported`]), [`Socks5Error::EmptyDomain`], [`Socks5Error::DomainNotUtf8`],
    /// [`Socks5Error::DomainControlCharacter`]. Use [`Socks5Error::reply_code`] to pick the reply.
    pub fn parse(buf: &[u8]) -> Parsed<ConnectRequest> {
        let Some(&version) = buf.first() else { return Ok(None) };
        check_version(version)?;
        let Some(&command) = buf.get(1) else { return Ok(None) };
        // buf[2] is RSV: accepted whatever its value.
        let Some((address, port_start)) = Address::parse_at(buf, 3)? else { return Ok(None) };
        let Some(&[hi, lo]) = buf.get(port_start..port_start + 2) else { return Ok(None) };
        Ok(Some((ConnectRequest { command, address, port: u16::from_be_bytes([hi, lo]) }, port_start + 2)))
    }

    /// Client side: appends the wire form to `dst` (`RSV` = 00).
    ///
    /// Errors: [`Socks5Error::EmptyDomain`], [`Socks5Error::DomainTooLong`],
    /// [`Socks5Error::DomainControlCharacter`]; nothing is written then.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), Socks5Error> {
        let mut out = BytesMut::with_capacity(3 + 2 + 255 + 2);
        out.put_slice(&[SOCKS_VERSION, self.command, 0x00]);
        self.address.encode(&mut out)?;
        out.put_u16(self.port);
        dst.extend_from_slice(&out);
        Ok(())
    }

    /// Whether `CMD` is CONNECT, the only command the Connectivity Proxy supports.
    pub fn is_connect(&self) -> bool {
        self.command == CMD_CONNECT
    }
}

/// Reply codes (`REP`) with the meaning SAP's Connectivity Proxy gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Reply {
    /// `00`: the tunnel is open; raw bytes follow.
    Succeeded = 0x00,
    /// `01`: general failure; the backend closed the connection.
    GeneralFailure = 0x01,
    /// `02`: "connection not allowed by ruleset": no matching Cloud Connector TCP mapping.
    NotAllowed = 0x02,
    /// `03`: no Cloud Connector connected for the subaccount / location id.
    NetworkUnreachable = 0x03,
    /// `04`: the Cloud Connector cannot reach the backend.
    HostUnreachable = 0x04,
    /// `05`: authentication failure.
    ConnectionRefused = 0x05,
    /// `06`: not used by SAP.
    TtlExpired = 0x06,
    /// `07`: a command other than CONNECT.
    CommandNotSupported = 0x07,
    /// `08`: an address type other than IPv4 / domain name.
    AddressTypeNotSupported = 0x08,
}

impl Reply {
    /// The `REP` byte.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The reply for a `REP` byte; `None` for codes 0x09 and above.
    pub const fn from_code(code: u8) -> Option<Reply> {
        Some(match code {
            0x00 => Reply::Succeeded,
            0x01 => Reply::GeneralFailure,
            0x02 => Reply::NotAllowed,
            0x03 => Reply::NetworkUnreachable,
            0x04 => Reply::HostUnreachable,
            0x05 => Reply::ConnectionRefused,
            0x06 => Reply::TtlExpired,
            0x07 => Reply::CommandNotSupported,
            0x08 => Reply::AddressTypeNotSupported,
            _ => return None,
        })
    }
}

impl From<Reply> for u8 {
    fn from(reply: Reply) -> u8 {
        reply.code()
    }
}

/// The server's reply to a request, always with `BND.ADDR` 0.0.0.0 and `BND.PORT` 0 (SAP's clients ignore
/// them).
///
/// ```text
/// +-----+-----+-----+------+-------------+----------+
/// | VER | REP | RSV | ATYP | BND.ADDR    | BND.PORT |
/// +-----+-----+-----+------+-------------+----------+
/// | 05  | REP | 00  | 01   | 00 00 00 00 | 00 00    |
/// +-----+-----+-----+------+-------------+----------+
/// ```
pub fn encode_reply(code: Reply) -> [u8; 10] {
    [SOCKS_VERSION, code.code(), 0x00, ATYP_IPV4, 0, 0, 0, 0, 0, 0]
}

/// Client side: a reply as received (see [`encode_reply`] for the layout; any `ATYP` is accepted).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectReply {
    /// `REP`, kept raw since a server may send codes beyond 0x08; see [`ConnectReply::reply`].
    pub code: u8,
    /// `BND.ADDR`.
    pub address: Address,
    /// `BND.PORT`.
    pub port: u16,
}

impl ConnectReply {
    /// Parses a reply at the start of `buf`. `RSV` is ignored.
    ///
    /// Errors: [`Socks5Error::UnsupportedVersion`], [`Socks5Error::UnsupportedAddressType`], and the domain
    /// name errors of [`ConnectRequest::parse`].
    pub fn parse(buf: &[u8]) -> Parsed<ConnectReply> {
        let Some(&version) = buf.first() else { return Ok(None) };
        check_version(version)?;
        let Some(&code) = buf.get(1) else { return Ok(None) };
        let Some((address, port_start)) = Address::parse_at(buf, 3)? else { return Ok(None) };
        let Some(&[hi, lo]) = buf.get(port_start..port_start + 2) else { return Ok(None) };
        Ok(Some((ConnectReply { code, address, port: u16::from_be_bytes([hi, lo]) }, port_start + 2)))
    }

    /// The reply code as an enum; `None` for codes 0x09 and above.
    pub fn reply(&self) -> Option<Reply> {
        Reply::from_code(self.code)
    }
}

// ---------------------------------------------------------------------------------------------------------
// base64 (RFC 4648 §4, standard alphabet): small enough not to warrant a dependency
// ---------------------------------------------------------------------------------------------------------

const BASE64_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_value(byte: u8) -> Option<u8> {
    match byte {
        b'A'..=b'Z' => Some(byte - b'A'),
        b'a'..=b'z' => Some(byte - b'a' + 26),
        b'0'..=b'9' => Some(byte - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Decodes standard-alphabet base64, padded (length a multiple of 4, 1 or 2 trailing `=`) or unpadded.
/// Non-zero bits in the last character beyond the decoded bytes are ignored.
fn base64_decode(input: &[u8]) -> Result<Vec<u8>, String> {
    let padding = input.iter().rev().take_while(|&&b| b == b'=').count();
    let data = &input[..input.len() - padding];
    if padding > 0 && (padding > 2 || input.len() % 4 != 0) {
        return Err(format!(
            "{padding} padding character(s) '=' at the end of {} bytes; padded base64 has a length that is a \
             multiple of 4 and at most 2 '='",
            input.len()
        ));
    }
    if data.len() % 4 == 1 {
        return Err(format!("{} base64 characters cannot encode whole bytes", data.len()));
    }
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for (offset, &byte) in data.iter().enumerate() {
        let Some(value) = base64_value(byte) else {
            return Err(format!("invalid character {:?} (0x{byte:02x}) at offset {offset}", char::from(byte)));
        };
        acc = (acc << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// Encodes standard-alphabet base64 with padding.
fn base64_encode(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64_ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_all_lengths() {
        let data: Vec<u8> = (0..=255u8).collect();
        for len in 0..data.len() {
            let encoded = base64_encode(&data[..len]);
            assert_eq!(base64_decode(encoded.as_bytes()), Ok(data[..len].to_vec()), "padded, len {len}");
            let unpadded = encoded.trim_end_matches('=');
            assert_eq!(base64_decode(unpadded.as_bytes()), Ok(data[..len].to_vec()), "unpadded, len {len}");
        }
    }

    #[test]
    fn base64_known_vectors() {
        // RFC 4648 §10.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("conf-loc", "Y29uZi1sb2M="),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded.as_bytes()), Ok(plain.as_bytes().to_vec()));
        }
        assert_eq!(base64_decode(b"+/+/"), Ok(vec![0xfb, 0xff, 0xbf]));
    }

    #[test]
    fn base64_rejects_malformed_input() {
        for bad in [
            &b"Zg="[..], // partial padding
            b"Z===",     // too much padding
            b"====",
            b"==",
            b"Zm9vY", // length 5 (mod 4 == 1)
            b"Z",
            b"Zm=v",      // padding in the middle
            b"Zm9v-_",    // URL-safe alphabet
            b"Zm9v Zg==", // whitespace
            b"Zm9v\n",
        ] {
            assert!(base64_decode(bad).is_err(), "{:?} should be rejected", String::from_utf8_lossy(bad));
        }
    }
}
