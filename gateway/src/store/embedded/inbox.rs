//! Inboxes as chunks: each user's inbox positions, ascending, in rows of up
//! to [`CHUNK`] positions keyed by `user number << 64 | first position`.
//!
//! One row per inbox entry made a group message 100 B-tree inserts, which
//! at thousands of group messages a second was most of the writer's work.
//! A transaction now adds all of its entries for one user at once: one
//! lookup of the chunk they belong to and a rewrite of that chunk (plus new
//! chunks once it is full).
//!
//! Invariant, for each user: chunks do not overlap and each holds its
//! positions ascending, so every position of a chunk is below the next
//! chunk's key. Positions are assigned before a send is logged, so two
//! concurrent sends may be applied out of order: a position lands in the
//! chunk whose range holds it, wherever that is.

use redb::{ReadableTable, Table, TableDefinition};

use super::{inbox_key, storage};
use crate::store::{StoreError, StoreResult};

pub(super) const INBOX_CHUNKS: TableDefinition<u128, &[u8]> = TableDefinition::new("inbox_chunks");

/// Most positions in one chunk (512 bytes): a rewrite copies at most this.
pub(super) const CHUNK: usize = 64;

fn decode(bytes: &[u8]) -> StoreResult<Vec<u64>> {
    if !bytes.len().is_multiple_of(8) {
        return Err(StoreError::Corrupt(format!("an inbox chunk of {} bytes (not whole positions)", bytes.len())));
    }
    Ok(bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default())).collect())
}

