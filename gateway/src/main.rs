//! kubechat gateway: WebSocket chat server and push worker (one binary).

use clap::Parser;

#[derive(Parser, Debug)]
#[command(version, about = "kubechat WebSocket gateway and push worker")]
enum Command {
    /// Run one gateway with the embedded durable store: no cluster, Redis or Cassandra needed.
    Standalone,
}

fn main() -> anyhow::Result<()> {
    match Command::parse() {
        Command::Standalone => {
            anyhow::bail!("the standalone gateway is not built yet (tracked by the gateway chat issue)")
        }
    }
}
