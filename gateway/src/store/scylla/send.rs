//! Writing a send: the idempotency decision, the rows, and how they travel.
//!
//! ## The decision (no lightweight transaction)
//!
//! The key `(sender, key)` is reserved outside the store first
//! ([`SendKeys::reserve`], Redis `SET NX` in a cluster), for the candidate
//! id and inbox position:
//!
//! - **Reserved, certain**: a new message. One round: every row at once.
//! - **Existing** (an earlier attempt holds the key): round one reads that
//!   message's history row. Marked done: a duplicate, answered from the
//!   row, nothing written. Not done (that attempt may have died part-way,
//!   or still be writing): round two rewrites its rows under the same id.
//! - **Reserved but uncertain, or unknown** (reservations may have been
//!   lost: Redis lost its data, or cannot be reached): round one looks for
//!   an earlier attempt in the store itself (the sender's own inbox entry
//!   keeps the key); found, it is finished as above, otherwise round two
//!   writes a new message.
//!
//! So a send costs one store round trip, two at most.
//!
//! ## The rows
//!
//! A history row, an inbox entry per recipient (the sender's own one keeps
//! the key), a `user_channels` row per recipient for a direct channel's
//! first message, and the channel's `channel_buckets` row once per month
//! and process. All are plain upserts with the minting time of their id or
//! position as write timestamp ([`write_timestamp`]): a replay changes
//! nothing, so no partial state needs repair beyond writing the same rows
//! again, which any retry does.
//!
//! A retry reuses the earlier attempt's inbox position while it is young
//! (under [`REUSE_POSITION_WITHIN_MS`]); an older one may already lie behind
//! a cursor a device stored (cursors lag "now" by the sync horizon), so the
//! retry writes the entry at its own, fresh position and deletes the old
//! one in the same partition write (atomic there): one entry per recipient,
//! always in front of every stored cursor.
//!
//! The bucket row is the only ordered write: a history row must never be in
//! a bucket the channel's list lacks (history reads only listed buckets), so
//! when a bucket is new to this process its row goes in round one, before
//! the history row.
//!
//! ## How rows travel
//!
//! Rows are grouped by the replicas that own them and each group goes as
//! one UNLOGGED batch (no batchlog), all groups at once: on a cluster where
//! every node holds every partition (three nodes, replication factor 3) a
//! send is one request to a replica, which applies its rows locally and
//! forwards them to the other two, exactly as single-row writes would be.
//! Groups are split below the server's batch size limit; a row bigger than
//! that (a long message) goes alone as a plain statement.

use std::sync::atomic::Ordering;

use futures::{StreamExt, TryStreamExt, stream};
use scylla::serialize::SerializationError;
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::writers::RowWriter;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

use super::ScyllaStore;
use super::cql::{KeyedMessage, from_cql, to_cql, unavailable, write_timestamp};
use super::schema::{CLOCK_SKEW_MS, newest_bucket};
use crate::ids;
use crate::store::send_keys::{Reservation, SendRecord};
use crate::store::{Message, NewMessage, SendCost, StoreError, StoreResult, Stored, bucket_of};

/// A retry reuses its earlier attempt's inbox position when that was minted
/// less than this long ago. Must stay below the chat layer's sync horizon
/// minus its write deadline (10 s − 5 s by default), less clock skew.
pub const REUSE_POSITION_WITHIN_MS: i64 = 2_000;

/// Batches in flight at once for one send (a big group on a big cluster
/// has one per replica set).
const BATCHES_IN_FLIGHT: usize = 16;

/// One row write of a send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write<'a> {
    History {
        message: &'a Message,
        key: &'a str,
    },
    /// A recipient's entry at `position`; the sender's own keeps `key`;
    /// `replaces`: an earlier attempt's position in the same partition,
    /// deleted by the same partition write.
    Inbox {
        user: &'a str,
        position: u64,
        message_id: u64,
        channel: &'a str,
        key: Option<&'a str>,
        replaces: Option<u64>,
    },
    UserChannel {
        user: &'a str,
        channel: &'a str,
        id: u64,
    },
    ChannelBucket {
        channel: &'a str,
        bucket: i32,
        id: u64,
    },
}

