//! Few-shot adaptation: a Cross-Entropy-Method search over the expert weights α, scored on a handful of
//! examples of a new task (Transformer² §3).
//!
//! Each iteration samples a population of α ∈ [0,1]^K around the current mean, answers every example
//! with every candidate in one batched generation (each row with its own mix), scores candidates by
//! verified accuracy (ties broken by the mean log-likelihood of the reference answers, scored in the same
//! batch from each answer's prompt KV), and refits mean and spread to the elites. The best candidate
//! ever seen is the result.
//!
//! Ten shots rank candidates coarsely: on sst2 most of a converged population answers all ten right,
//! and the log-likelihood tie-break then chose a diluted mix that generated worse than the sentiment
//! expert alone. Hence the sparsity prior (on by default): the first population holds the base model
//! and each expert alone, and among candidates of equal accuracy fewer experts rank first, so a mix
//! must answer more shots right than a simpler candidate to be chosen over it. Where mixes overfit the
//! shots instead of tying on them, [`crate::holdout`] makes the final choice on examples the search
//! never saw.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use t2_engine::{Adaptation, Mix};
use t2_tasks::TaskItem;

use crate::{AdaptError, Answerer, Result};

#[derive(Debug, Clone, Serialize)]
pub struct CemConfig {
    /// Candidates per iteration.
    pub population: usize,
    /// Candidates the next distribution is fitted to.
    pub elites: usize,
    pub iterations: usize,
    /// Initial spread of every α (the mean starts at 1/K).
    pub init_std: f32,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// The experts α weighs, in order.
    pub experts: Vec<String>,
    /// Score multiple-choice examples by each option's likelihood instead of generating an answer: the
    /// paper's budget (32 × 50 × 10 shots = 16,000 answers) is affordable only this way. The tie-break is
    /// then the mean log-probability of the right option among the options.
    pub likelihood: bool,
    /// Seed the first population with the base model and each expert alone, and rank fewer experts
    /// first among candidates of equal accuracy (see the module's note).
    pub sparsity_prior: bool,
}

impl CemConfig {
    /// The paper's settings over `experts`.
    pub fn paper(experts: Vec<String>) -> Self {
        Self {
            population: 32,
            elites: 6,
            iterations: 50,
            init_std: 0.5,
            seed: 0,
            max_new_tokens: 64,
            experts,
            likelihood: false,
            sparsity_prior: true,
        }
    }

    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(AdaptError::Config(m));
        if self.experts.is_empty() {
            return bad("few-shot adaptation needs at least one expert, and none is loaded".into());
        }
        if !(2..=256).contains(&self.population) {
            return bad(format!(
                "the population must be 2 to 256, got {}",
                self.population
            ));
        }
        if self.elites == 0 || self.elites >= self.population {
            return bad(format!(
                "elites must be at least 1 and fewer than the population ({}), got {}",
                self.population, self.elites
            ));
        }
        if !(1..=1000).contains(&self.iterations) {
            return bad(format!(
                "iterations must be 1 to 1000, got {}",
                self.iterations
            ));
        }
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return bad(format!(
                "the initial spread must be positive, got {}",
                self.init_std
            ));
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1".into());
        }
        Ok(())
    }
}

/// One evaluated α.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Candidate {
    pub alpha: Vec<f32>,
    /// Share of the examples answered right.
    pub accuracy: f64,
    /// Mean log-likelihood per token of the reference answers: breaks accuracy ties.
    pub loglik: Option<f64>,
}

impl Candidate {
    /// Experts the candidate weighs at all (what [`mix_of`] puts in its mix).
    pub fn experts_used(&self) -> usize {
        self.alpha.iter().filter(|&&a| a > 0.0).count()
    }

