//! Spreading `resync` frames over a bounded window.
//!
//! After a Redis blip every gateway re-registers its sessions and tells
//! every connection to resync: all its clients would then ask the store for
//! their inbox in the same instant (a storm: with 3,000 clients over two
//! gateways, one gateway told 800 of its 1,500 clients within half a
//! second). Instead, connections owed a resync wait in one queue per
//! gateway and are told at [`RATE`] per second, faster when more wait so
//! that every one is told within [`MAX_WINDOW`] of joining the queue. A
//! connection already waiting is not queued twice: the frame it gets is
//! after every request that queued it. Nothing is lost meanwhile: live
//! messages flow as soon as sessions are registered, and the inbox a late
//! resync reads holds everything.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::hub::{Outbound, Outbox};

/// Connections told per second at least (per gateway).
pub const RATE: f64 = 300.0;
/// Every connection queued is told within this long (the rate rises with the queue).
pub const MAX_WINDOW: Duration = Duration::from_secs(10);
/// How often a batch goes out.
const TICK: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Queue {
    waiting: VecDeque<(u64, Arc<Outbox>, Outbound)>,
    /// Connections in `waiting`.
    queued: HashSet<u64>,
    /// Connections per second for the current backlog.
    rate: f64,
}

/// The queue of connections owed a `resync`, drained by [`ResyncPacer::run`].
pub struct ResyncPacer {
    queue: Mutex<Queue>,
    wake: Notify,
    pending: IntGauge,
}

impl ResyncPacer {
    pub fn new(pending: IntGauge) -> Arc<Self> {
        Arc::new(Self { queue: Mutex::default(), wake: Notify::new(), pending })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Plain data: a panic while holding it cannot leave it inconsistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `frame` for each connection (`(id, outbox)`) not already
    /// waiting; returns how many now wait and how long telling them takes.
    pub fn add(&self, connections: Vec<(u64, Arc<Outbox>)>, frame: &Outbound) -> (usize, Duration) {
        let mut queue = self.lock();
        for (id, outbox) in connections {
            if queue.queued.insert(id) {
                queue.waiting.push_back((id, outbox, frame.clone()));
            }
        }
        let waiting = queue.waiting.len();
        #[allow(clippy::cast_precision_loss, reason = "a connection count")]
        let needed = waiting as f64 / MAX_WINDOW.as_secs_f64();
        queue.rate = queue.rate.max(RATE).max(needed);
        let window = Duration::from_secs_f64(waiting as f64 / queue.rate);
        drop(queue);
        self.pending.set(i64::try_from(waiting).unwrap_or(i64::MAX));
        self.wake.notify_one();
        (waiting, window)
    }

    /// The next batch: the rate's share of one tick (at least one).
    fn batch(&self) -> Vec<(Arc<Outbox>, Outbound)> {
        let mut queue = self.lock();
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "small and positive")]
        let n = ((queue.rate * TICK.as_secs_f64()).ceil() as usize).max(1);
        let n = n.min(queue.waiting.len());
        let batch: Vec<_> = queue.waiting.drain(..n).collect();
        for (id, _, _) in &batch {
            queue.queued.remove(id);
        }
        if queue.waiting.is_empty() {
            queue.rate = RATE;
        }
        self.pending.set(i64::try_from(queue.waiting.len()).unwrap_or(i64::MAX));
        batch.into_iter().map(|(_, outbox, frame)| (outbox, frame)).collect()
    }

    /// Tells queued connections to resync, a batch per tick, until `shutdown`.
    /// A late tick delays the next batch instead of doubling it: the pace
    /// never bursts above the rate.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
            }
            loop {
                let batch = self.batch();
                if batch.is_empty() {
                    break;
                }
                for (outbox, frame) in batch {
                    // A connection closed meanwhile drops it: it syncs when it reconnects.
                    outbox.push(&frame);
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(TICK) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::hub::OutboxLimits;

    fn connections(n: u64) -> Vec<(u64, Arc<Outbox>)> {
        (0..n).map(|id| (id, Arc::new(Outbox::new(OutboxLimits::default())))).collect()
    }

    #[test]
    fn a_connection_waits_once_and_the_window_is_bounded() {
        let pacer = ResyncPacer::new(IntGauge::new("pending", "test").expect("gauge"));
        let frame = Outbound::from_static("resync");
        let some = connections(600);
        let (waiting, window) = pacer.add(some.clone(), &frame);
        assert_eq!((waiting, window), (600, Duration::from_secs(2)), "600 at 300 per second");
        assert_eq!(pacer.add(some, &frame).0, 600, "queued once");
        let (waiting, window) = pacer.add(connections(10_000).into_iter().skip(600).collect(), &frame);
        assert_eq!(waiting, 10_000);
        assert_eq!(window, MAX_WINDOW, "the rate rises so that everyone is told within the window");
        assert_eq!(pacer.batch().len(), 20, "1,000 per second: 20 per 20 ms tick");
    }

    #[tokio::test(start_paused = true)]
    async fn resyncs_go_out_at_the_rate() {
        let pacer = ResyncPacer::new(IntGauge::new("pending", "test").expect("gauge"));
        let shutdown = CancellationToken::new();
        tokio::spawn(Arc::clone(&pacer).run(shutdown.clone()));
        let all = connections(300);
        pacer.add(all.clone(), &Outbound::from_static("resync"));
        tokio::time::sleep(Duration::from_millis(490)).await;
        let queued = |all: &[(u64, Arc<Outbox>)]| {
            all.iter()
                .filter(|(_, o)| {
                    let mut frames = Vec::new();
                    o.take(&mut frames, usize::MAX);
                    !frames.is_empty()
                })
                .count()
        };
        let first_half = queued(&all);
        assert!((140..=160).contains(&first_half), "{first_half} told in the first half second");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(first_half + queued(&all), 300, "everyone told within a second");
        shutdown.cancel();
    }
}
