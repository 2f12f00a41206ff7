//! The ChatCluster status, computed from what was observed. Pure: the same
//! observation gives the same status, so an idle reconcile writes nothing.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kubechat_crds::{ChatCluster, ChatClusterStatus, ComponentStatus, GatewayPodStatus, RedisShardStatus, ZoneStatus};

use crate::desired::Names;
use crate::discovery::endpoints::{Backends, RedisShard};
use crate::observe::{Observed, Workload};
use crate::scale::{self, NO_LOAD_REPORT};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// One component's wanted pods and what was observed of it (`None`: not created yet).
struct Component<'a> {
    name: &'static str,
    desired: i32,
    observed: Option<&'a Workload>,
}

impl Component<'_> {
    fn status(&self) -> ComponentStatus {
        ComponentStatus { desired: self.desired, ready: self.observed.map_or(0, |w| w.ready.min(self.desired)) }
    }

    /// Settled: the controller saw the newest spec and every pod is updated and ready.
    fn settled(&self) -> bool {
        match self.observed {
            None => self.desired == 0,
            Some(w) => w.current && w.desired == self.desired && w.ready >= self.desired && w.updated >= self.desired,
        }
    }

    /// "gateway 3/3 ready" alone would contradict an unsettled component:
    /// say what is still missing.
    fn describe(&self) -> String {
        let s = self.status();
        let ready = format!("{} {}/{} ready", self.name, s.ready, s.desired);
        match self.observed {
            Some(w) if !w.current => format!("{ready} (its controller has not seen the newest spec yet)"),
            Some(w) if w.updated < self.desired => {
                format!("{ready}, {}/{} at the newest spec", w.updated, self.desired)
            }
            Some(w) if w.desired != self.desired => format!("{ready} (scaling to {})", self.desired),
            _ => ready,
        }
    }
}

fn components<'a>(cc: &ChatCluster, observed: &'a Observed) -> [Component<'a>; 4] {
    let spec = &cc.spec;
    [
        Component {
            name: "gateway",
            desired: observed.gateways_wanted.unwrap_or_else(|| scale::initial_replicas(&spec.gateway)),
            observed: observed.gateway.as_ref(),
        },
        Component {
            name: "redis",
            desired: i32::from(spec.redis.effective_managed().is_some()),
            observed: observed.redis.as_ref(),
        },
        Component {
            name: "scylla",
            desired: spec.scylla.effective_managed().map_or(0, |m| m.nodes),
            observed: observed.scylla.as_ref(),
        },
        Component {
            name: "push workers",
            desired: spec.push_workers.replicas,
            observed: observed.push_workers.as_ref(),
        },
    ]
}

