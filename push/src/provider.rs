//! Push providers: a signed webhook, FCM (HTTP v1) and APNs (HTTP/2, token auth).
//!
//! Each request is built by a pure function returning an [`HttpRequest`] (unit-tested for
//! shape); the providers add credentials, send it with a timeout and classify the answer:
//! 2xx is success; 408, 429, 5xx and network errors are transient (retried with backoff);
//! other statuses are permanent (dead-lettered at once), and a provider saying the device
//! token is gone is [`ProviderError::InvalidTarget`] (dead-lettered, and the target is
//! forgotten). Redirects are not followed (a 3xx is permanent).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::config::{ApnsConfig, FcmConfig, ProvidersConfig, WebhookConfig};
use super::credentials::{ApnsTokenSigner, FcmTokenSource};
pub use super::http::{HttpRequest, HttpResponse, ProviderError, execute, http_client};
use crate::job::PushJob;
use crate::names::{Platform, PushTarget};

pub const SIGNATURE_HEADER: &str = "X-Kubechat-Signature";
pub const DELIVERY_HEADER: &str = "X-Kubechat-Delivery";

/// Sends one notification of `job` to one device.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    async fn send(&self, job: &PushJob, target: &PushTarget) -> Result<(), ProviderError>;
}

/// The provider for each platform; a platform without one fails permanently.
#[derive(Clone, Default)]
pub struct Providers {
    webhook: Option<Arc<dyn Provider>>,
    fcm: Option<Arc<dyn Provider>>,
    apns: Option<Arc<dyn Provider>>,
}

impl Providers {
    /// The HTTP providers of `config`. Fails if a configured provider's secret is missing or
    /// unusable (better a crash-looping pod than silently dead-lettered notifications).
    pub fn from_config(config: &ProvidersConfig) -> anyhow::Result<Self> {
        let mut providers = Self::default();
        if config.webhook.is_none() && config.fcm.is_none() && config.apns.is_none() {
            return Ok(providers);
        }
        let client = http_client().map_err(|e| anyhow::anyhow!("push: building the HTTP client: {e}"))?;
        if let Some(webhook) = &config.webhook {
            let provider = WebhookProvider::new(webhook, client.clone()).map_err(|e| anyhow::anyhow!("push: {e}"))?;
            providers = providers.with(Platform::Webhook, Arc::new(provider));
        }
        if let Some(fcm) = &config.fcm {
            let provider = FcmProvider::new(fcm, client.clone()).map_err(|e| anyhow::anyhow!("push: {e}"))?;
            providers = providers.with(Platform::Fcm, Arc::new(provider));
        }
        if let Some(apns) = &config.apns {
            let provider = ApnsProvider::new(apns, client).map_err(|e| anyhow::anyhow!("push: {e}"))?;
            providers = providers.with(Platform::Apns, Arc::new(provider));
        }
        Ok(providers)
    }

    /// Sets (or replaces) the provider of `platform`.
    pub fn with(mut self, platform: Platform, provider: Arc<dyn Provider>) -> Self {
        match platform {
            Platform::Webhook => self.webhook = Some(provider),
            Platform::Fcm => self.fcm = Some(provider),
            Platform::Apns => self.apns = Some(provider),
        }
        self
    }

    pub fn get(&self, platform: Platform) -> Option<&Arc<dyn Provider>> {
        match platform {
            Platform::Webhook => self.webhook.as_ref(),
            Platform::Fcm => self.fcm.as_ref(),
            Platform::Apns => self.apns.as_ref(),
        }
    }
}

fn status_error(what: &str, response: &HttpResponse) -> String {
    let body = response.body.trim();
    if body.is_empty() {
        format!("{what}: HTTP {}", response.status)
    } else {
        format!("{what}: HTTP {}: {body}", response.status)
    }
}

