//! `t2 selftest`: the GPU correctness checks, run by the release binary itself on the machine that has the
//! GPU (cargo's test binaries built with `cuda` each embed candle's kernels: too large to carry there).
//! Every check runs the same computation on the CPU in f32 (the reference) and on the chosen device:
//!
//! - the forward pass of small random models of each architecture over a ragged batch (prefill across
//!   block boundaries, a second prefill chunk beside decode rows, decode), f32 logits within 1e-4 relative;
//! - rows with different SVF mixes in one batch == each sequence alone, and merged == factored weights;
//! - the device model runs as a GPU serves it, with q/k/v and gate/up stacked into one GEMM each (a model on
//!   a GPU stacks itself; on the CPU the check stacks it, so a CPU run checks the stacked path against the
//!   separate one), also beside mixes that adapt only the MLP;
//! - the default model: the same greedy tokens as the CPU for the llama.cpp reference prompts (f32), and
//!   how long bf16 on the device agrees with them.
//!
//! Exits non-zero when a check fails; `--json` keeps the figures.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use serde::Serialize;
use t2_model::{
    random_llama, DenseProjector, Llama, LlamaConfig, Projector, RopeScaling, RopeStyle, SeqStep,
    WantLogits,
};
use t2_svf::{Decomposition, MixKey, SvfProjector, TargetSet, ZVectors, BASE_MIX};

use crate::common::ModelArgs;

#[derive(Args, Debug)]
pub struct SelftestArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Skip the checks on the default model (random models only)
    #[arg(long)]
    pub no_model: bool,
    /// Greedy tokens per reference prompt
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Write the results as JSON here too
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Check {
    name: String,
    passed: bool,
    /// The figure the check is judged on (relative error, or tokens that agree).
    value: f64,
    limit: String,
    seconds: f64,
}

/// f32 logits of the device run must match the CPU's this closely (max |Δ| ÷ max |reference|).
const REL_TOL: f64 = 1e-4;
/// bf16 argmaxes must match the f32 model's tokens at this share of positions.
const BF16_AGREEMENT: f64 = 0.8;
/// The llama.cpp prompts and their greedy tokens, recorded by tests/fixtures/reference/make_reference.py.
const REFERENCE: &str = include_str!("../../../tests/fixtures/reference/llamacpp_smollm2_f32.json");

pub fn run(a: SelftestArgs) -> Result<()> {
    let device = a.model.device()?;
    eprintln!("selftest on {device:?}");
    let mut checks = Vec::new();
    let mut record = |name: String, value: f64, passed: bool, limit: String, t0: Instant| {
        let c = Check {
            name,
            passed,
            value,
            limit,
            seconds: t0.elapsed().as_secs_f64(),
        };
        eprintln!(
            "  {} {:<52} {:>12.3e}  ({})  {:.1} s",
            if c.passed { "PASS" } else { "FAIL" },
            c.name,
            c.value,
            c.limit,
            c.seconds
        );
        checks.push(c);
    };
    for (arch, cfg) in architectures() {
        let t0 = Instant::now();
        let cpu = random_llama(&cfg, DType::F32, &Device::Cpu, 3)?;
        let dev = served(random_llama(&cfg, DType::F32, &device, 3)?)?;
        let want = ragged_logits(&cpu, &DenseProjector, &[BASE_MIX; 3])?;
        let got = ragged_logits(&dev, &DenseProjector, &[BASE_MIX; 3])?;
        let e = rel_err(&want, &got);
        record(
            format!("forward f32 {arch}: device{} vs CPU", stacked_note(&dev)),
            e,
            e <= REL_TOL,
            format!("≤ {REL_TOL:e}"),
            t0,
        );
    }
    {
        let t0 = Instant::now();
        let cfg = LlamaConfig::tiny();
        let model = random_llama(&cfg, DType::F32, &device, 5)?;
        let svf = SvfProjector::new(Decomposition::random(&model, TargetSet::All, 9)?, 8, 2)?;
        let ids = register_mixes(&svf, 3)?;
        let batch = ragged_logits(&model, &svf, &ids)?;
        let alone: Vec<f32> = split_rows(&model, &svf, &ids)?;
        let e = rel_err(&alone, &reorder_alone(&batch, &model.cfg));
        record(
            "3 mixes in one batch == each alone (device)".into(),
            e,
            e <= REL_TOL,
            format!("≤ {REL_TOL:e}"),
            t0,
        );
        let t0 = Instant::now();
        let factored = ragged_logits(&model, &svf, &[ids[0]; 3])?;
        svf.merge(ids[0])?;
        let merged = ragged_logits(&model, &svf, &[ids[0]; 3])?;
        let e = rel_err(&factored, &merged);
        record(
            "merged == factored (device)".into(),
            e,
            e <= REL_TOL,
            format!("≤ {REL_TOL:e}"),
            t0,
        );
    }
    {
        // Mixes on the MLP only: attention stays on the base weights for every row, so it runs stacked
        // beside rows with mixes, and the base rows' MLP too when the whole batch is base.
        let t0 = Instant::now();
        let cfg = LlamaConfig {
            qkv_bias: true,
            ..LlamaConfig::tiny()
        };
        let run = |model: &Llama| -> Result<Vec<f32>> {
            let decomp = Decomposition::compute(model, "selftest", TargetSet::Mlp, false)?;
            let svf = SvfProjector::new(decomp, 8, 2)?;
            let ids = register_mixes(&svf, 2)?;
            let mut out = ragged_logits(model, &svf, &[BASE_MIX, ids[0], ids[1]])?;
            out.extend(ragged_logits(model, &svf, &[BASE_MIX; 3])?);
            Ok(out)
        };
        let want = run(&random_llama(&cfg, DType::F32, &Device::Cpu, 4)?)?;
        let dev = served(random_llama(&cfg, DType::F32, &device, 4)?)?;
        let e = rel_err(&want, &run(&dev)?);
        record(
            format!("base and 2 mlp mixes: device{} vs CPU", stacked_note(&dev)),
            e,
            e <= REL_TOL,
            format!("≤ {REL_TOL:e}"),
            t0,
        );
    }
    if !a.no_model {
        default_model_checks(&a, &device, &mut record)?;
    }
    let failed = checks.iter().filter(|c| !c.passed).count();
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "device": format!("{device:?}"),
        "checks": checks,
        "failed": failed,
    }))?;
    if let Some(p) = &a.json {
        std::fs::write(p, &json)?;
    }
    println!("{json}");
    if failed > 0 {
        bail!("{failed} selftest check(s) failed");
    }
    Ok(())
}

