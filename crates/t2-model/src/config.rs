use serde::Deserialize;

/// How rotary embeddings pair up the dimensions of a head. GGUF conversion permutes the q/k rows so that
/// llama.cpp can rotate adjacent pairs; HF checkpoints keep the original "rotate half" layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// (x[2i], x[2i+1]) rotate together: GGUF files.
    Interleaved,
    /// (x[i], x[i + d/2]) rotate together: HF safetensors.
    Half,
}

/// The shape of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub rope_style: RopeStyle,
    /// Qwen2 adds biases to the q, k and v projections.
    pub qkv_bias: bool,
}

impl LlamaConfig {
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        Ok(())
    }

    /// A small random-weight configuration for tests of the machinery (not of the model's outputs).
    pub fn tiny() -> Self {
        Self {
            vocab_size: 97,
            hidden_size: 32,
            intermediate_size: 48,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 256,
            tie_word_embeddings: true,
            rope_style: RopeStyle::Interleaved,
            qkv_bias: false,
        }
    }

    /// The shape of Llama-3.2-1B, for speed work with random weights.
    pub fn llama_3_2_1b() -> Self {
        Self {
            vocab_size: 128256,
            hidden_size: 2048,
            intermediate_size: 8192,
            num_layers: 16,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 64,
            rope_theta: 500000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 131072,
            tie_word_embeddings: true,
            rope_style: RopeStyle::Half,
            qkv_bias: false,
        }
    }
}

/// The fields of an HF `config.json` that a Llama-family model needs.
#[derive(Debug, Deserialize)]
pub(crate) struct HfConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rope_theta: Option<f32>,
    pub rms_norm_eps: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub model_type: Option<String>,
    pub attention_bias: Option<bool>,
}

impl HfConfig {
    pub fn into_config(self) -> LlamaConfig {
        let qwen = self.model_type.as_deref() == Some("qwen2");
        LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rope_theta: self.rope_theta.unwrap_or(10000.0),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            rope_style: RopeStyle::Half,
            qkv_bias: qwen || self.attention_bias.unwrap_or(false),
        }
    }
}
