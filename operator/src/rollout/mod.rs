//! Gateway rollouts and scale-downs driven by the operator, one drained
//! pod at a time.
//!
//! The gateway StatefulSet uses `updateStrategy: OnDelete`, so a changed pod
//! template replaces nothing by itself. Each reconcile the driver here
//! observes the gateway pods, asks [`plan`] for the next step and takes it:
//!
//! 1. close the pod's readiness gate (`kubechat.dev/serving` False: it leaves
//!    the client Service, its connections stay), recorded on the pod by the
//!    annotation [`DRAIN_STARTED_ANNOTATION`], then `POST /v1/admin/drain`
//!    (the gateway reports `draining`, which the endpoint list shows);
//! 2. wait until it holds no connection or the drain deadline passed;
//! 3. delete it; the StatefulSet creates it again at the new revision;
//! 4. open the new pod's gate once its gateway is ready, and wait until it
//!    is ready, serving and listed before the next pod.
//!
//! Highest ordinal first; never a second gateway down. A scale-down (fewer
//! gateways to keep than the StatefulSet runs, `crate::scale`) drains the
//! highest pod the same way, then lowers the StatefulSet's replicas instead
//! of deleting the pod ([`Report::replicas`]). A replacement that
//! does not come up within `spec.gateway.rollout.podReadyTimeoutSeconds`
//! stops the rollout (`Degraded`); `kubechat.dev/paused: "true"` on the
//! ChatCluster stops it at the next pod boundary and cancels a drain under
//! way (`DELETE /v1/admin/drain`), as does a spec that goes back to the
//! revision the draining pod runs. The drain requests carry the cluster's
//! admin token (`desired::admin_token`), read from the Secret cache.
//!
//! "Listed" means the endpoint ConfigMap lists the pod ready, the pod's
//! own gateway answers ready at the listed URL (the list is by pod name, so
//! a stale entry of the pod it replaced does not count), and a synthetic
//! client's WebSocket connect at that URL is answered ([`probe`]).
//!
//! Pods are not in the watch caches: they are listed only while the
//! StatefulSet shows a rollout or a pod short of ready, a rollout is in
//! the status, or the cluster shrinks.

pub mod plan;
pub mod probe;

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use kubechat_crds::{ChatCluster, ChatClusterStatus};
use serde_json::json;

use self::plan::{Input, Plan, PodState, Step};
use crate::calls::{Verb, counted};
use crate::context::Context;
use crate::desired::gateway::{COMPONENT, SERVING_CONDITION};
use crate::desired::{LABEL_COMPONENT, LABEL_INSTANCE, Names, admin_token, auth};
use crate::discovery::endpoints::Endpoints;
use crate::discovery::{self, poll};
use crate::status::{DEGRADED, PROGRESSING};
use crate::time;
use crate::{Error, Result, observe};

pub use crate::desired::PAUSED_ANNOTATION;
/// On a gateway pod: when the operator started draining it (RFC 3339).
pub const DRAIN_STARTED_ANNOTATION: &str = "kubechat.dev/drain-started";
/// On a new gateway pod: its `PodReplaced` Event was published (so a new
/// leader, or a reconcile reading a stale status, does not repeat it).
pub const REPLACEMENT_REPORTED_ANNOTATION: &str = "kubechat.dev/replacement-reported";
const REVISION_LABEL: &str = "controller-revision-hash";
pub use crate::desired::gateway::SURGE_ANNOTATION;
/// A drain counts as over this long after its window, emptied or not (the
/// gateway closes whoever is left at the window's end, over a second).
const DRAIN_MARGIN_SECONDS: i64 = 5;
/// Look again this soon while a step is under way.
const REQUEUE_ACTIVE: Duration = Duration::from_secs(1);
/// … and this soon while stuck or paused (a spec or annotation change
/// triggers a reconcile anyway).
const REQUEUE_IDLE: Duration = Duration::from_secs(10);
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);
/// A probe's connect, token check and session start (Redis included).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the rollout did this reconcile, for the status and the requeue.
#[derive(Debug, Default)]
pub struct Report {
    plan: Option<Plan>,
    /// The StatefulSet's replicas before this reconcile.
    replicas: i32,
    /// Gateways the rollout keeps beyond the scale's while old pods remain
    /// (`gateway.rollout.maxSurge`); recorded on the StatefulSet
    /// ([`SURGE_ANNOTATION`]) so the scale does not count them.
    surge: i32,
}

