//! Draining a gateway under load, with real processes: three gateways, a
//! private Redis, Cassandra, 3,000 clients with steady one-to-one and group
//! traffic. One gateway is drained (through the admin API, then through
//! SIGTERM) with a 10 s window at 100 reconnects/s. Every client it held
//! moves to the other two within the window, never faster than the bound,
//! no acknowledged message is lost, and nothing is stored twice.
//!
//! It measures pacing with 1,000 clients, which needs the machine to
//! itself: `e2e/test.sh` runs it alone, before the suites that share it.
//! kubechat-test: exclusive

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{ClusterSpec, GatewayProcess, PrivateRedis, http_get};
use common::token;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const CLIENTS: usize = 3000;
const SENDERS: usize = 60;
const GROUP_MEMBERS: usize = 20;
const WINDOW_SECONDS: u64 = 10;
const RATE: u64 = 100;

/// What every simulated device saw, shared with the test.
#[derive(Default)]
struct Seen {
    /// Message ids each user got (live or by sync).
    got: HashMap<String, HashSet<String>>,
    /// Live deliveries per (user, id): more than one is a duplicate.
    live: HashMap<(String, String), u32>,
    /// (user, id) acked to senders.
    acked: Vec<(String, String)>,
    /// When each paced `reconnect` frame arrived (since the drain started).
    sent_away: Vec<Duration>,
    /// `reconnect` frames of the deadline's sweep.
    swept: usize,
    /// Connections to the drained gateway that ended without a `reconnect`
    /// frame (a bare close): docs/admin.md promises every client the frame.
    dropped: usize,
    /// Where each user is connected now (a gateway's websocket port).
    at: HashMap<String, u16>,
    /// When a connection to another gateway opened after a move.
    arrived: Vec<Duration>,
    /// `presence_changed` offline notices group members got (a drained
    /// member who reconnects elsewhere within the offline timeout must not flap).
    went_offline: Vec<String>,
    /// How often each id is in each recipient's inbox (the final sync).
    inbox_counts: HashMap<String, HashMap<String, u32>>,
}

struct World {
    seen: Mutex<Seen>,
    ports: Vec<u16>,
    drain_started: Mutex<Option<Instant>>,
}

impl World {
    fn since_drain(&self) -> Option<Duration> {
        self.drain_started.lock().expect("lock").map(|t| t.elapsed())
    }
}

