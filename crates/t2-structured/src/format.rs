//! OpenAI's `response_format` as a grammar.

use llguidance::api::TopLevelGrammar;
use serde_json::{json, Value};

use crate::{Result, StructuredError};

/// What shape an answer must have.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Free text (no constraint).
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid under `schema`.
    JsonSchema { name: String, schema: Value },
}

impl ResponseFormat {
    /// Reads the `response_format` field; errors say which part is wrong.
    pub fn from_request(v: &Value) -> Result<Self> {
        let invalid = |m: String| StructuredError::Invalid(m);
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("response_format.type must be a string".into()))?;
        match kind {
            "text" => Ok(Self::Text),
            "json_object" => Ok(Self::JsonObject),
            "json_schema" => {
                let spec = v
                    .get("json_schema")
                    .filter(|s| s.is_object())
                    .ok_or_else(|| {
                        invalid(
                            "response_format.json_schema must be an object with name and schema"
                                .into(),
                        )
                    })?;
                let name = spec.get("name").and_then(Value::as_str).unwrap_or_default();
                if name.is_empty()
                    || name.len() > 64
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(invalid(format!(
                        "response_format.json_schema.name must be 1-64 letters, digits, _ or -, got '{name}'"
                    )));
                }
                let schema = match spec.get("schema") {
                    None | Some(Value::Null) => json!({"type": "object"}),
                    Some(s @ (Value::Object(_) | Value::Bool(true))) => s.clone(),
                    Some(_) => {
                        return Err(invalid(
                            "response_format.json_schema.schema must be a JSON Schema object"
                                .into(),
                        ))
                    }
                };
                Ok(Self::JsonSchema {
                    name: name.to_string(),
                    schema,
                })
            }
            other => Err(invalid(format!(
                "response_format.type '{other}' is not supported (text, json_object, json_schema)"
            ))),
        }
    }

    /// The grammar, or None for free text.
    pub fn grammar(&self) -> Option<TopLevelGrammar> {
        match self {
            Self::Text => None,
            Self::JsonObject => Some(TopLevelGrammar::from_json_schema(compact(
                json!({"type": "object"}),
            ))),
            Self::JsonSchema { schema, .. } => {
                Some(TopLevelGrammar::from_json_schema(compact(schema.clone())))
            }
        }
    }
}

/// Fixes JSON's layout to `{"a": 1, "b": [2, 3]}` (Python's default separators, the layout models see in
/// training): with free whitespace a small model can pad an answer with newlines until it runs out of
/// tokens. A schema that sets its own `x-guidance` options keeps them.
pub(crate) fn compact(schema: Value) -> Value {
    match schema {
        Value::Object(mut m) => {
            m.entry("x-guidance").or_insert_with(|| {
                json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
            });
            Value::Object(m)
        }
        Value::Bool(true) => compact(json!({})),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_three_types_and_names_what_is_wrong() {
        assert_eq!(
            ResponseFormat::from_request(&json!({"type": "text"})).unwrap(),
            ResponseFormat::Text
        );
        assert_eq!(
            ResponseFormat::from_request(&json!({"type": "json_object"})).unwrap(),
            ResponseFormat::JsonObject
        );
        let f = ResponseFormat::from_request(
            &json!({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "integer"}}}),
        )
        .unwrap();
        assert!(matches!(f, ResponseFormat::JsonSchema { ref name, .. } if name == "p"));
        for (bad, says) in [
            (json!({"type": "xml"}), "'xml' is not supported"),
            (json!({}), "type must be a string"),
            (
                json!({"type": "json_schema"}),
                "json_schema must be an object",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
                "name must be",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a", "schema": 3}}),
                "must be a JSON Schema object",
            ),
        ] {
            let e = ResponseFormat::from_request(&bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_schemas_own_layout_options_win() {
        let s = compact(json!({"type": "object", "x-guidance": {"whitespace_flexible": true}}));
        assert_eq!(s["x-guidance"], json!({"whitespace_flexible": true}));
        let s = compact(json!({"type": "object"}));
        assert_eq!(s["x-guidance"]["whitespace_flexible"], json!(false));
    }
}
