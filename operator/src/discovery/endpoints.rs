//! The endpoint ConfigMap's document and the decision to rewrite it. Pure:
//! no I/O, so the write policy is unit-tested here.
//!
//! The document (key `endpoints.json` of `<name>-endpoints`):
//! `{"updatedAt": RFC 3339, "gateways": [{pod, url, connections, capacity,
//! ready, draining, version}, …]}`, gateways sorted by pod name.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

/// One gateway as clients see it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayEndpoint {
    /// The pod name (also the gateway's id).
    pub pod: String,
    /// Where clients open their WebSocket.
    pub url: String,
    pub connections: u64,
    /// Connections it accepts at most (`maxConnectionsPerPod`).
    pub capacity: u64,
    /// Accepting new clients: it says so, its pod is not being deleted and
    /// the operator could read its load.
    pub ready: bool,
    pub draining: bool,
    /// The gateway's version (empty when its load could not be read).
    pub version: String,
    /// Redis and the store as the gateway sees them (absent when its load
    /// could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backends: Option<Backends>,
    /// Why the operator could not read its load this time (absent when it
    /// could): `connections` are then the last ones read, or 0 when the
    /// gateway is gone (see [`super::endpoint`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_error: Option<String>,
    /// Why Kubernetes is taking the pod away, from its `DisruptionTarget`
    /// condition (`EvictionByEvictionAPI`: an eviction, e.g. `kubectl
    /// drain`; `PreemptionByScheduler`, `DeletionByTaintManager`, …);
    /// absent otherwise. Its gateway drains on SIGTERM meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption: Option<String>,
    /// The zone of the pod's node (`spec.topologySpread.zoneKey`); absent
    /// when the node names none or is not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// Backend health as one gateway reports it: `up`, `down`, or `none` (not used).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backends {
    pub redis: String,
    pub store: String,
    /// A Redis Cluster's masters as the gateway sees them (empty for one Redis).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redis_shards: Vec<RedisShard>,
}

/// One master of a Redis Cluster as one gateway sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedisShard {
    pub master: String,
    pub slots: u32,
    #[serde(default)]
    pub replicas: Vec<String>,
    /// The gateway holds its subscriptions there now.
    pub subscribed: bool,
}

impl Backends {
    pub const DOWN: &str = "down";
}

/// The whole document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// When the list last changed (not when it was last confirmed: an
    /// unchanged list is not rewritten).
    pub updated_at: String,
    pub gateways: Vec<GatewayEndpoint>,
}

impl Endpoints {
    /// Parses the ConfigMap value; `None` for anything else (the `[]` older
    /// operators wrote, hand edits), which the next poll replaces.
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    /// Stable text: fields in declaration order, pretty for `kubectl get -o yaml`.
    pub fn render(&self) -> String {
        // Serializing plain strings, numbers and bools cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn updated_at(&self) -> Option<Timestamp> {
        self.updated_at.parse().ok()
    }

    pub fn total_connections(&self) -> u64 {
        self.gateways.iter().map(|g| g.connections).sum()
    }

    /// Gateways whose load could not be read at the last poll.
    pub fn unread(&self) -> Vec<&GatewayEndpoint> {
        self.gateways.iter().filter(|g| g.load_error.is_some()).collect()
    }
}

/// The time as `updatedAt` shows it: RFC 3339, milliseconds, UTC.
pub fn format_time(at: Timestamp) -> String {
    format!("{:.3}", at)
}

/// Why the list must be rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Nothing usable was published yet (missing, empty or unreadable).
    Initial,
    /// A gateway appeared or went away.
    Membership,
    Ready,
    Draining,
    Version,
    /// Its address or capacity changed.
    Address,
    /// It sees Redis or the store differently.
    Backends,
    /// The total now calls for another number of gateways at the
    /// autoscaler's target per gateway (the autoscaler reads this list).
    Scale,
    /// Some gateway's connections moved by the threshold or more.
    Load,
    /// Connections moved by less than the threshold, and the list has not
    /// been rewritten for [`Policy::small_change_every`].
    SmallLoad,
}

