//! Overload slows senders and never drops readers: a group flooded faster
//! than the gateway writes keeps every member that reads connected and
//! complete, and only a member that stops reading is closed (4008). Tiny
//! outbox limits make the overload happen with a few hundred frames.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{KEY, token};
use futures::{SinkExt, StreamExt};
use kubechat_gateway::app::{self, BrokerSetup, GatewayOptions, RunningGateway};
use kubechat_gateway::chat::ChatConfig;
use kubechat_gateway::chat::hub::OutboxLimits;
use kubechat_gateway::store::embedded::EmbeddedStore;
use kubechat_gateway::transport::auth::Authenticator;
use kubechat_gateway::transport::connection::ConnectionLimits;
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(60);

async fn gateway(dir: &tempfile::TempDir, stall: Duration) -> RunningGateway {
    let store = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
    let limits = ConnectionLimits {
        outbox: OutboxLimits { soft: 8, hard: 64 },
        frames_per_second: 100_000.0,
        burst: 100_000.0,
        ..ConnectionLimits::default()
    };
    let chat = ChatConfig { stall_timeout: stall, ..ChatConfig::default() };
    let options = GatewayOptions { listen: "127.0.0.1:0".parse().expect("addr"), limits, chat, ..Default::default() };
    let auth = Authenticator::new(KEY).expect("key");
    app::start(store.clone(), Arc::new(store), BrokerSetup::Local, auth, 0, options).await.expect("gateway")
}

/// A connection whose receive buffer is small, so that the gateway feels a
/// slow reader at once instead of after megabytes of kernel buffers.
async fn connect_small(
    gateway: &RunningGateway,
    user: &str,
    device: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let stream = socket.connect(gateway.addr).await.expect("tcp connect");
    let url = format!("{}?token={}", gateway.ws_url(), token(user, device));
    tokio_tungstenite::client_async(url, stream).await.expect("ws connect").0
}

/// What a member's reader saw.
#[derive(Default, Debug)]
struct Seen {
    /// Message texts by sender, in arrival order.
    messages: HashMap<String, Vec<String>>,
    close: Option<u16>,
}

/// Connects `user` and reads every frame into [`Seen`] until the server
/// closes or `expected` live messages arrived, pausing `pace` after each
/// (a steady reader slower than the flood).
async fn reader(
    gateway: &RunningGateway,
    user: &str,
    expected: usize,
    pace: Duration,
) -> tokio::task::JoinHandle<Seen> {
    let socket = connect_small(gateway, user, "phone").await;
    let (_sink, mut stream) = socket.split();
    tokio::spawn(async move {
        let _keep_open = _sink;
        let mut seen = Seen::default();
        let mut total = 0;
        while total < expected {
            match tokio::time::timeout(WAIT, stream.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    let frame: Value = serde_json::from_str(&text).expect("JSON");
                    if frame["type"] == "message" {
                        let from = frame["message"]["from"].as_str().unwrap_or_default().to_string();
                        let text = frame["message"]["text"].as_str().unwrap_or_default().to_string();
                        seen.messages.entry(from).or_default().push(text);
                        total += 1;
                        if !pace.is_zero() {
                            tokio::time::sleep(pace).await;
                        }
                    }
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    seen.close = Some(frame.map_or(1005, |f| u16::from(f.code)));
                    break;
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) | Err(_) => break,
            }
        }
        seen
    })
}

/// Sends `count` messages to `group` back to back (without waiting for
/// acks: the gateway slows the sender down by not reading), then counts acks.
async fn flood(gateway: &RunningGateway, user: &str, group: &str, count: usize, text_len: usize) -> usize {
    let url = format!("{}?token={}", gateway.ws_url(), token(user, "laptop"));
    let (socket, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
    let (mut sink, mut stream) = socket.split();
    let padding = "x".repeat(text_len);
    let sender = {
        let (user, group) = (user.to_string(), group.to_string());
        tokio::spawn(async move {
            for i in 0..count {
                let frame = json!({"type": "send", "to": {"group": group}, "text": format!("{user}:{i}:{padding}"), "key": format!("{user}-{i}")});
                sink.send(Message::Text(frame.to_string().into())).await.expect("send");
            }
            sink
        })
    };
    let mut acks = 0;
    while acks < count {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(&text).expect("JSON");
                match frame["type"].as_str() {
                    Some("ack") => acks += 1,
                    Some("error") => panic!("{user}: {frame}"),
                    _ => {}
                }
            }
            other => panic!("{user}: stream ended after {acks} acks: {other:?}"),
        }
    }
    drop(sender.await.expect("sender"));
    acks
}