impl Report {
    /// Surge gateways wanted now (see [`SURGE_ANNOTATION`]).
    pub fn surge(&self) -> i32 {
        self.surge
    }

    /// The StatefulSet's replicas after a drained pod is removed (`None`:
    /// no removal this reconcile).
    pub fn replicas(&self) -> Option<i32> {
        match self.plan.as_ref()?.step {
            Step::Remove { ordinal, .. } => Some(ordinal),
            _ => None,
        }
    }

    /// The note of a `ScaledDown` Event, when a pod was removed.
    pub fn scaled_down(&self) -> Option<String> {
        let Step::Remove { ordinal, pod, drained_for, .. } = &self.plan.as_ref()?.step else { return None };
        let pod = pod.as_deref().unwrap_or("a pod that does not exist");
        let how = drained_for.map_or_else(|| "which served no one".to_string(), |s| format!("after a {s} s drain"));
        Some(format!("Scaled gateways {} → {ordinal}: removed {pod}, {how}", self.replicas))
    }

    /// How soon to reconcile again; `None`: the rollout does not care.
    pub fn requeue(&self) -> Option<Duration> {
        let plan = self.plan.as_ref()?;
        match (&plan.step, &plan.rollout) {
            (Step::Idle, _) => None,
            (Step::Wait, Some(r)) if r.phase == plan::STUCK || r.phase == plan::PAUSED => Some(REQUEUE_IDLE),
            _ => Some(REQUEUE_ACTIVE),
        }
    }

    /// Writes `status.rollout` and, during a rollout, the `Progressing`
    /// (and when stuck, `Degraded`) conditions into `status`.
    pub fn apply(&self, status: &mut ChatClusterStatus, previous: Option<&ChatClusterStatus>, now: &Time) {
        let Some(plan) = &self.plan else {
            // Pods not looked at: a rollout in the status stays until one is.
            status.rollout = previous.and_then(|p| p.rollout.clone());
            return;
        };
        status.rollout = plan.rollout.clone();
        if let (None, Some(doing)) = (&plan.rollout, &plan.shrinking) {
            set_condition(status, previous, now, PROGRESSING, ("True", "ScalingDown", doing.clone()));
        }
        let Some(rollout) = &plan.rollout else { return };
        let progress = format!("{}/{} gateways updated", rollout.updated, rollout.total);
        let progressing = match (&plan.stuck, rollout.phase.as_str()) {
            (Some(message), _) => ("False", "RolloutStuck", format!("{progress}; {message}")),
            (None, plan::PAUSED) => {
                ("False", "RolloutPaused", format!("{progress}; paused by the annotation {PAUSED_ANNOTATION}"))
            }
            (None, _) => ("True", "RollingUpdate", format!("{progress}; {}", rollout.summary)),
        };
        set_condition(status, previous, now, PROGRESSING, progressing);
        if let Some(message) = &plan.stuck {
            let degraded = status.conditions.iter().find(|c| c.type_ == DEGRADED && c.status == "True");
            let condition = match degraded {
                Some(other) => ("True", other.reason.clone(), format!("{}; {message}", other.message)),
                None => ("True", "RolloutStuck".to_string(), message.clone()),
            };
            set_condition(status, previous, now, DEGRADED, (condition.0, &condition.1, condition.2));
        }
    }
}

