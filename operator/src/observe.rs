//! Observing what exists: the readiness of owned workloads, whether the
//! Secrets the spec refers to are there, and the gateways' load as the
//! endpoint ConfigMap publishes it.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::{Client, ResourceExt};
use kubechat_crds::ChatCluster;

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
        let secret = api.get_opt(&name).await.map_err(Error::kube(format!("reading Secret {namespace}/{name}")))?;
        match (secret, key) {
            (None, _) => missing.push(format!("Secret {name} not found in namespace {namespace}")),
            (Some(s), Some(key)) => {
                let has_key = s.data.as_ref().is_some_and(|d| d.contains_key(&key))
                    || s.string_data.as_ref().is_some_and(|d| d.contains_key(&key));
                if !has_key {
                    missing.push(format!("Secret {name} has no key {key:?}"));
                }
            }
            (Some(_), None) => {}
        }
    }
    missing.dedup();
    Ok(missing)
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

pub async fn observe(client: &Client, cc: &ChatCluster, namespace: &str) -> Result<Observed> {
    let names = Names(&cc.name_any());
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let sts = |name: String| {
        let api = stateful_sets.clone();
        async move {
            let found = api.get_opt(&name).await.map_err(Error::kube(format!("reading StatefulSet {name}")))?;
            Ok::<_, Error>(found.as_ref().map(from_stateful_set))
        }
    };
    let push_name = names.push();
    let push = deployments.get_opt(&push_name).await.map_err(Error::kube(format!("reading Deployment {push_name}")))?;
    let endpoints_name = names.endpoints();
    let endpoints = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(&endpoints_name)
        .await
        .map_err(Error::kube(format!("reading ConfigMap {endpoints_name}")))?
        .and_then(|cm| cm.data?.get(ENDPOINTS_KEY).and_then(|text| Endpoints::parse(text)));
    Ok(Observed {
        gateway: sts(names.gateway()).await?,
        redis: if cc.spec.redis.managed.is_some() { sts(names.redis()).await? } else { None },
        scylla: if cc.spec.scylla.managed.is_some() { sts(names.scylla()).await? } else { None },
        push_workers: push.as_ref().map(from_deployment),
        missing_secrets: missing_secrets(client, cc, namespace).await?,
        endpoints,
    })
}
