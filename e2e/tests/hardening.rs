//! Hardened by default (issue 15, items 5–8), on the local control plane:
//!
//! - every Pod the operator creates, and the chart's own, is admitted in a
//!   namespace that enforces the `restricted` Pod Security Standard (the
//!   controller-manager runs here, so the StatefulSet, ReplicaSet and Job
//!   controllers really create Pods and PodSecurity admission really refuses);
//! - a managed Redis gets a generated password that its clients are given and
//!   that it enforces, and NetworkPolicies admit only the cluster's gateways
//!   and push workers to Redis and ScyllaDB;
//! - the operator, running as the chart's ServiceAccount with the chart's
//!   RBAC, is refused nothing while it reconciles every feature;
//! - kube-score finds nothing CRITICAL in `helm template`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use kubechat_crds::{ChatCluster, ExternalRedis, ExternalScylla, GatewayPorts, RedisSpec, ScyllaSpec, SecretKeyRef};
use kubechat_e2e::cluster::{RunningOperator, delete_namespace, install_crd, wait_for};
use kubechat_e2e::components::{connect_kube, cql_node, kubeconfig_path};
use kubechat_e2e::kubelet::ProcessKubelet;
use kubechat_e2e::tools::{ToolOutput, run_tool, tool_path};
use kubechat_e2e::unique_name;
use kubechat_operator::desired::{LABEL_COMPONENT, LABEL_INSTANCE, redis};

fn chart_dir() -> String {
    format!("{}/charts/kubechat", kubechat_e2e::repo_root().display())
}

fn example(name: &str) -> ChatCluster {
    let path = format!("{}/crds/examples/{name}", kubechat_e2e::repo_root().display());
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parse {path}: {e}"))
}

fn helm(args: &[&str]) -> ToolOutput {
    run_tool("helm", args)
}

/// A namespace whose Pods must meet the `restricted` Pod Security Standard.
async fn restricted_namespace(client: &Client, prefix: &str) -> String {
    let name = unique_name(prefix);
    let labels = BTreeMap::from([
        ("pod-security.kubernetes.io/enforce".to_string(), "restricted".to_string()),
        ("pod-security.kubernetes.io/enforce-version".to_string(), "latest".to_string()),
    ]);
    let ns = Namespace {
        metadata: ObjectMeta { name: Some(name.clone()), labels: Some(labels), ..Default::default() },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
    name
}

/// Messages of the `FailedCreate` Events in `namespace`: Pods a controller
/// could not create (here: refused by PodSecurity admission).
async fn failed_creates(client: &Client, namespace: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let list = events.list(&ListParams::default()).await.expect("list Events");
    list.items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
        .map(|e| {
            format!(
                "{} {}: {}",
                e.involved_object.kind.unwrap_or_default(),
                e.involved_object.name.unwrap_or_default(),
                e.message.unwrap_or_default()
            )
        })
        .collect()
}

async fn pods(client: &Client, namespace: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), namespace).list(&ListParams::default()).await.expect("list Pods").items
}

fn component_of(pod: &Pod) -> String {
    pod.labels().get(LABEL_COMPONENT).cloned().unwrap_or_default()
}

// ---------------------------------------------------------------- item 5 ----

#[tokio::test]
async fn every_pod_the_operator_creates_is_admitted_under_restricted_pod_security() {
    let client = connect_kube().await;
    install_crd(&client).await;
    let namespace = restricted_namespace(&client, "psa-operator").await;
    let operator = RunningOperator::start(&client, &namespace, None);
    // Defaults: managed Redis and ScyllaDB, two gateways, one push worker.
    Api::<ChatCluster>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &example("minimal.yaml"))
        .await
        .expect("create the ChatCluster");

    let wanted = ["gateway", "redis", "scylla", "push-worker"];
    let all_created = wait_for(Duration::from_secs(60), || {
        let (client, namespace) = (&client, &namespace);
        async move {
            let refused = failed_creates(client, namespace).await;
            let components: Vec<String> = pods(client, namespace).await.iter().map(component_of).collect();
            (!refused.is_empty() || wanted.iter().all(|w| components.iter().any(|c| c == w))).then_some(())
        }
    })
    .await;
    let refused = failed_creates(&client, &namespace).await;
    assert!(refused.is_empty(), "Pods refused in a `restricted` namespace: {refused:#?}");
    let components: Vec<String> = pods(&client, &namespace).await.iter().map(component_of).collect();
    assert!(all_created.is_some(), "not every component got a Pod within 60 s: {components:?}");
    assert_eq!(operator.errors(), 0, "reconcile errors");
    operator.stop().await;
    delete_namespace(&client, &namespace).await;
}

