//! Expert files: one z vector (after the sigmoid) per target matrix, in safetensors, with metadata that
//! ties the expert to one model and one decomposition. A manifest per model lists them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use t2_model::ProjId;

use crate::decompose::Decomposition;
use crate::error::{Result, SvfError};
use crate::mix::{z_digest, Mix, MixKey, BASE_SHARE_KEY};
use crate::targets::TargetSet;

const EXPERT_FORMAT: &str = "t2-expert-v1";
const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertMeta {
    pub name: String,
    pub description: String,
    /// The pass-1 label this expert serves (code, math, reasoning, ...).
    pub category: String,
    pub model_id: String,
    pub decomposition_hash: String,
    pub targets: TargetSet,
    /// How the expert was made (training command, data, steps, seed, validation score, ...).
    #[serde(default)]
    pub provenance: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Expert {
    pub meta: ExpertMeta,
    pub z: BTreeMap<ProjId, Vec<f32>>,
}

impl Expert {
    /// z ≡ `value` on every target matrix (0.5 ≈ the research code's initial point; any constant is the base model).
    pub fn constant(meta: ExpertMeta, decomp: &Decomposition, value: f32) -> Self {
        let z = decomp
            .factors
            .iter()
            .filter(|(id, _)| meta.targets.contains(id.kind))
            .map(|(id, f)| (*id, vec![value; f.rank()]))
            .collect();
        Self { meta, z }
    }

    /// A seeded random expert, z uniform in [1 - strength, 1 + strength]: not trained, but it changes the
    /// model's output, which is what tests and benchmarks of the serving paths need.
    pub fn random(meta: ExpertMeta, decomp: &Decomposition, seed: u64, strength: f32) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let z = decomp
            .factors
            .iter()
            .filter(|(id, _)| meta.targets.contains(id.kind))
            .map(|(id, f)| {
                let v = (0..f.rank())
                    .map(|_| 1.0 + strength * rng.random_range(-1.0f32..=1.0))
                    .collect();
                (*id, v)
            })
            .collect();
        Self { meta, z }
    }

    /// Checks the expert fits `decomp` (and `model_id`): every problem becomes one clear error.
    pub fn validate(&self, decomp: &Decomposition, model_id: &str) -> Result<()> {
        let bad = |reason: String| SvfError::BadExpert {
            name: self.meta.name.clone(),
            reason,
        };
        if self.meta.model_id != model_id {
            return Err(bad(format!(
                "made for model '{}', not '{model_id}'",
                self.meta.model_id
            )));
        }
        if self.meta.decomposition_hash != decomp.hash {
            return Err(bad(format!(
                "made for decomposition {}, but these weights have {} (other weights or an older format)",
                self.meta.decomposition_hash, decomp.hash
            )));
        }
        if !decomp.targets.covers(self.meta.targets) {
            return Err(bad(format!(
                "adapts '{}' matrices but the decomposition only covers '{}' (run `t2 decompose --targets {}`)",
                self.meta.targets, decomp.targets, self.meta.targets
            )));
        }
        if self.z.is_empty() {
            return Err(bad("holds no vectors".into()));
        }
        for (id, z) in &self.z {
            if !self.meta.targets.contains(id.kind) {
                return Err(bad(format!(
                    "{} is outside its target set '{}'",
                    id.name(),
                    self.meta.targets
                )));
            }
            let f = decomp
                .factors
                .get(id)
                .ok_or_else(|| bad(format!("{} is not in the decomposition", id.name())))?;
            if z.len() != f.rank() {
                return Err(bad(format!(
                    "{} has length {}, expected {}",
                    id.name(),
                    z.len(),
                    f.rank()
                )));
            }
            if let Some(i) = z.iter().position(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "{} has a non-finite value at {i} ({})",
                    id.name(),
                    z[i]
                )));
            }
            let total: f64 = f.sigma_host.iter().map(|&s| s as f64).sum();
            let scaled: f64 = f
                .sigma_host
                .iter()
                .zip(z)
                .map(|(&s, &v)| s as f64 * v as f64)
                .sum();
            if scaled.abs() <= 1e-6 * total {
                return Err(bad(format!(
                    "Σ(σ⊙z) ≈ 0 on {}: the expert would erase the matrix",
                    id.name()
                )));
            }
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, candle_core::Tensor)> = self
            .z
            .iter()
            .map(|(id, z)| {
                Ok((
                    id.name(),
                    candle_core::Tensor::from_slice(z, z.len(), &candle_core::Device::Cpu)?,
                ))
            })
            .collect::<Result<_>>()?;
        let m = &self.meta;
        let metadata = HashMap::from([
            ("format".to_string(), EXPERT_FORMAT.to_string()),
            ("name".into(), m.name.clone()),
            ("description".into(), m.description.clone()),
            ("category".into(), m.category.clone()),
            ("model_id".into(), m.model_id.clone()),
            ("decomposition_hash".into(), m.decomposition_hash.clone()),
            ("targets".into(), m.targets.to_string()),
            (
                "provenance".into(),
                serde_json::to_string(&m.provenance).expect("a string map serializes"),
            ),
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

    /// Reads an expert file; [`Expert::validate`] checks it against a decomposition.
    pub fn load(path: &Path) -> Result<Self> {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let bad = |reason: String| SvfError::BadExpert {
            name: name.clone(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| SvfError::Io {
            path: path.into(),
            source: e,
        })?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("unreadable file: {e}")))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let md = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            md.get(k)
                .cloned()
                .ok_or_else(|| bad(format!("metadata lacks '{k}'")))
        };
        if get("format")? != EXPERT_FORMAT {
            return Err(bad(format!(
                "format '{}' is not {EXPERT_FORMAT}",
                get("format")?
            )));
        }
        let meta = ExpertMeta {
            name: get("name")?,
            description: get("description").unwrap_or_default(),
            category: get("category").unwrap_or_default(),
            model_id: get("model_id")?,
            decomposition_hash: get("decomposition_hash")?,
            targets: get("targets")?.parse().map_err(bad)?,
            provenance: match md.get("provenance") {
                Some(p) => serde_json::from_str(p)
                    .map_err(|e| bad(format!("unreadable provenance: {e}")))?,
                None => BTreeMap::new(),
            },
        };
        let mut z = BTreeMap::new();
        for (tname, view) in st.tensors() {
            let id =
                ProjId::parse(&tname).ok_or_else(|| bad(format!("unexpected tensor '{tname}'")))?;
            let v = f32_vector(&view)
                .ok_or_else(|| bad(format!("{tname} must be a 1-D f32 vector")))?;
            z.insert(id, v);
        }
        Ok(Self { meta, z })
    }
}

