//! Prometheus metrics of the push workers (registry prefix `kubechat_push_`).

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

/// Cheap to clone: every field is a handle to the same counters.
#[derive(Clone)]
pub struct PushMetrics {
    pub registry: Registry,
    /// Stream entries finished and acked (delivered, dead-lettered or skipped).
    pub jobs_processed: IntCounter,
    /// Entries acked without a send: the user has no registered device.
    pub jobs_skipped: IntCounter,
    /// Successful sends, by platform.
    pub deliveries: IntCounterVec,
    /// Sends skipped because the (message, device) was already delivered.
    pub duplicates: IntCounter,
    /// Failed sends, by platform and kind (`transient`, `permanent`, `invalid_target`).
    pub failed_attempts: IntCounterVec,
    /// (job, device) pairs given up on, by platform (`none` for unreadable jobs).
    pub dead_lettered: IntCounterVec,
    /// Entries taken over from other (presumably dead) consumers.
    pub claimed: IntCounter,
    /// Redis errors in the worker loop (each followed by a retry).
    pub redis_errors: IntCounter,
    /// Duration of one provider send, by platform.
    pub provider_seconds: HistogramVec,
}

impl PushMetrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("kubechat_push".into()), None).unwrap_or_default();
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric name");
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name")
        };
        let metrics = Self {
            jobs_processed: counter("jobs_processed_total", "Push stream entries finished and acked"),
            jobs_skipped: counter("jobs_skipped_total", "Push jobs for users without registered devices"),
            deliveries: counter_vec("deliveries_total", "Notifications accepted by a provider", &["platform"]),
            duplicates: counter("duplicates_total", "Sends skipped: already delivered to the device"),
            failed_attempts: counter_vec("failed_attempts_total", "Failed provider sends", &["platform", "kind"]),
            dead_lettered: counter_vec("dead_lettered_total", "Notifications given up on", &["platform"]),
            claimed: counter("claimed_total", "Entries claimed from other consumers"),
            redis_errors: counter("redis_errors_total", "Redis errors in the worker loop"),
            provider_seconds: HistogramVec::new(
                HistogramOpts::new("provider_seconds", "Provider send latency")
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                &["platform"],
            )
            .expect("valid metric name"),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.jobs_processed.clone()),
            Box::new(metrics.jobs_skipped.clone()),
            Box::new(metrics.deliveries.clone()),
            Box::new(metrics.duplicates.clone()),
            Box::new(metrics.failed_attempts.clone()),
            Box::new(metrics.dead_lettered.clone()),
            Box::new(metrics.claimed.clone()),
            Box::new(metrics.redis_errors.clone()),
            Box::new(metrics.provider_seconds.clone()),
        ];
        for collector in collectors {
            // Only duplicate names fail, and these are distinct.
            let _ = metrics.registry.register(collector);
        }
        metrics
    }

    /// The text exposition format, for `/metrics`.
    pub fn render(&self) -> String {
        // Encoding gathered families only fails on malformed metrics, which registration rules out.
        prometheus::TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_default()
    }
}

impl Default for PushMetrics {
    fn default() -> Self {
        Self::new()
    }
}
