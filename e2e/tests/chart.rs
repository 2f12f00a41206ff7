//! The Helm chart as a platform engineer meets it, on the local control
//! plane: its values schema refuses bad values with a message, the
//! ServiceMonitor appears only when asked, `helm install` prints what to do
//! next, `helm test` runs its hook, and the example ChatClusters under
//! `charts/kubechat/examples/` reach their expected status when applied with
//! kubectl. (That the chart's CRD is the generated one is
//! `checked_in_crds_match_the_types` in crds/src/generate.rs.)

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use kube::{Client, ResourceExt};
use kubechat_crds::ChatCluster;
use kubechat_e2e::cluster::{RunningOperator, create_namespace, delete_namespace, install_crd, wait_for};
use kubechat_e2e::components::connect_kube;
use kubechat_e2e::tools::{ToolOutput, run_tool};
use serde::Deserialize;

fn chart_dir() -> String {
    format!("{}/charts/kubechat", kubechat_e2e::repo_root().display())
}

fn example_path(name: &str) -> String {
    format!("{}/examples/{name}", chart_dir())
}

fn helm(args: &[&str]) -> ToolOutput {
    run_tool("helm", args)
}

/// `helm template` of the chart with `--set` values; the documents it renders.
fn render(sets: &[&str]) -> Result<Vec<serde_yaml::Value>, String> {
    let chart = chart_dir();
    let mut args = vec!["template", "kc", chart.as_str(), "--namespace", "chat-system"];
    for set in sets {
        args.extend(["--set", set]);
    }
    let out = helm(&args);
    if !out.status.success() {
        return Err(out.stderr);
    }
    Ok(serde_yaml::Deserializer::from_str(&out.stdout)
        .map(|d| serde_yaml::Value::deserialize(d).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect())
}

fn of_kind<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

#[test]
fn the_values_schema_refuses_bad_values_with_a_message() {
    let lint = helm(&["lint", "--strict", &chart_dir()]);
    assert!(lint.status.success(), "the defaults pass the schema: {}{}", lint.stdout, lint.stderr);
    render(&[]).expect("the defaults render");

    // Each bad value is refused, and the message names where it is.
    for (set, says) in [
        ("replicas=0", "/replicas"),
        ("replicas=two", "/replicas"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("image.repository=Not A Repository", "/image/repository"),
        ("metrics.port=80", "/metrics/port"),
        ("leaderElection.leaseSeconds=1", "/leaderElection/leaseSeconds"),
        ("watchNamespace=Not_A_Namespace", "/watchNamespace"),
        ("serviceMonitor.interval=often", "/serviceMonitor/interval"),
        ("replica=3", "replica"),
        ("resources.limits.memory=lots", "/resources/limits/memory"),
        ("resources.requests.cpu=1.5 cores", "/resources/requests/cpu"),
        ("resources.request.cpu=1", "request"),
    ] {
        match render(&[set]) {
            Ok(_) => panic!("--set {set} was accepted"),
            Err(message) => assert!(message.contains(says), "--set {set}: the message {message:?} lacks {says:?}"),
        }
    }
}

#[tokio::test]
async fn helm_install_refuses_bad_values_before_touching_the_cluster() {
    let client = connect_kube().await;
    let namespace = kubechat_e2e::unique_name("chart-bad");
    let out =
        helm(&["install", "kc", &chart_dir(), "--namespace", &namespace, "--create-namespace", "--set", "replicas=0"]);
    assert!(!out.status.success(), "helm install with replicas=0 succeeded: {}", out.stdout);
    assert!(out.stderr.contains("values don't meet the specifications of the schema"), "{}", out.stderr);
    assert!(out.stderr.contains("/replicas"), "the message names the value: {}", out.stderr);
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    assert!(namespaces.get_opt(&namespace).await.expect("get namespace").is_none(), "nothing was created");
}

#[test]
fn the_service_monitor_is_rendered_only_when_asked() {
    let plain = render(&[]).expect("render");
    assert!(of_kind(&plain, "ServiceMonitor").is_empty(), "a ServiceMonitor was rendered without being asked for");

    let docs = render(&["serviceMonitor.enabled=true", "serviceMonitor.labels.release=prometheus"]).expect("render");
    let monitors = of_kind(&docs, "ServiceMonitor");
    assert_eq!(monitors.len(), 1, "one ServiceMonitor when serviceMonitor.enabled=true");
    let monitor = monitors[0];
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus", "extra labels for Prometheus' selector");
    assert_eq!(monitor["spec"]["namespaceSelector"]["matchNames"][0], "chat-system");

    // It selects the metrics Service and scrapes its named port.
    let service = of_kind(&docs, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "kc-operator-metrics")
        .expect("the metrics Service");
    let selector = monitor["spec"]["selector"]["matchLabels"].as_mapping().expect("matchLabels");
    for (key, value) in selector {
        assert_eq!(&service["metadata"]["labels"][key], value, "the Service carries the selected label {key:?}");
    }
    let endpoint = &monitor["spec"]["endpoints"][0];
    let port = endpoint["port"].as_str().expect("endpoint port name");
    let ports = service["spec"]["ports"].as_sequence().expect("service ports");
    assert!(ports.iter().any(|p| p["name"] == port), "the Service has no port named {port}");
    assert_eq!(endpoint["path"], "/metrics");
}

/// The gateways' NetworkPolicy admits the pods the operator names by
/// `POD_NAMESPACE` and `KUBECHAT_OPERATOR_POD_LABELS` to their admin port:
/// those must be the chart's operator pods, or rollouts cannot drain.
#[test]
fn the_operator_names_its_own_pods_for_the_gateways_admin_port() {
    use kubechat_operator::desired::network::OperatorPods;
    let docs = render(&[]).expect("render");
    let deployments = of_kind(&docs, "Deployment");
    let operator = deployments.iter().find(|d| d["metadata"]["name"] == "kc-operator").expect("the operator");
    let template = &operator["spec"]["template"];
    let env = template["spec"]["containers"][0]["env"].as_sequence().expect("env");
    let var = |name: &str| env.iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("no {name}"));
    assert_eq!(var("POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace");
    let text = var("KUBECHAT_OPERATOR_POD_LABELS")["value"].as_str().expect("a value");
    let labels = OperatorPods::parse_labels(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    for (key, value) in &labels {
        assert_eq!(
            template["metadata"]["labels"][key.as_str()].as_str(),
            Some(value.as_str()),
            "the operator's pods do not carry {key}={value}"
        );
    }
    assert_eq!(labels.get("app.kubernetes.io/instance").map(String::as_str), Some("kc"), "this release's pods only");
}

#[tokio::test]
async fn install_prints_next_steps_and_helm_test_runs_its_check() {
    let client = connect_kube().await;
    let namespace = kubechat_e2e::unique_name("chart-test");
    let install = helm(&[
        "install",
        "kc",
        &chart_dir(),
        "--namespace",
        &namespace,
        "--create-namespace",
        "--wait",
        "--timeout",
        "90s",
    ]);
    assert!(install.status.success(), "helm install: {}{}", install.stdout, install.stderr);
    for next_step in ["helm test kc", "kubectl apply -f charts/kubechat/examples/dev.yaml", "kubectl get chatclusters"]
    {
        assert!(install.stdout.contains(next_step), "NOTES lack {next_step:?}:\n{}", install.stdout);
    }

    // kwok completes the hook's Job without running it, so here this shows
    // the hook is wired (Helm creates it and waits for it); what it checks is
    // asserted below, and it runs for real on kind (e2e/kind/run.sh).
    let test = helm(&["test", "kc", "--namespace", &namespace, "--timeout", "90s"]);
    assert!(test.status.success(), "helm test: {}{}", test.stdout, test.stderr);
    assert!(test.stdout.contains("kc-operator-test") && test.stdout.contains("Succeeded"), "{}", test.stdout);

    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    let job = jobs.get("kc-operator-test").await.expect("the test Job");
    let spec = job.spec.and_then(|s| s.template.spec).expect("pod spec");
    let command = spec.containers[0].command.clone().unwrap_or_default().join(" ");
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let service = services.get("kc-operator-metrics").await.expect("the metrics Service");
    let port = service.spec.and_then(|s| s.ports).unwrap_or_default()[0].port;
    let url = format!("http://kc-operator-metrics.{namespace}.svc:{port}/readyz");
    assert!(command.ends_with(&url), "the test fetches {url}: {command}");

    let uninstall = helm(&["uninstall", "kc", "--namespace", &namespace, "--wait"]);
    assert!(uninstall.status.success(), "helm uninstall: {}", uninstall.stderr);
    delete_namespace(&client, &namespace).await;
}

async fn wait_for_condition(
    client: &Client,
    namespace: &str,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> ChatCluster {
    let api: Api<ChatCluster> = Api::namespaced(client.clone(), namespace);
    let found = wait_for(Duration::from_secs(90), || {
        let api = api.clone();
        async move {
            let cc = api.get(name).await.ok()?;
            let s = cc.status.as_ref()?;
            let matches = s.observed_generation == cc.metadata.generation
                && s.conditions.iter().any(|c| c.type_ == type_ && c.status == status && c.reason == reason);
            matches.then_some(cc)
        }
    })
    .await;
    found.unwrap_or_else(|| panic!("{namespace}/{name}: {type_} did not become {status} ({reason}) within 90 s"))
}

fn kubectl_apply(namespace: &str, file: &str) -> ToolOutput {
    let out = run_tool("kubectl", &["apply", "--namespace", namespace, "-f", file]);
    assert!(out.status.success(), "kubectl apply -f {file}: {}{}", out.stdout, out.stderr);
    out
}

#[tokio::test]
async fn the_dev_example_gets_its_components_and_waits_for_storage() {
    let client = connect_kube().await;
    install_crd(&client).await;
    let namespace = create_namespace(&client, "example-dev").await;
    let operator = RunningOperator::start(&client, &namespace, None);

    kubectl_apply(&namespace, &example_path("dev.yaml"));
    // Its managed Redis and ScyllaDB need volumes, which the local control
    // plane cannot provision (kind's default StorageClass can): the status
    // says that the claims cannot be bound, not that it is rolling out.
    let cc = wait_for_condition(&client, &namespace, "chat-dev", "Degraded", "True", "PodsCannotStart").await;
    let status = cc.status.expect("status");
    assert_eq!(status.gateway.desired, 2, "two gateways");
    assert_eq!(status.endpoint_config_map, "chat-dev-endpoints");
    let condition = |type_: &str| status.conditions.iter().find(|c| c.type_ == type_).expect("condition");
    let degraded = condition("Degraded");
    assert!(
        degraded.message.contains("PersistentVolumeClaim data-chat-dev-redis-0")
            || degraded.message.contains("pod chat-dev-redis-0 cannot be scheduled"),
        "Degraded names the Redis pod or its claim: {}",
        degraded.message
    );
    let progressing = condition("Progressing");
    assert_eq!((progressing.status.as_str(), progressing.reason.as_str()), ("False", "Blocked"));
    assert!(
        progressing.message.contains("redis") && progressing.message.contains("scylla"),
        "Progressing names what it waits for: {}",
        progressing.message
    );
    let got = run_tool("kubectl", &["get", "chatclusters", "--namespace", &namespace]);
    assert!(got.stdout.contains("chat-dev"), "kubectl get chatclusters: {}", got.stdout);
    assert_eq!(operator.errors(), 0, "reconcile errors");
    operator.stop().await;
    delete_namespace(&client, &namespace).await;
}

#[tokio::test]
async fn the_production_example_is_degraded_without_its_secrets_and_not_ready_while_no_gateway_serves() {
    let client = connect_kube().await;
    install_crd(&client).await;
    let namespace = create_namespace(&client, "example-prod").await;
    let operator = RunningOperator::start(&client, &namespace, None);
    let text = std::fs::read_to_string(example_path("production.yaml")).expect("read production.yaml");

    // The ChatCluster alone: Degraded, naming each Secret it lacks.
    let cluster_only = tempfile::NamedTempFile::new().expect("temp file");
    let cluster_doc = text.split("\n---\n").find(|d| d.contains("kind: ChatCluster")).expect("a ChatCluster document");
    std::fs::write(cluster_only.path(), cluster_doc).expect("write");
    kubectl_apply(&namespace, cluster_only.path().to_str().expect("utf-8 path"));
    let cc = wait_for_condition(&client, &namespace, "chat-prod", "Degraded", "True", "SecretNotFound").await;
    let degraded = cc.status.expect("status").conditions.into_iter().find(|c| c.type_ == "Degraded").expect("Degraded");
    for secret in ["chat-redis", "chat-scylla", "chat-push-webhook", "chat-jwt"] {
        assert!(degraded.message.contains(secret), "Degraded names {secret}: {}", degraded.message);
    }

    // The whole file (Secrets included): every pod runs, but no gateway
    // serves (no gateway process answers for these fake pods, and the
    // example's backends do not exist here), so it is not Ready, and says
    // why: the gateways' load could not be read.
    kubectl_apply(&namespace, &example_path("production.yaml"));
    wait_for_condition(&client, &namespace, "chat-prod", "Ready", "False", "NoLoadReport").await;
    // Once discovery has tried every gateway, it names each one and why.
    let api: Api<ChatCluster> = Api::namespaced(client.clone(), &namespace);
    let read = wait_for(Duration::from_secs(60), || {
        let api = api.clone();
        async move {
            let cc = api.get("chat-prod").await.ok()?;
            let ready = cc.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")?.clone();
            ready.message.contains("its load could not be read").then_some(cc)
        }
    })
    .await;
    let cc = read.expect("Ready never named a gateway whose load could not be read");
    let status = cc.status.clone().expect("status");
    assert!(status.gateway.desired >= 3, "autoscale's minimum: {} gateways", status.gateway.desired);
    assert_eq!(cc.spec.gateway.autoscale.as_ref().map(|a| a.max_replicas), Some(20));
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").expect("Ready");
    assert!(
        ready.message.contains("chat-prod-gateway-0: its load could not be read"),
        "Ready says why: {}",
        ready.message
    );
    let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").expect("Degraded");
    assert_eq!(degraded.status, "False", "nothing is missing any more: {}", degraded.message);
    println!("{}: {} pods ready, not Ready: {}", cc.name_any(), status.gateway.ready, ready.message);
    assert_eq!(operator.errors(), 0, "reconcile errors");
    operator.stop().await;
    delete_namespace(&client, &namespace).await;
}
