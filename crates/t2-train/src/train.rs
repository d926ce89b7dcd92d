//! `t2 train`: REINFORCE on the SVF logits of one task.
//!
//! Each step samples a batch of training prompts (seeded by step), generates answers with the current
//! expert through the serving scheduler (every prompt of the step in one batch), scores them with the
//! task's verifier (+1 right, −1 wrong), and ascends J = mean_i r_i·mean_t log π(y_it | x_i, y_i<t)
//! − λ·KL(π_z ‖ π_base) with Adam on the logits p (z = sigmoid(p)), gradient norm clipped. Every
//! `eval_every` steps the expert is scored on the validation split and the best one is kept. Rollouts are
//! greedy by default, prompts are drawn by seed and step, and the checkpoint holds Adam's moments: the
//! same command gives the same loss trace, resumed or not.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use t2_adapt::Answerer;
use t2_engine::{Adaptation, Engine, ZVectors};
use t2_model::{ProjId, SamplingParams};
use t2_svf::{Expert, ExpertMeta, ExpertStore, TargetSet};
use t2_tasks::{Split, Task, TaskItem};

use crate::adam::{clip_grad_norm, Adam};
use crate::checkpoint::{Checkpoint, TrainState};
use crate::plot::{line_chart, Series};
use crate::policy::{Policy, Scored, SvfLogits};
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
        }
    }

    fn identity(&self) -> serde_json::Value {
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

/// One row of `log.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    pub step: usize,
    pub loss: f64,
    pub train_acc: f64,
    pub grad_norm: f64,
    pub kl: f64,
    pub val_acc: Option<f64>,
    /// Wall time since the start of the run.
    pub seconds: f64,
    /// This step's time generating rollouts, and computing and applying the gradient.
    pub rollout_seconds: f64,
    pub update_seconds: f64,
}

const CSV_HEADER: &str =
    "step,loss,train_acc,grad_norm,kl,val_acc,seconds,rollout_seconds,update_seconds";

impl LogRow {
    fn csv(&self) -> String {
        format!(
            "{},{:.6},{:.4},{:.6e},{:.6},{},{:.1},{:.1},{:.1}",
            self.step,
            self.loss,
            self.train_acc,
            self.grad_norm,
            self.kl,
            self.val_acc.map(|v| format!("{v:.4}")).unwrap_or_default(),
            self.seconds,
            self.rollout_seconds,
            self.update_seconds
        )
    }

    pub fn parse(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 9 {
            return None;
        }
        Some(Self {
            step: f[0].parse().ok()?,
            loss: f[1].parse().ok()?,
            train_acc: f[2].parse().ok()?,
            grad_norm: f[3].parse().ok()?,
            kl: f[4].parse().ok()?,
            val_acc: if f[5].is_empty() {
                None
            } else {
                Some(f[5].parse().ok()?)
            },
            seconds: f[6].parse().ok()?,
            rollout_seconds: f[7].parse().ok()?,
            update_seconds: f[8].parse().ok()?,
        })
    }
}

pub fn read_log(path: &Path) -> Result<Vec<LogRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::Io(path.into(), e))?;
    Ok(text.lines().skip(1).filter_map(LogRow::parse).collect())
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: usize,
    pub best_step: usize,
    pub best_val: f64,
    pub seconds: f64,
    pub log: Vec<LogRow>,
    pub expert_path: Option<PathBuf>,
}

/// Trains experts: REINFORCE on the SVF logits, rollouts answered and verified by an [`Answerer`].
pub struct Trainer {
    answerer: Answerer,
}

