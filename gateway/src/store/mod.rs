//! Durable storage of chat data behind one trait, with two implementations:
//! [`scylla::ScyllaStore`] (ScyllaDB or any CQL store, for clusters) and
//! [`embedded::EmbeddedStore`] (redb in a local folder, for the standalone
//! gateway). The chat layer only sees [`Store`].
//!
//! Data model (wide-column, after Discord's):
//! - channel history: partition `(channel, month bucket of the id)`,
//!   clustered by message id, newest first; no TTL: kept forever. On
//!   ScyllaDB each channel also lists its buckets that hold messages, so a
//!   history page reads only those.
//! - inbox ("message sync queue"): partition `(user, month bucket of the
//!   position)`, clustered by position; one small entry per recipient and
//!   message that refers to the history row `(channel, id)` instead of
//!   copying the text, so a message to 100 members is stored once.
//! - sends: `(sender, idempotency key) → message id`, so a retried send is
//!   stored once.
//! - groups and memberships, both directions (members of a group; channels of a user).
//! - read markers: `(user, channel) → (delivered_up_to, read_up_to)`, one row
//!   per user per channel that only moves forward (no counters: unread
//!   counts derive from the read marker and the history).
//!
//! Contract shared by both implementations (and checked by one test suite
//! run against each): a write returns only once it is durable; reads see
//! every write that returned before they started.

pub mod embedded;
pub mod health;
pub mod scylla;
pub mod send_keys;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// A stored chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Unique, time-ordered (see [`crate::ids`]).
    pub id: u64,
    pub channel: String,
    pub sender: String,
    pub sender_device: String,
    pub text: String,
    /// Milliseconds since the Unix epoch (not an order: two messages may share it).
    pub created_at_ms: i64,
}

/// One message in one user's inbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEntry {
    /// The user's sync cursor moves over positions: unique per user and
    /// time-ordered, assigned when the entry is written.
    pub position: u64,
    pub message: Message,
}

/// One send, stored in one go: the message in its channel's history, an
/// inbox entry at `position` for every recipient (the sender too, for their
/// other devices), and the sender's idempotency key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    /// `id` is a freshly minted candidate; a retried key keeps the first id.
    pub message: Message,
    /// Client-chosen idempotency key of `message.sender`.
    pub key: String,
    /// Shared with the fan-out that follows (a group's cached members).
    pub recipients: std::sync::Arc<[String]>,
    /// One inbox position shared by every recipient (the live frame is encoded once).
    pub position: u64,
    /// Also record the channel in every recipient's channel list (the first
    /// message of a direct channel; groups record it when members join).
    pub link_channel: bool,
}

/// What storing a [`NewMessage`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The message as stored: for a retried key, the first one.
    pub message: Message,
    /// Its inbox position (meaningless for a duplicate).
    pub position: u64,
    /// The key had been stored before: nothing new was written.
    pub duplicate: bool,
    /// What storing it took.
    pub cost: SendCost,
}

/// The store requests one send took, and how many of them had to wait for
/// one another (sequential round trips): the cost of the send path, for
/// the `kubechat_gateway_store_requests_per_send` metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendCost {
    pub requests: u32,
    pub round_trips: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Channel id of the group (`g:<id>`).
    pub id: String,
    pub name: String,
    pub owner: String,
    pub created_at_ms: i64,
}

/// What [`Store::join`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Join {
    Added,
    AlreadyMember,
    /// Not added: the group has `members` members, its limit or more.
    Full {
        members: usize,
    },
}

/// Where a user has got to in one channel: the newest message delivered to
/// one of their devices and the newest they read, "up to" markers as
/// Matrix's `m.read` and XMPP's chat markers (XEP-0333) define them. Message
/// ids; 0 for none yet. They only move forward, and read implies delivered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Markers {
    pub delivered_up_to: u64,
    pub read_up_to: u64,
}

impl Markers {
    /// Both markers at least as far as `other`'s (and delivered at least as
    /// far as read): the order of merges never matters, so racing devices
    /// and retried writes end in the same place.
    pub fn merge(self, other: Markers) -> Markers {
        let read_up_to = self.read_up_to.max(other.read_up_to);
        Markers { delivered_up_to: self.delivered_up_to.max(other.delivered_up_to).max(read_up_to), read_up_to }
    }
}

