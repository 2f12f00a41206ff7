//! [`Store`] on ScyllaDB, or any CQL database (Cassandra 5 stands in for it
//! in local runs), for clustered gateways.
//!
//! Schema (all created by [`ScyllaStore::connect`] with `IF NOT EXISTS`, no
//! TTL anywhere: history is kept forever):
//!
//! ```text
//! messages        ((channel_id, bucket), id DESC)   sender, sender_device, body, created_at_ms
//! channel_buckets ((channel_id), bucket DESC)       (the buckets of `messages` holding the channel)
//! inbox           ((user_id, bucket), position DESC) channel_id, message_id
//!                                                    (+ sender, sender_device, body, created_at_ms: older rows only)
//! sends           ((sender, idem_key))               message_id, channel_id
//! groups          ((group_id))                       name, owner, created_at_ms
//! members         ((group_id), user_id)
//! user_channels   ((user_id), channel_id)
//! store_meta      ((name))                           value
//! ```
//!
//! `bucket` is [`bucket_of`] the id (history) or the position (inbox), so a
//! partition holds one month of one channel or one user and stays bounded.
//! Ids and positions are `u64` stored as CQL `bigint` (see [`to_cql`]).
//!
//! An inbox row refers to its message's history row `(channel_id,
//! message_id)` instead of copying it, so a message to 100 members stores
//! its text once. Rows written by earlier versions carry a copy (`body` and
//! the sender columns); they are read as they are. The columns stay in the
//! schema for them.
//!
//! ## Writing a send
//!
//! 1. Reserve `(sender, key)` for the candidate id: `INSERT INTO sends …
//!    IF NOT EXISTS`, a lightweight transaction, so of any number of
//!    concurrent attempts on any number of gateways exactly one reserves and
//!    every other one learns its id from the answer. Not applied and the
//!    reserved message's history row exists: a duplicate, nothing is
//!    written. Not applied and no history row: an earlier attempt failed
//!    part-way (or is still writing on another gateway); this one finishes
//!    it under the reserved id.
//! 2. Concurrently (at most [`WRITE_CONCURRENCY`] requests in flight): one
//!    inbox row per recipient, with `link_channel` one `user_channels` row
//!    per recipient, and the channel's `channel_buckets` row for the
//!    message's bucket unless this process wrote it already.
//! 3. The history row, last.
//!
//! So "the history row exists ⇒ every other row of the send exists", which
//! is what step 1's duplicate check relies on, and "a bucket holds the
//! channel's messages ⇒ it is listed", which history reads rely on.
//!
//! The reservation costs a Paxos round per send (several round trips
//! between replicas instead of one read): nothing weaker stops two gateways
//! from storing one key under two ids.
//!
//! No step is a multi-partition LOGGED batch (each row is its own
//! partition): it would cost a batchlog write and removal on other replicas
//! per send, and a big group's batch must be split under the server's size
//! limit, which gives up its atomicity anyway. Atomicity is not needed:
//! after step 1 the message id is fixed for good, and every later write is
//! an upsert of values fixed by that id (history and bucket rows) or by the
//! attempt (inbox rows at its position). A failure anywhere leaves a
//! reservation without a history row, and a retry (by the driver, the
//! client, on any gateway) rewrites the rows under the same id until the
//! history row lands; no retry can store the message under a second id.
//!
//! Concurrent attempts of one key on one gateway are also serialised in the
//! process (`InFlight`): a later attempt then finds the first one's history
//! row and answers as a duplicate instead of contending for the Paxos round
//! and finishing a send that is not failed. Across gateways an attempt that
//! overtakes the original finishes it too, so a recipient may get a second
//! inbox entry for the same message id, which clients drop by id.
//!
//! ## Reading history
//!
//! A page reads the channel's `channel_buckets` rows from its starting
//! bucket (paged, [`ScyllaConfig::page_size`] at a time) and then only the
//! buckets listed: one request plus one per bucket that holds data, until
//! the page is full. A channel without messages costs one request.
//!
//! Keyspaces created before bucket lists existed hold unlisted history. On
//! the first connect of this version `store_meta` records
//! `buckets_listed_from` (an `IF NOT EXISTS` insert, so all gateways agree):
//! the id epoch's bucket for a new keyspace (everything is listed), and for
//! an older one the bucket after next, at least 30 days ahead, since
//! gateways of the earlier version keep writing unlisted rows until the
//! rolling upgrade is over (assumed to take less than 30 days). Buckets
//! from there on are always listed. A channel's older ones are listed by
//! its first history read once bucket `buckets_listed_from` has begun
//! (every older bucket checked for data, then the rows, then a marker row
//! with bucket [`LEGACY_LISTED`]); until then reads scan them one at a time,
//! as earlier versions did. Backfilling every channel at once instead would
//! mean a scan of the whole `messages` table, and a channel never read
//! costs nothing this way.
//!
//! ## Reading an inbox
//!
//! Reading an inbox resolves each reference with a point read of its
//! history row (concurrently, [`READ_CONCURRENCY`] at a time, order kept).
//! An entry without one is a send still in flight (its history row comes
//! last) or one that failed; either way it is skipped and the page goes on.
//! Skipping loses nothing: a send in flight reaches a device that is
//! syncing live (the device registered before it synced, and the fan-out
//! follows the write), and the cursor a sync hands out to store lags "now"
//! by the chat layer's sync horizon, longer than any write may take, so the
//! entry is read on the device's next sync after a reconnect. A failed send
//! was never acked (its retry writes a fresh position).
//!
//! Lists (a user's channels, a group's members, a channel's buckets) are
//! read in pages of [`ScyllaConfig::page_size`] rows, never as one
//! unbounded response.
//!
//! Consistency: every statement runs at [`ScyllaConfig::consistency`]
//! (QUORUM by default). Writes and reads at QUORUM overlap, which is what
//! gives the trait's "reads see completed writes"; a write returns `Ok` only
//! once the coordinator acknowledged it at that level. Reservations run
//! their Paxos round at SERIAL (LOCAL_SERIAL with a local datacenter).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt, stream};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::response::query_result::QueryResult;
use scylla::response::{PagingState, PagingStateResponse};
use scylla::serialize::SerializationError;
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::writers::RowWriter;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency, Statement};
use scylla::value::{CqlValue, Row as CqlRow};
use tokio::sync::OwnedMutexGuard;

use super::{Group, InboxEntry, Message, NewMessage, Page, Store, StoreError, StoreResult, Stored, bucket_of};
use crate::ids;

/// How far ahead of this gateway's clock another gateway's ids may be: reads
/// that scan buckets "up to now" look this much further so that an id minted
/// by a slightly fast clock just after a month boundary is not skipped.
const CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// Requests of one send in flight at once (a 100-member group is 100 inbox
/// rows): enough to overlap their round trips, few enough that one big
/// send does not monopolise the connection pool.
pub const WRITE_CONCURRENCY: usize = 64;

/// Point reads in flight at once while resolving one inbox page.
pub const READ_CONCURRENCY: usize = 32;

