//! The kubechat operator: turns each `ChatCluster` into running gateways,
//! Redis, ScyllaDB and push workers, and reports their state.
//!
//! Layout (the reconcile reads like the design: observe → desired → apply → status):
//! - [`reconcile`]: the controller, its context and the top-level reconcile.
//! - [`observe`]: reads what exists (owned objects, referenced Secrets).
//! - [`desired`]: pure builders, `ChatCluster` spec → Kubernetes objects.
//! - [`apply`]: server-side apply of desired objects, skipping those already in place.
//! - [`status`]: pure computation of the status and its conditions.
//! - [`run`]: runs the controller while this replica leads.
//! - [`leader`]: leader election on a `coordination.k8s.io` Lease.
//! - [`metrics`] and [`admin`]: Prometheus metrics and the health/metrics HTTP server.
//! - [`error`]: the crate's error type.

pub mod admin;
pub mod apply;
pub mod desired;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod reconcile;
pub mod run;
pub mod status;

pub use error::{Error, Result};

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "kubechat-operator";
