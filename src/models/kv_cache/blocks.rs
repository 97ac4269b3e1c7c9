//! Which KV blocks are in use, shared, cached or free: reference counts, a
//! free list, and the prefix cache. A full block's contents are named by a
//! hash chained over the tokens before it (vLLM's automatic prefix caching),
//! so a request whose prompt starts like an earlier one finds that prompt's
//! blocks by walking its own chain. Cached blocks no sequence holds are
//! evicted least recently used first: when no free block is left, and when
//! more than `max_idle` of them pile up. Freed blocks are reused last in,
//! first out, so the memory a server touches stays near its peak use plus
//! the idle cache, whatever the size of the pool.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// A block's place in the pool.
pub type BlockId = u32;

/// The chain hash of a full block: its parent's hash and its tokens. The
/// chain starts from a seed that names the model variant (base or adapter),
/// so blocks of different adapters are never shared.
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    parent.hash(&mut hasher);
    tokens.hash(&mut hasher);
    hasher.finish()
}

/// What a cached block holds, checked on every hit: a block is reused only
/// when its own tokens and its parent's hash match, so a wrong reuse would
/// take a 64-bit collision of the parent chain's hash.
struct Cached {
    hash: u64,
    parent: u64,
    tokens: Vec<u32>,
}

/// Counters of the prefix cache since the pool was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCounters {
    /// Prompt tokens looked up (whole blocks only).
    pub queried_tokens: u64,
    /// Prompt tokens whose keys and values were found.
    pub hit_tokens: u64,
    /// Cached blocks dropped to make room.
    pub evicted_blocks: u64,
}

pub struct BlockManager {
    block_tokens: usize,
    /// Blocks in the pool. Only those handed out at least once have entries
    /// in the per-block lists (`refs`, `cached`, `last_used`), which grow as
    /// fresh blocks are first handed out, lowest first.
    total: usize,
    refs: Vec<u32>,
    /// Blocks handed out before that hold nothing worth keeping, reused
    /// before fresh ones.
    free: Vec<BlockId>,
    cached: Vec<Option<Cached>>,
    by_hash: HashMap<u64, BlockId>,
    /// Cached blocks no sequence holds, by when they were last used.
    evictable: BTreeMap<u64, BlockId>,
    /// At most this many of them are kept.
    max_idle: usize,
    last_used: Vec<u64>,
    clock: u64,
    pub counters: PrefixCounters,
}

impl BlockManager {
    pub fn new(blocks: usize, block_tokens: usize, max_idle: usize) -> Self {
        Self {
            block_tokens,
            total: blocks,
            refs: Vec::new(),
            free: Vec::new(),
            cached: Vec::new(),
            by_hash: HashMap::new(),
            evictable: BTreeMap::new(),
            max_idle,
            last_used: Vec::new(),
            clock: 0,
            counters: PrefixCounters::default(),
        }
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks some sequence holds.
    pub fn used(&self) -> usize {
        self.refs.len() - self.free.len() - self.evictable.len()
    }

    /// Blocks never handed out yet.
    fn fresh(&self) -> usize {
        self.total - self.refs.len()
    }

    /// Blocks that hold a cached prefix and no sequence.
    pub fn cached_idle(&self) -> usize {
        self.evictable.len()
    }

    /// Blocks a new sequence can get: free ones and idle cached ones.
    pub fn available(&self) -> usize {
        self.free.len() + self.fresh() + self.evictable.len()
    }

    pub fn references(&self, block: BlockId) -> u32 {
        self.refs[block as usize]
    }

    /// A block for one sequence alone (reference count 1): a free one, else
    /// a fresh one, else the least recently used idle cached one. None when
    /// every block is held.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop() {
            Some(block) => block,
            None if self.fresh() > 0 => {
                self.refs.push(0);
                self.cached.push(None);
                self.last_used.push(0);
                (self.refs.len() - 1) as BlockId
            }
            None => self.evict_oldest()?,
        };
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// One more holder of `block`.
    pub fn retain(&mut self, block: BlockId) {
        let index = block as usize;
        if self.refs[index] == 0 {
            self.evictable.remove(&self.last_used[index]);
        }
        self.refs[index] += 1;
    }

    /// One holder fewer; a block nobody holds is kept while it is cached,
    /// else freed.
    pub fn release(&mut self, block: BlockId) {
        let index = block as usize;
        if self.refs[index] == 0 {
            debug_assert!(false, "block {block} released twice");
            tracing::error!(block, "KV block released twice; ignored");
            return;
        }
        self.refs[index] -= 1;
        if self.refs[index] > 0 {
            return;
        }
        if self.cached[index].is_some() {
            self.clock += 1;
            self.last_used[index] = self.clock;
            self.evictable.insert(self.clock, block);
            if self.evictable.len() > self.max_idle
                && let Some(oldest) = self.evict_oldest()
            {
                self.free.push(oldest);
            }
        } else {
            self.free.push(block);
        }
    }

    /// Takes the least recently used idle cached block out of the cache.
    fn evict_oldest(&mut self) -> Option<BlockId> {
        let (_, block) = self.evictable.pop_first()?;
        self.forget(block);
        self.counters.evicted_blocks += 1;
        Some(block)
    }

