//! Opening a stream on a connector's tunnel, again on another tunnel of the same (subaccount,
//! location id) when the first one provably did not process it.
//!
//! A connector swaps tunnels without stopping: after a certificate renewal it dials a new
//! connection and then drains the old one with HTTP/2 GOAWAY; a restarted or switched-over
//! connector does the same across processes. A stream the proxy put on the old connection in
//! that moment is refused, and the rule for retrying it is HTTP/2's own (RFC 9113 §8.7): only a
//! stream the connector never processed is sent again — one above the GOAWAY's last stream id,
//! one reset with `REFUSED_STREAM`, or one that never left the proxy. Any other failure (a reset
//! after the connector took the stream, a connection cut mid-stream) may have reached a backend
//! and is answered as a failure, never repeated.
//!
//! The request body cannot be read twice from the app, so the bytes an attempt took are kept
//! ([`REPLAY_LIMIT`] at most) until the connector accepted the stream, and a retry sends them
//! again before the rest; a body already past the limit when its stream is refused is not retried.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use ferry_core::body::{BoxBody, BoxError};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::registry::Registry;

/// Request body bytes kept for a replay until the connector accepted the stream.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// Attempts per stream: the first and up to three more on other tunnels (a connector with
/// several tunnel connections drains them all at once, so each may refuse in turn).
const MAX_ATTEMPTS: usize = 4;

/// Why no response came back.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// No tunnel for the key (none connected, or none came up in time after a drain): 503.
    NoTunnel,
    /// The tunnel failed after the connector may have processed the stream: 502.
    Failed(hyper::Error),
}

/// How a failed attempt ended, as far as retrying goes.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The tunnel is draining (GOAWAY) or gone, and the stream never reached the connector.
    Draining,
    /// The connector refused this stream before processing it (`REFUSED_STREAM`).
    Refused,
    /// The connector may have processed it.
    Unknown,
}

fn verdict(e: &hyper::Error, returned: bool) -> Verdict {
    if returned {
        // hyper handed the request back: it never left the proxy (the connection closed first).
        return Verdict::Draining;
    }
    let h2 = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>());
    match h2 {
        // A GOAWAY from the connector fails only streams above its last stream id, and those a
        // new request would open after it: none of them was processed (RFC 9113 §6.8).
        Some(h) if h.is_go_away() && h.is_remote() => Verdict::Draining,
        Some(h) if h.is_reset() && h.is_remote() && h.reason() == Some(h2::Reason::REFUSED_STREAM) => Verdict::Refused,
        _ => Verdict::Unknown,
    }
}

/// Sends `req` on a tunnel of (subaccount, location), retrying on another tunnel what a
/// draining one refused. Without a usable tunnel it waits up to `swap_wait` for one to register
/// if a tunnel of the key drained lately or this request was refused; otherwise it fails at once.
pub(crate) async fn send(
    registry: &Registry,
    subaccount: &str,
    location: &str,
    req: Request<BoxBody>,
    swap_wait: Duration,
    request_id: &str,
) -> Result<Response<Incoming>, OpenError> {
    let (head, body) = req.into_parts();
    let replay = Replay::new(body);
    let mut tried: Vec<u64> = Vec::new();
    let mut deadline = None;
    let mut last_error = None;
    for attempt in 0..MAX_ATTEMPTS {
        let picked = match registry.pick_tunnel(subaccount, location, &tried) {
            Some(p) => p,
            None if attempt == 0 && !registry.drained_lately(subaccount, location, swap_wait) => {
                return Err(OpenError::NoTunnel);
            }
            None => {
                let until = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + swap_wait);
                match registry.wait_for_tunnel(subaccount, location, &tried, until).await {
                    Some(p) => p,
                    None => return Err(OpenError::NoTunnel),
                }
            }
        };
        let mut sender = picked.sender;
        tracing::trace!(%request_id, attempt, tunnel = picked.id, "opening a tunnel stream");
        let req = request_like(&head, replay.attempt_body());
        let (e, returned) = match sender.ready().await {
            Err(e) => (e, true),
            Ok(()) => {
                let answer = sender.try_send_request(req);
                // No handle of the tunnel is held while waiting. A request queued in the very
                // moment the tunnel's dispatcher stops is stranded in its channel (tokio keeps a
                // message whose send raced the receiver's drop until the last sender is gone,
                // tokio-rs/tokio#7714) and handed back only then; holding this handle would
                // wait for itself, forever.
                drop(sender);
                match answer.await {
                    Ok(resp) => {
                        replay.accepted();
                        return Ok(resp);
                    }
                    Err(mut e) => {
                        let returned = e.take_message().is_some();
                        (e.into_error(), returned)
                    }
                }
            }
        };
        let v = verdict(&e, returned);
        tracing::debug!(%request_id, attempt, tunnel = picked.id, returned, verdict = ?v, error = %e, "tunnel stream failed");
        if v == Verdict::Draining {
            registry.mark_draining(subaccount, location, picked.id);
        }
        if v == Verdict::Unknown || !replay.rewind() {
            return Err(OpenError::Failed(e));
        }
        tracing::debug!(%request_id, attempt, error = %e, "tunnel refused the stream unprocessed: retrying on another tunnel");
        ferry_core::metrics::global()
            .counter(
                "ferry_proxy_tunnel_retries_total",
                "Streams opened again on another tunnel after a draining one refused them unprocessed.",
                &[],
            )
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tried.push(picked.id);
        last_error = Some(e);
    }
    Err(last_error.map_or(OpenError::NoTunnel, OpenError::Failed))
}

