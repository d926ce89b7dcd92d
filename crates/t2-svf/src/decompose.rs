//! W = U·diag(σ)·Vᵀ for every target matrix, computed once in f64 (faer) and cached beside the model as
//! safetensors (factors in f32, or bf16 to halve the file), with enough metadata to refuse a cache that
//! belongs to other weights or is damaged.
//!
//! The cache is written as a stream ([`Decomposition::compute_to_file`]): one matrix at a time per worker
//! is converted to f32, decomposed, and its factors written at their place in the file before the worker
//! takes the next one. Peak memory is the resident model (if any) plus, per worker, one matrix in f32 and
//! f64 with its f64 factors and faer's workspace, then the check's copies (≈ 50 bytes per element: 2.9 GB
//! measured for a 14336×4096 matrix); never the whole model in f32, never all the factors. The default
//! number of workers keeps that under half the available memory.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use t2_model::{BaseWeights, Llama, ProjId};

use crate::error::{Result, SvfError};
use crate::targets::TargetSet;

/// Bumped whenever the cache layout or the meaning of its contents changes. v2: the checksum is the
/// sha256 of the per-tensor sha256s (in name order), so the file can be written out of order.
const CACHE_FORMAT: &str = "t2-svd-v2";
/// Still read: same tensors and metadata, checksum over the concatenated data in name order.
const CACHE_FORMAT_V1: &str = "t2-svd-v1";
/// What the decomposition hash (which experts are tied to) is made from: the factors' meaning did not
/// change with the file format, nor does it with the storage precision, so neither enters the hash.
const DECOMPOSITION_ID: &str = "t2-svd-v1";
/// ‖U·diag(σ)·Vᵀ − W‖_F / ‖W‖_F above this means the factors do not stand for the weights (f32 factors).
pub const MAX_REL_ERROR: f64 = 1e-5;
/// The same limit for factors stored in bf16 (8 bits of mantissa: rounding alone gives ≈ 2e-3).
pub const MAX_REL_ERROR_BF16: f64 = 1e-2;

/// Precision of U and Vᵀ in the cache file (σ is always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CacheDtype {
    #[default]
    F32,
    Bf16,
}

impl CacheDtype {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }

    pub fn size_in_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
        }
    }

    /// The reconstruction error a cache of this precision may have.
    pub fn max_rel_error(self) -> f64 {
        match self {
            Self::F32 => MAX_REL_ERROR,
            Self::Bf16 => MAX_REL_ERROR_BF16,
        }
    }

    /// The precision a server asks of the cache when none is named: bf16 where the factors end up in
    /// bf16 anyway (a bf16 model on a GPU, or bf16-stored weights on the CPU), which halves the file and
    /// the load; f32 otherwise (f16 keeps two more mantissa bits than a bf16 cache would give it). A bf16
    /// request is also served by an f32 cache, so an existing one is never computed again.
    pub fn for_weights(dtype: DType, base: BaseWeights) -> Self {
        match (dtype, base) {
            (DType::BF16, _) | (_, BaseWeights::BF16) => Self::Bf16,
            _ => Self::F32,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }

    /// `x` as stored (rounded to bf16 where the cache is bf16), back in f32.
    fn round(self, x: f32) -> f32 {
        match self {
            Self::F32 => x,
            Self::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    fn bytes(self, v: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::Bf16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
        }
    }
}

impl fmt::Display for CacheDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CacheDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown cache dtype '{other}' (expected f32 or bf16)"
            )),
        }
    }
}

/// What to decompose and how to store it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheOptions {
    pub targets: TargetSet,
    pub dtype: CacheDtype,
    /// Matrices decomposed at once [default: the machine's cores, fewer where their working sets would
    /// not fit in half the available memory]; each holds one matrix's working set.
    pub workers: Option<usize>,
}

impl CacheOptions {
    pub fn new(targets: TargetSet, dtype: CacheDtype) -> Self {
        Self {
            targets,
            dtype,
            workers: None,
        }
    }
}

/// The factors of one matrix W (out × in), r = min(out, in).
pub struct Factors {
    /// (out, r); None once released (a server then holds U only in the CPU's packed layout).
    u: Option<Tensor>,
    /// (r,), descending, f32
    pub sigma: Tensor,
    /// (r, in); released with `u`.
    vt: Option<Tensor>,
    /// σ on the host, for scale computations.
    pub sigma_host: Vec<f32>,
    pub rel_error: f64,
    pub out: usize,
    pub inp: usize,
}

impl Factors {
    pub fn new(u: Tensor, sigma: Tensor, vt: Tensor, rel_error: f64) -> candle_core::Result<Self> {
        let (out, r) = u.dims2()?;
        let (_, inp) = vt.dims2()?;
        let sigma_host = sigma.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if sigma_host.len() != r || vt.dim(0)? != r {
            candle_core::bail!(
                "factors of inconsistent rank: U {:?}, σ {r}, Vᵀ {:?}",
                u.dims(),
                vt.dims()
            );
        }
        Ok(Self {
            u: Some(u),
            sigma,
            vt: Some(vt),
            sigma_host,
            rel_error,
            out,
            inp,
        })
    }

