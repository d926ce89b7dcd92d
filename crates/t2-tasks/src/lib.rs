//! Verifiable tasks: the items of every split (read from the files `scripts/fetch-data.sh` writes), and the
//! verifiers that turn a generated answer into a reward. Knows nothing of models.

pub mod data;
pub mod sandbox;
pub mod shots;
pub mod verify;

pub use data::{Answer, Split, Task, TaskError, TaskInfo, TaskItem};
pub use sandbox::{RunOutcome, RunReport, Sandbox, SandboxConfig, SandboxError};
pub use verify::{verify, verify_all, Verdict};
