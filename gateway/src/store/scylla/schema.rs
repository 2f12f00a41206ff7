//! The keyspace: tables (created with `IF NOT EXISTS`, columns added to
//! keyspaces of earlier versions), the two facts gateways agree on once per
//! keyspace, and every statement prepared at connect time.

use std::time::Duration;

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency, Statement};
use scylla::value::CqlValue;

use super::ScyllaConfig;
use super::cql::{Conditional, MESSAGE_COLUMNS, corrupt, cql_string, decode, unavailable};
use crate::ids;
use crate::store::{StoreError, StoreResult, bucket_of};

/// How far ahead of this gateway's clock another gateway's ids may be: reads
/// that scan buckets "up to now" look this much further so that an id minted
/// by a slightly fast clock just after a month boundary is not skipped.
pub const CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// `store_meta` row: the first bucket every writer lists (see `reads.rs`).
const META_LISTED_FROM: &str = "buckets_listed_from";

/// `store_meta` row: from when every send's idempotency key is reserved
/// outside the store (see `send.rs`); before it, earlier versions kept keys
/// in `sends` with a lightweight transaction.
const META_KEYS_RESERVED_FROM: &str = "send_keys_reserved_from_ms";

/// How long a rolling upgrade from a version that reserved keys in the
/// store is assumed to take at most: retries of sends those gateways stored
/// are looked up in the store until this long (plus the retry window) after
/// the first gateway of this version started.
pub const UPGRADE_ALLOWANCE_MS: i64 = 24 * 3600 * 1000;

/// The newest bucket that may hold data now (see [`CLOCK_SKEW_MS`]).
pub fn newest_bucket() -> i32 {
    newest_bucket_at(ids::now_ms())
}

/// The newest bucket that may hold data at `now_ms`: that of an id minted
/// by a clock [`CLOCK_SKEW_MS`] ahead.
pub fn newest_bucket_at(now_ms: i64) -> i32 {
    bucket_of(ids::first_id_at(now_ms.saturating_add(CLOCK_SKEW_MS)))
}

/// The bucket of an id minted now by this gateway's clock.
pub fn current_bucket() -> i32 {
    bucket_of(ids::first_id_at(ids::now_ms()))
}

/// The oldest bucket that may hold data: nothing is older than the id epoch.
pub fn oldest_bucket() -> i32 {
    bucket_of(0)
}

/// The level of every read and write: QUORUM (or the configured level),
/// LOCAL_QUORUM instead of QUORUM when a local datacenter is set (so no
/// request waits for another datacenter).
pub fn consistency(config: &ScyllaConfig) -> Consistency {
    match (config.consistency, &config.local_datacenter) {
        (Consistency::Quorum, Some(_)) => Consistency::LocalQuorum,
        (level, _) => level,
    }
}

/// The serial consistency of the two agreements at start (the only
/// lightweight transactions left): linearizable across the cluster, or
/// within the local datacenter when the store prefers one.
pub fn serial_consistency(config: &ScyllaConfig) -> SerialConsistency {
    match config.local_datacenter {
        Some(_) => SerialConsistency::LocalSerial,
        None => SerialConsistency::Serial,
    }
}

