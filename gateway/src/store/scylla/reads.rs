//! Reading: inbox pages (sync), history pages, and lists, each in as few
//! requests as the data allows.
//!
//! ## Inbox pages
//!
//! An inbox row refers to its message's history row `(channel_id,
//! message_id)` instead of copying it, so a message to 100 members stores
//! its text once. A page resolves its references with one request per
//! history partition it touches (`id IN (…)`), all at once: a page of 100
//! entries from 5 conversations is one inbox read and 5 history reads.
//! An entry without its history row is a send still in flight or one that
//! failed; either way it is skipped and the page goes on. Skipping loses
//! nothing: a send in flight reaches a device that is syncing live (the
//! device registered before it synced, and the fan-out follows the write),
//! and the cursor a sync hands out to store lags "now" by the chat layer's
//! sync horizon, longer than any write may take, so the entry is read on
//! the device's next sync after a reconnect. Rows written by earlier
//! versions carry a copy of the message and are read as they are.
//!
//! ## Repeats
//!
//! A page never shows one message twice: entries with an id already on the
//! page are dropped, and so are messages whose `(sender, key)` another
//! message on the page has with a smaller id (the safety net for the one
//! case the reservations cannot rule out, see `send.rs`). History pages do
//! the same.
//!
//! ## History pages
//!
//! A page reads the channel's `channel_buckets` rows from its starting
//! bucket (paged) and then only the buckets listed: one request plus one
//! per bucket that holds data, until the page is full.
//!
//! Keyspaces created before bucket lists existed hold unlisted history. On
//! the first connect of a version with lists `store_meta` records
//! `buckets_listed_from` (agreed by all gateways): the id epoch's bucket
//! for a new keyspace (everything is listed), and for an older one the
//! bucket after next, at least 30 days ahead, since gateways of the earlier
//! version keep writing unlisted rows until the rolling upgrade is over.
//! Buckets from there on are always listed. A channel's older ones are
//! listed by its first history read once bucket `buckets_listed_from` has
//! begun (every older bucket checked for data, then the rows, then a marker
//! row with bucket [`LEGACY_LISTED`]); until then reads scan them one at a
//! time, as earlier versions did.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::ControlFlow;

use futures::{StreamExt, TryStreamExt, stream};
use scylla::deserialize::row::DeserializeRow;
use scylla::response::query_result::QueryResult;
use scylla::response::{PagingState, PagingStateResponse};
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;

use super::ScyllaStore;
use super::cql::{InboxRow, KeyedMessage, MessageRow, cql_limit, decode, from_cql, message_of, to_cql, unavailable};
use super::schema::{current_bucket, newest_bucket, oldest_bucket};
use crate::store::{InboxEntry, Message, Page, StoreError, StoreResult, bucket_of};

/// The `channel_buckets` row that says a channel's buckets older than
/// `buckets_listed_from` are listed (below every real bucket, so it sorts
/// last in a newest-first read).
pub const LEGACY_LISTED: i32 = i32::MIN;

/// Requests in flight at once while resolving one page, or reading lists.
pub const READ_CONCURRENCY: usize = 32;

/// Groups whose members one request asks for (`group_id IN (…)`).
const GROUPS_PER_REQUEST: usize = 100;

/// Drops repeats from messages in page order (module docs): a second entry
/// of one id, and a message whose `(sender, key)` a smaller id on the page
/// has too.
pub fn drop_repeats<T>(items: Vec<T>, keyed: impl Fn(&T) -> &KeyedMessage) -> Vec<T> {
    let mut smallest: HashMap<(&str, &str), u64> = HashMap::new();
    for item in &items {
        let k = keyed(item);
        if let Some(key) = &k.send_key {
            let id = smallest.entry((k.message.sender.as_str(), key.as_str())).or_insert(k.message.id);
            *id = (*id).min(k.message.id);
        }
    }
    let keep: Vec<bool> = {
        let mut seen = HashSet::new();
        items
            .iter()
            .map(|item| {
                let k = keyed(item);
                let newest_of_key = k
                    .send_key
                    .as_ref()
                    .is_some_and(|key| smallest.get(&(k.message.sender.as_str(), key.as_str())) != Some(&k.message.id));
                !newest_of_key && seen.insert(k.message.id)
            })
            .collect()
    };
    items.into_iter().zip(keep).filter_map(|(item, keep)| keep.then_some(item)).collect()
}