/// The values of a 1-D f32 tensor (None for any other dtype or shape): expert and training-checkpoint files
/// hold only such vectors.
pub fn f32_vector(view: &safetensors::tensor::TensorView<'_>) -> Option<Vec<f32>> {
    if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 1 {
        return None;
    }
    Some(
        view.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub name: String,
    pub file: String,
    pub category: String,
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provenance: BTreeMap<String, String>,
}

/// A stored mix: named weights over experts (made by few-shot search, or by hand).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoredMix {
    pub name: String,
    /// Written as `alpha`: weights by expert, the base share under `base`.
    #[serde(rename = "alpha")]
    pub mix: Mix,
    #[serde(default)]
    pub description: String,
    /// How the mix was made (few-shot search: examples, shots, seed, score, iterations, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provenance: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub model_id: String,
    pub experts: Vec<ManifestEntry>,
    #[serde(default)]
    pub mixes: Vec<StoredMix>,
}

/// The experts of one model: `experts/<model-id>/manifest.json` and the files it names.
pub struct ExpertStore {
    pub dir: PathBuf,
    /// The manifest as loaded; stored mixes live in `mixes` (they can be added while serving).
    pub manifest: Manifest,
    mixes: std::sync::RwLock<Vec<StoredMix>>,
    experts: BTreeMap<String, Expert>,
    /// Content digest of each expert's z vectors: part of every mix key that names it.
    digests: BTreeMap<String, String>,
}

