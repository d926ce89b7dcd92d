//! Expert files: one z vector (after the sigmoid) per target matrix, in safetensors, with metadata that
//! ties the expert to one model and one decomposition. A manifest per model lists them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

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

    /// The expert turned down to strength `t`: z ← t·z + (1 − t), the same vector as the mix
    /// `name=t,base=1-t` (and computed in the same order, so bit for bit), stored as one expert so that
    /// routing and `:name` serve the strength validation chose. `t = 1` is the expert itself.
    pub fn at_strength(mut self, t: f32) -> Result<Self> {
        if !(t.is_finite() && t > 0.0 && t <= 1.0) {
            return Err(SvfError::BadMix(format!(
                "strength must be in (0, 1], got {t}"
            )));
        }
        if t == 1.0 {
            return Ok(self);
        }
        for v in self.z.values_mut() {
            v.iter_mut().for_each(|x| *x = t * *x + (1.0 - t));
        }
        self.meta
            .provenance
            .insert("strength".into(), format!("{t}"));
        Ok(self)
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
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            SvfError::Io {
                path: path.into(),
                source: e,
            }
        })
    }

    /// Reads an expert file; [`Expert::validate`] checks it against a decomposition.
    pub fn load(path: &Path) -> Result<Self> {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let bytes = std::fs::read(path).map_err(|e| SvfError::Io {
            path: path.into(),
            source: e,
        })?;
        Self::from_bytes(&bytes, &name)
    }

    /// Parses an expert file's bytes (an upload, or a file read by [`Self::load`]); `label` names it in
    /// errors. Nothing is checked against a model here: that is [`Self::validate`].
    pub fn from_bytes(bytes: &[u8], label: &str) -> Result<Self> {
        let bad = |reason: String| SvfError::BadExpert {
            name: label.to_string(),
            reason,
        };
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("unreadable file: {e}")))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
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

/// One loaded expert and the digest of its vectors (its identity in every mix key that names it).
#[derive(Clone)]
struct Loaded {
    expert: Arc<Expert>,
    digest: String,
}

/// What the store holds, in memory and on disk alike: the manifest (experts and stored mixes) and the
/// experts it lists.
struct Contents {
    manifest: Manifest,
    experts: BTreeMap<String, Loaded>,
}

/// An expert as the store lists it.
#[derive(Clone)]
pub struct StoredExpert {
    pub expert: Arc<Expert>,
    /// Content digest of its z vectors.
    pub digest: String,
    /// Its file in the store's folder.
    pub file: String,
}

/// What [`ExpertStore::upload`] did.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub digest: String,
    /// The digest of the version it replaced, when the name was taken.
    pub replaced: Option<String>,
}

/// Requests in flight per expert (see [`ExpertStore::pin`]).
type Pins = Arc<Mutex<HashMap<String, usize>>>;

/// A hold on experts by a request between its choice of mix and its end: while it lives, the experts
/// cannot be removed. Dropping it lets go.
pub struct ExpertPin {
    names: Vec<String>,
    pins: Pins,
}

impl Drop for ExpertPin {
    fn drop(&mut self) {
        let mut pins = self.pins.lock().expect("pin lock");
        for n in &self.names {
            if let Some(c) = pins.get_mut(n) {
                *c -= 1;
                if *c == 0 {
                    pins.remove(n);
                }
            }
        }
    }
}

/// The experts of one model: `experts/<model-id>/manifest.json` and the files it names. Experts and
/// mixes can be added and removed while the store serves: every change writes the files first and the
/// manifest last (each through a temporary file and a rename), so a failure at any point leaves the
/// store as it was on disk and in memory.
pub struct ExpertStore {
    pub dir: PathBuf,
    model_id: String,
    contents: RwLock<Contents>,
    /// Changes one at a time: each is a read-modify-write of the manifest.
    writer: Mutex<()>,
    pins: Pins,
    /// Tests make the next manifest write fail, to check that nothing changes.
    #[cfg(test)]
    fail_manifest_write: std::sync::atomic::AtomicBool,
}

