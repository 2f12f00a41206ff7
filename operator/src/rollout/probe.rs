//! The synthetic client a rollout waits for: a WebSocket connect at the
//! gateway's listed URL, with a token signed by the cluster's own key,
//! answered with `hello`. A pod that is ready and listed but serves no
//! client (the wrong signing key mounted, a listener that refuses) then
//! stops the rollout before a second gateway goes down.
//!
//! The probe is a session like any other (`kubechat.probe`, device
//! `operator`): it goes through the token check, a connection slot and the
//! session start, then closes at once.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Uri, header::AUTHORIZATION};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The user and device the probe signs in as (a reserved user name: a
/// real user of that name would see these sessions come and go).
pub const PROBE_USER: &str = "kubechat.probe";
pub const PROBE_DEVICE: &str = "operator";
/// Long enough for one reconcile's probes, short enough to be worthless when leaked.
const TOKEN_TTL_SECONDS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the signing key is shorter than the 16 bytes gateways accept")]
    ShortKey,
    #[error("signing the probe token: {0}")]
    Token(#[from] jsonwebtoken::errors::Error),
    #[error("the probe token is not a valid Authorization header value")]
    TokenHeader,
    #[error("{url} is not a ws:// URL at the pod's own address {addr}")]
    NotThePod { url: String, addr: SocketAddr },
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("the upgrade was refused: HTTP {status} {body}")]
    Refused { status: u16, body: String },
    #[error("the WebSocket handshake failed: {0}")]
    Handshake(WsError),
    #[error("no hello within {0:?}")]
    Timeout(Duration),
    #[error("the first frame was not a hello for {PROBE_USER}: {0}")]
    Unexpected(String),
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    dev: &'a str,
    exp: u64,
}

/// A short-lived token for the probe user, signed like the gateways verify
/// (HS256 with the key's bytes, surrounding whitespace removed).
pub fn token(signing_key: &[u8]) -> Result<String, ProbeError> {
    let key = signing_key.trim_ascii();
    if key.len() < 16 {
        return Err(ProbeError::ShortKey);
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let claims = Claims { sub: PROBE_USER, dev: PROBE_DEVICE, exp: now + TOKEN_TTL_SECONDS };
    Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(key))?)
}

/// Connects to `url`, which must name `addr` (the pod's own client port:
/// the operator dials no address a list entry could point elsewhere),
/// waits for `hello` and closes.
pub async fn connect(url: &str, addr: SocketAddr, token: &str, timeout: Duration) -> Result<(), ProbeError> {
    let not_the_pod = || ProbeError::NotThePod { url: url.to_string(), addr };
    let uri: Uri = url.parse().map_err(|_| not_the_pod())?;
    let authority_is_pod = uri.authority().is_some_and(|a| a.as_str() == addr.to_string());
    if uri.scheme_str() != Some("ws") || !authority_is_pod {
        return Err(not_the_pod());
    }
    let mut request = uri.into_client_request().map_err(ProbeError::Handshake)?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| ProbeError::TokenHeader)?;
    request.headers_mut().insert(AUTHORIZATION, bearer);

    tokio::time::timeout(timeout, async {
        let stream = TcpStream::connect(addr).await.map_err(|source| ProbeError::Connect { addr, source })?;
        let (mut socket, _) = tokio_tungstenite::client_async(request, stream).await.map_err(|e| match e {
            WsError::Http(response) => ProbeError::Refused {
                status: response.status().as_u16(),
                body: String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
            },
            other => ProbeError::Handshake(other),
        })?;
        let first = socket.next().await;
        let _ = socket.close(None).await;
        match first {
            Some(Ok(Message::Text(text))) if is_hello(&text) => Ok(()),
            Some(Ok(other)) => Err(ProbeError::Unexpected(other.to_string())),
            Some(Err(e)) => Err(ProbeError::Handshake(e)),
            None => Err(ProbeError::Unexpected("the connection closed".into())),
        }
    })
    .await
    .map_err(|_| ProbeError::Timeout(timeout))?
}

fn is_hello(text: &str) -> bool {
    #[derive(Deserialize)]
    struct Hello {
        #[serde(rename = "type")]
        type_: String,
        user: String,
    }
    serde_json::from_str::<Hello>(text).is_ok_and(|h| h.type_ == "hello" && h.user == PROBE_USER)
}

#[cfg(test)]
mod tests {
    use futures::SinkExt;
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef\n";

    /// A server that checks the bearer token's presence and answers
    /// `first` (or refuses with 503 when `None`).
    #[allow(clippy::result_large_err, reason = "the callback's type is tungstenite's")]
    async fn server(first: Option<&'static str>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let check = move |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
                let bearer = request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
                match (first, bearer) {
                    (Some(_), Some(b)) if b.starts_with("Bearer ey") => Ok(response),
                    _ => {
                        let mut refusal = ErrorResponse::new(Some(r#"{"error":"unavailable"}"#.into()));
                        *refusal.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::SERVICE_UNAVAILABLE;
                        Err(refusal)
                    }
                }
            };
            if let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, check).await {
                let _ = socket.send(Message::text(first.unwrap_or_default())).await;
                let _ = socket.next().await;
            }
        });
        addr
    }

    fn url(addr: SocketAddr) -> String {
        format!("ws://{addr}/v1/ws")
    }

    #[tokio::test]
    async fn a_hello_for_the_probe_user_passes() {
        let addr = server(Some(r#"{"type":"hello","protocol":1,"user":"kubechat.probe","device":"operator"}"#)).await;
        let token = token(KEY).expect("token");
        connect(&url(addr), addr, &token, Duration::from_secs(5)).await.expect("probe");
    }

    #[tokio::test]
    async fn a_refused_upgrade_says_the_status_and_the_body() {
        let addr = server(None).await;
        let token = token(KEY).expect("token");
        let error = connect(&url(addr), addr, &token, Duration::from_secs(5)).await.expect_err("refused");
        assert!(matches!(&error, ProbeError::Refused { status: 503, body } if body.contains("unavailable")), "{error}");
    }

    #[tokio::test]
    async fn another_first_frame_fails() {
        let addr = server(Some(r#"{"type":"error","code":"unauthorized"}"#)).await;
        let token = token(KEY).expect("token");
        let error = connect(&url(addr), addr, &token, Duration::from_secs(5)).await.expect_err("not a hello");
        assert!(matches!(error, ProbeError::Unexpected(_)), "{error}");
    }

    #[tokio::test]
    async fn only_the_pods_own_address_is_dialed() {
        let addr: SocketAddr = "127.0.0.9:8080".parse().expect("addr");
        let token = token(KEY).expect("token");
        for url in ["ws://127.0.0.10:8080/v1/ws", "wss://127.0.0.9:8080/v1/ws", "ws://example.com/v1/ws", "not a url"] {
            let error = connect(url, addr, &token, Duration::from_secs(1)).await.expect_err(url);
            assert!(matches!(error, ProbeError::NotThePod { .. }), "{url}: {error}");
        }
    }

    #[test]
    fn the_token_is_what_a_gateway_verifies() {
        let token = token(KEY).expect("token");
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        let key = jsonwebtoken::DecodingKey::from_secret(KEY.trim_ascii());
        let claims = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation).expect("valid").claims;
        assert_eq!((claims["sub"].as_str(), claims["dev"].as_str()), (Some(PROBE_USER), Some(PROBE_DEVICE)));
        assert!(matches!(super::token(b"short"), Err(ProbeError::ShortKey)));
    }
}
