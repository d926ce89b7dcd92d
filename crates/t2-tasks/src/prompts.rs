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

/// The pass-1 prompt: classify `request` as exactly one of `labels`, answering `\boxed{label}`.
pub fn routing_prompt(request: &str, labels: &[String]) -> String {
    let mut s = String::from("Classify the request below into exactly one of these categories:\n");
    for l in labels {
        let hint = CATEGORY_HINTS
            .iter()
            .find(|(k, _)| k == l)
            .map(|(_, h)| *h)
            .unwrap_or("");
        if hint.is_empty() {
            s.push_str(&format!("- {l}\n"));
        } else {
            s.push_str(&format!("- {l}: {hint}\n"));
        }
    }
    s.push_str("Do not answer the request. Reply with the category name in \\boxed{}, for example \\boxed{");
    s.push_str(labels.first().map(String::as_str).unwrap_or("other"));
    s.push_str("}.\n\nRequest:\n");
    s.push_str(request);
    s
}

/// The user message for one item of a task of `area`.
pub fn user_message(area: &str, item: &crate::TaskItem) -> String {
    match (&item.answer, area) {
        (crate::Answer::Choice { options, .. }, "routing") => routing_prompt(&item.prompt, options),
        _ => item.prompt.clone(),
    }
}
