//! [`ScyllaStore`] against a real CQL node (Cassandra 5 locally, started by
//! `e2e/local/cassandra.sh start`; address in `KUBECHAT_CQL_NODE`, default
//! `127.0.0.1:19042`). Every test works in its own random keyspace (RF 1)
//! and drops it at the end, so runs never see each other's data.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kubechat_gateway::ids::{self, IdGenerator};
use kubechat_gateway::store::scylla::{ScyllaConfig, ScyllaStore};
use kubechat_gateway::store::{BUCKET_MS, Delivery, Group, Message, Page, Reservation, Store, StoreError, bucket_of};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;

fn cql_node() -> String {
    std::env::var("KUBECHAT_CQL_NODE").unwrap_or_else(|_| "127.0.0.1:19042".to_owned())
}

/// Fails the test (rather than skipping it) when no CQL node listens.
async fn require_cql() -> String {
    let node = cql_node();
    let reachable =
        matches!(tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(&node)).await, Ok(Ok(_)));
    assert!(reachable, "Cassandra (CQL) is not reachable at {node}: start it with `e2e/local/cassandra.sh start`");
    node
}

fn random_keyspace() -> String {
    let n = getrandom::u64().expect("OS random numbers");
    format!("kc_test_{n:016x}")
}

fn config(node: &str, keyspace: &str) -> ScyllaConfig {
    ScyllaConfig {
        contact_points: vec![node.to_owned()],
        keyspace: keyspace.to_owned(),
        replication_factor: 1,
        request_timeout: Duration::from_secs(30),
        ..ScyllaConfig::default()
    }
}

async fn admin_session(node: &str) -> Session {
    SessionBuilder::new().known_node(node).build().await.expect("admin CQL session")
}

/// Runs `body` with a fresh keyspace name, then drops the keyspace whether
/// or not the body panicked (and re-raises the panic).
async fn with_keyspace<F, Fut>(body: F)
where
    F: FnOnce(String, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let node = require_cql().await;
    let keyspace = random_keyspace();
    let outcome = tokio::spawn(body(node.clone(), keyspace.clone())).await;
    let admin = admin_session(&node).await;
    admin.query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ()).await.expect("drop test keyspace");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn connect(node: &str, keyspace: &str) -> ScyllaStore {
    ScyllaStore::connect(config(node, keyspace)).await.expect("connect to CQL")
}

fn message(id: u64, channel: &str, sender: &str, text: &str) -> Message {
    Message {
        id,
        channel: channel.to_owned(),
        sender: sender.to_owned(),
        sender_device: format!("{sender}-phone"),
        text: text.to_owned(),
        created_at_ms: ids::timestamp_ms(id),
    }
}

fn delivery(user: &str, position: u64) -> Delivery {
    Delivery { user: user.to_owned(), position }
}

/// `n` increasing ids spread evenly over the last `months` buckets, so
/// scans have to cross bucket boundaries.
fn ids_over_months(n: usize, months: i64) -> Vec<u64> {
    let now = ids::now_ms() - 60_000;
    let start = (now - months * BUCKET_MS).max(ids::EPOCH_MS);
    let step = (now - start) / i64::try_from(n).expect("small n");
    (0..n).map(|i| ids::first_id_at(start + step * i64::try_from(i).expect("small n")) | 7).collect()
}

#[tokio::test]
async fn direct_message_round_trip() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let idgen = IdGenerator::new(1, 0);
        let channel = "d:alice:bob";
        let msg = message(idgen.next_id(), channel, "alice", "hello bob ✓ 'quoted'");
        let (pa, pb) = (idgen.next_id(), idgen.next_id());
        store.write_message(&msg, &[delivery("alice", pa), delivery("bob", pb)]).await.unwrap();
        store.add_direct_channel("alice", channel).await.unwrap();
        store.add_direct_channel("bob", channel).await.unwrap();

        assert_eq!(store.history(channel, Page::Latest, 50).await.unwrap(), vec![msg.clone()]);
        let alice = store.inbox_after("alice", 0, 10).await.unwrap();
        let bob = store.inbox_after("bob", 0, 10).await.unwrap();
        assert_eq!(alice.len(), 1);
        assert_eq!((alice[0].position, &alice[0].message), (pa, &msg));
        assert_eq!(bob.len(), 1);
        assert_eq!((bob[0].position, &bob[0].message), (pb, &msg));
        assert!(store.inbox_after("bob", pb, 10).await.unwrap().is_empty());
        assert!(store.inbox_after("carol", 0, 10).await.unwrap().is_empty());

        assert_eq!(store.message(channel, msg.id).await.unwrap(), Some(msg.clone()));
        assert_eq!(store.message(channel, msg.id + 1).await.unwrap(), None);
        assert_eq!(store.message("d:alice:carol", msg.id).await.unwrap(), None);
        assert_eq!(store.channels_of("alice").await.unwrap(), vec![channel.to_owned()]);
        assert_eq!(store.channels_of("bob").await.unwrap(), vec![channel.to_owned()]);
        assert!(store.history("d:nobody", Page::Latest, 50).await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test]
