//! A ChatCluster whose gateways are real processes: in-process operators,
//! the local control plane, a private Redis, Cassandra for the store, and a
//! `kubechat-gateway` process per gateway Pod ([`crate::kubelet`]). The
//! suites that move clients between gateways (rollouts, autoscaling) start
//! from here.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use kubechat_crds::{
    ChatCluster, ChatClusterSpec, ExternalRedis, ExternalScylla, GatewayPorts, RedisSpec, ScyllaSpec, ZoneStatus,
};
use kubechat_gateway::store::scylla::{ScyllaConfig, ScyllaStore};
use kubechat_operator::desired::gateway::ENDPOINTS_KEY;
use kubechat_operator::discovery::endpoints::Endpoints;
use kubechat_operator::leader::LeaderConfig;

use crate::client::Tokens;
use crate::cluster::{RunningOperator, create_namespace, delete_namespace, install_crd, wait_for};
use crate::components::{PrivateRedis, connect_kube, cql_node};
use crate::kubelet::ProcessKubelet;
use crate::unique_name;

/// The ChatCluster's name.
pub const NAME: &str = "chat";
/// The selector of its gateway pods.
pub const GATEWAY_PODS: &str = "app.kubernetes.io/component=gateway";

/// A free TCP port on this machine: free on every address (0.0.0.0), so
/// also on each gateway Pod's loopback IP, where its process binds it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// Leader election on a Lease named `kubechat-operator` in `namespace`.
pub fn lease(namespace: &str, identity: &str, duration: Duration) -> LeaderConfig {
    LeaderConfig {
        lease_name: "kubechat-operator".into(),
        namespace: namespace.into(),
        identity: identity.into(),
        lease_duration: duration,
        renew_every: Duration::from_millis(500),
    }
}

/// A keyspace name of its own, its schema created in Cassandra before any
/// gateway starts (gateways starting together would race on creating it).
/// Tests leave it behind (`e2e/local/up.sh` starts Cassandra empty): a
/// `DROP KEYSPACE` makes Cassandra flush every table with unflushed writes,
/// and those flushes and their compactions were most of its CPU in a run.
pub async fn new_keyspace(prefix: &str) -> String {
    let keyspace = unique_name(prefix).replace('-', "_");
    let config = ScyllaConfig {
        contact_points: vec![cql_node()],
        keyspace: keyspace.clone(),
        replication_factor: 1,
        ..ScyllaConfig::default()
    };
    ScyllaStore::connect(config).await.unwrap_or_else(|e| {
        panic!("Cassandra (CQL) is not usable at {}: {e}; start it with `e2e/local/cassandra.sh start`", cql_node())
    });
    keyspace
}

/// A spec for real gateways: Redis at `redis`, the local Cassandra with
/// `keyspace`, `gateways` replicas on free ports, capacity 5,000, discovery
/// every second, no push workers.
pub fn spec(redis: String, keyspace: &str, gateways: usize) -> ChatClusterSpec {
    let mut spec = ChatClusterSpec {
        redis: RedisSpec {
            managed: None,
            external: Some(ExternalRedis { url: redis, password_secret: None, cluster: false, seed_urls: Vec::new() }),
        },
        scylla: ScyllaSpec {
            managed: None,
            external: Some(ExternalScylla {
                contact_points: vec![cql_node()],
                credentials_secret: None,
                local_datacenter: None,
            }),
            keyspace: keyspace.to_string(),
            replication_factor: Some(1),
        },
        ..ChatClusterSpec::default()
    };
    spec.gateway.replicas = i32::try_from(gateways).expect("gateways");
    spec.gateway.max_connections_per_pod = 5000;
    spec.gateway.ports = GatewayPorts { websocket: i32::from(free_port()), admin: i32::from(free_port()) };
    spec.gateway.discovery.interval_seconds = 1;
    spec.push_workers.replicas = 0;
    spec
}

/// What to start.
pub struct Setup<'a> {
    /// Namespace prefix.
    pub prefix: &'a str,
    /// Gateways listed ready before [`RealGateways::start`] returns.
    pub gateways: usize,
    /// Empty: one operator without leader election. Else one operator per
    /// identity sharing a Lease of `lease`, the first one leading.
    pub leaders: &'a [&'a str],
    pub lease: Duration,
}

pub struct RealGateways {
    pub client: Client,
    pub namespace: String,
    pub keyspace: String,
    /// Live operators; with leader election the first one started leads.
    pub operators: Vec<RunningOperator>,
    pub kubelet: ProcessKubelet,
    pub tokens: Tokens,
    /// The cluster's token-signing key.
    pub key: Vec<u8>,
    _redis: PrivateRedis,
}

