//! Writing a loaded model as an HF checkpoint folder (config.json, model.safetensors, tokenizer.json,
//! tokenizer_config.json): a dense copy of a GGUF that other tools, and our HF loader, can read.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::config::{RopeScaling, RopeStyle};
use crate::error::{ModelError, Result};
use crate::llama::ProjKind;
use crate::load::LoadedModel;

/// GGUF stores q/k rows of each head as (d/2, 2) pairs for adjacent-pair RoPE; HF keeps (2, d/2).
fn unpermute_heads(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    w.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

pub fn export_hf(m: &LoadedModel, dir: &Path) -> Result<()> {
    let io = |e: std::io::Error| ModelError::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let cfg = &m.model.cfg;
    let rope_scaling =
        match &cfg.rope_scaling {
            RopeScaling::None => serde_json::Value::Null,
            RopeScaling::Linear { factor } => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
            RopeScaling::FreqFactors(_) => return Err(ModelError::Unsupported(
                "exporting per-frequency rope factors (a GGUF's rope_freqs.weight) to config.json"
                    .into(),
            )),
        };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    tensors.insert("model.embed_tokens.weight".into(), f32(&m.model.embed)?);
    if !cfg.tie_word_embeddings {
        tensors.insert("lm_head.weight".into(), f32(&m.model.lm_head)?);
    }
    tensors.insert("model.norm.weight".into(), f32(&m.model.norm.weight)?);
    for (layer, b) in m.model.blocks.iter().enumerate() {
        let pre = format!("model.layers.{layer}");
        tensors.insert(
            format!("{pre}.input_layernorm.weight"),
            f32(&b.attn_norm.weight)?,
        );
        tensors.insert(
            format!("{pre}.post_attention_layernorm.weight"),
            f32(&b.mlp_norm.weight)?,
        );
        for (name, n) in [("q_norm", &b.attn.q_norm), ("k_norm", &b.attn.k_norm)] {
            if let Some(n) = n {
                // Weights over one head's dims, which the interleaved layout permutes like the q/k rows.
                let mut w = f32(&n.weight)?;
                if cfg.rope_style == RopeStyle::Interleaved {
                    w = unpermute_heads(&w.unsqueeze(1)?, 1)?.squeeze(1)?;
                }
                tensors.insert(format!("{pre}.self_attn.{name}.weight"), w);
            }
        }
        for lin in [
            &b.attn.q,
            &b.attn.k,
            &b.attn.v,
            &b.attn.o,
            &b.mlp.gate,
            &b.mlp.up,
            &b.mlp.down,
        ] {
            let part = if ProjKind::MLP.contains(&lin.id.kind) {
                "mlp"
            } else {
                "self_attn"
            };
            let heads = match lin.id.kind {
                ProjKind::Q => Some(cfg.num_heads),
                ProjKind::K => Some(cfg.num_kv_heads),
                _ => None,
            };
            let mut w = f32(lin.weight()?)?;
            if let (Some(h), RopeStyle::Interleaved) = (heads, cfg.rope_style) {
                w = unpermute_heads(&w, h)?;
            }
            let name = format!("{pre}.{part}.{}", lin.id.kind.name());
            tensors.insert(format!("{name}.weight"), w);
            if let Some(bias) = &lin.bias {
                let mut bias = f32(bias)?;
                if let (Some(h), RopeStyle::Interleaved) = (heads, cfg.rope_style) {
                    bias = unpermute_heads(&bias.unsqueeze(1)?, h)?.squeeze(1)?;
                }
                tensors.insert(format!("{name}.bias"), bias);
            }
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": if cfg.qk_norm { "qwen3" } else if cfg.qkv_bias { "qwen2" } else { "llama" },
        "attention_bias": cfg.qk_norm && cfg.qkv_bias,
        "rope_scaling": rope_scaling,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": m.tokenizer.bos,
        "eos_token_id": m.tokenizer.eos.first(),
        "torch_dtype": "float32",
    });
    let write = |name: &str, v: &serde_json::Value| {
        std::fs::write(
            dir.join(name),
            serde_json::to_string_pretty(v).expect("json"),
        )
        .map_err(io)
    };
    write("config.json", &config)?;
    let tok_str = |id: Option<u32>| id.and_then(|i| m.tokenizer.id_to_token(i));
    write(
        "tokenizer_config.json",
        &serde_json::json!({
            "add_bos_token": m.tokenizer.add_bos,
            "bos_token": tok_str(m.tokenizer.bos),
            "eos_token": tok_str(m.tokenizer.eos.first().copied()),
            "chat_template": m.template.source(),
        }),
    )?;
    m.tokenizer.save(&dir.join("tokenizer.json"))
}
