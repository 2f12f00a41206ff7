//! Push workers against a real Redis (`KUBECHAT_REDIS_URL`, default 127.0.0.1:16379) and a
//! webhook receiver (hyper, on 127.0.0.1:0) in the test. Each test uses a stream, dead-letter
//! stream, users and message ids of its own, so tests run in parallel without seeing each
//! other's jobs, and removes its keys at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use common::cluster::{ClusterClient, ClusterSpec, GatewayProcess, PrivateRedis, free_port, http_get};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kubechat_push::{
    self as push, ApnsConfig, FcmConfig, PUSH_STREAM, Platform, ProvidersConfig, PushJob, PushMetrics, PushTarget,
    PushWorkerConfig, SecretSource, WebhookConfig,
};
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const KEY: &str = "webhook-test-signing-key-0123456789";
const WAIT: Duration = Duration::from_secs(15);

fn redis_url() -> String {
    std::env::var("KUBECHAT_REDIS_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:16379".into())
}

async fn redis() -> ConnectionManager {
    let client = redis::Client::open(redis_url()).expect("Redis URL");
    tokio::time::timeout(Duration::from_secs(5), ConnectionManager::new(client))
        .await
        .expect("Redis answers in time (start it: bash e2e/local/redis.sh start)")
        .expect("Redis is up (start it: bash e2e/local/redis.sh start)")
}

fn unique() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        kubechat_gateway::ids::now_ms() % 100_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn message_id() -> String {
    (getrandom::u64().expect("randomness") >> 1).to_string()
}

async fn poll_until<F: FnMut() -> bool>(what: &str, mut done: F) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------- receiver --

#[derive(Clone, Debug)]
struct Received {
    path: String,
    status: u16,
    headers: BTreeMap<String, String>,
    body: Bytes,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

#[derive(Default)]
struct ReceiverState {
    requests: Mutex<Vec<Received>>,
    /// Requests to `/ok` answered 500 before the first 200.
    fail_first: AtomicUsize,
}

/// A webhook receiver. Paths: `/ok` (200, after `fail_first` 500s), `/status/{code}`,
/// `/stall` (never answers), `/token` (an OAuth token response).
struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
    task: JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let state = Arc::new(ReceiverState::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| handle(state.clone(), request));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { url, state, task }
    }

    fn requests(&self) -> Vec<Received> {
        self.state.requests.lock().expect("lock").clone()
    }

    fn on(&self, path: &str) -> Vec<Received> {
        self.requests().into_iter().filter(|r| r.path == path).collect()
    }

    fn delivered(&self) -> Vec<Received> {
        self.requests().into_iter().filter(|r| r.status == 200 && r.path != "/token").collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(state: Arc<ReceiverState>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path = parts.uri.path().to_string();
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), value.to_str().unwrap_or_default().to_string()))
        .collect();
    let status = if path == "/stall" {
        0
    } else if let Some(code) = path.strip_prefix("/status/") {
        code.split('/').next().and_then(|c| c.parse().ok()).unwrap_or(500)
    } else if state.fail_first.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
        500
    } else {
        200
    };
    state.requests.lock().expect("lock").push(Received { path: path.clone(), status, headers, body });
    if status == 0 {
        // A receiver that hangs: the worker sending here is killed before it times out.
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
    let body = if path == "/token" {
        json!({"access_token": "access-token-1", "expires_in": 3600, "token_type": "Bearer"}).to_string()
    } else if status == 200 {
        "{}".to_string()
    } else {
        format!(r#"{{"error":"status {status}"}}"#)
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status.max(200)).unwrap_or(hyper::StatusCode::OK);
    Ok(response)
}

fn valid_signature(request: &Received) -> bool {
    let Some(signature) = request.headers.get("x-kubechat-signature") else { return false };
    let Some(hex) = signature.strip_prefix("sha256=") else { return false };
    let Ok(expected) = (0..hex.len())
        .step_by(2)
        .map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()).ok_or(()))
        .collect::<Result<Vec<u8>, ()>>()
    else {
        return false;
    };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(KEY.as_bytes()).expect("any key length");
    mac.update(&request.body);
    mac.verify_slice(&expected).is_ok()
}