impl Trainer {
    pub fn new(engine: Arc<Engine>, rollout_batch: usize) -> Result<Self> {
        if engine.svf.is_none() {
            return Err(TrainError::Config(
                "training needs SVF (a decomposition)".into(),
            ));
        }
        Ok(Self {
            answerer: Answerer::new(engine, rollout_batch)?,
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        self.answerer.engine()
    }

    /// How rollouts and validation answers are generated and verified.
    pub fn answerer(&self) -> &Answerer {
        &self.answerer
    }

    pub fn train(&self, cfg: &TrainConfig, opts: &RunOptions) -> Result<TrainSummary> {
        cfg.check()?;
        let task = Task::open(&opts.data_dir, &cfg.task)?;
        let area = task.info.area.clone();
        let train_items = task.items(Split::Train)?;
        let val_items = t2_adapt::eval::subset(task.items(Split::Val)?, cfg.val_limit);
        if train_items.is_empty() || val_items.is_empty() {
            return Err(TrainError::Config(format!(
                "task '{}' has an empty train or val split",
                cfg.task
            )));
        }
        let svf = self.engine().svf.as_ref().expect("checked in new");
        let decomp = &svf.decomp;
        if !decomp.targets.covers(cfg.targets) {
            return Err(TrainError::Config(format!(
                "the decomposition covers '{}', training asks for '{}'",
                decomp.targets, cfg.targets
            )));
        }
        std::fs::create_dir_all(&opts.out_dir)
            .map_err(|e| TrainError::Io(opts.out_dir.clone(), e))?;
        let ckpt_path = opts.out_dir.join("checkpoint.safetensors");
        let log_path = opts.out_dir.join("log.csv");

        // Start fresh, or pick up exactly where the checkpoint left off.
        let (mut p, mut adam, mut state, mut log, mut best) = if opts.resume && ckpt_path.exists() {
            let ck = Checkpoint::load(&ckpt_path)?;
            if ck.state.config != cfg.identity() {
                return Err(TrainError::Checkpoint {
                    path: ckpt_path,
                    reason:
                        "it was made by a different configuration (task, seed or hyper-parameters)"
                            .into(),
                });
            }
            let mut adam = Adam::new(cfg.lr, &ck.p);
            adam.m = ck.m;
            adam.v = ck.v;
            adam.t = ck.state.adam_t;
            let log: Vec<LogRow> = if log_path.exists() {
                read_log(&log_path)?
                    .into_iter()
                    .filter(|r| r.step <= ck.state.step)
                    .collect()
            } else {
                Vec::new()
            };
            (ck.p, adam, ck.state, log, ck.best)
        } else {
            let init = SvfLogits::init(decomp, cfg.targets, cfg.seed, cfg.init_mean, cfg.init_std)?;
            let p = init.to_host()?;
            let adam = Adam::new(cfg.lr, &p);
            let state = TrainState {
                step: 0,
                adam_t: 0,
                best_val: None,
                best_step: 0,
                config: cfg.identity(),
            };
            let best = p.clone();
            (p, adam, state, Vec::new(), best)
        };

        let bar = progress_bar(opts.progress, cfg.steps as u64, state.step as u64);
        let started = Instant::now();
        let prior_seconds = log.last().map(|r| r.seconds).unwrap_or(0.0);
        let max_len = 4096;
        let policy = Policy::new(&self.engine().loaded.model, decomp, max_len)?;

        // The starting point is scored too: it is the base model up to the init noise.
        if state.step == 0 && state.best_val.is_none() {
            let acc = self.validate(&area, &val_items, cfg, &p)?;
            state.best_val = Some(acc);
            log.push(LogRow {
                step: 0,
                loss: f64::NAN,
                train_acc: f64::NAN,
                grad_norm: 0.0,
                kl: 0.0,
                val_acc: Some(acc),
                seconds: 0.0,
                rollout_seconds: 0.0,
                update_seconds: 0.0,
            });
            bar.set_message(format!("val {acc:.3} at step 0"));
        }

        let mut ran = 0;
        while state.step < cfg.steps && opts.stop_after.is_none_or(|k| ran < k) {
            let step = state.step + 1;
            let batch = sample_batch(&train_items, cfg.batch, cfg.seed, step);
            let StepOut {
                train_acc,
                loss: loss_sum,
                kl: kl_sum,
                mut grads,
                rollout_seconds,
                mut update_seconds,
            } = if cfg.label_policy {
                self.label_step(cfg, &area, &batch, &p, &policy)?
            } else {
                self.generate_step(cfg, &area, &batch, &p, &policy, step, max_len)?
            };
            let t_update = Instant::now();
            let grad_norm = clip_grad_norm(&mut grads, cfg.clip);
            adam.step(&mut p, &grads);
            update_seconds += t_update.elapsed().as_secs_f64();
            state.step = step;
            state.adam_t = adam.t;
            ran += 1;

            let val_acc = if step % cfg.eval_every == 0 || step == cfg.steps {
                let acc = self.validate(&area, &val_items, cfg, &p)?;
                if state.best_val.is_none_or(|b| acc > b) {
                    state.best_val = Some(acc);
                    state.best_step = step;
                    best = p.clone();
                }
                Some(acc)
            } else {
                None
            };
            log.push(LogRow {
                step,
                loss: loss_sum,
                train_acc,
                grad_norm,
                kl: kl_sum,
                val_acc,
                seconds: prior_seconds + started.elapsed().as_secs_f64(),
                rollout_seconds,
                update_seconds,
            });
            bar.inc(1);
            bar.set_message(format!(
                "loss {loss_sum:+.4} train {train_acc:.3} best val {:.3} (step {})",
                state.best_val.unwrap_or(0.0),
                state.best_step
            ));
            // Checkpoint and log after every step: an interrupted run loses at most one step.
            Checkpoint {
                state: state.clone(),
                p: p.clone(),
                m: adam.m.clone(),
                v: adam.v.clone(),
                best: best.clone(),
            }
            .save(&ckpt_path)?;
            write_log(&log_path, &log)?;
            write_curve(&opts.out_dir.join("curve.svg"), &cfg.name, &cfg.task, &log)?;
        }
        bar.finish();
        let seconds = prior_seconds + started.elapsed().as_secs_f64();
        if state.step == 0 {
            write_log(&log_path, &log)?;
        }

        let mut expert_path = None;
        if state.step >= cfg.steps {
            let expert = self.expert(cfg, &task, &best, &state, seconds, &opts.command)?;
            expert.save(&opts.out_dir.join(format!("{}.safetensors", cfg.name)))?;
            if let Some(root) = &opts.experts_dir {
                let mut store = ExpertStore::open(root, &self.engine().loaded.model_id, decomp)?;
                store.add(expert, decomp)?;
                expert_path = Some(store.dir.join(format!("{}.safetensors", cfg.name)));
            }
        }
        Ok(TrainSummary {
            steps: state.step,
            best_step: state.best_step,
            best_val: state.best_val.unwrap_or(0.0),
            seconds,
            log,
            expert_path,
        })
    }

    /// One step with generated rollouts: answers from the current expert, verified, then the REINFORCE
    /// gradient of their length-normalised log-likelihoods.
    #[allow(clippy::too_many_arguments)]
    fn generate_step(
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
        let answers = self.answerer.answer_and_verify(
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
                let prompt = self.answerer.prompt_for(area, it)?;
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
                let lq = base.log_softmax.expect("asked for").detach();
                // Mean over scored positions of Σ_v p(v)·(log p(v) − log q(v)), weighted like the reward term.
                let per_row = (lp.exp()? * (lp - lq)?)?.sum(1)?;
                let kl_term =
                    (per_row.sum_all()? * (seqs.len() as f64 / n / per_row.dim(0)? as f64))?;
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

    /// One step of the label policy: π over the options' first tokens; the greedy pick is rewarded ±1.
    fn label_step(
        &self,
        cfg: &TrainConfig,
        area: &str,
        batch: &[TaskItem],
        p: &BTreeMap<ProjId, Vec<f32>>,
        policy: &Policy<'_>,
    ) -> Result<StepOut> {
        let started = Instant::now();
        let (prompts, candidates, correct) = self.label_prompts(area, batch)?;
        let logits = SvfLogits::from_host(p.clone())?;
        let n = prompts.len() as f64;
        let mut grads: BTreeMap<ProjId, Vec<f32>> = BTreeMap::new();
        let (mut loss_sum, mut right) = (0.0f64, 0usize);
        // The label policy's baseline needs every pick first: one forward without gradients.
        let baseline = if cfg.reward_baseline {
            let right = count_right(
                policy,
                &logits,
                &prompts,
                &candidates,
                &correct,
                cfg.micro_batch,
            )?;
            (2.0 * right as f64 - n) / n
        } else {
            0.0
        };
        for (ps, cs) in prompts
            .chunks(cfg.micro_batch)
            .zip(correct.chunks(cfg.micro_batch))
        {
            let lp = policy.candidate_logprobs(Some(&logits), ps, &candidates)?;
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
        Ok(StepOut {
            train_acc: right as f64 / n,
            loss: loss_sum,
            kl: 0.0,
            grads,
            rollout_seconds: 0.0,
            update_seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn validate(
        &self,
        area: &str,
        items: &[TaskItem],
        cfg: &TrainConfig,
        p: &BTreeMap<ProjId, Vec<f32>>,
    ) -> Result<f64> {
        if cfg.label_policy {
            let policy = Policy::new(
                &self.engine().loaded.model,
                &self.engine().svf.as_ref().expect("checked").decomp,
                4096,
            )?;
            let logits = SvfLogits::from_host(p.clone())?;
            let (prompts, candidates, correct) = self.label_prompts(area, items)?;
            let right = count_right(
                &policy,
                &logits,
                &prompts,
                &candidates,
                &correct,
                cfg.micro_batch,
            )?;
            return Ok(right as f64 / items.len() as f64);
        }
        let adaptation = Adaptation::Vectors(ZVectors::new(z_of(p)));
        let answers = self.answerer.answer_and_verify(
            area,
            items,
            &adaptation,
            cfg.max_new_tokens,
            |_| SamplingParams::default(),
            None,
        )?;
        Ok(answers.iter().filter(|(c, _)| *c).count() as f64 / answers.len() as f64)
    }

    /// Prompts primed with the task's answer prefix, the first token of each option, and the right option.
    fn label_prompts(&self, area: &str, items: &[TaskItem]) -> Result<LabelBatch> {
        let tok = &self.engine().loaded.tokenizer;
        let encode = |t: &str| tok.encode(t).map_err(|e| TrainError::Engine(e.into()));
        let prefix = match t2_adapt::prompt::answer_prefix(area) {
            Some(p) => encode(p)?,
            None => Vec::new(),
        };
        let options = match items.first().map(|i| &i.answer) {
            Some(t2_tasks::Answer::Choice { options, .. }) => options.clone(),
            _ => {
                return Err(TrainError::Config(
                    "the label policy needs a multiple-choice task".into(),
                ))
            }
        };
        let mut candidates = Vec::new();
        for o in &options {
            let first = *encode(&format!(" {o}"))?
                .first()
                .ok_or_else(|| TrainError::Config("an empty option".into()))?;
            if candidates.contains(&first) {
                return Err(TrainError::Config(format!(
                    "options {options:?} do not differ at their first token: the label policy cannot tell them apart"
                )));
            }
            candidates.push(first);
        }
        let mut prompts = Vec::with_capacity(items.len());
        let mut correct = Vec::with_capacity(items.len());
        for it in items {
            let t2_tasks::Answer::Choice {
                options: o,
                correct: c,
                ..
            } = &it.answer
            else {
                return Err(TrainError::Config(format!(
                    "{} is not multiple choice",
                    it.id
                )));
            };
            if *o != options {
                return Err(TrainError::Config(format!(
                    "{} has other options than the first item",
                    it.id
                )));
            }
            let p = if area == "routing" {
                // Exactly the tokens the server's pass 1 scores.
                t2_engine::routing::routing_tokens(self.engine(), &it.prompt, o)?.0
            } else {
                let mut p = self.answerer.prompt_for(area, it)?;
                p.extend_from_slice(&prefix);
                p
            };
            prompts.push(p);
            correct.push(*c);
        }
        Ok((prompts, candidates, correct))
    }

    fn expert(
        &self,
        cfg: &TrainConfig,
        task: &Task,
        best: &BTreeMap<ProjId, Vec<f32>>,
        state: &TrainState,
        seconds: f64,
        command: &str,
    ) -> Result<Expert> {
        let decomp = &self.engine().svf.as_ref().expect("checked").decomp;
        let category = if cfg.category.is_empty() {
            task.info.area.clone()
        } else {
            cfg.category.clone()
        };
        let provenance = BTreeMap::from([
            ("command".to_string(), command.to_string()),
            ("task".into(), cfg.task.clone()),
            ("data".into(), task.info.source.clone()),
            ("steps".into(), state.step.to_string()),
            ("best_step".into(), state.best_step.to_string()),
            ("seed".into(), cfg.seed.to_string()),
            (
                "val_accuracy".into(),
                format!("{:.4}", state.best_val.unwrap_or(0.0)),
            ),
            ("val_items".into(), cfg.val_limit.to_string()),
            ("train_seconds".into(), format!("{seconds:.0}")),
            (
                "config".into(),
                serde_json::to_string(cfg).expect("config serializes"),
            ),
        ]);
        Ok(Expert {
            meta: ExpertMeta {
                name: cfg.name.clone(),
                description: format!(
                    "{} expert trained with REINFORCE on {}",
                    task.info.area, cfg.task
                ),
                category,
                model_id: self.engine().loaded.model_id.clone(),
                decomposition_hash: decomp.hash.clone(),
                targets: cfg.targets,
                provenance,
            },
            z: z_of(best),
        })
    }
}

/// How many prompts the label policy answers right (its greedy pick), without gradients.
fn count_right(
    policy: &Policy<'_>,
    logits: &SvfLogits,
    prompts: &[Vec<u32>],
    candidates: &[u32],
    correct: &[usize],
    micro_batch: usize,
) -> Result<usize> {
    let mut right = 0;
    for (ps, cs) in prompts.chunks(micro_batch).zip(correct.chunks(micro_batch)) {
        let lp = policy
            .candidate_logprobs(Some(logits), ps, candidates)?
            .to_vec2::<f32>()?;
        for (row, &c) in lp.iter().zip(cs) {
            right += usize::from(t2_tasks::verify::choice_by_scores(row) == c);
        }
    }
    Ok(right)
}

/// Primed prompts, the options' first tokens, and each prompt's right option.
type LabelBatch = (Vec<Vec<u32>>, Vec<u32>, Vec<usize>);

struct StepOut {
    train_acc: f64,
    loss: f64,
    kl: f64,
    grads: BTreeMap<ProjId, Vec<f32>>,
    rollout_seconds: f64,
    update_seconds: f64,
}

fn z_of(p: &BTreeMap<ProjId, Vec<f32>>) -> BTreeMap<ProjId, Vec<f32>> {
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

fn accumulate(
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

fn write_log(path: &Path, log: &[LogRow]) -> Result<()> {
    let tmp = path.with_extension("csv.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| TrainError::Io(tmp.clone(), e))?;
    let mut text = String::from(CSV_HEADER);
    text.push('\n');
    for r in log {
        text.push_str(&r.csv());
        text.push('\n');
    }
    f.write_all(text.as_bytes())
        .map_err(|e| TrainError::Io(tmp.clone(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::Io(path.into(), e))
}

fn write_curve(path: &Path, name: &str, task: &str, log: &[LogRow]) -> Result<()> {
    let train: Vec<(f64, f64)> = log
        .iter()
        .filter(|r| r.train_acc.is_finite())
        .map(|r| (r.step as f64, r.train_acc))
        .collect();
    // A moving average reads better than the raw, noisy per-batch accuracy.
    let smooth: Vec<(f64, f64)> = train
        .iter()
        .enumerate()
        .map(|(i, &(x, _))| {
            let lo = i.saturating_sub(4);
            let w = &train[lo..=i];
            (x, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
        })
        .collect();
    let val: Vec<(f64, f64)> = log
        .iter()
        .filter_map(|r| r.val_acc.map(|v| (r.step as f64, v)))
        .collect();
    let svg = line_chart(
        &format!("{name}: REINFORCE on {task}"),
        "step",
        "accuracy",
        (0.0, 1.0),
        &[
            Series {
                name: "train batch".into(),
                color: "#9ecae1",
                points: train,
            },
            Series {
                name: "train (avg of 5)".into(),
                color: "#3182bd",
                points: smooth,
            },
            Series {
                name: "validation".into(),
                color: "#e6550d",
                points: val,
            },
        ],
    );
    std::fs::write(path, svg).map_err(|e| TrainError::Io(path.into(), e))
}

fn progress_bar(show: bool, len: u64, pos: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] step {pos}/{len} eta {eta} {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_position(pos);
    bar
}
