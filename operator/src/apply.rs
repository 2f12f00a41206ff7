//! Applying desired objects with server-side apply, but only when the live
//! object differs: an idle reconcile makes no write requests at all.
//!
//! "Differs" means some field we set is missing or has another value in the
//! live object ([`is_subset`]); fields the apiserver or other controllers
//! add (defaults, status, other managers' fields) never count. A manual edit
//! of a field we own is therefore undone at the next reconcile.

use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde::Serialize;
use serde_json::Value;

use crate::cache::{Owned, OwnedKind};
use crate::calls::{Verb, counted};
use crate::desired::DesiredObject;
use crate::{Error, FIELD_MANAGER, Result};

/// What applying one object did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated,
    Unchanged,
}

/// True when every field set in `desired` has the same value in `live`.
/// Arrays must have the same length and match element by element.
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    first_difference(desired, live).is_none()
}

/// The path of the first field set in `desired` that `live` lacks or holds
/// another value for (`None`: `desired` is a subset of `live`).
pub fn first_difference(desired: &Value, live: &Value) -> Option<String> {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().find_map(|(key, dv)| match l.get(key) {
            Some(lv) => first_difference(dv, lv).map(|path| format!(".{key}{path}")),
            None if dv.is_null() => None,
            None => Some(format!(".{key}")),
        }),
        (Value::Array(d), Value::Array(l)) if d.len() == l.len() => d
            .iter()
            .zip(l)
            .enumerate()
            .find_map(|(i, (dv, lv))| first_difference(dv, lv).map(|path| format!("[{i}]{path}"))),
        (Value::Number(d), Value::Number(l)) if d.as_f64() == l.as_f64() => None,
        _ if desired == live => None,
        _ => Some(String::new()),
    }
}

/// Applies one desired object unless the live one already matches.
/// The live object is read from the watch cache (`owned`), not the apiserver.
pub async fn apply(client: &Client, owned: &Owned, namespace: &str, object: &DesiredObject) -> Result<Outcome> {
    match object {
        DesiredObject::StatefulSet(o) => apply_typed(client, owned, namespace, o).await,
        DesiredObject::Deployment(o) => apply_typed(client, owned, namespace, o).await,
        DesiredObject::Service(o) => apply_typed(client, owned, namespace, o).await,
        DesiredObject::ConfigMap(o) => apply_typed(client, owned, namespace, o).await,
        DesiredObject::PodDisruptionBudget(o) => apply_typed(client, owned, namespace, o).await,
        DesiredObject::NetworkPolicy(o) => apply_typed(client, owned, namespace, o).await,
    }
}

async fn apply_typed<K>(client: &Client, owned: &Owned, namespace: &str, desired: &K) -> Result<Outcome>
where
    K: OwnedKind + Serialize,
{
    let name = desired.meta().name.clone().unwrap_or_default();
    let what = format!("{} {namespace}/{name}", K::kind(&()));
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let live = match owned.get::<K>(namespace, &name) {
        Some(cached) => Some(cached),
        // Not in the cache: new, or created so recently that the watch has
        // not delivered it. Only the apiserver can tell (and the Event say
        // "Created" once), so ask it: this happens once per object.
        None => counted(Verb::Get, api.get_opt(&name))
            .await
            .map_err(Error::kube(format!("reading {what}")))?
            .map(std::sync::Arc::new),
    };
    let desired_json =
        serde_json::to_value(desired).map_err(|source| Error::Serialize { what: what.clone(), source })?;
    let outcome = match &live {
        None => Outcome::Created,
        Some(live) => {
            let live_json = serde_json::to_value(live.as_ref())
                .map_err(|source| Error::Serialize { what: what.clone(), source })?;
            match first_difference(&desired_json, &live_json) {
                None => return Ok(Outcome::Unchanged),
                Some(path) => {
                    tracing::info!(object = %what, field = %path, "live object differs from the desired state");
                    Outcome::Updated
                }
            }
        }
    };
    counted(Verb::Patch, api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(desired)))
        .await
        .map_err(Error::kube(format!("applying {what}")))?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extra_live_fields_do_not_count() {
        let desired = json!({"spec": {"replicas": 3, "template": {"containers": [{"name": "a"}]}}});
        let live = json!({
            "spec": {"replicas": 3, "revisionHistoryLimit": 10,
                     "template": {"containers": [{"name": "a", "imagePullPolicy": "IfNotPresent"}]}},
            "status": {"readyReplicas": 1}
        });
        assert!(is_subset(&desired, &live));
    }

    #[test]
    fn changed_or_missing_fields_count() {
        let live = json!({"spec": {"replicas": 3, "ports": [{"port": 80}, {"port": 81}]}});
        assert!(!is_subset(&json!({"spec": {"replicas": 5}}), &live));
        assert!(!is_subset(&json!({"spec": {"paused": true}}), &live));
        assert!(!is_subset(&json!({"spec": {"ports": [{"port": 80}]}}), &live), "a removed list item counts");
        assert!(is_subset(&json!({"spec": {"ports": [{"port": 80}, {"port": 81}]}}), &live));
    }

    #[test]
    fn the_first_difference_is_named_by_path() {
        let live = json!({"spec": {"template": {"containers": [{"name": "a", "image": "x:1"}]}}});
        let desired = json!({"spec": {"template": {"containers": [{"name": "a", "image": "x:2"}]}}});
        assert_eq!(first_difference(&desired, &live).as_deref(), Some(".spec.template.containers[0].image"));
        assert_eq!(first_difference(&live, &live), None);
    }

    #[test]
    fn null_matches_absent_and_numbers_compare_by_value() {
        assert!(is_subset(&json!({"a": null}), &json!({})));
        assert!(is_subset(&json!({"a": 1}), &json!({"a": 1.0})));
        assert!(!is_subset(&json!({"a": "1"}), &json!({"a": 1})));
    }
}
