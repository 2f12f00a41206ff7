//! The planner's cases, each a hand-built `Input` and the `Plan` it must
//! give; kept apart from the planner so that the decision reads on its own.

use super::*;

const OLD: &str = "rev-old";
const NEW: &str = "rev-new";

fn pod(ordinal: i32, revision: &str) -> PodState {
    PodState {
        name: format!("chat-gateway-{ordinal}"),
        ordinal,
        revision: revision.into(),
        created: 1_000,
        deleting: false,
        containers_ready: true,
        serving: Some(true),
        drain_started: None,
        listed_ready: true,
        connections: Some(100),
        capacity: Some(1000),
        replacement_reported: false,
        load_error: None,
        serve_error: None,
    }
}

fn input(pods: Vec<PodState>) -> Input {
    Input {
        replicas: 3,
        keep: 3,
        surge: 0,
        update_revision: Some(NEW.into()),
        pods,
        paused: false,
        previous: None,
        now: 2_000,
        drain_deadline: 60,
        ready_timeout: 300,
    }
}

fn previous(phase: &str, pod: &str) -> Option<RolloutStatus> {
    Some(RolloutStatus {
        revision: NEW.into(),
        pod: pod.into(),
        phase: phase.into(),
        started: "2025-01-01T00:00:00Z".into(),
        ..Default::default()
    })
}

fn draining(mut p: PodState, since: i64, left: u64) -> PodState {
    p.drain_started = Some(since);
    p.serving = Some(false);
    p.listed_ready = false;
    p.connections = Some(left);
    p
}

#[test]
fn a_settled_cluster_has_nothing_to_do() {
    let plan = plan(&input(vec![pod(0, NEW), pod(1, NEW), pod(2, NEW)]));
    assert_eq!(plan, Plan::idle(false));
}

#[test]
fn a_new_pod_gets_its_gate_opened_once_its_gateway_is_ready() {
    let mut fresh = pod(2, NEW);
    fresh.serving = None;
    fresh.listed_ready = false;
    let p = plan(&input(vec![pod(0, NEW), pod(1, NEW), fresh.clone()]));
    assert_eq!(p.step, Step::MarkServing("chat-gateway-2".into()));
    assert!(p.rollout.is_none(), "not a rollout");
    fresh.containers_ready = false;
    assert_eq!(plan(&input(vec![pod(0, NEW), pod(1, NEW), fresh])).step, Step::Wait, "not ready: wait");
}

#[test]
fn a_rollout_drains_the_highest_ordinal_first() {
    let p = plan(&input(vec![pod(0, OLD), pod(1, OLD), pod(2, OLD)]));
    assert_eq!(p.step, Step::StartDrain("chat-gateway-2".into()));
    let rollout = p.rollout.expect("rollout status");
    assert_eq!((rollout.phase.as_str(), rollout.pod.as_str()), (DRAINING, "chat-gateway-2"));
    assert_eq!((rollout.updated, rollout.total), (0, 3));
    assert_eq!(rollout.summary, "Draining chat-gateway-2 (0/3)");
    assert_eq!(rollout.started, crate::time::rfc3339(2_000));
}

#[test]
fn a_drain_runs_until_empty_or_its_deadline() {
    let pods = |left| vec![pod(0, OLD), pod(1, OLD), draining(pod(2, OLD), 1_990, left)];
    let p = plan(&Input { previous: previous(DRAINING, "chat-gateway-2"), ..input(pods(40)) });
    assert_eq!(p.step, Step::Wait);
    assert_eq!(p.rollout.as_ref().and_then(|r| r.connections_left), Some(40));
    let p = plan(&Input { previous: previous(DRAINING, "chat-gateway-2"), ..input(pods(0)) });
    assert_eq!(p.step, Step::Delete { pod: "chat-gateway-2".into(), drained_for: Some(10), connections_left: Some(0) });
    let late = Input { now: 2_050, ..input(pods(40)) };
    assert!(
        matches!(plan(&late).step, Step::Delete { drained_for: Some(60), connections_left: Some(40), .. }),
        "the deadline ends it"
    );
}