/// The `channel_buckets` row that says a channel's buckets older than
/// `buckets_listed_from` are listed (below every real bucket, so it sorts
/// last in a newest-first read).
pub const LEGACY_LISTED: i32 = i32::MIN;

/// `store_meta` row: the first bucket every writer lists (see the module docs).
const META_LISTED_FROM: &str = "buckets_listed_from";

/// Channels whose newest listed bucket a store remembers; past this the
/// memory is cleared, which only costs repeated (idempotent) bucket rows.
const LISTED_BUCKETS_CAP: usize = 100_000;

/// Connection and schema settings.
#[derive(Clone)]
pub struct ScyllaConfig {
    /// `host:port` of one or more nodes; the driver discovers the rest.
    pub contact_points: Vec<String>,
    /// Created if missing. Lower-case letters, digits and `_`, starting with
    /// a letter, at most 48 characters (it is spliced into DDL).
    pub keyspace: String,
    /// Only used when the keyspace is created; an existing keyspace keeps its
    /// replication (change it with `ALTER KEYSPACE` and a repair).
    pub replication_factor: u32,
    /// Level of every read and write. QUORUM (default) for reads to see
    /// completed writes; `LocalQuorum` when `local_datacenter` is set.
    pub consistency: Consistency,
    pub username: Option<String>,
    pub password: Option<String>,
    /// When set: the keyspace uses `NetworkTopologyStrategy` with
    /// `replication_factor` replicas in this datacenter, and the driver
    /// prefers its nodes.
    pub local_datacenter: Option<String>,
    /// Client-side limit of one request (and of establishing a connection).
    pub request_timeout: Duration,
    /// Upper bound of the estimated payload of one logged batch (membership
    /// changes; creating a big group is split into several batches below
    /// it), because the server rejects larger ones
    /// (`batch_size_fail_threshold`: 50 KiB on Cassandra, 1 MiB on ScyllaDB
    /// by default).
    pub max_batch_bytes: usize,
    /// Rows per response when reading a list (a user's channels, a group's
    /// members, a channel's buckets): bounds each response, however long
    /// the list.
    pub page_size: usize,
}

impl Default for ScyllaConfig {
    fn default() -> Self {
        Self {
            contact_points: vec!["127.0.0.1:9042".to_owned()],
            keyspace: "kubechat".to_owned(),
            replication_factor: 3,
            consistency: Consistency::Quorum,
            username: None,
            password: None,
            local_datacenter: None,
            request_timeout: Duration::from_secs(10),
            max_batch_bytes: 40 * 1024,
            page_size: 1000,
        }
    }
}

/// Hand-written so that the password never reaches a log line.
impl fmt::Debug for ScyllaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScyllaConfig")
            .field("contact_points", &self.contact_points)
            .field("keyspace", &self.keyspace)
            .field("replication_factor", &self.replication_factor)
            .field("consistency", &self.consistency)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("local_datacenter", &self.local_datacenter)
            .field("request_timeout", &self.request_timeout)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("page_size", &self.page_size)
            .finish()
    }
}

/// Every statement the store runs, prepared once at connect time so each
/// request only ships an id and the bound values.
struct Prepared {
    insert_message: PreparedStatement,
    insert_inbox: PreparedStatement,
    history_before: PreparedStatement,
    history_after: PreparedStatement,
    message: PreparedStatement,
    bucket_has_data: PreparedStatement,
    insert_channel_bucket: PreparedStatement,
    buckets_down: PreparedStatement,
    buckets_up: PreparedStatement,
    legacy_buckets: PreparedStatement,
    inbox_after: PreparedStatement,
    reserve_send: PreparedStatement,
    insert_group: PreparedStatement,
    select_group: PreparedStatement,
    insert_member: PreparedStatement,
    delete_member: PreparedStatement,
    select_members: PreparedStatement,
    insert_user_channel: PreparedStatement,
    delete_user_channel: PreparedStatement,
    select_user_channels: PreparedStatement,
}

/// The CQL implementation of [`Store`]. Cheap to share behind an `Arc`: the
/// driver session multiplexes requests over its connection pool.
pub struct ScyllaStore {
    /// Replaced by a new session when the old one does not recover by
    /// itself fast enough (see [`Store::ping`]).
    session: std::sync::RwLock<Arc<Session>>,
    /// To open a new session.
    config: ScyllaConfig,
    prepared: Prepared,
    consistency: Consistency,
    max_batch_bytes: usize,
    /// Buckets from this one on are listed for every channel (module docs).
    listed_from: i32,
    in_flight: InFlight,
    listed: ListedBuckets,
    requests: AtomicU64,
}

/// The newest bucket this process listed per channel: a send writes its
/// bucket's `channel_buckets` row only when it is not the one remembered,
/// so the hot path pays one extra write per channel and month (and process).
#[derive(Default)]
struct ListedBuckets(Mutex<HashMap<String, i32>>);

impl ListedBuckets {
    fn contains(&self, channel: &str, bucket: i32) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get(channel) == Some(&bucket)
    }

    /// Only once the row is written: "remembered ⇒ listed".
    fn insert(&self, channel: &str, bucket: i32) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= LISTED_BUCKETS_CAP && !map.contains_key(channel) {
            map.clear();
        }
        map.insert(channel.to_owned(), bucket);
    }
}

/// Sends in progress in this process, by `(sender, key)`: a retry that
/// overtakes its own original on the same gateway waits for it, then finds
/// its history row and answers as a duplicate, instead of contending for
/// the reservation's Paxos round and then finishing a send that has not
/// failed (a second inbox entry). The reservation alone already keeps the
/// message single. Entries live only while a send holds or awaits them.
#[derive(Default)]
struct InFlight(Mutex<HashMap<SendKey, InFlightEntry>>);

/// `(sender, idempotency key)`.
type SendKey = (String, String);

/// The lock of one key and how many sends hold or await it.
type InFlightEntry = (Arc<tokio::sync::Mutex<()>>, usize);

/// Held for the whole of one send; dropping it (also by cancellation, e.g.
/// the chat layer's write deadline) lets the next attempt of the key in.
struct InFlightGuard<'a> {
    owner: &'a InFlight,
    key: SendKey,
    held: Option<OwnedMutexGuard<()>>,
}

