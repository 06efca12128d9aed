//! Real mail servers for tests, started in a temporary folder on free `127.0.0.1` ports and
//! killed on drop:
//!
//! - Dovecot (Debian `dovecot-core`, `dovecot-imapd`, `dovecot-pop3d`, `dovecot-lmtpd`) with its
//!   own config file: IMAP (STARTTLS) and IMAPS, POP3 (STARTTLS) and POP3S, and LMTP for
//!   delivery into a Maildir; one user [`USER`]/[`PASSWORD`] from a passwd-file.
//! - An SMTP submission server built on `aiosmtpd` (Debian `python3-aiosmtpd`, the SMTP server
//!   library of the Python project): STARTTLS required, AUTH PLAIN/LOGIN required (the same
//!   user), and every accepted mail delivered to Dovecot over LMTP. Postfix and OpenSMTPD were
//!   not used because they need root and system-wide state to run at all.
//!
//! As root (CI), Dovecot drops to `nobody` for mail access (it refuses uid 0) and to its own
//! `dovenull`/`dovecot` users for login and internal processes, as the package sets them up; as
//! another user everything runs as that user.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const USER: &str = "alice";
pub const PASSWORD: &str = "alice-mail-secret";
/// The mail domain; `alice@ferry.test` is delivered to [`USER`].
pub const DOMAIN: &str = "ferry.test";

const DOVECOT: &str = "/usr/sbin/dovecot";
const PYTHON: &str = "/usr/bin/python3";
const INSTALL_HINT: &str = "the mail servers are not installed: run scripts/test.sh (it installs what is missing), or \
     `DEBIAN_FRONTEND=noninteractive apt-get install -y dovecot-core dovecot-imapd dovecot-pop3d dovecot-lmtpd \
     python3-aiosmtpd`";

const SMTP_SERVER: &str = r#"
import asyncio, smtplib, ssl, sys
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

port, lmtp_port, cert, key, user, password = sys.argv[1:7]
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)

class Deliver:
    async def handle_DATA(self, server, session, envelope):
        def send():
            with smtplib.LMTP("127.0.0.1", int(lmtp_port)) as lmtp:
                lmtp.sendmail(envelope.mail_from, envelope.rcpt_tos, envelope.original_content)
        try:
            await asyncio.get_running_loop().run_in_executor(None, send)
        except (OSError, smtplib.SMTPException) as e:
            return "451 4.3.0 delivery to LMTP failed: %s" % e
        return "250 2.0.0 delivered"

def check(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == user.encode() \
        and auth_data.password == password.encode()
    return AuthResult(success=ok)

def factory():
    return SMTP(Deliver(), hostname="mail.ferry.test", tls_context=ctx, require_starttls=True,
                authenticator=check, auth_required=True, auth_require_tls=True)

loop = asyncio.new_event_loop()
loop.run_until_complete(loop.create_server(factory, "127.0.0.1", int(port)))
print("ready", flush=True)
loop.run_forever()
"#;

/// Dovecot plus the SMTP server; see the module documentation.
pub struct MailServers {
    /// SMTP submission: STARTTLS and AUTH required.
    pub smtp: SocketAddr,
    /// IMAP with STARTTLS.
    pub imap: SocketAddr,
    /// IMAP over TLS (993 style).
    pub imaps: SocketAddr,
    /// POP3 with STARTTLS.
    pub pop3: SocketAddr,
    /// POP3 over TLS (995 style).
    pub pop3s: SocketAddr,
    dir: PathBuf,
    dovecot: Child,
    smtpd: Child,
}

impl std::fmt::Debug for MailServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailServers").field("smtp", &self.smtp).field("imap", &self.imap).finish_non_exhaustive()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free port")
}

/// `(uid, gid)` of a user in `/etc/passwd`.
fn passwd_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name) && f.len() > 3).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// Name, group name, uid and gid of the user running the test.
fn current_user() -> (String, String, u32, u32) {
    let out = |arg: &str| {
        let o = Command::new("id").arg(arg).output().expect("cannot run id");
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    let uid = out("-u").parse().expect("uid");
    let gid = out("-g").parse().expect("gid");
    (out("-un"), out("-gn"), uid, gid)
}

struct Ports {
    imap: u16,
    imaps: u16,
    pop3: u16,
    pop3s: u16,
    lmtp: u16,
}

fn dovecot_conf(dir: &Path, p: &Ports) -> String {
    let d = dir.display();
    let (user, group, uid, gid) = current_user();
    // Rootless: every process runs as this user, so the unprivileged defaults (and the group of
    // the internal unix sockets) must name it and login processes cannot chroot. As root: mail
    // access as `nobody`.
    let (identity, login_chroot, mail_uid, mail_gid) = if uid == 0 {
        let (u, g) = passwd_ids("nobody").expect("no user nobody");
        (String::new(), "", u, g)
    } else {
        (
            format!(
                "default_login_user = {user}\ndefault_internal_user = {user}\ndefault_internal_group = {group}\n\
                 service anvil {{\n  chroot =\n}}\n"
            ),
            "  chroot =\n",
            uid,
            gid,
        )
    };
    format!(
        "base_dir = {d}/run\n\
         state_dir = {d}/state\n\
         log_path = {d}/dovecot.log\n\
         info_log_path = {d}/dovecot.log\n\
         protocols = imap pop3 lmtp\n\
         listen = 127.0.0.1\n\
         ssl = yes\n\
         ssl_cert = <{d}/server.pem\n\
         ssl_key = <{d}/server.key\n\
         first_valid_uid = 1\n\
         auth_mechanisms = plain login\n\
         auth_username_format = %Ln\n\
         mail_location = maildir:{d}/mail/%u/Maildir\n\
         passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN {d}/users\n}}\n\
         userdb {{\n  driver = static\n  args = uid={mail_uid} gid={mail_gid} home={d}/mail/%u\n}}\n\
         {identity}\
         service imap-login {{\n{login_chroot}  inet_listener imap {{\n    port = {}\n  }}\n  inet_listener imaps {{\n    port = {}\n    ssl = yes\n  }}\n}}\n\
         service pop3-login {{\n{login_chroot}  inet_listener pop3 {{\n    port = {}\n  }}\n  inet_listener pop3s {{\n    port = {}\n    ssl = yes\n  }}\n}}\n\
         service lmtp {{\n  inet_listener lmtp {{\n    address = 127.0.0.1\n    port = {}\n  }}\n}}\n",
        p.imap, p.imaps, p.pop3, p.pop3s, p.lmtp
    )
}

fn temp_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "ferry-mail-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("cannot create the mail folder");
    dir
}

