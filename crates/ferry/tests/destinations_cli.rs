#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `ferry destinations|fragments|certificates` against a real `ferry up` (port 0, temp folder),
//! connected through the `default-env.json` that `ferry up` writes, as a user would run it.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use ferry_testkit::process::FerryProcess;
use serde_json::{Value, json};

struct Run {
    ok: bool,
    code: Option<i32>,
    out: String,
    err: String,
}

fn ferry(env_file: &Path, cwd: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .arg("--env-file")
        .arg(env_file)
        .current_dir(cwd)
        .env("FERRY_LOG", "warn")
        .env_remove("VCAP_SERVICES")
        .env_remove("FERRY_CA_FILE")
        .output()
        .unwrap();
    Run {
        ok: out.status.success(),
        code: out.status.code(),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(env_file: &Path, cwd: &Path, args: &[&str]) -> String {
    let r = ferry(env_file, cwd, args);
    assert!(r.ok, "ferry {args:?} failed:\n{}\n{}", r.out, r.err);
    r.out
}

fn json_of(env_file: &Path, cwd: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let out = ok(env_file, cwd, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ferry {args:?} printed no JSON ({e}): {out}"))
}

#[test]
fn destinations_cli_round_trips_through_a_running_service() {
    let dir = std::env::temp_dir().join(format!("ferry-dest-cli-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = "[listen]\ntoken_port = 0\ntoken_https_port = 0\ndestination_port = 0\nhttp_proxy_port = 0\n\
                  socks5_port = 0\ntunnel_port = 0\n";
    std::fs::write(dir.join("ferry.toml"), config).unwrap();
    let (config, data, env) = (dir.join("ferry.toml"), dir.join("data"), dir.join("default-env.json"));
    let args = [
        OsStr::new("up"),
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("--data-dir"),
        data.as_os_str(),
        OsStr::new("--env-file"),
        env.as_os_str(),
    ];
    let _up = FerryProcess::start(env!("CARGO_BIN_EXE_ferry"), &args, &[("FERRY_LOG", "warn")], false);
    let env = env.as_path();
    let cwd = dir.as_path();

    // Create from a JSON file.
    let original = json!({
        "Name": "erp", "Type": "HTTP", "URL": "https://erp.example.org:8443/sap", "ProxyType": "Internet",
        "Authentication": "BasicAuthentication", "User": "ALICE", "Password": "s3cret:with=odd#chars",
        "Description": "Großhandel", "URL.headers.X-Tenant": "t1"
    });
    std::fs::write(dir.join("erp.json"), original.to_string()).unwrap();
    let out = ok(env, cwd, &["destinations", "create", "--file", dir.join("erp.json").to_str().unwrap()]);
    assert_eq!(out.trim(), "created destination erp");
    ok(env, cwd, &["destinations", "create", "--set", "Name=tcp1", "--set", "Type=TCP", "--set", "Address=db:5432"]);

    // List: a table for people, JSON for scripts; never a secret.
    let table = ok(env, cwd, &["destinations", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAME") && lines[0].contains("AUTHENTICATION"), "{table}");
    assert!(lines.iter().any(|l| l.starts_with("erp ") && l.contains("https://erp.example.org:8443/sap")), "{table}");
    assert!(lines.iter().any(|l| l.starts_with("tcp1") && l.contains("db:5432")), "{table}");
    assert!(!table.contains("s3cret"), "{table}");
    let list = json_of(env, cwd, &["destinations", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert!(!list.to_string().contains("s3cret"), "{list}");

    // Get: secrets masked unless asked for.
    let shown = ok(env, cwd, &["destinations", "get", "erp"]);
    assert!(shown.contains("Password") && shown.contains("***") && !shown.contains("s3cret"), "{shown}");
    assert_eq!(json_of(env, cwd, &["destinations", "get", "erp", "--show-secrets"]), original);

    // Update with --set keeps the other properties, secrets included.
    ok(
        env,
        cwd,
        &["destinations", "update", "erp", "--set", "Description=geändert", "--unset", "URL.headers.X-Tenant"],
    );
    let mut updated = original.clone();
    updated["Description"] = json!("geändert");
    updated.as_object_mut().unwrap().remove("URL.headers.X-Tenant");
    let got = json_of(env, cwd, &["destinations", "get", "erp", "--show-secrets"]);
    assert_eq!(got, updated);

    // Export (both formats) → delete → import → the same destinations, secrets included.
    let props_file = dir.join("erp.properties");
    ok(env, cwd, &["destinations", "export", "erp", "--format", "properties", "--out", props_file.to_str().unwrap()]);
    let text = std::fs::read_to_string(&props_file).unwrap();
    assert!(text.contains("URL=https\\://erp.example.org\\:8443/sap\n") && text.contains("ge\\u00E4ndert"), "{text}");
    let all_json = dir.join("all.json");
    ok(env, cwd, &["destinations", "export", "--out", all_json.to_str().unwrap()]);
    let exported: Value = serde_json::from_str(&std::fs::read_to_string(&all_json).unwrap()).unwrap();
    assert_eq!(exported.as_array().unwrap().len(), 2);
    assert!(exported.to_string().contains("s3cret"), "exports keep secrets: {exported}");
    let out = ok(env, cwd, &["destinations", "delete", "erp", "tcp1"]);
    assert!(out.contains("deleted destination erp") && out.contains("deleted destination tcp1"), "{out}");
    let gone = ferry(env, cwd, &["destinations", "get", "erp"]);
    assert_eq!(gone.code, Some(1));
    assert!(gone.err.contains("was not found") && gone.err.contains("ferry destinations list"), "{}", gone.err);

    ok(env, cwd, &["destinations", "import", props_file.to_str().unwrap()]);
    assert_eq!(json_of(env, cwd, &["destinations", "get", "erp", "--show-secrets"]), updated);
    // The JSON export again: erp exists now, so without --overwrite that one fails, named.
    let r = ferry(env, cwd, &["destinations", "import", all_json.to_str().unwrap()]);
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("destination 'erp'") && r.err.contains("--overwrite"), "{}", r.err);
    ok(env, cwd, &["destinations", "import", "--overwrite", all_json.to_str().unwrap()]);
    assert_eq!(json_of(env, cwd, &["destinations", "get", "tcp1"])["Address"], "db:5432");

    // A validation error names the property and the rule; exit code 1.
    let r = ferry(
        env,
        cwd,
        &[
            "destinations",
            "create",
            "--set",
            "Name=bad",
            "--set",
            "Type=HTTP",
            "--set",
            "URL=https://x",
            "--set",
            "Authentication=OAuth2ClientCredentials",
            "--set",
            "clientId=c",
        ],
    );
    assert_eq!(r.code, Some(1), "{}", r.err);
    assert!(
        r.err.contains("property 'tokenServiceURL' is required for Authentication 'OAuth2ClientCredentials'"),
        "{}",
        r.err
    );
    assert!(r.err.contains("400") && r.err.contains("hint:"), "{}", r.err);

    // Instance level is a separate namespace.
    assert_eq!(json_of(env, cwd, &["destinations", "list", "--level", "instance"]), json!([]));

    // Fragments.
    ok(
        env,
        cwd,
        &["fragments", "create", "--set", "FragmentName=creds", "--set", "clientSecret=cs", "--set", "clientId=c"],
    );
    let frag = ok(env, cwd, &["fragments", "list"]);
    assert!(frag.contains("creds") && frag.contains("clientId") && !frag.contains("clientSecret"), "{frag}");
    ok(env, cwd, &["fragments", "update", "creds", "--set", "scope=s1"]);
    let f = json_of(env, cwd, &["fragments", "get", "creds"]);
    assert_eq!(f, json!({"FragmentName": "creds", "clientSecret": "***", "clientId": "c", "scope": "s1"}));
    ok(env, cwd, &["fragments", "delete", "creds"]);

    // Certificates: upload a file, read it back byte for byte.
    let pem = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";
    std::fs::write(dir.join("trust.pem"), pem).unwrap();
    ok(env, cwd, &["certificates", "create", "--file", dir.join("trust.pem").to_str().unwrap()]);
    let certs = ok(env, cwd, &["certificates", "list"]);
    assert!(certs.contains("trust.pem") && certs.contains("PEM"), "{certs}");
    let back = dir.join("back.pem");
    ok(env, cwd, &["certificates", "get", "trust.pem", "--out", back.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&back).unwrap(), pem);
    ok(env, cwd, &["certificates", "delete", "trust.pem"]);
    // A certificate the service generates: its attributes without the password, its public key.
    let r = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["certificates", "generate", "--name", "gen.pem", "--cn", "cli-app", "--validity", "90d"])
        .args(["--auto-renew", "--password-env", "GEN_PW", "--env-file", env.to_str().unwrap()])
        .current_dir(cwd)
        .env("GEN_PW", "from-the-env")
        .env("FERRY_LOG", "warn")
        .env_remove("VCAP_SERVICES")
        .env_remove("FERRY_CA_FILE")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let g = json_of(env, cwd, &["certificates", "get", "gen.pem"]);
    assert_eq!((&g["Attributes.CN"], &g["Attributes.AutomaticRenew"]), (&json!("cli-app"), &json!("true")), "{g}");
    assert!(!g.to_string().contains("from-the-env"), "{g}");
    let keys = ok(env, cwd, &["certificates", "public-keys", "gen.pem"]);
    assert!(keys.starts_with("# CN=cli-app\n-----BEGIN CERTIFICATE-----") && !keys.contains("PRIVATE"), "{keys}");
    let bad = ferry(env, cwd, &["certificates", "generate", "--name", "x.pem", "--cn", "x", "--validity", "3w"]);
    assert!(!bad.ok && bad.err.contains("30d, 6m or 1y"), "{}", bad.err);
    let bad = ferry(env, cwd, &["certificates", "generate", "--name", "x.pem", "--cn", "x", "--validity", "11y"]);
    assert!(!bad.ok && bad.err.contains("between 1 and 10"), "{}", bad.err);

    // No binding at all: says what to pass.
    let r = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["destinations", "list"])
        .current_dir(dir.join("data"))
        .env_remove("VCAP_SERVICES")
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("--service-key") && err.contains("--env-file"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
