//! How the gateway and the push workers reach Redis: one server or a Redis
//! Cluster, behind one connection type, so the code that uses Redis has one
//! path for both.
//!
//! - [`Endpoint`]: where Redis is (from the config file) and how to connect.
//! - [`Connection`]: commands, pipelines and scripts; a single server's
//!   connection or a cluster's, which routes each command to the master of
//!   its key's slot and follows failovers and slot moves (`MOVED`, `ASK`).
//! - [`Connection::shards`]: which master owns which slots (a single server
//!   is one shard owning them all), for work that must be spread over the
//!   masters or done on each of them (sharded pub/sub subscriptions).
//! - [`slot`], [`SlotTags`] and [`by_slot`]: keys hash-tagged so that what a
//!   multi-key command or script touches shares a slot, and commands grouped
//!   per slot where it does not (a cluster refuses a cross-slot pipeline).
//!
//! Rule for every key a multi-key command or script touches: the keys share
//! a `{hash tag}`. A single server does not care, a cluster answers
//! `CROSSSLOT` otherwise; following the rule everywhere keeps one code path.

mod slots;
mod topology;

use std::time::Duration;

use futures::FutureExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value};

pub use slots::{SLOTS, SlotTags, by_slot, slot};
pub use topology::{Shard, parse_cluster_slots};

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("Redis URL {url}: {source}")]
    Url { url: String, source: redis::RedisError },
    #[error("connecting to Redis at {at}: {source}")]
    Connect { at: String, source: redis::RedisError },
}

/// Where Redis is and how to reach it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The single server, or the cluster's seed nodes (password included).
    nodes: Vec<redis::ConnectionInfo>,
    cluster: bool,
    /// How long a command and a connection attempt may take.
    pub timeout: Duration,
}

impl Endpoint {
    /// From the config file's `redis` section; `password` from the
    /// environment variable it names.
    pub fn new(config: &kubechat_config::Redis, password: Option<String>) -> Result<Self, EndpointError> {
        let nodes = config
            .seeds()
            .map(|url| {
                let info =
                    url.into_connection_info().map_err(|source| EndpointError::Url { url: redact(url), source })?;
                Ok(match &password {
                    Some(password) => {
                        let settings = info.redis_settings().clone().set_password(password);
                        info.set_redis_settings(settings)
                    }
                    None => info,
                })
            })
            .collect::<Result<Vec<_>, EndpointError>>()?;
        Ok(Self { nodes, cluster: config.cluster, timeout: Duration::from_secs(2) })
    }

    /// One Redis server at `url` (tests, tools).
    pub fn single(url: &str) -> Result<Self, EndpointError> {
        Self::new(&kubechat_config::Redis::single(url, None), None)
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// Where Redis is, without the password (for logs and errors).
    pub fn describe(&self) -> String {
        let addresses: Vec<String> = self.nodes.iter().map(|n| n.addr().to_string()).collect();
        if self.cluster { format!("Redis Cluster (seeds {})", addresses.join(", ")) } else { addresses.join(", ") }
    }

    /// A connection for commands: reconnects by itself (a single server's
    /// connection manager; a cluster connection refreshes its slot map and
    /// reconnects to whichever node now serves a slot).
    pub async fn connect(&self) -> Result<Connection, EndpointError> {
        let failed = |source| EndpointError::Connect { at: self.describe(), source };
        if self.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(self.nodes.clone())
                .connection_timeout(self.timeout)
                .response_timeout(self.timeout)
                .retries(3)
                .build()
                .map_err(failed)?;
            let connection = client.get_async_connection().await.map_err(failed)?;
            Ok(Connection::Cluster(connection))
        } else {
            let client = redis::Client::open(self.nodes[0].clone()).map_err(failed)?;
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(self.timeout))
                .set_connection_timeout(Some(self.timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(1));
            let manager = ConnectionManager::new_with_config(client, config).await.map_err(failed)?;
            Ok(Connection::Single(manager))
        }
    }

