//! Orphans (issue 15, item 11), on the local control plane with an
//! in-process operator:
//!
//! - switching Redis from managed to external deletes the Redis
//!   StatefulSet, Service, NetworkPolicy and password Secret, with a
//!   `Pruned` Event each, and touches nothing else (not even another
//!   ChatCluster's Redis in the same namespace);
//! - the managed backends' StatefulSets carry `storage.pvcRetention`
//!   (default Retain), and with `whenDeleted: Delete` Kubernetes (the
//!   StatefulSet controller and the garbage collector of the running
//!   kube-controller-manager) deletes the claims with the ChatCluster, while
//!   the default keeps them.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use kubechat_crds::{ChatCluster, ChatClusterSpec, RetentionPolicy};
use kubechat_e2e::cluster::{
    RunningOperator, create_namespace, delete_namespace, external_scylla, install_crd, wait_for,
};
use kubechat_e2e::components::connect_kube;
use serde_json::json;

/// Managed Redis, external ScyllaDB (fewer objects to wait for).
fn managed_redis(name: &str) -> ChatCluster {
    let spec = ChatClusterSpec { scylla: external_scylla(), ..ChatClusterSpec::default() };
    let mut cc = ChatCluster::new(name, spec);
    cc.spec.gateway.replicas = 1;
    cc
}

async fn exists<K>(client: &Client, namespace: &str, name: &str) -> bool
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), namespace).get_opt(name).await.expect("get").is_some()
}

/// Which of a cluster's Redis objects exist, as "Kind name".
async fn redis_objects(client: &Client, namespace: &str, cluster: &str) -> Vec<String> {
    let (redis, password) = (format!("{cluster}-redis"), format!("{cluster}-redis-password"));
    let mut found = Vec::new();
    if exists::<StatefulSet>(client, namespace, &redis).await {
        found.push(format!("StatefulSet {redis}"));
    }
    if exists::<Service>(client, namespace, &redis).await {
        found.push(format!("Service {redis}"));
    }
    if exists::<NetworkPolicy>(client, namespace, &redis).await {
        found.push(format!("NetworkPolicy {redis}"));
    }
    if exists::<Secret>(client, namespace, &password).await {
        found.push(format!("Secret {password}"));
    }
    found
}

/// (kind of the related object, its name, note) of each `Pruned` Event.
async fn pruned_events(client: &Client, namespace: &str) -> Vec<(String, String, String)> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let list = events.list(&ListParams::default()).await.expect("list Events");
    list.items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Pruned"))
        .map(|e| {
            let related = e.related.unwrap_or_default();
            (related.kind.unwrap_or_default(), related.name.unwrap_or_default(), e.note.unwrap_or_default())
        })
        .collect()
}

#[tokio::test]
async fn switching_redis_to_external_prunes_its_objects_and_nothing_else() {
    let client = connect_kube().await;
    install_crd(&client).await;
    let namespace = create_namespace(&client, "op-prune").await;
    let operator = RunningOperator::start(&client, &namespace, None);
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), &namespace);
    for name in ["a", "b"] {
        clusters.create(&PostParams::default(), &managed_redis(name)).await.expect("create");
    }
    let all = ["StatefulSet", "Service", "NetworkPolicy", "Secret"];
    for name in ["a", "b"] {
        let created = wait_for(Duration::from_secs(30), || {
            let client = &client;
            let namespace = &namespace;
            async move { (redis_objects(client, namespace, name).await.len() == all.len()).then_some(()) }
        })
        .await;
        assert!(created.is_some(), "{name}: {:?}", redis_objects(&client, &namespace, name).await);
    }
    let sts = Api::<StatefulSet>::namespaced(client.clone(), &namespace).get("a-redis").await.expect("a-redis");
    let policy = sts.spec.persistent_volume_claim_retention_policy.expect("a retention policy");
    assert_eq!((policy.when_deleted.as_deref(), policy.when_scaled.as_deref()), (Some("Retain"), Some("Retain")));

    let patch = json!({"spec": {"redis": {"managed": null, "external": {"url": "redis://redis.example:6379"}}}});
    clusters.patch("a", &PatchParams::default(), &Patch::Merge(patch)).await.expect("switch a to external Redis");
    let started = std::time::Instant::now();
    let gone = wait_for(Duration::from_secs(15), || {
        let client = &client;
        let namespace = &namespace;
        async move { redis_objects(client, namespace, "a").await.is_empty().then_some(()) }
    })
    .await;
    let left = redis_objects(&client, &namespace, "a").await;
    assert!(gone.is_some(), "still there 15 s after switching to external: {left:?}");
    println!("a's Redis objects pruned in {} ms", started.elapsed().as_millis());

    // A Pruned Event per object, the StatefulSet's saying its claims are kept.
    let expected = [
        ("StatefulSet", "a-redis"),
        ("Service", "a-redis"),
        ("NetworkPolicy", "a-redis"),
        ("Secret", "a-redis-password"),
    ];
    let events = wait_for(Duration::from_secs(10), || {
        let client = &client;
        let namespace = &namespace;
        async move {
            let events = pruned_events(client, namespace).await;
            expected.iter().all(|(kind, name)| events.iter().any(|(k, n, _)| k == kind && n == name)).then_some(events)
        }
    })
    .await;
    let Some(events) = events else {
        panic!("Pruned Events after 10 s: {:?}", pruned_events(&client, &namespace).await);
    };
    assert_eq!(events.len(), expected.len(), "one Pruned Event per object: {events:?}");
    let sts_note = &events.iter().find(|(k, _, _)| k == "StatefulSet").expect("StatefulSet Event").2;
    assert!(sts_note.contains("kept"), "{sts_note}");

    // Everything else stays: a's other objects, and all of b's.
    assert_eq!(redis_objects(&client, &namespace, "b").await.len(), all.len(), "b's Redis was touched");
    for (present, what) in [
        (exists::<StatefulSet>(&client, &namespace, "a-gateway").await, "StatefulSet a-gateway"),
        (exists::<Deployment>(&client, &namespace, "a-push").await, "Deployment a-push"),
        (exists::<ConfigMap>(&client, &namespace, "a-gateway-config").await, "ConfigMap a-gateway-config"),
        (exists::<ConfigMap>(&client, &namespace, "a-endpoints").await, "ConfigMap a-endpoints"),
        (exists::<Secret>(&client, &namespace, "a-auth").await, "Secret a-auth"),
        (exists::<Service>(&client, &namespace, "a-gateway").await, "Service a-gateway"),
    ] {
        assert!(present, "{what} was deleted");
    }
    // And it stays that way: nothing is deleted or re-created over a few reconciles.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(redis_objects(&client, &namespace, "a").await.is_empty());
    assert_eq!(pruned_events(&client, &namespace).await.len(), expected.len());
    assert_eq!(operator.errors(), 0);
    operator.stop().await;
    delete_namespace(&client, &namespace).await;
}