    /// The ranking order: higher accuracy first; equal accuracy: fewer experts first under the sparsity
    /// prior, then higher log-likelihood. `Greater` means `self` ranks above `other`.
    pub fn rank(&self, other: &Candidate, sparsity_prior: bool) -> std::cmp::Ordering {
        use std::cmp::Ordering::Equal;
        let by_experts = match sparsity_prior {
            true => other.experts_used().cmp(&self.experts_used()),
            false => Equal,
        };
        let by_loglik = || {
            let ll = |c: &Candidate| c.loglik.unwrap_or(f64::NEG_INFINITY);
            ll(self).total_cmp(&ll(other))
        };
        self.accuracy
            .total_cmp(&other.accuracy)
            .then(by_experts)
            .then_with(by_loglik)
    }

    pub fn better_than(&self, other: &Candidate, sparsity_prior: bool) -> bool {
        self.rank(other, sparsity_prior).is_gt()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IterationLog {
    pub iteration: usize,
    pub best: Candidate,
    pub best_so_far: Candidate,
    pub mean_accuracy: f64,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Generating and verifying the population's answers, and scoring the reference answers.
    pub eval_seconds: f64,
    /// Every candidate of the iteration, in the order drawn: lets another selection rule be applied to
    /// the same search afterwards (states saved before it was recorded have none).
    #[serde(default)]
    pub population: Vec<Candidate>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CemOutcome {
    pub mix: Mix,
    pub best: Candidate,
    pub history: Vec<IterationLog>,
    pub seconds: f64,
    /// Answers generated in all.
    pub generations: usize,
    /// The final choice on held-out examples, when one was made ([`crate::holdout::apply`]).
    pub holdout: Option<crate::holdout::HoldoutChoice>,
}

/// The mix a candidate stands for (no weight at all: the base model).
pub fn mix_of(experts: &[String], alpha: &[f32]) -> Mix {
    let alpha: BTreeMap<String, f32> = experts
        .iter()
        .zip(alpha)
        .filter(|(_, &a)| a > 0.0)
        .map(|(e, &a)| (e.clone(), a))
        .collect();
    if alpha.values().sum::<f32>() < 1e-6 {
        Mix::base()
    } else {
        Mix::new(alpha, 0.0).expect("candidate weights are clamped to [0, 1]")
    }
}

/// How one candidate did on the examples.
#[derive(Debug, Clone)]
pub struct ShotResults {
    /// Per example, whether it was answered right.
    pub correct: Vec<bool>,
    /// Mean per-token log-likelihood of the reference answers (None: no example has one).
    pub loglik: Option<f64>,
}

impl ShotResults {
    pub fn accuracy(&self) -> f64 {
        self.correct.iter().filter(|&&c| c).count() as f64 / self.correct.len().max(1) as f64
    }
}

impl Answerer {
    /// Answers every example with every adaptation in one batched generation. The reference answers are
    /// scored in the same pass, from each answer's prompt KV, for tie-breaks.
    pub fn evaluate_population(
        &self,
        area: &str,
        items: &[TaskItem],
        candidates: &[Adaptation],
        max_new_tokens: usize,
    ) -> Result<Vec<ShotResults>> {
        let mut all_items = Vec::with_capacity(items.len() * candidates.len());
        let mut adaptations = Vec::with_capacity(all_items.capacity());
        for a in candidates {
            for it in items {
                all_items.push(it.clone());
                adaptations.push(a.clone());
            }
        }
        let answers =
            self.answer_and_verify_each(area, &all_items, &adaptations, max_new_tokens)?;
        Ok(answers
            .chunks(items.len())
            .map(|c| {
                let (lp, n) = c
                    .iter()
                    .filter_map(|(_, s)| *s)
                    .fold((0.0, 0usize), |acc, s| {
                        (acc.0 + s.logprob, acc.1 + s.tokens)
                    });
                ShotResults {
                    correct: c.iter().map(|(ok, _)| *ok).collect(),
                    loglik: (n > 0).then(|| lp / n as f64),
                }
            })
            .collect())
    }
}

/// Each example's right option, or an error naming the first that is not multiple choice: what
/// likelihood scoring needs (callers check before loading anything).
pub fn right_options(items: &[TaskItem]) -> Result<Vec<usize>> {
    items
        .iter()
        .map(|it| match &it.answer {
            t2_tasks::Answer::Choice {
                options, correct, ..
            } if !options.is_empty() => Ok(*correct),
            _ => Err(AdaptError::Config(format!(
                "likelihood scoring needs multiple-choice examples; '{}' is not one",
                it.id
            ))),
        })
        .collect()
}

/// Examples scored together in one likelihood pass (rows of every candidate mixed).
const LIKELIHOOD_ROWS: usize = 64;

impl Answerer {
    /// Scores every multiple-choice example under every adaptation by option likelihood (as
    /// `t2 eval --mode loglik`): right where the right option is the most likely. `loglik` is the mean
    /// log-probability of the right option among the options, a tie-break finer than accuracy on a few
    /// shots. Rows of all candidates share batches.
    pub fn score_population(
        &self,
        area: &str,
        items: &[TaskItem],
        candidates: &[Adaptation],
    ) -> Result<Vec<ShotResults>> {
        let right = right_options(items)?;
        let engine = self.engine();
        let leases = candidates
            .iter()
            .map(|a| engine.lease(a))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let (mut rows, mut mixes) = (Vec::new(), Vec::new());
        for lease in &leases {
            rows.extend_from_slice(items);
            mixes.extend(std::iter::repeat_n(lease.id(), items.len()));
        }
        let mut scores = Vec::with_capacity(rows.len());
        for (chunk, m) in rows
            .chunks(LIKELIHOOD_ROWS)
            .zip(mixes.chunks(LIKELIHOOD_ROWS))
        {
            scores.extend(crate::eval::option_scores(engine, area, chunk, m)?);
        }
        Ok(scores
            .chunks(items.len())
            .map(|per_item| {
                let (correct, logp): (Vec<bool>, Vec<f64>) = per_item
                    .iter()
                    .zip(&right)
                    .map(|(s, &r)| {
                        let f: Vec<f32> = s.iter().map(|&x| x as f32).collect();
                        let lse = t2_model::sampling::log_sum_exp(&f) as f64;
                        (t2_tasks::verify::choice_by_scores(&f) == r, s[r] - lse)
                    })
                    .unzip();
                ShotResults {
                    correct,
                    loglik: Some(logp.iter().sum::<f64>() / logp.len().max(1) as f64),
                }
            })
            .collect())
    }
}

/// Where a search stands after some iterations: all that the next iteration needs, so a long search
/// (the paper's 50 iterations) can stop and go on later from its saved state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CemState {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub best: Option<Candidate>,
    pub history: Vec<IterationLog>,
    pub generations: usize,
    /// Seconds spent in earlier runs of this search.
    pub seconds: f64,
}

impl CemState {
    /// The start: every α at 1/K, spread `init_std`.
    pub fn start(cfg: &CemConfig) -> Self {
        let k = cfg.experts.len();
        Self {
            mean: vec![1.0 / k.max(1) as f32; k],
            std: vec![cfg.init_std; k],
            best: None,
            history: Vec::new(),
            generations: 0,
            seconds: 0.0,
        }
    }
}

/// The draws of iteration `i`, from a generator of its own: a resumed search draws what an unbroken one
/// would have (iteration 0 is seeded with the seed itself).
fn iteration_rng(seed: u64, i: usize) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(
        seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
    )
}

/// Runs the search. `on_iteration` sees every iteration as it ends and may stop the search by returning
/// false (cancellation); the outcome then holds what was found so far.
pub fn search(
    answerer: &Answerer,
    area: &str,
    shots: &[TaskItem],
    cfg: &CemConfig,
    mut on_iteration: impl FnMut(&IterationLog) -> bool,
) -> Result<CemOutcome> {
    search_from(answerer, area, shots, cfg, CemState::start(cfg), |st| {
        on_iteration(st.history.last().expect("called after an iteration"))
    })
}

/// [`search`] from `state` (the start, or a saved state of the same search). `on_iteration` sees the
/// state after every iteration, e.g. to save it.
pub fn search_from(
    answerer: &Answerer,
    area: &str,
    shots: &[TaskItem],
    cfg: &CemConfig,
    mut state: CemState,
    mut on_iteration: impl FnMut(&CemState) -> bool,
) -> Result<CemOutcome> {
    cfg.check()?;
    if shots.is_empty() {
        return Err(AdaptError::Config("no examples to adapt on".into()));
    }
    let k = cfg.experts.len();
    if state.mean.len() != k || state.std.len() != k {
        return Err(AdaptError::Config(format!(
            "the saved search weighs {} experts, this one {k}",
            state.mean.len()
        )));
    }
    let t0 = Instant::now();
    let earlier = state.seconds;
    for iteration in state.history.len()..cfg.iterations {
        let alphas = draw(cfg, &state, iteration);
        let (pop, eval_time) = evaluate(answerer, area, shots, cfg, &alphas)?;
        state.generations += alphas.len() * shots.len();
        let mut order: Vec<usize> = (0..pop.len()).collect();
        let prior = cfg.sparsity_prior;
        // Best first; candidates that rank equal keep the order drawn.
        order.sort_by(|&a, &b| pop[b].rank(&pop[a], prior).then(a.cmp(&b)));
        let elites: Vec<&Candidate> = order[..cfg.elites].iter().map(|&i| &pop[i]).collect();
        for j in 0..k {
            let m = elites.iter().map(|c| c.alpha[j]).sum::<f32>() / elites.len() as f32;
            let v =
                elites.iter().map(|c| (c.alpha[j] - m).powi(2)).sum::<f32>() / elites.len() as f32;
            state.mean[j] = m;
            // A floor keeps a little exploration once the elites agree.
            state.std[j] = v.sqrt().max(1e-3);
        }
        let top = pop[order[0]].clone();
        if state
            .best
            .as_ref()
            .is_none_or(|b| top.better_than(b, prior))
        {
            state.best = Some(top.clone());
        }
        state.history.push(IterationLog {
            iteration,
            best: top,
            best_so_far: state.best.clone().expect("set above"),
            mean_accuracy: pop.iter().map(|c| c.accuracy).sum::<f64>() / pop.len() as f64,
            mean: state.mean.clone(),
            std: state.std.clone(),
            eval_seconds: eval_time.as_secs_f64(),
            population: pop,
        });
        state.seconds = earlier + t0.elapsed().as_secs_f64();
        if !on_iteration(&state) {
            break;
        }
    }
    // A saved search that had already run every iteration asked for gives its result again.
    let Some(best) = state.best else {
        return Err(AdaptError::Config("the search ran no iteration".into()));
    };
    Ok(CemOutcome {
        mix: storable_mix(&cfg.experts, &best.alpha)?,
        best,
        history: state.history,
        seconds: earlier + t0.elapsed().as_secs_f64(),
        generations: state.generations,
        holdout: None,
    })
}

/// The mix a chosen α is stored as: every expert's weight kept (zeros too, so the stored mix shows what
/// the search weighed), or the base model when every weight is 0.
pub(crate) fn storable_mix(experts: &[String], alpha: &[f32]) -> Result<Mix> {
    Ok(match mix_of(experts, alpha) {
        m if m.is_base() => Mix::new(BTreeMap::new(), 1.0)?,
        _ => Mix::new(
            experts.iter().cloned().zip(alpha.iter().copied()).collect(),
            0.0,
        )?,
    })
}

/// Accuracy of each α on the shots, all candidates in one batched generation.
pub(crate) fn evaluate(
    answerer: &Answerer,
    area: &str,
    shots: &[TaskItem],
    cfg: &CemConfig,
    alphas: &[Vec<f32>],
) -> Result<(Vec<Candidate>, Duration)> {
    let t = Instant::now();
    let adaptations: Vec<Adaptation> = alphas
        .iter()
        .map(|a| Adaptation::Mix(mix_of(&cfg.experts, a)))
        .collect();
    let results = match cfg.likelihood {
        true => answerer.score_population(area, shots, &adaptations)?,
        false => answerer.evaluate_population(area, shots, &adaptations, cfg.max_new_tokens)?,
    };
    let pop = alphas
        .iter()
        .zip(results)
        .map(|(a, r)| Candidate {
            alpha: a.clone(),
            accuracy: r.accuracy(),
            loglik: r.loglik,
        })
        .collect();
    Ok((pop, t.elapsed()))
}

/// Times evaluating `alphas` one candidate after another (each candidate's shots still batched
/// together), against which the batched population evaluation is compared.
pub fn evaluate_sequentially(
    answerer: &Answerer,
    area: &str,
    shots: &[TaskItem],
    cfg: &CemConfig,
    alphas: &[Vec<f32>],
) -> Result<(Vec<f64>, Duration)> {
    let t = Instant::now();
    let mut out = Vec::with_capacity(alphas.len());
    for a in alphas {
        let (pop, _) = evaluate(answerer, area, shots, cfg, std::slice::from_ref(a))?;
        out.push(pop[0].accuracy);
    }
    Ok((out, t.elapsed()))
}

/// The population of the first iteration (same seed, same draws), for cost comparisons.
pub fn first_population(cfg: &CemConfig) -> Vec<Vec<f32>> {
    draw(cfg, &CemState::start(cfg), 0)
}

/// The candidates of iteration `i` around the state's mean and spread (the first one seeded under the
/// sparsity prior).
fn draw(cfg: &CemConfig, state: &CemState, i: usize) -> Vec<Vec<f32>> {
    let mut rng = iteration_rng(cfg.seed, i);
    let mut alphas = sample(&mut rng, &state.mean, &state.std, cfg.population);
    if i == 0 && cfg.sparsity_prior {
        seed_simple_candidates(&mut alphas);
    }
    alphas
}

/// Replaces the first draws with the base model (no expert) and each expert alone at full weight, up to
/// half the population, so the search knows from the start what the simplest candidates score.
fn seed_simple_candidates(alphas: &mut [Vec<f32>]) {
    let half = alphas.len() / 2;
    let k = alphas.first().map_or(0, Vec::len);
    for (i, a) in alphas.iter_mut().take(half.min(k + 1)).enumerate() {
        a.iter_mut().for_each(|x| *x = 0.0);
        if i > 0 {
            a[i - 1] = 1.0;
        }
    }
}

/// `n` candidates α ~ N(mean, std²) per expert, clamped to [0, 1].
fn sample(rng: &mut impl rand::Rng, mean: &[f32], std: &[f32], n: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|_| {
            mean.iter()
                .zip(std)
                .map(|(m, s)| (m + s * standard_normal(rng)).clamp(0.0, 1.0))
                .collect()
        })
        .collect()
}

