//! Runs the controller while this replica leads (or always, without
//! leader election), until shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::Client;
use kube::runtime::events::Reporter;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::desired::network::OperatorPods;
use crate::leader::{Authority, LeaderConfig, LeaderElector};
use crate::metrics::Metrics;
use crate::reconcile::{self, Context, check_crd_installed, run_controller};
use crate::scope::Scope;
use crate::{Error, FIELD_MANAGER, discovery};

#[derive(Clone, Debug)]
pub struct Options {
    pub scope: Scope,
    /// `None`: reconcile without leader election (a single replica).
    pub leader: Option<LeaderConfig>,
    /// This replica's name in Events.
    pub instance: Option<String>,
    pub discovery: discovery::Options,
    /// This operator's pods, the only ones the gateways' NetworkPolicy
    /// admits to their admin port.
    pub operator_pods: OperatorPods,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Startup(#[from] Error),
    /// Exiting lets the pod restart as a clean standby.
    #[error("lost the leader Lease; stopping so a fresh replica can stand by")]
    LostLeadership,
}

/// Runs until `shutdown` is cancelled. `ready` turns true once the
/// operator is watching (as leader) or standing by.
pub async fn run(
    client: Client,
    options: Options,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    check_crd_installed(&client, &options.scope).await?;
    let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: options.instance.clone() };

    let Some(leader_config) = options.leader else {
        let ctx = Leading {
            client,
            metrics: metrics.clone(),
            reporter,
            authority: None,
            operator_pods: options.operator_pods.clone(),
        };
        metrics.leader.set(1);
        ready.store(true, Ordering::Relaxed);
        run_leading(ctx, options.scope, options.discovery, shutdown.clone()).await;
        return Ok(());
    };

    // Everything the controller and discovery write goes through the fence;
    // only the election itself writes with the plain client.
    let authority = Authority::new();
    let ctx = Leading {
        client: authority.fence(client.clone()),
        metrics: metrics.clone(),
        reporter,
        authority: Some(authority.clone()),
        operator_pods: options.operator_pods.clone(),
    };
    let (leading_tx, mut leading) = watch::channel(false);
    let elector_stop = shutdown.child_token();
    let elector = LeaderElector::new(client, leader_config).run(authority, leading_tx, elector_stop.clone());
    let work = async {
        ready.store(true, Ordering::Relaxed);
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            changed = leading.wait_for(|l| *l) => if changed.is_err() { return Ok(()) },
        }
        tracing::info!("leading: starting the controller");
        metrics.leader.set(1);
        let mut lost = leading.clone();
        let stop = shutdown.child_token();
        let stop_on_loss = async {
            tokio::select! {
                () = stop.cancelled() => {}
                _ = lost.wait_for(|l| !*l) => {
                    // The fence already refuses writes; this stops the work itself.
                    tracing::warn!("lost leadership: stopping the controller and discovery");
                    stop.cancel();
                }
            }
        };
        tokio::join!(
            run_leading(ctx.clone(), options.scope.clone(), options.discovery.clone(), stop.clone()),
            stop_on_loss
        );
        metrics.leader.set(0);
        if shutdown.is_cancelled() {
            return Ok(());
        }
        elector_stop.cancel();
        Err(RunError::LostLeadership)
    };
    let ((), result) = tokio::join!(elector, work);
    result
}

/// What a leader needs to start its controller.
#[derive(Clone)]
struct Leading {
    client: Client,
    metrics: Metrics,
    reporter: Reporter,
    /// The Lease term, when elected.
    authority: Option<Authority>,
    operator_pods: OperatorPods,
}

/// What the leader runs until `stop`: the controller and, from its cache of
/// ChatClusters, the discovery loop.
async fn run_leading(leading: Leading, scope: Scope, discovery: discovery::Options, stop: CancellationToken) {
    let Leading { client, metrics, reporter, authority, operator_pods } = leading;
    let (controller, owned) = reconcile::controller(client.clone(), &scope);
    let clusters = controller.store();
    let mut ctx = Context::new(client.clone(), metrics.clone(), reporter, owned, clusters.clone(), stop.clone());
    ctx.admin_loopback_only = discovery.loopback_only;
    ctx.authority = authority;
    ctx.operator_pods = operator_pods;
    let ctx = Arc::new(ctx);
    let poller = discovery::run(client, scope, clusters, metrics, discovery, stop.clone());
    let controller_stop = stop.clone();
    tokio::join!(run_controller(controller, ctx, async move { controller_stop.cancelled().await }), poller);
}
