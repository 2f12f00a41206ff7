//! Creating the tables of a new store and converting the inbox of a store
//! written by an earlier version, in the transaction that opens it. Push
//! jobs queued by earlier versions are dropped: a standalone gateway has
//! no push workers, so nothing would ever deliver or remove them.
//!
//! Inbox layouts so far:
//! 1. `inbox`: `(user, position) → message JSON` (a copy per recipient).
//! 2. `inbox_refs`: `(user, position) → (channel, id)`.
//! 3. `inbox_entries`: `user number << 64 | position → ()` and
//!    `positions`: `position → (channel, id)`.
//! 4. now: `inbox_chunks` ([`inbox`](super::inbox)) and `positions`.

use std::collections::HashMap;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle, WriteTransaction};

use super::inbox::{self, INBOX_CHUNKS};
use super::{
    GROUPS, MARKERS, MEMBERS, MESSAGES, META, META_NEXT_USER, POSITIONS, Pair, SENDS, USER_CHANNELS, USERS, decode,
    storage,
};
use crate::store::{Message, StoreResult};

/// Layout 1.
const INBOX_V1: TableDefinition<Pair, &[u8]> = TableDefinition::new("inbox");
/// Layout 2.
const INBOX_V2: TableDefinition<Pair, Pair> = TableDefinition::new("inbox_refs");
/// Layout 3.
const INBOX_V3: TableDefinition<u128, ()> = TableDefinition::new("inbox_entries");
/// The push queue of earlier versions: `seq → job JSON`, and its counter in `meta`.
const OLD_PUSH: TableDefinition<u64, &[u8]> = TableDefinition::new("push");
const OLD_PUSH_SEQ: &str = "push_seq";

pub(super) fn create_tables(db: &Database) -> StoreResult<()> {
    let txn = db.begin_write().map_err(storage("creating tables"))?;
    let old_entries = take_old_inbox(&txn)?;
    drop_old_push_jobs(&txn)?;
    {
        // Opening a table in a write transaction creates it if missing.
        txn.open_table(MESSAGES).map_err(storage("creating messages"))?;
        txn.open_table(POSITIONS).map_err(storage("creating positions"))?;
        txn.open_table(INBOX_CHUNKS).map_err(storage("creating inbox"))?;
        txn.open_table(USERS).map_err(storage("creating users"))?;
        txn.open_table(SENDS).map_err(storage("creating sends"))?;
        txn.open_table(GROUPS).map_err(storage("creating groups"))?;
        txn.open_table(MEMBERS).map_err(storage("creating members"))?;
        txn.open_table(USER_CHANNELS).map_err(storage("creating user_channels"))?;
        txn.open_table(META).map_err(storage("creating meta"))?;
        txn.open_table(MARKERS).map_err(storage("creating markers"))?;
    }
    if !old_entries.is_empty() {
        let converted = old_entries.len();
        write_entries(&txn, old_entries)?;
        tracing::info!(entries = converted, "converted the embedded store's inbox to the current layout");
    }
    chunk_inbox_entries(&txn)?;
    txn.commit().map_err(storage("creating tables"))
}

/// `(user, position, channel, id)` of every entry of an older inbox, whose
/// table is then deleted.
fn take_old_inbox(txn: &WriteTransaction) -> StoreResult<Vec<(String, u64, String, u64)>> {
    let names: Vec<String> =
        txn.list_tables().map_err(storage("listing tables"))?.map(|t| t.name().to_owned()).collect();
    let mut entries = Vec::new();
    if names.iter().any(|n| n == INBOX_V2.name()) {
        let old = txn.open_table(INBOX_V2).map_err(storage("opening the old inbox"))?;
        for row in old.iter().map_err(storage("reading the old inbox"))? {
            let (key, reference) = row.map_err(storage("reading the old inbox"))?;
            let ((user, position), (channel, id)) = (key.value(), reference.value());
            entries.push((user.to_owned(), position, channel.to_owned(), id));
        }
        drop(old);
        txn.delete_table(INBOX_V2).map_err(storage("removing the old inbox"))?;
    }
    if names.iter().any(|n| n == INBOX_V1.name()) {
        let old = txn.open_table(INBOX_V1).map_err(storage("opening the old inbox"))?;
        for row in old.iter().map_err(storage("reading the old inbox"))? {
            let (key, json) = row.map_err(storage("reading the old inbox"))?;
            let (user, position) = key.value();
            let message: Message = decode("old inbox message", json.value())?;
            entries.push((user.to_owned(), position, message.channel, message.id));
        }
        drop(old);
        txn.delete_table(INBOX_V1).map_err(storage("removing the old inbox"))?;
    }
    Ok(entries)
}

