//! The admin API, on the admin port only (the client Service does not
//! expose it; the operator's NetworkPolicy admits only the operator's pods
//! to it, and the kubelet's probes come from the node): probes, metrics,
//! this gateway's load, and drain.
//!
//! - `GET /healthz`, `GET /readyz`, `GET /metrics`: as on the client port.
//! - `GET /v1/admin/load`: [`AdminLoad`].
//! - `POST /v1/admin/drain` with `{"deadlineSeconds", "maxReconnectsPerSecond"}`
//!   (both optional, defaults from the config): 202 and the progress when it
//!   starts a drain, 200 and the progress when one runs already (its clock
//!   is not restarted), 400 with a message for a bad body.
//! - `DELETE /v1/admin/drain`: cancels a running drain ([`CancelAnswer`]);
//!   409 once it finished or while the process stops.
//! - `GET /v1/admin/drain`: [`DrainProgress`](super::drain::DrainProgress).
//!
//! The two requests that change state (POST and DELETE) need the admin
//! token, `Authorization: Bearer <token>` ([`AdminToken`]): 401 without it
//! or with another, 403 when the gateway has none configured. Reads stay
//! open: they change nothing, and the kubelet and discovery use them.
//!
//! It keeps answering while the gateway drains and shuts down.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use super::Gateway;
use super::drain::{Cancel, Drain, Origin, parse_drain_body};
use crate::broker::GatewayLoad;
use crate::store::health::StoreStatus;

/// What `GET /v1/admin/load` answers: the load discovery uses, and what
/// only the operator needs.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminLoad {
    #[serde(flatten)]
    pub load: GatewayLoad,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub backends: Backends,
}

/// Backend health as this gateway sees it: `up`, `down`, or `none` (not used).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backends {
    pub redis: &'static str,
    pub store: &'static str,
    /// A Redis Cluster's masters (absent for one Redis).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub redis_shards: Vec<crate::broker::RedisShardView>,
}

/// What `DELETE /v1/admin/drain` answers with 200.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelAnswer {
    /// A running drain was stopped (false: none was running).
    pub cancelled: bool,
    /// Clients the cancelled drain had sent away (they do not come back).
    pub moved: u64,
    /// Clients connected now: they stay.
    pub connections_left: u64,
}

/// The secret a caller presents to change this gateway's state through the
/// admin API. Compared in constant time; never logged.
pub struct AdminToken {
    /// Read again at every check, so a replaced Secret takes effect
    /// without a restart (the kubelet updates mounted Secrets in place).
    file: Option<PathBuf>,
    current: Mutex<Vec<u8>>,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken").field("file", &self.file).finish_non_exhaustive()
    }
}

impl AdminToken {
    /// The token in `path` (surrounding whitespace ignored); an error when
    /// the file cannot be read or holds none.
    pub fn from_file(path: &Path) -> std::io::Result<Self> {
        Ok(Self { current: Mutex::new(read_token(path)?), file: Some(path.to_path_buf()) })
    }

    /// A token given directly (tests, embedding).
    pub fn fixed(token: &str) -> Self {
        Self { file: None, current: Mutex::new(token.trim().as_bytes().to_vec()) }
    }

    /// Whether `presented` is the token.
    pub fn verify(&self, presented: &[u8]) -> bool {
        let reread = self.file.as_deref().map(|path| (path, read_token(path)));
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        match reread {
            Some((_, Ok(token))) => *current = token,
            // A Secret being replaced, or a file removed by hand: keep the last one.
            Some((path, Err(e))) => {
                tracing::warn!(file = %path.display(), error = %e, "admin token unreadable; the last one read holds");
            }
            None => {}
        }
        !current.is_empty() && bool::from(current.as_slice().ct_eq(presented))
    }
}

fn read_token(path: &Path) -> std::io::Result<Vec<u8>> {
    let token = std::fs::read(path)?.trim_ascii().to_vec();
    if token.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the file holds no token"));
    }
    Ok(token)
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in any case).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The answer refusing a state-changing request without the admin token
/// (`None`: it carries the token).
fn refusal(gateway: &Gateway, headers: &HeaderMap, what: &str) -> Option<Response> {
    let Some(token) = gateway.admin_token.as_ref() else {
        tracing::warn!(request = what, "admin request refused: this gateway has no admin token");
        return Some(error(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "this gateway has no admin token (its config names no admin.tokenFile): it cannot be drained through \
             the admin API",
        ));
    };
    let presented = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer);
    let refused = match presented {
        Some(presented) if token.verify(presented.as_bytes()) => return None,
        Some(_) => "the admin token is wrong",
        None => "this request needs the admin token: `Authorization: Bearer <token>`",
    };
    tracing::warn!(request = what, "admin request refused: {refused}");
    let mut response = error(StatusCode::UNAUTHORIZED, "unauthorized", refused);
    response.headers_mut().insert(WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
    Some(response)
}

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|State(g): State<Arc<Gateway>>| async move { super::readiness(&g) }))
        .route("/metrics", get(|State(g): State<Arc<Gateway>>| async move { super::metrics(&g) }))
        .route("/v1/admin/load", get(load))
        .route("/v1/admin/drain", get(drain_progress).post(start_drain).delete(cancel_drain))
        .with_state(gateway)
}

