//! A destination: an ordered, validated map of string properties.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use crate::kinds::{AuthenticationType, DestinationType, ProxyType, UnknownValue};
use crate::secrets::is_secret_property;

/// Longest destination name SAP accepts (SPEC §1.12).
pub const MAX_NAME_LEN: usize = 200;

/// Key whose object value carries request metadata (`shared_with_subscriber`), not a property.
const METADATA_KEY: &str = "$metadata";

/// Why a destination was refused. Each message names the property and says what to change,
/// because it goes back verbatim to whoever posted the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("property 'Name' is missing: every destination needs a Name")]
    MissingName,
    #[error("property 'Name' is empty: give the destination a name of letters, digits, '_' or '-'")]
    EmptyName,
    #[error("destination name '{prefix}…' is {len} characters long; the limit is {MAX_NAME_LEN}")]
    NameTooLong { prefix: String, len: usize },
    #[error("destination name '{name}' contains {ch:?}; only letters A-Z and a-z, digits, '_' and '-' are allowed")]
    InvalidNameCharacter { name: String, ch: char },
    #[error("property 'Type' is missing: set it to one of HTTP, RFC, MAIL, LDAP, TCP")]
    MissingType,
    #[error(transparent)]
    InvalidValue(#[from] UnknownValue),
    #[error(
        "property '{key}' has {kind} value; destination properties must be strings (numbers and booleans are accepted)"
    )]
    NestedValue { key: String, kind: &'static str },
    #[error("property '{0}' is given more than once")]
    DuplicateProperty(String),
    #[error("a property has an empty name")]
    EmptyPropertyName,
    #[error("property 'FragmentName' is missing: every fragment needs a FragmentName")]
    MissingFragmentName,
    #[error(
        "a fragment must not contain the property '{0}'; fragments add to a destination, they do not name or type it"
    )]
    ReservedFragmentProperty(String),
    /// A rule of the destination's `Type` or `Authentication` (see [`Destination::check`]).
    #[error("property '{property}' {rule}")]
    Rule { property: String, rule: String },
}

/// A property value as it arrived, before validation: scalars are already in their string
/// form, nested values are only recorded as such so the error can name the offending key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawValue {
    String(String),
    Null,
    Object,
    Array,
}

/// A destination object as parsed from JSON (or TOML), not yet validated.
///
/// Parsing and validation are separate so that bulk requests can report a validation failure
/// per item (with the item's name) instead of failing the whole body on the first bad element.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawDestination {
    pub entries: Vec<(String, RawValue)>,
}

impl RawDestination {
    /// The `Name` as given, if it is a string; used to label per-item errors.
    pub fn name(&self) -> Option<&str> {
        self.entries.iter().find_map(|(k, v)| match v {
            RawValue::String(s) if k == "Name" => Some(s.as_str()),
            _ => None,
        })
    }
}

/// A validated destination: `Name` and `Type` are present and valid, `Authentication` (when
/// set) is a known type, and every value is a string. Properties keep their original order and
/// exact (case-sensitive) keys, because clients echo and match them literally.
#[derive(Clone, PartialEq, Eq)]
pub struct Destination {
    props: Vec<(String, String)>,
}

