//! The writes of the embedded store, as they travel to its threads and as
//! they are logged: every write is an [`Op`], answered by a [`Done`]. A log
//! record's payload is a batch's ops, each a tag byte and its fields
//! (integers little-endian, strings and byte strings length-prefixed).

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::store::StoreResult;

/// One write, in owned form so it can cross to the writer thread. JSON is
/// encoded by the caller so the single writer only does B-tree work.
#[derive(Debug, PartialEq)]
pub enum Op {
    Send {
        sender: String,
        key: String,
        channel: String,
        id: u64,
        json: Vec<u8>,
        position: u64,
        recipients: Arc<[String]>,
        link_channel: bool,
    },
    CreateGroup {
        id: String,
        json: Vec<u8>,
        members: Vec<String>,
    },
    AddMember {
        group: String,
        user: String,
    },
    RemoveMember {
        group: String,
        user: String,
    },
    /// Moves a user's markers in a channel forward (never back).
    AdvanceMarkers {
        user: String,
        channel: String,
        delivered_up_to: u64,
        read_up_to: u64,
    },
}

/// What a committed write answers.
pub enum Done {
    Unit,
    /// The send's key was stored before, for this message (JSON).
    Duplicate(Vec<u8>),
}

pub struct Request {
    pub op: Op,
    pub reply: oneshot::Sender<StoreResult<Done>>,
}

/// Log payload: the batch's writes, each a tag byte and its fields
/// (integers little-endian, strings and byte strings length-prefixed).
/// Tags 5 and 6 were the push queue's writes (a job, an ack): logs of
/// earlier versions may hold them, and they are read past. Tag 7 (markers)
/// is new in this version: an earlier version reads a log holding one as
/// damaged, so a downgrade must start from a checkpointed store (a clean stop).
impl Op {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        let put_u64 = |out: &mut Vec<u8>, n: u64| out.extend_from_slice(&n.to_le_bytes());
        let put_bytes = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            out.extend_from_slice(b);
        };
        let put_strs = |out: &mut Vec<u8>, items: &[String]| {
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_bytes(out, item.as_bytes());
            }
        };
        match self {
            Op::Send { sender, key, channel, id, json, position, recipients, link_channel } => {
                out.push(1);
                put_bytes(out, sender.as_bytes());
                put_bytes(out, key.as_bytes());
                put_bytes(out, channel.as_bytes());
                put_u64(out, *id);
                put_bytes(out, json);
                put_u64(out, *position);
                put_strs(out, recipients);
                out.push(u8::from(*link_channel));
            }
            Op::CreateGroup { id, json, members } => {
                out.push(2);
                put_bytes(out, id.as_bytes());
                put_bytes(out, json);
                put_strs(out, members);
            }
            Op::AddMember { group, user } | Op::RemoveMember { group, user } => {
                out.push(if matches!(self, Op::AddMember { .. }) { 3 } else { 4 });
                put_bytes(out, group.as_bytes());
                put_bytes(out, user.as_bytes());
            }
            Op::AdvanceMarkers { user, channel, delivered_up_to, read_up_to } => {
                out.push(7);
                put_bytes(out, user.as_bytes());
                put_bytes(out, channel.as_bytes());
                put_u64(out, *delivered_up_to);
                put_u64(out, *read_up_to);
            }
        }
    }
}

/// Reads what [`Op::encode`] wrote, field by field.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*first)
    }

    fn u64(&mut self) -> Option<u64> {
        let (bytes, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*bytes))
    }

    fn bytes(&mut self) -> Option<Vec<u8>> {
        let len = usize::try_from(self.u64()?).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (bytes, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(bytes.to_vec())
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?).ok()
    }

    fn strings(&mut self) -> Option<Vec<String>> {
        let n = usize::try_from(self.u64()?).ok()?;
        // Each takes at least 8 bytes: a count beyond that is damage, not a reason to allocate.
        if n > self.0.len() / 8 {
            return None;
        }
        (0..n).map(|_| self.string()).collect()
    }
}

