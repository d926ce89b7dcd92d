//! From an HTTP body to a validated [`GenerationRequest`]: the JSON extractor, and every check the
//! completion routes make, in one place. Each error names its parameter; the prompt checks that need the
//! tokens ([`check_prompt`]) run once the facade has tokenized.

use std::time::Instant;

use axum::extract::{FromRequest, Request};
use serde_json::Value;
use t2_model::{ChatMessage, SamplingParams};
use t2_structured::tools::{parse_tool_choice, parse_tools, Tool, ToolChoice};
use t2_structured::ResponseFormat;

use crate::error::{ApiError, ApiResult};
use crate::mix_choice::{choose, Chosen};
use crate::openai::{
    ChatCompletionRequest, CompletionRequest, MessageContent, RequestMessage, SamplingFields,
};
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

/// Which route a request came in on: it decides the prompt's form and the response's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

/// What the model reads, before tokenization.
#[derive(Debug, Clone)]
pub enum Input {
    /// Rendered through the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Tokenized as is.
    Text(String),
}

/// A completion request that passed every check that does not need the tokens.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub kind: Kind,
    /// The model id as the client wrote it (echoed in responses).
    pub model: String,
    pub input: Input,
    /// What pass 1 classifies, when the request is routed: the last user message, or the prompt.
    pub route_text: String,
    pub chosen: Chosen,
    /// Per choice i, these settings with seed + i.
    pub sampling: SamplingParams,
    pub n: usize,
    pub stop: Vec<String>,
    /// As asked (`max_completion_tokens`, else `max_tokens`); None: the server's default.
    pub max_tokens: Option<usize>,
    pub ignore_eos: bool,
    /// Log-probabilities wanted, with this many alternatives per position.
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// The shape the answer is held to, if any.
    pub structure: Structure,
    pub started: Instant,
}

/// What the answer must look like: a response format, or calls of the request's tools.
#[derive(Debug, Clone, Default)]
pub struct Structure {
    /// None: free text.
    pub format: Option<ResponseFormat>,
    pub tools: Option<ToolUse>,
}

/// The request's tools and how the model may use them.
#[derive(Debug, Clone)]
pub struct ToolUse {
    pub tools: Vec<Tool>,
    /// The `tools` list as sent (a template with a tools section reads it as is).
    pub raw: Vec<Value>,
    pub choice: ToolChoice,
    /// `parallel_tool_calls: false`: one call at most.
    pub single: bool,
}

/// Validates a chat completion request.
pub fn chat(
    state: &AppState,
    core: &Core,
    req: ChatCompletionRequest,
) -> ApiResult<GenerationRequest> {
    let started = Instant::now();
    let chosen = choose_for(state, core, &req.model, &req.sampling)?;
    let msgs = messages(&req.messages)?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
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
    generation(
        state,
        Kind::Chat,
        req.model,
        Input::Chat(msgs),
        route_text,
        chosen,
        &req.sampling,
        logprobs,
        started,
    )
}

