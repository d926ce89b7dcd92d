//! W = U·diag(σ)·Vᵀ for every target matrix, computed once in f64 (faer) and cached as f32 safetensors
//! beside the model, with enough metadata to refuse a cache that belongs to other weights or is damaged.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use t2_model::{Llama, ProjId};

use crate::error::{Result, SvfError};
use crate::targets::TargetSet;

/// Bumped whenever the cache layout or the meaning of its contents changes.
const CACHE_FORMAT: &str = "t2-svd-v1";
/// ‖U·diag(σ)·Vᵀ − W‖_F / ‖W‖_F above this means the factors do not stand for the weights.
pub const MAX_REL_ERROR: f64 = 1e-5;

/// The factors of one matrix W (out × in), r = min(out, in).
pub struct Factors {
    /// (out, r)
    pub u: Tensor,
    /// (r,), descending, f32
    pub sigma: Tensor,
    /// (r, in)
    pub vt: Tensor,
    /// σ on the host, for scale computations.
    pub sigma_host: Vec<f32>,
    pub rel_error: f64,
}

impl Factors {
    pub fn rank(&self) -> usize {
        self.sigma_host.len()
    }
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

pub fn decomposition_hash(model_sha256: &str) -> String {
    let mut h = Sha256::new();
    h.update(CACHE_FORMAT.as_bytes());
    h.update(model_sha256.as_bytes());
    hex::encode(h.finalize())[..16].to_string()
}

impl Decomposition {
    /// `models/X.gguf` → `models/X.svd-all.safetensors` (for a folder: `DIR/svd-all.safetensors`).
    pub fn cache_path(model_path: &Path, targets: TargetSet) -> PathBuf {
        if model_path.is_dir() {
            return model_path.join(format!("svd-{targets}.safetensors"));
        }
        let stem = model_path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        model_path.with_file_name(format!("{stem}.svd-{targets}.safetensors"))
    }

    /// Loads the cache for `targets` (or one for a wider target set), or computes and saves it.
    pub fn load_or_compute(
        model_path: &Path,
        model: &Llama,
        model_sha256: &str,
        targets: TargetSet,
        progress: bool,
    ) -> Result<(Self, Origin)> {
        let own = Self::cache_path(model_path, targets);
        let wider = Self::cache_path(model_path, TargetSet::All);
        let mut rejected = None;
        for path in [&own, &wider] {
            if !path.exists() {
                continue;
            }
            match Self::load(path, model, model_sha256) {
                Ok(d) if d.targets.covers(targets) => {
                    return Ok((d.restricted_to(targets), Origin::Loaded(path.clone())));
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
        let d = Self::compute(model, model_sha256, targets, progress)?;
        d.save(&own)?;
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

    /// SVD of every target matrix, in f64, spread over the machine's cores.
    pub fn compute(
        model: &Llama,
        model_sha256: &str,
        targets: TargetSet,
        progress: bool,
    ) -> Result<Self> {
        let jobs: Vec<_> = model
            .linears()
            .filter(|l| targets.contains(l.id.kind))
            .collect();
        let bar = progress_bar(jobs.len() as u64, progress);
        let next = AtomicUsize::new(0);
        let done = Mutex::new(Vec::with_capacity(jobs.len()));
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(jobs.len().max(1));
        let device = model.device().clone();
        let dtype = model.dtype();
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(lin) = jobs.get(i) else { break };
                    let r = svd_one(&lin.weight, &device, dtype).map_err(|reason| {
                        SvfError::Decompose {
                            matrix: lin.id.name(),
                            reason,
                        }
                    });
                    done.lock().unwrap().push((lin.id, r));
                    bar.inc(1);
                });
            }
        });
        bar.finish_and_clear();
        let mut factors = BTreeMap::new();
        for (id, r) in done.into_inner().unwrap() {
            factors.insert(id, r?);
        }
        Ok(Self {
            targets,
            model_sha256: model_sha256.to_string(),
            hash: decomposition_hash(model_sha256),
            factors,
        })
    }

