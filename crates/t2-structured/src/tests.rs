//! Grammars held against a "model" that wants to break them: random logits at every step (seeded), the
//! real SmolLM2 vocabulary. Whatever the logits, the answer must parse and fit its schema. The parsers are
//! checked on calls rendered by chat templates of each family's syntax (written for these tests, from the
//! syntax each family documents), whole and split at every byte.

use std::sync::{Arc, OnceLock};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use t2_model::{ChatMessage, ChatTemplate, T2Tokenizer, TokenConstraint};

use crate::tools::{
    fallback_messages, parse_tool_choice, parse_tools, CallStream, ParsedCall, Piece, Tool,
    ToolChoice, ToolFormat,
};
use crate::{GrammarConstraint, ResponseFormat, Vocabulary};

fn tokenizer() -> &'static T2Tokenizer {
    static TOK: OnceLock<T2Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        T2Tokenizer::from_gguf_path(&p).expect("run scripts/fetch-model.sh first")
    })
}

fn vocab() -> Arc<Vocabulary> {
    static V: OnceLock<Arc<Vocabulary>> = OnceLock::new();
    V.get_or_init(|| Arc::new(Vocabulary::new(tokenizer()).unwrap()))
        .clone()
}

/// Runs a constraint against seeded random logits (biased toward a few tokens so that answers end) until
/// end-of-sequence or `max` tokens; returns the decoded answer and whether it ended by itself.
fn drive(c: &mut dyn TokenConstraint, seed: u64, max: usize) -> (String, bool) {
    let tok = tokenizer();
    let n = 49152;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ids = Vec::new();
    for _ in 0..max {
        let mut logits: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 4.0).collect();
        // End-of-sequence is likely whenever it is allowed, so answers finish.
        for &e in &tok.eos {
            logits[e as usize] += 3.0;
        }
        c.prepare();
        c.apply(&mut logits);
        let t = t2_model::sampling::argmax(&logits);
        assert!(logits[t as usize].is_finite(), "everything was masked");
        c.commit(t);
        if tok.is_eos(t) {
            return (tok.decode(&ids).unwrap(), true);
        }
        ids.push(t);
    }
    (tok.decode(&ids).unwrap(), false)
}

fn constrained(format: &ResponseFormat) -> GrammarConstraint {
    let v = vocab();
    let g = v.compile(format.grammar().unwrap()).unwrap();
    GrammarConstraint::new(g, v, None)
}

#[test]
fn random_logits_still_give_json_that_fits_the_schema() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
            "pet": {"$ref": "#/$defs/Pet"}
        },
        "required": ["name", "age", "pet"],
        "additionalProperties": false,
        "$defs": {"Pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
                  "required": ["kind"], "additionalProperties": false}}
    });
    let f = ResponseFormat::JsonSchema {
        name: "person".into(),
        schema,
    };
    for seed in 0..4 {
        let (text, ended) = drive(&mut constrained(&f), seed, 400);
        assert!(ended, "seed {seed}: did not finish: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let o = v.as_object().unwrap();
        assert!(o["name"].as_str().unwrap().chars().count() <= 12, "{text}");
        assert!((0..=150).contains(&o["age"].as_i64().unwrap()), "{text}");
        assert!(
            ["cat", "dog"].contains(&o["pet"]["kind"].as_str().unwrap()),
            "{text}"
        );
        for t in o
            .get("tags")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            assert!(t == "a" || t == "b", "{text}");
        }
        assert!(o
            .keys()
            .all(|k| ["name", "age", "tags", "pet"].contains(&k.as_str())));
        // The layout is fixed: ", " and ": " and nothing else between tokens.
        assert!(!text.contains('\n') && !text.contains("  "), "{text}");
    }
}

#[test]
fn json_object_mode_gives_an_object() {
    for seed in 10..13 {
        let (text, ended) = drive(&mut constrained(&ResponseFormat::JsonObject), seed, 300);
        if ended {
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert!(v.is_object(), "{text}");
        } else {
            assert!(text.starts_with('{'), "{text}");
        }
    }
}

