//! The connections of this gateway, by user and device: where live
//! messages go.
//!
//! Each connection drains an [`Outbox`]. Past its soft limit an outbox
//! still accepts frames but tells the producer to slow down: the fan-out of
//! a send then waits for it to drain (so a busy group slows its senders
//! instead of dropping its readers). A connection is closed as too slow
//! only when it stops draining: its outbox reaches the hard limit, or stays
//! over the soft limit for longer than a producer's deadline. It then
//! resyncs from its cursor after reconnecting, so nothing is lost.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use dashmap::DashMap;
use futures::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::time::Instant;

/// What a connection's outbox holds: an encoded frame shared by every
/// connection it goes to.
pub type Outbound = crate::protocol::EncodedFrame;

/// Why a connection was closed by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kick {
    SlowConsumer,
    LoggedOut,
    /// The gateway is shutting down.
    GoingAway,
    /// The gateway is draining: after its farewell (`reconnect`) frame and
    /// the reply to a request in flight, the connection closes.
    Reconnect,
}

/// How many frames an outbox holds before it pushes back, and before its
/// connection counts as stalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboxLimits {
    pub soft: usize,
    pub hard: usize,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self { soft: 256, hard: 1024 }
    }
}

/// What queueing a frame on one connection did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued, below the soft limit.
    Queued,
    /// Queued, over the soft limit: the producer should wait for
    /// [`Outbox::drained`] before queueing more.
    Backlogged,
    /// Not queued: the connection is closing (or was just closed for
    /// reaching the hard limit).
    Dropped,
}

#[derive(Default)]
struct OutboxState {
    /// Empty outboxes hold no allocation: most connections are idle.
    frames: VecDeque<Outbound>,
    kick: Option<Kick>,
    closed: bool,
}

/// One connection's queue of frames to write. Producers are the fan-outs of
/// sends (and forwards from other gateways); the consumer is the connection.
pub struct Outbox {
    state: Mutex<OutboxState>,
    /// Wakes the connection, the one consumer: frames were queued, or it
    /// was kicked. (A waker, not a `Notify`: waiting costs the connection
    /// no future of its own.)
    wake: AtomicWaker,
    /// Wakes producers waiting for the outbox to drain below its soft limit.
    drained: Notify,
    limits: OutboxLimits,
}

impl Outbox {
    pub fn new(limits: OutboxLimits) -> Self {
        Self { state: Mutex::default(), wake: AtomicWaker::new(), drained: Notify::new(), limits }
    }

    fn state(&self) -> MutexGuard<'_, OutboxState> {
        // A panic while holding this lock cannot leave the queue inconsistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `frame` for the connection.
    pub fn push(&self, frame: &Outbound) -> Pushed {
        let mut state = self.state();
        if state.closed || state.kick.is_some() {
            return Pushed::Dropped;
        }
        if state.frames.len() >= self.limits.hard {
            state.kick = Some(Kick::SlowConsumer);
            state.frames = VecDeque::new();
            drop(state);
            self.wake.wake();
            self.drained.notify_waiters();
            return Pushed::Dropped;
        }
        state.frames.push_back(frame.clone());
        let backlogged = state.frames.len() > self.limits.soft;
        let first = state.frames.len() == 1;
        drop(state);
        if first {
            self.wake.wake();
        }
        if backlogged { Pushed::Backlogged } else { Pushed::Queued }
    }

    /// Closes the connection with `why` (the first reason wins: a
    /// connection already sent away keeps its farewell frame).
    pub fn kick(&self, why: Kick) {
        let mut state = self.state();
        if state.kick.is_some() {
            return;
        }
        state.kick = Some(why);
        state.frames = VecDeque::new();
        drop(state);
        self.wake.wake();
        self.drained.notify_waiters();
    }

    /// Queues `frame` as the last one and closes the connection with `why`
    /// once it is written (other queued frames are dropped: the client
    /// syncs where it goes).
    pub fn farewell(&self, frame: &Outbound, why: Kick) {
        let mut state = self.state();
        if state.closed || state.kick.is_some() {
            return;
        }
        state.kick = Some(why);
        state.frames = VecDeque::from([frame.clone()]);
        drop(state);
        self.wake.wake();
        self.drained.notify_waiters();
    }

