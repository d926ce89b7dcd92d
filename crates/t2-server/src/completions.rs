//! `POST /v1/chat/completions` and `POST /v1/completions`: thin handlers over the shared generation path;
//! streaming answers are server-sent events fed by a task that stops (cancelling the sequences) as soon as
//! the client goes away.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use rand::Rng;
use t2_engine::SeqHandle;
use t2_model::ChatMessage;

use crate::adaptation::choose;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::generation::{
    chat_logprobs, deadline, merged_events, prepare, submit, timeout_secs, token_text, Prepared,
    Tracker,
};
use crate::openai::*;
use crate::state::{AppState, Core};

/// JSON body extractor whose failures are OpenAI errors: 413 over the size limit, 400 otherwise, with
/// serde's own description of what is wrong and where.
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(usize::MAX);
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge(limit)
                } else {
                    ApiError::invalid(format!("cannot read the request body: {e}"), "body")
                }
            })?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            let what = if e.is_syntax() || e.is_eof() {
                "the request body is not valid JSON"
            } else {
                "the request body does not match the schema"
            };
            ApiError::InvalidRequest {
                message: format!("{what}: {e}"),
                param: None,
                code: None,
            }
        })
    }
}

/// The body size limit, put in request extensions so that the extractor can name it in its error.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    let r: u128 = rand::rng().random();
    format!("{prefix}-{:024x}", r & ((1u128 << 96) - 1))
}

const FINGERPRINT: &str = concat!("t2-", env!("CARGO_PKG_VERSION"));

fn messages(req: &[RequestMessage]) -> ApiResult<Vec<ChatMessage>> {
    if req.is_empty() {
        return Err(ApiError::invalid("messages must not be empty", "messages"));
    }
    req.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        format!(
                            "messages[{i}].role '{other}' is not supported (system, developer, user, assistant)"
                        ),
                        "messages",
                    ))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!(
                                        "messages[{i}]: content parts of type '{kind}' are not supported (text only)"
                                    ),
                                    "messages",
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage::new(role, &content))
        })
        .collect()
}

/// Chat completion (streaming or not), with t2's per-request adaptation.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "A completion, or server-sent `chat.completion.chunk` events when stream is true", body = ChatCompletionResponse),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Queue full (see Retry-After)", body = ErrorBody),
        (status = 503, description = "Loading or shutting down", body = ErrorBody),
    ),
    tag = "openai"
)]
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let core = state.core()?;
    let chosen = choose(
        &core.context(&state.cfg),
        &req.model,
        req.sampling.adaptation.as_ref(),
    )?;
    let msgs = messages(&req.messages)?;
    let top = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (_, Some(k)) if !(0..=20).contains(&k) => {
            return Err(ApiError::invalid(
                format!("top_logprobs must be between 0 and 20, got {k}"),
                "top_logprobs",
            ))
        }
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs needs logprobs to be true",
                "top_logprobs",
            ))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, _) => None,
    };
    // Pass 1 classifies what the user asks now: the last user message.
    let route_text = msgs
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.content.clone())
        .unwrap_or_default();
    let request = Validated {
        kind: Kind::Chat,
        model: req.model,
        sampling: req.sampling,
        top,
        chosen,
        started,
        route_text,
    };
    run(state, request, move |e| e.encode_chat(&msgs)).await
}

