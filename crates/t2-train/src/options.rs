//! The option policy (multiple-choice tasks, `option_policy`): π over each item's options, each scored by
//! the summed log-probability of its whole text as the reply and renormalised over the item's options,
//! the tokens `t2 eval --mode loglik` scores (`t2_adapt::eval::loglik_tokens`). The greedy pick is
//! rewarded ±1, or each item's expected reward ascended; with `kl`, a KL penalty against the base model at
//! the options' positions. ARC's option texts often share their first tokens, which the label policy cannot use.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;
use t2_model::ProjId;
use t2_tasks::{Answer, TaskItem};

use crate::config::TrainConfig;
use crate::policy::{mean_kl, BranchScores, Branched, Policy, SvfLogits};
use crate::step::{accumulate, StepOut};
use crate::train::Trainer;
use crate::{Result, TrainError};

/// One item: its prompt with the options as branches after it, and the right option.
pub struct OptionItem {
    pub options: Branched,
    pub correct: usize,
}

impl Trainer {
    /// One step of the option policy: the greedy pick of each item is rewarded ±1 (less the batch's mean
    /// with a baseline), and log π(pick) is ascended; or, with `expected_reward`, each item's expected
    /// reward Σₒ π(o)·r(o) = 2π(right) − 1 is.
    pub(crate) fn option_step(
        &self,
        cfg: &TrainConfig,
        area: &str,
        batch: &[TaskItem],
        p: &BTreeMap<ProjId, Vec<f32>>,
        policy: &Policy<'_>,
    ) -> Result<StepOut> {
        let started = Instant::now();
        let items = self.option_items(area, batch)?;
        let logits = SvfLogits::from_host(p.clone())?;
        let n = items.len() as f64;
        let per_chunk = items_per_chunk(cfg);
        // The baseline needs every pick first: one pass without gradients, on the serving engine (several
        // times faster than the differentiable forward, and the same picks up to rounding).
        let baseline = if cfg.reward_baseline && !cfg.expected_reward {
            let right = self.option_right(area, batch, p)?;
            (2.0 * right as f64 - n) / n
        } else {
            0.0
        };
        let mut grads: BTreeMap<ProjId, Vec<f32>> = BTreeMap::new();
        let (mut loss_sum, mut kl_sum, mut right) = (0.0f64, 0.0f64, 0usize);
        for chunk in items.chunks(per_chunk) {
            let mut loss: Option<Tensor> = None;
            let scores = option_scores(policy, Some(&logits), chunk, cfg.kl > 0.0)?;
            for (lp, it) in scores.sums.iter().zip(chunk) {
                let host = lp.to_vec1::<f32>()?;
                let pick = t2_tasks::verify::choice_by_scores(&host);
                right += usize::from(pick == it.correct);
                let term = if cfg.expected_reward {
                    ((lp.get(it.correct)?.exp()? * 2.0)? - 1.0)?.affine(-1.0 / n, 0.0)?
                } else {
                    let r = if pick == it.correct { 1.0 } else { -1.0 } - baseline;
                    (lp.get(pick)? * (-r / n))?
                };
                loss = Some(match loss {
                    Some(l) => (l + term)?,
                    None => term,
                });
            }
            let mut loss = loss.expect("a chunk has items");
            if let Some(lp) = &scores.log_softmax {
                // Weighted like the reward term: this chunk's share of the step's items.
                let kl_term = (option_kl(policy, lp, chunk)? * (chunk.len() as f64 / n))?;
                kl_sum += kl_term.to_scalar::<f32>()? as f64;
                loss = (loss + (kl_term * cfg.kl)?)?;
            }
            loss_sum += loss.to_scalar::<f32>()? as f64;
            accumulate(&mut grads, &loss.backward()?, &logits)?;
        }
        Ok(StepOut::picked(
            right as f64 / n,
            loss_sum,
            kl_sum,
            grads,
            started,
        ))
    }

    /// How many items the expert with logits `p` answers right under the log-likelihood protocol, scored
    /// as `t2 eval --mode loglik` scores them.
    pub(crate) fn option_right(
        &self,
        area: &str,
        items: &[TaskItem],
        p: &BTreeMap<ProjId, Vec<f32>>,
    ) -> Result<usize> {
        self.right_on_engine(items, p, |engine, chunk, mix| {
            let picks = t2_adapt::eval::pick_by_loglik(engine, area, chunk, mix)?;
            Ok(chunk
                .iter()
                .zip(picks)
                .map(|(it, pick)| matches!(it.answer, Answer::Choice { correct, .. } if correct == pick))
                .collect())
        })
    }

    fn option_items(&self, area: &str, items: &[TaskItem]) -> Result<Vec<OptionItem>> {
        items
            .iter()
            .map(|it| {
                let Answer::Choice { correct, .. } = it.answer else {
                    return Err(TrainError::Config(format!(
                        "{} is not multiple choice: the option policy needs options",
                        it.id
                    )));
                };
                let (prompt, branches) = t2_adapt::eval::loglik_tokens(self.engine(), area, it)?;
                if branches.iter().any(Vec::is_empty) {
                    return Err(TrainError::Config(format!("{}: an empty option", it.id)));
                }
                Ok(OptionItem {
                    options: Branched { prompt, branches },
                    correct,
                })
            })
            .collect()
    }
}

/// Items per forward: one row each (the prompt once, its options after it).
fn items_per_chunk(cfg: &TrainConfig) -> usize {
    cfg.micro_batch
}

/// Each item's log π over its options: the options' summed token log-probabilities, renormalised, under
/// the model adapted by `logits` (the base model when `None`). Differentiable in the logits.
pub fn option_logprobs(
    policy: &Policy<'_>,
    logits: Option<&SvfLogits>,
    items: &[OptionItem],
) -> Result<Vec<Tensor>> {
    Ok(option_scores(policy, logits, items, false)?.sums)
}

/// `option_logprobs` in the `sums` field (there, each item's renormalised log π, not the raw branch sums
/// `Policy::branch_scores` gives), and when asked for, the log-softmax rows at every option token's position.
pub fn option_scores(
    policy: &Policy<'_>,
    logits: Option<&SvfLogits>,
    items: &[OptionItem],
    want_log_softmax: bool,
) -> Result<BranchScores> {
    let rows: Vec<&Branched> = items.iter().map(|it| &it.options).collect();
    let scores = policy.branch_scores(logits, &rows, want_log_softmax)?;
    let sums = scores
        .sums
        .into_iter()
        .map(|s| {
            let m = s.max_keepdim(0)?.detach();
            let shifted = s.broadcast_sub(&m)?;
            let lse = shifted.exp()?.sum_keepdim(0)?.log()?;
            shifted.broadcast_sub(&lse)
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(BranchScores {
        sums,
        log_softmax: scores.log_softmax,
    })
}

/// The KL penalty of the option policy: KL(adapted ‖ base) of the next-token distribution at every option
/// token's position, averaged over them. `lp` is the adapted model's log-softmax rows there (from
/// `option_scores`); the base model's are computed here. The whole vocabulary counts, not only the
/// options, so the penalty holds back drift in what the model would write, not only in how it ranks.
pub fn option_kl(policy: &Policy<'_>, lp: &Tensor, items: &[OptionItem]) -> Result<Tensor> {
    let rows: Vec<&Branched> = items.iter().map(|it| &it.options).collect();
    let base = policy.branch_scores(None, &rows, true)?;
    Ok(mean_kl(lp, base.log_softmax.as_ref().expect("asked for"))?)
}
