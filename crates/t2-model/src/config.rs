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

/// How the rotary frequencies are stretched for contexts past the length a model was pre-trained on. Every
/// variant rescales the inverse frequencies θ_i = theta^(-2i/d) once, when the RoPE tables are built.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (HF `rope_type: "linear"`, GGUF `rope.scaling.type = linear`).
    Linear { factor: f32 },
    /// Llama 3.1+: long wavelengths divided by `factor`, short ones kept, a smooth blend in between (HF
    /// `rope_type: "llama3"`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// One divisor per frequency (head_dim / 2 of them): how llama.cpp stores Llama-3 scaling in a GGUF
    /// (the `rope_freqs.weight` tensor).
    FreqFactors(Vec<f32>),
}

impl RopeScaling {
    /// The scaled inverse frequencies, from the plain ones.
    pub fn apply(&self, inv_freq: &mut [f32]) {
        match self {
            Self::None => {}
            Self::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let orig = *original_max_position_embeddings as f32;
                // Wavelengths (in positions) past which a frequency is fully scaled, below which it is kept.
                let (long, short) = (orig / low_freq_factor, orig / high_freq_factor);
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > long {
                        *f /= factor;
                    } else if wavelen >= short {
                        let s = (orig / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - s) * *f / factor + s * *f;
                    }
                }
            }
            Self::FreqFactors(div) => inv_freq.iter_mut().zip(div).for_each(|(f, d)| *f /= d),
        }
    }

    fn validate(&self, head_dim: usize) -> Result<(), String> {
        let ok = match self {
            Self::None => true,
            Self::Linear { factor } => *factor > 0.0,
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                *factor > 0.0
                    && *low_freq_factor > 0.0
                    && high_freq_factor > low_freq_factor
                    && *original_max_position_embeddings > 0
            }
            Self::FreqFactors(div) => {
                if div.len() != head_dim / 2 {
                    return Err(format!(
                        "rope frequency factors: {} of them for head_dim {head_dim} (expected {})",
                        div.len(),
                        head_dim / 2
                    ));
                }
                div.iter().all(|d| *d > 0.0)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(format!("invalid rope scaling {self:?}"))
        }
    }

    /// Reads an HF `rope_scaling` object. Types that would change the model's outputs in ways not
    /// implemented here (yarn, dynamic NTK, longrope) are refused rather than ignored.
    pub fn from_hf(v: &serde_json::Value) -> Result<Self, String> {
        if v.is_null() {
            return Ok(Self::None);
        }
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| format!("rope_scaling has no rope_type: {v}"))?;
        let num = |k: &str| -> Result<f64, String> {
            v.get(k)
                .and_then(|x| x.as_f64())
                .ok_or_else(|| format!("rope_scaling of type {kind} needs a number {k}"))
        };
        let scaling = match kind {
            "default" => Self::None,
            "linear" => Self::Linear {
                factor: num("factor")? as f32,
            },
            "llama3" => Self::Llama3 {
                factor: num("factor")? as f32,
                low_freq_factor: num("low_freq_factor")? as f32,
                high_freq_factor: num("high_freq_factor")? as f32,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            },
            other => {
                return Err(format!(
                    "rope_scaling type '{other}' is not supported (supported: linear, llama3); \
                     running it as plain RoPE would silently give wrong outputs"
                ))
            }
        };
        Ok(scaling)
    }
}