impl Write<'_> {
    /// Upper estimate of the bytes the server counts against its batch
    /// limit: the strings plus an allowance per cell (Cassandra 5 measures
    /// about 20 bytes per cell on top of the strings; 32 keeps a margin).
    pub fn estimated_bytes(&self) -> usize {
        const CELL: usize = 32;
        match self {
            Self::History { message: m, key } => {
                m.channel.len() + m.sender.len() + m.sender_device.len() + m.text.len() + key.len() + 8 * CELL
            }
            Self::Inbox { user, channel, key, replaces, .. } => {
                user.len() + channel.len() + key.map_or(0, str::len) + 6 * CELL + replaces.map_or(0, |_| 4 * CELL)
            }
            Self::UserChannel { user, channel, .. } => user.len() + channel.len() + 2 * CELL,
            Self::ChannelBucket { channel, .. } => channel.len() + 2 * CELL,
        }
    }

    /// Table and partition key values, to find the row's replicas.
    fn partition(&self) -> (&'static str, PartitionKey<'_>) {
        match self {
            Self::History { message, .. } => ("messages", PartitionKey::Pair(&message.channel, bucket_of(message.id))),
            Self::Inbox { user, position, .. } => ("inbox", PartitionKey::Pair(user, bucket_of(*position))),
            Self::UserChannel { user, .. } => ("user_channels", PartitionKey::One(user)),
            Self::ChannelBucket { channel, .. } => ("channel_buckets", PartitionKey::One(channel)),
        }
    }
}

enum PartitionKey<'a> {
    One(&'a str),
    Pair(&'a str, i32),
}

/// The rows of one send in the order they must land: `first` before any of
/// `then` (the bucket row before the history row it lists).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan<'a> {
    pub first: Vec<Write<'a>>,
    pub then: Vec<Write<'a>>,
}

/// What one send writes.
pub struct SendRows<'a> {
    pub message: &'a Message,
    pub key: &'a str,
    pub recipients: &'a [String],
    pub position: u64,
    /// An earlier attempt's position whose entries this write moves.
    pub replaces: Option<u64>,
    pub link_channel: bool,
    /// The message's bucket is not known to be listed yet.
    pub list_bucket: bool,
}

/// The rows of a send (pure: what the store would write, testable without one).
pub fn plan<'a>(rows: &SendRows<'a>) -> Plan<'a> {
    let m = rows.message;
    let mut plan = Plan::default();
    if rows.list_bucket {
        plan.first.push(Write::ChannelBucket { channel: &m.channel, bucket: bucket_of(m.id), id: m.id });
    }
    // Deleting in another partition would not be atomic with the new entry:
    // across a month boundary the old entry stays (readers drop repeats).
    let replaces = rows.replaces.filter(|old| bucket_of(*old) == bucket_of(rows.position) && *old != rows.position);
    for user in rows.recipients {
        let key = (*user == m.sender).then_some(rows.key);
        plan.then.push(Write::Inbox {
            user,
            position: rows.position,
            message_id: m.id,
            channel: &m.channel,
            key,
            replaces,
        });
        if rows.link_channel {
            plan.then.push(Write::UserChannel { user, channel: &m.channel, id: m.id });
        }
    }
    plan.then.push(Write::History { message: m, key: rows.key });
    plan
}

