#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `ferry up` with an `[ldap]` section against a real slapd (`ferry_testkit::slapd`): a
//! directory user gets a token from the xsuaa binding, with a group as scope, and the service
//! account's password shows up neither in the output nor in the debug logs.

use std::ffi::OsStr;

use ferry_testkit::process::FerryProcess;
use ferry_testkit::slapd::{READER_DN, READER_PW, SUFFIX, Slapd};
use serde_json::Value;

#[tokio::test]
async fn ferry_up_logs_in_ldap_users() {
    ferry_core::init_crypto();
    let slapd = Slapd::start(&format!(
        "dn: uid=carol,ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: carol\ncn: Carol Clark\n\
         givenName: Carol\nsn: Clark\nmail: carol@ferry.test\nuserPassword: carol-pw\n\n\
         dn: cn=Display,ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: Display\n\
         member: uid=carol,ou=people,{SUFFIX}\n"
    ));
    let dir = std::env::temp_dir().join(format!("ferry-up-ldap-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        r#"
[listen]
token_port = 0
token_https_port = 0
destination_port = 0
http_proxy_port = 0
socks5_port = 0
tunnel_port = 0

[ldap]
url = "{}"
bind_dn = "{READER_DN}"
bind_password = "{READER_PW}"
base_dn = "ou=people,{SUFFIX}"
group_base_dn = "ou=groups,{SUFFIX}"
"#,
        slapd.url
    );
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
    let child = FerryProcess::start(env!("CARGO_BIN_EXE_ferry"), &args, &[("FERRY_LOG", "trace")], true);
    let vcap = child.vcap.clone().expect("VCAP_SERVICES line");
    let xsuaa = &vcap["xsuaa"][0]["credentials"];
    let http = ferry_core::tls::http_client(None).unwrap();
    let login = |user: &'static str, pw: &'static str| {
        let form = [
            ("grant_type", "password".to_owned()),
            ("client_id", xsuaa["clientid"].as_str().unwrap().to_owned()),
            ("client_secret", xsuaa["clientsecret"].as_str().unwrap().to_owned()),
            ("username", user.to_owned()),
            ("password", pw.to_owned()),
        ];
        let req = http.post(format!("{}/oauth/token", xsuaa["url"].as_str().unwrap())).form(&form);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = login("carol", "carol-pw").await;
    assert_eq!(status, 200, "{body}");
    let jwt = body["access_token"].as_str().unwrap();
    use base64::Engine as _;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(jwt.split('.').nth(1).unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(claims["user_name"], "carol");
    assert_eq!(claims["email"], "carol@ferry.test");
    let xsappname = xsuaa["xsappname"].as_str().unwrap();
    let mut scopes: Vec<&str> = claims["scope"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    scopes.sort();
    assert_eq!(scopes, [format!("{xsappname}.Display").as_str(), "openid"]);
    let (status, body) = login("carol", "wrong").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")));
    drop(slapd);
    let (status, body) = login("carol", "carol-pw").await;
    assert_eq!((status, body["error"].as_str()), (503, Some("temporarily_unavailable")), "{body}");

    // Stop, then read everything that was printed and logged.
    let (printed, logs) = child.kill_and_collect();
    assert!(printed.contains("LDAP users"), "{printed}");
    assert!(logs.contains("user store unavailable"), "debug logs were captured: {logs}");
    for text in [&printed, &logs] {
        assert!(!text.contains(READER_PW), "the service password leaked: {text}");
        assert!(!text.contains("carol-pw"), "a user password leaked: {text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