impl ExpertStore {
    /// Opens (and validates) the store for `model_id` under `root`; no manifest means no experts yet.
    pub fn open(root: &Path, model_id: &str, decomp: &Decomposition) -> Result<Self> {
        let dir = root.join(model_id);
        let path = dir.join(MANIFEST);
        let mut manifest = if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| SvfError::Io {
                path: path.clone(),
                source: e,
            })?;
            serde_json::from_str::<Manifest>(&text).map_err(|e| SvfError::BadExpert {
                name: path.display().to_string(),
                reason: format!("bad manifest: {e}"),
            })?
        } else {
            Manifest {
                model_id: model_id.into(),
                ..Default::default()
            }
        };
        let mut experts = BTreeMap::new();
        for entry in &manifest.experts {
            let e = Expert::load(&dir.join(&entry.file))?;
            if e.meta.name != entry.name {
                return Err(SvfError::BadExpert {
                    name: entry.name.clone(),
                    reason: format!("{} holds expert '{}'", entry.file, e.meta.name),
                });
            }
            e.validate(decomp, model_id)?;
            experts.insert(entry.name.clone(), e);
        }
        let mixes = std::sync::RwLock::new(std::mem::take(&mut manifest.mixes));
        let digests = experts
            .iter()
            .map(|(n, e)| (n.clone(), z_digest(&e.z)))
            .collect();
        Ok(Self {
            dir,
            manifest,
            mixes,
            experts,
            digests,
        })
    }

    pub fn get(&self, name: &str) -> Result<&Expert> {
        self.experts
            .get(name)
            .ok_or_else(|| SvfError::UnknownExpert {
                name: name.into(),
                known: if self.experts.is_empty() {
                    "none".into()
                } else {
                    self.names().join(", ")
                },
            })
    }

    /// The identity of `mix` over the experts as stored now (unknown experts are an error).
    pub fn key_of(&self, mix: &Mix) -> Result<MixKey> {
        MixKey::of_mix(mix, |name| {
            self.get(name)?;
            Ok(self.digests[name].as_str())
        })
    }

    /// Checks that every expert `mix` names is stored.
    pub fn check(&self, mix: &Mix) -> Result<()> {
        mix.alpha().keys().try_for_each(|e| self.get(e).map(|_| ()))
    }

    pub fn names(&self) -> Vec<String> {
        self.experts.keys().cloned().collect()
    }

    pub fn experts(&self) -> impl Iterator<Item = &Expert> {
        self.experts.values()
    }

    pub fn mix(&self, name: &str) -> Option<StoredMix> {
        self.mixes
            .read()
            .expect("mix list lock")
            .iter()
            .find(|m| m.name == name)
            .cloned()
    }

    pub fn mixes(&self) -> Vec<StoredMix> {
        self.mixes.read().expect("mix list lock").clone()
    }

    /// Stores (or replaces) a named mix; every expert it names must exist, and a mix may not shadow an
    /// expert's name.
    /// The manifest on disk is re-read first, so that mixes another process stored meanwhile are kept.
    pub fn save_mix(&self, mix: StoredMix) -> Result<()> {
        check_name(&mix.name)?;
        if mix.mix.is_base() && mix.mix.base_share() == 0.0 {
            return Err(SvfError::BadMix(format!(
                "mix '{}' names no expert",
                mix.name
            )));
        }
        if self.experts.contains_key(&mix.name) {
            return Err(SvfError::BadMix(format!(
                "'{}' is already an expert's name",
                mix.name
            )));
        }
        // Weights are finite by construction of `Mix`.
        self.check(&mix.mix)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| SvfError::Io {
            path: self.dir.clone(),
            source: e,
        })?;
        let mut mixes = self.mixes.write().expect("mix list lock");
        let on_disk = std::fs::read_to_string(self.dir.join(MANIFEST))
            .ok()
            .and_then(|t| serde_json::from_str::<Manifest>(&t).ok())
            .map(|m| m.mixes)
            .unwrap_or_default();
        let mut merged: Vec<StoredMix> = mixes.clone();
        for m in on_disk {
            if !merged.iter().any(|x| x.name == m.name) {
                merged.push(m);
            }
        }
        merged.retain(|m| m.name != mix.name);
        merged.push(mix);
        self.write_manifest_with(&merged)?;
        *mixes = merged;
        Ok(())
    }

    /// Adds (or replaces) an expert: file first, then the manifest, each written atomically.
    pub fn add(&mut self, expert: Expert, decomp: &Decomposition) -> Result<()> {
        check_name(&expert.meta.name)?;
        expert.validate(decomp, &self.manifest.model_id)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| SvfError::Io {
            path: self.dir.clone(),
            source: e,
        })?;
        let file = format!("{}.safetensors", expert.meta.name);
        expert.save(&self.dir.join(&file))?;
        self.manifest.experts.retain(|e| e.name != expert.meta.name);
        self.manifest.experts.push(ManifestEntry {
            name: expert.meta.name.clone(),
            file,
            category: expert.meta.category.clone(),
            description: expert.meta.description.clone(),
            provenance: expert.meta.provenance.clone(),
        });
        self.write_manifest()?;
        self.digests
            .insert(expert.meta.name.clone(), z_digest(&expert.z));
        self.experts.insert(expert.meta.name.clone(), expert);
        Ok(())
    }

    fn write_manifest(&self) -> Result<()> {
        let mixes = self.mixes();
        self.write_manifest_with(&mixes)
    }

    fn write_manifest_with(&self, mixes: &[StoredMix]) -> Result<()> {
        let path = self.dir.join(MANIFEST);
        let tmp = crate::temp_path(&path);
        let mut manifest = self.manifest.clone();
        manifest.mixes = mixes.to_vec();
        let text = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
        std::fs::write(&tmp, text).map_err(|e| SvfError::Io {
            path: tmp.clone(),
            source: e,
        })?;
        std::fs::rename(&tmp, &path).map_err(|e| SvfError::Io { path, source: e })
    }
}

/// Names appear in model ids (`<base>:<name>`) and file names: keep them to a safe alphabet, and away from
/// the words the server reserves.
pub fn check_name(name: &str) -> Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if name.is_empty() || name.len() > 64 || !ok_chars || name.starts_with('.') {
        return Err(SvfError::BadMix(format!(
            "'{name}' is not a valid name (1-64 characters: letters, digits, '_', '-', '.')"
        )));
    }
    if [BASE_SHARE_KEY, "auto"].contains(&name) {
        return Err(SvfError::BadMix(format!("'{name}' is reserved")));
    }
    Ok(())
}
