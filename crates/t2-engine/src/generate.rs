//! The one-shot generation loop: every sequence advances one token per batch step (prompts are prefilled
//! whole in the first step) until all are done, through the same plans and execution as the scheduler's
//! steps. The CLI and tests use it; the server uses the scheduler.

use std::collections::HashMap;

use t2_model::TokenLogprob;
use t2_svf::MixLease;

use crate::engine::{Engine, Result};
use crate::kv::BlockKvManager;
use crate::plan::{RowOutput, RowPlan, SeqId, StepPlan};
use crate::runner::execute;
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
        // A pool of exactly the blocks these requests need, all of it theirs.
        let kv = BlockKvManager::new(reqs.iter().map(|(r, _)| r.kv_blocks()).sum());
        let pool = self.loaded.model.new_pool(kv.total())?;
        let mut samplers = HashMap::new();
        let mut seqs: Vec<Sequence> = reqs
            .into_iter()
            .enumerate()
            .map(|(i, (r, mix))| {
                let blocks = kv
                    .allocate(r.kv_tokens())
                    .expect("the pool is sized for them");
                Sequence::new(i as SeqId, r, mix, blocks, None)
            })
            .collect();
        loop {
            let active: Vec<usize> = (0..seqs.len())
                .filter(|&i| seqs[i].finish.is_none())
                .collect();
            if active.is_empty() {
                break;
            }
            let mut plan = StepPlan::default();
            for &i in &active {
                let s = &mut seqs[i];
                if let Some(p) = s.take_sampling() {
                    plan.started.push((s.id, p));
                }
                // Prompts go in whole in the first step.
                let feed = s.row(usize::MAX);
                plan.rows.push(RowPlan {
                    seq: s.id,
                    tokens: feed.tokens,
                    kv: s.kv.kv().clone(),
                    mix: s.mix.id(),
                    task: feed.task,
                });
            }
            let outputs = execute(self, &pool, &mut samplers, &plan)?;
            for ((&i, row), out) in active.iter().zip(&plan.rows).zip(outputs) {
                seqs[i].fed(row.tokens.len());
                let RowOutput::Sampled { token, logprob } = out else {
                    unreachable!("a whole prompt was fed, so a token was sampled")
                };
                let event = seqs[i].on_token(&self.loaded.tokenizer, token, logprob)?;
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
