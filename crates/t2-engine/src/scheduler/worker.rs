//! The model thread's loop: admission (batch rows, KV blocks, a mix slot), planning each step, running it
//! on the runner, and handing each row's result to its sequence.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use t2_model::kv::blocks_for;
use t2_model::BLOCK_SIZE;
use t2_svf::{Adaptation, MixId, MixKey, MixLease, SvfError, BASE_MIX};
use tokio::sync::mpsc;

use super::{Failure, FailureKind, Queued, SchedulerConfig, SchedulerStats, SeqEvent};
use crate::engine::{Engine, EngineError};
use crate::kv::{BlockKvManager, KvLease};
use crate::plan::{split_budget, Pending, RowOutput, RowPlan, SeqId, StepPlan};
use crate::prefix_cache::PrefixCache;
use crate::routing::RouteDecision;
use crate::runner::ModelRunner;
use crate::sequence::Sequence;

struct Running {
    seq: Sequence,
    role: Role,
    /// The weights its KV is computed under, when its prompt's blocks may be cached for later prompts
    /// (taken once they are).
    cache_key: Option<MixKey>,
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

pub(super) struct Worker {
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
    /// Full KV blocks of earlier prompts, found by their tokens and weights.
    cache: PrefixCache,
    running: Vec<Running>,
    next_id: SeqId,
    /// Sequences gone since the last step, for the runner to forget.
    ended: Vec<SeqId>,
    /// Consecutive steps in which every row used the same non-base mix.
    uniform_steps: usize,
}

impl Worker {
    pub(super) fn new(
        engine: Arc<Engine>,
        runner: Box<dyn ModelRunner>,
        kv: BlockKvManager,
        cfg: SchedulerConfig,
        stats: Arc<SchedulerStats>,
        rx: Receiver<Queued>,
    ) -> Self {
        Self {
            engine,
            runner,
            kv,
            cfg,
            stats,
            rx,
            waiting: VecDeque::new(),
            ready: VecDeque::new(),
            cache: PrefixCache::default(),
            running: Vec::new(),
            next_id: 0,
            ended: Vec::new(),
            uniform_steps: 0,
        }
    }

