//! Group fan-out: M members all connected, one group (kubechat) or channel
//! (Centrifugo), the offered rate spread over the senders, stepped over a
//! list of rates in one run.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Context, Schedule, StepSpec, open_required, run_steps};
use crate::driver::{Conn, Sender};
use crate::proto::{Server, Target, centrifugo, kubechat};

#[derive(clap::Args, Debug, Clone)]
pub struct GroupArgs {
    /// Members of the group, all connected (kubechat allows 100 by default).
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// How many members send (the first ones); default all.
    #[arg(long)]
    pub senders: Option<usize>,
    /// Offered messages per second into the group, one step per value.
    #[arg(long, value_delimiter = ',', default_value = "500,750,1000,2000")]
    pub rates: Vec<f64>,
    /// Measured seconds per step.
    #[arg(long, default_value_t = 10.0, value_parser = crate::seconds)]
    pub duration: f64,
    /// Seconds at the first rate before measuring (reported separately).
    #[arg(long, default_value_t = 2.0, value_parser = crate::seconds)]
    pub warmup: f64,
    /// Seconds between steps, for the previous step's deliveries to land.
    #[arg(long, default_value_t = 2.0, value_parser = crate::seconds)]
    pub gap: f64,
    /// Seconds to wait for the last acks and deliveries.
    #[arg(long, default_value_t = 10.0, value_parser = crate::seconds)]
    pub drain: f64,
}

fn user(ctx: &Context, i: usize) -> String {
    format!("{}m{i}", ctx.run_id)
}

pub async fn run(ctx: &Context, args: &GroupArgs) -> anyhow::Result<Value> {
    let m = args.members;
    anyhow::ensure!(m >= 2, "--members must be at least 2");
    anyhow::ensure!(!args.rates.is_empty(), "--rates needs at least one rate");
    let senders = args.senders.unwrap_or(m).clamp(1, m);
    let max_rate = args.rates.iter().copied().fold(0.0, f64::max);
    if ctx.client.server == Server::Kubechat && max_rate / senders as f64 > 40.0 {
        eprintln!(
            "warning: {:.0} sends/s per sender at {max_rate} msg/s is near kubechat's limit of 50/s: expect rate_limited",
            max_rate / senders as f64
        );
    }
    eprintln!("group: opening {m} connections");
    // kubechat: the first member creates the group before the others connect.
    let mut owner = ctx.client.connect(ctx.endpoint(0), ctx.source(0), &user(ctx, 0), "bench").await?;
    let group = match ctx.client.server {
        Server::Kubechat => {
            let members: Vec<String> = (1..m).map(|i| user(ctx, i)).collect();
            kubechat::create_group(&mut owner, &format!("bench-{}", ctx.run_id), &members).await?
        }
        Server::Centrifugo => ctx.run_id.clone(),
    };
    let target = Target::Group(group.clone());
    let mut sockets = vec![owner];
    let channel = centrifugo::channel(&target);
    let rest = open_required(ctx, m - 1, |i| {
        let channel = &channel;
        async move {
            let i = i + 1;
            let mut ws = ctx.client.connect(ctx.endpoint(i), ctx.source(i), &user(ctx, i), "bench").await?;
            if ctx.client.server == Server::Centrifugo {
                centrifugo::subscribe(&mut ws, channel).await?;
            }
            Ok(ws)
        }
    })
    .await?;
    sockets.extend(rest);
    if ctx.client.server == Server::Centrifugo {
        centrifugo::subscribe(&mut sockets[0], &channel).await?;
    }
    let conns = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| Conn {
            ws,
            heartbeat: ctx.client.heartbeat().map(|_| Duration::from_secs(5)),
            sender: (i < senders).then(|| Sender {
                target: target.clone(),
                index: i as u64,
                senders: senders as u64,
                stream: 0,
                shared_stream: true,
                key_prefix: format!("{}-{i}", ctx.run_id),
            }),
        })
        .collect();
    let mut steps = Vec::new();
    if args.warmup > 0.0 {
        steps.push(StepSpec { rate: args.rates[0], duration: Duration::from_secs_f64(args.warmup), warmup: true });
    }
    for &rate in &args.rates {
        steps.push(StepSpec { rate, duration: Duration::from_secs_f64(args.duration), warmup: false });
    }
    let schedule =
        Schedule { steps, gap: Duration::from_secs_f64(args.gap), drain: Duration::from_secs_f64(args.drain) };
    let recipients = if ctx.client.delivers_to_sender() { m as u64 } else { m as u64 - 1 };
    eprintln!("group: {m} members, {senders} senders, rates {:?} msg/s, {} s each", args.rates, args.duration);
    let stats = run_steps(ctx, conns, &schedule, recipients).await;
    let steps = super::steps_report(&stats, recipients);
    super::print_steps(&steps);
    let run = super::run_report(&stats);
    super::print_closes(&run["closes"]);
    Ok(json!({
        "params": {"members": m, "senders": senders, "rates": args.rates, "duration_s": args.duration,
                   "warmup_s": args.warmup, "gap_s": args.gap},
        "group": group,
        "latency_from": super::LATENCY_FROM,
        "steps": steps,
        "run": run,
    }))
}
