//! The loop each connection runs during a workload: send on an open-loop
//! schedule, heartbeat, answer pings, and record acks and deliveries.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio::time::sleep_until;
use tokio_tungstenite::tungstenite::Message;

use crate::net::Ws;
use crate::payload::{self, MARKER, Stamp};
use crate::proto::{Client, Control, FIRST_REQ, Target};
use crate::stats::{RunStats, Seen, record};

/// What one connection sends. Sender `index` of `senders` sends the messages
/// numbered `index`, `index + senders`, … of each step, the n-th at
/// `start + n / rate`: the senders together offer the step's rate, evenly
/// spaced, whatever the server does (open loop).
#[derive(Clone, Debug)]
pub struct Sender {
    pub target: Target,
    pub index: u64,
    pub senders: u64,
    /// Stamp stream: per sender (pairs) or shared by a group's senders.
    pub stream: u32,
    /// Number messages across all senders of the stream (group) rather than
    /// per sender (pairs), so receivers' sequence numbers are dense.
    pub shared_stream: bool,
    /// Unique per run and sender: the idempotency keys' prefix.
    pub key_prefix: String,
}

pub struct Conn {
    pub ws: Ws,
    pub sender: Option<Sender>,
    pub heartbeat: Option<Duration>,
}

/// What every connection of a run shares.
pub struct Shared {
    pub client: Client,
    pub stats: Arc<RunStats>,
    pub text_size: usize,
    pub stop: watch::Receiver<bool>,
}

struct Next {
    step: usize,
    k: u64,
    at: Instant,
}

/// The first send at or after message `k` of `step`, skipping empty steps.
fn next_send(stats: &RunStats, sender: &Sender, mut step: usize, mut k: u64) -> Option<Next> {
    while let Some(s) = stats.steps.get(step) {
        if s.rate > 0.0 {
            let n = k * sender.senders + sender.index;
            let at = s.start + Duration::from_secs_f64(n as f64 / s.rate);
            if at < s.end {
                return Some(Next { step, k, at });
            }
        }
        step += 1;
        k = 0;
    }
    None
}

/// Runs one connection until `stop` or until the server ends it.
pub async fn drive(conn: Conn, shared: Arc<Shared>) {
    let Conn { mut ws, sender, heartbeat } = conn;
    let stats = shared.stats.clone();
    let mut stop = shared.stop.clone();
    let far = Instant::now() + Duration::from_secs(365 * 86_400);
    let mut next = sender.as_ref().and_then(|s| next_send(&stats, s, 0, 0));
    let mut next_heartbeat = heartbeat.map(|h| Instant::now() + h);
    let mut pending: HashMap<u32, (usize, Instant)> = HashMap::new();
    let mut seen = Seen::default();
    let mut req = FIRST_REQ;

    let ended: Option<String> = loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break None,
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let pings = receive(&shared, text.as_str(), &mut pending, &mut seen);
                    for _ in 0..pings {
                        if ws.send(Message::text(shared.client.pong())).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    break Some(frame.map_or("close without code".into(), |f| u16::from(f.code).to_string()));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break Some(format!("error: {e}")),
                None => break Some("eof".into()),
            },
            _ = sleep_until(next.as_ref().map_or(far, |n| n.at).into()), if next.is_some() => {
                let (Some(n), Some(sender)) = (next.take(), sender.as_ref()) else { continue };
                let step = &stats.steps[n.step];
                let seq = if sender.shared_stream { n.k * sender.senders + sender.index } else { n.k };
                // Stamped with the actual send time: tokio's timers fire up to
                // a millisecond late, which is the client's lag, not the server's.
                let sent_at = Instant::now();
                let stamp = Stamp { step: n.step as u16, stream: sender.stream, seq, sent_ns: payload::epoch_ns(sent_at) };
                let frame = shared.client.send_frame(&sender.target, req, &sender.key_prefix, &stamp.text(shared.text_size));
                record(&step.send_lag, sent_at.duration_since(n.at).as_micros() as u64);
                if let Err(e) = ws.send(Message::text(frame)).await {
                    break Some(format!("write error: {e}"));
                }
                step.sent.fetch_add(1, Relaxed);
                pending.insert(req, (n.step, sent_at));
                req = req.checked_add(1).unwrap_or(FIRST_REQ);
                next = next_send(&stats, sender, n.step, n.k + 1);
            }
            _ = sleep_until(next_heartbeat.unwrap_or(far).into()), if next_heartbeat.is_some() => {
                if let Some(frame) = shared.client.heartbeat()
                    && let Err(e) = ws.send(Message::text(frame)).await
                {
                    break Some(format!("write error: {e}"));
                }
                next_heartbeat = heartbeat.map(|h| Instant::now() + h);
            }
        }
    };
    match ended {
        Some(reason) => stats.closed(&reason),
        None => {
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
        }
    }
}

/// Records one received text frame; returns how many pings it held.
fn receive(shared: &Shared, text: &str, pending: &mut HashMap<u32, (usize, Instant)>, seen: &mut Seen) -> usize {
    let stats = &shared.stats;
    let mut pings = 0;
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        if line.contains(MARKER) {
            let now = Instant::now();
            let now_ns = payload::epoch_ns(now);
            for stamp in Stamp::find_all(line) {
                let Some((stamp, step)) = stamp.and_then(|s| Some((s, stats.steps.get(s.step as usize)?))) else {
                    stats.bad_stamps.fetch_add(1, Relaxed);
                    continue;
                };
                step.deliveries.fetch_add(1, Relaxed);
                if now <= step.end {
                    step.in_window.fetch_add(1, Relaxed);
                }
                if !seen.first(&stamp) {
                    step.duplicates.fetch_add(1, Relaxed);
                }
                record(&step.latency, now_ns.saturating_sub(stamp.sent_ns) / 1000);
            }
            continue;
        }
        match shared.client.control(line) {
            Control::Ack(req) => {
                if let Some((step, at)) = pending.remove(&req) {
                    let step = &stats.steps[step];
                    step.acked.fetch_add(1, Relaxed);
                    record(&step.ack_latency, at.elapsed().as_micros() as u64);
                }
            }
            Control::Error(req, code) => match req.and_then(|r| pending.remove(&r)) {
                Some((step, _)) => stats.steps[step].errors.add(&code),
                None => stats.errors.add(&code),
            },
            Control::Ping => pings += 1,
            Control::Other => {}
        }
    }
    pings
}
