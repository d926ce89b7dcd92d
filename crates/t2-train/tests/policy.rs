//! The differentiable training forward against the serving forward (itself checked against llama.cpp):
//! same log-probabilities for the base model and for an adapted one, and autograd's gradient against a
//! finite difference.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device};
use t2_adapt::label::{candidate_scores, label_item, pick_by_label, LabelItem};
use t2_engine::{Adaptation, Engine, EngineConfig, ZVectors};
use t2_model::{ChatMessage, ProjId, SeqStep, WantLogits};
use t2_svf::TargetSet;
use t2_tasks::{Answer, TaskItem};
use t2_train::options::{option_kl, option_logprobs, option_scores, OptionItem};
use t2_train::policy::{Branched, Policy, Scored, SvfLogits};

fn engine() -> Engine {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.exists(), "run `bash scripts/fetch-model.sh` first");
    let cfg = EngineConfig {
        experts_dir: tempfile::tempdir().unwrap().keep(),
        device: Device::Cpu,
        dtype: DType::F32,
        ..EngineConfig::new(model)
    };
    Engine::open(&cfg).unwrap()
}

fn sequences(e: &Engine) -> Vec<Scored> {
    ["What is 7 + 5?", "Name a planet."]
        .iter()
        .zip([
            " 7 + 5 = 12.",
            " Mars is a planet, the fourth from the Sun.",
        ])
        .map(|(q, a)| {
            let prompt = e.encode_chat(&[ChatMessage::new("user", q)]).unwrap();
            let from = prompt.len();
            let mut tokens = prompt;
            tokens.extend(e.loaded.tokenizer.encode(a).unwrap());
            Scored { tokens, from }
        })
        .collect()
}

