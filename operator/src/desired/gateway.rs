//! The gateways: a StatefulSet (the ordinal is each gateway's worker id), a
//! client Service, a headless Service for per-pod addresses, the config they
//! mount, the endpoint ConfigMap for discovery and a PodDisruptionBudget.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::Affinity;
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity, PodReadinessGate, PodSpec,
    PodTemplateSpec, Probe, SecretKeySelector, SecretVolumeSource, Service, ServicePort, ServiceSpec, Volume,
    VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kubechat_config as config;
use kubechat_crds::ChatCluster;

use super::{
    CONFIG_HASH_ANNOTATION, DesiredObject, Names, content_hash, owned_meta, resources_or,
    restricted_container_security, restricted_pod_security, selector_labels,
};
use crate::desired::{admin_token, auth, redis, scylla};

pub const COMPONENT: &str = "gateway";
/// Where the gateway reads its config file, and where the token-signing key is mounted.
pub use kubechat_config::{AUTH_DIR, CONFIG_DIR, CONFIG_FILE};

pub use super::config::gateway_config;
/// Key of the endpoint ConfigMap that lists the gateways.
pub const ENDPOINTS_KEY: &str = "endpoints.json";
/// The pod's IP, for the gateway to bind and advertise.
pub const POD_IP_ENV: &str = "KUBECHAT_POD_IP";
/// Readiness gate of every gateway pod: the operator sets it True once the
/// gateway is ready and False before draining it, so a pod leaves the
/// client Service while its connections stay (see `crate::rollout`).
pub const SERVING_CONDITION: &str = "kubechat.dev/serving";
/// Non-root uid of the kubechat image.
pub const KUBECHAT_UID: i64 = 65532;

/// `replicas`: the StatefulSet's, as `crate::scale` decided.
/// On the gateway StatefulSet: of its replicas, how many a rollout added
/// beyond the scale's (`gateway.rollout.maxSurge`; absent: none), so the
/// autoscaler does not count them as gateways the load asked for.
pub const SURGE_ANNOTATION: &str = "kubechat.dev/surge";

/// Records `surge` on the gateway StatefulSet among `objects` (nothing for 0).
pub fn mark_surge(objects: &mut [DesiredObject], cc: &ChatCluster, surge: i32) {
    let name = Names(&cc.name_any()).gateway();
    for object in objects {
        if let DesiredObject::StatefulSet(sts) = object
            && surge > 0
            && sts.name_any() == name
        {
            sts.annotations_mut().insert(SURGE_ANNOTATION.into(), surge.to_string());
        }
    }
}

pub fn objects(cc: &ChatCluster, replicas: i32) -> Vec<DesiredObject> {
    let config = config_map(cc);
    vec![
        DesiredObject::StatefulSet(stateful_set(cc, &config, replicas)),
        DesiredObject::ConfigMap(config),
        DesiredObject::ConfigMap(endpoints_config_map(cc)),
        DesiredObject::Service(client_service(cc)),
        DesiredObject::Service(headless_service(cc)),
        DesiredObject::PodDisruptionBudget(disruption_budget(cc)),
    ]
}

pub fn config_map(cc: &ChatCluster) -> ConfigMap {
    ConfigMap {
        metadata: owned_meta(cc, Names(&cc.name_any()).gateway_config(), COMPONENT),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_string(), gateway_config(cc).to_json_pretty())])),
        ..Default::default()
    }
}

