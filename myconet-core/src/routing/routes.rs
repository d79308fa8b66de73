//! The route table: one compact entry per prefix, candidates beyond the first in a pool.
//!
//! Why not a `HashMap<u64, Entry>`: at 10,000 prefixes per node a hashbrown table holds
//! 16,384 buckets of (key, entry) plus a control byte each, about 1.6 × the entries, and
//! every spilled candidate list is its own small allocation. Here the entries are dense
//! (a `Vec` grown by 1/8 at a time), the hash index holds 8-byte slots (entry index and
//! a hash tag, linear probing, grown by 1.5×), and extra candidates are linked nodes in
//! one pooled `Vec` with a free list. Nothing here is peer-specific: a peer still only
//! adds prefixes and candidates through the router's bounded paths.

use std::mem::size_of;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use super::cache::SignedOrigin;
use super::util::mix64;

/// "No pool node".
const NIL: u32 = u32::MAX;
/// Most slots used before the index grows: 4/5 keeps linear probes short.
const LOAD_NUM: usize = 4;
const LOAD_DEN: usize = 5;

/// One neighbour's offer of a route: 16 bytes, because a large network multiplies it.
#[derive(Debug, Clone)]
pub(super) struct Cand {
    /// The verified announcement it carries (seqno, key, signature).
    pub signed: Arc<SignedOrigin>,
    /// Neighbour slot index.
    pub nbr: u16,
    /// Metric the neighbour advertised (before our link cost).
    pub metric: u16,
    /// Tick of the last update.
    pub updated: u32,
}

/// A pooled candidate: the candidate (`None` while free) and the next node of its list
/// (or of the free list).
#[derive(Debug)]
struct Node {
    cand: Option<Cand>,
    next: u32,
}

/// Everything about one prefix: 48 bytes.
#[derive(Debug)]
pub(super) struct Entry {
    /// Upper 64 bits of the /64.
    pub prefix: u64,
    first: Option<Cand>,
    /// While a candidate is held: pool index of the second one (or `NIL`). Otherwise:
    /// the tick the entry lost its last candidate (for the source GC).
    aux: u32,
    /// Selected neighbour slot, or `router::NONE`.
    pub sel: u16,
    /// The self-admitted neighbour slot charged with introducing this prefix while no
    /// configured neighbour has offered it, or `router::NONE` (see `Admission`).
    pub intro: u16,
    pub fd_seqno: u32,
    pub fd_metric: u16,
    /// Seqno and metric in our last broadcast (`INFINITY`: nothing / retracted).
    pub adv_seqno: u32,
    pub adv_metric: u16,
    pub flags: u8,
}

impl Entry {
    /// A new entry holding one candidate.
    pub fn new(prefix: u64, c: Cand, sel: u16, infinity: u16) -> Self {
        Entry {
            prefix,
            first: Some(c),
            aux: NIL,
            sel,
            intro: u16::MAX,
            fd_seqno: 0,
            fd_metric: infinity,
            adv_seqno: 0,
            adv_metric: infinity,
            flags: 0,
        }
    }

    /// Whether no candidate is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// Tick the last candidate went away (meaningful only while empty).
    pub fn idle_since(&self) -> Option<u32> {
        self.first.is_none().then_some(self.aux)
    }
}

/// Iterates one entry's candidates.
pub(super) struct Cands<'a> {
    first: Option<&'a Cand>,
    next: u32,
    pool: &'a [Node],
}

impl<'a> Iterator for Cands<'a> {
    type Item = &'a Cand;
    fn next(&mut self) -> Option<&'a Cand> {
        if let Some(c) = self.first.take() {
            return Some(c);
        }
        let n = self.pool.get(self.next as usize)?;
        self.next = n.next;
        n.cand.as_ref()
    }
}

fn cands<'a>(e: &'a Entry, pool: &'a [Node]) -> Cands<'a> {
    Cands {
        first: e.first.as_ref(),
        next: if e.first.is_some() { e.aux } else { NIL },
        pool,
    }
}

