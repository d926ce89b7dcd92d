//! t2-engine: a resident model with its SVF machinery, the one-shot batch loop, and the scheduler that
//! runs many requests (each with its own mix and sampling) in shared, continuously refilled batch steps.

pub mod engine;
pub mod generate;
pub mod routing;
pub mod scheduler;
pub mod sequence;
pub mod text;

pub use engine::{Adaptation, Engine, EngineConfig, EngineError, ZVectors};
pub use generate::GenOutput;
pub use routing::{RouteDecision, RouteLabel, RoutePolicy, RouteSpec, Router};
pub use scheduler::{
    Scheduler, SchedulerConfig, SchedulerStats, SeqEvent, SeqHandle, Submission, SubmitError,
};
pub use sequence::{FinishReason, GenRequest, Scored, TokenEvent};
