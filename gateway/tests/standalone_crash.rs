//! A standalone gateway process killed with SIGKILL right after acking
//! loses nothing: every acked message is in the recipient's inbox and in
//! history once after a restart (the write-ahead log is replayed), and a
//! retried key is still recognised; the same when timed checkpoints fell
//! between the sends.

mod standalone;

use std::path::Path;

use serde_json::json;
use standalone::{Gateway, inbox, request, send, send_acked};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_a_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut gateway = Gateway::start(dir.path());
    let mut alice = gateway.connect("alice").await;
    // 90: within the per-connection burst of frames (100).
    let acked = send_acked(&mut alice, "bob", "m", 90).await;
    // Killed at once: no shutdown, no checkpoint; only the log holds the last writes.
    gateway.kill();

    let mut gateway = restarted_with_all_of(dir.path(), &acked).await;
    // One record per send (each waited for its ack), all after the last checkpoint.
    let replayed = gateway.replayed_records();
    assert!(replayed >= 90, "replayed {replayed} log records, not every send's");
    let mut alice = gateway.connect("alice").await;
    let ack = send(&mut alice, "bob", "m 89", "m89").await;
    assert_eq!((ack["duplicate"].clone(), ack["id"].clone()), (json!(true), json!(acked[89])), "{ack}");
    gateway.kill();
}

/// Killed between timed checkpoints: what the last checkpoint holds and what
/// only the log holds after it come back together, each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_a_sigkill_between_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut gateway = Gateway::start_checkpointing_every(dir.path(), 1);
    let mut alice = gateway.connect("alice").await;
    let mut acked = Vec::new();
    // Three rounds 1.2 s apart: the first write of a round is applied more
    // than a second after the last checkpoint, so a checkpoint follows it
    // and holds the rounds before; the rest of the last round is only logged.
    for round in 0..3 {
        if round > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
        }
        acked.extend(send_acked(&mut alice, "bob", &format!("r{round}-"), 30).await);
    }
    gateway.kill();
    let gateway = restarted_with_all_of(dir.path(), &acked).await;
    // One record per send here (one sender waiting for each ack): a timed
    // checkpoint held the first two rounds, so at most the last one replayed.
    let replayed = gateway.replayed_records();
    assert!(replayed < 30, "replayed {replayed} log records: no timed checkpoint was taken");
    gateway.kill();
}

/// Restarts the gateway on `root` and checks that bob's inbox holds exactly
/// `acked`, in order, and the conversation's history as many messages.
async fn restarted_with_all_of(root: &Path, acked: &[String]) -> Gateway {
    let mut gateway = Gateway::start(root);
    let mut bob = gateway.connect("bob").await;
    assert_eq!(inbox(&mut bob).await, acked, "every acked message once, in order, after the restart");
    let history = request(&mut bob, json!({"type": "history", "channel": "dm:alice:bob", "limit": 200}), "h").await;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(acked.len()), "{history}");
    gateway
}
