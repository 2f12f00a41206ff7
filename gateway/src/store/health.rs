//! Whether the store answers, as the gateway sees it: every operation's
//! outcome counts, while it is down a probe asks every 200 ms (recovery is
//! reported within a fraction of a second of the store's return), and while
//! it is up but idle a probe asks every [`IDLE_PROBE`] (an outage is
//! reported even when no client is sending). Exposed on `/readyz`, as the
//! `kubechat_gateway_store_up` metric, and to the operator.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus::IntGauge;
use tokio_util::sync::CancellationToken;

use super::{Group, InboxEntry, Markers, Message, NewMessage, Page, Store, StoreError, StoreResult, Stored};

/// How the store looked at the last operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreStatus {
    Up,
    Down {
        /// When the outage was first seen (ms since the epoch).
        since_ms: i64,
        /// The latest error.
        error: String,
    },
}

/// An up store that answered nothing for this long is asked.
pub const IDLE_PROBE: Duration = Duration::from_secs(2);

pub struct StoreHealth {
    status: Mutex<StoreStatus>,
    /// When an operation last had an outcome, as ms since `created`: an
    /// atomic, since every store operation of the send path writes it.
    last_outcome_ms: AtomicU64,
    created: Instant,
    gauge: IntGauge,
}

impl StoreHealth {
    pub fn new(gauge: IntGauge) -> Self {
        gauge.set(1);
        Self { status: Mutex::new(StoreStatus::Up), last_outcome_ms: AtomicU64::new(0), created: Instant::now(), gauge }
    }

    pub fn status(&self) -> StoreStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_up(&self) -> bool {
        self.status() == StoreStatus::Up
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_outcome_ms.load(Ordering::Relaxed));
        self.created.elapsed().saturating_sub(last)
    }

    /// Counts an operation's outcome: only "unavailable" means down (a
    /// corrupt row is a data problem, a reused key a client's: no outage).
    fn record<T>(&self, result: &StoreResult<T>) {
        let now_ms = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_outcome_ms.store(now_ms, Ordering::Relaxed);
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match (result, &mut *status) {
            (Ok(_), StoreStatus::Up) | (Err(StoreError::Corrupt(_) | StoreError::KeyReused { .. }), _) => {}
            (Ok(_), down) => {
                if let StoreStatus::Down { since_ms, .. } = down {
                    let lasted_ms = crate::ids::now_ms() - *since_ms;
                    tracing::info!(lasted_ms, "store answers again");
                }
                *down = StoreStatus::Up;
                self.gauge.set(1);
            }
            (Err(StoreError::Unavailable(e)), StoreStatus::Down { error, .. }) => error.clone_from(e),
            (Err(StoreError::Unavailable(e)), up) => {
                tracing::warn!(error = %e, "store unavailable: sends, syncs and history are refused until it answers");
                *up = StoreStatus::Down { since_ms: crate::ids::now_ms(), error: e.clone() };
                self.gauge.set(0);
            }
        }
    }
}

/// A store whose every outcome feeds a [`StoreHealth`].
pub struct CheckedStore {
    inner: Arc<dyn Store>,
    health: Arc<StoreHealth>,
}

impl CheckedStore {
    pub fn new(inner: Arc<dyn Store>, health: Arc<StoreHealth>) -> Self {
        Self { inner, health }
    }

    fn seen<T>(&self, result: StoreResult<T>) -> StoreResult<T> {
        self.health.record(&result);
        result
    }

    /// Pings the store every 200 ms while it is down, and after
    /// [`IDLE_PROBE`] without any operation while it is up.
    pub async fn probe(self: Arc<Self>, shutdown: CancellationToken) {
        const EVERY: Duration = Duration::from_millis(200);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(EVERY) => {}
            }
            if !self.health.is_up() || self.health.idle_for() >= IDLE_PROBE {
                // Long enough for a store to open a new session (ScyllaStore's ping).
                let ping = tokio::time::timeout(Duration::from_secs(5), self.inner.ping()).await;
                let result =
                    ping.unwrap_or_else(|_| Err(StoreError::Unavailable("health probe: no answer in 5 s".into())));
                self.health.record(&result);
            }
        }
    }
}

