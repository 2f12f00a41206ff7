//! HTTP and WebSocket: hyper serves `/v1/ws` (upgraded to a WebSocket after
//! the token checks out), `/healthz`, `/readyz`, `/metrics`, the web client
//! ([`web`], where enabled) and, in development mode only, `/dev/token`.
//!
//! - [`auth`]: token verification (and minting for development).
//! - [`connection`]: the loop of one WebSocket connection.
//! - [`socket`]: the WebSocket protocol on the TCP stream, holding no state
//!   between messages.

pub mod admin;
pub mod auth;
pub mod connection;
pub mod discovery;
pub mod drain;
pub mod socket;
pub mod web;

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
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::chat::ChatService;
use crate::metrics::Metrics;
use crate::store::health::{StoreHealth, StoreStatus};
use auth::{AuthError, Authenticator, query_param, token_from};
use connection::ConnectionLimits;

/// Path of the WebSocket endpoint (the protocol version is in the path).
pub const WS_PATH: &str = "/v1/ws";

/// Bytes of frames buffered before they are written without waiting for
/// the flush that ends a batch.
const WRITE_BUFFER: usize = 64 * 1024;

/// tungstenite's read buffer, allocated when a message starts arriving:
/// the most it takes per read, and what a short message costs while it is
/// read.
const READ_BUFFER: usize = 1024;

pub struct Gateway {
    pub chat: Arc<ChatService>,
    /// Its health and the store's are this gateway's degraded state.
    pub broker: Arc<dyn Broker>,
    pub store_health: Arc<StoreHealth>,
    pub auth: Arc<Authenticator>,
    pub metrics: Metrics,
    pub limits: ConnectionLimits,
    /// Largest WebSocket message accepted; larger ones close the connection
    /// with 1009. Sized so any text up to the character limit fits, and
    /// text over the limit still arrives and gets a `message_too_long` error.
    pub max_frame_bytes: usize,
    /// The WebSocket settings of every connection ([`Gateway::websocket_config`]).
    pub websocket: WebSocketConfig,
    /// Serve `/dev/token` (never in production).
    pub dev_tokens: bool,
    /// Serve the web client at `/`.
    pub web_client: bool,
    /// Required by the admin API's state-changing requests (`None`: refused).
    pub admin_token: Option<Arc<admin::AdminToken>>,
    pub ready: Arc<AtomicBool>,
    /// One permit per open connection (`maxConnections`).
    pub connection_slots: Arc<Semaphore>,
    /// Who this gateway is, for discovery and the operator.
    pub identity: Identity,
    pub drain: drain::Drain,
    /// What a drain uses when the caller (or SIGTERM) gives no parameters.
    pub drain_defaults: drain::DrainParams,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

/// Who a gateway is.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The gateway id (its pod name).
    pub pod: String,
    /// The WebSocket URL clients use to reach it.
    pub url: String,
    pub version: String,
    pub started_at_ms: i64,
    /// `maxConnections`.
    pub capacity: usize,
}

