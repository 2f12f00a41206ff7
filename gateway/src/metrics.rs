//! Prometheus metrics of the gateway, in a registry of their own.

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub connections: IntGauge,
    pub frames_in: IntCounter,
    pub frames_out: IntCounter,
    pub messages_stored: IntCounter,
    /// Send outcomes: `ok`, `duplicate`, or the error code.
    pub acks: IntCounterVec,
    /// From receiving a send to handing the message on, by `path`: `local`
    /// (queued on a recipient's connection here) or `forwarded` (published
    /// to the gateways holding the other recipients).
    pub delivery_seconds: HistogramVec,
    /// Its two series, resolved once (every send observes them).
    pub delivery_local: Histogram,
    pub delivery_forwarded: Histogram,
    pub store_seconds: Histogram,
    /// Store requests one send took, and how many of them ran one after
    /// the other (the plan of the send path, observable in production).
    pub store_requests_per_send: Histogram,
    pub store_round_trips_per_send: Histogram,
    pub push_jobs: IntCounter,
    /// Connections closed because they could not keep up.
    pub slow_consumers: IntCounter,
    /// Fan-outs that waited for a backlogged receiver (senders slowed down).
    pub backpressure_waits: IntCounter,
    /// Live forwards to other gateways that failed (Redis unreachable); the
    /// recipients are sent a `resync` once Redis answers.
    pub forward_failures: IntCounter,
    /// `mark` requests that moved a read or delivery marker forward.
    pub markers_moved: IntCounter,
    /// `typing` frames relayed to a channel's other members.
    pub typing_relayed: IntCounter,
    /// Presence transitions or offline announcements dropped because their
    /// queue was full (the sessions are reconciled with Redis instead).
    pub presence_dropped: IntCounter,
    /// Push jobs held back while presence was uncertain (Redis lost its data).
    pub push_deferred: IntCounter,
    /// Fan-outs whose push jobs are held now, waiting for presence.
    pub push_deferred_waiting: IntGauge,
    /// Syncs being served (reading the store) and waiting for a slot.
    pub syncs_in_progress: IntGauge,
    pub syncs_waiting: IntGauge,
    /// Connections owed a `resync`, waiting for their turn.
    pub resyncs_pending: IntGauge,
    /// Presence transitions announced, by `online`/`offline`.
    pub presence_changes: IntCounterVec,
    /// 1 while Redis routing and presence work, 0 while degraded.
    pub broker_healthy: IntGauge,
    /// 1 while the durable store answers, 0 while its operations fail.
    pub store_up: IntGauge,
    /// 1 while this gateway drains.
    pub draining: IntGauge,
    /// Clients a drain sent to other gateways.
    pub drain_moved: IntCounter,
}

