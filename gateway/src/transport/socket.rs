//! The server side of one WebSocket, shaped for connections that are idle
//! most of their life.
//!
//! tungstenite does the protocol (framing, masking, fragments, control
//! frames, limits, the close handshake), but its state — a
//! [`WebSocketContext`] with its read and write buffers — exists only while
//! a message is moving. Between messages, with nothing buffered either way,
//! it is dropped, and built again when the socket has bytes or the server
//! writes. An idle connection thus holds no buffer at all, and one that once
//! read or wrote a large message does not keep a buffer of that size
//! forever (tungstenite's buffers never shrink).
//!
//! Dropping the context is only sound when it holds nothing: tungstenite is
//! therefore never handed bytes past the end of the frame it is reading
//! ([`FrameTracker`] follows the frame headers), so once it returns a
//! message or runs out of input, its read buffer holds exactly the bytes of
//! the frame in progress — none when the tracker is between frames.
//!
//! Bytes come off the socket in one system call of up to [`READ_CHUNK`]
//! into a per-thread scratch buffer; what tungstenite does not take yet
//! waits in a per-connection stash that exists only while it is not empty.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Bytes read from the socket per system call at most.
pub const READ_CHUNK: usize = 64 * 1024;

thread_local! {
    /// Where socket reads land first (one per worker thread, not per connection).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}

pub struct WsSocket {
    stream: TcpStream,
    /// tungstenite's state while a message is moving; `None` between messages.
    context: Option<Box<WebSocketContext>>,
    /// Read from the socket, not yet handed to tungstenite.
    stash: Stash,
    frames: FrameTracker,
    /// The read side ended (an error or the close handshake); like a fused stream.
    ended: bool,
    /// A write found the socket full: flush before queueing more.
    blocked: bool,
}

fn would_block(e: &WsError) -> bool {
    matches!(e, WsError::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl WsSocket {
    /// A socket whose handshake is done; `read_ahead` holds bytes the HTTP
    /// layer read past the upgrade request.
    pub fn new(stream: TcpStream, read_ahead: &[u8]) -> Self {
        let mut stash = Stash::default();
        stash.put(read_ahead);
        Self { stream, context: None, stash, frames: FrameTracker::default(), ended: false, blocked: false }
    }

    /// Whether tungstenite's state currently exists (tests and measurements).
    pub fn is_active(&self) -> bool {
        self.context.is_some()
    }

    /// The context (built if need be) and the stream adapter it reads and writes through.
    fn parts<'a, 'b>(
        &'a mut self,
        cx: &'a mut Context<'b>,
        config: &WebSocketConfig,
    ) -> (&'a mut WebSocketContext, Io<'a, 'b>) {
        let context = self.context.get_or_insert_with(|| Box::new(WebSocketContext::new(Role::Server, Some(*config))));
        (context, Io { stream: &mut self.stream, stash: &mut self.stash, frames: &mut self.frames, cx })
    }

    /// Drops tungstenite's state if it holds nothing: between messages,
    /// nothing left to write, the connection open.
    fn settle(&mut self, cx: &mut Context<'_>) {
        let Some(context) = self.context.as_mut() else { return };
        if !self.frames.between_messages() || !context.can_write() || self.blocked {
            return;
        }
        let mut io = Io { stream: &mut self.stream, stash: &mut self.stash, frames: &mut self.frames, cx };
        // Writes a pong or close reply still queued; keeps the state if the socket is full.
        if context.flush(&mut io).is_ok() {
            self.context = None;
        }
    }

    /// The next message; `None` once the connection closed (the `Stream`
    /// of tokio-tungstenite's `WebSocketStream`, which this replaces).
    pub fn next<'a>(
        &'a mut self,
        config: &'a WebSocketConfig,
    ) -> impl Future<Output = Option<Result<Message, WsError>>> + 'a {
        poll_fn(move |cx| self.poll_next(cx, config))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>, config: &WebSocketConfig) -> Poll<Option<Result<Message, WsError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if self.context.is_none() && self.stash.is_empty() {
            // Nothing in progress: wait for the socket before building any state.
            if let Err(e) = ready!(self.stream.poll_read_ready(cx)) {
                self.ended = true;
                return Poll::Ready(Some(Err(WsError::Io(e))));
            }
        }
        let (context, mut io) = self.parts(cx, config);
        match context.read(&mut io) {
            Ok(message) => {
                self.settle(cx);
                Poll::Ready(Some(Ok(message)))
            }
            Err(e) if would_block(&e) => {
                self.settle(cx);
                Poll::Pending
            }
            Err(e) => {
                self.ended = true;
                if matches!(e, WsError::AlreadyClosed | WsError::ConnectionClosed) {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(e)))
                }
            }
        }
    }

    /// Queues `message`, writing what the socket takes now (tungstenite
    /// buffers the rest up to `max_write_buffer_size`).
    fn start_send(&mut self, cx: &mut Context<'_>, config: &WebSocketConfig, message: Message) -> Result<(), WsError> {
        let (context, mut io) = self.parts(cx, config);
        match context.write(&mut io, message) {
            Ok(()) => {
                self.blocked = false;
                Ok(())
            }
            // Queued; the socket is full, so flush before the next one.
            Err(e) if would_block(&e) => {
                self.blocked = true;
                Ok(())
            }
            Err(e) => {
                self.blocked = false;
                Err(e)
            }
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let Some(context) = self.context.as_mut() else {
            // No state, nothing buffered.
            return Poll::Ready(Ok(()));
        };
        let mut io = Io { stream: &mut self.stream, stash: &mut self.stash, frames: &mut self.frames, cx };
        let result = match context.flush(&mut io) {
            Err(e) if would_block(&e) => return Poll::Pending,
            // The close handshake just completed: flushing did its job.
            Err(WsError::ConnectionClosed) => Ok(()),
            other => other,
        };
        self.blocked = false;
        if result.is_ok() {
            self.settle(cx);
        }
        Poll::Ready(result)
    }

    /// Writes every message of `messages` and flushes once (tokio-tungstenite's
    /// `feed` for each, then `flush`); call again after `Pending` with the
    /// same iterator.
    pub fn poll_send_all(
        &mut self,
        cx: &mut Context<'_>,
        messages: &mut impl Iterator<Item = Message>,
        config: &WebSocketConfig,
    ) -> Poll<Result<(), WsError>> {
        loop {
            if self.blocked {
                ready!(self.poll_flush(cx))?;
            }
            let Some(message) = messages.next() else { break };
            self.start_send(cx, config, message)?;
        }
        self.poll_flush(cx)
    }

    /// [`Self::poll_send_all`] as a future.
    pub async fn send_all(
        &mut self,
        messages: &mut impl Iterator<Item = Message>,
        config: &WebSocketConfig,
    ) -> Result<(), WsError> {
        poll_fn(|cx| self.poll_send_all(cx, messages, config)).await
    }
}