impl ScyllaStore {
    /// Runs one statement and returns all of its result in one response
    /// (for point reads, writes and reads bounded by a `LIMIT`).
    pub(super) async fn run(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
        what: &'static str,
    ) -> StoreResult<QueryResult> {
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (result, response): (QueryResult, PagingStateResponse) =
            self.session().execute_single_page(statement, values, state).await.map_err(unavailable(what))?;
        let next = match response.into_paging_control_flow() {
            ControlFlow::Continue(next) => Some(next),
            ControlFlow::Break(()) => None,
        };
        Ok((decode(result, what)?, next))
    }

    /// Every row of a list, read page by page.
    pub(super) async fn read_pages<R>(
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

    /// Inbox entries after `after`, oldest first (module docs).
    pub(super) async fn read_inbox(&self, user: &str, after: u64, limit: usize) -> StoreResult<Vec<InboxEntry>> {
        let mut out: Vec<(u64, KeyedMessage)> = Vec::new();
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
            if let Some(row) = rows.last() {
                cursor = from_cql(row.0);
            }
            let resolved = self.resolve(rows).await?;
            out.extend(resolved);
            out = drop_repeats(out, |(_, keyed)| keyed);
            if bucket_done {
                if bucket >= last {
                    break;
                }
                bucket += 1;
            }
        }
        Ok(out.into_iter().map(|(position, keyed)| InboxEntry { position, message: keyed.message }).collect())
    }

    /// The messages of inbox rows, in row order, with one request per
    /// history partition; rows whose message is not stored (yet) are skipped.
    async fn resolve(&self, rows: Vec<InboxRow>) -> StoreResult<Vec<(u64, KeyedMessage)>> {
        let mut wanted: HashMap<(String, i32), Vec<i64>> = HashMap::new();
        for (_, channel, id, _, _, body, _) in &rows {
            if body.is_none() {
                wanted.entry((channel.clone(), bucket_of(from_cql(*id)))).or_default().push(*id);
            }
        }
        let found: Vec<((String, i32), Vec<MessageRow>)> = stream::iter(wanted)
            .map(|((channel, bucket), ids)| async move {
                let result =
                    self.run(&self.prepared.messages_in, (channel.as_str(), bucket, &ids), "read messages").await?;
                let rows: Vec<MessageRow> = decode(result, "decode messages")?;
                Ok::<_, StoreError>(((channel, bucket), rows))
            })
            .buffer_unordered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        let mut messages: HashMap<(String, u64), KeyedMessage> = HashMap::new();
        for ((channel, _), rows) in found {
            for row in rows {
                let keyed = message_of(&channel, row);
                messages.insert((channel.clone(), keyed.message.id), keyed);
            }
        }
        let mut out = Vec::with_capacity(rows.len());
        for (position, channel, id, sender, sender_device, body, created_at_ms) in rows {
            let (position, id) = (from_cql(position), from_cql(id));
            // Rows written by earlier versions carry a copy of the message.
            if let (Some(text), Some(sender), Some(sender_device), Some(created_at_ms)) =
                (body, sender, sender_device, created_at_ms)
            {
                let message = Message { id, channel, sender, sender_device, text, created_at_ms };
                out.push((position, KeyedMessage { message, send_key: None }));
                continue;
            }
            match messages.remove(&(channel.clone(), id)) {
                Some(keyed) => out.push((position, keyed)),
                // In flight or failed: skipped (module docs).
                None => {
                    tracing::debug!(position, %channel, id, "inbox entry whose message is not stored (yet); skipped")
                }
            }
        }
        Ok(out)
    }