async fn reservation_is_idempotent_and_rewrites_keep_one_row() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let idgen = IdGenerator::new(2, 0);
        let (first, second) = (idgen.next_id(), idgen.next_id());
        assert_eq!(store.reserve_send("alice", "k1", first, "d:alice:bob").await.unwrap(), Reservation::New);
        assert_eq!(
            store.reserve_send("alice", "k1", second, "d:alice:carol").await.unwrap(),
            Reservation::Existing { id: first, channel: "d:alice:bob".to_owned() }
        );
        assert_eq!(store.reserve_send("alice", "k2", second, "d:alice:bob").await.unwrap(), Reservation::New);
        assert_eq!(store.reserve_send("bob", "k1", second, "d:alice:bob").await.unwrap(), Reservation::New);

        let msg = message(first, "d:alice:bob", "alice", "once");
        let deliveries = [delivery("alice", idgen.next_id()), delivery("bob", idgen.next_id())];
        store.write_message(&msg, &deliveries).await.unwrap();
        store.write_message(&msg, &deliveries).await.unwrap();
        assert_eq!(store.history("d:alice:bob", Page::Latest, 50).await.unwrap(), vec![msg.clone()]);
        assert_eq!(store.inbox_after("bob", 0, 50).await.unwrap().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn inbox_pages_over_250_entries_across_buckets() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let positions = ids_over_months(250, 3);
        let buckets: HashSet<i32> = positions.iter().map(|p| bucket_of(*p)).collect();
        assert!(buckets.len() >= 3, "positions should span several buckets: {buckets:?}");
        for (i, position) in positions.iter().enumerate() {
            // The message id is the position here; any id would do.
            let msg = message(*position, "g:club", "carol", &format!("m{i}"));
            store.write_message(&msg, &[delivery("dave", *position), delivery("erin", *position)]).await.unwrap();
        }

        let mut seen = Vec::new();
        let mut cursor = 0;
        let mut pages = Vec::new();
        loop {
            let page = store.inbox_after("dave", cursor, 100).await.unwrap();
            if page.is_empty() {
                break;
            }
            pages.push(page.len());
            cursor = page.last().map(|e| e.position).unwrap();
            seen.extend(page.into_iter().map(|e| (e.position, e.message.text)));
        }
        assert_eq!(pages, vec![100, 100, 50]);
        let expected: Vec<(u64, String)> = positions.iter().enumerate().map(|(i, p)| (*p, format!("m{i}"))).collect();
        assert_eq!(seen, expected, "every entry exactly once, oldest first");
        // A cursor in the middle of an older bucket.
        let mid = store.inbox_after("erin", positions[120], 5).await.unwrap();
        assert_eq!(mid.iter().map(|e| e.position).collect::<Vec<_>>(), positions[121..126].to_vec());
    })
    .await;
}

#[tokio::test]
async fn history_pages_latest_before_after() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let channel = "g:history";
        let ids = ids_over_months(120, 2);
        for (i, id) in ids.iter().enumerate() {
            store.write_message(&message(*id, channel, "frank", &format!("h{i}")), &[]).await.unwrap();
        }
        let newest_first: Vec<u64> = ids.iter().rev().copied().collect();

        let latest = store.history(channel, Page::Latest, 50).await.unwrap();
        assert_eq!(latest.iter().map(|m| m.id).collect::<Vec<_>>(), newest_first[..50].to_vec());
        assert_eq!(latest[0].text, "h119");

        // Walk backwards from Latest with Before.
        let mut back: Vec<u64> = latest.iter().map(|m| m.id).collect();
        loop {
            let last = *back.last().unwrap();
            let page = store.history(channel, Page::Before(last), 50).await.unwrap();
            if page.is_empty() {
                break;
            }
            back.extend(page.iter().map(|m| m.id));
        }
        assert_eq!(back, newest_first);

        // Walk forwards from the start with After.
        let mut forward = Vec::new();
        let mut cursor = 0;
        loop {
            let page = store.history(channel, Page::After(cursor), 50).await.unwrap();
            if page.is_empty() {
                break;
            }
            cursor = page.last().unwrap().id;
            forward.extend(page.iter().map(|m| m.id));
        }
        assert_eq!(forward, ids);

        let before = store.history(channel, Page::Before(ids[60]), 3).await.unwrap();
        assert_eq!(before.iter().map(|m| m.id).collect::<Vec<_>>(), vec![ids[59], ids[58], ids[57]]);
        let after = store.history(channel, Page::After(ids[60]), 3).await.unwrap();
        assert_eq!(after.iter().map(|m| m.id).collect::<Vec<_>>(), vec![ids[61], ids[62], ids[63]]);
        assert!(store.history(channel, Page::After(ids[119]), 10).await.unwrap().is_empty());
        assert!(store.history(channel, Page::Before(ids[0]), 10).await.unwrap().is_empty());
        assert!(store.history(channel, Page::Latest, 0).await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test]
