//! The few-shot search's final choice, made on examples the search never saw.
//!
//! Ten shots overfit: on sst2 the search's best mix answered all ten right yet generated worse on the
//! test split than the sentiment expert alone, which answered eight. So a few more examples are held out
//! of the search, and the stored result is chosen on them among a handful of contenders: the search's
//! best, its final mean, the base model and each expert alone. Fewer experts win a tie (under the
//! sparsity prior), so a mix is kept only where it answers more unseen examples right than every simpler
//! contender.

use serde::Serialize;
use t2_tasks::TaskItem;

use crate::cem::{self, Candidate, CemConfig, CemOutcome};
use crate::{AdaptError, Answerer, Result};

/// One α the final choice weighs.
#[derive(Debug, Clone, Serialize)]
pub struct Contender {
    /// Where it comes from: "search best", "search mean", "base" or "<expert> alone".
    pub label: String,
    /// Scored on the shots the search saw.
    pub shots: Candidate,
    /// Scored on the held-out examples.
    pub holdout: Candidate,
}

#[derive(Debug, Clone, Serialize)]
pub struct HoldoutChoice {
    /// The held-out examples' ids, so the choice can be checked item by item.
    pub ids: Vec<String>,
    /// In the order ranked among equals: the first listed wins an exact tie.
    pub contenders: Vec<Contender>,
    /// Index into `contenders`.
    pub chosen: usize,
    pub seconds: f64,
}

impl HoldoutChoice {
    pub fn chosen(&self) -> &Contender {
        &self.contenders[self.chosen]
    }
}

/// The contenders of a finished search: its best, its final mean, the base model, each expert alone;
/// an α listed twice is kept once, under its first label.
pub fn contenders(experts: &[String], outcome: &CemOutcome) -> Vec<(String, Vec<f32>)> {
    let k = experts.len();
    let mut list = vec![("search best".to_string(), outcome.best.alpha.clone())];
    if let Some(last) = outcome.history.last() {
        list.push(("search mean".into(), last.mean.clone()));
    }
    list.push(("base".into(), vec![0.0; k]));
    for (j, e) in experts.iter().enumerate() {
        let mut a = vec![0.0; k];
        a[j] = 1.0;
        list.push((format!("{e} alone"), a));
    }
    let mut seen: Vec<(String, Vec<f32>)> = Vec::with_capacity(list.len());
    for (label, alpha) in list {
        // Candidates that clamp to the same mix answer the same: compare what they run as.
        let runs_as = cem::mix_of(experts, &alpha);
        if !seen.iter().any(|(_, a)| cem::mix_of(experts, a) == runs_as) {
            seen.push((label, alpha));
        }
    }
    seen
}