/// Serves the admin API on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>) {
    if let Err(e) = axum::serve(listener, router(gateway)).await {
        tracing::error!(error = %e, "admin API stopped");
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    (status, [("content-type", "application/json")], serde_json::to_string(body).unwrap_or_default()).into_response()
}

async fn load(State(gateway): State<Arc<Gateway>>) -> Response {
    let load = gateway.load();
    let redis = match (gateway.broker.uses_redis(), gateway.broker.healthy()) {
        (false, _) => "none",
        (true, true) => "up",
        (true, false) => "down",
    };
    let store = if gateway.store_health.status() == StoreStatus::Up { "up" } else { "down" };
    json(
        StatusCode::OK,
        &AdminLoad {
            load,
            started_at: rfc3339(gateway.identity.started_at_ms),
            backends: Backends { redis, store, redis_shards: gateway.broker.redis_shards() },
        },
    )
}

fn connections_left(gateway: &Gateway) -> u64 {
    u64::try_from(gateway.metrics.connections.get()).unwrap_or(0)
}

async fn drain_progress(State(gateway): State<Arc<Gateway>>) -> Response {
    json(StatusCode::OK, &gateway.drain.progress(connections_left(&gateway)))
}

async fn start_drain(State(gateway): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refusal(&gateway, &headers, "POST /v1/admin/drain") {
        return refused;
    }
    let params = match parse_drain_body(&body, gateway.drain_defaults) {
        Ok(params) => params,
        Err(message) => return error(StatusCode::BAD_REQUEST, "bad_request", &message),
    };
    let started = Drain::start(&gateway, params, Origin::Admin);
    if started {
        // Before the answer: whoever asked (the operator's rollout) may act
        // on it at once, and other gateways must stop recommending this one
        // (they see it within their one-second load cache).
        gateway.broker.publish_load_now(gateway.load()).await;
    }
    let status = if started { StatusCode::ACCEPTED } else { StatusCode::OK };
    json(status, &gateway.drain.progress(connections_left(&gateway)))
}

async fn cancel_drain(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&gateway, &headers, "DELETE /v1/admin/drain") {
        return refused;
    }
    let (cancelled, moved) = match Drain::cancel(&gateway) {
        Cancel::Cancelled { moved } => (true, moved),
        Cancel::NotDraining => (false, 0),
        Cancel::Finished => {
            return error(
                StatusCode::CONFLICT,
                "drain_finished",
                "the drain finished (every client moved or closed) and cannot be undone: restart the gateway to \
                 serve again",
            );
        }
        Cancel::Stopping => {
            return error(StatusCode::CONFLICT, "stopping", "the gateway is shutting down: its drain runs to the end");
        }
    };
    json(StatusCode::OK, &CancelAnswer { cancelled, moved, connections_left: connections_left(&gateway) })
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    json(status, &serde_json::json!({"error": code, "message": message}))
}

/// `ms` since the epoch as RFC 3339 in UTC, to the millisecond.
fn rfc3339(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(at) => format!("{at:.3}"),
        // Outside years -9999..=9999: not a time this process started at.
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_header_value() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"), "the scheme in any case, spaces around");
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer  "), None);
        assert_eq!(bearer("abc"), None);
    }

    #[test]
    fn the_token_is_checked_whole_and_read_again_from_its_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").expect("write");
        let token = AdminToken::from_file(&path).expect("token");
        assert!(token.verify(b"s3cret"));
        for wrong in [&b"s3cre"[..], b"s3cret2", b"S3CRET", b""] {
            assert!(!token.verify(wrong), "{wrong:?}");
        }
        // The Secret replaced (the kubelet swaps the file): the new one holds at once.
        std::fs::write(&path, "rotated").expect("write");
        assert!(token.verify(b"rotated") && !token.verify(b"s3cret"));
        // Gone or emptied: the last one read holds.
        std::fs::write(&path, "  \n").expect("write");
        assert!(token.verify(b"rotated"));
        std::fs::remove_file(&path).expect("remove");
        assert!(token.verify(b"rotated"));
        assert!(AdminToken::from_file(&path).is_err(), "no file, no start");
        std::fs::write(&path, "\n").expect("write");
        assert!(AdminToken::from_file(&path).is_err(), "an empty file, no start");
        assert!(!AdminToken::fixed("").verify(b""), "an empty token admits no one");
        assert!(!format!("{token:?}").contains("rotated"), "never printed");
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_998_052_198), "2026-11-30T00:20:52.198Z");
    }
}
