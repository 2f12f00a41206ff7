//! The logger thread: group commit to the write-ahead log, answers decided
//! before the fsync (see the module above).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc as std_mpsc};

use redb::{Database, ReadTransaction, ReadableDatabase};
use tokio::sync::mpsc;

use super::super::ops::{Done, Op, Request};
use super::super::wal::Wal;
use super::super::{MESSAGES, SENDS, storage};
use super::{Logged, MAX_BATCH, Progress, same_error};
use crate::store::{StoreError, StoreResult};

/// Sends logged but not yet applied, by `(sender, key)`: a retry of one
/// must be answered as a duplicate before redb has it.
#[derive(Default)]
pub(super) struct Pending {
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

pub(super) struct Logger {
    pub(super) db: Arc<Database>,
    pub(super) wal: Wal,
    pub(super) progress: Arc<Progress>,
    pub(super) pending: Pending,
    pub(super) to_applier: std_mpsc::SyncSender<Logged>,
}

impl Logger {
    pub(super) fn run(mut self, mut queue: mpsc::Receiver<Request>) {
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
            Op::CreateGroup { .. } | Op::AddMember { .. } | Op::RemoveMember { .. } | Op::AdvanceMarkers { .. } => {
                Ok(Done::Unit)
            }
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::super::tables::{UserNumbers, apply};
    use super::super::super::wal;
    use super::super::APPLY_QUEUE;
    use super::super::applier::applied_through;
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
        super::super::super::upgrade::create_tables(&db).expect("tables");
        let wal = wal::recover(&dir.join("log"), wal::FILE_BYTES, 0, 1, 0).and_then(|r| r.start(0, 1, 1)).expect("log");
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
