//! The generation loop: every live sequence advances one token per batch step (new prompts are
//! prefilled in the first step), each with its own mix, sampler and stop conditions.

use candle_core::Tensor;
use t2_model::{KvCache, Sampler, SamplingParams, SeqStep, TokenLogprob, WantLogits};
use t2_svf::MixId;

use crate::engine::{Engine, EngineError, Result};
use crate::text::TextStream;

#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub mix: MixId,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
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

#[derive(Debug, Clone)]
pub struct GenOutput {
    /// Generated tokens, without the end-of-sequence token.
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub logprobs: Vec<TokenLogprob>,
    pub prompt_tokens: usize,
}

/// One generated token of one sequence, as it happens.
pub struct TokenEvent<'a> {
    pub token: u32,
    /// Text released by this token (may be empty while a stop string or a character is incomplete).
    pub text: &'a str,
    pub logprob: Option<&'a TokenLogprob>,
    pub finish: Option<FinishReason>,
}

struct Live {
    cache: KvCache,
    sampler: Sampler,
    text: TextStream,
    out: GenOutput,
    pending: Vec<u32>,
    max_tokens: usize,
    mix: MixId,
    done: bool,
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
        if r.prompt.len() + r.max_tokens > ctx {
            return Err(EngineError::Invalid(format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds the context of {ctx} tokens",
                r.prompt.len(),
                r.max_tokens
            )));
        }
        r.sampling.validate()?;
        Ok(())
    }

    /// Generates for all requests together, calling `on_token(request index, event)` as tokens come.
    pub fn generate(
        &self,
        reqs: Vec<GenRequest>,
        mut on_token: impl FnMut(usize, &TokenEvent<'_>),
    ) -> Result<Vec<GenOutput>> {
        for r in &reqs {
            self.check_request(r)?;
        }
        let model = &self.loaded.model;
        let tok = &self.loaded.tokenizer;
        let mut live: Vec<Live> = reqs
            .into_iter()
            .map(|r| Live {
                cache: model.new_cache(),
                sampler: Sampler::new(r.sampling),
                text: TextStream::new(r.stop),
                out: GenOutput {
                    tokens: Vec::new(),
                    text: String::new(),
                    finish: FinishReason::Length,
                    logprobs: Vec::new(),
                    prompt_tokens: r.prompt.len(),
                },
                pending: r.prompt,
                max_tokens: r.max_tokens,
                mix: r.mix,
                done: false,
            })
            .collect();
        let projector = self.projector();
        loop {
            let active: Vec<usize> = (0..live.len()).filter(|&i| !live[i].done).collect();
            if active.is_empty() {
                break;
            }
            let logits: Vec<Tensor> = {
                let mut steps: Vec<SeqStep<'_>> = live
                    .iter_mut()
                    .filter(|l| !l.done)
                    .map(|l| SeqStep {
                        cache: &mut l.cache,
                        tokens: &l.pending,
                        mix: l.mix,
                        want: WantLogits::Last,
                    })
                    .collect();
                model
                    .forward(&mut steps, projector)?
                    .into_iter()
                    .map(|l| l.expect("asked for logits"))
                    .collect()
            };
            for (i, logits) in active.into_iter().zip(logits) {
                let l = &mut live[i];
                let (token, lp) = l.sampler.sample(&logits.to_vec1::<f32>()?);
                if tok.is_eos(token) {
                    l.done = true;
                    l.out.finish = FinishReason::Stop;
                    let rest = l.text.flush();
                    on_token(
                        i,
                        &TokenEvent {
                            token,
                            text: &rest,
                            logprob: lp.as_ref(),
                            finish: Some(FinishReason::Stop),
                        },
                    );
                    continue;
                }
                l.out.tokens.push(token);
                let released = l.text.update(tok.decode(&l.out.tokens)?);
                let mut delta = released.delta;
                let mut finish = None;
                if released.stopped {
                    finish = Some(FinishReason::Stop);
                } else if l.out.tokens.len() >= l.max_tokens {
                    delta.push_str(&l.text.flush());
                    finish = Some(FinishReason::Length);
                }
                on_token(
                    i,
                    &TokenEvent {
                        token,
                        text: &delta,
                        logprob: lp.as_ref(),
                        finish,
                    },
                );
                if let Some(lp) = lp {
                    l.out.logprobs.push(lp);
                }
                if let Some(f) = finish {
                    l.done = true;
                    l.out.finish = f;
                }
                l.pending = vec![token];
            }
        }
        Ok(live
            .into_iter()
            .map(|mut l| {
                l.out.text = l.text.text().to_string();
                l.out
            })
            .collect())
    }
}