fn user(n: usize) -> String {
    format!("u{n}")
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().and_then(|p| p.split('/').next()).and_then(|p| p.parse().ok()).unwrap_or(0)
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(port: u16, user: &str) -> Option<Socket> {
    let url = format!("ws://127.0.0.1:{port}/v1/ws?token={}", token(user, "phone"));
    tokio_tungstenite::connect_async(url).await.ok().map(|(socket, _)| socket)
}

/// Another gateway by discovery, asked at any gateway that answers.
async fn discovered(world: &World) -> Option<u16> {
    for port in &world.ports {
        if let Some((200, body)) = http_get(*port, "/v1/discovery").await {
            let answer: Value = serde_json::from_str(&body).ok()?;
            return answer["recommended"].as_str().map(port_of);
        }
    }
    None
}

/// What a message a simulated device sends looks like.
fn outgoing(n: usize, seq: u64) -> Value {
    if n == 0 {
        json!({"type":"send","req":format!("g{seq}"),"to":{"group":"GROUP"},"text":"g","key":format!("g-{seq}")})
    } else {
        let to = user(n + CLIENTS / 2);
        json!({"type":"send","req":format!("s{seq}"),"to":{"user":to},"text":"hi","key":format!("{}-{seq}", user(n))})
    }
}

/// One device: connects, syncs, receives, sends (when a sender) one
/// message at a time with a stable key, and follows `reconnect` frames,
/// 1001 closes and dropped connections like a real client.
async fn device(world: Arc<World>, n: usize, group: String, stop: CancellationToken) {
    let me = user(n);
    let mut port = world.ports[n % world.ports.len()];
    let mut cursor = "0".to_string();
    let mut seq = 0_u64;
    let mut outstanding: Option<Value> = None;
    let sender = n < SENDERS;
    let mut moved_at: Option<Duration> = None;
    'connections: while !stop.is_cancelled() {
        let Some(socket) = connect(port, &me).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            port = discovered(&world).await.unwrap_or(port);
            continue;
        };
        if let Some(at) = moved_at.take().and(world.since_drain()) {
            world.seen.lock().expect("lock").arrived.push(at);
        }
        world.seen.lock().expect("lock").at.insert(me.clone(), port);
        let (mut sink, mut stream) = socket.split();
        let sync = json!({"type":"sync","req":"sync","after":cursor});
        if sink.send(Message::Text(sync.to_string().into())).await.is_err() {
            continue;
        }
        if let Some(frame) = &outstanding {
            let _ = sink.send(Message::Text(frame.to_string().into())).await;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(if n == 0 { 500 } else { 1000 }));
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        let mut next_hop: Option<u16> = None;
        let mut told = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => break 'connections,
                _ = tick.tick(), if sender && outstanding.is_none() => {
                    seq += 1;
                    let frame = outgoing(n, seq);
                    let frame: Value = serde_json::from_str(&frame.to_string().replace("GROUP", &group)).expect("frame");
                    // A failed write (the gateway closed) still reads what it
                    // sent before closing (a `reconnect` frame), then ends below.
                    let _ = sink.send(Message::Text(frame.to_string().into())).await;
                    outstanding = Some(frame);
                }
                _ = heartbeat.tick() => {
                    let _ = sink.send(Message::Text(r#"{"type":"heartbeat"}"#.into())).await;
                }
                message = stream.next() => {
                    let frame: Value = match message {
                        Some(Ok(Message::Text(text))) => serde_json::from_str(&text).expect("JSON frame"),
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                        Some(Ok(_)) => continue,
                    };
                    let action = record(&world, &me, &group, &frame, &mut outstanding);
                    match action {
                        Action::Nothing => {}
                        Action::SyncFrom(after) => {
                            let sync = json!({"type":"sync","req":"sync","after":after});
                            let _ = sink.send(Message::Text(sync.to_string().into())).await;
                        }
                        Action::CursorIs(next) => cursor = next,
                        Action::Retry => {
                            if let Some(frame) = &outstanding {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                let _ = sink.send(Message::Text(frame.to_string().into())).await;
                            }
                        }
                        Action::Resync => {
                            let sync = json!({"type":"sync","req":"sync","after":cursor});
                            let _ = sink.send(Message::Text(sync.to_string().into())).await;
                        }
                        Action::MoveTo(hop, delay) => {
                            next_hop = hop;
                            told = true;
                            // Wait for the close that follows (and any reply in flight), then go.
                            tokio::time::sleep(delay).await;
                        }
                    }
                }
            }
        }
        moved_at = Some(Duration::ZERO);
        if !told && port == world.ports[1] && world.since_drain().is_some() {
            world.seen.lock().expect("lock").dropped += 1;
        }
        port = match next_hop {
            Some(port) => port,
            None => discovered(&world).await.unwrap_or(port),
        };
    }
}

/// Every message id in `user`'s inbox, read from the beginning.
async fn sync_everything(port: u16, user: &str) -> Vec<String> {
    let mut socket = connect(port, user).await.expect("connect for the final sync");
    let mut ids = Vec::new();
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
        ids.extend(
            page["entries"]
                .as_array()
                .expect("entries")
                .iter()
                .map(|e| e["message"]["id"].as_str().expect("id").to_string()),
        );
        if page["has_more"] != true {
            return ids;
        }
        after = page["next"].clone();
    }
}

/// What a device does about a frame, once its record is written.
enum Action {
    Nothing,
    SyncFrom(Value),
    CursorIs(String),
    Retry,
    Resync,
    MoveTo(Option<u16>, Duration),
}

