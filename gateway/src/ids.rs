//! Message ids and inbox positions: 64-bit, unique, ordered by time.
//!
//! Layout (Snowflake): 41 bits of milliseconds since [`EPOCH_MS`], 10 bits
//! of worker id (the gateway StatefulSet's ordinal, so two gateways never
//! mint the same id without coordinating), 12 bits of sequence within the
//! millisecond. Why this and not a per-channel sequence: it needs no shared
//! counter (Redis restarts cannot rewind it, ScyllaDB needs no lightweight
//! transaction per message) and it also orders inbox positions across all
//! of a user's channels. See `docs/ids.md` for restarts and clock skew.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// 2026-01-01T00:00:00Z.
pub const EPOCH_MS: i64 = 1_767_225_600_000;
pub const WORKER_BITS: u32 = 10;
pub const SEQUENCE_BITS: u32 = 12;
pub const MAX_WORKER: u16 = (1 << WORKER_BITS) - 1;
const MAX_SEQUENCE: u64 = (1 << SEQUENCE_BITS) - 1;

/// Milliseconds since the Unix epoch at which `id` was minted.
pub fn timestamp_ms(id: u64) -> i64 {
    i64::try_from(id >> (WORKER_BITS + SEQUENCE_BITS)).unwrap_or(i64::MAX).saturating_add(EPOCH_MS)
}

/// The smallest id minted at `ms` (for "everything before this time" bounds).
pub fn first_id_at(ms: i64) -> u64 {
    u64::try_from(ms.saturating_sub(EPOCH_MS)).unwrap_or(0) << (WORKER_BITS + SEQUENCE_BITS)
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Mints ids for one worker. Never goes backwards: if the clock steps back
/// it keeps counting on the last timestamp it used.
pub struct IdGenerator {
    worker: u64,
    state: Mutex<(i64, u64)>,
}

impl IdGenerator {
    /// `floor`: an id this generator must mint above (e.g. the newest id
    /// stored before a restart, in case the clock went backwards meanwhile).
    pub fn new(worker: u16, floor: u64) -> Self {
        let worker = u64::from(worker.min(MAX_WORKER));
        Self { worker, state: Mutex::new((timestamp_ms(floor) - EPOCH_MS, MAX_SEQUENCE)) }
    }

    pub fn next_id(&self) -> u64 {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (last_ms, last_seq) = *state;
        let now = (now_ms() - EPOCH_MS).max(0);
        let (ms, seq) = if now > last_ms {
            (now, 0)
        } else if last_seq < MAX_SEQUENCE {
            (last_ms, last_seq + 1)
        } else {
            // 4096 ids in one millisecond: borrow the next millisecond.
            (last_ms + 1, 0)
        };
        *state = (ms, seq);
        (u64::try_from(ms).unwrap_or(0) << (WORKER_BITS + SEQUENCE_BITS)) | (self.worker << SEQUENCE_BITS) | seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_are_unique() {
        let ids = IdGenerator::new(3, 0);
        let mut last = 0;
        for _ in 0..20_000 {
            let id = ids.next_id();
            assert!(id > last, "{id} after {last}");
            last = id;
        }
    }

    #[test]
    fn ids_carry_time_and_worker() {
        let ids = IdGenerator::new(5, 0);
        let before = now_ms();
        let id = ids.next_id();
        let ts = timestamp_ms(id);
        assert!(ts >= before && ts <= now_ms() + 1, "{ts} vs {before}");
        assert_eq!((id >> SEQUENCE_BITS) & u64::from(MAX_WORKER), 5);
    }

    #[test]
    fn workers_never_collide() {
        let a = IdGenerator::new(1, 0);
        let b = IdGenerator::new(2, 0);
        let from_a: std::collections::HashSet<u64> = (0..5000).map(|_| a.next_id()).collect();
        assert!((0..5000).map(|_| b.next_id()).all(|id| !from_a.contains(&id)));
    }

    #[test]
    fn a_floor_in_the_future_is_respected() {
        let floor = first_id_at(now_ms() + 60_000);
        let ids = IdGenerator::new(0, floor);
        assert!(ids.next_id() > floor);
    }

    #[test]
    fn first_id_at_orders_with_minted_ids() {
        let ids = IdGenerator::new(7, 0);
        let id = ids.next_id();
        assert!(first_id_at(timestamp_ms(id)) <= id);
        assert!(first_id_at(timestamp_ms(id) + 1) > id);
    }
}
