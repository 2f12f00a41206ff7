//! One cluster's round: poll its gateways, decide whether the list changed
//! in a way clients care about, and write it over the ConfigMap as a
//! compare-and-swap. Apart from the loop, which only schedules rounds, each
//! a task of its own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use kubechat_crds::ChatCluster;
use serde_json::json;
use tokio::sync::Semaphore;

use super::endpoints::{self, Decision, Endpoints, GatewayEndpoint, Policy, format_time};
use super::gateways::{admin_addr, endpoint, same_pod};
use super::poll::{self, PollError};
use super::{FIELD_MANAGER, Options, interval, poll_timeout};
use crate::desired::gateway::ENDPOINTS_KEY;
use crate::metrics::Metrics;
use crate::{Error, Result};

/// The loop's own record of its last write, for when the ConfigMap cache
/// has not caught up with it yet.
#[derive(Clone, Debug)]
pub(super) struct LastWrite {
    /// The ConfigMap's resourceVersion before the write.
    previous_version: Option<String>,
    /// Its resourceVersion after the write.
    written_version: Option<String>,
    doc: Endpoints,
}

/// The list as published and the ConfigMap version it is in: the cached
/// ConfigMap's, unless the cache still shows it as it was before the loop's
/// own last write.
fn published(config_map: &ConfigMap, last_write: Option<&LastWrite>) -> (Option<Endpoints>, Option<String>) {
    let version = config_map.resource_version();
    match last_write {
        Some(w) if w.previous_version.is_some() && w.previous_version == version => {
            (Some(w.doc.clone()), w.written_version.clone())
        }
        _ => {
            let text = config_map.data.as_ref().and_then(|d| d.get(ENDPOINTS_KEY));
            (text.and_then(|t| Endpoints::parse(t)), version)
        }
    }
}

/// One poll-and-maybe-write of one cluster.
pub(super) struct Round {
    pub(super) client: Client,
    pub(super) cc: Arc<ChatCluster>,
    pub(super) pods: Vec<Arc<Pod>>,
    /// Each pod's zone, by pod name (from its node's labels).
    pub(super) zones: BTreeMap<String, String>,
    pub(super) config_map: Option<Arc<ConfigMap>>,
    pub(super) last_write: Option<LastWrite>,
    pub(super) permits: Arc<Semaphore>,
    pub(super) metrics: Metrics,
    pub(super) options: Options,
}

impl Round {
    pub(super) async fn run(self) -> Result<Option<LastWrite>> {
        // The reconcile creates the ConfigMap (labels, owner); wait for it.
        let Some(config_map) = self.config_map.clone() else { return Ok(None) };
        let (published, version) = published(&config_map, self.last_write.as_ref());
        let target = self.cc.spec.gateway.autoscale.as_ref().map(|a| a.target_connections_per_pod);
        let policy = Policy::new(interval(&self.cc)).with_scale_target(target.and_then(|t| u64::try_from(t).ok()));
        let timeout = poll_timeout(policy.interval);
        let previous: BTreeMap<&str, &GatewayEndpoint> =
            published.iter().flat_map(|p| &p.gateways).map(|g| (g.pod.as_str(), g)).collect();

        let (this, previous) = (&self, &previous);
        let polls = self.pods.iter().map(|pod| {
            let permits = this.permits.clone();
            async move {
                let polled = match this.admin_addr(pod) {
                    Err(e) => Err(e),
                    Ok(addr) => {
                        let _permit = permits.acquire_owned().await;
                        // One retry after a timeout (a pause, a busy node) before the
                        // gateway counts as unreachable; a refusal is final.
                        let polled = match poll::read_load(addr, timeout).await {
                            Err(PollError::Timeout(_)) => poll::read_load(addr, timeout).await,
                            other => other,
                        };
                        polled.and_then(|r| same_pod(pod, r))
                    }
                };
                let result = polled.as_ref().map_or_else(PollError::label, |_| "ok");
                this.metrics.polls.with_label_values(&[result]).inc();
                if let Err(e) = &polled {
                    tracing::debug!(pod = %pod.name_any(), error = %e, "gateway load not read");
                }
                let mut entry = endpoint(pod, polled, previous.get(pod.name_any().as_str()).copied(), &this.cc);
                entry.zone = this.zones.get(&entry.pod).cloned();
                entry
            }
        });
        let mut observed: Vec<GatewayEndpoint> = futures::future::join_all(polls).await;
        observed.sort_by(|a, b| a.pod.cmp(&b.pod));

        let Decision::Write { reason, after } =
            endpoints::decide(published.as_ref(), &observed, Timestamp::now(), &policy)
        else {
            return Ok(None);
        };
        tokio::time::sleep(after).await;
        let doc = Endpoints { updated_at: format_time(Timestamp::now()), gateways: observed };
        let Some(written_version) = self.write(&config_map, version.as_deref(), &doc).await? else {
            return Ok(None);
        };
        self.metrics.endpoint_writes.with_label_values(&[reason.label()]).inc();
        tracing::info!(
            cluster = %self.cc.name_any(),
            namespace = self.cc.namespace().unwrap_or_default(),
            reason = reason.label(),
            gateways = doc.gateways.len(),
            ready = doc.gateways.iter().filter(|g| g.ready).count(),
            connections = doc.total_connections(),
            "endpoint list published"
        );
        let written_version = Some(written_version).filter(|v| !v.is_empty());
        Ok(Some(LastWrite { previous_version: config_map.resource_version(), written_version, doc }))
    }