#[test]
fn without_a_constraint_random_logits_give_no_json() {
    // The control for the tests above: the same driver, unconstrained, does not produce JSON by chance.
    struct Free;
    impl TokenConstraint for Free {
        fn prepare(&mut self) {}
        fn apply(&mut self, _: &mut [f32]) {}
        fn commit(&mut self, _: u32) {}
    }
    let (text, _) = drive(&mut Free, 0, 50);
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
}

#[test]
fn invalid_schemas_are_refused_with_the_reason() {
    let v = vocab();
    for (schema, says) in [
        (
            json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
            "missing",
        ),
        (json!({"type": "strng"}), "strng"),
        (
            json!({"type": "integer", "minimum": 5, "maximum": 1}),
            "nsatisfiable",
        ),
    ] {
        let f = ResponseFormat::JsonSchema {
            name: "x".into(),
            schema: schema.clone(),
        };
        let err = match v.compile(f.grammar().unwrap()) {
            Ok(_) => panic!("{schema} compiled"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(says), "{schema}: {err}");
    }
}

fn weather_tools() -> Vec<Tool> {
    parse_tools(&[
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
            "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"], "additionalProperties": false}}}),
        json!({"type": "function", "function": {"name": "add", "parameters": {"type": "object",
            "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": false}}}),
    ])
    .unwrap()
}

fn check_call(c: &ParsedCall) {
    let args: Value = serde_json::from_str(&c.arguments).unwrap();
    match c.name.as_str() {
        "get_weather" => {
            assert!(args["city"].is_string(), "{args}");
            assert!(args["unit"] == "c" || args["unit"] == "f", "{args}");
        }
        "add" => {
            assert!(
                args["a"]
                    .as_f64()
                    .is_some_and(|a| a.fract() == 0.0 && a.abs() <= 1000.0),
                "{args}"
            );
            assert!(
                args["b"].as_f64().is_some_and(|b| b.fract() == 0.0),
                "{args}"
            );
        }
        other => panic!("called {other}"),
    }
}

#[test]
fn forced_calls_parse_into_calls_that_fit_their_schemas() {
    let v = vocab();
    let tools = weather_tools();
    for (choice, seed) in [
        (ToolChoice::Required, 1),
        (ToolChoice::Required, 2),
        (ToolChoice::Function("add".into()), 3),
        (ToolChoice::Function("get_weather".into()), 4),
    ] {
        for format in [
            ToolFormat::Hermes,
            ToolFormat::Llama3Json,
            ToolFormat::Mistral,
        ] {
            let g = v
                .compile(format.grammar(&tools, &choice, false, &v).unwrap())
                .unwrap();
            let mut c = GrammarConstraint::new(g, v.clone(), None);
            let (text, ended) = drive(&mut c, seed, 400);
            assert!(ended, "{format:?}: {text}");
            let (content, calls) = format.parse(&text);
            assert!(content.trim().is_empty(), "{format:?} {text}");
            assert!(!calls.is_empty(), "{format:?} {text}");
            calls.iter().for_each(check_call);
            if let ToolChoice::Function(f) = &choice {
                assert_eq!(calls.len(), 1, "{text}");
                assert_eq!(&calls[0].name, f);
            }
        }
    }
}

#[test]
fn auto_leaves_text_free_until_a_call_starts() {
    let v = vocab();
    let tools = weather_tools();
    let format = ToolFormat::Hermes;
    let g = v
        .compile(
            format
                .grammar(&tools, &ToolChoice::Auto, false, &v)
                .unwrap(),
        )
        .unwrap();
    let mut c = GrammarConstraint::triggered(g, v.clone(), format.triggers(&v), None);
    assert!(!c.is_active());
    // The model writes a sentence, then starts a call in the middle of a token ("s <tool" / "_call>").
    let tok = tokenizer();
    for t in tok.encode_continuation("Let us see. <tool_call>").unwrap() {
        let mut logits = vec![0f32; 49152];
        c.apply(&mut logits);
        assert!(
            logits.iter().all(|l| l.is_finite()),
            "constrained too early"
        );
        c.commit(t);
    }
    assert!(c.is_active(), "the trigger was not seen");
    let (rest, ended) = drive(&mut c, 7, 400);
    assert!(ended, "{rest}");
    let (content, calls) = format.parse(&format!("Let us see. <tool_call>{rest}"));
    assert_eq!(content, "Let us see. ");
    assert!(!calls.is_empty(), "{rest}");
    calls.iter().for_each(check_call);
}