/// The stream as tungstenite sees it: blocking-style reads and writes that
/// answer `WouldBlock` where the socket would wait (the task's waker is
/// registered then, as with any `poll_*`).
struct Io<'a, 'b> {
    stream: &'a mut TcpStream,
    stash: &'a mut Stash,
    frames: &'a mut FrameTracker,
    cx: &'a mut Context<'b>,
}

impl Read for Io<'_, '_> {
    fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
        if !self.stash.is_empty() {
            let taken = self.frames.advance(self.stash.bytes(), into.len());
            into[..taken].copy_from_slice(&self.stash.bytes()[..taken]);
            self.stash.consume(taken);
            return Ok(taken);
        }
        SCRATCH.with_borrow_mut(|scratch| {
            let mut buf = ReadBuf::new(scratch);
            match Pin::new(&mut *self.stream).poll_read(self.cx, &mut buf) {
                Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                Poll::Ready(Err(e)) => Err(e),
                Poll::Ready(Ok(())) => {
                    let read = buf.filled();
                    // Zero bytes: end of stream.
                    let taken = self.frames.advance(read, into.len());
                    into[..taken].copy_from_slice(&read[..taken]);
                    self.stash.put(&read[taken..]);
                    Ok(taken)
                }
            }
        })
    }
}

impl Write for Io<'_, '_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.stream).poll_write(self.cx, bytes) {
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
            Poll::Ready(result) => result,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // A TCP stream has nothing of its own to flush.
        Ok(())
    }
}

/// Bytes waiting for tungstenite: boxed, and only while there are some.
#[derive(Default)]
struct Stash(Option<Box<(Box<[u8]>, usize)>>);

impl Stash {
    fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_ref().map_or(&[], |stash| &stash.0[stash.1..])
    }

    /// Keeps `bytes`; only called once drained.
    fn put(&mut self, bytes: &[u8]) {
        debug_assert!(self.is_empty(), "filled only once drained");
        if !bytes.is_empty() {
            self.0 = Some(Box::new((bytes.into(), 0)));
        }
    }

    fn consume(&mut self, n: usize) {
        if let Some(stash) = self.0.as_mut() {
            stash.1 += n;
            if stash.1 == stash.0.len() {
                self.0 = None;
            }
        }
    }
}