impl InFlight {
    async fn acquire(&self, sender: &str, key: &str) -> InFlightGuard<'_> {
        let key = (sender.to_owned(), key.to_owned());
        let lock = {
            let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = map.entry(key.clone()).or_default();
            entry.1 += 1;
            Arc::clone(&entry.0)
        };
        // The guard exists before the wait, so a cancelled wait still unregisters.
        let mut guard = InFlightGuard { owner: self, key, held: None };
        guard.held = Some(lock.lock_owned().await);
        guard
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.held.take();
        let mut map = self.owner.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get_mut(&self.key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// A `u64` id or position as a CQL `bigint`, bit for bit. Ids are below 2^63
/// for about 70 years after [`ids::EPOCH_MS`] (41 bits of milliseconds), so
/// they stay positive and keep their order; beyond that they would wrap to
/// negative numbers and sort first.
pub fn to_cql(id: u64) -> i64 {
    id.cast_signed()
}

/// Inverse of [`to_cql`].
pub fn from_cql(value: i64) -> u64 {
    value.cast_unsigned()
}

/// The error of a failed request: the backend could not do it now.
fn unavailable<E: fmt::Display>(what: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Unavailable(format!("{what}: {e}"))
}

/// The error of a response whose rows are not what the schema promises.
fn corrupt<E: fmt::Display>(what: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Corrupt(format!("{what}: {e}"))
}

/// CQL `LIMIT` of a `usize` (a limit beyond `i32::MAX` means "all").
fn cql_limit(limit: usize) -> i32 {
    i32::try_from(limit).unwrap_or(i32::MAX)
}

/// The newest bucket that may hold data now (see [`CLOCK_SKEW_MS`]).
fn newest_bucket() -> i32 {
    newest_bucket_at(ids::now_ms())
}

/// The newest bucket that may hold data at `now_ms`: that of an id minted
/// by a clock [`CLOCK_SKEW_MS`] ahead.
fn newest_bucket_at(now_ms: i64) -> i32 {
    bucket_of(ids::first_id_at(now_ms.saturating_add(CLOCK_SKEW_MS)))
}

/// The bucket of an id minted now by this gateway's clock.
fn current_bucket() -> i32 {
    bucket_of(ids::first_id_at(ids::now_ms()))
}

/// The serial consistency of reservations: linearizable across the
/// cluster, or within the local datacenter when the store prefers one.
fn serial_consistency(config: &ScyllaConfig) -> SerialConsistency {
    match config.local_datacenter {
        Some(_) => SerialConsistency::LocalSerial,
        None => SerialConsistency::Serial,
    }
}

/// The answer to an `INSERT … IF NOT EXISTS`: whether it applied and, when
/// it did not, the columns of the row that was there. Read by column name:
/// Cassandra sends only `[applied]` when it applied, ScyllaDB every column.
struct Conditional {
    applied: bool,
    columns: Vec<(String, Option<CqlValue>)>,
}

impl Conditional {
    fn of(result: QueryResult, what: &'static str) -> StoreResult<Self> {
        let rows = result.into_rows_result().map_err(corrupt(what))?;
        let names: Vec<String> = rows.column_specs().iter().map(|spec| spec.name().to_owned()).collect();
        let row: CqlRow = rows.single_row().map_err(corrupt(what))?;
        let columns: Vec<(String, Option<CqlValue>)> = names.into_iter().zip(row.columns).collect();
        let applied = columns
            .iter()
            .find(|(name, _)| name == "[applied]")
            .and_then(|(_, value)| value.as_ref())
            .and_then(CqlValue::as_boolean)
            .ok_or_else(|| StoreError::Corrupt(format!("{what}: no [applied] column in the answer")))?;
        Ok(Self { applied, columns })
    }

    /// A column of the existing row (`None` if absent or null).
    fn get(&self, name: &str) -> Option<&CqlValue> {
        self.columns.iter().find(|(n, _)| n == name).and_then(|(_, value)| value.as_ref())
    }
}

/// The oldest bucket that may hold data: nothing is older than the id epoch.
fn oldest_bucket() -> i32 {
    bucket_of(0)
}

/// Decodes all rows of a result into `R`.
fn decode<R>(result: QueryResult, what: &'static str) -> StoreResult<Vec<R>>
where
    R: for<'f> DeserializeRow<'f, 'f>,
{
    let rows = result.into_rows_result().map_err(corrupt(what))?;
    let typed = rows.rows::<R>().map_err(corrupt(what))?;
    typed.map(|row| row.map_err(corrupt(what))).collect()
}

/// Checks a keyspace name before it is spliced into DDL text.
fn valid_keyspace(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 48
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A CQL string literal.
fn cql_string(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

type MessageRow = (i64, String, String, String, i64);
/// position, channel, message id, then the copy that only rows written by
/// earlier versions carry: sender, device, body, created_at.
type InboxRow = (i64, String, i64, Option<String>, Option<String>, Option<String>, Option<i64>);

/// The bound values of one write. Batches and concurrent write lists mix
/// statements of different shapes, and the driver wants one `SerializeRow` type.
enum Row<'a> {
    /// `insert_message`: channel, bucket, id, sender, device, body, created_at.
    Message((&'a str, i32, i64, &'a str, &'a str, &'a str, i64)),
    /// `insert_inbox`: user, bucket, position, channel, message id.
    Inbox((&'a str, i32, i64, &'a str, i64)),
    /// `insert_group`: id, name, owner, created_at.
    Group((&'a str, &'a str, &'a str, i64)),
    /// `insert_member` / `insert_user_channel` and their deletes.
    Pair((&'a str, &'a str)),
    /// `insert_channel_bucket`: channel, bucket.
    Bucket((&'a str, i32)),
}

impl Row<'_> {
    /// Upper estimate of the size the server counts against its batch limit,
    /// for splitting big batches: the strings plus an allowance per cell for
    /// numbers, timestamps and row overhead (Cassandra 5 measures about 20
    /// bytes per cell on top of the strings; 32 keeps a margin).
    fn estimated_bytes(&self) -> usize {
        const CELL: usize = 32;
        match self {
            Self::Message((c, _, _, s, d, b, _)) => c.len() + s.len() + d.len() + b.len() + 7 * CELL,
            Self::Inbox((u, _, _, c, _)) => u.len() + c.len() + 5 * CELL,
            Self::Group((i, n, o, _)) => i.len() + n.len() + o.len() + 4 * CELL,
            Self::Pair((a, b)) => a.len() + b.len() + 2 * CELL,
            Self::Bucket((c, _)) => c.len() + 2 * CELL,
        }
    }
}

impl SerializeRow for Row<'_> {
    fn serialize(&self, ctx: &RowSerializationContext<'_>, writer: &mut RowWriter) -> Result<(), SerializationError> {
        match self {
            Self::Message(v) => v.serialize(ctx, writer),
            Self::Inbox(v) => v.serialize(ctx, writer),
            Self::Group(v) => v.serialize(ctx, writer),
            Self::Pair(v) => v.serialize(ctx, writer),
            Self::Bucket(v) => v.serialize(ctx, writer),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}

impl ScyllaStore {
    /// Connects, creates the keyspace and tables if missing (idempotent, so
    /// every gateway does it at start) and prepares all statements.
    pub async fn connect(config: ScyllaConfig) -> StoreResult<Self> {
        if !valid_keyspace(&config.keyspace) {
            return Err(StoreError::Unavailable(format!(
                "invalid keyspace name {:?}: lower-case letters, digits and _, starting with a letter, at most 48",
                config.keyspace
            )));
        }
        if config.contact_points.is_empty() {
            return Err(StoreError::Unavailable("no CQL contact points configured".to_owned()));
        }
        let session = open_session(&config).await?;
        let existed = create_schema(&session, &config).await?;
        let listed_from = buckets_listed_from(&session, &config, existed).await?;
        let prepared = prepare_all(&session, &config).await?;
        Ok(Self {
            session: std::sync::RwLock::new(Arc::new(session)),
            prepared,
            consistency: config.consistency,
            max_batch_bytes: config.max_batch_bytes,
            listed_from,
            in_flight: InFlight::default(),
            listed: ListedBuckets::default(),
            requests: AtomicU64::new(0),
            config,
        })
    }

    fn session(&self) -> Arc<Session> {
        Arc::clone(&self.session.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Swaps in a new session when the current one cannot answer: after an
    /// outage the driver refills its pool with a backoff of up to 10 s,
    /// while a new session connects as soon as the store answers again.
    async fn reconnect(&self) -> StoreResult<()> {
        let fresh = open_session(&self.config).await?;
        *self.session.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh);
        tracing::info!("store: connected with a new session");
        Ok(())
    }
}

/// A driver session to the configured nodes (no schema work).
async fn open_session(config: &ScyllaConfig) -> StoreResult<Session> {
    let profile = ExecutionProfile::builder()
        .consistency(config.consistency)
        .request_timeout(Some(config.request_timeout))
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&config.contact_points)
        .connection_timeout(config.request_timeout)
        .hostname_resolution_timeout(Some(config.request_timeout))
        // Only this keyspace's schema: a shared cluster may hold many, and
        // reading them all makes a (re)connect slow.
        .keyspaces_to_fetch([config.keyspace.clone()])
        .default_execution_profile_handle(profile.into_handle());
    // A user without a password still authenticates (with an empty one), so
    // a half-configured secret fails loudly instead of connecting anonymously.
    if let Some(user) = &config.username {
        builder = builder.user(user, config.password.clone().unwrap_or_default());
    }
    if let Some(dc) = &config.local_datacenter {
        builder = builder.prefer_datacenter(dc.clone());
    }
    // The driver's own timeouts bound each step; this guard bounds the
    // whole handshake so a black-holed contact point cannot hang startup.
    let guard = config.request_timeout.saturating_mul(3);
    let session = tokio::time::timeout(guard, builder.build())
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!("connect to {:?}: no session after {guard:?}", config.contact_points))
        })?
        .map_err(|e| StoreError::Unavailable(format!("connect to {:?}: {e}", config.contact_points)))?;
    Ok(session)
}

impl ScyllaStore {
    /// CQL requests sent since connecting (each page of a paged read and
    /// each batch counts one; setting up the schema does not): what a read
    /// costs, observable without timing it.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Runs one statement and returns all of its result in one response
    /// (for point reads, writes and reads bounded by a `LIMIT`).
    async fn run(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
        what: &'static str,
    ) -> StoreResult<QueryResult> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.session().execute_unpaged(statement, values).await.map_err(unavailable(what))
    }

    /// One page of a paged read; `None` as the next state once it was the last.
    async fn page<R>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
        state: PagingState,
        what: &'static str,
    ) -> StoreResult<(Vec<R>, Option<PagingState>)>
    where
        R: for<'f> DeserializeRow<'f, 'f>,
    {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let (result, response): (QueryResult, PagingStateResponse) =
            self.session().execute_single_page(statement, values, state).await.map_err(unavailable(what))?;
        let next = match response.into_paging_control_flow() {
            ControlFlow::Continue(next) => Some(next),
            ControlFlow::Break(()) => None,
        };
        Ok((decode(result, what)?, next))
    }

    /// Every row of a list, read page by page.
    async fn read_pages<R>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
        what: &'static str,
    ) -> StoreResult<Vec<R>>
    where
        R: for<'f> DeserializeRow<'f, 'f>,
    {
        let mut out = Vec::new();
        let mut state = Some(PagingState::start());
        while let Some(current) = state {
            let (rows, next) = self.page(statement, &values, current, what).await?;
            out.extend(rows);
            state = next;
        }
        Ok(out)
    }

    /// Runs `rows` concurrently, at most [`WRITE_CONCURRENCY`] at a time,
    /// each its own request (they are in different partitions). Stops at the
    /// first failure, leaving some written: every write is an idempotent
    /// upsert, so the caller's retry rewrites them.
    async fn write_concurrently(
        &self,
        what: &'static str,
        rows: Vec<(&PreparedStatement, Row<'_>)>,
    ) -> StoreResult<()> {
        stream::iter(rows.into_iter().map(Ok))
            .try_for_each_concurrent(WRITE_CONCURRENCY, |(statement, row)| async move {
                self.run(statement, row, what).await.map(drop)
            })
            .await
    }

    /// Runs `rows` as logged batches (each all-or-nothing once accepted), in
    /// order, split so that none exceeds `max_batch_bytes`. Everything written
    /// this way is idempotent, so a caller retrying after a failure in a later
    /// batch just rewrites the earlier ones.
    async fn write_batched(&self, what: &'static str, rows: Vec<(&PreparedStatement, Row<'_>)>) -> StoreResult<()> {
        let mut batch = self.new_batch();
        let mut values: Vec<Row<'_>> = Vec::new();
        let mut bytes = 0;
        for (statement, row) in rows {
            let size = row.estimated_bytes();
            if !values.is_empty() && bytes + size > self.max_batch_bytes {
                self.requests.fetch_add(1, Ordering::Relaxed);
                self.session().batch(&batch, &values).await.map_err(unavailable(what))?;
                batch = self.new_batch();
                values.clear();
                bytes = 0;
            }
            batch.append_statement(statement.clone());
            values.push(row);
            bytes += size;
        }
        if !values.is_empty() {
            self.requests.fetch_add(1, Ordering::Relaxed);
            self.session().batch(&batch, &values).await.map_err(unavailable(what))?;
        }
        Ok(())
    }

    fn new_batch(&self) -> Batch {
        let mut batch = Batch::new(BatchType::Logged);
        batch.set_consistency(self.consistency);
        // Upserts and deletes of fixed values: safe for the driver to retry.
        batch.set_is_idempotent(true);
        batch
    }

    /// Reads `bucket` of a channel's history past `bound` (newest-first or
    /// oldest-first, by `statement`) into `out`, up to `limit` in all.
    async fn read_bucket(
        &self,
        channel: &str,
        statement: &PreparedStatement,
        bucket: i32,
        bound: i64,
        limit: usize,
        out: &mut Vec<Message>,
    ) -> StoreResult<()> {
        let want = limit.saturating_sub(out.len());
        let result = self.run(statement, (channel, bucket, bound, cql_limit(want)), "read history").await?;
        let rows: Vec<MessageRow> = decode(result, "decode history")?;
        out.extend(rows.into_iter().map(|row| message_of(channel, row)));
        Ok(())
    }

    /// Reads `buckets` in the order given until `out` holds `limit` messages.
    async fn read_buckets(
        &self,
        channel: &str,
        statement: &PreparedStatement,
        buckets: impl IntoIterator<Item = i32>,
        bound: i64,
        limit: usize,
        out: &mut Vec<Message>,
    ) -> StoreResult<()> {
        for bucket in buckets {
            if out.len() >= limit {
                break;
            }
            self.read_bucket(channel, statement, bucket, bound, limit, out).await?;
        }
        Ok(())
    }

    /// Reads the listed buckets (`statement`: `buckets_down` or `buckets_up`
    /// bound to `values`), one page of the list at a time, until `out`
    /// holds `limit` messages.
    async fn read_listed(
        &self,
        channel: &str,
        (statement, values): (&PreparedStatement, (&str, i32, i32)),
        history: &PreparedStatement,
        bound: i64,
        limit: usize,
        out: &mut Vec<Message>,
    ) -> StoreResult<()> {
        let mut buckets = VecDeque::new();
        let mut state = Some(PagingState::start());
        while out.len() < limit {
            if let Some(bucket) = buckets.pop_front() {
                self.read_bucket(channel, history, bucket, bound, limit, out).await?;
                continue;
            }
            let Some(current) = state.take() else { break };
            let (rows, next): (Vec<(i32,)>, _) = self.page(statement, values, current, "read channel buckets").await?;
            buckets.extend(rows.into_iter().map(|(bucket,)| bucket));
            state = next;
        }
        Ok(())
    }

    /// A channel's buckets older than `listed_from` that hold its messages,
    /// oldest first, once listed; lists them if every gateway lists its
    /// writes by now. `None` while they cannot be listed yet: the caller
    /// scans each of them.
    async fn legacy_buckets(&self, channel: &str) -> StoreResult<Option<Vec<i32>>> {
        let result =
            self.run(&self.prepared.legacy_buckets, (channel, self.listed_from), "read channel buckets").await?;
        let rows: Vec<(i32,)> = decode(result, "decode channel buckets")?;
        let mut buckets: Vec<i32> = rows.into_iter().map(|(bucket,)| bucket).collect();
        buckets.sort_unstable();
        if buckets.first() == Some(&LEGACY_LISTED) {
            buckets.remove(0);
            return Ok(Some(buckets));
        }
        // Gateways of the earlier version may still write unlisted rows
        // until `listed_from` begins: a list made before then could miss one.
        if current_bucket() < self.listed_from {
            return Ok(None);
        }
        let found: Vec<Option<i32>> = stream::iter(oldest_bucket()..self.listed_from)
            .map(|bucket| async move {
                let result = self.run(&self.prepared.bucket_has_data, (channel, bucket), "probe history").await?;
                let rows: Vec<(i64,)> = decode(result, "decode history")?;
                Ok::<_, StoreError>((!rows.is_empty()).then_some(bucket))
            })
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        let found: Vec<i32> = found.into_iter().flatten().collect();
        let rows = found.iter().map(|bucket| (&self.prepared.insert_channel_bucket, Row::Bucket((channel, *bucket))));
        self.write_concurrently("list channel buckets", rows.collect()).await?;
        // The marker last: it promises the rows above.
        self.run(&self.prepared.insert_channel_bucket, (channel, LEGACY_LISTED), "list channel buckets").await?;
        tracing::debug!(channel, buckets = found.len(), "listed the buckets of a channel written before bucket lists");
        Ok(Some(found))
    }

    /// What `(sender, key)` is reserved for, reserving it for `id` in
    /// `channel` if nobody did (a lightweight transaction: see the module docs).
    async fn reserve(&self, sender: &str, key: &str, id: i64, channel: &str) -> StoreResult<Reservation> {
        let result = self.run(&self.prepared.reserve_send, (sender, key, id, channel), "reserve send key").await?;
        let outcome = Conditional::of(result, "decode send key")?;
        if outcome.applied {
            return Ok(Reservation::Reserved);
        }
        let missing = || StoreError::Corrupt(format!("send key of {sender} without message id or channel"));
        let reserved_id = outcome.get("message_id").and_then(CqlValue::as_bigint).ok_or_else(missing)?;
        // Our own insert, applied by an earlier try of the driver.
        if reserved_id == id {
            return Ok(Reservation::Reserved);
        }
        let reserved_channel = outcome.get("channel_id").and_then(CqlValue::as_text).ok_or_else(missing)?;
        Ok(Reservation::Existing { id: from_cql(reserved_id), channel: reserved_channel.clone() })
    }
}

fn message_of(channel: &str, (id, sender, sender_device, text, created_at_ms): MessageRow) -> Message {
    Message { id: from_cql(id), channel: channel.to_owned(), sender, sender_device, text, created_at_ms }
}

/// Creates the keyspace and tables unless they exist; answers whether the
/// `messages` table existed before. Concurrent runs from
/// several gateways are fine on ScyllaDB (Raft schema); on Cassandra < 5.1
/// truly simultaneous `CREATE TABLE` on different coordinators can race, so
/// the first start of a fresh cluster is best done by one gateway.
async fn create_schema(session: &Session, config: &ScyllaConfig) -> StoreResult<bool> {
    let ks = &config.keyspace;
    let result = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ? AND table_name = 'messages'",
            (ks.as_str(),),
        )
        .await
        .map_err(unavailable("read schema"))?;
    let existed = !decode::<(String,)>(result, "decode schema")?.is_empty();
    let rf = config.replication_factor.max(1);
    let replication = match &config.local_datacenter {
        Some(dc) => format!("{{'class': 'NetworkTopologyStrategy', {}: {rf}}}", cql_string(dc)),
        None => format!("{{'class': 'SimpleStrategy', 'replication_factor': {rf}}}"),
    };
    // Explicit `default_time_to_live = 0`: chat history is kept forever.
    let ddl = [
        format!("CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {replication}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.messages (channel_id text, bucket int, id bigint, sender text, \
             sender_device text, body text, created_at_ms bigint, PRIMARY KEY ((channel_id, bucket), id)) \
             WITH CLUSTERING ORDER BY (id DESC) AND default_time_to_live = 0"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.channel_buckets (channel_id text, bucket int, \
             PRIMARY KEY ((channel_id), bucket)) WITH CLUSTERING ORDER BY (bucket DESC) AND default_time_to_live = 0"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.inbox (user_id text, bucket int, position bigint, channel_id text, \
             message_id bigint, sender text, sender_device text, body text, created_at_ms bigint, \
             PRIMARY KEY ((user_id, bucket), position)) \
             WITH CLUSTERING ORDER BY (position DESC) AND default_time_to_live = 0"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.sends (sender text, idem_key text, message_id bigint, channel_id text, \
             PRIMARY KEY ((sender, idem_key))) WITH default_time_to_live = 0"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.groups (group_id text PRIMARY KEY, name text, owner text, \
             created_at_ms bigint) WITH default_time_to_live = 0"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.members (group_id text, user_id text, PRIMARY KEY ((group_id), user_id)) \
             WITH default_time_to_live = 0"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.user_channels (user_id text, channel_id text, \
             PRIMARY KEY ((user_id), channel_id)) WITH default_time_to_live = 0"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.store_meta (name text PRIMARY KEY, value bigint) WITH default_time_to_live = 0"
        ),
    ];
    // Schema changes are slow (every node applies them), hence a longer timeout.
    let ddl_timeout = config.request_timeout.max(Duration::from_secs(60));
    for text in ddl {
        let mut statement = Statement::new(text);
        statement.set_request_timeout(Some(ddl_timeout));
        session.query_unpaged(statement, ()).await.map_err(unavailable("create schema"))?;
    }
    // The driver already waits after each DDL statement; waiting once more
    // makes "all nodes know every table" explicit before statements are prepared.
    session.await_schema_agreement().await.map_err(unavailable("schema agreement"))?;
    Ok(existed)
}

/// The first bucket every writer lists (see the module docs), agreed on by
/// the first gateway of this version to get there.
async fn buckets_listed_from(session: &Session, config: &ScyllaConfig, messages_existed: bool) -> StoreResult<i32> {
    // An existing table may hold unlisted rows, and may get more until the
    // earlier version's gateways are gone: listing starts in the bucket after next.
    let proposal = if messages_existed { newest_bucket().saturating_add(2) } else { oldest_bucket() };
    let mut statement =
        Statement::new(format!("INSERT INTO {}.store_meta (name, value) VALUES (?, ?) IF NOT EXISTS", config.keyspace));
    statement.set_consistency(config.consistency);
    statement.set_serial_consistency(Some(serial_consistency(config)));
    statement.set_request_timeout(Some(config.request_timeout));
    let result = session
        .query_unpaged(statement, (META_LISTED_FROM, i64::from(proposal)))
        .await
        .map_err(unavailable("record bucket lists"))?;
    let outcome = Conditional::of(result, "decode store_meta")?;
    let listed_from = if outcome.applied {
        proposal
    } else {
        let value = outcome
            .get("value")
            .and_then(CqlValue::as_bigint)
            .ok_or_else(|| StoreError::Corrupt(format!("store_meta {META_LISTED_FROM} without a value")))?;
        i32::try_from(value).map_err(corrupt("store_meta buckets_listed_from"))?
    };
    if listed_from > oldest_bucket() {
        tracing::info!(
            keyspace = %config.keyspace,
            listed_from,
            "history written before bucket lists: its buckets are listed per channel on first read"
        );
    }
    Ok(listed_from)
}

async fn prepare_all(session: &Session, config: &ScyllaConfig) -> StoreResult<Prepared> {
    let ks = &config.keyspace;
    let page_size = i32::try_from(config.page_size.max(1)).unwrap_or(i32::MAX);
    let prepare = |text: String| async move {
        let mut statement = session.prepare(text).await.map_err(unavailable("prepare statement"))?;
        statement.set_consistency(config.consistency);
        // Upserts and deletes of fixed values, and a reservation whose retry
        // recognises its own row by id: all safe for the driver to retry.
        statement.set_is_idempotent(true);
        statement.set_page_size(page_size);
        Ok::<_, StoreError>(statement)
    };
    let message_columns = "id, sender, sender_device, body, created_at_ms";
    Ok(Prepared {
        insert_message: prepare(format!(
            "INSERT INTO {ks}.messages (channel_id, bucket, id, sender, sender_device, body, created_at_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?)"
        ))
        .await?,
        // A reference only: the copy columns stay null in new rows.
        insert_inbox: prepare(format!(
            "INSERT INTO {ks}.inbox (user_id, bucket, position, channel_id, message_id) VALUES (?, ?, ?, ?, ?)"
        ))
        .await?,
        history_before: prepare(format!(
            "SELECT {message_columns} FROM {ks}.messages WHERE channel_id = ? AND bucket = ? AND id < ? \
             ORDER BY id DESC LIMIT ?"
        ))
        .await?,
        history_after: prepare(format!(
            "SELECT {message_columns} FROM {ks}.messages WHERE channel_id = ? AND bucket = ? AND id > ? \
             ORDER BY id ASC LIMIT ?"
        ))
        .await?,
        message: prepare(format!(
            "SELECT {message_columns} FROM {ks}.messages WHERE channel_id = ? AND bucket = ? AND id = ?"
        ))
        .await?,
        bucket_has_data: prepare(format!("SELECT id FROM {ks}.messages WHERE channel_id = ? AND bucket = ? LIMIT 1"))
            .await?,
        insert_channel_bucket: prepare(format!("INSERT INTO {ks}.channel_buckets (channel_id, bucket) VALUES (?, ?)"))
            .await?,
        buckets_down: prepare(format!(
            "SELECT bucket FROM {ks}.channel_buckets WHERE channel_id = ? AND bucket <= ? AND bucket >= ? \
             ORDER BY bucket DESC"
        ))
        .await?,
        buckets_up: prepare(format!(
            "SELECT bucket FROM {ks}.channel_buckets WHERE channel_id = ? AND bucket >= ? AND bucket <= ? \
             ORDER BY bucket ASC"
        ))
        .await?,
        // Bounded: at most one row per bucket before `listed_from`, and the marker.
        legacy_buckets: prepare(format!("SELECT bucket FROM {ks}.channel_buckets WHERE channel_id = ? AND bucket < ?"))
            .await?,
        inbox_after: prepare(format!(
            "SELECT position, channel_id, message_id, sender, sender_device, body, created_at_ms FROM {ks}.inbox \
             WHERE user_id = ? AND bucket = ? AND position > ? ORDER BY position ASC LIMIT ?"
        ))
        .await?,
        reserve_send: {
            let mut statement = prepare(format!(
                "INSERT INTO {ks}.sends (sender, idem_key, message_id, channel_id) VALUES (?, ?, ?, ?) IF NOT EXISTS"
            ))
            .await?;
            statement.set_serial_consistency(Some(serial_consistency(config)));
            statement
        },
        insert_group: prepare(format!(
            "INSERT INTO {ks}.groups (group_id, name, owner, created_at_ms) VALUES (?, ?, ?, ?)"
        ))
        .await?,
        select_group: prepare(format!("SELECT name, owner, created_at_ms FROM {ks}.groups WHERE group_id = ?")).await?,
        insert_member: prepare(format!("INSERT INTO {ks}.members (group_id, user_id) VALUES (?, ?)")).await?,
        delete_member: prepare(format!("DELETE FROM {ks}.members WHERE group_id = ? AND user_id = ?")).await?,
        select_members: prepare(format!("SELECT user_id FROM {ks}.members WHERE group_id = ?")).await?,
        insert_user_channel: prepare(format!("INSERT INTO {ks}.user_channels (user_id, channel_id) VALUES (?, ?)"))
            .await?,
        delete_user_channel: prepare(format!("DELETE FROM {ks}.user_channels WHERE user_id = ? AND channel_id = ?"))
            .await?,
        select_user_channels: prepare(format!("SELECT channel_id FROM {ks}.user_channels WHERE user_id = ?")).await?,
    })
}

/// What reserving the idempotency key of a send found.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Reservation {
    /// This attempt reserved the key for its candidate id.
    Reserved,
    /// The key was reserved before, for this message id in this channel.
    Existing { id: u64, channel: String },
}

