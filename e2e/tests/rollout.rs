//! Rolling upgrades driven by the operator, end to end: an in-process
//! operator, the local control plane, a private Redis, Cassandra, and a real
//! `kubechat-gateway` process per gateway Pod (`kubechat_e2e::kubelet`).
//!
//! - Under load: 1,000 clients with steady one-to-one and group traffic
//!   while the image changes on three gateways. The pods are replaced 2, 1, 0, each
//!   after its drain finished; no acknowledged message is lost; reconnects
//!   stay under the drain's bound; the status and Events show each step.
//!   The replacements keep the zone spread (`status.zones`). Then a node
//!   drain's eviction of one gateway (the Eviction API): a paced drain,
//!   reported in the status and an Event, the pod back, listed, spread.
//! - Without load: a pause holds the rollout at a pod boundary until it is
//!   lifted; an image the kubelet refuses to start stops the rollout
//!   (`Degraded`) without draining the next pod, even when a replicas edit
//!   removes the broken pod, and a fixed spec resumes it; a replacement
//!   that is ready and listed but refuses every WebSocket upgrade (a
//!   gateway failpoint) holds the rollout too, the status naming the
//!   connect that failed.
//!
//! Drains of 1,000 clients within their window need the machine to
//! themselves: `e2e/test.sh` runs this suite alone.
//! kubechat-test: exclusive
//! kubechat-test: threads 6

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, EvictParams, ListParams, Patch, PatchParams};
use kubechat_crds::{ChatCluster, ChatClusterSpec};
use kubechat_e2e::client::Tokens;
use kubechat_e2e::cluster::{RunningOperator, wait_for};
use kubechat_e2e::gateways::{NAME, RealGateways, Setup};
use kubechat_operator::desired::gateway::ENDPOINTS_KEY;
use kubechat_operator::discovery::endpoints::Endpoints;
use kubechat_operator::leader::LeaderConfig;
use kubechat_operator::rollout::{DRAIN_STARTED_ANNOTATION, PAUSED_ANNOTATION};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const GATEWAYS: usize = 3;
const CLIENTS: usize = 1000;
/// Clients that send one message a second to a partner in the other half.
const SENDERS: usize = 100;
/// Of the senders, these send to a group of their own (the rest one-to-one).
const GROUP_SENDERS: usize = 10;
/// Members of each group, the sender included.
const GROUP_SIZE: usize = 20;
const WINDOW_SECONDS: i32 = 6;
const RATE: usize = 100;
const READY_TIMEOUT_SECONDS: i32 = 15;
const LEASE: Duration = Duration::from_secs(3);

struct Harness(RealGateways);

impl std::ops::Deref for Harness {
    type Target = RealGateways;
    fn deref(&self) -> &RealGateways {
        &self.0
    }
}

impl std::ops::DerefMut for Harness {
    fn deref_mut(&mut self) -> &mut RealGateways {
        &mut self.0
    }
}

impl Harness {
    async fn start(prefix: &str) -> Self {
        Self::start_with(prefix, &[]).await
    }

    /// With `leaders` empty, one operator without leader election; else one
    /// operator per identity, sharing a Lease, the first one leading.
    async fn start_with(prefix: &str, leaders: &[&str]) -> Self {
        // Drain first: these follow each drained pod's replacement step by
        // step (a surge: `a_surge_gateway_keeps_every_gateway_serving_through_a_rollout`).
        Self::start_with_spec(prefix, leaders, |spec| spec.gateway.rollout.max_surge = 0).await
    }

    async fn start_with_spec(prefix: &str, leaders: &[&str], edit: impl FnOnce(&mut ChatClusterSpec)) -> Self {
        let setup = Setup { prefix, gateways: GATEWAYS, leaders, lease: LEASE };
        Self(
            RealGateways::start(setup, |spec| {
                spec.gateway.drain.window_seconds = WINDOW_SECONDS;
                spec.gateway.drain.max_reconnects_per_second = RATE as i32;
                spec.gateway.rollout.pod_ready_timeout_seconds = READY_TIMEOUT_SECONDS;
                edit(spec);
            })
            .await,
        )
    }

    async fn wait_listed(&self, timeout: Duration) -> Endpoints {
        self.0.wait_listed(GATEWAYS, timeout).await
    }

