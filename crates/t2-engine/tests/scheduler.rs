//! The continuous-batching scheduler on the real model (f32): concurrent requests with different mixes get
//! exactly their solo tokens, cancellation frees the batch, the queue and the KV budget are enforced, and a
//! full mix table evicts mixes nobody uses.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use t2_engine::{
    Adaptation, Engine, GenRequest, GpuRunner, Scheduler, SchedulerConfig, SeqEvent, SeqHandle,
    Submission, SubmitError,
};
use t2_model::{ChatMessage, SamplingParams};
use t2_svf::Mix;

/// One engine with two random experts and room for base + 3 mixes, so that five different adaptations
/// force evictions.
fn engine() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            Arc::new(common::engine_with_random_experts(
                &[("math", "math", 1), ("code", "code", 2)],
                4,
            ))
        })
        .clone()
}

/// Tests share the engine's mix table: run them one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn mix(parts: &[(&str, f32)]) -> Adaptation {
    let alpha = parts
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect::<BTreeMap<_, _>>();
    Adaptation::Mix(Mix::new(alpha, 0.0).unwrap())
}

fn request(e: &Engine, text: &str, max_tokens: usize) -> GenRequest {
    let prompt = e.encode_chat(&[ChatMessage::new("user", text)]).unwrap();
    GenRequest::new(prompt, max_tokens, SamplingParams::default())
}

/// Runs one request alone through the one-shot loop.
fn solo(e: &Engine, a: &Adaptation, req: GenRequest) -> Vec<u32> {
    let lease = e.lease(a).unwrap();
    e.generate(vec![(req, lease)], |_, _| {})
        .unwrap()
        .remove(0)
        .tokens
}