    pub fn rank(&self) -> usize {
        self.sigma_host.len()
    }

    /// U (out, r): an error once released.
    pub fn u(&self) -> candle_core::Result<&Tensor> {
        self.u.as_ref().ok_or_else(released)
    }

    /// Vᵀ (r, in): an error once released.
    pub fn vt(&self) -> candle_core::Result<&Tensor> {
        self.vt.as_ref().ok_or_else(released)
    }

    /// Drops U and Vᵀ (the caller holds packed copies); returns the bytes freed.
    pub fn release(&mut self) -> usize {
        let bytes = |t: Option<Tensor>| t.map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes());
        bytes(self.u.take()) + bytes(self.vt.take())
    }

    pub fn is_released(&self) -> bool {
        self.u.is_none()
    }
}

fn released() -> candle_core::Error {
    candle_core::Error::Msg(
        "these SVF factors were released (only their packed copies are held)".into(),
    )
}

pub struct Decomposition {
    pub targets: TargetSet,
    pub model_sha256: String,
    /// Identifies the decomposition experts are made for: the weights' hash and the cache format.
    pub hash: String,
    pub factors: BTreeMap<ProjId, Factors>,
}

/// How a decomposition came to be, for the CLI to report.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    Loaded(PathBuf),
    /// Computed (and saved); `Some(reason)` when an existing cache was rejected.
    Computed {
        saved_to: PathBuf,
        rejected: Option<String>,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Loaded(p) => write!(f, "loaded from {}", p.display()),
            Self::Computed {
                saved_to,
                rejected: None,
            } => write!(f, "computed and saved to {}", saved_to.display()),
            Self::Computed {
                saved_to,
                rejected: Some(why),
            } => write!(
                f,
                "computed and saved to {} (the old cache was rejected: {why})",
                saved_to.display()
            ),
        }
    }
}

pub fn decomposition_hash(model_sha256: &str) -> String {
    let mut h = Sha256::new();
    h.update(DECOMPOSITION_ID.as_bytes());
    h.update(model_sha256.as_bytes());
    hex::encode(h.finalize())[..16].to_string()
}

/// Where the target matrices come from, one at a time: a resident model, or a checkpoint read lazily.
pub trait MatrixSource: Sync {
    /// Every projection matrix the source has, with its (out, in) shape, in a stable order.
    fn matrices(&self) -> Vec<(ProjId, (usize, usize))>;
    /// One matrix as f32, row-major (out × in). Only this copy is made: the source keeps its own dtype.
    fn matrix_f32(&self, id: ProjId) -> std::result::Result<Vec<f32>, String>;
}

impl MatrixSource for Llama {
    fn matrices(&self) -> Vec<(ProjId, (usize, usize))> {
        self.linears().map(|l| (l.id, l.dims())).collect()
    }

    fn matrix_f32(&self, id: ProjId) -> std::result::Result<Vec<f32>, String> {
        let lin = self
            .linear(id)
            .ok_or_else(|| format!("no matrix {}", id.name()))?;
        lin.weight()
            .and_then(|t| t.to_device(&Device::Cpu))
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| e.to_string())
    }
}

/// One matrix of a cache written by [`Decomposition::compute_to_file`].
#[derive(Debug, Clone)]
pub struct MatrixReport {
    pub id: ProjId,
    pub shape: (usize, usize),
    pub rank: usize,
    pub rel_error: f64,
    /// SVD and reconstruction check, seconds.
    pub svd_s: f64,
    pub check_s: f64,
}

/// What [`Decomposition::compute_to_file`] wrote.
#[derive(Debug, Clone)]
pub struct CacheSummary {
    pub path: PathBuf,
    pub targets: TargetSet,
    pub dtype: CacheDtype,
    pub matrices: Vec<MatrixReport>,
    /// Size of the cache file.
    pub bytes: u64,
}

impl CacheSummary {
    pub fn max_rel_error(&self) -> f64 {
        self.matrices
            .iter()
            .map(|m| m.rel_error)
            .fold(0.0, f64::max)
    }
}

/// Bytes a cache of these (out, in) shapes takes: U (out×r) and Vᵀ (r×in) in `dtype`, σ (r) in f32.
pub fn cache_bytes(shapes: impl IntoIterator<Item = (usize, usize)>, dtype: CacheDtype) -> u64 {
    shapes
        .into_iter()
        .map(|(o, i)| {
            let r = o.min(i) as u64;
            (o as u64 * r + r * i as u64) * dtype.size_in_bytes() as u64 + r * 4
        })
        .sum()
}

impl Decomposition {
    /// `models/X.gguf` → `models/X.svd-all.safetensors` (for a folder: `DIR/svd-all.safetensors`).
    pub fn cache_path(model_path: &Path, targets: TargetSet) -> PathBuf {
        Self::cache_path_for(model_path, targets, CacheDtype::F32)
    }

