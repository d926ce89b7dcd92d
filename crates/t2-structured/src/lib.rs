//! Structured output for t2: answers held to a grammar token by token.
//!
//! * [`Vocabulary`]: the model's tokens as llguidance sees them (bytes per token, special tokens marked),
//!   and the grammar compiler built on them; made once per model.
//! * [`ResponseFormat`]: OpenAI's `response_format` (`json_object`, `json_schema`) as a grammar.
//! * [`tools`]: function tools, `tool_choice`, the tool-call syntaxes of the model families t2 serves
//!   (Hermes/Qwen `<tool_call>`, Llama-3.1 JSON, Mistral `[TOOL_CALLS]`), the grammars that hold a call's
//!   arguments to its schema, and the parsers that turn an answer back into calls.
//! * [`GrammarConstraint`]: a compiled grammar as t2-model's [`t2_model::TokenConstraint`], active from
//!   the first token or only once the model starts a tool call.

mod constraint;
mod format;
pub mod tools;
mod vocab;

pub use constraint::{GrammarConstraint, MaskObserver, Trigger};
pub use format::ResponseFormat;
pub use vocab::{Grammar, Vocabulary};

/// Why a response format, a tool list or a grammar was refused.
#[derive(Debug, thiserror::Error)]
pub enum StructuredError {
    /// The client's request is wrong (an invalid schema, a tool without a name); the message says where.
    #[error("{0}")]
    Invalid(String),
    /// The grammar compiler failed on something the client sent.
    #[error("{0}")]
    Grammar(String),
}

pub type Result<T> = std::result::Result<T, StructuredError>;

#[cfg(test)]
mod tests;