/// Notes what `frame` tells about delivery and says what to do next.
fn record(world: &World, me: &str, group: &str, frame: &Value, outstanding: &mut Option<Value>) -> Action {
    let mut seen = world.seen.lock().expect("lock");
    match frame["type"].as_str().unwrap_or_default() {
        "message" => {
            let id = frame["message"]["id"].as_str().expect("id").to_string();
            seen.got.entry(me.to_string()).or_default().insert(id.clone());
            *seen.live.entry((me.to_string(), id)).or_default() += 1;
            Action::Nothing
        }
        "synced" => {
            for entry in frame["entries"].as_array().expect("entries") {
                let id = entry["message"]["id"].as_str().expect("id").to_string();
                seen.got.entry(me.to_string()).or_default().insert(id);
            }
            if frame["has_more"] == true {
                Action::SyncFrom(frame["next"].clone())
            } else {
                Action::CursorIs(frame["cursor"].as_str().expect("cursor").to_string())
            }
        }
        "ack" => {
            if let Some(to) = outstanding.take() {
                let recipient = to["to"]["user"].as_str().map_or_else(|| group.to_string(), str::to_string);
                seen.acked.push((recipient, frame["id"].as_str().expect("id").to_string()));
            }
            Action::Nothing
        }
        // A send refused with a code (storage, rate): retried with the same key.
        "error" if frame["req"].as_str().is_some_and(|r| r != "sync") => Action::Retry,
        "resync" => Action::Resync,
        "presence_changed" if frame["online"] == false => {
            seen.went_offline.push(frame["user"].as_str().unwrap_or_default().to_string());
            Action::Nothing
        }
        "reconnect" => {
            if frame["reason"] == "drain deadline reached" {
                seen.swept += 1;
            } else if let Some(at) = world.since_drain() {
                seen.sent_away.push(at);
            }
            let within = frame["within_ms"].as_u64().unwrap_or(1000);
            let delay = Duration::from_millis(u64::from(rand_u16()) % within.max(1));
            Action::MoveTo(frame["url"].as_str().map(port_of), delay)
        }
        _ => Action::Nothing,
    }
}

fn rand_u16() -> u16 {
    let mut bytes = [0u8; 2];
    getrandom::fill(&mut bytes).expect("randomness");
    u16::from_le_bytes(bytes)
}

/// Messages sent away per whole second since the drain began.
fn per_second(times: &[Duration]) -> Vec<usize> {
    let mut counts = vec![0; times.iter().map(|t| t.as_secs() as usize + 1).max().unwrap_or(0)];
    for t in times {
        counts[t.as_secs() as usize] += 1;
    }
    counts
}

enum How {
    AdminApi,
    Sigterm,
}

/// The two drains under load run one at a time: each alone fills both cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A private Redis and three gateway processes sharing it (and a keyspace).
async fn three_gateways() -> (PrivateRedis, ClusterSpec, Vec<GatewayProcess>) {
    let redis = PrivateRedis::start().await;
    let spec = ClusterSpec::new(redis.url(), 30).await;
    let mut gateways = Vec::new();
    for ordinal in 0..3 {
        gateways.push(GatewayProcess::start(&spec, ordinal).await);
    }
    (redis, spec, gateways)
}

