//! The Grafana dashboard (`charts/kubechat/dashboards/kubechat.json`) asks
//! only for metrics that exist: every `kubechat_gateway_*` name it queries is
//! in the `/metrics` of a real gateway that carried a message and drained,
//! and every `kubechat_operator_*` name is one the operator registers (its
//! labelled counters have no samples until something happens, such as an
//! error, so they are checked against the registered families).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use kubechat_gateway::app::{self, BrokerSetup, GatewayOptions};
use kubechat_gateway::store::embedded::EmbeddedStore;
use kubechat_gateway::transport::auth::Authenticator;
use kubechat_gateway::transport::drain::{Drain, DrainParams, Origin};
use prometheus::core::Collector;
use tokio_tungstenite::tungstenite::Message;

const DASHBOARD: &str = include_str!("../../charts/kubechat/dashboards/kubechat.json");
const KEY: &[u8] = b"dashboard-test-signing-key-0123456789";

/// Every metric name the dashboard's queries mention.
fn queried_names() -> BTreeSet<String> {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut names = BTreeSet::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty(), "a dashboard without panels");
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} queries nothing", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(at) = rest.find("kubechat_") {
                let tail = &rest[at..];
                let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
                names.insert(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
    }
    names
}

/// A histogram's series are `<name>_bucket`, `_sum`, `_count`.
fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name)
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_exists() {
    let names = queried_names();
    assert!(
        names.iter().any(|n| n.starts_with("kubechat_gateway_"))
            && names.iter().any(|n| n.starts_with("kubechat_operator_"))
    );

    // A real gateway that stores and delivers a message, then drains.
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(EmbeddedStore::open(dir.path()).expect("embedded store"));
    let options = GatewayOptions { listen: "127.0.0.1:0".parse().expect("addr"), ..GatewayOptions::default() };
    let auth = Authenticator::new(KEY).expect("key");
    let running = app::start(store.clone(), Arc::new(store), BrokerSetup::Local, auth, 0, options)
        .await
        .expect("start a gateway");
    let minter = Authenticator::new(KEY).expect("key");
    let token = |user: &str| minter.mint(user, "phone", 600).expect("token");
    let url = running.ws_url();
    let (mut alice, _) =
        tokio_tungstenite::connect_async(format!("{url}?token={}", token("alice"))).await.expect("alice connects");
    let (_bob, _) =
        tokio_tungstenite::connect_async(format!("{url}?token={}", token("bob"))).await.expect("bob connects");
    let send = r#"{"type":"send","req":"1","to":{"user":"bob"},"text":"hi","key":"k1"}"#;
    alice.send(Message::Text(send.into())).await.expect("send");
    let metrics = loop {
        let metrics = get(running.addr, "/metrics").await;
        if metrics.contains("kubechat_gateway_acks_total{result=\"ok\"} 1") {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let params = DrainParams { deadline: Duration::from_secs(2), max_reconnects_per_second: 100 };
    Drain::start(&running.gateway, params, Origin::Shutdown);
    running.gateway.drain.finished().await;
    let drained = get(running.addr, "/metrics").await;
    for name in names.iter().filter(|n| n.starts_with("kubechat_gateway_")) {
        let present = |text: &str| text.lines().any(|l| !l.starts_with('#') && l.starts_with(name.as_str()));
        assert!(
            present(&metrics) || present(&drained),
            "the dashboard queries {name}, which the gateway does not export"
        );
    }

    // The operator's registered families.
    let operator = kubechat_operator::metrics::Metrics::new();
    let collectors: Vec<Box<&dyn Collector>> = vec![
        Box::new(&operator.reconciles),
        Box::new(&operator.errors),
        Box::new(&operator.duration),
        Box::new(&operator.objects_applied),
        Box::new(&operator.status_updates),
        Box::new(&operator.writes),
        Box::new(&operator.leader),
        Box::new(&operator.polls),
        Box::new(&operator.endpoint_writes),
    ];
    let registered: BTreeSet<String> = collectors
        .iter()
        .flat_map(|c| c.desc().into_iter().map(|d| format!("kubechat_operator_{}", d.fq_name)))
        .collect();
    for name in names.iter().filter(|n| n.starts_with("kubechat_operator_")) {
        assert!(
            registered.contains(family(name)),
            "the dashboard queries {name}; the operator registers {registered:?}"
        );
    }
    running.stop(Duration::from_secs(2)).await;
}
