//! [`Store`] on ScyllaDB, or any CQL database (Cassandra 5 stands in for it
//! in local runs), for clustered gateways.
//!
//! Schema (`schema.rs`; all created with `IF NOT EXISTS`, no TTL anywhere:
//! history is kept forever):
//!
//! ```text
//! messages        ((channel_id, bucket), id DESC)   sender, sender_device, body, created_at_ms, send_key
//! channel_buckets ((channel_id), bucket DESC)       (the buckets of `messages` holding the channel)
//! inbox           ((user_id, bucket), position DESC) channel_id, message_id, send_key (the sender's own entry)
//!                                                    (+ sender, sender_device, body, created_at_ms: older rows only)
//! groups          ((group_id))                       name, owner, created_at_ms
//! members         ((group_id), user_id)
//! user_channels   ((user_id), channel_id)
//! sends           ((sender, idem_key))               message_id, channel_id (earlier versions' keys, read only)
//! store_meta      ((name))                           value
//! markers         ((user_id), channel_id)            delivered_up_to, read_up_to
//! ```
//!
//! `bucket` is [`bucket_of`] the id (history) or the position (inbox), so a
//! partition holds one month of one channel or one user and stays bounded.
//! Ids and positions are `u64` stored as CQL `bigint` ([`to_cql`]).
//!
//! - `send.rs`: the send path, its idempotency without a lightweight
//!   transaction, and how rows travel (batches by replica set).
//! - `reads.rs`: inbox and history pages, lists, and dropping repeats.
//! - `schema.rs`: tables, migrations, prepared statements, consistency.
//! - `cql.rs`: ids, write timestamps and rows on the wire.
//!
//! Markers move forward without reading first: each is written with the
//! write timestamp of the message it names ([`write_timestamp`]), so the
//! cell of a newer message wins; two messages of one millisecond share a
//! timestamp, and then the larger value (the newer id) wins, as CQL breaks
//! ties between live cells by value.
//!
//! Consistency: every statement runs at QUORUM (LOCAL_QUORUM when a local
//! datacenter is set, so no request waits for another datacenter), with a
//! client-side timeout. Writes and reads at QUORUM overlap, which gives the
//! trait's "reads see completed writes"; a write returns `Ok` only once the
//! coordinator acknowledged it at that level. Every statement of the send
//! and read paths is idempotent (no counters, no lightweight transactions,
//! fixed write timestamps), so the driver may retry any of them; the only
//! lightweight transactions left are two agreements at start
//! (`store_meta`). The driver's default load balancing is token- and
//! shard-aware for prepared statements and prefers the local datacenter
//! when one is set.

mod cql;
mod reads;
mod schema;
mod send;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::Consistency;
use scylla::statement::batch::{Batch, BatchType};

use super::send_keys::{Reservation, SendKeys, SendRecord};
use super::{Group, InboxEntry, Join, Markers, Message, NewMessage, Page, Store, StoreError, StoreResult, Stored};
pub use cql::{from_cql, to_cql, write_timestamp};
pub use reads::{LEGACY_LISTED, READ_CONCURRENCY, drop_repeats};
pub use send::{Plan, REUSE_POSITION_WITHIN_MS, SendRows, Write, group_writes, plan};

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
    /// Level of every read and write: QUORUM (default) for reads to see
    /// completed writes, turned into LOCAL_QUORUM when `local_datacenter`
    /// is set.
    pub consistency: Consistency,
    pub username: Option<String>,
    pub password: Option<String>,
    /// When set: the keyspace uses `NetworkTopologyStrategy` with
    /// `replication_factor` replicas in this datacenter, the driver prefers
    /// its nodes, and requests run at LOCAL_QUORUM.
    pub local_datacenter: Option<String>,
    /// Client-side limit of one request (and of establishing a connection).
    pub request_timeout: Duration,
    /// Upper bound of the estimated payload of one batch (a send's rows
    /// on one replica set, membership changes): the server rejects larger
    /// multi-partition batches (`batch_size_fail_threshold`: 50 KiB on
    /// Cassandra, 1 MiB on ScyllaDB by default).
    pub max_batch_bytes: usize,
    /// Rows per response when reading a list (a user's channels, a group's
    /// members, a channel's buckets): bounds each response, however long
    /// the list.
    pub page_size: usize,
    /// How long a client may retry a send with the same key: the idempotency
    /// reservations' lifetime, and how far back a retry looks in the store
    /// when they may have been lost.
    pub retry_window: Duration,
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
            request_timeout: Duration::from_secs(5),
            max_batch_bytes: 40 * 1024,
            page_size: 1000,
            retry_window: Duration::from_secs(3600),
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
            .field("retry_window", &self.retry_window)
            .finish()
    }
}

