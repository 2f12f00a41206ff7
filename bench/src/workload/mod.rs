//! The workloads, and what they share: opening many connections, and running
//! timed steps of messages over them.

pub mod broker;
pub mod connect;
pub mod cql;
pub mod group;
pub mod idle;
pub mod pairs;

use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::driver::{self, Conn, Shared};
use crate::net::{Endpoint, SourcePool, Ws};
use crate::procfs;
use crate::proto::Client;
use crate::stats::{RunStats, StepStats, summary};

/// Settings every workload uses.
pub struct Context {
    pub client: Client,
    pub endpoints: Vec<Endpoint>,
    pub sources: SourcePool,
    pub concurrency: usize,
    pub server_pids: Vec<u32>,
    pub text_size: usize,
    /// Unique per invocation: user names and idempotency keys start with it.
    pub run_id: String,
}

impl Context {
    /// The endpoint of connection `i`: several gateways alternate.
    pub fn endpoint(&self, i: usize) -> &Endpoint {
        &self.endpoints[i % self.endpoints.len()]
    }

    pub fn source(&self, i: usize) -> Ipv4Addr {
        self.sources.addr(i)
    }

    pub fn sample(&self) -> Option<procfs::Usage> {
        if self.server_pids.is_empty() {
            return None;
        }
        match procfs::sample(&self.server_pids) {
            Ok(usage) => Some(usage),
            Err(e) => {
                eprintln!("warning: cannot sample the server (pids {:?}): {e:#}", self.server_pids);
                None
            }
        }
    }
}

/// Opens connections `0..n` with at most `concurrency` in flight and, with a
/// `rate`, no faster than that many per second. Connection 0 is opened alone
/// first: an unreachable server or a refused token fails the whole run with
/// its reason instead of thousands of identical failures.
pub async fn open_all<F, Fut>(
    n: usize,
    concurrency: usize,
    rate: Option<f64>,
    open: F,
    mut opened: impl FnMut(usize, anyhow::Result<Ws>, Duration),
) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<Ws>>,
{
    if n == 0 {
        return Ok(());
    }
    let started = Instant::now();
    let first = open(0).await.context("the first connection failed")?;
    opened(0, Ok(first), started.elapsed());
    let t0 = tokio::time::Instant::now();
    let open = &open;
    let mut attempts = futures::stream::iter(1..n)
        .map(|i| async move {
            if let Some(rate) = rate.filter(|r| *r > 0.0) {
                tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / rate)).await;
            }
            let started = Instant::now();
            let result = open(i).await;
            (i, result, started.elapsed())
        })
        .buffer_unordered(concurrency.max(1));
    while let Some((i, result, took)) = attempts.next().await {
        opened(i, result, took);
    }
    Ok(())
}

/// Opens `n` connections and fails on the first error (messaging workloads
/// need every member).
pub async fn open_required<F, Fut>(ctx: &Context, n: usize, open: F) -> anyhow::Result<Vec<Ws>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<Ws>>,
{
    let mut slots: Vec<Option<Ws>> = (0..n).map(|_| None).collect();
    let mut failure = None;
    open_all(n, ctx.concurrency, None, open, |i, result, _| match result {
        Ok(ws) => slots[i] = Some(ws),
        Err(e) => {
            failure.get_or_insert(e.context(format!("connection {i}")));
        }
    })
    .await?;
    if let Some(error) = failure {
        return Err(error);
    }
    Ok(slots.into_iter().flatten().collect())
}

/// What the latency histograms measure, for the report.
pub const LATENCY_FROM: &str = "receipt minus the send time stamped just before the write; sends follow an \
     open-loop schedule and the client's own lag behind it is reported as send_lag";

/// One step of a messaging workload.
#[derive(Clone, Debug)]
pub struct StepSpec {
    pub rate: f64,
    pub duration: Duration,
    pub warmup: bool,
}

/// Steps back to back with `gap` between them (in-flight messages land in
/// their own step), then up to `drain` for the last deliveries.
pub struct Schedule {
    pub steps: Vec<StepSpec>,
    pub gap: Duration,
    pub drain: Duration,
}