impl Reason {
    /// Bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Initial => "initial",
            Reason::Membership => "membership",
            Reason::Ready => "ready",
            Reason::Draining => "draining",
            Reason::Version => "version",
            Reason::Address => "address",
            Reason::Backends => "backends",
            Reason::Scale => "scale",
            Reason::Load => "load",
            Reason::SmallLoad => "small_load",
        }
    }
}

/// How often and on what the list is rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// At most one write per interval.
    pub interval: Duration,
    /// A gateway's connections moving by this percentage of its capacity
    /// (at least one connection) is a meaningful change.
    pub threshold_percent: u64,
    /// Smaller moves are published once the list is this old, so the counts
    /// (and `status.connections`) converge to the truth without a write per poll.
    pub small_change_every: Duration,
    /// The autoscaler's connections per gateway, when it is on: a total
    /// that calls for another gateway count is a meaningful change.
    pub scale_target: Option<u64>,
}

impl Policy {
    pub const THRESHOLD_PERCENT: u64 = 5;
    /// Small moves wait this many intervals.
    pub const SMALL_CHANGE_INTERVALS: u32 = 6;

    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            threshold_percent: Self::THRESHOLD_PERCENT,
            small_change_every: interval.saturating_mul(Self::SMALL_CHANGE_INTERVALS),
            scale_target: None,
        }
    }

    /// Also publish when the total calls for another number of gateways at `target` each.
    pub fn with_scale_target(self, target: Option<u64>) -> Self {
        Self { scale_target: target.map(|t| t.max(1)), ..self }
    }

    /// Connections a gateway of `capacity` must gain or lose to count.
    pub fn threshold(&self, capacity: u64) -> u64 {
        capacity.saturating_mul(self.threshold_percent).div_ceil(100).max(1)
    }
}

/// How `observed` differs from `published` (both sorted by pod): the most
/// important difference, `None` when identical.
pub fn classify(published: &[GatewayEndpoint], observed: &[GatewayEndpoint], policy: &Policy) -> Option<Reason> {
    let same_pods = published.len() == observed.len() && published.iter().zip(observed).all(|(p, o)| p.pod == o.pod);
    if !same_pods {
        return Some(Reason::Membership);
    }
    let pairs = || published.iter().zip(observed);
    let first = |differs: fn(&GatewayEndpoint, &GatewayEndpoint) -> bool| pairs().any(|(p, o)| differs(p, o));
    if first(|p, o| p.ready != o.ready) {
        Some(Reason::Ready)
    } else if first(|p, o| p.draining != o.draining || p.disruption != o.disruption) {
        Some(Reason::Draining)
    } else if first(|p, o| p.version != o.version) {
        Some(Reason::Version)
    } else if first(|p, o| p.url != o.url || p.capacity != o.capacity || p.zone != o.zone) {
        Some(Reason::Address)
    } else if first(|p, o| p.backends != o.backends) {
        Some(Reason::Backends)
    } else if policy.scale_target.is_some_and(|target| {
        let gateways = |list: &[GatewayEndpoint]| list.iter().map(|g| g.connections).sum::<u64>().div_ceil(target);
        gateways(published) != gateways(observed)
    }) {
        Some(Reason::Scale)
    } else if pairs().any(|(p, o)| p.connections.abs_diff(o.connections) >= policy.threshold(o.capacity)) {
        Some(Reason::Load)
    } else if first(|p, o| p.connections != o.connections) {
        Some(Reason::SmallLoad)
    } else {
        None
    }
}

/// What to do with one poll's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The published list is good enough.
    Keep,
    /// Write, but not before `after` has passed (the previous write was less
    /// than an interval ago).
    Write { reason: Reason, after: Duration },
}

