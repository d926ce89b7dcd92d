//! `t2 train` and `t2 eval`: the CLI edge of the RL trainer and the evaluator.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use t2_adapt::eval::{
    evaluate_generate, evaluate_label, evaluate_loglik, evaluate_routing, markdown,
};
use t2_adapt::{Answerer, EvalConfig, EvalMode};
use t2_engine::{Adaptation, ZVectors};
use t2_svf::{Expert, TargetSet};
use t2_tasks::Split;
use t2_train::{RunOptions, TrainConfig, Trainer};

use crate::common::{open_engine, ModelArgs, SvfArgs};

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub svf: SvfArgs,
    /// Task to train on (a folder of the data directory, e.g. arith, pyfunc, arc_easy, sst2, route)
    #[arg(long)]
    pub task: String,
    /// Name of the expert to write
    #[arg(long)]
    pub name: String,
    /// Pass-1 label the expert serves [default: the task's area]
    #[arg(long, default_value = "")]
    pub category: String,
    /// Matrices the expert adapts (the research code adapts the MLP only)
    #[arg(long, default_value = "mlp")]
    pub expert_targets: TargetSet,
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Prompts per step (the whole training split when smaller)
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Gradient L2-norm clip
    #[arg(long, default_value_t = 1e-3)]
    pub clip: f64,
    /// λ of the KL penalty against the base model
    #[arg(long, default_value_t = 0.0)]
    pub kl: f64,
    /// Validate (and keep the best) every this many steps
    #[arg(long, default_value_t = 10)]
    pub eval_every: usize,
    /// Validation items used for selection (a fixed-seed sample)
    #[arg(long, default_value_t = 256)]
    pub val_limit: usize,
    /// Tokens per rollout [default: by answer kind: 96 numbers, 32 choices, 192 code]
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Rollout temperature (0 = greedy, as in the paper)
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sequences per forward/backward pass (memory only; results do not change)
    #[arg(long, default_value_t = 8)]
    pub micro_batch: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 0.1)]
    pub init_mean: f32,
    #[arg(long, default_value_t = 0.01)]
    pub init_std: f32,
    /// Task data directory
    #[arg(long, env = "T2_DATA", default_value = "data/tasks")]
    pub data: PathBuf,
    /// Run folder (checkpoint, log.csv, curve.svg) [default: runs/<name>]
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the run folder's checkpoint
    #[arg(long)]
    pub resume: bool,
    /// Write the expert only into the run folder, not into the expert store
    #[arg(long)]
    pub no_install: bool,
    /// Stop after this many steps of this invocation (resume later)
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Sequences generated together in a rollout
    #[arg(long, default_value_t = 32)]
    pub rollout_batch: usize,
    /// generate (answers checked by the verifier) or label (multiple choice: π over the options' first
    /// tokens, as pass-1 routing reads it) or options (multiple choice: π over the options' whole texts by
    /// log-likelihood, as `t2 eval --mode loglik` scores them) [default: label for routing tasks, else
    /// generate]
    #[arg(long)]
    pub rollouts: Option<String>,
    /// Subtract the batch's mean reward from each reward (a REINFORCE baseline; the paper has none)
    #[arg(long)]
    pub reward_baseline: bool,
    /// With --rollouts options: ascend each item's exact expected reward over its options (every option
    /// weighted by π) instead of the greedy pick's reward
    #[arg(long)]
    pub expected_reward: bool,
}

pub fn train(a: TrainArgs) -> Result<()> {
    let task = t2_tasks::Task::open(&a.data, &a.task)?;
    let items = task.items(Split::Train)?;
    let (label_policy, option_policy) = match a.rollouts.as_deref() {
        None => (task.info.area == "routing", false),
        Some("generate") => (false, false),
        Some("label") => (true, false),
        Some("options") => (false, true),
        Some(other) => bail!("unknown --rollouts '{other}' (generate, label, options)"),
    };
    let cfg = TrainConfig {
        task: a.task.clone(),
        name: a.name.clone(),
        category: a.category.clone(),
        targets: a.expert_targets,
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        clip: a.clip,
        kl: a.kl,
        eval_every: a.eval_every,
        val_limit: a.val_limit,
        max_new_tokens: a
            .max_new_tokens
            .unwrap_or_else(|| t2_adapt::eval::default_max_tokens(&items)),
        temperature: a.temperature,
        micro_batch: a.micro_batch,
        seed: a.seed,
        init_mean: a.init_mean,
        init_std: a.init_std,
        label_policy,
        reward_baseline: a.reward_baseline,
        option_policy,
        expected_reward: a.expected_reward,
    };
    cfg.check()?;
    let engine = Arc::new(open_engine(&a.model, &a.svf, true)?);
    let trainer = Trainer::new(engine, a.rollout_batch)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&a.name));
    let opts = RunOptions {
        data_dir: a.data.clone(),
        out_dir: out.clone(),
        experts_dir: (!a.no_install).then(|| a.svf.experts_dir.clone()),
        resume: a.resume,
        stop_after: a.stop_after,
        progress: true,
        command: command_line(),
    };
    let s = trainer.train(&cfg, &opts)?;
    eprintln!(
        "trained {} steps in {:.0} s; best validation accuracy {:.3} at step {}; log {}",
        s.steps,
        s.seconds,
        s.best_val,
        s.best_step,
        out.join("log.csv").display()
    );
    match s.expert_path {
        Some(p) => eprintln!("expert written: {}", p.display()),
        None if s.steps < cfg.steps => eprintln!("stopped early: resume with --resume"),
        None => eprintln!(
            "expert written: {}",
            out.join(format!("{}.safetensors", a.name)).display()
        ),
    }
    Ok(())
}

