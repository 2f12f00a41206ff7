//! The managed Redis: one pod with an append-only file on a persistent
//! volume. Nothing is built for an external Redis.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Probe, SecretKeySelector, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kubechat_crds::{ChatCluster, ManagedRedis, SecretKeyRef, StorageSpec};

use super::secrets::GeneratedSecret;
use super::{
    DesiredObject, Names, owned_meta, resources_or, restricted_container_security, restricted_pod_security,
    selector_labels,
};

pub const COMPONENT: &str = "redis";
pub const PORT: i32 = 6379;
/// Environment variable that carries the Redis password to gateways and push workers.
pub const PASSWORD_ENV: &str = "KUBECHAT_REDIS_PASSWORD";
/// Key of the generated password Secret of a managed Redis.
pub const PASSWORD_KEY: &str = "password";
/// The managed Redis container's password variable: `redis-cli` (the
/// probes) reads this one by itself, and the start script writes it into
/// Redis's config.
pub const SERVER_PASSWORD_ENV: &str = "REDISCLI_AUTH";
/// Starts Redis with `requirepass` from [`SERVER_PASSWORD_ENV`]. The password
/// goes through a config file on the pod's private /tmp (`$TMPDIR` when set),
/// never into the command line, where `ps` and `/proc` would show it; `exec`
/// keeps redis-server as PID 1, so it gets SIGTERM and shuts down cleanly.
pub const START_SCRIPT: &str = r#"umask 077 && conf="${TMPDIR:-/tmp}/requirepass.conf" && printf 'requirepass "%s"\n' "$REDISCLI_AUTH" > "$conf" && exec redis-server "$conf" "$@""#;
/// The uid the official Redis image runs as.
const REDIS_UID: i64 = 999;

pub fn objects(cc: &ChatCluster) -> Vec<DesiredObject> {
    match cc.spec.redis.effective_managed() {
        Some(managed) => {
            vec![DesiredObject::Service(service(cc)), DesiredObject::StatefulSet(stateful_set(cc, &managed))]
        }
        None => Vec::new(),
    }
}

/// The address gateways use.
pub fn url(cc: &ChatCluster) -> String {
    match &cc.spec.redis.external {
        Some(external) => external.url.clone(),
        None => format!("redis://{}.{}.svc:{PORT}", Names(&cc.name_any()).redis(), cc.namespace().unwrap_or_default()),
    }
}

/// The password Secret an external Redis's spec names (a user's Secret).
pub fn password_secret(cc: &ChatCluster) -> Option<&SecretKeyRef> {
    cc.spec.redis.external.as_ref().and_then(|e| e.password_secret.as_ref())
}

/// The managed Redis's password, generated once by the operator.
pub fn generated_password(cc: &ChatCluster) -> Option<GeneratedSecret> {
    cc.spec.redis.effective_managed().map(|_| GeneratedSecret {
        name: Names(&cc.name_any()).redis_password(),
        key: PASSWORD_KEY,
        component: COMPONENT,
        purpose: "Redis password",
    })
}

/// Where gateways and push workers read the Redis password: the generated
/// one for a managed Redis, the named one (if any) for an external Redis.
pub fn password_ref(cc: &ChatCluster) -> Option<SecretKeyRef> {
    match generated_password(cc) {
        Some(generated) => Some(generated.key_ref()),
        None => password_secret(cc).cloned(),
    }
}

