//! The gateways' admin token: what the operator presents to drain a gateway
//! or cancel its drain (`Authorization: Bearer`, docs/admin.md). Generated
//! once per ChatCluster and never re-applied, like the signing key; the
//! gateways read it from a mounted file, the operator from its Secret cache.

use std::path::{Path, PathBuf};

use kube::ResourceExt;
use kubechat_crds::ChatCluster;

use super::Names;
use super::secrets::GeneratedSecret;

/// Key of the Secret.
pub const TOKEN_KEY: &str = "token";

/// The admin-token Secret every ChatCluster gets.
pub fn generated(cc: &ChatCluster) -> GeneratedSecret {
    GeneratedSecret {
        name: Names(&cc.name_any()).admin_token(),
        key: TOKEN_KEY,
        component: "admin",
        purpose: "gateway admin token",
    }
}

/// The file the gateway config names (only gateways mount it: push workers serve no drain).
pub fn token_file() -> PathBuf {
    Path::new(kubechat_config::ADMIN_TOKEN_DIR).join(kubechat_config::ADMIN_TOKEN_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::fixtures::ChatClusterExt;

    #[test]
    fn every_cluster_gets_its_own_token_secret() {
        let generated = generated(&ChatCluster::test());
        assert_eq!((generated.name.as_str(), generated.key), ("chat-admin-token", "token"));
        let mut other = ChatCluster::test();
        other.metadata.name = Some("other".into());
        assert_eq!(super::generated(&other).name, "other-admin-token");
    }
}