fn drop_old_push_jobs(txn: &WriteTransaction) -> StoreResult<()> {
    let found = txn.list_tables().map_err(storage("listing tables"))?.any(|t| t.name() == OLD_PUSH.name());
    if found {
        let table = txn.open_table(OLD_PUSH).map_err(storage("opening the old push queue"))?;
        let jobs = table.len().map_err(storage("counting the old push jobs"))?;
        drop(table);
        txn.delete_table(OLD_PUSH).map_err(storage("removing the old push queue"))?;
        let mut meta = txn.open_table(META).map_err(storage("opening meta"))?;
        meta.remove(OLD_PUSH_SEQ).map_err(storage("writing meta"))?;
        tracing::info!(jobs, "dropped the push jobs earlier versions queued (nothing delivers them)");
    }
    Ok(())
}

fn write_entries(txn: &WriteTransaction, entries: Vec<(String, u64, String, u64)>) -> StoreResult<()> {
    let mut users = txn.open_table(USERS).map_err(storage("opening users"))?;
    let mut meta = txn.open_table(META).map_err(storage("opening meta"))?;
    let mut inbox = txn.open_table(INBOX_CHUNKS).map_err(storage("opening inbox"))?;
    let mut positions = txn.open_table(POSITIONS).map_err(storage("opening positions"))?;
    let mut by_user: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut next = meta.get(META_NEXT_USER).map_err(storage("reading meta"))?.map_or(0, |v| v.value());
    let mut numbers: HashMap<String, u64> = HashMap::new();
    for (user, position, channel, id) in entries {
        let number = match numbers.get(&user) {
            Some(number) => *number,
            None => {
                let found = users.get(user.as_str()).map_err(storage("reading users"))?.map(|v| v.value());
                let number = match found {
                    Some(found) => found,
                    None => {
                        users.insert(user.as_str(), next).map_err(storage("writing users"))?;
                        next += 1;
                        next - 1
                    }
                };
                numbers.insert(user, number);
                number
            }
        };
        by_user.entry(number).or_default().push(position);
        positions.insert(position, (channel.as_str(), id)).map_err(storage("writing positions"))?;
    }
    for (user, positions) in &mut by_user {
        inbox::add(&mut inbox, *user, positions)?;
    }
    meta.insert(META_NEXT_USER, next).map_err(storage("writing meta"))?;
    Ok(())
}

/// Layout 3 to 4: the entries of each user (adjacent, as the key starts with
/// the user's number) become that user's chunks.
fn chunk_inbox_entries(txn: &WriteTransaction) -> StoreResult<()> {
    let found = txn.list_tables().map_err(storage("listing tables"))?.any(|t| t.name() == INBOX_V3.name());
    if !found {
        return Ok(());
    }
    let old = txn.open_table(INBOX_V3).map_err(storage("opening the old inbox"))?;
    let mut chunks = txn.open_table(INBOX_CHUNKS).map_err(storage("opening inbox"))?;
    let (mut user, mut positions, mut converted) = (None, Vec::new(), 0usize);
    for row in old.iter().map_err(storage("reading the old inbox"))? {
        let key = row.map_err(storage("reading the old inbox"))?.0.value();
        // The high 64 bits are the user's number, the low ones the position.
        let (owner, position) = ((key >> 64) as u64, key as u64);
        if user != Some(owner) {
            if let Some(done) = user {
                inbox::add(&mut chunks, done, &mut positions)?;
            }
            (user, positions) = (Some(owner), Vec::new());
        }
        positions.push(position);
        converted += 1;
    }
    if let Some(done) = user {
        inbox::add(&mut chunks, done, &mut positions)?;
    }
    drop((old, chunks));
    txn.delete_table(INBOX_V3).map_err(storage("removing the old inbox"))?;
    tracing::info!(entries = converted, "converted the embedded store's inbox to chunks");
    Ok(())
}
