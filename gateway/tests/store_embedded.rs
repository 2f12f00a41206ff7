//! The embedded (redb) store against a real database in a temporary folder:
//! the shared store contract (`store_suite`), then what only it has (the
//! file, converting an older file).

mod store_suite;

use std::sync::Arc;

use kubechat_gateway::store::embedded::{DB_FILE, EmbeddedStore};
use kubechat_gateway::store::{Group, InboxEntry, Page, Store, StoreError};
use store_suite::{message, send};
use tempfile::TempDir;

fn open() -> (TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("open store");
    (dir, store)
}

fn open_shared() -> (TempDir, Arc<dyn Store>) {
    let (dir, store) = open();
    (dir, Arc::new(store))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_to_one_round_trip() {
    let (_dir, store) = open();
    store_suite::one_to_one_round_trip(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markers_only_move_forward() {
    let (_dir, store) = open();
    store_suite::markers_only_move_forward(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_key_is_stored_once() {
    let (_dir, store) = open();
    store_suite::a_retried_key_is_stored_once(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_retries_store_one_message() {
    let (_dir, store) = open_shared();
    store_suite::racing_retries_store_one_message(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_pages_cover_every_entry_once_in_order() {
    let (_dir, store) = open();
    store_suite::inbox_pages_cover_every_entry_once_in_order(&store).await;
    // A user id with a NUL byte sorts right after "u" in the key order.
    let m = message(u64::MAX / 2, "g:1", "alice", "nul");
    store.store_message(send(&m, "nul", &["u\u{0}"], u64::MAX / 2)).await.expect("store");
    assert_eq!(store.inbox_after("u", 0, 1000).await.expect("u").len(), 250);
    assert_eq!(store.inbox_after("u", u64::MAX, 10).await.expect("after max"), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_both_ways() {
    let (_dir, store) = open();
    store_suite::history_pages_both_ways(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_members_and_channels() {
    let (_dir, store) = open();
    store_suite::groups_members_and_channels(&store).await;
}

#[tokio::test]
async fn suite_a_key_reused_for_another_channel_is_refused() {
    let (_dir, store) = open();
    store_suite::a_key_reused_for_another_channel_is_refused(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn suite_the_member_limit_holds_under_racing_joins() {
    let (_dir, store) = open();
    store_suite::the_member_limit_holds_under_racing_joins(Arc::new(store)).await;
}

/// 50 senders at once: every message lands, and they share log commits
/// (one `fdatasync` per queued batch, not per write).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_senders_all_land_through_group_commit() {
    let (_dir, store) = open();
    let store = Arc::new(store);
    let (tasks, per_task) = (50, 100);
    store_suite::concurrent_senders_all_land(Arc::clone(&store) as Arc<dyn Store>, tasks, per_task).await;
    let (writes, records) = ((tasks * per_task) as u64, store.log_records());
    assert!(records > 0, "the writes were logged");
    // One commit per write would be `writes` records; 50 writers waiting on
    // each commit share it, so even a slow disk gives far fewer.
    assert!(records * 4 <= writes, "{writes} concurrent writes took {records} log commits");
}

/// A group message stores its text once: each member's inbox entry is a
/// reference, so the file grows by far less than members × text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_message_stores_its_text_once() {
    let (dir, store) = open();
    let members: Vec<String> = (0..100).map(|i| format!("member-{i:03}")).collect();
    let recipients: Vec<&str> = members.iter().map(String::as_str).collect();
    let text = "x".repeat(2000);
    let size = || std::fs::metadata(dir.path().join(DB_FILE)).expect("db file").len();
    // Warm up so the file's initial allocation does not count.
    for i in 0..20 {
        let m = message(1_000 + i, "g:warm", "alice", &text);
        store.store_message(send(&m, &format!("w{i}"), &recipients, 10_000 + i)).await.expect("store");
    }
    let before = size();
    let count = 200_u64;
    for i in 0..count {
        let m = message(100_000 + i, "g:1", "alice", &text);
        store.store_message(send(&m, &format!("k{i}"), &recipients, 1_000_000 + i)).await.expect("store");
    }
    let per_message = (size() - before) / count;
    // Copies in every inbox would be 100 × 2 KB = 200 KB per message.
    assert!(per_message < 2 * 2000 + 100 * 200, "{per_message} bytes stored per 2 KB message to 100 members");
    assert_eq!(store.inbox_after("member-042", 999_999, 1000).await.expect("inbox").len(), 200);
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
        store.store_message(send(&m, "k", &["bob"], 7)).await.expect("store");
        store.store_message(send(&message(90, "g:2", "bob", "older"), "k", &[], 8)).await.expect("store older");
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
    assert_eq!(
        store.inbox_after("bob", 0, 10).await.expect("inbox"),
        vec![InboxEntry { position: 7, message: m.clone() }]
    );
    assert_eq!(store.members("g:1").await.expect("members"), vec!["alice", "bob"]);
    let retry = store.store_message(send(&message(501, "g:1", "alice", "persisted"), "k", &["bob"], 9)).await;
    assert_eq!(retry.expect("retry after reopen").message, m, "the key survived the restart");
    assert_eq!(store.max_id().await.expect("max id"), 500);
}

/// Folders written by earlier layouts of the inbox open with it converted,
/// nothing lost: entries holding the message JSON (table `inbox`), entries
/// holding `(channel, id)` (table `inbox_refs`), and one 16-byte key per
/// entry (table `inbox_entries`, before inboxes were kept in chunks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_inboxes_are_converted_on_open() {
    type Pair = (&'static str, u64);
    let m = message(700, "g:1", "alice", "from before");
    let json = serde_json::to_vec(&m).expect("json");
    let write_old = |dir: &std::path::Path, layout: u8| {
        let db = redb::Database::create(dir.join(DB_FILE)).expect("create");
        let txn = db.begin_write().expect("write");
        {
            let mut messages = txn.open_table(redb::TableDefinition::<Pair, &[u8]>::new("messages")).expect("messages");
            messages.insert(("g:1", 700), json.as_slice()).expect("insert");
            if layout == 3 {
                let mut users = txn.open_table(redb::TableDefinition::<&str, u64>::new("users")).expect("users");
                users.insert("bob", 0).expect("insert");
                users.insert("carol", 1).expect("insert");
                let mut meta = txn.open_table(redb::TableDefinition::<&str, u64>::new("meta")).expect("meta");
                meta.insert("next_user", 2).expect("insert");
                let mut positions = txn.open_table(redb::TableDefinition::<u64, Pair>::new("positions")).expect("pos");
                positions.insert(701, ("g:1", 700)).expect("insert");
                positions.insert(702, ("g:1", 700)).expect("insert");
                let mut inbox =
                    txn.open_table(redb::TableDefinition::<u128, ()>::new("inbox_entries")).expect("entries");
                inbox.insert(701_u128, ()).expect("insert");
                inbox.insert((1_u128 << 64) | 702, ()).expect("insert");
            } else if layout == 2 {
                let mut inbox = txn.open_table(redb::TableDefinition::<Pair, Pair>::new("inbox_refs")).expect("refs");
                inbox.insert(("bob", 701), ("g:1", 700)).expect("insert");
                inbox.insert(("carol", 702), ("g:1", 700)).expect("insert");
            } else {
                let mut inbox = txn.open_table(redb::TableDefinition::<Pair, &[u8]>::new("inbox")).expect("inbox");
                inbox.insert(("bob", 701), json.as_slice()).expect("insert");
                inbox.insert(("carol", 702), json.as_slice()).expect("insert");
            }
        }
        txn.commit().expect("commit");
    };
    for layout in [1, 2, 3] {
        let dir = tempfile::tempdir().expect("tempdir");
        write_old(dir.path(), layout);
        let store = EmbeddedStore::open(dir.path()).expect("open converts");
        assert_eq!(
            store.inbox_after("bob", 0, 10).await.expect("bob"),
            vec![InboxEntry { position: 701, message: m.clone() }],
            "layout {layout}"
        );
        assert_eq!(store.inbox_after("carol", 0, 10).await.expect("carol").len(), 1);
        assert_eq!(store.history("g:1", Page::Latest, 10).await.expect("history"), vec![m.clone()]);
        // New entries land beside the converted ones, for old and new users.
        let next = message(800, "g:1", "bob", "after the upgrade");
        store.store_message(send(&next, "k", &["carol", "dave"], 801)).await.expect("store");
        assert_eq!(store.inbox_after("carol", 0, 10).await.expect("carol").len(), 2);
        assert_eq!(store.inbox_after("dave", 0, 10).await.expect("dave").len(), 1);
        drop(store);
        // Converted once: a second open finds nothing left to do.
        let store = EmbeddedStore::open(dir.path()).expect("reopen");
        assert_eq!(store.inbox_after("bob", 0, 10).await.expect("bob again").len(), 1);
        assert_eq!(store.inbox_after("carol", 0, 10).await.expect("carol again").len(), 2);
    }
}

/// Push jobs queued by earlier versions (nothing ever consumed them) are
/// dropped when the store opens, with their counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_jobs_of_earlier_versions_are_dropped_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let push: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("push");
    let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
    {
        let db = redb::Database::create(dir.path().join(DB_FILE)).expect("create");
        let txn = db.begin_write().expect("write");
        {
            let mut jobs = txn.open_table(push).expect("push");
            for seq in 1..=3_u64 {
                jobs.insert(seq, br#"{"user":"bob"}"#.as_slice()).expect("job");
            }
            txn.open_table(meta).expect("meta").insert("push_seq", 3).expect("counter");
        }
        txn.commit().expect("commit");
    }
    drop(EmbeddedStore::open(dir.path()).expect("open converts"));
    let db = redb::Database::open(dir.path().join(DB_FILE)).expect("reopen");
    let txn = redb::ReadableDatabase::begin_read(&db).expect("read");
    assert!(matches!(txn.open_table(push), Err(redb::TableError::TableDoesNotExist(_))), "the queue is gone");
    assert_eq!(txn.open_table(meta).expect("meta").get("push_seq").expect("get").map(|v| v.value()), None);
}
