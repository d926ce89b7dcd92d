//! Options and helpers shared by the subcommands: finding the model, choosing the device, opening an engine.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use t2_engine::{Engine, EngineConfig};
use t2_model::{BaseWeights, LoadedModel};
use t2_svf::decompose::{CacheDtype, CacheOptions};
use t2_svf::{Decomposition, TargetSet};

pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// A .gguf file or an HF checkpoint folder [default: $T2_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf]
    #[arg(long, env = "T2_MODEL")]
    pub model: Option<PathBuf>,
    /// cpu, cuda or cuda:N [default: a GPU when built with cuda and one is present, else cpu]
    #[arg(long)]
    pub device: Option<String>,
    /// Precision: f32, f16, bf16, or q8_0. On CPU it is the base weights' storage (q8_0: 8 bits with a
    /// scale per 32) and activations stay f32; on a GPU, weights and activations [default: f32 on CPU,
    /// bf16 on GPU]
    #[arg(long)]
    pub dtype: Option<String>,
}

#[derive(Args, Clone, Debug)]
pub struct SvfArgs {
    /// Matrices SVF adapts: mlp, attn or all
    #[arg(long, default_value = "all")]
    pub targets: TargetSet,
    /// Precision of the SVF factors' cache file to load, or to write when none serves: f32, or bf16
    /// (half the file; an f32 cache serves a bf16 request too) [default: bf16 when the weights run in
    /// bf16, else f32]
    #[arg(long)]
    pub cache_dtype: Option<CacheDtype>,
    /// Root of the expert store (experts/<model-id>/manifest.json)
    #[arg(long, env = "T2_EXPERTS", default_value = "experts")]
    pub experts_dir: PathBuf,
}

#[derive(Args, Clone, Debug)]
pub struct DecomposeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Matrices to decompose: mlp, attn or all
    #[arg(long, default_value = "all")]
    pub targets: TargetSet,
    /// Precision of the cached U and Vᵀ: f32, or bf16 (half the size; reconstruction error ≈ 2e-3)
    #[arg(long, default_value = "f32")]
    pub cache_dtype: CacheDtype,
    /// Matrices decomposed at once [default: the CPU cores]; each holds one matrix's working set
    #[arg(long)]
    pub workers: Option<usize>,
    /// Recompute even when a valid cache exists
    #[arg(long)]
    pub force: bool,
}

impl ModelArgs {
    /// The model path: --model, $T2_MODEL, else the default model in ./models or beside the binary's repo.
    pub fn model_path(&self) -> PathBuf {
        if let Some(p) = &self.model {
            return p.clone();
        }
        let local = PathBuf::from(DEFAULT_MODEL);
        if local.exists() {
            return local;
        }
        // target/{debug,release}/t2 → the repository root
        if let Some(root) = std::env::current_exe()
            .ok()
            .and_then(|e| e.ancestors().nth(3).map(Path::to_path_buf))
        {
            let p = root.join(DEFAULT_MODEL);
            if p.exists() {
                return p;
            }
        }
        local
    }

    pub fn device(&self) -> Result<Device> {
        parse_device(self.device.as_deref())
    }

    pub fn dtype(&self, device: &Device) -> Result<DType> {
        match self.dtype.as_deref() {
            None if device.is_cpu() => Ok(DType::F32),
            None => Ok(DType::BF16),
            Some("f32") => Ok(DType::F32),
            // On CPU, half precision is the weights' storage; activations stay f32 (see BaseWeights).
            Some("f16" | "bf16" | "q8_0") if device.is_cpu() => Ok(DType::F32),
            Some("f16") => Ok(DType::F16),
            Some("bf16") => Ok(DType::BF16),
            Some("q8_0") => bail!("--dtype q8_0 runs on the CPU only (use bf16 or f16 on a GPU)"),
            Some(other) => bail!("unknown dtype '{other}' (expected f32, f16, bf16 or q8_0)"),
        }
    }

    /// How the base weights are held: on CPU, 8-bit for `--dtype q8_0` and half for f16/bf16 (beside f32
    /// activations); else in the dtype.
    pub fn base_weights(&self, device: &Device) -> BaseWeights {
        match (self.dtype.as_deref(), device.is_cpu()) {
            (Some("q8_0"), _) => BaseWeights::Q8,
            (Some("f16"), true) => BaseWeights::F16,
            (Some("bf16"), true) => BaseWeights::BF16,
            _ => BaseWeights::Dense,
        }
    }

    pub fn load(&self) -> Result<LoadedModel> {
        let device = self.device()?;
        let dtype = self.dtype(&device)?;
        let mut l = LoadedModel::load(&self.model_path(), &device, dtype)?;
        l.model.set_base_weights(self.base_weights(&device))?;
        Ok(l)
    }
}

