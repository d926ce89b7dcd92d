//! Function tools: the request's `tools` and `tool_choice`, the call syntax of the model's family, the
//! grammar a call is held to, and the parser that turns an answer back into calls (whole, or piece by
//! piece while it streams).
//!
//! | format | a call in the answer | families |
//! |---|---|---|
//! | [`ToolFormat::Hermes`] | `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, repeated | Qwen2/2.5/3, Hermes, and t2's fallback prompt for templates without tools |
//! | [`ToolFormat::Llama3Json`] | the whole answer is `{"name": …, "parameters": {…}}` (after `<\|python_tag\|>` if the model writes it) | Llama 3.1-3.3 |
//! | [`ToolFormat::Mistral`] | `[TOOL_CALLS] [{"name": …, "arguments": {…}}, …]` | Mistral v0.3 and later |

use llguidance::api::TopLevelGrammar;
use serde_json::{json, Value};
use t2_model::ChatMessage;

use crate::constraint::Trigger;
use crate::format::compact;
use crate::vocab::Vocabulary;
use crate::{Result, StructuredError};

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments object.
    pub parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// The model answers in text; calls are neither prompted for nor parsed.
    None,
    /// The model decides; once it starts a call, the call is held to the tools' schemas.
    Auto,
    /// One or more calls, nothing else.
    Required,
    /// Exactly one call of this function.
    Function(String),
}

/// A call the model made: the function's name and its arguments as JSON text (as OpenAI returns them).
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
}

/// Reads the request's `tools` list; errors name the tool and what is wrong.
pub fn parse_tools(list: &[Value]) -> Result<Vec<Tool>> {
    let mut tools: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let bad = |m: &str| StructuredError::Invalid(format!("tools[{i}]: {m}"));
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad("type must be \"function\""));
        }
        let f = t
            .get("function")
            .filter(|f| f.is_object())
            .ok_or_else(|| bad("function must be an object with a name"))?;
        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
        if !valid_name(name) {
            return Err(bad(&format!(
                "function.name must be 1-64 letters, digits, _ or -, got '{name}'"
            )));
        }
        if tools.iter().any(|t| t.name == name) {
            return Err(bad(&format!("function '{name}' is defined twice")));
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => return Err(bad("function.parameters must be a JSON Schema object")),
        };
        let description = match f.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(bad("function.description must be a string")),
        };
        tools.push(Tool {
            name: name.to_string(),
            description,
            parameters,
        });
    }
    Ok(tools)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Reads `tool_choice` (absent: `auto` when there are tools).
pub fn parse_tool_choice(v: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice> {
    let bad = |m: String| StructuredError::Invalid(format!("tool_choice: {m}"));
    let choice = match v {
        None | Some(Value::Null) => {
            if tools.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(format!(
                    "'{other}' is not one of none, auto, required or a function"
                )))
            }
        },
        Some(o @ Value::Object(_)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    bad(r#"must be {"type": "function", "function": {"name": ...}}"#.into())
                })?;
            ToolChoice::Function(name.to_string())
        }
        Some(_) => return Err(bad("must be a string or an object".into())),
    };
    match &choice {
        ToolChoice::Required | ToolChoice::Auto if tools.is_empty() => {
            Err(bad("needs a non-empty tools list".into()))
        }
        ToolChoice::Function(f) if !tools.iter().any(|t| &t.name == f) => {
            Err(bad(format!("function '{f}' is not among the tools")))
        }
        _ => Ok(choice),
    }
}

/// The call syntax a model family was trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Llama3Json,
    Mistral,
}

impl ToolFormat {
    /// The format a chat template writes calls in (its own text says which); Hermes for templates that
    /// show none, which is also what t2's fallback prompt asks for.
    pub fn for_template(source: &str) -> Self {
        if source.contains("[TOOL_CALLS]") {
            Self::Mistral
        } else if source.contains("<|python_tag|>") || source.contains("\"parameters\": ") {
            Self::Llama3Json
        } else {
            Self::Hermes
        }
    }

