//! Writes the model-family reference fixtures that `crates/t2-engine/tests/hf_checkpoint.rs` checks t2
//! against: for each architecture a small HF checkpoint with seeded random weights (config.json,
//! safetensors in f16, a word-level tokenizer.json) and `reference.json`, the logits that
//! candle-transformers' implementation of that architecture gives on CPU in f32 for a short prompt and a
//! few decode steps through its KV cache.
//!
//! Not part of the workspace and not built by CI (candle-transformers takes minutes to compile). Run from
//! the repository root:
//!
//!     cargo run --manifest-path tools/family-fixtures/Cargo.toml -- crates/t2-model/tests/fixtures/families
//!
//! The output is deterministic: the same seed gives byte-identical files.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, mistral, qwen2, qwen3};
use serde_json::json;

const VOCAB: usize = 256;
const HIDDEN: usize = 64;
const INTER: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const EPS: f64 = 1e-5;
const PROMPT_LEN: usize = 7;
const DECODE_LEN: usize = 4;

/// splitmix64: a tiny seeded generator, so the fixtures depend on no RNG crate's version.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// What differs between the four fixtures.
struct Family {
    name: &'static str,
    model_type: &'static str,
    head_dim: usize,
    rope_theta: f64,
    tied: bool,
    qkv_bias: bool,
    qk_norm: bool,
    max_pos: usize,
    sharded: bool,
    seed: u64,
}

const FAMILIES: [Family; 4] = [
    // Llama 3.x rope scaling with an original context of 64, so that at the fixture's positions the
    // kept, blended and divided frequencies all matter (head_dim 16, theta 1e4: wavelengths 6.3, 20, 63,
    // 199, ...; kept below 64/4, divided above 64/1).
    Family {
        name: "llama3",
        model_type: "llama",
        head_dim: 16,
        rope_theta: 10000.0,
        tied: false,
        qkv_bias: false,
        qk_norm: false,
        max_pos: 256,
        sharded: false,
        seed: 1,
    },
    Family {
        name: "qwen2",
        model_type: "qwen2",
        head_dim: 16,
        rope_theta: 1_000_000.0,
        tied: true,
        qkv_bias: true,
        qk_norm: false,
        max_pos: 256,
        sharded: false,
        seed: 2,
    },
    // head_dim 32 while hidden / heads is 16: Qwen3 takes head_dim from its config.
    Family {
        name: "qwen3",
        model_type: "qwen3",
        head_dim: 32,
        rope_theta: 1_000_000.0,
        tied: true,
        qkv_bias: false,
        qk_norm: true,
        max_pos: 256,
        sharded: false,
        seed: 3,
    },
    // A sliding window (32) shorter than max_position_embeddings (128), in two shards with an index.
    Family {
        name: "mistral",
        model_type: "mistral",
        head_dim: 16,
        rope_theta: 10000.0,
        tied: false,
        qkv_bias: false,
        qk_norm: false,
        max_pos: 128,
        sharded: true,
        seed: 4,
    },
];

const LLAMA3_ORIG_CTX: usize = 64;
const MISTRAL_WINDOW: usize = 32;

/// The checkpoint's tensors in a fixed order, values rounded to f16 (what the files store).
fn weights(f: &Family, rng: &mut Rng) -> Vec<(String, Tensor)> {
    let dev = &Device::Cpu;
    let mut out = Vec::new();
    let mut t = |name: String, shape: &[usize], center: f32, spread: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| half::f16::from_f32(center + spread * rng.sym()).to_f32())
            .collect();
        out.push((name, Tensor::from_vec(v, shape, dev).unwrap()));
    };
    let lin = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    let (qd, kvd) = (HEADS * f.head_dim, KV_HEADS * f.head_dim);
    t(
        "model.embed_tokens.weight".into(),
        &[VOCAB, HIDDEN],
        0.0,
        1.0,
    );
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        t(format!("{p}.input_layernorm.weight"), &[HIDDEN], 1.0, 0.2);
        t(
            format!("{p}.post_attention_layernorm.weight"),
            &[HIDDEN],
            1.0,
            0.2,
        );
        for (n, rows) in [("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)] {
            t(
                format!("{p}.self_attn.{n}.weight"),
                &[rows, HIDDEN],
                0.0,
                lin(HIDDEN),
            );
            if f.qkv_bias {
                t(format!("{p}.self_attn.{n}.bias"), &[rows], 0.0, 0.3);
            }
        }
        t(
            format!("{p}.self_attn.o_proj.weight"),
            &[HIDDEN, qd],
            0.0,
            lin(qd),
        );
        if f.qk_norm {
            t(
                format!("{p}.self_attn.q_norm.weight"),
                &[f.head_dim],
                1.0,
                0.3,
            );
            t(
                format!("{p}.self_attn.k_norm.weight"),
                &[f.head_dim],
                1.0,
                0.3,
            );
        }
        t(
            format!("{p}.mlp.gate_proj.weight"),
            &[INTER, HIDDEN],
            0.0,
            lin(HIDDEN),
        );
        t(
            format!("{p}.mlp.up_proj.weight"),
            &[INTER, HIDDEN],
            0.0,
            lin(HIDDEN),
        );
        t(
            format!("{p}.mlp.down_proj.weight"),
            &[HIDDEN, INTER],
            0.0,
            lin(INTER),
        );
    }
    t("model.norm.weight".into(), &[HIDDEN], 1.0, 0.2);
    if !f.tied {
        t("lm_head.weight".into(), &[VOCAB, HIDDEN], 0.0, lin(HIDDEN));
    }
    out
}

