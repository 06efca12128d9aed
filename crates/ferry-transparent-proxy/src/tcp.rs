//! The TCP data path (TCP, LDAP and MAIL destinations): each accepted connection becomes a
//! SOCKS5 connection (SAP's method 0x80) through the Connectivity Proxy, then bytes both ways.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpStream;

use crate::http::{Current, Shared, current_of};
use crate::resolve::Lookup;

/// Upper bound for the proxy's answer (it includes the connector's connect to the backend).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// A raw connection has no way to carry an error message, so failures are logged and the
/// connection is closed.
/// `tenant` is the endpoint's tenant in shared tenant mode: its token is used for the find call
/// and towards the Connectivity Proxy.
pub(crate) async fn serve_connection(
    mut local: TcpStream,
    shared: Arc<Shared>,
    current: Current,
    tenant: Option<String>,
) {
    let resource = current_of(&current);
    let spec = &resource.spec;
    let lookup = Lookup {
        name: spec.destination_ref.name.clone(),
        level: spec.destination_ref.level,
        fragment: spec.fragment_ref.as_ref().map(|f| f.name.clone()),
        fragment_level: spec.fragment_ref.as_ref().and_then(|f| f.level),
        fragment_optional: spec.fragment_ref.as_ref().and_then(|f| f.optional),
        resource: resource.name().to_owned(),
        tenant: tenant.clone().map(ferry_client::Tenant::Subdomain),
        ..Default::default()
    };
    let resolver = match shared.resolver(&resource) {
        Ok(r) => r,
        Err(e) => return tracing::warn!(resource = resource.name(), error = %e.message, "TCP connection refused"),
    };
    let meta = match resolver.resolve(&lookup, false).await {
        Ok(m) => m,
        Err(e) => return tracing::warn!(resource = resource.name(), error = %e.message, "TCP connection refused"),
    };
    let target = match ferry_client::tcp_target(&Value::Object(meta.config.clone()), None) {
        Ok(t) => t,
        Err(e) => return tracing::warn!(resource = resource.name(), error = %e, "TCP connection refused"),
    };
    let proxy = match shared.client.bindings().connectivity().ok().and_then(|c| c.socks5_proxy()) {
        Some(p) => p,
        None => {
            return tracing::warn!(
                resource = resource.name(),
                "On-Premise technical connectivity is not configured: no connectivity binding with a SOCKS5 port"
            );
        }
    };
    let token = match shared.client.connectivity_token_for(lookup.tenant.as_ref()).await {
        Ok(t) => t,
        Err(e) => return tracing::warn!(resource = resource.name(), error = %e, "no connectivity token"),
    };
    let connect =
        ferry_client::socks5::connect_tcp(&proxy, token.expose(), &target.location_id, &target.host, target.port);
    let mut remote = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return tracing::warn!(resource = resource.name(), error = %e, "SOCKS5 to the Connectivity Proxy failed");
        }
        Err(_) => return tracing::warn!(resource = resource.name(), "SOCKS5 handshake timed out"),
    };
    let _ = remote.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut local, &mut remote).await {
        tracing::debug!(error = %e, "TCP connection ended");
    }
}
