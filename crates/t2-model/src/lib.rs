//! t2-model: everything needed to run a Llama-family model in candle, and nothing about HTTP or experts.
//!
//! Loading (GGUF dequantized to dense tensors, or an HF folder of safetensors), the tokenizer and chat
//! template, the forward pass over a *ragged* batch (many sequences of different lengths advanced in one
//! step), and sampling. Every projection goes through a [`Projector`] so that callers (SVF) decide how
//! each batch row is multiplied.

pub mod chat;
pub mod config;
pub mod cpu_attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod export;
pub mod gemm;
pub mod kernels;
pub mod kv;
pub mod llama;
pub mod load;
pub mod pool;
pub mod profile;
pub mod sampling;
pub mod stacked;
pub mod tokenizer;
mod vmath;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{LlamaConfig, RopeScaling, RopeStyle};
pub use error::{ModelError, Result};
pub use kv::{KvPool, SeqKv, BLOCK_SIZE};
pub use llama::{
    random_llama, BaseWeights, DenseProjector, Linear, Llama, ProjId, ProjKind, Projector,
    RowMixes, SeqStep, WantLogits,
};
pub use load::{LoadedModel, ModelSource};
pub use sampling::{ConstraintCell, Sampler, SamplingParams, TokenConstraint, TokenLogprob};
pub use tokenizer::T2Tokenizer;

/// Free and total bytes of an accelerator's memory; None on the CPU (and in builds without `cuda`).
pub fn device_memory(device: &candle_core::Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        return d.cuda_stream().context().mem_get_info().ok();
    }
    let _ = device;
    None
}
