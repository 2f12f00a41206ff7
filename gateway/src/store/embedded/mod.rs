//! [`EmbeddedStore`]: the [`Store`] of the standalone gateway, a redb
//! database in one local folder, so one process needs no cluster at all.
//!
//! redb is synchronous and allows one write transaction at a time, and a
//! durable commit writes back every page touched since the last one. So
//! that durable acks reach tens of thousands of messages per second with
//! low latency, every write goes through two threads ([`pipeline`]): a
//! logger that makes a whole batch durable with one append to a write-ahead
//! log ([`wal`]) and answers it, and an applier that applies batches to
//! redb ([`tables`]) and writes its pages back at checkpoints nobody waits
//! on. A send is one request: its idempotency key, history row and inbox
//! entries are logged together and applied together. Reads run in their own read transactions on tokio's blocking pool;
//! redb lets them run beside the writer and they see every commit that
//! finished before they began.
//!
//! Tables (keys sort element by element, strings by bytes):
//! - `messages`: `(channel, id) → Message JSON`, a channel's history in id order.
//! - `positions`: `position → (channel, id)`: the message an inbox position
//!   holds (every recipient of a message gets the same position).
//! - `inbox_chunks`: `user number << 64 | first position → positions`: each
//!   user's inbox positions in chunks of up to 64 ([`inbox`]), so a
//!   transaction adds all of a user's entries with one rewrite instead of
//!   one insert each (a group message has 100 recipients); the text is
//!   stored once.
//! - `users`: `user → number`, assigned by the writer on first use.
//! - `sends`: `(sender, idempotency key) → (id, channel)`.
//! - `groups`: `group id → Group JSON`.
//! - `members`: `(group, user) → ()`; `user_channels`: `(user, channel) → ()`.
//! - `markers`: `(user, channel) → (delivered_up_to, read_up_to)`, merged
//!   forward by the writer.
//! - `meta`: `name → u64` counters kept in the same transactions as the data
//!   (`max_id`, `next_user`, and `wal_seq`: the last log record applied), so
//!   they never disagree with it after a crash; and the log's `store_id`
//!   and `log_run`, which tie the log files to this database ([`wal`]).
//!
//! Stores written by earlier versions are converted when opened
//! ([`upgrade`]); that includes dropping the push jobs they queued, which
//! nothing consumed (a standalone gateway has no push workers).

mod inbox;
mod ops;
mod pipeline;
mod tables;
mod upgrade;
mod wal;

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{
    Group, InboxEntry, Join, Markers, Message, NewMessage, Page, SendCost, Store, StoreError, StoreResult, Stored,
};
use ops::{Done, Op, Request};
pub use pipeline::{CHECKPOINT_EVERY, MAX_BATCH};
use pipeline::{Progress, Threads};

/// File name of the database inside the store's folder.
pub const DB_FILE: &str = "kubechat.redb";
/// File names of the write-ahead log beside it (`.0` and `.1` are added;
/// the log of format 0 was this name alone).
pub const LOG_FILE: &str = "kubechat.wal";

/// redb's page cache: recent history and inboxes stay in memory (its
/// default, 1 GiB, is more than a standalone gateway should take).
pub const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Requests waiting for the writer; senders wait (asynchronously) beyond it,
/// which is the backpressure when the disk cannot keep up.
const QUEUE: usize = 4096;

const WRITER_STOPPED: &str = "embedded store stopped";

/// A send is one request to the storage thread, one log append.
const ONE_TRANSACTION: SendCost = SendCost { requests: 1, round_trips: 1 };

