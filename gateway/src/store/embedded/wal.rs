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
//! The log is two files used in turn: appends go to the active one; once it
//! is half full and the other one holds nothing the last checkpoint lacks,
//! the other one becomes active and starts over from its beginning. A file
//! is never reused while it holds a record a checkpoint has not covered, so
//! the log can always be replayed; if checkpoints fall behind, the active
//! file grows past its reserved size.
//!
//! # Format 2
//!
//! `kubechat.wal.0` and `kubechat.wal.1`, each created with [`FILE_BYTES`]
//! allocated (`fallocate`, so an append never allocates space nor finds the
//! disk full), then the directory fsynced. Each starts with a
//! [`HEADER_BYTES`] header (integers little-endian):
//! `"KCHATWAL" | format: u32 | crc32(format ‖ the rest): u32 | store: u64 |
//! run: u64 | first_seq: u64`, where
//! - `store` is the store's id (random, kept in the database's `meta`), so
//!   the log of another store is never replayed into this one;
//! - `run` counts the store's opens (`meta.log_run` holds the last): each
//!   open starts a file over under its run before the database records the
//!   run, so the database's run is always in one of its log files, and log
//!   files that lack it were replaced (by older copies, say);
//! - `first_seq` is the number the file's first record got when it last
//!   started over (0: none yet).
//!
//! Records follow from [`HEADER_BYTES`], each
//! `len: u32 | crc32(seq ‖ payload): u32 | seq: u64 | payload`, padded with
//! zeros to a multiple of 8 bytes. A file's records carry consecutive
//! numbers from `first_seq`; reading stops at the first that is torn (bad
//! length or checksum) or out of sequence, which is where the file ends
//! (past it: zeros, a record torn by a crash, or older records).
//!
//! # Opening
//!
//! Before anything is replayed or written, opening checks that the log
//! continues the database exactly, and refuses with a [`LogError`] (naming
//! the file and what to do) when it does not: a file shorter than it was
//! created (truncated); a header that is damaged, of a newer format or of
//! another store; files without the database's last run (replaced); a
//! damaged record with valid records of a later number behind it (damage,
//! not a torn end); two different records with one number; a missing
//! number among the records after the last checkpoint (a gap); one file
//! missing while the other holds records. Nothing is checkpointed then, so
//! a repaired log replays in full. Removing both files starts a new log:
//! the way to start without a damaged log, losing what it held.
//!
//! Earlier formats are read once, replayed and converted: format 1 (the
//! same two files without a header, records unpadded) and format 0 (one
//! file, `kubechat.wal`, whose push-queue writes were encoded differently);
//! the latter is removed once replayed. A format 0 file beside the two
//! files was left by a version that ignored it, and is refused.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Bytes allocated for each of the store's two log files when they are
/// created. Half of one is the most a restart replays (about 150,000
/// one-to-one messages, a few seconds). [`recover`] takes the size, so this
/// module's tests run on small files (an open scans both files whole).
pub const FILE_BYTES: u64 = 128 * 1024 * 1024;

/// The log format this version writes (and the newest it reads).
pub const FORMAT: u32 = 2;

/// Bytes before a file's first record: the header, alone in its block, so
/// rewriting it never touches a record.
pub const HEADER_BYTES: u64 = 4096;

const MAGIC: &[u8; 8] = b"KCHATWAL";
/// The header's fields: magic, format, checksum, store, run, first_seq.
const HEADER_FIELDS: usize = 40;
const RECORD_HEADER: usize = 16;
/// Format 2 records start at multiples of this.
const ALIGN: usize = 8;
/// Scanned for records a page at a time (never-written space is zeros).
const PAGE: usize = 4096;

/// What to do with a log that cannot be replayed, in every such error.
const WAYS_OUT: &str = "restore the log files as they were; or, to start without the writes they hold (lost), \
                        move kubechat.wal.0 and kubechat.wal.1 out of the data directory";

