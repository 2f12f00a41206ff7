//! The operator against the local control plane (real kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok). Each test runs an
//! operator in-process, scoped to a namespace of its own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::{Client, Resource, ResourceExt};
use kubechat_crds::{ChatCluster, SecretKeyRef};
use kubechat_e2e::cluster::{
    RunningOperator, create_namespace, delete_namespace, install_crd, wait_for, with_external_backends,
};
use kubechat_e2e::components::connect_kube;
use kubechat_e2e::tools::run_tool;
use kubechat_operator::leader::LeaderConfig;
use serde_json::json;

fn examples_dir() -> PathBuf {
    kubechat_e2e::repo_root().join("crds/examples")
}

fn example(name: &str) -> ChatCluster {
    let path = examples_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

async fn setup(prefix: &str) -> (Client, String) {
    let client = connect_kube().await;
    install_crd(&client).await;
    let namespace = create_namespace(&client, prefix).await;
    (client, namespace)
}

async fn create(client: &Client, namespace: &str, cc: &ChatCluster) -> ChatCluster {
    Api::<ChatCluster>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), cc)
        .await
        .unwrap_or_else(|e| panic!("create ChatCluster {}: {e}", cc.name_any()))
}

/// How many objects [`missing_objects`] looks for with managed backends.
const OWNED_OBJECTS: usize = 15;

/// Owned objects of a cluster that are missing or not owned by it (empty: all there).
async fn missing_objects(
    client: &Client,
    namespace: &str,
    name: &str,
    uid: &str,
    managed_backends: bool,
) -> Vec<String> {
    async fn check<K>(client: &Client, namespace: &str, name: String, uid: &str, missing: &mut Vec<String>)
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let object = Api::<K>::namespaced(client.clone(), namespace).get_opt(&name).await.ok().flatten();
        let owned = object.as_ref().is_some_and(|o| {
            o.meta()
                .owner_references
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|r| r.uid == uid && r.kind == "ChatCluster" && r.controller == Some(true))
        });
        if !owned {
            missing.push(format!("{} {name}", K::kind(&())));
        }
    }
    let mut missing = Vec::new();
    let n = |suffix: &str| format!("{name}-{suffix}");
    check::<StatefulSet>(client, namespace, n("gateway"), uid, &mut missing).await;
    check::<Service>(client, namespace, n("gateway"), uid, &mut missing).await;
    check::<Service>(client, namespace, n("gateway-pods"), uid, &mut missing).await;
    check::<ConfigMap>(client, namespace, n("gateway-config"), uid, &mut missing).await;
    check::<ConfigMap>(client, namespace, n("endpoints"), uid, &mut missing).await;
    check::<PodDisruptionBudget>(client, namespace, n("gateway"), uid, &mut missing).await;
    check::<Deployment>(client, namespace, n("push"), uid, &mut missing).await;
    check::<Secret>(client, namespace, n("auth"), uid, &mut missing).await;
    check::<Secret>(client, namespace, n("admin-token"), uid, &mut missing).await;
    check::<NetworkPolicy>(client, namespace, n("gateway"), uid, &mut missing).await;
    if managed_backends {
        check::<StatefulSet>(client, namespace, n("redis"), uid, &mut missing).await;
        check::<Service>(client, namespace, n("redis"), uid, &mut missing).await;
        check::<StatefulSet>(client, namespace, n("scylla"), uid, &mut missing).await;
        check::<Service>(client, namespace, n("scylla"), uid, &mut missing).await;
        check::<PodDisruptionBudget>(client, namespace, n("scylla"), uid, &mut missing).await;
    }
    missing
}

fn condition(cc: &ChatCluster, type_: &str) -> Option<(String, String, String)> {
    cc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn wait_for_cluster(
    client: &Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&ChatCluster) -> bool,
) -> ChatCluster {
    let api: Api<ChatCluster> = Api::namespaced(client.clone(), namespace);
    let found = wait_for(timeout, || {
        let api = api.clone();
        let check = &check;
        async move { api.get(name).await.ok().filter(|cc| check(cc)) }
    })
    .await;
    match found {
        Some(cc) => cc,
        None => {
            let last = api.get(name).await.ok().and_then(|cc| cc.status);
            panic!("ChatCluster {namespace}/{name}: not {what} within {timeout:?}; last status: {last:#?}")
        }
    }
}