/// One draw of N(0, 1) (the trainer's initial logits draw from it too).
pub fn standard_normal(rng: &mut impl rand::Rng) -> f32 {
    // Box–Muller: rand's distributions crate is not a dependency, and this is all we need.
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// The experts a few-shot mix weighs: every loaded expert except classifiers (which serve pass 1).
pub fn mixable_experts(engine: &t2_engine::Engine) -> Vec<String> {
    engine
        .experts
        .as_ref()
        .map(|s| {
            s.experts()
                .iter()
                .filter(|e| e.meta.category != t2_engine::routing::ROUTER_CATEGORY)
                .map(|e| e.meta.name.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// The search's result as a named mix, with how it was found.
pub fn stored_mix(
    name: &str,
    outcome: &CemOutcome,
    cfg: &CemConfig,
    source: &str,
    shots: usize,
    command: &str,
) -> t2_svf::StoredMix {
    let mut p = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        p.insert(k.to_string(), v);
    };
    put("method", "few-shot CEM".into());
    put("examples", source.into());
    put("shots", shots.to_string());
    put("seed", cfg.seed.to_string());
    put("score", format!("{:.4}", outcome.best.accuracy));
    if let Some(ll) = outcome.best.loglik {
        put("reference_loglik", format!("{ll:.4}"));
    }
    put("iterations", outcome.history.len().to_string());
    put("population", cfg.population.to_string());
    put("elites", cfg.elites.to_string());
    put("init_std", cfg.init_std.to_string());
    put("max_new_tokens", cfg.max_new_tokens.to_string());
    put("seconds", format!("{:.1}", outcome.seconds));
    if let Some(h) = &outcome.holdout {
        put("held_out_examples", h.ids.len().to_string());
        put("chosen_on_held_out", h.chosen().label.clone());
        put(
            "held_out_score",
            format!("{:.4}", h.chosen().holdout.accuracy),
        );
    }
    if !command.is_empty() {
        put("command", command.into());
    }
    t2_svf::StoredMix {
        name: name.into(),
        mix: outcome.mix.clone(),
        description: format!(
            "few-shot mix: {:.0}% on {shots} examples of {source}",
            100.0 * outcome.best.accuracy
        ),
        provenance: p,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A scored candidate (the hold-out's tests build theirs with it too).
    pub(crate) fn cand(alpha: &[f32], accuracy: f64, loglik: f64) -> Candidate {
        Candidate {
            alpha: alpha.to_vec(),
            accuracy,
            loglik: Some(loglik),
        }
    }

    #[test]
    fn equal_accuracy_ranks_fewer_experts_first_only_under_the_prior() {
        let mix = cand(&[0.06, 0.0, 0.14, 0.84], 1.0, -0.327);
        let alone = cand(&[0.0, 0.0, 0.0, 1.0], 1.0, -0.345);
        let base = cand(&[0.0; 4], 0.9, -0.2);
        assert_eq!((mix.experts_used(), alone.experts_used()), (3, 1));
        assert!(alone.better_than(&mix, true));
        assert!(!mix.better_than(&alone, true));
        // Without the prior the likelihood decides the tie.
        assert!(mix.better_than(&alone, false));
        // Accuracy comes first either way: the base model's fewer experts do not beat a shot more.
        for prior in [true, false] {
            assert!(alone.better_than(&base, prior) && !base.better_than(&alone, prior));
        }
        // Same accuracy and experts: the likelihood decides.
        let other = cand(&[0.0, 0.0, 0.0, 0.7], 1.0, -0.30);
        assert!(other.better_than(&alone, true));
    }

    #[test]
    fn the_prior_seeds_the_first_population_with_base_and_each_expert_alone() {
        let experts: Vec<String> = ["code", "math", "reasoning", "sentiment"]
            .map(String::from)
            .to_vec();
        let mut cfg = CemConfig::paper(experts);
        let seeded = first_population(&cfg);
        assert_eq!(seeded.len(), 32);
        assert_eq!(seeded[0], vec![0.0; 4]);
        for (i, a) in seeded[1..5].iter().enumerate() {
            let mut want = vec![0.0; 4];
            want[i] = 1.0;
            assert_eq!(a, &want);
        }
        cfg.sparsity_prior = false;
        let drawn = first_population(&cfg);
        // The rest are the same draws; without the prior the first ones are draws too.
        assert_eq!(seeded[5..], drawn[5..]);
        assert!(drawn[..5].iter().zip(&seeded[..5]).all(|(d, s)| d != s));
        assert!(drawn.iter().flatten().all(|x| (0.0..=1.0).contains(x)));
        // A small population keeps half of it drawn.
        cfg.sparsity_prior = true;
        cfg.population = 4;
        let small = first_population(&cfg);
        assert_eq!(small[0], vec![0.0; 4]);
        assert_eq!(small[1], vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(
            small[2..],
            first_population(&CemConfig {
                sparsity_prior: false,
                ..cfg
            })[2..]
        );
    }
}
