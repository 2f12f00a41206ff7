//! The config file the operator mounts (`/etc/kubechat/gateway.json`, from
//! the gateway ConfigMap). Secrets are not in it: they come from files and
//! environment variables it names.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::chat::ChatConfig;
use crate::protocol::Limits;

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileConfig {
    pub listen: Listen,
    pub max_connections: usize,
    pub chat: ChatLimits,
    pub redis: RedisConfig,
    pub scylla: ScyllaSettings,
    pub auth: AuthConfig,
    #[serde(default)]
    pub drain: DrainSettings,
    #[serde(default)]
    pub admin: AdminSettings,
}

/// Who may change this gateway's state through the admin API.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminSettings {
    /// The file holding the token (`Authorization: Bearer <token>`): the
    /// operator's generated Secret, mounted. Without one, draining through
    /// the admin API is refused (SIGTERM still drains).
    pub token_file: Option<PathBuf>,
}

/// How this gateway drains (on `POST /v1/admin/drain` without parameters,
/// and on SIGTERM).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainSettings {
    pub window_seconds: u32,
    pub max_reconnects_per_second: u32,
}

impl Default for DrainSettings {
    fn default() -> Self {
        let params = crate::transport::drain::DrainParams::default();
        Self {
            window_seconds: u32::try_from(params.deadline.as_secs()).unwrap_or(u32::MAX),
            max_reconnects_per_second: params.max_reconnects_per_second,
        }
    }
}

impl DrainSettings {
    pub fn params(&self) -> crate::transport::drain::DrainParams {
        crate::transport::drain::DrainParams {
            deadline: Duration::from_secs(u64::from(self.window_seconds.max(1))),
            max_reconnects_per_second: self.max_reconnects_per_second.max(1),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct Listen {
    pub websocket: u16,
    pub admin: u16,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatLimits {
    pub max_group_members: usize,
    pub max_message_chars: usize,
    pub heartbeat_seconds: u32,
    pub offline_after_seconds: u32,
    /// Groups up to this size get presence changes pushed; larger ones ask.
    #[serde(default = "default_presence_fanout")]
    pub presence_fanout_max_members: usize,
    /// How long a client may retry a send with the same key and still have
    /// it stored once (the idempotency reservations' lifetime in Redis).
    #[serde(default = "default_send_retry_window")]
    pub send_retry_window_seconds: u64,
}

fn default_send_retry_window() -> u64 {
    3600
}

fn default_presence_fanout() -> usize {
    ChatConfig::default().presence_fanout_max_members
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedisConfig {
    pub url: String,
    /// Environment variable holding the password, if any.
    pub password_env: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScyllaSettings {
    pub contact_points: Vec<String>,
    pub keyspace: String,
    pub replication_factor: u32,
    pub local_datacenter: Option<String>,
    pub credentials_env: Option<CredentialsEnv>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CredentialsEnv {
    pub username: String,
    pub password: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthConfig {
    pub signing_key_file: PathBuf,
}

impl ChatLimits {
    pub fn chat_config(&self) -> ChatConfig {
        ChatConfig {
            limits: Limits {
                max_message_chars: self.max_message_chars,
                max_group_members: self.max_group_members,
                ..Limits::default()
            },
            heartbeat_seconds: self.heartbeat_seconds,
            offline_after: self.offline_after(),
            presence_fanout_max_members: self.presence_fanout_max_members,
            // Many gateways share one store: refuse what it cannot take in time.
            store_admission: Some(crate::chat::admission::AdmissionConfig::default()),
            ..ChatConfig::default()
        }
    }

    pub fn send_retry_window(&self) -> Duration {
        Duration::from_secs(self.send_retry_window_seconds.max(1))
    }

    pub fn offline_after(&self) -> Duration {
        Duration::from_secs(u64::from(self.offline_after_seconds))
    }

    /// A client silent for the offline timeout is gone (heartbeats keep it open).
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.offline_after_seconds.max(self.heartbeat_seconds * 2)))
    }
}

impl FileConfig {
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config without the optional fields (as an older operator wrote
    /// it) gets their defaults. That the gateway reads what the operator
    /// writes today is checked on the operator's own output, in
    /// `e2e/tests/config_contract.rs`.
    #[test]
    fn a_config_without_optional_fields_parses() {
        let text = r#"{
            "listen": {"websocket": 8080, "admin": 9090},
            "maxConnections": 50000,
            "drain": {"windowSeconds": 60, "maxReconnectsPerSecond": 500},
            "chat": {"maxGroupMembers": 100, "maxMessageChars": 100000, "heartbeatSeconds": 5, "offlineAfterSeconds": 30},
            "redis": {"url": "redis://chat-redis.ns.svc:6379", "passwordEnv": null},
            "scylla": {"contactPoints": ["chat-scylla.ns.svc:9042"], "keyspace": "kubechat", "replicationFactor": 1,
                       "localDatacenter": null, "credentialsEnv": null},
            "auth": {"signingKeyFile": "/var/run/kubechat/auth/signing-key"},
            "push": {"maxAttempts": 8, "providers": {}},
            "discovery": {"endpointConfigMap": "chat-endpoints", "namespace": "ns"}
        }"#;
        let config: FileConfig = serde_json::from_str(text).expect("parse");
        assert_eq!(config.listen.admin, 9090);
        assert_eq!(config.chat.chat_config().limits.max_message_chars, 100_000);
        assert_eq!(config.chat.idle_timeout(), Duration::from_secs(30));
        assert_eq!(config.scylla.contact_points.len(), 1);
        assert_eq!(config.chat.chat_config().offline_after, Duration::from_secs(30));
        assert_eq!(config.chat.presence_fanout_max_members, 50, "the default when the operator does not set it");
        assert_eq!(config.chat.send_retry_window(), Duration::from_secs(3600), "an hour unless set");
        assert_eq!(config.admin.token_file, None, "no token: admin drains refused");
    }

    /// The example in docs/admin.md ("The config file") is a config this
    /// gateway reads, with the values it shows.
    #[test]
    fn the_documented_example_parses() {
        let doc = include_str!("../../docs/admin.md");
        let section = doc.split("## The config file").nth(1).expect("docs/admin.md has a config file section");
        let example = section.split("```json").nth(1).and_then(|rest| rest.split("```").next());
        let config: FileConfig =
            serde_json::from_str(example.expect("a JSON example in that section")).expect("the example parses");
        assert_eq!((config.listen.websocket, config.listen.admin), (8080, 9090));
        assert_eq!(config.chat.send_retry_window(), Duration::from_secs(3600));
        assert_eq!(config.admin.token_file, Some(PathBuf::from("/var/run/kubechat/admin/token")));
    }
}
