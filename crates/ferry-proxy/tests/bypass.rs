#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Attempts to reach what the connector's access rules do not grant, sent as raw bytes to the
//! HTTP proxy and carried through the real tunnel and connector to a real nginx. Whatever the
//! proxy or connector answers, nginx's access log must show only the control requests that are
//! allowed: a request that reached nginx is a bypass, whatever status it came back with.

use std::time::Duration;

use ferry_connector::{AccessRules, HostInHeader, Protocol, Resource, SystemMapping};
use ferry_testkit::TunnelPair;
use ferry_testkit::nginx::Nginx;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn resource(path: &str, exact: bool) -> Resource {
    Resource {
        path: path.into(),
        exact_match_only: exact,
        enabled: true,
        websocket_upgrade_allowed: false,
        description: None,
    }
}

/// Sends `raw` on a fresh connection and returns everything the proxy answered until it closed
/// the connection or went quiet.
async fn send_raw(addr: std::net::SocketAddr, raw: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_millis(400), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn no_bypass_attempt_reaches_the_backend() {
    // Every path nginx serves answers with a marker, and every request it sees is logged.
    let nginx = Nginx::start(
        "    listen 127.0.0.1:{PORT};\n    access_log {DIR}/access.log;\n    merge_slashes off;\n\
         location / { return 200 \"reached-nginx $request_uri\\n\"; }",
        &[],
    );
    let pair = TunnelPair::start().await;
    let mapping = SystemMapping {
        virtual_host: "erp.virtual".into(),
        virtual_port: 8080,
        local_host: nginx.addr.ip().to_string(),
        local_port: nginx.addr.port(),
        protocol: Protocol::Http,
        host_in_header: HostInHeader::Virtual,
        authentication_mode: Default::default(),
        principal_certificate_in: Default::default(),
        resources: vec![
            resource("/sap/opu/odata", false),
            resource("/public/exact", true),
            Resource { enabled: false, ..resource("/suspended", false) },
        ],
        description: None,
    };
    pair.connector("", AccessRules::new(vec![mapping]), pair.tunnel_addr);
    pair.wait_connected("").await;
    let auth = format!("Proxy-Authorization: Bearer {}\r\n", pair.token());
    let get = |target: &str, host: &str| format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n");
    let base = "http://erp.virtual:8080";

    let attempts: Vec<(&str, String)> = vec![
        ("dot segments", get(&format!("{base}/sap/opu/odata/../../../admin"), "erp.virtual:8080")),
        ("encoded dot segments", get(&format!("{base}/sap/opu/odata/%2e%2e/%2E%2E/admin"), "erp.virtual:8080")),
        ("double-encoded dots", get(&format!("{base}/sap/opu/odata/%252e%252e/admin"), "erp.virtual:8080")),
        ("encoded slash", get(&format!("{base}/sap/opu/odata%2f..%2f..%2fadmin"), "erp.virtual:8080")),
        ("backslash traversal", get(&format!("{base}/sap/opu/odata\\..\\admin"), "erp.virtual:8080")),
        ("encoded backslash", get(&format!("{base}/sap/opu/odata%5c..%5cadmin"), "erp.virtual:8080")),
        (
            "path parameter dot segment (Tomcat ..;)",
            get(&format!("{base}/sap/opu/odata/..;/admin"), "erp.virtual:8080"),
        ),
        ("overlong UTF-8 dots", get(&format!("{base}/sap/opu/odata/%c0%ae%c0%ae/admin"), "erp.virtual:8080")),
        ("NUL byte", get(&format!("{base}/sap/opu/odata%00/../admin"), "erp.virtual:8080")),
        ("case change", get(&format!("{base}/SAP/opu/odata/x"), "erp.virtual:8080")),
        ("prefix one short", get(&format!("{base}/sap/opu/odat"), "erp.virtual:8080")),
        ("exact-only resource with a sub-path", get(&format!("{base}/public/exact/more"), "erp.virtual:8080")),
        ("suspended resource", get(&format!("{base}/suspended/x"), "erp.virtual:8080")),
        ("double slash", get(&format!("{base}//admin"), "erp.virtual:8080")),
        ("grant in the query only", get(&format!("{base}/admin?/sap/opu/odata"), "erp.virtual:8080")),
        (
            "absolute-form host not mapped, Host header mapped",
            get("http://other.virtual:8080/sap/opu/odata", "erp.virtual:8080"),
        ),
        ("mapped host on another port", get("http://erp.virtual:8081/sap/opu/odata", "erp.virtual:8080")),
        ("userinfo host confusion", get("http://erp.virtual:8080@other.virtual:8080/admin", "erp.virtual:8080")),
        ("origin-form with a mapped Host", get("/admin", "erp.virtual:8080")),
        ("https target on the HTTP proxy", get("https://erp.virtual:8080/admin", "erp.virtual:8080")),
        (
            "CONNECT tunnel to the backend",
            format!("CONNECT erp.virtual:8080 HTTP/1.1\r\nHost: erp.virtual:8080\r\n{auth}\r\n"),
        ),
        ("OPTIONS *", format!("OPTIONS * HTTP/1.1\r\nHost: erp.virtual:8080\r\n{auth}\r\n")),
        (
            "smuggling: Content-Length and Transfer-Encoding",
            format!(
                "POST {base}/sap/opu/odata/x HTTP/1.1\r\nHost: erp.virtual:8080\r\n{auth}Content-Length: 6\r\n\
                 Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET {base}/admin HTTP/1.1\r\nHost: erp.virtual:8080\r\n{auth}\r\n"
            ),
        ),
        (
            "smuggling: obfuscated Transfer-Encoding",
            format!(
                "POST {base}/sap/opu/odata/x HTTP/1.1\r\nHost: erp.virtual:8080\r\n{auth}Content-Length: 4\r\n\
                 Transfer-Encoding: xchunked\r\n\r\n1\r\nZ\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: erp.virtual:8080\r\n\r\n"
            ),
        ),
        (
            "second request on a keep-alive connection to a denied path",
            format!(
                "{}{}",
                get(&format!("{base}/sap/opu/odata/allowed-first"), "erp.virtual:8080"),
                get(&format!("{base}/admin"), "erp.virtual:8080")
            ),
        ),
        ("no token at all", format!("GET {base}/sap/opu/odata/x HTTP/1.1\r\nHost: erp.virtual:8080\r\n\r\n")),
    ];
    assert!(attempts.len() >= 20);
    // Granted targets: the carriers of the smuggling and keep-alive attempts, and the controls.
    const GRANTED: [&str; 4] =
        ["/sap/opu/odata/x", "/sap/opu/odata/allowed-first", "/public/exact", "/sap/opu/odata-plus"];
    for (what, raw) in &attempts {
        let answer = send_raw(pair.http_addr, raw).await;
        for line in answer.lines().filter_map(|l| l.strip_prefix("reached-nginx ")) {
            assert!(GRANTED.contains(&line), "{what}: {line} reached the backend:\n{answer}");
        }
    }

    // Controls: what is granted does reach nginx, so the log is being written.
    for path in ["/sap/opu/odata/x", "/public/exact", "/sap/opu/odata-plus"] {
        let answer = send_raw(pair.http_addr, &get(&format!("{base}{path}"), "erp.virtual:8080")).await;
        assert!(answer.contains(&format!("reached-nginx {path}")), "{path}: {answer}");
    }
    // nginx's own record: every request line it saw names a granted target.
    let log = std::fs::read_to_string(nginx.dir.join("access.log")).unwrap();
    let targets: Vec<&str> =
        log.lines().filter_map(|l| l.split('"').nth(1)).filter_map(|r| r.split(' ').nth(1)).collect();
    for t in &targets {
        assert!(GRANTED.contains(t), "nginx saw {t}:\n{log}");
    }
    for control in ["/sap/opu/odata/x", "/public/exact", "/sap/opu/odata-plus", "/sap/opu/odata/allowed-first"] {
        assert!(targets.contains(&control), "{control} missing from nginx's log:\n{log}");
    }
}
