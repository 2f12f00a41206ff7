//! Frame types. Ids and cursors travel as decimal strings: they are 64-bit
//! and JavaScript numbers are not. Clients may send them as numbers too.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::errors::{ErrorCode, ProtocolError};
use super::{Limits, MAX_KEY_LEN, is_group_channel};
use crate::names::{Platform, PushTarget, valid_name};
use crate::store::{InboxEntry, Message};

/// Every `type` a client may send.
pub const CLIENT_TYPES: [&str; 16] = [
    "send",
    "sync",
    "history",
    "create_group",
    "add_member",
    "remove_member",
    "list_members",
    "list_channels",
    "presence",
    "heartbeat",
    "logout",
    "register_push",
    "mark",
    "receipts",
    "typing",
    "overview",
];

/// Longest group name, in characters.
pub const MAX_GROUP_NAME_CHARS: usize = 100;
/// Most users one `presence` request may ask about.
pub const MAX_PRESENCE_USERS: usize = 500;
/// How long a `typing` indicator shows unless repeated (clients repeat it
/// every [`TYPING_TTL_MS`] / 2 while the user types).
pub const TYPING_TTL_MS: u64 = 6_000;

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recipient {
    User(String),
    Group(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Send {
        req: Option<String>,
        to: Recipient,
        text: String,
        /// Client-chosen idempotency key: a retry with the same key is stored once.
        key: String,
    },
    Sync {
        req: Option<String>,
        /// Inbox position to continue after (`"0"`: from the beginning).
        #[serde(default, deserialize_with = "id_or_string")]
        after: u64,
        limit: Option<usize>,
    },
    History {
        req: Option<String>,
        channel: String,
        #[serde(default, deserialize_with = "opt_id_or_string")]
        before: Option<u64>,
        #[serde(default, deserialize_with = "opt_id_or_string")]
        after: Option<u64>,
        limit: Option<usize>,
    },
    CreateGroup {
        req: Option<String>,
        name: String,
        /// Members besides the creator.
        #[serde(default)]
        members: Vec<String>,
    },
    AddMember {
        req: Option<String>,
        group: String,
        user: String,
    },
    RemoveMember {
        req: Option<String>,
        group: String,
        user: String,
    },
    ListMembers {
        req: Option<String>,
        group: String,
    },
    ListChannels {
        req: Option<String>,
    },
    /// Presence of users the sender shares a channel with, or of a group's members.
    Presence {
        req: Option<String>,
        #[serde(default)]
        users: Vec<String>,
        group: Option<String>,
    },
    Heartbeat {
        req: Option<String>,
    },
    Logout {
        req: Option<String>,
    },
    /// Notifications for this device while it is offline go to `token` on
    /// `platform` (replaces an earlier registration of the device).
    RegisterPush {
        req: Option<String>,
        platform: Platform,
        token: String,
    },
    /// Moves this user's markers in `channel` forward: up to which message
    /// it was delivered to a device, and up to which it was read.
    Mark {
        req: Option<String>,
        channel: String,
        #[serde(default, deserialize_with = "opt_id_or_string")]
        delivered_up_to: Option<u64>,
        #[serde(default, deserialize_with = "opt_id_or_string")]
        read_up_to: Option<u64>,
    },
    /// Every member's markers in `channel` (on demand: groups push receipts
    /// to a message's sender only).
    Receipts {
        req: Option<String>,
        channel: String,
    },
    /// This user is typing in `channel` (or stopped: `typing: false`).
    /// Ephemeral: relayed to the other members online, never stored.
    Typing {
        req: Option<String>,
        channel: String,
        #[serde(default = "yes")]
        typing: bool,
    },
    /// Every channel of this user with its last message, unread count and markers.
    Overview {
        req: Option<String>,
    },
}

fn yes() -> bool {
    true
}

impl ClientFrame {
    pub fn req(&self) -> Option<&str> {
        match self {
            ClientFrame::Send { req, .. }
            | ClientFrame::Sync { req, .. }
            | ClientFrame::History { req, .. }
            | ClientFrame::CreateGroup { req, .. }
            | ClientFrame::AddMember { req, .. }
            | ClientFrame::RemoveMember { req, .. }
            | ClientFrame::ListMembers { req, .. }
            | ClientFrame::ListChannels { req }
            | ClientFrame::Presence { req, .. }
            | ClientFrame::Heartbeat { req }
            | ClientFrame::Logout { req }
            | ClientFrame::RegisterPush { req, .. }
            | ClientFrame::Mark { req, .. }
            | ClientFrame::Receipts { req, .. }
            | ClientFrame::Typing { req, .. }
            | ClientFrame::Overview { req } => req.as_deref(),
        }
    }

    /// Checks values against the limits (shape was checked by serde).
    pub fn validate(&self, limits: &Limits) -> Result<(), ProtocolError> {
        let invalid = |message: String| Err(ProtocolError::new(ErrorCode::InvalidArgument, message));
        let check_page = |limit: &Option<usize>| match limit {
            Some(0) => invalid("limit must be at least 1".into()),
            Some(n) if *n > limits.max_page => invalid(format!("limit must be at most {}", limits.max_page)),
            _ => Ok(()),
        };
        let check_user = |user: &str| {
            if valid_name(user) { Ok(()) } else { invalid(format!("{user:?} is not a valid user id")) }
        };
        let check_channel = |channel: &str| {
            if channel.is_empty() || channel.len() > 160 {
                invalid("channel must be 1 to 160 bytes".into())
            } else {
                Ok(())
            }
        };
        let check_group = |group: &str| {
            if is_group_channel(group) && group.len() <= 64 {
                Ok(())
            } else {
                invalid(format!("{group:?} is not a group id (groups are \"g:<id>\")"))
            }
        };
        match self {
            ClientFrame::Send { to, text, key, .. } => {
                match to {
                    Recipient::User(user) => check_user(user)?,
                    Recipient::Group(group) => check_group(group)?,
                }
                if key.is_empty() || key.len() > MAX_KEY_LEN {
                    return invalid(format!("key must be 1 to {MAX_KEY_LEN} bytes"));
                }
                // Characters are Unicode scalar values, not bytes or UTF-16 units.
                let chars = text.chars().count();
                if chars > limits.max_message_chars {
                    return Err(ProtocolError::new(
                        ErrorCode::MessageTooLong,
                        format!("text has {chars} characters; the limit is {}", limits.max_message_chars),
                    ));
                }
                if text.trim().is_empty() {
                    return Err(ProtocolError::new(ErrorCode::EmptyMessage, "text is empty"));
                }
                Ok(())
            }
            ClientFrame::Sync { limit, .. } => check_page(limit),
            ClientFrame::History { channel, before, after, limit, .. } => {
                if before.is_some() && after.is_some() {
                    return invalid("give before or after, not both".into());
                }
                check_channel(channel)?;
                check_page(limit)
            }
            ClientFrame::CreateGroup { name, members, .. } => {
                let chars = name.chars().count();
                if chars == 0 || chars > MAX_GROUP_NAME_CHARS {
                    return invalid(format!("name must be 1 to {MAX_GROUP_NAME_CHARS} characters"));
                }
                members.iter().try_for_each(|m| check_user(m))?;
                if members.len() + 1 > limits.max_group_members {
                    return Err(ProtocolError::new(
                        ErrorCode::GroupFull,
                        format!("a group has at most {} members", limits.max_group_members),
                    ));
                }
                Ok(())
            }
            ClientFrame::AddMember { group, user, .. } | ClientFrame::RemoveMember { group, user, .. } => {
                check_group(group)?;
                check_user(user)
            }
            ClientFrame::ListMembers { group, .. } => check_group(group),
            ClientFrame::Presence { users, group, .. } => {
                if users.len() > MAX_PRESENCE_USERS {
                    return invalid(format!("at most {MAX_PRESENCE_USERS} users per request"));
                }
                users.iter().try_for_each(|u| check_user(u))?;
                group.as_deref().map_or(Ok(()), check_group)
            }
            ClientFrame::RegisterPush { platform, token, .. } => {
                // The device id comes from the token, which was checked at connect.
                PushTarget::new("device", *platform, token.as_str())
                    .validate()
                    .or_else(|e| invalid(format!("invalid push target: {e}")))
            }
            ClientFrame::Mark { channel, delivered_up_to, read_up_to, .. } => {
                check_channel(channel)?;
                match (delivered_up_to, read_up_to) {
                    (None, None) => invalid("give delivered_up_to, read_up_to or both".into()),
                    (Some(0), _) | (_, Some(0)) => invalid("a marker names a message id, not 0".into()),
                    _ => Ok(()),
                }
            }
            ClientFrame::Receipts { channel, .. } | ClientFrame::Typing { channel, .. } => check_channel(channel),
            ClientFrame::ListChannels { .. }
            | ClientFrame::Heartbeat { .. }
            | ClientFrame::Logout { .. }
            | ClientFrame::Overview { .. } => Ok(()),
        }
    }
}

fn parse_id<E: serde::de::Error>(value: serde_json::Value) -> Result<u64, E> {
    match value {
        serde_json::Value::String(s) => s.parse().map_err(|_| E::custom(format!("{s:?} is not an id"))),
        serde_json::Value::Number(n) => n.as_u64().ok_or_else(|| E::custom(format!("{n} is not an id"))),
        other => Err(E::custom(format!("{other} is not an id"))),
    }
}

fn id_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    parse_id(serde_json::Value::deserialize(d)?)
}