async fn drain_one_of_three(how: How) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (redis, _spec, mut gateways) = three_gateways().await;
    let ports: Vec<u16> = gateways.iter().map(|g| port_of(&g.url())).collect();
    let world = Arc::new(World { seen: Mutex::default(), ports: ports.clone(), drain_started: Mutex::default() });

    // The group: user 0 creates it with members 1..GROUP_MEMBERS.
    let mut owner = connect(ports[0], &user(0)).await.expect("connect");
    let members: Vec<String> = (1..GROUP_MEMBERS).map(user).collect();
    let create = json!({"type":"create_group","req":"c","name":"drain","members":members});
    owner.send(Message::Text(create.to_string().into())).await.expect("send");
    let group = loop {
        let Some(Ok(Message::Text(text))) = owner.next().await else { panic!("no group reply") };
        let frame: Value = serde_json::from_str(&text).expect("json");
        if frame["type"] == "group" {
            break frame["group"]["id"].as_str().expect("group id").to_string();
        }
    };
    drop(owner);

    let stop = CancellationToken::new();
    let mut devices = Vec::new();
    for n in 0..CLIENTS {
        devices.push(tokio::spawn(device(world.clone(), n, group.clone(), stop.clone())));
        if n % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let connected = Instant::now();
    while world.seen.lock().expect("lock").at.len() < CLIENTS {
        assert!(connected.elapsed() < Duration::from_secs(60), "not every client connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // steady traffic first
    let drained_port = ports[1];
    let held = world.seen.lock().expect("lock").at.values().filter(|p| **p == drained_port).count();

    *world.drain_started.lock().expect("lock") = Some(Instant::now());
    let started = Instant::now();
    match how {
        How::AdminApi => {
            let body = format!(r#"{{"deadlineSeconds":{WINDOW_SECONDS},"maxReconnectsPerSecond":{RATE}}}"#);
            let (status, answer) = gateways[1].admin_post("/v1/admin/drain", &body).await.expect("drain");
            assert_eq!(status, 202, "{answer}");
            let (again, _) = gateways[1].admin_post("/v1/admin/drain", "{}").await.expect("drain again");
            assert_eq!(again, 200, "a second call does not restart the drain");
            let (status, readyz) = gateways[1].admin_get("/readyz").await.expect("readyz");
            assert_eq!(status, 503, "draining is not ready: {readyz}");
            let refused = connect(drained_port, "latecomer").await;
            assert!(refused.is_none(), "a draining gateway accepts no new connection");
            let (_, discovery) = http_get(ports[0], "/v1/discovery").await.expect("discovery");
            assert!(
                !discovery.contains(&format!(":{drained_port}/")),
                "a draining gateway is recommended: {discovery}"
            );
        }
        How::Sigterm => gateways[1].terminate(),
    }

    // Everyone it held is elsewhere within the window.
    let moved_by = loop {
        let left = world.seen.lock().expect("lock").at.values().filter(|p| **p == drained_port).count();
        if left == 0 {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(WINDOW_SECONDS + 3),
            "{left} of {held} clients still on the drained gateway"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let progress = match how {
        How::AdminApi => {
            let (_, body) = gateways[1].admin_get("/v1/admin/drain").await.expect("progress");
            Some(serde_json::from_str::<Value>(&body).expect("progress JSON"))
        }
        How::Sigterm => {
            let status = gateways[1].wait_exit(Duration::from_secs(WINDOW_SECONDS + 10)).await;
            assert!(status.is_some_and(|s| s.success()), "the gateway exits cleanly after its drain: {status:?}");
            None
        }
    };
    tokio::time::sleep(Duration::from_secs(2)).await; // traffic after the move
    stop.cancel();
    for device in devices {
        device.await.expect("device task");
    }

    // A final sync by every recipient, as on its next start.
    let recipients_of = |recipient: &str| -> Vec<String> {
        // The sender's own connection gets the ack, not the message.
        if recipient.starts_with("g:") { (1..GROUP_MEMBERS).map(user).collect() } else { vec![recipient.to_string()] }
    };
    let everyone: HashSet<String> =
        world.seen.lock().expect("lock").acked.iter().flat_map(|(r, _)| recipients_of(r)).collect();
    for recipient in everyone {
        let ids = sync_everything(ports[0], &recipient).await;
        let mut seen = world.seen.lock().expect("lock");
        let counts = seen.inbox_counts.entry(recipient.clone()).or_default();
        for id in &ids {
            *counts.entry(id.clone()).or_default() += 1;
        }
        seen.got.entry(recipient).or_default().extend(ids);
    }
    let seen = world.seen.lock().expect("lock");
    let mut lost = Vec::new();
    for (recipient, id) in &seen.acked {
        let recipients = recipients_of(recipient);
        for r in recipients {
            if !seen.got.get(&r).is_some_and(|ids| ids.contains(id)) {
                lost.push((r, id.clone()));
            }
        }
    }
    let duplicates = seen.live.values().filter(|c| **c > 1).count();
    let away = per_second(&seen.sent_away);
    let arrivals = per_second(&seen.arrived);
    let server_max = progress.as_ref().map(|p| p["observedMaxPerSecond"].clone());
    println!(
        "drain: {held} clients moved in {moved_by:?}; paced reconnect frames per second {away:?} (server max \
         {server_max:?}), {} sent away at the deadline, {} closed without a frame; arrivals elsewhere per second \
         {arrivals:?}; acked {}; lost {}; live duplicates {duplicates}; offline flaps {}",
        seen.swept,
        seen.dropped,
        seen.acked.len(),
        lost.len(),
        seen.went_offline.len()
    );
    assert!(held > 500, "the drained gateway held too few clients to show anything: {held}");
    assert!(seen.acked.len() > 100, "too little traffic: {}", seen.acked.len());
    assert!(lost.is_empty(), "acked messages lost: {:?}", &lost[..lost.len().min(10)]);
    // The pace reaches its bound: the window sends away what the bound allows
    // (a pace of ~90 % of it left a tenth of the clients for the deadline).
    let pace_allows = held.min((RATE * WINDOW_SECONDS) as usize);
    assert!(
        seen.sent_away.len() * 100 >= pace_allows * 95,
        "{} paced reconnect frames of the {pace_allows} the bound allows within the window: {away:?}\n{}",
        seen.sent_away.len(),
        gateways[1].log_matching(&["drain"])
    );
    // Admin drain or SIGTERM, every client is told where to go, the deadline's too.
    assert_eq!(seen.dropped, 0, "clients closed without a reconnect frame ({} got the deadline's)", seen.swept);
    // The window, then whoever the deadline sent away reconnects within a
    // second (plus the time a busy 2-core machine takes to schedule it).
    assert!(moved_by <= Duration::from_secs(WINDOW_SECONDS + 3), "moved in {moved_by:?}");
    // The server never sends more than the bound within one of its seconds.
    if let Some(max) = server_max {
        assert!(max.as_u64().is_some_and(|m| m <= RATE), "server sent {max} away in one second");
    }
    // Clients' receipt times also carry this busy test process's scheduling
    // (3,000 clients on 2 cores): a starved second delivers late and the next
    // catches up. So the receipts are held to the pace over every prefix of
    // the drain (a quarter more), and any single second to twice the bound:
    // a storm (everyone at once) fails both.
    let mut received = 0;
    for (second, count) in away.iter().enumerate() {
        received += *count as u64;
        let allowed = RATE * (second as u64 + 1) * 5 / 4;
        assert!(
            received <= allowed,
            "{received} reconnect frames by second {second} (pace allows {allowed}): {away:?}"
        );
    }
    assert!(away.iter().all(|c| *c as u64 <= RATE * 2), "reconnect frames per second {away:?}");
    // Stored once: every recipient's inbox holds each message once.
    for (recipient, ids) in &seen.inbox_counts {
        let twice: Vec<&String> = ids.iter().filter(|(_, n)| **n > 1).map(|(id, _)| id).collect();
        assert!(twice.is_empty(), "{recipient}'s inbox holds {twice:?} more than once");
    }
    assert!(seen.at.values().all(|p| *p != drained_port), "someone is still on the drained gateway");
    assert!(seen.went_offline.is_empty(), "presence flapped for {:?}", seen.went_offline);
    drop(seen);
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_gateway_moves_its_clients_at_the_bound_without_loss() {
    drain_one_of_three(How::AdminApi).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_too() {
    drain_one_of_three(How::Sigterm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_drain_requests_are_refused_and_load_answers_while_stopping() {
    let redis = PrivateRedis::start().await;
    let spec = ClusterSpec::new(redis.url(), 30).await;
    let mut gateway = GatewayProcess::start(&spec, 0).await;
    for body in [
        r#"{"deadlineSeconds":-1}"#,
        r#"{"deadlineSeconds":999999999}"#,
        r#"{"maxReconnectsPerSecond":0}"#,
        r#"{"deadlineSeconds":"soon"}"#,
        r#"{"deadline":10}"#,
        "not json",
    ] {
        let (status, answer) = gateway.admin_post("/v1/admin/drain", body).await.expect("answer");
        assert_eq!(status, 400, "{body} → {answer}");
        let answer: Value = serde_json::from_str(&answer).expect("JSON error");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
    }
    let (_, progress) = gateway.admin_get("/v1/admin/drain").await.expect("progress");
    assert!(progress.contains(r#""draining":false"#), "a refused drain starts nothing: {progress}");

    let (status, load) = gateway.admin_get("/v1/admin/load").await.expect("load");
    assert_eq!(status, 200);
    let load: Value = serde_json::from_str(&load).expect("load JSON");
    assert_eq!(load["pod"], "gw-0");
    assert_eq!(load["ready"], true);
    assert_eq!(load["backends"], json!({"redis":"up","store":"up"}));
    assert!(load["startedAt"].as_str().is_some_and(|t| t.ends_with('Z')), "{load}");

    // A client holds the gateway in its drain; the load still answers meanwhile.
    let _client = connect(port_of(&gateway.url()), "holder").await.expect("connect");
    let (status, _) = gateway.admin_post("/v1/admin/drain", r#"{"deadlineSeconds":3}"#).await.expect("drain");
    assert_eq!(status, 202);
    let (status, load) = gateway.admin_get("/v1/admin/load").await.expect("load while draining");
    assert_eq!(status, 200);
    assert!(load.contains(r#""draining":true"#) && load.contains(r#""ready":false"#), "{load}");
    gateway.terminate();
    let exited = gateway.wait_exit(Duration::from_secs(10)).await;
    assert!(exited.is_some(), "the drained gateway exits on SIGTERM");
}

/// The gateways (ports) `GET /v1/discovery` at `port` lists, and its pick.
async fn discovery_at(port: u16) -> (Vec<Value>, Option<u16>) {
    let (status, body) = http_get(port, "/v1/discovery").await.expect("discovery answers");
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("discovery JSON");
    let listed = answer["gateways"].as_array().cloned().unwrap_or_default();
    (listed, answer["recommended"].as_str().map(port_of))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_spreads_a_burst_follows_load_and_skips_a_draining_gateway() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (redis, _spec, gateways) = three_gateways().await;
    let ports: Vec<u16> = gateways.iter().map(|g| port_of(&g.url())).collect();
    let waited = Instant::now();
    for port in &ports {
        while discovery_at(*port).await.0.len() < 3 {
            assert!(waited.elapsed() < Duration::from_secs(10), "a gateway does not list all three");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // 1,000 clients asking at once-ish, at every gateway: spread within ±20 %.
    let mut picks: HashMap<u16, usize> = HashMap::new();
    for n in 0..1000 {
        let picked = discovery_at(ports[n % 3]).await.1.expect("a recommendation");
        *picks.entry(picked).or_default() += 1;
    }
    println!("discovery picks over 1,000 calls: {picks:?}");
    for port in &ports {
        let count = picks.get(port).copied().unwrap_or(0);
        assert!((267..=400).contains(&count), "gateway :{port} picked {count} times of 1,000: {picks:?}");
    }

    // Connections show in the others' answers within a renewal (2 s).
    let mut clients = Vec::new();
    for n in 0..5 {
        clients.push(connect(ports[0], &user(n)).await.expect("connect"));
    }
    let connections_seen_at_1 = |listed: &[Value]| {
        listed
            .iter()
            .find(|g| port_of(g["url"].as_str().unwrap_or_default()) == ports[0])
            .map(|g| g["connections"].clone())
    };
    let connected = Instant::now();
    while connections_seen_at_1(&discovery_at(ports[1]).await.0) != Some(json!(5)) {
        assert!(connected.elapsed() < Duration::from_secs(4), "5 connections not seen from another gateway");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(clients);
    let left = Instant::now();
    while connections_seen_at_1(&discovery_at(ports[1]).await.0) != Some(json!(0)) {
        assert!(left.elapsed() < Duration::from_secs(4), "disconnects not seen from another gateway");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Draining: at once, no gateway recommends it (its own answer included).
    let (status, _) = gateways[2].admin_post("/v1/admin/drain", r#"{"deadlineSeconds":5}"#).await.expect("drain");
    assert_eq!(status, 202);
    let drained = Instant::now();
    loop {
        let answers = [discovery_at(ports[0]).await, discovery_at(ports[1]).await, discovery_at(ports[2]).await];
        if answers.iter().all(|(listed, pick)| *pick != Some(ports[2]) && listed.len() == 2) {
            break;
        }
        assert!(drained.elapsed() < Duration::from_secs(3), "the draining gateway is still recommended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen_within = drained.elapsed();
    for n in 0..200 {
        let (_, pick) = discovery_at(ports[n % 3]).await;
        assert_ne!(pick, Some(ports[2]), "a draining gateway was recommended");
    }
    println!("draining seen by every gateway's discovery within {seen_within:?}");
    drop(redis);
}

/// An idle keep-alive HTTP connection on the client port (a discovery
/// poller) does not hold SIGTERM's exit: the drain ends (nobody to move),
/// idle connections close, the process exits. It used to wait ~10 s more
/// for the client to hang up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_when_its_drain_ends_though_an_http_client_keeps_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let redis = PrivateRedis::start().await;
    let spec = ClusterSpec::new(redis.url(), 30).await;
    let mut gateway = GatewayProcess::start(&spec, 0).await;
    let mut poller = tokio::net::TcpStream::connect(("127.0.0.1", port_of(&gateway.url()))).await.expect("connect");
    poller.write_all(b"GET /v1/discovery HTTP/1.1\r\nHost: localhost\r\n\r\n").await.expect("request");
    let mut answer = vec![0_u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), poller.read(&mut answer)).await;
    let read = read.expect("discovery answers within 5 s").expect("read");
    assert!(answer[..read].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer[..read]));

    let terminated = Instant::now();
    gateway.terminate();
    let exited = gateway.wait_exit(Duration::from_secs(15)).await;
    let took = terminated.elapsed();
    println!("SIGTERM with an idle keep-alive connection: exited after {took:?}");
    assert!(exited.is_some_and(|s| s.success()), "no clean exit within 15 s: {exited:?}");
    assert!(took < Duration::from_secs(3), "the keep-alive connection held the exit for {took:?}");
    // The poller's connection was closed by the gateway, not left open.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(1), poller.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the idle connection is still open after the exit");
    drop(redis);
}
