//! kiln's worker: everything between model bytes on disk and sampled tokens.

pub mod assets;
pub mod backend;
pub mod assets_dir;
pub mod assets_hub;
pub mod constraint;
pub mod embed_queue;
pub mod embedding;
pub mod engine;
pub mod error;
pub mod formats;
pub mod kv_cache;
pub mod layers;
pub mod loader;
pub mod models;
pub mod parallel;
pub mod sampler;
pub mod scheduler;
pub mod service;
pub mod vision;

pub use error::{Error, Result};