/// Why the log cannot be opened. Every kind but `Io` means the log does
/// not continue the database: acknowledged writes would be lost.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is {len} bytes, but log files are created with {expected}: it was truncated, and acknowledged \
         writes past the cut may be lost; {WAYS_OUT}",
        path.display()
    )]
    Truncated { path: PathBuf, len: u64, expected: u64 },
    #[error(
        "{} has log format {found}, newer than this version reads ({FORMAT}): run the version that wrote it",
        path.display()
    )]
    NewerFormat { path: PathBuf, found: u32 },
    #[error("the header of {} is damaged; {WAYS_OUT}", path.display())]
    DamagedHeader { path: PathBuf },
    #[error(
        "{} belongs to another store (store {found:016x}; this database is store {expected:016x}); {WAYS_OUT}",
        path.display()
    )]
    OtherStore { path: PathBuf, found: u64, expected: u64 },
    #[error(
        "log record {seq} in {} (byte {offset}) is damaged or missing, and record {later} follows it: \
         acknowledged writes would be lost; {WAYS_OUT}",
        path.display()
    )]
    Damaged { path: PathBuf, seq: u64, offset: u64, later: u64 },
    #[error("{} and {} hold different records numbered {seq}; {WAYS_OUT}", first.display(), second.display())]
    Conflict { seq: u64, first: PathBuf, second: PathBuf },
    #[error(
        "the log lacks records {from} to {to}, which the database's last checkpoint (record {applied}) does not \
         include: acknowledged writes would be lost; {WAYS_OUT}"
    )]
    Gap { applied: u64, from: u64, to: u64 },
    #[error(
        "the log files were not written by the database's last run (run {expected}; the files': {found:?}): \
         they were replaced, by older copies perhaps, and that run's writes would be lost; {WAYS_OUT}"
    )]
    Replaced { expected: u64, found: Vec<u64> },
    #[error("{} is missing while {} holds log records; {WAYS_OUT}", path.display(), other.display())]
    Missing { path: PathBuf, other: PathBuf },
    #[error(
        "{} is the log of an earlier kubechat (one file), left beside the current log by a version that did not \
         read it: writes in it that were not checkpointed then are lost, and it cannot be replayed now; check it, \
         then move it out of the data directory",
        path.display()
    )]
    EarlierLogBeside { path: PathBuf },
}

fn io_error(context: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LogError {
    let path = path.to_path_buf();
    move |source| LogError::Io { context, path, source }
}

/// A record read back when the store opens.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub payload: Vec<u8>,
    /// The log format it was read from (format 0 encoded some writes differently).
    pub format: u32,
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

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// A file's header.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Header {
    store: u64,
    run: u64,
    first_seq: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_FIELDS] {
        let mut out = [0_u8; HEADER_FIELDS];
        out[..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&FORMAT.to_le_bytes());
        out[16..24].copy_from_slice(&self.store.to_le_bytes());
        out[24..32].copy_from_slice(&self.run.to_le_bytes());
        out[32..40].copy_from_slice(&self.first_seq.to_le_bytes());
        let crc = Self::checksum(&out);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn checksum(bytes: &[u8]) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&bytes[8..12]);
        hasher.update(&bytes[16..HEADER_FIELDS]);
        hasher.finalize()
    }

    /// The header at the start of `bytes` (which start with the magic).
    fn decode(path: &Path, bytes: &[u8]) -> Result<Self, LogError> {
        let damaged = || LogError::DamagedHeader { path: path.to_path_buf() };
        let format = u32_at(bytes, 8).ok_or_else(damaged)?;
        if format > FORMAT {
            return Err(LogError::NewerFormat { path: path.to_path_buf(), found: format });
        }
        let fields = bytes.get(..HEADER_FIELDS).ok_or_else(damaged)?;
        if format != FORMAT || u32_at(fields, 12) != Some(Self::checksum(fields)) {
            return Err(damaged());
        }
        Ok(Self {
            store: u64_at(fields, 16).ok_or_else(damaged)?,
            run: u64_at(fields, 24).ok_or_else(damaged)?,
            first_seq: u64_at(fields, 32).ok_or_else(damaged)?,
        })
    }

    /// Writes it over the start of `file` and makes it durable.
    fn write(&self, file: &mut File, path: &Path) -> Result<(), LogError> {
        file.seek(SeekFrom::Start(0)).map_err(io_error("writing the header of", path))?;
        file.write_all(&self.encode()).map_err(io_error("writing the header of", path))?;
        file.sync_data().map_err(io_error("syncing the header of", path))
    }
}

/// A log file read a window at a time: a file is 128 MiB, mostly zeros,
/// and a restart reads both; held whole they were the gateway's peak memory
/// (140 MB for a process that runs in 13).
struct Window {
    file: File,
    len: u64,
    /// `buf` holds the file's bytes from `start`.
    start: u64,
    buf: Vec<u8>,
}

/// Bytes read at a time (one record longer than this is read whole).
const WINDOW_BYTES: usize = 1024 * 1024;

impl Window {
    fn open(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self { file, len, start: 0, buf: Vec::new() })
    }

    /// The `len` bytes at `at`; `None` past the end of the file.
    fn get(&mut self, at: u64, len: usize) -> io::Result<Option<&[u8]>> {
        let Some(end) = at.checked_add(len as u64).filter(|end| *end <= self.len) else { return Ok(None) };
        let held = self.start + self.buf.len() as u64;
        if at < self.start || end > held {
            use std::os::unix::fs::FileExt;
            let wanted = usize::try_from((self.len - at).min(WINDOW_BYTES.max(len) as u64)).unwrap_or(len);
            self.buf.resize(wanted, 0);
            self.file.read_exact_at(&mut self.buf, at)?;
            self.start = at;
        }
        let from = usize::try_from(at - self.start).unwrap_or(0);
        Ok(Some(&self.buf[from..from + len]))
    }

    fn u64_at(&mut self, at: u64) -> io::Result<Option<u64>> {
        Ok(self.get(at, 8)?.and_then(|b| u64_at(b, 0)))
    }
}

