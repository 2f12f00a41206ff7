//! What the real kube-apiserver admits as a ChatCluster (issue 15, items 1, 2
//! and 12): values that could never be applied (a size that is not a positive
//! quantity, a StorageClass name that is not a DNS name, a changed volume, an
//! external address with no host, more replicas than nodes) are refused with a
//! message naming the field and saying what is expected; the good spellings of
//! the same fields pass; a backend with neither `managed` nor `external` runs
//! managed.
//!
//! Other suites install the CRD of their own checkout while these run, and a
//! schema change takes a moment to reach the apiserver's handler, so each
//! question is asked again, after re-installing this CRD, while the answer is
//! not the expected one ([`settle`]).

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::{Client, ResourceExt};
use kubechat_crds::ChatCluster;
use kubechat_e2e::cluster::{RunningOperator, create_namespace, delete_namespace, install_crd, wait_for};
use kubechat_e2e::components::connect_kube;
use serde_json::{Value, json};

/// The apiserver's answer: `Ok` when admitted, else the message of its refusal.
type Answer = Result<(), String>;

struct Suite {
    client: Client,
    namespace: String,
    api: Api<DynamicObject>,
}

impl Suite {
    async fn new(prefix: &str) -> Self {
        let client = connect_kube().await;
        install_crd(&client).await;
        let namespace = create_namespace(&client, prefix).await;
        let api = Api::namespaced_with(client.clone(), &namespace, &ApiResource::erase::<ChatCluster>(&()));
        Self { client, namespace, api }
    }

    async fn done(self) {
        delete_namespace(&self.client, &self.namespace).await;
    }

    /// A dry-run create of `spec`: nothing is stored either way.
    async fn create(&self, spec: &Value) -> Answer {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kubechat.dev/v1alpha1",
            "kind": "ChatCluster",
            "metadata": {"name": "admission"},
            "spec": spec,
        }))
        .expect("ChatCluster object");
        answer(self.api.create(&PostParams { dry_run: true, ..Default::default() }, &object).await)
    }

    /// A dry-run merge patch of the stored object `name`.
    async fn update(&self, name: &str, patch: &Value) -> Answer {
        let params = PatchParams { dry_run: true, ..Default::default() };
        answer(self.api.patch(name, &params, &Patch::Merge(patch)).await)
    }

    async fn expect_accepted<F, Fut>(&self, what: &str, ask: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Answer>,
    {
        if let Err(message) = settle(&self.client, Result::is_ok, ask).await {
            panic!("{what} was refused: {message}");
        }
    }

    /// Refused, with a message that contains `field` and `expected`.
    async fn expect_refused<F, Fut>(&self, what: &str, field: &str, expected: &str, ask: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Answer>,
    {
        let wanted = |a: &Answer| a.as_ref().is_err_and(|m| m.contains(field) && m.contains(expected));
        match settle(&self.client, wanted, ask).await {
            Ok(()) => panic!("{what} was accepted; expected a refusal naming {field} with {expected:?}"),
            Err(message) => assert!(
                message.contains(field) && message.contains(expected),
                "{what}: refusal {message:?} lacks {field:?} or {expected:?}"
            ),
        }
    }
}

fn answer<T>(result: Result<T, kube::Error>) -> Answer {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 422 => Err(status.message.clone()),
        Err(e) => panic!("unexpected error from the apiserver: {e}"),
    }
}