    async fn set_image(&self, image: &str) {
        let patch = json!({"spec": {"gateway": {"image": image}}});
        self.clusters().patch(NAME, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch the image");
    }

    async fn set_gateway_replicas(&self, replicas: usize) {
        let patch = json!({"spec": {"gateway": {"replicas": replicas}}});
        self.clusters().patch(NAME, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch the replicas");
    }

    async fn set_paused(&self, paused: bool) {
        let value = if paused { json!("true") } else { Value::Null };
        let patch = json!({"metadata": {"annotations": {PAUSED_ANNOTATION: value}}});
        self.clusters()
            .patch(NAME, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("patch the annotation");
    }

    /// The rollout Events (reason, note), oldest first.
    async fn rollout_events(&self) -> Vec<(String, String)> {
        self.rollout_occurrences().await.into_iter().map(|(reason, note, _)| (reason, note)).collect()
    }

    /// The notes of the Events with `reason`.
    async fn events_with_reason(&self, reason: &str) -> Vec<String> {
        let events = Api::<Event>::namespaced(self.client.clone(), &self.namespace)
            .list(&ListParams::default())
            .await
            .expect("list Events");
        events.items.into_iter().filter(|e| e.reason.as_deref() == Some(reason)).filter_map(|e| e.note).collect()
    }

    /// Whether a rollout Event `reason` about gateway pod `n` was published.
    async fn has_event(&self, reason: &str, n: usize) -> bool {
        self.rollout_events().await.iter().any(|(r, note)| r == reason && pod_of(note) == gateway(n))
    }

    /// The rollout Events (reason, note, occurrences), oldest first: a
    /// repeat of the same reason about the same object by the same operator
    /// is one Event with a `series.count`; another operator's is an Event of its own.
    async fn rollout_occurrences(&self) -> Vec<(String, String, i32)> {
        let events = Api::<Event>::namespaced(self.client.clone(), &self.namespace)
            .list(&ListParams::default())
            .await
            .expect("list Events");
        let mut steps: Vec<(i64, String, String, i32)> = events
            .items
            .into_iter()
            .filter(|e| {
                matches!(
                    e.reason.as_deref(),
                    Some("DrainStarted" | "DrainFinished" | "PodReplaced" | "RolloutFinished")
                )
            })
            .map(|e| {
                let at = e.event_time.as_ref().map_or(0, |t| t.0.as_microsecond());
                let count = e.series.as_ref().map_or(1, |s| s.count);
                (at, e.reason.unwrap_or_default(), e.note.unwrap_or_default(), count)
            })
            .collect();
        steps.sort();
        steps.into_iter().map(|(_, reason, note, count)| (reason, note, count)).collect()
    }

    /// Waits until the rollout to `image` is over: no rollout in the
    /// status, every pod runs `image`, every gateway listed ready.
    async fn wait_rollout_finished(&self, image: &str, timeout: Duration) -> ChatCluster {
        let done = wait_for(timeout, || async {
            let cc = self.cluster().await;
            if cc.status.as_ref()?.rollout.is_some() {
                return None;
            }
            let pods = self.gateway_pods().await;
            let all_new = pods.len() == GATEWAYS
                && pods.iter().all(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && p.spec.as_ref().and_then(|s| s.containers.first()).and_then(|c| c.image.as_deref())
                            == Some(image)
                });
            let listed =
                self.endpoints().await.is_some_and(|e| e.gateways.iter().filter(|g| g.ready).count() == GATEWAYS);
            (all_new && listed).then_some(cc)
        })
        .await;
        done.unwrap_or_else(|| {
            panic!("the rollout did not finish within {timeout:?}; gateways: {}", self.kubelet.describe())
        })
    }

    async fn drain_annotated(&self) -> Vec<String> {
        let pods = self.pods().list(&ListParams::default().labels("app.kubernetes.io/component=gateway")).await;
        pods.expect("list pods")
            .items
            .into_iter()
            .filter(|p| p.annotations().contains_key(DRAIN_STARTED_ANNOTATION))
            .map(|p| p.name_any())
            .collect()
    }

    async fn stop(self) {
        self.0.stop().await;
    }
}

/// A short Lease, so a standby takes over a few seconds after a crash.
fn lease(namespace: &str, identity: &str) -> LeaderConfig {
    kubechat_e2e::gateways::lease(namespace, identity, LEASE)
}

fn gateway(n: usize) -> String {
    format!("{NAME}-gateway-{n}")
}

/// The Events of a rollout in the order a correct one publishes them.
fn expected_steps() -> Vec<(&'static str, String)> {
    let mut steps = Vec::new();
    for n in (0..GATEWAYS).rev() {
        steps.push(("DrainStarted", gateway(n)));
        steps.push(("DrainFinished", gateway(n)));
        steps.push(("PodReplaced", gateway(n)));
    }
    steps.push(("RolloutFinished", String::new()));
    steps
}

/// The gateway pod an Event's note is about ("" for none).
/// The UID of gateway `n` among `pods` (a replaced pod has a new one).
fn uid_of(pods: &[Pod], n: usize) -> Option<String> {
    pods.iter().find(|p| p.name_any() == gateway(n)).and_then(|p| p.uid())
}

fn pod_of(note: &str) -> String {
    (0..GATEWAYS).map(gateway).find(|g| note.contains(&format!("{g} ")) || note.starts_with(g)).unwrap_or_default()
}

fn assert_steps(events: &[(String, String)]) {
    let got: Vec<(&str, String)> = events.iter().map(|(reason, note)| (reason.as_str(), pod_of(note))).collect();
    assert_eq!(got, expected_steps(), "rollout Events out of order: {events:#?}");
}

// ------------------------------------------------------------- clients --

/// What the simulated devices saw, shared with the test.
#[derive(Default)]
struct Seen {
    /// Message ids each user got (live or by sync).
    got: HashMap<String, HashSet<String>>,
    /// (recipient, id) acknowledged to senders.
    acked: Vec<(String, String)>,
    /// When each paced `reconnect` frame arrived (since the test's start).
    sent_away: Vec<Duration>,
    /// Connections opened after the first (reconnects).
    reconnects: usize,
    /// Connection attempts that failed (refused, e.g. `gateway_full`, or unanswered).
    failed_connects: usize,
    /// Group messages acknowledged (each is in `acked` once per other member).
    group_messages: usize,
    connected: HashSet<String>,
}

struct World {
    seen: Mutex<Seen>,
    /// Ready gateway URLs as the endpoint ConfigMap lists them.
    urls: Mutex<Vec<String>>,
    started: Instant,
    /// Group id → members, and each group sender's group.
    groups: HashMap<String, Vec<String>>,
    group_of: HashMap<usize, String>,
}

impl World {
    fn pick(&self, n: usize) -> Option<String> {
        let urls = self.urls.lock().expect("lock");
        (!urls.is_empty()).then(|| urls[n % urls.len()].clone())
    }
}

fn user(n: usize) -> String {
    format!("u{n}")
}

/// A deterministic spread in 0..`within` ms for client `n`'s `attempt`.
fn jitter(n: usize, attempt: u64, within: u64) -> Duration {
    let mixed = (n as u64).wrapping_mul(2_654_435_761).wrapping_add(attempt.wrapping_mul(40_503));
    Duration::from_millis(mixed % within.max(1))
}

/// One device: connects, syncs, receives, sends (when a sender) one
/// message at a time with a stable key, and follows `reconnect` frames and
/// dropped connections like a real client.
async fn device(world: Arc<World>, tokens: Arc<Tokens>, n: usize, stop: CancellationToken) {
    let me = user(n);
    let token = tokens.mint(&me, "phone");
    let mut url = world.pick(n);
    let mut cursor = "0".to_string();
    let mut seq = 0_u64;
    let mut attempt = 0_u64;
    let mut outstanding: Option<Value> = None;
    let sender = n < SENDERS;
    let to = match world.group_of.get(&n) {
        Some(group) => json!({"group": group}),
        None => json!({"user": user(n + CLIENTS / 2)}),
    };
    while !stop.is_cancelled() {
        attempt += 1;
        let target = match url.take() {
            Some(u) => u,
            None => match world.pick(n + attempt as usize) {
                Some(u) => u,
                None => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let Ok(Ok((socket, _))) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(format!("{target}?token={token}")),
        )
        .await
        else {
            world.seen.lock().expect("lock").failed_connects += 1;
            tokio::time::sleep(Duration::from_millis(200) + jitter(n, attempt, 300)).await;
            continue;
        };
        {
            let mut seen = world.seen.lock().expect("lock");
            if !seen.connected.insert(me.clone()) {
                seen.reconnects += 1;
            }
        }
        let (mut sink, mut stream) = socket.split();
        let sync = json!({"type":"sync","req":"sync","after":cursor});
        if sink.send(Message::Text(sync.to_string().into())).await.is_err() {
            continue;
        }
        if let Some(frame) = &outstanding {
            let _ = sink.send(Message::Text(frame.to_string().into())).await;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(1000) + jitter(n, 0, 100));
        let mut heartbeat = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick(), if sender && outstanding.is_none() => {
                    seq += 1;
                    let frame = json!({"type":"send","req":format!("s{seq}"),"to":to,"text":"hi",
                                       "key":format!("{me}-{seq}")});
                    let sent = sink.send(Message::Text(frame.to_string().into())).await;
                    outstanding = Some(frame);
                    if sent.is_err() {
                        break;
                    }
                }
                _ = heartbeat.tick() => {
                    let _ = sink.send(Message::Text(r#"{"type":"heartbeat"}"#.into())).await;
                }
                message = stream.next() => {
                    let frame: Value = match message {
                        Some(Ok(Message::Text(text))) => serde_json::from_str(&text).unwrap_or(Value::Null),
                        Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                        Some(Ok(_)) => continue,
                    };
                    match note(&world, &me, &frame, &mut outstanding, &mut cursor) {
                        Next::Nothing => {}
                        Next::Send(frame) => {
                            let _ = sink.send(Message::Text(frame.to_string().into())).await;
                        }
                        Next::Retry => {
                            if let Some(sent) = &outstanding {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                let _ = sink.send(Message::Text(sent.to_string().into())).await;
                            }
                        }
                        Next::MoveTo(next, within) => {
                            url = next;
                            tokio::time::sleep(jitter(n, attempt, within)).await;
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// What a device does after a frame.
enum Next {
    Nothing,
    Send(Value),
    Retry,
    MoveTo(Option<String>, u64),
}

/// Records what `frame` tells about delivery and says what to do next.
fn note(world: &World, me: &str, frame: &Value, outstanding: &mut Option<Value>, cursor: &mut String) -> Next {
    let mut seen = world.seen.lock().expect("lock");
    match frame["type"].as_str().unwrap_or_default() {
        "message" => {
            let id = frame["message"]["id"].as_str().unwrap_or_default().to_string();
            seen.got.entry(me.to_string()).or_default().insert(id);
            Next::Nothing
        }
        "synced" => {
            for entry in frame["entries"].as_array().into_iter().flatten() {
                let id = entry["message"]["id"].as_str().unwrap_or_default().to_string();
                seen.got.entry(me.to_string()).or_default().insert(id);
            }
            if frame["has_more"] == true {
                Next::Send(json!({"type":"sync","req":"sync","after":frame["next"]}))
            } else {
                if let Some(next) = frame["cursor"].as_str() {
                    *cursor = next.to_string();
                }
                Next::Nothing
            }
        }
        "ack" => {
            if let Some(sent) = outstanding.take() {
                let id = frame["id"].as_str().unwrap_or_default().to_string();
                match sent["to"]["group"].as_str() {
                    // Every other member must get a group message.
                    Some(group) => {
                        seen.group_messages += 1;
                        for member in world.groups.get(group).into_iter().flatten().filter(|m| *m != me) {
                            seen.acked.push((member.clone(), id.clone()));
                        }
                    }
                    None => {
                        let to = sent["to"]["user"].as_str().unwrap_or_default().to_string();
                        seen.acked.push((to, id));
                    }
                }
            }
            Next::Nothing
        }
        "resync" => Next::Send(json!({"type":"sync","req":"sync","after":cursor.clone()})),
        // A send refused (storage, rate): retried with the same key.
        "error" if frame["req"].as_str().is_some_and(|r| r.starts_with('s') && r != "sync") => Next::Retry,
        "reconnect" => {
            if frame["reason"] != "drain deadline reached" {
                let at = world.started.elapsed();
                seen.sent_away.push(at);
            }
            Next::MoveTo(frame["url"].as_str().map(str::to_string), frame["within_ms"].as_u64().unwrap_or(1000))
        }
        _ => Next::Nothing,
    }
}

/// Creates a group owned by `owner` with `members`; its id.
async fn create_group(url: &str, tokens: &Tokens, owner: &str, members: &[String]) -> String {
    let token = tokens.mint(owner, "setup");
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("{url}?token={token}")).await.expect("connect to create a group");
    let create = json!({"type":"create_group","req":"g","name":format!("{owner}'s group"),"members":members});
    socket.send(Message::Text(create.to_string().into())).await.expect("send create_group");
    loop {
        let Some(Ok(Message::Text(text))) = socket.next().await else { panic!("no answer to create_group") };
        let frame: Value = serde_json::from_str(&text).expect("json");
        match frame["type"].as_str() {
            Some("group") => return frame["group"]["id"].as_str().expect("group id").to_string(),
            Some("error") => panic!("create_group refused: {frame}"),
            _ => {}
        }
    }
}

/// Every message id in `user`'s inbox, read from the beginning.
async fn sync_everything(url: &str, tokens: &Tokens, user: &str) -> HashSet<String> {
    let token = tokens.mint(user, "audit");
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("{url}?token={token}")).await.expect("connect for the final sync");
    let mut ids = HashSet::new();
    let mut after = json!("0");
    loop {
        let sync = json!({"type":"sync","req":"final","after":after,"limit":200});
        socket.send(Message::Text(sync.to_string().into())).await.expect("send");
        let page = loop {
            let Some(Ok(Message::Text(text))) = socket.next().await else { panic!("final sync of {user} failed") };
            let frame: Value = serde_json::from_str(&text).expect("json");
            if frame["type"] == "synced" {
                break frame;
            }
        };
        for entry in page["entries"].as_array().into_iter().flatten() {
            ids.insert(entry["message"]["id"].as_str().unwrap_or_default().to_string());
        }
        if page["has_more"] != true {
            return ids;
        }
        after = page["next"].clone();
    }
}

/// Acknowledged messages that reached neither their recipient (live or by
/// sync) nor, by a final sync, its inbox; and the inboxes that were read.
async fn audit(seen: &Seen, url: &str, tokens: &Tokens) -> (Vec<(String, String)>, HashMap<String, HashSet<String>>) {
    let mut lost = Vec::new();
    let mut audited: HashMap<String, HashSet<String>> = HashMap::new();
    for (to, id) in &seen.acked {
        if seen.got.get(to).is_some_and(|ids| ids.contains(id)) {
            continue;
        }
        if !audited.contains_key(to) {
            audited.insert(to.clone(), sync_everything(url, tokens, to).await);
        }
        if !audited[to].contains(id) {
            lost.push((to.clone(), id.clone()));
        }
    }
    (lost, audited)
}

/// Paced `reconnect` frames per whole second.
fn per_second(times: &[Duration]) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for t in times {
        *counts.entry(t.as_secs()).or_default() += 1;
    }
    counts
}

/// The most frames in any two consecutive seconds.
fn most_in_two_seconds(counts: &BTreeMap<u64, usize>) -> usize {
    counts.iter().map(|(second, n)| n + counts.get(&(second + 1)).copied().unwrap_or(0)).max().unwrap_or(0)
}

// --------------------------------------------------------------- tests --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_change_replaces_gateways_one_drained_pod_at_a_time_without_losing_acked_messages() {
    let h = Harness::start("rollout-load").await;
    // Group sender n owns a group with GROUP_SIZE - 1 non-senders.
    let url = h.wait_listed(Duration::from_secs(10)).await.gateways[0].url.clone();
    let (mut groups, mut group_of) = (HashMap::new(), HashMap::new());
    for n in 0..GROUP_SENDERS {
        let members: Vec<String> = (0..GROUP_SIZE - 1).map(|i| user(SENDERS + n * (GROUP_SIZE - 1) + i)).collect();
        let id = create_group(&url, &h.tokens, &user(n), &members).await;
        groups.insert(id.clone(), members.into_iter().chain([user(n)]).collect::<Vec<_>>());
        group_of.insert(n, id);
    }
    let world =
        Arc::new(World { seen: Mutex::default(), urls: Mutex::default(), started: Instant::now(), groups, group_of });
    let stop = CancellationToken::new();

    // The ready URLs as clients would discover them; and, at every look,
    // how many gateways are listed ready, the rollout status and the pods'
    // drain annotations.
    let watcher = {
        let (world, stop, client, namespace) = (world.clone(), stop.clone(), h.client.clone(), h.namespace.clone());
        tokio::spawn(async move {
            let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
            let clusters: Api<ChatCluster> = Api::namespaced(client, &namespace);
            let mut fewest_ready = GATEWAYS;
            let mut phases: Vec<String> = Vec::new();
            let mut disruptions: HashSet<(String, String)> = HashSet::new();
            while !stop.is_cancelled() {
                if let Ok(cm) = config_maps.get(&format!("{NAME}-endpoints")).await
                    && let Some(e) =
                        cm.data.as_ref().and_then(|d| d.get(ENDPOINTS_KEY)).and_then(|t| Endpoints::parse(t))
                {
                    let ready: Vec<String> = e.gateways.iter().filter(|g| g.ready).map(|g| g.url.clone()).collect();
                    fewest_ready = fewest_ready.min(ready.len());
                    *world.urls.lock().expect("lock") = ready;
                }
                if let Ok(cc) = clusters.get(NAME).await
                    && let Some(status) = cc.status
                {
                    for g in &status.gateway_pods {
                        if let Some(reason) = &g.disruption {
                            disruptions.insert((g.pod.clone(), reason.clone()));
                        }
                    }
                    if let Some(rollout) = status.rollout {
                        let line = format!("{} {}", rollout.phase, rollout.pod);
                        if phases.last() != Some(&line) {
                            phases.push(line);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (fewest_ready, phases, disruptions)
        })
    };
    wait_for(Duration::from_secs(10), || async { (world.urls.lock().expect("lock").len() == GATEWAYS).then_some(()) })
        .await
        .expect("the watcher sees three ready gateways");

    let tokens = Arc::new(Tokens::new(&h.key));
    let mut devices = Vec::new();
    for n in 0..CLIENTS {
        devices.push(tokio::spawn(device(world.clone(), tokens.clone(), n, stop.clone())));
        if n % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let all_connected = wait_for(Duration::from_secs(60), || async {
        (world.seen.lock().expect("lock").connected.len() == CLIENTS).then_some(())
    })
    .await;
    assert!(all_connected.is_some(), "not all {CLIENTS} clients connected");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reconnects_before = world.seen.lock().expect("lock").reconnects;

    let started = Instant::now();
    h.set_image("ghcr.io/kubechat/kubechat:0.2.0").await;
    let cc = h.wait_rollout_finished("ghcr.io/kubechat/kubechat:0.2.0", Duration::from_secs(240)).await;
    let took = started.elapsed();
    // Each replacement was placed by the scheduler under the spread constraint.
    let zones_after_rollout = h.wait_spread(GATEWAYS as i32, Duration::from_secs(10)).await;

    // A node drain's eviction of a gateway pod (the Eviction API, which
    // the PDB allows for one pod at a time): the pod stays Terminating while
    // its gateway drains on SIGTERM within the pod's grace period, the
    // status and an Event say so, and the StatefulSet brings it back.
    let evicted = gateway(1);
    let old_uid = h.gateway_pods().await.iter().find(|p| p.name_any() == evicted).and_then(|p| p.uid());
    let moved_before = world.seen.lock().expect("lock").sent_away.len();
    let eviction_started = Instant::now();
    let accepted = wait_for(Duration::from_secs(60), || async {
        match h.pods().evict(&evicted, &EvictParams::default()).await {
            Ok(_) => Some(()),
            // 429 until the disruption controller has counted the pods healthy.
            Err(e) => {
                println!("eviction of {evicted} refused for now: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                None
            }
        }
    })
    .await;
    assert!(accepted.is_some(), "the eviction of {evicted} was never admitted");
    let back = wait_for(Duration::from_secs(90), || async {
        let pods = h.gateway_pods().await;
        let new = pods.iter().find(|p| p.name_any() == evicted).and_then(|p| p.uid());
        let listed = world.urls.lock().expect("lock").len() == GATEWAYS;
        (new.is_some() && new != old_uid && listed).then_some(())
    })
    .await;
    assert!(back.is_some(), "{evicted} did not come back after its eviction; {}", h.kubelet.describe());
    let eviction_took = eviction_started.elapsed();
    let zones_after_eviction = h.wait_spread(GATEWAYS as i32, Duration::from_secs(10)).await;
    let moved_by_eviction = world.seen.lock().expect("lock").sent_away.len() - moved_before;

    // Traffic goes on a little, then everyone settles.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    for d in devices {
        let _ = d.await;
    }
    let (fewest_ready, phases, disruptions) = watcher.await.expect("watcher");

    let events = h.rollout_events().await;
    assert_steps(&events);
    let drains: Vec<&String> = events.iter().filter(|(r, _)| r == "DrainFinished").map(|(_, n)| n).collect();
    for note in &drains {
        assert!(note.contains("(0 connections left)"), "a pod was deleted before its drain emptied it: {note}");
    }

    // Every pod runs the new image.
    let pods = h.pods().list(&ListParams::default().labels("app.kubernetes.io/component=gateway")).await.expect("pods");
    for pod in &pods.items {
        let image = pod.spec.as_ref().and_then(|s| s.containers.first()).and_then(|c| c.image.clone());
        assert_eq!(image.as_deref(), Some("ghcr.io/kubechat/kubechat:0.2.0"), "{}", pod.name_any());
    }
    let progressing = cc.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Progressing").cloned());
    assert_ne!(progressing.map(|c| c.reason), Some("RollingUpdate".to_string()), "still progressing after the end");
    for n in 0..GATEWAYS {
        assert!(
            phases.iter().any(|p| p == &format!("Draining {}", gateway(n))),
            "status never showed {} draining: {phases:?}",
            gateway(n)
        );
    }
    // The eviction: reported, and a paced drain rather than a cut.
    assert!(
        disruptions.contains(&(evicted.clone(), "EvictionByEvictionAPI".to_string())),
        "the status never showed {evicted} evicted: {disruptions:?}"
    );
    let evictions = h.events_with_reason("GatewayEvicted").await;
    assert_eq!(evictions.len(), 1, "one GatewayEvicted Event: {evictions:?}");
    assert!(evictions[0].starts_with(&format!("{evicted} is being evicted")), "{evictions:?}");
    assert!(
        moved_by_eviction >= CLIENTS / GATEWAYS / 2,
        "only {moved_by_eviction} paced reconnect frames during the eviction: was the gateway drained?"
    );
    println!(
        "eviction of {evicted}: {moved_by_eviction} clients sent away paced, back and listed after {eviction_took:.1?}; \
         {evictions:?}; zones after the rollout {zones_after_rollout:?}, after the eviction {zones_after_eviction:?}"
    );

    // Never two down at once is what the Events order shows (a drain starts
    // only after the previous replacement came up); the list's ready count
    // also drops when a poll times out under this load, so it is only reported.
    println!("fewest gateways listed ready during the rollout: {fewest_ready}");

    // No acknowledged message lost: each is in its recipient's live or
    // synced set, or at least in its inbox now.
    let seen = std::mem::take(&mut *world.seen.lock().expect("lock"));
    let url = world.pick(0).expect("a gateway");
    let (lost, audited) = audit(&seen, &url, &h.tokens).await;
    let delivered_live_or_synced = seen.acked.len() - audited.len().min(seen.acked.len());
    let bursts = per_second(&seen.sent_away);
    let max_per_second = bursts.values().copied().max().unwrap_or(0);
    let max_two_seconds = most_in_two_seconds(&bursts);
    let reconnects = seen.reconnects - reconnects_before;
    println!(
        "rollout of {GATEWAYS} gateways with {CLIENTS} clients took {took:.1?}; drains: {drains:?}; acked {} \
         deliveries ({} of them group messages to {GROUP_SIZE}-member groups, one delivery per other member; \
         recipients audited by a final sync: {}), lost {}; reconnects {reconnects}, paced reconnect frames per \
         second max {max_per_second}, in two seconds max {max_two_seconds} (bound {RATE}/s); status phases \
         {phases:?}",
        seen.acked.len(),
        seen.group_messages,
        audited.len(),
        lost.len(),
    );
    let _ = delivered_live_or_synced;
    assert!(lost.is_empty(), "acked messages lost: {lost:?}");
    assert!(seen.acked.len() > SENDERS * 10, "too little traffic to tell: {} acked", seen.acked.len());
    assert!(seen.group_messages > GROUP_SENDERS * 10, "too little group traffic: {}", seen.group_messages);
    assert!(reconnects >= CLIENTS, "only {reconnects} reconnects: were the clients moved at all?");
    // Seen by 1,000 clients in this process, whose tasks are scheduled late
    // under this load: a second's frames can land in the next one (79, 140,
    // 85 averages 101). Two-second windows bear the pacing; one second may
    // hold half again, which an unpaced drain (hundreds at once) still breaks.
    assert!(
        max_two_seconds <= 2 * RATE * 5 / 4 && max_per_second <= RATE * 3 / 2,
        "paced reconnect frames per second {bursts:?} over the bound {RATE}/s"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_a_rollout_at_a_pod_boundary() {
    let h = Harness::start("rollout-pause").await;

    // Pause while the first pod drains: it is still replaced, the next is not drained.
    h.set_image("ghcr.io/kubechat/kubechat:0.2.0").await;
    let draining = wait_for(Duration::from_secs(60), || async {
        h.rollout_events().await.iter().any(|(r, n)| r == "DrainStarted" && n.contains(&gateway(2))).then_some(())
    })
    .await;
    assert!(draining.is_some(), "the rollout did not start; {}", h.kubelet.describe());
    h.set_paused(true).await;
    let paused = wait_for(Duration::from_secs(60), || async {
        let rollout = h.cluster().await.status?.rollout?;
        (rollout.phase == "Paused" && rollout.updated == 1).then_some(rollout)
    })
    .await;
    assert!(paused.is_some(), "not paused after one pod; status: {:?}", h.cluster().await.status);
    let cc = h.cluster().await;
    let progressing = cc.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Progressing").cloned());
    assert_eq!(progressing.map(|c| c.reason), Some("RolloutPaused".to_string()));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(h.drain_annotated().await, Vec::<String>::new(), "a pod was drained while paused");
    assert_eq!(h.cluster().await.status.and_then(|s| s.rollout).map(|r| r.phase), Some("Paused".into()));
    h.set_paused(false).await;
    h.wait_rollout_finished("ghcr.io/kubechat/kubechat:0.2.0", Duration::from_secs(120)).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_that_never_starts_stops_the_rollout_until_the_spec_is_fixed() {
    let h = Harness::start("rollout-stuck").await;
    h.wait_listed(Duration::from_secs(30)).await;

    // An image that never starts: the first replacement never comes up.
    let before = h.gateway_pods().await;
    h.set_image("ghcr.io/kubechat/kubechat:broken").await;
    let stuck = wait_for(Duration::from_secs(120), || async {
        let status = h.cluster().await.status?;
        let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded" && c.status == "True")?.clone();
        (status.rollout?.phase == "Stuck").then_some(degraded)
    })
    .await;
    let stuck = stuck.unwrap_or_else(|| panic!("the rollout did not stop; {}", h.kubelet.describe()));
    assert_eq!(stuck.reason, "RolloutStuck");
    assert!(stuck.message.contains(&gateway(2)), "{}", stuck.message);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.drain_annotated().await, Vec::<String>::new(), "the next pod was drained");
    let after = h.gateway_pods().await;
    for n in [0, 1] {
        assert_eq!(uid_of(&after, n), uid_of(&before, n), "{} was replaced during a stuck rollout", gateway(n));
    }

    // An unrelated edit (3 → 2 gateways removes the broken pod) leaves the
    // rollout stuck: no other pod moves to the revision that just failed.
    h.set_gateway_replicas(2).await;
    let removed = wait_for(Duration::from_secs(60), || async {
        (h.gateway_pods().await.iter().all(|p| p.name_any() != gateway(2))).then_some(())
    })
    .await;
    assert!(removed.is_some(), "{} was not removed by the scale-down", gateway(2));
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(h.drain_annotated().await, Vec::<String>::new(), "a pod was drained after the replicas edit");
    let after = h.gateway_pods().await;
    for n in [0, 1] {
        assert_eq!(uid_of(&after, n), uid_of(&before, n), "{} was moved to the failing revision", gateway(n));
    }
    let rollout = h.cluster().await.status.and_then(|s| s.rollout);
    assert_eq!(rollout.map(|r| r.phase), Some("Stuck".into()), "the replicas edit unstuck the rollout");

    // Fixing the spec resumes: the broken pod is replaced without a drain, then the rest.
    let patch = json!({"spec": {"gateway": {"image": "ghcr.io/kubechat/kubechat:0.3.0", "replicas": GATEWAYS}}});
    h.clusters().patch(NAME, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch the spec");
    h.wait_rollout_finished("ghcr.io/kubechat/kubechat:0.3.0", Duration::from_secs(180)).await;
    let cc = h.cluster().await;
    let degraded = cc.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded").cloned());
    assert_eq!(degraded.map(|c| c.status), Some("False".into()), "still degraded after the fix");
    h.stop().await;
}

/// A replacement that starts, reports ready and is listed, but refuses
/// every WebSocket upgrade (the failpoint): it does not count as up, the
/// next pod is not drained, and the status says what failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_that_refuses_websockets_stops_the_rollout() {
    let h = Harness::start("rollout-refuse").await;
    h.wait_listed(Duration::from_secs(30)).await;
    let before = h.gateway_pods().await;
    h.set_image("ghcr.io/kubechat/kubechat:0.4.0-failpoint-refuse-websocket").await;
    let stuck = wait_for(Duration::from_secs(120), || async {
        let status = h.cluster().await.status?;
        let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded" && c.status == "True")?.clone();
        degraded.message.contains("WebSocket connect").then_some(degraded)
    })
    .await;
    let Some(stuck) = stuck else {
        let status = h.cluster().await.status;
        panic!("the rollout did not stop at the refusing pod; status: {status:?}; {}", h.kubelet.describe());
    };
    let refusing = h.kubelet.running().into_iter().find(|p| p.name == gateway(2)).expect("the refusing pod runs");
    let refusing_url = refusing.url();
    assert!(stuck.message.contains(&gateway(2)), "{}", stuck.message);
    assert!(
        stuck.message.contains(&format!("does not answer a WebSocket connect at {refusing_url}")),
        "{}",
        stuck.message
    );
    assert!(stuck.message.contains("HTTP 503"), "{}", stuck.message);
    let listed = h.endpoints().await.expect("the endpoint list");
    let entry = listed.gateways.iter().find(|g| g.pod == gateway(2));
    assert!(entry.is_some_and(|g| g.ready), "the refusing gateway reports ready, yet: {entry:?}");
    assert_eq!(
        h.drain_annotated().await,
        Vec::<String>::new(),
        "a pod was drained past a replacement that serves no one"
    );
    let after = h.gateway_pods().await;
    for n in [0, 1] {
        assert_eq!(uid_of(&after, n), uid_of(&before, n), "{} was replaced past a pod that serves no one", gateway(n));
    }
    h.stop().await;
}

/// Opens `per_gateway` connections to every listed gateway that heartbeat
/// but ignore `reconnect` frames and never come back: each drain then lasts
/// its whole window (the gateway closes them at its end).
async fn hold_connections(h: &Harness, per_gateway: usize, stop: &CancellationToken) -> Vec<JoinHandle<()>> {
    let listed = h.wait_listed(Duration::from_secs(30)).await;
    let mut held = Vec::new();
    for (g, endpoint) in listed.gateways.iter().enumerate() {
        for n in 0..per_gateway {
            let token = h.tokens.mint(&format!("stay{g}-{n}"), "phone");
            let (socket, _) = tokio_tungstenite::connect_async(format!("{}?token={token}", endpoint.url))
                .await
                .unwrap_or_else(|e| panic!("connect to {}: {e}", endpoint.url));
            let stop = stop.clone();
            held.push(tokio::spawn(async move {
                let (mut sink, mut stream) = socket.split();
                let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = heartbeat.tick() => {
                            let _ = sink.send(Message::Text(r#"{"type":"heartbeat"}"#.into())).await;
                        }
                        frame = stream.next() => if !matches!(frame, Some(Ok(_))) { return },
                    }
                }
            }));
        }
    }
    held
}

/// Records, every 200 ms until `stop`, each gateway pod's drain annotation
/// by pod uid: (pod name, every distinct value seen). A pod drained twice
/// shows two values; one drained once, one.
fn watch_drain_annotations(
    h: &Harness,
    stop: &CancellationToken,
) -> JoinHandle<BTreeMap<String, (String, Vec<String>)>> {
    let (pods, stop) = (h.pods(), stop.clone());
    tokio::spawn(async move {
        let mut seen: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
        while !stop.is_cancelled() {
            let listed = pods.list(&ListParams::default().labels("app.kubernetes.io/component=gateway")).await;
            for pod in listed.map(|l| l.items).unwrap_or_default() {
                let Some(value) = pod.annotations().get(DRAIN_STARTED_ANNOTATION).cloned() else { continue };
                let entry = seen.entry(pod.uid().unwrap_or_default()).or_insert_with(|| (pod.name_any(), Vec::new()));
                if !entry.1.contains(&value) {
                    entry.1.push(value);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        seen
    })
}

/// Endpoint-list samples during a rollout: (since the start, gateways listed
/// ready, most connections on one gateway), every 200 ms; the ready URLs go
/// to the clients.
fn sample_endpoints(
    h: &Harness,
    world: Arc<World>,
    stop: CancellationToken,
) -> JoinHandle<Vec<(Duration, usize, u64)>> {
    let config_maps: Api<ConfigMap> = Api::namespaced(h.client.clone(), &h.namespace);
    tokio::spawn(async move {
        let mut samples = Vec::new();
        while !stop.is_cancelled() {
            if let Ok(cm) = config_maps.get(&format!("{NAME}-endpoints")).await
                && let Some(e) = cm.data.as_ref().and_then(|d| d.get(ENDPOINTS_KEY)).and_then(|t| Endpoints::parse(t))
            {
                let ready: Vec<String> = e.gateways.iter().filter(|g| g.ready).map(|g| g.url.clone()).collect();
                let most = e.gateways.iter().map(|g| g.connections).max().unwrap_or(0);
                samples.push((world.started.elapsed(), ready.len(), most));
                *world.urls.lock().expect("lock") = ready;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        samples
    })
}

/// Fewest gateways listed ready, and most connections on one, between two instants.
fn during(samples: &[(Duration, usize, u64)], from: Duration, to: Duration) -> (usize, u64) {
    let window = samples.iter().filter(|(at, ..)| *at >= from && *at <= to);
    let fewest = window.clone().map(|(_, ready, _)| *ready).min().unwrap_or(0);
    (fewest, window.map(|(.., most)| *most).max().unwrap_or(0))
}

/// What the tests of a rollout under load look at beyond what every such
/// rollout must hold (see [`loaded_rollout`]): the fewest gateways listed
/// ready while it ran, and the `ScaledDown` Events.
struct LoadedRollout {
    fewest_ready: usize,
    scaled_down: Vec<String>,
}

const SURGE_CLIENTS: usize = 240;
/// 240 clients fit on two of three gateways (a drain's), not on one.
const SURGE_CAPACITY: u64 = 150;

/// 240 clients on three gateways of capacity 150 with `gateway.rollout.maxSurge`
/// at `max_surge`, through one image change, until three gateways are left:
/// no gateway over its capacity, no acked message lost, enough traffic to tell.
async fn loaded_rollout(prefix: &str, max_surge: i32) -> LoadedRollout {
    let h = Harness::start_with_spec(prefix, &[], |spec| {
        spec.gateway.max_connections_per_pod = SURGE_CAPACITY as i64;
        spec.gateway.rollout.max_surge = max_surge;
    })
    .await;
    let world = Arc::new(World {
        seen: Mutex::default(),
        urls: Mutex::default(),
        started: Instant::now(),
        groups: HashMap::new(),
        group_of: HashMap::new(),
    });
    let stop = CancellationToken::new();
    let sampler = sample_endpoints(&h, world.clone(), stop.clone());
    wait_for(Duration::from_secs(10), || async { (world.urls.lock().expect("lock").len() == GATEWAYS).then_some(()) })
        .await
        .expect("three gateways listed ready");
    let tokens = Arc::new(Tokens::new(&h.key));
    let devices: Vec<JoinHandle<()>> =
        (0..SURGE_CLIENTS).map(|n| tokio::spawn(device(world.clone(), tokens.clone(), n, stop.clone()))).collect();
    let connected = wait_for(Duration::from_secs(60), || async {
        (world.seen.lock().expect("lock").connected.len() == SURGE_CLIENTS).then_some(())
    })
    .await;
    assert!(connected.is_some(), "not all {SURGE_CLIENTS} clients connected");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let from = world.started.elapsed();
    h.set_image("ghcr.io/kubechat/kubechat:0.2.0").await;
    if max_surge > 0 {
        let surged = wait_for(Duration::from_secs(60), || async {
            h.gateway_pods().await.iter().any(|p| p.name_any() == gateway(GATEWAYS)).then_some(())
        })
        .await;
        assert!(
            surged.is_some(),
            "no surge gateway {} was added; status {:?}",
            gateway(GATEWAYS),
            h.cluster().await.status
        );
    }
    h.wait_rollout_finished("ghcr.io/kubechat/kubechat:0.2.0", Duration::from_secs(180)).await;
    wait_for(Duration::from_secs(60), || async {
        let pods = h.gateway_pods().await;
        (pods.len() == GATEWAYS && world.urls.lock().expect("lock").len() == GATEWAYS).then_some(())
    })
    .await
    .expect("three gateways listed after the rollout");
    let to = world.started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    for d in devices {
        let _ = d.await;
    }
    let samples = sampler.await.expect("sampler");
    let scaled_down = h.events_with_reason("ScaledDown").await;
    let (fewest_ready, most_on_one) = during(&samples, from, to);
    let seen = std::mem::take(&mut *world.seen.lock().expect("lock"));
    let url = world.pick(0).expect("a gateway");
    let (lost, _) = audit(&seen, &url, &h.tokens).await;
    h.stop().await;
    let (acked, failed_connects) = (seen.acked.len(), seen.failed_connects);
    println!(
        "rollout of {GATEWAYS} gateways with maxSurge {max_surge} and {SURGE_CLIENTS} clients (capacity \
         {SURGE_CAPACITY}): {:.1?}, fewest listed ready {fewest_ready}, most on one gateway {most_on_one}; \
         acked {acked}, lost {}; failed connect attempts {failed_connects}; ScaledDown {scaled_down:?}",
        to - from,
        lost.len(),
    );
    assert!(most_on_one <= SURGE_CAPACITY, "a gateway passed its capacity");
    assert!(lost.is_empty(), "acked messages lost: {lost:?}");
    assert!(acked > SENDERS * 10, "too little traffic to tell: {acked} acked");
    LoadedRollout { fewest_ready, scaled_down }
}

/// With `gateway.rollout.maxSurge: 1` (the default) a fourth gateway at the
/// new revision comes up before the first old one is drained, and is
/// drained and removed after the last one: the cluster never serves with
/// fewer gateways than before, no gateway holds more than its capacity, no
/// acknowledged message is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surge_gateway_keeps_every_gateway_serving_through_a_rollout() {
    let rollout = loaded_rollout("rollout-surge", 1).await;
    assert!(
        rollout.fewest_ready >= GATEWAYS,
        "with a surge, only {} gateways were listed ready at one point",
        rollout.fewest_ready
    );
    assert!(
        rollout.scaled_down.iter().any(|n| n.contains(&format!("removed {}", gateway(GATEWAYS)))),
        "the surge gateway was not drained and removed: {:?}",
        rollout.scaled_down
    );
}

/// The same rollout without a surge (`maxSurge: 0`), beside it: one gateway
/// fewer while each is replaced, never two, and the clients of the one
/// drained fit on the others within their capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_without_a_surge_serves_on_one_gateway_fewer_within_capacity() {
    let rollout = loaded_rollout("rollout-nosurge", 0).await;
    assert!(
        rollout.fewest_ready >= GATEWAYS - 1,
        "without a surge, only {} gateways were listed ready at one point",
        rollout.fewest_ready
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_operator_finishes_a_rollout_after_the_leader_crashes_without_draining_a_pod_twice() {
    const HELD: usize = 20;
    const IMAGE: &str = "ghcr.io/kubechat/kubechat:0.2.0";
    let mut h = Harness::start_with("rollout-failover", &["first", "second"]).await;
    let stop = CancellationToken::new();
    let held = hold_connections(&h, HELD, &stop).await;
    let annotations = watch_drain_annotations(&h, &stop);

    let started = Instant::now();
    h.set_image(IMAGE).await;

    // 1. Crash the leader (no Lease released) while pod 2 drains.
    let draining = wait_for(Duration::from_secs(60), || async { h.has_event("DrainStarted", 2).await.then_some(()) });
    assert!(draining.await.is_some(), "the rollout did not start; {}", h.kubelet.describe());
    let first_kill_at = started.elapsed();
    h.operators.remove(0).kill();
    let killed = Instant::now();
    let second = h.operators[0].metrics.clone();
    let led = wait_for(Duration::from_secs(20), || async { (second.leader.get() == 1).then_some(()) }).await;
    assert!(led.is_some(), "the standby did not take the Lease over");
    let first_takeover = killed.elapsed();
    let still_draining = h.cluster().await.status.and_then(|s| s.rollout).map(|r| format!("{} {}", r.phase, r.pod));

    // 2. A third replica stands by; crash the second leader as soon as pod 2's
    //    replacement is reported (the next reconcile would start pod 1's drain).
    let standby = RunningOperator::start(&h.client, &h.namespace, Some(lease(&h.namespace, "third")));
    h.operators.push(standby);
    let replaced = wait_for(Duration::from_secs(60), || async { h.has_event("PodReplaced", 2).await.then_some(()) });
    assert!(replaced.await.is_some(), "the new leader did not replace pod 2; {}", h.kubelet.describe());
    let pod1_drain_started_before_crash = h.drain_annotated().await.contains(&gateway(1));
    h.operators.remove(0).kill();
    let killed = Instant::now();
    let third = h.operators[0].metrics.clone();
    let led = wait_for(Duration::from_secs(20), || async { (third.leader.get() == 1).then_some(()) }).await;
    assert!(led.is_some(), "the third replica did not take the Lease over");
    let second_takeover = killed.elapsed();

    h.wait_rollout_finished(IMAGE, Duration::from_secs(180)).await;
    let took = started.elapsed();
    stop.cancel();
    for task in held {
        let _ = task.await;
    }
    let annotations = annotations.await.expect("annotation watcher");

    let occurrences = h.rollout_occurrences().await;
    let count = |reason: &str, n: usize| -> i32 {
        occurrences.iter().filter(|(r, note, _)| r == reason && pod_of(note) == gateway(n)).map(|(_, _, c)| c).sum()
    };
    let order = |reason: &str| -> Vec<String> {
        occurrences.iter().filter(|(r, _, _)| r == reason).map(|(_, note, _)| pod_of(note)).collect()
    };
    let per_pod = |reason: &str| (0..GATEWAYS).map(|n| (gateway(n), count(reason, n))).collect::<Vec<_>>();
    println!(
        "failover rollout of {GATEWAYS} gateways ({HELD} held connections each, drain window {WINDOW_SECONDS} s, \
         lease {LEASE:?}) took {took:.1?}; leader killed {first_kill_at:.1?} in while draining pod 2, standby \
         leading after {first_takeover:.1?} (rollout then: {still_draining:?}); second leader killed right after \
         PodReplaced of pod 2 (pod 1's drain already recorded: {pod1_drain_started_before_crash}), third leading \
         after {second_takeover:.1?}; DrainStarted {:?}; DrainFinished {:?}; PodReplaced {:?}; drain annotations \
         by pod uid {annotations:?}; drains: {:?}",
        per_pod("DrainStarted"),
        per_pod("DrainFinished"),
        per_pod("PodReplaced"),
        occurrences.iter().filter(|(r, _, _)| r == "DrainFinished").map(|(_, note, _)| note).collect::<Vec<_>>(),
    );
    // Events are published after the state they report is recorded on the
    // pod: a leader killed between the two loses that Event (pod 1's
    // DrainStarted, when the second leader dies mid-step), never repeats it.
    // The drains themselves are counted by their annotations below.
    let pods_high_first: Vec<String> = (0..GATEWAYS).rev().map(gateway).collect();
    let in_order =
        |seen: Vec<String>| pods_high_first.iter().filter(|p| seen.contains(p)).cloned().collect::<Vec<_>>() == seen;
    assert!(in_order(order("DrainStarted")), "drains out of order or repeated: {occurrences:#?}");
    assert_eq!(order("PodReplaced"), pods_high_first, "replacements out of order or repeated: {occurrences:#?}");
    for n in 0..GATEWAYS {
        let drains = count("DrainStarted", n);
        let expected = if n == 1 { 0..=1 } else { 1..=1 };
        assert!(expected.contains(&drains), "{} drain Events: {drains}: {occurrences:#?}", gateway(n));
        assert_eq!(count("PodReplaced", n), 1, "{} replacement Events: {occurrences:#?}", gateway(n));
    }
    assert_eq!(order("RolloutFinished").len(), 1, "RolloutFinished: {occurrences:#?}");
    // The ground truth beside the Events: each old pod got one drain start, once.
    assert_eq!(annotations.len(), GATEWAYS, "drained pods (by uid): {annotations:?}");
    for (name, values) in annotations.values() {
        assert_eq!(values.len(), 1, "{name} was drained more than once: {values:?}");
    }
    assert_eq!(h.drain_annotated().await, Vec::<String>::new(), "a new pod carries a drain");
    h.stop().await;
}
