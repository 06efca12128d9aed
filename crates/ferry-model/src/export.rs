//! SAP's destination export files.
//!
//! The cockpit's *Export* writes a destination as JSON (the flat object of the REST API) or as a
//! Java `.properties` file (`key=value` lines, `URL=https\://host`, non-ASCII as `\uXXXX`), and
//! its *Create > From File* reads either back (SPEC §1.12). Both are read here into the same
//! ordered property list; a JSON file may also hold an array, as bulk REST bodies do.

use crate::destination::{RawDestination, RawValue};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Json,
    Properties,
}

impl FileFormat {
    /// JSON when the first character that is not whitespace (or a BOM) opens an object or array.
    pub fn detect(text: &str) -> Self {
        match text.trim_start_matches('\u{feff}').trim_start().chars().next() {
            Some('{' | '[') => FileFormat::Json,
            _ => FileFormat::Properties,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a valid destination JSON file: {0}")]
    Json(String),
    #[error("line {line}: {message}")]
    Properties { line: usize, message: String },
    #[error("property '{0}' has a nested value; destination properties are strings")]
    Nested(String),
    #[error("the file holds no properties")]
    Empty,
}

/// One destination (or fragment) per element: `{...}` and properties files give one, `[...]` many.
pub fn parse_file(text: &str) -> Result<Vec<Vec<(String, String)>>, FormatError> {
    let text = text.trim_start_matches('\u{feff}');
    let items = match FileFormat::detect(text) {
        FileFormat::Properties => vec![parse_properties(text)?],
        FileFormat::Json => {
            #[derive(serde::Deserialize)]
            #[serde(untagged)]
            enum OneOrMany {
                One(RawDestination),
                Many(Vec<RawDestination>),
            }
            let raws = match serde_json::from_str::<OneOrMany>(text).map_err(|e| FormatError::Json(e.to_string()))? {
                OneOrMany::One(raw) => vec![raw],
                OneOrMany::Many(raws) => raws,
            };
            raws.into_iter().map(strings).collect::<Result<_, _>>()?
        }
    };
    if items.is_empty() || items.iter().any(Vec::is_empty) {
        return Err(FormatError::Empty);
    }
    Ok(items)
}

fn strings(raw: RawDestination) -> Result<Vec<(String, String)>, FormatError> {
    let mut out = Vec::with_capacity(raw.entries.len());
    for (k, v) in raw.entries {
        match v {
            RawValue::String(s) => out.push((k, s)),
            RawValue::Null => {}
            // `$metadata` carries request options, not a property; exports do not keep it.
            RawValue::Object if k == "$metadata" => {}
            RawValue::Object | RawValue::Array => return Err(FormatError::Nested(k)),
        }
    }
    Ok(out)
}

/// Reads a `.properties` file as `java.util.Properties.load` does: `#`/`!` comments, `=`, `:`
/// or whitespace between key and value, backslash escapes and line continuations. Keys keep
/// the file's order; a repeated key keeps its last value, as Java's does.
pub fn parse_properties(text: &str) -> Result<Vec<(String, String)>, FormatError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).enumerate().peekable();
    while let Some((index, first)) = lines.next() {
        let trimmed = first.trim_start_matches(is_blank);
        if trimmed.is_empty() || trimmed.starts_with(['#', '!']) {
            continue;
        }
        // Join continuation lines (an odd number of trailing backslashes).
        let mut logical = String::from(trimmed);
        while ends_with_odd_backslashes(&logical) {
            logical.pop();
            match lines.next() {
                Some((_, next)) => logical.push_str(next.trim_start_matches(is_blank)),
                None => break,
            }
        }
        let (key, value) = split_key_value(&logical);
        let err = |message: String| FormatError::Properties { line: index + 1, message };
        let key = unescape(key).map_err(err)?;
        let value = unescape(value).map_err(err)?;
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => out.push((key, value)),
        }
    }
    Ok(out)
}

fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\u{c}')
}

fn ends_with_odd_backslashes(s: &str) -> bool {
    s.bytes().rev().take_while(|b| *b == b'\\').count() % 2 == 1
}

/// The raw (still escaped) key and value of a logical line.
fn split_key_value(line: &str) -> (&str, &str) {
    let mut escaped = false;
    let mut end = line.len();
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '=' || c == ':' || is_blank(c) {
            end = i;
            break;
        }
    }
    let key = &line[..end];
    let mut rest = line[end..].trim_start_matches(is_blank);
    if let Some(r) = rest.strip_prefix(['=', ':']) {
        rest = r.trim_start_matches(is_blank);
    }
    (key, rest)
}

fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    let mut pending_high: Option<u16> = None;
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(e) = chars.next() else { break };
        let plain = match e {
            't' => '\t',
            'n' => '\n',
            'r' => '\r',
            'f' => '\u{c}',
            'u' => {
                let hex: String = chars.by_ref().take(4).collect();
                let unit = (hex.len() == 4)
                    .then(|| u16::from_str_radix(&hex, 16).ok())
                    .flatten()
                    .ok_or_else(|| format!("malformed \\u escape '\\u{hex}': use four hex digits"))?;
                // Java writes characters outside the BMP as two escaped UTF-16 halves.
                if let Some(high) = pending_high.take() {
                    match char::decode_utf16([high, unit]).next() {
                        Some(Ok(ch)) => out.push(ch),
                        _ => return Err(format!("unpaired UTF-16 surrogate \\u{high:04x}")),
                    }
                } else if (0xD800..0xDC00).contains(&unit) {
                    pending_high = Some(unit);
                } else {
                    out.push(char::from_u32(unit.into()).ok_or_else(|| format!("unpaired UTF-16 surrogate \\u{hex}"))?);
                }
                continue;
            }
            other => other,
        };
        out.push(plain);
    }
    if let Some(high) = pending_high {
        return Err(format!("unpaired UTF-16 surrogate \\u{high:04x}"));
    }
    Ok(out)
}