impl Destination {
    /// Builds a destination from key/value pairs, with the same validation as parsed input.
    pub fn from_properties<I, K, V>(props: I) -> Result<Self, ValidationError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        RawDestination { entries: props.into_iter().map(|(k, v)| (k.into(), RawValue::String(v.into()))).collect() }
            .try_into()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.props.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// All properties in their original order, secrets included.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.props.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn name(&self) -> &str {
        self.get("Name").unwrap_or_default()
    }

    pub fn destination_type(&self) -> DestinationType {
        // Validated on construction; the fallback is unreachable but keeps this infallible.
        self.get("Type").and_then(|t| t.parse().ok()).unwrap_or(DestinationType::Http)
    }

    pub fn url(&self) -> Option<&str> {
        self.get("URL")
    }

    /// `None` when the property is absent or empty: SAP tools store `""` for "not chosen".
    pub fn authentication(&self) -> Option<AuthenticationType> {
        self.get("Authentication").filter(|a| !a.is_empty()).and_then(|a| a.parse().ok())
    }

    /// `Internet` when absent, as SAP defaults it. Not validated on construction because
    /// non-HTTP types use their own keys (`ldap.proxyType`, `jco.destination.proxy_type`).
    pub fn proxy_type(&self) -> Result<ProxyType, UnknownValue> {
        match self.get("ProxyType") {
            None | Some("") => Ok(ProxyType::Internet),
            Some(p) => p.parse(),
        }
    }

    /// Sets (or adds, at the end) a property, re-validating the keys the model types.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) -> Result<(), ValidationError> {
        let (key, value) = (key.into(), value.into());
        if key.is_empty() {
            return Err(ValidationError::EmptyPropertyName);
        }
        validate_known(&key, &value)?;
        match self.props.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.props.push((key, value)),
        }
        Ok(())
    }

    /// SPEC §1.7: this destination with `fragment`'s properties merged in, the fragment's
    /// value winning on conflicts, and `FragmentName` set to the fragment's name.
    pub fn merged_with(&self, fragment: &crate::Fragment) -> Destination {
        let mut props = self.props.clone();
        for (k, v) in fragment.iter() {
            match props.iter_mut().find(|(p, _)| p == k) {
                Some((_, old)) => *old = v.to_owned(),
                None => props.push((k.to_owned(), v.to_owned())),
            }
        }
        Destination { props }
    }

    /// The rules a destination must meet to be written through the API (SPEC §1.12, §1.13,
    /// §2.1): required keys of its `Type` and `Authentication`, allowed values of enumerations,
    /// booleans and numbers, URL forms, and length limits. Separate from parsing so that rows
    /// stored before a rule existed stay readable.
    pub fn check(&self) -> Result<(), ValidationError> {
        let props: Vec<(&str, &str)> = self.iter().collect();
        crate::rules::check_destination(&props)
    }

    /// A copy without secret properties, for list responses.
    pub fn without_secrets(&self) -> Destination {
        Destination { props: self.props.iter().filter(|(k, _)| !is_secret_property(k)).cloned().collect() }
    }
}

pub(crate) fn validate_name(name: &str) -> Result<(), ValidationError> {
    if name.is_empty() {
        return Err(ValidationError::EmptyName);
    }
    let len = name.chars().count();
    if len > MAX_NAME_LEN {
        return Err(ValidationError::NameTooLong { prefix: name.chars().take(40).collect(), len });
    }
    if let Some(ch) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(ValidationError::InvalidNameCharacter { name: name.to_owned(), ch });
    }
    Ok(())
}

/// Validation of the few keys whose value the model interprets.
pub(crate) fn validate_known(key: &str, value: &str) -> Result<(), ValidationError> {
    match key {
        "Name" => validate_name(value),
        "Type" => value.parse::<DestinationType>().map(drop).map_err(Into::into),
        "Authentication" if !value.is_empty() => value.parse::<AuthenticationType>().map(drop).map_err(Into::into),
        _ => Ok(()),
    }
}

impl TryFrom<RawDestination> for Destination {
    type Error = ValidationError;

    fn try_from(raw: RawDestination) -> Result<Self, Self::Error> {
        let mut seen = HashSet::with_capacity(raw.entries.len());
        let mut props = Vec::with_capacity(raw.entries.len());
        for (key, value) in raw.entries {
            if key == METADATA_KEY {
                continue;
            }
            if key.is_empty() {
                return Err(ValidationError::EmptyPropertyName);
            }
            if !seen.insert(key.clone()) {
                return Err(ValidationError::DuplicateProperty(key));
            }
            match value {
                RawValue::String(s) => {
                    validate_known(&key, &s)?;
                    props.push((key, s));
                }
                // `null` reads as "not set", which is what clients mean when they send it.
                RawValue::Null => {}
                RawValue::Object => return Err(ValidationError::NestedValue { key, kind: "an object" }),
                RawValue::Array => return Err(ValidationError::NestedValue { key, kind: "an array" }),
            }
        }
        let has = |k: &str| props.iter().any(|(p, _)| p == k);
        if !has("Name") {
            return Err(ValidationError::MissingName);
        }
        if !has("Type") {
            return Err(ValidationError::MissingType);
        }
        Ok(Destination { props })
    }
}

