//! Warnings that repeat during an incident (every failed send, every lost
//! forward) are logged once, then at most once per period with how many
//! were left out: an outage at 100 sends/s is a handful of lines, and the
//! counts stay in the metrics.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Throttled {
    period: Duration,
    /// When a line was last let through, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttled {
    pub const fn new(period: Duration) -> Self {
        Self { period, state: Mutex::new((None, 0)) }
    }

    /// `Some(held back since the last line)` when this occurrence is to be logged.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (last, held) = &mut *state;
        if last.is_some_and(|last| now.duration_since(last) < self.period) {
            *held += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(held))
    }
}

/// Logs a warning at most once per 10 s per call site, with the number of
/// occurrences left out (`suppressed`).
#[macro_export]
macro_rules! warn_throttled {
    ($($arg:tt)+) => {{
        static THROTTLE: $crate::throttle::Throttled = $crate::throttle::Throttled::new(std::time::Duration::from_secs(10));
        if let Some(suppressed) = THROTTLE.admit() {
            tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_with_the_count_left_out() {
        let throttle = Throttled::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(throttle.admit_at(start), Some(0), "the first one is logged");
        for n in 1..=99 {
            assert_eq!(throttle.admit_at(start + Duration::from_millis(n * 10)), None);
        }
        assert_eq!(
            throttle.admit_at(start + Duration::from_secs(10)),
            Some(99),
            "then one line saying 99 were left out"
        );
        assert_eq!(throttle.admit_at(start + Duration::from_secs(11)), None);
    }
}
