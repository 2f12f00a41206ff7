//! Pruning: deleting the owned objects a ChatCluster no longer wants (the
//! managed Redis's StatefulSet, Service, NetworkPolicy and password once
//! Redis is switched to external). Owner references only help when the
//! ChatCluster itself is deleted; while it lives, nobody else removes them.
//!
//! An object is pruned only when it is certainly this ChatCluster's: in the
//! watch caches (so labelled as managed by the operator), labelled with its
//! instance, controller-owned by its uid, and named by neither a desired
//! object nor a generated Secret. Deletes carry the uid as a precondition, so
//! an object re-created under the same name in between is never hit.

use std::any::Any;
use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, Preconditions, PropagationPolicy};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use kubechat_crds::ChatCluster;

use crate::Error;
use crate::cache::OwnedKind;
use crate::calls::{Verb, counted};
use crate::context::Context;
use crate::desired::secrets::GeneratedSecret;
use crate::desired::{self, DesiredObject, LABEL_INSTANCE};

/// Every object `cc` should have, as (kind, name): the desired objects
/// (including the endpoint ConfigMap the discovery loop fills) and the
/// Secrets the operator generates. Anything else the operator creates for a
/// ChatCluster must be named here, or it is pruned.
pub fn wanted(desired: &[DesiredObject], generated: &[GeneratedSecret]) -> BTreeSet<(&'static str, String)> {
    desired.iter().map(|o| (o.kind(), o.name())).chain(generated.iter().map(|s| ("Secret", s.name.clone()))).collect()
}