impl RealGateways {
    /// Starts everything and waits until `setup.gateways` gateways are
    /// listed ready. The spec has external backends, no push workers, a
    /// 1 s discovery interval and `setup.gateways` replicas; `configure`
    /// changes it before the ChatCluster is created.
    pub async fn start(setup: Setup<'_>, configure: impl FnOnce(&mut ChatClusterSpec)) -> Self {
        let redis = PrivateRedis::start().await;
        let client = connect_kube().await;
        install_crd(&client).await;
        let namespace = create_namespace(&client, setup.prefix).await;
        let keyspace = new_keyspace(setup.prefix).await;
        let mut spec = spec(redis.url(), &keyspace, setup.gateways);
        configure(&mut spec);

        let mut operators = Vec::new();
        if setup.leaders.is_empty() {
            operators.push(RunningOperator::start(&client, &namespace, None));
        }
        for identity in setup.leaders {
            let operator = RunningOperator::start(&client, &namespace, Some(lease(&namespace, identity, setup.lease)));
            if operators.is_empty() {
                let metrics = operator.metrics.clone();
                let leading =
                    wait_for(Duration::from_secs(10), || async { (metrics.leader.get() == 1).then_some(()) }).await;
                assert!(leading.is_some(), "{identity} never became leader");
            }
            operators.push(operator);
        }
        let kubelet = ProcessKubelet::start(&client, &namespace, NAME);
        Api::<ChatCluster>::namespaced(client.clone(), &namespace)
            .create(&PostParams::default(), &ChatCluster::new(NAME, spec))
            .await
            .expect("create the ChatCluster");
        kubelet.wait_ready(setup.gateways, Duration::from_secs(120)).await;
        let key = Api::<Secret>::namespaced(client.clone(), &namespace)
            .get(&format!("{NAME}-auth"))
            .await
            .expect("the generated signing key")
            .data
            .unwrap_or_default()["signing-key"]
            .0
            .clone();
        let gateways =
            Self { client, namespace, keyspace, operators, kubelet, tokens: Tokens::new(&key), key, _redis: redis };
        gateways.wait_listed(setup.gateways, Duration::from_secs(60)).await;
        gateways
    }

    pub fn clusters(&self) -> Api<ChatCluster> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub async fn cluster(&self) -> ChatCluster {
        self.clusters().get(NAME).await.expect("ChatCluster")
    }

    pub async fn gateway_pods(&self) -> Vec<Pod> {
        self.pods().list(&ListParams::default().labels(GATEWAY_PODS)).await.expect("list pods").items
    }

    /// The endpoint list as published (`None`: not yet, or unreadable).
    pub async fn endpoints(&self) -> Option<Endpoints> {
        read_endpoints(&Api::namespaced(self.client.clone(), &self.namespace)).await
    }

    /// Waits until exactly `count` gateways are listed, all ready.
    pub async fn wait_listed(&self, count: usize, timeout: Duration) -> Endpoints {
        let listed = wait_for(timeout, || async {
            self.endpoints().await.filter(|e| e.gateways.len() == count && e.gateways.iter().all(|g| g.ready))
        })
        .await;
        listed.unwrap_or_else(|| panic!("not {count} gateways listed ready; {}", self.kubelet.describe()))
    }

    /// Asserts no operator failed a reconcile, then stops everything and
    /// deletes the namespace (the keyspace stays: see [`new_keyspace`]).
    pub async fn stop(self) {
        for operator in &self.operators {
            assert_eq!(operator.errors(), 0, "reconcile errors");
        }
        self.kubelet.stop().await;
        for operator in self.operators {
            operator.stop().await;
        }
        delete_namespace(&self.client, &self.namespace).await;
    }

    /// Waits until `status.zones` counts `gateways` over the control
    /// plane's two zones, and checks the spread (`spec.topologySpread`'s
    /// default skew of 1); the zones.
    pub async fn wait_spread(&self, gateways: i32, timeout: Duration) -> Vec<ZoneStatus> {
        let zones = wait_for(timeout, || async {
            let zones = self.cluster().await.status?.zones;
            (zones.iter().map(|z| z.gateways).sum::<i32>() == gateways).then_some(zones)
        })
        .await;
        let zones = zones
            .unwrap_or_else(|| panic!("status.zones never counted {gateways} gateways; {}", self.kubelet.describe()));
        let names: Vec<&str> = zones.iter().map(|z| z.zone.as_str()).collect();
        let counts: Vec<i32> = zones.iter().map(|z| z.gateways).collect();
        if gateways >= 2 {
            assert_eq!(names, ["zone-a", "zone-b"], "{zones:?}");
        }
        let skew = counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0);
        assert!(skew <= 1, "{gateways} gateways spread {zones:?} (skew over 1)");
        zones
    }

    /// The names of the gateway pods, sorted (terminating ones included).
    pub async fn gateway_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.gateway_pods().await.iter().map(|p| p.name_any()).collect();
        names.sort();
        names
    }
}

/// The endpoint list of [`NAME`] as published (`None`: not yet, or unreadable).
pub async fn read_endpoints(config_maps: &Api<ConfigMap>) -> Option<Endpoints> {
    let cm = config_maps.get(&format!("{NAME}-endpoints")).await.ok()?;
    Endpoints::parse(cm.data?.get(ENDPOINTS_KEY)?)
}
