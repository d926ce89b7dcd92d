//! One sequence being generated: its prompt (fed in chunks), KV blocks, text and stop conditions. Both
//! the one-shot batch loop and the continuous-batching scheduler drive sequences through this type.

use t2_model::{SamplingParams, T2Tokenizer, TokenLogprob, BLOCK_SIZE};
use t2_svf::MixLease;

use crate::engine::{Engine, EngineError, Result};
use crate::kv::KvLease;
use crate::plan::{RowTask, SeqId};
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

    /// KV blocks the request's own sequence takes.
    pub fn kv_blocks(&self) -> usize {
        t2_model::kv::blocks_for(self.kv_tokens())
    }

    /// Fresh KV blocks the scoring fork takes besides the prompt blocks it shares (0 without one).
    pub fn fork_blocks(&self) -> usize {
        if self.also_score.is_empty() {
            return 0;
        }
        let shared = (self.prompt.len() - 1) / BLOCK_SIZE;
        t2_model::kv::blocks_for(self.scoring_kv_tokens()) - shared
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

/// A sequence as the scheduler tracks it: prompt progress, the tokens so far, text and stop conditions,
/// and what it holds (its KV blocks and its mix's table slot, both given back when it is dropped). Its
/// sampler lives in the runner, under its id.
pub(crate) struct Sequence {
    pub id: SeqId,
    pub kv: KvLease,
    pub mix: MixLease,
    prompt: Vec<u32>,
    /// Sampling settings, handed to the runner when the sequence first steps.
    sampling: Option<SamplingParams>,
    /// The last sampled token, fed at the next step.
    last: Option<u32>,
    text: TextStream,
    pub generated: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    max_tokens: usize,
    ignore_eos: bool,
    pub finish: Option<FinishReason>,
    /// While scoring: where the scored continuation starts, and its log-probability so far.
    score: Option<(usize, Scored)>,
    /// A continuation to score from a fork of this sequence's prompt KV (taken once the prompt is in),
    /// with the fresh blocks reserved for that fork at admission.
    also_score: Option<(Vec<u32>, KvLease)>,
    /// Pass 1: the label tokens to read instead of sampling.
    pick: Option<Vec<u32>>,
}

/// What a sequence's next step feeds, as [`Sequence::row`] plans it.
pub(crate) struct Feed {
    pub tokens: Vec<u32>,
    pub task: RowTask,
}

impl Sequence {
    /// `kv`'s filled positions are the prompt's first tokens (computed under the same weights), and
    /// `fork_kv` holds the fresh blocks of the [`GenRequest::also_score`] fork, if any.
    pub fn new(
        id: SeqId,
        r: GenRequest,
        mix: MixLease,
        kv: KvLease,
        fork_kv: Option<KvLease>,
    ) -> Self {
        let also_score = match (r.also_score.is_empty(), fork_kv) {
            (false, Some(k)) => Some((r.also_score, k)),
            _ => None,
        };
        Self {
            id,
            kv,
            mix,
            prompt: r.prompt,
            sampling: Some(r.sampling),
            last: None,
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
            also_score,
            pick: None,
        }
    }

    /// A pass-1 row: it feeds the prompt and reads `labels`' logits at the end.
    pub fn pass1(
        id: SeqId,
        prompt: Vec<u32>,
        mix: MixLease,
        kv: KvLease,
        labels: Vec<u32>,
    ) -> Self {
        let mut s = Self::new(
            id,
            GenRequest::new(prompt, 1, SamplingParams::default()),
            mix,
            kv,
            None,
        );
        s.pick = Some(labels);
        s.ignore_eos = true;
        s
    }

    /// Once the prompt is in, the request that scores [`GenRequest::also_score`] from this sequence's
    /// prompt KV, the KV for it (the prompt's full blocks shared, then the reserved fresh ones) and the
    /// mix. At most once per sequence.
    pub fn take_scoring_fork(&mut self) -> Option<(GenRequest, KvLease, MixLease)> {
        if self.is_prefilling() || self.is_scoring() {
            return None;
        }
        let (continuation, fresh) = self.also_score.take()?;
        let mut prompt = self.prompt.clone();
        prompt.extend(continuation);
        let mut req = GenRequest::new(prompt, 1, SamplingParams::default());
        req.score_from = Some(self.prompt.len());
        req.ignore_eos = true;
        // The fork re-feeds at least the last prompt token: its logits predict the first scored token.
        let shared = (self.prompt.len() - 1) / BLOCK_SIZE;
        let kv = self.kv.share(shared).join(fresh);
        Some((req, kv, self.mix.clone()))
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt.len()
    }

    pub fn is_prefilling(&self) -> bool {
        self.kv.len() < self.prompt.len()
    }

    /// Sampling settings the runner has not been given yet (once).
    pub fn take_sampling(&mut self) -> Option<SamplingParams> {
        self.sampling.take()
    }

    /// This step's input: at most `budget` prompt tokens while prefilling (a result only once the whole
    /// prompt is in), else the last sampled token.
    pub fn row(&self, budget: usize) -> Feed {
        let done = self.kv.len();
        if !self.is_prefilling() {
            let last = self.last.expect("decoding has a last token");
            return Feed {
                tokens: vec![last],
                task: RowTask::Sample,
            };
        }
        let end = (done + budget.max(1)).min(self.prompt.len());
        let task = match (&self.score, &self.pick) {
            // Position p predicts prompt[p + 1]; the scored part starts at `from`.
            (Some((from, _)), _) => RowTask::Score {
                targets: (done..end)
                    .map(|p| {
                        (p + 1 >= *from && p + 1 < self.prompt.len()).then(|| self.prompt[p + 1])
                    })
                    .collect(),
            },
            _ if end < self.prompt.len() => RowTask::Feed,
            (None, Some(labels)) => RowTask::Pick {
                tokens: labels.clone(),
            },
            (None, None) => RowTask::Sample,
        };
        Feed {
            tokens: self.prompt[done..end].to_vec(),
            task,
        }
    }

    /// `n` input tokens of the last planned row went through the model.
    pub fn fed(&mut self, n: usize) {
        self.kv.kv_mut().len += n;
    }

    pub fn is_scoring(&self) -> bool {
        self.score.is_some()
    }

    /// Adds a scoring chunk's result; the total once the whole prompt is in.
    pub fn on_score(&mut self, logprob: f64, tokens: usize) -> Option<Scored> {
        let (from, mut acc) = self.score?;
        acc.logprob += logprob;
        acc.tokens += tokens;
        self.score = Some((from, acc));
        if self.is_prefilling() {
            return None;
        }
        self.finish = Some(FinishReason::Stop);
        Some(acc)
    }

    /// Takes a sampled token: advances the text and the stop conditions.
    pub fn on_token(
        &mut self,
        tok: &T2Tokenizer,
        token: u32,
        logprob: Option<TokenLogprob>,
    ) -> Result<TokenEvent> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::BlockKvManager;

    fn scoring(prompt: Vec<u32>, from: usize, kv: &BlockKvManager) -> Sequence {
        let mut r = GenRequest::new(prompt, 1, SamplingParams::default());
        r.score_from = Some(from);
        let blocks = kv.allocate(r.kv_tokens()).unwrap();
        Sequence::new(1, r, MixLease::unheld_base(), blocks, None)
    }

    #[test]
    fn a_scoring_sequence_plans_its_targets_chunk_by_chunk() {
        let kv = BlockKvManager::new(4);
        let prompt: Vec<u32> = (100..110).collect();
        // prompt[6..] is scored: positions 5..9 predict it.
        let mut s = scoring(prompt.clone(), 6, &kv);
        let first = s.row(4);
        assert_eq!(first.tokens, prompt[..4]);
        assert_eq!(
            first.task,
            RowTask::Score {
                targets: vec![None; 4]
            }
        );
        s.fed(4);
        assert!(s.on_score(0.0, 0).is_none(), "the prompt is not in yet");
        let rest = s.row(100);
        assert_eq!(rest.tokens, prompt[4..]);
        assert_eq!(
            rest.task,
            RowTask::Score {
                targets: vec![None, Some(106), Some(107), Some(108), Some(109), None]
            }
        );
        s.fed(6);
        assert_eq!(
            s.on_score(-2.5, 4),
            Some(Scored {
                logprob: -2.5,
                tokens: 4
            })
        );
        assert_eq!(s.finish, Some(FinishReason::Stop));
    }

    #[test]
    fn a_generating_sequence_samples_only_once_its_prompt_is_in() {
        let kv = BlockKvManager::new(4);
        let r = GenRequest::new((0..20).collect(), 5, SamplingParams::default());
        let blocks = kv.allocate(r.kv_tokens()).unwrap();
        assert_eq!(blocks.kv().blocks.len(), 2);
        let mut s = Sequence::new(7, r, MixLease::unheld_base(), blocks, None);
        assert!(s.take_sampling().is_some() && s.take_sampling().is_none());
        assert_eq!(s.row(16).task, RowTask::Feed);
        s.fed(16);
        let last = s.row(16);
        assert_eq!((last.tokens.len(), last.task), (4, RowTask::Sample));
        drop(s);
        assert_eq!(kv.used(), 0, "a dropped sequence gives its blocks back");
    }
}
