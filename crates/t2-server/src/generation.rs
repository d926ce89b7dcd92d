//! Shared by chat and text completions: OpenAI sampling fields → engine requests (validated), submission
//! to the scheduler, and the per-choice accumulation of token events with their metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, BoxStream, StreamExt};
use t2_engine::{
    FinishReason, GenRequest, RouteDecision, RouteSpec, SeqEvent, SeqHandle, Submission,
    SubmitError, TokenEvent,
};
use t2_model::{SamplingParams, TokenLogprob};

use crate::adaptation::Chosen;
use crate::error::{ApiError, ApiResult};
use crate::metrics::AdapterLease;
use crate::openai::{SamplingFields, TokenLogprobEntry, TopLogprob, Usage};
use crate::state::{AppState, Core};

/// A validated request, ready to submit.
pub struct Prepared {
    pub requests: Vec<GenRequest>,
    /// Pass 1, when the request is routed.
    pub route: Option<RouteSpec>,
    pub prompt_tokens: usize,
    pub chosen: Chosen,
    pub include_usage: bool,
    pub want_logprobs: bool,
}

/// Sampling settings checked the way OpenAI documents them; each error names its parameter.
pub fn sampling(
    f: &SamplingFields,
    logprobs: Option<usize>,
    max_n: usize,
) -> ApiResult<(SamplingParams, usize, Vec<String>)> {
    let temperature = f.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::invalid(
            format!("temperature must be between 0 and 2, got {temperature}"),
            "temperature",
        ));
    }
    let top_p = f.top_p.unwrap_or(1.0);
    if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p must be in (0, 1], got {top_p}"),
            "top_p",
        ));
    }
    let top_k = match f.top_k {
        None | Some(0) | Some(-1) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                format!("top_k must be positive (or 0/-1 for all), got {k}"),
                "top_k",
            ))
        }
    };
    let n = f.n.unwrap_or(1);
    if n < 1 || n as usize > max_n {
        return Err(ApiError::invalid(
            format!("n must be between 1 and {max_n}, got {n}"),
            "n",
        ));
    }
    for (name, v) in [
        ("presence_penalty", f.presence_penalty),
        ("frequency_penalty", f.frequency_penalty),
    ] {
        if let Some(v) = v {
            if !(v.is_finite() && (-2.0..=2.0).contains(&v)) {
                return Err(ApiError::invalid(
                    format!("{name} must be between -2 and 2, got {v}"),
                    name,
                ));
            }
        }
    }
    let stop = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > 4 {
        return Err(ApiError::invalid(
            format!("at most 4 stop sequences are allowed, got {}", stop.len()),
            "stop",
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop sequences must not be empty",
            "stop",
        ));
    }
    let unsupported = [
        (
            "logit_bias",
            f.logit_bias.as_ref().filter(|v| !is_empty_json(v)),
        ),
        ("tools", f.tools.as_ref().filter(|v| !is_empty_json(v))),
        (
            "functions",
            f.functions.as_ref().filter(|v| !is_empty_json(v)),
        ),
        (
            "response_format",
            f.response_format
                .as_ref()
                .filter(|v| v.get("type").and_then(|t| t.as_str()) != Some("text")),
        ),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, v)| v.is_some()) {
        return Err(ApiError::invalid(
            format!("{name} is not supported by this server"),
            name,
        ));
    }
    let params = SamplingParams {
        temperature,
        top_k,
        top_p,
        seed: f.seed.map(|s| s as u64),
        logprobs,
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
    };
    Ok((params, n as usize, stop))
}

fn is_empty_json(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Object(m) => m.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Builds the n engine requests for a tokenized prompt (choice i samples with seed + i).
pub fn prepare(
    state: &AppState,
    core: &Core,
    f: &SamplingFields,
    prompt: Vec<u32>,
    logprobs: Option<usize>,
    chosen: Chosen,
    route: Option<RouteSpec>,
) -> ApiResult<Prepared> {
    let (params, n, stop) = sampling(f, logprobs, state.cfg.max_n)?;
    let ctx = core.engine.context_length();
    let prompt_tokens = prompt.len();
    if prompt_tokens == 0 {
        return Err(ApiError::invalid("the prompt is empty", "messages"));
    }
    if prompt_tokens >= ctx {
        return Err(ApiError::InvalidRequest {
            message: format!(
                "the prompt has {prompt_tokens} tokens, but the model's context is {ctx} tokens"
            ),
            param: Some("messages"),
            code: Some("context_length_exceeded"),
        });
    }
    let asked = f.max_completion_tokens.or(f.max_tokens);
    let max_tokens = match asked {
        Some(m) if m < 1 => {
            return Err(ApiError::invalid(
                format!("max_tokens must be at least 1, got {m}"),
                "max_tokens",
            ))
        }
        Some(m) => m as usize,
        None => state.cfg.default_max_tokens.min(ctx - prompt_tokens),
    };
    if prompt_tokens + max_tokens > ctx {
        return Err(ApiError::InvalidRequest {
            message: format!(
                "prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's context \
                 of {ctx} tokens"
            ),
            param: Some("max_tokens"),
            code: Some("context_length_exceeded"),
        });
    }
    let requests = (0..n)
        .map(|i| {
            let mut p = params.clone();
            p.seed = p.seed.map(|s| s.wrapping_add(i as u64));
            GenRequest {
                prompt: prompt.clone(),
                max_tokens,
                sampling: p,
                stop: stop.clone(),
                ignore_eos: f.ignore_eos.unwrap_or(false),
                score_from: None,
                also_score: Vec::new(),
            }
        })
        .collect();
    Ok(Prepared {
        requests,
        route,
        prompt_tokens,
        chosen,
        include_usage: f
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage == Some(true)),
        want_logprobs: logprobs.is_some(),
    })
}