fn encode(positions: &[u64]) -> Vec<u8> {
    positions.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// The position a chunk key starts at (its low 64 bits; the high ones are
/// the user's number).
fn start(key: u128) -> u64 {
    key as u64
}

/// Adds `positions` (any order, repeats ignored) to the inbox of user
/// number `user`.
pub(super) fn add(table: &mut Table<'_, u128, &'static [u8]>, user: u64, positions: &mut [u64]) -> StoreResult<()> {
    positions.sort_unstable();
    let mut pending: &[u64] = positions;
    while let Some(&first) = pending.first() {
        let Home { key: old_key, mut chunk, limit } = home(table, user, first)?;
        let taken = pending.iter().take_while(|p| limit.is_none_or(|limit| **p < limit)).count();
        chunk.extend_from_slice(&pending[..taken]);
        pending = &pending[taken..];
        chunk.sort_unstable();
        chunk.dedup();
        // (A chunk that keeps its first position is overwritten below.)
        if let Some(old_key) = old_key.filter(|key| chunk.first() != Some(&start(*key))) {
            table.remove(old_key).map_err(storage("writing inbox"))?;
        }
        for piece in chunk.chunks(CHUNK) {
            table.insert(inbox_key(user, piece[0]), encode(piece).as_slice()).map_err(storage("writing inbox"))?;
        }
    }
    Ok(())
}

/// Where a position goes: the chunk it belongs in and the next chunk's start.
struct Home {
    /// `None`: the user has no chunk yet.
    key: Option<u128>,
    chunk: Vec<u64>,
    /// Positions from here on belong to a later chunk.
    limit: Option<u64>,
}

fn home(table: &impl ReadableTable<u128, &'static [u8]>, user: u64, position: u64) -> StoreResult<Home> {
    // Usually an append: the position is past the user's last chunk's start.
    if let Some((key, chunk)) = last_chunk(table, user, u64::MAX)?
        && start(key) <= position
    {
        return Ok(Home { key: Some(key), chunk, limit: None });
    }
    // The last chunk starting at or before `position`, else the user's first
    // chunk (which then starts above it and takes it).
    let found = match last_chunk(table, user, position)? {
        Some(found) => Some(found),
        None => first_chunk(table, user, position)?,
    };
    let (key, chunk) = match found {
        Some((key, chunk)) => (Some(key), chunk),
        None => (None, Vec::new()),
    };
    let from = key.map_or(position, |key| start(key).max(position));
    let limit = match from.checked_add(1) {
        Some(after) => first_chunk(table, user, after)?.map(|(key, _)| start(key)),
        None => None,
    };
    Ok(Home { key, chunk, limit })
}

/// The user's last chunk starting at or before `position`.
fn last_chunk(
    table: &impl ReadableTable<u128, &'static [u8]>,
    user: u64,
    position: u64,
) -> StoreResult<Option<(u128, Vec<u64>)>> {
    let mut rows = table.range(inbox_key(user, 0)..=inbox_key(user, position)).map_err(storage("reading inbox"))?;
    match rows.next_back() {
        Some(row) => {
            let (key, value) = row.map_err(storage("reading inbox"))?;
            Ok(Some((key.value(), decode(value.value())?)))
        }
        None => Ok(None),
    }
}

/// The user's first chunk starting at or after `position`.
fn first_chunk(
    table: &impl ReadableTable<u128, &'static [u8]>,
    user: u64,
    position: u64,
) -> StoreResult<Option<(u128, Vec<u64>)>> {
    let mut rows =
        table.range(inbox_key(user, position)..=inbox_key(user, u64::MAX)).map_err(storage("reading inbox"))?;
    match rows.next() {
        Some(row) => {
            let (key, value) = row.map_err(storage("reading inbox"))?;
            Ok(Some((key.value(), decode(value.value())?)))
        }
        None => Ok(None),
    }
}

/// Up to `limit` positions above `after` in the inbox of user number
/// `user`, ascending.
pub(super) fn after(
    table: &impl ReadableTable<u128, &'static [u8]>,
    user: u64,
    after: u64,
    limit: usize,
) -> StoreResult<Vec<u64>> {
    let Some(above) = after.checked_add(1) else { return Ok(Vec::new()) };
    // The chunk holding `above` may start below it.
    let first = last_chunk(table, user, above)?.map_or(inbox_key(user, above), |(key, _)| key);
    let mut positions = Vec::new();
    for row in table.range(first..=inbox_key(user, u64::MAX)).map_err(storage("reading inbox"))? {
        let (_, chunk) = row.map_err(storage("reading inbox"))?;
        for position in decode(chunk.value())? {
            if position > after {
                positions.push(position);
                if positions.len() == limit {
                    return Ok(positions);
                }
            }
        }
    }
    Ok(positions)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use redb::{Database, ReadableDatabase};

    use super::*;

    fn db() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::create(dir.path().join("db")).expect("db");
        (dir, db)
    }

    /// Adds each batch in its own transaction, as the applier does.
    fn add_all(db: &Database, batches: &[(u64, Vec<u64>)]) {
        for (user, positions) in batches {
            let txn = db.begin_write().expect("write");
            {
                let mut table = txn.open_table(INBOX_CHUNKS).expect("table");
                add(&mut table, *user, &mut positions.clone()).expect("add");
            }
            txn.commit().expect("commit");
        }
    }

    fn read(db: &Database, user: u64, from: u64, limit: usize) -> Vec<u64> {
        let txn = db.begin_read().expect("read");
        let table = txn.open_table(INBOX_CHUNKS).expect("table");
        after(&table, user, from, limit).expect("after")
    }

    fn chunks(db: &Database) -> Vec<(u128, Vec<u64>)> {
        let txn = db.begin_read().expect("read");
        let table = txn.open_table(INBOX_CHUNKS).expect("table");
        table
            .iter()
            .expect("iter")
            .map(|row| {
                let (key, value) = row.expect("row");
                (key.value(), decode(value.value()).expect("chunk"))
            })
            .collect()
    }

    #[test]
    fn appends_fill_a_chunk_then_start_the_next() {
        let (_dir, db) = db();
        add_all(&db, &[(7, (1..=40).collect()), (7, (41..=100).collect())]);
        let stored = chunks(&db);
        assert_eq!(stored.len(), 2);
        assert_eq!(stored[0], (inbox_key(7, 1), (1..=64).collect()));
        assert_eq!(stored[1], (inbox_key(7, 65), (65..=100).collect()));
        assert_eq!(read(&db, 7, 60, 10), (61..=70).collect::<Vec<_>>());
    }

    #[test]
    fn a_late_position_lands_in_the_chunk_that_spans_it_and_users_stay_apart() {
        let (_dir, db) = db();
        add_all(&db, &[(1, vec![10, 30]), (2, vec![20]), (1, vec![50]), (1, vec![20, 5])]);
        assert_eq!(read(&db, 1, 0, 100), [5, 10, 20, 30, 50]);
        assert_eq!(read(&db, 2, 0, 100), [20]);
        assert_eq!(read(&db, 1, 20, 100), [30, 50]);
        assert_eq!(read(&db, 3, 0, 100), Vec::<u64>::new());
        assert_eq!(read(&db, 1, u64::MAX, 100), Vec::<u64>::new());
    }

    #[test]
    fn a_chunk_of_partial_positions_is_reported_as_corrupt() {
        let (_dir, db) = db();
        let txn = db.begin_write().expect("write");
        txn.open_table(INBOX_CHUNKS).expect("table").insert(inbox_key(1, 1), [1u8, 2, 3].as_slice()).expect("insert");
        txn.commit().expect("commit");
        let txn = db.begin_read().expect("read");
        let table = txn.open_table(INBOX_CHUNKS).expect("table");
        assert!(matches!(after(&table, 1, 0, 10), Err(StoreError::Corrupt(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever order and grouping positions arrive in, the inbox reads
        /// back as the set of them, from any point, and chunks never overlap.
        #[test]
        fn reads_back_every_position_in_order(
            batches in proptest::collection::vec((0u64..3, proptest::collection::vec(0u64..500, 0..150)), 1..12),
            from in 0u64..500,
            limit in 1usize..300,
        ) {
            let (_dir, db) = db();
            add_all(&db, &batches);
            for user in 0..3 {
                let mut expected: Vec<u64> = batches.iter().filter(|(u, _)| *u == user).flat_map(|(_, p)| p.clone()).collect();
                expected.sort_unstable();
                expected.dedup();
                let expected: Vec<u64> = expected.into_iter().filter(|p| *p > from).take(limit).collect();
                prop_assert_eq!(read(&db, user, from, limit), expected);
            }
            let stored = chunks(&db);
            for pair in stored.windows(2) {
                let ((key, chunk), (next_key, _)) = (&pair[0], &pair[1]);
                prop_assert!(chunk.len() <= CHUNK && !chunk.is_empty());
                prop_assert_eq!(start(*key), chunk[0]);
                if key >> 64 == next_key >> 64 {
                    prop_assert!(chunk[chunk.len() - 1] < start(*next_key), "chunks overlap");
                }
            }
        }
    }
}