// -------------------------------------------------------------- fixture --

/// A test's own stream, dead-letter stream and users.
struct Fixture {
    tag: String,
    redis: ConnectionManager,
    stream: String,
    dead: String,
    /// Keys to remove at the end.
    keys: Mutex<Vec<String>>,
}

impl Fixture {
    async fn new() -> Self {
        let tag = unique();
        Self {
            stream: format!("kubechat:test:push:{tag}"),
            dead: format!("kubechat:test:push:{tag}:dead"),
            tag,
            redis: redis().await,
            keys: Mutex::new(Vec::new()),
        }
    }

    fn user(&self, name: &str) -> String {
        let user = format!("{name}-{}", self.tag);
        self.keys.lock().expect("lock").push(push::targets_key(&user));
        user
    }

    fn config(&self, consumer: &str, webhook_url: &str) -> PushWorkerConfig {
        PushWorkerConfig {
            redis: kubechat_config::Redis::single(redis_url(), None),
            stream: self.stream.clone(),
            partitions: 1,
            dead_letter_stream: self.dead.clone(),
            consumer_name: consumer.into(),
            max_attempts: 5,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(40),
            claim_idle: Duration::from_millis(600),
            claim_interval: Duration::from_millis(100),
            batch_size: 10,
            block: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(1),
            providers: ProvidersConfig {
                webhook: Some(WebhookConfig {
                    include_text: true,
                    ..WebhookConfig::new(webhook_url, SecretSource::Value(KEY.into()))
                }),
                ..ProvidersConfig::default()
            },
            ..PushWorkerConfig::default()
        }
    }

    async fn register(&self, user: &str, device: &str, platform: Platform, token: &str) {
        let mut conn = self.redis.clone();
        push::register_target(&mut conn, user, &PushTarget::new(device, platform, token)).await.expect("register");
    }

    /// XADDs a job as the gateway does; returns the job.
    async fn enqueue(&self, user: &str, message_id: &str) -> PushJob {
        let job = PushJob {
            user: user.into(),
            message_id: message_id.into(),
            channel: format!("dm:alice-{}:{user}", self.tag),
            sender: format!("alice-{}", self.tag),
            summary: format!("hello {message_id}"),
        };
        self.enqueue_job(&job).await;
        job
    }

    async fn enqueue_job(&self, job: &PushJob) {
        self.enqueue_job_on(&self.stream, job).await;
    }

    /// Queues `job` on `stream` (a partition of the test's stream).
    async fn enqueue_job_on(&self, stream: &str, job: &PushJob) {
        let mut conn = self.redis.clone();
        let payload = serde_json::to_string(job).expect("json");
        let _: String =
            redis::cmd("XADD").arg(stream).arg("*").arg("job").arg(payload).query_async(&mut conn).await.expect("XADD");
        let mut keys = self.keys.lock().expect("lock");
        keys.push(push::pushed_key(&self.stream, &job.message_id, "*"));
    }

    /// Entries delivered to the group and not acked.
    async fn pending(&self) -> usize {
        let mut conn = self.redis.clone();
        let reply: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg("push-workers")
            .query_async(&mut conn)
            .await
            .expect("XPENDING");
        reply.count()
    }

    async fn dead_letters(&self) -> Vec<BTreeMap<String, String>> {
        let mut conn = self.redis.clone();
        let reply: redis::streams::StreamRangeReply =
            redis::cmd("XRANGE").arg(&self.dead).arg("-").arg("+").query_async(&mut conn).await.expect("XRANGE");
        reply
            .ids
            .iter()
            .map(|entry| {
                entry.map.keys().map(|field| (field.clone(), entry.get::<String>(field).unwrap_or_default())).collect()
            })
            .collect()
    }