/// Which side of a message id a history page lies on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page {
    /// The newest messages.
    Latest,
    /// Messages with a smaller id, newest first.
    Before(u64),
    /// Messages with a larger id, oldest first.
    After(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or did not answer in time: the
    /// operation may be retried and nothing was acknowledged.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Data in the store could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The sender used this idempotency key for a message to another
    /// channel: a retry must name the same recipient. Nothing was written.
    #[error("the key {key:?} was used for a message to {channel}; a retry must go to the same recipient")]
    KeyReused { key: String, channel: String },
}

pub type StoreResult<T> = Result<T, StoreError>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a send unless its `(sender, key)` was stored before, in which
    /// case nothing is written and the first message comes back as a
    /// duplicate ([`StoreError::KeyReused`] when that message went to
    /// another channel). Returns once every part is durable; a failure may
    /// leave parts written, and a retry with the same key completes them.
    async fn store_message(&self, new: NewMessage) -> StoreResult<Stored>;

    /// Inbox entries of `user` with position greater than `after`, oldest
    /// first, at most `limit`.
    async fn inbox_after(&self, user: &str, after: u64, limit: usize) -> StoreResult<Vec<InboxEntry>>;

    /// One page of a channel's history: `Latest` and `Before` newest first,
    /// `After` oldest first; at most `limit` messages.
    async fn history(&self, channel: &str, page: Page, limit: usize) -> StoreResult<Vec<Message>>;

    /// Looks a message up by channel and id.
    async fn message(&self, channel: &str, id: u64) -> StoreResult<Option<Message>>;

    async fn create_group(&self, group: &Group, members: &[String]) -> StoreResult<()>;
    async fn group(&self, id: &str) -> StoreResult<Option<Group>>;
    async fn add_member(&self, group: &str, user: &str) -> StoreResult<()>;
    /// Adds `user` unless `group` would then have more than `max` members,
    /// atomically for this store: adds racing on any number of gateways
    /// never take a group past its limit (two racing for the last place may
    /// both be refused; either may retry).
    async fn join(&self, group: &str, user: &str, max: usize) -> StoreResult<Join>;
    async fn remove_member(&self, group: &str, user: &str) -> StoreResult<()>;
    /// Makes `owner` the owner of `group` (the rest of the group unchanged).
    async fn set_owner(&self, group: &str, owner: &str) -> StoreResult<()>;
    /// Members of a group, sorted.
    async fn members(&self, group: &str) -> StoreResult<Vec<String>>;
    /// Members of each of `groups` (sorted; empty for an unknown group), in
    /// as few requests as the store allows.
    async fn members_of(&self, groups: &[String]) -> StoreResult<std::collections::HashMap<String, Vec<String>>> {
        let mut out = std::collections::HashMap::with_capacity(groups.len());
        for group in groups {
            out.insert(group.clone(), self.members(group).await?);
        }
        Ok(out)
    }
    /// Channels a user takes part in (groups and direct chats), sorted.
    async fn channels_of(&self, user: &str) -> StoreResult<Vec<String>>;

    /// Moves `user`'s markers in `channel` forward to `markers` (each
    /// stored marker becomes the larger: [`Markers::merge`]); never back.
    async fn advance_markers(&self, user: &str, channel: &str, markers: Markers) -> StoreResult<()>;
    /// `user`'s markers in every channel where they have any.
    async fn markers_of(&self, user: &str) -> StoreResult<std::collections::HashMap<String, Markers>>;
    /// The markers of each of `users` in `channel` (the default for none), in order.
    async fn channel_markers(&self, channel: &str, users: &[String]) -> StoreResult<Vec<Markers>>;

    /// A cheap read that succeeds while the store answers (health probes).
    async fn ping(&self) -> StoreResult<()> {
        self.group("g:health-probe").await.map(drop)
    }
}

/// Month-long buckets keep partitions bounded however long a channel lives.
pub const BUCKET_MS: i64 = 30 * 24 * 3600 * 1000;

/// The bucket of a time-ordered id.
pub fn bucket_of(id: u64) -> i32 {
    let ms = crate::ids::timestamp_ms(id);
    i32::try_from(ms / BUCKET_MS).unwrap_or(i32::MAX)
}
