//! The ChatCluster controller: observe → desired → apply → status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use kubechat_crds::ChatCluster;
use serde_json::json;

use crate::apply::{self, Outcome};
use crate::desired::{self, LABEL_MANAGED_BY};
use crate::metrics::Metrics;
pub use crate::scope::Scope;
use crate::{Error, FIELD_MANAGER, Result, observe, status};

/// Re-check a settled cluster this often even without events.
const RESYNC: Duration = Duration::from_secs(300);
/// Re-check sooner while something is missing that no watch reports (a user's Secret).
const RECHECK_DEGRADED: Duration = Duration::from_secs(15);
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Consecutive failures per ChatCluster, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, metrics: Metrics, reporter: Reporter) -> Self {
        Self { recorder: Recorder::new(client.clone(), reporter), client, metrics, failures: Mutex::default() }
    }

    fn reset_failures(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }

    fn next_backoff(&self, key: &str) -> Duration {
        let attempt = match self.failures.lock() {
            Ok(mut failures) => {
                let n = failures.entry(key.to_string()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        backoff(attempt, jitter_fraction())
    }

    async fn publish(&self, cc: &ChatCluster, type_: EventType, reason: &str, action: &str, note: String) {
        let event = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
        if let Err(e) = self.recorder.publish(&event, &cc.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish event");
        }
    }
}

/// Delay before retry `attempt` (1-based): doubling from 0.5 s up to 5 min,
/// stretched by `jitter` (0..1, up to +20%) so failing clusters spread out.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(20);
    let base = BACKOFF_BASE.saturating_mul(1u32 << exponent).min(BACKOFF_MAX);
    base.mul_f64(1.0 + 0.2 * jitter.clamp(0.0, 1.0))
}

fn jitter_fraction() -> f64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1000) / 1000.0
}

fn key(cc: &ChatCluster) -> String {
    format!("{}/{}", cc.namespace().unwrap_or_default(), cc.name_any())
}

/// Entry point for the controller: metrics, tracing span and failure events
/// around [`reconcile_cluster`].
#[tracing::instrument(skip_all, fields(namespace = cc.namespace().unwrap_or_default(), name = cc.name_any()))]
pub async fn reconcile(cc: Arc<ChatCluster>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciles.inc();
    let _timer = ctx.metrics.duration.start_timer();
    let result = reconcile_cluster(&cc, &ctx).await;
    match &result {
        Ok(_) => ctx.reset_failures(&key(&cc)),
        Err(e) => {
            ctx.metrics.errors.with_label_values(&[e.metric_label()]).inc();
            ctx.publish(&cc, EventType::Warning, "ReconcileFailed", "Reconcile", e.to_string()).await;
        }
    }
    result
}

pub fn error_policy(cc: Arc<ChatCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.next_backoff(&key(&cc));
    tracing::warn!(namespace = cc.namespace().unwrap_or_default(), name = cc.name_any(), %error, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

async fn reconcile_cluster(cc: &ChatCluster, ctx: &Context) -> Result<Action> {
    let namespace = cc.namespace().ok_or(Error::NoNamespace)?;

    // Desired → apply.
    for secret in desired::secrets::generated(cc) {
        ensure_generated_secret(cc, ctx, &namespace, &secret).await?;
    }
    for object in desired::desired_objects(cc) {
        let outcome = apply::apply(&ctx.client, &namespace, &object).await?;
        if outcome != Outcome::Unchanged {
            let verb = if outcome == Outcome::Created { "Created" } else { "Updated" };
            ctx.metrics.writes.inc();
            ctx.metrics.objects_applied.with_label_values(&[object.kind(), &verb.to_lowercase()]).inc();
            tracing::info!(kind = object.kind(), object = object.name(), "{}", verb.to_lowercase());
            ctx.publish(cc, EventType::Normal, verb, "Apply", format!("{verb} {} {}", object.kind(), object.name()))
                .await;
        }
    }

    // Observe → status.
    let observed = observe::observe(&ctx.client, cc, &namespace).await?;
    let now = Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH));
    let new_status = status::compute(cc, &observed, cc.status.as_ref(), &now);
    if cc.status.as_ref() != Some(&new_status) {
        let became_degraded = new_status
            .conditions
            .iter()
            .find(|c| c.type_ == status::DEGRADED && c.status == "True")
            .filter(|_| cc.status.as_ref().is_none_or(|old| !is_true(&old.conditions, status::DEGRADED)))
            .map(|c| (c.reason.clone(), c.message.clone()));
        Api::<ChatCluster>::namespaced(ctx.client.clone(), &namespace)
            .patch_status(&cc.name_any(), &PatchParams::default(), &Patch::Merge(json!({ "status": new_status })))
            .await
            .map_err(Error::kube("updating ChatCluster status"))?;
        ctx.metrics.writes.inc();
        ctx.metrics.status_updates.inc();
        if let Some((reason, message)) = became_degraded {
            ctx.publish(cc, EventType::Warning, &reason, "Observe", message).await;
        }
    }

    Ok(if observed.missing_secrets.is_empty() { Action::requeue(RESYNC) } else { Action::requeue(RECHECK_DEGRADED) })
}