/// The record at `at` if it is whole: its number and its payload.
fn record_at(window: &mut Window, at: u64) -> io::Result<Option<(u64, Vec<u8>)>> {
    let Some(header) = window.get(at, RECORD_HEADER)? else { return Ok(None) };
    let (Some(len), Some(crc), Some(seq)) = (u32_at(header, 0), u32_at(header, 4), u64_at(header, 8)) else {
        return Ok(None);
    };
    if len == 0 {
        return Ok(None);
    }
    let Some(payload) = window.get(at + RECORD_HEADER as u64, len as usize)? else { return Ok(None) };
    Ok((checksum(seq, payload) == crc).then(|| (seq, payload.to_vec())))
}

/// The records from `start` with consecutive numbers (from `first` if
/// given), each `align`ed, and where reading stopped. Records up to
/// `applied` are in the database already: only their numbers are kept.
fn parse(
    window: &mut Window,
    start: u64,
    first: Option<u64>,
    align: usize,
    format: u32,
    applied: u64,
) -> io::Result<(Vec<Record>, u64)> {
    let mut records: Vec<Record> = Vec::new();
    let mut at = start;
    while let Some((seq, payload)) = record_at(window, at)? {
        let expected = records.last().map(|r| r.seq + 1).or(first);
        if expected.is_some_and(|expected| expected != seq) {
            break;
        }
        at += (RECORD_HEADER + payload.len()).next_multiple_of(align) as u64;
        let payload = if seq > applied { payload } else { Vec::new() };
        records.push(Record { seq, payload, format });
    }
    Ok((records, at))
}

/// The number of a whole record numbered `min_seq` or later that starts at
/// `from` or after (at multiples of `step`), if any: if the log went on
/// past where reading stopped, the records in between are damaged.
fn later_record(window: &mut Window, from: u64, min_seq: u64, step: usize) -> io::Result<Option<u64>> {
    // No file holds more records than that: bounds what counts as a number.
    let max_seq = min_seq.saturating_add(window.len / RECORD_HEADER as u64);
    let (page, step) = (PAGE as u64, step as u64);
    let mut at = from;
    while at + RECORD_HEADER as u64 <= window.len {
        let page_end = ((at / page) + 1) * page;
        let this_page = usize::try_from(page_end.min(window.len) - at).unwrap_or(0);
        // Space never written is zeros, and no record starts there.
        if window.get(at, this_page)?.is_some_and(|bytes| bytes.iter().all(|b| *b == 0)) {
            at = page_end.next_multiple_of(step);
            continue;
        }
        while at < page_end && at + RECORD_HEADER as u64 <= window.len {
            let candidate = window.u64_at(at + 8)?.filter(|seq| (min_seq..=max_seq).contains(seq));
            if let Some(seq) = candidate
                && record_at(window, at)?.is_some()
            {
                return Ok(Some(seq));
            }
            at += step;
        }
    }
    Ok(None)
}

/// What one of the two files holds.
struct Found {
    path: PathBuf,
    /// `None`: format 1, no header.
    header: Option<Header>,
    records: Vec<Record>,
    /// Its newest record (0: none).
    newest: u64,
}

/// Reads a log file (`None` if missing) and checks it on its own.
fn read_file(path: &Path, file_bytes: u64, applied: u64, store: u64) -> Result<Option<Found>, LogError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(io_error("reading", path)(err)),
    };
    let reading = |source| LogError::Io { context: "reading", path: path.to_path_buf(), source };
    let mut window = Window::open(file).map_err(reading)?;
    if window.len < file_bytes {
        return Err(LogError::Truncated { path: path.to_path_buf(), len: window.len, expected: file_bytes });
    }
    let start = window.get(0, HEADER_FIELDS).map_err(reading)?.map(<[u8]>::to_vec).unwrap_or_default();
    let (header, records, stop, step) = if start.starts_with(MAGIC) {
        let header = Header::decode(path, &start)?;
        if header.store != store {
            return Err(LogError::OtherStore { path: path.to_path_buf(), found: header.store, expected: store });
        }
        let (records, stop) =
            parse(&mut window, HEADER_BYTES, Some(header.first_seq), ALIGN, FORMAT, applied).map_err(reading)?;
        (Some(header), records, stop, ALIGN)
    } else {
        let (records, stop) = parse(&mut window, 0, None, 1, 1, applied).map_err(reading)?;
        (None, records, stop, 1)
    };
    check_end(path, &mut window, &records, stop, header.map_or(0, |h| h.first_seq), applied, step)?;
    let newest = records.last().map_or(0, |r| r.seq);
    Ok(Some(Found { path: path.to_path_buf(), header, records, newest }))
}

