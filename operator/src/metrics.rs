//! Prometheus metrics of the operator, in a registry of their own.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounter,
    pub errors: IntCounterVec,
    pub duration: Histogram,
    /// Write requests for owned objects, by kind and outcome (created/updated).
    pub objects_applied: IntCounterVec,
    pub status_updates: IntCounter,
    /// Status writes put off because the cluster's status was written
    /// moments before (a status changing on every reconcile).
    pub status_deferred: IntCounter,
    /// Every write request the reconciler made: applies, creates, status updates.
    pub writes: IntCounter,
    pub leader: IntGauge,
    /// Gateway load polls, by result (ok, unreachable, timeout, invalid, not_dialed).
    pub polls: IntCounterVec,
    /// Writes of endpoint ConfigMaps, by reason (see `discovery::endpoints::Reason`).
    pub endpoint_writes: IntCounterVec,
    /// Every API request the reconciler made, by verb (see `calls`).
    pub api_requests: IntCounterVec,
    /// API requests per reconcile: reads come from watch caches, so a
    /// settled cluster costs none.
    pub api_requests_per_reconcile: Histogram,
    /// ChatClusters whose reconcile is backing off after failures.
    pub backoff_clusters: IntGauge,
    /// Gateway pods Kubernetes took away (evictions, preemptions), by the
    /// reason of their `DisruptionTarget` condition.
    pub gateway_disruptions: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("kubechat_operator".into()), None).unwrap_or_default();
        let reconciles = IntCounter::new("reconciles_total", "Reconciles started").expect("valid metric");
        let errors = IntCounterVec::new(Opts::new("reconcile_errors_total", "Reconciles that failed"), &["error"])
            .expect("valid metric");
        let duration = Histogram::with_opts(
            HistogramOpts::new("reconcile_duration_seconds", "Time per reconcile")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
        )
        .expect("valid metric");
        let objects_applied = IntCounterVec::new(
            Opts::new("objects_applied_total", "Owned objects created or updated by server-side apply"),
            &["kind", "outcome"],
        )
        .expect("valid metric");
        let status_updates =
            IntCounter::new("status_updates_total", "ChatCluster status writes").expect("valid metric");
        let status_deferred = IntCounter::new(
            "status_writes_deferred_total",
            "ChatCluster status writes put off: the status was written less than 2 s before",
        )
        .expect("valid metric");
        let writes =
            IntCounter::new("api_writes_total", "Write requests made by the reconciler").expect("valid metric");
        let leader = IntGauge::new("leader", "1 while this replica holds the leader lease").expect("valid metric");
        let polls = IntCounterVec::new(Opts::new("gateway_polls_total", "Gateway load polls, by result"), &["result"])
            .expect("valid metric");
        let endpoint_writes = IntCounterVec::new(
            Opts::new("endpoint_writes_total", "Writes of endpoint ConfigMaps, by reason"),
            &["reason"],
        )
        .expect("valid metric");
        let api_requests = IntCounterVec::new(
            Opts::new("api_requests_total", "API requests made by the reconciler, by verb"),
            &["verb"],
        )
        .expect("valid metric");
        let api_requests_per_reconcile = Histogram::with_opts(
            HistogramOpts::new("api_requests_per_reconcile", "API requests made by one reconcile")
                .buckets(vec![0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]),
        )
        .expect("valid metric");
        let backoff_clusters =
            IntGauge::new("reconcile_backoff_clusters", "ChatClusters retried with backoff after failures")
                .expect("valid metric");
        let gateway_disruptions = IntCounterVec::new(
            Opts::new(
                "gateway_disruptions_total",
                "Gateway pods Kubernetes took away (an eviction, e.g. kubectl drain; a preemption), by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(objects_applied.clone()),
            Box::new(status_updates.clone()),
            Box::new(status_deferred.clone()),
            Box::new(writes.clone()),
            Box::new(leader.clone()),
            Box::new(polls.clone()),
            Box::new(endpoint_writes.clone()),
            Box::new(api_requests.clone()),
            Box::new(api_requests_per_reconcile.clone()),
            Box::new(backoff_clusters.clone()),
            Box::new(gateway_disruptions.clone()),
        ] {
            // Registration only fails on duplicate names, which these are not.
            let _ = registry.register(collector);
        }
        Self {
            registry,
            reconciles,
            errors,
            duration,
            objects_applied,
            status_updates,
            status_deferred,
            writes,
            leader,
            polls,
            endpoint_writes,
            api_requests,
            api_requests_per_reconcile,
            backoff_clusters,
            gateway_disruptions,
        }
    }

    /// The registry in Prometheus text format.
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
