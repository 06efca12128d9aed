#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Proxy replicas from DNS (`ConnectorConfig::resolve_replicas`): the connector dials every
//! address a name resolves to, not the name, and looking the name up again with the same answer
//! leaves the tunnels alone.

use std::sync::Arc;
use std::time::Duration;

use ferry_connector::{AccessRules, Connector};
use ferry_testkit::{SUBACCOUNT, TunnelPair, eventually};

#[tokio::test]
async fn a_resolved_name_is_dialled_by_its_addresses_and_a_lookup_with_the_same_answer_keeps_the_tunnels() {
    let pair = TunnelPair::start().await;
    let port = pair.tunnel_addr.port();
    let mut cfg = pair.connector_config("", AccessRules::new(vec![]), pair.tunnel_addr);
    cfg.proxy_addr = format!("localhost:{port}");
    cfg.server_name = "localhost".into();
    cfg.resolve_replicas = Some(Duration::from_millis(20));
    let connector = Arc::new(Connector::new(cfg).unwrap());
    let status = connector.status();
    tokio::spawn(connector.clone().run(pair.shutdown.clone()));
    pair.wait_connected("").await;
    let replicas = connector.replicas();
    let ours = format!("127.0.0.1:{port}");
    assert!(replicas.iter().any(|r| r.address == ours && r.connected == 1), "{replicas:?}");
    assert!(replicas.iter().all(|r| !r.address.starts_with("localhost")), "the name itself is dialled: {replicas:?}");
    // Some ten lookups later the same tunnel is still the only one ever established.
    tokio::time::sleep(Duration::from_millis(200)).await;
    eventually!("tunnel still up", pair.proxy.registry().is_connected(SUBACCOUNT, ""));
    assert_eq!(status.borrow().established, 1, "a lookup with the same answer reconnected");
}
