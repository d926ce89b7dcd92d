//! Chat templates: the model's own Jinja template (from GGUF metadata or tokenizer_config.json) rendered
//! with minijinja, ChatML when the checkpoint carries none.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// One turn of a conversation, in the shape Hugging Face chat templates read: an assistant turn may carry
/// tool calls (`[{"type": "function", "function": {"name", "arguments": {...}}, "id"}]`), and a `tool`
/// turn answers the call named by `tool_call_id`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
            ..Default::default()
        }
    }
}

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// `source` is the template text; `None` means ChatML.
    pub fn new(source: Option<String>, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        // HF templates call Python string methods (.strip(), .startswith()).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let source = source.unwrap_or_else(|| CHATML.to_string());
        env.add_template_owned("chat", source.clone())
            .map_err(|e| ModelError::Template(e.to_string()))?;
        Ok(Self {
            env,
            source,
            bos_token,
            eos_token,
        })
    }

    /// The Jinja text of the template.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template renders tool definitions itself (reads a `tools` variable); otherwise a
    /// caller that has tools must describe them in the messages.
    pub fn supports_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// Renders the conversation followed by the assistant's turn header.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        self.render_with_tools(messages, None)
    }

    /// Renders the conversation with the tools the model may call (OpenAI's `tools` list, which HF
    /// templates read as is).
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(ModelError::Invalid("messages must not be empty".into()));
        }
        for m in messages {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
                return Err(ModelError::Invalid(format!(
                    "unknown message role '{}' (expected system, user, assistant or tool)",
                    m.role
                )));
            }
        }
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| ModelError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_renders_turns_and_generation_prompt() {
        let t = ChatTemplate::new(None, String::new(), "<|im_end|>".into()).unwrap();
        let out = t
            .render(&[
                ChatMessage::new("system", "S"),
                ChatMessage::new("user", "hi"),
            ])
            .unwrap();
        assert_eq!(out, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn unknown_role_and_empty_conversation_are_rejected() {
        let t = ChatTemplate::new(None, String::new(), String::new()).unwrap();
        assert!(t.render(&[]).is_err());
        assert!(t.render(&[ChatMessage::new("robot", "x")]).is_err());
    }
}
