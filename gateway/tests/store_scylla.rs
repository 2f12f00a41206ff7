//! [`ScyllaStore`] against a real CQL node (Cassandra 5 locally, started by
//! `e2e/local/cassandra.sh start`; address in `KUBECHAT_CQL_NODE`, default
//! `127.0.0.1:19042`) with its idempotency reservations in a real Redis
//! (`e2e/local/redis.sh start`; `KUBECHAT_REDIS_URL`, default
//! `redis://127.0.0.1:16379`), as clustered gateways run it: the shared store
//! contract (`store_suite`), then what only this store has (reservations
//! lost or unreachable, month buckets, batch limits, rows of earlier
//! versions, inbox references whose message is missing). Every test works in
//! its own random keyspace (RF 1) and Redis key prefix and drops both at the
//! end, so runs never see each other's data.

mod store_suite;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kubechat_gateway::broker::redis::send_keys::{RedisSendKeys, SendKeyNames};
use kubechat_gateway::ids::{self, IdGenerator};
use kubechat_gateway::store::scylla::{LEGACY_LISTED, ScyllaConfig, ScyllaStore, to_cql};
use kubechat_gateway::store::send_keys::SendRecord;
use kubechat_gateway::store::{BUCKET_MS, Group, InboxEntry, Message, NewMessage, Page, Store, StoreError, bucket_of};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::serialize::row::SerializeRow;
use store_suite::{message, send};

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

/// Runs `body` with a fresh keyspace name, then wipes its Redis keys
/// whether or not the body panicked (and re-raises the panic). The keyspace
/// stays until Cassandra is wiped (`e2e/local/up.sh` starts it empty): a
/// `DROP KEYSPACE` makes Cassandra flush every table with unflushed writes,
/// which cost more than the rest of this suite's Cassandra work (1,200
/// flushes; 34 s instead of 22).
async fn with_keyspace<F, Fut>(body: F)
where
    F: FnOnce(String, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let node = require_cql().await;
    let keyspace = random_keyspace();
    let outcome = tokio::spawn(body(node.clone(), keyspace.clone())).await;
    wipe_reservations(&keyspace).await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

fn redis_url() -> String {
    std::env::var("KUBECHAT_REDIS_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:16379".into())
}

/// A connection to the test Redis; fails (never skips) when it is not running.
async fn redis() -> redis::aio::ConnectionManager {
    let url = redis_url();
    let client = redis::Client::open(url.as_str()).expect("Redis URL");
    tokio::time::timeout(Duration::from_secs(5), redis::aio::ConnectionManager::new(client))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("Redis is not reachable at {url}: start it with `e2e/local/redis.sh start`"))
}

/// The Redis key prefix of a test keyspace's reservations.
fn names(keyspace: &str) -> SendKeyNames {
    SendKeyNames { prefix: format!("{keyspace}:") }
}

/// A store as a gateway of a cluster runs it: reservations in Redis, on a
/// Redis that never lost its data (the broker recorded epoch 0).
async fn connect(node: &str, keyspace: &str) -> ScyllaStore {
    let mut conn = redis().await;
    let _: () =
        redis::cmd("SET").arg(names(keyspace).epoch()).arg(0).arg("NX").query_async(&mut conn).await.expect("epoch");
    connect_with(node, keyspace, conn).await
}

async fn connect_with(node: &str, keyspace: &str, conn: redis::aio::ConnectionManager) -> ScyllaStore {
    let store = ScyllaStore::connect(config(node, keyspace)).await.expect("connect to CQL");
    store.with_send_keys(RedisSendKeys::start(conn, names(keyspace), Duration::from_secs(3600)))
}

/// Redis loses every reservation of a test (as a restart without persistence would).
async fn wipe_reservations(keyspace: &str) {
    let mut conn = redis().await;
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{}*", names(keyspace).prefix)).query_async(&mut conn).await.expect("keys");
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await.expect("del");
    }
}

/// What Redis holds for a key.
async fn reservation(keyspace: &str, sender: &str, key: &str) -> Option<SendRecord> {
    let held: Option<String> =
        redis::cmd("GET").arg(names(keyspace).send(sender, key)).query_async(&mut redis().await).await.expect("get");
    held.map(|h| SendRecord::decode(&h).expect("a readable reservation"))
}

/// Raw CQL, bypassing the store (to plant or inspect rows).
async fn cql(admin: &Session, text: String, values: impl SerializeRow) {
    admin.query_unpaged(text.clone(), values).await.unwrap_or_else(|e| panic!("{text}: {e}"));
}

async fn cql_rows<R>(admin: &Session, text: String, values: impl SerializeRow) -> Vec<R>
where
    R: for<'f> DeserializeRow<'f, 'f>,
{
    let result = admin.query_unpaged(text.clone(), values).await.unwrap_or_else(|e| panic!("{text}: {e}"));
    let rows = result.into_rows_result().expect("a query that returns rows");
    rows.rows::<R>().expect("row type").map(|row| row.expect("decode row")).collect()
}

/// An inbox row as this version writes it: a reference to `(channel, id)`.
async fn plant_reference(admin: &Session, ks: &str, user: &str, position: u64, channel: &str, id: u64) {
    let text =
        format!("INSERT INTO {ks}.inbox (user_id, bucket, position, channel_id, message_id) VALUES (?, ?, ?, ?, ?)");
    cql(admin, text, (user, bucket_of(position), to_cql(position), channel, to_cql(id))).await;
}