/// The model as the device serves it: stacked projections on a GPU (the model does that itself, unless
/// `T2_CUDA_UNSTACKED=1`), and stacked here on the CPU, whose own serving keeps them apart, so that a CPU
/// run checks the stacked path against the separate one.
fn served(mut model: Llama) -> Result<Llama> {
    if model.device().is_cpu() {
        model.stack_projections()?;
    }
    Ok(model)
}

fn stacked_note(model: &Llama) -> &'static str {
    match model.is_stacked() {
        true => " (stacked)",
        false => "",
    }
}

/// The small random shapes each architecture is checked on: grouped and plain attention, both RoPE
/// layouts, a real head size (64, as SmolLM2 and Llama-3.2-1B have).
fn architectures() -> Vec<(&'static str, LlamaConfig)> {
    let tiny = LlamaConfig::tiny();
    let half = LlamaConfig {
        rope_style: RopeStyle::Half,
        tie_word_embeddings: false,
        ..tiny.clone()
    };
    let mha = LlamaConfig {
        num_kv_heads: tiny.num_heads,
        ..tiny.clone()
    };
    let hd64 = LlamaConfig {
        hidden_size: 256,
        intermediate_size: 384,
        num_heads: 4,
        num_kv_heads: 1,
        head_dim: 64,
        rope_theta: 500_000.0,
        rope_style: RopeStyle::Half,
        ..tiny.clone()
    };
    let qwen2 = LlamaConfig {
        qkv_bias: true,
        rope_theta: 1_000_000.0,
        ..half.clone()
    };
    let qwen3 = LlamaConfig {
        qk_norm: true,
        head_dim: 16,
        ..half.clone()
    };
    // Scaling only changes frequencies whose wavelength exceeds original/low_freq_factor positions:
    // a short original context makes it matter at the positions the check reaches.
    let llama3 = LlamaConfig {
        rope_scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16,
        },
        ..half.clone()
    };
    vec![
        ("qwen2 (qkv bias)", qwen2),
        ("qwen3 (q/k norm, head_dim 16)", qwen3),
        ("llama3 rope scaling", llama3),
        ("llama gguf-rope gqa", tiny),
        ("llama hf-rope untied", half),
        ("llama mha", mha),
        ("llama head_dim 64 mqa", hd64),
    ]
}

