//! Accounting of the API requests each reconcile makes.
//!
//! Every request the reconciler sends goes through [`counted`], which adds
//! it to the tally of the reconcile it runs in ([`per_reconcile`]). The
//! tally lives in a task-local, so concurrent reconciles of different
//! clusters never mix; at the end of each reconcile it is added to
//! `kubechat_operator_api_requests_total{verb}` and observed in
//! `kubechat_operator_api_requests_per_reconcile`.

use std::cell::Cell;
use std::future::Future;

use crate::metrics::Metrics;

tokio::task_local! {
    static TALLY: Cell<[u32; VERBS.len()]>;
}

/// The kind of request, as a bounded metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Create,
    Patch,
    Delete,
}

const VERBS: [Verb; 5] = [Verb::Get, Verb::List, Verb::Create, Verb::Patch, Verb::Delete];

impl Verb {
    pub fn label(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Create => "create",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
        }
    }
}

/// Runs `request` (one API request) and counts it in the current reconcile.
pub async fn counted<T>(verb: Verb, request: impl Future<Output = T>) -> T {
    let _ = TALLY.try_with(|tally| {
        let mut counts = tally.get();
        counts[verb as usize] = counts[verb as usize].saturating_add(1);
        tally.set(counts);
    });
    request.await
}

/// Runs one reconcile and records the requests it made.
pub async fn per_reconcile<T>(metrics: &Metrics, reconcile: impl Future<Output = T>) -> T {
    let (result, counts) = TALLY
        .scope(Cell::new([0; VERBS.len()]), async {
            let result = reconcile.await;
            (result, TALLY.with(Cell::get))
        })
        .await;
    for (verb, count) in VERBS.iter().zip(counts) {
        if count > 0 {
            metrics.api_requests.with_label_values(&[verb.label()]).inc_by(u64::from(count));
        }
    }
    metrics.api_requests_per_reconcile.observe(f64::from(counts.iter().sum::<u32>()));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_reconcile_counts_only_its_own_requests() {
        let metrics = Metrics::new();
        per_reconcile(&metrics, async {
            counted(Verb::Get, async {}).await;
            counted(Verb::Patch, async {}).await;
        })
        .await;
        per_reconcile(&metrics, async {}).await;
        // Outside a reconcile: not counted.
        counted(Verb::Get, async {}).await;

        assert_eq!(metrics.api_requests_per_reconcile.get_sample_count(), 2);
        assert_eq!(metrics.api_requests_per_reconcile.get_sample_sum(), 2.0);
        assert_eq!(metrics.api_requests.with_label_values(&["get"]).get(), 1);
        assert_eq!(metrics.api_requests.with_label_values(&["patch"]).get(), 1);
    }
}
