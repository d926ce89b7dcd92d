//! `POST /v1/chat/completions` and `POST /v1/completions`: thin handlers. Each parses and validates its
//! body ([`crate::request`]), hands it to the generation facade ([`crate::infer`]) and renders what comes
//! back, whole ([`crate::render`]) or streamed ([`crate::stream`]).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};

use crate::error::{ApiResult, ErrorBody};
use crate::openai::*;
use crate::request::{ApiJson, GenerationRequest};
use crate::state::AppState;

/// Chat completion (streaming or not), with t2's per-request adaptation.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "A completion, or server-sent `chat.completion.chunk` events when stream is true", content(
            (ChatCompletionResponse = "application/json"),
            (String = "text/event-stream"),
        )),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Queue full (see Retry-After)", body = ErrorBody),
        (status = 503, description = "Loading or shutting down", body = ErrorBody),
        (status = 504, description = "Over --request-timeout-s", body = ErrorBody),
    ),
    tag = "openai"
)]
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> ApiResult<Response> {
    let valid = crate::request::chat(&state, state.core()?, req)?;
    respond(state, valid).await
}

/// Text completion (legacy), streaming or not.
#[utoipa::path(
    post,
    path = "/v1/completions",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "A completion, or server-sent `text_completion` events when stream is true", content(
            (CompletionResponse = "application/json"),
            (String = "text/event-stream"),
        )),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody),
        (status = 503, description = "Loading or shutting down", body = ErrorBody),
        (status = 504, description = "Over --request-timeout-s", body = ErrorBody),
    ),
    tag = "openai"
)]
pub async fn completions(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> ApiResult<Response> {
    let valid = crate::request::text(&state, state.core()?, req)?;
    respond(state, valid).await
}

async fn respond(state: Arc<AppState>, req: GenerationRequest) -> ApiResult<Response> {
    let (kind, model, stream) = (req.kind, req.model.clone(), req.stream);
    let g = crate::infer::generate(&state, req).await?;
    let header = HeaderValue::from_str(&g.chosen.header())
        .unwrap_or_else(|_| HeaderValue::from_static("custom"));
    let mut resp = if stream {
        crate::stream::sse(state.clone(), g, kind, model).into_response()
    } else {
        crate::render::whole(state.core()?, g, kind, model).await?
    };
    resp.headers_mut()
        .insert(HeaderName::from_static("x-t2-mix"), header);
    Ok(resp)
}
