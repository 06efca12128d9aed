//! Property checks shared by the fuzz targets (`fuzz/` at the repository root) and the corpus
//! replay tests. Each function panics when a property does not hold.
#![allow(clippy::expect_used)]

use crate::{Destination, RawDestination, parse_file, parse_properties, to_properties};

/// A destination as the REST API reads it: parsing and the write rules never panic, and a parsed
/// destination written back as JSON reads back the same.
pub fn destination_json(data: &[u8]) {
    let _ = serde_json::from_slice::<Vec<RawDestination>>(data);
    let Ok(d) = serde_json::from_slice::<Destination>(data) else { return };
    let _ = d.check();
    let json = serde_json::to_vec(&d).expect("a destination serialises");
    let again: Destination = serde_json::from_slice(&json).expect("a serialised destination parses");
    assert!(again == d, "JSON round trip changed the destination: {}", String::from_utf8_lossy(&json));
    let _ = d.without_secrets().check();
}

/// SAP export files (JSON or `.properties`): no panic, and what was read, written as a
/// `.properties` file, reads back the same.
pub fn export_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(props) = parse_properties(text) {
        round_trip(&props);
    }
    if let Ok(items) = parse_file(text) {
        for props in &items {
            // A JSON file may repeat a key; the properties form keeps the last value.
            let mut unique: Vec<(String, String)> = Vec::new();
            for (k, v) in props {
                match unique.iter_mut().find(|(u, _)| u == k) {
                    Some((_, old)) => old.clone_from(v),
                    None => unique.push((k.clone(), v.clone())),
                }
            }
            round_trip(&unique);
        }
    }
}

fn round_trip(props: &[(String, String)]) {
    let written = to_properties(props.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let again = parse_properties(&written).expect("written properties parse");
    assert_eq!(again, props, "properties round trip changed the entries; written: {written:?}");
}
