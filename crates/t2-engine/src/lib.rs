//! t2-engine: a resident model with its SVF machinery, the one-shot batch loop, and the scheduler that
//! runs many requests (each with its own mix and sampling) in shared, continuously refilled batch steps.

pub mod engine;
pub mod generate;
pub mod gpu_runner;
pub mod kv;
pub mod memory;
pub mod plan;
pub mod prefix_cache;
pub mod routing;
pub mod runner;
pub mod scheduler;
pub mod sequence;
pub mod text;

pub use engine::{Engine, EngineConfig, EngineError};
pub use generate::GenOutput;
pub use gpu_runner::GpuRunner;
pub use kv::{BlockKvManager, KvLease};
pub use memory::MemoryPlan;
pub use plan::{RowOutput, RowPlan, RowTask, SeqId, StepPlan};
pub use routing::{RouteDecision, RouteLabel, RoutePolicy, RouteSpec, RouteStrategy, Router};
pub use runner::{CpuRunner, ModelRunner};
pub use scheduler::{
    Failure, FailureKind, Scheduler, SchedulerConfig, SchedulerStats, SeqEvent, SeqHandle,
    Submission, SubmitError,
};
pub use sequence::{FinishReason, GenRequest, Scored, TokenEvent};
pub use t2_svf::{Adaptation, Mix, MixLease, ZVectors};
