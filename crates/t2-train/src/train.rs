//! `t2 train`: REINFORCE on the SVF logits of one task.
//!
//! Each step samples a batch of training prompts (seeded by step), generates answers with the current
//! expert through the serving scheduler (every prompt of the step in one batch), scores them with the
//! task's verifier (+1 right, −1 wrong), and ascends J = mean_i r_i·mean_t log π(y_it | x_i, y_i<t)
//! − λ·KL(π_z ‖ π_base) with Adam on the logits p (z = sigmoid(p)), gradient norm clipped. Every
//! `eval_every` steps the expert is scored on the validation split and the best one is kept. Rollouts are
//! greedy by default, prompts are drawn by seed and step, and the checkpoint holds Adam's moments: the
//! same command gives the same loss trace, resumed or not.
//!
//! This module is the loop (resume, validation, checkpoints, the expert it writes); one step's gradient is
//! in `step` (generated rollouts), `label` (the label policy) or `options` (the option policy), the run's log and curve in `runlog`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use t2_adapt::Answerer;
use t2_engine::{Adaptation, Engine, ZVectors};
use t2_model::{ProjId, SamplingParams};
use t2_svf::{Expert, ExpertMeta, ExpertStore};
use t2_tasks::{Split, Task, TaskItem};

use crate::adam::{clip_grad_norm, Adam};
use crate::checkpoint::{Checkpoint, TrainState};
use crate::config::{RunOptions, TrainConfig};
use crate::policy::{Policy, SvfLogits};
use crate::runlog::{read_log, write_curve, write_log, LogRow};
use crate::step::{sample_batch, z_of, StepOut};
use crate::{Result, TrainError};

/// Items the serving engine scores in one batch (the choice policies' validation and baseline picks).
const SCORED_TOGETHER: usize = 32;

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
        let multiple_choice = |i: &TaskItem| matches!(i.answer, t2_tasks::Answer::Choice { .. });
        if (cfg.label_policy || cfg.option_policy)
            && !train_items.iter().chain(&val_items).all(multiple_choice)
        {
            // Before any work: the policy reads each item's options.
            return Err(TrainError::Config(format!(
                "the {} policy needs a multiple-choice task; '{}' is not one",
                if cfg.label_policy { "label" } else { "option" },
                cfg.task
            )));
        }
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
            } else if cfg.option_policy {
                self.option_step(cfg, &area, &batch, &p, &policy)?
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

    /// How many of `items` the expert with logits `p` answers right on the serving engine (the expert
    /// leased as a mix), a chunk of items at a time: `right` says, for each item of a chunk, whether its
    /// pick is right.
    pub(crate) fn right_on_engine(
        &self,
        items: &[TaskItem],
        p: &BTreeMap<ProjId, Vec<f32>>,
        right: impl Fn(&Engine, &[TaskItem], u32) -> Result<Vec<bool>>,
    ) -> Result<usize> {
        let engine = self.engine();
        let lease = engine.lease(&Adaptation::Vectors(ZVectors::new(z_of(p))))?;
        let mut n = 0;
        for chunk in items.chunks(SCORED_TOGETHER) {
            n += right(engine, chunk, lease.id())?
                .into_iter()
                .filter(|r| *r)
                .count();
        }
        Ok(n)
    }

    fn validate(
        &self,
        area: &str,
        items: &[TaskItem],
        cfg: &TrainConfig,
        p: &BTreeMap<ProjId, Vec<f32>>,
    ) -> Result<f64> {
        if cfg.label_policy {
            return Ok(self.label_right(area, items, p)? as f64 / items.len() as f64);
        }
        if cfg.option_policy {
            return Ok(self.option_right(area, items, p)? as f64 / items.len() as f64);
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
