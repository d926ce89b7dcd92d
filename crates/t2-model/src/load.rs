//! Finding and loading a checkpoint: a GGUF file (any quantization, dequantized to dense tensors) or an
//! HF folder (config.json + *.safetensors + tokenizer.json).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::chat::ChatTemplate;
use crate::config::{HfConfig, LlamaConfig, RopeStyle};
use crate::error::{ModelError, Result};
use crate::llama::{Attention, Block, Linear, Llama, Mlp, ProjId, ProjKind, RmsNorm};
use crate::tokenizer::T2Tokenizer;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

impl ModelSource {
    /// A `.gguf` file or a folder with `config.json`.
    pub fn detect(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(ModelError::NotFound(path.to_path_buf()));
        }
        if path.is_dir() {
            if path.join("config.json").is_file() {
                return Ok(Self::HfDir(path.to_path_buf()));
            }
            return Err(ModelError::BadCheckpoint {
                path: path.to_path_buf(),
                reason:
                    "folder has no config.json (expected an HF checkpoint folder or a .gguf file)"
                        .into(),
            });
        }
        Ok(Self::Gguf(path.to_path_buf()))
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(p) | Self::HfDir(p) => p,
        }
    }
}

/// A model ready to run, with what is needed to talk to it.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: T2Tokenizer,
    pub template: ChatTemplate,
    /// Short name used by the API and by `experts/<model-id>/`.
    pub model_id: String,
    /// sha256 of the weights file(s): decomposition caches and experts are tied to it.
    pub weights_sha256: String,
    pub source: ModelSource,
}

impl LoadedModel {
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        match ModelSource::detect(path)? {
            ModelSource::Gguf(p) => load_gguf(&p, device, dtype),
            ModelSource::HfDir(p) => load_hf(&p, device, dtype),
        }
    }
}

/// "models/SmolLM2-135M-Instruct.Q4_1.gguf" → "SmolLM2-135M-Instruct".
pub fn model_id_from_path(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let quant = regex_free_quant_suffix(&stem);
    stem[..stem.len() - quant].to_string()
}