type Pair = (&'static str, u64);
type Link = (&'static str, &'static str);

const MESSAGES: TableDefinition<Pair, &[u8]> = TableDefinition::new("messages");
const POSITIONS: TableDefinition<u64, Pair> = TableDefinition::new("positions");
const USERS: TableDefinition<&str, u64> = TableDefinition::new("users");
const SENDS: TableDefinition<Link, (u64, &str)> = TableDefinition::new("sends");
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
const MEMBERS: TableDefinition<Link, ()> = TableDefinition::new("members");
const USER_CHANNELS: TableDefinition<Link, ()> = TableDefinition::new("user_channels");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const MARKERS: TableDefinition<Link, (u64, u64)> = TableDefinition::new("markers");

const META_MAX_ID: &str = "max_id";
const META_NEXT_USER: &str = "next_user";
const META_WAL_SEQ: &str = "wal_seq";
const META_LOG_RUN: &str = "log_run";
const META_STORE_ID: &str = "store_id";

/// The inbox key of `position` in the inbox of user number `user`.
fn inbox_key(user: u64, position: u64) -> u128 {
    (u128::from(user) << 64) | u128::from(position)
}

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

/// Durable chat storage in a local folder (see the module docs).
///
/// Dropping it closes the write queue and waits for the writer thread to
/// finish its last batch, so the folder can be opened again right away.
pub struct EmbeddedStore {
    db: Arc<Database>,
    /// Membership changes with a limit, one at a time: one process owns the
    /// store, so this makes "count, then add" atomic.
    membership: tokio::sync::Mutex<()>,
    /// `None` only while dropping.
    writes: Option<mpsc::Sender<Request>>,
    progress: Arc<Progress>,
    threads: Option<Threads>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, checkpointing every
    /// [`CHECKPOINT_EVERY`]. Blocking: call it at startup (or from
    /// `spawn_blocking`); after an unclean shutdown redb repairs the file
    /// here, which can take a while for a large database.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, CHECKPOINT_EVERY)
    }

    /// [`EmbeddedStore::open`] with checkpoints at most `checkpoint_every`
    /// apart (and whenever half a log file is waiting for one).
    pub fn open_with(dir: &Path, checkpoint_every: Duration) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|err| StoreError::Unavailable(format!("creating {}: {err}", dir.display())))?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(dir.join(DB_FILE))
            .map_err(storage("opening the embedded store"))?;
        upgrade::create_tables(&db)?;
        let db = Arc::new(db);
        let (writes, queue) = mpsc::channel(QUEUE);
        let (progress, threads) = pipeline::start(Arc::clone(&db), &dir.join(LOG_FILE), queue, checkpoint_every)?;
        Ok(Self { db, membership: tokio::sync::Mutex::new(()), writes: Some(writes), progress, threads: Some(threads) })
    }

    /// Write-ahead log records (one `fdatasync` each) appended since the
    /// store opened: fewer than the writes when concurrent writes share a
    /// commit.
    pub fn log_records(&self) -> u64 {
        self.progress.logged_since_open()
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
        // Every write answered before this read began is applied first.
        self.progress.caught_up().await?;
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
        // Closing the queue ends the logger once it has answered everything
        // queued, then the applier after a last checkpoint; joining them
        // releases their handles on the file.
        drop(self.writes.take());
        if let Some(threads) = self.threads.take() {
            let _ = threads.logger.join();
            let _ = threads.applier.join();
        }
    }
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
            key: key.clone(),
            channel: message.channel.clone(),
            id: message.id,
            json: encode("message", &message)?,
            position,
            recipients,
            link_channel,
        };
        match self.write(op).await? {
            Done::Unit => Ok(Stored { message, position, duplicate: false, cost: ONE_TRANSACTION }),
            Done::Duplicate(json) => {
                let first: Message = decode("message", &json)?;
                if first.channel != message.channel {
                    return Err(StoreError::KeyReused { key, channel: first.channel });
                }
                Ok(Stored { message: first, position: 0, duplicate: true, cost: ONE_TRANSACTION })
            }
        }
    }

    async fn inbox_after(&self, user: &str, after: u64, limit: usize) -> StoreResult<Vec<InboxEntry>> {
        if after == u64::MAX || limit == 0 {
            return Ok(Vec::new());
        }
        let user = user.to_owned();
        self.read(move |txn| {
            let users = txn.open_table(USERS).map_err(storage("opening users"))?;
            let Some(number) = users.get(user.as_str()).map_err(storage("reading users"))? else {
                return Ok(Vec::new());
            };
            let number = number.value();
            let inbox = txn.open_table(inbox::INBOX_CHUNKS).map_err(storage("opening inbox"))?;
            let positions = txn.open_table(POSITIONS).map_err(storage("opening positions"))?;
            let messages = txn.open_table(MESSAGES).map_err(storage("opening messages"))?;
            let mut entries = Vec::new();
            for position in inbox::after(&inbox, number, after, limit)? {
                // Written in the same transaction as their inbox entries, so
                // only a damaged file lacks them: skip rather than wedge the sync.
                let Some(reference) = positions.get(position).map_err(storage("reading positions"))? else {
                    tracing::error!(user, position, "inbox entry without its position; skipped");
                    continue;
                };
                let (channel, id) = reference.value();
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

    async fn join(&self, group: &str, user: &str, max: usize) -> StoreResult<Join> {
        let _one_at_a_time = self.membership.lock().await;
        let members = self.members(group).await?;
        if members.iter().any(|m| m == user) {
            return Ok(Join::AlreadyMember);
        }
        if members.len() >= max {
            return Ok(Join::Full { members: members.len() });
        }
        self.add_member(group, user).await?;
        Ok(Join::Added)
    }

    async fn remove_member(&self, group: &str, user: &str) -> StoreResult<()> {
        self.write(Op::RemoveMember { group: group.into(), user: user.into() }).await.map(drop)
    }

    async fn set_owner(&self, group: &str, owner: &str) -> StoreResult<()> {
        let Some(mut found) = self.group(group).await? else { return Ok(()) };
        found.owner = owner.to_owned();
        // Writing the group's row again (with no member to add) replaces it.
        let op = Op::CreateGroup { id: found.id.clone(), json: encode("group", &found)?, members: Vec::new() };
        self.write(op).await.map(drop)
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

    async fn advance_markers(&self, user: &str, channel: &str, markers: Markers) -> StoreResult<()> {
        let Markers { delivered_up_to, read_up_to } = markers;
        let op = Op::AdvanceMarkers { user: user.into(), channel: channel.into(), delivered_up_to, read_up_to };
        self.write(op).await.map(drop)
    }

    async fn markers_of(&self, user: &str) -> StoreResult<std::collections::HashMap<String, Markers>> {
        let user = user.to_owned();
        self.read(move |txn| {
            let table = txn.open_table(MARKERS).map_err(storage("opening markers"))?;
            let mut out = std::collections::HashMap::new();
            for row in table.range((user.as_str(), "")..).map_err(storage("reading markers"))? {
                let (key, value) = row.map_err(storage("reading markers"))?;
                let (owner, channel) = key.value();
                if owner != user {
                    break;
                }
                let (delivered_up_to, read_up_to) = value.value();
                out.insert(channel.to_owned(), Markers { delivered_up_to, read_up_to });
            }
            Ok(out)
        })
        .await
    }

    async fn channel_markers(&self, channel: &str, users: &[String]) -> StoreResult<Vec<Markers>> {
        let (channel, users) = (channel.to_owned(), users.to_vec());
        self.read(move |txn| {
            let table = txn.open_table(MARKERS).map_err(storage("opening markers"))?;
            users
                .iter()
                .map(|user| {
                    let found = table.get((user.as_str(), channel.as_str())).map_err(storage("reading markers"))?;
                    Ok(found.map_or_else(Markers::default, |v| {
                        let (delivered_up_to, read_up_to) = v.value();
                        Markers { delivered_up_to, read_up_to }
                    }))
                })
                .collect()
        })
        .await
    }
}