/// One inbox row with its message looked up (`None`: not in history).
struct Resolved {
    position: u64,
    channel: String,
    id: u64,
    message: Option<Message>,
}

impl ScyllaStore {
    /// Looks up the message of one inbox row.
    async fn resolve(&self, row: InboxRow) -> StoreResult<Resolved> {
        let (position, channel, id, sender, sender_device, body, created_at_ms) = row;
        let (position, id) = (from_cql(position), from_cql(id));
        // Rows written by earlier versions carry a copy of the message.
        if let (Some(text), Some(sender), Some(sender_device), Some(created_at_ms)) =
            (body, sender, sender_device, created_at_ms)
        {
            let message = Message { id, channel: channel.clone(), sender, sender_device, text, created_at_ms };
            return Ok(Resolved { position, channel, id, message: Some(message) });
        }
        let message = self.message(&channel, id).await?;
        Ok(Resolved { position, channel, id, message })
    }
}

#[async_trait]
impl Store for ScyllaStore {
    /// Asks the current session; when it cannot answer, opens a new one (a
    /// session that connects means the store is back).
    async fn ping(&self) -> StoreResult<()> {
        let asked = self.session().query_unpaged("SELECT release_version FROM system.local", ()).await;
        match asked {
            Ok(_) => Ok(()),
            Err(_) => self.reconnect().await,
        }
    }

