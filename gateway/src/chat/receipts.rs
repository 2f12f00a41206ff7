//! Read receipts, typing indicators and the channel overview: what a chat
//! client shows beside the messages.
//!
//! - Markers ("up to" receipts, as Matrix's `m.read` and XEP-0333's chat
//!   markers): one row per user per channel ([`Markers`]), only moving
//!   forward. A move is sent to the user's other devices (their unread
//!   counts) and to whoever sent the message it names: in a direct channel
//!   that is the peer; in a group only that sender is told, and the other
//!   members' state is asked for with `receipts` when someone opens it.
//! - Typing: relayed to the other members online, through the broker like
//!   any live frame; never stored; not relayed in groups larger than the
//!   presence fan-out (`presenceFanoutMaxMembers`). The connection rate-limits
//!   it (`transport::connection`).
//! - Overview: every channel with its last message and unread count, which
//!   derives from the read marker (no counters: they are not idempotent).

use futures::{StreamExt, TryStreamExt, stream};

use super::{ChatService, Session, storage_error};
use crate::protocol::frames::{MAX_UNREAD, TYPING_TTL_MS};
use crate::protocol::{
    ErrorCode, ProtocolError, ServerFrame, WireChannel, WireMessage, WireReceipt, encode_shared, is_group_channel,
};
use crate::store::{Markers, Page};

/// Channels whose overview rows are read at once.
const OVERVIEW_CONCURRENCY: usize = 16;

impl ChatService {
    /// Moves the session user's markers in `channel` forward to messages of
    /// that channel; a marker behind the stored one changes nothing (the
    /// reply carries the markers as they stand).
    pub(super) async fn mark(
        &self,
        session: &Session,
        req: Option<String>,
        channel: String,
        delivered_up_to: Option<u64>,
        read_up_to: Option<u64>,
    ) -> Result<ServerFrame, ProtocolError> {
        self.channel_members(&session.user, &channel).await?;
        let named: Vec<u64> = [delivered_up_to, read_up_to].into_iter().flatten().collect();
        let lookups = named.iter().map(|id| self.store.message(&channel, *id));
        let (messages, stored) = futures::join!(
            futures::future::try_join_all(lookups),
            self.store.channel_markers(&channel, std::slice::from_ref(&session.user))
        );
        let mut senders = Vec::new();
        for (id, message) in named.iter().zip(messages.map_err(storage_error)?) {
            let message = message.ok_or_else(|| {
                ProtocolError::new(ErrorCode::InvalidArgument, format!("{channel} has no message {id}"))
            })?;
            if message.sender != session.user && !senders.contains(&message.sender) {
                senders.push(message.sender);
            }
        }
        let stored = stored.map_err(storage_error)?.first().copied().unwrap_or_default();
        let asked = Markers { delivered_up_to: delivered_up_to.unwrap_or(0), read_up_to: read_up_to.unwrap_or(0) };
        let moved = stored.merge(asked);
        if moved != stored {
            self.store.advance_markers(&session.user, &channel, asked).await.map_err(storage_error)?;
            self.metrics.markers_moved.inc();
            self.announce_receipt(session, &channel, moved, senders).await;
        }
        let receipt = WireReceipt {
            user: session.user.clone(),
            delivered_up_to: moved.delivered_up_to,
            read_up_to: moved.read_up_to,
        };
        Ok(ServerFrame::Receipt { req, channel, receipt })
    }

    /// Tells the user's other devices and `senders` (wherever they are
    /// connected) that the user's markers in `channel` are now `markers`.
    async fn announce_receipt(&self, session: &Session, channel: &str, markers: Markers, mut to: Vec<String>) {
        let frame = encode_shared(&ServerFrame::Receipt {
            req: None,
            channel: channel.to_string(),
            receipt: WireReceipt {
                user: session.user.clone(),
                delivered_up_to: markers.delivered_up_to,
                read_up_to: markers.read_up_to,
            },
        });
        self.hub.deliver(&session.user, &frame, Some(session.connection));
        for sender in &to {
            self.hub.deliver(sender, &frame, None);
        }
        to.push(session.user.clone());
        if let Err(e) = self.broker.route(&to, &frame).await {
            self.metrics.forward_failures.inc();
            crate::warn_throttled!(channel, error = %e, "receipt not forwarded to other gateways");
        }
    }