    /// Attempt-count hashes left for this stream.
    async fn attempt_keys(&self) -> Vec<String> {
        let mut conn = self.redis.clone();
        redis::cmd("KEYS").arg(format!("{}-attempts:*", self.stream)).query_async(&mut conn).await.expect("KEYS")
    }

    async fn cleanup(self) {
        let mut conn = self.redis.clone();
        let mut keys = self.keys.lock().expect("lock").clone();
        let mut patterns = Vec::new();
        for key in keys.iter().filter(|k| k.ends_with(":*")) {
            patterns.push(key.clone());
        }
        keys.retain(|k| !k.ends_with(":*"));
        for pattern in patterns {
            let found: Vec<String> = redis::cmd("KEYS").arg(pattern).query_async(&mut conn).await.unwrap_or_default();
            keys.extend(found);
        }
        keys.extend(self.attempt_keys().await);
        keys.push(self.stream.clone());
        keys.push(self.dead.clone());
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
    }
}

struct Worker {
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
    metrics: PushMetrics,
}

impl Worker {
    fn start(config: PushWorkerConfig) -> Self {
        let providers = push::Providers::from_config(&config.providers).expect("providers");
        let metrics = PushMetrics::new();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(push::run_push_worker_with(config, providers, metrics.clone(), shutdown.clone()));
        Self { shutdown, handle, metrics }
    }

    /// Cancels and checks the worker returns promptly and cleanly; its
    /// metrics are final then.
    async fn stop(self) -> PushMetrics {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(5), self.handle).await;
        let result = result.expect("the worker stops within 5 s").expect("the worker task ends normally");
        result.expect("the worker returns Ok");
        self.metrics
    }
}

fn deliveries_by(received: &[Received]) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for request in received {
        let body = request.json();
        let key = (
            body["message_id"].as_str().unwrap_or_default().to_string(),
            body["device"].as_str().unwrap_or_default().to_string(),
        );
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

// ---------------------------------------------------------------- tests --

#[tokio::test]
async fn an_offline_recipient_gets_one_signed_webhook_per_job() {
    let fx = Fixture::new().await;
    let receiver = Receiver::start().await;
    let bob = fx.user("bob");
    fx.register(&bob, "phone", Platform::Webhook, "opaque-token").await;
    let mut jobs = Vec::new();
    for _ in 0..3 {
        jobs.push(fx.enqueue(&bob, &message_id()).await);
    }
    let worker = Worker::start(fx.config("w1", &format!("{}/ok", receiver.url)));

    poll_until("3 webhook POSTs", || receiver.delivered().len() >= 3).await;
    poll_until("3 jobs acked", || worker.metrics.jobs_processed.get() >= 3).await;
    // Stopped, the worker can send nothing more: the count below is final.
    let metrics = worker.stop().await;
    let received = receiver.requests();
    assert_eq!(received.len(), 3, "exactly one POST per job: {received:?}");
    let mut ids = BTreeSet::new();
    for request in &received {
        assert!(valid_signature(request), "bad signature on {request:?}");
        assert_eq!(request.headers.get("content-type").map(String::as_str), Some("application/json"));
        let body = request.json();
        let job = jobs.iter().find(|j| j.message_id == body["message_id"]).expect("a job we sent");
        assert_eq!(
            body,
            json!({"user": bob, "device": "phone", "message_id": job.message_id, "channel": job.channel,
                   "sender": job.sender, "summary": job.summary})
        );
        assert_eq!(request.headers.get("x-kubechat-delivery"), Some(&format!("{}:phone", job.message_id)));
        ids.insert(job.message_id.clone());
    }
    assert_eq!(ids.len(), 3);
    assert_eq!(fx.pending().await, 0, "every entry is acked");
    assert!(fx.attempt_keys().await.is_empty(), "attempt counts are removed with the ack");
    assert!(fx.dead_letters().await.is_empty());
    assert_eq!(metrics.deliveries.with_label_values(&["webhook"]).get(), 3);
    assert!(metrics.render().contains("kubechat_push_jobs_processed_total 3"));
    fx.cleanup().await;
}

#[tokio::test]
async fn partitioned_streams_and_an_earlier_versions_stream_are_all_consumed() {
    let fx = Fixture::new().await;
    let receiver = Receiver::start().await;
    let bob = fx.user("bob");
    fx.register(&bob, "phone", Platform::Webhook, "opaque-token").await;
    // One job on the unpartitioned stream (as an earlier version queued it),
    // one on each of two partitions.
    let legacy = fx.enqueue(&bob, &message_id()).await;
    let partitions = push::partition_streams(&fx.stream, 2);
    let mut conn = fx.redis.clone();
    let mut queued = vec![legacy.message_id.clone()];
    for stream in &partitions {
        let job = PushJob { message_id: message_id(), ..legacy.clone() };
        fx.enqueue_job_on(stream, &job).await;
        queued.push(job.message_id);
    }
    let config = PushWorkerConfig { partitions: 2, ..fx.config("w1", &format!("{}/ok", receiver.url)) };
    let worker = Worker::start(config);
    poll_until("3 webhook POSTs", || receiver.delivered().len() >= 3).await;
    let _ = worker.stop().await;
    let mut sent: Vec<String> =
        receiver.requests().iter().map(|r| r.json()["message_id"].as_str().unwrap_or_default().to_string()).collect();
    sent.sort();
    queued.sort();
    assert_eq!(sent, queued, "each job once, from every stream");
    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&partitions).query_async(&mut conn).await;
    fx.cleanup().await;
}

