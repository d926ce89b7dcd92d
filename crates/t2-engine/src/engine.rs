//! A resident model: weights, tokenizer and template, and (when SVF is on) the decomposition, the expert
//! store and the table of mixes that batch rows refer to.

use std::path::PathBuf;

use candle_core::{DType, Device};
use t2_model::{BaseWeights, ChatMessage, DenseProjector, LoadedModel, ModelError, Projector};
use t2_svf::decompose::{CacheDtype, CacheOptions, Origin};
use t2_svf::{
    Adaptation, Decomposition, ExpertStore, MixKey, MixLease, SvfError, SvfProjector, TargetSet,
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Svf(#[from] SvfError),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("experts need the SVF decomposition, which this engine was started without")]
    NoSvf,
    #[error("model error: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, EngineError>;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    pub device: Device,
    pub dtype: DType,
    /// Base weights in the model's dtype, or 8-bit on the CPU (`--dtype q8_0`).
    pub base_weights: BaseWeights,
    pub targets: TargetSet,
    /// Precision of the decomposition cache to load, or to write when none serves (a bf16 request is
    /// also served by an f32 cache).
    pub cache_dtype: CacheDtype,
    pub experts_dir: PathBuf,
    /// Load (or build) the decomposition and experts; without it only the base model runs.
    pub svf: bool,
    pub mix_capacity: usize,
    pub merged_capacity: usize,
    /// Show progress bars on stderr for long steps.
    pub progress: bool,
    /// Serve random weights of this shape instead of the model's (speed work at sizes we cannot ship):
    /// `model_path` then gives only the tokenizer, template and vocabulary size, the decomposition is
    /// random, and four random experts (`random-0` … `random-3`) stand in for trained ones.
    pub random_shape: Option<(String, t2_model::LlamaConfig)>,
    /// Drop the dense copies of weights and SVF factors that the CPU kernels hold packed, so a server
    /// holds each once. Off for what reads them densely later (training, export, bench's decompositions).
    pub release_dense: bool,
}

impl EngineConfig {
    pub fn new(model_path: PathBuf) -> Self {
        Self {
            model_path,
            device: Device::Cpu,
            dtype: DType::F32,
            base_weights: BaseWeights::Dense,
            targets: TargetSet::All,
            cache_dtype: CacheDtype::F32,
            experts_dir: PathBuf::from("experts"),
            svf: true,
            mix_capacity: 64,
            merged_capacity: 2,
            progress: false,
            random_shape: None,
            release_dense: false,
        }
    }
}

pub struct Engine {
    pub loaded: LoadedModel,
    pub svf: Option<SvfProjector>,
    pub experts: Option<ExpertStore>,
    pub decomposition_origin: Option<Origin>,
    /// Bytes of dense copies dropped at open ([`EngineConfig::release_dense`]).
    pub released_bytes: usize,
}

impl Engine {
    pub fn open(cfg: &EngineConfig) -> Result<Self> {
        if let Some((name, shape)) = &cfg.random_shape {
            return Self::open_random(cfg, name, shape);
        }
        let mut loaded = LoadedModel::load(&cfg.model_path, &cfg.device, cfg.dtype)?;
        loaded.model.set_base_weights(cfg.base_weights)?;
        if !cfg.svf {
            return Ok(Self::without_svf(loaded).released_if(cfg.release_dense));
        }
        let (decomp, origin) = Decomposition::load_or_compute_with(
            &cfg.model_path,
            &loaded.model,
            &loaded.weights_sha256,
            &CacheOptions::new(cfg.targets, cfg.cache_dtype),
            cfg.progress,
        )?;
        tracing::info!(targets = %cfg.targets, "SVF factors {origin}");
        let experts = ExpertStore::open(&cfg.experts_dir, &loaded.model_id, &decomp)?;
        let mut svf = SvfProjector::new(decomp, cfg.mix_capacity, cfg.merged_capacity)?;
        match cfg.base_weights {
            BaseWeights::F16 => svf.store_factors_as(DType::F16)?,
            BaseWeights::BF16 => svf.store_factors_as(DType::BF16)?,
            BaseWeights::Dense | BaseWeights::Q8 => {}
        }
        Ok(Self {
            loaded,
            svf: Some(svf),
            experts: Some(experts),
            decomposition_origin: Some(origin),
            released_bytes: 0,
        }
        .released_if(cfg.release_dense))
    }

    pub fn from_parts(
        loaded: LoadedModel,
        svf: Option<SvfProjector>,
        experts: Option<ExpertStore>,
    ) -> Self {
        Self {
            loaded,
            svf,
            experts,
            decomposition_origin: None,
            released_bytes: 0,
        }
    }

    pub fn projector(&self) -> &dyn Projector {
        match &self.svf {
            Some(p) => p,
            None => &DenseProjector,
        }
    }

    /// A lease on the table slot of an adaptation, registering its scales on first use.
    pub fn lease(&self, a: &Adaptation) -> Result<MixLease> {
        if a.is_base() {
            return Ok(self.lease_base());
        }
        let (svf, store) = match (&self.svf, &self.experts) {
            (Some(s), Some(e)) => (s, e),
            _ => return Err(EngineError::NoSvf),
        };
        Ok(match a {
            Adaptation::Vectors(z) => svf.lease(&MixKey::of_vectors(z), || Ok(z.z().clone()))?,
            Adaptation::Mix(m) => {
                // Key and vectors from one reading of the store: an expert replaced meanwhile cannot
                // pair the new key with old vectors (or the reverse).
                let (key, experts) = store.resolve(m)?;
                svf.lease(&key, || {
                    m.z(&svf.decomp, |name| {
                        experts.get(name).map(|e| e.as_ref()).ok_or_else(|| {
                            SvfError::UnknownExpert {
                                name: name.into(),
                                known: experts.keys().cloned().collect::<Vec<_>>().join(", "),
                            }
                        })
                    })
                })?
            }
        })
    }

    /// A lease on the base model's slot.
    pub fn lease_base(&self) -> MixLease {
        match &self.svf {
            Some(svf) => svf.lease_base(),
            None => MixLease::unheld_base(),
        }
    }

    /// Checks that an adaptation can be leased (SVF on, every expert known) without registering it.
    pub fn check_adaptation(&self, a: &Adaptation) -> Result<()> {
        if a.is_base() {
            return Ok(());
        }
        if self.svf.is_none() {
            return Err(EngineError::NoSvf);
        }
        match a {
            Adaptation::Vectors(_) => Ok(()),
            Adaptation::Mix(m) => Ok(self.experts.as_ref().ok_or(EngineError::NoSvf)?.check(m)?),
        }
    }

    /// The chat template applied to `messages`, tokenized.
    /// The base model alone: no decomposition, experts or mixes.
    fn without_svf(loaded: LoadedModel) -> Self {
        Self {
            loaded,
            svf: None,
            experts: None,
            decomposition_origin: None,
            released_bytes: 0,
        }
    }

    /// With `release`, drops the dense copies the packed kernels make redundant (the model's projections,
    /// the SVF factors); elsewhere (a GPU) nothing is packed and nothing goes.
    fn released_if(mut self, release: bool) -> Self {
        if release {
            self.released_bytes = self.loaded.model.release_dense()
                + self.svf.as_mut().map_or(0, |s| s.release_dense());
        }
        self
    }

    fn open_random(cfg: &EngineConfig, name: &str, shape: &t2_model::LlamaConfig) -> Result<Self> {
        let mut loaded = LoadedModel::load(&cfg.model_path, &Device::Cpu, DType::F32)?;
        let shape = t2_model::LlamaConfig {
            vocab_size: loaded.model.cfg.vocab_size,
            ..shape.clone()
        };
        loaded.model = t2_model::random_llama(&shape, cfg.dtype, &cfg.device, 7)?;
        loaded.model.set_base_weights(cfg.base_weights)?;
        loaded.model_id = format!("random-{name}");
        loaded.weights_sha256 = "random".into();
        if !cfg.svf {
            return Ok(Self::without_svf(loaded).released_if(cfg.release_dense));
        }
        let decomp = Decomposition::random(&loaded.model, cfg.targets, 11)?;
        // Random experts fit only this process's random decomposition: they live in a scratch store.
        let scratch =
            std::env::temp_dir().join(format!("t2-random-experts-{}", std::process::id()));
        let mut experts = ExpertStore::open(&scratch, &loaded.model_id, &decomp)?;
        for k in 0..4 {
            let meta = t2_svf::ExpertMeta {
                name: format!("random-{k}"),
                description: "random z (speed measurements only)".into(),
                category: "random".into(),
                model_id: loaded.model_id.clone(),
                decomposition_hash: decomp.hash.clone(),
                targets: cfg.targets,
                provenance: Default::default(),
            };
            experts.add(t2_svf::Expert::random(meta, &decomp, k, 0.3), &decomp)?;
        }
        let svf = SvfProjector::new(decomp, cfg.mix_capacity, cfg.merged_capacity)?;
        Ok(Self {
            loaded,
            svf: Some(svf),
            experts: Some(experts),
            decomposition_origin: None,
            released_bytes: 0,
        }
        .released_if(cfg.release_dense))
    }

    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.loaded.template.render(messages)?;
        Ok(self.loaded.tokenizer.encode(&text)?)
    }

    pub fn context_length(&self) -> usize {
        self.loaded.model.cfg.max_position_embeddings
    }
}
