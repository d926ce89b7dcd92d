//! How a task item becomes the user message the model sees. Routing items (task identification) are
//! wrapped in the pass-1 classification prompt; every other task's prompt is used as written.

/// One line per category the router can answer, so the model knows what each label means.
const CATEGORY_HINTS: &[(&str, &str)] = &[
    ("code", "writing or fixing a computer program"),
    (
        "math",
        "arithmetic or a math word problem with a numeric answer",
    ),
    (
        "reasoning",
        "a multiple-choice question about science or everyday reasoning",
    ),
    (
        "classification",
        "judging a text, such as the sentiment of a review",
    ),
    ("other", "anything else"),
];

/// The pass-1 prompt around a request: the instructions first and the request last, so that everything
/// before the request is the same for every request and its KV cache can be computed once. The label is
/// read after [`ROUTING_ANSWER_PREFIX`] in the reply (scored, not generated, so the model cannot wander
/// off into answering the request).
pub fn routing_prompt_parts(labels: &[String]) -> (String, String) {
    let mut head = String::from(
        "Classify the request below into one of these categories, without answering it:\n",
    );
    for l in labels {
        match CATEGORY_HINTS.iter().find(|(k, _)| k == l) {
            Some((_, hint)) => head.push_str(&format!("- {l}: {hint}\n")),
            None => head.push_str(&format!("- {l}\n")),
        }
    }
    head.push_str("Reply with the category name only.\nRequest:\n\"\"\"\n");
    (head, "\n\"\"\"".to_string())
}

/// The whole pass-1 user message for `request`.
pub fn routing_prompt(request: &str, labels: &[String]) -> String {
    let (head, tail) = routing_prompt_parts(labels);
    format!("{head}{}{tail}", request.trim())
}

/// The start of the assistant's reply that a label continues (" code", " math", ...): pass 1 reads the
/// label's likelihood right after it instead of hoping the model answers in the expected format.
pub const ROUTING_ANSWER_PREFIX: &str = "This request is about";

/// Text the reply is primed with for a task of `area`, if any.
pub fn answer_prefix(area: &str) -> Option<&'static str> {
    (area == "routing").then_some(ROUTING_ANSWER_PREFIX)
}

/// The user message for one item of a task of `area`.
pub fn user_message(area: &str, item: &crate::TaskItem) -> String {
    match (&item.answer, area) {
        (crate::Answer::Choice { options, .. }, "routing") => routing_prompt(&item.prompt, options),
        _ => item.prompt.clone(),
    }
}
