//! Discovery end to end: the operator (in-process, the production code
//! path) polls real gateway processes and publishes the endpoint ConfigMap.
//!
//! Each test runs a ChatCluster of three gateways whose Redis and Cassandra
//! are the local ones (a Redis database and a keyspace of its own), on the
//! local control plane. kwok gives the gateway Pods loopback IPs and the
//! process kubelet (`kubechat_e2e::kubelet`) runs a `kubechat-gateway` for
//! each, from the Pod's spec, bound to that IP. Clients are real WebSocket
//! connections. The store-outage case is `discovery_store.rs` (it stops the
//! shared Cassandra, so it runs alone).

mod discovery_harness;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kubechat_crds::ChatCluster;
use kubechat_e2e::client::LoadClient;
use kubechat_e2e::cluster::{RunningOperator, wait_for};
use kubechat_e2e::components::PrivateRedis;
use kubechat_e2e::tools::run_tool;
use kubechat_operator::desired::gateway::ENDPOINTS_KEY;
use kubechat_operator::discovery::endpoints::Endpoints;
use serde_json::json;

use discovery_harness::*;

#[tokio::test]
async fn the_list_shows_each_gateways_real_load_and_drops_a_killed_one_within_two_intervals() {
    let h = Harness::start("disc-list").await;

    // Three ready gateways, each at its Pod's IP, as the gateways describe themselves.
    let listed = h
        .wait_endpoints(INTERVAL * 5, "listing 3 ready gateways", |e| {
            e.gateways.len() == GATEWAYS && e.gateways.iter().all(|g| g.ready)
        })
        .await;
    for (gateway, pod) in listed.gateways.iter().zip(&h.pods) {
        assert_eq!(gateway.pod, pod.name);
        assert_eq!(gateway.url, pod.url(), "the address clients use: the Pod IP and websocket port");
        assert_eq!(gateway.capacity, CAPACITY);
        assert_eq!(gateway.version, env!("CARGO_PKG_VERSION"));
        assert!(!gateway.draining);
    }

    // Real load: 6, 9 and 12 clients, each gateway above the 5-connection threshold.
    let wanted = [6_u64, 9, 12];
    let mut clients = Vec::new();
    for (pod, count) in wanted.iter().enumerate() {
        for i in 0..*count {
            clients.push((pod, h.connect(pod, &format!("u{pod}-{i}")).await));
        }
    }
    let connected = Instant::now();
    let shown = h.wait_endpoints(small_move_bound(), "showing 6/9/12 connections", |e| connections(e) == wanted).await;
    println!("load published {} ms after the last client connected", connected.elapsed().as_millis());
    assert_eq!(h.real_connections().await, wanted, "the gateways' own counts");
    assert!(shown.gateways.iter().all(|g| g.ready));
    let expected_pods: Vec<(String, i64)> =
        h.pods.iter().zip(wanted).map(|(p, n)| (p.name.clone(), n as i64)).collect();
    let statused = wait_for(INTERVAL * 3, || async {
        let status = h.cluster().await.status?;
        let pods: Vec<(String, i64)> = status.gateway_pods.iter().map(|g| (g.pod.clone(), g.connections)).collect();
        (status.connections == 27 && pods == expected_pods).then_some(())
    })
    .await;
    assert!(statused.is_some(), "status: {:#?}", h.cluster().await.status);
    // What `kubectl get chatclusters` shows.
    let table = run_tool("kubectl", &["get", "chatcluster", &h.name, "--namespace", &h.namespace]);
    assert!(table.status.success(), "kubectl get: {}", table.stderr);
    let mut lines = table.stdout.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    let row: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    let column = header.iter().position(|c| *c == "CONNECTIONS").expect("a CONNECTIONS column");
    assert_eq!(row.get(column), Some(&"27"), "kubectl get:\n{}", table.stdout);

    // A reconcile (the ChatCluster touched) leaves the list alone.
    let (before, version) = h.endpoints().await.expect("the list");
    let reconciled = h.operator.metrics.duration.get_sample_count();
    Api::<ChatCluster>::namespaced(h.client.clone(), &h.namespace)
        .patch(&h.name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"t": "1"}}})))
        .await
        .expect("annotate");
    let done = wait_for(Duration::from_secs(20), || async {
        (h.operator.metrics.duration.get_sample_count() > reconciled).then_some(())
    })
    .await;
    assert!(done.is_some(), "no reconcile after the ChatCluster changed");
    let (after, after_version) = h.endpoints().await.expect("the list");
    assert_eq!((after, after_version), (before, version), "a reconcile rewrote the endpoint list");

    // SIGKILL one gateway: listed as not ready, without connections, within two intervals.
    let victim = h.pods[1].name.clone();
    h.kubelet.kill(&victim);
    let killed = Instant::now();
    let gone = h
        .wait_endpoints(INTERVAL * 4, "showing the killed gateway not ready", |e| {
            e.gateways.iter().find(|g| g.pod == victim).is_none_or(|g| !g.ready && g.connections == 0)
        })
        .await;
    let detected = killed.elapsed();
    println!("SIGKILLed gateway shown not ready after {} ms (interval {INTERVAL:?})", detected.as_millis());
    assert!(detected <= INTERVAL * 2, "took {detected:?}, more than two intervals");
    assert_eq!(gone.gateways.len(), GATEWAYS, "a Pod that still exists stays listed");
    assert!(gone.gateways.iter().filter(|g| g.pod != victim).all(|g| g.ready));
    let orphans_closed = wait_for(Duration::from_secs(10), || async {
        clients.iter().filter(|(pod, _)| *pod == 1).all(|(_, c)| c.is_closed()).then_some(())
    })
    .await;
    assert!(orphans_closed.is_some(), "the killed gateway's clients are still connected");
    let statused =
        wait_for(INTERVAL * 3, || async { (h.cluster().await.status?.connections == 18).then_some(()) }).await;
    assert!(statused.is_some(), "status after the kill: {:#?}", h.cluster().await.status);

    drop(clients);
    h.stop().await;
}