async fn group_membership() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let group = Group {
            id: "g:hundred".to_owned(),
            name: "A hundred".to_owned(),
            owner: "u000".to_owned(),
            created_at_ms: ids::now_ms(),
        };
        // Unsorted input: results must come back sorted anyway.
        let mut members: Vec<String> = (0..100).rev().map(|i| format!("u{i:03}")).collect();
        store.create_group(&group, &members).await.unwrap();
        members.sort();

        assert_eq!(store.group("g:hundred").await.unwrap(), Some(group.clone()));
        assert_eq!(store.group("g:none").await.unwrap(), None);
        assert_eq!(store.members("g:hundred").await.unwrap(), members);
        assert_eq!(store.channels_of("u042").await.unwrap(), vec!["g:hundred".to_owned()]);

        store.add_direct_channel("u042", "d:u042:zed").await.unwrap();
        store.add_member("g:hundred", "zed").await.unwrap();
        store.add_member("g:hundred", "zed").await.unwrap();
        assert_eq!(store.channels_of("u042").await.unwrap(), vec!["d:u042:zed".to_owned(), "g:hundred".to_owned()]);
        assert_eq!(store.channels_of("zed").await.unwrap(), vec!["g:hundred".to_owned()]);
        assert_eq!(store.members("g:hundred").await.unwrap().len(), 101);

        store.remove_member("g:hundred", "u042").await.unwrap();
        let now: Vec<String> = store.members("g:hundred").await.unwrap();
        assert_eq!(now.len(), 100);
        assert!(!now.contains(&"u042".to_owned()) && now.contains(&"zed".to_owned()));
        assert_eq!(store.channels_of("u042").await.unwrap(), vec!["d:u042:zed".to_owned()]);
        // Removing someone who is not a member is a no-op.
        store.remove_member("g:hundred", "nobody").await.unwrap();
        assert!(store.members("g:none").await.unwrap().is_empty());
    })
    .await;
}

/// 500 recipients of a 1 KiB message is ~0.5 MiB of inbox rows: far above
/// Cassandra's 50 KiB batch limit, so the store must split the batches.
#[tokio::test]
async fn big_group_message_is_written_to_every_inbox() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let idgen = IdGenerator::new(3, 0);
        let members: Vec<String> = (0..500).map(|i| format!("member{i:03}")).collect();
        let group =
            Group { id: "g:big".to_owned(), name: "big".to_owned(), owner: "member000".to_owned(), created_at_ms: 1 };
        store.create_group(&group, &members).await.unwrap();
        assert_eq!(store.members("g:big").await.unwrap(), members);

        let msg = message(idgen.next_id(), "g:big", "member000", &"x".repeat(1024));
        let deliveries: Vec<Delivery> = members.iter().map(|m| delivery(m, idgen.next_id())).collect();
        store.write_message(&msg, &deliveries).await.unwrap();
        for d in &deliveries {
            let inbox = store.inbox_after(&d.user, 0, 10).await.unwrap();
            assert_eq!(inbox.len(), 1, "inbox of {}", d.user);
            assert_eq!((inbox[0].position, &inbox[0].message), (d.position, &msg));
        }
        assert_eq!(store.history("g:big", Page::Latest, 10).await.unwrap(), vec![msg]);
    })
    .await;
}

#[tokio::test]
async fn tables_have_no_default_ttl() {
    with_keyspace(|node, ks| async move {
        let _store = connect(&node, &ks).await;
        let admin = admin_session(&node).await;
        let rows = admin
            .query_unpaged(
                "SELECT table_name, default_time_to_live FROM system_schema.tables WHERE keyspace_name = ?",
                (ks.as_str(),),
            )
            .await
            .unwrap()
            .into_rows_result()
            .unwrap();
        let tables: Vec<(String, i32)> = rows.rows::<(String, i32)>().unwrap().map(Result::unwrap).collect();
        let mut names: Vec<&str> = tables.iter().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["groups", "inbox", "members", "messages", "sends", "user_channels"]);
        for (name, ttl) in &tables {
            assert_eq!(*ttl, 0, "table {name} has a default TTL");
        }
    })
    .await;
}

