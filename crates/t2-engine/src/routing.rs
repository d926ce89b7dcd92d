//! Pass 1 of Transformer²: score the request's category in one prefill and turn the label probabilities
//! into the mix that pass 2 answers with.
//!
//! The model reads the pass-1 prompt (the request wrapped in a classification question, with the reply
//! primed by [`ROUTING_ANSWER_PREFIX`]); the next token's distribution over the first token of each label
//! is the routing decision. Scoring instead of generating costs one prefill and cannot produce an
//! unparsable answer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use t2_model::ChatMessage;
use t2_svf::{Adaptation, Mix};

pub mod prompt;
pub use prompt::{routing_prompt, routing_prompt_parts, CATEGORIES, ROUTING_ANSWER_PREFIX};

use crate::engine::{Engine, EngineError, Result};

/// The label whose probability goes to the base model.
pub const OTHER_LABEL: &str = "other";
/// The expert category that marks a classifier (router) expert rather than a pass-2 expert.
pub const ROUTER_CATEGORY: &str = "routing";
/// The request text shown to pass 1 is cut to this many characters (its start and end): a category is
/// clear from far less, and pass 1 must stay a small fraction of the answer's cost.
const MAX_REQUEST_CHARS: usize = 2000;

/// One answer pass 1 can give.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteLabel {
    pub name: String,
    /// First token of " name" after the answer prefix (distinct across labels).
    pub token: u32,
    /// The experts of this category (empty: the base model, as for "other").
    pub experts: Vec<String>,
}

/// How label probabilities become a mix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutePolicy {
    /// Soft: α = label probabilities over the experts (and the base model for "other"). Hard: the top
    /// label's experts only.
    pub soft: bool,
    /// Below this top-label probability the base model answers.
    pub threshold: f32,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        Self {
            soft: false,
            threshold: 0.0,
        }
    }
}

/// Whose judgement pass 1 asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteStrategy {
    /// The base model, prompted to name the category.
    Prompt,
    /// The classifier expert (category `routing`), on the same prompt.
    Classifier,
}

impl RouteStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prompt => "prompt",
            Self::Classifier => "classifier",
        }
    }
}

impl std::fmt::Display for RouteStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RouteStrategy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "prompt" => Ok(Self::Prompt),
            "classifier" => Ok(Self::Classifier),
            other => Err(format!(
                "unknown routing strategy '{other}' (prompt or classifier)"
            )),
        }
    }
}

/// The labels of a server's experts, built at load and again whenever the experts change.
#[derive(Debug, Clone)]
pub struct Router {
    pub labels: Vec<RouteLabel>,
    /// The classifier expert, if one is loaded.
    pub classifier: Option<String>,
}

/// Pass 1 for one submission.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub strategy: RouteStrategy,
    pub prompt: Vec<u32>,
    /// The weights pass 1 runs with: the base model (prompt) or the classifier expert.
    pub scorer: Adaptation,
    /// Leading tokens of `prompt` that are the same for every request: tokenized apart from the request,
    /// so that they are the same tokens every time and the prefix cache finds their blocks.
    pub shared_prefix: usize,
    pub labels: Arc<Vec<RouteLabel>>,
    pub policy: RoutePolicy,
}

/// What pass 1 decided, sent to every sequence of the submission before pass 2 starts.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteDecision {
    pub strategy: RouteStrategy,
    /// The most likely label.
    pub label: String,
    /// Probability of each label (renormalised over the labels).
    pub scores: BTreeMap<String, f32>,
    /// The mix pass 2 answers with.
    pub mix: Mix,
    /// From pass 1's admission to its decision.
    pub pass1: Duration,
    /// The top label fell under the threshold, so the base model answers.
    pub below_threshold: bool,
}

impl Router {
    /// Labels from the loaded experts' categories, plus "other". None when no pass-2 expert is loaded.
    pub fn from_engine(engine: &Engine) -> Result<Option<Self>> {
        let Some(store) = &engine.experts else {
            return Ok(None);
        };
        Self::from_experts(engine, store.experts().iter().map(|e| e.as_ref()))
    }