impl ExpertStore {
    /// Opens (and validates) the store for `model_id` under `root`; no manifest means no experts yet.
    pub fn open(root: &Path, model_id: &str, decomp: &Decomposition) -> Result<Self> {
        let dir = root.join(model_id);
        let manifest = read_manifest(&dir, model_id)?;
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
            let digest = z_digest(&e.z);
            experts.insert(
                entry.name.clone(),
                Loaded {
                    expert: Arc::new(e),
                    digest,
                },
            );
        }
        Ok(Self {
            dir,
            model_id: model_id.into(),
            contents: RwLock::new(Contents { manifest, experts }),
            writer: Mutex::new(()),
            pins: Arc::new(Mutex::new(HashMap::new())),
            #[cfg(test)]
            fail_manifest_write: Default::default(),
        })
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Contents> {
        self.contents.read().expect("expert store lock")
    }

    fn unknown(c: &Contents, name: &str) -> SvfError {
        SvfError::UnknownExpert {
            name: name.into(),
            known: if c.experts.is_empty() {
                "none".into()
            } else {
                c.experts.keys().cloned().collect::<Vec<_>>().join(", ")
            },
        }
    }

    pub fn get(&self, name: &str) -> Result<Arc<Expert>> {
        let c = self.read();
        c.experts
            .get(name)
            .map(|l| l.expert.clone())
            .ok_or_else(|| Self::unknown(&c, name))
    }

    /// The identity of `mix` over the experts as stored now (unknown experts are an error).
    pub fn key_of(&self, mix: &Mix) -> Result<MixKey> {
        self.resolve(mix).map(|(k, _)| k)
    }

    /// The key of `mix` and the experts it names, read together: an expert replaced meanwhile can never
    /// pair one version's key with another version's vectors.
    pub fn resolve(&self, mix: &Mix) -> Result<(MixKey, BTreeMap<String, Arc<Expert>>)> {
        let c = self.read();
        let key = MixKey::of_mix(mix, |name| {
            c.experts
                .get(name)
                .map(|l| l.digest.as_str())
                .ok_or_else(|| Self::unknown(&c, name))
        })?;
        let experts = mix
            .alpha()
            .keys()
            .map(|n| (n.clone(), c.experts[n].expert.clone()))
            .collect();
        Ok((key, experts))
    }