/// Reads one sequence to its end: (tokens counted, admitted-at, finished-at).
fn drain(h: &mut SeqHandle) -> (Vec<u32>, Instant, Instant) {
    let mut tokens = Vec::new();
    let mut admitted = None;
    loop {
        match h
            .events
            .blocking_recv()
            .expect("the sequence ends with a finish")
        {
            SeqEvent::Admitted { .. } => admitted = Some(Instant::now()),
            SeqEvent::Token(t) => {
                if t.counted {
                    tokens.push(t.token);
                }
                if t.finish.is_some() {
                    return (tokens, admitted.expect("admitted first"), Instant::now());
                }
            }
            SeqEvent::Failed(m) => panic!("sequence failed: {m}"),
            SeqEvent::Routed(_) | SeqEvent::Scored(_) => panic!("no routing or scoring here"),
        }
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn concurrent_mixes_get_their_solo_tokens() {
    let _g = serial();
    let e = engine();
    let cases = [
        (
            Adaptation::base(),
            "What is 7 times 8? Explain your reasoning step by step.",
        ),
        (
            Adaptation::expert("math"),
            "Write a haiku about autumn leaves.",
        ),
        (
            Adaptation::expert("code"),
            "Write a Python function that reverses a string.",
        ),
        (
            mix(&[("math", 0.6), ("code", 0.4)]),
            "Name three planets of the solar system.",
        ),
        (Adaptation::expert("math"), "Hi"),
    ];
    // A small step budget so that prompts are prefilled in chunks beside other rows' decode steps.
    let sched = Scheduler::start(
        e.clone(),
        SchedulerConfig {
            max_batched_tokens: 12,
            merge_after_steps: None,
            ..Default::default()
        },
    );
    let mut handles: Vec<SeqHandle> = cases
        .iter()
        .map(|(a, text)| {
            sched
                .submit(Submission::new(a.clone(), vec![request(&e, text, 20)]))
                .unwrap()
                .remove(0)
        })
        .collect();
    let together: Vec<Vec<u32>> = handles.iter_mut().map(|h| drain(h).0).collect();
    drop(sched);
    for ((a, text), got) in cases.iter().zip(together) {
        let want = solo(&e, a, request(&e, text, 20));
        assert_eq!(
            got, want,
            "{a:?} in the shared batch differs from running alone"
        );
    }
    // The accelerator's runner gives the same tokens: greedy rows take their argmax where the logits are,
    // a sampled row (temperature, seed) goes through the host sampler. On the CPU it runs the same model.
    let cfg = SchedulerConfig {
        max_batched_tokens: 12,
        merge_after_steps: None,
        ..Default::default()
    };
    let merges = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let runner = GpuRunner::new(e.clone(), Scheduler::kv_blocks(&cfg), merges.clone()).unwrap();
    let sched = Scheduler::with_runner(e.clone(), cfg, Box::new(runner), merges);
    let sampled = |e: &Engine| {
        let mut r = request(e, "Tell me about the sea.", 20);
        r.sampling.temperature = 0.9;
        r.sampling.seed = Some(5);
        r
    };
    let mut handles: Vec<SeqHandle> = cases
        .iter()
        .map(|(a, text)| (a.clone(), request(&e, text, 20)))
        .chain([(Adaptation::expert("code"), sampled(&e))])
        .map(|(a, r)| sched.submit(Submission::new(a, vec![r])).unwrap().remove(0))
        .collect();
    let together: Vec<Vec<u32>> = handles.iter_mut().map(|h| drain(h).0).collect();
    drop(sched);
    let wants = cases
        .iter()
        .map(|(a, text)| solo(&e, a, request(&e, text, 20)))
        .chain([solo(&e, &Adaptation::expert("code"), sampled(&e))]);
    for (i, (got, want)) in together.into_iter().zip(wants).enumerate() {
        assert_eq!(
            got, want,
            "request {i} under the GPU runner differs from running alone"
        );
    }
    // The experts matter: the same prompt under another mix gives other tokens.
    let base_tokens = solo(&e, &Adaptation::base(), request(&e, cases[1].1, 20));
    assert_ne!(
        base_tokens,
        solo(&e, &cases[1].0, request(&e, cases[1].1, 20))
    );
}

#[test]
fn a_dropped_receiver_cancels_its_sequence() {
    let _g = serial();
    let e = engine();
    let sched = Scheduler::start(e.clone(), SchedulerConfig::default());
    let mut h = sched
        .submit(Submission::new(
            Adaptation::base(),
            vec![request(&e, "Tell me a long story about a dragon.", 400)],
        ))
        .unwrap()
        .remove(0);
    loop {
        if let SeqEvent::Token(_) = h.events.blocking_recv().unwrap() {
            break;
        }
    }
    drop(h);
    let stats = sched.stats().clone();
    wait_for("the cancelled sequence leaves the batch", || {
        stats.cancelled.load(std::sync::atomic::Ordering::Relaxed) == 1
            && stats.running.load(std::sync::atomic::Ordering::Relaxed) == 0
    });
    // and the scheduler keeps serving
    let mut h = sched
        .submit(Submission::new(
            Adaptation::base(),
            vec![request(&e, "Hi", 4)],
        ))
        .unwrap()
        .remove(0);
    assert!(!drain(&mut h).0.is_empty());
}

#[test]
fn a_full_queue_refuses_and_the_kv_budget_serializes() {
    let _g = serial();
    let e = engine();
    let mut long = request(&e, "Tell me a long story about a dragon.", 64);
    long.ignore_eos = true;
    let sched = Scheduler::start(
        e.clone(),
        SchedulerConfig {
            max_queue: 1,
            // Room for one of these requests at a time (KV comes in whole blocks).
            kv_budget_tokens: long.kv_blocks() * t2_model::BLOCK_SIZE + 8,
            ..Default::default()
        },
    );
    let submit =
        |r: &GenRequest| sched.submit(Submission::new(Adaptation::base(), vec![r.clone()]));
    let mut first = submit(&long).unwrap().remove(0);
    let stats = sched.stats().clone();
    wait_for("the first request runs", || {
        stats.running.load(std::sync::atomic::Ordering::Relaxed) == 1
    });
    let mut second = submit(&long).unwrap().remove(0); // waits: the KV budget is taken
                                                       // The queue's single place is taken (held aside by the worker or still in the channel alike).
    assert!(matches!(submit(&long), Err(SubmitError::QueueFull(1))));
    assert_eq!(
        stats.queue_depth.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    let (_, _, first_done) = drain(&mut first);
    let (_, second_admitted, _) = drain(&mut second);
    assert!(
        second_admitted >= first_done,
        "the second request joined before the first released its KV budget"
    );
    // A request that can never fit the budget is refused at once, not queued forever.
    let huge = request(&e, "Hi", long.kv_tokens() + 64);
    assert!(matches!(submit(&huge), Err(SubmitError::Invalid(_))));
}

#[test]
fn a_full_mix_table_evicts_unused_mixes() {
    let _g = serial();
    let e = engine();
    let sched = Scheduler::start(e.clone(), SchedulerConfig::default());
    // base + 3 slots, five different adaptations in turn
    let adaptations = [
        Adaptation::expert("math"),
        Adaptation::expert("code"),
        mix(&[("math", 0.5), ("code", 0.5)]),
        mix(&[("math", 0.2), ("code", 0.8)]),
        mix(&[("math", 0.9), ("code", 0.1)]),
    ];
    for a in adaptations {
        let mut h = sched
            .submit(Submission::new(a.clone(), vec![request(&e, "Hi", 3)]))
            .unwrap()
            .remove(0);
        let (tokens, _, _) = drain(&mut h);
        assert!(!tokens.is_empty(), "{a:?} produced nothing");
    }
    // An unknown expert is refused before it is queued.
    assert!(matches!(
        sched.submit(Submission::new(
            Adaptation::expert("nope"),
            vec![request(&e, "Hi", 3)]
        )),
        Err(SubmitError::Invalid(_))
    ));
}

/// The batch step at which a sequence joined the batch.
fn admitted_step(h: &mut SeqHandle) -> u64 {
    loop {
        match h.events.blocking_recv().expect("admitted before the end") {
            SeqEvent::Admitted { step, .. } => return step,
            SeqEvent::Failed(m) => panic!("sequence failed: {m}"),
            _ => {}
        }
    }
}

#[test]
fn a_submission_waiting_for_a_mix_slot_does_not_hold_up_others() {
    let _g = serial();
    let e = engine();
    let sched = Scheduler::start(
        e.clone(),
        SchedulerConfig {
            merge_after_steps: None,
            ..Default::default()
        },
    );
    let long = |text: &str| {
        let mut r = request(&e, text, 24);
        r.ignore_eos = true;
        r
    };
    // The table has base + 3 slots: three running mixes hold all of them.
    let holders = [
        Adaptation::expert("math"),
        Adaptation::expert("code"),
        mix(&[("math", 0.3), ("code", 0.7)]),
    ];
    let mut running: Vec<SeqHandle> = holders
        .iter()
        .map(|a| {
            let mut h = sched
                .submit(Submission::new(a.clone(), vec![long("Tell me a story.")]))
                .unwrap()
                .remove(0);
            admitted_step(&mut h);
            h
        })
        .collect();
    // A fourth mix must wait for a slot; a base request queued after it must not wait with it.
    let mut waiting = sched
        .submit(Submission::new(
            mix(&[("math", 0.8), ("code", 0.2)]),
            vec![request(&e, "Hi", 2)],
        ))
        .unwrap()
        .remove(0);
    let mut base = sched
        .submit(Submission::new(
            Adaptation::base(),
            vec![request(&e, "Hi", 2)],
        ))
        .unwrap()
        .remove(0);
    let base_step = admitted_step(&mut base);
    let waiting_step = admitted_step(&mut waiting);
    for h in &mut running {
        while let Some(ev) = h.events.blocking_recv() {
            if matches!(ev, SeqEvent::Token(t) if t.finish.is_some()) {
                break;
            }
        }
    }
    assert!(
        base_step < waiting_step,
        "the base request (admitted at step {base_step}) waited behind the mix that had no slot \
         (admitted at step {waiting_step})"
    );
    assert!(
        waiting_step >= 24,
        "the fourth mix joined at step {waiting_step}, before any holder of a slot finished"
    );
}

#[test]
fn random_disconnects_leave_no_mix_slot_or_kv_held() {
    use rand::{Rng, SeedableRng};
    let _g = serial();
    let e = engine();
    let sched = Scheduler::start(
        e.clone(),
        SchedulerConfig {
            max_queue: 256,
            merge_after_steps: Some(4),
            ..Default::default()
        },
    );
    let adaptations = [
        Adaptation::base(),
        Adaptation::expert("math"),
        Adaptation::expert("code"),
        mix(&[("math", 0.5), ("code", 0.5)]),
        mix(&[("math", 0.1), ("code", 0.9)]),
    ];
    // Short raw prompts (no chat template): the test is about bookkeeping, not answers.
    let prompts: Vec<Vec<u32>> = ["Hi", "What is 2+2?", "Name a color.", "Write a word."]
        .iter()
        .map(|t| e.loaded.tokenizer.encode_continuation(t).unwrap())
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut handles = Vec::new();
    for _ in 0..200 {
        let a = &adaptations[rng.random_range(0..adaptations.len())];
        let req = GenRequest::new(
            prompts[rng.random_range(0..prompts.len())].clone(),
            rng.random_range(1..6),
            SamplingParams::default(),
        );
        let h = sched.submit(Submission::new(a.clone(), vec![req])).unwrap();
        // When the client goes away: before admission, after k events, or never.
        handles.push((h, rng.random_range(0..5usize)));
    }
    let mut finished = 0;
    for (mut h, leave_after) in handles {
        let h = &mut h[0];
        let mut seen = 0;
        while seen < leave_after {
            match h.events.blocking_recv() {
                Some(SeqEvent::Token(t)) if t.finish.is_some() => {
                    finished += 1;
                    break;
                }
                Some(SeqEvent::Failed(m)) => panic!("sequence failed: {m}"),
                Some(_) => seen += 1,
                None => break,
            }
        }
    }
    let stats = sched.stats().clone();
    let svf = e.svf.as_ref().unwrap();
    wait_for("every sequence has left the batch", || {
        stats.running.load(std::sync::atomic::Ordering::SeqCst) == 0
            && stats.queue_depth.load(std::sync::atomic::Ordering::SeqCst) == 0
    });
    sched.join();
    assert!(finished > 0, "no request ran to its end");
    assert!(
        stats.cancelled.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no request was cancelled"
    );
    assert_eq!(
        stats
            .kv_used_tokens
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(svf.held_slots(), 0, "a mix slot is still held");
}

#[test]
fn a_repeated_prefix_is_read_from_the_cache_under_the_same_weights_only() {
    use std::sync::atomic::Ordering::SeqCst;
    use t2_model::BLOCK_SIZE as BS;
    let _g = serial();
    let e = engine();
    // A system prompt several blocks long, then different questions.
    let system = "You are a careful assistant who answers briefly. ".repeat(8);
    let ask = |q: &str| {
        let p = e
            .encode_chat(&[
                ChatMessage::new("system", &system),
                ChatMessage::new("user", q),
            ])
            .unwrap();
        GenRequest::new(p, 8, SamplingParams::default())
    };
    let (first, second) = (ask("What is 2+2?"), ask("Name a color."));
    let budget = 3 * first.kv_blocks();
    let sched = Scheduler::start(
        e.clone(),
        SchedulerConfig {
            kv_budget_tokens: budget * BS,
            ..Default::default()
        },
    );
    let stats = sched.stats().clone();
    let run = |a: &Adaptation, r: &GenRequest| {
        let mut h = sched
            .submit(Submission::new(a.clone(), vec![r.clone()]))
            .unwrap()
            .remove(0);
        drain(&mut h).0
    };
    let hits = || stats.prefix_hit_tokens.load(SeqCst) as usize;
    let base = Adaptation::base();
    let want = solo(&e, &base, first.clone());
    assert_eq!(run(&base, &first), want);
    assert_eq!(hits(), 0, "nothing was cached before");
    // The same prompt again: every full block but the one of its last position comes from the cache,
    // and the answer is the same.
    assert_eq!(run(&base, &first), want);
    let after_repeat = hits();
    assert_eq!(after_repeat, (first.prompt.len() - 1) / BS * BS);
    // Another question after the same system prompt shares the full blocks before they differ.
    assert_eq!(run(&base, &second), solo(&e, &base, second.clone()));
    let common = first
        .prompt
        .iter()
        .zip(&second.prompt)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(common >= 3 * BS, "the system prompt spans several blocks");
    assert_eq!(hits() - after_repeat, common / BS * BS);
    // The same prompt under other weights shares nothing, and answers as that mix does alone.
    let m = mix(&[("math", 1.0)]);
    let before = hits();
    assert_eq!(run(&m, &first), solo(&e, &m, first.clone()));
    assert_eq!(hits(), before, "a block was shared across mixes");
    // The cache's blocks count against the budget, but a request that needs nearly all of it still gets
    // in: blocks only the cache holds are given back.
    assert!(stats.prefix_cached_tokens.load(SeqCst) > 0);
    let mut big = request(&e, &"one two three ".repeat(200), 1);
    big.prompt.truncate((budget - 1) * BS - 1);
    big.ignore_eos = true;
    assert!(big.kv_blocks() + stats.prefix_cached_tokens.load(SeqCst) / BS > budget);
    assert_eq!(run(&base, &big).len(), 1);
    wait_for("the batch empties", || stats.running.load(SeqCst) == 0);
    assert_eq!(
        stats.kv_used_tokens.load(SeqCst),
        0,
        "cached blocks no sequence reads count as free"
    );
    sched.join();
}