    async fn store_message(&self, new: NewMessage) -> StoreResult<Stored> {
        let NewMessage { mut message, key, recipients, position, link_channel } = new;
        let _in_flight = self.in_flight.acquire(&message.sender, &key).await;
        let candidate = to_cql(message.id);
        match self.reserve(&message.sender, &key, candidate, &message.channel).await? {
            Reservation::Reserved => {}
            Reservation::Existing { id, channel } => {
                // History is written last, so a stored history row means every other row is stored.
                if let Some(stored) = self.message(&channel, id).await? {
                    return Ok(Stored { message: stored, position: 0, duplicate: true });
                }
                // An earlier attempt failed (or is still writing elsewhere): finish it under the same id.
                message.id = id;
                message.created_at_ms = ids::timestamp_ms(id);
            }
        }

        let id = to_cql(message.id);
        let channel = message.channel.as_str();
        let history_bucket = bucket_of(message.id);
        let (bucket, at) = (bucket_of(position), to_cql(position));
        let list_bucket = !self.listed.contains(channel, history_bucket);
        let mut rows = Vec::with_capacity(1 + recipients.len() * if link_channel { 2 } else { 1 });
        if list_bucket {
            rows.push((&self.prepared.insert_channel_bucket, Row::Bucket((channel, history_bucket))));
        }
        for user in recipients.iter() {
            rows.push((&self.prepared.insert_inbox, Row::Inbox((user.as_str(), bucket, at, channel, id))));
            if link_channel {
                rows.push((&self.prepared.insert_user_channel, Row::Pair((user.as_str(), channel))));
            }
        }
        self.write_concurrently("write message", rows).await?;
        if list_bucket {
            self.listed.insert(channel, history_bucket);
        }

        // Last, and only once everything above is acknowledged: see the module docs.
        let history = Row::Message((
            channel,
            history_bucket,
            id,
            message.sender.as_str(),
            message.sender_device.as_str(),
            message.text.as_str(),
            message.created_at_ms,
        ));
        self.run(&self.prepared.insert_message, history, "write history").await?;
        Ok(Stored { message, position, duplicate: false })
    }

