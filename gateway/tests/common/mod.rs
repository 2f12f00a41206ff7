//! Harness for the chat suites: in-process gateways over a real store
//! (embedded redb in a temp folder, or Cassandra with a keyspace per test)
//! and WebSocket clients that speak protocol v1.

#![allow(dead_code, unused_macros)]

pub mod binary;
pub mod cluster;
pub mod traffic;

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use kubechat_gateway::app::{self, BrokerSetup, GatewayOptions, RunningGateway};
use kubechat_gateway::chat::push::{PushQueue, RedisPushQueue};
use kubechat_gateway::store::Store;
use kubechat_gateway::store::embedded::EmbeddedStore;
use kubechat_gateway::store::scylla::{ScyllaConfig, ScyllaStore};
use kubechat_gateway::transport::auth::Authenticator;
use kubechat_gateway::transport::connection::ConnectionLimits;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Runs each scenario (an `async fn(Backend)` of the suite) once per store,
/// as `embedded::<name>` and `cassandra::<name>`. Needs `#[macro_use] mod common;`.
macro_rules! for_both_stores {
    ($($scenario:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test] async fn $scenario() { super::$scenario(super::Backend::embedded()).await })*
        }
        mod cassandra {
            $(#[tokio::test] async fn $scenario() { super::$scenario(super::Backend::cassandra()).await })*
        }
    };
}

pub const KEY: &[u8] = b"test-signing-key-0123456789abcdef";
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The repository root, from the runtime `CARGO_MANIFEST_DIR` (`cargo test`
/// and `e2e/local/run-tests.sh` set it): the cached target dir is shared by
/// clones, so the path compiled into this binary may be another clone's.
pub fn repo_root() -> std::path::PathBuf {
    let package = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    std::path::Path::new(&package).join("..")
}

pub fn cql_node() -> String {
    std::env::var("KUBECHAT_CQL_NODE").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| "127.0.0.1:19042".into())
}

pub fn redis_url() -> String {
    std::env::var("KUBECHAT_REDIS_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:16379".into())
}

/// Where a gateway keeps its data; survives gateway restarts within a test.
pub enum Backend {
    Embedded { dir: tempfile::TempDir },
    Cassandra { keyspace: String },
}

impl Backend {
    pub fn embedded() -> Self {
        Backend::Embedded { dir: tempfile::tempdir().expect("temp dir") }
    }

    pub fn cassandra() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let keyspace = format!(
            "chat_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            kubechat_gateway::ids::now_ms() % 100_000
        );
        Backend::Cassandra { keyspace }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Embedded { .. } => "embedded",
            Backend::Cassandra { .. } => "cassandra",
        }
    }

    /// Opens the store and the push queue that go with it.
    pub async fn open(&self) -> (Arc<dyn Store>, Arc<dyn PushQueue>, PushInspector, u64) {
        match self {
            Backend::Embedded { dir } => {
                let store = Arc::new(EmbeddedStore::open(dir.path()).expect("open the embedded store"));
                let floor = store.max_id().await.expect("max id");
                (store.clone(), Arc::new(store), PushInspector::Standalone, floor)
            }
            Backend::Cassandra { keyspace } => {
                let config = ScyllaConfig {
                    contact_points: vec![cql_node()],
                    keyspace: keyspace.clone(),
                    replication_factor: 1,
                    ..ScyllaConfig::default()
                };
                let store = ScyllaStore::connect(config).await.unwrap_or_else(|e| {
                    panic!(
                        "Cassandra (CQL) is not reachable at {}: {e}; start it with `e2e/local/cassandra.sh start`",
                        cql_node()
                    )
                });
                let client = redis::Client::open(redis_url()).expect("Redis URL");
                let redis = tokio::time::timeout(Duration::from_secs(5), redis::aio::ConnectionManager::new(client))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_else(|| {
                        panic!("Redis is not reachable at {}; start it with `e2e/local/redis.sh start`", redis_url())
                    });
                let queue = Arc::new(RedisPushQueue::new(redis.clone(), 1_000_000));
                let start = cluster::push_stream_end(&mut redis.clone()).await;
                (Arc::new(store), queue, PushInspector::Redis { connection: redis, start }, 0)
            }
        }
    }

    pub async fn start(&self) -> (RunningGateway, PushInspector) {
        let (store, push, inspector, floor) = self.open().await;
        // Suites send hundreds of frames back to back: lift the per-connection rate limit.
        let limits = ConnectionLimits { frames_per_second: 100_000.0, burst: 100_000.0, ..ConnectionLimits::default() };
        let options =
            GatewayOptions { listen: "127.0.0.1:0".parse().expect("addr"), limits, ..GatewayOptions::default() };
        let gateway =
            app::start(store, push, BrokerSetup::Local, Authenticator::new(KEY).expect("key"), floor, options)
                .await
                .expect("start gateway");
        (gateway, inspector)
    }
}

/// Reads back the push jobs a gateway enqueued.
pub enum PushInspector {
    /// The standalone gateway keeps none (it has no push workers).
    Standalone,
    /// Jobs queued after `start` (the streams' ends when the gateway started).
    Redis { connection: redis::aio::ConnectionManager, start: Vec<String> },
}

