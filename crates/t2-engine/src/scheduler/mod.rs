//! Continuous batching on a dedicated model thread.
//!
//! Submissions wait in a bounded queue. Between two batch steps the scheduler admits waiting submissions
//! while the batch has room (sequences, KV blocks, a mix-table slot), so new prompts prefill alongside
//! other sequences' decode steps; prefill is chunked to keep a step under `max_batched_tokens`. Each step
//! is decided here as a [`StepPlan`] (plain data: rows, tokens, KV blocks, mix slots) and executed by a
//! [`ModelRunner`], whose per-row results come back as tokens, scores and pass-1 label logits. A sequence
//! whose event receiver is gone (client disconnected, timed out) is dropped before the next step; what it
//! held (KV blocks, its mix slot) goes back as it is dropped. Nothing here blocks an async runtime:
//! callers only `try_send` into the queue and read tokens from bounded channels that can never fill
//! (each holds a whole answer).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use t2_model::BLOCK_SIZE;
use t2_svf::{Adaptation, MixId};
use tokio::sync::mpsc;

use crate::engine::{Engine, EngineError};
use crate::kv::BlockKvManager;
use crate::routing::{RouteDecision, RouteSpec};

mod worker;
use crate::gpu_runner::GpuRunner;
use crate::runner::{CpuRunner, ModelRunner};
use crate::sequence::{GenRequest, Scored, TokenEvent};
use worker::Worker;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Input tokens per batch step at most (prefill is chunked to fit).
    pub max_batched_tokens: usize,
    /// Prompt tokens a step takes at most while other rows are decoding: a step's length is every
    /// running stream's gap between two tokens, so prefill beside decode rows comes in smaller chunks.
    pub max_prefill_while_decoding: usize,
    /// Submissions waiting for admission at most; beyond it `submit` answers `QueueFull`.
    pub max_queue: usize,
    /// KV cache tokens reserved by running sequences at most (each reserves prompt + max_tokens).
    pub kv_budget_tokens: usize,
    /// Build merged weights for a mix once it has been the only mix of the batch for this many steps
    /// (None: never merge, always the factored path).
    pub merge_after_steps: Option<usize>,
    /// Keep prompts' full KV blocks for later prompts with the same prefix under the same weights.
    pub prefix_cache: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_batched_tokens: 512,
            max_prefill_while_decoding: 32,
            max_queue: 64,
            kv_budget_tokens: 64 * 1024,
            merge_after_steps: Some(512),
            prefix_cache: true,
        }
    }
}

/// What one client request asks for: one or more sequences (OpenAI's `n`) admitted together, all with
/// the same adaptation. With `route`, pass 1 runs first (one scored prefill in the shared batches) and its decision replaces
/// `adaptation`.
pub struct Submission {
    pub adaptation: Adaptation,
    pub requests: Vec<GenRequest>,
    pub route: Option<RouteSpec>,
}

impl Submission {
    pub fn new(adaptation: Adaptation, requests: Vec<GenRequest>) -> Self {
        Self {
            adaptation,
            requests,
            route: None,
        }
    }
}

#[derive(Debug)]
pub enum SeqEvent {
    /// Pass 1 decided the mix; pass 2 is queued next (sent before `Admitted`).
    Routed(RouteDecision),
    /// The sequence left the queue and joined the batch.
    Admitted {
        queue_time: Duration,
        mix: MixId,
        /// Batch steps run before this admission (orders admissions for tests and traces).
        step: u64,
    },
    Token(TokenEvent),
    /// A scoring sequence's result (its last event).
    Scored(Scored),
    /// The sequence was dropped; no more events follow.
    Failed(Failure),
}

/// Why the engine dropped a sequence, typed so that the server can answer with the right status.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The request cannot run as asked (a mix that would erase a matrix, an unknown expert).
    Invalid,
    /// Not now: every mix-table slot is held elsewhere.
    Unavailable,
    /// The engine failed (a batch step errored).
    Internal,
}

