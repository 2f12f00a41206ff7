//! 100 ChatClusters applied at once all get their objects, without a single
//! reconcile error. A test binary of its own, so its load does not overlap
//! the other operator tests.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};
use kubechat_crds::{ChatCluster, ChatClusterSpec};
use kubechat_e2e::cluster::{RunningOperator, create_namespace, delete_namespace, install_crd, wait_for};
use kubechat_e2e::components::connect_kube;

const CLUSTERS: usize = 100;

#[tokio::test]
async fn a_hundred_clusters_reconcile_without_errors() {
    let client = connect_kube().await;
    install_crd(&client).await;
    let namespace = create_namespace(&client, "op-hundred").await;
    let operator = RunningOperator::start(&client, &namespace, None);

    // Minimal clusters, but one gateway and no push worker each, to keep the
    // fake nodes' pod count (and this machine's load) reasonable.
    let api: Api<ChatCluster> = Api::namespaced(client.clone(), &namespace);
    let started = Instant::now();
    let creates = (0..CLUSTERS).map(|i| {
        let api = api.clone();
        async move {
            let mut spec = ChatClusterSpec::default();
            spec.gateway.replicas = 1;
            spec.push_workers.replicas = 0;
            api.create(&PostParams::default(), &ChatCluster::new(&format!("c{i:03}"), spec)).await
        }
    });
    for result in futures::future::join_all(creates).await {
        result.expect("create ChatCluster");
    }

    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let counts = || async {
        let sts = stateful_sets.list(&ListParams::default()).await.map(|l| l.items.len()).unwrap_or(0);
        let deploy = deployments.list(&ListParams::default()).await.map(|l| l.items.len()).unwrap_or(0);
        let cms = config_maps
            .list(&ListParams::default().labels("app.kubernetes.io/managed-by=kubechat-operator"))
            .await
            .map(|l| l.items.len())
            .unwrap_or(0);
        (sts, deploy, cms)
    };
    // 3 StatefulSets (gateway, redis, scylla), 1 Deployment and 2 ConfigMaps per cluster.
    let expected = (3 * CLUSTERS, CLUSTERS, 2 * CLUSTERS);
    let all = wait_for(Duration::from_secs(120), || async { (counts().await == expected).then_some(()) }).await;
    let elapsed = started.elapsed();
    let last = counts().await;
    assert!(all.is_some(), "after 120 s: (StatefulSets, Deployments, ConfigMaps) = {last:?}, want {expected:?}");
    println!("{CLUSTERS} ChatClusters: all objects present {} ms after the first create", elapsed.as_millis());

    let statused = wait_for(Duration::from_secs(60), || async {
        let list = api.list(&ListParams::default()).await.ok()?;
        list.items.iter().all(|cc| cc.status.as_ref().is_some_and(|s| s.observed_generation == Some(1))).then_some(())
    })
    .await;
    assert!(statused.is_some(), "not every ChatCluster got a status");
    println!(
        "{CLUSTERS} ChatClusters: every status written {} ms after the first create",
        started.elapsed().as_millis()
    );
    assert_eq!(operator.errors(), 0, "reconcile errors with {CLUSTERS} clusters");

    operator.stop().await;
    delete_namespace(&client, &namespace).await;
}