fn is_true(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

/// Creates a generated Secret once; an existing one is left alone.
async fn ensure_generated_secret(
    cc: &ChatCluster,
    ctx: &Context,
    namespace: &str,
    secret: &desired::secrets::GeneratedSecret,
) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let name = &secret.name;
    if api.get_opt(name).await.map_err(Error::kube(format!("reading Secret {name}")))?.is_some() {
        return Ok(());
    }
    let mut random = [0u8; desired::secrets::RANDOM_BYTES];
    getrandom::fill(&mut random).map_err(|e| Error::Random(e.to_string()))?;
    let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    match api.create(&params, &secret.build(cc, &random)).await {
        Ok(_) => {
            ctx.metrics.writes.inc();
            ctx.metrics.objects_applied.with_label_values(&["Secret", "created"]).inc();
            ctx.publish(
                cc,
                EventType::Normal,
                "Created",
                "Apply",
                format!("Created Secret {name} with a new {}", secret.purpose),
            )
            .await;
            Ok(())
        }
        // Another reconcile created it first: fine, keep theirs.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(Error::kube(format!("creating Secret {name}"))(e)),
    }
}

/// Fails with a clear message when the CRD is not installed.
pub async fn check_crd_installed(client: &Client, scope: &Scope) -> Result<()> {
    let api: Api<ChatCluster> = scope.api(client.clone());
    api.list(&kube::api::ListParams::default().limit(1))
        .await
        .map(|_| ())
        .map_err(Error::kube("listing ChatClusters (is the CRD installed? `kubectl apply -f crds/`)"))
}

/// The ChatCluster controller, watching the kinds the operator owns.
pub fn controller(client: Client, scope: &Scope) -> Controller<ChatCluster> {
    let owned = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={FIELD_MANAGER}"));
    Controller::new(scope.api::<ChatCluster>(client.clone()), watcher::Config::default())
        .owns(scope.api::<StatefulSet>(client.clone()), owned.clone())
        .owns(scope.api::<Deployment>(client.clone()), owned.clone())
        .owns(scope.api::<Service>(client.clone()), owned.clone())
        .owns(scope.api::<ConfigMap>(client.clone()), owned.clone())
        .owns(scope.api::<PodDisruptionBudget>(client.clone()), owned.clone())
        .owns(scope.api::<NetworkPolicy>(client.clone()), owned.clone())
        .owns(scope.api::<Secret>(client), owned)
}

/// Runs `controller` until `shutdown` resolves.
pub async fn run_controller(
    controller: Controller<ChatCluster>,
    ctx: Arc<Context>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(2, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(4, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(30, 0.0), BACKOFF_MAX);
        assert_eq!(backoff(1, 1.0), Duration::from_millis(600));
    }
}
