#![allow(clippy::unwrap_used, clippy::expect_used)]
//! TCP and LDAP through the whole stack with a real slapd: `ldapsearch` → `ferry connect`
//! (destination lookup, SOCKS5 with method 0x80) → Connectivity Proxy → tunnel → Cloud
//! Connector → slapd, as plain LDAP, as LDAPS end to end (the app's TLS passes through), and as
//! plain LDAP that the connector turns into LDAPS (an `LDAPS` mapping). Also the SOCKS5 address
//! types (domain, IPv4, IPv6), half-close, and the reply codes for a denied target (with the
//! denial in the audit log), an unreachable backend and a missing Cloud Connector.

mod common;

use std::process::Command;

use common::{audit_lines, ferry_connect, ferry_up, run_ok, socks_addr, test_dir, token};
use ferry_core::tls::LocalCa;
use ferry_testkit::eventually;
use ferry_testkit::slapd::{READER_DN, READER_PW, SUFFIX, Slapd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ldapsearch(url: &str, ca: Option<&std::path::Path>) -> Command {
    let mut cmd = Command::new("ldapsearch");
    cmd.args(["-x", "-LLL", "-H", url, "-D", READER_DN, "-w", READER_PW, "-b", SUFFIX, "(uid=carol)", "cn", "mail"]);
    // No user or system ldap.conf may change what the test sees (LDAPNOINIT would also drop the
    // LDAPTLS_* variables).
    cmd.env("LDAPCONF", "/dev/null").env("LDAPRC", "ferry-test-no-ldaprc");
    if let Some(ca) = ca {
        cmd.env("LDAPTLS_CACERT", ca).env("LDAPTLS_REQCERT", "demand");
    }
    cmd
}

#[tokio::test]
async fn ldap_and_tcp_through_socks5_and_the_tunnel() {
    ferry_core::init_crypto();
    let dir = test_dir("tcp-ldap");
    let ca = LocalCa::generate("ferry LDAP test CA").unwrap();
    let cert = ca.issue_server_cert(&["127.0.0.1", "localhost"]).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let slapd = Slapd::start_tls(
        &format!(
            "dn: uid=carol,ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: carol\ncn: Carol Clark\n\
             sn: Clark\nmail: carol@ferry.test\n"
        ),
        &cert.cert_pem,
        cert.key_pem.expose(),
    );
    let ldap_port = slapd.addr.port();
    let ldaps_port: u16 = slapd.ldaps_url.as_deref().unwrap().rsplit(':').next().unwrap().parse().unwrap();

    // A raw TCP service that answers only after the client has finished sending (half-close).
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_port = backend.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                s.read_to_end(&mut all).await.unwrap();
                s.write_all(format!("got {} bytes", all.len()).as_bytes()).await.unwrap();
            });
        }
    });

    // A port nothing listens on, for a mapping whose backend is down.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();

    let config = format!(
        r#"{listen}
[[destinations]]
properties = {{ Name = "dir", Type = "LDAP", "ldap.url" = "ldap://ldap.virtual:389", "ldap.proxyType" = "OnPremise", "ldap.authentication" = "NoAuthentication" }}
[[destinations]]
properties = {{ Name = "dir-tls", Type = "LDAP", "ldap.url" = "ldaps://ldaps.virtual:636", "ldap.proxyType" = "OnPremise" }}
[[destinations]]
properties = {{ Name = "dir-enforced", Type = "LDAP", "ldap.url" = "ldap://secure.virtual:389", "ldap.proxyType" = "OnPremise" }}
[[destinations]]
properties = {{ Name = "dir-unmapped", Type = "TCP", Address = "nowhere.virtual:389", ProxyType = "OnPremise" }}
[[destinations]]
properties = {{ Name = "dir-v6", Type = "TCP", Address = "[::1]:389", ProxyType = "OnPremise" }}

[[connectors]]
backend_ca_file = "{ca}"
[[connectors.mappings]]
virtualHost = "ldap.virtual"
virtualPort = 389
localHost = "127.0.0.1"
localPort = {ldap_port}
protocol = "LDAP"
[[connectors.mappings]]
virtualHost = "ldaps.virtual"
virtualPort = 636
localHost = "127.0.0.1"
localPort = {ldaps_port}
protocol = "LDAP"
[[connectors.mappings]]
virtualHost = "secure.virtual"
virtualPort = 389
localHost = "127.0.0.1"
localPort = {ldaps_port}
protocol = "LDAPS"
[[connectors.mappings]]
virtualHost = "[::1]"
virtualPort = 389
localHost = "127.0.0.1"
localPort = {ldap_port}
protocol = "LDAP"
[[connectors.mappings]]
virtualHost = "10.9.9.9"
virtualPort = 7
localHost = "127.0.0.1"
localPort = {backend_port}
protocol = "TCP"
[[connectors.mappings]]
virtualHost = "down.virtual"
virtualPort = 1
localHost = "127.0.0.1"
localPort = {closed_port}
protocol = "TCP"
"#,
        listen = common::LISTEN_ANY,
        ca = ca_file.display(),
    );
    let (_up, vcap) = ferry_up(&dir, &config);

    // Plain LDAP, the virtual host sent as a SOCKS5 domain name.
    let (_fwd, addr) = ferry_connect(&dir, "dir", &[]);
    let out = run_ok(ldapsearch(&format!("ldap://{addr}"), None)).await;
    assert!(out.contains("cn: Carol Clark") && out.contains("mail: carol@ferry.test"), "{out}");

    // LDAPS end to end: the client's TLS session is with slapd; the stack only carries bytes.
    let (_fwd_tls, addr) = ferry_connect(&dir, "dir-tls", &[]);
    let out = run_ok(ldapsearch(&format!("ldaps://{addr}"), Some(&ca_file))).await;
    assert!(out.contains("cn: Carol Clark"), "{out}");

    // An LDAPS mapping: the app speaks plain LDAP, the connector speaks TLS to slapd's ldaps port
    // (a plain LDAP bind there would fail).
    let (_fwd_enf, addr) = ferry_connect(&dir, "dir-enforced", &[]);
    let out = run_ok(ldapsearch(&format!("ldap://{addr}"), None)).await;
    assert!(out.contains("cn: Carol Clark"), "{out}");

    // IPv6 literal: SOCKS5 address type 04, matched against a "[::1]" mapping.
    let (_fwd_v6, addr) = ferry_connect(&dir, "dir-v6", &[]);
    let out = run_ok(ldapsearch(&format!("ldap://{addr}"), None)).await;
    assert!(out.contains("cn: Carol Clark"), "{out}");

    let conn_token = token(&vcap["connectivity"][0]["credentials"]).await;
    let socks = socks_addr(&vcap);

    // IPv4 address type and half-close: the backend answers after our end-of-stream.
    let mut s = ferry_client::connect_tcp(socks.as_str(), &conn_token, "", "10.9.9.9", 7).await.unwrap();
    let payload = vec![b'x'; 300_000];
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "got 300000 bytes");

    // No mapping: SOCKS5 reply 0x02 with its meaning, and an audit entry.
    let e = ferry_client::connect_tcp(socks.as_str(), &conn_token, "", "nowhere.virtual", 389).await.unwrap_err();
    assert_eq!(e.reply_code(), Some(0x02), "{e}");
    assert!(e.to_string().contains("not allowed by ruleset"), "{e}");
    eventually!(
        "audit entry for the denied target",
        audit_lines(&dir).lines().any(|l| l.contains("Access Denied") && l.contains("nowhere.virtual:389"))
    );
    // A mapped host on another port is just as denied.
    let e = ferry_client::connect_tcp(socks.as_str(), &conn_token, "", "ldap.virtual", 390).await.unwrap_err();
    assert_eq!(e.reply_code(), Some(0x02), "{e}");

    // Through `ferry connect`: the app's connection is closed and the reason is printed.
    let (fwd_denied, addr) = common::ferry_connect_with(&dir, "dir-unmapped", &[], true);
    let mut app = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut rest = Vec::new();
    app.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let (_, stderr) = fwd_denied.kill_and_collect();
    assert!(stderr.contains("nowhere.virtual:389 refused with reply 0x02") && stderr.contains("ruleset"), "{stderr}");

    // An unknown destination stops `ferry connect` at start, saying why.
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["connect", "no-such-destination", "--env-file"])
        .arg(dir.join("default-env.json"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("404") && stderr.contains("no-such-destination"), "{stderr}");

    // Mapped, but the backend refuses the connection: 0x04.
    let e = ferry_client::connect_tcp(socks.as_str(), &conn_token, "", "down.virtual", 1).await.unwrap_err();
    assert_eq!(e.reply_code(), Some(0x04), "{e}");
    assert!(e.to_string().contains("cannot reach the backend"), "{e}");

    // No Cloud Connector at that location: 0x03.
    let e = ferry_client::connect_tcp(socks.as_str(), &conn_token, "elsewhere", "ldap.virtual", 389).await.unwrap_err();
    assert_eq!(e.reply_code(), Some(0x03), "{e}");

    // A token the proxy does not accept: the authentication step fails.
    let e = ferry_client::connect_tcp(socks.as_str(), "not.a.jwt", "", "ldap.virtual", 389).await.unwrap_err();
    assert!(matches!(e, ferry_client::ConnectError::AuthenticationFailed { .. }), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
