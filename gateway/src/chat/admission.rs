//! Admission of durable writes: how many sends may wait on the store at
//! once, adapted to how fast it answers, so that an overloaded store turns
//! into quick `overloaded` answers instead of sends queueing for seconds.
//!
//! The limit follows the store's latency, AIMD style (as TCP does with a
//! congestion window): every write that completes within the target adds
//! `1/limit` (about one per round of writes); a write over the target cuts
//! the limit by a fifth, at most once per target interval (one slow round
//! is one signal, not a hundred). A send that finds the limit reached
//! waits for a slot for at most `max_wait`; then it is refused, nothing
//! stored, and the client retries with the same key after a backoff.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

#[derive(Clone, Debug)]
pub struct AdmissionConfig {
    pub initial: usize,
    pub min: usize,
    pub max: usize,
    /// Writes slower than this shrink the limit.
    pub target_latency: Duration,
    /// The longest a send waits for a slot before it is refused.
    pub max_wait: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            initial: 64,
            min: 4,
            max: 2048,
            target_latency: Duration::from_millis(100),
            max_wait: Duration::from_millis(100),
        }
    }
}

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: usize,
    last_cut: Option<Instant>,
}

pub struct Admission {
    config: AdmissionConfig,
    state: Mutex<State>,
    freed: Notify,
}

/// A slot for one write; dropping it (with [`Permit::done`] or without, on
/// cancellation) frees the slot.
pub struct Permit<'a> {
    admission: &'a Admission,
    started: Instant,
    latency: Option<Duration>,
}

impl Permit<'_> {
    /// The write finished (either way): its latency adjusts the limit.
    pub fn done(mut self) {
        self.latency = Some(self.started.elapsed());
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        // A cancelled write (its deadline) counts as one that took that long.
        let latency = self.latency.unwrap_or_else(|| self.started.elapsed());
        self.admission.release(latency, Instant::now());
    }
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        let limit = config.initial.clamp(config.min.max(1), config.max.max(1)) as f64;
        Self { config, state: Mutex::new(State { limit, in_flight: 0, last_cut: None }), freed: Notify::new() }
    }

    /// The current limit (rounded down), for metrics and tests.
    pub fn limit(&self) -> usize {
        self.lock().limit as usize
    }

    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn try_take(&self) -> bool {
        let mut state = self.lock();
        if (state.in_flight as f64) < state.limit.floor() {
            state.in_flight += 1;
            true
        } else {
            false
        }
    }

    /// A slot within `max_wait`, or `None`: the store is behind.
    pub async fn acquire(&self) -> Option<Permit<'_>> {
        let deadline = tokio::time::Instant::now() + self.config.max_wait;
        loop {
            // Registered before the check, so a slot freed in between wakes it.
            let freed = self.freed.notified();
            if self.try_take() {
                return Some(Permit { admission: self, started: Instant::now(), latency: None });
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return None;
            }
        }
    }

    fn release(&self, latency: Duration, now: Instant) {
        {
            let mut state = self.lock();
            state.in_flight = state.in_flight.saturating_sub(1);
            let (min, max) = (self.config.min.max(1) as f64, self.config.max.max(1) as f64);
            if latency > self.config.target_latency {
                let due = state.last_cut.is_none_or(|at| now.duration_since(at) >= self.config.target_latency);
                if due {
                    state.limit = (state.limit * 0.8).max(min);
                    state.last_cut = Some(now);
                }
            } else {
                state.limit = (state.limit + 1.0 / state.limit).min(max);
            }
        }
        self.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AdmissionConfig {
        AdmissionConfig {
            initial: 4,
            min: 2,
            max: 8,
            target_latency: Duration::from_millis(50),
            max_wait: Duration::from_millis(20),
        }
    }

    #[tokio::test]
    async fn past_the_limit_a_send_waits_briefly_then_is_refused() {
        let admission = Admission::new(config());
        let permits: Vec<_> = futures::future::join_all((0..4).map(|_| admission.acquire())).await;
        assert!(permits.iter().all(Option::is_some), "the first four get slots");
        let started = Instant::now();
        assert!(admission.acquire().await.is_none(), "the fifth is refused");
        assert!(started.elapsed() >= Duration::from_millis(20), "after waiting max_wait");
        assert!(started.elapsed() < Duration::from_millis(500), "and not much longer");
        drop(permits);
        assert_eq!(admission.in_flight(), 0);
        assert!(admission.acquire().await.is_some(), "slots come back");
    }

    #[tokio::test]
    async fn a_waiting_send_gets_the_slot_freed_for_it() {
        let admission = Admission::new(AdmissionConfig { max_wait: Duration::from_secs(5), ..config() });
        let mut permits: Vec<_> = futures::future::join_all((0..4).map(|_| admission.acquire())).await;
        let waiting = admission.acquire();
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        permits.pop().flatten().expect("a permit").done();
        let got = tokio::time::timeout(Duration::from_secs(1), waiting).await.expect("woken");
        assert!(got.is_some());
    }

    #[test]
    fn slow_writes_shrink_the_limit_once_per_interval_and_fast_ones_grow_it() {
        let admission = Admission::new(config());
        let t0 = Instant::now();
        let slow = Duration::from_millis(200);
        admission.lock().in_flight = 3;
        admission.release(slow, t0);
        assert_eq!(admission.lock().limit, 4.0 * 0.8);
        admission.release(slow, t0 + Duration::from_millis(10));
        assert_eq!(admission.lock().limit, 4.0 * 0.8, "one cut per target interval");
        admission.release(slow, t0 + Duration::from_millis(60));
        assert!((admission.lock().limit - 4.0 * 0.8 * 0.8).abs() < 1e-9);
        for _ in 0..100 {
            admission.release(slow, t0 + Duration::from_secs(10));
        }
        assert!(admission.lock().limit >= 2.0, "never below the minimum");
        for _ in 0..1000 {
            admission.release(Duration::from_millis(1), t0);
        }
        assert_eq!(admission.limit(), 8, "fast writes grow it up to the maximum");
    }
}