#[tokio::test]
async fn each_device_is_notified_once_per_message() {
    let fx = Fixture::new().await;
    let receiver = Receiver::start().await;
    let bob = fx.user("bob");
    let carol = fx.user("carol");
    fx.register(&bob, "phone", Platform::Webhook, "t1").await;
    fx.register(&bob, "laptop", Platform::Webhook, "t2").await;
    let first = fx.enqueue(&bob, &message_id()).await;
    let second = fx.enqueue(&bob, &message_id()).await;
    fx.enqueue(&carol, &message_id()).await; // no devices: skipped
    let worker = Worker::start(fx.config("w1", &format!("{}/ok", receiver.url)));

    poll_until("3 jobs done", || worker.metrics.jobs_processed.get() >= 3).await;
    let counts = deliveries_by(&receiver.delivered());
    assert_eq!(counts.len(), 4, "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    for job in [&first, &second] {
        for device in ["phone", "laptop"] {
            assert!(counts.contains_key(&(job.message_id.clone(), device.to_string())));
        }
    }
    assert_eq!(worker.metrics.jobs_skipped.get(), 1, "the user without devices is skipped");

    // The same message enqueued again (a gateway retry): nothing new is sent.
    fx.enqueue_job(&first).await;
    poll_until("the repeated job done", || worker.metrics.jobs_processed.get() >= 4).await;
    let metrics = worker.stop().await;
    assert_eq!(receiver.requests().len(), 4, "no second notification for the same (message, device)");
    assert_eq!(metrics.duplicates.get(), 2);
    assert_eq!(fx.pending().await, 0);
    fx.cleanup().await;
}