/// An inbox row as earlier versions wrote it: a copy of the message.
async fn plant_legacy(admin: &Session, ks: &str, user: &str, position: u64, m: &Message) {
    let text = format!(
        "INSERT INTO {ks}.inbox (user_id, bucket, position, channel_id, message_id, sender, sender_device, body, \
         created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    );
    let values = (
        user,
        bucket_of(position),
        to_cql(position),
        &m.channel,
        to_cql(m.id),
        &m.sender,
        &m.sender_device,
        &m.text,
        m.created_at_ms,
    );
    cql(admin, text, values).await;
}

/// A history row, as the store writes it.
async fn plant_history(admin: &Session, ks: &str, m: &Message) {
    let text = format!(
        "INSERT INTO {ks}.messages (channel_id, bucket, id, sender, sender_device, body, created_at_ms) \
         VALUES (?, ?, ?, ?, ?, ?, ?)"
    );
    let values = (&m.channel, bucket_of(m.id), to_cql(m.id), &m.sender, &m.sender_device, &m.text, m.created_at_ms);
    cql(admin, text, values).await;
}

/// `n` increasing ids spread evenly over the last `months` buckets, so
/// scans have to cross bucket boundaries.
fn ids_over_months(n: usize, months: i64) -> Vec<u64> {
    let now = ids::now_ms() - 60_000;
    let start = (now - months * BUCKET_MS).max(ids::EPOCH_MS);
    let step = (now - start) / i64::try_from(n).expect("small n");
    (0..n).map(|i| ids::first_id_at(start + step * i64::try_from(i).expect("small n")) | 7).collect()
}

/// A position (or id) minted `ago_ms` before now, as gateway `worker` would.
fn minted_ago(ago_ms: i64, worker: u64) -> u64 {
    ids::first_id_at(ids::now_ms() - ago_ms) | (worker << ids::SEQUENCE_BITS)
}

// The shared contract, each case in a fresh keyspace.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_one_to_one_round_trip() {
    with_keyspace(|node, ks| async move {
        store_suite::one_to_one_round_trip(&connect(&node, &ks).await).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_a_retried_key_is_stored_once() {
    with_keyspace(|node, ks| async move {
        store_suite::a_retried_key_is_stored_once(&connect(&node, &ks).await).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn suite_racing_retries_store_one_message() {
    with_keyspace(|node, ks| async move {
        store_suite::racing_retries_store_one_message(Arc::new(connect(&node, &ks).await)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_inbox_pages_cover_every_entry_once_in_order() {
    with_keyspace(|node, ks| async move {
        store_suite::inbox_pages_cover_every_entry_once_in_order(&connect(&node, &ks).await).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_history_pages_both_ways() {
    with_keyspace(|node, ks| async move {
        store_suite::history_pages_both_ways(&connect(&node, &ks).await).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_groups_members_and_channels() {
    with_keyspace(|node, ks| async move {
        store_suite::groups_members_and_channels(&connect(&node, &ks).await).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn suite_concurrent_senders_all_land() {
    with_keyspace(|node, ks| async move {
        store_suite::concurrent_senders_all_land(Arc::new(connect(&node, &ks).await), 50, 40).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_a_key_reused_for_another_channel_is_refused() {
    with_keyspace(|node, ks| async move {
        store_suite::a_key_reused_for_another_channel_is_refused(&connect(&node, &ks).await).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn suite_the_member_limit_holds_under_racing_joins() {
    with_keyspace(|node, ks| async move {
        store_suite::the_member_limit_holds_under_racing_joins(Arc::new(connect(&node, &ks).await)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_markers_only_move_forward() {
    with_keyspace(|node, ks| async move {
        store_suite::markers_only_move_forward(&connect(&node, &ks).await).await;
    })
    .await;
}

// What only the CQL store has.

/// Several gateways (independent stores on one keyspace, each with its own
/// worker id and Redis connection) retry one send at the same moment, for
/// several keys: exactly one message is stored per key and every attempt
/// answers with its id, because the reservation is one atomic `SET NX` (a
/// read-then-insert lets the first attempt on each gateway store its own
/// message).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_racing_on_several_gateways_store_one_message() {
    with_keyspace(|node, ks| async move {
        const GATEWAYS: u16 = 4;
        const ATTEMPTS_PER_GATEWAY: usize = 8;
        const KEYS: usize = 5;
        let admin = admin_session(&node).await;
        let mut gateways = Vec::new();
        for worker in 0..GATEWAYS {
            let store: Arc<dyn Store> = Arc::new(connect(&node, &ks).await);
            gateways.push((store, Arc::new(IdGenerator::new(20 + worker, 0))));
        }
        for k in 0..KEYS {
            let (channel, key) = (format!("g:race-{k}"), format!("race-{k}"));
            let attempts = gateways.len() * ATTEMPTS_PER_GATEWAY;
            let start = Arc::new(tokio::sync::Barrier::new(attempts));
            let mut racers = Vec::new();
            for (store, idgen) in &gateways {
                for _ in 0..ATTEMPTS_PER_GATEWAY {
                    let (store, idgen, start) = (Arc::clone(store), Arc::clone(idgen), Arc::clone(&start));
                    let (channel, key) = (channel.clone(), key.clone());
                    racers.push(tokio::spawn(async move {
                        let m = message(idgen.next_id(), &channel, "carol", "once, please");
                        let new = send(&m, &key, &["carol", "dave"], idgen.next_id());
                        start.wait().await;
                        store.store_message(new).await
                    }));
                }
            }
            let mut answers = Vec::new();
            for racer in racers {
                answers.push(racer.await.expect("join").expect("every attempt is answered"));
            }
            let id = answers[0].message.id;
            assert!(answers.iter().all(|a| a.message.id == id), "key {key}: every answer names one id: {answers:?}");
            assert!(answers.iter().any(|a| !a.duplicate), "key {key}: one attempt stored it");
            let history = gateways[0].0.history(&channel, Page::Latest, 100).await.expect("history");
            assert_eq!(store_suite::ids_of(&history), vec![id], "key {key}: one message in history");
            let reserved = reservation(&ks, "carol", &key).await.expect("reserved");
            assert_eq!(reserved.id, id, "key {key}: the reservation names the stored id");
            let inbox = gateways[1].0.inbox_after("dave", 0, 1000).await.expect("inbox");
            let inbox_ids: Vec<u64> =
                inbox.iter().filter(|e| e.message.channel == channel).map(|e| e.message.id).collect();
            assert_eq!(inbox_ids, vec![id], "key {key}: one inbox entry, of that message");
            let rows: Vec<(i64,)> = cql_rows(
                &admin,
                format!("SELECT position FROM {ks}.inbox WHERE user_id = ? AND bucket = ?"),
                ("dave", bucket_of(reserved.position)),
            )
            .await;
            assert_eq!(rows.len(), k + 1, "key {key}: no second inbox row for dave, however many attempts");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_pages_over_250_entries_across_buckets() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let positions = ids_over_months(250, 3);
        let buckets: HashSet<i32> = positions.iter().map(|p| bucket_of(*p)).collect();
        assert!(buckets.len() >= 3, "positions should span several buckets: {buckets:?}");
        for (i, position) in positions.iter().enumerate() {
            // The message id is the position here; any id would do.
            let m = message(*position, "g:club", "carol", &format!("m{i}"));
            store.store_message(send(&m, &format!("k{i}"), &["dave", "erin"], *position)).await.expect("store");
        }

        let mut seen = Vec::new();
        let mut cursor = 0;
        let mut pages = Vec::new();
        for _ in 0..10 {
            let page = store.inbox_after("dave", cursor, 100).await.expect("page");
            pages.push(page.len());
            let Some(last) = page.last() else { break };
            cursor = last.position;
            seen.extend(page.into_iter().map(|e| (e.position, e.message.text)));
        }
        assert_eq!(pages, vec![100, 100, 50, 0]);
        let expected: Vec<(u64, String)> = positions.iter().enumerate().map(|(i, p)| (*p, format!("m{i}"))).collect();
        assert_eq!(seen, expected, "every entry exactly once, oldest first");
        // A cursor in the middle of an older bucket.
        let mid = store.inbox_after("erin", positions[120], 5).await.expect("middle");
        assert_eq!(mid.iter().map(|e| e.position).collect::<Vec<_>>(), positions[121..126].to_vec());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_across_buckets() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let channel = "g:history";
        let ids = ids_over_months(120, 2);
        for (i, id) in ids.iter().enumerate() {
            let m = message(*id, channel, "frank", &format!("h{i}"));
            store.store_message(send(&m, &format!("k{i}"), &[], *id)).await.expect("store");
        }
        let newest_first: Vec<u64> = ids.iter().rev().copied().collect();

        let latest = store.history(channel, Page::Latest, 50).await.expect("latest");
        assert_eq!(store_suite::ids_of(&latest), newest_first[..50].to_vec());
        assert_eq!(latest[0].text, "h119");

        let mut back = store_suite::ids_of(&latest);
        for _ in 0..10 {
            let last = *back.last().expect("non-empty");
            let page = store.history(channel, Page::Before(last), 50).await.expect("before");
            if page.is_empty() {
                break;
            }
            back.extend(store_suite::ids_of(&page));
        }
        assert_eq!(back, newest_first);

        let mut forward = Vec::new();
        let mut cursor = 0;
        for _ in 0..10 {
            let page = store.history(channel, Page::After(cursor), 50).await.expect("after");
            let Some(last) = page.last() else { break };
            cursor = last.id;
            forward.extend(store_suite::ids_of(&page));
        }
        assert_eq!(forward, ids);
        assert!(store.history(channel, Page::Latest, 0).await.expect("limit 0").is_empty());
    })
    .await;
}

/// What a store call cost in CQL requests.
async fn cost<T>(store: &ScyllaStore, call: impl Future<Output = T>) -> (T, u64) {
    let before = store.requests();
    let out = call.await;
    (out, store.requests() - before)
}

/// The buckets `channel_buckets` lists for a channel, oldest first.
async fn listed_buckets(admin: &Session, ks: &str, channel: &str) -> Vec<i32> {
    let text = format!("SELECT bucket FROM {ks}.channel_buckets WHERE channel_id = ?");
    let mut buckets: Vec<i32> = cql_rows::<(i32,)>(admin, text, (channel,)).await.into_iter().map(|(b,)| b).collect();
    buckets.sort_unstable();
    buckets
}

/// A history page reads the channel's bucket list and then only the
/// buckets that hold its messages: a channel without messages costs one
/// request, one with a message this month two, one with three messages
/// months apart four; not one request per month back to the id epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_page_costs_one_request_per_bucket_with_data() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let admin = admin_session(&node).await;
        let idgen = IdGenerator::new(9, 0);
        let now = idgen.next_id();

        for page in [Page::Latest, Page::Before(now), Page::After(0)] {
            let (found, requests) = cost(&store, store.history("g:empty", page, 50)).await;
            assert_eq!(found.expect("empty history"), vec![], "{page:?}");
            assert_eq!(requests, 1, "{page:?} of a channel without messages");
        }

        let m = message(idgen.next_id(), "g:young", "alice", "first");
        store.store_message(send(&m, "k", &["bob"], idgen.next_id())).await.expect("store");
        assert_eq!(listed_buckets(&admin, &ks, "g:young").await, vec![bucket_of(m.id)]);
        let (latest, requests) = cost(&store, store.history("g:young", Page::Latest, 50)).await;
        assert_eq!((latest.expect("latest"), requests), (vec![m.clone()], 2), "latest page of a young channel");
        let (before, requests) = cost(&store, store.history("g:young", Page::Before(m.id), 50)).await;
        assert_eq!((before.expect("before"), requests), (vec![], 2), "page before its first message");
        let (after, requests) = cost(&store, store.history("g:young", Page::After(0), 50)).await;
        assert_eq!((after.expect("after"), requests), (vec![m.clone()], 2), "page from the start");

        // Sparse: three messages months apart.
        let ids = ids_over_months(3, 9);
        for (i, id) in ids.iter().enumerate() {
            let m = message(*id, "g:sparse", "carol", &format!("s{i}"));
            store.store_message(send(&m, &format!("s{i}"), &["dave"], *id)).await.expect("store");
        }
        let buckets: Vec<i32> = ids.iter().map(|id| bucket_of(*id)).collect();
        assert!(buckets.windows(2).all(|w| w[1] > w[0] + 1), "not adjacent: {buckets:?}");
        assert_eq!(listed_buckets(&admin, &ks, "g:sparse").await, buckets);
        let newest_first: Vec<u64> = ids.iter().rev().copied().collect();
        let (latest, requests) = cost(&store, store.history("g:sparse", Page::Latest, 50)).await;
        assert_eq!((store_suite::ids_of(&latest.expect("latest")), requests), (newest_first.clone(), 4));
        let (after, requests) = cost(&store, store.history("g:sparse", Page::After(0), 50)).await;
        assert_eq!((store_suite::ids_of(&after.expect("after")), requests), (ids.clone(), 4));
        // A full page stops reading buckets.
        let (one, requests) = cost(&store, store.history("g:sparse", Page::Latest, 1)).await;
        assert_eq!((store_suite::ids_of(&one.expect("one")), requests), (newest_first[..1].to_vec(), 2));
        // The list, the bucket of the bound (nothing older in it), the next listed bucket.
        let (one, requests) = cost(&store, store.history("g:sparse", Page::Before(ids[2]), 1)).await;
        assert_eq!((store_suite::ids_of(&one.expect("before")), requests), (vec![ids[1]], 3));
    })
    .await;
}

/// The plan of a send, pinned on the real store: after its channel's
/// first message this month (the bucket row, one round before the rest), a
/// one-to-one send is one request (its three rows in one batch to the
/// replica that owns them) and one round trip; the bucket row is written
/// once per channel and bucket by a process, not once per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_is_one_request_once_its_bucket_is_listed() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let idgen = IdGenerator::new(10, 0);
        let mut costs = Vec::new();
        for i in 0..4 {
            let m = message(idgen.next_id(), "dm:a:b", "a", "hi");
            let (stored, requests) =
                cost(&store, store.store_message(send(&m, &format!("k{i}"), &["a", "b"], m.id + 1))).await;
            let stored = stored.expect("store");
            assert_eq!(u64::from(stored.cost.requests), requests, "the cost a send reports is what it sent");
            costs.push((requests, stored.cost.round_trips));
        }
        assert_eq!(costs, vec![(2, 2), (1, 1), (1, 1), (1, 1)]);
        // Another gateway lists it again (an idempotent upsert), then no more.
        let second = connect(&node, &ks).await;
        let m = message(idgen.next_id(), "dm:a:b", "a", "from the second");
        let (stored, requests) = cost(&second, second.store_message(send(&m, "k9", &["a", "b"], m.id + 1))).await;
        stored.expect("store");
        assert_eq!(requests, 2);
        let admin = admin_session(&node).await;
        assert_eq!(listed_buckets(&admin, &ks, "dm:a:b").await, vec![bucket_of(m.id)]);
    })
    .await;
}

/// Reads go in batches: a sync page of 100 entries from 5 conversations is
/// one inbox read plus one read per conversation (not one per entry), and
/// the members of 10 groups (a presence change's friends) are one read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_pages_and_members_are_read_in_batches() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let idgen = IdGenerator::new(13, 0);
        // A device's cursor: just before the conversation (an empty month costs a read of its own).
        let cursor = idgen.next_id();
        for n in 0..100 {
            let channel = format!("g:conversation-{}", n % 5);
            let m = message(idgen.next_id(), &channel, "alice", &format!("m{n}"));
            store.store_message(send(&m, &format!("k{n}"), &["alice", "bob"], idgen.next_id())).await.expect("store");
        }
        let (page, requests) = cost(&store, store.inbox_after("bob", cursor, 100)).await;
        assert_eq!(page.expect("inbox").len(), 100);
        assert_eq!(requests, 6, "one inbox read, one per conversation");

        let groups: Vec<String> = (0..10).map(|n| format!("g:team-{n}")).collect();
        for group in &groups {
            let g = Group { id: group.clone(), name: "t".into(), owner: "carol".into(), created_at_ms: 1 };
            store.create_group(&g, &["carol".to_string(), format!("member-of-{group}")]).await.expect("group");
        }
        let (members, requests) = cost(&store, store.members_of(&groups)).await;
        let members = members.expect("members");
        assert!(groups.iter().all(|g| members[g] == vec!["carol".to_string(), format!("member-of-{g}")]));
        assert_eq!(requests, 1, "ten groups, one read");
    })
    .await;
}

/// Lists are read in pages: with 10 rows a page, a user's 25 channels and
/// a group's 25 members take three responses each, and all of them arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lists_are_read_in_pages() {
    with_keyspace(|node, ks| async move {
        let store = ScyllaStore::connect(ScyllaConfig { page_size: 10, ..config(&node, &ks) }).await.expect("connect");
        let mut channels: Vec<String> = (0..25).map(|i| format!("g:{i:02}")).collect();
        for channel in &channels {
            store.add_member(channel, "zoe").await.expect("join");
        }
        let (found, requests) = cost(&store, store.channels_of("zoe")).await;
        channels.sort();
        assert_eq!(found.expect("channels"), channels);
        assert!((3..=4).contains(&requests), "25 channels in pages of 10: {requests} requests");

        let members: Vec<String> = (0..25).map(|i| format!("member-{i:02}")).collect();
        let group = Group { id: "g:crowd".into(), name: "crowd".into(), owner: members[0].clone(), created_at_ms: 1 };
        store.create_group(&group, &members).await.expect("create group");
        let (found, requests) = cost(&store, store.members("g:crowd")).await;
        assert_eq!(found.expect("members"), members);
        assert!((3..=4).contains(&requests), "25 members in pages of 10: {requests} requests");
    })
    .await;
}

/// A keyspace written before bucket lists existed: its history pages
/// correctly right after the upgrade (older buckets scanned as before, no
/// list made while gateways of the earlier version may still write), and
/// once listing has begun the first read lists a channel's older buckets,
/// after which a page reads only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_written_before_bucket_lists_still_pages() {
    with_keyspace(|node, ks| async move {
        let admin = admin_session(&node).await;
        // The schema of the earlier version (only the table history needs).
        cql(
            &admin,
            format!("CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"),
            (),
        )
        .await;
        cql(
            &admin,
            format!(
                "CREATE TABLE {ks}.messages (channel_id text, bucket int, id bigint, sender text, sender_device \
                 text, body text, created_at_ms bigint, PRIMARY KEY ((channel_id, bucket), id)) \
                 WITH CLUSTERING ORDER BY (id DESC)"
            ),
            (),
        )
        .await;
        let channel = "g:veteran";
        let ids = ids_over_months(6, 8);
        let mut all: Vec<Message> = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let m = message(*id, channel, "olga", &format!("old {i}"));
            plant_history(&admin, &ks, &m).await;
            all.push(m);
        }
        let old_buckets: Vec<i32> = {
            let mut b: Vec<i32> = ids.iter().map(|id| bucket_of(*id)).collect();
            b.dedup();
            b
        };
        assert!(old_buckets.len() >= 4, "spread over buckets: {old_buckets:?}");

        let check_pages = |store: ScyllaStore, all: Vec<Message>| async move {
            let newest_first: Vec<u64> = all.iter().rev().map(|m| m.id).collect();
            let latest = store.history(channel, Page::Latest, 100).await.expect("latest");
            assert_eq!(store_suite::ids_of(&latest), newest_first);
            let mut back = Vec::new();
            let mut page = store.history(channel, Page::Latest, 2).await.expect("first page");
            while let Some(last) = page.last().map(|m| m.id) {
                back.extend(store_suite::ids_of(&page));
                page = store.history(channel, Page::Before(last), 2).await.expect("page back");
            }
            assert_eq!(back, newest_first);
            let mut forward = Vec::new();
            let mut page = store.history(channel, Page::After(0), 2).await.expect("first page");
            while let Some(last) = page.last().map(|m| m.id) {
                forward.extend(store_suite::ids_of(&page));
                page = store.history(channel, Page::After(last), 2).await.expect("page on");
            }
            forward.reverse();
            assert_eq!(forward, newest_first);
            store
        };

        // The upgrade: listing starts in the bucket after next.
        let store = connect(&node, &ks).await;
        let meta: Vec<(i64,)> =
            cql_rows(&admin, format!("SELECT value FROM {ks}.store_meta WHERE name = 'buckets_listed_from'"), ()).await;
        let now_bucket = bucket_of(ids::first_id_at(ids::now_ms()));
        assert!(matches!(meta[..], [(from,)] if from >= i64::from(now_bucket) + 2), "{meta:?}");
        let idgen = IdGenerator::new(11, 0);
        let new = message(idgen.next_id(), channel, "olga", "after the upgrade");
        store.store_message(send(&new, "k", &["pat"], idgen.next_id())).await.expect("store");
        all.push(new.clone());
        let store = check_pages(store, all.clone()).await;
        assert_eq!(listed_buckets(&admin, &ks, channel).await, vec![now_bucket], "nothing listed early");
        drop(store);

        // A month later (as if): listing began this bucket.
        cql(
            &admin,
            format!("UPDATE {ks}.store_meta SET value = ? WHERE name = 'buckets_listed_from'"),
            (i64::from(now_bucket),),
        )
        .await;
        let store = connect(&node, &ks).await;
        let store = check_pages(store, all.clone()).await;
        let mut expected = vec![LEGACY_LISTED];
        expected.extend(&old_buckets);
        expected.push(now_bucket);
        assert_eq!(listed_buckets(&admin, &ks, channel).await, expected, "older buckets listed, then the marker");
        let (latest, requests) = cost(&store, store.history(channel, Page::Latest, 100)).await;
        assert_eq!(latest.expect("latest").len(), all.len());
        // The list from this bucket on, this bucket, the older list, each older bucket.
        assert_eq!(requests, 3 + old_buckets.len() as u64);
        // A channel that never had older messages: its list is made once, then costs one request.
        let young = message(idgen.next_id(), "g:rookie", "pat", "new here");
        store.store_message(send(&young, "k2", &["olga"], idgen.next_id())).await.expect("store");
        assert_eq!(store.history("g:rookie", Page::Latest, 10).await.expect("rookie"), vec![young.clone()]);
        let (page, requests) = cost(&store, store.history("g:rookie", Page::Latest, 10)).await;
        assert_eq!((page.expect("rookie again"), requests), (vec![young], 3));
    })
    .await;
}

/// 500 members: creating the group writes 1,000 membership rows, ~100 KB,
/// twice Cassandra's 50 KiB batch limit, so its logged batches must be
/// split; a 1 KiB message then reaches every one of the 500 inboxes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_group_message_is_written_to_every_inbox() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let idgen = IdGenerator::new(3, 0);
        let members: Vec<String> = (0..500).map(|i| format!("member-with-a-longer-name-{i:03}")).collect();
        let group = Group { id: "g:big".into(), name: "big".into(), owner: members[0].clone(), created_at_ms: 1 };
        store.create_group(&group, &members).await.expect("create a 500-member group");
        assert_eq!(store.members("g:big").await.expect("members"), members);
        assert_eq!(store.channels_of(&members[499]).await.expect("channels"), vec!["g:big"]);

        let m = message(idgen.next_id(), "g:big", &members[0], &"x".repeat(1024));
        let recipients: Vec<&str> = members.iter().map(String::as_str).collect();
        let position = idgen.next_id();
        let stored = store.store_message(send(&m, "k", &recipients, position)).await.expect("store");
        assert!(!stored.duplicate);
        for member in &members {
            let inbox = store.inbox_after(member, 0, 10).await.expect("inbox");
            assert_eq!(inbox, vec![InboxEntry { position, message: m.clone() }], "inbox of {member}");
        }
        assert_eq!(store.history("g:big", Page::Latest, 10).await.expect("history"), vec![m]);
    })
    .await;
}

/// The point of inbox references: a send to 100 members writes its text
/// once (in history); each inbox row holds only where to find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_recipient_send_stores_its_text_once() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let admin = admin_session(&node).await;
        let idgen = IdGenerator::new(8, 0);
        let members: Vec<String> = (0..100).map(|i| format!("member-{i:03}")).collect();
        let recipients: Vec<&str> = members.iter().map(String::as_str).collect();
        let m = message(idgen.next_id(), "g:hundred", "member-000", &"y".repeat(2000));
        let position = idgen.next_id();
        store.store_message(send(&m, "k", &recipients, position)).await.expect("store");

        // The reference, then the columns of the copy that earlier versions wrote.
        type InboxRow = (String, i64, String, i64, Option<String>, Option<String>, Option<String>, Option<i64>);
        let columns = "user_id, position, channel_id, message_id, sender, sender_device, body, created_at_ms";
        let inbox: Vec<InboxRow> = cql_rows(&admin, format!("SELECT {columns} FROM {ks}.inbox"), ()).await;
        assert_eq!(inbox.len(), 100, "one inbox row per recipient");
        let users: HashSet<&str> = inbox.iter().map(|row| row.0.as_str()).collect();
        assert_eq!(users, recipients.iter().copied().collect::<HashSet<_>>());
        for (user, at, channel, id, sender, device, body, created) in &inbox {
            assert_eq!((*at, channel.as_str(), *id), (to_cql(position), "g:hundred", to_cql(m.id)), "row of {user}");
            let copied = (sender.is_some(), device.is_some(), body.is_some(), created.is_some());
            assert_eq!(copied, (false, false, false, false), "row of {user} copies the message");
        }
        let history: Vec<(String,)> = cql_rows(&admin, format!("SELECT body FROM {ks}.messages"), ()).await;
        assert_eq!(history, vec![(m.text.clone(),)], "the text is stored once, in history");

        assert_eq!(
            store.inbox_after("member-042", 0, 10).await.expect("inbox"),
            vec![InboxEntry { position, message: m }]
        );
    })
    .await;
}

/// Rows written before inbox entries became references carry the message
/// (`body`, `sender`, ...): they are read as they are, in order with new
/// ones, even where no history row backs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_inbox_rows_with_a_copy_are_read_as_they_are() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let admin = admin_session(&node).await;
        let legacy = |id: u64, text: &str| message(id, "dm:alice:bob", "alice", text);
        // An hour old, with no history row: a reference to nowhere would be skipped.
        let (old_id, old_at) = (minted_ago(3_600_000, 1), minted_ago(3_600_000, 2));
        let old = legacy(old_id, "from an earlier version ✓ 'quoted'");
        plant_legacy(&admin, &ks, "bob", old_at, &old).await;
        // Then a send of this version, then a fresh legacy row (a gateway of
        // the earlier version still running during a rolling upgrade).
        let idgen = IdGenerator::new(3, 0);
        let new = legacy(idgen.next_id(), "from this version");
        let new_at = idgen.next_id();
        store.store_message(send(&new, "k", &["alice", "bob"], new_at)).await.expect("store");
        let (late_id, late_at) = (idgen.next_id(), idgen.next_id());
        let late = legacy(late_id, "from an old gateway, just now");
        plant_legacy(&admin, &ks, "bob", late_at, &late).await;

        let expected = vec![
            InboxEntry { position: old_at, message: old },
            InboxEntry { position: new_at, message: new },
            InboxEntry { position: late_at, message: late },
        ];
        assert_eq!(store.inbox_after("bob", 0, 10).await.expect("inbox"), expected);
        assert_eq!(store.inbox_after("bob", old_at, 1).await.expect("after the old row"), expected[1..2].to_vec());
    })
    .await;
}

/// A reference whose history row is missing, recent: a send still being
/// written (history comes last). It is skipped and the entries after it
/// still come (the chat layer's cursor never passes a recent position, so a
/// device reads it on its next sync); once the history row lands it reads
/// normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recent_reference_without_its_message_is_skipped_until_it_lands() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let admin = admin_session(&node).await;
        let idgen = IdGenerator::new(4, 0);
        let channel = "g:flight";
        let before = message(idgen.next_id(), channel, "alice", "before");
        let before_at = idgen.next_id();
        store.store_message(send(&before, "k1", &["bob"], before_at)).await.expect("store before");

        // In flight: inbox row written, history row not yet.
        let flying = message(idgen.next_id(), channel, "carol", "in flight");
        let flying_at = idgen.next_id();
        plant_reference(&admin, &ks, "bob", flying_at, channel, flying.id).await;

        let after = message(idgen.next_id(), channel, "dave", "after");
        let after_at = idgen.next_id();
        store.store_message(send(&after, "k2", &["bob"], after_at)).await.expect("store after");

        let both = vec![
            InboxEntry { position: before_at, message: before.clone() },
            InboxEntry { position: after_at, message: after.clone() },
        ];
        assert_eq!(store.inbox_after("bob", 0, 10).await.expect("inbox"), both);
        assert_eq!(store.inbox_after("bob", 0, 1).await.expect("limit 1"), both[..1].to_vec());
        assert_eq!(store.inbox_after("bob", before_at, 1).await.expect("from before"), both[1..].to_vec());

        // The write completes: everything reads, in order.
        plant_history(&admin, &ks, &flying).await;
        assert_eq!(
            store.inbox_after("bob", 0, 10).await.expect("inbox once written"),
            vec![
                InboxEntry { position: before_at, message: before },
                InboxEntry { position: flying_at, message: flying },
                InboxEntry { position: after_at, message: after },
            ]
        );
    })
    .await;
}

/// A reference whose history row is missing and old: that send failed (a
/// retry writes fresh positions). It is skipped and the page still fills up
/// with the entries after it, across buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_reference_without_its_message_is_skipped() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let admin = admin_session(&node).await;
        let channel = "g:failed";
        // A minute old. Ids from another worker.
        let (good_at, failed_at) = (minted_ago(61_000, 1), minted_ago(60_000, 1));
        let good = message(minted_ago(61_000, 2), channel, "alice", "stored a minute ago");
        store.store_message(send(&good, "k0", &["bob"], good_at)).await.expect("store");
        plant_reference(&admin, &ks, "bob", failed_at, channel, minted_ago(60_000, 2)).await;
        // More failed ones in a row, in an older bucket, so skipping has to read on across buckets.
        let month_ago = |n: u64| ids::first_id_at(ids::now_ms() - BUCKET_MS - 60_000) + n;
        for n in 0..5 {
            plant_reference(&admin, &ks, "bob", month_ago(n), channel, month_ago(100 + n)).await;
        }
        let idgen = IdGenerator::new(5, 0);
        let mut later = Vec::new();
        for i in 0..3 {
            let m = message(idgen.next_id(), channel, "carol", &format!("later {i}"));
            let at = idgen.next_id();
            store.store_message(send(&m, &format!("k{}", i + 1), &["bob"], at)).await.expect("store later");
            later.push(InboxEntry { position: at, message: m });
        }

        let mut all = vec![InboxEntry { position: good_at, message: good }];
        all.extend(later.iter().cloned());
        assert_eq!(store.inbox_after("bob", 0, 10).await.expect("inbox"), all);
        // The failed entries do not count against the limit.
        assert_eq!(store.inbox_after("bob", 0, 2).await.expect("limit 2"), all[..2].to_vec());
        assert_eq!(store.inbox_after("bob", 0, 1).await.expect("limit 1"), all[..1].to_vec());
        assert_eq!(store.inbox_after("bob", good_at, 1).await.expect("after the good one"), all[1..2].to_vec());
        assert_eq!(store.inbox_after("bob", month_ago(0), 10).await.expect("from the older bucket"), all);
    })
    .await;
}

/// Reserve `(sender, key)` in Redis for a first attempt, as a gateway does
/// before it writes (and then, here, dies).
async fn plant_reservation(keyspace: &str, sender: &str, key: &str, record: &SendRecord) {
    let _: () = redis::cmd("SET")
        .arg(names(keyspace).send(sender, key))
        .arg(record.encode())
        .query_async(&mut redis().await)
        .await
        .expect("plant a reservation");
}

/// A first attempt that stopped after its reservation and part of its rows
/// (the gateway died): a retry soon after finishes it under the reserved id
/// at the reserved position, writing no second entry; the next retry finds
/// it done and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_finishes_a_partial_send_under_its_id() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let idgen = IdGenerator::new(7, 0);
        let channel = "g:partial";
        let admin = admin_session(&node).await;
        let (first_id, first_at) = (idgen.next_id(), idgen.next_id());
        let record = SendRecord { id: first_id, position: first_at, channel: channel.into(), done: false };
        plant_reservation(&ks, "alice", "k", &record).await;
        plant_reference(&admin, &ks, "bob", first_at, channel, first_id).await;

        let retry = message(idgen.next_id(), channel, "alice", "again");
        let stored = store.store_message(send(&retry, "k", &["alice", "bob"], idgen.next_id())).await.expect("retry");
        assert!(stored.duplicate, "the key was held: the retry finishes the first attempt");
        let expected = Message { id: first_id, created_at_ms: ids::timestamp_ms(first_id), ..retry.clone() };
        assert_eq!((stored.message.clone(), stored.position), (expected.clone(), first_at));
        assert_eq!(stored.cost.round_trips, 2, "the earlier attempt's history row, then its rows");
        assert_eq!(store.history(channel, Page::Latest, 10).await.expect("history"), vec![expected.clone()]);
        for user in ["alice", "bob"] {
            assert_eq!(
                store.inbox_after(user, 0, 10).await.expect("inbox"),
                vec![InboxEntry { position: first_at, message: expected.clone() }],
                "one entry for {user}, at the reserved position"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // the completion is recorded after the ack
        assert!(reservation(&ks, "alice", "k").await.expect("held").done, "recorded as done");

        let again = message(idgen.next_id(), channel, "alice", "again");
        let third = store.store_message(send(&again, "k", &["alice", "bob"], idgen.next_id())).await.expect("third");
        assert!(third.duplicate);
        assert_eq!(third.message, expected);
        assert_eq!((third.cost.requests, third.cost.round_trips), (1, 1), "one read, nothing written");
        assert_eq!(store.inbox_after("bob", 0, 10).await.expect("bob").len(), 1, "a duplicate writes nothing");
    })
    .await;
}

/// A first attempt a minute old that never finished: its position may lie
/// behind a cursor a device has stored by now, so the retry writes the
/// entries at its own position and deletes the old ones: still one entry
/// per recipient, and in front of every stored cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_retry_moves_the_entries_in_front_of_stored_cursors() {
    with_keyspace(|node, ks| async move {
        let store = connect(&node, &ks).await;
        let admin = admin_session(&node).await;
        let channel = "dm:alice:bob";
        let (first_id, first_at) = (minted_ago(60_000, 1), minted_ago(60_000, 2));
        let record = SendRecord { id: first_id, position: first_at, channel: channel.into(), done: false };
        plant_reservation(&ks, "alice", "late", &record).await;
        plant_reference(&admin, &ks, "bob", first_at, channel, first_id).await;

        let idgen = IdGenerator::new(7, 0);
        let retry = message(idgen.next_id(), channel, "alice", "late");
        let retry_at = idgen.next_id();
        let stored = store.store_message(send(&retry, "late", &["alice", "bob"], retry_at)).await.expect("retry");
        let expected = Message { id: first_id, created_at_ms: ids::timestamp_ms(first_id), ..retry.clone() };
        assert_eq!((stored.message.clone(), stored.position, stored.duplicate), (expected.clone(), retry_at, true));
        let stored_cursor = minted_ago(10_000, 0);
        for user in ["alice", "bob"] {
            assert_eq!(
                store.inbox_after(user, 0, 10).await.expect("inbox"),
                vec![InboxEntry { position: retry_at, message: expected.clone() }],
                "{user}: one entry, moved to the retry's position"
            );
            assert_eq!(store.inbox_after(user, stored_cursor, 10).await.expect("after a stored cursor").len(), 1);
        }
    })
    .await;
}

