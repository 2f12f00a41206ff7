//! Connection setup rate: N connections (TCP, upgrade, authenticated: the
//! kubechat `hello` or the Centrifugo connect reply) as fast as possible with
//! bounded concurrency, all held until the last one is up.

use std::sync::Mutex;
use std::time::Instant;

use serde_json::{Value, json};

use super::{Context, open_all};
use crate::net::{self, Ws};
use crate::stats::{Counts, histogram, record, summary};

#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
}

pub async fn run(ctx: &Context, args: &ConnectArgs) -> anyhow::Result<Value> {
    let n = args.connections;
    let failures = Counts::default();
    let setup = Mutex::new(histogram());
    let mut held: Vec<Ws> = Vec::with_capacity(n);
    let before = ctx.sample();
    eprintln!("connect: {n} connections, {} at a time", ctx.concurrency);
    let started = Instant::now();
    open_all(
        n,
        ctx.concurrency,
        None,
        |i| async move { ctx.client.connect(ctx.endpoint(i), ctx.source(i), &format!("{}c{i}", ctx.run_id), "bench").await },
        |_, result, took| match result {
            Ok(ws) => {
                record(&setup, took.as_micros() as u64);
                held.push(ws);
            }
            Err(e) => failures.add(&net::failure_kind(&e)),
        },
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let after = ctx.sample();
    let opened = held.len();
    drop(held);
    let rate = opened as f64 / seconds;
    eprintln!("connect: {opened} authenticated in {seconds:.2} s: {rate:.0} conn/s ({} failed)", failures.total());
    let server = match (before, after) {
        (Some(b), Some(a)) => crate::procfs::to_json(&b, &a),
        _ => Value::Null,
    };
    Ok(json!({
        "params": {"connections": n, "concurrency": ctx.concurrency},
        "opened": opened,
        "failed": failures.to_json(),
        "seconds": seconds,
        "connections_per_s": rate.round(),
        "setup_latency": summary(&setup),
        "server_usage": server,
    }))
}
