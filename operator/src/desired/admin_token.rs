//! The gateways' admin token: what the operator presents to drain a gateway
//! or cancel its drain (`Authorization: Bearer`, docs/admin.md). Generated
//! once per ChatCluster and never re-applied, like the signing key; the
//! gateways read it from a mounted file, the operator from its Secret cache.

use kube::ResourceExt;
use kubechat_crds::ChatCluster;

use super::Names;
use super::secrets::GeneratedSecret;

/// Key of the Secret, and the file name it is mounted as.
pub const TOKEN_KEY: &str = "token";
/// Where gateways find the token (only gateways: push workers serve no drain).
pub const TOKEN_DIR: &str = "/var/run/kubechat/admin";

/// The admin-token Secret every ChatCluster gets.
pub fn generated(cc: &ChatCluster) -> GeneratedSecret {
    GeneratedSecret {
        name: Names(&cc.name_any()).admin_token(),
        key: TOKEN_KEY,
        component: "admin",
        purpose: "gateway admin token",
    }
}

/// The file the gateway config names.
pub fn token_file() -> String {
    format!("{TOKEN_DIR}/{TOKEN_KEY}")
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
