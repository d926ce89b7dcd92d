//! Rendering answers in OpenAI's shapes: whole JSON responses, and the pieces chunks share (ids,
//! log-probabilities of tokens as text and bytes).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng;
use t2_engine::FinishReason;
use t2_model::TokenLogprob;
use t2_structured::tools::{ParsedCall, ToolFormat};

use crate::error::ApiResult;
use crate::infer::{Generation, InferEvent};
use crate::openai::*;
use crate::request::Kind;
use crate::state::Core;

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn new_id(prefix: &str) -> String {
    let r: u128 = rand::rng().random();
    format!("{prefix}-{:024x}", r & ((1u128 << 96) - 1))
}

pub const FINGERPRINT: &str = concat!("t2-", env!("CARGO_PKG_VERSION"));

/// The whole answer as one JSON response, once every choice has finished.
pub async fn whole(
    core: &Core,
    mut g: Generation,
    kind: Kind,
    model: String,
) -> ApiResult<Response> {
    loop {
        match g.next().await {
            InferEvent::Token { .. } => {}
            InferEvent::Done => break,
            InferEvent::Error(e) => return Err(e),
        }
    }
    let p = &g;
    let usage = g.usage();
    let id_created = (now_secs(), g.chosen.info.clone());
    Ok(match kind {
        Kind::Chat => Json(ChatCompletionResponse {
            id: new_id("chatcmpl"),
            object: "chat.completion",
            created: id_created.0,
            model,
            choices: g
                .choices()
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (message, calls) = chat_message(&c.text, p.tool_format);
                    ChatChoice {
                        index: i,
                        message,
                        logprobs: p.want_logprobs.then(|| ChatLogprobs {
                            content: chat_logprobs(core, &c.logprobs),
                        }),
                        finish_reason: finish_reason(c.finish.expect("finished"), calls),
                    }
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
            choices: g
                .choices()
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

/// A chat answer as a message: its text, or where tools were offered, the text around the calls and the
/// calls parsed out of it. Also returns how many calls it holds.
fn chat_message(text: &str, tools: Option<ToolFormat>) -> (ResponseMessage, usize) {
    let Some(format) = tools else {
        return (
            ResponseMessage {
                role: "assistant",
                content: Some(text.to_string()),
                tool_calls: None,
            },
            0,
        );
    };
    let (content, calls) = format.parse(text);
    let n = calls.len();
    let message = ResponseMessage {
        role: "assistant",
        // OpenAI's shape: no text around the calls is null, not "".
        content: (n == 0 || !content.trim().is_empty()).then_some(content),
        tool_calls: (n > 0).then(|| calls.into_iter().map(tool_call).collect()),
    };
    (message, n)
}

pub fn tool_call(c: ParsedCall) -> ToolCall {
    ToolCall {
        id: new_id("call").replacen('-', "_", 1),
        kind: "function".into(),
        function: FunctionCall {
            name: c.name,
            arguments: c.arguments,
        },
    }
}

/// An answer that ended by itself after making calls finishes with "tool_calls".
pub fn finish_reason(f: FinishReason, calls: usize) -> &'static str {
    if calls > 0 && f == FinishReason::Stop {
        "tool_calls"
    } else {
        f.as_str()
    }
}

pub fn text_logprobs(core: &Core, lps: &[TokenLogprob], offset: usize) -> CompletionLogprobs {
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
