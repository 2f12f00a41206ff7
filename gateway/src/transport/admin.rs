//! The admin API, on the admin port only (the client Service does not
//! expose it; the NetworkPolicy lets only the operator and the kubelet
//! reach it): probes, metrics, this gateway's load, and drain.
//!
//! - `GET /healthz`, `GET /readyz`, `GET /metrics`: as on the client port.
//! - `GET /v1/admin/load`: [`AdminLoad`].
//! - `POST /v1/admin/drain` with `{"deadlineSeconds", "maxReconnectsPerSecond"}`
//!   (both optional, defaults from the config): 202 and the progress when it
//!   starts a drain, 200 and the progress when one runs already (its clock
//!   is not restarted), 400 with a message for a bad body.
//! - `GET /v1/admin/drain`: [`DrainProgress`](super::drain::DrainProgress).
//!
//! It keeps answering while the gateway drains and shuts down.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;

use super::Gateway;
use super::drain::{Drain, parse_drain_body};
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
pub struct Backends {
    pub redis: &'static str,
    pub store: &'static str,
}

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|State(g): State<Arc<Gateway>>| async move { super::readiness(&g) }))
        .route("/metrics", get(|State(g): State<Arc<Gateway>>| async move { super::metrics(&g) }))
        .route("/v1/admin/load", get(load))
        .route("/v1/admin/drain", get(drain_progress).post(start_drain))
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
        &AdminLoad { load, started_at: rfc3339(gateway.identity.started_at_ms), backends: Backends { redis, store } },
    )
}

fn connections_left(gateway: &Gateway) -> u64 {
    u64::try_from(gateway.metrics.connections.get()).unwrap_or(0)
}

async fn drain_progress(State(gateway): State<Arc<Gateway>>) -> Response {
    json(StatusCode::OK, &gateway.drain.progress(connections_left(&gateway)))
}

async fn start_drain(State(gateway): State<Arc<Gateway>>, body: Bytes) -> Response {
    let params = match parse_drain_body(&body, gateway.drain_defaults) {
        Ok(params) => params,
        Err(message) => return bad_request(&message),
    };
    let started = Drain::start(&gateway, params);
    let status = if started { StatusCode::ACCEPTED } else { StatusCode::OK };
    json(status, &gateway.drain.progress(connections_left(&gateway)))
}

fn bad_request(message: &str) -> Response {
    json(StatusCode::BAD_REQUEST, &serde_json::json!({"error": "bad_request", "message": message}))
}

/// `ms` since the epoch as RFC 3339 in UTC, to the millisecond.
fn rfc3339(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_998_052_198), "2026-11-30T00:20:52.198Z");
    }
}
