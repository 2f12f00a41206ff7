//! Harness for the gateway-cluster suite: several real `kubechat-gateway
//! gateway` processes on loopback sharing a private Redis (a `redis-server`
//! the test starts, so it can kill and restart it) and a Cassandra keyspace,
//! and clients that heartbeat, notice closes and can reconnect elsewhere.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::binary::gateway_binary;
use super::{KEY, cql_node, token};

/// A free port on loopback (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

async fn wait_until<F: Fn() -> bool>(what: &str, timeout: Duration, check: F) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One HTTP/1.1 exchange with 127.0.0.1:`port` (the connection closes after
/// it): (status, body), or `None` if nothing answers.
async fn http_exchange(port: u16, request: String) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await.ok()?.ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// A plain HTTP/1.1 GET to 127.0.0.1:`port`: (status, body), or `None` if nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_exchange(port, format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")).await
}

/// A `redis-server` of this test only, on its own port, without persistence
/// (a restart loses everything, the hardest case for the gateways).
pub struct PrivateRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let mut redis = PrivateRedis { port: free_port(), dir: tempfile::tempdir().expect("temp dir"), child: None };
        redis.spawn().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", "", "--appendonly", "no"])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}); install it with `e2e/local/redis.sh start` (Debian's redis-server)"
                )
            });
        self.child = Some(child);
        let port = self.port;
        wait_until("private redis-server answering", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
    }

    /// SIGKILL: the data is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy to a loopback port that the test can cut: every connection
/// through it drops and new ones are refused, while the target stays up for
/// everyone else (a network partition of one process).
pub struct CuttableProxy {
    pub port: u16,
    cut: tokio_util::sync::CancellationToken,
    /// Added to every chunk in either direction (a slow network), in ms.
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    /// While set, a connection that sends `SUBSCRIBE` is dropped (a
    /// gateway whose pub/sub connection cannot be restored while its
    /// commands still work).
    refuse_subscribe: Arc<std::sync::atomic::AtomicBool>,
}

/// Copies `from` to `to`, each chunk `delay_ms` late; stops at a chunk
/// holding `SUBSCRIBE` while `refuse_subscribe` is set.
async fn slow_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    refuse_subscribe: Option<Arc<std::sync::atomic::AtomicBool>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Ok(n) = from.read(&mut buf).await else { return };
        if n == 0 {
            return;
        }
        if refuse_subscribe.as_ref().is_some_and(|r| r.load(std::sync::atomic::Ordering::Relaxed))
            && buf[..n].windows(9).any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
        {
            return;
        }
        let delay = delay_ms.load(std::sync::atomic::Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl CuttableProxy {
    pub async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let cut = tokio_util::sync::CancellationToken::new();
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let refuse_subscribe = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stop, delay, refuse) = (cut.clone(), Arc::clone(&delay_ms), Arc::clone(&refuse_subscribe));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((client, _)) = accepted else { continue };
                let (stop, delay, refuse) = (stop.clone(), Arc::clone(&delay), Arc::clone(&refuse));
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
                    let ((client_read, client_write), (server_read, server_write)) =
                        (client.into_split(), server.into_split());
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = slow_copy(client_read, server_write, Arc::clone(&delay), Some(refuse)) => {}
                        () = slow_copy(server_read, client_write, delay, None) => {}
                    }
                });
            }
        });
        CuttableProxy { port, cut, delay_ms, refuse_subscribe }
    }

    /// While `refuse`, connections that subscribe are dropped.
    pub fn refuse_subscriptions(&self, refuse: bool) {
        self.refuse_subscribe.store(refuse, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every chunk through the proxy arrives `delay` late from now on.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Drops every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.cut.cancel();
    }
}

/// The admin token every test gateway is configured with.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// Settings shared by every gateway of a test cluster.
pub struct ClusterSpec {
    /// One Redis or a Redis Cluster.
    pub redis: kubechat_config::Redis,
    pub keyspace: String,
    pub heartbeat_seconds: u32,
    pub offline_after_seconds: u32,
    /// What a drain without parameters (SIGTERM) uses.
    pub drain_window_seconds: u32,
    pub drain_rate: u32,
    /// Where the gateways reach Cassandra (e.g. through a [`CuttableProxy`]).
    pub contact_points: Vec<String>,
    pub replication_factor: u32,
    pub dir: tempfile::TempDir,
}

