//! Which gateway a client should connect to: `GET /v1/discovery` on the
//! client port of every gateway, and the suggestion in a draining gateway's
//! `reconnect` frames.
//!
//! The source is what every gateway publishes in Redis with its lease
//! (`kubechat:gateway-load`, written every 2 s and at once when it starts or
//! stops draining): fresher than a mounted ConfigMap (which the kubelet
//! refreshes only every minute or so) and needing no API access from the
//! gateway pods. The operator's endpoint ConfigMap carries the same fields
//! for whoever outside the cluster wants them. A standalone gateway
//! recommends itself.

use serde::Serialize;

use crate::broker::GatewayLoad;

/// Gateways whose load is within this fraction of capacity of the least
/// loaded one count as equal: a client picks one of them at random, so a
/// burst of clients spreads instead of landing on one gateway.
const NEAR_EQUAL: f64 = 0.05;

/// What `GET /v1/discovery` answers.
#[derive(Debug, Serialize)]
pub struct Discovery {
    /// Where to connect (`null` when no gateway is ready).
    pub recommended: Option<String>,
    /// Every ready, non-draining gateway, best first.
    pub gateways: Vec<DiscoveredGateway>,
}

#[derive(Debug, Serialize)]
pub struct DiscoveredGateway {
    pub url: String,
    pub pod: String,
    pub connections: u64,
    pub capacity: u64,
}

fn utilisation(load: &GatewayLoad) -> f64 {
    if load.capacity == 0 { f64::INFINITY } else { load.connections as f64 / load.capacity as f64 }
}

/// Ready, non-draining gateways other than `exclude`, best first: the
/// near-equal least loaded in random order, then the rest by load.
pub fn recommend(loads: &[GatewayLoad], exclude: Option<&str>, seed: &mut u64) -> Vec<GatewayLoad> {
    let mut candidates: Vec<GatewayLoad> = loads
        .iter()
        .filter(|g| g.ready && !g.draining && g.connections < g.capacity && Some(g.pod.as_str()) != exclude)
        .cloned()
        .collect();
    candidates.sort_by(|a, b| utilisation(a).total_cmp(&utilisation(b)).then_with(|| a.pod.cmp(&b.pod)));
    let Some(best) = candidates.first().map(utilisation) else { return candidates };
    let equal = candidates.iter().take_while(|g| utilisation(g) <= best + NEAR_EQUAL).count();
    // Fisher-Yates over the near-equal head.
    for i in (1..equal).rev() {
        let j = (next_random(seed) % (i as u64 + 1)) as usize;
        candidates.swap(i, j);
    }
    candidates
}

/// The answer to `GET /v1/discovery`.
pub fn discovery(loads: &[GatewayLoad], seed: &mut u64) -> Discovery {
    let ordered = recommend(loads, None, seed);
    Discovery {
        recommended: ordered.first().map(|g| g.url.clone()),
        gateways: ordered
            .into_iter()
            .map(|g| DiscoveredGateway { url: g.url, pod: g.pod, connections: g.connections, capacity: g.capacity })
            .collect(),
    }
}

/// xorshift64*: enough to spread clients, no dependency.
fn next_random(state: &mut u64) -> u64 {
    if *state == 0 {
        *state = 0x9E37_79B9_7F4A_7C15;
    }
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pod: &str, connections: u64, ready: bool, draining: bool) -> GatewayLoad {
        GatewayLoad {
            pod: pod.into(),
            url: format!("ws://{pod}/v1/ws"),
            connections,
            capacity: 1000,
            ready,
            draining,
            version: "test".into(),
            published_at_ms: 0,
        }
    }

    #[test]
    fn never_a_draining_unready_full_or_excluded_gateway() {
        let loads = [
            load("gw-0", 10, true, true),
            load("gw-1", 10, false, false),
            load("gw-2", 1000, true, false),
            load("gw-3", 500, true, false),
            load("gw-4", 900, true, false),
        ];
        let mut seed = 1;
        let pods: Vec<String> = recommend(&loads, None, &mut seed).into_iter().map(|g| g.pod).collect();
        assert_eq!(pods, vec!["gw-3", "gw-4"], "least loaded first");
        assert!(recommend(&loads, Some("gw-3"), &mut seed).iter().all(|g| g.pod == "gw-4"));
        assert_eq!(discovery(&[load("gw-0", 1, true, true)], &mut seed).recommended, None);
    }

    #[test]
    fn equally_loaded_gateways_share_a_burst() {
        let loads = [load("gw-0", 100, true, false), load("gw-1", 110, true, false), load("gw-2", 105, true, false)];
        let mut seed = 42;
        let mut picks = [0_u32; 3];
        for _ in 0..3000 {
            let first = recommend(&loads, None, &mut seed).remove(0);
            picks[usize::from(first.pod.as_bytes()[3] - b'0')] += 1;
        }
        for count in picks {
            assert!((800..=1200).contains(&count), "not within ±20 % of 1000: {picks:?}");
        }
    }
}