/// The objects among `cached` (all of one kind) that belong to `cc` and are
/// not `wanted`.
pub fn unwanted<K>(cc: &ChatCluster, wanted: &BTreeSet<(&'static str, String)>, cached: &[Arc<K>]) -> Vec<Arc<K>>
where
    K: Resource<DynamicType = ()>,
{
    let kind = K::kind(&());
    cached
        .iter()
        .filter(|o| belongs_to(cc, o.meta()))
        .filter(|o| o.meta().deletion_timestamp.is_none())
        .filter(|o| !wanted.iter().any(|(k, n)| *k == kind && Some(n) == o.meta().name.as_ref()))
        .cloned()
        .collect()
}

/// Whether `meta` is of an object `cc` created: same namespace, its instance
/// label, and `cc` (this very one, by uid) as controller owner.
fn belongs_to(cc: &ChatCluster, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    let Some(uid) = cc.metadata.uid.as_deref() else { return false };
    let labelled = meta.labels.as_ref().and_then(|l| l.get(LABEL_INSTANCE)) == Some(&cc.name_any());
    let owned = meta.owner_references.iter().flatten().any(|r| {
        r.controller == Some(true) && r.uid == uid && r.kind == ChatCluster::kind(&()) && r.name == cc.name_any()
    });
    labelled && owned && meta.namespace == cc.namespace()
}

/// What the Pruned Event says about an object beyond its name: for a
/// StatefulSet with claims, whether Kubernetes keeps them.
fn note_about(object: &dyn Any) -> Option<String> {
    object.downcast_ref::<StatefulSet>().and_then(desired::claims_note)
}

/// Deletes every object of `cc` that `desired` and its generated Secrets no
/// longer name. Returns the deletes the apiserver refused ("StatefulSet
/// chat-redis: …"), reported like refused applies: they do not stop the
/// reconcile.
pub async fn prune(cc: &ChatCluster, ctx: &Context, namespace: &str, desired: &[DesiredObject]) -> Vec<String> {
    let wanted = wanted(desired, &desired::generated_secrets(cc));
    let mut refused = Vec::new();
    prune_kind::<StatefulSet>(cc, ctx, namespace, &wanted, &mut refused).await;
    prune_kind::<Deployment>(cc, ctx, namespace, &wanted, &mut refused).await;
    prune_kind::<Service>(cc, ctx, namespace, &wanted, &mut refused).await;
    prune_kind::<ConfigMap>(cc, ctx, namespace, &wanted, &mut refused).await;
    prune_kind::<PodDisruptionBudget>(cc, ctx, namespace, &wanted, &mut refused).await;
    prune_kind::<NetworkPolicy>(cc, ctx, namespace, &wanted, &mut refused).await;
    prune_kind::<Secret>(cc, ctx, namespace, &wanted, &mut refused).await;
    refused
}

async fn prune_kind<K: OwnedKind>(
    cc: &ChatCluster,
    ctx: &Context,
    namespace: &str,
    wanted: &BTreeSet<(&'static str, String)>,
    refused: &mut Vec<String>,
) {
    let cached = ctx.owned.select::<K>(|o| o.meta().namespace.as_deref() == Some(namespace));
    for object in unwanted(cc, wanted, &cached) {
        let (kind, name) = (K::kind(&()).to_string(), object.name_any());
        let kind = kind.as_str();
        let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
        let params = DeleteParams {
            preconditions: Some(Preconditions { uid: object.meta().uid.clone(), resource_version: None }),
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        match counted(Verb::Delete, api.delete(&name, &params)).await {
            Ok(_) => {}
            // Already gone, or another object by now (the uid precondition failed).
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => continue,
            Err(e) => {
                let e = Error::kube(format!("deleting {kind} {namespace}/{name}"))(e);
                ctx.metrics.errors.with_label_values(&["prune"]).inc();
                tracing::warn!(kind, object = name, error = %e, "delete refused");
                refused.push(format!("{kind} {name}: no longer wanted, but deleting it failed: {}", e.api_message()));
                continue;
            }
        }
        ctx.metrics.writes.inc();
        ctx.metrics.objects_applied.with_label_values(&[kind, "deleted"]).inc();
        tracing::info!(kind, object = name, "pruned");
        let mut note = format!("Deleted {kind} {name}: the ChatCluster's spec no longer calls for it");
        if let Some(more) = note_about(object.as_ref() as &dyn Any) {
            note = format!("{note}; {more}");
        }
        let event = Event {
            type_: EventType::Normal,
            reason: "Pruned".into(),
            note: Some(note),
            action: "Prune".into(),
            secondary: Some(object.object_ref(&())),
        };
        ctx.publish(cc, event).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::fixtures::ChatClusterExt;
    use crate::desired::{desired_objects, generated_secrets};
    use kubechat_crds::ExternalRedis;

    fn to_external_redis(cc: ChatCluster) -> ChatCluster {
        cc.with_spec(|s| {
            s.redis.managed = None;
            s.redis.external = Some(ExternalRedis {
                url: "redis://cache:6379".into(),
                password_secret: None,
                cluster: false,
                seed_urls: Vec::new(),
            });
        })
    }

    /// The objects a cluster has once applied, as the caches hold them.
    fn cached<K: Clone>(objects: impl IntoIterator<Item = K>) -> Vec<Arc<K>> {
        objects.into_iter().map(Arc::new).collect()
    }

    fn live_stateful_sets(cc: &ChatCluster) -> Vec<Arc<StatefulSet>> {
        cached(desired_objects(cc, cc.spec.gateway.replicas, &Default::default()).into_iter().filter_map(|o| match o {
            DesiredObject::StatefulSet(s) => Some(s),
            _ => None,
        }))
    }

    fn names<K: Resource>(objects: &[Arc<K>]) -> Vec<String> {
        objects.iter().map(|o| o.meta().name.clone().unwrap_or_default()).collect()
    }

    fn wanted_for(cc: &ChatCluster) -> BTreeSet<(&'static str, String)> {
        wanted(&desired_objects(cc, cc.spec.gateway.replicas, &Default::default()), &generated_secrets(cc))
    }

    #[test]
    fn nothing_is_unwanted_while_the_spec_is_unchanged() {
        let cc = ChatCluster::test();
        assert!(unwanted(&cc, &wanted_for(&cc), &live_stateful_sets(&cc)).is_empty());
        let secrets = cached(generated_secrets(&cc).iter().map(|g| g.build(&cc, &[1])));
        assert!(unwanted(&cc, &wanted_for(&cc), &secrets).is_empty());
        let wanted = wanted_for(&cc);
        assert!(wanted.contains(&("ConfigMap", "chat-endpoints".to_string())), "the discovery loop's ConfigMap");
    }

    #[test]
    fn switching_redis_to_external_leaves_its_objects_unwanted() {
        let before = ChatCluster::test();
        let after = to_external_redis(before.clone());
        let wanted = wanted_for(&after);
        assert_eq!(names(&unwanted(&after, &wanted, &live_stateful_sets(&before))), ["chat-redis"]);
        let secrets = cached(generated_secrets(&before).iter().map(|g| g.build(&before, &[1])));
        assert_eq!(names(&unwanted(&after, &wanted, &secrets)), ["chat-redis-password"]);
        let all: Vec<(&str, String)> = desired_objects(&before, before.spec.gateway.replicas, &Default::default())
            .iter()
            .map(|o| (o.kind(), o.name()))
            .filter(|k| !wanted.contains(k))
            .collect();
        assert_eq!(
            all,
            [
                ("NetworkPolicy", "chat-redis".to_string()),
                ("Service", "chat-redis".to_string()),
                ("StatefulSet", "chat-redis".to_string())
            ]
        );
    }

    #[test]
    fn objects_of_others_are_never_unwanted() {
        let before = ChatCluster::test();
        let after = to_external_redis(before.clone());
        let wanted = wanted_for(&after);
        let base = live_stateful_sets(&before)
            .into_iter()
            .find(|s| s.name_any() == "chat-redis")
            .map(|s| (*s).clone())
            .expect("redis");
        let check = |s: &StatefulSet| unwanted(&after, &wanted, &[Arc::new(s.clone())]).is_empty();

        // Another ChatCluster's (another instance label and owner).
        let mut other = ChatCluster::test();
        other.metadata.name = Some("other".into());
        other.metadata.uid = Some("00000000-0000-0000-0000-000000000002".into());
        let theirs = live_stateful_sets(&other).into_iter().find(|s| s.name_any() == "other-redis").expect("redis");
        assert!(check(&theirs));

        // A ChatCluster of the same name deleted before: another uid.
        let mut s = base.clone();
        s.metadata.owner_references.as_mut().expect("owner")[0].uid = "old".into();
        assert!(check(&s));
        // Owned, but not as controller.
        let mut s = base.clone();
        s.metadata.owner_references.as_mut().expect("owner")[0].controller = Some(false);
        assert!(check(&s));
        // No instance label.
        let mut s = base.clone();
        s.metadata.labels.as_mut().expect("labels").remove(LABEL_INSTANCE);
        assert!(check(&s));
        // Another namespace.
        let mut s = base.clone();
        s.metadata.namespace = Some("team-b".into());
        assert!(check(&s));
        // Already being deleted: not again (and no second Event).
        let mut s = base.clone();
        s.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert!(check(&s));
        // The object itself is unwanted.
        assert!(!check(&base));
    }

    #[test]
    fn the_event_of_a_pruned_backend_says_whether_its_claims_stay() {
        let cc = ChatCluster::test();
        let redis = live_stateful_sets(&cc).into_iter().find(|s| s.name_any() == "chat-redis").expect("redis");
        let note = note_about(redis.as_ref() as &dyn Any).expect("a note");
        assert!(
            note.contains("kept") && note.contains("spec.redis.managed.storage.pvcRetention.whenDeleted"),
            "{note}"
        );
        let gateway = live_stateful_sets(&cc).into_iter().find(|s| s.name_any() == "chat-gateway").expect("gateway");
        assert_eq!(note_about(gateway.as_ref() as &dyn Any), None, "no claims, nothing to say");
        let service = Service::default();
        assert_eq!(note_about(&service as &dyn Any), None);
    }
}