#[test]
fn tool_lists_and_choices_are_checked() {
    let tools = weather_tools();
    for (bad, says) in [
        (json!({"type": "retrieval"}), "type must be \"function\""),
        (
            json!({"type": "function", "function": {"name": "a b"}}),
            "function.name",
        ),
        (
            json!({"type": "function", "function": {"name": "f", "parameters": 3}}),
            "parameters",
        ),
    ] {
        let e = parse_tools(std::slice::from_ref(&bad))
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{bad}: {e}");
    }
    let twice = json!({"type": "function", "function": {"name": "f"}});
    assert!(parse_tools(&[twice.clone(), twice])
        .unwrap_err()
        .to_string()
        .contains("twice"));
    assert_eq!(parse_tool_choice(None, &tools).unwrap(), ToolChoice::Auto);
    assert_eq!(parse_tool_choice(None, &[]).unwrap(), ToolChoice::None);
    assert_eq!(
        parse_tool_choice(
            Some(&json!({"type": "function", "function": {"name": "add"}})),
            &tools
        )
        .unwrap(),
        ToolChoice::Function("add".into())
    );
    for bad in [
        json!("sometimes"),
        json!({"type": "function", "function": {"name": "nope"}}),
        json!(3),
    ] {
        assert!(parse_tool_choice(Some(&bad), &tools).is_err(), "{bad}");
    }
    assert!(parse_tool_choice(Some(&json!("required")), &[]).is_err());
}

// Chat templates in each family's call syntax, written for these tests: an assistant turn's tool calls
// are rendered the way the family's models write them.
const HERMES_TEMPLATE: &str = r#"{%- for m in messages -%}<|im_start|>{{ m.role }}
{% if m.content %}{{ m.content }}{% endif %}{%- for c in m.tool_calls or [] %}
<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{%- endfor %}<|im_end|>
{% endfor -%}"#;
const LLAMA3_TEMPLATE: &str = r#"{%- for m in messages -%}<|start_header_id|>{{ m.role }}<|end_header_id|>

{% if m.tool_calls %}{%- for c in m.tool_calls %}{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}{% endfor %}{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor -%}"#;
const MISTRAL_TEMPLATE: &str = r#"{%- for m in messages -%}{% if m.role == "user" %}[INST] {{ m.content }} [/INST]{% elif m.tool_calls %}[TOOL_CALLS] [{%- for c in m.tool_calls %}{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}{% if not loop.last %}, {% endif %}{% endfor %}]</s>{% else %}{{ m.content }}</s>{% endif %}{% endfor -%}"#;

/// The assistant part of a rendered conversation.
fn assistant_part(rendered: &str, format: ToolFormat) -> String {
    let (open, close) = match format {
        ToolFormat::Hermes => ("<|im_start|>assistant\n", "<|im_end|>"),
        ToolFormat::Llama3Json => (
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "<|eot_id|>",
        ),
        ToolFormat::Mistral => ("[/INST]", "</s>"),
    };
    let start = rendered.find(open).expect("assistant turn") + open.len();
    let end = rendered[start..].find(close).unwrap() + start;
    rendered[start..end].to_string()
}