/// log π(tokens[from..]) from the serving forward, with the adaptation's mix.
fn serving_logprobs(e: &Engine, s: &Scored, mix: u32) -> Vec<f32> {
    let (pool, mut kv) = e.loaded.model.pool_for(&[s.tokens.len()]).unwrap();
    let mut steps = [SeqStep {
        kv: &mut kv[0],
        tokens: &s.tokens,
        mix,
        want: WantLogits::All,
    }];
    let logits = e
        .loaded
        .model
        .forward(&mut steps, e.projector(), &pool)
        .unwrap()[0]
        .take()
        .unwrap();
    let rows = logits.to_vec2::<f32>().unwrap();
    (s.from..s.tokens.len())
        .map(|p| {
            let row = &rows[p - 1];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = row
                .iter()
                .map(|&v| ((v - m) as f64).exp())
                .sum::<f64>()
                .ln() as f32
                + m;
            row[s.tokens[p] as usize] - lse
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn training_forward_matches_serving_forward_and_its_gradient_is_right() {
    let e = engine();
    let svf = e.svf.as_ref().unwrap();
    let seqs = sequences(&e);
    let policy = Policy::new(&e.loaded.model, &svf.decomp, 256).unwrap();

    // Base model.
    let out = policy.score(None, &seqs, false).unwrap();
    let lp = out.token_logprobs.to_vec1::<f32>().unwrap();
    for (s, &(start, len)) in seqs.iter().zip(&out.spans) {
        let want = serving_logprobs(&e, s, t2_svf::BASE_MIX);
        let d = max_abs_diff(&lp[start..start + len], &want);
        assert!(
            d < 2e-3,
            "base: training forward differs from serving by {d}"
        );
    }

    // An adapted model: logits far from the start, so the adaptation changes the output a lot.
    let logits = SvfLogits::init(&svf.decomp, TargetSet::Mlp, 7, 0.0, 1.0).unwrap();
    let z: BTreeMap<ProjId, Vec<f32>> = logits.z_host().unwrap();
    let lease = e.lease(&Adaptation::Vectors(ZVectors::new(z))).unwrap();
    let mix = lease.id();
    let out = policy.score(Some(&logits), &seqs, false).unwrap();
    let lp = out.token_logprobs.to_vec1::<f32>().unwrap();
    let mut moved = 0f32;
    for (s, &(start, len)) in seqs.iter().zip(&out.spans) {
        let want = serving_logprobs(&e, s, mix);
        let base = serving_logprobs(&e, s, t2_svf::BASE_MIX);
        moved = moved.max(max_abs_diff(&want, &base));
        let d = max_abs_diff(&lp[start..start + len], &want);
        assert!(
            d < 2e-3,
            "adapted: training forward differs from serving by {d}"
        );
    }
    assert!(
        moved > 0.05,
        "the adaptation should change log-probabilities (moved {moved})"
    );

    // Autograd against a central finite difference along a random direction of all logits.
    let total = |l: &SvfLogits| -> f64 {
        let o = policy.score(Some(l), &seqs, false).unwrap();
        o.token_logprobs
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let out = policy.score(Some(&logits), &seqs, false).unwrap();
    let grads = out.token_logprobs.sum_all().unwrap().backward().unwrap();
    let host = logits.to_host().unwrap();
    // One matrix's logits, random signs: small enough a step that the function is smooth along it.
    let probe = ProjId {
        layer: 10,
        kind: t2_model::ProjKind::Down,
    };
    let mut rng_state = 12345u64;
    let mut dir: BTreeMap<ProjId, Vec<f32>> = BTreeMap::new();
    for (id, v) in &host {
        dir.insert(
            *id,
            v.iter()
                .map(|_| {
                    rng_state = rng_state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    match (*id == probe, (rng_state >> 33) & 1) {
                        (false, _) => 0.0,
                        (true, 0) => 1.0,
                        (true, _) => -1.0,
                    }
                })
                .collect(),
        );
    }
    let mut analytic = 0f64;
    for (id, var) in logits.vars() {
        let g = grads
            .get(var.as_tensor())
            .expect("every logit gets a gradient")
            .to_vec1::<f32>()
            .unwrap();
        analytic += g
            .iter()
            .zip(&dir[id])
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum::<f64>();
    }
    let shifted = |sign: f32, eps: f32| {
        let p = host
            .iter()
            .map(|(id, v)| {
                (
                    *id,
                    v.iter()
                        .zip(&dir[id])
                        .map(|(x, d)| x + sign * eps * d)
                        .collect(),
                )
            })
            .collect();
        SvfLogits::from_host(p).unwrap()
    };
    let eps = 1e-2f32;
    let numeric = (total(&shifted(1.0, eps)) - total(&shifted(-1.0, eps))) / (2.0 * eps as f64);
    let rel = (analytic - numeric).abs() / numeric.abs().max(1e-3);
    assert!(
        rel < 0.02,
        "directional derivative: autograd {analytic}, finite difference {numeric}"
    );
}

/// An ARC-style item: `n` lettered options, the right one at `correct`.
fn lettered_item(id: &str, question: &str, options: &[&str], correct: usize) -> TaskItem {
    let mut prompt = format!("Question: {question}\n");
    for (i, o) in options.iter().enumerate() {
        prompt.push_str(&format!("{}. {o}\n", char::from(b'A' + i as u8)));
    }
    prompt.push_str("Answer with the letter of the correct option.");
    TaskItem {
        id: id.into(),
        prompt,
        answer: Answer::Choice {
            options: options.iter().map(|s| s.to_string()).collect(),
            correct,
            lettered: true,
        },
        stem: Some(question.into()),
    }
}

#[test]
fn label_policy_reads_each_items_own_letters_as_label_eval_does() {
    let e = engine();
    let svf = e.svf.as_ref().unwrap();
    let tok = &e.loaded.tokenizer;
    // Three, five and four options: a batch whose first item's options would be wrong for the others.
    let items = [
        lettered_item("x/1", "Which is a planet?", &["Mars", "Moon", "Sun"], 0),
        lettered_item(
            "x/2",
            "Which gas do plants take in?",
            &["oxygen", "nitrogen", "helium", "argon", "carbon dioxide"],
            4,
        ),
        lettered_item(
            "x/3",
            "What melts ice?",
            &["cold", "heat", "dark", "wind"],
            1,
        ),
    ];
    let labelled: Vec<LabelItem> = items
        .iter()
        .map(|it| label_item(&e, "reasoning", it).unwrap())
        .collect();
    // Each item's candidates are its own letters, as the reply's first token (no answer prefix: no space).
    for (it, l) in items.iter().zip(&labelled) {
        let Answer::Choice {
            options, correct, ..
        } = &it.answer
        else {
            unreachable!()
        };
        let want: Vec<u32> = (0..options.len())
            .map(|i| {
                let t = tok.encode(&char::from(b'A' + i as u8).to_string()).unwrap();
                assert_eq!(t.len(), 1, "a letter is one token");
                t[0]
            })
            .collect();
        assert_eq!(l.candidates, want, "{}", it.id);
        assert_eq!(l.correct, *correct);
        assert_eq!(
            tok.decode(&l.candidates[..1]).unwrap(),
            "A",
            "the first candidate reads A"
        );
    }

    // Training's per-row distribution against the serving forward renormalised over each row's own
    // candidates (what `t2 eval --mode label` picks from), base and adapted.
    let policy = Policy::new(&e.loaded.model, &svf.decomp, 512).unwrap();
    let prompts: Vec<Vec<u32>> = labelled.iter().map(|l| l.prompt.clone()).collect();
    let candidates: Vec<Vec<u32>> = labelled.iter().map(|l| l.candidates.clone()).collect();
    let logits = SvfLogits::init(&svf.decomp, TargetSet::Mlp, 3, 0.0, 1.0).unwrap();
    let lease = e
        .lease(&Adaptation::Vectors(ZVectors::new(
            logits.z_host().unwrap(),
        )))
        .unwrap();
    for (l, mix) in [(None, t2_svf::BASE_MIX), (Some(&logits), lease.id())] {
        let train = policy
            .candidate_logprobs_each(l, &prompts, &candidates)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let serve = candidate_scores(&e, &labelled, mix).unwrap();
        let picks = pick_by_label(&e, &labelled, mix).unwrap();
        assert_eq!(train.len(), 3);
        for ((row, want), (lab, pick)) in train.iter().zip(&serve).zip(labelled.iter().zip(&picks))
        {
            assert_eq!(row.len(), 5, "rows are padded to the most candidates");
            let k = lab.candidates.len();
            assert!(
                row[k..].iter().all(|&v| v == f32::NEG_INFINITY),
                "no mass past a row's own candidates: {row:?}"
            );
            let d = max_abs_diff(&row[..k], want);
            assert!(
                d < 2e-3,
                "training and eval differ by {d}: {row:?} {want:?}"
            );
            let mass: f32 = row[..k].iter().map(|v| v.exp()).sum();
            assert!(
                (mass - 1.0).abs() < 1e-4,
                "renormalised over its own: {mass}"
            );
            assert_eq!(t2_tasks::verify::choice_by_scores(row), *pick);
        }
    }

    // The gradient flows only through real candidates: a loss on every row's picks is finite.
    let lp = policy
        .candidate_logprobs_each(Some(&logits), &prompts, &candidates)
        .unwrap();
    let picked = lp
        .gather(
            &candle_core::Tensor::from_vec(vec![0u32, 4, 1], (3, 1), lp.device()).unwrap(),
            1,
        )
        .unwrap();
    let g = picked.sum_all().unwrap().backward().unwrap();
    for (_, var) in logits.vars() {
        let v = g.get(var.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "a non-finite gradient");
    }
}

#[test]
fn option_policy_scores_whole_options_as_loglik_eval_does() {
    let e = engine();
    let svf = e.svf.as_ref().unwrap();
    // Options that share their first token, which only whole-text scoring tells apart.
    let items = [
        lettered_item(
            "y/1",
            "What is the function of the nucleus in a cell?",
            &["provides energy", "provides nutrients", "controls activity"],
            2,
        ),
        lettered_item(
            "y/2",
            "Which is a planet?",
            &["the Moon", "the Sun", "Mars", "a comet", "the sky"],
            2,
        ),
    ];
    let scored: Vec<OptionItem> = items
        .iter()
        .map(|it| {
            let (prompt, options) = t2_adapt::eval::loglik_tokens(&e, "reasoning", it).unwrap();
            let Answer::Choice { correct, .. } = it.answer else {
                unreachable!()
            };
            OptionItem {
                options: Branched {
                    prompt,
                    branches: options,
                },
                correct,
            }
        })
        .collect();
    let policy = Policy::new(&e.loaded.model, &svf.decomp, 512).unwrap();
    let logits = SvfLogits::init(&svf.decomp, TargetSet::Mlp, 5, 0.0, 1.0).unwrap();
    let lease = e
        .lease(&Adaptation::Vectors(ZVectors::new(
            logits.z_host().unwrap(),
        )))
        .unwrap();
    for (l, mix) in [(None, t2_svf::BASE_MIX), (Some(&logits), lease.id())] {
        let train = option_logprobs(&policy, l, &scored).unwrap();
        let picks = t2_adapt::eval::pick_by_loglik(&e, "reasoning", &items, mix).unwrap();
        for ((lp, it), pick) in train.iter().zip(&scored).zip(&picks) {
            let lp = lp.to_vec1::<f32>().unwrap();
            let Branched { prompt, branches } = &it.options;
            assert_eq!(lp.len(), branches.len(), "one probability per option");
            // Each option's whole text from the serving forward, renormalised over the item's options.
            let sums: Vec<f32> = branches
                .iter()
                .map(|o| {
                    let s = Scored {
                        tokens: [prompt.clone(), o.clone()].concat(),
                        from: prompt.len(),
                    };
                    serving_logprobs(&e, &s, mix).iter().sum()
                })
                .collect();
            let lse = t2_model::sampling::log_sum_exp(&sums);
            let want: Vec<f32> = sums.iter().map(|s| s - lse).collect();
            let d = max_abs_diff(&lp, &want);
            assert!(
                d < 5e-3,
                "training and loglik eval differ by {d}: {lp:?} {want:?}"
            );
            assert_eq!(t2_tasks::verify::choice_by_scores(&lp), *pick);
        }
    }
}

/// Branches packed after one prompt score what each prompt + branch scores as a sequence of its own, and
/// give the same gradient: the packed row's positions and mask hide the other branches exactly.
#[test]
fn branched_rows_score_and_differentiate_as_separate_sequences() {
    let e = engine();
    let svf = e.svf.as_ref().unwrap();
    let policy = Policy::new(&e.loaded.model, &svf.decomp, 512).unwrap();
    let logits = SvfLogits::init(&svf.decomp, TargetSet::Mlp, 7, 0.0, 1.0).unwrap();
    let tok = &e.loaded.tokenizer;
    // Rows of different lengths (padding), branches of 1 to several tokens, some sharing their first.
    let items: Vec<Branched> = [
        (
            "Which is a planet?",
            vec![" Mars", " the Moon", " the Sun, our star"],
        ),
        ("2 + 2 =", vec![" 4", " four", " 5", " 22"]),
    ]
    .iter()
    .map(|(q, opts)| Branched {
        prompt: e.encode_chat(&[ChatMessage::new("user", q)]).unwrap(),
        branches: opts.iter().map(|o| tok.encode(o).unwrap()).collect(),
    })
    .collect();
    let packed = policy.branch_logprobs(Some(&logits), &items).unwrap();
    let seqs: Vec<Scored> = items
        .iter()
        .flat_map(|it| {
            it.branches.iter().map(|b| Scored {
                tokens: [it.prompt.clone(), b.clone()].concat(),
                from: it.prompt.len(),
            })
        })
        .collect();
    let alone = policy.score(Some(&logits), &seqs, false).unwrap();
    let sums: Vec<candle_core::Tensor> = alone
        .spans
        .iter()
        .map(|&(s, n)| {
            alone
                .token_logprobs
                .narrow(0, s, n)
                .unwrap()
                .sum_all()
                .unwrap()
        })
        .collect();
    let alone_sums: Vec<f32> = sums.iter().map(|t| t.to_scalar::<f32>().unwrap()).collect();
    let packed_sums: Vec<f32> = packed
        .iter()
        .flat_map(|t| t.to_vec1::<f32>().unwrap())
        .collect();
    assert_eq!(packed_sums.len(), alone_sums.len());
    let d = max_abs_diff(&packed_sums, &alone_sums);
    assert!(d < 1e-3, "packed {packed_sums:?} vs alone {alone_sums:?}");
    // Weighted so that every branch's gradient counts differently.
    let weights: Vec<f32> = (0..packed_sums.len()).map(|i| 1.0 + i as f32).collect();
    let w = candle_core::Tensor::new(weights.as_slice(), &Device::Cpu).unwrap();
    let packed_total = (candle_core::Tensor::cat(&packed, 0).unwrap() * &w)
        .unwrap()
        .sum_all()
        .unwrap();
    let alone_total = (candle_core::Tensor::stack(&sums, 0).unwrap() * &w)
        .unwrap()
        .sum_all()
        .unwrap();
    let (gp, ga) = (
        packed_total.backward().unwrap(),
        alone_total.backward().unwrap(),
    );
    let mut compared = 0;
    for (id, var) in logits.vars() {
        let a = ga.get(var.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let p = gp.get(var.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let d = max_abs_diff(&p, &a);
        assert!(
            d <= 2e-3 * scale,
            "{}: gradients differ by {d} (scale {scale})",
            id.name()
        );
        compared += 1;
    }
    assert!(compared > 0);
}

/// The training forward knows each architecture the loader does (Qwen2's biases, Qwen3's q/k norms, Llama
/// 3 rope scaling, a sharded Mistral): on the model-family fixtures it scores what the serving forward does.
#[test]
fn training_forward_matches_serving_on_every_family() {
    let fixtures =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../t2-model/tests/fixtures/families");
    for name in ["llama3", "qwen2", "qwen3", "mistral"] {
        // A copy: the engine writes its decomposition cache beside the model.
        let dir = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(fixtures.join(name)).unwrap() {
            let p = f.unwrap().path();
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
        let e = Engine::open(&EngineConfig {
            experts_dir: tempfile::tempdir().unwrap().keep(),
            device: Device::Cpu,
            dtype: DType::F32,
            ..EngineConfig::new(dir.path().to_path_buf())
        })
        .unwrap();
        let svf = e.svf.as_ref().unwrap();
        let policy = Policy::new(&e.loaded.model, &svf.decomp, 32).unwrap();
        let seq = Scored {
            tokens: (0..20).map(|i| (i * 37 + 11) % 256).collect(),
            from: 3,
        };
        let lp = policy
            .score(None, std::slice::from_ref(&seq), false)
            .unwrap();
        let lp = lp.token_logprobs.to_vec1::<f32>().unwrap();
        let d = max_abs_diff(&lp, &serving_logprobs(&e, &seq, t2_svf::BASE_MIX));
        assert!(
            d < 1e-4,
            "{name}: training forward differs from serving by {d}"
        );
    }
}

/// The option policy's KL penalty is the mean, over every option token's position, of KL(adapted ‖ base)
/// that scoring each prompt + option as a sequence of its own gives; and it vanishes where the expert is
/// the base model (the paper's uniform start).
#[test]
fn option_kl_is_the_mean_kl_of_each_option_scored_alone() {
    let e = engine();
    let svf = e.svf.as_ref().unwrap();
    let policy = Policy::new(&e.loaded.model, &svf.decomp, 512).unwrap();
    let tok = &e.loaded.tokenizer;
    let items: Vec<OptionItem> = [
        ("Which is a planet?", vec![" Mars", " the Moon", " a comet"]),
        ("2 + 2 =", vec![" 4", " four", " 5"]),
    ]
    .iter()
    .map(|(q, opts)| OptionItem {
        options: Branched {
            prompt: e.encode_chat(&[ChatMessage::new("user", q)]).unwrap(),
            branches: opts.iter().map(|o| tok.encode(o).unwrap()).collect(),
        },
        correct: 0,
    })
    .collect();
    let seqs: Vec<Scored> = items
        .iter()
        .flat_map(|it| {
            let Branched { prompt, branches } = &it.options;
            branches.iter().map(|b| Scored {
                tokens: [prompt.clone(), b.clone()].concat(),
                from: prompt.len(),
            })
        })
        .collect();
    let base = policy
        .score(None, &seqs, true)
        .unwrap()
        .log_softmax
        .unwrap();
    let base = base.to_vec2::<f32>().unwrap();
    let kl_of = |logits: &SvfLogits| {
        let scores = option_scores(&policy, Some(logits), &items, true).unwrap();
        let packed = option_kl(&policy, scores.log_softmax.as_ref().unwrap(), &items)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let alone = policy.score(Some(logits), &seqs, true).unwrap();
        let alone = alone.log_softmax.unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(alone.len(), base.len(), "one row per option token");
        let by_hand = alone
            .iter()
            .zip(&base)
            .map(|(p, q)| {
                p.iter()
                    .zip(q)
                    .map(|(lp, lq)| (lp.exp() * (lp - lq)) as f64)
                    .sum::<f64>()
            })
            .sum::<f64>()
            / alone.len() as f64;
        (packed as f64, by_hand)
    };
    let (packed, by_hand) =
        kl_of(&SvfLogits::init(&svf.decomp, TargetSet::Mlp, 7, 0.0, 1.0).unwrap());
    assert!(
        packed > 1e-3,
        "a perturbed expert drifts from base: KL {packed}"
    );
    assert!(
        (packed - by_hand).abs() < 1e-3 * by_hand.max(1.0),
        "packed {packed} vs each option alone {by_hand}"
    );
    let (at_start, _) = kl_of(&SvfLogits::init(&svf.decomp, TargetSet::Mlp, 7, 0.1, 0.0).unwrap());
    assert!(
        at_start < packed / 100.0,
        "the uniform start is the base model: KL {at_start} vs {packed}"
    );
}
