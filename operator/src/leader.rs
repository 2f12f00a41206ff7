//! Leader election on a `coordination.k8s.io/v1` Lease, so the operator can
//! run with several replicas while at most one writes.
//!
//! The guarantee, and what it rests on (docs/operator.md, "Leader election"):
//! - **Takeover** is measured on the candidate's own clock: a Lease held by
//!   another expires `leaseDurationSeconds` after the candidate *first saw*
//!   its current `resourceVersion`, never from the wall-clock `renewTime`, so
//!   clock skew between nodes cannot shorten it. Every write carries the
//!   `resourceVersion` it read, so of two racing candidates one gets a conflict.
//! - **Stepping down** is measured on the leader's own clock too: a round that
//!   renews the Lease lets this replica act until `lease - margin` after the
//!   round *started* (before the Lease was even read), so its authority ends
//!   before any candidate can have seen the renewal expire. A round that hangs
//!   is abandoned at that deadline.
//! - **Fencing**: [`Authority::fence`] wraps the client the controller and the
//!   discovery loop write through; past the deadline it refuses every write,
//!   checked as each request goes out. So a leader that was paused (SIGSTOP, a
//!   long GC-like stall, a partition) and resumes after another took over has
//!   its writes refused before its election loop has even run again.
//!
//! What is left: a write that passed the check and then sits in the network
//! for longer than the margin can still land after a takeover; Kubernetes has
//! no fencing tokens to stop that.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::{Method, Request, Response};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use kube::client::Body;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    /// Unique per replica (the pod name).
    pub identity: String,
    /// Written to the Lease in whole seconds (at least 1).
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

impl LeaderConfig {
    /// The duration as the Lease stores it, which is what candidates wait.
    fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_duration.as_secs().max(1))
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.lease().as_secs()).unwrap_or(i32::MAX)
    }

    /// At least two renewal attempts fit in one term of authority.
    fn renew_period(&self) -> Duration {
        let lease = self.lease();
        self.renew_every.min((lease - safety_margin(lease)) / 2).max(Duration::from_millis(10))
    }
}

/// How long before a candidate may take the Lease the leader stops writing:
/// room for writes already on the wire and for clocks running at slightly
/// different rates.
pub fn safety_margin(lease: Duration) -> Duration {
    lease / 4
}

/// Until when a replica may act after a round that started at `started`
/// renewed (or took) the Lease.
pub fn leading_until(started: Instant, lease: Duration) -> Instant {
    started + (lease - safety_margin(lease))
}

/// The Lease version this replica last saw, and when (its own clock) it first
/// saw it.
#[derive(Clone, Debug, PartialEq)]
struct Observed {
    version: String,
    at: Instant,
}

/// Keeps the first sighting of a version: only a change restarts the wait.
fn observe(previous: Option<Observed>, version: &str, now: Instant) -> Observed {
    match previous {
        Some(seen) if seen.version == version => seen,
        _ => Observed { version: version.to_string(), at: now },
    }
}

/// Whether another holder's Lease may be taken: it promised to renew within
/// `duration`, and nothing changed for longer than that since we saw it.
fn expired(seen: &Observed, now: Instant, duration: Duration) -> bool {
    now.saturating_duration_since(seen.at) > duration
}