/// Reservations kept nowhere: every send looks for an earlier attempt in
/// the store (two round trips). Right for a single gateway on a CQL store;
/// a cluster reserves keys in Redis ([`ScyllaStore::with_send_keys`]).
pub struct LookupInStore;

#[async_trait]
impl SendKeys for LookupInStore {
    async fn reserve(&self, _sender: &str, _key: &str, _candidate: &SendRecord) -> Reservation {
        Reservation::Unknown
    }

    async fn complete(&self, _sender: &str, _key: &str, _record: &SendRecord) {}
}

/// The CQL implementation of [`Store`]. Cheap to share behind an `Arc`: the
/// driver session multiplexes requests over its connection pool.
pub struct ScyllaStore {
    /// Replaced by a new session when the old one does not recover by
    /// itself fast enough (see [`Store::ping`]).
    session: std::sync::RwLock<Arc<Session>>,
    /// To open a new session.
    config: ScyllaConfig,
    prepared: schema::Prepared,
    consistency: Consistency,
    /// Buckets from this one on are listed for every channel (`reads.rs`).
    listed_from: i32,
    /// Until when (ms) retries of sends stored by earlier versions may come.
    legacy_keys_until: i64,
    keys: Arc<dyn SendKeys>,
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

impl ScyllaStore {
    /// Connects, creates the keyspace and tables if missing (idempotent, so
    /// every gateway does it at start) and prepares all statements. Sends
    /// look for earlier attempts in the store until
    /// [`with_send_keys`](Self::with_send_keys) gives them reservations.
    pub async fn connect(config: ScyllaConfig) -> StoreResult<Self> {
        if !cql::valid_keyspace(&config.keyspace) {
            return Err(StoreError::Unavailable(format!(
                "invalid keyspace name {:?}: lower-case letters, digits and _, starting with a letter, at most 48",
                config.keyspace
            )));
        }
        if config.contact_points.is_empty() {
            return Err(StoreError::Unavailable("no CQL contact points configured".to_owned()));
        }
        let session = open_session(&config).await?;
        let existed = schema::create_schema(&session, &config).await?;
        let listed_from = schema::buckets_listed_from(&session, &config, existed).await?;
        let legacy_keys_until = schema::legacy_keys_until(&session, &config, existed).await?;
        let prepared = schema::prepare_all(&session, &config).await?;
        Ok(Self {
            session: std::sync::RwLock::new(Arc::new(session)),
            prepared,
            consistency: schema::consistency(&config),
            listed_from,
            legacy_keys_until,
            keys: Arc::new(LookupInStore),
            listed: ListedBuckets::default(),
            requests: AtomicU64::new(0),
            config,
        })
    }

