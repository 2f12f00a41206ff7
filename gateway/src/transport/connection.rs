//! One WebSocket connection: reads frames, hands them to the chat layer,
//! writes replies and live messages in batches. Everything it holds is
//! bounded: its outbox, the requests and fan-outs in flight, the rate of
//! frames, the time a write may take, the time the client may stay silent,
//! and the token's lifetime.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage, Utf8Bytes};

use super::Gateway;
use super::socket::WsSocket;
use crate::chat::hub::{Kick, Outbound, Outbox, OutboxLimits};
use crate::chat::{ChatService, FanOut, Handled, Session};
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
    /// Fan-outs of this connection's own sends (running and waiting) that
    /// may be behind before it stops reading further requests
    /// (backpressure to the sender): 4 means a fifth send waits.
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

/// A timer this late means the process did not run (see `State::timer`).
const PAUSE: Duration = Duration::from_millis(500);

/// Frames written per socket flush at most: amortizes the system call
/// without letting one busy outbox hold the connection's loop for long.
const WRITE_BATCH: usize = 64;

/// Token bucket: refuses frames beyond the sustained rate plus the burst
/// (both from [`ConnectionLimits`], not copied into every connection).
struct RateLimiter {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    fn new(burst: f64) -> Self {
        Self { tokens: burst, last: Instant::now() }
    }

    fn allow(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        // Refills up to the burst; a credit above it (see `credit`) is kept
        // until it is spent.
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(burst.max(self.tokens));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl RateLimiter {
    /// The server did not read for `not_read` (its own backpressure): the
    /// frames a client within the rate sent meanwhile arrive at once, and
    /// are not charged as a burst.
    fn credit(&mut self, not_read: Duration, rate: f64) {
        self.tokens += not_read.as_secs_f64() * rate;
    }
}

/// `typing` frames a connection may send per second, and in a burst: a
/// client repeats one every few seconds while its user types (protocol
/// docs), so more is a flood, refused with `rate_limited`.
const TYPING_PER_SECOND: f64 = 1.0;
const TYPING_BURST: f64 = 3.0;

/// The heartbeat as docs/protocol.md spells it: recognised without decoding.
const HEARTBEAT: &str = r#"{"type":"heartbeat"}"#;

/// The reason sent with each of our close codes.
fn close_reason(code: u16) -> &'static str {
    match code {
        close::IDLE => "no frame or heartbeat received in time",
        close::LOGGED_OUT => "logged out",
        close::TOKEN_EXPIRED => "token expired",
        close::SLOW_CONSUMER => "too slow to receive; reconnect and sync from your cursor",
        close::GOING_AWAY => "gateway shutting down; reconnect",
        close::TOO_BIG => "frame too large",
        _ => "",
    }
}

fn close_frame(code: u16) -> WsMessage {
    let reason = Utf8Bytes::from_static(close_reason(code));
    WsMessage::Close(Some(CloseFrame { code: CloseCode::from(code), reason }))
}

fn text_frame(frame: &ServerFrame) -> Outbound {
    protocol::encode(frame).into()
}

/// Polls the future in `slot` (a `select!` branch that is disabled while
/// the slot is empty).
fn poll_slot<T>(slot: &mut Slot<T>) -> impl Future<Output = T> + '_ {
    std::future::poll_fn(move |cx| match slot {
        Some(future) => future.as_mut().poll(cx),
        None => Poll::Pending,
    })
}

/// The socket is unusable (an error or a write that timed out).
struct Broken;