/// Secrets are masked so that logging a destination can never leak one.
impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_masked(f, &self.props)
    }
}

impl Serialize for Destination {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_props(serializer, &self.props)
    }
}

/// `Debug` of a property list with secret values shown as `***`.
pub(crate) fn debug_masked(f: &mut fmt::Formatter<'_>, props: &[(String, String)]) -> fmt::Result {
    let mut map = f.debug_map();
    for (k, v) in props {
        let shown: &str = if is_secret_property(k) { "***" } else { v };
        map.entry(k, &shown);
    }
    map.finish()
}

/// A property list as a flat JSON object, in its order.
pub(crate) fn serialize_props<S: Serializer>(serializer: S, props: &[(String, String)]) -> Result<S::Ok, S::Error> {
    let mut map = serializer.serialize_map(Some(props.len()))?;
    for (k, v) in props {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        RawDestination::deserialize(deserializer)?.try_into().map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for RawDestination {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RawVisitor;
        impl<'de> Visitor<'de> for RawVisitor {
            type Value = RawDestination;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a destination object of string properties")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8).min(256));
                while let Some((k, v)) = map.next_entry::<String, RawValue>()? {
                    entries.push((k, v));
                }
                Ok(RawDestination { entries })
            }
        }
        deserializer.deserialize_map(RawVisitor)
    }
}

