//! Service discovery: on an interval the operator reads every gateway pod's
//! load and publishes the list in the endpoint ConfigMap `<name>-endpoints`,
//! rewriting it only when it changed in a way clients care about and at
//! most once per interval (docs/operator.md).
//!
//! - [`endpoints`]: the published document and the write policy (pure).
//! - [`poll`]: one gateway's load report over HTTP.
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
pub mod poll;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use kubechat_crds::ChatCluster;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::endpoints::{Decision, Endpoints, GatewayEndpoint, Policy, format_time};
use self::poll::{LoadReport, PollError};
use crate::desired::gateway::{COMPONENT, ENDPOINTS_KEY};
use crate::desired::{LABEL_COMPONENT, LABEL_INSTANCE, LABEL_MANAGED_BY, Names};
use crate::metrics::Metrics;
use crate::scope::Scope;
use crate::{Error, Result};

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
    let watches = futures::future::join(
        reflector::reflector(pods_writer, pod_events).for_each(log_watch_error),
        reflector::reflector(config_maps_writer, config_map_events).for_each(log_watch_error),
    );
    let caches = Caches { clusters, pods, config_maps };
    let loop_ = Loop { client, metrics, options, caches };
    tokio::select! {
        () = shutdown.cancelled() => {}
        _ = watches => tracing::warn!("discovery watches ended; no more endpoint lists are published"),
        () = loop_.run() => tracing::warn!("the ChatCluster cache went away; no more endpoint lists are published"),
    }
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

/// The loop's own record of its last write, for when the ConfigMap cache
/// has not caught up with it yet.
#[derive(Clone, Debug)]
struct LastWrite {
    /// The ConfigMap's resourceVersion before the write.
    previous_version: Option<String>,
    /// Its resourceVersion after the write.
    written_version: Option<String>,
    doc: Endpoints,
}

