//! Warnings that repeat during an incident (every failed send, every lost
//! forward) are logged once, then at most once per period with how many
//! were left out: an outage at 100 sends/s is a handful of lines, and the
//! counts stay in the metrics.
//!
//! The database driver's own warnings go through the same kind of throttle
//! ([`driver_line_passes`]): during a store outage it logs every failed
//! connection attempt and every failed request (~13 lines a second per
//! gateway), beside kubechat's one line that the store is unavailable.

use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tracing::subscriber::Interest;
use tracing::{Level, Metadata};
use tracing_subscriber::layer::{Context, Filter};

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

/// Log targets of the database driver.
const DRIVER_TARGET: &str = "scylla";

/// Driver warnings and errors: at most one line per period.
static DRIVER_WARNINGS: Throttled = Throttled::new(Duration::from_secs(10));

/// Driver lines held back (`kubechat_gateway_driver_log_lines_held_total`;
/// every gateway's registry registers this one counter).
pub static DRIVER_LINES_HELD: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new("driver_log_lines_held_total", "Warnings of the database driver left out of the log (throttled)")
        .unwrap_or_else(|e| unreachable!("a valid metric name: {e}"))
});

/// A log filter: passes everything but the driver's warnings and errors
/// beyond one per 10 s (its informational lines, rare, all pass). The
/// outage itself is told by kubechat's own lines: "store unavailable" when
/// it starts, "store answers again" with how long it lasted.
pub struct DriverLogThrottle;

impl<S> Filter<S> for DriverLogThrottle {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        if !throttled(meta) {
            return true;
        }
        let passes = DRIVER_WARNINGS.admit().is_some();
        if !passes {
            DRIVER_LINES_HELD.inc();
        }
        passes
    }

    /// Asked per event for the throttled callsites (the answer changes
    /// with time), never for the others.
    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if throttled(meta) { Interest::sometimes() } else { Interest::always() }
    }
}

fn throttled(meta: &Metadata<'_>) -> bool {
    meta.is_event() && *meta.level() <= Level::WARN && from_driver(meta.target())
}

fn from_driver(target: &str) -> bool {
    target.strip_prefix(DRIVER_TARGET).is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
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

    /// The driver's warnings are throttled, its other lines and kubechat's are not.
    #[test]
    fn only_the_drivers_lines_are_throttled() {
        assert!(from_driver("scylla::network::connection"));
        assert!(from_driver("scylla"));
        assert!(!from_driver("scyllaish"), "another crate");
        assert!(!from_driver("kubechat_gateway::store::scylla"), "kubechat's own");
    }
}
