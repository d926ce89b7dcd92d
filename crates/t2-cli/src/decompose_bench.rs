//! `t2 decompose-bench`: how long the SVD of each distinct target-matrix shape of a model takes (one random
//! matrix per shape, faer on the CPU or cuSOLVER on a GPU), extrapolated to every target matrix, with the
//! size of the cache in f32 and bf16 beside the model's.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;
use t2_model::{LlamaConfig, ProjKind};
use t2_svf::decompose::{cache_bytes, random_matrix, svd_host, target_shapes, CacheDtype};
use t2_svf::TargetSet;

#[derive(Args, Debug)]
pub struct DecomposeBenchArgs {
    /// Model shape: llama-3-8b, llama-3.2-1b or tiny
    #[arg(long, default_value = "llama-3-8b")]
    pub shape: String,
    /// Projection kinds to time, comma-separated (q,k,v,o,gate,up,down); kinds sharing a shape are timed
    /// once [default: all]
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// cpu (faer, f64) or cuda / cuda:N (cuSOLVER, f32; needs a binary built with the cuda feature)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Write the results as JSON here (rewritten after every shape, so a cut-short run leaves its part)
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seed of the random matrices
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

#[derive(Serialize, Clone)]
struct ShapeTiming {
    kinds: Vec<String>,
    out: usize,
    inp: usize,
    svd_s: f64,
    /// CPU seconds the process used for this shape (SVD and check; all threads): on a shared machine the
    /// wall time depends on what else runs, this much less.
    cpu_s: Option<f64>,
    /// Reconstruction check on the CPU (0 on the GPU path, whose error is checked on the host, untimed).
    check_s: f64,
    rel_error: f64,
}

#[derive(Serialize)]
struct Report {
    shape: String,
    device: String,
    engine: String,
    cpu_cores: usize,
    layers: usize,
    timings: Vec<ShapeTiming>,
    /// Σ over the 7 kinds × layers of svd_s (+ check_s); null unless every kind was timed.
    all_targets: Option<Extrapolation>,
    /// The same for gate, up, down only.
    mlp_targets: Option<Extrapolation>,
    sizes: Sizes,
}

#[derive(Serialize)]
struct Extrapolation {
    matrices: usize,
    svd_s: f64,
    with_check_s: f64,
}

#[derive(Serialize)]
struct Sizes {
    /// Dense weights of the whole model (embeddings, head, norms, projections) in bf16.
    model_bf16_bytes: u64,
    /// Dense target matrices alone, bf16.
    targets_bf16_bytes: u64,
    cache_all_f32_bytes: u64,
    cache_all_bf16_bytes: u64,
    cache_mlp_f32_bytes: u64,
    cache_mlp_bf16_bytes: u64,
}

fn kind_of(s: &str) -> Result<ProjKind> {
    let k = match s.trim().trim_end_matches("_proj") {
        "q" => ProjKind::Q,
        "k" => ProjKind::K,
        "v" => ProjKind::V,
        "o" => ProjKind::O,
        "gate" => ProjKind::Gate,
        "up" => ProjKind::Up,
        "down" => ProjKind::Down,
        other => bail!("unknown projection '{other}' (expected q, k, v, o, gate, up, down)"),
    };
    Ok(k)
}

fn short(k: ProjKind) -> String {
    k.name().trim_end_matches("_proj").to_string()
}

/// Bytes as GiB, or MiB below one GiB.
pub fn gib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

pub fn run(a: DecomposeBenchArgs) -> Result<()> {
    let cfg = match a.shape.as_str() {
        "llama-3-8b" => LlamaConfig::llama_3_8b(),
        "llama-3.2-1b" => LlamaConfig::llama_3_2_1b(),
        "tiny" => LlamaConfig::tiny(),
        other => bail!("unknown shape '{other}' (known: llama-3-8b, llama-3.2-1b, tiny)"),
    };
    let wanted: Vec<ProjKind> = if a.only.is_empty() {
        ProjKind::ALL.to_vec()
    } else {
        a.only.iter().map(|s| kind_of(s)).collect::<Result<_>>()?
    };
    let gpu = match a.device.as_str() {
        "cpu" => None,
        s if s == "cuda" || s.starts_with("cuda:") => Some(match s.strip_prefix("cuda:") {
            Some(n) => n
                .parse::<usize>()
                .map_err(|_| anyhow::anyhow!("bad device '{s}'"))?,
            None => 0,
        }),
        other => bail!("unknown device '{other}' (expected cpu, cuda or cuda:N)"),
    };
    if let Some(ordinal) = gpu {
        crate::gpu_svd::probe(ordinal)?;
    }
    let shapes = target_shapes(&cfg);
    // Distinct shapes, in model order, each with the kinds that have it.
    let mut distinct: Vec<((usize, usize), Vec<ProjKind>)> = Vec::new();
    for (k, s) in &shapes {
        match distinct.iter_mut().find(|(d, _)| d == s) {
            Some((_, ks)) => ks.push(*k),
            None => distinct.push((*s, vec![*k])),
        }
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let layers = cfg.num_layers;
    let sizes = {
        let per = |set: TargetSet, d: CacheDtype| {
            cache_bytes(
                shapes
                    .iter()
                    .filter(|(k, _)| set.contains(*k))
                    .flat_map(|(_, s)| std::iter::repeat_n(*s, layers)),
                d,
            )
        };
        let targets: u64 =
            shapes.iter().map(|(_, (o, i))| (o * i) as u64).sum::<u64>() * layers as u64;
        let heads = if cfg.tie_word_embeddings { 1 } else { 2 };
        let other =
            (cfg.vocab_size * cfg.hidden_size * heads + cfg.hidden_size * (2 * layers + 1)) as u64;
        Sizes {
            model_bf16_bytes: (targets + other) * 2,
            targets_bf16_bytes: targets * 2,
            cache_all_f32_bytes: per(TargetSet::All, CacheDtype::F32),
            cache_all_bf16_bytes: per(TargetSet::All, CacheDtype::Bf16),
            cache_mlp_f32_bytes: per(TargetSet::Mlp, CacheDtype::F32),
            cache_mlp_bf16_bytes: per(TargetSet::Mlp, CacheDtype::Bf16),
        }
    };
    let mut report = Report {
        shape: a.shape.clone(),
        device: a.device.clone(),
        engine: match gpu {
            None => "faer thin SVD, f64".into(),
            Some(_) => "cuSOLVER gesvdj, f32".into(),
        },
        cpu_cores: cores,
        layers,
        timings: Vec::new(),
        all_targets: None,
        mlp_targets: None,
        sizes,
    };
    println!(
        "SVD timing at the {} shapes on {} ({}, {cores} CPU cores)",
        a.shape, a.device, report.engine
    );
    println!(
        "{:<16} {:>12} {:>10} {:>10} {:>10} {:>12}",
        "kinds", "shape", "svd s", "check s", "cpu s", "rel. error"
    );
    for (i, ((out, inp), kinds)) in distinct.iter().enumerate() {
        if !kinds.iter().any(|k| wanted.contains(k)) {
            continue;
        }
        let data = random_matrix(*out, *inp, a.seed + i as u64);
        let cpu0 = process_cpu_s();
        let t = match gpu {
            None => {
                let h = svd_host(&data, *out, *inp, CacheDtype::F32)
                    .map_err(|e| anyhow::anyhow!("{out}x{inp}: {e}"))?;
                (h.svd_s, h.check_s, h.rel_error)
            }
            Some(ordinal) => {
                let (s, rel) = crate::gpu_svd::time_svd(ordinal, &data, *out, *inp)?;
                (s, 0.0, rel)
            }
        };
        let row = ShapeTiming {
            kinds: kinds.iter().map(|k| short(*k)).collect(),
            out: *out,
            inp: *inp,
            svd_s: t.0,
            cpu_s: cpu0.zip(process_cpu_s()).map(|(a, b)| b - a),
            check_s: t.1,
            rel_error: t.2,
        };
        println!(
            "{:<16} {:>12} {:>10.2} {:>10.2} {:>10.1} {:>12.2e}",
            row.kinds.join(","),
            format!("{out}x{inp}"),
            row.svd_s,
            row.check_s,
            row.cpu_s.unwrap_or(f64::NAN),
            row.rel_error
        );
        report.timings.push(row);
        extrapolate(&mut report, &shapes);
        if let Some(p) = &a.json {
            std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
        }
    }
    extrapolate(&mut report, &shapes);
    for (what, e) in [
        ("all targets", &report.all_targets),
        ("mlp targets", &report.mlp_targets),
    ] {
        match e {
            Some(e) => println!(
                "{what}: {} matrices, SVD {:.0}s ({:.1} min), with checks {:.0}s ({:.1} min)",
                e.matrices,
                e.svd_s,
                e.svd_s / 60.0,
                e.with_check_s,
                e.with_check_s / 60.0
            ),
            None => println!("{what}: not every shape was timed (see --only)"),
        }
    }
    let s = &report.sizes;
    println!(
        "model weights (bf16) {}, its target matrices {}",
        gib(s.model_bf16_bytes),
        gib(s.targets_bf16_bytes)
    );
    println!(
        "cache: all targets {} f32 / {} bf16; mlp only {} f32 / {} bf16",
        gib(s.cache_all_f32_bytes),
        gib(s.cache_all_bf16_bytes),
        gib(s.cache_mlp_f32_bytes),
        gib(s.cache_mlp_bf16_bytes)
    );
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// User + system CPU seconds of this process so far (Linux; None elsewhere).
fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // fields after the parenthesised command name; utime and stime are the 14th and 15th overall
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn extrapolate(report: &mut Report, shapes: &[(ProjKind, (usize, usize))]) {
    let per_kind: BTreeMap<ProjKind, (f64, f64)> = shapes
        .iter()
        .filter_map(|(k, s)| {
            report
                .timings
                .iter()
                .find(|t| (t.out, t.inp) == *s)
                .map(|t| (*k, (t.svd_s, t.svd_s + t.check_s)))
        })
        .collect();
    let sum = |set: TargetSet| -> Option<Extrapolation> {
        let kinds = set.kinds();
        if !kinds.iter().all(|k| per_kind.contains_key(k)) {
            return None;
        }
        let l = report.layers as f64;
        Some(Extrapolation {
            matrices: kinds.len() * report.layers,
            svd_s: kinds.iter().map(|k| per_kind[k].0).sum::<f64>() * l,
            with_check_s: kinds.iter().map(|k| per_kind[k].1).sum::<f64>() * l,
        })
    };
    report.all_targets = sum(TargetSet::All);
    report.mlp_targets = sum(TargetSet::Mlp);
}
