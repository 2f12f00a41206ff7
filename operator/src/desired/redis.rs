//! The managed Redis: one pod with an append-only file on a persistent
//! volume. Nothing is built for an external Redis.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, ExecAction, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PodSpec, PodTemplateSpec, Probe, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kubechat_crds::{ChatCluster, ManagedRedis, SecretKeyRef, StorageSpec};

use super::{
    DesiredObject, Names, owned_meta, resources_or, restricted_container_security, restricted_pod_security,
    selector_labels,
};

pub const COMPONENT: &str = "redis";
pub const PORT: i32 = 6379;
/// Environment variable that carries an external Redis's password.
pub const PASSWORD_ENV: &str = "KUBECHAT_REDIS_PASSWORD";
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

pub fn password_secret(cc: &ChatCluster) -> Option<&SecretKeyRef> {
    cc.spec.redis.external.as_ref().and_then(|e| e.password_secret.as_ref())
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
        // Every write is in the append-only file, synced each second: a
        // restart loses at most a second of routing/presence/queue state,
        // never chat history (that lives in ScyllaDB).
        args: Some(
            ["redis-server", "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--dir", "/data"]
                .map(String::from)
                .to_vec(),
        ),
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
                    volumes: Some(vec![Volume {
                        name: "tmp".into(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            },
            volume_claim_templates: Some(vec![data_claim(&managed.storage)]),
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
    fn external_redis_url_is_used_verbatim() {
        let cc = ChatCluster::test().with_spec(|s| {
            s.redis.managed = None;
            s.redis.external =
                Some(kubechat_crds::ExternalRedis { url: "rediss://cache:6380/2".into(), password_secret: None });
        });
        assert_eq!(url(&cc), "rediss://cache:6380/2");
        assert!(objects(&cc).is_empty());
    }
}
