//! The store's own ceiling: raw CQL writes against the same Cassandra (or
//! ScyllaDB) the clustered gateways use, from the same tool, so a send rate
//! can be read as a fraction of what the store takes at all.
//!
//! - `insert`: one single-row `INSERT` per request into a table shaped like
//!   the gateway's history table (the cheapest write there is).
//! - `lwt`: one `INSERT … IF NOT EXISTS` per request (a Paxos round), the
//!   shape of an idempotency reservation done in the store.
//! - `batch`: one `UNLOGGED BATCH` of `--rows` rows in as many partitions
//!   per request (the shape of one send's rows when they share replicas).
//!
//! Two phases: closed loop (`--concurrency` requests in flight, back to
//! back) for the highest rate, then, with `--rate`, open loop at that rate
//! (latency counted from each request's scheduled time, so queueing in the
//! client counts too).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use serde_json::{Value, json};

use super::Context;
use crate::stats::{histogram, record, summary};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    Insert,
    Lwt,
    Batch,
}

#[derive(clap::Args, Debug, Clone)]
pub struct CqlArgs {
    /// CQL contact point (`host:port`, loopback).
    #[arg(long, default_value = "127.0.0.1:9042")]
    pub contact: String,
    /// Keyspace to write into (created with replication factor 1 if missing).
    #[arg(long, default_value = "bench_raw")]
    pub keyspace: String,
    #[arg(long, value_enum, default_value = "insert")]
    pub shape: Shape,
    /// Rows per request for `--shape batch`.
    #[arg(long, default_value_t = 3)]
    pub rows: usize,
    /// Requests in flight at once.
    #[arg(long = "in-flight", default_value_t = 256)]
    pub in_flight: usize,
    /// Seconds of the closed-loop (highest rate) phase.
    #[arg(long, default_value_t = 10.0, value_parser = crate::seconds)]
    pub duration: f64,
    /// Seconds before each phase that are not measured.
    #[arg(long, default_value_t = 3.0, value_parser = crate::seconds)]
    pub warmup: f64,
    /// Offered rates (requests/s) of open-loop phases after the closed loop,
    /// comma-separated; a value below 1 is a fraction of the closed loop's rate.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
}

struct Statements {
    session: Session,
    statement: PreparedStatement,
    batch: Batch,
}

pub async fn run(ctx: &Context, args: &CqlArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(args.rows >= 1, "--rows must be at least 1");
    anyhow::ensure!(
        !args.keyspace.is_empty() && args.keyspace.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
        "--keyspace: lower-case letters and _ only"
    );
    let session = SessionBuilder::new()
        .known_node(&args.contact)
        .build()
        .await
        .with_context(|| format!("connecting to CQL at {}", args.contact))?;
    let ks = &args.keyspace;
    for ddl in [
        format!(
            "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.raw_messages (channel_id text, bucket int, id bigint, sender text, \
             sender_device text, body text, created_at_ms bigint, PRIMARY KEY ((channel_id, bucket), id))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.raw_sends (sender text, idem_key text, message_id bigint, \
             channel_id text, PRIMARY KEY ((sender, idem_key)))"
        ),
    ] {
        session.query_unpaged(ddl, ()).await.context("creating the benchmark tables")?;
    }
    session.await_schema_agreement().await.context("schema agreement")?;
    let insert = session
        .prepare(format!(
            "INSERT INTO {ks}.raw_messages (channel_id, bucket, id, sender, sender_device, body, created_at_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?)"
        ))
        .await?;
    let lwt = session
        .prepare(format!(
            "INSERT INTO {ks}.raw_sends (sender, idem_key, message_id, channel_id) VALUES (?, ?, ?, ?) IF NOT EXISTS"
        ))
        .await?;
    let mut batch = Batch::new(BatchType::Unlogged);
    for _ in 0..args.rows {
        batch.append_statement(insert.clone());
    }
    let statement = if args.shape == Shape::Lwt { lwt } else { insert };
    let statements = Arc::new(Statements { session, statement, batch });
    let body = Arc::new("x".repeat(ctx.text_size));

    eprintln!(
        "cql: {:?}{} at {} in flight, closed loop {} s",
        args.shape,
        if args.shape == Shape::Batch { format!(" of {} rows", args.rows) } else { String::new() },
        args.in_flight,
        args.duration
    );
    let closed = phase(ctx, args, &statements, &body, None).await;
    let max_rate = closed["rate"].as_f64().unwrap_or(0.0);
    print_phase("closed loop", &closed);
    let mut open = Vec::new();
    for &rate in &args.rates {
        let rate = if rate < 1.0 { (rate * max_rate).max(1.0) } else { rate };
        let result = phase(ctx, args, &statements, &body, Some(rate)).await;
        print_phase(&format!("{rate:.0}/s offered"), &result);
        open.push(result);
    }
    Ok(json!({
        "params": {"contact": args.contact, "keyspace": args.keyspace, "shape": args.shape, "rows": args.rows,
                   "in_flight": args.in_flight, "duration_s": args.duration, "warmup_s": args.warmup},
        "closed_loop": closed,
        "open_loop": open,
    }))
}