    /// Records that `block`, now full, holds `tokens` after the chain
    /// `parent`; returns the block's own chain hash. A block already cached
    /// under the same hash stays the one found.
    pub fn publish(&mut self, block: BlockId, parent: u64, tokens: &[u32]) -> u64 {
        let hash = chain_hash(parent, tokens);
        let index = block as usize;
        if self.cached[index].is_none() && !self.by_hash.contains_key(&hash) {
            self.by_hash.insert(hash, block);
            self.cached[index] = Some(Cached {
                hash,
                parent,
                tokens: tokens.to_vec(),
            });
        }
        hash
    }

    /// The cached blocks that continue `seed` with the whole blocks of
    /// `tokens`, longest chain first found; each is retained for the caller.
    /// Returns the blocks and the chain hash after the last one.
    pub fn lookup(&mut self, seed: u64, tokens: &[u32]) -> (Vec<BlockId>, u64) {
        let mut found = Vec::new();
        let mut parent = seed;
        let whole = tokens.len() / self.block_tokens;
        for chunk in tokens.chunks_exact(self.block_tokens) {
            let hash = chain_hash(parent, chunk);
            let hit = self.by_hash.get(&hash).copied().filter(|&block| {
                self.cached[block as usize]
                    .as_ref()
                    .is_some_and(|c| c.parent == parent && c.tokens == chunk)
            });
            let Some(block) = hit else { break };
            self.retain(block);
            found.push(block);
            parent = hash;
        }
        self.counters.queried_tokens += (whole * self.block_tokens) as u64;
        self.counters.hit_tokens += (found.len() * self.block_tokens) as u64;
        (found, parent)
    }

    /// Drops `block` from the prefix cache.
    fn forget(&mut self, block: BlockId) {
        if let Some(cached) = self.cached[block as usize].take()
            && self.by_hash.get(&cached.hash) == Some(&block)
        {
            self.by_hash.remove(&cached.hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_shared_cached_and_evicted_least_recently_used_first() {
        let mut pool = BlockManager::new(3, 2, 3);
        let (a, b) = (pool.allocate().unwrap(), pool.allocate().unwrap());
        let ha = pool.publish(a, 7, &[1, 2]);
        pool.publish(b, ha, &[3, 4]);
        assert_eq!(pool.used(), 2);
        // The same prompt finds both blocks; another seed (adapter) finds none.
        let (hit, _) = pool.lookup(7, &[1, 2, 3, 4, 5]);
        assert_eq!(hit, vec![a, b]);
        assert_eq!(pool.references(a), 2);
        assert!(pool.lookup(8, &[1, 2, 3, 4]).0.is_empty());
        // A different second block stops the chain after the first.
        let (partial, _) = pool.lookup(7, &[1, 2, 9, 9]);
        assert_eq!(partial, vec![a]);
        assert_eq!(pool.counters.queried_tokens, 4 + 4 + 4);
        assert_eq!(pool.counters.hit_tokens, 4 + 2);
        // a's holders go first, so a becomes idle before b.
        for block in [a, a, a, b, b] {
            pool.release(block);
        }
        // Both idle and cached: still found, and available to allocate.
        assert_eq!(
            (pool.used(), pool.cached_idle(), pool.available()),
            (0, 2, 3)
        );
        let c = pool.allocate().unwrap();
        assert_eq!(pool.counters.evicted_blocks, 0, "a free block goes first");
        // a (idle longer) is evicted before b.
        let d = pool.allocate().unwrap();
        assert_eq!(d, a);
        assert_eq!(pool.counters.evicted_blocks, 1);
        assert!(pool.lookup(7, &[1, 2]).0.is_empty());
        assert_eq!(pool.allocate(), Some(b));
        assert_eq!(pool.allocate(), None);
        pool.release(c);
        assert_eq!(pool.available(), 1);
    }

    #[test]
    fn idle_cached_blocks_beyond_the_cap_are_freed_and_reused_first() {
        let mut pool = BlockManager::new(4, 1, 1);
        let (a, b) = (pool.allocate().unwrap(), pool.allocate().unwrap());
        pool.publish(a, 0, &[1]);
        pool.publish(b, 0, &[2]);
        pool.release(a);
        assert_eq!(pool.cached_idle(), 1);
        pool.release(b);
        // Only one idle cached block is kept: a (the older) was freed.
        assert_eq!((pool.cached_idle(), pool.counters.evicted_blocks), (1, 1));
        assert!(pool.lookup(0, &[1]).0.is_empty());
        assert_eq!(pool.lookup(0, &[2]).0, vec![b]);
        // The freed block is handed out before the never-used ones.
        assert_eq!(pool.allocate(), Some(a));
    }

    #[test]
    fn a_hash_collision_misses_instead_of_reusing() {
        let mut pool = BlockManager::new(2, 2, 2);
        let a = pool.allocate().unwrap();
        let hash = pool.publish(a, 1, &[5, 6]);
        // Pretend another chain produced the same hash: its tokens differ.
        if let Some(cached) = pool.cached[a as usize].as_mut() {
            cached.tokens = vec![5, 7];
        }
        assert_eq!(pool.by_hash.get(&hash), Some(&a));
        assert!(pool.lookup(1, &[5, 6]).0.is_empty());
    }
}
