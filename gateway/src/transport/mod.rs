//! HTTP and WebSocket: hyper serves `/v1/ws` (upgraded to a WebSocket after
//! the token checks out), `/healthz`, `/readyz`, `/metrics` and, in
//! development mode only, `/dev/token`.
//!
//! - [`auth`]: token verification (and minting for development).
//! - [`connection`]: the loop of one WebSocket connection.

pub mod auth;
pub mod connection;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::chat::ChatService;
use crate::metrics::Metrics;
use auth::{AuthError, Authenticator, query_param, token_from};
use connection::{Connection, ConnectionLimits};

/// Path of the WebSocket endpoint (the protocol version is in the path).
pub const WS_PATH: &str = "/v1/ws";

/// Bytes of frames buffered before they are written without waiting for
/// the flush that ends a batch.
const WRITE_BUFFER: usize = 64 * 1024;

pub struct Gateway {
    pub chat: Arc<ChatService>,
    /// Its health is this gateway's degraded state.
    pub broker: Arc<dyn Broker>,
    pub auth: Arc<Authenticator>,
    pub metrics: Metrics,
    pub limits: ConnectionLimits,
    /// Largest WebSocket message accepted; larger ones close the connection
    /// with 1009. Sized so any text up to the character limit fits, and
    /// text over the limit still arrives and gets a `message_too_long` error.
    pub max_frame_bytes: usize,
    /// Serve `/dev/token` (never in production).
    pub dev_tokens: bool,
    pub ready: Arc<AtomicBool>,
    /// One permit per open connection (`maxConnections`).
    pub connection_slots: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

impl Gateway {
    /// Frame size for a character limit: 4 bytes per character (UTF-8's
    /// worst case) twice over, plus room for the JSON envelope.
    pub fn frame_limit_for(max_message_chars: usize) -> usize {
        max_message_chars.saturating_mul(8).saturating_add(16 * 1024)
    }

    fn websocket_config(&self) -> WebSocketConfig {
        // Small buffers: an idle connection should cost a few KiB, not the
        // 128 KiB tungstenite allocates by default. Writes are buffered (the
        // buffer grows only when frames are written) so that a batch of
        // frames goes out in one system call when the connection flushes.
        WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(WRITE_BUFFER)
            .max_write_buffer_size(1024 * 1024)
            .max_message_size(Some(self.max_frame_bytes))
            .max_frame_size(Some(self.max_frame_bytes))
    }
}

type HttpResponse = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> HttpResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

fn json_error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    let body = serde_json::json!({"error": code, "message": message}).to_string();
    respond(status, "application/json", body)
}

fn header_contains(request: &Request<Incoming>, name: hyper::header::HeaderName, token: &str) -> bool {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|part| part.trim().eq_ignore_ascii_case(token)))
}