/// Where reading a file stopped must be its end: a later record behind it
/// means the records in between are damaged. Records numbered up to
/// `applied` are in the database, and older rounds of the file hold only
/// such records, so only later numbers count.
fn check_end(
    path: &Path,
    window: &mut Window,
    records: &[Record],
    stop: u64,
    first_seq: u64,
    applied: u64,
    step: usize,
) -> Result<(), LogError> {
    let next = records.last().map_or(first_seq, |r| r.seq + 1);
    match later_record(window, stop, next.max(applied + 1), step).map_err(io_error("reading", path))? {
        Some(later) => Err(LogError::Damaged { path: path.to_path_buf(), seq: next, offset: stop, later }),
        None => Ok(()),
    }
}

/// The log as found when the store opens, checked against the database.
pub struct Recovery {
    base: PathBuf,
    file_bytes: u64,
    found: [Option<Found>; 2],
    /// A format 0 log, removed once its records are checkpointed.
    single: Option<PathBuf>,
    /// The database's last run.
    last_run: u64,
    /// The records newer than the database's last checkpoint, in order.
    pub pending: Vec<Record>,
}

/// Reads the log at `base` (`base.0`, `base.1`, or a format 0 `base`),
/// whose files are created with `file_bytes` (the store's: [`FILE_BYTES`]),
/// for a database whose last checkpoint includes record `applied`, whose
/// store id is `store` and whose last run was `last_run` (0: none recorded).
/// Fails unless the log continues that database exactly (module docs).
pub fn recover(base: &Path, file_bytes: u64, applied: u64, store: u64, last_run: u64) -> Result<Recovery, LogError> {
    let [first, second] = paths(base);
    let mut found = [read_file(&first, file_bytes, applied, store)?, read_file(&second, file_bytes, applied, store)?];
    let single = match std::fs::metadata(base) {
        Ok(_) if found.iter().any(Option::is_some) => {
            return Err(LogError::EarlierLogBeside { path: base.to_path_buf() });
        }
        Ok(_) => Some(base.to_path_buf()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => return Err(io_error("reading", base)(err)),
    };
    match &found {
        [None, Some(present)] | [Some(present), None] if present.newest > 0 => {
            let path = if found[0].is_none() { first } else { second };
            return Err(LogError::Missing { path, other: present.path.clone() });
        }
        _ => {}
    }
    if last_run > 0 && found.iter().any(Option::is_some) {
        let runs: Vec<u64> = found.iter().flatten().filter_map(|f| f.header.map(|h| h.run)).collect();
        if !runs.contains(&last_run) {
            return Err(LogError::Replaced { expected: last_run, found: runs });
        }
    }

    let mut records: Vec<(Record, PathBuf)> = Vec::new();
    for file in found.iter_mut().flatten() {
        records.extend(std::mem::take(&mut file.records).into_iter().map(|r| (r, file.path.clone())));
    }
    if let Some(path) = &single {
        let reading = |source| LogError::Io { context: "reading", path: path.to_path_buf(), source };
        let mut window = File::open(path).and_then(Window::open).map_err(reading)?;
        let (from_single, stop) = parse(&mut window, 0, None, 1, 0, applied).map_err(reading)?;
        check_end(path, &mut window, &from_single, stop, 0, applied, 1)?;
        records.extend(from_single.into_iter().map(|r| (r, path.clone())));
    }
    records.sort_by_key(|(r, _)| r.seq);
    let mut pending: Vec<(Record, PathBuf)> = Vec::new();
    for (record, path) in records.into_iter().filter(|(r, _)| r.seq > applied) {
        match pending.last() {
            // The same record in both files (a copy) is harmless; two different ones are not.
            Some((last, first)) if last.seq == record.seq => {
                if last.payload != record.payload {
                    return Err(LogError::Conflict { seq: record.seq, first: first.clone(), second: path });
                }
            }
            _ => pending.push((record, path)),
        }
    }
    for (expected, (record, _)) in (applied + 1..).zip(&pending) {
        if record.seq != expected {
            return Err(LogError::Gap { applied, from: expected, to: record.seq - 1 });
        }
    }
    if found.iter().all(Option::is_none) && single.is_none() && (applied > 0 || last_run > 0) {
        tracing::warn!(
            base = %base.display(),
            checkpoint = applied,
            "the store's log files are missing: starting a new log (writes acknowledged after the last \
             checkpoint are lost if the gateway did not stop cleanly)"
        );
    }
    Ok(Recovery {
        base: base.to_path_buf(),
        file_bytes,
        found,
        single,
        last_run,
        pending: pending.into_iter().map(|(r, _)| r).collect(),
    })
}

/// Reserves `len` bytes for `file`, so writes within them never allocate.
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => return Ok(()),
        // Not every filesystem can: writing zeros reserves the space too.
        Err(rustix::io::Errno::OPNOTSUPP) => {}
        Err(err) => return Err(err.into()),
    }
    let mut file = file;
    let start = file.metadata()?.len();
    file.seek(SeekFrom::Start(start))?;
    let chunk = vec![0_u8; 1024 * 1024];
    let mut at = start;
    while at < len {
        let n = usize::try_from(len - at).map_or(chunk.len(), |left| left.min(chunk.len()));
        file.write_all(&chunk[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// Makes the creation, renaming or removal of files in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("syncing the directory", dir))
}

/// Creates a log file with its space allocated and a header saying it
/// holds nothing yet; it appears under `path` only once complete.
fn create(path: &Path, header: Header, file_bytes: u64) -> Result<File, LogError> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    let created = (|| {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temporary)
            .map_err(io_error("creating", &temporary))?;
        preallocate(&file, file_bytes).map_err(io_error("allocating the space of", &temporary))?;
        header.write(&mut file, &temporary)?;
        file.sync_all().map_err(io_error("syncing", &temporary))?;
        std::fs::rename(&temporary, path).map_err(io_error("renaming into place", &temporary))?;
        Ok(file)
    })();
    if created.is_err() {
        // Give back the space of a file that will be created again anyway.
        let _ = std::fs::remove_file(&temporary);
    }
    created
}