#[tokio::test]
async fn targets_register_replace_and_unregister() {
    let fx = Fixture::new().await;
    let mut conn = fx.redis.clone();
    let bob = fx.user("bob");
    assert!(push::targets(&mut conn, &bob).await.expect("targets").is_empty());
    fx.register(&bob, "phone", Platform::Fcm, "old").await;
    fx.register(&bob, "phone", Platform::Fcm, "new").await;
    fx.register(&bob, "ipad", Platform::Apns, "abcd").await;
    let targets = push::targets(&mut conn, &bob).await.expect("targets");
    assert_eq!(
        targets,
        vec![PushTarget::new("ipad", Platform::Apns, "abcd"), PushTarget::new("phone", Platform::Fcm, "new")]
    );
    // What the gateway stores is what the design names.
    let raw: String =
        redis::cmd("HGET").arg(push::targets_key(&bob)).arg("phone").query_async(&mut conn).await.expect("HGET");
    assert_eq!(serde_json::from_str::<Value>(&raw).expect("json"), json!({"platform": "fcm", "token": "new"}));
    assert!(push::unregister_target(&mut conn, &bob, "phone").await.expect("unregister"));
    assert!(!push::unregister_target(&mut conn, &bob, "phone").await.expect("unregister"));
    assert_eq!(push::targets(&mut conn, &bob).await.expect("targets").len(), 1);
    let bad = PushTarget::new("no:colons", Platform::Webhook, "t");
    assert!(push::register_target(&mut conn, &bob, &bad).await.is_err());
    for i in 1..push::MAX_TARGETS_PER_USER {
        fx.register(&bob, &format!("d{i}"), Platform::Webhook, "t").await;
    }
    let one_too_many = PushTarget::new("extra", Platform::Webhook, "t");
    assert!(matches!(push::register_target(&mut conn, &bob, &one_too_many).await, Err(push::PushTargetError::TooMany)));
    fx.cleanup().await;
}

#[tokio::test]
async fn transient_failures_are_retried_until_delivered() {
    let fx = Fixture::new().await;
    let receiver = Receiver::start().await;
    receiver.state.fail_first.store(3, Ordering::SeqCst);
    let bob = fx.user("bob");
    fx.register(&bob, "phone", Platform::Webhook, "t").await;
    let job = fx.enqueue(&bob, &message_id()).await;
    let worker = Worker::start(fx.config("w1", &format!("{}/ok", receiver.url)));

    poll_until("the job done", || worker.metrics.jobs_processed.get() >= 1).await;
    let metrics = worker.stop().await;
    let statuses: Vec<u16> = receiver.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 500, 200], "three failures, then one delivery");
    assert!(receiver.requests().iter().all(valid_signature));
    let delivered = receiver.delivered();
    assert_eq!(delivered[0].json()["message_id"], job.message_id.as_str());
    assert!(fx.dead_letters().await.is_empty(), "nothing dead-lettered");
    assert_eq!(fx.pending().await, 0);
    assert_eq!(metrics.failed_attempts.with_label_values(&["webhook", "transient"]).get(), 3);
    fx.cleanup().await;
}

