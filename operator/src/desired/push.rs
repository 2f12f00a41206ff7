//! The push workers: the gateway image in `push-worker` mode, reading the
//! same config. They serve no traffic, so a Deployment suffices.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, HTTPGetAction, KeyToPath, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource,
    SecretProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kubechat_crds::ChatCluster;

use super::gateway::{KUBECHAT_UID, common_env, common_volumes};
use super::{Names, owned_meta, resources_or, restricted_container_security, restricted_pod_security, selector_labels};

pub const COMPONENT: &str = "push-worker";

/// Where the worker reads provider secrets, and the file names it expects
/// (`super::config::push_section` names no file: the worker looks here).
pub use kubechat_config::{APNS_SIGNING_KEY_FILE, FCM_CREDENTIALS_FILE, PUSH_SECRETS_DIR, WEBHOOK_SIGNING_KEY_FILE};

/// One projected volume with the secret of each configured provider under
/// the file name the worker reads; `None` without providers.
fn provider_secrets(cc: &ChatCluster) -> Option<(Volume, VolumeMount)> {
    let providers = &cc.spec.push_workers.providers;
    let sources: Vec<VolumeProjection> = [
        providers.webhook.as_ref().map(|w| (&w.signing_key_secret, WEBHOOK_SIGNING_KEY_FILE)),
        providers.fcm.as_ref().map(|f| (&f.credentials_secret, FCM_CREDENTIALS_FILE)),
        providers.apns.as_ref().map(|a| (&a.signing_key_secret, APNS_SIGNING_KEY_FILE)),
    ]
    .into_iter()
    .flatten()
    .map(|(secret, file)| VolumeProjection {
        secret: Some(SecretProjection {
            name: secret.name.clone(),
            items: Some(vec![KeyToPath { key: secret.key.clone(), path: file.into(), ..Default::default() }]),
            ..Default::default()
        }),
        ..Default::default()
    })
    .collect();
    if sources.is_empty() {
        return None;
    }
    let volume = Volume {
        name: "push-secrets".into(),
        projected: Some(ProjectedVolumeSource { sources: Some(sources), ..Default::default() }),
        ..Default::default()
    };
    let mount = VolumeMount {
        name: "push-secrets".into(),
        mount_path: PUSH_SECRETS_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    };
    Some((volume, mount))
}