    /// As [`Self::cache_path`]; a bf16 cache is `X.svd-all-bf16.safetensors`.
    pub fn cache_path_for(model_path: &Path, targets: TargetSet, dtype: CacheDtype) -> PathBuf {
        let suffix = match dtype {
            CacheDtype::F32 => String::new(),
            d => format!("-{d}"),
        };
        if model_path.is_dir() {
            return model_path.join(format!("svd-{targets}{suffix}.safetensors"));
        }
        let stem = model_path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        model_path.with_file_name(format!("{stem}.svd-{targets}{suffix}.safetensors"))
    }

    /// Loads the f32 cache for `targets` (or one for a wider target set), or computes and saves it.
    pub fn load_or_compute(
        model_path: &Path,
        model: &Llama,
        model_sha256: &str,
        targets: TargetSet,
        progress: bool,
    ) -> Result<(Self, Origin)> {
        Self::load_or_compute_with(
            model_path,
            model,
            model_sha256,
            &CacheOptions::new(targets, CacheDtype::F32),
            progress,
        )
    }

    /// Loads a cache for `opts.targets` (own or wider target set; for a bf16 request an f32 cache serves
    /// too), or streams a new one to disk ([`Self::compute_to_file`]) and loads it.
    pub fn load_or_compute_with(
        model_path: &Path,
        model: &Llama,
        model_sha256: &str,
        opts: &CacheOptions,
        progress: bool,
    ) -> Result<(Self, Origin)> {
        let own = Self::cache_path_for(model_path, opts.targets, opts.dtype);
        let mut candidates = vec![
            own.clone(),
            Self::cache_path_for(model_path, TargetSet::All, opts.dtype),
        ];
        if opts.dtype != CacheDtype::F32 {
            candidates.push(Self::cache_path_for(
                model_path,
                opts.targets,
                CacheDtype::F32,
            ));
            candidates.push(Self::cache_path_for(
                model_path,
                TargetSet::All,
                CacheDtype::F32,
            ));
        }
        candidates.dedup();
        let mut rejected = None;
        for path in &candidates {
            if !path.exists() {
                continue;
            }
            match Self::load(path, model, model_sha256) {
                Ok(d) if d.targets.covers(opts.targets) => {
                    return Ok((d.restricted_to(opts.targets), Origin::Loaded(path.clone())));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("{e}; rebuilding");
                    if progress {
                        eprintln!("warning: {e}; rebuilding it");
                    }
                    rejected = Some(e.to_string());
                }
            }
        }
        Self::compute_to_file(model, model_sha256, opts, &own, progress)?;
        let d = Self::load(&own, model, model_sha256)?;
        Ok((
            d,
            Origin::Computed {
                saved_to: own,
                rejected,
            },
        ))
    }

    fn restricted_to(mut self, targets: TargetSet) -> Self {
        self.factors.retain(|id, _| targets.contains(id.kind));
        self.targets = targets;
        self
    }

    /// SVD of every target matrix, in f64, spread over the machine's cores, all factors kept in memory
    /// (small models and tests; [`Self::compute_to_file`] is the streaming path).
    pub fn compute(
        model: &Llama,
        model_sha256: &str,
        targets: TargetSet,
        progress: bool,
    ) -> Result<Self> {
        let jobs: Vec<_> = model
            .matrices()
            .into_iter()
            .filter(|(id, _)| targets.contains(id.kind))
            .collect();
        let device = model.device().clone();
        let dtype = model.dtype();
        let done = Mutex::new(BTreeMap::new());
        run_workers(jobs.len(), None, progress, |i| {
            let (id, (out, inp)) = jobs[i];
            let f = model
                .matrix_f32(id)
                .and_then(|data| svd_host(&data, out, inp, CacheDtype::F32))
                .and_then(|h| h.into_factors(&device, dtype))
                .map_err(|reason| SvfError::Decompose {
                    matrix: id.name(),
                    reason,
                })?;
            done.lock().unwrap().insert(id, f);
            Ok(())
        })?;
        Ok(Self {
            targets,
            model_sha256: model_sha256.to_string(),
            hash: decomposition_hash(model_sha256),
            factors: done.into_inner().unwrap(),
        })
    }

