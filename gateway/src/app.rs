//! Wiring: builds a gateway from a store, a push queue and a key, and runs
//! it until shutdown. Used by `main` and by the tests, so both run the same
//! server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::redis::{RedisBroker, RedisBrokerConfig};
use crate::broker::{Broker, LocalBroker};
use crate::chat::hub::{Hub, Kick};
use crate::chat::members::MemberCache;
use crate::chat::presence::PresenceTracker;
use crate::chat::push::PushQueue;
use crate::chat::{ChatConfig, ChatParts, ChatService, GatewayLocal};
use crate::ids::IdGenerator;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::store::health::{CheckedStore, StoreHealth};
use crate::transport::admin::AdminToken;
use crate::transport::auth::Authenticator;
use crate::transport::connection::ConnectionLimits;
use crate::transport::drain::{Drain, DrainParams, Origin};
use crate::transport::{Gateway, Identity, serve};

#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// WebSocket (and health) address.
    pub listen: SocketAddr,
    /// Health, readiness and metrics on a separate address (Kubernetes probes).
    pub admin: Option<SocketAddr>,
    /// What a caller must present to drain this gateway, or cancel a drain,
    /// through the admin API (`None`: nobody can; see `transport::admin`).
    pub admin_token: Option<Arc<AdminToken>>,
    pub chat: ChatConfig,
    pub limits: ConnectionLimits,
    pub max_connections: usize,
    pub dev_tokens: bool,
    /// Serve the web client at `/` (standalone: always; clustered: `webClient`).
    pub web_client: bool,
    /// Unique among running gateways (the StatefulSet ordinal).
    pub worker_id: u16,
    /// The gateway id (the pod name) discovery and the operator know it by.
    pub gateway_id: String,
    /// The WebSocket URL clients use to reach this gateway (default: the
    /// listen address).
    pub advertise_url: Option<String>,
    /// What a drain uses when its caller gives no parameters (SIGTERM).
    pub drain: DrainParams,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin: None,
            admin_token: None,
            chat: ChatConfig::default(),
            limits: ConnectionLimits::default(),
            max_connections: 100_000,
            dev_tokens: false,
            web_client: false,
            worker_id: 0,
            gateway_id: "standalone".into(),
            advertise_url: None,
            drain: DrainParams::default(),
        }
    }
}

/// How this gateway finds the others.
#[derive(Clone, Debug)]
pub enum BrokerSetup {
    /// Alone (standalone mode): every session is here.
    Local,
    /// One of many sharing Redis.
    Redis { endpoint: Box<kubechat_redis::Endpoint>, config: RedisBrokerConfig },
}

/// A started gateway.
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub metrics: Metrics,
    pub chat: Arc<ChatService>,
    pub gateway: Arc<Gateway>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// The admin API answers until the very end (outside `tasks`).
    admin: Option<tokio::task::JoinHandle<()>>,
}

impl RunningGateway {
    pub fn ws_url(&self) -> String {
        format!("ws://{}{}", self.addr, crate::transport::WS_PATH)
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Drains (moving every client to another gateway within the drain's
    /// window, see [`crate::transport::drain`]), then stops. A drain already
    /// running is waited for, not restarted (nor cancellable any more).
    pub async fn drain_and_stop(self, params: DrainParams, grace: Duration) {
        Drain::start(&self.gateway, params, Origin::Shutdown);
        self.gateway.drain.finished().await;
        self.stop(grace).await;
    }

    /// Closes every connection (telling clients to reconnect) and waits for
    /// in-flight work, at most `grace`.
    pub async fn stop(self, grace: Duration) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait()).await.is_err() {
            tracing::warn!("connections still open after {grace:?}; exiting anyway");
        }
        if let Some(admin) = self.admin {
            admin.abort();
        }
    }
}