    /// One page of a channel's history (module docs).
    pub(super) async fn read_history(&self, channel: &str, page: Page, limit: usize) -> StoreResult<Vec<Message>> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(Vec::new());
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
        Ok(out.into_iter().map(|keyed| keyed.message).collect())
    }

    /// Reads `bucket` of a channel's history past `bound` (newest-first or
    /// oldest-first, by `statement`) into `out`, up to `limit` in all,
    /// without repeats.
    async fn read_bucket(
        &self,
        channel: &str,
        statement: &PreparedStatement,
        bucket: i32,
        bound: i64,
        limit: usize,
        out: &mut Vec<KeyedMessage>,
    ) -> StoreResult<()> {
        let want = limit.saturating_sub(out.len());
        let result = self.run(statement, (channel, bucket, bound, cql_limit(want)), "read history").await?;
        let rows: Vec<MessageRow> = decode(result, "decode history")?;
        out.extend(rows.into_iter().map(|row| message_of(channel, row)));
        *out = drop_repeats(std::mem::take(out), |keyed| keyed);
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
        out: &mut Vec<KeyedMessage>,
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
        out: &mut Vec<KeyedMessage>,
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
        let now = super::cql::write_timestamp(crate::ids::first_id_at(crate::ids::now_ms()));
        stream::iter(found.iter().map(Ok))
            .try_for_each_concurrent(READ_CONCURRENCY, |bucket| async move {
                self.run(&self.prepared.insert_channel_bucket, (channel, *bucket, now), "list channel buckets")
                    .await
                    .map(drop)
            })
            .await?;
        // The marker last: it promises the rows above.
        self.run(&self.prepared.insert_channel_bucket, (channel, LEGACY_LISTED, now), "list channel buckets").await?;
        tracing::debug!(channel, buckets = found.len(), "listed the buckets of a channel written before bucket lists");
        Ok(Some(found))
    }

    /// Members of many groups, [`GROUPS_PER_REQUEST`] groups per request
    /// (paged), the requests at once.
    pub(super) async fn read_members_of(&self, groups: &[String]) -> StoreResult<HashMap<String, Vec<String>>> {
        let chunks: Vec<Vec<String>> = groups.chunks(GROUPS_PER_REQUEST).map(<[String]>::to_vec).collect();
        let reads = chunks.into_iter().map(|chunk| async move {
            self.read_pages::<(String, String)>(&self.prepared.select_members_in, (chunk,), "read members").await
        });
        let rows: Vec<(String, String)> = stream::iter(reads).buffer_unordered(READ_CONCURRENCY).try_concat().await?;
        let mut members: HashMap<String, Vec<String>> = groups.iter().map(|g| (g.clone(), Vec::new())).collect();
        for (group, user) in rows {
            members.entry(group).or_default().push(user);
        }
        for list in members.values_mut() {
            list.sort();
        }
        Ok(members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(id: u64, sender: &str, key: Option<&str>) -> KeyedMessage {
        KeyedMessage {
            message: Message {
                id,
                channel: "dm:a:b".into(),
                sender: sender.into(),
                sender_device: "d".into(),
                text: "t".into(),
                created_at_ms: 0,
            },
            send_key: key.map(str::to_owned),
        }
    }

    fn ids(items: &[(u64, KeyedMessage)]) -> Vec<(u64, u64)> {
        items.iter().map(|(position, k)| (*position, k.message.id)).collect()
    }

    #[test]
    fn a_page_shows_each_message_once() {
        let page = vec![
            (1, keyed(10, "a", Some("k1"))),
            (2, keyed(11, "a", Some("k2"))),
            // The same message at a second position (an entry a retry moved across a month).
            (3, keyed(10, "a", Some("k1"))),
            // One key stored twice under two ids (reservations lost): the smaller id stays.
            (4, keyed(9, "a", Some("k2"))),
            // Another sender's key of the same name is another message.
            (5, keyed(12, "b", Some("k1"))),
            // Rows without a key (earlier versions) are never merged.
            (6, keyed(13, "a", None)),
            (7, keyed(14, "a", None)),
        ];
        assert_eq!(ids(&drop_repeats(page, |(_, k)| k)), vec![(1, 10), (4, 9), (5, 12), (6, 13), (7, 14)]);
    }
}