/// Every change of the ConfigMap seen by a watch: (when, resourceVersion, list).
type Changes = Arc<Mutex<Vec<(Instant, String, Option<Endpoints>)>>>;

fn watch_changes(api: Api<ConfigMap>, name: &str) -> (Changes, tokio::task::JoinHandle<()>) {
    let changes: Changes = Arc::default();
    let seen = changes.clone();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let task = tokio::spawn(async move {
        let mut objects = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
        while let Some(object) = objects.next().await {
            let Ok(cm) = object else { continue };
            let version = cm.resource_version().unwrap_or_default();
            let doc = cm.data.as_ref().and_then(|d| d.get(ENDPOINTS_KEY)).and_then(|t| Endpoints::parse(t));
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            // A re-list repeats the current version: not a change.
            if seen.last().is_none_or(|(_, v, _)| *v != version) {
                seen.push((Instant::now(), version, doc));
            }
        }
    });
    (changes, task)
}

/// The `updatedAt` of the lists the watch saw between `from` and `to`.
fn stamps_between(changes: &Changes, from: Instant, to: Instant) -> Vec<k8s_openapi::jiff::Timestamp> {
    seen_between(changes, from, to).iter().filter_map(|(_, doc)| doc.as_ref()?.updated_at()).collect()
}

fn changes_between(changes: &Changes, from: Instant, to: Instant) -> Vec<Instant> {
    seen_between(changes, from, to).into_iter().map(|(at, _)| at).collect()
}

/// When the watch saw each change between `from` and `to`, and the list it carried.
fn seen_between(changes: &Changes, from: Instant, to: Instant) -> Vec<(Instant, Option<Endpoints>)> {
    let changes = changes.lock().unwrap_or_else(|e| e.into_inner());
    changes.iter().filter(|(at, _, _)| *at > from && *at <= to).map(|(at, _, doc)| (*at, doc.clone())).collect()
}

fn polls_ok(operator: &RunningOperator) -> u64 {
    operator.metrics.polls.with_label_values(&["ok"]).get()
}

/// Triangle wave between 0 and `peak` with period `period`, shifted by `phase` (0..1).
fn triangle(elapsed: Duration, period: Duration, phase: f64, peak: f64) -> usize {
    let x = (elapsed.as_secs_f64() / period.as_secs_f64() + phase).fract();
    let y = if x < 0.5 { x * 2.0 } else { 2.0 - x * 2.0 };
    (y * peak).round() as usize
}

