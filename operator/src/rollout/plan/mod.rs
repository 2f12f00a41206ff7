//! The next step of a gateway rollout or scale-down, from what the cluster
//! shows. Pure: no clock, no I/O, so every case is a unit test (`tests.rs`).
//!
//! Both drain gateways the same way, one at a time, highest ordinal first.
//! A rollout then deletes the pod for the StatefulSet to re-create at the
//! new revision; a scale-down (fewer pods to keep than the StatefulSet
//! runs) instead lowers its replicas, which removes the drained pod.
//!
//! The state lives in the cluster: the StatefulSet's `updateRevision`, each
//! pod's revision, readiness gate and drain annotation, the endpoint list
//! and the previous `status.rollout`. A new leader computes the same step
//! from the same objects, so it neither drains a pod twice nor skips one.

use kubechat_crds::RolloutStatus;

/// Why a drain is cancelled (the `DrainCancelled` Event says it).
pub const CANCELLED_PAUSED: &str = "the rollout is paused";
pub const CANCELLED_ROLLED_BACK: &str = "the spec went back to the revision it runs";
pub const CANCELLED_KEPT: &str = "it is to be kept after all";

/// Phases shown in `status.rollout.phase`.
pub const DRAINING: &str = "Draining";
pub const REPLACING: &str = "Replacing";
pub const STUCK: &str = "Stuck";
pub const PAUSED: &str = "Paused";
pub const WAITING: &str = "Waiting";
/// Waiting for the surge gateways to be added and come up.
pub const SURGING: &str = "Surging";
/// Waiting until the other gateways have room for the next one's clients.
pub const WAITING_FOR_ROOM: &str = "WaitingForRoom";

/// One gateway pod as observed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodState {
    pub name: String,
    pub ordinal: i32,
    /// Its `controller-revision-hash`.
    pub revision: String,
    /// Creation time, Unix seconds.
    pub created: i64,
    /// Being deleted.
    pub deleting: bool,
    /// Its containers pass their readiness probe (`ContainersReady`).
    pub containers_ready: bool,
    /// The `kubechat.dev/serving` condition (`None`: not set).
    pub serving: Option<bool>,
    /// When the operator started draining it (its annotation), Unix seconds.
    pub drain_started: Option<i64>,
    /// Listed as ready in the endpoint ConfigMap and, when the driver
    /// looked, serving there: its own gateway, a WebSocket connect answered.
    pub listed_ready: bool,
    /// Connections it holds: the drain's count for a draining pod, else the
    /// endpoint list's (`None`: unknown).
    pub connections: Option<u64>,
    /// Connections it accepts at most (the endpoint list's; `None`: not listed).
    pub capacity: Option<u64>,
    /// Its `PodReplaced` Event was already published (its annotation).
    pub replacement_reported: bool,
    /// Why the operator could not read its gateway's load (endpoint list).
    pub load_error: Option<String>,
    /// Why the driver found it not serving at its listed URL.
    pub serve_error: Option<String>,
}

impl PodState {
    /// Serving clients as far as everyone can tell: gate open and listed.
    fn up(&self) -> bool {
        !self.deleting && self.serving == Some(true) && self.listed_ready
    }

    /// What keeps it from being up, in a status message's words.
    fn why_not_up(&self) -> String {
        if self.deleting {
            return "it is being deleted".into();
        }
        if !self.containers_ready {
            return "its containers are not ready".into();
        }
        if self.serving != Some(true) {
            return "its serving gate is not open".into();
        }
        match (&self.serve_error, &self.load_error) {
            (Some(why), _) => why.clone(),
            (None, Some(error)) => format!("its load could not be read ({error})"),
            (None, None) => "its gateway reports not ready".into(),
        }
    }
}

/// Everything the plan depends on.
#[derive(Clone, Debug, Default)]
pub struct Input {
    /// The StatefulSet's replicas.
    pub replicas: i32,
    /// Gateways to keep (`crate::scale`, plus `surge`); below `replicas`,
    /// the highest ordinals are drained and removed one at a time.
    pub keep: i32,
    /// Of `keep`, gateways a rollout adds before it drains an old one
    /// (`gateway.rollout.maxSurge` while old pods remain, else 0).
    pub surge: i32,
    /// The StatefulSet's `updateRevision`; `None` while its status does not
    /// describe the current spec yet.
    pub update_revision: Option<String>,
    pub pods: Vec<PodState>,
    /// The ChatCluster carries `kubechat.dev/paused: "true"`.
    pub paused: bool,
    pub previous: Option<RolloutStatus>,
    /// Unix seconds.
    pub now: i64,
    /// Seconds after which a drain counts as over, emptied or not.
    pub drain_deadline: i64,
    /// Seconds a replacement has to come up.
    pub ready_timeout: i64,
}

