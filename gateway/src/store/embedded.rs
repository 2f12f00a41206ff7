//! [`EmbeddedStore`]: the [`Store`] of the standalone gateway, a redb
//! database in one local folder, so one process needs no cluster at all.
//!
//! redb is synchronous and allows one write transaction at a time, each
//! durable commit costing an fsync. So that durable acks still reach tens of
//! thousands of messages per second, every write goes to ONE writer thread
//! that does group commit: it takes all requests already queued (up to
//! [`MAX_BATCH`]), applies them in one write transaction, commits once and
//! only then answers each of them. A send is one request: its idempotency
//! key, history row and inbox entries commit together or not at all. Reads run in their own read transactions
//! on tokio's blocking pool; redb lets them run beside the writer and they
//! see every commit that finished before they began.
//!
//! Tables (keys sort element by element, strings by bytes):
//! - `messages`: `(channel, id) → Message JSON`, a channel's history in id order.
//! - `inbox_refs`: `(user, position) → (channel, id)`: a reference to the
//!   history row, so a message to 100 members stores its text once.
//! - `sends`: `(sender, idempotency key) → (id, channel)`.
//! - `groups`: `group id → Group JSON`.
//! - `members`: `(group, user) → ()`; `user_channels`: `(user, channel) → ()`.
//! - `push`: `seq → job JSON`, the standalone push queue, oldest first.
//! - `meta`: `name → u64` counters kept in the same transactions as the data
//!   (`max_id`, `push_seq`), so they never disagree with it after a crash.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, Table, TableDefinition, TableHandle, WriteTransaction,
};
use tokio::sync::{mpsc, oneshot};

use super::{Group, InboxEntry, Message, NewMessage, Page, Store, StoreError, StoreResult, Stored};

/// File name of the database inside the store's folder.
pub const DB_FILE: &str = "kubechat.redb";

/// Most requests committed in one transaction: bounds the latency a request
/// waits behind others while still amortizing the fsync.
pub const MAX_BATCH: usize = 512;

/// Requests waiting for the writer; senders wait (asynchronously) beyond it,
/// which is the backpressure when the disk cannot keep up.
const QUEUE: usize = 4096;

const WRITER_STOPPED: &str = "embedded store writer stopped";