impl Gateway {
    /// Accepting connections: started, not draining, not stopping.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.shutdown.is_cancelled() && !self.drain.is_draining()
    }

    /// This gateway's load now.
    pub fn load(&self) -> crate::broker::GatewayLoad {
        crate::broker::GatewayLoad {
            pod: self.identity.pod.clone(),
            url: self.identity.url.clone(),
            connections: u64::try_from(self.metrics.connections.get()).unwrap_or(0),
            capacity: self.identity.capacity as u64,
            ready: self.is_ready() && self.broker.may_mint_ids(),
            draining: self.drain.is_draining(),
            version: self.identity.version.clone(),
            published_at_ms: 0,
        }
    }

    /// Hands the current load to the broker (for discovery).
    pub fn report_load(&self) {
        self.broker.report_load(self.load());
    }

    /// WebSocket settings for frames up to `max_frame_bytes`.
    pub fn websocket_config(max_frame_bytes: usize) -> WebSocketConfig {
        // Buffers exist only while a message moves (see [`socket`]). Reads
        // hand tungstenite up to `READ_BUFFER` bytes at a time (a large
        // frame comes off the socket in bigger chunks, see
        // `socket::READ_CHUNK`). Writes are buffered (the buffer grows only
        // when frames are written) so that a batch of frames goes out in one
        // system call when the connection flushes.
        WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(WRITE_BUFFER)
            .max_write_buffer_size(1024 * 1024)
            .max_message_size(Some(max_frame_bytes))
            .max_frame_size(Some(max_frame_bytes))
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
        let (tasks, shutdown) = (gateway.tasks.clone(), gateway.shutdown.clone());
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
            tokio::pin!(connection);
            // A keep-alive client (a discovery poller) must not hold the
            // shutdown for the grace period: idle connections close at once,
            // a request in progress is answered first.
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

async fn route(request: Request<Incoming>, gateway: Arc<Gateway>) -> HttpResponse {
    match (request.method(), request.uri().path()) {
        (&Method::GET, WS_PATH) => upgrade(request, gateway),
        (&Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => readiness(&gateway),
        (&Method::GET, "/metrics") => metrics(&gateway),
        (&Method::GET, "/dev/token") if gateway.dev_tokens => dev_token(&request, &gateway),
        (&Method::GET, "/v1/discovery") => discover(&gateway).await,
        (&Method::GET, path) if gateway.web_client => {
            web::asset(path).unwrap_or_else(|| json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"))
        }
        _ => json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    }
}

/// 503 while starting, stopping or unable to mint ids; otherwise 200, with
/// the backends that do not answer named in the body. An unreachable Redis or
/// store does not fail readiness: every gateway shares them, so failing it
/// would take the whole cluster out of its Service at once, while sends are
/// refused with a clear code (store) or still work (Redis).
pub(crate) fn readiness(gateway: &Gateway) -> HttpResponse {
    if !gateway.ready.load(Ordering::Relaxed) || gateway.shutdown.is_cancelled() {
        return respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n");
    }
    if gateway.drain.is_draining() {
        return respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready: draining\n");
    }
    if !gateway.broker.may_mint_ids() {
        return respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: another gateway holds this gateway's worker id (sends refused)\n",
        );
    }
    let mut degraded = Vec::new();
    if !gateway.broker.healthy() {
        degraded.push("Redis unreachable (no cross-gateway live delivery, presence unknown)".to_string());
    }
    if let StoreStatus::Down { since_ms, error } = gateway.store_health.status() {
        let for_ms = crate::ids::now_ms() - since_ms;
        degraded.push(format!("store unavailable for {for_ms} ms (sends, sync and history refused): {error}"));
    }
    if degraded.is_empty() {
        respond(StatusCode::OK, "text/plain", "ready\n")
    } else {
        respond(StatusCode::OK, "text/plain", format!("ready, degraded: {}\n", degraded.join("; ")))
    }
}

pub(crate) fn metrics(gateway: &Gateway) -> HttpResponse {
    gateway.metrics.broker_healthy.set(i64::from(gateway.broker.healthy()));
    respond(StatusCode::OK, "text/plain; version=0.0.4", gateway.metrics.render())
}

/// `GET /v1/discovery`: where a client should connect (see [`discovery`]).
async fn discover(gateway: &Gateway) -> HttpResponse {
    let mut loads = match gateway.broker.gateway_loads().await {
        Ok(loads) => loads,
        Err(e) => {
            return json_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &format!("gateways unknown: {e}"));
        }
    };
    // This gateway's own entry as of now, not as of its last report.
    loads.retain(|g| g.pod != gateway.identity.pod);
    loads.push(gateway.load());
    let mut seed = drain::rand_seed();
    let answer = discovery::discovery(&loads, &mut seed);
    respond(StatusCode::OK, "application/json", serde_json::to_string(&answer).unwrap_or_default())
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
    if crate::failpoint::is_armed(crate::failpoint::REFUSE_WEBSOCKET) {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "refused by the failpoint refuse-websocket");
    }
    if gateway.drain.is_draining() {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this gateway is draining; ask GET /v1/discovery for another",
        );
    }
    // Not ready (its readiness says so too): a client let in here would
    // have every send refused until the worker id is back.
    if !gateway.broker.may_mint_ids() {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this gateway cannot accept writes right now (its worker id is not confirmed); ask GET /v1/discovery for \
             another",
        );
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
    let tasks = gateway.tasks.clone();
    let accepted =
        connection::Accepted { gateway, permit, upgrade: on_upgrade, user: claims.sub, device: claims.dev, expires_at };
    tasks.spawn(connection::serve(Box::new(accepted)));

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

