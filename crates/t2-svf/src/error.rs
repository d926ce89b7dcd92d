use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, SvfError>;

#[derive(Debug, thiserror::Error)]
pub enum SvfError {
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("decomposition cache {path} is unusable: {reason}")]
    BadCache { path: PathBuf, reason: String },
    #[error("decomposition of {matrix} failed: {reason}")]
    Decompose { matrix: String, reason: String },
    #[error("expert {name}: {reason}")]
    BadExpert { name: String, reason: String },
    #[error("unknown expert '{name}' (known: {known})")]
    UnknownExpert { name: String, known: String },
    #[error("invalid mix: {0}")]
    BadMix(String),
    /// The store cannot make this change now (a name taken by another kind, an expert in use).
    #[error("{0}")]
    Conflict(String),
    #[error("mix table is full ({0} mixes); retry later")]
    TableFull(usize),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
