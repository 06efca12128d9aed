//! A TCP connection through the Connectivity Proxy's SOCKS5 port (SAP's 20004) with SAP's
//! authentication method 0x80: greeting `05 01 80`, the JWT and base64 location id, then
//! `CONNECT` to the virtual host and port of a Cloud Connector mapping. The wire format is
//! `ferry_proto::socks5`; this module only adds the I/O and the meaning of each reply code.
//!
//! Each message is read with its exact length, so no byte the backend sends right after the
//! CONNECT reply is swallowed: the returned stream starts at the backend's first byte.

use std::net::IpAddr;

use bytes::BytesMut;
use ferry_proto::socks5::{
    self, Address, CMD_CONNECT, ConnectRequest, Greeting, METHOD_SAP, Reply, SAP_AUTH_VERSION, SapAuth,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

/// Why a SOCKS5 connection through the Connectivity Proxy failed. The message says whose
/// problem it is and what to check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error("cannot connect to the Connectivity Proxy's SOCKS5 port: {0}")]
    ProxyUnreachable(#[source] std::io::Error),
    #[error("i/o error during the SOCKS5 handshake with the Connectivity Proxy: {0}")]
    Io(#[from] std::io::Error),
    #[error("the Connectivity Proxy closed the connection during the SOCKS5 handshake")]
    Closed,
    #[error(
        "the proxy does not accept SOCKS5 authentication method 0x80 (it chose {method:#04x}); is this the \
         Connectivity Proxy's SOCKS5 port (onpremise_socks5_proxy_port)?"
    )]
    MethodRejected { method: u8 },
    #[error(
        "the Connectivity Proxy rejected the token (SOCKS5 authentication status {status:#04x}): use a fresh token \
         from the connectivity binding's token service"
    )]
    AuthenticationFailed { status: u8 },
    #[error("invalid SOCKS5 message: {0}")]
    Protocol(#[from] socks5::Socks5Error),
    #[error("SOCKS5 CONNECT to {target} refused with reply {code:#04x}: {}", describe(*code))]
    Refused { target: String, code: u8 },
}

impl ConnectError {
    /// The SOCKS5 reply code when the proxy refused the CONNECT.
    pub fn reply_code(&self) -> Option<u8> {
        match self {
            ConnectError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// What each reply code means from the Connectivity Proxy (SAP's documented meanings).
fn describe(code: u8) -> &'static str {
    match Reply::from_code(code) {
        Some(Reply::Succeeded) => "success",
        Some(Reply::GeneralFailure) => "general failure: the tunnel or the backend closed the connection",
        Some(Reply::NotAllowed) => {
            "connection not allowed by ruleset: the Cloud Connector has no TCP/LDAP mapping for this virtual host \
             and port"
        }
        Some(Reply::NetworkUnreachable) => {
            "network unreachable: no Cloud Connector is connected for this subaccount and location id"
        }
        Some(Reply::HostUnreachable) => "host unreachable: the Cloud Connector cannot reach the backend",
        Some(Reply::ConnectionRefused) => "connection refused: authentication failed",
        Some(Reply::TtlExpired) => "TTL expired",
        Some(Reply::CommandNotSupported) => "command not supported: the proxy supports CONNECT only",
        Some(Reply::AddressTypeNotSupported) => "address type not supported",
        None => "unknown reply code",
    }
}

/// The SOCKS5 address for `host`: an IP literal (IPv6 with or without brackets) or a name.
fn address(host: &str) -> Address {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    match bare.parse::<IpAddr>() {
        Ok(ip) => Address::from(ip),
        Err(_) => Address::Domain(host.to_owned()),
    }
}

async fn read_exact<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut [u8]) -> Result<(), ConnectError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ConnectError::Closed),
        Err(e) => Err(e.into()),
    }
}

