//! One WebSocket connection: reads frames, hands them to the chat layer,
//! writes replies and live messages in batches. Everything it holds is
//! bounded: its outbox, the requests and fan-outs in flight, the rate of
//! frames, the time a write may take, the time the client may stay silent,
//! and the token's lifetime.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chat::hub::{Kick, Outbox, OutboxLimits};
use crate::chat::{ChatService, FanOut, Handled, Session};
use crate::metrics::Metrics;
use crate::protocol::{self, ClientFrame, ErrorCode, PROTOCOL_VERSION, ProtocolError, ServerFrame};

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
    /// Live frames queued for the connection: past `soft` its senders are
    /// slowed down, at `hard` it counts as not reading.
    pub outbox: OutboxLimits,
    /// Fan-outs of this connection's own sends that may be behind before it
    /// stops reading further frames (backpressure to the sender).
    pub max_pending_fan_outs: usize,
    /// Sustained frames per second a client may send, and the burst above it.
    pub frames_per_second: f64,
    pub burst: f64,
    /// Close the connection when the client sent nothing for this long.
    pub idle_timeout: Duration,
    /// A write to the socket (one batch of frames) may take this long.
    pub write_timeout: Duration,
    /// A close frame gets this long to go out before the socket is dropped.
    pub close_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            outbox: OutboxLimits::default(),
            max_pending_fan_outs: 4,
            frames_per_second: 50.0,
            burst: 100.0,
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(1),
        }
    }
}

/// Frames written per socket flush at most: amortizes the system call
/// without letting one busy outbox hold the connection's loop for long.
const WRITE_BATCH: usize = 64;

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
    /// Where fan-outs still owed when the client leaves are finished.
    pub tasks: TaskTracker,
}

fn close_frame(code: u16, reason: &'static str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame { code: CloseCode::from(code), reason: Utf8Bytes::from_static(reason) }))
}

fn text_frame(frame: &ServerFrame) -> WsMessage {
    WsMessage::Text(protocol::encode(frame).into())
}

/// Polls the future in `slot`; never resolves while the slot is empty (the
/// `select!` branch using it is disabled then anyway).
async fn poll_slot<F: Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// The socket write side: the reply of a request, then whatever the outbox
/// holds, fed as one batch and flushed once.
struct Writer<'a, S> {
    socket: &'a mut WebSocketStream<S>,
    outbox: &'a Outbox,
    metrics: &'a Metrics,
    limits: &'a ConnectionLimits,
}

/// The socket is unusable (an error or a write that timed out).
struct Broken;

impl<S: AsyncRead + AsyncWrite + Unpin> Writer<'_, S> {
    /// Writes `first` and up to a batch of queued frames. `Ok(Some(kick))`
    /// when the server closed the connection meanwhile.
    async fn write(&mut self, first: Option<WsMessage>) -> Result<Option<Kick>, Broken> {
        let mut frames = Vec::new();
        let kick = self.outbox.take(&mut frames, WRITE_BATCH);
        let count = frames.len() + usize::from(first.is_some());
        if count == 0 {
            return Ok(kick);
        }
        let socket = &mut *self.socket;
        let written = async move {
            if let Some(first) = first {
                socket.feed(first).await?;
            }
            for frame in frames {
                socket.feed(WsMessage::Text(frame)).await?;
            }
            socket.flush().await
        };
        match tokio::time::timeout(self.limits.write_timeout, written).await {
            Ok(Ok(())) => {
                self.metrics.frames_out.inc_by(count as u64);
                Ok(kick)
            }
            _ => Err(Broken),
        }
    }

    /// Sends a close frame, giving it a short time to go out: a client that
    /// stopped reading would otherwise hold the socket open.
    async fn close(&mut self, code: u16, reason: &'static str) {
        let sent = tokio::time::timeout(self.limits.close_timeout, self.socket.send(close_frame(code, reason))).await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::debug!(code, reason, "close frame not delivered; dropping the socket");
        }
    }
}

/// What woke the connection's loop. Taken apart before any await, so its
/// size does not add to the connection's resting state.
#[allow(clippy::large_enum_variant, reason = "short-lived, never held across an await")]
enum Event {
    Shutdown,
    Outbox,
    Handled(Handled),
    FannedOut,
    Incoming(Option<Result<WsMessage, WsError>>),
    TokenExpired,
    Idle,
}

