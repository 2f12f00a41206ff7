//! The managed ScyllaDB: a StatefulSet whose first pod seeds the others
//! through a headless Service. Nothing is built for an external cluster.

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SecurityContext, Service,
    ServicePort, ServiceSpec, TCPSocketAction, VolumeMount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kubechat_crds::{ChatCluster, ManagedScylla};

use super::{
    DesiredObject, Names, owned_meta, resources_or, restricted_container_security, restricted_pod_security,
    selector_labels,
};
use crate::desired::redis::{claim_retention, data_claim};

pub const COMPONENT: &str = "scylla";
pub const CQL_PORT: i32 = 9042;
pub const USERNAME_ENV: &str = "KUBECHAT_SCYLLA_USERNAME";
pub const PASSWORD_ENV: &str = "KUBECHAT_SCYLLA_PASSWORD";
/// The uid of the `scylla` user of the ScyllaDB image (2025.1 on, built on
/// ubi9-minimal with `USER scylla:scylla`). The image names its user instead
/// of numbering it, which the kubelet cannot check against `runAsNonRoot`, so
/// the uid is pinned: the package's `useradd -r` takes the first free system
/// uid of that base, 999. Older images (Ubuntu-based, running as root) cannot
/// run under the `restricted` profile at all.
pub const SCYLLA_UID: i64 = 999;

pub fn objects(cc: &ChatCluster) -> Vec<DesiredObject> {
    match cc.spec.scylla.effective_managed() {
        Some(managed) => {
            vec![
                DesiredObject::Service(service(cc)),
                DesiredObject::StatefulSet(stateful_set(cc, &managed)),
                DesiredObject::PodDisruptionBudget(disruption_budget(cc)),
            ]
        }
        None => Vec::new(),
    }
}

/// Node drains take one store node at a time: with three nodes and
/// replication factor 3, a quorum (two) stays up and chat goes on. (With
/// one node, a budget of one still lets a drain evict it: a laptop's
/// `kubectl drain` must not hang.)
pub fn disruption_budget(cc: &ChatCluster) -> PodDisruptionBudget {
    super::one_at_a_time_budget(cc, Names(&cc.name_any()).scylla(), COMPONENT)
}

pub fn contact_points(cc: &ChatCluster) -> Vec<String> {
    match &cc.spec.scylla.external {
        Some(external) => external.contact_points.clone(),
        None => {
            vec![format!("{}.{}.svc:{CQL_PORT}", Names(&cc.name_any()).scylla(), cc.namespace().unwrap_or_default())]
        }
    }
}

/// The keyspace's replication factor: as set, else `min(nodes, 3)` (3 for external clusters).
pub fn replication_factor(cc: &ChatCluster) -> i32 {
    cc.spec.scylla.replication_factor.unwrap_or_else(|| match cc.spec.scylla.effective_managed() {
        Some(managed) => managed.nodes.clamp(1, 3),
        None => 3,
    })
}

