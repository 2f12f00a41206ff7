//! Idle: N authenticated connections opened at a steady rate and held, with
//! kubechat heartbeats every 5 s (Centrifugo: its pings answered). With
//! `--server-pid`, the server's RSS growth per connection and its CPU time
//! per connection per second over the hold are measured from /proc.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;

use super::{Context, open_all};
use crate::driver::{self, Conn, Shared};
use crate::proto::{Server, Target, centrifugo};
use crate::stats::{Counts, RunStats};
use crate::{net, procfs};

#[derive(clap::Args, Debug, Clone)]
pub struct IdleArgs {
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Connections opened per second.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Seconds to hold them once all are open (CPU is measured over this).
    #[arg(long, default_value_t = 30.0, value_parser = crate::seconds)]
    pub hold: f64,
    /// Seconds between all open and the memory sample (lets the server settle).
    #[arg(long, default_value_t = 3.0, value_parser = crate::seconds)]
    pub settle: f64,
    /// kubechat heartbeat interval, seconds.
    #[arg(long, default_value_t = 5.0, value_parser = crate::seconds)]
    pub heartbeat: f64,
    /// Centrifugo: do not subscribe each connection to its personal channel
    /// (by default it does, to be ready for direct messages like a kubechat
    /// connection is).
    #[arg(long)]
    pub no_subscribe: bool,
}

pub async fn run(ctx: &Context, args: &IdleArgs) -> anyhow::Result<Value> {
    let n = args.connections;
    let before = ctx.sample();
    let stats = Arc::new(RunStats::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared { client: ctx.client.clone(), stats: stats.clone(), text_size: 0, stop: stop_rx });
    let failures = Counts::default();
    let mut tasks = Vec::with_capacity(n);
    let heartbeat = Duration::from_secs_f64(args.heartbeat);
    let subscribe = ctx.client.server == Server::Centrifugo && !args.no_subscribe;
    eprintln!("idle: opening {n} connections at {} conn/s", args.rate);
    let started = Instant::now();
    open_all(
        n,
        ctx.concurrency,
        Some(args.rate),
        |i| async move {
            let name = format!("{}i{i}", ctx.run_id);
            let mut ws = ctx.client.connect(ctx.endpoint(i), ctx.source(i), &name, "bench").await?;
            if subscribe {
                centrifugo::subscribe(&mut ws, &centrifugo::channel(&Target::User(name))).await?;
            }
            Ok(ws)
        },
        |_, result, _| match result {
            Ok(ws) => {
                let conn = Conn { ws, sender: None, heartbeat: Some(heartbeat) };
                tasks.push(tokio::spawn(driver::drive(conn, shared.clone())));
            }
            Err(e) => failures.add(&net::failure_kind(&e)),
        },
    )
    .await?;
    let open_seconds = started.elapsed().as_secs_f64();
    let opened = tasks.len();
    eprintln!("idle: {opened} open in {open_seconds:.1} s ({} failed); settling", failures.total());
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let settled = ctx.sample();
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let held = ctx.sample();
    let still_open = tasks.iter().filter(|t| !t.is_finished()).count();
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }

    let mut server = Value::Null;
    if let (Some(before), Some(settled), Some(held)) = (before, settled, held) {
        let (cpu, wall) = procfs::cpu_between(&settled, &held);
        let per_conn = |after: u64| (after as f64 - before.rss_kib as f64) / opened.max(1) as f64;
        server = json!({
            "rss_kib_before": before.rss_kib,
            "rss_kib_open": settled.rss_kib,
            "rss_kib_end": held.rss_kib,
            "kib_per_connection_open": per_conn(settled.rss_kib),
            "kib_per_connection": per_conn(held.rss_kib),
            "hold_cpu_seconds": cpu,
            "hold_wall_seconds": wall,
            "cpu_us_per_connection_per_s": cpu * 1e6 / opened.max(1) as f64 / wall.max(1e-9),
            "hold": procfs::to_json(&settled, &held),
        });
        eprintln!(
            "idle: server RSS {} → {} KiB: {:.2} KiB per connection; CPU {:.3} µs per connection per second",
            before.rss_kib,
            held.rss_kib,
            server["kib_per_connection"].as_f64().unwrap_or(0.0),
            server["cpu_us_per_connection_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    let run = super::run_report(&stats);
    super::print_closes(&run["closes"]);
    Ok(json!({
        "params": {"connections": n, "rate": args.rate, "hold_s": args.hold, "settle_s": args.settle,
                   "heartbeat_s": if ctx.client.server == Server::Kubechat { json!(args.heartbeat) } else { Value::Null },
                   "centrifugo_subscribed": subscribe},
        "opened": opened,
        "failed": failures.to_json(),
        "open_seconds": open_seconds,
        "still_open_at_end": still_open,
        "server_usage": server,
        "run": run,
    }))
}