impl Loop {
    async fn run(self) {
        let Caches { clusters, pods, config_maps } = &self.caches;
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
                let round = Round {
                    client: self.client.clone(),
                    cc: cc.clone(),
                    pods: gateway_pods(cc, &self.caches.pods.state()),
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

/// The cluster's gateway pods that have an address, sorted by name.
pub fn gateway_pods(cc: &ChatCluster, pods: &[Arc<Pod>]) -> Vec<Arc<Pod>> {
    let mut mine: Vec<Arc<Pod>> = pods
        .iter()
        .filter(|p| p.namespace() == cc.namespace())
        .filter(|p| p.labels().get(LABEL_INSTANCE) == Some(&cc.name_any()))
        .filter(|p| p.labels().get(LABEL_COMPONENT).map(String::as_str) == Some(COMPONENT))
        .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_deref()).is_some_and(|ip| !ip.is_empty()))
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .cloned()
        .collect();
    mine.sort_by_key(|p| p.name_any());
    mine
}

/// The pod's address and its container port named `name` (the spec's port
/// when the container does not name one).
fn pod_port(pod: &Pod, name: &str, fallback: i32) -> Option<SocketAddr> {
    let ip: IpAddr = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
    let port = pod
        .spec
        .as_ref()
        .into_iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .map_or(fallback, |p| p.container_port);
    Some(SocketAddr::new(ip, u16::try_from(port).ok()?))
}

fn pod_is_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    pod.metadata.deletion_timestamp.is_none() && conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// One gateway's entry from its poll result. `previous` is what was
/// published for the same pod: a gateway that could not be read keeps its
/// address, capacity and version, is not ready, and says why its load is
/// missing. It keeps its last connections too (an overloaded gateway that
/// does not answer must not look empty to the autoscaler) unless it is gone
/// (refused: a dead gateway holds no one, and its clients count where they
/// reconnected).
pub fn endpoint(
    pod: &Pod,
    polled: Result<LoadReport, PollError>,
    previous: Option<&GatewayEndpoint>,
    cc: &ChatCluster,
) -> GatewayEndpoint {
    let name = pod.name_any();
    let spec = &cc.spec.gateway;
    let fallback_url = || {
        pod_port(pod, "websocket", spec.ports.websocket).map(|addr| format!("ws://{addr}/v1/ws")).unwrap_or_default()
    };
    match polled {
        Ok(report) => GatewayEndpoint {
            url: if report.url.is_empty() { fallback_url() } else { report.url },
            connections: report.connections,
            capacity: report.capacity,
            ready: report.ready && !report.draining && pod_is_ready(pod),
            draining: report.draining,
            version: report.version,
            backends: report.backends,
            load_error: None,
            pod: name,
        },
        Err(e) => GatewayEndpoint {
            url: previous.map_or_else(fallback_url, |p| p.url.clone()),
            connections: if e.gateway_is_gone() { 0 } else { previous.map_or(0, |p| p.connections) },
            load_error: Some(e.to_string()),
            capacity: previous.map_or(u64::try_from(spec.max_connections_per_pod).unwrap_or(0), |p| p.capacity),
            ready: false,
            draining: false,
            version: previous.map(|p| p.version.clone()).unwrap_or_default(),
            backends: None,
            pod: name,
        },
    }
}

/// The list as published and the ConfigMap version it is in: the cached
/// ConfigMap's, unless the cache still shows it as it was before the loop's
/// own last write.
fn published(config_map: &ConfigMap, last_write: Option<&LastWrite>) -> (Option<Endpoints>, Option<String>) {
    let version = config_map.resource_version();
    match last_write {
        Some(w) if w.previous_version.is_some() && w.previous_version == version => {
            (Some(w.doc.clone()), w.written_version.clone())
        }
        _ => {
            let text = config_map.data.as_ref().and_then(|d| d.get(ENDPOINTS_KEY));
            (text.and_then(|t| Endpoints::parse(t)), version)
        }
    }
}

/// One poll-and-maybe-write of one cluster.
struct Round {
    client: Client,
    cc: Arc<ChatCluster>,
    pods: Vec<Arc<Pod>>,
    config_map: Option<Arc<ConfigMap>>,
    last_write: Option<LastWrite>,
    permits: Arc<Semaphore>,
    metrics: Metrics,
    options: Options,
}

impl Round {
    async fn run(self) -> Result<Option<LastWrite>> {
        // The reconcile creates the ConfigMap (labels, owner); wait for it.
        let Some(config_map) = self.config_map.clone() else { return Ok(None) };
        let (published, version) = published(&config_map, self.last_write.as_ref());
        let target = self.cc.spec.gateway.autoscale.as_ref().map(|a| a.target_connections_per_pod);
        let policy = Policy::new(interval(&self.cc)).with_scale_target(target.and_then(|t| u64::try_from(t).ok()));
        let timeout = poll_timeout(policy.interval);
        let previous: BTreeMap<&str, &GatewayEndpoint> =
            published.iter().flat_map(|p| &p.gateways).map(|g| (g.pod.as_str(), g)).collect();

        let (this, previous) = (&self, &previous);
        let polls = self.pods.iter().map(|pod| {
            let permits = this.permits.clone();
            async move {
                let polled = match this.admin_addr(pod) {
                    Err(e) => Err(e),
                    Ok(addr) => {
                        let _permit = permits.acquire_owned().await;
                        // One retry after a timeout (a pause, a busy node) before the
                        // gateway counts as unreachable; a refusal is final.
                        let polled = match poll::read_load(addr, timeout).await {
                            Err(PollError::Timeout(_)) => poll::read_load(addr, timeout).await,
                            other => other,
                        };
                        polled.and_then(|r| same_pod(pod, r))
                    }
                };
                let result = polled.as_ref().map_or_else(PollError::label, |_| "ok");
                this.metrics.polls.with_label_values(&[result]).inc();
                if let Err(e) = &polled {
                    tracing::debug!(pod = %pod.name_any(), error = %e, "gateway load not read");
                }
                endpoint(pod, polled, previous.get(pod.name_any().as_str()).copied(), &this.cc)
            }
        });
        let mut observed: Vec<GatewayEndpoint> = futures::future::join_all(polls).await;
        observed.sort_by(|a, b| a.pod.cmp(&b.pod));

        let Decision::Write { reason, after } =
            endpoints::decide(published.as_ref(), &observed, Timestamp::now(), &policy)
        else {
            return Ok(None);
        };
        tokio::time::sleep(after).await;
        let doc = Endpoints { updated_at: format_time(Timestamp::now()), gateways: observed };
        let Some(written_version) = self.write(&config_map, version.as_deref(), &doc).await? else {
            return Ok(None);
        };
        self.metrics.endpoint_writes.with_label_values(&[reason.label()]).inc();
        tracing::info!(
            cluster = %self.cc.name_any(),
            namespace = self.cc.namespace().unwrap_or_default(),
            reason = reason.label(),
            gateways = doc.gateways.len(),
            ready = doc.gateways.iter().filter(|g| g.ready).count(),
            connections = doc.total_connections(),
            "endpoint list published"
        );
        let written_version = Some(written_version).filter(|v| !v.is_empty());
        Ok(Some(LastWrite { previous_version: config_map.resource_version(), written_version, doc }))
    }