    /// Streams the decomposition of `source`'s target matrices to a cache file at `path`: each worker
    /// converts one matrix to f32, decomposes it, writes its factors at their place in the file and drops
    /// them before taking the next. The file appears (atomically, by rename) only when complete.
    pub fn compute_to_file(
        source: &dyn MatrixSource,
        model_sha256: &str,
        opts: &CacheOptions,
        path: &Path,
        progress: bool,
    ) -> Result<CacheSummary> {
        let jobs: Vec<_> = source
            .matrices()
            .into_iter()
            .filter(|(id, _)| opts.targets.contains(id.kind))
            .collect();
        let mut layout = Vec::with_capacity(jobs.len() * 3);
        for (id, (out, inp)) in &jobs {
            let r = (*out).min(*inp);
            let name = id.name();
            layout.push((format!("{name}.u"), opts.dtype.dtype(), vec![*out, r]));
            layout.push((format!("{name}.s"), DType::F32, vec![r]));
            layout.push((format!("{name}.vt"), opts.dtype.dtype(), vec![r, *inp]));
        }
        let names: Vec<String> = jobs.iter().map(|(id, _)| id.name()).collect();
        let meta = BTreeMap::from([
            ("format".to_string(), CACHE_FORMAT.to_string()),
            ("model_sha256".into(), model_sha256.to_string()),
            ("targets".into(), opts.targets.to_string()),
            ("dtype".into(), opts.dtype.to_string()),
            (
                "decomposition_hash".into(),
                decomposition_hash(model_sha256),
            ),
        ]);
        let writer = CacheWriter::create(path, meta, &layout, &names)?;
        let reports = Mutex::new(Vec::with_capacity(jobs.len()));
        let largest = jobs.iter().map(|(_, (o, i))| o * i).max().unwrap_or(0);
        let workers = opts.workers.or_else(|| memory_bound_workers(largest));
        run_workers(jobs.len(), workers, progress, |i| {
            let (id, (out, inp)) = jobs[i];
            let name = id.name();
            let fail = |reason: String| SvfError::Decompose {
                matrix: name.clone(),
                reason,
            };
            let data = source.matrix_f32(id).map_err(fail)?;
            let h = svd_host(&data, out, inp, opts.dtype).map_err(fail)?;
            drop(data);
            writer.write(&format!("{name}.u"), &opts.dtype.bytes(&h.u))?;
            writer.write(&format!("{name}.s"), &CacheDtype::F32.bytes(&h.s))?;
            writer.write(&format!("{name}.vt"), &opts.dtype.bytes(&h.vt))?;
            writer.set_error(&name, h.rel_error);
            reports.lock().unwrap().push(MatrixReport {
                id,
                shape: (out, inp),
                rank: h.r,
                rel_error: h.rel_error,
                svd_s: h.svd_s,
                check_s: h.check_s,
            });
            Ok(())
        })?;
        let bytes = writer.finish()?;
        let mut matrices = reports.into_inner().unwrap();
        matrices.sort_by_key(|m| m.id);
        Ok(CacheSummary {
            path: path.to_path_buf(),
            targets: opts.targets,
            dtype: opts.dtype,
            matrices,
            bytes,
        })
    }

    /// Writes the cache (f32 factors) atomically (temp file + rename): a crash never leaves a half-written
    /// cache.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut layout = Vec::new();
        let mut names = Vec::new();
        for (id, f) in &self.factors {
            let name = id.name();
            layout.push((format!("{name}.u"), DType::F32, vec![f.out, f.rank()]));
            layout.push((format!("{name}.s"), DType::F32, f.sigma.dims().to_vec()));
            layout.push((format!("{name}.vt"), DType::F32, vec![f.rank(), f.inp]));
            names.push(name);
        }
        let meta = BTreeMap::from([
            ("format".to_string(), CACHE_FORMAT.to_string()),
            ("model_sha256".into(), self.model_sha256.clone()),
            ("targets".into(), self.targets.to_string()),
            ("dtype".into(), CacheDtype::F32.to_string()),
            ("decomposition_hash".into(), self.hash.clone()),
        ]);
        let writer = CacheWriter::create(path, meta, &layout, &names)?;
        for (id, f) in &self.factors {
            let name = id.name();
            for (suffix, t) in [("u", f.u()?), ("s", &f.sigma), ("vt", f.vt()?)] {
                writer.write(&format!("{name}.{suffix}"), &tensor_bytes(t)?)?;
            }
            writer.set_error(&name, f.rel_error);
        }
        writer.finish().map(|_| ())
    }

    /// Loads a cache and checks it belongs to these weights, is intact, and reconstructs them.
    pub fn load(path: &Path, model: &Llama, model_sha256: &str) -> Result<Self> {
        let checked = CheckedCache::open(path, model_sha256)?;
        let bad = |reason: String| SvfError::BadCache {
            path: path.into(),
            reason,
        };
        let st = checked.tensors()?;
        let (targets, errors) = (checked.targets, &checked.errors);
        let device = model.device();
        let dtype = model.dtype();
        let mut factors = BTreeMap::new();
        for lin in model.linears().filter(|l| targets.contains(l.id.kind)) {
            let name = lin.id.name();
            let view = |suffix: &str| {
                st.tensor(&format!("{name}.{suffix}"))
                    .map_err(|_| bad(format!("missing {name}.{suffix}")))
            };
            let stored = stored_dtype(&view("u")?, &view("vt")?).ok_or_else(|| {
                bad(format!(
                    "{name}: factors are neither both f32 nor both bf16"
                ))
            })?;
            if view("s")?.dtype() != safetensors::Dtype::F32 {
                return Err(bad(format!("{name}.s is not f32")));
            }
            let (u, sigma, vt) = (
                view("u")?.load(&Device::Cpu)?,
                view("s")?.load(&Device::Cpu)?,
                view("vt")?.load(&Device::Cpu)?,
            );
            let (out, inp) = lin.dims();
            let r = out.min(inp);
            if u.dims() != [out, r] || sigma.dims() != [r] || vt.dims() != [r, inp] {
                return Err(bad(format!("{name} has the wrong shape for this model")));
            }
            let rel_error = *errors
                .get(&name)
                .ok_or_else(|| bad(format!("no error recorded for {name}")))?;
            let limit = stored.max_rel_error();
            if rel_error.is_nan() || rel_error > limit {
                return Err(bad(format!(
                    "{name} reconstructs with relative error {rel_error:.2e} > {limit:.0e}"
                )));
            }
            factors.insert(
                lin.id,
                Factors::new(
                    u.to_device(device)?.to_dtype(dtype)?,
                    sigma.to_device(device)?,
                    vt.to_device(device)?.to_dtype(dtype)?,
                    rel_error,
                )?,
            );
        }
        Ok(Self {
            targets,
            model_sha256: model_sha256.into(),
            hash: checked.hash.clone(),
            factors,
        })
    }

    /// Checks a cache file against the matrices of `source` (weights hash, integrity, shapes, errors)
    /// without loading its factors; reports it as [`Self::compute_to_file`] would.
    pub fn verify(
        path: &Path,
        source: &dyn MatrixSource,
        model_sha256: &str,
    ) -> Result<CacheSummary> {
        let checked = CheckedCache::open(path, model_sha256)?;
        let bad = |reason: String| SvfError::BadCache {
            path: path.into(),
            reason,
        };
        let st = checked.tensors()?;
        let mut matrices = Vec::new();
        let mut dtype = CacheDtype::F32;
        for (id, (out, inp)) in source.matrices() {
            if !checked.targets.contains(id.kind) {
                continue;
            }
            let name = id.name();
            let r = out.min(inp);
            let view = |suffix: &str| {
                st.tensor(&format!("{name}.{suffix}"))
                    .map_err(|_| bad(format!("missing {name}.{suffix}")))
            };
            let (u, sv, vt) = (view("u")?, view("s")?, view("vt")?);
            if u.shape() != [out, r] || sv.shape() != [r] || vt.shape() != [r, inp] {
                return Err(bad(format!("{name} has the wrong shape for this model")));
            }
            dtype = stored_dtype(&u, &vt).ok_or_else(|| bad(format!("{name}: bad dtype")))?;
            let rel_error = *checked
                .errors
                .get(&name)
                .ok_or_else(|| bad(format!("no error recorded for {name}")))?;
            if rel_error.is_nan() || rel_error > dtype.max_rel_error() {
                return Err(bad(format!(
                    "{name} reconstructs with relative error {rel_error:.2e}"
                )));
            }
            matrices.push(MatrixReport {
                id,
                shape: (out, inp),
                rank: r,
                rel_error,
                svd_s: 0.0,
                check_s: 0.0,
            });
        }
        Ok(CacheSummary {
            path: path.into(),
            targets: checked.targets,
            dtype,
            matrices,
            bytes: checked.mmap.len() as u64,
        })
    }

    pub fn max_rel_error(&self) -> f64 {
        self.factors
            .values()
            .map(|f| f.rel_error)
            .fold(0.0, f64::max)
    }

    /// Numbers one expert holds for this decomposition (Σ rank).
    pub fn expert_size(&self) -> usize {
        self.factors.values().map(|f| f.rank()).sum()
    }
}

