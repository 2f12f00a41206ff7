//! The send path: store, ack, then fan out.
//!
//! 1. The members are known (direct channel: from its id; group: the
//!    [`MemberCache`](super::members::MemberCache)), the sender among them.
//! 2. One durable write stores history, every member's inbox entry and the
//!    idempotency key (a retry with the same key is stored once).
//! 3. The sender gets its ack right away: nothing else is on the ack's path.
//! 4. The [`FanOut`] runs afterwards, in the sender's order (the connection
//!    runs its fan-outs one at a time): queue the frame on this gateway's
//!    connections, forward it to the gateways holding other devices, queue
//!    push jobs for members with no device anywhere (one round trip), then
//!    wait for any receiver whose outbox is backlogged. That wait is the
//!    backpressure: a sender's connection stops reading while its fan-outs
//!    are behind, so a busy group slows its senders instead of dropping
//!    readers. A receiver that does not drain by the deadline is closed
//!    (4008) and syncs when it reconnects.
//!
//! If storage fails nothing is acknowledged; a lost forward or push job
//! costs latency (the inbox is the source of truth), never a message.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::hub::{Delivered, Kick};
use super::members::Members;
use super::push::PushJob;
use super::{ChatService, Session, storage_error};
use crate::ids;
use crate::protocol::{ErrorCode, ProtocolError, Recipient, ServerFrame, WireMessage, direct_channel, encode_shared};
use crate::store::{Message, NewMessage, StoreError};

/// Fan-outs whose push jobs may wait for presence to settle at once.
const MAX_DEFERRED: usize = 10_000;

/// How often held push jobs ask again whether presence is known.
const DEFERRED_RECHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// What is left to do for a stored and acknowledged message.
pub struct FanOut {
    message: Message,
    position: u64,
    members: Members,
    /// When the send arrived, for the delivery latency metric.
    received: Instant,
    /// A retry of a stored send: whether the first attempt's fan-out ran is
    /// unknown (its gateway may have died right after storing), so the
    /// members are told to resync instead.
    pub(super) duplicate: bool,
}

/// A write given up at the deadline was abandoned, not cancelled: the store
/// may still complete it, so the client is not told that nothing was stored.
fn abandoned_write(deadline: std::time::Duration) -> ProtocolError {
    crate::warn_throttled!(deadline_ms = deadline.as_millis() as u64, "a store write passed its deadline");
    ProtocolError::new(
        ErrorCode::StorageUnavailable,
        format!(
            "the write did not finish within {deadline:?} and may have been stored: retry with the same key \
             (a stored message is then acked as a duplicate)"
        ),
    )
}

impl ChatService {
    /// Stores a message and returns its ack and the fan-out still owed.
    pub(super) async fn send(
        &self,
        session: &Session,
        req: Option<String>,
        to: Recipient,
        text: String,
        key: String,
    ) -> Result<(ServerFrame, Option<FanOut>), ProtocolError> {
        let received = Instant::now();
        let channel = match to {
            Recipient::User(peer) if peer == session.user => {
                return Err(ProtocolError::new(ErrorCode::InvalidArgument, "cannot send a direct message to yourself"));
            }
            Recipient::User(peer) => direct_channel(&session.user, &peer),
            Recipient::Group(group) => group,
        };
        let members = self.channel_members(&session.user, &channel).await?;
        self.check_may_mint_ids()?;

        // A slot among the writes the store keeps up with, or a quick refusal.
        let permit = match &self.admission {
            Some(admission) => match admission.acquire().await {
                Some(permit) => Some(permit),
                None => {
                    self.metrics.acks.with_label_values(&[ErrorCode::Overloaded.as_str()]).inc();
                    return Err(ProtocolError::new(
                        ErrorCode::Overloaded,
                        "the store is behind: nothing was stored; retry with the same key after a short backoff",
                    ));
                }
            },
            None => None,
        };
        let stored = tokio::time::timeout(
            self.config.write_deadline,
            self.store_message(session, &channel, &members, key, text),
        )
        .await;
        if let Some(permit) = permit {
            permit.done();
        }
        let (message, position, duplicate) = match stored {
            Ok(Ok(stored)) => stored,
            Ok(Err(e)) => {
                let refused = storage_error(e);
                self.metrics.acks.with_label_values(&[refused.code.as_str()]).inc();
                return Err(refused);
            }
            Err(_) => {
                self.metrics.acks.with_label_values(&[ErrorCode::StorageUnavailable.as_str()]).inc();
                return Err(abandoned_write(self.config.write_deadline));
            }
        };
        self.metrics.acks.with_label_values(&[if duplicate { "duplicate" } else { "ok" }]).inc();
        let ack = ServerFrame::Ack { req, id: message.id, channel, created_at_ms: message.created_at_ms, duplicate };
        if !duplicate {
            self.metrics.messages_stored.inc();
        }
        Ok((ack, Some(FanOut { message, position, members, received, duplicate })))
    }

    /// Stores the message (history, inboxes, idempotency key in one write).
    /// Returns the message, its inbox position and whether the key had
    /// already been stored.
    async fn store_message(
        &self,
        session: &Session,
        channel: &str,
        members: &Members,
        key: String,
        text: String,
    ) -> Result<(Message, u64, bool), StoreError> {
        let started = Instant::now();
        let id = self.ids.next_id();
        let link_channel = crate::protocol::direct_members(channel).is_some() && !self.known_direct.contains(channel);
        let message = Message {
            id,
            channel: channel.to_string(),
            sender: session.user.clone(),
            sender_device: session.device.clone(),
            text,
            // The id's own time: a retried send keeps its original timestamp.
            created_at_ms: ids::timestamp_ms(id),
        };
        let new =
            NewMessage { message, key, recipients: Arc::clone(members), position: self.ids.next_id(), link_channel };
        let stored = self.store.store_message(new).await?;
        // Only once written: a failed write must be retried next time.
        if link_channel {
            self.known_direct.insert(channel);
        }
        self.metrics.store_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.store_requests_per_send.observe(f64::from(stored.cost.requests));
        self.metrics.store_round_trips_per_send.observe(f64::from(stored.cost.round_trips));
        Ok((stored.message, stored.position, stored.duplicate))
    }