/// Validates a (legacy) text completion request.
pub fn text(state: &AppState, core: &Core, req: CompletionRequest) -> ApiResult<GenerationRequest> {
    let started = Instant::now();
    let chosen = choose_for(state, core, &req.model, &req.sampling)?;
    if req.echo.unwrap_or(false) {
        return Err(ApiError::invalid("echo is not supported", "echo"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix is not supported", "suffix"));
    }
    if req.best_of.is_some_and(|b| b > 1) {
        return Err(ApiError::invalid("best_of is not supported", "best_of"));
    }
    let prompt = match req.prompt.into_vec() {
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
    let logprobs = match req.logprobs {
        Some(k) if !(0..=20).contains(&k) => {
            return Err(ApiError::invalid(
                format!("logprobs must be between 0 and 20, got {k}"),
                "logprobs",
            ))
        }
        k => k.map(|k| k as usize),
    };
    generation(
        state,
        Kind::Text,
        req.model,
        Input::Text(prompt.clone()),
        prompt,
        chosen,
        &req.sampling,
        logprobs,
        started,
    )
}

/// The adaptation a request asks for, by its `model` and `adaptation` fields.
fn choose_for(state: &AppState, core: &Core, model: &str, f: &SamplingFields) -> ApiResult<Chosen> {
    choose(&core.context(&state.cfg), model, f.adaptation.as_ref())
}

#[allow(clippy::too_many_arguments)]
fn generation(
    state: &AppState,
    kind: Kind,
    model: String,
    input: Input,
    route_text: String,
    chosen: Chosen,
    f: &SamplingFields,
    logprobs: Option<usize>,
    started: Instant,
) -> ApiResult<GenerationRequest> {
    let structure = structure(f, kind)?;
    let vocab = state.core()?.engine.loaded.model.cfg.vocab_size;
    let (mut sampling, n, stop) = sampling(f, state.cfg.max_n, vocab)?;
    sampling.logprobs = logprobs;
    let max_tokens = match f.max_completion_tokens.or(f.max_tokens) {
        Some(m) if m < 1 => {
            return Err(ApiError::invalid(
                format!("max_tokens must be at least 1, got {m}"),
                "max_tokens",
            ))
        }
        m => m.map(|m| m as usize),
    };
    Ok(GenerationRequest {
        kind,
        model,
        input,
        route_text,
        chosen,
        sampling,
        n,
        stop,
        max_tokens,
        ignore_eos: f.ignore_eos.unwrap_or(false),
        logprobs,
        stream: f.stream.unwrap_or(false),
        include_usage: f
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage == Some(true)),
        structure,
        started,
    })
}

/// `response_format`, `tools`, `tool_choice` and `parallel_tool_calls`, checked together.
fn structure(f: &SamplingFields, kind: Kind) -> ApiResult<Structure> {
    let format = match &f.response_format {
        None | Some(Value::Null) => None,
        Some(v) => match ResponseFormat::from_request(v) {
            Ok(ResponseFormat::Text) => None,
            Ok(fmt) => Some(fmt),
            Err(e) => return Err(ApiError::invalid(e.to_string(), "response_format")),
        },
    };
    let listed = f.tools.as_deref().unwrap_or_default();
    if kind == Kind::Text && (!listed.is_empty() || f.tool_choice.is_some()) {
        return Err(ApiError::invalid(
            "tools are only supported on /v1/chat/completions",
            "tools",
        ));
    }
    let tools = parse_tools(listed).map_err(|e| ApiError::invalid(e.to_string(), "tools"))?;
    let choice = parse_tool_choice(f.tool_choice.as_ref(), &tools)
        .map_err(|e| ApiError::invalid(e.to_string(), "tool_choice"))?;
    if format.is_some() && choice != ToolChoice::None {
        return Err(ApiError::invalid(
            "response_format and tools cannot both shape one answer (set tool_choice to \"none\" or drop \
             response_format)",
            "response_format",
        ));
    }
    let tools = (!tools.is_empty()).then(|| ToolUse {
        tools,
        raw: listed.to_vec(),
        choice,
        single: f.parallel_tool_calls == Some(false),
    });
    Ok(Structure { format, tools })
}

/// The answer's token limit once the prompt's length is known: the prompt must leave room in the context.
pub fn check_prompt(
    prompt_tokens: usize,
    asked: Option<usize>,
    ctx: usize,
    default_max_tokens: usize,
) -> ApiResult<usize> {
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
    let max_tokens = asked.unwrap_or(default_max_tokens.min(ctx - prompt_tokens));
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
    Ok(max_tokens)
}

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
                "tool" => "tool",
                other => {
                    return Err(ApiError::invalid(
                        format!(
                            "messages[{i}].role '{other}' is not supported (system, developer, user, assistant, tool)"
                        ),
                        "messages",
                    ))
                }
            };
            if m.tool_calls.as_ref().is_some_and(|c| !c.is_empty()) && role != "assistant" {
                return Err(ApiError::invalid(
                    format!("messages[{i}]: only assistant messages carry tool_calls"),
                    "messages",
                ));
            }
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
            let mut msg = ChatMessage::new(role, &content);
            msg.tool_calls = m
                .tool_calls
                .as_ref()
                .filter(|c| !c.is_empty())
                .map(|calls| calls.iter().map(template_call).collect());
            msg.tool_call_id = m.tool_call_id.clone();
            msg.name = m.name.clone();
            Ok(msg)
        })
        .collect()
}

/// A call from the history in the shape chat templates read: arguments as an object when they are JSON.
fn template_call(c: &crate::openai::ToolCall) -> Value {
    let args = serde_json::from_str::<Value>(&c.function.arguments)
        .unwrap_or_else(|_| Value::String(c.function.arguments.clone()));
    serde_json::json!({
        "id": c.id,
        "type": "function",
        "function": {"name": c.function.name, "arguments": args},
    })
}

/// Sampling settings checked the way OpenAI documents them; each error names its parameter.
/// `logit_bias`: token ids (as strings) below the vocabulary's size, each with a bias in [-100, 100].
fn logit_bias(f: &SamplingFields, vocab: usize) -> ApiResult<Vec<(u32, f32)>> {
    let Some(map) = &f.logit_bias else {
        return Ok(Vec::new());
    };
    let bad = |m: String| ApiError::invalid(m, "logit_bias");
    map.iter()
        .map(|(k, v)| {
            let id: u32 = k
                .parse()
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .ok_or_else(|| {
                    bad(format!(
                        "logit_bias keys are token ids below {vocab}, got '{k}'"
                    ))
                })?;
            let b = v
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    bad(format!(
                        "logit_bias[{k}] must be a number in [-100, 100], got {v}"
                    ))
                })?;
            Ok((id, b as f32))
        })
        .collect()
}

fn sampling(
    f: &SamplingFields,
    max_n: usize,
    vocab: usize,
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
    // Absent, null or empty is fine (SDKs send these); their types are checked by serde.
    let unsupported = [(
        "functions",
        f.functions.as_ref().is_some_and(|v| !v.is_empty()),
    )];
    if let Some((name, _)) = unsupported.iter().find(|(_, bad)| *bad) {
        return Err(ApiError::invalid(
            format!("{name} is not supported by this server"),
            name,
        ));
    }
    let params = SamplingParams {
        temperature: temperature as f32,
        top_k,
        // Below f32's smallest positive value it keeps the single most likely token, as any tiny top_p does.
        top_p: (top_p as f32).max(f32::MIN_POSITIVE),
        seed: f.seed.map(|s| s as u64),
        logprobs: None,
        presence_penalty: f.presence_penalty.unwrap_or(0.0) as f32,
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0) as f32,
        logit_bias: logit_bias(f, vocab)?,
        constraint: None,
    };
    Ok((params, n as usize, stop))
}
