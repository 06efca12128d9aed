//! The PostgreSQL tables as stored: encryption at rest, schema versions, rows bound to their key.

use axum::http::{Method, StatusCode};
use ferry_core::Secret;
use serde_json::json;

use super::{Env, V1, config};
use crate::{DatabaseConfig, Error, StoreError};

const PASSWORD: &str = "pw-MUST-NOT-BE-IN-POSTGRES-4d1e";
const SECRET: &str = "cs-MUST-NOT-BE-IN-POSTGRES-0a7c";

fn fresh() -> (String, DatabaseConfig) {
    let url = ferry_testkit::postgres::Postgres::shared().database();
    (url.clone(), DatabaseConfig::Postgres { url: Secret::new(url) })
}

/// A connection of our own, as an operator's `psql` would have.
async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// Every column of every row of the service's tables, as bytes.
async fn all_bytes(db: &tokio_postgres::Client) -> Vec<u8> {
    let mut out = Vec::new();
    for table in ["destinations", "fragments", "certificates", "labels"] {
        let sql = format!("SELECT subaccount, instance, name, sealed FROM {table}");
        for row in db.query(&sql, &[]).await.unwrap() {
            for i in 0..3 {
                out.extend(row.get::<_, String>(i).into_bytes());
            }
            out.extend(row.get::<_, Vec<u8>>(3));
        }
    }
    for row in db.query("SELECT key, value FROM meta", &[]).await.unwrap() {
        out.extend(row.get::<_, String>(0).into_bytes());
        out.extend(row.get::<_, Vec<u8>>(1));
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn secrets_are_encrypted_in_the_tables() {
    let (url, database) = fresh();
    let env = Env::with_config(config(database, [3; 32])).await;
    let t = env.token("zone-1", "client-1");
    env.create(
        &t,
        "subaccount",
        json!({
            "Name": "enc", "Type": "HTTP", "URL": "https://enc.example", "Authentication": "BasicAuthentication",
            "User": "u", "Password": PASSWORD, "clientSecret": SECRET
        }),
    )
    .await;
    let frag = json!({"FragmentName": "encfrag", "clientSecret": SECRET, "tokenServicePassword": PASSWORD});
    let r = env.call(Method::POST, &format!("{V1}/subaccountDestinationFragments"), Some(&t), Some(frag)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let content = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("KEY{SECRET}"));
    let cert = json!({"Name": "enccert.pem", "Type": "PEM", "Content": content.clone()});
    let r = env.call(Method::POST, &format!("{V1}/subaccountCertificates"), Some(&t), Some(cert)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);

    let raw = all_bytes(&connect(&url).await).await;
    for name in ["enc", "encfrag", "enccert.pem", "zone-1"] {
        assert!(contains(&raw, name), "{name} stays in clear (sanity check of the scan)");
    }
    assert!(!contains(&raw, PASSWORD), "password found in the tables");
    assert!(!contains(&raw, SECRET), "client secret found in the tables");
    assert!(!contains(&raw, &content), "certificate content found in the tables");
    assert!(!contains(&raw, "https://enc.example"), "the whole configuration is sealed, not only secrets");
}

#[tokio::test]
async fn a_row_moved_to_another_key_does_not_open() {
    let (url, database) = fresh();
    let env = Env::with_config(config(database, [5; 32])).await;
    let t = env.token("zone-1", "client-1");
    env.create(
        &t,
        "subaccount",
        json!({"Name": "a", "Type": "HTTP", "URL": "https://x.example", "Password": "secret-a"}),
    )
    .await;
    env.create(
        &t,
        "subaccount",
        json!({"Name": "b", "Type": "HTTP", "URL": "https://x.example", "Password": "secret-b"}),
    )
    .await;
    let db = connect(&url).await;
    db.execute(
        "UPDATE destinations SET sealed = (SELECT sealed FROM destinations WHERE name = 'a') WHERE name = 'b'",
        &[],
    )
    .await
    .unwrap();
    let r = env.find(&t, "b", &[]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    let msg = r.error();
    assert!(msg.starts_with("stored destination 'b' cannot be decrypted"), "{msg}");
    assert_eq!(env.find(&t, "a", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn schema_version_is_tracked() {
    let (url, database) = fresh();
    drop(Env::with_config(config(database.clone(), [6; 32])).await);
    drop(Env::with_config(config(database.clone(), [6; 32])).await);
    let db = connect(&url).await;
    let version: i64 = db.query_one("SELECT version FROM schema_version", &[]).await.unwrap().get(0);
    assert_eq!(version, 1);
    db.execute("UPDATE schema_version SET version = 99", &[]).await.unwrap();
    let err = Env::try_with_config(config(database, [6; 32])).await.err().unwrap();
    assert!(matches!(err, Error::Store(StoreError::SchemaTooNew { found: 99, supported: 1 })), "{err:?}");
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_error() {
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let database = DatabaseConfig::Postgres { url: Secret::new(format!("postgres://ferry@127.0.0.1:{port}/db")) };
    let err = Env::try_with_config(config(database, [6; 32])).await.err().unwrap();
    let msg = err.to_string();
    assert!(msg.contains("no database connection"), "{msg}");
    let database = DatabaseConfig::Postgres { url: Secret::new("mysql://nope".into()) };
    let msg = Env::try_with_config(config(database, [6; 32])).await.err().unwrap().to_string();
    assert!(msg.contains("URL is not valid"), "{msg}");
}
