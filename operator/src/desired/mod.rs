//! Desired state: pure functions from a `ChatCluster` to the Kubernetes
//! objects that should exist for it. Nothing here talks to the apiserver, so
//! every builder is unit-tested without a cluster.
//!
//! - [`gateway`]: gateway StatefulSet, its Services, config and PDB.
//! - [`redis`] and [`scylla`]: the managed backends (nothing when external).
//! - [`push`]: the push-worker Deployment.
//! - [`auth`]: the token-signing key (generated when the spec names none).
//! - [`admin_token`]: the token the operator presents to the gateways' admin API.
//! - [`secrets`]: Secrets the operator generates once (signing key, Redis
//!   password, admin token).
//! - [`network`]: NetworkPolicies: only the cluster's own pods reach its
//!   backends, only the operator reaches the gateways' admin port.

pub mod admin_token;
pub mod auth;
pub mod config;
pub mod gateway;
pub mod network;
pub mod push;
pub mod redis;
pub mod scylla;
pub mod secrets;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ObjectReference, PodSecurityContext, ResourceRequirements, SeccompProfile,
    SecurityContext, Service,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use kubechat_crds::ChatCluster;

/// Label keys shared by every object the operator creates.
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";
/// Pod-template annotation that changes whenever the mounted config changes,
/// so a config change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "kubechat.dev/config-hash";

/// On the ChatCluster: `"true"` stops rollouts before their next pod: the
/// gateways' (the rollout driver) and the push workers' (their Deployment
/// is paused).
pub const PAUSED_ANNOTATION: &str = "kubechat.dev/paused";

/// The ChatCluster carries [`PAUSED_ANNOTATION`] `"true"`.
pub fn paused(cc: &ChatCluster) -> bool {
    cc.annotations().get(PAUSED_ANNOTATION).is_some_and(|v| v == "true")
}

/// One object the operator keeps in place.
#[derive(Clone, Debug, PartialEq)]
pub enum DesiredObject {
    StatefulSet(StatefulSet),
    Deployment(Deployment),
    Service(Service),
    ConfigMap(ConfigMap),
    PodDisruptionBudget(PodDisruptionBudget),
    NetworkPolicy(NetworkPolicy),
}

impl DesiredObject {
    pub fn kind(&self) -> &'static str {
        match self {
            DesiredObject::StatefulSet(_) => "StatefulSet",
            DesiredObject::Deployment(_) => "Deployment",
            DesiredObject::Service(_) => "Service",
            DesiredObject::ConfigMap(_) => "ConfigMap",
            DesiredObject::PodDisruptionBudget(_) => "PodDisruptionBudget",
            DesiredObject::NetworkPolicy(_) => "NetworkPolicy",
        }
    }

    /// A reference to the object, for Events about it.
    pub fn object_ref(&self) -> ObjectReference {
        match self {
            DesiredObject::StatefulSet(o) => o.object_ref(&()),
            DesiredObject::Deployment(o) => o.object_ref(&()),
            DesiredObject::Service(o) => o.object_ref(&()),
            DesiredObject::ConfigMap(o) => o.object_ref(&()),
            DesiredObject::PodDisruptionBudget(o) => o.object_ref(&()),
            DesiredObject::NetworkPolicy(o) => o.object_ref(&()),
        }
    }

    /// The note of the Event saying it was `verb` ("Created"): a created
    /// StatefulSet's also says whether its claims outlive it.
    pub fn applied_note(&self, verb: &str) -> String {
        let note = format!("{verb} {} {}", self.kind(), self.name());
        match self {
            DesiredObject::StatefulSet(sts) if verb == "Created" => match claims_note(sts) {
                Some(claims) => format!("{note}; {claims}"),
                None => note,
            },
            _ => note,
        }
    }

    pub fn name(&self) -> String {
        match self {
            DesiredObject::StatefulSet(o) => o.name_any(),
            DesiredObject::Deployment(o) => o.name_any(),
            DesiredObject::Service(o) => o.name_any(),
            DesiredObject::ConfigMap(o) => o.name_any(),
            DesiredObject::PodDisruptionBudget(o) => o.name_any(),
            DesiredObject::NetworkPolicy(o) => o.name_any(),
        }
    }
}