/// Submits to the scheduler; a full queue becomes 429 with Retry-After.
pub fn submit(state: &AppState, core: &Core, p: &Prepared) -> ApiResult<Vec<SeqHandle>> {
    state
        .metrics
        .by_adaptation
        .with_label_values(&[p.chosen.label.as_str()])
        .inc();
    core.scheduler
        .submit(Submission {
            adaptation: p.chosen.adaptation(),
            requests: p.requests.clone(),
            route: p.route.clone(),
        })
        .map_err(|e| match e {
            SubmitError::QueueFull(_) => ApiError::Overloaded {
                message: e.to_string(),
                retry_after_s: 1,
            },
            SubmitError::ShutDown => ApiError::Unavailable(e.to_string()),
            SubmitError::Invalid(e) => e.into(),
        })
}

/// Waits for pass 1 of a routed request (its decision comes first on every choice's channel) and applies
/// it, so that the response's headers and every chunk name the final mix.
pub async fn await_routing(
    state: &AppState,
    p: &mut Prepared,
    handles: &mut [SeqHandle],
) -> ApiResult<()> {
    if p.route.is_none() {
        return Ok(());
    }
    let first = handles
        .first_mut()
        .ok_or_else(|| ApiError::Internal("no sequence to route".into()))?;
    let ev = tokio::time::timeout_at(deadline(state), first.events.recv())
        .await
        .map_err(|_| ApiError::Timeout(timeout_secs(state.cfg.request_timeout)))?;
    match ev {
        Some(SeqEvent::Routed(d)) => {
            record_decision(state, &d);
            p.chosen.apply(&d);
            Ok(())
        }
        Some(SeqEvent::Failed(msg)) => Err(ApiError::Internal(msg)),
        Some(other) => Err(ApiError::Internal(format!(
            "expected pass 1's decision first, got {other:?}"
        ))),
        None => Err(ApiError::Internal("the engine stopped mid-request".into())),
    }
}

fn record_decision(state: &AppState, d: &RouteDecision) {
    let m = &state.metrics;
    m.routing_decisions
        .with_label_values(&[d.strategy.as_str(), d.label.as_str()])
        .inc();
    m.pass1_latency.observe(d.pass1.as_secs_f64());
}

/// All choices' events as one stream of (choice index, event).
pub fn merged_events(handles: Vec<SeqHandle>) -> BoxStream<'static, (usize, SeqEvent)> {
    stream::select_all(handles.into_iter().enumerate().map(|(i, h)| {
        stream::unfold(h.events, move |mut rx| async move {
            rx.recv().await.map(|ev| ((i, ev), rx))
        })
        .boxed()
    }))
    .boxed()
}

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
            SeqEvent::Failed(msg) => Err(ApiError::Internal(msg)),
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

/// Logprob entries in the chat format: each token's text and its raw bytes (a token may hold only part
/// of a character; the bytes of consecutive tokens concatenate to the UTF-8 of the text).
pub fn chat_logprobs(core: &Core, lps: &[TokenLogprob]) -> Vec<TokenLogprobEntry> {
    lps.iter()
        .map(|lp| {
            let (token, bytes) = token_text(core, lp.token);
            TokenLogprobEntry {
                token,
                bytes,
                logprob: lp.logprob,
                top_logprobs: lp
                    .top
                    .iter()
                    .map(|&(id, l)| {
                        let (token, bytes) = token_text(core, id);
                        TopLogprob {
                            token,
                            bytes,
                            logprob: l,
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}

/// A token's text (lossy where it is part of a character) and its raw bytes.
pub fn token_text(core: &Core, id: u32) -> (String, Vec<u8>) {
    let bytes = core.engine.loaded.tokenizer.token_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// The deadline of a request that starts now.
pub fn deadline(state: &AppState) -> tokio::time::Instant {
    tokio::time::Instant::now() + state.cfg.request_timeout
}

pub fn timeout_secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}
