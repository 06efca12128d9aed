//! TLS to a real PostgreSQL with `ssl=on` that turns away connections without it: each
//! `sslmode`, certificate and name checks, SCRAM with channel binding, client certificates.

use std::sync::OnceLock;

use ferry_core::Secret;
use ferry_core::tls::LocalCa;
use ferry_testkit::postgres::{Options, Postgres};
use serde_json::json;

use super::{Env, config};
use crate::DatabaseConfig;

/// The server, the files a URL points at, and its port.
struct Server {
    pg: Postgres,
    files: tempfile::TempDir,
}

const SCRAM_PASSWORD: &str = "scram-pw-5e1d";

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let ca = LocalCa::generate("pg test CA").unwrap();
        // Only the name, not the address: connecting to 127.0.0.1 is a name mismatch.
        let cert = ca.issue_server_cert(&["localhost"]).unwrap();
        let hba = "local all all trust\n\
                   hostssl all ferry 127.0.0.1/32 trust\n\
                   hostssl all scram 127.0.0.1/32 scram-sha-256\n\
                   hostssl all certuser 127.0.0.1/32 cert\n\
                   host all all 127.0.0.1/32 reject\n";
        let pg = Postgres::start_with(&Options {
            tls: Some((cert.cert_pem.clone(), cert.key_pem.expose().clone())),
            client_ca: Some(ca.cert_pem().to_owned()),
            hba: Some(hba.into()),
        });
        pg.sql(&format!("CREATE ROLE scram LOGIN PASSWORD '{SCRAM_PASSWORD}'"));
        pg.sql("CREATE ROLE certuser LOGIN");
        let files = tempfile::tempdir().unwrap();
        std::fs::write(files.path().join("ca.pem"), ca.cert_pem()).unwrap();
        let other = LocalCa::generate("another CA").unwrap();
        std::fs::write(files.path().join("other-ca.pem"), other.cert_pem()).unwrap();
        let client = ca.issue_user_cert(&[("CN".into(), "certuser".into())], time::Duration::hours(1)).unwrap();
        std::fs::write(files.path().join("client.pem"), &client.cert_pem).unwrap();
        std::fs::write(files.path().join("client.key"), client.key_pem.expose()).unwrap();
        Server { pg, files }
    })
}

impl Server {
    fn file(&self, name: &str) -> String {
        self.files.path().join(name).display().to_string()
    }

    /// A fresh database owned by `owner`; its URL as `user` at `host`, with `params`.
    fn url(&self, owner: &str, user_info: &str, host: &str, params: &str) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!("tls{}_{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        self.pg.sql(&format!("CREATE DATABASE {name} OWNER {owner}"));
        format!("postgres://{user_info}@{host}:{}/{name}{params}", self.pg.port)
    }
}

async fn open(url: String) -> Result<Env, crate::Error> {
    Env::try_with_config(config(DatabaseConfig::Postgres { url: Secret::new(url) }, [7; 32])).await
}

/// Stores a destination and finds it again: the database works through this URL.
async fn works(url: String) {
    let env = open(url.clone()).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let t = env.token("zone-tls", "client-tls");
    env.create(
        &t,
        "subaccount",
        json!({"Name": "d", "Type": "HTTP", "URL": "https://d.example", "Authentication": "NoAuthentication"}),
    )
    .await;
    assert_eq!(env.find(&t, "d", &[]).await.status, 200);
}

