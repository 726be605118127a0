//! A compact map from counter names to their stripes' values: every record
//! packed into one byte arena, found through a hash table of 4-byte offsets.
//!
//! A map of `Box<str>` to a `Vec` of stripes costs two heap blocks per
//! counter (each with malloc's 16-byte header and rounding) and 56 bytes of
//! map slot; at a million counters that is most of a node's memory. Here a
//! counter with one stripe and a 12-byte name takes 30 bytes of arena plus
//! about 6 bytes of index:
//!
//! ```text
//! record = name_len - 1: u8 | flags: u8 | stripe_count: u16 LE | changed: u32 LE
//!          | name | stripe_count × (stripe: u16 LE | value: i64 LE)
//! ```
//!
//! - `changed` is the replication version (low 32 bits) of the record's last
//!   change, for [`crate::store::Store::changes_since`].
//! - A record that gains a stripe is copied to the end of the arena with room
//!   for it; the old copy is left dead, marked `MOVED`, with the new offset in
//!   its `changed` field, so that an offset kept in a dirty list still leads
//!   to the record. Dead bytes are reclaimed by [`Table::compact`], which the
//!   owner calls only when it holds no offsets.
//! - Stripes whose value is 0 stay in the record until every stripe of the
//!   counter is 0; then the owner removes the record.
//!
//! Offsets are `u32`: one table holds at most 4 GiB of records (a node has
//! 64 tables for its own entries).
//!
//! The index hashes names with foldhash, seeded per table at random, like
//! the maps it replaces: colliding names cannot be computed offline.

use std::hash::BuildHasher;

use hashbrown::HashTable;

/// Bytes before a record's name.
const HEADER: usize = 8;
/// Bytes per stripe: `u16` stripe, `i64` value.
const STRIPE_BYTES: usize = 10;

/// The record was changed since it was last written to the log.
pub const DIRTY: u8 = 1;
/// The record is dead (removed or moved); its bytes await compaction.
const DEAD: u8 = 2;
/// The record moved; `changed` holds its new offset.
const MOVED: u8 = 4;

/// Where a record is in its table's arena. Valid until the next
/// [`Table::compact`]; after a move, [`Table::resolve`] finds the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(u32);

impl Slot {
    /// The offset, to keep in a dirty list.
    pub fn offset(self) -> u32 {
        self.0
    }

    /// A slot from an offset kept earlier.
    pub fn from_offset(offset: u32) -> Slot {
        Slot(offset)
    }
}

/// Counters and their stripes, compactly.
#[derive(Debug, Default, Clone)]
pub struct Table {
    index: HashTable<u32>,
    arena: Vec<u8>,
    dead_bytes: usize,
    hasher: foldhash::fast::RandomState,
}

fn record_length(arena: &[u8], offset: usize) -> usize {
    let name_length = usize::from(arena[offset]) + 1;
    let stripes = usize::from(u16::from_le_bytes([arena[offset + 2], arena[offset + 3]]));
    HEADER + name_length + stripes * STRIPE_BYTES
}

fn name_bytes_at(arena: &[u8], offset: u32) -> &[u8] {
    let offset = offset as usize;
    let length = usize::from(arena[offset]) + 1;
    &arena[offset + HEADER..offset + HEADER + length]
}

fn name_at(arena: &[u8], offset: u32) -> &str {
    // Names enter the arena only as `&str`, so this holds for a live
    // record; the check keeps a stale or wrong offset a panic, not a bad
    // `&str`. (Index probes compare bytes and never come here.)
    std::str::from_utf8(name_bytes_at(arena, offset)).expect("a record's name is UTF-8")
}