/// The status for `observed`; conditions keep their `lastTransitionTime`
/// from `previous` while their value does not change.
pub fn compute(
    cc: &ChatCluster,
    observed: &Observed,
    previous: Option<&ChatClusterStatus>,
    now: &Time,
) -> ChatClusterStatus {
    let generation = cc.metadata.generation;
    let parts = components(cc, observed);
    let unsettled: Vec<String> = parts.iter().filter(|c| !c.settled()).map(Component::describe).collect();
    let backends_down = backends_down(observed);

    // Degraded: the first kind of problem names the reason; the message lists them all.
    let problem_kinds = [
        ("ApplyFailed", &observed.refused),
        ("SecretNotFound", &observed.missing_secrets),
        ("PodsCannotStart", &observed.stuck),
        ("BackendUnavailable", &backends_down),
    ];
    let blocking = problem_kinds.iter().take(2).find(|(_, problems)| !problems.is_empty());
    let degraded_condition = match problem_kinds.iter().find(|(_, problems)| !problems.is_empty()) {
        Some((reason, _)) => {
            let problems: Vec<&str> =
                problem_kinds.iter().flat_map(|(_, problems)| problems.iter()).map(String::as_str).collect();
            ("True", *reason, bounded(problems.join("; ")))
        }
        None => (
            "False",
            "AsExpected",
            "every object is applied, every referenced Secret exists, every pod can start and no gateway reports \
             a backend down"
                .to_string(),
        ),
    };
    let progressing_condition = match (unsettled.is_empty(), observed.stuck.is_empty()) {
        (true, _) => ("False", "Stable", "every component is up to date and ready".to_string()),
        (false, true) => ("True", "RollingOut", unsettled.join(", ")),
        (false, false) => {
            ("False", "Blocked", bounded(format!("{} (pods cannot start: see Degraded)", unsettled.join(", "))))
        }
    };
    let (not_serving, unread) = not_serving(observed, parts[0].desired);
    let ready_condition = match (blocking, unsettled.is_empty()) {
        (Some((reason, problems)), _) => ("False", *reason, bounded(problems.join("; "))),
        (None, true) if !not_serving.is_empty() => {
            let reason = if unread { NO_LOAD_REPORT } else { "GatewaysNotServing" };
            ("False", reason, bounded(format!("gateways not serving: {}", not_serving.join("; "))))
        }
        (None, true) => ("True", "AllComponentsReady", "every component is ready and every gateway serves".to_string()),
        (None, false) if !observed.stuck.is_empty() => ("False", "PodsCannotStart", unsettled.join(", ")),
        (None, false) => ("False", "ComponentsNotReady", unsettled.join(", ")),
    };

    let previous_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let condition = |type_: &str, (status, reason, message): (&str, &str, String)| {
        let last_transition_time = previous_conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time,
        }
    };

    let [gateway, redis, scylla, push_workers] = parts.map(|c| c.status());
    ChatClusterStatus {
        observed_generation: generation,
        conditions: vec![
            condition(READY, ready_condition),
            condition(PROGRESSING, progressing_condition),
            condition(DEGRADED, degraded_condition),
        ],
        gateways_ready: format!("{}/{}", gateway.ready, gateway.desired),
        gateway,
        redis,
        scylla,
        push_workers,
        connections: observed.endpoints.as_ref().map_or(0, |e| saturating_i64(e.total_connections())),
        gateway_pods: observed
            .endpoints
            .iter()
            .flat_map(|e| &e.gateways)
            .map(|g| GatewayPodStatus {
                pod: g.pod.clone(),
                connections: saturating_i64(g.connections),
                ready: g.ready,
                draining: g.draining,
                disruption: g.disruption.clone(),
                zone: g.zone.clone(),
            })
            .collect(),
        zones: zones(observed),
        redis_shards: redis_shards(observed),
        // Filled in by the rollout driver (`rollout::Report`) and the reconcile (`scale::Scale`).
        rollout: None,
        autoscale: None,
        endpoint_config_map: Names(&cc.name_any()).endpoints(),
    }
}

/// Gateways per zone, from the endpoint list (pods of no known zone left out).
fn zones(observed: &Observed) -> Vec<ZoneStatus> {
    let mut zones: BTreeMap<&str, ZoneStatus> = BTreeMap::new();
    for g in observed.endpoints.iter().flat_map(|e| &e.gateways) {
        let Some(zone) = g.zone.as_deref() else { continue };
        let entry = zones.entry(zone).or_insert_with(|| ZoneStatus { zone: zone.to_string(), ..ZoneStatus::default() });
        entry.gateways += 1;
        entry.ready += i32::from(g.ready);
        entry.connections = entry.connections.saturating_add(saturating_i64(g.connections));
    }
    zones.into_values().collect()
}

/// Gateway pods the new status shows Kubernetes taking away that the old
/// one did not (each is reported once: the status remembers).
pub fn newly_disrupted<'a>(old: Option<&ChatClusterStatus>, new: &'a ChatClusterStatus) -> Vec<&'a GatewayPodStatus> {
    let known = |pod: &GatewayPodStatus| {
        old.into_iter().flat_map(|s| &s.gateway_pods).any(|o| o.pod == pod.pod && o.disruption == pod.disruption)
    };
    new.gateway_pods.iter().filter(|g| g.disruption.is_some() && !known(g)).collect()
}

