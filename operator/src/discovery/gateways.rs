//! Which pods are a cluster's gateways, where to reach each, and the entry
//! each gets in the endpoint list from its poll. Pure, so each rule is a unit
//! test; not part of the round because the rollout driver dials `admin_addr` too.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kubechat_crds::ChatCluster;

use super::endpoints::GatewayEndpoint;
use super::poll::{LoadReport, PollError};
use crate::desired::gateway::COMPONENT;
use crate::desired::{LABEL_COMPONENT, LABEL_INSTANCE};

/// The cluster's gateway pods that have an address, sorted by name.
pub fn gateway_pods(cc: &ChatCluster, pods: &[Arc<Pod>]) -> Vec<Arc<Pod>> {
    let mut mine: Vec<Arc<Pod>> = pods
        .iter()
        .filter(|p| p.namespace() == cc.namespace())
        .filter(|p| p.labels().get(LABEL_INSTANCE) == Some(&cc.name_any()))
        .filter(|p| p.labels().get(LABEL_COMPONENT).map(String::as_str) == Some(COMPONENT))
        .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_deref()).is_some_and(|ip| !ip.is_empty()))
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .cloned()
        .collect();
    mine.sort_by_key(|p| p.name_any());
    mine
}

/// The pod's address and its container port named `name` (the spec's port
/// when the container does not name one).
fn pod_port(pod: &Pod, name: &str, fallback: i32) -> Option<SocketAddr> {
    let ip: IpAddr = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
    let port = pod
        .spec
        .as_ref()
        .into_iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .map_or(fallback, |p| p.container_port);
    Some(SocketAddr::new(ip, u16::try_from(port).ok()?))
}

fn pod_is_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    pod.metadata.deletion_timestamp.is_none() && conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The reason of the pod's `DisruptionTarget` condition (set by the
/// apiserver on an eviction, by the scheduler on a preemption, …): why
/// Kubernetes is taking it away.
fn disruption(pod: &Pod) -> Option<String> {
    let conditions = pod.status.as_ref()?.conditions.as_deref()?;
    let target = conditions.iter().find(|c| c.type_ == "DisruptionTarget" && c.status == "True")?;
    Some(target.reason.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| "DisruptionTarget".into()))
}

/// One gateway's entry from its poll result. `previous` is what was
/// published for the same pod: a gateway that could not be read keeps its
/// address, capacity and version, is not ready, and says why its load is
/// missing. It keeps its last connections too (an overloaded gateway that
/// does not answer must not look empty to the autoscaler) unless it is gone
/// (refused: a dead gateway holds no one, and its clients count where they
/// reconnected).
pub fn endpoint(
    pod: &Pod,
    polled: Result<LoadReport, PollError>,
    previous: Option<&GatewayEndpoint>,
    cc: &ChatCluster,
) -> GatewayEndpoint {
    let name = pod.name_any();
    let spec = &cc.spec.gateway;
    let fallback_url = || {
        pod_port(pod, "websocket", spec.ports.websocket).map(|addr| format!("ws://{addr}/v1/ws")).unwrap_or_default()
    };
    match polled {
        Ok(report) => GatewayEndpoint {
            url: if report.url.is_empty() { fallback_url() } else { report.url },
            connections: report.connections,
            capacity: report.capacity,
            ready: report.ready && !report.draining && pod_is_ready(pod),
            draining: report.draining,
            version: report.version,
            backends: report.backends,
            load_error: None,
            disruption: disruption(pod),
            zone: None,
            pod: name,
        },
        Err(e) => GatewayEndpoint {
            url: previous.map_or_else(fallback_url, |p| p.url.clone()),
            connections: if e.gateway_is_gone() { 0 } else { previous.map_or(0, |p| p.connections) },
            load_error: Some(e.to_string()),
            capacity: previous.map_or(u64::try_from(spec.max_connections_per_pod).unwrap_or(0), |p| p.capacity),
            ready: false,
            draining: false,
            version: previous.map(|p| p.version.clone()).unwrap_or_default(),
            backends: None,
            disruption: disruption(pod),
            zone: None,
            pod: name,
        },
    }
}

