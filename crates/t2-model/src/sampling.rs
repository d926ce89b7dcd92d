//! Turning logits into the next token: greedy, temperature, top-k, top-p, with a per-request seed so that
//! a request with a seed is reproducible, and log-probabilities with top alternatives.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (None or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches top_p (1.0: all).
    pub top_p: f32,
    pub seed: Option<u64>,
    /// Number of alternatives to report with each token's log-probability; None: no logprobs.
    pub logprobs: Option<usize>,
    /// OpenAI's penalties on tokens already generated: a flat `presence` once a token appeared, plus
    /// `frequency` per occurrence, subtracted from its logit before choosing.
    #[serde(default)]
    pub presence_penalty: f32,
    #[serde(default)]
    pub frequency_penalty: f32,
    /// OpenAI's `logit_bias`: added to these tokens' logits before choosing (-100 bans, +100 forces).
    #[serde(default)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Which tokens may come next (structured output); none: any.
    #[serde(skip)]
    pub constraint: Option<ConstraintCell>,
}

/// A grammar (or any rule) over the tokens of an answer: which tokens may come next, and the token that
/// came. The sampler masks the logits with it and commits each chosen token.
pub trait TokenConstraint: Send {
    /// Works out which tokens may come next. The runner calls it while the model computes the step's
    /// logits (on another thread), so the sampler finds the answer ready.
    fn prepare(&mut self);
    /// Sets the logits of the tokens that may not come next to -inf (calls `prepare` itself if it has
    /// not run since the last commit).
    fn apply(&mut self, logits: &mut [f32]);
    /// Advances past the chosen token.
    fn commit(&mut self, token: u32);
    /// Whether the constraint restricts the next token at all (a tool-call grammar waits for its
    /// trigger before it does), so that the runner prepares only where there is work.
    fn is_active(&self) -> bool {
        true
    }
}

/// Hands a constraint to the sampler of one sequence: the request builds it (off the model thread, where
/// compiling a grammar may take a while), the sequence's sampler takes it out when the sequence starts.
/// Sampling settings stay plain data that can be cloned and compared; a clone shares the cell, so each
/// sequence needs a cell of its own.
#[derive(Clone)]
pub struct ConstraintCell(std::sync::Arc<std::sync::Mutex<Option<Box<dyn TokenConstraint>>>>);

impl ConstraintCell {
    pub fn new(c: Box<dyn TokenConstraint>) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(Some(c))))
    }

    /// The constraint, once (None when a sampler already took it).
    pub fn take(&self) -> Option<Box<dyn TokenConstraint>> {
        self.0.lock().ok().and_then(|mut c| c.take())
    }
}

impl std::fmt::Debug for ConstraintCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConstraintCell")
    }
}

impl PartialEq for ConstraintCell {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            seed: None,
            logprobs: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            constraint: None,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && (0.0..=2.0).contains(&self.temperature)) {
            return Err(ModelError::Invalid(format!(
                "temperature must be in [0, 2], got {}",
                self.temperature
            )));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(v.is_finite() && (-2.0..=2.0).contains(&v)) {
                return Err(ModelError::Invalid(format!(
                    "{name} must be in [-2, 2], got {v}"
                )));
            }
        }
        if let Some(n) = self.logprobs {
            if n > 20 {
                return Err(ModelError::Invalid(format!(
                    "top_logprobs must be at most 20, got {n}"
                )));
            }
        }
        Ok(())
    }
}

