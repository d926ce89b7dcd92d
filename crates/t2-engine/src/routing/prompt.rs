//! The words of pass 1: the categories t2's experts serve (in their canonical order, each with the hint
//! the model reads), the classification prompt around a request, and the answer prefix the label follows.
//!
//! The shipped classifier expert was trained on exactly these tokens: any change to the text below
//! changes what it sees (a test pins the prompt byte for byte).

use super::OTHER_LABEL;

/// A category a pass-1 label can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Category {
    pub name: &'static str,
    /// One line in the prompt, so the model knows what the label means.
    pub hint: &'static str,
}

/// The categories t2's experts are trained for, in canonical order: labels are listed in this order (others
/// follow alphabetically, "other" last), as the router expert was trained.
pub const CATEGORIES: &[Category] = &[
    Category {
        name: "code",
        hint: "writing or fixing a computer program",
    },
    Category {
        name: "math",
        hint: "arithmetic or a math word problem with a numeric answer",
    },
    Category {
        name: "reasoning",
        hint: "a multiple-choice question about science or everyday reasoning",
    },
    Category {
        name: "classification",
        hint: "judging a text, such as the sentiment of a review",
    },
    Category {
        name: OTHER_LABEL,
        hint: "anything else",
    },
];

/// Where a label goes in the canonical order (an unknown category after every known one).
pub fn category_rank(name: &str) -> usize {
    CATEGORIES
        .iter()
        .position(|c| c.name == name)
        .unwrap_or(CATEGORIES.len())
}

/// The pass-1 prompt around a request: the instructions first and the request last, so that everything
/// before the request is the same for every request and its KV cache can be computed once. The label is
/// read after [`ROUTING_ANSWER_PREFIX`] in the reply (scored, not generated, so the model cannot wander
/// off into answering the request).
pub fn routing_prompt_parts(labels: &[String]) -> (String, String) {
    let mut head = String::from(
        "Classify the request below into one of these categories, without answering it:\n",
    );
    for l in labels {
        match CATEGORIES.iter().find(|c| c.name == l) {
            Some(c) => head.push_str(&format!("- {l}: {}\n", c.hint)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_is_the_one_the_router_was_trained_on() {
        let labels: Vec<String> = [
            "code",
            "math",
            "reasoning",
            "classification",
            "poetry",
            "other",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            routing_prompt("  What is 7 times 8? \n", &labels),
            "Classify the request below into one of these categories, without answering it:\n\
             - code: writing or fixing a computer program\n\
             - math: arithmetic or a math word problem with a numeric answer\n\
             - reasoning: a multiple-choice question about science or everyday reasoning\n\
             - classification: judging a text, such as the sentiment of a review\n\
             - poetry\n\
             - other: anything else\n\
             Reply with the category name only.\nRequest:\n\"\"\"\nWhat is 7 times 8?\n\"\"\""
        );
        assert_eq!(ROUTING_ANSWER_PREFIX, "This request is about");
    }

    #[test]
    fn known_categories_come_first_in_canonical_order() {
        let ranks: Vec<usize> = ["code", "math", "reasoning", "classification", "poetry"]
            .iter()
            .map(|c| category_rank(c))
            .collect();
        assert_eq!(ranks, [0, 1, 2, 3, CATEGORIES.len()]);
    }
}
