//! What a destination must contain for its `Type` and `Authentication` (SPEC §1.12, §1.13, §2.1).
//!
//! These rules run when a destination or fragment is written through the API, not when a stored
//! one is read back: a rule added later must never make existing rows unreadable. They are
//! strict where SAP's editor and clients are (required keys of an authentication type, the
//! spelling of enumerations and booleans, URL schemes, RFC numbers) and leave every key they do
//! not know alone, because SAP keeps unknown keys as additional properties.
//!
//! Required keys are checked on the destination as stored, before fragments are merged in:
//! SAP's editor asks for them there too.

use crate::destination::ValidationError;
use crate::kinds::{AuthenticationType, DestinationType};

/// Longest property key accepted; SAP's own keys stay under 64 characters.
pub const MAX_PROPERTY_NAME_LEN: usize = 512;
/// Longest property value accepted (a JWKS in `x_user_token.jwks` is the largest real one).
pub const MAX_PROPERTY_VALUE_LEN: usize = 64 * 1024;

fn violation(property: &str, rule: impl Into<String>) -> ValidationError {
    ValidationError::Rule { property: property.to_owned(), rule: rule.into() }
}

type Props<'a> = [(&'a str, &'a str)];

fn get<'a>(props: &Props<'a>, key: &str) -> Option<&'a str> {
    props.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// Set and not empty: SAP tools write `""` for "not chosen".
fn present<'a>(props: &Props<'a>, key: &str) -> Option<&'a str> {
    get(props, key).filter(|v| !v.is_empty())
}

/// An enumeration: allowed spellings, compared exactly (the clients compare them that way).
const PROXY_TYPES: &[&str] = &["Internet", "OnPremise", "PrivateLink"];
const ENUMS: &[(&str, &[&str])] = &[
    ("tokenServiceURLType", &["Dedicated", "Common"]),
    ("tokenServiceURL.ProxyType", PROXY_TYPES),
    ("HostnameVerifier", &["Strict", "BrowserCompatible"]),
    ("KeyStore.Source", &["DestinationService", "ClientProvided"]),
    ("SAMLAssertionProvider", &["DestinationServiceGenerated", "ClientProvided"]),
    ("samlAssertionEncoding", &["base64", "base64url"]),
    ("jco.destination.proxy_type", &["Internet", "OnPremise", "Local"]),
    ("jco.destination.auth_type", &["CONFIGURED_USER", "PrincipalPropagation", "TechnicalUserPropagation"]),
    ("jco.client.serialization_format", &["columnBased", "rowBased"]),
    ("jco.client.network", &["WAN", "LAN"]),
    ("jco.client.trace", &["0", "1"]),
    ("jco.client.delta", &["0", "1"]),
    ("ldap.proxyType", &["Internet", "OnPremise"]),
    ("ldap.authentication", &["NoAuthentication", "BasicAuthentication"]),
    ("mail.transport.protocol", &["smtp", "smtps", "imap", "imap4", "imaps", "pop3", "pop3s"]),
];

/// Booleans: `true`/`false` in any letter case (SAP's examples write `TRUE`).
const BOOLEANS: &[&str] = &[
    "TrustAll",
    "Preemptive",
    "tokenService.addClientCredentialsInBody",
    "skipUserAttributesPrefixInSAMLAttributes",
    "includeSigningCertificateInSAMLAssertion",
    "skipUserUuidInSAMLAttributes",
    "jco.client.tls_trust_all",
    "jco.client.tls_client_certificate_logon",
    "jco.destination.pool_check_connection",
    "tcp.nodelay",
    "tcp.socket.keepalive",
    "tcp.socket.reuseaddr",
];

/// Whole numbers with an inclusive range.
const NUMBERS: &[(&str, u64, u64)] = &[
    // SAP accepts any whole number here and uses the default (10 s) outside 0–60 and 0–600
    // (SPEC §2.3); the token client does the same, so an export from SAP imports unchanged.
    ("tokenServiceURL.ConnectionTimeoutInSeconds", 0, u32::MAX as u64),
    ("tokenServiceURL.SocketReadTimeoutInSeconds", 0, u32::MAX as u64),
    ("jco.destination.pool_capacity", 0, 1_000_000),
    ("jco.destination.peak_limit", 0, 1_000_000),
    ("jco.destination.max_get_client_time", 0, u32::MAX as u64),
    ("jco.destination.expiration_time", 0, u32::MAX as u64),
    ("jco.destination.expiration_check_period", 0, u32::MAX as u64),
    ("jco.destination.repository.check_interval", 0, u32::MAX as u64),
    ("jco.destination.ws_ping_period", 0, u32::MAX as u64),
    ("jco.destination.ws_pong_timeout", 0, u32::MAX as u64),
    ("jco.client.wsport", 1, 65_535),
    ("tcp.socket.linger", 0, u32::MAX as u64),
    ("tcp.socket.sndbuf", 0, u32::MAX as u64),
    ("tcp.socket.rcvbuf", 0, u32::MAX as u64),
    ("tcp.socket.timeout", 0, u32::MAX as u64),
];