    async fn inbox_after(&self, user: &str, after: u64, limit: usize) -> StoreResult<Vec<InboxEntry>> {
        let mut out = Vec::new();
        // The last position looked at: reads go on after it, in its bucket or later ones.
        let mut cursor = after;
        let first = bucket_of(after);
        let last = newest_bucket().max(first);
        let mut bucket = first;
        while out.len() < limit {
            let want = limit - out.len();
            let values = (user, bucket, to_cql(cursor), cql_limit(want));
            let result = self.run(&self.prepared.inbox_after, values, "read inbox").await?;
            let rows: Vec<InboxRow> = decode(result, "decode inbox")?;
            // Fewer rows than asked for: the bucket has nothing more after `cursor`.
            let bucket_done = rows.len() < want;
            let resolved: Vec<Resolved> =
                stream::iter(rows).map(|row| self.resolve(row)).buffered(READ_CONCURRENCY).try_collect().await?;
            for entry in resolved {
                cursor = entry.position;
                let Some(message) = entry.message else {
                    // In flight or failed: skipped (see the module docs).
                    tracing::debug!(
                        user,
                        position = entry.position,
                        channel = %entry.channel,
                        id = entry.id,
                        "inbox entry whose message is not stored (yet); skipped"
                    );
                    continue;
                };
                out.push(InboxEntry { position: entry.position, message });
            }
            if bucket_done {
                if bucket >= last {
                    break;
                }
                bucket += 1;
            }
        }
        Ok(out)
    }

