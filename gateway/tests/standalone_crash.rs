//! A standalone gateway process killed with SIGKILL right after acking
//! loses nothing: every acked message is in the recipient's inbox and in
//! history once after a restart (the write-ahead log is replayed), and a
//! retried key is still recognised; the same when timed checkpoints fell
//! between the sends.

mod standalone;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use standalone::{Gateway, inbox, request, send, send_acked};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_a_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut gateway = Gateway::start_without_timed_checkpoints(dir.path());
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
    let mut gateway = Gateway::start_checkpointing_every(dir.path(), 3);
    let mut alice = gateway.connect("alice").await;
    // One record per send (one sender waiting for each ack): records 1-30.
    let mut acked = send_acked(&mut alice, "bob", "r0-", 30).await;
    // A timed checkpoint holds them within 3 s (no write needs to follow),
    // then the next 30 go in well before the one after it: only the log
    // holds those.
    let started = Instant::now();
    while gateway.checkpointed_through() < 30 {
        assert!(started.elapsed() < Duration::from_secs(20), "no checkpoint of the first 30 records in 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    acked.extend(send_acked(&mut alice, "bob", "r1-", 30).await);
    gateway.kill();
    let gateway = restarted_with_all_of(dir.path(), &acked).await;
    assert_eq!(gateway.replayed_records(), 30, "the records after the checkpoint, each replayed once");
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