#[tokio::test]
async fn the_chart_and_its_test_pod_are_admitted_under_restricted_pod_security() {
    let client = connect_kube().await;
    let namespace = restricted_namespace(&client, "psa-chart").await;
    // A release name of its own: the ClusterRole is named after it.
    let release = unique_name("psa");
    let install = helm(&["install", &release, &chart_dir(), "--namespace", &namespace, "--wait", "--timeout", "90s"]);
    let refused = failed_creates(&client, &namespace).await;
    assert!(refused.is_empty(), "the chart's Pods were refused: {refused:#?}");
    assert!(install.status.success(), "helm install: {}{}", install.stdout, install.stderr);
    let test = helm(&["test", &release, "--namespace", &namespace, "--timeout", "90s"]);
    let refused = failed_creates(&client, &namespace).await;
    assert!(refused.is_empty(), "the chart's test Pod was refused: {refused:#?}");
    assert!(test.status.success(), "helm test: {}{}", test.stdout, test.stderr);
    let deployment = Api::<Deployment>::namespaced(client.clone(), &namespace)
        .get(&format!("{release}-operator"))
        .await
        .expect("the operator Deployment");
    assert_eq!(deployment.status.and_then(|s| s.available_replicas), Some(2), "both replicas run");
    let uninstall = helm(&["uninstall", &release, "--namespace", &namespace, "--wait"]);
    assert!(uninstall.status.success(), "helm uninstall: {}", uninstall.stderr);
    delete_namespace(&client, &namespace).await;
}

// ---------------------------------------------------------------- item 6 ----

fn selects(selector: &Option<LabelSelector>, pod: &Pod) -> bool {
    let wanted = selector.as_ref().and_then(|s| s.match_labels.clone()).unwrap_or_default();
    assert!(selector.as_ref().is_none_or(|s| s.match_expressions.is_none()), "only matchLabels are modelled");
    wanted.iter().all(|(k, v)| pod.labels().get(k) == Some(v))
}

/// Components of the pods one ingress rule admits, and its ports.
type Admits = (Vec<String>, Vec<String>);

/// (components of the pods a policy selects, what each of its rules admits).
fn reach(policy: &NetworkPolicy, pods: &[Pod]) -> (Vec<String>, Vec<Admits>) {
    let spec = policy.spec.clone().expect("spec");
    let components = |selector: &Option<LabelSelector>| {
        let mut found: Vec<String> = pods.iter().filter(|p| selects(selector, p)).map(component_of).collect();
        found.sort();
        found.dedup();
        found
    };
    let rules = spec
        .ingress
        .unwrap_or_default()
        .iter()
        .map(|rule| {
            let mut from: Vec<String> = rule.from.iter().flatten().flat_map(|p| components(&p.pod_selector)).collect();
            from.sort();
            let ports = rule.ports.iter().flatten().map(|p| format!("{:?}", p.port)).collect();
            (from, ports)
        })
        .collect();
    (components(&spec.pod_selector), rules)
}

