//! kubechat-bench: a WebSocket load generator for kubechat gateways and, with
//! the same workloads, Centrifugo (the peer in docs/benchmarks.md).
//!
//! Prints one JSON result on stdout (or into `--json FILE`) and a summary on
//! stderr; exits non-zero when the server cannot be reached or refuses the
//! token.

mod driver;
mod net;
mod payload;
mod procfs;
mod proto;
mod stats;
mod workload;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::json;

use proto::{Client, Server};
use workload::Context;

#[derive(Parser, Debug)]
#[command(version, about = "Load generator for kubechat gateways and Centrifugo (docs/benchmarks.md)")]
struct Cli {
    /// Which protocol the server speaks.
    #[arg(long, value_enum, default_value = "kubechat", global = true)]
    server: Server,
    /// Server URL (loopback only); repeat for several gateways: connections alternate.
    /// Default: ws://127.0.0.1:8080/v1/ws (kubechat), ws://127.0.0.1:8000/connection/websocket (Centrifugo).
    #[arg(long = "url", global = true)]
    urls: Vec<String>,
    /// HMAC key tokens are signed with (kubechat: the signing key; Centrifugo: client.token.hmac_secret_key).
    #[arg(long, env = "KUBECHAT_BENCH_KEY", hide_env_values = true, global = true)]
    key: Option<String>,
    /// File holding the key (the standalone gateway's `<data-dir>/signing-key`); whitespace around it is ignored.
    #[arg(long, global = true)]
    key_file: Option<PathBuf>,
    /// Server process to sample from /proc (CPU time, RSS) during measured
    /// intervals; repeat for several gateways (their usage is summed).
    #[arg(long = "server-pid", global = true)]
    server_pids: Vec<u32>,
    /// Write the JSON result here instead of stdout.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Connections sharing one 127.x source address.
    #[arg(long, default_value_t = 1000, global = true)]
    per_source_ip: usize,
    /// First source address (default: 127.N.0.1 with N random per run).
    #[arg(long, global = true)]
    source_base: Option<Ipv4Addr>,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256, global = true)]
    concurrency: usize,
    /// Seconds a connection may take to be set up and authenticated.
    #[arg(long, default_value_t = 10.0, value_parser = seconds, global = true)]
    timeout: f64,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 100, global = true)]
    size: usize,
    /// Client threads (1: a single-threaded runtime, the lightest client).
    #[arg(long, default_value_t = 1, global = true)]
    threads: usize,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Subcommand, Debug)]
enum Workload {
    /// Hold N idle authenticated connections (memory and CPU per connection).
    Idle(workload::idle::IdleArgs),
    /// Open N connections as fast as possible (setups per second).
    Connect(workload::connect::ConnectArgs),
    /// One-to-one messages between P pairs at a total offered rate.
    Pairs(workload::pairs::PairsArgs),
    /// Fan-out into one group of M members at one or more offered rates.
    Group(workload::group::GroupArgs),
    /// Raw CQL writes against the store itself (the ceiling of the clustered send path).
    Cql(workload::cql::CqlArgs),
    /// The broker alone: one Redis driven as gateways drive it per send (docs/capacity.md).
    Broker(workload::broker::BrokerArgs),
}

/// Durations are bounded: a benchmark always ends by itself.
pub fn seconds(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if !(0.0..=3600.0).contains(&value) {
        return Err("must be between 0 and 3600 seconds".into());
    }
    Ok(value)
}

fn main() {
    let cli = Cli::parse();
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(cli.threads).enable_all().build()
    };
    let result = runtime.context("starting the runtime").and_then(|rt| rt.block_on(run(cli)));
    if let Err(error) = result {
        eprintln!("kubechat-bench: error: {error:#}");
        std::process::exit(1);
    }
}

fn key(cli: &Cli) -> anyhow::Result<Vec<u8>> {
    let key = match (&cli.key, &cli.key_file) {
        (Some(key), _) => key.clone().into_bytes(),
        (None, Some(path)) => {
            std::fs::read(path).with_context(|| format!("reading the key file {}", path.display()))?
        }
        (None, None) => anyhow::bail!("no signing key: pass --key-file <data-dir>/signing-key or --key"),
    };
    Ok(key.trim_ascii().to_vec())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let fd_limit = net::raise_fd_limit();
    let urls = if cli.urls.is_empty() {
        vec![match cli.server {
            Server::Kubechat => "ws://127.0.0.1:8080/v1/ws".to_string(),
            Server::Centrifugo => "ws://127.0.0.1:8000/connection/websocket".to_string(),
        }]
    } else {
        cli.urls.clone()
    };
    let endpoints = urls.iter().map(|u| net::Endpoint::parse(u)).collect::<anyhow::Result<Vec<_>>>()?;
    // The raw CQL workload signs nothing.
    let key = if matches!(cli.workload, Workload::Cql(_) | Workload::Broker(_)) { Vec::new() } else { key(&cli)? };
    let client = Client { server: cli.server, key, timeout: Duration::from_secs_f64(cli.timeout) };
    let run_id = run_id();
    let ctx = Context {
        client,
        endpoints,
        sources: net::SourcePool::new(cli.source_base, cli.per_source_ip),
        concurrency: cli.concurrency,
        server_pids: cli.server_pids.clone(),
        text_size: cli.size,
        run_id: run_id.clone(),
    };
    let (name, result) = match &cli.workload {
        Workload::Idle(args) => ("idle", workload::idle::run(&ctx, args).await?),
        Workload::Connect(args) => ("connect", workload::connect::run(&ctx, args).await?),
        Workload::Pairs(args) => ("pairs", workload::pairs::run(&ctx, args).await?),
        Workload::Group(args) => ("group", workload::group::run(&ctx, args).await?),
        Workload::Cql(args) => ("cql", workload::cql::run(&ctx, args).await?),
        Workload::Broker(args) => ("broker", workload::broker::run(&ctx, args).await?),
    };
    let mut report = json!({
        "tool": "kubechat-bench",
        "tool_version": env!("CARGO_PKG_VERSION"),
        "server": cli.server,
        "urls": urls,
        "workload": name,
        "run_id": run_id,
        "message_bytes": cli.size,
        "client_threads": cli.threads,
        "client_fd_limit": fd_limit,
        "server_pids": cli.server_pids,
    });
    if let (Some(report), Some(result)) = (report.as_object_mut(), result.as_object()) {
        report.extend(result.clone());
    }
    let text = serde_json::to_string_pretty(&report)?;
    match &cli.json {
        Some(path) => std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}

/// Short and unique per invocation: user names of different runs never meet.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut n = (nanos as u64) ^ (u64::from(std::process::id()) << 40);
    let mut id = String::from("b");
    for _ in 0..8 {
        id.push(char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[(n % 36) as usize]));
        n /= 36;
    }
    id
}
