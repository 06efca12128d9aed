//! Property checks shared by the fuzz targets (`fuzz/` at the repository root) and the corpus
//! replay tests. Each function panics when a property does not hold.

use crate::access::normalize_path;
use crate::audit::{ZERO_HASH, header_line, record, verify_text};

/// Access-control path normalisation: what it accepts is absolute, has no dot segments, escapes
/// or backslashes left, and normalises to itself (so a backend decoding once more sees the
/// same path the rules matched).
pub fn access_path(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let Some(path) = normalize_path(raw) else { return };
    assert!(path.starts_with('/'), "{path:?}");
    assert!(!path.split('/').any(|s| s == "." || s == ".."), "{raw:?} -> {path:?} has a dot segment");
    assert!(!path.contains(['\\', '%']), "{raw:?} -> {path:?} keeps an escape");
    assert_eq!(normalize_path(&path).as_deref(), Some(path.as_str()), "normalising {raw:?} twice differs");
}

/// Audit log lines: verifying arbitrary text never panics; a log written from arbitrary field
/// values (records split at 0xff, fields at 0xfe) verifies, and changing any one byte of it
/// (position and value from the input's last bytes) is detected.
pub fn audit_lines(data: &[u8]) {
    let _ = verify_text(&String::from_utf8_lossy(data));
    let Some((body, tail)) = data.split_last_chunk::<3>() else { return };
    let mut text = format!("{}\n", header_line(ZERO_HASH));
    let mut prev = ZERO_HASH.to_owned();
    let mut n = 0;
    for rec in body.split(|&b| b == 0xff).filter(|r| !r.is_empty()) {
        let fields: Vec<String> = rec.split(|&b| b == 0xfe).map(|f| String::from_utf8_lossy(f).into_owned()).collect();
        let refs: Vec<&str> = fields.iter().map(String::as_str).collect();
        let (line, hash) = record(&prev, &refs);
        text.push_str(&line);
        text.push('\n');
        prev = hash;
        n += 1;
    }
    assert_eq!(verify_text(&text).map(|v| v.0), Ok(n), "a written log does not verify: {text:?}");
    if n == 0 {
        return;
    }
    let mut bytes = text.into_bytes();
    let pos = (usize::from(tail[0]) << 8 | usize::from(tail[1])) % bytes.len();
    // Changing only the final line break, or to another ASCII byte, keeps the text UTF-8.
    let new = tail[2] & 0x7f;
    if bytes[pos] == new || pos == bytes.len() - 1 || bytes[pos] >= 0x80 {
        return;
    }
    bytes[pos] = new;
    let Ok(changed) = String::from_utf8(bytes) else { return };
    assert!(verify_text(&changed).is_err(), "a changed log verifies: {changed:?}");
}