/// Every object a ChatCluster should have, in apply order (config before the
/// workloads that mount it, a backend's NetworkPolicy before the backend).
/// Generated Secrets are separate: they are created once and never
/// re-applied (see [`secrets`]). `gateways`: the gateway StatefulSet's
/// replicas, as `crate::scale` decided; `operator`: the operator's own pods,
/// the only ones the gateways' admin port admits.
pub fn desired_objects(cc: &ChatCluster, gateways: i32, operator: &network::OperatorPods) -> Vec<DesiredObject> {
    let mut objects = network::objects(cc, operator);
    objects.extend(redis::objects(cc));
    objects.extend(scylla::objects(cc));
    objects.extend(gateway::objects(cc, gateways));
    objects.push(DesiredObject::Deployment(push::deployment(cc)));
    objects
}

/// Every Secret the operator generates for `cc`: the token-signing key when
/// the spec names none, the managed Redis's password when Redis is managed,
/// and always the gateways' admin token. Created once and never re-applied
/// (see [`secrets`]).
pub fn generated_secrets(cc: &ChatCluster) -> Vec<secrets::GeneratedSecret> {
    [auth::generated(cc), redis::generated_password(cc), Some(admin_token::generated(cc))]
        .into_iter()
        .flatten()
        .collect()
}

/// Names of the objects of one ChatCluster, in one place.
pub struct Names<'a>(pub &'a str);

impl Names<'_> {
    pub fn gateway(&self) -> String {
        format!("{}-gateway", self.0)
    }
    pub fn gateway_headless(&self) -> String {
        format!("{}-gateway-pods", self.0)
    }
    pub fn gateway_config(&self) -> String {
        format!("{}-gateway-config", self.0)
    }
    pub fn endpoints(&self) -> String {
        format!("{}-endpoints", self.0)
    }
    pub fn redis(&self) -> String {
        format!("{}-redis", self.0)
    }
    pub fn scylla(&self) -> String {
        format!("{}-scylla", self.0)
    }
    pub fn push(&self) -> String {
        format!("{}-push", self.0)
    }
    pub fn auth_secret(&self) -> String {
        format!("{}-auth", self.0)
    }
    pub fn redis_password(&self) -> String {
        format!("{}-redis-password", self.0)
    }
    pub fn admin_token(&self) -> String {
        format!("{}-admin-token", self.0)
    }
    pub fn gateway_policy(&self) -> String {
        format!("{}-gateway", self.0)
    }
}

/// Labels that select one component's pods (stable: a selector is immutable).
pub fn selector_labels(cc: &ChatCluster, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), "kubechat".to_string()),
        (LABEL_INSTANCE.to_string(), cc.name_any()),
        (LABEL_COMPONENT.to_string(), component.to_string()),
    ])
}

/// All labels of one component's objects.
pub fn labels(cc: &ChatCluster, component: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(cc, component);
    labels.insert(LABEL_MANAGED_BY.to_string(), crate::FIELD_MANAGER.to_string());
    labels.insert(LABEL_PART_OF.to_string(), "kubechat".to_string());
    labels
}

/// Metadata of an owned object: name, namespace, labels and the controller
/// owner reference that lets the garbage collector delete it with the
/// ChatCluster.
pub fn owned_meta(cc: &ChatCluster, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: cc.namespace(),
        labels: Some(labels(cc, component)),
        owner_references: cc.controller_owner_ref(&()).map(|r| vec![r]),
        ..Default::default()
    }
}

/// Spreads a component's pods over zones (`spec.topologySpread`). Nodes
/// without the zone label count as no zone: with `DoNotSchedule` no pod
/// of the component lands there.
pub fn zone_spread(cc: &ChatCluster, component: &str) -> Vec<k8s_openapi::api::core::v1::TopologySpreadConstraint> {
    let spread = &cc.spec.topology_spread;
    vec![k8s_openapi::api::core::v1::TopologySpreadConstraint {
        max_skew: spread.max_skew,
        topology_key: spread.zone_key.clone(),
        when_unsatisfiable: spread.when_unsatisfiable.as_str().into(),
        label_selector: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: Some(selector_labels(cc, component)),
            ..Default::default()
        }),
        ..Default::default()
    }]
}

