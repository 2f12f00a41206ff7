//! The gateway's config file (`gateway.json`): the one contract between the
//! operator, which writes it into the gateway ConfigMap, and the gateway and
//! push worker, which read it. Defined once, serialized on one side and
//! deserialized on the other, so a renamed field fails to compile rather
//! than reaching a pod.
//!
//! Secrets are never in the file: it names the files and environment
//! variables that hold them, at the paths below (the operator mounts them
//! there, the binaries read them from there).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the operator mounts the config and the binaries look for it.
pub const CONFIG_DIR: &str = "/etc/kubechat";
pub const CONFIG_FILE: &str = "gateway.json";
/// The environment variable holding the config file's path.
pub const CONFIG_PATH_ENV: &str = "KUBECHAT_CONFIG";
/// Where the token-signing key is mounted, and its file name there.
pub const AUTH_DIR: &str = "/var/run/kubechat/auth";
pub const SIGNING_KEY_FILE: &str = "signing-key";
/// Where the admin API's bearer token is mounted, and its file name there.
pub const ADMIN_TOKEN_DIR: &str = "/var/run/kubechat/admin";
pub const ADMIN_TOKEN_FILE: &str = "token";
/// Where the push providers' secrets are mounted, and their file names.
pub const PUSH_SECRETS_DIR: &str = "/var/run/kubechat/push";
pub const WEBHOOK_SIGNING_KEY_FILE: &str = "webhook-signing-key";
pub const FCM_CREDENTIALS_FILE: &str = "fcm-credentials.json";
pub const APNS_SIGNING_KEY_FILE: &str = "apns-signing-key.p8";

/// Defaults of the optional fields (an older operator did not write them).
pub const DEFAULT_DRAIN_WINDOW_SECONDS: u32 = 60;
pub const DEFAULT_MAX_RECONNECTS_PER_SECOND: u32 = 500;
pub const DEFAULT_PRESENCE_FANOUT_MAX_MEMBERS: usize = 50;
pub const DEFAULT_SEND_RETRY_WINDOW_SECONDS: u64 = 3600;
pub const DEFAULT_PUSH_MAX_ATTEMPTS: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing config {path}: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
}

/// The whole file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayConfig {
    pub listen: Listen,
    pub max_connections: usize,
    pub chat: Chat,
    pub redis: Redis,
    pub scylla: Scylla,
    pub auth: Auth,
    #[serde(default)]
    pub drain: Drain,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub push: Push,
    /// Informational: where the operator publishes the gateways' endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<Discovery>,
    /// Serve the web client at `/` on the WebSocket port.
    #[serde(default)]
    pub web_client: bool,
}

impl GatewayConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })
    }

    /// Pretty and key-ordered: the same config is the same text (the
    /// operator hashes it to roll the gateways when it changes).
    pub fn to_json_pretty(&self) -> String {
        // Plain structs of strings, numbers and paths always serialize.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listen {
    pub websocket: u16,
    pub admin: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Chat {
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

fn default_presence_fanout() -> usize {
    DEFAULT_PRESENCE_FANOUT_MAX_MEMBERS
}

fn default_send_retry_window() -> u64 {
    DEFAULT_SEND_RETRY_WINDOW_SECONDS
}

impl Chat {
    pub fn send_retry_window(&self) -> Duration {
        Duration::from_secs(self.send_retry_window_seconds.max(1))
    }

    pub fn offline_after(&self) -> Duration {
        Duration::from_secs(u64::from(self.offline_after_seconds))
    }

    /// A client silent for the offline timeout is gone (heartbeats keep it open).
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.offline_after_seconds.max(self.heartbeat_seconds.saturating_mul(2))))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Redis {
    /// One Redis server (`redis://host:port`), or with `cluster` one node of
    /// a Redis Cluster to learn the topology from.
    pub url: String,
    /// The environment variable holding the password, if any.
    pub password_env: Option<String>,
    /// `url` (and `seedUrls`) are nodes of a Redis Cluster.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
    /// More nodes of the Redis Cluster, tried when `url` does not answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seed_urls: Vec<String>,
}

impl Redis {
    /// A single Redis server at `url`.
    pub fn single(url: impl Into<String>, password_env: Option<String>) -> Self {
        Self { url: url.into(), password_env, cluster: false, seed_urls: Vec::new() }
    }

    /// Every node address given, `url` first.
    pub fn seeds(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.url.as_str()).chain(self.seed_urls.iter().map(String::as_str))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Scylla {
    pub contact_points: Vec<String>,
    pub keyspace: String,
    pub replication_factor: u32,
    pub local_datacenter: Option<String>,
    pub credentials_env: Option<CredentialsEnv>,
}

/// The environment variables holding the store's username and password.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialsEnv {
    pub username: String,
    pub password: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Auth {
    pub signing_key_file: PathBuf,
}

/// Who may change this gateway's state through the admin API.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Admin {
    /// The file holding the token (`Authorization: Bearer <token>`). Without
    /// one, draining through the admin API is refused (SIGTERM still drains).
    pub token_file: Option<PathBuf>,
}

/// How a gateway drains (on `POST /v1/admin/drain` without parameters, and
/// on SIGTERM).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Drain {
    pub window_seconds: u32,
    pub max_reconnects_per_second: u32,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            window_seconds: DEFAULT_DRAIN_WINDOW_SECONDS,
            max_reconnects_per_second: DEFAULT_MAX_RECONNECTS_PER_SECOND,
        }
    }
}

