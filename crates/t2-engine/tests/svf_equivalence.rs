//! The SVF execution paths must agree with each other and with the base model (f32, real model):
//! z ≡ const is the base model; merged == factored; a batch of different mixes == each sequence alone;
//! incremental KV decode == full recompute.

mod common;

use std::collections::BTreeMap;

use candle_core::Tensor;
use t2_engine::{Adaptation, Engine, GenRequest, ZVectors};
use t2_model::{ProjId, SamplingParams, SeqStep, WantLogits};
use t2_svf::{MixId, MixLease, BASE_MIX};

const TOL: f32 = 1e-5;

fn prompt(e: &Engine, text: &str) -> Vec<u32> {
    e.encode_chat(&[t2_model::ChatMessage::new("user", text)])
        .unwrap()
}

/// A lease on a table slot holding `z`.
fn lease(e: &Engine, z: BTreeMap<ProjId, Vec<f32>>) -> MixLease {
    e.lease(&Adaptation::Vectors(ZVectors::new(z))).unwrap()
}

/// Last-position logits of one sequence run alone.
fn last_logits(e: &Engine, tokens: &[u32], mix: MixId) -> Vec<f32> {
    let (pool, mut kv) = e.loaded.model.pool_for(&[tokens.len()]).unwrap();
    let out = e
        .loaded
        .model
        .forward(
            &mut [SeqStep {
                kv: &mut kv[0],
                tokens,
                mix,
                want: WantLogits::Last,
            }],
            e.projector(),
            &pool,
        )
        .unwrap();
    out[0].as_ref().unwrap().to_vec1().unwrap()
}

/// A deterministic pseudo-random z per matrix in [lo, hi].
fn random_z(e: &Engine, seed: u64, lo: f32, hi: f32) -> BTreeMap<ProjId, Vec<f32>> {
    let svf = e.svf.as_ref().unwrap();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32) / (u32::MAX >> 1) as f32
    };
    svf.decomp
        .factors
        .iter()
        .map(|(id, f)| {
            (
                *id,
                (0..f.rank()).map(|_| lo + (hi - lo) * next()).collect(),
            )
        })
        .collect()
}

#[test]
fn decomposition_reconstructs_every_matrix() {
    let e = common::engine();
    let d = &e.svf.as_ref().unwrap().decomp;
    assert_eq!(d.factors.len(), 30 * 7);
    assert!(
        d.max_rel_error() <= 1e-5,
        "max relative reconstruction error {}",
        d.max_rel_error()
    );
    // shared/transformer2.md: all seven SmolLM2-135M matrices = 97,920 numbers per expert
    assert_eq!(d.expert_size(), 97_920);
    for f in d.factors.values() {
        assert!(
            f.sigma_host.windows(2).all(|w| w[0] >= w[1]),
            "σ must be sorted descending"
        );
    }
}

#[test]
fn constant_z_is_the_base_model() {
    let e = common::engine();
    let svf = e.svf.as_ref().unwrap();
    let z: BTreeMap<_, _> = svf
        .decomp
        .factors
        .iter()
        .map(|(id, f)| (*id, vec![0.525f32; f.rank()]))
        .collect();
    let held = lease(e, z);
    let id = held.id();
    let p = prompt(e, "Name a large animal.");
    let base = last_logits(e, &p, BASE_MIX);
    let factored = last_logits(e, &p, id);
    svf.merge(id).unwrap();
    let merged = last_logits(e, &p, id);
    let (df, dm) = (
        common::rel_diff(&factored, &base),
        common::rel_diff(&merged, &base),
    );
    eprintln!("z≡const vs base: factored {df:.2e}, merged {dm:.2e}");
    assert!(df < TOL && dm < TOL, "factored {df}, merged {dm}");
}

#[test]
fn merged_equals_factored_for_random_z() {
    let e = common::engine();
    let svf = e.svf.as_ref().unwrap();
    let held = lease(e, random_z(e, 1, 0.3, 0.9));
    let id = held.id();
    let p = prompt(e, "Write a haiku about rain.");
    let factored = last_logits(e, &p, id);
    svf.merge(id).unwrap();
    let merged = last_logits(e, &p, id);
    let base = last_logits(e, &p, BASE_MIX);
    let d = common::rel_diff(&merged, &factored);
    eprintln!(
        "merged vs factored: {d:.2e}; adapted vs base: {:.2e}",
        common::rel_diff(&factored, &base)
    );
    assert!(d < TOL, "merged vs factored differ by {d}");
    // and the mix really changes the model, or the comparison above proves nothing
    assert!(common::rel_diff(&factored, &base) > 100.0 * TOL);
}

