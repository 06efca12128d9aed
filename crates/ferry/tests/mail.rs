#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Mail through the whole stack with real servers (`ferry_testkit::mail`: Dovecot for IMAP and
//! POP3, an aiosmtpd submission server delivering to Dovecot over LMTP). One `MAIL` destination
//! names all three services; `ferry connect --protocol smtp|imap|pop3` opens a local port for
//! each, and `curl` sends a mail with STARTTLS + AUTH, then reads it back over IMAP with
//! STARTTLS and over POP3 with implicit TLS. TLS runs between curl and the servers; the proxy,
//! tunnel and connector only carry bytes. Last, a `TCPS` mapping: plain POP3 from the app, TLS
//! from the connector to the server.

mod common;

use std::process::Command;

use common::{ferry_connect, ferry_up, run_ok, test_dir};
use ferry_core::tls::LocalCa;
use ferry_testkit::mail::{DOMAIN, MailServers, PASSWORD, USER};

#[tokio::test]
async fn mail_sent_through_the_stack_is_read_back_through_it() {
    ferry_core::init_crypto();
    let dir = test_dir("mail");
    let ca = LocalCa::generate("ferry mail test CA").unwrap();
    let cert = ca.issue_server_cert(&["127.0.0.1", "localhost"]).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let mail = MailServers::start(&cert.cert_pem, cert.key_pem.expose());

    let config = format!(
        r#"{listen}
[[destinations]]
properties = {{ Name = "mailer", Type = "MAIL", ProxyType = "OnPremise", "mail.user" = "{USER}", "mail.password" = "{PASSWORD}", "mail.transport.protocol" = "smtp", "mail.smtp.host" = "smtp.virtual", "mail.smtp.port" = "587", "mail.smtp.auth" = "true", "mail.imap.host" = "imap.virtual", "mail.imap.port" = "143", "mail.pop3s.host" = "pop.virtual", "mail.pop3s.port" = "995" }}
[[destinations]]
properties = {{ Name = "mailbox-tcps", Type = "MAIL", ProxyType = "OnPremise", "mail.pop3.host" = "pop-tls.virtual", "mail.pop3.port" = "110" }}

[[connectors]]
backend_ca_file = "{ca}"
[[connectors.mappings]]
virtualHost = "smtp.virtual"
virtualPort = 587
localHost = "127.0.0.1"
localPort = {smtp}
protocol = "TCP"
[[connectors.mappings]]
virtualHost = "imap.virtual"
virtualPort = 143
localHost = "127.0.0.1"
localPort = {imap}
protocol = "TCP"
[[connectors.mappings]]
virtualHost = "pop.virtual"
virtualPort = 995
localHost = "127.0.0.1"
localPort = {pop3s}
protocol = "TCP"
[[connectors.mappings]]
virtualHost = "pop-tls.virtual"
virtualPort = 110
localHost = "127.0.0.1"
localPort = {pop3s}
protocol = "TCPS"
"#,
        listen = common::LISTEN_ANY,
        smtp = mail.smtp.port(),
        imap = mail.imap.port(),
        pop3s = mail.pop3s.port(),
        ca = ca_file.display(),
    );
    let (_up, _vcap) = ferry_up(&dir, &config);
    let (_smtp_fwd, smtp) = ferry_connect(&dir, "mailer", &["--protocol", "smtp"]);
    let (_imap_fwd, imap) = ferry_connect(&dir, "mailer", &["--protocol", "imap"]);
    let (_pop_fwd, pop3) = ferry_connect(&dir, "mailer", &["--protocol", "pop3"]);

    let subject = format!("ferry mail test {}", std::process::id());
    let message = dir.join("message.txt");
    std::fs::write(
        &message,
        format!(
            "From: bob@{DOMAIN}\r\nTo: {USER}@{DOMAIN}\r\nSubject: {subject}\r\n\r\nSent through SOCKS5 and the tunnel.\r\n"
        ),
    )
    .unwrap();
    let user = format!("{USER}:{PASSWORD}");
    let curl = |url: String| {
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--max-time", "30", "--cacert"]).arg(&ca_file).args(["--user", &user]);
        cmd.arg(url);
        cmd
    };

    // SMTP: STARTTLS (required by the server) and AUTH.
    let mut send = curl(format!("smtp://{smtp}/{DOMAIN}"));
    send.args(["--ssl-reqd", "--mail-from", &format!("bob@{DOMAIN}"), "--mail-rcpt", &format!("{USER}@{DOMAIN}")])
        .arg("--upload-file")
        .arg(&message);
    run_ok(send).await;

    // IMAP with STARTTLS.
    let mut fetch = curl(format!("imap://{imap}/INBOX;MAILINDEX=1"));
    fetch.arg("--ssl-reqd");
    let got = run_ok(fetch).await;
    assert!(got.contains(&format!("Subject: {subject}")) && got.contains("Sent through SOCKS5"), "{got}");
    assert!(got.contains(&format!("Delivered-To: {USER}@{DOMAIN}")), "delivered by Dovecot: {got}");

    // POP3 with implicit TLS.
    let got = run_ok(curl(format!("pop3s://{pop3}/1"))).await;
    assert!(got.contains(&format!("Subject: {subject}")), "{got}\n{}", mail.logs());

    // A TCPS mapping: the app speaks plain POP3, the connector speaks TLS to the POP3S port.
    let (_tcps_fwd, pop3_plain) = ferry_connect(&dir, "mailbox-tcps", &[]);
    let got = run_ok(curl(format!("pop3://{pop3_plain}/1"))).await;
    assert!(got.contains(&format!("Subject: {subject}")), "{got}\n{}", mail.logs());
    let _ = std::fs::remove_dir_all(&dir);
}