#[async_trait]
impl Store for CheckedStore {
    async fn store_message(&self, new: NewMessage) -> StoreResult<Stored> {
        self.seen(self.inner.store_message(new).await)
    }
    async fn inbox_after(&self, user: &str, after: u64, limit: usize) -> StoreResult<Vec<InboxEntry>> {
        self.seen(self.inner.inbox_after(user, after, limit).await)
    }
    async fn history(&self, channel: &str, page: Page, limit: usize) -> StoreResult<Vec<Message>> {
        self.seen(self.inner.history(channel, page, limit).await)
    }
    async fn message(&self, channel: &str, id: u64) -> StoreResult<Option<Message>> {
        self.seen(self.inner.message(channel, id).await)
    }
    async fn create_group(&self, group: &Group, members: &[String]) -> StoreResult<()> {
        self.seen(self.inner.create_group(group, members).await)
    }
    async fn group(&self, id: &str) -> StoreResult<Option<Group>> {
        self.seen(self.inner.group(id).await)
    }
    async fn add_member(&self, group: &str, user: &str) -> StoreResult<()> {
        self.seen(self.inner.add_member(group, user).await)
    }
    async fn remove_member(&self, group: &str, user: &str) -> StoreResult<()> {
        self.seen(self.inner.remove_member(group, user).await)
    }
    async fn join(&self, group: &str, user: &str, max: usize) -> StoreResult<super::Join> {
        self.seen(self.inner.join(group, user, max).await)
    }
    async fn set_owner(&self, group: &str, owner: &str) -> StoreResult<()> {
        self.seen(self.inner.set_owner(group, owner).await)
    }
    async fn members(&self, group: &str) -> StoreResult<Vec<String>> {
        self.seen(self.inner.members(group).await)
    }
    async fn members_of(&self, groups: &[String]) -> StoreResult<std::collections::HashMap<String, Vec<String>>> {
        self.seen(self.inner.members_of(groups).await)
    }
    async fn channels_of(&self, user: &str) -> StoreResult<Vec<String>> {
        self.seen(self.inner.channels_of(user).await)
    }
    async fn advance_markers(&self, user: &str, channel: &str, markers: Markers) -> StoreResult<()> {
        self.seen(self.inner.advance_markers(user, channel, markers).await)
    }
    async fn markers_of(&self, user: &str) -> StoreResult<std::collections::HashMap<String, Markers>> {
        self.seen(self.inner.markers_of(user).await)
    }
    async fn channel_markers(&self, channel: &str, users: &[String]) -> StoreResult<Vec<Markers>> {
        self.seen(self.inner.channel_markers(channel, users).await)
    }
    async fn ping(&self) -> StoreResult<()> {
        self.seen(self.inner.ping().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_means_down_until_anything_succeeds() {
        let health = StoreHealth::new(IntGauge::new("store_up", "test").expect("gauge"));
        assert!(health.is_up());
        health.record::<()>(&Err(StoreError::Corrupt("bad row".into())));
        assert!(health.is_up(), "a corrupt row is not an outage");
        health.record::<()>(&Err(StoreError::Unavailable("timeout".into())));
        let StoreStatus::Down { since_ms, error } = health.status() else { panic!("down") };
        assert_eq!(error, "timeout");
        assert_eq!(health.gauge.get(), 0);
        health.record::<()>(&Err(StoreError::Unavailable("refused".into())));
        assert_eq!(health.status(), StoreStatus::Down { since_ms, error: "refused".into() }, "keeps when it began");
        health.record(&Ok(()));
        assert!(health.is_up());
        assert_eq!(health.gauge.get(), 1);
    }
}
