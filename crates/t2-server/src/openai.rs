//! The OpenAI wire format (chat completions, completions, models) plus t2's `adaptation` extension.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

// The request types below carry in their schemas (field attributes, and the schema-only types at the end
// of this section) every single-field rule that `request.rs`, `mix_choice.rs` and `fewshot_jobs.rs`
// enforce, so that the OpenAPI document says what the server accepts. Rules that tie two fields (top_logprobs
// needs logprobs; prompt + max_tokens within the context) or depend on the server's state (which experts
// exist) are in the descriptions.

/// A chat message's content: a string, or an array of parts of which only text parts are supported.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    /// Only "text" parts are supported.
    #[serde(rename = "type")]
    #[schema(rename = "type", value_type = ContentPartKind)]
    pub kind: String,
    /// The part's text (required for text parts).
    #[serde(default)]
    #[schema(value_type = String, required = true)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct RequestMessage {
    /// system, developer (treated as system), user, assistant or tool
    #[schema(value_type = MessageRole)]
    pub role: String,
    pub content: Option<MessageContent>,
    #[serde(default)]
    pub name: Option<String>,
    /// An assistant turn's calls (as a response returned them).
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A tool turn: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
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
    #[schema(value_type = Option<AdaptationStrategy>)]
    pub strategy: Option<String>,
    /// Routing only: "hard" (the top label's expert) or "soft" (α = label probabilities).
    #[schema(value_type = Option<RoutePolicyName>)]
    pub policy: Option<String>,
    /// Routing only: below this top-label probability the base model answers (0 to 1).
    #[schema(minimum = 0, maximum = 1)]
    pub threshold: Option<f64>,
    /// One expert by name.
    pub expert: Option<String>,
    /// Weights over experts, e.g. {"math": 0.7, "code": 0.3} ("base": the unadapted model's share).
    #[schema(value_type = Option<MixWeights>)]
    pub mix: Option<BTreeMap<String, f32>>,
    /// A stored mix (profile) by name.
    pub profile: Option<String>,
}

/// Fields shared by chat and text completions.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct SamplingFields {
    /// Tokens to generate at most; the prompt plus this must fit the model's context.
    #[schema(minimum = 1, maximum = 9007199254740991_i64)]
    #[serde(default, deserialize_with = "crate::openai::safe_int::opt")]
    pub max_tokens: Option<i64>,
    /// Takes precedence over max_tokens.
    #[schema(minimum = 1, maximum = 9007199254740991_i64)]
    #[serde(default, deserialize_with = "crate::openai::safe_int::opt")]
    pub max_completion_tokens: Option<i64>,
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f64>,
    #[schema(exclusive_minimum = 0, maximum = 1)]
    /// Numbers are read as f64 and checked before they become f32: rounding must not move a value across
    /// a bound (5e-324 to 0, 2.0000000000000004 to 2).
    pub top_p: Option<f64>,
    /// Extension: keep only the k most likely tokens (0 or -1: all).
    #[schema(minimum = -1, maximum = 9007199254740991_i64)]
    #[serde(default, deserialize_with = "crate::openai::safe_int::opt")]
    pub top_k: Option<i64>,
    /// Choices to generate, 1 to the server's --max-n.
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "crate::openai::safe_int::opt")]
    pub n: Option<i64>,
    /// Up to 4 non-empty stop strings.
    #[schema(value_type = Option<StopStrings>)]
    pub stop: Option<StringOrList>,
    #[schema(minimum = -9007199254740991_i64, maximum = 9007199254740991_i64)]
    #[serde(default, deserialize_with = "crate::openai::safe_int::opt")]
    pub seed: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f64>,
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f64>,
    /// Accepted and logged, not used.
    pub user: Option<String>,
    /// Extension: generate exactly max_tokens tokens, ignoring end-of-sequence.
    pub ignore_eos: Option<bool>,
    pub adaptation: Option<AdaptationRequest>,
    /// Token id (as a string) → bias in [-100, 100] added to its logit before sampling (-100 bans it).
    #[schema(value_type = Option<LogitBias>)]
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    /// Functions the model may call (chat only): `{"type": "function", "function": {"name", "description",
    /// "parameters": JSON Schema}}`. Calls come back as `tool_calls` (finish_reason "tool_calls").
    #[schema(value_type = Option<Vec<ToolDefinition>>)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// none | auto (default with tools: the model decides; a call it starts is held to the schemas) |
    /// required (one or more calls) | {"type": "function", "function": {"name": …}} (exactly that call).
    #[schema(value_type = Option<ToolChoiceSchema>)]
    pub tool_choice: Option<serde_json::Value>,
    /// false: at most one call per answer.
    pub parallel_tool_calls: Option<bool>,
    /// Not supported: only null or an empty list is accepted.
    #[schema(value_type = Option<Vec<Object>>, max_items = 0)]
    pub functions: Option<Vec<serde_json::Value>>,
    /// {"type": "text"} | {"type": "json_object"} | {"type": "json_schema", "json_schema": {"name", "schema",
    /// "strict"}}: the answer is held to the format token by token.
    #[schema(value_type = Option<ResponseFormatSchema>)]
    pub response_format: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    pub model: String,
    #[schema(min_items = 1)]
    pub messages: Vec<RequestMessage>,
    /// Return log-probabilities of the chosen tokens.
    pub logprobs: Option<bool>,
    /// 0-20 alternatives per position (more than 0 needs logprobs: true).
    #[schema(minimum = 0, maximum = 20)]
    #[serde(default, deserialize_with = "crate::openai::safe_int::opt")]
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub model: String,
    /// One non-empty prompt (a string, or a list holding one string).
    #[schema(value_type = OnePrompt)]
    pub prompt: StringOrList,
    /// 0-20 alternatives per position.
    #[schema(minimum = 0, maximum = 20)]
    #[serde(default, deserialize_with = "crate::openai::safe_int::opt")]
    pub logprobs: Option<i64>,
    /// Not supported: only false.
    #[schema(value_type = Option<EchoOff>)]
    pub echo: Option<bool>,
    /// Not supported: only empty.
    #[schema(max_length = 0)]
    pub suffix: Option<String>,
    /// Only 1 (or less) is supported.
    #[schema(minimum = -9007199254740991_i64, maximum = 1)]
    #[serde(default, deserialize_with = "crate::openai::safe_int::opt")]
    pub best_of: Option<i64>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// Integer fields: any JSON number with an integral value within JSON's safe integers (|n| ≤ 2^53 - 1),