#[tokio::test]
async fn a_job_that_keeps_failing_is_dead_lettered_after_max_attempts() {
    let fx = Fixture::new().await;
    let receiver = Receiver::start().await;
    let bob = fx.user("bob");
    fx.register(&bob, "phone", Platform::Webhook, "t").await;
    let job = fx.enqueue(&bob, &message_id()).await;
    let config = PushWorkerConfig { max_attempts: 3, ..fx.config("w1", &format!("{}/status/503", receiver.url)) };
    let worker = Worker::start(config);

    poll_until("the job done", || worker.metrics.jobs_processed.get() >= 1).await;
    assert_eq!(receiver.on("/status/503").len(), 3, "max_attempts sends");
    let dead = fx.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["device"], "phone");
    assert_eq!(dead[0]["user"], bob);
    assert_eq!(dead[0]["platform"], "webhook");
    assert_eq!(dead[0]["attempts"], "3");
    assert!(dead[0]["error"].contains("HTTP 503"), "{:?}", dead[0]["error"]);
    assert_eq!(serde_json::from_str::<PushJob>(&dead[0]["job"]).expect("the job"), job);
    assert_eq!(fx.pending().await, 0, "acked");
    assert!(fx.attempt_keys().await.is_empty());
    worker.stop().await;

    // A permanent error (4xx) is dead-lettered at once.
    let receiver = Receiver::start().await;
    let carol = fx.user("carol");
    fx.register(&carol, "phone", Platform::Webhook, "t").await;
    fx.enqueue(&carol, &message_id()).await;
    let worker = Worker::start(fx.config("w2", &format!("{}/status/400", receiver.url)));
    poll_until("the job done", || worker.metrics.jobs_processed.get() >= 1).await;
    assert_eq!(receiver.requests().len(), 1, "no retry of a 400");
    let dead = fx.dead_letters().await;
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[1]["attempts"], "1");
    assert!(dead[1]["error"].contains("HTTP 400"));
    assert_eq!(fx.pending().await, 0);
    worker.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_jobs_are_claimed_and_delivered_once() {
    let fx = Fixture::new().await;
    let receiver = Receiver::start().await;
    let bob = fx.user("bob");
    fx.register(&bob, "phone", Platform::Webhook, "t1").await;
    fx.register(&bob, "laptop", Platform::Webhook, "t2").await;
    let mut jobs = Vec::new();
    for _ in 0..6 {
        jobs.push(fx.enqueue(&bob, &message_id()).await);
    }
    let config = |consumer: &str, path: &str| PushWorkerConfig {
        claim_idle: Duration::from_secs(1),
        ..fx.config(consumer, &format!("{}{path}", receiver.url))
    };
    // The first worker's sends hang: it has read the entries but will never ack them.
    let first = Worker::start(config("w1", "/stall"));
    poll_until("w1 to send all 12", || receiver.on("/stall").len() >= 12).await;
    assert_eq!(fx.pending().await, 6, "w1 holds every entry");

    // A second worker does not take entries w1 is still working on (w1 renews them)...
    let second = Worker::start(config("w2", "/ok"));
    // A sleep on purpose: this asserts that something does NOT happen. In
    // 2.5 s (2.5 × claim_idle) w2 makes 25 claim passes (claim_interval
    // 100 ms), any of which would take an entry w1 had stopped renewing.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!second.handle.is_finished(), "w2 ran all along");
    assert!(receiver.on("/ok").is_empty(), "w2 must not steal live work");

    // ...but once w1 dies mid-batch, w2 claims its pending entries.
    first.handle.abort();
    let _ = first.handle.await;
    poll_until("12 deliveries by w2", || receiver.delivered().len() >= 12).await;
    poll_until("6 entries acked", || second.metrics.jobs_processed.get() >= 6).await;
    // Both workers are gone now: the counts below are final.
    let metrics = second.stop().await;
    let counts = deliveries_by(&receiver.delivered());
    assert_eq!(counts.len(), 12, "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "exactly once per (message, device): {counts:?}");
    for job in &jobs {
        for device in ["phone", "laptop"] {
            assert_eq!(counts.get(&(job.message_id.clone(), device.to_string())), Some(&1));
        }
    }
    assert_eq!(metrics.claimed.get(), 6);
    assert_eq!(fx.pending().await, 0);
    assert!(fx.attempt_keys().await.is_empty());
    assert!(fx.dead_letters().await.is_empty());
    fx.cleanup().await;
}

const TEST_RSA_KEY: &str = include_str!("../../push/src/testdata/rsa-test-key.pem");
const TEST_EC_KEY: &str = include_str!("../../push/src/testdata/ec-test-key.p8");

#[tokio::test]
async fn fcm_and_apns_requests_go_to_configurable_hosts() {
    let fx = Fixture::new().await;
    let receiver = Receiver::start().await;
    let bob = fx.user("bob");
    fx.register(&bob, "pixel", Platform::Fcm, "fcm-registration-token").await;
    fx.register(&bob, "iphone", Platform::Apns, "00fa11").await;
    fx.register(&bob, "pager", Platform::Webhook, "t").await; // no webhook configured here
    let job = fx.enqueue(&bob, &message_id()).await;
    let service_account = json!({
        "type": "service_account",
        "client_email": "push@test-project.iam.gserviceaccount.com",
        "private_key": TEST_RSA_KEY,
        "private_key_id": "kid-1",
        "token_uri": "https://oauth2.googleapis.com/token",
    });
    let config = PushWorkerConfig {
        providers: ProvidersConfig {
            webhook: None,
            fcm: Some(FcmConfig {
                base_url: receiver.url.clone(),
                token_url: Some(format!("{}/token", receiver.url)),
                ..FcmConfig::new("test-project", SecretSource::Value(service_account.to_string()))
            }),
            apns: Some(ApnsConfig {
                base_url: Some(receiver.url.clone()),
                sandbox: true,
                ..ApnsConfig::new(
                    "TEAM123456",
                    "KEY1234567",
                    "com.example.chat",
                    SecretSource::Value(TEST_EC_KEY.into()),
                )
            }),
        },
        ..fx.config("w1", "http://unused.invalid/")
    };
    let worker = Worker::start(config);
    poll_until("the job done", || worker.metrics.jobs_processed.get() >= 1).await;

    let token = receiver.on("/token");
    assert_eq!(token.len(), 1);
    let form = String::from_utf8(token[0].body.to_vec()).expect("utf-8");
    assert!(
        form.starts_with("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=ey"),
        "{form}"
    );

    let fcm = receiver.on("/v1/projects/test-project/messages:send");
    assert_eq!(fcm.len(), 1);
    assert_eq!(fcm[0].headers["authorization"], "Bearer access-token-1");
    assert_eq!(
        fcm[0].json(),
        json!({"message": {"token": "fcm-registration-token",
                           "notification": {"title": job.sender, "body": job.summary},
                           "data": {"channel": job.channel, "message_id": job.message_id}}})
    );

    let apns = receiver.on("/3/device/00fa11");
    assert_eq!(apns.len(), 1);
    assert!(apns[0].headers["authorization"].starts_with("bearer ey"));
    assert_eq!(apns[0].headers["apns-topic"], "com.example.chat");
    assert_eq!(apns[0].headers["apns-push-type"], "alert");
    assert_eq!(apns[0].headers["apns-id"].len(), 36);
    assert_eq!(
        apns[0].json(),
        json!({"aps": {"alert": {"title": job.sender, "body": job.summary}},
               "channel": job.channel, "message_id": job.message_id})
    );

    // The webhook device has no provider: dead-lettered, not retried.
    let dead = fx.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["device"], "pager");
    assert!(dead[0]["error"].contains("no webhook push provider"));
    assert_eq!(fx.pending().await, 0);
    worker.stop().await;
    fx.cleanup().await;
}

