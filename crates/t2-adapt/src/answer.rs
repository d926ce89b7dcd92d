//! Answer and verify: task items become prompts, are answered greedily (or as sampled) in one batched
//! generation, and each answer is checked by its task's verifier. Training, evaluation and few-shot
//! search all score an adaptation this way.

use std::sync::Arc;

use indicatif::ProgressBar;
use t2_engine::{Adaptation, Engine};
use t2_model::SamplingParams;
use t2_tasks::sandbox::Sandbox;
use t2_tasks::TaskItem;

use crate::rollout::{Generator, Job, Rollout};
use crate::{AdaptError, Result};

/// Answers task items through a [`Generator`] and verifies them (code answers run in the sandbox).
pub struct Answerer {
    engine: Arc<Engine>,
    generator: Generator,
    sandbox: Sandbox,
}

impl Answerer {
    /// An answerer with a scheduler of its own, `max_batch` sequences per step.
    pub fn new(engine: Arc<Engine>, max_batch: usize) -> Result<Self> {
        // Checked before the generator starts a scheduler that would only be stopped again.
        needs_svf(&engine)?;
        let generator = Generator::new(engine.clone(), max_batch);
        Self::with_generator(engine, generator)
    }

    /// An answerer whose answers go through `generator` (e.g. one sharing a server's scheduler).
    pub fn with_generator(engine: Arc<Engine>, generator: Generator) -> Result<Self> {
        needs_svf(&engine)?;
        let sandbox =
            Sandbox::new(Default::default()).map_err(|e| AdaptError::Verifier(e.to_string()))?;
        Ok(Self {
            engine,
            generator,
            sandbox,
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn generator(&self) -> &Generator {
        &self.generator
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// The tokens an item is answered from.
    pub fn prompt_for(&self, area: &str, it: &TaskItem) -> Result<Vec<u32>> {
        self.generator
            .chat_prompt(&crate::prompt::user_message(area, it))
    }

    /// Greedy answers to `items[i]` with `adaptations[i]`, all in one batched generation: whether each
    /// was right, and the log-likelihood of the item's reference answer under the same adaptation (None
    /// where the item has no reference text), scored from the answer's own prompt KV.
    pub fn answer_and_verify_each(
        &self,
        area: &str,
        items: &[TaskItem],
        adaptations: &[Adaptation],
        max_new_tokens: usize,
    ) -> Result<Vec<(bool, Option<t2_engine::Scored>)>> {
        let answers = self.answer_and_verify_with(
            area,
            items,
            |i| (adaptations[i].clone(), SamplingParams::default()),
            max_new_tokens,
            true,
            None,
        )?;
        Ok(answers
            .into_iter()
            .map(|(correct, r)| (correct, r.score))
            .collect())
    }

    /// The tokens of an item's reference answer, as they would follow its prompt (empty: none).
    fn reference_tokens(&self, it: &TaskItem) -> Result<Vec<u32>> {
        let Some(reference) = t2_tasks::shots::reference_answer(&it.answer) else {
            return Ok(Vec::new());
        };
        self.engine
            .loaded
            .tokenizer
            .encode_continuation(&reference)
            .map_err(|e| AdaptError::Engine(e.into()))
    }

    /// Greedy answers of `items` under `adaptation`, verified: (correct?, rollout) per item.
    pub fn answer_and_verify(
        &self,
        area: &str,
        items: &[TaskItem],
        adaptation: &Adaptation,
        max_new_tokens: usize,
        sampling: impl Fn(usize) -> SamplingParams,
        progress: Option<&ProgressBar>,
    ) -> Result<Vec<(bool, Rollout)>> {
        self.answer_and_verify_with(
            area,
            items,
            |i| (adaptation.clone(), sampling(i)),
            max_new_tokens,
            false,
            progress,
        )
    }

    /// Item i answered with the adaptation and sampling `adaptation_and_sampling(i)` gives, all in one
    /// batched generation, then verified: (correct?, rollout) per item. With `score_references`, each
    /// rollout also carries its reference answer's log-likelihood.
    fn answer_and_verify_with(
        &self,
        area: &str,
        items: &[TaskItem],
        adaptation_and_sampling: impl Fn(usize) -> (Adaptation, SamplingParams),
        max_new_tokens: usize,
        score_references: bool,
        progress: Option<&ProgressBar>,
    ) -> Result<Vec<(bool, Rollout)>> {
        let jobs = items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let (adaptation, sampling) = adaptation_and_sampling(i);
                Ok(Job {
                    prompt: self.prompt_for(area, it)?,
                    adaptation,
                    max_tokens: max_new_tokens,
                    sampling,
                    route: None,
                    also_score: if score_references {
                        self.reference_tokens(it)?
                    } else {
                        Vec::new()
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rollouts = self.generator.run(jobs, progress)?;
        let pairs: Vec<_> = items
            .iter()
            .zip(&rollouts)
            .map(|(it, r)| (&it.answer, r.text.as_str()))
            .collect();
        let verdicts = t2_tasks::verify::verify_all(&pairs, &self.sandbox);
        Ok(verdicts
            .into_iter()
            .zip(rollouts)
            .map(|(v, r)| (v.correct, r))
            .collect())
    }
}

/// Mixes of experts, and training them, act on the decomposition: without one there is nothing to adapt.
fn needs_svf(engine: &Engine) -> Result<()> {
    match engine.svf {
        Some(_) => Ok(()),
        None => Err(AdaptError::Config(
            "adaptation needs SVF (a decomposition)".into(),
        )),
    }
}