/// Gateways that should take clients and do not, as the endpoint list
/// shows them (a draining one is on its way out: the rollout reports it),
/// and whether any of them because its load could not be read. A pod can
/// be Ready while its gateway serves no one: Ready means the list says so.
fn not_serving(observed: &Observed, desired: i32) -> (Vec<String>, bool) {
    if desired == 0 {
        return (Vec::new(), false);
    }
    let Some(endpoints) = &observed.endpoints else {
        return (vec!["no endpoint list yet: no gateway's load was read".to_string()], true);
    };
    let mut unread = false;
    let problems = endpoints
        .gateways
        .iter()
        .filter(|g| !g.ready && !g.draining)
        .map(|g| match &g.load_error {
            Some(error) => {
                unread = true;
                format!("{}: its load could not be read ({error})", g.pod)
            }
            None => format!("{}: reports not ready", g.pod),
        })
        .collect();
    (problems, unread)
}

/// Backends the gateways report down, as the endpoint list shows them
/// ("Redis unreachable from chat-gateway-0, chat-gateway-2"). A degraded
/// backend does not make the cluster unready: chat still works in part
/// (docs/cluster.md), so it is reported, not hidden behind Ready.
fn backends_down(observed: &Observed) -> Vec<String> {
    let gateways = observed.endpoints.iter().flat_map(|e| &e.gateways);
    let seeing = |down: fn(&Backends) -> bool| -> Vec<&str> {
        gateways.clone().filter(|g| g.backends.as_ref().is_some_and(down)).map(|g| g.pod.as_str()).collect()
    };
    let mut problems = Vec::new();
    let redis = seeing(|b| b.redis == Backends::DOWN);
    if !redis.is_empty() {
        problems.push(format!("Redis unreachable from {}", redis.join(", ")));
    }
    let store = seeing(|b| b.store == Backends::DOWN);
    if !store.is_empty() {
        problems.push(format!("store unavailable from {}", store.join(", ")));
    }
    problems
}

/// A Redis Cluster's masters as the gateways report them (ordered by
/// address): the topology of the gateway that saw the most slots served
/// (one mid-failover may list a master that is gone), and how many gateways
/// hold their subscriptions on each.
fn redis_shards(observed: &Observed) -> Vec<RedisShardStatus> {
    let reports: Vec<&Vec<RedisShard>> = observed
        .endpoints
        .iter()
        .flat_map(|e| &e.gateways)
        .filter_map(|g| g.backends.as_ref().map(|b| &b.redis_shards))
        .filter(|shards| !shards.is_empty())
        .collect();
    let Some(topology) = reports.iter().max_by_key(|shards| shards.iter().map(|s| s.slots).sum::<u32>()) else {
        return Vec::new();
    };
    let mut shards: Vec<RedisShardStatus> = topology
        .iter()
        .map(|shard| RedisShardStatus {
            master: shard.master.clone(),
            slots: i32::try_from(shard.slots).unwrap_or(i32::MAX),
            replicas: shard.replicas.clone(),
            gateways_subscribed: saturating_i32(
                reports.iter().filter(|r| r.iter().any(|s| s.master == shard.master && s.subscribed)).count(),
            ),
        })
        .collect();
    shards.sort_by(|a, b| a.master.cmp(&b.master));
    shards
}

