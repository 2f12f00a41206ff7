//! The Helm chart installs on the local control plane: lint, install (the
//! operator Deployment becomes available on kwok's nodes), uninstall.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::Api;
use kubechat_e2e::cluster::{delete_namespace, wait_for};
use kubechat_e2e::components::connect_kube;
use kubechat_e2e::tools::run_tool;
use kubechat_e2e::unique_name;

fn chart_dir() -> String {
    format!("{}/charts/kubechat", kubechat_e2e::repo_root().display())
}

#[tokio::test]
async fn the_chart_lints_installs_and_uninstalls() {
    let client = connect_kube().await;
    let lint = run_tool("helm", &["lint", &chart_dir()]);
    assert!(lint.status.success(), "helm lint: {}{}", lint.stdout, lint.stderr);

    let namespace = unique_name("helm");
    // Its own release name: the ClusterRole is named after it, and other
    // suites install the chart as `kc` meanwhile.
    let release = "kc-helm";
    let install = run_tool(
        "helm",
        &[
            "install",
            release,
            &chart_dir(),
            "--namespace",
            &namespace,
            "--create-namespace",
            "--wait",
            "--timeout",
            "90s",
        ],
    );
    assert!(install.status.success(), "helm install: {}{}", install.stdout, install.stderr);

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let available = wait_for(Duration::from_secs(30), || {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get("kc-helm-operator").await.ok()?;
            (d.status?.available_replicas? == 2).then_some(())
        }
    })
    .await;
    assert!(available.is_some(), "the operator Deployment did not get 2 available replicas");
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let role = roles.get("kc-helm-operator").await.expect("the operator's ClusterRole");
    let rules = role.rules.unwrap_or_default();
    assert!(
        rules.iter().all(|r| !r.verbs.iter().any(|v| v == "*") && !r.resources.iter().flatten().any(|x| x == "*")),
        "least privilege: no wildcard rules"
    );

    let uninstall = run_tool("helm", &["uninstall", release, "--namespace", &namespace, "--wait"]);
    assert!(uninstall.status.success(), "helm uninstall: {}", uninstall.stderr);
    assert!(roles.get_opt("kc-helm-operator").await.expect("get ClusterRole").is_none());
    delete_namespace(&client, &namespace).await;
}