    /// Reserves idempotency keys with `keys` (Redis in a cluster).
    #[must_use]
    pub fn with_send_keys(mut self, keys: Arc<dyn SendKeys>) -> Self {
        self.keys = keys;
        self
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

    /// CQL requests sent since connecting (each page of a paged read and
    /// each batch counts one; setting up the schema does not): what a read
    /// costs, observable without timing it.
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs membership rows as LOGGED batches (each all-or-nothing once
    /// accepted: a member is in both directions or in neither), in order,
    /// split below `max_batch_bytes`. Everything written this way is
    /// idempotent, so a caller retrying after a failure in a later batch
    /// just rewrites the earlier ones.
    async fn write_memberships(&self, what: &'static str, rows: Vec<Membership<'_>>) -> StoreResult<()> {
        let mut start = 0;
        while start < rows.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < rows.len()
                && (end == start || bytes + rows[end].estimated_bytes() <= self.config.max_batch_bytes)
            {
                bytes += rows[end].estimated_bytes();
                end += 1;
            }
            let mut batch = Batch::new(BatchType::Logged);
            batch.set_consistency(self.consistency);
            batch.set_request_timeout(Some(self.config.request_timeout));
            // Upserts and deletes of fixed values: safe for the driver to retry.
            batch.set_is_idempotent(true);
            let p = &self.prepared;
            let mut values = Vec::with_capacity(end - start);
            for row in &rows[start..end] {
                let (statement, value) = match *row {
                    Membership::Member(group, user) => (&p.insert_member, MembershipValues::Pair((group, user))),
                    Membership::Channel(user, group) => (&p.insert_user_channel, MembershipValues::Pair((user, group))),
                    Membership::NoMember(group, user) => (&p.delete_member, MembershipValues::Pair((group, user))),
                    Membership::NoChannel(user, group) => {
                        (&p.delete_user_channel, MembershipValues::Pair((user, group)))
                    }
                    Membership::Group(g) => {
                        (&p.insert_group, MembershipValues::Group((&g.id, &g.name, &g.owner, g.created_at_ms)))
                    }
                };
                batch.append_statement(statement.clone());
                values.push(value);
            }
            self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.session().batch(&batch, &values).await.map_err(cql::unavailable(what))?;
            start = end;
        }
        Ok(())
    }
}

/// One row of a membership change.
enum Membership<'a> {
    Member(&'a str, &'a str),
    Channel(&'a str, &'a str),
    NoMember(&'a str, &'a str),
    NoChannel(&'a str, &'a str),
    Group(&'a Group),
}

impl Membership<'_> {
    /// See [`send::Write::estimated_bytes`].
    fn estimated_bytes(&self) -> usize {
        const CELL: usize = 32;
        match self {
            Self::Member(a, b) | Self::Channel(a, b) | Self::NoMember(a, b) | Self::NoChannel(a, b) => {
                a.len() + b.len() + 2 * CELL
            }
            Self::Group(g) => g.id.len() + g.name.len() + g.owner.len() + 4 * CELL,
        }
    }
}

enum MembershipValues<'a> {
    Pair((&'a str, &'a str)),
    Group((&'a str, &'a str, &'a str, i64)),
}

impl scylla::serialize::row::SerializeRow for MembershipValues<'_> {
    fn serialize(
        &self,
        ctx: &scylla::serialize::row::RowSerializationContext<'_>,
        writer: &mut scylla::serialize::writers::RowWriter,
    ) -> Result<(), scylla::serialize::SerializationError> {
        match self {
            Self::Pair(v) => v.serialize(ctx, writer),
            Self::Group(v) => v.serialize(ctx, writer),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// A driver session to the configured nodes (no schema work).
async fn open_session(config: &ScyllaConfig) -> StoreResult<Session> {
    let profile = ExecutionProfile::builder()
        .consistency(schema::consistency(config))
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
        self.write_send(new).await
    }

    async fn inbox_after(&self, user: &str, after: u64, limit: usize) -> StoreResult<Vec<InboxEntry>> {
        self.read_inbox(user, after, limit).await
    }

    async fn history(&self, channel: &str, page: Page, limit: usize) -> StoreResult<Vec<Message>> {
        self.read_history(channel, page, limit).await
    }

    async fn message(&self, channel: &str, id: u64) -> StoreResult<Option<Message>> {
        Ok(self.keyed_message(channel, id).await?.map(|keyed| keyed.message))
    }

    async fn create_group(&self, group: &Group, members: &[String]) -> StoreResult<()> {
        let mut rows = Vec::with_capacity(2 * members.len() + 1);
        for user in members {
            rows.push(Membership::Member(&group.id, user));
            rows.push(Membership::Channel(user, &group.id));
        }
        // Group row last: once `group()` finds it, every member is stored.
        rows.push(Membership::Group(group));
        self.write_memberships("create group", rows).await
    }

    async fn group(&self, id: &str) -> StoreResult<Option<Group>> {
        let result = self.run(&self.prepared.select_group, (id,), "read group").await?;
        let rows: Vec<(String, String, i64)> = cql::decode(result, "decode group")?;
        Ok(rows.into_iter().next().map(|(name, owner, created_at_ms)| Group {
            id: id.to_owned(),
            name,
            owner,
            created_at_ms,
        }))
    }

    async fn add_member(&self, group: &str, user: &str) -> StoreResult<()> {
        self.write_memberships("add member", vec![Membership::Member(group, user), Membership::Channel(user, group)])
            .await
    }

    /// Optimistic, for gateways that share nothing but the store: add, then
    /// count; over the limit, take the add back. Two adds racing for the
    /// last place both see the other and both step back: never over the
    /// limit, at worst both refused.
    async fn join(&self, group: &str, user: &str, max: usize) -> StoreResult<Join> {
        let before = self.members(group).await?;
        if before.iter().any(|m| m == user) {
            return Ok(Join::AlreadyMember);
        }
        if before.len() >= max {
            return Ok(Join::Full { members: before.len() });
        }
        self.add_member(group, user).await?;
        let after = self.members(group).await?;
        if after.len() > max {
            self.remove_member(group, user).await?;
            return Ok(Join::Full { members: after.len() - 1 });
        }
        Ok(Join::Added)
    }

    async fn remove_member(&self, group: &str, user: &str) -> StoreResult<()> {
        let rows = vec![Membership::NoMember(group, user), Membership::NoChannel(user, group)];
        self.write_memberships("remove member", rows).await
    }

    async fn set_owner(&self, group: &str, owner: &str) -> StoreResult<()> {
        self.run(&self.prepared.set_owner, (owner, group), "hand ownership on").await.map(drop)
    }

    async fn members(&self, group: &str) -> StoreResult<Vec<String>> {
        let rows: Vec<(String,)> = self.read_pages(&self.prepared.select_members, (group,), "read members").await?;
        // Clustering order is byte order already; sorting keeps the contract
        // independent of the server's collation.
        let mut members: Vec<String> = rows.into_iter().map(|(user,)| user).collect();
        members.sort();
        Ok(members)
    }

    async fn members_of(&self, groups: &[String]) -> StoreResult<HashMap<String, Vec<String>>> {
        self.read_members_of(groups).await
    }

    async fn channels_of(&self, user: &str) -> StoreResult<Vec<String>> {
        let rows: Vec<(String,)> =
            self.read_pages(&self.prepared.select_user_channels, (user,), "read channels").await?;
        let mut channels: Vec<String> = rows.into_iter().map(|(channel,)| channel).collect();
        channels.sort();
        Ok(channels)
    }

    async fn advance_markers(&self, user: &str, channel: &str, markers: Markers) -> StoreResult<()> {
        let Markers { delivered_up_to, read_up_to } = Markers::default().merge(markers);
        let p = &self.prepared;
        let writes = [(&p.advance_delivered, delivered_up_to), (&p.advance_read, read_up_to)]
            .into_iter()
            .filter(|(_, id)| *id > 0)
            .map(|(statement, id)| {
                self.run(statement, (write_timestamp(id), to_cql(id), user, channel), "advance markers")
            });
        futures::future::try_join_all(writes).await.map(drop)
    }

    async fn markers_of(&self, user: &str) -> StoreResult<HashMap<String, Markers>> {
        let rows: Vec<(String, Option<i64>, Option<i64>)> =
            self.read_pages(&self.prepared.select_markers_of, (user,), "read markers").await?;
        Ok(rows.into_iter().map(|(channel, delivered, read)| (channel, markers_from(delivered, read))).collect())
    }

    async fn channel_markers(&self, channel: &str, users: &[String]) -> StoreResult<Vec<Markers>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, Option<i64>, Option<i64>)> = self
            .read_pages(&self.prepared.select_channel_markers, (users.to_vec(), channel), "read channel markers")
            .await?;
        let found: HashMap<String, Markers> =
            rows.into_iter().map(|(user, delivered, read)| (user, markers_from(delivered, read))).collect();
        Ok(users.iter().map(|user| found.get(user).copied().unwrap_or_default()).collect())
    }
}

/// A `markers` row's columns (either may be unset: only one was written).
fn markers_from(delivered: Option<i64>, read: Option<i64>) -> Markers {
    let id = |v: Option<i64>| v.map_or(0, from_cql);
    Markers { delivered_up_to: id(delivered), read_up_to: id(read) }.merge(Markers::default())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn passwords_never_reach_debug_output() {
        let config = ScyllaConfig { password: Some("hunter2".into()), ..ScyllaConfig::default() };
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2") && shown.contains("<redacted>"));
    }
}