pub fn service(cc: &ChatCluster) -> Service {
    Service {
        metadata: owned_meta(cc, Names(&cc.name_any()).redis(), COMPONENT),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(cc, COMPONENT)),
            ports: Some(vec![ServicePort {
                name: Some("redis".into()),
                port: PORT,
                target_port: Some(IntOrString::String("redis".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What Kubernetes does with the claims of `storage` when their StatefulSet
/// is deleted or scaled down (as the spec says; `Retain` unless set).
pub fn claim_retention(storage: &StorageSpec) -> StatefulSetPersistentVolumeClaimRetentionPolicy {
    StatefulSetPersistentVolumeClaimRetentionPolicy {
        when_deleted: Some(storage.pvc_retention.when_deleted.as_str().into()),
        when_scaled: Some(storage.pvc_retention.when_scaled.as_str().into()),
    }
}

/// A volume claim template of `storage`, mounted as `data`.
pub fn data_claim(storage: &StorageSpec) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta { name: Some("data".into()), ..Default::default() },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), storage.size.clone())])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn stateful_set(cc: &ChatCluster, managed: &ManagedRedis) -> StatefulSet {
    let names = Names(&cc.name_any());
    let selector = selector_labels(cc, COMPONENT);
    let ping = Probe {
        exec: Some(ExecAction { command: Some(vec!["redis-cli".into(), "ping".into()]) }),
        period_seconds: Some(5),
        ..Default::default()
    };
    let container = Container {
        name: "redis".into(),
        image: Some(managed.image.clone()),
        command: Some(["sh", "-c", START_SCRIPT, "redis-server"].map(String::from).to_vec()),
        // Every write is in the append-only file, synced each second: a
        // restart loses at most a second of routing/presence/queue state,
        // never chat history (that lives in ScyllaDB).
        args: Some(
            ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--dir", "/data"]
                .map(String::from)
                .to_vec(),
        ),
        env: Some(vec![EnvVar {
            name: SERVER_PASSWORD_ENV.into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: names.redis_password(),
                    key: PASSWORD_KEY.into(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ports: Some(vec![ContainerPort { name: Some("redis".into()), container_port: PORT, ..Default::default() }]),
        readiness_probe: Some(ping.clone()),
        liveness_probe: Some(Probe { period_seconds: Some(10), failure_threshold: Some(3), ..ping }),
        resources: Some(resources_or(managed.resources.as_ref(), "100m", "256Mi", "1Gi")),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(vec![
            VolumeMount { name: "data".into(), mount_path: "/data".into(), ..Default::default() },
            VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..Default::default() },
        ]),
        ..Default::default()
    };
    StatefulSet {
        metadata: owned_meta(cc, names.redis(), COMPONENT),
        spec: StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(names.redis()),
            selector: LabelSelector { match_labels: Some(selector), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(super::labels(cc, COMPONENT)), ..Default::default() }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    security_context: Some(restricted_pod_security(REDIS_UID)),
                    automount_service_account_token: Some(false),
                    topology_spread_constraints: Some(super::zone_spread(cc, COMPONENT)),
                    volumes: Some(vec![Volume {
                        name: "tmp".into(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Default::default()
                    }]),
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

    #[test]
    fn managed_redis_has_persistent_storage() {
        let cc = ChatCluster::test().with_spec(|s| {
            if let Some(m) = s.redis.managed.as_mut() {
                m.storage.size = k8s_openapi::apimachinery::pkg::api::resource::Quantity("5Gi".into());
                m.storage.storage_class_name = Some("fast".into());
            }
        });
        let sts = stateful_set(&cc, cc.spec.redis.managed.as_ref().expect("managed"));
        let claim = &sts.spec.volume_claim_templates.expect("claims")[0];
        let spec = claim.spec.as_ref().expect("claim spec");
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(spec.resources.as_ref().and_then(|r| r.requests.as_ref()).expect("requests")["storage"].0, "5Gi");
        assert_eq!(sts.spec.replicas, Some(1));
    }

    #[test]
    fn claims_are_retained_unless_the_spec_says_delete() {
        let policy = |cc: &ChatCluster| {
            let sts = stateful_set(cc, cc.spec.redis.managed.as_ref().expect("managed"));
            let p = sts.spec.persistent_volume_claim_retention_policy.expect("policy");
            (p.when_deleted.unwrap_or_default(), p.when_scaled.unwrap_or_default())
        };
        assert_eq!(policy(&ChatCluster::test()), ("Retain".into(), "Retain".into()));
        let deleting = ChatCluster::test().with_spec(|s| {
            if let Some(m) = s.redis.managed.as_mut() {
                m.storage.pvc_retention.when_deleted = kubechat_crds::RetentionPolicy::Delete;
            }
        });
        assert_eq!(policy(&deleting), ("Delete".into(), "Retain".into()));
    }

    #[test]
    fn managed_redis_requires_the_generated_password_without_showing_it() {
        let cc = ChatCluster::test();
        let sts = stateful_set(&cc, cc.spec.redis.managed.as_ref().expect("managed"));
        let container = &sts.spec.template.spec.expect("pod").containers[0];
        let from = container.env.iter().flatten().find(|e| e.name == SERVER_PASSWORD_ENV).expect("password variable");
        let secret = from.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).expect("from a Secret");
        assert_eq!((secret.name.as_str(), secret.key.as_str()), ("chat-redis-password", PASSWORD_KEY));
        assert_eq!(generated_password(&cc).map(|g| g.key_ref()), password_ref(&cc), "clients read that Secret");
        let command = container.command.clone().unwrap_or_default().join(" ");
        assert!(command.contains("requirepass") && command.contains("exec redis-server"), "{command}");
        let args = container.args.clone().unwrap_or_default();
        assert!(!args.iter().any(|a| a.contains("requirepass")), "no password on the command line: {args:?}");
    }

    #[test]
    fn external_redis_url_is_used_verbatim() {
        let cc = ChatCluster::test().with_spec(|s| {
            s.redis.managed = None;
            s.redis.external = Some(kubechat_crds::ExternalRedis {
                url: "rediss://cache:6380/2".into(),
                password_secret: None,
                cluster: false,
                seed_urls: Vec::new(),
            });
        });
        assert_eq!(url(&cc), "rediss://cache:6380/2");
        assert!(objects(&cc).is_empty());
        assert_eq!(password_ref(&cc), None, "no password named, none generated");
    }
}
