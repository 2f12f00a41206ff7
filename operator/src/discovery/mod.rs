//! Service discovery: on an interval the operator reads every gateway pod's
//! load and publishes the list in the endpoint ConfigMap `<name>-endpoints`,
//! rewriting it only when it changed in a way clients care about and at
//! most once per interval (docs/operator.md).
//!
//! - [`endpoints`]: the published document and the write policy (pure).
//! - [`poll`]: one gateway's load report over HTTP.
//! - `gateways.rs`: which pods are a cluster's gateways, how to reach each,
//!   and the entry its poll gives it (pure).
//! - `round.rs`: one cluster's round: poll, decide, write the ConfigMap.
//! - this file: the loop. It runs beside the controller while this replica
//!   leads, from caches of the ChatClusters, gateway pods and endpoint
//!   ConfigMaps; each cluster's round runs as a task of its own, so a slow
//!   cluster never delays another, and a cluster whose round is still
//!   running is not polled again until it ends.
//!
//! The data key is written by a merge patch under a field manager of its
//! own ([`FIELD_MANAGER`]), conditional on the resourceVersion it compared
//! against; the reconcile applies the ConfigMap without data, so neither
//! undoes the other.

pub mod endpoints;
mod gateways;
pub mod poll;
mod round;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use kubechat_crds::ChatCluster;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use self::gateways::{admin_addr, endpoint, gateway_pods, websocket_addr};
use self::round::{LastWrite, Round};
use crate::Result;
use crate::desired::gateway::COMPONENT;
use crate::desired::{LABEL_COMPONENT, LABEL_MANAGED_BY, Names};
use crate::metrics::Metrics;
use crate::scope::Scope;

/// Field manager of the endpoint list (`data.endpoints.json`).
pub const FIELD_MANAGER: &str = "kubechat-operator-discovery";
/// How often the loop looks for new clusters when none is due sooner.
const IDLE_TICK: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Options {
    /// Load polls in flight at once, over all clusters.
    pub max_concurrent_polls: usize,
    /// Dial only loopback pod IPs; any other counts as unreachable without
    /// being dialed. For harnesses whose pods are local processes (the e2e
    /// suite), so a misconfigured control plane cannot send them elsewhere.
    pub loopback_only: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { max_concurrent_polls: 32, loopback_only: false }
    }
}

/// The poll interval of a cluster (`spec.gateway.discovery.intervalSeconds`).
pub fn interval(cc: &ChatCluster) -> Duration {
    Duration::from_secs(u64::try_from(cc.spec.gateway.discovery.interval_seconds).unwrap_or(1).max(1))
}

/// Per-request timeout: half an interval (a timed-out poll is retried once
/// in the same round), between 200 ms and 2 s.
pub fn poll_timeout(interval: Duration) -> Duration {
    (interval / 2).clamp(Duration::from_millis(200), Duration::from_secs(2))
}

/// Runs until `shutdown`. `clusters` is the controller's cache.
pub async fn run(
    client: Client,
    scope: Scope,
    clusters: Store<ChatCluster>,
    metrics: Metrics,
    options: Options,
    shutdown: CancellationToken,
) {
    let selector = format!("{LABEL_COMPONENT}={COMPONENT},{LABEL_MANAGED_BY}={}", crate::FIELD_MANAGER);
    let config = watcher::Config::default().labels(&selector);
    let (pods, pods_writer) = reflector::store::<Pod>();
    let (config_maps, config_maps_writer) = reflector::store::<ConfigMap>();
    let pod_events = watcher(scope.api::<Pod>(client.clone()), config.clone())
        .default_backoff()
        .modify(|pod| pod.managed_fields_mut().clear());
    let config_map_events = watcher(scope.api::<ConfigMap>(client.clone()), config)
        .default_backoff()
        .modify(|cm| cm.managed_fields_mut().clear());
    // Nodes for their zone label only: metadata, cluster-wide. Not waited
    // for: without it (no RBAC for nodes) the list just names no zones.
    let (nodes, nodes_writer) = reflector::store::<PartialObjectMeta<Node>>();
    let node_events = watcher(Api::<PartialObjectMeta<Node>>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|node| node.managed_fields_mut().clear());
    let watches = futures::future::join3(
        reflector::reflector(pods_writer, pod_events).for_each(log_watch_error),
        reflector::reflector(config_maps_writer, config_map_events).for_each(log_watch_error),
        reflector::reflector(nodes_writer, node_events).for_each(log_watch_error),
    );
    let caches = Caches { clusters, pods, config_maps, nodes };
    let loop_ = Loop { client, metrics, options, caches };
    tokio::select! {
        () = shutdown.cancelled() => {}
        _ = watches => tracing::warn!("discovery watches ended; no more endpoint lists are published"),
        () = loop_.run() => tracing::warn!("the ChatCluster cache went away; no more endpoint lists are published"),
    }
}