/// Follows the frames in the bytes handed to tungstenite (RFC 6455 §5.2),
/// so that they stop at the end of each frame, and knows when a fragmented
/// message is in progress. Validation is tungstenite's job: a malformed
/// header is handed over like any other and rejected there.
#[derive(Default)]
struct FrameTracker {
    /// The current header's bytes up to its length (the mask after them is
    /// only counted).
    header: [u8; 10],
    /// Bytes of the current frame's header seen so far.
    header_seen: u8,
    /// In the current frame's payload (its header is complete).
    in_payload: bool,
    /// A text or binary frame without FIN was seen, and not yet its last fragment.
    fragmented: bool,
    /// Payload bytes of the current frame still to come, in the payload.
    payload_left: u64,
}

impl FrameTracker {
    /// How many of `bytes`, at most `max`, to hand over: never past the end
    /// of the current frame. At least one when both are non-zero.
    fn advance(&mut self, bytes: &[u8], max: usize) -> usize {
        let limit = bytes.len().min(max);
        let mut taken = 0;
        while taken < limit {
            if self.in_payload {
                let n = u64::try_from(limit - taken).map_or(self.payload_left, |n| n.min(self.payload_left));
                taken += usize::try_from(n).expect("at most limit");
                self.payload_left -= n;
                if self.payload_left == 0 {
                    self.end_frame();
                    break;
                }
            } else {
                if let Some(byte) = self.header.get_mut(usize::from(self.header_seen)) {
                    *byte = bytes[taken];
                }
                self.header_seen += 1;
                taken += 1;
                if self.header_size() == Some(self.header_seen) {
                    self.payload_left = self.payload_length();
                    if self.payload_left == 0 {
                        self.end_frame();
                        break;
                    }
                    self.in_payload = true;
                }
            }
        }
        taken
    }

    /// The current header's size, once its second byte is known.
    fn header_size(&self) -> Option<u8> {
        if self.header_seen < 2 {
            return None;
        }
        let second = self.header[1];
        let extended = match second & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if second & 0x80 != 0 { 4 } else { 0 };
        Some(2 + extended + mask)
    }

    fn payload_length(&self) -> u64 {
        let h = &self.header;
        match h[1] & 0x7F {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            n => u64::from(n),
        }
    }

    fn end_frame(&mut self) {
        let fin = self.header[0] & 0x80 != 0;
        match self.header[0] & 0x0F {
            // Text or binary: the first (or only) frame of a message.
            1 | 2 => self.fragmented = !fin,
            // Continuation.
            0 if fin => self.fragmented = false,
            // Control frames may come between fragments and change nothing.
            _ => {}
        }
        self.header_seen = 0;
        self.in_payload = false;
    }

    /// No frame in progress and no fragmented message waiting for more.
    fn between_messages(&self) -> bool {
        self.header_seen == 0 && !self.in_payload && !self.fragmented
    }
}

#[cfg(test)]
mod tests {
    use futures::{SinkExt, StreamExt};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
    use tokio_tungstenite::{WebSocketStream, tungstenite::Bytes};

    use super::*;