impl ClusterSpec {
    /// The config file a gateway of this cluster reads (the operator's format).
    pub fn gateway_config(&self, websocket: u16, admin: u16) -> kubechat_config::GatewayConfig {
        use kubechat_config as config;
        config::GatewayConfig {
            listen: config::Listen { websocket, admin },
            max_connections: 10_000,
            chat: config::Chat {
                max_group_members: 100,
                max_message_chars: 100_000,
                heartbeat_seconds: self.heartbeat_seconds,
                offline_after_seconds: self.offline_after_seconds,
                presence_fanout_max_members: config::DEFAULT_PRESENCE_FANOUT_MAX_MEMBERS,
                send_retry_window_seconds: config::DEFAULT_SEND_RETRY_WINDOW_SECONDS,
            },
            redis: self.redis.clone(),
            scylla: config::Scylla {
                contact_points: self.contact_points.clone(),
                keyspace: self.keyspace.clone(),
                replication_factor: self.replication_factor,
                local_datacenter: None,
                credentials_env: None,
            },
            auth: config::Auth { signing_key_file: self.dir.path().join("signing-key") },
            drain: config::Drain {
                window_seconds: self.drain_window_seconds,
                max_reconnects_per_second: self.drain_rate,
            },
            admin: config::Admin { token_file: Some(self.dir.path().join("admin-token")) },
            push: config::Push::default(),
            discovery: None,
            // The web client in cluster mode (`gateway.webClient`).
            web_client: true,
        }
    }

    /// Creates the keyspace once, before gateways start (concurrent schema
    /// changes from several processes would race).
    pub async fn new(redis_url: String, offline_after_seconds: u32) -> Self {
        Self::on_store(redis_url, offline_after_seconds, vec![cql_node()], 1).await
    }

    /// The same on a store of several nodes, with a keyspace replicated
    /// `replication_factor` times.
    pub async fn on_store(
        redis_url: String,
        offline_after_seconds: u32,
        contact_points: Vec<String>,
        replication_factor: u32,
    ) -> Self {
        let redis = kubechat_config::Redis::single(redis_url, None);
        Self::on(redis, offline_after_seconds, contact_points, replication_factor).await
    }

    /// The same with any Redis (a Redis Cluster).
    pub async fn on(
        redis: kubechat_config::Redis,
        offline_after_seconds: u32,
        contact_points: Vec<String>,
        replication_factor: u32,
    ) -> Self {
        // Unique per test even when several start in the same millisecond.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let keyspace = format!("cluster_{}_{n}_{}", std::process::id(), kubechat_gateway::ids::now_ms() % 1_000_000);
        let config = kubechat_gateway::store::scylla::ScyllaConfig {
            contact_points: contact_points.clone(),
            keyspace: keyspace.clone(),
            replication_factor,
            ..Default::default()
        };
        kubechat_gateway::store::scylla::ScyllaStore::connect(config).await.unwrap_or_else(|e| {
            panic!(
                "Cassandra (CQL) is not reachable at {}: {e}; start it with `e2e/local/cassandra.sh start` \
                 (three nodes: `e2e/local/cassandra-cluster.sh start`)",
                contact_points.join(", ")
            )
        });
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("signing-key"), KEY).expect("write the signing key");
        std::fs::write(dir.path().join("admin-token"), format!("{ADMIN_TOKEN}\n")).expect("write the admin token");
        ClusterSpec {
            redis,
            keyspace,
            heartbeat_seconds: 1,
            offline_after_seconds,
            drain_window_seconds: 10,
            drain_rate: 100,
            contact_points,
            replication_factor,
            dir,
        }
    }
}

