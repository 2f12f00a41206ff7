//! kubechat gateway: WebSocket chat server, push worker and a small client.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kubechat_gateway::app::{self, BrokerSetup, GatewayOptions};
use kubechat_gateway::broker::redis::RedisBrokerConfig;
use kubechat_gateway::broker::redis::send_keys::{RedisSendKeys, SendKeyNames};
use kubechat_gateway::chat::push::RedisPushQueue;
use kubechat_gateway::config::{GatewayConfig, chat_config};
use kubechat_gateway::store::embedded::{CHECKPOINT_EVERY, EmbeddedStore};
use kubechat_gateway::store::scylla::{ScyllaConfig, ScyllaStore};
use kubechat_gateway::transport::admin::AdminToken;
use kubechat_gateway::transport::auth::Authenticator;
use kubechat_gateway::transport::connection::ConnectionLimits;
use kubechat_gateway::transport::drain::{Drain, DrainParams, Origin};
use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::layer::{Layer as _, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

/// jemalloc instead of glibc's malloc: the store's threads free what the
/// connections' thread allocated (and back), which glibc's per-thread arenas
/// pay for in locking and consolidation (a quarter of the log thread's samples
/// at 5,000 messages a second). Measured in docs/benchmarks.md: less CPU per
/// message and per idle connection, the same memory per connection.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(version, about = "kubechat WebSocket gateway, push worker and client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One gateway with the embedded durable store: no cluster, Redis or Cassandra.
    Standalone {
        /// Where messages are kept (created if missing; survives restarts).
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Serve GET /dev/token?user=…&device=…, which mints a token for
        /// anyone who asks (development only). Default: on when listening on
        /// a loopback address (the web client signs in with it), else off.
        #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        dev_tokens: Option<bool>,
        /// Longest time between checkpoints of the store's database, which
        /// bound what a restart replays from the log. Longer: fewer bytes
        /// written; shorter: smaller write-back bursts, which the acks
        /// waiting on the log's fsyncs feel.
        #[arg(long, value_name = "SECONDS", default_value_t = CHECKPOINT_EVERY.as_secs(),
              value_parser = clap::value_parser!(u64).range(1..))]
        checkpoint_every: u64,
    },
    /// A gateway of a ChatCluster (ScyllaDB + Redis), configured by the operator's file.
    Gateway {
        /// The JSON config the operator mounts from the `<cluster>-gateway-config`
        /// ConfigMap; its format, with an example, is in docs/admin.md ("The config file").
        #[arg(long, env = "KUBECHAT_CONFIG", default_value = "/etc/kubechat/gateway.json")]
        config: PathBuf,
        /// Unique per running gateway (the StatefulSet ordinal).
        #[arg(long, env = "KUBECHAT_WORKER_ID", default_value_t = 0)]
        worker_id: u16,
        /// Unique among running gateways: where other gateways forward to (the pod name).
        #[arg(long, env = "POD_NAME")]
        gateway_id: String,
        /// The address to listen on and to tell clients (the pod IP); all
        /// interfaces, advertised by host name, when unset.
        #[arg(long, env = "KUBECHAT_POD_IP")]
        pod_ip: Option<std::net::IpAddr>,
    },
    /// A push worker: delivers notifications queued for offline devices.
    PushWorker {
        #[arg(long, env = "KUBECHAT_CONFIG", default_value = "/etc/kubechat/gateway.json")]
        config: PathBuf,
        /// Unique among running workers (the pod name).
        #[arg(long, env = "POD_NAME", default_value = "push-worker")]
        consumer: String,
    },
    /// Prints a token signed with a key file (development and tests).
    Token {
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long)]
        user: String,
        #[arg(long)]
        device: String,
        #[arg(long, default_value_t = 86_400)]
        ttl_seconds: u64,
    },
    /// A line-based chat client (try it against `standalone`).
    Chat {
        #[arg(long, default_value = "ws://127.0.0.1:8080/v1/ws")]
        url: String,
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "terminal")]
        device: String,
        /// A token; without one it is minted from the standalone gateway's
        /// key file (`<data-dir>/signing-key`).
        #[arg(long)]
        token: Option<String>,
        /// The standalone gateway's `--data-dir`, whose key signs the token.
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
}

const DEFAULT_DATA_DIR: &str = "kubechat-data";
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// The command that chats with this standalone gateway from anywhere.
fn chat_command(user: &str, listen: SocketAddr, data_dir: &Path) -> String {
    let mut command = format!("cargo run --release -p kubechat-gateway -- chat --user {user}");
    if listen.to_string() != DEFAULT_LISTEN {
        command.push_str(&format!(" --url ws://{listen}{}", kubechat_gateway::transport::WS_PATH));
    }
    if data_dir != Path::new(DEFAULT_DATA_DIR) {
        let shown = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        command.push_str(&format!(" --data-dir {}", shown.display()));
    }
    command
}

