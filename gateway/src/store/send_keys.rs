//! Idempotency reservations of a clustered store: which message a client's
//! `(sender, key)` stands for, kept outside the store (in Redis) so that a
//! send costs no lightweight transaction. See `docs/cluster.md` ("Retries")
//! for the crash argument.
//!
//! The store asks [`SendKeys::reserve`] before writing. The answer is one of:
//! - [`Reservation::Reserved`]: nobody held the key; it now names this
//!   attempt. `certain` is false while reservations made before some recent
//!   moment may have been lost (Redis lost its data, or was unreachable
//!   when a send was stored): the store then looks for an earlier attempt
//!   in its own rows before writing.
//! - [`Reservation::Existing`]: an earlier attempt holds the key; the store
//!   finishes or acknowledges that one instead.
//! - [`Reservation::Unknown`]: the reservations cannot be reached; the store
//!   looks in its own rows, as for an uncertain reservation.
//!
//! Once the rows are written the store calls [`SendKeys::complete`], which
//! records the final record (marked done) so that a later retry answers
//! without writing.

use std::fmt;

use async_trait::async_trait;

/// What a reservation names: the message and where its inbox entries are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendRecord {
    pub id: u64,
    /// The inbox position of the attempt that wrote (or writes) the rows.
    pub position: u64,
    pub channel: String,
    /// Every row of the send is known to be written.
    pub done: bool,
}

impl SendRecord {
    /// `id:position:done:channel`, short enough to keep one per send for
    /// the retry window (the channel goes last: it contains `:`).
    pub fn encode(&self) -> String {
        format!("{}:{}:{}:{}", self.id, self.position, u8::from(self.done), self.channel)
    }

    pub fn decode(text: &str) -> Option<Self> {
        let mut parts = text.splitn(4, ':');
        let id = parts.next()?.parse().ok()?;
        let position = parts.next()?.parse().ok()?;
        let done = match parts.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        let channel = parts.next().filter(|c| !c.is_empty())?.to_owned();
        Some(Self { id, position, channel, done })
    }
}

/// The answer of [`SendKeys::reserve`] (module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reservation {
    Reserved { certain: bool },
    Existing(SendRecord),
    Unknown,
}

#[derive(Debug, thiserror::Error)]
#[error("send keys: {0}")]
pub struct SendKeysError(pub String);

#[async_trait]
pub trait SendKeys: Send + Sync + 'static {
    /// Reserves `(sender, key)` for `candidate` unless it is held; never
    /// fails: an unreachable backend answers [`Reservation::Unknown`].
    async fn reserve(&self, sender: &str, key: &str, candidate: &SendRecord) -> Reservation;

    /// The rows of `record` are written: remember it as done (replacing what
    /// the key held). Best effort and quick (it may only queue the write):
    /// a lost completion only makes a later retry rewrite the rows.
    async fn complete(&self, sender: &str, key: &str, record: &SendRecord);
}

impl fmt::Display for SendRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "message {} in {} at position {}", self.id, self.channel, self.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_colons_in_the_channel() {
        let record = SendRecord { id: 42, position: 43, channel: "dm:alice:bob".into(), done: true };
        assert_eq!(record.encode(), "42:43:1:dm:alice:bob");
        assert_eq!(SendRecord::decode(&record.encode()), Some(record.clone()));
        let pending = SendRecord { done: false, ..record };
        assert_eq!(SendRecord::decode(&pending.encode()), Some(pending));
    }

    #[test]
    fn malformed_records_are_refused() {
        for bad in ["", "1:2:1:", "1:2:x:g:1", "a:2:0:g:1", "1:b:0:g:1", "1:2"] {
            assert_eq!(SendRecord::decode(bad), None, "{bad:?}");
        }
    }
}