#[test]
fn calls_rendered_by_each_familys_template_parse_back_whole_and_streamed() {
    let calls = [
        ("get_weather", json!({"city": "Paris", "unit": "c"})),
        ("add", json!({"a": 2, "b": 40})),
    ];
    for (template, format) in [
        (HERMES_TEMPLATE, ToolFormat::Hermes),
        (LLAMA3_TEMPLATE, ToolFormat::Llama3Json),
        (MISTRAL_TEMPLATE, ToolFormat::Mistral),
    ] {
        assert_eq!(ToolFormat::for_template(template), format);
        // Llama 3.1 writes one call per turn.
        let n = if format == ToolFormat::Llama3Json {
            1
        } else {
            2
        };
        let msg = ChatMessage {
            role: "assistant".into(),
            tool_calls: Some(
                calls[..n]
                    .iter()
                    .map(|(name, args)| json!({"type": "function", "id": "c1", "function": {"name": name, "arguments": args}}))
                    .collect(),
            ),
            ..Default::default()
        };
        let t = ChatTemplate::new(Some(template.into()), String::new(), String::new()).unwrap();
        let rendered = t
            .render_with_tools(&[ChatMessage::new("user", "hi"), msg], Some(&[]))
            .unwrap();
        let answer = assistant_part(&rendered, format);
        let want: Vec<ParsedCall> = calls[..n]
            .iter()
            .map(|(name, args)| ParsedCall {
                name: name.to_string(),
                arguments: args.to_string(),
            })
            .collect();
        let (content, got) = format.parse(&answer);
        assert_eq!(got, want, "{format:?}: {answer}");
        assert!(content.trim().is_empty(), "{format:?}: {content}");
        // Streamed in pieces split at every position: the same calls, and no text.
        for cut in 1..answer.len() {
            if !answer.is_char_boundary(cut) {
                continue;
            }
            let mut s = CallStream::new(format);
            let mut pieces = s.feed(&answer[..cut]);
            pieces.extend(s.feed(&answer[cut..]));
            pieces.extend(s.finish());
            let got: Vec<ParsedCall> = pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Call(c) => Some(c.clone()),
                    Piece::Text(t) => {
                        assert!(t.trim().is_empty(), "{format:?} cut {cut}: text {t:?}");
                        None
                    }
                })
                .collect();
            assert_eq!(got, want, "{format:?} cut {cut}");
        }
    }
}

#[test]
fn plain_answers_stay_text_and_stream_at_once() {
    for format in [
        ToolFormat::Hermes,
        ToolFormat::Llama3Json,
        ToolFormat::Mistral,
    ] {
        let (content, calls) = format.parse("The weather is fine <b>today</b>.");
        assert_eq!(content, "The weather is fine <b>today</b>.");
        assert!(calls.is_empty());
    }
    // Text streams out as it comes, except what may open a call.
    let mut s = CallStream::new(ToolFormat::Hermes);
    assert_eq!(s.feed("Hello <tool"), vec![Piece::Text("Hello ".into())]);
    assert_eq!(s.feed("box>"), vec![Piece::Text("<toolbox>".into())]);
    // A second call cut off by the token limit right after its first bytes is dropped, not text.
    let (content, calls) = ToolFormat::Hermes.parse(
        "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>\n<tool_c",
    );
    assert_eq!((content.as_str(), calls.len()), ("", 1));
    // A call that does not parse is given back as text.
    let (content, calls) = ToolFormat::Hermes.parse("<tool_call>\n{\"name\": oops}\n</tool_call>");
    assert!(calls.is_empty());
    assert!(content.contains("oops"));
}

#[test]
fn the_fallback_prompt_describes_tools_and_replays_calls_and_results() {
    let tools = weather_tools();
    let history = vec![
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Weather in Paris?"),
        ChatMessage {
            role: "assistant".into(),
            tool_calls: Some(vec![json!({"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}})]),
            ..Default::default()
        },
        ChatMessage {
            role: "tool".into(),
            content: "18 degrees".into(),
            tool_call_id: Some("c1".into()),
            ..Default::default()
        },
    ];
    let out = fallback_messages(&history, &tools, &ToolChoice::Auto);
    let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    assert!(out[0].content.starts_with("Be brief.\n\n"));
    assert!(out[0].content.contains("\"name\":\"get_weather\""));
    let (_, calls) = ToolFormat::Hermes.parse(&out[2].content);
    assert_eq!(calls[0].name, "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(&calls[0].arguments).unwrap(),
        json!({"city": "Paris", "unit": "c"})
    );
    assert_eq!(
        out[3].content,
        "<tool_response>\n18 degrees\n</tool_response>"
    );
    // With tool_choice none, no tools are described.
    let out = fallback_messages(&history, &tools, &ToolChoice::None);
    assert_eq!(out[0].content, "Be brief.");
}