/// One gateway process.
pub struct GatewayProcess {
    pub name: String,
    pub ws_port: u16,
    pub admin_port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl GatewayProcess {
    pub async fn start(spec: &ClusterSpec, ordinal: u16) -> Self {
        Self::start_with(spec, ordinal, &format!("gw-{ordinal}"), &[]).await
    }

    /// Starts gateway `name` with worker id `ordinal` and extra environment
    /// (e.g. `KUBECHAT_FAILPOINTS`), and waits until it is ready.
    pub async fn start_with(spec: &ClusterSpec, ordinal: u16, name: &str, env: &[(&str, &str)]) -> Self {
        Self::start_custom(spec, ordinal, name, env, None).await
    }

    /// As [`Self::start_with`], reaching Redis at `redis_url` instead of the
    /// spec's (e.g. through a [`CuttableProxy`]).
    pub async fn start_custom(
        spec: &ClusterSpec,
        ordinal: u16,
        name: &str,
        env: &[(&str, &str)],
        redis_url: Option<&str>,
    ) -> Self {
        Self::spawn_until_ready(|| Self::spawn_custom(spec, ordinal, name, env, redis_url, true)).await
    }

    /// Spawns with `spawn` until a gateway is ready. The ports come from
    /// [`free_port`] and are bound later by the child, so a test starting
    /// gateways beside it can take one meanwhile: a gateway that exits for
    /// a port in use is spawned again on fresh ports.
    async fn spawn_until_ready(spawn: impl Fn() -> Self) -> Self {
        for _ in 0..3 {
            let mut gateway = spawn();
            match gateway.ready_or_exited().await {
                Ok(()) => {
                    // A port taken after readiness would show up here.
                    let exited = gateway.child.as_mut().map(|c| c.try_wait());
                    assert!(
                        matches!(exited, Some(Ok(None))),
                        "{} exited after starting ({exited:?}); log:\n{}",
                        gateway.name,
                        gateway.log_text()
                    );
                    return gateway;
                }
                Err(status) if gateway.log_text().contains("Address already in use") => {
                    eprintln!(
                        "{} exited ({status}): a port was taken meanwhile; starting it on fresh ports",
                        gateway.name
                    );
                }
                Err(status) => panic!("{} exited at start ({status}); log:\n{}", gateway.name, gateway.log_text()),
            }
        }
        panic!("a gateway could not get free ports in three attempts")
    }

    /// Starts a gateway named `name` with worker id `ordinal` that must refuse
    /// to run; returns its log.
    pub async fn expect_refused(spec: &ClusterSpec, ordinal: u16, name: &str) -> String {
        let mut gateway = Self::spawn(spec, ordinal, name);
        let started = Instant::now();
        loop {
            let status = gateway.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = status {
                let log = gateway.log_text();
                assert!(!status.success(), "{name} exited successfully; log:\n{log}");
                return format!("{name} exited with {status}; log:\n{log}");
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{name} kept running; log:\n{}", gateway.log_tail());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts a gateway whose config names no admin token, and waits until it is ready.
    pub async fn start_without_admin_token(spec: &ClusterSpec, ordinal: u16) -> Self {
        let name = format!("gw-{ordinal}");
        Self::spawn_until_ready(|| Self::spawn_custom(spec, ordinal, &name, &[], None, false)).await
    }

    fn spawn(spec: &ClusterSpec, ordinal: u16, name: &str) -> Self {
        Self::spawn_with(spec, ordinal, name, &[])
    }

    fn spawn_with(spec: &ClusterSpec, ordinal: u16, name: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn_custom(spec, ordinal, name, env, None, true)
    }

    /// Spawns a gateway; `redis_url` overrides the spec's, `admin_token`
    /// configures the admin token (without it the admin API refuses drains).
    fn spawn_custom(
        spec: &ClusterSpec,
        ordinal: u16,
        name: &str,
        env: &[(&str, &str)],
        redis_url: Option<&str>,
        admin_token: bool,
    ) -> Self {
        let (ws_port, admin_port) = (free_port(), free_port());
        let name = name.to_string();
        let mut config = spec.gateway_config(ws_port, admin_port);
        if let Some(url) = redis_url {
            config.redis.url = url.to_string();
        }
        if !admin_token {
            config.admin.token_file = None;
        }
        let config_path = spec.dir.path().join(format!("{name}.json"));
        std::fs::write(&config_path, config.to_json_pretty()).expect("write the gateway config");
        let log = spec.dir.path().join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).expect("gateway log file");
        let child = Command::new(gateway_binary())
            .args(["gateway", "--config"])
            .arg(&config_path)
            .args(["--worker-id", &ordinal.to_string(), "--gateway-id", &name])
            .env("RUST_LOG", "info,kubechat_gateway=debug")
            // Bind and advertise on loopback (discovery hands this URL out).
            .env("KUBECHAT_POD_IP", "127.0.0.1")
            .envs(env.iter().copied())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("spawn the kubechat-gateway binary");
        GatewayProcess { name, ws_port, admin_port, log, child: Some(child) }
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/ws", self.ws_port)
    }

    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The log lines holding any of `needles` (for diagnosing a failure).
    pub fn log_matching(&self, needles: &[&str]) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().filter(|line| needles.iter().any(|n| line.contains(n))).collect::<Vec<_>>().join("\n")
    }

    /// GET on the admin port: (status, body).
    pub async fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.admin_port, path).await
    }

