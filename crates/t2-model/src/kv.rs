//! KV storage in fixed-size blocks, shared by every sequence a model runs.
//!
//! Per layer, K and V are one (blocks·kv_heads·block_size, head_dim) tensor each, head-major within a
//! block: one head's positions of a block are contiguous rows, so attention streams each head's keys and
//! values in runs of a block (the layout paged-attention kernels use). A sequence's KV is a [`SeqKv`]: the blocks it reads and writes,
//! in position order, and how many positions hold data. Which blocks a sequence may use (allocation,
//! sharing a prefix, the budget) is decided outside the model, by a block manager; the model only reads
//! and writes through block tables, so sequences that share a prefix share its blocks without copying.

use candle_core::{DType, Device, Tensor};

use crate::config::LlamaConfig;

/// Positions per block.
pub const BLOCK_SIZE: usize = 16;

pub struct KvPool {
    pub(crate) k: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    num_blocks: usize,
    pub(crate) kv_heads: usize,
    dtype: DType,
}

impl KvPool {
    /// Storage for `num_blocks` blocks in every layer (zeros; pages are touched only when written).
    pub fn new(
        cfg: &LlamaConfig,
        num_blocks: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let rows = num_blocks * cfg.num_kv_heads * BLOCK_SIZE;
        let zeros = || Tensor::zeros((rows, cfg.head_dim), dtype, device);
        Ok(Self {
            k: (0..cfg.num_layers)
                .map(|_| zeros())
                .collect::<Result<_, _>>()?,
            v: (0..cfg.num_layers)
                .map(|_| zeros())
                .collect::<Result<_, _>>()?,
            num_blocks,
            kv_heads: cfg.num_kv_heads,
            dtype,
        })
    }

    /// A pool just large enough for sequences of the given lengths, and each sequence's blocks (disjoint,
    /// in order): for one-shot loops and tests that own their sequences outright.
    pub fn for_sequences(
        cfg: &LlamaConfig,
        lengths: &[usize],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<(Self, Vec<SeqKv>)> {
        let mut next = 0u32;
        let kvs: Vec<SeqKv> = lengths
            .iter()
            .map(|&len| {
                let n = blocks_for(len.max(1)) as u32;
                let kv = SeqKv::new((next..next + n).collect());
                next += n;
                kv
            })
            .collect();
        Ok((Self::new(cfg, next as usize, dtype, device)?, kvs))
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Bytes one block takes across all layers.
    pub fn bytes_per_block(cfg: &LlamaConfig, dtype: DType) -> usize {
        BLOCK_SIZE * bytes_per_token(cfg, dtype)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// Bytes one cached position takes across all layers (K and V).
pub fn bytes_per_token(cfg: &LlamaConfig, dtype: DType) -> usize {
    2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.size_in_bytes()
}

/// Blocks needed to hold `tokens` positions.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_SIZE)
}

/// One sequence's KV: its blocks in position order, and how many positions hold data (= the position of
/// the next token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqKv {
    pub blocks: Vec<u32>,
    pub len: usize,
}

impl SeqKv {
    pub fn new(blocks: Vec<u32>) -> Self {
        Self { blocks, len: 0 }
    }

    /// Positions the blocks can hold.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * BLOCK_SIZE
    }

    /// The pool row of position `p` of head `h` (of `kv_heads`).
    pub fn row(&self, p: usize, h: usize, kv_heads: usize) -> usize {
        (self.blocks[p / BLOCK_SIZE] as usize * kv_heads + h) * BLOCK_SIZE + p % BLOCK_SIZE
    }

    /// Pool rows of positions `0..to`, head by head (head 0's positions, then head 1's, ...).
    pub fn rows(&self, to: usize, kv_heads: usize) -> Vec<u32> {
        (0..kv_heads)
            .flat_map(|h| (0..to).map(move |p| self.row(p, h, kv_heads) as u32))
            .collect()
    }
}
