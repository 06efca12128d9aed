#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A tunnel that silently loses packets. The proxy side (`ferry up` for identity, a `ferry proxy`
//! replica, the app as curl) runs in one network namespace, the connector and its backend in
//! another; a veth pair joins them, both ends inside the namespaces, which have no default route,
//! so nothing can leave them. Mid-stream an nftables rule in the connector's namespace drops every
//! packet on the veth (no RST, no ICMP: silent loss). The tunnel heartbeat must notice: the app's
//! stream fails (instead of hanging), new requests get the proxy's 503 "no connector", and once
//! the rule is gone the connector reconnects by itself. File descriptors of both processes return
//! to their baseline and memory stays near it.
//!
//! Needs root (CAP_NET_ADMIN): without it the test says so on stderr and returns.

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::process::FerryProcess;
use serde_json::Value;

const PROXY_IP: &str = "169.254.77.1";
const CONNECTOR_IP: &str = "169.254.77.2";
const TUNNEL_PORT: u16 = 20445;
const HTTP_PORT: u16 = 20443;
const BACKEND_PORT: u16 = 8080;
const HEARTBEAT_SECONDS: u64 = 2;

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program} {args:?}: {e}"))
}

fn must(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces joined by a veth pair; deleted (with the veth) when dropped.
struct Namespaces {
    proxy: String,
    connector: String,
    veth_connector: String,
}

impl Namespaces {
    /// `None` when this process may not create namespaces (not root, no CAP_NET_ADMIN).
    fn create() -> Option<Self> {
        let id = std::process::id();
        let (proxy, connector) = (format!("ferry-p-{id}"), format!("ferry-c-{id}"));
        let out = run("ip", &["netns", "add", &proxy]);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("Operation not permitted") || err.contains("Permission denied"),
                "ip netns add failed for another reason than permissions: {err}"
            );
            return None;
        }
        must("ip", &["netns", "add", &connector]);
        let me = Self { proxy, connector, veth_connector: format!("fc{id}") };
        let veth_proxy = format!("fp{id}");
        // Both ends are created inside the namespaces: the root namespace never sees them.
        must(
            "ip",
            &[
                "link",
                "add",
                &veth_proxy,
                "netns",
                &me.proxy,
                "type",
                "veth",
                "peer",
                "name",
                &me.veth_connector,
                "netns",
                &me.connector,
            ],
        );
        for (ns, dev, ip) in [(&me.proxy, &veth_proxy, PROXY_IP), (&me.connector, &me.veth_connector, CONNECTOR_IP)] {
            must("ip", &["-n", ns, "addr", "add", &format!("{ip}/30"), "dev", dev]);
            must("ip", &["-n", ns, "link", "set", dev, "up"]);
            must("ip", &["-n", ns, "link", "set", "lo", "up"]);
            let routes = must("ip", &["-n", ns, "route", "show", "default"]);
            assert!(routes.trim().is_empty(), "namespace {ns} must have no default route: {routes}");
        }
        Some(me)
    }

    fn exec_args<'a>(ns: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["netns", "exec", ns];
        all.extend_from_slice(args);
        all
    }

    /// Starts a process that prints `ready` inside `ns`.
    fn start(ns: &str, args: &[&str]) -> FerryProcess {
        FerryProcess::start("ip", &Self::exec_args(ns, args), &[("FERRY_LOG", "warn")], false)
    }

    /// Drops every packet on the connector's veth, both ways, without any answer.
    fn lose_packets(&self, on: bool) {
        if on {
            let dev = &self.veth_connector;
            let rules = format!(
                "table inet ferry_loss {{\n chain in {{ type filter hook input priority 0; iifname \"{dev}\" drop; }}\n \
                 chain out {{ type filter hook output priority 0; oifname \"{dev}\" drop; }}\n}}\n"
            );
            let mut nft = Command::new("ip")
                .args(["netns", "exec", &self.connector, "nft", "-f", "-"])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write as _;
            nft.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
            assert!(nft.wait().unwrap().success(), "nft rules not loaded");
        } else {
            must("ip", &["netns", "exec", &self.connector, "nft", "delete", "table", "inet", "ferry_loss"]);
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it and with it the pair.
        let _ = run("ip", &["netns", "del", &self.proxy]);
        let _ = run("ip", &["netns", "del", &self.connector]);
    }
}

/// Answers `GET /api/ok` with a short body and `GET /api/stream` with a line every 100 ms,
/// forever, as a chunked response.
const BACKEND: &str = r#"
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/api/ok":
            body = b"ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:
                line = b"tick %f\n" % time.time()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("ready", flush=True)
