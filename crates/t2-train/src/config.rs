//! What defines a training run (the same config gives the same expert) and where it keeps its files.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use t2_svf::TargetSet;

use crate::{Result, TrainError};

/// What defines a training run: the same config gives the same expert.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub task: String,
    /// Name of the expert to write.
    pub name: String,
    /// The pass-1 label it serves (defaults to the task's area).
    pub category: String,
    pub targets: TargetSet,
    pub steps: usize,
    /// Prompts per step (the whole training split when it is smaller).
    pub batch: usize,
    pub lr: f64,
    /// Gradient L2-norm clip.
    pub clip: f64,
    /// λ of the KL penalty against the base model (0: none).
    pub kl: f64,
    pub eval_every: usize,
    /// Validation items used for model selection (the first ones of the split).
    pub val_limit: usize,
    pub max_new_tokens: usize,
    /// Rollout temperature (0: greedy, as in the paper).
    pub temperature: f32,
    /// Sequences per forward/backward pass (memory, not results).
    pub micro_batch: usize,
    pub seed: u64,
    pub init_mean: f32,
    pub init_std: f32,
    /// Multiple-choice tasks only: the policy is the distribution over the options' first tokens after the
    /// task's answer prefix (one forward per prompt, no generation), as pass-1 routing reads it.
    #[serde(default)]
    pub label_policy: bool,
    /// Subtract the batch's mean reward (a REINFORCE baseline): a right answer among many wrong ones then
    /// pulls harder than the wrong ones push. Off in the paper.
    #[serde(default)]
    pub reward_baseline: bool,
    /// Multiple-choice tasks only: π over each item's options, each scored by the summed log-probability
    /// of its whole text as the reply (`t2 eval --mode loglik`), renormalised over the item's options.
    /// For options that share their first tokens (ARC's texts), where the label policy cannot tell them
    /// apart. Left out of the serialised config when off, so that older runs still resume.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub option_policy: bool,
    /// Option policy only: ascend each item's expected reward under π, Σₒ π(o)·r(o) with r = ±1, exact
    /// over the item's few options (so every option moves by its probability), rather than the reward of
    /// the greedy pick alone. No baseline is needed: the exact expectation has no sampling noise to reduce.
    /// Left out of the serialised config when off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expected_reward: bool,
}

impl TrainConfig {
    /// The paper's settings for `task`: lr 2e-3, 256 prompts a step, clip 1e-3, 200 steps, validation
    /// every 10 steps, no KL, greedy rollouts.
    pub fn paper(task: &str, name: &str) -> Self {
        Self {
            task: task.into(),
            name: name.into(),
            category: String::new(),
            targets: TargetSet::Mlp,
            steps: 200,
            batch: 256,
            lr: 2e-3,
            clip: 1e-3,
            kl: 0.0,
            eval_every: 10,
            val_limit: 256,
            max_new_tokens: 512,
            temperature: 0.0,
            micro_batch: 8,
            seed: 0,
            init_mean: 0.1,
            init_std: 0.01,
            label_policy: false,
            reward_baseline: false,
            option_policy: false,
            expected_reward: false,
        }
    }

    pub(crate) fn identity(&self) -> serde_json::Value {
        // Steps may be extended on resume, and micro_batch only changes how the sum is split.
        let mut v = serde_json::to_value(self).expect("config serializes");
        v.as_object_mut().map(|o| {
            o.remove("steps");
            o.remove("micro_batch")
        });
        v
    }

    pub fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(TrainError::Config(m.into()));
        if self.steps == 0 || self.batch == 0 || self.micro_batch == 0 || self.max_new_tokens == 0 {
            return bad("steps, batch, micro-batch and max-new-tokens must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("the learning rate must be a positive number");
        }
        if !(self.clip >= 0.0 && self.kl >= 0.0 && self.temperature >= 0.0) {
            return bad("clip, kl and temperature must not be negative");
        }
        if self.eval_every == 0 || self.val_limit == 0 {
            return bad("eval-every and val-limit must be at least 1");
        }
        if self.label_policy && self.option_policy {
            return bad("choose one policy: labels or options");
        }
        if self.kl > 0.0 && self.label_policy {
            return bad("the KL penalty is not implemented for the label policy: use --rollouts options or generate");
        }
        if self.expected_reward && !self.option_policy {
            return bad(
                "the expected reward is computed over options: it needs --rollouts options",
            );
        }
        t2_svf::expert::check_name(&self.name)?;
        Ok(())
    }
}

/// Where a run keeps its files, and what else it needs that does not change its result.
pub struct RunOptions {
    pub data_dir: PathBuf,
    pub out_dir: PathBuf,
    /// The expert store root the best expert is written into (None: only the run folder).
    pub experts_dir: Option<PathBuf>,
    pub resume: bool,
    /// Stop after this many steps of this invocation (tests of reproducibility).
    pub stop_after: Option<usize>,
    pub progress: bool,
    /// The command line, recorded in the expert's provenance.
    pub command: String,
}