#[tokio::test]
async fn minimal_cluster_gets_every_object_owned_and_a_status() {
    let (client, namespace) = setup("op-minimal").await;
    let operator = RunningOperator::start(&client, &namespace, None);

    let started = Instant::now();
    let cc = create(&client, &namespace, &example("minimal.yaml")).await;
    let uid = cc.uid().expect("uid");
    // Alone, the objects are there in under a second; beside another suite
    // on two cores, some creates took 4 s each.
    let all_there = wait_for(Duration::from_secs(30), || {
        let (client, namespace, uid) = (&client, &namespace, &uid);
        async move { missing_objects(client, namespace, "chat", uid, true).await.is_empty().then_some(()) }
    })
    .await;
    let elapsed = started.elapsed();
    let missing = missing_objects(&client, &namespace, "chat", &uid, true).await;
    assert!(all_there.is_some(), "objects still missing after 30 s: {missing:?}");
    println!("time to objects for a minimal ChatCluster: {} ms", elapsed.as_millis());

    let cc = wait_for_cluster(&client, &namespace, "chat", Duration::from_secs(10), "given a status", |cc| {
        cc.status.as_ref().is_some_and(|s| s.observed_generation == Some(1) && s.conditions.len() == 3)
    })
    .await;
    for type_ in ["Ready", "Progressing", "Degraded"] {
        assert!(condition(&cc, type_).is_some(), "condition {type_} missing");
    }
    let status = cc.status.expect("status");
    assert_eq!(status.endpoint_config_map, "chat-endpoints");
    assert_eq!(status.gateway.desired, 2);
    assert_eq!(operator.errors(), 0, "reconcile errors");
    // This control plane provisions no volumes: the managed backends' claims
    // stay unbound, and the status says so instead of "rolling out".
    let cc =
        wait_for_cluster(&client, &namespace, "chat", Duration::from_secs(60), "Degraded by unbound claims", |cc| {
            condition(cc, "Degraded").is_some_and(|(status, reason, message)| {
                status == "True"
                    && reason == "PodsCannotStart"
                    && message.contains("PersistentVolumeClaim data-chat-redis-0")
            })
        })
        .await;
    let (_, _, message) = condition(&cc, "Degraded").expect("Degraded");
    println!("Degraded: {message}");
    let progressing = condition(&cc, "Progressing").expect("Progressing");
    assert_eq!((progressing.0.as_str(), progressing.1.as_str()), ("False", "Blocked"), "{progressing:?}");

    operator.stop().await;
    delete_namespace(&client, &namespace).await;
}

/// Reconciles that have finished (the duration histogram observes each one
/// as it returns, after its last write).
fn finished(operator: &RunningOperator) -> u64 {
    operator.metrics.duration.get_sample_count()
}

/// Every component up to date and ready (Progressing False/Stable).
fn is_settled(cc: &ChatCluster) -> bool {
    condition(cc, "Progressing").is_some_and(|c| c.0 == "False" && c.1 == "Stable")
}

#[tokio::test]
async fn idle_reconcile_makes_no_writes() {
    let (client, namespace) = setup("op-idle").await;
    let operator = RunningOperator::start(&client, &namespace, None);
    create(&client, &namespace, &with_external_backends("idle", 1)).await;
    wait_for_cluster(&client, &namespace, "idle", Duration::from_secs(90), "settled", is_settled).await;
    // Discovery has listed the gateway (unreachable: no process runs for its
    // pod here) and the status shows it: nothing is left to publish.
    wait_for_cluster(&client, &namespace, "idle", Duration::from_secs(30), "showing its gateway pod", |cc| {
        cc.status.as_ref().is_some_and(|s| s.gateway_pods.len() == 1)
    })
    .await;

    // Let in-flight reconciles (pod status updates) finish. Quiet means no
    // write for a while, which only waiting can show: sleeps on purpose.
    let settle_deadline = Instant::now() + Duration::from_secs(60);
    let mut writes = operator.metrics.writes.get();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = operator.metrics.writes.get();
        if now == writes && finished(&operator) == operator.metrics.reconciles.get() {
            break;
        }
        assert!(Instant::now() < settle_deadline, "the operator kept writing for 60 s after Ready");
        writes = now;
    }
    let reconciles = operator.metrics.reconciles.get();
    let requests = &operator.metrics.api_requests_per_reconcile;
    let (requests_before, counted_before) = (requests.get_sample_sum(), requests.get_sample_count());
    // A metadata change triggers a reconcile without changing the spec.
    Api::<ChatCluster>::namespaced(client.clone(), &namespace)
        .patch("idle", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"touched": "yes"}}})))
        .await
        .expect("annotate");
    // Started after the annotation, and finished (with every other started
    // one): its writes, if any, are counted.
    let reconciled = wait_for(Duration::from_secs(20), || {
        let operator = &operator;
        async move {
            let started = operator.metrics.reconciles.get();
            (started > reconciles && finished(operator) == started).then_some(())
        }
    })
    .await;
    assert!(reconciled.is_some(), "annotating the ChatCluster did not trigger a reconcile");
    let idle_reconciles = requests.get_sample_count() - counted_before;
    let idle_requests = requests.get_sample_sum() - requests_before;
    println!("API requests per idle reconcile: {idle_requests} in {idle_reconciles} reconcile(s)");
    assert_eq!(idle_requests, 0.0, "an idle reconcile read or wrote through the API instead of its watch caches");
    assert_eq!(
        operator.metrics.writes.get(),
        writes,
        "an idle reconcile wrote to the apiserver (reconciles {} → {})",
        reconciles,
        operator.metrics.reconciles.get()
    );
    assert_eq!(operator.errors(), 0);
    operator.stop().await;
    delete_namespace(&client, &namespace).await;
}