/// The connection loop end to end, against a gateway on the embedded store:
/// its timers, its close codes and its size.
#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use futures::{SinkExt, StreamExt};
    use tokio::net::TcpStream;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::{Bytes, Message};
    use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

    use super::connection::{ConnectionLimits, close};
    use crate::app::{self, BrokerSetup, GatewayOptions, RunningGateway};
    use crate::store::embedded::EmbeddedStore;
    use crate::transport::auth::Authenticator;

    const KEY: &[u8] = b"transport-test-key-0123456789abcdef";
    type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

    async fn gateway(limits: ConnectionLimits) -> (RunningGateway, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = std::sync::Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let options = GatewayOptions { listen: "127.0.0.1:0".parse().expect("addr"), limits, ..Default::default() };
        let auth = Authenticator::new(KEY).expect("key");
        let running = app::start(store.clone(), std::sync::Arc::new(store), BrokerSetup::Local, auth, 0, options)
            .await
            .expect("start");
        (running, dir)
    }

    async fn connect(gateway: &RunningGateway, user: &str, ttl_seconds: u64) -> Client {
        let token = Authenticator::new(KEY).expect("key").mint(user, "phone", ttl_seconds).expect("token");
        let (mut client, _) =
            tokio_tungstenite::connect_async(format!("{}?token={token}", gateway.ws_url())).await.expect("connect");
        let hello = client.next().await.expect("open").expect("hello");
        assert!(hello.to_text().expect("text").contains(r#""type":"hello""#), "{hello:?}");
        client
    }

    /// The close frame the server ends with, skipping anything before it.
    async fn close_code(client: &mut Client) -> u16 {
        while let Some(message) = tokio::time::timeout(Duration::from_secs(10), client.next()).await.expect("in time") {
            if let Ok(Message::Close(frame)) = message {
                return frame.map_or(0, |CloseFrame { code, .. }| u16::from(code));
            }
        }
        panic!("closed without a close frame");
    }

    #[tokio::test]
    async fn heartbeats_keep_a_connection_open_and_silence_closes_it_on_time() {
        let idle = Duration::from_millis(400);
        let (gateway, _dir) = gateway(ConnectionLimits { idle_timeout: idle, ..Default::default() }).await;
        let mut client = connect(&gateway, "alice", 3600).await;
        for _ in 0..10 {
            tokio::time::sleep(idle / 4).await;
            client.send(Message::text(r#"{"type":"heartbeat"}"#)).await.expect("heartbeat");
        }
        // A ping counts as well, and is answered.
        client.send(Message::Ping(Bytes::from_static(b"p"))).await.expect("ping");
        assert_eq!(client.next().await.expect("open").expect("pong"), Message::Pong(Bytes::from_static(b"p")));
        let silent = Instant::now();
        assert_eq!(close_code(&mut client).await, close::IDLE);
        let waited = silent.elapsed();
        assert!(waited >= idle - Duration::from_millis(50) && waited < idle * 2, "closed after {waited:?}");
        gateway.stop(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn an_expired_token_closes_a_busy_connection() {
        let (gateway, _dir) = gateway(ConnectionLimits::default()).await;
        let mut client = connect(&gateway, "bob", 1).await;
        let heartbeats = async {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if client.send(Message::text(r#"{"type":"heartbeat"}"#)).await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(2500), heartbeats).await;
        assert_eq!(close_code(&mut client).await, close::TOKEN_EXPIRED);
        gateway.stop(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn shutdown_and_oversized_frames_close_with_their_codes() {
        let (gateway, _dir) = gateway(ConnectionLimits::default()).await;
        let mut big = connect(&gateway, "carol", 3600).await;
        let frame_limit = crate::protocol::Limits::default().max_frame_bytes();
        // Large frames within the limit are read; the error reply proves it.
        big.send(Message::text(format!(r#"{{"type":"nonsense","pad":"{}"}}"#, "x".repeat(frame_limit / 2))))
            .await
            .expect("send");
        let reply = big.next().await.expect("open").expect("reply");
        assert!(reply.to_text().expect("text").contains(r#""type":"error""#), "{reply:?}");
        big.send(Message::text("x".repeat(frame_limit + 1))).await.expect("send");
        assert_eq!(close_code(&mut big).await, close::TOO_BIG);

        let mut idle = connect(&gateway, "dave", 3600).await;
        let stopping = tokio::spawn(gateway.stop(Duration::from_secs(5)));
        assert_eq!(close_code(&mut idle).await, close::GOING_AWAY);
        stopping.await.expect("stopped");
    }
}
