//! Applying writes to redb's tables: one write transaction per batch,
//! visible at once and durable at the next checkpoint (the log already made
//! the batch durable).

use std::collections::HashMap;

use redb::{Database, Durability, ReadableTable, Table, WriteTransaction};

use super::inbox::{self, INBOX_CHUNKS};
use super::ops::{Done, Op};
use super::{
    GROUPS, Link, MARKERS, MEMBERS, MESSAGES, META, META_MAX_ID, META_NEXT_USER, META_WAL_SEQ, POSITIONS, Pair, SENDS,
    USER_CHANNELS, USERS, storage,
};
use crate::store::{Markers, StoreError, StoreResult};

/// User ids → the numbers their inbox keys start with, as committed. Only
/// the writer assigns numbers, so this cache of the `users` table is exact;
/// it is bounded (cleared when full: a miss costs one table lookup).
pub struct UserNumbers {
    known: HashMap<String, u64>,
    capacity: usize,
}

impl UserNumbers {
    pub fn new(capacity: usize) -> Self {
        Self { known: HashMap::new(), capacity }
    }

    /// Numbers assigned by a transaction that committed.
    fn learn(&mut self, fresh: HashMap<String, u64>) {
        if self.known.len() + fresh.len() > self.capacity {
            self.known.clear();
        }
        self.known.extend(fresh);
    }
}

/// Applies `ops` in one write transaction that is visible at once and
/// durable at the next checkpoint (the log already made it durable), and
/// records that it includes log record `seq`.
pub fn apply(db: &Database, ops: &[&Op], users: &mut UserNumbers, seq: u64) -> StoreResult<Vec<Done>> {
    let mut txn = db.begin_write().map_err(storage("starting a write"))?;
    txn.set_durability(Durability::None).map_err(storage("starting a write"))?;
    let (done, fresh) = {
        let mut tables = Tables::open(&txn)?;
        let mut batch = Batch { max_id: 0, users, fresh: HashMap::new(), next_user: None, inbox: HashMap::new() };
        let done = ops.iter().map(|op| tables.apply(op, &mut batch)).collect::<StoreResult<Vec<_>>>()?;
        tables.finish(&mut batch, seq)?;
        (done, batch.fresh)
    };
    txn.commit().map_err(storage("committing"))?;
    users.learn(fresh);
    Ok(done)
}

/// What one transaction accumulates besides its rows.
struct Batch<'a> {
    max_id: u64,
    users: &'a UserNumbers,
    /// User numbers assigned in this transaction (known once it commits).
    fresh: HashMap<String, u64>,
    /// The next user number to assign, read from `meta` when first needed.
    next_user: Option<u64>,
    /// Inbox positions by user number, added together at the end.
    inbox: HashMap<u64, Vec<u64>>,
}