/// The command as typed, for the expert's provenance (model paths relative, so it reproduces elsewhere).
pub fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(first) = args.first_mut() {
        *first = "t2".into();
    }
    args.join(" ")
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub svf: SvfArgs,
    /// Task(s) to evaluate (repeatable, or comma-separated)
    #[arg(long, required = true, value_delimiter = ',')]
    pub task: Vec<String>,
    /// Adaptation(s): base, an expert name, mix:a=0.7,b=0.3, file:PATH.safetensors, or pass-1 routing
    /// route:prompt / route:classifier (add :soft for soft mixing) (repeatable)
    #[arg(long, default_value = "base")]
    pub adaptation: Vec<String>,
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Evaluate a fixed-seed sample of N items of each split
    #[arg(long)]
    pub limit: Option<usize>,
    /// generate (answers checked by the verifier), loglik (multiple choice by log-likelihood) or route
    /// (pass 1's label against the routing task's true category) or label (multiple choice: the options'
    /// first tokens, letters when lettered, as `t2 train --rollouts label` scores them)
    #[arg(long, default_value = "generate")]
    pub mode: EvalMode,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long, env = "T2_DATA", default_value = "data/tasks")]
    pub data: PathBuf,
    /// Write the results as JSON here
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the results as a markdown table here
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
}

fn parse_split(s: &str) -> Result<Split> {
    Split::ALL
        .into_iter()
        .find(|x| x.as_str() == s)
        .with_context(|| format!("unknown split '{s}' (train, val, test)"))
}

/// `route:prompt`, `route:classifier`, with an optional `:soft`.
fn parse_route(
    spec: &str,
    rest: &str,
) -> Result<(String, t2_engine::RouteStrategy, t2_engine::RoutePolicy)> {
    let (strategy, soft) = match rest.split_once(':') {
        Some((s, "soft")) => (s, true),
        Some((s, "hard")) => (s, false),
        None => (rest, false),
        Some(_) => bail!(
            "bad routing adaptation '{spec}' (route:prompt or route:classifier, optionally :soft)"
        ),
    };
    let strategy = strategy.parse().map_err(|_| {
        anyhow::anyhow!("unknown routing strategy in '{spec}' (route:prompt or route:classifier)")
    })?;
    Ok((
        spec.to_string(),
        strategy,
        t2_engine::RoutePolicy {
            soft,
            threshold: 0.0,
        },
    ))
}

fn parse_adaptation(spec: &str, engine: &t2_engine::Engine) -> Result<Adaptation> {
    let a = if spec == "base" {
        Adaptation::base()
    } else if let Some(m) = spec.strip_prefix("mix:") {
        Adaptation::Mix(t2_svf::mix::parse_mix(m)?)
    } else if let Some(path) = spec.strip_prefix("file:") {
        let e = Expert::load(std::path::Path::new(path))?;
        let svf = engine.svf.as_ref().context("SVF is off")?;
        e.validate(&svf.decomp, &engine.loaded.model_id)?;
        Adaptation::Vectors(ZVectors::new(e.z))
    } else if let Some(m) = engine.experts.as_ref().and_then(|s| s.mix(spec)) {
        // A stored mix (profile), e.g. one made by `t2 adapt`.
        Adaptation::Mix(m.mix)
    } else {
        Adaptation::expert(spec.strip_prefix("expert:").unwrap_or(spec))
    };
    engine.check_adaptation(&a)?;
    Ok(a)
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let split = parse_split(&a.split)?;
    if a.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    for t in &a.task {
        t2_tasks::Task::open(&a.data, t)?;
    }
    let engine = Arc::new(open_engine(&a.model, &a.svf, true)?);
    let mut adaptations = Vec::new();
    let mut routes = Vec::new();
    for s in &a.adaptation {
        match s.strip_prefix("route:") {
            Some(r) => routes.push(parse_route(s, r)?),
            None => adaptations.push((s.clone(), parse_adaptation(s, &engine)?)),
        }
    }
    match a.mode {
        EvalMode::LogLikelihood | EvalMode::Label if !routes.is_empty() => {
            bail!("--mode loglik and label score fixed adaptations; routing (route:...) needs --mode generate")
        }
        EvalMode::Route if !adaptations.is_empty() => bail!(
            "--mode route evaluates routing strategies only (route:prompt, route:classifier), not '{}'",
            adaptations[0].0
        ),
        _ => {}
    }
    let cfg = EvalConfig {
        data_dir: a.data.clone(),
        tasks: a.task.clone(),
        adaptations,
        routes,
        split,
        limit: a.limit,
        max_new_tokens: a.max_new_tokens,
        mode: a.mode,
    };
    let results = match a.mode {
        EvalMode::Generate => {
            let answerer = Answerer::new(engine, a.batch)?;
            evaluate_generate(&answerer, &cfg, true)?
        }
        EvalMode::LogLikelihood => evaluate_loglik(&engine, &cfg, true)?,
        EvalMode::Label => evaluate_label(&engine, &cfg, true)?,
        EvalMode::Route => {
            let answerer = Answerer::new(engine, a.batch)?;
            evaluate_routing(&answerer, &cfg, true)?
        }
    };
    let table = markdown(&results);
    print!("{table}");
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&results)?)
            .with_context(|| p.display().to_string())?;
    }
    if let Some(p) = &a.markdown {
        std::fs::write(p, &table).with_context(|| p.display().to_string())?;
    }
    Ok(())
}
