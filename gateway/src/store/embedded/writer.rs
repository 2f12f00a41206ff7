//! The embedded store's single writer thread and its group commit: every
//! write request queued when a turn starts (up to [`MAX_BATCH`]) is logged
//! as one record of the write-ahead log (one `fdatasync`: the batch is now
//! durable), applied in one write transaction that is visible but not yet
//! durable in redb, then answered. A checkpoint (a durable redb commit)
//! every [`CHECKPOINT_EVERY`] or when the log fills lets the log start over.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, Table, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use super::wal::{self, Wal};
use super::{
    GROUPS, Link, MEMBERS, MESSAGES, META, META_MAX_ID, META_NEXT_USER, META_PUSH_SEQ, META_WAL_SEQ, POSITIONS, PUSH,
    Pair, SENDS, USER_CHANNELS, USERS, inbox_key, storage,
};
use crate::store::{StoreError, StoreResult};

/// The longest the B-trees go without a durable commit (which bounds how
/// much a restart replays from the log).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);

/// Most requests committed in one transaction: bounds the latency a request
/// waits behind others while still amortizing the fsync.
pub const MAX_BATCH: usize = 512;

/// One write, in owned form so it can cross to the writer thread. JSON is
/// encoded by the caller so the single writer only does B-tree work.
#[derive(Debug, PartialEq)]
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

/// The writer: owns the log and every write transaction.
pub(super) struct Writer {
    db: Arc<Database>,
    wal: Wal,
    users: UserNumbers,
    last_checkpoint: Instant,
}

impl Writer {
    /// Opens the store's log and replays what the last durable commit lacks.
    pub fn open(db: Arc<Database>, log: &Path) -> StoreResult<Self> {
        let applied = {
            let txn = db.begin_read().map_err(storage("starting a read"))?;
            let meta = txn.open_table(META).map_err(storage("opening meta"))?;
            meta.get(META_WAL_SEQ).map_err(storage("reading meta"))?.map_or(0, |v| v.value())
        };
        let (wal, pending) = Wal::open(log, applied)
            .map_err(|err| StoreError::Unavailable(format!("opening the log {}: {err}", log.display())))?;
        let mut writer = Self { db, wal, users: UserNumbers::new(1_000_000), last_checkpoint: Instant::now() };
        if !pending.is_empty() {
            let records = pending.len();
            for record in pending {
                let ops = decode_ops(&record.payload)
                    .ok_or_else(|| StoreError::Corrupt(format!("log record {} holds no valid writes", record.seq)))?;
                let refs: Vec<&Op> = ops.iter().collect();
                // The outcome went (or did not go) to clients before the
                // restart; what matters is that the state is reproduced.
                writer.apply_logged(&refs, record.seq);
            }
            tracing::info!(records, "replayed the embedded store's log");
        }
        // A durable starting point, so the log can start over.
        writer.checkpoint()?;
        Ok(writer)
    }