/// A budget that lets voluntary disruptions (node drains, evictions) take
/// one of a component's pods at a time.
pub fn one_at_a_time_budget(cc: &ChatCluster, name: String, component: &str) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: owned_meta(cc, name, component),
        spec: Some(k8s_openapi::api::policy::v1::PodDisruptionBudgetSpec {
            max_unavailable: Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)),
            selector: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                match_labels: Some(selector_labels(cc, component)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Hardened container settings: non-root, read-only root filesystem, no
/// privilege escalation, no capabilities.
pub fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
        ..Default::default()
    }
}

/// Pod security settings for a non-root image running as `uid`.
pub fn restricted_pod_security(uid: i64) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        fs_group: Some(uid),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
        ..Default::default()
    }
}

/// The user's resources, or the given requests and memory limit.
pub fn resources_or(
    given: Option<&ResourceRequirements>,
    cpu_request: &str,
    memory_request: &str,
    memory_limit: &str,
) -> ResourceRequirements {
    given.cloned().unwrap_or_else(|| ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu_request.into())),
            ("memory".to_string(), Quantity(memory_request.into())),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), Quantity(memory_limit.into()))])),
        ..Default::default()
    })
}

/// What Kubernetes does with a StatefulSet's PersistentVolumeClaims once the
/// StatefulSet is deleted (with its ChatCluster, or pruned), for Events;
/// `None` when it has no claims.
pub fn claims_note(sts: &StatefulSet) -> Option<String> {
    if sts.spec.volume_claim_templates.as_ref().is_none_or(Vec::is_empty) {
        return None;
    }
    let labels = sts.metadata.labels.clone().unwrap_or_default();
    let component = labels.get(LABEL_COMPONENT).map_or("<component>", String::as_str);
    let instance = labels.get(LABEL_INSTANCE).map_or("<name>", String::as_str);
    let field = format!("spec.{component}.managed.storage.pvcRetention.whenDeleted");
    let policy = sts.spec.persistent_volume_claim_retention_policy.as_ref().and_then(|p| p.when_deleted.as_deref());
    Some(match policy {
        Some("Delete") => format!("its PersistentVolumeClaims (the data) are deleted with it ({field}: Delete)"),
        // Unset means Retain to Kubernetes too.
        _ => format!(
            "its PersistentVolumeClaims (the data) are kept when it is deleted, with the ChatCluster or not, unless \
             {field} is Delete; delete them by hand once the data is no longer needed: kubectl delete pvc -l \
             {LABEL_INSTANCE}={instance},{LABEL_COMPONENT}={component}"
        ),
    })
}

