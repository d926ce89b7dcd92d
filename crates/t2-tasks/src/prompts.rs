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

/// The pass-1 prompt: the request first, then the question, so that a small model does not start
/// answering the request itself. The label is read after [`ROUTING_ANSWER_PREFIX`] in the reply.
pub fn routing_prompt(request: &str, labels: &[String]) -> String {
    let mut s = String::from("Here is a request:\n\"\"\"\n");
    s.push_str(request.trim());
    s.push_str("\n\"\"\"\nDo not answer it. Classify it into one of these categories:\n");
    for l in labels {
        match CATEGORY_HINTS.iter().find(|(k, _)| k == l) {
            Some((_, hint)) => s.push_str(&format!("- {l}: {hint}\n")),
            None => s.push_str(&format!("- {l}\n")),
        }
    }
    s.push_str("Reply with the category name only.");
    s
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
