//! The one-shot generation loop: every sequence advances one token per batch step (prompts are prefilled
//! whole in the first step) until all are done. The CLI and tests use it; the server uses the scheduler.

use candle_core::Tensor;
use t2_model::{SeqStep, TokenLogprob};
use t2_svf::MixLease;

use crate::engine::{Engine, Result};
use crate::sequence::{FinishReason, GenRequest, Sequence, TokenEvent};

#[derive(Debug, Clone)]
pub struct GenOutput {
    /// Generated tokens, without the end-of-sequence token.
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub logprobs: Vec<TokenLogprob>,
    pub prompt_tokens: usize,
}

impl Engine {
    /// Generates for all requests together, each with the mix it holds, calling
    /// `on_token(request index, event)` as tokens come.
    pub fn generate(
        &self,
        reqs: Vec<(GenRequest, MixLease)>,
        mut on_token: impl FnMut(usize, &TokenEvent),
    ) -> Result<Vec<GenOutput>> {
        for (r, _) in &reqs {
            self.check_request(r)?;
            if r.score_from.is_some() || !r.also_score.is_empty() {
                return Err(crate::engine::EngineError::Invalid(
                    "scoring runs through the scheduler, not the one-shot loop".into(),
                ));
            }
        }
        let mut seqs: Vec<Sequence> = reqs
            .into_iter()
            .map(|(r, mix)| Sequence::new(self, r, mix))
            .collect::<Result<_>>()?;
        let projector = self.projector();
        loop {
            let active: Vec<usize> = (0..seqs.len())
                .filter(|&i| seqs[i].finish.is_none())
                .collect();
            if active.is_empty() {
                break;
            }
            let logits: Vec<Option<Tensor>> = {
                let mut steps: Vec<SeqStep<'_>> = seqs
                    .iter_mut()
                    .filter(|s| s.finish.is_none())
                    .map(|s| s.step(usize::MAX))
                    .collect();
                self.loaded.model.forward(&mut steps, projector)?
            };
            for &i in &active {
                seqs[i].fed();
            }
            for (i, logits) in active.into_iter().zip(logits) {
                let logits = logits.expect("a whole prompt was fed, so logits were asked for");
                let event = seqs[i].on_logits(self, &logits.to_vec1::<f32>()?)?;
                on_token(i, &event);
            }
        }
        Ok(seqs
            .into_iter()
            .map(|s| GenOutput {
                text: s.text().to_string(),
                prompt_tokens: s.prompt_len(),
                finish: s.finish.expect("loop ends when all are finished"),
                tokens: s.generated,
                logprobs: s.logprobs,
            })
            .collect())
    }
}
