#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A stream handed to a tunnel ends within a bound even when the connector behind it goes
//! silent: no app waits forever on a dead tunnel. The connector here is an in-process fake (a
//! real one never stops reading while its socket is open): it greets the proxy, then freezes
//! its connection with the socket left open, so no FIN or RST tells the proxy anything.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use ferry_testkit::{SUBACCOUNT, TunnelPair};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

const LOCATION: &str = "silent";

/// The fake connector's socket: once `frozen`, neither read nor written again, never closed.
struct Freezable<T> {
    io: T,
    frozen: Arc<AtomicBool>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Freezable<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Freezable<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Pending
    }
}

#[tokio::test]
async fn a_stream_on_a_tunnel_whose_connector_stops_reading_fails_within_the_heartbeat() {
    let heartbeat = Duration::from_millis(500);
    let pair = TunnelPair::start_with(|cfg| cfg.heartbeat = heartbeat).await;

    // The fake connector: mTLS with a connector certificate, HTTP/2 server, answers the hello.
    let id = pair.ca.issue_connector_cert(SUBACCOUNT, LOCATION, time::Duration::days(1)).unwrap();
    let tls = ferry_core::tls::client_config(pair.ca.cert_pem(), Some(&id), &[ferry_proto::tunnel::ALPN]).unwrap();
    let tcp = TcpStream::connect(pair.tunnel_addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let (seen, got_stream) = (frozen.clone(), Arc::new(tokio::sync::Notify::new()));
    let got = got_stream.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let hello = req.headers().get(ferry_proto::tunnel::KIND).is_some_and(|k| k == ferry_proto::tunnel::KIND_HELLO);
        let (seen, got) = (seen.clone(), got.clone());
        async move {
            if !hello {
                // The app's stream arrived: from now on the connection is dead in the water.
                seen.store(true, Ordering::SeqCst);
                got.notify_one();
                std::future::pending::<()>().await;
            }
            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::new())))
        }
    });
    let io = Freezable { io: tls, frozen: frozen.clone() };
    let conn =
        hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(io), service);
    // Kept alive (socket open) until the end of the test.
    let fake = tokio::spawn(conn);
    pair.wait_connected(LOCATION).await;

    let s = TcpStream::connect(pair.http_addr).await.unwrap();
    let (mut sender, c) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(c);
    let req = http::Request::get("http://silent.virtual:8000/x")
        .header("host", "silent.virtual:8000")
        .header("proxy-authorization", format!("Bearer {}", pair.token()))
        .header("sap-connectivity-scc-location_id", LOCATION)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = tokio::spawn(async move {
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    });
    got_stream.notified().await;
    assert!(frozen.load(Ordering::SeqCst), "the stream reached the connector before it went silent");
    // Bounded only so that a regression fails instead of hanging the suite: the heartbeat
    // (PING unanswered for one interval after one interval) is what ends the stream.
    let (status, body) = tokio::time::timeout(Duration::from_secs(60), answer)
        .await
        .expect("the app got no answer: a stream on a dead tunnel waits forever")
        .unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("tunnel to the Cloud Connector failed"), "{body}");
    // The dead tunnel is gone from the registry, so the next request gets a plain 503.
    assert!(!pair.proxy.registry().is_connected(SUBACCOUNT, LOCATION));
    assert!(!fake.is_finished(), "the fake kept its socket open throughout");
    fake.abort();
}
