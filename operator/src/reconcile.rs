//! The ChatCluster controller: observe → desired → apply → status.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use kubechat_crds::{ChatCluster, GatewayPodStatus};
use serde_json::json;

use crate::apply::{self, Outcome};
use crate::cache::{self, Owned};
use crate::calls::{self, Verb, counted};
pub use crate::context::Context;
use crate::context::key;
use crate::desired;
use crate::desired::{DesiredObject, Names};
pub use crate::scope::Scope;
use crate::{Error, FIELD_MANAGER, Result, observe, rollout, scale, status, time};

/// Re-check a settled cluster this often even without events.
const RESYNC: Duration = Duration::from_secs(300);
/// Re-check sooner while something is missing that no watch reports (a user's Secret).
const RECHECK_DEGRADED: Duration = Duration::from_secs(15);
/// Re-check a component short of ready pods this often: why its pods do not
/// come (a quota's `FailedCreate` Event) is reported by nothing the operator
/// watches, and may arrive after the reconcile that looked.
const RECHECK_UNSETTLED: Duration = Duration::from_secs(10);

/// Entry point for the controller: metrics, tracing span and failure events
/// around [`reconcile_cluster`].
#[tracing::instrument(skip_all, fields(namespace = cc.namespace().unwrap_or_default(), name = cc.name_any()))]
pub async fn reconcile(cc: Arc<ChatCluster>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciles.inc();
    let _timer = ctx.metrics.duration.start_timer();
    ctx.forget_deleted();
    let result = calls::per_reconcile(&ctx.metrics, reconcile_cluster(&cc, &ctx)).await;
    match &result {
        // Backoff entries are reset by the reconcile itself: one that
        // applied only part of the objects keeps backing off.
        Ok(_) => {}
        Err(e) => {
            ctx.metrics.errors.with_label_values(&[e.metric_label()]).inc();
            // A ChatCluster deleted mid-reconcile fails for that reason alone: not worth an Event.
            if ctx.still_exists(&key(&cc)) {
                let event = warning("ReconcileFailed", "Reconcile", e.to_string());
                ctx.publish(&cc, event).await;
            }
        }
    }
    result
}

pub fn error_policy(cc: Arc<ChatCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.next_backoff(&cc);
    tracing::warn!(namespace = cc.namespace().unwrap_or_default(), name = cc.name_any(), %error, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

fn warning(reason: &str, action: &str, note: String) -> Event {
    Event { type_: EventType::Warning, reason: reason.into(), note: Some(note), action: action.into(), secondary: None }
}

/// A gateway pod Kubernetes is taking away (an eviction by `kubectl drain`,
/// a preemption): its gateway drains on SIGTERM within the pod's grace
/// period, which the desired StatefulSet sets past the drain window.
async fn publish_disruption(cc: &ChatCluster, ctx: &Context, namespace: &str, gateway: &GatewayPodStatus) {
    let cause = gateway.disruption.as_deref().unwrap_or_default();
    ctx.metrics.gateway_disruptions.with_label_values(&[cause]).inc();
    let drain = &cc.spec.gateway.drain;
    let (reason, what) = match cause {
        "EvictionByEvictionAPI" => ("GatewayEvicted", "is being evicted (the Eviction API, e.g. kubectl drain)".into()),
        other => ("GatewayDisrupted", format!("is being taken away ({other})")),
    };
    let note = format!(
        "{} {what}: its gateway drains its {} connections within {} s, at most {} reconnects/s, before it stops",
        gateway.pod, gateway.connections, drain.window_seconds, drain.max_reconnects_per_second
    );
    tracing::info!(pod = %gateway.pod, cause, "gateway pod disrupted");
    let pod = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(gateway.pod.clone()),
        namespace: Some(namespace.to_string()),
        ..ObjectReference::default()
    };
    let event = Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(note),
        action: "Drain".into(),
        secondary: Some(pod),
    };
    ctx.publish(cc, event).await;
}