async fn fails(url: String) -> String {
    match open(url.clone()).await {
        Ok(_) => panic!("{url} connected"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn verify_full_checks_the_chain_and_the_name() {
    let s = server();
    let ca = s.file("ca.pem");
    works(s.url("ferry", "ferry", "localhost", &format!("?sslmode=verify-full&sslrootcert={ca}"))).await;
    // The certificate names localhost, not 127.0.0.1.
    let e = fails(s.url("ferry", "ferry", "127.0.0.1", &format!("?sslmode=verify-full&sslrootcert={ca}"))).await;
    assert!(e.contains("certificate not valid for name \"127.0.0.1\""), "{e}");
    let other = s.file("other-ca.pem");
    let e = fails(s.url("ferry", "ferry", "localhost", &format!("?sslmode=verify-full&sslrootcert={other}"))).await;
    assert!(e.contains("UnknownIssuer"), "{e}");
    // The key=value form, as libpq takes it.
    let url = s.url("ferry", "ferry", "localhost", "");
    let db = url.rsplit('/').next().unwrap();
    works(format!("host=localhost port={} user=ferry dbname={db} sslmode=verify-full sslrootcert='{ca}'", s.pg.port))
        .await;
}

#[tokio::test]
async fn verify_ca_checks_the_chain_only() {
    let s = server();
    let ca = s.file("ca.pem");
    works(s.url("ferry", "ferry", "127.0.0.1", &format!("?sslmode=verify-ca&sslrootcert={ca}"))).await;
    let other = s.file("other-ca.pem");
    let e = fails(s.url("ferry", "ferry", "127.0.0.1", &format!("?sslmode=verify-ca&sslrootcert={other}"))).await;
    assert!(e.contains("UnknownIssuer"), "{e}");
    // libpq's rule: require with a root certificate checks the chain as verify-ca does.
    let e = fails(s.url("ferry", "ferry", "127.0.0.1", &format!("?sslmode=require&sslrootcert={other}"))).await;
    assert!(e.contains("UnknownIssuer"), "{e}");
}

#[tokio::test]
async fn require_and_the_default_encrypt_and_disable_does_not() {
    let s = server();
    // The server turns away every connection without TLS, so these connecting proves TLS.
    works(s.url("ferry", "ferry", "127.0.0.1", "?sslmode=require")).await;
    works(s.url("ferry", "ferry", "127.0.0.1", "")).await;
    let e = fails(s.url("ferry", "ferry", "127.0.0.1", "?sslmode=disable")).await;
    assert!(e.contains("no encryption") || e.contains("pg_hba.conf"), "{e}");
}

#[tokio::test]
async fn a_unix_socket_goes_without_tls_unless_tls_is_required() {
    let s = server();
    // PostgreSQL offers no TLS on its unix socket: the default (prefer) connects without it,
    // as libpq does, and require refuses.
    let url = s.url("ferry", "ferry", "127.0.0.1", "");
    let db = url.rsplit('/').next().unwrap();
    let dir = s.pg.socket_dir().display().to_string();
    let port = s.pg.port;
    works(format!("postgres:///{db}?host={dir}&port={port}&user=ferry")).await;
    let e = fails(format!("postgres:///{db}?host={dir}&port={port}&user=ferry&sslmode=require")).await;
    assert!(e.contains("server does not support TLS"), "{e}");
}

#[tokio::test]
async fn scram_with_channel_binding_over_tls() {
    let s = server();
    let ca = s.file("ca.pem");
    // channel_binding=require fails unless the tls-server-end-point hash matches the server's.
    works(s.url(
        "scram",
        &format!("scram:{SCRAM_PASSWORD}"),
        "localhost",
        &format!("?sslmode=verify-full&sslrootcert={ca}&channel_binding=require"),
    ))
    .await;
    let e = fails(s.url("scram", "scram:wrong", "localhost", &format!("?sslmode=verify-full&sslrootcert={ca}"))).await;
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(!e.contains("wrong"), "the password is in the error: {e}");
}

#[tokio::test]
async fn client_certificate_authentication() {
    let s = server();
    let (ca, cert, key) = (s.file("ca.pem"), s.file("client.pem"), s.file("client.key"));
    works(s.url(
        "certuser",
        "certuser",
        "localhost",
        &format!("?sslmode=verify-full&sslrootcert={ca}&sslcert={cert}&sslkey={key}"),
    ))
    .await;
    let e = fails(s.url("certuser", "certuser", "localhost", &format!("?sslmode=verify-full&sslrootcert={ca}"))).await;
    assert!(e.contains("certificate"), "{e}");
}