    /// One group commit per turn until the store is dropped; a last
    /// checkpoint then.
    pub fn run(mut self, mut queue: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = queue.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.commit_batch(&mut batch);
            let due = self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY || self.wal.len() >= wal::LOG_BYTES / 2;
            if due && let Err(err) = self.checkpoint() {
                tracing::error!(error = %err, "embedded store checkpoint failed; the log keeps growing");
            }
        }
        if let Err(err) = self.checkpoint() {
            tracing::error!(error = %err, "embedded store checkpoint at shutdown failed; the log is replayed at start");
        }
    }

    /// A durable redb commit of everything applied so far; the log then
    /// starts over.
    fn checkpoint(&mut self) -> StoreResult<()> {
        let txn = self.db.begin_write().map_err(storage("starting a checkpoint"))?;
        txn.commit().map_err(storage("committing a checkpoint"))?;
        self.wal.start_over();
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    fn commit_batch(&mut self, batch: &mut Vec<Request>) {
        let ops: Vec<&Op> = batch.iter().map(|request| &request.op).collect();
        let mut payload = Vec::new();
        for op in &ops {
            op.encode(&mut payload);
        }
        let seq = match self.wal.append(&payload) {
            Ok(seq) => seq,
            Err(err) => {
                let err = StoreError::Unavailable(format!("writing the log: {err}"));
                tracing::error!(error = %err, requests = batch.len(), "embedded store write failed");
                for request in batch.drain(..) {
                    let _ = request.reply.send(Err(same_error(&err)));
                }
                return;
            }
        };
        let answers = self.apply_logged(&ops, seq);
        for (request, answer) in batch.drain(..).zip(answers) {
            let _ = request.reply.send(answer);
        }
    }

    /// Applies the writes of log record `seq`: together, or one by one if
    /// that fails (so one bad write does not fail its neighbours).
    fn apply_logged(&mut self, ops: &[&Op], seq: u64) -> Vec<StoreResult<Done>> {
        match apply(&self.db, ops, &mut self.users, seq) {
            Ok(done) => done.into_iter().map(Ok).collect(),
            Err(err) if ops.len() > 1 => {
                tracing::warn!(error = %err, requests = ops.len(), "embedded store batch failed; applying one by one");
                let one = |op: &&Op, users: &mut UserNumbers| {
                    apply(&self.db, &[*op], users, seq).map(|mut done| done.pop().unwrap_or(Done::Unit))
                };
                ops.iter().map(|op| one(op, &mut self.users)).collect()
            }
            Err(err) => vec![Err(err)],
        }
    }
}

/// `StoreError` is not `Clone`; a batch's one error goes to every request.
fn same_error(err: &StoreError) -> StoreError {
    match err {
        StoreError::Unavailable(detail) => StoreError::Unavailable(detail.clone()),
        StoreError::Corrupt(detail) => StoreError::Corrupt(detail.clone()),
    }
}

/// Applies `ops` in one write transaction that is visible at once and
/// durable at the next checkpoint (the log already made it durable), and
/// records that it includes log record `seq`.
fn apply(db: &Database, ops: &[&Op], users: &mut UserNumbers, seq: u64) -> StoreResult<Vec<Done>> {
    let mut txn = db.begin_write().map_err(storage("starting a write"))?;
    txn.set_durability(Durability::None).map_err(storage("starting a write"))?;
    let (done, fresh) = {
        let mut tables = Tables::open(&txn)?;
        let mut batch = Batch { max_id: 0, users, fresh: HashMap::new(), next_user: None };
        let done = ops.iter().map(|op| tables.apply(op, &mut batch)).collect::<StoreResult<Vec<_>>>()?;
        tables.finish(&batch, seq)?;
        (done, batch.fresh)
    };
    txn.commit().map_err(storage("committing"))?;
    users.learn(fresh);
    Ok(done)
}

/// Log payload: the batch's writes, each a tag byte and its fields
/// (integers little-endian, strings and byte strings length-prefixed).
impl Op {
    fn encode(&self, out: &mut Vec<u8>) {
        let put_u64 = |out: &mut Vec<u8>, n: u64| out.extend_from_slice(&n.to_le_bytes());
        let put_bytes = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            out.extend_from_slice(b);
        };
        let put_strs = |out: &mut Vec<u8>, items: &[String]| {
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_bytes(out, item.as_bytes());
            }
        };
        match self {
            Op::Send { sender, key, channel, id, json, position, recipients, link_channel } => {
                out.push(1);
                put_bytes(out, sender.as_bytes());
                put_bytes(out, key.as_bytes());
                put_bytes(out, channel.as_bytes());
                put_u64(out, *id);
                put_bytes(out, json);
                put_u64(out, *position);
                put_strs(out, recipients);
                out.push(u8::from(*link_channel));
            }
            Op::CreateGroup { id, json, members } => {
                out.push(2);
                put_bytes(out, id.as_bytes());
                put_bytes(out, json);
                put_strs(out, members);
            }
            Op::AddMember { group, user } | Op::RemoveMember { group, user } => {
                out.push(if matches!(self, Op::AddMember { .. }) { 3 } else { 4 });
                put_bytes(out, group.as_bytes());
                put_bytes(out, user.as_bytes());
            }
            Op::EnqueuePush { jsons } => {
                out.push(5);
                put_u64(out, jsons.len() as u64);
                for json in jsons {
                    put_bytes(out, json);
                }
            }
            Op::AckPush { seq } => {
                out.push(6);
                put_u64(out, *seq);
            }
        }
    }
}

