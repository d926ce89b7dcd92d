//! A resident model: weights, tokenizer and template, and (when SVF is on) the decomposition, the expert
//! store and the table of mixes that batch rows refer to.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use t2_model::{ChatMessage, DenseProjector, LoadedModel, ModelError, ProjId, Projector};
use t2_svf::decompose::Origin;
use t2_svf::mix::{combine, MixId};
use t2_svf::{Decomposition, ExpertStore, SvfError, SvfProjector, TargetSet, BASE_MIX};

use crate::routing::BASE_SHARE;

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
    pub targets: TargetSet,
    pub experts_dir: PathBuf,
    /// Load (or build) the decomposition and experts; without it only the base model runs.
    pub svf: bool,
    pub mix_capacity: usize,
    pub merged_capacity: usize,
    /// Show progress bars on stderr for long steps.
    pub progress: bool,
}

impl EngineConfig {
    pub fn new(model_path: PathBuf) -> Self {
        Self {
            model_path,
            device: Device::Cpu,
            dtype: DType::F32,
            targets: TargetSet::All,
            experts_dir: PathBuf::from("experts"),
            svf: true,
            mix_capacity: 64,
            merged_capacity: 2,
            progress: false,
        }
    }
}

/// How a request wants the model adapted.
#[derive(Debug, Clone, PartialEq)]
pub enum Adaptation {
    Base,
    Expert(String),
    /// α per expert name.
    Mix(BTreeMap<String, f32>),
    /// z vectors that are not in the expert store (the policy being trained, an expert file under
    /// evaluation). The name stands for the contents: give changed vectors a new name.
    Vectors {
        name: String,
        z: ZVectors,
    },
}

/// Per-matrix z, shared cheaply between requests.
#[derive(Clone, PartialEq)]
pub struct ZVectors(pub Arc<BTreeMap<ProjId, Vec<f32>>>);

impl std::fmt::Debug for ZVectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ZVectors({} matrices)", self.0.len())
    }
}

impl Adaptation {
    /// The name the mix is registered under: equal adaptations share one table slot.
    pub fn canonical_name(&self) -> String {
        match self {
            Self::Base => "base".into(),
            Self::Expert(e) => format!("expert:{e}"),
            Self::Mix(m) => format!(
                "mix:{}",
                m.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Self::Vectors { name, .. } => format!("z:{name}"),
        }
    }
}

pub struct Engine {
    pub loaded: LoadedModel,
    pub svf: Option<SvfProjector>,
    pub experts: Option<ExpertStore>,
    pub decomposition_origin: Option<Origin>,
}

impl Engine {
    pub fn open(cfg: &EngineConfig) -> Result<Self> {
        let loaded = LoadedModel::load(&cfg.model_path, &cfg.device, cfg.dtype)?;
        if !cfg.svf {
            return Ok(Self {
                loaded,
                svf: None,
                experts: None,
                decomposition_origin: None,
            });
        }
        let (decomp, origin) = Decomposition::load_or_compute(
            &cfg.model_path,
            &loaded.model,
            &loaded.weights_sha256,
            cfg.targets,
            cfg.progress,
        )?;
        let experts = ExpertStore::open(&cfg.experts_dir, &loaded.model_id, &decomp)?;
        let svf = SvfProjector::new(decomp, cfg.mix_capacity, cfg.merged_capacity)?;
        Ok(Self {
            loaded,
            svf: Some(svf),
            experts: Some(experts),
            decomposition_origin: Some(origin),
        })
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
        }
    }

    pub fn projector(&self) -> &dyn Projector {
        match &self.svf {
            Some(p) => p,
            None => &DenseProjector,
        }
    }

    /// The mix id for an adaptation, registering the mix on first use.
    pub fn resolve(&self, a: &Adaptation) -> Result<MixId> {
        if *a == Adaptation::Base {
            return Ok(BASE_MIX);
        }
        let (svf, store) = match (&self.svf, &self.experts) {
            (Some(s), Some(e)) => (s, e),
            _ => return Err(EngineError::NoSvf),
        };
        let name = a.canonical_name();
        if let Some(id) = svf.mix_id(&name) {
            return Ok(id);
        }
        if let Adaptation::Vectors { z, .. } = a {
            return Ok(svf.register(&name, &z.0)?);
        }
        // The base share of a routed mix adds w·1 to every z (the unadapted model's neutral vector).
        let mut base_share = 0.0;
        let parts: Vec<_> = match a {
            Adaptation::Base | Adaptation::Vectors { .. } => unreachable!("handled above"),
            Adaptation::Expert(e) => vec![(store.get(e)?, 1.0)],
            Adaptation::Mix(m) => {
                base_share = m.get(BASE_SHARE).copied().unwrap_or(0.0);
                m.iter()
                    .filter(|(e, _)| *e != BASE_SHARE)
                    .map(|(e, &w)| Ok((store.get(e)?, w)))
                    .collect::<std::result::Result<_, SvfError>>()?
            }
        };
        if parts.is_empty() {
            return Ok(BASE_MIX);
        }
        let mut z = combine(&svf.decomp, &parts)?;
        if base_share != 0.0 {
            z.values_mut()
                .for_each(|v| v.iter_mut().for_each(|x| *x += base_share));
        }
        Ok(svf.register(&name, &z)?)
    }

    /// Checks that an adaptation can be resolved (SVF on, every expert known) without registering it.
    pub fn check_adaptation(&self, a: &Adaptation) -> Result<()> {
        let names: Vec<&String> = match a {
            Adaptation::Base => return Ok(()),
            Adaptation::Vectors { .. } => {
                return match self.svf {
                    Some(_) => Ok(()),
                    None => Err(EngineError::NoSvf),
                }
            }
            Adaptation::Expert(e) => vec![e],
            Adaptation::Mix(m) => {
                if m.is_empty() {
                    return Err(EngineError::Invalid("the mix names no expert".into()));
                }
                if let Some((k, w)) = m.iter().find(|(_, w)| !w.is_finite()) {
                    return Err(EngineError::Invalid(format!(
                        "the weight of '{k}' in the mix is not a finite number ({w})"
                    )));
                }
                m.keys().collect()
            }
        };
        let store = self.experts.as_ref().ok_or(EngineError::NoSvf)?;
        for n in names.into_iter().filter(|n| *n != BASE_SHARE) {
            store.get(n)?;
        }
        Ok(())
    }

    /// The chat template applied to `messages`, tokenized.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.loaded.template.render(messages)?;
        Ok(self.loaded.tokenizer.encode(&text)?)
    }

    pub fn context_length(&self) -> usize {
        self.loaded.model.cfg.max_position_embeddings
    }
}