/// The generic classification: 2xx ok; 408, 429, 5xx transient; anything else permanent.
fn classify_status(what: &str, response: &HttpResponse) -> Result<(), ProviderError> {
    match response.status {
        200..=299 => Ok(()),
        408 | 429 | 500..=599 => Err(ProviderError::Transient(status_error(what, response))),
        _ => Err(ProviderError::Permanent(status_error(what, response))),
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------- webhook --

/// The webhook's JSON body: who wrote where, and with `include_text` the start of the text
/// (never all of it).
pub fn webhook_body(job: &PushJob, target: &PushTarget, include_text: bool) -> Vec<u8> {
    let mut body = json!({
        "user": job.user,
        "device": target.device,
        "message_id": job.message_id,
        "channel": job.channel,
        "sender": job.sender,
    });
    if include_text {
        body["summary"] = json!(job.summary);
    }
    // A JSON value of strings always serializes.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// `sha256=<hex HMAC-SHA256 of body>`: the receiver recomputes it over the exact bytes.
pub fn webhook_signature(key: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(body);
    format!("sha256={}", hex(&mac.finalize().into_bytes()))
}

/// The signed webhook POST.
pub fn webhook_request(config: &WebhookConfig, key: &[u8], job: &PushJob, target: &PushTarget) -> HttpRequest {
    let body = webhook_body(job, target, config.include_text);
    HttpRequest {
        method: reqwest::Method::POST,
        url: config.url.clone(),
        headers: vec![
            ("Content-Type".into(), "application/json".into()),
            (SIGNATURE_HEADER.into(), webhook_signature(key, &body)),
            (DELIVERY_HEADER.into(), format!("{}:{}", job.message_id, target.device)),
        ],
        body,
    }
}

pub struct WebhookProvider {
    client: reqwest::Client,
    config: WebhookConfig,
    key: Vec<u8>,
}

impl WebhookProvider {
    /// Reads the signing key now (restart the worker to rotate it).
    pub fn new(config: &WebhookConfig, client: reqwest::Client) -> Result<Self, String> {
        let key = config.signing_key.load().map_err(|e| format!("webhook signing key: {e}"))?;
        let key = key.trim_ascii().to_vec();
        if key.len() < 16 {
            return Err("webhook signing key: must be at least 16 bytes".into());
        }
        Ok(Self { client, config: config.clone(), key })
    }
}

#[async_trait]
impl Provider for WebhookProvider {
    async fn send(&self, job: &PushJob, target: &PushTarget) -> Result<(), ProviderError> {
        let request = webhook_request(&self.config, &self.key, job, target);
        let response = execute(&self.client, &request, self.config.timeout).await?;
        classify_status("webhook", &response)
    }
}

// -------------------------------------------------------------------- FCM --

/// The FCM HTTP v1 send request.
pub fn fcm_request(
    base_url: &str,
    project_id: &str,
    access_token: &str,
    job: &PushJob,
    target: &PushTarget,
) -> HttpRequest {
    let body = json!({
        "message": {
            "token": target.token,
            "notification": {"title": job.sender, "body": job.summary},
            "data": {"channel": job.channel, "message_id": job.message_id},
        }
    });
    HttpRequest {
        method: reqwest::Method::POST,
        url: format!("{}/v1/projects/{project_id}/messages:send", base_url.trim_end_matches('/')),
        headers: vec![
            ("Authorization".into(), format!("Bearer {access_token}")),
            ("Content-Type".into(), "application/json; charset=utf-8".into()),
        ],
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}

/// FCM's answer: 404 (`UNREGISTERED`) and an `UNREGISTERED`/invalid-token 400 mean the token
/// is gone; 401 is transient (the access token is fetched anew; revoked credentials then fail
/// permanently at the token endpoint).
pub fn classify_fcm(response: &HttpResponse) -> Result<(), ProviderError> {
    if response.status == 401 {
        return Err(ProviderError::Transient(status_error("FCM", response)));
    }
    let body = &response.body;
    let token_gone = response.status == 404
        || (response.status == 400
            && (body.contains("UNREGISTERED") || body.contains("registration token is not a valid")));
    if token_gone {
        return Err(ProviderError::InvalidTarget(status_error("FCM", response)));
    }
    classify_status("FCM", response)
}

pub struct FcmProvider {
    client: reqwest::Client,
    base_url: String,
    project_id: String,
    tokens: FcmTokenSource,
    timeout: Duration,
}

impl FcmProvider {
    /// Checks now that the service account parses (the access token is fetched on first use).
    pub fn new(config: &FcmConfig, client: reqwest::Client) -> Result<Self, String> {
        let valid_project = !config.project_id.is_empty()
            && config.project_id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'_'));
        if !valid_project {
            return Err(format!("FCM: invalid project id {:?}", config.project_id));
        }
        let tokens = FcmTokenSource::new(config, client.clone());
        tokens.check().map_err(|e| format!("FCM credentials: {e}"))?;
        Ok(Self {
            client,
            base_url: config.base_url.clone(),
            project_id: config.project_id.clone(),
            tokens,
            timeout: config.timeout,
        })
    }
}

#[async_trait]
impl Provider for FcmProvider {
    async fn send(&self, job: &PushJob, target: &PushTarget) -> Result<(), ProviderError> {
        let token = self.tokens.access_token().await?;
        let request = fcm_request(&self.base_url, &self.project_id, &token, job, target);
        let response = execute(&self.client, &request, self.timeout).await?;
        if response.status == 401 {
            // The access token expired or was revoked early: fetch a new one next time.
            self.tokens.invalidate().await;
        }
        classify_fcm(&response)
    }
}

// ------------------------------------------------------------------- APNs --

/// A stable UUID for `apns-id` from the (message, device) pair, so retries carry the same id.
pub fn apns_id(message_id: &str, device: &str) -> String {
    let digest = Sha256::digest(format!("{message_id}:{device}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80; // version 8: custom (RFC 9562)
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let h = hex(&b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Whether `token` looks like an APNs device token (hex).
pub fn valid_apns_token(token: &str) -> bool {
    !token.is_empty() && token.len() <= 200 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The APNs alert request.
pub fn apns_request(
    base_url: &str,
    topic: &str,
    provider_token: &str,
    job: &PushJob,
    target: &PushTarget,
) -> HttpRequest {
    let body = json!({
        "aps": {"alert": {"title": job.sender, "body": job.summary}},
        "channel": job.channel,
        "message_id": job.message_id,
    });
    HttpRequest {
        method: reqwest::Method::POST,
        url: format!("{}/3/device/{}", base_url.trim_end_matches('/'), target.token),
        headers: vec![
            ("authorization".into(), format!("bearer {provider_token}")),
            ("apns-topic".into(), topic.to_string()),
            ("apns-push-type".into(), "alert".into()),
            ("apns-priority".into(), "10".into()),
            ("apns-id".into(), apns_id(&job.message_id, &target.device)),
            ("content-type".into(), "application/json".into()),
        ],
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}

/// The `reason` of an APNs error body (`{"reason":"BadDeviceToken"}`).
fn apns_reason(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_string))
        .unwrap_or_default()
}

/// APNs' answer: 410 and a bad/foreign device token mean the token is gone; an expired
/// provider token is transient (a fresh one is signed).
pub fn classify_apns(response: &HttpResponse) -> Result<(), ProviderError> {
    let reason = apns_reason(&response.body);
    match (response.status, reason.as_str()) {
        (410, _) | (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => {
            Err(ProviderError::InvalidTarget(status_error("APNs", response)))
        }
        (403, "ExpiredProviderToken") => Err(ProviderError::Transient(status_error("APNs", response))),
        _ => classify_status("APNs", response),
    }
}

pub struct ApnsProvider {
    client: reqwest::Client,
    base_url: String,
    topic: String,
    signer: ApnsTokenSigner,
    timeout: Duration,
}

impl ApnsProvider {
    /// Signs a provider token now, to fail early on a missing or unusable key.
    pub fn new(config: &ApnsConfig, client: reqwest::Client) -> Result<Self, String> {
        if config.topic.is_empty() || config.topic.contains(['\r', '\n']) {
            return Err("APNs: invalid topic".into());
        }
        let signer = ApnsTokenSigner::new(config);
        signer.token().map_err(|e| format!("APNs: {e}"))?;
        Ok(Self {
            client,
            base_url: config.endpoint().to_string(),
            topic: config.topic.clone(),
            signer,
            timeout: config.timeout,
        })
    }
}

#[async_trait]
impl Provider for ApnsProvider {
    async fn send(&self, job: &PushJob, target: &PushTarget) -> Result<(), ProviderError> {
        if !valid_apns_token(&target.token) {
            return Err(ProviderError::InvalidTarget("APNs: the device token is not hex".into()));
        }
        let token = self.signer.token()?;
        let request = apns_request(&self.base_url, &self.topic, &token, job, target);
        let response = execute(&self.client, &request, self.timeout).await?;
        if response.status == 403 {
            self.signer.invalidate();
        }
        classify_apns(&response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretSource;

    fn job() -> PushJob {
        PushJob {
            user: "bob".into(),
            message_id: "29443212804096000".into(),
            channel: "dm:alice:bob".into(),
            sender: "alice".into(),
            summary: "hi bob…".into(),
        }
    }

    fn response(status: u16, body: &str) -> HttpResponse {
        HttpResponse { status, body: body.into() }
    }

    #[test]
    fn the_webhook_signature_is_hmac_sha256_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            webhook_signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_webhook_request_carries_a_summary_signed() {
        let target = PushTarget::new("phone", Platform::Webhook, "opaque");
        let config = WebhookConfig {
            include_text: true,
            ..WebhookConfig::new("https://hooks.example/p", SecretSource::Value(String::new()))
        };
        let request = webhook_request(&config, b"0123456789abcdef", &job(), &target);
        assert_eq!(request.method, reqwest::Method::POST);
        assert_eq!(request.url, "https://hooks.example/p");
        assert_eq!(
            request.json_body().expect("json"),
            json!({"user": "bob", "device": "phone", "message_id": "29443212804096000",
                   "channel": "dm:alice:bob", "sender": "alice", "summary": "hi bob…"})
        );
        assert_eq!(
            request.header("x-kubechat-signature"),
            Some(webhook_signature(b"0123456789abcdef", &request.body).as_str())
        );
        assert_eq!(request.header(DELIVERY_HEADER), Some("29443212804096000:phone"));
        assert_eq!(request.header("content-type"), Some("application/json"));
    }

    /// `includeText: false` (the ChatCluster's default): the receiver learns who wrote where.
    #[test]
    fn without_include_text_the_webhook_gets_no_text() {
        let target = PushTarget::new("phone", Platform::Webhook, "opaque");
        let config = WebhookConfig::new("https://hooks.example/p", SecretSource::Value(String::new()));
        let body = webhook_request(&config, b"0123456789abcdef", &job(), &target).json_body().expect("json");
        assert_eq!(body.get("summary"), None, "{body}");
        assert_eq!(body["sender"], "alice");
    }

    #[test]
    fn the_fcm_request_has_the_http_v1_shape() {
        let target = PushTarget::new("pixel", Platform::Fcm, "fcm-token-1");
        let request = fcm_request("https://fcm.googleapis.com/", "my-proj", "ya29.token", &job(), &target);
        assert_eq!(request.method, reqwest::Method::POST);
        assert_eq!(request.url, "https://fcm.googleapis.com/v1/projects/my-proj/messages:send");
        assert_eq!(request.header("authorization"), Some("Bearer ya29.token"));
        assert_eq!(
            request.json_body().expect("json"),
            json!({"message": {
                "token": "fcm-token-1",
                "notification": {"title": "alice", "body": "hi bob…"},
                "data": {"channel": "dm:alice:bob", "message_id": "29443212804096000"},
            }})
        );
    }

    #[test]
    fn the_apns_request_has_the_alert_shape() {
        let target = PushTarget::new("iphone", Platform::Apns, "a1b2c3");
        let request = apns_request("https://api.sandbox.push.apple.com", "com.example.chat", "jwt", &job(), &target);
        assert_eq!(request.method, reqwest::Method::POST);
        assert_eq!(request.url, "https://api.sandbox.push.apple.com/3/device/a1b2c3");
        assert_eq!(request.header("authorization"), Some("bearer jwt"));
        assert_eq!(request.header("apns-topic"), Some("com.example.chat"));
        assert_eq!(request.header("apns-push-type"), Some("alert"));
        let id = request.header("apns-id").expect("apns-id");
        assert_eq!(id, apns_id("29443212804096000", "iphone"), "stable across retries");
        assert_eq!(id.len(), 36);
        assert_eq!(id.split('-').map(str::len).collect::<Vec<_>>(), [8, 4, 4, 4, 12]);
        assert_ne!(id, apns_id("29443212804096000", "ipad"));
        assert_eq!(
            request.json_body().expect("json"),
            json!({"aps": {"alert": {"title": "alice", "body": "hi bob…"}},
                   "channel": "dm:alice:bob", "message_id": "29443212804096000"})
        );
        assert!(valid_apns_token("a1B2c3") && !valid_apns_token("zz") && !valid_apns_token(""));
    }

    #[test]
    fn statuses_are_classified() {
        assert_eq!(classify_status("x", &response(204, "")), Ok(()));
        for transient in [408, 429, 500, 502, 503] {
            assert!(classify_status("x", &response(transient, "")).is_err_and(|e| e.is_transient()), "{transient}");
        }
        for permanent in [301, 400, 401, 403, 404, 410, 413] {
            assert!(
                matches!(classify_status("x", &response(permanent, "")), Err(ProviderError::Permanent(_))),
                "{permanent}"
            );
        }
        let unregistered = r#"{"error":{"code":404,"status":"NOT_FOUND","details":[{"errorCode":"UNREGISTERED"}]}}"#;
        assert!(matches!(classify_fcm(&response(404, unregistered)), Err(ProviderError::InvalidTarget(_))));
        assert!(matches!(classify_fcm(&response(400, "INVALID_ARGUMENT")), Err(ProviderError::Permanent(_))));
        assert!(classify_fcm(&response(503, "")).is_err_and(|e| e.is_transient()));
        assert!(classify_fcm(&response(401, "")).is_err_and(|e| e.is_transient()));
        assert!(matches!(classify_fcm(&response(403, "SENDER_ID_MISMATCH")), Err(ProviderError::Permanent(_))));
        assert!(matches!(
            classify_apns(&response(410, r#"{"reason":"Unregistered"}"#)),
            Err(ProviderError::InvalidTarget(_))
        ));
        assert!(matches!(
            classify_apns(&response(400, r#"{"reason":"BadDeviceToken"}"#)),
            Err(ProviderError::InvalidTarget(_))
        ));
        assert!(classify_apns(&response(403, r#"{"reason":"ExpiredProviderToken"}"#)).is_err_and(|e| e.is_transient()));
        assert!(matches!(
            classify_apns(&response(403, r#"{"reason":"InvalidProviderToken"}"#)),
            Err(ProviderError::Permanent(_))
        ));
        assert_eq!(classify_apns(&response(200, "")), Ok(()));
    }
}