async fn reconcile_cluster(cc: &ChatCluster, ctx: &Context) -> Result<Action> {
    let namespace = cc.namespace().ok_or(Error::NoNamespace)?;
    if cc.metadata.deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove the rest.
        return Ok(Action::await_change());
    }
    // The caches fill from streams the controller polls, and it stops
    // polling them at shutdown: never wait past that.
    tokio::select! {
        ready = ctx.owned.wait_until_ready() => if !ready { return Err(Error::CacheClosed) },
        () = ctx.stop.cancelled() => return Ok(Action::await_change()),
    }

    for secret in desired::generated_secrets(cc) {
        ensure_generated_secret(cc, ctx, &namespace, &secret).await?;
    }

    // How many gateways, then the next rollout or scale-down step: a
    // gateway is removed only once drained, by the replicas the step lowers.
    let now = time::now();
    let mut scale = scale::decide(&scale_input(cc, ctx, &namespace, now));
    let driven = rollout::drive(cc, ctx, &namespace, scale.keep).await;
    let removed = driven.as_ref().ok().and_then(rollout::Report::replicas);
    // Read again now: the StatefulSet may have changed while the driver ran
    // (a removal a moment ago), and applying an older count would undo it.
    let gateways = removed.or(scale.replicas).unwrap_or_else(|| {
        let live = observe::gateway_replicas(&ctx.owned, cc, &namespace);
        live.unwrap_or_else(|| scale::initial_replicas(&cc.spec.gateway))
    });
    // A rollout's surge gateways come on top of what the scale keeps. A
    // driver that failed this time keeps the surge as recorded: dropping
    // the record would make the scale count the surge gateway as load.
    let surge = match &driven {
        Ok(report) => report.surge(),
        Err(_) => ctx
            .owned
            .get::<StatefulSet>(&namespace, &Names(&cc.name_any()).gateway())
            .map_or(0, |s| rollout::surge_of(&s)),
    };
    let gateways = if surge > 0 { gateways.max(scale.keep + surge) } else { gateways };

    // Desired → apply. One object the apiserver refuses does not hold back
    // the others: each failure is reported in the status instead.
    let mut desired = desired::desired_objects(cc, gateways, &ctx.operator_pods);
    desired::gateway::mark_surge(&mut desired, cc, surge);
    let gateway_set = Names(&cc.name_any()).gateway();
    let mut gateways_applied = true;
    let mut refused = Vec::new();
    for object in &desired {
        match apply::apply(&ctx.client, &ctx.owned, &namespace, object).await {
            Ok(Outcome::Unchanged) => {}
            Ok(outcome) => {
                let verb = if outcome == Outcome::Created { "Created" } else { "Updated" };
                ctx.metrics.writes.inc();
                ctx.metrics.objects_applied.with_label_values(&[object.kind(), &verb.to_lowercase()]).inc();
                tracing::info!(kind = object.kind(), object = object.name(), "{}", verb.to_lowercase());
                // The object is the Event's `related` object, so each object's
                // Event is its own (not merged into one series per reason).
                let event = Event {
                    type_: EventType::Normal,
                    reason: verb.into(),
                    note: Some(object.applied_note(verb)),
                    action: "Apply".into(),
                    secondary: Some(object.object_ref()),
                };
                ctx.publish(cc, event).await;
            }
            Err(e) => {
                ctx.metrics.errors.with_label_values(&["apply"]).inc();
                tracing::warn!(kind = object.kind(), object = object.name(), error = e.api_message(), "apply refused");
                refused.push(format!("{} {}: {}", object.kind(), object.name(), e.api_message()));
                if matches!(object, DesiredObject::StatefulSet(_)) && object.name() == gateway_set {
                    gateways_applied = false;
                }
            }
        }
    }

    // Objects the spec no longer calls for (a backend switched to external).
    refused.extend(crate::prune::prune(cc, ctx, &namespace, &desired).await);

    if gateways_applied {
        publish_scaling(cc, ctx, &scale, driven.as_ref().ok(), gateways).await;
    }
    let rollout = driven?;
    if let (Some(replicas), Some(status)) = (removed, scale.status.as_mut()) {
        status.current_replicas = replicas;
        status.last_scale_time = Some(time::rfc3339(now));
    }

    // Observe → status.
    let mut observed = observe::observe(&ctx.client, &ctx.owned, cc, &namespace).await?;
    observed.refused = refused;
    observed.gateways_wanted = Some(scale.keep);
    let now = Time(Timestamp::from_second(now).unwrap_or(Timestamp::UNIX_EPOCH));
    let mut new_status = status::compute(cc, &observed, cc.status.as_ref(), &now);
    new_status.autoscale = scale.status.clone();
    rollout.apply(&mut new_status, cc.status.as_ref(), &now);
    let mut status_deferred = None;
    if cc.status.as_ref() != Some(&new_status)
        && let Some(wait) = ctx.status_write_wait(cc)
    {
        // Written moments ago: write again once the bound allows.
        ctx.metrics.status_deferred.inc();
        status_deferred = Some(wait);
    } else if cc.status.as_ref() != Some(&new_status) {
        let became_degraded = new_status
            .conditions
            .iter()
            .find(|c| c.type_ == status::DEGRADED && c.status == "True")
            .filter(|c| cc.status.as_ref().is_none_or(|old| !same_condition(&old.conditions, c)))
            .map(|c| (c.reason.clone(), c.message.clone()));
        let disrupted: Vec<GatewayPodStatus> =
            status::newly_disrupted(cc.status.as_ref(), &new_status).into_iter().cloned().collect();
        let api = Api::<ChatCluster>::namespaced(ctx.client.clone(), &namespace);
        let patch = Patch::Merge(json!({ "status": new_status }));
        match counted(Verb::Patch, api.patch_status(&cc.name_any(), &PatchParams::default(), &patch)).await {
            Ok(_) => {}
            // Deleted since this reconcile started.
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(Action::await_change()),
            Err(e) => return Err(Error::kube("updating ChatCluster status")(e)),
        }
        ctx.metrics.writes.inc();
        ctx.metrics.status_updates.inc();
        if let Some((reason, message)) = became_degraded {
            ctx.publish(cc, warning(&reason, "Observe", message)).await;
        }
        for gateway in disrupted {
            publish_disruption(cc, ctx, &namespace, &gateway).await;
        }
    }

    if !observed.refused.is_empty() {
        // Retried with backoff, like a failed reconcile, until the spec is fixed.
        let backoff = ctx.next_backoff(cc);
        return Ok(Action::requeue(status_deferred.map_or(backoff, |wait| wait.min(backoff))));
    }
    if let Some(wait) = status_deferred {
        return Ok(Action::requeue(wait));
    }
    ctx.reset_failures(&key(cc));
    let action = if !observed.missing_secrets.is_empty() || !observed.stuck.is_empty() {
        Action::requeue(RECHECK_DEGRADED)
    } else if observed.short_of_ready() {
        Action::requeue(RECHECK_UNSETTLED)
    } else {
        Action::requeue(RESYNC)
    };
    // A rollout step in flight, or the end of a cool-down, is checked again sooner.
    let sooner = [rollout.requeue(), scale.recheck].into_iter().flatten().min();
    Ok(sooner.map_or(action, Action::requeue))
}

