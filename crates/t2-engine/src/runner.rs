//! Executing a [`StepPlan`]: the model, its KV storage and the per-sequence samplers live here. The
//! scheduler decides; a runner only does what the plan says and reports each row's result. The CPU
//! runner below is candle's path (with t2's CPU kernels where they apply); a GPU runner is a second
//! implementation of the same trait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::Tensor;
use t2_model::{KvPool, Sampler, SeqKv, SeqStep, TokenConstraint, WantLogits};
use t2_svf::MixId;

use crate::engine::{Engine, EngineError, Result};
use crate::plan::{RowOutput, RowTask, SeqId, StepPlan};

pub trait ModelRunner: Send {
    /// Runs one step; one output per row of the plan, in order.
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<RowOutput>>;
}

pub struct CpuRunner {
    engine: Arc<Engine>,
    pool: KvPool,
    samplers: HashMap<SeqId, Sampler>,
    merging: Option<JoinHandle<()>>,
    /// The next mix to merge, and whether a merge thread is running (it takes the next mix when it is done,
    /// so a merge asked for during another one is not lost when no step follows).
    merge_queue: Arc<Mutex<(Option<MixId>, bool)>>,
    /// Merges completed, for the metrics.
    merges: Arc<AtomicU64>,
}

impl CpuRunner {
    /// A runner with storage for `num_blocks` KV blocks.
    pub fn new(engine: Arc<Engine>, num_blocks: usize, merges: Arc<AtomicU64>) -> Result<Self> {
        let pool = engine.loaded.model.new_pool(num_blocks)?;
        Ok(Self {
            engine,
            pool,
            samplers: HashMap::new(),
            merging: None,
            merge_queue: Arc::default(),
            merges,
        })
    }

