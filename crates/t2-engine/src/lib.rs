//! t2-engine: a resident model with its SVF machinery, and the generation loop that advances many
//! sequences (each with its own mix and sampling) in shared batch steps.

pub mod engine;
pub mod generate;
pub mod text;

pub use engine::{Adaptation, Engine, EngineConfig, EngineError};
pub use generate::{FinishReason, GenOutput, GenRequest, TokenEvent};
