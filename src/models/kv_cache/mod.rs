//! The paged KV cache of a model: a fixed pool of blocks of
//! `block_tokens` positions, sized by a memory budget, shared by every
//! sequence of the model through block tables (vLLM's PagedAttention
//! layout), with full blocks of earlier prompts reused across requests
//! (the prefix cache, `blocks`). The engine admits a request only when the
//! blocks it may need are there, so a burst waits instead of exhausting memory.

pub mod blocks;
mod store;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use blocks::{BlockId, BlockManager, PrefixCounters};
pub use store::{KvShape, KvStore, LayerView};

/// Positions per block.
pub const BLOCK_TOKENS: usize = 16;

/// How keys and values are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDType {
    #[default]
    F32,
    F16,
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl std::str::FromStr for KvDType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(format!(
                "unknown KV cache type `{other}` (f32, f16 or q8_0)"
            )),
        }
    }
}

impl std::fmt::Display for KvDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
        })
    }
}

/// The budget of a model's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Megabytes (MiB) for keys and values; when unset, room for `sequences`
    /// sequences at the full context length.
    pub megabytes: Option<usize>,
    pub dtype: KvDType,
    /// Sequences the default budget holds at the full context.
    pub sequences: usize,
    /// Reuse the blocks of earlier prompts.
    pub prefix_cache: bool,
}

impl Default for KvCacheConfig {
    fn default() -> Self {
        Self {
            megabytes: None,
            dtype: KvDType::F32,
            sequences: 8,
            prefix_cache: true,
        }
    }
}

/// What the pool holds now, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvUsage {
    pub block_tokens: usize,
    pub total_blocks: usize,
    /// Blocks held by sequences.
    pub used_blocks: usize,
    /// Blocks holding a cached prefix and no sequence (evictable).
    pub cached_blocks: usize,
    pub prefix: PrefixCounters,
}

/// The blocks and what is in them; locked once per forward pass.
pub struct KvState {
    pub blocks: BlockManager,
    pub store: KvStore,
}

pub struct KvCache {
    state: Mutex<KvState>,
    pub shape: KvShape,
    pub config: KvCacheConfig,
    /// The pool's size and what admission has promised of it (no lock).
    pub budget: KvBudget,
}

/// The pool's blocks as admission sees them: every engine on the model
/// reserves the blocks a request may come to hold before running it, so
/// the blocks held never exceed the pool and allocation never fails.
#[derive(Debug, Clone)]
pub struct KvBudget {
    pub block_tokens: usize,
    pub total_blocks: usize,
    /// Each block is one sequence's whole slot (the device decoder's KV
    /// slab) rather than `block_tokens` of a paged pool.
    whole_sequences: bool,
    reserved: Arc<AtomicUsize>,
}

