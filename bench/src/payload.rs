//! What every benchmark message carries, and the clock it is stamped with.
//!
//! The text is `kcb1|STEP|STREAM|SEQ|NANOS|xxxx…`: the step of the run, the
//! sequence stream (a sender for pairs, the group for fan-out), the number in
//! that stream (for exactly-once checks) and the send time in ns
//! since the Unix epoch. Only `[a-z0-9|]` is used, so it goes into JSON
//! strings unescaped, and receivers find it with a substring search instead
//! of decoding every delivered frame (the client must stay cheap at 500k
//! deliveries/s).

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const MARKER: &str = "kcb1|";

/// Monotonic time expressed as Unix-epoch nanoseconds: one wall-clock read at
/// start, so stamps and receipt times never jump with the wall clock.
struct Anchor {
    instant: Instant,
    epoch_ns: u64,
}

fn anchor() -> &'static Anchor {
    static ANCHOR: OnceLock<Anchor> = OnceLock::new();
    ANCHOR.get_or_init(|| Anchor {
        instant: Instant::now(),
        epoch_ns: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
    })
}

pub fn epoch_ns(at: Instant) -> u64 {
    let anchor = anchor();
    let since = at.checked_duration_since(anchor.instant).unwrap_or(Duration::ZERO);
    anchor.epoch_ns + since.as_nanos() as u64
}

#[cfg(test)]
pub fn now_ns() -> u64 {
    epoch_ns(Instant::now())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub step: u16,
    pub stream: u32,
    pub seq: u64,
    pub sent_ns: u64,
}

impl Stamp {
    /// The message text, padded with `x` to at least `size` bytes.
    pub fn text(&self, size: usize) -> String {
        let mut text = format!("{MARKER}{}|{}|{}|{}|", self.step, self.stream, self.seq, self.sent_ns);
        if text.len() < size {
            text.extend(std::iter::repeat_n('x', size - text.len()));
        }
        text
    }

    /// Every stamp in a received frame (Centrifugo batches several per frame).
    pub fn find_all(frame: &str) -> impl Iterator<Item = Option<Stamp>> + '_ {
        frame.match_indices(MARKER).map(|(at, _)| Self::parse(&frame[at + MARKER.len()..]))
    }

    fn parse(rest: &str) -> Option<Stamp> {
        let mut fields = rest.splitn(5, '|');
        Some(Stamp {
            step: fields.next()?.parse().ok()?,
            stream: fields.next()?.parse().ok()?,
            seq: fields.next()?.parse().ok()?,
            sent_ns: fields.next()?.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_through_a_batched_frame() {
        let a = Stamp { step: 1, stream: 7, seq: 42, sent_ns: 1_774_245_000_000_000_001 };
        let b = Stamp { step: 2, stream: 0, seq: 0, sent_ns: 5 };
        let frame = format!(
            "{{\"push\":{{\"pub\":{{\"data\":{{\"t\":\"{}\"}}}}}}}}\n{{\"push\":{{\"pub\":{{\"data\":{{\"t\":\"{}\"}}}}}}}}",
            a.text(64),
            b.text(0)
        );
        let found: Vec<_> = Stamp::find_all(&frame).collect();
        assert_eq!(found, vec![Some(a), Some(b)]);
        assert_eq!(a.text(64).len(), 64);
        assert_eq!(Stamp::find_all("kcb1|nonsense").next(), Some(None));
    }

    #[test]
    fn the_clock_is_monotonic_and_near_the_wall_clock() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        assert!(wall.abs_diff(b) < 1_000_000_000);
    }
}
