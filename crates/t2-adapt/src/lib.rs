//! Adaptation without training: everything that answers task items, verifies the answers and searches
//! expert mixes, but never computes a gradient. Generation goes through the serving scheduler (batched,
//! each row with its own mix), so a server can run a few-shot search on its own scheduler without linking
//! the trainer.

pub mod answer;
pub mod cem;
pub mod eval;
pub mod holdout;
pub mod label;
pub mod prompt;
pub mod rollout;

pub use answer::Answerer;
pub use eval::{wilson_interval, EvalConfig, EvalMode, EvalResult};
pub use rollout::{Generator, Job, Rollout};

#[derive(Debug, thiserror::Error)]
pub enum AdaptError {
    #[error(transparent)]
    Task(#[from] t2_tasks::TaskError),
    #[error(transparent)]
    Engine(#[from] t2_engine::EngineError),
    #[error(transparent)]
    Svf(#[from] t2_svf::SvfError),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Config(String),
    #[error("generation failed: {0}")]
    Generate(String),
    #[error("verifier: {0}")]
    Verifier(String),
}

pub type Result<T> = std::result::Result<T, AdaptError>;
