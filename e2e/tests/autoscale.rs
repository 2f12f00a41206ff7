//! Autoscaling by connections, end to end: an in-process operator, the
//! local control plane, a private Redis, Cassandra, and a real
//! `kubechat-gateway` process per gateway Pod (`kubechat_e2e::kubelet`).
//!
//! Clients find gateways the way real ones do, in the endpoint list, and
//! follow `reconnect` frames. Load over the target adds gateways within a
//! discovery interval or so, spread over the control plane's two zones
//! (`status.zones`); once it falls, after the cool-down the highest
//! gateway is drained and only then removed, one at a time, and no gateway
//! ever holds more than its capacity (each one's own count, read every 100 ms).
//! Lowering `replicas` by hand removes gateways the same way, and a standby
//! operator finishes a scale-down whose leader crashed mid-drain.
//!
//! Its leases (3 s), drains and listings within bounds stretch beside
//! another suite on two cores (the failover case missed its listing once),
//! so `e2e/test.sh` runs it alone.
//! kubechat-test: exclusive
//! kubechat-test: threads 4

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kubechat_e2e::client::Tokens;
use kubechat_e2e::cluster::wait_for;
use kubechat_e2e::gateways::{NAME, RealGateways, Setup};
use kubechat_operator::discovery::poll;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const TARGET: i64 = 100;
/// Each gateway's `maxConnectionsPerPod`: half again the target, so the
/// clients the last gateways shed must spread over the ones left.
const CAPACITY: u64 = 150;
const COOLDOWN_SECONDS: i32 = 10;
const WINDOW_SECONDS: i32 = 5;
const RATE: i32 = 100;
const INTERVAL: Duration = Duration::from_secs(1);

/// Ready gateways as the endpoint list shows them, and what clients did.
#[derive(Default)]
struct World {
    /// (url, connections, capacity) of each gateway listed ready.
    listed: Mutex<Vec<(String, u64, u64)>>,
    /// Clients holding a connection now.
    connected: AtomicUsize,
    /// Connection attempts refused or failed.
    refused: AtomicUsize,
    /// `reconnect` frames followed.
    moved: AtomicUsize,
}

impl World {
    /// A listed gateway: for two clients in three the one with the most
    /// room, as discovery recommends; for the third any with room, by `n`.
    fn pick(&self, n: usize) -> Option<String> {
        let listed = self.listed.lock().expect("lock");
        if !n.is_multiple_of(3) {
            return listed.iter().max_by_key(|(_, c, cap)| cap.saturating_sub(*c)).map(|(url, _, _)| url.clone());
        }
        let roomy: Vec<&String> = listed.iter().filter(|(_, c, cap)| c < cap).map(|(url, _, _)| url).collect();
        let from: Vec<&String> = if roomy.is_empty() { listed.iter().map(|(url, _, _)| url).collect() } else { roomy };
        (!from.is_empty()).then(|| from[(n / 3) % from.len()].clone())
    }
}

fn jitter(n: usize, attempt: usize, within_ms: u64) -> Duration {
    let mixed = (n as u64).wrapping_mul(2_654_435_761).wrapping_add((attempt as u64).wrapping_mul(40_503));
    Duration::from_millis(mixed % within_ms.max(1))
}

/// One device: connects to a listed gateway, heartbeats, follows
/// `reconnect` frames and reconnects when dropped, until `stop`.
async fn client(world: Arc<World>, token: String, n: usize, stop: CancellationToken) {
    let mut next: Option<String> = None;
    let mut attempt = 0;
    while !stop.is_cancelled() {
        attempt += 1;
        let Some(url) = next.take().or_else(|| world.pick(n + attempt)) else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let connect = tokio_tungstenite::connect_async(format!("{url}?token={token}"));
        let Ok(Ok((socket, _))) = tokio::time::timeout(Duration::from_secs(5), connect).await else {
            world.refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200) + jitter(n, attempt, 300)).await;
            continue;
        };
        world.connected.fetch_add(1, Ordering::Relaxed);
        let (mut sink, mut stream) = socket.split();
        let mut heartbeat = tokio::time::interval(Duration::from_secs(2));
        let mut pause = Duration::from_millis(100) + jitter(n, attempt, 200);
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    let _ = sink.send(Message::Close(None)).await;
                    break;
                }
                _ = heartbeat.tick() => {
                    let _ = sink.send(Message::Text(r#"{"type":"heartbeat"}"#.into())).await;
                }
                frame = stream.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        let frame: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                        if frame["type"] == "reconnect" {
                            world.moved.fetch_add(1, Ordering::Relaxed);
                            next = frame["url"].as_str().map(str::to_string);
                            pause = jitter(n, attempt, frame["within_ms"].as_u64().unwrap_or(1000));
                            break;
                        }
                    }
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
            }
        }
        world.connected.fetch_sub(1, Ordering::Relaxed);
        if !stop.is_cancelled() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Clients `from..to`, each with its own stop.
