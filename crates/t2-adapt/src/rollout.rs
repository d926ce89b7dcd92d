//! Batched generation for training, evaluation and few-shot search: every prompt goes through the serving
//! scheduler, so rollouts of one step (and evaluations of several adaptations at once) share batches.

use std::collections::VecDeque;
use std::sync::Arc;

use indicatif::ProgressBar;
use t2_engine::{
    Adaptation, Engine, FinishReason, GenRequest, RouteDecision, RouteSpec, Scheduler,
    SchedulerConfig, Scored, SeqEvent, SeqHandle, Submission, SubmitError,
};
use t2_model::{ChatMessage, SamplingParams};

use crate::AdaptError;

/// One generated answer.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// The generated tokens, the end-of-sequence token included when the model chose to stop.
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: Option<FinishReason>,
    /// Pass 1's decision, for a routed job.
    pub decision: Option<RouteDecision>,
    /// The log-likelihood, for a scoring job.
    pub score: Option<Scored>,
}

/// One generation job: a tokenized prompt, the adaptation to run it with, and how to sample.
pub struct Job {
    pub prompt: Vec<u32>,
    pub adaptation: Adaptation,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Pass 1 to run first (its decision replaces `adaptation`).
    pub route: Option<RouteSpec>,
    /// Also score this continuation of the prompt while generating (see [`GenRequest::also_score`]).
    pub also_score: Vec<u32>,
}

pub struct Generator {
    engine: Arc<Engine>,
    scheduler: Arc<Scheduler>,
    /// Whether this generator started the scheduler (and so stops it when dropped).
    owned: bool,
    /// Jobs kept in the scheduler at once at most (None: as many as its queue takes).
    max_outstanding: Option<usize>,
}

/// KV memory an offline generator may hold. The prefix cache keeps every finished prompt's blocks until
/// the budget is full, so the budget is what the process grows to: counted in tokens alone (256 Ki), it
/// came to 12 GB on the default model and an evaluation beside other jobs was killed for memory.
const KV_BUDGET_BYTES: usize = 2 << 30;

fn kv_budget_tokens(engine: &Engine) -> usize {
    let model = &engine.loaded.model;
    let per_token = t2_model::kv::bytes_per_token(&model.cfg, model.dtype()).max(1);
    // Never so small that a batch of task prompts and answers (64 of about 500 positions) waits on it.
    (KV_BUDGET_BYTES / per_token).clamp(32 * 1024, 256 * 1024)
}

impl Generator {
    pub fn new(engine: Arc<Engine>, max_batch: usize) -> Self {
        let cfg = SchedulerConfig {
            max_batch,
            max_batched_tokens: 1024,
            // Nobody watches a rollout's tokens arrive: prefill takes the whole step.
            max_prefill_while_decoding: 1024,
            max_queue: max_batch * 2,
            kv_budget_tokens: kv_budget_tokens(&engine),
            // Rollout mixes change every step: merged weights would be built and thrown away.
            merge_after_steps: None,
            // Task prompts share their instructions, and loglik scoring its question across options.
            prefix_cache: true,
        };
        let scheduler = Arc::new(Scheduler::start(engine.clone(), cfg));
        Self {
            engine,
            scheduler,
            owned: true,
            max_outstanding: None,
        }
    }

    /// Keeps at most `n` jobs in the scheduler at once, leaving room for its other users.
    pub fn with_max_outstanding(mut self, n: usize) -> Self {
        self.max_outstanding = Some(n.max(1));
        self
    }

    /// Generates through a scheduler that others use too (a server's): jobs share its batches.
    pub fn shared(scheduler: Arc<Scheduler>) -> Self {
        Self {
            engine: scheduler.engine().clone(),
            scheduler,
            owned: false,
            max_outstanding: None,
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The chat template around one user message, tokenized: how every task prompt reaches the model.
    pub fn chat_prompt(&self, user: &str) -> Result<Vec<u32>, AdaptError> {
        Ok(self.engine.encode_chat(&[ChatMessage::new("user", user)])?)
    }

    /// Runs every job and returns the answers in job order. Jobs are queued as fast as the scheduler takes
    /// them; when its queue is full, the oldest outstanding answer is collected first.
    pub fn run(
        &self,
        jobs: Vec<Job>,
        progress: Option<&ProgressBar>,
    ) -> Result<Vec<Rollout>, AdaptError> {
        let n = jobs.len();
        let mut out: Vec<Option<Rollout>> = vec![None; n];
        let mut pending: VecDeque<Outstanding> = VecDeque::new();
        // The oldest outstanding answer, read to its end (there is always one when this is called).
        let collect_oldest = |pending: &mut VecDeque<Outstanding>,
                              out: &mut Vec<Option<Rollout>>|
         -> Result<(), AdaptError> {
            let o = pending.pop_front().expect("an answer is outstanding");
            out[o.job] = Some(collect(o.handle, o.scores)?);
            if let Some(p) = progress {
                p.inc(1);
            }
            Ok(())
        };
        for (i, job) in jobs.into_iter().enumerate() {
            if self.max_outstanding.is_some_and(|m| pending.len() >= m) {
                collect_oldest(&mut pending, &mut out)?;
            }
            let scores = !job.also_score.is_empty();
            let mut req = GenRequest::new(job.prompt, job.max_tokens, job.sampling);
            req.also_score = job.also_score;
            loop {
                let sub = Submission {
                    adaptation: job.adaptation.clone(),
                    requests: vec![req.clone()],
                    route: job.route.clone(),
                };
                match self.scheduler.submit(sub) {
                    Ok(mut handles) => {
                        pending.push_back(Outstanding {
                            job: i,
                            handle: handles.remove(0),
                            scores,
                        });
                        break;
                    }
                    Err(SubmitError::QueueFull(_)) => collect_oldest(&mut pending, &mut out)?,
                    Err(e) => return Err(AdaptError::Generate(e.to_string())),
                }
            }
        }
        while !pending.is_empty() {
            collect_oldest(&mut pending, &mut out)?;
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every job answered"))
            .collect())
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        if self.owned {
            self.scheduler.close();
            self.scheduler.join();
        }
    }
}

/// A job in the scheduler, and which results it ends with.
struct Outstanding {
    job: usize,
    handle: SeqHandle,
    scores: bool,
}

/// Reads one job's events to its end: the last token, and the score for a job that also scores, in
/// whichever order they come.
fn collect(mut h: SeqHandle, scores: bool) -> Result<Rollout, AdaptError> {
    let mut r = Rollout {
        tokens: Vec::new(),
        text: String::new(),
        finish: None,
        decision: None,
        score: None,
    };
    let (mut generated, mut scored) = (false, !scores);
    while let Some(ev) = h.events.blocking_recv() {
        match ev {
            SeqEvent::Admitted { .. } => {}
            SeqEvent::Routed(d) => r.decision = Some(d),
            SeqEvent::Scored(s) => {
                r.score = Some(s);
                scored = true;
            }
            SeqEvent::Token(t) => {
                r.tokens.push(t.token);
                r.text.push_str(&t.text);
                if t.finish.is_some() {
                    r.finish = t.finish;
                    generated = true;
                }
            }
            SeqEvent::Failed(why) => return Err(AdaptError::Generate(why.message)),
        }
        if generated && scored {
            break;
        }
    }
    Ok(r)
}