    pub(super) fn run(&mut self) {
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
        let adaptation = match &q.submission.route {
            Some(r) => r.scorer.clone(),
            None => q.submission.adaptation.clone(),
        };
        let cache_key = self
            .weights_key(&adaptation)
            .filter(|_| self.cfg.prefix_cache);
        // KV first: when it does not fit, the mix table is left alone.
        let Some(kv) = self.allocate(&q, cache_key.as_ref()) else {
            return Err((Admission::NoRoom, Box::new(q)));
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
                cache_key,
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
                cache_key: cache_key.clone(),
            });
        }
        Ok(())
    }

    /// The KV of every sequence a submission admits now (and of their scoring forks), or None when the
    /// pool has too few free blocks for all of it even after the prefix cache gave back what no sequence
    /// reads. Prompts start on the cached blocks of their longest known prefix under the same weights.
    fn allocate(
        &mut self,
        q: &Queued,
        key: Option<&MixKey>,
    ) -> Option<Vec<(KvLease, Option<KvLease>)>> {
        // (prompt, positions to reserve, blocks a fork reserves, positions that must be computed from)
        let wants: Vec<(&[u32], usize, usize, usize)> = match &q.submission.route {
            Some(route) => vec![(&route.prompt[..], route.prompt.len(), 0, route.prompt.len())],
            None => q
                .submission
                .requests
                .iter()
                .map(|r| {
                    // A scored continuation needs the logits of the position before it.
                    let computed_from = r.score_from.unwrap_or(r.prompt.len());
                    (&r.prompt[..], r.kv_tokens(), r.fork_blocks(), computed_from)
                })
                .collect(),
        };
        let shared: Vec<Vec<KvLease>> = wants
            .iter()
            .map(|&(prompt, _, _, from)| match key {
                Some(k) => self
                    .cache
                    .lookup(k, prompt, from.saturating_sub(1) / BLOCK_SIZE),
                None => Vec::new(),
            })
            .collect();
        let need: usize = wants
            .iter()
            .zip(&shared)
            .map(|(&(_, positions, fork, _), s)| blocks_for(positions) - s.len() + fork)
            .sum();
        if !self.cache.make_room(&self.kv, need) {
            return None;
        }
        let mut out = Vec::with_capacity(wants.len());
        for ((prompt, positions, fork, _), s) in wants.into_iter().zip(shared) {
            let hit = s.len() * BLOCK_SIZE;
            let fresh = self.kv.allocate_blocks(blocks_for(positions) - s.len())?;
            let fork = match fork {
                0 => None,
                n => Some(self.kv.allocate_blocks(n)?),
            };
            if key.is_some() {
                self.stats
                    .prefix_query_tokens
                    .fetch_add(prompt.len() as u64, Ordering::Relaxed);
                self.stats
                    .prefix_hit_tokens
                    .fetch_add(hit as u64, Ordering::Relaxed);
            }
            out.push((KvLease::concat(s, fresh), fork));
        }
        Some(out)
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
        let split = split_budget(
            &pending,
            self.cfg.max_batched_tokens,
            self.cfg.max_prefill_while_decoding,
        );
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
        // A sequence's last event goes out only once its KV is freed and the gauges say so: a client
        // that reads the metrics the moment it is done must not see its request still holding KV.
        let mut finals = Vec::new();
        for ((i, row), out) in stepping.into_iter().zip(&plan.rows).zip(outputs) {
            let r = &mut self.running[i];
            r.seq.fed(row.tokens.len());
            if !r.seq.is_prefilling() {
                if let Some(key) = r.cache_key.take() {
                    self.cache.insert(&key, r.seq.prompt(), &r.seq.kv);
                }
            }
            match (out, &r.role) {
                (RowOutput::Fed, _) => {}
                (RowOutput::Scored { logprob, tokens }, Role::Answer(tx)) => {
                    if let Some(scored) = r.seq.on_score(logprob, tokens) {
                        finals.push((tx.clone(), SeqEvent::Scored(scored)));
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
                    if event.finish.is_some() {
                        finals.push((tx.clone(), SeqEvent::Token(event)));
                        finished.push(i);
                    } else if tx.try_send(SeqEvent::Token(event)).is_err() {
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
                (Some(decision), Role::Pass1 { queued, .. }) => self.on_decided(*queued, decision),
                _ => unreachable!("rows are finished by their own role"),
            }
        }
        // Forks join after the removals above, which index the rows as they were in this step.
        for (req, kv, mix, tx) in forks {
            let seq = Sequence::new(self.next_id(), req, mix, kv, None);
            self.running.push(Running {
                seq,
                role: Role::Answer(tx),
                cache_key: None,
            });
        }
        if !finals.is_empty() {
            self.publish();
            for (tx, event) in finals {
                let _ = tx.try_send(event);
            }
        }
        Ok(())
    }

    /// Pass 1 decided: tell every
    /// sequence of the submission, and queue pass 2 first in line with the decided mix.
    fn on_decided(&mut self, mut queued: Queued, decision: crate::engine::Result<RouteDecision>) {
        let d = match decision {
            Ok(d) => d,
            Err(e) => {
                for s in &queued.senders {
                    let _ = s.try_send(SeqEvent::Failed(Failure::from(&e)));
                }
                return;
            }
        };
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
        // Cached blocks no sequence reads are free for the taking, as vLLM counts them.
        let idle = self.cache.idle_blocks();
        self.stats
            .kv_used_tokens
            .store((self.kv.used() - idle) * BLOCK_SIZE, Ordering::Relaxed);
        self.stats
            .prefix_cached_tokens
            .store(self.cache.blocks() * BLOCK_SIZE, Ordering::Relaxed);
    }

    /// The identity of the weights an adaptation runs with (None: not cacheable, raw training vectors).
    fn weights_key(&self, a: &Adaptation) -> Option<MixKey> {
        match a {
            Adaptation::Mix(m) if m.is_base() => Some(MixKey::base()),
            Adaptation::Mix(m) => self.engine.experts.as_ref()?.key_of(m).ok(),
            Adaptation::Vectors(_) => None,
        }
    }
}
