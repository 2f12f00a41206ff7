//! The embedded store's single writer thread and its group commit: every
//! write request queued when a turn starts (up to [`MAX_BATCH`]) is applied
//! in one write transaction, committed once (one fsync), then answered.

use std::collections::HashMap;
use std::sync::Arc;

use redb::{Database, ReadableTable, Table, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use super::{
    GROUPS, Link, MEMBERS, MESSAGES, META, META_MAX_ID, META_NEXT_USER, META_PUSH_SEQ, POSITIONS, PUSH, Pair, SENDS,
    USER_CHANNELS, USERS, inbox_key, storage,
};
use crate::store::{StoreError, StoreResult};

/// Most requests committed in one transaction: bounds the latency a request
/// waits behind others while still amortizing the fsync.
pub const MAX_BATCH: usize = 512;

/// One write, in owned form so it can cross to the writer thread. JSON is
/// encoded by the caller so the single writer only does B-tree work.
pub(super) enum Op {
    Send {
        sender: String,
        key: String,
        channel: String,
        id: u64,
        json: Vec<u8>,
        position: u64,
        recipients: Arc<[String]>,
        link_channel: bool,
    },
    CreateGroup {
        id: String,
        json: Vec<u8>,
        members: Vec<String>,
    },
    AddMember {
        group: String,
        user: String,
    },
    RemoveMember {
        group: String,
        user: String,
    },
    EnqueuePush {
        jsons: Vec<Vec<u8>>,
    },
    AckPush {
        seq: u64,
    },
}

/// What a committed write answers.
pub(super) enum Done {
    Unit,
    /// The send's key was stored before, for this message (JSON).
    Duplicate(Vec<u8>),
    Seq(u64),
}

pub(super) struct Request {
    pub op: Op,
    pub reply: oneshot::Sender<StoreResult<Done>>,
}

/// User ids → the numbers their inbox keys start with, as committed. Only
/// the writer assigns numbers, so this cache of the `users` table is exact;
/// it is bounded (cleared when full: a miss costs one table lookup).
pub(super) struct UserNumbers {
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

/// The writer thread: one group commit per turn until the store is dropped.
pub(super) fn run(db: &Database, mut queue: mpsc::Receiver<Request>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut users = UserNumbers::new(1_000_000);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        commit_batch(db, &mut batch, &mut users);
    }
}

/// Where a batch failed: before the commit nothing was written, so each
/// request can be retried alone; a failed commit may have landed and redb
/// refuses further writes anyway, so everyone just gets the error.
enum Failure {
    Apply(StoreError),
    Commit(StoreError),
}

/// `StoreError` is not `Clone`; a batch's one error goes to every request.
fn same_error(err: &StoreError) -> StoreError {
    match err {
        StoreError::Unavailable(detail) => StoreError::Unavailable(detail.clone()),
        StoreError::Corrupt(detail) => StoreError::Corrupt(detail.clone()),
    }
}

fn commit_batch(db: &Database, batch: &mut Vec<Request>, users: &mut UserNumbers) {
    let ops: Vec<&Op> = batch.iter().map(|request| &request.op).collect();
    match apply(db, &ops, users) {
        Ok(done) => {
            for (request, done) in batch.drain(..).zip(done) {
                let _ = request.reply.send(Ok(done));
            }
        }
        Err(Failure::Apply(err)) if batch.len() > 1 => {
            // Isolate the request that failed instead of failing its neighbours.
            tracing::warn!(error = %err, requests = batch.len(), "embedded store batch failed; retrying one by one");
            for request in batch.drain(..) {
                let answer = apply(db, &[&request.op], users).map(|mut done| done.pop().unwrap_or(Done::Unit));
                let _ = request.reply.send(answer.map_err(|(Failure::Apply(err) | Failure::Commit(err))| err));
            }
        }
        Err(Failure::Apply(err) | Failure::Commit(err)) => {
            tracing::error!(error = %err, requests = batch.len(), "embedded store write failed");
            for request in batch.drain(..) {
                let _ = request.reply.send(Err(same_error(&err)));
            }
        }
    }
}

/// Applies `ops` in one write transaction and commits it (durably: redb's
/// default is `Durability::Immediate`, one fsync per commit).
fn apply(db: &Database, ops: &[&Op], users: &mut UserNumbers) -> Result<Vec<Done>, Failure> {
    let txn = db.begin_write().map_err(|err| Failure::Apply(storage("starting a write")(err)))?;
    let (done, fresh) = {
        let mut tables = Tables::open(&txn).map_err(Failure::Apply)?;
        let mut batch = Batch { max_id: 0, users, fresh: HashMap::new(), next_user: None };
        let done = ops.iter().map(|op| tables.apply(op, &mut batch)).collect::<StoreResult<Vec<_>>>();
        let done = done.and_then(|done| tables.finish(&batch).map(|()| done)).map_err(Failure::Apply)?;
        (done, batch.fresh)
    };
    txn.commit().map_err(|err| Failure::Commit(storage("committing")(err)))?;
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
}

/// The tables a batch writes, opened once per transaction.
struct Tables<'t> {
    messages: Table<'t, Pair, &'static [u8]>,
    positions: Table<'t, u64, Pair>,
    inbox: Table<'t, u128, ()>,
    users: Table<'t, &'static str, u64>,
    sends: Table<'t, Link, (u64, &'static str)>,
    groups: Table<'t, &'static str, &'static [u8]>,
    members: Table<'t, Link, ()>,
    user_channels: Table<'t, Link, ()>,
    push: Table<'t, u64, &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> StoreResult<Self> {
        Ok(Self {
            messages: txn.open_table(MESSAGES).map_err(storage("opening messages"))?,
            positions: txn.open_table(POSITIONS).map_err(storage("opening positions"))?,
            inbox: txn.open_table(super::INBOX).map_err(storage("opening inbox"))?,
            users: txn.open_table(USERS).map_err(storage("opening users"))?,
            sends: txn.open_table(SENDS).map_err(storage("opening sends"))?,
            groups: txn.open_table(GROUPS).map_err(storage("opening groups"))?,
            members: txn.open_table(MEMBERS).map_err(storage("opening members"))?,
            user_channels: txn.open_table(USER_CHANNELS).map_err(storage("opening user_channels"))?,
            push: txn.open_table(PUSH).map_err(storage("opening push"))?,
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
                    self.inbox.insert(inbox_key(number, *position), ()).map_err(storage("writing inbox"))?;
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
            Op::EnqueuePush { jsons } => {
                let mut seq = self.meta(META_PUSH_SEQ)?;
                for json in jsons {
                    seq = seq.saturating_add(1);
                    self.push.insert(seq, json.as_slice()).map_err(storage("writing push"))?;
                }
                self.meta.insert(META_PUSH_SEQ, seq).map_err(storage("writing meta"))?;
                Ok(Done::Seq(seq))
            }
            Op::AckPush { seq } => {
                self.push.remove(*seq).map_err(storage("writing push"))?;
                Ok(Done::Unit)
            }
        }
    }

    fn add_member(&mut self, group: &str, user: &str) -> StoreResult<()> {
        self.members.insert((group, user), ()).map_err(storage("writing members"))?;
        self.user_channels.insert((user, group), ()).map_err(storage("writing user_channels"))?;
        Ok(())
    }

    /// Counters kept in the same transaction as the rows they describe.
    fn finish(&mut self, batch: &Batch<'_>) -> StoreResult<()> {
        if batch.max_id > self.meta(META_MAX_ID)? {
            self.meta.insert(META_MAX_ID, batch.max_id).map_err(storage("writing meta"))?;
        }
        if let Some(next) = batch.next_user {
            self.meta.insert(META_NEXT_USER, next).map_err(storage("writing meta"))?;
        }
        Ok(())
    }
}
