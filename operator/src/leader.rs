//! Leader election on a `coordination.k8s.io/v1` Lease, so the operator can
//! run with several replicas while exactly one reconciles.
//!
//! The holder renews the Lease every `renew_every`; a candidate takes it over
//! once `renewTime + leaseDurationSeconds` has passed. Every write carries the
//! Lease's `resourceVersion`, so two candidates racing for an expired Lease
//! cannot both win: the loser gets a conflict. A leader that cannot renew
//! within the lease duration steps down before anyone else may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    /// Unique per replica (the pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaderConfig,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}

/// The Lease spec one election round writes, from the spec it read at `now`:
/// renewed if `me` holds it, taken over if it is free or expired (by the
/// holder's own duration), or `None` while another holder's is still valid.
fn claim(current: Option<&LeaseSpec>, me: &str, now: Timestamp, lease_seconds: i32) -> Option<LeaseSpec> {
    let mut spec = current.cloned().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder != me {
        let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
        let expired = match &spec.renew_time {
            Some(MicroTime(renewed)) => renewed.saturating_add(duration).is_ok_and(|end| end < now),
            None => true,
        };
        if !holder.is_empty() && !expired {
            return None;
        }
        spec.holder_identity = Some(me.to_string());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(lease_seconds);
    Some(spec)
}

/// Whether a replica last renewed at `last_renewal` may still act as leader
/// at `now`: not once a lease duration has passed without a renewal.
fn still_leading(last_renewal: Option<tokio::time::Instant>, now: tokio::time::Instant, lease: Duration) -> bool {
    last_renewal.is_some_and(|t| now.saturating_duration_since(t) < lease)
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaderConfig) -> Self {
        Self { api: Api::namespaced(client, &config.namespace), config }
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One round: take the Lease if free or expired, renew it if ours.
    /// Returns whether this replica holds it now.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let me = &self.config.identity;
        let Some(mut lease) =
            self.api.get_opt(&self.config.lease_name).await.map_err(Error::kube("reading the leader Lease"))?
        else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.config.lease_name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(self.lease_seconds()),
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
        let Some(claimed) = claim(lease.spec.as_ref(), me, now, self.lease_seconds()) else {
            return Ok(false);
        };
        lease.spec = Some(claimed);
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

    /// Keeps trying until `shutdown`, publishing leadership on `leading`.
    /// Releases the Lease on the way out if it holds it.
    pub async fn run(self, leading: watch::Sender<bool>, shutdown: CancellationToken) {
        let mut last_renewal: Option<tokio::time::Instant> = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = Some(tokio::time::Instant::now()),
                Ok(false) => last_renewal = None,
                Err(e) => tracing::warn!(error = %e, "leader election round failed"),
            }
            // Step down before the Lease can expire for others.
            let holding = still_leading(last_renewal, tokio::time::Instant::now(), self.config.lease_duration);
            leading.send_if_modified(|was| {
                let changed = *was != holding;
                if changed {
                    tracing::info!(identity = %self.config.identity, leading = holding, "leadership changed");
                }
                *was = holding;
                changed
            });
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.config.renew_every) => {}
            }
        }
        if *leading.borrow() {
            leading.send_replace(false);
            if let Err(e) = self.release().await {
                tracing::warn!(error = %e, "could not release the leader Lease");
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
        let renewed = claim(Some(&held_by("me", 10, 15)), "me", at(12), 15).expect("renewed");
        assert_eq!(renewed.holder_identity.as_deref(), Some("me"));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(12))));
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(0))), "still the first acquisition");
        assert_eq!(renewed.lease_transitions, Some(2));
    }

    #[test]
    fn a_valid_lease_of_another_is_left_alone_until_it_expires() {
        let lease = held_by("other", 10, 15);
        assert_eq!(claim(Some(&lease), "me", at(11), 15), None);
        // Expiry is strictly after renewTime + leaseDurationSeconds.
        assert_eq!(claim(Some(&lease), "me", at(25), 15), None);
        let taken = claim(Some(&lease), "me", at(26), 15).expect("expired: taken over");
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(26))));
        assert_eq!(taken.renew_time, Some(MicroTime(at(26))));
        assert_eq!(taken.lease_transitions, Some(3));
    }

    #[test]
    fn expiry_follows_the_holders_duration_not_ours() {
        // The holder promised 60 s; a candidate configured for 3 s waits them out.
        let lease = held_by("other", 10, 60);
        assert_eq!(claim(Some(&lease), "me", at(30), 3), None);
        let taken = claim(Some(&lease), "me", at(71), 3).expect("expired");
        assert_eq!(taken.lease_duration_seconds, Some(3), "from now on, ours");
        // Without a duration, the Kubernetes default of 15 s.
        let unspecified = LeaseSpec { lease_duration_seconds: None, ..held_by("other", 10, 0) };
        assert_eq!(claim(Some(&unspecified), "me", at(25), 3), None);
        assert!(claim(Some(&unspecified), "me", at(26), 3).is_some());
    }

    #[test]
    fn a_released_or_never_renewed_lease_is_taken_at_once() {
        let released = LeaseSpec { holder_identity: None, ..held_by("", 10, 15) };
        let taken = claim(Some(&released), "me", at(11), 15).expect("free");
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
        assert_eq!(taken.lease_transitions, Some(3));
        let never_renewed = LeaseSpec { renew_time: None, ..held_by("other", 0, 15) };
        assert!(claim(Some(&never_renewed), "me", at(1), 15).is_some());
        let empty = claim(None, "me", at(1), 15).expect("a Lease without spec is free");
        assert_eq!(empty.lease_transitions, Some(1));
    }

    #[test]
    fn a_leader_that_cannot_renew_steps_down_after_one_lease_duration() {
        let start = tokio::time::Instant::now();
        let lease = Duration::from_secs(3);
        assert!(!still_leading(None, start, lease), "never renewed");
        assert!(still_leading(Some(start), start, lease));
        assert!(still_leading(Some(start), start + Duration::from_millis(2999), lease));
        assert!(!still_leading(Some(start), start + lease, lease));
    }
}