fn latency_buckets() -> Vec<f64> {
    vec![0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("kubechat_gateway".into()), None).unwrap_or_default();
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric name");
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets())).expect("valid metric name")
        };
        let count_histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(vec![0.0, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0]))
                .expect("valid metric name")
        };
        let delivery_seconds = HistogramVec::new(
            HistogramOpts::new(
                "delivery_seconds",
                "Send received to live delivery queued here (path=local) or published to other gateways (path=forwarded)",
            )
            .buckets(latency_buckets()),
            &["path"],
        )
        .expect("valid metric name");
        let metrics = Self {
            delivery_local: delivery_seconds.with_label_values(&["local"]),
            delivery_forwarded: delivery_seconds.with_label_values(&["forwarded"]),
            delivery_seconds,
            connections: IntGauge::new("connections", "Open WebSocket connections").expect("valid metric name"),
            frames_in: counter("frames_in_total", "Frames received from clients"),
            frames_out: counter("frames_out_total", "Frames sent to clients"),
            messages_stored: counter("messages_stored_total", "Messages durably stored"),
            acks: IntCounterVec::new(Opts::new("acks_total", "Send outcomes by result"), &["result"])
                .expect("valid metric name"),
            store_seconds: histogram("store_seconds", "Durable write latency"),
            store_requests_per_send: count_histogram(
                "store_requests_per_send",
                "Store requests one send took (batches and reads; a 1:1 send on ScyllaDB is one)",
            ),
            store_round_trips_per_send: count_histogram(
                "store_round_trips_per_send",
                "Sequential store round trips of one send (at most two)",
            ),
            push_jobs: counter("push_jobs_total", "Push jobs enqueued for offline recipients"),
            slow_consumers: counter("slow_consumers_total", "Connections closed for not reading fast enough"),
            backpressure_waits: counter(
                "backpressure_waits_total",
                "Fan-outs that waited for a backlogged receiver, slowing their sender",
            ),
            forward_failures: counter("forward_failures_total", "Live forwards to other gateways that failed"),
            markers_moved: counter("markers_moved_total", "Read or delivery markers moved forward"),
            typing_relayed: counter("typing_relayed_total", "Typing indicators relayed to a channel's members"),
            presence_dropped: counter(
                "presence_dropped_total",
                "Presence transitions or offline announcements dropped from a full queue",
            ),
            push_deferred: counter("push_deferred_total", "Push jobs held back while presence was uncertain"),
            push_deferred_waiting: IntGauge::new(
                "push_deferred_waiting",
                "Fan-outs whose push jobs are held until every gateway has re-registered its sessions",
            )
            .expect("valid metric name"),
            syncs_in_progress: IntGauge::new("syncs_in_progress", "Syncs being served (reading the store)")
                .expect("valid metric name"),
            syncs_waiting: IntGauge::new(
                "syncs_waiting",
                "Syncs waiting for a slot (at most chat.maxConcurrentSyncs are served at once)",
            )
            .expect("valid metric name"),
            resyncs_pending: IntGauge::new("resyncs_pending", "Connections owed a resync, told at a bounded rate")
                .expect("valid metric name"),
            presence_changes: IntCounterVec::new(
                Opts::new("presence_changes_total", "Presence transitions announced to friends"),
                &["status"],
            )
            .expect("valid metric name"),
            broker_healthy: IntGauge::new(
                "broker_healthy",
                "1 while cross-gateway routing and presence work; 0 while Redis is unreachable",
            )
            .expect("valid metric name"),
            store_up: IntGauge::new("store_up", "1 while the durable store answers; 0 while its operations fail")
                .expect("valid metric name"),
            draining: IntGauge::new("draining", "1 while this gateway drains").expect("valid metric name"),
            drain_moved: counter("drain_moved_total", "Clients a drain sent to other gateways"),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.connections.clone()),
            Box::new(metrics.frames_in.clone()),
            Box::new(metrics.frames_out.clone()),
            Box::new(metrics.messages_stored.clone()),
            Box::new(metrics.acks.clone()),
            Box::new(metrics.delivery_seconds.clone()),
            Box::new(metrics.store_seconds.clone()),
            Box::new(metrics.store_requests_per_send.clone()),
            Box::new(metrics.store_round_trips_per_send.clone()),
            Box::new(metrics.push_jobs.clone()),
            Box::new(metrics.slow_consumers.clone()),
            Box::new(metrics.backpressure_waits.clone()),
            Box::new(metrics.forward_failures.clone()),
            Box::new(metrics.markers_moved.clone()),
            Box::new(metrics.typing_relayed.clone()),
            Box::new(metrics.presence_changes.clone()),
            Box::new(metrics.broker_healthy.clone()),
            Box::new(metrics.store_up.clone()),
            Box::new(metrics.presence_dropped.clone()),
            Box::new(metrics.push_deferred.clone()),
            Box::new(metrics.push_deferred_waiting.clone()),
            Box::new(metrics.syncs_in_progress.clone()),
            Box::new(metrics.syncs_waiting.clone()),
            Box::new(metrics.resyncs_pending.clone()),
            Box::new(metrics.draining.clone()),
            Box::new(metrics.drain_moved.clone()),
            // The process's one counter (the log filter is process-wide).
            Box::new(crate::throttle::DRIVER_LINES_HELD.clone()),
        ];
        for collector in collectors {
            // Only duplicate names fail, and these are distinct.
            let _ = metrics.registry.register(collector);
        }
        metrics
    }

    pub fn render(&self) -> String {
        // Encoding gathered families only fails on malformed metrics, which registration rules out.
        prometheus::TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
