//! Access control: which virtual systems and resources the cloud side may reach.
//!
//! Pure functions over the configured rules, so every rule is tested as a table. Semantics
//! follow SAP's Cloud Connector: a system mapping grants a virtual `host:port` for one
//! protocol and names the internal host behind it; for HTTP, resources grant paths — "path
//! only" is equality, "path and all sub-paths" is a plain string prefix (so `/a` also admits
//! `/ab`, as in SAP's product). Everything not granted is denied.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Http,
    Https,
    Tcp,
    Tcps,
    Ldap,
    Ldaps,
    /// SAP RFC to an application server's gateway (`33<nn>`) or a message server. RFC's wire
    /// protocol (CPIC) is not publicly documented, so the connector relays it as a TCP stream:
    /// the mapping's host and port are the whole grant, and RFC function-name resources cannot
    /// be enforced. RFC with SNC (`RFCS`) is not offered: SNC needs SAP's crypto library.
    Rfc,
}

impl Protocol {
    /// Whether this mapping carries HTTP requests (as opposed to raw TCP streams).
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Https)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HostInHeader {
    /// The backend sees the virtual host in `Host` (SAP's default).
    #[default]
    Virtual,
    /// The backend sees its internal host; the virtual one goes in `X-Forwarded-Host`.
    Internal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resource {
    /// URL path, case-sensitive, compared without the query. SAP's REST name is `id`.
    #[serde(rename = "id", alias = "path")]
    pub path: String,
    /// `true`: "path only"; `false`: "path and all sub-paths" (string prefix).
    #[serde(default)]
    pub exact_match_only: bool,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub websocket_upgrade_allowed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SystemMapping {
    pub virtual_host: String,
    pub virtual_port: u16,
    #[serde(alias = "internalHost")]
    pub local_host: String,
    #[serde(alias = "internalPort")]
    pub local_port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub host_in_header: HostInHeader,
    /// Principal propagation (`X509_GENERAL`/`X509_RESTRICTED`) or none.
    #[serde(default)]
    pub authentication_mode: crate::principal::AuthenticationMode,
    /// Where an `X509_*` mapping puts the user certificate: `header` (default) or `tls`.
    #[serde(default)]
    pub principal_certificate_in: crate::principal::PrincipalDelivery,
    #[serde(default)]
    pub resources: Vec<Resource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AccessRules {
    pub mappings: Vec<SystemMapping>,
}

/// The rules a running connector checks, replaceable while tunnels stay up: each request
/// takes a snapshot at its start, so a change applies to the next request (also on a
/// keep-alive connection) and never to half a request.
#[derive(Debug, Default)]
pub struct LiveRules(std::sync::RwLock<std::sync::Arc<AccessRules>>);

impl LiveRules {
    pub fn new(rules: AccessRules) -> Self {
        Self(std::sync::RwLock::new(std::sync::Arc::new(rules)))
    }

    pub fn get(&self) -> std::sync::Arc<AccessRules> {
        // A poisoned lock still holds a complete `Arc` (writers only swap it).
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn set(&self, rules: AccessRules) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = std::sync::Arc::new(rules);
    }
}

/// What the cloud side asks for.
#[derive(Clone, Copy, Debug)]
pub enum AccessRequest<'a> {
    /// One HTTP request; `path` is the raw path of the request target, without the query.
    /// `upgrade`: it asks to switch protocols (WebSocket), which a resource must allow.
    Http {
        host: &'a str,
        port: u16,
        path: &'a str,
        upgrade: bool,
    },
    Tcp {
        host: &'a str,
        port: u16,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// No system mapping for the virtual host and port.
    NoMapping,
    /// A mapping exists but for another protocol (e.g. an HTTP request to a TCP mapping).
    WrongProtocol,
    /// The path is not covered by an enabled resource.
    Resource,
    /// The path is ambiguous (dot segments, encoded slashes, NUL, bad escapes) and is refused
    /// rather than guessed at, because the backend might read it differently.
    AmbiguousPath,
    /// The path is granted, but no granting resource allows a protocol upgrade ("Upgrade
    /// Allowed" in SAP's UI, `websocketUpgradeAllowed`).
    UpgradeNotAllowed,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    Allow(&'a SystemMapping),
    Deny(DenyReason),
}

/// Host names compare case-insensitively; IP literals by address, so a mapping may write IPv6
/// with or without brackets and in any spelling (`[::1]`, `0:0:0:0:0:0:0:1`).
fn same_host(mapped: &str, requested: &str) -> bool {
    let bare = |h: &str| h.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(h).to_owned();
    let (mapped, requested) = (bare(mapped), bare(requested));
    match (mapped.parse::<std::net::IpAddr>(), requested.parse::<std::net::IpAddr>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => mapped.eq_ignore_ascii_case(&requested),
    }
}

impl AccessRules {
    pub fn new(mappings: Vec<SystemMapping>) -> Self {
        Self { mappings }
    }

    fn mapping(&self, host: &str, port: u16) -> Option<&SystemMapping> {
        self.mappings.iter().find(|m| m.virtual_port == port && same_host(&m.virtual_host, host))
    }

    pub fn check(&self, req: AccessRequest<'_>) -> Decision<'_> {
        match req {
            AccessRequest::Tcp { host, port } => match self.mapping(host, port) {
                None => Decision::Deny(DenyReason::NoMapping),
                Some(m) if m.protocol.is_http() => Decision::Deny(DenyReason::WrongProtocol),
                Some(m) => Decision::Allow(m),
            },
            AccessRequest::Http { host, port, path, upgrade } => {
                let Some(m) = self.mapping(host, port) else { return Decision::Deny(DenyReason::NoMapping) };
                if !m.protocol.is_http() {
                    return Decision::Deny(DenyReason::WrongProtocol);
                }
                let Some(path) = normalize_path(path) else { return Decision::Deny(DenyReason::AmbiguousPath) };
                let mut granting = m
                    .resources
                    .iter()
                    .filter(|r| r.enabled)
                    .filter(|r| if r.exact_match_only { path == r.path } else { path.starts_with(r.path.as_str()) })
                    .peekable();
                if granting.peek().is_none() {
                    Decision::Deny(DenyReason::Resource)
                } else if upgrade && !granting.any(|r| r.websocket_upgrade_allowed) {
                    Decision::Deny(DenyReason::UpgradeNotAllowed)
                } else {
                    Decision::Allow(m)
                }
            }
        }
    }
}

/// Percent-decodes a request path for matching. Returns `None` for anything a backend could
/// interpret differently from us: not starting with `/`, `.`/`..` segments (plain or encoded,
/// also with path parameters such as `..;`),
/// encoded `/` or `\`, a backslash, NUL or control characters, malformed escapes, non-UTF-8.
pub fn normalize_path(raw: &str) -> Option<String> {
    if !raw.starts_with('/') {
        return None;
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            if v == b'/' || v == b'\\' || v == b'%' {
                return None;
            }
            out.push(v);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    let s = String::from_utf8(out).ok()?;
    if s.chars().any(|c| c == '\\' || c.is_control()) {
        return None;
    }
    // A segment's path parameters (`..;x`) are dropped before dot segments are resolved by
    // servlet containers (Tomcat, SAP NetWeaver Java), so `/granted/..;/other` escapes there.
    if s.split('/').map(|seg| seg.split(';').next().unwrap_or(seg)).any(|seg| seg == "." || seg == "..") {
        return None;
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(path: &str, exact: bool, enabled: bool) -> Resource {
        Resource {
            path: path.into(),
            exact_match_only: exact,
            enabled,
            websocket_upgrade_allowed: false,
            description: None,
        }
    }

    fn rules() -> AccessRules {
        AccessRules::new(vec![
            SystemMapping {
                virtual_host: "erp.virtual".into(),
                virtual_port: 8080,
                local_host: "10.0.0.1".into(),
                local_port: 80,
                protocol: Protocol::Http,
                host_in_header: HostInHeader::Virtual,
                authentication_mode: Default::default(),
                principal_certificate_in: Default::default(),
                resources: vec![
                    res("/sap/opu", false, true),
                    res("/exact", true, true),
                    res("/suspended", false, false),
                    Resource { websocket_upgrade_allowed: true, ..res("/ws/chat", false, true) },
                    Resource { websocket_upgrade_allowed: true, ..res("/ws/off", false, false) },
                    res("/ws", false, true),
                ],
                description: None,
            },
            SystemMapping {
                virtual_host: "smtp.virtual".into(),
                virtual_port: 25,
                local_host: "10.0.0.2".into(),
                local_port: 2525,
                protocol: Protocol::Tcp,
                host_in_header: HostInHeader::Virtual,
                authentication_mode: Default::default(),
                principal_certificate_in: Default::default(),
                resources: vec![],
                description: None,
            },
            SystemMapping {
                virtual_host: "ecc.virtual".into(),
                virtual_port: 3300,
                local_host: "10.0.0.3".into(),
                local_port: 3301,
                protocol: Protocol::Rfc,
                host_in_header: HostInHeader::Virtual,
                authentication_mode: Default::default(),
                principal_certificate_in: Default::default(),
                resources: vec![],
                description: None,
            },
        ])
    }

    #[test]
    fn http_table() {
        use DenyReason::*;
        let r = rules();
        let table: &[(&str, u16, &str, Option<DenyReason>)] = &[
            ("erp.virtual", 8080, "/ws", None),
            ("erp.virtual", 8080, "/sap/opu", None),
            ("ERP.Virtual", 8080, "/sap/opu/odata/x", None),
            ("erp.virtual", 8080, "/sap/opu-plus", None), // SAP: plain string prefix
            ("erp.virtual", 8080, "/sap/op", Some(Resource)),
            ("erp.virtual", 8080, "/SAP/opu", Some(Resource)), // case-sensitive
            ("erp.virtual", 8080, "/exact", None),
            ("erp.virtual", 8080, "/exact/sub", Some(Resource)),
            ("erp.virtual", 8080, "/suspended/x", Some(Resource)),
            ("erp.virtual", 8081, "/sap/opu", Some(NoMapping)),
            ("other.virtual", 8080, "/sap/opu", Some(NoMapping)),
            ("smtp.virtual", 25, "/", Some(WrongProtocol)),
            ("erp.virtual", 8080, "/sap/opu/../../admin", Some(AmbiguousPath)),
            ("erp.virtual", 8080, "/sap/opu/%2e%2e/admin", Some(AmbiguousPath)),
            ("erp.virtual", 8080, "/sap/opu%2F..%2Fadmin", Some(AmbiguousPath)),
            ("erp.virtual", 8080, "/sap/opu/%zz", Some(AmbiguousPath)),
            ("erp.virtual", 8080, "/sap/opu/a\\b", Some(AmbiguousPath)),
            ("erp.virtual", 8080, "/sap/opu/%00", Some(AmbiguousPath)),
            ("erp.virtual", 8080, "/sap/opu/..;/admin", Some(AmbiguousPath)),
            ("erp.virtual", 8080, "/sap/opu/.;x/y", Some(AmbiguousPath)),
            ("erp.virtual", 8080, "/sap/opu/%2e%2e;jsessionid=1/admin", Some(AmbiguousPath)),
            ("erp.virtual", 8080, "/sap/opu/odata;v=2/x", None), // parameters on a real segment
            ("erp.virtual", 8080, "sap/opu", Some(AmbiguousPath)),
            ("erp.virtual", 8080, "/sap/%6Fpu/x", None), // decoded before matching
        ];
        for (host, port, path, want) in table {
            let got = r.check(AccessRequest::Http { host, port: *port, path, upgrade: false });
            match want {
                None => assert!(matches!(got, Decision::Allow(_)), "{host}:{port}{path} -> {got:?}"),
                Some(reason) => assert_eq!(got, Decision::Deny(*reason), "{host}:{port}{path}"),
            }
        }
    }

    #[test]
    fn upgrades_need_a_granting_resource_that_allows_them() {
        let r = rules();
        let check = |path| r.check(AccessRequest::Http { host: "erp.virtual", port: 8080, path, upgrade: true });
        // `/ws` grants the path; `/ws/chat` (also granting it) allows the upgrade.
        assert!(matches!(check("/ws/chat/room"), Decision::Allow(_)));
        assert_eq!(check("/ws/other"), Decision::Deny(DenyReason::UpgradeNotAllowed));
        assert_eq!(check("/ws/off/x"), Decision::Deny(DenyReason::UpgradeNotAllowed), "suspended resource");
        assert_eq!(check("/sap/opu"), Decision::Deny(DenyReason::UpgradeNotAllowed));
        assert_eq!(check("/nothing"), Decision::Deny(DenyReason::Resource));
        assert_eq!(check("/ws/chat/../x"), Decision::Deny(DenyReason::AmbiguousPath));
    }

    #[test]
    fn tcp_table() {
        let r = rules();
        assert!(
            matches!(r.check(AccessRequest::Tcp { host: "smtp.virtual", port: 25 }), Decision::Allow(m) if m.local_port == 2525)
        );
        assert_eq!(
            r.check(AccessRequest::Tcp { host: "smtp.virtual", port: 26 }),
            Decision::Deny(DenyReason::NoMapping)
        );
        assert_eq!(
            r.check(AccessRequest::Tcp { host: "erp.virtual", port: 8080 }),
            Decision::Deny(DenyReason::WrongProtocol)
        );
        // RFC is relayed as a stream to the gateway port; the mapping is the whole grant.
        assert!(
            matches!(r.check(AccessRequest::Tcp { host: "ecc.virtual", port: 3300 }), Decision::Allow(m) if m.local_port == 3301)
        );
        assert_eq!(
            r.check(AccessRequest::Http { host: "ecc.virtual", port: 3300, path: "/", upgrade: false }),
            Decision::Deny(DenyReason::WrongProtocol)
        );
        let rfc: Protocol = serde_json::from_str("\"RFC\"").unwrap();
        assert_eq!(rfc, Protocol::Rfc);
        assert!(serde_json::from_str::<Protocol>("\"RFCS\"").is_err(), "SNC is not offered");
    }

    #[test]
    fn ip_literals_match_by_address() {
        let m = |host: &str| SystemMapping {
            virtual_host: host.into(),
            virtual_port: 389,
            local_host: "127.0.0.1".into(),
            local_port: 1389,
            protocol: Protocol::Ldap,
            host_in_header: HostInHeader::Virtual,
            authentication_mode: Default::default(),
            principal_certificate_in: Default::default(),
            resources: vec![],
            description: None,
        };
        for mapped in ["[::1]", "::1", "0:0:0:0:0:0:0:1"] {
            let r = AccessRules::new(vec![m(mapped)]);
            assert!(matches!(r.check(AccessRequest::Tcp { host: "::1", port: 389 }), Decision::Allow(_)), "{mapped}");
            assert!(matches!(r.check(AccessRequest::Tcp { host: "[::1]", port: 389 }), Decision::Allow(_)));
            assert_eq!(r.check(AccessRequest::Tcp { host: "::2", port: 389 }), Decision::Deny(DenyReason::NoMapping));
        }
        let r = AccessRules::new(vec![m("LDAP.Virtual")]);
        assert!(matches!(r.check(AccessRequest::Tcp { host: "ldap.virtual", port: 389 }), Decision::Allow(_)));
    }

    #[test]
    fn mapping_deserializes_from_sap_names() {
        let m: SystemMapping = serde_json::from_str(
            r#"{"virtualHost":"a.virtual","virtualPort":80,"localHost":"127.0.0.1","localPort":8080,
               "protocol":"HTTP","resources":[{"id":"/","exactMatchOnly":false}]}"#,
        )
        .unwrap();
        assert!(m.resources[0].enabled);
        assert!(
            serde_json::from_str::<SystemMapping>(
                r#"{"virtualHost":"a","virtualPort":1,"localHost":"b","localPort":2,"protocol":"HTTP","bogus":1}"#
            )
            .is_err()
        );
    }
}