/// Three sequences through a ragged batch: a prefill of 5, 17 and 33 tokens (across block boundaries),
/// then a step where the first takes a second 9-token chunk while the others decode, then 3 decode steps.
/// Returns every logit the steps produced, in order.
fn ragged_logits(model: &Llama, p: &dyn Projector, mixes: &[u32]) -> Result<Vec<f32>> {
    let lens = [5usize, 17, 33];
    let vocab = model.cfg.vocab_size as u32;
    let (pool, mut kvs) = model.pool_for(&[lens[0] + 9 + 3, lens[1] + 4, lens[2] + 4])?;
    let tok = |s: usize, i: usize| ((i * 31 + s * 17 + 3) as u32) % vocab;
    let mut out = Vec::new();
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(s, &l)| (0..l).map(|i| tok(s, i)).collect())
        .collect();
    let chunk: Vec<u32> = (0..9).map(|i| tok(7, i)).collect();
    let mut next: Vec<Vec<u32>> = vec![chunk, vec![tok(1, 99)], vec![tok(2, 99)]];
    let mut first = true;
    for step in 0..5 {
        let feeds: Vec<&[u32]> = if first {
            prompts.iter().map(Vec::as_slice).collect()
        } else {
            next.iter().map(Vec::as_slice).collect()
        };
        let mut steps: Vec<SeqStep> = kvs
            .iter_mut()
            .zip(&feeds)
            .zip(mixes)
            .map(|((kv, t), &mix)| SeqStep {
                kv,
                tokens: t,
                mix,
                want: if step == 0 {
                    WantLogits::All
                } else {
                    WantLogits::Last
                },
            })
            .collect();
        let logits = model.forward(&mut steps, p, &pool)?;
        let mut argmaxes = Vec::new();
        for l in logits {
            let l = l.expect("logits asked for").to_dtype(DType::F32)?;
            let last = match l.rank() {
                2 => l.get(l.dim(0)? - 1)?,
                _ => l.clone(),
            };
            argmaxes.push(t2_model::sampling::argmax(&last.to_vec1::<f32>()?));
            out.extend(l.flatten_all()?.to_vec1::<f32>()?);
        }
        if !first {
            next = argmaxes.into_iter().map(|t| vec![t]).collect();
        }
        first = false;
    }
    Ok(out)
}

/// The same three sequences, each run alone (a batch of one), in sequence order: the batch run's output
/// is put in the same order by [`reorder_alone`].
fn split_rows(model: &Llama, p: &dyn Projector, mixes: &[u32]) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for (s, &mix) in mixes.iter().enumerate() {
        out.extend(ragged_logits_only(model, p, mix, s)?);
    }
    Ok(out)
}

/// ragged_logits's schedule for sequence `s` alone.
fn ragged_logits_only(model: &Llama, p: &dyn Projector, mix: u32, s: usize) -> Result<Vec<f32>> {
    let lens = [5usize, 17, 33];
    let vocab = model.cfg.vocab_size as u32;
    let tok = |s: usize, i: usize| ((i * 31 + s * 17 + 3) as u32) % vocab;
    let cap = if s == 0 { lens[0] + 12 } else { lens[s] + 4 };
    let (pool, mut kvs) = model.pool_for(&[cap])?;
    let mut feed: Vec<u32> = (0..lens[s]).map(|i| tok(s, i)).collect();
    let mut out = Vec::new();
    for step in 0..5 {
        let mut steps = vec![SeqStep {
            kv: &mut kvs[0],
            tokens: &feed,
            mix,
            want: if step == 0 {
                WantLogits::All
            } else {
                WantLogits::Last
            },
        }];
        let l = model
            .forward(&mut steps, p, &pool)?
            .remove(0)
            .expect("logits");
        let l = l.to_dtype(DType::F32)?;
        let last = match l.rank() {
            2 => l.get(l.dim(0)? - 1)?,
            _ => l.clone(),
        };
        let am = t2_model::sampling::argmax(&last.to_vec1::<f32>()?);
        out.push(l.flatten_all()?.to_vec1::<f32>()?);
        feed = if step == 0 && s == 0 {
            (0..9).map(|i| tok(7, i)).collect()
        } else if step == 0 {
            vec![tok(s, 99)]
        } else {
            vec![am]
        };
    }
    Ok(out.concat())
}

/// The batch run's logits (step by step, sequences in order within a step) regrouped sequence by sequence.
fn reorder_alone(batch: &[f32], cfg: &LlamaConfig) -> Vec<f32> {
    let v = cfg.vocab_size;
    let lens = [5usize, 17, 33];
    let mut per_seq: Vec<Vec<f32>> = vec![Vec::new(); 3];
    let mut at = 0;
    for step in 0..5 {
        for (s, seq) in per_seq.iter_mut().enumerate() {
            let rows = if step == 0 { lens[s] } else { 1 };
            seq.extend_from_slice(&batch[at..at + rows * v]);
            at += rows * v;
        }
    }
    per_seq.concat()
}

