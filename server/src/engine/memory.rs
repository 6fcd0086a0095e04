//! A map that remembers at most a fixed number of entries and forgets the least recently
//! touched first. The engine's memories of tasks, client request ids and ended leases are
//! bounded with it, so no client can grow the server's state without limit.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

#[derive(Debug)]
pub struct BoundedMemory<K, V> {
    /// How many entries are kept at the most.
    capacity: usize,
    /// Each entry with the sequence number of its last touch.
    entries: HashMap<K, (u64, V)>,
    /// Entries by last touch, oldest first.
    by_touch: BTreeMap<u64, K>,
    /// The next touch's sequence number.
    next_touch: u64,
}

impl<K: Hash + Eq + Clone, V> BoundedMemory<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            by_touch: BTreeMap::new(),
            next_touch: 0,
        }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get(key).map(|(_, value)| value)
    }

    /// The entry for `key`, made with `make` when absent; either way it becomes the newest.
    pub fn touch_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        let touch = self.next_touch;
        self.next_touch += 1;
        if let Some((old_touch, _)) = self.entries.get(&key) {
            self.by_touch.remove(old_touch);
        } else if self.entries.len() >= self.capacity
            && let Some((_, oldest)) = self.by_touch.pop_first()
        {
            self.entries.remove(&oldest);
        }
        self.by_touch.insert(touch, key.clone());
        let entry = self.entries.entry(key).or_insert_with(|| (touch, make()));
        entry.0 = touch;
        &mut entry.1
    }

    pub fn insert(&mut self, key: K, value: V) {
        let mut fresh = Some(value);
        let slot = self.touch_or_insert_with(key, || fresh.take().expect("called at most once"));
        if let Some(value) = fresh {
            *slot = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_least_recently_touched_first() {
        let mut memory = BoundedMemory::new(2);
        memory.insert("a", 1);
        memory.insert("b", 2);
        memory.touch_or_insert_with("a", || 0);
        memory.insert("c", 3);
        assert_eq!(memory.get(&"a"), Some(&1));
        assert_eq!(memory.get(&"b"), None);
        assert_eq!(memory.get(&"c"), Some(&3));
        assert_eq!(memory.entries.len(), 2);
    }
}