/// Accepts HTTP connections until shutdown.
pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>) {
    loop {
        let (stream, peer) = tokio::select! {
            () = gateway.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let gateway = gateway.clone();
        let tasks = gateway.tasks.clone();
        tasks.spawn(async move {
            let service = service_fn(move |request| {
                let gateway = gateway.clone();
                async move { Ok::<_, Infallible>(route(request, gateway).await) }
            });
            let connection = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

async fn route(request: Request<Incoming>, gateway: Arc<Gateway>) -> HttpResponse {
    match (request.method(), request.uri().path()) {
        (&Method::GET, WS_PATH) => upgrade(request, gateway),
        (&Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            if !gateway.ready.load(Ordering::Relaxed) || gateway.shutdown.is_cancelled() {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            } else if !gateway.broker.healthy() {
                // Still ready: sends are stored and acked, and every gateway
                // shares the same Redis, so failing readiness would take the
                // whole cluster out of its Service at once.
                respond(
                    StatusCode::OK,
                    "text/plain",
                    "ready, degraded: Redis unreachable (no cross-gateway live delivery, presence unknown)\n",
                )
            } else {
                respond(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            gateway.metrics.broker_healthy.set(i64::from(gateway.broker.healthy()));
            respond(StatusCode::OK, "text/plain; version=0.0.4", gateway.metrics.render())
        }
        (&Method::GET, "/dev/token") if gateway.dev_tokens => dev_token(&request, &gateway),
        _ => json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    }
}

fn dev_token(request: &Request<Incoming>, gateway: &Gateway) -> HttpResponse {
    let query = request.uri().query().unwrap_or_default();
    let (Some(user), Some(device)) = (query_param(query, "user"), query_param(query, "device")) else {
        return json_error(StatusCode::BAD_REQUEST, "missing_field", "give ?user=<id>&device=<id>");
    };
    if !crate::protocol::valid_name(&user) || !crate::protocol::valid_name(&device) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "user and device must be 1-64 of [A-Za-z0-9_.@-]",
        );
    }
    match gateway.auth.mint(&user, &device, 24 * 3600) {
        Ok(token) => respond(StatusCode::OK, "text/plain", token),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()),
    }
}

/// Checks the handshake and the token, answers 101 and hands the upgraded
/// socket to a [`Connection`]. Failures are plain HTTP errors with a JSON
/// body: a client learns why instead of seeing a silent close.
fn upgrade(mut request: Request<Incoming>, gateway: Arc<Gateway>) -> HttpResponse {
    let is_upgrade =
        header_contains(&request, CONNECTION, "upgrade") && header_contains(&request, UPGRADE, "websocket");
    let key = request.headers().get(SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes()));
    let version_ok = request.headers().get(SEC_WEBSOCKET_VERSION).is_some_and(|v| v == "13");
    let Some(accept) = key.filter(|_| is_upgrade && version_ok) else {
        return json_error(StatusCode::BAD_REQUEST, "not_websocket", "expected a WebSocket upgrade (version 13)");
    };
    if gateway.shutdown.is_cancelled() {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "going_away", "gateway shutting down; use another");
    }
    let claims = match token_from(request.headers(), request.uri().query()).ok_or(AuthError::Missing) {
        Ok(token) => gateway.auth.verify(&token),
        Err(e) => Err(e),
    };
    let claims = match claims {
        Ok(claims) => claims,
        Err(e) => {
            let code = if e == AuthError::Expired { "token_expired" } else { "unauthorized" };
            return json_error(StatusCode::UNAUTHORIZED, code, &e.to_string());
        }
    };
    let Ok(permit) = gateway.connection_slots.clone().try_acquire_owned() else {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "gateway_full", "this gateway is at capacity; use another");
    };

    let on_upgrade = hyper::upgrade::on(&mut request);
    let expires_in = claims
        .exp
        .saturating_sub(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()));
    let expires_at = tokio::time::Instant::now() + Duration::from_secs(expires_in);
    let config = gateway.websocket_config();
    let tasks = gateway.tasks.clone();
    tasks.spawn(async move {
        let _permit = permit;
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        let socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
        Connection {
            socket,
            chat: gateway.chat.clone(),
            metrics: gateway.metrics.clone(),
            user: claims.sub,
            device: claims.dev,
            expires_at,
            limits: gateway.limits.clone(),
            shutdown: gateway.shutdown.clone(),
            tasks: gateway.tasks.clone(),
        }
        .run()
        .await;
    });

    let mut response = respond(StatusCode::SWITCHING_PROTOCOLS, "text/plain", Bytes::new());
    let headers = response.headers_mut();
    headers.remove(CONTENT_TYPE);
    headers.insert(CONNECTION, hyper::header::HeaderValue::from_static("Upgrade"));
    headers.insert(UPGRADE, hyper::header::HeaderValue::from_static("websocket"));
    if let Ok(value) = accept.parse() {
        headers.insert(SEC_WEBSOCKET_ACCEPT, value);
    }
    response
}