/// The chosen token's log-probability (under the model's raw distribution) and the top alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    constraint: Option<Box<dyn TokenConstraint>>,
    rng: rand::rngs::StdRng,
    /// How often each token was chosen so far (only kept when a penalty is set).
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        Self {
            constraint: params.constraint.as_ref().and_then(ConstraintCell::take),
            params,
            rng,
            counts: Default::default(),
        }
    }

    fn has_penalties(&self) -> bool {
        self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0
    }

    /// Whether the next token is simply the argmax of the raw logits: greedy, and nothing (grammar, bias,
    /// penalty, log-probabilities) needs the logits on the host. An accelerator picks such tokens itself.
    pub fn is_plain_greedy(&self) -> bool {
        (self.params.temperature <= 0.0 || self.params.top_k == Some(1))
            && self.constraint.is_none()
            && self.params.logit_bias.is_empty()
            && !self.has_penalties()
            && self.params.logprobs.is_none()
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The sequence's constraint, when it has one that restricts the next token.
    pub fn active_constraint(&mut self) -> Option<&mut (dyn TokenConstraint + 'static)> {
        self.constraint.as_deref_mut().filter(|c| c.is_active())
    }

    /// Chooses the next token. Reported log-probabilities are those of the model's own distribution,
    /// before penalties and temperature.
    pub fn sample(&mut self, logits: &[f32]) -> (u32, Option<TokenLogprob>) {
        let adjusted;
        let penalize = self.has_penalties() && !self.counts.is_empty();
        let constrained = self.active_constraint().is_some();
        let biased = !self.params.logit_bias.is_empty();
        let choose_from = if penalize || constrained || biased {
            let mut l = logits.to_vec();
            for &(t, b) in &self.params.logit_bias {
                if let Some(v) = l.get_mut(t as usize) {
                    *v += b;
                }
            }
            for (&t, &c) in &self.counts {
                if let Some(v) = l.get_mut(t as usize) {
                    *v -= self.params.presence_penalty + self.params.frequency_penalty * c as f32;
                }
            }
            if let Some(c) = self.active_constraint() {
                c.apply(&mut l);
            }
            adjusted = l;
            &adjusted[..]
        } else {
            logits
        };
        let token = if self.params.temperature <= 0.0 || self.params.top_k == Some(1) {
            argmax(choose_from)
        } else {
            self.sample_random(choose_from)
        };
        if self.has_penalties() {
            *self.counts.entry(token).or_default() += 1;
        }
        if let Some(c) = &mut self.constraint {
            c.commit(token);
        }
        let lp = self.params.logprobs.map(|k| logprob_of(logits, token, k));
        (token, lp)
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let t = self.params.temperature;
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        let k = self.params.top_k.filter(|&k| k > 0 && k < idx.len());
        if let Some(k) = k {
            idx.select_nth_unstable_by(k - 1, by_logit_desc);
            idx.truncate(k);
        }
        idx.sort_unstable_by(by_logit_desc);
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i as usize] - max) / t).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.params.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return idx[i];
            }
        }
        idx[probs.len() - 1]
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// ln Σ exp(x), shifted by the maximum so that large logits do not overflow; summed in f64 because a
/// 49k-entry vocabulary loses digits in f32. `-inf` for an empty slice.
pub fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    max + x
        .iter()
        .map(|&v| ((v - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
}

/// log-softmax of the raw logits, evaluated at `token`, plus the `k` most likely tokens.
pub fn logprob_of(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let lse = log_sum_exp(logits);
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    let top = if k > 0 {
        let desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        idx.select_nth_unstable_by(k - 1, desc);
        idx.truncate(k);
        idx.sort_unstable_by(desc);
        idx.iter().map(|&i| (i, logits[i as usize] - lse)).collect()
    } else {
        Vec::new()
    };
    TokenLogprob {
        token,
        logprob: logits[token as usize] - lse,
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sum_exp_matches_the_naive_sum_and_survives_large_logits() {
        let x = [0.5f32, -1.0, 2.0];
        let naive = x.iter().map(|v| v.exp()).sum::<f32>().ln();
        assert!((log_sum_exp(&x) - naive).abs() < 1e-6);
        // exp(1000) overflows f32; the shifted sum must not.
        assert!((log_sum_exp(&[1000.0, 1000.0]) - (1000.0 + 2f32.ln())).abs() < 1e-3);
        assert_eq!(log_sum_exp(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]).0, 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_seed_dependent() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..Default::default()
            });
            (0..40).map(|_| s.sample(&logits).0).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = vec![5.0, 4.9, 0.0, -1.0, -2.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.5,
            top_k: Some(2),
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..200 {
            assert!(s.sample(&logits).0 < 2);
        }
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.3,
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..200 {
            assert_eq!(s.sample(&logits).0, 0);
        }
    }

    #[test]
    fn penalties_push_greedy_off_repeated_tokens() {
        let logits = vec![3.0, 2.5, 0.0];
        let run = |presence: f32, frequency: f32| {
            let mut s = Sampler::new(SamplingParams {
                presence_penalty: presence,
                frequency_penalty: frequency,
                ..Default::default()
            });
            (0..4).map(|_| s.sample(&logits).0).collect::<Vec<_>>()
        };
        assert_eq!(run(0.0, 0.0), vec![0, 0, 0, 0]);
        // 3.0 - 1.0 < 2.5: after one use token 0 loses to token 1, then both are penalized equally.
        assert_eq!(run(1.0, 0.0), vec![0, 1, 0, 0]);
        // Frequency grows per use: 3.0 - 0.4k vs 2.5 - 0.4j alternates once both have been used.
        assert_eq!(run(0.0, 0.4), vec![0, 0, 1, 0]);
        assert!(SamplingParams {
            presence_penalty: 2.5,
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn logprobs_are_normalized_and_sorted() {
        let logits = vec![1.0, 2.0, 3.0];
        let lp = logprob_of(&logits, 0, 3);
        let total: f32 = lp.top.iter().map(|(_, l)| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![2, 1, 0]
        );
        assert!((lp.logprob - lp.top[2].1).abs() < 1e-6);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        assert!(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            logprobs: Some(21),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
