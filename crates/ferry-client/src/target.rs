//! Where a `TCP`, `LDAP` or `MAIL` destination points: the virtual host and port of a Cloud
//! Connector mapping and the location id, read from the properties the Destination Service
//! returns (`destinationConfiguration` of `GET /destination-configuration/v1/destinations/{name}`).
//!
//! - `TCP`: `Address` = `[tcp://]host:port` (IPv6 as `[::1]:389`);
//! - `LDAP`: `ldap.url` = `ldap://host[:port]` or `ldaps://host[:port]` (defaults 389 / 636); the
//!   proxy type is `ldap.proxyType` (or `ProxyType`);
//! - `MAIL`: `mail.smtp.host`/`mail.smtp.port`, `mail.imap.*` (also `mail.imap4.*`), `mail.pop3.*`,
//!   and the `*s` variants (`mail.smtps.*`, `mail.imaps.*`, `mail.pop3s.*`, names UNCONFIRMED for
//!   SAP) with JavaMail's default ports when the port is missing. Which protocol: the caller's
//!   choice, else `mail.transport.protocol`, else the first of SMTP, IMAP, POP3 with a host.
//!
//! Only `OnPremise` destinations are accepted: the others do not go through the Connectivity Proxy.

use std::fmt;

use serde_json::Value;

/// Which mail service of a `MAIL` destination to reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailProtocol {
    Smtp,
    Imap,
    Pop3,
}

impl std::str::FromStr for MailProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "smtp" | "smtps" => Ok(MailProtocol::Smtp),
            "imap" | "imaps" | "imap4" => Ok(MailProtocol::Imap),
            "pop3" | "pop3s" => Ok(MailProtocol::Pop3),
            other => Err(format!("unknown mail protocol {other:?}; use smtp, imap or pop3")),
        }
    }
}

impl MailProtocol {
    /// Property prefixes to look at, in order, with the port used when `<prefix>.port` is absent.
    fn prefixes(self) -> &'static [(&'static str, u16)] {
        match self {
            MailProtocol::Smtp => &[("mail.smtp", 25), ("mail.smtps", 465)],
            MailProtocol::Imap => &[("mail.imap", 143), ("mail.imap4", 143), ("mail.imaps", 993)],
            MailProtocol::Pop3 => &[("mail.pop3", 110), ("mail.pop3s", 995)],
        }
    }
}

/// A virtual `host:port` behind a Cloud Connector at `location_id` ("" = the default location).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpTarget {
    /// Host name or IP literal, without brackets.
    pub host: String,
    pub port: u16,
    pub location_id: String,
}

/// `host:port`, IPv6 in brackets.
impl fmt::Display for TcpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error("destination {name:?} has Type {ty:?}; only TCP, LDAP and MAIL destinations are reached through SOCKS5")]
    UnsupportedType { name: String, ty: String },
    #[error("destination {name:?} has no property {key}")]
    Missing { name: String, key: String },
    #[error("destination {name:?}: {key} = {value:?} is not valid: {why}")]
    Invalid { name: String, key: String, value: String, why: String },
    #[error(
        "destination {name:?} has {key} = {value:?}; only OnPremise destinations go through the Connectivity Proxy"
    )]
    NotOnPremise { name: String, key: String, value: String },
}

