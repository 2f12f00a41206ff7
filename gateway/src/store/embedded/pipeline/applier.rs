//! The applier thread: logged batches into redb, checkpoints (see the
//! module above).

use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use redb::Database;

use super::super::ops::Op;
use super::super::tables::{UserNumbers, apply};
use super::{CHECKPOINT_EVERY, Logged, Progress, checkpoint};

/// Records up to `seq` are applied: visible to reads begun from now on.
pub(super) fn applied_through(progress: &Progress, seq: u64) {
    progress.applied.store(seq, Ordering::Release);
    progress.advanced.notify_waiters();
}

pub(super) fn run_applier(
    db: &Database,
    queue: std_mpsc::Receiver<Logged>,
    progress: &Progress,
    mut users: UserNumbers,
) {
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
