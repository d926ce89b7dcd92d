//! `t2 bench`: prefill and decode throughput for the base model, one merged mix, and 8 different mixes in
//! one batch (factored path), per target set and batch size, beside this machine's measured memory
//! bandwidth so decode speed can be read as a fraction of the hardware limit.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use clap::Args;
use serde::Serialize;
use t2_model::{random_llama, BaseWeights, Llama, LlamaConfig, SeqStep, WantLogits};
use t2_svf::decompose::{CacheDtype, CacheOptions};
use t2_svf::{Decomposition, SvfProjector, TargetSet, BASE_MIX};

use crate::common::ModelArgs;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Random weights of a known shape instead of a checkpoint: llama-3.2-1b, llama-3-8b
    #[arg(long)]
    pub random: Option<String>,
    /// Batch sizes, comma-separated
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    pub batches: Vec<usize>,
    /// Target sets, comma-separated
    #[arg(long, default_value = "mlp,all", value_delimiter = ',')]
    pub targets: Vec<TargetSet>,
    /// Modes, comma-separated: base, merged, mixes
    #[arg(long, default_value = "base,merged,mixes", value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Prompt tokens per sequence for the prefill measurement
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Decode steps measured per configuration
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    /// Measurements per configuration (prefill, then the decode steps, each time into fresh KV); every
    /// figure is their median, since a single 64-token prefill lasts about a tenth of a second
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Mixes registered; the first is the `merged` mode's, the other N-1 are spread over the `mixes` mode's
    /// rows (row i uses mix 1 + i mod (N-1)), so a batch of b rows holds min(b, N-1) different mixes
    #[arg(long, default_value_t = 8)]
    pub mixes: usize,
    /// Write the results as JSON here too
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Serialize)]
struct Row {
    targets: String,
    mode: String,
    batch: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    /// Weight bytes read per decode step.
    bytes_per_step: f64,
    /// Single-stream decode as a fraction of the bandwidth cap (bytes per step × steps/s ÷ bandwidth).
    bandwidth_fraction: f64,
    /// Shares of decode time: projections (GEMM), attention (RoPE, KV write, attention), sampling (the
    /// argmax over the vocabulary), other (embedding, norms, activations, bookkeeping).
    decode_split: StepSplit,
}

#[derive(Serialize, Clone, Copy)]
struct StepSplit {
    gemm: f64,
    attention: f64,
    sampling: f64,
    other: f64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    dtype: String,
    device: String,
    threads: usize,
    /// CPU: one packed x·Wᵀ over 1 GiB. GPU: a device-to-device copy, bytes read + written.
    bandwidth_gb_s: f64,
    /// Bytes a decode step reads from the packed weights ÷ the weights' own bytes (None: not packed).
    packed_read_ratio: Option<f64>,
    /// CPU only: the packed GEMM against the FMA peak.
    gemm: Option<GemmReport>,
    /// What stays in memory, per target set.
    resident: Vec<Resident>,
    rows: Vec<Row>,
}

/// Bytes resident for the model and one target set's factors.
#[derive(Serialize)]
struct Resident {
    targets: String,
    /// The model's weight tensors in its dtype (kept beside packed copies: the decomposition and training
    /// read them).
    weights: usize,
    /// The packed copies the CPU kernels stream (the base rows' format: f32, half or Q8).
    packed_weights: Option<usize>,
    /// U, σ and Vᵀ as loaded.
    factors: usize,
    /// Their packed copies (f32, or half beside half weights).
    packed_factors: usize,
}