/// Sets condition `type_`, keeping its `lastTransitionTime` while its status does not change.
fn set_condition(
    status: &mut ChatClusterStatus,
    previous: Option<&ChatClusterStatus>,
    now: &Time,
    type_: &str,
    (value, reason, message): (&str, &str, String),
) {
    let last_transition_time = previous
        .into_iter()
        .flat_map(|p| &p.conditions)
        .find(|c| c.type_ == type_ && c.status == value)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    let condition = Condition {
        type_: type_.into(),
        status: value.into(),
        reason: reason.into(),
        message,
        observed_generation: status.observed_generation,
        last_transition_time,
    };
    match status.conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => *c = condition,
        None => status.conditions.push(condition),
    }
}

/// Observes the gateway pods when something may need doing, and takes the
/// next rollout or scale-down step. `keep`: the gateways to keep
/// (`crate::scale`), below the StatefulSet's replicas when it shrinks; a
/// rollout keeps `gateway.rollout.maxSurge` more while old pods remain.
pub async fn drive(cc: &ChatCluster, ctx: &Context, namespace: &str, keep: i32) -> Result<Report> {
    let names = Names(&cc.name_any());
    let Some(sts) = ctx.owned.get::<StatefulSet>(namespace, &names.gateway()) else {
        return Ok(Report::default());
    };
    let replicas = sts.spec.replicas.unwrap_or(1);
    let live_surge = surge_of(&sts);
    let status = sts.status.clone().unwrap_or_default();
    let current = status.observed_generation.is_some_and(|g| Some(g) >= sts.metadata.generation);
    let rolling = cc.status.as_ref().is_some_and(|s| s.rollout.is_some());
    let settled = current
        && status.replicas == replicas
        && status.updated_replicas == Some(replicas)
        && status.ready_replicas == Some(replicas);
    let shrinking = keep < replicas;
    if settled && !rolling && !shrinking {
        return Ok(Report::default());
    }

    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let selector = format!("{LABEL_INSTANCE}={},{LABEL_COMPONENT}={COMPONENT}", cc.name_any());
    let pods = counted(Verb::List, pods_api.list(&ListParams::default().labels(&selector)))
        .await
        .map_err(Error::kube("listing gateway pods"))?
        .items;
    let endpoints = observe::published_endpoints(&ctx.owned, cc, namespace);
    let now = time::now();
    let drain = &cc.spec.gateway.drain;

    let mut states = Vec::with_capacity(pods.len());
    let mut probe_token = None;
    for pod in &pods {
        let mut state = pod_state(pod, endpoints.as_ref());
        if state.drain_started.is_some() && !state.deleting {
            // Asking again is how a drain is followed (and resumed by a new
            // leader): the gateway keeps a running drain's clock.
            state.connections = start_drain(ctx, cc, pod).await.map(|p| p.connections_left);
        } else if state.listed_ready && !state.deleting {
            // The list is by pod name: an entry may still describe the pod
            // this one replaced. Only its own gateway, at the listed URL, counts.
            let url = endpoints.as_ref().and_then(|e| e.gateways.iter().find(|g| g.pod == state.name)).map(|g| &g.url);
            if probe_token.is_none() {
                probe_token = Some(mint_probe_token(ctx, cc).await);
            }
            let token = probe_token.as_ref().map_or(Err("not minted"), |t| t.as_deref().map_err(String::as_str));
            if let Err(why) = serves_at(ctx, cc, pod, url, token).await {
                state.listed_ready = false;
                state.serve_error = Some(why);
            }
        }
        if shrinking && state.ordinal == replicas - 1 && state.drain_started.is_none() && !state.deleting {
            // Removed without a drain if it holds no one: ask it, rather
            // than trust a list a timed-out poll may have zeroed.
            if let Ok(addr) = discovery::admin_addr(pod, cc, ctx.admin_loopback_only)
                && let Ok(load) = poll::read_load(addr, ADMIN_TIMEOUT).await
            {
                state.connections = Some(load.connections);
            }
        }
        states.push(state);
    }
    let update_revision = if current { status.update_revision.clone() } else { None };
    // Surge while pods of an older revision remain (as before while the
    // StatefulSet has not caught up with its spec).
    let surge = match &update_revision {
        Some(revision) => {
            let old_left = states.iter().any(|p| p.ordinal < replicas && p.revision != *revision);
            if old_left { cc.spec.gateway.rollout.max_surge.max(0) } else { 0 }
        }
        None => live_surge,
    };
    let input = Input {
        replicas,
        keep: keep + surge,
        surge,
        update_revision,
        pods: states,
        paused: crate::desired::paused(cc),
        previous: cc.status.as_ref().and_then(|s| s.rollout.clone()),
        now,
        drain_deadline: i64::from(drain.window_seconds) + DRAIN_MARGIN_SECONDS,
        ready_timeout: i64::from(cc.spec.gateway.rollout.pod_ready_timeout_seconds),
    };
    let plan = plan::plan(&input);
    if plan.step != Step::Idle && plan.step != Step::Wait {
        tracing::info!(step = ?plan.step, rollout = ?plan.rollout.as_ref().map(|r| &r.summary), "rollout step");
    }
    if let Some(pod) = &plan.replaced {
        // Recorded before the Event: a crash in between loses the Event,
        // never repeats it.
        let patch = json!({"metadata": {"annotations": {REPLACEMENT_REPORTED_ANNOTATION: time::rfc3339(now)}}});
        counted(Verb::Patch, pods_api.patch(pod, &PatchParams::default(), &Patch::Merge(&patch)))
            .await
            .map_err(Error::kube(format!("recording the replacement of pod {pod}")))?;
        let related = pods.iter().find(|p| p.name_any() == *pod);
        publish(ctx, cc, "PodReplaced", format!("{pod} runs the new revision and serves clients"), related).await;
    }
    let purpose = match &plan.step {
        Step::StartDrain(name) if ordinal(name) >= keep => "removing",
        _ => "replacing",
    };
    execute(ctx, cc, &pods_api, &pods, &plan.step, now, purpose).await?;
    if plan.finished {
        let started = input.previous.as_ref().and_then(|p| time::parse(&p.started));
        let took = started.map_or_else(String::new, |s| format!(" in {} s", now - s));
        publish(ctx, cc, "RolloutFinished", format!("every gateway runs the new revision{took}"), None).await;
    }
    Ok(Report { plan: Some(plan), replicas, surge })
}