#[tokio::test]
async fn gateway_statefulset_follows_replicas() {
    let (client, namespace) = setup("op-scale").await;
    let operator = RunningOperator::start(&client, &namespace, None);
    create(&client, &namespace, &with_external_backends("scale", 3)).await;
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), &namespace);
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    for replicas in [3, 5, 2] {
        clusters
            .patch(
                "scale",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"gateway": {"replicas": replicas}}})),
            )
            .await
            .expect("patch replicas");
        let expected = format!("{replicas}/{replicas}");
        let cc = wait_for_cluster(
            &client,
            &namespace,
            "scale",
            Duration::from_secs(90),
            &format!("{expected} gateways"),
            // Pods only (kwok runs no gateway process): settled, not Ready.
            |cc| cc.status.as_ref().is_some_and(|s| s.gateways_ready == expected) && is_settled(cc),
        )
        .await;
        let sts = stateful_sets.get("scale-gateway").await.expect("gateway StatefulSet");
        assert_eq!(sts.spec.replicas, Some(replicas));
        assert_eq!(cc.status.expect("status").gateway.ready, replicas);
    }
    assert_eq!(operator.errors(), 0);
    operator.stop().await;
    delete_namespace(&client, &namespace).await;
}

#[tokio::test]
async fn invalid_examples_are_refused_with_the_rule_message() {
    let (client, namespace) = setup("op-invalid").await;
    let resource = ApiResource::erase::<ChatCluster>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
    let mut expectations = Vec::new();
    let dir = examples_dir().join("invalid");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).expect("invalid examples").map(|e| e.expect("entry").path()).collect();
    files.sort();
    assert!(files.len() >= 8, "expected at least 8 invalid examples, found {}", files.len());
    for path in &files {
        let text = std::fs::read_to_string(path).expect("read example");
        let expected = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no '# expect:' line", path.display()))
            .to_string();
        let object: DynamicObject = serde_yaml::from_str(&text).expect("parse example");
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => panic!("{} was accepted; expected it refused with {expected:?}", path.display()),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{}: {}", path.display(), status.message);
                assert!(
                    status.message.contains(&expected),
                    "{}: message {:?} lacks {expected:?}",
                    path.display(),
                    status.message
                );
            }
            Err(e) => panic!("{}: unexpected error {e}", path.display()),
        }
        expectations.push(expected);
    }

    // The same through kubectl, as a user would apply them.
    let applied = run_tool("kubectl", &["apply", "--namespace", &namespace, "-f", dir.to_str().expect("utf-8 path")]);
    assert!(!applied.status.success(), "kubectl apply of invalid examples succeeded: {}", applied.stdout);
    for expected in &expectations {
        assert!(applied.stderr.contains(expected.as_str()), "kubectl output lacks {expected:?}: {}", applied.stderr);
    }

    // The valid examples are accepted (dry run: nothing is created).
    for name in ["minimal.yaml", "full.yaml"] {
        let text = std::fs::read_to_string(examples_dir().join(name)).expect("read example");
        let object: DynamicObject = serde_yaml::from_str(&text).expect("parse example");
        api.create(&PostParams { dry_run: true, ..Default::default() }, &object)
            .await
            .unwrap_or_else(|e| panic!("{name} was refused: {e}"));
    }
    delete_namespace(&client, &namespace).await;
}