/// Redis loses every reservation between two attempts of one key (a
/// restart without persistence): the second attempt finds the first in
/// the store (the sender's own inbox entry keeps the key) and answers with
/// its id; nothing is stored twice, in history or any inbox. Keys sent
/// after the loss are new messages, at two round trips while
/// reservations may be missing, one again once every earlier
/// reservation would have expired anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_lost_between_attempts_still_store_one_message() {
    with_keyspace(|node, ks| async move {
        let first_gateway = connect(&node, &ks).await;
        let second_gateway = connect(&node, &ks).await;
        let idgen = IdGenerator::new(11, 0);
        let channel = "dm:alice:bob";
        let first = message(idgen.next_id(), channel, "alice", "once");
        let first_at = idgen.next_id();
        let stored = first_gateway.store_message(send(&first, "k", &["alice", "bob"], first_at)).await.expect("first");
        assert_eq!((stored.duplicate, stored.cost.round_trips), (false, 2), "the bucket row, then the rows");

        wipe_reservations(&ks).await;
        let retry = message(idgen.next_id(), channel, "alice", "once");
        let again =
            second_gateway.store_message(send(&retry, "k", &["alice", "bob"], idgen.next_id())).await.expect("retry");
        assert!(again.duplicate, "found in the store: {again:?}");
        assert_eq!(again.message.id, first.id);
        assert_eq!(again.cost.round_trips, 2, "a look in the store, then the rows");
        assert_eq!(
            store_suite::ids_of(&first_gateway.history(channel, Page::Latest, 10).await.expect("history")),
            vec![first.id]
        );
        for user in ["alice", "bob"] {
            let inbox = first_gateway.inbox_after(user, 0, 10).await.expect("inbox");
            assert_eq!(inbox.iter().map(|e| e.message.id).collect::<Vec<_>>(), vec![first.id], "{user}");
        }

        // A new key after the loss: looked up, not found, stored.
        let other = message(idgen.next_id(), channel, "alice", "new");
        let fresh =
            second_gateway.store_message(send(&other, "k2", &["alice", "bob"], idgen.next_id())).await.expect("new");
        assert!(!fresh.duplicate);
        assert_eq!(fresh.cost.round_trips, 2);
        // Once the loss is older than the retry window, a send is one round trip again.
        let _: () = redis::cmd("SET")
            .arg(names(&ks).since())
            .arg(ids::now_ms() - 3_600_001)
            .query_async(&mut redis().await)
            .await
            .expect("age the loss");
        let third = message(idgen.next_id(), channel, "alice", "later");
        let later =
            second_gateway.store_message(send(&third, "k3", &["alice", "bob"], idgen.next_id())).await.expect("later");
        assert_eq!((later.duplicate, later.cost.round_trips), (false, 1));
    })
    .await;
}

