//! The `credentials` of a service binding as an app reads them from `VCAP_SERVICES`
//! (CLIENT-CONTRACT §1, SPEC §1.1/§3.1). `ferry up` and the admin API both build them here, so
//! a key created at run time has exactly the shape of the bindings `ferry up` prints.

use serde_json::{Value, json};

/// A service Ferry offers instances of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Destination,
    Connectivity,
    Xsuaa,
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Destination, Service::Connectivity, Service::Xsuaa];

    pub fn as_str(self) -> &'static str {
        match self {
            Service::Destination => "destination",
            Service::Connectivity => "connectivity",
            Service::Xsuaa => "xsuaa",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// The plan when none is given (the one SAP's free tier offers).
    pub fn default_plan(self) -> &'static str {
        match self {
            Service::Destination | Service::Connectivity => "lite",
            Service::Xsuaa => "application",
        }
    }

    /// `tags` of the binding: the approuter and the SAP Cloud SDK find bindings by them.
    pub fn tags(self) -> &'static [&'static str] {
        match self {
            Service::Destination => &["destination", "conn", "connsvc"],
            Service::Connectivity => &["connectivity", "conn", "connsvc"],
            Service::Xsuaa => &["xsuaa"],
        }
    }

    /// The suffix of client ids and xsappnames (`!b…` for reuse services, `!t…` for apps).
    pub fn client_suffix(self) -> &'static str {
        match self {
            Service::Destination => "b1",
            Service::Connectivity => "b2",
            Service::Xsuaa => "t1",
        }
    }
}

/// Where the services behind a binding are reachable.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    /// Token service, HTTP: `credentials.url`.
    pub token_url: String,
    /// Token service, HTTPS, `host:port`: `credentials.uaadomain`.
    pub uaadomain: String,
    /// Destination Service: `credentials.uri`.
    pub destination_url: String,
    pub proxy_host: String,
    pub http_proxy_port: u16,
    pub socks5_port: u16,
    /// `host:port` Cloud Connectors dial (the proxy's tunnel endpoint), for connector enrollment.
    pub tunnel: String,
}

/// How a key authenticates: a secret, or an X.509 certificate with its key.
#[derive(Clone, Debug)]
pub enum KeySecret<'a> {
    Secret(&'a str),
    X509 { certificate: &'a str, key: &'a str },
}

/// One key, as far as its credentials need it.
#[derive(Clone, Debug)]
pub struct KeyFacts<'a> {
    pub service: Service,
    pub client_id: &'a str,
    pub xsappname: &'a str,
    pub instance_id: &'a str,
    pub subaccount_id: &'a str,
    pub subdomain: &'a str,
    pub secret: KeySecret<'a>,
}

/// The `credentials` object of a binding.
pub fn credentials(e: &Endpoints, k: &KeyFacts<'_>) -> Value {
    let mut c = json!({
        "clientid": k.client_id, "xsappname": k.xsappname,
        "url": e.token_url, "uaadomain": e.uaadomain, "identityzone": k.subdomain,
        "tenantid": k.subaccount_id, "tenantmode": "dedicated", "instanceid": k.instance_id,
    });
    let obj = c.as_object_mut().expect("a JSON object");
    match &k.secret {
        KeySecret::Secret(s) => {
            obj.insert("clientsecret".into(), json!(s));
            obj.insert("credential-type".into(), json!("binding-secret"));
        }
        KeySecret::X509 { certificate, key } => {
            obj.insert("certificate".into(), json!(certificate));
            obj.insert("key".into(), json!(key));
            obj.insert("certurl".into(), json!(format!("https://{}", e.uaadomain)));
            obj.insert("credential-type".into(), json!("x509"));
        }
    }
    match k.service {
        Service::Destination => {
            obj.insert("uri".into(), json!(e.destination_url));
        }
        Service::Connectivity => {
            // Every port a string, as Cloud Foundry hands them out.
            obj.insert("token_service_url".into(), json!(e.token_url));
            obj.insert("token_service_domain".into(), json!(e.uaadomain));
            obj.insert("onpremise_proxy_host".into(), json!(e.proxy_host));
            obj.insert("onpremise_proxy_port".into(), json!(e.http_proxy_port.to_string()));
            obj.insert("onpremise_proxy_http_port".into(), json!(e.http_proxy_port.to_string()));
            obj.insert("onpremise_socks5_proxy_port".into(), json!(e.socks5_port.to_string()));
            // No `onpremise_proxy_rfc_port`/`onpremise_proxy_ldap_port`: SAP's port 20001 speaks
            // an undocumented protocol that Ferry does not serve (SPEC §3.2); LDAP goes through
            // SOCKS5, and a JCo client that finds no port fails at once rather than at a dead one.
        }
        Service::Xsuaa => {}
    }
    c
}

/// One entry of `VCAP_SERVICES[service]`: `label` for the SAP Cloud SDK, `tags` for the
/// approuter.
pub fn vcap_entry(service: Service, instance_name: &str, instance_id: &str, plan: &str, credentials: Value) -> Value {
    json!({ "label": service.as_str(), "name": instance_name, "instance_name": instance_name,
            "instance_guid": instance_id, "plan": plan, "tags": service.tags(), "credentials": credentials })
}