fn regex_free_quant_suffix(stem: &str) -> usize {
    match stem.rsplit_once('.') {
        Some((_, q))
            if q.starts_with('Q')
                || q.starts_with("IQ")
                || ["F16", "F32", "BF16", "f16", "f32", "bf16"].contains(&q) =>
        {
            q.len() + 1
        }
        _ => 0,
    }
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::Io {
        path: path.into(),
        source: e,
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| ModelError::Io {
            path: path.into(),
            source: e,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn gguf_err(path: &Path, reason: impl std::fmt::Display) -> ModelError {
    ModelError::BadGguf {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn load_gguf(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::Io {
        path: path.into(),
        source: e,
    })?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let content = gguf_file::Content::read(&mut file).map_err(|e| gguf_err(path, e))?;
    // A truncated download keeps a valid header: check every tensor's bytes are really there.
    for (name, info) in &content.tensor_infos {
        let bytes =
            info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let end = content.tensor_data_offset + info.offset + bytes as u64;
        if end > file_len {
            return Err(gguf_err(
                path,
                format!(
                    "truncated: tensor {name} ends at byte {end} but the file has {file_len} bytes"
                ),
            ));
        }
    }
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .ok_or_else(|| gguf_err(path, "no general.architecture"))?;
    if !["llama", "qwen2", "mistral"].contains(&arch.as_str()) {
        return Err(ModelError::Unsupported(format!(
            "architecture '{arch}' (supported: llama, qwen2, mistral)"
        )));
    }
    let u = |k: &str| -> Result<usize> {
        md.get(&format!("{arch}.{k}"))
            .ok_or_else(|| gguf_err(path, format!("missing metadata {arch}.{k}")))?
            .to_u32()
            .map(|v| v as usize)
            .or_else(|_| md[&format!("{arch}.{k}")].to_u64().map(|v| v as usize))
            .map_err(|e| gguf_err(path, e))
    };
    let f = |k: &str, default: f32| -> f32 {
        md.get(&format!("{arch}.{k}"))
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(default)
    };
    let hidden = u("embedding_length")?;
    let heads = u("attention.head_count")?;
    let has = |name: &str| content.tensor_infos.contains_key(name);
    let tensor = |file: &mut std::fs::File, name: &str| -> Result<Tensor> {
        let q = content
            .tensor(file, name, device)
            .map_err(|e| gguf_err(path, format!("tensor {name}: {e}")))?;
        Ok(q.dequantize(device)?.to_dtype(dtype)?)
    };
    let embed = tensor(&mut file, "token_embd.weight")?;
    let vocab = embed.dim(0)?;
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: u("feed_forward_length")?,
        num_layers: u("block_count")?,
        num_heads: heads,
        num_kv_heads: u("attention.head_count_kv").unwrap_or(heads),
        head_dim: u("rope.dimension_count").unwrap_or(hidden / heads.max(1)),
        rope_theta: f("rope.freq_base", 10000.0),
        rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-5) as f64,
        max_position_embeddings: u("context_length")?,
        tie_word_embeddings: !has("output.weight"),
        // llama.cpp stores Llama q/k rows permuted for adjacent-pair rotation; Qwen2 keeps NeoX layout.
        rope_style: if arch == "qwen2" {
            RopeStyle::Half
        } else {
            RopeStyle::Interleaved
        },
        qkv_bias: has("blk.0.attn_q.bias"),
    };
    cfg.validate().map_err(|e| gguf_err(path, e))?;

    let gguf_names = [
        (ProjKind::Q, "attn_q"),
        (ProjKind::K, "attn_k"),
        (ProjKind::V, "attn_v"),
        (ProjKind::O, "attn_output"),
        (ProjKind::Gate, "ffn_gate"),
        (ProjKind::Up, "ffn_up"),
        (ProjKind::Down, "ffn_down"),
    ];
    let mut blocks = Vec::with_capacity(cfg.num_layers);
    for layer in 0..cfg.num_layers {
        let mut lin: HashMap<ProjKind, Linear> = HashMap::new();
        for (kind, short) in gguf_names {
            let bias_name = format!("blk.{layer}.{short}.bias");
            lin.insert(
                kind,
                Linear {
                    id: ProjId { layer, kind },
                    weight: tensor(&mut file, &format!("blk.{layer}.{short}.weight"))?,
                    bias: if has(&bias_name) {
                        Some(tensor(&mut file, &bias_name)?)
                    } else {
                        None
                    },
                    packed: None,
                },
            );
        }
        let norm = |file: &mut std::fs::File, n: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: tensor(file, &format!("blk.{layer}.{n}.weight"))?,
                eps: cfg.rms_norm_eps as f32,
            })
        };
        blocks.push(assemble_block(
            norm(&mut file, "attn_norm")?,
            norm(&mut file, "ffn_norm")?,
            lin,
        ));
    }
    let norm = RmsNorm {
        weight: tensor(&mut file, "output_norm.weight")?,
        eps: cfg.rms_norm_eps as f32,
    };
    let lm_head = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        tensor(&mut file, "output.weight")?
    };
    check_shapes(&cfg, &embed, &blocks, &lm_head).map_err(|e| gguf_err(path, e))?;

    let tokenizer = T2Tokenizer::from_gguf(&content)?;
    let token_str = |k: &str| {
        md.get(k)
            .and_then(|v| v.to_u32().ok())
            .and_then(|id| tokenizer.id_to_token(id))
            .unwrap_or_default()
    };
    let template = ChatTemplate::new(
        md.get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned()),
        token_str("tokenizer.ggml.bos_token_id"),
        token_str("tokenizer.ggml.eos_token_id"),
    )?;
    let model = Llama::new(cfg, embed, blocks, norm, lm_head)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        template,
        model_id: model_id_from_path(path),
        weights_sha256: sha256_file(path)?,
        source: ModelSource::Gguf(path.to_path_buf()),
    })
}

fn assemble_block(
    attn_norm: RmsNorm,
    mlp_norm: RmsNorm,
    mut lin: HashMap<ProjKind, Linear>,
) -> Block {
    let mut take = |k| lin.remove(&k).expect("every projection kind is loaded");
    Block {
        attn_norm,
        attn: Attention {
            q: take(ProjKind::Q),
            k: take(ProjKind::K),
            v: take(ProjKind::V),
            o: take(ProjKind::O),
        },
        mlp_norm,
        mlp: Mlp {
            gate: take(ProjKind::Gate),
            up: take(ProjKind::Up),
            down: take(ProjKind::Down),
        },
    }
}

/// Shapes must match the config exactly: a mismatch would otherwise surface as a confusing matmul error.
fn check_shapes(
    cfg: &LlamaConfig,
    embed: &Tensor,
    blocks: &[Block],
    lm_head: &Tensor,
) -> std::result::Result<(), String> {
    let (hs, is) = (cfg.hidden_size, cfg.intermediate_size);
    let (qd, kvd) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let expect = |t: &Tensor, shape: &[usize], what: &str| {
        if t.dims() != shape {
            Err(format!(
                "{what} has shape {:?}, expected {shape:?}",
                t.dims()
            ))
        } else {
            Ok(())
        }
    };
    expect(embed, &[cfg.vocab_size, hs], "token embedding")?;
    expect(lm_head, &[cfg.vocab_size, hs], "output head")?;
    for b in blocks {
        for (l, shape) in [
            (&b.attn.q, [qd, hs]),
            (&b.attn.k, [kvd, hs]),
            (&b.attn.v, [kvd, hs]),
            (&b.attn.o, [hs, qd]),
            (&b.mlp.gate, [is, hs]),
            (&b.mlp.up, [is, hs]),
            (&b.mlp.down, [hs, is]),
        ] {
            expect(&l.weight, &shape, &l.id.name())?;
        }
    }
    Ok(())
}