/// Fixed-width digit strings (`jco.client.client` = `001`), and maximum lengths.
const DIGITS: &[(&str, usize)] = &[("jco.client.client", 3), ("jco.client.sysnr", 2), ("jco.client.codepage", 4)];
const MAX_LENGTHS: &[(&str, usize)] = &[("jco.client.user", 12), ("jco.client.alias_user", 40), ("jco.client.lang", 2)];

/// Rules that depend only on one key and its value: they hold for fragments too.
pub(crate) fn check_property(key: &str, value: &str) -> Result<(), ValidationError> {
    let key_len = key.chars().count();
    if key_len > MAX_PROPERTY_NAME_LEN {
        let prefix: String = key.chars().take(40).collect();
        return Err(violation(
            &format!("{prefix}…"),
            format!("has a name of {key_len} characters; the limit is {MAX_PROPERTY_NAME_LEN}"),
        ));
    }
    if let Some(ch) = key.chars().find(|c| c.is_control()) {
        return Err(violation(key, format!("has a name with the control character {ch:?}; remove it")));
    }
    if value.len() > MAX_PROPERTY_VALUE_LEN {
        return Err(violation(
            key,
            format!("has a value of {} bytes; the limit is {MAX_PROPERTY_VALUE_LEN}", value.len()),
        ));
    }
    // Empty means "not set" for every typed key below.
    if value.is_empty() {
        return Ok(());
    }
    if let Some((_, allowed)) = ENUMS.iter().find(|(k, _)| *k == key) {
        return one_of(key, value, allowed);
    }
    if BOOLEANS.contains(&key) || is_mail_boolean(key) {
        return boolean(key, value);
    }
    if let Some((_, min, max)) = NUMBERS.iter().find(|(k, _, _)| *k == key) {
        return number(key, value, *min, *max);
    }
    if is_mail_port(key) {
        return number(key, value, 1, 65_535);
    }
    if let Some((_, width)) = DIGITS.iter().find(|(k, _)| *k == key)
        && !(value.len() == *width && value.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(violation(key, format!("must be exactly {width} digits, such as '{}'", "0".repeat(*width))));
    }
    if let Some((_, max)) = MAX_LENGTHS.iter().find(|(k, _)| *k == key)
        && value.chars().count() > *max
    {
        return Err(violation(key, format!("is longer than {max} characters")));
    }
    match key {
        "URL" | "tokenServiceURL" | "jco.client.tech_user_service_url" => http_url(key, value),
        "ldap.url" => ldap_url(key, value),
        "Address" => address(key, value),
        _ => Ok(()),
    }
}

/// `mail.smtp.port`, `mail.imaps.port`, ...: a port number.
fn is_mail_port(key: &str) -> bool {
    key.starts_with("mail.") && key.ends_with(".port") && key.matches('.').count() == 2
}

/// `mail.smtp.auth`, `mail.smtp.starttls.enable`, `mail.imap.ssl.enable`, ...
fn is_mail_boolean(key: &str) -> bool {
    key.starts_with("mail.")
        && (key.ends_with(".auth")
            || key.ends_with(".starttls.enable")
            || key.ends_with(".starttls.required")
            || key.ends_with(".ssl.enable"))
}

fn one_of(key: &str, value: &str, allowed: &[&str]) -> Result<(), ValidationError> {
    if allowed.contains(&value) {
        return Ok(());
    }
    Err(violation(key, format!("has the value '{value}'; use one of: {}", allowed.join(", "))))
}

fn boolean(key: &str, value: &str) -> Result<(), ValidationError> {
    if value.eq_ignore_ascii_case("true") || value.eq_ignore_ascii_case("false") {
        return Ok(());
    }
    Err(violation(key, format!("has the value '{value}'; use true or false")))
}

fn number(key: &str, value: &str, min: u64, max: u64) -> Result<(), ValidationError> {
    match value.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) && value.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err(violation(key, format!("has the value '{value}'; use a whole number from {min} to {max}"))),
    }
}