pub fn parse_device(spec: Option<&str>) -> Result<Device> {
    match spec {
        None => Ok(default_device()),
        Some("cpu") => Ok(Device::Cpu),
        Some(s) if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().with_context(|| format!("bad device '{s}'"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("device '{s}' requested but this binary was built without the cuda feature");
            }
            Ok(untracked(Device::new_cuda(ordinal)?)?)
        }
        Some(other) => bail!("unknown device '{other}' (expected cpu, cuda or cuda:N)"),
    }
}

fn default_device() -> Device {
    if candle_core::utils::cuda_is_available() {
        if let Ok(d) = Device::new_cuda(0).and_then(untracked) {
            return d;
        }
    }
    Device::Cpu
}

/// The device with candle's per-tensor CUDA event tracking off: t2 runs every kernel on the device's one
/// stream, where ordering needs no events, and recording one per op costs host time on every launch.
fn untracked(device: Device) -> candle_core::Result<Device> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // SAFETY: no tensor of this device is used on another stream (t2 never creates one).
        unsafe { d.disable_event_tracking() };
    }
    Ok(device)
}

pub fn engine_config(m: &ModelArgs, s: &SvfArgs, svf: bool) -> Result<EngineConfig> {
    let device = m.device()?;
    let dtype = m.dtype(&device)?;
    let base_weights = m.base_weights(&device);
    Ok(EngineConfig {
        model_path: m.model_path(),
        device,
        dtype,
        base_weights,
        targets: s.targets,
        cache_dtype: s
            .cache_dtype
            .unwrap_or_else(|| CacheDtype::for_weights(dtype, base_weights)),
        experts_dir: s.experts_dir.clone(),
        svf,
        progress: true,
        ..EngineConfig::new(m.model_path())
    })
}

pub fn open_engine(m: &ModelArgs, s: &SvfArgs, svf: bool) -> Result<Engine> {
    Ok(Engine::open(&engine_config(m, s, svf)?)?)
}

/// Streams the decomposition from the checkpoint file(s) to the cache: the model is never loaded; per
/// worker one matrix is read, converted to f32 and decomposed at a time, its factors written out at once.
/// An existing cache is checked (weights hash, checksum, shapes, errors) without loading its factors.
pub fn decompose(a: DecomposeArgs) -> Result<()> {
    let path = a.model.model_path();
    let t0 = Instant::now();
    let source = t2_svf::checkpoint::CheckpointMatrices::open(&path)?;
    let open_s = t0.elapsed().as_secs_f64();
    let sha = source.weights_sha256.clone();
    let opts = CacheOptions {
        targets: a.targets,
        dtype: a.cache_dtype,
        workers: a.workers,
    };
    let cache = Decomposition::cache_path_for(&path, a.targets, a.cache_dtype);
    if a.force {
        let _ = std::fs::remove_file(&cache);
    }
    let t1 = Instant::now();
    let mut warm = None;
    if cache.exists() {
        match Decomposition::verify(&cache, &source, &sha) {
            Ok(s) if s.targets.covers(a.targets) => warm = Some(s),
            Ok(_) => {}
            Err(e) => println!("rejected the old cache: {e}"),
        }
    }
    let was_warm = warm.is_some();
    let summary = match warm {
        Some(s) => s,
        None => Decomposition::compute_to_file(&source, &sha, &opts, &cache, true)?,
    };
    let secs = t1.elapsed().as_secs_f64();
    println!(
        "{:<28} {:>11} {:>6} {:>14}",
        "matrix", "shape", "rank", "rel. error"
    );
    for m in &summary.matrices {
        println!(
            "{:<28} {:>11} {:>6} {:>14.3e}",
            m.id.name(),
            format!("{}x{}", m.shape.0, m.shape.1),
            m.rank,
            m.rel_error
        );
    }
    let expert_size: usize = summary.matrices.iter().map(|m| m.rank).sum();
    println!(
        "{} matrices ({}), max relative reconstruction error {:.3e} (limit {:.0e} for {}), {expert_size} numbers per expert",
        summary.matrices.len(),
        a.targets,
        summary.max_rel_error(),
        summary.dtype.max_rel_error(),
        summary.dtype,
    );
    let dense: u64 = summary
        .matrices
        .iter()
        .map(|m| (m.shape.0 * m.shape.1 * 2) as u64)
        .sum();
    println!(
        "cache {} ({}): {}; model weights on disk {}, its {} target matrices in bf16 {}",
        cache.display(),
        summary.dtype,
        crate::decompose_bench::gib(summary.bytes),
        crate::decompose_bench::gib(source.file_bytes),
        a.targets,
        crate::decompose_bench::gib(dense),
    );
    match was_warm {
        true => println!(
            "warm start: checked {} in {secs:.2}s (checkpoint index {open_s:.2}s)",
            cache.display()
        ),
        false => println!(
            "decomposed in {secs:.2}s, saved to {} (checkpoint index and hash {open_s:.2}s)",
            cache.display()
        ),
    }
    Ok(())
}