/// What the push workers deliver through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Push {
    /// Sends per (notification, device) before it is dead-lettered.
    #[serde(default = "default_push_max_attempts")]
    pub max_attempts: u32,
    /// Where the provider secrets are mounted ([`PUSH_SECRETS_DIR`] unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_dir: Option<PathBuf>,
    #[serde(default)]
    pub providers: PushProviders,
}

fn default_push_max_attempts() -> u32 {
    DEFAULT_PUSH_MAX_ATTEMPTS
}

impl Default for Push {
    fn default() -> Self {
        Self { max_attempts: DEFAULT_PUSH_MAX_ATTEMPTS, secrets_dir: None, providers: PushProviders::default() }
    }
}

impl Push {
    pub fn secrets_dir(&self) -> PathBuf {
        self.secrets_dir.clone().unwrap_or_else(|| PUSH_SECRETS_DIR.into())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushProviders {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fcm: Option<Fcm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apns: Option<Apns>,
}

/// Signed JSON POSTs to one URL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    pub url: String,
    /// Put the start of the message text in the notification (off: who
    /// sent what where, without the text).
    #[serde(default)]
    pub include_text: bool,
    /// The HMAC key's file ([`WEBHOOK_SIGNING_KEY_FILE`] in the secrets dir unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_file: Option<PathBuf>,
}

/// Firebase Cloud Messaging, HTTP v1 API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fcm {
    pub project_id: String,
    /// The service-account JSON's file ([`FCM_CREDENTIALS_FILE`] in the secrets dir unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
}

/// Apple Push Notification service, token-based authentication.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Apns {
    pub team_id: String,
    pub key_id: String,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
    #[serde(default)]
    pub sandbox: bool,
    /// The `.p8` key's file ([`APNS_SIGNING_KEY_FILE`] in the secrets dir unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Discovery {
    pub endpoint_config_map: String,
    pub namespace: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config without the optional fields (as an older operator wrote it)
    /// gets their defaults.
    #[test]
    fn a_config_without_optional_fields_parses() {
        let text = r#"{
            "listen": {"websocket": 8080, "admin": 9090},
            "maxConnections": 50000,
            "chat": {"maxGroupMembers": 100, "maxMessageChars": 100000, "heartbeatSeconds": 5, "offlineAfterSeconds": 30},
            "redis": {"url": "redis://chat-redis.ns.svc:6379", "passwordEnv": null},
            "scylla": {"contactPoints": ["chat-scylla.ns.svc:9042"], "keyspace": "kubechat", "replicationFactor": 1,
                       "localDatacenter": null, "credentialsEnv": null},
            "auth": {"signingKeyFile": "/var/run/kubechat/auth/signing-key"}
        }"#;
        let config: GatewayConfig = serde_json::from_str(text).expect("parse");
        assert_eq!(config.chat.presence_fanout_max_members, DEFAULT_PRESENCE_FANOUT_MAX_MEMBERS);
        assert_eq!(config.chat.send_retry_window(), Duration::from_secs(3600), "an hour unless set");
        assert_eq!(config.chat.idle_timeout(), Duration::from_secs(30));
        assert_eq!(config.drain, Drain::default());
        assert_eq!(config.admin.token_file, None, "no token: admin drains refused");
        assert_eq!(config.push.max_attempts, DEFAULT_PUSH_MAX_ATTEMPTS);
        assert_eq!(config.push.secrets_dir(), PathBuf::from(PUSH_SECRETS_DIR));
        assert_eq!(config.redis, Redis::single("redis://chat-redis.ns.svc:6379", None), "one Redis unless told");
    }

    #[test]
    fn what_is_written_reads_back_the_same() {
        let text = r#"{
            "listen": {"websocket": 8080, "admin": 9090}, "maxConnections": 10,
            "chat": {"maxGroupMembers": 100, "maxMessageChars": 10, "heartbeatSeconds": 50, "offlineAfterSeconds": 30},
            "redis": {"url": "redis://r:6379", "passwordEnv": "P", "cluster": true, "seedUrls": ["redis://r2:6379"]},
            "scylla": {"contactPoints": ["s:9042"], "keyspace": "k", "replicationFactor": 3,
                       "localDatacenter": "dc1", "credentialsEnv": {"username": "U", "password": "W"}},
            "auth": {"signingKeyFile": "/k"},
            "push": {"providers": {"webhook": {"url": "https://h", "includeText": true},
                                   "apns": {"teamId": "T", "keyId": "K", "topic": "t", "sandbox": true}}},
            "discovery": {"endpointConfigMap": "e", "namespace": "n"}
        }"#;
        let config: GatewayConfig = serde_json::from_str(text).expect("parse");
        assert_eq!(config.chat.idle_timeout(), Duration::from_secs(100), "twice the heartbeat when that is longer");
        let again: GatewayConfig = serde_json::from_str(&config.to_json_pretty()).expect("reparse");
        assert_eq!(again, config);
        assert!(matches!(&config.push.providers.webhook, Some(Webhook { include_text: true, .. })));
        assert_eq!(config.redis.seeds().collect::<Vec<_>>(), ["redis://r:6379", "redis://r2:6379"]);
    }

    #[test]
    fn a_missing_file_and_bad_json_say_which_file() {
        let missing = GatewayConfig::load(Path::new("/nonexistent/gateway.json")).expect_err("missing");
        assert!(missing.to_string().contains("/nonexistent/gateway.json"), "{missing}");
        let dir = std::env::temp_dir().join(format!("kubechat-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(CONFIG_FILE);
        std::fs::write(&path, r#"{"listen": {"websocket": 8080}}"#).expect("write");
        let bad = GatewayConfig::load(&path).expect_err("incomplete");
        assert!(bad.to_string().starts_with("parsing config"), "{bad}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
