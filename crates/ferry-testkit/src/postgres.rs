//! A real PostgreSQL server for tests: `initdb` into a temporary folder, `postgres` listening
//! on `127.0.0.1:<free port>` (its unix socket in the same folder), trust authentication for
//! the superuser [`USER`]. One server is shared by a test binary ([`Postgres::shared`]) and
//! every test takes a fresh database of its own ([`Postgres::database`]).
//!
//! PostgreSQL refuses to run as root. When the tests run as root, the server runs as the
//! `postgres` OS user that Debian's `postgresql` package creates (through `setpriv`), and the
//! temporary folder is handed to that user; otherwise it runs as the current user.
//!
//! The server is stopped, and its folder removed, when the test process ends, however it ends:
//! a small shell wrapper holds the read end of a pipe whose write end only this process has,
//! and stops the server (fast shutdown) when the pipe closes. A [`Postgres`] that is dropped
//! does the same at once. The wrapper has a process group of its own, so a signal to the
//! test's group does not interrupt the clean-up.
//!
//! The binaries come from Debian's `postgresql` package (`/usr/lib/postgresql/<version>/bin`),
//! which `scripts/test.sh` installs; `FERRY_PG_BIN` names another folder.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The superuser `initdb` creates; trusted on 127.0.0.1 and the socket, no password.
pub const USER: &str = "ferry";

const INSTALL_HINT: &str = "PostgreSQL is not installed: run scripts/test.sh (it installs what is missing), or \
     `DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql`";

/// A running PostgreSQL; see the module documentation.
pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    /// The unix socket's folder.
    dir: PathBuf,
    /// Closing it stops the server (see the module documentation).
    stop: Option<ChildStdin>,
    child: Child,
    databases: AtomicU32,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").field("port", &self.port).finish_non_exhaustive()
    }
}

