//! The two threads every write of the embedded store goes through, after
//! [`replay`] brought redb up to date with the log:
//!
//! - The **logger** takes every request queued when its turn starts (group
//!   commit, up to [`MAX_BATCH`]), decides each answer, appends the batch to
//!   the write-ahead log (one `fdatasync`: now it is durable) and answers.
//!   Answers depend on little: whether a send's idempotency key was seen (in
//!   redb, or in a batch logged but not yet applied: the [`Pending`] keys).
//!   The logger alone forgets pending keys, and only those applied before
//!   its read snapshot began, so a key is always in one or the other. A
//!   request whose caller stopped waiting (its deadline passed) and that is
//!   not logged yet is dropped, not written.
//! - The **applier** applies logged batches to redb (transactions visible at
//!   once, durable at the next checkpoint), gathering them for up to
//!   [`APPLY_EVERY`] unless a read is waiting (a redb transaction's cost is
//!   mostly per commit: the copied and re-hashed pages of every tree it
//!   touches), and takes a checkpoint every [`CHECKPOINT_EVERY`] (or as
//!   configured) or when the log asks for one. A checkpoint writes back
//!   every page touched since the last one, tens of milliseconds at
//!   thousands of messages a second: nobody's answer waits for it. A batch
//!   it cannot apply, or a checkpoint that fails (a full disk), stops it:
//!   no write is accepted until a restart replays the log, and the restart
//!   refuses to start while a logged write still cannot be applied, so
//!   nothing is ever checkpointed past an acknowledged write.
//!
//! Reads see every write answered before they started: a read first waits
//! until the applier has applied everything the logger had acknowledged
//! ([`Progress::caught_up`]); a read that has to wait wakes the applier, so
//! it waits for one transaction (longer only while a checkpoint runs).

mod applier;
mod logger;
mod replay;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc as std_mpsc};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use redb::Database;
use tokio::sync::{Notify, mpsc};

use self::logger::{Logger, Pending};
use self::replay::Replayed;
use super::ops::{Op, Request};
use super::wal;
use super::{META, storage};
use crate::store::{StoreError, StoreResult};

/// Most requests logged in one record: bounds the latency a request waits
/// behind others while still amortizing the fsync.
pub const MAX_BATCH: usize = 512;

/// The longest the B-trees go without a checkpoint by default (which bounds
/// how much a restart replays from the log). A checkpoint's burst of page
/// write-back slows the log's fsyncs while it lasts, so acks around it wait:
/// at one a minute p99.9 was 40-75 ms, every 10 s 8-20 ms, for ~11 % more
/// bytes written (hot pages written back more often). docs/benchmarks.md
/// has the runs.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);

/// Logged batches the applier may lag behind by before the logger waits.
const APPLY_QUEUE: usize = 1024;

/// The longest the applier gathers logged batches into one transaction
/// while no read waits. At 5,000 sends a second this is ~50 commits a
/// second instead of one per log append (about a thousand).
pub const APPLY_EVERY: Duration = Duration::from_millis(20);

/// Most writes the applier puts in one transaction (bounds its memory and
/// how long one commit holds the writer).
const APPLY_MOST: usize = 4096;

/// Where the two threads stand, by log sequence number.
pub struct Progress {
    /// The newest record when the store opened.
    opened_at: u64,
    /// The newest record logged and answered.
    acked: AtomicU64,
    /// The newest record applied to redb (visible to reads).
    applied: AtomicU64,
    /// The newest record a checkpoint made durable in redb.
    durable: AtomicU64,
    /// The log's active file is past half full: checkpoint soon.
    checkpoint_wanted: AtomicBool,
    /// Why the applier stopped: no write is accepted after it.
    failed: Mutex<Option<String>>,
    /// Woken whenever `applied` moves (or the applier fails).
    advanced: Notify,
    /// A read waits for writes the applier is still gathering.
    read_waiting: AtomicBool,
    /// The applier's thread, unparked by a read that waits.
    applier: OnceLock<Thread>,
}

impl Progress {
    fn new(seq: u64) -> Self {
        Self {
            opened_at: seq,
            acked: AtomicU64::new(seq),
            applied: AtomicU64::new(seq),
            durable: AtomicU64::new(seq),
            checkpoint_wanted: AtomicBool::new(false),
            failed: Mutex::new(None),
            advanced: Notify::new(),
            read_waiting: AtomicBool::new(false),
            applier: OnceLock::new(),
        }
    }

    fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn fail(&self, why: String) {
        *self.failed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(why);
        self.advanced.notify_waiters();
    }