/// The holder's own promise (`leaseDurationSeconds`, Kubernetes' default 15 s).
fn holder_duration(spec: Option<&LeaseSpec>) -> Duration {
    let seconds = spec.and_then(|s| s.lease_duration_seconds).unwrap_or(15);
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// The Lease spec one election round writes, from the spec it read at wall
/// time `now`: renewed if `me` holds it, taken over if it is free or
/// `holder_expired`, or `None` while another holder's is still valid.
fn claim(
    current: Option<&LeaseSpec>,
    me: &str,
    now: Timestamp,
    lease_seconds: i32,
    holder_expired: bool,
) -> Option<LeaseSpec> {
    let mut spec = current.cloned().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder != me {
        if !holder.is_empty() && !holder_expired {
            return None;
        }
        spec.holder_identity = Some(me.to_string());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    // For people and other tools; no decision here reads the wall clock.
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(lease_seconds);
    Some(spec)
}

/// This replica's right to write, shared by the election loop (which grants
/// and revokes it) and the fenced client (which checks it).
#[derive(Clone, Debug)]
pub struct Authority {
    inner: Arc<AuthorityInner>,
}

#[derive(Debug)]
struct AuthorityInner {
    base: Instant,
    /// Nanoseconds after `base` the authority ends; 0: none.
    until: AtomicU64,
}

impl Default for Authority {
    fn default() -> Self {
        Self { inner: Arc::new(AuthorityInner { base: Instant::now(), until: AtomicU64::new(0) }) }
    }
}

impl Authority {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether this replica may write now.
    pub fn is_leading(&self) -> bool {
        self.until().is_some_and(|until| Instant::now() < until)
    }

    /// When the current term ends (it may already have), if one was granted.
    pub fn until(&self) -> Option<Instant> {
        match self.inner.until.load(Ordering::Acquire) {
            0 => None,
            nanos => Some(self.inner.base + Duration::from_nanos(nanos)),
        }
    }

    fn grant(&self, until: Instant) {
        let nanos = u64::try_from(until.saturating_duration_since(self.inner.base).as_nanos()).unwrap_or(u64::MAX);
        self.inner.until.store(nanos.max(1), Ordering::Release);
    }

    fn revoke(&self) {
        self.inner.until.store(0, Ordering::Release);
    }

    /// A client that sends reads always and writes only while [`is_leading`](Self::is_leading).
    pub fn fence(&self, client: Client) -> Client {
        let namespace = client.default_namespace().to_string();
        Client::new(Fenced { client, authority: self.clone() }, namespace)
    }
}

/// A write refused by the fence.
#[derive(Debug, thiserror::Error)]
#[error("not the leader (the leader Lease term ended): refusing an API write")]
pub struct NotLeading;

#[derive(Clone)]
struct Fenced {
    client: Client,
    authority: Authority,
}

fn is_read(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Request<Body>> for Fenced {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Fenced { client, authority } = self.clone();
        Box::pin(async move {
            // Checked as the request goes out, not when it was built: a
            // reconcile that began while leading may end after the term.
            if !is_read(request.method()) && !authority.is_leading() {
                return Err(NotLeading.into());
            }
            Ok(client.send(request).await?)
        })
    }
}

pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaderConfig,
    observed: Option<Observed>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaderConfig) -> Self {
        Self { api: Api::namespaced(client, &config.namespace), config, observed: None }
    }

    /// One round: take the Lease if free or expired, renew it if ours.
    /// Returns whether this replica holds it now (the caller times its term
    /// from before the round began).
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool> {
        let now = Timestamp::now();
        let me = &self.config.identity;
        let Some(mut lease) =
            self.api.get_opt(&self.config.lease_name).await.map_err(Error::kube("reading the leader Lease"))?
        else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.config.lease_name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(self.config.lease_seconds()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(Error::kube("creating the leader Lease")(e)),
            };
        };
        // Another holder's Lease is timed from when the read returned: the
        // version it shows may have been written at any moment of a slow
        // read, and counting from before it would cut the holder's term
        // short by the read's duration (two replicas acting at once). Our
        // own term (`leading_until`) counts from `started`, the safe side.
        let read_at = Instant::now();
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let seen = observe(self.observed.take(), &version, read_at);
        let holder_expired = expired(&seen, read_at, holder_duration(lease.spec.as_ref()));
        self.observed = Some(seen);
        let Some(claimed) = claim(lease.spec.as_ref(), me, now, self.config.lease_seconds(), holder_expired) else {
            return Ok(false);
        };
        lease.spec = Some(claimed);
        // `replace` sends the resourceVersion read above: a conflict means
        // someone else wrote the Lease since.
        match self.api.replace(&self.config.lease_name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(Error::kube("renewing the leader Lease")(e)),
        }
    }

    /// Gives the Lease up (on shutdown) so a standby takes over at once.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) =
            self.api.get_opt(&self.config.lease_name).await.map_err(Error::kube("reading the leader Lease"))?
        else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        match self.api.replace(&self.config.lease_name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(Error::kube("releasing the leader Lease")(e)),
        }
    }

    /// Keeps trying until `shutdown`: grants and revokes `authority`, and
    /// publishes leadership on `leading`. Releases the Lease on the way out
    /// if it ever held it.
    pub async fn run(mut self, authority: Authority, leading: watch::Sender<bool>, shutdown: CancellationToken) {
        let lease = self.config.lease();
        let period = self.config.renew_period();
        loop {
            let started = Instant::now();
            // A round may not outlast the current term: a renewal that hangs
            // must not keep this replica acting.
            let limit = authority.until().filter(|_| authority.is_leading()).unwrap_or(started + period);
            match tokio::time::timeout_at(limit.into(), self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => authority.grant(leading_until(started, lease)),
                Ok(Ok(false)) => authority.revoke(),
                Ok(Err(e)) => tracing::warn!(error = %e, "leader election round failed"),
                Err(_) => tracing::warn!(after = ?started.elapsed(), "leader election round timed out"),
            }
            let holding = authority.is_leading();
            leading.send_if_modified(|was| {
                let changed = *was != holding;
                if changed {
                    tracing::info!(identity = %self.config.identity, leading = holding, "leadership changed");
                }
                *was = holding;
                changed
            });
            // Wake at the end of the term too, to publish the loss on time
            // while renewals keep failing.
            let mut wake = started + period;
            if let Some(until) = authority.until().filter(|_| holding) {
                wake = wake.min(until);
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        let held = authority.until().is_some();
        // Stop writing before giving the Lease up: a standby takes a released
        // Lease at once.
        authority.revoke();
        leading.send_replace(false);
        if held && let Err(e) = self.release().await {
            tracing::warn!(error = %e, "could not release the leader Lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// `secs` seconds after a fixed instant.
    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).expect("a valid timestamp")
    }

    fn held_by(holder: &str, renewed: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(duration),
            acquire_time: Some(MicroTime(at(0))),
            renew_time: Some(MicroTime(at(renewed))),
            lease_transitions: Some(2),
            ..Default::default()
        }
    }

    #[test]
    fn the_holder_renews_without_a_transition() {
        let renewed = claim(Some(&held_by("me", 10, 15)), "me", at(12), 15, false).expect("renewed");
        assert_eq!(renewed.holder_identity.as_deref(), Some("me"));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(12))));
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(0))), "still the first acquisition");
        assert_eq!(renewed.lease_transitions, Some(2));
    }

    #[test]
    fn a_lease_of_another_is_taken_only_once_expired() {
        let lease = held_by("other", 10, 15);
        assert_eq!(claim(Some(&lease), "me", at(11), 15, false), None);
        // The wall clock plays no part: a renewTime far in the past is not expiry.
        assert_eq!(claim(Some(&lease), "me", at(1_000), 15, false), None);
        let taken = claim(Some(&lease), "me", at(26), 3, true).expect("expired: taken over");
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(26))));
        assert_eq!(taken.renew_time, Some(MicroTime(at(26))));
        assert_eq!(taken.lease_transitions, Some(3));
        assert_eq!(taken.lease_duration_seconds, Some(3), "from now on, ours");
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let released = LeaseSpec { holder_identity: None, ..held_by("", 10, 15) };
        let taken = claim(Some(&released), "me", at(11), 15, false).expect("free");
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
        assert_eq!(taken.lease_transitions, Some(3));
        let empty = claim(None, "me", at(1), 15, false).expect("a Lease without spec is free");
        assert_eq!(empty.lease_transitions, Some(1));
    }

    #[test]
    fn expiry_is_the_holders_duration_after_we_first_saw_its_version() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let seen = observe(None, "41", t0);
        // Seeing the same version again keeps the first sighting...
        let again = observe(Some(seen.clone()), "41", t0 + secs(3));
        assert_eq!(again.at, t0);
        // ...a renewal (any write bumps the version) restarts the wait.
        let renewed = observe(Some(again.clone()), "42", t0 + secs(4));
        assert_eq!(renewed.at, t0 + secs(4));

        let duration = holder_duration(Some(&held_by("other", 0, 4)));
        assert_eq!(duration, secs(4));
        assert!(!expired(&again, t0 + secs(4), duration), "expiry is strictly after the duration");
        assert!(expired(&again, t0 + secs(4) + Duration::from_millis(1), duration));
        assert!(!expired(&renewed, t0 + secs(5), duration));
        // The holder's promise, not ours; without one, Kubernetes' default 15 s.
        assert_eq!(holder_duration(Some(&held_by("other", 0, 60))), secs(60));
        let unspecified = LeaseSpec { lease_duration_seconds: None, ..held_by("other", 0, 0) };
        assert_eq!(holder_duration(Some(&unspecified)), secs(15));
    }

    #[test]
    fn the_leader_stops_a_margin_before_any_candidate_can_take_over() {
        let started = Instant::now();
        let lease = Duration::from_secs(4);
        assert_eq!(safety_margin(lease), Duration::from_secs(1));
        assert_eq!(leading_until(started, lease), started + Duration::from_secs(3));
        // A candidate first sees the renewal at or after `started` (the round
        // read and wrote the Lease after it), so it expires for it no sooner
        // than `started + lease`: after the leader's term by the margin.
        let candidate_seen = observe(None, "7", started);
        assert!(!expired(&candidate_seen, leading_until(started, lease), lease));
    }

    #[test]
    fn renewals_are_retried_at_least_twice_per_term() {
        let config = |lease: u64, renew_ms: u64| LeaderConfig {
            lease_name: "l".into(),
            namespace: "n".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(lease),
            renew_every: Duration::from_millis(renew_ms),
        };
        assert_eq!(config(15, 5_000).renew_period(), Duration::from_secs(5));
        // A 4 s lease grants 3 s terms: renew at least every 1.5 s.
        assert_eq!(config(4, 10_000).renew_period(), Duration::from_millis(1500));
        // The stored duration is whole seconds, at least one.
        assert_eq!(config(0, 100).lease(), Duration::from_secs(1));
    }

    #[test]
    fn authority_holds_until_its_deadline_or_revocation() {
        let authority = Authority::new();
        assert!(!authority.is_leading(), "nothing granted yet");
        assert_eq!(authority.until(), None);
        let until = Instant::now() + Duration::from_secs(60);
        authority.grant(until);
        assert!(authority.is_leading());
        let stored = authority.until().expect("granted");
        assert!(stored <= until && until - stored < Duration::from_micros(1), "{stored:?} vs {until:?}");
        authority.grant(Instant::now() - Duration::from_millis(1));
        assert!(!authority.is_leading(), "a term that ended");
        authority.grant(until);
        authority.revoke();
        assert!(!authority.is_leading());
        assert_eq!(authority.until(), None);
    }

    /// Answers every request with an empty 200 and records its method.
    #[derive(Clone, Default)]
    struct Recording(Arc<Mutex<Vec<Method>>>);

    impl tower_service::Service<Request<Body>> for Recording {
        type Response = Response<Body>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Response<Body>, BoxError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Body>) -> Self::Future {
            self.0.lock().expect("lock").push(request.method().clone());
            std::future::ready(Ok(Response::new(Body::from(b"{}".to_vec()))))
        }
    }

    /// An apiserver holding a Lease of "other" (1 s, version 5) whose first
    /// read answers `first_read_delay` late; records every method.
    #[derive(Clone)]
    struct SlowLeaseServer {
        sent: Arc<Mutex<Vec<Method>>>,
        first_read_delay: Duration,
    }

    impl tower_service::Service<Request<Body>> for SlowLeaseServer {
        type Response = Response<Body>;
        type Error = BoxError;
        type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Body>) -> Self::Future {
            let first = {
                let mut sent = self.sent.lock().expect("lock");
                sent.push(request.method().clone());
                sent.len() == 1
            };
            let delay = if first { self.first_read_delay } else { Duration::ZERO };
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                let lease = serde_json::json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": "l", "namespace": "n", "resourceVersion": "5"},
                    "spec": {"holderIdentity": "other", "leaseDurationSeconds": 1, "leaseTransitions": 1,
                             "acquireTime": "2026-12-04T00:00:00.000000Z", "renewTime": "2026-12-04T00:00:00.000000Z"}
                });
                Ok(Response::new(Body::from(lease.to_string().into_bytes())))
            })
        }
    }

    /// A standby times another holder's Lease from when its read returned:
    /// a read that took longer than the holder's whole term does not make
    /// the same version look expired at the next round (timed from before
    /// the read, it did, and the standby took a Lease still held).
    #[tokio::test]
    async fn a_slow_read_does_not_shorten_the_holders_term() {
        let server = SlowLeaseServer { sent: Arc::default(), first_read_delay: Duration::from_millis(1500) };
        let config = LeaderConfig {
            lease_name: "l".into(),
            namespace: "n".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(1),
            renew_every: Duration::from_millis(100),
        };
        let mut elector = LeaderElector::new(Client::new(server.clone(), "n"), config);
        assert!(!elector.try_acquire_or_renew().await.expect("first round"), "held by another");
        // At once: the same version, seen well within its 1 s since it was read.
        assert!(!elector.try_acquire_or_renew().await.expect("second round"), "taken while still held");
        assert_eq!(*server.sent.lock().expect("lock"), vec![Method::GET, Method::GET], "no write");
    }

    #[tokio::test]
    async fn the_fence_passes_reads_always_and_writes_only_while_leading() {
        let sent = Recording::default();
        let authority = Authority::new();
        let client = authority.fence(Client::new(sent.clone(), "default"));
        let request = |method: Method| Request::builder().method(method).uri("/api/v1/namespaces/default/configmaps/x");
        let get = request(Method::GET).body(Body::empty()).expect("request");
        assert!(client.send(get).await.is_ok());
        for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            let write = request(method.clone()).body(Body::empty()).expect("request");
            let refused = client.send(write).await.expect_err("a write without a term");
            assert!(refused.to_string().contains("not the leader"), "{method}: {refused}");
        }
        assert_eq!(*sent.0.lock().expect("lock"), vec![Method::GET], "refused writes never left");

        authority.grant(Instant::now() + Duration::from_secs(60));
        let write = request(Method::PATCH).body(Body::empty()).expect("request");
        assert!(client.send(write).await.is_ok());
        assert_eq!(sent.0.lock().expect("lock").last(), Some(&Method::PATCH));
    }
}
