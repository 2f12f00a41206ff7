//! The standalone gateway's write-ahead log against damage a real process
//! meets: records corrupted, files truncated or replaced (by older copies,
//! by the log of an earlier layout), a database that cannot take a logged
//! write, and a full disk. Whatever happened, an acknowledged message is
//! either there after a restart or the gateway refuses to start and says
//! why; it never starts without it.

mod standalone;

use std::path::{Path, PathBuf};

use kubechat_gateway::ids::IdGenerator;
use kubechat_gateway::store::Message;
use kubechat_gateway::store::embedded::{DB_FILE, LOG_FILE};
use standalone::{Gateway, data_dir, inbox, log_record, log_records, refused, send, send_acked};

/// Bytes each log file holds from the start (as documented in docs/standalone.md).
const LOG_FILE_BYTES: u64 = 128 * 1024 * 1024;

fn log_file(root: &Path, n: u8) -> PathBuf {
    data_dir(root).join(format!("{LOG_FILE}.{n}"))
}

/// A gateway on a fresh folder: alice sends `count` messages to bob, then
/// the process is killed (nothing checkpointed: only the log holds them).
async fn acked_then_killed(root: &Path, prefix: &str, count: usize) -> Vec<String> {
    let mut gateway = Gateway::start_without_timed_checkpoints(root);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_stops_the_start_until_it_is_repaired() {
    let root = tempfile::tempdir().expect("tempdir");
    let acked = acked_then_killed(root.path(), "m", 30).await;

    let path = log_file(root.path(), 0);
    let original = std::fs::read(&path).expect("read the log");
    let records = log_records(&original);
    assert!(records.len() >= 30, "one record per acked send: {records:?}");
    // A bit flipped in the 11th record's payload; 19 intact records follow it.
    let (offset, seq, _) = records[10];
    let mut damaged = original.clone();
    damaged[offset + 16 + 5] ^= 0x40;
    std::fs::write(&path, &damaged).expect("damage the log");

    let why = refused(root.path());
    assert!(why.contains(&format!("log record {seq}")) && why.contains("is damaged"), "{why}");
    assert!(why.contains(&path.display().to_string()), "names the file: {why}");

    // Nothing was checkpointed past the damage: repaired, everything is back.
    std::fs::write(&path, &original).expect("repair the log");
    assert_eq!(bobs_inbox(root.path()).await, acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_log_file_stops_the_start() {
    let root = tempfile::tempdir().expect("tempdir");
    let acked = acked_then_killed(root.path(), "m", 30).await;

    let path = log_file(root.path(), 0);
    let original = std::fs::read(&path).expect("read the log");
    let (offset, _, _) = log_records(&original)[20];
    let file = std::fs::OpenOptions::new().write(true).open(&path).expect("open the log");
    file.set_len(offset as u64 + 7).expect("truncate");
    drop(file);

    let why = refused(root.path());
    assert!(why.contains("truncated") && why.contains(&path.display().to_string()), "{why}");

    std::fs::write(&path, &original).expect("put the whole file back");
    assert_eq!(bobs_inbox(root.path()).await, acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_files_replaced_by_older_copies_stop_the_start() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut acked = acked_then_killed(root.path(), "a", 10).await;
    let older: Vec<Vec<u8>> = (0..2).map(|n| std::fs::read(log_file(root.path(), n)).expect("copy")).collect();

    // The next run replays and checkpoints those, then logs ten more.
    let mut gateway = Gateway::start(root.path());
    let mut alice = gateway.connect("alice").await;
    acked.extend(send_acked(&mut alice, "bob", "b", 10).await);
    gateway.kill();
    let newer: Vec<Vec<u8>> = (0..2).map(|n| std::fs::read(log_file(root.path(), n)).expect("copy")).collect();

    // Consistent with the database's last checkpoint, but not its log.
    for (n, bytes) in older.iter().enumerate() {
        std::fs::write(log_file(root.path(), n as u8), bytes).expect("replace");
    }
    let why = refused(root.path());
    assert!(why.contains("were replaced"), "{why}");

    for (n, bytes) in newer.iter().enumerate() {
        std::fs::write(log_file(root.path(), n as u8), bytes).expect("restore");
    }
    assert_eq!(bobs_inbox(root.path()).await, acked);
}

/// A log payload holding sends as the one-file log (format 0) wrote them.
fn format_0_sends(messages: &[(&Message, &str, u64)]) -> Vec<u8> {
    let bytes = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    };
    let mut payload = Vec::new();
    for (message, key, position) in messages {
        payload.push(1);
        bytes(&mut payload, message.sender.as_bytes());
        bytes(&mut payload, key.as_bytes());
        bytes(&mut payload, message.channel.as_bytes());
        payload.extend_from_slice(&message.id.to_le_bytes());
        bytes(&mut payload, &serde_json::to_vec(message).expect("json"));
        payload.extend_from_slice(&position.to_le_bytes());
        payload.extend_from_slice(&2_u64.to_le_bytes());
        bytes(&mut payload, b"alice");
        bytes(&mut payload, b"bob");
        payload.push(1);
    }
    payload
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_of_the_earlier_one_file_layout_is_replayed_not_ignored() {
    let root = tempfile::tempdir().expect("tempdir");
    let ids = IdGenerator::new(1, 0);
    let messages: Vec<Message> = (0..3)
        .map(|i| {
            let id = ids.next_id();
            Message {
                id,
                channel: "dm:alice:bob".into(),
                sender: "alice".into(),
                sender_device: "phone".into(),
                text: format!("from before {i}"),
                created_at_ms: kubechat_gateway::ids::timestamp_ms(id),
            }
        })
        .collect();
    // Two records (the second holds two sends), acked by the old version
    // and never checkpointed: only `kubechat.wal` has them.
    let keys = ["old-0", "old-1", "old-2"];
    let positions: Vec<u64> = (0..3).map(|_| ids.next_id()).collect();
    let mut log = log_record(1, &format_0_sends(&[(&messages[0], keys[0], positions[0])]));
    log.extend(log_record(
        2,
        &format_0_sends(&[(&messages[1], keys[1], positions[1]), (&messages[2], keys[2], positions[2])]),
    ));
    let old = data_dir(root.path()).join(LOG_FILE);
    std::fs::create_dir_all(data_dir(root.path())).expect("data dir");
    std::fs::write(&old, &log).expect("write the old log");

    let mut gateway = Gateway::start(root.path());
    let mut bob = gateway.connect("bob").await;
    let expected: Vec<String> = messages.iter().map(|m| m.id.to_string()).collect();
    assert_eq!(inbox(&mut bob).await, expected, "replayed from {}", old.display());
    let mut alice = gateway.connect("alice").await;
    let retry = send(&mut alice, "bob", "from before 2", "old-2").await;
    assert_eq!(
        (retry["duplicate"].clone(), retry["id"].clone()),
        (serde_json::json!(true), expected[2].clone().into())
    );
    assert!(!old.exists(), "the old log is removed once its writes are checkpointed");
    assert!(gateway.stop().success());

    // The same file beside the current log cannot be placed in it: refused, named.
    std::fs::write(&old, &log).expect("write the old log again");
    let why = refused(root.path());
    assert!(why.contains(&old.display().to_string()) && why.contains("earlier"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_files_hold_their_space_from_the_start() {
    use std::os::unix::fs::MetadataExt;
    let root = tempfile::tempdir().expect("tempdir");
    let mut gateway = Gateway::start(root.path());
    gateway.connect("alice").await;
    for n in 0..2 {
        let meta = std::fs::metadata(log_file(root.path(), n)).expect("log file");
        assert!(
            meta.blocks() * 512 >= LOG_FILE_BYTES,
            "{LOG_FILE}.{n} has {} bytes allocated of {}",
            meta.blocks() * 512,
            meta.len()
        );
    }
}

/// A small filesystem of the test's own (a tmpfs), to fill; unmounted when
/// dropped. Mounting needs root, which the suite has (CI runs as root): the
/// test fails, not skips, where it cannot.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, bytes: u64) -> Self {
        std::fs::create_dir_all(dir).expect("mount point");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output();
        match mounted {
            Ok(output) if output.status.success() => Self { dir: dir.to_path_buf() },
            Ok(output) => panic!(
                "this test fills a disk of its own: mounting a {bytes}-byte tmpfs at {} failed (it needs root): {}",
                dir.display(),
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(err) => panic!("this test fills a disk of its own: running mount failed: {err}"),
        }
    }

    fn filler(&self) -> PathBuf {
        self.dir.join("filler")
    }

    /// Writes a file until the disk refuses more (ENOSPC); its size.
    fn fill(&self) -> u64 {
        use std::io::Write;
        let mut file = std::fs::File::create(self.filler()).expect("filler");
        let mut written = 0;
        for chunk in [1024 * 1024, 4096, 1] {
            let bytes = vec![1_u8; chunk];
            loop {
                match file.write(&bytes) {
                    Ok(0) => break,
                    Ok(n) => written += n as u64,
                    Err(err) if err.raw_os_error() == Some(28) => break,
                    Err(err) => panic!("filling the disk: {err}"),
                }
            }
        }
        written
    }

    fn free(&self) {
        std::fs::remove_file(self.filler()).expect("remove the filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_no_acked_message() {
    let root = tempfile::tempdir().expect("tempdir");
    // Room for the two log files, and for the database once the filler is gone.
    let disk = SmallDisk::mount(&data_dir(root.path()), 2 * LOG_FILE_BYTES + 192 * 1024 * 1024);
    // The first checkpoint must be the one half a log file asks for, below.
    let mut gateway = Gateway::start_without_timed_checkpoints(root.path());
    let mut alice = gateway.connect("alice").await;
    let mut acked = send_acked(&mut alice, "bob", "before", 20).await;

    let filled = disk.fill();
    assert!(filled > 0, "the disk had room left to fill");
    // The log's space was taken when it was created: it still takes writes.
    acked.extend(send_acked(&mut alice, "bob", "full", 20).await);

    // Past half a log file the store must checkpoint into the database,
    // which has no room: from then on sends are refused, none acked unlogged.
    let mut senders = Vec::new();
    for n in 0..8 {
        let mut socket = gateway.connect(&format!("sender-{n}")).await;
        senders.push(tokio::spawn(async move {
            let text = "x".repeat(100_000);
            let mut answers = Vec::new();
            for i in 0..90 {
                answers.push(send(&mut socket, "bob", &text, &format!("big-{n}-{i}")).await);
            }
            answers
        }));
    }
    let mut refusals = 0;
    for sender in senders {
        for answer in sender.await.expect("sender") {
            match answer["type"].as_str() {
                Some("ack") => acked.push(answer["id"].as_str().expect("id").to_string()),
                _ => {
                    assert_eq!(answer["code"], "storage_unavailable", "{answer}");
                    refusals += 1;
                }
            }
        }
    }
    // The checkpoint may still be under way: sends are refused once it failed.
    let started = std::time::Instant::now();
    let mut i = 0;
    while refusals == 0 {
        let answer = send(&mut alice, "bob", "after", &format!("after{i}")).await;
        match answer["type"].as_str() {
            Some("ack") => acked.push(answer["id"].as_str().expect("id").to_string()),
            _ => {
                assert_eq!(answer["code"], "storage_unavailable", "{answer}");
                refusals += 1;
            }
        }
        assert!(started.elapsed().as_secs() < 30, "sends still acked 30 s after the store could not checkpoint");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        i += 1;
    }
    gateway.kill();

    // Still full: the acked writes cannot be replayed into the database.
    let why = refused(root.path());
    assert!(why.contains("No space left on device"), "{why}");

    disk.free();
    let mut stored = bobs_inbox(root.path()).await;
    stored.sort();
    acked.sort();
    assert_eq!(stored.len(), acked.len(), "acked {} messages, {} stored", acked.len(), stored.len());
    assert_eq!(stored, acked, "every acked message, and no refused one");
}
