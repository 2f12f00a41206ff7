//! The gateways' admin API secured, end to end: an in-process operator, the
//! local control plane, a private Redis, Cassandra, and a real
//! `kubechat-gateway` process per gateway Pod (`kubechat_e2e::kubelet`).
//!
//! - A process without the cluster's admin token (this test) can neither
//!   drain a gateway nor cancel a drain: 401, and the gateway stays ready
//!   and listed.
//! - The operator's NetworkPolicy for the gateways opens their WebSocket
//!   port to everyone and their admin port to the operator's pods only.
//!   Nothing enforces policies here (no network plugin), so its content is
//!   checked, evaluated against the live gateway Pods and the operator's.
//! - The operator drains with the token, and cancels the drain when the
//!   rollout is paused mid-drain, and again when the spec goes back to the
//!   revision the draining pod runs: the pod is kept, ready and listed
//!   again, and the clients not yet moved stay connected.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kubechat_e2e::cluster::{operator_pods, wait_for};
use kubechat_e2e::gateways::{NAME, RealGateways, Setup};
use kubechat_e2e::kubelet::RunningPod;
use kubechat_operator::discovery::poll::{self, DrainProgress};
use kubechat_operator::rollout::{DRAIN_STARTED_ANNOTATION, PAUSED_ANNOTATION};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const GATEWAYS: usize = 2;
/// Clients held on the gateway the rollout drains first (the highest).
const HELD: usize = 40;
/// A long window at a low rate: the drain moves about one client a second,
/// so most are still there when it is cancelled.
const WINDOW_SECONDS: i32 = 60;
const RATE: i32 = 2;
const NEW_IMAGE: &str = "ghcr.io/kubechat/kubechat:0.2.0";

fn gateway(n: usize) -> String {
    format!("{NAME}-gateway-{n}")
}

