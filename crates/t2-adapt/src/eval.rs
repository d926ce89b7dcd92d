//! `t2 eval`: accuracy with a 95% Wilson interval, for any set of tasks × adaptations in one run.
//!
//! Generation mode sends every (task, adaptation, item) to the serving scheduler at once, so different
//! adaptations share batches, then verifies each answer. Log-likelihood mode (multiple choice only) picks
//! the option whose tokens are most likely after the prompt: the prompt is prefilled once per item and
//! each option is scored on top of it, several items per forward. Label mode (multiple choice) reads the
//! options' first tokens (letters for lettered tasks) as the reply's first token, exactly as `t2 train
//! --rollouts label` scores them (`crate::label`).
//!
//! Every result keeps which items it got right, so that two adaptations on the same items are compared
//! by McNemar's exact test on the items where they disagree ([`paired`]), not only by their intervals.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use t2_engine::{Adaptation, Engine, RoutePolicy, RouteStrategy, Router};
use t2_model::{ChatMessage, SamplingParams, SeqStep, WantLogits};
use t2_tasks::{Answer, Split, Task, TaskItem};

use crate::rollout::Job;
use crate::{AdaptError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvalMode {
    /// Greedy answers, checked by the task's verifier.
    Generate,
    /// Multiple choice: the option with the highest summed log-probability.
    LogLikelihood,
    /// The routing task: pass 1's label against the request's true category (a confusion matrix).
    Route,
    /// Multiple choice: the most likely of the options' first tokens (letters when lettered) as the
    /// reply's first token, the label policy's protocol.
    Label,
}

impl std::str::FromStr for EvalMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "generate" => Ok(Self::Generate),
            "loglik" | "log-likelihood" => Ok(Self::LogLikelihood),
            "route" => Ok(Self::Route),
            "label" => Ok(Self::Label),
            _ => Err(format!(
                "unknown eval mode '{s}' (generate, loglik, route, label)"
            )),
        }
    }
}