#[tokio::test]
async fn writes_follow_the_load_at_most_once_per_interval_and_stop_when_idle() {
    const LOAD: Duration = Duration::from_secs(20);
    // Ten intervals: thirty polls of three gateways that must all find nothing to write.
    const IDLE: Duration = Duration::from_secs(20);
    let h = Harness::start("disc-rate").await;
    h.wait_endpoints(INTERVAL * 5, "listing 3 ready gateways", |e| {
        e.gateways.len() == GATEWAYS && e.gateways.iter().all(|g| g.ready)
    })
    .await;
    let (changes, watch) = watch_changes(h.config_maps(), &h.endpoints_name());

    // Steady load: every gateway's clients rise from 0 to 16 and fall back
    // every 6 s (about 16 connects or disconnects per second in all), each
    // gateway a third of a period apart: the list has something
    // meaningful to publish at almost every poll.
    let mut clients: Vec<Vec<LoadClient>> = (0..GATEWAYS).map(|_| Vec::new()).collect();
    let mut next_user = 0;
    let load_started = Instant::now();
    while load_started.elapsed() < LOAD {
        for (pod, open) in clients.iter_mut().enumerate() {
            let target = triangle(load_started.elapsed(), Duration::from_secs(6), pod as f64 / 3.0, 16.0);
            while open.len() > target {
                open.pop();
            }
            while open.len() < target {
                next_user += 1;
                open.push(h.connect(pod, &format!("churn-{next_user}")).await);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let load_ended = Instant::now();
    let during_load = changes_between(&changes, load_started, load_ended);
    // Spacing is what the lists say (`updatedAt`, stamped by the operator):
    // when the watch delivers them depends on the apiserver's load too.
    let stamps = stamps_between(&changes, load_started, load_ended);
    let gaps: Vec<Duration> = stamps.windows(2).map(|w| w[1].duration_since(w[0]).unsigned_abs()).collect();
    let min_gap = gaps.iter().min().copied().unwrap_or(LOAD);
    let per_minute = during_load.len() as f64 * 60.0 / LOAD.as_secs_f64();
    println!(
        "steady load: {} writes in {LOAD:?} ({per_minute:.1}/min, one per {INTERVAL:?} interval allowed), \
         shortest gap {} ms, {next_user} connects",
        during_load.len(),
        min_gap.as_millis()
    );
    assert!(min_gap >= INTERVAL, "two lists stamped {min_gap:?} apart (interval {INTERVAL:?}): {gaps:?}");
    assert!(
        during_load.len() as f64 <= LOAD.as_secs_f64() / INTERVAL.as_secs_f64() + 1.0,
        "{} writes in {LOAD:?}",
        during_load.len()
    );
    assert!(during_load.len() >= 5, "the list did not follow the load: {} writes in {LOAD:?}", during_load.len());

    // Idle: the clients stay connected, nothing changes. First let the list
    // catch up with the last small moves, then watch it.
    let real = h.real_connections().await;
    h.wait_endpoints(small_move_bound(), "caught up with the load", |e| connections(e) == real).await;
    let total: u64 = real.iter().sum();
    let statused =
        wait_for(INTERVAL * 3, || async { (h.cluster().await.status?.connections == total as i64).then_some(()) })
            .await;
    assert!(statused.is_some(), "status.connections is not {total}: {:#?}", h.cluster().await.status);
    let idle_started = Instant::now();
    let polls_before = polls_ok(&h.operator);
    let version_before = h.endpoints().await.expect("the list").1;
    tokio::time::sleep(IDLE).await;
    let idle_ended = Instant::now();
    let during_idle = changes_between(&changes, idle_started, idle_ended);
    let polls = polls_ok(&h.operator) - polls_before;
    println!("idle: {} writes in {IDLE:?}, {polls} successful polls", during_idle.len());
    // Proof that the loop kept polling: at least half the polls due (timers
    // run late on a busy 2-core machine; a stalled loop makes none).
    let expected_polls = (GATEWAYS as f64 * IDLE.as_secs_f64() / INTERVAL.as_secs_f64() * 0.5) as u64;
    assert!(polls >= expected_polls, "only {polls} successful polls while idle: the loop was not polling");
    assert!(during_idle.is_empty(), "the list was rewritten {} times while idle", during_idle.len());
    assert_eq!(h.endpoints().await.expect("the list").1, version_before);
    assert_eq!(h.real_connections().await, real, "the load changed while idle: the idle check proves nothing");

    watch.abort();
    drop(clients);
    h.stop().await;
}

#[tokio::test]
async fn a_redis_the_gateways_lose_shows_as_degraded_until_it_returns() {
    let mut redis = PrivateRedis::start().await;
    let h = Harness::start_with_redis("disc-backend", redis.url()).await;
    h.wait_endpoints(INTERVAL * 5, "listing 3 ready gateways seeing Redis up", |e| {
        e.gateways.len() == GATEWAYS
            && e.gateways.iter().all(|g| g.ready && g.backends.as_ref().is_some_and(|b| b.redis == "up"))
    })
    .await;
    let healthy = h.cluster().await;
    assert_eq!(degraded(&healthy).map(|d| d.0), Some("False".into()), "{:#?}", healthy.status);

    redis.kill();
    let lost = Instant::now();
    h.wait_endpoints(INTERVAL * 5, "showing Redis down", |e| {
        e.gateways.iter().all(|g| g.backends.as_ref().is_some_and(|b| b.redis == "down"))
    })
    .await;
    let shown = wait_for(INTERVAL * 3, || async { degraded(&h.cluster().await).filter(|d| d.0 == "True") }).await;
    let Some((_, reason, message)) = shown else {
        panic!("not Degraded with Redis gone: {:#?}", h.cluster().await.status);
    };
    println!("Redis killed: Degraded after {} ms: {message}", lost.elapsed().as_millis());
    assert_eq!(reason, "BackendUnavailable");
    for pod in &h.pods {
        assert!(message.contains(&pod.name), "{message} does not name {}", pod.name);
    }

    redis.restart().await;
    let recovered =
        wait_for(Duration::from_secs(30), || async { degraded(&h.cluster().await).filter(|d| d.0 == "False") }).await;
    assert!(recovered.is_some(), "still Degraded after Redis came back: {:#?}", h.cluster().await.status);
    h.stop().await;
}