/// Writes properties as `java.util.Properties.store` does (minus its date comment, so that the
/// same destination always gives the same file): `:`, `=`, `#`, `!` and backslashes escaped,
/// everything outside printable ASCII as `\uXXXX`.
pub fn to_properties<'a>(props: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (k, v) in props {
        escape_into(&mut out, k, true);
        out.push('=');
        escape_into(&mut out, v, false);
        out.push('\n');
    }
    out
}

fn escape_into(out: &mut String, s: &str, is_key: bool) {
    for (i, c) in s.chars().enumerate() {
        match c {
            ' ' if is_key || i == 0 => out.push_str("\\ "),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\u{c}' => out.push_str("\\f"),
            '=' | ':' | '#' | '!' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(props: &[(&str, &str)]) -> Vec<(String, String)> {
        props.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn reads_a_cockpit_properties_export() {
        let file = "#\n#Mon Nov 23 10:00:00 UTC 2026\r\nDescription=Sales \\u00E4nderungen\nType=HTTP\r\n\
                    authentication=NoAuthentication\nName=erp\nProxyType=OnPremise\nURL=https\\://erp.virtual\\:8000/sap\n\
                    ! another comment\n   \nURL.headers.X-A = a value \nkey\\ with\\ spaces : v\nlong=one,\\\n    two\n\
                    empty=\nbare\ncolon:v\nspace v\n";
        let props = parse_properties(file).unwrap();
        assert_eq!(
            props,
            owned(&[
                ("Description", "Sales änderungen"),
                ("Type", "HTTP"),
                ("authentication", "NoAuthentication"),
                ("Name", "erp"),
                ("ProxyType", "OnPremise"),
                ("URL", "https://erp.virtual:8000/sap"),
                ("URL.headers.X-A", "a value "),
                ("key with spaces", "v"),
                ("long", "one,two"),
                ("empty", ""),
                ("bare", ""),
                ("colon", "v"),
                ("space", "v"),
            ])
        );
        assert_eq!(parse_properties("a=1\na=2\n").unwrap(), owned(&[("a", "2")]));
        let err = parse_properties("ok=1\nbad=\\u12g4\n").unwrap_err();
        assert_eq!(err.to_string(), "line 2: malformed \\u escape '\\u12g4': use four hex digits");
    }

    #[test]
    fn properties_round_trip_any_text() {
        let props = owned(&[
            ("Name", "d"),
            ("URL", "https://h:443/p?q=1#f"),
            ("key with = and : and space", " leading space, trailing "),
            ("Description", "line1\nline2\tand \\ backslash ! # ünïcödé 😀"),
            ("Password", "p@ss:word="),
            ("empty", ""),
        ]);
        let text = to_properties(props.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert!(text.contains("URL=https\\://h\\:443/p?q\\=1\\#f\n"), "{text}");
        assert!(text.contains("\\u00FC") && text.contains("\\uD83D\\uDE00"), "{text}");
        assert!(text.is_ascii());
        assert_eq!(parse_properties(&text).unwrap(), props);
    }

    #[test]
    fn parse_file_detects_the_format() {
        let json = r#"{"Name": "a", "Type": "HTTP", "Port": 8080, "Gone": null, "$metadata": {"x": 1}}"#;
        assert_eq!(parse_file(json).unwrap(), vec![owned(&[("Name", "a"), ("Type", "HTTP"), ("Port", "8080")])]);
        let many = "\u{feff} [{\"Name\": \"a\"}, {\"Name\": \"b\"}]";
        assert_eq!(parse_file(many).unwrap().len(), 2);
        assert_eq!(parse_file("Name=a\nType=TCP\n").unwrap(), vec![owned(&[("Name", "a"), ("Type", "TCP")])]);
        assert_eq!(parse_file(r#"{"Name": {"a": 1}}"#), Err(FormatError::Nested("Name".into())));
        assert_eq!(parse_file("# only a comment\n"), Err(FormatError::Empty));
        assert_eq!(parse_file("[]"), Err(FormatError::Empty));
        assert!(matches!(parse_file("{\"Name\": "), Err(FormatError::Json(_))));
    }

    #[test]
    fn json_and_properties_exports_of_one_destination_agree() {
        let d = crate::Destination::from_properties([
            ("Name", "erp"),
            ("Type", "HTTP"),
            ("URL", "https://erp:8000"),
            ("Authentication", "BasicAuthentication"),
            ("User", "u"),
            ("Password", "p:w"),
        ])
        .unwrap();
        let json = serde_json::to_string(&d).unwrap();
        let props = to_properties(d.iter());
        let from_json = parse_file(&json).unwrap();
        assert_eq!(from_json, parse_file(&props).unwrap());
        let back = crate::Destination::from_properties(from_json.into_iter().next().unwrap()).unwrap();
        assert_eq!(back, d);
    }
}
