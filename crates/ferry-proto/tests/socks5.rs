#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Tests of the SOCKS5 / SAP method 0x80 codec against the bytes recorded in CLIENT-CONTRACT §5.

use std::fmt::Debug;
use std::net::IpAddr;

use bytes::BytesMut;
use ferry_proto::socks5::*;

/// A connectivity client-credentials JWT shaped like the recorded one: 1213 bytes (`00 00 04 bd`).
const JWT: &str = concat!(
    "eyJhbGciOiJSUzI1NiIsImprdSI6Imh0dHBzOi8vY29uc3VtZXItc3ViLmF1dGhlbnRpY2F0aW9uLmV1MTAuaGFuYS5vbmRlbWFu",
    "ZC5jb20vdG9rZW5fa2V5cyIsImtpZCI6ImRlZmF1bHQtand0LWtleS0xNDAyMTE3ODM1IiwidHlwIjoiSldUIn0.eyJqdGkiOiI4",
    "ZjBiMmM2ZTRkMWE0YjdmOWMzZTVhMmQxZjBlOWI4YyIsImV4dF9hdHRyIjp7ImVuaGFuY2VyIjoiWFNVQUEiLCJzdWJhY2NvdW50",
    "aWQiOiI1ZDNjOWE3MC0yZjBlLTRkNGItOWMxYS03YjZlOGYyYTFjM2QiLCJ6ZG4iOiJjb25zdW1lci1zdWIifSwic3ViIjoic2It",
    "Y29ubiFiMTd8Y29ubmVjdGl2aXR5IWIxMzciLCJzY29wZSI6WyJ1YWEucmVzb3VyY2UiXSwiY2xpZW50X2lkIjoic2ItY29ubiFi",
    "MTd8Y29ubmVjdGl2aXR5IWIxMzciLCJncmFudF90eXBlIjoiY2xpZW50X2NyZWRlbnRpYWxzIiwiaWF0IjoxNzE4MDAwMDAwLCJl",
    "eHAiOjE3MTgwNDMyMDAsImlzcyI6Imh0dHBzOi8vY29uc3VtZXItc3ViLmF1dGhlbnRpY2F0aW9uLmV1MTAuaGFuYS5vbmRlbWFu",
    "ZC5jb20vb2F1dGgvdG9rZW4iLCJ6aWQiOiI1ZDNjOWE3MC0yZjBlLTRkNGItOWMxYS03YjZlOGYyYTFjM2QiLCJhdWQiOlsidWFh",
    "Iiwic2ItY29ubiFiMTd8Y29ubmVjdGl2aXR5IWIxMzciXSwicmV2X3NpZyI6ImFhYWEifQ.pKvURIxJVi2CgRXROh_M6pJ_UrTVR",
    "ZKX-LQ-QtqJI4vBNibkPcs43bCCSIkn7JBPtCBXRDmD6IWFF51QVRr-YqSr1ESMSVYtgoEV0TofzOqSf1K01UWSl_i0PkLaiSOLw",
    "TYm5D3LON2wgkiJJ-yQT7QgV0Q5g-iFhRedUFUa_mKkq9REjElWLYKBFdE6H8zqkn9StNVFkpf4tD5C2okji8E2JuQ9yzjdsIJIi",
    "SfskE-0IFdEOYPohYUXnVBVGv5ipKvURIxJVi2CgRXROh_M6pJ_UrTVRZKX-LQ-QtqJI4vBNibkPcs43bCCSIkn7JBPtCBXRDmD6",
    "IWFF51QVRr-Yg",
);

const GREETING: &[u8] = &[0x05, 0x02, 0x00, 0x80];
const CONNECT_DOMAIN: &[u8] = b"\x05\x01\x00\x03\x13onprem-smtp.virtual\x00\x19";
const CONNECT_IPV4: &[u8] = &[0x05, 0x01, 0x00, 0x01, 10, 0, 0, 1, 0x01, 0xbb];
const CONNECT_IPV6: &[u8] =
    &[0x05, 0x01, 0x00, 0x04, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00, 0x50];
const REPLY_SUCCESS: &[u8] = &[0x05, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];