#[test]
fn batch_of_different_mixes_equals_each_alone() {
    let e = common::engine();
    let (la, lb) = (
        lease(e, random_z(e, 2, 0.2, 1.0)),
        lease(e, random_z(e, 3, 0.2, 1.0)),
    );
    let (a, b) = (la.id(), lb.id());
    let leases = [e.lease_base(), la.clone(), lb.clone(), la.clone()];
    let prompts = [
        "What is 7 times 8?",
        "Tell me about the moon, briefly please.",
        "Hi",
        "Write Python code to reverse a list.",
    ];
    let mixes = [BASE_MIX, a, b, a];
    let reqs: Vec<(GenRequest, MixLease)> = prompts
        .iter()
        .zip(&leases)
        .map(|(p, mix)| {
            let req = GenRequest {
                prompt: prompt(e, p),
                max_tokens: 24,
                sampling: SamplingParams::default(),
                stop: vec![],
                ignore_eos: false,
                score_from: None,
                also_score: Vec::new(),
            };
            (req, mix.clone())
        })
        .collect();
    let together = e.generate(reqs.clone(), |_, _| {}).unwrap();
    for (req, t) in reqs.into_iter().zip(&together) {
        let mix = req.1.id();
        let alone = e.generate(vec![req], |_, _| {}).unwrap().remove(0);
        assert_eq!(t.tokens, alone.tokens, "mix {mix} diverged in a batch");
    }

    // logits agree too, not only argmaxes: first step of the mixed batch vs each alone
    let ps: Vec<Vec<u32>> = prompts.iter().map(|p| prompt(e, p)).collect();
    let lengths: Vec<usize> = ps.iter().map(Vec::len).collect();
    let (pool, mut caches) = e.loaded.model.pool_for(&lengths).unwrap();
    let mut steps: Vec<SeqStep> = caches
        .iter_mut()
        .zip(&ps)
        .zip(mixes)
        .map(|((c, t), mix)| SeqStep {
            kv: c,
            tokens: t,
            mix,
            want: WantLogits::Last,
        })
        .collect();
    let batched = e
        .loaded
        .model
        .forward(&mut steps, e.projector(), &pool)
        .unwrap();
    for ((p, mix), l) in ps.iter().zip(mixes).zip(batched) {
        let l: Vec<f32> = l.unwrap().to_vec1().unwrap();
        let d = common::rel_diff(&l, &last_logits(e, p, mix));
        assert!(d < TOL, "mix {mix}: batched vs alone logits differ by {d}");
    }
}

#[test]
fn incremental_decode_equals_full_recompute() {
    let e = common::engine();
    let held = lease(e, random_z(e, 4, 0.3, 0.9));
    let adapted = held.id();
    let model = &e.loaded.model;
    for mix in [BASE_MIX, adapted] {
        let mut seq = prompt(e, "Count from one to ten.");
        let prompt_len = seq.len();
        // The incremental run's blocks are scattered over the pool in reverse order; the full recompute's
        // are contiguous: both must read the same KV through their block tables.
        let (pool, mut kv) = model.pool_for(&[prompt_len + 12]).unwrap();
        kv[0].blocks.reverse();
        let mut step_logits: Vec<Vec<f32>> = Vec::new();
        let mut pending = seq.clone();
        for _ in 0..12 {
            let out = model
                .forward(
                    &mut [SeqStep {
                        kv: &mut kv[0],
                        tokens: &pending,
                        mix,
                        want: WantLogits::Last,
                    }],
                    e.projector(),
                    &pool,
                )
                .unwrap();
            let l: Vec<f32> = out[0].as_ref().unwrap().to_vec1().unwrap();
            let next = t2_model::sampling::argmax(&l);
            step_logits.push(l);
            seq.push(next);
            pending = vec![next];
        }
        let (fresh_pool, mut fresh) = model.pool_for(&[seq.len()]).unwrap();
        let full: Tensor = model
            .forward(
                &mut [SeqStep {
                    kv: &mut fresh[0],
                    tokens: &seq[..seq.len() - 1],
                    mix,
                    want: WantLogits::All,
                }],
                e.projector(),
                &fresh_pool,
            )
            .unwrap()
            .remove(0)
            .unwrap();
        for (k, inc) in step_logits.iter().enumerate() {
            let row: Vec<f32> = full.get(prompt_len - 1 + k).unwrap().to_vec1().unwrap();
            let d = common::rel_diff(inc, &row);
            assert!(
                d < TOL,
                "mix {mix}, step {k}: incremental vs full differ by {d}"
            );
        }
    }
}

#[test]
fn releasing_dense_copies_changes_no_result() {
    // What `t2 serve` does: the CPU kernels read packed copies, so the dense weights and factors go.
    let e = common::engine();
    let cfg = t2_engine::EngineConfig {
        experts_dir: tempfile::tempdir().unwrap().keep(),
        release_dense: true,
        ..t2_engine::EngineConfig::new(common::model_path())
    };
    let r = Engine::open(&cfg).unwrap();
    let m = &r.loaded.model;
    let dense: usize = m.linears().map(|l| l.dims().0 * l.dims().1 * 4).sum();
    let all = &r.svf.as_ref().unwrap().decomp.factors;
    let factors: usize = all.values().map(|f| (f.out + f.inp) * f.rank() * 4).sum();
    assert_eq!(r.released_bytes, dense + factors);
    assert!(m.linears().all(|l| l.weight().is_err()));
    assert!(all.values().all(|f| f.u().is_err() && f.vt().is_err()));

    let p = prompt(e, "Write a haiku about rain.");
    let z = random_z(e, 5, 0.3, 0.9);
    let (he, hr) = (lease(e, z.clone()), lease(&r, z));
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    let both = |mix_e, mix_r| {
        (
            bits(last_logits(e, &p, mix_e)),
            bits(last_logits(&r, &p, mix_r)),
        )
    };
    let (a, b) = both(BASE_MIX, BASE_MIX);
    assert_eq!(a, b, "base rows differ once the dense copies are gone");
    let (a, b) = both(he.id(), hr.id());
    assert_eq!(a, b, "factored rows differ once the dense factors are gone");
    // Merged weights are now made from the packed factors' values. The shared engine is not merged here:
    // other tests merge on it and its two merged slots could be evicted under this test.
    let factored = last_logits(e, &p, he.id());
    r.svf.as_ref().unwrap().merge(hr.id()).unwrap();
    assert!(r.svf.as_ref().unwrap().is_merged(hr.id()));
    let d = common::rel_diff(&last_logits(&r, &p, hr.id()), &factored);
    assert!(d < TOL, "merged from packed factors vs factored: {d}");
}