pub fn deployment(cc: &ChatCluster) -> Deployment {
    let spec = &cc.spec;
    let (mut volumes, mut volume_mounts) = common_volumes(cc);
    if let Some((volume, mount)) = provider_secrets(cc) {
        volumes.push(volume);
        volume_mounts.push(mount);
    }
    let container = Container {
        name: "push-worker".into(),
        image: Some(spec.gateway.image.clone()),
        args: Some(vec!["push-worker".into()]),
        env: Some(common_env(cc)),
        ports: Some(vec![ContainerPort {
            name: Some("admin".into()),
            container_port: spec.gateway.ports.admin,
            ..Default::default()
        }]),
        liveness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::String("admin".into()),
                ..Default::default()
            }),
            period_seconds: Some(10),
            ..Default::default()
        }),
        resources: Some(resources_or(spec.push_workers.resources.as_ref(), "100m", "128Mi", "512Mi")),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(volume_mounts),
        ..Default::default()
    };
    Deployment {
        metadata: owned_meta(cc, Names(&cc.name_any()).push(), COMPONENT),
        spec: DeploymentSpec {
            replicas: Some(spec.push_workers.replicas),
            // The pause annotation holds their rollout too (a paused
            // Deployment still scales, but rolls out no template change).
            paused: super::paused(cc).then_some(true),
            selector: LabelSelector { match_labels: Some(selector_labels(cc, COMPONENT)), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(super::labels(cc, COMPONENT)),
                    // Workers read the same config file as the gateways: a
                    // change rolls them out too (they never reload it).
                    annotations: Some(BTreeMap::from([(
                        super::CONFIG_HASH_ANNOTATION.to_string(),
                        super::gateway::config_hash(cc),
                    )])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    security_context: Some(restricted_pod_security(KUBECHAT_UID)),
                    automount_service_account_token: Some(false),
                    topology_spread_constraints: Some(super::zone_spread(cc, COMPONENT)),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::fixtures::ChatClusterExt;

    /// The pause annotation holds the workers' rollout as it holds the
    /// gateways' (it held only the gateways').
    #[test]
    fn the_pause_annotation_pauses_the_workers_rollout() {
        let mut cc = ChatCluster::test();
        assert_eq!(deployment(&cc).spec.paused, None);
        cc.metadata.annotations = Some(BTreeMap::from([(super::super::PAUSED_ANNOTATION.to_string(), "true".into())]));
        assert_eq!(deployment(&cc).spec.paused, Some(true));
    }

    #[test]
    fn push_workers_run_the_gateway_image_in_worker_mode() {
        let cc = ChatCluster::test().with_spec(|s| s.push_workers.replicas = 3);
        let deployment = deployment(&cc);
        assert_eq!(deployment.spec.replicas, Some(3));
        let pod = deployment.spec.template.spec.expect("pod");
        let container = &pod.containers[0];
        assert_eq!(container.args.as_deref(), Some(&["push-worker".to_string()][..]));
        assert_eq!(container.image.as_deref(), Some(kubechat_crds::DEFAULT_GATEWAY_IMAGE));
    }

    #[test]
    fn a_config_change_rolls_the_workers_out() {
        let hash_of = |cc: &ChatCluster| {
            let template = deployment(cc).spec.template.metadata.expect("pod metadata");
            template.annotations.unwrap_or_default().get(crate::desired::CONFIG_HASH_ANNOTATION).cloned()
        };
        let before = ChatCluster::test();
        let after = ChatCluster::test().with_spec(|s| s.push_workers.max_attempts += 1);
        let same = ChatCluster::test().with_spec(|s| s.push_workers.replicas += 1);
        assert!(hash_of(&before).is_some(), "the pod template carries the config hash");
        assert_ne!(hash_of(&before), hash_of(&after), "a provider setting changed: new pods");
        assert_eq!(hash_of(&before), hash_of(&same), "scaling is no config change");
        assert_eq!(hash_of(&before), Some(crate::desired::gateway::config_hash(&before)), "the gateways' hash");
    }

    #[test]
    fn provider_secrets_are_mounted_under_the_names_the_worker_reads() {
        use kubechat_crds::{FcmProvider, SecretKeyRef, WebhookProvider};
        let none = deployment(&ChatCluster::test()).spec.template.spec.expect("pod");
        assert!(none.volumes.iter().flatten().all(|v| v.name != "push-secrets"), "no providers, no volume");

        let cc = ChatCluster::test().with_spec(|s| {
            s.push_workers.providers.webhook = Some(WebhookProvider {
                url: "https://hooks.example/push".into(),
                signing_key_secret: SecretKeyRef { name: "hook".into(), key: "hmac".into() },
                include_text: false,
            });
            s.push_workers.providers.fcm = Some(FcmProvider {
                project_id: "p".into(),
                credentials_secret: SecretKeyRef { name: "fcm".into(), key: "sa.json".into() },
            });
        });
        let pod = deployment(&cc).spec.template.spec.expect("pod");
        let volume = pod.volumes.iter().flatten().find(|v| v.name == "push-secrets").expect("push-secrets volume");
        let files: Vec<(String, String, String)> = volume
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten())
            .filter_map(|source| source.secret.as_ref())
            .flat_map(|secret| {
                secret.items.iter().flatten().map(|item| (secret.name.clone(), item.key.clone(), item.path.clone()))
            })
            .collect();
        assert_eq!(
            files,
            vec![
                ("hook".into(), "hmac".into(), WEBHOOK_SIGNING_KEY_FILE.into()),
                ("fcm".into(), "sa.json".into(), FCM_CREDENTIALS_FILE.into()),
            ]
        );
        let mounts = pod.containers[0].volume_mounts.clone().unwrap_or_default();
        assert!(mounts.iter().any(|m| m.name == "push-secrets" && m.mount_path == PUSH_SECRETS_DIR), "{mounts:?}");
    }
}
