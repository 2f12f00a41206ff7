//! The edges a client written from docs/protocol.md alone runs into: pages
//! of maximum-length messages, text written with JSON's longest escapes,
//! request ids on every error, pings as heartbeats. Against a running
//! gateway; where the store matters, once per store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Backend, Client, KEY, token};
use futures::{SinkExt, StreamExt};
use kubechat_gateway::app::{self, BrokerSetup, GatewayOptions, RunningGateway};
use kubechat_gateway::store::embedded::EmbeddedStore;
use kubechat_gateway::transport::auth::Authenticator;
use kubechat_gateway::transport::connection::ConnectionLimits;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The longest legal text: 100,000 characters of four UTF-8 bytes each.
fn longest_text(mark: usize) -> String {
    format!("{mark:05}{}", "😀".repeat(100_000 - 5))
}

mod embedded {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pages_of_the_longest_messages_sync_and_page_completely() {
        super::pages_of_the_longest_messages_sync_and_page_completely(super::Backend::embedded()).await;
    }
}

mod cassandra {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pages_of_the_longest_messages_sync_and_page_completely() {
        super::pages_of_the_longest_messages_sync_and_page_completely(super::Backend::cassandra()).await;
    }
}

/// 20 maximum-length messages (8 MB of text) fit no single reply: the
/// default sync and history pages stop before their byte budget and say
/// `has_more`, so the device gets every message without the connection
/// dropping.
async fn pages_of_the_longest_messages_sync_and_page_completely(backend: Backend) {
    let (gateway, _push) = backend.start().await;
    let mut alice = Client::connect(&gateway, "alice", "phone").await;
    let mut sent = Vec::new();
    for i in 0..20 {
        let ack = alice.send_to_user("bob", &longest_text(i), &format!("k{i}")).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        sent.push(ack["id"].as_str().expect("id").to_string());
    }

    let mut bob = Client::connect(&gateway, "bob", "laptop").await;
    let (entries, _cursor) = bob.sync_all("0").await;
    let ids: Vec<String> = entries.iter().map(|e| e["message"]["id"].as_str().expect("id").to_string()).collect();
    assert_eq!(ids, sent, "every message once, in order, over several pages");
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(entry["message"]["text"].as_str().map(|t| t.chars().count()), Some(100_000));
        assert!(entry["message"]["text"].as_str().is_some_and(|t| t.starts_with(&format!("{i:05}"))));
    }

    let mut got = Vec::new();
    let mut before: Option<String> = None;
    for _ in 0..40 {
        let mut frame = json!({"type": "history", "channel": "dm:alice:bob"});
        if let Some(before) = &before {
            frame["before"] = json!(before);
        }
        let page = bob.request(frame).await;
        assert_eq!(page["type"], "history", "{page}");
        let messages = page["messages"].as_array().expect("messages").clone();
        assert!(!messages.is_empty() || page["has_more"] == false, "a page that says more has something");
        got.extend(messages.iter().map(|m| m["id"].as_str().expect("id").to_string()));
        if page["has_more"] != true {
            break;
        }
        before = messages.last().and_then(|m| m["id"].as_str()).map(str::to_string);
    }
    got.reverse();
    assert_eq!(got, sent, "history pages back to the first message");
}

async fn gateway(limits: ConnectionLimits) -> (RunningGateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
    let options = GatewayOptions { listen: "127.0.0.1:0".parse().expect("addr"), limits, ..Default::default() };
    let auth = Authenticator::new(KEY).expect("key");
    let running =
        app::start(store.clone(), Arc::new(store), BrokerSetup::Local, auth, 0, options).await.expect("start");
    (running, dir)
}

async fn connect(gateway: &RunningGateway, user: &str) -> Socket {
    let url = format!("{}?token={}", gateway.ws_url(), token(user, "phone"));
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
    assert_eq!(next(&mut socket).await["type"], "hello");
    socket
}

async fn next(socket: &mut Socket) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return serde_json::from_str(&text).expect("JSON"),
            Ok(Some(Ok(Message::Close(frame)))) => panic!("closed by the server: {frame:?}"),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no frame: {other:?}"),
        }
    }
}