    fn admin_addr(&self, pod: &Pod) -> Result<SocketAddr, PollError> {
        admin_addr(pod, &self.cc, self.options.loopback_only)
    }

    /// Writes `doc` over the ConfigMap at `version`, returning the new
    /// version; `None` when the ConfigMap changed meanwhile or is gone (the
    /// next round decides again). A merge patch, not an apply: it never
    /// creates the ConfigMap (an apply would re-create one the garbage
    /// collector just deleted with its ChatCluster, without an owner), and
    /// the resourceVersion makes it a compare-and-swap.
    async fn write(&self, config_map: &ConfigMap, version: Option<&str>, doc: &Endpoints) -> Result<Option<String>> {
        let name = config_map.name_any();
        let namespace = config_map.namespace().unwrap_or_default();
        let patch = json!({
            "metadata": {"resourceVersion": version},
            "data": {ENDPOINTS_KEY: doc.render()},
        });
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
        match Api::<ConfigMap>::namespaced(self.client.clone(), &namespace)
            .patch(&name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(written) => Ok(Some(written.resource_version().unwrap_or_default())),
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {
                tracing::debug!(
                    namespace,
                    name,
                    code = status.code,
                    "endpoint list not written: changed or gone meanwhile"
                );
                Ok(None)
            }
            Err(e) => Err(Error::kube(format!("writing the endpoint list {namespace}/{name}"))(e)),
        }
    }
}

/// The gateway's admin address (its pod IP); with `loopback_only`, only a
/// loopback one (see [`Options::loopback_only`]).
pub fn admin_addr(pod: &Pod, cc: &ChatCluster, loopback_only: bool) -> Result<SocketAddr, PollError> {
    let not_dialed = |why: &str| PollError::NotDialed(why.to_string());
    let addr = pod_port(pod, "admin", cc.spec.gateway.ports.admin).ok_or_else(|| not_dialed("no pod IP"))?;
    if loopback_only && !addr.ip().is_loopback() {
        return Err(not_dialed("not a loopback address (loopback-only mode)"));
    }
    Ok(addr)
}

/// An address can be reused by another pod: only its own gateway counts.
fn same_pod(pod: &Pod, report: LoadReport) -> Result<LoadReport, PollError> {
    if report.pod == pod.name_any() { Ok(report) } else { Err(PollError::OtherPod(report.pod)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::fixtures::ChatClusterExt;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(name: &str, ip: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("team-a".into()),
                labels: Some(BTreeMap::from([
                    (LABEL_INSTANCE.to_string(), "chat".to_string()),
                    (LABEL_COMPONENT.to_string(), COMPONENT.to_string()),
                ])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "gateway".into(),
                    ports: Some(vec![
                        ContainerPort { name: Some("websocket".into()), container_port: 7000, ..Default::default() },
                        ContainerPort { name: Some("admin".into()), container_port: 7001, ..Default::default() },
                    ]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: ip.map(str::to_string),
                phase: Some("Running".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn report(pod: &str, connections: u64) -> LoadReport {
        LoadReport {
            pod: pod.into(),
            url: format!("ws://advertised/{pod}"),
            connections,
            capacity: 100,
            ready: true,
            draining: false,
            version: "0.1.0".into(),
            backends: Some(endpoints::Backends { redis: "up".into(), store: "up".into() }),
        }
    }

    fn refused() -> PollError {
        PollError::Connect(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }

    #[test]
    fn only_this_clusters_gateways_with_an_address_sorted() {
        let cc = ChatCluster::test();
        let mut other_cluster = pod("other-gateway-0", Some("127.1.0.9"));
        other_cluster.labels_mut().insert(LABEL_INSTANCE.into(), "other".into());
        let mut other_namespace = pod("chat-gateway-5", Some("127.1.0.8"));
        other_namespace.metadata.namespace = Some("team-b".into());
        let mut failed = pod("chat-gateway-3", Some("127.1.0.7"));
        failed.status.as_mut().expect("status").phase = Some("Failed".into());
        let pods: Vec<Arc<Pod>> = [
            pod("chat-gateway-1", Some("127.1.0.2")),
            pod("chat-gateway-0", Some("127.1.0.1")),
            pod("chat-gateway-2", None),
            other_cluster,
            other_namespace,
            failed,
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        let names: Vec<String> = gateway_pods(&cc, &pods).iter().map(|p| p.name_any()).collect();
        assert_eq!(names, ["chat-gateway-0", "chat-gateway-1"]);
    }

    #[test]
    fn ports_come_from_the_pod() {
        let p = pod("chat-gateway-0", Some("127.1.0.1"));
        assert_eq!(pod_port(&p, "admin", 9090), Some("127.1.0.1:7001".parse().expect("addr")));
        assert_eq!(pod_port(&p, "metrics", 9100), Some("127.1.0.1:9100".parse().expect("addr")), "spec fallback");
        assert_eq!(pod_port(&pod("x", Some("fd00::1")), "admin", 1), Some("[fd00::1]:7001".parse().expect("addr")));
        assert_eq!(pod_port(&pod("x", None), "admin", 1), None);
    }

    #[test]
    fn a_read_gateway_is_listed_as_it_reports() {
        let cc = ChatCluster::test();
        let p = pod("chat-gateway-0", Some("127.1.0.1"));
        let e = endpoint(&p, Ok(report("chat-gateway-0", 7)), None, &cc);
        assert_eq!(e.url, "ws://advertised/chat-gateway-0");
        assert_eq!((e.connections, e.capacity, e.ready, e.draining), (7, 100, true, false));
        assert_eq!(e.backends.as_ref().map(|b| b.redis.as_str()), Some("up"));
        let mut silent_url = report("chat-gateway-0", 7);
        silent_url.url.clear();
        assert_eq!(endpoint(&p, Ok(silent_url), None, &cc).url, "ws://127.1.0.1:7000/v1/ws");
        let mut draining = report("chat-gateway-0", 7);
        draining.draining = true;
        let e = endpoint(&p, Ok(draining), None, &cc);
        assert!(e.draining && !e.ready, "a draining gateway is not recommended");
    }

    #[test]
    fn a_pod_on_its_way_out_or_unready_is_not_ready() {
        let cc = ChatCluster::test();
        let mut deleting = pod("chat-gateway-0", Some("127.1.0.1"));
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::from_second(1).expect("time")));
        assert!(!endpoint(&deleting, Ok(report("chat-gateway-0", 1)), None, &cc).ready);
        let mut unready = pod("chat-gateway-0", Some("127.1.0.1"));
        unready.status.as_mut().expect("status").conditions = None;
        assert!(!endpoint(&unready, Ok(report("chat-gateway-0", 1)), None, &cc).ready);
    }

    #[test]
    fn an_unread_gateway_is_unready_keeps_its_last_load_and_address_and_says_why() {
        let cc = ChatCluster::test();
        let p = pod("chat-gateway-0", Some("127.1.0.1"));
        let before = endpoint(&p, Ok(report("chat-gateway-0", 40)), None, &cc);
        let silent = PollError::Timeout(Duration::from_secs(1));
        let after = endpoint(&p, Err(silent), Some(&before), &cc);
        assert_eq!(
            after,
            GatewayEndpoint {
                ready: false,
                backends: None,
                load_error: Some("no answer within 1s".into()),
                ..before.clone()
            },
            "url, capacity, version and connections as last published"
        );
        assert_eq!(after.connections, 40, "an overloaded gateway does not look empty");
        let dead = endpoint(&p, Err(refused()), Some(&before), &cc);
        assert_eq!(dead.connections, 0, "a gateway that is gone holds no one");
        assert_eq!((dead.url.as_str(), dead.ready), (before.url.as_str(), false));
        let never_read = endpoint(&p, Err(refused()), None, &cc);
        assert_eq!(never_read.url, "ws://127.1.0.1:7000/v1/ws");
        assert_eq!(never_read.capacity, 50_000, "the spec's maxConnectionsPerPod");
        assert_eq!(never_read.version, "");
    }

    #[test]
    fn another_pods_gateway_at_the_address_does_not_count() {
        let p = pod("chat-gateway-0", Some("127.1.0.1"));
        assert!(same_pod(&p, report("chat-gateway-0", 1)).is_ok());
        let err = same_pod(&p, report("old-gateway-3", 1)).expect_err("other pod");
        assert_eq!(err.label(), "invalid");
    }

    #[test]
    fn the_cache_is_trusted_unless_it_lags_behind_our_own_write() {
        let doc = |n: u64| Endpoints {
            updated_at: "2025-01-01T00:00:00.000Z".into(),
            gateways: vec![GatewayEndpoint { pod: "a".into(), connections: n, ..Default::default() }],
        };
        let cm = |version: &str, d: &Endpoints| ConfigMap {
            metadata: ObjectMeta { resource_version: Some(version.into()), ..Default::default() },
            data: Some(BTreeMap::from([(ENDPOINTS_KEY.to_string(), d.render())])),
            ..Default::default()
        };
        let ours = LastWrite { previous_version: Some("10".into()), written_version: Some("11".into()), doc: doc(2) };
        let at = |d: Endpoints, v: &str| (Some(d), Some(v.to_string()));
        assert_eq!(published(&cm("10", &doc(1)), Some(&ours)), at(doc(2), "11"), "cache still at the old version");
        assert_eq!(published(&cm("11", &doc(2)), Some(&ours)), at(doc(2), "11"));
        assert_eq!(published(&cm("12", &doc(3)), Some(&ours)), at(doc(3), "12"), "someone wrote since");
        assert_eq!(published(&cm("12", &doc(3)), None), at(doc(3), "12"));
        let empty = ConfigMap::default();
        assert_eq!(published(&empty, None), (None, None));
    }

    #[test]
    fn timeouts_stay_under_the_interval() {
        assert_eq!(poll_timeout(Duration::from_secs(5)), Duration::from_secs(2));
        assert_eq!(poll_timeout(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(poll_timeout(Duration::from_secs(1)), Duration::from_millis(500));
        assert_eq!(poll_timeout(Duration::from_secs(60)), Duration::from_secs(2));
    }
}