/// Creates the keyspace and tables unless they exist, and adds the columns
/// this version needs to tables of earlier ones; answers whether the
/// `messages` table existed before. Concurrent runs from several gateways
/// are fine on ScyllaDB (Raft schema); on Cassandra < 5.1 truly simultaneous
/// `CREATE TABLE` on different coordinators can race, so the first start of
/// a fresh cluster is best done by one gateway.
pub async fn create_schema(session: &Session, config: &ScyllaConfig) -> StoreResult<bool> {
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
             sender_device text, body text, created_at_ms bigint, send_key text, \
             PRIMARY KEY ((channel_id, bucket), id)) \
             WITH CLUSTERING ORDER BY (id DESC) AND default_time_to_live = 0"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.channel_buckets (channel_id text, bucket int, \
             PRIMARY KEY ((channel_id), bucket)) WITH CLUSTERING ORDER BY (bucket DESC) AND default_time_to_live = 0"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.inbox (user_id text, bucket int, position bigint, channel_id text, \
             message_id bigint, sender text, sender_device text, body text, created_at_ms bigint, send_key text, \
             PRIMARY KEY ((user_id, bucket), position)) \
             WITH CLUSTERING ORDER BY (position DESC) AND default_time_to_live = 0"
        ),
        // Written by earlier versions only (their idempotency keys); read
        // while their retries may still arrive.
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
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.markers (user_id text, channel_id text, delivered_up_to bigint, \
             read_up_to bigint, PRIMARY KEY ((user_id), channel_id)) WITH default_time_to_live = 0"
        ),
    ];
    // Schema changes are slow (every node applies them), hence a longer timeout.
    let ddl_timeout = config.request_timeout.max(Duration::from_secs(60));
    for text in ddl {
        run_ddl(session, text, ddl_timeout).await?;
    }
    // Keyspaces of earlier versions: the idempotency key moved into the rows.
    for table in ["messages", "inbox"] {
        if !has_column(session, ks, table, "send_key").await? {
            run_ddl(session, format!("ALTER TABLE {ks}.{table} ADD send_key text"), ddl_timeout).await?;
        }
    }
    // The driver already waits after each DDL statement; waiting once more
    // makes "all nodes know every table" explicit before statements are prepared.
    session.await_schema_agreement().await.map_err(unavailable("schema agreement"))?;
    Ok(existed)
}

async fn run_ddl(session: &Session, text: String, timeout: Duration) -> StoreResult<()> {
    let mut statement = Statement::new(text);
    statement.set_request_timeout(Some(timeout));
    session.query_unpaged(statement, ()).await.map_err(unavailable("create schema"))?;
    Ok(())
}

async fn has_column(session: &Session, ks: &str, table: &str, column: &str) -> StoreResult<bool> {
    let result = session
        .query_unpaged(
            "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ? AND column_name = ?",
            (ks, table, column),
        )
        .await
        .map_err(unavailable("read schema"))?;
    Ok(!decode::<(String,)>(result, "decode schema")?.is_empty())
}

/// Records `proposal` under `name` in `store_meta` unless a value is there
/// (one lightweight transaction, at start only), and answers the value all
/// gateways agree on.
async fn agree(session: &Session, config: &ScyllaConfig, name: &'static str, proposal: i64) -> StoreResult<i64> {
    let mut statement =
        Statement::new(format!("INSERT INTO {}.store_meta (name, value) VALUES (?, ?) IF NOT EXISTS", config.keyspace));
    statement.set_consistency(consistency(config));
    statement.set_serial_consistency(Some(serial_consistency(config)));
    statement.set_request_timeout(Some(config.request_timeout));
    let result = session.query_unpaged(statement, (name, proposal)).await.map_err(unavailable("record store meta"))?;
    let outcome = Conditional::of(result, "decode store_meta")?;
    if outcome.applied {
        return Ok(proposal);
    }
    outcome
        .get("value")
        .and_then(CqlValue::as_bigint)
        .ok_or_else(|| StoreError::Corrupt(format!("store_meta {name} without a value")))
}

/// The first bucket every writer lists (see `reads.rs`), agreed on by the
/// first gateway of a version with bucket lists to get there.
pub async fn buckets_listed_from(session: &Session, config: &ScyllaConfig, messages_existed: bool) -> StoreResult<i32> {
    // An existing table may hold unlisted rows, and may get more until the
    // earlier version's gateways are gone: listing starts in the bucket after next.
    let proposal = if messages_existed { newest_bucket().saturating_add(2) } else { oldest_bucket() };
    let value = agree(session, config, META_LISTED_FROM, i64::from(proposal)).await?;
    let listed_from = i32::try_from(value).map_err(corrupt("store_meta buckets_listed_from"))?;
    if listed_from > oldest_bucket() {
        tracing::info!(
            keyspace = %config.keyspace,
            listed_from,
            "history written before bucket lists: its buckets are listed per channel on first read"
        );
    }
    Ok(listed_from)
}

/// Until when (ms) sends of earlier versions may still be retried: a new
/// keyspace has none (0); an existing one gets the first start of this
/// version plus [`UPGRADE_ALLOWANCE_MS`].
pub async fn legacy_keys_until(session: &Session, config: &ScyllaConfig, messages_existed: bool) -> StoreResult<i64> {
    let proposal = if messages_existed { ids::now_ms() } else { 0 };
    let from = agree(session, config, META_KEYS_RESERVED_FROM, proposal).await?;
    Ok(if from == 0 { 0 } else { from.saturating_add(UPGRADE_ALLOWANCE_MS) })
}