/// `rest` (after the scheme) has a non-empty authority without whitespace.
fn has_authority(rest: &str) -> bool {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    !authority.is_empty() && !rest.chars().any(char::is_whitespace)
}

fn strip_scheme<'a>(value: &'a str, schemes: &[&str]) -> Option<&'a str> {
    schemes.iter().find_map(|s| {
        let n = s.len();
        (value.len() > n && value.is_char_boundary(n) && value[..n].eq_ignore_ascii_case(s)).then(|| &value[n..])
    })
}

/// An absolute `http(s)://` URL. Parsed loosely on purpose: `tokenServiceURL` may hold a
/// `{tenant}` placeholder in its host (SPEC §2.2), which no URL parser accepts.
fn http_url(key: &str, value: &str) -> Result<(), ValidationError> {
    match strip_scheme(value, &["https://", "http://"]) {
        Some(rest) if has_authority(rest) => Ok(()),
        _ => Err(violation(key, format!("is '{value}'; it must be an absolute http:// or https:// URL"))),
    }
}

fn ldap_url(key: &str, value: &str) -> Result<(), ValidationError> {
    match strip_scheme(value, &["ldaps://", "ldap://"]) {
        Some(rest) if has_authority(rest) => Ok(()),
        _ => Err(violation(key, format!("is '{value}'; it must be an ldap:// or ldaps:// URL"))),
    }
}

/// `[tcp://]host:port`.
fn address(key: &str, value: &str) -> Result<(), ValidationError> {
    let rest = strip_scheme(value, &["tcp://"]).unwrap_or(value);
    let ok = rest.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && !host.chars().any(|c| c.is_whitespace() || c == '/')
            && port.parse::<u16>().is_ok_and(|p| p > 0)
            && port.bytes().all(|b| b.is_ascii_digit())
    });
    if ok {
        return Ok(());
    }
    Err(violation(key, format!("is '{value}'; it must be host:port (optionally tcp://host:port)")))
}

fn require(props: &Props<'_>, key: &str, why: impl FnOnce() -> String) -> Result<(), ValidationError> {
    if present(props, key).is_some() {
        return Ok(());
    }
    Err(violation(key, format!("is required {}", why())))
}

/// The whole-destination rules: per-key rules plus what its `Type` and `Authentication` need.
pub(crate) fn check_destination(props: &Props<'_>) -> Result<(), ValidationError> {
    for (k, v) in props {
        check_property(k, v)?;
    }
    let kind = get(props, "Type").and_then(|t| t.parse().ok()).unwrap_or(DestinationType::Http);
    let auth: Option<AuthenticationType> = present(props, "Authentication").and_then(|a| a.parse().ok());
    match kind {
        DestinationType::Http => {
            proxy_type(props)?;
            require(props, "URL", || "for Type 'HTTP'".into())?;
            if let Some(auth) = auth {
                authentication(props, auth, false)?;
            }
        }
        DestinationType::Mail => {
            proxy_type(props)?;
            if let Some(auth) = auth {
                authentication(props, auth, true)?;
            }
        }
        DestinationType::Tcp => {
            proxy_type(props)?;
            require(props, "Address", || "for Type 'TCP' (host:port)".into())?;
        }
        DestinationType::Ldap => {
            require(props, "ldap.url", || "for Type 'LDAP' (ldap://host:port or ldaps://host:port)".into())?;
        }
        DestinationType::Rfc => rfc(props)?,
    }
    Ok(())
}

fn proxy_type(props: &Props<'_>) -> Result<(), ValidationError> {
    match present(props, "ProxyType") {
        Some(p) => one_of("ProxyType", p, PROXY_TYPES),
        None => Ok(()),
    }
}