/// Asks until the answer is `wanted`, at most 5 times, re-installing this
/// checkout's CRD before each retry; returns the last answer.
async fn settle<F, Fut>(client: &Client, wanted: impl Fn(&Answer) -> bool, mut ask: F) -> Answer
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Answer>,
{
    let mut last = ask().await;
    for _ in 0..4 {
        if wanted(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        install_crd(client).await;
        last = ask().await;
    }
    last
}

fn with_storage(size: Value, class: Option<&str>) -> Value {
    let mut storage = json!({"size": size});
    if let Some(class) = class {
        storage["storageClassName"] = json!(class);
    }
    json!({"redis": {"managed": {"storage": storage}}, "scylla": {"managed": {"storage": storage}}})
}

fn with_external(url: &str, contact_points: &[&str]) -> Value {
    json!({"redis": {"external": {"url": url}}, "scylla": {"external": {"contactPoints": contact_points}}})
}

#[tokio::test]
async fn volume_sizes_and_storage_classes_are_checked() {
    let suite = Suite::new("adm-storage").await;
    for bad in [json!("lots"), json!("-10Gi"), json!("0"), json!("0Gi"), json!("10m"), json!(0), json!(-5)] {
        for component in ["redis", "scylla"] {
            let spec = with_storage(bad.clone(), None);
            suite
                .expect_refused(
                    &format!("{component} size {bad}"),
                    &format!("spec.{component}.managed.storage.size"),
                    "must be a positive size",
                    || suite.create(&spec),
                )
                .await;
        }
    }
    for good in [json!("1024Mi"), json!("1.5Gi"), json!("10Gi"), json!("500M"), json!(1_073_741_824)] {
        let spec = with_storage(good.clone(), Some("fast-ssd"));
        suite.expect_accepted(&format!("size {good}"), || suite.create(&spec)).await;
    }
    for bad in ["Not_A_Valid/Name", "Fast", "ssd-"] {
        let spec = with_storage(json!("1Gi"), Some(bad));
        suite
            .expect_refused(
                &format!("storageClassName {bad}"),
                "spec.scylla.managed.storage.storageClassName",
                "must be a StorageClass name: a DNS-1123 subdomain",
                || suite.create(&spec),
            )
            .await;
    }
    let spec = with_storage(json!("1Gi"), Some("ebs.csi.aws.com"));
    suite.expect_accepted("storageClassName ebs.csi.aws.com", || suite.create(&spec)).await;
    suite.done().await;
}

#[tokio::test]
async fn external_addresses_need_a_host() {
    let suite = Suite::new("adm-external").await;
    for bad in ["redis://", "rediss://", "redis://:6379", "redis://:pw@", "redis://host:port", "redis://two hosts"] {
        let spec = with_external(bad, &["scylla:9042"]);
        suite
            .expect_refused(&format!("url {bad}"), "spec.redis.external.url", "must be redis[s]://", || {
                suite.create(&spec)
            })
            .await;
    }
    // The scheme check keeps its own message.
    let spec = with_external("http://redis:6379", &["scylla:9042"]);
    suite
        .expect_refused("url http://redis:6379", "spec.redis.external.url", "must start with redis://", || {
            suite.create(&spec)
        })
        .await;
    for good in ["redis://:pw@redis.ns.svc:6379/0", "rediss://host", "redis://10.0.0.7:6379", "redis://[fd00::7]:6379"]
    {
        let spec = with_external(good, &["scylla:9042"]);
        suite.expect_accepted(&format!("url {good}"), || suite.create(&spec)).await;
    }

    for bad in ["not a host port!!", "scylla:", "scylla:cql", "[fd00::7"] {
        let spec = with_external("redis://redis:6379", &["scylla-0:9042", bad]);
        suite
            .expect_refused(
                &format!("contact point {bad:?}"),
                "spec.scylla.external.contactPoints",
                &format!(
                    "contact point \"{bad}\" is wrong: each of scylla.external.contactPoints must be host or host:port"
                ),
                || suite.create(&spec),
            )
            .await;
    }
    let good = ["scylla.db.svc:9042", "scylla", "10.0.0.7", "10.0.0.7:9042", "fd00::7", "[fd00::7]:9042"];
    let spec = with_external("redis://redis:6379", &good);
    suite.expect_accepted(&format!("contact points {good:?}"), || suite.create(&spec)).await;
    suite.done().await;
}

#[tokio::test]
async fn replication_factor_cannot_exceed_the_managed_nodes() {
    let suite = Suite::new("adm-rf").await;
    for (what, scylla) in [
        ("rf 3 on 1 node", json!({"managed": {"nodes": 1}, "replicationFactor": 3})),
        ("rf 2 on the default node count", json!({"managed": {}, "replicationFactor": 2})),
        ("rf 2 on an implicit managed Scylla", json!({"keyspace": "chat", "replicationFactor": 2})),
    ] {
        let spec = json!({"scylla": scylla});
        suite
            .expect_refused(what, "spec.scylla.replicationFactor", "must not exceed scylla.managed.nodes", || {
                suite.create(&spec)
            })
            .await;
    }
    for (what, scylla) in [
        ("rf 3 on 3 nodes", json!({"managed": {"nodes": 3}, "replicationFactor": 3})),
        ("rf 1 on 1 node", json!({"managed": {}, "replicationFactor": 1})),
        ("rf 3 on an external cluster", json!({"external": {"contactPoints": ["s:9042"]}, "replicationFactor": 3})),
    ] {
        let spec = json!({"scylla": scylla});
        suite.expect_accepted(what, || suite.create(&spec)).await;
    }
    suite.done().await;
}

#[tokio::test]
async fn volumes_cannot_change_but_other_edits_pass() {
    let suite = Suite::new("adm-resize").await;
    let spec = json!({
        "redis": {"managed": {"storage": {"size": "1Gi"}}},
        "scylla": {"managed": {"storage": {"size": "10Gi", "storageClassName": "standard"}}},
    });
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kubechat.dev/v1alpha1",
        "kind": "ChatCluster",
        "metadata": {"name": "resize"},
        "spec": spec,
    }))
    .expect("object");
    suite.api.create(&PostParams::default(), &object).await.expect("create ChatCluster resize");

    let refusals = [
        ("scylla 10Gi → 20Gi", "size", json!({"spec": {"scylla": {"managed": {"storage": {"size": "20Gi"}}}}})),
        ("redis 1Gi → 2Gi", "size", json!({"spec": {"redis": {"managed": {"storage": {"size": "2Gi"}}}}})),
        ("redis 1Gi → 512Mi", "size", json!({"spec": {"redis": {"managed": {"storage": {"size": "512Mi"}}}}})),
        (
            "scylla class standard → fast-ssd",
            "storageClassName",
            json!({"spec": {"scylla": {"managed": {"storage": {"storageClassName": "fast-ssd"}}}}}),
        ),
        (
            "redis class unset → fast-ssd",
            "storageClassName",
            json!({"spec": {"redis": {"managed": {"storage": {"storageClassName": "fast-ssd"}}}}}),
        ),
    ];
    for (what, field, patch) in &refusals {
        let component = if what.starts_with("redis") { "redis" } else { "scylla" };
        suite
            .expect_refused(
                what,
                &format!("spec.{component}.managed.storage.{field}"),
                "cannot be changed in place",
                || suite.update("resize", patch),
            )
            .await;
    }
    let message = suite.update("resize", &refusals[0].2).await.expect_err("refused");
    assert!(message.contains("PersistentVolumeClaim"), "the message does not say how to resize: {message}");

    // Everything else stays editable, the unchanged sizes included.
    let edits = [
        json!({"spec": {"gateway": {"replicas": 3}}}),
        json!({"spec": {"scylla": {"managed": {"nodes": 3}}}}),
        json!({"spec": {"redis": {"managed": {"storage": {"size": "1Gi"}, "image": "redis:7.4.1-alpine"}}}}),
    ];
    for edit in &edits {
        suite.expect_accepted(&format!("edit {edit}"), || suite.update("resize", edit)).await;
    }
    // And for real: the stored generation moves on.
    let before = suite.api.get("resize").await.expect("get").metadata.generation;
    let after = suite
        .api
        .patch("resize", &PatchParams::default(), &Patch::Merge(&edits[0]))
        .await
        .expect("scale the gateways")
        .metadata
        .generation;
    assert!(after > before, "generation {before:?} → {after:?}");
    suite.done().await;
}