fn saturating_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Condition messages stay readable (and far below the API's 32 KiB limit).
const MAX_MESSAGE_BYTES: usize = 4096;

fn bounded(message: String) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message;
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::fixtures::ChatClusterExt;
    use k8s_openapi::jiff::Timestamp;

    fn time(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("timestamp"))
    }

    fn ready(n: i32) -> Option<Workload> {
        Some(Workload { desired: n, ready: n, updated: n, current: true })
    }

    /// Every pod ready and every gateway listed as serving.
    fn all_ready(cc: &ChatCluster) -> Observed {
        use crate::discovery::endpoints::{Endpoints, GatewayEndpoint};
        let serving = |n: i32| GatewayEndpoint { pod: format!("chat-gateway-{n}"), ready: true, ..Default::default() };
        Observed {
            gateway: ready(cc.spec.gateway.replicas),
            redis: ready(1),
            scylla: ready(1),
            push_workers: ready(1),
            endpoints: Some(Endpoints {
                updated_at: "2025-01-01T00:00:00.000Z".into(),
                gateways: (0..cc.spec.gateway.replicas).map(serving).collect(),
            }),
            ..Observed::default()
        }
    }

    /// Gateways are counted per zone of their node; unknown zones are not a zone.
    #[test]
    fn gateways_are_counted_per_zone() {
        let cc = ChatCluster::test().with_gateway_replicas(4);
        let mut observed = all_ready(&cc);
        let gateways = &mut observed.endpoints.as_mut().expect("endpoints").gateways;
        for (g, zone) in gateways.iter_mut().zip([Some("b"), Some("a"), Some("b"), None]) {
            g.zone = zone.map(str::to_string);
            g.connections = 10;
        }
        gateways[2].ready = false;
        let status = compute(&cc, &observed, None, &time(1));
        let zone =
            |zone: &str, gateways, ready, connections| ZoneStatus { zone: zone.into(), gateways, ready, connections };
        assert_eq!(status.zones, [zone("a", 1, 1, 10), zone("b", 2, 1, 20)]);
        assert_eq!(status.gateway_pods[0].zone.as_deref(), Some("b"));
        assert!(compute(&cc, &all_ready(&cc), None, &time(1)).zones.is_empty(), "no zone known: none listed");
    }

    /// An eviction shows in the gateway's status entry and is reported once.
    #[test]
    fn a_disruption_is_in_the_status_and_new_only_once() {
        let cc = ChatCluster::test();
        let mut observed = all_ready(&cc);
        let before = compute(&cc, &observed, None, &time(1));
        assert!(newly_disrupted(None, &before).is_empty());
        let gateways = &mut observed.endpoints.as_mut().expect("endpoints").gateways;
        gateways[0].disruption = Some("EvictionByEvictionAPI".into());
        gateways[0].draining = true;
        let during = compute(&cc, &observed, Some(&before), &time(2));
        assert_eq!(during.gateway_pods[0].disruption.as_deref(), Some("EvictionByEvictionAPI"));
        let new: Vec<&str> = newly_disrupted(Some(&before), &during).iter().map(|g| g.pod.as_str()).collect();
        assert_eq!(new, ["chat-gateway-0"]);
        assert!(newly_disrupted(Some(&during), &during).is_empty(), "reported once");
        let ready = during.conditions.iter().find(|c| c.type_ == READY).expect("Ready");
        assert_eq!(ready.status, "True", "a gateway draining for an eviction is on its way out, not a fault");
    }

    /// Pods ready is not enough: gateways whose load cannot be read (or
    /// that say they are not ready) serve no one, and Ready says so.
    #[test]
    fn ready_means_every_gateway_serves_and_says_why_not() {
        let cc = ChatCluster::test();
        let mut observed = all_ready(&cc);
        for gateway in &mut observed.endpoints.as_mut().expect("endpoints").gateways {
            gateway.ready = false;
            gateway.load_error = Some("connecting: Connection refused".into());
        }
        let status = compute(&cc, &observed, None, &time(1));
        let ready = condition(&status, READY);
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", NO_LOAD_REPORT));
        assert!(
            ready.message.contains("chat-gateway-0: its load could not be read (connecting: Connection refused)"),
            "{}",
            ready.message
        );
        assert_eq!(status.gateways_ready, "2/2", "the pods are ready; the gateways are not serving");

        let mut observed = all_ready(&cc);
        observed.endpoints.as_mut().expect("endpoints").gateways[1].ready = false;
        let status = compute(&cc, &observed, None, &time(1));
        let ready = condition(&status, READY);
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "GatewaysNotServing"));
        assert!(ready.message.contains("chat-gateway-1: reports not ready"), "{}", ready.message);

        let mut observed = all_ready(&cc);
        observed.endpoints = None;
        assert_eq!(condition(&compute(&cc, &observed, None, &time(1)), READY).reason, NO_LOAD_REPORT);
    }

    fn condition<'a>(status: &'a ChatClusterStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).expect("condition present")
    }

    #[test]
    fn nothing_created_yet_is_progressing_not_ready() {
        let cc = ChatCluster::test();
        let status = compute(&cc, &Observed::default(), None, &time(1));
        assert_eq!(condition(&status, READY).status, "False");
        assert_eq!(condition(&status, READY).reason, "ComponentsNotReady");
        assert_eq!(condition(&status, PROGRESSING).status, "True");
        assert_eq!(condition(&status, DEGRADED).status, "False");
        assert_eq!(status.gateways_ready, "0/2");
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(status.endpoint_config_map, "chat-endpoints");
    }

    #[test]
    fn all_ready_is_ready_and_stable() {
        let cc = ChatCluster::test();
        let status = compute(&cc, &all_ready(&cc), None, &time(1));
        assert_eq!(condition(&status, READY).status, "True");
        assert_eq!(condition(&status, PROGRESSING).status, "False");
        assert_eq!(status.gateways_ready, "2/2");
        assert_eq!(status.gateway, ComponentStatus { desired: 2, ready: 2 });
    }

    #[test]
    fn scaling_up_shows_progress() {
        let cc = ChatCluster::test().with_gateway_replicas(5);
        let mut observed = all_ready(&cc);
        observed.gateway = Some(Workload { desired: 5, ready: 3, updated: 5, current: true });
        let status = compute(&cc, &observed, None, &time(1));
        assert_eq!(status.gateways_ready, "3/5");
        let progressing = condition(&status, PROGRESSING);
        assert_eq!(progressing.status, "True");
        assert!(progressing.message.contains("gateway 3/5 ready"), "{}", progressing.message);
    }

    #[test]
    fn missing_secret_is_degraded_with_its_name() {
        let cc = ChatCluster::test();
        let mut observed = all_ready(&cc);
        observed.missing_secrets = vec!["Secret jwt not found in namespace team-a".into()];
        let status = compute(&cc, &observed, None, &time(1));
        let degraded = condition(&status, DEGRADED);
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "SecretNotFound"));
        assert!(degraded.message.contains("jwt"));
        assert_eq!(condition(&status, READY).status, "False");
    }

    #[test]
    fn same_observation_gives_the_same_status() {
        let cc = ChatCluster::test();
        let first = compute(&cc, &all_ready(&cc), None, &time(1));
        let second = compute(&cc, &all_ready(&cc), Some(&first), &time(99));
        assert_eq!(first, second, "transition times must be kept while nothing changes");
    }

    #[test]
    fn a_transition_updates_the_time() {
        let cc = ChatCluster::test();
        let first = compute(&cc, &Observed::default(), None, &time(1));
        let second = compute(&cc, &all_ready(&cc), Some(&first), &time(99));
        assert_eq!(condition(&second, READY).last_transition_time, time(99));
        assert_eq!(condition(&second, DEGRADED).last_transition_time, time(1));
    }

    #[test]
    fn connections_are_the_published_totals() {
        use crate::discovery::endpoints::{Endpoints, GatewayEndpoint};
        let cc = ChatCluster::test();
        let mut observed = all_ready(&cc);
        let gateway = |pod: &str, connections, ready| GatewayEndpoint {
            pod: pod.into(),
            connections,
            ready,
            draining: !ready,
            ..Default::default()
        };
        observed.endpoints = Some(Endpoints {
            updated_at: "2025-01-01T00:00:00.000Z".into(),
            gateways: vec![gateway("chat-gateway-0", 12, true), gateway("chat-gateway-1", 30, false)],
        });
        let status = compute(&cc, &observed, None, &time(1));
        assert_eq!(status.connections, 42);
        assert_eq!(
            status.gateway_pods,
            vec![
                GatewayPodStatus {
                    pod: "chat-gateway-0".into(),
                    connections: 12,
                    ready: true,
                    draining: false,
                    ..GatewayPodStatus::default()
                },
                GatewayPodStatus {
                    pod: "chat-gateway-1".into(),
                    connections: 30,
                    ready: false,
                    draining: true,
                    ..GatewayPodStatus::default()
                },
            ]
        );
        let unpublished = compute(&cc, &Observed { endpoints: None, ..all_ready(&cc) }, Some(&status), &time(2));
        assert_eq!(
            (unpublished.connections, unpublished.gateway_pods.len()),
            (0, 0),
            "nothing published, nothing shown"
        );
    }

    #[test]
    fn redis_shards_come_from_the_gateways_reports() {
        use crate::discovery::endpoints::{Endpoints, GatewayEndpoint};
        let cc = ChatCluster::test();
        let shard = |master: &str, slots, subscribed| RedisShard {
            master: master.into(),
            slots,
            replicas: vec![format!("{master}-replica")],
            subscribed,
        };
        let gateway = |pod: &str, shards: Vec<RedisShard>| GatewayEndpoint {
            pod: pod.into(),
            ready: true,
            backends: Some(Backends { redis: "up".into(), store: "up".into(), redis_shards: shards }),
            ..Default::default()
        };
        let mut observed = all_ready(&cc);
        assert!(compute(&cc, &observed, None, &time(1)).redis_shards.is_empty(), "one Redis: no shards");
        observed.endpoints = Some(Endpoints {
            updated_at: "2025-01-01T00:00:00.000Z".into(),
            gateways: vec![
                // Mid-failover: b's master is gone from this gateway's view, and it resubscribes.
                gateway("chat-gateway-0", vec![shard("a:6379", 8192, true), shard("b:6379", 4096, false)]),
                gateway("chat-gateway-1", vec![shard("a:6379", 8192, true), shard("b:6379", 8192, true)]),
            ],
        });
        let status = compute(&cc, &observed, None, &time(1));
        let listed: Vec<(&str, i32, i32)> =
            status.redis_shards.iter().map(|s| (s.master.as_str(), s.slots, s.gateways_subscribed)).collect();
        assert_eq!(listed, vec![("a:6379", 8192, 2), ("b:6379", 8192, 1)], "the fullest view, subscribers counted");
        assert_eq!(status.redis_shards[0].replicas, vec!["a:6379-replica".to_string()]);
    }

    #[test]
    fn a_backend_a_gateway_sees_down_is_degraded_but_still_ready() {
        use crate::discovery::endpoints::{Endpoints, GatewayEndpoint};
        let cc = ChatCluster::test();
        let gateway = |pod: &str, redis: &str, store: &str| GatewayEndpoint {
            pod: pod.into(),
            ready: true,
            backends: Some(Backends { redis: redis.into(), store: store.into(), redis_shards: Vec::new() }),
            ..Default::default()
        };
        let mut observed = all_ready(&cc);
        observed.endpoints = Some(Endpoints {
            updated_at: "2025-01-01T00:00:00.000Z".into(),
            gateways: vec![
                gateway("chat-gateway-0", "down", "up"),
                gateway("chat-gateway-1", "down", "down"),
                GatewayEndpoint { pod: "chat-gateway-2".into(), ready: true, ..Default::default() },
            ],
        });
        let status = compute(&cc, &observed, None, &time(1));
        let degraded = condition(&status, DEGRADED);
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "BackendUnavailable"));
        assert_eq!(
            degraded.message,
            "Redis unreachable from chat-gateway-0, chat-gateway-1; store unavailable from chat-gateway-1"
        );
        assert_eq!(condition(&status, READY).status, "True");

        observed.missing_secrets = vec!["Secret jwt not found".into()];
        let both = compute(&cc, &observed, None, &time(1));
        let degraded = condition(&both, DEGRADED);
        assert_eq!(degraded.reason, "SecretNotFound");
        assert!(degraded.message.starts_with("Secret jwt not found; Redis unreachable"), "{}", degraded.message);
    }

    #[test]
    fn external_backends_count_as_zero_pods() {
        let cc = ChatCluster::test().with_spec(|s| {
            s.redis.managed = None;
            s.redis.external = Some(kubechat_crds::ExternalRedis {
                url: "redis://x:1".into(),
                password_secret: None,
                cluster: false,
                seed_urls: Vec::new(),
            });
        });
        let mut observed = all_ready(&cc);
        observed.redis = None;
        let status = compute(&cc, &observed, None, &time(1));
        assert_eq!(status.redis, ComponentStatus { desired: 0, ready: 0 });
        assert_eq!(condition(&status, READY).status, "True");
    }
}
