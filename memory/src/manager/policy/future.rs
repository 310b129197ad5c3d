//! A known future access sequence, and distances to each chunk's next use in it.

use std::collections::HashMap;

use crate::tier::ChunkId;

/// A sequence of accesses with a cursor at the next one.
#[derive(Debug, Clone, Default)]
pub struct Future {
    seq: Vec<ChunkId>,
    positions: HashMap<ChunkId, Vec<usize>>,
    cursor: usize,
    /// The sequence repeats (a training loop): past its end it starts over.
    cyclic: bool,
}

impl Future {
    pub fn new(seq: Vec<ChunkId>, cyclic: bool) -> Self {
        let mut positions: HashMap<ChunkId, Vec<usize>> = HashMap::new();
        for (i, id) in seq.iter().enumerate() {
            positions.entry(*id).or_default().push(i);
        }
        Future {
            seq,
            positions,
            cursor: 0,
            cyclic,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.seq.is_empty()
    }

    pub fn len(&self) -> usize {
        self.seq.len()
    }

    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// Moves past an access of `id`. If `id` is not the expected one, the cursor jumps to its
    /// next occurrence (resynchronising after a change in the sequence); returns whether the
    /// access was the expected one.
    pub fn advance(&mut self, id: ChunkId) -> bool {
        let expected = self.at(self.cursor) == Some(id);
        if !expected {
            let d = self.next_use(id);
            if d != u64::MAX {
                self.cursor += d as usize;
            }
        }
        self.cursor += 1;
        if self.cyclic && !self.seq.is_empty() {
            self.cursor %= self.seq.len();
        }
        expected
    }

    pub fn reset(&mut self) {
        self.cursor = 0;
    }

    fn at(&self, i: usize) -> Option<ChunkId> {
        if self.cyclic && !self.seq.is_empty() {
            Some(self.seq[i % self.seq.len()])
        } else {
            self.seq.get(i).copied()
        }
    }

    /// Accesses from the cursor until `id` is used (0: it is next); `u64::MAX` when never.
    pub fn next_use(&self, id: ChunkId) -> u64 {
        let Some(ps) = self.positions.get(&id) else { return u64::MAX };
        let i = ps.partition_point(|&p| p < self.cursor);
        match ps.get(i) {
            Some(&p) => (p - self.cursor) as u64,
            None if self.cyclic => (ps[0] + self.seq.len() - self.cursor) as u64,
            None => u64::MAX,
        }
    }

    /// The next `n` accesses (wrapping if cyclic).
    pub fn upcoming(&self, n: usize) -> Vec<ChunkId> {
        (self.cursor..self.cursor + n).map_while(|i| self.at(i)).take(if self.cyclic { n.min(self.seq.len()) } else { n }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> Vec<ChunkId> {
        v.iter().map(|&x| ChunkId(x)).collect()
    }

    #[test]
    fn next_use_counts_accesses_ahead_and_wraps_when_cyclic() {
        let mut f = Future::new(ids(&[1, 2, 3, 2, 1]), true);
        assert_eq!(f.next_use(ChunkId(1)), 0);
        assert_eq!(f.next_use(ChunkId(3)), 2);
        assert_eq!(f.next_use(ChunkId(9)), u64::MAX);
        f.advance(ChunkId(1));
        f.advance(ChunkId(2));
        f.advance(ChunkId(3));
        assert_eq!(f.next_use(ChunkId(3)), 4, "wraps to the next iteration");
        assert_eq!(f.upcoming(3), ids(&[2, 1, 1]));
        let mut once = Future::new(ids(&[1, 2]), false);
        once.advance(ChunkId(1));
        assert_eq!(once.next_use(ChunkId(1)), u64::MAX);
    }

    #[test]
    fn an_unexpected_access_resynchronises() {
        let mut f = Future::new(ids(&[1, 2, 3, 4, 5]), true);
        assert!(f.advance(ChunkId(1)));
        assert!(!f.advance(ChunkId(4)), "skipped 2 and 3");
        assert_eq!(f.next_use(ChunkId(5)), 0);
    }
}