    /// Checks that every expert `mix` names is stored.
    pub fn check(&self, mix: &Mix) -> Result<()> {
        let c = self.read();
        match mix.alpha().keys().find(|e| !c.experts.contains_key(*e)) {
            Some(e) => Err(Self::unknown(&c, e)),
            None => Ok(()),
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.read().experts.keys().cloned().collect()
    }

    pub fn experts(&self) -> Vec<Arc<Expert>> {
        self.read()
            .experts
            .values()
            .map(|l| l.expert.clone())
            .collect()
    }

    /// Every expert with its digest and file, by name.
    pub fn listing(&self) -> Vec<StoredExpert> {
        let c = self.read();
        c.manifest
            .experts
            .iter()
            .filter_map(|entry| {
                let l = c.experts.get(&entry.name)?;
                Some(StoredExpert {
                    expert: l.expert.clone(),
                    digest: l.digest.clone(),
                    file: entry.file.clone(),
                })
            })
            .collect()
    }

    pub fn mix(&self, name: &str) -> Option<StoredMix> {
        self.read()
            .manifest
            .mixes
            .iter()
            .find(|m| m.name == name)
            .cloned()
    }

    pub fn mixes(&self) -> Vec<StoredMix> {
        self.read().manifest.mixes.clone()
    }

    /// Stores (or replaces) a named mix; every expert it names must exist, and a mix may not shadow an
    /// expert's name. Mixes other processes stored meanwhile are kept, and become visible here.
    pub fn save_mix(&self, mix: StoredMix) -> Result<()> {
        check_name(&mix.name)?;
        if mix.mix.is_base() && mix.mix.base_share() == 0.0 {
            return Err(SvfError::BadMix(format!(
                "mix '{}' names no expert",
                mix.name
            )));
        }
        let _w = self.writer.lock().expect("expert store writer");
        // Weights are finite by construction of `Mix`.
        self.check(&mix.mix)?;
        self.create_dir()?;
        let _lock = self.lock_manifest()?;
        let mut disk = read_manifest(&self.dir, &self.model_id)?;
        if self.read().experts.contains_key(&mix.name)
            || disk.experts.iter().any(|e| e.name == mix.name)
        {
            return Err(SvfError::BadMix(format!(
                "'{}' is already an expert's name",
                mix.name
            )));
        }
        disk.mixes.retain(|m| m.name != mix.name);
        disk.mixes.push(mix);
        self.write_manifest(&disk)?;
        self.contents
            .write()
            .expect("expert store lock")
            .manifest
            .mixes = disk.mixes;
        Ok(())
    }

    /// Adds (or replaces) an expert as `<name>.safetensors`: file first, then the manifest, each written
    /// atomically (the command line's way; a replaced file is overwritten before the manifest changes).
    pub fn add(&mut self, expert: Expert, decomp: &Decomposition) -> Result<()> {
        let file = format!("{}.safetensors", expert.meta.name);
        self.commit(expert, decomp, file).map(|_| ())
    }

    /// Adds (or replaces) an expert while serving. Its file name carries its digest
    /// (`<name>@<digest>.safetensors`, '@' is outside the names' alphabet), so a replaced version's file
    /// is never overwritten: until the manifest's rename, the store on disk is exactly the old one, and
    /// a crash anywhere before leaves at most an unlisted file behind. The old file is removed after.
    pub fn upload(&self, expert: Expert, decomp: &Decomposition) -> Result<Uploaded> {
        let digest = z_digest(&expert.z);
        let file = format!("{}@{}.safetensors", expert.meta.name, &digest[..16]);
        self.commit(expert, decomp, file)
    }

    fn commit(&self, expert: Expert, decomp: &Decomposition, file: String) -> Result<Uploaded> {
        check_name(&expert.meta.name)?;
        expert.validate(decomp, &self.model_id)?;
        let name = expert.meta.name.clone();
        let digest = z_digest(&expert.z);
        let _w = self.writer.lock().expect("expert store writer");
        self.create_dir()?;
        let _lock = self.lock_manifest()?;
        let mut disk = read_manifest(&self.dir, &self.model_id)?;
        if self.read().manifest.mixes.iter().any(|m| m.name == name)
            || disk.mixes.iter().any(|m| m.name == name)
        {
            return Err(SvfError::Conflict(format!(
                "'{name}' is already a stored mix's name"
            )));
        }
        let path = self.dir.join(&file);
        let old_file = disk
            .experts
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.file.clone());
        expert.save(&path)?;
        let entry = ManifestEntry {
            name: name.clone(),
            file: file.clone(),
            category: expert.meta.category.clone(),
            description: expert.meta.description.clone(),
            provenance: expert.meta.provenance.clone(),
        };
        disk.experts.retain(|e| e.name != name);
        disk.experts.push(entry.clone());
        if let Err(e) = self.write_manifest(&disk) {
            // The manifest still lists the old version (or nothing): the new file is an orphan.
            if old_file.as_deref() != Some(file.as_str()) {
                let _ = std::fs::remove_file(&path);
            }
            return Err(e);
        }
        let replaced = {
            let mut c = self.contents.write().expect("expert store lock");
            // This process serves the experts it loaded: it learns of this one, and of the stored mixes.
            c.manifest.experts.retain(|e| e.name != name);
            c.manifest.experts.push(entry);
            c.manifest.mixes = disk.mixes;
            c.experts.insert(
                name,
                Loaded {
                    expert: Arc::new(expert),
                    digest: digest.clone(),
                },
            )
        };
        if let Some(old) = old_file.filter(|f| *f != file) {
            let _ = std::fs::remove_file(self.dir.join(old));
        }
        Ok(Uploaded {
            digest,
            replaced: replaced.map(|l| l.digest),
        })
    }