/// The endpoint ConfigMap without its data: the discovery loop writes the
/// list under a field manager of its own, so applying this (labels, owner)
/// never resets it.
pub fn endpoints_config_map(cc: &ChatCluster) -> ConfigMap {
    ConfigMap { metadata: owned_meta(cc, Names(&cc.name_any()).endpoints(), COMPONENT), ..Default::default() }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Environment shared by gateways and push workers: identity and secrets.
pub fn common_env(cc: &ChatCluster) -> Vec<EnvVar> {
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_IP", "status.podIP"),
        EnvVar {
            name: config::CONFIG_PATH_ENV.into(),
            value: Some(format!("{CONFIG_DIR}/{CONFIG_FILE}")),
            ..Default::default()
        },
    ];
    let secret_env = |name: &str, secret: &str, key: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: secret.into(), key: key.into(), optional: Some(false) }),
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Some(secret) = redis::password_ref(cc) {
        env.push(secret_env(redis::PASSWORD_ENV, &secret.name, &secret.key));
    }
    if let Some(secret) = cc.spec.scylla.external.as_ref().and_then(|e| e.credentials_secret.as_ref()) {
        env.push(secret_env(scylla::USERNAME_ENV, secret, "username"));
        env.push(secret_env(scylla::PASSWORD_ENV, secret, "password"));
    }
    env
}