/// A shared view of one entry with its candidates.
pub(super) struct EntryRef<'a> {
    e: &'a Entry,
    pool: &'a [Node],
}

impl<'a> EntryRef<'a> {
    /// Every candidate (no particular order).
    pub fn cands(&self) -> Cands<'a> {
        cands(self.e, self.pool)
    }
    /// The candidate offered by neighbour slot `nbr`.
    pub fn cand(&self, nbr: u16) -> Option<&'a Cand> {
        self.cands().find(|c| c.nbr == nbr)
    }
}

impl Deref for EntryRef<'_> {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        self.e
    }
}

/// A mutable view of one entry with the candidate pool.
pub(super) struct EntryMut<'a> {
    e: &'a mut Entry,
    pool: &'a mut Vec<Node>,
    free: &'a mut u32,
}

impl Deref for EntryMut<'_> {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        self.e
    }
}

impl DerefMut for EntryMut<'_> {
    fn deref_mut(&mut self) -> &mut Entry {
        self.e
    }
}

impl EntryMut<'_> {
    /// Every candidate (no particular order).
    pub fn cands(&self) -> Cands<'_> {
        cands(self.e, self.pool)
    }

    /// The candidate offered by neighbour slot `nbr`.
    pub fn cand(&self, nbr: u16) -> Option<&Cand> {
        self.cands().find(|c| c.nbr == nbr)
    }

    /// The candidate offered by neighbour slot `nbr`, mutably.
    pub fn cand_mut(&mut self, nbr: u16) -> Option<&mut Cand> {
        let e = &mut *self.e;
        let first = e.first.as_ref()?;
        if first.nbr == nbr {
            return e.first.as_mut();
        }
        let mut i = e.aux;
        while i != NIL {
            let next = self.pool[i as usize].next;
            if self.pool[i as usize]
                .cand
                .as_ref()
                .is_some_and(|c| c.nbr == nbr)
            {
                return self.pool[i as usize].cand.as_mut();
            }
            i = next;
        }
        None
    }

    /// Adds a candidate (the caller checked there is none from that neighbour).
    pub fn push(&mut self, c: Cand) {
        if self.e.first.is_none() {
            self.e.first = Some(c);
            self.e.aux = NIL;
            return;
        }
        let node = Node {
            cand: Some(c),
            next: self.e.aux,
        };
        let i = if *self.free != NIL {
            let i = *self.free;
            *self.free = self.pool[i as usize].next;
            self.pool[i as usize] = node;
            i
        } else {
            grow(self.pool);
            self.pool.push(node);
            (self.pool.len() - 1) as u32
        };
        self.e.aux = i;
    }

    fn release(&mut self, i: u32) -> Option<Cand> {
        let n = &mut self.pool[i as usize];
        n.next = *self.free;
        *self.free = i;
        n.cand.take()
    }

    /// Removes the candidate of neighbour slot `nbr`; `tick` becomes the idle time if it
    /// was the last one.
    pub fn remove(&mut self, nbr: u16, tick: u32) -> Option<Cand> {
        let first = self.e.first.as_ref()?;
        if first.nbr == nbr {
            let head = self.e.aux;
            let out = if head == NIL {
                self.e.aux = tick;
                self.e.first.take()
            } else {
                self.e.aux = self.pool[head as usize].next;
                let moved = self.release(head);
                std::mem::replace(&mut self.e.first, moved)
            };
            return out;
        }
        let mut prev = NIL;
        let mut i = self.e.aux;
        while i != NIL {
            let next = self.pool[i as usize].next;
            if self.pool[i as usize]
                .cand
                .as_ref()
                .is_some_and(|c| c.nbr == nbr)
            {
                if prev == NIL {
                    self.e.aux = next;
                } else {
                    self.pool[prev as usize].next = next;
                }
                return self.release(i);
            }
            prev = i;
            i = next;
        }
        None
    }

    /// Keeps the candidates matching `keep`; returns how many were removed. `tick`
    /// becomes the idle time if none is left.
    pub fn retain(&mut self, tick: u32, mut keep: impl FnMut(&Cand) -> bool) -> usize {
        let mut removed = 0;
        let mut prev = NIL;
        let mut i = if self.e.first.is_some() {
            self.e.aux
        } else {
            NIL
        };
        while i != NIL {
            let next = self.pool[i as usize].next;
            if self.pool[i as usize].cand.as_ref().is_some_and(&mut keep) {
                prev = i;
            } else {
                if prev == NIL {
                    self.e.aux = next;
                } else {
                    self.pool[prev as usize].next = next;
                }
                self.release(i);
                removed += 1;
            }
            i = next;
        }
        if let Some(c) = self.e.first.as_ref()
            && !keep(c)
        {
            let nbr = c.nbr;
            self.remove(nbr, tick);
            removed += 1;
        }
        removed
    }
}