/// What the gateway count depends on, from the caches: the StatefulSet's
/// replicas and the connections the endpoint list publishes.
fn scale_input<'a>(cc: &'a ChatCluster, ctx: &Context, namespace: &str, now: i64) -> scale::Input<'a> {
    // A rollout's surge gateways are not the load's.
    let sts = ctx.owned.get::<StatefulSet>(namespace, &Names(&cc.name_any()).gateway());
    let current = sts.as_deref().and_then(|s| Some(s.spec.replicas? - rollout::surge_of(s)));
    let endpoints = observe::published_endpoints(&ctx.owned, cc, namespace);
    let connections = endpoints.as_ref().map(|e| e.total_connections());
    let unread = endpoints.iter().flat_map(|e| e.unread()).map(|g| g.pod.clone()).collect();
    let previous = cc.status.as_ref().and_then(|s| s.autoscale.as_ref());
    scale::Input { gateway: &cc.spec.gateway, current, connections, previous, now, unread }
}

/// `ScaledUp` and `ScaledDown` Events, once the StatefulSet has its new
/// replicas. The Event's related object is the highest pod added or the one
/// removed, so each change is an Event of its own.
async fn publish_scaling(
    cc: &ChatCluster,
    ctx: &Context,
    scale: &scale::Scale,
    driven: Option<&rollout::Report>,
    gateways: i32,
) {
    let names = Names(&cc.name_any());
    let pod = |ordinal: i32| ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(format!("{}-{ordinal}", names.gateway())),
        namespace: cc.namespace(),
        ..ObjectReference::default()
    };
    let changes = [
        (scale.scaled_up.clone(), "ScaledUp", gateways - 1),
        (driven.and_then(rollout::Report::scaled_down), "ScaledDown", gateways),
    ];
    for (note, reason, ordinal) in changes {
        let Some(note) = note else { continue };
        tracing::info!(cluster = %cc.name_any(), "{note}");
        let event = Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note),
            action: "Scale".into(),
            secondary: Some(pod(ordinal)),
        };
        ctx.publish(cc, event).await;
    }
}

