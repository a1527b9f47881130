//! Generation. `Session` runs one sequence at a time over the paged cache; the batching
//! engine builds on the same model interface.

pub mod session;

pub use session::{Completion, FinishReason, GenerationRequest, Session, Usage};