fn stored_dtype(
    u: &safetensors::tensor::TensorView,
    vt: &safetensors::tensor::TensorView,
) -> Option<CacheDtype> {
    match (u.dtype(), vt.dtype()) {
        (safetensors::Dtype::F32, safetensors::Dtype::F32) => Some(CacheDtype::F32),
        (safetensors::Dtype::BF16, safetensors::Dtype::BF16) => Some(CacheDtype::Bf16),
        _ => None,
    }
}

/// A cache file mapped, its metadata read, and checked to be of a known format, made from these
/// weights and intact.
struct CheckedCache {
    path: PathBuf,
    mmap: memmap2::Mmap,
    targets: TargetSet,
    errors: BTreeMap<String, f64>,
    hash: String,
}

impl CheckedCache {
    fn open(path: &Path, model_sha256: &str) -> Result<Self> {
        let bad = |reason: String| SvfError::BadCache {
            path: path.into(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| SvfError::Io {
            path: path.into(),
            source: e,
        })?;
        // SAFETY: the cache is only replaced by rename, never written in place, so the mapping stays valid.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| SvfError::Io {
            path: path.into(),
            source: e,
        })?;
        let st = safetensors::SafeTensors::deserialize(&mmap)
            .map_err(|e| bad(format!("unreadable ({e})")))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| bad(e.to_string()))?;
        let md = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            md.get(k)
                .cloned()
                .ok_or_else(|| bad(format!("metadata lacks {k}")))
        };
        let format = get("format")?;
        if format != CACHE_FORMAT && format != CACHE_FORMAT_V1 {
            return Err(bad(format!("format {format} (expected {CACHE_FORMAT})")));
        }
        if get("model_sha256")? != model_sha256 {
            return Err(bad(
                "it was made from other weights (model sha256 differs)".into()
            ));
        }
        let targets: TargetSet = get("targets")?.parse().map_err(bad)?;
        let errors: BTreeMap<String, f64> = serde_json::from_str(&get("rel_errors")?)
            .map_err(|e| bad(format!("rel_errors: {e}")))?;
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        let mut sum = Sha256::new();
        for n in &names {
            let data = st.tensor(n).map_err(|e| bad(e.to_string()))?.data();
            if format == CACHE_FORMAT_V1 {
                sum.update(data);
            } else {
                sum.update(Sha256::digest(data));
            }
        }
        if hex::encode(sum.finalize()) != get("checksum")? {
            return Err(bad("checksum mismatch (the file is damaged)".into()));
        }
        let hash = get("decomposition_hash")?;
        drop(st);
        Ok(Self {
            path: path.into(),
            mmap,
            targets,
            errors,
            hash,
        })
    }

    fn tensors(&self) -> Result<safetensors::SafeTensors<'_>> {
        safetensors::SafeTensors::deserialize(&self.mmap).map_err(|e| SvfError::BadCache {
            path: self.path.clone(),
            reason: format!("unreadable ({e})"),
        })
    }
}