type Pair = (&'static str, u64);
type Link = (&'static str, &'static str);

const MESSAGES: TableDefinition<Pair, &[u8]> = TableDefinition::new("messages");
const INBOX: TableDefinition<Pair, Pair> = TableDefinition::new("inbox_refs");
/// Before inbox entries referred to history rows they held the message
/// JSON; a store written then is converted when opened.
const INBOX_V1: TableDefinition<Pair, &[u8]> = TableDefinition::new("inbox");
const SENDS: TableDefinition<Link, (u64, &str)> = TableDefinition::new("sends");
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
const MEMBERS: TableDefinition<Link, ()> = TableDefinition::new("members");
const USER_CHANNELS: TableDefinition<Link, ()> = TableDefinition::new("user_channels");
const PUSH: TableDefinition<u64, &[u8]> = TableDefinition::new("push");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const META_MAX_ID: &str = "max_id";
const META_PUSH_SEQ: &str = "push_seq";

/// Maps any redb error: corruption is [`StoreError::Corrupt`], everything
/// else (I/O, locks, a closed database) may go away on retry.
fn storage<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> StoreError {
    move |err| match err.into() {
        redb::Error::Corrupted(detail) => StoreError::Corrupt(format!("{context}: {detail}")),
        other => StoreError::Unavailable(format!("{context}: {other}")),
    }
}

fn decode<T: serde::de::DeserializeOwned>(what: &'static str, bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|err| StoreError::Corrupt(format!("{what}: {err}")))
}

fn encode<T: serde::Serialize>(what: &'static str, value: &T) -> StoreResult<Vec<u8>> {
    // Only fails for types that cannot be JSON (never ours), but must not panic.
    serde_json::to_vec(value).map_err(|err| StoreError::Corrupt(format!("encoding {what}: {err}")))
}

/// One write, in owned form so it can cross to the writer thread. JSON is
/// encoded by the caller so the single writer only does B-tree work.
enum Op {
    Send {
        sender: String,
        key: String,
        channel: String,
        id: u64,
        json: Vec<u8>,
        position: u64,
        recipients: std::sync::Arc<[String]>,
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
enum Done {
    Unit,
    /// The send's key was stored before, for this message (JSON).
    Duplicate(Vec<u8>),
    Seq(u64),
}

struct Request {
    op: Op,
    reply: oneshot::Sender<StoreResult<Done>>,
}

/// Durable chat storage in a local folder (see the module docs).
///
/// Dropping it closes the write queue and waits for the writer thread to
/// finish its last batch, so the folder can be opened again right away.
pub struct EmbeddedStore {
    db: Arc<Database>,
    /// `None` only while dropping.
    writes: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`. Blocking: call it at startup
    /// (or from `spawn_blocking`); after an unclean shutdown redb repairs the
    /// file here, which can take a while for a large database.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|err| StoreError::Unavailable(format!("creating {}: {err}", dir.display())))?;
        let db = Database::create(dir.join(DB_FILE)).map_err(storage("opening the embedded store"))?;
        create_tables(&db)?;
        let db = Arc::new(db);
        let (writes, queue) = mpsc::channel(QUEUE);
        let writer_db = Arc::clone(&db);
        let writer = std::thread::Builder::new()
            .name("kubechat-store-writer".into())
            .spawn(move || run_writer(&writer_db, queue))
            .map_err(|err| StoreError::Unavailable(format!("starting the embedded store writer: {err}")))?;
        Ok(Self { db, writes: Some(writes), writer: Some(writer) })
    }

    /// Appends a job to the push queue; returns its sequence number, which
    /// never repeats (even after the queue emptied or the process restarted).
    pub async fn enqueue_push(&self, job: serde_json::Value) -> StoreResult<u64> {
        self.enqueue_pushes(vec![job]).await
    }

    /// Appends jobs to the push queue in one write; returns the sequence
    /// number of the last.
    pub async fn enqueue_pushes(&self, jobs: Vec<serde_json::Value>) -> StoreResult<u64> {
        let jsons = jobs.iter().map(|job| encode("push job", job)).collect::<StoreResult<Vec<_>>>()?;
        match self.write(Op::EnqueuePush { jsons }).await? {
            Done::Seq(seq) => Ok(seq),
            _ => Err(unexpected_answer()),
        }
    }

    /// Up to `limit` queued push jobs, oldest first. They stay queued until
    /// [`Self::ack_push`], so a crash before the ack means a redelivery.
    pub async fn push_jobs(&self, limit: usize) -> StoreResult<Vec<(u64, serde_json::Value)>> {
        self.read(move |txn| {
            let table = txn.open_table(PUSH).map_err(storage("opening push"))?;
            let mut jobs = Vec::new();
            for row in table.iter().map_err(storage("reading push"))?.take(limit) {
                let (seq, job) = row.map_err(storage("reading push"))?;
                jobs.push((seq.value(), decode("push job", job.value())?));
            }
            Ok(jobs)
        })
        .await
    }

    /// Removes a delivered push job; acking an unknown sequence is a no-op.
    pub async fn ack_push(&self, seq: u64) -> StoreResult<()> {
        self.write(Op::AckPush { seq }).await.map(drop)
    }

    /// The largest message id ever stored (0 if none): the id generator's
    /// floor after a restart, in case the clock went backwards meanwhile.
    pub async fn max_id(&self) -> StoreResult<u64> {
        self.read(|txn| {
            let meta = txn.open_table(META).map_err(storage("opening meta"))?;
            Ok(meta.get(META_MAX_ID).map_err(storage("reading meta"))?.map_or(0, |v| v.value()))
        })
        .await
    }

    /// Queues one write and waits until it is committed durably.
    async fn write(&self, op: Op) -> StoreResult<Done> {
        let stopped = || StoreError::Unavailable(WRITER_STOPPED.into());
        let writes = self.writes.as_ref().ok_or_else(stopped)?;
        let (reply, answer) = oneshot::channel();
        writes.send(Request { op, reply }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Runs `read` in a fresh read transaction on the blocking pool.
    async fn read<T, F>(&self, read: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> StoreResult<T> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(storage("starting a read"))?;
            read(&txn)
        })
        .await
        .map_err(|err| StoreError::Unavailable(format!("embedded store read did not finish: {err}")))?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer's loop once it has answered
        // everything queued; joining releases its handle on the file.
        drop(self.writes.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn unexpected_answer() -> StoreError {
    StoreError::Unavailable("embedded store writer answered another kind of request".into())
}

/// `StoreError` is not `Clone`; a batch's one error goes to every request.
fn same_error(err: &StoreError) -> StoreError {
    match err {
        StoreError::Unavailable(detail) => StoreError::Unavailable(detail.clone()),
        StoreError::Corrupt(detail) => StoreError::Corrupt(detail.clone()),
    }
}

fn create_tables(db: &Database) -> StoreResult<()> {
    let txn = db.begin_write().map_err(storage("creating tables"))?;
    {
        // Opening a table in a write transaction creates it if missing.
        txn.open_table(MESSAGES).map_err(storage("creating messages"))?;
        txn.open_table(INBOX).map_err(storage("creating inbox"))?;
        txn.open_table(SENDS).map_err(storage("creating sends"))?;
        txn.open_table(GROUPS).map_err(storage("creating groups"))?;
        txn.open_table(MEMBERS).map_err(storage("creating members"))?;
        txn.open_table(USER_CHANNELS).map_err(storage("creating user_channels"))?;
        txn.open_table(PUSH).map_err(storage("creating push"))?;
        txn.open_table(META).map_err(storage("creating meta"))?;
    }
    convert_inbox_v1(&txn)?;
    txn.commit().map_err(storage("creating tables"))
}

/// Turns the inbox of a store written before inbox entries referred to
/// history rows (each held the message JSON) into references, in the
/// transaction that opens the store.
fn convert_inbox_v1(txn: &WriteTransaction) -> StoreResult<()> {
    let exists = txn.list_tables().map_err(storage("listing tables"))?.any(|t| t.name() == INBOX_V1.name());
    if !exists {
        return Ok(());
    }
    let mut converted = 0_usize;
    {
        let old = txn.open_table(INBOX_V1).map_err(storage("opening the old inbox"))?;
        let mut inbox = txn.open_table(INBOX).map_err(storage("opening inbox"))?;
        for row in old.iter().map_err(storage("reading the old inbox"))? {
            let (key, json) = row.map_err(storage("reading the old inbox"))?;
            let (user, position) = key.value();
            let message: Message = decode("old inbox message", json.value())?;
            inbox.insert((user, position), (message.channel.as_str(), message.id)).map_err(storage("writing inbox"))?;
            converted += 1;
        }
    }
    txn.delete_table(INBOX_V1).map_err(storage("removing the old inbox"))?;
    tracing::info!(entries = converted, "converted the embedded store's inbox to references");
    Ok(())
}

/// The writer thread: one group commit per turn until the store is dropped.
fn run_writer(db: &Database, mut queue: mpsc::Receiver<Request>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        commit_batch(db, &mut batch);
    }
}

/// Where a batch failed: before the commit nothing was written, so each
/// request can be retried alone; a failed commit may have landed and redb
/// refuses further writes anyway, so everyone just gets the error.
enum Failure {
    Apply(StoreError),
    Commit(StoreError),
}

fn commit_batch(db: &Database, batch: &mut Vec<Request>) {
    let ops: Vec<&Op> = batch.iter().map(|request| &request.op).collect();
    match apply(db, &ops) {
        Ok(done) => {
            for (request, done) in batch.drain(..).zip(done) {
                let _ = request.reply.send(Ok(done));
            }
        }
        Err(Failure::Apply(err)) if batch.len() > 1 => {
            // Isolate the request that failed instead of failing its neighbours.
            tracing::warn!(error = %err, requests = batch.len(), "embedded store batch failed; retrying one by one");
            for request in batch.drain(..) {
                let answer = apply(db, &[&request.op]).map(|mut done| done.pop().unwrap_or(Done::Unit));
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

/// The tables a batch writes, opened once per transaction.
struct Tables<'t> {
    messages: Table<'t, Pair, &'static [u8]>,
    inbox: Table<'t, Pair, Pair>,
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
            inbox: txn.open_table(INBOX).map_err(storage("opening inbox"))?,
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

    fn apply(&mut self, op: &Op, max_id: &mut u64) -> StoreResult<Done> {
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
                for user in recipients.iter() {
                    self.inbox
                        .insert((user.as_str(), *position), (channel.as_str(), *id))
                        .map_err(storage("writing inbox"))?;
                    if *link_channel {
                        self.user_channels
                            .insert((user.as_str(), channel.as_str()), ())
                            .map_err(storage("writing user_channels"))?;
                    }
                }
                *max_id = (*max_id).max(*id).max(*position);
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
}

/// Applies `ops` in one write transaction and commits it (durably: redb's
/// default is `Durability::Immediate`).
fn apply(db: &Database, ops: &[&Op]) -> Result<Vec<Done>, Failure> {
    let txn = db.begin_write().map_err(|err| Failure::Apply(storage("starting a write")(err)))?;
    let done = {
        let mut tables = Tables::open(&txn).map_err(Failure::Apply)?;
        let mut max_id = 0;
        let done = ops.iter().map(|op| tables.apply(op, &mut max_id)).collect::<StoreResult<Vec<_>>>();
        let done = done.and_then(|done| {
            if max_id > tables.meta(META_MAX_ID)? {
                tables.meta.insert(META_MAX_ID, max_id).map_err(storage("writing meta"))?;
            }
            Ok(done)
        });
        done.map_err(Failure::Apply)?
    };
    txn.commit().map_err(|err| Failure::Commit(storage("committing")(err)))?;
    Ok(done)
}

/// All rows of `table` whose key starts with `prefix`, in key order.
fn second_keys<V: redb::Value + 'static>(
    table: &impl ReadableTable<Link, V>,
    prefix: &str,
    what: &'static str,
) -> StoreResult<Vec<String>> {
    let mut out = Vec::new();
    for row in table.range((prefix, "")..).map_err(storage(what))? {
        let (key, _) = row.map_err(storage(what))?;
        let (first, second) = key.value();
        if first != prefix {
            break;
        }
        out.push(second.to_owned());
    }
    Ok(out)
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn store_message(&self, new: NewMessage) -> StoreResult<Stored> {
        let NewMessage { message, key, recipients, position, link_channel } = new;
        let op = Op::Send {
            sender: message.sender.clone(),
            key,
            channel: message.channel.clone(),
            id: message.id,
            json: encode("message", &message)?,
            position,
            recipients,
            link_channel,
        };
        match self.write(op).await? {
            Done::Unit => Ok(Stored { message, position, duplicate: false }),
            Done::Duplicate(json) => Ok(Stored { message: decode("message", &json)?, position: 0, duplicate: true }),
            Done::Seq(_) => Err(unexpected_answer()),
        }
    }

    async fn inbox_after(&self, user: &str, after: u64, limit: usize) -> StoreResult<Vec<InboxEntry>> {
        if after == u64::MAX || limit == 0 {
            return Ok(Vec::new());
        }
        let user = user.to_owned();
        self.read(move |txn| {
            let inbox = txn.open_table(INBOX).map_err(storage("opening inbox"))?;
            let messages = txn.open_table(MESSAGES).map_err(storage("opening messages"))?;
            let range = (user.as_str(), after + 1)..=(user.as_str(), u64::MAX);
            let mut entries = Vec::new();
            for row in inbox.range(range).map_err(storage("reading inbox"))?.take(limit) {
                let (key, reference) = row.map_err(storage("reading inbox"))?;
                let (_, position) = key.value();
                let (channel, id) = reference.value();
                // Written in the same transaction as its inbox entries, so
                // only a damaged file lacks it: skip it rather than wedge the sync.
                match messages.get((channel, id)).map_err(storage("reading messages"))? {
                    Some(message) => {
                        entries.push(InboxEntry { position, message: decode("message", message.value())? })
                    }
                    None => tracing::error!(user, channel, id, "inbox entry refers to a missing message; skipped"),
                }
            }
            Ok(entries)
        })
        .await
    }

    async fn history(&self, channel: &str, page: Page, limit: usize) -> StoreResult<Vec<Message>> {
        let empty = match page {
            Page::Latest => false,
            Page::Before(id) => id == 0,
            Page::After(id) => id == u64::MAX,
        };
        if empty || limit == 0 {
            return Ok(Vec::new());
        }
        let channel = channel.to_owned();
        self.read(move |txn| {
            let table = txn.open_table(MESSAGES).map_err(storage("opening messages"))?;
            let ch = channel.as_str();
            let (lower, upper, newest_first) = match page {
                Page::Latest => (Bound::Included((ch, 0)), Bound::Included((ch, u64::MAX)), true),
                Page::Before(id) => (Bound::Included((ch, 0)), Bound::Excluded((ch, id)), true),
                Page::After(id) => (Bound::Excluded((ch, id)), Bound::Included((ch, u64::MAX)), false),
            };
            let rows = table.range((lower, upper)).map_err(storage("reading messages"))?;
            let rows: Box<dyn Iterator<Item = _>> = if newest_first { Box::new(rows.rev()) } else { Box::new(rows) };
            let mut messages = Vec::new();
            for row in rows.take(limit) {
                let (_, message) = row.map_err(storage("reading messages"))?;
                messages.push(decode("message", message.value())?);
            }
            Ok(messages)
        })
        .await
    }

    async fn message(&self, channel: &str, id: u64) -> StoreResult<Option<Message>> {
        let channel = channel.to_owned();
        self.read(move |txn| {
            let table = txn.open_table(MESSAGES).map_err(storage("opening messages"))?;
            match table.get((channel.as_str(), id)).map_err(storage("reading messages"))? {
                Some(message) => decode("message", message.value()).map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    async fn create_group(&self, group: &Group, members: &[String]) -> StoreResult<()> {
        let op = Op::CreateGroup { id: group.id.clone(), json: encode("group", group)?, members: members.to_vec() };
        self.write(op).await.map(drop)
    }

    async fn group(&self, id: &str) -> StoreResult<Option<Group>> {
        let id = id.to_owned();
        self.read(move |txn| {
            let table = txn.open_table(GROUPS).map_err(storage("opening groups"))?;
            match table.get(id.as_str()).map_err(storage("reading groups"))? {
                Some(group) => decode("group", group.value()).map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    async fn add_member(&self, group: &str, user: &str) -> StoreResult<()> {
        self.write(Op::AddMember { group: group.into(), user: user.into() }).await.map(drop)
    }

    async fn remove_member(&self, group: &str, user: &str) -> StoreResult<()> {
        self.write(Op::RemoveMember { group: group.into(), user: user.into() }).await.map(drop)
    }

    async fn members(&self, group: &str) -> StoreResult<Vec<String>> {
        let group = group.to_owned();
        self.read(move |txn| {
            let table = txn.open_table(MEMBERS).map_err(storage("opening members"))?;
            second_keys(&table, &group, "reading members")
        })
        .await
    }

    async fn channels_of(&self, user: &str) -> StoreResult<Vec<String>> {
        let user = user.to_owned();
        self.read(move |txn| {
            let table = txn.open_table(USER_CHANNELS).map_err(storage("opening user_channels"))?;
            second_keys(&table, &user, "reading user_channels")
        })
        .await
    }
}
