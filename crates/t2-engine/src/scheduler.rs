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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use t2_model::BLOCK_SIZE;
use t2_svf::{Adaptation, MixId, MixKey, MixLease, SvfError, BASE_MIX};
use tokio::sync::mpsc;

use crate::engine::{Engine, EngineError};
use crate::kv::{BlockKvManager, KvLease};
use crate::plan::{split_budget, Pending, RowOutput, RowPlan, SeqId, StepPlan};
use crate::routing::{RouteDecision, RouteSpec};
use crate::runner::{CpuRunner, ModelRunner};
use crate::sequence::{GenRequest, Scored, Sequence, TokenEvent};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Input tokens per batch step at most (prefill is chunked to fit).
    pub max_batched_tokens: usize,
    /// Submissions waiting for admission at most; beyond it `submit` answers `QueueFull`.
    pub max_queue: usize,
    /// KV cache tokens reserved by running sequences at most (each reserves prompt + max_tokens).
    pub kv_budget_tokens: usize,
    /// Build merged weights for a mix once it has been the only mix of the batch for this many steps
    /// (None: never merge, always the factored path).
    pub merge_after_steps: Option<usize>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_batched_tokens: 512,
            max_queue: 64,
            kv_budget_tokens: 64 * 1024,
            merge_after_steps: Some(512),
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
}

struct Queued {
    submission: Submission,
    senders: Vec<mpsc::Sender<SeqEvent>>,
    enqueued: Instant,
    /// Time spent waiting in earlier queues (before pass 1).
    waited: Duration,
}

impl Queued {
    fn cancelled(&self) -> bool {
        self.senders.iter().all(|s| s.is_closed())
    }

