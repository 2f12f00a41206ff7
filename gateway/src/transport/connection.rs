//! One WebSocket connection: reads frames, hands them to the chat layer,
//! writes replies and live messages. Everything it holds is bounded: the
//! outbound queue, the rate of frames, the time a write may take, the
//! time the client may stay silent, and the token's lifetime.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

use crate::chat::hub::Kick;
use crate::chat::{ChatService, Session};
use crate::metrics::Metrics;
use crate::protocol::{self, ErrorCode, PROTOCOL_VERSION, ProtocolError, ServerFrame};

/// Close codes (4000–4999 are ours). Documented in docs/protocol.md.
pub mod close {
    /// Silent for too long: reconnect.
    pub const IDLE: u16 = 4000;
    /// Logged out: do not reconnect with this token.
    pub const LOGGED_OUT: u16 = 4001;
    /// The token expired: get a new one, then reconnect.
    pub const TOKEN_EXPIRED: u16 = 4003;
    /// Could not keep up with live messages: reconnect and sync from your cursor.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Server going away (shutdown or drain): reconnect to another gateway.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame larger than the server accepts.
    pub const TOO_BIG: u16 = 1009;
}

/// Limits of one connection.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Live frames queued for a connection before it counts as too slow.
    pub outbound_queue: usize,
    /// Sustained frames per second a client may send, and the burst above it.
    pub frames_per_second: f64,
    pub burst: f64,
    /// Close the connection when the client sent nothing for this long.
    pub idle_timeout: Duration,
    /// A single write to the socket may take this long.
    pub write_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            outbound_queue: 256,
            frames_per_second: 50.0,
            burst: 100.0,
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// Token bucket: refuses frames beyond the sustained rate plus the burst.
struct RateLimiter {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl RateLimiter {
    fn new(rate: f64, burst: f64) -> Self {
        Self { tokens: burst, last: Instant::now(), rate, burst }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct Connection<S> {
    pub socket: WebSocketStream<S>,
    pub chat: Arc<ChatService>,
    pub metrics: Metrics,
    pub user: String,
    pub device: String,
    /// When the token expires.
    pub expires_at: Instant,
    pub limits: ConnectionLimits,
    pub shutdown: CancellationToken,
}

/// Sends one frame within `timeout`; false when the connection is unusable.
async fn send_frame<T>(sink: &mut T, message: WsMessage, timeout: Duration, metrics: &Metrics) -> bool
where
    T: futures::Sink<WsMessage> + Unpin,
{
    let ok = matches!(tokio::time::timeout(timeout, sink.send(message)).await, Ok(Ok(())));
    if ok {
        metrics.frames_out.inc();
    }
    ok
}

fn close_frame(code: u16, reason: &str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.to_string().into() }))
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub async fn run(self) {
        let Connection { socket, chat, metrics, user, device, expires_at, limits, shutdown } = self;
        let (tx, mut outbound) = mpsc::channel(limits.outbound_queue);
        let registration = chat.hub().register(&user, &device, tx);
        // Before `hello`: a client syncs after it, so nothing sent meanwhile is missed.
        chat.session_opened(&user, &device, Duration::from_secs(2)).await;
        metrics.connections.inc();
        let session = Session { user, device, connection: registration.connection };
        let (mut sink, mut stream) = socket.split();
        let mut limiter = RateLimiter::new(limits.frames_per_second, limits.burst);
        let protocol_limits = chat.config().limits;

        let timeout = limits.write_timeout;
        let metrics_out = metrics.clone();
        let hello = ServerFrame::Hello {
            protocol: PROTOCOL_VERSION,
            user: session.user.clone(),
            device: session.device.clone(),
            heartbeat_seconds: chat.config().heartbeat_seconds,
            max_message_chars: protocol_limits.max_message_chars,
            server_time_ms: crate::ids::now_ms(),
        };
        let mut open =
            send_frame(&mut sink, WsMessage::Text(protocol::encode(&hello).into()), timeout, &metrics_out).await;
        // Any frame counts as a heartbeat; presence only needs the latest.
        let mut last_heard = Instant::now();

        while open {
            let reply: Option<WsMessage> = tokio::select! {
                incoming = stream.next() => {
                    last_heard = Instant::now();
                    match incoming {
                        Some(Ok(WsMessage::Text(text))) => {
                            metrics.frames_in.inc();
                            let frame = if limiter.allow() {
                                match protocol::decode(text.as_str(), &protocol_limits) {
                                    Ok(frame) => chat.handle(&session, frame).await,
                                    Err(e) => Some(e.into()),
                                }
                            } else {
                                Some(ProtocolError::new(ErrorCode::RateLimited, "too many frames; slow down").into())
                            };
                            frame.map(|f| WsMessage::Text(protocol::encode(&f).into()))
                        }
                        Some(Ok(WsMessage::Binary(_))) => {
                            metrics.frames_in.inc();
                            let error = ProtocolError::new(ErrorCode::BadFrame, "binary frames are not supported; send JSON text");
                            Some(WsMessage::Text(protocol::encode(&error.into()).into()))
                        }
                        // Pings are answered by the WebSocket layer itself.
                        Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => None,
                        Some(Ok(WsMessage::Close(_))) | None => break,
                        Some(Err(e)) => {
                            use tokio_tungstenite::tungstenite::Error;
                            if let Error::Capacity(_) = e {
                                let _ = send_frame(&mut sink, close_frame(close::TOO_BIG, "frame too large"), timeout, &metrics_out).await;
                            }
                            tracing::debug!(user = %session.user, error = %e, "connection read failed");
                            break;
                        }
                    }
                }
                Some(frame) = outbound.recv() => Some(WsMessage::Text(frame)),
                () = registration.kicked.cancelled() => {
                    let close = match registration.kick_reason() {
                        Some(Kick::LoggedOut) => close_frame(close::LOGGED_OUT, "logged out"),
                        _ => close_frame(close::SLOW_CONSUMER, "too slow to receive; reconnect and sync from your cursor"),
                    };
                    let _ = send_frame(&mut sink, close, timeout, &metrics_out).await;
                    break;
                }
                () = sleep_until(expires_at) => {
                    let _ = send_frame(&mut sink, close_frame(close::TOKEN_EXPIRED, "token expired"), timeout, &metrics_out).await;
                    break;
                }
                () = sleep_until(last_heard + limits.idle_timeout) => {
                    let _ = send_frame(&mut sink, close_frame(close::IDLE, "no frame or heartbeat received in time"), timeout, &metrics_out).await;
                    break;
                }
                () = shutdown.cancelled() => {
                    let _ = send_frame(&mut sink, close_frame(close::GOING_AWAY, "gateway shutting down; reconnect"), timeout, &metrics_out).await;
                    break;
                }
            };
            if let Some(message) = reply {
                open = send_frame(&mut sink, message, timeout, &metrics_out).await;
            }
        }
        metrics.connections.dec();
        let logged_out = registration.kick_reason() == Some(Kick::LoggedOut);
        drop(registration);
        chat.session_closed(&session.user, &session.device, last_heard.into_std(), logged_out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rate_limiter_allows_the_burst_then_the_rate() {
        let mut limiter = RateLimiter::new(10.0, 5.0);
        assert_eq!((0..10).filter(|_| limiter.allow()).count(), 5);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!((0..10).filter(|_| limiter.allow()).count(), 5);
    }
}