/// Writes `first` (a reply) and up to a batch of the frames queued in
/// `outbox`, flushing once. `Ok(Some(kick))` when the server closed the
/// connection meanwhile.
fn write<'a>(
    socket: &'a mut WsSocket,
    outbox: &'a Outbox,
    gateway: &'a Gateway,
    first: Option<Outbound>,
) -> impl Future<Output = Result<Option<Kick>, Broken>> + 'a {
    // One vector rather than `first` chained to it: what is awaited here is
    // part of every connection's task, and the chain is twice the size.
    let mut frames = Vec::from_iter(first);
    let kick = outbox.take(&mut frames, WRITE_BATCH);
    let count = frames.len();
    let mut sent = send(socket, frames.into_iter().map(WsMessage::Text), gateway, false);
    std::future::poll_fn(move |cx| {
        if count == 0 {
            return Poll::Ready(Ok(kick));
        }
        match Pin::new(&mut sent).poll(cx) {
            Poll::Ready(Some(Ok(()))) => {
                gateway.metrics.frames_out.inc_by(count as u64);
                Poll::Ready(Ok(kick))
            }
            Poll::Ready(_) => Poll::Ready(Err(Broken)),
            // Kicked while the socket is full: stop waiting for it (but a
            // drain's farewell is written: that client is not stalled).
            Poll::Pending if kick.is_none() => match outbox.poll_kicked(cx) {
                Poll::Ready(Kick::Reconnect) | Poll::Pending => Poll::Pending,
                Poll::Ready(kick) => Poll::Ready(Ok(Some(kick))),
            },
            Poll::Pending => Poll::Pending,
        }
    })
}

/// Sends a close frame with `code`, giving it a short time to go out: a
/// client that stopped reading would otherwise hold the socket open.
fn close<'a>(socket: &'a mut WsSocket, gateway: &'a Gateway, code: u16) -> impl Future<Output = ()> + 'a {
    let mut sent = send(socket, std::iter::once_with(move || close_frame(code)), gateway, true);
    std::future::poll_fn(move |cx| {
        Pin::new(&mut sent).poll(cx).map(|sent| {
            if !matches!(sent, Some(Ok(()))) {
                tracing::debug!(code, "close frame not delivered; dropping the socket");
            }
        })
    })
}

/// Sends `messages`, giving up after the write timeout (or the close
/// timeout for a close frame): `None` then. The timer is only made when the
/// socket is full (and counts from then): most writes finish at once, and
/// an idle connection does not carry one. Poll functions rather than
/// `async fn`s (which hold their arguments twice), taking what they can
/// from `gateway` rather than holding it: the largest future a connection
/// awaits sets the size of every connection's task.
fn send<'a>(
    socket: &'a mut WsSocket,
    mut messages: impl Iterator<Item = WsMessage> + Unpin + 'a,
    gateway: &'a Gateway,
    closing: bool,
) -> impl Future<Output = Option<Result<(), WsError>>> + Unpin + 'a {
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(result) = socket.poll_send_all(cx, &mut messages, &gateway.websocket) {
            return Poll::Ready(Some(result));
        }
        let limits = &gateway.limits;
        let limit = if closing { limits.close_timeout } else { limits.write_timeout };
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        timer.as_mut().poll(cx).map(|()| None)
    })
}

/// What woke the connection's loop. Handed by value to the [`State`]
/// method that deals with it, so nothing it holds (a reply, an error, a
/// request's text) lives on while the connection waits.
#[allow(clippy::large_enum_variant, reason = "short-lived, never held across an await")]
enum Event {
    Outbox,
    Handled(Handled),
    FannedOut,
    Incoming(Option<Result<WsMessage, WsError>>),
    Timer,
}

/// What the loop does about an event.
enum Step {
    /// Write this (if anything) and what the outbox holds.
    Write(Option<Outbound>),
    Continue,
    /// Send a close frame with this code, then stop.
    Close(u16),
    /// Stop without a close frame (the client closed, or the socket failed).
    Stop,
}

/// A future the connection loop polls beside its socket, when one is running.
type Slot<T> = Option<Pin<Box<dyn Future<Output = T> + Send>>>;