/// What to do now (one step per reconcile).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do and nothing to wait for.
    Idle,
    /// Nothing to do now; look again soon.
    Wait,
    /// Open the readiness gate of a pod whose gateway is ready.
    MarkServing(String),
    /// Close the gate, record the drain on the pod and start it.
    StartDrain(String),
    /// Cancel the pod's drain and remove its record (its gate opens once
    /// it is ready again). `reason`: one of the `CANCELLED_*` texts.
    CancelDrain { pod: String, reason: &'static str },
    /// Delete the pod (the StatefulSet re-creates it at the new revision).
    /// `drained_for`: seconds it drained (`None`: nothing to drain).
    Delete { pod: String, drained_for: Option<i64>, connections_left: Option<u64> },
    /// Lower the StatefulSet's replicas to `ordinal`, which removes the
    /// highest pod (`pod`; `None`: it does not exist), drained or holding no one.
    Remove { ordinal: i32, pod: Option<String>, drained_for: Option<i64>, connections_left: Option<u64> },
}

/// The step and what to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub step: Step,
    /// `status.rollout` (`None`: no rollout).
    pub rollout: Option<RolloutStatus>,
    /// A replacement that did not come up in time: the Degraded message.
    pub stuck: Option<String>,
    /// A pod whose replacement just came up (a `PodReplaced` Event).
    pub replaced: Option<String>,
    /// The rollout just finished (a `RolloutFinished` Event).
    pub finished: bool,
    /// A scale-down under way: what it does now (the `Progressing` message).
    pub shrinking: Option<String>,
}

impl Plan {
    fn idle(finished: bool) -> Self {
        Plan { step: Step::Idle, rollout: None, stuck: None, replaced: None, finished, shrinking: None }
    }
}

