//! The database file: encryption at rest, key checks, migrations.

use std::path::Path;

use axum::http::{Method, StatusCode};
use serde_json::json;

use super::{Env, V1, config};
use crate::{DatabaseConfig, Error, StoreError};

const PASSWORD: &str = "pw-MUST-NOT-BE-ON-DISK-7f3a";
const SECRET: &str = "cs-MUST-NOT-BE-ON-DISK-91bc";

fn file_db(dir: &Path) -> DatabaseConfig {
    DatabaseConfig::Sqlite { path: dir.join("nested").join("destinations.db") }
}

async fn open(dir: &Path, key: [u8; 32]) -> Result<Env, Error> {
    Env::try_with_config(config(file_db(dir), key)).await
}

/// Every file in the directory tree (the database and its WAL/SHM companions).
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_bytes(&path));
        } else {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn secrets_are_encrypted_at_rest_and_the_key_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::with_config(config(file_db(dir.path()), [3; 32])).await;
    let t = env.token("zone-1", "client-1");
    let dest = json!({
        "Name": "enc", "Type": "HTTP", "URL": "https://enc.example", "Authentication": "BasicAuthentication",
        "User": "u", "Password": PASSWORD, "clientSecret": SECRET
    });
    env.create(&t, "subaccount", dest.clone()).await;
    env.create(
        &t,
        "instance",
        json!({"Name": "enc2", "Type": "HTTP", "URL": "https://x.example", "Password": PASSWORD}),
    )
    .await;
    let frag = json!({"FragmentName": "encfrag", "clientSecret": SECRET, "tokenServicePassword": PASSWORD});
    let r = env.call(Method::POST, &format!("{V1}/subaccountDestinationFragments"), Some(&t), Some(frag)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // A certificate's content (a keystore may hold private keys) is sealed too.
    let pem = format!("-----BEGIN PRIVATE KEY-----{SECRET}");
    let content = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &pem);
    let cert = json!({"Name": "enccert.pem", "Type": "PEM", "Content": content.clone()});
    let r = env.call(Method::POST, &format!("{V1}/subaccountCertificates"), Some(&t), Some(cert)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);

    let raw = all_bytes(dir.path());
    assert!(contains(&raw, "enc2"), "names stay in clear (sanity check of the scan)");
    assert!(contains(&raw, "encfrag"), "fragment names stay in clear (sanity check of the scan)");
    assert!(!contains(&raw, PASSWORD), "password found on disk");
    assert!(!contains(&raw, SECRET), "client secret found on disk");
    assert!(!contains(&raw, &content), "certificate content found on disk");
    assert!(contains(&raw, "enccert.pem"), "certificate names stay in clear (sanity check of the scan)");
    assert!(!contains(&raw, "https://enc.example"), "the whole configuration is sealed, not only secrets");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let db = dir.path().join("nested").join("destinations.db");
        assert_eq!(std::fs::metadata(db).unwrap().permissions().mode() & 0o777, 0o600);
    }
    drop(env);

    // The same key reads it back.
    let again = open(dir.path(), [3; 32]).await.unwrap();
    let t = again.token("zone-1", "client-1");
    let r = again.call(Method::GET, &format!("{V1}/subaccountDestinations/enc"), Some(&t), None).await;
    assert_eq!(r.json, dest);
    drop(again);

    // Another key is refused at start-up, with a message that says what to do.
    let err = open(dir.path(), [4; 32]).await.err().unwrap();
    assert!(matches!(err, Error::WrongMasterKey), "{err:?}");
    assert!(err.to_string().contains("master key does not match"), "{err}");
}

#[tokio::test]
async fn a_row_that_does_not_decrypt_is_a_clear_500() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::with_config(config(file_db(dir.path()), [5; 32])).await;
    let t = env.token("zone-1", "client-1");
    env.create(
        &t,
        "subaccount",
        json!({"Name": "a", "Type": "HTTP", "URL": "https://a.example", "Password": "secret-a"}),
    )
    .await;
    env.create(
        &t,
        "subaccount",
        json!({"Name": "b", "Type": "HTTP", "URL": "https://b.example", "Password": "secret-b"}),
    )
    .await;

    // Copy a's ciphertext into b's row: the row key is bound in, so it must not open there.
    let db = rusqlite::Connection::open(dir.path().join("nested").join("destinations.db")).unwrap();
    db.execute(
        "UPDATE destinations SET sealed = (SELECT sealed FROM destinations WHERE name = 'a') WHERE name = 'b'",
        [],
    )
    .unwrap();

    let r = env.find(&t, "b", &[]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    let msg = r.error();
    assert!(msg.starts_with("stored destination 'b' cannot be decrypted"), "{msg}");
    assert!(!msg.contains("secret-"), "{msg}");
    let r = env.call(Method::GET, &format!("{V1}/subaccountDestinations"), Some(&t), None).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(env.find(&t, "a", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn schema_version_is_tracked() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), [6; 32]).await.unwrap());
    let path = dir.path().join("nested").join("destinations.db");
    let db = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = db.query_row("SELECT version FROM schema_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 3);

    // A version-1 database (destinations only) gains the fragment and certificate tables.
    db.execute_batch(
        "DROP TABLE fragments; DROP TABLE certificates; DROP TABLE labels; UPDATE schema_version SET version = 1",
    )
    .unwrap();
    drop(open(dir.path(), [6; 32]).await.unwrap());
    let tables: i64 = db
        .query_row("SELECT count(*) FROM sqlite_master WHERE name IN ('fragments', 'certificates')", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tables, 2);

    // Reopening is idempotent; a database from a newer Ferry is refused.
    drop(open(dir.path(), [6; 32]).await.unwrap());
    db.execute("UPDATE schema_version SET version = 99", []).unwrap();
    let err = open(dir.path(), [6; 32]).await.err().unwrap();
    assert!(matches!(err, Error::Store(StoreError::SchemaTooNew { found: 99, supported: 3 })), "{err:?}");
}

#[tokio::test]
async fn databases_from_before_key_ids_open_and_are_sealed_again() {
    let dir = tempfile::tempdir().unwrap();
    let env = open(dir.path(), [7; 32]).await.unwrap();
    let t = env.token("zone-1", "client-1");
    let dest = json!({"Name": "old", "Type": "HTTP", "URL": "https://x.example", "Password": "pw-of-an-older-ferry"});
    env.create(&t, "subaccount", dest.clone()).await;
    drop(env);

    // Strip `2 || key id` (9 bytes): what is left is the format-1 blob older Ferry versions wrote.
    let db = rusqlite::Connection::open(dir.path().join("nested").join("destinations.db")).unwrap();
    db.execute_batch("UPDATE destinations SET sealed = substr(sealed, 10); UPDATE meta SET value = substr(value, 10);")
        .unwrap();
    let first_byte = |sql: &str| -> u8 { db.query_row(sql, [], |r| r.get::<_, Vec<u8>>(0)).unwrap()[0] };
    assert_eq!(first_byte("SELECT sealed FROM destinations"), 1);

    let env = open(dir.path(), [7; 32]).await.unwrap();
    let t = env.token("zone-1", "client-1");
    let r = env.call(Method::GET, &format!("{V1}/subaccountDestinations/old"), Some(&t), None).await;
    assert_eq!(r.json, dest);
    assert_eq!(first_byte("SELECT sealed FROM destinations"), 2, "sealed again, with a key id");
    assert_eq!(first_byte("SELECT value FROM meta WHERE key = 'key_check'"), 2);
}