    /// The whole log.
    fn log_text(&self) -> String {
        let text = std::fs::read(&self.log).map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
        text.unwrap_or_else(|e| format!("(log unreadable: {e})"))
    }

    /// Whether `/readyz` says fully ready (not degraded).
    async fn is_ready(&self) -> bool {
        matches!(self.admin_get("/readyz").await, Some((200, body)) if body == "ready\n")
    }

    /// Waits until `/readyz` says fully ready (not degraded).
    pub async fn wait_ready(&self) {
        let started = Instant::now();
        while !self.is_ready().await {
            self.wait_a_little_more(started).await;
        }
    }

    /// As [`Self::wait_ready`] for a process just spawned: the exit status
    /// if it exits first.
    async fn ready_or_exited(&mut self) -> Result<(), std::process::ExitStatus> {
        let started = Instant::now();
        while !self.is_ready().await {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(status);
            }
            self.wait_a_little_more(started).await;
        }
        Ok(())
    }

    /// Sleeps before the next readiness check; panics 30 s after `started`.
    async fn wait_a_little_more(&self, started: Instant) {
        let late = started.elapsed() >= Duration::from_secs(30);
        assert!(!late, "{} not ready within 30 s; log:\n{}", self.name, self.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// SIGTERM: the gateway drains, then exits.
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            assert!(status.is_ok_and(|s| s.success()), "could not send SIGTERM to {}", self.name);
        }
    }

    /// Waits for the process to exit by itself; its exit status.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < within {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// POST `body` (JSON) on the admin port with the admin token: (status, body).
    pub async fn admin_post(&self, path: &str, body: &str) -> Option<(u16, String)> {
        self.admin_request("POST", path, body, Some(&format!("Bearer {ADMIN_TOKEN}"))).await
    }

    /// `method` `path` with `body` (JSON) on the admin port, with
    /// `authorization` as the `Authorization` header (none: no header).
    pub async fn admin_request(
        &self,
        method: &str,
        path: &str,
        body: &str,
        authorization: Option<&str>,
    ) -> Option<(u16, String)> {
        let authorization = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{authorization}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        http_exchange(self.admin_port, request).await
    }

    /// SIGSTOP (`resume` continues it): a process that stops running, as
    /// in a long GC or VM pause, while its sockets stay open.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill").args([signal, &child.id().to_string()]).status();
            assert!(status.is_ok_and(|s| s.success()), "could not send {signal} to {}", self.name);
        }
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a cluster client sees.
#[derive(Debug)]
pub enum Event {
    Frame(Value),
    /// The connection ended: the close code if the server sent one.
    Closed(Option<u16>),
}

/// A client that heartbeats every second from a task of its own. Frames
/// arrive on a channel; a dropped connection shows up as [`Event::Closed`].
pub struct ClusterClient {
    pub user: String,
    pub device: String,
    outgoing: mpsc::UnboundedSender<String>,
    events: mpsc::UnboundedReceiver<Event>,
    task: tokio::task::JoinHandle<()>,
    next_req: u64,
    /// Frames received while waiting for something else.
    pub backlog: Vec<Value>,
    pub closed: Option<Option<u16>>,
}

impl ClusterClient {
    pub async fn connect(url: &str, user: &str, device: &str) -> ClusterClient {
        Self::try_connect(url, user, device)
            .await
            .unwrap_or_else(|e| panic!("{user}/{device} connecting to {url}: {e}"))
    }

