#![allow(clippy::unwrap_used, clippy::expect_used)]
//! SAP's onboarding of a subaccount with the subaccount user's credentials, against a real
//! `ferry up`: the connector admin API takes `cloudUser`/`cloudPassword`, has the directory sign
//! a CSR for a key that never leaves the connector, connects with that certificate, and keeps
//! the credentials nowhere.

mod common;

use serde_json::{Value, json};

#[tokio::test]
async fn a_subaccount_added_with_the_subaccount_user_gets_its_certificate_and_connects() {
    ferry_core::init_crypto();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = format!(
        "{}[[users]]\nusername = \"alice\"\npassword = \"alice-onboarding-pw\"\n\n[[connectors]]\nlocation_id = \"lab\"\n",
        common::LISTEN_ANY.replace("tunnel_port = 0\n", "tunnel_port = 0\nconnector_admin_port = 0\n")
    );
    let (mut up, _vcap) = common::ferry_up(dir, &config);
    let banner = |what: &str| up.banner.iter().find(|l| l.contains(what)).cloned().expect(what);
    let conf = banner("connector admin API").split_whitespace().nth(3).unwrap().to_owned();
    let base = conf.trim_end_matches("/api/v1/configuration").to_owned();
    let token_https = banner("(HTTPS: https://");
    let region = token_https.rsplit("https://").next().unwrap().trim_end_matches(')').to_owned();
    let ca = std::fs::read_to_string(dir.join("data").join("connector").join("ui-ca.pem")).unwrap();
    let http = ferry_core::tls::http_client(Some(&ca)).unwrap();
    let pw = "admin password 1";
    let r = http
        .put(format!("{conf}/connector/authentication/basic"))
        .basic_auth("Administrator", Some("manage"))
        .json(&json!({"oldPassword": "manage", "newPassword": pw}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut r = http.request(method, format!("{base}{path}")).basic_auth("Administrator", Some(pw));
        if let Some(b) = body {
            r = r.json(&b);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // The subaccount `ferry up` enrolled itself: removed, then added back by its user.
    let (_, subs) = call(reqwest::Method::GET, "/api/v1/configuration/subaccounts", None).await;
    let (tunnel, subaccount) =
        (subs[0]["regionHost"].as_str().unwrap().to_owned(), subs[0]["subaccount"].as_str().unwrap().to_owned());
    let (s, _) =
        call(reqwest::Method::DELETE, &format!("/api/v1/configuration/subaccounts/{tunnel}/{subaccount}"), None).await;
    assert_eq!(s, 204);

    let add = |password: &str| {
        json!({"regionHost": region, "subaccount": subaccount, "locationID": "lab", "cloudUser": "alice",
               "cloudPassword": password, "displayName": "by credentials"})
    };
    let (s, b) = call(reqwest::Method::POST, "/api/v1/configuration/subaccounts", Some(add("wrong password"))).await;
    assert_eq!(s, 400, "{b}");
    assert!(b["message"].as_str().unwrap().contains("refused the subaccount user"), "{b}");
    let (s, b) =
        call(reqwest::Method::POST, "/api/v1/configuration/subaccounts", Some(json!({"cloudUser": "alice"}))).await;
    assert_eq!(s, 400, "{b}");
    let mut wrong_sub = add("alice-onboarding-pw");
    wrong_sub["subaccount"] = json!("no-such-subaccount");
    let (s, b) = call(reqwest::Method::POST, "/api/v1/configuration/subaccounts", Some(wrong_sub)).await;
    assert_eq!(s, 400, "an unknown subaccount is refused like a wrong password: {b}");

    let (s, b) =
        call(reqwest::Method::POST, "/api/v1/configuration/subaccounts", Some(add("alice-onboarding-pw"))).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!((b["regionHost"].as_str(), b["locationID"].as_str()), (Some(tunnel.as_str()), Some("lab")), "{b}");
    assert_eq!(b["autoCertRenewal"], true, "the directory named its renewal endpoint: {b}");
    ferry_testkit::eventually!("the tunnel is up with the signed certificate", {
        let (_, mon) = call(reqwest::Method::GET, "/api/monitoring/subaccounts", None).await;
        mon["subaccounts"][0]["tunnel"]["state"] == "Connected"
    });

    // The user's password is nowhere on disk: not in the configuration, not in the audit log.
    for entry in walk(&dir.join("data")) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(b"alice-onboarding-pw".len()).any(|w| w == b"alice-onboarding-pw"),
            "{} holds the subaccount user's password",
            entry.display()
        );
    }
    assert_eq!(up.terminate().code(), Some(0));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}