#[tokio::test]
async fn managed_backends_get_a_password_and_network_policies_that_admit_only_their_clients() {
    let client = connect_kube().await;
    install_crd(&client).await;
    let namespace = kubechat_e2e::cluster::create_namespace(&client, "netpol").await;
    let operator = RunningOperator::start(&client, &namespace, None);
    let api: Api<ChatCluster> = Api::namespaced(client.clone(), &namespace);
    let chat = api.create(&PostParams::default(), &example("minimal.yaml")).await.expect("create chat");
    // A second cluster in the same namespace: its pods must not reach chat's backends.
    let mut other = example("minimal.yaml");
    other.metadata.name = Some("other".into());
    api.create(&PostParams::default(), &other).await.expect("create other");

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let password = wait_for(Duration::from_secs(30), || {
        let secrets = secrets.clone();
        async move { secrets.get_opt("chat-redis-password").await.ok().flatten() }
    })
    .await
    .expect("the generated Redis password Secret");
    let owner = password.owner_references().first().map(|r| r.uid.clone());
    assert_eq!(owner, chat.uid(), "owned by its ChatCluster");
    let value = password.data.clone().unwrap_or_default()[redis::PASSWORD_KEY].0.clone();
    assert!(value.len() == 64 && value.iter().all(u8::is_ascii_hexdigit), "32 random bytes in hex");
    // The other cluster's reconcile may not have created its Secret yet.
    let other_password = wait_for(Duration::from_secs(30), || {
        let secrets = secrets.clone();
        async move { secrets.get_opt("other-redis-password").await.ok().flatten() }
    })
    .await
    .expect("the other cluster's generated Redis password Secret")
    .data
    .unwrap_or_default();
    assert_ne!(other_password[redis::PASSWORD_KEY].0, value, "each cluster its own password");

    // Redis is started with it; gateways and push workers are given it.
    let env_secret = |container: &k8s_openapi::api::core::v1::Container, var: &str| {
        let env = container.env.iter().flatten().find(|e| e.name == var);
        env.and_then(|e| e.value_from.clone()?.secret_key_ref).map(|s| (s.name, s.key))
    };
    let expected = Some(("chat-redis-password".to_string(), redis::PASSWORD_KEY.to_string()));
    // The push workers' Deployment is applied last: once it is there, all are.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let push = wait_for(Duration::from_secs(30), || {
        let deployments = deployments.clone();
        async move { deployments.get_opt("chat-push").await.ok().flatten() }
    })
    .await
    .expect("the push Deployment");
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    let redis_sts = sts.get("chat-redis").await.expect("the redis StatefulSet");
    let redis_pod = redis_sts.spec.template.spec.expect("pod");
    assert_eq!(env_secret(&redis_pod.containers[0], redis::SERVER_PASSWORD_ENV), expected, "Redis");
    let gateway = sts.get("chat-gateway").await.expect("gateway").spec.template.spec.expect("pod");
    assert_eq!(env_secret(&gateway.containers[0], redis::PASSWORD_ENV), expected, "gateways");
    let push = push.spec.template.spec.expect("pod");
    assert_eq!(env_secret(&push.containers[0], redis::PASSWORD_ENV), expected, "push workers");

    // The policies, evaluated against the Pods the controllers created.
    let wanted = ["gateway", "redis", "scylla", "push-worker"];
    let live_pods = wait_for(Duration::from_secs(60), || {
        let (client, namespace) = (&client, &namespace);
        async move {
            let found = pods(client, namespace).await;
            let of_chat = |w: &str| {
                found
                    .iter()
                    .any(|p| p.labels().get(LABEL_INSTANCE).map(String::as_str) == Some("chat") && component_of(p) == w)
            };
            wanted.iter().all(|w| of_chat(w)).then_some(found)
        }
    })
    .await
    .expect("Pods of every component");
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &namespace);
    let chat_pods: Vec<Pod> = live_pods
        .iter()
        .filter(|p| p.labels().get(LABEL_INSTANCE).map(String::as_str) == Some("chat"))
        .cloned()
        .collect();
    let clients = vec!["gateway".to_string(), "push-worker".into()];
    let redis_policy = policies.get("chat-redis").await.expect("chat-redis NetworkPolicy");
    let (selected, rules) = reach(&redis_policy, &live_pods);
    assert_eq!(selected, ["redis"], "selects the Redis pod");
    assert_eq!(rules, vec![(clients.clone(), vec!["Some(Int(6379))".to_string()])], "admits chat's clients to 6379");
    let scylla_policy = policies.get("chat-scylla").await.expect("chat-scylla NetworkPolicy");
    let (selected, rules) = reach(&scylla_policy, &live_pods);
    assert_eq!(selected, ["scylla"]);
    assert_eq!(
        rules,
        vec![
            (clients, vec!["Some(Int(9042))".to_string()]),
            (vec!["scylla".to_string()], vec!["Some(Int(7000))".to_string()]),
        ],
        "CQL from chat's clients, internode from Scylla"
    );
    // "other"'s pods are in the namespace, yet no rule of chat's admits them.
    let other_pods: Vec<&Pod> =
        live_pods.iter().filter(|p| p.labels().get(LABEL_INSTANCE).map(String::as_str) == Some("other")).collect();
    assert!(!other_pods.is_empty(), "other's pods exist");
    for policy in [&redis_policy, &scylla_policy] {
        let spec = policy.spec.clone().expect("spec");
        for rule in spec.ingress.iter().flatten() {
            for peer in rule.from.iter().flatten() {
                assert!(
                    other_pods.iter().all(|p| !selects(&peer.pod_selector, p)),
                    "{} admits {}",
                    policy.name_any(),
                    "other's pods"
                );
            }
        }
    }
    assert!(chat_pods.len() >= 4);
    assert_eq!(operator.errors(), 0, "reconcile errors");
    operator.stop().await;
    delete_namespace(&client, &namespace).await;
}