impl PushInspector {
    /// Push jobs for `user` since the gateway started, oldest first.
    pub async fn jobs_for(&self, user: &str) -> Vec<Value> {
        let all: Vec<Value> = match self {
            PushInspector::Standalone => Vec::new(),
            PushInspector::Redis { connection, start } => {
                cluster::push_jobs_after(&mut connection.clone(), start).await
            }
        };
        all.into_iter().filter(|job| job["user"] == user).collect()
    }
}

pub fn token(user: &str, device: &str) -> String {
    Authenticator::new(KEY).expect("key").mint(user, device, 3600).expect("mint")
}

pub struct Client {
    pub user: String,
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_req: u64,
    /// Frames received while waiting for something else.
    backlog: Vec<Value>,
}

impl Client {
    pub async fn connect(gateway: &RunningGateway, user: &str, device: &str) -> Client {
        let url = format!("{}?token={}", gateway.ws_url(), token(user, device));
        let (socket, _) = tokio_tungstenite::connect_async(url).await.expect("WebSocket connect");
        let mut client = Client { user: user.to_string(), socket, next_req: 0, backlog: Vec::new() };
        let hello = client.next_frame().await;
        assert_eq!(hello["type"], "hello", "first frame: {hello}");
        client
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.socket.send(Message::Text(text.to_string().into())).await.expect("send frame");
    }

    async fn next_frame(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(RECEIVE_TIMEOUT, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no frame within {RECEIVE_TIMEOUT:?}", self.user))
                .unwrap_or_else(|| panic!("{}: connection closed", self.user))
                .unwrap_or_else(|e| panic!("{}: read error {e}", self.user));
            match message {
                Message::Text(text) => return serde_json::from_str(&text).expect("server frames are JSON"),
                Message::Close(frame) => panic!("{}: closed by the server: {frame:?}", self.user),
                _ => continue,
            }
        }
    }

    /// Sends a frame with a fresh `req` and returns the reply carrying it;
    /// other frames meanwhile are kept for [`Client::expect_message`].
    pub async fn request(&mut self, mut frame: Value) -> Value {
        self.next_req += 1;
        let req = format!("r{}", self.next_req);
        frame["req"] = json!(req);
        self.send_raw(&frame.to_string()).await;
        loop {
            let reply = self.next_frame().await;
            if reply["req"] == json!(req) {
                return reply;
            }
            self.backlog.push(reply);
        }
    }

    pub async fn send_to_user(&mut self, to: &str, text: &str, key: &str) -> Value {
        self.request(json!({"type": "send", "to": {"user": to}, "text": text, "key": key})).await
    }

    pub async fn send_to_group(&mut self, group: &str, text: &str, key: &str) -> Value {
        self.request(json!({"type": "send", "to": {"group": group}, "text": text, "key": key})).await
    }

    /// The next live `message` frame.
    pub async fn expect_message(&mut self) -> Value {
        if let Some(i) = self.backlog.iter().position(|f| f["type"] == "message") {
            return self.backlog.remove(i);
        }
        loop {
            let frame = self.next_frame().await;
            if frame["type"] == "message" {
                return frame;
            }
            self.backlog.push(frame);
        }
    }

    /// The next frame of one of these types (kept-aside frames first).
    pub async fn expect_frame(&mut self, types: &[&str]) -> Value {
        let wanted = |frame: &Value| types.iter().any(|t| frame["type"] == *t);
        if let Some(i) = self.backlog.iter().position(wanted) {
            return self.backlog.remove(i);
        }
        loop {
            let frame = self.next_frame().await;
            if wanted(&frame) {
                return frame;
            }
            self.backlog.push(frame);
        }
    }

    /// Asserts no live message arrives within `wait`.
    pub async fn expect_no_message(&mut self, wait: Duration) {
        assert!(!self.backlog.iter().any(|f| f["type"] == "message"), "{}: unexpected {:?}", self.user, self.backlog);
        if let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(wait, self.socket.next()).await {
            let frame: Value = serde_json::from_str(&text).expect("JSON");
            assert_ne!(frame["type"], "message", "{}: unexpected message {frame}", self.user);
        }
    }

    /// Every inbox entry after `cursor`, paging with `next`; returns the
    /// entries and the cursor to store.
    pub async fn sync_all(&mut self, cursor: &str) -> (Vec<Value>, String) {
        let mut entries = Vec::new();
        let mut after = cursor.to_string();
        loop {
            let reply = self.request(json!({"type": "sync", "after": after, "limit": 100})).await;
            assert_eq!(reply["type"], "synced", "{reply}");
            entries.extend(reply["entries"].as_array().cloned().unwrap_or_default());
            if reply["has_more"] != json!(true) {
                return (entries, reply["cursor"].as_str().unwrap_or("0").to_string());
            }
            after = reply["next"].as_str().unwrap_or("0").to_string();
        }
    }

    /// Live messages already received and kept aside.
    pub fn take_backlog_messages(&mut self) -> Vec<Value> {
        let (messages, rest): (Vec<Value>, Vec<Value>) = self.backlog.drain(..).partition(|f| f["type"] == "message");
        self.backlog = rest;
        messages
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}
