//! Response rewriting, as SAP's Cloud Connector does it: a backend that redirects to its own
//! internal address, or scopes a cookie to its internal domain, would leak internal names to the
//! cloud and break the app; such `Location` headers and cookie `Domain`s are mapped back to the
//! virtual host of the first system mapping that names that internal host (and port). Anything
//! not matching a mapping is left untouched.

use crate::access::{AccessRules, Protocol};

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// Rewrites an absolute `Location` that points at a mapped internal host:port to the virtual
/// one (always `http://`: the cloud side reaches systems over plain HTTP through the proxy).
pub fn location(rules: &AccessRules, value: &str) -> Option<String> {
    let (scheme, rest) = value.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let port_default = default_port(&scheme)?;
    let (authority, tail) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return None;
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (h, p.parse::<u16>().ok()?),
        _ => (authority, port_default),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let m = rules.mappings.iter().find(|m| {
        m.protocol.is_http()
            && m.local_host.eq_ignore_ascii_case(host)
            && m.local_port == port
            && (scheme == "https") == (m.protocol == Protocol::Https)
    })?;
    let authority =
        if m.virtual_port == 80 { m.virtual_host.clone() } else { format!("{}:{}", m.virtual_host, m.virtual_port) };
    Some(format!("http://{authority}{tail}"))
}

/// Rewrites the `Domain` attribute of a `Set-Cookie` value naming a mapped internal host.
pub fn set_cookie(rules: &AccessRules, value: &str) -> Option<String> {
    let mut changed = false;
    let parts: Vec<String> = value
        .split(';')
        .map(|part| {
            let trimmed = part.trim();
            if let Some((k, v)) = trimmed.split_once('=')
                && k.trim().eq_ignore_ascii_case("domain")
            {
                let domain = v.trim().trim_start_matches('.');
                if let Some(m) =
                    rules.mappings.iter().find(|m| m.protocol.is_http() && m.local_host.eq_ignore_ascii_case(domain))
                {
                    changed = true;
                    let lead = if part.starts_with(' ') { " " } else { "" };
                    return format!("{lead}Domain={}", m.virtual_host);
                }
            }
            part.to_owned()
        })
        .collect();
    changed.then(|| parts.join(";"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{HostInHeader, SystemMapping};

    fn rules() -> AccessRules {
        let m = |vh: &str, vp, lh: &str, lp, protocol| SystemMapping {
            virtual_host: vh.into(),
            virtual_port: vp,
            local_host: lh.into(),
            local_port: lp,
            protocol,
            host_in_header: HostInHeader::Virtual,
            authentication_mode: Default::default(),
            principal_certificate_in: Default::default(),
            resources: vec![],
            description: None,
        };
        AccessRules::new(vec![
            m("erp.virtual", 8000, "erp-int.corp", 44300, Protocol::Https),
            m("web.virtual", 80, "web.corp", 8080, Protocol::Http),
            m("db.virtual", 5432, "db.corp", 5432, Protocol::Tcp),
        ])
    }

    #[test]
    fn location_table() {
        let r = rules();
        let table: &[(&str, Option<&str>)] = &[
            ("https://erp-int.corp:44300/sap/bc?x=1", Some("http://erp.virtual:8000/sap/bc?x=1")),
            ("HTTPS://ERP-INT.corp:44300", Some("http://erp.virtual:8000")),
            ("http://web.corp:8080/login#top", Some("http://web.virtual/login#top")),
            ("http://erp-int.corp:44300/x", None), // scheme does not match the mapping
            ("https://erp-int.corp/x", None),      // port 443 is not mapped
            ("http://db.corp:5432/", None),        // TCP mappings are not HTTP systems
            ("http://other.corp/x", None),
            ("/relative/path", None),
            ("http://user@web.corp:8080/", None),
            ("ftp://web.corp:8080/", None),
        ];
        for (input, want) in table {
            assert_eq!(location(&r, input).as_deref(), *want, "{input}");
        }
    }

    #[test]
    fn set_cookie_table() {
        let r = rules();
        assert_eq!(
            set_cookie(&r, "SAP_SESSIONID=abc; Domain=.erp-int.corp; Path=/; HttpOnly").as_deref(),
            Some("SAP_SESSIONID=abc; Domain=erp.virtual; Path=/; HttpOnly")
        );
        assert_eq!(set_cookie(&r, "a=b; domain=web.corp").as_deref(), Some("a=b; Domain=web.virtual"));
        assert_eq!(set_cookie(&r, "a=b; Path=/"), None);
        assert_eq!(set_cookie(&r, "a=b; Domain=elsewhere.corp"), None);
    }
}
