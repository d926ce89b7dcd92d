//! The target matrices of a checkpoint read straight from its file(s), one at a time, without loading
//! the model: what `t2 decompose` streams from, so an 8B model never sits in memory, in f32 or otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use t2_model::load::{weight_files, weights_sha256};
use t2_model::{ModelSource, ProjId, ProjKind};

use crate::decompose::MatrixSource;
use crate::error::{Result, SvfError};

const GGUF_NAMES: [(ProjKind, &str); 7] = [
    (ProjKind::Q, "attn_q"),
    (ProjKind::K, "attn_k"),
    (ProjKind::V, "attn_v"),
    (ProjKind::O, "attn_output"),
    (ProjKind::Gate, "ffn_gate"),
    (ProjKind::Up, "ffn_up"),
    (ProjKind::Down, "ffn_down"),
];

enum Files {
    Gguf {
        path: PathBuf,
        content: gguf_file::Content,
    },
    /// One mapping per shard.
    Safetensors(Vec<memmap2::Mmap>),
}

/// A checkpoint's projection matrices, each read and converted to f32 on request.
pub struct CheckpointMatrices {
    files: Files,
    /// matrix → (tensor name in the file, file index for safetensors, (out, in))
    index: BTreeMap<ProjId, (String, usize, (usize, usize))>,
    pub weights_sha256: String,
    /// Bytes of the weight files.
    pub file_bytes: u64,
}

fn io(path: &Path, e: std::io::Error) -> SvfError {
    SvfError::Io {
        path: path.into(),
        source: e,
    }
}

fn unreadable(path: &Path, reason: impl std::fmt::Display) -> SvfError {
    SvfError::Io {
        path: path.into(),
        source: std::io::Error::other(reason.to_string()),
    }
}

fn parse_gguf_name(name: &str) -> Option<ProjId> {
    let rest = name.strip_prefix("blk.")?.strip_suffix(".weight")?;
    let (layer, short) = rest.split_once('.')?;
    let kind = GGUF_NAMES.iter().find(|(_, s)| *s == short)?.0;
    Some(ProjId {
        layer: layer.parse().ok()?,
        kind,
    })
}

fn parse_hf_name(name: &str) -> Option<ProjId> {
    let rest = name
        .strip_prefix("model.layers.")?
        .strip_suffix(".weight")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, kind) = rest.split_once('.')?;
    let kind = ProjKind::from_name(kind)?;
    let want = if ProjKind::MLP.contains(&kind) {
        "mlp"
    } else {
        "self_attn"
    };
    (part == want).then_some(ProjId {
        layer: layer.parse().ok()?,
        kind,
    })
}

impl CheckpointMatrices {
    pub fn open(path: &Path) -> Result<Self> {
        let model = |e: t2_model::ModelError| unreadable(path, e);
        let (source, paths) = weight_files(path).map_err(model)?;
        let weights_sha256 = weights_sha256(path).map_err(model)?;
        let file_bytes = paths
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        let mut index = BTreeMap::new();
        let files = match source {
            ModelSource::Gguf(p) => {
                let mut f = std::fs::File::open(&p).map_err(|e| io(&p, e))?;
                let content = gguf_file::Content::read(&mut f).map_err(|e| unreadable(&p, e))?;
                for (name, info) in &content.tensor_infos {
                    if let (Some(id), [o, i]) = (parse_gguf_name(name), info.shape.dims()) {
                        index.insert(id, (name.clone(), 0, (*o, *i)));
                    }
                }
                Files::Gguf { path: p, content }
            }
            ModelSource::HfDir(_) => {
                let mut maps = Vec::with_capacity(paths.len());
                for (k, p) in paths.iter().enumerate() {
                    let f = std::fs::File::open(p).map_err(|e| io(p, e))?;
                    // SAFETY: read-only mapping of a checkpoint nobody writes while it is decomposed.
                    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| io(p, e))?;
                    let st = safetensors::SafeTensors::deserialize(&map)
                        .map_err(|e| unreadable(p, e))?;
                    for (name, view) in st.tensors() {
                        if let (Some(id), [o, i]) = (parse_hf_name(&name), view.shape()) {
                            index.insert(id, (name.clone(), k, (*o, *i)));
                        }
                    }
                    drop(st);
                    maps.push(map);
                }
                Files::Safetensors(maps)
            }
        };
        Ok(Self {
            files,
            index,
            weights_sha256,
            file_bytes,
        })
    }

    fn tensor(&self, id: ProjId) -> std::result::Result<Tensor, String> {
        let (name, file, _) = self
            .index
            .get(&id)
            .ok_or_else(|| format!("the checkpoint has no {}", id.name()))?;
        let e = |e: candle_core::Error| e.to_string();
        match &self.files {
            Files::Gguf { path, content } => {
                let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
                content
                    .tensor(&mut f, name, &Device::Cpu)
                    .and_then(|q| q.dequantize(&Device::Cpu))
                    .map_err(e)
            }
            Files::Safetensors(maps) => {
                let st = safetensors::SafeTensors::deserialize(&maps[*file])
                    .map_err(|e| e.to_string())?;
                let view = st.tensor(name).map_err(|e| e.to_string())?;
                view.load(&Device::Cpu).map_err(e)
            }
        }
    }
}

impl MatrixSource for CheckpointMatrices {
    fn matrices(&self) -> Vec<(ProjId, (usize, usize))> {
        self.index.iter().map(|(id, (_, _, s))| (*id, *s)).collect()
    }

    fn matrix_f32(&self, id: ProjId) -> std::result::Result<Vec<f32>, String> {
        self.tensor(id)?
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| e.to_string())
    }
}