/// The key `chat` signs its token with: the standalone gateway's, never a
/// new one (a token signed with any other key is refused with 401).
fn existing_signing_key(data_dir: &Path) -> anyhow::Result<(Vec<u8>, String)> {
    let path = data_dir.join("signing-key");
    let shown = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    match std::fs::read(&path) {
        Ok(key) => Ok((key, format!("signed with {}", shown.display()))),
        Err(e) => anyhow::bail!(
            "no signing key at {} ({e}): the standalone gateway writes it into its --data-dir when it starts; \
             start it first, run chat from the directory you started it in, or pass --data-dir or --token",
            shown.display()
        ),
    }
}

/// The standalone gateway's signing key: created once in the data folder.
fn local_signing_key(data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = data_dir.join("signing-key");
    if let Ok(key) = std::fs::read(&path) {
        return Ok(key);
    }
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness for a signing key: {e}"))?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, &hex).with_context(|| format!("writing {}", path.display()))?;
    Ok(hex.into_bytes())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let levels = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The driver's warnings repeat for every attempt during a store outage: throttled.
    let filter = levels.and(kubechat_gateway::throttle::DriverLogThrottle);
    // Colour only for a terminal: a pod's log (`kubectl logs`) shows the codes as text.
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let lines = tracing_subscriber::fmt::layer().with_ansi(colour);
    tracing_subscriber::registry().with(lines.with_filter(filter)).init();
    match Cli::parse().command {
        Command::Standalone { data_dir, listen, dev_tokens, checkpoint_every } => {
            let key = local_signing_key(&data_dir)?;
            let checkpoint_every = Duration::from_secs(checkpoint_every);
            let store =
                Arc::new(EmbeddedStore::open_with(&data_dir, checkpoint_every).context("opening the embedded store")?);
            let floor = store.max_id().await.context("reading the newest stored id")?;
            let dev_tokens = dev_tokens.unwrap_or(listen.ip().is_loopback());
            let options = GatewayOptions { listen, dev_tokens, web_client: true, ..GatewayOptions::default() };
            let auth = Authenticator::new(&key).context("loading the signing key")?;
            let running = app::start(store.clone(), Arc::new(store), BrokerSetup::Local, auth, floor, options)
                .await
                .with_context(|| format!("listening on {listen}"))?;
            println!("kubechat standalone gateway on {} (data in {})", running.ws_url(), data_dir.display());
            let web = format!("http://{listen}/");
            if dev_tokens {
                println!("web client: open {web} in two browser tabs and sign in as two users");
            } else {
                println!("web client: {web} (no development tokens: paste a token to sign in)");
            }
            let from_here = if data_dir == Path::new(DEFAULT_DATA_DIR) { " (from this directory)" } else { "" };
            println!("chat from two terminals{from_here}:");
            println!("  {}", chat_command("alice", listen, &data_dir));
            println!("  {}", chat_command("bob", listen, &data_dir));
            wait_for_signal().await;
            running.stop(Duration::from_secs(10)).await;
        }
        Command::Gateway { config, worker_id, gateway_id, pod_ip } => {
            let file = GatewayConfig::load(&config)?;
            let key = std::fs::read(&file.auth.signing_key_file)
                .with_context(|| format!("reading the signing key {}", file.auth.signing_key_file.display()))?;
            let env = |name: &Option<String>| name.as_ref().and_then(|n| std::env::var(n).ok());
            let credentials = file.scylla.credentials_env.as_ref();
            let retry_window = file.chat.send_retry_window();
            let store = ScyllaStore::connect(ScyllaConfig {
                contact_points: file.scylla.contact_points.clone(),
                keyspace: file.scylla.keyspace.clone(),
                replication_factor: file.scylla.replication_factor,
                local_datacenter: file.scylla.local_datacenter.clone(),
                username: credentials.and_then(|c| std::env::var(&c.username).ok()),
                password: credentials.and_then(|c| std::env::var(&c.password).ok()),
                retry_window,
                ..ScyllaConfig::default()
            })
            .await
            .context("connecting to ScyllaDB")?;
            let endpoint = kubechat_redis::Endpoint::new(&file.redis, env(&file.redis.password_env))
                .context("configuring Redis")?
                // Bounded like the broker's: a black-holed Redis costs a command
                // two seconds, not a hang (the push queue and the send keys share it).
                .with_timeout(Duration::from_secs(2));
            let redis = endpoint.connect().await?;
            // Idempotency keys are reserved in Redis: no Paxos round per send.
            let send_keys = RedisSendKeys::start(redis.clone(), SendKeyNames::default(), retry_window);
            let store = store.with_send_keys(send_keys);
            let broker = BrokerSetup::Redis {
                endpoint: Box::new(endpoint),
                config: RedisBrokerConfig {
                    gateway_id: gateway_id.clone(),
                    // A dead gateway's users go offline when its lease runs out.
                    lease: file.chat.offline_after(),
                    command_timeout: Duration::from_secs(2),
                    worker_id: Some(worker_id),
                },
            };
            let admin_token = match &file.admin.token_file {
                Some(path) => Some(Arc::new(
                    AdminToken::from_file(path)
                        .with_context(|| format!("reading the admin token {}", path.display()))?,
                )),
                None => {
                    tracing::warn!(
                        "the config names no admin.tokenFile: POST and DELETE /v1/admin/drain are refused \
                         (SIGTERM still drains)"
                    );
                    None
                }
            };
            let bind = pod_ip.unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
            let host = pod_ip.map_or_else(|| gateway_id.clone(), |ip| ip.to_string());
            let drain = DrainParams::from(&file.drain);
            let options = GatewayOptions {
                listen: SocketAddr::new(bind, file.listen.websocket),
                admin: Some(SocketAddr::new(bind, file.listen.admin)),
                admin_token,
                advertise_url: Some(format!(
                    "ws://{host}:{}{}",
                    file.listen.websocket,
                    kubechat_gateway::transport::WS_PATH
                )),
                gateway_id: gateway_id.clone(),
                drain,
                chat: chat_config(&file.chat),
                limits: ConnectionLimits { idle_timeout: file.chat.idle_timeout(), ..ConnectionLimits::default() },
                max_connections: file.max_connections,
                dev_tokens: false,
                web_client: file.web_client,
                worker_id,
            };
            let auth = Authenticator::new(&key).context("loading the signing key")?;
            // Worker ids are unique per pod and clocks are NTP-synced: see docs/ids.md.
            let floor = 0;
            let push = Arc::new(RedisPushQueue::new(redis, 1_000_000));
            let running = app::start(Arc::new(store), push, broker, auth, floor, options).await?;
            tracing::info!(gateway = %running.ws_url(), "gateway of the cluster started");
            wait_for_signal().await;
            // SIGTERM (pod deletion, node drain) drains first; the operator
            // sets the grace period to the window plus a margin. A second
            // signal stops at once.
            Drain::start(&running.gateway, drain, Origin::Shutdown);
            // Other gateways stop recommending this one at once (their cache aside).
            running.gateway.broker.publish_load_now(running.gateway.load()).await;
            tokio::select! {
                () = running.gateway.drain.finished() => {}
                () = wait_for_signal() => tracing::warn!("second signal: stopping without finishing the drain"),
            }
            running.stop(Duration::from_secs(10)).await;
        }
        Command::PushWorker { config, consumer } => {
            let config = kubechat_push::PushWorkerConfig::load(&config, &consumer)?;
            let shutdown = tokio_util::sync::CancellationToken::new();
            let worker = tokio::spawn(kubechat_push::run_push_worker(config, shutdown.clone()));
            wait_for_signal().await;
            shutdown.cancel();
            worker.await.context("push worker task")??;
        }
        Command::Token { key_file, user, device, ttl_seconds } => {
            let key = std::fs::read(&key_file).with_context(|| format!("reading {}", key_file.display()))?;
            let token = Authenticator::new(&key)?.mint(&user, &device, ttl_seconds)?;
            println!("{token}");
        }
        Command::Chat { url, user, device, token, data_dir } => {
            let (token, signed_with) = match token {
                Some(token) => (token, "given with --token".to_string()),
                None => {
                    let (key, signed_with) = existing_signing_key(&data_dir)?;
                    (Authenticator::new(&key)?.mint(&user, &device, 86_400)?, signed_with)
                }
            };
            kubechat_gateway::client::interactive(&url, &token, &signed_with).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_banner_names_what_differs_from_the_defaults() {
        let default_listen: SocketAddr = DEFAULT_LISTEN.parse().expect("address");
        let plain = chat_command("alice", default_listen, Path::new(DEFAULT_DATA_DIR));
        assert_eq!(plain, "cargo run --release -p kubechat-gateway -- chat --user alice");
        let other = chat_command("bob", "127.0.0.1:9000".parse().expect("address"), Path::new("/srv/chat"));
        assert_eq!(
            other,
            "cargo run --release -p kubechat-gateway -- chat --user bob --url ws://127.0.0.1:9000/v1/ws --data-dir /srv/chat"
        );
    }
}
