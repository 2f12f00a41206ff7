//! The two threads every write of the embedded store goes through.
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
//!   once, durable at the next checkpoint) and takes a checkpoint every
//!   [`CHECKPOINT_EVERY`] or when the log asks for one. A checkpoint writes
//!   back every page touched since the last one, tens of milliseconds at
//!   thousands of messages a second: nobody's answer waits for it. A batch
//!   it cannot apply, or a checkpoint that fails (a full disk), stops it:
//!   no write is accepted until a restart replays the log, and the restart
//!   refuses to start while a logged write still cannot be applied, so
//!   nothing is ever checkpointed past an acknowledged write.
//!
//! Reads see every write answered before they started: a read first waits
//! until the applier has applied everything the logger had acknowledged
//! ([`Progress::caught_up`]); that is immediate unless a checkpoint is in
//! progress.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadTransaction, ReadableDatabase};
use tokio::sync::{Notify, mpsc};

use super::ops::{Done, Op, Request, decode_ops};
use super::tables::{UserNumbers, apply};
use super::wal::{self, Wal};
use super::{MESSAGES, META, META_LOG_RUN, META_STORE_ID, META_WAL_SEQ, SENDS, storage};
use crate::store::{StoreError, StoreResult};

/// Most requests logged in one record: bounds the latency a request waits
/// behind others while still amortizing the fsync.
pub const MAX_BATCH: usize = 512;

/// The longest the B-trees go without a checkpoint (which bounds how much a
/// restart replays from the log). Rare on purpose: a checkpoint's burst of
/// page write-back slows the log's fsyncs while it lasts (150 ms at 5,000
/// messages a second after a minute), so acks around it wait that long.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(60);

/// Logged batches the applier may lag behind by before the logger waits.
const APPLY_QUEUE: usize = 1024;

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
            advanced.await;
        }
    }
}

/// Sends logged but not yet applied, by `(sender, key)`: a retry of one
/// must be answered as a duplicate before redb has it.
#[derive(Default)]
struct Pending {
    keys: HashMap<(String, String), Vec<u8>>,
    /// In log order, to forget them once applied.
    order: VecDeque<(u64, (String, String))>,
}

