//! How an accelerator's memory is split when a server starts: what the model, the SVF factors, the mix
//! table and (at capacity) merged weights take, a reserve for one step's activations, and the rest for
//! the KV cache.

use crate::engine::Engine;
use crate::scheduler::SchedulerConfig;

/// Share of what is left that the KV cache takes: allocators fragment, and cuBLAS keeps workspaces.
const KV_SHARE: f64 = 0.9;

#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub total: usize,
    /// Free when the plan was made (the model and factors already loaded).
    pub free: usize,
    pub weights: usize,
    pub factors: usize,
    pub mix_table: usize,
    /// Merged weights of hot mixes, made later, at full capacity.
    pub merged: usize,
    /// One step's activations at the scheduler's largest step.
    pub activations: usize,
    pub kv: usize,
}

impl MemoryPlan {
    pub fn new(engine: &Engine, free: usize, total: usize, cfg: &SchedulerConfig) -> Self {
        let model = &engine.loaded.model;
        let (factors, mix_table, merged) = engine
            .svf
            .as_ref()
            .map_or((0, 0, 0), |s| s.resident_bytes());
        let c = &model.cfg;
        let elem = model.dtype().size_in_bytes();
        // The widest live tensors of a step: the MLP's three intermediates and a few hidden-sized ones per
        // row, and f32 logits for every sampled row.
        let per_row = (3 * c.intermediate_size + 8 * c.hidden_size) * elem;
        let activations =
            cfg.max_batched_tokens * per_row + cfg.max_batch * c.vocab_size * (elem + 4);
        let left = free.saturating_sub(merged + activations);
        Self {
            total,
            free,
            weights: model.weight_bytes(),
            factors,
            mix_table,
            merged,
            activations,
            kv: (left as f64 * KV_SHARE) as usize,
        }
    }
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        write!(
            f,
            "device memory {:.1} GiB: weights {:.2}, SVF factors {:.2}, mix table {:.3}, merged mixes (at \
             capacity) {:.2}, step activations {:.2}, KV cache {:.2} GiB (of {:.1} free after loading)",
            gib(self.total),
            gib(self.weights),
            gib(self.factors),
            gib(self.mix_table),
            gib(self.merged),
            gib(self.activations),
            gib(self.kv),
            gib(self.free)
        )
    }
}