type Pending<T> = Option<Pin<Box<dyn Future<Output = T> + Send>>>;

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Serves the connection until either side closes it. One request is
    /// handled at a time (frames are not read meanwhile, which slows a
    /// client that sends faster than its requests are served), while the
    /// outbox keeps being written and this connection's fan-outs run in
    /// order beside it.
    pub async fn run(self) {
        let Connection { mut socket, chat, metrics, user, device, expires_at, limits, shutdown, tasks } = self;
        let registration = chat.hub().register(&user, &device, limits.outbox);
        // Before `hello`: a client syncs after it, so nothing sent meanwhile is missed.
        chat.session_opened(&user, &device, Duration::from_secs(2)).await;
        metrics.connections.inc();
        let outbox = Arc::clone(&registration.outbox);
        let session = Arc::new(Session { user, device, connection: registration.connection });
        let mut limiter = RateLimiter::new(limits.frames_per_second, limits.burst);
        let protocol_limits = chat.config().limits;
        let hello = ServerFrame::Hello {
            protocol: PROTOCOL_VERSION,
            user: session.user.clone(),
            device: session.device.clone(),
            heartbeat_seconds: chat.config().heartbeat_seconds,
            max_message_chars: protocol_limits.max_message_chars,
            server_time_ms: crate::ids::now_ms(),
        };
        // Any frame counts as a heartbeat; presence only needs the latest.
        let mut last_heard = Instant::now();
        // The request being handled, the fan-out running and those waiting.
        let mut pending: Pending<Handled> = None;
        let mut fanning: Pending<()> = None;
        let mut queued: VecDeque<FanOut> = VecDeque::new();

        let mut writer = Writer { socket: &mut socket, outbox: &outbox, metrics: &metrics, limits: &limits };
        let mut outcome = writer.write(Some(text_frame(&hello))).await;
        while let Ok(None) = outcome {
            if fanning.is_none()
                && let Some(job) = queued.pop_front()
            {
                let (chat, session) = (Arc::clone(&chat), Arc::clone(&session));
                fanning = Some(Box::pin(async move { chat.fan_out(&session, job).await }));
            }
            let reading = pending.is_none() && queued.len() < limits.max_pending_fan_outs;
            let event = tokio::select! {
                () = shutdown.cancelled() => Event::Shutdown,
                () = outbox.ready() => Event::Outbox,
                handled = poll_slot(&mut pending), if pending.is_some() => Event::Handled(handled),
                () = poll_slot(&mut fanning), if fanning.is_some() => Event::FannedOut,
                incoming = writer.socket.next(), if reading => Event::Incoming(incoming),
                () = sleep_until(expires_at) => Event::TokenExpired,
                () = sleep_until(last_heard + limits.idle_timeout) => Event::Idle,
            };
            outcome = match event {
                Event::Outbox => writer.write(None).await,
                Event::Handled(Handled { reply, fan_out }) => {
                    pending = None;
                    queued.extend(fan_out);
                    let reply = reply.as_ref().map(text_frame);
                    writer.write(reply).await
                }
                Event::FannedOut => {
                    fanning = None;
                    Ok(None)
                }
                Event::Incoming(incoming) => {
                    last_heard = Instant::now();
                    match incoming {
                        Some(Ok(WsMessage::Text(text))) => {
                            metrics.frames_in.inc();
                            let reply = if !limiter.allow() {
                                Some(ProtocolError::new(ErrorCode::RateLimited, "too many frames; slow down").into())
                            } else {
                                match protocol::decode(text.as_str(), &protocol_limits) {
                                    // Heartbeats only refresh `last_heard`.
                                    Ok(ClientFrame::Heartbeat { .. }) => None,
                                    Ok(frame) => {
                                        let (chat, session) = (Arc::clone(&chat), Arc::clone(&session));
                                        pending = Some(Box::pin(async move { chat.handle(&session, frame).await }));
                                        None
                                    }
                                    Err(e) => Some(ServerFrame::from(e)),
                                }
                            };
                            let reply = reply.as_ref().map(text_frame);
                            writer.write(reply).await
                        }
                        Some(Ok(WsMessage::Binary(_))) => {
                            metrics.frames_in.inc();
                            let error = ProtocolError::new(
                                ErrorCode::BadFrame,
                                "binary frames are not supported; send JSON text",
                            );
                            writer.write(Some(text_frame(&error.into()))).await
                        }
                        // Pings are answered by the WebSocket layer itself.
                        Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => Ok(None),
                        Some(Ok(WsMessage::Close(_))) | None => break,
                        Some(Err(e)) => {
                            if let WsError::Capacity(_) = e {
                                writer.close(close::TOO_BIG, "frame too large").await;
                            }
                            tracing::debug!(user = %session.user, error = %e, "connection read failed");
                            break;
                        }
                    }
                }
                Event::TokenExpired => {
                    writer.close(close::TOKEN_EXPIRED, "token expired").await;
                    break;
                }
                Event::Idle => {
                    writer.close(close::IDLE, "no frame or heartbeat received in time").await;
                    break;
                }
                Event::Shutdown => {
                    writer.close(close::GOING_AWAY, "gateway shutting down; reconnect").await;
                    break;
                }
            };
        }
        match outcome {
            Ok(Some(Kick::LoggedOut)) => writer.close(close::LOGGED_OUT, "logged out").await,
            Ok(Some(Kick::SlowConsumer)) => {
                tracing::info!(user = %session.user, device = %session.device, "closing a connection that stopped reading");
                writer.close(close::SLOW_CONSUMER, "too slow to receive; reconnect and sync from your cursor").await;
            }
            Ok(None) | Err(Broken) => {}
        }

        metrics.connections.dec();
        let logged_out = outbox.kick_reason() == Some(Kick::LoggedOut);
        drop(registration);
        chat.session_closed(&session.user, &session.device, last_heard.into_std(), logged_out);
        // A send being stored and fan-outs still owed are finished even though
        // the sender left: its messages are acked (or about to be) and the
        // other members must get them live.
        if pending.is_some() || fanning.is_some() || !queued.is_empty() {
            tasks.spawn(async move {
                if let Some(fanning) = fanning {
                    fanning.await;
                }
                for job in queued {
                    chat.fan_out(&session, job).await;
                }
                if let Some(pending) = pending
                    && let Some(job) = pending.await.fan_out
                {
                    chat.fan_out(&session, job).await;
                }
            });
        }
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
