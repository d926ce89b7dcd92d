//! The one generation facade the handlers use, in the way text-generation-inference's `Infer` serves its
//! router: a validated [`GenerationRequest`] goes in; a [`Generation`] comes out, whose events are the
//! answer's tokens, in order per choice, then its end, or one typed error. Tokenizing and building the
//! pass-1 prompt run off the async runtime; submission never blocks; a routed request's pass 1 has decided
//! before `generate` returns, so the response can name the final mix.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use t2_engine::{
    GenRequest, RouteDecision, SeqEvent, SeqHandle, Submission, SubmitError, TokenEvent,
};
use t2_svf::ExpertPin;

use crate::error::{ApiError, ApiResult};
use crate::mix_choice::Chosen;
use crate::openai::Usage;
use crate::request::{check_prompt, GenerationRequest, Input};
use crate::state::AppState;
use crate::tracker::{Choice, Tracker};

/// A running generation.
pub struct Generation {
    /// The adaptation the answer runs with (pass 1's decision applied).
    pub chosen: Chosen,
    pub prompt_tokens: usize,
    pub want_logprobs: bool,
    pub include_usage: bool,
    /// Where the answer may hold tool calls: their syntax, to parse them out.
    pub tool_format: Option<t2_structured::tools::ToolFormat>,
    events: BoxStream<'static, (usize, SeqEvent)>,
    tracker: Tracker,
    until: tokio::time::Instant,
    timeout: Duration,
    _pin: Option<ExpertPin>,
}

/// Pins the experts a request may run with: its mix's, or for a routed request every expert its router
/// can pick (and the classifier). An expert removed since the mix was chosen is a client error.
fn pin_experts(
    core: &crate::state::Core,
    chosen: &Chosen,
    router: &crate::mix_choice::RouterState,
) -> ApiResult<Option<ExpertPin>> {
    let Some(store) = &core.engine.experts else {
        return Ok(None);
    };
    let names: Vec<&str> = match (&chosen.routing, router) {
        (Some(_), Ok(r)) => r
            .labels
            .iter()
            .flat_map(|l| l.experts.iter().map(String::as_str))
            .chain(r.classifier.as_deref())
            // The router may be a moment behind a removal; the decision then fails on its own.
            .filter(|n| store.get(n).is_ok())
            .collect(),
        _ => chosen.mix.alpha().keys().map(String::as_str).collect(),
    };
    if names.is_empty() {
        return Ok(None);
    }
    store
        .pin(names)
        .map(Some)
        .map_err(|e| ApiError::invalid(e.to_string(), "adaptation"))
}

/// What a generation yields next.
pub enum InferEvent {
    /// A token of choice `choice` (its text may be empty while a stop string or a character is pending).
    Token { choice: usize, event: TokenEvent },
    /// Every choice has finished.
    Done,
    /// The generation failed; nothing follows.
    Error(ApiError),
}