/// SPEC §2.1: the keys each authentication type needs, and the proxy types it allows. A MAIL
/// destination keeps its user and password in `mail.user`/`mail.password`.
fn authentication(props: &Props<'_>, auth: AuthenticationType, mail: bool) -> Result<(), ValidationError> {
    use AuthenticationType::*;
    let (user, password) = if mail { ("mail.user", "mail.password") } else { ("User", "Password") };
    let required: &[&str] = match auth {
        BasicAuthentication => &[user, password],
        OAuth2ClientCredentials
        | OAuth2UserTokenExchange
        | OAuth2JWTBearer
        | OAuth2RefreshToken
        | OAuth2AuthorizationCode
        | OAuth2TechnicalUserPropagation
        | OAuth2TokenExchange => &["clientId", "tokenServiceURL"],
        OAuth2Password => &["clientId", "tokenServiceURL", user, password],
        OAuth2SAMLBearerAssertion => &["audience", "clientKey", "tokenServiceURL", "authnContextClassRef"],
        SAMLAssertion => &["audience", "authnContextClassRef"],
        NoAuthentication | ClientCertificateAuthentication | PrincipalPropagation | SAPAssertionSSO => &[],
    };
    for key in required {
        require(props, key, || format!("for Authentication '{auth}'"))?;
    }
    if matches!(auth, PrincipalPropagation | OAuth2TechnicalUserPropagation) {
        let proxy = present(props, "ProxyType").unwrap_or("Internet");
        if proxy != "OnPremise" {
            return Err(violation(
                "ProxyType",
                format!("is '{proxy}', but Authentication '{auth}' works only with ProxyType 'OnPremise'"),
            ));
        }
    }
    Ok(())
}