fn print_phase(name: &str, result: &Value) {
    let ms = |v: &Value| v.as_u64().map_or("-".into(), |us| format!("{:.2}", us as f64 / 1000.0));
    eprintln!(
        "cql {name}: {:.0} requests/s, p50 {} ms, p99 {} ms, errors {}",
        result["rate"].as_f64().unwrap_or(0.0),
        ms(&result["latency"]["p50_us"]),
        ms(&result["latency"]["p99_us"]),
        result["errors"]
    );
}

/// One phase: warm-up, then `duration` measured; closed loop without a
/// rate, open loop with one.
async fn phase(
    ctx: &Context,
    args: &CqlArgs,
    statements: &Arc<Statements>,
    body: &Arc<String>,
    rate: Option<f64>,
) -> Value {
    let latency = Arc::new(Mutex::new(histogram()));
    let (done, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let started = Instant::now();
    let measure_from = started + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let sequence = Arc::new(AtomicU64::new(0));
    let mut measured_before = None;

    let one = |scheduled: Instant| {
        let (statements, body, latency) = (statements.clone(), body.clone(), latency.clone());
        let (done, errors, first_error, sequence) =
            (done.clone(), errors.clone(), first_error.clone(), sequence.clone());
        let shape = args.shape;
        async move {
            let n = sequence.fetch_add(1, Relaxed);
            let result = write(&statements, shape, n, &body).await;
            let now = Instant::now();
            if scheduled >= measure_from && scheduled < end {
                match result {
                    Ok(()) => {
                        done.fetch_add(1, Relaxed);
                        record(&latency, now.duration_since(scheduled).as_micros() as u64);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Relaxed);
                        first_error.lock().map(|mut f| f.get_or_insert(format!("{e:#}")).clone()).ok();
                    }
                }
            }
        }
    };

    match rate {
        None => {
            let workers = (0..args.in_flight.max(1)).map(|_| {
                let one = &one;
                async move {
                    loop {
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        one(now).await;
                    }
                }
            });
            let sampling = async {
                tokio::time::sleep_until(measure_from.into()).await;
                measured_before = ctx.sample();
            };
            futures::future::join(futures::future::join_all(workers), sampling).await;
        }
        Some(rate) => {
            let total = ((end - started).as_secs_f64() * rate) as u64;
            let schedule = futures::stream::iter(0..total).map(|i| {
                let scheduled = started + Duration::from_secs_f64(i as f64 / rate);
                let one = &one;
                async move {
                    tokio::time::sleep_until(scheduled.into()).await;
                    one(scheduled).await;
                }
            });
            let run = schedule.buffer_unordered(args.in_flight.max(1)).for_each(|()| async {});
            let sampling = async {
                tokio::time::sleep_until(measure_from.into()).await;
                measured_before = ctx.sample();
            };
            futures::future::join(run, sampling).await;
        }
    }
    let after = ctx.sample();
    let measured = Duration::from_secs_f64(args.duration).as_secs_f64();
    let server = match (measured_before, after) {
        (Some(b), Some(a)) => crate::procfs::to_json(&b, &a),
        _ => Value::Null,
    };
    let first_error = first_error.lock().ok().and_then(|f| f.clone());
    json!({
        "offered_rate": rate,
        "requests": done.load(Relaxed),
        "rate": (done.load(Relaxed) as f64 / measured).round(),
        "rows_per_request": if args.shape == Shape::Batch { args.rows } else { 1 },
        "errors": errors.load(Relaxed),
        "first_error": first_error,
        "latency": summary(&latency),
        "server_usage": server,
    })
}

/// One request of the shape; `n` makes every row (and key) new.
async fn write(statements: &Statements, shape: Shape, n: u64, body: &str) -> anyhow::Result<()> {
    let id = n as i64;
    let channel = format!("dm:raw{}:raw{}", n % 1000, n % 997);
    match shape {
        Shape::Insert => {
            let values = (channel.as_str(), 700_i32, id, "sender", "device", body, id);
            statements.session.execute_unpaged(&statements.statement, values).await?;
        }
        Shape::Lwt => {
            let key = format!("key-{n}-{}", std::process::id());
            let values = ("sender", key.as_str(), id, channel.as_str());
            statements.session.execute_unpaged(&statements.statement, values).await?;
        }
        Shape::Batch => {
            let rows: Vec<(String, i32, i64, &str, &str, &str, i64)> = (0..statements.batch.statements.len())
                .map(|r| (format!("{channel}:{r}"), 700_i32, id, "sender", "device", body, id))
                .collect();
            statements.session.batch(&statements.batch, &rows).await?;
        }
    }
    Ok(())
}