/// Every statement the store runs, prepared once at connect time so each
/// request only ships an id and the bound values (and the driver can route
/// it to a replica of its partition).
pub struct Prepared {
    pub insert_message: PreparedStatement,
    pub insert_inbox: PreparedStatement,
    pub insert_own_inbox: PreparedStatement,
    pub delete_inbox: PreparedStatement,
    pub insert_channel_bucket: PreparedStatement,
    pub insert_user_channel_at: PreparedStatement,
    pub history_before: PreparedStatement,
    pub history_after: PreparedStatement,
    pub message: PreparedStatement,
    pub messages_in: PreparedStatement,
    pub bucket_has_data: PreparedStatement,
    pub buckets_down: PreparedStatement,
    pub buckets_up: PreparedStatement,
    pub legacy_buckets: PreparedStatement,
    pub inbox_after: PreparedStatement,
    pub own_send: PreparedStatement,
    pub legacy_send: PreparedStatement,
    pub insert_group: PreparedStatement,
    pub select_group: PreparedStatement,
    pub set_owner: PreparedStatement,
    pub insert_member: PreparedStatement,
    pub delete_member: PreparedStatement,
    pub select_members: PreparedStatement,
    pub select_members_in: PreparedStatement,
    pub insert_user_channel: PreparedStatement,
    pub delete_user_channel: PreparedStatement,
    pub select_user_channels: PreparedStatement,
    pub advance_delivered: PreparedStatement,
    pub advance_read: PreparedStatement,
    pub select_markers_of: PreparedStatement,
    pub select_channel_markers: PreparedStatement,
}