    /// Batch rows the next admission of this submission takes.
    fn rows(&self) -> usize {
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
    /// A scheduler whose steps run on the CPU runner, with KV storage for `kv_budget_tokens`.
    pub fn start(engine: Arc<Engine>, cfg: SchedulerConfig) -> Self {
        let merges = Arc::new(AtomicU64::new(0));
        let runner = CpuRunner::new(engine.clone(), Self::kv_blocks(&cfg), merges.clone())
            .expect("allocate the KV pool");
        Self::with_runner(engine, cfg, Box::new(runner), merges)
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
        let mut worker = Worker {
            engine: engine.clone(),
            runner,
            kv,
            cfg: cfg.clone(),
            stats: stats.clone(),
            rx,
            waiting: VecDeque::new(),
            ready: VecDeque::new(),
            prefixes: HashMap::new(),
            running: Vec::new(),
            next_id: 0,
            ended: Vec::new(),
            uniform_steps: 0,
        };
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

struct Running {
    seq: Sequence,
    role: Role,
}

enum Role {
    /// A sequence of an answer: its tokens go to `tx`.
    Answer(mpsc::Sender<SeqEvent>),
    /// Pass 1 of a submission, whose answers are admitted once it decides.
    Pass1 {
        queued: Box<Queued>,
        started: Instant,
    },
}

impl Running {
    fn cancelled(&self) -> bool {
        match &self.role {
            Role::Answer(tx) => tx.is_closed(),
            Role::Pass1 { queued, .. } => queued.cancelled(),
        }
    }

    fn fail(&self, why: &Failure) {
        let send = |tx: &mpsc::Sender<SeqEvent>| {
            let _ = tx.try_send(SeqEvent::Failed(why.clone()));
        };
        match &self.role {
            Role::Answer(tx) => send(tx),
            Role::Pass1 { queued, .. } => queued.senders.iter().for_each(send),
        }
    }

    /// Sequences this row stands for (a pass-1 row stands for all of its submission's).
    fn sequences(&self) -> u64 {
        match &self.role {
            Role::Answer(_) => 1,
            Role::Pass1 { queued, .. } => queued.senders.len() as u64,
        }
    }
}

enum Acquire {
    Got(MixLease),
    /// Every slot is held by a running sequence: wait for one to finish.
    Full,
    Failed(EngineError),
}

/// Why a waiting submission stays waiting.
enum Admission {
    /// The batch or the KV pool has no room for it: nothing after it is admitted either (first come,
    /// first served).
    NoRoom,
    /// Its mix has no table slot yet: later submissions may go ahead.
    NoMixSlot,
}

/// Pass-1 prefixes kept at most (one per scorer and label set in practice).
const MAX_PREFIXES: usize = 8;

struct Worker {
    engine: Arc<Engine>,
    runner: Box<dyn ModelRunner>,
    kv: BlockKvManager,
    cfg: SchedulerConfig,
    stats: Arc<SchedulerStats>,
    rx: Receiver<Queued>,
    /// Submissions taken off the channel, in arrival order (bounded by `max_queue` through the depth
    /// counter).
    waiting: VecDeque<Queued>,
    /// Submissions whose pass 1 has decided: admitted before anything new, so that pass 2 starts at once.
    ready: VecDeque<Queued>,
    /// The full KV blocks of pass-1 prompt prefixes (the part before the request), by scorer and tokens.
    prefixes: HashMap<(MixKey, Vec<u32>), KvLease>,
    running: Vec<Running>,
    next_id: SeqId,
    /// Sequences gone since the last step, for the runner to forget.
    ended: Vec<SeqId>,
    /// Consecutive steps in which every row used the same non-base mix.
    uniform_steps: usize,
}

impl Worker {
    fn run(&mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() && self.ready.is_empty() {
                match self.rx.recv() {
                    Ok(q) => self.waiting.push_back(q),
                    Err(_) => break, // closed, and nothing left to do
                }
            }
            self.admit();
            self.drop_cancelled();
            if self.running.is_empty() {
                // The last sequences may just have been cancelled: the gauges must say so before
                // this thread blocks waiting for work.
                self.publish();
                continue;
            }
            if let Err(e) = self.step() {
                tracing::error!(error = %e, "batch step failed; dropping its sequences");
                let why = Failure {
                    kind: FailureKind::Internal,
                    message: e.to_string(),
                };
                for r in std::mem::take(&mut self.running) {
                    r.fail(&why);
                    self.stats
                        .failed
                        .fetch_add(r.sequences(), Ordering::Relaxed);
                    self.ended.push(r.seq.id);
                }
            }
            self.publish();
        }
    }

    fn next_id(&mut self) -> SeqId {
        self.next_id += 1;
        self.next_id
    }

    /// Moves waiting submissions into the batch while they fit: first those whose pass 1 has decided,
    /// then the rest in arrival order. One whose mix has no table slot yet waits without holding up
    /// those behind it.
    fn admit(&mut self) {
        while let Ok(q) = self.rx.try_recv() {
            self.waiting.push_back(q);
        }
        for from_ready in [true, false] {
            let mut i = 0;
            loop {
                let list = if from_ready {
                    &mut self.ready
                } else {
                    &mut self.waiting
                };
                let Some(q) = list.remove(i) else { break };
                match self.try_admit(q) {
                    Ok(()) => {
                        if !from_ready {
                            self.stats.queue_depth.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    Err((why, q)) => {
                        let list = if from_ready {
                            &mut self.ready
                        } else {
                            &mut self.waiting
                        };
                        list.insert(i, *q);
                        match why {
                            Admission::NoRoom => return,
                            Admission::NoMixSlot => i += 1,
                        }
                    }
                }
            }
        }
    }

    /// Admits one submission (or drops it: cancelled, failed); hands it back when it has to wait.
    fn try_admit(&mut self, mut q: Queued) -> Result<(), (Admission, Box<Queued>)> {
        if q.cancelled() {
            self.stats
                .cancelled
                .fetch_add(q.senders.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        let rows = q.rows();
        if self.running.len() + rows > self.cfg.max_batch.max(rows) {
            return Err((Admission::NoRoom, Box::new(q)));
        }
        // KV first: when it does not fit, the mix table is left alone.
        let Some(kv) = self.allocate(&q) else {
            return Err((Admission::NoRoom, Box::new(q)));
        };
        let adaptation = match &q.submission.route {
            Some(r) => r.scorer.clone(),
            None => q.submission.adaptation.clone(),
        };
        let mix = match self.acquire(&adaptation) {
            Acquire::Got(lease) => lease,
            Acquire::Full => return Err((Admission::NoMixSlot, Box::new(q))),
            Acquire::Failed(e) => {
                for s in q.senders {
                    let _ = s.try_send(SeqEvent::Failed(Failure::from(&e)));
                }
                return Ok(());
            }
        };
        let mut kv = kv.into_iter();
        if let Some(route) = &q.submission.route {
            let seq = Sequence::pass1(
                self.next_id(),
                route.prompt.clone(),
                mix,
                kv.next().expect("pass 1 has its KV").0,
                route.label_tokens(),
            );
            q.waited += q.enqueued.elapsed();
            self.running.push(Running {
                seq,
                role: Role::Pass1 {
                    queued: Box::new(q),
                    started: Instant::now(),
                },
            });
            return Ok(());
        }
        let queue_time = q.waited + q.enqueued.elapsed();
        let step = self.stats.steps.load(Ordering::Relaxed);
        for ((req, tx), (kv, fork_kv)) in q.submission.requests.into_iter().zip(q.senders).zip(kv) {
            let seq = Sequence::new(self.next_id(), req, mix.clone(), kv, fork_kv);
            let _ = tx.try_send(SeqEvent::Admitted {
                queue_time,
                mix: mix.id(),
                step,
            });
            self.running.push(Running {
                seq,
                role: Role::Answer(tx),
            });
        }
        Ok(())
    }

    /// The KV of every sequence a submission admits now (and of their scoring forks), or None when the
    /// pool has too few free blocks for all of it.
    fn allocate(&self, q: &Queued) -> Option<Vec<(KvLease, Option<KvLease>)>> {
        if let Some(route) = &q.submission.route {
            let positions = route.prompt.len();
            let kv = match self.prefix_key(route).and_then(|k| self.prefixes.get(&k)) {
                Some(prefix) => self
                    .kv
                    .with_prefix(prefix, route.shared_prefix, positions)?,
                None => self.kv.allocate(positions)?,
            };
            return Some(vec![(kv, None)]);
        }
        let need: usize = q
            .submission
            .requests
            .iter()
            .map(|r| r.kv_blocks() + r.fork_blocks())
            .sum();
        if need > self.kv.free() {
            return None;
        }
        q.submission
            .requests
            .iter()
            .map(|r| {
                let kv = self.kv.allocate(r.kv_tokens())?;
                let fork = match r.fork_blocks() {
                    0 => None,
                    n => Some(self.kv.allocate(n * BLOCK_SIZE)?),
                };
                Some((kv, fork))
            })
            .collect()
    }

    fn drop_cancelled(&mut self) {
        let mut gone = 0;
        let ended = &mut self.ended;
        self.running.retain(|r| {
            let keep = !r.cancelled();
            if !keep {
                gone += r.sequences();
                ended.push(r.seq.id);
            }
            keep
        });
        if gone > 0 {
            self.stats.cancelled.fetch_add(gone, Ordering::Relaxed);
        }
    }

    /// A lease on the adaptation's mix slot. The table evicts idle mixes by itself; when every slot is
    /// held, the submission waits for a running sequence to let go of one.
    fn acquire(&mut self, a: &Adaptation) -> Acquire {
        match self.engine.lease(a) {
            Ok(lease) => Acquire::Got(lease),
            Err(EngineError::Svf(SvfError::TableFull(n))) => {
                if self.running.is_empty() {
                    // Nothing here will free a slot: the table is too small, or held elsewhere.
                    return Acquire::Failed(EngineError::Svf(SvfError::TableFull(n)));
                }
                Acquire::Full
            }
            Err(e) => Acquire::Failed(e),
        }
    }

    /// A mix that has had the batch to itself for `merge_after_steps` steps gets merged weights, so that
    /// its steps become plain dense products.
    fn merge_decision(&mut self) -> Option<MixId> {
        let after = self.cfg.merge_after_steps?;
        let svf = self.engine.svf.as_ref()?;
        let first = self.running.first()?.seq.mix.id();
        let uniform = first != BASE_MIX && self.running.iter().all(|r| r.seq.mix.id() == first);
        self.uniform_steps = if uniform { self.uniform_steps + 1 } else { 0 };
        (self.uniform_steps >= after && !svf.is_merged(first)).then_some(first)
    }

    /// Decides the next step: every running sequence feeds its next input (decode: one token; prefill: a
    /// chunk within the step's token budget).
    fn plan(&mut self) -> (StepPlan, Vec<usize>) {
        let pending: Vec<Pending> = self
            .running
            .iter()
            .map(|r| Pending {
                prefilling: r.seq.is_prefilling(),
                remaining: r.seq.prompt_len().saturating_sub(r.seq.kv.len()),
            })
            .collect();
        let split = split_budget(&pending, self.cfg.max_batched_tokens);
        let mut plan = StepPlan {
            ended: std::mem::take(&mut self.ended),
            merge: self.merge_decision(),
            ..Default::default()
        };
        let mut stepping = Vec::with_capacity(self.running.len());
        for (i, (r, n)) in self.running.iter_mut().zip(split).enumerate() {
            if n == 0 {
                continue;
            }
            if let Some(p) = r.seq.take_sampling() {
                plan.started.push((r.seq.id, p));
            }
            let feed = r.seq.row(n);
            plan.rows.push(RowPlan {
                seq: r.seq.id,
                tokens: feed.tokens,
                kv: r.seq.kv.kv().clone(),
                mix: r.seq.mix.id(),
                task: feed.task,
            });
            stepping.push(i);
        }
        (plan, stepping)
    }

    /// One batch step: plan, execute, and hand each row's result to its sequence.
    fn step(&mut self) -> Result<(), EngineError> {
        let (plan, stepping) = self.plan();
        let outputs = self.runner.execute(&plan)?;
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let mut finished = Vec::new();
        let mut decided = Vec::new();
        let mut forks = Vec::new();
        for ((i, row), out) in stepping.into_iter().zip(&plan.rows).zip(outputs) {
            let r = &mut self.running[i];
            r.seq.fed(row.tokens.len());
            match (out, &r.role) {
                (RowOutput::Fed, _) => {}
                (RowOutput::Scored { logprob, tokens }, Role::Answer(tx)) => {
                    if let Some(scored) = r.seq.on_score(logprob, tokens) {
                        let _ = tx.try_send(SeqEvent::Scored(scored));
                        finished.push(i);
                    }
                }
                (RowOutput::Sampled { token, logprob }, Role::Answer(tx)) => {
                    if let Some((req, kv, mix)) = r.seq.take_scoring_fork() {
                        forks.push((req, kv, mix, tx.clone()));
                    }
                    let event = r
                        .seq
                        .on_token(&self.engine.loaded.tokenizer, token, logprob)?;
                    let done = event.finish.is_some();
                    if tx.try_send(SeqEvent::Token(event)).is_err() || done {
                        finished.push(i);
                    }
                }
                (RowOutput::Picked(logits), Role::Pass1 { queued, started }) => {
                    let route = queued.submission.route.as_ref().expect("a pass-1 row");
                    decided.push((i, route.decide(&logits, started.elapsed())));
                }
                (out, _) => {
                    return Err(EngineError::Invalid(format!(
                        "the runner answered a row with {out:?}, which its sequence did not ask for"
                    )))
                }
            }
        }
        // Both lists are in increasing row order; remove from the highest row down.
        let mut done: Vec<(usize, Option<crate::engine::Result<RouteDecision>>)> = finished
            .into_iter()
            .map(|i| (i, None))
            .chain(decided.into_iter().map(|(i, d)| (i, Some(d))))
            .collect();
        done.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, decision) in done {
            let r = self.running.swap_remove(i);
            self.ended.push(r.seq.id);
            match (decision, r.role) {
                (None, Role::Answer(_)) => {
                    if r.seq.finish.is_none() {
                        self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                (Some(decision), Role::Pass1 { queued, .. }) => {
                    self.on_decided(&r.seq, *queued, decision)
                }
                _ => unreachable!("rows are finished by their own role"),
            }
        }
        // Forks join after the removals above, which index the rows as they were in this step.
        for (req, kv, mix, tx) in forks {
            let seq = Sequence::new(self.next_id(), req, mix, kv, None);
            self.running.push(Running {
                seq,
                role: Role::Answer(tx),
            });
        }
        Ok(())
    }

    /// Pass 1 decided: keep its prompt prefix's KV for the next pass 1 of the same scorer, tell every
    /// sequence of the submission, and queue pass 2 first in line with the decided mix.
    fn on_decided(
        &mut self,
        pass1: &Sequence,
        mut queued: Queued,
        decision: crate::engine::Result<RouteDecision>,
    ) {
        let d = match decision {
            Ok(d) => d,
            Err(e) => {
                for s in &queued.senders {
                    let _ = s.try_send(SeqEvent::Failed(Failure::from(&e)));
                }
                return;
            }
        };
        let route = queued.submission.route.as_ref().expect("a pass-1 row");
        if let Some(key) = self.prefix_key(route) {
            let full = route.shared_prefix / BLOCK_SIZE;
            if full > 0 && !self.prefixes.contains_key(&key) {
                if self.prefixes.len() >= MAX_PREFIXES {
                    self.prefixes.clear();
                }
                self.prefixes.insert(key, pass1.kv.share(full));
            }
        }
        for s in &queued.senders {
            let _ = s.try_send(SeqEvent::Routed(d.clone()));
        }
        queued.submission.adaptation = Adaptation::Mix(d.mix);
        queued.submission.route = None;
        queued.enqueued = Instant::now();
        self.ready.push_back(queued);
    }

    fn publish(&self) {
        let routing = self
            .running
            .iter()
            .filter(|r| matches!(r.role, Role::Pass1 { .. }))
            .count();
        self.stats.routing.store(routing, Ordering::Relaxed);
        self.stats
            .running
            .store(self.running.len() - routing, Ordering::Relaxed);
        self.stats
            .kv_used_tokens
            .store(self.kv.used() * BLOCK_SIZE, Ordering::Relaxed);
    }

    /// The weights a pass-1 prefix was computed with, and its tokens (None: not shareable).
    fn prefix_key(&self, route: &RouteSpec) -> Option<(MixKey, Vec<u32>)> {
        let weights = match &route.scorer {
            Adaptation::Mix(m) if m.is_base() => MixKey::base(),
            Adaptation::Mix(m) => self.engine.experts.as_ref()?.key_of(m).ok()?,
            Adaptation::Vectors(_) => return None,
        };
        Some((weights, route.prompt[..route.shared_prefix].to_vec()))
    }
}