/// A redis-server started exactly as the managed Redis container starts it.
struct PodRedis {
    port: u16,
    _dir: tempfile::TempDir,
    child: std::process::Child,
}

impl PodRedis {
    async fn start(password: &str) -> Self {
        let cc = example("minimal.yaml");
        let managed = cc.spec.redis.managed.clone().expect("managed by default");
        let container = redis::stateful_set(&cc, &managed).spec.template.spec.expect("pod").containers[0].clone();
        let dir = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a port").port();
        let command = container.command.clone().unwrap_or_default();
        // The container's own command and arguments; only where it keeps its
        // files and where it listens differ (no /data, no Pod network here).
        let data = dir.path().to_str().expect("utf-8").to_string();
        let mut args: Vec<String> = container.args.clone().unwrap_or_default();
        if let Some(i) = args.iter().position(|a| a == "--dir") {
            args[i + 1] = data.clone();
        }
        args.extend(["--bind".into(), "127.0.0.1".into(), "--port".into(), port.to_string()]);
        let child = std::process::Command::new(&command[0])
            .args(&command[1..])
            .args(&args)
            .env(redis::SERVER_PASSWORD_ENV, password)
            .env("TMPDIR", &data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server (e2e/local/redis.sh installs it)");
        let redis = Self { port, _dir: dir, child };
        let up = wait_for(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
        })
        .await;
        assert!(up.is_some(), "redis-server did not listen on {port}");
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for PodRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn redis_started_as_its_pod_starts_it_refuses_clients_without_the_password_and_a_gateway_sends_it() {
    let password = format!("{:064x}", u128::from(std::process::id()) << 64 | 0xfeed);
    let redis_server = PodRedis::start(&password).await;

    // Without the password: refused.
    let anonymous = ::redis::Client::open(redis_server.url()).expect("client");
    let refused = async {
        let mut conn = anonymous.get_multiplexed_async_connection().await?;
        ::redis::cmd("PING").query_async::<String>(&mut conn).await
    }
    .await;
    let error = refused.expect_err("PING without the password");
    assert!(error.to_string().contains("NOAUTH"), "{error}");
    // The readiness probe (`redis-cli ping`, REDISCLI_AUTH from the Secret) passes.
    let probe = std::process::Command::new("redis-cli")
        .args(["-p", &redis_server.port.to_string(), "ping"])
        .env(redis::SERVER_PASSWORD_ENV, &password)
        .output()
        .expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&probe.stdout).trim(), "PONG", "{}", String::from_utf8_lossy(&probe.stderr));
    // The password is nowhere on its command line.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", redis_server.child.id())).expect("cmdline");
    assert!(!String::from_utf8_lossy(&cmdline).contains(&password), "the password shows in ps");