/// The folder with `initdb`, `postgres`, `createdb` and `pg_isready`: `FERRY_PG_BIN`, the
/// newest `/usr/lib/postgresql/<version>/bin`, or the folder `initdb` is in on `PATH`.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("initdb")).find(|p| p.exists()))
        .unwrap_or_default();
    // A symlink (as /usr/local/bin/initdb may be) points to the folder with the rest.
    match on_path.and_then(|p| std::fs::canonicalize(p).ok()).and_then(|p| p.parent().map(Path::to_path_buf)) {
        Some(dir) => dir,
        None => panic!("{INSTALL_HINT}"),
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// `(uid, gid)` of an OS user, from `id`.
fn ids_of(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        std::str::from_utf8(&out.stdout).ok()?.trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// A command that runs `program` as the user the server runs as.
fn as_server_user(program: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free port")
}

fn temp_dir(root: bool) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    // Short: the unix socket path must fit in 107 bytes.
    let dir = std::env::temp_dir().join(format!(
        "ferry-pg-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000
    ));
    std::fs::create_dir_all(&dir).expect("cannot create the PostgreSQL folder");
    if root {
        let (uid, gid) = ids_of("postgres").unwrap_or_else(|| {
            panic!(
                "running as root, the tests run PostgreSQL as the `postgres` user, which does not exist; {INSTALL_HINT}"
            )
        });
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("cannot hand the folder to `postgres`");
    }
    dir
}

fn run(mut command: Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("cannot run {what}: {e}; {INSTALL_HINT}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postgres {
    /// The server shared by every test of this test binary, started on first use.
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(Postgres::start)
    }

    /// Starts a server of its own (stopped on drop). Panics, with PostgreSQL's messages, if
    /// it cannot start.
    pub fn start() -> Postgres {
        Self::start_with(&Options::default())
    }

    /// [`Postgres::start`] with TLS and/or client authentication rules of the test's choice.
    pub fn start_with(options: &Options) -> Postgres {
        let bin = bin_dir();
        assert!(bin.join("postgres").exists() && bin.join("initdb").exists(), "{INSTALL_HINT}");
        let root = is_root();
        // The server may lose the race for the port to another process: try a few ports.
        for _ in 0..5 {
            let dir = temp_dir(root);
            let mut initdb = as_server_user(&bin.join("initdb"), root);
            initdb.arg("-D").arg(dir.join("data")).args([
                "-U",
                USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ]);
            run(initdb, "initdb");
            let extra = options.write(&dir, root);
            let port = free_port();
            let log_path = dir.with_extension("log");
            let log = std::fs::File::create(&log_path).expect("cannot create the PostgreSQL log");
            let mut postgres = as_server_user(Path::new("/bin/sh"), root);
            // The wrapper: start postgres, stop it (SIGINT = fast shutdown) when stdin closes,
            // then remove the folder.
            postgres
                .arg("-c")
                .arg(
                    // An asynchronous list's stdin is /dev/null unless redirected: hence fd 3.
                    "d=$1; shift; exec 3<&0; \"$@\" </dev/null 3<&- & p=$!; \
                     (cat <&3 >/dev/null; kill -INT $p 2>/dev/null) & \
                     wait $p; s=$?; rm -rf \"$d\"; exit $s",
                )
                .arg("sh")
                .arg(&dir)
                .arg(bin.join("postgres"))
                .arg("-D")
                .arg(dir.join("data"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
                .arg(&dir)
                // Throw-away data: durability costs time and buys nothing.
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
                .args(["-c", "max_connections=300"])
                .args(extra)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(log);
            // Its own process group: a signal to the test's group (Ctrl-C, a harness ending a
            // job) must not cut the clean-up short; the closed pipe still stops it.
            std::os::unix::process::CommandExt::process_group(&mut postgres, 0);
            let mut child = postgres.spawn().expect("cannot run postgres");
            let stop = child.stdin.take();
            let mut server =
                Postgres { port, bin: bin.clone(), dir: dir.clone(), stop, child, databases: AtomicU32::new(0) };
            if server.wait_ready() {
                let _ = std::fs::remove_file(&log_path);
                return server;
            }
            drop(server);
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let _ = std::fs::remove_file(&log_path);
            if !log.contains("Address already in use") {
                panic!("postgres did not start:\n{log}");
            }
        }
        panic!("postgres found no free port");
    }

    /// Polls with `pg_isready` until the server accepts connections; false if it exits or
    /// 30 s pass.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER, "-t", "1"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Creates a new, empty database and returns its URL
    /// (`postgres://ferry@127.0.0.1:<port>/<name>`).
    pub fn database(&self) -> String {
        let name = format!("t{}_{}", std::process::id(), self.databases.fetch_add(1, Ordering::Relaxed));
        let mut createdb = Command::new(self.bin.join("createdb"));
        createdb.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER, &name]);
        run(createdb, "createdb");
        self.url(&name)
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// The folder of the server's unix socket (`host=<this>` in a URL).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `sql` as the superuser through the unix socket (`local all all trust` must be in
    /// the rules when [`Options::hba`] replaces them).
    pub fn sql(&self, sql: &str) {
        let mut psql = Command::new(self.bin.join("psql"));
        psql.arg("-h").arg(&self.dir).args(["-p", &self.port.to_string(), "-U", USER, "-d", "postgres"]);
        psql.args(["-v", "ON_ERROR_STOP=1", "-q", "-c", sql]);
        run(psql, "psql");
    }
}

/// How [`Postgres::start_with`] sets the server up beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The server's certificate chain and key (PEM): `ssl=on` with them.
    pub tls: Option<(String, String)>,
    /// CA certificates (PEM) that client certificates must chain to (`ssl_ca_file`), for
    /// `cert` authentication.
    pub client_ca: Option<String>,
    /// `pg_hba.conf` in full, instead of initdb's trust-everything rules.
    pub hba: Option<String>,
}

impl Options {
    /// Writes the files into `dir` (the server user's) and returns the server's extra options.
    fn write(&self, dir: &Path, root: bool) -> Vec<String> {
        let mut args = Vec::new();
        let mut put = |name: &str, content: &str, setting: &str| {
            let path = dir.join(name);
            std::fs::write(&path, content).expect("cannot write a PostgreSQL file");
            // PostgreSQL refuses a key others can read.
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("cannot make a PostgreSQL file private");
            if root {
                let (uid, gid) = ids_of("postgres").expect("no `postgres` user");
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("cannot hand a file to `postgres`");
            }
            args.extend(["-c".to_owned(), format!("{setting}={}", path.display())]);
        };
        if let Some((cert, key)) = &self.tls {
            put("server.crt", cert, "ssl_cert_file");
            put("server.key", key, "ssl_key_file");
        }
        if let Some(ca) = &self.client_ca {
            put("client-ca.crt", ca, "ssl_ca_file");
        }
        if let Some(hba) = &self.hba {
            put("hba.conf", hba, "hba_file");
        }
        if self.tls.is_some() {
            args.extend(["-c".to_owned(), "ssl=on".to_owned()]);
        }
        args
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        drop(self.stop.take());
        let _ = self.child.wait();
    }
}

/// A server of its own run through `pg_ctl`, for tests that stop and start it under load (fast
/// shutdown, then a start on the same port and data). Stopped at once (immediate mode) and its
/// folder removed when dropped; unlike [`Postgres`] it does not outlive a killed test process
/// tidily, so only the few restart tests use it.
pub struct RestartablePostgres {
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    root: bool,
}

impl std::fmt::Debug for RestartablePostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestartablePostgres").field("port", &self.port).finish_non_exhaustive()
    }
}