    /// The grammar of the calls `choice` allows, from their first byte (`single`: one call at most).
    /// `None` for `ToolChoice::None`.
    pub fn grammar(
        &self,
        tools: &[Tool],
        choice: &ToolChoice,
        single: bool,
        vocab: &Vocabulary,
    ) -> Option<TopLevelGrammar> {
        let allowed: Vec<&Tool> = match choice {
            ToolChoice::None => return None,
            ToolChoice::Function(f) => tools.iter().filter(|t| &t.name == f).collect(),
            ToolChoice::Auto | ToolChoice::Required => tools.iter().collect(),
        };
        let one_call = single || matches!(choice, ToolChoice::Function(_));
        let args_key = match self {
            Self::Llama3Json => "parameters",
            Self::Hermes | Self::Mistral => "arguments",
        };
        let call_schema = json!({"anyOf": allowed.iter().map(|t| json!({
            "type": "object",
            "properties": {"name": {"const": t.name}, args_key: t.parameters},
            "required": ["name", args_key],
            "additionalProperties": false,
        })).collect::<Vec<_>>()});
        let lark = match self {
            Self::Hermes => {
                let call = format!(
                    "call: {} \"\\n\" %json {} \"\\n\" {}",
                    literal(vocab, "<tool_call>"),
                    compact(call_schema),
                    literal(vocab, "</tool_call>"),
                );
                let start = if one_call {
                    "start: call"
                } else {
                    "start: call (\"\\n\" call)*"
                };
                format!("{start}\n{call}\n")
            }
            Self::Llama3Json => {
                let tag = vocab
                    .special("<|python_tag|>")
                    .map(|id| format!("<[{id}]>?"))
                    .unwrap_or_default();
                format!("start: {tag} %json {}\n", compact(call_schema))
            }
            Self::Mistral => {
                let mut list = json!({"type": "array", "items": call_schema, "minItems": 1});
                if one_call {
                    list["maxItems"] = json!(1);
                }
                format!(
                    "start: {} \" \"? %json {}\n",
                    literal(vocab, "[TOOL_CALLS]"),
                    compact(list)
                )
            }
        };
        Some(TopLevelGrammar::from_lark(lark))
    }

    /// What starts a call in this format, for `auto` (the grammar switches on there).
    pub fn triggers(&self, vocab: &Vocabulary) -> Vec<Trigger> {
        let text = |s: &str, at_start: bool| Trigger {
            bytes: match vocab.special(s) {
                Some(id) => vocab.token_bytes(id).to_vec(),
                None => s.as_bytes().to_vec(),
            },
            at_start,
        };
        match self {
            Self::Hermes => vec![text("<tool_call>", false)],
            Self::Llama3Json => {
                let mut t = vec![text("{\"name\"", true)];
                if vocab.special("<|python_tag|>").is_some() {
                    t.push(text("<|python_tag|>", true));
                }
                t
            }
            Self::Mistral => vec![text("[TOOL_CALLS]", false)],
        }
    }

    /// Splits a whole answer into its text and its calls. Text that looks like a call but does not parse
    /// stays text.
    pub fn parse(&self, answer: &str) -> (String, Vec<ParsedCall>) {
        let mut s = CallStream::new(*self);
        let mut pieces = s.feed(answer);
        pieces.extend(s.finish());
        let mut content = String::new();
        let mut calls = Vec::new();
        for p in pieces {
            match p {
                Piece::Text(t) => content.push_str(&t),
                Piece::Call(c) => calls.push(c),
            }
        }
        (content, calls)
    }
}

/// A grammar literal for `text`: the special token when the vocabulary has one (a string literal could
/// never produce it), else the string.
fn literal(vocab: &Vocabulary, text: &str) -> String {
    match vocab.special(text) {
        Some(id) => format!("<[{id}]>"),
        None => serde_json::to_string(text).expect("a string serializes"),
    }
}

/// What a streamed answer turns into.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text for the `content` field.
    Text(String),
    /// A complete call.
    Call(ParsedCall),
}