pub struct EvalConfig {
    pub data_dir: std::path::PathBuf,
    pub tasks: Vec<String>,
    /// (label, adaptation) pairs, e.g. ("base", Base), ("math", Expert("math")).
    pub adaptations: Vec<(String, Adaptation)>,
    /// (label, strategy, policy): answers routed by pass 1 (prompt or classifier).
    pub routes: Vec<(String, RouteStrategy, RoutePolicy)>,
    pub split: Split,
    /// A fixed-seed sample of `limit` items of each split (see [`subset`]).
    pub limit: Option<usize>,
    /// Tokens per answer (None: by answer kind).
    pub max_new_tokens: Option<usize>,
    pub mode: EvalMode,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalResult {
    pub task: String,
    pub area: String,
    pub split: String,
    pub adaptation: String,
    pub mode: EvalMode,
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub ci95: (f64, f64),
    pub seconds: f64,
    /// Routed answers: how many items pass 1 sent to each label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routed: Option<BTreeMap<String, usize>>,
    /// Route mode: true category → predicted label → count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confusion: Option<BTreeMap<String, BTreeMap<String, usize>>>,
    /// Which items were right, in item order ('1' right, '0' wrong): what paired tests need.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub per_item: String,
    /// Route mode: pass 1's label for each item, in item order. With each label's answers (the expert
    /// alone on the same items) it gives the routed answers of the whole split without a second pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

/// The answer length that fits each kind of task: a number, a label or letter, a small function.
pub fn default_max_tokens(items: &[TaskItem]) -> usize {
    match items.first().map(|i| &i.answer) {
        Some(Answer::Python { .. }) => 192,
        Some(Answer::Choice { .. }) => 32,
        _ => 96,
    }
}

/// Wilson score interval at 95% for `k` successes out of `n`.
pub fn wilson_interval(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let (n, p) = (n as f64, k as f64 / n as f64);
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

pub fn load_items(cfg: &EvalConfig, name: &str) -> Result<(Task, Vec<TaskItem>)> {
    let task = Task::open(&cfg.data_dir, name)?;
    let mut items = task.items(cfg.split)?;
    if let Some(l) = cfg.limit {
        items = subset(items, l);
    }
    if items.is_empty() {
        return Err(AdaptError::Config(format!(
            "task '{name}' has no {} items",
            cfg.split.as_str()
        )));
    }
    Ok((task, items))
}

/// `n` items chosen by a fixed seed, in file order: split files may be grouped (the routing task lists
/// its sources one after another), so "the first n" would not be a fair sample.
pub fn subset(items: Vec<TaskItem>, n: usize) -> Vec<TaskItem> {
    if n >= items.len() {
        return items;
    }
    subset_and_next(&items, n, 0).0
}

/// [`subset`]'s `n` items, and the `m` items its fixed-seed order draws next (none of the first): a
/// sample and a disjoint second one, where the sample is what `subset(items, n)` gives.
pub fn subset_and_next(items: &[TaskItem], n: usize, m: usize) -> (Vec<TaskItem>, Vec<TaskItem>) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut idx: Vec<usize> = (0..items.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(0x7461_736b));
    let take = |range: &[usize]| {
        let mut keep = range.to_vec();
        keep.sort_unstable();
        keep.into_iter().map(|i| items[i].clone()).collect()
    };
    let n = n.min(items.len());
    (take(&idx[..n]), take(&idx[n..(n + m).min(items.len())]))
}

/// Generation mode: every task × adaptation in one stream of jobs.
pub fn evaluate_generate(
    answerer: &crate::Answerer,
    cfg: &EvalConfig,
    progress: bool,
) -> Result<Vec<EvalResult>> {
    let mut results = Vec::new();
    let mut groups = Vec::new();
    let mut jobs = Vec::new();
    let gen = answerer.generator();
    // Fixed adaptations answer directly; routed ones run pass 1 first (the router is built once).
    enum Choice<'a> {
        Fixed(&'a Adaptation),
        Routed(RouteStrategy, RoutePolicy),
    }
    let choices: Vec<(&String, Choice)> = cfg
        .adaptations
        .iter()
        .map(|(label, a)| (label, Choice::Fixed(a)))
        .chain(
            cfg.routes
                .iter()
                .map(|(label, strategy, policy)| (label, Choice::Routed(*strategy, *policy))),
        )
        .collect();
    let router = match cfg.routes.is_empty() {
        true => None,
        false => Some(router_of(gen.engine())?),
    };
    for name in &cfg.tasks {
        let (task, items) = load_items(cfg, name)?;
        let max_tokens = cfg
            .max_new_tokens
            .unwrap_or_else(|| default_max_tokens(&items));
        for (label, choice) in &choices {
            if let Choice::Fixed(a) = choice {
                gen.engine().check_adaptation(a)?;
            }
            let start = jobs.len();
            for it in &items {
                let user = crate::prompt::user_message(&task.info.area, it);
                let (adaptation, route) = match choice {
                    Choice::Fixed(a) => ((*a).clone(), None),
                    Choice::Routed(strategy, policy) => {
                        let router = router.as_ref().expect("built when there are routes");
                        let spec = router.spec(gen.engine(), *strategy, &user, *policy)?;
                        (Adaptation::base(), Some(spec))
                    }
                };
                jobs.push(Job {
                    prompt: gen.chat_prompt(&user)?,
                    adaptation,
                    max_tokens,
                    sampling: SamplingParams::default(),
                    route,
                    also_score: Vec::new(),
                });
            }
            groups.push((task.clone(), items.clone(), (*label).clone(), start));
        }
    }
    let bar = if progress {
        let b = indicatif::ProgressBar::new(jobs.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} answers eta {eta}",
            )
            .expect("a valid template"),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = Instant::now();
    let rollouts = gen.run(jobs, Some(&bar))?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    for (task, items, label, start) in groups {
        let pairs: Vec<_> = items
            .iter()
            .zip(&rollouts[start..start + items.len()])
            .map(|(it, r)| (&it.answer, r.text.as_str()))
            .collect();
        let verdicts = t2_tasks::verify::verify_all(&pairs, answerer.sandbox());
        let correct = verdicts.iter().filter(|v| v.correct).count();
        let mut r = result(
            &task,
            cfg,
            &label,
            EvalMode::Generate,
            items.len(),
            correct,
            seconds,
        );
        r.per_item = per_item(verdicts.iter().map(|v| v.correct));
        let decisions = &rollouts[start..start + items.len()];
        if decisions.iter().any(|r| r.decision.is_some()) {
            let mut routed = BTreeMap::new();
            for d in decisions.iter().filter_map(|r| r.decision.as_ref()) {
                *routed.entry(d.label.clone()).or_insert(0) += 1;
            }
            r.routed = Some(routed);
        }
        results.push(r);
    }
    Ok(results)
}

fn router_of(engine: &Engine) -> Result<Router> {
    Router::from_engine(engine)?
        .ok_or_else(|| AdaptError::Config("routing needs experts, and none is loaded".into()))
}

/// Route mode: pass 1 alone on the routing task's requests, against their true category.
pub fn evaluate_routing(
    answerer: &crate::Answerer,
    cfg: &EvalConfig,
    progress: bool,
) -> Result<Vec<EvalResult>> {
    if cfg.routes.is_empty() {
        return Err(AdaptError::Config(
            "route mode evaluates routing strategies: give --adaptation route:prompt and/or \
             route:classifier"
                .into(),
        ));
    }
    let gen = answerer.generator();
    let router = router_of(gen.engine())?;
    let mut results = Vec::new();
    for name in &cfg.tasks {
        let (task, items) = load_items(cfg, name)?;
        // A routing task labels each request; any other task's requests all belong to its area, which
        // is how pass 1 is measured on the areas' own test splits.
        let routing_task = task.info.area == "routing";
        for (label, strategy, policy) in &cfg.routes {
            let started = Instant::now();
            let mut jobs = Vec::new();
            let mut truth = Vec::new();
            for it in &items {
                truth.push(match &it.answer {
                    Answer::Choice {
                        options, correct, ..
                    } if routing_task => options[*correct].clone(),
                    _ if routing_task => {
                        return Err(AdaptError::Config(format!("{} has no label", it.id)))
                    }
                    _ => task.info.area.clone(),
                });
                // Pass 2 is cut to one token: only the decision is measured.
                jobs.push(Job {
                    prompt: gen.chat_prompt(&it.prompt)?,
                    adaptation: Adaptation::base(),
                    max_tokens: 1,
                    sampling: SamplingParams::default(),
                    route: Some(router.spec(gen.engine(), *strategy, &it.prompt, *policy)?),
                    also_score: Vec::new(),
                });
            }
            let bar = if progress {
                indicatif::ProgressBar::new(jobs.len() as u64)
            } else {
                indicatif::ProgressBar::hidden()
            };
            let rollouts = gen.run(jobs, Some(&bar))?;
            bar.finish_and_clear();
            let mut confusion: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
            let mut correct = 0;
            let mut labels = Vec::with_capacity(items.len());
            for (t, r) in truth.iter().zip(&rollouts) {
                let predicted = r
                    .decision
                    .as_ref()
                    .map(|d| d.label.clone())
                    .unwrap_or_else(|| "none".into());
                correct += usize::from(&predicted == t);
                labels.push(predicted.clone());
                *confusion
                    .entry(t.clone())
                    .or_default()
                    .entry(predicted)
                    .or_insert(0) += 1;
            }
            let mut r = result(
                &task,
                cfg,
                label,
                EvalMode::Route,
                items.len(),
                correct,
                started.elapsed().as_secs_f64(),
            );
            r.confusion = Some(confusion);
            r.per_item = per_item(truth.iter().zip(&labels).map(|(t, l)| t == l));
            r.labels = labels;
            results.push(r);
        }
    }
    Ok(results)
}

fn result(
    task: &Task,
    cfg: &EvalConfig,
    label: &str,
    mode: EvalMode,
    n: usize,
    correct: usize,
    seconds: f64,
) -> EvalResult {
    EvalResult {
        task: task.info.name.clone(),
        area: task.info.area.clone(),
        split: cfg.split.as_str().into(),
        adaptation: label.into(),
        mode,
        n,
        correct,
        accuracy: correct as f64 / n as f64,
        ci95: wilson_interval(correct, n),
        seconds,
        routed: None,
        confusion: None,
        per_item: String::new(),
        labels: Vec::new(),
    }
}

/// One adaptation's run over one task's multiple-choice items, scored item by item.
struct Scored<'a> {
    task: &'a Task,
    cfg: &'a EvalConfig,
    label: &'a str,
    mode: EvalMode,
    started: Instant,
}

impl Scored<'_> {
    /// Scores `n` items 16 at a time (`right_of` says, for a range of items, which were answered right),
    /// with a progress bar, into the run's result.
    fn chunked(
        self,
        n: usize,
        progress: bool,
        mut right_of: impl FnMut(std::ops::Range<usize>) -> Result<Vec<bool>>,
    ) -> Result<EvalResult> {
        let bar = if progress {
            indicatif::ProgressBar::new(n as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut right = Vec::with_capacity(n);
        for start in (0..n).step_by(16) {
            let range = start..(start + 16).min(n);
            bar.inc(range.len() as u64);
            right.extend(right_of(range)?);
        }
        bar.finish_and_clear();
        let mut r = result(
            self.task,
            self.cfg,
            self.label,
            self.mode,
            n,
            right.iter().filter(|&&r| r).count(),
            self.started.elapsed().as_secs_f64(),
        );
        r.per_item = per_item(right.into_iter());
        Ok(r)
    }
}

fn per_item(right: impl Iterator<Item = bool>) -> String {
    right.map(|r| if r { '1' } else { '0' }).collect()
}

/// Log-likelihood mode for multiple-choice tasks.
pub fn evaluate_loglik(
    engine: &Arc<Engine>,
    cfg: &EvalConfig,
    progress: bool,
) -> Result<Vec<EvalResult>> {
    let mut results = Vec::new();
    for name in &cfg.tasks {
        let (task, items) = load_items(cfg, name)?;
        if !items
            .iter()
            .all(|i| matches!(i.answer, Answer::Choice { .. }))
        {
            return Err(AdaptError::Config(format!(
                "log-likelihood scoring needs a multiple-choice task; '{name}' is not one"
            )));
        }
        for (label, a) in &cfg.adaptations {
            let started = Instant::now();
            let lease = engine.lease(a)?;
            let mix = lease.id();
            let run = Scored {
                task: &task,
                cfg,
                label,
                mode: EvalMode::LogLikelihood,
                started,
            };
            results.push(run.chunked(items.len(), progress, |range| {
                let chunk = &items[range];
                let picks = pick_by_loglik(engine, &task.info.area, chunk, mix)?;
                Ok(chunk
                    .iter()
                    .zip(picks)
                    .filter_map(|(it, pick)| match it.answer {
                        Answer::Choice { correct: c, .. } => Some(pick == c),
                        _ => None,
                    })
                    .collect())
            })?);
        }
    }
    Ok(results)
}

/// Label mode for multiple-choice tasks: each item's pick is its most likely candidate first token
/// (`crate::label`), several items per forward.
pub fn evaluate_label(
    engine: &Arc<Engine>,
    cfg: &EvalConfig,
    progress: bool,
) -> Result<Vec<EvalResult>> {
    let mut results = Vec::new();
    for name in &cfg.tasks {
        let (task, items) = load_items(cfg, name)?;
        let labelled = items
            .iter()
            .map(|it| crate::label::label_item(engine, &task.info.area, it))
            .collect::<Result<Vec<_>>>()?;
        for (label, a) in &cfg.adaptations {
            let started = Instant::now();
            let lease = engine.lease(a)?;
            let run = Scored {
                task: &task,
                cfg,
                label,
                mode: EvalMode::Label,
                started,
            };
            results.push(run.chunked(items.len(), progress, |range| {
                let chunk = &labelled[range];
                let picks = crate::label::pick_by_label(engine, chunk, lease.id())?;
                Ok(chunk
                    .iter()
                    .zip(picks)
                    .map(|(it, p)| p == it.correct)
                    .collect())
            })?);
        }
    }
    Ok(results)
}

/// An item as log-likelihood scoring reads it: the prompt up to the reply (an item's stem, the question
/// without its lettered options, when it has one), and each option's tokens as the reply's continuation. `t2 train --rollouts options` scores the same tokens.
pub fn loglik_tokens(
    engine: &Engine,
    area: &str,
    it: &TaskItem,
) -> Result<(Vec<u32>, Vec<Vec<u32>>)> {
    let tok = &engine.loaded.tokenizer;
    let Answer::Choice { options: opts, .. } = &it.answer else {
        return Err(AdaptError::Config(format!(
            "{} is not multiple choice",
            it.id
        )));
    };
    // A primed reply ("This request is about") is continued by the option after a space.
    let prefix = crate::prompt::answer_prefix(area);
    let prompt = if area == "routing" {
        // Exactly the tokens the server's pass 1 scores.
        t2_engine::routing::routing_tokens(engine, &it.prompt, opts)?.0
    } else {
        let mut prompt = engine.encode_chat(&[ChatMessage::new(
            "user",
            it.stem
                .as_deref()
                .unwrap_or(&crate::prompt::user_message(area, it)),
        )])?;
        if let Some(p) = prefix {
            prompt.extend(tok.encode(p).map_err(|e| AdaptError::Engine(e.into()))?);
        }
        prompt
    };
    let options = opts
        .iter()
        .map(|o| match prefix {
            Some(_) => tok.encode(&format!(" {o}")),
            None => tok.encode(o),
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| AdaptError::Engine(e.into()))?;
    Ok((prompt, options))
}

/// For each item, the index of its most likely option (summed log-probability of the option's tokens as
/// the assistant's reply).
pub fn pick_by_loglik(
    engine: &Engine,
    area: &str,
    items: &[TaskItem],
    mix: u32,
) -> Result<Vec<usize>> {
    let mixes = vec![mix; items.len()];
    Ok(option_scores(engine, area, items, &mixes)?
        .iter()
        .map(|s| {
            let f: Vec<f32> = s.iter().map(|&x| x as f32).collect();
            t2_tasks::verify::choice_by_scores(&f)
        })
        .collect())
}

/// For each item, every option's summed log-probability as the assistant's reply, item i under mix
/// `mixes[i]` (items with different mixes share the batch).
pub fn option_scores(
    engine: &Engine,
    area: &str,
    items: &[TaskItem],
    mixes: &[u32],
) -> Result<Vec<Vec<f64>>> {
    assert_eq!(items.len(), mixes.len(), "one mix per item");
    let model = &engine.loaded.model;
    let mut prompts = Vec::with_capacity(items.len());
    let mut options = Vec::with_capacity(items.len());
    for it in items {
        let (p, o) = loglik_tokens(engine, area, it)?;
        prompts.push(p);
        options.push(o);
    }
    // Room for each prompt and its longest option.
    let lengths: Vec<usize> = prompts
        .iter()
        .zip(&options)
        .map(|(p, o)| p.len() + o.iter().map(Vec::len).max().unwrap_or(0))
        .collect();
    let (pool, mut caches) = model.pool_for(&lengths)?;
    let mut steps: Vec<SeqStep<'_>> = caches
        .iter_mut()
        .zip(&prompts)
        .enumerate()
        .map(|(i, (kv, p))| SeqStep {
            kv,
            tokens: p,
            mix: mixes[i],
            want: WantLogits::Last,
        })
        .collect();
    let first = model.forward(&mut steps, engine.projector(), &pool)?;
    drop(steps);
    let first: Vec<Vec<f32>> = first
        .into_iter()
        .map(|l| log_softmax(&l.expect("asked for").to_vec1::<f32>()?))
        .collect::<std::result::Result<_, candle_core::Error>>()?;
    let mut scores: Vec<Vec<f64>> = options.iter().map(|o| vec![0.0; o.len()]).collect();
    let most = options.iter().map(Vec::len).max().unwrap_or(0);
    for k in 0..most {
        // Option k of every item that has one, on top of its prompt; the cache is cut back afterwards.
        let mut idx = Vec::new();
        let mut steps = Vec::new();
        for (i, cache) in caches.iter_mut().enumerate() {
            if let Some(o) = options[i].get(k).filter(|o| !o.is_empty()) {
                idx.push(i);
                steps.push(SeqStep {
                    kv: cache,
                    tokens: o,
                    mix: mixes[i],
                    want: WantLogits::All,
                });
            }
        }
        let out = model.forward(&mut steps, engine.projector(), &pool)?;
        drop(steps);
        for (&i, logits) in idx.iter().zip(out) {
            let o = &options[i][k];
            let rows = logits.expect("asked for").to_vec2::<f32>()?;
            let mut s = first[i][o[0] as usize] as f64;
            for (row, &t) in rows.iter().zip(&o[1..]) {
                s += log_softmax(row)?[t as usize] as f64;
            }
            scores[i][k] = s;
        }
        for (i, cache) in caches.iter_mut().enumerate() {
            cache.len = prompts[i].len();
        }
    }
    Ok(scores)
}

fn log_softmax(x: &[f32]) -> std::result::Result<Vec<f32>, candle_core::Error> {
    let lse = t2_model::sampling::log_sum_exp(x);
    Ok(x.iter().map(|&v| v - lse).collect())
}

/// The results as a markdown table.
pub fn markdown(results: &[EvalResult]) -> String {
    let mut s = String::from("| task | area | split | adaptation | mode | n | accuracy | 95% CI |\n|---|---|---|---|---|---|---|---|\n");
    for r in results {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.1}% | {:.1}–{:.1}% |\n",
            r.task,
            r.area,
            r.split,
            r.adaptation,
            mode_name(r.mode),
            r.n,
            100.0 * r.accuracy,
            100.0 * r.ci95.0,
            100.0 * r.ci95.1
        ));
    }
    let pairs = paired(results, "base");
    if !pairs.is_empty() {
        s.push_str(
            "\nPaired against base on the same items (McNemar's exact test on the items where they \
             disagree):\n\n| task | adaptation | mode | n | base only right | only it right | p (two-sided) |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for p in &pairs {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                p.task,
                p.adaptation,
                p.mode,
                p.n,
                p.only_reference,
                p.only_other,
                format_p(p.p_value)
            ));
        }
    }
    for r in results {
        if let Some(routed) = &r.routed {
            let parts: Vec<String> = routed.iter().map(|(k, v)| format!("{k} {v}")).collect();
            s.push_str(&format!(
                "\n{} / {}: pass 1 routed {}\n",
                r.task,
                r.adaptation,
                parts.join(", ")
            ));
        }
        if let Some(c) = &r.confusion {
            s.push_str(&confusion_markdown(r, c));
        }
    }
    s
}

