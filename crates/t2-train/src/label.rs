//! The label policy (multiple-choice tasks, `label_policy`): π is the distribution over each item's
//! options' first tokens (letters for lettered tasks such as ARC) after the task's answer prefix, one
//! forward per prompt and no generation, as pass-1 routing reads its labels and `t2 eval --mode label`
//! scores. The greedy pick is rewarded ±1.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;
use t2_model::ProjId;
use t2_tasks::TaskItem;

use crate::config::TrainConfig;
use crate::policy::{Policy, SvfLogits};
use crate::step::{accumulate, StepOut};
use crate::train::Trainer;
use crate::Result;

impl Trainer {
    /// One step of the label policy: π over the options' first tokens; the greedy pick is rewarded ±1.
    pub(crate) fn label_step(
        &self,
        cfg: &TrainConfig,
        area: &str,
        batch: &[TaskItem],
        p: &BTreeMap<ProjId, Vec<f32>>,
        policy: &Policy<'_>,
    ) -> Result<StepOut> {
        let started = Instant::now();
        let labels = self.label_prompts(area, batch)?;
        let LabelBatch {
            prompts,
            candidates,
            correct,
        } = &labels;
        let logits = SvfLogits::from_host(p.clone())?;
        let n = prompts.len() as f64;
        let mut grads: BTreeMap<ProjId, Vec<f32>> = BTreeMap::new();
        let (mut loss_sum, mut right) = (0.0f64, 0usize);
        // The label policy's baseline needs every pick first: one forward without gradients, on the serving
        // engine (the same picks up to rounding).
        let baseline = if cfg.reward_baseline {
            let right = self.label_right(area, batch, p)?;
            (2.0 * right as f64 - n) / n
        } else {
            0.0
        };
        for ((ps, ks), cs) in prompts
            .chunks(cfg.micro_batch)
            .zip(candidates.chunks(cfg.micro_batch))
            .zip(correct.chunks(cfg.micro_batch))
        {
            let lp = policy.candidate_logprobs_each(Some(&logits), ps, ks)?;
            let host = lp.to_vec2::<f32>()?;
            let mut picks = Vec::with_capacity(ps.len());
            let mut rewards = Vec::with_capacity(ps.len());
            for (row, &c) in host.iter().zip(cs) {
                let pick = t2_tasks::verify::choice_by_scores(row);
                right += usize::from(pick == c);
                picks.push(pick as u32);
                rewards.push((if pick == c { 1.0 } else { -1.0 } - baseline) as f32);
            }
            let k = picks.len();
            let picked = lp
                .gather(&Tensor::from_vec(picks, (k, 1), lp.device())?, 1)?
                .squeeze(1)?;
            let r = Tensor::from_vec(rewards, k, lp.device())?;
            let loss = ((picked * r)?.sum_all()? * (-1.0 / n))?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            accumulate(&mut grads, &loss.backward()?, &logits)?;
        }
        Ok(StepOut::picked(
            right as f64 / n,
            loss_sum,
            0.0,
            grads,
            started,
        ))
    }

    /// How many items the expert with logits `p` answers right under the label protocol, scored as
    /// `t2 eval --mode label` scores them.
    pub(crate) fn label_right(
        &self,
        area: &str,
        items: &[TaskItem],
        p: &BTreeMap<ProjId, Vec<f32>>,
    ) -> Result<usize> {
        self.right_on_engine(items, p, |engine, chunk, mix| {
            let labelled = chunk
                .iter()
                .map(|it| t2_adapt::label::label_item(engine, area, it))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let picks = t2_adapt::label::pick_by_label(engine, &labelled, mix)?;
            Ok(labelled
                .iter()
                .zip(picks)
                .map(|(l, pick)| l.correct == pick)
                .collect())
        })
    }

    /// Items as the label protocol reads them (`t2_adapt::label`, which `t2 eval --mode label` shares):
    /// each with its own candidates, since ARC items have 3 to 5 options.
    fn label_prompts(&self, area: &str, items: &[TaskItem]) -> Result<LabelBatch> {
        let mut batch = LabelBatch {
            prompts: Vec::with_capacity(items.len()),
            candidates: Vec::with_capacity(items.len()),
            correct: Vec::with_capacity(items.len()),
        };
        for it in items {
            let l = t2_adapt::label::label_item(self.engine(), area, it)?;
            batch.prompts.push(l.prompt);
            batch.candidates.push(l.candidates);
            batch.correct.push(l.correct);
        }
        Ok(batch)
    }
}

/// Items as the label policy reads them.
struct LabelBatch {
    /// Each item's prompt, primed with the task's answer prefix.
    prompts: Vec<Vec<u32>>,
    /// Each prompt's candidates: the first token of each of its options.
    candidates: Vec<Vec<u32>>,
    /// Each prompt's right option.
    correct: Vec<usize>,
}