/// With Redis unreachable sends are still stored once: each looks for an
/// earlier attempt in the store first (two round trips); a retry is found.
/// The completed reservations are written to Redis once it answers, so a
/// retry that then reaches a gateway that never lost Redis finds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_while_redis_is_unreachable_are_stored_once() {
    with_keyspace(|node, ks| async move {
        // A Redis that is not there yet: nothing listens on its port.
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("url");
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(200)))
            .set_response_timeout(Some(Duration::from_millis(200)))
            .set_number_of_retries(0);
        let unreachable = match redis::aio::ConnectionManager::new_lazy_with_config(client, config) {
            Ok(conn) => conn,
            Err(e) => panic!("a lazy connection manager: {e}"),
        };
        let store = connect_with(&node, &ks, unreachable).await;
        let idgen = IdGenerator::new(12, 0);
        let channel = "dm:carol:dave";
        let m = message(idgen.next_id(), channel, "carol", "no redis");
        let stored = store.store_message(send(&m, "k", &["carol", "dave"], idgen.next_id())).await.expect("store");
        assert_eq!((stored.duplicate, stored.cost.round_trips), (false, 2));
        let retry = message(idgen.next_id(), channel, "carol", "no redis");
        let again = store.store_message(send(&retry, "k", &["carol", "dave"], idgen.next_id())).await.expect("retry");
        assert!(again.duplicate && again.message.id == m.id, "{again:?}");
        assert_eq!(store_suite::ids_of(&store.history(channel, Page::Latest, 10).await.expect("history")), vec![m.id]);

        // Redis comes up: the reservation made without it is written there.
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server ({e}); install it with `e2e/local/redis.sh start`"));
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("url");
        let deadline = Instant::now() + Duration::from_secs(10);
        let held = loop {
            let held: Option<String> = match client.get_multiplexed_async_connection().await {
                Ok(mut conn) => {
                    redis::cmd("GET").arg(names(&ks).send("carol", "k")).query_async(&mut conn).await.ok().flatten()
                }
                Err(_) => None,
            };
            if held.is_some() || Instant::now() > deadline {
                break held;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let _ = server.kill();
        let _ = server.wait();
        let held = held.map(|h| SendRecord::decode(&h).expect("readable"));
        assert_eq!(held.map(|r| (r.id, r.done)), Some((m.id, true)), "the backlog reached Redis once it answered");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_have_no_default_ttl() {
    with_keyspace(|node, ks| async move {
        let _store = connect(&node, &ks).await;
        let admin = admin_session(&node).await;
        let tables: Vec<(String, i32)> = cql_rows(
            &admin,
            "SELECT table_name, default_time_to_live FROM system_schema.tables WHERE keyspace_name = ?".to_owned(),
            (ks.as_str(),),
        )
        .await;
        let mut names: Vec<&str> = tables.iter().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "channel_buckets",
                "groups",
                "inbox",
                "markers",
                "members",
                "messages",
                "sends",
                "store_meta",
                "user_channels"
            ]
        );
        for (name, ttl) in &tables {
            assert_eq!(*ttl, 0, "table {name} has a default TTL");
        }
    })
    .await;
}

