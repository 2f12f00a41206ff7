//! One-to-one: P pairs of users, both of each pair sending to the other, the
//! total offered rate spread evenly over all 2P senders. With several URLs
//! the two users of a pair are on different gateways.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Context, Schedule, StepSpec, open_required, run_steps};
use crate::driver::{Conn, Sender};
use crate::proto::{Server, Target, centrifugo};

#[derive(clap::Args, Debug, Clone)]
pub struct PairsArgs {
    /// Number of pairs (2 connections each).
    #[arg(long, default_value_t = 500)]
    pub pairs: usize,
    /// Total offered messages per second, all senders together.
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 20.0, value_parser = crate::seconds)]
    pub duration: f64,
    /// Seconds at the same rate before measuring (reported separately).
    #[arg(long, default_value_t = 3.0, value_parser = crate::seconds)]
    pub warmup: f64,
    /// Seconds to wait for the last acks and deliveries.
    #[arg(long, default_value_t = 10.0, value_parser = crate::seconds)]
    pub drain: f64,
}

fn user(ctx: &Context, i: usize) -> String {
    format!("{}p{}{}", ctx.run_id, i / 2, if i.is_multiple_of(2) { 'a' } else { 'b' })
}

pub async fn run(ctx: &Context, args: &PairsArgs) -> anyhow::Result<Value> {
    let n = args.pairs * 2;
    anyhow::ensure!(n > 0, "--pairs must be at least 1");
    let per_sender = args.rate / n as f64;
    if ctx.client.server == Server::Kubechat && per_sender > 40.0 {
        eprintln!(
            "warning: {per_sender:.0} sends/s per connection is near kubechat's limit of 50/s: expect rate_limited"
        );
    }
    eprintln!("pairs: opening {n} connections to {} server(s)", ctx.endpoints.len());
    let sockets = open_required(ctx, n, |i| async move {
        let name = user(ctx, i);
        let mut ws = ctx.client.connect(ctx.endpoint(i), ctx.source(i), &name, "bench").await?;
        if ctx.client.server == Server::Centrifugo {
            centrifugo::subscribe(&mut ws, &centrifugo::channel(&Target::User(name))).await?;
        }
        Ok(ws)
    })
    .await?;
    let conns = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| Conn {
            ws,
            heartbeat: ctx.client.heartbeat().map(|_| Duration::from_secs(5)),
            sender: Some(Sender {
                target: Target::User(user(ctx, i ^ 1)),
                index: i as u64,
                senders: n as u64,
                stream: i as u32,
                shared_stream: false,
                key_prefix: format!("{}-{i}", ctx.run_id),
            }),
        })
        .collect();
    let mut steps = Vec::new();
    if args.warmup > 0.0 {
        steps.push(StepSpec { rate: args.rate, duration: Duration::from_secs_f64(args.warmup), warmup: true });
    }
    steps.push(StepSpec { rate: args.rate, duration: Duration::from_secs_f64(args.duration), warmup: false });
    let schedule = Schedule { steps, gap: Duration::from_millis(500), drain: Duration::from_secs_f64(args.drain) };
    eprintln!("pairs: {} pairs, {} msg/s offered for {} s", args.pairs, args.rate, args.duration);
    let stats = run_steps(ctx, conns, &schedule, 1).await;
    let steps = super::steps_report(&stats, 1);
    super::print_steps(&steps);
    let run = super::run_report(&stats);
    super::print_closes(&run["closes"]);
    Ok(json!({
        "params": {"pairs": args.pairs, "rate": args.rate, "duration_s": args.duration, "warmup_s": args.warmup,
                   "connections": n, "sends_per_connection_per_s": per_sender},
        "latency_from": super::LATENCY_FROM,
        "steps": steps,
        "run": run,
    }))
}
