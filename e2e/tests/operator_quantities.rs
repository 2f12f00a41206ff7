//! Quantities written the user's way (issue 15, item 13), on the local
//! control plane: the apiserver stores `1024Mi` as `1Gi` and `0.5` as
//! `500m`, and an operator that compared them literally patched its
//! StatefulSets on every reconcile. An in-process operator reconciles a
//! ChatCluster written that way; once it has settled, reconciles over an
//! idle period write nothing.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kubechat_crds::{ChatCluster, ChatClusterSpec, ExternalScylla, ManagedRedis, ManagedScylla, ScyllaSpec};
use kubechat_e2e::cluster::{RunningOperator, create_namespace, delete_namespace, install_crd, wait_for};
use kubechat_e2e::components::connect_kube;
use kubechat_operator::desired::gateway::ENDPOINTS_KEY;
use kubechat_operator::discovery::endpoints::Endpoints;
use serde_json::json;

/// How long the idle period lasts. The issue says an idle minute; what it
/// guards is that no reconcile writes, so the period is as long as the
/// reconciles below and one timed requeue (10 s) need.
const IDLE: Duration = Duration::from_secs(20);
/// Reconciles triggered during it, spread evenly (besides the operator's own requeues).
const TRIGGERS: u32 = 6;

fn quantities(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, Quantity> {
    pairs.iter().map(|(k, v)| (k.to_string(), Quantity(v.to_string()))).collect()
}

/// Every quantity in a non-canonical spelling the apiserver rewrites.
fn non_canonical(name: &str) -> ChatCluster {
    let resources = |memory: &str| ResourceRequirements {
        requests: Some(quantities(&[("cpu", "0.5"), ("memory", memory)])),
        limits: Some(quantities(&[("memory", "2.5Gi")])),
        ..Default::default()
    };
    let mut spec = ChatClusterSpec::default();
    spec.gateway.replicas = 1;
    spec.gateway.resources = Some(resources("1024Mi"));
    let mut redis = ManagedRedis { resources: Some(resources("1024Mi")), ..ManagedRedis::default() };
    redis.storage.size = Quantity("1024Mi".into());
    spec.redis.managed = Some(redis);
    let mut scylla = ManagedScylla { resources: Some(resources("2048Mi")), ..ManagedScylla::default() };
    scylla.storage.size = Quantity("1024Mi".into());
    spec.scylla = ScyllaSpec { managed: Some(scylla), external: None::<ExternalScylla>, ..ScyllaSpec::default() };
    ChatCluster::new(name, spec)
}

/// Reconciles that have finished (observed by the duration histogram).
fn finished(operator: &RunningOperator) -> u64 {
    operator.metrics.duration.get_sample_count()
}

#[tokio::test]
async fn non_canonical_quantities_cause_no_writes_when_idle() {
    let client = connect_kube().await;
    install_crd(&client).await;
    let namespace = create_namespace(&client, "op-quantities").await;
    let operator = RunningOperator::start(&client, &namespace, None);
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), &namespace);
    clusters.create(&PostParams::default(), &non_canonical("q")).await.expect("the API accepts 1024Mi and 0.5");

    // The apiserver really rewrites them (else this test would prove nothing).
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    let redis = wait_for(Duration::from_secs(30), || {
        let api = stateful_sets.clone();
        async move { api.get_opt("q-redis").await.ok().flatten() }
    })
    .await
    .expect("the Redis StatefulSet is created");
    let container = &redis.spec.template.spec.as_ref().expect("pod").containers[0];
    let requests = container.resources.as_ref().and_then(|r| r.requests.clone()).expect("requests");
    assert_eq!((requests["cpu"].0.as_str(), requests["memory"].0.as_str()), ("500m", "1Gi"));
    let claim = &redis.spec.volume_claim_templates.clone().expect("claims")[0];
    let storage = claim.spec.as_ref().and_then(|s| s.resources.as_ref()).and_then(|r| r.requests.clone());
    assert_eq!(storage.expect("storage")["storage"].0, "1Gi");

    // The world settles first: the gateway pod is placed and the endpoint
    // list names it (a loaded control plane placed it 10 s after creation,
    // and that one legitimate write landed in the idle period).
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let listed = wait_for(Duration::from_secs(90), || {
        let api = config_maps.clone();
        async move {
            let cm = api.get_opt("q-endpoints").await.ok().flatten()?;
            let endpoints = Endpoints::parse(cm.data?.get(ENDPOINTS_KEY)?)?;
            (endpoints.gateways.len() == 1).then_some(())
        }
    })
    .await;
    assert!(listed.is_some(), "the endpoint list never named the gateway pod");

    // Settled: the status names both unbound volume claims (this control
    // plane has no storage class; under load the volume controller's Event
    // came 10 s after the last write, and the status write that added it
    // landed in the idle period), every reconcile started has finished, and
    // none wrote for 10 s. Only waiting can show quiet: sleeps on purpose.
    let settle_deadline = Instant::now() + Duration::from_secs(90);
    let mut quiet_since = Instant::now();
    let mut writes = operator.metrics.writes.get();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = operator.metrics.writes.get();
        let status = clusters.get("q").await.expect("read the ChatCluster").status.unwrap_or_default();
        let claims_reported = ["data-q-redis-0", "data-q-scylla-0"].iter().all(|claim| {
            status.conditions.iter().any(|c| c.message.contains(&format!("PersistentVolumeClaim {claim} is not bound")))
        });
        if now != writes || finished(&operator) != operator.metrics.reconciles.get() || !claims_reported {
            quiet_since = Instant::now();
            writes = now;
        } else if quiet_since.elapsed() >= Duration::from_secs(10) {
            break;
        }
        assert!(
            Instant::now() < settle_deadline,
            "not settled 90 s after creation (writes, reconciles or the claims not reported); status: {status:#?}"
        );
    }

    // The idle period: reconciles triggered by metadata changes (no spec change).
    let status_before = clusters.get("q").await.expect("read the ChatCluster").status;
    let reconciles = operator.metrics.reconciles.get();
    let status_writes = operator.metrics.status_updates.get();
    let started = Instant::now();
    for i in 0..TRIGGERS {
        let patch = json!({"metadata": {"annotations": {"touched": i.to_string()}}});
        clusters.patch("q", &PatchParams::default(), &Patch::Merge(patch)).await.expect("annotate");
        tokio::time::sleep(IDLE / TRIGGERS).await;
    }
    let done = wait_for(Duration::from_secs(20), || {
        let operator = &operator;
        async move { (finished(operator) == operator.metrics.reconciles.get()).then_some(()) }
    })
    .await;
    assert!(done.is_some(), "reconciles still running 20 s after the idle period");
    let idle_reconciles = operator.metrics.reconciles.get() - reconciles;
    let idle_writes = operator.metrics.writes.get() - writes;
    println!("idle {:?}: {idle_reconciles} reconciles, {idle_writes} writes", started.elapsed());
    assert!(
        idle_reconciles >= u64::from(TRIGGERS),
        "only {idle_reconciles} reconciles: the annotations did not trigger"
    );
    let status_writes = operator.metrics.status_updates.get() - status_writes;
    let status_after = clusters.get("q").await.expect("read the ChatCluster").status;
    assert_eq!(
        idle_writes, 0,
        "{idle_writes} writes ({status_writes} of the status) in {idle_reconciles} idle reconciles; \
         status before: {status_before:#?}, after: {status_after:#?}"
    );
    operator.stop().await;
    delete_namespace(&client, &namespace).await;
}