#[tokio::test]
async fn deleting_the_cluster_garbage_collects_its_objects() {
    let (client, namespace) = setup("op-delete").await;
    let operator = RunningOperator::start(&client, &namespace, None);
    let cc = create(&client, &namespace, &example("minimal.yaml")).await;
    let uid = cc.uid().expect("uid");
    let created = wait_for(Duration::from_secs(20), || {
        let (client, namespace, uid) = (&client, &namespace, &uid);
        async move { missing_objects(client, namespace, "chat", uid, true).await.is_empty().then_some(()) }
    })
    .await;
    assert!(created.is_some(), "objects were not created");

    Api::<ChatCluster>::namespaced(client.clone(), &namespace)
        .delete("chat", &DeleteParams::background())
        .await
        .expect("delete ChatCluster");
    let gone = wait_for(Duration::from_secs(60), || {
        let (client, namespace, uid) = (&client, &namespace, &uid);
        async move { (missing_objects(client, namespace, "chat", uid, true).await.len() == OWNED_OBJECTS).then_some(()) }
    })
    .await;
    let left = OWNED_OBJECTS - missing_objects(&client, &namespace, "chat", &uid, true).await.len();
    assert!(gone.is_some(), "{left} owned objects survived their ChatCluster for 60 s (garbage collector running?)");
    operator.stop().await;
    delete_namespace(&client, &namespace).await;
}

#[tokio::test]
async fn missing_secret_is_reported_as_degraded_then_recovers() {
    let (client, namespace) = setup("op-secret").await;
    let operator = RunningOperator::start(&client, &namespace, None);
    let mut cc = with_external_backends("keyed", 1);
    cc.spec.auth.signing_key_secret = Some(SecretKeyRef { name: "team-jwt".into(), key: "hs256".into() });
    create(&client, &namespace, &cc).await;
    let degraded = wait_for_cluster(&client, &namespace, "keyed", Duration::from_secs(20), "Degraded", |cc| {
        condition(cc, "Degraded").is_some_and(|c| c.0 == "True")
    })
    .await;
    let (_, reason, message) = condition(&degraded, "Degraded").expect("Degraded");
    assert_eq!(reason, "SecretNotFound");
    assert!(message.contains("team-jwt"), "{message}");

    let secret = Secret {
        metadata: ObjectMeta { name: Some("team-jwt".into()), ..Default::default() },
        data: Some(BTreeMap::from([("hs256".to_string(), ByteString(b"0123456789abcdef".to_vec()))])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create Secret");
    wait_for_cluster(&client, &namespace, "keyed", Duration::from_secs(40), "recovered", |cc| {
        condition(cc, "Degraded").is_some_and(|c| c.0 == "False")
    })
    .await;
    assert_eq!(operator.errors(), 0);
    operator.stop().await;
    delete_namespace(&client, &namespace).await;
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over() {
    let (client, namespace) = setup("op-leader").await;
    let lease = |identity: &str| LeaderConfig {
        lease_name: "kubechat-operator".into(),
        namespace: namespace.clone(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(3),
        renew_every: Duration::from_millis(500),
    };
    let first = RunningOperator::start(&client, &namespace, Some(lease("first")));
    let leading = wait_for(Duration::from_secs(10), || {
        let metrics = first.metrics.clone();
        async move { (metrics.leader.get() == 1).then_some(()) }
    })
    .await;
    assert!(leading.is_some(), "the first operator never became leader");
    let second = RunningOperator::start(&client, &namespace, Some(lease("second")));

    let cc = create(&client, &namespace, &with_external_backends("one", 1)).await;
    let uid = cc.uid().expect("uid");
    let reconciled = wait_for(Duration::from_secs(10), || {
        let (client, namespace, uid) = (&client, &namespace, &uid);
        async move { missing_objects(client, namespace, "one", uid, false).await.is_empty().then_some(()) }
    })
    .await;
    assert!(reconciled.is_some(), "the leader did not reconcile");
    assert!(first.metrics.reconciles.get() > 0);
    // The standby must NOT lead or reconcile: only watching it for a while
    // shows that, so this samples it over 1.5 s (three of its election
    // rounds, renew_every 500 ms) instead of waiting for a condition.
    let watch_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < watch_until {
        assert_eq!(second.metrics.leader.get(), 0, "the standby took the Lease from a live leader");
        assert_eq!(second.metrics.reconciles.get(), 0, "the standby reconciled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Crash the leader: nothing releases the Lease, so the standby waits for it to expire.
    first.kill();
    let cc = create(&client, &namespace, &with_external_backends("two", 1)).await;
    let uid = cc.uid().expect("uid");
    let taken_over = wait_for(Duration::from_secs(20), || {
        let (client, namespace, uid) = (&client, &namespace, &uid);
        async move { missing_objects(client, namespace, "two", uid, false).await.is_empty().then_some(()) }
    })
    .await;
    assert!(taken_over.is_some(), "the standby did not take over after the leader died");
    assert_eq!(second.metrics.leader.get(), 1);
    assert!(second.metrics.reconciles.get() > 0);
    second.stop().await;
    delete_namespace(&client, &namespace).await;
}
