//! Concurrent streams per subaccount (HTTP requests in flight and open SOCKS5 connections):
//! one tenant's burst or leak must not use up the proxy (its connection cap, the tunnels'
//! stream windows) for every other tenant.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub(crate) struct TenantStreams {
    limit: usize,
    per_tenant: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl TenantStreams {
    pub(crate) fn new(limit: usize) -> Self {
        Self { limit: limit.max(1), per_tenant: Mutex::new(HashMap::new()) }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// A slot for one more stream of `subaccount`, or `None` when all are taken.
    pub(crate) fn try_acquire(&self, subaccount: &str) -> Option<OwnedSemaphorePermit> {
        let sem = {
            let mut map = self.per_tenant.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(subaccount.to_owned()).or_insert_with(|| Arc::new(Semaphore::new(self.limit))).clone()
        };
        sem.try_acquire_owned().ok()
    }
}

/// A response body that holds its tenant's slot (or a share of it) until the body is finished
/// or dropped.
pub(crate) struct Held<B, P = OwnedSemaphorePermit> {
    pub(crate) inner: B,
    pub(crate) _permit: P,
}

impl<B, P: Unpin> http_body::Body for Held<B, P>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn each_tenant_has_its_own_slots() {
        let t = TenantStreams::new(2);
        let a1 = t.try_acquire("a").unwrap();
        let _a2 = t.try_acquire("a").unwrap();
        assert!(t.try_acquire("a").is_none());
        assert!(t.try_acquire("b").is_some(), "b is not affected by a");
        drop(a1);
        assert!(t.try_acquire("a").is_some(), "a finished stream frees its slot");
    }
}
