//! The applier thread: logged batches into redb, checkpoints (see the
//! module above).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError, TryRecvError};
use std::time::Instant;

use redb::Database;

use super::super::ops::Op;
use super::super::tables::{UserNumbers, apply};
use super::{APPLY_EVERY, APPLY_MOST, Logged, Progress, checkpoint};

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
    checkpoint_every: std::time::Duration,
) {
    lower_priority();
    let mut last_checkpoint = Instant::now();
    loop {
        // Woken by a batch, or when a checkpoint is due: what was applied
        // is checkpointed on time even if no write follows it.
        let first = match queue.recv_timeout(checkpoint_every.saturating_sub(last_checkpoint.elapsed())) {
            Ok(first) => Some(first),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if let Some(first) = first {
            let records = gather(first, &queue, progress);
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
        }
        let wanted = progress.checkpoint_wanted.swap(false, Ordering::AcqRel);
        let due = wanted || last_checkpoint.elapsed() >= checkpoint_every;
        if !due {
            continue;
        }
        last_checkpoint = Instant::now();
        let applied = progress.applied.load(Ordering::Acquire);
        if applied == progress.durable.load(Ordering::Acquire) {
            continue;
        }
        if let Err(err) = checkpoint(db) {
            // redb refuses every write after a failed one (it may have
            // written part of it); the log keeps what was acknowledged.
            tracing::error!(error = %err, "embedded store checkpoint failed; refusing writes until restart");
            progress.fail(err.to_string());
            return;
        }
        progress.durable.store(applied, Ordering::Release);
        tracing::debug!(through = applied, "embedded store checkpoint taken");
    }
    match checkpoint(db) {
        Ok(()) => progress.durable.store(progress.applied.load(Ordering::Acquire), Ordering::Release),
        Err(err) => tracing::error!(error = %err, "embedded store checkpoint at shutdown failed; the log is replayed"),
    }
}

/// The applier's work is never what a client waits for (a read that waits
/// wakes it), but on a gateway given one core its gathered transactions and
/// checkpoints would take turns with the threads that answer clients. A
/// niceness of 10 lets those run first whenever they are ready; the
/// applier still gets the core when they idle, and the logger waits if it
/// falls [`APPLY_QUEUE`](super::APPLY_QUEUE) batches behind.
const APPLIER_NICENESS: i32 = 10;

fn lower_priority() {
    // On Linux a thread id names one thread for `setpriority`.
    let thread = rustix::thread::gettid();
    if let Err(err) = rustix::process::setpriority_process(Some(thread), APPLIER_NICENESS) {
        tracing::warn!(error = %err, "could not lower the embedded store applier's priority");
    }
}

/// The batches for one transaction: `first` and what is logged after it,
/// until a read waits, [`APPLY_EVERY`] has passed, [`APPLY_MOST`] writes
/// are in, or the logger stops.
fn gather(first: Logged, queue: &std_mpsc::Receiver<Logged>, progress: &Progress) -> Vec<Logged> {
    let due = Instant::now() + APPLY_EVERY;
    let mut writes = first.1.len();
    let mut records = vec![first];
    loop {
        loop {
            match queue.try_recv() {
                Ok(next) => {
                    writes += next.1.len();
                    records.push(next);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return records,
            }
        }
        let now = Instant::now();
        if progress.read_waiting.swap(false, Ordering::AcqRel) || now >= due || writes >= APPLY_MOST {
            return records;
        }
        // Woken early by a read that waits (see `Progress::caught_up`).
        std::thread::park_timeout(due - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_logged_meanwhile_go_into_one_transaction() {
        let (to_applier, queue) = std_mpsc::sync_channel(8);
        for seq in 2..=4 {
            to_applier.send((seq, Vec::new())).expect("queued");
        }
        let progress = Progress::new(0);
        let records = gather((1, Vec::new()), &queue, &progress);
        assert_eq!(records.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
    }

    #[test]
    fn a_waiting_read_is_served_and_its_request_consumed() {
        let (to_applier, queue) = std_mpsc::sync_channel(8);
        let progress = Progress::new(0);
        progress.read_waiting.store(true, Ordering::Release);
        to_applier.send((2, Vec::new())).expect("queued");
        let records = gather((1, Vec::new()), &queue, &progress);
        assert_eq!(records.len(), 2, "what was queued is applied with it");
        assert!(!progress.read_waiting.load(Ordering::Acquire), "the next transaction may gather again");
    }

    #[test]
    fn a_stopped_logger_ends_the_gathering() {
        let (to_applier, queue) = std_mpsc::sync_channel(8);
        to_applier.send((2, Vec::new())).expect("queued");
        drop(to_applier);
        let records = gather((1, Vec::new()), &queue, &Progress::new(0));
        assert_eq!(records.len(), 2);
    }
}