/// The packed GEMM at this model's MLP up-projection shape, against the machine's FMA peak.
#[derive(Serialize)]
struct GemmReport {
    kernel: String,
    fma_peak_gflop_s: f64,
    /// (rows, GFLOP/s, fraction of the peak)
    shape: (usize, usize),
    by_rows: Vec<(usize, f64, f64)>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    for m in &a.modes {
        if !["base", "merged", "mixes"].contains(&m.as_str()) {
            bail!("unknown bench mode '{m}' (expected base, merged, mixes)");
        }
    }
    if a.batches.contains(&0)
        || a.prompt_len == 0
        || a.decode_steps == 0
        || a.repeats == 0
        || a.mixes < 2
    {
        bail!("batch sizes, --prompt-len, --decode-steps and --repeats must be positive, --mixes at least 2");
    }
    let device = a.model.device()?;
    let dtype = a.model.dtype(&device)?;
    let (model, name, real_path, sha) = match &a.random {
        Some(shape) => {
            let Some(cfg) = LlamaConfig::named(shape) else {
                bail!(
                    "unknown random shape '{shape}' (known: {})",
                    LlamaConfig::NAMED
                );
            };
            let mut model = random_llama(&cfg, dtype, &device, 7)?;
            model.set_base_weights(a.model.base_weights(&device))?;
            (model, format!("random {shape}"), None, String::new())
        }
        None => {
            let path = a.model.model_path();
            let l = a.model.load()?;
            (l.model, l.model_id, Some(path), l.weights_sha256)
        }
    };
    let bandwidth = match device.is_cpu() {
        true => measure_bandwidth(),
        false => measure_device_bandwidth(&device)?,
    };
    // The base weights' storage, where it differs from the activations' dtype (f16/bf16/q8_0 on CPU).
    let stored = model
        .base_elem()
        .filter(|e| format!("{e:?}") != format!("{dtype:?}"));
    let dtype_name = match stored {
        Some(e) => format!("{e:?} weights, {dtype:?} activations"),
        None => format!("{dtype:?}"),
    };
    // What a base decode step streams: the packed copies when they are not the model's dtype.
    let base_bytes = match stored {
        Some(_) => model.packed_weight_bytes().unwrap_or(model.weight_bytes()),
        None => model.weight_bytes(),
    };
    eprintln!(
        "{name}: {:.0} MB of weights read per step, {dtype_name} on {device:?}; measured read bandwidth {:.1} GB/s",
        base_bytes as f64 / 1e6,
        bandwidth / 1e9
    );
    let packed_read_ratio = model
        .packed_weight_bytes()
        .map(|b| b as f64 / model.weight_bytes() as f64);
    let gemm = device
        .is_cpu()
        .then(|| measure_gemm(model.cfg.intermediate_size, model.cfg.hidden_size));
    if let Some(gemm) = &gemm {
        eprintln!(
            "packed weights read per step ÷ weight bytes: {}; {} FMA peak {:.1} GFLOP/s; GEMM {}x{}: {}",
            packed_read_ratio.map_or("not packed".into(), |r| format!("{r:.4}")),
            gemm.kernel,
            gemm.fma_peak_gflop_s,
            gemm.shape.0,
            gemm.shape.1,
            gemm.by_rows
                .iter()
                .map(|(m, g, f)| format!("m={m} {g:.1} GFLOP/s ({:.0}%)", f * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut rows = Vec::new();
    let mut resident = Vec::new();
    for &targets in &a.targets {
        let decomp = match &real_path {
            Some(p) => {
                let cache_dtype = CacheDtype::for_weights(dtype, a.model.base_weights(&device));
                let opts = CacheOptions::new(targets, cache_dtype);
                Decomposition::load_or_compute_with(p, &model, &sha, &opts, true)?.0
            }
            None => Decomposition::random(&model, targets, 11)?,
        };
        // Factors beyond the dense weights, in the dtype they are streamed in (half beside half weights).
        let extra = match a.model.base_weights(&device) {
            BaseWeights::F16 | BaseWeights::BF16 => decomp.extra_bytes_factored(&model) / 2,
            _ => decomp.extra_bytes_factored(&model),
        };
        let mut svf = SvfProjector::new(decomp, a.mixes + 2, 1)?;
        match a.model.base_weights(&device) {
            BaseWeights::F16 => svf.store_factors_as(candle_core::DType::F16)?,
            BaseWeights::BF16 => svf.store_factors_as(candle_core::DType::BF16)?,
            BaseWeights::Dense | BaseWeights::Q8 => {}
        }
        let (factors, packed_factors) = svf.factor_bytes();
        let r = Resident {
            targets: targets.to_string(),
            weights: model.weight_bytes(),
            packed_weights: model.packed_weight_bytes(),
            factors,
            packed_factors,
        };
        let mb = |b: usize| format!("{:.0} MB", b as f64 / 1e6);
        eprintln!(
            "resident ({}): weights {}, packed base copies {}, U/σ/Vᵀ {}, packed factors {}",
            r.targets,
            mb(r.weights),
            r.packed_weights.map_or("none".into(), mb),
            mb(r.factors),
            mb(r.packed_factors)
        );
        resident.push(r);
        let mut leases = Vec::new();
        for k in 0..a.mixes {
            let z: BTreeMap<_, _> = svf
                .decomp
                .factors
                .iter()
                .map(|(id, f)| {
                    (
                        *id,
                        (0..f.rank())
                            .map(|i| 0.5 + 0.1 * (((i * 7 + k * 13) % 17) as f32 / 17.0 - 0.5))
                            .collect(),
                    )
                })
                .collect();
            let z = t2_svf::ZVectors::new(z);
            leases.push(svf.lease(&t2_svf::MixKey::of_vectors(&z), || Ok(z.z().clone()))?);
        }
        let ids: Vec<u32> = leases.iter().map(|l| l.id()).collect();
        if a.modes.iter().any(|m| m == "merged") {
            svf.merge(ids[0])?;
        }
        for mode in &a.modes {
            for &b in &a.batches {
                let mixes: Vec<u32> = match mode.as_str() {
                    "base" => vec![BASE_MIX; b],
                    "merged" => vec![ids[0]; b],
                    // different mixes, none merged: always the factored path
                    _ => (0..b).map(|i| ids[1 + i % (a.mixes - 1)]).collect(),
                };
                let (prefill, decode, decode_split) = measure(
                    &model,
                    &svf,
                    &mixes,
                    a.prompt_len,
                    a.decode_steps,
                    a.repeats,
                )?;
                let bytes = base_bytes as f64 + if mode == "mixes" { extra as f64 } else { 0.0 };
                let row = Row {
                    targets: targets.to_string(),
                    mode: mode.clone(),
                    batch: b,
                    prefill_tok_s: prefill,
                    decode_tok_s: decode,
                    bytes_per_step: bytes,
                    bandwidth_fraction: bytes * (decode / b as f64) / bandwidth,
                    decode_split,
                };
                let s = decode_split;
                eprintln!(
                    "  {:<4} {:<7} b={:<3} prefill {:>8.1} tok/s  decode {:>8.1} tok/s  (decode: GEMM {:.0}%, attention {:.0}%, sampling {:.0}%, other {:.0}%)",
                    row.targets, row.mode, b, prefill, decode,
                    s.gemm * 100.0, s.attention * 100.0, s.sampling * 100.0, s.other * 100.0
                );
                rows.push(row);
            }
        }
    }
    let report = Report {
        model: name,
        dtype: dtype_name,
        device: format!("{device:?}"),
        threads: candle_core::utils::get_num_threads(),
        bandwidth_gb_s: bandwidth / 1e9,
        packed_read_ratio,
        gemm,
        resident,
        rows,
    };
    print_table(&report);
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(p) = &a.json {
        std::fs::write(p, &json)?;
    }
    Ok(())
}

/// Prefill `prompt_len` tokens for each sequence in one step, then decode `steps` tokens for all of them;
/// `repeats` times, giving the median prefill and decode speeds (the split from the median decode run).
fn measure(
    model: &Llama,
    svf: &SvfProjector,
    mixes: &[u32],
    prompt_len: usize,
    steps: usize,
    repeats: usize,
) -> Result<(f64, f64, StepSplit)> {
    let vocab = model.cfg.vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..mixes.len())
        .map(|s| {
            (0..prompt_len)
                .map(|i| ((i * 31 + s * 7 + 1) as u32) % vocab)
                .collect()
        })
        .collect();
    let run = |steps: usize| -> Result<(f64, f64, StepSplit)> {
        let (pool, mut caches) = model.pool_for(&vec![prompt_len + steps; mixes.len()])?;
        let t0 = Instant::now();
        let mut step: Vec<SeqStep> = caches
            .iter_mut()
            .zip(&prompts)
            .zip(mixes)
            .map(|((c, p), &m)| SeqStep {
                kv: c,
                tokens: p,
                mix: m,
                want: WantLogits::Last,
            })
            .collect();
        let mut last = next_tokens(model.forward(&mut step, svf, &pool)?)?;
        let prefill = (mixes.len() * prompt_len) as f64 / t0.elapsed().as_secs_f64();
        t2_model::profile::enable(true);
        let t1 = Instant::now();
        for _ in 0..steps {
            let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
            let mut step: Vec<SeqStep> = caches
                .iter_mut()
                .zip(&toks)
                .zip(mixes)
                .map(|((c, t), &m)| SeqStep {
                    kv: c,
                    tokens: t,
                    mix: m,
                    want: WantLogits::Last,
                })
                .collect();
            let logits = model.forward(&mut step, svf, &pool)?;
            let _sampling = t2_model::profile::span(t2_model::profile::Phase::Sampling);
            last = next_tokens(logits)?;
        }
        let total = t1.elapsed().as_secs_f64();
        let [gemm, attention, sampling] =
            t2_model::profile::totals().map(|d| d.as_secs_f64() / total);
        t2_model::profile::enable(false);
        let split = StepSplit {
            gemm,
            attention,
            sampling,
            other: (1.0 - gemm - attention - sampling).max(0.0),
        };
        Ok((prefill, (mixes.len() * steps) as f64 / total, split))
    };
    run(2)?; // warm-up: first-touch allocations, thread pools
    let mut runs = (0..repeats)
        .map(|_| run(steps))
        .collect::<Result<Vec<_>>>()?;
    let mut prefills: Vec<f64> = runs.iter().map(|r| r.0).collect();
    prefills.sort_by(f64::total_cmp);
    runs.sort_by(|a, b| a.1.total_cmp(&b.1));
    let (_, decode, split) = runs.swap_remove(runs.len() / 2);
    Ok((prefills[prefills.len() / 2], decode, split))
}

/// Each row's argmax, taken where the logits are (on a GPU only the token ids come back).
fn next_tokens(logits: Vec<Option<Tensor>>) -> Result<Vec<u32>> {
    let rows = logits
        .into_iter()
        .map(|l| l.ok_or_else(|| anyhow::anyhow!("a row returned no logits")))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?
        .argmax(candle_core::D::Minus1)?
        .to_vec1::<u32>()?)
}

/// A device's memory bandwidth as a copy sees it: (bytes read + bytes written) ÷ time, best of 5, over a
/// 2 GiB buffer.
fn measure_device_bandwidth(device: &candle_core::Device) -> Result<f64> {
    let n = 1usize << 29;
    let x = Tensor::ones(n, candle_core::DType::F32, device)?;
    let mut best = 0f64;
    for _ in 0..6 {
        device.synchronize()?;
        let t0 = Instant::now();
        let y = x.copy()?;
        device.synchronize()?;
        best = best.max((2 * n * 4) as f64 / t0.elapsed().as_secs_f64());
        drop(y);
    }
    Ok(best)
}

/// Read bandwidth as the decode kernel sees it: one packed x·Wᵀ over a 1 GiB matrix, best of 3.
fn measure_bandwidth() -> f64 {
    let (rows, cols) = (262_144, 1024);
    let dev = candle_core::Device::Cpu;
    let w = Tensor::ones((rows, cols), candle_core::DType::F32, &dev).expect("1 GiB buffer");
    let p = t2_model::kernels::pack(&w);
    let x = Tensor::ones((1, cols), candle_core::DType::F32, &dev).expect("vector");
    let mut best = 0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        std::hint::black_box(
            t2_model::kernels::linear_packed(&x, Some(&w), p.as_ref()).expect("bandwidth probe"),
        );
        best = best.max((rows * cols * 4) as f64 / t0.elapsed().as_secs_f64());
    }
    best
}

/// GFLOP/s of the packed GEMM for W (n, k) at 1, 16, 64 and 256 rows (best of 5 after a warm-up), beside
/// the FMA peak measured with the same vectors.
fn measure_gemm(n: usize, k: usize) -> GemmReport {
    use t2_model::gemm::{fma_peak_gflops, Isa, PackedWeight};
    let isa = Isa::detect();
    let peak = fma_peak_gflops(isa);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
        .collect();
    let p = PackedWeight::pack(&w, n, k).expect("a non-empty matrix");
    let by_rows = [1usize, 16, 64, 256]
        .into_iter()
        .map(|m| {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
                .collect();
            let mut y = vec![0f32; m * n];
            let reps = (4e8 / (2.0 * (m * n * k) as f64)).clamp(2.0, 100.0) as usize;
            p.matmul(&x, m, &mut y);
            let best = (0..5)
                .map(|_| {
                    let t0 = Instant::now();
                    for _ in 0..reps {
                        p.matmul(std::hint::black_box(&x), m, &mut y);
                    }
                    t0.elapsed().as_secs_f64() / reps as f64
                })
                .fold(f64::INFINITY, f64::min);
            let g = 2.0 * (m * n * k) as f64 / best / 1e9;
            (m, g, g / peak)
        })
        .collect();
    GemmReport {
        kernel: format!("{isa:?}"),
        fma_peak_gflop_s: peak,
        shape: (n, k),
        by_rows,
    }
}

fn print_table(r: &Report) {
    println!(
        "\n{} ({}, {}, {} threads), memory bandwidth {:.1} GB/s",
        r.model, r.dtype, r.device, r.threads, r.bandwidth_gb_s
    );
    println!(
        "packed weights read per decode step ÷ weight bytes: {}",
        r.packed_read_ratio
            .map_or("not packed".into(), |v| format!("{v:.4}"))
    );
    if let Some(g) = &r.gemm {
        println!(
            "GEMM {}x{} ({}), FMA peak {:.1} GFLOP/s: {}",
            g.shape.0,
            g.shape.1,
            g.kernel,
            g.fma_peak_gflop_s,
            g.by_rows
                .iter()
                .map(|(m, g, f)| format!("m={m} {g:.1} GFLOP/s ({:.0}% of peak)", f * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("| targets | mode | batch | prefill tok/s | decode tok/s | vs base | MB/step | bw fraction | decode: GEMM / attention / sampling / other |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in &r.rows {
        let base = r
            .rows
            .iter()
            .find(|b| b.targets == row.targets && b.mode == "base" && b.batch == row.batch)
            .map(|b| row.decode_tok_s / b.decode_tok_s)
            .unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.0} | {:.2} | {:.0}% / {:.0}% / {:.0}% / {:.0}% |",
            row.targets,
            row.mode,
            row.batch,
            row.prefill_tok_s,
            row.decode_tok_s,
            base,
            row.bytes_per_step / 1e6,
            row.bandwidth_fraction,
            row.decode_split.gemm * 100.0,
            row.decode_split.attention * 100.0,
            row.decode_split.sampling * 100.0,
            row.decode_split.other * 100.0
        );
    }
}