fn hf_config(f: &Family) -> serde_json::Value {
    let mut c = json!({
        "architectures": [match f.model_type {
            "llama" => "LlamaForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            "qwen3" => "Qwen3ForCausalLM",
            _ => "MistralForCausalLM",
        }],
        "model_type": f.model_type,
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": f.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": f.max_pos,
        "rms_norm_eps": EPS,
        "rope_theta": f.rope_theta,
        "tie_word_embeddings": f.tied,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float16",
    });
    let m = c.as_object_mut().unwrap();
    match f.model_type {
        "llama" => {
            m.insert("attention_bias".into(), json!(false));
            m.insert(
                "rope_scaling".into(),
                json!({
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": LLAMA3_ORIG_CTX,
                }),
            );
        }
        "qwen2" | "qwen3" => {
            m.insert("attention_bias".into(), json!(false));
            m.insert("sliding_window".into(), json!(f.max_pos));
            m.insert("use_sliding_window".into(), json!(false));
            m.insert("max_window_layers".into(), json!(LAYERS));
        }
        _ => {
            m.insert("sliding_window".into(), json!(MISTRAL_WINDOW));
        }
    }
    c
}

/// A word-level tokenizer over the fixture's vocabulary ("t0" .. "t255"), enough for the loader.
fn tokenizer_json() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..VOCAB).map(|i| (format!("t{i}"), json!(i))).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    })
}

