//! Continuous batching on a dedicated model thread.
//!
//! Submissions wait in a bounded queue. Between two batch steps the scheduler admits waiting submissions
//! while the batch has room (sequences, KV budget, mix table), so new prompts prefill alongside other
//! sequences' decode steps; prefill is chunked to keep a step under `max_batched_tokens`. Every row carries
//! its own mix id. A sequence whose event receiver is gone (client disconnected, timed out) is dropped
//! before the next step. Nothing here blocks an async runtime: callers only `try_send` into the queue and
//! read tokens from bounded channels that can never fill (each holds a whole answer).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use t2_model::{KvCache, SeqStep};
use t2_svf::{Adaptation, MixId, MixKey, MixLease, SvfError, BASE_MIX};
use tokio::sync::mpsc;

use crate::engine::{Engine, EngineError};
use crate::routing::{RouteDecision, RouteSpec};
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
    /// The sequence was dropped by an engine error; no more events follow.
    Failed(String),
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
    pub merges: AtomicU64,
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

    /// KV tokens and batch rows the next admission of this submission takes.
    fn needs(&self) -> (usize, usize) {
        match &self.submission.route {
            Some(r) => (r.prompt.len() + 1, 1),
            None => (
                self.submission
                    .requests
                    .iter()
                    .map(GenRequest::total_kv_tokens)
                    .sum(),
                self.submission.requests.len(),
            ),
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
    pub fn start(engine: Arc<Engine>, cfg: SchedulerConfig) -> Self {
        // The depth counter enforces max_queue (it also counts the one submission the worker holds aside);
        // the channel only needs to be at least that large.
        let (tx, rx) = sync_channel(cfg.max_queue.max(1) + 1);
        let stats = Arc::new(SchedulerStats::default());
        stats
            .kv_budget_tokens
            .store(cfg.kv_budget_tokens, Ordering::Relaxed);
        let mut worker = Worker {
            engine: engine.clone(),
            cfg: cfg.clone(),
            stats: stats.clone(),
            rx,
            waiting: VecDeque::new(),
            ready: VecDeque::new(),
            prefixes: HashMap::new(),
            running: Vec::new(),
            uniform_steps: 0,
            merging: None,
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
        let need: usize = s.requests.iter().map(GenRequest::total_kv_tokens).sum();
        if need > self.cfg.kv_budget_tokens {
            return Err(EngineError::Invalid(format!(
                "the request needs {need} tokens of KV cache (prompt + max_tokens, times n), over the \
                 server's budget of {}",
                self.cfg.kv_budget_tokens
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
    kv_tokens: usize,
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

    fn fail(&self, msg: &str) {
        let send = |tx: &mpsc::Sender<SeqEvent>| {
            let _ = tx.try_send(SeqEvent::Failed(msg.to_string()));
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

/// Why the admission loop stopped looking at a waiting submission.
enum Admission {
    /// It joined the batch, failed, or was cancelled: it no longer waits.
    Left,
    /// The batch or the KV budget has no room for it: nothing after it is admitted either (first come,
    /// first served).
    NoRoom,
    /// Its mix has no table slot yet: later submissions may go ahead.
    NoMixSlot,
}

struct Worker {
    engine: Arc<Engine>,
    cfg: SchedulerConfig,
    stats: Arc<SchedulerStats>,
    rx: Receiver<Queued>,
    /// Submissions taken off the channel, in arrival order (bounded by `max_queue` through the depth
    /// counter).
    waiting: VecDeque<Queued>,
    /// Submissions whose pass 1 has decided: admitted before anything new, so that pass 2 starts at once.
    ready: VecDeque<Queued>,
    /// KV of pass-1 prompt prefixes (the part before the request), by scorer and tokens.
    prefixes: HashMap<(MixKey, Vec<u32>), KvCache>,
    running: Vec<Running>,
    /// Consecutive steps in which every row used the same non-base mix.
    uniform_steps: usize,
    merging: Option<(MixId, JoinHandle<()>)>,
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
            self.maybe_merge();
            if let Err(e) = self.step() {
                tracing::error!(error = %e, "batch step failed; dropping its sequences");
                let msg = e.to_string();
                for r in std::mem::take(&mut self.running) {
                    r.fail(&msg);
                    self.stats
                        .failed
                        .fetch_add(r.sequences(), Ordering::Relaxed);
                }
            }
            self.publish();
        }
        if let Some((_, h)) = self.merging.take() {
            let _ = h.join();
        }
    }

    fn kv_used(&self) -> usize {
        self.running.iter().map(|r| r.kv_tokens).sum()
    }

    /// Moves waiting submissions into the batch while they fit: first those whose pass 1 has decided,
    /// then the rest in arrival order. One whose mix has no table slot yet waits without holding up
    /// those behind it.
    fn admit(&mut self) {
        while let Ok(q) = self.rx.try_recv() {
            self.waiting.push_back(q);
        }
        let mut i = 0;
        while i < self.ready.len() {
            let q = self.ready.remove(i).expect("in range");
            match self.try_admit(q) {
                (Admission::Left, _) => {}
                (Admission::NoRoom, Some(q)) => {
                    self.ready.insert(i, q);
                    return;
                }
                (_, Some(q)) => {
                    self.ready.insert(i, q);
                    i += 1;
                }
                (_, None) => unreachable!("a submission that still waits is handed back"),
            }
        }
        let mut i = 0;
        while i < self.waiting.len() {
            let q = self.waiting.remove(i).expect("in range");
            match self.try_admit(q) {
                (Admission::Left, _) => {
                    self.stats.queue_depth.fetch_sub(1, Ordering::SeqCst);
                }
                (Admission::NoRoom, Some(q)) => {
                    self.waiting.insert(i, q);
                    return;
                }
                (_, Some(q)) => {
                    self.waiting.insert(i, q);
                    i += 1;
                }
                (_, None) => unreachable!("a submission that still waits is handed back"),
            }
        }
    }

    /// Admits one submission if it can be; hands it back when it has to wait.
    fn try_admit(&mut self, mut q: Queued) -> (Admission, Option<Queued>) {
        if q.cancelled() {
            self.stats
                .cancelled
                .fetch_add(q.senders.len() as u64, Ordering::Relaxed);
            return (Admission::Left, None);
        }
        let (need, rows) = q.needs();
        let fits = self.running.len() + rows <= self.cfg.max_batch.max(rows)
            && self.kv_used() + need <= self.cfg.kv_budget_tokens;
        if !fits {
            return (Admission::NoRoom, Some(q));
        }
        let adaptation = match &q.submission.route {
            Some(r) => r.scorer.clone(),
            None => q.submission.adaptation.clone(),
        };
        let mix = match self.acquire(&adaptation) {
            Acquire::Got(lease) => lease,
            Acquire::Full => return (Admission::NoMixSlot, Some(q)),
            Acquire::Failed(e) => {
                for s in q.senders {
                    let _ = s.try_send(SeqEvent::Failed(e.to_string()));
                }
                return (Admission::Left, None);
            }
        };
        if let Some(route) = &q.submission.route {
            let req = GenRequest {
                prompt: route.prompt.clone(),
                max_tokens: 1,
                sampling: Default::default(),
                stop: Vec::new(),
                ignore_eos: true,
                score_from: None,
                also_score: Vec::new(),
            };
            let prefix = self.prefix_key(route).and_then(|k| self.prefixes.get(&k));
            let seq = match prefix {
                Some(kv) => Sequence::with_prefix(req, mix, kv, route.shared_prefix),
                None => Sequence::new(&self.engine, req, mix),
            };
            match seq {
                Ok(seq) => {
                    q.waited += q.enqueued.elapsed();
                    self.running.push(Running {
                        seq,
                        kv_tokens: need,
                        role: Role::Pass1 {
                            queued: Box::new(q),
                            started: Instant::now(),
                        },
                    });
                }
                Err(e) => {
                    for s in q.senders {
                        let _ = s.try_send(SeqEvent::Failed(e.to_string()));
                    }
                }
            }
            return (Admission::Left, None);
        }
        let queue_time = q.waited + q.enqueued.elapsed();
        let step = self.stats.steps.load(Ordering::Relaxed);
        for (req, tx) in q.submission.requests.into_iter().zip(q.senders) {
            // The scoring fork's share moves to its own row when it starts.
            let kv_tokens = req.total_kv_tokens();
            match Sequence::new(&self.engine, req, mix.clone()) {
                Ok(seq) => {
                    let _ = tx.try_send(SeqEvent::Admitted {
                        queue_time,
                        mix: mix.id(),
                        step,
                    });
                    self.running.push(Running {
                        seq,
                        role: Role::Answer(tx),
                        kv_tokens,
                    });
                }
                Err(e) => {
                    let _ = tx.try_send(SeqEvent::Failed(e.to_string()));
                }
            }
        }
        (Admission::Left, None)
    }

    fn drop_cancelled(&mut self) {
        let before = self.running.len();
        let mut gone = 0;
        self.running.retain(|r| {
            let keep = !r.cancelled();
            if !keep {
                gone += r.sequences();
            }
            keep
        });
        if self.running.len() < before {
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

    /// Starts building merged weights (on a helper thread) for a mix that has had the batch to itself
    /// for a while, so that its steps become plain dense products.
    fn maybe_merge(&mut self) {
        let Some(after) = self.cfg.merge_after_steps else {
            return;
        };
        let Some(svf) = &self.engine.svf else {
            return;
        };
        if let Some((_, h)) = &self.merging {
            if !h.is_finished() {
                return;
            }
            let (_, h) = self.merging.take().expect("present");
            let _ = h.join();
        }
        let first = self.running[0].seq.mix.id();
        let uniform = first != BASE_MIX && self.running.iter().all(|r| r.seq.mix.id() == first);
        self.uniform_steps = if uniform { self.uniform_steps + 1 } else { 0 };
        if self.uniform_steps < after || svf.is_merged(first) {
            return;
        }
        let engine = self.engine.clone();
        let stats = self.stats.clone();
        let handle = std::thread::Builder::new()
            .name("t2-merge".into())
            .spawn(move || {
                let svf = engine.svf.as_ref().expect("checked");
                match svf.merge(first) {
                    Ok(()) => {
                        stats.merges.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(error = %e, "merging a mix failed; staying factored"),
                }
            });
        match handle {
            Ok(h) => self.merging = Some((first, h)),
            Err(e) => tracing::warn!(error = %e, "could not start a merge thread"),
        }
    }

    /// One batch step: every running sequence feeds its next input (decode: one token; prefill: a chunk
    /// within the step's token budget) and those with a complete prompt sample a token.
    fn step(&mut self) -> Result<(), EngineError> {
        let decoding = self
            .running
            .iter()
            .filter(|r| !r.seq.is_prefilling())
            .count();
        // Decode rows first, then prompt chunks in admission order; a prompt always gets some room so that
        // a full decode batch cannot starve newcomers.
        let mut budget = self.cfg.max_batched_tokens.saturating_sub(decoding).max(16);
        let mut stepping = Vec::with_capacity(self.running.len());
        let mut steps: Vec<SeqStep<'_>> = Vec::with_capacity(self.running.len());
        for (i, r) in self.running.iter_mut().enumerate() {
            if r.seq.is_prefilling() {
                if budget == 0 {
                    continue;
                }
                let step = r.seq.step(budget);
                budget -= step.tokens.len();
                steps.push(step);
            } else {
                steps.push(r.seq.step(1));
            }
            stepping.push(i);
        }
        let logits = self
            .engine
            .loaded
            .model
            .forward(&mut steps, self.engine.projector())?;
        drop(steps);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let mut finished = Vec::new();
        let mut decided = Vec::new();
        let mut forks = Vec::new();
        for (i, logits) in stepping.into_iter().zip(logits) {
            let r = &mut self.running[i];
            r.seq.fed();
            let Some(logits) = logits else {
                continue; // a prompt chunk that is not the last
            };
            if r.seq.is_scoring() {
                if let (Some(scored), Role::Answer(tx)) = (r.seq.on_score_logits(&logits)?, &r.role)
                {
                    let _ = tx.try_send(SeqEvent::Scored(scored));
                    finished.push(i);
                }
                continue;
            }
            let logits = logits.to_vec1::<f32>()?;
            match &r.role {
                Role::Answer(tx) => {
                    match r.seq.take_scoring_fork() {
                        Ok(Some((seq, kv_tokens))) => {
                            r.kv_tokens -= kv_tokens;
                            forks.push(Running {
                                seq,
                                role: Role::Answer(tx.clone()),
                                kv_tokens,
                            });
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let _ = tx.try_send(SeqEvent::Failed(e.to_string()));
                            finished.push(i);
                            continue;
                        }
                    }
                    let event = r.seq.on_logits(&self.engine, &logits)?;
                    let done = event.finish.is_some();
                    if tx.try_send(SeqEvent::Token(event)).is_err() || done {
                        finished.push(i);
                    }
                }
                Role::Pass1 { queued, started } => {
                    let route = queued.submission.route.as_ref().expect("a pass-1 row");
                    decided.push((i, route.decide(&logits, started.elapsed())));
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
            match (decision, r.role) {
                (None, Role::Answer(_)) => {
                    if r.seq.finish.is_none() {
                        self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                (Some(decision), Role::Pass1 { mut queued, .. }) => match decision {
                    Ok(d) => {
                        let route = queued.submission.route.as_ref().expect("a pass-1 row");
                        let key = self.prefix_key(route);
                        if let Some(key) = key
                            .filter(|k| route.shared_prefix > 0 && !self.prefixes.contains_key(k))
                        {
                            if self.prefixes.len() >= MAX_PREFIXES {
                                self.prefixes.clear();
                            }
                            match r.seq.cache.fork(route.shared_prefix, 0) {
                                Ok(kv) => {
                                    self.prefixes.insert(key, kv);
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "could not keep a pass-1 prefix")
                                }
                            }
                        }
                        for s in &queued.senders {
                            let _ = s.try_send(SeqEvent::Routed(d.clone()));
                        }
                        queued.submission.adaptation = Adaptation::Mix(d.mix);
                        queued.submission.route = None;
                        queued.enqueued = Instant::now();
                        self.ready.push_back(*queued);
                    }
                    Err(e) => {
                        for s in &queued.senders {
                            let _ = s.try_send(SeqEvent::Failed(e.to_string()));
                        }
                    }
                },
                _ => unreachable!("rows are finished by their own role"),
            }
        }
        // Forks join after the removals above, which index the rows as they were in this step.
        self.running.extend(forks);
        Ok(())
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
            .store(self.kv_used(), Ordering::Relaxed);
    }
}

/// Pass-1 prefixes kept at most (one per scorer and label set in practice).
const MAX_PREFIXES: usize = 8;

impl Worker {
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
