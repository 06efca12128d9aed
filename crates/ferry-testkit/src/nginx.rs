//! A real nginx for tests: `/usr/sbin/nginx` in the foreground as the current user on
//! `127.0.0.1:<free port>`, with a throw-away prefix folder and the `server` block the test
//! gives. Killed and removed on drop. `scripts/test.sh` installs nginx when it is missing;
//! without it the tests that need nginx fail and say so.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NGINX: &str = "/usr/sbin/nginx";

pub struct Nginx {
    pub addr: SocketAddr,
    /// The prefix folder; tests may put certificates here before referring to them.
    pub dir: PathBuf,
    child: Child,
}

impl Nginx {
    /// `server_body` is the inside of a `server { }` block; `{PORT}` and `{DIR}` are replaced
    /// with the port to listen on and the prefix folder. `files` are written into the folder first.
    pub fn start(server_body: &str, files: &[(&str, &str)]) -> Nginx {
        assert!(
            std::path::Path::new(NGINX).exists(),
            "nginx is not installed: run scripts/test.sh (it installs what is missing), or `apt-get install -y nginx`"
        );
        let dir = std::env::temp_dir().join(format!("ferry-nginx-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
        for (name, content) in files {
            std::fs::write(dir.join(name), content).expect("nginx file");
        }
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let body = server_body.replace("{PORT}", &port.to_string()).replace("{DIR}", &dir.display().to_string());
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log warn;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/tmp_body;\n  proxy_temp_path {d}/tmp_proxy;\n\
             fastcgi_temp_path {d}/tmp_fcgi;\n  uwsgi_temp_path {d}/tmp_uwsgi;\n  scgi_temp_path {d}/tmp_scgi;\n\
             server {{\n{body}\n  }}\n}}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).expect("nginx.conf");
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start; see {}", dir.join("logs/error.log").display());
            std::thread::sleep(Duration::from_millis(10));
        }
        Nginx { addr, dir, child }
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