/// One adaptation against the reference on the same items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    pub task: String,
    pub adaptation: String,
    pub mode: String,
    pub n: usize,
    /// Items only the reference got right.
    pub only_reference: usize,
    /// Items only this adaptation got right.
    pub only_other: usize,
    pub p_value: f64,
}

/// Every result paired with the `reference` adaptation's result on the same task, split, mode and items.
pub fn paired(results: &[EvalResult], reference: &str) -> Vec<Paired> {
    let mut out = Vec::new();
    for r in results.iter().filter(|r| r.adaptation != reference) {
        let Some(base) = results.iter().find(|b| {
            b.adaptation == reference
                && b.task == r.task
                && b.split == r.split
                && b.mode == r.mode
                && b.per_item.len() == r.per_item.len()
                && !b.per_item.is_empty()
        }) else {
            continue;
        };
        let (mut only_reference, mut only_other) = (0, 0);
        for (x, y) in base.per_item.chars().zip(r.per_item.chars()) {
            match (x, y) {
                ('1', '0') => only_reference += 1,
                ('0', '1') => only_other += 1,
                _ => {}
            }
        }
        out.push(Paired {
            task: r.task.clone(),
            adaptation: r.adaptation.clone(),
            mode: mode_name(r.mode).into(),
            n: r.n,
            only_reference,
            only_other,
            p_value: mcnemar_exact(only_reference, only_other),
        });
    }
    out
}