    /// Kicked or closed: the connection is on its way out.
    pub fn is_closing(&self) -> bool {
        let state = self.state();
        state.closed || state.kick.is_some()
    }

    /// Closing, and its last frames (a farewell) taken by the connection
    /// for writing, or closed already.
    pub fn farewell_taken(&self) -> bool {
        let state = self.state();
        state.closed || (state.kick.is_some() && state.frames.is_empty())
    }

    /// Waits until the outbox is at most at its soft limit (or closing).
    /// False when `deadline` passed first: the connection is not reading.
    pub async fn drained(&self, deadline: Instant) -> bool {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            // Registered before the check, so a drain right after it is not missed.
            notified.as_mut().enable();
            {
                let state = self.state();
                if state.closed || state.kick.is_some() || state.frames.len() <= self.limits.soft {
                    return true;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Ready when there is something for the connection: frames or a kick.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Registered before the check, so a push right after it wakes the task.
        self.wake.register(cx.waker());
        let state = self.state();
        if !state.frames.is_empty() || state.kick.is_some() { Poll::Ready(()) } else { Poll::Pending }
    }

    /// Ready with the kick once the connection is to close (a write in
    /// progress is then abandoned: a client that stopped reading would hold
    /// it for the whole write timeout).
    pub fn poll_kicked(&self, cx: &mut Context<'_>) -> Poll<Kick> {
        self.wake.register(cx.waker());
        match self.state().kick {
            Some(kick) => Poll::Ready(kick),
            None => Poll::Pending,
        }
    }

    /// Waits until there is something for the connection: frames or a kick.
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await;
    }

    /// Moves up to `max` queued frames into `into`; returns the kick, if
    /// the connection must close (after writing its farewell frame, if any).
    pub fn take(&self, into: &mut Vec<Outbound>, max: usize) -> Option<Kick> {
        let mut state = self.state();
        if let Some(kick) = state.kick {
            into.extend(state.frames.drain(..));
            return Some(kick);
        }
        let was_backlogged = state.frames.len() > self.limits.soft;
        let n = state.frames.len().min(max);
        into.extend(state.frames.drain(..n));
        if state.frames.is_empty() && state.frames.capacity() > 64 {
            // Give back what a burst grew; an idle connection holds nothing.
            state.frames = VecDeque::new();
        }
        let drained = was_backlogged && state.frames.len() <= self.limits.soft;
        drop(state);
        if drained {
            self.drained.notify_waiters();
        }
        None
    }

    pub fn kick_reason(&self) -> Option<Kick> {
        self.state().kick
    }

    fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        state.frames = VecDeque::new();
        drop(state);
        self.drained.notify_waiters();
    }
}

#[derive(Clone)]
struct Device {
    device: Arc<str>,
    connection: u64,
    outbox: Arc<Outbox>,
}

/// Names are shared (`Arc<str>`) between the map, the registration and the
/// presence tracker: one copy per connection, not one per holder.
#[derive(Default)]
pub struct Hub {
    users: DashMap<Arc<str>, Vec<Device>>,
    next_connection: AtomicU64,
}

/// A registered connection; unregisters itself when dropped.
pub struct Registration {
    hub: Arc<Hub>,
    pub user: Arc<str>,
    pub device: Arc<str>,
    pub connection: u64,
    pub outbox: Arc<Outbox>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.outbox.close();
        self.hub.unregister(&self.user, self.connection);
    }
}

/// What one delivery did, and the outboxes the producer should wait for.
#[derive(Default)]
pub struct Delivered {
    /// Connections the frame was queued on.
    pub queued: usize,
    /// Connections closed because their outbox was full.
    pub overflowed: usize,
    /// Outboxes over their soft limit.
    pub backlogged: Vec<Arc<Outbox>>,
}

