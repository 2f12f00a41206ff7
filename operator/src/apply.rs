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
use crate::quantity::{self, Precision};
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
///
/// Quantities compare by value (`1024Mi` is `1Gi`), since the apiserver
/// rewrites them; whether a value is a quantity is decided by where it sits
/// ([`quantity_at`]), never by whether it looks like a number.
pub fn first_difference(desired: &Value, live: &Value) -> Option<String> {
    difference(desired, live, [None, None])
}

/// `parents`: the keys of the two enclosing objects, innermost last (`None`
/// across an array).
fn difference(desired: &Value, live: &Value, parents: [Option<&str>; 2]) -> Option<String> {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().find_map(|(key, dv)| match l.get(key) {
            Some(lv) if same_quantity(quantity_at(parents, key), dv, lv) => None,
            Some(lv) => difference(dv, lv, [parents[1], Some(key)]).map(|path| format!(".{key}{path}")),
            None if dv.is_null() => None,
            None => Some(format!(".{key}")),
        }),
        (Value::Array(d), Value::Array(l)) if d.len() == l.len() => d
            .iter()
            .zip(l)
            .enumerate()
            .find_map(|(i, (dv, lv))| difference(dv, lv, [None, None]).map(|path| format!("[{i}]{path}"))),
        (Value::Number(d), Value::Number(l)) if d.as_f64() == l.as_f64() => None,
        _ if desired == live => None,
        _ => Some(String::new()),
    }
}

/// Whether the value under `key`, inside objects keyed `parents`, is a
/// quantity, and at what precision the apiserver stores it.
fn quantity_at(parents: [Option<&str>; 2], key: &str) -> Option<Precision> {
    match (parents, key) {
        // Resource lists: containers' and pods' `resources`, claims' `resources.requests.storage`.
        ([Some("resources"), Some("requests" | "limits")], _) => Some(Precision::Milli),
        ([_, Some("overhead")], _) => Some(Precision::Milli),
        ([_, Some("emptyDir")], "sizeLimit") => Some(Precision::Nano),
        ([_, Some("resourceFieldRef")], "divisor") => Some(Precision::Nano),
        _ => None,
    }
}

/// Both values are the same quantity (either may be a string or a number).
fn same_quantity(precision: Option<Precision>, desired: &Value, live: &Value) -> bool {
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    match (precision, text(desired), text(live)) {
        (Some(precision), Some(d), Some(l)) => quantity::same(&d, &l, precision),
        _ => false,
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

    /// What the apiserver stores for a StatefulSet written with
    /// non-canonical quantities (as read back from the local control plane).
    #[test]
    fn quantities_compare_by_value_where_they_are_quantities() {
        let sts = |cpu: &str, memory: &str, storage: &str, tmp: &str| {
            json!({"spec": {
                "template": {"spec": {
                    "containers": [{"name": "a", "resources": {"requests": {"cpu": cpu, "memory": memory},
                                                               "limits": {"memory": memory}}}],
                    "overhead": {"cpu": cpu},
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": tmp}}],
                }},
                "volumeClaimTemplates": [{"spec": {"resources": {"requests": {"storage": storage}}}}],
            }})
        };
        let desired = sts("0.5", "1024Mi", "1.5Gi", "1000000n");
        let live = sts("500m", "1Gi", "1536Mi", "1m");
        assert_eq!(first_difference(&desired, &live), None);
        // Rounded up to milli-units in resource lists only.
        assert_eq!(first_difference(&sts("0.1n", "1Gi", "1Gi", "1n"), &sts("1m", "1Gi", "1Gi", "1n")), None);
        assert_eq!(
            first_difference(&sts("1", "1Gi", "1Gi", "0.1n"), &sts("1", "1Gi", "1Gi", "1m")).as_deref(),
            Some(".spec.template.spec.volumes[0].emptyDir.sizeLimit")
        );
        // A real change is still one.
        assert_eq!(
            first_difference(&sts("1", "1Gi", "2Gi", "1Gi"), &sts("1", "1Gi", "1Gi", "1Gi")).as_deref(),
            Some(".spec.volumeClaimTemplates[0].spec.resources.requests.storage")
        );
        assert_eq!(
            first_difference(&sts("1", "1G", "1Gi", "1Gi"), &sts("1", "1Gi", "1Gi", "1Gi")).as_deref(),
            Some(".spec.template.spec.containers[0].resources.limits.memory")
        );
        // Not quantities: compared literally, whatever they look like.
        assert!(!is_subset(&json!({"lots": "lots"}), &json!({"lots": "much"})));
        assert!(is_subset(
            &json!({"resources": {"requests": {"x": "lots"}}}),
            &json!({"resources": {"requests": {"x": "lots"}}})
        ));
    }

    #[test]
    fn number_like_strings_elsewhere_compare_literally() {
        let env = |value: &str| json!({"env": [{"name": "N", "value": value}], "args": [value]});
        assert!(!is_subset(&env("1"), &env("1.0")));
        assert!(!is_subset(&json!({"annotations": {"size": "1024Mi"}}), &json!({"annotations": {"size": "1Gi"}})));
        assert!(
            !is_subset(&json!({"requests": {"cpu": "0.5"}}), &json!({"requests": {"cpu": "500m"}})),
            "no `resources` parent"
        );
        assert!(!is_subset(&json!({"sizeLimit": "1"}), &json!({"sizeLimit": "1.0"})), "sizeLimit outside emptyDir");
    }
}
