//! The embedded store's write-ahead log: what makes a batch durable.
//!
//! A durable redb commit writes back every B-tree page the batch touched
//! and fsyncs them: for a stream of small batches (a message touches
//! history, positions, idempotency keys and one inbox page per recipient),
//! that write-back cost more CPU than everything else the gateway does. So
//! each batch is appended here as one record and made durable with one
//! `fdatasync` of the log's tail; the B-trees are then updated with a redb
//! commit that is visible but not durable, and a durable redb commit (a
//! checkpoint) every few seconds writes each page back once, after which the
//! log starts over. Opening a store replays the records its last durable
//! commit does not include.
//!
//! Record: `len: u32 | crc32(seq ‖ payload): u32 | seq: u64 | payload`, all
//! little-endian. Records carry consecutive sequence numbers; reading stops
//! at the first record that is torn (bad length or checksum) or out of
//! sequence, which is how the end of the log is found after the log started
//! over on top of older records. The file is preallocated, so appending
//! changes no file metadata and `fdatasync` writes just the new bytes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Bytes preallocated for the log; a checkpoint is taken before it fills.
pub const LOG_BYTES: u64 = 64 * 1024 * 1024;

const HEADER: usize = 16;

pub struct Wal {
    file: File,
    /// Where the next record goes.
    offset: u64,
    /// Sequence number of the next record.
    next_seq: u64,
}

/// A record read back when the store opens.
pub struct Record {
    pub seq: u64,
    pub payload: Vec<u8>,
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

impl Wal {
    /// Opens (or creates and preallocates) the log at `path` and returns
    /// the records newer than `applied` (the sequence number the store's
    /// last durable commit includes), oldest first.
    pub fn open(path: &Path, applied: u64) -> io::Result<(Self, Vec<Record>)> {
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        if file.metadata()?.len() < LOG_BYTES {
            preallocate(&mut file, LOG_BYTES)?;
        }
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(0))?;
        file.read_to_end(&mut bytes)?;
        let records = parse(&bytes);
        let next_seq = records.last().map_or(applied, |r| r.seq.max(applied)) + 1;
        let pending = records.into_iter().filter(|r| r.seq > applied).collect();
        // Replayed records are checkpointed before anything new is written,
        // so the log can start over at once.
        Ok((Self { file, offset: 0, next_seq }, pending))
    }

    /// Sequence number the next record will get.
    #[cfg(test)]
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes written since the log last started over.
    pub fn len(&self) -> u64 {
        self.offset
    }

    /// Appends a record and returns once it is durable; its sequence number.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<u64> {
        let seq = self.next_seq;
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "log record over 4 GiB"))?;
        let mut record = Vec::with_capacity(HEADER + payload.len());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&checksum(seq, payload).to_le_bytes());
        record.extend_from_slice(&seq.to_le_bytes());
        record.extend_from_slice(payload);
        self.file.seek(SeekFrom::Start(self.offset))?;
        self.file.write_all(&record)?;
        self.file.sync_data()?;
        self.offset += record.len() as u64;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Everything logged so far is in a durable store commit: the next
    /// record goes to the start again (sequence numbers go on).
    pub fn start_over(&mut self) {
        self.offset = 0;
    }
}

/// Writes zeros up to `len`, so later appends allocate no blocks.
fn preallocate(file: &mut File, len: u64) -> io::Result<()> {
    let start = file.metadata()?.len();
    file.seek(SeekFrom::Start(start))?;
    let chunk = vec![0_u8; 1024 * 1024];
    let mut at = start;
    while at < len {
        let n = chunk.len().min(usize::try_from(len - at).unwrap_or(chunk.len()));
        file.write_all(&chunk[..n])?;
        at += n as u64;
    }
    file.sync_all()
}

/// The valid records at the start of `bytes`, in order.
fn parse(bytes: &[u8]) -> Vec<Record> {
    let mut records: Vec<Record> = Vec::new();
    let mut rest = bytes;
    while rest.len() >= HEADER {
        let word = |at: usize| u32::from_le_bytes([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]]);
        let (len, crc) = (word(0) as usize, word(4));
        let mut seq_bytes = [0_u8; 8];
        seq_bytes.copy_from_slice(&rest[8..16]);
        let seq = u64::from_le_bytes(seq_bytes);
        if len == 0 || rest.len() - HEADER < len {
            break;
        }
        let payload = &rest[HEADER..HEADER + len];
        let in_sequence = records.last().is_none_or(|last| last.seq + 1 == seq);
        if checksum(seq, payload) != crc || !in_sequence {
            break;
        }
        records.push(Record { seq, payload: payload.to_vec() });
        rest = &rest[HEADER + len..];
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(records: &[Record]) -> Vec<(u64, Vec<u8>)> {
        records.iter().map(|r| (r.seq, r.payload.clone())).collect()
    }

    #[test]
    fn records_come_back_after_reopening_and_only_unapplied_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let (mut wal, pending) = Wal::open(&path, 0).expect("open");
        assert!(pending.is_empty());
        assert_eq!(wal.append(b"one").expect("append"), 1);
        assert_eq!(wal.append(b"two").expect("append"), 2);
        assert_eq!(wal.append(b"three").expect("append"), 3);
        drop(wal);

        let (wal, pending) = Wal::open(&path, 1).expect("reopen");
        assert_eq!(payloads(&pending), vec![(2, b"two".to_vec()), (3, b"three".to_vec())]);
        assert_eq!(wal.next_seq(), 4);
    }

    #[test]
    fn a_log_that_started_over_ends_where_its_sequence_breaks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path, 0).expect("open");
        for payload in [b"aaaaaaaa".as_slice(), b"bbbbbbbb", b"cccccccc"] {
            wal.append(payload).expect("append");
        }
        // A checkpoint covered 1..=3; the log starts over over the old records.
        wal.start_over();
        assert_eq!(wal.append(b"dd").expect("append"), 4);
        drop(wal);
        let (_, pending) = Wal::open(&path, 3).expect("reopen");
        assert_eq!(payloads(&pending), vec![(4, b"dd".to_vec())], "old records behind the new one are not read");
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path, 0).expect("open");
        wal.append(b"kept").expect("append");
        wal.append(b"torn record").expect("append");
        drop(wal);
        // Damage the second record's payload, as a crash mid-write would.
        let mut bytes = std::fs::read(&path).expect("read");
        let second = HEADER + 4 + HEADER;
        bytes[second + 2] ^= 0xFF;
        std::fs::write(&path, &bytes).expect("write");
        let (wal, pending) = Wal::open(&path, 0).expect("reopen");
        assert_eq!(payloads(&pending), vec![(1, b"kept".to_vec())]);
        assert_eq!(wal.next_seq(), 2, "the torn record's number is used again");
    }
}
