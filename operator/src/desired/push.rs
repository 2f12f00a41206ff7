//! The push workers: the gateway image in `push-worker` mode, reading the
//! same config. They serve no traffic, so a Deployment suffices.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{Container, ContainerPort, HTTPGetAction, PodSpec, PodTemplateSpec, Probe};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kubechat_crds::ChatCluster;

use super::gateway::{KUBECHAT_UID, common_env, common_volumes};
use super::{Names, owned_meta, resources_or, restricted_container_security, restricted_pod_security, selector_labels};

pub const COMPONENT: &str = "push-worker";

pub fn deployment(cc: &ChatCluster) -> Deployment {
    let spec = &cc.spec;
    let (volumes, volume_mounts) = common_volumes(cc);
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
            selector: LabelSelector { match_labels: Some(selector_labels(cc, COMPONENT)), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(super::labels(cc, COMPONENT)), ..Default::default() }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    security_context: Some(restricted_pod_security(KUBECHAT_UID)),
                    automount_service_account_token: Some(false),
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
}
