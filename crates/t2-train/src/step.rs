//! One REINFORCE step on generated rollouts (answers from the current expert, verified, then the gradient
//! of their length-normalised log-likelihoods, in micro-batches whose gradients add up), and what every
//! step shares: its prompts, drawn by seed and step, and its output.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use t2_engine::{Adaptation, ZVectors};
use t2_model::{ProjId, SamplingParams};
use t2_tasks::TaskItem;

use crate::config::TrainConfig;
use crate::policy::{mean_kl, Policy, Scored, SvfLogits};
use crate::train::Trainer;
use crate::{Result, TrainError};

impl Trainer {
    /// One step with generated rollouts: answers from the current expert, verified, then the REINFORCE
    /// gradient of their length-normalised log-likelihoods.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn generate_step(
        &self,
        cfg: &TrainConfig,
        area: &str,
        batch: &[TaskItem],
        p: &BTreeMap<ProjId, Vec<f32>>,
        policy: &Policy<'_>,
        step: usize,
        max_len: usize,
    ) -> Result<StepOut> {
        let t_rollout = Instant::now();
        let z = z_of(p);
        let adaptation = Adaptation::Vectors(ZVectors::new(z));
        let seed = cfg.seed;
        let temperature = cfg.temperature;
        let answers = self.answerer().answer_and_verify(
            area,
            batch,
            &adaptation,
            cfg.max_new_tokens,
            |i| SamplingParams {
                temperature,
                seed: Some(seed ^ ((step as u64) << 20) ^ i as u64),
                ..Default::default()
            },
            None,
        )?;
        drop(adaptation);
        let rollout_seconds = t_rollout.elapsed().as_secs_f64();
        let t_update = Instant::now();
        let train_acc = answers.iter().filter(|(c, _)| *c).count() as f64 / answers.len() as f64;

        // REINFORCE over the step's rollouts, in micro-batches whose gradients add up.
        let logits = SvfLogits::from_host(p.clone())?;
        let mut grads: BTreeMap<ProjId, Vec<f32>> = BTreeMap::new();
        let (mut loss_sum, mut kl_sum) = (0.0f64, 0.0f64);
        let n = answers.len() as f64;
        let scored: Vec<(f64, Scored)> = batch
            .iter()
            .zip(&answers)
            .map(|(it, (ok, r))| {
                let prompt = self.answerer().prompt_for(area, it)?;
                let from = prompt.len();
                let mut tokens = prompt;
                tokens.extend_from_slice(&r.tokens);
                Ok((if *ok { 1.0 } else { -1.0 }, Scored { tokens, from }))
            })
            .collect::<Result<_>>()?;
        let baseline = if cfg.reward_baseline {
            scored.iter().map(|(r, _)| r).sum::<f64>() / n
        } else {
            0.0
        };
        let scored: Vec<(f64, Scored)> =
            scored.into_iter().map(|(r, s)| (r - baseline, s)).collect();
        for chunk in scored.chunks(cfg.micro_batch) {
            let seqs: Vec<Scored> = chunk.iter().map(|(_, s)| s.clone()).collect();
            if seqs.iter().any(|s| s.tokens.len() > max_len) {
                return Err(TrainError::Config(format!(
                    "a rollout is longer than {max_len} tokens"
                )));
            }
            let out = policy.score(Some(&logits), &seqs, cfg.kl > 0.0)?;
            let mut objective: Option<Tensor> = None;
            for (k, &(start, len)) in out.spans.iter().enumerate() {
                let mean_lp = out.token_logprobs.narrow(0, start, len)?.mean_all()?;
                let term = (mean_lp * (chunk[k].0 / n))?;
                objective = Some(match objective {
                    Some(o) => (o + term)?,
                    None => term,
                });
            }
            let mut loss = objective.expect("a chunk has sequences").neg()?;
            if cfg.kl > 0.0 {
                let base = policy.score(None, &seqs, true)?;
                let lp = out.log_softmax.as_ref().expect("asked for");
                let lq = base.log_softmax.expect("asked for");
                // Weighted like the reward term: this chunk's share of the step's sequences.
                let kl_term = (mean_kl(lp, &lq)? * (seqs.len() as f64 / n))?;
                kl_sum += kl_term.to_scalar::<f32>()? as f64;
                loss = (loss + (kl_term * cfg.kl)?)?;
            }
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let g = loss.backward()?;
            accumulate(&mut grads, &g, &logits)?;
        }
        Ok(StepOut {
            train_acc,
            loss: loss_sum,
            kl: kl_sum,
            grads,
            rollout_seconds,
            update_seconds: t_update.elapsed().as_secs_f64(),
        })
    }
}

/// What one step measured, and its summed gradient.
pub(crate) struct StepOut {
    pub(crate) train_acc: f64,
    pub(crate) loss: f64,
    pub(crate) kl: f64,
    pub(crate) grads: BTreeMap<ProjId, Vec<f32>>,
    pub(crate) rollout_seconds: f64,
    pub(crate) update_seconds: f64,
}

impl StepOut {
    /// A step of a policy that picks among candidates (labels, options): no rollouts.
    pub(crate) fn picked(
        train_acc: f64,
        loss: f64,
        kl: f64,
        grads: BTreeMap<ProjId, Vec<f32>>,
        started: Instant,
    ) -> Self {
        Self {
            train_acc,
            loss,
            kl,
            grads,
            rollout_seconds: 0.0,
            update_seconds: started.elapsed().as_secs_f64(),
        }
    }
}

/// z = sigmoid(p): the expert the logits stand for.
pub(crate) fn z_of(p: &BTreeMap<ProjId, Vec<f32>>) -> BTreeMap<ProjId, Vec<f32>> {
    p.iter()
        .map(|(id, v)| (*id, v.iter().map(|&x| crate::policy::sigmoid(x)).collect()))
        .collect()
}

/// The step's prompts: a seeded shuffle of the training split (all of it when the batch is larger).
pub fn sample_batch(items: &[TaskItem], batch: usize, seed: u64, step: usize) -> Vec<TaskItem> {
    let mut idx: Vec<usize> = (0..items.len()).collect();
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(step as u64));
    idx.shuffle(&mut rng);
    idx.truncate(batch.min(items.len()));
    idx.into_iter().map(|i| items[i].clone()).collect()
}

/// Adds this micro-batch's gradients of the logits to the step's.
pub(crate) fn accumulate(
    acc: &mut BTreeMap<ProjId, Vec<f32>>,
    g: &GradStore,
    logits: &SvfLogits,
) -> Result<()> {
    for (id, var) in logits.vars() {
        let Some(grad) = g.get(var.as_tensor()) else {
            continue;
        };
        let v = grad.to_vec1::<f32>()?;
        match acc.get_mut(id) {
            Some(a) => a.iter_mut().zip(&v).for_each(|(a, b)| *a += b),
            None => {
                acc.insert(*id, v);
            }
        }
    }
    Ok(())
}