/// The tables a batch writes, opened once per transaction.
struct Tables<'t> {
    messages: Table<'t, Pair, &'static [u8]>,
    positions: Table<'t, u64, Pair>,
    inbox: Table<'t, u128, &'static [u8]>,
    users: Table<'t, &'static str, u64>,
    sends: Table<'t, Link, (u64, &'static str)>,
    groups: Table<'t, &'static str, &'static [u8]>,
    members: Table<'t, Link, ()>,
    user_channels: Table<'t, Link, ()>,
    markers: Table<'t, Link, (u64, u64)>,
    meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> StoreResult<Self> {
        Ok(Self {
            messages: txn.open_table(MESSAGES).map_err(storage("opening messages"))?,
            positions: txn.open_table(POSITIONS).map_err(storage("opening positions"))?,
            inbox: txn.open_table(INBOX_CHUNKS).map_err(storage("opening inbox"))?,
            users: txn.open_table(USERS).map_err(storage("opening users"))?,
            sends: txn.open_table(SENDS).map_err(storage("opening sends"))?,
            groups: txn.open_table(GROUPS).map_err(storage("opening groups"))?,
            members: txn.open_table(MEMBERS).map_err(storage("opening members"))?,
            user_channels: txn.open_table(USER_CHANNELS).map_err(storage("opening user_channels"))?,
            markers: txn.open_table(MARKERS).map_err(storage("opening markers"))?,
            meta: txn.open_table(META).map_err(storage("opening meta"))?,
        })
    }

    fn meta(&self, name: &str) -> StoreResult<u64> {
        Ok(self.meta.get(name).map_err(storage("reading meta"))?.map_or(0, |v| v.value()))
    }

    /// The number of `user`'s inbox keys, assigned on first use.
    fn user_number(&mut self, user: &str, batch: &mut Batch<'_>) -> StoreResult<u64> {
        if let Some(number) = batch.users.known.get(user).or_else(|| batch.fresh.get(user)) {
            return Ok(*number);
        }
        if let Some(number) = self.users.get(user).map_err(storage("reading users"))? {
            return Ok(number.value());
        }
        let number = match batch.next_user {
            Some(next) => next,
            None => self.meta(META_NEXT_USER)?,
        };
        self.users.insert(user, number).map_err(storage("writing users"))?;
        batch.next_user = Some(number + 1);
        batch.fresh.insert(user.to_owned(), number);
        Ok(number)
    }

    fn apply(&mut self, op: &Op, batch: &mut Batch<'_>) -> StoreResult<Done> {
        match op {
            Op::Send { sender, key, channel, id, json, position, recipients, link_channel } => {
                // Atomic because only this thread writes and the check and
                // the inserts share one transaction.
                let key = (sender.as_str(), key.as_str());
                if let Some(found) = self.sends.get(key).map_err(storage("reading sends"))? {
                    let (first_id, first_channel) = found.value();
                    let message = self.messages.get((first_channel, first_id)).map_err(storage("reading messages"))?;
                    let message = message.ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "send key of message {first_channel}/{first_id} without the message"
                        ))
                    })?;
                    return Ok(Done::Duplicate(message.value().to_vec()));
                }
                self.sends.insert(key, (*id, channel.as_str())).map_err(storage("writing sends"))?;
                self.messages.insert((channel.as_str(), *id), json.as_slice()).map_err(storage("writing messages"))?;
                self.positions.insert(*position, (channel.as_str(), *id)).map_err(storage("writing positions"))?;
                for user in recipients.iter() {
                    let number = self.user_number(user, batch)?;
                    batch.inbox.entry(number).or_default().push(*position);
                    if *link_channel {
                        self.user_channels
                            .insert((user.as_str(), channel.as_str()), ())
                            .map_err(storage("writing user_channels"))?;
                    }
                }
                batch.max_id = batch.max_id.max(*id).max(*position);
                Ok(Done::Unit)
            }
            Op::CreateGroup { id, json, members } => {
                self.groups.insert(id.as_str(), json.as_slice()).map_err(storage("writing groups"))?;
                for user in members {
                    self.add_member(id, user)?;
                }
                Ok(Done::Unit)
            }
            Op::AddMember { group, user } => self.add_member(group, user).map(|()| Done::Unit),
            Op::RemoveMember { group, user } => {
                self.members.remove((group.as_str(), user.as_str())).map_err(storage("writing members"))?;
                self.user_channels.remove((user.as_str(), group.as_str())).map_err(storage("writing user_channels"))?;
                Ok(Done::Unit)
            }
            Op::AdvanceMarkers { user, channel, delivered_up_to, read_up_to } => {
                let key = (user.as_str(), channel.as_str());
                let stored = self.markers.get(key).map_err(storage("reading markers"))?.map(|v| {
                    let (delivered_up_to, read_up_to) = v.value();
                    Markers { delivered_up_to, read_up_to }
                });
                let merged = stored
                    .unwrap_or_default()
                    .merge(Markers { delivered_up_to: *delivered_up_to, read_up_to: *read_up_to });
                if stored != Some(merged) {
                    self.markers
                        .insert(key, (merged.delivered_up_to, merged.read_up_to))
                        .map_err(storage("writing markers"))?;
                }
                Ok(Done::Unit)
            }
        }
    }

    fn add_member(&mut self, group: &str, user: &str) -> StoreResult<()> {
        self.members.insert((group, user), ()).map_err(storage("writing members"))?;
        self.user_channels.insert((user, group), ()).map_err(storage("writing user_channels"))?;
        Ok(())
    }

    /// The batch's inbox entries, then the counters kept in the same
    /// transaction as the rows they describe.
    fn finish(&mut self, batch: &mut Batch<'_>, seq: u64) -> StoreResult<()> {
        for (user, positions) in &mut batch.inbox {
            inbox::add(&mut self.inbox, *user, positions)?;
        }
        self.meta.insert(META_WAL_SEQ, seq).map_err(storage("writing meta"))?;
        if batch.max_id > self.meta(META_MAX_ID)? {
            self.meta.insert(META_MAX_ID, batch.max_id).map_err(storage("writing meta"))?;
        }
        if let Some(next) = batch.next_user {
            self.meta.insert(META_NEXT_USER, next).map_err(storage("writing meta"))?;
        }
        Ok(())
    }
}