/// Scores every contender on the shots and on the held-out examples (each set in one batch, under the
/// search's protocol) and ranks them on the held-out examples.
pub fn choose(
    answerer: &Answerer,
    area: &str,
    shots: &[TaskItem],
    held_out: &[TaskItem],
    cfg: &CemConfig,
    outcome: &CemOutcome,
) -> Result<HoldoutChoice> {
    if held_out.is_empty() {
        return Err(AdaptError::Config(
            "no held-out examples to choose on".into(),
        ));
    }
    let t = std::time::Instant::now();
    let list = contenders(&cfg.experts, outcome);
    let alphas: Vec<Vec<f32>> = list.iter().map(|(_, a)| a.clone()).collect();
    let on_shots = shot_scores(answerer, area, shots, cfg, outcome, &alphas)?;
    let (on_held, _) = cem::evaluate(answerer, area, held_out, cfg, &alphas)?;
    let contenders: Vec<Contender> = list
        .into_iter()
        .zip(on_shots.into_iter().zip(on_held))
        .map(|((label, _), (shots, holdout))| Contender {
            label,
            shots,
            holdout,
        })
        .collect();
    Ok(HoldoutChoice {
        ids: held_out.iter().map(|it| it.id.clone()).collect(),
        chosen: best_index(&contenders, cfg.sparsity_prior),
        contenders,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// Each contender's score on the shots: the search's own where it scored the same mix (it keeps every
/// candidate it drew, and its first population holds base and each expert alone), the rest scored now.
fn shot_scores(
    answerer: &Answerer,
    area: &str,
    shots: &[TaskItem],
    cfg: &CemConfig,
    outcome: &CemOutcome,
    alphas: &[Vec<f32>],
) -> Result<Vec<Candidate>> {
    let scored: Vec<&Candidate> = std::iter::once(&outcome.best)
        .chain(outcome.history.iter().flat_map(|h| &h.population))
        .collect();
    let known: Vec<Option<Candidate>> = alphas
        .iter()
        .map(|a| {
            let runs_as = cem::mix_of(&cfg.experts, a);
            scored
                .iter()
                .find(|c| cem::mix_of(&cfg.experts, &c.alpha) == runs_as)
                .map(|c| Candidate {
                    alpha: a.clone(),
                    ..(*c).clone()
                })
        })
        .collect();
    let missing: Vec<Vec<f32>> = alphas
        .iter()
        .zip(&known)
        .filter(|(_, k)| k.is_none())
        .map(|(a, _)| a.clone())
        .collect();
    let mut fresh = if missing.is_empty() {
        Vec::new()
    } else {
        cem::evaluate(answerer, area, shots, cfg, &missing)?.0
    }
    .into_iter();
    Ok(known
        .into_iter()
        .map(|k| k.unwrap_or_else(|| fresh.next().expect("one fresh score per missing contender")))
        .collect())
}

/// The contender ranking first on the held-out examples; the first listed wins an exact tie.
fn best_index(contenders: &[Contender], sparsity_prior: bool) -> usize {
    let mut best = 0;
    for (i, c) in contenders.iter().enumerate().skip(1) {
        if c.holdout
            .better_than(&contenders[best].holdout, sparsity_prior)
        {
            best = i;
        }
    }
    best
}

/// Where there are held-out examples, [`choose`] on them and make the choice the outcome's result: what
/// is stored and reported is then the chosen contender, with its accuracy on the shots the search saw.
/// Without held-out examples the search's best stays the result.
pub fn apply(
    answerer: &Answerer,
    area: &str,
    shots: &[TaskItem],
    held_out: &[TaskItem],
    cfg: &CemConfig,
    outcome: &mut CemOutcome,
) -> Result<()> {
    if held_out.is_empty() {
        return Ok(());
    }
    let choice = choose(answerer, area, shots, held_out, cfg, outcome)?;
    let chosen = choice.chosen().shots.clone();
    outcome.mix = cem::storable_mix(&cfg.experts, &chosen.alpha)?;
    outcome.best = chosen;
    outcome.holdout = Some(choice);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cem::tests::cand;

    fn contender(label: &str, alpha: &[f32], held_accuracy: f64, held_loglik: f64) -> Contender {
        Contender {
            label: label.into(),
            shots: cand(alpha, 1.0, -0.1),
            holdout: cand(alpha, held_accuracy, held_loglik),
        }
    }

    fn outcome(best: &[f32], mean: &[f32]) -> CemOutcome {
        CemOutcome {
            mix: t2_engine::Mix::base(),
            best: cand(best, 1.0, -0.1),
            history: vec![cem::IterationLog {
                iteration: 0,
                best: cand(best, 1.0, -0.1),
                best_so_far: cand(best, 1.0, -0.1),
                mean_accuracy: 0.5,
                mean: mean.to_vec(),
                std: vec![0.1; mean.len()],
                eval_seconds: 0.0,
                population: vec![],
            }],
            seconds: 0.0,
            generations: 0,
            holdout: None,
        }
    }

    #[test]
    fn contenders_are_the_search_its_mean_base_and_each_expert_once() {
        let experts = vec!["a".to_string(), "b".to_string()];
        let labels = |o: &CemOutcome| -> Vec<String> {
            contenders(&experts, o)
                .into_iter()
                .map(|(l, _)| l)
                .collect()
        };
        assert_eq!(
            labels(&outcome(&[0.3, 0.9], &[0.4, 0.8])),
            ["search best", "search mean", "base", "a alone", "b alone"]
        );
        // The search chose b alone, and its mean clamps to nothing: each α is weighed once.
        assert_eq!(
            labels(&outcome(&[0.0, 1.0], &[-0.2, 0.0])),
            ["search best", "search mean", "a alone"]
        );
    }

    #[test]
    fn a_mix_must_answer_more_held_out_examples_than_a_simpler_contender() {
        let tied = [
            contender("search best", &[0.2, 1.0], 0.8, -0.1),
            contender("base", &[0.0, 0.0], 0.5, -0.9),
            contender("b alone", &[0.0, 1.0], 0.8, -0.5),
        ];
        // Equal held-out accuracy: the expert alone, though the mix's likelihood is higher.
        assert_eq!(best_index(&tied, true), 2);
        assert_eq!(best_index(&tied, false), 0);
        let ahead = [
            contender("search best", &[0.2, 1.0], 0.85, -0.1),
            tied[1].clone(),
            tied[2].clone(),
        ];
        assert_eq!(best_index(&ahead, true), 0);
    }
}