    pub async fn try_connect(url: &str, user: &str, device: &str) -> Result<ClusterClient, String> {
        let url = format!("{url}?token={}", token(user, device));
        let (socket, _) = tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::connect_async(url))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let (outgoing, mut to_send) = mpsc::unbounded_channel::<String>();
        let (events_tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let (mut sink, mut stream) = socket.split();
            let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = heartbeat.tick() => {
                        if sink.send(Message::Text(r#"{"type":"heartbeat"}"#.into())).await.is_err() {
                            let _ = events_tx.send(Event::Closed(None));
                            return;
                        }
                    }
                    Some(text) = to_send.recv() => {
                        if sink.send(Message::Text(text.into())).await.is_err() {
                            let _ = events_tx.send(Event::Closed(None));
                            return;
                        }
                    }
                    incoming = stream.next() => match incoming {
                        Some(Ok(Message::Text(text))) => {
                            let frame = serde_json::from_str(&text).expect("server frames are JSON");
                            let _ = events_tx.send(Event::Frame(frame));
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let _ = events_tx.send(Event::Closed(frame.map(|f| u16::from(f.code))));
                            return;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => {
                            let _ = events_tx.send(Event::Closed(None));
                            return;
                        }
                    },
                }
            }
        });
        let mut client = ClusterClient {
            user: user.into(),
            device: device.into(),
            outgoing,
            events,
            task,
            next_req: 0,
            backlog: Vec::new(),
            closed: None,
        };
        match client.next_event(Duration::from_secs(5)).await {
            Some(Event::Frame(hello)) if hello["type"] == "hello" => Ok(client),
            other => Err(format!("expected hello, got {other:?}")),
        }
    }

    async fn next_event(&mut self, wait: Duration) -> Option<Event> {
        if self.closed.is_some() {
            return None;
        }
        match tokio::time::timeout(wait, self.events.recv()).await {
            Ok(Some(Event::Closed(code))) => {
                self.closed = Some(code);
                Some(Event::Closed(code))
            }
            Ok(Some(event)) => Some(event),
            Ok(None) => {
                self.closed = Some(None);
                Some(Event::Closed(None))
            }
            Err(_) => None,
        }
    }

    /// Drops the connection without a close frame or logout (a lost network).
    pub fn kill(&self) {
        self.task.abort();
    }

    pub fn send(&self, frame: Value) {
        let _ = self.outgoing.send(frame.to_string());
    }

    /// Sends a frame with a fresh `req`; the reply, or `None` if the
    /// connection closed or nothing came within `wait`.
    pub async fn try_request(&mut self, mut frame: Value, wait: Duration) -> Option<Value> {
        self.next_req += 1;
        let req = format!("r{}", self.next_req);
        frame["req"] = json!(req);
        self.send(frame);
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.next_event(left).await? {
                Event::Frame(reply) if reply["req"] == json!(req) => return Some(reply),
                Event::Frame(other) => self.backlog.push(other),
                Event::Closed(_) => return None,
            }
        }
    }

    pub async fn request(&mut self, frame: Value) -> Value {
        let what = frame.to_string();
        self.try_request(frame, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{}/{}: no reply to {what}", self.user, self.device))
    }

    /// The next frame off the connection into the backlog; false on a
    /// timeout or a closed connection.
    pub async fn receive_one(&mut self, wait: Duration) -> bool {
        match self.next_event(wait).await {
            Some(Event::Frame(frame)) => {
                self.backlog.push(frame);
                true
            }
            Some(Event::Closed(_)) | None => false,
        }
    }

    /// Waits for a frame matching `pred` (looking at the backlog first).
    pub async fn wait_for(&mut self, wait: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return Some(self.backlog.remove(i));
        }
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.next_event(left).await? {
                Event::Frame(frame) if pred(&frame) => return Some(frame),
                Event::Frame(frame) => self.backlog.push(frame),
                Event::Closed(_) => return None,
            }
        }
    }

    /// Collects frames for `wait` into the backlog (or until the connection closes).
    pub async fn drain_for(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next_event(left).await {
                Some(Event::Frame(frame)) => self.backlog.push(frame),
                Some(Event::Closed(_)) | None => return,
            }
        }
    }

    /// Removes and returns the backlog's frames of `kind`.
    pub fn take(&mut self, kind: &str) -> Vec<Value> {
        let (taken, rest): (Vec<Value>, Vec<Value>) = self.backlog.drain(..).partition(|f| f["type"] == kind);
        self.backlog = rest;
        taken
    }

    /// Every inbox entry after `cursor`, paged; returns them and the cursor to keep.
    pub async fn sync_all(&mut self, cursor: &str) -> Option<(Vec<Value>, String)> {
        let mut entries = Vec::new();
        let mut after = cursor.to_string();
        loop {
            let reply = self
                .try_request(json!({"type": "sync", "after": after, "limit": 100}), Duration::from_secs(10))
                .await?;
            assert_eq!(reply["type"], "synced", "{reply}");
            entries.extend(reply["entries"].as_array().cloned().unwrap_or_default());
            if reply["has_more"] != json!(true) {
                return Some((entries, reply["cursor"].as_str().unwrap_or("0").to_string()));
            }
            after = reply["next"].as_str().unwrap_or("0").to_string();
        }
    }
}

