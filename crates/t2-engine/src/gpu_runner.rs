//! Executing a [`StepPlan`] on an accelerator (CUDA): the second implementation of [`ModelRunner`].
//!
//! What differs from the CPU runner is where data crosses the bus. The model's weights, the SVF factors,
//! the mix table and the KV pool stay on the device; a step uploads its row metadata once; and rows that
//! pick greedily with nothing to apply on the host (no grammar, bias, penalty or log-probabilities) take
//! their argmax on the device, so only their token ids come back. Other rows copy their logits to the
//! host sampler, as on CPU. Merged weights for a hot mix are built inline: on the GPU a merge is a few
//! matrix products, not seconds of both cores.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Tensor, D};
use t2_model::{KvPool, Sampler};

use crate::engine::{Engine, Result};
use crate::plan::{RowOutput, RowTask, SeqId, StepPlan};
use crate::runner::{forward, outputs, ModelRunner};

pub struct GpuRunner {
    engine: Arc<Engine>,
    pool: KvPool,
    samplers: HashMap<SeqId, Sampler>,
    merges: Arc<AtomicU64>,
}

impl GpuRunner {
    /// A runner with storage for `num_blocks` KV blocks on the engine's device.
    pub fn new(engine: Arc<Engine>, num_blocks: usize, merges: Arc<AtomicU64>) -> Result<Self> {
        let pool = engine.loaded.model.new_pool(num_blocks)?;
        Ok(Self {
            engine,
            pool,
            samplers: HashMap::new(),
            merges,
        })
    }

    /// Rows whose next token is the argmax of the raw logits, computed on the device.
    fn device_greedy(&self, plan: &StepPlan) -> Vec<usize> {
        plan.rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.task == RowTask::Sample)
            .filter(|(_, r)| {
                self.samplers
                    .get(&r.seq)
                    .is_some_and(Sampler::is_plain_greedy)
            })
            .map(|(i, _)| i)
            .collect()
    }
}

impl ModelRunner for GpuRunner {
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<RowOutput>> {
        if let (Some(mix), Some(svf)) = (plan.merge, &self.engine.svf) {
            if !svf.is_merged(mix) {
                match svf.merge(mix) {
                    Ok(()) => {
                        self.merges.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(error = %e, "merging a mix failed; staying factored"),
                }
            }
        }
        let logits = forward(&self.engine, &self.pool, &mut self.samplers, plan)?;
        let greedy = self.device_greedy(plan);
        let mut chosen = HashMap::new();
        if !greedy.is_empty() {
            let rows = greedy
                .iter()
                .map(|&i| logits[i].clone().expect("a sampling row has logits"))
                .collect::<Vec<_>>();
            let tokens = Tensor::stack(&rows, 0)?
                .argmax(D::Minus1)?
                .to_vec1::<u32>()?;
            chosen.extend(greedy.into_iter().zip(tokens));
        }
        outputs(plan, logits, &mut self.samplers, &chosen)
    }
}
