//! HTTP bodies as the data path uses them: boxed, streamed, never buffered whole.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

pub fn empty() -> BoxBody {
    http_body_util::Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(data: impl Into<Bytes>) -> BoxBody {
    http_body_util::Full::new(data.into()).map_err(|never| match never {}).boxed()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> BoxBody
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// First read buffer of a [`from_reader`] body: small, so a connection that sends a few bytes
/// now and then does not allocate 64 KiB per read.
const READ_MIN: usize = 4 * 1024;
/// Largest read buffer: one read fills one HTTP/2 frame of the tunnel (`MAX_FRAME`).
const READ_MAX: usize = 64 * 1024;

/// A body that streams what `reader` yields. Reads start with a small buffer; a read that fills
/// it makes the next buffer four times larger, up to 64 KiB, so bulk transfers move large frames.
/// While a read is pending no buffer is held, so idle connections cost no read buffer.
/// Backpressure: the reader is polled only when the consumer asks for the next frame.
pub fn from_reader<R: AsyncRead + Unpin + Send + Sync + 'static>(reader: R) -> BoxBody {
    BoxBody::new(ReaderBody { reader: Some(reader), buf: BytesMut::new(), next: READ_MIN })
}

struct ReaderBody<R> {
    /// `None` after end of stream or an error.
    reader: Option<R>,
    buf: BytesMut,
    /// Size of the next buffer to allocate.
    next: usize,
}

impl<R: AsyncRead + Unpin> Body for ReaderBody<R> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(reader) = this.reader.as_mut() else { return Poll::Ready(None) };
        // The rest of a partly filled buffer is reused until it gets too small to be worth a read.
        if this.buf.capacity() < READ_MIN {
            this.buf.reserve(this.next);
        }
        // `reserve` may hand back a reclaimed buffer larger than asked for; reads stay bounded.
        let room = this.buf.capacity().min(this.next);
        match tokio_util::io::poll_read_buf(Pin::new(reader), cx, &mut (&mut this.buf).limit(room)) {
            Poll::Pending => {
                // Nothing buffered (every read is split off whole): a quiet connection holds no
                // buffer while it waits, so 1,000 idle streams cost no read buffers. A stream that
                // has grown to bulk reads keeps its buffer: freeing it on every pending read would
                // put a 64 KiB allocation on each read of the bulk path.
                if this.next == READ_MIN {
                    this.buf = BytesMut::new();
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => {
                this.reader = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Ok(0)) => {
                this.reader = None;
                Poll::Ready(None)
            }
            Poll::Ready(Ok(n)) => {
                if n == room {
                    this.next = (this.next * 4).min(READ_MAX);
                }
                Poll::Ready(Some(Ok(Frame::data(this.buf.split().freeze()))))
            }
        }
    }
}

/// Writes every data frame of `body` to `writer`, then shuts the writer down (half-close), so
/// the peer sees end-of-stream exactly when the body ends.
pub async fn copy_to_writer<B, W>(mut body: B, mut writer: W) -> Result<u64, BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    W: AsyncWrite + Unpin,
{
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        if let Ok(data) = frame.into_data() {
            n += data.len() as u64;
            writer.write_all(&data).await?;
        }
    }
    writer.shutdown().await?;
    Ok(n)
}

/// Headers that describe one hop, never the message (RFC 9110 §7.6.1), plus `Proxy-*`: what
/// `is_hop_by_hop` knows, listed for the test that holds the two together.
#[cfg(test)]
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn is_hop_by_hop(name: &http::HeaderName) -> bool {
    use http::header;
    // Standard names compare as an enum; only the two non-standard ones compare text.
    name == header::CONNECTION
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Removes hop-by-hop headers, including any named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none, and the rest one or two (`Proxy-Authorization`, `Connection:
    // keep-alive`): one pass over the names finds them, and they are removed by parsed name. Nine
    // removals by `&str`, each parsing and hashing its name, cost a few thousand instructions on
    // every request and response.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let mut names: Vec<http::HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| http::HeaderName::from_bytes(s.trim().as_bytes()).ok())
        .collect();
    names.extend(headers.keys().filter(|k| is_hop_by_hop(k)).cloned());
    for name in &names {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames carry every byte in order; reads grow from 4 KiB to 64 KiB while the source keeps
    /// the buffer full, and the body ends at end of stream.
    #[tokio::test]
    async fn reader_body_streams_everything_with_growing_reads() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut body = from_reader(std::io::Cursor::new(data.clone()));
        let (mut out, mut sizes) = (Vec::new(), Vec::new());
        while let Some(frame) = body.frame().await {
            let chunk = frame.unwrap().into_data().unwrap();
            sizes.push(chunk.len());
            out.extend_from_slice(&chunk);
        }
        assert_eq!(out, data);
        assert_eq!(sizes[0], READ_MIN);
        assert!(sizes.contains(&READ_MAX), "{sizes:?}");
        assert!(sizes.iter().all(|&n| n <= READ_MAX), "{sizes:?}");
        assert!(body.frame().await.is_none());
    }

    /// An idle connection's body holds no read buffer while its read is pending, and still
    /// delivers what arrives later.
    #[tokio::test]
    async fn pending_read_holds_no_buffer() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut body = ReaderBody { reader: Some(rx), buf: BytesMut::new(), next: READ_MIN };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        assert_eq!(body.buf.capacity(), 0);
        tx.write_all(b"late").await.unwrap();
        drop(tx);
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&frame[..], b"late");
        assert!(body.frame().await.is_none());
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("proxy-authorization", "Bearer x".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    /// The quick check that skips the removals knows every hop-by-hop name, alone or mixed case.
    #[test]
    fn each_hop_by_hop_name_alone_is_stripped() {
        for name in HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(http::HeaderName::from_bytes(name.to_ascii_uppercase().as_bytes()).unwrap(), "x".parse().unwrap());
            h.insert("x-keep", "1".parse().unwrap());
            strip_hop_by_hop(&mut h);
            assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"], "{name}");
        }
    }

    #[tokio::test]
    async fn reader_body_streams_and_copies() {
        let data = vec![7u8; 200_000];
        let body = from_reader(std::io::Cursor::new(data.clone()));
        let mut out = Vec::new();
        let n = copy_to_writer(body, &mut out).await.unwrap();
        assert_eq!(n, 200_000);
        assert_eq!(out, data);
    }
}