/// Reserves room for one more element, growing by an eighth (at least 64) instead of
/// doubling: a few more copies over the table's life, at most 1/8 unused.
fn grow<T>(v: &mut Vec<T>) {
    if v.len() == v.capacity() {
        v.reserve_exact((v.len() / 8).max(64));
    }
}

/// The table: hash index → dense entries; candidates beyond an entry's first in a pool.
#[derive(Debug)]
pub(super) struct RouteTable {
    /// 0: empty; else (hash tag << 32) | (entry index + 1).
    slots: Vec<u64>,
    entries: Vec<Entry>,
    pool: Vec<Node>,
    free: u32,
    key: u64,
}

impl RouteTable {
    /// An empty table whose hashing is keyed by `key` (see `util`).
    pub fn new(key: u64) -> Self {
        RouteTable {
            slots: Vec::new(),
            entries: Vec::new(),
            pool: Vec::new(),
            free: NIL,
            key: mix64(key ^ 0x7461_626c_6521),
        }
    }

    fn hash(&self, p: u64) -> u64 {
        mix64(p ^ self.key)
    }

    /// Home slot of a hash (fast range reduction: any table size works).
    fn home(&self, h: u64) -> usize {
        (((h & 0xffff_ffff) * self.slots.len() as u64) >> 32) as usize
    }

    /// (slot position, entry index) of `p`.
    fn find(&self, p: u64) -> Option<(usize, usize)> {
        if self.slots.is_empty() {
            return None;
        }
        let h = self.hash(p);
        let tag = h >> 32;
        let len = self.slots.len();
        let mut i = self.home(h);
        loop {
            let s = self.slots[i];
            if s == 0 {
                return None;
            }
            if s >> 32 == tag {
                let idx = (s & 0xffff_ffff) as usize - 1;
                if self.entries[idx].prefix == p {
                    return Some((i, idx));
                }
            }
            i += 1;
            if i == len {
                i = 0;
            }
        }
    }

    fn place(&mut self, h: u64, idx: usize) {
        let len = self.slots.len();
        let mut i = self.home(h);
        while self.slots[i] != 0 {
            i += 1;
            if i == len {
                i = 0;
            }
        }
        self.slots[i] = (h >> 32) << 32 | (idx as u64 + 1);
    }

    fn rebuild(&mut self, size: usize) {
        self.slots = vec![0; size];
        for idx in 0..self.entries.len() {
            let h = self.hash(self.entries[idx].prefix);
            self.place(h, idx);
        }
    }

    /// Prefixes held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Loads, without using it, the memory a lookup of `p` will read: level 0 its home
    /// slot, level 1 the entry that slot points to. A batch of touches lets the CPU wait
    /// for their cache misses in parallel instead of one lookup after another; it
    /// changes nothing.
    pub fn touch(&self, p: u64, level: u8) {
        if self.slots.is_empty() {
            return;
        }
        let s = self.slots[self.home(self.hash(p))];
        if level > 0 && s != 0 {
            let idx = (s & 0xffff_ffff) as usize - 1;
            if let Some(e) = self.entries.get(idx) {
                std::hint::black_box(e.prefix);
            }
        } else {
            std::hint::black_box(s);
        }
    }