impl From<&EngineError> for Failure {
    fn from(e: &EngineError) -> Self {
        use t2_svf::SvfError as S;
        let kind = match e {
            EngineError::Invalid(_)
            | EngineError::NoSvf
            | EngineError::Svf(S::BadMix(_) | S::UnknownExpert { .. } | S::BadExpert { .. })
            | EngineError::Model(t2_model::ModelError::Invalid(_)) => FailureKind::Invalid,
            EngineError::Svf(S::TableFull(_)) => FailureKind::Unavailable,
            _ => FailureKind::Internal,
        };
        Self {
            kind,
            message: e.to_string(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The receiving end of one sequence's events. Dropping it cancels the sequence.
pub struct SeqHandle {
    pub events: mpsc::Receiver<SeqEvent>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full ({0} waiting); retry later")]
    QueueFull(usize),
    #[error("the server is shutting down")]
    ShutDown,
    #[error(transparent)]
    Invalid(#[from] EngineError),
}

/// Live counters, read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub queue_depth: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_used_tokens: AtomicUsize,
    pub kv_budget_tokens: AtomicUsize,
    pub steps: AtomicU64,
    pub cancelled: AtomicU64,
    /// Shared with the runner, which completes merges.
    pub merges: Arc<AtomicU64>,
    pub failed: AtomicU64,
    /// Pass-1 rows in the running batch.
    pub routing: AtomicUsize,
    /// Prompt tokens of admitted sequences that looked for a cached prefix, and those found.
    pub prefix_query_tokens: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    /// Positions held by the prefix cache (some of them read by running sequences).
    pub prefix_cached_tokens: AtomicUsize,
}

pub(crate) struct Queued {
    pub(crate) submission: Submission,
    pub(crate) senders: Vec<mpsc::Sender<SeqEvent>>,
    pub(crate) enqueued: Instant,
    /// Time spent waiting in earlier queues (before pass 1).
    pub(crate) waited: Duration,
}

impl Queued {
    pub(crate) fn cancelled(&self) -> bool {
        self.senders.iter().all(|s| s.is_closed())
    }

    /// Batch rows the next admission of this submission takes.
    pub(crate) fn rows(&self) -> usize {
        match &self.submission.route {
            Some(_) => 1,
            None => self.submission.requests.len(),
        }
    }
}

pub struct Scheduler {
    tx: Mutex<Option<SyncSender<Queued>>>,
    stats: Arc<SchedulerStats>,
    cfg: SchedulerConfig,
    engine: Arc<Engine>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Scheduler {
    /// A scheduler whose steps run on the runner for the model's device (the GPU runner on CUDA, else the
    /// CPU runner), with KV storage for `kv_budget_tokens`.
    pub fn start(engine: Arc<Engine>, cfg: SchedulerConfig) -> Self {
        let merges = Arc::new(AtomicU64::new(0));
        let blocks = Self::kv_blocks(&cfg);
        let runner: Box<dyn ModelRunner> = if engine.loaded.model.device().is_cuda() {
            Box::new(
                GpuRunner::new(engine.clone(), blocks, merges.clone())
                    .expect("allocate the KV pool on the GPU"),
            )
        } else {
            Box::new(
                CpuRunner::new(engine.clone(), blocks, merges.clone())
                    .expect("allocate the KV pool"),
            )
        };
        Self::with_runner(engine, cfg, runner, merges)
    }

    /// KV blocks the budget allows.
    pub fn kv_blocks(cfg: &SchedulerConfig) -> usize {
        (cfg.kv_budget_tokens / BLOCK_SIZE).max(1)
    }

    /// A scheduler whose steps run on `runner` (which holds storage for [`Self::kv_blocks`] blocks and
    /// counts completed merges in `merges`).
    pub fn with_runner(
        engine: Arc<Engine>,
        cfg: SchedulerConfig,
        runner: Box<dyn ModelRunner>,
        merges: Arc<AtomicU64>,
    ) -> Self {
        // The depth counter enforces max_queue; the channel only needs to be at least that large.
        let (tx, rx) = sync_channel(cfg.max_queue.max(1) + 1);
        let stats = Arc::new(SchedulerStats {
            merges,
            ..Default::default()
        });
        let kv = BlockKvManager::new(Self::kv_blocks(&cfg));
        stats
            .kv_budget_tokens
            .store(kv.total() * BLOCK_SIZE, Ordering::Relaxed);
        let mut worker = Worker::new(engine.clone(), runner, kv, cfg.clone(), stats.clone(), rx);
        let thread = std::thread::Builder::new()
            .name("t2-model".into())
            .spawn(move || worker.run())
            .expect("spawn the model thread");
        Self {
            tx: Mutex::new(Some(tx)),
            stats,
            cfg,
            engine,
            thread: Mutex::new(Some(thread)),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Arc<SchedulerStats> {
        &self.stats
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Queues a submission, or refuses it at once (invalid, queue full, shutting down). Never blocks.
    pub fn submit(&self, s: Submission) -> Result<Vec<SeqHandle>, SubmitError> {
        if s.requests.is_empty() {
            return Err(EngineError::Invalid("no sequences requested".into()).into());
        }
        for r in &s.requests {
            self.engine.check_request(r)?;
        }
        match &s.route {
            Some(r) => {
                self.engine.check_adaptation(&r.scorer)?;
                let ctx = self.engine.context_length();
                if r.prompt.len() + 1 > ctx {
                    return Err(EngineError::Invalid(format!(
                        "the pass-1 prompt ({} tokens) exceeds the context of {ctx} tokens",
                        r.prompt.len()
                    ))
                    .into());
                }
            }
            None => self.engine.check_adaptation(&s.adaptation)?,
        }
        // KV is handed out in whole blocks: the check is in blocks, the message in tokens.
        let need: usize = s.requests.iter().map(GenRequest::total_kv_tokens).sum();
        let blocks: usize = s
            .requests
            .iter()
            .map(|r| r.kv_blocks() + r.fork_blocks())
            .sum();
        let have = Self::kv_blocks(&self.cfg);
        if blocks > have {
            return Err(EngineError::Invalid(format!(
                "the request needs {need} tokens of KV cache (prompt + max_tokens, times n), over the \
                 server's budget of {}",
                have * BLOCK_SIZE
            ))
            .into());
        }
        let Some(tx) = self.tx.lock().unwrap().clone() else {
            return Err(SubmitError::ShutDown);
        };
        let (senders, handles): (Vec<_>, Vec<_>) = s
            .requests
            .iter()
            .map(|r| {
                // Routed + Admitted + every token + a score + a failure from each of the sequence and its
                // scoring fork: the channel can never be full, so the model thread never waits on a slow
                // reader.
                let (stx, srx) = mpsc::channel(r.max_tokens + 5);
                (stx, SeqHandle { events: srx })
            })
            .unzip();
        let depth = &self.stats.queue_depth;
        if depth.fetch_add(1, Ordering::SeqCst) >= self.cfg.max_queue.max(1) {
            depth.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(self.cfg.max_queue));
        }
        let queued = Queued {
            submission: s,
            senders,
            enqueued: Instant::now(),
            waited: Duration::ZERO,
        };
        match tx.try_send(queued) {
            Ok(()) => Ok(handles),
            Err(e) => {
                self.stats.queue_depth.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull(self.cfg.max_queue),
                    TrySendError::Disconnected(_) => SubmitError::ShutDown,
                })
            }
        }
    }

    /// Stops taking submissions; the model thread finishes what is queued and running, then exits.
    pub fn close(&self) {
        self.tx.lock().unwrap().take();
    }

    /// Closes and waits for the model thread to finish (blocking).
    pub fn join(&self) {
        self.close();
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.close();
    }
}