/// as JSON Schema's `integer` reads it (so 3.0 is 3), converted to the field's type.
pub mod safe_int {
    use serde::{de::Error, Deserialize, Deserializer};

    pub const MAX: i64 = (1 << 53) - 1;

    pub fn opt<'de, D: Deserializer<'de>, T: TryFrom<i64>>(d: D) -> Result<Option<T>, D::Error> {
        let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
            return Ok(None);
        };
        let v = match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Some(i),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() <= MAX as f64 => Some(f as i64),
            _ => None,
        }
        .filter(|v| v.abs() <= MAX)
        .ok_or_else(|| D::Error::custom(format!("{n} is not an integer within ±(2^53 - 1)")))?;
        T::try_from(v)
            .map(Some)
            .map_err(|_| D::Error::custom(format!("{n} is out of range")))
    }
}

// Schema-only types: what the string fields above accept, as the handlers check it.

/// The roles a message may have.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageRole {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

/// The content part kinds supported.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ContentPartKind {
    Text,
}

/// `adaptation.strategy`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AdaptationStrategy {
    None,
    Base,
    Expert,
    Mix,
    Profile,
    Prompt,
    Classifier,
    Auto,
}

/// `adaptation.policy`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RoutePolicyName {
    Hard,
    Soft,
}

/// Schemas that no derive can state (a string's length inside a list, a boolean that must be false, an
/// object that must be empty), written with utoipa's builders; each names the check it mirrors.
mod shapes {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
    use utoipa::openapi::RefOr;