/// SPEC §1.13: an RFC destination names its target as an application server
/// (`ashost`+`sysnr`), a message server (`mshost`+`r3name` or `msserv`) or a WebSocket host
/// (`wshost`+`wsport`).
fn rfc(props: &Props<'_>) -> Result<(), ValidationError> {
    let has = |k: &str| present(props, k).is_some();
    if has("jco.client.ashost") {
        require(props, "jco.client.sysnr", || "with 'jco.client.ashost' (the instance number, such as '00')".into())?;
    } else if has("jco.client.mshost") {
        if !has("jco.client.r3name") && !has("jco.client.msserv") {
            return Err(violation(
                "jco.client.r3name",
                "is required with 'jco.client.mshost' (or set 'jco.client.msserv'), naming the system",
            ));
        }
    } else if has("jco.client.wshost") {
        require(props, "jco.client.wsport", || "with 'jco.client.wshost'".into())?;
    } else {
        return Err(violation(
            "jco.client.ashost",
            "is required for Type 'RFC': set 'jco.client.ashost' and 'jco.client.sysnr', or \
             'jco.client.mshost' and 'jco.client.r3name', or 'jco.client.wshost' and 'jco.client.wsport'",
        ));
    }
    if present(props, "jco.destination.auth_type") == Some("TechnicalUserPropagation") {
        for key in ["jco.client.tech_user_id", "jco.client.tech_user_secret", "jco.client.tech_user_service_url"] {
            require(props, key, || "for 'jco.destination.auth_type' 'TechnicalUserPropagation'".into())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(props: &[(&str, &str)]) -> Result<(), String> {
        check_destination(props).map_err(|e| e.to_string())
    }

    const HTTP: [(&str, &str); 3] = [("Name", "d"), ("Type", "HTTP"), ("URL", "https://example.org/x")];

    fn http(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        HTTP.iter().chain(extra).copied().collect()
    }

    #[test]
    fn valid_destinations_of_every_type() {
        let ok: Vec<Vec<(&str, &str)>> = vec![
            http(&[]),
            http(&[("Authentication", "NoAuthentication"), ("ProxyType", "PrivateLink"), ("Unknown.Key", "kept")]),
            http(&[
                ("Authentication", "BasicAuthentication"),
                ("User", "u"),
                ("Password", "p"),
                ("Preemptive", "TRUE"),
            ]),
            http(&[
                ("Authentication", "OAuth2ClientCredentials"),
                ("clientId", "c"),
                ("tokenServiceURL", "https://{tenant}.auth.example.org/oauth/token"),
                ("tokenServiceURLType", "Common"),
                // Out of SAP's range: accepted, the default applies at run time.
                ("tokenServiceURL.ConnectionTimeoutInSeconds", "90"),
                ("tokenServiceURL.SocketReadTimeoutInSeconds", "0"),
            ]),
            http(&[("Authentication", "PrincipalPropagation"), ("ProxyType", "OnPremise")]),
            http(&[("Authentication", ""), ("ProxyType", ""), ("TrustAll", "")]),
            http(&[
                ("Authentication", "OAuth2SAMLBearerAssertion"),
                ("audience", "a"),
                ("clientKey", "k"),
                ("tokenServiceURL", "http://h/t"),
                ("authnContextClassRef", "urn:x"),
            ]),
            vec![("Name", "r"), ("Type", "RFC"), ("jco.client.ashost", "h"), ("jco.client.sysnr", "00")],
            vec![
                ("Name", "r"),
                ("Type", "RFC"),
                ("jco.client.mshost", "h"),
                ("jco.client.r3name", "ABC"),
                ("jco.client.client", "100"),
                ("jco.destination.pool_capacity", "3"),
                ("jco.destination.proxy_type", "OnPremise"),
            ],
            vec![("Name", "r"), ("Type", "RFC"), ("jco.client.wshost", "h"), ("jco.client.wsport", "443")],
            vec![("Name", "l"), ("Type", "LDAP"), ("ldap.url", "ldaps://dir:636"), ("ldap.proxyType", "OnPremise")],
            vec![
                ("Name", "m"),
                ("Type", "MAIL"),
                ("ProxyType", "OnPremise"),
                ("Authentication", "BasicAuthentication"),
                ("mail.user", "u"),
                ("mail.password", "p"),
                ("mail.smtp.port", "25"),
                ("mail.smtp.starttls.enable", "true"),
                ("mail.transport.protocol", "smtp"),
            ],
            vec![("Name", "t"), ("Type", "TCP"), ("Address", "tcp://db.virtual:5432")],
            vec![("Name", "t"), ("Type", "TCP"), ("Address", "[::1]:22"), ("tcp.nodelay", "false")],
        ];
        for props in ok {
            assert_eq!(check(&props), Ok(()), "{props:?}");
        }
    }

    #[test]
    fn each_violation_names_the_property_and_the_rule() {
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (vec![("Name", "d"), ("Type", "HTTP")], "property 'URL' is required for Type 'HTTP'"),
            (
                http(&[]).into_iter().map(|(k, v)| if k == "URL" { (k, "") } else { (k, v) }).collect(),
                "'URL' is required",
            ),
            (
                vec![("Name", "d"), ("Type", "HTTP"), ("URL", "example.org")],
                "'URL' is 'example.org'; it must be an absolute",
            ),
            (vec![("Name", "d"), ("Type", "HTTP"), ("URL", "ftp://x")], "absolute http:// or https:// URL"),
            (vec![("Name", "d"), ("Type", "HTTP"), ("URL", "https://")], "absolute http"),
            (
                http(&[("ProxyType", "Cloud")]),
                "'ProxyType' has the value 'Cloud'; use one of: Internet, OnPremise, PrivateLink",
            ),
            (
                http(&[("Authentication", "OAuth2ClientCredentials"), ("clientId", "c")]),
                "property 'tokenServiceURL' is required for Authentication 'OAuth2ClientCredentials'",
            ),
            (
                http(&[("Authentication", "OAuth2Password"), ("clientId", "c"), ("tokenServiceURL", "https://t")]),
                "property 'User' is required for Authentication 'OAuth2Password'",
            ),
            (http(&[("Authentication", "BasicAuthentication"), ("User", "u")]), "property 'Password' is required"),
            (http(&[("Authentication", "SAMLAssertion"), ("audience", "a")]), "'authnContextClassRef' is required"),
            (
                http(&[("Authentication", "PrincipalPropagation")]),
                "'ProxyType' is 'Internet', but Authentication 'PrincipalPropagation' works only with ProxyType 'OnPremise'",
            ),
            (
                http(&[
                    ("Authentication", "OAuth2ClientCredentials"),
                    ("clientId", "c"),
                    ("tokenServiceURL", "/token"),
                ]),
                "'tokenServiceURL' is '/token'",
            ),
            (http(&[("tokenServiceURLType", "dedicated")]), "use one of: Dedicated, Common"),
            (http(&[("TrustAll", "yes")]), "'TrustAll' has the value 'yes'; use true or false"),
            (http(&[("Preemptive", "1")]), "'Preemptive' has the value '1'"),
            (http(&[("tokenServiceURL.ConnectionTimeoutInSeconds", "ten")]), "a whole number from 0 to"),
            (http(&[("tokenServiceURL.SocketReadTimeoutInSeconds", "-1")]), "a whole number from 0 to"),
            (http(&[("tokenServiceURL.SocketReadTimeoutInSeconds", "+5")]), "a whole number from 0 to"),
            (http(&[("HostnameVerifier", "None")]), "use one of: Strict, BrowserCompatible"),
            (vec![("Name", "r"), ("Type", "RFC")], "property 'jco.client.ashost' is required for Type 'RFC'"),
            (vec![("Name", "r"), ("Type", "RFC"), ("jco.client.ashost", "h")], "'jco.client.sysnr' is required"),
            (vec![("Name", "r"), ("Type", "RFC"), ("jco.client.mshost", "h")], "'jco.client.r3name' is required"),
            (
                vec![("Name", "r"), ("Type", "RFC"), ("jco.client.ashost", "h"), ("jco.client.sysnr", "0")],
                "'jco.client.sysnr' must be exactly 2 digits",
            ),
            (
                vec![
                    ("Name", "r"),
                    ("Type", "RFC"),
                    ("jco.client.ashost", "h"),
                    ("jco.client.sysnr", "00"),
                    ("jco.client.client", "10"),
                ],
                "'jco.client.client' must be exactly 3 digits, such as '000'",
            ),
            (
                vec![
                    ("Name", "r"),
                    ("Type", "RFC"),
                    ("jco.client.ashost", "h"),
                    ("jco.client.sysnr", "00"),
                    ("jco.destination.peak_limit", "many"),
                ],
                "'jco.destination.peak_limit' has the value 'many'",
            ),
            (
                vec![
                    ("Name", "r"),
                    ("Type", "RFC"),
                    ("jco.client.ashost", "h"),
                    ("jco.client.sysnr", "00"),
                    ("jco.client.user", "a-very-long-user"),
                ],
                "'jco.client.user' is longer than 12 characters",
            ),
            (
                vec![
                    ("Name", "r"),
                    ("Type", "RFC"),
                    ("jco.client.ashost", "h"),
                    ("jco.client.sysnr", "00"),
                    ("jco.destination.auth_type", "TechnicalUserPropagation"),
                ],
                "'jco.client.tech_user_id' is required for 'jco.destination.auth_type' 'TechnicalUserPropagation'",
            ),
            (vec![("Name", "l"), ("Type", "LDAP")], "'ldap.url' is required for Type 'LDAP'"),
            (vec![("Name", "l"), ("Type", "LDAP"), ("ldap.url", "http://x")], "must be an ldap:// or ldaps:// URL"),
            (
                vec![("Name", "l"), ("Type", "LDAP"), ("ldap.url", "ldap://x"), ("ldap.authentication", "Kerberos")],
                "use one of: NoAuthentication, BasicAuthentication",
            ),
            (
                vec![("Name", "m"), ("Type", "MAIL"), ("mail.smtp.port", "0")],
                "'mail.smtp.port' has the value '0'; use a whole number from 1 to 65535",
            ),
            (
                vec![("Name", "m"), ("Type", "MAIL"), ("mail.smtp.auth", "on")],
                "'mail.smtp.auth' has the value 'on'; use true or false",
            ),
            (vec![("Name", "m"), ("Type", "MAIL"), ("mail.transport.protocol", "http")], "use one of: smtp, smtps"),
            (
                vec![("Name", "m"), ("Type", "MAIL"), ("Authentication", "BasicAuthentication"), ("mail.user", "u")],
                "'mail.password' is required for Authentication 'BasicAuthentication'",
            ),
            (vec![("Name", "t"), ("Type", "TCP")], "'Address' is required for Type 'TCP'"),
            (vec![("Name", "t"), ("Type", "TCP"), ("Address", "host")], "'Address' is 'host'; it must be host:port"),
            (vec![("Name", "t"), ("Type", "TCP"), ("Address", "host:99999")], "it must be host:port"),
            (
                vec![("Name", "t"), ("Type", "TCP"), ("Address", "h:1"), ("ProxyType", "onpremise")],
                "use one of: Internet",
            ),
            (http(&[("Bad\u{7}Key", "v")]), "control character"),
        ];
        for (props, want) in cases {
            let got = check(&props).expect_err(&format!("{props:?} should be refused"));
            assert!(got.contains(want), "{props:?}\n got: {got}\nwant: {want}");
            assert!(got.starts_with("property '"), "{got}");
        }
    }

    #[test]
    fn length_limits() {
        let long_key = "k".repeat(MAX_PROPERTY_NAME_LEN + 1);
        let err = check_property(&long_key, "v").unwrap_err().to_string();
        assert!(err.contains("513 characters; the limit is 512"), "{err}");
        assert!(check_property(&"k".repeat(MAX_PROPERTY_NAME_LEN), "v").is_ok());
        let long_value = "v".repeat(MAX_PROPERTY_VALUE_LEN + 1);
        let err = check_property("Description", &long_value).unwrap_err().to_string();
        assert!(err.starts_with("property 'Description' has a value of 65537 bytes"), "{err}");
        assert!(check_property("Description", &"v".repeat(MAX_PROPERTY_VALUE_LEN)).is_ok());
    }
}