/// Each pod's zone: the `zone_key` label of its node (pods whose node is
/// not known, or names no zone, are left out).
fn zones_of(
    pods: &[Arc<Pod>],
    zone_key: &str,
    node: impl Fn(&str) -> Option<Arc<PartialObjectMeta<Node>>>,
) -> BTreeMap<String, String> {
    pods.iter()
        .filter_map(|pod| {
            let node = node(pod.spec.as_ref()?.node_name.as_deref()?)?;
            Some((pod.name_any(), node.labels().get(zone_key)?.clone()))
        })
        .collect()
}

async fn log_watch_error<T>(event: Result<T, watcher::Error>) {
    // Retried with backoff; a warning, since nothing is published until the
    // caches fill (a missing RBAC rule for pods shows up here).
    if let Err(e) = event {
        tracing::warn!(error = %e, "discovery watch failed; retrying");
    }
}

#[derive(Clone)]
struct Caches {
    clusters: Store<ChatCluster>,
    pods: Store<Pod>,
    config_maps: Store<ConfigMap>,
    nodes: Store<PartialObjectMeta<Node>>,
}

struct Loop {
    client: Client,
    metrics: Metrics,
    options: Options,
    caches: Caches,
}

/// What the loop remembers of one cluster.
#[derive(Default)]
struct ClusterState {
    next_due: Option<Instant>,
    busy: bool,
    last_write: Option<LastWrite>,
}

impl Loop {
    async fn run(self) {
        let Caches { clusters, pods, config_maps, .. } = &self.caches;
        // A round on an empty cache would publish an empty list.
        if clusters.wait_until_ready().await.is_err()
            || pods.wait_until_ready().await.is_err()
            || config_maps.wait_until_ready().await.is_err()
        {
            return;
        }
        tracing::info!("discovery started");
        let permits = Arc::new(Semaphore::new(self.options.max_concurrent_polls.max(1)));
        let mut states: HashMap<ObjectRef<ChatCluster>, ClusterState> = HashMap::new();
        let mut rounds: JoinSet<(ObjectRef<ChatCluster>, Option<LastWrite>)> = JoinSet::new();
        loop {
            let now = Instant::now();
            let live = self.caches.clusters.state();
            for cc in &live {
                let key = ObjectRef::from_obj(cc.as_ref());
                let state = states.entry(key.clone()).or_default();
                if state.busy || state.next_due.is_some_and(|due| due > now) {
                    continue;
                }
                state.busy = true;
                state.next_due = Some(now + interval(cc));
                let pods = gateway_pods(cc, &self.caches.pods.state());
                let round = Round {
                    client: self.client.clone(),
                    cc: cc.clone(),
                    zones: zones_of(&pods, &cc.spec.topology_spread.zone_key, |node| {
                        self.caches.nodes.get(&ObjectRef::new(node))
                    }),
                    pods,
                    config_map: self.caches.config_maps.get(&endpoints_ref(cc)),
                    last_write: state.last_write.clone(),
                    permits: permits.clone(),
                    metrics: self.metrics.clone(),
                    options: self.options.clone(),
                };
                rounds.spawn(async move {
                    let written = match round.run().await {
                        Ok(written) => written,
                        Err(e) => {
                            tracing::warn!(cluster = %key, error = %e, "discovery round failed");
                            None
                        }
                    };
                    (key, written)
                });
            }
            // Forget deleted clusters once their round is over.
            let keys: HashSet<ObjectRef<ChatCluster>> =
                live.iter().map(|cc| ObjectRef::from_obj(cc.as_ref())).collect();
            states.retain(|key, state| state.busy || keys.contains(key));
            let wake = states
                .values()
                .filter(|s| !s.busy)
                .filter_map(|s| s.next_due)
                .min()
                .map_or(now + IDLE_TICK, |due| due.min(now + IDLE_TICK));
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                Some(done) = rounds.join_next() => match done {
                    Ok((key, written)) => {
                        if let Some(state) = states.get_mut(&key) {
                            state.busy = false;
                            if written.is_some() {
                                state.last_write = written;
                            }
                        }
                    }
                    // Rounds do not panic; if one did, its cluster stays busy
                    // and unpolled, which the warning makes visible.
                    Err(e) => tracing::error!(error = %e, "discovery round task failed"),
                },
            }
        }
    }
}

fn endpoints_ref(cc: &ChatCluster) -> ObjectRef<ConfigMap> {
    let name = Names(&cc.name_any()).endpoints();
    match cc.namespace() {
        Some(ns) => ObjectRef::new(&name).within(&ns),
        None => ObjectRef::new(&name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_stay_under_the_interval() {
        assert_eq!(poll_timeout(Duration::from_secs(5)), Duration::from_secs(2));
        assert_eq!(poll_timeout(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(poll_timeout(Duration::from_secs(1)), Duration::from_millis(500));
        assert_eq!(poll_timeout(Duration::from_secs(60)), Duration::from_secs(2));
    }
}