    /// Labels from the given experts' categories (the store's, or the set an upload would make).
    pub fn from_experts<'a>(
        engine: &Engine,
        experts: impl IntoIterator<Item = &'a t2_svf::Expert>,
    ) -> Result<Option<Self>> {
        let mut by_category: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut classifier = None;
        for e in experts {
            if e.meta.category == ROUTER_CATEGORY {
                classifier.get_or_insert_with(|| e.meta.name.clone());
                continue;
            }
            by_category
                .entry(e.meta.category.clone())
                .or_default()
                .push(e.meta.name.clone());
        }
        if by_category.is_empty() {
            return Ok(None);
        }
        by_category.remove(OTHER_LABEL);
        let mut names: Vec<String> = by_category.keys().cloned().collect();
        // The canonical order of [`CATEGORIES`]: the router expert was trained on labels listed so.
        names.sort_by(|a, b| {
            prompt::category_rank(a)
                .cmp(&prompt::category_rank(b))
                .then(a.cmp(b))
        });
        names.push(OTHER_LABEL.into());
        let tok = &engine.loaded.tokenizer;
        let mut labels: Vec<RouteLabel> = Vec::with_capacity(names.len());
        for name in names {
            let first = *tok
                .encode_continuation(&format!(" {name}"))?
                .first()
                .ok_or_else(|| EngineError::Invalid(format!("category '{name}' is empty")))?;
            if let Some(other) = labels.iter().find(|l| l.token == first) {
                return Err(EngineError::Invalid(format!(
                    "expert categories '{}' and '{name}' start with the same token, so pass 1 cannot tell \
                     them apart: rename one",
                    other.name
                )));
            }
            let experts = by_category.remove(&name).unwrap_or_default();
            labels.push(RouteLabel {
                name,
                token: first,
                experts,
            });
        }
        Ok(Some(Self { labels, classifier }))
    }

    pub fn label_names(&self) -> Vec<String> {
        self.labels.iter().map(|l| l.name.clone()).collect()
    }

    /// Pass 1 for a request: the classification prompt around `request`, tokenized and primed.
    pub fn spec(
        &self,
        engine: &Engine,
        strategy: RouteStrategy,
        request: &str,
        policy: RoutePolicy,
    ) -> Result<RouteSpec> {
        let scorer = match strategy {
            RouteStrategy::Prompt => Adaptation::base(),
            RouteStrategy::Classifier => Adaptation::expert(self.classifier.as_deref().ok_or_else(|| {
                EngineError::Invalid(
                    "no classifier expert is loaded (an expert of category 'routing'); use strategy \
                     'prompt'"
                        .into(),
                )
            })?),
        };
        if !(0.0..=1.0).contains(&policy.threshold) {
            return Err(EngineError::Invalid(format!(
                "the routing threshold must be between 0 and 1, got {}",
                policy.threshold
            )));
        }
        let (prompt, shared_prefix) = routing_tokens(engine, &clip(request), &self.label_names())?;
        Ok(RouteSpec {
            strategy,
            prompt,
            shared_prefix,
            scorer,
            labels: Arc::new(self.labels.clone()),
            policy,
        })
    }
}

/// The pass-1 prompt for `request`, tokenized and primed with the answer prefix, and how many of its
/// leading tokens do not depend on the request. The parts are tokenized separately so that this prefix is
/// token-for-token the same for every request. The classifier expert is trained on exactly these tokens.
pub fn routing_tokens(
    engine: &Engine,
    request: &str,
    labels: &[String],
) -> Result<(Vec<u32>, usize)> {
    const MARK: &str = "\u{1}T2_REQUEST\u{1}";
    let (head, tail) = routing_prompt_parts(labels);
    let text = engine
        .loaded
        .template
        .render(&[ChatMessage::new("user", &format!("{head}{MARK}{tail}"))])?;
    let (before, after) = text
        .split_once(MARK)
        .ok_or_else(|| EngineError::Invalid("the chat template dropped the request".into()))?;
    let tok = &engine.loaded.tokenizer;
    let mut tokens = tok.encode(before)?;
    let shared = tokens.len();
    tokens.extend(tok.encode_continuation(&format!("{}{after}", request.trim()))?);
    tokens.extend(tok.encode_continuation(ROUTING_ANSWER_PREFIX)?);
    Ok((tokens, shared))
}

/// The start and the end of a long request.
fn clip(request: &str) -> String {
    let chars: Vec<char> = request.chars().collect();
    if chars.len() <= MAX_REQUEST_CHARS {
        return request.to_string();
    }
    let half = MAX_REQUEST_CHARS / 2;
    let head: String = chars[..half].iter().collect();
    let tail: String = chars[chars.len() - half..].iter().collect();
    format!("{head}\n[…]\n{tail}")
}

/// α is rounded to this step, so that requests routed alike share one entry of the mix table.
const ALPHA_STEP: f32 = 0.01;

