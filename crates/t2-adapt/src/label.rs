//! The label protocol for multiple-choice tasks: the model's choice is the most likely of the options'
//! first tokens as the first token of its reply, one forward per prompt. Lettered tasks (ARC) are read by
//! their letters, because that is what their prompts ask for; others (the routing task, sst2) by their
//! options' texts. Training (`t2 train --rollouts label`) and evaluation (`t2 eval --mode label`) both
//! build their items here, so an expert is measured the way it was trained.

use t2_engine::Engine;
use t2_model::{ChatMessage, SeqStep, WantLogits};
use t2_tasks::{Answer, TaskItem};

use crate::{AdaptError, Result};

/// One item as the label protocol reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelItem {
    /// The chat prompt up to the reply, primed with the task's answer prefix when it has one.
    pub prompt: Vec<u32>,
    /// The first token of each option, in option order; distinct.
    pub candidates: Vec<u32>,
    /// The right option.
    pub correct: usize,
}

/// The text that stands for option `i`: its letter when the prompt letters the options, else its text.
/// After an answer prefix ("This request is about") the option follows a space.
pub fn candidate_text(options: &[String], i: usize, lettered: bool, primed: bool) -> String {
    let name = if lettered {
        char::from(b'A' + (i % 26) as u8).to_string()
    } else {
        options[i].clone()
    };
    if primed {
        format!(" {name}")
    } else {
        name
    }
}

/// `item` as the label protocol reads it for a task of `area`.
pub fn label_item(engine: &Engine, area: &str, item: &TaskItem) -> Result<LabelItem> {
    let Answer::Choice {
        options,
        correct,
        lettered,
    } = &item.answer
    else {
        return Err(AdaptError::Config(format!(
            "{} is not multiple choice: the label protocol needs options",
            item.id
        )));
    };
    let tok = &engine.loaded.tokenizer;
    let encode = |t: &str| tok.encode(t).map_err(|e| AdaptError::Engine(e.into()));
    let prefix = crate::prompt::answer_prefix(area);
    let prompt = if area == "routing" {
        // Exactly the tokens the server's pass 1 scores.
        t2_engine::routing::routing_tokens(engine, &item.prompt, options)?.0
    } else {
        let mut p = engine.encode_chat(&[ChatMessage::new(
            "user",
            &crate::prompt::user_message(area, item),
        )])?;
        if let Some(pre) = prefix {
            p.extend(encode(pre)?);
        }
        p
    };
    let mut candidates = Vec::with_capacity(options.len());
    for i in 0..options.len() {
        let text = candidate_text(options, i, *lettered, prefix.is_some());
        let first = *encode(&text)?
            .first()
            .ok_or_else(|| AdaptError::Config(format!("{}: an empty option", item.id)))?;
        if candidates.contains(&first) {
            return Err(AdaptError::Config(format!(
                "{}: options {options:?} do not differ at their first token, the label protocol \
                 cannot tell them apart",
                item.id
            )));
        }
        candidates.push(first);
    }
    Ok(LabelItem {
        prompt,
        candidates,
        correct: *correct,
    })
}

/// Each item's log-probabilities of its candidates as the first token of the reply, renormalised over
/// them, from the serving forward with mix slot `mix` (several items per forward).
pub fn candidate_scores(engine: &Engine, items: &[LabelItem], mix: u32) -> Result<Vec<Vec<f32>>> {
    let model = &engine.loaded.model;
    let lengths: Vec<usize> = items.iter().map(|i| i.prompt.len()).collect();
    let (pool, mut caches) = model.pool_for(&lengths)?;
    let mut steps: Vec<SeqStep<'_>> = caches
        .iter_mut()
        .zip(items)
        .map(|(kv, it)| SeqStep {
            kv,
            tokens: &it.prompt,
            mix,
            want: WantLogits::Last,
        })
        .collect();
    let out = model.forward(&mut steps, engine.projector(), &pool)?;
    drop(steps);
    items
        .iter()
        .zip(out)
        .map(|(it, l)| {
            let l = l.expect("asked for").to_vec1::<f32>()?;
            let picked: Vec<f32> = it.candidates.iter().map(|&c| l[c as usize]).collect();
            let lse = t2_model::sampling::log_sum_exp(&picked);
            Ok(picked.iter().map(|&v| v - lse).collect())
        })
        .collect()
}

/// Each item's pick under the label protocol: its most likely candidate.
pub fn pick_by_label(engine: &Engine, items: &[LabelItem], mix: u32) -> Result<Vec<usize>> {
    Ok(candidate_scores(engine, items, mix)?
        .iter()
        .map(|s| t2_tasks::verify::choice_by_scores(s))
        .collect())
}