    // A real gateway process, given the password the way its Pod spec gives
    // it (a Secret in KUBECHAT_REDIS_PASSWORD), connects and becomes ready.
    let client = connect_kube().await;
    install_crd(&client).await;
    let namespace = kubechat_e2e::cluster::create_namespace(&client, "redis-auth").await;
    let secret = Secret {
        metadata: ObjectMeta { name: Some("redis-auth".into()), ..Default::default() },
        data: Some(BTreeMap::from([("pw".to_string(), ByteString(password.clone().into_bytes()))])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &secret)
        .await
        .expect("Secret");
    let keyspace = unique_name("redis_auth").replace('-', "_");
    let mut cc = example("minimal.yaml");
    cc.spec.redis = RedisSpec {
        managed: None,
        external: Some(ExternalRedis {
            url: redis_server.url(),
            password_secret: Some(SecretKeyRef { name: "redis-auth".into(), key: "pw".into() }),
            cluster: false,
            seed_urls: Vec::new(),
        }),
    };
    cc.spec.scylla = ScyllaSpec {
        managed: None,
        external: Some(ExternalScylla {
            contact_points: vec![cql_node()],
            credentials_secret: None,
            local_datacenter: None,
        }),
        keyspace,
        replication_factor: Some(1),
    };
    cc.spec.gateway.replicas = 1;
    let free = || std::net::TcpListener::bind("0.0.0.0:0").and_then(|l| l.local_addr()).expect("port").port();
    cc.spec.gateway.ports = GatewayPorts { websocket: i32::from(free()), admin: i32::from(free()) };
    cc.spec.push_workers.replicas = 0;
    let operator = RunningOperator::start(&client, &namespace, None);
    let kubelet = ProcessKubelet::start(&client, &namespace, "chat");
    Api::<ChatCluster>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &cc)
        .await
        .expect("create the ChatCluster");
    let ready = kubelet.wait_ready(1, Duration::from_secs(120)).await;
    assert_eq!(ready.len(), 1, "the gateway connected to the password-protected Redis");
    kubelet.stop().await;
    operator.stop().await;
    delete_namespace(&client, &namespace).await;
}

// ---------------------------------------------------------------- item 7 ----

/// Requests the apiserver refused with 403, as "METHOD path".
#[derive(Clone, Default)]
struct Refusals(Arc<Mutex<Vec<String>>>);

impl Refusals {
    /// Each refused request once.
    fn list(&self) -> Vec<String> {
        let mut list = self.0.lock().map(|v| v.clone()).unwrap_or_default();
        list.sort();
        list.dedup();
        list
    }
}

/// A client layer that records every 403 answer.
#[derive(Clone)]
struct RecordRefusals<S> {
    inner: S,
    refusals: Refusals,
}

impl<S, B, R> tower::Service<http::Request<B>> for RecordRefusals<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let what = format!("{} {}", request.method(), request.uri().path());
        let refusals = self.refusals.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            if response.status() == http::StatusCode::FORBIDDEN
                && let Ok(mut list) = refusals.0.lock()
            {
                list.push(what);
            }
            Ok(response)
        })
    }
}

/// A client that acts as `user` (the admin kubeconfig may impersonate) and
/// records what it is refused.
async fn impersonating(user: &str) -> (Client, Refusals) {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig_path()).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.expect("config");
    config.auth_info.impersonate = Some(user.to_string());
    let refusals = Refusals::default();
    let layer = tower::layer::layer_fn({
        let refusals = refusals.clone();
        move |inner| RecordRefusals { inner, refusals: refusals.clone() }
    });
    let client = kube::client::ClientBuilder::try_from(config).expect("client").with_layer(&layer).build();
    (client, refusals)
}

