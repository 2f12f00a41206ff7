//! The admin API's state-changing requests against real gateway processes
//! (a private Redis, Cassandra): `POST` and `DELETE /v1/admin/drain` need
//! the admin token; a drain can be cancelled until it finishes, and the
//! clients it has not sent away stay; a finished drain, or the drain of a
//! gateway that is shutting down, cannot be cancelled.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{ADMIN_TOKEN, ClusterClient, ClusterSpec, GatewayProcess, PrivateRedis, http_get};
use serde_json::{Value, json};

const HELD: usize = 20;
const DRAIN: &str = "/v1/admin/drain";

fn bearer() -> String {
    format!("Bearer {ADMIN_TOKEN}")
}

async fn progress(gateway: &GatewayProcess) -> Value {
    let (status, body) = gateway.admin_get(DRAIN).await.expect("progress answers");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("progress JSON")
}

async fn readyz(gateway: &GatewayProcess) -> u16 {
    gateway.admin_get("/readyz").await.expect("readyz answers").0
}

/// Polls `check` every 100 ms until it holds; panics naming `what` after `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_needs_the_admin_token_and_a_running_drain_can_be_cancelled() {
    let redis = PrivateRedis::start().await;
    let spec = ClusterSpec::new(redis.url(), 30).await;
    let gateway = GatewayProcess::start(&spec, 0).await;
    let mut clients = Vec::new();
    for n in 0..HELD {
        clients.push(ClusterClient::connect(&gateway.url(), &format!("u{n}"), "phone").await);
    }

    // 1. Without the token, or with another, nothing happens.
    let wrong_scheme = format!("Basic {ADMIN_TOKEN}");
    let longer = format!("{}x", bearer());
    let refused: [(&str, Option<&str>); 6] = [
        ("POST", None),
        ("POST", Some("Bearer not-the-token")),
        ("POST", Some(&wrong_scheme)),
        ("POST", Some(&longer)),
        ("DELETE", None),
        ("DELETE", Some("Bearer not-the-token")),
    ];
    for (method, authorization) in refused {
        let (status, body) = gateway.admin_request(method, DRAIN, "{}", authorization).await.expect("an answer");
        assert_eq!(status, 401, "{method} with {authorization:?}: {body}");
        let body: Value = serde_json::from_str(&body).expect("a JSON error");
        assert_eq!(body["error"], "unauthorized", "{body}");
    }
    assert_eq!(progress(&gateway).await["draining"], false, "a refused request drained the gateway");
    assert_eq!(readyz(&gateway).await, 200);

    // 2. With it, a slow drain: one client a second.
    let body = r#"{"deadlineSeconds":60,"maxReconnectsPerSecond":1}"#;
    let (status, answer) = gateway.admin_request("POST", DRAIN, body, Some(&bearer())).await.expect("drain");
    assert_eq!(status, 202, "{answer}");
    assert_eq!(readyz(&gateway).await, 503, "draining is not ready");
    eventually("two clients sent away", Duration::from_secs(10), || async {
        progress(&gateway).await["moved"].as_u64().is_some_and(|m| m >= 2)
    })
    .await;

    // 3. Cancelled: ready and recommended again at once; whoever was not sent away stays.
    let (status, answer) = gateway.admin_request("DELETE", DRAIN, "", Some(&bearer())).await.expect("cancel");
    let cancelled_at = Instant::now();
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(answer["cancelled"], true, "{answer}");
    let moved = answer["moved"].as_u64().expect("moved");
    assert!((2..HELD as u64).contains(&moved), "{answer}");
    assert_eq!(readyz(&gateway).await, 200, "ready again once cancelled");
    assert_eq!(progress(&gateway).await["draining"], false);
    let port = gateway.ws_port;
    eventually("discovery recommends it again", Duration::from_secs(3), || async {
        let Some((200, body)) = http_get(port, "/v1/discovery").await else { return false };
        serde_json::from_str::<Value>(&body)
            .is_ok_and(|d| d["recommended"].as_str().is_some_and(|url| url.contains(&format!(":{port}/"))))
    })
    .await;
    let recommended_in = cancelled_at.elapsed();
    let newcomer = ClusterClient::try_connect(&gateway.url(), "newcomer", "phone").await;
    assert!(newcomer.is_ok(), "a cancelled drain still refuses connections: {:?}", newcomer.err());

    // Three seconds later (three more at the drain's pace): exactly the
    // clients sent away before the cancel got a `reconnect` frame.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut told_to_move = 0;
    let mut stayed = Vec::new();
    for client in &mut clients {
        client.drain_for(Duration::from_millis(50)).await;
        let reconnects = client.take("reconnect");
        if reconnects.is_empty() {
            stayed.push(client);
        } else {
            told_to_move += 1;
        }
    }
    assert_eq!(told_to_move, moved, "clients sent away vs the count at the cancel");
    for client in stayed {
        assert!(client.closed.is_none(), "{} was disconnected after the cancel", client.user);
        let reply = client.request(json!({"type": "sync", "after": "0", "limit": 1})).await;
        assert_eq!(reply["type"], "synced", "{} is served after the cancel: {reply}", client.user);
    }
    let (status, answer) = gateway.admin_request("DELETE", DRAIN, "", Some(&bearer())).await.expect("again");
    assert_eq!(
        (status, serde_json::from_str::<Value>(&answer).expect("JSON")["cancelled"].clone()),
        (200, json!(false))
    );

    // 4. A drain that finished stays finished.
    let body = r#"{"deadlineSeconds":1,"maxReconnectsPerSecond":100}"#;
    let (status, answer) = gateway.admin_request("POST", DRAIN, body, Some(&bearer())).await.expect("drain");
    assert_eq!(status, 202, "a cancelled drain can be started again: {answer}");
    eventually("the second drain finished", Duration::from_secs(10), || async {
        progress(&gateway).await["finished"] == true
    })
    .await;
    let (status, answer) = gateway.admin_request("DELETE", DRAIN, "", Some(&bearer())).await.expect("cancel");
    assert_eq!(status, 409, "{answer}");
    assert!(answer.contains(r#""error":"drain_finished""#), "{answer}");
    assert_eq!(readyz(&gateway).await, 503, "still drained");

    // 5. A gateway draining because it stops (SIGTERM) cannot be kept.
    let mut stopping = GatewayProcess::start(&spec, 1).await;
    let mut held = Vec::new();
    for n in 0..5 {
        held.push(ClusterClient::connect(&stopping.url(), &format!("s{n}"), "phone").await);
    }
    stopping.terminate();
    eventually("the SIGTERM drain started", Duration::from_secs(5), || async {
        stopping.admin_get("/readyz").await.is_some_and(|(status, _)| status == 503)
    })
    .await;
    let (status, answer) = stopping.admin_request("DELETE", DRAIN, "", Some(&bearer())).await.expect("cancel");
    assert_eq!(status, 409, "{answer}");
    assert!(answer.contains(r#""error":"stopping""#), "{answer}");
    let exited = stopping.wait_exit(Duration::from_secs(30)).await;
    assert!(exited.is_some_and(|s| s.success()), "the stopping gateway drains and exits: {exited:?}");
    println!(
        "cancelled a drain after {moved} of {HELD} clients were sent away (at 1/s); {} stayed, served 3 s later; \
         ready at once, recommended by discovery {recommended_in:?} after the DELETE",
        HELD as u64 - moved,
    );
    drop(redis);
}

/// A gateway whose config names no admin token refuses every drain request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_token_the_gateway_cannot_be_drained_through_the_api() {
    let redis = PrivateRedis::start().await;
    let spec = ClusterSpec::new(redis.url(), 30).await;
    std::fs::write(spec.dir.path().join("admin-token"), "").expect("empty the token file");
    let refused = GatewayProcess::expect_refused(&spec, 0, "empty-token").await;
    assert!(refused.contains("admin token"), "the reason is named: {refused}");

    let gateway = GatewayProcess::start_without_admin_token(&spec, 1).await;
    for method in ["POST", "DELETE"] {
        for authorization in [None, Some(bearer())] {
            let answer = gateway.admin_request(method, DRAIN, "{}", authorization.as_deref()).await;
            let (status, body) = answer.expect("an answer");
            assert_eq!(status, 403, "{method} with {authorization:?}: {body}");
            assert!(body.contains(r#""error":"admin_disabled""#), "{body}");
        }
    }
    assert_eq!(readyz(&gateway).await, 200);
    assert_eq!(progress(&gateway).await["draining"], false);
    drop(redis);
}
