//! Reading one gateway's load, `GET http://<pod IP>:<admin port>/v1/admin/load`,
//! and starting or cancelling its drain (`POST` and `DELETE …/v1/admin/drain`,
//! for the rollout, with the cluster's admin token).
//!
//! One short-lived HTTP/1.1 connection per poll (a poll every few seconds
//! per gateway does not need pooling), everything under one timeout, the
//! body capped: a dead, slow or hostile endpoint costs at most the timeout.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use super::endpoints::Backends;

/// Path of the load report on the gateway's admin port.
pub const LOAD_PATH: &str = "/v1/admin/load";
/// A load report is a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;

/// What a gateway says about itself (fields the operator does not use are ignored).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    /// Its gateway id: the pod name.
    pub pod: String,
    /// The URL it advertises to clients.
    #[serde(default)]
    pub url: String,
    pub connections: u64,
    pub capacity: u64,
    pub ready: bool,
    pub draining: bool,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub backends: Option<Backends>,
}

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("body: {0}")]
    Body(String),
    #[error("not a load report: {0}")]
    Invalid(#[from] serde_json::Error),
    #[error("the gateway of pod {0} answered")]
    OtherPod(String),
    #[error("not dialed: {0}")]
    NotDialed(String),
}

impl PollError {
    /// Nothing of that gateway answers at its address (refused, another
    /// pod's gateway there, no address): its process is gone and holds no
    /// one. A timeout or a bad answer may come from a gateway too busy to
    /// answer, which still holds its clients.
    pub fn gateway_is_gone(&self) -> bool {
        match self {
            PollError::Connect(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
            PollError::OtherPod(_) | PollError::NotDialed(_) => true,
            _ => false,
        }
    }

    /// Bounded metric label.
    pub fn label(&self) -> &'static str {
        match self {
            PollError::Timeout(_) => "timeout",
            PollError::Connect(_) => "unreachable",
            PollError::Http(_)
            | PollError::Status(_)
            | PollError::Body(_)
            | PollError::Invalid(_)
            | PollError::OtherPod(_) => "invalid",
            PollError::NotDialed(_) => "not_dialed",
        }
    }
}

/// Reads the load report at `addr`, giving up after `timeout`.
pub async fn read_load(addr: SocketAddr, timeout: Duration) -> Result<LoadReport, PollError> {
    let request = || request(Method::GET, addr, LOAD_PATH, None, Full::default());
    tokio::time::timeout(timeout, async { parse(&exchange(addr, request()?).await?, &[StatusCode::OK]) })
        .await
        .map_err(|_| PollError::Timeout(timeout))?
}

/// Path of the drain endpoint on the gateway's admin port.
pub const DRAIN_PATH: &str = "/v1/admin/drain";

/// A drain's progress as the gateway reports it (docs/admin.md).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainProgress {
    pub draining: bool,
    pub finished: bool,
    pub connections_left: u64,
    #[serde(default)]
    pub moved: u64,
}

/// Starts a drain at `addr` (`POST /v1/admin/drain` with the admin
/// `token`), or reads the one that runs already: the gateway does not
/// restart a running drain's clock, so asking again is harmless.
pub async fn drain(
    addr: SocketAddr,
    token: &str,
    deadline_seconds: u32,
    max_reconnects_per_second: u32,
    timeout: Duration,
) -> Result<DrainProgress, PollError> {
    let body =
        serde_json::json!({"deadlineSeconds": deadline_seconds, "maxReconnectsPerSecond": max_reconnects_per_second});
    let body = Full::new(Bytes::from(body.to_string()));
    tokio::time::timeout(timeout, async {
        parse(
            &exchange(addr, request(Method::POST, addr, DRAIN_PATH, Some(token), body)?).await?,
            &[StatusCode::OK, StatusCode::ACCEPTED],
        )
    })
    .await
    .map_err(|_| PollError::Timeout(timeout))?
}