/// The recorded authentication: `01`, `00 00 04 bd`, JWT, `0c`, "Y29uZi1sb2M=".
fn recorded_auth() -> Vec<u8> {
    let mut bytes = vec![0x01, 0x00, 0x00, 0x04, 0xbd];
    bytes.extend_from_slice(JWT.as_bytes());
    bytes.push(0x0c);
    bytes.extend_from_slice(b"Y29uZi1sb2M=");
    bytes
}

/// An authentication message with the given raw location id field (base64 text, possibly empty).
fn auth_with_location_field(field: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0x01];
    bytes.extend_from_slice(&u32::try_from(JWT.len()).expect("JWT length fits u32").to_be_bytes());
    bytes.extend_from_slice(JWT.as_bytes());
    bytes.push(u8::try_from(field.len()).expect("field length fits u8"));
    bytes.extend_from_slice(field);
    bytes
}

fn complete<T: Debug>(result: Parsed<T>) -> (T, usize) {
    match result {
        Ok(Some(parsed)) => parsed,
        other => panic!("expected a complete message, got {other:?}"),
    }
}

fn error<T: Debug>(result: Parsed<T>) -> Socks5Error {
    match result {
        Err(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Every strict prefix is Incomplete; the whole message is consumed exactly, also with trailing bytes.
fn assert_exact<T: Debug + PartialEq>(name: &str, parse: fn(&[u8]) -> Parsed<T>, msg: &[u8]) -> T {
    for len in 0..msg.len() {
        let result = parse(&msg[..len]);
        assert!(matches!(result, Ok(None)), "{name}: prefix of {len}/{} bytes gave {result:?}", msg.len());
    }
    let (value, consumed) = complete(parse(msg));
    assert_eq!(consumed, msg.len(), "{name}: consumed length");
    for trailer in [&b"\x05"[..], b"\x00\x00\x00", b"EHLO [127.0.0.1]\r\n", &[0xff; 300]] {
        let mut longer = msg.to_vec();
        longer.extend_from_slice(trailer);
        let (again, consumed) = complete(parse(&longer));
        assert_eq!(consumed, msg.len(), "{name}: trailing bytes must not be consumed");
        assert_eq!(again, value, "{name}: trailing bytes changed the value");
    }
    value
}

fn encoded(encode: impl FnOnce(&mut BytesMut) -> Result<(), Socks5Error>) -> Vec<u8> {
    let mut buf = BytesMut::from(&b"prefix:"[..]);
    encode(&mut buf).expect("encodes");
    assert_eq!(&buf[..7], b"prefix:", "encoders append");
    buf[7..].to_vec()
}

// ---------------------------------------------------------------------------------------------------------
// Recorded exchange
// ---------------------------------------------------------------------------------------------------------

#[test]
fn recorded_greeting_selects_sap_method() {
    let greeting = assert_exact("greeting", Greeting::parse, GREETING);
    assert_eq!(greeting, Greeting { methods: vec![METHOD_NO_AUTH, METHOD_SAP] });
    assert_eq!(choose_method(&greeting), Some(0x80));
    assert_eq!(encode_method_selection(0x80), [0x05, 0x80]);
}

#[test]
fn choose_method_never_picks_no_auth() {
    let pick = |bytes: &[u8]| choose_method(&complete(Greeting::parse(bytes)).0);
    assert_eq!(pick(&[0x05, 0x01, 0x80]), Some(0x80), "SPEC §3.5 form");
    assert_eq!(pick(&[0x05, 0x02, 0x80, 0x00]), Some(0x80), "order does not matter");
    assert_eq!(pick(&[0x05, 0x03, 0x02, 0x00, 0x80]), Some(0x80));
    assert_eq!(pick(&[0x05, 0x01, 0x00]), None, "no-auth alone is not acceptable");
    assert_eq!(pick(&[0x05, 0x02, 0x00, 0x02]), None, "username/password is not acceptable");
    assert_eq!(encode_method_selection(METHOD_NO_ACCEPTABLE), [0x05, 0xff]);
}

#[test]
fn recorded_auth_with_location_id() {
    assert_eq!(JWT.len(), 0x04bd);
    let bytes = recorded_auth();
    let auth = assert_exact("auth", SapAuth::parse, &bytes);
    assert_eq!(auth.token, JWT);
    assert_eq!(auth.location_id.as_deref(), Some("conf-loc"));
    assert_eq!(bytes.len(), 1 + 4 + 1213 + 1 + 12);
    assert_eq!(encode_auth_reply(true), [0x01, 0x00]);
    assert_eq!(encode_auth_reply(false), [0x01, 0x01]);
}

#[test]
fn auth_without_location_id() {
    let bytes = auth_with_location_field(b"");
    assert_eq!(bytes.last(), Some(&0x00));
    let auth = assert_exact("auth without location", SapAuth::parse, &bytes);
    assert_eq!(auth, SapAuth { token: JWT.to_owned(), location_id: None });
}

#[test]
fn auth_accepts_unpadded_base64_and_non_ascii_location_ids() {
    let auth = assert_exact("unpadded", SapAuth::parse, &auth_with_location_field(b"Y29uZi1sb2M"));
    assert_eq!(auth.location_id.as_deref(), Some("conf-loc"));
    // base64("Zürich-1") = "WsO8cmljaC0x"
    let auth = assert_exact("utf-8", SapAuth::parse, &auth_with_location_field(b"WsO8cmljaC0x"));
    assert_eq!(auth.location_id.as_deref(), Some("Zürich-1"));
}

#[test]
fn auth_token_length_limit_is_inclusive() {
    let token = "a".repeat(MAX_TOKEN_LEN);
    let auth = SapAuth { token: token.clone(), location_id: Some("loc".into()) };
    let bytes = encoded(|b| auth.encode(b));
    assert_eq!(&bytes[..5], &[0x01, 0x00, 0x01, 0x00, 0x00]);
    assert!(matches!(SapAuth::parse(&bytes[..5]), Ok(None)), "64 KiB is allowed: wait for it");
    assert_eq!(complete(SapAuth::parse(&bytes)), (auth, bytes.len()));
}

#[test]
fn recorded_connect_domain() {
    let request = assert_exact("connect domain", ConnectRequest::parse, CONNECT_DOMAIN);
    assert_eq!(
        request,
        ConnectRequest { command: CMD_CONNECT, address: Address::Domain("onprem-smtp.virtual".into()), port: 25 }
    );
    assert!(request.is_connect());
    assert_eq!(request.address.to_string(), "onprem-smtp.virtual");
}

#[test]
fn connect_ipv4_and_ipv6() {
    let request = assert_exact("connect ipv4", ConnectRequest::parse, CONNECT_IPV4);
    assert_eq!(request.address, Address::Ipv4([10, 0, 0, 1]));
    assert_eq!(request.port, 443);
    assert_eq!(request.address.to_string(), "10.0.0.1");

    let request = assert_exact("connect ipv6", ConnectRequest::parse, CONNECT_IPV6);
    let ip: IpAddr = "2001:db8::1".parse().expect("valid IPv6");
    assert_eq!(request.address, Address::from(ip));
    assert_eq!(request.address.atyp(), ATYP_IPV6);
    assert_eq!(request.port, 80);
    assert_eq!(request.address.to_string(), "2001:db8::1");
}

#[test]
fn non_connect_commands_parse_and_are_reported() {
    for command in [CMD_BIND, CMD_UDP_ASSOCIATE, 0x00, 0x7f] {
        let mut bytes = CONNECT_DOMAIN.to_vec();
        bytes[1] = command;
        let request = assert_exact("command", ConnectRequest::parse, &bytes);
        assert_eq!(request.command, command);
        assert!(!request.is_connect());
    }
    assert_eq!(encode_reply(Reply::CommandNotSupported), [0x05, 0x07, 0x00, 0x01, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn reserved_byte_is_ignored() {
    let mut bytes = CONNECT_IPV4.to_vec();
    bytes[2] = 0xaa;
    let request = assert_exact("rsv", ConnectRequest::parse, &bytes);
    assert_eq!(request, complete(ConnectRequest::parse(CONNECT_IPV4)).0);
}

#[test]
fn reply_codes_and_encoding() {
    assert_eq!(encode_reply(Reply::Succeeded), REPLY_SUCCESS, "recorded success reply");
    let expected = [
        (Reply::Succeeded, 0),
        (Reply::GeneralFailure, 1),
        (Reply::NotAllowed, 2),
        (Reply::NetworkUnreachable, 3),
        (Reply::HostUnreachable, 4),
        (Reply::ConnectionRefused, 5),
        (Reply::TtlExpired, 6),
        (Reply::CommandNotSupported, 7),
        (Reply::AddressTypeNotSupported, 8),
    ];
    for (reply, code) in expected {
        assert_eq!(reply.code(), code);
        assert_eq!(u8::from(reply), code);
        assert_eq!(Reply::from_code(code), Some(reply));
        let bytes = encode_reply(reply);
        assert_eq!(bytes, [0x05, code, 0x00, 0x01, 0, 0, 0, 0, 0, 0]);
        let parsed = assert_exact("reply", ConnectReply::parse, &bytes);
        assert_eq!(parsed, ConnectReply { code, address: Address::Ipv4([0; 4]), port: 0 });
        assert_eq!(parsed.reply(), Some(reply));
    }
    assert_eq!(Reply::from_code(9), None);
    assert_eq!(Reply::from_code(0xff), None);
}

#[test]
fn client_side_replies() {
    assert_eq!(assert_exact("method selection", parse_method_selection, &[0x05, 0x80]), 0x80);
    assert_eq!(assert_exact("method selection", parse_method_selection, &[0x05, 0xff]), METHOD_NO_ACCEPTABLE);
    assert_eq!(error(parse_method_selection(&[0x04])), Socks5Error::UnsupportedVersion { found: 4 });
    assert!(assert_exact("auth ok", parse_auth_reply, &encode_auth_reply(true)));
    assert!(!assert_exact("auth failed", parse_auth_reply, &encode_auth_reply(false)));
    assert!(!assert_exact("auth odd", parse_auth_reply, &[0x05, 0x00]), "success is exactly 01 00");
}

#[test]
fn whole_recorded_client_stream() {
    let mut stream = GREETING.to_vec();
    stream.extend_from_slice(&recorded_auth());
    stream.extend_from_slice(CONNECT_DOMAIN);
    stream.extend_from_slice(b"EHLO [127.0.0.1]\r\n");

    let mut at = 0;
    let (greeting, n) = complete(Greeting::parse(&stream[at..]));
    at += n;
    assert_eq!(choose_method(&greeting), Some(METHOD_SAP));
    let (auth, n) = complete(SapAuth::parse(&stream[at..]));
    at += n;
    assert_eq!(auth.location_id.as_deref(), Some("conf-loc"));
    let (request, n) = complete(ConnectRequest::parse(&stream[at..]));
    at += n;
    assert_eq!(request.port, 25);
    assert_eq!(&stream[at..], b"EHLO [127.0.0.1]\r\n", "tunnelled payload is left untouched");
}

// ---------------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------------

#[test]
fn wrong_versions() {
    let e = error(Greeting::parse(&[0x04]));
    assert_eq!(e, Socks5Error::UnsupportedVersion { found: 4 });
    assert_eq!(e.to_string(), "SOCKS version 4 is not supported; expected 5");
    assert_eq!(error(Greeting::parse(b"GET / HTTP/1.1\r\n")), Socks5Error::UnsupportedVersion { found: b'G' });
    assert_eq!(error(ConnectRequest::parse(&[0x04, 0x01])), Socks5Error::UnsupportedVersion { found: 4 });
    assert_eq!(error(ConnectReply::parse(&[0x01])), Socks5Error::UnsupportedVersion { found: 1 });
    let e = error(SapAuth::parse(&[0x05]));
    assert_eq!(e, Socks5Error::UnsupportedAuthVersion { found: 5 });
    assert_eq!(e.to_string(), "SAP authentication sub-negotiation version 5 is not supported; expected 1");
}

#[test]
fn zero_methods() {
    let e = error(Greeting::parse(&[0x05, 0x00]));
    assert_eq!(e, Socks5Error::NoMethods);
    assert!(e.to_string().contains("NMETHODS is 0"), "{e}");
}

#[test]
fn oversized_jwt_length_fails_before_the_token_arrives() {
    let e = error(SapAuth::parse(&[0x01, 0xff, 0xff, 0xff, 0xff]));
    assert_eq!(e, Socks5Error::TokenTooLong { len: 0xffff_ffff });
    assert_eq!(
        e.to_string(),
        "the JWT length in the SAP authentication is 4294967295 bytes, more than the limit of 65536 bytes"
    );
    let just_over = u32::try_from(MAX_TOKEN_LEN + 1).expect("fits").to_be_bytes();
    let bytes = [&[0x01][..], &just_over].concat();
    assert_eq!(error(SapAuth::parse(&bytes)), Socks5Error::TokenTooLong { len: 65537 });
}

#[test]
fn empty_and_non_utf8_jwt() {
    assert_eq!(error(SapAuth::parse(&[0x01, 0, 0, 0, 0])), Socks5Error::EmptyToken);
    let e = error(SapAuth::parse(&[0x01, 0, 0, 0, 3, b'e', 0xff, b'x']));
    assert_eq!(e, Socks5Error::TokenNotUtf8 { valid_up_to: 1 });
    assert!(e.to_string().contains("not valid UTF-8"), "{e}");
}

#[test]
fn bad_location_id() {
    for field in [&b"!!!!"[..], b"Y29uZi1sb2M=\x00", b"Zg=", b"Z", b"Y29u Zi1sb2M=", b"Y29uZi1sb2M_"] {
        let e = error(SapAuth::parse(&auth_with_location_field(field)));
        assert!(
            matches!(e, Socks5Error::InvalidLocationIdBase64 { .. }),
            "{:?}: {e:?}",
            String::from_utf8_lossy(field)
        );
        assert!(e.to_string().starts_with("the location id in the SAP authentication is not valid base64: "), "{e}");
    }
    // base64 of the single byte 0xff
    let e = error(SapAuth::parse(&auth_with_location_field(b"/w==")));
    assert_eq!(e, Socks5Error::LocationIdNotUtf8 { valid_up_to: 0 });
}

#[test]
fn unknown_address_type_is_distinct_and_immediate() {
    for atyp in [0x00, 0x02, 0x05, 0xff] {
        let e = error(ConnectRequest::parse(&[0x05, 0x01, 0x00, atyp]));
        assert_eq!(e, Socks5Error::UnsupportedAddressType { atyp });
        assert_eq!(e.reply_code(), Reply::AddressTypeNotSupported);
    }
    assert_eq!(
        Socks5Error::UnsupportedAddressType { atyp: 2 }.to_string(),
        "address type 0x02 is not supported; expected 0x01 (IPv4), 0x03 (domain name) or 0x04 (IPv6)"
    );
}

#[test]
fn bad_domains() {
    let e = error(ConnectRequest::parse(&[0x05, 0x01, 0x00, 0x03, 0x00]));
    assert_eq!(e, Socks5Error::EmptyDomain);
    assert_eq!(e.reply_code(), Reply::GeneralFailure);

    let e = error(ConnectRequest::parse(b"\x05\x01\x00\x03\x04ab\xffc\x00\x19"));
    assert_eq!(e, Socks5Error::DomainNotUtf8 { valid_up_to: 2 });

    for (name, offset, ch) in [(&b"a\nb"[..], 1, '\n'), (b"\x00", 0, '\0'), (b"host\x7f", 4, '\u{7f}')] {
        let mut bytes = vec![0x05, 0x01, 0x00, 0x03, u8::try_from(name.len()).expect("short")];
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(&[0x00, 0x19]);
        assert_eq!(error(ConnectRequest::parse(&bytes)), Socks5Error::DomainControlCharacter { offset, ch });
    }
    // C1 control character U+0085 (NEL), encoded as C2 85.
    let e = error(ConnectRequest::parse(b"\x05\x01\x00\x03\x03a\xc2\x85\x00\x19"));
    assert_eq!(e, Socks5Error::DomainControlCharacter { offset: 1, ch: '\u{85}' });
}

// ---------------------------------------------------------------------------------------------------------
// Encoders
// ---------------------------------------------------------------------------------------------------------

#[test]
fn encoders_reproduce_the_recorded_bytes() {
    assert_eq!(encoded(|b| Greeting { methods: vec![0x00, 0x80] }.encode(b)), GREETING);
    let auth = SapAuth { token: JWT.to_owned(), location_id: Some("conf-loc".into()) };
    assert_eq!(encoded(|b| auth.encode(b)), recorded_auth());
    let request =
        ConnectRequest { command: CMD_CONNECT, address: Address::Domain("onprem-smtp.virtual".into()), port: 25 };
    assert_eq!(encoded(|b| request.encode(b)), CONNECT_DOMAIN);
    let request = ConnectRequest { command: CMD_CONNECT, address: Address::Ipv4([10, 0, 0, 1]), port: 443 };
    assert_eq!(encoded(|b| request.encode(b)), CONNECT_IPV4);
    let ip: IpAddr = "2001:db8::1".parse().expect("valid IPv6");
    let request = ConnectRequest { command: CMD_CONNECT, address: ip.into(), port: 80 };
    assert_eq!(encoded(|b| request.encode(b)), CONNECT_IPV6);
    // Some("") is sent like None.
    let auth = SapAuth { token: JWT.to_owned(), location_id: Some(String::new()) };
    assert_eq!(encoded(|b| auth.encode(b)), auth_with_location_field(b""));
}

#[test]
fn encoders_reject_what_cannot_be_sent() {
    let mut buf = BytesMut::new();
    assert_eq!(Greeting { methods: vec![] }.encode(&mut buf), Err(Socks5Error::NoMethods));
    assert_eq!(Greeting { methods: vec![0x80; 256] }.encode(&mut buf), Err(Socks5Error::TooManyMethods { count: 256 }));
    assert_eq!(SapAuth { token: String::new(), location_id: None }.encode(&mut buf), Err(Socks5Error::EmptyToken));
    assert_eq!(
        SapAuth { token: "a".repeat(MAX_TOKEN_LEN + 1), location_id: None }.encode(&mut buf),
        Err(Socks5Error::TokenTooLong { len: 65537 })
    );
    let longest = SapAuth { token: "t".into(), location_id: Some("l".repeat(189)) };
    longest.encode(&mut buf).expect("189 bytes of location id fit (252 base64 chars)");
    buf.clear();
    assert_eq!(
        SapAuth { token: "t".into(), location_id: Some("l".repeat(190)) }.encode(&mut buf),
        Err(Socks5Error::LocationIdTooLong { len: 256 })
    );
    let request = |name: &str| ConnectRequest { command: CMD_CONNECT, address: Address::Domain(name.into()), port: 1 };
    assert_eq!(request("").encode(&mut buf), Err(Socks5Error::EmptyDomain));
    assert_eq!(request(&"h".repeat(256)).encode(&mut buf), Err(Socks5Error::DomainTooLong { len: 256 }));
    assert_eq!(request("a\r\nb").encode(&mut buf), Err(Socks5Error::DomainControlCharacter { offset: 1, ch: '\r' }));
    assert!(buf.is_empty(), "nothing is written on error");
    request(&"h".repeat(255)).encode(&mut buf).expect("255 bytes fit");
}

#[test]
fn sap_auth_debug_redacts_the_token() {
    let auth = SapAuth { token: JWT.to_owned(), location_id: Some("conf-loc".into()) };
    let debug = format!("{auth:?}");
    assert!(!debug.contains("eyJ"), "{debug}");
    assert!(debug.contains("1213 bytes") && debug.contains("conf-loc"), "{debug}");
}

// ---------------------------------------------------------------------------------------------------------
// Property-style: pseudo-random input never panics and the invariants of the codec hold
// ---------------------------------------------------------------------------------------------------------

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Encodes a parsed value back to bytes; `None` when that is not expected to work (or not implemented).
type Reencode<T> = dyn Fn(&T) -> Option<Result<Vec<u8>, Socks5Error>>;

/// Invariants for one parser on one input:
/// - a complete parse consumes at most the input, parses identically from exactly the consumed bytes, every
///   strict prefix of those is Incomplete, and (if re-encodable) encoding then parsing gives the same value;
/// - an error does not change when more bytes are appended.
fn check<T: Debug + PartialEq + Clone>(
    name: &str,
    parse: fn(&[u8]) -> Parsed<T>,
    reencode: &Reencode<T>,
    input: &[u8],
    extra: &[u8],
) {
    let extended = [input, extra].concat();
    match parse(input) {
        Ok(Some((value, consumed))) => {
            assert!(consumed > 0 && consumed <= input.len(), "{name}: consumed {consumed} of {}", input.len());
            let exact = &input[..consumed];
            assert_eq!(complete(parse(exact)), (value.clone(), consumed), "{name}: exact bytes");
            assert_eq!(complete(parse(&extended)), (value.clone(), consumed), "{name}: appended bytes");
            for len in [0, consumed / 2, consumed - 1] {
                assert!(matches!(parse(&exact[..len]), Ok(None)), "{name}: prefix {len} of {exact:?}");
            }
            match reencode(&value) {
                None => {}
                Some(Ok(bytes)) => {
                    assert_eq!(complete(parse(&bytes)), (value, bytes.len()), "{name}: re-encoded");
                }
                Some(Err(e)) => panic!("{name}: {value:?} was parsed but cannot be encoded: {e}"),
            }
        }
        Ok(None) => {
            let _ = parse(&extended);
        }
        Err(e) => assert_eq!(parse(&extended), Err(e), "{name}: error changed with appended bytes"),
    }
}

fn check_all(input: &[u8], extra: &[u8]) {
    fn enc(f: impl FnOnce(&mut BytesMut) -> Result<(), Socks5Error>) -> Option<Result<Vec<u8>, Socks5Error>> {
        let mut buf = BytesMut::new();
        Some(f(&mut buf).map(|()| buf.to_vec()))
    }
    check("greeting", Greeting::parse, &|g: &Greeting| enc(|b| g.encode(b)), input, extra);
    check(
        "auth",
        SapAuth::parse,
        &|a: &SapAuth| {
            // Unpadded base64 of 253..=255 chars decodes to 190 or 191 bytes, whose padded form needs 256.
            if a.location_id.as_ref().is_some_and(|l| l.len() > 189) { None } else { enc(|b| a.encode(b)) }
        },
        input,
        extra,
    );
    check("request", ConnectRequest::parse, &|r: &ConnectRequest| enc(|b| r.encode(b)), input, extra);
    check("reply", ConnectReply::parse, &|_| None, input, extra);
    check(
        "method selection",
        parse_method_selection,
        &|m: &u8| Some(Ok(encode_method_selection(*m).to_vec())),
        input,
        extra,
    );
    check("auth reply", parse_auth_reply, &|_| None, input, extra);
}

#[test]
fn random_input_never_panics_and_invariants_hold() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let fixtures: Vec<Vec<u8>> = vec![
        GREETING.to_vec(),
        recorded_auth(),
        auth_with_location_field(b""),
        auth_with_location_field(b"Y29uZi1sb2M"),
        vec![0x01, 0, 0, 0, 4, b'j', b'w', b't', b'!', 4, b'Y', b'Q', b'=', b'='],
        CONNECT_DOMAIN.to_vec(),
        CONNECT_IPV4.to_vec(),
        CONNECT_IPV6.to_vec(),
        REPLY_SUCCESS.to_vec(),
    ];
    for round in 0..6000 {
        let input = match round % 3 {
            // Pure noise, biased towards the interesting first bytes.
            0 => {
                let len = rng.below(80);
                let mut bytes = rng.bytes(len);
                if let Some(first) = bytes.first_mut() {
                    *first = [0x05, 0x01, *first][rng.below(3)];
                }
                bytes
            }
            // A fixture with a few bytes flipped.
            1 => {
                let mut bytes = fixtures[rng.below(fixtures.len())].clone();
                for _ in 0..=rng.below(3) {
                    let i = rng.below(bytes.len());
                    bytes[i] = rng.next() as u8;
                }
                bytes
            }
            // A fixture cut short or extended with noise.
            _ => {
                let mut bytes = fixtures[rng.below(fixtures.len())].clone();
                bytes.truncate(rng.below(bytes.len() + 1));
                let extra_len = rng.below(20);
                bytes.extend(rng.bytes(extra_len));
                bytes
            }
        };
        let extra_len = rng.below(8);
        let extra = rng.bytes(extra_len);
        check_all(&input, &extra);
    }
}

#[test]
fn long_location_ids_at_the_length_limit() {
    // 255 unpadded base64 chars (base64 of 191 'l'): the largest location id field a client can send.
    let field = ["bGxs".repeat(63), "bGw".to_owned()].concat().into_bytes();
    assert_eq!(field.len(), 255);
    let auth = assert_exact("255-char location", SapAuth::parse, &auth_with_location_field(&field));
    assert_eq!(auth.location_id, Some("l".repeat(191)));
}
