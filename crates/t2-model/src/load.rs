//! Finding and loading a checkpoint: a GGUF file (any quantization, dequantized to dense tensors) or an
//! HF folder (config.json + *.safetensors + tokenizer.json).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::chat::ChatTemplate;
use crate::config::{HfConfig, LlamaConfig, RopeScaling, RopeStyle};
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
    if !["llama", "qwen2", "qwen3", "mistral"].contains(&arch.as_str()) {
        return Err(ModelError::Unsupported(format!(
            "architecture '{arch}' (supported: llama, qwen2, qwen3, mistral)"
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
    let head_dim = u("attention.key_length")
        .or_else(|_| u("rope.dimension_count"))
        .unwrap_or(hidden / heads.max(1));
    let rope_scaling = gguf_rope_scaling(path, &content, &arch, &mut file, device)?;
    let mut max_pos = u("context_length")?;
    // As for HF checkpoints: sliding-window attention is served by capping the context at the window.
    if let Ok(window) = u("attention.sliding_window") {
        if window > 0 && window < max_pos {
            tracing::warn!(
                sliding_window = window,
                "the model uses sliding-window attention, which t2 does not implement: the context is \
                 capped at the window ({window} tokens), where full attention gives the same result"
            );
            max_pos = window;
        }
    }
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: u("feed_forward_length")?,
        num_layers: u("block_count")?,
        num_heads: heads,
        num_kv_heads: u("attention.head_count_kv").unwrap_or(heads),
        head_dim,
        rope_theta: f("rope.freq_base", 10000.0),
        rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-5) as f64,
        max_position_embeddings: max_pos,
        tie_word_embeddings: !has("output.weight"),
        // llama.cpp stores Llama q/k rows permuted for adjacent-pair rotation; Qwen2 keeps NeoX layout.
        rope_style: if arch.starts_with("qwen") {
            RopeStyle::Half
        } else {
            RopeStyle::Interleaved
        },
        qkv_bias: has("blk.0.attn_q.bias"),
        qk_norm: has("blk.0.attn_q_norm.weight"),
        rope_scaling,
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
                Linear::new(
                    ProjId { layer, kind },
                    tensor(&mut file, &format!("blk.{layer}.{short}.weight"))?,
                    if has(&bias_name) {
                        Some(tensor(&mut file, &bias_name)?)
                    } else {
                        None
                    },
                ),
            );
        }
        let norm = |file: &mut std::fs::File, n: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: tensor(file, &format!("blk.{layer}.{n}.weight"))?,
                eps: cfg.rms_norm_eps as f32,
            })
        };
        let (q_norm, k_norm) = match cfg.qk_norm {
            true => (
                Some(norm(&mut file, "attn_q_norm")?),
                Some(norm(&mut file, "attn_k_norm")?),
            ),
            false => (None, None),
        };
        blocks.push(assemble_block(
            norm(&mut file, "attn_norm")?,
            norm(&mut file, "ffn_norm")?,
            lin,
            (q_norm, k_norm),
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

/// The rope scaling of a GGUF. llama.cpp stores Llama-3 scaling as a `rope_freqs.weight` tensor of
/// per-frequency divisors, linear scaling as `rope.scaling.type`; other types (yarn) are refused.
fn gguf_rope_scaling<R: std::io::Read + std::io::Seek>(
    path: &Path,
    content: &gguf_file::Content,
    arch: &str,
    file: &mut R,
    device: &Device,
) -> Result<RopeScaling> {
    let md = &content.metadata;
    let kind = md
        .get(&format!("{arch}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_else(|| "none".into());
    let factor = md
        .get(&format!("{arch}.rope.scaling.factor"))
        .and_then(|v| v.to_f32().ok());
    let freqs = if content.tensor_infos.contains_key("rope_freqs.weight") {
        let t = content
            .tensor(file, "rope_freqs.weight", device)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| gguf_err(path, format!("tensor rope_freqs.weight: {e}")))?;
        Some(t)
    } else {
        None
    };
    match (kind.as_str(), freqs) {
        ("none", Some(f)) => Ok(RopeScaling::FreqFactors(f)),
        ("none", None) => Ok(RopeScaling::None),
        ("linear", None) => match factor {
            Some(factor) if factor > 0.0 => Ok(RopeScaling::Linear { factor }),
            // llama.cpp treats a missing or zero factor as no scaling.
            _ => Ok(RopeScaling::None),
        },
        (other, freqs) => Err(ModelError::Unsupported(format!(
            "rope scaling '{other}'{} in {} (supported: linear, or llama3 frequency factors alone)",
            if freqs.is_some() {
                " combined with rope_freqs.weight"
            } else {
                ""
            },
            path.display()
        ))),
    }
}

fn assemble_block(
    attn_norm: RmsNorm,
    mlp_norm: RmsNorm,
    mut lin: HashMap<ProjKind, Linear>,
    (q_norm, k_norm): (Option<RmsNorm>, Option<RmsNorm>),
) -> Block {
    let mut take = |k| lin.remove(&k).expect("every projection kind is loaded");
    Block {
        attn_norm,
        attn: Attention {
            q: take(ProjKind::Q),
            k: take(ProjKind::K),
            v: take(ProjKind::V),
            o: take(ProjKind::O),
            q_norm,
            k_norm,
            qkv: None,
        },
        mlp_norm,
        mlp: Mlp {
            gate: take(ProjKind::Gate),
            up: take(ProjKind::Up),
            down: take(ProjKind::Down),
            gate_up: None,
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
            expect(l.weight().map_err(|e| e.to_string())?, &shape, &l.id.name())?;
            if let Some(bias) = &l.bias {
                expect(bias, &shape[..1], &format!("{} bias", l.id.name()))?;
            }
        }
        for n in [&b.attn.q_norm, &b.attn.k_norm] {
            match n {
                Some(n) => expect(&n.weight, &[cfg.head_dim], "q/k norm")?,
                None if cfg.qk_norm => return Err("q/k norm weights are missing".into()),
                None => {}
            }
        }
    }
    Ok(())
}

/// The safetensors files of an HF folder: exactly those named by `model.safetensors.index.json` when there
/// is one (sharded checkpoints; other *.safetensors in the folder, such as a `consolidated.safetensors`
/// copy, are not read), else `model.safetensors`, else every *.safetensors file.
fn hf_weight_files(
    dir: &Path,
    index: Option<serde_json::Value>,
) -> std::result::Result<Vec<PathBuf>, String> {
    if let Some(index) = index {
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or("model.safetensors.index.json has no weight_map object")?;
        let mut names: Vec<&str> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                format!("model.safetensors.index.json: weight_map[{tensor}] is not a file name")
            })?;
            if !names.contains(&file) {
                names.push(file);
            }
        }
        names.sort();
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            // A shard name is a plain file name in the same folder.
            if Path::new(name).components().count() != 1 {
                return Err(format!(
                    "model.safetensors.index.json names shard '{name}' outside the folder"
                ));
            }
            let p = dir.join(name);
            if !p.is_file() {
                return Err(format!(
                    "shard {name} named by model.safetensors.index.json is missing"
                ));
            }
            files.push(p);
        }
        if files.is_empty() {
            return Err("model.safetensors.index.json names no shards".into());
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list the folder: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err("no *.safetensors files".into());
    }
    Ok(files)
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
    let cfg = hf
        .into_config()
        .map_err(|e| bad(format!("config.json: {e}")))?;
    cfg.validate().map_err(bad)?;

    let files = hf_weight_files(dir, read_json("model.safetensors.index.json")?).map_err(bad)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut hasher = Sha256::new();
    for f in &files {
        hasher.update(sha256_file(f)?.as_bytes());
        let loaded = candle_core::safetensors::load(f, device)
            .map_err(|e| bad(format!("{}: {e}", f.display())))?;
        tensors.extend(loaded);
    }
    let has_lm_head = tensors.contains_key("lm_head.weight");
    let tensors = std::cell::RefCell::new(tensors);
    let take_opt = |name: &str| -> Result<Option<Tensor>> {
        let t = tensors.borrow_mut().remove(name);
        Ok(t.map(|t| t.to_dtype(dtype)).transpose()?)
    };
    let take = |name: &str| -> Result<Tensor> {
        take_opt(name)?.ok_or_else(|| bad(format!("missing tensor {name}")))
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
            // q/k/v biases are required where the config says so (Qwen2); any other bias the checkpoint
            // has (o_proj with attention_bias, mlp_bias) is used too.
            let bias = if cfg.qkv_bias && matches!(kind, ProjKind::Q | ProjKind::K | ProjKind::V) {
                Some(take(&format!("{base}.bias"))?)
            } else {
                take_opt(&format!("{base}.bias"))?
            };
            lin.insert(
                kind,
                Linear::new(
                    ProjId { layer, kind },
                    take(&format!("{base}.weight"))?,
                    bias,
                ),
            );
        }
        let eps = cfg.rms_norm_eps as f32;
        let norm = |name: String| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: take(&name)?,
                eps,
            })
        };
        let attn_norm = norm(format!("model.layers.{layer}.input_layernorm.weight"))?;
        let mlp_norm = norm(format!(
            "model.layers.{layer}.post_attention_layernorm.weight"
        ))?;
        let qk_norms = match cfg.qk_norm {
            true => (
                Some(norm(format!(
                    "model.layers.{layer}.self_attn.q_norm.weight"
                ))?),
                Some(norm(format!(
                    "model.layers.{layer}.self_attn.k_norm.weight"
                ))?),
            ),
            false => (None, None),
        };
        blocks.push(assemble_block(attn_norm, mlp_norm, lin, qk_norms));
    }
    let norm = RmsNorm {
        weight: take("model.norm.weight")?,
        eps: cfg.rms_norm_eps as f32,
    };
    // Tied: the head is the embedding (a copy of it in the file, if any, is ignored, as HF does). A config
    // silent about tying whose file has no head is tied; one that says untied must have the head.
    let tie_declared = cfg_json
        .get("tie_word_embeddings")
        .and_then(|v| v.as_bool());
    let mut cfg = cfg;
    if tie_declared.is_none() && !has_lm_head {
        cfg.tie_word_embeddings = true;
    }
    let lm_head = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        take("lm_head.weight").map_err(|_| {
            bad("tie_word_embeddings is false but the checkpoint has no lm_head.weight".into())
        })?
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