#[test]
fn a_drain_whose_gateway_cannot_be_read_ends_at_the_deadline() {
    let mut unread = draining(pod(2, OLD), 1_990, 0);
    unread.connections = None;
    assert_eq!(plan(&input(vec![pod(0, OLD), pod(1, OLD), unread.clone()])).step, Step::Wait);
    let late = Input { now: 2_100, ..input(vec![pod(0, OLD), pod(1, OLD), unread]) };
    assert!(matches!(plan(&late).step, Step::Delete { .. }));
}

#[test]
fn the_replacement_must_be_up_before_the_next_drain() {
    let mut deleting = draining(pod(2, OLD), 1_990, 0);
    deleting.deleting = true;
    let prev = previous(DRAINING, "chat-gateway-2");
    let p = plan(&Input { previous: prev.clone(), ..input(vec![pod(0, OLD), pod(1, OLD), deleting]) });
    assert_eq!(p.step, Step::Wait, "old pod still terminating");
    let p = plan(&Input { previous: prev.clone(), ..input(vec![pod(0, OLD), pod(1, OLD)]) });
    assert_eq!(p.step, Step::Wait, "replacement not created yet");
    assert_eq!(p.rollout.expect("status").phase, REPLACING);
    let mut starting = pod(2, NEW);
    starting.created = 1_995;
    starting.listed_ready = false;
    let p = plan(&Input { previous: prev.clone(), ..input(vec![pod(0, OLD), pod(1, OLD), starting]) });
    assert_eq!(p.step, Step::Wait, "replacement not listed yet");
    let p = plan(&Input { previous: prev, ..input(vec![pod(0, OLD), pod(1, OLD), pod(2, NEW)]) });
    assert_eq!(p.step, Step::StartDrain("chat-gateway-1".into()));
    assert_eq!(p.replaced.as_deref(), Some("chat-gateway-2"), "a PodReplaced Event");
    assert_eq!(p.rollout.expect("status").updated, 1);
}

#[test]
fn a_replacement_is_reported_once_even_from_a_stale_status() {
    // The status still says pod 2 (a new leader, or a cache behind the
    // last write), but its replacement was already reported.
    let mut reported = pod(2, NEW);
    reported.replacement_reported = true;
    let stale = previous(DRAINING, "chat-gateway-2");
    let p = plan(&Input { previous: stale, ..input(vec![pod(0, OLD), pod(1, OLD), reported]) });
    assert_eq!(p.step, Step::StartDrain("chat-gateway-1".into()), "the rollout goes on");
    assert_eq!(p.replaced, None, "no second PodReplaced");
}

#[test]
fn a_replacement_that_never_comes_up_stops_the_rollout() {
    let mut broken = pod(2, NEW);
    broken.listed_ready = false;
    broken.connections = None;
    broken.created = 1_700; // 300 s ago
    let p = plan(&Input {
        previous: previous(REPLACING, "chat-gateway-2"),
        ..input(vec![pod(0, OLD), pod(1, OLD), broken])
    });
    assert_eq!(p.step, Step::Wait, "the next pod is not drained");
    let message = p.stuck.expect("Degraded");
    assert!(message.contains("chat-gateway-2"), "{message}");
    assert_eq!(p.rollout.expect("status").phase, STUCK);
}

/// A replacement whose gateway reports ready and is listed, but refuses a
/// client's WebSocket connect, is not up: the next pod waits, and the
/// status says why once the limit passes.
#[test]
fn a_replacement_that_refuses_clients_holds_the_rollout_and_says_why() {
    let mut refusing = pod(2, NEW);
    refusing.listed_ready = false;
    refusing.connections = Some(0);
    refusing.created = 1_900;
    refusing.serve_error = Some("it does not answer a WebSocket connect at ws://10.0.0.3:8080/v1/ws: 503".into());
    let pods = vec![pod(0, OLD), pod(1, OLD), refusing];
    let waiting = plan(&Input { previous: previous(REPLACING, "chat-gateway-2"), ..input(pods.clone()) });
    assert_eq!(waiting.step, Step::Wait, "the next pod is not drained");
    assert_eq!(waiting.rollout.expect("status").phase, REPLACING);

    let later = plan(&Input { previous: previous(REPLACING, "chat-gateway-2"), now: 2_300, ..input(pods) });
    assert_eq!(later.step, Step::Wait);
    let message = later.stuck.expect("Degraded");
    assert!(message.contains("does not answer a WebSocket connect at ws://10.0.0.3:8080/v1/ws: 503"), "{message}");
}

