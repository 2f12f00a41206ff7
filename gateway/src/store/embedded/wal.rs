//! The embedded store's write-ahead log: what makes a batch durable.
//!
//! A durable redb commit writes back every B-tree page touched since the
//! last one and fsyncs them; for a stream of small batches (a message
//! touches history, positions, idempotency keys and one inbox page per
//! recipient) that costs more than everything else the gateway does, and it
//! stalls whoever waits on it. So each batch is appended here as one record
//! and made durable with one `fdatasync` of the log's tail; redb's pages are
//! written back by periodic checkpoints (durable redb commits) that nobody
//! waits on. Opening a store replays the records its last checkpoint does
//! not include.
//!
//! The log is two fixed-size files used in turn: appends go to the active
//! one; once it is half full and the other one holds nothing the last
//! checkpoint lacks, the other one becomes active and starts over from its
//! beginning. A file is never reused while it holds a record a checkpoint
//! has not covered, so the log can always be replayed; if checkpoints fall
//! behind, the active file simply grows.
//!
//! Record: `len: u32 | crc32(seq ‖ payload): u32 | seq: u64 | payload`, all
//! little-endian. Within a file records carry consecutive sequence numbers;
//! reading a file stops at the first record that is torn (bad length or
//! checksum) or out of sequence, which is how the end of a file that started
//! over on top of older records is found. The files are created at their
//! full size, so an append never changes the file's length.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Bytes reserved for each of the two log files (sparse until written).
/// Half of one is the most a restart replays (about 150,000 one-to-one
/// messages, a few seconds).
pub const FILE_BYTES: u64 = 128 * 1024 * 1024;

const HEADER: usize = 16;

/// One of the two files.
struct LogFile {
    file: File,
    /// Where the next record goes.
    offset: u64,
    /// The newest record written since the file last started over (0: none).
    last_seq: u64,
}

pub struct Wal {
    files: [LogFile; 2],
    active: usize,
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

/// The two files of the log whose names start with `base` (`base.0`, `base.1`).
pub fn paths(base: &Path) -> [PathBuf; 2] {
    let name = |n: u8| {
        let mut path = base.as_os_str().to_owned();
        path.push(format!(".{n}"));
        PathBuf::from(path)
    };
    [name(0), name(1)]
}

impl Wal {
    /// Opens (or creates) the log at `base` and returns the
    /// records newer than `applied` (the last sequence number the store's
    /// last checkpoint includes), in sequence order. The caller checkpoints
    /// them before appending anything, so both files start over.
    pub fn open(base: &Path, applied: u64) -> io::Result<(Self, Vec<Record>)> {
        let mut records = Vec::new();
        let mut files = Vec::with_capacity(2);
        for path in paths(base) {
            let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
            if file.metadata()?.len() < FILE_BYTES {
                file.set_len(FILE_BYTES)?;
                file.sync_all()?;
            }
            let mut bytes = Vec::new();
            file.seek(SeekFrom::Start(0))?;
            file.read_to_end(&mut bytes)?;
            records.extend(parse(&bytes));
            files.push(LogFile { file, offset: 0, last_seq: 0 });
        }
        records.sort_by_key(|r| r.seq);
        records.dedup_by_key(|r| r.seq);
        let next_seq = records.last().map_or(applied, |r| r.seq.max(applied)) + 1;
        let pending = records.into_iter().filter(|r| r.seq > applied).collect();
        let [first, second] = <[LogFile; 2]>::try_from(files).map_err(|_| io::Error::other("two log files"))?;
        Ok((Self { files: [first, second], active: 0, next_seq }, pending))
    }

    /// Sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
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
        let log = &mut self.files[self.active];
        log.file.seek(SeekFrom::Start(log.offset))?;
        log.file.write_all(&record)?;
        log.file.sync_data()?;
        log.offset += record.len() as u64;
        log.last_seq = seq;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Whether the active file is past half full: a checkpoint is wanted so
    /// that the other file can take over.
    pub fn wants_checkpoint(&self) -> bool {
        self.files[self.active].offset >= FILE_BYTES / 2
    }