/// Bytes one worker holds per element of the matrix it decomposes (f32 and f64 copies, f64 factors, faer's
/// workspace, the check's copies): 2.9 GB measured for 14336×4096.
const WORKING_BYTES_PER_ELEMENT: usize = 50;

/// As many workers as there are cores, but no more than half the available memory holds (Linux; no
/// bound elsewhere).
fn memory_bound_workers(largest_elements: usize) -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: usize = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let per_worker = (largest_elements * WORKING_BYTES_PER_ELEMENT).max(1);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    Some((kb * 1024 / 2 / per_worker).clamp(1, cores))
}

/// Runs `job(0..n)` on `workers` threads (default: the machine's cores), with a progress bar; the first
/// error stops the others from taking new jobs and is returned.
fn run_workers(
    n: usize,
    workers: Option<usize>,
    progress: bool,
    job: impl Fn(usize) -> Result<()> + Sync,
) -> Result<()> {
    let bar = progress_bar(n as u64, progress);
    let next = AtomicUsize::new(0);
    let first_err = Mutex::new(None);
    let workers = workers
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .clamp(1, n.max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                if let Err(e) = job(i) {
                    first_err.lock().unwrap().get_or_insert(e);
                    next.store(n, Ordering::Relaxed);
                    break;
                }
                bar.inc(1);
            });
        }
    });
    bar.finish_and_clear();
    match first_err.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// name → (dtype, shape, [start, end) in the data section)
type Layout = BTreeMap<String, (DType, Vec<usize>, usize, usize)>;

/// A safetensors file written in place, tensor by tensor in any order, from several threads: the header
/// (layout known up front) gets a reserved size, is rewritten with the checksum and errors at the end,
/// and the file is renamed into place only then. Dropped unfinished, it removes its temp file.
struct CacheWriter {
    file: std::fs::File,
    tmp: PathBuf,
    path: PathBuf,
    meta: BTreeMap<String, String>,
    layout: Layout,
    matrices: Vec<String>,
    header_len: usize,
    digests: Mutex<BTreeMap<String, [u8; 32]>>,
    errors: Mutex<BTreeMap<String, f64>>,
    finished: bool,
}

fn render_header(
    meta: &BTreeMap<String, String>,
    layout: &Layout,
    errors: &BTreeMap<String, f64>,
    checksum: &str,
) -> Vec<u8> {
    let mut meta: serde_json::Map<String, serde_json::Value> = meta
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    meta.insert(
        "rel_errors".into(),
        serde_json::to_string(errors).expect("json").into(),
    );
    meta.insert("checksum".into(), checksum.into());
    let mut root = serde_json::Map::new();
    root.insert("__metadata__".into(), meta.into());
    for (name, (dtype, shape, start, end)) in layout {
        root.insert(
            name.clone(),
            serde_json::json!({
                "dtype": st_dtype(*dtype),
                "shape": shape,
                "data_offsets": [start, end],
            }),
        );
    }
    serde_json::to_vec(&serde_json::Value::Object(root)).expect("json")
}

fn st_dtype(d: DType) -> &'static str {
    match d {
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        _ => "F32",
    }
}

impl CacheWriter {
    fn create(
        path: &Path,
        meta: BTreeMap<String, String>,
        tensors: &[(String, DType, Vec<usize>)],
        matrices: &[String],
    ) -> Result<Self> {
        let io = |p: &Path, e: std::io::Error| SvfError::Io {
            path: p.into(),
            source: e,
        };
        let mut layout = BTreeMap::new();
        let mut at = 0usize;
        for (name, dtype, shape) in tensors {
            let len = shape.iter().product::<usize>() * dtype.size_in_bytes();
            layout.insert(name.clone(), (*dtype, shape.clone(), at, at + len));
            at += len;
        }
        // Room for the final metadata: a 64-hex checksum and one error per matrix (≤ 32 chars each).
        let draft = render_header(&meta, &layout, &BTreeMap::new(), &"0".repeat(64));
        let room: usize = matrices.iter().map(|m| m.len() + 40).sum::<usize>() + 64;
        let header_len = (draft.len() + room).div_ceil(8) * 8;
        let tmp = crate::temp_path(path);
        let file = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        let w = Self {
            file,
            tmp,
            path: path.to_path_buf(),
            meta,
            layout,
            matrices: matrices.to_vec(),
            header_len,
            digests: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(BTreeMap::new()),
            finished: false,
        };
        w.file
            .set_len((8 + header_len + at) as u64)
            .map_err(|e| io(&w.tmp, e))?;
        Ok(w)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let (_, _, start, end) = self.layout.get(name).ok_or_else(|| SvfError::BadCache {
            path: self.path.clone(),
            reason: format!("{name} is not in the cache layout"),
        })?;
        assert_eq!(
            end - start,
            bytes.len(),
            "{name}: size differs from the layout"
        );
        self.file
            .write_all_at(bytes, (8 + self.header_len + start) as u64)
            .map_err(|e| SvfError::Io {
                path: self.tmp.clone(),
                source: e,
            })?;
        self.digests
            .lock()
            .unwrap()
            .insert(name.to_string(), Sha256::digest(bytes).into());
        Ok(())
    }

