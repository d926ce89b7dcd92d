//! The differentiable training forward against the serving forward (itself checked against llama.cpp):
//! same log-probabilities for the base model and for an adapted one, and autograd's gradient against a
//! finite difference.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device};
use t2_engine::{Adaptation, Engine, EngineConfig, ZVectors};
use t2_model::{ChatMessage, ProjId, SeqStep, WantLogits};
use t2_svf::TargetSet;
use t2_train::policy::{Policy, Scored, SvfLogits};

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
