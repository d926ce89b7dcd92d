//! Training checkpoints: logits, Adam moments and the best-so-far logits in one safetensors file, with the
//! training state and a checksum of every number in its metadata. Written to a temporary name and renamed,
//! so a crash leaves the previous checkpoint intact; a damaged file is refused, never half-used.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use t2_model::ProjId;

use crate::{Result, TrainError};

const FORMAT: &str = "t2-train-checkpoint-v1";

/// Vectors per matrix, for each of the groups a checkpoint holds.
pub type Vectors = BTreeMap<ProjId, Vec<f32>>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Steps completed.
    pub step: usize,
    pub adam_t: u64,
    pub best_val: Option<f64>,
    pub best_step: usize,
    /// The configuration the run was started with (JSON), to refuse resuming a different run.
    pub config: serde_json::Value,
}

pub struct Checkpoint {
    pub state: TrainState,
    pub p: Vectors,
    pub m: Vectors,
    pub v: Vectors,
    pub best: Vectors,
}

const GROUPS: [&str; 4] = ["p", "m", "v", "best"];

impl Checkpoint {
    fn groups(&self) -> [&Vectors; 4] {
        [&self.p, &self.m, &self.v, &self.best]
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for (g, vecs) in GROUPS.iter().zip(self.groups()) {
            for (id, v) in vecs {
                tensors.push((
                    format!("{g}/{}", id.name()),
                    Tensor::from_slice(v, v.len(), &Device::Cpu)?,
                ));
            }
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut hasher = Sha256::new();
        for (name, t) in &tensors {
            hasher.update(name.as_bytes());
            for x in t.to_vec1::<f32>()? {
                hasher.update(x.to_le_bytes());
            }
        }
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            (
                "state".into(),
                serde_json::to_string(&self.state).expect("state serializes"),
            ),
            ("sha256".into(), hex::encode(hasher.finalize())),
        ]);
        let tmp = path.with_extension("safetensors.tmp");
        safetensors::serialize_to_file(
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
            Some(metadata),
            &tmp,
        )
        .map_err(|e| TrainError::Io(tmp.clone(), std::io::Error::other(e.to_string())))?;
        std::fs::rename(&tmp, path).map_err(|e| TrainError::Io(path.into(), e))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bad = |reason: String| TrainError::Checkpoint {
            path: PathBuf::from(path),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| TrainError::Io(path.into(), e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("unreadable: {e}")))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let md = header.metadata().clone().unwrap_or_default();
        if md.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!("not a {FORMAT} file")));
        }
        let state: TrainState =
            serde_json::from_str(md.get("state").ok_or_else(|| bad("no state".into()))?)
                .map_err(|e| bad(format!("bad state: {e}")))?;
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        let mut hasher = Sha256::new();
        let mut groups: [Vectors; 4] = Default::default();
        for name in &names {
            let view = st.tensor(name).map_err(|e| bad(e.to_string()))?;
            let v = t2_svf::expert::f32_vector(&view)
                .ok_or_else(|| bad(format!("{name} is not a 1-D f32 vector")))?;
            hasher.update(name.as_bytes());
            v.iter().for_each(|x| hasher.update(x.to_le_bytes()));
            let (g, proj) = name
                .split_once('/')
                .ok_or_else(|| bad(format!("unexpected tensor {name}")))?;
            let gi = GROUPS
                .iter()
                .position(|x| *x == g)
                .ok_or_else(|| bad(format!("unexpected tensor {name}")))?;
            let id = ProjId::parse(proj).ok_or_else(|| bad(format!("unexpected tensor {name}")))?;
            groups[gi].insert(id, v);
        }
        if md.get("sha256").map(String::as_str) != Some(hex::encode(hasher.finalize()).as_str()) {
            return Err(bad("checksum mismatch (the file is damaged)".into()));
        }
        let [p, m, v, best] = groups;
        if p.is_empty() || p.len() != m.len() || p.len() != v.len() || p.len() != best.len() {
            return Err(bad(
                "incomplete: the logit, moment and best-vector groups differ".into(),
            ));
        }
        Ok(Self {
            state,
            p,
            m,
            v,
            best,
        })
    }
}
