//! The operator's error type.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API request failed while {action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("ChatCluster has no namespace")]
    NoNamespace,
    #[error("cannot serialize {what}: {source}")]
    Serialize {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot generate a signing key: {0}")]
    Random(String),
    #[error("the watch caches of owned objects stopped")]
    CacheClosed,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A bounded label for the errors metric (never the error text).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube_api",
            Error::NoNamespace => "no_namespace",
            Error::Serialize { .. } => "serialize",
            Error::Random(_) => "random",
            Error::CacheClosed => "cache_closed",
        }
    }

    /// What the apiserver said (its message names the field), or the whole
    /// error when the request did not get an answer.
    pub fn api_message(&self) -> String {
        match self {
            Error::Kube { source: kube::Error::Api(status), .. } => stable_message(status),
            other => other.to_string(),
        }
    }

    /// Wraps a kube error with what the operator was doing.
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let action = action.into();
        move |source| Error::Kube { action, source }
    }
}

/// The apiserver's message, the same for the same problems: when it lists
/// causes (an invalid object), they are sorted, since the apiserver lists
/// them in an order that changes from one request to the next (and a
/// status message that changes with it would be rewritten without end).
pub fn stable_message(status: &kube::core::Status) -> String {
    let Some(details) = status.details.as_ref().filter(|d| !d.causes.is_empty()) else {
        return status.message.clone();
    };
    let mut causes: Vec<String> = details
        .causes
        .iter()
        .map(|c| if c.field.is_empty() { c.message.clone() } else { format!("{}: {}", c.field, c.message) })
        .collect();
    causes.sort();
    causes.dedup();
    let what = match (details.kind.as_str(), details.name.as_str()) {
        ("", "") => "the object".to_string(),
        (kind, "") => kind.to_string(),
        (kind, name) => format!("{kind} {name:?}"),
    };
    format!("{what} is invalid: {}", causes.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::response::{StatusCause, StatusDetails};

    fn invalid(causes: &[(&str, &str)]) -> kube::core::Status {
        let mut status = kube::core::Status::failure("StatefulSet.apps \"shop-gateway\" is invalid: [...]", "Invalid");
        status.details = Some(StatusDetails {
            name: "shop-gateway".into(),
            group: "apps".into(),
            kind: "StatefulSet".into(),
            uid: String::new(),
            causes: causes
                .iter()
                .map(|(field, message)| StatusCause {
                    reason: "FieldValueInvalid".into(),
                    message: (*message).into(),
                    field: (*field).into(),
                })
                .collect(),
            retry_after_seconds: 0,
        });
        status
    }

    /// The same errors in another order are the same message.
    #[test]
    fn causes_in_any_order_read_the_same() {
        let a = invalid(&[
            ("spec.a.requests", "must be less than or equal to cpu limit"),
            ("spec.b.requests", "must be less than or equal to memory limit"),
        ]);
        let b = invalid(&[
            ("spec.b.requests", "must be less than or equal to memory limit"),
            ("spec.a.requests", "must be less than or equal to cpu limit"),
        ]);
        assert_eq!(stable_message(&a), stable_message(&b));
        assert!(stable_message(&a).starts_with("StatefulSet \"shop-gateway\" is invalid: spec.a.requests: must be"));
        let plain = kube::core::Status::failure("conflict", "Conflict");
        assert_eq!(stable_message(&plain), "conflict", "no causes: the message as it is");
    }
}
