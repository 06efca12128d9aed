//! A `ferry` process for tests: started with arguments, awaited until it prints `ready`,
//! killed when dropped. Its output is collected for assertions (stderr only when asked, since
//! most tests want logs on the terminal).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct FerryProcess {
    child: Child,
    /// Lines printed before `ready` (the banner), without the `VCAP_SERVICES=` line.
    pub banner: Vec<String>,
    /// The `VCAP_SERVICES=` line, parsed (`ferry up` only).
    pub vcap: Option<serde_json::Value>,
    stdout: Arc<Mutex<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl FerryProcess {
    /// Runs `bin args...` with `env`, waiting up to 30 s for `ready`.
    pub fn start<S: AsRef<OsStr>>(bin: &str, args: &[S], env: &[(&str, &str)], capture_stderr: bool) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(args).stdout(Stdio::piped());
        cmd.stderr(if capture_stderr { Stdio::piped() } else { Stdio::inherit() });
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start ferry");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = e.read_to_string(&mut s);
                s
            })
        });
        let all = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = all.clone();
        std::thread::spawn(move || {
            let mut banner = Vec::new();
            let mut vcap = None;
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
                if let Some(v) = line.strip_prefix("VCAP_SERVICES=") {
                    vcap = Some(v.to_owned());
                } else if line == "ready" {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send((std::mem::take(&mut banner), vcap.take()));
                    }
                } else if tx.is_some() {
                    banner.push(line);
                }
            }
        });
        let mut me = FerryProcess { child, banner: Vec::new(), vcap: None, stdout: all, stderr };
        let (banner, vcap) = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{bin} did not print ready within 30 s; stdout so far:\n{}", me.stdout()));
        me.banner = banner;
        me.vcap = vcap.map(|v| serde_json::from_str(&v).expect("VCAP_SERVICES is JSON"));
        me
    }

    /// The process id, for signals a test sends itself (`kill -STOP`, `kill -9`).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Sends SIGTERM and waits up to 15 s for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.wait_exit(Duration::from_secs(15))
    }

    /// Waits up to `limit` for the process to exit (after a signal the test sent).
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "the process did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process and returns (stdout, stderr) as far as they were captured.
    pub fn kill_and_collect(mut self) -> (String, String) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Give the reader thread a moment to see EOF.
        std::thread::sleep(Duration::from_millis(50));
        let err = self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default();
        (self.stdout(), err)
    }
}

impl Drop for FerryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
