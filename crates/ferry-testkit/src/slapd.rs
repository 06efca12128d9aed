//! A real OpenLDAP server for tests: `/usr/sbin/slapd` as the current user on
//! `127.0.0.1:<free port>`, with a throw-away `slapd.conf` and mdb database in a temporary
//! folder, seeded with `slapadd` before it starts. Killed and removed on drop.
//!
//! The directory has suffix [`SUFFIX`], the root DN [`ROOT_DN`]/[`ROOT_PW`], a read-only
//! service account [`READER_DN`]/[`READER_PW`] (anonymous users can read nothing), and the
//! organisational units `ou=people` and `ou=groups`; tests add their entries as LDIF.
//!
//! slapd and the LDAP tools come from Debian's `slapd` and `ldap-utils` packages, which
//! `scripts/test.sh` installs; without them the tests that need slapd fail and say so.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const SUFFIX: &str = "dc=ferry,dc=test";
pub const ROOT_DN: &str = "cn=admin,dc=ferry,dc=test";
pub const ROOT_PW: &str = "admin-secret";
pub const READER_DN: &str = "cn=reader,dc=ferry,dc=test";
pub const READER_PW: &str = "reader-secret-7f3a";

const SLAPD: &str = "/usr/sbin/slapd";
const SLAPADD: &str = "/usr/sbin/slapadd";
const SCHEMA_DIR: &str = "/etc/ldap/schema";
const INSTALL_HINT: &str = "slapd is not installed: run scripts/test.sh (it installs what is missing), or \
     `DEBIAN_FRONTEND=noninteractive apt-get install -y slapd ldap-utils`";

/// A running slapd; see the module documentation.
pub struct Slapd {
    /// `ldap://127.0.0.1:<port>`.
    pub url: String,
    pub addr: SocketAddr,
    /// `ldaps://127.0.0.1:<port>` when started with [`Slapd::start_tls`]; StartTLS then works
    /// on `url` too.
    pub ldaps_url: Option<String>,
    dir: PathBuf,
    child: Child,
}

impl std::fmt::Debug for Slapd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slapd").field("url", &self.url).finish_non_exhaustive()
    }
}

fn base_ldif() -> String {
    format!(
        "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: ferry\no: Ferry\n\n\
         dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n\n\
         dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n\n\
         dn: {READER_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: reader\n\
         userPassword: {READER_PW}\n\n"
    )
}

fn conf(dir: &Path, tls: bool) -> String {
    let d = dir.display();
    let tls = if tls {
        format!("TLSCertificateFile {d}/server.pem\nTLSCertificateKeyFile {d}/server.key\n")
    } else {
        String::new()
    };
    format!(
        "{tls}include {SCHEMA_DIR}/core.schema\n\
         include {SCHEMA_DIR}/cosine.schema\n\
         include {SCHEMA_DIR}/inetorgperson.schema\n\
         pidfile {d}/slapd.pid\n\
         argsfile {d}/slapd.args\n\
         modulepath /usr/lib/ldap\n\
         moduleload back_mdb\n\
         database mdb\n\
         maxsize 16777216\n\
         suffix \"{SUFFIX}\"\n\
         rootdn \"{ROOT_DN}\"\n\
         rootpw {ROOT_PW}\n\
         directory {d}/data\n\
         access to attrs=userPassword by anonymous auth by * none\n\
         access to * by users read by * none\n"
    )
}

/// A port that was free a moment ago (slapd binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free port")
}

fn temp_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "ferry-slapd-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(dir.join("data")).expect("cannot create the slapd folder");
    dir
}

impl Slapd {
    /// Starts slapd with the base entries plus `ldif` (entries separated by blank lines, as
    /// `slapadd` reads them). Panics, with slapd's own messages, if it cannot start.
    pub fn start(ldif: &str) -> Slapd {
        Self::launch(ldif, None)
    }

    /// [`Slapd::start`] with TLS: the server presents `cert_pem` (chain) with `key_pem` on an
    /// extra `ldaps://` port and for StartTLS.
    pub fn start_tls(ldif: &str, cert_pem: &str, key_pem: &str) -> Slapd {
        Self::launch(ldif, Some((cert_pem, key_pem)))
    }

    fn launch(ldif: &str, tls: Option<(&str, &str)>) -> Slapd {
        assert!(Path::new(SLAPD).exists() && Path::new(SLAPADD).exists(), "{INSTALL_HINT}");
        let dir = temp_dir();
        if let Some((cert, key)) = tls {
            std::fs::write(dir.join("server.pem"), cert).expect("cannot write the certificate");
            std::fs::write(dir.join("server.key"), key).expect("cannot write the key");
        }
        std::fs::write(dir.join("slapd.conf"), conf(&dir, tls.is_some())).expect("cannot write slapd.conf");
        let seed = format!("{}{ldif}\n", base_ldif());
        let mut add = Command::new(SLAPADD)
            .arg("-f")
            .arg(dir.join("slapd.conf"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run slapadd");
        add.stdin.take().expect("stdin").write_all(seed.as_bytes()).expect("cannot feed slapadd");
        let out = add.wait_with_output().expect("slapadd");
        assert!(
            out.status.success(),
            "slapadd failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // slapd may lose the race for the port to another process: try a few ports.
        for _ in 0..5 {
            let port = free_port();
            let url = format!("ldap://127.0.0.1:{port}");
            let ldaps_url = tls.map(|_| format!("ldaps://127.0.0.1:{}", free_port()));
            let listen = match &ldaps_url {
                Some(s) => format!("{url}/ {s}/"),
                None => format!("{url}/"),
            };
            let log = std::fs::File::create(dir.join("slapd.log")).expect("cannot create slapd.log");
            let mut child = Command::new(SLAPD)
                .arg("-f")
                .arg(dir.join("slapd.conf"))
                .arg("-h")
                .arg(listen)
                // -d keeps slapd in the foreground (so the child is slapd itself); level 0
                // still prints start-up errors to stderr.
                .args(["-d", "0"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("cannot run slapd");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if wait_ready(&mut child, addr) {
                return Slapd { url, addr, ldaps_url, dir, child };
            }
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.join("slapd.log")).unwrap_or_default();
            if !log.contains("Address already in use") {
                let _ = std::fs::remove_dir_all(&dir);
                panic!("slapd did not start:\n{log}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("slapd found no free port");
    }
}

/// Polls the port until slapd accepts connections; false if slapd exits or 10 s pass.
fn wait_ready(child: &mut Child, addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

impl Drop for Slapd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