impl Recovery {
    /// Once the pending records are checkpointed (the newest record is now
    /// `newest`): removes a format 0 file, creates missing files and
    /// converts format 1 ones, and starts one file over under `run`, which
    /// the caller then records in the database. Returns the log, ready to
    /// append record `newest + 1`.
    pub fn start(self, newest: u64, store: u64, run: u64) -> Result<Wal, LogError> {
        let dir = self.base.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        if let Some(single) = &self.single {
            std::fs::remove_file(single).map_err(io_error("removing the replayed", single))?;
            sync_dir(&dir)?;
        }
        let empty = Header { store, run, first_seq: 0 };
        let mut changed_dir = false;
        let mut files = Vec::with_capacity(2);
        for (path, found) in paths(&self.base).into_iter().zip(self.found) {
            let (file, newest_in_file, file_run) = match found {
                None => {
                    changed_dir = true;
                    (create(&path, empty, self.file_bytes)?, 0, run)
                }
                Some(found) => {
                    let mut file =
                        OpenOptions::new().read(true).write(true).open(&path).map_err(io_error("opening", &path))?;
                    let file_run = match found.header {
                        Some(header) => header.run,
                        None => {
                            // Format 1: its records are all checkpointed now.
                            preallocate(&file, self.file_bytes).map_err(io_error("allocating the space of", &path))?;
                            empty.write(&mut file, &path)?;
                            run
                        }
                    };
                    (file, found.newest, file_run)
                }
            };
            files.push(LogFile { file, path, offset: HEADER_BYTES, last_seq: newest_in_file, run: file_run });
        }
        if changed_dir {
            sync_dir(&dir)?;
        }
        let [first, second] = <[LogFile; 2]>::try_from(files).map_err(|_| LogError::Io {
            context: "opening",
            path: self.base.clone(),
            source: io::Error::other("two log files"),
        })?;
        // Start over a file that does not hold the database's last run,
        // so that run stays on disk until the database records this one.
        let proves = |f: &LogFile| self.last_run > 0 && f.run == self.last_run;
        let active = match (proves(&first), proves(&second)) {
            (true, false) => 1,
            (false, true) => 0,
            _ => usize::from(second.last_seq < first.last_seq),
        };
        let mut wal =
            Wal { files: [first, second], file_bytes: self.file_bytes, active, next_seq: newest + 1, store, run };
        wal.start_over(active)?;
        Ok(wal)
    }
}

/// One of the two files.
struct LogFile {
    file: File,
    path: PathBuf,
    /// Where the next record goes.
    offset: u64,
    /// The newest record written since the file last started over (0: none).
    last_seq: u64,
    /// The run that last started it over.
    run: u64,
}

/// The log, appending.
pub struct Wal {
    files: [LogFile; 2],
    /// Each file's allocated size; past half of it, a checkpoint is wanted.
    file_bytes: u64,
    active: usize,
    next_seq: u64,
    store: u64,
    run: u64,
}