/// A replicas edit during a stuck rollout (3 → 2) removes the broken
/// pod, but moves no other pod to the revision that just failed: the
/// rollout stays stuck until the spec changes the revision.
#[test]
fn a_stuck_revision_stays_stuck_when_the_broken_pod_is_removed() {
    let mut broken = pod(2, NEW);
    broken.listed_ready = false;
    broken.connections = None;
    broken.created = 1_700;
    broken.load_error = Some("cannot connect: Connection refused".into());
    let stuck = plan(&Input {
        previous: previous(REPLACING, "chat-gateway-2"),
        ..input(vec![pod(0, OLD), pod(1, OLD), broken.clone()])
    });
    let message = stuck.stuck.clone().expect("stuck");
    assert!(message.contains("its load could not be read (cannot connect: Connection refused)"), "{message}");
    let stuck_status = stuck.rollout.expect("status");

    // replicas 3 → 2: the broken pod serves no one and goes at once...
    let shrink_input =
        Input { keep: 2, previous: Some(stuck_status.clone()), ..input(vec![pod(0, OLD), pod(1, OLD), broken]) };
    let removal = plan(&shrink_input);
    assert!(matches!(removal.step, Step::Remove { ordinal: 2, .. }), "{:?}", removal.step);
    let after_removal = removal.rollout.expect("status");
    assert_eq!(after_removal.phase, STUCK, "still stuck while it goes");
    // ...and then nothing moves to the failing revision.
    let next =
        plan(&Input { replicas: 2, keep: 2, previous: Some(after_removal), ..input(vec![pod(0, OLD), pod(1, OLD)]) });
    assert_eq!(next.step, Step::Wait, "no other gateway is drained for the failing revision");
    assert_eq!(next.rollout.expect("status").phase, STUCK);
    assert!(next.stuck.expect("still Degraded").contains("until the spec changes the revision"));
    // A new revision (the spec fixed) moves again.
    let fixed = plan(&Input {
        replicas: 2,
        keep: 2,
        update_revision: Some("rev-fixed".into()),
        previous: Some(stuck_status),
        ..input(vec![pod(0, OLD), pod(1, OLD)])
    });
    assert!(matches!(fixed.step, Step::StartDrain(_)), "{:?}", fixed.step);
}

#[test]
fn fixing_the_spec_replaces_the_broken_pod_without_a_drain() {
    // The broken pod is now at an old revision and holds no one.
    let mut broken = pod(2, "rev-broken");
    broken.listed_ready = false;
    broken.connections = None;
    // Stuck at the broken revision; the spec now asks for another.
    let stuck_at_broken =
        previous(STUCK, "chat-gateway-2").map(|p| RolloutStatus { revision: "rev-broken".into(), ..p });
    let p = plan(&Input { previous: stuck_at_broken, ..input(vec![pod(0, OLD), pod(1, OLD), broken]) });
    assert_eq!(p.step, Step::Delete { pod: "chat-gateway-2".into(), drained_for: None, connections_left: None });
    assert!(p.stuck.is_none());
}

#[test]
fn a_pod_that_is_down_anyway_goes_first() {
    let mut down = pod(0, OLD);
    down.listed_ready = false;
    down.connections = Some(0);
    let p = plan(&input(vec![down, pod(1, OLD), pod(2, OLD)]));
    assert_eq!(p.step, Step::Delete { pod: "chat-gateway-0".into(), drained_for: None, connections_left: None });
}

#[test]
fn pause_stops_at_a_pod_boundary_and_cancels_a_drain_under_way() {
    let paused = |pods| Input { paused: true, previous: previous(DRAINING, "chat-gateway-2"), ..input(pods) };
    let p = plan(&paused(vec![pod(0, OLD), pod(1, OLD), pod(2, NEW)]));
    assert_eq!(p.step, Step::Wait, "no new drain while paused");
    assert_eq!(p.rollout.expect("status").phase, PAUSED);
    let p = plan(&paused(vec![pod(0, OLD), pod(1, OLD), draining(pod(2, OLD), 1_990, 40)]));
    assert_eq!(p.step, Step::CancelDrain { pod: "chat-gateway-2".into(), reason: CANCELLED_PAUSED });
    assert_eq!(p.rollout.expect("status").phase, PAUSED);
    let p = plan(&paused(vec![pod(0, OLD), pod(1, OLD), draining(pod(2, OLD), 1_990, 0)]));
    assert!(matches!(p.step, Step::Delete { .. }), "a drain that is over is not undone: the pod goes");
    let late = Input { now: 2_100, ..paused(vec![pod(0, OLD), pod(1, OLD), draining(pod(2, OLD), 1_990, 40)]) };
    assert!(matches!(plan(&late).step, Step::Delete { .. }), "past its deadline, the same");
    let p = plan(&Input { paused: false, ..paused(vec![pod(0, OLD), pod(1, OLD), pod(2, NEW)]) });
    assert_eq!(p.step, Step::StartDrain("chat-gateway-1".into()), "resumed");
}