    /// Records up to `durable` are in a checkpoint. Switches to the other
    /// file when the active one is past half full and the other one holds
    /// nothing newer.
    pub fn checkpointed(&mut self, durable: u64) {
        let other = 1 - self.active;
        if self.wants_checkpoint() && self.files[other].last_seq <= durable {
            self.active = other;
            self.files[other].offset = 0;
            self.files[other].last_seq = 0;
        }
    }

    /// Bytes in the active file.
    #[cfg(test)]
    pub fn active_len(&self) -> u64 {
        self.files[self.active].offset
    }
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

    fn seqs(records: &[Record]) -> Vec<(u64, Vec<u8>)> {
        records.iter().map(|r| (r.seq, r.payload.clone())).collect()
    }

    #[test]
    fn records_come_back_after_reopening_and_only_unapplied_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        let (mut wal, pending) = Wal::open(&base, 0).expect("open");
        assert!(pending.is_empty());
        for (n, payload) in [b"one".as_slice(), b"two", b"three"].into_iter().enumerate() {
            assert_eq!(wal.append(payload).expect("append"), n as u64 + 1);
        }
        drop(wal);
        let (mut wal, pending) = Wal::open(&base, 1).expect("reopen");
        assert_eq!(seqs(&pending), vec![(2, b"two".to_vec()), (3, b"three".to_vec())]);
        assert_eq!(wal.append(b"four").expect("append"), 4, "numbers go on after the newest record");
    }

    #[test]
    fn files_take_turns_only_once_checkpoints_cover_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&base, 0).expect("open");
        let big = vec![7_u8; usize::try_from(FILE_BYTES / 2).expect("fits")];
        assert_eq!(wal.append(&big).expect("fill half of file 0"), 1);
        assert!(wal.wants_checkpoint());
        wal.checkpointed(0); // nothing durable yet, but file 1 holds nothing: switch
        assert_eq!(wal.active_len(), 0);
        assert_eq!(wal.append(&big).expect("fill half of file 1"), 2);
        wal.checkpointed(0); // file 0 holds record 1, not yet checkpointed: stay
        assert!(wal.active_len() > 0, "file 0 is still needed");
        assert_eq!(wal.append(b"small").expect("append to the growing file 1"), 3);
        drop(wal);
        let (_, pending) = Wal::open(&base, 0).expect("reopen");
        assert_eq!(pending.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3], "nothing was overwritten");

        let (mut wal, _) = Wal::open(&base, 3).expect("reopen after a checkpoint of 1..=3");
        assert_eq!(wal.append(b"x").expect("append"), 4);
    }

    #[test]
    fn a_file_that_started_over_ends_where_its_sequence_breaks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&base, 0).expect("open");
        let half = vec![1_u8; usize::try_from(FILE_BYTES / 2).expect("fits")];
        wal.append(&half).expect("1 in file 0");
        wal.append(b"aaaaaaaa").expect("2 in file 0");
        wal.checkpointed(2); // switch to file 1
        wal.append(&half).expect("3 in file 1");
        wal.checkpointed(3); // switch back: file 0 starts over on top of 1 and 2
        assert_eq!(wal.append(b"dd").expect("append"), 4);
        drop(wal);
        let (_, pending) = Wal::open(&base, 3).expect("reopen");
        assert_eq!(seqs(&pending), vec![(4, b"dd".to_vec())], "old records behind the new one are not read");
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&base, 0).expect("open");
        wal.append(b"kept").expect("append");
        wal.append(b"torn record").expect("append");
        drop(wal);
        // Damage the second record's payload, as a crash mid-write would.
        let path = &paths(&base)[0];
        let mut bytes = std::fs::read(path).expect("read");
        let second = HEADER + 4 + HEADER;
        bytes[second + 2] ^= 0xFF;
        std::fs::write(path, &bytes).expect("write");
        let (mut wal, pending) = Wal::open(&base, 0).expect("reopen");
        assert_eq!(seqs(&pending), vec![(1, b"kept".to_vec())]);
        assert_eq!(wal.append(b"again").expect("append"), 2, "the torn record's number is used again");
    }
}
