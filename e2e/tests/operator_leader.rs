//! Leader election between real operator processes against the local
//! control plane: a leader paused with SIGSTOP (so it neither renews nor
//! notices time pass) must not write anything once a standby took over, and
//! must stop on its own when resumed. Every request each operator sends goes
//! through an [`ApiRecorder`], so "did not write" is observed from outside it.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kubechat_crds::ChatCluster;
use kubechat_e2e::cluster::{create_namespace, delete_namespace, install_crd, wait_for, with_external_backends};
use kubechat_e2e::components::connect_kube;
use kubechat_e2e::operator_process::{ApiCall, ApiRecorder, OperatorProcess};
use serde_json::json;

/// Short, so the test takes seconds; the operator renews every third of it.
const LEASE_SECONDS: u64 = 4;
const LEASE: Duration = Duration::from_secs(LEASE_SECONDS);
const LEASE_NAME: &str = "kubechat-operator";

async fn holder(client: &Client, namespace: &str) -> Option<String> {
    let lease = Api::<Lease>::namespaced(client.clone(), namespace).get_opt(LEASE_NAME).await.ok()??;
    lease.spec?.holder_identity
}

async fn wait_for_holder(client: &Client, namespace: &str, identity: &str, timeout: Duration) -> bool {
    wait_for(timeout, || async move { (holder(client, namespace).await.as_deref() == Some(identity)).then_some(()) })
        .await
        .is_some()
}

/// Waits until the gateway StatefulSet asks for `replicas`: only a leader applies that.
async fn wait_for_gateways(client: &Client, namespace: &str, name: &str, replicas: i32, timeout: Duration) -> bool {
    let api = Api::<StatefulSet>::namespaced(client.clone(), namespace);
    let name = format!("{name}-gateway");
    wait_for(timeout, || {
        let (api, name) = (&api, &name);
        async move {
            let sts = api.get_opt(name).await.ok()??;
            (sts.spec.replicas == Some(replicas)).then_some(())
        }
    })
    .await
    .is_some()
}

async fn set_gateways(client: &Client, namespace: &str, name: &str, replicas: i32) {
    Api::<ChatCluster>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"gateway": {"replicas": replicas}}})))
        .await
        .unwrap_or_else(|e| panic!("set {name}'s gateway replicas to {replicas}: {e}"));
}

fn describe(calls: &[&ApiCall], since: Instant) -> String {
    calls
        .iter()
        .map(|c| format!("{:>+6} ms {} {}", c.at.saturating_duration_since(since).as_millis(), c.method, c.path))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn a_paused_leader_writes_nothing_after_a_standby_took_over() {
    let client = connect_kube().await;
    install_crd(&client).await;
    let namespace = create_namespace(&client, "op-fence").await;
    let dir = tempfile::tempdir().expect("a temporary folder");

    let (recorder_a, recorder_b) = (ApiRecorder::start(client.clone()).await, ApiRecorder::start(client.clone()).await);
    let kubeconfig_a = recorder_a.kubeconfig(dir.path(), "a");
    let mut a = OperatorProcess::start(&kubeconfig_a, &namespace, "a", LEASE_SECONDS, dir.path());
    assert!(
        wait_for_holder(&client, &namespace, "a", Duration::from_secs(30)).await,
        "operator a never took the Lease; its log:\n{}",
        a.log()
    );
    let kubeconfig_b = recorder_b.kubeconfig(dir.path(), "b");
    let mut b = OperatorProcess::start(&kubeconfig_b, &namespace, "b", LEASE_SECONDS, dir.path());

    Api::<ChatCluster>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &with_external_backends("fenced", 1))
        .await
        .expect("create the ChatCluster");
    assert!(
        wait_for_gateways(&client, &namespace, "fenced", 1, Duration::from_secs(30)).await,
        "the leader did not reconcile; a's log:\n{}",
        a.log()
    );
    // Let b stand by for a few of its rounds: it must not take a live Lease.
    tokio::time::sleep(LEASE).await;
    assert_eq!(holder(&client, &namespace).await.as_deref(), Some("a"), "b took the Lease from a live leader");

    let paused = Instant::now();
    a.pause();
    assert!(
        wait_for_holder(&client, &namespace, "b", LEASE * 4).await,
        "b did not take over from the paused leader; b's log:\n{}",
        b.log()
    );
    // b's first Lease write is its takeover: the moment from which a must be silent.
    let b_calls = recorder_b.calls();
    let took_over = b_calls.iter().find(|c| c.is_write() && c.is_lease()).map(|c| c.at).expect("b's takeover write");
    let standby_writes: Vec<&ApiCall> = b_calls.iter().filter(|c| c.is_write() && c.at < took_over).collect();
    assert!(standby_writes.is_empty(), "b wrote while standing by:\n{}", describe(&standby_writes, paused));
    // The Lease runs from a's last renewal, which may precede the pause.
    let renewed = recorder_a
        .calls()
        .iter()
        .filter(|c| c.is_write() && c.is_lease() && c.at < paused)
        .map(|c| c.at)
        .next_back()
        .expect("a renewed the Lease");
    let takeover = took_over.saturating_duration_since(paused);
    let expiry = took_over.saturating_duration_since(renewed);
    println!(
        "takeover: {} ms after the leader was paused, {} ms after its last renewal (lease {LEASE_SECONDS} s)",
        takeover.as_millis(),
        expiry.as_millis()
    );
    assert!(expiry >= LEASE, "b took over {expiry:?} after a's last renewal, before the Lease could expire");

    // Work that waits for a while it is paused: its watches deliver this the
    // moment it resumes, before its election loop has run again.
    set_gateways(&client, &namespace, "fenced", 2).await;
    assert!(
        wait_for_gateways(&client, &namespace, "fenced", 2, Duration::from_secs(20)).await,
        "the new leader did not apply the spec change; b's log:\n{}",
        b.log()
    );

    let resumed = Instant::now();
    a.resume();
    let exited = a.wait_exit(LEASE).await;
    let stopped_after = resumed.elapsed();
    let log_a = a.log();
    assert!(exited.is_some(), "the old leader still runs {stopped_after:?} after resuming; its log:\n{log_a}");
    println!(
        "old leader stopped {} ms after it resumed; writes it refused itself: {}",
        stopped_after.as_millis(),
        log_a.matches("not the leader").count()
    );

    // The new leader still acts.
    set_gateways(&client, &namespace, "fenced", 3).await;
    assert!(
        wait_for_gateways(&client, &namespace, "fenced", 3, Duration::from_secs(20)).await,
        "the new leader did not apply a later spec change; b's log:\n{}",
        b.log()
    );

    let a_calls = recorder_a.calls();
    let late: Vec<&ApiCall> = a_calls.iter().filter(|c| c.is_write() && !c.is_lease() && c.at >= took_over).collect();
    assert!(
        late.is_empty(),
        "the old leader wrote after b took over (ms after the takeover; a resumed at +{} ms):\n{}",
        resumed.saturating_duration_since(took_over).as_millis(),
        describe(&late, took_over)
    );
    let a_writes = a_calls.iter().filter(|c| c.is_write() && !c.is_lease()).count();
    assert!(a_writes > 0, "the recorder saw no write from a at all: it would not see late ones either");

    // And it says why it stopped.
    assert!(log_a.contains("lost leadership"), "the old leader did not log losing leadership:\n{log_a}");

    let status = b.terminate(Duration::from_secs(30)).await;
    assert!(status.is_some_and(|s| s.success()), "b did not stop cleanly: {status:?}\n{}", b.log());
    delete_namespace(&client, &namespace).await;
}