/// The surge a StatefulSet was last given ([`SURGE_ANNOTATION`]; 0 when
/// none), within what `maxSurge` admits (a hand-edited value cannot make
/// the scale count fewer gateways than run, or more).
pub fn surge_of(sts: &StatefulSet) -> i32 {
    let recorded: i32 = sts.annotations().get(SURGE_ANNOTATION).and_then(|v| v.parse().ok()).unwrap_or(0);
    recorded.clamp(0, sts.spec.replicas.unwrap_or(0).min(10))
}

/// Takes `step`. `purpose` ("replacing", "removing") goes into the `DrainStarted` Event.
async fn execute(
    ctx: &Context,
    cc: &ChatCluster,
    api: &Api<Pod>,
    pods: &[Pod],
    step: &Step,
    now: i64,
    purpose: &str,
) -> Result<()> {
    let find = |name: &str| pods.iter().find(|p| p.name_any() == name);
    match step {
        Step::Idle | Step::Wait => {}
        Step::MarkServing(name) => set_serving(api, name, true).await?,
        Step::StartDrain(name) => {
            let Some(pod) = find(name) else { return Ok(()) };
            if !ctx.leading() {
                return Ok(());
            }
            // Recorded on the pod first: whoever leads next resumes this drain.
            let patch = json!({"metadata": {"annotations": {DRAIN_STARTED_ANNOTATION: time::rfc3339(now)}}});
            counted(Verb::Patch, api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)))
                .await
                .map_err(Error::kube(format!("recording the drain on pod {name}")))?;
            set_serving(api, name, false).await?;
            let progress = start_drain(ctx, cc, pod).await;
            let held = progress.map_or_else(|| "unknown".to_string(), |p| p.connections_left.to_string());
            let note = format!("draining {name} ({held} connections) before {purpose} it");
            publish(ctx, cc, "DrainStarted", note, Some(pod)).await;
        }
        Step::CancelDrain { pod: name, reason } => {
            let Some(pod) = find(name) else { return Ok(()) };
            // The gateway first: the record goes only once it no longer
            // drains. One that refused (it finished meanwhile) or did not
            // answer keeps its record, and the next reconcile decides again.
            let Some(cancelled) = cancel_drain(ctx, cc, pod).await else { return Ok(()) };
            let patch = json!({"metadata": {"annotations": {DRAIN_STARTED_ANNOTATION: null}}});
            counted(Verb::Patch, api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)))
                .await
                .map_err(Error::kube(format!("removing the drain record of pod {name}")))?;
            let since = pod.annotations().get(DRAIN_STARTED_ANNOTATION).and_then(|t| time::parse(t));
            let after = since.map_or_else(String::new, |s| format!(" after {} s", now - s));
            let note = if cancelled.cancelled {
                format!(
                    "cancelled the drain of {name}{after} ({reason}): {} clients moved, {} stay",
                    cancelled.moved, cancelled.connections_left
                )
            } else {
                format!("{name} no longer drains ({reason}); {} clients stay", cancelled.connections_left)
            };
            publish(ctx, cc, "DrainCancelled", note, Some(pod)).await;
        }
        Step::Delete { pod: name, drained_for, connections_left } => {
            let pod = find(name);
            let uid = pod.and_then(|p| p.uid());
            // The uid makes sure the pod deleted is the one that was drained.
            let params = DeleteParams {
                preconditions: Some(Preconditions { uid, resource_version: None }),
                ..DeleteParams::default()
            };
            match counted(Verb::Delete, api.delete(name, &params)).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => return Ok(()),
                Err(e) => return Err(Error::kube(format!("deleting pod {name}"))(e)),
            }
            if let Some(seconds) = drained_for {
                let left = connections_left.map_or_else(|| "unknown".to_string(), |c| c.to_string());
                let note = format!("{name} drained in {seconds} s ({left} connections left); deleted for replacement");
                publish(ctx, cc, "DrainFinished", note, pod).await;
            }
        }
        Step::Remove { pod: Some(name), drained_for: Some(seconds), connections_left, .. } => {
            // The reconcile lowers the StatefulSet's replicas (`Report::replicas`).
            let left = connections_left.map_or_else(|| "unknown".to_string(), |c| c.to_string());
            let note = format!("{name} drained in {seconds} s ({left} connections left); removing it");
            publish(ctx, cc, "DrainFinished", note, find(name)).await;
        }
        Step::Remove { .. } => {}
    }
    Ok(())
}