    /// Log records appended since the store opened.
    pub fn logged_since_open(&self) -> u64 {
        self.acked.load(Ordering::Acquire).saturating_sub(self.opened_at)
    }

    /// Waits until every write answered so far is applied (readable).
    pub async fn caught_up(&self) -> StoreResult<()> {
        let target = self.acked.load(Ordering::Acquire);
        loop {
            let advanced = self.advanced.notified();
            tokio::pin!(advanced);
            // Registered before the check, so an advance right after it is not missed.
            advanced.as_mut().enable();
            if self.applied.load(Ordering::Acquire) >= target {
                return Ok(());
            }
            if let Some(why) = self.failure() {
                return Err(StoreError::Unavailable(format!("embedded store stopped applying writes: {why}")));
            }
            // Again after each advance: the record this read waits for may
            // have reached the applier after the transaction it woke.
            self.read_waiting.store(true, Ordering::Release);
            if let Some(applier) = self.applier.get() {
                applier.unpark();
            }
            advanced.await;
        }
    }
}

/// The running threads; dropping the request sender ends them (the applier
/// takes a last checkpoint).
pub struct Threads {
    pub logger: JoinHandle<()>,
    pub applier: JoinHandle<()>,
}

/// Replays the log into redb, checkpoints, and starts the two threads.
pub fn start(
    db: Arc<Database>,
    log: &Path,
    queue: mpsc::Receiver<Request>,
    checkpoint_every: Duration,
) -> StoreResult<(Arc<Progress>, Threads)> {
    let Replayed { wal, last, users } = replay::replay(&db, log)?;
    let progress = Arc::new(Progress::new(last));
    let (to_applier, applier_queue) = std_mpsc::sync_channel(APPLY_QUEUE);
    let applier = {
        let (db, progress) = (Arc::clone(&db), Arc::clone(&progress));
        std::thread::Builder::new()
            .name("kubechat-store-apply".into())
            .spawn(move || applier::run_applier(&db, applier_queue, &progress, users, checkpoint_every))
            .map_err(|err| StoreError::Unavailable(format!("starting the embedded store applier: {err}")))?
    };
    // Set once, before any read can wait.
    let _ = progress.applier.set(applier.thread().clone());
    let logger = Logger { db, wal, progress: Arc::clone(&progress), pending: Pending::default(), to_applier };
    let logger = std::thread::Builder::new()
        .name("kubechat-store-log".into())
        .spawn(move || logger.run(queue))
        .map_err(|err| StoreError::Unavailable(format!("starting the embedded store logger: {err}")))?;
    Ok((progress, Threads { logger, applier }))
}

/// A log that cannot be opened: the database is untouched (nothing after its
/// last checkpoint was replayed into it durably).
fn log_error(err: wal::LogError) -> StoreError {
    match err {
        wal::LogError::Io { .. } => StoreError::Unavailable(err.to_string()),
        other => StoreError::Corrupt(other.to_string()),
    }
}

/// Sets a `meta` counter in a durable commit of its own.
fn set_meta(db: &Database, name: &str, value: u64) -> StoreResult<()> {
    let txn = db.begin_write().map_err(storage("starting a write"))?;
    {
        let mut meta = txn.open_table(META).map_err(storage("opening meta"))?;
        meta.insert(name, value).map_err(storage("writing meta"))?;
    }
    txn.commit().map_err(storage("committing meta"))
}

/// A durable redb commit of everything applied so far.
fn checkpoint(db: &Database) -> StoreResult<()> {
    let txn = db.begin_write().map_err(storage("starting a checkpoint"))?;
    txn.commit().map_err(storage("committing a checkpoint"))
}

/// The same error with its detail rewritten.
fn with_detail(err: StoreError, detail: impl FnOnce(String) -> String) -> StoreError {
    match err {
        StoreError::Unavailable(e) => StoreError::Unavailable(detail(e)),
        StoreError::Corrupt(e) => StoreError::Corrupt(detail(e)),
        other @ StoreError::KeyReused { .. } => other,
    }
}

/// `StoreError` is not `Clone`; a batch's one error goes to every request.
fn same_error(err: &StoreError) -> StoreError {
    match err {
        StoreError::Unavailable(detail) => StoreError::Unavailable(detail.clone()),
        StoreError::Corrupt(detail) => StoreError::Corrupt(detail.clone()),
        StoreError::KeyReused { key, channel } => StoreError::KeyReused { key: key.clone(), channel: channel.clone() },
    }
}

/// A batch the logger made durable as log record `.0`, for the applier.
type Logged = (u64, Vec<Op>);