/// Config, auth key and a writable /tmp: the root filesystem is read-only.
pub fn common_volumes(cc: &ChatCluster) -> (Vec<Volume>, Vec<VolumeMount>) {
    let signing = auth::signing_key_ref(cc);
    let volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: Names(&cc.name_any()).gateway_config(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "auth".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(signing.name),
                items: Some(vec![KeyToPath {
                    key: signing.key,
                    path: config::SIGNING_KEY_FILE.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume { name: "tmp".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() },
    ];
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        // `readOnly: false` is omitted by the apiserver: leave it unset so the live object matches.
        read_only: (name != "tmp").then_some(true),
        ..Default::default()
    };
    let mounts = vec![mount("config", CONFIG_DIR), mount("auth", AUTH_DIR), mount("tmp", "/tmp")];
    (volumes, mounts)
}

fn http_probe(path: &str, port: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(port.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// The hash of the config file the gateways and push workers read: their
/// pod templates carry it, so a changed config rolls them out.
pub fn config_hash(cc: &ChatCluster) -> String {
    let config = config_map(cc);
    content_hash(serde_json::to_string(&config.data).unwrap_or_default().as_bytes())
}

pub fn stateful_set(cc: &ChatCluster, config: &ConfigMap, replicas: i32) -> StatefulSet {
    let names = Names(&cc.name_any());
    let gateway = &cc.spec.gateway;
    let selector = selector_labels(cc, COMPONENT);
    let config_hash = content_hash(serde_json::to_string(&config.data).unwrap_or_default().as_bytes());
    let mut env = common_env(cc);
    // The StatefulSet controller labels each pod with its ordinal: a unique,
    // stable worker id for message-id generation.
    env.push(field_env("KUBECHAT_WORKER_ID", "metadata.labels['apps.kubernetes.io/pod-index']"));
    // The gateway binds its ports on this address and advertises it to
    // clients (discovery lists it).
    env.push(field_env(POD_IP_ENV, "status.podIP"));
    let (mut volumes, mut volume_mounts) = common_volumes(cc);
    // The admin token: gateways only (push workers serve no drain).
    let token = admin_token::generated(cc);
    volumes.push(Volume {
        name: "admin-token".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(token.name),
            items: Some(vec![KeyToPath {
                key: token.key.into(),
                path: config::ADMIN_TOKEN_FILE.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    volume_mounts.push(VolumeMount {
        name: "admin-token".into(),
        mount_path: config::ADMIN_TOKEN_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    });
    let container = Container {
        name: "gateway".into(),
        image: Some(gateway.image.clone()),
        args: Some(vec!["gateway".into()]),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("websocket".into()),
                container_port: gateway.ports.websocket,
                ..Default::default()
            },
            ContainerPort { name: Some("admin".into()), container_port: gateway.ports.admin, ..Default::default() },
        ]),
        readiness_probe: Some(http_probe("/readyz", "admin", 5, 2)),
        liveness_probe: Some(http_probe("/healthz", "admin", 10, 3)),
        resources: Some(resources_or(gateway.resources.as_ref(), "250m", "256Mi", "2Gi")),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(volume_mounts),
        ..Default::default()
    };
    StatefulSet {
        metadata: owned_meta(cc, names.gateway(), COMPONENT),
        spec: StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(names.gateway_headless()),
            // Gateways are independent: start and stop them in parallel.
            pod_management_policy: Some("Parallel".into()),
            // The operator replaces pods itself, each drained first (`crate::rollout`).
            update_strategy: Some(StatefulSetUpdateStrategy { type_: Some("OnDelete".into()), rolling_update: None }),
            selector: LabelSelector { match_labels: Some(selector.clone()), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(super::labels(cc, COMPONENT)),
                    annotations: Some(BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_string(), config_hash)])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    security_context: Some(restricted_pod_security(KUBECHAT_UID)),
                    // Room to drain: the drain window plus time to finish in-flight writes.
                    termination_grace_period_seconds: Some(i64::from(gateway.drain.window_seconds) + 30),
                    automount_service_account_token: Some(false),
                    affinity: Some(spread_over_nodes(selector)),
                    topology_spread_constraints: Some(super::zone_spread(cc, COMPONENT)),
                    readiness_gates: Some(vec![PodReadinessGate { condition_type: SERVING_CONDITION.into() }]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Prefer one gateway per node, so a node failure drops fewer connections.
fn spread_over_nodes(selector: BTreeMap<String, String>) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    label_selector: Some(LabelSelector { match_labels: Some(selector), ..Default::default() }),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..Default::default()
                },
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn port(name: &str, number: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: number,
        target_port: Some(IntOrString::String(name.into())),
        ..Default::default()
    }
}

/// What clients connect to (after discovery recommends a pod, they may also
/// connect to that pod directly through the headless Service).
pub fn client_service(cc: &ChatCluster) -> Service {
    Service {
        metadata: owned_meta(cc, Names(&cc.name_any()).gateway(), COMPONENT),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(cc, COMPONENT)),
            ports: Some(vec![port("websocket", cc.spec.gateway.ports.websocket)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Stable per-pod DNS names; lists pods before they are ready so the
/// operator can read a starting or draining gateway's load.
pub fn headless_service(cc: &ChatCluster) -> Service {
    Service {
        metadata: owned_meta(cc, Names(&cc.name_any()).gateway_headless(), COMPONENT),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(cc, COMPONENT)),
            ports: Some(vec![
                port("websocket", cc.spec.gateway.ports.websocket),
                port("admin", cc.spec.gateway.ports.admin),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Voluntary disruptions (node drains) take one gateway at a time.
pub fn disruption_budget(cc: &ChatCluster) -> PodDisruptionBudget {
    super::one_at_a_time_budget(cc, Names(&cc.name_any()).gateway(), COMPONENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::fixtures::ChatClusterExt;

    #[test]
    fn replicas_are_what_the_scale_decided_not_the_spec() {
        let cc = ChatCluster::test().with_gateway_replicas(5);
        assert_eq!(stateful_set(&cc, &config_map(&cc), 7).spec.replicas, Some(7));
    }

    #[test]
    fn config_change_changes_the_pod_template() {
        let a = ChatCluster::test();
        let b = ChatCluster::test().with_spec(|s| s.chat.max_group_members = 200);
        let hash = |cc: &ChatCluster| {
            stateful_set(cc, &config_map(cc), 2).spec.template.metadata.and_then(|m| m.annotations).unwrap_or_default()
                [CONFIG_HASH_ANNOTATION]
                .clone()
        };
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(hash(&a), hash(&ChatCluster::test()));
    }

    #[test]
    fn config_carries_limits_and_backend_addresses() {
        let cc = ChatCluster::test().with_spec(|s| s.chat.max_message_chars = 5000);
        let config = gateway_config(&cc);
        assert_eq!(config.chat.max_message_chars, 5000);
        assert_eq!(config.chat.max_group_members, 100);
        assert_eq!(config.chat.presence_fanout_max_members, 50, "the default");
        assert_eq!(config.redis.url, "redis://chat-redis.team-a.svc:6379");
        assert_eq!(config.scylla.contact_points, ["chat-scylla.team-a.svc:9042"]);
        assert_eq!(config.scylla.replication_factor, 1);
    }

    #[test]
    fn pods_run_hardened_and_mount_the_signing_key() {
        let cc = ChatCluster::test();
        let sts = stateful_set(&cc, &config_map(&cc), 2);
        let pod = sts.spec.template.spec.expect("pod spec");
        let container = &pod.containers[0];
        let security = container.security_context.clone().expect("security context");
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(pod.termination_grace_period_seconds, Some(90));
        let auth_volume = pod.volumes.unwrap_or_default().into_iter().find(|v| v.name == "auth").expect("auth volume");
        assert_eq!(auth_volume.secret.and_then(|s| s.secret_name).as_deref(), Some("chat-auth"));
        let env: Vec<String> = container.env.clone().unwrap_or_default().into_iter().map(|e| e.name).collect();
        assert!(env.contains(&"KUBECHAT_WORKER_ID".to_string()), "{env:?}");
    }

    #[test]
    fn gateways_mount_the_admin_token_their_config_names_and_push_workers_do_not() {
        let cc = ChatCluster::test();
        assert_eq!(gateway_config(&cc).admin.token_file, Some("/var/run/kubechat/admin/token".into()));
        let pod = stateful_set(&cc, &config_map(&cc), 2).spec.template.spec.expect("pod spec");
        let volume = pod.volumes.unwrap_or_default().into_iter().find(|v| v.name == "admin-token").expect("volume");
        let secret = volume.secret.expect("a Secret volume");
        assert_eq!(secret.secret_name.as_deref(), Some("chat-admin-token"));
        let items = secret.items.unwrap_or_default();
        assert_eq!((items[0].key.as_str(), items[0].path.as_str()), ("token", "token"));
        let mount = pod.containers[0].volume_mounts.iter().flatten().find(|m| m.name == "admin-token").cloned();
        let mount = mount.expect("mounted");
        assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/var/run/kubechat/admin", Some(true)));
        let push = crate::desired::push::deployment(&cc).spec.template.spec.expect("push pod");
        assert!(push.volumes.unwrap_or_default().iter().all(|v| v.name != "admin-token"), "push workers drain nothing");
    }

    #[test]
    fn gateways_bind_and_advertise_their_pod_ip() {
        let cc = ChatCluster::test();
        let pod = stateful_set(&cc, &config_map(&cc), 2).spec.template.spec.expect("pod spec");
        let env = pod.containers[0].env.clone().unwrap_or_default();
        let pod_ip = env.iter().find(|e| e.name == POD_IP_ENV).expect("KUBECHAT_POD_IP");
        let field = pod_ip.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).expect("from a field");
        assert_eq!(field.field_path, "status.podIP");
    }

    #[test]
    fn the_endpoint_list_is_not_in_the_applied_config_map() {
        // Applying data here would reset the list the discovery loop publishes.
        let cm = endpoints_config_map(&ChatCluster::test());
        assert_eq!(cm.metadata.name.as_deref(), Some("chat-endpoints"));
        assert!(cm.data.is_none() && cm.binary_data.is_none());
    }

    #[test]
    fn the_operator_replaces_pods_behind_a_readiness_gate() {
        let cc = ChatCluster::test();
        let sts = stateful_set(&cc, &config_map(&cc), 2);
        let strategy = sts.spec.update_strategy.expect("update strategy");
        assert_eq!(strategy.type_.as_deref(), Some("OnDelete"));
        let gates = sts.spec.template.spec.expect("pod spec").readiness_gates.unwrap_or_default();
        assert_eq!(gates.iter().map(|g| g.condition_type.as_str()).collect::<Vec<_>>(), [SERVING_CONDITION]);
        let pdb = disruption_budget(&cc).spec.expect("spec");
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)), "never two gateways down at once");
    }

    #[test]
    fn headless_service_publishes_unready_pods() {
        let svc = headless_service(&ChatCluster::test()).spec.expect("spec");
        assert_eq!(svc.cluster_ip.as_deref(), Some("None"));
        assert_eq!(svc.publish_not_ready_addresses, Some(true));
    }
}