impl Wal {
    /// Sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends a record and returns once it is durable; its sequence number.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<u64> {
        let seq = self.next_seq;
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "log record over 4 GiB"))?;
        let mut record = Vec::with_capacity((RECORD_HEADER + payload.len()).next_multiple_of(ALIGN));
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&checksum(seq, payload).to_le_bytes());
        record.extend_from_slice(&seq.to_le_bytes());
        record.extend_from_slice(payload);
        record.resize(record.len().next_multiple_of(ALIGN), 0);
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
        self.files[self.active].offset >= self.file_bytes / 2
    }

    /// Records up to `durable` are in a checkpoint. Switches to the other
    /// file when the active one is past half full and the other one holds
    /// nothing newer (an error leaves the active file in use).
    pub fn checkpointed(&mut self, durable: u64) -> Result<(), LogError> {
        let other = 1 - self.active;
        if self.wants_checkpoint() && self.files[other].last_seq <= durable {
            self.start_over(other)?;
        }
        Ok(())
    }

    /// Makes file `n` the active one, empty: its header says its records
    /// start at the next number, so what it held before is not read back.
    fn start_over(&mut self, n: usize) -> Result<(), LogError> {
        let header = Header { store: self.store, run: self.run, first_seq: self.next_seq };
        let log = &mut self.files[n];
        header.write(&mut log.file, &log.path)?;
        log.offset = HEADER_BYTES;
        log.last_seq = 0;
        log.run = self.run;
        self.active = n;
        Ok(())
    }

    /// Bytes of records in the active file.
    #[cfg(test)]
    pub fn active_len(&self) -> u64 {
        self.files[self.active].offset - HEADER_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STORE: u64 = 7;
    /// Small files: an open reads both whole (128 MiB each in the store).
    const FILE_BYTES: u64 = 8 * 1024 * 1024;

    /// Opens the log as the store does for a database whose checkpoint
    /// includes `applied` and whose last run is `last_run`: the records to
    /// replay, and the log once they are (as if) checkpointed.
    type Pending = Vec<(u64, Vec<u8>)>;

    fn open(base: &Path, applied: u64, last_run: u64) -> Result<(Wal, Pending), LogError> {
        let recovery = recover(base, FILE_BYTES, applied, STORE, last_run)?;
        let pending: Pending = recovery.pending.iter().map(|r| (r.seq, r.payload.clone())).collect();
        let newest = pending.last().map_or(applied, |(seq, _)| *seq);
        Ok((recovery.start(newest, STORE, last_run + 1)?, pending))
    }

    fn seqs(pending: &[(u64, Vec<u8>)]) -> Vec<u64> {
        pending.iter().map(|(seq, _)| *seq).collect()
    }

    /// A record as formats 0 and 1 wrote it (unpadded).
    fn unpadded(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_le_bytes());
        out.extend_from_slice(&checksum(seq, payload).to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn half_file() -> Vec<u8> {
        vec![7_u8; usize::try_from(FILE_BYTES / 2).expect("fits")]
    }

    #[test]
    fn records_come_back_after_reopening_and_only_unapplied_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        let (mut wal, pending) = open(&base, 0, 0).expect("open");
        assert!(pending.is_empty());
        for (n, payload) in [b"one".as_slice(), b"two", b"three"].into_iter().enumerate() {
            assert_eq!(wal.append(payload).expect("append"), n as u64 + 1);
        }
        drop(wal);
        let (mut wal, pending) = open(&base, 1, 1).expect("reopen");
        assert_eq!(pending, vec![(2, b"two".to_vec()), (3, b"three".to_vec())]);
        assert_eq!(wal.append(b"four").expect("append"), 4, "numbers go on after the newest record");
        drop(wal);
        let (_, pending) = open(&base, 3, 2).expect("reopen again");
        assert_eq!(pending, vec![(4, b"four".to_vec())]);
    }

    /// The files are read a window at a time: records on both sides of
    /// window boundaries, of odd lengths, come back whole and in order.
    #[test]
    fn records_across_read_windows_come_back_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        let (mut wal, _) = open(&base, 0, 0).expect("open");
        let payload = |n: u64| vec![u8::try_from(n % 251).expect("small"); 1000 + (n as usize * 37) % 3001];
        let count = 2 * (WINDOW_BYTES / 2000) as u64 + 50;
        for n in 1..=count {
            assert_eq!(wal.append(&payload(n)).expect("append"), n);
        }
        drop(wal);
        let (_, pending) = open(&base, 10, 1).expect("reopen");
        assert_eq!(seqs(&pending), (11..=count).collect::<Vec<_>>());
        for (seq, bytes) in &pending {
            assert_eq!(*bytes, payload(*seq), "record {seq}");
        }
    }

    #[test]
    fn created_files_have_their_space_allocated_and_a_header() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        drop(open(&base, 0, 0).expect("open"));
        for path in paths(&base) {
            let meta = std::fs::metadata(&path).expect("file");
            assert_eq!(meta.len(), FILE_BYTES);
            assert!(meta.blocks() * 512 >= FILE_BYTES, "{} allocated of {FILE_BYTES}", meta.blocks() * 512);
            let bytes = std::fs::read(&path).expect("read");
            assert_eq!(Header::decode(&path, &bytes).expect("header").store, STORE);
        }
        assert!(!dir.path().join("wal.0.new").exists());
    }

    #[test]
    fn files_take_turns_only_once_checkpoints_cover_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        let (mut wal, _) = open(&base, 0, 0).expect("open");
        let active = wal.active;
        assert_eq!(wal.append(&half_file()).expect("fill half of the active file"), 1);
        assert!(wal.wants_checkpoint());
        wal.checkpointed(0).expect("switch"); // nothing durable yet, but the other file holds nothing: switch
        assert_eq!((wal.active, wal.active_len()), (1 - active, 0));
        assert_eq!(wal.append(&half_file()).expect("fill half of the other"), 2);
        wal.checkpointed(0).expect("stay"); // the first file holds record 1, not yet checkpointed: stay
        assert!(wal.active_len() > 0, "the first file is still needed");
        assert_eq!(wal.append(b"small").expect("append to the growing file"), 3);
        drop(wal);
        let (_, pending) = open(&base, 0, 1).expect("reopen");
        assert_eq!(seqs(&pending), vec![1, 2, 3], "nothing was overwritten");
    }

    #[test]
    fn a_file_that_started_over_ends_where_its_sequence_breaks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        let (mut wal, _) = open(&base, 0, 0).expect("open");
        let first = wal.active;
        wal.append(&half_file()).expect("1");
        wal.append(b"aaaaaaaa").expect("2");
        wal.checkpointed(2).expect("switch");
        wal.append(&half_file()).expect("3");
        wal.checkpointed(3).expect("switch back: the first file starts over on top of 1 and 2");
        assert_eq!(wal.active, first);
        assert_eq!(wal.append(b"dd").expect("append"), 4);
        drop(wal);
        let (_, pending) = open(&base, 3, 1).expect("reopen");
        assert_eq!(pending, vec![(4, b"dd".to_vec())], "old records behind the new one are not read");
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        let (mut wal, _) = open(&base, 0, 0).expect("open");
        let path = wal.files[wal.active].path.clone();
        wal.append(b"kept").expect("append");
        wal.append(b"torn record").expect("append");
        drop(wal);
        // The last record cut short, as a crash mid-write leaves it.
        let mut bytes = std::fs::read(&path).expect("read");
        let second = HEADER_BYTES as usize + (RECORD_HEADER + 4).next_multiple_of(ALIGN);
        bytes[second + RECORD_HEADER + 2..second + RECORD_HEADER + 11].fill(0);
        std::fs::write(&path, &bytes).expect("write");
        let (mut wal, pending) = open(&base, 0, 1).expect("reopen");
        assert_eq!(pending, vec![(1, b"kept".to_vec())]);
        assert_eq!(wal.append(b"again").expect("append"), 2, "the torn record's number is used again");
    }

    #[test]
    fn a_damaged_record_with_later_records_behind_it_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        let (mut wal, _) = open(&base, 0, 0).expect("open");
        let path = wal.files[wal.active].path.clone();
        for payload in [b"one".as_slice(), b"two", b"three"] {
            wal.append(payload).expect("append");
        }
        drop(wal);
        let original = std::fs::read(&path).expect("read");
        let second = HEADER_BYTES as usize + (RECORD_HEADER + 3).next_multiple_of(ALIGN);
        // Its payload, then its length (which hides where the next one starts).
        for at in [second + RECORD_HEADER + 1, second] {
            let mut bytes = original.clone();
            bytes[at] ^= 0x10;
            std::fs::write(&path, &bytes).expect("damage");
            match open(&base, 0, 1) {
                Err(LogError::Damaged { seq: 2, later: 3, offset, .. }) => assert_eq!(offset, second as u64),
                Err(other) => panic!("damage at byte {at}: {other}"),
                Ok(_) => panic!("damage at byte {at} was read as the end of the log"),
            }
        }
        // Checkpointed records may be damaged: nothing acknowledged is lost.
        std::fs::write(&path, &original).expect("restore");
        let mut bytes = original.clone();
        bytes[HEADER_BYTES as usize + RECORD_HEADER] ^= 0x10;
        std::fs::write(&path, &bytes).expect("damage record 1");
        let (_, pending) = open(&base, 3, 1).expect("records up to 3 are in the database");
        assert!(pending.is_empty());
    }

    #[test]
    fn a_gap_after_the_checkpoint_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        // A log whose records start at 11 (say the database's checkpoint was at 10)...
        let (mut wal, _) = open(&base, 10, 0).expect("open");
        wal.append(b"eleven").expect("11");
        wal.append(b"twelve").expect("12");
        drop(wal);
        // ...against a database whose checkpoint includes only record 5.
        match open(&base, 5, 1) {
            Err(LogError::Gap { applied: 5, from: 6, to: 10 }) => {}
            Err(other) => panic!("{other}"),
            Ok((_, pending)) => panic!("replayed {:?} over a gap", seqs(&pending)),
        }
    }

    #[test]
    fn logs_of_another_store_or_an_earlier_run_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        let (mut wal, _) = open(&base, 0, 0).expect("open: run 1");
        wal.append(b"one").expect("append");
        drop(wal);
        let older: Vec<Vec<u8>> = paths(&base).iter().map(|p| std::fs::read(p).expect("copy")).collect();
        let (mut wal, _) = open(&base, 0, 1).expect("run 2 replays 1");
        wal.append(b"two").expect("append");
        drop(wal);

        match recover(&base, FILE_BYTES, 1, STORE + 1, 2) {
            Err(LogError::OtherStore { found: STORE, .. }) => {}
            other => panic!("{:?}", other.err()),
        }
        for (path, bytes) in paths(&base).iter().zip(&older) {
            std::fs::write(path, bytes).expect("replace by the older copy");
        }
        match recover(&base, FILE_BYTES, 1, STORE, 2) {
            Err(LogError::Replaced { expected: 2, found }) => assert_eq!(found, vec![1, 1]),
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn a_newer_format_a_damaged_header_and_a_truncated_file_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        drop(open(&base, 0, 0).expect("open"));
        let path = paths(&base)[0].clone();
        let original = std::fs::read(&path).expect("read");

        let mut newer = original.clone();
        newer[8..12].copy_from_slice(&(FORMAT + 1).to_le_bytes());
        std::fs::write(&path, &newer).expect("write");
        assert!(matches!(recover(&base, FILE_BYTES, 0, STORE, 1), Err(LogError::NewerFormat { found: 3, .. })));

        let mut damaged = original.clone();
        damaged[30] ^= 1;
        std::fs::write(&path, &damaged).expect("write");
        assert!(matches!(recover(&base, FILE_BYTES, 0, STORE, 1), Err(LogError::DamagedHeader { .. })));

        std::fs::write(&path, &original[..1000]).expect("write");
        assert!(matches!(
            recover(&base, FILE_BYTES, 0, STORE, 1),
            Err(LogError::Truncated { len: 1000, expected: FILE_BYTES, .. })
        ));
    }

    #[test]
    fn one_missing_file_is_refused_while_the_other_holds_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        let (mut wal, _) = open(&base, 0, 0).expect("open");
        let (holding, other) = (wal.files[wal.active].path.clone(), wal.files[1 - wal.active].path.clone());
        wal.append(b"one").expect("append");
        drop(wal);
        std::fs::remove_file(&other).expect("remove the empty one");
        match recover(&base, FILE_BYTES, 0, STORE, 1) {
            Err(LogError::Missing { path, other }) => {
                assert_eq!((path, other), (paths(&base)[1].clone(), holding.clone()))
            }
            other => panic!("{:?}", other.err()),
        }
        // Both gone: a new log (the way to start without a damaged one).
        std::fs::remove_file(&holding).expect("remove");
        let (_, pending) = open(&base, 0, 1).expect("a new log");
        assert!(pending.is_empty());
    }

    #[test]
    fn two_files_without_a_header_are_replayed_then_converted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        let [first, second] = paths(&base);
        // Format 1 (sparse, full length): records 1 and 2, then 3 in the other file.
        let mut bytes = unpadded(1, b"one");
        bytes.extend(unpadded(2, b"two"));
        std::fs::write(&first, &bytes).expect("write");
        std::fs::write(&second, unpadded(3, b"three")).expect("write");
        for path in [&first, &second] {
            OpenOptions::new().write(true).open(path).and_then(|f| f.set_len(FILE_BYTES)).expect("length");
        }
        let recovery = recover(&base, FILE_BYTES, 1, STORE, 0).expect("read format 1");
        assert_eq!(recovery.pending.iter().map(|r| (r.seq, r.format)).collect::<Vec<_>>(), vec![(2, 1), (3, 1)]);
        let mut wal = recovery.start(3, STORE, 1).expect("converted");
        assert_eq!(wal.append(b"four").expect("append"), 4);
        drop(wal);
        for path in [&first, &second] {
            let bytes = std::fs::read(path).expect("read");
            assert_eq!(Header::decode(path, &bytes).expect("a header now").run, 1);
        }
        let (_, pending) = open(&base, 3, 1).expect("format 2 now");
        assert_eq!(pending, vec![(4, b"four".to_vec())]);
    }

    #[test]
    fn a_one_file_log_is_replayed_then_removed_and_refused_beside_the_two_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("wal");
        let mut bytes = unpadded(1, b"one");
        bytes.extend(unpadded(2, b"two"));
        std::fs::write(&base, &bytes).expect("write format 0");
        let recovery = recover(&base, FILE_BYTES, 0, STORE, 0).expect("read format 0");
        assert_eq!(recovery.pending.iter().map(|r| (r.seq, r.format)).collect::<Vec<_>>(), vec![(1, 0), (2, 0)]);
        let mut wal = recovery.start(2, STORE, 1).expect("start");
        assert!(!base.exists(), "removed once replayed");
        assert_eq!(wal.append(b"three").expect("append"), 3);
        drop(wal);

        std::fs::write(&base, &bytes).expect("write format 0 again");
        assert!(matches!(recover(&base, FILE_BYTES, 2, STORE, 1), Err(LogError::EarlierLogBeside { .. })));
    }
}
