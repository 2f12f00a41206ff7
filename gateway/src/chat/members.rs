//! Group members cached in memory: every send to a group needs them, and
//! reading them from the store each time cost a query per message.
//!
//! Kept correct by invalidation: a membership change made here drops the
//! entry at once and is published through the broker, so every other
//! gateway drops it when the notice arrives (milliseconds). A gateway that
//! may have missed notices (its Redis subscription broke) clears the whole
//! cache when it resubscribes, and entries expire after a TTL whatever
//! happens. Until then a removed member of a group could still post to it
//! through another gateway, never longer than the TTL.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Sorted members of one group.
pub type Members = Arc<[String]>;

struct Entry {
    members: Members,
    loaded_at: Instant,
}

pub struct MemberCache {
    entries: DashMap<String, Entry>,
    /// Bumped by every invalidation: a load that started before one must
    /// not store what it read, which may predate the change.
    epoch: AtomicU64,
    ttl: Duration,
    capacity: usize,
}

/// Taken before reading members from the store; see [`MemberCache::insert`].
#[derive(Clone, Copy, Debug)]
pub struct LoadTicket(u64);

impl MemberCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self { entries: DashMap::new(), epoch: AtomicU64::new(0), ttl, capacity }
    }

    /// The cached members of `group`, if fresh.
    pub fn get(&self, group: &str) -> Option<Members> {
        let entry = self.entries.get(group)?;
        (entry.loaded_at.elapsed() < self.ttl).then(|| Arc::clone(&entry.members))
    }

    pub fn ticket(&self) -> LoadTicket {
        LoadTicket(self.epoch.load(Ordering::Acquire))
    }

    /// Caches what a load that took `ticket` read, unless something was
    /// invalidated since.
    pub fn insert(&self, group: &str, members: Members, ticket: LoadTicket) {
        if self.entries.len() >= self.capacity {
            // Crude but bounded; a cleared entry costs one store read.
            self.entries.clear();
        }
        self.entries.insert(group.to_string(), Entry { members, loaded_at: Instant::now() });
        // An invalidation that raced with the insert wins: undo it.
        if self.epoch.load(Ordering::Acquire) != ticket.0 {
            self.entries.remove(group);
        }
    }

    /// The members of `group` changed.
    pub fn invalidate(&self, group: &str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.remove(group);
    }

    /// Notices may have been missed: forget everything.
    pub fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> Members {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_load_is_cached_until_invalidated() {
        let cache = MemberCache::new(Duration::from_secs(60), 10);
        assert!(cache.get("g:1").is_none());
        cache.insert("g:1", members(&["a", "b"]), cache.ticket());
        assert_eq!(cache.get("g:1").as_deref(), Some(&members(&["a", "b"])[..]));
        cache.invalidate("g:1");
        assert!(cache.get("g:1").is_none());
    }

    #[test]
    fn a_load_that_raced_with_an_invalidation_is_not_cached() {
        let cache = MemberCache::new(Duration::from_secs(60), 10);
        let ticket = cache.ticket();
        // The change lands while the (now stale) members are being read.
        cache.invalidate("g:1");
        cache.insert("g:1", members(&["a", "removed"]), ticket);
        assert!(cache.get("g:1").is_none());
        cache.insert("g:1", members(&["a"]), cache.ticket());
        assert!(cache.get("g:1").is_some());
    }

    #[test]
    fn entries_expire_and_the_cache_stays_bounded() {
        let cache = MemberCache::new(Duration::ZERO, 2);
        cache.insert("g:1", members(&["a"]), cache.ticket());
        assert!(cache.get("g:1").is_none(), "expired at once with a zero TTL");

        let cache = MemberCache::new(Duration::from_secs(60), 2);
        for group in ["g:1", "g:2", "g:3"] {
            cache.insert(group, members(&["a"]), cache.ticket());
        }
        assert!(cache.entries.len() <= 2);
        assert!(cache.get("g:3").is_some());
        cache.clear();
        assert!(cache.get("g:3").is_none());
    }
}
