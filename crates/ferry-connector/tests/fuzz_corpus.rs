#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`: seeds and every input a fuzzing
//! run found failing) through the property the fuzz target checks, so a fixed bug stays fixed.

/// This crate's folder, read when the test runs: a build cache shared between checkouts can
/// hold a test binary compiled in another folder, so the compile-time path may be gone.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

fn replay(target: &str, property: fn(&[u8])) {
    let dir = manifest_dir().join("../../fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    for file in files {
        let data = std::fs::read(&file).unwrap();
        if std::panic::catch_unwind(|| property(&data)).is_err() {
            panic!("fuzz corpus input {} fails its property", file.display());
        }
    }
}

#[test]
fn access_path() {
    replay("access_path", ferry_connector::fuzzing::access_path);
}

#[test]
fn audit_lines() {
    replay("audit_lines", ferry_connector::fuzzing::audit_lines);
}