impl Drop for ClusterClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Message ids a device has, from live frames and syncs, by how they came.
#[derive(Default)]
pub struct Received {
    pub live: HashMap<String, usize>,
    pub synced: std::collections::HashSet<String>,
}

impl Received {
    pub fn note_live(&mut self, frames: Vec<Value>) {
        for frame in frames {
            let id = frame["message"]["id"].as_str().expect("message id").to_string();
            *self.live.entry(id).or_default() += 1;
        }
    }

    pub fn note_synced(&mut self, entries: &[Value]) {
        for entry in entries {
            self.synced.insert(entry["message"]["id"].as_str().expect("message id").to_string());
        }
    }

    pub fn has(&self, id: &str) -> bool {
        self.live.contains_key(id) || self.synced.contains(id)
    }
}

/// Asks `asker` about `users` until all are online: their sessions are registered everywhere.
pub async fn wait_all_online(asker: &mut ClusterClient, query: Value) {
    let started = Instant::now();
    loop {
        let reply = asker.request(query.clone()).await;
        // Right after Redis lost its data presence is unknown for a moment.
        let unknown = reply["type"] == "error" && reply["code"] == "unavailable";
        assert!(reply["type"] == "presence" || unknown, "{reply}");
        if !unknown && reply["users"].as_array().expect("users").iter().all(|u| u["online"] == json!(true)) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "not everyone online: {reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The push job streams (every partition).
fn push_streams() -> Vec<String> {
    use kubechat_gateway::chat::push::{PUSH_PARTITIONS, PUSH_STREAM, partition_streams};
    partition_streams(PUSH_STREAM, PUSH_PARTITIONS)
}

/// Every push job in the streams, oldest first.
pub async fn push_jobs(connection: &mut (impl redis::aio::ConnectionLike + Send)) -> Vec<Value> {
    push_jobs_after(connection, &vec!["-".to_string(); push_streams().len()]).await
}

/// Where each push stream ends (`(id` of its newest entry, `0-0` when
/// empty): jobs queued later are read with [`push_jobs_after`].
pub async fn push_stream_end(connection: &mut (impl redis::aio::ConnectionLike + Send)) -> Vec<String> {
    let mut ends = Vec::new();
    for stream in push_streams() {
        let newest: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
            .arg(&stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(connection)
            .await
            .expect("XREVRANGE");
        ends.push(newest.into_iter().next().map_or_else(|| "0-0".to_string(), |(id, _)| format!("({id}")));
    }
    ends
}

/// Push jobs queued after `starts` (per stream, an XRANGE start: `-`, or
/// `(id` from [`push_stream_end`]), oldest first. The shared Redis' streams
/// hold every suite's jobs: reading them whole timed out under load.
pub async fn push_jobs_after(
    connection: &mut (impl redis::aio::ConnectionLike + Send),
    starts: &[String],
) -> Vec<Value> {
    let mut entries: Vec<((u64, u64), Value)> = Vec::new();
    for (stream, start) in push_streams().iter().zip(starts) {
        let read: Vec<(String, Vec<(String, String)>)> =
            redis::cmd("XRANGE").arg(stream).arg(start).arg("+").query_async(connection).await.expect("XRANGE");
        for (id, fields) in read {
            let (ms, seq) = id.split_once('-').expect("a stream entry id");
            let order = (ms.parse().expect("entry id ms"), seq.parse().expect("entry id seq"));
            entries.extend(fields.into_iter().map(|(_, v)| (order, serde_json::from_str(&v).expect("job JSON"))));
        }
    }
    entries.sort_by_key(|(order, _)| *order);
    entries.into_iter().map(|(_, job)| job).collect()
}