    async fn enqueue_push(&self, jobs: Vec<PushJob>) {
        if jobs.is_empty() {
            return;
        }
        match self.push.enqueue(&jobs).await {
            Ok(()) => self.metrics.push_jobs.inc_by(jobs.len() as u64),
            // The message is stored and will sync; only the notifications are lost.
            Err(e) => crate::warn_throttled!(jobs = jobs.len(), error = %e, "could not enqueue push jobs"),
        }
    }

    /// Presence is uncertain (Redis lost its data and gateways are still
    /// re-registering their sessions, or routing failed): a recipient without
    /// a session may be connected. The jobs wait until it is certain (the broker answers
    /// presence only once every live gateway has registered its sessions
    /// again), then go only to those still offline. Bounded: past
    /// [`MAX_DEFERRED`] waiting, or when presence stays unknown for twice the
    /// offline timeout, jobs go at once (a duplicate notification beats a
    /// lost one).
    fn defer_push(&self, jobs: Vec<PushJob>, wait: std::time::Duration) {
        if jobs.is_empty() {
            return;
        }
        let Some(service) = self.this.upgrade() else { return };
        if self.deferred_pushes.fetch_add(1, Ordering::Relaxed) >= MAX_DEFERRED {
            self.deferred_pushes.fetch_sub(1, Ordering::Relaxed);
            tokio::spawn(async move { service.enqueue_push(jobs).await });
            return;
        }
        self.metrics.push_deferred.inc_by(jobs.len() as u64);
        self.metrics.push_deferred_waiting.inc();
        tokio::spawn(async move {
            let give_up = tokio::time::Instant::now() + wait + service.config.offline_after * 2;
            tokio::time::sleep(wait).await;
            let users: Vec<String> = jobs.iter().map(|job| job.user.clone()).collect();
            let jobs = loop {
                match service.broker.online(&users).await {
                    Ok(online) => break jobs.into_iter().filter(|job| !online.contains(&job.user)).collect(),
                    // Unknown for this long: notify rather than stay silent.
                    Err(e) if tokio::time::Instant::now() >= give_up => {
                        tracing::warn!(jobs = jobs.len(), error = %e, "presence still unknown; held push jobs sent to all");
                        break jobs;
                    }
                    // A gateway is still re-registering its sessions (or Redis
                    // is out of reach): ask again shortly.
                    Err(_) => tokio::time::sleep(DEFERRED_RECHECK).await,
                }
            };
            service.enqueue_push(jobs).await;
            service.deferred_pushes.fetch_sub(1, Ordering::Relaxed);
            service.metrics.push_deferred_waiting.dec();
        });
    }

    /// Delivers a stored message live and queues its push jobs (see the
    /// module docs); returns once no receiver here is backlogged by it.
    pub async fn fan_out(&self, session: &Session, job: FanOut) {
        let FanOut { message, position, members, received, duplicate } = job;
        if duplicate {
            let frame = encode_shared(&ServerFrame::Resync {
                reason: "a retried message may not have been delivered".to_string(),
            });
            for member in members.iter() {
                self.hub.deliver(member, &frame, Some(session.connection));
            }
            self.broker.resync_elsewhere(&members);
            return;
        }
        let frame = encode_shared(&ServerFrame::Message { position, message: WireMessage::from(&message) });

        let mut local = Delivered::default();
        for member in members.iter() {
            self.hub.deliver_into(member, &frame, Some(session.connection), &mut local);
        }
        if local.queued > 0 {
            self.metrics.delivery_local.observe(received.elapsed().as_secs_f64());
        }

        match self.broker.route(&members, &frame).await {
            Ok(routed) => {
                self.metrics.delivery_forwarded.observe(received.elapsed().as_secs_f64());
                let jobs: Vec<PushJob> = members
                    .iter()
                    .filter(|m| **m != session.user && routed.offline.contains(*m))
                    .map(|m| super::push::job_for(m, &message, self.config.push_summary_chars))
                    .collect();
                match routed.unsettled_for {
                    None => self.enqueue_push(jobs).await,
                    Some(wait) => self.defer_push(jobs, wait),
                }
            }
            Err(e) => {
                // Stored and acked: the broker sends the recipients a resync
                // once Redis answers again. Who is offline is unknown, so
                // their notifications wait for presence to answer, as after
                // a Redis loss (they were dropped: an offline recipient
                // heard nothing until it next connected).
                self.metrics.forward_failures.inc();
                crate::warn_throttled!(error = %e, "live forwarding to other gateways failed; recipients will be told to resync");
                let jobs: Vec<PushJob> = members
                    .iter()
                    .filter(|m| **m != session.user)
                    .map(|m| super::push::job_for(m, &message, self.config.push_summary_chars))
                    .collect();
                self.defer_push(jobs, std::time::Duration::ZERO);
            }
        }

        if !local.backlogged.is_empty() {
            let deadline = tokio::time::Instant::now() + self.config.stall_timeout;
            let waits = local.backlogged.iter().map(|outbox| async move {
                if !outbox.drained(deadline).await {
                    outbox.kick(Kick::SlowConsumer);
                }
            });
            futures::future::join_all(waits).await;
            self.metrics.backpressure_waits.inc();
        }
    }
}
