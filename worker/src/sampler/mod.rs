//! Turning logits into the next token: penalties, then greedy choice or filtered sampling.

pub mod logits;
pub mod rng;
pub mod select;
pub mod stop;

pub use logits::apply_penalties;
pub use rng::Rng;
pub use select::{sample, Candidates};
pub use stop::{StopMatch, StopMatcher};
