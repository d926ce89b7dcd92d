//! t2-svf: singular value fine-tuning.
//!
//! Every target matrix W is decomposed once, W = U·diag(σ)·Vᵀ ([`decompose`], cached on disk). An expert is
//! one vector z per matrix ([`expert`]); experts mix linearly and become per-matrix scales
//! s = σ⊙z·(Σσ/Σ(σ⊙z)) ([`mix`]). [`SvfProjector`] multiplies each batch row with its own mix, either with
//! merged weights W' = (U⊙s)·Vᵀ when the whole batch shares one mix, or factored as ((x·V)⊙s)·Uᵀ.

pub mod checkpoint;
pub mod decompose;
pub mod error;
pub mod expert;
pub mod mix;
pub mod projector;
pub mod table;
pub mod targets;

pub use decompose::{Decomposition, Factors};
pub use error::{Result, SvfError};
pub use expert::{Expert, ExpertMeta, ExpertPin, ExpertStore, StoredExpert, StoredMix, Uploaded};
pub use mix::{Adaptation, Mix, MixKey, ZVectors, BASE_SHARE_KEY};
pub use projector::{SlotUse, SvfProjector};
pub use table::{MixId, MixLease, MixTable, BASE_MIX};
pub use targets::TargetSet;

/// A sibling temp name unique to this process and moment: concurrent writers (two test binaries, two
/// servers) never clobber each other's half-written file, and the final rename is atomic.
pub(crate) fn temp_path(path: &std::path::Path) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{nanos}.tmp", std::process::id()))
}