/// The shape of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM).
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
    /// Qwen3 normalizes each head of q and k (RMSNorm over head_dim) before RoPE.
    pub qk_norm: bool,
    pub rope_scaling: RopeScaling,
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
        self.rope_scaling.validate(self.head_dim)
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
            qk_norm: false,
            rope_scaling: RopeScaling::None,
        }
    }

    /// Shapes known by name, for speed work with random weights.
    pub const NAMED: &'static str = "smollm2-135m, llama-3.2-1b, llama-3-8b";

    /// The shape called `name` (one of [`Self::NAMED`]).
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "smollm2-135m" => Some(Self {
                vocab_size: 49152,
                hidden_size: 576,
                intermediate_size: 1536,
                num_layers: 30,
                num_heads: 9,
                num_kv_heads: 3,
                head_dim: 64,
                rope_theta: 100_000.0,
                max_position_embeddings: 8192,
                tie_word_embeddings: true,
                rope_style: RopeStyle::Half,
                ..Self::tiny()
            }),
            "llama-3.2-1b" => Some(Self::llama_3_2_1b()),
            "llama-3-8b" => Some(Self::llama_3_8b()),
            _ => None,
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
            qk_norm: false,
            rope_scaling: RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        }
    }

    /// The shape of Llama-3(.1)-8B, for speed work with random weights.
    pub fn llama_3_8b() -> Self {
        Self {
            vocab_size: 128256,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            rope_theta: 500000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 131072,
            tie_word_embeddings: false,
            rope_style: RopeStyle::Half,
            qkv_bias: false,
            qk_norm: false,
            rope_scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
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
    pub rope_scaling: Option<serde_json::Value>,
    /// Newer transformers write `rope_theta` and the scaling together here instead.
    pub rope_parameters: Option<serde_json::Value>,
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3 only use `sliding_window` when this is set; Mistral has no such flag.
    pub use_sliding_window: Option<bool>,
    pub hidden_act: Option<String>,
}

/// The `model_type`s this loader runs; anything else is refused (it would load and compute garbage).
pub const HF_MODEL_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

impl HfConfig {
    pub fn into_config(self) -> Result<LlamaConfig, String> {
        let model_type = self.model_type.as_deref().unwrap_or("llama");
        if !HF_MODEL_TYPES.contains(&model_type) {
            return Err(format!(
                "model_type '{model_type}' is not supported (supported: {})",
                HF_MODEL_TYPES.join(", ")
            ));
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(format!("hidden_act '{act}' is not supported (only silu)"));
        }
        let rope_scaling = match self.rope_scaling.as_ref().or(self.rope_parameters.as_ref()) {
            Some(v) => RopeScaling::from_hf(v)?,
            None => RopeScaling::None,
        };
        let rope_theta = self.rope_theta.or_else(|| {
            let p = self.rope_parameters.as_ref()?;
            p.get("rope_theta")?.as_f64().map(|t| t as f32)
        });
        let mut max_pos = self.max_position_embeddings.unwrap_or(4096);
        // Sliding-window attention is not implemented: within a context no longer than the window it is
        // the same as full attention, so the served context is capped at the window.
        let window_applies = match model_type {
            "mistral" => true,
            "qwen2" | "qwen3" => self.use_sliding_window.unwrap_or(false),
            _ => false,
        };
        if let Some(window) = self
            .sliding_window
            .filter(|w| window_applies && *w < max_pos)
        {
            tracing::warn!(
                sliding_window = window,
                max_position_embeddings = max_pos,
                "the checkpoint uses sliding-window attention, which t2 does not implement: the context \
                 is capped at the window ({window} tokens), where full attention gives the same result"
            );
            max_pos = window;
        }
        Ok(LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rope_theta: rope_theta.unwrap_or(10000.0),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: max_pos,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            rope_style: RopeStyle::Half,
            // Qwen2 always has q/k/v biases; Llama and Qwen3 only with attention_bias (which also puts a
            // bias on o_proj: the loader takes any projection bias the checkpoint has).
            qkv_bias: model_type == "qwen2" || self.attention_bias.unwrap_or(false),
            qk_norm: model_type == "qwen3",
            rope_scaling,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf(extra: serde_json::Value) -> Result<LlamaConfig, String> {
        let mut v = serde_json::json!({
            "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value::<HfConfig>(v).unwrap().into_config()
    }

    #[test]
    fn rope_scaling_types() {
        let l3 = hf(serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
        .unwrap();
        assert_eq!(l3.rope_scaling, LlamaConfig::llama_3_8b().rope_scaling);
        // The older key name.
        let lin =
            hf(serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}})).unwrap();
        assert_eq!(lin.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        for kind in ["yarn", "dynamic", "longrope"] {
            let e = hf(serde_json::json!({"rope_scaling": {"rope_type": kind, "factor": 4.0}}))
                .unwrap_err();
            assert!(e.contains(kind) && e.contains("not supported"), "{e}");
        }
        let e = hf(serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
            .unwrap_err();
        assert!(e.contains("low_freq_factor"), "{e}");
        assert_eq!(
            hf(serde_json::json!({"rope_scaling": null}))
                .unwrap()
                .rope_scaling,
            RopeScaling::None
        );
        // transformers 5 layout: theta and scaling in rope_parameters.
        let p = hf(
            serde_json::json!({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}}),
        )
        .unwrap();
        assert_eq!(p.rope_scaling, l3.rope_scaling);
        assert_eq!(p.rope_theta, 500000.0);
        let p =
            hf(serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}))
                .unwrap();
        assert_eq!((p.rope_scaling, p.rope_theta), (RopeScaling::None, 1e6));
    }

    #[test]
    fn llama3_scaling_keeps_short_scales_long_and_blends_between() {
        let s = LlamaConfig::llama_3_8b().rope_scaling;
        let d = 128;
        let plain: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / d as f32))
            .collect();
        let mut scaled = plain.clone();
        s.apply(&mut scaled);
        let wl = |f: f32| 2.0 * std::f32::consts::PI / f;
        for (p, q) in plain.iter().zip(&scaled) {
            if wl(*p) < 2048.0 {
                assert_eq!(p, q);
            } else if wl(*p) > 8192.0 {
                assert!((q * 8.0 - p).abs() <= 1e-6 * p);
            } else {
                assert!(q < p && *q > p / 8.0);
            }
        }
    }

    #[test]
    fn families_and_windows() {
        let q2 = hf(serde_json::json!({"model_type": "qwen2", "rope_theta": 1000000.0})).unwrap();
        assert!(q2.qkv_bias && !q2.qk_norm);
        assert_eq!(q2.rope_theta, 1e6);
        let q3 = hf(serde_json::json!({"model_type": "qwen3", "head_dim": 32})).unwrap();
        assert!(!q3.qkv_bias && q3.qk_norm);
        assert_eq!(q3.head_dim, 32);
        let m = hf(serde_json::json!({"model_type": "mistral", "sliding_window": 256})).unwrap();
        assert_eq!(m.max_position_embeddings, 256);
        let m = hf(serde_json::json!({"model_type": "mistral", "sliding_window": null})).unwrap();
        assert_eq!(m.max_position_embeddings, 1024);
        // Qwen2 declares a window it does not use unless use_sliding_window is set.
        let q = hf(serde_json::json!({"model_type": "qwen2", "sliding_window": 256})).unwrap();
        assert_eq!(q.max_position_embeddings, 1024);
        let q = hf(
            serde_json::json!({"model_type": "qwen2", "sliding_window": 256,
            "use_sliding_window": true}),
        )
        .unwrap();
        assert_eq!(q.max_position_embeddings, 256);
        let e = hf(serde_json::json!({"model_type": "gemma"})).unwrap_err();
        assert!(e.contains("gemma"), "{e}");
    }
}