impl Table {
    /// Live records.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.index.len()
    }

    /// Bytes of memory held (arena and index), for status pages.
    pub fn memory_bytes(&self) -> usize {
        // hashbrown keeps a bucket count of capacity × 8/7, each a u32 and a
        // control byte.
        self.arena.capacity() + self.index.capacity() * 8 / 7 * (std::mem::size_of::<u32>() + 1)
    }

    fn hash(&self, name: &str) -> u64 {
        self.hasher.hash_one(name)
    }

    /// The record of `name`.
    pub fn find(&self, name: &str) -> Option<Slot> {
        let hash = self.hash(name);
        let arena = &self.arena;
        self.index
            .find(hash, |&offset| {
                name_bytes_at(arena, offset) == name.as_bytes()
            })
            .map(|&offset| Slot(offset))
    }

    /// Adds a record for `name`, which must be absent, with one stripe.
    pub fn insert(&mut self, name: &str, stripe: u16, value: i64, changed: u32) -> Slot {
        debug_assert!(self.find(name).is_none());
        let hash = self.hash(name);
        let offset = self.append(name, 0, changed, &[], Some((stripe, value)));
        let (arena, hasher) = (&self.arena, &self.hasher);
        self.index.insert_unique(hash, offset, |&offset| {
            hasher.hash_one(name_at(arena, offset))
        });
        Slot(offset)
    }

    /// Appends a record, growing the arena by a quarter at a time (not
    /// doubling: at a million counters a doubled arena would idle half its
    /// bytes). Returns its offset.
    fn append(
        &mut self,
        name: &str,
        flags: u8,
        changed: u32,
        stripes: &[u8],
        extra: Option<(u16, i64)>,
    ) -> u32 {
        debug_assert!(!name.is_empty() && name.len() <= 256);
        let count = stripes.len() / STRIPE_BYTES + usize::from(extra.is_some());
        let length = HEADER + name.len() + count * STRIPE_BYTES;
        let offset = self.arena.len();
        let offset_u32 = u32::try_from(offset + length)
            .map(|_| offset as u32)
            .expect("one table holds at most 4 GiB of records");
        if self.arena.capacity() - self.arena.len() < length {
            self.arena
                .reserve_exact(length.max(self.arena.capacity() / 4).max(256));
        }
        let count = u16::try_from(count).expect("at most u16::MAX stripes per counter");
        self.arena.push((name.len() - 1) as u8);
        self.arena.push(flags);
        self.arena.extend_from_slice(&count.to_le_bytes());
        self.arena.extend_from_slice(&changed.to_le_bytes());
        self.arena.extend_from_slice(name.as_bytes());
        self.arena.extend_from_slice(stripes);
        if let Some((stripe, value)) = extra {
            self.arena.extend_from_slice(&stripe.to_le_bytes());
            self.arena.extend_from_slice(&value.to_le_bytes());
        }
        offset_u32
    }

    /// The live record an offset kept earlier leads to (following moves).
    pub fn resolve(&self, mut slot: Slot) -> Slot {
        while self.flags(slot) & MOVED != 0 {
            slot = Slot(self.changed_raw(slot));
        }
        slot
    }

    /// Whether the record is dead (removed, or moved: see [`Table::resolve`]).
    #[cfg(test)]
    fn is_dead(&self, slot: Slot) -> bool {
        self.flags(slot) & DEAD != 0
    }

    /// The counter's name.
    pub fn name(&self, slot: Slot) -> &str {
        name_at(&self.arena, slot.0)
    }

    /// The record's flags ([`DIRTY`]).
    pub fn flags(&self, slot: Slot) -> u8 {
        self.arena[slot.0 as usize + 1]
    }

    /// Sets or clears flag bits.
    pub fn set_flag(&mut self, slot: Slot, flag: u8, on: bool) {
        let byte = &mut self.arena[slot.0 as usize + 1];
        if on {
            *byte |= flag;
        } else {
            *byte &= !flag;
        }
    }

    fn changed_raw(&self, slot: Slot) -> u32 {
        let at = slot.0 as usize + 4;
        u32::from_le_bytes(self.arena[at..at + 4].try_into().expect("4 bytes"))
    }

    /// The replication version (low bits) of the record's last change.
    pub fn changed(&self, slot: Slot) -> u32 {
        self.changed_raw(slot)
    }

    /// Stamps the record's last change.
    pub fn set_changed(&mut self, slot: Slot, changed: u32) {
        let at = slot.0 as usize + 4;
        self.arena[at..at + 4].copy_from_slice(&changed.to_le_bytes());
    }

    fn stripe_bytes(&self, slot: Slot) -> &[u8] {
        let offset = slot.0 as usize;
        let start = offset + HEADER + usize::from(self.arena[offset]) + 1;
        &self.arena[start..offset + record_length(&self.arena, offset)]
    }

    /// `(stripe, value)` of every stripe, zeros included, in stored order.
    pub fn stripes(&self, slot: Slot) -> impl Iterator<Item = (u16, i64)> + '_ {
        self.stripe_bytes(slot)
            .chunks_exact(STRIPE_BYTES)
            .map(|chunk| {
                (
                    u16::from_le_bytes([chunk[0], chunk[1]]),
                    i64::from_le_bytes(chunk[2..].try_into().expect("8 bytes")),
                )
            })
    }

    /// `name`'s non-zero stripes, `(stripe, value)` by stripe: what a read
    /// answers.
    pub fn read(&self, name: &str) -> Vec<(u32, i64)> {
        let mut entries: Vec<(u32, i64)> = self
            .find(name)
            .map(|slot| {
                self.stripes(slot)
                    .filter(|(_, value)| *value != 0)
                    .map(|(stripe, value)| (u32::from(stripe), value))
                    .collect()
            })
            .unwrap_or_default();
        entries.sort_unstable();
        entries
    }

    /// The value of one stripe, if the record has it.
    pub fn get(&self, slot: Slot, stripe: u16) -> Option<i64> {
        self.stripes(slot)
            .find(|(existing, _)| *existing == stripe)
            .map(|(_, value)| value)
    }

    /// Sets one stripe's value, adding the stripe if the record lacks it
    /// (which moves the record). Returns where the record is now.
    pub fn set(&mut self, slot: Slot, stripe: u16, value: i64) -> Slot {
        let position = self
            .stripes(slot)
            .position(|(existing, _)| existing == stripe);
        if let Some(position) = position {
            let offset = slot.0 as usize;
            let at =
                offset + HEADER + usize::from(self.arena[offset]) + 1 + position * STRIPE_BYTES + 2;
            self.arena[at..at + 8].copy_from_slice(&value.to_le_bytes());
            return slot;
        }
        // Copy the record to the end with the new stripe.
        let old_offset = slot.0 as usize;
        let old_length = record_length(&self.arena, old_offset);
        let name_length = usize::from(self.arena[old_offset]) + 1;
        let flags = self.flags(slot);
        let changed = self.changed_raw(slot);
        let record = self.arena[old_offset..old_offset + old_length].to_vec();
        let name = std::str::from_utf8(&record[HEADER..HEADER + name_length]).expect("UTF-8");
        let hash = self.hash(name);
        let new_offset = self.append(
            name,
            flags,
            changed,
            &record[HEADER + name_length..],
            Some((stripe, value)),
        );
        let bucket = self
            .index
            .find_mut(hash, |&offset| offset == slot.0)
            .expect("a live record is indexed");
        *bucket = new_offset;
        self.arena[old_offset + 1] = DEAD | MOVED;
        self.arena[old_offset + 4..old_offset + 8].copy_from_slice(&new_offset.to_le_bytes());
        self.dead_bytes += old_length;
        Slot(new_offset)
    }

    /// Removes a live record.
    pub fn remove(&mut self, slot: Slot) {
        let hash = self.hash(self.name(slot));
        let entry = self
            .index
            .find_entry(hash, |&offset| offset == slot.0)
            .expect("a live record is indexed");
        entry.remove();
        self.arena[slot.0 as usize + 1] = DEAD;
        self.dead_bytes += record_length(&self.arena, slot.0 as usize);
    }

    /// Every live record, in arena order.
    pub fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        let arena = &self.arena;
        let mut offset = 0;
        std::iter::from_fn(move || {
            while offset < arena.len() {
                let here = offset;
                offset += record_length(arena, here);
                if arena[here + 1] & DEAD == 0 {
                    return Some(Slot(here as u32));
                }
            }
            None
        })
    }

    /// Whether dead records hold enough of the arena to be worth a
    /// [`Table::compact`].
    pub fn is_wasteful(&self) -> bool {
        self.dead_bytes > 4096 && self.dead_bytes * 2 > self.arena.len()
    }

    /// Copies the live records into a new arena and rebuilds the index:
    /// every [`Slot`] held until now is invalid.
    pub fn compact(&mut self) {
        let mut arena = Vec::with_capacity((self.arena.len() - self.dead_bytes) * 5 / 4);
        self.index.clear();
        let mut offset = 0;
        while offset < self.arena.len() {
            let length = record_length(&self.arena, offset);
            if self.arena[offset + 1] & DEAD == 0 {
                let new_offset = arena.len() as u32;
                arena.extend_from_slice(&self.arena[offset..offset + length]);
                let hasher = &self.hasher;
                let hash = hasher.hash_one(name_at(&arena, new_offset));
                let built = &arena;
                self.index
                    .insert_unique(hash, new_offset, |&at| hasher.hash_one(name_at(built, at)));
            }
            offset += length;
        }
        self.arena = arena;
        self.dead_bytes = 0;
    }

    /// Drops every record.
    pub fn clear(&mut self) {
        self.index = HashTable::new();
        self.arena = Vec::new();
        self.dead_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn contents(table: &Table) -> HashMap<String, Vec<(u16, i64)>> {
        table
            .slots()
            .map(|slot| {
                let mut stripes: Vec<_> = table.stripes(slot).collect();
                stripes.sort_unstable();
                (table.name(slot).to_string(), stripes)
            })
            .collect()
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u8, u16, i64),
        Remove(u8),
        Compact,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0u8..40, 0u16..6, any::<i64>()).prop_map(|(n, s, v)| Op::Set(n, s, v)),
            2 => (0u8..40).prop_map(Op::Remove),
            1 => Just(Op::Compact),
        ]
    }

    fn name(index: u8) -> String {
        // Names of many lengths, up to the longest allowed.
        format!("{index}-{}", "x".repeat(usize::from(index) * 6 % 250))
    }

    proptest! {
        /// The table holds exactly what a `HashMap` model holds, through
        /// inserts, stripe additions (moves), removals and compactions.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec(op(), 1..300)) {
            let mut table = Table::default();
            let mut model: HashMap<String, Vec<(u16, i64)>> = HashMap::new();
            for op in ops {
                match op {
                    Op::Set(index, stripe, value) => {
                        let name = name(index);
                        match table.find(&name) {
                            Some(slot) => { table.set(slot, stripe, value); }
                            None => { table.insert(&name, stripe, value, 7); }
                        }
                        let stripes = model.entry(name).or_default();
                        match stripes.iter_mut().find(|(s, _)| *s == stripe) {
                            Some((_, v)) => *v = value,
                            None => stripes.push((stripe, value)),
                        }
                        stripes.sort_unstable();
                    }
                    Op::Remove(index) => {
                        let name = name(index);
                        if let Some(slot) = table.find(&name) {
                            table.remove(slot);
                        }
                        model.remove(&name);
                    }
                    Op::Compact => table.compact(),
                }
                prop_assert_eq!(table.len(), model.len());
            }
            prop_assert_eq!(contents(&table), model.clone());
            table.compact();
            prop_assert_eq!(contents(&table), model);
        }
    }

    #[test]
    fn a_kept_offset_leads_to_a_moved_record() {
        let mut table = Table::default();
        let first = table.insert("hot", 0, 1, 3);
        table.set_flag(first, DIRTY, true);
        let moved = table.set(first, 5, 2);
        assert_ne!(first, moved);
        assert!(table.is_dead(first));
        assert_eq!(table.resolve(first), moved);
        assert_eq!(table.flags(moved) & DIRTY, DIRTY);
        assert_eq!(table.changed(moved), 3);
        assert_eq!(
            table.stripes(moved).collect::<Vec<_>>(),
            vec![(0, 1), (5, 2)]
        );
        // Setting an existing stripe stays in place.
        assert_eq!(table.set(moved, 0, 9), moved);
        assert_eq!(table.get(moved, 0), Some(9));
    }

    #[test]
    fn a_counter_with_one_stripe_is_small() {
        let mut table = Table::default();
        for index in 0..100_000 {
            let name = format!("counter-{index:05}"); // 13 bytes
            table.insert(&name, 0, 1, 0);
        }
        let per_counter = table.memory_bytes() as f64 / 100_000.0;
        assert!(per_counter < 48.0, "{per_counter} bytes per counter");
    }
}