impl Pending {
    /// Forgets the keys of records up to `seq`: a read snapshot begun after
    /// the applier reported `seq` has them.
    fn forget_through(&mut self, seq: u64) {
        while self.order.front().is_some_and(|(at, _)| *at <= seq) {
            if let Some((_, key)) = self.order.pop_front() {
                self.keys.remove(&key);
            }
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
pub fn start(db: Arc<Database>, log: &Path, queue: mpsc::Receiver<Request>) -> StoreResult<(Arc<Progress>, Threads)> {
    let read_meta = |name| -> StoreResult<Option<u64>> {
        let txn = db.begin_read().map_err(storage("starting a read"))?;
        let meta = txn.open_table(META).map_err(storage("opening meta"))?;
        Ok(meta.get(name).map_err(storage("reading meta"))?.map(|v| v.value()))
    };
    let applied = read_meta(META_WAL_SEQ)?.unwrap_or(0);
    let last_run = read_meta(META_LOG_RUN)?.unwrap_or(0);
    let store = match read_meta(META_STORE_ID)? {
        Some(store) => store,
        None => {
            // Durable before any log file carries it.
            let store = getrandom::u64()
                .map_err(|err| StoreError::Unavailable(format!("no randomness for the store's id: {err}")))?;
            set_meta(&db, META_STORE_ID, store)?;
            store
        }
    };
    let recovery = wal::recover(log, applied, store, last_run).map_err(log_error)?;
    let mut users = UserNumbers::new(1_000_000);
    let mut last = applied;
    let replayed = recovery.pending.len();
    for record in &recovery.pending {
        let ops = decode_ops(&record.payload, record.format)
            .ok_or_else(|| StoreError::Corrupt(format!("log record {} holds no valid writes", record.seq)))?;
        // Every write in the log was acknowledged: one that cannot be
        // applied stops the open before anything is checkpointed past it.
        let refs: Vec<&Op> = ops.iter().collect();
        apply(&db, &refs, &mut users, record.seq).map_err(|err| {
            with_detail(err, |e| {
                format!(
                    "replaying log record {} failed: {e}; nothing after record {applied} was checkpointed, so the \
                     next start replays it again: fix the cause (free disk space, repair the database) and start again",
                    record.seq
                )
            })
        })?;
        last = record.seq;
    }
    checkpoint(&db).map_err(|err| {
        with_detail(err, |e| {
            format!(
                "the replayed log could not be checkpointed: {e}; nothing was lost (the next start replays it \
                 again): fix the cause (free disk space) and start again"
            )
        })
    })?;
    if replayed > 0 {
        tracing::info!(records = replayed, "replayed the embedded store's log");
    }
    let run = last_run + 1;
    let wal = recovery.start(last, store, run).map_err(log_error)?;
    set_meta(&db, META_LOG_RUN, run)?;

    let progress = Arc::new(Progress::new(last));
    let (to_applier, applier_queue) = std_mpsc::sync_channel(APPLY_QUEUE);
    let applier = {
        let (db, progress) = (Arc::clone(&db), Arc::clone(&progress));
        std::thread::Builder::new()
            .name("kubechat-store-apply".into())
            .spawn(move || run_applier(&db, applier_queue, &progress, users))
            .map_err(|err| StoreError::Unavailable(format!("starting the embedded store applier: {err}")))?
    };
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

struct Logger {
    db: Arc<Database>,
    wal: Wal,
    progress: Arc<Progress>,
    pending: Pending,
    to_applier: std_mpsc::SyncSender<Logged>,
}

impl Logger {
    fn run(mut self, mut queue: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = queue.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.log_batch(&mut batch);
        }
        // Dropping `to_applier` lets the applier finish and checkpoint.
    }

    fn refuse(batch: &mut Vec<Request>, err: &StoreError) {
        for request in batch.drain(..) {
            let _ = request.reply.send(Err(same_error(err)));
        }
    }

    fn log_batch(&mut self, batch: &mut Vec<Request>) {
        // A caller that stopped waiting (its deadline passed) was told its
        // write may have been stored: one not logged yet is dropped instead.
        batch.retain(|request| !request.reply.is_closed());
        if batch.is_empty() {
            return;
        }
        if let Some(why) = self.progress.failure() {
            return Self::refuse(batch, &StoreError::Unavailable(format!("embedded store stopped: {why}")));
        }
        let seq = self.wal.next_seq();
        // Read before the snapshot (begun lazily below) is: it sees at least this.
        self.pending.forget_through(self.progress.applied.load(Ordering::Acquire));
        let mut answers = Vec::with_capacity(batch.len());
        let mut read = None;
        let mut fresh_keys = Vec::new();
        for request in batch.iter() {
            answers.push(self.decide(&request.op, seq, &mut read, &mut fresh_keys));
        }
        drop(read);
        let mut payload = Vec::new();
        batch.iter().for_each(|request| request.op.encode(&mut payload));
        if let Err(err) = self.wal.append(&payload) {
            // Not logged: forget what this batch claimed.
            for key in &fresh_keys {
                self.pending.keys.remove(key);
            }
            self.pending.order.retain(|(at, _)| *at != seq);
            let err = StoreError::Unavailable(format!("writing the log: {err}"));
            tracing::error!(error = %err, requests = batch.len(), "embedded store write failed");
            return Self::refuse(batch, &err);
        }
        self.progress.acked.store(seq, Ordering::Release);
        if self.wal.wants_checkpoint() {
            self.progress.checkpoint_wanted.store(true, Ordering::Release);
        }
        if let Err(err) = self.wal.checkpointed(self.progress.durable.load(Ordering::Acquire)) {
            crate::warn_throttled!(error = %err, "could not switch log files; the active one grows past its space");
        }
        let mut ops = Vec::with_capacity(batch.len());
        for (request, answer) in batch.drain(..).zip(answers) {
            let _ = request.reply.send(answer);
            ops.push(request.op);
        }
        if self.to_applier.send((seq, ops)).is_err() {
            self.progress.fail("the applier stopped".into());
        }
    }

    /// The answer to one write, decided before it is logged as record `seq`.
    fn decide(
        &mut self,
        op: &Op,
        seq: u64,
        read: &mut Option<ReadTransaction>,
        fresh_keys: &mut Vec<(String, String)>,
    ) -> StoreResult<Done> {
        match op {
            Op::Send { sender, key, json, .. } => {
                let id = (sender.clone(), key.clone());
                if let Some(first) = self.pending.keys.get(&id) {
                    return Ok(Done::Duplicate(first.clone()));
                }
                if let Some(first) = self.stored_send(sender, key, read)? {
                    return Ok(Done::Duplicate(first));
                }
                self.pending.keys.insert(id.clone(), json.clone());
                self.pending.order.push_back((seq, id.clone()));
                fresh_keys.push(id);
                Ok(Done::Unit)
            }
            Op::CreateGroup { .. } | Op::AddMember { .. } | Op::RemoveMember { .. } => Ok(Done::Unit),
        }
    }

    /// The message JSON of an applied send with this key, if any.
    fn stored_send(&self, sender: &str, key: &str, read: &mut Option<ReadTransaction>) -> StoreResult<Option<Vec<u8>>> {
        if read.is_none() {
            *read = Some(self.db.begin_read().map_err(storage("starting a read"))?);
        }
        let Some(txn) = read.as_ref() else { return Ok(None) };
        let sends = txn.open_table(SENDS).map_err(storage("opening sends"))?;
        let Some(found) = sends.get((sender, key)).map_err(storage("reading sends"))? else { return Ok(None) };
        let (id, channel) = found.value();
        let messages = txn.open_table(MESSAGES).map_err(storage("opening messages"))?;
        match messages.get((channel, id)).map_err(storage("reading messages"))? {
            Some(message) => Ok(Some(message.value().to_vec())),
            None => Err(StoreError::Corrupt(format!("send key of message {channel}/{id} without the message"))),
        }
    }
}

/// Records up to `seq` are applied: visible to reads begun from now on.
fn applied_through(progress: &Progress, seq: u64) {
    progress.applied.store(seq, Ordering::Release);
    progress.advanced.notify_waiters();
}

fn run_applier(db: &Database, queue: std_mpsc::Receiver<Logged>, progress: &Progress, mut users: UserNumbers) {
    let mut last_checkpoint = Instant::now();
    while let Ok(first) = queue.recv() {
        // Everything logged meanwhile goes into one transaction.
        let mut records = vec![first];
        while let Ok(next) = queue.try_recv() {
            records.push(next);
        }
        let seq = records.last().map_or(0, |(seq, _)| *seq);
        let ops: Vec<&Op> = records.iter().flat_map(|(_, ops)| ops.iter()).collect();
        // One transaction: a failure applies none of them and records no
        // progress, so nothing is ever checkpointed past a write not applied.
        if let Err(err) = apply(db, &ops, &mut users, seq) {
            // Acknowledged writes are in the log, so a restart applies them;
            // until then nothing more is accepted.
            tracing::error!(error = %err, "embedded store could not apply logged writes; refusing writes until restart");
            progress.fail(err.to_string());
            return;
        }
        applied_through(progress, seq);
        if last_checkpoint.elapsed() >= CHECKPOINT_EVERY || progress.checkpoint_wanted.swap(false, Ordering::AcqRel) {
            if let Err(err) = checkpoint(db) {
                // redb refuses every write after a failed one (it may have
                // written part of it); the log keeps what was acknowledged.
                tracing::error!(error = %err, "embedded store checkpoint failed; refusing writes until restart");
                progress.fail(err.to_string());
                return;
            }
            progress.durable.store(seq, Ordering::Release);
            last_checkpoint = Instant::now();
        }
    }
    match checkpoint(db) {
        Ok(()) => progress.durable.store(progress.applied.load(Ordering::Acquire), Ordering::Release),
        Err(err) => tracing::error!(error = %err, "embedded store checkpoint at shutdown failed; the log is replayed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_op(key: &str, id: u64) -> Op {
        Op::Send {
            sender: "alice".into(),
            key: key.into(),
            channel: "dm:alice:bob".into(),
            id,
            json: format!("{{\"id\":{id}}}").into_bytes(),
            position: id + 1,
            recipients: vec!["alice".to_string(), "bob".to_string()].into(),
            link_channel: false,
        }
    }

    /// A logger over a real database and log in `dir`, without its
    /// threads: the test plays the applier. Also what the logger hands it.
    fn logger(dir: &Path) -> (Arc<Database>, Logger, std_mpsc::Receiver<Logged>) {
        let db = Arc::new(Database::create(dir.join("db")).expect("db"));
        super::super::upgrade::create_tables(&db).expect("tables");
        let wal = wal::recover(&dir.join("log"), 0, 1, 0).and_then(|r| r.start(0, 1, 1)).expect("log");
        let (to_applier, applier_queue) = std_mpsc::sync_channel(APPLY_QUEUE);
        let progress = Arc::new(Progress::new(0));
        let logger = Logger { db: Arc::clone(&db), wal, progress, pending: Pending::default(), to_applier };
        (db, logger, applier_queue)
    }

    fn request(op: Op) -> (Request, tokio::sync::oneshot::Receiver<StoreResult<Done>>) {
        let (reply, answer) = tokio::sync::oneshot::channel();
        (Request { op, reply }, answer)
    }

    #[test]
    fn a_retry_decided_after_its_first_attempt_was_applied_is_a_duplicate_whatever_its_snapshot() {
        // Phantom duplicates: the retry used to miss both the pending keys
        // (the applier had forgotten it) and the snapshot (begun before).
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, mut logger, applier_queue) = logger(dir.path());
        // The first attempt is logged as record 1.
        let (first, _answer) = request(send_op("k", 10));
        logger.log_batch(&mut vec![first]);
        let (seq, ops) = applier_queue.try_recv().expect("handed to the applier");

        // The next batch begins its read snapshot with another send...
        let (mut read, mut fresh) = (None, Vec::new());
        let other = logger.decide(&send_op("other", 20), 2, &mut read, &mut fresh);
        assert!(matches!(other, Ok(Done::Unit)));
        // ...while the applier applies record 1 and says so...
        let refs: Vec<&Op> = ops.iter().collect();
        apply(&db, &refs, &mut UserNumbers::new(10), seq).expect("apply");
        applied_through(&logger.progress, seq);
        // ...before the retry is decided in the same batch.
        let retry = logger.decide(&send_op("k", 30), 2, &mut read, &mut fresh);
        assert!(matches!(retry, Ok(Done::Duplicate(_))), "the retry was answered as a new message");
    }

    #[test]
    fn a_write_whose_caller_gave_up_before_it_was_logged_is_not_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_db, mut logger, applier_queue) = logger(dir.path());
        let (abandoned, answer) = request(send_op("k", 10));
        drop(answer);
        logger.log_batch(&mut vec![abandoned]);
        assert_eq!(logger.wal.next_seq(), 1, "nothing was logged");
        assert!(applier_queue.try_recv().is_err(), "nothing to apply");

        // So its retry is the first of that key.
        let (retry, mut answer) = request(send_op("k", 20));
        logger.log_batch(&mut vec![retry]);
        assert!(matches!(answer.try_recv(), Ok(Ok(Done::Unit))), "stored as new");
        assert_eq!(applier_queue.try_recv().expect("logged").1, vec![send_op("k", 20)]);
    }
}
