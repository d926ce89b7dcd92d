//! RL training of SVF experts: REINFORCE on the singular-value logits, with rollouts answered, batched
//! through the serving scheduler and verified by `t2-adapt`'s [`t2_adapt::Answerer`].

pub mod adam;
pub mod checkpoint;
pub mod config;
mod label;
pub mod options;
pub mod plot;
pub mod policy;
pub mod runlog;
pub mod step;
pub mod train;

use std::path::PathBuf;

pub use config::{RunOptions, TrainConfig};
pub use policy::{Branched, Policy, Scored, SvfLogits};
pub use runlog::{read_log, LogRow};
pub use train::{TrainSummary, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Adapt(#[from] t2_adapt::AdaptError),
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
}

pub type Result<T> = std::result::Result<T, TrainError>;
