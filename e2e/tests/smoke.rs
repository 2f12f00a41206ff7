//! Smoke tests: each real component the suites depend on is up and usable
//! from Rust. They fail, naming the component, when one is missing.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, Pod, PodSpec, PodTemplateSpec, Service, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kubechat_e2e::components::{connect_cql, connect_kube, connect_redis};
use kubechat_e2e::tools::run_tool;
use kubechat_e2e::unique_name;

const FIELD_MANAGER: &str = "kubechat-e2e";

#[tokio::test]
async fn redis_round_trip() {
    let mut conn = connect_redis().await;
    let key = unique_name("smoke");
    let _: () = redis::cmd("SET").arg(&key).arg("hello").arg("EX").arg(60).query_async(&mut conn).await.expect("SET");
    let value: String = redis::cmd("GET").arg(&key).query_async(&mut conn).await.expect("GET");
    assert_eq!(value, "hello");
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await.expect("DEL");
}

#[tokio::test]
async fn cql_keyspace_table_and_row() {
    let session = connect_cql().await;
    let keyspace = unique_name("smoke").replace('-', "_");
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {keyspace} \
                 WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
            ),
            (),
        )
        .await
        .expect("create keyspace");
    session
        .query_unpaged(format!("CREATE TABLE IF NOT EXISTS {keyspace}.greetings (id int PRIMARY KEY, text text)"), ())
        .await
        .expect("create table");
    session
        .query_unpaged(format!("INSERT INTO {keyspace}.greetings (id, text) VALUES (?, ?)"), (7_i32, "hello cql"))
        .await
        .expect("insert");
    let rows = session
        .query_unpaged(format!("SELECT id, text FROM {keyspace}.greetings WHERE id = ?"), (7_i32,))
        .await
        .expect("select")
        .into_rows_result()
        .expect("rows result");
    let read: Vec<(i32, String)> =
        rows.rows::<(i32, String)>().expect("typed rows").collect::<Result<_, _>>().expect("decode rows");
    assert_eq!(read, vec![(7, "hello cql".to_string())]);
    session.query_unpaged(format!("DROP KEYSPACE {keyspace}"), ()).await.expect("drop keyspace");
}

#[tokio::test]
async fn kube_lists_namespaces_and_server_side_applies() {
    let client = connect_kube().await;
    let namespaces: Vec<String> = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list namespaces")
        .items
        .into_iter()
        .filter_map(|ns| ns.metadata.name)
        .collect();
    assert!(namespaces.iter().any(|n| n == "default"), "namespaces: {namespaces:?}");
    assert!(namespaces.iter().any(|n| n == "kube-system"), "namespaces: {namespaces:?}");

    let api = Api::<ConfigMap>::namespaced(client, "default");
    let name = unique_name("smoke");
    let desired = ConfigMap {
        metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
        data: Some(BTreeMap::from([("greeting".to_string(), "hello apiserver".to_string())])),
        ..Default::default()
    };
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&desired))
        .await
        .expect("server-side apply");
    let read = api.get(&name).await.expect("read back");
    assert_eq!(read.data.unwrap_or_default().get("greeting").map(String::as_str), Some("hello apiserver"));
    let managers: Vec<String> =
        read.metadata.managed_fields.unwrap_or_default().into_iter().filter_map(|f| f.manager).collect();
    assert!(managers.iter().any(|m| m == FIELD_MANAGER), "managers: {managers:?}");
    api.delete(&name, &DeleteParams::default()).await.expect("delete");
}

#[tokio::test]
async fn kubectl_and_helm_talk_to_the_apiserver() {
    // Fail with the component's name before blaming the tools.
    connect_kube().await;

    let kubectl = run_tool("kubectl", &["version", "--output=json"]);
    assert!(kubectl.status.success(), "kubectl version failed: {}", kubectl.stderr);
    let versions: serde_json::Value = serde_json::from_str(&kubectl.stdout).expect("kubectl version JSON");
    let client = versions["clientVersion"]["gitVersion"].as_str().unwrap_or_default();
    let server = versions["serverVersion"]["gitVersion"].as_str().unwrap_or_default();
    assert!(client.starts_with("v1."), "kubectl client version: {}", kubectl.stdout);
    assert!(server.starts_with("v1."), "apiserver version: {}", kubectl.stdout);

    let helm = run_tool("helm", &["version", "--short"]);
    assert!(helm.status.success(), "helm version failed: {}", helm.stderr);
    assert!(helm.stdout.trim().starts_with("v3."), "helm version: {}", helm.stdout);

    // `helm list` reaches the apiserver (version alone does not).
    let list = run_tool("helm", &["list", "--all-namespaces", "--output=json"]);
    assert!(list.status.success(), "helm list failed: {}", list.stderr);
    let releases: serde_json::Value = serde_json::from_str(&list.stdout).expect("helm list JSON");
    assert!(releases.is_array(), "helm list: {}", list.stdout);
}

#[tokio::test]
async fn statefulset_pods_reach_running() {
    let client = connect_kube().await;
    let namespace = unique_name("smoke");
    let namespaces = Api::<Namespace>::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta { name: Some(namespace.clone()), ..Default::default() },
                ..Default::default()
            },
        )
        .await
        .expect("create namespace");

    let labels = BTreeMap::from([("app".to_string(), "smoke".to_string())]);
    let service = Service {
        metadata: ObjectMeta { name: Some("smoke".into()), ..Default::default() },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(labels.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let statefulset = StatefulSet {
        metadata: ObjectMeta { name: Some("smoke".into()), ..Default::default() },
        spec: StatefulSetSpec {
            replicas: Some(2),
            service_name: Some("smoke".into()),
            selector: LabelSelector { match_labels: Some(labels.clone()), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "pause".into(),
                        image: Some("registry.k8s.io/pause:3.10".into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    Api::<Service>::namespaced(client.clone(), &namespace)
        .patch("smoke", &apply, &Patch::Apply(&service))
        .await
        .expect("apply service");
    Api::<StatefulSet>::namespaced(client.clone(), &namespace)
        .patch("smoke", &apply, &Patch::Apply(&statefulset))
        .await
        .expect("apply statefulset");

    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let running = loop {
        let list = pods.list(&ListParams::default().labels("app=smoke")).await.expect("list pods");
        let running: Vec<String> = list
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        if running.len() == 2 || tokio::time::Instant::now() > deadline {
            break running;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut running = running;
    running.sort();
    assert_eq!(
        running,
        vec!["smoke-0".to_string(), "smoke-1".to_string()],
        "StatefulSet pods did not reach Running within 90 s (are kube-controller-manager, kube-scheduler and kwok up?)"
    );
    namespaces.delete(&namespace, &DeleteParams::default()).await.expect("delete namespace");
}