    fn set_error(&self, matrix: &str, rel_error: f64) {
        self.errors
            .lock()
            .unwrap()
            .insert(matrix.to_string(), rel_error);
    }

    /// Header with the final metadata, then rename into place; returns the file's size.
    fn finish(mut self) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        let io = |p: &Path, e: std::io::Error| SvfError::Io {
            path: p.into(),
            source: e,
        };
        let digests = std::mem::take(&mut *self.digests.lock().unwrap());
        let errors = std::mem::take(&mut *self.errors.lock().unwrap());
        let incomplete = |what: String| SvfError::BadCache {
            path: self.path.clone(),
            reason: format!("internal: {what} was never written"),
        };
        let mut sum = Sha256::new();
        for name in self.layout.keys() {
            sum.update(digests.get(name).ok_or_else(|| incomplete(name.clone()))?);
        }
        if let Some(m) = self.matrices.iter().find(|m| !errors.contains_key(*m)) {
            return Err(incomplete(format!("the error of {m}")));
        }
        let mut header = render_header(
            &self.meta,
            &self.layout,
            &errors,
            &hex::encode(sum.finalize()),
        );
        assert!(header.len() <= self.header_len, "reserved header too small");
        header.resize(self.header_len, b' ');
        let mut head = (self.header_len as u64).to_le_bytes().to_vec();
        head.extend_from_slice(&header);
        self.file
            .write_all_at(&head, 0)
            .map_err(|e| io(&self.tmp, e))?;
        self.file.sync_all().map_err(|e| io(&self.tmp, e))?;
        let size = self.file.metadata().map_err(|e| io(&self.tmp, e))?.len();
        std::fs::rename(&self.tmp, &self.path).map_err(|e| io(&self.path, e))?;
        self.finished = true;
        Ok(size)
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(CacheDtype::F32.bytes(&v))
}

fn progress_bar(len: u64, visible: bool) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "decomposing {bar:40} {pos}/{len} matrices [{elapsed_precise} < {eta}]",
        )
        .expect("valid template"),
    );
    bar
}

/// The factors of one matrix on the host, as stored (rounded to the cache's precision).
pub struct SvdHost {
    pub out: usize,
    pub inp: usize,
    pub r: usize,
    /// (out, r) row-major
    pub u: Vec<f32>,
    pub s: Vec<f32>,
    /// (r, in) row-major
    pub vt: Vec<f32>,
    /// ‖U·diag(σ)·Vᵀ − W‖_F / ‖W‖_F of the stored factors, computed in f64.
    pub rel_error: f64,
    /// Seconds in the SVD and in the reconstruction check.
    pub svd_s: f64,
    pub check_s: f64,
}

impl SvdHost {
    fn into_factors(self, device: &Device, dtype: DType) -> std::result::Result<Factors, String> {
        let e = |e: candle_core::Error| e.to_string();
        let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, device).map_err(e);
        Factors::new(
            t(self.u, &[self.out, self.r])?.to_dtype(dtype).map_err(e)?,
            t(self.s, &[self.r])?,
            t(self.vt, &[self.r, self.inp])?
                .to_dtype(dtype)
                .map_err(e)?,
            self.rel_error,
        )
        .map_err(e)
    }
}

/// Thin SVD of one row-major (out × in) matrix in f64 (faer, all cores); factors rounded to `store` and
/// their reconstruction error measured in f64, a block of rows at a time. Working set for a 14336×4096
/// matrix: W in f64 (0.47 GB) and its f64 factors (0.6 GB), then the stored factors and the check's
/// f64 copies of them (2.9 GB peak measured in all).
pub fn svd_host(
    data: &[f32],
    out: usize,
    inp: usize,
    store: CacheDtype,
) -> std::result::Result<SvdHost, String> {
    if data.len() != out * inp {
        return Err(format!("{} numbers for a {out}x{inp} matrix", data.len()));
    }
    let t0 = Instant::now();
    let m = faer::Mat::<f64>::from_fn(out, inp, |i, j| data[i * inp + j] as f64);
    let svd = m.thin_svd().map_err(|e| format!("{e:?}"))?;
    let r = out.min(inp);
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let u32_: Vec<f32> = (0..out)
        .flat_map(|i| (0..r).map(move |j| store.round(u[(i, j)] as f32)))
        .collect();
    let s32: Vec<f32> = (0..r).map(|j| s[j] as f32).collect();
    let vt32: Vec<f32> = (0..r)
        .flat_map(|j| (0..inp).map(move |i| store.round(v[(i, j)] as f32)))
        .collect();
    drop(svd);
    let svd_s = t0.elapsed().as_secs_f64();

    // Error of what is stored, not of the f64 factors.
    let t1 = Instant::now();
    let rel_error = reconstruction_error(|i, j| m[(i, j)], out, inp, &u32_, &s32, &vt32);
    Ok(SvdHost {
        out,
        inp,
        r,
        u: u32_,
        s: s32,
        vt: vt32,
        rel_error,
        svd_s,
        check_s: t1.elapsed().as_secs_f64(),
    })
}