/// Splits an answer into text and calls while it streams: text goes out as soon as it cannot be the
/// start of a call; a call goes out once it is complete.
pub struct CallStream {
    format: ToolFormat,
    /// Text not yet given out.
    pending: String,
    in_calls: bool,
    /// Llama-3.1 and Mistral calls open the answer: whether the answer's first character was seen.
    opened: bool,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";

impl CallStream {
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            pending: String::new(),
            in_calls: false,
            opened: false,
        }
    }

    pub fn feed(&mut self, text: &str) -> Vec<Piece> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        match self.format {
            ToolFormat::Hermes => self.feed_hermes(&mut out),
            ToolFormat::Llama3Json | ToolFormat::Mistral => {
                if !self.opened {
                    let head = self.pending.trim_start();
                    let Some(first) = head.chars().next() else {
                        return out;
                    };
                    self.opened = true;
                    // Special tokens are dropped from decoded text, so a call may also open bare.
                    self.in_calls = match self.format {
                        ToolFormat::Mistral => first == '[',
                        _ => first == '{' || head.starts_with("<|python_tag|>"),
                    };
                }
                if !self.in_calls {
                    out.push(Piece::Text(std::mem::take(&mut self.pending)));
                }
            }
        }
        out.retain(|p| !matches!(p, Piece::Text(t) if t.is_empty()));
        out
    }

    fn feed_hermes(&mut self, out: &mut Vec<Piece>) {
        loop {
            if !self.in_calls {
                if let Some(i) = self.pending.find(HERMES_OPEN) {
                    out.push(Piece::Text(self.pending[..i].to_string()));
                    self.pending.drain(..i);
                    self.in_calls = true;
                    continue;
                }
                // Hold back what may be the beginning of "<tool_call>".
                let keep = (1..HERMES_OPEN.len())
                    .rev()
                    .find(|&n| {
                        self.pending.len() >= n
                            && self.pending.is_char_boundary(self.pending.len() - n)
                            && HERMES_OPEN.starts_with(&self.pending[self.pending.len() - n..])
                    })
                    .unwrap_or(0);
                let cut = self.pending.len() - keep;
                out.push(Piece::Text(self.pending[..cut].to_string()));
                self.pending.drain(..cut);
                return;
            }
            let Some(end) = self.pending.find(HERMES_CLOSE) else {
                return;
            };
            let block: String = self.pending.drain(..end + HERMES_CLOSE.len()).collect();
            out.push(hermes_call(&block).map_or(Piece::Text(block), Piece::Call));
            // What follows a call is another call or the end; whitespace between them is not text.
            let rest = self.pending.trim_start().to_string();
            self.pending = rest;
            if !self.pending.is_empty() && !HERMES_OPEN.starts_with(&self.pending) {
                self.in_calls = self.pending.starts_with(HERMES_OPEN);
            }
        }
    }

    /// The answer ended: what is left.
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.pending);
        if rest.trim().is_empty() {
            return Vec::new();
        }
        if !self.in_calls {
            return vec![Piece::Text(rest)];
        }
        let calls = match self.format {
            // A call cut off by the token limit before its JSON began is not text either.
            ToolFormat::Hermes if HERMES_OPEN.starts_with(rest.trim()) => Some(Vec::new()),
            ToolFormat::Hermes => hermes_call(&rest).map(|c| vec![c]),
            ToolFormat::Llama3Json => llama3_calls(&rest),
            ToolFormat::Mistral => mistral_calls(&rest),
        };
        match calls {
            Some(calls) => calls.into_iter().map(Piece::Call).collect(),
            None => vec![Piece::Text(rest)],
        }
    }
}

/// `{"name": …, "arguments"|"parameters": {…}}` as a call.
fn call_of(v: &Value) -> Option<ParsedCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    let arguments = match args {
        // Some models write the arguments as a JSON string already.
        Value::String(s) if serde_json::from_str::<Value>(&s).is_ok() => s,
        Value::Object(_) => args.to_string(),
        _ => return None,
    };
    Some(ParsedCall { name, arguments })
}

fn hermes_call(block: &str) -> Option<ParsedCall> {
    let body = block.trim().strip_prefix(HERMES_OPEN)?;
    let body = body.strip_suffix(HERMES_CLOSE).unwrap_or(body);
    call_of(&serde_json::from_str(body.trim()).ok()?)
}