pub async fn prepare_all(session: &Session, config: &ScyllaConfig) -> StoreResult<Prepared> {
    let ks = &config.keyspace;
    let level = consistency(config);
    let page_size = i32::try_from(config.page_size.max(1)).unwrap_or(i32::MAX);
    let prepare = |text: String| async move {
        let mut statement = session.prepare(text).await.map_err(unavailable("prepare statement"))?;
        statement.set_consistency(level);
        statement.set_request_timeout(Some(config.request_timeout));
        // No lightweight transaction and no counter is left on these paths:
        // every statement is a read, or an upsert or delete of values fixed
        // by the send (with its write timestamp), so a retry by the driver
        // (after a timeout, on another node) changes nothing.
        statement.set_is_idempotent(true);
        statement.set_page_size(page_size);
        Ok::<_, StoreError>(statement)
    };
    Ok(Prepared {
        insert_message: prepare(format!(
            "INSERT INTO {ks}.messages (channel_id, bucket, id, sender, sender_device, body, created_at_ms, send_key) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        ))
        .await?,
        // A reference only: the copy columns stay unset in new rows.
        insert_inbox: prepare(format!(
            "INSERT INTO {ks}.inbox (user_id, bucket, position, channel_id, message_id) VALUES (?, ?, ?, ?, ?) \
             USING TIMESTAMP ?"
        ))
        .await?,
        // The sender's own entry also keeps the key: where a retry finds its
        // first attempt when the reservations were lost (`send.rs`).
        insert_own_inbox: prepare(format!(
            "INSERT INTO {ks}.inbox (user_id, bucket, position, channel_id, message_id, send_key) \
             VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        ))
        .await?,
        delete_inbox: prepare(format!(
            "DELETE FROM {ks}.inbox USING TIMESTAMP ? WHERE user_id = ? AND bucket = ? AND position = ?"
        ))
        .await?,
        insert_channel_bucket: prepare(format!(
            "INSERT INTO {ks}.channel_buckets (channel_id, bucket) VALUES (?, ?) USING TIMESTAMP ?"
        ))
        .await?,
        insert_user_channel_at: prepare(format!(
            "INSERT INTO {ks}.user_channels (user_id, channel_id) VALUES (?, ?) USING TIMESTAMP ?"
        ))
        .await?,
        history_before: prepare(format!(
            "SELECT {MESSAGE_COLUMNS} FROM {ks}.messages WHERE channel_id = ? AND bucket = ? AND id < ? \
             ORDER BY id DESC LIMIT ?"
        ))
        .await?,
        history_after: prepare(format!(
            "SELECT {MESSAGE_COLUMNS} FROM {ks}.messages WHERE channel_id = ? AND bucket = ? AND id > ? \
             ORDER BY id ASC LIMIT ?"
        ))
        .await?,
        message: prepare(format!(
            "SELECT {MESSAGE_COLUMNS} FROM {ks}.messages WHERE channel_id = ? AND bucket = ? AND id = ?"
        ))
        .await?,
        // One request for every message of a sync page in one partition.
        messages_in: prepare(format!(
            "SELECT {MESSAGE_COLUMNS} FROM {ks}.messages WHERE channel_id = ? AND bucket = ? AND id IN ?"
        ))
        .await?,
        bucket_has_data: prepare(format!("SELECT id FROM {ks}.messages WHERE channel_id = ? AND bucket = ? LIMIT 1"))
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
        // Filtering within one partition's recent slice (the retry window of
        // one user's inbox), only when reservations may have been lost.
        own_send: prepare(format!(
            "SELECT position, channel_id, message_id FROM {ks}.inbox \
             WHERE user_id = ? AND bucket = ? AND position >= ? AND send_key = ? ALLOW FILTERING"
        ))
        .await?,
        legacy_send: prepare(format!(
            "SELECT message_id, channel_id FROM {ks}.sends WHERE sender = ? AND idem_key = ?"
        ))
        .await?,
        insert_group: prepare(format!(
            "INSERT INTO {ks}.groups (group_id, name, owner, created_at_ms) VALUES (?, ?, ?, ?)"
        ))
        .await?,
        select_group: prepare(format!("SELECT name, owner, created_at_ms FROM {ks}.groups WHERE group_id = ?")).await?,
        set_owner: prepare(format!("UPDATE {ks}.groups SET owner = ? WHERE group_id = ?")).await?,
        insert_member: prepare(format!("INSERT INTO {ks}.members (group_id, user_id) VALUES (?, ?)")).await?,
        delete_member: prepare(format!("DELETE FROM {ks}.members WHERE group_id = ? AND user_id = ?")).await?,
        select_members: prepare(format!("SELECT user_id FROM {ks}.members WHERE group_id = ?")).await?,
        select_members_in: prepare(format!("SELECT group_id, user_id FROM {ks}.members WHERE group_id IN ?")).await?,
        insert_user_channel: prepare(format!("INSERT INTO {ks}.user_channels (user_id, channel_id) VALUES (?, ?)"))
            .await?,
        delete_user_channel: prepare(format!("DELETE FROM {ks}.user_channels WHERE user_id = ? AND channel_id = ?"))
            .await?,
        select_user_channels: prepare(format!("SELECT channel_id FROM {ks}.user_channels WHERE user_id = ?")).await?,
        // A marker is written with its message's write timestamp, so the
        // newest message wins whatever order the writes arrive in (`cql.rs`).
        advance_delivered: prepare(format!(
            "UPDATE {ks}.markers USING TIMESTAMP ? SET delivered_up_to = ? WHERE user_id = ? AND channel_id = ?"
        ))
        .await?,
        advance_read: prepare(format!(
            "UPDATE {ks}.markers USING TIMESTAMP ? SET read_up_to = ? WHERE user_id = ? AND channel_id = ?"
        ))
        .await?,
        select_markers_of: prepare(format!(
            "SELECT channel_id, delivered_up_to, read_up_to FROM {ks}.markers WHERE user_id = ?"
        ))
        .await?,
        select_channel_markers: prepare(format!(
            "SELECT user_id, delivered_up_to, read_up_to FROM {ks}.markers WHERE user_id IN ? AND channel_id = ?"
        ))
        .await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_local_datacenter_keeps_requests_in_it() {
        let config = ScyllaConfig::default();
        assert_eq!(consistency(&config), Consistency::Quorum);
        assert_eq!(serial_consistency(&config), SerialConsistency::Serial);
        let local = ScyllaConfig { local_datacenter: Some("dc1".into()), ..ScyllaConfig::default() };
        assert_eq!(consistency(&local), Consistency::LocalQuorum);
        assert_eq!(serial_consistency(&local), SerialConsistency::LocalSerial);
        let one = ScyllaConfig { consistency: Consistency::One, ..local };
        assert_eq!(consistency(&one), Consistency::One, "an explicit level is kept");
    }
}