/// Whether `conditions` already hold `condition` with the same status, reason and message.
fn same_condition(conditions: &[Condition], condition: &Condition) -> bool {
    conditions.iter().any(|c| {
        c.type_ == condition.type_
            && c.status == condition.status
            && c.reason == condition.reason
            && c.message == condition.message
    })
}

/// Creates a generated Secret once; an existing one is left alone.
async fn ensure_generated_secret(
    cc: &ChatCluster,
    ctx: &Context,
    namespace: &str,
    secret: &desired::secrets::GeneratedSecret,
) -> Result<()> {
    let name = &secret.name;
    if ctx.owned.get::<Secret>(namespace, name).is_some() {
        return Ok(());
    }
    // Not in the cache: maybe just created and not seen yet. Ask once.
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    if counted(Verb::Get, api.get_opt(name)).await.map_err(Error::kube(format!("reading Secret {name}")))?.is_some() {
        return Ok(());
    }
    let mut random = [0u8; desired::secrets::RANDOM_BYTES];
    getrandom::fill(&mut random).map_err(|e| Error::Random(e.to_string()))?;
    let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let object = secret.build(cc, &random);
    match counted(Verb::Create, api.create(&params, &object)).await {
        Ok(_) => {
            ctx.metrics.writes.inc();
            ctx.metrics.objects_applied.with_label_values(&["Secret", "created"]).inc();
            let event = Event {
                type_: EventType::Normal,
                reason: "Created".into(),
                note: Some(format!("Created Secret {name} with a new {}", secret.purpose)),
                action: "Apply".into(),
                secondary: Some(object.object_ref(&())),
            };
            ctx.publish(cc, event).await;
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

/// The ChatCluster controller, triggered by the kinds the operator owns,
/// and the caches those watches fill.
pub fn controller(client: Client, scope: &Scope) -> (Controller<ChatCluster>, Owned) {
    let watches = cache::watches(&client, scope);
    let controller = Controller::new(scope.api::<ChatCluster>(client), watcher::Config::default())
        .owns_stream(watches.stateful_sets)
        .owns_stream(watches.deployments)
        .owns_stream(watches.services)
        .owns_stream(watches.config_maps)
        .owns_stream(watches.disruption_budgets)
        .owns_stream(watches.network_policies)
        .owns_stream(watches.secrets);
    (controller, watches.owned)
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
