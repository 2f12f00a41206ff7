//! The broker alone: what one Redis (one shard) does per send, at a given
//! rate, without gateways, WebSockets or a store in the way. The capacity
//! plan (docs/capacity.md) sizes Redis from this row.
//!
//! It runs the gateway's own code: `--gateways` `RedisBroker`s in this
//! process, each with its users' sessions registered, and per send exactly
//! what a gateway asks of Redis for a one-to-one message to a user on
//! another gateway: reserve the idempotency key (`SET NX GET`, beside a read
//! of the two markers), route (the users' sessions, `HKEYS` per user slot,
//! then one `SPUBLISH` to the recipient's gateway), and mark the key done
//! (queued, written in batches). Deliveries are counted
//! where the recipient's broker receives them.
//!
//! First the raw component in the same run: closed-loop `SPUBLISH` with the
//! same number of requests in flight, the ceiling of one Redis. Then, per
//! `--rates` step, sends at that rate (open loop: latency from each send's
//! scheduled time). Redis' CPU is read from `/proc` (its pid from `INFO`).
//!
//! Use a Redis of its own: the brokers write the gateways' keys.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use kubechat_gateway::broker::redis::send_keys::{RedisSendKeys, SendKeyNames};
use kubechat_gateway::broker::redis::{RedisBroker, RedisBrokerConfig};
use kubechat_gateway::broker::{Broker, Frame, LocalDelivery};
use kubechat_gateway::store::send_keys::{SendKeys, SendRecord};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Context;
use crate::procfs;
use crate::stats::{histogram, record, summary};

#[derive(clap::Args, Debug, Clone)]
pub struct BrokerArgs {
    /// The Redis to drive (one of its own: the brokers write gateway keys).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// Gateways simulated (each a `RedisBroker` with its own subscription).
    #[arg(long, default_value_t = 4)]
    pub gateways: usize,
    /// Users with a registered session, spread over the gateways.
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    /// Sends in flight at once (and requests in flight for the raw SPUBLISH step).
    #[arg(long = "in-flight", default_value_t = 64)]
    pub in_flight: usize,
    /// Offered sends/s, one step each, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "5000")]
    pub rates: Vec<f64>,
    /// Seconds measured per step.
    #[arg(long, default_value_t = 10.0, value_parser = crate::seconds)]
    pub duration: f64,
    /// Seconds before each step that are not measured.
    #[arg(long, default_value_t = 2.0, value_parser = crate::seconds)]
    pub warmup: f64,
}

/// A gateway's local side: counts what reaches it.
#[derive(Default)]
struct Counting {
    delivered: AtomicU64,
}

impl LocalDelivery for Counting {
    fn deliver_local(&self, users: &[String], _frame: &Frame) {
        self.delivered.fetch_add(users.len() as u64, Relaxed);
    }
    fn resync_all(&self, _reason: &str) {}
    fn resync_users(&self, _users: &[String], _reason: &str) {}
    fn local_sessions(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    fn remote_user_offline(&self, _user: String) {}
    fn group_changed(&self, _group: &str) {}
}

struct Gateway {
    broker: Arc<RedisBroker>,
    local: Arc<Counting>,
}

pub async fn run(ctx: &Context, args: &BrokerArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(args.gateways >= 2, "--gateways must be at least 2 (a send crosses gateways)");
    anyhow::ensure!(args.users >= args.gateways, "--users must be at least --gateways");
    let client = redis::Client::open(args.redis.as_str()).with_context(|| format!("Redis URL {}", args.redis))?;
    let mut connection =
        client.get_multiplexed_async_connection().await.with_context(|| format!("connecting to {}", args.redis))?;
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut connection).await.context("INFO server")?;
    let redis_pid: u32 = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .context("no process_id in INFO server")?;

    eprintln!("broker: raw SPUBLISH, {} in flight, {} s", args.in_flight, args.duration);
    let raw = raw_spublish(&connection, redis_pid, args).await;
    eprintln!("broker: raw SPUBLISH {:.0}/s", raw["rate"].as_f64().unwrap_or(0.0));

    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let mut gateways = Vec::new();
    for g in 0..args.gateways {
        let local = Arc::new(Counting::default());
        let config = RedisBrokerConfig {
            gateway_id: format!("bench-{}-gw{g}", ctx.run_id),
            lease: Duration::from_secs(30),
            command_timeout: Duration::from_secs(2),
            worker_id: None,
        };
        let endpoint = kubechat_redis::Endpoint::single(&args.redis)?;
        let broker = RedisBroker::start(endpoint, config, local.clone(), &tasks, shutdown.clone())
            .await
            .map_err(|e| anyhow::anyhow!("starting broker {g}: {e}"))?;
        gateways.push(Gateway { broker, local });
    }
    let users: Vec<String> = (0..args.users).map(|u| format!("{}-u{u}", ctx.run_id)).collect();
    // User u lives on gateway u % gateways.
    futures::stream::iter(users.iter().enumerate())
        .for_each_concurrent(args.in_flight.max(1), |(u, user)| {
            let broker = gateways[u % args.gateways].broker.clone();
            async move {
                if let Err(e) = broker.session_added(user, "phone").await {
                    eprintln!("warning: registering {user}: {e}");
                }
            }
        })
        .await;
    let keys_connection = redis::aio::ConnectionManager::new(client.clone()).await.context("connection for keys")?;
    let send_keys = RedisSendKeys::start(
        keys_connection,
        SendKeyNames { prefix: format!("bench-{}:", ctx.run_id) },
        Duration::from_secs(300),
    );

