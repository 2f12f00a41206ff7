//! Key slots: which of the 16,384 slots a key lives in, tags that spread
//! partitions evenly over them, and grouping work per slot.

use std::collections::HashMap;

/// Slots of a Redis Cluster.
pub const SLOTS: u16 = 16_384;

/// The slot of `key`: the CRC16 of its hash tag (the first non-empty
/// `{…}`), or of the whole key without one.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter().position(|b| *b == b'}').map(|close| &rest[..close])
        })
        .filter(|tag| !tag.is_empty());
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS
}

/// Hash tags for `count` partitions, partition `p`'s tag in slot range
/// `[p·16384/count, (p+1)·16384/count)`: masters own contiguous ranges, so
/// partitions spread over them as evenly as the slots do (with 16
/// partitions and three masters, five or six each), where tags `0`, `1`, …
/// would land wherever their CRC falls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotTags(Vec<String>);

impl SlotTags {
    pub fn new(count: u16) -> Self {
        let count = count.clamp(1, SLOTS);
        let tags = (0..count)
            .map(|p| {
                let (low, high) = (
                    u32::from(p) * u32::from(SLOTS) / u32::from(count),
                    (u32::from(p) + 1) * u32::from(SLOTS) / u32::from(count),
                );
                // A range holds 16384/count slots: a few hundred tries at most.
                (0u32..)
                    .map(|n| format!("p{p}.{n}"))
                    .find(|tag| (low..high).contains(&u32::from(slot(tag.as_bytes()))))
                    .expect("every slot range is hit by some tag")
            })
            .collect();
        Self(tags)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Partition `p`'s tag (without the braces).
    pub fn tag(&self, p: usize) -> &str {
        &self.0[p % self.0.len()]
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

/// `items` grouped by the slot of their key.
pub fn by_slot<T>(items: impl IntoIterator<Item = (String, T)>) -> HashMap<u16, Vec<T>> {
    let mut groups: HashMap<u16, Vec<T>> = HashMap::new();
    for (key, item) in items {
        groups.entry(slot(key.as_bytes())).or_default().push(item);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from the Redis Cluster specification's examples.
        assert_eq!(slot(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"), "an empty tag: the whole key");
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"), "the tag ends at the first closing brace");
        assert_eq!(slot(b"kubechat:sessions:{alice}"), slot(b"kubechat:seen:{alice}"));
    }

    #[test]
    fn partition_tags_spread_evenly_over_the_slots() {
        let tags = SlotTags::new(16);
        assert_eq!(tags.len(), 16);
        for (p, tag) in tags.iter().enumerate() {
            let s = u32::from(slot(tag.as_bytes()));
            assert!(s >= p as u32 * 1024 && s < (p as u32 + 1) * 1024, "partition {p}: tag {tag} in slot {s}");
        }
        // Three masters with the ranges `redis-cli --cluster create` gives.
        let masters = [0..5461, 5461..10923, 10923..16384];
        let per_master: Vec<usize> =
            masters.iter().map(|range| tags.iter().filter(|t| range.contains(&slot(t.as_bytes()))).count()).collect();
        assert!(per_master.iter().all(|n| (5..=6).contains(n)), "{per_master:?}");
        assert_eq!(SlotTags::new(16), tags, "the same tags in every process");
    }

    #[test]
    fn grouping_keeps_order_within_a_slot() {
        let groups = by_slot([("{a}x".to_string(), 1), ("{b}".to_string(), 2), ("{a}y".to_string(), 3)]);
        assert_eq!(groups[&slot(b"a")], vec![1, 3]);
        assert_eq!(groups[&slot(b"b")], vec![2]);
    }
}