    fn header(fin: bool, opcode: u8, masked: bool, len: usize) -> Vec<u8> {
        let mut h = vec![(u8::from(fin) << 7) | opcode];
        let mask = if masked { 0x80 } else { 0 };
        if len < 126 {
            h.push(mask | len as u8);
        } else if len <= usize::from(u16::MAX) {
            h.push(mask | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            h.push(mask | 127);
            h.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            h.extend_from_slice(&[1, 2, 3, 4]);
        }
        h
    }

    fn frame(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut f = header(fin, opcode, true, len);
        f.resize(f.len() + len, b'x');
        f
    }

    #[test]
    fn the_tracker_stops_at_each_frame_end_whatever_the_chunks() {
        let lengths = [0, 1, 125, 126, 300, 65_535, 65_536, 70_000];
        let mut stream = Vec::new();
        let mut ends = Vec::new();
        for len in lengths {
            stream.extend(frame(true, 1, len));
            ends.push(stream.len());
        }
        for chunk in [1, 2, 3, 7, 100, 4096, usize::MAX] {
            let mut tracker = FrameTracker::default();
            let (mut at, mut stops) = (0, Vec::new());
            while at < stream.len() {
                let taken = tracker.advance(&stream[at..], chunk);
                assert!(taken > 0);
                at += taken;
                if tracker.between_messages() {
                    stops.push(at);
                }
            }
            assert_eq!(stops, ends, "chunks of {chunk}");
        }
    }

    #[test]
    fn a_fragmented_message_is_in_progress_until_its_last_fragment() {
        let mut tracker = FrameTracker::default();
        let mut feed = |bytes: Vec<u8>| {
            assert_eq!(tracker.advance(&bytes, usize::MAX), bytes.len());
            tracker.between_messages()
        };
        assert!(!feed(frame(false, 1, 10)), "first fragment");
        assert!(!feed(frame(true, 9, 4)), "a ping between fragments");
        assert!(!feed(frame(false, 0, 10)), "middle fragment");
        assert!(feed(frame(true, 0, 10)), "last fragment");
        assert!(feed(frame(true, 2, 3)), "a whole binary message");
    }

    /// A server socket and the client side of it.
    async fn pair() -> (WsSocket, WebSocketStream<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let client = WebSocketStream::from_raw_socket(client.expect("connect"), Role::Client, None).await;
        (WsSocket::new(server.expect("accept").0, b""), client)
    }

    fn config() -> WebSocketConfig {
        WebSocketConfig::default().read_buffer_size(1024).max_message_size(Some(4 << 20)).max_frame_size(Some(4 << 20))
    }

    #[tokio::test]
    async fn messages_of_every_size_arrive_and_the_state_goes_away_between_them() {
        let (mut server, mut client) = pair().await;
        let config = config();
        let sizes = [0, 1, 100, 1024, 1025, 64 * 1024, 1_200_000];
        for size in sizes {
            client.feed(Message::text("é".repeat(size / 2))).await.expect("feed");
        }
        client.flush().await.expect("flush");
        for size in sizes {
            let message = server.next(&config).await.expect("open").expect("message");
            assert_eq!(message.into_text().expect("text").len(), size / 2 * 2);
        }
        assert!(!server.is_active(), "nothing kept once every message was read");

        let mut replies = ["a".repeat(10), "b".repeat(200_000)].into_iter().map(Message::text);
        server.send_all(&mut replies, &config).await.expect("send");
        assert!(!server.is_active(), "nothing kept once written");
        assert_eq!(client.next().await.expect("open").expect("reply").len(), 10);
        assert_eq!(client.next().await.expect("open").expect("reply").len(), 200_000);
    }

    #[tokio::test]
    async fn fragments_pings_and_a_frame_split_across_reads() {
        let (mut server, mut client) = pair().await;
        let config = config();
        let fragment = |data: &'static [u8], opcode: Data, fin: bool| {
            Message::Frame(Frame::message(Bytes::from_static(data), OpCode::Data(opcode), fin))
        };
        client.send(fragment(b"hel", Data::Text, false)).await.expect("first fragment");
        client.send(Message::Ping(Bytes::from_static(b"p"))).await.expect("ping");
        client.send(fragment(b"lo", Data::Continue, true)).await.expect("last fragment");
        assert_eq!(server.next(&config).await.expect("open").expect("ping"), Message::Ping(Bytes::from_static(b"p")));
        assert!(server.is_active(), "kept: a fragmented message is in progress");
        assert_eq!(server.next(&config).await.expect("open").expect("text"), Message::text("hello"));
        assert!(!server.is_active());
        // The pong was written before the state went away.
        assert_eq!(client.next().await.expect("open").expect("pong"), Message::Pong(Bytes::from_static(b"p")));

        // A frame trickling in a byte at a time.
        let mut raw = header(true, 1, true, 5);
        raw.extend(b"hello".iter().zip([1u8, 2, 3, 4].iter().cycle()).map(|(b, m)| b ^ m));
        let mut tcp = client.into_inner();
        for byte in raw {
            tcp.write_all(&[byte]).await.expect("write");
            tcp.flush().await.expect("flush");
            tokio::task::yield_now().await;
        }
        assert_eq!(server.next(&config).await.expect("open").expect("text"), Message::text("hello"));
    }

    #[tokio::test]
    async fn limits_and_the_close_handshake_are_tungstenites() {
        let (mut server, mut client) = pair().await;
        let small =
            WebSocketConfig::default().read_buffer_size(1024).max_frame_size(Some(100)).max_message_size(Some(100));
        client.send(Message::text("x".repeat(101))).await.expect("send");
        assert!(matches!(server.next(&small).await, Some(Err(WsError::Capacity(_)))));
        assert!(server.next(&small).await.is_none(), "ended after an error");

        let (mut server, mut client) = pair().await;
        let config = config();
        let close = CloseFrame { code: CloseCode::Normal, reason: "bye".into() };
        client.send(Message::Close(Some(close.clone()))).await.expect("close");
        assert_eq!(server.next(&config).await.expect("open").expect("close"), Message::Close(Some(close.clone())));
        // The reply went out with the next read or flush.
        let mut none = std::iter::empty();
        server.send_all(&mut none, &config).await.expect("flush");
        assert_eq!(client.next().await.expect("open").expect("reply"), Message::Close(Some(close)));

        let (mut server, client) = pair().await;
        drop(client);
        assert!(matches!(server.next(&config).await, Some(Err(WsError::Protocol(_)))), "reset without a close");
    }
}