fn request_like(head: &http::request::Parts, body: BoxBody) -> Request<BoxBody> {
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers.clone();
    req
}

/// The request body shared by the attempts of one stream.
struct Replay {
    state: Arc<Mutex<ReplayState>>,
}

struct ReplayState {
    /// The app's body; `None` once it ended.
    inner: Option<BoxBody>,
    /// Frames an earlier attempt took, sent first by the current one.
    queued: VecDeque<Frame<Bytes>>,
    /// Frames the current attempt took, while `keeping`.
    taken: Vec<Frame<Bytes>>,
    taken_bytes: usize,
    /// Off once the connector accepted the stream or the taken bytes passed [`REPLAY_LIMIT`].
    keeping: bool,
    /// Which attempt may read; the body of an earlier one, still held by its failed stream,
    /// yields an error instead of the bytes meant for its successor.
    attempt: u32,
}

impl Replay {
    fn new(body: BoxBody) -> Self {
        let state = ReplayState {
            inner: Some(body),
            queued: VecDeque::new(),
            taken: Vec::new(),
            taken_bytes: 0,
            keeping: true,
            attempt: 0,
        };
        Self { state: Arc::new(Mutex::new(state)) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReplayState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attempt_body(&self) -> BoxBody {
        let attempt = self.lock().attempt;
        BoxBody::new(AttemptBody { state: self.state.clone(), attempt })
    }

    /// The connector took the stream: nothing will be replayed, the kept frames go.
    fn accepted(&self) {
        let mut s = self.lock();
        s.keeping = false;
        s.taken = Vec::new();
    }

    /// Prepares the next attempt to send everything again; `false` if that is impossible.
    fn rewind(&self) -> bool {
        let mut s = self.lock();
        if !s.keeping {
            return false;
        }
        let taken = std::mem::take(&mut s.taken);
        for f in taken.into_iter().rev() {
            s.queued.push_front(f);
        }
        s.taken_bytes = 0;
        s.attempt += 1;
        true
    }
}

fn copy_frame(f: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    if let Some(d) = f.data_ref() {
        Some(Frame::data(d.clone()))
    } else {
        f.trailers_ref().map(|t| Frame::trailers(t.clone()))
    }
}

impl ReplayState {
    fn keep(&mut self, f: &Frame<Bytes>) {
        if !self.keeping {
            return;
        }
        let len = f.data_ref().map_or(0, Bytes::len);
        match copy_frame(f) {
            Some(copy) if self.taken_bytes + len <= REPLAY_LIMIT => {
                self.taken_bytes += len;
                self.taken.push(copy);
            }
            _ => {
                self.keeping = false;
                self.taken = Vec::new();
            }
        }
    }
}

struct AttemptBody {
    state: Arc<Mutex<ReplayState>>,
    attempt: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("request body moved to a retry on another tunnel")]
struct Superseded;

impl Body for AttemptBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.attempt != self.attempt {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if let Some(f) = s.queued.pop_front() {
            s.keep(&f);
            return Poll::Ready(Some(Ok(f)));
        }
        let Some(inner) = s.inner.as_mut() else { return Poll::Ready(None) };
        let r = Pin::new(inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => s.keep(f),
            Poll::Ready(None) => s.inner = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.attempt == self.attempt && s.queued.is_empty() && s.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let queued: u64 = s.queued.iter().filter_map(|f| f.data_ref()).map(|d| d.len() as u64).sum();
        let inner = s.inner.as_ref().map(|b| b.size_hint()).unwrap_or_else(|| SizeHint::with_exact(0));
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + queued);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + queued);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::BodyExt;

    fn body(parts: &[&'static str]) -> BoxBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes())))).collect();
        BoxBody::new(http_body_util::StreamBody::new(futures_util::stream::iter(frames)))
    }

    async fn read_all(b: BoxBody) -> Result<Bytes, BoxError> {
        b.collect().await.map(|c| c.to_bytes())
    }

    #[tokio::test]
    async fn a_retry_sends_what_the_refused_attempt_took_and_then_the_rest() {
        let replay = Replay::new(body(&["ab", "cd", "ef"]));
        let mut first = replay.attempt_body();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        assert!(replay.rewind());
        // The refused attempt's body, still held by its stream, gives nothing more away.
        assert!(first.frame().await.unwrap().is_err());
        let second = replay.attempt_body();
        assert_eq!(second.size_hint().lower(), 2);
        assert_eq!(read_all(second).await.unwrap(), "abcdef");
        // Refused again after reading everything: a third attempt still gets all of it.
        assert!(replay.rewind());
        assert_eq!(read_all(replay.attempt_body()).await.unwrap(), "abcdef");
    }

    #[tokio::test]
    async fn no_replay_past_the_limit_or_after_the_connector_accepted() {
        let big: &'static str = Box::leak("x".repeat(REPLAY_LIMIT + 1).into_boxed_str());
        let replay = Replay::new(body(&[big]));
        read_all(replay.attempt_body()).await.unwrap();
        assert!(!replay.rewind(), "bytes past the limit are gone");

        let replay = Replay::new(body(&["ab"]));
        let mut b = replay.attempt_body();
        b.frame().await.unwrap().unwrap();
        replay.accepted();
        assert!(!replay.rewind());
        assert!(b.frame().await.is_none(), "the accepted attempt reads on");
    }
}
