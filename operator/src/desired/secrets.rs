//! Secrets the operator generates: random bytes, created once and never
//! re-applied, so a running component's key or password never changes under
//! it by accident. Each kind says here what it is for; the reconciler creates
//! whichever are missing (see `reconcile::ensure_generated_secret`).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kubechat_crds::{ChatCluster, SecretKeyRef};

use super::owned_meta;

/// Random bytes in each generated value (hex-encoded: 64 characters).
pub const RANDOM_BYTES: usize = 32;

/// One Secret the operator owns and fills itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedSecret {
    pub name: String,
    /// The one key it holds.
    pub key: &'static str,
    /// The component label of the Secret.
    pub component: &'static str,
    /// What the value is, for the Event that announces it ("signing key").
    pub purpose: &'static str,
}

impl GeneratedSecret {
    /// Where consumers find the value.
    pub fn key_ref(&self) -> SecretKeyRef {
        SecretKeyRef { name: self.name.clone(), key: self.key.into() }
    }

    /// The Secret holding `random` as hex text, so it works as a file, an
    /// environment value and a Redis password alike.
    pub fn build(&self, cc: &ChatCluster, random: &[u8]) -> Secret {
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        Secret {
            metadata: owned_meta(cc, self.name.clone(), self.component),
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(self.key.to_string(), ByteString(hex.into_bytes()))])),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::fixtures::ChatClusterExt;
    use crate::desired::{LABEL_INSTANCE, LABEL_MANAGED_BY};

    #[test]
    fn a_generated_secret_holds_its_value_as_hex_and_is_owned() {
        let cc = ChatCluster::test();
        let generated = GeneratedSecret { name: "chat-x".into(), key: "k", component: "x", purpose: "test value" };
        let secret = generated.build(&cc, &[0xab, 0x01]);
        assert_eq!(secret.metadata.name.as_deref(), Some("chat-x"));
        assert_eq!(secret.data.expect("data")["k"].0, b"ab01");
        // The label lets the owned-object watch see it; the owner lets the GC delete it.
        let labels = secret.metadata.labels.expect("labels");
        assert_eq!(labels[LABEL_INSTANCE], "chat");
        assert_eq!(labels[LABEL_MANAGED_BY], crate::FIELD_MANAGER);
        assert_eq!(secret.metadata.owner_references.expect("owner")[0].kind, "ChatCluster");
    }

    #[test]
    fn a_minimal_cluster_gets_a_signing_key_a_redis_password_and_an_admin_token() {
        let names: Vec<String> =
            crate::desired::generated_secrets(&ChatCluster::test()).into_iter().map(|g| g.name).collect();
        assert_eq!(names, ["chat-auth", "chat-redis-password", "chat-admin-token"]);
    }
}