/// What a connection keeps between events, besides its socket and timer.
struct State {
    session: Arc<Session>,
    limiter: RateLimiter,
    /// `typing` frames, on top of `limiter` (a relay reaches every member);
    /// boxed on first use: most connections never send one (8 bytes, not 24).
    typing: Option<Box<RateLimiter>>,
    /// When the client last sent a frame: any frame counts as a heartbeat.
    last_heard: Instant,
    /// The request being handled, the fan-out running and those waiting.
    pending: Slot<Handled>,
    fanning: Slot<()>,
    /// With the one running, at most `max_pending_fan_outs` (see
    /// [`State::busy`]): a vector is queue enough (and smaller).
    queued: Vec<FanOut>,
    /// A request read while the connection was busy, and since when: the
    /// socket is not read further until it starts (backpressure), but
    /// heartbeats before it were read and counted.
    held: Option<(Utf8Bytes, Instant)>,
}

impl State {
    /// Starts the next fan-out owed, if none is running.
    fn start_fan_out(&mut self, chat: &Arc<ChatService>) {
        if self.fanning.is_none() && !self.queued.is_empty() {
            let job = self.queued.remove(0);
            let (chat, session) = (Arc::clone(chat), Arc::clone(&self.session));
            self.fanning = Some(Box::pin(async move { chat.fan_out(&session, job).await }));
        }
    }

    fn handled(&mut self, Handled { reply, fan_out }: Handled) -> Step {
        self.pending = None;
        self.queued.extend(fan_out);
        Step::Write(reply.map(|reply| text_frame(&reply)))
    }

    /// Busy: a request now would wait for the one in flight, or add to the
    /// fan-outs already behind.
    fn busy(&self, limits: &ConnectionLimits) -> bool {
        let behind = self.queued.len() + usize::from(self.fanning.is_some());
        self.pending.is_some() || behind >= limits.max_pending_fan_outs
    }

    /// Reading goes on while busy (heartbeats count), up to one held request.
    fn reading(&self) -> bool {
        self.held.is_none()
    }

    /// Starts the held request once the connection is no longer busy; the
    /// time the socket was not read is credited to the rate limiter.
    fn start_held(&mut self, gateway: &Gateway) -> Step {
        if self.busy(&gateway.limits) {
            return Step::Continue;
        }
        let Some((text, since)) = self.held.take() else { return Step::Continue };
        let now = Instant::now();
        self.limiter.credit(now.duration_since(since), gateway.limits.frames_per_second);
        self.request(text, &gateway.chat)
    }

    /// Decodes and starts one request frame (already charged to the limiter).
    fn request(&mut self, text: Utf8Bytes, chat: &Arc<ChatService>) -> Step {
        let reply = match protocol::decode(text.as_str(), &chat.config().limits) {
            Ok(ClientFrame::Heartbeat { .. }) => None,
            Ok(ClientFrame::Typing { req, .. })
                if !self.typing.get_or_insert_with(|| Box::new(RateLimiter::new(TYPING_BURST))).allow(
                    Instant::now(),
                    TYPING_PER_SECOND,
                    TYPING_BURST,
                ) =>
            {
                let refused =
                    ProtocolError::new(ErrorCode::RateLimited, "too many typing frames; send one every few seconds");
                Some(ServerFrame::from(refused.with_req(req)))
            }
            Ok(frame) => {
                let (chat, session) = (Arc::clone(chat), Arc::clone(&self.session));
                self.pending = Some(Box::pin(async move { chat.handle(&session, frame).await }));
                None
            }
            Err(e) => Some(ServerFrame::from(e)),
        };
        Step::Write(reply.map(|reply| text_frame(&reply)))
    }