/// Runs the SOCKS5 handshake on `stream` (already connected to the proxy): method 0x80 with
/// `token` (raw JWT, no `Bearer `) and `location_id` ("" = the default location), then CONNECT
/// to `host:port`. On success the stream carries the backend's bytes.
///
/// ```no_run
/// # async fn run(jwt: &str) -> Result<(), ferry_client::ConnectError> {
/// let mut stream = tokio::net::TcpStream::connect("127.0.0.1:20004").await?;
/// ferry_client::handshake(&mut stream, jwt, "my-location", "ldap.virtual", 389).await?;
/// # Ok(()) }
/// ```
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    token: &str,
    location_id: &str,
    host: &str,
    port: u16,
) -> Result<(), ConnectError> {
    let mut out = BytesMut::with_capacity(64 + token.len());
    Greeting { methods: vec![METHOD_SAP] }.encode(&mut out)?;
    stream.write_all(&out).await?;
    let mut two = [0u8; 2];
    read_exact(stream, &mut two).await?;
    if two[0] != socks5::SOCKS_VERSION {
        return Err(socks5::Socks5Error::UnsupportedVersion { found: two[0] }.into());
    }
    if two[1] != METHOD_SAP {
        return Err(ConnectError::MethodRejected { method: two[1] });
    }

    out.clear();
    let location_id = (!location_id.is_empty()).then(|| location_id.to_owned());
    SapAuth { token: token.to_owned(), location_id }.encode(&mut out)?;
    stream.write_all(&out).await?;
    read_exact(stream, &mut two).await?;
    if two != [SAP_AUTH_VERSION, 0x00] {
        return Err(ConnectError::AuthenticationFailed { status: two[1] });
    }

    out.clear();
    ConnectRequest { command: CMD_CONNECT, address: address(host), port }.encode(&mut out)?;
    stream.write_all(&out).await?;
    // VER REP RSV ATYP and the first address byte, then the rest whose length ATYP decides.
    let mut head = [0u8; 5];
    read_exact(stream, &mut head).await?;
    if head[0] != socks5::SOCKS_VERSION {
        return Err(socks5::Socks5Error::UnsupportedVersion { found: head[0] }.into());
    }
    let rest = match head[3] {
        socks5::ATYP_IPV4 => 3 + 2,
        socks5::ATYP_IPV6 => 15 + 2,
        socks5::ATYP_DOMAIN => usize::from(head[4]) + 2,
        atyp => return Err(socks5::Socks5Error::UnsupportedAddressType { atyp }.into()),
    };
    let mut tail = vec![0u8; rest];
    read_exact(stream, &mut tail).await?;
    let code = head[1];
    if code != Reply::Succeeded.code() {
        let target = match address(host) {
            Address::Ipv6(_) => format!("[{}]:{port}", address(host)),
            a => format!("{a}:{port}"),
        };
        return Err(ConnectError::Refused { target, code });
    }
    Ok(())
}

