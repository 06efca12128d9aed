#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Service channel streams count in the per-subaccount stream cap like HTTP requests and SOCKS5
//! connections: a subaccount cannot get past its cap by opening channels.

use std::sync::Arc;

use ferry_connector::channel::{ChannelType, ServiceChannel};
use ferry_connector::{AccessRules, Connector};
use ferry_proxy::{ChannelTarget, ChannelTargets};
use ferry_testkit::{SUBACCOUNT, TunnelPair, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TCP server that sends back whatever it reads, as it reads it.
async fn echo() -> std::net::SocketAddr {
    let l = ferry_testkit::listener().await;
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Connects to the channel port and sends `data`; the bytes echoed back, or `None` if the
/// connection was closed without any (the proxy refused the stream).
async fn open(port: u16, data: &[u8]) -> (TcpStream, Option<Vec<u8>>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.set_nodelay(true).unwrap();
    let _ = s.write_all(data).await;
    let mut back = vec![0u8; data.len()];
    let got = s.read_exact(&mut back).await.ok().map(|_| back);
    (s, got)
}

#[tokio::test]
async fn channel_streams_count_in_the_subaccounts_stream_cap() {
    let target = echo().await;
    let targets = ChannelTargets::new([ChannelTarget {
        subaccount: SUBACCOUNT.into(),
        id: "echo".into(),
        target: target.to_string(),
    }])
    .unwrap();
    let pair = TunnelPair::start_with(|c| {
        c.channel_targets = targets;
        c.max_streams_per_subaccount = 1;
    })
    .await;
    let mut cfg = pair.connector_config("", AccessRules::new(vec![]), pair.tunnel_addr);
    cfg.channel_host = "127.0.0.1".into();
    let connector = Arc::new(Connector::new(cfg).unwrap());
    tokio::spawn(connector.clone().run(pair.shutdown.clone()));
    pair.wait_connected("").await;
    let spec = ServiceChannel {
        id: 1,
        kind: ChannelType::K8S,
        k8s_service: "echo".into(),
        port: 0,
        enabled: true,
        connections: 10,
        comment: String::new(),
    };
    let port = connector.open_channel(&spec).await.unwrap();

    // One channel stream open takes the subaccount's only slot ...
    let (mut first, got) = open(port, b"first").await;
    assert_eq!(got.as_deref(), Some(&b"first"[..]));
    // ... so a second channel stream is refused ...
    let (_, got) = open(port, b"second").await;
    assert_eq!(got, None, "a channel stream got past the subaccount's cap");
    // ... and so is an HTTP request of the same subaccount.
    let s = TcpStream::connect(pair.http_addr).await.unwrap();
    let (mut sender, c) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await.unwrap();
    tokio::spawn(c);
    let req = http::Request::get("http://any.virtual:8000/")
        .header("host", "any.virtual:8000")
        .header("proxy-authorization", format!("Bearer {}", pair.token()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 429);

    // Once the first stream has ended both ways, its slot is free again.
    first.shutdown().await.unwrap();
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).await.unwrap();
    drop(first);
    let mut n = 0;
    eventually!("the slot is released", {
        n += 1;
        open(port, format!("again {n}").as_bytes()).await.1.is_some()
    });
}