    async fn history(&self, channel: &str, page: Page, limit: usize) -> StoreResult<Vec<Message>> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let (oldest, listed_from) = (oldest_bucket(), self.listed_from);
        match page {
            Page::Latest | Page::Before(_) => {
                let (top, bound) = match page {
                    Page::Before(id) => (bucket_of(id), to_cql(id)),
                    _ => (i32::MAX, i64::MAX),
                };
                let history = &self.prepared.history_before;
                if top >= listed_from {
                    let list = (&self.prepared.buckets_down, (channel, top, listed_from));
                    self.read_listed(channel, list, history, bound, limit, &mut out).await?;
                }
                let below = top.min(listed_from.saturating_sub(1));
                if out.len() < limit && below >= oldest {
                    match self.legacy_buckets(channel).await? {
                        Some(listed) => {
                            let buckets = listed.into_iter().rev().filter(|bucket| *bucket <= below);
                            self.read_buckets(channel, history, buckets, bound, limit, &mut out).await?;
                        }
                        None => {
                            let buckets = (oldest..=below.min(newest_bucket())).rev();
                            self.read_buckets(channel, history, buckets, bound, limit, &mut out).await?;
                        }
                    }
                }
            }
            Page::After(id) => {
                let (first, bound) = (bucket_of(id), to_cql(id));
                let history = &self.prepared.history_after;
                if first < listed_from {
                    match self.legacy_buckets(channel).await? {
                        Some(listed) => {
                            let buckets = listed.into_iter().filter(|bucket| *bucket >= first);
                            self.read_buckets(channel, history, buckets, bound, limit, &mut out).await?;
                        }
                        None => {
                            let buckets = first..=(listed_from - 1).min(newest_bucket());
                            self.read_buckets(channel, history, buckets, bound, limit, &mut out).await?;
                        }
                    }
                }
                if out.len() < limit {
                    let list = (&self.prepared.buckets_up, (channel, first.max(listed_from), i32::MAX));
                    self.read_listed(channel, list, history, bound, limit, &mut out).await?;
                }
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    async fn message(&self, channel: &str, id: u64) -> StoreResult<Option<Message>> {
        let result = self.run(&self.prepared.message, (channel, bucket_of(id), to_cql(id)), "read message").await?;
        let rows: Vec<MessageRow> = decode(result, "decode message")?;
        Ok(rows.into_iter().next().map(|row| message_of(channel, row)))
    }

    async fn create_group(&self, group: &Group, members: &[String]) -> StoreResult<()> {
        let mut rows = Vec::with_capacity(2 * members.len() + 1);
        for user in members {
            rows.push((&self.prepared.insert_member, Row::Pair((group.id.as_str(), user.as_str()))));
            rows.push((&self.prepared.insert_user_channel, Row::Pair((user.as_str(), group.id.as_str()))));
        }
        // Group row last: once `group()` finds it, every member is stored.
        rows.push((
            &self.prepared.insert_group,
            Row::Group((group.id.as_str(), group.name.as_str(), group.owner.as_str(), group.created_at_ms)),
        ));
        self.write_batched("create group", rows).await
    }

    async fn group(&self, id: &str) -> StoreResult<Option<Group>> {
        let result = self.run(&self.prepared.select_group, (id,), "read group").await?;
        let rows: Vec<(String, String, i64)> = decode(result, "decode group")?;
        Ok(rows.into_iter().next().map(|(name, owner, created_at_ms)| Group {
            id: id.to_owned(),
            name,
            owner,
            created_at_ms,
        }))
    }

    async fn add_member(&self, group: &str, user: &str) -> StoreResult<()> {
        let rows = vec![
            (&self.prepared.insert_member, Row::Pair((group, user))),
            (&self.prepared.insert_user_channel, Row::Pair((user, group))),
        ];
        self.write_batched("add member", rows).await
    }

    async fn remove_member(&self, group: &str, user: &str) -> StoreResult<()> {
        let rows = vec![
            (&self.prepared.delete_member, Row::Pair((group, user))),
            (&self.prepared.delete_user_channel, Row::Pair((user, group))),
        ];
        self.write_batched("remove member", rows).await
    }

    async fn members(&self, group: &str) -> StoreResult<Vec<String>> {
        let rows: Vec<(String,)> = self.read_pages(&self.prepared.select_members, (group,), "read members").await?;
        // Clustering order is byte order already; sorting keeps the contract
        // independent of the server's collation.
        let mut members: Vec<String> = rows.into_iter().map(|(user,)| user).collect();
        members.sort();
        Ok(members)
    }

    async fn channels_of(&self, user: &str) -> StoreResult<Vec<String>> {
        let rows: Vec<(String,)> =
            self.read_pages(&self.prepared.select_user_channels, (user,), "read channels").await?;
        let mut channels: Vec<String> = rows.into_iter().map(|(channel,)| channel).collect();
        channels.sort();
        Ok(channels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_bigint() {
        for id in [0, 1, (1 << 63) - 1, 1 << 63, u64::MAX] {
            assert_eq!(from_cql(to_cql(id)), id);
        }
        assert!(to_cql((1 << 63) - 1) > to_cql(1));
    }

    #[test]
    fn keyspace_names_are_checked() {
        assert!(valid_keyspace("kubechat"));
        assert!(valid_keyspace("t_1"));
        assert!(!valid_keyspace(""));
        assert!(!valid_keyspace("1abc"));
        assert!(!valid_keyspace("Kube"));
        assert!(!valid_keyspace("a; DROP"));
        assert!(!valid_keyspace(&"a".repeat(49)));
    }

    /// Scans "up to now" reach the bucket of an id minted by a clock up to
    /// [`CLOCK_SKEW_MS`] ahead, also a minute before a month boundary (when
    /// that id is in the next month), and no further than that.
    #[test]
    fn newest_bucket_covers_a_fast_clock_at_a_month_boundary() {
        let next = current_bucket() + 1;
        let boundary_ms = i64::from(next) * crate::store::BUCKET_MS;
        assert_eq!(bucket_of(ids::first_id_at(boundary_ms)), next);
        assert_eq!(bucket_of(ids::first_id_at(boundary_ms - 1)), next - 1);

        // A clock four minutes fast (NTP gone wrong, within the allowance).
        let minute_before = boundary_ms - 60_000;
        let fast_id = ids::first_id_at(minute_before + 4 * 60_000);
        assert_eq!(bucket_of(fast_id), next, "a fast clock is already in the next month");
        assert_eq!(newest_bucket_at(minute_before), next, "and the scans reach it");

        let mid_month = boundary_ms - crate::store::BUCKET_MS / 2;
        assert_eq!(newest_bucket_at(mid_month), next - 1, "no further than a fast clock can be");
        assert!(oldest_bucket() <= newest_bucket_at(mid_month));
    }

    #[test]
    fn listed_buckets_remember_the_newest_per_channel_within_a_bound() {
        let listed = ListedBuckets::default();
        assert!(!listed.contains("g:1", 700));
        listed.insert("g:1", 700);
        assert!(listed.contains("g:1", 700));
        assert!(!listed.contains("g:1", 701), "another month is listed anew");
        assert!(!listed.contains("g:2", 700), "another channel is listed anew");
        listed.insert("g:1", 701);
        assert!(listed.contains("g:1", 701) && !listed.contains("g:1", 700));

        for n in 1..LISTED_BUCKETS_CAP {
            listed.insert(&format!("g:n{n}"), 700);
        }
        assert!(listed.contains("g:1", 701), "full, but nothing new yet");
        listed.insert("g:1", 702);
        assert!(listed.contains("g:n1", 700), "a known channel does not clear it");
        listed.insert("g:one-too-many", 700);
        assert!(!listed.contains("g:n1", 700), "a new channel past the bound starts over");
        assert!(listed.contains("g:one-too-many", 700));
    }

    #[tokio::test]
    async fn in_flight_serialises_one_key_only() {
        let in_flight = InFlight::default();
        let first = in_flight.acquire("alice", "k1").await;
        // Another key, or the same key of another sender, does not wait.
        let other_key = tokio::time::timeout(Duration::from_secs(5), in_flight.acquire("alice", "k2"))
            .await
            .expect("another key does not wait");
        let other_sender = tokio::time::timeout(Duration::from_secs(5), in_flight.acquire("bob", "k1"))
            .await
            .expect("another sender does not wait");
        assert_eq!(in_flight.len(), 3);

        // The same key waits until the first holder is done.
        let mut second = Box::pin(in_flight.acquire("alice", "k1"));
        assert!(futures::poll!(second.as_mut()).is_pending(), "a second attempt of the key must wait");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), second).await.expect("runs once the first is done");

        // A waiter that gives up (a deadline) unregisters; the map empties.
        let waiting = tokio::time::timeout(Duration::from_millis(10), in_flight.acquire("alice", "k1")).await;
        assert!(waiting.is_err(), "still held by the second attempt");
        drop((second, other_key, other_sender));
        assert_eq!(in_flight.len(), 0, "no entry outlives its sends");
    }
}