/// Registers `n` distinct random mixes; returns their ids.
fn register_mixes(svf: &SvfProjector, n: usize) -> Result<Vec<u32>> {
    (0..n)
        .map(|k| {
            let z: BTreeMap<_, _> = svf
                .decomp
                .factors
                .iter()
                .map(|(id, f)| {
                    let zv = (0..f.rank())
                        .map(|i| 0.6 + 0.8 * (((i * 7 + k * 13) % 11) as f32 / 11.0))
                        .collect();
                    (*id, zv)
                })
                .collect();
            let z = ZVectors::new(z);
            Ok(svf
                .lease(&MixKey::of_vectors(&z), || Ok(z.z().clone()))?
                .id())
        })
        .collect()
}

fn rel_err(want: &[f32], got: &[f32]) -> f64 {
    if want.len() != got.len() {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12) as f64;
    let diff = want
        .iter()
        .zip(got)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs())) as f64;
    if diff.is_nan() {
        f64::INFINITY
    } else {
        diff / scale
    }
}

fn greedy(model: &Llama, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let (pool, mut kvs) = model.pool_for(&[prompt.len() + n])?;
    let mut feed = prompt.to_vec();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut steps = vec![SeqStep {
            kv: &mut kvs[0],
            tokens: &feed,
            mix: BASE_MIX,
            want: WantLogits::Last,
        }];
        let l = model.forward(&mut steps, &DenseProjector, &pool)?.remove(0);
        let l: Tensor = l.expect("logits");
        let t = l.argmax(0)?.to_scalar::<u32>()?;
        out.push(t);
        feed = vec![t];
    }
    Ok(out)
}

fn default_model_checks(
    a: &SelftestArgs,
    device: &Device,
    record: &mut impl FnMut(String, f64, bool, String, Instant),
) -> Result<()> {
    let path = a.model.model_path();
    if !path.exists() {
        bail!(
            "{}: model not found (fetch it with scripts/fetch-model.sh, or pass --no-model)",
            path.display()
        );
    }
    let cpu = t2_model::LoadedModel::load(&path, &Device::Cpu, DType::F32)?.model;
    let dev32 = t2_model::LoadedModel::load(&path, device, DType::F32)?.model;
    let dev16 = t2_model::LoadedModel::load(&path, device, DType::BF16)?.model;
    let fixture: serde_json::Value = serde_json::from_str(REFERENCE)?;
    let n = a.tokens;
    for case in fixture["chat_cases"].as_array().into_iter().flatten() {
        let name = case["name"].as_str().unwrap_or("?");
        let prompt: Vec<u32> = serde_json::from_value(case["prompt_tokens"].clone())?;
        let t0 = Instant::now();
        let want = greedy(&cpu, &prompt, n)?;
        let got = greedy(&dev32, &prompt, n)?;
        let same = agree(&want, &got);
        record(
            format!("{name}: f32 device greedy == CPU"),
            same as f64,
            same == n,
            format!("= {n} tokens"),
            t0,
        );
        let t0 = Instant::now();
        let free_run = agree(&want, &greedy(&dev16, &prompt, n)?);
        let forced = teacher_forced(&dev16, &prompt, &want)?;
        // bf16 rounds every activation, so a near-tie can flip a token, after which free-running texts
        // part for good: judged on the f32 text fed back (each position's argmax against f32's token).
        record(
            format!("{name}: bf16 device argmax == f32 (free run agreed {free_run})"),
            forced,
            forced >= BF16_AGREEMENT,
            format!("≥ {BF16_AGREEMENT} of {n} positions"),
            t0,
        );
    }
    Ok(())
}

/// Share of `want`'s positions where `model`, fed the prompt and `want` itself, predicts `want`'s token.
fn teacher_forced(model: &Llama, prompt: &[u32], want: &[u32]) -> Result<f64> {
    let (pool, mut kvs) = model.pool_for(&[prompt.len() + want.len()])?;
    let feed: Vec<u32> = prompt
        .iter()
        .chain(&want[..want.len() - 1])
        .copied()
        .collect();
    let mut steps = vec![SeqStep {
        kv: &mut kvs[0],
        tokens: &feed,
        mix: BASE_MIX,
        want: WantLogits::All,
    }];
    let l = model.forward(&mut steps, &DenseProjector, &pool)?.remove(0);
    let l: Tensor = l.expect("logits");
    let picks = l
        .narrow(0, prompt.len() - 1, want.len())?
        .argmax(candle_core::D::Minus1)?
        .to_vec1::<u32>()?;
    let same = picks.iter().zip(want).filter(|(a, b)| a == b).count();
    Ok(same as f64 / want.len() as f64)
}

/// Tokens before the first difference.
fn agree(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