#[test]
fn a_cancelled_drain_leaves_the_pod_to_serve_again() {
    // The drain's record is gone, its gate still closed: it opens once the gateway is ready.
    let mut cancelled = pod(2, OLD);
    cancelled.serving = Some(false);
    cancelled.listed_ready = false;
    let paused = Input {
        paused: true,
        previous: previous(PAUSED, ""),
        ..input(vec![pod(0, OLD), pod(1, OLD), cancelled.clone()])
    };
    assert_eq!(plan(&paused).step, Step::MarkServing("chat-gateway-2".into()));
    cancelled.containers_ready = false;
    let p = plan(&Input { pods: vec![pod(0, OLD), pod(1, OLD), cancelled], ..paused });
    assert_eq!(p.step, Step::Wait, "not ready yet: nothing else is drained meanwhile");
}

#[test]
fn a_rollback_cancels_the_drain_of_a_pod_at_the_revision_it_goes_back_to() {
    // Pod 2 was replaced at NEW; pod 1 (at OLD) drains; the spec goes
    // back to OLD: pod 1's drain is cancelled, pod 2 is the one to replace.
    let rolled_back = Input {
        update_revision: Some(OLD.into()),
        previous: previous(DRAINING, "chat-gateway-1"),
        ..input(vec![pod(0, OLD), draining(pod(1, OLD), 1_990, 40), pod(2, NEW)])
    };
    let p = plan(&rolled_back);
    assert_eq!(p.step, Step::CancelDrain { pod: "chat-gateway-1".into(), reason: CANCELLED_ROLLED_BACK });
    assert_eq!(p.rollout.expect("status").phase, WAITING);
    // Over already: it is deleted (and comes back at the same revision) instead.
    let over = Input { pods: vec![pod(0, OLD), draining(pod(1, OLD), 1_990, 0), pod(2, NEW)], ..rolled_back };
    assert!(matches!(plan(&over).step, Step::Delete { .. }));
    // Not rolled back: the drain goes on.
    let p = plan(&Input { update_revision: Some(NEW.into()), ..over.clone() });
    assert!(matches!(p.step, Step::Delete { .. }));
    let going_on = Input { pods: vec![pod(0, OLD), draining(pod(1, OLD), 1_990, 40), pod(2, NEW)], ..over };
    assert_eq!(plan(&Input { update_revision: Some(NEW.into()), ..going_on }).step, Step::Wait);
}

#[test]
fn a_scale_down_given_up_cancels_its_drain() {
    let drain = vec![pod(0, NEW), pod(1, NEW), draining(pod(2, NEW), 1_990, 12)];
    assert_eq!(plan(&shrink(2, drain.clone())).step, Step::Wait, "still wanted away: the drain goes on");
    let p = plan(&shrink(3, drain.clone()));
    assert_eq!(p.step, Step::CancelDrain { pod: "chat-gateway-2".into(), reason: CANCELLED_KEPT });
    assert_eq!(p.rollout, None, "not a rollout");
    let p = plan(&Input { paused: true, ..shrink(2, drain) });
    assert_eq!(p.step, Step::CancelDrain { pod: "chat-gateway-2".into(), reason: CANCELLED_PAUSED });
    assert!(p.shrinking.is_some_and(|s| s.contains("cancelling the drain of chat-gateway-2")));
}