pub async fn start(
    store: Arc<dyn Store>,
    push: Arc<dyn PushQueue>,
    broker: BrokerSetup,
    auth: Authenticator,
    id_floor: u64,
    options: GatewayOptions,
) -> anyhow::Result<RunningGateway> {
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let store_health = Arc::new(StoreHealth::new(metrics.store_up.clone()));
    let store = Arc::new(CheckedStore::new(store, store_health.clone()));
    tasks.spawn(store.clone().probe(shutdown.clone()));
    let hub = Hub::new();
    let presence = Arc::new(PresenceTracker::new(options.chat.offline_after));
    let members = Arc::new(MemberCache::new(options.chat.members_ttl, 100_000));
    let (local, remote_offline) =
        GatewayLocal::new(hub.clone(), presence.clone(), members.clone(), metrics.clone(), &tasks, shutdown.clone());
    let broker: Arc<dyn Broker> = match broker {
        BrokerSetup::Local => Arc::new(LocalBroker::default()),
        BrokerSetup::Redis { endpoint, config } => {
            RedisBroker::start(*endpoint, config, local, &tasks, shutdown.clone()).await?
        }
    };
    let parts = ChatParts {
        store,
        push,
        hub,
        presence,
        broker: broker.clone(),
        members,
        // Above the newest stored id (standalone) and where the worker id's
        // previous holder stopped (cluster): a clock behind cannot reuse ids.
        ids: IdGenerator::new(options.worker_id, id_floor.max(broker.id_floor())),
        config: options.chat.clone(),
        metrics: metrics.clone(),
    };
    let chat = ChatService::start(parts, remote_offline, &tasks, shutdown.clone());
    // Connections learn of a shutdown from their outbox (it is what they
    // wait on anyway): no waiter on the token per connection.
    tasks.spawn({
        let (hub, shutdown) = (chat.hub().clone(), shutdown.clone());
        async move {
            shutdown.cancelled().await;
            hub.kick_all(Kick::GoingAway);
        }
    });
    let max_frame_bytes = options.chat.limits.max_frame_bytes();
    let listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("listening for WebSocket clients on {}", options.listen))?;
    let addr = listener.local_addr()?;
    let identity = Identity {
        pod: options.gateway_id.clone(),
        url: options.advertise_url.clone().unwrap_or_else(|| format!("ws://{addr}{}", crate::transport::WS_PATH)),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at_ms: crate::ids::now_ms(),
        capacity: options.max_connections,
    };
    let gateway = Arc::new(Gateway {
        chat: chat.clone(),
        broker,
        store_health,
        auth: Arc::new(auth),
        metrics: metrics.clone(),
        limits: options.limits.clone(),
        max_frame_bytes,
        websocket: Gateway::websocket_config(max_frame_bytes),
        dev_tokens: options.dev_tokens,
        web_client: options.web_client,
        admin_token: options.admin_token.clone(),
        ready: Arc::new(AtomicBool::new(true)),
        connection_slots: Arc::new(Semaphore::new(options.max_connections)),
        identity,
        drain: Drain::default(),
        drain_defaults: options.drain,
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
    });
    tasks.spawn(serve(listener, gateway.clone()));
    tasks.spawn(report_load_every_second(gateway.clone()));
    let (admin_addr, admin) = match options.admin {
        Some(admin) => {
            let listener =
                TcpListener::bind(admin).await.with_context(|| format!("listening for the admin API on {admin}"))?;
            let admin_addr = listener.local_addr()?;
            (Some(admin_addr), Some(tokio::spawn(crate::transport::admin::serve(listener, gateway.clone()))))
        }
        None => (None, None),
    };
    tracing::info!(%addr, ?admin_addr, "gateway listening");
    Ok(RunningGateway { addr, admin_addr, metrics, chat, gateway, shutdown, tasks, admin })
}

/// Keeps the broker's copy of this gateway's load (for discovery) current.
async fn report_load_every_second(gateway: Arc<Gateway>) {
    loop {
        gateway.report_load();
        tokio::select! {
            () = gateway.shutdown.cancelled() => {
                gateway.report_load();
                return;
            }
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