/// What a gateway answers to `DELETE /v1/admin/drain` with 200.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cancelled {
    /// A running drain was stopped (false: none ran, e.g. a retried request).
    pub cancelled: bool,
    /// Clients it had sent away.
    pub moved: u64,
    /// Clients still connected, who stay.
    pub connections_left: u64,
}

/// Cancels the drain at `addr` (`DELETE /v1/admin/drain` with the admin
/// `token`). A drain that finished, or a gateway shutting down, answers 409
/// ([`PollError::Status`]).
pub async fn cancel_drain(addr: SocketAddr, token: &str, timeout: Duration) -> Result<Cancelled, PollError> {
    tokio::time::timeout(timeout, async {
        let request = request(Method::DELETE, addr, DRAIN_PATH, Some(token), Full::default())?;
        parse(&exchange(addr, request).await?, &[StatusCode::OK])
    })
    .await
    .map_err(|_| PollError::Timeout(timeout))?
}

fn request(
    method: Method,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: Full<Bytes>,
) -> Result<Request<Full<Bytes>>, PollError> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, addr.to_string())
        .header(CONNECTION, "close")
        .header(CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    // The error never shows the token: it names what was wrong, not the value.
    builder.body(body).map_err(|e| PollError::Body(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(
    (status, body): &(StatusCode, Bytes),
    expected: &[StatusCode],
) -> Result<T, PollError> {
    if !expected.contains(status) {
        return Err(PollError::Status(*status));
    }
    Ok(serde_json::from_slice(body)?)
}

async fn exchange(addr: SocketAddr, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), PollError> {
    let stream = TcpStream::connect(addr).await.map_err(PollError::Connect)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection is driven here rather than spawned, so a timeout drops
    // it with everything else instead of leaving a task behind.
    let exchange = async move {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| PollError::Body(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    };
    let (result, _closed) = tokio::join!(exchange, connection);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-shot HTTP server on loopback answering with `response` (raw bytes).
    async fn serve_once(response: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = vec![0u8; 4096];
            let n = socket.read(&mut request).await.expect("read");
            assert!(String::from_utf8_lossy(&request[..n]).starts_with("GET /v1/admin/load HTTP/1.1\r\n"));
            // The client may hang up early (a body over the cap).
            let _ = socket.write_all(response).await;
            let _ = socket.shutdown().await;
        });
        addr
    }

    fn ok(body: &str) -> &'static [u8] {
        let text = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n{body}",
            body.len()
        );
        Box::leak(text.into_bytes().into_boxed_slice())
    }

    #[tokio::test]
    async fn reads_a_load_report() {
        let body = r#"{"pod":"chat-gateway-0","url":"ws://127.1.0.1:8080/v1/ws","connections":12,"capacity":100,
                       "ready":true,"draining":false,"version":"0.1.0","startedAt":"2025-01-01T00:00:00Z",
                       "backends":{"redis":"up","store":"up"}}"#;
        let addr = serve_once(ok(body)).await;
        let report = read_load(addr, Duration::from_secs(2)).await.expect("report");
        assert_eq!(report.pod, "chat-gateway-0");
        assert_eq!((report.connections, report.capacity, report.ready, report.draining), (12, 100, true, false));
        assert_eq!(report.url, "ws://127.1.0.1:8080/v1/ws");
        assert_eq!(
            report.backends,
            Some(Backends { redis: "up".into(), store: "up".into(), redis_shards: Vec::new() })
        );
    }

    #[tokio::test]
    async fn refuses_errors_and_garbage() {
        let addr = serve_once(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
        let err = read_load(addr, Duration::from_secs(2)).await.expect_err("503");
        assert!(matches!(err, PollError::Status(StatusCode::SERVICE_UNAVAILABLE)), "{err}");
        let addr = serve_once(ok("not json")).await;
        assert_eq!(read_load(addr, Duration::from_secs(2)).await.expect_err("garbage").label(), "invalid");
        let addr = serve_once(ok(r#"{"pod":"x"}"#)).await;
        assert_eq!(read_load(addr, Duration::from_secs(2)).await.expect_err("fields missing").label(), "invalid");
    }

    /// A one-shot server that hands the request's text to `check`, then answers `response`.
    async fn serve_checked(check: impl FnOnce(&str) + Send + 'static, response: String) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = vec![0u8; 4096];
            let n = socket.read(&mut request).await.expect("read");
            check(&String::from_utf8_lossy(&request[..n]));
            let _ = socket.write_all(response.as_bytes()).await;
        });
        addr
    }

    #[tokio::test]
    async fn starts_a_drain_and_reads_its_progress() {
        let body =
            r#"{"draining":true,"finished":false,"startedAtMs":1,"deadlineAtMs":2,"connectionsLeft":7,"moved":3}"#;
        let response = format!("HTTP/1.1 202 Accepted\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        let check = |text: &str| {
            assert!(text.starts_with("POST /v1/admin/drain HTTP/1.1\r\n"), "{text}");
            assert!(text.to_lowercase().contains("\r\nauthorization: bearer t0ken\r\n"), "{text}");
            assert!(text.ends_with(r#"{"deadlineSeconds":30,"maxReconnectsPerSecond":100}"#), "{text}");
        };
        let addr = serve_checked(check, response).await;
        let progress = drain(addr, "t0ken", 30, 100, Duration::from_secs(2)).await.expect("progress");
        assert_eq!(progress, DrainProgress { draining: true, finished: false, connections_left: 7, moved: 3 });
    }

    /// A one-shot server that checks the request line and token, then answers `response`.
    async fn serve_delete(response: String) -> SocketAddr {
        let check = |text: &str| {
            assert!(text.starts_with("DELETE /v1/admin/drain HTTP/1.1\r\n"), "{text}");
            assert!(text.to_lowercase().contains("\r\nauthorization: bearer t0ken\r\n"), "{text}");
        };
        serve_checked(check, response).await
    }

    #[tokio::test]
    async fn cancels_a_drain_and_reports_a_refusal() {
        let body = r#"{"cancelled":true,"moved":3,"connectionsLeft":40}"#;
        let ok = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        let addr = serve_delete(ok).await;
        let cancelled = cancel_drain(addr, "t0ken", Duration::from_secs(2)).await.expect("cancelled");
        assert_eq!(cancelled, Cancelled { cancelled: true, moved: 3, connections_left: 40 });
        let body = r#"{"error":"drain_finished","message":"…"}"#;
        let conflict = format!("HTTP/1.1 409 Conflict\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        let addr = serve_delete(conflict).await;
        let err = cancel_drain(addr, "t0ken", Duration::from_secs(2)).await.expect_err("finished");
        assert!(matches!(err, PollError::Status(StatusCode::CONFLICT)), "{err}");
    }

    #[tokio::test]
    async fn a_closed_port_fails_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let started = Instant::now();
        let err = read_load(addr, Duration::from_secs(5)).await.expect_err("nothing listens");
        assert_eq!(err.label(), "unreachable", "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_black_hole_costs_the_timeout_and_no_more() {
        // Accepts and never answers (the kernel completes the handshake from the backlog).
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let started = Instant::now();
        let err = read_load(addr, Duration::from_millis(300)).await.expect_err("no answer");
        let took = started.elapsed();
        assert!(matches!(err, PollError::Timeout(_)), "{err}");
        assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(800), "{took:?}");
        drop(listener);
    }

    #[tokio::test]
    async fn an_endless_body_is_cut_off() {
        let huge = format!("HTTP/1.1 200 OK\r\ncontent-length: 200000\r\n\r\n{}", "x".repeat(200_000));
        let addr = serve_once(Box::leak(huge.into_bytes().into_boxed_slice())).await;
        let err = read_load(addr, Duration::from_secs(2)).await.expect_err("too big");
        assert!(matches!(err, PollError::Body(_)), "{err}");
    }
}
