//! How many gateways to run. Pure: no clock, no I/O, every case a unit test.
//!
//! Without `gateway.autoscale` the answer is `gateway.replicas`. With it,
//! ceil((connections + buffer) / targetConnectionsPerPod) within min..max,
//! where the connections are the endpoint list's total (what the discovery
//! loop last published) and the buffer is spare capacity kept ready for a
//! burst (`buffer`: a count, or a percent of the connections):
//!
//! - more gateways are added at once;
//! - fewer are wanted only after the connections kept calling for fewer for
//!   the whole cool-down (`scaleDownCooldownSeconds`), and never fewer than
//!   the connections need now;
//! - either way a gateway is removed only after a drain: [`Scale::keep`]
//!   below the StatefulSet's replicas tells the rollout driver to drain the
//!   highest ordinal, and the driver lowers the replicas once it is empty
//!   (`crate::rollout`).
//!
//! The state between reconciles is the StatefulSet's replicas and
//! `status.autoscale` (when the cool-down started), not memory.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kubechat_crds::{AutoscaleSpec, AutoscaleStatus, GatewaySpec};

use crate::time;

/// `status.autoscale.reason` values.
pub const STABLE: &str = "Stable";
pub const SCALED_UP: &str = "ScaledUp";
pub const COOLING_DOWN: &str = "CoolingDown";
pub const SCALING_DOWN: &str = "ScalingDown";
pub const AT_MAXIMUM: &str = "AtMaximum";
pub const NO_LOAD_REPORT: &str = "NoLoadReport";

/// What the decision depends on.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub gateway: &'a GatewaySpec,
    /// The StatefulSet's replicas (`None`: not created yet).
    pub current: Option<i32>,
    /// Connections over every gateway as the endpoint list publishes them
    /// (`None`: no list yet).
    pub connections: Option<u64>,
    /// The previous `status.autoscale`.
    pub previous: Option<&'a AutoscaleStatus>,
    /// Gateways whose load could not be read at the last poll (their last
    /// known connections are counted): no scale-down is decided meanwhile.
    pub unread: Vec<String>,
    /// Unix seconds.
    pub now: i64,
}

/// The decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scale {
    /// The StatefulSet's replicas to set: `Some` when more are needed (at
    /// once) or it is about to be created; `None`: as they are, whatever
    /// they are by the time they are applied (a removal waits for a drain,
    /// and a count read a moment ago may already be out of date).
    pub replicas: Option<i32>,
    /// Gateways to keep. Below `replicas`: drain the highest ordinal, then
    /// lower `replicas` by one, until they meet.
    pub keep: i32,
    /// `status.autoscale` (`None` without autoscale).
    pub status: Option<AutoscaleStatus>,
    /// A scale-up: the note of its `ScaledUp` Event.
    pub scaled_up: Option<String>,
    /// Decide again after this long (the end of a cool-down), even if
    /// nothing changes meanwhile.
    pub recheck: Option<Duration>,
}

/// Replicas of a gateway StatefulSet about to be created: `replicas`, kept
/// within the autoscale bounds when autoscaling is on.
pub fn initial_replicas(gateway: &GatewaySpec) -> i32 {
    match &gateway.autoscale {
        Some(a) => gateway.replicas.clamp(a.min_replicas, a.max_replicas.max(a.min_replicas)),
        None => gateway.replicas,
    }
}

/// Spare connections `buffer` asks for beside `connections`: a count, or a
/// percent of the connections rounded up (the schema admits nothing else;
/// anything else counts as none).
pub fn buffer(autoscale: &AutoscaleSpec, connections: u64) -> u64 {
    match &autoscale.buffer {
        None => 0,
        Some(IntOrString::Int(count)) => u64::try_from(*count).unwrap_or(0),
        Some(IntOrString::String(percent)) => {
            let percent: u64 = percent.strip_suffix('%').and_then(|p| p.parse().ok()).unwrap_or(0);
            connections.saturating_mul(percent).div_ceil(100)
        }
    }
}

