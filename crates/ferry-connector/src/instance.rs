//! A connector *instance*: several subaccount connections in one process, added, removed,
//! connected and disconnected at run time (as SAP's Cloud Connector manages its subaccounts).
//! Each connection is one [`Connector`] with its own tunnel tasks and shutdown token; access
//! rules and audit level change live, without dropping tunnels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use ferry_core::Shutdown;

use crate::audit::AuditLevel;
use crate::{AccessRules, Connector, ConnectorConfig, ConnectorError, TunnelStatus};

/// SAP's key of a subaccount connection: region host and subaccount id.
pub type SubaccountKey = (String, String);

struct Running {
    connector: Arc<Connector>,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
    /// When the first tunnel connection of the current streak came up.
    since: Arc<Mutex<Option<SystemTime>>>,
}

/// Tunnel state of one subaccount connection, for the monitoring API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionState {
    pub status: TunnelStatus,
    pub connected_since: Option<SystemTime>,
    /// See [`Connector::last_heartbeat`].
    pub last_heartbeat: Option<SystemTime>,
}

pub struct Instance {
    running: Mutex<HashMap<SubaccountKey, Running>>,
    /// Parent of every connection's shutdown token: cancelling it stops them all.
    shutdown: Shutdown,
}

impl Instance {
    pub fn new(shutdown: Shutdown) -> Self {
        Self { running: Mutex::new(HashMap::new()), shutdown }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SubaccountKey, Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts (or restarts with the new configuration) the connection for `key`. Must be called
    /// inside a Tokio runtime.
    pub async fn connect(&self, key: SubaccountKey, config: ConnectorConfig) -> Result<(), ConnectorError> {
        // The old connection goes first: both would write the same audit log file.
        self.disconnect(&key).await;
        let connector = Arc::new(Connector::new(config)?);
        let shutdown = self.shutdown.child_token();
        let since = Arc::new(Mutex::new(None));
        let mut status = connector.status();
        let (watch_since, watch_sd) = (since.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let connected = status.borrow_and_update().connected;
                {
                    let mut s = watch_since.lock().unwrap_or_else(PoisonError::into_inner);
                    match (connected, *s) {
                        (0, _) => *s = None,
                        (_, None) => *s = Some(SystemTime::now()),
                        _ => {}
                    }
                }
                tokio::select! {
                    r = status.changed() => if r.is_err() { break },
                    _ = watch_sd.cancelled() => break,
                }
            }
        });
        let task = tokio::spawn(connector.clone().run(shutdown.clone()));
        self.lock().insert(key, Running { connector, shutdown, task, since });
        Ok(())
    }

    /// Stops the connection for `key` (its tunnels close gracefully); false if none ran.
    pub async fn disconnect(&self, key: &SubaccountKey) -> bool {
        let Some(r) = self.lock().remove(key) else { return false };
        r.connector.close_channels().await;
        r.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), r.task).await;
        true
    }

    /// Stops every connection.
    pub async fn disconnect_all(&self) {
        let keys: Vec<SubaccountKey> = self.lock().keys().cloned().collect();
        for k in keys {
            self.disconnect(&k).await;
        }
    }

    pub fn is_running(&self, key: &SubaccountKey) -> bool {
        self.lock().contains_key(key)
    }

    /// Swaps the access rules of a running connection; false if it does not run.
    pub fn set_rules(&self, key: &SubaccountKey, rules: AccessRules) -> bool {
        match self.lock().get(key) {
            Some(r) => {
                r.connector.set_rules(rules);
                true
            }
            None => false,
        }
    }

    /// Renews the connection certificate of a running connection without dropping traffic (see
    /// [`Connector::set_identity`]); `Ok(false)` if it does not run.
    pub fn set_identity(
        &self,
        key: &SubaccountKey,
        identity: &ferry_core::tls::CertifiedKey,
    ) -> Result<bool, ConnectorError> {
        match self.lock().get(key) {
            Some(r) => r.connector.set_identity(identity).map(|()| true),
            None => Ok(false),
        }
    }

    pub fn set_principal_propagation(&self, key: &SubaccountKey, pp: Option<Arc<crate::PrincipalPropagation>>) {
        if let Some(r) = self.lock().get(key) {
            r.connector.set_principal_propagation(pp);
        }
    }

    pub fn set_audit_level(&self, key: &SubaccountKey, level: AuditLevel) {
        if let Some(r) = self.lock().get(key) {
            r.connector.audit().set_level(level);
        }
    }

    /// The proxy replicas a running connection dials (see [`Connector::replicas`]).
    pub fn replicas(&self, key: &SubaccountKey) -> Vec<crate::ReplicaState> {
        self.lock().get(key).map(|r| r.connector.replicas()).unwrap_or_default()
    }

    fn connector(&self, key: &SubaccountKey) -> Option<Arc<Connector>> {
        self.lock().get(key).map(|r| r.connector.clone())
    }

    /// Opens a service channel of a running connection: `Ok(Some(port))`, or `Ok(None)` when the
    /// connection does not run (the channel opens when it connects).
    pub async fn open_channel(
        &self,
        key: &SubaccountKey,
        spec: &crate::channel::ServiceChannel,
    ) -> Result<Option<u16>, crate::channel::ChannelError> {
        match self.connector(key) {
            Some(c) => c.open_channel(spec).await.map(Some),
            None => Ok(None),
        }
    }

    /// Closes a service channel of a running connection (its port is free on return).
    pub async fn close_channel(&self, key: &SubaccountKey, id: u32) {
        if let Some(c) = self.connector(key) {
            c.close_channel(id).await;
        }
    }

    pub fn channel_state(&self, key: &SubaccountKey, id: u32) -> Option<crate::channel::ChannelState> {
        self.connector(key)?.channel_state(id)
    }

    pub fn state(&self, key: &SubaccountKey) -> Option<ConnectionState> {
        self.lock().get(key).map(|r| ConnectionState {
            status: *r.connector.status().borrow(),
            connected_since: *r.since.lock().unwrap_or_else(PoisonError::into_inner),
            last_heartbeat: r.connector.last_heartbeat(),
        })
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        for r in self.lock().values() {
            r.shutdown.cancel();
        }
    }
}