/// Reads what [`Op::encode`] wrote, field by field.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*first)
    }

    fn u64(&mut self) -> Option<u64> {
        let (bytes, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*bytes))
    }

    fn bytes(&mut self) -> Option<Vec<u8>> {
        let len = usize::try_from(self.u64()?).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (bytes, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(bytes.to_vec())
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?).ok()
    }

    fn strings(&mut self) -> Option<Vec<String>> {
        let n = usize::try_from(self.u64()?).ok()?;
        // Each takes at least 8 bytes: a count beyond that is damage, not a reason to allocate.
        if n > self.0.len() / 8 {
            return None;
        }
        (0..n).map(|_| self.string()).collect()
    }
}

/// The writes of one log payload; `None` if it is damaged.
fn decode_ops(payload: &[u8]) -> Option<Vec<Op>> {
    let mut reader = Reader(payload);
    let mut ops = Vec::new();
    while !reader.0.is_empty() {
        let op = match reader.u8()? {
            1 => Op::Send {
                sender: reader.string()?,
                key: reader.string()?,
                channel: reader.string()?,
                id: reader.u64()?,
                json: reader.bytes()?,
                position: reader.u64()?,
                recipients: reader.strings()?.into(),
                link_channel: reader.u8()? != 0,
            },
            2 => Op::CreateGroup { id: reader.string()?, json: reader.bytes()?, members: reader.strings()? },
            3 => Op::AddMember { group: reader.string()?, user: reader.string()? },
            4 => Op::RemoveMember { group: reader.string()?, user: reader.string()? },
            5 => {
                let n = usize::try_from(reader.u64()?).ok()?;
                if n > reader.0.len() / 8 {
                    return None;
                }
                Op::EnqueuePush { jsons: (0..n).map(|_| reader.bytes()).collect::<Option<_>>()? }
            }
            6 => Op::AckPush { seq: reader.u64()? },
            _ => return None,
        };
        ops.push(op);
    }
    Some(ops)
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
    fn finish(&mut self, batch: &Batch<'_>, seq: u64) -> StoreResult<()> {
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
#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<Op> {
        vec![
            Op::Send {
                sender: "alice".into(),
                key: "k-1".into(),
                channel: "g:1".into(),
                id: 42,
                json: br#"{"text":"h\u00e9"}"#.to_vec(),
                position: 43,
                recipients: vec!["alice".to_string(), "bob".to_string(), "😀".to_string()].into(),
                link_channel: true,
            },
            Op::CreateGroup { id: "g:2".into(), json: b"{}".to_vec(), members: vec!["a".into(), "b".into()] },
            Op::AddMember { group: "g:2".into(), user: "c".into() },
            Op::RemoveMember { group: "g:2".into(), user: "a".into() },
            Op::EnqueuePush { jsons: vec![b"1".to_vec(), Vec::new()] },
            Op::AckPush { seq: u64::MAX },
        ]
    }

    #[test]
    fn log_payloads_decode_to_the_writes_they_hold() {
        let ops = every_kind();
        let mut payload = Vec::new();
        ops.iter().for_each(|op| op.encode(&mut payload));
        assert_eq!(decode_ops(&payload), Some(ops));
        assert_eq!(decode_ops(&[]), Some(Vec::new()));
    }

    #[test]
    fn damaged_payloads_are_refused_not_misread() {
        let mut payload = Vec::new();
        every_kind().iter().for_each(|op| op.encode(&mut payload));
        // Every truncation and an unknown tag are refused (no panic, no partial read).
        for cut in 1..payload.len() {
            if let Some(ops) = decode_ops(&payload[..cut]) {
                // A cut exactly between two writes decodes to the writes before it.
                assert!(ops.len() < every_kind().len(), "cut at {cut}");
            }
        }
        assert_eq!(decode_ops(&[9]), None);
        // A huge length does not allocate.
        let mut lying = vec![2];
        lying.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(decode_ops(&lying), None);
    }
}