    fn text(min_length: usize) -> ObjectBuilder {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(min_length))
    }

    macro_rules! shape {
        ($(#[$doc:meta])* $name:ident => $body:expr) => {
            $(#[$doc])*
            pub struct $name;
            impl utoipa::PartialSchema for $name {
                fn schema() -> RefOr<Schema> {
                    $body.into()
                }
            }
            impl utoipa::ToSchema for $name {}
        };
    }

    shape!(
        /// `stop` (request.rs `sampling`): one non-empty string, or up to 4 of them.
        StopStrings => OneOfBuilder::new()
            .item(text(1))
            .item(ArrayBuilder::new().items(text(1)).max_items(Some(4)))
    );
    shape!(
        /// A completion's `prompt` (request.rs `text`): one non-empty string, or a list holding one.
        OnePrompt => OneOfBuilder::new()
            .item(text(1))
            .item(ArrayBuilder::new().items(text(1)).min_items(Some(1)).max_items(Some(1)))
    );
    shape!(
        /// `echo` (request.rs `text`): only false.
        EchoOff => ObjectBuilder::new()
            .schema_type(Type::Boolean)
            .enum_values(Some([false]))
    );
    shape!(
        /// `logit_bias` (request.rs `logit_bias`): token ids as keys, biases in [-100, 100].
        LogitBias => ObjectBuilder::new()
            .schema_type(Type::Object)
            .property_names(Some(Schema::Object(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some("^[0-9]+$"))
                    .build(),
            )))
            .additional_properties(Some(
                ObjectBuilder::new()
                    .schema_type(Type::Number)
                    .minimum(Some(-100))
                    .maximum(Some(100)),
            ))
    );
    fn kind(value: &'static str) -> ObjectBuilder {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some([value]))
    }

    /// `^[a-zA-Z0-9_-]{1,64}$`: function and schema names (t2-structured checks it).
    fn name() -> ObjectBuilder {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[a-zA-Z0-9_-]{1,64}$"))
    }

    shape!(
        /// `response_format` (t2-structured `ResponseFormat::from_request`).
        ResponseFormatSchema => OneOfBuilder::new()
            .item(ObjectBuilder::new().property("type", kind("text")).required("type"))
            .item(ObjectBuilder::new().property("type", kind("json_object")).required("type"))
            .item(
                ObjectBuilder::new()
                    .property("type", kind("json_schema"))
                    .property(
                        "json_schema",
                        ObjectBuilder::new()
                            .property("name", name())
                            .property("description", ObjectBuilder::new().schema_type(Type::String))
                            .property("schema", ObjectBuilder::new().schema_type(Type::Object))
                            .property("strict", ObjectBuilder::new().schema_type(Type::Boolean))
                            .required("name"),
                    )
                    .required("type")
                    .required("json_schema"),
            )
    );
    shape!(
        /// A `tools` entry (t2-structured `parse_tools`).
        ToolDefinition => ObjectBuilder::new()
            .property("type", kind("function"))
            .property(
                "function",
                ObjectBuilder::new()
                    .property("name", name())
                    .property("description", ObjectBuilder::new().schema_type(Type::String))
                    .property("parameters", ObjectBuilder::new().schema_type(Type::Object))
                    .property("strict", ObjectBuilder::new().schema_type(Type::Boolean))
                    .required("name"),
            )
            .required("type")
            .required("function")
    );
    shape!(
        /// `tool_choice` (t2-structured `parse_tool_choice`).
        ToolChoiceSchema => OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["none", "auto", "required"])),
            )
            .item(
                ObjectBuilder::new()
                    .property("type", kind("function"))
                    .property("function", ObjectBuilder::new().property("name", name()).required("name"))
                    .required("type")
                    .required("function"),
            )
    );
    shape!(
        /// `POST /v1/experts`' body: an expert file's raw bytes (safetensors, format t2-expert-v1).
        ExpertFile => ObjectBuilder::new()
            .schema_type(Type::String)
            .content_media_type("application/octet-stream")
    );
    shape!(
        /// `adaptation.mix` (t2-svf `Mix::from_weights`): at least one weight, by non-empty name.
        MixWeights => ObjectBuilder::new()
            .schema_type(Type::Object)
            .property_names(Some(Schema::Object(text(1).build())))
            .additional_properties(Some(ObjectBuilder::new().schema_type(Type::Number)))
            .min_properties(Some(1))
    );
}
pub use shapes::*;

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
    /// null when the answer is only tool calls.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A call the model made (and, in a request's history, one it made before).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ToolCall {
    pub id: String,
    /// always "function"
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON text.
    pub arguments: String,
}

/// A call in a stream: the whole call in one delta (its `index` counts the calls of the choice).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
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
    /// SHA-256 of its z vectors: its identity (a re-upload under the same name has another).
    pub digest: String,
    pub state: ExpertState,
    /// Requests in flight that may run with it.
    pub requests: usize,
    /// Sequences running now with weights made from it (held mix-table slots).
    pub sequences: usize,
    /// Whether merged weights made from it are cached.
    pub merged: bool,
}

/// `loaded`: stored and servable, nothing uses it now; `in_use`: requests or sequences hold it (it
/// cannot be removed until they end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExpertState {
    Loaded,
    InUse,
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
