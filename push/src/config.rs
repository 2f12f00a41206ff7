//! Push-worker settings, and their loading from the gateway config file the operator mounts
//! (`kubechat_config::GatewayConfig`: Redis from `redis`, the providers from `push`).
//!
//! Secrets are files: the operator mounts the Secret keys the ChatCluster names under
//! [`PUSH_SECRETS_DIR`] (override with `push.secretsDir`) as [`WEBHOOK_SIGNING_KEY_FILE`],
//! [`FCM_CREDENTIALS_FILE`] and [`APNS_SIGNING_KEY_FILE`], unless a provider gives an explicit
//! `signingKeyFile` / `credentialsFile`.

use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use kubechat_config::GatewayConfig;

use crate::job::PUSH_STREAM;

pub const DEFAULT_CONSUMER_GROUP: &str = "push-workers";
pub const DEFAULT_DEAD_LETTER_STREAM: &str = "kubechat:push:dead";
pub use kubechat_config::{APNS_SIGNING_KEY_FILE, FCM_CREDENTIALS_FILE, PUSH_SECRETS_DIR, WEBHOOK_SIGNING_KEY_FILE};
pub const FCM_BASE_URL: &str = "https://fcm.googleapis.com";
pub const APNS_PRODUCTION_URL: &str = "https://api.push.apple.com";
pub const APNS_SANDBOX_URL: &str = "https://api.sandbox.push.apple.com";
/// Largest secret file read.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// A secret: a file (mounted from a Kubernetes Secret; re-read whenever it is needed, so a
/// rotated Secret is picked up without a restart where the provider re-reads it) or a value.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Value(String),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(path) => f.debug_tuple("File").field(path).finish(),
            SecretSource::Value(_) => f.write_str("Value(<redacted>)"),
        }
    }
}

