//! The standalone gateway's write-ahead log against damage a real process
//! meets. Whatever happened, an acknowledged message is either there after
//! a restart or the gateway refuses to start and says why; it never starts
//! without it.

mod standalone;

use std::path::Path;

use kubechat_gateway::store::embedded::DB_FILE;
use standalone::{Gateway, data_dir, inbox, refused, send_acked};

/// A gateway on a fresh folder: alice sends `count` messages to bob, then
/// the process is killed (nothing checkpointed: only the log holds them).
async fn acked_then_killed(root: &Path, prefix: &str, count: usize) -> Vec<String> {
    let mut gateway = Gateway::start(root);
    let mut alice = gateway.connect("alice").await;
    let acked = send_acked(&mut alice, "bob", prefix, count).await;
    gateway.kill();
    acked
}

/// Starts a gateway on `root` and returns what is in bob's inbox.
async fn bobs_inbox(root: &Path) -> Vec<String> {
    let mut gateway = Gateway::start(root);
    let mut bob = gateway.connect("bob").await;
    let ids = inbox(&mut bob).await;
    gateway.kill();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_write_the_database_cannot_take_stops_the_start() {
    let root = tempfile::tempdir().expect("tempdir");
    let acked = acked_then_killed(root.path(), "m", 10).await;

    // A damaged database: the key of the 4th send is there without its message,
    // so replaying that send fails (the ones after it would not).
    let db_path = data_dir(root.path()).join(DB_FILE);
    let sends: redb::TableDefinition<(&str, &str), (u64, &str)> = redb::TableDefinition::new("sends");
    let edit = |insert: bool| {
        let db = redb::Database::create(&db_path).expect("open the database");
        let txn = db.begin_write().expect("write");
        {
            let mut table = txn.open_table(sends).expect("sends");
            if insert {
                table.insert(("alice", "m3"), (12_345, "dm:alice:bob")).expect("insert");
            } else {
                table.remove(("alice", "m3")).expect("remove");
            }
        }
        txn.commit().expect("commit");
    };
    edit(true);

    let why = refused(root.path());
    assert!(why.contains("replaying log record") && why.contains("without the message"), "{why}");

    // Nothing was checkpointed past it: repaired, all ten are there.
    edit(false);
    assert_eq!(bobs_inbox(root.path()).await, acked);
}

/// The standalone gateway has no push workers: a message to an offline
/// user leaves no job behind that nobody would ever consume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_offline_users_leave_no_push_jobs_behind() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut gateway = Gateway::start(root.path());
    let mut alice = gateway.connect("alice").await;
    send_acked(&mut alice, "bob", "m", 20).await;
    assert!(gateway.stop().success());

    let db = redb::Database::open(data_dir(root.path()).join(DB_FILE)).expect("open the database");
    let txn = redb::ReadableDatabase::begin_read(&db).expect("read");
    let push: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("push");
    let jobs = match txn.open_table(push) {
        Ok(table) => redb::ReadableTableMetadata::len(&table).expect("count"),
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(err) => panic!("reading the push table: {err}"),
    };
    assert_eq!(jobs, 0, "push jobs nobody consumes");
}
