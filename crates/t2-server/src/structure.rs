//! Holding answers to a shape: the prompt a request with tools reads, and one grammar constraint per
//! choice (`response_format`, or the tools' call grammar). Runs on the blocking pool: compiling a grammar
//! can take milliseconds.

use std::sync::Arc;

use t2_model::{ChatMessage, ConstraintCell};
use t2_structured::tools::{fallback_messages, ToolChoice, ToolFormat};
use t2_structured::{GrammarConstraint, MaskObserver};

use crate::error::{ApiError, ApiResult};
use crate::request::{Structure, ToolUse};
use crate::state::{AppState, Core};

/// The call syntax of the served model (its template's, else the fallback's).
pub fn tool_format(core: &Core) -> ToolFormat {
    let template = &core.engine.loaded.template;
    if template.supports_tools() {
        ToolFormat::for_template(template.source())
    } else {
        ToolFormat::Hermes
    }
}

/// The chat prompt, tokenized: with tools, through the template's tools section when it has one, else
/// with t2's fallback description of the tools (README: *Tool calls*).
pub fn encode_chat(
    core: &Core,
    msgs: &[ChatMessage],
    tools: Option<&ToolUse>,
) -> ApiResult<Vec<u32>> {
    let loaded = &core.engine.loaded;
    let text = match tools {
        Some(t) if t.choice != ToolChoice::None && loaded.template.supports_tools() => {
            loaded.template.render_with_tools(msgs, Some(&t.raw))?
        }
        Some(t) if !loaded.template.supports_tools() => loaded
            .template
            .render(&fallback_messages(msgs, &t.tools, &t.choice))?,
        _ => loaded.template.render(msgs)?,
    };
    Ok(loaded.tokenizer.encode(&text)?)
}

/// One constraint per choice, or none when the answer is free.
pub fn constraints(
    state: &AppState,
    core: &Core,
    structure: &Structure,
    n: usize,
) -> ApiResult<Option<Vec<ConstraintCell>>> {
    let (grammar, param) = match (&structure.format, &structure.tools) {
        (Some(f), _) => (f.grammar(), "response_format"),
        (None, Some(t)) if t.choice != ToolChoice::None => (None, "tools"),
        _ => return Ok(None),
    };
    let vocab = core.vocabulary().map_err(ApiError::Internal)?;
    let tools = structure
        .tools
        .as_ref()
        .filter(|t| t.choice != ToolChoice::None);
    let format = tool_format(core);
    let grammar = match (grammar, tools) {
        (Some(g), _) => g,
        (None, Some(t)) => format
            .grammar(&t.tools, &t.choice, t.single, &vocab)
            .ok_or_else(|| ApiError::Internal("no grammar for the tools".into()))?,
        (None, None) => return Ok(None),
    };
    let compiled = vocab
        .compile(grammar)
        .map_err(|e| ApiError::invalid(format!("cannot use this {param}: {e}"), param))?;
    let mask_latency = state.metrics.mask_latency.clone();
    let observer: MaskObserver = Arc::new(move |d| mask_latency.observe(d.as_secs_f64()));
    // `auto` leaves the answer free until the model starts a call.
    let triggers = match tools {
        Some(t) if t.choice == ToolChoice::Auto => format.triggers(&vocab),
        _ => Vec::new(),
    };
    Ok(Some(
        (0..n)
            .map(|_| {
                let c = GrammarConstraint::triggered(
                    compiled.fresh(),
                    vocab.clone(),
                    triggers.clone(),
                    Some(observer.clone()),
                );
                ConstraintCell::new(Box::new(c))
            })
            .collect(),
    ))
}
