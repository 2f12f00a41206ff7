//! Connections to the real services the tests run against.
//!
//! Every `connect_*` function panics with a message that names the component,
//! the address tried, the underlying error and the command that starts it:
//! a test that needs a service fails loudly instead of skipping.

use std::path::PathBuf;
use std::time::Duration;

/// How long a connection attempt may take before the component counts as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn env_or(name: &str, default: impl FnOnce() -> String) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(default)
}

fn missing(component: &str, address: &str, error: impl std::fmt::Display, start: &str) -> ! {
    panic!(
        "{component} is not reachable at {address}: {error}\n\
         Start it with `{start}`, or run the whole suite with `./e2e/test.sh`."
    )
}

/// `redis://` URL of the test Redis (`KUBECHAT_REDIS_URL`).
pub fn redis_url() -> String {
    env_or("KUBECHAT_REDIS_URL", || "redis://127.0.0.1:16379".into())
}

/// `host:port` of the test Cassandra node (`KUBECHAT_CQL_NODE`).
pub fn cql_node() -> String {
    env_or("KUBECHAT_CQL_NODE", || "127.0.0.1:19042".into())
}

/// Runtime folder of the local components (`KUBECHAT_RUN`).
pub fn run_dir() -> PathBuf {
    let cache = env_or("KUBECHAT_CACHE", || {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        format!("{home}/.cache/kubechat")
    });
    PathBuf::from(env_or("KUBECHAT_RUN", || format!("{cache}/run")))
}

/// Admin kubeconfig of the local control plane (`KUBECONFIG`).
pub fn kubeconfig_path() -> PathBuf {
    std::env::var_os("KUBECONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| run_dir().join("kube/admin.kubeconfig"))
}

/// A multiplexed connection to the test Redis, checked with a PING.
pub async fn connect_redis() -> redis::aio::MultiplexedConnection {
    let url = redis_url();
    let start = "e2e/local/redis.sh start";
    let client = redis::Client::open(url.as_str()).unwrap_or_else(|e| missing("Redis", &url, e, start));
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok::<_, redis::RedisError>(conn)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => missing("Redis", &url, e, start),
        Err(_) => missing("Redis", &url, "timed out", start),
    }
}

/// A CQL session to the test Cassandra node (the ScyllaDB stand-in).
pub async fn connect_cql() -> scylla::client::session::Session {
    let node = cql_node();
    let start = "e2e/local/cassandra.sh start";
    let mut builder = scylla::client::session_builder::SessionBuilder::new();
    builder = builder.known_node(&node).connection_timeout(CONNECT_TIMEOUT);
    match tokio::time::timeout(CONNECT_TIMEOUT * 2, builder.build()).await {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => missing("Cassandra (CQL)", &node, e, start),
        Err(_) => missing("Cassandra (CQL)", &node, "timed out", start),
    }
}

/// A client for the local kube-apiserver, checked with a version request.
pub async fn connect_kube() -> kube::Client {
    let path = kubeconfig_path();
    let shown = path.display().to_string();
    let start = "e2e/local/control-plane.sh start";
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&path).unwrap_or_else(|e| missing("Kubernetes API", &shown, e, start));
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap_or_else(|e| missing("Kubernetes API", &shown, e, start));
    let server = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).unwrap_or_else(|e| missing("Kubernetes API", &server, e, start));
    match tokio::time::timeout(CONNECT_TIMEOUT, client.apiserver_version()).await {
        Ok(Ok(_)) => client,
        Ok(Err(e)) => missing("Kubernetes API", &server, e, start),
        Err(_) => missing("Kubernetes API", &server, "timed out", start),
    }
}

/// A `redis-server` of one test, on a free loopback port and without
/// persistence, for tests that take Redis away (the shared one must stay up).
pub struct PrivateRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let mut redis = Self { port, dir: tempfile::tempdir().expect("a temp dir"), child: None };
        redis.run().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL; its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, empty, on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.run().await;
    }

    async fn run(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", "", "--appendonly", "no"])
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| missing("redis-server", "PATH", e, "e2e/local/redis.sh start"));
        self.child = Some(child);
        let address = format!("127.0.0.1:{}", self.port);
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        while tokio::net::TcpStream::connect(&address).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "a private redis-server did not listen on {address}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP forwarder on a loopback port of its own in front of a shared
/// component, for a test that takes the component away from its gateways
/// without stopping it for every other suite. Closed, it drops every
/// connection through it and resets new ones at once (to a client, a server
/// that is down); opened, it forwards again. The listener stays bound while
/// closed, so no other socket takes the port meanwhile.
pub struct TcpGate {
    port: u16,
    state: std::sync::Arc<std::sync::Mutex<GateState>>,
    stop: tokio_util::sync::CancellationToken,
}

#[derive(Default)]
struct GateState {
    closed: bool,
    /// Cancelled by `close`: ends the connections forwarded until then.
    forwarded: tokio_util::sync::CancellationToken,
}

impl TcpGate {
    /// Opened, forwarding to `target` (`host:port`).
    pub async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the gate");
        let port = listener.local_addr().expect("gate address").port();
        let gate = Self { port, state: Default::default(), stop: tokio_util::sync::CancellationToken::new() };
        let (state, stop) = (gate.state.clone(), gate.stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut client, _)) = accepted else { continue };
                let ended = {
                    let state = state.lock().expect("gate lock");
                    (!state.closed).then(|| state.forwarded.clone())
                };
                let Some(ended) = ended else {
                    // A reset, as from a port nobody listens on.
                    let _ = client.set_zero_linger();
                    continue;
                };
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        () = ended.cancelled() => {
                            let _ = client.set_zero_linger();
                            let _ = server.set_zero_linger();
                        }
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        gate
    }

    /// `127.0.0.1:PORT`, for a contact point or a URL.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Resets every connection through the gate and each new one.
    pub fn close(&self) {
        let mut state = self.state.lock().expect("gate lock");
        state.closed = true;
        state.forwarded.cancel();
        state.forwarded = tokio_util::sync::CancellationToken::new();
    }

    /// Forwards new connections again.
    pub fn open(&self) {
        self.state.lock().expect("gate lock").closed = false;
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.stop.cancel();
        self.close();
    }
}