    fn admin_addr(&self, pod: &Pod) -> Result<SocketAddr, PollError> {
        admin_addr(pod, &self.cc, self.options.loopback_only)
    }

    /// Writes `doc` over the ConfigMap at `version`, returning the new
    /// version; `None` when the ConfigMap changed meanwhile or is gone (the
    /// next round decides again). A merge patch, not an apply: it never
    /// creates the ConfigMap (an apply would re-create one the garbage
    /// collector just deleted with its ChatCluster, without an owner), and
    /// the resourceVersion makes it a compare-and-swap.
    async fn write(&self, config_map: &ConfigMap, version: Option<&str>, doc: &Endpoints) -> Result<Option<String>> {
        let name = config_map.name_any();
        let namespace = config_map.namespace().unwrap_or_default();
        let patch = json!({
            "metadata": {"resourceVersion": version},
            "data": {ENDPOINTS_KEY: doc.render()},
        });
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
        match Api::<ConfigMap>::namespaced(self.client.clone(), &namespace)
            .patch(&name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(written) => Ok(Some(written.resource_version().unwrap_or_default())),
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {
                tracing::debug!(
                    namespace,
                    name,
                    code = status.code,
                    "endpoint list not written: changed or gone meanwhile"
                );
                Ok(None)
            }
            Err(e) => Err(Error::kube(format!("writing the endpoint list {namespace}/{name}"))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    #[test]
    fn the_cache_is_trusted_unless_it_lags_behind_our_own_write() {
        let doc = |n: u64| Endpoints {
            updated_at: "2025-01-01T00:00:00.000Z".into(),
            gateways: vec![GatewayEndpoint { pod: "a".into(), connections: n, ..Default::default() }],
        };
        let cm = |version: &str, d: &Endpoints| ConfigMap {
            metadata: ObjectMeta { resource_version: Some(version.into()), ..Default::default() },
            data: Some(BTreeMap::from([(ENDPOINTS_KEY.to_string(), d.render())])),
            ..Default::default()
        };
        let ours = LastWrite { previous_version: Some("10".into()), written_version: Some("11".into()), doc: doc(2) };
        let at = |d: Endpoints, v: &str| (Some(d), Some(v.to_string()));
        assert_eq!(published(&cm("10", &doc(1)), Some(&ours)), at(doc(2), "11"), "cache still at the old version");
        assert_eq!(published(&cm("11", &doc(2)), Some(&ours)), at(doc(2), "11"));
        assert_eq!(published(&cm("12", &doc(3)), Some(&ours)), at(doc(3), "12"), "someone wrote since");
        assert_eq!(published(&cm("12", &doc(3)), None), at(doc(3), "12"));
        let empty = ConfigMap::default();
        assert_eq!(published(&empty, None), (None, None));
    }
}
