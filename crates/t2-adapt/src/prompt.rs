//! How a task item becomes the user message the model sees: routing items (task identification) are
//! wrapped in pass 1's classification prompt, every other task's prompt is used as written.

use t2_engine::routing::{routing_prompt, ROUTING_ANSWER_PREFIX};
use t2_tasks::{Answer, TaskItem};

/// Text the reply is primed with for a task of `area`, if any.
pub fn answer_prefix(area: &str) -> Option<&'static str> {
    (area == "routing").then_some(ROUTING_ANSWER_PREFIX)
}

/// The user message for one item of a task of `area`.
pub fn user_message(area: &str, item: &TaskItem) -> String {
    match (&item.answer, area) {
        (Answer::Choice { options, .. }, "routing") => routing_prompt(&item.prompt, options),
        _ => item.prompt.clone(),
    }
}