impl MailServers {
    /// Starts both servers presenting `cert_pem` (chain) with `key_pem`. Panics with the
    /// servers' own messages if they cannot start.
    pub fn start(cert_pem: &str, key_pem: &str) -> MailServers {
        assert!(
            Path::new(DOVECOT).exists()
                && ["imap", "pop3", "lmtp"].iter().all(|p| Path::new("/usr/lib/dovecot").join(p).exists())
                && Command::new(PYTHON).args(["-c", "import aiosmtpd"]).status().is_ok_and(|s| s.success()),
            "{INSTALL_HINT}"
        );
        let mut last_log = String::new();
        // A port picked free may be taken before the server binds it: try again with new ones.
        for _ in 0..3 {
            match Self::launch(cert_pem, key_pem) {
                Ok(m) => return m,
                Err(log) => last_log = log,
            }
        }
        panic!("the mail servers did not start:\n{last_log}");
    }

    fn launch(cert_pem: &str, key_pem: &str) -> Result<MailServers, String> {
        let dir = temp_dir();
        let write = |name: &str, data: &str| std::fs::write(dir.join(name), data).expect("cannot write a mail file");
        write("server.pem", cert_pem);
        write("server.key", key_pem);
        write("users", &format!("{USER}:{{PLAIN}}{PASSWORD}::::::\n"));
        write("smtpd.py", SMTP_SERVER);
        let mail = dir.join("mail");
        std::fs::create_dir_all(&mail).expect("mail folder");
        if current_user().2 == 0 {
            let (u, g) = passwd_ids("nobody").expect("no user nobody");
            std::os::unix::fs::chown(&mail, Some(u), Some(g)).expect("chown mail folder");
        }
        let p =
            Ports { imap: free_port(), imaps: free_port(), pop3: free_port(), pop3s: free_port(), lmtp: free_port() };
        write("dovecot.conf", &dovecot_conf(&dir, &p));
        let dovecot = Command::new(DOVECOT)
            .arg("-F")
            .arg("-c")
            .arg(dir.join("dovecot.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("dovecot.stderr")).expect("log file"))
            .spawn()
            .expect("cannot run dovecot");
        let smtp_port = free_port();
        let smtpd = Command::new(PYTHON)
            .arg(dir.join("smtpd.py"))
            .args([&smtp_port.to_string(), &p.lmtp.to_string()])
            .arg(dir.join("server.pem"))
            .arg(dir.join("server.key"))
            .args([USER, PASSWORD])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("smtpd.stderr")).expect("log file"))
            .spawn()
            .expect("cannot run python3");
        let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let mut me = MailServers {
            smtp: addr(smtp_port),
            imap: addr(p.imap),
            imaps: addr(p.imaps),
            pop3: addr(p.pop3),
            pop3s: addr(p.pop3s),
            dir,
            dovecot,
            smtpd,
        };
        let all = [me.smtp, me.imap, me.imaps, me.pop3, me.pop3s, addr(p.lmtp)];
        if me.wait_ready(&all) {
            return Ok(me);
        }
        Err(me.logs())
    }

    fn wait_ready(&mut self, addrs: &[SocketAddr]) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if matches!(self.dovecot.try_wait(), Ok(Some(_))) || matches!(self.smtpd.try_wait(), Ok(Some(_))) {
                return false;
            }
            if addrs.iter().all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Both servers' logs, for failure messages.
    pub fn logs(&self) -> String {
        ["dovecot.stderr", "dovecot.log", "smtpd.stderr"]
            .iter()
            .map(|f| format!("--- {f}\n{}", std::fs::read_to_string(self.dir.join(f)).unwrap_or_default()))
            .collect()
    }
}

impl Drop for MailServers {
    fn drop(&mut self) {
        let _ = self.smtpd.kill();
        let _ = self.smtpd.wait();
        // SIGTERM, so the master stops its login, auth and mail processes too.
        let _ = Command::new("kill").args(["-TERM", &self.dovecot.id().to_string()]).status();
        let _ = self.dovecot.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