impl RouteSpec {
    /// The label tokens pass 1 reads from the last position's logits.
    pub fn label_tokens(&self) -> Vec<u32> {
        self.labels.iter().map(|l| l.token).collect()
    }

    /// The decision from the logits of [`Self::label_tokens`] after the primed prompt.
    pub fn decide(&self, picked: &[f32], pass1: Duration) -> Result<RouteDecision> {
        if picked.len() != self.labels.len() {
            return Err(EngineError::Invalid(format!(
                "pass 1 read {} label logits for {} labels",
                picked.len(),
                self.labels.len()
            )));
        }
        let probs = softmax(picked);
        let scores: BTreeMap<String, f32> = self
            .labels
            .iter()
            .zip(&probs)
            .map(|(l, &p)| (l.name.clone(), p))
            .collect();
        let top = probs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .expect("at least one label");
        let below = probs[top] < self.policy.threshold;
        let mut alpha: BTreeMap<String, f32> = BTreeMap::new();
        let mut base = 0.0;
        if !below {
            let shares: Vec<(usize, f32)> = if self.policy.soft {
                probs.iter().copied().enumerate().collect()
            } else {
                vec![(top, 1.0)]
            };
            for (i, p) in shares {
                let experts = &self.labels[i].experts;
                if experts.is_empty() {
                    base += p;
                }
                for e in experts {
                    *alpha.entry(e.clone()).or_default() += p / experts.len() as f32;
                }
            }
        }
        let mut mix = Mix::new(alpha, base)?.rounded(ALPHA_STEP);
        if mix.is_base() {
            // All of it on the base model: no mix, as for any base answer.
            mix = Mix::base();
        }
        Ok(RouteDecision {
            strategy: self.strategy,
            label: self.labels[top].name.clone(),
            scores,
            mix,
            pass1,
            below_threshold: below,
        })
    }
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let lse = t2_model::sampling::log_sum_exp(x);
    x.iter().map(|v| (v - lse).exp()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(soft: bool, threshold: f32) -> RouteSpec {
        let label = |name: &str, token: u32, experts: &[&str]| RouteLabel {
            name: name.into(),
            token,
            experts: experts.iter().map(|s| s.to_string()).collect(),
        };
        RouteSpec {
            strategy: RouteStrategy::Prompt,
            prompt: vec![1],
            shared_prefix: 0,
            scorer: Adaptation::base(),
            labels: Arc::new(vec![
                label("code", 0, &["code"]),
                label("math", 1, &["math"]),
                label("other", 2, &[]),
            ]),
            policy: RoutePolicy { soft, threshold },
        }
    }

    fn logits_for(p: &[f32]) -> Vec<f32> {
        p.iter().map(|v| v.ln()).collect()
    }

    #[test]
    fn hard_routing_picks_the_top_label_expert() {
        let d = spec(false, 0.0)
            .decide(&logits_for(&[0.2, 0.7, 0.1]), Duration::ZERO)
            .unwrap();
        assert_eq!(d.label, "math");
        assert_eq!(d.mix, Mix::expert("math"));
        assert!((d.scores["math"] - 0.7).abs() < 1e-5);
        assert!((d.scores.values().sum::<f32>() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn other_and_low_confidence_mean_base() {
        let d = spec(false, 0.0)
            .decide(&logits_for(&[0.2, 0.2, 0.6]), Duration::ZERO)
            .unwrap();
        assert_eq!((d.label.as_str(), &d.mix), ("other", &Mix::base()));
        let d = spec(false, 0.8)
            .decide(&logits_for(&[0.1, 0.7, 0.2]), Duration::ZERO)
            .unwrap();
        assert!(d.below_threshold);
        assert_eq!(d.mix, Mix::base());
        assert!(d.mix.weights().is_empty());
    }

    #[test]
    fn soft_routing_weights_experts_and_base_by_probability() {
        let d = spec(true, 0.0)
            .decide(&logits_for(&[0.25, 0.5, 0.25]), Duration::ZERO)
            .unwrap();
        assert!((d.mix.base_share() - 0.25).abs() < 1e-6, "{:?}", d.mix);
        let want = BTreeMap::from([("code".to_string(), 0.25), ("math".to_string(), 0.5)]);
        assert_eq!(d.mix.alpha().len(), 2);
        for (k, v) in &want {
            assert!((d.mix.alpha()[k] - v).abs() < 1e-6, "{:?}", d.mix);
        }
    }
}
