//! Renders the CRD YAML from the Rust types.
//!
//! The rendered YAML is checked in twice: `crds/` for `kubectl apply` and the
//! Helm chart's `crds/` folder. A test fails when either copy drifts from the
//! types; `cargo run -p kubechat-crds --bin crdgen -- --write` refreshes both.

use std::path::{Path, PathBuf};

use kube::CustomResourceExt;

use crate::ChatCluster;

/// Checked-in copies of the CRD, relative to the workspace root.
pub const CHECKED_IN_PATHS: [&str; 2] =
    ["crds/chatclusters.kubechat.dev.yaml", "charts/kubechat/crds/chatclusters.kubechat.dev.yaml"];

const HEADER: &str = "# Generated from crds/src/lib.rs by `cargo run -p kubechat-crds --bin crdgen -- --write`.\n\
                      # Do not edit by hand: a test fails when this file drifts from the Rust types.\n";

/// The CRD as YAML, with a header saying how it was made.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    Ok(format!("{HEADER}{}", serde_yaml::to_string(&ChatCluster::crd())?))
}

/// The workspace root (the parent of this crate). From the runtime
/// `CARGO_MANIFEST_DIR` (`cargo run` and `cargo test` set it) rather than the
/// path compiled in: a cached build may come from a clone elsewhere.
pub fn workspace_root() -> PathBuf {
    let package = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    Path::new(&package).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_crds_match_the_types() {
        let generated = crd_yaml().expect("render CRD");
        for path in CHECKED_IN_PATHS {
            let full = workspace_root().join(path);
            let checked_in = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()));
            assert!(
                checked_in == generated,
                "{path} differs from the CRD generated from crds/src/lib.rs; \
                 run `cargo run -p kubechat-crds --bin crdgen -- --write` and commit the result"
            );
        }
    }
}