/// One request to a gateway's drain endpoint, as any process in the
/// cluster could send it: (status, body).
async fn drain_request(admin: SocketAddr, method: &str, authorization: Option<&str>) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(admin).await.expect("connect to the admin port");
    let authorization = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} /v1/admin/drain HTTP/1.1\r\nHost: {admin}\r\n{authorization}Content-Type: application/json\r\n\
         Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).await.expect("send the request");
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .expect("an answer within 5 s")
        .expect("read the answer");
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// The drain as the gateway reports it (`GET /v1/admin/drain`, open to reads).
async fn progress(admin: SocketAddr) -> DrainProgress {
    let mut stream = tokio::net::TcpStream::connect(admin).await.expect("connect to the admin port");
    let request = format!("GET /v1/admin/drain HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .expect("an answer within 5 s")
        .expect("read");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not drain progress ({e}): {response}"))
}

/// Connections that heartbeat, note a `reconnect` frame and stay (they
/// never follow it): what a drain has told to move, and who is still connected.
struct Held {
    told_to_move: Arc<AtomicUsize>,
    connected: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

async fn hold(h: &RealGateways, url: &str, stop: &CancellationToken) -> Held {
    let held = Held { told_to_move: Arc::default(), connected: Arc::default(), tasks: Vec::new() };
    let mut tasks = Vec::new();
    for n in 0..HELD {
        let token = h.tokens.mint(&format!("held{n}"), "phone");
        let (socket, _) = tokio_tungstenite::connect_async(format!("{url}?token={token}"))
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        let (told, connected, stop) = (held.told_to_move.clone(), held.connected.clone(), stop.clone());
        connected.fetch_add(1, Ordering::SeqCst);
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = socket.split();
            let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
            let mut was_told = false;
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = heartbeat.tick() => {
                        let _ = sink.send(Message::Text(r#"{"type":"heartbeat"}"#.into())).await;
                    }
                    frame = stream.next() => match frame {
                        Some(Ok(Message::Text(text))) => {
                            let frame: Value = serde_json::from_str(&text).unwrap_or_default();
                            if frame["type"] == "reconnect" && !was_told {
                                was_told = true;
                                told.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                        Some(Ok(_)) => {}
                    },
                }
            }
            connected.fetch_sub(1, Ordering::SeqCst);
        }));
    }
    Held { tasks, ..held }
}

/// Whether `selector` (matchLabels only) selects `labels`.
fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let selector = selector.expect("a selector");
    assert!(selector.match_expressions.is_none(), "only matchLabels are modelled");
    selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether `peer` admits a pod with `labels` in a namespace with `namespace_labels`.
fn admits(
    peer: &NetworkPolicyPeer,
    labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
) -> bool {
    assert!(peer.ip_block.is_none(), "no address blocks");
    selects(peer.namespace_selector.as_ref(), namespace_labels) && selects(peer.pod_selector.as_ref(), labels)
}

async fn set_paused(h: &RealGateways, paused: bool) {
    let value = if paused { json!("true") } else { Value::Null };
    let patch = json!({"metadata": {"annotations": {PAUSED_ANNOTATION: value}}});
    h.clusters().patch(NAME, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch the annotation");
}

async fn set_image(h: &RealGateways, image: &str) {
    let patch = json!({"spec": {"gateway": {"image": image}}});
    h.clusters().patch(NAME, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch the image");
}

/// The Events `reason`, oldest first: (note, occurrences). A repeat of the
/// same reason about the same pod is counted into the first Event (its
/// `series`), whose note stays the first one's.
async fn events(h: &RealGateways, reason: &str) -> Vec<(String, i32)> {
    let events = Api::<Event>::namespaced(h.client.clone(), &h.namespace).list(&ListParams::default()).await;
    let mut found: Vec<(i64, String, i32)> = events
        .expect("list Events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| {
            let at = e.event_time.as_ref().map_or(0, |t| t.0.as_microsecond());
            (at, e.note.unwrap_or_default(), e.series.as_ref().map_or(1, |s| s.count))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, note, count)| (note, count)).collect()
}

async fn get_pod(h: &RealGateways, name: &str) -> Pod {
    h.pods().get(name).await.unwrap_or_else(|e| panic!("pod {name}: {e}"))
}

fn serving(pod: &Pod) -> Option<String> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().find(|c| c.type_ == "kubechat.dev/serving").map(|c| c.status.clone())
}

/// Waits until the operator has started draining `pod` and the gateway has
/// sent `at_least` clients away.
async fn wait_draining(h: &RealGateways, target: &RunningPod, at_least: u64) -> DrainProgress {
    let draining = wait_for(Duration::from_secs(60), || async {
        let progress = progress(target.admin).await;
        (progress.draining && progress.moved >= at_least).then_some(progress)
    })
    .await;
    draining.unwrap_or_else(|| panic!("{} was not drained by the operator; {}", target.name, h.kubelet.describe()))
}

/// Waits until the drain of `target` was cancelled and its pod is serving
/// and listed again; how long that took.
async fn wait_cancelled(h: &RealGateways, target: &RunningPod) -> Duration {
    let started = Instant::now();
    let back = wait_for(Duration::from_secs(30), || async {
        let progress = progress(target.admin).await;
        let pod = get_pod(h, &target.name).await;
        let listed = h.endpoints().await.is_some_and(|e| e.gateways.iter().any(|g| g.pod == target.name && g.ready));
        let recorded = pod.annotations().contains_key(DRAIN_STARTED_ANNOTATION);
        (!progress.draining && !recorded && serving(&pod).as_deref() == Some("True") && listed).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "the drain of {} was not cancelled, or the pod does not serve again: progress {:?}, pod {:?}; {}",
        target.name,
        progress(target.admin).await,
        get_pod(h, &target.name).await.status,
        h.kubelet.describe()
    );
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operator_drains_gateways_and_it_cancels_a_drain_on_pause_and_rollback() {
    let setup = Setup { prefix: "admin-api", gateways: GATEWAYS, leaders: &[], lease: Duration::from_secs(3) };
    let h = RealGateways::start(setup, |spec| {
        spec.gateway.drain.window_seconds = WINDOW_SECONDS;
        spec.gateway.drain.max_reconnects_per_second = RATE;
        // Drain first: the pause and the rollback must meet a drain under way.
        spec.gateway.rollout.max_surge = 0;
    })
    .await;
    let original_image = h.cluster().await.spec.gateway.image;

    // 1. The token: generated per cluster, mounted into the gateways.
    let secret = Api::<Secret>::namespaced(h.client.clone(), &h.namespace)
        .get(&format!("{NAME}-admin-token"))
        .await
        .expect("the generated admin token");
    let token = secret.data.unwrap_or_default()["token"].0.clone();
    assert!(token.len() == 64 && token.iter().all(u8::is_ascii_hexdigit), "32 random bytes in hex");
    let sts = Api::<StatefulSet>::namespaced(h.client.clone(), &h.namespace).get(&format!("{NAME}-gateway")).await;
    let pod_spec = sts.expect("the gateway StatefulSet").spec.template.spec.expect("pod spec");
    let volume = pod_spec.volumes.iter().flatten().find(|v| v.name == "admin-token").expect("the token volume");
    assert_eq!(volume.secret.as_ref().and_then(|s| s.secret_name.as_deref()), Some("chat-admin-token"));

    // 2. The policy: the WebSocket port from anywhere, the admin port from the operator's pods only.
    let policy = Api::<NetworkPolicy>::namespaced(h.client.clone(), &h.namespace)
        .get(&format!("{NAME}-gateway"))
        .await
        .expect("the gateways' NetworkPolicy");
    let spec = policy.spec.expect("spec");
    let ports = h.cluster().await.spec.gateway.ports;
    let gateway_pods = h.gateway_pods().await;
    assert_eq!(gateway_pods.len(), GATEWAYS);
    for pod in &gateway_pods {
        assert!(selects(spec.pod_selector.as_ref(), pod.labels()), "{} is not selected", pod.name_any());
    }
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
    let rules = spec.ingress.expect("rules");
    let port = |i: usize| rules[i].ports.iter().flatten().map(|p| p.port.clone()).collect::<Vec<_>>();
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert_eq!((port(0), rules[0].from.clone()), (vec![Some(IntOrString::Int(ports.websocket))], None));
    assert_eq!(port(1), vec![Some(IntOrString::Int(ports.admin))]);
    let peers = rules[1].from.clone().expect("the admin port's peers");
    let namespace_labels = |name: &str| BTreeMap::from([("kubernetes.io/metadata.name".to_string(), name.to_string())]);
    // The apiserver labels every namespace with its name, which the peer's namespace selector relies on.
    let namespace = Api::<Namespace>::all(h.client.clone()).get(&h.namespace).await.expect("the test namespace");
    assert_eq!(namespace.labels().get("kubernetes.io/metadata.name"), Some(&h.namespace));
    let operator = operator_pods();
    let candidates = [
        ("the operator's pod", operator.labels.clone(), namespace_labels(&operator.namespace), true),
        (
            "a pod labelled as the operator in the gateways' namespace",
            operator.labels.clone(),
            namespace_labels(&h.namespace),
            false,
        ),
        (
            "another release's operator",
            BTreeMap::from([
                ("app.kubernetes.io/name".to_string(), "kubechat-operator".to_string()),
                ("app.kubernetes.io/instance".to_string(), "other".to_string()),
            ]),
            namespace_labels(&operator.namespace),
            false,
        ),
    ];
    for (what, labels, in_namespace, admitted) in candidates {
        assert_eq!(peers.iter().any(|p| admits(p, &labels, &in_namespace)), admitted, "{what}");
    }
    for pod in &gateway_pods {
        assert!(!peers.iter().any(|p| admits(p, pod.labels(), &namespace_labels(&h.namespace))), "{}", pod.name_any());
    }

    // 3. This process has no token: it cannot drain a gateway, nor cancel a drain.
    let running = h.kubelet.running();
    let target = running.iter().find(|p| p.name == gateway(GATEWAYS - 1)).expect("the highest gateway").clone();
    let wrong = "Bearer 0000000000000000000000000000000000000000000000000000000000000000";
    for pod in &running {
        for (method, authorization) in
            [("POST", None), ("POST", Some(wrong)), ("DELETE", None), ("DELETE", Some(wrong))]
        {
            let (status, body) = drain_request(pod.admin, method, authorization).await;
            assert_eq!(status, 401, "{method} {} with {authorization:?}: {body}", pod.name);
            assert!(body.contains(r#""error":"unauthorized""#), "{body}");
        }
        let wrong_token = poll::drain(pod.admin, "not-the-token", 10, 100, Duration::from_secs(2)).await;
        assert!(wrong_token.is_err(), "{}: drained with a wrong token", pod.name);
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // a discovery round
    for pod in &running {
        let load = poll::read_load(pod.admin, Duration::from_secs(2)).await.expect("load");
        assert!(load.ready && !load.draining, "{}: {load:?}", pod.name);
    }
    h.wait_listed(GATEWAYS, Duration::from_secs(10)).await;

    // 4. The operator drains (with the token): a rollout starts at the highest gateway.
    let stop = CancellationToken::new();
    let held = hold(&h, &target.url(), &stop).await;
    let uids: Vec<Option<String>> = h.gateway_pods().await.iter().map(|p| p.uid()).collect();
    set_image(&h, NEW_IMAGE).await;
    let first = wait_draining(&h, &target, 2).await;

    // 5. Paused mid-drain: the operator cancels it.
    set_paused(&h, true).await;
    let cancelled_in = wait_cancelled(&h, &target).await;
    let cancels = events(&h, "DrainCancelled").await;
    let expected = format!("cancelled the drain of {} after", target.name);
    assert!(
        cancels.iter().any(|(n, _)| n.starts_with(&expected) && n.contains("(the rollout is paused)")),
        "{cancels:?}"
    );
    let paused = wait_for(Duration::from_secs(10), || async {
        let rollout = h.cluster().await.status?.rollout?;
        (rollout.phase == "Paused").then_some(rollout)
    })
    .await;
    let Some(rollout) = paused else { panic!("not paused: {:?}", h.cluster().await.status) };
    assert_eq!(rollout.updated, 0, "nothing replaced: {rollout:?}");
    tokio::time::sleep(Duration::from_secs(3)).await; // the drain's pace would have moved three more
    let (told, connected) = (held.told_to_move.load(Ordering::SeqCst), held.connected.load(Ordering::SeqCst));
    assert_eq!(told + connected, HELD, "only those told to move left: told {told}, connected {connected}");
    assert!(connected >= HELD - 15, "the clients not yet moved stay: {connected} of {HELD} connected");
    let after_pause = (told, connected);

    // 6. Resumed: drained again; then the spec goes back to the revision it runs: cancelled again.
    set_paused(&h, false).await;
    let second = wait_draining(&h, &target, 1).await;
    set_image(&h, &original_image).await;
    let rolled_back_in = wait_cancelled(&h, &target).await;
    // The second cancel is counted into the first's Event (same reason, same pod).
    let cancels = events(&h, "DrainCancelled").await;
    assert_eq!(cancels.iter().map(|(_, count)| count).sum::<i32>(), 2, "two cancels: {cancels:?}");
    let finished = wait_for(Duration::from_secs(30), || async {
        h.cluster().await.status.filter(|s| s.rollout.is_none()).map(|_| ())
    })
    .await;
    assert!(finished.is_some(), "the rollout did not end; status: {:?}", h.cluster().await.status);
    let after: Vec<Option<String>> = h.gateway_pods().await.iter().map(|p| p.uid()).collect();
    assert_eq!(after, uids, "no gateway was replaced");
    h.wait_listed(GATEWAYS, Duration::from_secs(10)).await;
    let (told, connected) = (held.told_to_move.load(Ordering::SeqCst), held.connected.load(Ordering::SeqCst));
    assert_eq!(told + connected, HELD, "told {told}, connected {connected}");
    println!(
        "admin API: unauthenticated drain and cancel refused on {GATEWAYS} gateways (401); {HELD} clients held on \
         {}; operator's drain 1 moved {} before the pause, cancelled {cancelled_in:?} after it (told to move / \
         still connected 3 s later: {after_pause:?}); drain 2 moved {} before the rollback, cancelled \
         {rolled_back_in:?} after it; at the end told {told}, connected {connected}; DrainCancelled: {cancels:?}",
        target.name, first.moved, second.moved,
    );
    stop.cancel();
    for task in held.tasks {
        let _ = task.await;
    }
    h.stop().await;
}
