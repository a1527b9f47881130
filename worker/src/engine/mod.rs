//! Generation. `Engine` serves many requests at once with continuous batching over the paged
//! KV cache; `Session` runs one sequence directly, for scoring and measurements.

pub mod decoding;
pub mod handle;
mod output;
pub mod session;
pub mod step;

pub use handle::{EngineHandle, EngineStats, Event, Failure, PromptLogprob, RequestStream};
pub use session::{Completion, FinishReason, GenerationRequest, Resume, Session, Usage};
pub use step::{Engine, EngineConfig};
