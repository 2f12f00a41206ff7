//! The embedded (redb) store against a real database in a temporary folder.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use kubechat_gateway::ids::IdGenerator;
use kubechat_gateway::store::embedded::EmbeddedStore;
use kubechat_gateway::store::{Delivery, Group, InboxEntry, Message, Page, Reservation, Store, StoreError};
use tempfile::TempDir;

fn open() -> (TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("open store");
    (dir, store)
}

fn message(id: u64, channel: &str, sender: &str, text: &str) -> Message {
    Message {
        id,
        channel: channel.into(),
        sender: sender.into(),
        sender_device: format!("{sender}-phone"),
        text: text.into(),
        created_at_ms: 1_767_225_600_000 + i64::try_from(id % 1_000_000).unwrap_or(0),
    }
}

fn delivery(user: &str, position: u64) -> Delivery {
    Delivery { user: user.into(), position }
}

fn ids(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_to_one_message_round_trip() {
    let (_dir, store) = open();
    let idgen = IdGenerator::new(1, 0);
    let (id, alice_pos, bob_pos) = (idgen.next_id(), idgen.next_id(), idgen.next_id());
    let m = message(id, "d:alice:bob", "alice", "hi bob");

    store.write_message(&m, &[delivery("alice", alice_pos), delivery("bob", bob_pos)]).await.expect("write");

    assert_eq!(
        store.inbox_after("alice", 0, 10).await.expect("alice inbox"),
        vec![InboxEntry { position: alice_pos, message: m.clone() }]
    );
    assert_eq!(
        store.inbox_after("bob", 0, 10).await.expect("bob inbox"),
        vec![InboxEntry { position: bob_pos, message: m.clone() }]
    );
    assert!(store.inbox_after("bob", bob_pos, 10).await.expect("bob after").is_empty());
    assert!(store.inbox_after("carol", 0, 10).await.expect("carol inbox").is_empty());
    assert_eq!(store.history("d:alice:bob", Page::Latest, 10).await.expect("history"), vec![m.clone()]);
    assert_eq!(store.message("d:alice:bob", id).await.expect("lookup"), Some(m));
    assert_eq!(store.message("d:alice:bob", id + 1).await.expect("lookup other id"), None);
    assert_eq!(store.message("d:alice:carol", id).await.expect("lookup other channel"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reservations_and_message_writes_are_idempotent() {
    let (_dir, store) = open();
    let store = Arc::new(store);

    assert_eq!(store.reserve_send("alice", "k1", 10, "d:alice:bob").await.expect("reserve"), Reservation::New);
    assert_eq!(
        store.reserve_send("alice", "k1", 11, "g:other").await.expect("reserve again"),
        Reservation::Existing { id: 10, channel: "d:alice:bob".into() }
    );
    // Keys are per sender.
    assert_eq!(store.reserve_send("bob", "k1", 12, "d:alice:bob").await.expect("other sender"), Reservation::New);

    // Racing reservations of one key (likely in one group commit): exactly one wins.
    let racers: Vec<_> = (0..20u64)
        .map(|candidate| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { (candidate, store.reserve_send("carol", "race", candidate, "g:1").await) })
        })
        .collect();
    let mut winners = Vec::new();
    let mut seen = Vec::new();
    for racer in racers {
        let (candidate, result) = racer.await.expect("join");
        match result.expect("reserve race") {
            Reservation::New => winners.push(candidate),
            Reservation::Existing { id, channel } => {
                assert_eq!(channel, "g:1");
                seen.push(id);
            }
        }
    }
    assert_eq!(winners.len(), 1, "one New among {winners:?}");
    assert!(seen.iter().all(|id| *id == winners[0]), "{seen:?} vs winner {winners:?}");

    let m = message(10, "d:alice:bob", "alice", "once");
    let deliveries = [delivery("alice", 100), delivery("bob", 101)];
    store.write_message(&m, &deliveries).await.expect("write");
    store.write_message(&m, &deliveries).await.expect("write again");
    assert_eq!(store.history("d:alice:bob", Page::Latest, 10).await.expect("history"), vec![m.clone()]);
    assert_eq!(store.inbox_after("bob", 0, 10).await.expect("inbox").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_pages_cover_every_entry_once_in_order() {
    let (_dir, store) = open();
    let idgen = IdGenerator::new(2, 0);
    let mut positions = Vec::new();
    for i in 0..250 {
        let id = idgen.next_id();
        let position = idgen.next_id();
        positions.push(position);
        let m = message(id, "g:1", "alice", &format!("m{i}"));
        // Users whose names extend or precede "u" must not leak into its inbox.
        let others =
            [delivery("uu", idgen.next_id()), delivery("t", idgen.next_id()), delivery("u\u{0}", idgen.next_id())];
        let mut all = vec![delivery("u", position)];
        all.extend(others);
        store.write_message(&m, &all).await.expect("write");
    }

    let mut cursor = 0;
    let mut got = Vec::new();
    let mut pages = Vec::new();
    // Bounded, so a cursor that does not advance fails instead of hanging.
    for _ in 0..10 {
        let page = store.inbox_after("u", cursor, 100).await.expect("page");
        pages.push(page.len());
        let Some(last) = page.last() else { break };
        cursor = last.position;
        got.extend(page.iter().map(|e| e.position));
        assert!(page.iter().all(|e| e.message.channel == "g:1"));
    }
    assert_eq!(pages, vec![100, 100, 50, 0]);
    assert_eq!(got, positions, "every position once, ascending");
    assert_eq!(store.inbox_after("u", 0, 0).await.expect("limit 0"), vec![]);
    assert_eq!(store.inbox_after("u", u64::MAX, 10).await.expect("after max"), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_both_ways() {
    let (_dir, store) = open();
    let idgen = IdGenerator::new(3, 0);
    let mut written = Vec::new();
    for i in 0..120 {
        let m = message(idgen.next_id(), "g:1", "alice", &format!("m{i}"));
        store.write_message(&m, &[]).await.expect("write");
        written.push(m.id);
        // Neighbouring channels (by key order) must stay out of g:1's pages.
        for other in ["g:10", "g:0", "g:"] {
            store.write_message(&message(idgen.next_id(), other, "bob", "noise"), &[]).await.expect("write noise");
        }
    }
    let mut newest_first = written.clone();
    newest_first.reverse();

    let mut got = ids(&store.history("g:1", Page::Latest, 50).await.expect("latest"));
    assert_eq!(got.len(), 50);
    let mut pages = vec![got.len()];
    for _ in 0..10 {
        let before = *got.last().expect("non-empty");
        let page = ids(&store.history("g:1", Page::Before(before), 50).await.expect("before"));
        pages.push(page.len());
        if page.is_empty() {
            break;
        }
        got.extend(page);
    }
    assert_eq!(pages, vec![50, 50, 20, 0]);
    assert_eq!(got, newest_first);

    let after = ids(&store.history("g:1", Page::After(written[59]), 1000).await.expect("after"));
    assert_eq!(after, written[60..].to_vec());
    let first = ids(&store.history("g:1", Page::After(0), 10).await.expect("after 0"));
    assert_eq!(first, written[..10].to_vec());
    assert!(store.history("g:1", Page::Before(written[0]), 10).await.expect("before first").is_empty());
    assert!(store.history("g:1", Page::After(written[119]), 10).await.expect("after last").is_empty());
    assert!(store.history("g:2", Page::Latest, 10).await.expect("empty channel").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_members_and_channels() {
    let (_dir, store) = open();
    let group = Group { id: "g:1".into(), name: "team".into(), owner: "user-050".into(), created_at_ms: 1 };
    // Written in a scrambled order; read back sorted.
    let members: Vec<String> = (0..100).map(|i| format!("user-{:03}", (i * 37) % 100)).collect();
    store.create_group(&group, &members).await.expect("create");
    let other = Group { id: "g:10".into(), name: "other".into(), owner: "zed".into(), created_at_ms: 2 };
    store.create_group(&other, &["zed".to_string(), "user-001".to_string()]).await.expect("create other");

    let mut sorted = members.clone();
    sorted.sort();
    assert_eq!(store.members("g:1").await.expect("members"), sorted);
    assert_eq!(store.group("g:1").await.expect("group"), Some(group));
    assert_eq!(store.group("g:2").await.expect("missing group"), None);

    store.add_member("g:1", "zed").await.expect("add");
    store.remove_member("g:1", "user-000").await.expect("remove");
    let members = store.members("g:1").await.expect("members after");
    assert_eq!(members.len(), 100);
    assert!(members.contains(&"zed".to_string()) && !members.contains(&"user-000".to_string()));
    assert_eq!(store.members("g:10").await.expect("other members"), vec!["user-001", "zed"]);

    assert_eq!(store.channels_of("user-000").await.expect("removed user"), Vec::<String>::new());
    store.add_direct_channel("user-001", "d:user-001:zed").await.expect("direct");
    store.add_direct_channel("zed", "d:user-001:zed").await.expect("direct");
    assert_eq!(store.channels_of("user-001").await.expect("channels"), vec!["d:user-001:zed", "g:1", "g:10"]);
    assert_eq!(store.channels_of("zed").await.expect("channels"), vec!["d:user-001:zed", "g:1", "g:10"]);
    store.remove_member("g:10", "zed").await.expect("remove from other");
    assert_eq!(store.channels_of("zed").await.expect("channels"), vec!["d:user-001:zed", "g:1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = message(500, "g:1", "alice", "persisted");
    {
        let store = EmbeddedStore::open(dir.path()).expect("open");
        assert_eq!(store.max_id().await.expect("max id of empty store"), 0);
        store
            .create_group(
                &Group { id: "g:1".into(), name: "n".into(), owner: "alice".into(), created_at_ms: 3 },
                &["alice".into(), "bob".into()],
            )
            .await
            .expect("group");
        store.write_message(&m, &[delivery("bob", 7)]).await.expect("write");
        store.write_message(&message(90, "g:2", "bob", "older"), &[]).await.expect("write older");
        assert_eq!(store.reserve_send("alice", "k", 500, "g:1").await.expect("reserve"), Reservation::New);
        assert_eq!(store.enqueue_push(serde_json::json!({"to": "bob"})).await.expect("push"), 1);
        assert_eq!(store.max_id().await.expect("max id"), 500);

        // While it is open the folder is locked, so a second store cannot corrupt it.
        match EmbeddedStore::open(dir.path()) {
            Err(StoreError::Unavailable(_)) => {}
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("opened a folder that is in use"),
        }
    }
    // Dropping stopped the writer and released the file: reopening works at once.
    let store = EmbeddedStore::open(dir.path()).expect("reopen");
    assert_eq!(store.message("g:1", 500).await.expect("message"), Some(m.clone()));
    assert_eq!(store.inbox_after("bob", 0, 10).await.expect("inbox"), vec![InboxEntry { position: 7, message: m }]);
    assert_eq!(store.members("g:1").await.expect("members"), vec!["alice", "bob"]);
    assert_eq!(
        store.reserve_send("alice", "k", 501, "g:1").await.expect("reserve"),
        Reservation::Existing { id: 500, channel: "g:1".into() }
    );
    assert_eq!(store.max_id().await.expect("max id"), 500);
    assert_eq!(store.push_jobs(10).await.expect("jobs"), vec![(1, serde_json::json!({"to": "bob"}))]);
    assert_eq!(store.enqueue_push(serde_json::json!(2)).await.expect("push after reopen"), 2);
}

/// Writes `tasks × per_task` messages (2 deliveries each) and returns msgs/s
/// after checking every one is readable.
async fn write_concurrently(store: &Arc<EmbeddedStore>, tasks: usize, per_task: usize, tag: &str) -> f64 {
    let idgen = Arc::new(IdGenerator::new(9, 0));
    let started = Instant::now();
    let writers: Vec<_> = (0..tasks)
        .map(|t| {
            let (store, idgen) = (Arc::clone(store), Arc::clone(&idgen));
            let channel = format!("d:{tag}-{t}:peer");
            let user = format!("{tag}-{t}");
            tokio::spawn(async move {
                for i in 0..per_task {
                    let m = message(idgen.next_id(), &channel, &user, &format!("hello {i}"));
                    let deliveries = [delivery(&user, idgen.next_id()), delivery("peer", idgen.next_id())];
                    store.write_message(&m, &deliveries).await?;
                }
                Ok::<_, StoreError>(())
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("join").expect("every write succeeds");
    }
    let rate = (tasks * per_task) as f64 / started.elapsed().as_secs_f64();

    let mut all_ids = HashSet::new();
    for t in 0..tasks {
        let history = store.history(&format!("d:{tag}-{t}:peer"), Page::Latest, per_task + 1).await.expect("history");
        assert_eq!(history.len(), per_task);
        all_ids.extend(ids(&history));
        let inbox = store.inbox_after(&format!("{tag}-{t}"), 0, per_task + 1).await.expect("inbox");
        assert_eq!(inbox.len(), per_task);
    }
    assert_eq!(all_ids.len(), tasks * per_task);
    rate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_all_land_through_group_commit() {
    let (_dir, store) = open();
    let store = Arc::new(store);
    let single = write_concurrently(&store, 1, 300, "solo").await;
    let concurrent = write_concurrently(&store, 50, 100, "many").await;
    println!(
        "embedded store durable writes: 1 writer task {single:.0} msgs/s, 50 concurrent tasks {concurrent:.0} msgs/s"
    );
    assert_eq!(store.inbox_after("peer", 0, 10_000).await.expect("peer inbox").len(), 300 + 50 * 100);
    assert!(store.max_id().await.expect("max id") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_queue_in_order_until_acked() {
    let (_dir, store) = open();
    let jobs = [serde_json::json!({"n": 1}), serde_json::json!({"n": 2}), serde_json::json!({"n": 3})];
    let mut seqs = Vec::new();
    for job in &jobs {
        seqs.push(store.enqueue_push(job.clone()).await.expect("enqueue"));
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let queued = store.push_jobs(10).await.expect("jobs");
    assert_eq!(queued, seqs.iter().copied().zip(jobs.iter().cloned()).collect::<Vec<_>>());
    assert_eq!(store.push_jobs(2).await.expect("limited"), queued[..2].to_vec());

    store.ack_push(seqs[1]).await.expect("ack middle");
    assert_eq!(store.push_jobs(10).await.expect("jobs"), vec![queued[0].clone(), queued[2].clone()]);
    store.ack_push(seqs[0]).await.expect("ack");
    store.ack_push(seqs[2]).await.expect("ack");
    store.ack_push(seqs[2]).await.expect("acking twice is harmless");
    assert!(store.push_jobs(10).await.expect("empty").is_empty());

    // Sequence numbers never repeat, so a late duplicate ack cannot remove a new job.
    let next = store.enqueue_push(serde_json::json!("later")).await.expect("enqueue later");
    assert!(next > seqs[2]);
}
