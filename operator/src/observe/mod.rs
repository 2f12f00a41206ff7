//! Observing what exists: the readiness of owned workloads (from the watch
//! caches), whether the Secrets the spec refers to are there, why pods
//! cannot start ([`stuck`]), and the gateways' load as the endpoint
//! ConfigMap publishes it.

pub mod stuck;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::{Client, ResourceExt};
use kubechat_crds::ChatCluster;

use crate::cache::Owned;
use crate::calls::{Verb, counted};
use crate::desired::gateway::ENDPOINTS_KEY;
use crate::desired::{Names, auth, redis};
use crate::discovery::endpoints::Endpoints;
use crate::{Error, Result};

/// Pods of one workload as its controller reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// Pods the spec asks for.
    pub desired: i32,
    pub ready: i32,
    /// Pods already on the newest template.
    pub updated: i32,
    /// The workload controller has seen the newest spec.
    pub current: bool,
}

/// What the reconcile saw of one ChatCluster's world.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub gateway: Option<Workload>,
    pub redis: Option<Workload>,
    pub scylla: Option<Workload>,
    pub push_workers: Option<Workload>,
    /// Human-readable descriptions of referenced Secrets (or keys) that do not exist.
    pub missing_secrets: Vec<String>,
    /// The published gateway list (`None`: not published yet).
    pub endpoints: Option<Endpoints>,
    /// Desired objects the apiserver refused, with its reason ("StatefulSet chat-redis: …").
    pub refused: Vec<String>,
    /// Why pods that should exist cannot be created or started (see [`stuck`]).
    pub stuck: Vec<String>,
    /// Gateways the cluster is heading for (`crate::scale`'s `keep`;
    /// `None`: the spec's count).
    pub gateways_wanted: Option<i32>,
}

impl Observed {
    /// Some component has fewer ready pods than it asks for.
    pub fn short_of_ready(&self) -> bool {
        [&self.gateway, &self.redis, &self.scylla, &self.push_workers]
            .into_iter()
            .flatten()
            .any(|w| w.ready < w.desired)
    }
}

/// The gateway list the discovery loop last published, from the cache
/// (`None`: not published yet, or unreadable).
pub fn published_endpoints(owned: &Owned, cc: &ChatCluster, namespace: &str) -> Option<Endpoints> {
    let config_map = owned.get::<ConfigMap>(namespace, &Names(&cc.name_any()).endpoints())?;
    Endpoints::parse(config_map.data.as_ref()?.get(ENDPOINTS_KEY)?)
}

/// The gateway StatefulSet's replicas, from the cache (`None`: not created yet).
pub fn gateway_replicas(owned: &Owned, cc: &ChatCluster, namespace: &str) -> Option<i32> {
    owned.get::<StatefulSet>(namespace, &Names(&cc.name_any()).gateway())?.spec.replicas
}

/// Secrets the spec refers to, as (name, key) pairs. The generated auth
/// Secret is not one of them: the operator creates it.
pub fn referenced_secrets(cc: &ChatCluster) -> Vec<(String, Option<String>)> {
    let mut refs = Vec::new();
    if !auth::generates_secret(cc) {
        let r = auth::signing_key_ref(cc);
        refs.push((r.name, Some(r.key)));
    }
    if let Some(r) = redis::password_secret(cc) {
        refs.push((r.name.clone(), Some(r.key.clone())));
    }
    if let Some(name) = cc.spec.scylla.external.as_ref().and_then(|e| e.credentials_secret.clone()) {
        refs.push((name.clone(), Some("username".into())));
        refs.push((name, Some("password".into())));
    }
    let providers = &cc.spec.push_workers.providers;
    for r in [
        providers.webhook.as_ref().map(|w| &w.signing_key_secret),
        providers.fcm.as_ref().map(|f| &f.credentials_secret),
        providers.apns.as_ref().map(|a| &a.signing_key_secret),
    ]
    .into_iter()
    .flatten()
    {
        refs.push((r.name.clone(), Some(r.key.clone())));
    }
    refs
}

pub async fn missing_secrets(client: &Client, cc: &ChatCluster, namespace: &str) -> Result<Vec<String>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut missing = Vec::new();
    for (name, key) in referenced_secrets(cc) {
        let secret = counted(Verb::Get, api.get_opt(&name))
            .await
            .map_err(Error::kube(format!("reading Secret {namespace}/{name}")))?;
        missing.extend(secret_problem(namespace, &name, key.as_deref(), secret.as_ref()));
    }
    missing.dedup();
    Ok(missing)
}