impl Decomposition {
    /// Random factors of the right shapes, for speed work at sizes where an SVD is too slow to wait for.
    /// They do not reconstruct the weights (rel_error is NaN); never save them.
    pub fn random(model: &Llama, targets: TargetSet, seed: u64) -> Result<Self> {
        let device = model.device();
        let dtype = model.dtype();
        let mut factors = BTreeMap::new();
        for (k, lin) in model
            .linears()
            .filter(|l| targets.contains(l.id.kind))
            .enumerate()
        {
            let (out, inp) = lin.dims();
            let r = out.min(inp);
            let s = seed.wrapping_add(k as u64);
            let u = (Tensor::rand(-1f32, 1f32, (out, r), device)? / (out as f64).sqrt())?
                .to_dtype(dtype)?;
            let vt = (Tensor::rand(-1f32, 1f32, (r, inp), device)? / (inp as f64).sqrt())?
                .to_dtype(dtype)?;
            let sigma_host: Vec<f32> = (0..r)
                .map(|i| 1.0 + (r - i) as f32 / r as f32 + (s % 7) as f32 * 1e-3)
                .collect();
            let sigma = Tensor::from_slice(&sigma_host, r, device)?;
            factors.insert(lin.id, Factors::new(u, sigma, vt, f64::NAN)?);
        }
        Ok(Self {
            targets,
            model_sha256: "random".into(),
            hash: "random".into(),
            factors,
        })
    }

    /// Bytes the factored path reads per token for these matrices (U and Vᵀ), minus what the dense weights
    /// of the same matrices would read.
    pub fn extra_bytes_factored(&self, model: &Llama) -> i64 {
        let elem = model.dtype().size_in_bytes() as i64;
        self.factors
            .iter()
            .map(|(id, f)| {
                let dense = model
                    .linear(*id)
                    .map(|l| l.dims().0 * l.dims().1)
                    .unwrap_or(0) as i64;
                (f.out * f.rank() + f.rank() * f.inp) as i64 * elem - dense * elem
            })
            .sum()
    }
}

/// ‖U·diag(σ)·Vᵀ − W‖_F / ‖W‖_F in f64, a block of 1024 rows of the product at a time; `w(i, j)` reads W,
/// `u` is (out, r), `vt` (r, in), both row-major.
pub fn reconstruction_error(
    w: impl Fn(usize, usize) -> f64,
    out: usize,
    inp: usize,
    u: &[f32],
    s: &[f32],
    vt: &[f32],
) -> f64 {
    let r = s.len();
    let us = faer::Mat::<f64>::from_fn(out, r, |i, j| u[i * r + j] as f64 * s[j] as f64);
    let vt = faer::Mat::<f64>::from_fn(r, inp, |j, i| vt[j * inp + i] as f64);
    let (mut diff2, mut norm2) = (0f64, 0f64);
    const BLOCK: usize = 1024;
    for b0 in (0..out).step_by(BLOCK) {
        let n = BLOCK.min(out - b0);
        let rec = us.as_ref().subrows(b0, n) * vt.as_ref();
        for j in 0..inp {
            for i in 0..n {
                let x = w(b0 + i, j);
                let d = rec[(i, j)] - x;
                diff2 += d * d;
                norm2 += x * x;
            }
        }
    }
    let (diff, norm) = (diff2.sqrt(), norm2.sqrt());
    if norm > 0.0 {
        diff / norm
    } else {
        diff
    }
}

/// The (out, in) shape of each projection kind of a model of this configuration.
pub fn target_shapes(cfg: &t2_model::LlamaConfig) -> Vec<(t2_model::ProjKind, (usize, usize))> {
    use t2_model::ProjKind as K;
    let (hs, is) = (cfg.hidden_size, cfg.intermediate_size);
    let (qd, kvd) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    vec![
        (K::Q, (qd, hs)),
        (K::K, (kvd, hs)),
        (K::V, (kvd, hs)),
        (K::O, (hs, qd)),
        (K::Gate, (is, hs)),
        (K::Up, (is, hs)),
        (K::Down, (hs, is)),
    ]
}

/// A random row-major matrix (uniform in [-1, 1)), for timing SVDs at real shapes.
pub fn random_matrix(out: usize, inp: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..out * inp)
        .map(|_| rng.random_range(-1f32..1f32))
        .collect()
}