impl<'de> Deserialize<'de> for RawValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;
        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = RawValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawValue, E> {
                Ok(RawValue::String(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<RawValue, E> {
                Ok(RawValue::String(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawValue, E> {
                Ok(RawValue::String(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawValue, E> {
                Ok(RawValue::String(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawValue, E> {
                Ok(RawValue::String(v.to_string()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<RawValue, E> {
                Ok(RawValue::String(v.to_string()))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<RawValue, E> {
                Ok(RawValue::String(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawValue, E> {
                Ok(RawValue::String(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<RawValue, E> {
                Ok(RawValue::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<RawValue, E> {
                Ok(RawValue::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<RawValue, D::Error> {
                RawValue::deserialize(d)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawValue, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(RawValue::Object)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawValue, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RawValue::Array)
            }
        }
        deserializer.deserialize_any(ValueVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<Destination, ValidationError> {
        let raw: RawDestination = serde_json::from_value(v).expect("parses as raw");
        raw.try_into()
    }

    #[test]
    fn keeps_order_case_and_stringifies_scalars() {
        // A string, not `json!`: serde_json's `Value` map would sort the keys.
        let d: Destination = serde_json::from_str(
            r#"{"Name": "d1", "Type": "MAIL", "mail.smtp.port": 25, "TrustAll": true, "ratio": 1.5,
                "url.x": "lower", "URL.x": "upper", "$metadata": {"shared_with_subscriber": true}, "Gone": null}"#,
        )
        .unwrap();
        let keys: Vec<&str> = d.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["Name", "Type", "mail.smtp.port", "TrustAll", "ratio", "url.x", "URL.x"]);
        assert_eq!(d.get("mail.smtp.port"), Some("25"));
        assert_eq!(d.get("TrustAll"), Some("true"));
        assert_eq!(d.get("ratio"), Some("1.5"));
        assert_eq!(d.get("URL.x"), Some("upper"));
        assert_eq!(d.destination_type(), DestinationType::Mail);
        assert_eq!(d.authentication(), None);
        assert_eq!(d.proxy_type(), Ok(ProxyType::Internet));
        let out = serde_json::to_string(&d).unwrap();
        assert!(out.starts_with(r#"{"Name":"d1","Type":"MAIL","mail.smtp.port":"25""#), "{out}");
        let back: Destination = serde_json::from_str(&out).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn validation_errors_name_the_problem() {
        use ValidationError::*;
        let cases = [
            (json!({"Type": "HTTP"}), MissingName),
            (json!({"Name": "x"}), MissingType),
            (json!({"Name": "", "Type": "HTTP"}), EmptyName),
            (json!({"Name": "a b", "Type": "HTTP"}), InvalidNameCharacter { name: "a b".into(), ch: ' ' }),
            (json!({"Name": "a.b", "Type": "HTTP"}), InvalidNameCharacter { name: "a.b".into(), ch: '.' }),
            (
                json!({"Name": "x", "Type": "HTTP", "Extra": {"a": 1}}),
                NestedValue { key: "Extra".into(), kind: "an object" },
            ),
            (json!({"Name": "x", "Type": "HTTP", "Extra": [1]}), NestedValue { key: "Extra".into(), kind: "an array" }),
            (json!({"Name": "x", "Type": "HTTP", "": "v"}), EmptyPropertyName),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input.clone()), Err(want), "{input}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        let err = parse(json!({"Name": long, "Type": "HTTP"})).unwrap_err();
        assert!(err.to_string().contains("201 characters long; the limit is 200"), "{err}");
        assert!(parse(json!({"Name": "a".repeat(MAX_NAME_LEN), "Type": "HTTP"})).is_ok());

        let err = parse(json!({"Name": "x", "Type": "SOAP"})).unwrap_err();
        assert_eq!(err.to_string(), "'SOAP' is not a valid Type; use one of: HTTP, RFC, MAIL, LDAP, TCP");
        let err = parse(json!({"Name": "x", "Type": "HTTP", "Authentication": "Basic"})).unwrap_err();
        assert!(
            err.to_string().contains("'Basic' is not a valid Authentication; use one of: NoAuthentication"),
            "{err}"
        );
        assert!(parse(json!({"Name": "x", "Type": "HTTP", "Authentication": ""})).is_ok());
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let err = serde_json::from_str::<RawDestination>(r#"{"Name":"x","Type":"HTTP","User":"a","User":"b"}"#)
            .unwrap()
            .try_into()
            .map(|_: Destination| ())
            .unwrap_err();
        assert_eq!(err, ValidationError::DuplicateProperty("User".into()));
    }

    #[test]
    fn deserialize_reports_validation_and_shape_errors() {
        let err = serde_json::from_value::<Destination>(json!({"Name": "x"})).unwrap_err();
        assert!(err.to_string().contains("'Type' is missing"), "{err}");
        let err = serde_json::from_value::<Destination>(json!(["x"])).unwrap_err();
        assert!(err.to_string().contains("a destination object"), "{err}");
    }

    #[test]
    fn debug_masks_secrets_and_without_secrets_drops_them() {
        let d = Destination::from_properties([
            ("Name", "x"),
            ("Type", "HTTP"),
            ("User", "u"),
            ("Password", "hunter2"),
            ("clientSecret", "cs-value"),
            ("mail.password", "mp-value"),
        ])
        .unwrap();
        let dbg = format!("{d:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("cs-value") && !dbg.contains("mp-value"), "{dbg}");
        assert!(dbg.contains("\"User\": \"u\""), "{dbg}");
        let public = d.without_secrets();
        let keys: Vec<&str> = public.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["Name", "Type", "User"]);
    }

    #[test]
    fn set_validates_typed_keys() {
        let mut d = Destination::from_properties([("Name", "x"), ("Type", "HTTP")]).unwrap();
        d.set("URL", "https://example.org").unwrap();
        d.set("Type", "RFC").unwrap();
        assert_eq!(d.url(), Some("https://example.org"));
        assert_eq!(d.destination_type(), DestinationType::Rfc);
        assert!(d.set("Name", "bad name").is_err());
        assert!(d.set("Authentication", "Nope").is_err());
        assert_eq!(d.name(), "x");
        d.set("Authentication", "OAuth2ClientCredentials").unwrap();
        assert_eq!(d.authentication(), Some(AuthenticationType::OAuth2ClientCredentials));
        d.set("ProxyType", "Cloud").unwrap();
        assert!(d.proxy_type().is_err());
    }
}