/// Sets the pod's readiness gate condition.
async fn set_serving(api: &Api<Pod>, name: &str, serving: bool) -> Result<()> {
    let (value, reason) = if serving { ("True", "GatewayReady") } else { ("False", "Draining") };
    let patch = json!({"status": {"conditions": [{
        "type": SERVING_CONDITION,
        "status": value,
        "reason": reason,
        "lastTransitionTime": Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH),
    }]}});
    match counted(Verb::Patch, api.patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!("setting {SERVING_CONDITION} on pod {name}"))(e)),
    }
}

/// `POST /v1/admin/drain` to the pod's gateway; `None` when it cannot be
/// read, or this replica no longer leads (the request is plain HTTP: the
/// fenced API client does not guard it).
async fn start_drain(ctx: &Context, cc: &ChatCluster, pod: &Pod) -> Option<poll::DrainProgress> {
    if !ctx.leading() {
        return None;
    }
    let addr = discovery::admin_addr(pod, cc, ctx.admin_loopback_only).ok()?;
    let token = gateway_admin_token(ctx, cc)?;
    let drain = &cc.spec.gateway.drain;
    let window = u32::try_from(drain.window_seconds).unwrap_or(60);
    let rate = u32::try_from(drain.max_reconnects_per_second).unwrap_or(500);
    match poll::drain(addr, &token, window, rate, ADMIN_TIMEOUT).await {
        Ok(progress) => Some(progress),
        Err(e) => {
            tracing::debug!(pod = %pod.name_any(), error = %e, "drain not started or read");
            None
        }
    }
}