    /// Removes an expert (manifest first, then its file), unless a request holds it ([`Self::pin`]), a
    /// stored mix names it, or `busy` (given its digest, under the store's lock, so no request can take
    /// the expert meanwhile) says why it is still in use. Returns the removed expert's digest.
    pub fn remove(&self, name: &str, busy: impl FnOnce(&str) -> Option<String>) -> Result<String> {
        check_name(name)?;
        let _w = self.writer.lock().expect("expert store writer");
        let _lock = self.lock_manifest()?;
        let mut disk = read_manifest(&self.dir, &self.model_id)?;
        let mut c = self.contents.write().expect("expert store lock");
        let Some(loaded) = c.experts.get(name).cloned() else {
            return Err(Self::unknown(&c, name));
        };
        let mixes: std::collections::BTreeSet<&str> = c
            .manifest
            .mixes
            .iter()
            .chain(&disk.mixes)
            .filter(|m| m.mix.alpha().contains_key(name))
            .map(|m| m.name.as_str())
            .collect();
        if !mixes.is_empty() {
            return Err(SvfError::Conflict(format!(
                "expert '{name}' is part of the stored mix(es) {}",
                mixes.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
        let pinned = self.pinned(name);
        if pinned > 0 {
            return Err(SvfError::Conflict(format!(
                "expert '{name}' is in use by {pinned} request(s); retry when they finish"
            )));
        }
        if let Some(why) = busy(&loaded.digest) {
            return Err(SvfError::Conflict(format!(
                "expert '{name}' is in use: {why}"
            )));
        }
        // The file this process loaded; another process may have replaced it since.
        let file = disk
            .experts
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.file.clone());
        disk.experts.retain(|e| e.name != name);
        self.write_manifest(&disk)?;
        c.manifest.experts.retain(|e| e.name != name);
        c.manifest.mixes = disk.mixes;
        c.experts.remove(name);
        drop(c);
        if let Some(f) = file {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        Ok(loaded.digest)
    }

    /// Holds the named experts for one request: [`Self::remove`] refuses them until the pin is dropped.
    /// Fails when one of them is not (or no longer) stored.
    pub fn pin<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<ExpertPin> {
        let c = self.read();
        let names: Vec<String> = names.into_iter().map(str::to_string).collect();
        if let Some(n) = names.iter().find(|n| !c.experts.contains_key(*n)) {
            return Err(Self::unknown(&c, n));
        }
        let mut pins = self.pins.lock().expect("pin lock");
        for n in &names {
            *pins.entry(n.clone()).or_default() += 1;
        }
        Ok(ExpertPin {
            names,
            pins: self.pins.clone(),
        })
    }

    /// Requests holding `name` now.
    pub fn pinned(&self, name: &str) -> usize {
        self.pins
            .lock()
            .expect("pin lock")
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    fn create_dir(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| SvfError::Io {
            path: self.dir.clone(),
            source: e,
        })
    }

    /// Every change is a read-modify-write of the manifest on disk, and other processes (a server, `t2
    /// adapt`, `t2 experts install`) change it too: this lock, held across the read and the rename, keeps
    /// one process's change from erasing another's. It is released when the returned file closes.
    fn lock_manifest(&self) -> Result<std::fs::File> {
        let path = self.dir.join(".manifest.lock");
        let io = |e| SvfError::Io {
            path: path.clone(),
            source: e,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        file.lock().map_err(io)?;
        Ok(file)
    }

    fn write_manifest(&self, manifest: &Manifest) -> Result<()> {
        let path = self.dir.join(MANIFEST);
        #[cfg(test)]
        if self
            .fail_manifest_write
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(SvfError::Io {
                path,
                source: std::io::Error::other("injected failure"),
            });
        }
        let tmp = crate::temp_path(&path);
        let text = serde_json::to_string_pretty(manifest).expect("manifest serializes");
        std::fs::write(&tmp, text).map_err(|e| SvfError::Io {
            path: tmp.clone(),
            source: e,
        })?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            SvfError::Io { path, source: e }
        })
    }
}

/// The manifest in `dir` as it is on disk now (no file: no experts yet). A manifest that cannot be read is
/// an error rather than an empty store, so that a change never overwrites what it could not read.
fn read_manifest(dir: &Path, model_id: &str) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| SvfError::BadExpert {
            name: path.display().to_string(),
            reason: format!("bad manifest: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest {
            model_id: model_id.into(),
            ..Default::default()
        }),
        Err(e) => Err(SvfError::Io { path, source: e }),
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use t2_model::{random_llama, LlamaConfig};

    fn decomp() -> Decomposition {
        let m = random_llama(&LlamaConfig::tiny(), DType::F32, &Device::Cpu, 5).unwrap();
        Decomposition::compute(&m, "0123456789abcdef", TargetSet::All, false).unwrap()
    }

    fn expert(d: &Decomposition, name: &str, seed: u64) -> Expert {
        let meta = ExpertMeta {
            name: name.into(),
            description: "test".into(),
            category: "math".into(),
            model_id: "tiny".into(),
            decomposition_hash: d.hash.clone(),
            targets: TargetSet::All,
            provenance: Default::default(),
        };
        Expert::random(meta, d, seed, 0.3)
    }

    /// Every file of the store's folder with its bytes: "as it was" means byte for byte. The writers'
    /// lock file holds nothing.
    fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_name() != ".manifest.lock")
                    .map(|e| {
                        (
                            e.file_name().to_string_lossy().to_string(),
                            std::fs::read(e.path()).unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn uploads_replace_and_remove_atomically() {
        let d = decomp();
        let root = tempfile::tempdir().unwrap();
        let store = ExpertStore::open(root.path(), "tiny", &d).unwrap();
        let first = store.upload(expert(&d, "math", 1), &d).unwrap();
        assert!(first.replaced.is_none());
        let before = snapshot(&store.dir);

        // A failed manifest write: the new version's file is gone again, the old one is untouched, and
        // memory still serves the old version.
        store
            .fail_manifest_write
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(store.upload(expert(&d, "math", 2), &d).is_err());
        assert_eq!(snapshot(&store.dir), before);
        assert_eq!(
            store.listing()[0].digest,
            first.digest,
            "memory changed after a failed write"
        );

        // Bad experts change nothing either.
        let mut other_model = expert(&d, "code", 3);
        other_model.meta.model_id = "other".into();
        assert!(store.upload(other_model, &d).is_err());
        let mut nan = expert(&d, "code", 3);
        nan.z.values_mut().next().unwrap()[0] = f32::NAN;
        assert!(store.upload(nan, &d).is_err());
        assert!(store.upload(expert(&d, "../evil", 3), &d).is_err());
        assert_eq!(snapshot(&store.dir), before);

        // A real replacement: new digest, the old file removed, reopening serves the new version.
        let second = store.upload(expert(&d, "math", 2), &d).unwrap();
        assert_eq!(second.replaced.as_deref(), Some(first.digest.as_str()));
        assert_ne!(second.digest, first.digest);
        let files: Vec<String> = snapshot(&store.dir).into_keys().collect();
        assert_eq!(files.len(), 2, "{files:?}"); // the manifest and one expert file
        let reopened = ExpertStore::open(root.path(), "tiny", &d).unwrap();
        assert_eq!(reopened.listing()[0].digest, second.digest);

        // Removal: refused while pinned or busy, then a failed write changes nothing, then it goes.
        let before = snapshot(&store.dir);
        let pin = store.pin(["math"]).unwrap();
        assert!(matches!(
            store.remove("math", |_| None),
            Err(SvfError::Conflict(_))
        ));
        drop(pin);
        assert!(matches!(
            store.remove("math", |_| Some("held".into())),
            Err(SvfError::Conflict(_))
        ));
        store
            .fail_manifest_write
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(store.remove("math", |_| None).is_err());
        assert_eq!(snapshot(&store.dir), before);
        assert!(store.get("math").is_ok());
        assert_eq!(store.remove("math", |_| None).unwrap(), second.digest);
        assert!(store.get("math").is_err());
        assert!(store.pin(["math"]).is_err());
        assert_eq!(
            snapshot(&store.dir).into_keys().collect::<Vec<_>>(),
            vec![MANIFEST.to_string()]
        );
        assert!(ExpertStore::open(root.path(), "tiny", &d)
            .unwrap()
            .names()
            .is_empty());
    }

    #[test]
    fn an_expert_at_strength_t_is_the_mix_with_base_share_one_minus_t() {
        let d = decomp();
        let e = expert(&d, "math", 4);
        let mix = crate::mix::parse_mix("math=0.75,base=0.25").unwrap();
        let want = mix.z(&d, |_| Ok(&e)).unwrap();
        let turned = e.clone().at_strength(0.75).unwrap();
        assert_eq!(turned.z, want, "not the mix's vector bit for bit");
        assert_ne!(turned.z, e.z);
        assert_eq!(turned.meta.provenance["strength"], "0.75");
        assert_eq!(e.clone().at_strength(1.0).unwrap().z, e.z);
        for bad in [0.0, -0.5, 1.5, f32::NAN] {
            assert!(e.clone().at_strength(bad).is_err(), "{bad} accepted");
        }
    }

    /// Two stores on one folder stand for two processes (a server and `t2 adapt`, say): a change by one
    /// must not erase what the other wrote after the first opened the store.
    #[test]
    fn a_store_keeps_changes_another_process_made_since_it_opened() {
        let d = decomp();
        let root = tempfile::tempdir().unwrap();
        let first = ExpertStore::open(root.path(), "tiny", &d).unwrap();
        first.upload(expert(&d, "math", 1), &d).unwrap();
        first.upload(expert(&d, "code", 2), &d).unwrap();
        let mix = |name: &str, spec: &str| StoredMix {
            name: name.into(),
            mix: crate::mix::parse_mix(spec).unwrap(),
            ..Default::default()
        };
        first.save_mix(mix("chosen", "math=1")).unwrap();
        let second = ExpertStore::open(root.path(), "tiny", &d).unwrap();
        // `second` re-chooses the mix; `first`, which still holds the old choice, then stores another.
        second.save_mix(mix("chosen", "code=1")).unwrap();
        first.save_mix(mix("other", "math=0.5,code=0.5")).unwrap();
        first.upload(expert(&d, "extra", 3), &d).unwrap();
        second.upload(expert(&d, "late", 4), &d).unwrap();
        first.remove("extra", |_| None).unwrap();
        let reopened = ExpertStore::open(root.path(), "tiny", &d).unwrap();
        assert_eq!(
            reopened.mix("chosen").unwrap().mix,
            crate::mix::parse_mix("code=1").unwrap(),
            "the later choice was lost"
        );
        assert!(reopened.mix("other").is_some());
        assert_eq!(reopened.names(), ["code", "late", "math"]);
        // Each store sees the mixes the other stored; a name taken on disk is refused in both.
        assert_eq!(
            first.mix("chosen").unwrap().mix,
            reopened.mix("chosen").unwrap().mix
        );
        assert!(second.upload(expert(&d, "other", 5), &d).is_err());
        assert!(first.save_mix(mix("late", "math=1")).is_err());

        // Writers in threads, each through its own store, never lose one another's mixes.
        let stores: Vec<ExpertStore> = (0..4)
            .map(|_| ExpertStore::open(root.path(), "tiny", &d).unwrap())
            .collect();
        std::thread::scope(|s| {
            for (i, store) in stores.iter().enumerate() {
                s.spawn(move || {
                    for j in 0..10 {
                        store.save_mix(mix(&format!("m{i}-{j}"), "math=1")).unwrap();
                    }
                });
            }
        });
        let all = ExpertStore::open(root.path(), "tiny", &d).unwrap().mixes();
        assert_eq!(
            all.len(),
            2 + 40,
            "{:?}",
            all.iter().map(|m| &m.name).collect::<Vec<_>>()
        );
    }

    #[test]
    fn names_of_mixes_and_experts_do_not_collide() {
        let d = decomp();
        let root = tempfile::tempdir().unwrap();
        let store = ExpertStore::open(root.path(), "tiny", &d).unwrap();
        store.upload(expert(&d, "math", 1), &d).unwrap();
        store
            .save_mix(StoredMix {
                name: "blend".into(),
                mix: Mix::expert("math"),
                ..Default::default()
            })
            .unwrap();
        assert!(matches!(
            store.upload(expert(&d, "blend", 2), &d),
            Err(SvfError::Conflict(_))
        ));
        // An expert a stored mix names stays.
        assert!(matches!(
            store.remove("math", |_| None),
            Err(SvfError::Conflict(_))
        ));
        let (key, experts) = store.resolve(&Mix::expert("math")).unwrap();
        assert_eq!(experts.len(), 1);
        assert_eq!(key, store.key_of(&Mix::expert("math")).unwrap());
    }
}
