use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, ModelError>;

/// Everything that can go wrong loading or running a model. Messages are meant to be shown as-is on one line.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file not found: {0} (run `bash scripts/fetch-model.sh` to fetch the default model, or pass --model PATH)")]
    NotFound(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid GGUF model: {reason}")]
    BadGguf { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadCheckpoint { path: PathBuf, reason: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