impl SecretSource {
    /// The secret's bytes (a file is read whole, up to 64 KiB).
    pub fn load(&self) -> Result<Vec<u8>, String> {
        match self {
            SecretSource::Value(value) => Ok(value.as_bytes().to_vec()),
            SecretSource::File(path) => {
                let file = std::fs::File::open(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
                let mut bytes = Vec::new();
                file.take(MAX_SECRET_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .map_err(|e| format!("reading {}: {e}", path.display()))?;
                if bytes.len() as u64 > MAX_SECRET_BYTES {
                    return Err(format!("{} is larger than {MAX_SECRET_BYTES} bytes", path.display()));
                }
                Ok(bytes)
            }
        }
    }
}

/// Signed JSON POSTs to one URL.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub url: String,
    /// HMAC-SHA256 key (surrounding whitespace ignored; at least 16 bytes).
    pub signing_key: SecretSource,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Send the start of the message text (`summary`); off, the receiver
    /// learns who wrote where, not what.
    pub include_text: bool,
}

impl WebhookConfig {
    pub fn new(url: impl Into<String>, signing_key: SecretSource) -> Self {
        Self { url: url.into(), signing_key, timeout: Duration::from_secs(10), include_text: false }
    }
}

/// Firebase Cloud Messaging, HTTP v1 API.
#[derive(Clone, Debug)]
pub struct FcmConfig {
    pub project_id: String,
    /// The service-account JSON (`client_email`, `private_key`, `token_uri`).
    pub credentials: SecretSource,
    /// `https://fcm.googleapis.com` unless overridden (tests).
    pub base_url: String,
    /// Overrides the service account's `token_uri` (tests).
    pub token_url: Option<String>,
    pub timeout: Duration,
}

impl FcmConfig {
    pub fn new(project_id: impl Into<String>, credentials: SecretSource) -> Self {
        Self {
            project_id: project_id.into(),
            credentials,
            base_url: FCM_BASE_URL.into(),
            token_url: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Apple Push Notification service, token-based (`.p8` key) authentication.
#[derive(Clone, Debug)]
pub struct ApnsConfig {
    pub team_id: String,
    pub key_id: String,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
    /// The `.p8` signing key (PKCS#8 PEM, P-256).
    pub signing_key: SecretSource,
    pub sandbox: bool,
    /// Overrides the production/sandbox host (tests).
    pub base_url: Option<String>,
    pub timeout: Duration,
}

impl ApnsConfig {
    pub fn new(
        team_id: impl Into<String>,
        key_id: impl Into<String>,
        topic: impl Into<String>,
        signing_key: SecretSource,
    ) -> Self {
        Self {
            team_id: team_id.into(),
            key_id: key_id.into(),
            topic: topic.into(),
            signing_key,
            sandbox: false,
            base_url: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// The APNs host to talk to.
    pub fn endpoint(&self) -> &str {
        match (&self.base_url, self.sandbox) {
            (Some(url), _) => url,
            (None, true) => APNS_SANDBOX_URL,
            (None, false) => APNS_PRODUCTION_URL,
        }
    }
}

/// The configured providers; a device registered for a missing one is dead-lettered.
#[derive(Clone, Debug, Default)]
pub struct ProvidersConfig {
    pub webhook: Option<WebhookConfig>,
    pub fcm: Option<FcmConfig>,
    pub apns: Option<ApnsConfig>,
}

#[derive(Clone, Debug)]
pub struct PushWorkerConfig {
    /// `/healthz` and `/metrics` (the gateway config's admin port).
    pub admin: Option<std::net::SocketAddr>,
    /// The gateway config's `redis` section (one server or a cluster).
    pub redis: kubechat_config::Redis,
    /// Overrides the URL's password.
    pub redis_password: Option<SecretSource>,
    /// The job streams' base name ([`PUSH_STREAM`]).
    pub stream: String,
    /// Partitions of the job and dead-letter streams ([`crate::partition_streams`]).
    pub partitions: u16,
    /// Where given-up jobs go ([`DEFAULT_DEAD_LETTER_STREAM`]).
    pub dead_letter_stream: String,
    /// Approximate cap of the dead-letter stream (`MAXLEN ~`).
    pub dead_letter_max_len: usize,
    pub consumer_group: String,
    /// Unique among running workers: the pod name.
    pub consumer_name: String,
    /// Sends per (job, device) before it is dead-lettered; at least 1.
    pub max_attempts: u32,
    /// Retry delays: uniformly random in `[0, min(backoff_max, backoff_base · 2^(n-1))]`
    /// after the n-th failed attempt ("full jitter").
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Entries pending this long (their worker died) are claimed by another worker. A
    /// worker renews the entries it works on every third of this.
    pub claim_idle: Duration,
    /// How often to look for such entries.
    pub claim_interval: Duration,
    /// Entries read per XREADGROUP / XAUTOCLAIM.
    pub batch_size: usize,
    /// Entries worked on at once by this worker.
    pub max_in_flight: usize,
    /// Provider requests under way at once (over all entries and devices).
    pub max_concurrent_sends: usize,
    /// XREADGROUP BLOCK: bounds how long shutdown waits for the reader.
    pub block: Duration,
    /// Timeout of one Redis command (the blocking read gets `block` on top).
    pub command_timeout: Duration,
    /// On shutdown, how long in-flight sends may finish before they are abandoned (the
    /// entries stay pending and another worker claims them).
    pub shutdown_grace: Duration,
    pub providers: ProvidersConfig,
}

impl Default for PushWorkerConfig {
    fn default() -> Self {
        Self {
            admin: None,
            redis: kubechat_config::Redis::single("redis://127.0.0.1:6379", None),
            redis_password: None,
            stream: PUSH_STREAM.into(),
            partitions: crate::job::PUSH_PARTITIONS,
            dead_letter_stream: DEFAULT_DEAD_LETTER_STREAM.into(),
            dead_letter_max_len: 100_000,
            consumer_group: DEFAULT_CONSUMER_GROUP.into(),
            consumer_name: "push-worker".into(),
            max_attempts: kubechat_config::DEFAULT_PUSH_MAX_ATTEMPTS,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            claim_idle: Duration::from_secs(30),
            claim_interval: Duration::from_secs(10),
            batch_size: 32,
            max_in_flight: 256,
            max_concurrent_sends: 64,
            block: Duration::from_secs(1),
            command_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            providers: ProvidersConfig::default(),
        }
    }
}

impl PushWorkerConfig {
    /// Reads the gateway config file (`KUBECHAT_CONFIG`): Redis from `redis`, the rest from
    /// `push`; the Redis password from the environment variable `redis.passwordEnv` names.
    pub fn load(path: &Path, consumer_name: &str) -> anyhow::Result<Self> {
        let file = GatewayConfig::load(path)?;
        Self::from_gateway_config(&file, consumer_name, |name| std::env::var(name).ok())
            .with_context(|| format!("the push settings in {}", path.display()))
    }

    /// [`PushWorkerConfig::load`] on a parsed file, with `env` looking up environment variables.
    pub fn from_gateway_config(
        file: &GatewayConfig,
        consumer_name: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let secrets_dir = file.push.secrets_dir();
        let secret = |explicit: &Option<PathBuf>, name: &str| {
            SecretSource::File(explicit.clone().unwrap_or_else(|| secrets_dir.join(name)))
        };
        let providers = &file.push.providers;
        let config = Self {
            admin: Some(std::net::SocketAddr::from(([0, 0, 0, 0], file.listen.admin))),
            redis: file.redis.clone(),
            redis_password: file.redis.password_env.as_deref().and_then(env).map(SecretSource::Value),
            consumer_name: consumer_name.to_string(),
            max_attempts: file.push.max_attempts,
            providers: ProvidersConfig {
                webhook: providers.webhook.as_ref().map(|w| WebhookConfig {
                    include_text: w.include_text,
                    ..WebhookConfig::new(w.url.clone(), secret(&w.signing_key_file, WEBHOOK_SIGNING_KEY_FILE))
                }),
                fcm: providers
                    .fcm
                    .as_ref()
                    .map(|f| FcmConfig::new(f.project_id.clone(), secret(&f.credentials_file, FCM_CREDENTIALS_FILE))),
                apns: providers.apns.as_ref().map(|a| ApnsConfig {
                    sandbox: a.sandbox,
                    ..ApnsConfig::new(
                        a.team_id.clone(),
                        a.key_id.clone(),
                        a.topic.clone(),
                        secret(&a.signing_key_file, APNS_SIGNING_KEY_FILE),
                    )
                }),
            },
            ..Self::default()
        };
        config.validate()?;
        Ok(config)
    }

    /// Rejects settings the worker cannot run with.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.stream.is_empty(), "push: the stream name is empty");
        anyhow::ensure!(!self.dead_letter_stream.is_empty(), "push: the dead-letter stream name is empty");
        anyhow::ensure!(self.stream != self.dead_letter_stream, "push: the dead-letter stream is the job stream");
        anyhow::ensure!((1..=256).contains(&self.partitions), "push: the stream partitions must be 1–256");
        anyhow::ensure!(!self.consumer_group.is_empty(), "push: the consumer group is empty");
        anyhow::ensure!(!self.consumer_name.is_empty(), "push: the consumer name (pod name) is empty");
        anyhow::ensure!((1..=1000).contains(&self.max_attempts), "push: maxAttempts must be 1–1000");
        anyhow::ensure!((1..=10_000).contains(&self.batch_size), "push: the batch size must be 1–10000");
        anyhow::ensure!(self.max_in_flight >= 1, "push: max_in_flight must be at least 1");
        anyhow::ensure!(
            (1..=tokio::sync::Semaphore::MAX_PERMITS).contains(&self.max_concurrent_sends),
            "push: max_concurrent_sends must be at least 1"
        );
        anyhow::ensure!(self.dead_letter_max_len >= 1, "push: dead_letter_max_len must be at least 1");
        anyhow::ensure!(self.backoff_base <= self.backoff_max, "push: backoff_base exceeds backoff_max");
        anyhow::ensure!(self.claim_idle >= Duration::from_millis(30), "push: claim_idle must be at least 30 ms");
        anyhow::ensure!(!self.claim_interval.is_zero(), "push: claim_interval must not be zero");
        anyhow::ensure!(!self.block.is_zero(), "push: block must not be zero (it would block forever)");
        anyhow::ensure!(!self.command_timeout.is_zero(), "push: command_timeout must not be zero");
        if let Some(webhook) = &self.providers.webhook {
            anyhow::ensure!(
                webhook.url.starts_with("https://") || webhook.url.starts_with("http://"),
                "push: the webhook URL must be http(s)"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config as the operator writes it, with the push section given (JSON).
    fn gateway_config(push: &str) -> GatewayConfig {
        let text = format!(
            r#"{{
            "listen": {{"websocket": 8080, "admin": 9090}}, "maxConnections": 10,
            "chat": {{"maxGroupMembers": 100, "maxMessageChars": 10, "heartbeatSeconds": 5, "offlineAfterSeconds": 30}},
            "redis": {{"url": "redis://chat-redis.ns.svc:6379", "passwordEnv": "KUBECHAT_REDIS_PASSWORD"}},
            "scylla": {{"contactPoints": ["s:9042"], "keyspace": "k", "replicationFactor": 1,
                        "localDatacenter": null, "credentialsEnv": null}},
            "auth": {{"signingKeyFile": "/k"}},
            "push": {push}
        }}"#
        );
        serde_json::from_str(&text).expect("a valid gateway config")
    }

    /// Hand-written input; the operator's real output goes through
    /// [`PushWorkerConfig::from_gateway_config`] in `e2e/tests/config_contract.rs`.
    #[test]
    fn the_push_section_becomes_provider_settings() {
        let file = gateway_config(
            r#"{"maxAttempts": 5, "providers": {
                "webhook": {"url": "https://hooks.example/push", "includeText": true},
                "fcm": {"projectId": "proj"},
                "apns": {"teamId": "T", "keyId": "K", "topic": "com.example.chat", "sandbox": true}
            }}"#,
        );
        let env = |name: &str| (name == "KUBECHAT_REDIS_PASSWORD").then(|| "pw".to_string());
        let config = PushWorkerConfig::from_gateway_config(&file, "chat-push-abc", env).expect("parse");
        assert_eq!(config.consumer_name, "chat-push-abc");
        assert_eq!(config.max_attempts, 5);
        assert_eq!(config.stream, PUSH_STREAM);
        assert_eq!(config.admin, Some(std::net::SocketAddr::from(([0, 0, 0, 0], 9090))));
        assert_eq!(config.redis_password, Some(SecretSource::Value("pw".into())));
        let webhook = config.providers.webhook.expect("webhook");
        assert_eq!(webhook.url, "https://hooks.example/push");
        assert!(webhook.include_text);
        assert_eq!(webhook.signing_key, SecretSource::File(Path::new(PUSH_SECRETS_DIR).join(WEBHOOK_SIGNING_KEY_FILE)));
        let fcm = config.providers.fcm.expect("fcm");
        assert_eq!(fcm.project_id, "proj");
        assert_eq!(fcm.base_url, FCM_BASE_URL);
        let apns = config.providers.apns.expect("apns");
        assert_eq!(apns.endpoint(), APNS_SANDBOX_URL);
        assert_eq!(apns.topic, "com.example.chat");
        assert!(format!("{:?}", config.redis_password).contains("redacted"));
    }

    #[test]
    fn an_empty_push_section_means_no_providers() {
        let file = gateway_config(r#"{"maxAttempts": 8, "providers": {}}"#);
        let config = PushWorkerConfig::from_gateway_config(&file, "w", |_| None).expect("parse");
        assert!(
            config.providers.webhook.is_none() && config.providers.fcm.is_none() && config.providers.apns.is_none()
        );
        assert!(PushWorkerConfig::from_gateway_config(&file, "", |_| None).is_err(), "no consumer name");
        let bad = gateway_config(r#"{"maxAttempts": 0}"#);
        assert!(PushWorkerConfig::from_gateway_config(&bad, "w", |_| None).is_err());
    }
}