    fn incoming(
        &mut self,
        incoming: Option<Result<WsMessage, WsError>>,
        timer: Pin<&mut Sleep>,
        expires_at: Instant,
        gateway: &Gateway,
    ) -> Step {
        let now = Instant::now();
        self.last_heard = now;
        let (chat, limits) = (&gateway.chat, &gateway.limits);
        // Frames move the deadline, but the timer only once it lags by half
        // the idle timeout: a client that heartbeats neither resets it on
        // every frame nor is woken by it.
        let wanted = deadline(expires_at, now, limits);
        if wanted.saturating_duration_since(timer.deadline()) >= limits.idle_timeout / 2 {
            timer.reset(wanted);
        }
        match incoming {
            Some(Ok(WsMessage::Text(text))) => {
                gateway.metrics.frames_in.inc();
                if !self.limiter.allow(now, limits.frames_per_second, limits.burst) {
                    // Not decoded, but the refusal still names the request.
                    let refused = ProtocolError::new(ErrorCode::RateLimited, "too many frames; slow down");
                    let reply = ServerFrame::from(refused.with_req(protocol::request_id_of(text.as_str())));
                    Step::Write(Some(text_frame(&reply)))
                } else if text.as_str() == HEARTBEAT {
                    // Heartbeats only refresh `last_heard`, busy or not.
                    Step::Continue
                } else if self.busy(limits) {
                    self.held = Some((text, now));
                    Step::Continue
                } else {
                    self.request(text, chat)
                }
            }
            Some(Ok(WsMessage::Binary(_))) => {
                gateway.metrics.frames_in.inc();
                let error = ProtocolError::new(ErrorCode::BadFrame, "binary frames are not supported; send JSON text");
                Step::Write(Some(text_frame(&error.into())))
            }
            // Pings are answered by the WebSocket layer itself.
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => Step::Continue,
            Some(Ok(WsMessage::Close(_))) | None => Step::Stop,
            Some(Err(e)) => {
                tracing::debug!(user = %self.session.user, error = %e, "connection read failed");
                match e {
                    WsError::Capacity(_) => Step::Close(close::TOO_BIG),
                    _ => Step::Stop,
                }
            }
        }
    }

    /// The timer fired: the token expired, the client was silent too long,
    /// or neither yet (frames came since it was set): set it again.
    fn timer(&mut self, timer: Pin<&mut Sleep>, expires_at: Instant, limits: &ConnectionLimits) -> Step {
        let now = Instant::now();
        // Fired well after its deadline: this process did not run meanwhile
        // (a pause, an overloaded node). That time is not the client's
        // silence: what it sent then is still in the socket, unread.
        let late = now.saturating_duration_since(timer.deadline());
        if late > PAUSE && now < expires_at {
            self.last_heard += late;
            timer.reset(deadline(expires_at, self.last_heard, limits));
            return Step::Continue;
        }
        if now >= expires_at {
            Step::Close(close::TOKEN_EXPIRED)
        } else if self.held.is_some() {
            // The server stopped reading (a request waits behind a busy
            // connection): the silence is its own, not the client's.
            timer.reset(deadline(expires_at, now, limits));
            Step::Continue
        } else if now >= self.last_heard + limits.idle_timeout {
            tracing::debug!(user = %self.session.user, silent = ?now.duration_since(self.last_heard), "closing an idle connection");
            Step::Close(close::IDLE)
        } else {
            timer.reset(deadline(expires_at, self.last_heard, limits));
            Step::Continue
        }
    }
}

/// The earlier of the token's expiry and the end of the idle timeout.
fn deadline(expires_at: Instant, last_heard: Instant, limits: &ConnectionLimits) -> Instant {
    expires_at.min(last_heard + limits.idle_timeout)
}

/// The value in `boxed`, its allocation freed now (moving out of a box in
/// place would free it only when the box goes out of scope).
#[allow(clippy::boxed_local, reason = "taking the box is the point: it is freed on return")]
fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

/// A connection whose upgrade was accepted: what its task starts from.
pub struct Accepted {
    pub gateway: Arc<Gateway>,
    /// Its slot of `maxConnections`, held until it closes.
    pub permit: OwnedSemaphorePermit,
    pub upgrade: OnUpgrade,
    pub user: String,
    pub device: String,
    /// When the token expires.
    pub expires_at: Instant,
}