/// `DELETE /v1/admin/drain` to the pod's gateway; `None` when it refused
/// (the drain finished, the gateway stops), did not answer, or this replica
/// no longer leads.
async fn cancel_drain(ctx: &Context, cc: &ChatCluster, pod: &Pod) -> Option<poll::Cancelled> {
    if !ctx.leading() {
        return None;
    }
    let addr = discovery::admin_addr(pod, cc, ctx.admin_loopback_only).ok()?;
    let token = gateway_admin_token(ctx, cc)?;
    match poll::cancel_drain(addr, &token, ADMIN_TIMEOUT).await {
        Ok(cancelled) => Some(cancelled),
        Err(e) => {
            tracing::info!(pod = %pod.name_any(), error = %e, "drain not cancelled");
            None
        }
    }
}

/// The cluster's admin token, from the Secret cache (`None`: not seen yet;
/// the reconcile creates it before any rollout step).
fn gateway_admin_token(ctx: &Context, cc: &ChatCluster) -> Option<String> {
    let generated = admin_token::generated(cc);
    let namespace = cc.namespace().unwrap_or_default();
    let secret = ctx.owned.get::<Secret>(&namespace, &generated.name);
    let token = secret
        .as_ref()
        .and_then(|s| s.data.as_ref()?.get(generated.key))
        .and_then(|value| std::str::from_utf8(&value.0).ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    if token.is_none() {
        tracing::warn!(secret = generated.name, "no admin token in the Secret cache yet: no drain request sent");
    }
    token
}

/// Whether the pod's own gateway answers ready (not draining), advertises
/// `listed_url`, and answers a client's WebSocket connect there; else why not.
async fn serves_at(
    ctx: &Context,
    cc: &ChatCluster,
    pod: &Pod,
    listed_url: Option<&String>,
    probe_token: std::result::Result<&str, &str>,
) -> std::result::Result<(), String> {
    let addr = discovery::admin_addr(pod, cc, ctx.admin_loopback_only).map_err(|e| e.to_string())?;
    let load = poll::read_load(addr, ADMIN_TIMEOUT).await.map_err(|e| format!("its load could not be read ({e})"))?;
    if load.pod != pod.name_any() {
        return Err(format!("its address answers as {}", load.pod));
    }
    if !load.ready || load.draining {
        return Err("its gateway reports not ready".into());
    }
    let Some(url) = listed_url else { return Err("it is not in the endpoint list".into()) };
    if !load.url.is_empty() && load.url != *url {
        return Err(format!("it advertises {} but is listed at {url}", load.url));
    }
    let client_addr = discovery::websocket_addr(pod, cc, ctx.admin_loopback_only).map_err(|e| e.to_string())?;
    let token = probe_token.map_err(|e| format!("no WebSocket connect tried at {url}: {e}"))?;
    probe::connect(url, client_addr, token, PROBE_TIMEOUT)
        .await
        .map_err(|e| format!("it does not answer a WebSocket connect at {url}: {e}"))
}

/// A token for the probe, signed with the key the gateways mount: the
/// generated Secret from the cache, a Secret the spec names read directly.
async fn mint_probe_token(ctx: &Context, cc: &ChatCluster) -> std::result::Result<String, String> {
    let key_ref = auth::signing_key_ref(cc);
    let namespace = cc.namespace().unwrap_or_default();
    let secret = match ctx.owned.get::<Secret>(&namespace, &key_ref.name) {
        Some(secret) => (*secret).clone(),
        None => {
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
            counted(Verb::Get, api.get(&key_ref.name))
                .await
                .map_err(|e| format!("reading the signing key Secret {}: {e}", key_ref.name))?
        }
    };
    let key = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&key_ref.key))
        .ok_or_else(|| format!("the Secret {} has no key {}", key_ref.name, key_ref.key))?;
    probe::token(&key.0).map_err(|e| e.to_string())
}