#[test]
fn a_drain_recorded_on_the_pod_is_resumed_not_restarted() {
    // A new leader sees the annotation: it waits on that drain (the
    // driver asks the gateway, which keeps its clock), never starts another.
    let pods = vec![pod(0, OLD), draining(pod(1, OLD), 1_995, 30), pod(2, NEW)];
    let p = plan(&input(pods));
    assert_eq!(p.step, Step::Wait);
    assert_eq!(p.rollout.expect("status").pod, "chat-gateway-1");
}

#[test]
fn the_rollout_finishes_when_every_pod_is_new_and_up() {
    let p = plan(&Input {
        previous: previous(REPLACING, "chat-gateway-0"),
        ..input(vec![pod(0, NEW), pod(1, NEW), pod(2, NEW)])
    });
    assert_eq!(p.step, Step::Idle);
    assert!(p.finished && p.rollout.is_none());
    assert_eq!(p.replaced.as_deref(), Some("chat-gateway-0"));
}

#[test]
fn an_unsettled_stateful_set_is_waited_for() {
    let p = plan(&Input {
        update_revision: None,
        previous: previous(DRAINING, "chat-gateway-2"),
        ..input(vec![pod(0, OLD), pod(1, OLD), pod(2, OLD)])
    });
    assert_eq!(p.step, Step::Wait);
    assert_eq!(p.rollout, previous(DRAINING, "chat-gateway-2"), "status kept");
}

#[test]
fn pods_beyond_the_replica_count_are_ignored() {
    let p = plan(&Input { replicas: 2, ..input(vec![pod(0, NEW), pod(1, NEW), pod(2, OLD)]) });
    assert_eq!(p, Plan::idle(false));
}

fn shrink(keep: i32, pods: Vec<PodState>) -> Input {
    Input { keep, ..input(pods) }
}

#[test]
fn a_scale_down_drains_the_highest_pod_then_removes_it() {
    let p = plan(&shrink(2, vec![pod(0, NEW), pod(1, NEW), pod(2, NEW)]));
    assert_eq!(p.step, Step::StartDrain("chat-gateway-2".into()));
    assert_eq!(p.rollout, None, "not a rollout");
    assert_eq!(p.shrinking.as_deref(), Some("draining chat-gateway-2 before removing it (3 → 2 gateways)"));

    let busy = vec![pod(0, NEW), pod(1, NEW), draining(pod(2, NEW), 1_990, 12)];
    assert_eq!(plan(&shrink(2, busy)).step, Step::Wait, "still 12 connections");
    let drained = vec![pod(0, NEW), pod(1, NEW), draining(pod(2, NEW), 1_990, 0)];
    let p = plan(&shrink(2, drained));
    assert_eq!(
        p.step,
        Step::Remove {
            ordinal: 2,
            pod: Some("chat-gateway-2".into()),
            drained_for: Some(10),
            connections_left: Some(0)
        },
        "removed, not deleted for a replacement"
    );
}

#[test]
fn a_scale_down_removes_one_pod_at_a_time() {
    // After a removal the StatefulSet says 2 and the removed pod is
    // terminating: nothing else is drained until it is gone.
    let mut leaving = draining(pod(2, NEW), 1_990, 0);
    leaving.deleting = true;
    let p = plan(&Input { replicas: 2, ..shrink(1, vec![pod(0, NEW), pod(1, NEW), leaving]) });
    assert_eq!(p.step, Step::StartDrain("chat-gateway-1".into()), "pod 2 is past the replicas: not waited for");
    // A pod below the top that is down: the top is not drained meanwhile.
    let mut down = pod(0, NEW);
    down.listed_ready = false;
    down.connections = Some(0);
    let p = plan(&shrink(1, vec![down, pod(1, NEW), pod(2, NEW)]));
    assert_eq!(p.step, Step::Wait, "never two gateways down");
}

#[test]
fn a_pod_to_remove_that_serves_no_one_goes_without_a_drain() {
    let mut idle = pod(2, NEW);
    idle.listed_ready = false;
    idle.connections = Some(0);
    let mut down = pod(0, NEW);
    down.listed_ready = false;
    let p = plan(&shrink(2, vec![down, pod(1, NEW), idle]));
    assert_eq!(
        p.step,
        Step::Remove { ordinal: 2, pod: Some("chat-gateway-2".into()), drained_for: None, connections_left: None }
    );
    // A pod that never came to be (a quota, say) is removed too.
    let p = plan(&shrink(2, vec![pod(0, NEW), pod(1, NEW)]));
    assert_eq!(p.step, Step::Remove { ordinal: 2, pod: None, drained_for: None, connections_left: None });
    // But one that holds connections is drained, even if the list says it is not ready.
    let mut busy = pod(2, NEW);
    busy.listed_ready = false;
    busy.connections = Some(40);
    assert_eq!(plan(&shrink(2, vec![pod(0, NEW), pod(1, NEW), busy])).step, Step::StartDrain("chat-gateway-2".into()));
}