impl Delivered {
    fn add(&mut self, outbox: &Arc<Outbox>, pushed: Pushed) {
        match pushed {
            Pushed::Queued => self.queued += 1,
            Pushed::Backlogged => {
                self.queued += 1;
                self.backlogged.push(Arc::clone(outbox));
            }
            Pushed::Dropped => {
                if outbox.kick_reason() == Some(Kick::SlowConsumer) {
                    self.overflowed += 1;
                }
            }
        }
    }
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn register(self: &Arc<Self>, user: &str, device: &str, limits: OutboxLimits) -> Registration {
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let outbox = Arc::new(Outbox::new(limits));
        let device: Arc<str> = Arc::from(device);
        let entry = Device { device: Arc::clone(&device), connection, outbox: Arc::clone(&outbox) };
        // Most users have one device here: room for one, not the four a first push reserves.
        let mut devices = self.users.entry(Arc::from(user)).or_insert_with(|| Vec::with_capacity(1));
        devices.push(entry);
        let user = Arc::clone(devices.key());
        drop(devices);
        Registration { hub: self.clone(), user, device, connection, outbox }
    }

    fn unregister(&self, user: &Arc<str>, connection: u64) {
        if let dashmap::Entry::Occupied(mut devices) = self.users.entry(Arc::clone(user)) {
            devices.get_mut().retain(|d| d.connection != connection);
            if devices.get().is_empty() {
                devices.remove();
            }
        }
    }

    /// Queues `frame` on every connection of `user` except `skip`, adding
    /// the outcome to `delivered`.
    pub fn deliver_into(&self, user: &str, frame: &Outbound, skip: Option<u64>, delivered: &mut Delivered) {
        if let Some(devices) = self.users.get(user) {
            for device in devices.iter().filter(|d| Some(d.connection) != skip) {
                delivered.add(&device.outbox, device.outbox.push(frame));
            }
        }
    }

    /// Queues `frame` on every connection of `user` except `skip`.
    pub fn deliver(&self, user: &str, frame: &Outbound, skip: Option<u64>) -> Delivered {
        let mut delivered = Delivered::default();
        self.deliver_into(user, frame, skip, &mut delivered);
        delivered
    }

    /// Queues `frame` on every connection here (a `resync` after live
    /// delivery was interrupted).
    pub fn broadcast(&self, frame: &Outbound) -> Delivered {
        let mut delivered = Delivered::default();
        // Delivering from inside the iteration: a second lookup of the same
        // shard while iterating could wait behind a writer.
        for devices in self.users.iter() {
            for device in devices.iter() {
                delivered.add(&device.outbox, device.outbox.push(frame));
            }
        }
        delivered
    }

    /// Every connection here, by id (what a `resync` for everyone queues).
    pub fn connections(&self) -> Vec<(u64, Arc<Outbox>)> {
        self.users
            .iter()
            .flat_map(|devices| devices.iter().map(|d| (d.connection, Arc::clone(&d.outbox))).collect::<Vec<_>>())
            .collect()
    }

    /// The connections of `users` here, by id.
    pub fn connections_of(&self, users: &[String]) -> Vec<(u64, Arc<Outbox>)> {
        let mut found = Vec::new();
        for user in users {
            if let Some(devices) = self.users.get(user.as_str()) {
                found.extend(devices.iter().map(|d| (d.connection, Arc::clone(&d.outbox))));
            }
        }
        found
    }

    /// Closes the connections of one device of `user` (its logout).
    pub fn kick_device(&self, user: &str, device: &str, why: Kick) {
        if let Some(devices) = self.users.get(user) {
            devices.iter().filter(|d| *d.device == *device).for_each(|d| d.outbox.kick(why));
        }
    }

    /// Closes every connection here (the gateway is shutting down).
    pub fn kick_all(&self, why: Kick) {
        for devices in self.users.iter() {
            devices.iter().for_each(|d| d.outbox.kick(why));
        }
    }

    /// The outbox of every connection here (what a drain works through).
    pub fn outboxes(&self) -> Vec<Arc<Outbox>> {
        self.users
            .iter()
            .flat_map(|devices| devices.iter().map(|d| Arc::clone(&d.outbox)).collect::<Vec<_>>())
            .collect()
    }

    /// Open connections here.
    pub fn connection_count(&self) -> usize {
        self.users.iter().map(|d| d.len()).sum()
    }

