//! Pass 1 in the scheduler on the real model (f32): the decision equals label probabilities computed by a
//! direct forward of the same prompt (cold, and with the shared prefix reused), pass 2 answers exactly as
//! a request submitted with the decided mix, scoring jobs (alone, or forked from a generation's prompt)
//! equal a direct log-softmax, and a routed request dropped during pass 1 frees everything.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use t2_engine::{
    Adaptation, Engine, EngineConfig, GenRequest, RouteDecision, RoutePolicy, RouteStrategy,
    Router, Scheduler, SchedulerConfig, SeqEvent, SeqHandle, Submission,
};
use t2_model::{ChatMessage, SamplingParams, SeqStep, WantLogits};
use t2_svf::{Mix, BASE_SHARE_KEY};

/// Two pass-2 experts (math, code) and a classifier (category routing), all random.
fn engine() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            Arc::new(common::engine_with_random_experts(
                &[
                    ("math", "math", 1),
                    ("code", "code", 2),
                    ("router", "routing", 3),
                ],
                EngineConfig::new(common::model_path()).mix_capacity,
            ))
        })
        .clone()
}

fn scheduler(e: &Arc<Engine>) -> Scheduler {
    Scheduler::start(
        e.clone(),
        SchedulerConfig {
            max_batched_tokens: 64,
            ..Default::default()
        },
    )
}

fn request(e: &Engine, text: &str, max_tokens: usize) -> GenRequest {
    let prompt = e.encode_chat(&[ChatMessage::new("user", text)]).unwrap();
    GenRequest::new(prompt, max_tokens, SamplingParams::default())
}

/// (decision if routed, generated tokens).
fn drain(h: &mut SeqHandle) -> (Option<RouteDecision>, Vec<u32>) {
    let (mut decision, mut tokens) = (None, Vec::new());
    loop {
        match h.events.blocking_recv().expect("ends with a finish") {
            SeqEvent::Routed(d) => {
                assert!(
                    decision.is_none() && tokens.is_empty(),
                    "decided once, first"
                );
                decision = Some(d);
            }
            SeqEvent::Admitted { .. } => {}
            SeqEvent::Token(t) => {
                if t.counted {
                    tokens.push(t.token);
                }
                if t.finish.is_some() {
                    return (decision, tokens);
                }
            }
            SeqEvent::Failed(m) => panic!("failed: {m}"),
            SeqEvent::Scored(_) => panic!("not a scoring job"),
        }
    }
}