pub fn plan(input: &Input) -> Plan {
    // Pods past the wanted count are the StatefulSet's to remove.
    let pods: Vec<&PodState> = input.pods.iter().filter(|p| p.ordinal < input.replicas).collect();
    let keep = input.keep.clamp(0, input.replicas);
    let shrinking = keep < input.replicas;
    // The one pod a scale-down removes next.
    let top = input.replicas - 1;

    // A new pod (any revision, rollout or not) whose gateway is ready gets
    // its gate opened; pods being drained, and pods about to be removed, keep theirs closed.
    let opening = pods.iter().find(|p| {
        !p.deleting && p.drain_started.is_none() && p.containers_ready && p.serving != Some(true) && p.ordinal < keep
    });

    let Some(revision) = input.update_revision.clone() else {
        // The StatefulSet has not caught up with its spec: wait, keep the status.
        let step = opening.map_or(Step::Wait, |p| Step::MarkServing(p.name.clone()));
        return Plan { step, rollout: input.previous.clone(), ..Plan::idle(false) };
    };
    let outdated: Vec<&PodState> = pods.iter().copied().filter(|p| p.revision != revision).collect();
    let updated = pods.iter().filter(|p| p.revision == revision && p.up()).count();
    let all_up = pods.len() == usize::try_from(input.replicas).unwrap_or(0) && pods.iter().all(|p| p.up());
    let rolling = !outdated.is_empty() || input.previous.is_some();
    // A drain recorded on a pod is seen to its end or cancelled below, rollout or not.
    let draining = pods.iter().any(|p| !p.deleting && p.drain_started.is_some());

    if !rolling && !shrinking && !draining {
        // Not a rollout (a first start, a scale-up, a restarted pod).
        return match opening {
            Some(p) => Plan { step: Step::MarkServing(p.name.clone()), ..Plan::idle(false) },
            None if all_up => Plan::idle(false),
            None => Plan { step: Step::Wait, ..Plan::idle(false) },
        };
    }
    if outdated.is_empty() && all_up && input.previous.is_some() {
        // A scale-down still due starts at the next reconcile.
        return Plan { replaced: replaced(input, &pods, &revision), ..Plan::idle(true) };
    }

    let started = input.previous.as_ref().map_or_else(|| crate::time::rfc3339(input.now), |p| p.started.clone());
    let total = input.replicas;
    let updated = i32::try_from(updated).unwrap_or(i32::MAX);
    let status = |phase: &str, pod: &str, connections_left: Option<u64>| RolloutStatus {
        revision: revision.clone(),
        pod: pod.to_string(),
        phase: phase.to_string(),
        started: started.clone(),
        connections_left: connections_left.map(|c| i64::try_from(c).unwrap_or(i64::MAX)),
        updated,
        total,
        summary: if pod.is_empty() {
            format!("{phase} ({updated}/{total})")
        } else {
            format!("{phase} {pod} ({updated}/{total})")
        },
    };
    // A revision that got stuck stays stuck, whatever else changes (a
    // replicas edit that removed the broken pod, say), until the spec
    // changes the revision or the stuck pod comes up after all: no other
    // pod moves to it (step 6 is not reached) and the status keeps saying so.
    let stuck_here = input.previous.as_ref().filter(|previous| {
        previous.phase == STUCK
            && previous.revision == revision
            && !pods.iter().any(|p| p.name == previous.pod && p.revision == revision && p.up())
    });
    let held = stuck_here.map(|previous| {
        let message = format!(
            "the rollout to revision {revision} got stuck at {}; no other pod moves to it until the spec changes \
             the revision",
            previous.pod
        );
        (previous.pod.clone(), message)
    });
    // Only a rollout shows in `status.rollout`; a scale-down alone shows in `Progressing`.
    let result = |step: Step, rollout: RolloutStatus, stuck: Option<String>| {
        let (rollout, stuck) = match (&held, stuck) {
            (Some((pod, message)), None) => (status(STUCK, pod, None), Some(message.clone())),
            (_, stuck) => (rollout, stuck),
        };
        Plan {
            step,
            rollout: rolling.then_some(rollout),
            stuck,
            replaced: replaced(input, &pods, &revision),
            finished: false,
            shrinking: None,
        }
    };
    let scaling = |what: String| format!("{what} ({} → {keep} gateways)", input.replicas);

    // 1. A drain under way goes on to its end, unless it is cancelled: while
    //    paused, or once nothing calls for it (the pod runs the revision
    //    wanted and is not to be removed: the spec was rolled back, or
    //    fewer gateways are no longer wanted). One that is over is not
    //    cancelled (its clients are gone; the gateway cannot undo it). The
    //    highest pod, when the cluster shrinks, is then removed instead of replaced.
    if let Some(p) = pods.iter().find(|p| !p.deleting && p.drain_started.is_some()) {
        let since = p.drain_started.unwrap_or(input.now);
        let over = p.connections == Some(0) || input.now - since >= input.drain_deadline;
        let removing = shrinking && p.ordinal == top;
        let needed = removing || p.revision != revision;
        let cancel = match (over, input.paused, needed) {
            (true, _, _) => None,
            (false, true, _) => Some(CANCELLED_PAUSED),
            (false, false, false) if input.previous.is_some() => Some(CANCELLED_ROLLED_BACK),
            (false, false, false) => Some(CANCELLED_KEPT),
            (false, false, true) => None,
        };
        if let Some(reason) = cancel {
            let step = Step::CancelDrain { pod: p.name.clone(), reason };
            let phase = if input.paused { PAUSED } else { WAITING };
            let doing = removing.then(|| scaling(format!("cancelling the drain of {}: {reason}", p.name)));
            return Plan { shrinking: doing, ..result(step, status(phase, &p.name, p.connections), None) };
        }
        let (drained_for, connections_left) = (Some(input.now - since), p.connections);
        let step = match (over, removing) {
            (false, _) => Step::Wait,
            (true, false) => Step::Delete { pod: p.name.clone(), drained_for, connections_left },
            (true, true) => Step::Remove { ordinal: top, pod: Some(p.name.clone()), drained_for, connections_left },
        };
        let left = p.connections.map_or_else(String::new, |c| format!(", {c} connections left"));
        return Plan {
            shrinking: removing.then(|| scaling(format!("draining {} before removing it{left}", p.name))),
            ..result(step, status(DRAINING, &p.name, p.connections), None)
        };
    }

    // 2. Gates to open come first: a replacement is not up until then.
    if let Some(p) = opening {
        return result(Step::MarkServing(p.name.clone()), status(REPLACING, &p.name, None), None);
    }

    // 2b. A pod to remove that serves no one goes without a drain, and
    //     without waiting for the others (it takes no serving gateway down).
    if shrinking {
        let highest = pods.iter().find(|p| p.ordinal == top);
        let idle = highest.is_none_or(|p| !p.deleting && !p.up() && p.connections.unwrap_or(0) == 0);
        if idle {
            let pod = highest.map(|p| p.name.clone());
            let what = pod.as_deref().map_or_else(|| format!("ordinal {top}"), str::to_string);
            let step = Step::Remove { ordinal: top, pod, drained_for: None, connections_left: None };
            let phase = status(REPLACING, &what, None);
            return Plan {
                shrinking: Some(scaling(format!("removing {what}, which serves no one"))),
                ..result(step, phase, None)
            };
        }
    }

    // 3. One gateway down at a time: wait for a pod on its way out, a
    //    missing one, or a replacement not up yet.
    if let Some(p) = pods.iter().find(|p| p.deleting) {
        return result(Step::Wait, status(REPLACING, &p.name, None), None);
    }
    let missing = (0..input.replicas).find(|o| pods.iter().all(|p| p.ordinal != *o));
    if let Some(ordinal) = missing {
        let name = input
            .previous
            .as_ref()
            .map(|p| p.pod.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("ordinal {ordinal}"));
        return result(Step::Wait, status(REPLACING, &name, None), None);
    }
    // (The pod a scale-down is about to drain does not count as another one down.)
    if let Some(p) = pods.iter().find(|p| p.revision == revision && !p.up() && !(shrinking && p.ordinal == top)) {
        let waited = input.now - p.created;
        if waited >= input.ready_timeout && rolling {
            let message = format!(
                "gateway pod {} at the new revision is not up after {waited} s (limit {} s): {}; the rollout stops \
                 here, and no other pod moves to this revision until the spec changes it",
                p.name,
                input.ready_timeout,
                p.why_not_up()
            );
            return result(Step::Wait, status(STUCK, &p.name, None), Some(message));
        }
        return result(Step::Wait, status(REPLACING, &p.name, None), None);
    }

    // 3b. Surge first: the added gateways come up before an old one goes
    //     (the reconcile raises the StatefulSet's replicas to `keep`).
    if input.surge > 0 && !outdated.is_empty() && input.replicas < input.keep {
        let name = format!("ordinal {}", input.replicas);
        return result(Step::Wait, status(SURGING, &name, None), None);
    }

    // 4. A pod boundary: stop here while paused (a scale-down too).
    if input.paused {
        let doing = shrinking.then(|| scaling(format!("paused by the annotation {}", super::PAUSED_ANNOTATION)));
        return Plan { shrinking: doing, ..result(Step::Wait, status(PAUSED, "", None), None) };
    }

    // 5. A scale-down drains the highest pod, which 2b found serving.
    if shrinking && let Some(p) = pods.iter().find(|p| p.ordinal == top) {
        let step = Step::StartDrain(p.name.clone());
        let doing = Some(scaling(format!("draining {} before removing it", p.name)));
        return Plan { shrinking: doing, ..result(step, status(DRAINING, &p.name, p.connections), None) };
    }

    if held.is_some() {
        return result(Step::Wait, status(STUCK, "", None), None);
    }

    // 6. The next pod of a rollout: one that is down anyway first (nothing
    //    to drain, and replacing it takes no second gateway down), then the highest ordinal.
    let down = outdated.iter().filter(|p| !p.up() && p.connections.unwrap_or(0) == 0).max_by_key(|p| p.ordinal);
    if let Some(p) = down {
        let step = Step::Delete { pod: p.name.clone(), drained_for: None, connections_left: None };
        return result(step, status(REPLACING, &p.name, None), None);
    }
    match outdated.iter().max_by_key(|p| p.ordinal) {
        // Only when the others can take its clients without passing their capacity.
        Some(p) if p.connections.unwrap_or(0) > room_beside(&pods, p) => {
            result(Step::Wait, status(WAITING_FOR_ROOM, &p.name, p.connections), None)
        }
        Some(p) => result(Step::StartDrain(p.name.clone()), status(DRAINING, &p.name, p.connections), None),
        // Every pod is at the new revision but some is not up: waited for above.
        None => result(Step::Wait, status(WAITING, "", None), None),
    }
}

/// Connections the gateways that serve, other than `pod`, can still take.
fn room_beside(pods: &[&PodState], pod: &PodState) -> u64 {
    pods.iter()
        .filter(|p| p.name != pod.name && p.up())
        .map(|p| p.capacity.unwrap_or(0).saturating_sub(p.connections.unwrap_or(0)))
        .sum()
}

/// The pod the previous status was replacing, if its replacement is now up.
fn replaced(input: &Input, pods: &[&PodState], revision: &str) -> Option<String> {
    let previous = input.previous.as_ref()?;
    if previous.phase != DRAINING && previous.phase != REPLACING && previous.phase != STUCK {
        return None;
    }
    // Reported once per pod, whoever leads and however stale the status
    // this reconcile read.
    pods.iter()
        .find(|p| p.name == previous.pod && p.revision == revision && p.up() && !p.replacement_reported)
        .map(|p| p.name.clone())
}

#[cfg(test)]
mod tests;
