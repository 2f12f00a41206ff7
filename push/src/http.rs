//! HTTP for the push providers and their credentials: the request shape,
//! the shared client, sending with a timeout, and how a failure is
//! classified ([`ProviderError`]). A leaf of `push`: the providers and the
//! credential sources (which fetch OAuth tokens) both use it.

use std::sync::Once;
use std::time::Duration;

/// Most of an error response kept for the error message.
const MAX_ERROR_BODY: usize = 2048;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Worth retrying: network trouble, timeouts, 408/429/5xx.
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help (4xx, missing or rejected credentials).
    #[error("{0}")]
    Permanent(String),
    /// The provider says the device token is no longer valid: permanent, and the target
    /// should be unregistered.
    #[error("{0}")]
    InvalidTarget(String),
}

impl ProviderError {
    pub fn is_transient(&self) -> bool {
        matches!(self, ProviderError::Transient(_))
    }

    /// Label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::Transient(_) => "transient",
            ProviderError::Permanent(_) => "permanent",
            ProviderError::InvalidTarget(_) => "invalid_target",
        }
    }
}

/// An outgoing request, before credentials are attached or after (for the providers'
/// pure request builders).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: reqwest::Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json_body(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Status and (the start of) the body of a response.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// The shared HTTPS client: rustls with the `ring` provider (installed as the process default
/// if none is), the platform's CA roots, no redirects, HTTP/2 where the server offers it.
pub fn http_client() -> Result<reqwest::Client, String> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // Fails only if another thread installed one first, which is as good.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    });
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("kubechat-push/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

/// Sends `request`, all of it (connect, send, response body) within `timeout`. Network
/// errors and timeouts are transient; a request that cannot be built is permanent.
pub async fn execute(
    client: &reqwest::Client,
    request: &HttpRequest,
    timeout: Duration,
) -> Result<HttpResponse, ProviderError> {
    let mut builder = client.request(request.method.clone(), &request.url).timeout(timeout);
    for (name, value) in &request.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let describe = |e: reqwest::Error| {
        // The URL may carry a device token: leave it out of errors (they end up in logs and
        // the dead-letter stream).
        let e = e.without_url();
        if e.is_builder() || e.is_redirect() {
            ProviderError::Permanent(format!("invalid request: {e}"))
        } else if e.is_timeout() {
            ProviderError::Transient(format!("timed out after {timeout:?}"))
        } else {
            ProviderError::Transient(format!("network: {}", error_chain(&e)))
        }
    };
    let mut response = builder.body(request.body.clone()).send().await.map_err(describe)?;
    let status = response.status().as_u16();
    let mut body = Vec::new();
    // Only the start of the body matters (error reasons); stop reading after that.
    while body.len() < MAX_ERROR_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => break,
            // A status arrived; a broken body does not change what it says.
            Err(_) => break,
        }
    }
    body.truncate(MAX_ERROR_BODY);
    Ok(HttpResponse { status, body: String::from_utf8_lossy(&body).into_owned() })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
