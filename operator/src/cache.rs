//! Watch caches of the objects the operator owns.
//!
//! The controller needs a watch per owned kind anyway (a change or deletion
//! of an owned object triggers a reconcile), so each watch also fills a
//! reflector store, and the reconcile reads owned objects from there instead
//! of asking the apiserver: a settled cluster reconciles with no request.
//! The stores may briefly lag behind a write; that costs at most one
//! redundant apply, which the next watch event corrects.

use std::sync::Arc;

use futures::Stream;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::FIELD_MANAGER;
use crate::desired::LABEL_MANAGED_BY;
use crate::scope::Scope;

/// The stores of every owned kind, filled by the controller's watches.
#[derive(Clone)]
pub struct Owned {
    pub stateful_sets: Store<StatefulSet>,
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub config_maps: Store<ConfigMap>,
    pub disruption_budgets: Store<PodDisruptionBudget>,
    pub network_policies: Store<NetworkPolicy>,
    pub secrets: Store<Secret>,
    ready: watch::Receiver<Option<bool>>,
}

/// A kind whose objects the operator owns and caches.
pub trait OwnedKind:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + Clone
    + DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    fn store(owned: &Owned) -> &Store<Self>;
}

macro_rules! owned_kind {
    ($kind:ty, $field:ident) => {
        impl OwnedKind for $kind {
            fn store(owned: &Owned) -> &Store<Self> {
                &owned.$field
            }
        }
    };
}
owned_kind!(StatefulSet, stateful_sets);
owned_kind!(Deployment, deployments);
owned_kind!(Service, services);
owned_kind!(ConfigMap, config_maps);
owned_kind!(PodDisruptionBudget, disruption_budgets);
owned_kind!(NetworkPolicy, network_policies);
owned_kind!(Secret, secrets);

impl Owned {
    /// The cached object, if the watch has seen it.
    pub fn get<K: OwnedKind>(&self, namespace: &str, name: &str) -> Option<Arc<K>> {
        K::store(self).get(&ObjectRef::new(name).within(namespace))
    }

    /// Every cached object of kind `K` that `keep` selects.
    pub fn select<K: OwnedKind>(&self, keep: impl Fn(&K) -> bool) -> Vec<Arc<K>> {
        K::store(self).state().into_iter().filter(|o| keep(o)).collect()
    }

    /// Waits until every watch has listed once (a reconcile before that
    /// would take every object for missing); false when a watch ended first.
    pub async fn wait_until_ready(&self) -> bool {
        let mut ready = self.ready.clone();
        matches!(ready.wait_for(Option::is_some).await.map(|r| *r), Ok(Some(true)))
    }
}

/// Whether every store has been filled once. A store's own readiness wakes
/// only its most recent waiter, so one task waits on the stores and
/// reconciles wait on its answer.
fn readiness(owned: &Owned) -> watch::Receiver<Option<bool>> {
    let (tx, rx) = watch::channel(None);
    let owned = owned.clone();
    tokio::spawn(async move {
        let results = futures::join!(
            owned.stateful_sets.wait_until_ready(),
            owned.deployments.wait_until_ready(),
            owned.services.wait_until_ready(),
            owned.config_maps.wait_until_ready(),
            owned.disruption_budgets.wait_until_ready(),
            owned.network_policies.wait_until_ready(),
            owned.secrets.wait_until_ready(),
        );
        let all = results.0.is_ok()
            && results.1.is_ok()
            && results.2.is_ok()
            && results.3.is_ok()
            && results.4.is_ok()
            && results.5.is_ok()
            && results.6.is_ok();
        let _ = tx.send(Some(all));
    });
    rx
}

/// The streams that feed [`Owned`]; each yields the objects it touched, to
/// trigger the reconcile of their owner.
pub struct Watches {
    pub owned: Owned,
    pub stateful_sets: WatchStream<StatefulSet>,
    pub deployments: WatchStream<Deployment>,
    pub services: WatchStream<Service>,
    pub config_maps: WatchStream<ConfigMap>,
    pub disruption_budgets: WatchStream<PodDisruptionBudget>,
    pub network_policies: WatchStream<NetworkPolicy>,
    pub secrets: WatchStream<Secret>,
}

pub type WatchStream<K> = std::pin::Pin<Box<dyn Stream<Item = Result<K, watcher::Error>> + Send>>;

/// Watches of the objects the operator labelled as its own, in `scope`.
pub fn watches(client: &Client, scope: &Scope) -> Watches {
    let labelled = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={FIELD_MANAGER}"));
    let (stateful_sets, sts) = cached(scope.api(client.clone()), &labelled);
    let (deployments, deploy) = cached(scope.api(client.clone()), &labelled);
    let (services, svc) = cached(scope.api(client.clone()), &labelled);
    let (config_maps, cm) = cached(scope.api(client.clone()), &labelled);
    let (disruption_budgets, pdb) = cached(scope.api(client.clone()), &labelled);
    let (network_policies, netpol) = cached(scope.api(client.clone()), &labelled);
    let (secrets, secret) = cached(scope.api(client.clone()), &labelled);
    let (_, not_yet) = watch::channel(None);
    let mut owned = Owned {
        stateful_sets,
        deployments,
        services,
        config_maps,
        disruption_budgets,
        network_policies,
        secrets,
        ready: not_yet,
    };
    owned.ready = readiness(&owned);
    Watches {
        owned,
        stateful_sets: sts,
        deployments: deploy,
        services: svc,
        config_maps: cm,
        disruption_budgets: pdb,
        network_policies: netpol,
        secrets: secret,
    }
}

fn cached<K: OwnedKind>(api: Api<K>, config: &watcher::Config) -> (Store<K>, WatchStream<K>) {
    let (store, writer) = reflector::store();
    let stream = watcher(api, config.clone()).default_backoff().reflect(writer).touched_objects();
    (store, Box::pin(stream))
}
