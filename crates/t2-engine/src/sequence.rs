//! One sequence being generated: its prompt (fed in chunks), KV cache, sampler and stop conditions. Both
//! the one-shot batch loop and the continuous-batching scheduler drive sequences through this type.

use t2_model::{KvCache, Sampler, SamplingParams, SeqStep, TokenLogprob, WantLogits};
use t2_svf::MixLease;

use crate::engine::{Engine, EngineError, Result};
use crate::text::TextStream;

#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence until max_tokens (benchmarks want fixed-length answers).
    pub ignore_eos: bool,
    /// Score instead of generating: the summed log-probability of `prompt[from..]` given what precedes
    /// it (teacher-forced in the prefill), reported as one [`Scored`] result.
    pub score_from: Option<usize>,
    /// While generating, also score this continuation of the prompt (one [`Scored`] event besides the
    /// tokens). It is scored from a fork of the prompt's KV once the prompt is in, so the prompt is
    /// computed once for both. Empty: nothing to score.
    pub also_score: Vec<u32>,
}

/// The log-likelihood of a scored continuation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub logprob: f64,
    pub tokens: usize,
}

impl GenRequest {
    pub fn new(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Self {
        Self {
            prompt,
            max_tokens,
            sampling,
            stop: Vec::new(),
            ignore_eos: false,
            score_from: None,
            also_score: Vec::new(),
        }
    }

    /// Tokens of KV cache this request's own sequence can need at most.
    pub fn kv_tokens(&self) -> usize {
        self.prompt.len() + self.max_tokens
    }

    /// Tokens of KV cache the scoring fork of [`Self::also_score`] takes (0 without one).
    pub fn scoring_kv_tokens(&self) -> usize {
        if self.also_score.is_empty() {
            0
        } else {
            // The last prompt token is fed again so that the fork's first step predicts the first
            // scored token; max_tokens 1 as for any scoring sequence.
            self.prompt.len() + self.also_score.len() + 1
        }
    }

    /// KV tokens the request takes in all, its scoring fork included.
    pub fn total_kv_tokens(&self) -> usize {
        self.kv_tokens() + self.scoring_kv_tokens()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// max_tokens reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// One generated token of one sequence, as it happens.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub token: u32,
    /// Text released by this token (may be empty while a stop string or a character is incomplete).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
    pub finish: Option<FinishReason>,
    /// False for the end-of-sequence token, which is reported (it carries the finish) but not counted.
    pub counted: bool,
}

pub(crate) struct Sequence {
    pub cache: KvCache,
    /// The sequence's hold on its mix's table slot, for as long as it lives.
    pub mix: MixLease,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Input tokens of the step in flight.
    feeding: usize,
    /// The last sampled token, fed at the next step.
    last: Option<u32>,
    sampler: Sampler,
    text: TextStream,
    pub generated: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    max_tokens: usize,
    ignore_eos: bool,
    pub finish: Option<FinishReason>,
    /// While scoring: where the scored continuation starts, and its log-probability so far.
    score: Option<(usize, Scored)>,
    /// A continuation to score from a fork of this sequence's prompt KV (taken once the prompt is in).
    also_score: Vec<u32>,
}

impl Sequence {
    pub fn new(engine: &Engine, r: GenRequest, mix: MixLease) -> Result<Self> {
        let mut cache = engine.loaded.model.new_cache();
        // Exactly what the request can use: no regrowth copies while decoding, and the scheduler's KV
        // budget accounts for real allocations.
        cache.reserve(r.kv_tokens())?;
        Ok(Self::from_cache(r, mix, cache, 0))
    }

    fn from_cache(r: GenRequest, mix: MixLease, cache: KvCache, prefilled: usize) -> Self {
        Self {
            cache,
            mix,
            prompt: r.prompt,
            prefilled,
            feeding: 0,
            last: None,
            sampler: Sampler::new(r.sampling),
            text: TextStream::new(r.stop),
            generated: Vec::new(),
            logprobs: Vec::new(),
            max_tokens: r.max_tokens,
            ignore_eos: r.ignore_eos,
            finish: None,
            score: r.score_from.map(|f| {
                (
                    f,
                    Scored {
                        logprob: 0.0,
                        tokens: 0,
                    },
                )
            }),
            also_score: r.also_score,
        }
    }

    /// Once the prompt is in, the sequence that scores [`GenRequest::also_score`] from a fork of its KV
    /// (same mix), and the KV tokens that fork takes. At most once per sequence.
    pub fn take_scoring_fork(&mut self) -> Result<Option<(Sequence, usize)>> {
        if self.also_score.is_empty() || self.is_prefilling() || self.is_scoring() {
            return Ok(None);
        }
        let mut prompt = self.prompt.clone();
        prompt.extend(std::mem::take(&mut self.also_score));
        let mut req = GenRequest::new(prompt, 1, SamplingParams::default());
        req.score_from = Some(self.prompt.len());
        req.ignore_eos = true;
        let kv = req.kv_tokens();
        // The fork re-feeds the last prompt token: its logits predict the first scored token.
        Ok(Some((
            Self::with_prefix(req, self.mix.clone(), &self.cache, self.prompt.len() - 1)?,
            kv,
        )))
    }

    /// A sequence whose prompt starts with `len` tokens already computed in `prefix` (same weights): it
    /// prefills only the rest.
    pub fn with_prefix(r: GenRequest, mix: MixLease, prefix: &KvCache, len: usize) -> Result<Self> {
        // At least the last prompt token is fed, so that the first step yields logits.
        let len = len.min(prefix.len()).min(r.prompt.len().saturating_sub(1));
        let cache = prefix.fork(len, r.kv_tokens() - len)?;
        Ok(Self::from_cache(r, mix, cache, len))
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt.len()
    }

    pub fn is_prefilling(&self) -> bool {
        self.prefilled < self.prompt.len()
    }

    /// This step's input: at most `budget` prompt tokens while prefilling (logits only once the whole
    /// prompt is in), else the last sampled token. Call [`Self::fed`] after the forward pass.
    pub fn step(&mut self, budget: usize) -> SeqStep<'_> {
        let (range, want) = if self.is_prefilling() {
            let end = (self.prefilled + budget.max(1)).min(self.prompt.len());
            let want = match self.score {
                // Positions from-1 .. len-1 predict the scored tokens.
                Some((from, _)) if end >= from => WantLogits::All,
                Some(_) => WantLogits::None,
                None if end == self.prompt.len() => WantLogits::Last,
                None => WantLogits::None,
            };
            (self.prefilled..end, want)
        } else {
            (0..1, WantLogits::Last)
        };
        self.feeding = range.len();
        let tokens = if self.is_prefilling() {
            &self.prompt[range]
        } else {
            std::slice::from_ref(self.last.as_ref().expect("decoding has a last token"))
        };
        SeqStep {
            cache: &mut self.cache,
            tokens,
            mix: self.mix.id(),
            want,
        }
    }

    /// The input of the last [`Self::step`] went through the model.
    pub fn fed(&mut self) {
        if self.is_prefilling() {
            self.prefilled += self.feeding;
        }
        self.feeding = 0;
    }

    pub fn is_scoring(&self) -> bool {
        self.score.is_some()
    }

    /// Adds the log-probabilities of the scored tokens that the chunk just fed predicts (`logits`: one row
    /// per fed position). Returns the result once the whole prompt is in.
    pub fn on_score_logits(&mut self, logits: &candle_core::Tensor) -> Result<Option<Scored>> {
        let Some((from, mut acc)) = self.score else {
            return Ok(None);
        };
        let rows = logits.dim(0)?;
        let start = self.prefilled - rows;
        for p in start.max(from - 1)..self.prefilled.min(self.prompt.len() - 1) {
            let row = logits.get(p - start)?.to_vec1::<f32>()?;
            let lse = t2_model::sampling::log_sum_exp(&row);
            acc.logprob += (row[self.prompt[p + 1] as usize] - lse) as f64;
            acc.tokens += 1;
        }
        self.score = Some((from, acc));
        if self.is_prefilling() {
            return Ok(None);
        }
        self.finish = Some(FinishReason::Stop);
        Ok(Some(acc))
    }

    /// Samples from the logits of the last position and advances the text and stop conditions.
    pub fn on_logits(&mut self, engine: &Engine, logits: &[f32]) -> Result<TokenEvent> {
        let tok = &engine.loaded.tokenizer;
        let (token, logprob) = self.sampler.sample(logits);
        if tok.is_eos(token) && !self.ignore_eos {
            self.finish = Some(FinishReason::Stop);
            return Ok(TokenEvent {
                token,
                text: self.text.flush(),
                logprob,
                finish: self.finish,
                counted: false,
            });
        }
        self.generated.push(token);
        self.last = Some(token);
        let released = self.text.update(tok.decode(&self.generated)?);
        let mut text = released.delta;
        if released.stopped {
            self.finish = Some(FinishReason::Stop);
        } else if self.generated.len() >= self.max_tokens {
            text.push_str(&self.text.flush());
            self.finish = Some(FinishReason::Length);
        }
        if let Some(lp) = &logprob {
            self.logprobs.push(lp.clone());
        }
        Ok(TokenEvent {
            token,
            text,
            logprob,
            finish: self.finish,
            counted: true,
        })
    }

    pub fn text(&self) -> &str {
        self.text.text()
    }
}

impl Engine {
    pub fn check_request(&self, r: &GenRequest) -> Result<()> {
        if r.prompt.is_empty() {
            return Err(EngineError::Invalid("the prompt is empty".into()));
        }
        if r.max_tokens == 0 {
            return Err(EngineError::Invalid("max_tokens must be at least 1".into()));
        }
        let ctx = self.context_length();
        if r.kv_tokens() > ctx {
            return Err(EngineError::Invalid(format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds the context of {ctx} tokens",
                r.prompt.len(),
                r.max_tokens
            )));
        }
        r.sampling.validate()?;
        if let Some(from) = r.score_from {
            if from == 0 || from >= r.prompt.len() {
                return Err(EngineError::Invalid(format!(
                    "the scored part must start inside the prompt (at 1..{}), got {from}",
                    r.prompt.len()
                )));
            }
            if !r.also_score.is_empty() {
                return Err(EngineError::Invalid(
                    "a scoring request cannot also score a continuation".into(),
                ));
            }
        }
        let scored = r.prompt.len() + r.also_score.len();
        if !r.also_score.is_empty() && scored + 1 > ctx {
            return Err(EngineError::Invalid(format!(
                "prompt ({} tokens) + the continuation to score ({}) exceeds the context of {ctx} tokens",
                r.prompt.len(),
                r.also_score.len()
            )));
        }
        Ok(())
    }
}