#[test]
fn a_pod_about_to_be_removed_does_not_get_its_gate_opened() {
    let mut fresh = pod(2, NEW);
    fresh.serving = None;
    fresh.listed_ready = false;
    fresh.connections = None;
    let p = plan(&shrink(2, vec![pod(0, NEW), pod(1, NEW), fresh]));
    assert!(matches!(p.step, Step::Remove { ordinal: 2, .. }), "{:?}", p.step);
}

#[test]
fn a_rollout_drain_of_the_highest_pod_ends_in_its_removal_when_the_cluster_shrinks() {
    let pods = vec![pod(0, OLD), pod(1, OLD), draining(pod(2, OLD), 1_990, 0)];
    let p = plan(&Input { previous: previous(DRAINING, "chat-gateway-2"), ..shrink(2, pods) });
    assert!(matches!(p.step, Step::Remove { ordinal: 2, .. }), "{:?}", p.step);
    assert!(p.rollout.is_some(), "the rollout goes on with the pods left");
}

#[test]
fn a_scale_down_waits_while_paused() {
    let p = plan(&Input { paused: true, ..shrink(2, vec![pod(0, NEW), pod(1, NEW), pod(2, NEW)]) });
    assert_eq!(p.step, Step::Wait);
    assert!(p.shrinking.is_some_and(|s| s.contains("paused")));
}

#[test]
fn the_started_time_is_kept_across_steps() {
    let p = plan(&Input {
        previous: previous(REPLACING, "chat-gateway-2"),
        ..input(vec![pod(0, OLD), pod(1, OLD), pod(2, NEW)])
    });
    assert_eq!(p.rollout.expect("status").started, "2025-01-01T00:00:00Z");
}

/// With a surge, the added gateway comes first: nothing is drained until
/// the StatefulSet has it and it is up; then the highest old pod, and the
/// surge pod itself is never drained while old pods remain.
#[test]
fn a_surge_gateway_comes_up_before_the_first_drain() {
    let surging = Input { keep: 4, surge: 1, ..input(vec![pod(0, OLD), pod(1, OLD), pod(2, OLD)]) };
    let waiting = plan(&surging);
    assert_eq!(waiting.step, Step::Wait, "no drain before the surge gateway exists");
    assert_eq!(waiting.rollout.expect("status").phase, SURGING);

    let mut added = pod(3, NEW);
    added.listed_ready = false;
    added.connections = Some(0);
    let coming = plan(&Input {
        replicas: 4,
        keep: 4,
        surge: 1,
        ..input(vec![pod(0, OLD), pod(1, OLD), pod(2, OLD), added.clone()])
    });
    assert_eq!(coming.step, Step::Wait, "no drain before the surge gateway is up");

    added.listed_ready = true;
    let draining =
        plan(&Input { replicas: 4, keep: 4, surge: 1, ..input(vec![pod(0, OLD), pod(1, OLD), pod(2, OLD), added]) });
    assert_eq!(draining.step, Step::StartDrain("chat-gateway-2".into()), "the highest old pod, not the surge pod");
}

/// An old gateway is drained only when the others that serve have room for
/// its clients; until then the rollout waits and says why.
#[test]
fn a_drain_waits_until_the_others_have_room_for_its_clients() {
    let full = |ordinal: i32| PodState { connections: Some(950), ..pod(ordinal, OLD) };
    let crowded = plan(&input(vec![full(0), full(1), full(2)]));
    assert_eq!(crowded.step, Step::Wait, "50 + 50 free cannot take 950");
    assert_eq!(crowded.rollout.expect("status").phase, WAITING_FOR_ROOM);

    let roomy = plan(&input(vec![pod(0, OLD), pod(1, OLD), full(2)]));
    assert_eq!(roomy.step, Step::StartDrain("chat-gateway-2".into()), "900 + 900 free take 950");
}