async fn create_secret(client: &Client, namespace: &str, name: &str, key: &str) {
    let secret = Secret {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        data: Some(BTreeMap::from([(key.to_string(), ByteString(b"not-a-real-key".to_vec()))])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), namespace).create(&PostParams::default(), &secret).await.expect("Secret");
}

/// Runs the operator as the chart's ServiceAccount, with the RBAC `helm
/// install` created (`extra` --set values), over a ChatCluster with every
/// feature and a minimal one; returns what the apiserver refused.
async fn refused_to_the_charts_service_account(extra: &[&str]) -> (Vec<String>, u64) {
    let admin = connect_kube().await;
    install_crd(&admin).await;
    let namespace = kubechat_e2e::cluster::create_namespace(&admin, "rbac").await;
    let release = unique_name("rbac");
    let chart = chart_dir();
    let mut args = vec!["install", release.as_str(), chart.as_str(), "--namespace", namespace.as_str()];
    let sets: Vec<String> = extra.iter().map(|s| s.replace("{namespace}", &namespace)).collect();
    for set in &sets {
        args.extend(["--set", set.as_str()]);
    }
    // The chart's operator Pods do nothing here (kwok): only its RBAC counts.
    args.extend(["--set", "replicas=1"]);
    let install = helm(&args);
    assert!(install.status.success(), "helm install: {}{}", install.stdout, install.stderr);

    // Every Secret full.yaml names, so that the operator reads them all.
    for (name, key) in
        [("push-webhook", "hmac-key"), ("fcm", "service-account.json"), ("apns", "key.p8"), ("chat-jwt", "hs256-key")]
    {
        create_secret(&admin, &namespace, name, key).await;
    }
    let (client, refusals) = impersonating(&format!("system:serviceaccount:{namespace}:{release}-operator")).await;
    let operator = RunningOperator::start(&client, &namespace, None);
    let api: Api<ChatCluster> = Api::namespaced(admin.clone(), &namespace);
    for cc in [example("full.yaml"), example("minimal.yaml")] {
        api.create(&PostParams::default(), &cc).await.expect("create ChatCluster");
    }
    // Both reconciled (status written) and every generated Secret and policy in place.
    let settled = wait_for(Duration::from_secs(60), || {
        let (api, admin, namespace) = (api.clone(), admin.clone(), namespace.clone());
        async move {
            let list = api.list(&ListParams::default()).await.ok()?;
            let reconciled = list
                .items
                .iter()
                .all(|cc| cc.status.as_ref().is_some_and(|s| s.observed_generation == cc.metadata.generation));
            let secrets = Api::<Secret>::namespaced(admin.clone(), &namespace);
            let generated = secrets.get_opt("chat-auth").await.ok()?.is_some()
                && secrets.get_opt("chat-redis-password").await.ok()?.is_some()
                && secrets.get_opt("chat-prod-redis-password").await.ok()?.is_some()
                && secrets.get_opt("chat-admin-token").await.ok()?.is_some()
                && secrets.get_opt("chat-prod-admin-token").await.ok()?.is_some();
            let owned = ListParams::default().labels("app.kubernetes.io/managed-by=kubechat-operator");
            let policies = Api::<NetworkPolicy>::namespaced(admin, &namespace).list(&owned).await.ok()?;
            (reconciled && generated && policies.items.len() == 6).then_some(())
        }
    })
    .await;
    // Pruning (the `delete` verbs): switching the minimal cluster's Redis to
    // external deletes its Redis objects.
    let mut pruned = true;
    if settled.is_some() {
        let patch = serde_json::json!({"spec": {"redis": {"managed": null, "external": {"url": "redis://redis.example:6379"}}}});
        api.patch("chat", &PatchParams::default(), &Patch::Merge(patch)).await.expect("switch to external Redis");
        let done = wait_for(Duration::from_secs(30), || {
            let (admin, namespace, refusals) = (admin.clone(), namespace.clone(), &refusals);
            async move {
                let secret = Api::<Secret>::namespaced(admin.clone(), &namespace).get_opt("chat-redis-password").await;
                let sts = Api::<StatefulSet>::namespaced(admin, &namespace).get_opt("chat-redis").await;
                let gone = matches!((secret, sts), (Ok(None), Ok(None)));
                (gone || !refusals.list().is_empty()).then_some(())
            }
        })
        .await;
        pruned = done.is_some();
    }
    // Watches and the discovery loop have had time to run, and to be refused.
    tokio::time::sleep(Duration::from_secs(3)).await;
    if settled.is_none() {
        let list = api.list(&ListParams::default()).await.expect("list");
        let generations: Vec<_> = list
            .items
            .iter()
            .map(|cc| (cc.name_any(), cc.metadata.generation, cc.status.as_ref().map(|s| s.observed_generation)))
            .collect();
        let secrets = Api::<Secret>::namespaced(admin.clone(), &namespace).list(&ListParams::default()).await;
        let secrets: Vec<String> = secrets.map(|l| l.items.iter().map(|s| s.name_any()).collect()).unwrap_or_default();
        let policies = Api::<NetworkPolicy>::namespaced(admin.clone(), &namespace).list(&ListParams::default()).await;
        let policies: Vec<String> =
            policies.map(|l| l.items.iter().map(|s| s.name_any()).collect()).unwrap_or_default();
        println!(
            "not settled: {generations:?}; Secrets {secrets:?}; NetworkPolicies {policies:?}; errors {}",
            operator.errors()
        );
    }
    let refused = refusals.list();
    let errors = operator.errors();
    operator.stop().await;
    let uninstall = helm(&["uninstall", &release, "--namespace", &namespace, "--wait"]);
    assert!(uninstall.status.success(), "helm uninstall: {}", uninstall.stderr);
    delete_namespace(&admin, &namespace).await;
    assert!(
        settled.is_some() || !refused.is_empty(),
        "the operator did not reconcile within 60 s, and was refused nothing"
    );
    assert!(pruned, "switched to external Redis, the operator neither pruned the managed Redis nor was refused");
    (refused, errors)
}