s.serve_forever()
"#;

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// curl inside the proxy's namespace through the proxy; returns the HTTP status (0 when none).
fn status_through(ns: &str, token: &str, path: &str) -> u16 {
    let proxy = format!("http://127.0.0.1:{HTTP_PORT}");
    let auth = format!("Proxy-Authorization: Bearer {token}");
    let url = format!("http://plant.virtual:8000{path}");
    let out = run(
        "ip",
        &Namespaces::exec_args(
            ns,
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "30",
                "-x",
                &proxy,
                "-H",
                &auth,
                "-H",
                "SAP-Connectivity-SCC-Location_ID: plant",
                &url,
            ],
        ),
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn silent_packet_loss_on_the_tunnel_fails_streams_promptly_and_the_connector_comes_back() {
    let Some(ns) = Namespaces::create() else {
        eprintln!(
            "SKIPPED silent_packet_loss_on_the_tunnel: creating network namespaces needs root (CAP_NET_ADMIN); \
             run the test as root to check tunnel loss"
        );
        return;
    };
    let ferry = env!("CARGO_BIN_EXE_ferry");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // Identity: `ferry up` in the proxy's namespace (its own proxy is not used).
    std::fs::write(dir.join("ferry.toml"), common::LISTEN_ANY).unwrap();
    let (cfg, data, env_file) = (dir.join("ferry.toml"), dir.join("data"), dir.join("default-env.json"));
    let up = Namespaces::start(
        &ns.proxy,
        &[
            ferry,
            "up",
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--env-file",
            env_file.to_str().unwrap(),
        ],
    );
    let vcap = up.vcap.clone().expect("VCAP_SERVICES line");
    let conn = &vcap["connectivity"][0]["credentials"];
    let token_url = conn["url"].as_str().unwrap().to_owned();
    let subaccount = conn["tenantid"].as_str().unwrap().to_owned();

    let scc = dir.join("scc");
    must(
        "ip",
        &Namespaces::exec_args(
            &ns.proxy,
            &[
                ferry,
                "connector",
                "enroll",
                "--subaccount",
                &subaccount,
                "--location",
                "plant",
                "--url",
                &token_url,
                "--data-dir",
                data.to_str().unwrap(),
                "--out",
                scc.to_str().unwrap(),
            ],
        ),
    );

    // The proxy replica, its tunnel endpoint on the veth.
    let ca = ferry_core::tls::LocalCa::from_pem(
        &std::fs::read_to_string(data.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(data.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let server = ca.issue_server_cert(&[PROXY_IP]).unwrap();
    std::fs::write(dir.join("proxy.pem"), &server.cert_pem).unwrap();
    std::fs::write(dir.join("proxy-key.pem"), server.key_pem.expose()).unwrap();
    std::fs::write(
        dir.join("proxy.toml"),
        format!(
            "host = \"0.0.0.0\"\nhttp_port = {HTTP_PORT}\nsocks5_port = {}\ntunnel_port = {TUNNEL_PORT}\n\
             certificate_file = \"proxy.pem\"\nkey_file = \"proxy-key.pem\"\nconnector_ca_file = \"data/ca.pem\"\n\
             token_keys_urls = [\"{token_url}/token_keys?zid={subaccount}\"]\nheartbeat_seconds = {HEARTBEAT_SECONDS}\n",
            HTTP_PORT + 1
        ),
    )
    .unwrap();
    let proxy = Namespaces::start(&ns.proxy, &[ferry, "proxy", "--config", dir.join("proxy.toml").to_str().unwrap()]);

    // The backend and the connector in the other namespace.
    let _backend = Namespaces::start(&ns.connector, &["/usr/bin/python3", "-c", BACKEND, &BACKEND_PORT.to_string()]);
    std::fs::write(
        scc.join("connector.toml"),
        format!(
            "proxies = [\"{PROXY_IP}:{TUNNEL_PORT}\"]\nserver_name = \"{PROXY_IP}\"\nca_file = \"ca.pem\"\n\
             certificate_file = \"connector.pem\"\nkey_file = \"connector-key.pem\"\n\
             heartbeat_seconds = {HEARTBEAT_SECONDS}\nbackoff_max_seconds = 2\n\n\
             [[mappings]]\nvirtualHost = \"plant.virtual\"\nvirtualPort = 8000\nlocalHost = \"127.0.0.1\"\n\
             localPort = {BACKEND_PORT}\nprotocol = \"HTTP\"\nresources = [{{ path = \"/api\", exactMatchOnly = false }}]\n"
        ),
    )
    .unwrap();
    let connector = Namespaces::start(
        &ns.connector,
        &[ferry, "connector", "run", "--config", scc.join("connector.toml").to_str().unwrap()],
    );

    let form_id = format!("client_id={}", conn["clientid"].as_str().unwrap());
    let form_secret = format!("client_secret={}", conn["clientsecret"].as_str().unwrap());
    let token_endpoint = format!("{token_url}/oauth/token");
    let body = must(
        "ip",
        &Namespaces::exec_args(
            &ns.proxy,
            &[
                "curl",
                "-sS",
                "--data-urlencode",
                "grant_type=client_credentials",
                "--data-urlencode",
                &form_id,
                "--data-urlencode",
                &form_secret,
                &token_endpoint,
            ],
        ),
    );
    let token = serde_json::from_str::<Value>(&body).unwrap()["access_token"].as_str().unwrap().to_owned();

    wait_for("the connector's tunnel serves requests", Duration::from_secs(60), || {
        status_through(&ns.proxy, &token, "/api/ok") == 200
    });
    // Warm up (connection pools, token cache), then take the baseline.
    for _ in 0..5 {
        assert_eq!(status_through(&ns.proxy, &token, "/api/ok"), 200);
    }
    std::thread::sleep(Duration::from_secs(1));
    let pids = [("proxy", proxy.id()), ("connector", connector.id())];
    let baseline: Vec<(usize, u64)> = pids.iter().map(|(_, p)| (fd_count(*p), rss_kib(*p))).collect();

    // A long stream, cut by silent loss once bytes flow.
    let out_file = dir.join("stream.out");
    let proxy_url = format!("http://127.0.0.1:{HTTP_PORT}");
    let auth = format!("Proxy-Authorization: Bearer {token}");
    let mut stream: Child = Command::new("ip")
        .args(Namespaces::exec_args(
            &ns.proxy,
            &[
                "curl",
                "-sS",
                "-N",
                "-o",
                out_file.to_str().unwrap(),
                "-x",
                &proxy_url,
                "-H",
                &auth,
                "-H",
                "SAP-Connectivity-SCC-Location_ID: plant",
                "http://plant.virtual:8000/api/stream",
            ],
        ))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the stream delivers bytes", Duration::from_secs(30), || {
        std::fs::metadata(&out_file).map(|m| m.len() > 100).unwrap_or(false)
    });
    ns.lose_packets(true);
    let cut = Instant::now();

    // The stream must end with an error, not hang: 30 heartbeats is the hang bound.
    let limit = Duration::from_secs(30 * HEARTBEAT_SECONDS);
    let status = loop {
        if let Some(s) = stream.try_wait().unwrap() {
            break s;
        }
        if cut.elapsed() > limit {
            let _ = stream.kill();
            panic!("the stream through the lossy tunnel still hangs after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let failed_after = cut.elapsed();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut stream.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "curl must report the cut stream as an error, got {status}");
    // curl 18: "transfer closed with outstanding read data remaining" (the chunked body ended
    // without its last chunk), 56: receive failure.
    assert!(
        matches!(status.code(), Some(18) | Some(56)),
        "curl exit {status}: {err} (expected an incomplete transfer)"
    );
    eprintln!("stream failed {failed_after:?} after the loss began (heartbeat {HEARTBEAT_SECONDS} s): {}", err.trim());

    // While packets are lost the proxy has no tunnel for the location: a new request gets the
    // proxy's own 503 at once, not a hang.
    wait_for("503 while the tunnel is down", Duration::from_secs(30 * HEARTBEAT_SECONDS), || {
        status_through(&ns.proxy, &token, "/api/ok") == 503
    });

    ns.lose_packets(false);
    wait_for("the connector reconnects once packets flow again", Duration::from_secs(60), || {
        status_through(&ns.proxy, &token, "/api/ok") == 200
    });
    eprintln!("recovered {:?} after the loss began", cut.elapsed());

    // Nothing leaks: descriptors back to the baseline (the dead tunnel's socket, the cut
    // stream's connections are closed); memory near it.
    for ((name, pid), (fds, rss)) in pids.iter().zip(&baseline) {
        wait_for(&format!("{name}: fds back to the baseline of {fds}"), Duration::from_secs(30), || {
            fd_count(*pid) <= *fds
        });
        let now = rss_kib(*pid);
        assert!(now <= rss + 32 * 1024, "{name}: RSS {now} KiB, baseline {rss} KiB");
        eprintln!("{name}: fds {} (baseline {fds}), RSS {now} KiB (baseline {rss} KiB)", fd_count(*pid));
    }
    drop(connector);
    drop(proxy);
    drop(up);
}
