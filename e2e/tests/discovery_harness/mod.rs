//! The harness of the discovery suites: a ChatCluster of three real gateway
//! processes (the process kubelet runs one per kwok Pod) with an operator,
//! on the local control plane, Cassandra and Redis.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use kubechat_crds::ChatCluster;
use kubechat_e2e::client::{LoadClient, Tokens};
use kubechat_e2e::cluster::{RunningOperator, create_namespace, delete_namespace, install_crd, wait_for};
use kubechat_e2e::components::{connect_kube, cql_node, redis_url};
use kubechat_e2e::gateways::{new_keyspace, spec};
use kubechat_e2e::kubelet::{ProcessKubelet, RunningPod};
use kubechat_operator::desired::gateway::ENDPOINTS_KEY;
use kubechat_operator::discovery::endpoints::{Endpoints, Policy};
use kubechat_operator::discovery::poll::read_load;

pub const GATEWAYS: usize = 3;
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Small, so a few clients are a meaningful move (5 % of 100 = 5 connections).
pub const CAPACITY: u64 = 100;
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// Redis databases 1-15 are for suites that run gateways (their keys, such
/// as worker-id leases, are not per test); one per test of this binary.
pub fn redis_database() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let db = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(db <= 15, "more tests than Redis databases");
    db
}

pub struct Harness {
    pub client: Client,
    pub namespace: String,
    pub name: String,
    pub keyspace: String,
    pub operator: RunningOperator,
    pub kubelet: ProcessKubelet,
    pub tokens: Tokens,
    pub pods: Vec<RunningPod>,
}

impl Harness {
    /// A cluster on a database of the shared Redis.
    pub async fn start(prefix: &str) -> Self {
        let db = redis_database();
        let redis = format!("{}/{db}", redis_url());
        let mut conn = redis::Client::open(redis.as_str()).and_then(|c| c.get_connection()).unwrap_or_else(|e| {
            panic!("Redis is not reachable at {redis}: {e}; start it with `e2e/local/redis.sh start`")
        });
        redis::cmd("FLUSHDB").exec(&mut conn).expect("FLUSHDB");
        Self::start_with_redis(prefix, redis).await
    }

    /// A cluster on the Redis at `redis` (e.g. a private one a test kills).
    pub async fn start_with_redis(prefix: &str, redis: String) -> Self {
        Self::start_with_backends(prefix, redis, cql_node()).await
    }

    /// A cluster on the Redis at `redis` whose gateways reach Cassandra at
    /// `store` (e.g. through a gate a test closes).
    pub async fn start_with_backends(prefix: &str, redis: String, store: String) -> Self {
        let client = connect_kube().await;
        install_crd(&client).await;
        let namespace = create_namespace(&client, prefix).await;
        let name = "chat".to_string();

        let keyspace = new_keyspace(prefix).await;
        let mut spec = spec(redis, &keyspace, GATEWAYS);
        spec.scylla.external.as_mut().expect("spec() names an external store").contact_points = vec![store];
        spec.gateway.max_connections_per_pod = CAPACITY as i64;
        spec.gateway.discovery.interval_seconds = INTERVAL.as_secs() as i32;

        let operator = RunningOperator::start(&client, &namespace, None);
        let kubelet = ProcessKubelet::start(&client, &namespace, &name);
        Api::<ChatCluster>::namespaced(client.clone(), &namespace)
            .create(&PostParams::default(), &ChatCluster::new(&name, spec))
            .await
            .expect("create the ChatCluster");
        let pods = kubelet.wait_ready(GATEWAYS, Duration::from_secs(120)).await;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        let key = secrets
            .get(&format!("{name}-auth"))
            .await
            .expect("the generated signing key")
            .data
            .unwrap_or_default()["signing-key"]
            .0
            .clone();
        Self { client, namespace, name, keyspace, operator, kubelet, tokens: Tokens::new(&key), pods }
    }

    pub fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn endpoints_name(&self) -> String {
        format!("{}-endpoints", self.name)
    }

    /// The published list and the ConfigMap's resourceVersion.
    pub async fn endpoints(&self) -> Option<(Endpoints, String)> {
        let cm = self.config_maps().get(&self.endpoints_name()).await.ok()?;
        let version = cm.resource_version()?;
        Some((Endpoints::parse(cm.data?.get(ENDPOINTS_KEY)?)?, version))
    }

    /// Polls the ConfigMap until `check` holds; panics with the last list.
    pub async fn wait_endpoints(&self, timeout: Duration, what: &str, check: impl Fn(&Endpoints) -> bool) -> Endpoints {
        let found = wait_for(timeout, || async { self.endpoints().await.map(|(e, _)| e).filter(|e| check(e)) }).await;
        match found {
            Some(endpoints) => endpoints,
            None => {
                let last = self.endpoints().await.map(|(e, _)| e);
                panic!(
                    "endpoint list not {what} within {timeout:?}; last: {last:#?}\ngateways: {}",
                    self.kubelet.describe()
                )
            }
        }
    }

    pub async fn cluster(&self) -> ChatCluster {
        Api::<ChatCluster>::namespaced(self.client.clone(), &self.namespace).get(&self.name).await.expect("ChatCluster")
    }

    /// Connections each gateway reports itself (0 for one that does not answer).
    pub async fn real_connections(&self) -> Vec<u64> {
        let mut counts = Vec::new();
        for pod in &self.pods {
            counts.push(read_load(pod.admin, Duration::from_secs(2)).await.map_or(0, |l| l.connections));
        }
        counts
    }

    pub async fn connect(&self, pod: usize, user: &str) -> LoadClient {
        let url = self.pods[pod].url();
        let token = self.tokens.mint(user, "load");
        LoadClient::connect(&url, &token, HEARTBEAT).await.unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn stop(self) {
        assert_eq!(self.operator.errors(), 0, "reconcile errors");
        self.kubelet.stop().await;
        self.operator.stop().await;
        delete_namespace(&self.client, &self.namespace).await;
    }
}

pub fn connections(e: &Endpoints) -> Vec<u64> {
    e.gateways.iter().map(|g| g.connections).collect()
}

/// How long a list may lag behind a load that moved by less than the
/// threshold: the policy's wait for small moves, plus a round and a write.
pub fn small_move_bound() -> Duration {
    Policy::new(INTERVAL).small_change_every + INTERVAL * 2
}

pub fn degraded(cc: &ChatCluster) -> Option<(String, String, String)> {
    let c = cc.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Degraded")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}