#[tokio::test]
async fn the_operator_needs_no_verb_the_charts_cluster_role_does_not_grant() {
    let (refused, errors) = refused_to_the_charts_service_account(&[]).await;
    assert!(refused.is_empty(), "the apiserver refused the chart's ServiceAccount: {refused:#?}");
    assert_eq!(errors, 0, "reconcile errors");
}

#[tokio::test]
async fn the_operator_needs_no_verb_the_charts_namespaced_role_does_not_grant() {
    let (refused, errors) = refused_to_the_charts_service_account(&["watchNamespace={namespace}"]).await;
    assert!(refused.is_empty(), "the apiserver refused the chart's ServiceAccount: {refused:#?}");
    assert_eq!(errors, 0, "reconcile errors");
}

// ---------------------------------------------------------------- item 8 ----

#[test]
fn kube_score_finds_nothing_critical_in_the_chart() {
    let kube_score = tool_path("kube-score");
    let template = helm(&["template", "kc", &chart_dir(), "--namespace", "chat-system"]);
    assert!(template.status.success(), "helm template: {}", template.stderr);
    let rendered = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(rendered.path(), &template.stdout).expect("write");
    let out = std::process::Command::new(&kube_score)
        .args(["score", "--output-format", "ci"])
        .arg(rendered.path())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {} ({e}); build it with `e2e/local/control-plane.sh install`", kube_score.display())
        });
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    let critical: Vec<&str> = report.lines().filter(|l| l.starts_with("[CRITICAL]")).collect();
    assert!(!report.trim().is_empty(), "kube-score printed nothing: {}", String::from_utf8_lossy(&out.stderr));
    assert!(critical.is_empty(), "kube-score CRITICAL findings:\n{}", critical.join("\n"));
}
