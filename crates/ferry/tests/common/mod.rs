//! Helpers for tests that run `ferry up` and `ferry connect` as processes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_testkit::process::FerryProcess;
use serde_json::Value;

/// `ferry connector enroll`: `ferry up`'s CA (under `data`) signs a connector certificate for
/// `subaccount` and `location` (the default location when `None`), and the connector's files
/// (`connector.toml`, keys, `authentication-data.json`) land in `out`. `extra`: more arguments.
pub fn enroll(subaccount: &str, location: Option<&str>, token_url: &str, data: &Path, out: &Path, extra: &[&str]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.args(["connector", "enroll", "--subaccount", subaccount, "--url", token_url]);
    if let Some(location) = location {
        cmd.args(["--location", location]);
    }
    let status = cmd.args(extra).arg("--data-dir").arg(data).arg("--out").arg(out).status().unwrap();
    assert!(status.success(), "ferry connector enroll failed for {subaccount}/{location:?}");
}

/// `ferry up`, and a connector enrolled for location "plant" whose config file gets `extra`
/// (top-level keys) before and `mappings` (TOML) after what enroll wrote; not started. The
/// temporary folder, `ferry up`, its `VCAP_SERVICES` and the connector's config path.
pub fn up_and_enrolled_connector(mappings: &str, extra: &str) -> (tempfile::TempDir, FerryProcess, Value, PathBuf) {
    ferry_core::init_crypto();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let (up, vcap) = ferry_up(&dir, LISTEN_ANY);
    let conn = &vcap["connectivity"][0]["credentials"];
    let out = dir.join("connector");
    let (subaccount, url) = (conn["tenantid"].as_str().unwrap(), conn["url"].as_str().unwrap());
    enroll(subaccount, Some("plant"), url, &dir.join("data"), &out, &[]);
    let config = out.join("connector.toml");
    let toml = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{extra}\n{toml}\n{mappings}")).unwrap();
    (tmp, up, vcap, config)
}

/// A fresh temporary folder for one test.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `[listen]` with every port 0, for appending destinations and connectors.
pub const LISTEN_ANY: &str = "[listen]\ntoken_port = 0\ntoken_https_port = 0\ndestination_port = 0\n\
     http_proxy_port = 0\nsocks5_port = 0\ntunnel_port = 0\n\n";

/// `ferry up` with `config` in `dir`; returns it and its VCAP_SERVICES.
pub fn ferry_up(dir: &Path, config: &str) -> (FerryProcess, Value) {
    std::fs::write(dir.join("ferry.toml"), config).unwrap();
    let (config, data, env_file) = (dir.join("ferry.toml"), dir.join("data"), dir.join("default-env.json"));
    let args = [
        OsStr::new("up"),
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("--data-dir"),
        data.as_os_str(),
        OsStr::new("--env-file"),
        env_file.as_os_str(),
    ];
    let child =
        FerryProcess::start(env!("CARGO_BIN_EXE_ferry"), &args, &[("FERRY_LOG", "warn,ferry::audit=info")], false);
    let vcap = child.vcap.clone().expect("VCAP_SERVICES line");
    (child, vcap)
}

/// `ferry connect <destination>` on a free port, reading `dir/default-env.json`; returns the
/// process and the address it listens on.
pub fn ferry_connect(dir: &Path, destination: &str, extra: &[&str]) -> (FerryProcess, SocketAddr) {
    ferry_connect_with(dir, destination, extra, false)
}

/// [`ferry_connect`], collecting stderr when `capture_stderr`.
pub fn ferry_connect_with(
    dir: &Path,
    destination: &str,
    extra: &[&str],
    capture_stderr: bool,
) -> (FerryProcess, SocketAddr) {
    let env_file = dir.join("default-env.json");
    let mut args = vec![
        OsStr::new("connect"),
        OsStr::new(destination),
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--env-file"),
        env_file.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let child = FerryProcess::start(env!("CARGO_BIN_EXE_ferry"), &args, &[("FERRY_LOG", "info")], capture_stderr);
    let addr = child
        .banner
        .iter()
        .find_map(|l| l.strip_prefix("listening on "))
        .unwrap_or_else(|| panic!("no 'listening on' line in {:?}", child.banner))
        .parse()
        .unwrap();
    (child, addr)
}

/// A client-credentials token of a binding's `credentials`.
pub async fn token(creds: &Value) -> String {
    let http = ferry_core::tls::http_client(None).unwrap();
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", creds["clientid"].as_str().unwrap()),
        ("client_secret", creds["clientsecret"].as_str().unwrap()),
    ];
    let r: Value = http
        .post(format!("{}/oauth/token", creds["url"].as_str().unwrap()))
        .form(&form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["access_token"].as_str().unwrap().to_owned()
}

/// The SOCKS5 port of the connectivity binding.
pub fn socks_addr(vcap: &Value) -> String {
    let c = &vcap["connectivity"][0]["credentials"];
    format!("{}:{}", c["onpremise_proxy_host"].as_str().unwrap(), c["onpremise_socks5_proxy_port"].as_str().unwrap())
}

/// Runs a command (off the async threads), returning its output; panics with stderr when it fails.
pub async fn run_ok(mut cmd: Command) -> String {
    let shown = format!("{cmd:?}");
    let out: Output = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().expect("cannot run command");
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every line of the connector audit logs under `data/audit`.
pub fn audit_lines(dir: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.join("data").join("audit")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    out
}

/// An HTTP backend that reports each request and answers it only when the test says so.
pub async fn held_backend() -> (u16, tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<()>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::io::AsyncReadExt::read(&mut s, &mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let (release, released) = tokio::sync::oneshot::channel();
                let _ = tx.send(release).await;
                let _ = released.await;
                let _ = tokio::io::AsyncWriteExt::write_all(
                    &mut s,
                    b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\ndone",
                )
                .await;
            });
        }
    });
    (port, rx)
}

/// A TCP echo server.
pub async fn tcp_echo() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}