/// The gateway's admin address (its pod IP); with `loopback_only`, only a
/// loopback one (see [`super::Options::loopback_only`]).
pub fn admin_addr(pod: &Pod, cc: &ChatCluster, loopback_only: bool) -> Result<SocketAddr, PollError> {
    dialed(pod, "admin", cc.spec.gateway.ports.admin, loopback_only)
}

/// The pod's WebSocket (client) address, where the rollout's synthetic
/// client connects (`crate::rollout::probe`); the same rules.
pub fn websocket_addr(pod: &Pod, cc: &ChatCluster, loopback_only: bool) -> Result<SocketAddr, PollError> {
    dialed(pod, "websocket", cc.spec.gateway.ports.websocket, loopback_only)
}

fn dialed(pod: &Pod, port: &str, fallback: i32, loopback_only: bool) -> Result<SocketAddr, PollError> {
    let not_dialed = |why: &str| PollError::NotDialed(why.to_string());
    let addr = pod_port(pod, port, fallback).ok_or_else(|| not_dialed("no pod IP"))?;
    if loopback_only && !addr.ip().is_loopback() {
        return Err(not_dialed("not a loopback address (loopback-only mode)"));
    }
    Ok(addr)
}

/// An address can be reused by another pod: only its own gateway counts.
pub(super) fn same_pod(pod: &Pod, report: LoadReport) -> Result<LoadReport, PollError> {
    if report.pod == pod.name_any() { Ok(report) } else { Err(PollError::OtherPod(report.pod)) }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::desired::fixtures::ChatClusterExt;
    use crate::discovery::endpoints;

    fn pod(name: &str, ip: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("team-a".into()),
                labels: Some(BTreeMap::from([
                    (LABEL_INSTANCE.to_string(), "chat".to_string()),
                    (LABEL_COMPONENT.to_string(), COMPONENT.to_string()),
                ])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "gateway".into(),
                    ports: Some(vec![
                        ContainerPort { name: Some("websocket".into()), container_port: 7000, ..Default::default() },
                        ContainerPort { name: Some("admin".into()), container_port: 7001, ..Default::default() },
                    ]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: ip.map(str::to_string),
                phase: Some("Running".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn report(pod: &str, connections: u64) -> LoadReport {
        LoadReport {
            pod: pod.into(),
            url: format!("ws://advertised/{pod}"),
            connections,
            capacity: 100,
            ready: true,
            draining: false,
            version: "0.1.0".into(),
            backends: Some(endpoints::Backends { redis: "up".into(), store: "up".into(), redis_shards: Vec::new() }),
        }
    }

    fn refused() -> PollError {
        PollError::Connect(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }

    #[test]
    fn only_this_clusters_gateways_with_an_address_sorted() {
        let cc = ChatCluster::test();
        let mut other_cluster = pod("other-gateway-0", Some("127.1.0.9"));
        other_cluster.labels_mut().insert(LABEL_INSTANCE.into(), "other".into());
        let mut other_namespace = pod("chat-gateway-5", Some("127.1.0.8"));
        other_namespace.metadata.namespace = Some("team-b".into());
        let mut failed = pod("chat-gateway-3", Some("127.1.0.7"));
        failed.status.as_mut().expect("status").phase = Some("Failed".into());
        let pods: Vec<Arc<Pod>> = [
            pod("chat-gateway-1", Some("127.1.0.2")),
            pod("chat-gateway-0", Some("127.1.0.1")),
            pod("chat-gateway-2", None),
            other_cluster,
            other_namespace,
            failed,
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        let names: Vec<String> = gateway_pods(&cc, &pods).iter().map(|p| p.name_any()).collect();
        assert_eq!(names, ["chat-gateway-0", "chat-gateway-1"]);
    }

    #[test]
    fn ports_come_from_the_pod() {
        let p = pod("chat-gateway-0", Some("127.1.0.1"));
        assert_eq!(pod_port(&p, "admin", 9090), Some("127.1.0.1:7001".parse().expect("addr")));
        assert_eq!(pod_port(&p, "metrics", 9100), Some("127.1.0.1:9100".parse().expect("addr")), "spec fallback");
        assert_eq!(pod_port(&pod("x", Some("fd00::1")), "admin", 1), Some("[fd00::1]:7001".parse().expect("addr")));
        assert_eq!(pod_port(&pod("x", None), "admin", 1), None);
    }

    #[test]
    fn a_read_gateway_is_listed_as_it_reports() {
        let cc = ChatCluster::test();
        let p = pod("chat-gateway-0", Some("127.1.0.1"));
        let e = endpoint(&p, Ok(report("chat-gateway-0", 7)), None, &cc);
        assert_eq!(e.url, "ws://advertised/chat-gateway-0");
        assert_eq!((e.connections, e.capacity, e.ready, e.draining), (7, 100, true, false));
        assert_eq!(e.backends.as_ref().map(|b| b.redis.as_str()), Some("up"));
        let mut silent_url = report("chat-gateway-0", 7);
        silent_url.url.clear();
        assert_eq!(endpoint(&p, Ok(silent_url), None, &cc).url, "ws://127.1.0.1:7000/v1/ws");
        let mut draining = report("chat-gateway-0", 7);
        draining.draining = true;
        let e = endpoint(&p, Ok(draining), None, &cc);
        assert!(e.draining && !e.ready, "a draining gateway is not recommended");
    }

    #[test]
    fn a_pod_on_its_way_out_or_unready_is_not_ready() {
        let cc = ChatCluster::test();
        let mut deleting = pod("chat-gateway-0", Some("127.1.0.1"));
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::from_second(1).expect("time")));
        assert!(!endpoint(&deleting, Ok(report("chat-gateway-0", 1)), None, &cc).ready);
        let mut unready = pod("chat-gateway-0", Some("127.1.0.1"));
        unready.status.as_mut().expect("status").conditions = None;
        assert!(!endpoint(&unready, Ok(report("chat-gateway-0", 1)), None, &cc).ready);
    }

    #[test]
    fn an_unread_gateway_is_unready_keeps_its_last_load_and_address_and_says_why() {
        let cc = ChatCluster::test();
        let p = pod("chat-gateway-0", Some("127.1.0.1"));
        let before = endpoint(&p, Ok(report("chat-gateway-0", 40)), None, &cc);
        let silent = PollError::Timeout(Duration::from_secs(1));
        let after = endpoint(&p, Err(silent), Some(&before), &cc);
        assert_eq!(
            after,
            GatewayEndpoint {
                ready: false,
                backends: None,
                load_error: Some("no answer within 1s".into()),
                ..before.clone()
            },
            "url, capacity, version and connections as last published"
        );
        assert_eq!(after.connections, 40, "an overloaded gateway does not look empty");
        let dead = endpoint(&p, Err(refused()), Some(&before), &cc);
        assert_eq!(dead.connections, 0, "a gateway that is gone holds no one");
        assert_eq!((dead.url.as_str(), dead.ready), (before.url.as_str(), false));
        let never_read = endpoint(&p, Err(refused()), None, &cc);
        assert_eq!(never_read.url, "ws://127.1.0.1:7000/v1/ws");
        assert_eq!(never_read.capacity, 50_000, "the spec's maxConnectionsPerPod");
        assert_eq!(never_read.version, "");
    }

    #[test]
    fn an_evicted_pod_says_so_in_its_entry() {
        let cc = ChatCluster::test();
        let mut evicted = pod("chat-gateway-0", Some("127.1.0.1"));
        assert_eq!(endpoint(&evicted, Ok(report("chat-gateway-0", 1)), None, &cc).disruption, None);
        evicted.status.as_mut().and_then(|s| s.conditions.as_mut()).expect("conditions").push(PodCondition {
            type_: "DisruptionTarget".into(),
            status: "True".into(),
            reason: Some("EvictionByEvictionAPI".into()),
            ..PodCondition::default()
        });
        let entry = endpoint(&evicted, Ok(report("chat-gateway-0", 1)), None, &cc);
        assert_eq!(entry.disruption.as_deref(), Some("EvictionByEvictionAPI"));
        let unread = endpoint(&evicted, Err(refused()), Some(&entry), &cc);
        assert_eq!(unread.disruption.as_deref(), Some("EvictionByEvictionAPI"), "read from the pod, not the poll");
    }

    #[test]
    fn another_pods_gateway_at_the_address_does_not_count() {
        let p = pod("chat-gateway-0", Some("127.1.0.1"));
        assert!(same_pod(&p, report("chat-gateway-0", 1)).is_ok());
        let err = same_pod(&p, report("old-gateway-3", 1)).expect_err("other pod");
        assert_eq!(err.label(), "invalid");
    }
}