    /// Writes the cache atomically (temp file + rename): a crash never leaves a half-written cache.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let mut errors = BTreeMap::new();
        for (id, f) in &self.factors {
            let name = id.name();
            tensors.push((
                format!("{name}.u"),
                f.u.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            ));
            tensors.push((
                format!("{name}.s"),
                f.sigma.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            ));
            tensors.push((
                format!("{name}.vt"),
                f.vt.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            ));
            errors.insert(name, f.rel_error);
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut sum = Sha256::new();
        for (_, t) in &tensors {
            sum.update(tensor_bytes(t)?);
        }
        let metadata: HashMap<String, String> = HashMap::from([
            ("format".into(), CACHE_FORMAT.into()),
            ("model_sha256".into(), self.model_sha256.clone()),
            ("targets".into(), self.targets.to_string()),
            ("decomposition_hash".into(), self.hash.clone()),
            (
                "rel_errors".into(),
                serde_json::to_string(&errors).expect("json"),
            ),
            ("checksum".into(), hex::encode(sum.finalize())),
        ]);
        let tmp = crate::temp_path(path);
        safetensors::serialize_to_file(
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
            Some(metadata),
            &tmp,
        )
        .map_err(|e| SvfError::Io {
            path: tmp.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        std::fs::rename(&tmp, path).map_err(|e| SvfError::Io {
            path: path.into(),
            source: e,
        })
    }

    /// Loads a cache and checks it belongs to these weights, is intact, and reconstructs them.
    pub fn load(path: &Path, model: &Llama, model_sha256: &str) -> Result<Self> {
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
        if get("format")? != CACHE_FORMAT {
            return Err(bad(format!(
                "format {} (expected {CACHE_FORMAT})",
                get("format")?
            )));
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
            sum.update(st.tensor(n).map_err(|e| bad(e.to_string()))?.data());
        }
        if hex::encode(sum.finalize()) != get("checksum")? {
            return Err(bad("checksum mismatch (the file is damaged)".into()));
        }
        let device = model.device();
        let dtype = model.dtype();
        let mut factors = BTreeMap::new();
        for lin in model.linears().filter(|l| targets.contains(l.id.kind)) {
            let name = lin.id.name();
            let load = |suffix: &str| -> Result<Tensor> {
                let view = st
                    .tensor(&format!("{name}.{suffix}"))
                    .map_err(|_| bad(format!("missing {name}.{suffix}")))?;
                Ok(view.load(&Device::Cpu)?)
            };
            let (u, sigma, vt) = (load("u")?, load("s")?, load("vt")?);
            let (out, inp) = lin.weight.dims2()?;
            let r = out.min(inp);
            if u.dims() != [out, r] || sigma.dims() != [r] || vt.dims() != [r, inp] {
                return Err(bad(format!("{name} has the wrong shape for this model")));
            }
            let rel_error = *errors
                .get(&name)
                .ok_or_else(|| bad(format!("no error recorded for {name}")))?;
            if rel_error.is_nan() || rel_error > MAX_REL_ERROR {
                return Err(bad(format!(
                    "{name} reconstructs with relative error {rel_error:.2e} > {MAX_REL_ERROR:.0e}"
                )));
            }
            let sigma_host = sigma.to_vec1::<f32>()?;
            factors.insert(
                lin.id,
                Factors {
                    u: u.to_device(device)?.to_dtype(dtype)?,
                    sigma: sigma.to_device(device)?,
                    vt: vt.to_device(device)?.to_dtype(dtype)?,
                    sigma_host,
                    rel_error,
                },
            );
        }
        Ok(Self {
            targets,
            model_sha256: model_sha256.into(),
            hash: get("decomposition_hash")?,
            factors,
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

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
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

/// Thin SVD of one matrix in f64; factors rounded to f32 and their reconstruction error measured in f64.
fn svd_one(w: &Tensor, device: &Device, dtype: DType) -> std::result::Result<Factors, String> {
    let e = |e: candle_core::Error| e.to_string();
    let (out, inp) = w.dims2().map_err(e)?;
    let data = w
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(e)?;
    let m = faer::Mat::<f64>::from_fn(out, inp, |i, j| data[i * inp + j] as f64);
    let svd = m.thin_svd().map_err(|e| format!("{e:?}"))?;
    let r = out.min(inp);
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let u32_: Vec<f32> = (0..out)
        .flat_map(|i| (0..r).map(move |j| u[(i, j)] as f32))
        .collect();
    let s32: Vec<f32> = (0..r).map(|j| s[j] as f32).collect();
    let vt32: Vec<f32> = (0..r)
        .flat_map(|j| (0..inp).map(move |i| v[(i, j)] as f32))
        .collect();

    // Error of what is stored (f32), not of the f64 factors.
    let us = faer::Mat::<f64>::from_fn(out, r, |i, j| u32_[i * r + j] as f64 * s32[j] as f64);
    let vt = faer::Mat::<f64>::from_fn(r, inp, |j, i| vt32[j * inp + i] as f64);
    let rec = &us * &vt;
    let diff = (&rec - &m).norm_l2();
    let norm = m.norm_l2();
    let rel_error = if norm > 0.0 { diff / norm } else { diff };

    let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, device).map_err(e);
    Ok(Factors {
        u: t(u32_, &[out, r])?.to_dtype(dtype).map_err(e)?,
        sigma: t(s32.clone(), &[r])?,
        vt: t(vt32, &[r, inp])?.to_dtype(dtype).map_err(e)?,
        sigma_host: s32,
        rel_error,
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
            let (out, inp) = lin.weight.dims2()?;
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
            factors.insert(
                lin.id,
                Factors {
                    u,
                    sigma,
                    vt,
                    sigma_host,
                    rel_error: f64::NAN,
                },
            );
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
                    .map(|l| l.weight.elem_count())
                    .unwrap_or(0) as i64;
                (f.u.elem_count() + f.vt.elem_count()) as i64 * elem - dense * elem
            })
            .sum()
    }
}