/// McNemar's exact test: the two-sided p-value of `b` against `c` discordant pairs, each pair equally
/// likely to fall either way under the null (a binomial test with p = ½ on b + c trials). Summed in logs,
/// because a whole split can have hundreds of discordant pairs.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    let ln_choose = |n: usize, i: usize| -> f64 {
        (1..=i)
            .map(|j| ((n - i + j) as f64).ln() - (j as f64).ln())
            .sum()
    };
    let half = (0..=k)
        .map(|i| (ln_choose(n, i) - n as f64 * std::f64::consts::LN_2).exp())
        .sum::<f64>();
    (2.0 * half).min(1.0)
}

fn mode_name(m: EvalMode) -> &'static str {
    match m {
        EvalMode::Generate => "generate",
        EvalMode::LogLikelihood => "loglik",
        EvalMode::Route => "route",
        EvalMode::Label => "label",
    }
}

fn format_p(p: f64) -> String {
    if p < 1e-4 {
        format!("{p:.1e}")
    } else {
        format!("{p:.4}")
    }
}

/// Rows: true category; columns: the label pass 1 chose.
fn confusion_markdown(r: &EvalResult, c: &BTreeMap<String, BTreeMap<String, usize>>) -> String {
    let mut cols: Vec<&String> = c.values().flat_map(|m| m.keys()).collect();
    cols.sort();
    cols.dedup();
    let mut s = format!(
        "\n{} / {} (rows: true category, columns: pass-1 label)\n\n| true \\ chosen |",
        r.task, r.adaptation
    );
    for col in &cols {
        s.push_str(&format!(" {col} |"));
    }
    s.push_str(&format!("\n|---|{}\n", "---|".repeat(cols.len())));
    for (t, row) in c {
        s.push_str(&format!("| {t} |"));
        for col in &cols {
            s.push_str(&format!(" {} |", row.get(*col).copied().unwrap_or(0)));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcnemar_exact_matches_hand_computed_values() {
        // 1 against 9: 2·(C(10,0) + C(10,1))/2¹⁰ = 22/1024.
        assert!((mcnemar_exact(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert!((mcnemar_exact(9, 1) - 22.0 / 1024.0).abs() < 1e-12);
        // 2 against 3: the smaller tail is 16/32, doubled past 1.
        assert!((mcnemar_exact(2, 3) - 1.0).abs() < 1e-12);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // 0 against 6: 2/64.
        assert!((mcnemar_exact(0, 6) - 2.0 / 64.0).abs() < 1e-12);
        // 40 against 70: 2·Σ_{i≤40} C(110,i)/2¹¹⁰ = 0.0054474295 (exact integer sums).
        assert!((mcnemar_exact(40, 70) - 0.005_447_429_5).abs() < 1e-9);
    }

    #[test]
    fn paired_counts_discordant_items_against_base() {
        let mk = |adaptation: &str, per_item: &str| {
            let correct = per_item.chars().filter(|&c| c == '1').count();
            EvalResult {
                task: "t".into(),
                area: "a".into(),
                split: "test".into(),
                adaptation: adaptation.into(),
                mode: EvalMode::Label,
                n: per_item.len(),
                correct,
                accuracy: correct as f64 / per_item.len() as f64,
                ci95: wilson_interval(correct, per_item.len()),
                seconds: 0.0,
                routed: None,
                confusion: None,
                per_item: per_item.into(),
                labels: Vec::new(),
            }
        };
        let results = [mk("base", "110010"), mk("x", "011011")];
        let p = paired(&results, "base");
        assert_eq!(p.len(), 1);
        // Item 0: only base; items 2 and 5: only x.
        assert_eq!((p[0].only_reference, p[0].only_other), (1, 2));
        // 1 against 2: the smaller tail is (1 + 3)/8, doubled.
        assert!((p[0].p_value - 1.0).abs() < 1e-12);
        assert!(markdown(&results).contains("| t | x | label | 6 | 1 | 2 | 1.0000 |"));
    }

    #[test]
    fn wilson_interval_matches_known_values() {
        // 50/100: 0.4038–0.5962; 0/10: 0–0.2775; 10/10: 0.7225–1 (standard Wilson figures).
        let (lo, hi) = wilson_interval(50, 100);
        assert!(
            (lo - 0.4038).abs() < 1e-3 && (hi - 0.5962).abs() < 1e-3,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson_interval(0, 10);
        assert!(lo.abs() < 1e-12 && (hi - 0.2775).abs() < 1e-3, "{lo} {hi}");
        let (lo, hi) = wilson_interval(10, 10);
        assert!(
            (lo - 0.7225).abs() < 1e-3 && (hi - 1.0).abs() < 1e-12,
            "{lo} {hi}"
        );
    }
}