/// Claims of `cluster`'s Redis (the StatefulSet controller creates them even
/// though no volume is ever provisioned here).
async fn redis_claims(client: &Client, namespace: &str, cluster: &str) -> Vec<PersistentVolumeClaim> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let selector = format!("app.kubernetes.io/instance={cluster},app.kubernetes.io/component=redis");
    claims.list(&ListParams::default().labels(&selector)).await.expect("list claims").items
}

#[tokio::test]
async fn claims_follow_the_retention_policy_when_the_cluster_is_deleted() {
    let client = connect_kube().await;
    install_crd(&client).await;
    let namespace = create_namespace(&client, "op-retain").await;
    let operator = RunningOperator::start(&client, &namespace, None);
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), &namespace);
    let mut deleting = managed_redis("del");
    if let Some(redis) = deleting.spec.redis.managed.as_mut() {
        redis.storage.pvc_retention.when_deleted = RetentionPolicy::Delete;
    }
    clusters.create(&PostParams::default(), &deleting).await.expect("create del");
    clusters.create(&PostParams::default(), &managed_redis("keep")).await.expect("create keep");

    for (name, when_deleted) in [("del", "Delete"), ("keep", "Retain")] {
        let claimed = wait_for(Duration::from_secs(30), || {
            let client = &client;
            let namespace = &namespace;
            async move { (!redis_claims(client, namespace, name).await.is_empty()).then_some(()) }
        })
        .await;
        assert!(claimed.is_some(), "{name}: the StatefulSet controller created no claim within 30 s");
        let sts = Api::<StatefulSet>::namespaced(client.clone(), &namespace)
            .get(&format!("{name}-redis"))
            .await
            .expect("redis StatefulSet");
        let policy = sts.spec.persistent_volume_claim_retention_policy.expect("policy");
        assert_eq!(policy.when_deleted.as_deref(), Some(when_deleted), "{name}");
    }

    for name in ["del", "keep"] {
        clusters.delete(name, &DeleteParams::background()).await.expect("delete ChatCluster");
    }
    // The garbage collector deletes the StatefulSets, and with them (by the
    // owner reference the StatefulSet controller put on them) del's claims.
    let deleted = wait_for(Duration::from_secs(60), || {
        let client = &client;
        let namespace = &namespace;
        async move { redis_claims(client, namespace, "del").await.is_empty().then_some(()) }
    })
    .await;
    assert!(deleted.is_some(), "whenDeleted: Delete, but del's claims are still there 60 s after the ChatCluster");
    let sts_gone = wait_for(Duration::from_secs(30), || {
        let client = &client;
        let namespace = &namespace;
        async move { (!exists::<StatefulSet>(client, namespace, "keep-redis").await).then_some(()) }
    })
    .await;
    assert!(sts_gone.is_some(), "keep's StatefulSet was not garbage-collected");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kept = redis_claims(&client, &namespace, "keep").await;
    assert_eq!(kept.len(), 1, "whenDeleted: Retain keeps the claim");
    assert!(kept[0].metadata.deletion_timestamp.is_none(), "the retained claim is being deleted");
    operator.stop().await;
    delete_namespace(&client, &namespace).await;
}