/// Serves one upgraded connection until either side closes it. One
/// request is handled at a time (frames are not read meanwhile, which slows
/// a client that sends faster than its requests are served), while the
/// outbox keeps being written and this connection's fan-outs run in order
/// beside it.
///
/// What this future holds is part of every connection's cost
/// (docs/benchmarks.md, "Memory per idle connection"). So: it starts from
/// one box (what an async block captures stays in it for good); what is
/// needed only now and then (a request, a fan-out, a write's timer,
/// registering the session) is boxed while it exists; nothing big is held
/// across an await, and what is awaited is small (poll functions, not
/// `async fn`s); the gateway's shutdown reaches it through its outbox;
/// and its one timer, for both the idle timeout and the token's expiry, is
/// kept across rounds instead of being registered again after every frame.
#[allow(clippy::manual_async_fn, reason = "an async fn would hold its argument twice")]
pub fn serve(mut accepted: Box<Accepted>) -> impl Future<Output = ()> + Send {
    async move {
        // Everything stays in the box until the upgrade is done: what is
        // held across more than one await is kept for the whole connection.
        let upgraded = match (&mut accepted.upgrade).await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        // The TCP stream itself, not hyper's boxed wrapper of it: one
        // allocation and one indirection less per connection.
        let mut socket = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => WsSocket::new(parts.io.into_inner(), &parts.read_buf),
            Err(_) => {
                tracing::error!("upgraded connection is not a TCP stream");
                return;
            }
        };
        let registration =
            accepted.gateway.chat.hub().register(&accepted.user, &accepted.device, accepted.gateway.limits.outbox);
        if accepted.gateway.shutdown.is_cancelled() {
            // Registered after the shutdown kicked everyone.
            registration.outbox.kick(Kick::GoingAway);
        }
        // Before `hello`: a client syncs after it, so nothing sent meanwhile is missed.
        let opened =
            accepted.gateway.chat.session_opened(&registration.user, &registration.device, Duration::from_secs(2));
        Box::pin(opened).await;
        // Only now out of the box, with no await before the names go into the
        // session: they are then no part of what the connection holds. (The
        // box is freed here, not when the task ends.)
        let Accepted { gateway, permit, user, device, expires_at, .. } = unbox(accepted);
        let session = Arc::new(Session { user, device, connection: registration.connection });
        gateway.metrics.connections.inc();
        let mut state = State {
            session,
            limiter: RateLimiter::new(gateway.limits.burst),
            typing: None,
            last_heard: Instant::now(),
            pending: None,
            fanning: None,
            queued: Vec::new(),
            held: None,
        };
        let config = gateway.chat.config();
        let hello = text_frame(&ServerFrame::Hello {
            protocol: PROTOCOL_VERSION,
            user: state.session.user.clone(),
            device: state.session.device.clone(),
            heartbeat_seconds: config.heartbeat_seconds,
            max_message_chars: config.limits.max_message_chars,
            server_time_ms: crate::ids::now_ms(),
        });

        let mut outcome = write(&mut socket, &registration.outbox, &gateway, Some(hello)).await;
        let mut closing = None;
        // Set for the deadline as of when it was set; frames move it only now
        // and then (see `State::incoming`): when it fires early, it is set
        // again from the latest frame.
        let timer = sleep_until(deadline(expires_at, state.last_heard, &gateway.limits));
        tokio::pin!(timer);
        while let Ok(None) = outcome {
            state.start_fan_out(&gateway.chat);
            // A request held while the connection was busy starts as soon as it is not.
            if let Step::Write(Some(refusal)) = state.start_held(&gateway) {
                outcome = write(&mut socket, &registration.outbox, &gateway, Some(refusal)).await;
                continue;
            }
            let reading = state.reading();
            // Event and step are consumed in this block: nothing they hold is
            // kept while writing (the one close frame is sent after the loop).
            let first = {
                // Biased: what the socket holds is read before the timer is
                // judged, so frames that arrived while this process did not
                // run (a pause) still count as heard.
                let event = tokio::select! {
                    biased;
                    handled = poll_slot(&mut state.pending), if state.pending.is_some() => Event::Handled(handled),
                    () = poll_slot(&mut state.fanning), if state.fanning.is_some() => Event::FannedOut,
                    () = std::future::poll_fn(|cx| registration.outbox.poll_ready(cx)) => Event::Outbox,
                    incoming = socket.next(&gateway.websocket), if reading => Event::Incoming(incoming),
                    () = &mut timer => Event::Timer,
                };
                let step = match event {
                    Event::Outbox => Step::Write(None),
                    Event::Handled(handled) => state.handled(handled),
                    Event::FannedOut => {
                        state.fanning = None;
                        Step::Continue
                    }
                    Event::Incoming(incoming) => state.incoming(incoming, timer.as_mut(), expires_at, &gateway),
                    Event::Timer => state.timer(timer.as_mut(), expires_at, &gateway.limits),
                };
                match step {
                    Step::Write(first) => first,
                    Step::Continue => continue,
                    Step::Close(code) => {
                        closing = Some(code);
                        break;
                    }
                    Step::Stop => break,
                }
            };
            outcome = write(&mut socket, &registration.outbox, &gateway, first).await;
        }
        if matches!(outcome, Ok(Some(Kick::Reconnect)))
            && let Some(pending) = state.pending.take()
        {
            // Sent away by a drain with a request in flight: its reply goes
            // out before the close, so the client knows whether to retry.
            let deadline = gateway.chat.config().write_deadline + Duration::from_secs(1);
            if let Ok(handled) = tokio::time::timeout(deadline, pending).await {
                state.queued.extend(handled.fan_out);
                if let Some(reply) = handled.reply {
                    let reply = std::iter::once(WsMessage::Text(text_frame(&reply)));
                    let _ = send(&mut socket, reply, &gateway, false).await;
                }
            }
        }
        let closing = closing.or(match outcome {
            Ok(Some(Kick::LoggedOut)) => Some(close::LOGGED_OUT),
            Ok(Some(Kick::GoingAway | Kick::Reconnect)) => Some(close::GOING_AWAY),
            Ok(Some(Kick::SlowConsumer)) => {
                let session = &state.session;
                tracing::info!(user = %session.user, device = %session.device, "closing a connection that stopped reading");
                // Counted here, once per connection (not per message it missed).
                gateway.metrics.slow_consumers.inc();
                Some(close::SLOW_CONSUMER)
            }
            Ok(None) | Err(Broken) => None,
        });
        if let Some(code) = closing {
            close(&mut socket, &gateway, code).await;
        }

        gateway.metrics.connections.dec();
        let logged_out = registration.outbox.kick_reason() == Some(Kick::LoggedOut);
        let (user, device) = (Arc::clone(&registration.user), Arc::clone(&registration.device));
        drop(registration);
        gateway.chat.session_closed(&user, &device, state.last_heard.into_std(), logged_out);
        // A send being stored and fan-outs still owed are finished even though
        // the sender left: its messages are acked (or about to be) and the
        // other members must get them live.
        // A request held unread behind a busy connection was never started:
        // no reply promised it anything, the client retries it.
        let State { session, pending, fanning, queued, .. } = state;
        if pending.is_some() || fanning.is_some() || !queued.is_empty() {
            let chat = Arc::clone(&gateway.chat);
            gateway.tasks.spawn(async move {
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
        drop(permit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rate_limiter_allows_the_burst_then_the_rate() {
        let mut limiter = RateLimiter::new(5.0);
        assert_eq!((0..10).filter(|_| limiter.allow(Instant::now(), 10.0, 5.0)).count(), 5);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!((0..10).filter(|_| limiter.allow(Instant::now(), 10.0, 5.0)).count(), 5);
    }
}