/// The writes of one log payload of log format `format`; `None` if it is
/// damaged.
pub(super) fn decode_ops(payload: &[u8], format: u32) -> Option<Vec<Op>> {
    let mut reader = Reader(payload);
    let mut ops = Vec::new();
    while !reader.0.is_empty() {
        let op = match reader.u8()? {
            1 => Op::Send {
                sender: reader.string()?,
                key: reader.string()?,
                channel: reader.string()?,
                id: reader.u64()?,
                json: reader.bytes()?,
                position: reader.u64()?,
                recipients: reader.strings()?.into(),
                link_channel: reader.u8()? != 0,
            },
            2 => Op::CreateGroup { id: reader.string()?, json: reader.bytes()?, members: reader.strings()? },
            3 => Op::AddMember { group: reader.string()?, user: reader.string()? },
            4 => Op::RemoveMember { group: reader.string()?, user: reader.string()? },
            7 => Op::AdvanceMarkers {
                user: reader.string()?,
                channel: reader.string()?,
                delivered_up_to: reader.u64()?,
                read_up_to: reader.u64()?,
            },
            5 => {
                // Push jobs: numbered (`first_seq`) from format 1 on, then the jobs.
                if format > 0 {
                    reader.u64()?;
                }
                let n = usize::try_from(reader.u64()?).ok()?;
                if n > reader.0.len() / 8 {
                    return None;
                }
                for _ in 0..n {
                    reader.bytes()?;
                }
                continue;
            }
            6 => {
                // A push job's ack.
                reader.u64()?;
                continue;
            }
            _ => return None,
        };
        ops.push(op);
    }
    Some(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<Op> {
        vec![
            Op::Send {
                sender: "alice".into(),
                key: "k-1".into(),
                channel: "g:1".into(),
                id: 42,
                json: br#"{"text":"h\u00e9"}"#.to_vec(),
                position: 43,
                recipients: vec!["alice".to_string(), "bob".to_string(), "😀".to_string()].into(),
                link_channel: true,
            },
            Op::CreateGroup { id: "g:2".into(), json: b"{}".to_vec(), members: vec!["a".into(), "b".into()] },
            Op::AddMember { group: "g:2".into(), user: "c".into() },
            Op::RemoveMember { group: "g:2".into(), user: "a".into() },
            Op::AdvanceMarkers { user: "bob".into(), channel: "g:2".into(), delivered_up_to: 44, read_up_to: 42 },
        ]
    }

    #[test]
    fn log_payloads_decode_to_the_writes_they_hold() {
        let ops = every_kind();
        let mut payload = Vec::new();
        ops.iter().for_each(|op| op.encode(&mut payload));
        assert_eq!(decode_ops(&payload, 2), Some(ops));
        assert_eq!(decode_ops(&[], 2), Some(Vec::new()));
    }

    #[test]
    fn push_writes_of_earlier_logs_are_read_past() {
        let member = |add: bool| {
            let (group, user) = ("g:2".to_string(), if add { "c" } else { "a" }.to_string());
            if add { Op::AddMember { group, user } } else { Op::RemoveMember { group, user } }
        };
        // Two push jobs ("1" and ""), numbered from 7 in format 1 (not in
        // format 0), then an ack of job 9.
        for format in [0, 1] {
            let mut payload = Vec::new();
            member(true).encode(&mut payload);
            payload.push(5);
            let numbers: &[u64] = if format == 0 { &[2, 1] } else { &[7, 2, 1] };
            for n in numbers {
                payload.extend_from_slice(&n.to_le_bytes());
            }
            payload.push(b'1');
            payload.extend_from_slice(&0_u64.to_le_bytes());
            payload.push(6);
            payload.extend_from_slice(&9_u64.to_le_bytes());
            member(false).encode(&mut payload);
            assert_eq!(decode_ops(&payload, format), Some(vec![member(true), member(false)]), "format {format}");
        }
    }

    #[test]
    fn damaged_payloads_are_refused_not_misread() {
        let mut payload = Vec::new();
        every_kind().iter().for_each(|op| op.encode(&mut payload));
        // Every truncation and an unknown tag are refused (no panic, no partial read).
        for cut in 1..payload.len() {
            if let Some(ops) = decode_ops(&payload[..cut], 2) {
                // A cut exactly between two writes decodes to the writes before it.
                assert!(ops.len() < every_kind().len(), "cut at {cut}");
            }
        }
        assert_eq!(decode_ops(&[9], 2), None);
        // A huge length does not allocate.
        let mut lying = vec![2];
        lying.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(decode_ops(&lying, 2), None);
    }
}
