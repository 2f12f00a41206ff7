//! The `ChatCluster` custom resource: Rust types from which the CRD YAML under
//! `crds/` is generated.