    let mut steps = Vec::new();
    let sequence = Arc::new(AtomicU64::new(0));
    for &rate in &args.rates {
        eprintln!("broker: {rate:.0} sends/s offered over {} gateways, {} users", args.gateways, args.users);
        let step = sends_at(&gateways, &users, &send_keys, &sequence, redis_pid, args, rate).await;
        eprintln!(
            "broker: {:.0} sends/s, p50 {} µs, p99 {} µs, {:.1} µs of Redis CPU per send, {} errors",
            step["rate"].as_f64().unwrap_or(0.0),
            step["latency"]["p50_us"],
            step["latency"]["p99_us"],
            step["redis_cpu_us_per_send"].as_f64().unwrap_or(0.0),
            step["errors"]
        );
        steps.push(step);
    }
    shutdown.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    Ok(json!({
        "params": {"redis": args.redis, "gateways": args.gateways, "users": args.users,
                   "in_flight": args.in_flight, "duration_s": args.duration, "warmup_s": args.warmup},
        "raw_spublish": raw,
        "steps": steps,
    }))
}

/// Closed-loop `SPUBLISH` (what a forward costs) to a channel nobody
/// listens on: the most one Redis does for the cheapest command a send needs.
async fn raw_spublish(connection: &redis::aio::MultiplexedConnection, redis_pid: u32, args: &BrokerArgs) -> Value {
    let done = AtomicU64::new(0);
    let measure_from = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let before = Mutex::new(None);
    let workers = (0..args.in_flight.max(1)).map(|_| {
        let mut connection = connection.clone();
        let (done, before) = (&done, &before);
        async move {
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if now >= measure_from
                    && let Ok(mut b) = before.lock()
                    && b.is_none()
                {
                    *b = procfs::sample(&[redis_pid]).ok();
                }
                let sent: redis::RedisResult<i64> =
                    redis::cmd("SPUBLISH").arg("bench:raw").arg("x").query_async(&mut connection).await;
                if sent.is_ok() && now >= measure_from {
                    done.fetch_add(1, Relaxed);
                }
            }
        }
    });
    futures::future::join_all(workers).await;
    let after = procfs::sample(&[redis_pid]).ok();
    let before = before.lock().ok().and_then(|b| *b);
    let usage = match (before, after) {
        (Some(b), Some(a)) => procfs::to_json(&b, &a),
        _ => Value::Null,
    };
    json!({"rate": (done.load(Relaxed) as f64 / args.duration).round(), "redis_usage": usage})
}

async fn sends_at(
    gateways: &[Gateway],
    users: &[String],
    send_keys: &Arc<RedisSendKeys>,
    sequence: &AtomicU64,
    redis_pid: u32,
    args: &BrokerArgs,
    rate: f64,
) -> Value {
    let latency = Mutex::new(histogram());
    let (done, errors, routed) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let delivered_before: u64 = gateways.iter().map(|g| g.local.delivered.load(Relaxed)).sum();
    let started = Instant::now();
    let measure_from = started + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let total = ((end - started).as_secs_f64() * rate) as u64;
    let mut before = None;
    let schedule = futures::stream::iter(0..total).map(|i| {
        let scheduled = started + Duration::from_secs_f64(i as f64 / rate);
        let (latency, done, errors, routed_all) = (&latency, &done, &errors, &routed);
        async move {
            tokio::time::sleep_until(scheduled.into()).await;
            let n = sequence.fetch_add(1, Relaxed);
            // A sender and a recipient on the next gateway: every send is forwarded.
            let from = (n as usize * 7919) % users.len();
            let to = (from + 1) % users.len();
            let (sender, recipient) = (&users[from], &users[to]);
            let key = format!("k{n}");
            let candidate =
                SendRecord { id: n + 1, position: n + 1, channel: format!("dm:{sender}:{recipient}"), done: false };
            let _reservation = send_keys.reserve(sender, &key, &candidate).await;
            let frame = Frame::from(format!(r#"{{"type":"message","n":{n}}}"#));
            let routed = gateways[from % gateways.len()].broker.route(std::slice::from_ref(recipient), &frame).await;
            send_keys.complete(sender, &key, &SendRecord { done: true, ..candidate }).await;
            if routed.is_ok() {
                routed_all.fetch_add(1, Relaxed);
            }
            if scheduled >= measure_from && scheduled < end {
                match routed {
                    Ok(_) => {
                        done.fetch_add(1, Relaxed);
                        record(latency, scheduled.elapsed().as_micros() as u64);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Relaxed);
                    }
                }
            }
        }
    });
    let run = schedule.buffer_unordered(args.in_flight.max(1)).for_each(|()| async {});
    let sampling = async {
        tokio::time::sleep_until(measure_from.into()).await;
        before = procfs::sample(&[redis_pid]).ok();
    };
    futures::future::join(run, sampling).await;
    let after = procfs::sample(&[redis_pid]).ok();
    // Deliveries arrive through the subscriptions shortly after the last route.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered: u64 = gateways.iter().map(|g| g.local.delivered.load(Relaxed)).sum::<u64>() - delivered_before;
    let sends = done.load(Relaxed);
    let usage = match (before, after) {
        (Some(b), Some(a)) => procfs::to_json(&b, &a),
        _ => Value::Null,
    };
    let redis_cpu = usage["cpu_seconds"].as_f64().unwrap_or(0.0);
    json!({
        "offered_rate": rate,
        "sends": sends,
        "rate": (sends as f64 / args.duration).round(),
        "errors": errors.load(Relaxed),
        // Over the whole step, warm-up included: every route that
        // succeeded should have reached its recipient's gateway.
        "routed_in_step": routed.load(Relaxed),
        "delivered_in_step": delivered,
        "latency": summary(&latency),
        "redis_usage": usage,
        "redis_cpu_us_per_send": if sends > 0 { redis_cpu * 1e6 / sends as f64 } else { 0.0 },
    })
}