impl RestartablePostgres {
    /// Creates the cluster and starts the server; panics with PostgreSQL's messages if it
    /// cannot.
    pub fn start() -> Self {
        let bin = bin_dir();
        assert!(bin.join("pg_ctl").exists() && bin.join("initdb").exists(), "{INSTALL_HINT}");
        let root = is_root();
        let dir = temp_dir(root);
        let mut initdb = as_server_user(&bin.join("initdb"), root);
        initdb.arg("-D").arg(dir.join("data")).args([
            "-U",
            USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]);
        run(initdb, "initdb");
        let me = Self { port: free_port(), bin, dir, root };
        me.start_again();
        me
    }

    fn pg_ctl(&self) -> Command {
        let mut c = as_server_user(&self.bin.join("pg_ctl"), self.root);
        c.arg("-D").arg(self.dir.join("data")).arg("-w").args(["-t", "60"]);
        c
    }

    /// Fast shutdown (what `systemctl stop` does): open sessions are ended, the server
    /// checkpoints and exits; returns once it has.
    pub fn stop_fast(&self) {
        let mut c = self.pg_ctl();
        c.args(["-m", "fast", "stop"]);
        run(c, "pg_ctl stop");
    }

    /// Starts the (stopped) server again on the same port; returns once it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-h 127.0.0.1 -p {} -k {} -c fsync=off -c full_page_writes=off -c max_connections=100",
            self.port,
            self.dir.display()
        );
        let mut c = self.pg_ctl();
        c.arg("-l").arg(self.dir.join("log")).args(["-o", &options, "start"]);
        c.stdout(Stdio::null());
        run(c, "pg_ctl start");
    }

    /// Creates a new, empty database and returns its URL.
    pub fn database(&self, name: &str) -> String {
        let mut createdb = Command::new(self.bin.join("createdb"));
        createdb.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER, name]);
        run(createdb, "createdb");
        format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for RestartablePostgres {
    fn drop(&mut self) {
        let mut c = self.pg_ctl();
        c.args(["-m", "immediate", "stop"]).stdout(Stdio::null()).stderr(Stdio::null());
        let _ = c.status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