/// Splits writes into request groups: by replica set (`replicas`), then
/// each group below `max_bytes` (a single write over it goes alone).
pub fn group_writes<'a, K: Eq + std::hash::Hash>(
    writes: Vec<Write<'a>>,
    replicas: impl Fn(&Write<'a>) -> K,
    max_bytes: usize,
) -> Vec<Vec<Write<'a>>> {
    let mut by_replicas: Vec<(K, Vec<Write<'a>>)> = Vec::new();
    for write in writes {
        let key = replicas(&write);
        match by_replicas.iter_mut().find(|(k, _)| *k == key) {
            Some((_, group)) => group.push(write),
            None => by_replicas.push((key, vec![write])),
        }
    }
    let mut out = Vec::new();
    for (_, group) in by_replicas {
        let mut current: Vec<Write<'a>> = Vec::new();
        let mut bytes = 0;
        for write in group {
            let size = write.estimated_bytes();
            if !current.is_empty() && bytes + size > max_bytes {
                out.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += size;
            current.push(write);
        }
        if !current.is_empty() {
            out.push(current);
        }
    }
    out
}

/// The bound values of one statement of a send.
enum Values<'a> {
    History((&'a str, i32, i64, &'a str, &'a str, &'a str, i64, &'a str, i64)),
    Inbox((&'a str, i32, i64, &'a str, i64, i64)),
    OwnInbox((&'a str, i32, i64, &'a str, i64, &'a str, i64)),
    DeleteInbox((i64, &'a str, i32, i64)),
    Pair((&'a str, &'a str, i64)),
    Bucket((&'a str, i32, i64)),
}

impl SerializeRow for Values<'_> {
    fn serialize(&self, ctx: &RowSerializationContext<'_>, writer: &mut RowWriter) -> Result<(), SerializationError> {
        match self {
            Self::History(v) => v.serialize(ctx, writer),
            Self::Inbox(v) => v.serialize(ctx, writer),
            Self::OwnInbox(v) => v.serialize(ctx, writer),
            Self::DeleteInbox(v) => v.serialize(ctx, writer),
            Self::Pair(v) => v.serialize(ctx, writer),
            Self::Bucket(v) => v.serialize(ctx, writer),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// What round one found out about an earlier attempt.
enum Earlier {
    /// None: this is a new message.
    None,
    /// An earlier attempt named by `record`; `row` is its history row when read.
    Attempt { record: SendRecord, row: Option<Message> },
}

impl ScyllaStore {
    /// The send path (module docs).
    pub(super) async fn write_send(&self, new: NewMessage) -> StoreResult<Stored> {
        let NewMessage { message, key, recipients, position, link_channel } = new;
        let candidate = SendRecord { id: message.id, position, channel: message.channel.clone(), done: false };
        let mut cost = Cost::default();

        let reserved = self.keys.reserve(&message.sender, &key, &candidate).await;
        crate::failpoint::pause(crate::failpoint::SEND_AFTER_RESERVE).await;
        let earlier = match reserved {
            Reservation::Reserved { certain: true } => Earlier::None,
            Reservation::Existing(record) => {
                // Round one: the earlier attempt's history row (and the bucket row, if due).
                let bucket = self.bucket_row(&record.channel, record.id);
                let (row, listed) = futures::join!(
                    self.history_row(&record.channel, record.id, &mut cost.reads),
                    self.write_first(&bucket)
                );
                cost.requests += listed?;
                cost.round(1);
                Earlier::Attempt { record, row: row? }
            }
            Reservation::Reserved { certain: false } | Reservation::Unknown => {
                // Round one: an earlier attempt in the store itself (and the bucket row, if due).
                let bucket = self.bucket_row(&message.channel, message.id);
                let (found, listed) = futures::join!(
                    self.earlier_attempt(&message.sender, &key, &mut cost.reads),
                    self.write_first(&bucket)
                );
                cost.requests += listed?;
                cost.round(1);
                match found? {
                    Some(record) => Earlier::Attempt { record, row: None },
                    None => Earlier::None,
                }
            }
        };

        let (message, position, replaces, duplicate) = match earlier {
            Earlier::None => (message, position, None, false),
            Earlier::Attempt { record, row } => {
                let first = row.unwrap_or_else(|| Message {
                    id: record.id,
                    channel: record.channel.clone(),
                    created_at_ms: ids::timestamp_ms(record.id),
                    ..message.clone()
                });
                if record.channel != message.channel {
                    return Err(StoreError::KeyReused { key, channel: record.channel });
                }
                if record.done {
                    return Ok(cost.stored(first, record.position, true));
                }
                let age_ms = ids::now_ms() - ids::timestamp_ms(record.position);
                if age_ms < REUSE_POSITION_WITHIN_MS {
                    (first, record.position, None, true)
                } else {
                    (first, position, Some(record.position), true)
                }
            }
        };

        let history_bucket = bucket_of(message.id);
        let list_bucket = !self.listed.contains(&message.channel, history_bucket);
        let rows = SendRows {
            message: &message,
            key: &key,
            recipients: &recipients,
            position,
            replaces,
            link_channel,
            list_bucket,
        };
        let Plan { first, mut then } = plan(&rows);
        if cost.round_trips == 0 {
            self.write_all(first, &mut cost).await?;
        } else {
            // Round one listed the bucket this send was expected in; an
            // earlier attempt found in another month lists its own with the
            // rest, rather than cost a third round (a month boundary while
            // reservations were lost).
            then.splice(0..0, first);
        }
        self.write_all(then, &mut cost).await?;
        if list_bucket {
            self.listed.insert(&message.channel, history_bucket);
        }
        crate::failpoint::pause(crate::failpoint::SEND_BEFORE_ACK).await;

        // Queued, not awaited: a lost completion only makes a later retry rewrite the rows.
        let record = SendRecord { id: message.id, position, channel: message.channel.clone(), done: true };
        self.keys.complete(&message.sender, &key, &record).await;
        Ok(cost.stored(message, position, duplicate))
    }

    /// The channel's bucket row for `id`, unless this process listed it.
    fn bucket_row<'a>(&self, channel: &'a str, id: u64) -> Vec<Write<'a>> {
        let bucket = bucket_of(id);
        if self.listed.contains(channel, bucket) {
            Vec::new()
        } else {
            vec![Write::ChannelBucket { channel, bucket, id }]
        }
    }

    /// Writes round one's rows (the bucket row), remembering the bucket;
    /// answers the requests it took.
    async fn write_first(&self, writes: &[Write<'_>]) -> StoreResult<u32> {
        let mut cost = Cost::default();
        self.write_all(writes.to_vec(), &mut cost).await?;
        for write in writes {
            if let Write::ChannelBucket { channel, bucket, .. } = write {
                self.listed.insert(channel, *bucket);
            }
        }
        Ok(cost.requests)
    }

    /// The history row of an earlier attempt.
    async fn history_row(&self, channel: &str, id: u64, reads: &mut u32) -> StoreResult<Option<Message>> {
        *reads += 1;
        Ok(self.keyed_message(channel, id).await?.map(|keyed| keyed.message))
    }

    /// An earlier attempt of `(sender, key)` recorded in the store: the
    /// sender's own inbox entry within the retry window, or (while sends of
    /// earlier versions may still be retried) their `sends` row. The smallest
    /// id wins, as it does for readers dropping repeats.
    async fn earlier_attempt(&self, sender: &str, key: &str, reads: &mut u32) -> StoreResult<Option<SendRecord>> {
        let now = ids::now_ms();
        let window_ms = i64::try_from(self.config.retry_window.as_millis()).unwrap_or(i64::MAX);
        let from = ids::first_id_at(now.saturating_sub(window_ms).saturating_sub(CLOCK_SKEW_MS));
        let buckets: Vec<i32> = (bucket_of(from)..=newest_bucket().max(bucket_of(from))).collect();
        *reads += u32::try_from(buckets.len()).unwrap_or(u32::MAX);
        let own = stream::iter(buckets)
            .map(|bucket| async move {
                let values = (sender, bucket, to_cql(from), key);
                let result = self.run(&self.prepared.own_send, values, "look up a send key").await?;
                super::cql::decode::<(i64, String, i64)>(result, "decode send key")
            })
            .buffer_unordered(4)
            .try_concat();
        let legacy = async {
            if now > self.legacy_keys_until.saturating_add(window_ms) {
                return Ok(Vec::new());
            }
            let result = self.run(&self.prepared.legacy_send, (sender, key), "look up a send key").await?;
            super::cql::decode::<(i64, String)>(result, "decode send key")
        };
        let (own, legacy) = futures::try_join!(own, legacy)?;
        let mut found: Vec<SendRecord> = own
            .into_iter()
            .map(|(position, channel, id)| SendRecord {
                id: from_cql(id),
                position: from_cql(position),
                channel,
                done: false,
            })
            .collect();
        // Written by an earlier version, which stored history last: done once it exists.
        found.extend(legacy.into_iter().map(|(id, channel)| SendRecord {
            id: from_cql(id),
            position: 0,
            channel,
            done: true,
        }));
        Ok(found.into_iter().min_by_key(|record| record.id))
    }

    /// Writes `writes` grouped by replicas (module docs), all groups at
    /// once: one round trip.
    async fn write_all(&self, writes: Vec<Write<'_>>, cost: &mut Cost) -> StoreResult<()> {
        if writes.is_empty() {
            return Ok(());
        }
        let cluster = self.session().get_cluster_state();
        let keyspace = self.config.keyspace.as_str();
        let replicas = |write: &Write<'_>| -> Vec<u128> {
            let (table, key) = write.partition();
            let endpoints = match key {
                PartitionKey::One(a) => cluster.get_endpoints(keyspace, table, &(a,)),
                PartitionKey::Pair(a, b) => cluster.get_endpoints(keyspace, table, &(a, b)),
            };
            // Unknown (metadata not loaded yet): one group, routed by its first row.
            let mut hosts: Vec<u128> =
                endpoints.map(|e| e.iter().map(|(node, _)| node.host_id.as_u128()).collect()).unwrap_or_default();
            hosts.sort_unstable();
            hosts
        };
        let groups = group_writes(writes, replicas, self.config.max_batch_bytes);
        cost.requests += u32::try_from(groups.len()).unwrap_or(u32::MAX);
        cost.round(1);
        stream::iter(groups.into_iter().map(Ok))
            .try_for_each_concurrent(BATCHES_IN_FLIGHT, |group| self.write_group(group))
            .await
    }

    /// One request: a plain statement for a single-statement group, an
    /// UNLOGGED batch otherwise.
    async fn write_group(&self, group: Vec<Write<'_>>) -> StoreResult<()> {
        let mut statements: Vec<(&PreparedStatement, Values<'_>)> = Vec::with_capacity(group.len());
        for write in &group {
            self.statements_of(write, &mut statements);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let [(statement, values)] = statements.as_slice() {
            self.session().execute_unpaged(statement, values).await.map_err(unavailable("write message"))?;
            return Ok(());
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.set_consistency(self.consistency);
        batch.set_request_timeout(Some(self.config.request_timeout));
        // Upserts and deletes with fixed write timestamps: safe to retry.
        batch.set_is_idempotent(true);
        let mut values = Vec::with_capacity(statements.len());
        for (statement, value) in statements {
            batch.append_statement(statement.clone());
            values.push(value);
        }
        self.session().batch(&batch, &values).await.map_err(unavailable("write message"))?;
        Ok(())
    }

    fn statements_of<'s, 'w>(&'s self, write: &'w Write<'w>, out: &mut Vec<(&'s PreparedStatement, Values<'w>)>) {
        let p = &self.prepared;
        match *write {
            Write::History { message: m, key } => out.push((
                &p.insert_message,
                Values::History((
                    &m.channel,
                    bucket_of(m.id),
                    to_cql(m.id),
                    &m.sender,
                    &m.sender_device,
                    &m.text,
                    m.created_at_ms,
                    key,
                    write_timestamp(m.id),
                )),
            )),
            Write::Inbox { user, position, message_id, channel, key, replaces } => {
                let (bucket, at) = (bucket_of(position), write_timestamp(position));
                if let Some(old) = replaces {
                    out.push((&p.delete_inbox, Values::DeleteInbox((at, user, bucket_of(old), to_cql(old)))));
                }
                let (position, id) = (to_cql(position), to_cql(message_id));
                out.push(match key {
                    Some(key) => {
                        (&p.insert_own_inbox, Values::OwnInbox((user, bucket, position, channel, id, key, at)))
                    }
                    None => (&p.insert_inbox, Values::Inbox((user, bucket, position, channel, id, at))),
                });
            }
            Write::UserChannel { user, channel, id } => {
                out.push((&p.insert_user_channel_at, Values::Pair((user, channel, write_timestamp(id)))));
            }
            Write::ChannelBucket { channel, bucket, id } => {
                out.push((&p.insert_channel_bucket, Values::Bucket((channel, bucket, write_timestamp(id)))));
            }
        }
    }

    /// One message by id, with its key.
    pub(super) async fn keyed_message(&self, channel: &str, id: u64) -> StoreResult<Option<KeyedMessage>> {
        let result = self.run(&self.prepared.message, (channel, bucket_of(id), to_cql(id)), "read message").await?;
        let rows: Vec<super::cql::MessageRow> = super::cql::decode(result, "decode message")?;
        Ok(rows.into_iter().next().map(|row| super::cql::message_of(channel, row)))
    }
}

/// Requests and sequential round trips of one send.
#[derive(Default)]
struct Cost {
    requests: u32,
    reads: u32,
    round_trips: u32,
}

impl Cost {
    fn round(&mut self, n: u32) {
        self.round_trips += n.min(1);
    }

    fn stored(&self, message: Message, position: u64, duplicate: bool) -> Stored {
        let cost = SendCost { requests: self.requests + self.reads, round_trips: self.round_trips };
        Stored { message, position, duplicate, cost }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: u64, channel: &str, sender: &str) -> Message {
        Message {
            id,
            channel: channel.into(),
            sender: sender.into(),
            sender_device: "phone".into(),
            text: "hi".into(),
            created_at_ms: ids::timestamp_ms(id),
        }
    }

    fn kinds(writes: &[Write<'_>]) -> Vec<&'static str> {
        writes
            .iter()
            .map(|w| match w {
                Write::History { .. } => "history",
                Write::Inbox { key: Some(_), .. } => "own inbox",
                Write::Inbox { .. } => "inbox",
                Write::UserChannel { .. } => "user channel",
                Write::ChannelBucket { .. } => "bucket",
            })
            .collect()
    }

    /// The plan of a one-to-one send: three rows in one round, the key in
    /// the history row and the sender's own entry only.
    #[test]
    fn a_direct_message_is_three_rows_in_one_round() {
        let idgen = ids::IdGenerator::new(1, 0);
        let m = message(idgen.next_id(), "dm:alice:bob", "alice");
        let recipients = vec!["alice".to_string(), "bob".to_string()];
        let rows = SendRows {
            message: &m,
            key: "k1",
            recipients: &recipients,
            position: idgen.next_id(),
            replaces: None,
            link_channel: false,
            list_bucket: false,
        };
        let plan = plan(&rows);
        assert!(plan.first.is_empty(), "nothing has to land first");
        assert_eq!(kinds(&plan.then), ["own inbox", "inbox", "history"]);
        let groups = group_writes(plan.then, |_| 0, 40 * 1024);
        assert_eq!(groups.len(), 1, "one replica set: one request");
    }

    /// A channel's first message this month lists the bucket first; a
    /// direct channel's first message links it for both users.
    #[test]
    fn a_new_bucket_is_listed_in_a_round_before_the_history_row() {
        let idgen = ids::IdGenerator::new(1, 0);
        let m = message(idgen.next_id(), "dm:alice:bob", "alice");
        let recipients = vec!["alice".to_string(), "bob".to_string()];
        let rows = SendRows {
            message: &m,
            key: "k1",
            recipients: &recipients,
            position: idgen.next_id(),
            replaces: None,
            link_channel: true,
            list_bucket: true,
        };
        let plan = plan(&rows);
        assert_eq!(kinds(&plan.first), ["bucket"]);
        assert_eq!(kinds(&plan.then), ["own inbox", "user channel", "inbox", "user channel", "history"]);
    }

    /// A 100-member group is 101 rows, one request per replica set, split
    /// below the batch limit; a message bigger than the limit goes alone.
    #[test]
    fn groups_split_by_replicas_and_size() {
        let idgen = ids::IdGenerator::new(1, 0);
        let m = message(idgen.next_id(), "g:1", "u0");
        let recipients: Vec<String> = (0..100).map(|n| format!("u{n}")).collect();
        let rows = SendRows {
            message: &m,
            key: "k",
            recipients: &recipients,
            position: idgen.next_id(),
            replaces: None,
            link_channel: false,
            list_bucket: false,
        };
        let writes = plan(&rows).then;
        assert_eq!(writes.len(), 101);
        assert_eq!(group_writes(writes.clone(), |_| 0, 40 * 1024).len(), 1, "about 10 KiB: one batch");
        let by_three = group_writes(writes.clone(), |w| w.estimated_bytes() % 3, usize::MAX);
        assert!(by_three.len() <= 3);
        assert_eq!(by_three.iter().map(Vec::len).sum::<usize>(), 101, "every row once");
        let small = group_writes(writes, |_| 0, 1000);
        assert!(small.len() > 1 && small.iter().all(|g| g.iter().map(Write::estimated_bytes).sum::<usize>() <= 1000));

        let long = Message { text: "x".repeat(100_000), ..m.clone() };
        let big = SendRows { message: &long, ..rows };
        let groups = group_writes(plan(&big).then, |_| 0, 40 * 1024);
        let history = groups.iter().find(|g| g.iter().any(|w| matches!(w, Write::History { .. }))).expect("history");
        assert_eq!(history.len(), 1, "the big row goes alone");
    }

    /// A late retry moves the entries to its own position and deletes the
    /// old ones in the same partition; across a month boundary it cannot.
    #[test]
    fn a_moved_entry_replaces_the_old_one_in_its_partition_only() {
        let idgen = ids::IdGenerator::new(1, 0);
        let m = message(idgen.next_id(), "dm:alice:bob", "alice");
        let recipients = vec!["alice".to_string(), "bob".to_string()];
        let old = idgen.next_id();
        let new = ids::first_id_at(ids::timestamp_ms(old) + 10_000);
        let rows = SendRows {
            message: &m,
            key: "k1",
            recipients: &recipients,
            position: new,
            replaces: Some(old),
            link_channel: false,
            list_bucket: false,
        };
        let same_month = bucket_of(old) == bucket_of(new);
        for write in plan(&rows).then {
            if let Write::Inbox { replaces, .. } = write {
                assert_eq!(replaces, same_month.then_some(old));
            }
        }
        let next_month = ids::first_id_at((i64::from(bucket_of(old)) + 1) * crate::store::BUCKET_MS);
        let across = SendRows { position: next_month, ..rows };
        for write in plan(&across).then {
            if let Write::Inbox { replaces, .. } = write {
                assert_eq!(replaces, None, "no delete in another partition");
            }
        }
    }
}