#[tokio::test]
async fn a_token_the_provider_rejects_is_unregistered() {
    let fx = Fixture::new().await;
    let receiver = Receiver::start().await;
    let bob = fx.user("bob");
    // APNs answers 410 Unregistered for this device.
    fx.register(&bob, "iphone", Platform::Apns, "abcdef").await;
    fx.enqueue(&bob, &message_id()).await;
    let config = PushWorkerConfig {
        providers: ProvidersConfig {
            apns: Some(ApnsConfig {
                base_url: Some(format!("{}/status/410", receiver.url)),
                ..ApnsConfig::new(
                    "TEAM123456",
                    "KEY1234567",
                    "com.example.chat",
                    SecretSource::Value(TEST_EC_KEY.into()),
                )
            }),
            ..ProvidersConfig::default()
        },
        ..fx.config("w1", "http://unused.invalid/")
    };
    let worker = Worker::start(config);
    poll_until("the job done", || worker.metrics.jobs_processed.get() >= 1).await;
    let dead = fx.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert!(dead[0]["error"].contains("HTTP 410"));
    let mut conn = fx.redis.clone();
    assert!(push::targets(&mut conn, &bob).await.expect("targets").is_empty(), "the stale token is forgotten");
    worker.stop().await;
    fx.cleanup().await;
}