/// Whether to rewrite `published` with `observed` at `now`.
pub fn decide(
    published: Option<&Endpoints>,
    observed: &[GatewayEndpoint],
    now: Timestamp,
    policy: &Policy,
) -> Decision {
    let Some(published) = published.filter(|p| p.updated_at().is_some()) else {
        return Decision::Write { reason: Reason::Initial, after: Duration::ZERO };
    };
    let Some(reason) = classify(&published.gateways, observed, policy) else {
        return Decision::Keep;
    };
    // A clock that went backwards counts as "just written": wait, never storm.
    let age = published
        .updated_at()
        .map(|at| now.duration_since(at))
        .and_then(|d| Duration::try_from(d.max(SignedDuration::ZERO)).ok())
        .unwrap_or_default();
    if reason == Reason::SmallLoad && age < policy.small_change_every {
        return Decision::Keep;
    }
    Decision::Write { reason, after: policy.interval.saturating_sub(age) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(pod: &str, connections: u64) -> GatewayEndpoint {
        GatewayEndpoint {
            pod: pod.into(),
            url: format!("ws://{pod}:8080/v1/ws"),
            connections,
            capacity: 1000,
            ready: true,
            draining: false,
            version: "0.1.0".into(),
            backends: Some(Backends { redis: "up".into(), store: "up".into(), redis_shards: Vec::new() }),
            load_error: None,
            disruption: None,
            zone: None,
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).expect("timestamp")
    }

    fn published(at_second: i64, gateways: Vec<GatewayEndpoint>) -> Endpoints {
        Endpoints { updated_at: format_time(at(at_second)), gateways }
    }

    fn policy() -> Policy {
        Policy::new(Duration::from_secs(5))
    }

    fn policy_without_autoscale() -> Policy {
        policy().with_scale_target(None)
    }

    #[test]
    fn threshold_is_five_percent_of_capacity_and_at_least_one() {
        let p = policy();
        assert_eq!(p.threshold(1000), 50);
        assert_eq!(p.threshold(100), 5);
        assert_eq!(p.threshold(30), 2, "rounded up");
        assert_eq!(p.threshold(1), 1);
        assert_eq!(p.threshold(0), 1);
    }

    #[test]
    fn a_total_that_calls_for_another_gateway_count_is_published_at_once() {
        let policy = policy().with_scale_target(Some(100));
        let before = published(0, vec![gateway("a", 95), gateway("b", 100)]);
        // +10 is under the 5 % threshold (50 of 1000) but 205 needs 3 gateways, 195 needed 2.
        let after = vec![gateway("a", 105), gateway("b", 100)];
        assert_eq!(
            decide(Some(&before), &after, at(5), &policy),
            Decision::Write { reason: Reason::Scale, after: Duration::ZERO }
        );
        let same_count = vec![gateway("a", 90), gateway("b", 100)];
        assert_eq!(decide(Some(&before), &same_count, at(5), &policy), Decision::Keep, "still 2");
        assert_eq!(decide(Some(&before), &after, at(5), &policy_without_autoscale()), Decision::Keep);
    }

    #[test]
    fn nothing_changed_is_kept() {
        let list = vec![gateway("a", 10), gateway("b", 20)];
        assert_eq!(decide(Some(&published(0, list.clone())), &list, at(100), &policy()), Decision::Keep);
    }

    #[test]
    fn nothing_usable_published_is_written_at_once() {
        let list = vec![gateway("a", 10)];
        let now = Decision::Write { reason: Reason::Initial, after: Duration::ZERO };
        assert_eq!(decide(None, &list, at(0), &policy()), now);
        let undated = Endpoints { updated_at: "yesterday".into(), gateways: list.clone() };
        assert_eq!(decide(Some(&undated), &list, at(0), &policy()), now);
        assert_eq!(Endpoints::parse("[]"), None, "what older operators wrote");
    }

    #[test]
    fn each_meaningful_change_is_named() {
        let base = vec![gateway("a", 100), gateway("b", 100)];
        let old = published(0, base.clone());
        let change = |f: fn(&mut Vec<GatewayEndpoint>)| {
            let mut observed = base.clone();
            f(&mut observed);
            match decide(Some(&old), &observed, at(60), &policy()) {
                Decision::Write { reason, after } => {
                    assert_eq!(after, Duration::ZERO, "a minute after the last write");
                    Some(reason)
                }
                Decision::Keep => None,
            }
        };
        assert_eq!(change(|o| o.push(gateway("c", 0))), Some(Reason::Membership));
        assert_eq!(change(|o| drop(o.remove(0))), Some(Reason::Membership));
        assert_eq!(change(|o| o[1].pod = "c".into()), Some(Reason::Membership), "same count, other pod");
        assert_eq!(change(|o| o[0].ready = false), Some(Reason::Ready));
        assert_eq!(change(|o| o[1].draining = true), Some(Reason::Draining));
        assert_eq!(change(|o| o[0].version = "0.2.0".into()), Some(Reason::Version));
        assert_eq!(change(|o| o[0].url = "ws://elsewhere/v1/ws".into()), Some(Reason::Address));
        assert_eq!(change(|o| o[0].capacity = 2000), Some(Reason::Address));
        assert_eq!(
            change(|o| o[1].backends =
                Some(Backends { redis: "down".into(), store: "up".into(), redis_shards: Vec::new() })),
            Some(Reason::Backends)
        );
        assert_eq!(change(|o| o[0].connections = 150), Some(Reason::Load), "+50 of 1000 is 5 %");
        assert_eq!(change(|o| o[1].connections = 50), Some(Reason::Load), "down counts too");
        // Under the threshold, but the list is a minute old (> 6 intervals of 5 s).
        assert_eq!(change(|o| o[0].connections = 149), Some(Reason::SmallLoad));
        assert_eq!(change(|o| o[0].ready = false), Some(Reason::Ready), "ready outranks load");
    }

    #[test]
    fn small_moves_wait_until_the_list_is_six_intervals_old() {
        let old = published(0, vec![gateway("a", 100)]);
        let observed = vec![gateway("a", 149)];
        assert_eq!(decide(Some(&old), &observed, at(29), &policy()), Decision::Keep);
        assert_eq!(
            decide(Some(&old), &observed, at(30), &policy()),
            Decision::Write { reason: Reason::SmallLoad, after: Duration::ZERO }
        );
    }

    #[test]
    fn writes_are_at_least_an_interval_apart() {
        let old = published(0, vec![gateway("a", 100)]);
        let observed = vec![gateway("a", 100), gateway("b", 0)];
        assert_eq!(
            decide(Some(&old), &observed, at(2), &policy()),
            Decision::Write { reason: Reason::Membership, after: Duration::from_secs(3) }
        );
        assert_eq!(
            decide(Some(&old), &observed, at(-10), &policy()),
            Decision::Write { reason: Reason::Membership, after: Duration::from_secs(5) },
            "a clock that went back waits a whole interval"
        );
    }

    #[test]
    fn steady_churn_under_the_threshold_writes_once_per_six_intervals() {
        // 10 minutes of polls every 5 s, connections wandering by up to 9 of 1000 (threshold 50).
        let policy = policy();
        let mut current = published(0, vec![gateway("a", 500)]);
        let mut writes = 0;
        for poll in 1..=120_i64 {
            let observed = vec![gateway("a", 500 + (poll % 4) as u64 * 3)];
            if let Decision::Write { after, .. } = decide(Some(&current), &observed, at(poll * 5), &policy) {
                assert_eq!(after, Duration::ZERO);
                current = published(poll * 5, observed);
                writes += 1;
            }
        }
        assert_eq!(writes, 20, "600 s / 30 s");
    }

    #[test]
    fn the_document_round_trips_with_stable_text() {
        let doc = published(0, vec![gateway("a", 1)]);
        let text = doc.render();
        assert_eq!(Endpoints::parse(&text), Some(doc.clone()));
        assert_eq!(text, doc.render());
        assert!(text.contains("\"updatedAt\": \"2023-11-14T22:13:20.000Z\""), "{text}");
        assert!(text.find("\"pod\"") < text.find("\"url\""), "declaration order: {text}");
        assert_eq!(doc.updated_at(), Some(at(0)));
    }
}