#[tokio::test]
async fn reconnecting_reuses_schema_and_sees_data() {
    with_keyspace(|node, ks| async move {
        let first = connect(&node, &ks).await;
        let idgen = IdGenerator::new(4, 0);
        let msg = message(idgen.next_id(), "d:a:b", "a", "before restart");
        let position = idgen.next_id();
        first.write_message(&msg, &[delivery("b", position)]).await.unwrap();
        first.reserve_send("a", "key", msg.id, "d:a:b").await.unwrap();

        let second = connect(&node, &ks).await;
        assert_eq!(second.history("d:a:b", Page::Latest, 10).await.unwrap(), vec![msg.clone()]);
        assert_eq!(second.inbox_after("b", 0, 10).await.unwrap()[0].position, position);
        assert_eq!(
            second.reserve_send("a", "key", idgen.next_id(), "d:a:b").await.unwrap(),
            Reservation::Existing { id: msg.id, channel: "d:a:b".to_owned() }
        );
        // And the first session still works next to the second.
        assert_eq!(first.message("d:a:b", msg.id).await.unwrap(), Some(msg));
    })
    .await;
}

#[tokio::test]
async fn simultaneous_first_starts_agree_on_schema() {
    with_keyspace(|node, ks| async move {
        let (a, b, c) = tokio::join!(connect(&node, &ks), connect(&node, &ks), connect(&node, &ks));
        let msg = message(IdGenerator::new(5, 0).next_id(), "d:x:y", "x", "hi");
        a.write_message(&msg, &[]).await.unwrap();
        assert_eq!(b.message("d:x:y", msg.id).await.unwrap(), Some(msg.clone()));
        assert_eq!(c.message("d:x:y", msg.id).await.unwrap(), Some(msg));
    })
    .await;
}

#[tokio::test]
async fn unreachable_contact_point_is_unavailable_quickly() {
    let started = Instant::now();
    let config = ScyllaConfig {
        contact_points: vec!["127.0.0.1:1".to_owned()],
        keyspace: "kc_unreachable".to_owned(),
        replication_factor: 1,
        request_timeout: Duration::from_secs(2),
        ..ScyllaConfig::default()
    };
    let outcome = tokio::time::timeout(Duration::from_secs(20), ScyllaStore::connect(config))
        .await
        .expect("connect must not hang");
    match outcome {
        Err(StoreError::Unavailable(reason)) => eprintln!("unreachable node: {reason}"),
        Err(other) => panic!("expected Unavailable, got {other:?}"),
        Ok(_) => panic!("connected to 127.0.0.1:1?"),
    }
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());

    let bad_name = ScyllaConfig { keyspace: "Bad-Name".to_owned(), ..ScyllaConfig::default() };
    assert!(matches!(ScyllaStore::connect(bad_name).await, Err(StoreError::Unavailable(_))));
}

/// Prints write throughput; asserts only that every write landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_throughput() {
    with_keyspace(|node, ks| async move {
        const N: usize = 2_000;
        const TASKS: usize = 50;
        let store = Arc::new(connect(&node, &ks).await);
        let idgen = Arc::new(IdGenerator::new(6, 0));
        let text = "a typical chat message of about sixty bytes, give or take.";

        let started = Instant::now();
        for _ in 0..N {
            let msg = message(idgen.next_id(), "d:s:t", "s", text);
            store.write_message(&msg, &[delivery("s", idgen.next_id()), delivery("t", idgen.next_id())]).await.unwrap();
        }
        let sequential = started.elapsed();

        let started = Instant::now();
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let (store, idgen) = (Arc::clone(&store), Arc::clone(&idgen));
            tasks.push(tokio::spawn(async move {
                let channel = format!("d:c{task}:r{task}");
                for _ in 0..N / TASKS {
                    let msg = message(idgen.next_id(), &channel, "c", text);
                    let deliveries = [
                        delivery(&format!("c{task}"), idgen.next_id()),
                        delivery(&format!("r{task}"), idgen.next_id()),
                    ];
                    store.write_message(&msg, &deliveries).await.unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let concurrent = started.elapsed();

        let per_sec = |d: Duration| N as f64 / d.as_secs_f64();
        println!(
            "write_message (2 deliveries, 1 logged batch each): {N} sequential in {sequential:?} = {:.0}/s; \
             {N} over {TASKS} tasks in {concurrent:?} = {:.0}/s",
            per_sec(sequential),
            per_sec(concurrent)
        );
        assert_eq!(store.history("d:s:t", Page::Latest, N + 10).await.unwrap().len(), N);
        for task in 0..TASKS {
            let inbox = store.inbox_after(&format!("r{task}"), 0, N).await.unwrap();
            assert_eq!(inbox.len(), N / TASKS);
        }
    })
    .await;
}