fn llama3_calls(text: &str) -> Option<Vec<ParsedCall>> {
    let text = text.trim();
    let text = text.strip_prefix("<|python_tag|>").unwrap_or(text).trim();
    let calls: Option<Vec<ParsedCall>> = serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .map(|v| v.ok().and_then(|v| call_of(&v)))
        .collect();
    // Several calls may also come separated by semicolons.
    let calls = calls.or_else(|| {
        text.split(';')
            .map(|p| {
                serde_json::from_str::<Value>(p.trim())
                    .ok()
                    .and_then(|v| call_of(&v))
            })
            .collect()
    })?;
    (!calls.is_empty()).then_some(calls)
}

fn mistral_calls(text: &str) -> Option<Vec<ParsedCall>> {
    let text = text.trim();
    let text = text.strip_prefix("[TOOL_CALLS]").unwrap_or(text).trim();
    let calls: Vec<ParsedCall> = match serde_json::from_str::<Value>(text).ok()? {
        Value::Array(items) => items.iter().map(call_of).collect::<Option<_>>()?,
        one @ Value::Object(_) => vec![call_of(&one)?],
        _ => return None,
    };
    (!calls.is_empty()).then_some(calls)
}

/// For templates without a tools section: the tools described in the system message, earlier calls
/// written as the model should write new ones, and tool results as user turns (t2's documented fallback,
/// in the Hermes format).
pub fn fallback_messages(
    messages: &[ChatMessage],
    tools: &[Tool],
    choice: &ToolChoice,
) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if !tools.is_empty() && *choice != ToolChoice::None {
        let prompt = tools_prompt(tools, choice);
        match messages.first() {
            Some(m) if m.role == "system" => out.push(ChatMessage::new(
                "system",
                &format!("{}\n\n{prompt}", m.content),
            )),
            _ => out.push(ChatMessage::new("system", &prompt)),
        }
    }
    let skip = usize::from(!out.is_empty() && messages.first().is_some_and(|m| m.role == "system"));
    for m in &messages[skip..] {
        match m.role.as_str() {
            "assistant" if m.tool_calls.is_some() => {
                let mut text = m.content.clone();
                for c in m.tool_calls.iter().flatten() {
                    let f = &c["function"];
                    let args = match &f["arguments"] {
                        Value::String(s) => {
                            serde_json::from_str(s).unwrap_or(Value::String(s.clone()))
                        }
                        other => other.clone(),
                    };
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!(
                        "{HERMES_OPEN}\n{}\n{HERMES_CLOSE}",
                        json!({"name": f["name"], "arguments": args})
                    ));
                }
                out.push(ChatMessage::new("assistant", &text));
            }
            "tool" => {
                let part = format!("<tool_response>\n{}\n</tool_response>", m.content);
                match out.last_mut() {
                    // Results of one turn's calls go back together.
                    Some(prev)
                        if prev.role == "user" && prev.content.ends_with("</tool_response>") =>
                    {
                        prev.content.push('\n');
                        prev.content.push_str(&part);
                    }
                    _ => out.push(ChatMessage::new("user", &part)),
                }
            }
            _ => out.push(ChatMessage::new(&m.role, &m.content)),
        }
    }
    out
}

fn tools_prompt(tools: &[Tool], choice: &ToolChoice) -> String {
    let mut s = String::from(
        "You can use functions. Each one is described below as JSON (its parameters as a JSON Schema):\n<tools>\n",
    );
    for t in tools {
        let mut f = json!({"name": t.name, "parameters": t.parameters});
        if let Some(d) = &t.description {
            f["description"] = json!(d);
        }
        s.push_str(&f.to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\nTo use a function, answer with a JSON object naming it and giving its arguments, between \
         <tool_call> and </tool_call> tags, one pair of tags per call:\n<tool_call>\n\
         {\"name\": \"the function's name\", \"arguments\": {\"parameter\": \"value\"}}\n</tool_call>",
    );
    match choice {
        ToolChoice::Required => s.push_str("\nAnswer with function calls only."),
        ToolChoice::Function(f) => s.push_str(&format!("\nAnswer by calling the function {f}.")),
        ToolChoice::Auto | ToolChoice::None => {}
    }
    s
}