async fn create_group(gateway: &RunningGateway, owner: &str, members: &[String]) -> String {
    let mut client = common::Client::connect(gateway, owner, "admin").await;
    let reply = client.request(json!({"type": "create_group", "name": "flood", "members": members})).await;
    assert_eq!(reply["type"], "group", "{reply}");
    reply["group"]["id"].as_str().expect("group id").to_string()
}

/// Steady readers slower than the flood: the senders are slowed to their
/// pace, and every reader stays connected and gets everything in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_keep_reading_are_never_closed_under_overload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = gateway(&dir, Duration::from_secs(5)).await;
    let members: Vec<String> = (0..10).map(|i| format!("m{i:02}")).collect();
    let group = create_group(&gateway, "m00", &members).await;
    // Eight senders at the store's pace (hundreds of messages a second) into
    // readers that take 20 ms per message: several times more than they
    // read, and 32 KB each so that the 10 MB each reader is owed outgrow
    // the kernel's socket buffers (up to 4 MB) and reach the outboxes.
    let (senders, per_sender) = (8, 40);
    let total = senders * per_sender;

    let mut readers = Vec::new();
    for member in &members {
        readers.push((member.clone(), reader(&gateway, member, total, Duration::from_millis(20)).await));
    }
    let floods = members[..senders].iter().map(|sender| flood(&gateway, sender, &group, per_sender, 32_000));
    let acks = futures::future::join_all(floods).await;
    assert!(acks.iter().all(|a| *a == per_sender), "every send acked: {acks:?}");

    for (member, handle) in readers {
        let seen = handle.await.expect("reader");
        assert_eq!(seen.close, None, "{member} was closed while reading");
        for sender in &members[..senders] {
            let got = seen.messages.get(sender).cloned().unwrap_or_default();
            let expected: Vec<String> = (0..per_sender).map(|i| format!("{sender}:{i}:")).collect();
            let prefixes: Vec<String> =
                got.iter().map(|t| t.split_inclusive(':').take(2).collect::<String>()).collect();
            assert_eq!(prefixes, expected, "{member} got {sender}'s messages once each, in order");
        }
    }
    let metrics = gateway.metrics.render();
    assert!(gateway.metrics.slow_consumers.get() == 0, "no reader was closed as slow:\n{metrics}");
    assert!(
        gateway.metrics.backpressure_waits.get() > 0,
        "the flood must have overloaded the outboxes for this test to mean anything:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_member_that_stops_reading_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = gateway(&dir, Duration::from_millis(500)).await;
    let members: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    let group = create_group(&gateway, "s0", &members).await;
    let count = 300;

    // s5 never reads.
    let stalled = connect_small(&gateway, "s5", "phone").await;

    let mut readers = Vec::new();
    for member in &members[1..5] {
        readers.push((member.clone(), reader(&gateway, member, count, Duration::ZERO).await));
    }
    // 20 KB messages: the stalled member's socket buffers fill after a few dozen.
    assert_eq!(flood(&gateway, "s0", &group, count, 20_000).await, count);

    for (member, handle) in readers {
        let seen = handle.await.expect("reader");
        assert_eq!(seen.close, None, "{member} kept reading and must stay connected");
        assert_eq!(seen.messages.get("s0").map(Vec::len), Some(count), "{member} got every message");
    }
    // The server gives up on a close frame that cannot be delivered within
    // a second: the stalled connection is gone although its client still
    // has not read anything (everyone else has left by now).
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while gateway.metrics.connections.get() > 0 {
        assert!(std::time::Instant::now() < deadline, "a connection lingers: {}", gateway.metrics.connections.get());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Connections, not the messages one of them missed.
    assert_eq!(gateway.metrics.slow_consumers.get(), 1, "one member stopped reading: one slow consumer");

    // What the stalled member finally reads: what fit in its buffers, then the end.
    let (_sink, mut stream) = stalled.split();
    let mut ended = false;
    while let Ok(next) = tokio::time::timeout(WAIT, stream.next()).await {
        match next {
            Some(Ok(Message::Close(frame))) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(4008), "closed as a slow consumer");
                ended = true;
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                ended = true;
                break;
            }
        }
    }
    assert!(ended, "the stalled connection was ended by the server");
}