#[tokio::test]
async fn a_backend_with_neither_managed_nor_external_runs_managed() {
    let suite = Suite::new("adm-implicit").await;
    let spec = json!({"redis": {}, "scylla": {"keyspace": "chat"}});
    suite.expect_accepted("scylla {keyspace: chat}, redis {}", || suite.create(&spec)).await;

    // Both at once stays refused.
    let both = json!({"scylla": {
        "managed": {},
        "external": {"contactPoints": ["scylla:9042"]},
    }});
    suite
        .expect_refused("scylla managed and external", "spec.scylla", "set at most one of managed or external", || {
            suite.create(&both)
        })
        .await;
    let both = json!({"redis": {"managed": {}, "external": {"url": "redis://redis:6379"}}});
    suite
        .expect_refused("redis managed and external", "spec.redis", "set at most one of managed or external", || {
            suite.create(&both)
        })
        .await;

    // Stored as written, and the operator runs both backends managed.
    let operator = RunningOperator::start(&suite.client, &suite.namespace, None);
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kubechat.dev/v1alpha1",
        "kind": "ChatCluster",
        "metadata": {"name": "implicit"},
        "spec": spec,
    }))
    .expect("object");
    let created = suite.api.create(&PostParams::default(), &object).await.expect("create ChatCluster implicit");
    assert_eq!(created.data["spec"]["scylla"]["keyspace"], "chat");
    let stateful_sets: Api<StatefulSet> = Api::namespaced(suite.client.clone(), &suite.namespace);
    let managed = wait_for(Duration::from_secs(30), || {
        let stateful_sets = stateful_sets.clone();
        async move {
            let scylla = stateful_sets.get_opt("implicit-scylla").await.ok().flatten()?;
            let redis = stateful_sets.get_opt("implicit-redis").await.ok().flatten()?;
            Some((scylla, redis))
        }
    })
    .await;
    let (scylla, redis) = managed.expect("the operator created no managed Scylla and Redis StatefulSets within 30 s");
    assert_eq!(scylla.spec.replicas, Some(1), "{}", scylla.name_any());
    assert_eq!(redis.spec.replicas, Some(1), "{}", redis.name_any());
    operator.stop().await;
    suite.done().await;
}