/// Headless: each node needs a stable name to gossip, and the driver
/// discovers the ring itself.
pub fn service(cc: &ChatCluster) -> Service {
    let port = |name: &str, number: i32| ServicePort { name: Some(name.into()), port: number, ..Default::default() };
    Service {
        metadata: owned_meta(cc, Names(&cc.name_any()).scylla(), COMPONENT),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(cc, COMPONENT)),
            ports: Some(vec![port("cql", CQL_PORT), port("intra-node", 7000)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `--smp` from the CPU limit (whole cores, at least 1) and `--memory` from
/// the memory limit less room for the OS and Scylla's own overhead.
pub fn scylla_args(cc: &ChatCluster, managed: &ManagedScylla, resources: &ResourceRequirements) -> Vec<String> {
    let names = Names(&cc.name_any());
    let seed = format!("{}-0.{}.{}.svc", names.scylla(), names.scylla(), cc.namespace().unwrap_or_default());
    let limits = resources.limits.clone().unwrap_or_default();
    let smp = limits.get("cpu").and_then(|q| cpu_cores(&q.0)).unwrap_or(1).max(1);
    let memory_mib = limits.get("memory").and_then(|q| memory_mib(&q.0)).unwrap_or(1024);
    let scylla_mib = (memory_mib * 3 / 4).max(512);
    let mut args = vec![
        format!("--seeds={seed}"),
        format!("--smp={smp}"),
        format!("--memory={scylla_mib}M"),
        format!("--developer-mode={}", u8::from(managed.developer_mode)),
    ];
    if managed.developer_mode {
        args.push("--overprovisioned=1".into());
    }
    args
}

/// Whole cores in a CPU quantity ("2", "1500m" → 1).
fn cpu_cores(q: &str) -> Option<u32> {
    match q.strip_suffix('m') {
        Some(milli) => milli.parse::<u32>().ok().map(|m| m / 1000),
        None => q.parse::<f64>().ok().map(|c| c.floor() as u32),
    }
}

/// MiB in a memory quantity ("2Gi", "512Mi", "1G", plain bytes).
fn memory_mib(q: &str) -> Option<u64> {
    const UNITS: [(&str, u64); 6] =
        [("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("Ti", 1 << 40), ("M", 1_000_000), ("G", 1_000_000_000)];
    for (suffix, factor) in UNITS {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().ok().map(|n| n * factor / (1 << 20));
        }
    }
    q.parse::<u64>().ok().map(|bytes| bytes / (1 << 20))
}

pub fn stateful_set(cc: &ChatCluster, managed: &ManagedScylla) -> StatefulSet {
    let names = Names(&cc.name_any());
    let resources = managed.resources.clone().unwrap_or_else(|| {
        let mut r = resources_or(None, "1", "2Gi", "2Gi");
        if let Some(limits) = r.limits.as_mut() {
            limits.insert("cpu".into(), Quantity("1".into()));
        }
        r
    });
    let container = Container {
        name: "scylla".into(),
        image: Some(managed.image.clone()),
        args: Some(scylla_args(cc, managed, &resources)),
        ports: Some(vec![
            ContainerPort { name: Some("cql".into()), container_port: CQL_PORT, ..Default::default() },
            ContainerPort { name: Some("intra-node".into()), container_port: 7000, ..Default::default() },
        ]),
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction { port: IntOrString::Int(CQL_PORT), ..Default::default() }),
            period_seconds: Some(10),
            ..Default::default()
        }),
        resources: Some(resources),
        // The entrypoint writes its settings under /etc/scylla.d and
        // /etc/scylla at start, so the root filesystem stays writable.
        security_context: Some(SecurityContext { read_only_root_filesystem: None, ..restricted_container_security() }),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".into(),
            mount_path: "/var/lib/scylla".into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    StatefulSet {
        metadata: owned_meta(cc, names.scylla(), COMPONENT),
        spec: StatefulSetSpec {
            replicas: Some(managed.nodes),
            service_name: Some(names.scylla()),
            // Nodes join one at a time (the default OrderedReady), as Scylla requires.
            selector: LabelSelector { match_labels: Some(selector_labels(cc, COMPONENT)), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(super::labels(cc, COMPONENT)), ..Default::default() }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    security_context: Some(restricted_pod_security(SCYLLA_UID)),
                    automount_service_account_token: Some(false),
                    topology_spread_constraints: Some(super::zone_spread(cc, COMPONENT)),
                    ..Default::default()
                }),
            },
            volume_claim_templates: Some(vec![data_claim(&managed.storage)]),
            persistent_volume_claim_retention_policy: Some(claim_retention(&managed.storage)),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::fixtures::ChatClusterExt;
    use std::collections::BTreeMap;

    #[test]
    fn drains_take_one_store_node_at_a_time() {
        let cc = ChatCluster::test();
        let kinds: Vec<&str> = objects(&cc).iter().map(DesiredObject::kind).collect();
        assert_eq!(kinds, ["Service", "StatefulSet", "PodDisruptionBudget"]);
        let pdb = disruption_budget(&cc);
        assert_eq!(pdb.metadata.name.as_deref(), Some("chat-scylla"));
        let spec = pdb.spec.expect("spec");
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)), "a quorum of three stays up");
        let selector = spec.selector.and_then(|s| s.match_labels).expect("selector");
        assert_eq!(selector, selector_labels(&cc, COMPONENT), "it selects the store's pods, and only them");
    }

    #[test]
    fn smp_and_memory_follow_the_limits() {
        let cc = ChatCluster::test();
        let managed = ManagedScylla { developer_mode: false, ..Default::default() };
        let resources = ResourceRequirements {
            limits: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("4".into())),
                ("memory".to_string(), Quantity("8Gi".into())),
            ])),
            ..Default::default()
        };
        let args = scylla_args(&cc, &managed, &resources);
        assert!(args.contains(&"--smp=4".to_string()), "{args:?}");
        assert!(args.contains(&"--memory=6144M".to_string()), "{args:?}");
        assert!(args.contains(&"--developer-mode=0".to_string()), "{args:?}");
        assert!(args.contains(&"--seeds=chat-scylla-0.chat-scylla.team-a.svc".to_string()), "{args:?}");
    }

    #[test]
    fn quantities_parse() {
        assert_eq!(cpu_cores("1500m"), Some(1));
        assert_eq!(cpu_cores("250m"), Some(0));
        assert_eq!(cpu_cores("2"), Some(2));
        assert_eq!(memory_mib("512Mi"), Some(512));
        assert_eq!(memory_mib("1G"), Some(953));
        assert_eq!(memory_mib("junk"), None);
    }

    #[test]
    fn nodes_scale_the_statefulset_and_the_replication_factor() {
        let cc = ChatCluster::test().with_spec(|s| {
            if let Some(m) = s.scylla.managed.as_mut() {
                m.nodes = 5;
            }
        });
        let sts = stateful_set(&cc, cc.spec.scylla.managed.as_ref().expect("managed"));
        assert_eq!(sts.spec.replicas, Some(5));
        assert_eq!(replication_factor(&cc), 3);
        assert_eq!(replication_factor(&ChatCluster::test()), 1);
    }
}