fn load_hf(dir: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let bad = |reason: String| ModelError::BadCheckpoint {
        path: dir.to_path_buf(),
        reason,
    };
    let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
        let p = dir.join(name);
        if !p.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| ModelError::Io {
            path: p.clone(),
            source: e,
        })?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| bad(format!("{name}: {e}")))
    };
    let cfg_json = read_json("config.json")?.ok_or_else(|| bad("missing config.json".into()))?;
    let hf: HfConfig =
        serde_json::from_value(cfg_json.clone()).map_err(|e| bad(format!("config.json: {e}")))?;
    let cfg = hf.into_config();
    cfg.validate().map_err(bad)?;

    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::Io {
            path: dir.into(),
            source: e,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(bad("no *.safetensors files".into()));
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut hasher = Sha256::new();
    for f in &files {
        hasher.update(sha256_file(f)?.as_bytes());
        let loaded = candle_core::safetensors::load(f, device)
            .map_err(|e| bad(format!("{}: {e}", f.display())))?;
        tensors.extend(loaded);
    }
    let mut take = |name: &str| -> Result<Tensor> {
        let t = tensors
            .remove(name)
            .ok_or_else(|| bad(format!("missing tensor {name}")))?;
        Ok(t.to_dtype(dtype)?)
    };
    let embed = take("model.embed_tokens.weight")?;
    let mut blocks = Vec::with_capacity(cfg.num_layers);
    for layer in 0..cfg.num_layers {
        let mut lin = HashMap::new();
        for kind in ProjKind::ALL {
            let part = if ProjKind::MLP.contains(&kind) {
                "mlp"
            } else {
                "self_attn"
            };
            let base = format!("model.layers.{layer}.{part}.{}", kind.name());
            let bias = if cfg.qkv_bias && matches!(kind, ProjKind::Q | ProjKind::K | ProjKind::V) {
                Some(take(&format!("{base}.bias"))?)
            } else {
                None
            };
            lin.insert(
                kind,
                Linear {
                    id: ProjId { layer, kind },
                    weight: take(&format!("{base}.weight"))?,
                    bias,
                    packed: None,
                },
            );
        }
        let eps = cfg.rms_norm_eps as f32;
        let attn_norm = RmsNorm {
            weight: take(&format!("model.layers.{layer}.input_layernorm.weight"))?,
            eps,
        };
        let mlp_norm = RmsNorm {
            weight: take(&format!(
                "model.layers.{layer}.post_attention_layernorm.weight"
            ))?,
            eps,
        };
        blocks.push(assemble_block(attn_norm, mlp_norm, lin));
    }
    let norm = RmsNorm {
        weight: take("model.norm.weight")?,
        eps: cfg.rms_norm_eps as f32,
    };
    let lm_head = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        take("lm_head.weight")?
    };
    check_shapes(&cfg, &embed, &blocks, &lm_head).map_err(bad)?;

    // BOS/EOS: config.json, then generation_config.json, then tokenizer_config.json's token strings.
    let tok_cfg = read_json("tokenizer_config.json")?;
    let gen_cfg = read_json("generation_config.json")?;
    let ids_of = |v: Option<&serde_json::Value>| -> Vec<u32> {
        match v {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect(),
            _ => Vec::new(),
        }
    };
    let from = |key: &str| {
        let mut ids = ids_of(cfg_json.get(key));
        if ids.is_empty() {
            ids = ids_of(gen_cfg.as_ref().and_then(|g| g.get(key)));
        }
        ids
    };
    let add_bos = tok_cfg
        .as_ref()
        .and_then(|t| t.get("add_bos_token"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let tokenizer = T2Tokenizer::from_hf_file(
        &dir.join("tokenizer.json"),
        from("bos_token_id").first().copied(),
        from("eos_token_id"),
        add_bos,
    )?;
    let token_str = |key: &str| -> String {
        match tok_cfg.as_ref().and_then(|t| t.get(key)) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v
                .get("content")
                .and_then(|c| c.as_str())
                .unwrap_or_default()
                .to_string(),
            None => String::new(),
        }
    };
    let template_src = tok_cfg
        .as_ref()
        .and_then(|t| t.get("chat_template"))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let template = ChatTemplate::new(template_src, token_str("bos_token"), token_str("eos_token"))?;
    let model = Llama::new(cfg, embed, blocks, norm, lm_head)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        template,
        model_id: dir
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "model".into()),
        weights_sha256: hex::encode(hasher.finalize()),
        source: ModelSource::HfDir(dir.to_path_buf()),
    })
}