/// JSON may write an astral character as `\ud83d\ude00` (12 bytes): the
/// longest legal text written that way is accepted and stored as the
/// characters it means; one character more is refused with
/// `message_too_long`, not a close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_text_in_its_longest_encoding_is_accepted() {
    let (gateway, _dir) = gateway(ConnectionLimits::default()).await;
    let mut alice = connect(&gateway, "alice").await;
    let escaped = |chars: usize| "\\ud83d\\ude00".repeat(chars);
    let frame = |chars: usize, req: &str| {
        format!(r#"{{"type":"send","req":"{req}","to":{{"user":"bob"}},"key":"{req}","text":"{}"}}"#, escaped(chars))
    };
    let legal = frame(100_000, "legal");
    assert!(legal.len() > 1_200_000, "{} bytes: the case the old cap refused", legal.len());
    alice.send(Message::text(legal)).await.expect("send");
    let ack = next(&mut alice).await;
    assert_eq!((ack["type"].clone(), ack["req"].clone()), (json!("ack"), json!("legal")), "{ack}");

    alice.send(Message::text(frame(100_001, "over"))).await.expect("send");
    let refused = next(&mut alice).await;
    assert_eq!((refused["code"].clone(), refused["req"].clone()), (json!("message_too_long"), json!("over")));

    let history = {
        alice
            .send(Message::text(r#"{"type":"history","req":"h","channel":"dm:alice:bob","limit":1}"#))
            .await
            .expect("send");
        next(&mut alice).await
    };
    assert_eq!(history["messages"][0]["text"].as_str(), Some("😀".repeat(100_000).as_str()), "stored as characters");
}

/// Every error names the request it answers, even one refused before it
/// was decoded (over the rate limit); a request id over 64 characters is
/// refused, naming its first 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_names_its_request() {
    let limits = ConnectionLimits { frames_per_second: 1.0, burst: 3.0, ..ConnectionLimits::default() };
    let (gateway, _dir) = gateway(limits).await;
    let mut alice = connect(&gateway, "alice").await;
    for i in 0..6 {
        let frame = json!({"type": "send", "req": format!("r{i}"), "to": {"user": "bob"}, "text": "hi", "key": format!("k{i}")});
        alice.send(Message::text(frame.to_string())).await.expect("send");
    }
    let mut limited = Vec::new();
    for _ in 0..6 {
        let reply = next(&mut alice).await;
        if reply["code"] == "rate_limited" {
            limited.push(reply["req"].as_str().expect("rate_limited names its req").to_string());
        }
    }
    assert_eq!(limited, vec!["r3", "r4", "r5"], "the frames over the burst of 3");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let long = "x".repeat(65);
    let frame = json!({"type": "heartbeat", "req": long});
    alice.send(Message::text(frame.to_string())).await.expect("send");
    let refused = next(&mut alice).await;
    assert_eq!(refused["code"], "invalid_argument", "{refused}");
    assert_eq!(refused["req"], json!("x".repeat(64)));
}

/// A client that only answers with WebSocket pings (no heartbeat frames)
/// stays connected: any frame counts as a heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_count_as_heartbeats() {
    let limits = ConnectionLimits { idle_timeout: Duration::from_millis(600), ..ConnectionLimits::default() };
    let (gateway, _dir) = gateway(limits).await;
    let mut pinging = connect(&gateway, "alice").await;
    let mut silent = connect(&gateway, "bob").await;
    for _ in 0..8 {
        pinging.send(Message::Ping(Vec::new().into())).await.expect("ping");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Two seconds, over three idle timeouts: the silent one was closed (4000), the pinging one not.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match silent.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("the silent connection ends");
    assert_eq!(closed, Some(4000));
    pinging.send(Message::text(r#"{"type":"list_channels","req":"alive"}"#)).await.expect("send");
    assert_eq!(next(&mut pinging).await["req"], "alive", "the pinging connection is still served");
}

/// `chat` never makes a key of its own: started where no gateway keeps its
/// data, it says where it looked instead of getting a 401 later.
#[test]
fn chat_without_the_gateways_key_says_where_it_looked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kubechat-gateway"))
        .args(["chat", "--user", "alice", "--url", "ws://127.0.0.1:9/v1/ws", "--data-dir"])
        .arg(dir.path().join("nowhere"))
        .output()
        .expect("run chat");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("no signing key at") && stderr.contains("nowhere"), "{stderr}");
    assert!(!dir.path().join("nowhere/signing-key").exists(), "no key was created");
}