fn start_clients(
    world: &Arc<World>,
    tokens: &Tokens,
    range: std::ops::Range<usize>,
) -> Vec<(CancellationToken, JoinHandle<()>)> {
    range
        .map(|n| {
            let stop = CancellationToken::new();
            let token = tokens.mint(&format!("u{n}"), "phone");
            (stop.clone(), tokio::spawn(client(world.clone(), token, n, stop)))
        })
        .collect()
}

async fn stop_clients(clients: Vec<(CancellationToken, JoinHandle<()>)>) {
    for (stop, _) in &clients {
        stop.cancel();
    }
    for (_, task) in clients {
        let _ = task.await;
    }
}

/// What the watcher saw: the highest connection count any gateway reported
/// of itself, and the StatefulSet's replicas over time.
#[derive(Default)]
struct Seen {
    most_on_one: BTreeMap<String, u64>,
    replicas: Vec<(Duration, i32)>,
    /// When the connected clients first exceeded each multiple of the target.
    crossed: BTreeMap<usize, Duration>,
}

/// Keeps `world.listed` current from the endpoint list, and records every
/// gateway's own connection count and the StatefulSet's replicas.
fn watch(h: &RealGateways, world: Arc<World>, seen: Arc<Mutex<Seen>>, started: Instant) -> CancellationToken {
    let stop = CancellationToken::new();
    let (client, namespace) = (h.client.clone(), h.namespace.clone());
    let running = h.kubelet.running_pods();
    let token = stop.clone();
    tokio::spawn(async move {
        let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
        let config_maps = Api::namespaced(client, &namespace);
        let mut tick = 0_u64;
        while !token.is_cancelled() {
            for pod in running.get() {
                if let Ok(load) = poll::read_load(pod.admin, Duration::from_millis(500)).await {
                    let mut seen = seen.lock().expect("lock");
                    let most = seen.most_on_one.entry(pod.name.clone()).or_default();
                    *most = (*most).max(load.connections);
                }
            }
            if tick.is_multiple_of(2) {
                if let Some(e) = kubechat_e2e::gateways::read_endpoints(&config_maps).await {
                    let ready = e.gateways.iter().filter(|g| g.ready);
                    *world.listed.lock().expect("lock") =
                        ready.map(|g| (g.url.clone(), g.connections, g.capacity)).collect();
                }
                if let Ok(sts) = sets.get(&format!("{NAME}-gateway")).await {
                    let replicas = sts.spec.replicas.unwrap_or(0);
                    let mut seen = seen.lock().expect("lock");
                    if seen.replicas.last().map(|(_, r)| *r) != Some(replicas) {
                        seen.replicas.push((started.elapsed(), replicas));
                    }
                }
            }
            let now = world.connected.load(Ordering::Relaxed);
            for multiple in 1..=now.saturating_sub(1) / TARGET as usize {
                seen.lock().expect("lock").crossed.entry(multiple * TARGET as usize).or_insert(started.elapsed());
            }
            tick += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    stop
}

/// The clients' world, what the watcher sees, and the watcher's stop.
struct Scene {
    world: Arc<World>,
    seen: Arc<Mutex<Seen>>,
    started: Instant,
    watcher: CancellationToken,
}

impl Scene {
    /// Starts the watcher on `h` and waits until it lists `gateways` ready gateways.
    async fn start(h: &RealGateways, gateways: usize) -> Self {
        let started = Instant::now();
        let world = Arc::new(World::default());
        let seen = Arc::new(Mutex::new(Seen::default()));
        let watcher = watch(h, world.clone(), seen.clone(), started);
        let listed = || async { (world.listed.lock().expect("lock").len() == gateways).then_some(()) };
        wait_for(Duration::from_secs(10), listed).await.unwrap_or_else(|| panic!("{gateways} gateways never listed"));
        Self { world, seen, started, watcher }
    }
}

/// `Some` once exactly `n` clients hold a connection (for `wait_for`).
async fn connected(world: &World, n: usize) -> Option<()> {
    (world.connected.load(Ordering::Relaxed) == n).then_some(())
}

/// When the StatefulSet first had `replicas` after `since` (both since the test's start).
fn reached(seen: &Mutex<Seen>, replicas: i32, since: Duration) -> Option<Duration> {
    let seen = seen.lock().expect("lock");
    seen.replicas.iter().find(|(at, r)| *r == replicas && *at >= since).map(|(at, _)| *at)
}

/// The scaling Events (reason, note), oldest first.
async fn scaling_events(h: &RealGateways) -> Vec<(String, String)> {
    let events = Api::<Event>::namespaced(h.client.clone(), &h.namespace)
        .list(&ListParams::default())
        .await
        .expect("list Events");
    let mut steps: Vec<(i64, String, String)> = events
        .items
        .into_iter()
        .filter(|e| matches!(e.reason.as_deref(), Some("ScaledUp" | "ScaledDown" | "DrainStarted" | "DrainFinished")))
        .map(|e| {
            let at = e.event_time.as_ref().map_or(0, |t| t.0.as_microsecond());
            (at, e.reason.unwrap_or_default(), e.note.unwrap_or_default())
        })
        .collect();
    steps.sort();
    steps.into_iter().map(|(_, reason, note)| (reason, note)).collect()
}

/// Sets `replicas: 1`; when, since `started`.
async fn lower_to_one(h: &RealGateways, started: Instant) -> Duration {
    let lowered = started.elapsed();
    let patch = serde_json::json!({"spec": {"gateway": {"replicas": 1}}});
    h.clusters().patch(NAME, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("lower the replicas");
    lowered
}

/// How a scale-down to one gateway ended.
struct DownToOne {
    /// When the StatefulSet was down to one, since the test's start.
    one: Duration,
    /// Every client connected again.
    settled: Option<()>,
    /// Clients connected at the end.
    after: usize,
    events: Vec<(String, String)>,
}

/// Waits (up to `seconds`) until the StatefulSet is down to one gateway
/// after `since`, then until it is listed and `clients` are connected again.
async fn down_to_one(
    h: &RealGateways,
    world: &World,
    seen: &Mutex<Seen>,
    since: Duration,
    clients: usize,
    seconds: u64,
) -> DownToOne {
    let one = wait_for(Duration::from_secs(seconds), || async { reached(seen, 1, since) }).await;
    let one = one.unwrap_or_else(|| panic!("not down to one gateway; {}", h.kubelet.describe()));
    h.wait_listed(1, Duration::from_secs(30)).await;
    let settled = wait_for(Duration::from_secs(30), || connected(world, clients)).await;
    let after = world.connected.load(Ordering::Relaxed);
    DownToOne { one, settled, after, events: scaling_events(h).await }
}

/// Each removal, 2 then 1: the highest pod drained (emptied), then the
/// replicas lowered (`ScaledDown`), before the next drain starts.
fn assert_removed_one_drained_pod_at_a_time(events: &[(String, String)]) {
    let steps: Vec<(&str, &str)> = events
        .iter()
        .filter(|(reason, _)| reason != "ScaledUp")
        .map(|(reason, note)| {
            let pod = if note.contains("chat-gateway-2") {
                "2"
            } else if note.contains("chat-gateway-1") {
                "1"
            } else {
                "?"
            };
            (reason.as_str(), pod)
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("DrainStarted", "2"),
            ("DrainFinished", "2"),
            ("ScaledDown", "2"),
            ("DrainStarted", "1"),
            ("DrainFinished", "1"),
            ("ScaledDown", "1")
        ],
        "{events:#?}"
    );
    for (reason, note) in events {
        if reason == "DrainFinished" {
            assert!(note.contains("(0 connections left)"), "removed before its drain emptied it: {note}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_replicas_drains_each_gateway_it_removes() {
    const CLIENTS: usize = 140;
    let setup = Setup { prefix: "scale-down", gateways: 3, leaders: &[], lease: Duration::ZERO };
    let h = RealGateways::start(setup, |spec| {
        spec.gateway.max_connections_per_pod = CAPACITY as i64;
        spec.gateway.drain.window_seconds = WINDOW_SECONDS;
        spec.gateway.drain.max_reconnects_per_second = RATE;
    })
    .await;
    let Scene { world, seen, started, watcher } = Scene::start(&h, 3).await;
    let clients = start_clients(&world, &h.tokens, 0..CLIENTS);
    wait_for(Duration::from_secs(30), || connected(&world, CLIENTS)).await.expect("every client connected");
    let spread = wait_for(Duration::from_secs(15), || async {
        let gateways = h.endpoints().await?.gateways;
        let total: u64 = gateways.iter().map(|g| g.connections).sum();
        (total == CLIENTS as u64).then(|| gateways.into_iter().map(|g| (g.pod, g.connections)).collect::<Vec<_>>())
    })
    .await
    .expect("the list shows every client");
    assert!(spread.iter().all(|(_, c)| *c > 0), "every gateway holds clients: {spread:?}");

    // 3 → 1: everyone must end up on the one gateway left, which has room for all.
    let lowered = lower_to_one(&h, started).await;
    let DownToOne { one, settled, after, events } = down_to_one(&h, &world, &seen, lowered, CLIENTS, 60).await;
    stop_clients(clients).await;
    watcher.cancel();
    let most = seen.lock().expect("lock").most_on_one.clone();
    println!(
        "replicas 3 → 1 with {CLIENTS} clients {spread:?}: one gateway left {:.1?} after the edit; most connections \
         any gateway held {most:?} (capacity {CAPACITY}); {} reconnect frames followed; events {events:#?}",
        one.saturating_sub(lowered),
        world.moved.load(Ordering::Relaxed),
    );
    assert_removed_one_drained_pod_at_a_time(&events);
    assert!(settled.is_some(), "{after} of {CLIENTS} clients connected on the gateway left");
    for (pod, held) in &most {
        assert!(*held <= CAPACITY, "{pod} held {held} connections, over its capacity {CAPACITY}");
    }
    assert_eq!(h.cluster().await.status.and_then(|s| s.autoscale), None, "no autoscaler status without autoscale");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_finishes_a_scale_down_after_the_leader_crashes_without_draining_a_gateway_twice() {
    const CLIENTS: usize = 90;
    const LEASE: Duration = Duration::from_secs(3);
    let setup = Setup { prefix: "scale-failover", gateways: 3, leaders: &["first", "second"], lease: LEASE };
    let mut h = RealGateways::start(setup, |spec| {
        spec.gateway.max_connections_per_pod = CAPACITY as i64;
        spec.gateway.drain.window_seconds = WINDOW_SECONDS;
        // Slow enough that the crash lands in the middle of the first drain.
        spec.gateway.drain.max_reconnects_per_second = 10;
    })
    .await;
    let Scene { world, seen, started, watcher } = Scene::start(&h, 3).await;
    let clients = start_clients(&world, &h.tokens, 0..CLIENTS);
    wait_for(Duration::from_secs(30), || connected(&world, CLIENTS)).await.expect("every client connected");

    let lowered = lower_to_one(&h, started).await;
    let draining = wait_for(Duration::from_secs(30), || async {
        let events = scaling_events(&h).await;
        events.iter().any(|(r, note)| r == "DrainStarted" && note.contains("chat-gateway-2")).then_some(())
    })
    .await;
    assert!(draining.is_some(), "gateway 2 was never drained; {}", h.kubelet.describe());
    let top = h.kubelet.running().into_iter().find(|p| p.name.ends_with("-2")).expect("gateway 2 runs");
    let still_held = poll::read_load(top.admin, Duration::from_secs(1)).await.map(|l| l.connections).unwrap_or(0);
    h.operators.remove(0).kill();
    let killed = Instant::now();
    let standby = h.operators[0].metrics.clone();
    let led = wait_for(Duration::from_secs(20), || async { (standby.leader.get() == 1).then_some(()) }).await;
    assert!(led.is_some(), "the standby did not take the Lease over");
    let takeover = killed.elapsed();

    let DownToOne { one, settled, after, events } = down_to_one(&h, &world, &seen, lowered, CLIENTS, 90).await;
    stop_clients(clients).await;
    watcher.cancel();
    let drains = |pod: &str| events.iter().filter(|(r, n)| r == "DrainStarted" && n.contains(pod)).count();
    println!(
        "scale-down 3 → 1 with {CLIENTS} clients, leader killed during gateway 2's drain (it held {}): standby \
         leading after {takeover:.1?}; one gateway left {:.1?} after the edit; events {events:#?}",
        still_held,
        one.saturating_sub(lowered),
    );
    assert!(still_held > 0, "the leader was killed after gateway 2's drain had ended: nothing was left to resume");
    assert_eq!((drains("chat-gateway-2"), drains("chat-gateway-1")), (1, 1), "each gateway drained once: {events:#?}");
    for (reason, note) in &events {
        if reason == "DrainFinished" {
            assert!(note.contains("(0 connections left)"), "removed before its drain emptied it: {note}");
        }
    }
    assert!(settled.is_some(), "{after} of {CLIENTS} clients connected on the gateway left");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_follow_the_connections_up_at_once_and_down_after_the_cool_down_one_drained_pod_at_a_time() {
    let setup = Setup { prefix: "autoscale", gateways: 1, leaders: &[], lease: Duration::ZERO };
    let h = RealGateways::start(setup, |spec| {
        spec.gateway.replicas = 1;
        spec.gateway.max_connections_per_pod = CAPACITY as i64;
        spec.gateway.drain.window_seconds = WINDOW_SECONDS;
        spec.gateway.drain.max_reconnects_per_second = RATE;
        spec.gateway.autoscale = Some(kubechat_crds::AutoscaleSpec {
            min_replicas: 1,
            max_replicas: 4,
            target_connections_per_pod: TARGET,
            scale_down_cooldown_seconds: COOLDOWN_SECONDS,
            buffer: None,
        });
    })
    .await;
    let Scene { world, seen, started, watcher } = Scene::start(&h, 1).await;
    let crossed = |connections: usize| seen.lock().expect("lock").crossed.get(&connections).copied();

    // Up: 90 clients need one gateway; 30 more call for a second, at once;
    // 100 more for a third.
    let mut clients = start_clients(&world, &h.tokens, 0..90);
    wait_for(Duration::from_secs(30), || connected(&world, 90)).await.expect("90 clients connected");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(reached(&seen, 2, Duration::ZERO), None, "90 connections need one gateway");
    clients.extend(start_clients(&world, &h.tokens, 90..120));
    let up = wait_for(Duration::from_secs(15), || async { reached(&seen, 2, Duration::ZERO) }).await;
    let up = up.unwrap_or_else(|| panic!("no second gateway for 120 connections; {}", h.kubelet.describe()));
    let first_reaction = up.saturating_sub(crossed(100).expect("over 100 connections"));
    h.wait_listed(2, Duration::from_secs(60)).await;
    let first_serving = started.elapsed().saturating_sub(crossed(100).expect("over 100 connections"));
    clients.extend(start_clients(&world, &h.tokens, 120..220));
    let up = wait_for(Duration::from_secs(15), || async { reached(&seen, 3, Duration::ZERO) }).await;
    let up = up.unwrap_or_else(|| panic!("no third gateway for 220 connections; {}", h.kubelet.describe()));
    let second_reaction = up.saturating_sub(crossed(200).expect("over 200 connections"));
    h.wait_listed(3, Duration::from_secs(60)).await;
    // 30 more, so the third gateway holds some too.
    wait_for(Duration::from_secs(10), || async { (world.listed.lock().expect("lock").len() == 3).then_some(()) })
        .await
        .expect("clients see the third gateway");
    clients.extend(start_clients(&world, &h.tokens, 220..250));
    let everyone = wait_for(Duration::from_secs(60), || connected(&world, 250)).await;
    assert!(
        everyone.is_some(),
        "only {} of 250 clients connected on 3 gateways",
        world.connected.load(Ordering::Relaxed)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spread: Vec<(String, u64)> =
        h.endpoints().await.into_iter().flat_map(|e| e.gateways).map(|g| (g.pod, g.connections)).collect();
    // The gateways it added kept the zone spread (each placed by the
    // scheduler under the ChatCluster's spread constraint).
    let zones = h.wait_spread(3, Duration::from_secs(10)).await;

    // Down: three in five leave, from every gateway; 100 need one gateway.
    // Nothing is removed during the cool-down.
    let (staying, leaving): (Vec<_>, Vec<_>) = clients.into_iter().enumerate().partition(|(n, _)| n % 5 < 2);
    stop_clients(leaving.into_iter().map(|(_, c)| c).collect()).await;
    let dropped = started.elapsed();
    // From here on, what the gateways hold while the cluster shrinks.
    let most_before = std::mem::take(&mut seen.lock().expect("lock").most_on_one);
    let cooling = wait_for(Duration::from_secs(10), || async {
        let status = h.cluster().await.status?.autoscale?;
        (status.reason == "CoolingDown").then_some(status)
    })
    .await
    .expect("the status shows the cool-down");
    assert_eq!((cooling.current_replicas, cooling.desired_replicas), (3, 1), "{cooling:?}");
    assert!(cooling.message.contains("cool-down"), "{}", cooling.message);
    let two = wait_for(Duration::from_secs(60), || async { reached(&seen, 2, dropped) }).await;
    let two = two.unwrap_or_else(|| panic!("gateway 2 never removed; {}", h.kubelet.describe()));
    let one = wait_for(Duration::from_secs(60), || async { reached(&seen, 1, dropped) }).await;
    let one = one.unwrap_or_else(|| panic!("gateway 1 never removed; {}", h.kubelet.describe()));
    h.wait_listed(1, Duration::from_secs(30)).await;
    let settled = wait_for(Duration::from_secs(30), || connected(&world, 100)).await;
    let after = world.connected.load(Ordering::Relaxed);

    let events = scaling_events(&h).await;
    // The status follows within a few seconds (writes are bounded to one per 2 s per cluster).
    let converged = wait_for(Duration::from_secs(10), || async {
        let status = h.cluster().await.status?.autoscale?;
        ((status.current_replicas, status.desired_replicas) == (1, 1)).then_some(status)
    })
    .await;
    let status = match converged {
        Some(status) => Some(status),
        None => h.cluster().await.status.and_then(|s| s.autoscale),
    };
    stop_clients(staying.into_iter().map(|(_, c)| c).collect()).await;
    watcher.cancel();
    let most = seen.lock().expect("lock").most_on_one.clone();
    let replicas = seen.lock().expect("lock").replicas.clone();
    println!(
        "autoscale: scale-up reactions {first_reaction:.1?} (1 → 2) and {second_reaction:.1?} (2 → 3) after the load \
         crossed a multiple of the target (discovery interval {INTERVAL:?}); the second gateway was listed ready \
         {first_serving:.1?} after; 250 clients spread {spread:?}; scale-down 3 → 2 at {:.1?} and 2 → 1 at {:.1?} \
         after the load fell (cool-down {COOLDOWN_SECONDS} s, drain window {WINDOW_SECONDS} s); most connections any \
         gateway held: {most_before:?} before the load fell and {most:?} while the cluster shrank (capacity {CAPACITY}); {} reconnect frames followed, {} attempts refused; replicas \
         over time {replicas:?}; zones at 3 gateways {zones:?}; events {events:#?}",
        two.saturating_sub(dropped),
        one.saturating_sub(dropped),
        world.moved.load(Ordering::Relaxed),
        world.refused.load(Ordering::Relaxed),
    );

    assert!(first_reaction < INTERVAL * 2, "1 → 2 took {first_reaction:?}");
    assert!(second_reaction < INTERVAL * 2, "2 → 3 took {second_reaction:?}");
    let cooldown = Duration::from_secs(COOLDOWN_SECONDS as u64);
    assert!(two.saturating_sub(dropped) >= cooldown, "a gateway was removed during the cool-down");
    assert!(settled.is_some(), "{after} of 100 clients connected after the scale-down");
    assert!(spread.iter().all(|(_, c)| *c > 0), "every gateway held clients before the scale-down: {spread:?}");
    for (pod, held) in most_before.iter().chain(&most) {
        assert!(*held <= CAPACITY, "{pod} held {held} connections, over its capacity {CAPACITY}");
    }
    assert_removed_one_drained_pod_at_a_time(&events);
    assert_eq!(events.iter().filter(|(r, _)| r == "ScaledUp").count(), 2, "{events:#?}");
    let status = status.expect("status.autoscale");
    assert_eq!((status.current_replicas, status.desired_replicas), (1, 1), "{status:?}");
    h.stop().await;
}

/// A ready buffer of 50 spare connections: 60 clients already run two
/// gateways (60 + 50 > 100), so a burst of 100 more lands at once on
/// gateways that are serving, none refused, none waiting for a gateway to
/// start; 160 (+ 50) then call for a third. Without the buffer the burst
/// would meet one gateway of capacity 150.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_buffer_absorbs_a_burst_before_a_new_gateway_is_ready() {
    const BUFFER: i32 = 50;
    let setup = Setup { prefix: "buffer", gateways: 1, leaders: &[], lease: Duration::ZERO };
    let h = RealGateways::start(setup, |spec| {
        spec.gateway.replicas = 1;
        spec.gateway.max_connections_per_pod = CAPACITY as i64;
        spec.gateway.autoscale = Some(kubechat_crds::AutoscaleSpec {
            min_replicas: 1,
            max_replicas: 4,
            target_connections_per_pod: TARGET,
            scale_down_cooldown_seconds: 300,
            buffer: Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(BUFFER)),
        });
    })
    .await;
    let Scene { world, seen, started, watcher } = Scene::start(&h, 1).await;

    // 60 clients and the buffer call for a second gateway before any burst.
    let mut clients = start_clients(&world, &h.tokens, 0..60);
    wait_for(Duration::from_secs(30), || connected(&world, 60)).await.expect("60 clients connected");
    let ramped = started.elapsed();
    let second = wait_for(Duration::from_secs(15), || async { reached(&seen, 2, Duration::ZERO) }).await;
    let second = second.unwrap_or_else(|| panic!("no second gateway for 60 + {BUFFER}; {}", h.kubelet.describe()));
    h.wait_listed(2, Duration::from_secs(60)).await;
    let serving = started.elapsed();
    wait_for(Duration::from_secs(10), || async { (world.listed.lock().expect("lock").len() == 2).then_some(()) })
        .await
        .expect("clients see the second gateway");

    // The burst: 100 at once, on the two gateways already serving.
    let refused_before = world.refused.load(Ordering::Relaxed);
    let burst_at = Instant::now();
    clients.extend(start_clients(&world, &h.tokens, 60..160));
    let absorbed = wait_for(Duration::from_secs(30), || connected(&world, 160)).await;
    let burst_took = burst_at.elapsed();
    let refused = world.refused.load(Ordering::Relaxed) - refused_before;
    let third = wait_for(Duration::from_secs(15), || async { reached(&seen, 3, Duration::ZERO) }).await;
    let status = h.cluster().await.status.and_then(|s| s.autoscale);
    stop_clients(clients).await;
    watcher.cancel();
    let most = seen.lock().expect("lock").most_on_one.clone();
    println!(
        "ready buffer {BUFFER}: 60 clients connected at {ramped:.1?}, second gateway asked for at {second:.1?} and \
         listed ready at {serving:.1?}; a burst of 100 connected in {burst_took:.1?} with {refused} attempts refused; \
         third gateway at {third:?}; most on one gateway {most:?} (capacity {CAPACITY}); status {status:?}"
    );

    assert!(absorbed.is_some(), "{} of 160 clients connected", world.connected.load(Ordering::Relaxed));
    assert_eq!(refused, 0, "the burst met gateways without room");
    assert!(third.is_some(), "160 + {BUFFER} connections call for a third gateway; {}", h.kubelet.describe());
    for (pod, held) in &most {
        assert!(*held <= CAPACITY, "{pod} held {held} connections, over its capacity {CAPACITY}");
    }
    let status = status.expect("status.autoscale");
    assert!(status.message.contains(&format!("with a buffer of {BUFFER}")), "{status:?}");
    h.stop().await;
}