impl KvBudget {
    fn new(block_tokens: usize, total_blocks: usize) -> Self {
        Self {
            block_tokens,
            total_blocks,
            whole_sequences: false,
            reserved: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// `slots` slots of `context` positions, one per sequence.
    pub(crate) fn slots(context: usize, slots: usize) -> Self {
        Self {
            whole_sequences: true,
            ..Self::new(context, slots)
        }
    }

    /// The blocks a request may come to hold (see [`blocks_needed`]); with
    /// whole-sequence slots, one per choice.
    pub fn blocks_for(&self, prompt: usize, n: usize, max_new_tokens: usize) -> usize {
        match self.whole_sequences {
            true => n,
            false => blocks_needed(self.block_tokens, prompt, n, max_new_tokens),
        }
    }

    /// Promises `blocks` blocks until the reservation is dropped; None when
    /// they are not free.
    pub fn try_reserve(&self, blocks: usize) -> Option<KvReservation> {
        self.reserved
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |reserved| {
                (reserved + blocks <= self.total_blocks).then_some(reserved + blocks)
            })
            .ok()
            .map(|_| KvReservation {
                reserved: self.reserved.clone(),
                blocks,
            })
    }
}

/// Blocks promised to one request; given back when dropped.
#[derive(Debug)]
pub struct KvReservation {
    reserved: Arc<AtomicUsize>,
    blocks: usize,
}

impl Drop for KvReservation {
    fn drop(&mut self) {
        self.reserved.fetch_sub(self.blocks, Ordering::SeqCst);
    }
}

impl KvCache {
    /// A pool for `shape` within `config`'s budget (at least one context's
    /// worth of blocks when the budget is unset). Fails, naming the flags
    /// that size it, when the pool would not fit in this machine's memory.
    pub fn new(
        shape: KvShape,
        config: KvCacheConfig,
        context_length: usize,
    ) -> candle_core::Result<Self> {
        let block_bytes = shape.bytes_per_token(config.dtype) * BLOCK_TOKENS;
        let blocks = match config.megabytes {
            Some(mb) => Some((mb << 20) / block_bytes.max(1)),
            None => config
                .sequences
                .max(1)
                .checked_mul(context_length.div_ceil(BLOCK_TOKENS)),
        }
        .map(|blocks| blocks.max(1));
        let bytes = blocks.and_then(|blocks| blocks.checked_mul(block_bytes));
        let memory = physical_memory();
        let (Some(blocks), Some(bytes)) = (blocks, bytes) else {
            candle_core::bail!(
                "a KV cache for {} sequences of {context_length} positions overflows; pass --kv-cache-mb or --max-context",
                config.sequences
            );
        };
        if memory.is_some_and(|memory| bytes > memory) || blocks > BlockId::MAX as usize {
            candle_core::bail!(
                "a KV cache of {} MiB ({} sequences of {context_length} positions) does not fit in this machine's {} MiB; pass --kv-cache-mb or --max-context",
                bytes >> 20,
                config.sequences,
                memory.unwrap_or(0) >> 20
            );
        }
        tracing::info!(
            blocks,
            block_tokens = BLOCK_TOKENS,
            dtype = %config.dtype,
            megabytes = bytes >> 20,
            "KV cache"
        );
        let store = KvStore::new(shape, config.dtype, blocks * BLOCK_TOKENS)
            .map_err(|e| candle_core::Error::Msg(format!("reserving the KV cache: {e}")))?;
        Ok(Self {
            state: Mutex::new(KvState {
                // Half the pool may hold idle cached prefixes.
                blocks: BlockManager::new(blocks, BLOCK_TOKENS, blocks.div_ceil(2)),
                store,
            }),
            shape,
            config,
            budget: KvBudget::new(BLOCK_TOKENS, blocks),
        })
    }

    /// The pool, for one forward pass or bookkeeping step. A panic while it
    /// was held leaves block counts that are still consistent enough to keep
    /// serving, so a poisoned lock is taken over.
    pub fn lock(&self) -> MutexGuard<'_, KvState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn usage(&self) -> KvUsage {
        let state = self.lock();
        KvUsage {
            block_tokens: state.blocks.block_tokens(),
            total_blocks: state.blocks.total(),
            used_blocks: state.blocks.used(),
            cached_blocks: state.blocks.cached_idle(),
            prefix: state.blocks.counters,
        }
    }
}

/// This machine's memory in bytes (`MemTotal`), when it can be read.
pub(crate) fn physical_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Blocks a request may come to hold: its prompt's, plus for each of its
/// `n` choices the generated tokens' and a copy of the prompt's last,
/// partly filled block. Shared prefix blocks are counted as if they were
/// not shared, so what admission reserves always covers what is allocated.
pub fn blocks_needed(block_tokens: usize, prompt: usize, n: usize, max_new_tokens: usize) -> usize {
    prompt.div_ceil(block_tokens) + n * (max_new_tokens.div_ceil(block_tokens) + 1)
}

impl KvUsage {
    /// The pool's blocks and the prefix cache's counters as `model`'s metrics.
    pub fn publish(&self, model: &str) {
        let free = self.total_blocks - self.used_blocks - self.cached_blocks;
        for (state, blocks) in [
            ("used", self.used_blocks),
            ("cached", self.cached_blocks),
            ("free", free),
        ] {
            metrics::gauge!("qpai_kv_cache_blocks", "model" => model.to_string(), "state" => state)
                .set(blocks as f64);
        }
        let model = model.to_string();
        metrics::counter!("qpai_prefix_cache_queried_tokens_total", "model" => model.clone())
            .absolute(self.prefix.queried_tokens);
        metrics::counter!("qpai_prefix_cache_hit_tokens_total", "model" => model.clone())
            .absolute(self.prefix.hit_tokens);
        metrics::counter!("qpai_prefix_cache_evicted_blocks_total", "model" => model.clone())
            .absolute(self.prefix.evicted_blocks);
        let rate = if self.prefix.queried_tokens > 0 {
            self.prefix.hit_tokens as f64 / self.prefix.queried_tokens as f64
        } else {
            0.0
        };
        metrics::gauge!("qpai_prefix_cache_hit_rate", "model" => model).set(rate);
    }
}
