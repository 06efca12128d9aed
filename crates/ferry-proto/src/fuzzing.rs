//! Property checks shared by the fuzz targets (`fuzz/` at the repository root) and the corpus
//! replay tests, so that every input the fuzzer found is re-checked by `cargo test` on stable.
//! Each function panics when a property does not hold.

use std::fmt::Debug;

use bytes::BytesMut;

use crate::socks5::{
    ConnectReply, ConnectRequest, Greeting, Parsed, SapAuth, Socks5Error, encode_method_selection, parse_auth_reply,
    parse_method_selection,
};
use crate::tunnel::split_host_port;

/// Every SOCKS5 parser: besides "never panics", the codec's contract. A complete message consumes
/// at most the input and parses the same from exactly the consumed bytes; a strict prefix of it is
/// incomplete; an error does not change when more bytes arrive; a parsed value encodes to bytes that
/// parse back to the same value.
pub fn socks5(data: &[u8]) {
    check(data, Greeting::parse, |g| encode(|b| g.encode(b)));
    check(data, SapAuth::parse, |a| {
        // Unpadded base64 of 253..=255 chars decodes to 190 or 191 bytes, whose padded form needs 256 chars.
        if a.location_id.as_ref().is_some_and(|l| l.len() > 189) { None } else { encode(|b| a.encode(b)) }
    });
    check(data, ConnectRequest::parse, |r| encode(|b| r.encode(b)));
    check(data, ConnectReply::parse, |_| None);
    check(data, parse_method_selection, |m| Some(Ok(encode_method_selection(*m).to_vec())));
    check(data, parse_auth_reply, |_| None);
}

#[allow(clippy::panic)]
fn check<T: Debug + PartialEq>(
    data: &[u8],
    parse: fn(&[u8]) -> Parsed<T>,
    reencode: impl Fn(&T) -> Option<Result<Vec<u8>, Socks5Error>>,
) {
    let result = parse(data);
    // The same bytes followed by one more: errors and complete messages must not change.
    let mut extended = data.to_vec();
    extended.push(0x5a);
    match result {
        Ok(Some((value, consumed))) => {
            assert!(consumed > 0 && consumed <= data.len());
            let exact = &data[..consumed];
            match parse(exact) {
                Ok(Some((again, n))) => assert!(again == value && n == consumed),
                other => panic!("exact bytes parsed differently: {other:?}"),
            }
            assert!(matches!(parse(&exact[..consumed - 1]), Ok(None)));
            match parse(&extended) {
                Ok(Some((again, n))) => assert!(again == value && n == consumed),
                other => panic!("extended bytes parsed differently: {other:?}"),
            }
            match reencode(&value) {
                None => {}
                Some(Ok(bytes)) => match parse(&bytes) {
                    Ok(Some((again, n))) => assert!(again == value && n == bytes.len()),
                    other => panic!("re-encoded {value:?} parsed as {other:?}"),
                },
                Some(Err(e)) => panic!("{value:?} was parsed but cannot be encoded: {e}"),
            }
        }
        Ok(None) => {
            let _ = parse(&extended);
        }
        Err(e) => assert_eq!(parse(&extended), Err(e)),
    }
}

fn encode(f: impl FnOnce(&mut BytesMut) -> Result<(), Socks5Error>) -> Option<Result<Vec<u8>, Socks5Error>> {
    let mut buf = BytesMut::new();
    Some(f(&mut buf).map(|()| buf.to_vec()))
}

/// The tunnel stream's `ferry-target` header: whatever `split_host_port` accepts, written back
/// as the proxy writes it (IPv6 literals in brackets), splits to the same host and port.
pub fn tunnel_target(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Some((host, port)) = split_host_port(text) else { return };
    assert!(!host.is_empty());
    // No URI host has brackets other than around an IPv6 literal, so the proxy never writes one.
    if host.contains(['[', ']']) {
        return;
    }
    let written = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    assert_eq!(split_host_port(&written), Some((host, port)), "{written:?} does not split back");
}