/// The weight files of a checkpoint (the `.gguf` itself, or the safetensors an HF folder uses), found
/// without reading any tensor.
pub fn weight_files(path: &Path) -> Result<(ModelSource, Vec<PathBuf>)> {
    let source = ModelSource::detect(path)?;
    let files = match &source {
        ModelSource::Gguf(p) => vec![p.clone()],
        ModelSource::HfDir(dir) => {
            let bad = |reason: String| ModelError::BadCheckpoint {
                path: dir.clone(),
                reason,
            };
            let index_path = dir.join("model.safetensors.index.json");
            let index = if index_path.is_file() {
                let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::Io {
                    path: index_path.clone(),
                    source: e,
                })?;
                Some(
                    serde_json::from_str(&text)
                        .map_err(|e| bad(format!("model.safetensors.index.json: {e}")))?,
                )
            } else {
                None
            };
            hf_weight_files(dir, index).map_err(bad)?
        }
    };
    Ok((source, files))
}

/// The sha256 [`LoadedModel::weights_sha256`] has for this checkpoint, without loading it.
pub fn weights_sha256(path: &Path) -> Result<String> {
    match weight_files(path)? {
        (ModelSource::Gguf(p), _) => sha256_file(&p),
        (ModelSource::HfDir(_), files) => {
            let mut hasher = Sha256::new();
            for f in &files {
                hasher.update(sha256_file(f)?.as_bytes());
            }
            Ok(hex::encode(hasher.finalize()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file::Value, QTensor};

    /// A GGUF holding only rope metadata and, optionally, a `rope_freqs.weight` tensor.
    fn rope_of(meta: &[(&str, Value)], freqs: Option<Vec<f32>>) -> Result<RopeScaling> {
        let mut md: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let arch = Value::String("llama".into());
        md.push(("general.architecture", &arch));
        let tensors: Vec<(&str, QTensor)> = freqs
            .map(|f| {
                let n = f.len();
                let t = Tensor::from_vec(f, n, &Device::Cpu).unwrap();
                vec![(
                    "rope_freqs.weight",
                    QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32).unwrap(),
                )]
            })
            .unwrap_or_default();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        let mut buf = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut buf, &md, &tensors).unwrap();
        buf.set_position(0);
        let content = gguf_file::Content::read(&mut buf).unwrap();
        gguf_rope_scaling(
            Path::new("x.gguf"),
            &content,
            "llama",
            &mut buf,
            &Device::Cpu,
        )
    }

    /// llama.cpp's conversion writes Llama-3 scaling as one divisor per frequency; read back, those give
    /// the same frequencies as the HF parameters.
    #[test]
    fn gguf_llama3_frequency_factors_match_hf_scaling() {
        let cfg = LlamaConfig::llama_3_8b();
        let RopeScaling::Llama3 {
            factor,
            low_freq_factor: lo,
            high_freq_factor: hi,
            original_max_position_embeddings: orig,
        } = cfg.rope_scaling.clone()
        else {
            unreachable!()
        };
        let d = cfg.head_dim;
        let plain: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / d as f32))
            .collect();
        let orig = orig as f32;
        let divisors: Vec<f32> = plain
            .iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < orig / hi {
                    1.0
                } else if wavelen > orig / lo {
                    factor
                } else {
                    let smooth = (orig / wavelen - lo) / (hi - lo);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect();
        let read = rope_of(&[], Some(divisors.clone())).unwrap();
        assert_eq!(read, RopeScaling::FreqFactors(divisors));
        let (mut a, mut b) = (plain.clone(), plain);
        read.apply(&mut a);
        cfg.rope_scaling.apply(&mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * y, "{x} vs {y}");
        }
    }

    #[test]
    fn gguf_rope_scaling_types() {
        assert_eq!(rope_of(&[], None).unwrap(), RopeScaling::None);
        let linear = [
            ("llama.rope.scaling.type", Value::String("linear".into())),
            ("llama.rope.scaling.factor", Value::F32(4.0)),
        ];
        assert_eq!(
            rope_of(&linear, None).unwrap(),
            RopeScaling::Linear { factor: 4.0 }
        );
        let yarn = [
            ("llama.rope.scaling.type", Value::String("yarn".into())),
            ("llama.rope.scaling.factor", Value::F32(4.0)),
        ];
        let e = rope_of(&yarn, None).unwrap_err().to_string();
        assert!(e.contains("yarn"), "{e}");
        assert!(rope_of(&linear, Some(vec![1.0; 4])).is_err());
    }
}