    // Presence is the broker's job; this only lets tests look inside.
    #[cfg(test)]
    fn devices(&self, user: &str) -> Vec<String> {
        self.users.get(user).map(|d| d.iter().map(|d| d.device.to_string()).collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SMALL: OutboxLimits = OutboxLimits { soft: 2, hard: 4 };

    fn take_all(outbox: &Outbox) -> Vec<String> {
        let mut frames = Vec::new();
        assert_eq!(outbox.take(&mut frames, usize::MAX), None);
        frames.iter().map(|f| f.to_string()).collect()
    }

    #[tokio::test]
    async fn delivers_to_every_device_but_the_sender() {
        let hub = Hub::new();
        let phone = hub.register("alice", "phone", SMALL);
        let laptop = hub.register("alice", "laptop", SMALL);
        let frame = Outbound::from_static("hi");
        assert_eq!(hub.deliver("alice", &frame, Some(phone.connection)).queued, 1);
        laptop.outbox.ready().await;
        assert_eq!(take_all(&laptop.outbox), vec!["hi"]);
        assert!(take_all(&phone.outbox).is_empty());
        assert_eq!(hub.devices("alice").len(), 2);
    }

    #[tokio::test]
    async fn past_the_soft_limit_the_producer_is_told_to_wait() {
        let hub = Hub::new();
        let bob = hub.register("bob", "phone", SMALL);
        let frame = Outbound::from_static("x");
        let outcomes: Vec<usize> = (0..3).map(|_| hub.deliver("bob", &frame, None).backlogged.len()).collect();
        assert_eq!(outcomes, vec![0, 0, 1], "the third frame is over the soft limit of 2");

        let deadline = Instant::now() + Duration::from_secs(5);
        let waiter = {
            let outbox = Arc::clone(&bob.outbox);
            tokio::spawn(async move { outbox.drained(deadline).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(take_all(&bob.outbox).len(), 3);
        assert!(waiter.await.expect("join"), "draining wakes the producer");
        assert_eq!(bob.outbox.kick_reason(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_does_not_drain_is_reported_by_the_deadline() {
        let hub = Hub::new();
        let bob = hub.register("bob", "phone", SMALL);
        let frame = Outbound::from_static("x");
        for _ in 0..3 {
            hub.deliver("bob", &frame, None);
        }
        assert!(!bob.outbox.drained(Instant::now() + Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn reaching_the_hard_limit_kicks_the_connection() {
        let hub = Hub::new();
        let bob = hub.register("bob", "phone", SMALL);
        let frame = Outbound::from_static("x");
        for _ in 0..4 {
            assert_eq!(hub.deliver("bob", &frame, None).overflowed, 0);
        }
        assert_eq!(hub.deliver("bob", &frame, None).overflowed, 1);
        bob.outbox.ready().await;
        assert_eq!(bob.outbox.take(&mut Vec::new(), 10), Some(Kick::SlowConsumer));
        assert_eq!(hub.deliver("bob", &frame, None).queued, 0, "a kicked connection gets nothing more");
    }

    #[tokio::test]
    async fn logout_kicks_only_that_device() {
        let hub = Hub::new();
        let phone = hub.register("carol", "phone", SMALL);
        let web = hub.register("carol", "web", SMALL);
        hub.kick_device("carol", "phone", Kick::LoggedOut);
        assert_eq!(phone.outbox.kick_reason(), Some(Kick::LoggedOut));
        assert_eq!(web.outbox.kick_reason(), None);
    }

    #[test]
    fn kick_all_closes_every_connection() {
        let hub = Hub::new();
        let (a, b) = (hub.register("carol", "phone", SMALL), hub.register("dave", "web", SMALL));
        hub.kick_all(Kick::GoingAway);
        assert_eq!(a.outbox.kick_reason(), Some(Kick::GoingAway));
        assert_eq!(b.outbox.kick_reason(), Some(Kick::GoingAway));
    }

    #[test]
    fn dropping_the_registration_unregisters() {
        let hub = Hub::new();
        let registration = hub.register("carol", "web", SMALL);
        let outbox = Arc::clone(&registration.outbox);
        assert_eq!(hub.connection_count(), 1);
        drop(registration);
        assert_eq!(hub.connection_count(), 0);
        assert_eq!(outbox.push(&Outbound::from_static("late")), Pushed::Dropped);
    }
}