/// Hex SHA-256 of `data`: stable across operator versions, unlike std's hasher.
pub fn content_hash(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Chained builders for test ChatClusters.

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kubechat_crds::{ChatCluster, ChatClusterSpec};

    pub trait ChatClusterExt {
        fn test() -> Self;
        fn with_gateway_replicas(self, n: i32) -> Self;
        fn with_spec(self, f: impl FnOnce(&mut ChatClusterSpec)) -> Self;
    }

    impl ChatClusterExt for ChatCluster {
        fn test() -> Self {
            let mut cc = ChatCluster::new("chat", ChatClusterSpec::default());
            cc.metadata = ObjectMeta {
                name: Some("chat".into()),
                namespace: Some("team-a".into()),
                uid: Some("00000000-0000-0000-0000-000000000001".into()),
                generation: Some(1),
                ..Default::default()
            };
            cc
        }
        fn with_gateway_replicas(mut self, n: i32) -> Self {
            self.spec.gateway.replicas = n;
            self
        }
        fn with_spec(mut self, f: impl FnOnce(&mut ChatClusterSpec)) -> Self {
            f(&mut self.spec);
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::ChatClusterExt;
    use super::network::OperatorPods;
    use super::*;
    use k8s_openapi::api::core::v1::TopologySpreadConstraint;
    use kubechat_crds::{ExternalRedis, ExternalScylla};

    #[test]
    fn minimal_cluster_gets_every_component() {
        let kinds: Vec<(String, &str)> = desired_objects(&ChatCluster::test(), 2, &OperatorPods::default())
            .iter()
            .map(|o| (o.name(), o.kind()))
            .collect();
        for expected in [
            ("chat-redis", "StatefulSet"),
            ("chat-redis", "Service"),
            ("chat-scylla", "StatefulSet"),
            ("chat-scylla", "Service"),
            ("chat-scylla", "PodDisruptionBudget"),
            ("chat-gateway-config", "ConfigMap"),
            ("chat-endpoints", "ConfigMap"),
            ("chat-gateway", "StatefulSet"),
            ("chat-gateway", "Service"),
            ("chat-gateway-pods", "Service"),
            ("chat-gateway", "PodDisruptionBudget"),
            ("chat-push", "Deployment"),
            ("chat-redis", "NetworkPolicy"),
            ("chat-scylla", "NetworkPolicy"),
            ("chat-gateway", "NetworkPolicy"),
        ] {
            assert!(kinds.contains(&(expected.0.to_string(), expected.1)), "missing {expected:?} in {kinds:?}");
        }
        assert_eq!(kinds.len(), 15, "{kinds:?}");
    }

    /// Every component's pods spread over zones, each over its own pods, by
    /// default as a preference; the spec's key, skew and rule when given.
    #[test]
    fn every_component_spreads_its_pods_over_zones() {
        let spread_of = |cc: &ChatCluster| -> Vec<(String, TopologySpreadConstraint)> {
            desired_objects(cc, 2, &OperatorPods::default())
                .into_iter()
                .filter_map(|o| {
                    let (name, pod) = match o {
                        DesiredObject::StatefulSet(s) => (s.name_any(), s.spec.template.spec?),
                        DesiredObject::Deployment(d) => (d.name_any(), d.spec.template.spec?),
                        _ => return None,
                    };
                    let constraints = pod.topology_spread_constraints.unwrap_or_default();
                    assert_eq!(constraints.len(), 1, "{name}: {constraints:?}");
                    Some((name, constraints.into_iter().next()?))
                })
                .collect()
        };
        let defaults = spread_of(&ChatCluster::test());
        let spreading: Vec<(&str, &str)> = defaults
            .iter()
            .map(|(name, c)| {
                let labels = c.label_selector.as_ref().and_then(|s| s.match_labels.as_ref());
                (name.as_str(), labels.and_then(|l| l.get(LABEL_COMPONENT)).map_or("", String::as_str))
            })
            .collect();
        let expected = [("chat-redis", "redis"), ("chat-scylla", "scylla"), ("chat-gateway", "gateway")];
        assert_eq!(spreading, [&expected[..], &[("chat-push", "push-worker")]].concat(), "each over its own pods");
        for (name, c) in &defaults {
            assert_eq!(
                (c.topology_key.as_str(), c.max_skew, c.when_unsatisfiable.as_str()),
                ("topology.kubernetes.io/zone", 1, "ScheduleAnyway"),
                "{name}"
            );
        }
        let strict = ChatCluster::test().with_spec(|s| {
            s.topology_spread.zone_key = "example.com/rack".into();
            s.topology_spread.max_skew = 2;
            s.topology_spread.when_unsatisfiable = kubechat_crds::WhenUnsatisfiable::DoNotSchedule;
        });
        for (name, c) in spread_of(&strict) {
            assert_eq!(
                (c.topology_key.as_str(), c.max_skew, c.when_unsatisfiable.as_str()),
                ("example.com/rack", 2, "DoNotSchedule"),
                "{name}"
            );
        }
    }

    #[test]
    fn external_backends_get_no_objects() {
        let cc = ChatCluster::test().with_spec(|s| {
            s.redis.managed = None;
            s.redis.external = Some(ExternalRedis {
                url: "redis://redis.example:6379".into(),
                password_secret: None,
                cluster: false,
                seed_urls: Vec::new(),
            });
            s.scylla.managed = None;
            s.scylla.external = Some(ExternalScylla {
                contact_points: vec!["scylla.example:9042".into()],
                credentials_secret: None,
                local_datacenter: None,
            });
        });
        let names: Vec<String> = desired_objects(&cc, cc.spec.gateway.replicas, &OperatorPods::default())
            .iter()
            .map(DesiredObject::name)
            .collect();
        assert!(!names.iter().any(|n| n.contains("redis") || n.contains("scylla")), "{names:?}");
    }

    /// `scylla: {keyspace: chat}` and `redis: {}` name neither a managed nor
    /// an external backend: both run managed, with the defaults an explicit
    /// `managed: {}` gets from the schema.
    #[test]
    fn backends_with_neither_managed_nor_external_run_managed() {
        let parse = |spec: serde_json::Value| -> ChatCluster {
            let mut cc = ChatCluster::test();
            cc.spec = serde_json::from_value(spec).expect("spec");
            cc
        };
        let implicit = parse(serde_json::json!({"redis": {}, "scylla": {"keyspace": "chat"}}));
        assert_eq!(implicit.spec.scylla.managed, None);
        let explicit =
            parse(serde_json::json!({"redis": {"managed": {}}, "scylla": {"managed": {}, "keyspace": "chat"}}));
        let objects = desired_objects(&implicit, implicit.spec.gateway.replicas, &OperatorPods::default());
        let names: Vec<(String, &str)> = objects.iter().map(|o| (o.name(), o.kind())).collect();
        for expected in [("chat-scylla", "StatefulSet"), ("chat-scylla", "Service"), ("chat-redis", "StatefulSet")] {
            assert!(names.contains(&(expected.0.to_string(), expected.1)), "missing {expected:?} in {names:?}");
        }
        assert_eq!(objects, desired_objects(&explicit, explicit.spec.gateway.replicas, &OperatorPods::default()));
        assert_eq!(scylla::replication_factor(&implicit), 1);
    }

    #[test]
    fn every_object_is_owned_by_the_cluster_and_labelled() {
        for object in desired_objects(&ChatCluster::test(), 2, &OperatorPods::default()) {
            let meta = match &object {
                DesiredObject::StatefulSet(o) => &o.metadata,
                DesiredObject::Deployment(o) => &o.metadata,
                DesiredObject::Service(o) => &o.metadata,
                DesiredObject::ConfigMap(o) => &o.metadata,
                DesiredObject::PodDisruptionBudget(o) => &o.metadata,
                DesiredObject::NetworkPolicy(o) => &o.metadata,
            };
            let owners = meta.owner_references.as_deref().unwrap_or_default();
            assert_eq!(owners.len(), 1, "{} {}", object.kind(), object.name());
            assert_eq!(owners[0].kind, "ChatCluster");
            assert_eq!(owners[0].controller, Some(true));
            assert_eq!(meta.namespace.as_deref(), Some("team-a"));
            let labels = meta.labels.clone().unwrap_or_default();
            assert_eq!(labels.get(LABEL_INSTANCE).map(String::as_str), Some("chat"));
            assert_eq!(labels.get(LABEL_MANAGED_BY).map(String::as_str), Some(crate::FIELD_MANAGER));
        }
    }

    /// What the PodSecurity `restricted` profile (Kubernetes 1.25+) refuses
    /// in a pod spec: the checks its admission plugin makes, written out so
    /// a builder that drops one fails here and not first in a cluster.
    fn restricted_violations(pod: &k8s_openapi::api::core::v1::PodSpec) -> Vec<String> {
        let mut found = Vec::new();
        let pod_security = pod.security_context.clone().unwrap_or_default();
        if pod.host_network == Some(true) || pod.host_pid == Some(true) || pod.host_ipc == Some(true) {
            found.push("host namespaces".to_string());
        }
        for volume in pod.volumes.iter().flatten() {
            if volume.host_path.is_some() {
                found.push(format!("hostPath volume {}", volume.name));
            }
        }
        if pod_security.run_as_user == Some(0) {
            found.push("pod runAsUser 0".into());
        }
        let pod_seccomp = pod_security.seccomp_profile.as_ref().map(|p| p.type_.as_str());
        for c in pod.containers.iter().chain(pod.init_containers.iter().flatten()) {
            let sc = c.security_context.clone().unwrap_or_default();
            let name = &c.name;
            if sc.privileged == Some(true) {
                found.push(format!("{name}: privileged"));
            }
            if sc.allow_privilege_escalation != Some(false) {
                found.push(format!("{name}: allowPrivilegeEscalation is not false"));
            }
            let caps = sc.capabilities.clone().unwrap_or_default();
            if !caps.drop.unwrap_or_default().iter().any(|d| d == "ALL") {
                found.push(format!("{name}: capabilities do not drop ALL"));
            }
            if caps.add.unwrap_or_default().iter().any(|a| a != "NET_BIND_SERVICE") {
                found.push(format!("{name}: adds capabilities"));
            }
            if sc.run_as_non_root.or(pod_security.run_as_non_root) != Some(true) {
                found.push(format!("{name}: runAsNonRoot is not true"));
            }
            if sc.run_as_user == Some(0) {
                found.push(format!("{name}: runAsUser 0"));
            }
            let seccomp = sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()).or(pod_seccomp);
            if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
                found.push(format!("{name}: no RuntimeDefault seccomp profile"));
            }
            if c.ports.iter().flatten().any(|p| p.host_port.is_some_and(|h| h != 0)) {
                found.push(format!("{name}: hostPort"));
            }
        }
        found
    }

    /// Every pod the operator creates (gateways, Redis, Scylla, push
    /// workers) is admitted in a namespace enforcing `restricted`, and its
    /// volumes are writable by its non-root user (fsGroup).
    #[test]
    fn every_pod_passes_the_restricted_pod_security_profile() {
        let cc = ChatCluster::test();
        let mut pods = Vec::new();
        for object in desired_objects(&cc, cc.spec.gateway.replicas, &OperatorPods::default()) {
            match object {
                DesiredObject::StatefulSet(o) => pods.push((o.metadata.name, o.spec.template.spec)),
                DesiredObject::Deployment(o) => pods.push((o.metadata.name, o.spec.template.spec)),
                _ => {}
            }
        }
        assert_eq!(pods.len(), 4, "gateway, redis, scylla, push: {pods:?}");
        for (name, pod) in pods {
            let pod = pod.expect("pod spec");
            let violations = restricted_violations(&pod);
            assert!(violations.is_empty(), "{name:?} is refused by `restricted`: {violations:?}");
            let fs_group = pod.security_context.as_ref().and_then(|s| s.fs_group);
            assert!(fs_group.is_some_and(|g| g != 0), "{name:?}: volumes need a non-root fsGroup");
        }
    }

    /// The hash lands in the pod template: if a new operator version hashed
    /// the same config differently, upgrading the operator would roll every
    /// gateway. So the values are pinned (the first 8 bytes of SHA-256; the
    /// empty input's is the standard test vector), not compared with themselves.
    #[test]
    fn a_created_backend_says_whether_its_claims_outlive_it() {
        let objects = desired_objects(&ChatCluster::test(), 2, &OperatorPods::default());
        let note = |name: &str| {
            let o = objects.iter().find(|o| o.kind() == "StatefulSet" && o.name() == name).expect(name);
            o.applied_note("Created")
        };
        let redis = note("chat-redis");
        assert!(redis.starts_with("Created StatefulSet chat-redis; its PersistentVolumeClaims"), "{redis}");
        assert!(redis.contains("kept") && redis.contains("spec.redis.managed.storage.pvcRetention.whenDeleted"));
        assert!(note("chat-scylla").contains("spec.scylla.managed.storage.pvcRetention.whenDeleted"));
        assert_eq!(note("chat-gateway"), "Created StatefulSet chat-gateway", "no claims, nothing to say");
        let cc = ChatCluster::test().with_spec(|s| {
            if let Some(m) = s.redis.managed.as_mut() {
                m.storage.pvc_retention.when_deleted = kubechat_crds::RetentionPolicy::Delete;
            }
        });
        let redis = desired_objects(&cc, cc.spec.gateway.replicas, &OperatorPods::default())
            .into_iter()
            .find(|o| o.name() == "chat-redis" && o.kind() == "StatefulSet");
        assert!(redis.expect("redis").applied_note("Created").contains("deleted with it"));
    }

    #[test]
    fn content_hash_is_stable() {
        assert_eq!(content_hash(b""), "e3b0c44298fc1c14");
        assert_eq!(content_hash(b"kubechat"), "3a0507ac332fafe7");
        assert_ne!(content_hash(b"kubechat"), content_hash(b"kubechat2"));
    }
}
