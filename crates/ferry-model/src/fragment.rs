//! A destination fragment (SPEC §1.7): properties that are merged into a destination on find.

use std::collections::HashSet;
use std::fmt;

use serde::ser::Serializer;
use serde::{Deserialize, Deserializer, Serialize, de};

use crate::destination::{RawDestination, RawValue, ValidationError, validate_known, validate_name};
use crate::secrets::is_secret_property;

/// Keys a fragment must not set: they identify the destination it is merged into.
const RESERVED: &[&str] = &["Name", "Type"];

/// A validated fragment: `FragmentName` is present and a valid name, `Name` and `Type` are
/// absent, every value is a string. Properties keep their order, like a [`Destination`](crate::Destination).
#[derive(Clone, PartialEq, Eq)]
pub struct Fragment {
    props: Vec<(String, String)>,
}

impl Fragment {
    pub fn from_properties<I, K, V>(props: I) -> Result<Self, ValidationError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        RawDestination { entries: props.into_iter().map(|(k, v)| (k.into(), RawValue::String(v.into()))).collect() }
            .try_into()
    }

    pub fn name(&self) -> &str {
        self.get("FragmentName").unwrap_or_default()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.props.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// All properties, `FragmentName` included, secrets included.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.props.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The per-property rules of [`Destination::check`](crate::Destination::check); the rules
    /// that need a `Type` wait until the fragment is merged into a destination.
    pub fn check(&self) -> Result<(), ValidationError> {
        self.iter().try_for_each(|(k, v)| crate::rules::check_property(k, v))
    }

    /// A copy without secret properties, for list responses.
    pub fn without_secrets(&self) -> Fragment {
        Fragment { props: self.props.iter().filter(|(k, _)| !is_secret_property(k)).cloned().collect() }
    }
}

/// The `FragmentName` of a raw object, for per-item error reports.
pub fn raw_fragment_name(raw: &RawDestination) -> Option<&str> {
    raw.entries.iter().find_map(|(k, v)| match v {
        RawValue::String(s) if k == "FragmentName" => Some(s.as_str()),
        _ => None,
    })
}

impl TryFrom<RawDestination> for Fragment {
    type Error = ValidationError;

    fn try_from(raw: RawDestination) -> Result<Self, Self::Error> {
        let mut seen = HashSet::with_capacity(raw.entries.len());
        let mut props = Vec::with_capacity(raw.entries.len());
        for (key, value) in raw.entries {
            if key == "$metadata" {
                continue;
            }
            if key.is_empty() {
                return Err(ValidationError::EmptyPropertyName);
            }
            if RESERVED.contains(&key.as_str()) {
                return Err(ValidationError::ReservedFragmentProperty(key));
            }
            if !seen.insert(key.clone()) {
                return Err(ValidationError::DuplicateProperty(key));
            }
            match value {
                RawValue::String(s) => {
                    if key == "FragmentName" {
                        validate_name(&s)?;
                    } else {
                        validate_known(&key, &s)?;
                    }
                    props.push((key, s));
                }
                RawValue::Null => {}
                RawValue::Object => return Err(ValidationError::NestedValue { key, kind: "an object" }),
                RawValue::Array => return Err(ValidationError::NestedValue { key, kind: "an array" }),
            }
        }
        if !props.iter().any(|(k, _)| k == "FragmentName") {
            return Err(ValidationError::MissingFragmentName);
        }
        Ok(Fragment { props })
    }
}

impl fmt::Debug for Fragment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::destination::debug_masked(f, &self.props)
    }
}

impl Serialize for Fragment {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        crate::destination::serialize_props(serializer, &self.props)
    }
}

impl<'de> Deserialize<'de> for Fragment {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        RawDestination::deserialize(deserializer)?.try_into().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Destination;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<Fragment, ValidationError> {
        serde_json::from_value::<RawDestination>(v).unwrap().try_into()
    }

    #[test]
    fn validation() {
        assert_eq!(parse(json!({"URL": "x"})), Err(ValidationError::MissingFragmentName));
        assert_eq!(
            parse(json!({"FragmentName": "f", "Name": "n"})),
            Err(ValidationError::ReservedFragmentProperty("Name".into()))
        );
        assert_eq!(
            parse(json!({"FragmentName": "f", "Type": "HTTP"})),
            Err(ValidationError::ReservedFragmentProperty("Type".into()))
        );
        assert!(matches!(parse(json!({"FragmentName": "a b"})), Err(ValidationError::InvalidNameCharacter { .. })));
        assert!(matches!(
            parse(json!({"FragmentName": "f", "Authentication": "Nope"})),
            Err(ValidationError::InvalidValue(_))
        ));
        let f = parse(json!({"FragmentName": "f", "clientSecret": "s", "URL": "u"})).unwrap();
        assert_eq!(f.name(), "f");
        assert!(!format!("{f:?}").contains("\"s\""));
        assert_eq!(f.without_secrets().get("clientSecret"), None);
        let back: Fragment = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn merge_fragment_wins_and_names_itself() {
        let d = Destination::from_properties([("Name", "d"), ("Type", "HTTP"), ("URL", "old"), ("User", "u")]).unwrap();
        let f = Fragment::from_properties([("FragmentName", "f"), ("URL", "new"), ("clientId", "c")]).unwrap();
        let m = d.merged_with(&f);
        let props: Vec<(&str, &str)> = m.iter().collect();
        assert_eq!(
            props,
            [("Name", "d"), ("Type", "HTTP"), ("URL", "new"), ("User", "u"), ("FragmentName", "f"), ("clientId", "c")]
        );
    }
}