/// What keeps one referenced Secret (as read: `None` when absent) from
/// being used, or `None` when it has the key.
fn secret_problem(namespace: &str, name: &str, key: Option<&str>, secret: Option<&Secret>) -> Option<String> {
    match (secret, key) {
        (None, _) => Some(format!("Secret {name} not found in namespace {namespace}")),
        (Some(s), Some(key)) => {
            let has_key = s.data.as_ref().is_some_and(|d| d.contains_key(key))
                || s.string_data.as_ref().is_some_and(|d| d.contains_key(key));
            (!has_key).then(|| format!("Secret {name} has no key {key:?}"))
        }
        (Some(_), None) => None,
    }
}

fn from_stateful_set(sts: &StatefulSet) -> Workload {
    let status = sts.status.clone().unwrap_or_default();
    Workload {
        desired: sts.spec.replicas.unwrap_or(1),
        ready: status.ready_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
        current: status.observed_generation >= sts.metadata.generation,
    }
}

fn from_deployment(deployment: &Deployment) -> Workload {
    let status = deployment.status.clone().unwrap_or_default();
    Workload {
        desired: deployment.spec.replicas.unwrap_or(1),
        ready: status.ready_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
        current: status.observed_generation >= deployment.metadata.generation,
    }
}

pub async fn observe(client: &Client, owned: &Owned, cc: &ChatCluster, namespace: &str) -> Result<Observed> {
    let names = Names(&cc.name_any());
    let sts = |name: String| owned.get::<StatefulSet>(namespace, &name);
    let gateway = sts(names.gateway());
    let redis = cc.spec.redis.effective_managed().and(sts(names.redis()));
    let scylla = cc.spec.scylla.effective_managed().and(sts(names.scylla()));
    let push = owned.get::<Deployment>(namespace, &names.push());
    let endpoints = published_endpoints(owned, cc, namespace);

    let mut stuck = Vec::new();
    for set in [&gateway, &redis, &scylla].into_iter().flatten() {
        stuck.extend(stuck::stateful_set(client, set).await?);
    }
    if let Some(deployment) = &push {
        stuck.extend(stuck::deployment(client, deployment).await?);
    }
    Ok(Observed {
        gateway: gateway.as_deref().map(from_stateful_set),
        redis: redis.as_deref().map(from_stateful_set),
        scylla: scylla.as_deref().map(from_stateful_set),
        push_workers: push.as_deref().map(from_deployment),
        missing_secrets: missing_secrets(client, cc, namespace).await?,
        endpoints,
        refused: Vec::new(),
        stuck,
        gateways_wanted: None,
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus, StatefulSetSpec, StatefulSetStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kubechat_crds::{ApnsProvider, ExternalRedis, ExternalScylla, FcmProvider, SecretKeyRef, WebhookProvider};

    use super::*;
    use crate::desired::fixtures::ChatClusterExt;

    fn key(name: &str, key: &str) -> SecretKeyRef {
        SecretKeyRef { name: name.into(), key: key.into() }
    }

    #[test]
    fn a_component_short_of_ready_pods_is_unsettled() {
        let workload = |desired, ready| Some(Workload { desired, ready, updated: ready, current: true });
        let settled = Observed { gateway: workload(3, 3), push_workers: workload(1, 1), ..Observed::default() };
        assert!(!settled.short_of_ready());
        let waiting = Observed { scylla: workload(3, 2), ..settled.clone() };
        assert!(waiting.short_of_ready(), "a store node not ready yet");
        assert!(!Observed::default().short_of_ready(), "nothing created yet is not a shortfall");
    }

    #[test]
    fn the_generated_auth_secret_is_not_a_reference() {
        assert_eq!(referenced_secrets(&ChatCluster::test()), vec![]);
    }

    #[test]
    fn every_secret_the_spec_names_is_referenced_with_its_key() {
        let cc = ChatCluster::test().with_spec(|s| {
            s.auth.signing_key_secret = Some(key("jwt", "hs256"));
            s.redis.managed = None;
            s.redis.external = Some(ExternalRedis {
                url: "redis://r:6379".into(),
                password_secret: Some(key("redis-pw", "pw")),
                cluster: false,
                seed_urls: Vec::new(),
            });
            s.scylla.managed = None;
            s.scylla.external = Some(ExternalScylla {
                contact_points: vec!["s:9042".into()],
                credentials_secret: Some("cql".into()),
                local_datacenter: None,
            });
            s.push_workers.providers.webhook = Some(WebhookProvider {
                url: "https://hooks.example".into(),
                signing_key_secret: key("hook", "hmac"),
                include_text: false,
            });
            s.push_workers.providers.fcm =
                Some(FcmProvider { project_id: "p".into(), credentials_secret: key("fcm", "sa.json") });
            s.push_workers.providers.apns = Some(ApnsProvider {
                team_id: "T".into(),
                key_id: "K".into(),
                topic: "com.example".into(),
                signing_key_secret: key("apns", "key.p8"),
                sandbox: false,
            });
        });
        let named = |n: &str, k: &str| (n.to_string(), Some(k.to_string()));
        assert_eq!(
            referenced_secrets(&cc),
            vec![
                named("jwt", "hs256"),
                named("redis-pw", "pw"),
                named("cql", "username"),
                named("cql", "password"),
                named("hook", "hmac"),
                named("fcm", "sa.json"),
                named("apns", "key.p8"),
            ]
        );
    }

    #[test]
    fn a_secret_is_usable_only_with_its_key() {
        let secret = |data: &[&str], string_data: &[&str]| Secret {
            data: Some(data.iter().map(|k| (k.to_string(), ByteString(b"x".to_vec()))).collect()),
            string_data: Some(string_data.iter().map(|k| (k.to_string(), "x".to_string())).collect()),
            ..Default::default()
        };
        assert_eq!(
            secret_problem("ns", "jwt", Some("hs256"), None).as_deref(),
            Some("Secret jwt not found in namespace ns")
        );
        assert_eq!(
            secret_problem("ns", "jwt", Some("hs256"), Some(&secret(&["other"], &[]))).as_deref(),
            Some("Secret jwt has no key \"hs256\"")
        );
        assert_eq!(secret_problem("ns", "jwt", Some("hs256"), Some(&secret(&["hs256"], &[]))), None);
        assert_eq!(secret_problem("ns", "jwt", Some("hs256"), Some(&secret(&[], &["hs256"]))), None);
        assert!(secret_problem("ns", "jwt", Some("hs256"), Some(&Secret::default())).is_some(), "no data at all");
        assert_eq!(secret_problem("ns", "jwt", None, Some(&Secret::default())), None, "any key will do");
    }

    fn meta(generation: Option<i64>) -> ObjectMeta {
        ObjectMeta { generation, ..Default::default() }
    }

    #[test]
    fn a_stateful_set_is_current_once_its_controller_saw_the_newest_spec() {
        let sts = |replicas, generation, status: Option<StatefulSetStatus>| StatefulSet {
            metadata: meta(generation),
            spec: StatefulSetSpec { replicas, ..Default::default() },
            status,
        };
        let status = |observed, ready, updated| StatefulSetStatus {
            observed_generation: observed,
            ready_replicas: ready,
            updated_replicas: updated,
            ..Default::default()
        };
        assert_eq!(
            from_stateful_set(&sts(Some(3), Some(4), Some(status(Some(4), Some(2), Some(1))))),
            Workload { desired: 3, ready: 2, updated: 1, current: true }
        );
        assert!(!from_stateful_set(&sts(Some(3), Some(5), Some(status(Some(4), Some(3), Some(3))))).current);
        // Not looked at yet: no status at all.
        assert_eq!(
            from_stateful_set(&sts(Some(3), Some(1), None)),
            Workload { desired: 3, ready: 0, updated: 0, current: false }
        );
        assert_eq!(from_stateful_set(&sts(None, Some(1), None)).desired, 1, "replicas default to 1");
    }

    #[test]
    fn a_deployment_is_read_like_a_stateful_set() {
        let deployment = |generation, observed, ready: Option<i32>| Deployment {
            metadata: meta(generation),
            spec: DeploymentSpec { replicas: Some(2), ..Default::default() },
            status: Some(DeploymentStatus {
                observed_generation: observed,
                ready_replicas: ready,
                updated_replicas: Some(2),
                ..Default::default()
            }),
        };
        assert_eq!(
            from_deployment(&deployment(Some(7), Some(7), Some(1))),
            Workload { desired: 2, ready: 1, updated: 2, current: true }
        );
        assert!(!from_deployment(&deployment(Some(7), Some(6), Some(2))).current);
        assert_eq!(from_deployment(&deployment(Some(7), Some(7), None)).ready, 0);
    }
}