/// Connects to the proxy's SOCKS5 port at `proxy`, with `TCP_NODELAY`, and runs [`handshake`].
///
/// ```no_run
/// # async fn run(jwt: &str) -> Result<(), ferry_client::ConnectError> {
/// use tokio::io::AsyncWriteExt;
/// let mut smtp = ferry_client::connect_tcp("127.0.0.1:20004", jwt, "", "mail.virtual", 587).await?;
/// smtp.write_all(b"EHLO app\r\n").await?;
/// # Ok(()) }
/// ```
pub async fn connect_tcp(
    proxy: impl ToSocketAddrs,
    token: &str,
    location_id: &str,
    host: &str,
    port: u16,
) -> Result<TcpStream, ConnectError> {
    let mut stream = TcpStream::connect(proxy).await.map_err(ConnectError::ProxyUnreachable)?;
    stream.set_nodelay(true).map_err(ConnectError::ProxyUnreachable)?;
    handshake(&mut stream, token, location_id, host, port).await?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use tokio::io::duplex;

    /// Plays the proxy's side from a script of expected client bytes and canned answers.
    async fn against(answers: Vec<u8>, location: &str, host: &str) -> (Result<(), ConnectError>, Vec<u8>) {
        let (mut client, mut server) = duplex(4096);
        let server = tokio::spawn(async move {
            server.write_all(&answers).await.unwrap();
            server.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        let r = handshake(&mut client, "header.payload.sig", location, host, 389).await;
        drop(client);
        (r, server.await.unwrap())
    }

    #[tokio::test]
    async fn sends_sap_messages_and_accepts_success() {
        let answers = [&[5u8, 0x80][..], &[1, 0], &socks5::encode_reply(Reply::Succeeded)].concat();
        let (r, sent) = against(answers, "loc", "ldap.virtual").await;
        r.unwrap();
        let mut expect = vec![5, 1, 0x80, 1, 0, 0, 0, 18];
        expect.extend_from_slice(b"header.payload.sig");
        expect.push(4);
        expect.extend_from_slice(b"bG9j");
        expect.extend_from_slice(&[5, 1, 0, 3, 12]);
        expect.extend_from_slice(b"ldap.virtual");
        expect.extend_from_slice(&[1, 0x85]);
        assert_eq!(sent, expect);
    }

    #[tokio::test]
    async fn ip_literals_use_ip_address_types() {
        let answers = [&[5u8, 0x80][..], &[1, 0], &socks5::encode_reply(Reply::Succeeded)].concat();
        let (r, sent) = against(answers.clone(), "", "[::1]").await;
        r.unwrap();
        let connect = &sent[sent.len() - 22..];
        assert_eq!(&connect[..4], &[5, 1, 0, 4]);
        assert_eq!(connect[19], 1, "::1");
        let (r, sent) = against(answers, "", "10.0.0.7").await;
        r.unwrap();
        assert_eq!(&sent[sent.len() - 10..], &[5, 1, 0, 1, 10, 0, 0, 7, 1, 0x85]);
        assert_eq!(sent[3 + 5 + 18], 0, "no location id: length 0");
    }

    #[tokio::test]
    async fn every_refusal_has_its_own_message() {
        for (code, words) in [
            (Reply::NotAllowed, "not allowed by ruleset"),
            (Reply::NetworkUnreachable, "no Cloud Connector is connected"),
            (Reply::HostUnreachable, "cannot reach the backend"),
            (Reply::GeneralFailure, "general failure"),
        ] {
            let answers = [&[5u8, 0x80][..], &[1, 0], &socks5::encode_reply(code)].concat();
            let (r, _) = against(answers, "", "ldap.virtual").await;
            let e = r.unwrap_err();
            assert_eq!(e.reply_code(), Some(code.code()));
            let msg = e.to_string();
            assert!(msg.contains(words) && msg.contains("ldap.virtual:389"), "{msg}");
        }
    }

    #[tokio::test]
    async fn rejected_token_and_method_are_named() {
        let (r, _) = against(vec![5, 0x80, 1, 1], "", "h").await;
        assert!(matches!(r, Err(ConnectError::AuthenticationFailed { status: 1 })), "{r:?}");
        let (r, _) = against(vec![5, 0xFF], "", "h").await;
        assert!(matches!(r, Err(ConnectError::MethodRejected { method: 0xFF })), "{r:?}");
        let (r, _) = against(vec![5], "", "h").await;
        assert!(matches!(r, Err(ConnectError::Closed)), "{r:?}");
    }

    #[tokio::test]
    async fn bytes_after_the_reply_stay_in_the_stream() {
        let answers = [&[5u8, 0x80][..], &[1, 0], &socks5::encode_reply(Reply::Succeeded), b"220 ready\r\n"].concat();
        let (mut client, mut server) = duplex(4096);
        server.write_all(&answers).await.unwrap();
        server.shutdown().await.unwrap();
        handshake(&mut client, "t", "", "smtp.virtual", 25).await.unwrap();
        let mut rest = String::new();
        client.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "220 ready\r\n");
    }
}
