//! Opening the store: every logged write after the last checkpoint is
//! applied to redb again, then checkpointed, before the threads start. A
//! logged write that cannot be applied stops the open (it was acknowledged):
//! nothing is checkpointed past it, so the next start replays it again.

use std::path::Path;

use redb::{Database, ReadableDatabase};

use super::super::ops::{Op, decode_ops};
use super::super::tables::{UserNumbers, apply};
use super::super::wal::{self, Wal};
use super::super::{META, META_LOG_RUN, META_STORE_ID, META_WAL_SEQ, storage};
use super::{checkpoint, log_error, set_meta, with_detail};
use crate::store::{StoreError, StoreResult};

/// The store replayed: its log open for appends after record `last`.
pub struct Replayed {
    pub wal: Wal,
    pub last: u64,
    pub users: UserNumbers,
}

/// Replays the log into redb and checkpoints; the log opened for a new run.
pub fn replay(db: &Database, log: &Path) -> StoreResult<Replayed> {
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
            set_meta(db, META_STORE_ID, store)?;
            store
        }
    };
    let recovery = wal::recover(log, wal::FILE_BYTES, applied, store, last_run).map_err(log_error)?;
    let mut users = UserNumbers::new(1_000_000);
    let mut last = applied;
    let replayed = recovery.pending.len();
    for record in &recovery.pending {
        let ops = decode_ops(&record.payload, record.format)
            .ok_or_else(|| StoreError::Corrupt(format!("log record {} holds no valid writes", record.seq)))?;
        // Every write in the log was acknowledged: one that cannot be
        // applied stops the open before anything is checkpointed past it.
        let refs: Vec<&Op> = ops.iter().collect();
        apply(db, &refs, &mut users, record.seq).map_err(|err| {
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
    checkpoint(db).map_err(|err| {
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
    set_meta(db, META_LOG_RUN, run)?;

    Ok(Replayed { wal, last, users })
}
