//! Counters and latency histograms shared by every connection of a run.
//!
//! Connections record straight into shared structures: the client normally
//! runs on one thread, so the locks are uncontended.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::payload::Stamp;
use crate::procfs::Usage;

/// Microseconds, 1 µs to 1 hour, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant, valid histogram bounds")
}

pub fn record(histogram: &Mutex<Histogram<u64>>, micros: u64) {
    if let Ok(mut h) = histogram.lock() {
        h.saturating_record(micros.max(1));
    }
}

/// Percentiles in µs (and ms for reading), as JSON.
pub fn summary(histogram: &Mutex<Histogram<u64>>) -> Value {
    let Ok(h) = histogram.lock() else { return Value::Null };
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.50),
        "p90_us": h.value_at_quantile(0.90),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
        "mean_us": (h.mean() * 10.0).round() / 10.0,
    })
}

#[derive(Default)]
pub struct Counts(Mutex<BTreeMap<String, u64>>);

impl Counts {
    pub fn add(&self, key: &str) {
        if let Ok(mut map) = self.0.lock() {
            *map.entry(key.to_string()).or_default() += 1;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.lock().map(|m| m.values().sum()).unwrap_or(0)
    }

    pub fn to_json(&self) -> Value {
        self.0.lock().map(|m| json!(*m)).unwrap_or(Value::Null)
    }
}

/// One measured step: a rate held for a duration.
pub struct StepStats {
    pub rate: f64,
    pub warmup: bool,
    pub start: Instant,
    pub end: Instant,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub errors: Counts,
    /// Stamps received, duplicates included.
    pub deliveries: AtomicU64,
    /// Stamps received before the step's end (for deliveries/s).
    pub in_window: AtomicU64,
    pub duplicates: AtomicU64,
    /// Receipt − send time.
    pub latency: Mutex<Histogram<u64>>,
    /// Ack − send time.
    pub ack_latency: Mutex<Histogram<u64>>,
    /// Actual − scheduled send time: the client's own lag.
    pub send_lag: Mutex<Histogram<u64>>,
    pub server_before: Mutex<Option<Usage>>,
    pub server_after: Mutex<Option<Usage>>,
    /// Connections the server closed (or lost) while this step was the latest.
    pub closes: Counts,
}

impl StepStats {
    pub fn new(rate: f64, warmup: bool, start: Instant, end: Instant) -> Self {
        Self {
            rate,
            warmup,
            start,
            end,
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            errors: Counts::default(),
            deliveries: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            latency: Mutex::new(histogram()),
            ack_latency: Mutex::new(histogram()),
            send_lag: Mutex::new(histogram()),
            server_before: Mutex::new(None),
            server_after: Mutex::new(None),
            closes: Counts::default(),
        }
    }

    pub fn unique(&self) -> u64 {
        self.deliveries.load(Relaxed) - self.duplicates.load(Relaxed)
    }

    /// Every send answered (ack or error) and every acked message delivered
    /// to all `recipients`.
    pub fn complete(&self, recipients: u64) -> bool {
        let sent = self.sent.load(Relaxed);
        let acked = self.acked.load(Relaxed);
        acked + self.errors.total() >= sent && self.unique() >= acked * recipients
    }
}

/// Everything a run records.
#[derive(Default)]
pub struct RunStats {
    pub steps: Vec<StepStats>,
    /// Connections that ended before the run stopped them, by close code
    /// (or `eof`, `error: …`). A 4008 shows up here.
    pub closes: Counts,
    /// Errors that belong to no step (no `req`).
    pub errors: Counts,
    /// Frames with a stamp that could not be parsed or names an unknown step.
    pub bad_stamps: AtomicU64,
}

impl RunStats {
    pub fn closes_json(&self) -> Value {
        self.closes.to_json()
    }

    /// A connection ended before the run stopped it.
    pub fn closed(&self, reason: &str) {
        self.closes.add(reason);
        let now = Instant::now();
        if let Some(step) = self.steps.iter().rev().find(|s| s.start <= now) {
            step.closes.add(reason);
        }
    }
}

/// Stamps one receiver has seen, per (step, stream): a bitset over `seq`.
#[derive(Default)]
pub struct Seen(HashMap<(u16, u32), Vec<u64>>);

impl Seen {
    /// True the first time a stamp is seen.
    pub fn first(&mut self, stamp: &Stamp) -> bool {
        let bits = self.0.entry((stamp.step, stamp.stream)).or_default();
        let (word, bit) = ((stamp.seq / 64) as usize, stamp.seq % 64);
        if bits.len() <= word {
            // Sequence numbers are dense and bounded by the step's sends; a
            // wild one (bad server data) must not allocate unbounded memory.
            if word > 1 << 24 {
                return true;
            }
            bits.resize(word + 1, 0);
        }
        let fresh = bits[word] & (1 << bit) == 0;
        bits[word] |= 1 << bit;
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_flags_duplicates_per_stream() {
        let mut seen = Seen::default();
        let stamp = |stream, seq| Stamp { step: 0, stream, seq, sent_ns: 0 };
        assert!(seen.first(&stamp(1, 5)));
        assert!(!seen.first(&stamp(1, 5)));
        assert!(seen.first(&stamp(2, 5)));
        assert!(seen.first(&stamp(1, 200)));
    }

    #[test]
    fn summaries_report_percentiles() {
        let h = Mutex::new(histogram());
        for v in 1..=1000 {
            record(&h, v);
        }
        let s = summary(&h);
        assert_eq!(s["count"], 1000);
        assert!(s["p99_us"].as_u64().is_some_and(|p| (985..=995).contains(&p)));
        assert_eq!(summary(&Mutex::new(histogram()))["count"], 0);
    }
}
