//! The kubechat operator: turns each `ChatCluster` into running gateways,
//! Redis, ScyllaDB and push workers, and reports their state.
//!
//! Layout (the reconcile reads like the design: observe → desired → apply → status):
//! - [`reconcile`]: the controller and the top-level reconcile.
//! - [`context`]: what every reconcile shares (client, caches, Events, backoff).
//! - [`observe`]: reads what exists (owned objects, referenced Secrets).
//! - [`desired`]: pure builders, `ChatCluster` spec → Kubernetes objects.
//! - [`apply`]: server-side apply of desired objects, skipping those already in place.
//! - [`quantity`]: exact reading of Kubernetes quantities, to compare them by value.
//! - [`prune`]: deletes owned objects the spec no longer calls for.
//! - [`status`]: pure computation of the status and its conditions.
//! - [`discovery`]: polls every gateway's load and publishes the endpoint
//!   ConfigMap (a loop beside the controller; the reconcile only reads it).
//! - [`scale`]: how many gateways: `replicas`, or what the connections call
//!   for under `autoscale` (pure); gateways are removed only after a drain.
//! - [`rollout`]: drains gateways one pod at a time, highest ordinal first,
//!   to replace them when their pod template changes or to remove them when
//!   the cluster shrinks (a pure plan and a driver the reconcile calls).
//! - [`run`]: runs the controller while this replica leads.
//! - [`leader`]: leader election on a `coordination.k8s.io` Lease.
//! - [`cache`]: watch caches of owned objects, read by the reconcile.
//! - [`calls`]: counts the API requests of each reconcile.
//! - [`metrics`] and [`admin`]: Prometheus metrics and the health/metrics HTTP server.
//! - [`scope`]: which namespaces are watched; [`time`]: status times.
//! - [`error`]: the crate's error type.

pub mod admin;
pub mod apply;
pub mod cache;
pub mod calls;
pub mod context;
pub mod desired;
pub mod discovery;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod prune;
pub mod quantity;
pub mod reconcile;
pub mod rollout;
pub mod run;
pub mod scale;
pub mod scope;
pub mod status;
pub mod time;

pub use error::{Error, Result};

/// Field manager of every server-side apply the operator makes, except the
/// endpoint list ([`discovery::FIELD_MANAGER`]).
pub const FIELD_MANAGER: &str = "kubechat-operator";