/// Label probabilities from one direct forward of the whole pass-1 prompt (no scheduler, no shared prefix).
fn direct_scores(e: &Engine, spec: &t2_engine::RouteSpec) -> Vec<f32> {
    let lease = e.lease(&spec.scorer).unwrap();
    let mix = lease.id();
    let (pool, mut kv) = e.loaded.model.pool_for(&[spec.prompt.len()]).unwrap();
    let logits = e
        .loaded
        .model
        .forward(
            &mut [SeqStep {
                kv: &mut kv[0],
                tokens: &spec.prompt,
                mix,
                want: WantLogits::Last,
            }],
            e.projector(),
            &pool,
        )
        .unwrap()
        .remove(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let picked: Vec<f32> = spec
        .labels
        .iter()
        .map(|l| logits[l.token as usize])
        .collect();
    let max = picked.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = picked.iter().map(|x| (x - max).exp()).sum();
    picked.iter().map(|x| (x - max).exp() / sum).collect()
}

fn routed(
    e: &Arc<Engine>,
    s: &Scheduler,
    strategy: RouteStrategy,
    text: &str,
    policy: RoutePolicy,
) -> (t2_engine::RouteSpec, SeqHandle) {
    let router = Router::from_engine(e).unwrap().expect("experts are loaded");
    let spec = router.spec(e, strategy, text, policy).unwrap();
    let h = s
        .submit(Submission {
            adaptation: Adaptation::base(),
            requests: vec![request(e, text, 8)],
            route: Some(spec.clone()),
        })
        .unwrap()
        .remove(0);
    (spec, h)
}

#[test]
fn labels_come_from_the_experts_and_the_classifier_is_found() {
    let e = engine();
    let r = Router::from_engine(&e).unwrap().unwrap();
    assert_eq!(r.label_names(), ["code", "math", "other"]);
    assert_eq!(r.classifier.as_deref(), Some("router"));
    assert!(r
        .labels
        .iter()
        .find(|l| l.name == "other")
        .unwrap()
        .experts
        .is_empty());
}

#[test]
fn pass1_decides_as_a_direct_forward_and_pass2_answers_as_the_decided_mix() {
    let e = engine();
    let s = scheduler(&e);
    // Two requests per strategy: the first computes the shared prefix, the second reuses it.
    for strategy in [RouteStrategy::Prompt, RouteStrategy::Classifier] {
        for text in [
            "What is 12 times 12?",
            "Write a Python function that adds two numbers.",
        ] {
            let (spec, mut h) = routed(&e, &s, strategy, text, RoutePolicy::default());
            assert!(spec.shared_prefix > 20 && spec.shared_prefix < spec.prompt.len());
            let (decision, tokens) = drain(&mut h);
            let d = decision.expect("pass 1 decided");
            assert_eq!(d.strategy, strategy);
            let want = direct_scores(&e, &spec);
            for (l, p) in spec.labels.iter().zip(&want) {
                let got = d.scores[&l.name];
                assert!(
                    (got - p).abs() < 1e-4,
                    "{strategy} {text:?} {}: {got} vs {p}",
                    l.name
                );
            }
            let top = &spec.labels[want
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0];
            assert_eq!(d.label, top.name);
            let expected = match top.experts.as_slice() {
                [] => Mix::base(),
                [one] => Mix::expert(one),
                _ => unreachable!("one expert per label here"),
            };
            assert_eq!(d.mix, expected);
            // Pass 2 = the same request submitted with the decided mix.
            let mut solo = s
                .submit(Submission::new(
                    Adaptation::Mix(d.mix.clone()),
                    vec![request(&e, text, 8)],
                ))
                .unwrap()
                .remove(0);
            assert_eq!(drain(&mut solo).1, tokens, "{strategy} {text:?}");
        }
    }
}

#[test]
fn soft_routing_weighs_every_label_and_the_threshold_falls_back_to_base() {
    let e = engine();
    let s = scheduler(&e);
    let (_, mut h) = routed(
        &e,
        &s,
        RouteStrategy::Prompt,
        "What is 3 plus 4?",
        RoutePolicy {
            soft: true,
            threshold: 0.0,
        },
    );
    let d = drain(&mut h).0.unwrap();
    let weights = d.mix.weights();
    let total: f32 = weights.values().sum();
    assert!((total - 1.0).abs() < 0.03, "α sums to {total}: {weights:?}");
    for (k, v) in &weights {
        let label = if k == BASE_SHARE_KEY { "other" } else { k };
        assert!(
            (v - d.scores[label]).abs() <= 0.006,
            "{k}: {v} vs {:?}",
            d.scores
        );
    }
    let (_, mut h) = routed(
        &e,
        &s,
        RouteStrategy::Prompt,
        "What is 3 plus 4?",
        RoutePolicy {
            soft: false,
            threshold: 1.0,
        },
    );
    let d = drain(&mut h).0.unwrap();
    assert!(d.below_threshold && d.mix.weights().is_empty());
    assert_eq!(d.mix, Mix::base());
}

#[test]
fn scoring_jobs_equal_a_direct_log_softmax() {
    let e = engine();
    let s = scheduler(&e);
    let mut prompt = e
        .encode_chat(&[ChatMessage::new("user", "What is 2+2?")])
        .unwrap();
    let from = prompt.len();
    prompt.extend(
        e.loaded
            .tokenizer
            .encode_continuation("The answer is 4.")
            .unwrap(),
    );
    let mut req = GenRequest::new(prompt.clone(), 1, SamplingParams::default());
    req.score_from = Some(from);
    let a = Adaptation::expert("math");
    let mut h = s
        .submit(Submission::new(a.clone(), vec![req]))
        .unwrap()
        .remove(0);
    let got = loop {
        match h.events.blocking_recv().unwrap() {
            SeqEvent::Scored(x) => break x,
            SeqEvent::Admitted { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    let want = direct_logprob(&e, &a, &prompt, from);
    assert_eq!(got.tokens, prompt.len() - from);
    assert!(
        (got.logprob - want).abs() < 1e-3,
        "{} vs {want}",
        got.logprob
    );
}

/// Σ log p(prompt[p+1] | prompt[..=p]) over the scored part, from one direct forward of the whole text.
fn direct_logprob(e: &Engine, a: &Adaptation, prompt: &[u32], from: usize) -> f64 {
    let lease = e.lease(a).unwrap();
    let mix = lease.id();
    let (pool, mut kv) = e.loaded.model.pool_for(&[prompt.len()]).unwrap();
    let logits = e
        .loaded
        .model
        .forward(
            &mut [SeqStep {
                kv: &mut kv[0],
                tokens: prompt,
                mix,
                want: WantLogits::All,
            }],
            e.projector(),
            &pool,
        )
        .unwrap()
        .remove(0)
        .unwrap();
    let mut want = 0f64;
    for p in from - 1..prompt.len() - 1 {
        let row = logits.get(p).unwrap().to_vec1::<f32>().unwrap();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
        want += (row[prompt[p + 1] as usize] - lse) as f64;
    }
    want
}

#[test]
fn a_generation_also_scores_a_continuation_from_its_prompt_kv() {
    let e = engine();
    let s = scheduler(&e);
    let a = Adaptation::expert("math");
    let question = "What is 12 times 7? Answer with the number.";
    let continuation = e
        .loaded
        .tokenizer
        .encode_continuation("The answer is 84.")
        .unwrap();
    let plain = request(&e, question, 12);
    let mut scoring = plain.clone();
    scoring.also_score = continuation.clone();
    // A base-model row in the same batch, so that the fork joins a batch of mixed rows.
    let other = request(&e, "Name a colour.", 12);
    let mut handles = s.submit(Submission::new(a.clone(), vec![scoring])).unwrap();
    handles.extend(
        s.submit(Submission::new(Adaptation::base(), vec![other]))
            .unwrap(),
    );
    let (mut tokens, mut score, mut finished) = (Vec::new(), None, false);
    while !(finished && score.is_some()) {
        match handles[0]
            .events
            .blocking_recv()
            .expect("a token and a score")
        {
            SeqEvent::Admitted { .. } => {}
            SeqEvent::Token(t) => {
                if t.counted {
                    tokens.push(t.token);
                }
                finished |= t.finish.is_some();
            }
            SeqEvent::Scored(x) => {
                assert!(score.is_none(), "scored once");
                score = Some(x);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    drain(&mut handles[1]);
    let score = score.unwrap();
    // The answer is the one the same request gives without scoring.
    let mut h = s
        .submit(Submission::new(a.clone(), vec![plain.clone()]))
        .unwrap()
        .remove(0);
    assert_eq!(tokens, drain(&mut h).1);
    // The score is the continuation's log-likelihood after the prompt.
    let mut whole = plain.prompt.clone();
    whole.extend(&continuation);
    let want = direct_logprob(&e, &a, &whole, plain.prompt.len());
    assert_eq!(score.tokens, continuation.len());
    assert!(
        (score.logprob - want).abs() < 1e-3,
        "{} vs {want}",
        score.logprob
    );
    // Both rows have left the batch and given back their KV.
    let t0 = Instant::now();
    while s.stats().running.load(Ordering::SeqCst) != 0
        || s.stats().kv_used_tokens.load(Ordering::SeqCst) != 0
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "rows left behind");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_request_dropped_during_pass1_frees_the_batch() {
    let e = engine();
    let s = scheduler(&e);
    let (_, h) = routed(
        &e,
        &s,
        RouteStrategy::Classifier,
        "Tell me about the moon and its phases in detail.",
        RoutePolicy::default(),
    );
    drop(h);
    let t0 = Instant::now();
    loop {
        let st = s.stats();
        let idle = st.running.load(Ordering::SeqCst) == 0
            && st.routing.load(Ordering::SeqCst) == 0
            && st.queue_depth.load(Ordering::SeqCst) == 0
            && st.kv_used_tokens.load(Ordering::SeqCst) == 0;
        if idle && st.cancelled.load(Ordering::SeqCst) >= 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the dropped request still holds the batch"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The scheduler still serves routed requests afterwards.
    let (_, mut h) = routed(
        &e,
        &s,
        RouteStrategy::Prompt,
        "What is 5 minus 2?",
        RoutePolicy::default(),
    );
    assert!(drain(&mut h).0.is_some());
}