/// A property as text: the Destination Service returns strings, hand-written JSON may use numbers.
fn prop(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Splits `host:port` (IPv6 in brackets); `default_port` when there is no port.
fn host_port(s: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("an IPv6 address needs its closing ']'")?;
        (host, after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => return Err("write an IPv6 address in brackets: [::1]:389".into()),
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    let port = match (port, default_port) {
        (Some(p), _) => p.parse::<u16>().ok().filter(|&p| p != 0).ok_or(format!("{p:?} is not a port (1-65535)"))?,
        (None, Some(d)) => d,
        (None, None) => return Err("expected host:port".into()),
    };
    Ok((host.to_owned(), port))
}

/// The target of `config` (a destination's properties). `mail` picks the mail service of a
/// `MAIL` destination and is ignored for other types.
///
/// ```
/// use ferry_client::{MailProtocol, tcp_target};
/// let ldap = serde_json::json!({"Name": "dir", "Type": "LDAP", "ldap.proxyType": "OnPremise",
///                               "ldap.url": "ldaps://dir.virtual"});
/// let t = tcp_target(&ldap, None)?;
/// assert_eq!((t.host.as_str(), t.port), ("dir.virtual", 636));
/// let mail = serde_json::json!({"Name": "mail", "Type": "MAIL", "ProxyType": "OnPremise", "mail.smtp.host": "smtp.virtual",
///                               "mail.smtp.port": "587", "mail.imap.host": "imap.virtual"});
/// assert_eq!(tcp_target(&mail, Some(MailProtocol::Smtp))?.port, 587);
/// assert_eq!(tcp_target(&mail, Some(MailProtocol::Imap))?.port, 143);
/// # Ok::<(), ferry_client::TargetError>(())
/// ```
pub fn tcp_target(config: &Value, mail: Option<MailProtocol>) -> Result<TcpTarget, TargetError> {
    let name = prop(config, "Name").unwrap_or_default();
    let missing = |key: &str| TargetError::Missing { name: name.clone(), key: key.to_owned() };
    let invalid = |key: &str, value: &str, why: String| TargetError::Invalid {
        name: name.clone(),
        key: key.to_owned(),
        value: value.to_owned(),
        why,
    };
    let ty = prop(config, "Type").ok_or_else(|| missing("Type"))?;
    let on_premise = |keys: &[&str]| -> Result<(), TargetError> {
        let found = keys.iter().find_map(|k| prop(config, k).map(|v| (*k, v)));
        match found {
            Some((_, v)) if v.eq_ignore_ascii_case("OnPremise") => Ok(()),
            Some((k, v)) => Err(TargetError::NotOnPremise { name: name.clone(), key: k.to_owned(), value: v }),
            None => Err(missing(keys[0])),
        }
    };
    let (host, port) = match ty.to_ascii_uppercase().as_str() {
        "TCP" => {
            on_premise(&["ProxyType"])?;
            let address = prop(config, "Address").ok_or_else(|| missing("Address"))?;
            let bare = match address.get(..6) {
                Some(scheme) if scheme.eq_ignore_ascii_case("tcp://") => &address[6..],
                _ => address.as_str(),
            };
            host_port(bare.trim_end_matches('/'), None).map_err(|why| invalid("Address", &address, why))?
        }
        "LDAP" => {
            on_premise(&["ldap.proxyType", "ProxyType"])?;
            let url = prop(config, "ldap.url").ok_or_else(|| missing("ldap.url"))?;
            let (scheme, rest) =
                url.split_once("://").ok_or_else(|| invalid("ldap.url", &url, "expected ldap://host:port".into()))?;
            let default = match scheme.to_ascii_lowercase().as_str() {
                "ldap" => 389,
                "ldaps" => 636,
                _ => return Err(invalid("ldap.url", &url, "the scheme must be ldap or ldaps".into())),
            };
            let authority = rest.split('/').next().unwrap_or_default();
            host_port(authority, Some(default)).map_err(|why| invalid("ldap.url", &url, why))?
        }
        "MAIL" => {
            on_premise(&["ProxyType"])?;
            let has_host = |p: MailProtocol| {
                p.prefixes().iter().any(|(prefix, _)| prop(config, &format!("{prefix}.host")).is_some())
            };
            let protocol = match mail {
                Some(p) => p,
                None => match prop(config, "mail.transport.protocol") {
                    Some(p) => p.parse().map_err(|why| invalid("mail.transport.protocol", &p, why))?,
                    None => [MailProtocol::Smtp, MailProtocol::Imap, MailProtocol::Pop3]
                        .into_iter()
                        .find(|&p| has_host(p))
                        .unwrap_or(MailProtocol::Smtp),
                },
            };
            let prefixes = protocol.prefixes();
            let Some((prefix, host, default)) =
                prefixes.iter().find_map(|(prefix, d)| prop(config, &format!("{prefix}.host")).map(|h| (prefix, h, d)))
            else {
                return Err(missing(&format!("{}.host", prefixes[0].0)));
            };
            let port_key = format!("{prefix}.port");
            let port = match prop(config, &port_key) {
                Some(p) => p
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| invalid(&port_key, &p, "not a port (1-65535)".into()))?,
                None => *default,
            };
            let host_key = format!("{prefix}.host");
            let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(&host).to_owned();
            if bare.is_empty() {
                return Err(missing(&host_key));
            }
            (bare, port)
        }
        _ => return Err(TargetError::UnsupportedType { name: name.clone(), ty }),
    };
    let location_id = prop(config, "CloudConnectorLocationId").unwrap_or_default();
    Ok(TcpTarget { host, port, location_id })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use serde_json::json;

    fn t(host: &str, port: u16, loc: &str) -> TcpTarget {
        TcpTarget { host: host.into(), port, location_id: loc.into() }
    }

    #[test]
    fn tcp_ldap_and_mail_targets() {
        let tcp = json!({"Name": "t", "Type": "TCP", "ProxyType": "OnPremise", "Address": "tcp://db.virtual:5432",
                         "CloudConnectorLocationId": "loc-1"});
        assert_eq!(tcp_target(&tcp, None), Ok(t("db.virtual", 5432, "loc-1")));
        let v6 = json!({"Type": "TCP", "ProxyType": "OnPremise", "Address": "[::1]:7"});
        assert_eq!(tcp_target(&v6, None).unwrap().to_string(), "[::1]:7");
        let ldap = json!({"Type": "LDAP", "ldap.proxyType": "OnPremise", "ldap.url": "ldaps://dir.virtual"});
        assert_eq!(tcp_target(&ldap, None), Ok(t("dir.virtual", 636, "")));
        let ldap = json!({"Type": "LDAP", "ldap.proxyType": "OnPremise", "ldap.url": "ldap://dir.virtual:1389/dc=x"});
        assert_eq!(tcp_target(&ldap, None), Ok(t("dir.virtual", 1389, "")));
        let mail = json!({"Type": "MAIL", "ProxyType": "OnPremise", "mail.smtp.host": "smtp.virtual",
                          "mail.smtp.port": "587", "mail.imaps.host": "imap.virtual", "mail.pop3.host": "pop.virtual",
                          "mail.pop3.port": 1110, "mail.transport.protocol": "imaps"});
        assert_eq!(tcp_target(&mail, Some(MailProtocol::Smtp)), Ok(t("smtp.virtual", 587, "")));
        assert_eq!(tcp_target(&mail, None), Ok(t("imap.virtual", 993, "")), "mail.transport.protocol decides");
        assert_eq!(tcp_target(&mail, Some(MailProtocol::Pop3)), Ok(t("pop.virtual", 1110, "")));
        let pop_only = json!({"Type": "MAIL", "ProxyType": "OnPremise", "mail.pop3s.host": "pop.virtual"});
        assert_eq!(tcp_target(&pop_only, None), Ok(t("pop.virtual", 995, "")), "the one service it names");
    }

    #[test]
    fn bad_destinations_say_what_to_fix() {
        let cases = [
            (json!({"Name": "h", "Type": "HTTP", "ProxyType": "OnPremise"}), "only TCP, LDAP and MAIL"),
            (json!({"Name": "i", "Type": "TCP", "ProxyType": "Internet", "Address": "a:1"}), "only OnPremise"),
            (json!({"Name": "n", "Type": "TCP", "ProxyType": "OnPremise"}), "no property Address"),
            (json!({"Name": "p", "Type": "TCP", "ProxyType": "OnPremise", "Address": "a:99999"}), "not a port"),
            (json!({"Name": "6", "Type": "TCP", "ProxyType": "OnPremise", "Address": "::1:7"}), "in brackets"),
            (
                json!({"Name": "u", "Type": "LDAP", "ldap.proxyType": "OnPremise", "ldap.url": "http://x"}),
                "ldap or ldaps",
            ),
            (json!({"Name": "m", "Type": "MAIL", "ProxyType": "OnPremise", "mail.smtp.host": "s"}), "mail.imap.host"),
        ];
        for (config, words) in cases {
            let proto = (config["Type"] == "MAIL").then_some(MailProtocol::Imap);
            let e = tcp_target(&config, proto).unwrap_err().to_string();
            assert!(e.contains(words), "{e}");
        }
    }
}