/// Text completion (legacy), streaming or not.
#[utoipa::path(
    post,
    path = "/v1/completions",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "A completion, or server-sent `text_completion` events when stream is true", body = CompletionResponse),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody),
        (status = 503, description = "Loading or shutting down", body = ErrorBody),
    ),
    tag = "openai"
)]
pub async fn completions(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let core = state.core()?;
    let chosen = choose(
        &core.context(&state.cfg),
        &req.model,
        req.sampling.adaptation.as_ref(),
    )?;
    if req.echo.unwrap_or(false) {
        return Err(ApiError::invalid("echo is not supported", "echo"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix is not supported", "suffix"));
    }
    if req.best_of.is_some_and(|b| b > 1) {
        return Err(ApiError::invalid("best_of is not supported", "best_of"));
    }
    let text = match req.prompt.clone().into_vec() {
        v if v.len() == 1 => v.into_iter().next().expect("one"),
        v => {
            return Err(ApiError::invalid(
                format!(
                    "prompt must be one string (batches of {} prompts are not supported)",
                    v.len()
                ),
                "prompt",
            ))
        }
    };
    let top = match req.logprobs {
        Some(k) if !(0..=20).contains(&k) => {
            return Err(ApiError::invalid(
                format!("logprobs must be between 0 and 20, got {k}"),
                "logprobs",
            ))
        }
        k => k.map(|k| k as usize),
    };
    let request = Validated {
        kind: Kind::Text,
        model: req.model,
        sampling: req.sampling,
        top,
        chosen,
        started,
        route_text: text.clone(),
    };
    run(state, request, move |e| {
        Ok(e.loaded.tokenizer.encode(&text)?)
    })
    .await
}

/// What both handlers hand on once the body is validated.
struct Validated {
    kind: Kind,
    model: String,
    sampling: SamplingFields,
    top: Option<usize>,
    chosen: crate::adaptation::Chosen,
    started: Instant,
    /// What pass 1 classifies, when the request is routed.
    route_text: String,
}

/// Tokenizes off the async runtime, submits, and answers (streamed or whole).
async fn run(
    state: Arc<AppState>,
    r: Validated,
    encode: impl FnOnce(&t2_engine::Engine) -> t2_engine::engine::Result<Vec<u32>> + Send + 'static,
) -> ApiResult<Response> {
    let core = state.core()?;
    let engine = core.engine.clone();
    let prompt = tokio::task::spawn_blocking(move || encode(&engine))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let route = match (&r.chosen.routing, &core.router) {
        (Some(routing), Ok(router)) => {
            let (engine, router, routing, text) = (
                core.engine.clone(),
                router.clone(),
                routing.clone(),
                r.route_text,
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
    let mut prepared = prepare(&state, core, &r.sampling, prompt, r.top, r.chosen, route)?;
    let mut handles = submit(&state, core, &prepared)?;
    crate::generation::await_routing(&state, &mut prepared, &mut handles).await?;
    let stream = r.sampling.stream.unwrap_or(false);
    respond(state, prepared, handles, r.kind, r.model, stream, r.started).await
}

async fn respond(
    state: Arc<AppState>,
    prepared: Prepared,
    handles: Vec<SeqHandle>,
    kind: Kind,
    model: String,
    stream: bool,
    started: Instant,
) -> ApiResult<Response> {
    let header = HeaderValue::from_str(&prepared.chosen.header())
        .unwrap_or_else(|_| HeaderValue::from_static("custom"));
    let mut resp = if stream {
        stream_response(state, prepared, handles, kind, model, started).into_response()
    } else {
        whole_response(state, prepared, handles, kind, model, started)
            .await?
            .into_response()
    };
    resp.headers_mut()
        .insert(HeaderName::from_static("x-t2-mix"), header);
    Ok(resp)
}

async fn whole_response(
    state: Arc<AppState>,
    p: Prepared,
    handles: Vec<SeqHandle>,
    kind: Kind,
    model: String,
    started: Instant,
) -> ApiResult<Response> {
    let n = handles.len();
    let mut events = merged_events(handles);
    let mut t = Tracker::new(state.clone(), started, n, p.prompt_tokens, &p.chosen.label);
    let until = deadline(&state);
    while !t.all_finished() {
        match tokio::time::timeout_at(until, events.next()).await {
            Ok(Some((i, ev))) => {
                if let Err(e) = t.apply(i, ev) {
                    t.failed();
                    return Err(e);
                }
            }
            Ok(None) => {
                t.failed();
                return Err(ApiError::Internal("the engine stopped mid-request".into()));
            }
            Err(_) => {
                t.timed_out();
                return Err(ApiError::Timeout(timeout_secs(state.cfg.request_timeout)));
            }
        }
    }
    t.finish();
    let core = state.core_if_loaded().expect("loaded");
    let usage = t.usage();
    let id_created = (now_secs(), p.chosen.info.clone());
    Ok(match kind {
        Kind::Chat => Json(ChatCompletionResponse {
            id: new_id("chatcmpl"),
            object: "chat.completion",
            created: id_created.0,
            model,
            choices: t
                .choices
                .iter()
                .enumerate()
                .map(|(i, c)| ChatChoice {
                    index: i,
                    message: ResponseMessage {
                        role: "assistant",
                        content: c.text.clone(),
                    },
                    logprobs: p.want_logprobs.then(|| ChatLogprobs {
                        content: chat_logprobs(core, &c.logprobs),
                    }),
                    finish_reason: c.finish.expect("finished").as_str(),
                })
                .collect(),
            usage,
            system_fingerprint: FINGERPRINT.into(),
            adaptation: id_created.1,
        })
        .into_response(),
        Kind::Text => Json(CompletionResponse {
            id: new_id("cmpl"),
            object: "text_completion",
            created: id_created.0,
            model,
            choices: t
                .choices
                .iter()
                .enumerate()
                .map(|(i, c)| CompletionChoice {
                    index: i,
                    text: c.text.clone(),
                    logprobs: p.want_logprobs.then(|| text_logprobs(core, &c.logprobs, 0)),
                    finish_reason: c.finish.map(|f| f.as_str()),
                })
                .collect(),
            usage: Some(Some(usage)),
            system_fingerprint: FINGERPRINT.into(),
            adaptation: id_created.1,
        })
        .into_response(),
    })
}

fn text_logprobs(core: &Core, lps: &[t2_model::TokenLogprob], offset: usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut at = offset;
    for lp in lps {
        let (tok, bytes) = token_text(core, lp.token);
        out.text_offset.push(at);
        at += bytes.len();
        out.tokens.push(tok);
        out.token_logprobs.push(lp.logprob);
        out.top_logprobs.push(
            lp.top
                .iter()
                .map(|&(id, l)| (token_text(core, id).0, l))
                .collect(),
        );
    }
    out
}

/// Builds the SSE chunks of one request.
struct Chunker {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    include_usage: bool,
    want_logprobs: bool,
    info: AdaptationInfo,
    /// Per choice: bytes of text sent so far (text completions' logprob offsets).
    sent: Vec<usize>,
}

impl Chunker {
    fn event<T: serde::Serialize>(v: &T) -> Event {
        Event::default().data(serde_json::to_string(v).expect("chunks serialize"))
    }

    fn usage_field(&self, usage: Option<Usage>) -> Option<Option<Usage>> {
        self.include_usage.then_some(usage)
    }

    fn chat(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> Event {
        Self::event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: self.usage_field(usage),
            system_fingerprint: FINGERPRINT.into(),
            adaptation: self.info.clone(),
        })
    }

    fn text(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> Event {
        Self::event(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: self.usage_field(usage),
            system_fingerprint: FINGERPRINT.into(),
            adaptation: self.info.clone(),
        })
    }

    /// The first chunk of every chat choice carries the role.
    fn opening(&self, n: usize) -> Vec<Event> {
        if self.kind != Kind::Chat {
            return Vec::new();
        }
        (0..n)
            .map(|i| {
                self.chat(
                    vec![ChatChunkChoice {
                        index: i,
                        delta: Delta {
                            role: Some("assistant"),
                            content: Some(String::new()),
                        },
                        logprobs: None,
                        finish_reason: None,
                    }],
                    None,
                )
            })
            .collect()
    }

    /// Chunks for one token event: its text (if any) and, when it ends the choice, the finish.
    fn token(&mut self, core: &Core, i: usize, ev: &t2_engine::TokenEvent) -> Vec<Event> {
        let mut out = Vec::new();
        let lp = ev
            .logprob
            .as_ref()
            .filter(|_| self.want_logprobs && ev.counted)
            .cloned();
        if !ev.text.is_empty() || lp.is_some() {
            out.push(match self.kind {
                Kind::Chat => self.chat(
                    vec![ChatChunkChoice {
                        index: i,
                        delta: Delta {
                            role: None,
                            content: Some(ev.text.clone()),
                        },
                        logprobs: lp.map(|l| ChatLogprobs {
                            content: chat_logprobs(core, std::slice::from_ref(&l)),
                        }),
                        finish_reason: None,
                    }],
                    None,
                ),
                Kind::Text => self.text(
                    vec![CompletionChoice {
                        index: i,
                        text: ev.text.clone(),
                        logprobs: lp
                            .map(|l| text_logprobs(core, std::slice::from_ref(&l), self.sent[i])),
                        finish_reason: None,
                    }],
                    None,
                ),
            });
            self.sent[i] += ev.text.len();
        }
        if let Some(f) = ev.finish {
            out.push(match self.kind {
                Kind::Chat => self.chat(
                    vec![ChatChunkChoice {
                        index: i,
                        delta: Delta::default(),
                        logprobs: None,
                        finish_reason: Some(f.as_str()),
                    }],
                    None,
                ),
                Kind::Text => self.text(
                    vec![CompletionChoice {
                        index: i,
                        text: String::new(),
                        logprobs: None,
                        finish_reason: Some(f.as_str()),
                    }],
                    None,
                ),
            });
        }
        out
    }

    fn closing(&self, usage: Usage) -> Vec<Event> {
        let mut out = Vec::new();
        if self.include_usage {
            out.push(match self.kind {
                Kind::Chat => self.chat(Vec::new(), Some(usage)),
                Kind::Text => self.text(Vec::new(), Some(usage)),
            });
        }
        out.push(Event::default().data("[DONE]"));
        out
    }
}

fn stream_response(
    state: Arc<AppState>,
    p: Prepared,
    handles: Vec<SeqHandle>,
    kind: Kind,
    model: String,
    started: Instant,
) -> impl IntoResponse {
    let n = handles.len();
    let mut chunker = Chunker {
        id: new_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: now_secs(),
        model,
        kind,
        include_usage: p.include_usage,
        want_logprobs: p.want_logprobs,
        info: p.chosen.info.clone(),
        sent: vec![0; n],
    };
    // Bounded: a slow reader makes this task wait, never the model thread (its channels hold whole answers).
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let mut events = merged_events(handles);
        let mut t = Tracker::new(state.clone(), started, n, p.prompt_tokens, &p.chosen.label);
        let core = state.core_if_loaded().expect("loaded");
        let until = deadline(&state);
        let send_all = |tx: &tokio::sync::mpsc::Sender<Event>, evs: Vec<Event>| {
            let tx = tx.clone();
            async move {
                for e in evs {
                    if tx.send(e).await.is_err() {
                        return false;
                    }
                }
                true
            }
        };
        if !send_all(&tx, chunker.opening(n)).await {
            return;
        }
        while !t.all_finished() {
            let next = tokio::select! {
                _ = tx.closed() => return, // client gone: dropping `events` cancels the sequences
                r = tokio::time::timeout_at(until, events.next()) => r,
            };
            let error = match next {
                Ok(Some((i, ev))) => match t.apply(i, ev) {
                    Ok(Some(tok)) => {
                        if !send_all(&tx, chunker.token(core, i, &tok)).await {
                            return;
                        }
                        continue;
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        t.failed();
                        e
                    }
                },
                Ok(None) => {
                    t.failed();
                    ApiError::Internal("the engine stopped mid-request".into())
                }
                Err(_) => {
                    t.timed_out();
                    ApiError::Timeout(timeout_secs(state.cfg.request_timeout))
                }
            };
            let _ = tx.send(Chunker::event(&error.body())).await;
            return;
        }
        t.finish();
        send_all(&tx, chunker.closing(t.usage())).await;
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(body)
}