/// The whole path with real processes: a device registers its webhook
/// target over the WebSocket, its connection drops, and once it is offline a
/// message to it becomes exactly one signed notification from a
/// `push-worker` process (which serves /healthz and /metrics meanwhile).
/// While it was online, nothing was pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_and_a_push_worker_process_notify_an_offline_device() {
    let redis = PrivateRedis::start().await;
    let spec = ClusterSpec::new(redis.url(), 2).await;
    let gateway = GatewayProcess::start(&spec, 0).await;
    let receiver = Receiver::start().await;

    let key_file = spec.dir.path().join("webhook-key");
    std::fs::write(&key_file, KEY).expect("write the webhook key");
    let admin = free_port();
    let mut config = spec.gateway_config(free_port(), admin);
    config.push.providers.webhook = Some(kubechat_config::Webhook {
        url: format!("{}/ok", receiver.url),
        include_text: true,
        signing_key_file: Some(key_file),
    });
    let config_file = spec.dir.path().join("push.json");
    std::fs::write(&config_file, config.to_json_pretty()).expect("write the push config");
    let mut worker = std::process::Command::new(common::binary::gateway_binary())
        .args(["push-worker", "--config"])
        .arg(&config_file)
        .args(["--consumer", "worker-1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the push worker");
    let healthy = async {
        loop {
            if let Some((200, body)) = http_get(admin, "/healthz").await {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let health = tokio::time::timeout(WAIT, healthy).await;
    assert_eq!(health.as_deref().ok().map(str::trim), Some("ok"), "the push worker's /healthz");

    let mut bob = ClusterClient::connect(&gateway.url(), "bob", "phone").await;
    let registered = bob.request(json!({"type":"register_push","platform":"webhook","token":"bob-phone"})).await;
    assert_eq!(registered["type"], "ok", "{registered}");
    let refused = bob.request(json!({"type":"register_push","platform":"carrier-pigeon","token":"x"})).await;
    assert_eq!(refused["code"], "bad_frame", "{refused}");

    let mut alice = ClusterClient::connect(&gateway.url(), "alice", "phone").await;
    let ack = alice.request(json!({"type":"send","to":{"user":"bob"},"text":"while you are here","key":"k1"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    bob.wait_for(WAIT, |f| f["type"] == "message").await.expect("bob online gets it live");

    bob.kill();
    let offline = alice.wait_for(WAIT, |f| f["type"] == "presence_changed" && f["online"] == false).await;
    assert!(offline.is_some(), "bob never went offline");
    let text = "a long message that only the first eighty characters of reach the notification, the rest stays private";
    let ack = alice.request(json!({"type":"send","to":{"user":"bob"},"text":text,"key":"k2"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");

    poll_until("one notification", || !receiver.delivered().is_empty()).await;
    let processed = async {
        loop {
            if let Some((200, metrics)) = http_get(admin, "/metrics").await
                && metrics.contains("kubechat_push_jobs_processed_total 1")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, processed).await.expect("the push worker reports its job done in /metrics");
    // Only the offline message became a job: the live one was delivered and
    // its fan-out (which decides on push jobs) ended long before bob went offline.
    let mut queue = redis::Client::open(redis.url())
        .expect("Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("the private Redis");
    let mut queued: Vec<PushJob> = Vec::new();
    for stream in push::partition_streams(PUSH_STREAM, push::PUSH_PARTITIONS) {
        let jobs: redis::streams::StreamRangeReply =
            redis::cmd("XRANGE").arg(&stream).arg("-").arg("+").query_async(&mut queue).await.expect("XRANGE");
        queued.extend(
            jobs.ids
                .iter()
                .map(|entry| serde_json::from_str(&entry.get::<String>("job").expect("a job field")).expect("a job")),
        );
    }
    assert_eq!(queued.len(), 1, "one push job, none for the live message: {queued:?}");
    assert_eq!(queued[0].message_id, ack["id"].as_str().expect("an id"));
    // Stopped, the worker can send nothing more: the count below is final.
    let _ = worker.kill();
    let _ = worker.wait();
    let delivered = receiver.delivered();
    assert_eq!(delivered.len(), 1, "exactly one push: {delivered:?}");
    assert!(valid_signature(&delivered[0]), "signature");
    let body = delivered[0].json();
    assert_eq!(body["user"], "bob");
    assert_eq!(body["device"], "phone");
    assert_eq!(body["message_id"], ack["id"]);
    let first_80: String = text.chars().take(80).collect();
    assert!(text.chars().count() > 80, "the message is longer than a summary");
    assert_eq!(body["summary"], format!("{first_80}…"), "the first 80 characters, marked as cut");
}