fn opt_id_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => parse_id(v).map(Some),
    }
}

fn id_string<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&id.to_string())
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WireMessage {
    #[serde(serialize_with = "id_string")]
    pub id: u64,
    pub channel: String,
    pub from: String,
    pub from_device: String,
    pub text: String,
    pub created_at_ms: i64,
}

impl WireMessage {
    /// An upper bound of the bytes `message` takes encoded as a
    /// `WireMessage` (its strings escaped as JSON escapes them, every number
    /// at its longest), for cutting pages before they grow too big.
    pub fn encoded_len(message: &Message) -> usize {
        const FIXED: usize = 160; // keys, punctuation, id and timestamp
        FIXED
            + super::json_string_len(&message.text)
            + super::json_string_len(&message.channel)
            + super::json_string_len(&message.sender)
            + super::json_string_len(&message.sender_device)
    }
}

impl From<&Message> for WireMessage {
    fn from(m: &Message) -> Self {
        Self {
            id: m.id,
            channel: m.channel.clone(),
            from: m.sender.clone(),
            from_device: m.sender_device.clone(),
            text: m.text.clone(),
            created_at_ms: m.created_at_ms,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WireInboxEntry {
    #[serde(serialize_with = "id_string")]
    pub position: u64,
    pub message: WireMessage,
}

impl From<&InboxEntry> for WireInboxEntry {
    fn from(e: &InboxEntry) -> Self {
        Self { position: e.position, message: WireMessage::from(&e.message) }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WireGroup {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub members: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WirePresence {
    pub user: String,
    pub online: bool,
    pub last_active_ms: Option<i64>,
}

/// One user's markers in a channel (message ids; `"0"`: none yet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WireReceipt {
    pub user: String,
    #[serde(serialize_with = "id_string")]
    pub delivered_up_to: u64,
    #[serde(serialize_with = "id_string")]
    pub read_up_to: u64,
}

/// One channel of the `overview`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WireChannel {
    pub channel: String,
    /// A group's name (`null` for a direct channel: name it by the peer).
    pub name: Option<String>,
    /// The newest message (`null` for a channel without any yet).
    pub last: Option<WireMessage>,
    /// Messages from others after the read marker, counted up to
    /// [`MAX_UNREAD`]; `unread_capped` says there are more.
    pub unread: usize,
    pub unread_capped: bool,
    #[serde(serialize_with = "id_string")]
    pub delivered_up_to: u64,
    #[serde(serialize_with = "id_string")]
    pub read_up_to: u64,
}

/// Unread messages counted per channel at most (shown as "99+").
pub const MAX_UNREAD: usize = 99;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame on every connection.
    Hello {
        protocol: u32,
        user: String,
        device: String,
        heartbeat_seconds: u32,
        max_message_chars: usize,
        server_time_ms: i64,
    },
    /// The message is durably stored (or was already, for a retried key).
    Ack {
        req: Option<String>,
        #[serde(serialize_with = "id_string")]
        id: u64,
        channel: String,
        created_at_ms: i64,
        /// True when this key was seen before and nothing new was stored.
        duplicate: bool,
    },
    /// A live message for this user (also the sender's other devices).
    Message {
        #[serde(serialize_with = "id_string")]
        position: u64,
        message: WireMessage,
    },
    Synced {
        req: Option<String>,
        entries: Vec<WireInboxEntry>,
        /// Send this as `after` to fetch the next page while `has_more`.
        #[serde(serialize_with = "id_string")]
        next: u64,
        /// Store this and send it as `after` next time (it may lag the last
        /// entry: see docs/protocol.md, "Sync").
        #[serde(serialize_with = "id_string")]
        cursor: u64,
        has_more: bool,
    },
    History {
        req: Option<String>,
        channel: String,
        messages: Vec<WireMessage>,
        has_more: bool,
    },
    Group {
        req: Option<String>,
        group: WireGroup,
    },
    Channels {
        req: Option<String>,
        channels: Vec<String>,
    },
    Presence {
        req: Option<String>,
        users: Vec<WirePresence>,
    },
    /// A presence change of someone the user shares a channel with.
    PresenceChanged {
        user: String,
        online: bool,
        last_active_ms: Option<i64>,
    },
    Ok {
        req: Option<String>,
    },
    Error {
        req: Option<String>,
        code: ErrorCode,
        message: String,
    },
    /// This gateway is draining: connect to `url` (or ask discovery when it
    /// is null) after a random delay of up to `within_ms`, then sync from
    /// your cursor. The server closes this connection (1001) right after.
    Reconnect {
        url: Option<String>,
        reason: String,
        within_ms: u64,
    },
    /// Live delivery may have skipped messages: sync from your cursor.
    Resync {
        reason: String,
    },
    /// A user's markers in a channel moved: the reply to `mark` (with its
    /// `req`), and live to the user's other devices and to the sender of
    /// the message they name.
    Receipt {
        #[serde(skip_serializing_if = "Option::is_none")]
        req: Option<String>,
        channel: String,
        #[serde(flatten)]
        receipt: WireReceipt,
    },
    Receipts {
        req: Option<String>,
        channel: String,
        receipts: Vec<WireReceipt>,
    },
    /// Someone in `channel` is typing (until `expires_ms` from now unless
    /// repeated), or stopped.
    Typing {
        channel: String,
        user: String,
        typing: bool,
        expires_ms: u64,
    },
    Overview {
        req: Option<String>,
        channels: Vec<WireChannel>,
    },
}

impl From<ProtocolError> for ServerFrame {
    fn from(e: ProtocolError) -> Self {
        ServerFrame::Error { req: e.req, code: e.code, message: e.message }
    }
}
