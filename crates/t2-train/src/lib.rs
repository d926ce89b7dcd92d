//! RL training of SVF experts (REINFORCE on the singular-value logits, rollouts batched through the
//! serving scheduler) and their evaluation (accuracy with a 95% confidence interval).

pub mod adam;
pub mod cem;
pub mod checkpoint;
pub mod eval;
pub mod plot;
pub mod policy;
pub mod prompt;
pub mod rollout;
pub mod train;

use std::path::PathBuf;

pub use eval::{wilson_interval, EvalConfig, EvalMode, EvalResult};
pub use policy::{Policy, Scored, SvfLogits};
pub use rollout::{Generator, Job, Rollout};
pub use train::{TrainConfig, TrainSummary, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Task(#[from] t2_tasks::TaskError),
    #[error(transparent)]
    Engine(#[from] t2_engine::EngineError),
    #[error(transparent)]
    Svf(#[from] t2_svf::SvfError),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("checkpoint {path} is unusable: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("generation failed: {0}")]
    Generate(String),
    #[error("verifier: {0}")]
    Verifier(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;