/// Logits of the last prompt position, then of each decode step, from candle-transformers.
fn reference_logits(
    f: &Family,
    tensors: &[(String, Tensor)],
    prompt: &[u32],
    decode: &[u32],
) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
    let ids = |t: &[u32]| Tensor::new(t, &dev).unwrap().unsqueeze(0).unwrap();
    let last = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let mut out = Vec::new();
    match f.model_type {
        "llama" => {
            let cfg = llama::Config {
                hidden_size: HIDDEN,
                intermediate_size: INTER,
                vocab_size: VOCAB,
                num_hidden_layers: LAYERS,
                num_attention_heads: HEADS,
                num_key_value_heads: KV_HEADS,
                use_flash_attn: false,
                rms_norm_eps: EPS,
                rope_theta: f.rope_theta as f32,
                bos_token_id: None,
                eos_token_id: None,
                rope_scaling: Some(llama::Llama3RopeConfig {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: LLAMA3_ORIG_CTX,
                    rope_type: llama::Llama3RopeType::Llama3,
                }),
                max_position_embeddings: f.max_pos,
                tie_word_embeddings: f.tied,
            };
            assert_eq!(
                HIDDEN / HEADS,
                f.head_dim,
                "candle's llama derives head_dim"
            );
            let model = llama::Llama::load(vb, &cfg).unwrap();
            let mut cache = llama::Cache::new(true, DType::F32, &cfg, &dev).unwrap();
            out.push(last(model.forward(&ids(prompt), 0, &mut cache).unwrap()));
            for (i, &t) in decode.iter().enumerate() {
                let l = model.forward(&ids(&[t]), prompt.len() + i, &mut cache);
                out.push(last(l.unwrap()));
            }
        }
        "qwen2" => {
            let cfg = qwen2::Config {
                vocab_size: VOCAB,
                hidden_size: HIDDEN,
                intermediate_size: INTER,
                num_hidden_layers: LAYERS,
                num_attention_heads: HEADS,
                num_key_value_heads: KV_HEADS,
                max_position_embeddings: f.max_pos,
                sliding_window: f.max_pos,
                max_window_layers: LAYERS,
                tie_word_embeddings: f.tied,
                rope_theta: f.rope_theta,
                rms_norm_eps: EPS,
                use_sliding_window: false,
                hidden_act: candle_nn::Activation::Silu,
            };
            assert_eq!(
                HIDDEN / HEADS,
                f.head_dim,
                "candle's qwen2 derives head_dim"
            );
            let mut model = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
            out.push(last(model.forward(&ids(prompt), 0).unwrap()));
            for (i, &t) in decode.iter().enumerate() {
                out.push(last(model.forward(&ids(&[t]), prompt.len() + i).unwrap()));
            }
        }
        "qwen3" => {
            let cfg = qwen3::Config {
                vocab_size: VOCAB,
                hidden_size: HIDDEN,
                intermediate_size: INTER,
                num_hidden_layers: LAYERS,
                num_attention_heads: HEADS,
                head_dim: f.head_dim,
                attention_bias: false,
                num_key_value_heads: KV_HEADS,
                max_position_embeddings: f.max_pos,
                sliding_window: None,
                max_window_layers: LAYERS,
                tie_word_embeddings: f.tied,
                rope_theta: f.rope_theta,
                rms_norm_eps: EPS,
                use_sliding_window: false,
                hidden_act: candle_nn::Activation::Silu,
            };
            let mut model = qwen3::ModelForCausalLM::new(&cfg, vb).unwrap();
            out.push(last(model.forward(&ids(prompt), 0).unwrap()));
            for (i, &t) in decode.iter().enumerate() {
                out.push(last(model.forward(&ids(&[t]), prompt.len() + i).unwrap()));
            }
        }
        _ => {
            let cfg = mistral::Config {
                vocab_size: VOCAB,
                hidden_size: HIDDEN,
                intermediate_size: INTER,
                num_hidden_layers: LAYERS,
                num_attention_heads: HEADS,
                head_dim: Some(f.head_dim),
                num_key_value_heads: KV_HEADS,
                hidden_act: candle_nn::Activation::Silu,
                max_position_embeddings: f.max_pos,
                rms_norm_eps: EPS,
                rope_theta: f.rope_theta,
                sliding_window: Some(MISTRAL_WINDOW),
                use_flash_attn: false,
            };
            assert!(!f.tied, "candle's mistral always has an lm_head");
            let mut model = mistral::Model::new(&cfg, vb).unwrap();
            out.push(last(model.forward(&ids(prompt), 0).unwrap()));
            for (i, &t) in decode.iter().enumerate() {
                out.push(last(model.forward(&ids(&[t]), prompt.len() + i).unwrap()));
            }
        }
    }
    for l in &out {
        assert_eq!(l.len(), VOCAB);
        assert!(l.iter().all(|x| x.is_finite()));
    }
    out
}

fn save_f16(tensors: &[(String, Tensor)], path: &Path) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap() + "\n").unwrap();
}

fn main() {
    let root = std::env::args()
        .nth(1)
        .expect("usage: family-fixtures OUTPUT_DIR");
    for f in &FAMILIES {
        let dir = Path::new(&root).join(f.name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        let mut rng = Rng(f.seed);
        let tensors = weights(f, &mut rng);
        let mut tok = |n: usize| -> Vec<u32> {
            (0..n)
                .map(|_| (rng.next_u64() % VOCAB as u64) as u32)
                .collect()
        };
        let prompt = tok(PROMPT_LEN);
        let decode = tok(DECODE_LEN);

        if f.sharded {
            // Layer 0 and the embedding in the first shard, the rest in the second.
            let (a, b): (Vec<_>, Vec<_>) = tensors.iter().cloned().partition(|(n, _)| {
                n.starts_with("model.layers.0.") || n.starts_with("model.embed_tokens")
            });
            let names = [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ];
            let mut map = serde_json::Map::new();
            let mut total = 0;
            for (part, name) in [&a, &b].into_iter().zip(names) {
                save_f16(part, &dir.join(name));
                for (n, t) in part {
                    map.insert(n.clone(), json!(name));
                    total += t.elem_count() * 2;
                }
            }
            write_json(
                &dir.join("model.safetensors.index.json"),
                &json!({"metadata": {"total_size": total}, "weight_map": map}),
            );
        } else {
            save_f16(&tensors, &dir.join("model.safetensors"));
        }
        write_json(&dir.join("config.json"), &hf_config(f));
        write_json(&dir.join("tokenizer.json"), &tokenizer_json());
        let logits = reference_logits(f, &tensors, &prompt, &decode);
        write_json(
            &dir.join("reference.json"),
            &json!({
                "reference": "candle-transformers 0.11.1, CPU, f32",
                "command": "cargo run --manifest-path tools/family-fixtures/Cargo.toml -- crates/t2-model/tests/fixtures/families",
                "prompt": prompt,
                "decode": decode,
                "logits": logits,
            }),
        );
        println!("{}: {}", f.name, dir.display());
    }
}
