//! What every reconcile shares: the client, the watch caches, Events,
//! metrics, and the per-cluster failure count that drives backoff.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::runtime::events::{Event, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use kubechat_crds::ChatCluster;
use tokio_util::sync::CancellationToken;

use crate::cache::Owned;
use crate::calls::{Verb, counted};
use crate::desired::network::OperatorPods;
use crate::leader::Authority;
use crate::metrics::Metrics;

const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Owned objects as the controller's watches see them.
    pub owned: Owned,
    /// The ChatClusters as the controller's watch sees them.
    pub clusters: Store<ChatCluster>,
    /// Cancelled when this replica stops leading.
    pub(crate) stop: CancellationToken,
    /// Dial only loopback gateway addresses (`discovery::Options::loopback_only`).
    pub admin_loopback_only: bool,
    /// This operator's pods (the gateways' NetworkPolicy admits them alone to the admin port).
    pub operator_pods: OperatorPods,
    /// The Lease term this replica leads by (`None`: no leader election).
    /// The API client is fenced by it; what the operator sends elsewhere
    /// (a gateway's drain request) checks it through [`leading`](Self::leading).
    pub authority: Option<Authority>,
    /// Consecutive failures per ChatCluster, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// When each ChatCluster's status was last written: writes are bounded
    /// per cluster (see [`MIN_STATUS_INTERVAL`]).
    status_written: Mutex<HashMap<String, std::time::Instant>>,
}

/// The shortest time between two status writes of one ChatCluster. Status
/// writes wake every watcher of the ChatCluster (this operator included): a
/// status that changes on every reconcile must not become a write loop.
pub const MIN_STATUS_INTERVAL: Duration = Duration::from_secs(2);

impl Context {
    pub fn new(
        client: Client,
        metrics: Metrics,
        reporter: Reporter,
        owned: Owned,
        clusters: Store<ChatCluster>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            owned,
            clusters,
            stop,
            admin_loopback_only: false,
            operator_pods: OperatorPods::default(),
            authority: None,
            failures: Mutex::default(),
            status_written: Mutex::default(),
        }
    }

    /// How long to wait before this ChatCluster's status may be written
    /// again (`None`: now, and the write is counted from now).
    pub(crate) fn status_write_wait(&self, cc: &ChatCluster) -> Option<Duration> {
        let mut written = self.status_written.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        let key = key(cc);
        if let Some(at) = written.get(&key)
            && now.duration_since(*at) < MIN_STATUS_INTERVAL
        {
            return Some(MIN_STATUS_INTERVAL - now.duration_since(*at));
        }
        if written.len() > 10_000 {
            written.retain(|_, at| now.duration_since(*at) < MIN_STATUS_INTERVAL);
        }
        written.insert(key, now);
        None
    }

    pub(crate) fn reset_failures(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
            self.metrics.backoff_clusters.set(failures.len() as i64);
        }
    }

    pub(crate) fn next_backoff(&self, cc: &ChatCluster) -> Duration {
        let attempt = match self.failures.lock() {
            Ok(mut failures) => {
                let n = failures.entry(key(cc)).or_insert(0);
                *n = n.saturating_add(1);
                let attempt = *n;
                self.metrics.backoff_clusters.set(failures.len() as i64);
                attempt
            }
            Err(_) => 1,
        };
        backoff(attempt, jitter_fraction())
    }

    /// Drops the backoff entries of deleted ChatClusters (they would stay forever).
    pub(crate) fn forget_deleted(&self) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.retain(|key, _| self.still_exists(key));
            self.metrics.backoff_clusters.set(failures.len() as i64);
        }
    }

    pub(crate) fn still_exists(&self, key: &str) -> bool {
        let (namespace, name) = key.split_once('/').unwrap_or(("", key));
        self.clusters
            .get(&ObjectRef::new(name).within(namespace))
            .is_some_and(|cc| cc.metadata.deletion_timestamp.is_none())
    }

    /// Whether this replica still leads (writes outside the fenced API
    /// client, such as a gateway's drain request, check it first): not
    /// stopped, and within its Lease term, which ends before the stop does.
    pub fn leading(&self) -> bool {
        may_act(self.stop.is_cancelled(), self.authority.as_ref())
    }

    pub(crate) async fn publish(&self, cc: &ChatCluster, event: Event) {
        let event = Event { note: event.note.map(|note| truncate_note(&note)), ..event };
        if let Err(e) = counted(Verb::Create, self.recorder.publish(&event, &cc.object_ref(&()))).await {
            tracing::warn!(error = %e, reason = event.reason, "could not publish event");
        }
    }
}

fn may_act(stopped: bool, authority: Option<&Authority>) -> bool {
    !stopped && authority.is_none_or(Authority::is_leading)
}

/// The apiserver refuses Event notes over 1 KiB (and with them the Event).
const MAX_NOTE_BYTES: usize = 1024;

/// `note` cut to fit an Event, on a character boundary, marked with "…".
pub fn truncate_note(note: &str) -> String {
    if note.len() <= MAX_NOTE_BYTES {
        return note.to_string();
    }
    let mut end = MAX_NOTE_BYTES - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &note[..end])
}

/// Delay before retry `attempt` (1-based): doubling from 0.5 s up to 5 min,
/// stretched by `jitter` (0..1, up to +20%) so failing clusters spread out.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(20);
    let base = BACKOFF_BASE.saturating_mul(1u32 << exponent).min(BACKOFF_MAX);
    base.mul_f64(1.0 + 0.2 * jitter.clamp(0.0, 1.0))
}

fn jitter_fraction() -> f64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1000) / 1000.0
}

pub(crate) fn key(cc: &ChatCluster) -> String {
    format!("{}/{}", cc.namespace().unwrap_or_default(), cc.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(2, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(4, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(30, 0.0), BACKOFF_MAX);
        assert_eq!(backoff(1, 1.0), Duration::from_millis(600));
    }

    #[test]
    fn only_a_running_replica_within_its_term_acts() {
        assert!(may_act(false, None), "no leader election: the one replica acts");
        assert!(!may_act(true, None), "stopped");
        assert!(!may_act(false, Some(&Authority::new())), "no term granted, or it ended");
    }

    #[test]
    fn long_notes_are_cut_to_fit_an_event() {
        assert_eq!(truncate_note("short"), "short");
        let long = "é".repeat(600); // 1,200 bytes
        let cut = truncate_note(&long);
        assert!(cut.len() <= MAX_NOTE_BYTES, "{} bytes", cut.len());
        assert!(cut.ends_with('…'));
        assert!(cut.len() > MAX_NOTE_BYTES - 8, "cut more than needed: {} bytes", cut.len());
    }
}