/// A second gateway (another store on the same keyspace) sees the first's
/// messages, inboxes and idempotency keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_store_sees_the_firsts_data() {
    with_keyspace(|node, ks| async move {
        let first = connect(&node, &ks).await;
        let idgen = IdGenerator::new(4, 0);
        let m = message(idgen.next_id(), "dm:a:b", "a", "before restart");
        let position = idgen.next_id();
        first
            .store_message(NewMessage { link_channel: true, ..send(&m, "key", &["a", "b"], position) })
            .await
            .expect("store");

        let second = connect(&node, &ks).await;
        assert_eq!(second.history("dm:a:b", Page::Latest, 10).await.expect("history"), vec![m.clone()]);
        assert_eq!(
            second.inbox_after("b", 0, 10).await.expect("inbox"),
            vec![InboxEntry { position, message: m.clone() }]
        );
        assert_eq!(second.channels_of("b").await.expect("channels"), vec!["dm:a:b"]);
        let retry = message(idgen.next_id(), "dm:a:b", "a", "before restart");
        let again = second.store_message(send(&retry, "key", &["a", "b"], idgen.next_id())).await.expect("retry");
        assert!(again.duplicate && again.message == m, "the key is known to the second store: {again:?}");
        // And the first still works next to the second.
        assert_eq!(first.message("dm:a:b", m.id).await.expect("lookup"), Some(m));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_first_starts_agree_on_schema() {
    with_keyspace(|node, ks| async move {
        let (a, b, c) = tokio::join!(connect(&node, &ks), connect(&node, &ks), connect(&node, &ks));
        let m = message(IdGenerator::new(5, 0).next_id(), "dm:x:y", "x", "hi");
        a.store_message(send(&m, "k", &["x", "y"], m.id + 1)).await.expect("store");
        assert_eq!(b.message("dm:x:y", m.id).await.expect("b"), Some(m.clone()));
        assert_eq!(c.inbox_after("y", 0, 10).await.expect("c"), vec![InboxEntry { position: m.id + 1, message: m }]);
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

/// Prints send throughput (direct messages, then 100-member group
/// messages); asserts only that every send landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_throughput() {
    with_keyspace(|node, ks| async move {
        const N: usize = 2_000;
        const TASKS: usize = 50;
        const GROUP_SENDS: usize = 200;
        let store = Arc::new(connect(&node, &ks).await);
        let idgen = Arc::new(IdGenerator::new(6, 0));
        let text = "a typical chat message of about sixty bytes, give or take.";

        let started = Instant::now();
        for i in 0..N {
            let m = message(idgen.next_id(), "dm:s:t", "s", text);
            store.store_message(send(&m, &format!("k{i}"), &["s", "t"], idgen.next_id())).await.expect("store");
        }
        let sequential = started.elapsed();

        let started = Instant::now();
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let (store, idgen) = (Arc::clone(&store), Arc::clone(&idgen));
            tasks.push(tokio::spawn(async move {
                let (sender, peer) = (format!("c{task}"), format!("r{task}"));
                let channel = format!("dm:{sender}:{peer}");
                for i in 0..N / TASKS {
                    let m = message(idgen.next_id(), &channel, &sender, text);
                    let new = send(&m, &format!("k{i}"), &[&sender, &peer], idgen.next_id());
                    store.store_message(new).await.expect("store");
                }
            }));
        }
        for task in tasks {
            task.await.expect("join");
        }
        let concurrent = started.elapsed();

        let members: Vec<String> = (0..100).map(|i| format!("m{i:03}")).collect();
        let recipients: Vec<&str> = members.iter().map(String::as_str).collect();
        let started = Instant::now();
        for i in 0..GROUP_SENDS {
            let m = message(idgen.next_id(), "g:hundred", "m000", text);
            store.store_message(send(&m, &format!("g{i}"), &recipients, idgen.next_id())).await.expect("store");
        }
        let group = started.elapsed();

        let per_sec = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
        println!(
            "store_message, 2 recipients: {N} sequential in {sequential:?} = {:.0}/s; {N} over {TASKS} tasks in \
             {concurrent:?} = {:.0}/s; 100 recipients: {GROUP_SENDS} sequential in {group:?} = {:.0}/s",
            per_sec(N, sequential),
            per_sec(N, concurrent),
            per_sec(GROUP_SENDS, group),
        );
        assert_eq!(store.history("dm:s:t", Page::Latest, N + 10).await.expect("history").len(), N);
        for task in 0..TASKS {
            let inbox = store.inbox_after(&format!("r{task}"), 0, N).await.expect("inbox");
            assert_eq!(inbox.len(), N / TASKS);
        }
        assert_eq!(store.inbox_after("m099", 0, N).await.expect("group inbox").len(), GROUP_SENDS);
    })
    .await;
}