    /// Builds merged weights for `mix` on a helper thread (one at a time): on CPU a merge costs seconds of
    /// both cores, and the model thread must keep stepping meanwhile.
    fn start_merge(&mut self, mix: MixId) {
        let Some(svf) = &self.engine.svf else {
            return;
        };
        if svf.is_merged(mix) {
            return;
        }
        let mut q = self.merge_queue.lock().unwrap_or_else(|e| e.into_inner());
        q.0 = Some(mix);
        if q.1 {
            return; // the running merge thread takes it next
        }
        q.1 = true;
        drop(q);
        let (engine, merges, queue) = (
            self.engine.clone(),
            self.merges.clone(),
            self.merge_queue.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("t2-merge".into())
            .spawn(move || loop {
                let next = {
                    let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                    let next = q.0.take();
                    q.1 = next.is_some();
                    next
                };
                let Some(mix) = next else { return };
                let svf = engine.svf.as_ref().expect("checked");
                match svf.merge(mix) {
                    Ok(()) => {
                        merges.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(error = %e, "merging a mix failed; staying factored"),
                }
            });
        match handle {
            Ok(h) => {
                // A finished earlier thread needs no join; the newest is joined on drop.
                self.merging = Some(h);
            }
            Err(e) => {
                self.merge_queue.lock().unwrap_or_else(|e| e.into_inner()).1 = false;
                tracing::warn!(error = %e, "could not start a merge thread");
            }
        }
    }
}

impl Drop for CpuRunner {
    fn drop(&mut self) {
        if let Some(h) = self.merging.take() {
            let _ = h.join();
        }
    }
}

impl ModelRunner for CpuRunner {
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<RowOutput>> {
        if let Some(mix) = plan.merge {
            self.start_merge(mix);
        }
        execute(&self.engine, &self.pool, &mut self.samplers, plan)
    }
}

/// One step of `plan` on `engine`'s model with `pool` as KV storage; `samplers` holds the runner's
/// per-sequence samplers (started and ended as the plan says).
pub fn execute(
    engine: &Engine,
    pool: &KvPool,
    samplers: &mut HashMap<SeqId, Sampler>,
    plan: &StepPlan,
) -> Result<Vec<RowOutput>> {
    let logits = forward(engine, pool, samplers, plan)?;
    outputs(plan, logits, samplers, &HashMap::new())
}

/// The model's forward pass over the plan's rows (after starting and ending samplers as it says):
/// per row, the logits its task needs.
pub(crate) fn forward(
    engine: &Engine,
    pool: &KvPool,
    samplers: &mut HashMap<SeqId, Sampler>,
    plan: &StepPlan,
) -> Result<Vec<Option<Tensor>>> {
    for id in &plan.ended {
        samplers.remove(id);
    }
    for (id, params) in &plan.started {
        samplers.insert(*id, Sampler::new(params.clone()));
    }
    if plan.rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut kvs: Vec<SeqKv> = plan.rows.iter().map(|r| r.kv.clone()).collect();
    let mut steps: Vec<SeqStep<'_>> = plan
        .rows
        .iter()
        .zip(kvs.iter_mut())
        .map(|(r, kv)| SeqStep {
            kv,
            tokens: &r.tokens,
            mix: r.mix,
            want: match &r.task {
                RowTask::Feed => WantLogits::None,
                RowTask::Sample | RowTask::Pick { .. } => WantLogits::Last,
                RowTask::Score { targets } if targets.iter().any(Option::is_some) => {
                    WantLogits::All
                }
                RowTask::Score { .. } => WantLogits::None,
            },
        })
        .collect();
    // Constrained rows work out their allowed tokens on another thread while the model computes the
    // logits, so a grammar costs the batch nothing unless it takes longer than the forward pass.
    let sampling: std::collections::HashSet<SeqId> = plan
        .rows
        .iter()
        .filter(|r| r.task == RowTask::Sample)
        .map(|r| r.seq)
        .collect();
    let mut constraints: Vec<&mut (dyn TokenConstraint + 'static)> = samplers
        .iter_mut()
        .filter(|(id, _)| sampling.contains(id))
        .filter_map(|(_, s)| s.active_constraint())
        .collect();
    let model = &engine.loaded.model;
    let logits = if constraints.is_empty() {
        model.forward(&mut steps, engine.projector(), pool)
    } else {
        std::thread::scope(|scope| {
            let prepared = scope.spawn(move || constraints.iter_mut().for_each(|c| c.prepare()));
            let logits = model.forward(&mut steps, engine.projector(), pool);
            if prepared.join().is_err() {
                tracing::error!("preparing a token constraint panicked");
            }
            logits
        })
    }?;
    Ok(logits)
}

/// Each row's result from its logits. `chosen`: tokens already picked for some rows (by row index),
/// whose logits are then not read.
pub(crate) fn outputs(
    plan: &StepPlan,
    logits: Vec<Option<Tensor>>,
    samplers: &mut HashMap<SeqId, Sampler>,
    chosen: &HashMap<usize, u32>,
) -> Result<Vec<RowOutput>> {
    plan.rows
        .iter()
        .zip(logits)
        .enumerate()
        .map(|(i, (r, l))| match (&r.task, l) {
            (RowTask::Feed, _) => Ok(RowOutput::Fed),
            (RowTask::Score { .. }, None) => Ok(RowOutput::Scored {
                logprob: 0.0,
                tokens: 0,
            }),
            (RowTask::Score { targets }, Some(l)) => score(&l, targets),
            (RowTask::Sample, _) if chosen.contains_key(&i) => Ok(RowOutput::Sampled {
                token: chosen[&i],
                logprob: None,
            }),
            (RowTask::Sample, Some(l)) => {
                let sampler = samplers.get_mut(&r.seq).ok_or_else(|| {
                    EngineError::Invalid(format!("sequence {} has no sampler", r.seq))
                })?;
                let (token, logprob) = sampler.sample(&l.to_vec1::<f32>()?);
                Ok(RowOutput::Sampled { token, logprob })
            }
            (RowTask::Pick { tokens }, Some(l)) => {
                let l = l.to_vec1::<f32>()?;
                tokens
                    .iter()
                    .map(|&t| {
                        l.get(t as usize).copied().ok_or_else(|| {
                            EngineError::Invalid(format!(
                                "label token {t} is outside the vocabulary"
                            ))
                        })
                    })
                    .collect::<Result<Vec<f32>>>()
                    .map(RowOutput::Picked)
            }
            (_, None) => Err(EngineError::Invalid(
                "the model returned no logits for a row that asked for them".into(),
            )),
        })
        .collect()
}

/// Σ log p(target) over the positions that have one (`logits`: one row per fed position).
fn score(logits: &Tensor, targets: &[Option<u32>]) -> Result<RowOutput> {
    let (mut logprob, mut tokens) = (0f64, 0usize);
    for (i, t) in targets.iter().enumerate() {
        let Some(t) = t else { continue };
        let row = logits.get(i)?.to_vec1::<f32>()?;
        let lse = t2_model::sampling::log_sum_exp(&row);
        logprob += (row[*t as usize] - lse) as f64;
        tokens += 1;
    }
    Ok(RowOutput::Scored { logprob, tokens })
}
