//! Options and helpers shared by the subcommands: finding the model, choosing the device, opening an engine.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use t2_engine::{Engine, EngineConfig};
use t2_model::LoadedModel;
use t2_svf::decompose::Origin;
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
    /// Weight and activation precision: f32, f16 or bf16 [default: f32 on CPU, bf16 on GPU]
    #[arg(long)]
    pub dtype: Option<String>,
}

#[derive(Args, Clone, Debug)]
pub struct SvfArgs {
    /// Matrices SVF adapts: mlp, attn or all
    #[arg(long, default_value = "all")]
    pub targets: TargetSet,
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
            Some("f16") => Ok(DType::F16),
            Some("bf16") => Ok(DType::BF16),
            Some(other) => bail!("unknown dtype '{other}' (expected f32, f16 or bf16)"),
        }
    }

    pub fn load(&self) -> Result<LoadedModel> {
        let device = self.device()?;
        let dtype = self.dtype(&device)?;
        Ok(LoadedModel::load(&self.model_path(), &device, dtype)?)
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
    Ok(EngineConfig {
        model_path: m.model_path(),
        device,
        dtype,
        targets: s.targets,
        experts_dir: s.experts_dir.clone(),
        svf,
        progress: true,
        ..EngineConfig::new(m.model_path())
    })
}

pub fn open_engine(m: &ModelArgs, s: &SvfArgs, svf: bool) -> Result<Engine> {
    Ok(Engine::open(&engine_config(m, s, svf)?)?)
}

pub fn decompose(a: DecomposeArgs) -> Result<()> {
    let t0 = Instant::now();
    let loaded = a.model.load()?;
    let load_s = t0.elapsed().as_secs_f64();
    let path = a.model.model_path();
    let cache = Decomposition::cache_path(&path, a.targets);
    if a.force {
        let _ = std::fs::remove_file(&cache);
    }
    let t1 = Instant::now();
    let (d, origin) = Decomposition::load_or_compute(
        &path,
        &loaded.model,
        &loaded.weights_sha256,
        a.targets,
        true,
    )?;
    let secs = t1.elapsed().as_secs_f64();
    println!(
        "{:<28} {:>8} {:>6} {:>14}",
        "matrix", "shape", "rank", "rel. error"
    );
    for (id, f) in &d.factors {
        let w = &loaded
            .model
            .linear(*id)
            .expect("decomposed matrices exist")
            .weight;
        let (o, i) = w.dims2()?;
        println!(
            "{:<28} {:>8} {:>6} {:>14.3e}",
            id.name(),
            format!("{o}x{i}"),
            f.rank(),
            f.rel_error
        );
    }
    println!(
        "{} matrices ({}), max relative reconstruction error {:.3e} (limit {:.0e}), {} numbers per expert",
        d.factors.len(),
        d.targets,
        d.max_rel_error(),
        t2_svf::decompose::MAX_REL_ERROR,
        d.expert_size()
    );
    match origin {
        Origin::Loaded(p) => println!(
            "warm start: loaded {} in {secs:.2}s (model load {load_s:.2}s)",
            p.display()
        ),
        Origin::Computed { saved_to, rejected } => {
            if let Some(r) = rejected {
                println!("rejected the old cache: {r}");
            }
            println!(
                "decomposed in {secs:.2}s, saved to {} (model load {load_s:.2}s)",
                saved_to.display()
            );
        }
    }
    Ok(())
}