/// Tokenizes, builds pass 1 when the request is routed, submits, and waits for pass 1's decision.
pub async fn generate(state: &Arc<AppState>, req: GenerationRequest) -> ApiResult<Generation> {
    let core = state.core()?;
    let (st, input, structure, n) = (
        state.clone(),
        req.input.clone(),
        req.structure.clone(),
        req.n,
    );
    // Tokenizing and compiling a grammar take milliseconds: not on the async runtime.
    let (prompt, constraints) = tokio::task::spawn_blocking(move || {
        let core = st.core()?;
        let prompt = match input {
            Input::Chat(msgs) => {
                crate::structure::encode_chat(core, &msgs, structure.tools.as_ref())?
            }
            Input::Text(t) => core.engine.loaded.tokenizer.encode(&t)?,
        };
        let constraints = crate::structure::constraints(&st, core, &structure, n)?;
        Ok::<_, ApiError>((prompt, constraints))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let max_tokens = check_prompt(
        prompt.len(),
        req.max_tokens,
        core.engine.context_length(),
        state.cfg.default_max_tokens,
    )?;
    let router = core.router();
    // Held until the answer ends: the experts it may run with cannot be removed meanwhile.
    let pin = pin_experts(core, &req.chosen, &router)?;
    let route = match (&req.chosen.routing, &*router) {
        (Some(routing), Ok(router)) => {
            let (engine, router, routing, text) = (
                core.engine.clone(),
                router.clone(),
                routing.clone(),
                req.route_text.clone(),
            );
            let spec = tokio::task::spawn_blocking(move || {
                router.spec(&engine, routing.strategy, &text, routing.policy)
            })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
            Some(spec)
        }
        _ => None,
    };
    let prompt_tokens = prompt.len();
    let requests = (0..req.n)
        .map(|i| {
            let mut sampling = req.sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            sampling.constraint = constraints.as_ref().map(|c| c[i].clone());
            GenRequest {
                prompt: prompt.clone(),
                max_tokens,
                sampling,
                stop: req.stop.clone(),
                ignore_eos: req.ignore_eos,
                score_from: None,
                also_score: Vec::new(),
            }
        })
        .collect();
    state
        .metrics
        .by_adaptation
        .with_label_values(&[req.chosen.label.as_str()])
        .inc();
    let routed = route.is_some();
    let mut handles = core
        .scheduler
        .submit(Submission {
            adaptation: req.chosen.adaptation(),
            requests,
            route,
        })
        .map_err(|e| match e {
            SubmitError::QueueFull(_) => ApiError::Overloaded {
                message: e.to_string(),
                retry_after_s: 1,
            },
            SubmitError::ShutDown => ApiError::Unavailable(e.to_string()),
            SubmitError::Invalid(e) => e.into(),
        })?;
    let timeout = state.cfg.request_timeout;
    let until = tokio::time::Instant::now() + timeout;
    let mut chosen = req.chosen;
    if routed {
        let d = first_decision(&mut handles, until, timeout).await?;
        record_decision(state, &d);
        chosen.apply(&d);
    }
    let tracker = Tracker::new(
        state.clone(),
        req.started,
        handles.len(),
        prompt_tokens,
        &chosen.label,
    );
    let tool_format = req
        .structure
        .tools
        .as_ref()
        .filter(|t| t.choice != t2_structured::tools::ToolChoice::None)
        .map(|_| crate::structure::tool_format(core));
    Ok(Generation {
        tool_format,
        _pin: pin,
        chosen,
        prompt_tokens,
        want_logprobs: req.logprobs.is_some(),
        include_usage: req.include_usage,
        events: merged_events(handles),
        tracker,
        until,
        timeout,
    })
}

impl Generation {
    pub fn n(&self) -> usize {
        self.tracker.choices.len()
    }

    /// The next event; after `Done` or `Error`, nothing more comes.
    pub async fn next(&mut self) -> InferEvent {
        loop {
            if self.tracker.all_finished() {
                self.tracker.finish();
                return InferEvent::Done;
            }
            match tokio::time::timeout_at(self.until, self.events.next()).await {
                Ok(Some((i, ev))) => match self.tracker.apply(i, ev) {
                    Ok(Some(event)) => return InferEvent::Token { choice: i, event },
                    Ok(None) => continue,
                    Err(e) => {
                        self.tracker.failed();
                        return InferEvent::Error(e);
                    }
                },
                Ok(None) => {
                    self.tracker.failed();
                    return InferEvent::Error(ApiError::Internal(
                        "the engine stopped mid-request".into(),
                    ));
                }
                Err(_) => {
                    self.tracker.timed_out();
                    return InferEvent::Error(ApiError::Timeout(timeout_secs(self.timeout)));
                }
            }
        }
    }

    /// Each choice as accumulated so far.
    pub fn choices(&self) -> &[Choice] {
        &self.tracker.choices
    }

    pub fn usage(&self) -> Usage {
        self.tracker.usage()
    }
}

/// Pass 1's decision, which comes first on every choice's channel.
async fn first_decision(
    handles: &mut [SeqHandle],
    until: tokio::time::Instant,
    timeout: Duration,
) -> ApiResult<RouteDecision> {
    let first = handles
        .first_mut()
        .ok_or_else(|| ApiError::Internal("no sequence to route".into()))?;
    let ev = tokio::time::timeout_at(until, first.events.recv())
        .await
        .map_err(|_| ApiError::Timeout(timeout_secs(timeout)))?;
    match ev {
        Some(SeqEvent::Routed(d)) => Ok(d),
        Some(SeqEvent::Failed(why)) => Err(why.into()),
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
fn merged_events(handles: Vec<SeqHandle>) -> BoxStream<'static, (usize, SeqEvent)> {
    stream::select_all(handles.into_iter().enumerate().map(|(i, h)| {
        stream::unfold(h.events, move |mut rx| async move {
            rx.recv().await.map(|ev| ((i, ev), rx))
        })
        .boxed()
    }))
    .boxed()
}

pub fn timeout_secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}