/// Gateways `connections` (and the buffer beside them) call for at
/// `target` each, within the bounds.
pub fn needed(autoscale: &AutoscaleSpec, connections: u64) -> i32 {
    i32::try_from(unbounded(autoscale, connections))
        .unwrap_or(i32::MAX)
        .clamp(autoscale.min_replicas, autoscale.max_replicas.max(autoscale.min_replicas))
}

/// [`needed`] before the bounds.
fn unbounded(autoscale: &AutoscaleSpec, connections: u64) -> u64 {
    let target = u64::try_from(autoscale.target_connections_per_pod).unwrap_or(1).max(1);
    connections.saturating_add(buffer(autoscale, connections)).div_ceil(target)
}

pub fn decide(input: &Input) -> Scale {
    let current = input.current.unwrap_or_else(|| initial_replicas(input.gateway));
    // More gateways (or a first count) are set at once; fewer never are.
    let set = |wanted: i32| (input.current.is_none() || wanted > current).then_some(wanted.max(current));
    let Some(autoscale) = &input.gateway.autoscale else {
        let wanted = input.gateway.replicas;
        return Scale { replicas: set(wanted), keep: wanted, status: None, scaled_up: None, recheck: None };
    };
    let (min, max) = (autoscale.min_replicas, autoscale.max_replicas.max(autoscale.min_replicas));
    let target = autoscale.target_connections_per_pod;
    let connections = input.connections.unwrap_or(0);
    let shown = i64::try_from(connections).unwrap_or(i64::MAX);
    let unbounded = unbounded(autoscale, connections);
    let spare = buffer(autoscale, connections);
    // Without a load report, only the bounds move the count.
    let desired = match input.connections {
        Some(c) => needed(autoscale, c),
        None => current.clamp(min, max),
    };
    let last_scale_time = match input.previous {
        Some(p) if p.current_replicas == current => p.last_scale_time.clone(),
        _ if input.current.is_none() => None,
        _ => Some(time::rfc3339(input.now)),
    };
    let status = |reason: &str, message: String, below_since: Option<i64>, last_scale_time: Option<String>| {
        Some(AutoscaleStatus {
            current_replicas: current,
            desired_replicas: desired,
            connections: shown,
            reason: reason.into(),
            message,
            below_since: below_since.map(time::rfc3339),
            last_scale_time,
        })
    };
    let with_buffer = if spare > 0 { format!(" with a buffer of {spare}") } else { String::new() };
    let need = format!("{connections} connections{with_buffer} need {desired} at {target} per gateway");

    if desired > current {
        let change = format!("{current} → {desired}: {need}");
        return Scale {
            replicas: set(desired),
            keep: desired,
            status: status(SCALED_UP, format!("scaled {change}"), None, Some(time::rfc3339(input.now))),
            scaled_up: input.current.is_some().then(|| format!("Scaled gateways {change}")),
            recheck: None,
        };
    }
    let steady =
        |keep: i32, reason: &str, message: String, below_since: Option<i64>, recheck: Option<Duration>| Scale {
            replicas: set(current),
            keep,
            status: status(reason, message, below_since, last_scale_time.clone()),
            scaled_up: None,
            recheck,
        };
    if desired == current {
        return match input.connections {
            None => steady(current, NO_LOAD_REPORT, format!("no load report yet; {current} gateways"), None, None),
            Some(_) if unbounded > u64::try_from(max).unwrap_or(0) => steady(
                current,
                AT_MAXIMUM,
                format!(
                    "{connections} connections{with_buffer} would need {unbounded} at {target} per gateway; held at \
                     maxReplicas {max}"
                ),
                None,
                None,
            ),
            Some(_) => steady(current, STABLE, format!("{current} gateways: {need}"), None, None),
        };
    }

    // Fewer wanted, but not every gateway answered: an overloaded one that
    // does not answer must not start (or finish) a cool-down. Held, and the
    // cool-down starts afresh once every load is read.
    if !input.unread.is_empty() && current <= max {
        let message = format!(
            "the load of {} could not be read (last known connections counted); no scale-down until every \
             gateway reports ({current} run)",
            input.unread.join(", ")
        );
        return steady(current, NO_LOAD_REPORT, message, None, None);
    }

    // Fewer wanted. Above maxReplicas is removed without waiting (the spec
    // says so); the rest only after the cool-down.
    let below_since = input
        .previous
        .filter(|p| p.desired_replicas < p.current_replicas)
        .and_then(|p| p.below_since.as_deref())
        .and_then(time::parse)
        .unwrap_or(input.now);
    let cooldown = i64::from(autoscale.scale_down_cooldown_seconds.max(0));
    let waited = input.now.saturating_sub(below_since);
    if waited >= cooldown {
        let message = format!(
            "{need}; removing gateways one at a time, highest ordinal first, each drained before it goes ({current} run)"
        );
        return steady(desired, SCALING_DOWN, message, Some(below_since), None);
    }
    let left = cooldown - waited;
    let keep = current.min(max);
    let message = format!("{need}; {current} run, scaling down after the cool-down ({left} s left)");
    steady(keep, COOLING_DOWN, message, Some(below_since), Some(Duration::from_secs(left.unsigned_abs())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gateway that could not be polled (overloaded) holds a scale-down
    /// that would otherwise start its cool-down, and the cool-down starts
    /// afresh once it answers; a scale-up is not held.
    #[test]
    fn an_unread_gateway_holds_a_scale_down_but_not_a_scale_up() {
        let gateway = autoscaled(1, 10, 100, 60);
        let unread = vec!["chat-gateway-2".to_string()];
        let held = decide(&Input { unread: unread.clone(), ..input(&gateway, 3, 50, 1000) });
        assert_eq!(held.keep, 3);
        let status = held.status.expect("status");
        assert_eq!(status.reason, NO_LOAD_REPORT);
        assert!(status.message.contains("chat-gateway-2"), "{}", status.message);
        assert_eq!(status.below_since, None, "no cool-down started");
        let up = decide(&Input { unread, ..input(&gateway, 3, 450, 1000) });
        assert_eq!(up.replicas, Some(5), "more gateways are added whatever answered");
        let answered = decide(&input(&gateway, 3, 50, 1001));
        assert_eq!(answered.status.expect("status").reason, COOLING_DOWN);
    }

    fn autoscaled(min: i32, max: i32, target: i64, cooldown: i32) -> GatewaySpec {
        GatewaySpec {
            autoscale: Some(AutoscaleSpec {
                min_replicas: min,
                max_replicas: max,
                target_connections_per_pod: target,
                scale_down_cooldown_seconds: cooldown,
                buffer: None,
            }),
            ..GatewaySpec::default()
        }
    }

    fn input<'a>(gateway: &'a GatewaySpec, current: i32, connections: u64, now: i64) -> Input<'a> {
        Input {
            gateway,
            current: Some(current),
            connections: Some(connections),
            previous: None,
            now,
            unread: Vec::new(),
        }
    }

    #[test]
    fn without_autoscale_the_spec_decides_and_a_removal_waits_for_a_drain() {
        let gateway = GatewaySpec { replicas: 3, ..GatewaySpec::default() };
        let up = decide(&Input { connections: None, ..input(&gateway, 2, 0, 0) });
        assert_eq!((up.replicas, up.keep, up.status), (Some(3), 3, None));
        let down = decide(&input(&gateway, 5, 999_999, 0));
        assert_eq!((down.replicas, down.keep), (None, 3), "keep 3, drain the other two first");
        let new = decide(&Input { current: None, ..input(&gateway, 0, 0, 0) });
        assert_eq!((new.replicas, new.keep), (Some(3), 3));
    }

    #[test]
    fn the_count_is_connections_over_target_rounded_up_within_the_bounds() {
        let spec = autoscaled(2, 10, 100, 300);
        let a = spec.autoscale.as_ref().expect("autoscale");
        assert_eq!(needed(a, 0), 2, "minimum");
        assert_eq!(needed(a, 300), 3);
        assert_eq!(needed(a, 301), 4, "rounded up");
        assert_eq!(needed(a, 5_000), 10, "maximum");
    }

    #[test]
    fn a_buffer_keeps_spare_capacity_ready_as_a_count_or_a_percent() {
        let mut spec = autoscaled(1, 10, 100, 300);
        let with = |spec: &mut GatewaySpec, buffer: IntOrString| {
            spec.autoscale.as_mut().expect("autoscale").buffer = Some(buffer);
            spec.autoscale.clone().expect("autoscale")
        };
        let count = with(&mut spec, IntOrString::Int(50));
        assert_eq!((buffer(&count, 60), needed(&count, 60)), (50, 2), "60 + 50 spare need two");
        assert_eq!(needed(&count, 50), 1, "50 + 50 fit one");
        assert_eq!(needed(&count, 0), 1);
        let percent = with(&mut spec, IntOrString::String("25%".into()));
        assert_eq!((buffer(&percent, 300), needed(&percent, 300)), (75, 4), "300 + 75");
        assert_eq!(buffer(&percent, 1), 1, "rounded up");
        assert_eq!(needed(&percent, 80), 1, "80 + 20 fit one");
        assert_eq!(needed(&percent, 81), 2, "81 + 21 do not");
        let huge = with(&mut spec, IntOrString::String("1000%".into()));
        assert_eq!(needed(&huge, 500), 10, "within the bounds");

        let up = decide(&input(&spec, 1, 60, 1_000));
        let message = up.status.expect("status").message;
        assert!(message.contains("with a buffer of 600"), "{message}");
    }

    #[test]
    fn more_connections_add_gateways_at_once() {
        let spec = autoscaled(1, 10, 100, 300);
        let s = decide(&input(&spec, 2, 450, 1_000));
        assert_eq!((s.replicas, s.keep), (Some(5), 5));
        let status = s.status.expect("status");
        assert_eq!((status.reason.as_str(), status.current_replicas, status.desired_replicas), (SCALED_UP, 2, 5));
        assert_eq!(status.last_scale_time, Some(time::rfc3339(1_000)));
        assert_eq!(s.scaled_up.as_deref(), Some("Scaled gateways 2 → 5: 450 connections need 5 at 100 per gateway"));
    }

    #[test]
    fn fewer_connections_remove_gateways_only_after_the_cool_down() {
        let spec = autoscaled(1, 10, 100, 300);
        let first = decide(&input(&spec, 4, 150, 1_000));
        assert_eq!((first.replicas, first.keep), (None, 4), "nothing removed yet");
        let status = first.status.clone().expect("status");
        assert_eq!((status.reason.as_str(), status.desired_replicas), (COOLING_DOWN, 2));
        assert_eq!(status.below_since, Some(time::rfc3339(1_000)));
        assert_eq!(first.recheck, Some(Duration::from_secs(300)), "decide again when it ends");

        let later = decide(&Input { previous: Some(&status), ..input(&spec, 4, 150, 1_200) });
        assert_eq!(later.keep, 4);
        assert_eq!(later.recheck, Some(Duration::from_secs(100)));
        assert_eq!(later.status.as_ref().and_then(|s| s.below_since.clone()), Some(time::rfc3339(1_000)), "kept");

        let over = decide(&Input { previous: Some(&status), ..input(&spec, 4, 150, 1_300) });
        assert_eq!((over.replicas, over.keep), (None, 2), "drain down to what the connections need");
        assert_eq!(over.status.expect("status").reason, SCALING_DOWN);
    }

    #[test]
    fn a_return_of_the_load_restarts_the_cool_down() {
        let spec = autoscaled(1, 10, 100, 300);
        let cooling = decide(&input(&spec, 4, 150, 1_000)).status.expect("status");
        let back = decide(&Input { previous: Some(&cooling), ..input(&spec, 4, 400, 1_100) });
        assert_eq!((back.keep, back.status.as_ref().map(|s| s.reason.as_str())), (4, Some(STABLE)));
        let stable = back.status.expect("status");
        assert_eq!(stable.below_since, None);
        let again = decide(&Input { previous: Some(&stable), ..input(&spec, 4, 150, 1_350) });
        assert_eq!(again.keep, 4, "a new cool-down from 1,350");
        assert_eq!(again.status.and_then(|s| s.below_since), Some(time::rfc3339(1_350)));
    }

    #[test]
    fn never_fewer_than_the_connections_need_while_shrinking() {
        let spec = autoscaled(1, 10, 100, 0);
        let s = decide(&input(&spec, 5, 401, 1_000));
        assert_eq!((s.replicas, s.keep), (None, 5), "401 connections need 5");
        let s = decide(&input(&spec, 5, 399, 1_000));
        assert_eq!(s.keep, 4, "no cool-down: drain one");
    }

    #[test]
    fn a_lowered_maximum_removes_gateways_without_a_cool_down() {
        let spec = autoscaled(1, 3, 100, 300);
        let s = decide(&input(&spec, 6, 250, 1_000));
        assert_eq!((s.replicas, s.keep), (None, 3), "down to the maximum now, the rest after the cool-down");
        assert_eq!(s.status.expect("status").reason, COOLING_DOWN);
    }

    #[test]
    fn load_beyond_the_maximum_says_so() {
        let spec = autoscaled(1, 3, 100, 300);
        let s = decide(&input(&spec, 3, 1_000, 1_000));
        assert_eq!((s.replicas, s.keep), (None, 3));
        let status = s.status.expect("status");
        assert_eq!(status.reason, AT_MAXIMUM);
        assert!(status.message.contains("would need 10"), "{}", status.message);
    }

    #[test]
    fn without_a_load_report_only_the_bounds_move_the_count() {
        let spec = autoscaled(3, 6, 100, 300);
        let below = decide(&Input { connections: None, ..input(&spec, 2, 0, 0) });
        assert_eq!((below.replicas, below.keep), (Some(3), 3));
        let inside = decide(&Input { connections: None, ..input(&spec, 4, 0, 0) });
        assert_eq!((inside.replicas, inside.keep), (None, 4));
        assert_eq!(inside.status.expect("status").reason, NO_LOAD_REPORT);
    }

    #[test]
    fn a_new_stateful_set_starts_from_replicas_within_the_bounds() {
        let mut spec = autoscaled(3, 6, 1000, 300);
        for (replicas, expected) in [(1, 3), (9, 6), (4, 4)] {
            spec.replicas = replicas;
            assert_eq!(initial_replicas(&spec), expected);
        }
        let s = decide(&Input { current: None, connections: None, ..input(&spec, 0, 0, 0) });
        assert_eq!((s.replicas, s.scaled_up), (Some(4), None), "no Event for a creation");
    }

    #[test]
    fn the_last_scale_time_follows_the_stateful_set() {
        let spec = autoscaled(1, 10, 100, 0);
        let before = AutoscaleStatus {
            current_replicas: 3,
            desired_replicas: 2,
            last_scale_time: Some(time::rfc3339(10)),
            ..Default::default()
        };
        let same = decide(&Input { previous: Some(&before), ..input(&spec, 3, 250, 500) });
        assert_eq!(same.status.and_then(|s| s.last_scale_time), Some(time::rfc3339(10)));
        let removed = decide(&Input { previous: Some(&before), ..input(&spec, 2, 150, 500) });
        assert_eq!(removed.status.and_then(|s| s.last_scale_time), Some(time::rfc3339(500)));
    }
}
