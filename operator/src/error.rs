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
            Error::Kube { source: kube::Error::Api(status), .. } => status.message.clone(),
            other => other.to_string(),
        }
    }

    /// Wraps a kube error with what the operator was doing.
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let action = action.into();
        move |source| Error::Kube { action, source }
    }
}