    /// Every member's markers in `channel`, for a member of it.
    pub(super) async fn receipts(
        &self,
        session: &Session,
        req: Option<String>,
        channel: String,
    ) -> Result<ServerFrame, ProtocolError> {
        let members = self.channel_members(&session.user, &channel).await?;
        let markers = self.store.channel_markers(&channel, &members).await.map_err(storage_error)?;
        let receipts = members
            .iter()
            .zip(markers)
            .map(|(user, m)| WireReceipt {
                user: user.clone(),
                delivered_up_to: m.delivered_up_to,
                read_up_to: m.read_up_to,
            })
            .collect();
        Ok(ServerFrame::Receipts { req, channel, receipts })
    }

    /// Relays that the session user is typing in `channel` (or stopped) to
    /// the other members online; nothing is stored and nothing answered.
    pub(super) async fn typing(&self, session: &Session, channel: &str, typing: bool) -> Result<(), ProtocolError> {
        let members = self.channel_members(&session.user, channel).await?;
        if members.len() > self.config.presence_fanout_max_members {
            return Ok(());
        }
        let others: Vec<String> = members.iter().filter(|m| **m != session.user).cloned().collect();
        let frame = encode_shared(&ServerFrame::Typing {
            channel: channel.to_string(),
            user: session.user.clone(),
            typing,
            expires_ms: TYPING_TTL_MS,
        });
        self.metrics.typing_relayed.inc();
        for user in &others {
            self.hub.deliver(user, &frame, None);
        }
        if let Err(e) = self.broker.route(&others, &frame).await {
            self.metrics.forward_failures.inc();
            crate::warn_throttled!(channel, error = %e, "typing not forwarded to other gateways");
        }
        Ok(())
    }

    /// The session user's channels, newest message first, each with its
    /// last message, unread count and markers.
    pub(super) async fn overview(&self, session: &Session, req: Option<String>) -> Result<ServerFrame, ProtocolError> {
        let user = session.user.as_str();
        let (channels, markers) = futures::join!(self.store.channels_of(user), self.store.markers_of(user));
        let (channels, markers) = (channels.map_err(storage_error)?, markers.map_err(storage_error)?);
        let rows = channels.into_iter().map(|channel| {
            let markers = markers.get(&channel).copied().unwrap_or_default();
            self.overview_row(user, channel, markers)
        });
        let mut channels: Vec<WireChannel> =
            stream::iter(rows).buffer_unordered(OVERVIEW_CONCURRENCY).try_collect().await.map_err(storage_error)?;
        channels.sort_by(|a, b| {
            let last = |c: &WireChannel| c.last.as_ref().map_or(0, |m| m.id);
            last(b).cmp(&last(a)).then_with(|| a.channel.cmp(&b.channel))
        });
        Ok(ServerFrame::Overview { req, channels })
    }

    async fn overview_row(
        &self,
        user: &str,
        channel: String,
        markers: Markers,
    ) -> Result<WireChannel, crate::store::StoreError> {
        let name = async {
            if is_group_channel(&channel) { Ok(self.store.group(&channel).await?.map(|g| g.name)) } else { Ok(None) }
        };
        let (name, last) = futures::join!(name, self.store.history(&channel, Page::Latest, 1));
        let last = last?.into_iter().next();
        let (unread, unread_capped) = match &last {
            Some(last) if last.id > markers.read_up_to => {
                let after = self.store.history(&channel, Page::After(markers.read_up_to), MAX_UNREAD + 1).await?;
                let capped = after.len() > MAX_UNREAD;
                (after.iter().take(MAX_UNREAD).filter(|m| m.sender != user).count(), capped)
            }
            _ => (0, false),
        };
        Ok(WireChannel {
            name: name?,
            last: last.as_ref().map(WireMessage::from),
            unread,
            unread_capped,
            delivered_up_to: markers.delivered_up_to,
            read_up_to: markers.read_up_to,
            channel,
        })
    }
}
