//! kubechat operator: reconciles ChatCluster resources.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kubechat_operator::desired::network::OperatorPods;
use kubechat_operator::leader::LeaderConfig;
use kubechat_operator::metrics::Metrics;
use kubechat_operator::reconcile::Scope;
use kubechat_operator::run::{Options, run};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(version, about = "Reconciles ChatCluster resources into running chat clusters")]
struct Args {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "KUBECHAT_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "KUBECHAT_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: std::net::SocketAddr,
    /// Elect a leader through a Lease, so several replicas can run.
    #[arg(long, env = "KUBECHAT_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    #[arg(long, env = "KUBECHAT_LEASE_NAME", default_value = "kubechat-operator")]
    lease_name: String,
    /// Namespace of the Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Labels of this operator's pods, `key=value,…`: with the operator's
    /// namespace (`POD_NAMESPACE`), the only pods the gateways'
    /// NetworkPolicy admits to their admin port.
    #[arg(long, env = "KUBECHAT_OPERATOR_POD_LABELS", default_value = "app.kubernetes.io/name=kubechat-operator")]
    operator_pod_labels: String,
    #[arg(long, env = "KUBECHAT_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// This replica's identity (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Gateway load polls in flight at once, over all ChatClusters.
    #[arg(long, env = "KUBECHAT_DISCOVERY_CONCURRENCY", default_value_t = 32)]
    discovery_concurrency: usize,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "KUBECHAT_LOG_JSON", default_value_t = false, action = clap::ArgAction::Set)]
    log_json: bool,
}

/// Without `RUST_LOG`: the operator's own lines at INFO, kube-rs's only from
/// WARN. (A `kube=warn` directive alone also matches `kubechat_operator`:
/// targets match by prefix, and the longer directive wins.)
const DEFAULT_LOG_FILTER: &str = "info,kube=warn,kubechat_operator=info";

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    // Colour only for a terminal: a pod's log (`kubectl logs`) shows the codes as text.
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(colour);
    if json { builder.json().init() } else { builder.init() }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_json);
    let operator_pods = OperatorPods {
        namespace: args.lease_namespace.clone(),
        labels: OperatorPods::parse_labels(&args.operator_pod_labels)
            .map_err(|e| anyhow::anyhow!("--operator-pod-labels (KUBECHAT_OPERATOR_POD_LABELS): {e}"))?,
    };
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "operator".into());
        format!("{host}-{}", std::process::id())
    });
    let options = Options {
        scope: args.namespace.clone().map_or(Scope::All, Scope::Namespace),
        leader: args.leader_election.then(|| LeaderConfig {
            lease_name: args.lease_name.clone(),
            namespace: args.lease_namespace.clone(),
            identity: identity.clone(),
            lease_duration: Duration::from_secs(args.lease_seconds.max(2)),
            renew_every: Duration::from_secs((args.lease_seconds / 3).max(1)),
        }),
        instance: Some(identity),
        discovery: kubechat_operator::discovery::Options {
            max_concurrent_polls: args.discovery_concurrency.max(1),
            ..Default::default()
        },
        operator_pods,
    };
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding the admin address {}", args.admin_addr))?;
    tokio::spawn(kubechat_operator::admin::serve(listener, metrics.clone(), ready.clone(), shutdown.clone()));
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    tracing::info!(?options, "starting");
    run(client, options, metrics, ready, shutdown).await.context("operator stopped")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::DEFAULT_LOG_FILTER;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_default_filter_shows_the_operators_info_lines_and_hides_kubes() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER))
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "kubechat_operator::reconcile", "reconciled chat");
            tracing::info!(target: "kube_runtime::controller", "kube chatter");
            tracing::warn!(target: "kube_client::client", "kube trouble");
        });
        let text = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
        assert!(text.contains("reconciled chat"), "the operator's INFO line is hidden: {text:?}");
        assert!(!text.contains("kube chatter"), "kube-rs INFO shows: {text:?}");
        assert!(text.contains("kube trouble"), "kube-rs WARN is hidden: {text:?}");
    }
}
