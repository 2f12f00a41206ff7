//! Helpers for suites that run against the local control plane: the CRD,
//! throw-away namespaces, an in-process operator and polling.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt};
use kubechat_crds::{ChatCluster, ChatClusterSpec, ExternalRedis, ExternalScylla, RedisSpec, ScyllaSpec};
use kubechat_operator::desired::network::OperatorPods;
use kubechat_operator::leader::LeaderConfig;
use kubechat_operator::metrics::Metrics;
use kubechat_operator::reconcile::Scope;
use kubechat_operator::run::{Options, RunError, run};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Polls `check` every 100 ms until it returns `Some`, or `None` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Operator logs in the test output (shown for failing tests), filtered by `RUST_LOG`.
pub fn init_test_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("kubechat_operator=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// Installs (server-side applies) the ChatCluster CRD generated from the
/// Rust types and waits until the apiserver serves it.
pub async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = ChatCluster::crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.patch(&name, &PatchParams::apply("kubechat-e2e").force(), &Patch::Apply(&crd)).await.expect("apply the CRD");
    let established = wait_for(Duration::from_secs(30), || {
        let crds = crds.clone();
        let name = name.clone();
        async move {
            let crd = crds.get(&name).await.ok()?;
            let conditions = crd.status?.conditions.unwrap_or_default();
            conditions.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
        }
    })
    .await;
    assert!(established.is_some(), "CRD {name} was not established within 30 s");
    // The discovery cache of a fresh client may lag: wait until a list works.
    let api: Api<ChatCluster> = Api::all(client.clone());
    let served = wait_for(Duration::from_secs(30), || {
        let api = api.clone();
        async move { api.list(&Default::default()).await.ok().map(|_| ()) }
    })
    .await;
    assert!(served.is_some(), "ChatClusters are not served 30 s after the CRD was established");
}

/// A namespace for one test; delete it with [`delete_namespace`].
pub async fn create_namespace(client: &Client, prefix: &str) -> String {
    let name = crate::unique_name(prefix);
    let ns =
        Namespace { metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
    name
}

pub async fn delete_namespace(client: &Client, name: &str) {
    let _ = Api::<Namespace>::all(client.clone()).delete(name, &DeleteParams::background()).await;
}

/// An operator running inside the test process.
pub struct RunningOperator {
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), RunError>>,
}

/// Who the in-process operators say they are (the chart's labels for a
/// release named `e2e` in `kubechat-e2e`): the gateways' NetworkPolicy
/// admits these pods to the admin port.
pub fn operator_pods() -> OperatorPods {
    OperatorPods {
        namespace: "kubechat-e2e".into(),
        labels: BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), "kubechat-operator".to_string()),
            ("app.kubernetes.io/instance".to_string(), "e2e".to_string()),
        ]),
    }
}

impl RunningOperator {
    /// Starts an operator watching `namespace`, with leader election when
    /// `leader` is given.
    pub fn start(client: &Client, namespace: &str, leader: Option<LeaderConfig>) -> Self {
        init_test_logs();
        let metrics = Metrics::new();
        let shutdown = CancellationToken::new();
        let options = Options {
            scope: Scope::Namespace(namespace.to_string()),
            instance: leader.as_ref().map(|l| l.identity.clone()),
            leader,
            // Pod IPs are loopback here (e2e/local/control-plane.sh); never dial anything else.
            discovery: kubechat_operator::discovery::Options { loopback_only: true, ..Default::default() },
            operator_pods: operator_pods(),
        };
        let task = tokio::spawn(run(
            client.clone(),
            options,
            metrics.clone(),
            Arc::new(AtomicBool::new(false)),
            shutdown.clone(),
        ));
        Self { metrics, shutdown, task }
    }

    /// Graceful stop: releases the Lease if it holds it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        match tokio::time::timeout(Duration::from_secs(30), self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("operator ended with an error: {e}"),
            Ok(Err(e)) => panic!("operator task failed: {e}"),
            Err(_) => panic!("operator did not stop within 30 s"),
        }
    }

    /// Crash: the task is dropped mid-flight, nothing is released.
    pub fn kill(self) {
        self.task.abort();
    }

    /// Reconcile errors so far.
    pub fn errors(&self) -> u64 {
        use prometheus::core::Collector;
        self.metrics
            .errors
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }
}

/// An external Redis at an address nothing dials.
pub fn external_redis() -> RedisSpec {
    RedisSpec {
        managed: None,
        external: Some(ExternalRedis {
            url: "redis://redis.example:6379".into(),
            password_secret: None,
            cluster: false,
            seed_urls: Vec::new(),
        }),
    }
}

/// An external ScyllaDB at an address nothing dials.
pub fn external_scylla() -> ScyllaSpec {
    ScyllaSpec {
        managed: None,
        external: Some(ExternalScylla {
            contact_points: vec!["scylla.example:9042".into()],
            credentials_secret: None,
            local_datacenter: None,
        }),
        ..ScyllaSpec::default()
    }
}

/// A ChatCluster whose Redis and ScyllaDB are external: no volumes to
/// provision, so its pods become Ready on kwok's fake nodes.
pub fn with_external_backends(name: &str, gateways: i32) -> ChatCluster {
    let mut spec = ChatClusterSpec { redis: external_redis(), scylla: external_scylla(), ..ChatClusterSpec::default() };
    spec.gateway.replicas = gateways;
    ChatCluster::new(name, spec)
}
