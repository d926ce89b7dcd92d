//! Few-shot examples for adaptation (`t2 adapt --task FILE.jsonl`, `POST /v1/adaptations`): each a prompt
//! and a checkable answer, named by the verifier that checks it.
//!
//! One JSON object per line (or per array element on the API), either the task files' own form
//! (`{"prompt": …, "answer": {"kind": "number", "value": "42"}}`) or the short form:
//! - `{"prompt": …, "verifier": "number", "answer": "42"}`
//! - `{"prompt": …, "verifier": "choice", "options": ["Paris", "Rome"], "answer": "Paris" | 0 | "A",
//!   "lettered": true}`
//! - `{"prompt": …, "verifier": "python", "entry_point": "f", "tests": ["assert f(1) == 2"]}`

use std::path::Path;

use serde_json::Value;

use crate::data::{Answer, TaskItem};

pub const VERIFIERS: &str = "number, choice, python";

/// Why one example is unusable (the caller adds where it is: a line or an array index).
fn item(v: &Value, id: String) -> Result<TaskItem, String> {
    let obj = v
        .as_object()
        .ok_or("an example must be a JSON object with a prompt and an answer")?;
    let prompt = obj
        .get("prompt")
        .and_then(Value::as_str)
        .filter(|p| !p.trim().is_empty())
        .ok_or("'prompt' must be a non-empty string")?
        .to_string();
    let answer = match (obj.get("verifier"), obj.get("answer")) {
        (None, Some(a)) if a.is_object() => serde_json::from_value::<Answer>(a.clone())
            .map_err(|e| format!("'answer' is not a valid answer object: {e}"))?,
        (None, _) => {
            return Err(format!(
                "'verifier' is missing (one of {VERIFIERS}), and 'answer' is not an answer object"
            ))
        }
        (Some(Value::String(kind)), a) => short_answer(kind, obj, a)?,
        (Some(other), _) => return Err(format!("'verifier' must be a string, got {other}")),
    };
    check(&answer)?;
    Ok(TaskItem {
        id,
        prompt,
        answer,
        stem: None,
    })
}

fn short_answer(
    kind: &str,
    obj: &serde_json::Map<String, Value>,
    a: Option<&Value>,
) -> Result<Answer, String> {
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    match kind {
        "number" => {
            let value = a
                .and_then(text)
                .filter(|s| !s.is_empty())
                .ok_or("verifier 'number' needs 'answer' (a number or a numeric string)")?;
            Ok(Answer::Number { value })
        }
        "choice" => {
            let options: Vec<String> = obj
                .get("options")
                .and_then(Value::as_array)
                .ok_or("verifier 'choice' needs 'options' (a list of strings)")?
                .iter()
                .map(|o| o.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or("'options' must all be strings")?;
            let lettered = obj
                .get("lettered")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let a = a.ok_or("verifier 'choice' needs 'answer' (an option, its index or letter)")?;
            let correct = match a {
                Value::Number(n) => n.as_u64().map(|i| i as usize),
                Value::String(s) => options.iter().position(|o| o == s).or_else(|| {
                    let c = s.trim().chars().next()?;
                    (s.trim().len() == 1 && c.is_ascii_uppercase())
                        .then(|| (c as u8 - b'A') as usize)
                }),
                _ => None,
            }
            .filter(|&i| i < options.len())
            .ok_or_else(|| format!("'answer' {a} is not one of the {} options", options.len()))?;
            Ok(Answer::Choice {
                options,
                correct,
                lettered,
            })
        }
        "python" => {
            let entry_point = obj
                .get("entry_point")
                .and_then(Value::as_str)
                .ok_or("verifier 'python' needs 'entry_point' (the function's name)")?
                .to_string();
            let tests: Vec<String> = obj
                .get("tests")
                .and_then(Value::as_array)
                .ok_or("verifier 'python' needs 'tests' (a list of assert statements)")?
                .iter()
                .map(|t| t.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or("'tests' must all be strings")?;
            Ok(Answer::Python { entry_point, tests })
        }
        other => Err(format!("unknown verifier '{other}' (one of {VERIFIERS})")),
    }
}

fn check(a: &Answer) -> Result<(), String> {
    match a {
        Answer::Choice { options, .. } if options.len() < 2 => {
            Err("a choice needs at least 2 options".into())
        }
        Answer::Python { tests, .. } if tests.is_empty() => {
            Err("verifier 'python' needs at least one test".into())
        }
        _ => Ok(()),
    }
}

/// Examples given inline (the API's `examples` array); errors name the index.
pub fn parse_examples(values: &[Value]) -> Result<Vec<TaskItem>, String> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| item(v, format!("example-{i}")).map_err(|e| format!("examples[{i}]: {e}")))
        .collect()
}

/// Examples from a JSONL file; errors name the file and line. Blank lines are skipped.
pub fn read_examples(path: &Path) -> Result<Vec<TaskItem>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |e: String| format!("{}:{}: {e}", path.display(), n + 1);
        let v: Value =
            serde_json::from_str(line).map_err(|e| at(format!("not valid JSON ({e})")))?;
        out.push(item(&v, format!("line-{}", n + 1)).map_err(at)?);
    }
    if out.is_empty() {
        return Err(format!("{} holds no examples", path.display()));
    }
    Ok(out)
}

/// The text of a correct answer, whose log-likelihood breaks ties between mixes of equal accuracy
/// (none for code: tests check behaviour, and there is no one right text).
pub fn reference_answer(a: &Answer) -> Option<String> {
    match a {
        Answer::Number { value } => Some(value.clone()),
        Answer::Choice {
            options,
            correct,
            lettered,
        } => Some(if *lettered {
            char::from(b'A' + *correct as u8).to_string()
        } else {
            options[*correct].clone()
        }),
        Answer::Python { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn short_and_native_forms_parse() {
        let items = parse_examples(&[
            json!({"prompt": "2+2?", "verifier": "number", "answer": 4}),
            json!({"prompt": "Capital?", "verifier": "choice", "options": ["Paris", "Rome"], "answer": "B", "lettered": true}),
            json!({"prompt": "f", "verifier": "python", "entry_point": "f", "tests": ["assert f() == 1"]}),
            json!({"prompt": "3+3?", "answer": {"kind": "number", "value": "6"}}),
        ])
        .unwrap();
        assert_eq!(items[0].answer, Answer::Number { value: "4".into() });
        assert!(matches!(items[1].answer, Answer::Choice { correct: 1, .. }));
        assert_eq!(reference_answer(&items[1].answer).as_deref(), Some("B"));
        assert!(matches!(items[2].answer, Answer::Python { .. }));
        assert_eq!(reference_answer(&items[3].answer).as_deref(), Some("6"));
    }

    #[test]
    fn bad_examples_say_what_and_where() {
        let err = |v: Value| {
            parse_examples(&[json!({"prompt": "p", "verifier": "number", "answer": 1}), v])
                .unwrap_err()
        };
        assert!(
            err(json!({"prompt": "p", "verifier": "regex", "answer": "x"}))
                .contains("examples[1]: unknown verifier 'regex'")
        );
        assert!(err(json!({"verifier": "number", "answer": 1})).contains("'prompt'"));
        assert!(err(
            json!({"prompt": "p", "verifier": "choice", "options": ["a", "b"], "answer": "c"})
        )
        .contains("not one of the 2 options"));
        assert!(err(json!({"prompt": "p", "answer": "1"})).contains("'verifier' is missing"));
        assert!(err(json!("text")).contains("JSON object"));
    }
}