/// An Event about the rollout; `pod` is its related object, so each pod's
/// Event is its own (the recorder merges Events of the same reason and
/// related object into one series).
async fn publish(ctx: &Context, cc: &ChatCluster, reason: &str, note: String, pod: Option<&Pod>) {
    let event = Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(note),
        action: "Rollout".into(),
        secondary: pod.map(|p| p.object_ref(&())),
    };
    ctx.publish(cc, event).await;
}

/// A StatefulSet pod's ordinal, from its name (-1 for another name).
fn ordinal(pod: &str) -> i32 {
    pod.rsplit('-').next().and_then(|o| o.parse().ok()).unwrap_or(-1)
}

/// What the plan needs of one pod.
fn pod_state(pod: &Pod, endpoints: Option<&Endpoints>) -> PodState {
    let name = pod.name_any();
    let condition = |type_: &str| {
        pod.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == type_))
            .map(|c| c.status == "True")
    };
    let listed = endpoints.and_then(|e| e.gateways.iter().find(|g| g.pod == name));
    PodState {
        ordinal: ordinal(&name),
        revision: pod.labels().get(REVISION_LABEL).cloned().unwrap_or_default(),
        created: pod.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
        deleting: pod.metadata.deletion_timestamp.is_some(),
        containers_ready: condition("ContainersReady") == Some(true),
        serving: condition(SERVING_CONDITION),
        drain_started: pod.annotations().get(DRAIN_STARTED_ANNOTATION).and_then(|t| time::parse(t)),
        listed_ready: listed.is_some_and(|g| g.ready),
        connections: listed.map(|g| g.connections),
        capacity: listed.map(|g| g.capacity),
        replacement_reported: pod.annotations().contains_key(REPLACEMENT_REPORTED_ANNOTATION),
        load_error: listed.and_then(|g| g.load_error.clone()),
        serve_error: None,
        name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::endpoints::GatewayEndpoint;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kubechat_crds::RolloutStatus;
    use std::collections::BTreeMap;

    #[test]
    fn a_pod_is_read_from_its_labels_conditions_and_the_endpoint_list() {
        let condition = |type_: &str, status: &str| PodCondition {
            type_: type_.into(),
            status: status.into(),
            ..Default::default()
        };
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("chat-gateway-12".into()),
                labels: Some(BTreeMap::from([(REVISION_LABEL.to_string(), "chat-gateway-abc".to_string())])),
                annotations: Some(BTreeMap::from([(
                    DRAIN_STARTED_ANNOTATION.to_string(),
                    "2025-01-01T00:00:10Z".to_string(),
                )])),
                ..Default::default()
            },
            status: Some(PodStatus {
                conditions: Some(vec![condition("ContainersReady", "True"), condition(SERVING_CONDITION, "False")]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let endpoints = Endpoints {
            updated_at: String::new(),
            gateways: vec![GatewayEndpoint {
                pod: "chat-gateway-12".into(),
                connections: 7,
                ready: false,
                ..Default::default()
            }],
        };
        let state = pod_state(&pod, Some(&endpoints));
        assert_eq!(state.ordinal, 12);
        assert_eq!(state.revision, "chat-gateway-abc");
        assert!(state.containers_ready);
        assert_eq!(state.serving, Some(false));
        assert_eq!(state.drain_started, Some(1_735_689_610));
        assert_eq!((state.listed_ready, state.connections), (false, Some(7)));
        let bare = pod_state(&Pod::default(), None);
        assert_eq!((bare.serving, bare.connections, bare.drain_started), (None, None, None));
    }

    #[test]
    fn the_status_shows_the_rollout_and_a_stuck_one_is_degraded() {
        let now = Time(Timestamp::from_second(100).expect("time"));
        let rollout = RolloutStatus {
            revision: "r2".into(),
            pod: "chat-gateway-2".into(),
            phase: plan::STUCK.into(),
            updated: 0,
            total: 3,
            summary: "Stuck chat-gateway-2 (0/3)".into(),
            ..Default::default()
        };
        let report = Report {
            plan: Some(Plan {
                step: Step::Wait,
                rollout: Some(rollout.clone()),
                stuck: Some("chat-gateway-2 is not ready".into()),
                replaced: None,
                finished: false,
                shrinking: None,
            }),
            replicas: 3,
            surge: 0,
        };
        let mut status = ChatClusterStatus::default();
        report.apply(&mut status, None, &now);
        assert_eq!(status.rollout, Some(rollout));
        let find = |t: &str| status.conditions.iter().find(|c| c.type_ == t).cloned().expect("condition");
        assert_eq!((find(PROGRESSING).status.as_str(), find(PROGRESSING).reason.as_str()), ("False", "RolloutStuck"));
        assert!(find(PROGRESSING).message.starts_with("0/3 gateways updated"));
        assert_eq!((find(DEGRADED).status.as_str(), find(DEGRADED).reason.as_str()), ("True", "RolloutStuck"));
        assert!(find(DEGRADED).message.contains("chat-gateway-2"));
        assert_eq!(report.requeue(), Some(REQUEUE_IDLE));
    }

    #[test]
    fn the_recorded_surge_is_read_within_bounds() {
        let sts = |replicas: i32, surge: Option<&str>| {
            let mut sts = StatefulSet::default();
            sts.spec.replicas = Some(replicas);
            if let Some(value) = surge {
                sts.annotations_mut().insert(SURGE_ANNOTATION.into(), value.into());
            }
            sts
        };
        assert_eq!(surge_of(&sts(4, None)), 0);
        assert_eq!(surge_of(&sts(4, Some("1"))), 1);
        assert_eq!(surge_of(&sts(4, Some("-3"))), 0, "never more gateways counted than run");
        assert_eq!(surge_of(&sts(2, Some("5"))), 2, "never below zero gateways");
        assert_eq!(surge_of(&sts(40, Some("25"))), 10, "maxSurge's bound");
        assert_eq!(surge_of(&sts(4, Some("one"))), 0);
    }

    #[test]
    fn a_scale_down_shows_in_progressing_and_lowers_the_replicas_once_drained() {
        let removing = Report {
            plan: Some(Plan {
                step: Step::Remove {
                    ordinal: 2,
                    pod: Some("chat-gateway-2".into()),
                    drained_for: Some(4),
                    connections_left: Some(0),
                },
                rollout: None,
                stuck: None,
                replaced: None,
                finished: false,
                shrinking: Some("draining chat-gateway-2 before removing it (3 → 2 gateways)".into()),
            }),
            replicas: 3,
            surge: 0,
        };
        let mut status = ChatClusterStatus::default();
        removing.apply(&mut status, None, &Time(Timestamp::UNIX_EPOCH));
        let progressing = status.conditions.iter().find(|c| c.type_ == PROGRESSING).expect("Progressing");
        assert_eq!((progressing.status.as_str(), progressing.reason.as_str()), ("True", "ScalingDown"));
        assert_eq!(status.rollout, None);
        assert_eq!(removing.replicas(), Some(2));
        assert_eq!(
            removing.scaled_down().as_deref(),
            Some("Scaled gateways 3 → 2: removed chat-gateway-2, after a 4 s drain")
        );
        assert_eq!(removing.requeue(), Some(REQUEUE_ACTIVE));
        assert_eq!(Report::default().replicas(), None, "no removal without a plan");
    }

    #[test]
    fn without_a_look_at_the_pods_the_rollout_in_the_status_stays() {
        let previous = ChatClusterStatus {
            rollout: Some(RolloutStatus { phase: plan::DRAINING.into(), ..Default::default() }),
            ..Default::default()
        };
        let mut status = ChatClusterStatus::default();
        Report::default().apply(&mut status, Some(&previous), &Time(Timestamp::UNIX_EPOCH));
        assert_eq!(status.rollout, previous.rollout);
        assert_eq!(Report::default().requeue(), None);
    }
}