/// Runs the steps over `conns`; `recipients` is how many connections get
/// each acked message.
pub async fn run_steps(ctx: &Context, conns: Vec<Conn>, schedule: &Schedule, recipients: u64) -> Arc<RunStats> {
    let mut at = Instant::now() + Duration::from_millis(500);
    let mut steps = Vec::new();
    for spec in &schedule.steps {
        steps.push(StepStats::new(spec.rate, spec.warmup, at, at + spec.duration));
        at += spec.duration + schedule.gap;
    }
    let stats = Arc::new(RunStats { steps, ..RunStats::default() });
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared =
        Arc::new(Shared { client: ctx.client.clone(), stats: stats.clone(), text_size: ctx.text_size, stop: stop_rx });
    let tasks: Vec<_> = conns.into_iter().map(|c| tokio::spawn(driver::drive(c, shared.clone()))).collect();

    for step in &stats.steps {
        tokio::time::sleep_until(step.start.into()).await;
        let before = ctx.sample();
        tokio::time::sleep_until(step.end.into()).await;
        let after = ctx.sample();
        if let (Ok(mut b), Ok(mut a)) = (step.server_before.lock(), step.server_after.lock()) {
            (*b, *a) = (before, after);
        }
    }
    let deadline = Instant::now() + schedule.drain;
    while Instant::now() < deadline
        && !stats.steps.iter().all(|s| s.complete(recipients))
        && !tasks.iter().all(|t| t.is_finished())
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    stats
}

/// The JSON of every step, and a line per step for people.
pub fn steps_report(stats: &RunStats, recipients: u64) -> Value {
    let steps: Vec<Value> = stats.steps.iter().map(|s| step_report(s, recipients)).collect();
    json!(steps)
}

fn step_report(step: &StepStats, recipients: u64) -> Value {
    let seconds = step.end.duration_since(step.start).as_secs_f64();
    let acked = step.acked.load(Relaxed);
    let expected = acked * recipients;
    let unique = step.unique();
    let in_window = step.in_window.load(Relaxed);
    let server = match (step.server_before.lock().ok().and_then(|b| *b), step.server_after.lock().ok().and_then(|a| *a))
    {
        (Some(before), Some(after)) => {
            let mut usage = procfs::to_json(&before, &after);
            let (cpu, _) = procfs::cpu_between(&before, &after);
            if cpu > 0.0 {
                usage["deliveries_per_cpu_second"] = json!((in_window as f64 / cpu).round());
            }
            usage
        }
        _ => Value::Null,
    };
    json!({
        "offered_rate": step.rate,
        "warmup": step.warmup,
        "duration_s": seconds,
        "sent": step.sent.load(Relaxed),
        "acked": acked,
        "errors": step.errors.to_json(),
        "recipients_per_message": recipients,
        "expected_deliveries": expected,
        "deliveries": step.deliveries.load(Relaxed),
        "unique_deliveries": unique,
        "duplicates": step.duplicates.load(Relaxed),
        "missing": expected.saturating_sub(unique),
        "deliveries_in_window": in_window,
        "deliveries_per_s": (in_window as f64 / seconds).round(),
        "latency": summary(&step.latency),
        "ack_latency": summary(&step.ack_latency),
        "send_lag": summary(&step.send_lag),
        "closes": step.closes.to_json(),
        "server_usage": server,
    })
}

/// One line per step, for stderr.
pub fn print_steps(report: &Value) {
    let ms = |v: &Value| v.as_u64().map_or("-".into(), |us| format!("{:.2}", us as f64 / 1000.0));
    let num = |v: &Value| v.as_f64().map_or("-".into(), |n| format!("{n:.0}"));
    eprintln!(
        "{:>8} {:>8} {:>8} {:>10} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8} {:>11}",
        "rate",
        "sent",
        "acked",
        "delivered",
        "missing",
        "deliv/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "max ms",
        "deliv/cpu-s"
    );
    for step in report.as_array().into_iter().flatten() {
        let mut errors = String::new();
        for (what, key) in [("errors", "errors"), ("CLOSED", "closes")] {
            if step[key].as_object().is_some_and(|e| !e.is_empty()) {
                errors += &format!(" {what} {}", step[key]);
            }
        }
        eprintln!(
            "{:>8} {:>8} {:>8} {:>10} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8} {:>11}{}{errors}",
            num(&step["offered_rate"]),
            num(&step["sent"]),
            num(&step["acked"]),
            num(&step["unique_deliveries"]),
            num(&step["missing"]),
            num(&step["deliveries_per_s"]),
            ms(&step["latency"]["p50_us"]),
            ms(&step["latency"]["p99_us"]),
            ms(&step["latency"]["p999_us"]),
            ms(&step["latency"]["max_us"]),
            num(&step["server_usage"]["deliveries_per_cpu_second"]),
            if step["warmup"] == true { " (warmup)" } else { "" },
        );
    }
}

/// Common tail of every report: closes and unattributed errors.
pub fn run_report(stats: &RunStats) -> Value {
    json!({
        "closes": stats.closes_json(),
        "errors_without_request": stats.errors.to_json(),
        "bad_stamps": stats.bad_stamps.load(Relaxed),
    })
}

pub fn print_closes(closes: &Value) {
    match closes.as_object() {
        Some(map) if !map.is_empty() => eprintln!("CONNECTIONS CLOSED BY THE SERVER OR LOST: {closes}"),
        _ => eprintln!("no connection was closed by the server"),
    }
}
