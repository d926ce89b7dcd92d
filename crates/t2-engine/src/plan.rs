//! A batch step as plain data: what the scheduler decided, for a [`crate::runner::ModelRunner`] to
//! execute. Nothing here refers to a model, a tensor or a channel, so plans can be built and checked
//! without loading anything, and any runner (CPU today, GPU next) executes the same plan.

use t2_model::{SamplingParams, SeqKv, TokenLogprob};
use t2_svf::MixId;

/// A sequence's name between the scheduler and the runner (the runner keeps per-sequence state, such as
/// its sampler, under it).
pub type SeqId = u64;

/// One batch step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    /// Sequences that appear for the first time, with how the runner samples for them.
    pub started: Vec<(SeqId, SamplingParams)>,
    /// Sequences that are gone: the runner forgets them.
    pub ended: Vec<SeqId>,
    pub rows: Vec<RowPlan>,
    /// Build merged weights for this mix (it has had the batch to itself for a while).
    pub merge: Option<MixId>,
}

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct RowPlan {
    pub seq: SeqId,
    /// The new tokens: one while decoding, a chunk of the prompt while prefilling.
    pub tokens: Vec<u32>,
    /// The sequence's blocks, and the positions filled before this step.
    pub kv: SeqKv,
    pub mix: MixId,
    pub task: RowTask,
}

/// What the runner gives back for a row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowTask {
    /// A prompt chunk that is not the last: nothing.
    Feed,
    /// Sample the next token with the sequence's sampler.
    Sample,
    /// Sum log p(target | what precedes it) over the fed positions that have a target (one entry per
    /// new token; None where that position predicts nothing to score).
    Score { targets: Vec<Option<u32>> },
    /// The last position's logits of these tokens (pass 1's label tokens).
    Pick { tokens: Vec<u32> },
}

/// What a step produced for a row, in plan order.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutput {
    Fed,
    Sampled {
        token: u32,
        logprob: Option<TokenLogprob>,
    },
    Scored {
        logprob: f64,
        tokens: usize,
    },
    Picked(Vec<f32>),
}

/// Splits a step's input-token budget between rows: every decoding row gets its one token, prompt chunks
/// share the rest in admission order, at most `prefill_while_decoding` of it when some row decodes, and a
/// prompt always gets some room so that a full decode batch cannot starve newcomers. Returns, per row, how
/// many tokens it feeds (0: it sits this step out).
pub fn split_budget(
    pending: &[Pending],
    max_batched_tokens: usize,
    prefill_while_decoding: usize,
) -> Vec<usize> {
    let decoding = pending.iter().filter(|p| !p.prefilling).count();
    let mut budget = max_batched_tokens.saturating_sub(decoding);
    if decoding > 0 {
        budget = budget.min(prefill_while_decoding);
    }
    let mut budget = budget.max(16);
    pending
        .iter()
        .map(|p| {
            if !p.prefilling {
                return 1;
            }
            let take = p.remaining.min(budget);
            budget -= take;
            take
        })
        .collect()
}

/// A row's state as [`split_budget`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub prefilling: bool,
    /// Prompt tokens not yet fed.
    pub remaining: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoding() -> Pending {
        Pending {
            prefilling: false,
            remaining: 0,
        }
    }

    fn prompt(n: usize) -> Pending {
        Pending {
            prefilling: true,
            remaining: n,
        }
    }

    #[test]
    fn decode_rows_first_then_prompt_chunks_in_order() {
        let rows = [prompt(100), decoding(), prompt(50), decoding(), prompt(10)];
        assert_eq!(split_budget(&rows, 64, 512), vec![62, 1, 0, 1, 0]);
        assert_eq!(split_budget(&rows, 512, 512), vec![100, 1, 50, 1, 10]);
    }

    #[test]
    fn prefill_beside_decode_rows_takes_smaller_chunks() {
        let rows = [prompt(300), decoding(), prompt(50)];
        assert_eq!(split_budget(&rows, 512, 128), vec![128, 1, 0]);
        // With nothing decoding, nobody's token gap is at stake: the whole budget goes to prompts.
        assert_eq!(split_budget(&rows[..1], 512, 128), vec![300]);
        assert_eq!(split_budget(&[prompt(600)], 512, 128), vec![512]);
    }

    #[test]
    fn a_full_decode_batch_still_lets_a_prompt_in() {
        let mut rows = vec![decoding(); 40];
        rows.push(prompt(30));
        let split = split_budget(&rows, 32, 512);
        assert_eq!(split[40], 16);
        assert!(split[..40].iter().all(|&n| n == 1));
    }
}
