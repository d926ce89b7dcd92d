//! Per-request bookkeeping while a generation streams: each choice's text, tokens and finish, and the
//! request's metrics (time to first token, inter-token latency, tokens, end-to-end time, and whether it
//! ended normally, timed out or was abandoned by its client).

use std::sync::Arc;
use std::time::Instant;

use t2_engine::{FinishReason, SeqEvent, TokenEvent};
use t2_model::TokenLogprob;

use crate::error::{ApiError, ApiResult};
use crate::metrics::AdapterLease;
use crate::openai::Usage;
use crate::state::AppState;

/// One choice as it accumulates.
#[derive(Default)]
pub struct Choice {
    pub text: String,
    pub tokens: usize,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
    last_token_at: Option<Instant>,
}

/// Tracks a request's choices and records its metrics; dropped before the end, it counts a disconnect.
pub struct Tracker {
    state: Arc<AppState>,
    started: Instant,
    pub choices: Vec<Choice>,
    pub prompt_tokens: usize,
    first_token: bool,
    done: bool,
    /// The expert or stored mix this request runs on, for `vllm:lora_requests_info`.
    adapter: Option<AdapterLease>,
}

impl Tracker {
    pub fn new(
        state: Arc<AppState>,
        started: Instant,
        n: usize,
        prompt_tokens: usize,
        adaptation_label: &str,
    ) -> Self {
        let adapter = state.metrics.adapter_lease(adaptation_label);
        Self {
            state,
            started,
            choices: (0..n).map(|_| Choice::default()).collect(),
            prompt_tokens,
            first_token: false,
            done: false,
            adapter,
        }
    }

    /// Applies one event; returns the token event to forward, if any.
    pub fn apply(&mut self, i: usize, ev: SeqEvent) -> ApiResult<Option<TokenEvent>> {
        let m = &self.state.metrics;
        match ev {
            SeqEvent::Admitted { queue_time, .. } => {
                if let Some(adapter) = &mut self.adapter {
                    adapter.admitted();
                }
                m.queue_time.observe(queue_time.as_secs_f64());
                m.prompt_tokens.inc_by(self.prompt_tokens as u64);
                Ok(None)
            }
            SeqEvent::Failed(why) => Err(why.into()),
            // Every sequence of a routed request hears the decision; the first one already applied it.
            SeqEvent::Routed(_) => Ok(None),
            SeqEvent::Scored(_) => Err(ApiError::Internal(
                "a completion was answered with a score".into(),
            )),
            SeqEvent::Token(t) => {
                let now = Instant::now();
                let c = &mut self.choices[i];
                if t.counted {
                    if !self.first_token {
                        self.first_token = true;
                        m.ttft.observe((now - self.started).as_secs_f64());
                    }
                    if let Some(prev) = c.last_token_at {
                        m.itl.observe((now - prev).as_secs_f64());
                    }
                    c.last_token_at = Some(now);
                    c.tokens += 1;
                    m.generated_tokens.inc();
                    if let Some(lp) = &t.logprob {
                        c.logprobs.push(lp.clone());
                    }
                }
                c.text.push_str(&t.text);
                if t.finish.is_some() {
                    c.finish = t.finish;
                }
                Ok(Some(t))
            }
        }
    }

    pub fn all_finished(&self) -> bool {
        self.choices.iter().all(|c| c.finish.is_some())
    }

    pub fn usage(&self) -> Usage {
        let completion: usize = self.choices.iter().map(|c| c.tokens).sum();
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: completion,
            total_tokens: self.prompt_tokens + completion,
        }
    }

    /// The request ended normally.
    pub fn finish(&mut self) {
        self.done = true;
        self.state
            .metrics
            .e2e
            .observe(self.started.elapsed().as_secs_f64());
    }

    /// The request ran out of time: counted as a timeout, not a disconnect.
    pub fn timed_out(&mut self) {
        self.done = true;
        self.state
            .metrics
            .cancellations
            .with_label_values(&["timeout"])
            .inc();
    }

    /// The request failed inside the engine: not a cancellation.
    pub fn failed(&mut self) {
        self.done = true;
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.done {
            self.state
                .metrics
                .cancellations
                .with_label_values(&["disconnect"])
                .inc();
        }
    }
}
