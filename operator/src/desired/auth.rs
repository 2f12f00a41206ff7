//! The token-signing key. When the spec names no Secret, the operator
//! generates one once; it is never re-applied, so the key never rotates
//! under running gateways by accident.

use kube::ResourceExt;
use kubechat_crds::{ChatCluster, SecretKeyRef};

use super::Names;
use super::secrets::GeneratedSecret;

/// Key of the generated Secret, and the file name the key is mounted as.
pub const SIGNING_KEY_KEY: &str = "signing-key";

/// The Secret key gateways read: the user's, or the generated one.
pub fn signing_key_ref(cc: &ChatCluster) -> SecretKeyRef {
    cc.spec
        .auth
        .signing_key_secret
        .clone()
        .unwrap_or_else(|| SecretKeyRef { name: Names(&cc.name_any()).auth_secret(), key: SIGNING_KEY_KEY.into() })
}

/// Whether the operator owns the signing Secret (the spec names none).
pub fn generates_secret(cc: &ChatCluster) -> bool {
    cc.spec.auth.signing_key_secret.is_none()
}

/// The signing-key Secret the operator generates, unless the spec names one.
pub fn generated(cc: &ChatCluster) -> Option<GeneratedSecret> {
    generates_secret(cc).then(|| GeneratedSecret {
        name: Names(&cc.name_any()).auth_secret(),
        key: SIGNING_KEY_KEY,
        component: "auth",
        purpose: "signing key",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::fixtures::ChatClusterExt;

    #[test]
    fn the_generated_secret_is_what_gateways_mount() {
        let cc = ChatCluster::test();
        let generated = generated(&cc).expect("generated when the spec names none");
        assert_eq!(generated.key_ref(), signing_key_ref(&cc));
        assert_eq!(generated.name, "chat-auth");
    }

    #[test]
    fn a_named_secret_is_used_instead() {
        let cc = ChatCluster::test()
            .with_spec(|s| s.auth.signing_key_secret = Some(SecretKeyRef { name: "jwt".into(), key: "hs256".into() }));
        assert!(!generates_secret(&cc));
        assert_eq!(generated(&cc), None);
        assert_eq!(signing_key_ref(&cc).name, "jwt");
    }
}