    /// A RESP3 connection to one node (`host:port` as [`Connection::shards`]
    /// names it; empty: the single server), with the credentials of the seeds, its pushes (sharded
    /// pub/sub messages, and a disconnection notice when it drops) sent to
    /// `pushes`. It does not reconnect: a dropped node connection is a
    /// topology question for its owner.
    pub async fn node_connection(
        &self,
        node: &str,
        pushes: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ) -> Result<MultiplexedConnection, EndpointError> {
        let failed = |source| EndpointError::Connect { at: node.to_string(), source };
        let seed = &self.nodes[0];
        let addr = if node.is_empty() {
            seed.addr().clone()
        } else {
            let (host, port) = node.rsplit_once(':').unwrap_or((node, "6379"));
            let port: u16 = port.parse().map_err(|_| failed((redis::ErrorKind::Client, "bad node port").into()))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            match seed.addr() {
                redis::ConnectionAddr::TcpTls { insecure, tls_params, .. } => {
                    redis::ConnectionAddr::TcpTls { host, port, insecure: *insecure, tls_params: tls_params.clone() }
                }
                _ => redis::ConnectionAddr::Tcp(host, port),
            }
        };
        let settings = seed.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
        let info = seed.clone().set_addr(addr).set_redis_settings(settings);
        let client = redis::Client::open(info).map_err(failed)?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_push_sender(pushes);
        client.get_multiplexed_async_connection_with_config(&config).await.map_err(failed)
    }
}

/// `url` without a password in it.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}***{}", &url[..scheme + 3], &url[at..]),
        _ => url.to_string(),
    }
}

/// A connection to Redis for commands, pipelines and scripts (cheap to
/// clone: clones share the connection).
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    /// The masters and the slots each serves: a single server is one shard
    /// with every slot, whatever its address (`address` is then empty: use
    /// the endpoint's own).
    pub async fn shards(&mut self) -> redis::RedisResult<Vec<Shard>> {
        match self {
            Self::Single(_) => Ok(vec![Shard::whole()]),
            Self::Cluster(cluster) => {
                let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(cluster).await?;
                parse_cluster_slots(&reply)
            }
        }
    }
}

impl From<ConnectionManager> for Connection {
    fn from(manager: ConnectionManager) -> Self {
        Self::Single(manager)
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Runs one pipeline per slot, concurrently, and returns the replies in the
/// order of `commands` (each `(key, command)`; the key names the slot).
pub async fn query_by_slot(conn: &Connection, commands: Vec<(String, Cmd)>) -> redis::RedisResult<Vec<Value>> {
    let count = commands.len();
    let groups = by_slot(commands.into_iter().enumerate().map(|(i, (key, cmd))| (key, (i, cmd))));
    let runs = groups.into_values().map(|group| {
        let mut conn = conn.clone();
        async move {
            let mut pipe = redis::pipe();
            let mut order = Vec::with_capacity(group.len());
            for (i, cmd) in group {
                pipe.add_command(cmd);
                order.push(i);
            }
            let values: Vec<Value> = pipe.query_async(&mut conn).await?;
            Ok::<_, redis::RedisError>(order.into_iter().zip(values).collect::<Vec<_>>())
        }
        .boxed()
    });
    let mut replies = vec![Value::Nil; count];
    for group in futures::future::try_join_all(runs).await? {
        for (i, value) in group {
            replies[i] = value;
        }
    }
    Ok(replies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("redis://:secret@host:6379"), "redis://***@host:6379");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
        let error = Endpoint::single("http://nope").expect_err("not a Redis URL");
        assert!(error.to_string().starts_with("Redis URL http://nope"), "{error}");
    }

    #[test]
    fn a_cluster_says_so() {
        let config = kubechat_config::Redis {
            url: "redis://:pw@10.0.0.1:6379".into(),
            password_env: None,
            cluster: true,
            seed_urls: vec!["redis://10.0.0.2:6379".into()],
        };
        let endpoint = Endpoint::new(&config, None).expect("valid");
        assert!(endpoint.is_cluster());
        let described = endpoint.describe();
        assert!(described.contains("10.0.0.1:6379") && described.contains("10.0.0.2:6379"), "{described}");
        assert!(!described.contains("pw"), "{described}");
    }
}