    /// Index of `p`'s entry in the dense entry array (valid until the next insert or
    /// remove), for callers that visit an entry twice or walk the table in order.
    pub fn index_of(&self, p: u64) -> Option<usize> {
        self.find(p).map(|(_, idx)| idx)
    }

    /// The entry at index `idx` (see [`RouteTable::index_of`]; entries are in `iter` order).
    pub fn get_at(&self, idx: usize) -> Option<EntryRef<'_>> {
        Some(EntryRef {
            e: self.entries.get(idx)?,
            pool: &self.pool,
        })
    }

    /// The entry at index `idx`, mutably.
    pub fn get_at_mut(&mut self, idx: usize) -> Option<EntryMut<'_>> {
        Some(EntryMut {
            e: self.entries.get_mut(idx)?,
            pool: &mut self.pool,
            free: &mut self.free,
        })
    }

    /// The entry of `p`.
    pub fn get(&self, p: u64) -> Option<EntryRef<'_>> {
        let (_, idx) = self.find(p)?;
        Some(EntryRef {
            e: &self.entries[idx],
            pool: &self.pool,
        })
    }

    /// The entry of `p`, mutably.
    pub fn get_mut(&mut self, p: u64) -> Option<EntryMut<'_>> {
        let (_, idx) = self.find(p)?;
        Some(EntryMut {
            e: &mut self.entries[idx],
            pool: &mut self.pool,
            free: &mut self.free,
        })
    }

    /// Adds an entry for a prefix not yet held.
    pub fn insert(&mut self, e: Entry) {
        debug_assert!(self.find(e.prefix).is_none());
        if (self.entries.len() + 1) * LOAD_DEN > self.slots.len() * LOAD_NUM {
            let size = (self.slots.len() * 3 / 2).max(16);
            grow(&mut self.entries);
            self.entries.push(e);
            self.rebuild(size);
            return;
        }
        let h = self.hash(e.prefix);
        grow(&mut self.entries);
        self.entries.push(e);
        self.place(h, self.entries.len() - 1);
    }

    /// Removes `p`'s entry and frees its candidates.
    pub fn remove(&mut self, p: u64) -> bool {
        let Some((mut hole, idx)) = self.find(p) else {
            return false;
        };
        if let Some(mut e) = self.get_mut(p) {
            e.retain(0, |_| false);
        }
        // Backward-shift deletion: pull later members of the probe run into the hole.
        let len = self.slots.len();
        self.slots[hole] = 0;
        let mut j = hole;
        loop {
            j += 1;
            if j == len {
                j = 0;
            }
            let s = self.slots[j];
            if s == 0 {
                break;
            }
            let at = (s & 0xffff_ffff) as usize - 1;
            let home = self.home(self.hash(self.entries[at].prefix));
            let dist_j = (j + len - home) % len;
            let dist_hole = (hole + len - home) % len;
            if dist_hole <= dist_j {
                self.slots[hole] = s;
                self.slots[j] = 0;
                hole = j;
            }
        }
        // Keep entries dense: the last one moves into `idx`.
        let last = self.entries.len() - 1;
        self.entries.swap_remove(idx);
        if idx != last {
            let moved = self.entries[idx].prefix;
            let h = self.hash(moved);
            let mut i = self.home(h);
            loop {
                let s = self.slots[i];
                if s != 0 && (s & 0xffff_ffff) as usize - 1 == last {
                    self.slots[i] = (s >> 32) << 32 | (idx as u64 + 1);
                    break;
                }
                i += 1;
                if i == len {
                    i = 0;
                }
            }
        }
        true
    }

    /// Every entry.
    pub fn iter(&self) -> impl Iterator<Item = EntryRef<'_>> {
        self.entries.iter().map(|e| EntryRef {
            e,
            pool: &self.pool,
        })
    }

    /// Every prefix held.
    pub fn prefixes(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.iter().map(|e| e.prefix)
    }

    /// Calls `f` on every entry, mutably.
    pub fn for_each_mut(&mut self, mut f: impl FnMut(EntryMut<'_>)) {
        for e in self.entries.iter_mut() {
            f(EntryMut {
                e,
                pool: &mut self.pool,
                free: &mut self.free,
            });
        }
    }

    /// Drops the entries for which `keep` is false; returns how many.
    pub fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) -> usize {
        let gone: Vec<u64> = self
            .entries
            .iter()
            .filter(|e| !keep(e))
            .map(|e| e.prefix)
            .collect();
        for p in &gone {
            self.remove(*p);
        }
        gone.len()
    }

    /// Candidates held in total.
    pub fn candidate_count(&self) -> usize {
        self.iter().map(|e| e.cands().count()).sum()
    }

    /// Bytes allocated: index slots, entries and candidate pool at their capacities
    /// (each is one large allocation, so allocator overhead is negligible).
    pub fn memory_bytes(&self) -> usize {
        self.slots.capacity() * size_of::<u64>()
            + self.entries.capacity() * size_of::<Entry>()
            + self.pool.capacity() * size_of::<Node>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::routing::util::SplitMix;

    fn cand(nbr: u16, signed: &Arc<SignedOrigin>) -> Cand {
        Cand {
            signed: signed.clone(),
            nbr,
            metric: nbr,
            updated: 0,
        }
    }

    #[test]
    fn sizes_are_compact() {
        assert_eq!(size_of::<Cand>(), 16);
        assert_eq!(size_of::<Entry>(), 48);
        assert_eq!(size_of::<Node>(), 24);
    }

    /// Random inserts, removals and candidate edits agree with a `BTreeMap` model.
    #[test]
    fn table_matches_model() {
        let signed = Arc::new(SignedOrigin {
            key: [0; 32],
            prefix: 0,
            seqno: 0,
            signature: [0; 64],
        });
        let mut rng = SplitMix::new(7);
        let mut t = RouteTable::new(1);
        let mut model: BTreeMap<u64, Vec<u16>> = BTreeMap::new();
        for step in 0..20_000u32 {
            // A small key space so removals and re-inserts collide often.
            let p = rng.below(600) * 0x1_0000_0001;
            let nbr = rng.below(6) as u16;
            match rng.below(4) {
                0 | 1 => match t.get_mut(p) {
                    Some(mut e) => {
                        if e.cand(nbr).is_none() {
                            e.push(cand(nbr, &signed));
                            model.entry(p).or_default().push(nbr);
                        }
                    }
                    None => {
                        t.insert(Entry::new(p, cand(nbr, &signed), nbr, u16::MAX));
                        model.insert(p, vec![nbr]);
                    }
                },
                2 => {
                    if let Some(mut e) = t.get_mut(p) {
                        let had = e.remove(nbr, step).is_some();
                        let m = model.get_mut(&p).map(|v| {
                            let before = v.len();
                            v.retain(|x| *x != nbr);
                            before != v.len()
                        });
                        assert_eq!(Some(had), m);
                        if had && e.is_empty() {
                            assert_eq!(e.idle_since(), Some(step));
                        }
                    }
                }
                _ => {
                    assert_eq!(t.remove(p), model.remove(&p).is_some());
                }
            }
            if step % 1000 == 0 {
                assert_eq!(t.len(), model.len());
                for (p, v) in &model {
                    let e = t.get(*p).expect("present");
                    let mut got: Vec<u16> = e.cands().map(|c| c.nbr).collect();
                    got.sort_unstable();
                    let mut want = v.clone();
                    want.sort_unstable();
                    assert_eq!(got, want);
                }
            }
        }
        let n = t.candidate_count();
        assert_eq!(n, model.values().map(|v| v.len()).sum::<usize>());
        t.for_each_mut(|mut e| {
            e.retain(1, |c| c.nbr % 2 == 0);
        });
        assert_eq!(
            t.candidate_count(),
            model.values().flatten().filter(|n| *n % 2 == 0).count()
        );
    }
}
