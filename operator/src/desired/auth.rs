//! The token-signing key. When the spec names no Secret, the operator
//! generates one once; it is never re-applied, so the key never rotates
//! under running gateways by accident.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kubechat_crds::{ChatCluster, SecretKeyRef};

use super::{Names, owned_meta};

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

/// A new Secret with `key` (hex text, so it works as a file or env value).
pub fn generated_secret(cc: &ChatCluster, key: &[u8]) -> Secret {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    Secret {
        metadata: owned_meta(cc, Names(&cc.name_any()).auth_secret(), "auth"),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(SIGNING_KEY_KEY.to_string(), ByteString(hex.into_bytes()))])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::fixtures::ChatClusterExt;

    #[test]
    fn generated_secret_holds_hex_key() {
        let secret = generated_secret(&ChatCluster::test(), &[0xab, 0x01]);
        assert_eq!(secret.metadata.name.as_deref(), Some("chat-auth"));
        assert_eq!(secret.data.expect("data")[SIGNING_KEY_KEY].0, b"ab01");
    }

    #[test]
    fn a_named_secret_is_used_instead() {
        let cc = ChatCluster::test()
            .with_spec(|s| s.auth.signing_key_secret = Some(SecretKeyRef { name: "jwt".into(), key: "hs256".into() }));
        assert!(!generates_secret(&cc));
        assert_eq!(signing_key_ref(&cc).name, "jwt");
    }
}
