//! The OpenAI wire format (chat completions, completions, models) plus t2's `adaptation` extension.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A chat message's content: a string, or an array of parts of which only text parts are supported.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct RequestMessage {
    /// system, developer (treated as system), user or assistant
    pub role: String,
    pub content: Option<MessageContent>,
    #[serde(default)]
    pub name: Option<String>,
}

/// One string or a list of strings (`stop`, `prompt`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// t2's extension: how to adapt the model for this request (sent by SDKs through `extra_body`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaptationRequest {
    /// none | expert | mix | profile | prompt | classifier | auto (inferred from the other fields when
    /// absent). prompt and classifier run pass 1 (the base model or the classifier expert scores the
    /// request's category); auto is the server's routing default.
    pub strategy: Option<String>,
    /// Routing only: "hard" (the top label's expert) or "soft" (α = label probabilities).
    pub policy: Option<String>,
    /// Routing only: below this top-label probability the base model answers (0 to 1).
    pub threshold: Option<f32>,
    /// One expert by name.
    pub expert: Option<String>,
    /// Weights over experts, e.g. {"math": 0.7, "code": 0.3}.
    pub mix: Option<BTreeMap<String, f32>>,
    /// A stored mix (profile) by name.
    pub profile: Option<String>,
}

/// Fields shared by chat and text completions.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct SamplingFields {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Extension: keep only the k most likely tokens.
    pub top_k: Option<i64>,
    pub n: Option<i64>,
    pub stop: Option<StringOrList>,
    pub seed: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Accepted and logged, not used.
    pub user: Option<String>,
    /// Extension: generate exactly max_tokens tokens, ignoring end-of-sequence.
    pub ignore_eos: Option<bool>,
    pub adaptation: Option<AdaptationRequest>,
    /// Not supported: refused with a clear error when present.
    pub logit_bias: Option<serde_json::Value>,
    pub tools: Option<serde_json::Value>,
    pub functions: Option<serde_json::Value>,
    pub response_format: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<RequestMessage>,
    /// Return log-probabilities of the chosen tokens.
    pub logprobs: Option<bool>,
    /// 0-20 alternatives per position (needs logprobs).
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: StringOrList,
    /// 0-20 alternatives per position.
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// What adaptation a response was generated with.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdaptationInfo {
    /// none | expert | mix | profile | prompt | classifier
    pub strategy: String,
    /// The label pass 1 chose, when a router decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// hard | soft, when a router decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The final mix α over experts (empty: the base model).
    pub mix: BTreeMap<String, f32>,
    /// The stored mix used, when the request named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Pass-1 label scores, when a router decided.
    pub scores: Option<BTreeMap<String, f32>>,
    /// Pass-1 time in milliseconds, when a router decided.
    pub pass1_ms: Option<f64>,
    /// Why the requested strategy was not applied as asked, if it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenLogprobEntry {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprobEntry>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ResponseMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionResponse {
    pub id: String,
    /// always "chat.completion"
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    pub system_fingerprint: String,
    pub adaptation: AdaptationInfo,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// always "chat.completion.chunk"
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Present (null until the last chunk) when stream_options.include_usage is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    pub system_fingerprint: String,
    pub adaptation: AdaptationInfo,
}

/// Legacy completions' logprobs.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    /// always "text_completion"
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    pub system_fingerprint: String,
    pub adaptation: AdaptationInfo,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    /// always "model"
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// The base model an adapted card runs on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// Extension: what this card adapts with (none, auto, expert, profile).
    pub adaptation: String,
    pub max_model_len: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ExpertCard {
    pub name: String,
    pub description: String,
    pub category: String,
    pub targets: String,
    /// The model id that selects it.
    pub model: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MixCard {
    pub name: String,
    pub alpha: BTreeMap<String, f32>,
    pub description: String,
    pub model: String,
    /// How the mix was made (few-shot search settings and score), when recorded.
    pub provenance: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ExpertList {
    pub object: &'static str,
    pub data: Vec<ExpertCard>,
    pub mixes: Vec<MixCard>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Status {
    /// ok | ready | loading | shutting_down
    pub status: &'static str,
}
